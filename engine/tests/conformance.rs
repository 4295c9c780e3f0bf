//! The store conformance suite: every test runs against PostgreSQL and SQLite.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use herald_engine::limit::Fallbacks;
use herald_engine::model::{AttemptError, Completion, JobFilter, Outcome};
use herald_engine::runtime::rescue_once;
use herald_engine::{JobState, NewJob, Store};
use serde_json::json;
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

fn job(n: i64) -> NewJob {
    NewJob::new("test.kind", json!({ "n": n }))
}

fn done(id: i64, attempt: i32, outcome: Outcome, at: DateTime<Utc>) -> Completion {
    Completion {
        id,
        attempt,
        outcome,
        errors: None,
        finished_at: at,
        effect: None,
    }
}

async fn claim(store: &dyn Store, limit: usize, now: DateTime<Utc>) -> Vec<herald_engine::Job> {
    store
        .claim("default", "w1", limit, now, now + secs(30))
        .await
        .expect("claim")
}

async fn state_of(store: &dyn Store, id: i64) -> JobState {
    store.get_job(id).await.expect("get").expect("exists").state
}

conformance!(
    enqueue_round_trips_every_field,
    future_jobs_are_scheduled_until_promoted,
    invalid_jobs_write_nothing,
    unique_key_returns_the_existing_job,
    unique_key_in_bulk,
    unique_key_race_between_processes,
    bulk_enqueue_100k_in_one_call,
    claims_follow_priority_then_time,
    claims_never_exceed_the_limit_or_double_claim,
    ordering_key_runs_one_at_a_time_in_order,
    completion_moves_job_to_archive,
    retry_and_snooze_transitions,
    discard_cancel_and_operator_retry,
    operator_discard,
    paused_queue_is_not_claimed,
    stale_completions_change_nothing,
    rescue_hands_back_expired_leases,
    heartbeat_keeps_the_lease,
    release_gives_back_without_counting,
    pruner_respects_retention,
    leader_election,
    fallback_board,
    stats_and_listing,
    wakeups_on_enqueue,
);

async fn enqueue_round_trips_every_field(store: Arc<dyn Store>) {
    let ws = Uuid::new_v4();
    let new = NewJob::new("send.text", json!({"to": "+15550001", "body": "hi ✓"}))
        .workspace(ws)
        .queue("messages")
        .priority(3)
        .max_attempts(7)
        .unique_key("u1")
        .rate_key("channel:1")
        .ordering_key("conv:9");
    let e = store.enqueue(&new, t0()).await.expect("enqueue");
    assert!(e.inserted);
    let j = store.get_job(e.id).await.expect("get").expect("exists");
    assert_eq!(j.workspace_id, ws);
    assert_eq!(j.kind, "send.text");
    assert_eq!(j.queue, "messages");
    assert_eq!(j.payload, json!({"to": "+15550001", "body": "hi ✓"}));
    assert_eq!(j.priority, 3);
    assert_eq!(j.state, JobState::Available);
    assert_eq!(j.run_at, t0());
    assert_eq!(j.created_at, t0());
    assert_eq!((j.attempt, j.max_attempts), (0, 7));
    assert_eq!(j.unique_key.as_deref(), Some("u1"));
    assert_eq!(j.rate_key.as_deref(), Some("channel:1"));
    assert_eq!(j.ordering_key.as_deref(), Some("conv:9"));
    assert!(j.errors.is_empty());
    assert!(store.get_job(e.id + 1000).await.expect("get").is_none());
}

async fn future_jobs_are_scheduled_until_promoted(store: Arc<dyn Store>) {
    let e = store
        .enqueue(&job(1).run_at(t0() + secs(60)), t0())
        .await
        .expect("enqueue");
    assert_eq!(state_of(&*store, e.id).await, JobState::Scheduled);
    assert_eq!(
        store.next_due("default").await.expect("next_due"),
        Some(t0() + secs(60))
    );
    assert!(claim(&*store, 10, t0() + secs(61)).await.is_empty());
    assert_eq!(
        store
            .promote("default", t0() + secs(59))
            .await
            .expect("promote"),
        0
    );
    assert_eq!(
        store
            .promote("default", t0() + secs(60))
            .await
            .expect("promote"),
        1
    );
    assert_eq!(state_of(&*store, e.id).await, JobState::Available);
    assert_eq!(store.next_due("default").await.expect("next_due"), None);
    assert_eq!(claim(&*store, 10, t0() + secs(61)).await.len(), 1);
}

