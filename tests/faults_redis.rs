//! Failure and recovery against real servers that these tests start, kill and restart
//! themselves: every call returns within its bound (a `Backend` error naming the server,
//! never a hang or a panic), and the same service object works again once the server is back.
//!
//! Bounds are checked with a generous outer `timeout` (a hang would exceed it by far); no
//! test asserts how fast anything is.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cachet::{CacheError, CacheService, CacheServiceExt, RedisCacheService};
use support::{RedisCluster, RedisServer, SentinelSetup, free_port};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// Far above every configured bound: reaching it means a call hung.
const HANG: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, call).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {HANG:?}: a hang"),
    }
}

async fn service(url: String) -> RedisCacheService {
    RedisCacheService::builder(url)
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .expect("connect")
}

/// Retries `set` then `get` of `key` until both succeed (at most 30 s); the value read back.
async fn until_working(cache: &RedisCacheService, key: &str) -> u64 {
    let started = tokio::time::Instant::now();
    loop {
        let attempt = async {
            cache.set(key, &7u64, None).await?;
            cache.get::<u64>(key).await
        };
        match bounded("a call while recovering", attempt).await {
            Ok(Some(v)) => return v,
            Ok(None) => panic!("{key} missing right after set"),
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                assert!(
                    matches!(e, CacheError::Backend { .. } | CacheError::Timeout { .. }),
                    "{e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing after 30 s: {e}"),
        }
    }
}

/// A server that does not answer within the command timeout (`CLIENT PAUSE`): each call is a
/// `Timeout` naming the server, the operation, the key and the limit, and the service works
/// again once the server answers.
#[tokio::test]
async fn a_stalled_server_is_a_timeout_error() {
    let server = RedisServer::start();
    let cache = service(server.url()).await;
    cache.set("stall:k", &1u32, None).await.unwrap();
    let port = server.port();
    server
        .command(&["CLIENT", "PAUSE", "1500", "ALL"])
        .expect("CLIENT PAUSE");
    let err = bounded("get on a stalled server", cache.get::<u32>("stall:k")).await;
    match err {
        Err(CacheError::Timeout {
            ref backend,
            operation,
            ref key,
            after,
        }) => {
            assert!(
                backend.contains(&port.to_string()),
                "names the server: {err:?}"
            );
            assert_eq!(operation, "get");
            assert_eq!(key.shown(), "stall:k");
            assert_eq!(after, COMMAND_TIMEOUT);
        }
        other => panic!("expected CacheError::Timeout, got {other:?}"),
    }
    assert_eq!(until_working(&cache, "stall:k").await, 7);
}

