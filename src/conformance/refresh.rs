//! Eager refresh and the soft timeout on any service: a value past its refresh point is
//! served and reloaded once, the reload never overwrites a `set` nor undoes an
//! invalidation that happened while it ran, and [`replace_if`](crate::CacheService::replace_if)
//! (the compare-and-set it rests on) replaces exactly the version seen.
//!
//! TTLs are whole seconds, so these checks sleep past a refresh point (1 s into a 4 s TTL):
//! the 3 s left are the margin of a slow machine, never a timing assert.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::sync::Notify;

use super::OrgContext;
use super::load::load_ok;
use crate::load::{LeaseRead, LeaseRequest};
use crate::{CacheService, CacheServiceExt, LoadOptions, LoadSource};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

/// A 4 s TTL refreshed from 1 s on.
fn options() -> LoadOptions {
    LoadOptions::default().ttl_secs(4).eager_refresh(0.25)
}

/// Past the refresh point of a value just loaded with [`options`], well before its end.
const PAST_REFRESH_POINT: Duration = Duration::from_millis(1_200);

/// The loaders' error.
#[derive(Debug)]
struct StoreDown;

impl std::fmt::Display for StoreDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("store down")
    }
}

impl std::error::Error for StoreDown {}

/// Loads `value` under `key` with [`options`] (a miss), and checks it was the loader's.
async fn load_first(cache: &dyn CacheService, key: &str, value: OrgContext) {
    let loaded = cache
        .get_or_load_with(key, &options(), || async {
            Ok::<_, StoreDown>(Some(value))
        })
        .await;
    assert_eq!(load_ok("first load", loaded).source, LoadSource::Loader);
}

/// A hit past the refresh point answers with the cached value and reloads it once; the
/// next reads see the reloaded value, with no loader call of their own.
pub async fn eager_refresh_reloads_before_expiry(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:refresh");
    load_first(cache, &key, OrgContext::sample(1)).await;
    let loads = AtomicUsize::new(0);
    let reload = |n| {
        let loads = &loads;
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(Some(OrgContext::sample(n)))
        }
    };
    // Before the refresh point: a plain hit.
    let hit = load_ok(
        "hit",
        cache.get_or_load_with(&key, &options(), reload(2)).await,
    );
    assert_eq!(
        (hit.value, hit.source),
        (Some(OrgContext::sample(1)), LoadSource::Cache)
    );
    assert_eq!(
        loads.load(Ordering::SeqCst),
        0,
        "a hit before the refresh point"
    );

    tokio::time::sleep(PAST_REFRESH_POINT).await;
    let served = load_ok(
        "due",
        cache.get_or_load_with(&key, &options(), reload(2)).await,
    );
    assert_eq!(
        (served.value, served.source),
        (Some(OrgContext::sample(1)), LoadSource::Cache),
        "a hit past the refresh point is answered from the cache"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one reload");
    let after = load_ok(
        "after",
        cache.get_or_load_with(&key, &options(), reload(3)).await,
    );
    assert_eq!(
        (after.value, after.source),
        (Some(OrgContext::sample(2)), LoadSource::Cache),
        "the reloaded value replaced the old one"
    );
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "a fresh reloaded value is a hit"
    );
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(OrgContext::sample(2)),
        "typed reads see the reloaded value"
    );
    // This key's refresh ended (other tests of the process may be refreshing their own).
    assert!(!crate::load::refresh_in_flight(cache.flight_scope(), &key));
}

/// Many hits past the refresh point at once: one reload.
pub async fn eager_refresh_runs_once_for_concurrent_hits(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:refresh-once");
    load_first(cache, &key, OrgContext::sample(1)).await;
    tokio::time::sleep(PAST_REFRESH_POINT).await;
    let loads = AtomicUsize::new(0);
    let reload = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, StoreDown>(Some(OrgContext::sample(2)))
    };
    let options = options();
    let callers = join_all((0..50).map(|_| cache.get_or_load_with(&key, &options, reload)));
    let results = tokio::time::timeout(HANG, callers)
        .await
        .expect("the callers finished (bound on a hang)");
    for loaded in results {
        let loaded = load_ok("concurrent hit", loaded);
        assert_eq!(loaded.source, LoadSource::Cache);
        assert!(
            matches!(&loaded.value, Some(v) if *v == OrgContext::sample(1) || *v == OrgContext::sample(2)),
            "{:?}",
            loaded.value
        );
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "50 hits past the refresh point: one reload"
    );
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(OrgContext::sample(2))
    );
}

