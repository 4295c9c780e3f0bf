//! Admission: how many jobs of a rate key may start now.
//!
//! The engine knows rate keys only as strings on jobs. What a key means (a channel and its
//! limits, whether it is paused) is the delivery layer's business: it implements [`Admission`]
//! on top of a [`crate::limit::Limiter`], and the engine's rate-limited producer asks it before
//! every claim of a key's jobs.
//!
//! Architecture invariant: a job with a rate key is claimed only with a permit in hand. The
//! producer asks for permits first and claims at most as many jobs as it was granted, so no
//! worker slot ever waits for a permit and no job is claimed only to be put back.

use std::time::Duration;

use async_trait::async_trait;

use crate::limit::Grant;

#[async_trait]
pub trait Admission: Send + Sync + 'static {
    /// Up to `want` permits for `rate_key` now, and how long until the next one is free. A key
    /// that may not send at all (a paused channel) grants nothing, with the time to look again.
    async fn acquire(&self, rate_key: &str, want: u32) -> Grant;

    /// [`Admission::acquire`] for several keys, the grants in the order of `asks`: the producer
    /// asks for every due key of a round at once, so that permits shared through Redis cost one
    /// round trip a round, and the first key's permits do not wait on the others' round trips
    /// before they are used. One after another by default.
    async fn acquire_many(&self, asks: &[(&str, u32)]) -> Vec<Grant> {
        let mut grants = Vec::with_capacity(asks.len());
        for (key, want) in asks {
            grants.push(self.acquire(key, *want).await);
        }
        grants
    }

    /// Hands back permits granted by `acquire` for which no job was found.
    async fn refund(&self, rate_key: &str, n: u32);

    /// The highest priority number (lowest urgency) of `rate_key`'s jobs that may start now;
    /// None: all of them. A channel whose broadcasts are paused still sends its replies.
    async fn max_priority(&self, _rate_key: &str) -> Option<i16> {
        None
    }

    /// The process stops dispatching (graceful shutdown): gives up what it holds in state
    /// shared with other processes, so that they see it gone at once rather than after a
    /// timeout. Nothing by default.
    async fn leave(&self) {}
}

/// Grants everything at once: rate keys are then only labels. For tests and for processes that
/// must not be limited.
pub struct Unlimited;

#[async_trait]
impl Admission for Unlimited {
    async fn acquire(&self, _rate_key: &str, want: u32) -> Grant {
        Grant {
            granted: want,
            next_in: Duration::ZERO,
        }
    }

    async fn refund(&self, _rate_key: &str, _n: u32) {}
}
