//! Durable webhook ingest with group commit.
//!
//! Each webhook request hands its verified body to [`Ingest::store`] and waits. A few writer
//! tasks take whatever requests are waiting (up to [`IngestConfig::max_batch`]), store them with
//! their processing job in one transaction, and only then answer each request. One commit
//! serves hundreds of requests, so the rate is bounded by batches, not by commits, and a request
//! is acknowledged only once its delivery is on disk: nothing is accepted and then lost.
//!
//! With a [`Triage`], each request first has its delivery sorted (on its own task, within
//! [`TRIAGE_BUDGET`]): one that carries only statuses of our sends has them applied in the
//! same transaction and needs no job (see [`herald_engine::inbox`]). If the database refuses
//! such a batch for its content (not for a passing reason), the batch is stored again as raw
//! deliveries, for the job: the triage can only save work, never lose a delivery.

use std::sync::Arc;
use std::time::Duration;

use herald_engine::inbox::{NewWebhookEvent, Triage};
use herald_engine::{Clock, Store, StoreError};
use tokio::sync::{mpsc, oneshot, Mutex};

/// Settings of the [`Ingest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestConfig {
    /// Deliveries stored in one transaction at most.
    pub max_batch: usize,
    /// Transactions in flight at once: while one commits, the next batch fills and goes.
    pub writers: usize,
    /// Requests waiting for a writer at most; beyond this a request is refused with 503 (Meta
    /// redelivers) instead of piling up memory.
    pub max_waiting: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch: 1_000,
            writers: 4,
            max_waiting: 50_000,
        }
    }
}

/// Why a delivery was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("too many deliveries are waiting to be stored")]
    Overloaded,
    #[error("the ingest stopped")]
    Stopped,
    #[error("the delivery was not stored: {0}")]
    Store(String),
}

struct Pending {
    event: NewWebhookEvent,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The handle; cheap to clone. Writers stop when the last handle is dropped.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Pending>,
    /// Sorts each delivery on its request's task (requests run concurrently; the writers do
    /// not), before it queues for a writer.
    triage: Option<Arc<dyn Triage>>,
    /// Deliveries whose triage ran out of time: when the database is slow, every request
    /// would warn, so the log gets one line per [`LATE_TRIAGE_WARN_EVERY`] with the count.
    late_triage: Arc<Throttle>,
}

/// At most one warning about late triage this often.
pub const LATE_TRIAGE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Counts events and says when one of them should be logged: the first, then at most one per
/// period.
struct Throttle {
    started: std::time::Instant,
    period_ms: u64,
    count: std::sync::atomic::AtomicU64,
    /// Milliseconds after `started` of the last logged event, plus one (0: none yet).
    logged_at: std::sync::atomic::AtomicU64,
}

impl Throttle {
    fn new(period: Duration) -> Throttle {
        Throttle {
            started: std::time::Instant::now(),
            period_ms: period.as_millis().max(1) as u64,
            count: Default::default(),
            logged_at: Default::default(),
        }
    }

    /// Counts one event at `now_ms` (after `started`); Some(events so far) if it is to be
    /// logged.
    fn note(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now_ms + 1 >= last + self.period_ms;
        (due && self
            .logged_at
            .compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then_some(count)
    }
}

impl Ingest {
    /// Starts the writers on the current runtime.
    pub fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: IngestConfig,
        triage: Option<Arc<dyn Triage>>,
    ) -> Ingest {
        let (tx, rx) = mpsc::channel(config.max_waiting.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..config.writers.max(1) {
            tokio::spawn(writer(
                store.clone(),
                clock.clone(),
                rx.clone(),
                config.max_batch.max(1),
            ));
        }
        Ingest {
            tx,
            triage,
            late_triage: Arc::new(Throttle::new(LATE_TRIAGE_WARN_EVERY)),
        }
    }

    /// Stores one delivery durably (with the job that will process it); returns once committed.
    pub async fn store(&self, channel_id: uuid::Uuid, body: Vec<u8>) -> Result<(), IngestError> {
        let mut event = NewWebhookEvent::raw(channel_id, body);
        if let Some(triage) = &self.triage {
            // Bounded: the triage may read the channels, and a slow database must not hold
            // the request for longer than the write itself would. Unsorted goes to the job.
            match tokio::time::timeout(TRIAGE_BUDGET, triage.statuses_only(channel_id, &event.body))
                .await
            {
                Ok(statuses) => event.statuses = statuses,
                Err(_) => {
                    let now_ms = self.late_triage.started.elapsed().as_millis() as u64;
                    if let Some(late) = self.late_triage.note(now_ms) {
                        tracing::warn!(
                            %channel_id,
                            late_since_start = late,
                            "webhook ingest: triage took too long; the delivery goes to the job \
                             (logged at most every 10 s)"
                        )
                    }
                }
            }
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Pending { event, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => IngestError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => IngestError::Stopped,
            })?;
        answer
            .await
            .map_err(|_| IngestError::Stopped)?
            .map_err(IngestError::Store)
    }
}

/// How long a delivery may spend in the triage before it goes to the job as it is.
pub const TRIAGE_BUDGET: Duration = Duration::from_millis(250);

async fn writer(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rx: Arc<Mutex<mpsc::Receiver<Pending>>>,
    max_batch: usize,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    loop {
        let n = {
            let mut rx = rx.lock().await;
            rx.recv_many(&mut batch, max_batch).await
        };
        if n == 0 {
            return;
        }
        let (mut events, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|p| (p.event, p.reply)).unzip();
        let mut result = store_with_retry(store.as_ref(), clock.as_ref(), &events).await;
        let refused = matches!(&result, Err(e) if !is_transient(e));
        if refused && events.iter().any(|e| e.statuses.is_some()) {
            if let Err(e) = &result {
                tracing::warn!(
                    error = %e,
                    deliveries = events.len(),
                    "webhook ingest: the database refused the statuses; storing the deliveries for the job"
                );
            }
            for e in &mut events {
                e.statuses = None;
            }
            result = store_with_retry(store.as_ref(), clock.as_ref(), &events).await;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, deliveries = events.len(), "webhook ingest: deliveries not stored (Meta will redeliver)");
        }
        let result = result.map_err(|e| e.to_string());
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}

/// One quick retry for a transient error (a connection dropped by a database restart); past
/// that the requests get 503 and Meta delivers again later.
async fn store_with_retry(
    store: &dyn Store,
    clock: &dyn Clock,
    events: &[NewWebhookEvent],
) -> Result<(), StoreError> {
    let mut tried = false;
    loop {
        match store.inbox().store_webhooks(events, clock.now()).await {
            Ok(_) => return Ok(()),
            Err(e) if !tried && is_transient(&e) => {
                tracing::warn!(error = %e, deliveries = events.len(), "webhook ingest: write failed; retrying once");
                tried = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &StoreError) -> bool {
    e.is_transient()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_triage_is_logged_first_then_once_a_period() {
        let t = Throttle::new(Duration::from_secs(10));
        assert_eq!(t.note(0), Some(1), "the first is logged");
        assert_eq!(t.note(5), None);
        assert_eq!(t.note(9_998), None);
        assert_eq!(t.note(9_999), None, "within the period of the first");
        assert_eq!(
            t.note(10_000),
            Some(5),
            "a period later, with the count so far"
        );
        assert_eq!(t.note(10_001), None);
        assert_eq!(t.note(60_000), Some(7));
    }
}
