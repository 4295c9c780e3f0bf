//! Fixtures for the end-to-end tests of the `herald` binary: child processes that are killed
//! when the test ends however it ends, a private temporary directory, a private PostgreSQL
//! schema, free ports and a minimal HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use herald_engine::store::{PgStore, PgStoreConfig, SqliteStore, SqliteStoreConfig};
use herald_engine::{Job, JobFilter, JobId, JobState, Store};

/// The PostgreSQL server the tests use (the same variable as the engine's tests).
pub fn pg_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `prefix_` followed by 12 random hex digits.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0 to find a free port")
        .local_addr()
        .expect("local address of the probe listener")
        .port()
}

/// A private temporary directory, removed when dropped (kept, and named, if the test failed, so
/// that the children's logs can be read).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        let path = std::env::temp_dir().join(unique_name("herald_e2e"));
        std::fs::create_dir_all(&path).expect("create the test's temporary directory");
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `sqlite:<dir>/<name>`.
    pub fn sqlite_url(&self, name: &str) -> String {
        format!("sqlite:{}", self.path.join(name).display())
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A private PostgreSQL schema, dropped (with everything in it) when this is dropped.
pub struct PgSchema {
    pub name: String,
    url: String,
}

impl PgSchema {
    /// A fresh name; the schema itself is created by whoever migrates first.
    pub fn new() -> PgSchema {
        PgSchema {
            name: unique_name("e2e"),
            url: pg_url(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A store on this schema, migrated.
    pub async fn store(&self) -> PgStore {
        let store = PgStore::connect(&PgStoreConfig {
            keyring: Some(std::sync::Arc::new(
                herald_engine::crypto::Keyring::parse(
                    "abababababababababababababababababababababababababababababababab",
                    &[],
                )
                .expect("test key"),
            )),
            url: self.url.clone(),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(10),
            schema: Some(self.name.clone()),
        })
        .await
        .expect("connect to PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
        store
            .migrate()
            .await
            .expect("migrate PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
        store
    }

    /// A plain pool on the database (no search path), for the test's own queries.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .expect("connect to PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime (or while unwinding): use a runtime of our own on a
        // thread of our own, and never panic here.
        let url = self.url.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .execute(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                pool.close().await;
                Ok(())
            })
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop schema {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop schema {}: the cleanup thread panicked",
                self.name
            ),
        }
    }
}

/// A SQLite store on `url`, migrated.
pub async fn sqlite_store(url: &str) -> SqliteStore {
    let store = SqliteStore::connect(&SqliteStoreConfig {
        keyring: Some(std::sync::Arc::new(
            herald_engine::crypto::Keyring::parse(
                "abababababababababababababababababababababababababababababababab",
                &[],
            )
            .expect("test key"),
        )),
        url: url.to_owned(),
        acquire_timeout: Duration::from_secs(10),
        synchronous_full: true,
    })
    .await
    .expect("open the SQLite database");
    store.migrate().await.expect("migrate SQLite");
    store
}

/// `herald` with an environment free of Herald settings inherited from whoever runs the tests,
/// so that each test sets exactly what it means.
/// The master key of every test process and store.
pub const TEST_MASTER_KEY: &str =
    "abababababababababababababababababababababababababababababababab";

pub fn herald() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("HERALD_") || key == "DATABASE_URL" {
            cmd.env_remove(key.as_ref());
        }
    }
    // The key the test fixtures' stores use too (tests/common's stores).
    cmd.stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .env("HERALD_MASTER_KEY", TEST_MASTER_KEY);
    cmd
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so that a failing test never
/// leaves one behind. Its stdout and stderr go to files, quoted when something goes wrong.
pub struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd`; `name` labels it in messages and names its log files in `dir`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdout(std::fs::File::create(&stdout).expect("create the child's stdout file"));
        cmd.stderr(std::fs::File::create(&stderr).expect("create the child's stderr file"));
        let child = cmd.spawn().expect("start the herald binary");
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last lines of both outputs, for failure messages.
    pub fn logs(&self) -> String {
        fn tail(text: &str) -> String {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.stdout()),
            self.name,
            tail(&self.stderr())
        )
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .expect("ask whether the child has exited");
        }
        self.status
    }

    /// Panics, quoting the logs, if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "{} exited unexpectedly ({status})\n{}",
                self.name,
                self.logs()
            );
        }
    }

    /// Waits for the process to exit; panics, quoting the logs, after `within`.
    pub async fn wait_for_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {within:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then reap: when this returns the process is gone.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            panic!(
                "{} had already exited ({status}) before the kill\n{}",
                self.name,
                self.logs()
            );
        }
        self.child.kill().expect("send SIGKILL to the child");
        let status = self.child.wait().expect("reap the killed child");
        self.status = Some(status);
        status
    }

    /// SIGTERM through kill(1) (no libc dependency).
    /// Sends a signal by name (`TERM`, `INT`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "{}'s output: {} and {}",
                self.name,
                self.stdout.display(),
                self.stderr.display()
            );
        }
    }
}

/// One HTTP/1.1 GET over a raw socket: (status code, body), or None if the server does not answer
/// (yet).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
        .ok()?;
    let status: u16 = response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Jobs per state, summed over queues.
pub async fn count(store: &dyn Store, state: JobState) -> i64 {
    store
        .stats()
        .await
        .expect("read the store's stats")
        .iter()
        .filter(|s| s.state == state)
        .map(|s| s.count)
        .sum()
}

/// Every job matching `state` (None: all), by ascending id, paging 1,000 at a time.
pub async fn all_jobs(store: &dyn Store, state: Option<JobState>) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        let page = store
            .list_jobs(&JobFilter {
                state,
                after_id: jobs.last().map(|j| j.id),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list jobs");
        if page.is_empty() {
            return jobs;
        }
        jobs.extend(page);
    }
}

/// The ids of the running jobs.
pub async fn running_ids(store: &dyn Store) -> std::collections::BTreeSet<JobId> {
    all_jobs(store, Some(JobState::Running))
        .await
        .into_iter()
        .map(|j| j.id)
        .collect()
}

/// Runs `herald <args>` (a bench) in `dir` until it exits (at most 240 s), requires success,
/// and returns its last stdout line parsed as JSON.
pub async fn run_bench(
    dir: &TestDir,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let mut cmd = herald();
    cmd.args(args)
        .current_dir(dir.path())
        .env("HERALD_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(name, cmd, dir.path());
    let status = proc
        .wait_for_exit(std::time::Duration::from_secs(240))
        .await;
    assert!(status.success(), "{name} succeeds\n{}", proc.logs());
    let stdout = proc.stdout();
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("last line is JSON ({e}): {last:?}\n{}", proc.logs()))
}
