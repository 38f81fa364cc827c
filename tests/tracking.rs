//! The tiered cache in tracking mode (`CLIENT TRACKING`): the conformance suite; writes by
//! clients that are not cachet (DEL, UNLINK, SET, an expiry, a flush) reaching every
//! instance's L1 on Redis, a cluster and Valkey; the races of the Redis client-side caching
//! docs (an invalidation overtaking a read's reply, a lost invalidation connection); tracking
//! lost and restored (a killed or silently dead connection, a restart, a sentinel failover,
//! a resharded slot) without a stale read afterwards. Real servers only (tests/support).

mod support;

use std::time::{Duration, Instant};

use cachet::backend::tiered::InvalidationMode;
use cachet::conformance::unique_prefix;
use cachet::{CacheServiceExt, RedisCacheService, TieredCacheService};
use fred::prelude::KeysInterface;
use support::{Proxy, RedisCluster, RedisServer, SentinelSetup};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

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
    cachet::conformance_tests!(super::tracked(super::RedisServer::shared().url()).await);
}

mod tracking_cluster {
    cachet::conformance_tests!(super::tracked(super::RedisCluster::shared().url()).await);
}

mod tracking_valkey {
    cachet::conformance_tests!(super::tracked(super::RedisServer::shared_valkey().url()).await);
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
    external_writes_reach_every_l1(RedisServer::shared().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_writes_reach_every_l1_on_a_cluster() {
    external_writes_reach_every_l1(RedisCluster::shared().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_writes_reach_every_l1_on_valkey() {
    external_writes_reach_every_l1(RedisServer::shared_valkey().url()).await;
}

/// `FLUSHALL` or `FLUSHDB` by a plain client empties every instance's L1: the server reports
/// a flush as an invalidation with no key list. Well before the L1 lifetime (30 s, longer
/// than the hang bound here). (On servers of its own: a flush would reach other tests.)
async fn a_flush_reaches_every_l1(url: String, keys: &[&str], flush: impl Fn()) {
    let (a, b) = (tracked(url.clone()).await, tracked(url).await);
    for key in keys {
        both_cache(&a, &b, key).await;
    }
    flush();
    for instance in [&a, &b] {
        for key in keys {
            until_dropped(instance, key, "a flush").await;
            assert_eq!(instance.get::<String>(key).await.unwrap(), None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_reaches_every_l1_on_redis() {
    let server = RedisServer::start();
    a_flush_reaches_every_l1(server.url(), &["k1", "k2"], || {
        server.cli(&["FLUSHALL"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushdb_reaches_every_l1_on_redis() {
    let server = RedisServer::start();
    a_flush_reaches_every_l1(server.url(), &["k1", "k2"], || {
        server.cli(&["FLUSHDB", "ASYNC"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_reaches_every_l1_on_valkey() {
    let server = RedisServer::start_valkey();
    a_flush_reaches_every_l1(server.url(), &["k1", "k2"], || {
        server.cli(&["FLUSHALL"]);
    })
    .await;
}

/// On a cluster a plain client flushes every primary; keys on every node go from the L1s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_reaches_every_l1_on_a_cluster() {
    let cluster = RedisCluster::start();
    let keys = ["a", "b", "c", "d", "e", "f"];
    a_flush_reaches_every_l1(cluster.url(), &keys, || {
        for node in cluster.nodes() {
            node.cli(&["FLUSHALL"]);
        }
    })
    .await;
}

/// The connection that receives the invalidations is killed: the instance says so (an L1
/// reset, not confirmed), subscribes again, points tracking at the new connection, and
/// serves nothing from before; a change after that reaches the L1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_invalidation_connection_is_noticed_restored_and_leaves_nothing_stale() {
    let server = RedisServer::start();
    let a = tracked(server.url()).await;
    a.set("k", &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    assert!(a.cached_locally("k"));
    let resets = a.l1_resets();
    let killed = server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "1", "one invalidation connection");
    server.cli(&["DEL", "k"]);
    let deadline = Instant::now() + HANG;
    while a.l1_resets() <= resets {
        assert!(
            Instant::now() < deadline,
            "the lost connection was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        a.wait_until_confirmed(HANG).await,
        "tracking was never restored ({} failed rounds)",
        a.subscription_failures()
    );
    assert_eq!(a.get::<String>("k").await.unwrap(), None, "no stale read");
    a.set("k", &"v2", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
    assert!(a.cached_locally("k"));
    server.cli(&["DEL", "k"]);
    until_dropped(&a, "k", "DEL after the new subscription").await;
}

/// The invalidation connection dies without the client hearing of it (the server closed it,
/// the close never arrived: a half-open connection, here a proxy that goes silent). A change
/// made then has nowhere to go; the instance's own check of that connection notices, drops
/// the L1 and restores tracking on a new connection. (The Redis docs: "ping the
/// invalidation channel periodically".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_invalidation_connection_is_noticed_and_leaves_nothing_stale() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    let a = tracked(proxy.url()).await;
    // Connection 0 reads and writes (the L2 client); connection 1 receives invalidations.
    assert_eq!(proxy.connections(), 2);
    a.set("k", &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    assert!(a.cached_locally("k"));
    proxy.freeze(1);
    assert_eq!(
        server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).trim(),
        "1"
    );
    server.cli(&["DEL", "k"]);
    until_dropped(&a, "k", "a DEL while the invalidation connection was gone").await;
    assert!(
        a.wait_until_confirmed(HANG).await,
        "tracking was never restored ({} failed rounds)",
        a.subscription_failures()
    );
    assert_eq!(a.get::<String>("k").await.unwrap(), None, "no stale read");
    a.set("k", &"v2", None).await.unwrap();
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
    server.cli(&["DEL", "k"]);
    until_dropped(&a, "k", "DEL after the restore").await;
}

/// The race the Redis client-side caching docs name for a separate invalidation connection:
/// the invalidation of a key overtakes the reply to a read of it (here the reading
/// connection's replies are held back by a proxy while a plain client deletes the key). The
/// read returns what it read, but its value must not go into the L1: the next read sees the
/// delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_that_overtakes_the_read_reply_voids_the_fill() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port());
    // Replies held back 400 ms (each chunk: a health check's reply may come first) stay
    // well inside the command timeout.
    let a = TieredCacheService::builder(fast(proxy.url()).command_timeout(HANG))
        .invalidation(InvalidationMode::Tracking)
        .build()
        .await
        .unwrap();
    assert_eq!(proxy.connections(), 2);
    let mut raced = 0;
    for round in 0..5 {
        let key = format!("race{round}");
        a.set(&key, &"old", None).await.unwrap();
        proxy.delay_replies(0, Duration::from_millis(400));
        let read = {
            let (a, key) = (a.clone(), key.clone());
            tokio::spawn(async move { a.get::<String>(&key).await })
        };
        // The GET reaches the server at once; its reply waits in the proxy meanwhile.
        tokio::time::sleep(Duration::from_millis(150)).await;
        server.cli(&["DEL", &key]);
        let first = read.await.unwrap().unwrap();
        proxy.delay_replies(0, Duration::ZERO);
        if first.as_deref() == Some("old") {
            raced += 1;
            assert!(
                !a.cached_locally(&key),
                "round {round}: the overtaken read filled the L1"
            );
        }
        assert_eq!(a.get::<String>(&key).await.unwrap(), None, "round {round}");
    }
    assert!(raced >= 1, "the reply never came after the invalidation");
}

/// A slot moves to another primary (live resharding, `MIGRATE` + `CLUSTER SETSLOT`): the
/// move itself drops the key from the L1 (it left the old owner), the next read follows
/// `MOVED` to the new owner and is tracked there: a `DEL` on the new owner reaches the L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resharded_key_is_tracked_on_its_new_primary() {
    let cluster = RedisCluster::start();
    let a = tracked(cluster.url()).await;
    let key = "moving";
    a.set(key, &"v1", None).await.unwrap();
    assert_eq!(a.get::<String>(key).await.unwrap().as_deref(), Some("v1"));
    assert!(a.cached_locally(key));
    let nodes = cluster.nodes();
    let from = nodes
        .iter()
        .position(|n| n.cli(&["EXISTS", key]).trim() == "1")
        .expect("one node holds the key");
    let to = (from + 1) % nodes.len();
    let slot = nodes[from]
        .cli(&["CLUSTER", "KEYSLOT", key])
        .trim()
        .to_owned();
    let id = |i: usize| nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_owned();
    let (from_id, to_id) = (id(from), id(to));
    nodes[to].cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    nodes[from].cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    let port = nodes[to].port().to_string();
    let migrated = nodes[from].cli(&["MIGRATE", "127.0.0.1", &port, key, "0", "5000"]);
    assert_eq!(migrated.trim(), "OK", "{migrated}");
    for node in nodes {
        node.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    until_dropped(&a, key, "the key left its old primary").await;
    let deadline = Instant::now() + HANG;
    loop {
        if let Ok(Some(v)) = a.get::<String>(key).await {
            assert_eq!(v, "v1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key was never read after the move"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        a.wait_until_confirmed(HANG).await,
        "tracking not confirmed after the move"
    );
    // Read once more so that the value is in the L1 under the new owner's tracking.
    while !a.cached_locally(key) {
        assert!(
            Instant::now() < deadline,
            "the moved key never filled the L1"
        );
        assert_eq!(a.get::<String>(key).await.unwrap().as_deref(), Some("v1"));
    }
    nodes[to].cli(&["DEL", key]);
    until_dropped(&a, key, "DEL on the new owner").await;
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
