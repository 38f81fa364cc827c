//! The tiered cache against what it is built from, in one run (criterion), on a
//! redis-server this bench starts itself:
//!
//! - `tiered_l1_hit`: a typed hit in the L1 vs the same hit in a plain `MokaCacheService`;
//! - `tiered_l2_fall_through`: an L1 miss (the L1 keeps entries 1 ms, so every read falls
//!   through) read from Redis, unwrapped and put in the L1, vs a plain `RedisCacheService`
//!   get;
//! - `invalidation_propagation`: a write on instance A until instance B's listener has
//!   applied the message (p50 and p99 printed).
//!
//! Runtime: tokio multi-thread with 2 workers; redis-server shares the same 2 cores.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::{
    CacheService, CacheServiceExt, MokaCacheService, RedisCacheService, TieredCacheService,
};
use common::OrgContext;
use criterion::{Criterion, criterion_group, criterion_main};

const KEYS: usize = 4_000;

fn key(i: usize) -> String {
    format!("bench:tiered:{i}")
}

async fn tiered(url: &str, l1_ttl: Duration) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(url))
        .invalidation(cachet::backend::tiered::InvalidationMode::Bus) // what its figures measure
        .channel_prefix("bench:")
        .l1_max_ttl(l1_ttl)
        .build()
        .await
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let url = server.url();
    let rt = common::multi_thread_runtime();
    let (a, b, slow_l1, redis, moka) = rt.block_on(async {
        let a = tiered(&url, Duration::from_secs(30)).await;
        let b = tiered(&url, Duration::from_secs(30)).await;
        let slow_l1 = tiered(&url, Duration::from_millis(1)).await;
        let redis = RedisCacheService::new(&url, 300).await.unwrap();
        let moka = MokaCacheService::default();
        for i in 0..KEYS {
            let value = OrgContext::sample(i as u64);
            a.set(&key(i), &value, None).await.unwrap();
            moka.set(&key(i), &value, None).await.unwrap();
        }
        (a, b, slow_l1, redis, moka)
    });
    let a: Arc<dyn CacheService> = Arc::new(a);
    let moka: Arc<dyn CacheService> = Arc::new(moka);

    let mut group = c.benchmark_group("tiered_l1_hit");
    for (name, cache) in [("tiered L1 hit", &a), ("MokaCacheService hit", &moka)] {
        let mut i = 0;
        group.bench_function(name, |bench| {
            bench.to_async(&rt).iter(|| {
                i = (i + 1) % KEYS;
                let (cache, key) = (cache, key(i));
                async move { black_box(cache.get::<OrgContext>(&key).await.unwrap().unwrap()) }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tiered_l2_fall_through");
    let mut i = 0;
    group.bench_function("tiered L1 miss, L2 read + envelope + L1 fill", |bench| {
        bench.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (cache, key) = (&slow_l1, key(i));
            async move { black_box(cache.get_bytes(&key).await.unwrap().unwrap()) }
        })
    });
    let mut i = 0;
    group.bench_function("RedisCacheService get (raw enveloped bytes)", |bench| {
        bench.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (cache, key) = (&redis, key(i));
            async move { black_box(cache.get_bytes(&key).await.unwrap().unwrap()) }
        })
    });
    group.finish();

    // Propagation: A writes, B's listener applies; 1 000 rounds.
    let mut latencies = rt.block_on(async {
        let a = tiered(&url, Duration::from_secs(30)).await;
        let mut latencies = Vec::with_capacity(1_000);
        for round in 0..1_000u64 {
            let before = b.invalidations_applied();
            let start = Instant::now();
            a.set("bench:propagate", &round, None).await.unwrap();
            assert!(
                b.wait_for_invalidations(before + 1, Duration::from_secs(5))
                    .await
            );
            latencies.push(start.elapsed());
        }
        latencies
    });
    latencies.sort();
    println!(
        "invalidation_propagation A set -> B applied, 1000 rounds: p50 {:?}, p99 {:?}, max {:?}",
        latencies[500], latencies[990], latencies[999]
    );
}

criterion_group! {
    name = tiered_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(tiered_benches);
