//! Batches the send worker's two writes per message (before the call: "requesting"; after:
//! Meta's message id) across every send in flight, so that 1,000 sends a second cost a few
//! dozen statements, not 2,000. Each caller waits for its own batch to commit before it goes
//! on: nothing is called before it is recorded, and no job completes before its result is.

use std::sync::Arc;

use herald_engine::delivery::SendRecord;
use herald_engine::{Clock, Store};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most operations written in one statement.
const MAX_BATCH: usize = 1_000;

enum Op {
    Begin(Uuid, oneshot::Sender<Result<Option<SendRecord>, String>>),
    Accepted(Uuid, String, oneshot::Sender<Result<(), String>>),
}

/// The handle; the writer task stops when the last handle is dropped.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Op>,
}

impl Recorder {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Recorder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, clock, rx));
        Recorder { tx }
    }

    /// Marks a queued send as requested and returns it; None if it was not queued.
    pub async fn begin(&self, id: Uuid) -> Result<Option<SendRecord>, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Begin(id, tx))
            .map_err(|_| "the send recorder stopped".to_owned())?;
        rx.await
            .map_err(|_| "the send recorder stopped".to_owned())?
    }

    /// Records Meta's message id for an accepted send.
    pub async fn accepted(&self, id: Uuid, provider_message_id: String) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Accepted(id, provider_message_id, tx))
            .map_err(|_| "the send recorder stopped".to_owned())?;
        rx.await
            .map_err(|_| "the send recorder stopped".to_owned())?
    }
}

async fn run(store: Arc<dyn Store>, clock: Arc<dyn Clock>, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    // Whatever queued up while the last batch was written goes into the next one: no timer,
    // so a lone send waits for nobody.
    while rx.recv_many(&mut ops, MAX_BATCH).await > 0 {
        let mut begins = Vec::new();
        let mut accepts = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Begin(id, reply) => begins.push((id, reply)),
                Op::Accepted(id, pmid, reply) => accepts.push((id, pmid, reply)),
            }
        }
        let delivery = store.delivery();
        let now = clock.now();
        let ids: Vec<Uuid> = begins.iter().map(|b| b.0).collect();
        let rows: Vec<(Uuid, String)> = accepts.iter().map(|a| (a.0, a.1.clone())).collect();
        let started = std::time::Instant::now();
        let result = delivery.record_sends(&ids, &rows, now).await;
        tracing::debug!(
            begins = ids.len(),
            accepts = rows.len(),
            micros = started.elapsed().as_micros() as u64,
            "send recorder batch"
        );
        let accepted = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        match result {
            Ok(records) => {
                let mut by_id: std::collections::HashMap<Uuid, SendRecord> =
                    records.into_iter().map(|r| (r.id, r)).collect();
                for (id, reply) in begins {
                    let _ = reply.send(Ok(by_id.remove(&id)));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for (_, reply) in begins {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        for (_, _, reply) in accepts {
            let _ = reply.send(accepted.clone());
        }
    }
}