async fn invalid_jobs_write_nothing(store: Arc<dyn Store>) {
    let jobs = vec![job(1), job(2).max_attempts(0), job(3)];
    assert!(store.enqueue_many(&jobs, t0()).await.is_err());
    // PostgreSQL cannot store NUL; both backends refuse it the same way, before writing.
    let mut jobs: Vec<NewJob> = (0..30_000).map(job).collect();
    jobs.push(NewJob::new("k", json!({ "text": "nul \u{0000} byte" })));
    assert!(matches!(
        store.enqueue_many(&jobs, t0()).await,
        Err(herald_engine::StoreError::Invalid(_))
    ));
    assert!(store
        .enqueue(&NewJob::new("", json!(1)), t0())
        .await
        .is_err());
    let all = store
        .list_jobs(&JobFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(all.is_empty(), "nothing written: {all:?}");
}

async fn unique_key_returns_the_existing_job(store: Arc<dyn Store>) {
    let ws = Uuid::new_v4();
    let a = store
        .enqueue(&job(1).workspace(ws).unique_key("k"), t0())
        .await
        .expect("enqueue");
    let b = store
        .enqueue(&job(2).workspace(ws).unique_key("k"), t0())
        .await
        .expect("second enqueue is not an error");
    assert!(a.inserted && !b.inserted);
    assert_eq!(a.id, b.id);
    // The key is per workspace.
    let other = store
        .enqueue(&job(3).workspace(Uuid::new_v4()).unique_key("k"), t0())
        .await
        .expect("enqueue");
    assert!(other.inserted && other.id != a.id);
    // A running job still holds the key.
    let claimed = claim(&*store, 10, t0()).await;
    assert_eq!(claimed.len(), 2);
    let c = store
        .enqueue(&job(4).workspace(ws).unique_key("k"), t0())
        .await
        .expect("enqueue");
    assert_eq!((c.id, c.inserted), (a.id, false));
    // Once finished, the key is free again.
    let att = claimed
        .iter()
        .find(|j| j.id == a.id)
        .map(|j| j.attempt)
        .unwrap_or(1);
    store
        .complete(&[done(a.id, att, Outcome::Completed, t0())])
        .await
        .expect("complete");
    let d = store
        .enqueue(&job(5).workspace(ws).unique_key("k"), t0())
        .await
        .expect("enqueue");
    assert!(d.inserted && d.id != a.id);
}

async fn unique_key_in_bulk(store: Arc<dyn Store>) {
    let held = store
        .enqueue(&job(0).unique_key("held"), t0())
        .await
        .expect("enqueue");
    let jobs = vec![
        job(1),
        job(2).unique_key("new"),
        job(3).unique_key("held"),
        job(4),
        job(5).unique_key("new"),
        job(6),
    ];
    let out = store.enqueue_many(&jobs, t0()).await.expect("bulk");
    assert_eq!(out.len(), 6);
    assert!(out[0].inserted && out[1].inserted && out[3].inserted && out[5].inserted);
    assert_eq!((out[2].id, out[2].inserted), (held.id, false));
    assert_eq!((out[4].id, out[4].inserted), (out[1].id, false));
    // Ids of inserted rows follow input order, and each id holds its own payload.
    assert!(out[0].id < out[1].id && out[1].id < out[3].id && out[3].id < out[5].id);
    for (i, e) in out.iter().enumerate() {
        if e.inserted {
            let j = store.get_job(e.id).await.expect("get").expect("exists");
            assert_eq!(j.payload, json!({ "n": i as i64 + 1 }));
        }
    }
}

async fn unique_key_race_between_processes(store: Arc<dyn Store>) {
    // Separate stores stand for separate processes: on PostgreSQL each has its own pool; SQLite
    // shares its one file between them.
    let mut handles = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..20 {
                let e = store
                    .enqueue(
                        &job(n * 100 + round).unique_key(format!("race-{round}")),
                        t0(),
                    )
                    .await
                    .expect("racing enqueue never errors");
                ids.push((round, e));
            }
            ids
        }));
    }
    let mut by_round: std::collections::HashMap<i64, Vec<herald_engine::Enqueued>> =
        Default::default();
    for h in handles {
        for (round, e) in h.await.expect("task") {
            by_round.entry(round).or_default().push(e);
        }
    }
    for (round, results) in by_round {
        let inserted = results.iter().filter(|e| e.inserted).count();
        assert_eq!(inserted, 1, "round {round}: exactly one insert");
        assert!(
            results.iter().all(|e| e.id == results[0].id),
            "round {round}: one id"
        );
    }
}

