//! `get_or_load` / `get_or_load_with` on every backend: single flight, errors shared and
//! never cached, cancelled leaders, negative caching, fail-safe, load timeouts, corrupt
//! entries; and a Redis that is down. Redis runs for real (tests/support), never 6379.

mod support;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet::conformance::unique_prefix;
use cachet::{
    Cache, CacheService, CacheServiceExt, LoadError, LoadOptions, LoadSource, MokaCacheService,
    RedisCacheService, TieredCacheService,
};
use serde::{Deserialize, Serialize};
use support::{RedisCluster, RedisServer};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

fn standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

async fn redis(url: String) -> Arc<dyn CacheService> {
    Arc::new(RedisCacheService::new(&url, 300).await.expect("redis"))
}

async fn tiered(url: String) -> Arc<dyn CacheService> {
    Arc::new(
        TieredCacheService::builder(RedisCacheService::builder(url))
            .channel_prefix(unique_prefix("load-bus"))
            .build()
            .await
            .expect("tiered"),
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgContext {
    slug: String,
    plan: String,
    seats: u32,
}

fn acme(plan: &str) -> OrgContext {
    OrgContext {
        slug: "acme".into(),
        plan: plan.into(),
        seats: 40,
    }
}

#[derive(Debug, PartialEq)]
struct StoreDown(&'static str);

impl std::fmt::Display for StoreDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store down: {}", self.0)
    }
}

impl std::error::Error for StoreDown {}

/// Runs each check against the service `$make` builds (an `Arc<dyn CacheService>`).
macro_rules! load_checks {
    ($make:expr; $($check:ident),+ $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let cache: std::sync::Arc<dyn cachet::CacheService> = $make;
            let prefix = cachet::conformance::unique_prefix(stringify!($check));
            super::$check(cache, prefix).await;
        }
    )+};
    ($make:expr) => {
        load_checks!($make;
            concurrent_misses_load_once,
            loader_error_reaches_every_waiter_and_is_not_cached,
            a_cancelled_leader_hands_over,
            hits_do_not_call_the_loader,
            not_found_is_cached_only_when_asked,
            fail_safe_serves_the_last_value_then_recovers,
            fail_safe_is_bounded_by_its_grace,
            a_slow_loader_times_out_for_every_caller,
            corrupt_entries_are_reloaded_and_overwritten,
            typed_get_sees_only_fresh_framed_values,
            invalid_options_are_errors,
        );
    };
}

mod moka {
    load_checks!(std::sync::Arc::new(cachet::MokaCacheService::default()));
}

mod redis_standalone {
    load_checks!(super::redis(super::standalone().url()).await);
}

async fn tiered_bus(url: String) -> Arc<dyn CacheService> {
    Arc::new(
        TieredCacheService::builder(RedisCacheService::builder(url))
            .invalidation(cachet::backend::tiered::InvalidationMode::Bus)
            .channel_prefix(unique_prefix("load-bus"))
            .build()
            .await
            .expect("tiered over the bus"),
    )
}

mod redis_cluster {
    load_checks!(super::redis(super::RedisCluster::shared().url()).await);
}

/// Tiered with the default invalidation mode (client tracking on this server).
mod tiered_standalone {
    load_checks!(super::tiered(super::standalone().url()).await);
}

/// Tiered over the pub/sub bus.
mod tiered_bus {
    load_checks!(super::tiered_bus(super::standalone().url()).await);
}

async fn concurrent_misses_load_once(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (cache, key, loads) = (Arc::clone(&cache), key.clone(), Arc::clone(&loads));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(60), || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, StoreDown>(acme("pro"))
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), acme("pro"));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "200 concurrent misses must run the loader once"
    );
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(acme("pro"))
    );
}

async fn loader_error_reaches_every_waiter_and_is_not_cached(
    cache: Arc<dyn CacheService>,
    prefix: String,
) {
    let key = format!("{prefix}org:acme");
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (cache, key, loads) = (Arc::clone(&cache), key.clone(), Arc::clone(&loads));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load::<OrgContext, _, _, _>(&key, Some(60), || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(StoreDown("connection refused"))
                })
                .await
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Err(LoadError::Loader { source, key: name }) => {
                assert_eq!(*source, StoreDown("connection refused"));
                assert!(name.to_string().contains("org:acme"));
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
    // Not cached: the next call loads again, and succeeds.
    let value = cache
        .get_or_load(&key, Some(60), || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(acme("free"))
        })
        .await
        .unwrap();
    assert_eq!((value, loads.load(Ordering::SeqCst)), (acme("free"), 2));
}

