//! `RedisLimiter` and `FailSafeLimiter` against real Redis: the shared Redis at
//! `redis://127.0.0.1:6379` (or `HERALD_TEST_REDIS_URL`), and, for the outage tests, a
//! `redis-server` each test starts and kills itself. Every test uses its own key prefix so
//! they run in parallel. A Redis that cannot be reached fails the tests; it does not skip them.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_engine::limit::{
    FailSafeConfig, FailSafeLimiter, FallbackBoard, Fallbacks, LimitError, Limiter, LimiterMode,
    Rate, RedisLimiter, RedisLimiterConfig,
};
use herald_engine::store::StoreBoard;

mod common;

fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    format!("herald-test:{}:", uuid::Uuid::new_v4().simple())
}

fn config(prefix: &str) -> RedisLimiterConfig {
    RedisLimiterConfig {
        key_prefix: prefix.to_string(),
        ..RedisLimiterConfig::default()
    }
}

async fn limiter(prefix: &str) -> RedisLimiter {
    let url = redis_url();
    match RedisLimiter::connect(&url, config(prefix)).await {
        Ok(limiter) => limiter,
        Err(e) => panic!(
            "these tests need a real Redis at {url} (set HERALD_TEST_REDIS_URL to use another); \
             it could not be reached: {e}"
        ),
    }
}

async fn raw_connection() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let client = redis::Client::open(url.as_str())
        .unwrap_or_else(|e| panic!("bad HERALD_TEST_REDIS_URL {url}: {e}"));
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("these tests need a real Redis at {url}: {e}"))
}

/// One acquire that granted something: when it was sent, when its answer came back (test
/// clock, µs since the start), and how many permits.
#[derive(Debug, Clone, Copy)]
struct Event {
    sent: u64,
    received: u64,
    granted: u32,
}

/// Checks the admission property on grants decided by Redis's clock but timed on the test's.
///
/// Each grant was decided at some instant inside `[sent, received]`. So the grants whose whole
/// interval lies in `[a, b]` were all decided inside `[a, b]`, and there can be at most
/// `rate * (b - a) + burst` of them; the binding windows start at some `sent` and end at some
/// `received`, and all of those are checked. Because only differences of test-clock times are
/// used, the offset between Redis's clock and the test's does not matter; what remains is
/// `slack`: one permit for the window's edge (a permit due exactly at `a`), and one for the two
/// clocks running at slightly different rates (NTP slews a clock by at most 500 ppm: 0.75 ms
/// over 1.5 s, under one permit at 1000/s) and `TIME`'s microsecond resolution.
fn check_bracketed_windows(events: &[Event], per_second: f64, burst: u32, slack: f64) {
    let mut by_sent = events.to_vec();
    by_sent.sort_by_key(|e| e.sent);
    for i in 0..by_sent.len() {
        let a = by_sent[i].sent;
        let mut inside: Vec<&Event> = by_sent[i..].iter().collect();
        inside.sort_by_key(|e| e.received);
        let mut count = 0u64;
        for e in inside {
            count += u64::from(e.granted);
            let width = (e.received.saturating_sub(a)) as f64 / 1e6;
            let bound = per_second * width + f64::from(burst) + slack;
            assert!(
                count as f64 <= bound,
                "{count} permits decided within {width:.6} s > {bound:.2} \
                 ({per_second}/s, burst {burst})"
            );
        }
    }
}

/// Checks the admission property on grants timed by the same clock that decided them (the
/// local fallback): in every window `[t_i, t_j]`, at most `rate * width + burst + 1`.
fn check_local_windows(events: &[(Instant, u32)], per_second: f64, burst: u32) {
    let mut events = events.to_vec();
    events.sort_by_key(|e| e.0);
    for i in 0..events.len() {
        let mut count = 0u64;
        for j in i..events.len() {
            count += u64::from(events[j].1);
            let width = (events[j].0 - events[i].0).as_secs_f64();
            // The grant was decided a little before it was timed: the window's edge, and the
            // real clock's reading inside the limiter versus the one here, cost at most one
            // interval, i.e. one permit.
            let bound = per_second * width + f64::from(burst) + 1.0;
            assert!(
                count as f64 <= bound,
                "{count} permits in {width:.6} s > {bound:.2} ({per_second}/s, burst {burst})"
            );
        }
    }
}

