//! Cache-aside on any service ([`get_or_load`](crate::CacheServiceExt::get_or_load) and
//! [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with)): single flight within
//! one process, loader errors shared and never cached, a cancelled leader, negative
//! caching, fail-safe, load timeouts, corrupt entries, where a value came from.
//!
//! Concurrent callers are futures joined on the check's task (a check only borrows the
//! service, so it cannot spawn): the loaders sleep, so the calls really overlap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{Either, join_all, select};

use super::{OrgContext, ok};
use crate::{CacheError, CacheService, CacheServiceExt, LoadError, LoadOptions, LoadSource};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

/// How long a check waits for a 1 s TTL to pass: generous, never a timing assert.
const PAST_ONE_SECOND: Duration = Duration::from_millis(1_300);

/// How long a loader takes when the check needs concurrent callers to overlap.
const SLOW_LOAD: Duration = Duration::from_millis(100);

/// The loaders' error: the app's database failing.
#[derive(Debug, PartialEq)]
struct StoreDown(&'static str);

impl fmt::Display for StoreDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store down: {}", self.0)
    }
}

impl std::error::Error for StoreDown {}

/// The value of a load that must succeed.
pub(super) fn load_ok<T, E: fmt::Display>(what: &str, result: Result<T, LoadError<E>>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error: {e}"),
    }
}

/// 200 concurrent misses of one key (half `get_or_load`, half `get_or_load_with`) run the
/// loader once; every caller gets its value, which is then cached.
pub async fn concurrent_misses_load_once(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(SLOW_LOAD).await;
        Ok::<_, StoreDown>(OrgContext::sample(1))
    };
    let options = LoadOptions::default().ttl_secs(60);
    let plain = join_all((0..100).map(|_| cache.get_or_load(&key, Some(60), load)));
    let with = join_all(
        (0..100)
            .map(|_| cache.get_or_load_with(&key, &options, || async { load().await.map(Some) })),
    );
    let (plain, with) = tokio::time::timeout(HANG, async { tokio::join!(plain, with) })
        .await
        .expect("the callers finished (bound on a hang)");
    for value in plain {
        assert_eq!(load_ok("get_or_load", value), OrgContext::sample(1));
    }
    for loaded in with {
        let loaded = load_ok("get_or_load_with", loaded);
        assert_eq!(loaded.value, Some(OrgContext::sample(1)));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "200 concurrent misses must run the loader once"
    );
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(1)),
        "the loaded value is cached"
    );
}

/// `get_or_load_with` says where its value came from: the caller that ran the loader
/// (`Loader`), the concurrent callers that waited for it (`Joined`), later callers
/// (`Cache`); no cache error on a healthy service.
pub async fn load_sources_say_where_the_value_came_from(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let options = LoadOptions::default().ttl_secs(60);
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(SLOW_LOAD).await;
        Ok::<_, StoreDown>(Some(OrgContext::sample(2)))
    };
    let callers = join_all((0..10).map(|_| cache.get_or_load_with(&key, &options, load)));
    let results = tokio::time::timeout(HANG, callers)
        .await
        .expect("the callers finished (bound on a hang)");
    let mut sources = Vec::new();
    for loaded in results {
        let loaded = load_ok("get_or_load_with", loaded);
        assert_eq!(loaded.value, Some(OrgContext::sample(2)));
        assert!(
            loaded.cache_error.is_none(),
            "a healthy cache reports no error: {:?}",
            loaded.cache_error
        );
        sources.push(loaded.source);
    }
    let count = |source| sources.iter().filter(|s| **s == source).count();
    assert_eq!(
        (count(LoadSource::Loader), count(LoadSource::Joined)),
        (1, 9),
        "one caller loads, the others join it: {sources:?}"
    );
    let again = load_ok(
        "get_or_load_with",
        cache.get_or_load_with(&key, &options, load).await,
    );
    assert!(!again.is_stale());
    assert_eq!(
        (again.value, again.source),
        (Some(OrgContext::sample(2)), LoadSource::Cache)
    );
    // The plain form reads what the other one stored.
    let plain: OrgContext = load_ok(
        "get_or_load",
        cache
            .get_or_load(&key, Some(60), || async {
                Err(StoreDown("must not be called on a hit"))
            })
            .await,
    );
    assert_eq!(plain, OrgContext::sample(2));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

