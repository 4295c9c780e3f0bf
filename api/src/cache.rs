//! A short-lived cache of channels for the webhook path: at thousands of deliveries a second,
//! one database lookup per request would cost more than storing the delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_engine::delivery::Channel;
use herald_engine::Store;
use tokio::sync::RwLock;
use uuid::Uuid;

/// Settings of the [`ChannelCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelCacheConfig {
    /// A found channel is reused this long: a new app secret or verify token takes effect
    /// within it (and at once in the process that changed it, which calls `forget`).
    pub ttl: Duration,
    /// An unknown id is remembered this long, so a flood of requests for made-up ids costs one
    /// lookup each per period, not one per request.
    pub negative_ttl: Duration,
    /// Entries kept at most; the cache is cleared when full.
    pub max_entries: usize,
}

impl Default for ChannelCacheConfig {
    fn default() -> Self {
        ChannelCacheConfig {
            ttl: Duration::from_secs(5),
            negative_ttl: Duration::from_secs(1),
            max_entries: 100_000,
        }
    }
}

/// When it was loaded, and the channel (None: it does not exist).
type Entry = (Instant, Option<Arc<Channel>>);

/// Channels by id.
pub struct ChannelCache {
    store: Arc<dyn Store>,
    config: ChannelCacheConfig,
    entries: RwLock<HashMap<Uuid, Entry>>,
}

impl ChannelCache {
    pub fn new(store: Arc<dyn Store>, config: ChannelCacheConfig) -> Self {
        ChannelCache {
            store,
            config,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The channel, or None when it does not exist or cannot be loaded (logged).
    pub async fn get(&self, id: Uuid) -> Option<Arc<Channel>> {
        if let Some((at, entry)) = self.entries.read().await.get(&id) {
            let ttl = if entry.is_some() {
                self.config.ttl
            } else {
                self.config.negative_ttl
            };
            if at.elapsed() < ttl {
                return entry.clone();
            }
        }
        let loaded = match self.store.delivery().channel(id).await {
            Ok(c) => c.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, channel = %id, "cannot load the channel");
                return None;
            }
        };
        let mut entries = self.entries.write().await;
        if entries.len() >= self.config.max_entries {
            entries.clear();
        }
        entries.insert(id, (Instant::now(), loaded.clone()));
        loaded
    }

    /// Drops a channel's entry (it changed or was deleted in this process).
    pub async fn forget(&self, id: Uuid) {
        self.entries.write().await.remove(&id);
    }
}
