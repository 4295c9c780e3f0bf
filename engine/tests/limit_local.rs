//! `LocalLimiter`: the admission property on a fake clock (proptest), utilisation, a
//! multi-threaded check on the real clock, and the cost of one acquire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use herald_engine::limit::{Limiter, LimiterMode, LocalLimiter, Rate};
use proptest::prelude::*;

/// Checks that in every window `[t_i, t_j]` the permits granted stay within
/// `per_second * (t_j - t_i) + burst + 1` (the +1: a permit that falls due exactly on the
/// window's edge). `events` are (time in ns, permits), sorted by time.
fn check_windows(events: &[(u64, u32)], per_second: f64, burst: u32) -> Result<(), String> {
    let mut prefix = Vec::with_capacity(events.len() + 1);
    prefix.push(0u64);
    for (_, g) in events {
        prefix.push(prefix.last().copied().unwrap_or(0) + u64::from(*g));
    }
    for i in 0..events.len() {
        // Start each window at the first event of its instant, so all of them count.
        if i > 0 && events[i - 1].0 == events[i].0 {
            continue;
        }
        for j in i..events.len() {
            let granted = prefix[j + 1] - prefix[i];
            let width = (events[j].0 - events[i].0) as f64 / 1e9;
            let bound = per_second * width + f64::from(burst) + 1.0;
            if granted as f64 > bound {
                return Err(format!(
                    "{granted} permits in {width:.9} s (window {i}..={j}) > {bound:.3} \
                     at {per_second}/s burst {burst}"
                ));
            }
        }
    }
    Ok(())
}

