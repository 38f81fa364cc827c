//! Locks: one shared suite of checks on the in-process and the Redis implementations
//! (standalone and cluster), then what only the distributed lock has (two separate
//! connections as two app instances, lease loss, renewal, a server that dies).

mod support;

use std::sync::Arc;
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
    let out: Result<Result<u8, String>, cachet::WithLockError<Result<u8, String>>> =
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
    lock_suite!(super::redis_locks(super::RedisServer::shared().url()).await);
}

mod redis_cluster {
    lock_suite!(super::redis_locks(super::RedisCluster::shared().url()).await);
}

mod redis_through_arc_dyn {
    lock_suite!(
        std::sync::Arc::new(super::redis_locks(super::RedisServer::shared().url()).await)
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
    let url = RedisServer::shared().url();
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
    let a = redis_locks(RedisServer::shared().url()).await;
    let b = redis_locks(RedisServer::shared().url()).await;
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
    let a = redis_locks(RedisServer::shared().url()).await;
    let b = redis_locks(RedisServer::shared().url()).await;
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
    let locks = redis_locks(RedisServer::shared().url()).await;
    let k = cachet::conformance::unique_prefix("taken");
    let held = locks
        .acquire(
            &k,
            &LockOptions::default().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    RedisServer::shared().cli(&["DEL", &locks.lock_key(&k)]);
    bounded("lost() after DEL", held.lost()).await;
    assert!(matches!(locks.with_lock(&k, async {}).await, Ok(())));
    assert!(matches!(
        held.release().await,
        Err(LockError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn fencing_tokens_increase_across_instances() {
    let a = redis_locks(RedisServer::shared().url()).await;
    let b = redis_locks(RedisServer::shared().url()).await;
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
    let redis = cachet::build_concurrency_service(Some(&RedisServer::shared().url()))
        .await
        .unwrap();
    assert!(format!("{redis:?}").starts_with("RedisConcurrencyService"));
    let _ = Concurrency::from(LocalConcurrencyService::default());
}

// ---- under faults (Redisson's lock tests; Kleppmann 2016) ----

/// Every key under `prefix` on `servers`, with its `PTTL` (-1: no expiry).
fn keys_and_ttls(servers: &[&RedisServer], prefix: &str) -> Vec<(String, i64)> {
    let pattern = format!("{prefix}*");
    let mut out = Vec::new();
    for server in servers {
        for key in server.cli(&["--scan", "--pattern", &pattern]).lines() {
            let key = key.trim();
            if key.is_empty() {
                continue;
            }
            let ttl: i64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
            out.push((key.to_owned(), ttl));
        }
    }
    out
}

fn cluster_nodes() -> Vec<&'static RedisServer> {
    RedisCluster::shared().nodes().iter().collect()
}

/// 300 lock names used once each (names from input: job ids, org slugs) leave no key
/// without an expiry; a tight acquire/release loop on one name leaves no lock key and
/// nothing immortal either.
async fn nothing_the_lock_writes_lives_forever(url: String, servers: Vec<&RedisServer>) {
    let prefix = cachet::conformance::unique_prefix("immortal");
    let locks = redis_locks(url).await.with_prefix(prefix.clone());
    for i in 0..300 {
        let guard = locks
            .acquire(&format!("job-{i}"), &LockOptions::default())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    for _ in 0..500 {
        locks
            .acquire("tight", &LockOptions::default())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let keys = keys_and_ttls(&servers, &prefix);
    assert!(!keys.is_empty(), "the scan found nothing under {prefix}");
    let immortal: Vec<_> = keys.iter().filter(|(_, ttl)| *ttl < 0).collect();
    assert!(
        immortal.is_empty(),
        "{} of {} keys without an expiry, e.g. {:?}",
        immortal.len(),
        keys.len(),
        immortal.first()
    );
    assert!(
        !keys.iter().any(|(k, _)| *k == locks.lock_key("tight")),
        "a released lock key is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_lock_writes_lives_forever_on_redis() {
    nothing_the_lock_writes_lives_forever(RedisServer::shared().url(), vec![RedisServer::shared()])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_lock_writes_lives_forever_on_a_cluster() {
    nothing_the_lock_writes_lives_forever(RedisCluster::shared().url(), cluster_nodes()).await;
}

/// The fencing token of the next acquisition, after releasing one.
async fn next_token(locks: &RedisConcurrencyService, key: &str) -> u64 {
    let options = LockOptions::default().wait_timeout(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        match locks.acquire(key, &options).await {
            Ok(guard) => {
                let token = guard.fencing_token();
                guard.release().await.unwrap();
                return token;
            }
            // Right after a restart the connection may still be coming back.
            Err(LockError::Backend { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("acquire {key}: {e}"),
        }
    }
}

/// The server loses the fencing counter (a flush, a restart without persistence, the
/// counter's own idle expiry): the next token is still larger than every one before, so a
/// store that checks tokens still refuses the stale holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_never_go_back_when_the_counter_is_lost() {
    let server = RedisServer::start();
    let connection = RedisCacheService::builder(server.url())
        .command_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let locks = RedisConcurrencyService::from_connection(connection);
    let mut last = 0;
    for _ in 0..5 {
        last = next_token(&locks, "fenced").await;
    }
    server.cli(&["FLUSHALL"]);
    let after_flush = next_token(&locks, "fenced").await;
    assert!(
        after_flush > last,
        "after FLUSHALL: {after_flush} <= {last}"
    );
    server.restart();
    let after_restart = next_token(&locks, "fenced").await;
    assert!(
        after_restart > after_flush,
        "after a restart: {after_restart} <= {after_flush}"
    );
    server.cli(&["PEXPIRE", &locks.fence_key("fenced"), "1"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after_expiry = next_token(&locks, "fenced").await;
    assert!(
        after_expiry > after_restart,
        "after the counter expired: {after_expiry} <= {after_restart}"
    );
}

/// The fencing counter expires after its idle time (here short), and tokens keep rising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fencing_counter_expires_and_tokens_keep_rising() {
    let prefix = cachet::conformance::unique_prefix("idle");
    let locks = redis_locks(RedisServer::shared().url())
        .await
        .with_prefix(prefix.clone())
        .with_fence_idle(Duration::from_millis(300));
    let first = next_token(&locks, "k").await;
    let fence = locks.fence_key("k");
    let ttl: i64 = RedisServer::shared()
        .cli(&["PTTL", &fence])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 300, "fence PTTL {ttl}");
    let deadline = std::time::Instant::now() + BOUND;
    while RedisServer::shared().cli(&["EXISTS", &fence]).trim() != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the counter never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(next_token(&locks, "k").await > first);
}

/// 300 acquisitions on a 60 s lease, each dropped after it was sent (a request timeout, a
/// client that went away), at varied points: none leaves the lock held, so the next caller
/// gets it at once instead of waiting out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_acquisitions_do_not_orphan_the_lock() {
    use futures_util::FutureExt;
    let locks = redis_locks(RedisServer::shared().url()).await;
    let k = cachet::conformance::unique_prefix("cancelled");
    let long = LockOptions::default().lease(Duration::from_secs(60));
    for i in 0..300u64 {
        if i % 2 == 0 {
            // Dropped right after its first poll: the script is on its way (on loopback
            // the reply may even be in already; then the guard is dropped).
            drop(locks.acquire(&k, &long).now_or_never());
        } else {
            let within = Duration::from_micros(50 * (i % 40));
            let _ = tokio::time::timeout(within, locks.acquire(&k, &long)).await;
        }
        let next = LockOptions::default().wait_timeout(Duration::from_secs(5));
        let guard = match locks.acquire(&k, &next).await {
            Ok(guard) => guard,
            Err(e) => panic!("after cancelled acquisition {i}: {e}"),
        };
        guard.release().await.unwrap();
    }
}

/// The server ran an acquire whose reply never arrived, and the connection died: fred
/// sends it again on the new connection. The replay finds the lock holding its own token
/// and must return that lease (not wait for itself until the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_acquire_returns_its_own_lease() {
    let server = RedisServer::start();
    let proxy = support::Proxy::start(server.port());
    let connection = RedisCacheService::builder(proxy.url())
        .command_timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let locks = Arc::new(RedisConcurrencyService::from_connection(connection));
    assert_eq!(proxy.connections(), 1);
    // Load the scripts first: a NOSCRIPT reply dropped by the proxy would stall the test.
    locks
        .acquire("warm-up", &LockOptions::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    proxy.drop_replies(0);
    let acquire = tokio::spawn({
        let locks = locks.clone();
        async move {
            let options = LockOptions::default().wait_timeout(Duration::from_secs(3));
            locks.acquire("replayed", &options).await
        }
    });
    // Wait until the server ran it (the lock is there), then kill the connection.
    let lock_key = locks.lock_key("replayed");
    let deadline = std::time::Instant::now() + BOUND;
    while server.cli(&["EXISTS", &lock_key]).trim() != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the acquire never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let guard = bounded("the replayed acquire", acquire)
        .await
        .unwrap()
        .expect("the replay finds its own token: its lease");
    assert!(guard.fencing_token() > 0);
    assert!(proxy.connections() >= 2, "fred reconnected");
    guard.release().await.unwrap();
    assert_eq!(server.cli(&["EXISTS", &lock_key]).trim(), "0");
}

/// The server ran a release whose reply never arrived, and the connection died: the
/// replay finds the lock gone, and the release it did is still a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_release_is_a_success() {
    let server = RedisServer::start();
    let proxy = support::Proxy::start(server.port());
    let connection = RedisCacheService::builder(proxy.url())
        .command_timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let locks = RedisConcurrencyService::from_connection(connection);
    // Load the scripts first: a NOSCRIPT reply dropped by the proxy would stall the test.
    locks
        .acquire("warm-up", &LockOptions::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let guard = locks
        .acquire("replayed", &LockOptions::default())
        .await
        .unwrap();
    let lock_key = locks.lock_key("replayed");
    proxy.drop_replies(0);
    let release = tokio::spawn(guard.release());
    let deadline = std::time::Instant::now() + BOUND;
    while server.cli(&["EXISTS", &lock_key]).trim() != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the release never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let released = bounded("the replayed release", release).await.unwrap();
    assert!(released.is_ok(), "{released:?}");
}

/// The server stops answering (`CLIENT PAUSE`) while A holds a 1.5 s lease: A must know it
/// lost the lock by the lease's end, before anyone else can take it. Checked by order: when
/// B gets the lock (after the pause), A's guard already says lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_learns_of_its_lost_lease_before_anyone_else_can_hold_it() {
    let server = RedisServer::start();
    let make = || async {
        let connection = RedisCacheService::builder(server.url())
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        RedisConcurrencyService::from_connection(connection)
    };
    let (a, b) = (make().await, make().await);
    let lease = LockOptions::default().lease(Duration::from_millis(1_500));
    let held = a.acquire("paused", &lease).await.unwrap();
    // Ends 2 s from now: after the lease (1.5 s from the acquire), before A's renewal,
    // sent 0.5 s in, would time out (the default command timeout is 2 s).
    server.cli(&["CLIENT", "PAUSE", "2000", "ALL"]);
    let options = LockOptions::default().wait_timeout(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + BOUND;
    let taken = loop {
        match b.acquire("paused", &options).await {
            Ok(guard) => break guard,
            Err(LockError::Backend { .. }) if std::time::Instant::now() < deadline => {}
            Err(e) => panic!("B: {e}"),
        }
    };
    assert!(
        held.is_lost(),
        "B holds the lock and A does not know it lost it"
    );
    assert!(taken.fencing_token() > held.fencing_token());
    taken.release().await.unwrap();
}

/// Work that ran under a lock whose lease was lost meanwhile: its output comes back with
/// the error (it may have had effects, like a rotated refresh token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_returns_the_work_output_with_a_lost_lease() {
    let locks = redis_locks(RedisServer::shared().url()).await;
    let k = cachet::conformance::unique_prefix("output");
    let short = LockOptions::default()
        .lease(Duration::from_millis(200))
        .renew(false);
    let result = locks
        .with_lock_options(&k, &short, async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "rotated-refresh-token"
        })
        .await;
    match result {
        Err(cachet::WithLockError::LeaseLost { output, key }) => {
            assert_eq!(output, "rotated-refresh-token");
            assert!(key.to_string().contains(&k));
        }
        other => panic!("expected LeaseLost with the output, got {other:?}"),
    }
    // `?` into a LockError still works, dropping the output.
    let as_lock_error: Result<(), LockError> = async {
        locks
            .with_lock_options(&k, &short, async {
                tokio::time::sleep(Duration::from_millis(500)).await;
            })
            .await?;
        Ok(())
    }
    .await;
    assert!(matches!(as_lock_error, Err(LockError::LeaseLost { .. })));
}

/// A holder, then the server restarts empty (Redisson's restart-while-held case): the
/// holder is told it lost the lock, another instance takes it with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_held_loses_the_lock_and_the_next_token_is_larger() {
    let server = RedisServer::start();
    let make = || async {
        let connection = RedisCacheService::builder(server.url())
            .command_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        RedisConcurrencyService::from_connection(connection)
    };
    let (a, b) = (make().await, make().await);
    let held = a
        .acquire(
            "restart",
            &LockOptions::default().lease(Duration::from_millis(900)),
        )
        .await
        .unwrap();
    server.restart();
    bounded("A learns it lost the lock", held.lost()).await;
    let next = next_token(&b, "restart").await;
    assert!(next > held.fencing_token());
}

/// The exact-count check across two instances on a cluster too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_hold_one_key_together_on_a_cluster() {
    let url = RedisCluster::shared().url();
    let counter_key = cachet::conformance::unique_prefix("rmw-cluster");
    let store = RedisCacheService::new(&url, 300).await.unwrap();
    store
        .client()
        .set::<(), _, _>(&counter_key, 0, None, None, false)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _instance in 0..2 {
        let locks = Arc::new(redis_locks(url.clone()).await);
        for _ in 0..8 {
            let (locks, store, counter_key) = (locks.clone(), store.clone(), counter_key.clone());
            tasks.push(tokio::spawn(async move {
                let options = LockOptions::default().wait_timeout(Duration::from_secs(60));
                for _ in 0..50 {
                    locks
                        .with_lock_options("cluster-counter", &options, async {
                            let n: u64 = store.client().get(&counter_key).await.unwrap();
                            store
                                .client()
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
        bounded("800 locked increments", task).await.unwrap();
    }
    let n: u64 = store.client().get(&counter_key).await.unwrap();
    assert_eq!(n, 2 * 8 * 50, "mutual exclusion violated");
}

/// `wait_for_replicas`: the acquire returns once a replica has the lock (`WAIT`); with the
/// replica gone it fails with a clear error and leaves the lock free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_replica_after_acquiring() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(
        &support::binaries::redis_server(),
        &["--replicaof", "127.0.0.1", &primary.port().to_string()],
    );
    let deadline = std::time::Instant::now() + BOUND;
    // In sync, not only connected (the first sync may wait for the diskless-sync delay).
    while replica
        .info_field("replication", "master_link_status")
        .as_deref()
        != Some("up")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let locks = redis_locks(primary.url()).await;
    let replicated = LockOptions::default().wait_for_replicas(1, Duration::from_secs(2));
    let guard = locks.acquire("replicated", &replicated).await.unwrap();
    let on_replica = replica.cli(&["--raw", "EXISTS", &locks.lock_key("replicated")]);
    assert_eq!(
        on_replica.trim(),
        "1",
        "the replica has the lock when acquire returns"
    );
    guard.release().await.unwrap();
    replica.kill();
    let bounded_wait = LockOptions::default().wait_for_replicas(1, Duration::from_millis(300));
    match locks.acquire("unreplicated", &bounded_wait).await {
        Err(e @ LockError::NotReplicated { .. }) => {
            assert!(e.to_string().contains("unreplicated"), "{e}")
        }
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    assert_eq!(
        primary
            .cli(&["EXISTS", &locks.lock_key("unreplicated")])
            .trim(),
        "0",
        "the unreplicated lock was let go"
    );
}

/// Restart while held on a cluster: the primary that holds the lock restarts empty; the
/// holder is told, and the next token (from that primary's clock) is larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_held_on_a_cluster_loses_the_lock_and_the_next_token_is_larger() {
    let cluster = RedisCluster::start();
    let make = || async {
        let connection = RedisCacheService::builder(cluster.url())
            .command_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        RedisConcurrencyService::from_connection(connection)
    };
    let (a, b) = (make().await, make().await);
    let held = a
        .acquire(
            "restart",
            &LockOptions::default().lease(Duration::from_millis(900)),
        )
        .await
        .unwrap();
    let lock_key = a.lock_key("restart");
    let owner = cluster
        .nodes()
        .iter()
        .position(|n| n.cli(&["EXISTS", &lock_key]).trim() == "1")
        .expect("one primary holds the lock");
    cluster.restart_primary(owner);
    bounded("A learns it lost the lock", held.lost()).await;
    let next = next_token(&b, "restart").await;
    assert!(
        next > held.fencing_token(),
        "{next} <= {}",
        held.fencing_token()
    );
}

/// One pool for the cache and the locks: the lock service built from a cache service (or its
/// connection) opens no connection of its own, both work through it, and the connection
/// outlives the cache while the locks still use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_service_and_the_cache_service_share_one_connection() {
    use cachet::CacheServiceExt;

    let server = RedisServer::start();
    // `redis-cli CLIENT LIST` counts its own connection too; only the difference matters.
    let clients = || server.cli(&["CLIENT", "LIST"]).lines().count();
    let cache = RedisCacheService::builder(server.url())
        .pool_size(2)
        .build()
        .await
        .unwrap();
    let with_cache = clients();
    let locks = RedisConcurrencyService::from_connection(&cache);
    let also = RedisConcurrencyService::from_connection(cache.connection().clone());
    assert!(locks.connection().same_connection(cache.connection()));
    assert!(also.connection().same_connection(cache.connection()));

    let stored = locks
        .with_lock("shared:report", async {
            cache.set("shared:report", &"done", None).await.unwrap();
            cache.get::<String>("shared:report").await.unwrap()
        })
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("done"));
    assert_eq!(
        clients(),
        with_cache,
        "the locks opened connections of their own"
    );

    // A second cache on the locks' connection, then the first cache gone: the pool lives on.
    let again = RedisCacheService::from_connection(locks.connection().clone(), 60).unwrap();
    drop(cache);
    let read = also
        .with_lock("shared:report", async {
            again.get::<String>("shared:report").await.unwrap()
        })
        .await
        .unwrap();
    assert_eq!(read.as_deref(), Some("done"));
    assert_eq!(clients(), with_cache);
}
