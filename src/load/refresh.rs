//! Eager refresh ([`LoadOptions::eager_refresh`]): a value read past its refresh-at time is
//! reloaded before it expires, by one caller in the whole fleet, while every read goes on
//! being answered from the cache.
//!
//! The steps, each where the truth lives:
//!
//! 1. One refresh per key and service in this process: a table of the keys being refreshed
//!    (a caller that finds its key there leaves it to the one running).
//! 2. Read the stored value with its version ([`CacheService::lease`] answers
//!    [`LeaseRead::Value`] for a key that holds one, and changes nothing then).
//! 3. Claim: rewrite the stored frame with a claimed-until time, only if the key still holds
//!    exactly that version ([`CacheService::replace_if`]). A caller on another instance that
//!    reads the claimed frame does not refresh; one that raced to the same version loses the
//!    compare-and-set. The claim lives for the load timeout.
//! 4. Load, and store the result only if the key still holds the claimed frame: a `set`, an
//!    invalidation (of the key, its prefix, its tag), an expiry or an eviction in the
//!    meantime changed it, and then the reload is dropped, so a refresh can never put back
//!    a value that was invalidated while it ran.
//!
//! A reload that fails, times out or is dropped stores nothing: the value stays until its
//! TTL, as without eager refresh (and fail-safe applies from there).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{LazyLock, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::leader::{secs_ceil, stored_form};
use super::lease::{LeaseRead, LeaseRequest};
use super::{Frame, LoadOptions, LoadTtl, now_ms};
use crate::{CacheService, codec};

/// The keys being refreshed in this process, by service scope.
type Refreshing = Mutex<HashSet<(u64, Box<str>)>>;
static REFRESHING: LazyLock<Refreshing> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// This process's refresh of one key: removed from the table when dropped.
pub(crate) struct Slot {
    scope: u64,
    key: Box<str>,
}

impl Slot {
    /// The refresh of `key` in `scope`, unless one is running.
    pub(crate) fn take(scope: u64, key: &str) -> Option<Slot> {
        let mut table = REFRESHING.lock().unwrap_or_else(|p| p.into_inner());
        table.insert((scope, Box::from(key))).then(|| Slot {
            scope,
            key: Box::from(key),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = REFRESHING.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&(self.scope, std::mem::take(&mut self.key)));
    }
}

/// How many eager refreshes run now in this process (for tests: zero once all ended).
pub fn refreshes_in_flight() -> usize {
    REFRESHING.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Whether an eager refresh of `key` runs now on a cache whose
/// [`flight_scope`](crate::CacheService::flight_scope) is `scope` (for tests: other tests
/// of the process may be refreshing keys of their own meanwhile).
pub fn refresh_in_flight(scope: u64, key: &str) -> bool {
    REFRESHING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&(scope, Box::from(key)))
}

/// What one refresh call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refreshed {
    /// Another refresh of the key runs (here or on another instance), or it is no longer due.
    Skipped,
    /// The claim or the write-back found the key changed: nothing stored.
    Overtaken,
    /// The loader failed or timed out: nothing stored.
    Failed,
    /// The reloaded value (or a "not found") is stored.
    Stored,
}

/// Runs the eager refresh of `key` (see the module docs), holding this process's `slot` for
/// it ([`Slot::take`]). Never fails: a refresh that cannot run leaves the value as it is.
pub(crate) async fn run<S, T, E, F, Fut>(
    slot: Slot,
    cache: &S,
    key: &str,
    options: &LoadOptions,
    loader: F,
) -> Refreshed
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    let _slot = slot;
    let (frame, version) = match cache.lease(key, &LeaseRequest::new()).await {
        Ok(LeaseRead::Value { value, version }) if Frame::is_framed(&value) => {
            match Frame::decode(key, &value) {
                Ok(frame) => (frame, version),
                Err(_) => return Refreshed::Skipped,
            }
        }
        Ok(LeaseRead::Granted(mut lease)) => {
            // The key went away since the read: the next read loads it as a miss.
            if cache.release_lease(key, &lease).await.is_ok() {
                lease.disarm();
            }
            return Refreshed::Skipped;
        }
        _ => return Refreshed::Skipped,
    };
    let now = now_ms();
    if !frame.refresh_due(now) {
        return Refreshed::Skipped;
    }
    let timeout_ms = u64::try_from(options.load_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut claimed = frame.clone();
    claimed.claimed_until_ms = now.saturating_add(timeout_ms).min(frame.fresh_until_ms);
    let physical = secs_ceil(frame.stale_until_ms.saturating_sub(now));
    let claim = match cache
        .replace_if(key, &version, claimed.encode(), Some(physical))
        .await
    {
        Ok(Some(claim)) => claim,
        _ => return Refreshed::Overtaken,
    };

    let stored = match tokio::time::timeout(options.load_timeout, loader()).await {
        Ok(Ok(Some((value, ttl)))) => {
            let Ok(payload) = codec::encode_with(cache.codec(), key, &value) else {
                return Refreshed::Failed;
            };
            stored_form(options, ttl, &payload)
        }
        // Not found any more: a "not found" marker replaces the value (for the negative TTL,
        // or a second when negative caching is off, where readers do not trust it and load).
        Ok(Ok(None)) => {
            let secs = options.negative_ttl_secs.unwrap_or(1);
            let marker = Frame::absent(now_ms().saturating_add(secs.saturating_mul(1000)));
            Some((marker.encode(), Some(secs)))
        }
        Ok(Err(_)) | Err(_) => return Refreshed::Failed,
    };
    let Some((stored, ttl)) = stored else {
        // The loader asked for its value not to be stored (a token about to expire): the
        // claimed value stays until its own TTL.
        return Refreshed::Failed;
    };
    match cache.replace_if(key, &claim, stored, ttl).await {
        Ok(Some(_)) => {
            crate::observe::refresh_finished(true);
            Refreshed::Stored
        }
        Ok(None) => {
            crate::observe::refresh_finished(false);
            Refreshed::Overtaken
        }
        Err(_) => Refreshed::Failed,
    }
}