/// A step of the caller: how far to move the clock, in emission intervals, then how many to ask.
fn steps() -> impl Strategy<Value = Vec<(f64, u32)>> {
    let advance = prop_oneof![
        3 => Just(0.0),
        3 => 0.0..0.2f64,
        6 => 0.0..3.0f64,
        1 => 0.0..150.0f64,
    ];
    prop::collection::vec((advance, 1u32..50), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_admits_more_than_the_rate(
        per_second in 0.5f64..5000.0,
        burst in 1u32..100,
        steps in steps(),
    ) {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let rate = Rate { per_second, burst };
        let interval_ns = 1e9 / per_second;
        let mut now = 0u64;
        let mut events = Vec::new();
        for (advance, want) in steps {
            let by = (advance * interval_ns) as u64;
            clock.advance(Duration::from_nanos(by));
            now += by;
            let grant = limiter.acquire_now("k", rate, want);
            prop_assert!(grant.granted <= want);
            if grant.granted < want {
                prop_assert!(grant.next_in > Duration::ZERO, "refused with nothing to wait for");
            }
            if grant.granted > 0 {
                events.push((now, grant.granted));
            }
        }
        if let Err(e) = check_windows(&events, per_second, burst) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn a_caller_that_always_asks_gets_the_rate(
        per_second in 0.5f64..5000.0,
        burst in 1u32..100,
        advances in prop::collection::vec(0.0..=1.0f64, 100..2000),
    ) {
        // "Always asks": at least once every `burst - 1` intervals (the tolerance tau). A
        // caller that drained the bucket finds it full again no sooner than that, so nothing
        // accrues beyond it and is lost. With a burst of 1 there is no tolerance, and any
        // lateness is lost: that caller asks every half percent of an interval at most.
        let gap = f64::from(burst - 1).max(0.005);
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let rate = Rate { per_second, burst };
        let interval_ns = 1e9 / per_second;
        let mut now = 0u64;
        let mut total = u64::from(limiter.acquire_now("k", rate, u32::MAX).granted);
        for advance in advances {
            let by = (advance * gap * interval_ns) as u64;
            clock.advance(Duration::from_nanos(by));
            now += by;
            let grant = limiter.acquire_now("k", rate, u32::MAX);
            // Asking for everything leaves nothing free.
            prop_assert!(grant.next_in > Duration::ZERO);
            total += u64::from(grant.granted);
        }
        let ideal = per_second * now as f64 / 1e9 + f64::from(burst);
        prop_assert!(
            total as f64 >= 0.99 * ideal - 1.0,
            "granted {} of an ideal {:.1}", total, ideal
        );
        prop_assert!(total as f64 <= ideal + 1.0, "granted {} of an ideal {:.1}", total, ideal);
    }

    #[test]
    fn refunds_right_after_acquire_never_exceed_the_rate(
        per_second in 0.5f64..5000.0,
        burst in 1u32..100,
        steps in steps(),
        unused in prop::collection::vec(0u32..50, 300),
    ) {
        // The dispatcher's pattern: take `want`, use some, hand the rest back at once. Only
        // the permits used count against the rate.
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let rate = Rate { per_second, burst };
        let interval_ns = 1e9 / per_second;
        let mut now = 0u64;
        let mut events = Vec::new();
        for ((advance, want), unused) in steps.into_iter().zip(unused) {
            let by = (advance * interval_ns) as u64;
            clock.advance(Duration::from_nanos(by));
            now += by;
            let grant = limiter.acquire_now("k", rate, want);
            let back = unused.min(grant.granted);
            limiter.refund_now("k", rate, back);
            if grant.granted > back {
                events.push((now, grant.granted - back));
            }
        }
        if let Err(e) = check_windows(&events, per_second, burst) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn threads_sharing_a_key_on_the_real_clock_stay_within_the_rate() {
    let limiter = Arc::new(LocalLimiter::new());
    let rate = Rate {
        per_second: 20_000.0,
        burst: 1000,
    };
    let start = Instant::now();
    let run_for = Duration::from_millis(300);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let limiter = Arc::clone(&limiter);
            std::thread::spawn(move || {
                let mut total = 0u64;
                while start.elapsed() < run_for {
                    total += u64::from(limiter.acquire_now("shared", rate, 3).granted);
                }
                total
            })
        })
        .collect();
    let total: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("a limiter thread panicked"))
        .sum();
    let elapsed = start.elapsed().as_secs_f64();
    let bound = rate.per_second * elapsed + f64::from(rate.burst) + 1.0;
    assert!(
        total as f64 <= bound,
        "{total} permits in {elapsed:.3} s > {bound:.1}"
    );
    // A sanity check only (utilisation is checked exactly on the fake clock): on a loaded
    // machine the threads may not run for longer than a bucket lasts.
    assert!(
        total as f64 >= 0.5 * rate.per_second * run_for.as_secs_f64(),
        "only {total} permits in {elapsed:.3} s"
    );
}

#[tokio::test]
async fn implements_the_limiter_trait() {
    let limiter: Arc<dyn Limiter> = Arc::new(LocalLimiter::new());
    let rate = Rate {
        per_second: 1.0,
        burst: 4,
    };
    assert_eq!(limiter.acquire("k", rate, 3).await.granted, 3);
    limiter.refund("k", rate, 2).await;
    assert_eq!(limiter.acquire("k", rate, 9).await.granted, 3);
    assert_eq!(limiter.status().mode, LimiterMode::Local);
}

/// Prints the cost of `acquire_now` (run with `--nocapture`; numbers are for the profile the
/// test was built with, so build with `--release` for the real figure).
#[test]
fn timing_local_acquire() {
    let limiter = LocalLimiter::new();
    let keys: Vec<String> = (0..1000).map(|i| format!("wa:{i}")).collect();
    let open = Rate {
        per_second: 1e9,
        burst: 1_000_000,
    };
    let tight = Rate {
        per_second: 10.0,
        burst: 5,
    };
    let rounds = 200_000;
    for (name, rate) in [("granting", open), ("refusing", tight)] {
        let start = Instant::now();
        let mut granted = 0u64;
        for i in 0..rounds {
            granted += u64::from(limiter.acquire_now(&keys[i % keys.len()], rate, 4).granted);
        }
        let per = start.elapsed() / rounds as u32;
        println!(
            "LocalLimiter::acquire_now, 1000 keys, want 4, {name}: {per:?} per call \
             ({granted} granted; debug_assertions={})",
            cfg!(debug_assertions)
        );
    }
}
