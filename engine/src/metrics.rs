//! The engine's own measurements, rendered as Prometheus text by whoever serves `/metrics`:
//! jobs finished per queue and outcome (throughput is their rate), how long jobs waited past
//! their due time before a producer claimed them and how long they ran (histograms), and per
//! rate key (a channel) the permits asked for, granted and handed back, plus where the limiter
//! keeps its state (Redis or the local fallback).
//!
//! Everything is counted since the process started, with relaxed atomics: a job costs a few
//! uncontended increments and no lock (each producer holds its queue's counters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::limit::{Limiter, LimiterMode};

/// Upper bounds of the histogram buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus histogram with fixed [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket (one increment per observation); made cumulative
    /// when rendered.
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes the `# HELP` and `# TYPE` lines.
    pub fn header(out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    }

    /// Writes the series, with `labels` (`k="v",...`, already escaped) on every line.
    pub fn series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }

    /// A histogram without labels, header included.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        Histogram::header(out, name, help);
        self.series(out, name, "");
    }
}

/// Escapes a Prometheus label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One queue's counters in this process.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    pub completed: AtomicU64,
    /// Failed attempts that will be retried.
    pub retried: AtomicU64,
    pub snoozed: AtomicU64,
    pub discarded: AtomicU64,
    pub cancelled: AtomicU64,
    /// From the job's due time (its run_at) to its claim.
    pub wait: Histogram,
    /// From the start of the handler to its result.
    pub run: Histogram,
}

/// One rate key's permits in this process.
#[derive(Debug, Default)]
pub struct KeyMetrics {
    /// Permits asked for (the free slots offered to the key).
    pub requested: AtomicU64,
    pub granted: AtomicU64,
    /// Granted but handed back: no job was left to use them.
    pub refunded: AtomicU64,
    /// Asks that got nothing: the key was at its limit (or paused).
    pub denied: AtomicU64,
    /// Granted to a send that was then held back at its request, because it would have run
    /// ahead of the channel's pace as Meta sees it: the permit is not handed back (its moment
    /// has passed) and goes unused.
    pub held: AtomicU64,
}

/// Rate keys tracked at most; more keys share the `other` series (a cap on label cardinality).
pub const MAX_KEYS: usize = 10_000;

/// The engine's measurements (see the module docs). One per engine: [`crate::Engine::metrics`].
#[derive(Default)]
pub struct EngineMetrics {
    queues: Mutex<BTreeMap<String, Arc<QueueMetrics>>>,
    keys: Mutex<BTreeMap<String, Arc<KeyMetrics>>>,
    limiter: Mutex<Option<Arc<dyn Limiter>>>,
}

impl std::fmt::Debug for EngineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMetrics").finish_non_exhaustive()
    }
}

