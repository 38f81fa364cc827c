//! Locks: one shared suite of checks on the in-process and the Redis implementations
//! (standalone and cluster), then what only the distributed lock has (two separate
//! connections as two app instances, lease loss, renewal, a server that dies).

mod support;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{
    Concurrency, ConcurrencyService, ConcurrencyServiceExt, LocalConcurrencyService, LockError,
    LockOptions, RedisCacheService, RedisConcurrencyService,
};
use fred::prelude::KeysInterface;
use support::{RedisCluster, RedisServer};

const BOUND: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

// ---- the shared suite ----

/// 16 concurrent holders x 50 non-atomic read-modify-writes: the exact count.
async fn one_holder_per_key(locks: &dyn ConcurrencyService, prefix: &str) {
    let counter = AtomicU64::new(0);
    let k = key(prefix, "counter");
    let workers = (0..16).map(|_| async {
        for _ in 0..50 {
            locks
                .with_lock(&k, async {
                    let read = counter.load(Ordering::SeqCst);
                    tokio::task::yield_now().await; // let others in, if the lock allowed it
                    counter.store(read + 1, Ordering::SeqCst);
                })
                .await
                .unwrap();
        }
    });
    bounded("16 workers", futures_util::future::join_all(workers)).await;
    assert_eq!(counter.load(Ordering::SeqCst), 16 * 50);
}

/// Holders of two different keys are inside at the same time.
async fn different_keys_run_concurrently(locks: &dyn ConcurrencyService, prefix: &str) {
    let both_inside = tokio::sync::Barrier::new(2);
    let holder = |name: &'static str| {
        let k = key(prefix, name);
        let barrier = &both_inside;
        async move {
            locks
                .with_lock(&k, async {
                    tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                        .await
                        .expect("the other key's holder never got in: keys serialized")
                })
                .await
                .unwrap();
        }
    };
    bounded(
        "two keys",
        futures_util::future::join(holder("a"), holder("b")),
    )
    .await;
}

