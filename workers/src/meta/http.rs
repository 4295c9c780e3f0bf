//! The HTTP/1.1 transport under the Meta client: hyper's connection API with a connection pool
//! of our own.
//!
//! Why not reqwest or hyper-util's pooled client: the HTTP request is most of what a send costs
//! the engine, and their generic layers (connector services, a pool keyed by URI with a
//! checkout future and a task per returned connection, redirect and proxy handling) cost a
//! third of it. Meta's send API needs none of them: one origin per Graph base URL, one POST,
//! a small JSON answer, no redirects. Measured with `herald bench client` (one request per
//! message, 1,000 a second, one-thread runtime): see the README's delivery figures.
//!
//! What a send may assume of the answer (the send policy relies on it):
//! - [`Failure::NotSent`]: no byte of the request left the process: no connection could be
//!   made in time, or the connection closed before hyper began writing the request (hyper
//!   hands such a request back; on a pooled connection the next one is tried). Safe to retry
//!   at once.
//! - [`Failure::Lost`]: the request may have reached Meta (timeout, broken connection,
//!   unreadable or oversized answer).
//!
//! Not supported, unlike reqwest: proxies (`HTTPS_PROXY` and the like are ignored, and the
//! client says so when it is made), HTTP/2, and credentials in the URL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{lookup_host, TcpStream};

/// Where requests go: scheme, host and port. One pool of connections per origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    pub https: bool,
    pub host: Host,
    pub port: u16,
}

/// A URL's host: a name to resolve, or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Host {
    Name(String),
    Ip(IpAddr),
}

/// A parsed endpoint: its origin, the `Host` header and the request target.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub origin: Origin,
    pub host_header: HeaderValue,
    pub path: PathAndQuery,
}

impl Endpoint {
    /// Parses an `http` or `https` URL with a host. The error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("{url} is not an HTTP URL (scheme {other})")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => Host::Name(d.to_owned()),
            Some(url::Host::Ipv4(ip)) => Host::Ip(ip.into()),
            Some(url::Host::Ipv6(ip)) => Host::Ip(ip.into()),
            _ => return Err(format!("{url} has no host")),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{url} has no port"))?;
        let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let host_header = HeaderValue::from_str(authority)
            .map_err(|e| format!("{url}: the host cannot be a header: {e}"))?;
        let path =
            PathAndQuery::try_from(&url[url::Position::BeforePath..url::Position::AfterQuery])
                .map_err(|e| format!("{url}: the path cannot be a request target: {e}"))?;
        Ok(Endpoint {
            origin: Origin { https, host, port },
            host_header,
            path,
        })
    }
}

/// Meta's answer, read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a request has no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nothing was sent.
    NotSent(String),
    /// The request may have reached the server.
    Lost(String),
}

/// The transport's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransportConfig {
    /// Making a connection (name lookup, TCP and TLS) longer than this fails as
    /// [`Failure::NotSent`]; with several addresses, each gets its share of it.
    pub connect_timeout: Duration,
    /// The whole request, from its start (connecting included) to the last byte of the
    /// answer, as reqwest's timeout was: a send never waits on the transport longer.
    pub request_timeout: Duration,
    /// Idle connections kept per origin (0: none, every request connects anew).
    pub max_idle_per_origin: usize,
    /// An idle connection older than this is closed rather than reused: servers close idle
    /// connections too (reusing one they are closing risks a lost answer). The pool is swept
    /// of such connections, and of closed ones, every half of this (by a task of its own, and
    /// at check-ins); a connection the server closes frees its socket at once (its driver task
    /// ends).
    pub idle_timeout: Duration,
    /// Larger answers are refused as [`Failure::Lost`]: Meta's answers to a send are a few
    /// hundred bytes, and a misbehaving server must not make the engine buffer without end.
    pub max_answer_bytes: usize,
}

/// Most origins in the pool (a list stays while its connections are out, until a sweep finds
/// it empty): channels name their own Graph base URL, and a pool without a bound would let
/// them hold open sockets without end. When it is full, empty lists make room first; past
/// that, connections to new origins are not kept.
const MAX_ORIGINS: usize = 256;

/// TCP keepalive probes on every connection (as reqwest's defaults): a connection that died
/// silently is noticed in the pool, not by the send that reuses it (a lost answer).
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 3;