/// Runs `work` in `n` "processes": each a thread with its own runtime and its own connection
/// (a limiter on `prefix`), told its index. Returns what each returned, in order.
fn in_processes<T, F, Fut>(n: usize, prefix: &str, work: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, RedisLimiter) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let handles: Vec<_> = (0..n)
        .map(|p| {
            let (prefix, work) = (prefix.to_owned(), work.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("no Tokio runtime");
                runtime.block_on(async move { work(p, limiter(&prefix).await).await })
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("a hammering process panicked"))
        .collect()
}

#[test]
fn three_processes_sharing_a_key_stay_within_the_rate() {
    let prefix = prefix();
    let rate = Rate {
        per_second: 1000.0,
        burst: 10,
    };
    let run_for = Duration::from_millis(1500);
    let t0 = Instant::now();
    let processes = in_processes(3, &prefix, move |_, limiter| async move {
        let mut events = Vec::new();
        while t0.elapsed() < run_for {
            let sent = t0.elapsed().as_micros() as u64;
            let grant = limiter
                .acquire("channel", rate, 5)
                .await
                .unwrap_or_else(|e| panic!("acquire failed: {e}"));
            let received = t0.elapsed().as_micros() as u64;
            if grant.granted > 0 {
                events.push(Event {
                    sent,
                    received,
                    granted: grant.granted,
                });
            } else {
                tokio::time::sleep(grant.next_in).await;
            }
        }
        events
    });
    let events: Vec<Event> = processes.into_iter().flatten().collect();
    let total: u64 = events.iter().map(|e| u64::from(e.granted)).sum();
    let first = events.iter().map(|e| e.sent).min().unwrap_or(0);
    let last = events.iter().map(|e| e.received).max().unwrap_or(0);
    let duration = (last - first) as f64 / 1e6;
    println!(
        "3 processes, 1000/s burst 10: {total} permits in {duration:.3} s over {} grants",
        events.len()
    );
    check_bracketed_windows(&events, rate.per_second, rate.burst, 2.0);
    assert!(
        total as f64 >= 0.97 * rate.per_second * duration,
        "only {total} permits in {duration:.3} s: the limiter wastes the rate"
    );
}

/// Three processes take permits of three keys with different rates in one call each (one of
/// them alternates with single-key calls): every key stays within its own rate.
#[test]
fn three_processes_taking_many_keys_at_once_stay_within_each_rate() {
    let prefix = prefix();
    let rates = [
        (
            "a",
            Rate {
                per_second: 600.0,
                burst: 6,
            },
        ),
        (
            "b",
            Rate {
                per_second: 200.0,
                burst: 2,
            },
        ),
        (
            "c",
            Rate {
                per_second: 50.0,
                burst: 2,
            },
        ),
    ];
    let run_for = Duration::from_millis(1500);
    let t0 = Instant::now();
    let processes = in_processes(3, &prefix, move |p, limiter| async move {
        let mut events: Vec<Vec<Event>> = vec![Vec::new(); rates.len()];
        let mut round = 0u32;
        while t0.elapsed() < run_for {
            round += 1;
            let sent = t0.elapsed().as_micros() as u64;
            let grants = if p == 0 && round % 2 == 0 {
                vec![limiter
                    .acquire(rates[1].0, rates[1].1, 4)
                    .await
                    .unwrap_or_else(|e| panic!("acquire failed: {e}"))]
            } else {
                let asks: Vec<(&str, Rate, u32)> = rates.iter().map(|(k, r)| (*k, *r, 4)).collect();
                limiter
                    .acquire_many(&asks)
                    .await
                    .unwrap_or_else(|e| panic!("acquire_many failed: {e}"))
            };
            let received = t0.elapsed().as_micros() as u64;
            let keys: &[usize] = if grants.len() == 1 { &[1] } else { &[0, 1, 2] };
            for (k, grant) in keys.iter().zip(&grants) {
                if grant.granted > 0 {
                    events[*k].push(Event {
                        sent,
                        received,
                        granted: grant.granted,
                    });
                }
            }
            if grants.iter().all(|g| g.granted == 0) {
                let wait = grants.iter().map(|g| g.next_in).min();
                tokio::time::sleep(wait.unwrap_or_default()).await;
            }
        }
        events
    });
    let mut events: Vec<Vec<Event>> = vec![Vec::new(); rates.len()];
    for got in processes {
        for (all, mine) in events.iter_mut().zip(got) {
            all.extend(mine);
        }
    }
    for ((key, rate), events) in rates.iter().zip(&events) {
        let total: u64 = events.iter().map(|e| u64::from(e.granted)).sum();
        println!("key {key} at {}/s: {total} permits", rate.per_second);
        check_bracketed_windows(events, rate.per_second, rate.burst, 2.0);
        assert!(
            total as f64 >= 0.9 * rate.per_second * run_for.as_secs_f64(),
            "key {key}: only {total} permits in {run_for:?}"
        );
    }
}

#[tokio::test]
async fn acquire_many_grants_each_key_what_acquire_would() {
    let limiter = limiter(&prefix()).await;
    let ten = Rate {
        per_second: 10.0,
        burst: 3,
    };
    let slow = Rate {
        per_second: 1.0,
        burst: 1,
    };
    let unusable = Rate {
        per_second: 0.0,
        burst: 5,
    };
    assert!(limiter.acquire_many(&[]).await.unwrap().is_empty());
    let grants = limiter
        .acquire_many(&[
            ("x", ten, 5),
            ("bad", unusable, 5),
            ("y", slow, 2),
            ("x", ten, 1),
        ])
        .await
        .unwrap();
    let granted: Vec<u32> = grants.iter().map(|g| g.granted).collect();
    // x has a burst of 3; the second ask for x comes after the first within the same call.
    assert_eq!(granted, vec![3, 0, 1, 0]);
    assert!(grants[0].next_in > Duration::from_millis(50), "{grants:?}");
    assert!(
        grants[0].next_in <= Duration::from_millis(100),
        "{grants:?}"
    );
    assert!(grants[2].next_in > Duration::from_millis(900), "{grants:?}");
    // The keys' state is the one single-key calls see.
    assert_eq!(limiter.acquire("x", ten, 5).await.unwrap().granted, 0);
    assert_eq!(limiter.acquire("y", slow, 1).await.unwrap().granted, 0);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let again = limiter.acquire_many(&[("x", ten, 5)]).await.unwrap();
    assert_eq!(again[0].granted, 1, "{again:?}");
    // A call with only unusable rates does not ask Redis and grants nothing.
    let none = limiter.acquire_many(&[("bad", unusable, 5)]).await.unwrap();
    assert_eq!(none[0].granted, 0);
}

#[tokio::test]
async fn refund_gives_permits_back() {
    let limiter = limiter(&prefix()).await;
    // One permit a second: nothing accrues while the test runs.
    let rate = Rate {
        per_second: 1.0,
        burst: 10,
    };
    assert_eq!(limiter.acquire("k", rate, 10).await.unwrap().granted, 10);
    let refused = limiter.acquire("k", rate, 1).await.unwrap();
    assert_eq!(refused.granted, 0);
    assert!(refused.next_in > Duration::from_millis(900), "{refused:?}");
    limiter.refund("k", rate, 4).await.unwrap();
    assert_eq!(limiter.acquire("k", rate, 10).await.unwrap().granted, 4);
    // Never beyond a full bucket.
    limiter.refund("k", rate, 100).await.unwrap();
    assert_eq!(limiter.acquire("k", rate, 100).await.unwrap().granted, 10);
    // Nothing to hand back to.
    limiter.refund("never-used", rate, 5).await.unwrap();
    assert_eq!(
        limiter
            .acquire("never-used", rate, 100)
            .await
            .unwrap()
            .granted,
        10
    );
}

#[tokio::test]
async fn keys_expire_when_idle() {
    let limiter = limiter(&prefix()).await;
    let mut conn = raw_connection().await;
    let key = limiter.redis_key("k");

    let slow = Rate {
        per_second: 1.0,
        burst: 10,
    };
    assert_eq!(limiter.acquire("k", slow, 10).await.unwrap().granted, 10);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((9_000..=10_001).contains(&ttl), "PTTL {ttl} ms");
    let stored: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stored.ends_with(":1000000"), "stored {stored:?}");

    let fast = Rate {
        per_second: 1000.0,
        burst: 10,
    };
    let key = limiter.redis_key("fast");
    assert_eq!(limiter.acquire("fast", fast, 10).await.unwrap().granted, 10);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 11, "PTTL {ttl} ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "an idle key should be gone");
    // And gone means full.
    assert_eq!(limiter.acquire("fast", fast, 20).await.unwrap().granted, 10);
}

