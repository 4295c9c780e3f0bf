//! In-process wake-ups: how a producer learns that its queue has work without polling.
//!
//! Every enqueue made through a store in this process pokes the queue's [`QueueSignal`] directly;
//! on PostgreSQL a LISTEN task forwards other processes' NOTIFYs here too. A signal is only a hint:
//! producers still poll on a timer, so a lost wake-up delays a job by at most the poll interval.
//!
//! A wake-up says which jobs became due (with a rate key, without, or either), so that a
//! rate-limited producer looks only where there is new work: a scan for rate keys and a claim
//! of key-less jobs are each a statement. A process applies its own enqueues at once and tags
//! the NOTIFY it sends for them with its origin, so that the echo LISTEN brings back is not
//! applied a second time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// One queue's wake-up: new due work, or an earlier scheduled time to arm the timer for.
#[derive(Debug)]
pub struct QueueSignal {
    pub notify: Notify,
    /// Earliest scheduled run_at (micros) heard of since the producer last looked; i64::MAX if none.
    next_due: AtomicI64,
    /// Which due jobs were heard of since the producer last looked ([`Due`] bits).
    due: AtomicU8,
}

/// Which jobs became due: bits of [`QueueSignal::take_due`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Jobs without a rate key.
    pub unkeyed: bool,
    /// Jobs with a rate key.
    pub keyed: bool,
}

const UNKEYED: u8 = 1;
const KEYED: u8 = 2;

impl QueueSignal {
    fn new() -> Self {
        QueueSignal {
            notify: Notify::new(),
            next_due: AtomicI64::new(i64::MAX),
            due: AtomicU8::new(0),
        }
    }

    fn wake(&self, bits: u8) {
        self.due.fetch_or(bits, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Which due jobs were heard of, and forgets them.
    pub fn take_due(&self) -> Due {
        let bits = self.due.swap(0, Ordering::AcqRel);
        Due {
            unkeyed: bits & UNKEYED != 0,
            keyed: bits & KEYED != 0,
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
#[derive(Debug, Clone)]
pub struct Wakeups {
    queues: Arc<Mutex<HashMap<String, Arc<QueueSignal>>>>,
    /// Tags this process's own NOTIFYs (see [`Wakeups::tagged`]).
    origin: u64,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            queues: Arc::default(),
            origin: fastrand::u64(..),
        }
    }
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

    /// Work is due now on `queue` (with or without rate keys).
    pub fn due(&self, queue: &str) {
        self.due_bits(queue, UNKEYED | KEYED);
    }

    fn due_bits(&self, queue: &str, bits: u8) {
        if let Some(s) = self.existing(queue) {
            s.wake(bits);
        }
    }

    /// A job on `queue` becomes due at `at`.
    pub fn scheduled(&self, queue: &str, at: DateTime<Utc>) {
        if let Some(s) = self.existing(queue) {
            s.next_due
                .fetch_min(at.timestamp_micros(), Ordering::AcqRel);
            s.wake(0);
        }
    }

    /// Wakes every queue (after a reconnect, when notifications may have been missed).
    pub fn all(&self) {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for s in queues.values() {
            s.wake(UNKEYED | KEYED);
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

    /// A payload for jobs due now: `k` only jobs with a rate key, `u` only jobs without, `d`
    /// either.
    pub(crate) fn due_payload(queue: &str, due: Due) -> String {
        match (due.unkeyed, due.keyed) {
            (false, true) => format!("k{queue}"),
            (true, false) => format!("u{queue}"),
            _ => format!("d{queue}"),
        }
    }

    /// `payload` tagged as this process's: the LISTEN echo of a tagged payload is ignored, so
    /// tag only what this process applies itself.
    pub(crate) fn tagged(&self, payload: &str) -> String {
        format!("@{:016x}:{payload}", self.origin)
    }

    /// Applies a payload heard through LISTEN: this process's own (tagged) ones were applied
    /// when they were sent.
    pub(crate) fn apply_notification(&self, payload: &str) {
        if let Some(rest) = payload.strip_prefix('@') {
            if let Some((origin, inner)) = rest.split_once(':') {
                if u64::from_str_radix(origin, 16).ok() == Some(self.origin) {
                    return;
                }
                return self.apply_payload(inner);
            }
        }
        self.apply_payload(payload)
    }

    /// Applies a NOTIFY payload written by [`Wakeups::payload`] or [`Wakeups::due_payload`];
    /// anything else wakes every queue.
    pub(crate) fn apply_payload(&self, payload: &str) {
        if let Some(queue) = payload.strip_prefix('d') {
            return self.due(queue);
        }
        if let Some(queue) = payload.strip_prefix('k') {
            return self.due_bits(queue, KEYED);
        }
        if let Some(queue) = payload.strip_prefix('u') {
            return self.due_bits(queue, UNKEYED);
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

    #[test]
    fn due_payloads_say_which_jobs() {
        let hub = Wakeups::default();
        let s = hub.signal("q");
        let both = Due {
            unkeyed: true,
            keyed: true,
        };
        for due in [
            Due {
                unkeyed: false,
                keyed: true,
            },
            Due {
                unkeyed: true,
                keyed: false,
            },
            both,
        ] {
            hub.apply_payload(&Wakeups::due_payload("q", due));
            assert_eq!(s.take_due(), due);
        }
        hub.apply_payload(&Wakeups::payload("q", None));
        assert_eq!(s.take_due(), both);
        hub.apply_payload("something else");
        assert_eq!(s.take_due(), both);
    }

    #[test]
    fn own_tagged_notifications_are_not_applied_twice() {
        let hub = Wakeups::default();
        let other = Wakeups::default();
        let s = hub.signal("q");
        let payload = Wakeups::payload("q", None);
        hub.apply_notification(&hub.tagged(&payload));
        assert_eq!(
            s.take_due(),
            Due {
                unkeyed: false,
                keyed: false
            }
        );
        hub.apply_notification(&other.tagged(&payload));
        assert!(s.take_due().keyed);
        hub.apply_notification(&payload);
        assert!(s.take_due().unkeyed);
    }
}