/// A connection waiting in the pool.
struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

/// The idle connections, oldest first in each origin's list.
struct Pool {
    origins: HashMap<Origin, Vec<Idle>>,
    last_sweep: Instant,
}

/// HTTP/1.1 POSTs over pooled keep-alive connections. Cheap to share: one pool per process.
pub(crate) struct Transport {
    config: TransportConfig,
    tls: tokio_rustls::TlsConnector,
    user_agent: HeaderValue,
    /// Shared with the sweeper task, which holds it weakly and ends with the transport.
    idle: Arc<Mutex<Pool>>,
}

impl Pool {
    /// Drops closed connections and those idle for `idle_timeout`, and origins left empty.
    fn sweep(&mut self, idle_timeout: Duration, now: Instant) {
        self.last_sweep = now;
        self.origins.retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout);
            !list.is_empty()
        });
    }
}

/// Sweeps the pool every half `idle_timeout` while the transport lives (check-ins sweep too,
/// but a process that stops sending makes none): idle connections to a server that never
/// closes them are not kept for ever. Without a runtime (a client made outside one) only the
/// check-ins sweep.
fn start_sweeper(pool: &Arc<Mutex<Pool>>, idle_timeout: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pool = Arc::downgrade(pool);
    let period = (idle_timeout / 2).max(Duration::from_millis(10));
    runtime.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            pool.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .sweep(idle_timeout, Instant::now());
        }
    });
}

