//! The completer under a database that refuses one completion: the others still land, and the
//! refused job is rescued and run again instead of stalling every completion behind it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use herald_engine::model::{Completion, Enqueued, JobFilter, Outcome, QueueStat, DEFAULT_QUEUE};
use herald_engine::store::Backend;
use herald_engine::wakeup::Wakeups;
use herald_engine::{
    Client, Engine, EngineConfig, Job, JobContext, JobError, JobId, JobState, NewJob, QueueConfig,
    Registry, Store, StoreError, SystemClock, Worker,
};
use serde_json::json;

conformance!(a_refused_completion_does_not_stall_the_others);

/// Delegates to a real store, but refuses (as a database refuses bad data) any completion batch
/// that holds the poisoned job's first, successful attempt.
struct RefusesOne {
    inner: Arc<dyn Store>,
    poisoned: Mutex<Option<JobId>>,
    refusals: Mutex<u32>,
}

#[async_trait]
impl Store for RefusesOne {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    fn wakeups(&self) -> &Wakeups {
        self.inner.wakeups()
    }
    fn delivery(&self) -> &dyn herald_engine::delivery::DeliveryStore {
        self.inner.delivery()
    }
    fn inbox(&self) -> &dyn herald_engine::inbox::InboxStore {
        self.inner.inbox()
    }
    fn tenancy(&self) -> &dyn herald_engine::tenancy::TenancyStore {
        self.inner.tenancy()
    }
    fn contacts(&self) -> &dyn herald_engine::contacts::ContactStore {
        self.inner.contacts()
    }
    fn templates(&self) -> &dyn herald_engine::templates::TemplateStore {
        self.inner.templates()
    }
    async fn claim_scoped(
        &self,
        queue: &str,
        scope: herald_engine::store::RateScope<'_>,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> herald_engine::Result<Vec<Job>> {
        self.inner
            .claim_scoped(queue, scope, worker, limit, now, lease_until)
            .await
    }
    async fn ready_rate_keys(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> herald_engine::Result<Vec<String>> {
        self.inner.ready_rate_keys(queue, after, limit).await
    }
    async fn ping(&self) -> herald_engine::Result<()> {
        self.inner.ping().await
    }
    async fn migrate(&self) -> herald_engine::Result<()> {
        self.inner.migrate().await
    }
    async fn enqueue_many(
        &self,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> herald_engine::Result<Vec<Enqueued>> {
        self.inner.enqueue_many(jobs, now).await
    }
    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> herald_engine::Result<Vec<Job>> {
        self.inner
            .claim(queue, worker, limit, now, lease_until)
            .await
    }
    async fn complete(&self, completions: &[Completion]) -> herald_engine::Result<u64> {
        let poisoned = *self.poisoned.lock().expect("lock");
        // Only the handler's success: the rescuer's own completion for the job goes through.
        if completions
            .iter()
            .any(|c| Some(c.id) == poisoned && c.attempt == 1 && c.outcome == Outcome::Completed)
        {
            *self.refusals.lock().expect("lock") += 1;
            return Err(StoreError::Corrupt("refused: bad row".into()));
        }
        self.inner.complete(completions).await
    }
    async fn heartbeat(
        &self,
        claims: &[(JobId, i32)],
        lease_until: DateTime<Utc>,
    ) -> herald_engine::Result<u64> {
        self.inner.heartbeat(claims, lease_until).await
    }
    async fn release(
        &self,
        claims: &[(JobId, i32)],
        now: DateTime<Utc>,
    ) -> herald_engine::Result<u64> {
        self.inner.release(claims, now).await
    }
    async fn promote(&self, queue: &str, now: DateTime<Utc>) -> herald_engine::Result<u64> {
        self.inner.promote(queue, now).await
    }
    async fn next_due(&self, queue: &str) -> herald_engine::Result<Option<DateTime<Utc>>> {
        self.inner.next_due(queue).await
    }
    async fn expired(&self, now: DateTime<Utc>, limit: usize) -> herald_engine::Result<Vec<Job>> {
        self.inner.expired(now, limit).await
    }
    async fn prune(
        &self,
        completed_before: DateTime<Utc>,
        others_before: DateTime<Utc>,
        limit: usize,
    ) -> herald_engine::Result<u64> {
        self.inner
            .prune(completed_before, others_before, limit)
            .await
    }
    async fn vacuum_hot(&self, dead_rows: u64) -> herald_engine::Result<bool> {
        self.inner.vacuum_hot(dead_rows).await
    }
    async fn try_lead(
        &self,
        name: &str,
        leader: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> herald_engine::Result<bool> {
        self.inner.try_lead(name, leader, now, until).await
    }
    async fn resign(&self, name: &str, leader: &str) -> herald_engine::Result<()> {
        self.inner.resign(name, leader).await
    }
    async fn announce_fallback(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: std::time::Duration,
    ) -> herald_engine::Result<()> {
        self.inner
            .announce_fallback(process_id, period, share, ttl)
            .await
    }
    async fn withdraw_fallback(&self, process_id: &str, period: u64) -> herald_engine::Result<()> {
        self.inner.withdraw_fallback(process_id, period).await
    }
    async fn fallback_shares(
        &self,
        process_id: &str,
    ) -> herald_engine::Result<herald_engine::limit::Fallbacks> {
        self.inner.fallback_shares(process_id).await
    }
    async fn get_job(&self, id: JobId) -> herald_engine::Result<Option<Job>> {
        self.inner.get_job(id).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> herald_engine::Result<Vec<Job>> {
        self.inner.list_jobs(filter).await
    }
    async fn retry_job(&self, id: JobId, now: DateTime<Utc>) -> herald_engine::Result<Option<Job>> {
        self.inner.retry_job(id, now).await
    }
    async fn cancel_job(
        &self,
        id: JobId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> herald_engine::Result<Option<Job>> {
        self.inner.cancel_job(id, now, reason).await
    }
    async fn discard_job(
        &self,
        id: JobId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> herald_engine::Result<Option<Job>> {
        self.inner.discard_job(id, now, reason).await
    }
    async fn pause_queue(
        &self,
        queue: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> herald_engine::Result<bool> {
        self.inner.pause_queue(queue, reason, now).await
    }
    async fn resume_queue(&self, queue: &str) -> herald_engine::Result<bool> {
        self.inner.resume_queue(queue).await
    }
    async fn paused_queues(&self) -> herald_engine::Result<Vec<herald_engine::PausedQueue>> {
        self.inner.paused_queues().await
    }
    async fn stats(&self) -> herald_engine::Result<Vec<QueueStat>> {
        self.inner.stats().await
    }
    async fn listen(
        &self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> herald_engine::Result<()> {
        self.inner.listen(shutdown).await
    }
}

/// Holds every job until told to go, so that the poisoned job finishes in the same completion
/// batch as the others. A watch, not a `Notify`: a job counted in flight whose task has not
/// reached the gate yet when it opens must still pass it (with `notify_waiters` it waited for
/// ever, heartbeats renewing its lease; CI caught it once).
struct Gate {
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl Worker for Gate {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.gate";

    async fn work(&self, _args: serde_json::Value, ctx: &JobContext) -> Result<(), JobError> {
        if ctx.job.attempt == 1 {
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
        }
        Ok(())
    }
}

async fn a_refused_completion_does_not_stall_the_others(store: Arc<dyn Store>) {
    let faulty = Arc::new(RefusesOne {
        inner: store.clone(),
        poisoned: Mutex::new(None),
        refusals: Mutex::new(0),
    });
    let client = Client::new(store.clone(), Arc::new(SystemClock));
    let ids: Vec<JobId> = client
        .enqueue_many(
            &(0..40)
                .map(|n| NewJob::new(Gate::KIND, json!({ "n": n })))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("enqueue")
        .iter()
        .map(|e| e.id)
        .collect();
    let poisoned = ids[17];
    *faulty.poisoned.lock().expect("lock") = Some(poisoned);

    let (open, gate) = tokio::sync::watch::channel(false);
    let mut registry = Registry::new();
    registry.register(Gate { open: gate });
    let mut queues = BTreeMap::new();
    queues.insert(DEFAULT_QUEUE.to_owned(), QueueConfig { concurrency: 100 });
    let config = EngineConfig {
        worker_id: common::unique_name("worker"),
        queues,
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        rescue_interval: Duration::from_millis(200),
        leader_renew_interval: Duration::from_millis(100),
        leader_ttl: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    let engine = Engine::start(faulty.clone(), registry, config, Arc::new(SystemClock));
    common::eventually("all 40 jobs running", || engine.in_flight() == 40).await;
    open.send_replace(true);

    // Everyone else completes although their batch held the refused completion.
    for &id in ids.iter().filter(|&&id| id != poisoned) {
        let job = common::wait_for_state(&*store, id, JobState::Completed).await;
        assert_eq!(job.attempt, 1);
    }
    // The refused one was bisected out, given up, rescued after its lease, and run again.
    let job = common::wait_for_state(&*store, poisoned, JobState::Completed).await;
    assert_eq!(job.attempt, 2, "run again after the rescue");
    assert!(
        job.errors
            .iter()
            .any(|e| e.message.contains("lease expired")),
        "{:?}",
        job.errors
    );
    assert!(*faulty.refusals.lock().expect("lock") >= 3);
    let report = engine.shutdown().await;
    assert_eq!(report.released, 0);
}
