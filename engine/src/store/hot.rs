//! Connections kept between the hot path's statements.
//!
//! sqlx tests every pooled connection as it goes back to the pool: a round trip to the server
//! (a `Sync` and its answer) in a task of its own, after every statement run on the pool. On the
//! paths that run for every message (claims, completions, the send worker's write before each
//! call, webhook ingest) that doubled the round trips and the task wake-ups. Those paths lease a
//! connection from [`HotConns`] instead and give it back with [`Lease::release`] once their
//! statement (or transaction) has finished: then the connection is known to be idle and needs no
//! test.
//!
//! A lease that is dropped without `release` (an error, a cancelled future) leaves the
//! connection in a state nobody knows; it goes back through the pool and sqlx's test, as before,
//! and the idle connections kept here are handed back the same way, since whatever broke one
//! (a server restart) has likely broken the others.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};

/// Named defaults.
pub(crate) struct HotConfig {
    /// Most idle connections kept; the rest of the pool stays for everything else.
    pub max_idle: usize,
    /// A connection older than this goes back to the pool, which closes it past the pool's own
    /// lifetime, so that kept connections are renewed like the others.
    pub max_age: Duration,
}

impl HotConfig {
    /// A third of the pool (none for a pool of one or two, which has nothing to spare).
    pub fn for_pool(max_connections: u32) -> HotConfig {
        HotConfig {
            max_idle: max_connections as usize / 3,
            max_age: Duration::from_secs(10 * 60),
        }
    }
}

pub(crate) struct HotConns<DB: Database> {
    pool: Pool<DB>,
    config: HotConfig,
    /// Last in, first out: the most recently used connection is reused first.
    idle: Mutex<Vec<(PoolConnection<DB>, Instant)>>,
}

impl<DB: Database> HotConns<DB> {
    pub fn new(pool: Pool<DB>, config: HotConfig) -> Self {
        HotConns {
            pool,
            config,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection: a kept one if there is one, otherwise one from the pool.
    pub async fn lease(&self) -> Result<Lease<'_, DB>, sqlx::Error> {
        let kept = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let (conn, since) = match kept {
            Some(kept) => kept,
            None => (self.pool.acquire().await?, Instant::now()),
        };
        Ok(Lease {
            owner: self,
            conn: Some((conn, since)),
        })
    }

    /// Hands every kept connection back to the pool (which tests them).
    fn drain(&self) {
        let kept = match self.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => Vec::new(),
        };
        drop(kept);
    }
}

/// A connection leased from [`HotConns`]; use it as `&mut *lease`.
pub(crate) struct Lease<'a, DB: Database> {
    owner: &'a HotConns<DB>,
    conn: Option<(PoolConnection<DB>, Instant)>,
}

impl<DB: Database> Lease<'_, DB> {
    /// The statement or transaction run on this connection has finished (committed, or answered
    /// in full): keep the connection for the next lease.
    pub fn release(mut self) {
        let Some((conn, since)) = self.conn.take() else {
            return;
        };
        let pool = &self.owner.pool;
        // A pool with every connection out may have someone waiting: this one goes back.
        let exhausted = pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections();
        if exhausted || since.elapsed() >= self.owner.config.max_age || pool.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.owner.idle.lock() {
            if idle.len() < self.owner.config.max_idle {
                idle.push((conn, since));
            }
        }
    }
}

impl<DB: Database> Drop for Lease<'_, DB> {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            // Not released: something went wrong on this connection.
            self.owner.drain();
        }
    }
}

impl<DB: Database> Deref for Lease<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        match &self.conn {
            Some((conn, _)) => conn,
            None => unreachable!("a lease holds its connection until it is released or dropped"),
        }
    }
}

impl<DB: Database> DerefMut for Lease<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match &mut self.conn {
            Some((conn, _)) => conn,
            None => unreachable!("a lease holds its connection until it is released or dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgPoolOptions;
    use sqlx::Postgres;

    fn pool() -> Pool<Postgres> {
        pool_of(4)
    }

    fn pool_of(max: u32) -> Pool<Postgres> {
        let url = std::env::var("HERALD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        PgPoolOptions::new()
            .max_connections(max)
            .connect_lazy(&url)
            .expect("a valid PostgreSQL URL (set HERALD_TEST_DATABASE_URL)")
    }

    async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .expect("PostgreSQL answers (is it running?)")
    }

    #[tokio::test]
    async fn a_released_connection_is_reused_and_a_dropped_one_is_not() {
        let hot = HotConns::new(pool(), HotConfig::for_pool(4));
        let mut lease = hot.lease().await.expect("a connection");
        let first = backend_pid(&mut lease).await;
        lease.release();
        let mut lease = hot.lease().await.expect("a connection");
        assert_eq!(
            backend_pid(&mut lease).await,
            first,
            "kept for the next lease"
        );
        // Dropped without release: nothing is kept.
        drop(lease);
        assert!(hot.idle.lock().expect("not poisoned").is_empty());
    }

    #[tokio::test]
    async fn a_statement_cancelled_half_way_leaves_nothing_behind() {
        let hot = HotConns::new(pool(), HotConfig::for_pool(4));
        let mut lease = hot.lease().await.expect("a connection");
        backend_pid(&mut lease).await;
        // The future is dropped while the server is still answering.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            sqlx::query("SELECT pg_sleep(0.5), 'stale'").fetch_all(&mut *lease),
        )
        .await;
        assert!(cancelled.is_err(), "the statement was cut off");
        drop(lease);
        // Whatever connection the next lease gets answers its own statement, not the old one.
        let mut lease = hot.lease().await.expect("a connection");
        let answer: String = sqlx::query_scalar("SELECT 'fresh'")
            .fetch_one(&mut *lease)
            .await
            .expect("a clean connection");
        assert_eq!(answer, "fresh");
        lease.release();
        let kept = hot.idle.lock().expect("not poisoned").len();
        assert_eq!(kept, 1);
    }

    #[tokio::test]
    async fn nothing_is_kept_from_a_pool_that_has_none_to_spare() {
        assert_eq!(HotConfig::for_pool(2).max_idle, 0);
        let hot = HotConns::new(pool_of(3), HotConfig::for_pool(3));
        let mut leases = Vec::new();
        for _ in 0..3 {
            let mut lease = hot.lease().await.expect("a connection");
            backend_pid(&mut lease).await;
            leases.push(lease);
        }
        // Every connection is out: whoever waits for the pool gets the first one back.
        if let Some(lease) = leases.pop() {
            lease.release();
        }
        assert!(hot.idle.lock().expect("not poisoned").is_empty());
    }
}