/// What a write made while a refresh's loader runs does to the refresh.
enum Meanwhile {
    Invalidate,
    Set(Box<OrgContext>),
}

/// Runs a refresh of `key` whose loader waits until `meanwhile` is done, and returns what the
/// refreshing caller got.
async fn refresh_racing(cache: &dyn CacheService, key: &str, meanwhile: Meanwhile) {
    load_first(cache, key, OrgContext::sample(1)).await;
    tokio::time::sleep(PAST_REFRESH_POINT).await;
    let (started, release) = (Notify::new(), Notify::new());
    let options = options();
    let refreshing = cache.get_or_load_with(key, &options, || async {
        started.notify_one();
        release.notified().await;
        // What the database said before the change the write below stands for.
        Ok::<_, StoreDown>(Some(OrgContext::sample(2)))
    });
    let writer = async {
        started.notified().await;
        match meanwhile {
            Meanwhile::Invalidate => cache.invalidate(key).await.unwrap(),
            Meanwhile::Set(value) => cache.set(key, &*value, Some(60)).await.unwrap(),
        }
        release.notify_one();
    };
    let (refreshed, ()) = tokio::time::timeout(HANG, async { tokio::join!(refreshing, writer) })
        .await
        .expect("the refresh finished (bound on a hang)");
    let refreshed = load_ok("refreshing caller", refreshed);
    assert_eq!(refreshed.value, Some(OrgContext::sample(1)));
}

/// An invalidation while a refresh's loader runs: the reload is dropped (the key stays
/// gone), so a refresh can never put back a value that was invalidated meanwhile.
pub async fn eager_refresh_never_undoes_an_invalidation(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:refresh-invalidated");
    refresh_racing(cache, &key, Meanwhile::Invalidate).await;
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        None,
        "the refresh wrote back over an invalidation"
    );
    assert_eq!(cache.get_bytes(&key).await.unwrap(), None);
}

/// A `set` while a refresh's loader runs: the set stays.
pub async fn eager_refresh_never_overwrites_a_set(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:refresh-set");
    refresh_racing(cache, &key, Meanwhile::Set(Box::new(OrgContext::sample(9)))).await;
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(OrgContext::sample(9)),
        "the refresh overwrote a set made while it ran"
    );
}

/// `replace_if` stores only over the exact version seen, and never brings back a key that
/// was removed.
pub async fn replace_if_swaps_only_the_version_seen(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}cas");
    let value = |s: &'static [u8]| Bytes::from_static(s);
    cache
        .set_bytes(&key, value(b"\"one\""), Some(60))
        .await
        .unwrap();
    let LeaseRead::Value { version, .. } = cache.lease(&key, &LeaseRequest::new()).await.unwrap()
    else {
        panic!("a key holding a value reads as that value")
    };
    let two = cache
        .replace_if(&key, &version, value(b"\"two\""), Some(60))
        .await
        .unwrap()
        .expect("the version seen is the one stored");
    assert_eq!(
        cache.get_bytes(&key).await.unwrap(),
        Some(value(b"\"two\""))
    );
    assert!(
        cache
            .replace_if(&key, &version, value(b"\"three\""), Some(60))
            .await
            .unwrap()
            .is_none(),
        "a version that was replaced names nothing"
    );
    assert_eq!(
        cache.get_bytes(&key).await.unwrap(),
        Some(value(b"\"two\""))
    );
    // A set in between: the version of before the set names nothing.
    cache
        .set_bytes(&key, value(b"\"four\""), Some(60))
        .await
        .unwrap();
    assert!(
        cache
            .replace_if(&key, &two, value(b"\"five\""), Some(60))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        cache.get_bytes(&key).await.unwrap(),
        Some(value(b"\"four\""))
    );
    // An invalidation: nothing comes back.
    let LeaseRead::Value { version, .. } = cache.lease(&key, &LeaseRequest::new()).await.unwrap()
    else {
        panic!("a key holding a value reads as that value")
    };
    cache.invalidate(&key).await.unwrap();
    assert!(
        cache
            .replace_if(&key, &version, value(b"\"six\""), Some(60))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        cache.get_bytes(&key).await.unwrap(),
        None,
        "a removed key came back"
    );
    // A bad TTL is an error, as everywhere.
    cache
        .set_bytes(&key, value(b"\"seven\""), Some(60))
        .await
        .unwrap();
    let LeaseRead::Value { version, .. } = cache.lease(&key, &LeaseRequest::new()).await.unwrap()
    else {
        panic!("a key holding a value reads as that value")
    };
    assert!(
        cache
            .replace_if(&key, &version, value(b"\"eight\""), Some(0))
            .await
            .is_err()
    );
}

