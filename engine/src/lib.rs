//! Herald's durable job engine: the job model, one store interface with PostgreSQL and SQLite
//! backends, the runtime that claims and runs jobs, and the maintenance services.
//!
//! Start with [`Client`] to enqueue and [`Engine`] to work jobs.

pub mod admission;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod contacts;
pub mod crypto;
pub mod delivery;
pub mod error;
pub mod handler;
pub mod inbox;
pub mod limit;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod runtime;
pub mod store;
pub mod templates;
pub mod tenancy;
pub mod wakeup;

use std::sync::Arc;

pub use admission::Admission;
pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{EngineConfig, QueueConfig};
pub use error::{Result, StoreError};
pub use handler::{JobContext, JobError, KindPolicy, Registry, Worker};
pub use model::{Enqueued, Job, JobFilter, JobId, JobState, NewJob};
pub use runtime::{Engine, ShutdownReport};
pub use store::{connect, Backend, ConnectOptions, PausedQueue, PgStore, SqliteStore, Store};

/// Enqueues jobs with the engine's clock. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Client {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Client { store, clock }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        self.store.enqueue(job, self.clock.now()).await
    }

    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        self.store.enqueue_many(jobs, self.clock.now()).await
    }
}
