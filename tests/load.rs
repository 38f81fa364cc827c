//! Cache-aside where backends differ. What every backend shares (single flight, loader
//! errors, negative caching, fail-safe, load timeouts, corrupt entries) is in
//! `cachet::conformance` and runs on every backend and decorator through
//! `conformance_tests!`. Here: one flight across clones and wrappers of one service, a Redis
//! that is down, the lease across instances (one load for many, a holder that died, a
//! cancelled or slow load, a foreign key type), namespaces. Redis runs for real
//! (tests/support), never 6379.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachet::conformance::unique_prefix;
use cachet::{
    Cache, CacheService, CacheServiceExt, LoadOptions, LoadSource, MokaCacheService,
    RedisCacheService, TieredCacheService,
};
use serde::{Deserialize, Serialize};
use support::RedisServer;

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

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
        matches!(
            loaded.cache_error,
            Some(cachet::CacheError::Backend { .. } | cachet::CacheError::Timeout { .. })
        ),
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
        instances.push(make(RedisServer::shared().url()).await);
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
    let cache = redis(RedisServer::shared().url()).await;
    let key = format!("{}org:acme", unique_prefix("dead-holder"));
    RedisServer::shared().cli(&["HSET", &key, "cachet-lease", "token-of-a-dead-process"]);
    RedisServer::shared().cli(&["PEXPIRE", &key, "1500"]);
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
        redis(RedisServer::shared().url()).await,
        redis(RedisServer::shared().url()).await,
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
        RedisServer::shared().cli(&["TYPE", &key]).trim(),
        "hash",
        "A holds the lease"
    );
    pending.abort();
    let _ = pending.await;
    let deadline = Instant::now() + HANG;
    while RedisServer::shared().cli(&["EXISTS", &key]).trim() != "0" {
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
        redis(RedisServer::shared().url()).await,
        redis(RedisServer::shared().url()).await,
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
    while RedisServer::shared().cli(&["TYPE", &key]).trim() != "hash" {
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
    let cache = redis(RedisServer::shared().url()).await;
    let key = format!("{}list", unique_prefix("foreign"));
    RedisServer::shared().cli(&["RPUSH", &key, "a", "b"]);
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
    assert_eq!(
        RedisServer::shared().cli(&["LLEN", &key]).trim(),
        "2",
        "left alone"
    );
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