#[tokio::test]
async fn a_rate_cut_does_not_hand_out_a_fresh_burst() {
    let limiter = limiter(&prefix()).await;
    let before = Rate {
        per_second: 10.0,
        burst: 10,
    };
    let after = Rate {
        per_second: 5.0,
        burst: 10,
    };
    assert_eq!(limiter.acquire("k", before, 10).await.unwrap().granted, 10);
    // The 10 permits just taken now cost 200 ms each: nothing is free for about 200 ms.
    let grant = limiter.acquire("k", after, 10).await.unwrap();
    assert_eq!(grant.granted, 0);
    assert!(
        grant.next_in > Duration::from_millis(150) && grant.next_in <= Duration::from_millis(200),
        "{grant:?}"
    );
}

#[tokio::test]
async fn unusable_rates_grant_nothing() {
    let limiter = limiter(&prefix()).await;
    for per_second in [0.0, -3.0, f64::NAN] {
        let grant = limiter
            .acquire(
                "k",
                Rate {
                    per_second,
                    burst: 5,
                },
                5,
            )
            .await
            .unwrap();
        assert_eq!(grant.granted, 0);
    }
}

#[tokio::test]
async fn processes_register_and_expire() {
    let limiter = limiter(&prefix()).await;
    let ttl = Duration::from_millis(300);
    assert_eq!(limiter.register_process("a", ttl).await.unwrap(), 1);
    assert_eq!(limiter.register_process("b", ttl).await.unwrap(), 2);
    assert_eq!(limiter.register_process("a", ttl).await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(limiter.register_process("c", ttl).await.unwrap(), 1);
    limiter.deregister_process("c").await.unwrap();
    assert_eq!(limiter.register_process("d", ttl).await.unwrap(), 1);
}

#[tokio::test]
async fn failsafe_uses_redis_when_it_answers() {
    let prefix = prefix();
    let url = redis_url();
    let config = FailSafeConfig {
        key_prefix: prefix.clone(),
        ..FailSafeConfig::default()
    };
    let a = FailSafeLimiter::connect(&url, "a".into(), config.clone(), None)
        .await
        .unwrap();
    let b = FailSafeLimiter::connect(&url, "b".into(), config, None)
        .await
        .unwrap();
    for limiter in [&a, &b] {
        let status = limiter.status();
        assert_eq!(
            status.mode,
            LimiterMode::Redis,
            "Redis at {url} should be reachable: {status:?}"
        );
        assert_eq!((status.fallbacks, status.redis_errors), (0, 0));
    }
    assert_eq!(b.live_processes(), 2);
    let rate = Rate {
        per_second: 1.0,
        burst: 6,
    };
    // One bucket for both processes.
    assert_eq!(a.acquire("k", rate, 4).await.granted, 4);
    assert_eq!(b.acquire("k", rate, 4).await.granted, 2);
    b.refund("k", rate, 2).await;
    assert_eq!(a.acquire("k", rate, 4).await.granted, 2);
    // Leaving (at shutdown) deregisters and stops the heartbeats, which would register it
    // again: b counts one process at its next heartbeat, while a is still there.
    a.leave().await;
    wait_for("b sees a gone", Duration::from_secs(3), || {
        b.live_processes() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(b.live_processes(), 1, "a registered again after leaving");
    assert_eq!(
        a.acquire("k", rate, 1).await.granted,
        0,
        "a left: it grants nothing"
    );
    drop(a);
}

/// A `redis-server` of the test's own, killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(port: u16) -> Server {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs redis-server on the PATH: {e}"));
        let server = Server { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("no free port");
    listener.local_addr().expect("no local address").port()
}

/// Asks `limiter` for permits of `key` as fast as it grants them until `until`.
async fn hammer(
    limiter: Arc<FailSafeLimiter>,
    key: &'static str,
    rate: Rate,
    until: Instant,
) -> Vec<(Instant, u32)> {
    let mut events = Vec::new();
    while Instant::now() < until {
        let grant = limiter.acquire(key, rate, 5).await;
        if grant.granted > 0 {
            events.push((Instant::now(), grant.granted));
        } else {
            tokio::time::sleep(grant.next_in.max(Duration::from_millis(1))).await;
        }
    }
    events
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// Waits until each of two processes counts both as live.
async fn both_live(a: &FailSafeLimiter, b: &FailSafeLimiter) {
    wait_for(
        "both processes see two live",
        Duration::from_secs(2),
        || a.live_processes() == 2 && b.live_processes() == 2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_falls_back_when_redis_dies_and_returns_when_it_is_back() {
    let port = free_port();
    let server = Server::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let probe_interval = Duration::from_millis(300);
    let config = FailSafeConfig {
        key_prefix: prefix(),
        probe_interval,
        heartbeat_interval: Duration::from_millis(200),
        process_ttl: Duration::from_secs(2),
        ..FailSafeConfig::default()
    };
    let a = Arc::new(
        FailSafeLimiter::connect(&url, "a".into(), config.clone(), None)
            .await
            .unwrap(),
    );
    let b = Arc::new(
        FailSafeLimiter::connect(&url, "b".into(), config, None)
            .await
            .unwrap(),
    );
    // `a` registered before `b` existed; its next heartbeat sees both.
    both_live(&a, &b).await;
    let rate = Rate {
        per_second: 200.0,
        burst: 20,
    };
    assert_eq!(a.status().mode, LimiterMode::Redis);
    assert_eq!(a.acquire("channel", rate, 5).await.granted, 5);

    drop(server);
    let run_for = Duration::from_millis(1000);
    let until = Instant::now() + run_for;
    let (events_a, events_b) = tokio::join!(
        hammer(Arc::clone(&a), "channel", rate, until),
        hammer(Arc::clone(&b), "channel", rate, until),
    );
    for (name, limiter) in [("a", &a), ("b", &b)] {
        let status = limiter.status();
        assert_eq!(status.mode, LimiterMode::Fallback, "{name}: {status:?}");
        assert_eq!(
            status.fallbacks, 1,
            "{name} fell back more than once: {status:?}"
        );
        assert!(status.redis_errors >= 1, "{name}: {status:?}");
    }
    // Each process allows itself 200 * 0.5 / 2 = 50/s with a burst of 20 * 0.25 = 5.
    let share = a.fallback_rate(rate);
    assert_eq!((share.per_second, share.burst), (50.0, 5));
    let mut events = events_a;
    events.extend(events_b);
    let total: u32 = events.iter().map(|e| e.1).sum();
    println!("fallback: {total} permits in {run_for:?} by two processes at 200/s * 0.5");
    // Together at most half the rate, plus the burst.
    check_local_windows(&events, 0.5 * rate.per_second, rate.burst);
    // And not much less: the share is used.
    assert!(
        f64::from(total) >= 0.7 * 0.5 * rate.per_second * run_for.as_secs_f64(),
        "only {total} permits in fallback"
    );

    let server = Server::start(port);
    let back = Instant::now();
    let waited = wait_for(
        "both back in Redis mode",
        probe_interval + Duration::from_secs(2),
        || a.status().mode == LimiterMode::Redis && b.status().mode == LimiterMode::Redis,
    )
    .await;
    println!("back to Redis {:?} after the restart", back.elapsed());
    assert!(
        waited <= probe_interval + Duration::from_millis(700),
        "took {waited:?} to return to Redis (probe interval {probe_interval:?})"
    );
    assert_eq!(a.status().fallbacks, 1);
    let grant = a.acquire("channel", rate, 5).await;
    assert_eq!(grant.granted, 5, "Redis restarted empty: a full bucket");
    assert_eq!(a.status().mode, LimiterMode::Redis);
    drop(server);
}

/// A TCP proxy to a port, so that a test can cut one process off Redis while the others still
/// reach it (a partition). Cutting closes every proxied connection and stops listening.
struct Proxy {
    accept: tokio::task::JoinHandle<()>,
    pipes: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(port: u16, target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy");
        let pipes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = Arc::clone(&pipes);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().expect("pipes").push(pipe);
            }
        });
        Proxy { accept, pipes }
    }

    fn cut(self) {
        self.accept.abort();
        for pipe in self.pipes.lock().expect("pipes").drain(..) {
            pipe.abort();
        }
    }
}

/// A partition: one of two processes loses Redis, the other keeps it. The one in fallback
/// announces its share on the board (a real SQLite store) and grants nothing before the other
/// leaves that share free; together they never exceed the rate, which they would (by the
/// fallback's 50/s) without the board. When the partition heals, the share is withdrawn and
/// the rate is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_partition_never_exceeds_the_rate() {
    let redis_port = free_port();
    let _server = Server::start(redis_port);
    let proxy_port = free_port();
    let proxy = Proxy::start(proxy_port, redis_port).await;
    let (store, _dropped) = common::sqlite().await;
    let board: Arc<dyn FallbackBoard> = Arc::new(StoreBoard(store));
    let config = FailSafeConfig {
        key_prefix: prefix(),
        probe_interval: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(200),
        process_ttl: Duration::from_secs(3),
        call_timeout: Duration::from_millis(200),
        board_timeout: Duration::from_millis(300),
        ..FailSafeConfig::default()
    };
    let hold = config.hold();
    let a = Arc::new(
        FailSafeLimiter::connect(
            &format!("redis://127.0.0.1:{redis_port}"),
            "a".into(),
            config.clone(),
            Some(Arc::clone(&board)),
        )
        .await
        .unwrap(),
    );
    let b = Arc::new(
        FailSafeLimiter::connect(
            &format!("redis://127.0.0.1:{proxy_port}"),
            "b".into(),
            config,
            Some(board),
        )
        .await
        .unwrap(),
    );
    both_live(&a, &b).await;
    assert_eq!(b.status().mode, LimiterMode::Redis);
    assert_eq!(a.status().reserved_for_fallbacks, 0.0);
    let rate = Rate {
        per_second: 200.0,
        burst: 20,
    };

    proxy.cut();
    let cut = Instant::now();
    let run_for = hold + Duration::from_millis(2000);
    let until = cut + run_for;
    // When a first leaves b's share free.
    let watch = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            while Instant::now() < until {
                if a.status().reserved_for_fallbacks >= 0.25 {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            None
        })
    };
    let (events_a, events_b) = tokio::join!(
        hammer(Arc::clone(&a), "channel", rate, until),
        hammer_noting_mode(Arc::clone(&b), "channel", rate, until),
    );
    let reserved_at = watch
        .await
        .expect("watch")
        .expect("a never left b's share free");
    assert_eq!(a.status().mode, LimiterMode::Redis, "{:?}", a.status());
    assert_eq!(b.status().mode, LimiterMode::Fallback, "{:?}", b.status());
    // b takes 200 * 0.5 / 2 = 50/s; a leaves it free.
    assert_eq!(b.fallback_rate(rate).per_second, 50.0);
    let local_b: Vec<(Instant, u32)> = events_b
        .iter()
        .filter(|e| e.2 == LimiterMode::Fallback)
        .map(|e| (e.0, e.1))
        .collect();
    let first_local = local_b.first().expect("b granted nothing in fallback").0;
    assert!(
        first_local >= reserved_at,
        "b granted locally {:?} before a left its share free",
        reserved_at - first_local
    );
    let total_b: u32 = local_b.iter().map(|e| e.1).sum();
    assert!(
        f64::from(total_b) >= 0.5 * 50.0 * (run_for - hold).as_secs_f64(),
        "b used too little of its share: {total_b}"
    );
    let mut events = events_a;
    events.extend(events_b.iter().map(|e| (e.0, e.1)));
    let total: u32 = events.iter().map(|e| e.1).sum();
    println!(
        "partition: {total} permits in {run_for:?} at 200/s ({total_b} by the fallback, \
         share left free {:?} after the cut, first local grant {:?} after it)",
        reserved_at - cut,
        first_local - cut
    );
    // Both buckets may be full at the cut: a's in Redis and b's local one; one more permit
    // for a Redis grant timed after it was decided.
    check_local_windows(&events, rate.per_second, rate.burst + 5 + 1);
    wait_for("a leaves b's share free", Duration::from_secs(2), || {
        a.status().reserved_for_fallbacks == 0.25
    })
    .await;
    let metrics = herald_engine::metrics::EngineMetrics::default();
    metrics.set_limiter(Arc::clone(&a) as Arc<dyn Limiter>);
    let mut out = String::new();
    metrics.render(&mut out);
    assert!(out.contains("herald_limiter_reserved_share 0.25"), "{out}");

    let _proxy = Proxy::start(proxy_port, redis_port).await;
    wait_for("b back on Redis", Duration::from_secs(3), || {
        b.status().mode == LimiterMode::Redis
    })
    .await;
    wait_for("the share withdrawn", Duration::from_secs(2), || {
        a.status().reserved_for_fallbacks == 0.0
    })
    .await;
}

/// Like [`hammer`], noting the limiter's mode after each grant (a grant made in fallback is
/// followed by fallback mode: the limiter returns to Redis only from its background task).
async fn hammer_noting_mode(
    limiter: Arc<FailSafeLimiter>,
    key: &'static str,
    rate: Rate,
    until: Instant,
) -> Vec<(Instant, u32, LimiterMode)> {
    let mut events = Vec::new();
    while Instant::now() < until {
        let grant = limiter.acquire(key, rate, 5).await;
        if grant.granted > 0 {
            events.push((Instant::now(), grant.granted, limiter.status().mode));
        } else {
            tokio::time::sleep(grant.next_in.max(Duration::from_millis(1))).await;
        }
    }
    events
}

/// A board in memory that a test can make fail: the limiter's own logic against the board's
/// contract (the store's implementation is in the conformance suite).
#[derive(Default)]
struct TestBoard {
    /// process -> (period, share, stored at, expires at)
    rows: std::sync::Mutex<std::collections::HashMap<String, (u64, f64, Instant, Instant)>>,
    /// When each announcement was stored, in order.
    stored: std::sync::Mutex<Vec<Instant>>,
    failing: std::sync::atomic::AtomicBool,
}

impl TestBoard {
    fn fail(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), LimitError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LimitError::Board("down (test)".into()));
        }
        Ok(())
    }

    fn row(&self, process: &str) -> Option<(u64, f64, Instant, Instant)> {
        self.rows.lock().expect("rows").get(process).copied()
    }

    /// When the first announcement stored at or after `since` was stored.
    fn first_stored(&self, since: Instant) -> Option<Instant> {
        let stored = self.stored.lock().expect("stored");
        stored.iter().copied().find(|t| *t >= since)
    }
}