async fn bulk_enqueue_100k_in_one_call(store: Arc<dyn Store>) {
    let jobs: Vec<NewJob> = (0..100_000).map(job).collect();
    let out = store.enqueue_many(&jobs, t0()).await.expect("bulk");
    assert_eq!(out.len(), 100_000);
    assert!(out.windows(2).all(|w| w[0].id < w[1].id));
    let stats = store.stats().await.expect("stats");
    let available: i64 = stats
        .iter()
        .filter(|s| s.state == JobState::Available)
        .map(|s| s.count)
        .sum();
    assert_eq!(available, 100_000);
    let sample = store
        .get_job(out[54_321].id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(sample.payload, json!({ "n": 54_321 }));
}

async fn claims_follow_priority_then_time(store: Arc<dyn Store>) {
    let a = store
        .enqueue(&job(1).priority(5), t0())
        .await
        .expect("e")
        .id;
    let b = store
        .enqueue(&job(2).priority(1), t0() + secs(2))
        .await
        .expect("e")
        .id;
    let c = store
        .enqueue(&job(3).priority(1), t0() + secs(1))
        .await
        .expect("e")
        .id;
    let d = store
        .enqueue(&job(4).queue("other"), t0())
        .await
        .expect("e")
        .id;
    let got: Vec<i64> = claim(&*store, 10, t0() + secs(5))
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![c, b, a]);
    let j = store.get_job(a).await.expect("get").expect("exists");
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.attempt, 1);
    assert_eq!(j.attempted_by.as_deref(), Some("w1"));
    assert_eq!(j.lease_expires_at, Some(t0() + secs(35)));
    assert_eq!(state_of(&*store, d).await, JobState::Available);
}

async fn claims_never_exceed_the_limit_or_double_claim(store: Arc<dyn Store>) {
    let jobs: Vec<NewJob> = (0..2_000).map(job).collect();
    store.enqueue_many(&jobs, t0()).await.expect("bulk");
    let mut handles = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim("default", &format!("w{w}"), 37, t0(), t0() + secs(30))
                    .await
                    .expect("claim");
                assert!(got.len() <= 37);
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("task"));
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        (n, all.len()),
        (2_000, 2_000),
        "every job claimed exactly once"
    );
}

async fn ordering_key_runs_one_at_a_time_in_order(store: Arc<dyn Store>) {
    let ws = Uuid::new_v4();
    let a1 = store
        .enqueue(&job(1).workspace(ws).ordering_key("conv"), t0())
        .await
        .expect("e")
        .id;
    let a2 = store
        .enqueue(
            &job(2).workspace(ws).ordering_key("conv").priority(-5),
            t0(),
        )
        .await
        .expect("e")
        .id;
    let a3 = store
        .enqueue(&job(3).workspace(ws).ordering_key("conv"), t0())
        .await
        .expect("e")
        .id;
    let b1 = store
        .enqueue(&job(4).workspace(ws).ordering_key("other"), t0())
        .await
        .expect("e")
        .id;
    let c1 = store
        .enqueue(&job(5).workspace(Uuid::new_v4()).ordering_key("conv"), t0())
        .await
        .expect("e")
        .id;
    let free = store.enqueue(&job(6), t0()).await.expect("e").id;
    let mut got: Vec<i64> = claim(&*store, 100, t0())
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        vec![a1, b1, c1, free],
        "only the head of each key runs"
    );
    assert!(
        claim(&*store, 100, t0()).await.is_empty(),
        "a2 waits for a1"
    );
    // A failed head that will retry still holds back the rest of its key.
    store
        .complete(&[done(
            a1,
            1,
            Outcome::Retry {
                run_at: t0() + secs(10),
                error: "x".into(),
            },
            t0(),
        )])
        .await
        .expect("complete");
    assert!(
        claim(&*store, 100, t0()).await.is_empty(),
        "a2 still waits: a1 will retry"
    );
    store
        .promote("default", t0() + secs(10))
        .await
        .expect("promote");
    let got: Vec<i64> = claim(&*store, 100, t0() + secs(10))
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![a1]);
    store
        .complete(&[done(a1, 2, Outcome::Completed, t0())])
        .await
        .expect("complete");
    let got: Vec<i64> = claim(&*store, 100, t0() + secs(10))
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![a2]);
    store
        .complete(&[done(
            a2,
            1,
            Outcome::Discard {
                reason: "bad".into(),
            },
            t0(),
        )])
        .await
        .expect("complete");
    let got: Vec<i64> = claim(&*store, 100, t0() + secs(10))
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![a3], "a discarded job no longer holds the key");
}