/// The soft timeout: with a fail-safe value at hand, a caller that joined a load still
/// running after the soft timeout gets the stale value; the load goes on and stores its
/// own.
pub async fn soft_timeout_serves_stale_to_waiters(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:soft");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(50))
        .load_timeout(Duration::from_secs(10));
    let first = cache
        .get_or_load_with(&key, &options, || async {
            Ok::<_, StoreDown>(Some(OrgContext::sample(1)))
        })
        .await;
    assert_eq!(load_ok("first", first).source, LoadSource::Loader);
    tokio::time::sleep(Duration::from_millis(1_300)).await; // past the 1 s TTL

    let (started, release) = (Notify::new(), Notify::new());
    // The leader's loader is held until the waiter has its answer: without the soft
    // timeout, the waiter would wait for the leader, and both for the hard timeout.
    let leader = cache.get_or_load_with(&key, &options, || async {
        started.notify_one();
        release.notified().await;
        Ok::<_, StoreDown>(Some(OrgContext::sample(2)))
    });
    let waiter = async {
        started.notified().await;
        let loaded = cache
            .get_or_load_with(&key, &options, || async {
                Ok::<_, StoreDown>(Some(OrgContext::sample(3)))
            })
            .await;
        release.notify_one();
        loaded
    };
    let (leader, waiter) = tokio::time::timeout(HANG, async { tokio::join!(leader, waiter) })
        .await
        .expect("both callers finished (bound on a hang)");
    let waiter = load_ok("waiter", waiter);
    assert_eq!(
        (waiter.value, waiter.source),
        (Some(OrgContext::sample(1)), LoadSource::Stale),
        "past the soft timeout a waiter gets the stale value"
    );
    let leader = load_ok("leader", leader);
    assert_eq!(
        (leader.value, leader.source),
        (Some(OrgContext::sample(2)), LoadSource::Loader)
    );
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(OrgContext::sample(2)),
        "the load went on and stored its value"
    );
}

/// A waiter with a stale value whose leader finishes inside the soft timeout gets the
/// leader's new value (the soft timeout only matters when the load is slower than it).
pub async fn soft_timeout_waiters_get_a_load_that_finishes_in_time(
    cache: &dyn CacheService,
    prefix: &str,
) {
    let key = format!("{prefix}org:soft-in-time");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60))
        .soft_timeout(Duration::from_secs(5))
        .load_timeout(Duration::from_secs(10));
    let first = cache
        .get_or_load_with(&key, &options, || async {
            Ok::<_, StoreDown>(Some(OrgContext::sample(1)))
        })
        .await;
    assert_eq!(load_ok("first", first).source, LoadSource::Loader);
    tokio::time::sleep(Duration::from_millis(1_300)).await; // past the 1 s TTL

    let started = Notify::new();
    let leader = cache.get_or_load_with(&key, &options, || async {
        started.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, StoreDown>(Some(OrgContext::sample(2)))
    });
    let waiter = async {
        started.notified().await;
        cache
            .get_or_load_with(&key, &options, || async {
                Ok::<_, StoreDown>(Some(OrgContext::sample(3)))
            })
            .await
    };
    let (leader, waiter) = tokio::time::timeout(HANG, async { tokio::join!(leader, waiter) })
        .await
        .expect("both callers finished (bound on a hang)");
    assert_eq!(load_ok("leader", leader).value, Some(OrgContext::sample(2)));
    let waiter = load_ok("waiter", waiter);
    assert_eq!(
        (waiter.value, waiter.source),
        (Some(OrgContext::sample(2)), LoadSource::Joined),
        "a load that finishes inside the soft timeout reaches its waiters"
    );
}
