//! Server-assisted invalidation: RESP3 `CLIENT TRACKING` (default mode, not BCAST) on the
//! connection that reads, so that the server tells this instance about any change to a key
//! it read (by any client, an expiry, an eviction, a flush), not only writes made through
//! cachet.
//!
//! - `NOLOOP`: this instance's own writes (which go through the same connection) are not
//!   echoed back; it applies them to its L1 itself, under the per-key version check.
//! - Pushes arrive on the reading connection but are handled by this task, so a fill whose
//!   read was sent before an invalidation of its key was handled is dropped by the per-key
//!   versions (the race of the Redis client-side caching docs: the reply and the
//!   invalidation for one key cross).
//! - Tracking is per connection and dies with it, and fred does not turn it on again after
//!   a reconnect (checked in fred 10.1.0's source: nothing re-sends `CLIENT TRACKING`). So on
//!   every reconnect or cluster topology change this task clears the L1, turns tracking on
//!   again on every connection, retrying with backoff (each failed round counted), and only
//!   then lets the L1 fill again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fred::interfaces::{EventInterface, TrackingInterface};
use fred::prelude::Client;
use fred::types::client::Invalidation;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::shared::Shared;
use crate::{CacheError, RedisCacheService};

pub(super) struct Tracking {
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Tracking {
    /// Turns tracking on for every connection of `l2` (which must speak RESP3) and starts
    /// listening. An error means the server refused it.
    pub(super) async fn start(
        shared: &Arc<Shared>,
        l2: &RedisCacheService,
        bound: Duration,
    ) -> Result<Tracking, CacheError> {
        enable(l2, bound).await?;
        let listeners = l2
            .clients()
            .into_iter()
            .map(|client| tokio::spawn(listen(Arc::clone(shared), l2.clone(), client, bound)))
            .collect();
        shared.coherence.set_confirmed(true);
        Ok(Tracking { listeners })
    }

    pub(super) fn stop(&self) {
        for listener in &self.listeners {
            listener.abort();
        }
    }
}

/// `CLIENT TRACKING ON NOLOOP` on every connection of `l2` (on a cluster, fred sends it to
/// every node).
async fn enable(l2: &RedisCacheService, bound: Duration) -> Result<(), CacheError> {
    for client in l2.clients() {
        let on = client.start_tracking(Vec::<String>::new(), false, false, false, true);
        match tokio::time::timeout(bound, on).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(CacheError::backend(
                    l2.server().to_owned(),
                    "client tracking",
                    "",
                    e,
                ));
            }
            Err(_) => {
                return Err(CacheError::backend(
                    l2.server().to_owned(),
                    "client tracking",
                    "",
                    format!("no answer to CLIENT TRACKING within {bound:?}"),
                ));
            }
        }
    }
    Ok(())
}

async fn listen(shared: Arc<Shared>, l2: RedisCacheService, client: Client, bound: Duration) {
    let mut invalidations = client.invalidation_rx();
    let mut reconnects = client.reconnect_rx();
    let mut changes = client.cluster_change_rx();
    loop {
        let lost = tokio::select! {
            invalidation = invalidations.recv() => match invalidation {
                Ok(invalidation) => {
                    apply(&shared, &l2, invalidation);
                    false
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    shared.reset();
                    false
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            reconnect = reconnects.recv() => match reconnect {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            change = changes.recv() => match change {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if lost {
            retrack(&shared, &l2, bound).await;
        }
    }
}

/// Drops the keys the server says changed (a flush: all of them).
fn apply(shared: &Shared, l2: &RedisCacheService, invalidation: Invalidation) {
    if invalidation.keys.is_empty() {
        shared.drop_all();
    } else {
        for key in &invalidation.keys {
            // Keys outside this service's namespace (or not UTF-8) are none of its own.
            if let Some(key) = key.as_str().and_then(|k| k.strip_prefix(l2.namespace())) {
                shared.drop_key(key);
            }
        }
    }
    shared.count_applied();
}

/// After a reconnect or topology change: the L1 goes, tracking goes on again (retried with
/// backoff, every failed round counted), and only then may the L1 fill.
async fn retrack(shared: &Shared, l2: &RedisCacheService, bound: Duration) {
    shared.reset_unconfirmed();
    let mut delay = Duration::from_millis(20);
    loop {
        match enable(l2, bound).await {
            Ok(()) => {
                shared.coherence.set_confirmed(true);
                return;
            }
            Err(_) => {
                shared.confirm_failures.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