async fn completion_moves_job_to_archive(store: Arc<dyn Store>) {
    let id = store.enqueue(&job(1), t0()).await.expect("e").id;
    let j = &claim(&*store, 1, t0()).await[0];
    let changed = store
        .complete(&[done(id, j.attempt, Outcome::Completed, t0() + secs(3))])
        .await
        .expect("complete");
    assert_eq!(changed, 1);
    let j = store
        .get_job(id)
        .await
        .expect("get")
        .expect("kept in archive");
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.finalized_at, Some(t0() + secs(3)));
    assert_eq!(j.payload, json!({"n": 1}));
    assert_eq!(j.attempt, 1);
}

async fn retry_and_snooze_transitions(store: Arc<dyn Store>) {
    let id = store
        .enqueue(&job(1).max_attempts(3), t0())
        .await
        .expect("e")
        .id;
    claim(&*store, 1, t0()).await;
    let err = AttemptError {
        at: t0(),
        attempt: 1,
        message: "boom".into(),
    };
    store
        .complete(&[Completion {
            id,
            attempt: 1,
            outcome: Outcome::Retry {
                run_at: t0() + secs(5),
                error: "boom".into(),
            },
            errors: Some(vec![err.clone()]),
            finished_at: t0(),
            effect: None,
        }])
        .await
        .expect("complete");
    let j = store.get_job(id).await.expect("get").expect("exists");
    assert_eq!(
        (j.state, j.attempt, j.run_at),
        (JobState::Retryable, 1, t0() + secs(5))
    );
    assert_eq!(j.errors, vec![err]);
    assert_eq!(j.lease_expires_at, None);
    assert_eq!(
        store.next_due("default").await.expect("due"),
        Some(t0() + secs(5))
    );
    store
        .promote("default", t0() + secs(5))
        .await
        .expect("promote");
    let j = &claim(&*store, 1, t0() + secs(5)).await[0];
    assert_eq!(j.attempt, 2);
    // Snooze: back to scheduled, the attempt not counted.
    store
        .complete(&[done(
            id,
            2,
            Outcome::Snooze {
                run_at: t0() + secs(60),
            },
            t0() + secs(5),
        )])
        .await
        .expect("complete");
    let j = store.get_job(id).await.expect("get").expect("exists");
    assert_eq!((j.state, j.attempt), (JobState::Scheduled, 1));
    assert_eq!(j.errors.len(), 1, "a snooze keeps the errors as they were");
    // A retry due at once is available at once.
    store
        .promote("default", t0() + secs(60))
        .await
        .expect("promote");
    claim(&*store, 1, t0() + secs(60)).await;
    store
        .complete(&[done(
            id,
            2,
            Outcome::Retry {
                run_at: t0() + secs(60),
                error: "now".into(),
            },
            t0() + secs(60),
        )])
        .await
        .expect("complete");
    assert_eq!(state_of(&*store, id).await, JobState::Available);
}

