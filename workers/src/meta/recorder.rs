//! Batches the send worker's write before each call ("requesting") across the sends in flight
//! whose claims did not record it ([`herald_engine::delivery::BegunSends`]: most sends are
//! begun by their claims), so that many sends cost a few statements, not one each. Each caller
//! waits for its own batch to commit before it goes on: nothing is called before it is
//! recorded. A caller that is gone by then (its attempt dropped) will make no request, so its
//! begin is undone. (The write after the call, Meta's message id, travels with the job's
//! completion: [`herald_engine::model::Effect::SendAccepted`].)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_engine::delivery::{SendRecord, SendUpdate};
use herald_engine::{Clock, Store};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most sends begun in one statement.
const MAX_BATCH: usize = 1_000;

type Reply = oneshot::Sender<Result<Option<SendRecord>, BeginFailed>>;

/// A begin that failed.
#[derive(Debug)]
pub struct BeginFailed {
    pub error: String,
    /// The request time its write would have recorded, if a write was made: the write may
    /// have committed even so (its answer lost), and then the send is `sending` from this
    /// time. None: no write was made (the recorder stopped).
    pub at: Option<DateTime<Utc>>,
}

impl BeginFailed {
    fn stopped() -> BeginFailed {
        BeginFailed {
            error: "the send recorder stopped".to_owned(),
            at: None,
        }
    }
}

/// The handle; the writer task stops when the last handle is dropped.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<(Uuid, Reply)>,
}

impl Recorder {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Recorder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, clock, rx));
        Recorder { tx }
    }

    /// Marks a queued send as requested and returns it; None if it was not queued.
    pub async fn begin(&self, id: Uuid) -> Result<Option<SendRecord>, BeginFailed> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((id, tx)).map_err(|_| BeginFailed::stopped())?;
        rx.await.map_err(|_| BeginFailed::stopped())?
    }
}

async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::UnboundedReceiver<(Uuid, Reply)>,
) {
    let mut begins = Vec::with_capacity(MAX_BATCH);
    // Whatever queued up while the last batch was written goes into the next one: no timer,
    // so a lone send waits for nobody.
    while rx.recv_many(&mut begins, MAX_BATCH).await > 0 {
        let ids: Vec<Uuid> = begins.iter().map(|b| b.0).collect();
        let started = std::time::Instant::now();
        let at = clock.now();
        let result = store.delivery().begin_sends(&ids, at).await;
        tracing::debug!(
            begins = ids.len(),
            micros = started.elapsed().as_micros() as u64,
            "send recorder batch"
        );
        // Begins whose callers are all gone (their attempts were dropped while they waited:
        // a handler timeout, a shutdown): no request will follow, so they are undone. A send
        // asked for twice in one batch (a second job naming it) goes to a caller still there.
        let orphans: Vec<(Uuid, DateTime<Utc>)> = match result {
            Ok(records) => {
                let mut by_id: HashMap<Uuid, SendRecord> =
                    records.into_iter().map(|r| (r.id, r)).collect();
                for (id, reply) in begins.drain(..) {
                    if let Err(Ok(Some(record))) = reply.send(Ok(by_id.remove(&id))) {
                        by_id.insert(id, record);
                    }
                }
                by_id
                    .into_values()
                    .filter_map(|r| Some((r.id, r.requested_at?)))
                    .collect()
            }
            Err(e) => {
                let e = e.to_string();
                let mut answered = HashSet::new();
                let mut gone = HashSet::new();
                for (id, reply) in begins.drain(..) {
                    let failed = BeginFailed {
                        error: e.clone(),
                        at: Some(at),
                    };
                    if reply.send(Err(failed)).is_ok() {
                        answered.insert(id);
                    } else {
                        gone.insert(id);
                    }
                }
                gone.difference(&answered).map(|&id| (id, at)).collect()
            }
        };
        if !orphans.is_empty() {
            // On a task of its own: the next batch does not wait for these.
            let (store, clock) = (store.clone(), clock.clone());
            tokio::spawn(async move {
                for (id, requested_at) in orphans {
                    let undone = store
                        .delivery()
                        .update_send(id, &SendUpdate::Unsent { requested_at }, clock.now())
                        .await;
                    tracing::debug!(send = %id, ?undone, "a begin whose attempt was dropped, undone");
                }
            });
        }
    }
}
