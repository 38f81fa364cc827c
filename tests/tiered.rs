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

/// Encryption at the L2 boundary (`TieredCacheServiceBuilder::encrypt_l2`): what an instance
/// writes to Redis is sealed with its keyring, what it reads from Redis is opened with it,
/// and its L1 holds the plain values. Raw reads and writes go through a plain
/// `RedisCacheService`, which stores bytes as given (standalone and cluster alike).
#[cfg(feature = "encryption")]
mod l2_encryption {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use bytes::Bytes;
    use cachet::envelope::{Envelope, now_ms};
    use cachet::{CacheError, EncryptedCacheService, EncryptedEnvelope, EncryptionKeys};
    use serde::{Deserialize, Serialize};

    use super::*;

    const KEY_1: [u8; 32] = [0x5a; 32];
    const KEY_2: [u8; 32] = [0xa5; 32];

    fn keys_1() -> EncryptionKeys {
        EncryptionKeys::new(1, KEY_1)
    }

    /// A tiered instance whose L2 values are sealed with `keys`.
    async fn sealed(
        redis: cachet::RedisCacheServiceBuilder,
        channel_prefix: &str,
        mode: InvalidationMode,
        keys: EncryptionKeys,
    ) -> TieredCacheService {
        let service = TieredCacheService::builder(redis)
            .invalidation(mode)
            .channel_prefix(channel_prefix)
            .encrypt_l2(keys)
            .build()
            .await
            .expect("tiered instance with L2 encryption");
        assert_eq!(service.invalidation_mode(), mode);
        service
    }

    async fn bus(url: String, channel_prefix: &str, keys: EncryptionKeys) -> TieredCacheService {
        sealed(
            RedisCacheService::builder(url),
            channel_prefix,
            InvalidationMode::Bus,
            keys,
        )
        .await
    }

    async fn conformance_instance(url: String, mode: InvalidationMode) -> TieredCacheService {
        let channel = cachet::conformance::unique_prefix("l2-conformance");
        sealed(RedisCacheService::builder(url), &channel, mode, keys_1()).await
    }

    mod conformance_standalone {
        cachet::conformance_tests!(
            super::conformance_instance(
                super::RedisServer::shared().url(),
                super::InvalidationMode::Bus
            )
            .await
        );
    }

    mod conformance_standalone_tracking {
        cachet::conformance_tests!(
            super::conformance_instance(
                super::RedisServer::shared().url(),
                super::InvalidationMode::Tracking
            )
            .await
        );
    }

    mod conformance_cluster {
        cachet::conformance_tests!(
            super::conformance_instance(
                super::RedisCluster::shared().url(),
                super::InvalidationMode::Bus
            )
            .await
        );
    }

