//! The conformance suite against real servers started by `tests/support`: a standalone
//! redis-server, a 3-primary Redis Cluster, a Sentinel setup (primary + replica + sentinel)
//! and Valkey. One server of each kind is shared by the tests of this binary; every test has
//! its own key prefix, so they run in parallel without flushing anything.

mod support;

use std::sync::OnceLock;

use cachet::RedisCacheService;
use support::{RedisCluster, RedisServer, SentinelSetup};

fn sentinel() -> &'static SentinelSetup {
    static SETUP: OnceLock<SentinelSetup> = OnceLock::new();
    SETUP.get_or_init(SentinelSetup::start)
}

async fn connect(url: String) -> RedisCacheService {
    match RedisCacheService::new(&url, 300).await {
        Ok(service) => service,
        Err(e) => panic!("cannot connect to {url}: {e}"),
    }
}

mod redis_standalone {
    cachet::conformance_tests!(super::connect(super::RedisServer::shared().url()).await);
}

mod redis_cluster {
    cachet::conformance_tests!(super::connect(super::RedisCluster::shared().url()).await);
}

mod redis_sentinel {
    cachet::conformance_tests!(super::connect(super::sentinel().url()).await);
}

mod valkey_standalone {
    cachet::conformance_tests!(super::connect(super::RedisServer::shared_valkey().url()).await);
}

mod message_pack_cluster {
    cachet::conformance_tests!(
        cachet::RedisCacheService::builder(super::RedisCluster::shared().url())
            .codec(cachet::codec::MessagePack)
            .build()
            .await
            .expect("a MessagePack service on the cluster")
    );
}

mod through_cache_enum {
    cachet::conformance_tests!(cachet::Cache::from(
        super::connect(super::RedisServer::shared().url()).await
    ));
}

mod namespaced {
    cachet::conformance_tests!(
        cachet::RedisCacheService::builder(super::RedisServer::shared().url())
            .namespace("tenant-a:")
            .build()
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn keys_are_stored_under_exactly_their_name_with_the_default_ttl() {
    let server = RedisServer::shared();
    let cache = connect(server.url()).await;
    let key = format!("{}plain key", cachet::conformance::unique_prefix("layout"));
    cachet::CacheServiceExt::set(&cache, &key, &"v", None)
        .await
        .unwrap();
    assert_eq!(server.cli(&["GET", &key]).trim(), "\"v\"");
    let ttl: u64 = server.cli(&["TTL", &key]).trim().parse().unwrap();
    assert!((295..=300).contains(&ttl), "TTL {ttl}");
}

#[tokio::test]
async fn a_namespace_prefixes_keys_and_bounds_prefix_invalidation() {
    let server = RedisServer::shared();
    let base = cachet::conformance::unique_prefix("ns");
    let a = RedisCacheService::builder(server.url())
        .namespace(format!("{base}a:"))
        .build()
        .await
        .unwrap();
    let b = RedisCacheService::builder(server.url())
        .namespace(format!("{base}b:"))
        .build()
        .await
        .unwrap();
    use cachet::{CacheService, CacheServiceExt};
    a.set("k", &1, None).await.unwrap();
    b.set("k", &2, None).await.unwrap();
    assert_eq!(server.cli(&["GET", &format!("{base}a:k")]).trim(), "1");
    assert_eq!(a.invalidate_prefix("").await.unwrap(), 1);
    assert_eq!(b.get::<i32>("k").await.unwrap(), Some(2));
}

mod pooled {
    cachet::conformance_tests!(
        cachet::RedisCacheService::builder(super::RedisServer::shared().url())
            .pool_size(3)
            .build()
            .await
            .unwrap()
    );
}

mod valkey_cluster {
    fn cluster() -> &'static super::RedisCluster {
        static CLUSTER: std::sync::OnceLock<super::RedisCluster> = std::sync::OnceLock::new();
        CLUSTER.get_or_init(super::RedisCluster::start_valkey)
    }

    cachet::conformance_tests!(super::connect(cluster().url()).await);
}

/// Many SCAN pages (their COUNT adapting on the way): still exactly the matching keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prefix_invalidation_is_exact() {
    use cachet::{CacheService, CacheServiceExt};
    let server = RedisServer::start(); // private: DBSIZE below must count only these keys
    let cache = connect(server.url()).await;
    for chunk in (0..60_000u32).collect::<Vec<_>>().chunks(2_000) {
        let writes = chunk.iter().map(|&i| {
            let key = if i % 12 == 0 {
                format!("hot:[{i}]*")
            } else {
                format!("cold:{i}")
            };
            let cache = &cache;
            async move { cache.set(&key, &i, None).await }
        });
        for result in futures_util::future::join_all(writes).await {
            result.unwrap();
        }
    }
    assert_eq!(cache.invalidate_prefix("hot:[").await.unwrap(), 5_000);
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "55000");
    assert_eq!(cache.invalidate_prefix("hot:").await.unwrap(), 0);
    assert_eq!(cache.get::<u32>("cold:1").await.unwrap(), Some(1));
}

/// One key, two services with different codecs: each reads the other's value as a
/// `Serialization` error that names both codecs (never a wrong value), and the value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_written_with_one_codec_and_read_with_another_names_both() {
    use cachet::CacheServiceExt;
    let url = RedisServer::shared().url();
    let json = connect(url.clone()).await;
    let packed = cachet::RedisCacheService::builder(url)
        .codec(cachet::codec::MessagePack)
        .build()
        .await
        .unwrap();
    let prefix = cachet::conformance::unique_prefix("codec-mismatch");
    for (writer, reader, written, read) in [
        (&json, &packed, "json", "msgpack"),
        (&packed, &json, "msgpack", "json"),
    ] {
        let key = format!("{prefix}{written}");
        writer.set(&key, &"pro", None).await.unwrap();
        for result in [
            reader.get::<String>(&key).await.map(|v| v.is_some()),
            reader.get_shared::<String>(&key).await.map(|v| v.is_some()),
        ] {
            let error = result.expect_err("another codec's bytes");
            assert!(
                matches!(error, cachet::CacheError::Serialization { .. }),
                "{error:?}"
            );
            let text = format!("{error}");
            assert!(
                text.contains(written) && text.contains(read),
                "the error names both codecs: {text}"
            );
        }
        assert_eq!(
            writer.get::<String>(&key).await.unwrap().as_deref(),
            Some("pro")
        );
    }
}