async fn discard_cancel_and_operator_retry(store: Arc<dyn Store>) {
    let a = store
        .enqueue(&job(1).unique_key("ua"), t0())
        .await
        .expect("e")
        .id;
    let b = store.enqueue(&job(2), t0()).await.expect("e").id;
    claim(&*store, 2, t0()).await;
    store
        .complete(&[
            done(
                a,
                1,
                Outcome::Discard {
                    reason: "payload broken".into(),
                },
                t0(),
            ),
            done(
                b,
                1,
                Outcome::Cancel {
                    reason: "user asked".into(),
                },
                t0(),
            ),
        ])
        .await
        .expect("complete");
    assert_eq!(state_of(&*store, a).await, JobState::Discarded);
    assert_eq!(state_of(&*store, b).await, JobState::Cancelled);
    // The operator retries the discarded job: available again with fresh attempts.
    let j = store
        .retry_job(a, t0() + secs(1))
        .await
        .expect("retry")
        .expect("retried");
    assert_eq!((j.state, j.attempt), (JobState::Available, 0));
    assert_eq!(j.run_at, t0() + secs(1));
    // Retrying a job that is not final-or-waiting does nothing.
    assert!(store.retry_job(a, t0()).await.expect("retry").is_none());
    // The operator cancels a waiting job; a running one cannot be cancelled this way.
    let j = store
        .cancel_job(a, t0() + secs(2), "no longer needed")
        .await
        .expect("cancel")
        .expect("cancelled");
    assert_eq!(j.state, JobState::Cancelled);
    assert!(j
        .errors
        .last()
        .is_some_and(|e| e.message.contains("no longer needed")));
    let c = store.enqueue(&job(3), t0()).await.expect("e").id;
    claim(&*store, 1, t0()).await;
    assert!(store
        .cancel_job(c, t0(), "x")
        .await
        .expect("cancel")
        .is_none());
    assert_eq!(state_of(&*store, c).await, JobState::Running);
    // A final job whose unique key is held again cannot come back (it would break uniqueness).
    store
        .enqueue(&job(4).unique_key("ua"), t0())
        .await
        .expect("e");
    assert!(store.retry_job(a, t0()).await.expect("retry").is_none());
    assert_eq!(state_of(&*store, a).await, JobState::Cancelled);
}

async fn operator_discard(store: Arc<dyn Store>) {
    let a = store.enqueue(&job(1), t0()).await.expect("e").id;
    let j = store
        .discard_job(a, t0() + secs(1), "bad payload")
        .await
        .expect("discard")
        .expect("discarded");
    assert_eq!(j.state, JobState::Discarded);
    assert_eq!(j.finalized_at, Some(t0() + secs(1)));
    assert!(j
        .errors
        .last()
        .is_some_and(|e| e.message == "discarded: bad payload"));
    assert!(claim(&*store, 10, t0() + secs(2)).await.is_empty());
    // Final jobs and running ones are left alone; unknown ids too.
    assert!(store
        .discard_job(a, t0(), "again")
        .await
        .expect("d")
        .is_none());
    let b = store.enqueue(&job(2), t0()).await.expect("e").id;
    claim(&*store, 1, t0()).await;
    assert!(store.discard_job(b, t0(), "x").await.expect("d").is_none());
    assert_eq!(state_of(&*store, b).await, JobState::Running);
    assert!(store
        .discard_job(b + 1000, t0(), "x")
        .await
        .expect("d")
        .is_none());
    // A scheduled job can be discarded, and an operator may bring a discarded job back.
    let c = store
        .enqueue(&job(3).run_at(t0() + secs(60)), t0())
        .await
        .expect("e")
        .id;
    store
        .discard_job(c, t0(), "x")
        .await
        .expect("d")
        .expect("discarded");
    let again = store
        .retry_job(c, t0())
        .await
        .expect("retry")
        .expect("retried");
    assert_eq!((again.state, again.attempt), (JobState::Available, 0));
}