/// A loader error reaches every caller waiting on that load (the same `Arc`, naming the
/// key), and is not cached: the next call loads again.
pub async fn loader_error_reaches_every_waiter_and_is_not_cached(
    cache: &dyn CacheService,
    prefix: &str,
) {
    let key = format!("{prefix}org:acme");
    let loads = AtomicUsize::new(0);
    let failing = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(SLOW_LOAD).await;
        Err::<OrgContext, _>(StoreDown("connection refused"))
    };
    let callers = join_all((0..50).map(|_| cache.get_or_load(&key, Some(60), failing)));
    let results = tokio::time::timeout(HANG, callers)
        .await
        .expect("the callers finished (bound on a hang)");
    let mut errors = Vec::new();
    for result in results {
        match result {
            Err(LoadError::Loader { source, key: name }) => {
                assert_eq!(*source, StoreDown("connection refused"));
                assert!(name.to_string().contains("org:acme"), "{name}");
                errors.push(source);
            }
            other => panic!("expected the loader's error, got {other:?}"),
        }
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 50 callers");
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "every caller receives the one error of the one load"
    );
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        None,
        "an error is not cached"
    );
    let value = load_ok(
        "get_or_load",
        cache
            .get_or_load(&key, Some(60), || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, StoreDown>(OrgContext::sample(3))
            })
            .await,
    );
    assert_eq!(
        (value, loads.load(Ordering::SeqCst)),
        (OrgContext::sample(3), 2)
    );
}

/// A leader dropped while its loader runs (a request that went away) does not strand the
/// callers waiting on it: one of them loads instead, and its value is cached.
pub async fn a_cancelled_leader_hands_over(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let mut leader = Box::pin(cache.get_or_load(&key, Some(60), || async move {
        let _ = started_tx.send(());
        std::future::pending::<Result<OrgContext, StoreDown>>().await
    }));
    match tokio::time::timeout(HANG, select(&mut leader, started_rx)).await {
        Ok(Either::Right((started, _))) => started.expect("the leader's loader started"),
        Ok(Either::Left((result, _))) => panic!("a pending loader returned: {result:?}"),
        Err(_) => panic!("the leader's loader never started (bound on a hang)"),
    }
    let mut waiter = Box::pin(cache.get_or_load(&key, Some(60), || async {
        Ok::<_, StoreDown>(OrgContext::sample(4))
    }));
    // The waiter joins the leader's load and waits for it.
    let wait = tokio::time::sleep(Duration::from_millis(50));
    if let Either::Left((result, _)) = select(&mut waiter, Box::pin(wait)).await {
        panic!("a second caller must wait for the running load, got {result:?}");
    }
    drop(leader);
    let value = tokio::time::timeout(HANG, waiter)
        .await
        .expect("the waiter took over instead of hanging (bound on a hang)");
    assert_eq!(load_ok("get_or_load", value), OrgContext::sample(4));
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(4))
    );
}

/// A cached value is returned without calling the loader, by both forms.
pub async fn hits_do_not_call_the_loader(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    ok(
        "set",
        cache.set(&key, &OrgContext::sample(5), Some(60)).await,
    );
    let value: OrgContext = load_ok(
        "get_or_load",
        cache
            .get_or_load(&key, Some(60), || async {
                Err(StoreDown("must not be called on a hit"))
            })
            .await,
    );
    assert_eq!(value, OrgContext::sample(5));
    let loaded = load_ok(
        "get_or_load_with",
        cache
            .get_or_load_with::<OrgContext, StoreDown, _, _>(
                &key,
                &LoadOptions::default(),
                || async { Err(StoreDown("must not be called on a hit")) },
            )
            .await,
    );
    assert_eq!(
        (loaded.value, loaded.source),
        (Some(OrgContext::sample(5)), LoadSource::Cache)
    );
}

