//! The tiered cache: L1 per instance, Redis L2, invalidation over pub/sub. Instances are
//! separate `TieredCacheService` objects (separate L1s and connections) on one real Redis;
//! each test has its own channel, and waits on the listener's notification, never a sleep,
//! before checking what another instance serves.

mod support;

use std::time::Duration;

use cachet::backend::tiered::InvalidationMode;
use cachet::{CacheService, CacheServiceExt, RedisCacheService, TieredCacheService};
use support::{RedisCluster, RedisServer};

const DELIVERY: Duration = Duration::from_secs(10);

/// A bus-mode instance: this file checks the pub/sub bus (tests/tracking.rs checks the
/// tracking mode).
async fn instance(url: String, channel_prefix: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(url))
        .invalidation(InvalidationMode::Bus)
        .channel_prefix(channel_prefix)
        .build()
        .await
        .expect("tiered instance")
}

async fn conformance_instance(url: String) -> TieredCacheService {
    let channel = cachet::conformance::unique_prefix("tiered-conformance");
    instance(url, &channel).await
}

mod tiered_standalone {
    cachet::conformance_tests!(
        super::conformance_instance(super::RedisServer::shared().url()).await
    );
}

mod tiered_cluster {
    cachet::conformance_tests!(
        super::conformance_instance(super::RedisCluster::shared().url()).await
    );
}

mod tiered_through_enum {
    cachet::conformance_tests!(cachet::Cache::from(
        super::conformance_instance(super::RedisServer::shared().url()).await
    ));
}

