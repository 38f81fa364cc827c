//! The conformance suite on the in-memory backend: directly, through the `Cache` enum, and
//! through `Arc<dyn CacheService>` (the forwarding impls), plus what only this backend has.

use std::sync::Arc;
use std::time::Duration;

use cachet::{Cache, CacheError, CacheService, CacheServiceExt, MokaCacheService};

mod moka_service {
    cachet::conformance_tests!(cachet::MokaCacheService::default());
}

mod cache_enum {
    cachet::conformance_tests!(cachet::Cache::from(cachet::MokaCacheService::default()));
}

mod arc_dyn {
    use std::sync::Arc;

    use cachet::CacheService;

    cachet::conformance_tests!(
        Arc::new(cachet::MokaCacheService::default()) as Arc<dyn CacheService>
    );
}

mod boxed_byte_bounded {
    cachet::conformance_tests!(Box::new(
        cachet::MokaCacheService::builder()
            .max_bytes(256 << 20)
            .build()
            .unwrap()
    ) as Box<dyn cachet::CacheService>);
}

mod message_pack {
    cachet::conformance_tests!(
        cachet::MokaCacheService::builder()
            .codec(cachet::codec::MessagePack)
            .build()
            .unwrap()
    );
}

#[test]
fn conformance_suite_has_at_least_20_checks() {
    assert!(cachet::conformance::CHECKS.len() >= 20);
}

#[test]
fn services_are_send_sync_debug() {
    fn assert_service<T: Send + Sync + std::fmt::Debug + 'static>() {}
    assert_service::<MokaCacheService>();
    assert_service::<Cache>();
    assert_service::<Arc<dyn CacheService>>();
}

#[tokio::test]
async fn futures_are_send() {
    fn assert_send<F: std::future::Future + Send>(f: F) -> F {
        f
    }
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    assert_send(cache.set("k", &1, None)).await.unwrap();
    assert_eq!(assert_send(cache.get::<i32>("k")).await.unwrap(), Some(1));
    assert_send(cache.invalidate("k")).await.unwrap();
    assert_eq!(assert_send(cache.invalidate_prefix("k")).await.unwrap(), 0);
}