async fn a_cancelled_leader_hands_over(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let leader = {
        let (cache, key) = (Arc::clone(&cache), key.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(60), || async {
                    let _ = started_tx.send(());
                    // A request that is dropped while its query runs.
                    std::future::pending::<Result<OrgContext, StoreDown>>().await
                })
                .await
        })
    };
    started_rx.await.expect("the leader's loader started");
    let waiter = {
        let (cache, key) = (Arc::clone(&cache), key.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(60), || async { Ok::<_, StoreDown>(acme("pro")) })
                .await
        })
    };
    // Let the waiter join the leader's load, then cancel the leader.
    tokio::time::sleep(Duration::from_millis(50)).await;
    leader.abort();
    let value = tokio::time::timeout(HANG, waiter)
        .await
        .expect("the waiter took over instead of hanging (bound on a hang)")
        .unwrap()
        .unwrap();
    assert_eq!(value, acme("pro"));
}

async fn hits_do_not_call_the_loader(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    cache.set(&key, &acme("pro"), Some(60)).await.unwrap();
    let value: OrgContext = cache
        .get_or_load(&key, Some(60), || async {
            Err::<OrgContext, _>(StoreDown("must not be called on a hit"))
        })
        .await
        .unwrap();
    assert_eq!(value, acme("pro"));
    let loaded = cache
        .get_or_load_with::<OrgContext, StoreDown, _, _>(&key, &LoadOptions::default(), || async {
            Err(StoreDown("must not be called on a hit"))
        })
        .await
        .unwrap();
    assert_eq!(
        (loaded.value, loaded.source),
        (Some(acme("pro")), LoadSource::Cache)
    );
}

async fn not_found_is_cached_only_when_asked(cache: Arc<dyn CacheService>, prefix: String) {
    let loads = AtomicUsize::new(0);
    let load_nothing = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<OrgContext>, StoreDown>(None)
    };

    // Without negative caching, every call asks the store.
    let key = format!("{prefix}org:bogus-a");
    for _ in 0..3 {
        let loaded = cache
            .get_or_load_with(&key, &LoadOptions::default(), load_nothing)
            .await
            .unwrap();
        assert_eq!(loaded.value, None);
    }
    assert_eq!(loads.swap(0, Ordering::SeqCst), 3);
    assert_eq!(cache.get_bytes(&key).await.unwrap(), None);

    // With it, "not found" is cached for its TTL, then asked again.
    let key = format!("{prefix}org:bogus-b");
    let options = LoadOptions::default().negative_ttl_secs(1);
    for i in 0..20 {
        let loaded = cache
            .get_or_load_with(&key, &options, load_nothing)
            .await
            .unwrap();
        let expected = if i == 0 {
            LoadSource::Loader
        } else {
            LoadSource::Cache
        };
        assert_eq!((loaded.value, loaded.source), (None, expected));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    // A typed get sees no value under a cached "not found".
    assert_eq!(cache.get::<OrgContext>(&key).await.unwrap(), None);
    // A caller without negative caching does not trust the marker.
    let value = cache
        .get_or_load(&key, Some(60), || async { Ok::<_, StoreDown>(acme("pro")) })
        .await
        .unwrap();
    assert_eq!(value, acme("pro"));

    let key = format!("{prefix}org:bogus-c");
    cache
        .get_or_load_with(&key, &options, load_nothing)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    cache
        .get_or_load_with(&key, &options, load_nothing)
        .await
        .unwrap();
    assert_eq!(
        loads.load(Ordering::SeqCst),
        3,
        "the marker expired after its 1 s TTL"
    );
}