#[async_trait::async_trait]
impl FallbackBoard for TestBoard {
    async fn announce(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: Duration,
    ) -> Result<(), LimitError> {
        self.check()?;
        let now = Instant::now();
        let mut rows = self.rows.lock().expect("rows");
        if rows.get(process_id).is_some_and(|r| r.0 > period) {
            return Ok(());
        }
        rows.insert(process_id.to_owned(), (period, share, now, now + ttl));
        drop(rows);
        self.stored.lock().expect("stored").push(now);
        Ok(())
    }

    async fn withdraw(&self, process_id: &str, period: u64) -> Result<(), LimitError> {
        self.check()?;
        let mut rows = self.rows.lock().expect("rows");
        if rows.get(process_id).is_some_and(|r| r.0 == period) {
            rows.remove(process_id);
        }
        Ok(())
    }

    async fn others(&self, process_id: &str) -> Result<Fallbacks, LimitError> {
        self.check()?;
        let now = Instant::now();
        let rows = self.rows.lock().expect("rows");
        let live = rows
            .iter()
            .filter(|(p, r)| p.as_str() != process_id && r.3 > now);
        Ok(live.fold(Fallbacks::default(), |f, (_, r)| Fallbacks {
            share: f.share + r.1,
            processes: f.processes + 1,
        }))
    }
}

