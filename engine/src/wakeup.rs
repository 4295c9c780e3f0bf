//! In-process wake-ups: how a producer learns that its queue has work without polling.
//!
//! Every enqueue made through a store in this process pokes the queue's [`QueueSignal`] directly;
//! on PostgreSQL a LISTEN task forwards other processes' NOTIFYs here too. A signal is only a hint:
//! producers still poll on a timer, so a lost wake-up delays a job by at most the poll interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// One queue's wake-up: new due work, or an earlier scheduled time to arm the timer for.
#[derive(Debug)]
pub struct QueueSignal {
    pub notify: Notify,
    /// Earliest scheduled run_at (micros) heard of since the producer last looked; i64::MAX if none.
    next_due: AtomicI64,
}

impl QueueSignal {
    fn new() -> Self {
        QueueSignal {
            notify: Notify::new(),
            next_due: AtomicI64::new(i64::MAX),
        }
    }

    /// Takes the earliest scheduled time heard of, if any, and forgets it.
    pub fn take_next_due(&self) -> Option<DateTime<Utc>> {
        match self.next_due.swap(i64::MAX, Ordering::AcqRel) {
            i64::MAX => None,
            m => DateTime::from_timestamp_micros(m),
        }
    }
}

/// The hub of every queue's signal in this process. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Wakeups {
    queues: Arc<Mutex<HashMap<String, Arc<QueueSignal>>>>,
}

impl Wakeups {
    pub fn signal(&self, queue: &str) -> Arc<QueueSignal> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = queues.get(queue) {
            return s.clone();
        }
        let s = Arc::new(QueueSignal::new());
        queues.insert(queue.to_owned(), s.clone());
        s
    }

    /// Work is due now on `queue`.
    pub fn due(&self, queue: &str) {
        if let Some(s) = self.existing(queue) {
            s.notify.notify_one();
        }
    }

    /// A job on `queue` becomes due at `at`.
    pub fn scheduled(&self, queue: &str, at: DateTime<Utc>) {
        if let Some(s) = self.existing(queue) {
            s.next_due
                .fetch_min(at.timestamp_micros(), Ordering::AcqRel);
            s.notify.notify_one();
        }
    }

    /// Wakes every queue (after a reconnect, when notifications may have been missed).
    pub fn all(&self) {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for s in queues.values() {
            s.notify.notify_one();
        }
    }

    fn existing(&self, queue: &str) -> Option<Arc<QueueSignal>> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.get(queue).cloned()
    }

    /// The text of a NOTIFY payload for `queue` (`d` due now, or `s<micros>` scheduled).
    pub(crate) fn payload(queue: &str, scheduled: Option<DateTime<Utc>>) -> String {
        match scheduled {
            None => format!("d{queue}"),
            Some(at) => format!("s{}:{queue}", at.timestamp_micros()),
        }
    }

    /// Applies a NOTIFY payload written by [`Wakeups::payload`]; anything else wakes every queue.
    pub(crate) fn apply_payload(&self, payload: &str) {
        if let Some(queue) = payload.strip_prefix('d') {
            return self.due(queue);
        }
        if let Some((micros, queue)) = payload.strip_prefix('s').and_then(|p| p.split_once(':')) {
            if let Some(at) = micros
                .parse()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
            {
                return self.scheduled(queue, at);
            }
        }
        self.all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let hub = Wakeups::default();
        let s = hub.signal("q:with:colons");
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default();
        hub.apply_payload(&Wakeups::payload("q:with:colons", Some(at)));
        assert_eq!(s.take_next_due(), Some(at));
        assert_eq!(s.take_next_due(), None);
        hub.apply_payload(&Wakeups::payload("q:with:colons", None));
        assert_eq!(s.take_next_due(), None);
    }
}
