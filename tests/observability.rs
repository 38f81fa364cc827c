//! Metrics (feature `metrics`) after real operations: the in-memory backend, Redis, tiered
//! instances in both invalidation modes, cache-aside loads and locks. One debugging recorder
//! is installed for the whole binary before any service is built (handles are registered at
//! build time); the tests take turns (a mutex), and each reads the counters' changes since
//! its own first snapshot (the debugging recorder hands back and zeroes them per snapshot).
//!
//! Spans (feature `tracing`): the tests at the end record every span their own thread opens
//! (a registry with a recording layer, set as the thread's default subscriber around a
//! current-thread runtime) and check the names, attributes and parents a tracing backend
//! would show.

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
async fn eager_refreshes_are_counted_as_refreshed_or_dropped() {
    let _turn = turn().await;
    let cache = MokaCacheService::default();
    let k = key("refresh");
    let options = LoadOptions::default().ttl_secs(4).eager_refresh(0.25);
    for key in [k.clone(), format!("{k}:dropped")] {
        cache
            .get_or_load_with::<u32, Missing, _, _>(&key, &options, || async { Ok(Some(1)) })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await; // past the refresh point
    Changes::now();
    // A refresh that stores its value.
    let served = cache
        .get_or_load_with::<u32, Missing, _, _>(&k, &options, || async { Ok(Some(2)) })
        .await
        .unwrap();
    assert_eq!(served.value, Some(1));
    // A refresh overtaken by an invalidation while its loader ran.
    let dropped_key = format!("{k}:dropped");
    let served = cache
        .get_or_load_with::<u32, Missing, _, _>(&dropped_key, &options, || async {
            cache.invalidate(&dropped_key).await.unwrap();
            Ok(Some(2))
        })
        .await
        .unwrap();
    assert_eq!(served.value, Some(1));
    let changes = Changes::now();
    let loads = |outcome| changes.counter(names::LOADS, &[("outcome", outcome)]);
    assert_eq!((loads("refreshed"), loads("refresh_dropped")), (1, 1));
    assert_eq!(cache.get::<u32>(&k).await.unwrap(), Some(2));
    assert_eq!(cache.get::<u32>(&dropped_key).await.unwrap(), None);
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

/// One span as a tracing backend would show it: name, parent's name, fields.
#[derive(Clone, Debug)]
struct SeenSpan {
    name: &'static str,
    parent: Option<&'static str>,
    fields: Vec<(&'static str, String)>,
}

impl SeenSpan {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Records every span's fields, at creation and as they are filled in.
#[derive(Clone, Default)]
struct Recording(Arc<std::sync::Mutex<Vec<SeenSpan>>>);

/// Where a span's record is in the list (a span extension).
struct Slot(usize);

struct Fields<'a>(&'a mut Vec<(&'static str, String)>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for Recording
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let span = ctx.span(id).expect("a new span is registered");
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let mut seen = self.0.lock().unwrap();
        seen.push(SeenSpan {
            name: attrs.metadata().name(),
            parent: span.parent().map(|p| p.name()),
            fields,
        });
        span.extensions_mut().insert(Slot(seen.len() - 1));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let span = ctx.span(id).expect("a recorded span is registered");
        let extensions = span.extensions();
        let Slot(slot) = extensions.get::<Slot>().expect("recorded at creation");
        values.record(&mut Fields(&mut self.0.lock().unwrap()[*slot].fields));
    }
}

impl Recording {
    fn spans(&self) -> Vec<SeenSpan> {
        self.0.lock().unwrap().clone()
    }

    /// Spans of cachet's only (fred opens none; this keeps the checks to ours).
    fn named(&self, name: &str) -> Vec<SeenSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }
}

/// Runs `body` on a current-thread runtime with `recording` as this thread's subscriber,
/// so every span the body opens is recorded (and no other test's).
fn with_spans<F: Future>(recording: &Recording, body: F) -> F::Output {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(recording.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body)
}

/// The span tests take the same turns as the metric ones (`record_keys` is process-wide).
fn span_turn() -> MutexGuard<'static, ()> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(turn())
}

#[test]
fn in_memory_reads_are_spans_with_their_layer_and_answer_and_no_key() {
    let _turn = span_turn();
    let recording = Recording::default();
    let k = key("span-memory");
    with_spans(&recording, async {
        let cache = MokaCacheService::default();
        cache.set(&k, &1u32, None).await.unwrap();
        let hit: Option<u32> = cache.get(&k).await.unwrap();
        let miss: Option<u32> = cache.get(&format!("{k}:absent")).await.unwrap();
        assert_eq!((hit, miss), (Some(1), None));
        assert!(cache.set_bytes(&k, "1".into(), Some(0)).await.is_err());
    });

    let gets = recording.named("cachet.get");
    assert_eq!(gets.len(), 2, "one span per read: {gets:?}");
    for (get, hit) in gets.iter().zip(["true", "false"]) {
        assert_eq!(get.field("cachet.backend"), Some("memory"));
        assert_eq!(get.field("cachet.layer"), Some("memory"));
        assert_eq!(get.field("cachet.hit"), Some(hit));
        assert_eq!(get.field("otel.kind"), Some("client"));
        assert_eq!(get.field("db.system.name"), None, "not a database");
        assert_eq!(get.field("error.type"), None);
    }
    let sets = recording.named("cachet.set");
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].field("error.type"), None);
    assert_eq!(sets[1].field("error.type"), Some("invalid_argument"));
    for span in recording.spans() {
        assert_eq!(span.field("cachet.key"), None, "keys are off by default");
        for (name, value) in &span.fields {
            assert!(!value.contains(&k), "the key in {name} of {span:?}");
        }
    }
}