#[tokio::test]
async fn unreachable_server_fails_at_build_naming_it() {
    let port = free_port(); // nothing listens there
    let url = format!("redis://127.0.0.1:{port}");
    let result = bounded(
        "build against a closed port",
        RedisCacheService::builder(&url)
            .connect_timeout(Duration::from_secs(1))
            .build(),
    )
    .await;
    match result {
        Err(e @ CacheError::Backend { .. }) => {
            assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}")
        }
        other => panic!("expected Backend, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_urls_are_config_errors_without_the_password() {
    for url in [
        "",
        "not a url",
        "http://127.0.0.1:6379",
        "redis://user:hunter2@127.0.0.1:notaport",
        "redis-sentinel://user:hunter2@127.0.0.1:26379/0",
    ] {
        let err = bounded("build", RedisCacheService::new(url, 300))
            .await
            .expect_err(url);
        assert!(matches!(err, CacheError::Config { .. }), "{url}: {err:?}");
        assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
    }
    let err = cachet::build_cache_service(Some("redis://:hunter2@"))
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
}

#[tokio::test]
async fn a_namespace_without_a_trailing_separator_is_refused() {
    let server = RedisServer::start();
    for bad in ["a", "tenant-a", "app:v2"] {
        let err = bounded(
            "build with a bad namespace",
            RedisCacheService::builder(server.url())
                .namespace(bad)
                .build(),
        )
        .await
        .expect_err(bad);
        assert!(matches!(err, CacheError::Config { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains("must end with ':'"), "{err}");
    }
    // With the separator, "a:" and "ab:" are disjoint: emptying one leaves the other.
    let a = service_in(server.url(), "a:").await;
    let ab = service_in(server.url(), "ab:").await;
    a.set("k", &1, None).await.unwrap();
    ab.set("k", &2, None).await.unwrap();
    assert_eq!(a.invalidate_prefix("").await.unwrap(), 1);
    assert_eq!(ab.get::<i32>("k").await.unwrap(), Some(2));
    assert_eq!(server.cli(&["GET", "ab:k"]).trim(), "2");
}

async fn service_in(url: String, namespace: &str) -> RedisCacheService {
    RedisCacheService::builder(url)
        .namespace(namespace)
        .build()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_flight_then_restarted() {
    let server = RedisServer::start();
    let cache = Arc::new(service(server.url()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let mut tasks = Vec::new();
    for t in 0..64 {
        let (cache, stop, ok, failed) = (cache.clone(), stop.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("inflight:{t}");
            while !stop.load(Ordering::Relaxed) {
                let call = async {
                    cache.set(&key, &t, None).await?;
                    cache.get::<u64>(&key).await
                };
                match bounded("a call in flight", call).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        assert!(
                            matches!(e, CacheError::Backend { .. } | CacheError::Timeout { .. }),
                            "{e:?}"
                        );
                        assert!(e.to_string().contains("127.0.0.1"), "names the server: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await; // every task meets the dead server
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("no task panicked");
    }
    assert!(
        ok.load(Ordering::Relaxed) > 0,
        "calls succeeded before the kill"
    );
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "calls failed while the server was dead"
    );

    // Dead server: each operation is a Backend (or, while fred still waits to reconnect,
    // Timeout) error within the bound.
    let err = bounded("invalidate_prefix", cache.invalidate_prefix("inflight:")).await;
    assert!(
        matches!(
            err,
            Err(CacheError::Backend { .. } | CacheError::Timeout { .. })
        ),
        "{err:?}"
    );
    let err = bounded("invalidate", cache.invalidate("inflight:1")).await;
    assert!(
        matches!(
            err,
            Err(CacheError::Backend { .. } | CacheError::Timeout { .. })
        ),
        "{err:?}"
    );

    server.restart();
    assert_eq!(until_working(&cache, "after-restart").await, 7);
    for i in 0..100 {
        cache
            .set(&format!("after-restart:{i}"), &i, None)
            .await
            .unwrap();
    }
    assert_eq!(cache.invalidate_prefix("after-restart").await.unwrap(), 101);
}

#[tokio::test]
async fn cluster_primary_restart_is_survived() {
    let cluster = RedisCluster::start(); // private: restarting a node must not disturb others
    let cache = service(cluster.url()).await;
    for i in 0..300 {
        cache.set(&format!("spread:{i}"), &i, None).await.unwrap();
    }
    cluster.restart_primary(1); // comes back empty (no persistence)
    until_working(&cache, "cluster-after-restart").await;
    let mut present = 0;
    for i in 0..300 {
        if bounded("get", cache.get::<i32>(&format!("spread:{i}")))
            .await
            .unwrap()
            .is_some()
        {
            present += 1;
        }
    }
    // The two untouched primaries kept their share; the restarted one lost its own.
    assert!((100..300).contains(&present), "{present} of 300 keys left");
    let removed = cache.invalidate_prefix("spread:").await.unwrap();
    assert_eq!(removed, present, "invalidate_prefix reaches every primary");
}

#[tokio::test]
async fn sentinel_failover_is_followed() {
    let setup = SentinelSetup::start();
    let cache = service(setup.url()).await;
    cache.set("before-failover", &1, None).await.unwrap();
    let new_primary = setup.kill_primary_and_wait_failover();
    assert_eq!(until_working(&cache, "after-failover").await, 7);
    let info = setup.replica().cli(&["ROLE"]);
    assert!(info.contains("master"), "port {new_primary}: {info}");
    assert_eq!(
        setup.replica().cli(&["GET", "after-failover"]).trim(),
        "7",
        "the write went to the promoted replica"
    );
}

#[tokio::test]
async fn acl_user_and_password_from_the_url() {
    let server = RedisServer::start_with(
        &support::binaries::redis_server(),
        &[
            "--user",
            "alice",
            "on",
            ">s3cret-pw",
            "~*",
            "&*",
            "+@all",
            "--user",
            "default",
            "off",
        ],
    );
    let port = server.port();
    let cache = RedisCacheService::new(&format!("redis://alice:s3cret-pw@127.0.0.1:{port}"), 300)
        .await
        .expect("alice can connect");
    cache.set("acl:k", &1, None).await.unwrap();
    assert_eq!(cache.get::<i32>("acl:k").await.unwrap(), Some(1));

    for url in [
        format!("redis://alice:wrong-pw@127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        let result = bounded(
            "build with bad credentials",
            RedisCacheService::builder(&url)
                .connect_timeout(Duration::from_secs(1))
                .build(),
        )
        .await;
        match result {
            Err(e @ CacheError::Backend { .. }) => {
                let text = format!("{e} {e:?}");
                assert!(text.contains(&port.to_string()), "names the server: {text}");
                assert!(!text.contains("wrong-pw"), "no password in errors: {text}");
            }
            other => panic!("{url}: expected Backend, got {other:?}"),
        }
    }
}

/// Calls dropped half-way (a caller's timeout, a cancelled request) are dropped with the
/// fred command inside them, after it was handed to the client and before its answer came;
/// the service then keeps answering every call correctly, on the very same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_mid_flight_leave_the_service_working() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let server = RedisServer::start();
    let cache = Arc::new(service(server.url()).await);
    let mut pending = 0;
    for round in 0..5u64 {
        let tasks: Vec<_> = (0..400u64)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let key = format!("dropped:{}", i % 50);
                    let mut call: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = if i % 2 == 0
                    {
                        Box::pin(async move {
                            let _ = cache.set(&key, &(round, i), None).await;
                        })
                    } else {
                        Box::pin(async move {
                            let _ = cache.get::<(u64, u64)>(&key).await;
                        })
                    };
                    // One poll sends the command; the answer cannot be back within it.
                    let first = call.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                    drop(call);
                    first.is_pending()
                })
            })
            .collect();
        for task in tasks {
            pending += usize::from(task.await.expect("no panic while dropping calls"));
        }
    }
    assert_eq!(pending, 2000, "every call was dropped while in flight");
    for i in 0..50u64 {
        let key = format!("dropped:{i}");
        bounded("set after the drops", cache.set(&key, &(99u64, i), None))
            .await
            .unwrap();
    }
    for i in 0..50u64 {
        let key = format!("dropped:{i}");
        let read = bounded("get after the drops", cache.get::<(u64, u64)>(&key)).await;
        assert_eq!(read.unwrap(), Some((99, i)), "{key}");
    }
    assert_eq!(
        bounded(
            "invalidate after the drops",
            cache.invalidate_prefix("dropped:")
        )
        .await
        .unwrap(),
        50
    );
}
