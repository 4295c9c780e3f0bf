//! End-to-end tests of the `herald` binary: real processes, real databases, real signals.
//!
//! Every test has its own PostgreSQL schema or SQLite file (in its own temporary directory) and
//! its own port, so the tests run in parallel; every child process is killed when its test ends,
//! pass or fail.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use herald_engine::{JobId, JobState, NewJob, Store};
use serde_json::json;
use tokio::time::Instant;

use common::{
    all_jobs, count, free_port, herald, http_get, running_ids, sqlite_store, PgSchema, Proc,
    TestDir,
};

/// Jobs in the crash test.
const CRASH_JOBS: usize = 3000;
/// Completed jobs after which the first worker is killed.
const KILL_AFTER: i64 = 500;

/// `herald worker` with short leases, so that a crash is noticed within seconds.
fn worker(worker_id: &str, database: &[(&str, String)]) -> Command {
    let mut cmd = herald();
    cmd.arg("worker")
        .envs(database.iter().map(|(k, v)| (*k, v.as_str())))
        .env("HERALD_QUEUES", "default=50")
        .env("HERALD_LEASE", "2s")
        .env("HERALD_HEARTBEAT_INTERVAL", "500ms")
        .env("HERALD_RESCUE_INTERVAL", "500ms")
        .env("HERALD_LEADER_TTL", "2s")
        .env("HERALD_LEADER_RENEW_INTERVAL", "500ms")
        .env("HERALD_POLL_INTERVAL", "200ms")
        .env("HERALD_WORKER_ID", worker_id);
    cmd
}

/// The running set once it has stopped changing. A dead process changes nothing itself, but on
/// PostgreSQL a statement it sent just before the SIGKILL may still be executing in its server
/// backend and commit a moment after the reap (a claim adds running jobs, a completion removes
/// some). Once the set is stable it is exactly the set of jobs whose last claim belongs to the
/// dead worker: the jobs in flight at the kill, and the ones that must run again.
async fn settled_running_set(store: &dyn Store) -> BTreeSet<JobId> {
    let immediately = running_ids(store).await;
    let mut last = immediately.clone();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = running_ids(store).await;
        if now == last {
            if now != immediately {
                eprintln!(
                    "running set settled after the kill: {} jobs right after the reap, {} settled",
                    immediately.len(),
                    now.len()
                );
            }
            return now;
        }
        last = now;
    }
    panic!("the running set kept changing for 10 s after the worker was killed");
}

