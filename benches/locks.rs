//! Locks against the raw commands doing the same work, in one run (criterion), on a
//! redis-server this bench starts itself on a free loopback port:
//!
//! - `lock_uncontended`: `RedisConcurrencyService` acquire + release vs raw fred `SET NX PX`
//!   then `EVALSHA` of a compare-and-delete script (the same two round trips), and vs raw
//!   fred running cachet's own acquire and release scripts (lock + clock-based fence + counter
//!   expiry in one Lua step; compare-and-delete + release mark), which separates what fencing
//!   and idempotence cost the server from what cachet costs the client;
//! - `lock_contended_16_tasks`: 16 tasks taking turns on one key, time per lock/unlock
//!   cycle, Redis and in-process.
//!
//! Runtime: tokio multi-thread, 2 workers (redis-server shares the same 2 cores).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::{
    ConcurrencyService, LocalConcurrencyService, LockOptions, RedisCacheService,
    RedisConcurrencyService,
};
use criterion::{Criterion, criterion_group, criterion_main};
use fred::prelude::{Expiration, KeysInterface, SetOptions};
use fred::types::scripts::Script;

/// Compare-and-delete (`KEYS`: lock; `ARGV`: token), the usual release of a `SET NX PX` lock.
const RAW_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

fn uncontended(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let rt = common::multi_thread_runtime();
    let (locks, raw) = rt.block_on(async {
        let locks = RedisConcurrencyService::new(&server.url()).await.unwrap();
        let raw = RedisCacheService::new(&server.url(), 300).await.unwrap();
        (locks, raw)
    });
    // The textbook release: compare-and-delete.
    let script = Script::from_lua(RAW_RELEASE);
    rt.block_on(script.load(raw.client())).unwrap();
    let acquire = Script::from_lua(cachet::lock::redis::ACQUIRE_SCRIPT);
    rt.block_on(acquire.load(raw.client())).unwrap();
    let release = Script::from_lua(cachet::lock::redis::RELEASE_SCRIPT);
    rt.block_on(release.load(raw.client())).unwrap();
    let options = LockOptions::default();

    let mut group = c.benchmark_group("lock_uncontended");
    group.bench_function("cachet RedisConcurrencyService acquire + release", |b| {
        b.to_async(&rt).iter(|| async {
            let guard = locks.acquire("bench:lock", &options).await.unwrap();
            black_box(guard.fencing_token());
            guard.release().await.unwrap();
        })
    });
    group.bench_function("raw fred SET NX PX + EVALSHA release", |b| {
        b.to_async(&rt).iter(|| async {
            let client = raw.client();
            let set: Option<String> = client
                .set(
                    "bench:raw-lock",
                    "token-1234",
                    Some(Expiration::PX(30_000)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .unwrap();
            assert!(set.is_some(), "raw lock taken");
            let released: i64 = script
                .evalsha(client, vec!["bench:raw-lock"], vec!["token-1234"])
                .await
                .unwrap();
            assert_eq!(released, 1);
        })
    });
    group.bench_function(
        "raw fred EVALSHA acquire with fence + EVALSHA release",
        |b| {
            b.to_async(&rt).iter(|| async {
                let client = raw.client();
                let keys = vec!["bench:{raw}:lock", "bench:{raw}:fence"];
                let fence: i64 = acquire
                    .evalsha(client, keys, vec!["token-1234", "30000", "604800000"])
                    .await
                    .unwrap();
                assert!(fence > 0, "raw lock taken");
                let released: i64 = release
                    .evalsha(
                        client,
                        vec!["bench:{raw}:lock", "bench:{raw}:released"],
                        vec!["token-1234", "60000"],
                    )
                    .await
                    .unwrap();
                assert_eq!(released, 1);
            })
        },
    );
    group.finish();
}

/// Time per lock/unlock cycle with 16 tasks taking turns on one key.
fn contended(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let rt = common::multi_thread_runtime();
    let redis: Arc<dyn ConcurrencyService> = Arc::new(
        rt.block_on(RedisConcurrencyService::new(&server.url()))
            .unwrap(),
    );
    let local: Arc<dyn ConcurrencyService> = Arc::new(LocalConcurrencyService::default());

    let mut group = c.benchmark_group("lock_contended_16_tasks");
    group.sample_size(10);
    for (name, locks) in [("redis", redis), ("local", local)] {
        group.bench_function(name, |b| {
            b.iter_custom(|cycles| {
                let per_task = cycles.div_ceil(16);
                let locks = locks.clone();
                rt.block_on(async move {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..16)
                        .map(|_| {
                            let locks = locks.clone();
                            tokio::spawn(async move {
                                let options = LockOptions::default()
                                    .wait_timeout(Duration::from_secs(120))
                                    .backoff(Duration::from_micros(200), Duration::from_millis(5));
                                for _ in 0..per_task {
                                    let guard = locks.acquire("bench:hot", &options).await.unwrap();
                                    guard.release().await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    start
                        .elapsed()
                        .div_f64((per_task * 16) as f64 / cycles as f64)
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, uncontended, contended);
criterion_main!(benches);