async fn paused_queue_is_not_claimed(store: Arc<dyn Store>) {
    let a = store
        .enqueue(&job(1).rate_key("channel:1"), t0())
        .await
        .expect("e")
        .id;
    let b = store.enqueue(&job(2), t0()).await.expect("e").id;
    store
        .enqueue(&job(3).queue("other"), t0())
        .await
        .expect("e");
    assert!(store
        .pause_queue("default", "maintenance", t0())
        .await
        .expect("pause"));
    // Pausing twice keeps the first reason.
    assert!(!store
        .pause_queue("default", "again", t0() + secs(1))
        .await
        .expect("pause"));
    assert_eq!(
        store.paused_queues().await.expect("list"),
        vec![herald_engine::PausedQueue {
            queue: "default".into(),
            paused_at: t0(),
            reason: "maintenance".into(),
        }]
    );
    assert!(claim(&*store, 10, t0()).await.is_empty());
    for scope in [
        herald_engine::store::RateScope::Unlimited,
        herald_engine::store::RateScope::Key("channel:1"),
    ] {
        let got = store
            .claim_scoped("default", scope, "w1", 10, t0(), t0() + secs(30))
            .await
            .expect("claim");
        assert!(got.is_empty(), "a paused queue's jobs are not claimed");
    }
    assert!(store
        .ready_rate_keys("default", None, 10)
        .await
        .expect("keys")
        .is_empty());
    // Other queues go on.
    let other = store
        .claim("other", "w1", 10, t0(), t0() + secs(30))
        .await
        .expect("claim");
    assert_eq!(other.len(), 1);
    // Bad input is refused and changes nothing.
    assert!(store.pause_queue("", "x", t0()).await.is_err());
    assert!(store
        .pause_queue("q", &"x".repeat(501), t0())
        .await
        .is_err());
    assert_eq!(store.paused_queues().await.expect("list").len(), 1);
    // Resuming wakes the queue's producers and lets claims through.
    let signal = store.wakeups().signal("default");
    assert!(store.resume_queue("default").await.expect("resume"));
    assert!(!store.resume_queue("default").await.expect("resume"));
    tokio::time::timeout(Duration::from_secs(1), signal.notify.notified())
        .await
        .expect("resume wakes the producers");
    let ids: Vec<i64> = claim(&*store, 10, t0())
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![a, b]);
    assert!(store.paused_queues().await.expect("list").is_empty());
}

async fn stale_completions_change_nothing(store: Arc<dyn Store>) {
    let id = store.enqueue(&job(1), t0()).await.expect("e").id;
    claim(&*store, 1, t0()).await;
    // Rescued (attempt 1 lost), then claimed again as attempt 2.
    rescue_once(&*store, t0() + secs(31)).await.expect("rescue");
    claim(&*store, 1, t0() + secs(31)).await;
    let changed = store
        .complete(&[done(id, 1, Outcome::Completed, t0() + secs(32))])
        .await
        .expect("complete");
    assert_eq!(changed, 0, "the first claim's late completion is ignored");
    assert_eq!(state_of(&*store, id).await, JobState::Running);
    assert_eq!(
        store
            .heartbeat(&[(id, 1)], t0() + secs(100))
            .await
            .expect("hb"),
        0
    );
    assert_eq!(store.release(&[(id, 1)], t0()).await.expect("release"), 0);
    let changed = store
        .complete(&[done(id, 2, Outcome::Completed, t0() + secs(32))])
        .await
        .expect("complete");
    assert_eq!(changed, 1);
}

async fn rescue_hands_back_expired_leases(store: Arc<dyn Store>) {
    let a = store
        .enqueue(&job(1).max_attempts(2), t0())
        .await
        .expect("e")
        .id;
    let b = store
        .enqueue(&job(2).max_attempts(1), t0())
        .await
        .expect("e")
        .id;
    claim(&*store, 2, t0()).await; // leases until t0 + 30 s
    let r = rescue_once(&*store, t0() + secs(30)).await.expect("rescue");
    assert_eq!((r.retried, r.discarded), (0, 0), "leases not yet expired");
    let r = rescue_once(&*store, t0() + secs(31)).await.expect("rescue");
    assert_eq!((r.retried, r.discarded), (1, 1));
    let ja = store.get_job(a).await.expect("get").expect("exists");
    assert_eq!(
        (ja.state, ja.attempt),
        (JobState::Available, 1),
        "the lost attempt counts"
    );
    assert!(ja.errors[0].message.contains("lease expired"));
    assert_eq!(state_of(&*store, b).await, JobState::Discarded);
}

async fn heartbeat_keeps_the_lease(store: Arc<dyn Store>) {
    let id = store.enqueue(&job(1), t0()).await.expect("e").id;
    claim(&*store, 1, t0()).await;
    assert_eq!(
        store
            .heartbeat(&[(id, 1)], t0() + secs(90))
            .await
            .expect("hb"),
        1
    );
    let r = rescue_once(&*store, t0() + secs(60)).await.expect("rescue");
    assert_eq!((r.retried, r.discarded), (0, 0));
    assert_eq!(state_of(&*store, id).await, JobState::Running);
}