impl Transport {
    /// Trusts Mozilla's roots (webpki-roots), as reqwest did: the same on every machine,
    /// whatever the system's store holds.
    pub fn new(config: TransportConfig) -> Result<Transport, String> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Transport::with_roots(config, roots)
    }

    fn with_roots(config: TransportConfig, roots: rustls::RootCertStore) -> Result<Self, String> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let idle = Arc::new(Mutex::new(Pool {
            origins: HashMap::new(),
            last_sweep: Instant::now(),
        }));
        start_sweeper(&idle, config.idle_timeout);
        Ok(Transport {
            config,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            user_agent: HeaderValue::from_static(concat!("herald/", env!("CARGO_PKG_VERSION"))),
            idle,
        })
    }

    /// POSTs `body` as JSON to `endpoint` with `authorization`, and reads the whole answer,
    /// all within `request_timeout`.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        authorization: &HeaderValue,
        body: Vec<u8>,
    ) -> Result<Answer, Failure> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut req = self.request(endpoint, authorization, body);
        // A pooled connection may turn out closed; then the next one, and at last a new one.
        loop {
            let (mut sender, pooled) = match self.checkout(&endpoint.origin) {
                Some(sender) => (sender, true),
                None => (self.connect(&endpoint.origin, deadline).await?, false),
            };
            if pooled {
                // Ready at once unless the connection is still finishing its last answer.
                match tokio::time::timeout_at(deadline, sender.ready()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => continue,
                    Err(_) => {
                        return Err(Failure::NotSent(format!(
                            "no connection was ready within {:?}",
                            self.config.request_timeout
                        )))
                    }
                }
            }
            let sent = tokio::time::timeout_at(deadline, sender.try_send_request(req)).await;
            let response = match sent {
                Ok(Ok(response)) => response,
                Ok(Err(mut e)) => match e.take_message() {
                    // Not written: the connection closed before hyper began the request.
                    Some(back) if pooled => {
                        req = back;
                        continue;
                    }
                    Some(_) => return Err(Failure::NotSent(e.into_error().to_string())),
                    None => return Err(Failure::Lost(e.into_error().to_string())),
                },
                Err(_) => {
                    return Err(Failure::Lost(format!(
                        "no answer within {:?}",
                        self.config.request_timeout
                    )))
                }
            };
            let (parts, body) = response.into_parts();
            let body = tokio::time::timeout_at(
                deadline,
                Limited::new(body, self.config.max_answer_bytes).collect(),
            )
            .await
            .map_err(|_| {
                Failure::Lost(format!(
                    "the answer was not read within {:?}",
                    self.config.request_timeout
                ))
            })?
            .map_err(|e| Failure::Lost(format!("the answer could not be read: {e}")))?
            .to_bytes();
            self.checkin(&endpoint.origin, sender);
            return Ok(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            });
        }
    }

    fn request(
        &self,
        endpoint: &Endpoint,
        authorization: &HeaderValue,
        body: Vec<u8>,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from(endpoint.path.clone());
        let headers = req.headers_mut();
        headers.insert(HOST, endpoint.host_header.clone());
        headers.insert(AUTHORIZATION, authorization.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, self.user_agent.clone());
        req
    }

    /// The most recently used open connection to `origin`, if any is young enough.
    fn checkout(&self, origin: &Origin) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut pool = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // An emptied list stays (the connection comes back to it; the sweep removes lists
        // left empty).
        let list = pool.origins.get_mut(origin)?;
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.config.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Puts a connection whose answer was read whole back into the pool, and now and then
    /// sweeps the pool of connections that closed or idled too long.
    fn checkin(&self, origin: &Origin, sender: http1::SendRequest<Full<Bytes>>) {
        let max = self.config.max_idle_per_origin;
        if sender.is_closed() || max == 0 {
            return;
        }
        let mut pool = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let idle_timeout = self.config.idle_timeout;
        if now.duration_since(pool.last_sweep) >= idle_timeout / 2 {
            pool.sweep(idle_timeout, now);
        }
        if !pool.origins.contains_key(origin) {
            if pool.origins.len() >= MAX_ORIGINS {
                pool.origins.retain(|_, list| !list.is_empty());
            }
            if pool.origins.len() >= MAX_ORIGINS {
                return;
            }
            pool.origins.insert(origin.clone(), Vec::new());
        }
        let Some(list) = pool.origins.get_mut(origin) else {
            return;
        };
        if list.len() >= max {
            // The oldest goes: the pool keeps the connections used most recently.
            list.remove(0);
        }
        list.push(Idle { sender, since: now });
    }

    /// A new connection to `origin`, its driver running as a task of its own. Each of the
    /// name's addresses is tried in turn, with its share of what is left of the connect time.
    async fn connect(
        &self,
        origin: &Origin,
        deadline: tokio::time::Instant,
    ) -> Result<http1::SendRequest<Full<Bytes>>, Failure> {
        let deadline = deadline.min(tokio::time::Instant::now() + self.config.connect_timeout);
        let within = |what: &str| {
            Failure::NotSent(format!(
                "{what} {} in time (connect timeout {:?}, request timeout {:?})",
                origin_text(origin),
                self.config.connect_timeout,
                self.config.request_timeout
            ))
        };
        let addresses: Vec<SocketAddr> = match &origin.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, origin.port)],
            Host::Name(name) => {
                tokio::time::timeout_at(deadline, lookup_host((name.as_str(), origin.port)))
                    .await
                    .map_err(|_| within("no address for"))?
                    .map_err(|e| Failure::NotSent(format!("{}: {e}", origin_text(origin))))?
                    .collect()
            }
        };
        let mut last = format!("{} has no address", origin_text(origin));
        let mut tcp = None;
        for (i, address) in addresses.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(addresses.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    tcp = Some(stream);
                    break;
                }
                Ok(Err(e)) => last = format!("connect to {address}: {e}"),
                Err(_) => last = format!("connect to {address}: no answer within {share:?}"),
            }
        }
        let tcp = tcp.ok_or(Failure::NotSent(last))?;
        let setup = || -> std::io::Result<()> {
            tcp.set_nodelay(true)?;
            socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE)
                    .with_interval(KEEPALIVE)
                    .with_retries(KEEPALIVE_RETRIES),
            )
        };
        setup().map_err(|e| Failure::NotSent(format!("{}: {e}", origin_text(origin))))?;
        let handshake = async {
            if origin.https {
                let name = match &origin.host {
                    Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
                    Host::Name(name) => rustls::pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| format!("{name} cannot be a TLS server name: {e}"))?,
                };
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", origin_text(origin)))?;
                handshake(TokioIo::new(tls)).await
            } else {
                handshake(TokioIo::new(tcp)).await
            }
        };
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(why)) => Err(Failure::NotSent(why)),
            Err(_) => Err(within("no TLS session with")),
        }
    }
}

