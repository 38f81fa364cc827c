//! Metrics (feature `metrics`) after real operations: the in-memory backend, Redis, tiered
//! instances in both invalidation modes, cache-aside loads and locks. One debugging recorder
//! is installed for the whole binary before any service is built (handles are registered at
//! build time); the tests take turns (a mutex), and each reads the counters' changes since
//! its own first snapshot (the debugging recorder hands back and zeroes them per snapshot).

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cachet::backend::tiered::InvalidationMode;
use cachet::observe::names;
use cachet::{
    CacheService, CacheServiceExt, ConcurrencyService, LoadOptions, LocalConcurrencyService,
    LockError, LockOptions, MokaCacheService, RedisCacheService, RedisConcurrencyService,
    TieredCacheService,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::RedisServer;
use tokio::sync::{Mutex, MutexGuard};

const DELIVERY: Duration = Duration::from_secs(10);

/// The recorder, installed once, and the turn every test takes.
fn recorder() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

async fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::const_new(());
    let guard = TURN.lock().await;
    recorder().snapshot(); // what earlier tests left is not this test's
    guard
}

/// A metric's labels, as (key, value) pairs.
type Labels = Vec<(String, String)>;

/// What changed since the last snapshot: name, labels, value.
struct Changes(Vec<(String, Labels, DebugValue)>);

impl Changes {
    fn now() -> Self {
        Changes(
            recorder()
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| {
                    let key = key.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    (key.name().to_owned(), labels, value)
                })
                .collect(),
        )
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0.iter().filter_map(move |(n, have, value)| {
            let all = labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
            (n == name && all).then_some(value)
        })
    }

    /// The sum of the counters named `name` that carry every label of `labels`.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|value| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// How many values the histograms named `name` with `labels` recorded.
    fn recorded(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.matching(name, labels)
            .map(|value| match value {
                DebugValue::Histogram(values) => values.len(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    }

    /// Every label value seen on `name`, for the "fixed set, never a key" check.
    fn label_values(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .flat_map(|(_, labels, _)| labels.iter().map(|(_, v)| v.clone()))
            .collect()
    }
}

fn key(test: &str) -> String {
    cachet::conformance::unique_prefix(test)
}

#[tokio::test]
async fn the_in_memory_backend_counts_hits_misses_operations_and_errors() {
    let _turn = turn().await;
    let cache = MokaCacheService::default();
    let k = key("memory");
    cache.set(&k, &"v", None).await.unwrap();
    let hit: Option<String> = cache.get(&k).await.unwrap();
    let miss: Option<String> = cache.get(&format!("{k}:absent")).await.unwrap();
    assert_eq!((hit.as_deref(), miss), (Some("v"), None));
    let refused = cache.set_bytes(&k, "v".into(), Some(0)).await;
    assert!(refused.is_err());
    cache.invalidate(&k).await.unwrap();
    assert_eq!(cache.invalidate_prefix(&k).await.unwrap(), 0);

    let changes = Changes::now();
    assert_eq!(changes.counter(names::HITS, &[("layer", "memory")]), 1);
    assert_eq!(changes.counter(names::MISSES, &[("layer", "memory")]), 1);
    let op = |operation| [("operation", operation), ("backend", "memory")];
    assert_eq!(changes.recorded(names::OPERATION_DURATION, &op("get")), 2);
    assert_eq!(changes.recorded(names::OPERATION_DURATION, &op("set")), 2);
    assert_eq!(
        changes.recorded(names::OPERATION_DURATION, &op("invalidate")),
        1
    );
    assert_eq!(
        changes.recorded(names::OPERATION_DURATION, &op("invalidate_prefix")),
        1
    );
    let error = [
        ("kind", "invalid_argument"),
        ("operation", "set"),
        ("backend", "memory"),
    ];
    assert_eq!(changes.counter(names::ERRORS, &error), 1);
    for value in changes.label_values(names::OPERATION_DURATION) {
        assert!(!value.contains(&k), "a key in a label: {value}");
    }

    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (Some(1), Some(1)));
}

#[tokio::test]
async fn the_redis_backend_counts_its_reads_and_operations() {
    let _turn = turn().await;
    let cache = RedisCacheService::new(&RedisServer::shared().url(), 60)
        .await
        .unwrap();
    let k = key("redis");
    cache.set(&k, &1u32, None).await.unwrap();
    let _: Option<u32> = cache.get(&k).await.unwrap();
    let _: Option<u32> = cache.get(&format!("{k}:absent")).await.unwrap();
    let _: Option<u32> = cache.get(&format!("{k}:absent2")).await.unwrap();
    assert!(cache.set_bytes(&k, "1".into(), Some(0)).await.is_err());

    let changes = Changes::now();
    assert_eq!(changes.counter(names::HITS, &[("layer", "redis")]), 1);
    assert_eq!(changes.counter(names::MISSES, &[("layer", "redis")]), 2);
    let get = [("operation", "get"), ("backend", "redis")];
    assert_eq!(changes.recorded(names::OPERATION_DURATION, &get), 3);
    let error = [("kind", "invalid_argument"), ("backend", "redis")];
    assert_eq!(changes.counter(names::ERRORS, &error), 1);
}

async fn tiered(mode: InvalidationMode, channel: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(RedisServer::shared().url()))
        .invalidation(mode)
        .channel_prefix(channel)
        .build()
        .await
        .expect("tiered instance")
}