/// "Not found" (`Ok(None)` from the loader) is cached only with `negative_ttl_secs`, for
/// that long; a typed `get` and a caller without negative caching see no value under it.
pub async fn not_found_is_cached_only_when_asked(cache: &dyn CacheService, prefix: &str) {
    let loads = AtomicUsize::new(0);
    let load_nothing = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<OrgContext>, StoreDown>(None)
    };
    let options = LoadOptions::default().negative_ttl_secs(1);

    // Cached first, so that its 1 s runs while the rest of the check does.
    let expiring = format!("{prefix}org:bogus-c");
    let first = load_ok(
        "get_or_load_with",
        cache
            .get_or_load_with(&expiring, &options, load_nothing)
            .await,
    );
    assert_eq!((first.value, first.source), (None, LoadSource::Loader));
    let started = Instant::now();

    // Without negative caching, every call asks the store.
    let key = format!("{prefix}org:bogus-a");
    for _ in 0..3 {
        let loaded = load_ok(
            "get_or_load_with",
            cache
                .get_or_load_with(&key, &LoadOptions::default(), load_nothing)
                .await,
        );
        assert_eq!(loaded.value, None);
    }
    assert_eq!(loads.swap(0, Ordering::SeqCst), 4);
    assert_eq!(ok("get_bytes", cache.get_bytes(&key).await), None);

    // With it, "not found" is a hit for its TTL.
    let key = format!("{prefix}org:bogus-b");
    for i in 0..20 {
        let loaded = load_ok(
            "get_or_load_with",
            cache.get_or_load_with(&key, &options, load_nothing).await,
        );
        let expected = if i == 0 {
            LoadSource::Loader
        } else {
            LoadSource::Cache
        };
        assert_eq!((loaded.value, loaded.source), (None, expected), "call {i}");
    }
    assert_eq!(loads.swap(0, Ordering::SeqCst), 1);
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        None,
        "a typed get sees no value under a cached \"not found\""
    );
    let value = load_ok(
        "get_or_load",
        cache
            .get_or_load(&key, Some(60), || async {
                Ok::<_, StoreDown>(OrgContext::sample(6))
            })
            .await,
    );
    assert_eq!(
        value,
        OrgContext::sample(6),
        "a caller without negative caching does not trust the marker"
    );

    // After its TTL the marker is gone: the store is asked again.
    tokio::time::sleep(PAST_ONE_SECOND.saturating_sub(started.elapsed())).await;
    let again = load_ok(
        "get_or_load_with",
        cache
            .get_or_load_with(&expiring, &options, load_nothing)
            .await,
    );
    assert_eq!(
        (again.source, loads.load(Ordering::SeqCst)),
        (LoadSource::Loader, 1),
        "the marker expired after its 1 s TTL"
    );
}

/// Fail-safe: past its TTL a value is no longer served (nor seen by a typed `get`), but
/// when the loader fails it is, marked stale, within the grace period only; within the
/// throttle time the store is not asked again; once the store is back the new value wins.
pub async fn fail_safe_serves_the_last_value_within_its_grace(
    cache: &dyn CacheService,
    prefix: &str,
) {
    // Two keys, one after the other's sleeps would double the time: both run at once.
    tokio::join!(
        fail_safe_serves_stale_then_recovers(cache, prefix),
        fail_safe_is_bounded_by_its_grace(cache, prefix),
    );
}

async fn fail_safe_serves_stale_then_recovers(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let throttle = Duration::from_millis(500);
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60))
        .fail_safe_throttle(throttle);
    let loads = AtomicUsize::new(0);
    let loading = |n: u64| {
        let loads = &loads;
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(Some(OrgContext::sample(n)))
        }
    };
    let failing = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Err::<Option<OrgContext>, _>(StoreDown("primary is down"))
    };

    let first = load_ok(
        "get_or_load_with",
        cache.get_or_load_with(&key, &options, loading(7)).await,
    );
    assert_eq!(first.source, LoadSource::Loader);
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(7)),
        "a fresh loaded value is a plain hit"
    );
    tokio::time::sleep(PAST_ONE_SECOND).await;
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        None,
        "past its TTL the value is only for fail-safe"
    );
    assert!(
        ok("get_bytes", cache.get_bytes(&key).await).is_some(),
        "kept for the grace period"
    );

    let stale = load_ok(
        "get_or_load_with",
        cache.get_or_load_with(&key, &options, failing).await,
    );
    let served = Instant::now();
    assert!(stale.is_stale());
    assert_eq!(
        (stale.value, stale.source),
        (Some(OrgContext::sample(7)), LoadSource::Stale),
        "the loader failed: the last value is served"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);

    let throttled = load_ok(
        "get_or_load_with",
        cache.get_or_load_with(&key, &options, failing).await,
    );
    assert_eq!(
        (throttled.value, throttled.source),
        (Some(OrgContext::sample(7)), LoadSource::Stale)
    );
    if served.elapsed() < throttle {
        assert_eq!(loads.load(Ordering::SeqCst), 2, "throttled: no store call");
    }
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        None,
        "a typed get never sees a stale value"
    );

    tokio::time::sleep((throttle + Duration::from_millis(200)).saturating_sub(served.elapsed()))
        .await;
    let calls = loads.load(Ordering::SeqCst);
    let recovered = load_ok(
        "get_or_load_with",
        cache.get_or_load_with(&key, &options, loading(8)).await,
    );
    assert_eq!(
        (recovered.value, recovered.source),
        (Some(OrgContext::sample(8)), LoadSource::Loader),
        "past the throttle time the store is asked again"
    );
    assert_eq!(loads.load(Ordering::SeqCst), calls + 1);
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(8))
    );
}