async fn instances(n: usize) -> (Vec<TieredCacheService>, String) {
    let channel = cachet::conformance::unique_prefix("bus");
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(instance(RedisServer::shared().url(), &channel).await);
    }
    (all, cachet::conformance::unique_prefix("tiered"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_is_served_by_the_others_once_delivered() {
    let (all, prefix) = instances(3).await;
    let (a, b, c) = (&all[0], &all[1], &all[2]);
    let key = format!("{prefix}org:acme");
    a.set(&key, &"v1", None).await.unwrap();
    for other in [b, c] {
        // A fill that races an invalidation is dropped: let A's message land first.
        assert!(other.wait_for_invalidations(1, DELIVERY).await, "delivery");
        assert_eq!(
            other.get::<String>(&key).await.unwrap().as_deref(),
            Some("v1")
        );
        assert!(other.cached_locally(&key), "the read filled the L1");
    }
    for round in 2..20 {
        let value = format!("v{round}");
        let seen = [b.invalidations_applied(), c.invalidations_applied()];
        a.set(&key, &value, None).await.unwrap();
        for (other, before) in [(b, seen[0]), (c, seen[1])] {
            assert!(
                other.wait_for_invalidations(before + 1, DELIVERY).await,
                "delivery"
            );
            assert_eq!(
                other.get::<String>(&key).await.unwrap(),
                Some(value.clone()),
                "an instance served the old value after the message arrived"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_prefix_invalidation_reach_every_instance() {
    let (all, prefix) = instances(3).await;
    let (a, b, c) = (&all[0], &all[1], &all[2]);
    for i in 0..10 {
        a.set(&format!("{prefix}org:{i}"), &i, None).await.unwrap();
    }
    a.set(&format!("{prefix}user:1"), &1, None).await.unwrap();
    for other in [b, c] {
        for i in 0..10 {
            assert_eq!(
                other.get::<i32>(&format!("{prefix}org:{i}")).await.unwrap(),
                Some(i)
            );
        }
        assert!(other.cached_locally(&format!("{prefix}org:3")));
    }

    let seen = [b.invalidations_applied(), c.invalidations_applied()];
    assert_eq!(
        a.invalidate_prefix(&format!("{prefix}org:")).await.unwrap(),
        10
    );
    for (other, before) in [(b, seen[0]), (c, seen[1])] {
        assert!(other.wait_for_invalidations(before + 1, DELIVERY).await);
        for i in 0..10 {
            assert!(!other.cached_locally(&format!("{prefix}org:{i}")));
            assert_eq!(
                other.get::<i32>(&format!("{prefix}org:{i}")).await.unwrap(),
                None
            );
        }
        assert_eq!(
            other.get::<i32>(&format!("{prefix}user:1")).await.unwrap(),
            Some(1)
        );
    }

    let seen = [b.invalidations_applied(), c.invalidations_applied()];
    a.invalidate(&format!("{prefix}user:1")).await.unwrap();
    for (other, before) in [(b, seen[0]), (c, seen[1])] {
        assert!(other.wait_for_invalidations(before + 1, DELIVERY).await);
        assert_eq!(
            other.get::<i32>(&format!("{prefix}user:1")).await.unwrap(),
            None
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_skips_its_own_messages() {
    let (all, prefix) = instances(2).await;
    let (a, b) = (&all[0], &all[1]);
    let key = format!("{prefix}k");
    a.set(&key, &1, None).await.unwrap();
    assert!(
        b.wait_for_invalidations(1, DELIVERY).await,
        "B got A's message"
    );
    a.set(&key, &2, None).await.unwrap();
    assert!(b.wait_for_invalidations(2, DELIVERY).await);
    assert_eq!(
        a.invalidations_applied(),
        0,
        "A applied none of its own messages"
    );
    assert!(a.cached_locally(&key), "A's own write stays in its L1");
    assert_eq!(a.get::<i32>(&key).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_ignored() {
    let (all, prefix) = instances(2).await;
    let (a, b) = (&all[0], &all[1]);
    RedisServer::shared().cli(&["PUBLISH", b.channel().unwrap(), "garbage"]);
    RedisServer::shared().cli(&["PUBLISH", b.channel().unwrap(), "CI\u{1}short"]);
    let key = format!("{prefix}k");
    a.set(&key, &1, None).await.unwrap();
    assert!(
        b.wait_for_invalidations(1, DELIVERY).await,
        "a good message still arrives"
    );
    assert_eq!(b.malformed_messages(), 2);
    assert_eq!(b.get::<i32>(&key).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_envelope_is_an_integrity_error() {
    let (all, prefix) = instances(1).await;
    let key = format!("{prefix}raw");
    RedisServer::shared().cli(&["SET", &key, "not an envelope"]);
    let err = all[0].get_bytes(&key).await.unwrap_err();
    assert!(
        matches!(
            err,
            cachet::CacheError::Integrity {
                problem: cachet::IntegrityProblem::BadMagic,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        RedisServer::shared().cli(&["GET", &key]).trim(),
        "not an envelope",
        "left in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_clears_every_l1_and_service_recovers() {
    let server = RedisServer::start();
    let channel = cachet::conformance::unique_prefix("restart");
    let fast = || {
        RedisCacheService::builder(server.url())
            .command_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    };
    let a = TieredCacheService::builder(fast())
        .invalidation(InvalidationMode::Bus)
        .channel_prefix(&channel)
        .build()
        .await
        .unwrap();
    let b = TieredCacheService::builder(fast())
        .invalidation(InvalidationMode::Bus)
        .channel_prefix(&channel)
        .build()
        .await
        .unwrap();
    a.set("k", &1, None).await.unwrap();
    assert!(b.wait_for_invalidations(1, DELIVERY).await);
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(1));
    assert!(b.cached_locally("k"));
    let resets = [a.l1_resets(), b.l1_resets()];

    server.kill();
    server.restart(); // comes back empty
    for (instance, before) in [(&a, resets[0]), (&b, resets[1])] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while instance.l1_resets() <= before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no L1 reset after the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!instance.cached_locally("k"), "the L1 was cleared");
    }
    // Working again, messages included.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.set("k", &2, None).await.is_err() {
        // A bound on a hang (recovery takes well under a second), not a timing check.
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes still fail 20 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(2));
    let before = b.invalidations_applied();
    a.set("k", &3, None).await.unwrap();
    assert!(
        b.wait_for_invalidations(before + 1, DELIVERY).await,
        "messages flow again"
    );
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(3));
}

#[tokio::test]
async fn settings_choose_the_tiered_backend_with_an_l1_ttl() {
    let url = RedisServer::shared().url();
    let settings = cachet::CacheSettings::from_vars(|name| match name {
        "REDIS_URL" => Some(url.clone()),
        "CACHE_L1_TTL_SECS" => Some("5".to_owned()),
        _ => None,
    })
    .unwrap();
    let cache = settings.build().await.unwrap();
    assert!(
        format!("{cache:?}").starts_with("TieredCacheService"),
        "{cache:?}"
    );
    let plain = cachet::build_cache_service(Some(&url)).await.unwrap();
    assert!(
        format!("{plain:?}").starts_with("RedisCacheService"),
        "{plain:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_or_drop_stops_the_listener_and_subscription() {
    let channel_prefix = cachet::conformance::unique_prefix("drop");
    let a = instance(RedisServer::shared().url(), &channel_prefix).await;
    let channel = a.channel().unwrap().to_owned();
    let subscribers = || {
        let reply = RedisServer::shared().cli(&["PUBSUB", "NUMSUB", &channel]);
        reply.lines().last().unwrap_or("").trim().to_owned()
    };
    assert_eq!(subscribers(), "1");
    let b = instance(RedisServer::shared().url(), &channel_prefix).await;
    assert_eq!(subscribers(), "2");
    b.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while subscribers() != "1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still subscribed after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while subscribers() != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still subscribed after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_a_cluster_see_each_others_writes() {
    let channel = cachet::conformance::unique_prefix("cluster-bus");
    let url = RedisCluster::shared().url();
    let a = instance(url.clone(), &channel).await;
    let b = instance(url, &channel).await;
    let prefix = cachet::conformance::unique_prefix("cluster-tiered");
    for i in 0..20 {
        let key = format!("{prefix}{i}");
        a.set(&key, &1, None).await.unwrap();
        assert!(b.wait_for_invalidations(2 * i + 1, DELIVERY).await);
        assert_eq!(b.get::<i32>(&key).await.unwrap(), Some(1));
        a.set(&key, &2, None).await.unwrap();
        assert!(b.wait_for_invalidations(2 * i + 2, DELIVERY).await);
        assert_eq!(
            b.get::<i32>(&key).await.unwrap(),
            Some(2),
            "stale after delivery"
        );
    }
}

/// Until an instance hears its own hello on a re-established subscription, its L1 stays
/// empty (every read goes to Redis), and a subscription that cannot be re-established is
/// counted, never silent. The server refuses the subscription (ACL) after a kill of every
/// pub/sub connection, then allows it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_subscription_is_confirmed_before_the_l1_fills_again() {
    let server = RedisServer::start();
    let channel = cachet::conformance::unique_prefix("confirm");
    let a = instance(server.url(), &channel).await;
    let b = instance(server.url(), &channel).await;
    assert!(b.subscription_confirmed());
    a.set("k", &1, None).await.unwrap();
    assert!(b.wait_for_invalidations(1, DELIVERY).await);
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(1));
    assert!(b.cached_locally("k"));
    let failures = b.subscription_failures();

    server.cli(&["ACL", "SETUSER", "default", "resetchannels"]);
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.subscription_confirmed() || b.subscription_failures() <= failures {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost subscription was neither noticed nor counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!b.cached_locally("k"), "the L1 was cleared on reconnect");
    assert_eq!(
        b.get::<i32>("k").await.unwrap(),
        Some(1),
        "served from Redis"
    );
    assert!(
        !b.cached_locally("k"),
        "an unconfirmed subscription must not fill the L1"
    );

    server.cli(&["ACL", "SETUSER", "default", "allchannels"]);
    assert!(
        b.wait_until_confirmed(Duration::from_secs(20)).await,
        "the subscription came back but was never confirmed ({} failed rounds)",
        b.subscription_failures()
    );
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(1));
    assert!(b.cached_locally("k"), "fills again once confirmed");
    assert!(a.wait_until_confirmed(Duration::from_secs(20)).await);
    let before = b.invalidations_applied();
    a.set("k", &2, None).await.unwrap();
    assert!(b.wait_for_invalidations(before + 1, DELIVERY).await);
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(2));
}

/// A burst of thousands of messages does not make the listener fall behind (which would
/// clear the whole L1): the subscriber's buffer holds bursts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_invalidations_does_not_clear_the_l1() {
    let (all, prefix) = instances(2).await;
    let (a, b) = (&all[0], &all[1]);
    let hot = format!("{prefix}hot");
    a.set(&hot, &"ctx", None).await.unwrap();
    assert!(b.wait_for_invalidations(1, DELIVERY).await);
    assert_eq!(b.get::<String>(&hot).await.unwrap().as_deref(), Some("ctx"));
    let (resets, applied) = (b.l1_resets(), b.invalidations_applied());
    const BURST: u64 = 3_000;
    let keys: Vec<String> = (0..BURST).map(|i| format!("{prefix}other:{i}")).collect();
    for chunk in keys.chunks(500) {
        let sends = chunk.iter().map(|key| a.invalidate(key));
        for sent in futures_util::future::join_all(sends).await {
            sent.unwrap();
        }
    }
    assert!(b.wait_for_invalidations(applied + BURST, DELIVERY).await);
    assert_eq!(b.l1_resets(), resets, "the listener fell behind");
    assert!(
        b.cached_locally(&hot),
        "an unrelated hot key stays in the L1"
    );
}

/// A prefix invalidation from another instance hides every L1 entry under the prefix as
/// soon as its message is applied, even while the scan that removes them still runs on a
/// task of its own; entries outside it stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_prefix_invalidation_hides_its_entries_at_once() {
    let (all, prefix) = instances(2).await;
    let (a, b) = (&all[0], &all[1]);
    let under = |i: usize| format!("{prefix}tenant:{i}");
    let outside = format!("{prefix}other");
    for i in 0..2_000 {
        b.set(&under(i), &i, None).await.unwrap();
    }
    b.set(&outside, &"keep", None).await.unwrap();
    assert!(b.cached_locally(&under(0)) && b.cached_locally(&under(1_999)));
    let applied = b.invalidations_applied();
    assert_eq!(
        a.invalidate_prefix(&format!("{prefix}tenant:"))
            .await
            .unwrap(),
        2_000
    );
    assert!(b.wait_for_invalidations(applied + 1, DELIVERY).await);
    for i in (0..2_000).step_by(97) {
        assert!(
            !b.cached_locally(&under(i)),
            "key {i} still served from the L1"
        );
        assert_eq!(b.get::<usize>(&under(i)).await.unwrap(), None);
    }
    assert!(b.cached_locally(&outside));
}