#[tokio::test]
async fn configured_default_ttl_applies_to_none() {
    let cache = MokaCacheService::builder()
        .default_ttl_secs(1)
        .build()
        .unwrap();
    assert_eq!(cache.default_ttl(), Duration::from_secs(1));
    cache.set("default", &1, None).await.unwrap();
    cache.set("explicit", &2, Some(60)).await.unwrap();
    assert_eq!(cache.get::<i32>("default").await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(cache.get::<i32>("default").await.unwrap(), None);
    assert_eq!(cache.get::<i32>("explicit").await.unwrap(), Some(2));
}

#[test]
fn default_is_ten_thousand_entries_and_300_seconds() {
    let cache = MokaCacheService::default();
    assert_eq!(cache.default_ttl(), Duration::from_secs(300));
    let debug = format!("{cache:?}");
    assert!(debug.contains("Entries(10000)"), "{debug}");
}

#[test]
fn invalid_default_ttl_is_an_error() {
    for secs in [0, cachet::MAX_TTL_SECS + 1] {
        let err = MokaCacheService::builder()
            .default_ttl_secs(secs)
            .build()
            .unwrap_err();
        assert!(matches!(err, CacheError::Config { .. }), "{err}");
    }
}

#[tokio::test]
async fn entry_capacity_is_bounded() {
    let cache = MokaCacheService::builder()
        .max_entries(100)
        .build()
        .unwrap();
    for i in 0..5_000 {
        cache.set(&format!("k{i}"), &i, None).await.unwrap();
    }
    cache.run_pending_tasks();
    assert!(
        cache.entry_count() <= 100,
        "{} entries",
        cache.entry_count()
    );
}

#[tokio::test]
async fn byte_capacity_bounds_memory_not_entry_count() {
    // 1 MiB budget: a hundred 64 KiB values cannot all stay, but thousands of tiny ones can.
    let cache = MokaCacheService::builder()
        .max_bytes(1 << 20)
        .build()
        .unwrap();
    let big = bytes::Bytes::from(vec![7u8; 64 << 10]);
    for i in 0..100 {
        cache
            .set_bytes(&format!("big{i}"), big.clone(), None)
            .await
            .unwrap();
    }
    cache.run_pending_tasks();
    assert!(
        cache.entry_count() <= 16,
        "{} entries of 64 KiB in 1 MiB",
        cache.entry_count()
    );

    let small = MokaCacheService::builder()
        .max_bytes(1 << 20)
        .build()
        .unwrap();
    for i in 0..2_000 {
        small.set(&format!("s{i}"), &i, None).await.unwrap();
    }
    small.run_pending_tasks();
    assert_eq!(small.entry_count(), 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spawned_tasks_share_one_cache() {
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let cache = Arc::clone(&cache);
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let key = format!("spawned:{t}:{i}");
                cache.set(&key, &(t, i), None).await.unwrap();
                assert_eq!(cache.get::<(u64, u64)>(&key).await.unwrap(), Some((t, i)));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(cache.invalidate_prefix("spawned:").await.unwrap(), 16 * 200);
}

#[tokio::test]
async fn invalidate_prefix_of_a_tenth_of_100k_entries_is_exact() {
    let cache = MokaCacheService::builder()
        .max_entries(200_000)
        .build()
        .unwrap();
    for i in 0..100_000u32 {
        let key = if i % 10 == 0 {
            format!("org:hot:{i}")
        } else {
            format!("org:cold:{i}")
        };
        cache
            .set_bytes(&key, bytes::Bytes::from_static(b"1"), None)
            .await
            .unwrap();
    }
    assert_eq!(cache.invalidate_prefix("org:hot:").await.unwrap(), 10_000);
    assert_eq!(cache.invalidate_prefix("org:hot:").await.unwrap(), 0);
    assert_eq!(cache.invalidate_prefix("org:").await.unwrap(), 90_000);
}

#[tokio::test]
async fn fast_path_is_forwarded_by_every_wrapper() {
    let moka = MokaCacheService::default();
    moka.set("k", &1, None).await.unwrap();
    let expected = Some(Some(bytes::Bytes::from_static(b"1")));
    let via_enum = Cache::from(moka.clone());
    let via_arc: Arc<dyn CacheService> = Arc::new(moka.clone());
    let via_box: Box<dyn CacheService> = Box::new(moka.clone());
    let via_ref: &dyn CacheService = &moka;
    for (name, answer) in [
        ("MokaCacheService", moka.get_bytes_now("k")),
        ("Cache::Moka", via_enum.get_bytes_now("k")),
        ("Arc<dyn>", via_arc.get_bytes_now("k")),
        ("Box<dyn>", via_box.get_bytes_now("k")),
        ("&dyn", via_ref.get_bytes_now("k")),
    ] {
        assert_eq!(answer.transpose().unwrap(), expected, "{name}");
    }
    assert_eq!(
        moka.get_bytes_now("missing").transpose().unwrap(),
        Some(None)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn long_prefix_invalidation_lets_other_tasks_run() {
    use std::sync::atomic::{AtomicU64, Ordering};

    let cache = MokaCacheService::builder()
        .max_entries(200_000)
        .build()
        .unwrap();
    for i in 0..100_000u32 {
        cache
            .set_bytes(&format!("bulk:{i}"), bytes::Bytes::from_static(b"1"), None)
            .await
            .unwrap();
    }
    // On a single-threaded runtime, this task only runs when invalidate_prefix yields.
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = Arc::clone(&ticks);
        async move {
            loop {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    tokio::task::yield_now().await; // let the ticker start
    let before = ticks.load(Ordering::Relaxed);
    assert_eq!(cache.invalidate_prefix("bulk:").await.unwrap(), 100_000);
    let during = ticks.load(Ordering::Relaxed) - before;
    ticker.abort();
    assert!(
        during >= 10,
        "the ticker ran only {during} times during the scan"
    );
}

/// A cached "not found" marker and a value of the same key replace each other across the
/// two spaces; every operation sees the key in whichever space holds it.
#[tokio::test]
async fn markers_and_values_of_one_key_replace_each_other() {
    use cachet::load::{Frame, LeaseRead, LeaseRequest};
    let cache = MokaCacheService::builder()
        .max_entries(100)
        .build()
        .unwrap();
    let marker = Frame::absent(u64::MAX).encode();
    let value = bytes::Bytes::from_static(b"\"v\"");
    cache.set_bytes("t:k", marker.clone(), None).await.unwrap();
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), Some(marker.clone()));
    cache.run_pending_tasks();
    assert_eq!((cache.negative_entry_count(), cache.entry_count()), (1, 1));
    cache.set_bytes("t:k", value.clone(), None).await.unwrap();
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), Some(value.clone()));
    cache.run_pending_tasks();
    assert_eq!((cache.negative_entry_count(), cache.entry_count()), (0, 1));
    cache.set_bytes("t:k", marker.clone(), None).await.unwrap();
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), Some(marker.clone()));
    // A lease sees the marker as the stored value, and taking it over hides the marker.
    let mut request = LeaseRequest::new();
    let LeaseRead::Value { version, .. } = cache.lease("t:k", &request).await.unwrap() else {
        panic!("the marker is the key's value");
    };
    request.replace = Some(version);
    let LeaseRead::Granted(lease) = cache.lease("t:k", &request).await.unwrap() else {
        panic!("a lease replacing the marker is granted");
    };
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), None);
    assert!(
        cache
            .set_leased("t:k", &lease, marker.clone(), None)
            .await
            .unwrap()
    );
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), Some(marker.clone()));
    // Invalidation, prefixes and clear reach markers too.
    cache.invalidate("t:k").await.unwrap();
    assert_eq!(cache.get_bytes("t:k").await.unwrap(), None);
    cache.set_bytes("t:a", marker.clone(), None).await.unwrap();
    cache.set_bytes("t:b", value.clone(), None).await.unwrap();
    cache.set_bytes("u:c", marker.clone(), None).await.unwrap();
    assert_eq!(cache.invalidate_prefix("t:").await.unwrap(), 2);
    assert_eq!(cache.get_bytes("u:c").await.unwrap(), Some(marker));
    cache.clear();
    assert_eq!(cache.get_bytes("u:c").await.unwrap(), None);
}
