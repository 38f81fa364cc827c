//! Tags across instances: an `invalidate_tag` on one tiered instance hides, on another,
//! entries that instance already holds in its L1 (within the invalidation bound), on a
//! single server and on a real 3-primary cluster (records and entries in different slots),
//! with client tracking and with the bus; entries tagged afterwards are served everywhere.
//! The per-backend checks are in `cachet::conformance` (tags). Servers run for real
//! (tests/support), never 6379.

mod support;

use std::time::{Duration, Instant};

use cachet::backend::tiered::InvalidationMode;
use cachet::conformance::unique_prefix;
use cachet::{CacheService, CacheServiceExt, RedisCacheService, TieredCacheService};
use support::{RedisCluster, RedisServer};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

async fn tiered(url: &str, channel: &str, mode: InvalidationMode) -> TieredCacheService {
    let cache = TieredCacheService::builder(RedisCacheService::builder(url))
        .channel_prefix(channel)
        .invalidation(mode)
        .build()
        .await
        .expect("tiered");
    assert!(
        cache.wait_until_confirmed(HANG).await,
        "invalidations confirmed"
    );
    cache
}

/// Waits (bounded) until `keys` read as `want` through `cache` (with `get_many`, and each
/// with `get` and `get_shared`).
async fn eventually(cache: &dyn CacheService, keys: &[&str], want: &[Option<u32>], what: &str) {
    let deadline = Instant::now() + HANG;
    loop {
        // The three reads are not one snapshot: while an invalidation is on its way they may
        // differ; the check is that all three reach `want`.
        let many = cache.get_many::<u32>(keys).await.unwrap();
        let (mut single, mut shared) = (Vec::new(), Vec::new());
        for key in keys {
            single.push(cache.get::<u32>(key).await.unwrap());
            let value = cache.get_shared::<u32>(key).await.unwrap();
            shared.push(value.as_deref().copied());
        }
        if many == want && single == want && shared == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still get_many {many:?}, get {single:?}, get_shared {shared:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn across_two_instances(url: &str, mode: InvalidationMode) {
    let channel = unique_prefix("tags-bus");
    let a = tiered(url, &channel, mode).await;
    let b = tiered(url, &channel, mode).await;
    let prefix = unique_prefix("tags");
    let names: Vec<String> = (0..6).map(|i| format!("{prefix}token:{i}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let (user, other) = (format!("{prefix}user:42"), format!("{prefix}user:7"));
    for (i, key) in keys.iter().enumerate() {
        let tag = if i < 4 { &user } else { &other };
        a.set_tagged(key, &(i as u32), Some(300), &[tag.as_str()])
            .await
            .unwrap();
    }
    let all: Vec<Option<u32>> = (0..6).map(Some).collect();
    eventually(&b, &keys, &all, "B reads A's tagged entries").await;
    for key in &keys {
        assert!(
            b.cached_locally(key),
            "{key} in B's L1 before the invalidation"
        );
    }

    a.invalidate_tag(&user).await.unwrap();
    let after = [None, None, None, None, Some(4), Some(5)];
    eventually(&b, &keys, &after, "B after A's invalidate_tag").await;
    eventually(&a, &keys, &after, "A after its own invalidate_tag").await;

    a.set_tagged(keys[0], &100u32, Some(300), &[user.as_str()])
        .await
        .unwrap();
    let again = [Some(100), None, None, None, Some(4), Some(5)];
    eventually(
        &b,
        &keys,
        &again,
        "B reads an entry tagged after the invalidation",
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tag_reaches_another_instance_tracking() {
    across_two_instances(&RedisServer::shared().url(), InvalidationMode::Tracking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tag_reaches_another_instance_bus() {
    across_two_instances(&RedisServer::shared().url(), InvalidationMode::Bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tag_reaches_another_instance_on_a_cluster() {
    across_two_instances(&RedisCluster::shared().url(), InvalidationMode::Tracking).await;
}
