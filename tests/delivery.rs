//! The whole sending path with real processes: `herald bench delivery` starts the Meta sandbox
//! and `herald serve` processes sharing one channel, and reports what the sandbox saw. These
//! tests assert correctness only (no 130429, nothing lost, nothing doubled), never speed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, pg_url, run_bench, TestDir};
use serde_json::Value;

/// The benches here run one at a time (each test holds this for its whole run). Each starts the sandbox and one or two engine processes
/// that send at a measured rate; three at once on a two-core machine starve each other of CPU,
/// and a starved process sends the requests of several permit grants in one burst.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `herald bench delivery` and returns its last line, parsed.
async fn bench(dir: &TestDir, name: &str, args: &[&str], redis_url: Option<&str>) -> Value {
    bench_with(dir, name, args, redis_url, &[]).await
}

/// [`bench`] with more environment for the engine processes.
async fn bench_with(
    dir: &TestDir,
    name: &str,
    args: &[&str],
    redis_url: Option<&str>,
    more: &[(&'static str, &'static str)],
) -> Value {
    let mut full = vec!["bench", "delivery"];
    full.extend_from_slice(args);
    let mut env = vec![("HERALD_LOG", "warn,herald_engine::limit=info")];
    if let Some(url) = redis_url {
        env.push(("HERALD_REDIS_URL", url));
    }
    env.extend_from_slice(more);
    run_bench(dir, name, &full, &env).await
}

fn assert_clean(result: &Value, what: &str) {
    assert_eq!(result["limit_errors"], 0, "{what}: no 130429: {result}");
    assert_eq!(
        result["duplicates"], 0,
        "{what}: nothing sent twice: {result}"
    );
    assert_eq!(result["lost"], 0, "{what}: nothing lost: {result}");
}

#[tokio::test]
async fn two_processes_share_a_channel_through_redis_with_lost_answers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    // The engine processes run on one thread each (`threads = 1`), the others in this file on
    // one per core.
    let result = bench_with(
        &dir,
        "bench-2p",
        &[
            "--messages",
            "400",
            "--mps",
            "100",
            "--processes",
            "2",
            "--interactive",
            "10",
            "--lose-responses",
            "0.03",
            "--database-url",
            &pg_url(),
        ],
        None,
        &[
            ("HERALD_THREADS", "1"),
            // `herald=` matches every target starting so: the others stay at warn.
            (
                "HERALD_LOG",
                "warn,herald=info,herald_engine=warn,herald_engine::limit=info,\
                 herald_workers=warn,herald_api=warn,herald_sandbox=warn",
            ),
        ],
    )
    .await;
    assert_clean(&result, "2 processes, 3% lost answers");
    let logs = std::fs::read_to_string(dir.path().join("bench-2p.stderr")).unwrap_or_default();
    let serving: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("herald serving"))
        .collect();
    assert_eq!(serving.len(), 2, "both processes started:\n{logs}");
    assert!(
        serving.iter().all(|l| l.ends_with(" threads=1")),
        "both on one thread:\n{logs}"
    );
    assert_eq!(result["processes"], 2);
    assert!(
        result["interactive_p99_ms"].is_number(),
        "the interactive replies were delivered: {result}"
    );
}

#[tokio::test]
async fn one_process_on_the_embedded_store() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let sqlite = dir.sqlite_url("bench");
    let result = bench(
        &dir,
        "bench-sqlite",
        &[
            "--messages",
            "300",
            "--mps",
            "150",
            "--interactive",
            "5",
            "--database-url",
            &sqlite,
        ],
        None,
    )
    .await;
    assert_clean(&result, "SQLite, one process");
}

/// A private redis-server, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        Redis { child, port }
    }

    async fn wait_up(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {} did not come up", self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis goes away for a few seconds in the middle of a broadcast shared by two processes and
/// comes back: both fall back to a conservative local share (slower, never faster) and return.
#[tokio::test]
async fn redis_stopped_and_restarted_mid_run() {
    // Held before Redis is started, so the outage below falls in this bench's run.
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let port = free_port();
    let redis = Redis::start(port);
    redis.wait_up().await;
    let url = format!("redis://127.0.0.1:{port}");
    let args = [
        "--messages",
        "900",
        "--mps",
        "100",
        "--processes",
        "2",
        "--database-url",
        &pg_url(),
        "--redis-url",
        &url,
    ];
    let run = bench(&dir, "bench-redis", &args, None);
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(redis);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = Redis::start(port);
        again.wait_up().await;
        again
    };
    let (result, _redis) = tokio::join!(run, chaos);
    assert_clean(&result, "Redis stopped and restarted");
    let dir_logs: String =
        std::fs::read_to_string(dir.path().join("bench-redis.stderr")).unwrap_or_default();
    assert!(
        dir_logs.contains("Redis unreachable: rate limits fall back"),
        "the processes said they fell back to local limits:\n{dir_logs}"
    );
    assert!(
        dir_logs.contains("Redis reachable again"),
        "the processes said they returned to Redis:\n{dir_logs}"
    );
}