async fn fail_safe_is_bounded_by_its_grace(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:short-grace");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_millis(500));
    load_ok(
        "get_or_load_with",
        cache
            .get_or_load_with(&key, &options, || async {
                Ok::<_, StoreDown>(Some(OrgContext::sample(9)))
            })
            .await,
    );
    // Past TTL + grace (1.5 s), before the stored copy's whole-second lifetime (2 s) ends.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let err = cache
        .get_or_load_with::<OrgContext, _, _, _>(&key, &options, || async {
            Err(StoreDown("primary is down"))
        })
        .await
        .expect_err("past its grace period a value is not served");
    assert!(matches!(err, LoadError::Loader { .. }), "{err}");
}

/// A loader slower than the load timeout fails every caller waiting on it with `Timeout`
/// (naming the key and the time), caches nothing, and does not hold up the next load.
pub async fn a_slow_loader_times_out_for_every_caller(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let timeout = Duration::from_millis(300);
    let options = LoadOptions::default().load_timeout(timeout);
    let started = Instant::now();
    let callers = join_all((0..10).map(|_| {
        cache.get_or_load_with::<OrgContext, StoreDown, _, _>(&key, &options, || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(None)
        })
    }));
    let results = tokio::time::timeout(HANG, callers)
        .await
        .expect("the callers finished (bound on a hang)");
    for result in results {
        let err = result.expect_err("the load timed out");
        assert!(
            matches!(err, LoadError::Timeout { after, .. } if after == timeout),
            "{err}"
        );
        assert!(err.to_string().contains("org:acme"), "{err}");
    }
    assert!(
        started.elapsed() < timeout + HANG / 2,
        "every caller gave up at the timeout"
    );
    assert_eq!(ok("get", cache.get::<OrgContext>(&key).await), None);
    let value = tokio::time::timeout(
        HANG,
        cache.get_or_load(&key, Some(60), || async {
            Ok::<_, StoreDown>(OrgContext::sample(10))
        }),
    )
    .await
    .expect("the next load is not held up (bound on a hang)");
    assert_eq!(load_ok("get_or_load", value), OrgContext::sample(10));
}

/// Stored bytes that do not decode are a miss for both forms: the loader's value replaces
/// them, and `get_or_load_with` reports the `Serialization` error it worked around.
pub async fn corrupt_entries_are_reloaded_and_overwritten(cache: &dyn CacheService, prefix: &str) {
    let with = format!("{prefix}org:with");
    let plain = format!("{prefix}org:plain");
    for key in [&with, &plain] {
        ok(
            "set_bytes",
            cache
                .set_bytes(key, Bytes::from_static(b"\xff{not json"), Some(60))
                .await,
        );
    }
    let loaded = load_ok(
        "get_or_load_with",
        cache
            .get_or_load_with(&with, &LoadOptions::default().ttl_secs(60), || async {
                Ok::<_, StoreDown>(Some(OrgContext::sample(11)))
            })
            .await,
    );
    assert_eq!(
        (loaded.value, loaded.source),
        (Some(OrgContext::sample(11)), LoadSource::Loader)
    );
    assert!(
        matches!(loaded.cache_error, Some(CacheError::Serialization { .. })),
        "the corrupt entry is reported: {:?}",
        loaded.cache_error
    );
    let value = load_ok(
        "get_or_load",
        cache
            .get_or_load(&plain, Some(60), || async {
                Ok::<_, StoreDown>(OrgContext::sample(12))
            })
            .await,
    );
    assert_eq!(value, OrgContext::sample(12));
    for (key, n) in [(&with, 11), (&plain, 12)] {
        assert_eq!(
            ok("get", cache.get::<OrgContext>(key).await),
            Some(OrgContext::sample(n)),
            "the load overwrote the corrupt entry {key}"
        );
    }
}

/// Invalid options (fail-safe without a TTL, a zero TTL or negative TTL) are
/// `InvalidArgument` before the loader runs.
pub async fn invalid_options_are_errors(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let no_ttl = LoadOptions::default().fail_safe(Duration::from_secs(60));
    let zero_ttl = LoadOptions::default().ttl_secs(0);
    let zero_negative = LoadOptions::default().negative_ttl_secs(0);
    for options in [no_ttl, zero_ttl, zero_negative] {
        let err = cache
            .get_or_load_with::<OrgContext, StoreDown, _, _>(&key, &options, || async {
                panic!("an invalid call must not reach the loader")
            })
            .await
            .expect_err("invalid options");
        assert!(
            matches!(err, LoadError::Cache(CacheError::InvalidArgument { .. })),
            "{options:?}: {err}"
        );
    }
    let err = cache
        .get_or_load::<OrgContext, StoreDown, _, _>(&key, Some(0), || async {
            panic!("an invalid call must not reach the loader")
        })
        .await
        .expect_err("a zero TTL");
    assert!(
        matches!(err, LoadError::Cache(CacheError::InvalidArgument { .. })),
        "{err}"
    );
    assert_eq!(ok("get_bytes", cache.get_bytes(&key).await), None);
}