impl EngineMetrics {
    /// The counters of `queue` (created on first use; producers keep the `Arc`).
    pub fn queue(&self, queue: &str) -> Arc<QueueMetrics> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.entry(queue.to_owned()).or_default().clone()
    }

    /// The counters of rate key `key`.
    pub fn key(&self, key: &str) -> Arc<KeyMetrics> {
        let mut k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = k.get(key) {
            return m.clone();
        }
        let name = if k.len() >= MAX_KEYS { "other" } else { key };
        k.entry(name.to_owned()).or_default().clone()
    }

    /// Reports `limiter`'s mode (Redis or local fallback) and its fallbacks.
    pub fn set_limiter(&self, limiter: Arc<dyn Limiter>) {
        *self.limiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(limiter);
    }

    /// Appends the Prometheus text of everything measured.
    pub fn render(&self, out: &mut String) {
        let queues = snapshot(&self.queues);
        let _ = writeln!(
            out,
            "# HELP herald_jobs_finished_total Job attempts finished by this process, by queue and outcome.\n# TYPE herald_jobs_finished_total counter"
        );
        for (q, m) in &queues {
            let q = label(q);
            for (outcome, v) in [
                ("completed", &m.completed),
                ("retried", &m.retried),
                ("snoozed", &m.snoozed),
                ("discarded", &m.discarded),
                ("cancelled", &m.cancelled),
            ] {
                let _ = writeln!(
                    out,
                    "herald_jobs_finished_total{{queue=\"{q}\",outcome=\"{outcome}\"}} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        }
        for (name, help, pick) in [
            (
                "herald_job_wait_seconds",
                "Time from a job's due time to its claim, by queue.",
                (|m: &QueueMetrics| &m.wait) as fn(&QueueMetrics) -> &Histogram,
            ),
            (
                "herald_job_run_seconds",
                "Time a job's handler ran, by queue.",
                |m: &QueueMetrics| &m.run,
            ),
        ] {
            Histogram::header(out, name, help);
            for (q, m) in &queues {
                pick(m).series(out, name, &format!("queue=\"{}\"", label(q)));
            }
        }
        let keys = snapshot(&self.keys);
        let _ = writeln!(
            out,
            "# HELP herald_limiter_permits_total Rate-limit permits per rate key (channel): requested, granted, refunded (unused), asks denied, and permits of sends held back at their request (unused).\n# TYPE herald_limiter_permits_total counter"
        );
        for (k, m) in &keys {
            let k = label(k);
            for (kind, v) in [
                ("requested", &m.requested),
                ("granted", &m.granted),
                ("refunded", &m.refunded),
                ("denied", &m.denied),
                ("held", &m.held),
            ] {
                let _ = writeln!(
                    out,
                    "herald_limiter_permits_total{{key=\"{k}\",kind=\"{kind}\"}} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let limiter = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(l) = limiter {
            let s = l.status();
            let _ = writeln!(
                out,
                "# HELP herald_limiter_mode Where the limiter keeps its state now (1 for the current mode).\n# TYPE herald_limiter_mode gauge"
            );
            for (mode, is) in [
                ("local", s.mode == LimiterMode::Local),
                ("redis", s.mode == LimiterMode::Redis),
                ("fallback", s.mode == LimiterMode::Fallback),
            ] {
                let _ = writeln!(
                    out,
                    "herald_limiter_mode{{mode=\"{mode}\"}} {}",
                    u8::from(is)
                );
            }
            let _ = writeln!(
                out,
                "# HELP herald_limiter_fallbacks_total Times the limiter fell back from Redis to a local share.\n# TYPE herald_limiter_fallbacks_total counter\nherald_limiter_fallbacks_total {}",
                s.fallbacks
            );
            let _ = writeln!(
                out,
                "# HELP herald_limiter_redis_errors_total Redis calls of the limiter that failed or timed out.\n# TYPE herald_limiter_redis_errors_total counter\nherald_limiter_redis_errors_total {}",
                s.redis_errors
            );
            let _ = writeln!(
                out,
                "# HELP herald_limiter_reserved_share Share of every shared rate left free for processes that lost Redis and send at their fallback share.\n# TYPE herald_limiter_reserved_share gauge\nherald_limiter_reserved_share {}",
                s.reserved_for_fallbacks
            );
        }
    }
}

/// The counters of a map, copied out so that rendering holds no lock.
fn snapshot<T>(map: &Mutex<BTreeMap<String, Arc<T>>>) -> Vec<(String, Arc<T>)> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_sums() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 100.0205\n"), "{out}");
    }

    #[test]
    fn keys_are_capped() {
        let m = EngineMetrics::default();
        for i in 0..MAX_KEYS + 5 {
            m.key(&format!("k{i}"))
                .granted
                .fetch_add(1, Ordering::Relaxed);
        }
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("herald_limiter_permits_total{key=\"other\",kind=\"granted\"} 5"));
        m.key("k1").held.fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("herald_limiter_permits_total{key=\"k1\",kind=\"held\"} 3"));
        m.queue("a\"b").completed.fetch_add(2, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("herald_jobs_finished_total{queue=\"a\\\"b\",outcome=\"completed\"} 2")
        );
    }
}
