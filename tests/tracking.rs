//! The tiered cache in tracking mode (RESP3 `CLIENT TRACKING`): the conformance suite, writes
//! by clients that are not cachet (DEL, UNLINK, SET, an expiry) reaching every instance's
//! L1, a FLUSHALL bounded by the L1 lifetime (fred drops the server's flush push), and tracking lost and restored (a killed connection, a restart, a
//! sentinel failover) without a stale read afterwards. Real servers only (tests/support).

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cachet::backend::tiered::InvalidationMode;
use cachet::conformance::unique_prefix;
use cachet::{CacheServiceExt, RedisCacheService, TieredCacheService};
use fred::prelude::KeysInterface;
use support::{RedisCluster, RedisServer, SentinelSetup};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

fn standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

fn valkey() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start_valkey)
}

fn fast(url: String) -> cachet::RedisCacheServiceBuilder {
    RedisCacheService::builder(url)
        .command_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn tracked(url: String) -> TieredCacheService {
    let instance = TieredCacheService::builder(fast(url))
        .invalidation(InvalidationMode::Tracking)
        .build()
        .await
        .expect("tracking instance");
    assert_eq!(instance.invalidation_mode(), InvalidationMode::Tracking);
    instance
}

mod tracking_standalone {
    cachet::conformance_tests!(super::tracked(super::standalone().url()).await);
}

mod tracking_cluster {
    cachet::conformance_tests!(super::tracked(super::RedisCluster::shared().url()).await);
}

mod tracking_valkey {
    cachet::conformance_tests!(super::tracked(super::valkey().url()).await);
}

/// Waits (bounded) until `instance` no longer holds `key` in its L1.
async fn until_dropped(instance: &TieredCacheService, key: &str, what: &str) {
    let deadline = Instant::now() + HANG;
    while instance.cached_locally(key) {
        assert!(Instant::now() < deadline, "{what}: {key} still in the L1");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Two instances hold `key` in their L1 (each read it once).
async fn both_cache(a: &TieredCacheService, b: &TieredCacheService, key: &str) {
    a.set(key, &"v1", None).await.unwrap();
    for instance in [a, b] {
        assert_eq!(
            instance.get::<String>(key).await.unwrap().as_deref(),
            Some("v1")
        );
        assert!(instance.cached_locally(key), "the read filled the L1");
    }
}

/// A plain client (not cachet) changes keys: each change reaches both instances' L1s.
async fn external_writes_reach_every_l1(url: String) {
    let (a, b) = (tracked(url.clone()).await, tracked(url.clone()).await);
    let raw = RedisCacheService::new(&url, 300).await.unwrap();
    let client = raw.client();
    let prefix = unique_prefix("external");
    for op in ["DEL", "UNLINK", "SET", "PEXPIRE"] {
        let key = format!("{prefix}{op}");
        both_cache(&a, &b, &key).await;
        match op {
            "DEL" => client.del::<i64, _>(&key).await.map(drop),
            "UNLINK" => client.unlink::<i64, _>(&key).await.map(drop),
            "SET" => {
                client
                    .set::<(), _, _>(&key, "written by another service", None, None, false)
                    .await
            }
            _ => client.pexpire::<i64, _>(&key, 1, None).await.map(drop),
        }
        .unwrap();
        for instance in [&a, &b] {
            until_dropped(instance, &key, op).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_writes_reach_every_l1_on_redis() {
    external_writes_reach_every_l1(standalone().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_writes_reach_every_l1_on_a_cluster() {
    external_writes_reach_every_l1(RedisCluster::shared().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_writes_reach_every_l1_on_valkey() {
    external_writes_reach_every_l1(valkey().url()).await;
}

/// `FLUSHALL` by a plain client: the server says so with an invalidation push whose key list
/// is null, and fred 10.1.0 drops that push (`broadcast_resp3_invalidation` only forwards an
/// array), so no instance hears it. What bounds it is the L1 lifetime (1 s here): after
/// it, no instance serves a flushed value. (On a server of its own.)
async fn a_flush_is_bounded_by_the_l1_lifetime(server: RedisServer) {
    let build = || {
        TieredCacheService::builder(fast(server.url()))
            .invalidation(InvalidationMode::Tracking)
            .l1_max_ttl(Duration::from_secs(1))
            .build()
    };
    let (a, b) = (build().await.unwrap(), build().await.unwrap());
    both_cache(&a, &b, "k1").await;
    server.cli(&["FLUSHALL"]);
    let flushed = Instant::now();
    for instance in [&a, &b] {
        until_dropped(instance, "k1", "FLUSHALL").await;
        assert_eq!(instance.get::<String>("k1").await.unwrap(), None);
    }
    // A bound on a hang, generous: the L1 lifetime is 1 s.
    assert!(flushed.elapsed() < HANG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_bounded_by_the_l1_lifetime_on_redis() {
    a_flush_is_bounded_by_the_l1_lifetime(RedisServer::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_bounded_by_the_l1_lifetime_on_valkey() {
    a_flush_is_bounded_by_the_l1_lifetime(RedisServer::start_valkey()).await;
}

/// The tracked connection is killed: the instance says tracking was lost (an L1 reset, not
/// confirmed), turns it on again on the new connection, and serves no value from before
/// the loss: a write made while it was disconnected is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_is_noticed_restored_and_leaves_nothing_stale() {
    let server = RedisServer::start();
    let a = tracked(server.url()).await;
    let raw = RedisCacheService::new(&server.url(), 300).await.unwrap();
    a.set("k", &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    assert!(a.cached_locally("k"));
    let resets = a.l1_resets();
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    // Written by another client right away, maybe before the instance reconnected.
    let deadline = Instant::now() + HANG;
    while raw.client().del::<i64, _>("k").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the raw client never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while a.l1_resets() <= resets {
        assert!(
            Instant::now() < deadline,
            "the lost tracking was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        a.wait_until_confirmed(HANG).await,
        "tracking was never turned on again ({} failed rounds)",
        a.subscription_failures()
    );
    assert_eq!(a.get::<String>("k").await.unwrap(), None, "no stale read");
    // And tracking works on the new connection.
    a.set("k", &"v2", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
    assert!(a.cached_locally("k"));
    raw.client().del::<i64, _>("k").await.unwrap();
    until_dropped(&a, "k", "DEL after the reconnect").await;
}

/// A restart (the server comes back empty): the L1 is cleared, tracking comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_clears_the_l1_and_tracking_comes_back() {
    let server = RedisServer::start();
    let a = tracked(server.url()).await;
    a.set("k", &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    let resets = a.l1_resets();
    server.kill();
    server.restart();
    let deadline = Instant::now() + HANG;
    while a.l1_resets() <= resets || !a.subscription_confirmed() {
        assert!(
            Instant::now() < deadline,
            "no reset and re-confirmation after the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.get::<String>("k").await.unwrap(),
        None,
        "the restart emptied Redis"
    );
    a.set("k", &"v2", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
    server.cli(&["DEL", "k"]);
    until_dropped(&a, "k", "DEL after the restart").await;
}

/// A sentinel failover: the instance follows the new primary, tracks there, and serves
/// nothing from before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_ends_tracked_on_the_new_primary() {
    let setup = SentinelSetup::start();
    let a = tracked(setup.url()).await;
    a.set("k", &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    let resets = a.l1_resets();
    let new_primary = setup.kill_primary_and_wait_failover();
    let deadline = Instant::now() + HANG * 2;
    while a.l1_resets() <= resets || !a.subscription_confirmed() {
        assert!(
            Instant::now() < deadline,
            "no reset and re-confirmation after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!a.cached_locally("k"));
    // Writes work again on the new primary, and its changes reach the L1.
    while a.set("k", &"v2", None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "writes never resumed after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
    assert!(a.cached_locally("k"));
    let primary = [setup.primary(), setup.replica()]
        .into_iter()
        .find(|server| server.port() == new_primary)
        .expect("the new primary is one of the two");
    primary.cli(&["DEL", "k"]);
    until_dropped(&a, "k", "DEL on the new primary").await;
}

/// `Auto` picks tracking where the server allows it, and the bus where it refuses
/// `CLIENT TRACKING` (an ACL here, as some managed services do); asking for tracking
/// explicitly then fails with an error that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_picks_tracking_or_falls_back_to_the_bus() {
    let server = RedisServer::start();
    let auto = TieredCacheService::builder(fast(server.url()))
        .build()
        .await
        .unwrap();
    assert_eq!(auto.invalidation_mode(), InvalidationMode::Tracking);
    assert!(format!("{auto:?}").contains("Tracking"), "{auto:?}");
    server.cli(&["ACL", "SETUSER", "default", "-client|tracking"]);
    let fallback = TieredCacheService::builder(fast(server.url()))
        .build()
        .await
        .unwrap();
    assert_eq!(fallback.invalidation_mode(), InvalidationMode::Bus);
    assert!(fallback.channel().is_some());
    let err = TieredCacheService::builder(fast(server.url()))
        .invalidation(InvalidationMode::Tracking)
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("client tracking"), "{err}");
}