#[tokio::test]
async fn a_tiered_instance_counts_l1_and_redis_reads_and_the_invalidations_it_sends_and_hears() {
    let _turn = turn().await;
    let channel = key("observability-bus");
    let (a, b) = (
        tiered(InvalidationMode::Bus, &channel).await,
        tiered(InvalidationMode::Bus, &channel).await,
    );
    assert!(a.wait_until_confirmed(DELIVERY).await);
    assert!(b.wait_until_confirmed(DELIVERY).await);
    Changes::now();
    let k = key("tiered");
    // B reads only once it heard A's write: a late message would drop B's fill.
    let applied = b.invalidations_applied();
    a.set(&k, &"one", None).await.unwrap();
    assert!(b.wait_for_invalidations(applied + 1, DELIVERY).await);
    let first: Option<String> = b.get(&k).await.unwrap(); // L1 miss, Redis hit, fill
    let second: Option<String> = b.get(&k).await.unwrap(); // L1 hit
    assert_eq!(
        (first.as_deref(), second.as_deref()),
        (Some("one"), Some("one"))
    );
    let applied = b.invalidations_applied();
    a.set(&k, &"two", None).await.unwrap();
    assert!(b.wait_for_invalidations(applied + 1, DELIVERY).await);

    let changes = Changes::now();
    assert_eq!(changes.counter(names::HITS, &[("layer", "l1")]), 1);
    assert_eq!(changes.counter(names::MISSES, &[("layer", "l1")]), 1);
    assert_eq!(changes.counter(names::HITS, &[("layer", "redis")]), 1);
    assert_eq!(
        changes.counter(names::INVALIDATIONS_SENT, &[("source", "bus")]),
        2
    );
    assert!(changes.counter(names::INVALIDATIONS_RECEIVED, &[("source", "bus")]) >= 1);
    let tiered_get = [("operation", "get"), ("backend", "tiered")];
    assert_eq!(changes.recorded(names::OPERATION_DURATION, &tiered_get), 2);
    let tiered_set = [("operation", "set"), ("backend", "tiered")];
    assert_eq!(changes.recorded(names::OPERATION_DURATION, &tiered_set), 2);

    let stats = b.stats();
    assert_eq!((stats.hits, stats.misses), (Some(1), Some(1)));

    // A reconnect of the subscriber clears the L1 (reason `reconnect`); shutting down too.
    let resets = b.l1_resets();
    RedisServer::shared().cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let deadline = tokio::time::Instant::now() + DELIVERY;
    while b.l1_resets() == resets && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        b.l1_resets() > resets,
        "the subscriber's reconnect reset the L1"
    );
    b.shutdown().await;
    let changes = Changes::now();
    assert!(changes.counter(names::L1_RESETS, &[("reason", "reconnect")]) >= 1);
    assert!(changes.counter(names::L1_RESETS, &[("reason", "shutdown")]) >= 1);
    assert_eq!(b.stats().resets, b.l1_resets());
    a.shutdown().await;
}

#[tokio::test]
async fn a_tracking_instance_counts_the_servers_invalidations() {
    let _turn = turn().await;
    let channel = key("observability-tracking");
    let reader = tiered(InvalidationMode::Tracking, &channel).await;
    assert!(reader.wait_until_confirmed(DELIVERY).await);
    let writer = RedisCacheService::new(&RedisServer::shared().url(), 60)
        .await
        .unwrap();
    let k = key("tracked");
    reader.set(&k, &"one", None).await.unwrap();
    let _: Option<String> = reader.get(&k).await.unwrap(); // tracked from here
    let applied = reader.invalidations_applied();
    Changes::now();
    writer.invalidate(&k).await.unwrap(); // a write by another client
    assert!(reader.wait_for_invalidations(applied + 1, DELIVERY).await);
    let changes = Changes::now();
    assert!(changes.counter(names::INVALIDATIONS_RECEIVED, &[("source", "tracking")]) >= 1);
    reader.shutdown().await;
}

#[derive(Debug)]
struct Missing;