/// The HTTP/1.1 handshake (no I/O yet) and the connection's driver task.
async fn handshake<T>(io: T) -> Result<http1::SendRequest<Full<Bytes>>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        // Ends when the connection closes; its sender then reads as closed, and the pool
        // drops it at a checkout or a sweep.
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "Graph API connection closed");
        }
    });
    Ok(sender)
}

fn origin_text(origin: &Origin) -> String {
    let scheme = if origin.https { "https" } else { "http" };
    match &origin.host {
        Host::Name(n) => format!("{scheme}://{n}:{}", origin.port),
        Host::Ip(IpAddr::V6(ip)) => format!("{scheme}://[{ip}]:{}", origin.port),
        Host::Ip(ip) => format!("{scheme}://{ip}:{}", origin.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn endpoints_keep_host_port_and_path() {
        let e = Endpoint::parse("https://graph.facebook.com/v21.0/123/messages").expect("parse");
        assert_eq!(
            e.origin,
            Origin {
                https: true,
                host: Host::Name("graph.facebook.com".into()),
                port: 443
            }
        );
        assert_eq!(e.host_header, "graph.facebook.com");
        assert_eq!(e.path.as_str(), "/v21.0/123/messages");

        let e = Endpoint::parse("http://127.0.0.1:8080/v21.0/me/messages?x=1").expect("parse");
        assert_eq!(e.origin.host, Host::Ip("127.0.0.1".parse().expect("ip")));
        assert_eq!(e.origin.port, 8080);
        assert_eq!(e.host_header, "127.0.0.1:8080");
        assert_eq!(e.path.as_str(), "/v21.0/me/messages?x=1");

        // A Graph base URL behind a path prefix keeps it.
        let e = Endpoint::parse("https://proxy.example/graph/v21.0/me/messages").expect("parse");
        assert_eq!(e.path.as_str(), "/graph/v21.0/me/messages");
        assert_eq!(e.origin.port, 443);

        let e = Endpoint::parse("http://[::1]:9/a").expect("parse");
        assert_eq!(e.origin.host, Host::Ip("::1".parse().expect("ip")));
        assert_eq!(e.host_header, "[::1]:9");

        for bad in [
            "not a url",
            "mailto:meta@example.com",
            "file:///tmp",
            "ftp://x/y",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    /// What the test server does with each request it reads.
    #[derive(Clone, Copy)]
    enum Reply {
        /// A 200 with a JSON body, keeping the connection.
        Ok,
        /// A 200 with a chunked JSON body.
        Chunked,
        /// A 200 with a body of this many bytes.
        Big(usize),
        /// Read the request, then close without a byte.
        Close,
        /// Read the request, then never answer.
        Hang,
        /// Answer, then close the connection.
        OkThenClose,
        /// Answer the first request; read the next one, then close without answering.
        OnceThenDrop,
    }

    /// A raw HTTP/1.1 server: counts connections, keeps each request's head, answers as told.
    struct Server {
        addr: SocketAddr,
        endpoint: Endpoint,
        connections: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn server(reply: Reply) -> Server {
        serve(reply, None).await
    }

    /// The test server, over TLS when `tls` is given (then its endpoint names `localhost`).
    async fn serve(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        // By name over TLS (the certificate names `localhost`): bound where the name points.
        let at = if tls.is_some() {
            "localhost:0"
        } else {
            "127.0.0.1:0"
        };
        let listener = TcpListener::bind(at).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let port = addr.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        let url = match tls {
            Some(_) => format!("https://localhost:{port}/v21.0/123/messages"),
            None => format!("http://127.0.0.1:{port}/v21.0/123/messages"),
        };
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (heads, tls) = (h.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(sock) = acceptor.accept(sock).await {
                                answer(sock, reply, heads).await;
                            }
                        }
                        None => answer(sock, reply, heads).await,
                    }
                });
            }
        });
        Server {
            addr,
            endpoint: Endpoint::parse(&url).expect("endpoint"),
            connections,
            heads,
        }
    }

    /// Reads requests off one connection and answers each as told.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut sock: S,
        reply: Reply,
        heads: Arc<Mutex<Vec<String>>>,
    ) {
        let mut buf = Vec::new();
        let mut answered = 0;
        loop {
            // One request: the head, then its Content-Length body.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head_end + len);
            heads.lock().expect("heads").push(head);
            let body = r#"{"messages":[{"id":"wamid.1"}]}"#;
            if matches!(reply, Reply::OnceThenDrop) && answered == 1 {
                return;
            }
            answered += 1;
            let answer = match reply {
                Reply::Ok | Reply::OkThenClose | Reply::OnceThenDrop => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                ),
                Reply::Chunked => format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                     {:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                    10,
                    &body[..10],
                    body.len() - 10,
                    &body[10..]
                ),
                Reply::Big(n) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n{}",
                    "x".repeat(n)
                ),
                Reply::Close => return,
                Reply::Hang => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
            };
            if sock.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            if matches!(reply, Reply::OkThenClose) {
                return;
            }
        }
    }

    fn config() -> TransportConfig {
        TransportConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_millis(500),
            max_idle_per_origin: 4,
            idle_timeout: Duration::from_secs(90),
            max_answer_bytes: 64 * 1024,
        }
    }

    fn transport() -> Transport {
        Transport::new(config()).expect("transport")
    }

    async fn post(t: &Transport, e: &Endpoint) -> Result<Answer, Failure> {
        t.post_json(e, &HeaderValue::from_static("Bearer t"), b"{}".to_vec())
            .await
    }

    /// The origins the pool holds a list for.
    fn pooled_origins(t: &Transport) -> Vec<Origin> {
        let pool = t.idle.lock().expect("idle");
        pool.origins.keys().cloned().collect()
    }

    /// The test server's answer, read whole.
    fn assert_answered(a: Result<Answer, Failure>) {
        let a = a.expect("answer");
        assert_eq!(a.status, 200);
        assert_eq!(&a.body[..], br#"{"messages":[{"id":"wamid.1"}]}"#);
    }

    #[tokio::test]
    async fn requests_reuse_one_connection_and_carry_their_headers() {
        let s = server(Reply::Ok).await;
        let t = transport();
        for _ in 0..3 {
            assert_answered(post(&t, &s.endpoint).await);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        let heads = s.heads.lock().expect("heads").clone();
        assert_eq!(heads.len(), 3);
        let head = heads[0].to_ascii_lowercase();
        assert!(
            head.starts_with("post /v21.0/123/messages http/1.1\r\n"),
            "{head}"
        );
        let port = s.endpoint.origin.port;
        for line in [
            format!("host: 127.0.0.1:{port}"),
            "authorization: bearer t".into(),
            "content-type: application/json".into(),
            "content-length: 2".into(),
            concat!("user-agent: herald/", env!("CARGO_PKG_VERSION")).into(),
        ] {
            assert!(head.contains(&format!("{line}\r\n")), "{line} in {head}");
        }
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_keep_a_bounded_pool() {
        let s = server(Reply::Ok).await;
        let t = transport();
        let all = (0..8).map(|_| post(&t, &s.endpoint));
        for a in futures_util::future::join_all(all).await {
            assert_eq!(a.expect("answer").status, 200);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 8);
        let kept = t.idle.lock().expect("idle").origins[&s.endpoint.origin].len();
        assert_eq!(kept, 4, "max_idle_per_origin");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_without_a_failure() {
        let s = server(Reply::OkThenClose).await;
        let t = transport();
        for _ in 0..3 {
            assert_eq!(post(&t, &s.endpoint).await.expect("answer").status, 200);
            // The server's close reaches the pooled connection.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 3);
        assert_eq!(
            s.heads.lock().expect("heads").len(),
            3,
            "each request sent once"
        );
    }

    #[tokio::test]
    async fn a_request_racing_the_servers_close_is_never_reported_not_sent_once_written() {
        // No pause: the next request often meets the connection as the server closes it.
        // Either hyper hands it back unwritten (and a new connection takes it), or it was
        // written and is lost; "not sent" would be wrong. The server reads one request a
        // connection, so every answered request came over a connection of its own.
        let s = server(Reply::OkThenClose).await;
        let t = transport();
        let mut ok = 0;
        for _ in 0..50 {
            match post(&t, &s.endpoint).await {
                Ok(a) => {
                    assert_eq!(a.status, 200);
                    ok += 1;
                }
                Err(Failure::Lost(_)) => {}
                Err(Failure::NotSent(why)) => panic!("not sent: {why}"),
            }
        }
        assert!(ok > 0);
        assert_eq!(s.heads.lock().expect("heads").len(), ok);
        assert!(s.connections.load(Ordering::SeqCst) >= ok);
    }

    #[tokio::test]
    async fn a_written_request_without_an_answer_is_lost_not_sent_again() {
        // The server reads the second request and drops the connection: the request was
        // written, so it must come back lost, and never go out again on a new connection.
        let s = server(Reply::OnceThenDrop).await;
        let t = transport();
        assert_eq!(post(&t, &s.endpoint).await.expect("first").status, 200);
        match post(&t, &s.endpoint).await {
            Err(Failure::Lost(_)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s.heads.lock().expect("heads").len(), 2);
        assert_eq!(
            s.connections.load(Ordering::SeqCst),
            1,
            "not resent elsewhere"
        );
    }

    #[tokio::test]
    async fn without_a_pool_every_request_connects() {
        let s = server(Reply::Ok).await;
        let t = Transport::new(TransportConfig {
            max_idle_per_origin: 0,
            ..config()
        })
        .expect("transport");
        for _ in 0..3 {
            assert_eq!(post(&t, &s.endpoint).await.expect("answer").status, 200);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 3);
        assert!(t.idle.lock().expect("idle").origins.is_empty());
    }

    #[tokio::test]
    async fn idle_connections_past_their_time_are_swept_and_not_reused() {
        let (a, b) = (server(Reply::Ok).await, server(Reply::Ok).await);
        let t = Transport::new(TransportConfig {
            idle_timeout: Duration::from_millis(100),
            ..config()
        })
        .expect("transport");
        assert_answered(post(&t, &a.endpoint).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // By now a sweep (the sweeper's, or b's check-in) has taken a's expired connection.
        assert_answered(post(&t, &b.endpoint).await);
        assert_eq!(pooled_origins(&t), std::slice::from_ref(&b.endpoint.origin));
        // And a's next request connects anew rather than reuse an expired connection.
        assert_answered(post(&t, &a.endpoint).await);
        assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_pool_is_swept_without_further_sends_and_the_sweeper_ends_with_it() {
        let s = server(Reply::Ok).await;
        let t = Transport::new(TransportConfig {
            idle_timeout: Duration::from_millis(100),
            ..config()
        })
        .expect("transport");
        assert_answered(post(&t, &s.endpoint).await);
        assert_eq!(t.idle.lock().expect("idle").origins.len(), 1);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !t.idle.lock().expect("idle").origins.is_empty() {
            assert!(Instant::now() < deadline, "not swept");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let weak = Arc::downgrade(&t.idle);
        drop(t);
        assert!(
            weak.upgrade().is_none(),
            "the sweeper holds the pool only weakly"
        );
    }

    #[tokio::test]
    async fn check_ins_sweep_a_pool_made_outside_a_runtime() {
        let (a, b) = (server(Reply::Ok).await, server(Reply::Ok).await);
        // Made on a thread without a runtime: no sweeper, only the check-ins sweep.
        let t = std::thread::spawn(|| {
            Transport::new(TransportConfig {
                idle_timeout: Duration::from_millis(100),
                ..config()
            })
        })
        .join()
        .expect("thread")
        .expect("transport");
        assert_answered(post(&t, &a.endpoint).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(t.idle.lock().expect("idle").origins.len(), 1, "no sweeper");
        assert_answered(post(&t, &b.endpoint).await);
        assert_eq!(pooled_origins(&t), std::slice::from_ref(&b.endpoint.origin));
    }

    #[tokio::test]
    async fn a_full_pool_makes_room_from_empty_lists() {
        let s = server(Reply::Ok).await;
        let t = transport();
        {
            let mut pool = t.idle.lock().expect("idle");
            for n in 0..MAX_ORIGINS {
                let origin = Origin {
                    https: false,
                    host: Host::Name(format!("origin-{n}.invalid")),
                    port: 1,
                };
                pool.origins.insert(origin, Vec::new());
            }
        }
        assert_answered(post(&t, &s.endpoint).await);
        let pool = t.idle.lock().expect("idle");
        assert_eq!(pool.origins.len(), 1, "the empty lists made room");
        assert_eq!(pool.origins[&s.endpoint.origin].len(), 1);
    }

    #[tokio::test]
    async fn chunked_answers_are_read_whole() {
        let s = server(Reply::Chunked).await;
        let t = transport();
        for _ in 0..2 {
            assert_answered(post(&t, &s.endpoint).await);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn no_server_is_not_sent() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = Endpoint::parse(&format!("http://127.0.0.1:{port}/x")).expect("endpoint");
        assert!(matches!(
            post(&transport(), &e).await,
            Err(Failure::NotSent(_))
        ));
    }

    #[tokio::test]
    async fn tls_that_fails_is_not_sent() {
        // A plain HTTP server behind an https URL: it answers the TLS hello with HTTP.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let e = Endpoint::parse(&format!("https://127.0.0.1:{port}/x")).expect("endpoint");
        match post(&transport(), &e).await {
            Err(Failure::NotSent(why)) => assert!(why.starts_with("TLS with"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_or_silent_server_after_the_request_is_lost() {
        for reply in [Reply::Close, Reply::Hang] {
            let s = server(reply).await;
            let t = transport();
            let started = Instant::now();
            assert!(matches!(post(&t, &s.endpoint).await, Err(Failure::Lost(_))));
            assert_eq!(s.heads.lock().expect("heads").len(), 1);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "within request_timeout"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_answer_is_lost_and_its_connection_not_reused() {
        let s = server(Reply::Big(100 * 1024)).await;
        let t = transport();
        assert!(matches!(post(&t, &s.endpoint).await, Err(Failure::Lost(_))));
        assert!(t
            .idle
            .lock()
            .expect("idle")
            .origins
            .get(&s.endpoint.origin)
            .is_none_or(Vec::is_empty));
    }

    /// A certificate authority and a certificate it signed for `localhost`, made by the
    /// `openssl` command (on every machine this project builds on), so that no private key
    /// lives in the repository. Returns the authority's certificate, the server's, and its key.
    fn localhost_certificate() -> (
        CertificateDer<'static>,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        /// Removes the directory however the test ends.
        struct TempDir(std::path::PathBuf);
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir =
            TempDir(std::env::temp_dir().join(format!("herald-tls-{}", uuid::Uuid::new_v4())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let file = |name: &str| dir.0.join(name).to_string_lossy().into_owned();
        let run = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("the TLS test needs the openssl command");
            assert!(status.success(), "openssl {args:?} failed");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let (ca, ca_key, csr) = (file("ca.pem"), file("ca-key.pem"), file("csr.pem"));
        let (cert, key, ext) = (file("cert.pem"), file("key.pem"), file("ext.cnf"));
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost\n",
        )
        .expect("extensions");
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=herald-test-ca"],
            &["-keyout", &ca_key, "-out", &ca],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        // Read before `dir` is dropped with the other locals.
        (
            CertificateDer::from_pem_file(&ca).expect("authority"),
            CertificateDer::from_pem_file(&cert).expect("certificate"),
            PrivateKeyDer::from_pem_file(&key).expect("key"),
        )
    }

    #[tokio::test]
    async fn tls_with_a_trusted_certificate_carries_requests_and_checks_the_name() {
        let (ca, cert, key) = localhost_certificate();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server TLS");
        server_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let s = serve(Reply::Ok, Some(acceptor)).await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("root");
        let t = Transport::with_roots(config(), roots).expect("transport");
        for _ in 0..2 {
            assert_answered(post(&t, &s.endpoint).await);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1, "kept alive");
        let head = s.heads.lock().expect("heads")[0].to_ascii_lowercase();
        assert!(head.contains(&format!("host: localhost:{}\r\n", s.endpoint.origin.port)));

        // The same server by its address: the certificate does not name it.
        let by_ip = Endpoint::parse(&format!("https://{}/x", s.addr)).expect("endpoint");
        let refused = |r: Result<Answer, Failure>| match r {
            Err(Failure::NotSent(why)) => assert!(why.contains("certificate"), "{why}"),
            other => panic!("{other:?}"),
        };
        refused(post(&t, &by_ip).await);
        // And a client that does not trust it (Mozilla's roots only).
        refused(post(&transport(), &s.endpoint).await);
        assert_eq!(
            s.heads.lock().expect("heads").len(),
            2,
            "no request sent untrusted"
        );
    }
}
