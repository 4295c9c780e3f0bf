//! The engine's settings, each with a named default and the reason for it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::DEFAULT_QUEUE;

/// Settings of one queue's producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Jobs of this queue that run at once in this process.
    pub concurrency: usize,
}

/// Settings of a running engine. `Default` gives production values.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Names this process in `attempted_by` and in leadership. Unique per process.
    pub worker_id: String,
    /// Queues this process works, with their concurrency. Empty: this process only enqueues and
    /// (if elected) runs maintenance.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Most jobs claimed in one statement (also capped by free slots). Large batches amortise the
    /// round trip; 1,000 is where PostgreSQL's per-row cost starts to dominate.
    pub claim_batch: usize,
    /// A producer with fewer free slots than this waits up to `fetch_cooldown` for more to free
    /// before it claims, so that a busy queue claims in batches rather than one job at a time.
    /// None: half of min(claim_batch, concurrency).
    pub claim_threshold: Option<usize>,
    pub fetch_cooldown: Duration,
    /// Producers look for work this often even without a wake-up (a lost NOTIFY, a job enqueued
    /// by a process that cannot notify).
    pub poll_interval: Duration,
    /// How long a claim is held without a heartbeat. A job whose worker died is rescued after at
    /// most lease + rescue_interval.
    pub lease: Duration,
    /// How often running jobs' leases are renewed; a third of the lease tolerates two missed beats.
    pub heartbeat_interval: Duration,
    /// How often the leader looks for expired leases.
    pub rescue_interval: Duration,
    /// Completions written in one statement at most.
    pub completion_batch: usize,
    /// On shutdown, how long in-flight jobs may take to finish before they are released.
    pub shutdown_timeout: Duration,
    /// Leadership lasts this long unless renewed; another process takes over after it lapses.
    pub leader_ttl: Duration,
    /// How often the leader renews (and others try to take) leadership.
    pub leader_renew_interval: Duration,
    /// How often the leader prunes the archive.
    pub prune_interval: Duration,
    /// Completed jobs are deleted this long after they completed.
    pub completed_retention: Duration,
    /// Discarded and cancelled jobs are kept longer, for inspection and operator retries.
    pub failed_retention: Duration,
    /// Rows deleted per pruning statement, so pruning never holds long locks.
    pub prune_batch: usize,
    /// How often the leader looks at the hot table's dead row versions (PostgreSQL).
    pub vacuum_interval: Duration,
    /// The leader vacuums the hot table once this many dead row versions have piled up: a few
    /// seconds of a busy queue, far sooner than autovacuum's one-minute rounds.
    pub vacuum_dead_rows: u64,
    /// The rate-limited producer asks each rate key for permits at most this often. Shorter gives
    /// interactive sends lower latency; longer claims (and records, and completes) more jobs per
    /// round trip. 20 ms adds at most 20 ms to a reply and batches twenty sends of a 1,000/s
    /// channel: measured 150 µs of CPU a message against 270 µs at 5 ms. Keep it under half
    /// of a channel's burst (`burst_ms`, 50 by default), or permits are lost to the cap.
    pub rate_tick: Duration,
    /// Most rate keys (channels) one producer tracks at once; more wait for the next scan.
    pub max_rate_keys: usize,
    /// Run maintenance (rescuer, pruner) when elected. Off for processes that should only work.
    pub maintenance: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert(DEFAULT_QUEUE.to_owned(), QueueConfig { concurrency: 100 });
        // Sends wait on Meta's answers (a few hundred ms): 256 in flight carry 1,000/s.
        queues.insert(
            crate::delivery::SEND_QUEUE.to_owned(),
            QueueConfig { concurrency: 256 },
        );
        // Each webhook job applies a batch of up to a thousand stored deliveries.
        queues.insert(
            crate::inbox::WEBHOOK_QUEUE.to_owned(),
            QueueConfig { concurrency: 8 },
        );
        EngineConfig {
            worker_id: default_worker_id(),
            queues,
            claim_batch: 1000,
            claim_threshold: None,
            fetch_cooldown: Duration::from_millis(2),
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(5),
            rescue_interval: Duration::from_secs(5),
            completion_batch: 2000,
            shutdown_timeout: Duration::from_secs(10),
            leader_ttl: Duration::from_secs(15),
            leader_renew_interval: Duration::from_secs(5),
            prune_interval: Duration::from_secs(60),
            completed_retention: Duration::from_secs(24 * 3600),
            failed_retention: Duration::from_secs(7 * 24 * 3600),
            prune_batch: 10_000,
            vacuum_interval: Duration::from_secs(5),
            vacuum_dead_rows: 50_000,
            rate_tick: Duration::from_millis(20),
            max_rate_keys: 10_000,
            maintenance: true,
        }
    }
}

impl EngineConfig {
    /// Checks the settings together; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_id.is_empty() {
            return Err("worker_id must not be empty".into());
        }
        for (name, q) in &self.queues {
            if name.is_empty() {
                return Err("queue names must not be empty".into());
            }
            if q.concurrency == 0 {
                return Err(format!("queue {name:?}: concurrency must be at least 1"));
            }
        }
        let positive = [
            ("claim_batch", self.claim_batch),
            ("completion_batch", self.completion_batch),
            ("prune_batch", self.prune_batch),
            ("max_rate_keys", self.max_rate_keys),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let durations = [
            ("poll_interval", self.poll_interval),
            ("lease", self.lease),
            ("heartbeat_interval", self.heartbeat_interval),
            ("rescue_interval", self.rescue_interval),
            ("leader_ttl", self.leader_ttl),
            ("leader_renew_interval", self.leader_renew_interval),
            ("prune_interval", self.prune_interval),
            ("vacuum_interval", self.vacuum_interval),
            ("rate_tick", self.rate_tick),
        ];
        for (name, d) in durations {
            if d.is_zero() {
                return Err(format!("{name} must be longer than zero"));
            }
        }
        if self.heartbeat_interval >= self.lease {
            return Err("heartbeat_interval must be shorter than lease".into());
        }
        if self.leader_renew_interval >= self.leader_ttl {
            return Err("leader_renew_interval must be shorter than leader_ttl".into());
        }
        Ok(())
    }
}

/// `herald-<pid>-<8 random hex digits>`: unique per process even when pids repeat across hosts.
pub fn default_worker_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("herald-{}-{}", std::process::id(), &random[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
        let bad = EngineConfig {
            heartbeat_interval: Duration::from_secs(20),
            ..EngineConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("heartbeat_interval"));
        let mut bad = EngineConfig::default();
        bad.queues
            .insert("q".into(), QueueConfig { concurrency: 0 });
        assert!(bad.validate().unwrap_err().contains("\"q\""));
    }
}