fn quick_config() -> FailSafeConfig {
    FailSafeConfig {
        key_prefix: prefix(),
        probe_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(100),
        call_timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(200),
        board_timeout: Duration::from_millis(100),
        process_ttl: Duration::from_millis(1500),
        ..FailSafeConfig::default()
    }
}

/// In fallback a process grants nothing until the hold has passed since its announcement was
/// stored; it stops granting before its announcement expires when it cannot renew it; and
/// after a renewal that came too late it holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_grants_only_under_a_fresh_announcement() {
    let config = quick_config();
    let hold = config.hold();
    let board = Arc::new(TestBoard::default());
    let limiter = FailSafeLimiter::connect(
        &format!("redis://127.0.0.1:{}", free_port()), // nothing listens there
        "p".into(),
        config,
        Some(Arc::clone(&board) as Arc<dyn FallbackBoard>),
    )
    .await
    .expect("a Redis that is down is not an error");
    assert_eq!(limiter.status().mode, LimiterMode::Fallback);
    let rate = Rate {
        per_second: 1000.0,
        burst: 10,
    };
    async fn grants(limiter: &FailSafeLimiter, rate: Rate) -> u32 {
        limiter.acquire("k", rate, 1).await.granted
    }
    let connected = Instant::now();
    assert_eq!(
        grants(&limiter, rate).await,
        0,
        "nothing before the announcement"
    );
    // Grants start only once the hold has passed since the announcement was stored.
    let started = Instant::now();
    loop {
        if grants(&limiter, rate).await > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "never granted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let first = Instant::now();
    let (_, share, _, _) = board.row("p").expect("announced");
    let stored = board
        .first_stored(connected - Duration::from_secs(1))
        .expect("announced");
    assert_eq!(share, 0.5, "one process: half the rate");
    assert!(
        first >= stored + hold,
        "granted {:?} after the announcement",
        first - stored
    );

    // The board goes away: the last announcement expires, and the process stops before it.
    board.fail(true);
    let (_, _, _, expires) = board.row("p").expect("announced");
    let mut last_grant = Instant::now();
    while Instant::now() < expires + Duration::from_millis(300) {
        // Timed before the ask: the limiter decides a moment later.
        let asked = Instant::now();
        if grants(&limiter, rate).await > 0 {
            last_grant = asked;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        last_grant < expires,
        "granted {:?} after the announcement expired",
        last_grant - expires
    );
    // The board is back: the renewal came after the expiry, so the process holds again.
    let back = Instant::now();
    board.fail(false);
    loop {
        if grants(&limiter, rate).await > 0 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "never granted again"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let again = Instant::now();
    let stored = board.first_stored(back).expect("announced again");
    assert!(
        again >= stored + hold,
        "granted {:?} after the late renewal",
        again - stored
    );
}

/// A process on Redis leaves announced shares free, counts the processes in fallback as live,
/// and, when it cannot read the board, trusts its last reading only for a while: then it
/// leaves `fallback_fraction` more free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_on_redis_distrusts_an_old_reading_of_the_board() {
    let config = quick_config();
    let trust = config.trust();
    let board = Arc::new(TestBoard::default());
    let limiter = FailSafeLimiter::connect(
        &redis_url(),
        "q".into(),
        config,
        Some(Arc::clone(&board) as Arc<dyn FallbackBoard>),
    )
    .await
    .unwrap();
    assert_eq!(limiter.status().mode, LimiterMode::Redis);
    assert_eq!(limiter.status().reserved_for_fallbacks, 0.0);
    assert_eq!(limiter.live_processes(), 1);
    board
        .announce("other", 1, 0.25, Duration::from_secs(60))
        .await
        .unwrap();
    wait_for("the share left free", Duration::from_secs(2), || {
        limiter.status().reserved_for_fallbacks == 0.25
    })
    .await;
    assert_eq!(
        limiter.live_processes(),
        2,
        "the process in fallback counts"
    );
    let rate = Rate {
        per_second: 100.0,
        burst: 8,
    };
    // 8 * (1 - 0.25) = 6 at once from Redis.
    assert_eq!(limiter.acquire("k", rate, 8).await.granted, 6);

    board.fail(true);
    let waited = wait_for(
        "half the rate more left free",
        Duration::from_secs(3),
        || limiter.status().reserved_for_fallbacks == 0.75,
    )
    .await;
    // The last good reading started before the failure, at most a heartbeat round (300 ms)
    // before it: it is distrusted once it is older than `trust`, not before.
    assert!(
        waited + Duration::from_millis(300) >= trust
            && waited <= trust + Duration::from_millis(200),
        "distrusted after {waited:?} (trust {trust:?})"
    );
    board.fail(false);
    wait_for("the reading trusted again", Duration::from_secs(2), || {
        limiter.status().reserved_for_fallbacks == 0.25
    })
    .await;
    board.withdraw("other", 1).await.unwrap();
    wait_for("the rate whole again", Duration::from_secs(2), || {
        limiter.status().reserved_for_fallbacks == 0.0
    })
    .await;
    assert_eq!(limiter.live_processes(), 1);
    limiter.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_starts_in_fallback_when_redis_is_down() {
    let port = free_port(); // nothing listens there
    let url = format!("redis://127.0.0.1:{port}");
    let started = Instant::now();
    let limiter = Arc::new(
        FailSafeLimiter::connect(&url, "lonely".into(), FailSafeConfig::default(), None)
            .await
            .expect("a Redis that is down is not an error"),
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let status = limiter.status();
    assert_eq!(status.mode, LimiterMode::Fallback);
    assert_eq!(status.fallbacks, 1);
    assert_eq!(limiter.live_processes(), 1);

    let rate = Rate {
        per_second: 100.0,
        burst: 10,
    };
    let share = limiter.fallback_rate(rate);
    assert_eq!((share.per_second, share.burst), (50.0, 5));
    // Fallback keys start empty: nothing in a burst.
    assert_eq!(limiter.acquire("c", rate, 5).await.granted, 0);
    let run_for = Duration::from_millis(600);
    let events = hammer(Arc::clone(&limiter), "c", rate, Instant::now() + run_for).await;
    let total: u32 = events.iter().map(|e| e.1).sum();
    check_local_windows(&events, share.per_second, share.burst);
    assert!(
        f64::from(total) <= share.per_second * run_for.as_secs_f64() + 1.0,
        "{total} permits in {run_for:?}: above the share"
    );
    assert_eq!(limiter.status().mode, LimiterMode::Fallback);
}

/// Several keys in one call go through Redis while it answers (the state is the one other
/// processes see), and all fall back together when it is gone: each key then within its
/// fallback share, starting empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_takes_many_keys_through_redis_and_falls_back_for_all() {
    let port = free_port();
    let server = Server::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let config = quick_config();
    let prefix = config.key_prefix.clone();
    let limiter = FailSafeLimiter::connect(&url, "many".into(), config, None)
        .await
        .unwrap();
    let other = RedisLimiter::connect(&url, self::config(&prefix))
        .await
        .unwrap();
    let rate = Rate {
        per_second: 100.0,
        burst: 4,
    };
    let grants = limiter
        .acquire_many(&[("p", rate, 10), ("q", rate, 2)])
        .await;
    assert_eq!(
        grants.iter().map(|g| g.granted).collect::<Vec<_>>(),
        vec![4, 2]
    );
    assert_eq!(limiter.status().mode, LimiterMode::Redis);
    // Another process sees what was taken.
    assert_eq!(other.acquire("p", rate, 10).await.unwrap().granted, 0);
    assert_eq!(other.acquire("q", rate, 10).await.unwrap().granted, 2);

    drop(server);
    let grants = limiter
        .acquire_many(&[("p", rate, 10), ("q", rate, 10)])
        .await;
    assert_eq!(limiter.status().mode, LimiterMode::Fallback);
    // Fallback keys start empty.
    assert!(grants.iter().all(|g| g.granted == 0), "{grants:?}");
    let share = limiter.fallback_rate(rate);
    let run_for = Duration::from_millis(500);
    let until = Instant::now() + run_for;
    let mut totals = [0u32; 2];
    while Instant::now() < until {
        let grants = limiter
            .acquire_many(&[("p", rate, 10), ("q", rate, 10)])
            .await;
        for (t, g) in totals.iter_mut().zip(&grants) {
            *t += g.granted;
        }
        let wait = grants.iter().map(|g| g.next_in).min().unwrap_or_default();
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
    for total in totals {
        assert!(
            f64::from(total) <= share.per_second * run_for.as_secs_f64() + 1.0,
            "{total} permits in {run_for:?}: above the fallback share {share:?}"
        );
    }
}

#[tokio::test]
async fn failsafe_rejects_a_malformed_url_and_bad_settings() {
    let err = FailSafeLimiter::connect("not a url", "x".into(), FailSafeConfig::default(), None)
        .await
        .expect_err("a malformed URL is an error");
    assert!(matches!(err, LimitError::InvalidUrl(_)), "{err:?}");
    let config = FailSafeConfig {
        fallback_fraction: 1.5,
        ..FailSafeConfig::default()
    };
    let err = FailSafeLimiter::connect(&redis_url(), "x".into(), config, None)
        .await
        .expect_err("a fraction above 1 fails open");
    assert!(matches!(err, LimitError::InvalidConfig(_)), "{err:?}");
    // An announcement that expires before its renewal would stop sends at every round.
    let config = FailSafeConfig {
        process_ttl: Duration::from_millis(2500),
        ..FailSafeConfig::default()
    };
    config.validate().expect("without a board, fine");
    let err = config
        .validate_with_board()
        .expect_err("ttl within a fallback round");
    assert!(err.to_string().contains("process_ttl must exceed"), "{err}");
    let config = FailSafeConfig {
        board_timeout: Duration::ZERO,
        ..FailSafeConfig::default()
    };
    assert!(config.validate().is_err(), "a zero board timeout");
    assert!(FailSafeConfig::default().validate().is_ok());
    assert!(FailSafeConfig::default().validate_with_board().is_ok());
    assert_eq!(
        FailSafeConfig::default().hold(),
        Duration::from_millis(2500)
    );
}

/// Prints the cost of one acquire round trip to the shared Redis (run with `--nocapture`).
#[tokio::test]
async fn timing_redis_acquire() {
    let limiter = limiter(&prefix()).await;
    let rate = Rate {
        per_second: 1e6,
        burst: 1000,
    };
    for _ in 0..100 {
        limiter.acquire("warm", rate, 4).await.unwrap();
    }
    let mut samples = Vec::new();
    for i in 0..2000 {
        let start = Instant::now();
        limiter
            .acquire(&format!("k{}", i % 50), rate, 4)
            .await
            .unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "RedisLimiter::acquire round trip to {}: mean {mean:?}, p50 {:?}, p99 {:?}",
        redis_url(),
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100]
    );
}
