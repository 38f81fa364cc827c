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

/// Reads look at the backend's own index, moka bounds and evicts: under writers racing on
/// the same keys (values, "not found" markers, leases, invalidations, prefixes, clears), the
/// index must never keep an entry moka has let go, or memory would grow past the bound.
#[test]
fn the_read_index_stays_within_the_bound_under_racing_writers() {
    use cachet::load::{Frame, LeaseRead, LeaseRequest};
    let cache = MokaCacheService::builder()
        .max_entries(100)
        .build()
        .unwrap();
    // Short keys (kept in the index's slots) and long ones (shared with moka), around the
    // boundary, some not ASCII.
    let keys: Vec<String> = (0..3_000)
        .map(|i| match i % 4 {
            0 => format!("k{i}"),
            1 => format!("{:0>22}", i),
            2 => format!("{:é>12}{i}", ""),
            _ => format!("tenant:{i}:a-long-key-past-the-inline-size"),
        })
        .collect();
    let marker = Frame::absent(u64::MAX).encode();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (cache, keys, marker) = (&cache, &keys, &marker);
            scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let mut x = t * 7_919 + 1;
                    for step in 0..20_000u64 {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        let key = &keys[(x >> 33) as usize % keys.len()];
                        match step % 10 {
                            0..=4 => cache.set(key, &step, None).await.unwrap(),
                            5 => cache.set_bytes(key, marker.clone(), None).await.unwrap(),
                            6 => cache.invalidate(key).await.unwrap(),
                            7 => {
                                let request = LeaseRequest::new();
                                if let LeaseRead::Granted(lease) =
                                    cache.lease(key, &request).await.unwrap()
                                {
                                    let _ = cache.set_leased(key, &lease, "1".into(), None).await;
                                }
                            }
                            8 if step % 1_000 == 8 => cache.clear(),
                            8 if step % 100 == 18 => {
                                cache.invalidate_prefix("k1").await.unwrap();
                            }
                            _ => {
                                let _ = cache.get_bytes(key).await.unwrap();
                            }
                        }
                    }
                });
            });
        }
    });
    runtime.block_on(async {
        for _ in 0..3 {
            cache.run_pending_tasks();
        }
        // 100 values and 10 markers at most (a tenth, in their own space).
        assert!(
            cache.entry_count() <= 110,
            "the index holds {} entries for a bound of 100 + 10",
            cache.entry_count()
        );
        // And it still reads what is written, for every kind of key.
        cache.clear();
        for key in keys.iter().take(8) {
            cache.set(key, &key.len(), None).await.unwrap();
            assert_eq!(
                cache.get::<usize>(key).await.unwrap(),
                Some(key.len()),
                "{key}"
            );
        }
        assert_eq!(cache.invalidate_prefix("tenant:").await.unwrap(), 2);
        assert_eq!(cache.invalidate_prefix("éé").await.unwrap(), 2);
    });
}

/// Expired entries stop being read at once and leave memory once moka drops them.
#[tokio::test]
async fn expired_entries_leave_memory() {
    let cache = MokaCacheService::default();
    for i in 0..300 {
        cache.set(&format!("short:{i}"), &i, Some(1)).await.unwrap();
    }
    cache.set("long", &1, Some(60)).await.unwrap();
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 301);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(cache.get::<u32>("short:7").await.unwrap(), None);
    cache.run_pending_tasks();
    assert_eq!(
        cache.entry_count(),
        1,
        "only the entry with 60 s left stays"
    );
}

/// Hits are handed to moka's eviction policy (a sample of them): keys read often survive a
/// flood of keys that were each looked up once and then written, which the policy would
/// otherwise prefer (a miss counts for the key it names).
#[tokio::test]
async fn keys_read_often_survive_a_flood_of_keys_loaded_once() {
    let cache = MokaCacheService::builder()
        .max_entries(100)
        .build()
        .unwrap();
    for i in 0..90 {
        cache.set(&format!("hot:{i}"), &i, None).await.unwrap();
    }
    for _ in 0..640 {
        for i in 0..90 {
            assert!(
                cache
                    .get_bytes(&format!("hot:{i}"))
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }
    for i in 0..2_000 {
        let key = format!("cold:{i}");
        assert_eq!(cache.get_bytes(&key).await.unwrap(), None);
        cache.set(&key, &i, None).await.unwrap();
        if i % 100 == 99 {
            cache.run_pending_tasks();
        }
    }
    cache.run_pending_tasks();
    let mut kept = 0;
    for i in 0..90 {
        kept += usize::from(
            cache
                .get_bytes(&format!("hot:{i}"))
                .await
                .unwrap()
                .is_some(),
        );
    }
    // 79 of 90 stay here; with no hit handed to moka, none does.
    assert!(
        kept >= 60,
        "only {kept} of 90 keys read 640 times each are left"
    );
}