async fn fail_safe_serves_the_last_value_then_recovers(
    cache: Arc<dyn CacheService>,
    prefix: String,
) {
    let key = format!("{prefix}org:acme");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60))
        .fail_safe_throttle(Duration::from_secs(3));
    let loads = AtomicUsize::new(0);
    let ok = |plan: &'static str| {
        let loads = &loads;
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(Some(acme(plan)))
        }
    };
    let failing = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Err::<Option<OrgContext>, _>(StoreDown("primary is down"))
    };

    let first = cache
        .get_or_load_with(&key, &options, ok("pro"))
        .await
        .unwrap();
    assert_eq!(first.source, LoadSource::Loader);
    tokio::time::sleep(Duration::from_millis(1300)).await; // past the 1 s TTL

    let stale = cache
        .get_or_load_with(&key, &options, failing)
        .await
        .unwrap();
    assert_eq!(stale.value, Some(acme("pro")));
    assert_eq!(stale.source, LoadSource::Stale);
    assert!(stale.is_stale());
    assert_eq!(loads.load(Ordering::SeqCst), 2);

    // Within the throttle time the stale value is served without asking the store.
    let throttled = cache
        .get_or_load_with(&key, &options, failing)
        .await
        .unwrap();
    assert_eq!(
        (throttled.value, throttled.source),
        (Some(acme("pro")), LoadSource::Stale)
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2, "throttled: no store call");

    tokio::time::sleep(Duration::from_millis(3500)).await; // past the throttle
    let recovered = cache
        .get_or_load_with(&key, &options, ok("enterprise"))
        .await
        .unwrap();
    assert_eq!(
        (recovered.value, recovered.source),
        (Some(acme("enterprise")), LoadSource::Loader)
    );
    assert_eq!(loads.load(Ordering::SeqCst), 3);
}

async fn fail_safe_is_bounded_by_its_grace(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(1));
    cache
        .get_or_load_with(&key, &options, || async {
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await; // past TTL + grace
    let err = cache
        .get_or_load_with::<OrgContext, _, _, _>(&key, &options, || async {
            Err(StoreDown("primary is down"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::Loader { .. }), "{err}");
}

async fn a_slow_loader_times_out_for_every_caller(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    let options = LoadOptions::default().load_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (cache, key, options) = (Arc::clone(&cache), key.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load_with::<OrgContext, StoreDown, _, _>(&key, &options, || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(None)
                })
                .await
        }));
    }
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(err, LoadError::Timeout { after, .. } if after == Duration::from_millis(300)),
            "{err}"
        );
        assert!(err.to_string().contains("org:acme"), "{err}");
    }
    assert!(started.elapsed() < HANG, "bound on a hang");
}

async fn corrupt_entries_are_reloaded_and_overwritten(
    cache: Arc<dyn CacheService>,
    prefix: String,
) {
    let key = format!("{prefix}org:acme");
    cache
        .set_bytes(&key, Bytes::from_static(b"\xff{not json"), Some(60))
        .await
        .unwrap();
    let loaded = cache
        .get_or_load_with(&key, &LoadOptions::default().ttl_secs(60), || async {
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    assert_eq!(
        (loaded.value, loaded.source),
        (Some(acme("pro")), LoadSource::Loader)
    );
    assert!(
        matches!(
            loaded.cache_error,
            Some(cachet::CacheError::Serialization { .. })
        ),
        "the corrupt entry is reported: {:?}",
        loaded.cache_error
    );
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(acme("pro"))
    );
}

async fn typed_get_sees_only_fresh_framed_values(cache: Arc<dyn CacheService>, prefix: String) {
    let key = format!("{prefix}org:acme");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60));
    cache
        .get_or_load_with(&key, &options, || async {
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(acme("pro"))
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        None,
        "past its TTL the value is only for fail-safe"
    );
    assert!(
        cache.get_bytes(&key).await.unwrap().is_some(),
        "kept for the grace period"
    );
}