async fn release_gives_back_without_counting(store: Arc<dyn Store>) {
    let id = store.enqueue(&job(1), t0()).await.expect("e").id;
    claim(&*store, 1, t0()).await;
    assert_eq!(store.release(&[(id, 1)], t0()).await.expect("release"), 1);
    let j = store.get_job(id).await.expect("get").expect("exists");
    assert_eq!((j.state, j.attempt), (JobState::Available, 0));
}

async fn pruner_respects_retention(store: Arc<dyn Store>) {
    let ids: Vec<i64> = store
        .enqueue_many(&(0..4).map(job).collect::<Vec<_>>(), t0())
        .await
        .expect("bulk")
        .iter()
        .map(|e| e.id)
        .collect();
    claim(&*store, 4, t0()).await;
    store
        .complete(&[
            done(ids[0], 1, Outcome::Completed, t0()),
            done(ids[1], 1, Outcome::Completed, t0() + secs(100)),
            done(ids[2], 1, Outcome::Discard { reason: "x".into() }, t0()),
        ])
        .await
        .expect("complete");
    // Completed before t0+50 go; discarded before t0-1000 go (none).
    let n = store
        .prune(t0() + secs(50), t0() - secs(1000), 1)
        .await
        .expect("prune");
    assert_eq!(n, 1);
    assert_eq!(
        store
            .prune(t0() + secs(50), t0() - secs(1000), 10)
            .await
            .expect("prune"),
        0
    );
    assert!(store.get_job(ids[0]).await.expect("get").is_none());
    assert_eq!(state_of(&*store, ids[1]).await, JobState::Completed);
    assert_eq!(state_of(&*store, ids[2]).await, JobState::Discarded);
    assert_eq!(
        state_of(&*store, ids[3]).await,
        JobState::Running,
        "unfinished jobs are never pruned"
    );
    assert_eq!(
        store.prune(t0(), t0() + secs(1), 10).await.expect("prune"),
        1
    );
    assert!(store.get_job(ids[2]).await.expect("get").is_none());
}

async fn leader_election(store: Arc<dyn Store>) {
    let ttl = secs(15);
    assert!(store
        .try_lead("m", "a", t0(), t0() + ttl)
        .await
        .expect("lead"));
    assert!(!store
        .try_lead("m", "b", t0() + secs(5), t0() + secs(5) + ttl)
        .await
        .expect("lead"));
    assert!(store
        .try_lead("m", "a", t0() + secs(5), t0() + secs(5) + ttl)
        .await
        .expect("renew"));
    assert!(!store
        .try_lead("m", "b", t0() + secs(19), t0() + secs(19) + ttl)
        .await
        .expect("lead"));
    assert!(store
        .try_lead("m", "b", t0() + secs(21), t0() + secs(21) + ttl)
        .await
        .expect("takeover"));
    assert!(!store
        .try_lead("m", "a", t0() + secs(22), t0() + secs(22) + ttl)
        .await
        .expect("lead"));
    store
        .resign("m", "a")
        .await
        .expect("resign of a non-leader is harmless");
    assert!(!store
        .try_lead("m", "a", t0() + secs(22), t0() + secs(22) + ttl)
        .await
        .expect("lead"));
    store.resign("m", "b").await.expect("resign");
    assert!(store
        .try_lead("m", "a", t0() + secs(23), t0() + secs(23) + ttl)
        .await
        .expect("lead after resign"));
}

