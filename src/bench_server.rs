//! What the end-to-end benches share: a `herald serve` child process on a bench's own schema
//! and key, and that schema's clean-up.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a bench's server runs.
pub struct ServeOptions<'a> {
    pub database_url: &'a str,
    /// The bench's fresh PostgreSQL schema (None for SQLite).
    pub schema: Option<&'a str>,
    pub master_key: &'a str,
    /// `HERALD_QUEUES`: what the server works besides serving HTTP.
    pub queues: &'a str,
    pub worker_id: &'a str,
}

/// A `herald serve` child, killed if still running when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Server {
    pub fn spawn(o: &ServeOptions<'_>) -> Result<Server, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve")
            .env("DATABASE_URL", o.database_url)
            .env("HERALD_MASTER_KEY", o.master_key)
            .env_remove("HERALD_PREVIOUS_MASTER_KEYS")
            .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_QUEUES", o.queues)
            .env("HERALD_WORKER_ID", o.worker_id)
            .env(
                "HERALD_LOG",
                std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("HERALD_CONFIG")
            .env_remove("HERALD_REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match o.schema {
            Some(s) => cmd.env("HERALD_PG_SCHEMA", s),
            None => cmd.env_remove("HERALD_PG_SCHEMA"),
        };
        Ok(Server {
            child: cmd.spawn()?,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Waits up to 30 s for `/healthz` to answer 200.
    pub async fn wait_ready(&self) -> Result<(), Box<dyn std::error::Error>> {
        wait_ready(&self.base).await
    }

    /// SIGTERM, so the server drains as in production; waits up to 5 s.
    pub async fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 30 s for `base`'s `/healthz` to answer 200.
pub async fn wait_ready(base: &str) -> Result<(), Box<dyn std::error::Error>> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            return Err(format!("the server at {base} did not come up").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A fresh schema name for one bench run.
pub fn fresh_schema(bench: &str) -> String {
    format!(
        "herald_bench_{bench}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Drops a bench's schema (best effort: the bench's result matters more).
pub async fn drop_schema(database_url: &str, schema: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(database_url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&pool)
            .await;
    }
}