#[test]
fn redis_operations_are_database_client_spans() {
    let _turn = span_turn();
    let recording = Recording::default();
    let server = RedisServer::shared();
    let k = key("span-redis");
    with_spans(&recording, async {
        let cache = RedisCacheService::new(&server.url(), 60).await.unwrap();
        cache.set(&k, &1u32, None).await.unwrap();
        let hit: Option<u32> = cache.get(&k).await.unwrap();
        assert_eq!(hit, Some(1));
        cache.invalidate(&k).await.unwrap();
        let miss: Option<u32> = cache.get(&k).await.unwrap();
        assert_eq!(miss, None);
        cache.invalidate_prefix(&k).await.unwrap();
        assert!(cache.set_bytes(&k, "1".into(), Some(0)).await.is_err());
    });

    let port = server.port().to_string();
    let expect = [
        ("cachet.set", "SET"),
        ("cachet.get", "GET"),
        ("cachet.invalidate", "DEL"),
        ("cachet.get", "GET"),
        ("cachet.invalidate_prefix", "invalidate_prefix"),
        ("cachet.set", "SET"),
    ];
    let spans = recording.spans();
    let ours: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("cachet."))
        .collect();
    assert_eq!(
        ours.iter().map(|s| s.name).collect::<Vec<_>>(),
        expect.map(|(name, _)| name),
        "one span per operation, in order"
    );
    for (span, (_, command)) in ours.iter().zip(expect) {
        assert_eq!(span.field("db.system.name"), Some("redis"), "{span:?}");
        assert_eq!(span.field("db.operation.name"), Some(command));
        assert_eq!(span.field("server.address"), Some("127.0.0.1"));
        assert_eq!(span.field("server.port"), Some(port.as_str()));
        assert_eq!(span.field("cachet.backend"), Some("redis"));
        assert_eq!(span.field("cachet.key"), None);
    }
    assert_eq!(ours[1].field("cachet.hit"), Some("true"));
    assert_eq!(ours[1].field("cachet.layer"), Some("redis"));
    assert_eq!(ours[3].field("cachet.hit"), Some("false"));
    assert_eq!(ours[0].field("error.type"), None);
    assert_eq!(ours[5].field("error.type"), Some("invalid_argument"));
}

#[test]
fn a_tiered_l1_miss_shows_the_redis_read_as_its_child_and_a_hit_has_none() {
    let _turn = span_turn();
    let recording = Recording::default();
    let channel = key("span-tiered");
    let k = key("span-tiered-key");
    with_spans(&recording, async {
        let cache = tiered(InvalidationMode::Bus, &channel).await;
        let writer = tiered(InvalidationMode::Bus, &channel).await;
        assert!(cache.wait_until_confirmed(DELIVERY).await);
        // The reader reads once it heard the write (a late message would drop its fill).
        let applied = cache.invalidations_applied();
        writer.set(&k, &"one", None).await.unwrap();
        assert!(cache.wait_for_invalidations(applied + 1, DELIVERY).await);
        writer.shutdown().await;
        recording.0.lock().unwrap().clear();
        let miss: Option<String> = cache.get(&k).await.unwrap(); // L1 miss, Redis read
        let hit: Option<String> = cache.get(&k).await.unwrap(); // L1 hit
        assert_eq!(
            (miss.as_deref(), hit.as_deref()),
            (Some("one"), Some("one"))
        );
        cache.shutdown().await;
    });

    let gets = recording.named("cachet.get");
    let tiered: Vec<_> = gets
        .iter()
        .filter(|s| s.field("cachet.backend") == Some("tiered"))
        .collect();
    let redis: Vec<_> = gets
        .iter()
        .filter(|s| s.field("cachet.backend") == Some("redis"))
        .collect();
    assert_eq!(tiered.len(), 2, "{gets:?}");
    assert_eq!(redis.len(), 1, "only the miss went to Redis: {gets:?}");
    assert_eq!(
        redis[0].parent,
        Some("cachet.get"),
        "a child of the tiered read"
    );
    assert_eq!(redis[0].field("cachet.hit"), Some("true"));
    assert_eq!(redis[0].field("cachet.layer"), Some("redis"));
    assert_eq!(tiered[0].field("db.system.name"), Some("redis"));
    assert_eq!(tiered[0].field("cachet.hit"), Some("false"));
    assert_eq!(tiered[1].field("cachet.layer"), Some("l1"));
    assert_eq!(tiered[1].field("cachet.hit"), Some("true"));
    assert_eq!(tiered[0].parent, None);
}

#[test]
fn keys_are_recorded_only_once_the_app_opts_in() {
    let _turn = span_turn();
    let recording = Recording::default();
    let k = key("span-keys");
    with_spans(&recording, async {
        let cache = MokaCacheService::default();
        let _: Option<u32> = cache.get(&k).await.unwrap();
        cachet::observe::record_keys(true);
        let _: Option<u32> = cache.get(&k).await.unwrap();
        cachet::observe::record_keys(false);
        let _: Option<u32> = cache.get(&k).await.unwrap();
    });
    let keys: Vec<_> = recording
        .named("cachet.get")
        .iter()
        .map(|s| s.field("cachet.key").map(str::to_owned))
        .collect();
    assert_eq!(keys, [None, Some(k.clone()), None]);
}