async fn invalid_options_are_errors(cache: Arc<dyn CacheService>, prefix: String) {
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
            .unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Cache(cachet::CacheError::InvalidArgument { .. })
            ),
            "{options:?}: {err}"
        );
    }
    let err = cache
        .get_or_load::<OrgContext, StoreDown, _, _>(&key, Some(0), || async {
            panic!("an invalid call must not reach the loader")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::Cache(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_and_wrappers_of_one_backend_share_one_flight() {
    let moka = MokaCacheService::default();
    let views: Vec<Arc<dyn CacheService>> = vec![
        Arc::new(moka.clone()),
        Arc::new(moka.clone()),
        Arc::new(Cache::from(moka.clone())),
        Arc::new(Arc::new(moka.clone()) as Arc<dyn CacheService>),
    ];
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (cache, loads) = (Arc::clone(&views[i % views.len()]), Arc::clone(&loads));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("org:acme", None, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, StoreDown>(acme("pro"))
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), acme("pro"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    // Two separate caches are two flights.
    let (a, b) = (MokaCacheService::default(), MokaCacheService::default());
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, StoreDown>(acme("pro"))
    };
    let (x, y) = tokio::join!(
        a.get_or_load("org:acme", None, load),
        b.get_or_load("org:acme", None, load)
    );
    assert_eq!((x.unwrap(), y.unwrap()), (acme("pro"), acme("pro")));
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_still_serves_the_loader_value_within_the_bound() {
    let server = RedisServer::start();
    let cache = RedisCacheService::builder(server.url())
        .command_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    cache.set("org:acme", &acme("pro"), None).await.unwrap();
    server.kill();

    let started = Instant::now();
    let loaded = cache
        .get_or_load_with("org:acme", &LoadOptions::default().ttl_secs(60), || async {
            Ok::<_, StoreDown>(Some(acme("from-the-database")))
        })
        .await
        .unwrap();
    assert!(started.elapsed() < HANG, "bound on a hang");
    assert_eq!(loaded.value, Some(acme("from-the-database")));
    assert_eq!(loaded.source, LoadSource::Loader);
    assert!(
        matches!(loaded.cache_error, Some(cachet::CacheError::Backend { .. })),
        "the cache failure is reported: {:?}",
        loaded.cache_error
    );

    // The plain form works the same way.
    let value = cache
        .get_or_load("org:acme", Some(60), || async {
            Ok::<_, StoreDown>(acme("again"))
        })
        .await
        .unwrap();
    assert_eq!(value, acme("again"));

    // Back up: the same service caches again.
    server.restart();
    let deadline = Instant::now() + HANG;
    loop {
        let loaded = cache
            .get_or_load_with("org:acme", &LoadOptions::default().ttl_secs(60), || async {
                Ok::<_, StoreDown>(Some(acme("pro")))
            })
            .await
            .unwrap();
        if loaded.cache_error.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cache.get::<OrgContext>("org:acme").await.unwrap(),
        Some(acme("pro"))
    );
}

/// Separate services on one Redis (each its own process-local flight): a stampede on all of
/// them at once loads once in all, through the lease alone (no lock service).
async fn instances_missing_one_key_load_once(make: fn(String) -> BoxedService) {
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(make(standalone().url()).await);
    }
    let key = format!("{}org:acme", unique_prefix("lease-flight"));
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..150 {
        let (cache, key, loads) = (
            Arc::clone(&instances[i % 3]),
            key.clone(),
            Arc::clone(&loads),
        );
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(300), || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, StoreDown>(acme("pro"))
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), acme("pro"));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "three instances, one load in all"
    );
}

type BoxedService = std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn CacheService>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_redis_instances_missing_one_key_load_once() {
    instances_missing_one_key_load_once(|url| Box::pin(redis(url))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_instances_missing_one_key_load_once() {
    instances_missing_one_key_load_once(|url| Box::pin(tiered(url))).await;
}

/// An instance that died holding a lease (here: a lease written by hand, as a dead process
/// leaves it) holds the others up only until the lease ends; then one of them loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_instance_ends_and_the_next_caller_loads() {
    let cache = redis(standalone().url()).await;
    let key = format!("{}org:acme", unique_prefix("dead-holder"));
    standalone().cli(&["HSET", &key, "cachet-lease", "token-of-a-dead-process"]);
    standalone().cli(&["PEXPIRE", &key, "1500"]);
    let loads = AtomicUsize::new(0);
    let started = Instant::now();
    let loaded = cache
        .get_or_load_with(&key, &LoadOptions::default().ttl_secs(60), || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    assert!(started.elapsed() < HANG, "bound on a hang");
    assert_eq!(loaded.value, Some(acme("pro")));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(
        cache.get::<OrgContext>(&key).await.unwrap(),
        Some(acme("pro"))
    );
}

/// A load whose caller goes away (its future dropped mid-load) releases its lease: another
/// instance loads at once instead of waiting out the lease, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_load_releases_its_lease_for_the_other_instances() {
    let (a, b) = (
        redis(standalone().url()).await,
        redis(standalone().url()).await,
    );
    let key = format!("{}org:acme", unique_prefix("cancelled"));
    let started = Arc::new(tokio::sync::Notify::new());
    let pending = {
        let (a, key, started) = (Arc::clone(&a), key.clone(), Arc::clone(&started));
        tokio::spawn(async move {
            a.get_or_load(&key, Some(60), || async move {
                started.notify_one();
                std::future::pending::<Result<OrgContext, StoreDown>>().await
            })
            .await
        })
    };
    tokio::time::timeout(HANG, started.notified())
        .await
        .unwrap();
    assert_eq!(
        standalone().cli(&["TYPE", &key]).trim(),
        "hash",
        "A holds the lease"
    );
    pending.abort();
    let _ = pending.await;
    let deadline = Instant::now() + HANG;
    while standalone().cli(&["EXISTS", &key]).trim() != "0" {
        assert!(
            Instant::now() < deadline,
            "the dropped load's lease was not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loaded = b
        .get_or_load_with(&key, &LoadOptions::default().ttl_secs(60), || async {
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    assert_eq!(loaded.source, LoadSource::Loader);
}

/// A loader slower than the lease keeps it by renewing: another instance waits for its
/// value instead of loading a second time, and the write-back is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_longer_than_the_lease_renews_it() {
    let (a, b) = (
        redis(standalone().url()).await,
        redis(standalone().url()).await,
    );
    let key = format!("{}org:slow", unique_prefix("renew"));
    let loads = Arc::new(AtomicUsize::new(0));
    let slow = cachet::load::DEFAULT_LEASE_TTL * 2;
    let first = {
        let (a, key, loads) = (Arc::clone(&a), key.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            a.get_or_load(&key, Some(60), || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(slow).await;
                Ok::<_, StoreDown>(acme("slow"))
            })
            .await
        })
    };
    while standalone().cli(&["TYPE", &key]).trim() != "hash" {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let loaded = b
        .get_or_load_with(&key, &LoadOptions::default().ttl_secs(60), || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreDown>(Some(acme("second load")))
        })
        .await
        .unwrap();
    assert_eq!(first.await.unwrap().unwrap(), acme("slow"));
    assert_eq!(loaded.value, Some(acme("slow")));
    assert_eq!(loaded.source, LoadSource::Joined);
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

/// A key holding a Redis type cachet never writes (someone's list) is not mistaken for a
/// lease: reads are a miss, a load is returned but not written over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_type_is_a_miss_and_is_left_alone() {
    let cache = redis(standalone().url()).await;
    let key = format!("{}list", unique_prefix("foreign"));
    standalone().cli(&["RPUSH", &key, "a", "b"]);
    assert_eq!(cache.get_bytes(&key).await.unwrap(), None);
    let loaded = cache
        .get_or_load_with(&key, &LoadOptions::default().ttl_secs(60), || async {
            Ok::<_, StoreDown>(Some(acme("pro")))
        })
        .await
        .unwrap();
    assert_eq!(loaded.value, Some(acme("pro")));
    assert!(
        loaded.cache_error.is_some(),
        "the lease failure is reported"
    );
    assert_eq!(standalone().cli(&["LLEN", &key]).trim(), "2", "left alone");
}

/// Clones of one namespace over one store share a single flight (their keys are the same
/// stored keys); two namespaces over that store never do (namespace `a`'s `k` is another key
/// than `b`'s `k`): each gets its own loader's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_share_single_flight_only_within_one_namespace() {
    use cachet::NamespacedCacheService;
    let store = cachet::MokaCacheService::default();
    let a1 = NamespacedCacheService::new(store.clone(), "a").unwrap();
    let a2 = a1.clone();
    let b = NamespacedCacheService::new(store.clone(), "b").unwrap();
    assert_eq!(a1.flight_scope(), a2.flight_scope());
    assert_ne!(a1.flight_scope(), b.flight_scope());
    assert_ne!(a1.flight_scope(), store.flight_scope());
    let loads = AtomicUsize::new(0);
    let slow = |value: &'static str| {
        let loads = &loads;
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(value.to_owned())
        }
    };
    let (x, y, z) = tokio::join!(
        a1.get_or_load::<String, _, _, _>("k", None, slow("a")),
        a2.get_or_load::<String, _, _, _>("k", None, slow("a")),
        b.get_or_load::<String, _, _, _>("k", None, slow("b")),
    );
    assert_eq!(
        (x.unwrap(), y.unwrap(), z.unwrap()),
        ("a".to_owned(), "a".to_owned(), "b".to_owned())
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one load per namespace");
}