/// Polls until `n` jobs are completed, checking that `proc` stays up; panics after `within`.
async fn wait_for_completed(store: &dyn Store, proc: &mut Proc, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = count(store, JobState::Completed).await;
        if done >= n {
            return;
        }
        proc.assert_running();
        if Instant::now() >= deadline {
            let stats = store.stats().await.expect("read stats");
            panic!(
                "only {done} of {n} jobs completed after {within:?}; stats: {stats:?}\n{}",
                proc.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Enqueues short jobs, SIGKILLs the worker running them mid-run, starts another one, and checks
/// that every job completed and that exactly the jobs in flight at the kill ran twice.
async fn kill_9_mid_run_loses_nothing(
    store: &dyn Store,
    database: &[(&str, String)],
    dir: &TestDir,
) {
    let jobs: Vec<NewJob> = (0..CRASH_JOBS)
        .map(|i| NewJob::new("sleep", json!({ "ms": 1 + i % 20 })))
        .collect();
    let enqueued = store
        .enqueue_many(&jobs, Utc::now())
        .await
        .expect("enqueue the jobs");
    assert!(
        enqueued.iter().all(|e| e.inserted),
        "every job is new (no unique keys)"
    );
    let ids: BTreeSet<JobId> = enqueued.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), CRASH_JOBS, "one id per job");

    let mut first = Proc::spawn("first", worker("first", database), dir.path());
    wait_for_completed(store, &mut first, KILL_AFTER, Duration::from_secs(60)).await;
    first.kill9();
    let at_kill = settled_running_set(store).await;
    assert!(
        !at_kill.is_empty(),
        "no job was running when the worker was killed: the test proves nothing"
    );
    eprintln!(
        "killed the first worker with {} jobs running and {} completed",
        at_kill.len(),
        count(store, JobState::Completed).await
    );
    for job in all_jobs(store, Some(JobState::Running)).await {
        assert_eq!(
            (job.attempt, job.attempted_by.as_deref()),
            (1, Some("first")),
            "job {} was running at the kill: first attempt, by the killed worker",
            job.id
        );
    }

    let mut second = Proc::spawn("second", worker("second", database), dir.path());
    wait_for_completed(
        store,
        &mut second,
        CRASH_JOBS as i64,
        Duration::from_secs(60),
    )
    .await;

    let all = all_jobs(store, None).await;
    let found: BTreeSet<JobId> = all.iter().map(|j| j.id).collect();
    assert_eq!(found, ids, "exactly the enqueued jobs exist");
    let unfinished: Vec<_> = all
        .iter()
        .filter(|j| j.state != JobState::Completed)
        .map(|j| (j.id, j.state, j.attempt))
        .collect();
    assert!(unfinished.is_empty(), "jobs not completed: {unfinished:?}");
    let ran_twice: BTreeSet<JobId> = all.iter().filter(|j| j.attempt > 1).map(|j| j.id).collect();
    assert_eq!(
        ran_twice,
        at_kill,
        "only the jobs in flight at the kill ran twice; ran twice but not in flight: {:?}; \
         in flight but ran once: {:?}",
        ran_twice.difference(&at_kill).collect::<Vec<_>>(),
        at_kill.difference(&ran_twice).collect::<Vec<_>>()
    );
    for job in &all {
        if at_kill.contains(&job.id) {
            assert_eq!(job.attempt, 2, "job {} ran exactly twice: {job:?}", job.id);
            assert!(
                job.errors
                    .iter()
                    .any(|e| e.message.contains("lease expired")),
                "job {} records its lost attempt: {:?}",
                job.id,
                job.errors
            );
            assert_eq!(
                job.attempted_by.as_deref(),
                Some("second"),
                "job {} was finished by the second worker",
                job.id
            );
        } else {
            assert_eq!(job.attempt, 1, "job {} ran once: {job:?}", job.id);
            assert!(
                job.errors.is_empty(),
                "job {} ran once without error: {:?}",
                job.id,
                job.errors
            );
        }
    }
}

#[tokio::test]
async fn kill_9_mid_run_loses_nothing_postgres() {
    let schema = PgSchema::new();
    let dir = TestDir::new();
    let store = schema.store().await;
    let database = [
        ("DATABASE_URL", schema.url().to_owned()),
        ("HERALD_PG_SCHEMA", schema.name.clone()),
    ];
    kill_9_mid_run_loses_nothing(&store, &database, &dir).await;
}

#[tokio::test]
async fn kill_9_mid_run_loses_nothing_sqlite() {
    let dir = TestDir::new();
    let url = dir.sqlite_url("herald.db");
    let store = sqlite_store(&url).await;
    let database = [("DATABASE_URL", url)];
    kill_9_mid_run_loses_nothing(&store, &database, &dir).await;
}

#[tokio::test]
async fn serve_answers_healthz_and_stops_cleanly_on_sigterm() {
    serve_answers_healthz_and_stops_cleanly_on("TERM").await;
}

#[tokio::test]
async fn serve_answers_healthz_and_stops_cleanly_on_sigint() {
    serve_answers_healthz_and_stops_cleanly_on("INT").await;
}

async fn serve_answers_healthz_and_stops_cleanly_on(signal: &str) {
    let dir = TestDir::new();
    let port = free_port();
    let mut cmd = herald();
    cmd.arg("serve")
        .env("DATABASE_URL", dir.sqlite_url("herald.db"))
        .env("HERALD_LISTEN", format!("127.0.0.1:{port}"));
    let mut serve = Proc::spawn("serve", cmd, dir.path());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        serve.assert_running();
        let answer = http_get(port, "/healthz").await;
        match &answer {
            Some((200, body)) if body.contains("ok") => break,
            _ if Instant::now() >= deadline => panic!(
                "/healthz did not answer 200 ok within 30 s; last answer: {answer:?}\n{}",
                serve.logs()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    serve.signal(signal);
    let status = serve.wait_for_exit(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "serve exits cleanly on SIG{signal}, got {status}\n{}",
        serve.logs()
    );
    assert!(
        serve.logs().contains(&format!("SIG{signal} received")),
        "the log says which signal stopped it\n{}",
        serve.logs()
    );
}

#[tokio::test]
async fn invalid_setting_stops_startup_naming_it() {
    let dir = TestDir::new();

    let mut cmd = herald();
    cmd.arg("serve")
        .env("DATABASE_URL", dir.sqlite_url("env.db"))
        .env("HERALD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("HERALD_LEASE", "soon");
    let mut bad_env = Proc::spawn("bad-env", cmd, dir.path());
    let status = bad_env.wait_for_exit(Duration::from_secs(30)).await;
    let stderr = bad_env.stderr();
    assert!(!status.success(), "a bad HERALD_LEASE stops start-up");
    assert!(
        stderr.contains("lease") && stderr.contains("HERALD_LEASE"),
        "the error names the setting and its variable: {stderr}"
    );
    assert!(
        !dir.path().join("env.db").exists(),
        "nothing was started: the database was not even opened"
    );

    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {:?}\nleese = \"20s\"\n",
            dir.sqlite_url("file.db")
        ),
    )
    .expect("write the settings file");
    let mut cmd = herald();
    cmd.arg("--config")
        .arg(&config)
        .arg("serve")
        .env("HERALD_LISTEN", format!("127.0.0.1:{}", free_port()));
    let mut bad_file = Proc::spawn("bad-file", cmd, dir.path());
    let status = bad_file.wait_for_exit(Duration::from_secs(30)).await;
    let stderr = bad_file.stderr();
    assert!(
        !status.success(),
        "an unknown key in the settings file stops start-up"
    );
    assert!(
        stderr.contains("leese"),
        "the error names the unknown key: {stderr}"
    );
    assert!(
        !dir.path().join("file.db").exists(),
        "nothing was started: the database was not even opened"
    );
}

#[tokio::test]
async fn migrate_is_idempotent_and_concurrent() {
    let schema = PgSchema::new();
    let dir = TestDir::new();
    let migrate = |name: &str| {
        let mut cmd = herald();
        cmd.arg("migrate")
            .env("DATABASE_URL", schema.url())
            .env("HERALD_PG_SCHEMA", &schema.name);
        Proc::spawn(name, cmd, dir.path())
    };
    let expected: Vec<(i64, String)> = herald_engine::migrate::POSTGRES
        .iter()
        .map(|m| (m.version, m.name.to_owned()))
        .collect();
    let pool = schema.pool().await;
    let rows_sql = format!(
        "SELECT version, name, applied_at FROM \"{}\".herald_migrations ORDER BY version",
        schema.name
    );
    type Row = (i64, String, chrono::DateTime<Utc>);

    let mut runs: Vec<Proc> = (1..=3).map(|i| migrate(&format!("migrate-{i}"))).collect();
    for run in &mut runs {
        let status = run.wait_for_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "migrate succeeds\n{}", run.logs());
    }
    let rows: Vec<Row> = sqlx::query_as(&rows_sql)
        .fetch_all(&pool)
        .await
        .expect("read herald_migrations");
    let applied: Vec<(i64, String)> = rows.iter().map(|(v, n, _)| (*v, n.clone())).collect();
    assert_eq!(applied, expected, "each migration recorded exactly once");
    let jobs: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".herald_jobs",
        schema.name
    ))
    .fetch_one(&pool)
    .await
    .expect("the jobs table exists in the schema");
    assert_eq!(jobs, 0);

    let mut again = migrate("migrate-again");
    let status = again.wait_for_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "migrating again succeeds\n{}",
        again.logs()
    );
    let rows_again: Vec<Row> = sqlx::query_as(&rows_sql)
        .fetch_all(&pool)
        .await
        .expect("read herald_migrations");
    assert_eq!(rows_again, rows, "migrating again changes nothing");
    pool.close().await;
}