    /// A plain Redis service on `url`: it reads and writes the raw stored bytes.
    async fn raw(url: String) -> RedisCacheService {
        RedisCacheService::new(&url, 300)
            .await
            .expect("plain Redis")
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Org {
        slug: String,
        api_secret: String,
    }

    fn org(secret: &str) -> Org {
        Org {
            slug: "acme".to_owned(),
            api_secret: secret.to_owned(),
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn unix_ms(at: SystemTime) -> u64 {
        u64::try_from(at.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
    }

    /// `stored` is a tiered envelope around a value sealed with key `key_id`, both with one
    /// expiry, and holds no `plaintext`; returns that expiry (Unix ms).
    fn assert_sealed(key: &str, stored: &Bytes, plaintext: &[u8], key_id: u32) -> u64 {
        assert!(
            !contains(stored, plaintext),
            "plaintext in Redis under {key}"
        );
        let outer = Envelope::decode(key, stored).expect("a tiered envelope outside");
        let inner = EncryptedEnvelope::parse(key, &outer.payload).expect("a sealed value inside");
        assert_eq!(inner.key_id(), key_id, "sealed with key id {key_id}");
        let sealed_ms = unix_ms(inner.expires_at().expect("an authenticated expiry"));
        assert_eq!(
            sealed_ms, outer.expires_at_ms,
            "one expiry, sealed and outside"
        );
        sealed_ms
    }

    fn is_integrity<T: std::fmt::Debug>(result: Result<T, CacheError>, key: &str) -> String {
        match result {
            Err(err @ CacheError::Integrity { .. }) => {
                let message = err.to_string();
                assert!(message.contains(key), "the error names the key: {message}");
                message
            }
            other => panic!("expected an Integrity error, got {other:?}"),
        }
    }

    /// Every write path (`set`, the cache-aside write-back through a lease, a `None` TTL)
    /// leaves only ciphertext in Redis, sealed with the write's expiry; `None` is the Redis
    /// service's default TTL (120 s here), not the decorator's 300 s.
    async fn redis_holds_only_ciphertext_on(url: String) {
        let channel = cachet::conformance::unique_prefix("l2-ciphertext");
        let cache = sealed(
            RedisCacheService::builder(url.clone()).default_ttl_secs(120),
            &channel,
            InvalidationMode::Bus,
            keys_1(),
        )
        .await;
        let plain = raw(url).await;
        let prefix = cachet::conformance::unique_prefix("l2-ciphertext");

        let set_key = format!("{prefix}org:set");
        let before = now_ms();
        cache.set(&set_key, &org("hunter2"), None).await.unwrap();
        let stored = plain.get_bytes(&set_key).await.unwrap().expect("stored");
        let expiry = assert_sealed(&set_key, &stored, b"hunter2", 1);
        assert!(
            (before + 119_000..=now_ms() + 120_000).contains(&expiry),
            "a None TTL seals the Redis default TTL: {} ms",
            expiry - before
        );

        let short_key = format!("{prefix}org:short");
        let before = now_ms();
        cache
            .set(&short_key, &org("hunter2"), Some(40))
            .await
            .unwrap();
        let stored = plain.get_bytes(&short_key).await.unwrap().unwrap();
        let expiry = assert_sealed(&short_key, &stored, b"hunter2", 1);
        assert!((before + 39_000..=now_ms() + 40_000).contains(&expiry));

        let loaded_key = format!("{prefix}org:loaded");
        let loaded = cache
            .get_or_load(&loaded_key, Some(60), || async {
                Ok::<_, Infallible>(org("swordfish"))
            })
            .await
            .unwrap();
        assert_eq!(loaded, org("swordfish"));
        let stored = plain.get_bytes(&loaded_key).await.unwrap().unwrap();
        assert_sealed(&loaded_key, &stored, b"swordfish", 1);

        // The instance itself reads them back, from its L1 and from Redis.
        assert_eq!(
            cache.get::<Org>(&set_key).await.unwrap(),
            Some(org("hunter2"))
        );
        assert!(
            cache.cached_locally(&set_key),
            "its own write is in its L1, plain"
        );
        cache.invalidate(&set_key).await.unwrap();
        assert_eq!(cache.get::<Org>(&set_key).await.unwrap(), None);
        assert_eq!(
            cache.get::<Org>(&short_key).await.unwrap(),
            Some(org("hunter2"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_holds_only_ciphertext_standalone() {
        redis_holds_only_ciphertext_on(RedisServer::shared().url()).await;
        // And the server's own GET agrees.
        let channel = cachet::conformance::unique_prefix("l2-raw-get");
        let cache = bus(RedisServer::shared().url(), &channel, keys_1()).await;
        let key = cachet::conformance::unique_prefix("l2-raw-get") + "org";
        cache.set(&key, &org("hunter2"), None).await.unwrap();
        let stored: Option<Vec<u8>> = RedisServer::shared().query(&["GET", &key]).unwrap();
        assert_sealed(&key, &Bytes::from(stored.unwrap()), b"hunter2", 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_holds_only_ciphertext_on_the_cluster() {
        redis_holds_only_ciphertext_on(RedisCluster::shared().url()).await;
    }

    /// Two instances with one keyring: a write by A is served, decrypted, by B once the
    /// invalidation arrived, in both invalidation modes; so are overwrites and deletions.
    async fn a_write_is_served_by_the_other_instance(url: String, mode: InvalidationMode) {
        let channel = cachet::conformance::unique_prefix("l2-two");
        let a = sealed(
            RedisCacheService::builder(url.clone()),
            &channel,
            mode,
            keys_1(),
        )
        .await;
        let b = sealed(RedisCacheService::builder(url), &channel, mode, keys_1()).await;
        let key = cachet::conformance::unique_prefix("l2-two") + "org:acme";

        a.set(&key, &org("v1"), None).await.unwrap();
        if mode == InvalidationMode::Bus {
            // A fill that races an invalidation is dropped: let A's message land first.
            assert!(b.wait_for_invalidations(1, DELIVERY).await, "delivery");
        }
        assert_eq!(b.get::<Org>(&key).await.unwrap(), Some(org("v1")));
        assert!(b.cached_locally(&key), "the read filled B's L1");
        for round in 2..6 {
            let seen = b.invalidations_applied();
            let secret = format!("v{round}");
            a.set(&key, &org(&secret), None).await.unwrap();
            assert!(
                b.wait_for_invalidations(seen + 1, DELIVERY).await,
                "delivery"
            );
            assert_eq!(
                b.get::<Org>(&key).await.unwrap(),
                Some(org(&secret)),
                "B served its old copy after the invalidation arrived"
            );
            assert!(b.cached_locally(&key));
        }
        let seen = b.invalidations_applied();
        a.invalidate(&key).await.unwrap();
        assert!(b.wait_for_invalidations(seen + 1, DELIVERY).await);
        assert_eq!(b.get::<Org>(&key).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_by_one_instance_is_served_by_another_over_the_bus() {
        a_write_is_served_by_the_other_instance(RedisServer::shared().url(), InvalidationMode::Bus)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_by_one_instance_is_served_by_another_with_tracking() {
        a_write_is_served_by_the_other_instance(
            RedisServer::shared().url(),
            InvalidationMode::Tracking,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_by_one_instance_is_served_by_another_on_the_cluster() {
        a_write_is_served_by_the_other_instance(
            RedisCluster::shared().url(),
            InvalidationMode::Bus,
        )
        .await;
    }

    /// Rotation: an instance with key 2 current and key 1 previous reads what a key-1
    /// instance wrote, and writes with key 2, which the key-1 instance cannot read (an
    /// Integrity error, never a wrong value) until it gets key 2 too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_keyring_reads_values_written_with_the_previous_key() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-rotation");
        let prefix = cachet::conformance::unique_prefix("l2-rotation");
        let old = bus(url.clone(), &channel, keys_1()).await;
        let rotated_keys = EncryptionKeys::new(2, KEY_2)
            .with_previous(1, KEY_1)
            .unwrap();
        let rotated = bus(url.clone(), &channel, rotated_keys).await;
        let plain = raw(url).await;

        let before = format!("{prefix}before");
        old.set(&before, &org("written with key 1"), None)
            .await
            .unwrap();
        assert!(rotated.wait_for_invalidations(1, DELIVERY).await);
        assert_eq!(
            rotated.get::<Org>(&before).await.unwrap(),
            Some(org("written with key 1"))
        );

        let after = format!("{prefix}after");
        rotated
            .set(&after, &org("written with key 2"), None)
            .await
            .unwrap();
        let stored = plain.get_bytes(&after).await.unwrap().unwrap();
        assert_sealed(&after, &stored, b"written with key 2", 2);
        assert!(old.wait_for_invalidations(1, DELIVERY).await);
        let message = is_integrity(old.get::<Org>(&after).await, &after);
        assert!(message.contains("key id 2"), "{message}");
        assert!(!old.cached_locally(&after));
    }

    /// A keyring without the writer's key never yields the writer's plaintext: the same key
    /// id with another key fails authentication, another id is unknown; the entry stays as
    /// it was. An instance without L2 encryption gets the sealed bytes, which do not decode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_key_is_an_integrity_error_never_the_plaintext() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-wrong-key");
        let key = cachet::conformance::unique_prefix("l2-wrong-key") + "org";
        let writer = bus(url.clone(), &channel, keys_1()).await;
        writer.set(&key, &org("hunter2"), None).await.unwrap();
        let plain = raw(url.clone()).await;
        let stored = plain.get_bytes(&key).await.unwrap().unwrap();

        let same_id = bus(url.clone(), &channel, EncryptionKeys::new(1, KEY_2)).await;
        let message = is_integrity(same_id.get::<Org>(&key).await, &key);
        assert!(message.contains("authentication failed"), "{message}");
        is_integrity(same_id.get_bytes(&key).await, &key);
        assert!(!same_id.cached_locally(&key), "nothing went into its L1");

        let other_id = bus(url.clone(), &channel, EncryptionKeys::new(3, KEY_2)).await;
        let message = is_integrity(other_id.get::<Org>(&key).await, &key);
        assert!(message.contains("key id 1"), "{message}");

        let unencrypted = instance(url, &channel).await;
        let bytes = unencrypted.get_bytes(&key).await.unwrap().unwrap();
        assert!(!contains(&bytes, b"hunter2"));
        assert!(matches!(
            unencrypted.get::<Org>(&key).await,
            Err(CacheError::Serialization { .. })
        ));

        assert_eq!(
            plain.get_bytes(&key).await.unwrap(),
            Some(stored),
            "left as it was"
        );
        assert_eq!(writer.get::<Org>(&key).await.unwrap(), Some(org("hunter2")));
    }

    /// A changed byte of the ciphertext is an Integrity error and stays stored, and a value
    /// stored without encryption is one too; cache-aside treats each as a miss and
    /// overwrites it with a sealed value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tampered_and_plain_values_are_integrity_errors_that_cache_aside_replaces() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-tampered");
        let prefix = cachet::conformance::unique_prefix("l2-tampered");
        let writer = bus(url.clone(), &channel, keys_1()).await;
        let reader = bus(url.clone(), &channel, keys_1()).await;
        let plain = raw(url.clone()).await;

        let tampered = format!("{prefix}tampered");
        writer
            .set(&tampered, &org("hunter2"), Some(60))
            .await
            .unwrap();
        let mut bytes = plain.get_bytes(&tampered).await.unwrap().unwrap().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        plain
            .set_bytes(&tampered, Bytes::from(bytes.clone()), Some(60))
            .await
            .unwrap();

        // A tiered instance without encryption writes a plain envelope.
        let unsealed = format!("{prefix}unsealed");
        let unencrypted = instance(url, &channel).await;
        unencrypted
            .set(&unsealed, &org("hunter2"), Some(60))
            .await
            .unwrap();
        let unsealed_bytes = plain.get_bytes(&unsealed).await.unwrap().unwrap();

        for (key, stored) in [(&tampered, Bytes::from(bytes)), (&unsealed, unsealed_bytes)] {
            is_integrity(reader.get::<Org>(key).await, key);
            assert_eq!(plain.get_bytes(key).await.unwrap(), Some(stored));
            let reloaded = reader
                .get_or_load(key, Some(60), || async {
                    Ok::<_, Infallible>(org("reloaded"))
                })
                .await
                .unwrap();
            assert_eq!(reloaded, org("reloaded"));
            let now = plain.get_bytes(key).await.unwrap().unwrap();
            assert_sealed(key, &now, b"reloaded", 1);
        }
    }

    /// An expired sealed value is a miss, whatever the envelope outside it and the server's
    /// TTL say: one saved while valid and written back later under a fresh envelope (by
    /// someone with write access to Redis) is never served, and cache-aside reloads it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_sealed_value_is_a_miss() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-expired");
        let key = cachet::conformance::unique_prefix("l2-expired") + "org";
        let cache = bus(url.clone(), &channel, keys_1()).await;
        let plain = raw(url).await;
        let payload = serde_json::to_vec(&org("old secret")).unwrap();
        let dead = keys_1()
            .encrypt_until(&key, &payload, SystemTime::now() - Duration::from_secs(1))
            .unwrap();
        let written_back = Envelope {
            expires_at_ms: now_ms() + 3_600_000,
            payload: dead,
        };
        plain
            .set_bytes(&key, written_back.encode(), Some(3_600))
            .await
            .unwrap();

        assert_eq!(cache.get::<Org>(&key).await.unwrap(), None);
        assert_eq!(cache.get_bytes(&key).await.unwrap(), None);
        assert!(!cache.cached_locally(&key));
        let mut loads = 0;
        let loaded = cache
            .get_or_load(&key, Some(60), || {
                loads += 1;
                async { Ok::<_, Infallible>(org("fresh")) }
            })
            .await
            .unwrap();
        assert_eq!((loaded, loads), (org("fresh"), 1));
        let stored = plain.get_bytes(&key).await.unwrap().unwrap();
        assert_sealed(&key, &stored, b"fresh", 1);
    }

    /// An L1 copy lives no longer than its sealed expiry, even under an envelope (and a
    /// server TTL) that claims an hour.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_l1_copy_ends_with_the_sealed_expiry() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-l1-expiry");
        let key = cachet::conformance::unique_prefix("l2-l1-expiry") + "org";
        let cache = bus(url.clone(), &channel, keys_1()).await;
        let sealed_until = SystemTime::now() + Duration::from_millis(1_500);
        let soon = keys_1().encrypt_until(&key, b"1", sealed_until).unwrap();
        let claims_an_hour = Envelope {
            expires_at_ms: now_ms() + 3_600_000,
            payload: soon,
        };
        raw(url)
            .await
            .set_bytes(&key, claims_an_hour.encode(), Some(3_600))
            .await
            .unwrap();

        assert_eq!(cache.get::<i32>(&key).await.unwrap(), Some(1));
        assert!(cache.cached_locally(&key));
        // Well below the L1 lifetime (30 s) and the envelope's hour.
        let bound = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.cached_locally(&key) {
            assert!(
                tokio::time::Instant::now() < bound,
                "the L1 copy outlived its sealed expiry"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(SystemTime::now() + Duration::from_millis(50) >= sealed_until);
        assert_eq!(cache.get::<i32>(&key).await.unwrap(), None);
    }

    /// The L1 holds plain payloads: `get_shared` hits (after an own write, and after a fill
    /// from Redis, which decrypts once) are one shared decoded value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_shared_hits_share_one_decoded_value() {
        let url = RedisServer::shared().url();
        for mode in [InvalidationMode::Bus, InvalidationMode::Tracking] {
            let channel = cachet::conformance::unique_prefix("l2-shared");
            let key = cachet::conformance::unique_prefix("l2-shared") + "org";
            let a = sealed(
                RedisCacheService::builder(url.clone()),
                &channel,
                mode,
                keys_1(),
            )
            .await;
            let b = sealed(
                RedisCacheService::builder(url.clone()),
                &channel,
                mode,
                keys_1(),
            )
            .await;
            a.set(&key, &org("hunter2"), None).await.unwrap();
            if mode == InvalidationMode::Bus {
                assert!(b.wait_for_invalidations(1, DELIVERY).await, "delivery");
            }

            let first = b.get_shared::<Org>(&key).await.unwrap().unwrap();
            assert_eq!(*first, org("hunter2"));
            assert!(b.cached_locally(&key), "{mode:?}: the read filled the L1");
            let hit = b.get_shared::<Org>(&key).await.unwrap().unwrap();
            let again = b.get_shared::<Org>(&key).await.unwrap().unwrap();
            assert!(
                Arc::ptr_eq(&hit, &again),
                "{mode:?}: decoded once, then shared"
            );
            assert_eq!(*hit, org("hunter2"));

            if mode == InvalidationMode::Bus {
                // An own write fills the L1 (bus mode only), with the plain value.
                assert!(a.cached_locally(&key));
                let hit = a.get_shared::<Org>(&key).await.unwrap().unwrap();
                let again = a.get_shared::<Org>(&key).await.unwrap().unwrap();
                assert!(Arc::ptr_eq(&hit, &again));
            }

            // A write by A replaces the shared value on B once the invalidation arrived.
            let seen = b.invalidations_applied();
            a.set(&key, &org("hunter3"), None).await.unwrap();
            assert!(b.wait_for_invalidations(seen + 1, DELIVERY).await);
            let next = b.get_shared::<Org>(&key).await.unwrap().unwrap();
            assert_eq!(*next, org("hunter3"), "{mode:?}");
        }
    }

    /// `EncryptedCacheService` around a tiered instance stores the same bytes in Redis as
    /// L2 encryption does (the tiered envelope around the sealed value, the same key name
    /// bound), so the two stacks read each other's writes with one keyring: a fleet can
    /// move from one to the other without misses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wrapped_stack_and_l2_encryption_read_each_other() {
        let url = RedisServer::shared().url();
        let channel = cachet::conformance::unique_prefix("l2-mixed");
        let prefix = cachet::conformance::unique_prefix("l2-mixed");
        let wrapped_tiered = instance(url.clone(), &channel).await;
        let wrapped = EncryptedCacheService::new(wrapped_tiered.clone(), keys_1());
        let l2 = bus(url.clone(), &channel, keys_1()).await;
        let plain = raw(url).await;
        let (k1, k2) = (format!("{prefix}one"), format!("{prefix}two"));

        wrapped
            .set(&k1, &org("from the wrapper"), Some(60))
            .await
            .unwrap();
        let stored = plain.get_bytes(&k1).await.unwrap().unwrap();
        // The wrapper seals with its own clock read, before the tiered cache takes its own
        // for the envelope: the two expiries may differ by the time between them.
        let outer = Envelope::decode(&k1, &stored).expect("a tiered envelope outside");
        let inner = EncryptedEnvelope::parse(&k1, &outer.payload).expect("a sealed value inside");
        assert!(
            !contains(&stored, b"from the wrapper"),
            "plaintext in Redis"
        );
        let sealed_ms = unix_ms(inner.expires_at().expect("an authenticated expiry"));
        assert!(
            (sealed_ms..=sealed_ms + 1_000).contains(&outer.expires_at_ms),
            "sealed {sealed_ms}, outside {}",
            outer.expires_at_ms
        );
        assert!(l2.wait_for_invalidations(1, DELIVERY).await);
        assert_eq!(
            l2.get::<Org>(&k1).await.unwrap(),
            Some(org("from the wrapper"))
        );

        l2.set(&k2, &org("from l2"), Some(60)).await.unwrap();
        assert!(wrapped_tiered.wait_for_invalidations(1, DELIVERY).await);
        assert_eq!(wrapped.get::<Org>(&k2).await.unwrap(), Some(org("from l2")));
        assert!(wrapped_tiered.cached_locally(&k2));
        // The wrapper's L1 holds ciphertext; L2 encryption's holds the plain value.
        let wrapped_copy = wrapped_tiered.get_bytes(&k2).await.unwrap().unwrap();
        assert!(!contains(&wrapped_copy, b"from l2"));
        let l2_copy = l2.get_bytes(&k2).await.unwrap().unwrap();
        assert!(contains(&l2_copy, b"from l2"));

        // Overwrites cross over too, each side's L1 copy dropped by the other's message.
        l2.set(&k1, &org("l2 again"), Some(60)).await.unwrap();
        assert!(wrapped_tiered.wait_for_invalidations(2, DELIVERY).await);
        assert_eq!(
            wrapped.get::<Org>(&k1).await.unwrap(),
            Some(org("l2 again"))
        );
        wrapped
            .set(&k2, &org("wrapper again"), Some(60))
            .await
            .unwrap();
        assert!(l2.wait_for_invalidations(2, DELIVERY).await);
        assert_eq!(
            l2.get::<Org>(&k2).await.unwrap(),
            Some(org("wrapper again"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn debug_shows_key_ids_never_keys() {
        let channel = cachet::conformance::unique_prefix("l2-debug");
        let keys = EncryptionKeys::new(2, KEY_2)
            .with_previous(1, KEY_1)
            .unwrap();
        let cache = bus(RedisServer::shared().url(), &channel, keys).await;
        assert_eq!(
            cache.l2_encryption_keys().map(EncryptionKeys::current_id),
            Some(2)
        );
        let debug = format!("{cache:?}");
        assert!(
            debug.contains("current_id: 2, previous_ids: [1]"),
            "{debug}"
        );
        for byte in [KEY_1[0], KEY_2[0]] {
            assert!(!debug.contains(&format!("{byte}, {byte}")), "{debug}");
        }
        let unencrypted = instance(RedisServer::shared().url(), &channel).await;
        assert!(unencrypted.l2_encryption_keys().is_none());
    }
}