/// Fencing tokens strictly increase per key.
async fn fencing_tokens_increase(locks: &dyn ConcurrencyService, prefix: &str) {
    let k = key(prefix, "fenced");
    let mut last = 0;
    for _ in 0..20 {
        let guard = locks.acquire(&k, &LockOptions::default()).await.unwrap();
        assert!(
            guard.fencing_token() > last,
            "{} after {last}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
}

/// Waiting past the wait timeout is `Timeout` naming the key; zero tries once.
async fn wait_timeout_is_timeout(locks: &dyn ConcurrencyService, prefix: &str) {
    let k = key(prefix, "busy");
    let held = locks.acquire(&k, &LockOptions::default()).await.unwrap();
    let options = LockOptions::default().wait_timeout(Duration::from_millis(200));
    match bounded("wait", locks.acquire(&k, &options)).await {
        Err(e @ LockError::Timeout { .. }) => assert!(e.to_string().contains(&k), "{e}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let once = LockOptions::default().wait_timeout(Duration::ZERO);
    assert!(matches!(
        locks.acquire(&k, &once).await,
        Err(LockError::Timeout { .. })
    ));
    held.release().await.unwrap();
    locks
        .acquire(&k, &once)
        .await
        .expect("free now")
        .release()
        .await
        .unwrap();
}

/// The user's own errors come back unchanged inside `Ok`.
async fn user_errors_pass_through(locks: &dyn ConcurrencyService, prefix: &str) {
    let k = key(prefix, "errors");
    let out: Result<Result<u8, String>, LockError> =
        locks.with_lock(&k, async { Err("boom".to_owned()) }).await;
    assert_eq!(out.unwrap(), Err("boom".to_owned()));
    // ...and the lock is free again.
    let once = LockOptions::default().wait_timeout(Duration::ZERO);
    locks
        .acquire(&k, &once)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// A dropped guard frees the lock (in the background).
async fn dropped_guard_releases(locks: &dyn ConcurrencyService, prefix: &str) {
    let k = key(prefix, "dropped");
    drop(locks.acquire(&k, &LockOptions::default()).await.unwrap());
    let options = LockOptions::default().wait_timeout(Duration::from_secs(10));
    let again = bounded("acquire after drop", locks.acquire(&k, &options)).await;
    again
        .expect("the dropped guard let go")
        .release()
        .await
        .unwrap();
}

/// An empty key and a zero lease are `InvalidArgument`.
async fn bad_arguments_are_errors(locks: &dyn ConcurrencyService, prefix: &str) {
    let err = locks
        .acquire("", &LockOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, LockError::InvalidArgument { .. }), "{err:?}");
    let zero = LockOptions::default().lease(Duration::ZERO);
    let err = locks.acquire(&key(prefix, "x"), &zero).await.unwrap_err();
    assert!(matches!(err, LockError::InvalidArgument { .. }), "{err:?}");
}

macro_rules! lock_suite {
    ($make:expr) => {
        lock_suite!(@each $make; one_holder_per_key, different_keys_run_concurrently,
            fencing_tokens_increase, wait_timeout_is_timeout, user_errors_pass_through,
            dropped_guard_releases, bad_arguments_are_errors);
    };
    (@each $make:expr; $($check:ident),+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let locks = $make;
            let prefix = cachet::conformance::unique_prefix(stringify!($check));
            super::$check(&locks, &prefix).await;
        }
    )+};
}

fn standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

async fn redis_locks(url: String) -> RedisConcurrencyService {
    RedisConcurrencyService::new(&url).await.expect("connect")
}

mod local {
    lock_suite!(cachet::LocalConcurrencyService::default());
}

mod local_through_enum {
    lock_suite!(cachet::Concurrency::from(
        cachet::LocalConcurrencyService::default()
    ));
}

mod redis_standalone {
    lock_suite!(super::redis_locks(super::standalone().url()).await);
}

mod redis_cluster {
    lock_suite!(super::redis_locks(super::RedisCluster::shared().url()).await);
}

mod redis_through_arc_dyn {
    lock_suite!(
        std::sync::Arc::new(super::redis_locks(super::standalone().url()).await)
            as std::sync::Arc<dyn cachet::ConcurrencyService>
    );
}

// ---- in-process only ----

#[tokio::test]
async fn local_map_forgets_keys_nobody_uses() {
    let locks = LocalConcurrencyService::default();
    for i in 0..100_000 {
        let guard = locks
            .acquire(&format!("k{i}"), &LockOptions::default())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    assert_eq!(locks.keys_in_use(), 0);
    // A waiter that times out leaves nothing behind either.
    let held = locks
        .acquire("busy", &LockOptions::default())
        .await
        .unwrap();
    let once = LockOptions::default().wait_timeout(Duration::from_millis(10));
    assert!(locks.acquire("busy", &once).await.is_err());
    assert_eq!(locks.keys_in_use(), 1);
    drop(held);
    assert_eq!(locks.keys_in_use(), 0);
}

// ---- distributed only ----

/// Two app instances (separate connections) x 16 tasks x 100 non-atomic read-modify-writes
/// of a counter stored in Redis: the exact count, so never two holders at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_hold_one_key_together() {
    let url = standalone().url();
    let counter_key = cachet::conformance::unique_prefix("rmw");
    let lock_key = format!("{counter_key}lock");
    let store = RedisCacheService::new(&url, 300).await.unwrap();
    store
        .client()
        .set::<(), _, _>(&counter_key, 0, None, None, false)
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for _instance in 0..2 {
        let locks = Arc::new(redis_locks(url.clone()).await);
        let data = Arc::new(RedisCacheService::new(&url, 300).await.unwrap());
        for _ in 0..16 {
            let (locks, data, counter_key, lock_key) = (
                locks.clone(),
                data.clone(),
                counter_key.clone(),
                lock_key.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let options = LockOptions::default().wait_timeout(Duration::from_secs(60));
                for _ in 0..100 {
                    locks
                        .with_lock_options(&lock_key, &options, async {
                            let n: u64 = data.client().get(&counter_key).await.unwrap();
                            data.client()
                                .set::<(), _, _>(&counter_key, n + 1, None, None, false)
                                .await
                                .unwrap();
                        })
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for task in tasks {
        bounded("3200 locked increments", task).await.unwrap();
    }
    let n: u64 = store.client().get(&counter_key).await.unwrap();
    assert_eq!(n, 2 * 16 * 100, "mutual exclusion violated");
}

#[tokio::test]
async fn a_holder_that_stops_renewing_loses_the_lock_and_cannot_delete_the_next() {
    let a = redis_locks(standalone().url()).await;
    let b = redis_locks(standalone().url()).await;
    let k = cachet::conformance::unique_prefix("stale");
    let short = LockOptions::default()
        .lease(Duration::from_millis(300))
        .renew(false);
    let stale = a.acquire(&k, &short).await.unwrap();
    let wait = LockOptions::default().wait_timeout(Duration::from_secs(10));
    let fresh = bounded("b takes the expired lock", b.acquire(&k, &wait))
        .await
        .unwrap();
    assert!(fresh.fencing_token() > stale.fencing_token());
    bounded("a learns it lost", stale.lost()).await;
    assert!(stale.is_lost());
    assert!(matches!(
        stale.release().await,
        Err(LockError::LeaseLost { .. })
    ));
    // B's lock survived A's release attempt.
    let once = LockOptions::default().wait_timeout(Duration::ZERO);
    assert!(matches!(
        a.acquire(&k, &once).await,
        Err(LockError::Timeout { .. })
    ));
    fresh.release().await.unwrap();
}

#[tokio::test]
async fn renewal_keeps_a_short_lease_alive() {
    let a = redis_locks(standalone().url()).await;
    let b = redis_locks(standalone().url()).await;
    let k = cachet::conformance::unique_prefix("renewed");
    let short = LockOptions::default().lease(Duration::from_millis(900));
    let held = a.acquire(&k, &short).await.unwrap();
    // Renewed every 300 ms, so 600 ms of slack for a busy machine; held for three leases.
    tokio::time::sleep(Duration::from_millis(2_700)).await;
    let once = LockOptions::default().wait_timeout(Duration::ZERO);
    assert!(matches!(
        b.acquire(&k, &once).await,
        Err(LockError::Timeout { .. })
    ));
    assert!(!held.is_lost());
    held.release().await.unwrap();
}

#[tokio::test]
async fn a_lock_taken_away_is_reported_lost() {
    let locks = redis_locks(standalone().url()).await;
    let k = cachet::conformance::unique_prefix("taken");
    let held = locks
        .acquire(
            &k,
            &LockOptions::default().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    standalone().cli(&["DEL", &locks.lock_key(&k)]);
    bounded("lost() after DEL", held.lost()).await;
    assert!(matches!(locks.with_lock(&k, async {}).await, Ok(())));
    assert!(matches!(
        held.release().await,
        Err(LockError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn fencing_tokens_increase_across_instances() {
    let a = redis_locks(standalone().url()).await;
    let b = redis_locks(standalone().url()).await;
    let k = cachet::conformance::unique_prefix("fence2");
    let mut last = 0;
    for i in 0..20 {
        let locks = if i % 2 == 0 { &a } else { &b };
        let guard = locks.acquire(&k, &LockOptions::default()).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_gives_backend_errors_not_hangs() {
    let server = RedisServer::start();
    let connection = RedisCacheService::builder(server.url())
        .command_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let locks = Arc::new(RedisConcurrencyService::from_connection(connection));
    let held = locks.acquire("k", &LockOptions::default()).await.unwrap();
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move {
            let options = LockOptions::default().wait_timeout(Duration::from_secs(60));
            locks.acquire("k", &options).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    let waited = bounded("the waiter", waiter).await.unwrap();
    assert!(
        matches!(waited, Err(LockError::Backend { .. })),
        "{waited:?}"
    );
    let released = bounded("release", held.release()).await;
    assert!(
        matches!(released, Err(LockError::Backend { .. })),
        "{released:?}"
    );
    let err = bounded("acquire", locks.acquire("other", &LockOptions::default())).await;
    assert!(matches!(err, Err(LockError::Backend { .. })), "{err:?}");
}

#[tokio::test]
async fn build_concurrency_service_chooses_the_backend() {
    let local = cachet::build_concurrency_service(None).await.unwrap();
    assert!(format!("{local:?}").starts_with("LocalConcurrencyService"));
    let redis = cachet::build_concurrency_service(Some(&standalone().url()))
        .await
        .unwrap();
    assert!(format!("{redis:?}").starts_with("RedisConcurrencyService"));
    let _ = Concurrency::from(LocalConcurrencyService::default());
}