#[tokio::test]
async fn loads_are_counted_by_outcome() {
    let _turn = turn().await;
    let cache = MokaCacheService::default();
    let k = key("loads");

    let loaded: u32 = cache
        .get_or_load(&k, Some(60), || async { Ok::<_, Missing>(7) })
        .await
        .unwrap();
    let hit: u32 = cache
        .get_or_load(&k, Some(60), || async { Ok::<_, Missing>(8) })
        .await
        .unwrap();
    assert_eq!((loaded, hit), (7, 7));
    let failed = cache
        .get_or_load::<u32, _, _, _>(&format!("{k}:err"), Some(60), || async { Err(Missing) })
        .await;
    assert!(failed.is_err());
    let negative = cache
        .get_or_load_with::<u32, Missing, _, _>(
            &format!("{k}:none"),
            &LoadOptions::default().negative_ttl_secs(60),
            || async { Ok(None) },
        )
        .await
        .unwrap();
    assert!(negative.value.is_none());
    let timed_out = cache
        .get_or_load_with::<u32, Missing, _, _>(
            &format!("{k}:slow"),
            &LoadOptions::default().load_timeout(Duration::from_millis(50)),
            || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Some(1))
            },
        )
        .await;
    assert!(timed_out.is_err());

    // Two concurrent misses of one key: one loads, the other joins.
    let joined_key = format!("{k}:joined");
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let leader = {
        let (cache, key) = (cache.clone(), joined_key.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(60), || async move {
                    let _ = gate_rx.await;
                    Ok::<_, Missing>(1u32)
                })
                .await
        })
    };
    while cachet::load::loads_in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let waiter = {
        let (cache, key) = (cache.clone(), joined_key.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, Some(60), || async { Ok::<_, Missing>(2u32) })
                .await
        })
    };
    // Time for the waiter to reach the flight (nothing shows a waiter from outside; a late
    // one would find the value cached and fail the `joined` count, never pass wrongly).
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate_tx.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), 1);
    assert_eq!(waiter.await.unwrap().unwrap(), 1);

    let changes = Changes::now();
    let loads = |outcome| changes.counter(names::LOADS, &[("outcome", outcome)]);
    assert_eq!(
        loads("loaded"),
        2,
        "the first load and the joined one's leader"
    );
    assert_eq!(loads("joined"), 1);
    assert_eq!(loads("error"), 1);
    assert_eq!(loads("negative"), 1);
    assert_eq!(loads("timeout"), 1);
    assert_eq!(changes.recorded(names::LOAD_DURATION, &[]), 6);
}

#[tokio::test]
async fn fail_safe_loads_are_counted_as_stale() {
    let _turn = turn().await;
    let cache = MokaCacheService::default();
    let k = key("stale");
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60));
    cache
        .get_or_load_with::<u32, Missing, _, _>(&k, &options, || async { Ok(Some(1)) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await; // past its TTL, inside the grace
    Changes::now();
    let stale = cache
        .get_or_load_with::<u32, Missing, _, _>(&k, &options, || async { Err(Missing) })
        .await
        .unwrap();
    assert!(stale.is_stale());
    let changes = Changes::now();
    assert_eq!(changes.counter(names::LOADS, &[("outcome", "stale")]), 1);
}

#[tokio::test]
async fn locks_count_acquisitions_waits_and_losses() {
    let _turn = turn().await;
    let local = LocalConcurrencyService::default();
    let k = key("lock");
    let held = local.acquire(&k, &LockOptions::default()).await.unwrap();
    let once = LockOptions::default().wait_timeout(Duration::ZERO);
    assert!(matches!(
        local.acquire(&k, &once).await,
        Err(LockError::Timeout { .. })
    ));
    held.release().await.unwrap();

    let redis: Arc<dyn ConcurrencyService> = Arc::new(
        RedisConcurrencyService::new(&RedisServer::shared().url())
            .await
            .unwrap(),
    );
    let short = LockOptions::default()
        .lease(Duration::from_millis(200))
        .renew(false);
    let guard = redis.acquire(&k, &short).await.unwrap();
    tokio::time::timeout(DELIVERY, guard.lost())
        .await
        .expect("a lease that is not renewed is lost at its end");

    let changes = Changes::now();
    assert_eq!(
        changes.counter(names::LOCK_ACQUIRED, &[("backend", "local")]),
        1
    );
    assert_eq!(
        changes.counter(names::LOCK_ACQUIRED, &[("backend", "redis")]),
        1
    );
    let wait = |backend, outcome| {
        changes.recorded(
            names::LOCK_WAIT,
            &[("backend", backend), ("outcome", outcome)],
        )
    };
    assert_eq!(wait("local", "acquired"), 1);
    assert_eq!(wait("local", "timeout"), 1);
    assert_eq!(wait("redis", "acquired"), 1);
    assert_eq!(
        changes.counter(names::LOCK_LOST, &[("backend", "redis")]),
        1
    );
    drop(guard);
}