#[tokio::test]
async fn demo_runs_on_the_embedded_default() {
    let dir = TestDir::new();
    let mut cmd = herald();
    cmd.args(["demo", "--jobs", "200", "--messages", "160"])
        .current_dir(dir.path())
        .env("HERALD_LISTEN", format!("127.0.0.1:{}", free_port()));
    let mut demo = Proc::spawn("demo", cmd, dir.path());
    let status = demo.wait_for_exit(Duration::from_secs(120)).await;
    assert!(status.success(), "the demo succeeds\n{}", demo.logs());
    assert!(
        dir.path().join("herald.db").is_file(),
        "the demo created ./herald.db in its current directory"
    );
    let stdout = demo.stdout();
    assert!(
        stdout.contains("conversation:42 ran in order: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),
        "the conversation's messages ran in order:\n{stdout}"
    );
    assert!(
        stdout.contains("130429 answers: 0; sent twice: 0"),
        "the broadcast stayed within Meta's limit and sent nothing twice:\n{stdout}"
    );
    assert!(
        stdout.contains("failed for good: 1 (the undeliverable number"),
        "exactly the undeliverable recipient failed:\n{stdout}"
    );
}

/// `herald channels list` shows why Meta's answers paused a channel (never its secrets), and
/// `herald channels resume` lets it send again; an unknown id is an error.
#[tokio::test]
async fn channels_show_pauses_and_resume() {
    use herald_engine::delivery::{NewChannel, Platform};
    let dir = TestDir::new();
    let url = dir.sqlite_url("channels");
    let store = common::sqlite_store(&url).await;
    let channel = store
        .delivery()
        .create_channel(
            &NewChannel {
                workspace_id: uuid::Uuid::new_v4(),
                platform: Platform::Whatsapp,
                name: "support".into(),
                sender_id: "1555000100".into(),
                portfolio_id: None,
                access_token: "EAAG-very-secret-token".into(),
                app_secret: "app-secret-value".into(),
                verify_token: "verify-token-value".into(),
                graph_base_url: None,
                api_version: None,
                limits: None,
            },
            Utc::now(),
        )
        .await
        .expect("create channel");
    store
        .delivery()
        .pause_channel(
            channel.id,
            Some("the access token expired (190)"),
            false,
            Utc::now(),
        )
        .await
        .expect("pause");
    let run = |args: &[&str]| {
        let mut cmd = herald();
        cmd.args(args).env("DATABASE_URL", &url);
        cmd.output().expect("run herald")
    };
    let list = run(&["channels", "list"]);
    assert!(list.status.success(), "{list:?}");
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(out.contains("the access token expired (190)"), "{out}");
    for secret in [
        "EAAG-very-secret-token",
        "app-secret-value",
        "verify-token-value",
    ] {
        assert!(!out.contains(secret), "a secret is printed: {out}");
    }
    let resume = run(&["channels", "resume", &channel.id.to_string()]);
    assert!(resume.status.success(), "{resume:?}");
    let after = store
        .delivery()
        .channel(channel.id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(after.paused_reason, None, "resumed");
    let unknown = run(&["channels", "resume", &uuid::Uuid::new_v4().to_string()]);
    assert!(!unknown.status.success(), "an unknown channel is an error");
}

/// `herald worker` with `metrics_listen` serves its own engine's measurements: jobs it ran show
/// as throughput and in the run-time histogram, and it stops cleanly.
#[tokio::test]
async fn worker_serves_its_metrics() {
    let dir = TestDir::new();
    let url = dir.sqlite_url("herald.db");
    let store = sqlite_store(&url).await;
    let jobs: Vec<NewJob> = (0..25)
        .map(|n| NewJob::new("noop", serde_json::json!({ "n": n })))
        .collect();
    store
        .enqueue_many(&jobs, chrono::Utc::now())
        .await
        .expect("enqueue");
    let port = free_port();
    let mut cmd = worker("metrics-worker", &[("DATABASE_URL", url)]);
    cmd.env("HERALD_METRICS_LISTEN", format!("127.0.0.1:{port}"));
    let mut proc = Proc::spawn("worker", cmd, dir.path());
    let want = "herald_jobs_finished_total{queue=\"default\",outcome=\"completed\"} 25";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        proc.assert_running();
        let answer = http_get(port, "/metrics").await;
        match &answer {
            Some((200, body)) if body.contains(want) => {
                assert!(body.contains("herald_job_run_seconds_count{queue=\"default\"} 25"));
                assert!(body.contains("herald_jobs{queue=\"default\",state=\"completed\"} 25"));
                break;
            }
            _ if Instant::now() >= deadline => panic!(
                "/metrics never showed 25 completions; last answer: {answer:?}\n{}",
                proc.logs()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(http_get(port, "/healthz").await.map(|(s, _)| s), Some(200));
    proc.signal("TERM");
    let status = proc.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}\n{}", proc.logs());
}

/// `herald jobs` pauses and resumes queues and discards jobs, printing JSON; what it cannot do
/// exits non-zero with the reason.
#[tokio::test]
async fn jobs_cli_pauses_queues_and_discards_jobs() {
    let dir = TestDir::new();
    let url = dir.sqlite_url("herald.db");
    let store = sqlite_store(&url).await;
    let id = store
        .enqueue(
            &NewJob::new("noop", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)),
            Utc::now(),
        )
        .await
        .expect("enqueue")
        .id;
    let jobs = |args: &[&str]| {
        let out = herald()
            .arg("jobs")
            .args(args)
            .env("DATABASE_URL", &url)
            .current_dir(dir.path())
            .output()
            .expect("herald jobs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = jobs(&["pause", "default", "--reason", "deploying"]);
    assert!(ok && out.contains("\"reason\":\"deploying\""), "{out}{err}");
    let (ok, out, _) = jobs(&["paused"]);
    assert!(ok && out.contains("\"queue\":\"default\""), "{out}");
    let (ok, out, err) = jobs(&["discard", &id.to_string(), "--reason", "bad payload"]);
    assert!(ok && out.contains("\"state\":\"discarded\""), "{out}{err}");
    let (ok, _, err) = jobs(&["discard", &id.to_string()]);
    assert!(!ok && err.contains("was not discarded"), "{err}");
    let (ok, _, _) = jobs(&["resume", "default"]);
    assert!(ok);
    let (ok, _, err) = jobs(&["resume", "default"]);
    assert!(!ok && err.contains("is not paused"), "{err}");
    let (ok, out, _) = jobs(&["paused"]);
    assert!(ok && out.trim().is_empty(), "{out}");
    assert_eq!(
        store.get_job(id).await.expect("get").map(|j| j.state),
        Some(JobState::Discarded)
    );
}