/// The fail-safe limiter's board: each process sees the others' unexpired shares and their
/// number, not its own; a renewal replaces, a withdrawal of the same period removes (a late
/// one of an earlier period does not), an announcement expires by itself.
async fn fallback_board(store: Arc<dyn Store>) {
    let long = Duration::from_secs(60);
    let seen = |share: f64, processes: u32| Fallbacks { share, processes };
    assert_eq!(others(&*store, "a").await, seen(0.0, 0));
    store
        .announce_fallback("a", 1, 0.25, long)
        .await
        .expect("a");
    store
        .announce_fallback("b", 1, 0.125, long)
        .await
        .expect("b");
    assert_eq!(others(&*store, "a").await, seen(0.125, 1));
    assert_eq!(others(&*store, "b").await, seen(0.25, 1));
    assert_eq!(others(&*store, "c").await, seen(0.375, 2));
    // A renewal replaces the share, it does not add.
    store
        .announce_fallback("a", 1, 0.5, long)
        .await
        .expect("renew");
    assert_eq!(others(&*store, "c").await, seen(0.625, 2));
    // A withdrawal of period 1 that arrives after period 2 was announced removes nothing.
    store
        .announce_fallback("a", 2, 0.5, long)
        .await
        .expect("period 2");
    store
        .withdraw_fallback("a", 1)
        .await
        .expect("late withdraw");
    assert_eq!(others(&*store, "c").await, seen(0.625, 2));
    // Nor does a late announcement of period 1 replace period 2's.
    store
        .announce_fallback("a", 1, 0.0625, long)
        .await
        .expect("late announcement");
    assert_eq!(others(&*store, "c").await, seen(0.625, 2));
    store.withdraw_fallback("a", 2).await.expect("withdraw");
    store
        .withdraw_fallback("a", 2)
        .await
        .expect("withdraw twice");
    assert_eq!(others(&*store, "c").await, seen(0.125, 1));
    // Expiry is by the store's clock, so this test waits for it.
    store
        .announce_fallback("d", 1, 0.25, Duration::from_secs(1))
        .await
        .expect("d");
    assert_eq!(others(&*store, "c").await, seen(0.375, 2));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(others(&*store, "c").await, seen(0.125, 1));
    // A renewal after expiry counts again.
    store
        .announce_fallback("d", 1, 0.25, long)
        .await
        .expect("d again");
    assert_eq!(others(&*store, "c").await, seen(0.375, 2));
}

/// The board as process `p` reads it.
async fn others(store: &dyn Store, p: &str) -> Fallbacks {
    store.fallback_shares(p).await.expect("read the board")
}

async fn stats_and_listing(store: Arc<dyn Store>) {
    let ws = Uuid::new_v4();
    let ids: Vec<i64> = store
        .enqueue_many(
            &(0..5).map(|n| job(n).workspace(ws)).collect::<Vec<_>>(),
            t0(),
        )
        .await
        .expect("bulk")
        .iter()
        .map(|e| e.id)
        .collect();
    store
        .enqueue(&job(9).queue("other"), t0())
        .await
        .expect("e");
    claim(&*store, 2, t0()).await;
    store
        .complete(&[done(ids[0], 1, Outcome::Completed, t0())])
        .await
        .expect("complete");
    let stats = store.stats().await.expect("stats");
    let count = |q: &str, s: JobState| {
        stats
            .iter()
            .find(|x| x.queue == q && x.state == s)
            .map(|x| x.count)
            .unwrap_or(0)
    };
    assert_eq!(count("default", JobState::Available), 3);
    assert_eq!(count("default", JobState::Running), 1);
    assert_eq!(count("default", JobState::Completed), 1);
    assert_eq!(count("other", JobState::Available), 1);
    let page1 = store
        .list_jobs(&JobFilter {
            workspace_id: Some(ws),
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page1.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids[..2].to_vec()
    );
    let page2 = store
        .list_jobs(&JobFilter {
            workspace_id: Some(ws),
            limit: 10,
            after_id: Some(ids[1]),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page2.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    let done_only = store
        .list_jobs(&JobFilter {
            state: Some(JobState::Completed),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        done_only.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let other_ws = store
        .list_jobs(&JobFilter {
            workspace_id: Some(Uuid::new_v4()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(other_ws.is_empty());
}

async fn wakeups_on_enqueue(store: Arc<dyn Store>) {
    let signal = store.wakeups().signal("default");
    store.enqueue(&job(1), t0()).await.expect("e");
    tokio::time::timeout(Duration::from_secs(1), signal.notify.notified())
        .await
        .expect("an enqueue wakes the queue's producer");
    store
        .enqueue(&job(2).run_at(t0() + secs(30)), t0())
        .await
        .expect("e");
    tokio::time::timeout(Duration::from_secs(1), signal.notify.notified())
        .await
        .expect("a scheduled enqueue wakes it too");
    assert_eq!(signal.take_next_due(), Some(t0() + secs(30)));
}
