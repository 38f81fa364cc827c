//! `get_or_load` against a plain typed `get`, in one run (criterion), on every backend:
//!
//! - `get_or_load_hit/<backend>`: a hit through `get_or_load` vs the same hit through `get`
//!   (`MokaCacheService`, the tiered L1, `RedisCacheService` on a redis-server this bench
//!   starts itself), all through `Arc<dyn CacheService>`;
//! - `get_or_load_miss_stampede`: 200 concurrent misses of one key, each round a new key,
//!   with a loader that takes 1 ms; prints how many loader calls the 200 callers caused (the
//!   target is one).
//!
//! Runtime: tokio multi-thread with 2 workers; redis-server shares the same 2 cores.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachet::{
    CacheService, CacheServiceExt, MokaCacheService, RedisCacheService, TieredCacheService,
};
use common::OrgContext;
use criterion::{Criterion, criterion_group, criterion_main};

const KEYS: usize = 4_000;

fn key(backend: &str, i: usize) -> String {
    format!("bench:load:{backend}:{i}")
}

fn benches(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let url = server.url();
    let rt = common::multi_thread_runtime();
    let backends: Vec<(&str, Arc<dyn CacheService>)> = rt.block_on(async {
        let moka: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
        let tiered: Arc<dyn CacheService> = Arc::new(
            TieredCacheService::builder(RedisCacheService::builder(url.clone()))
                .invalidation(cachet::backend::tiered::InvalidationMode::Bus) // what its figures measure
                .channel_prefix("bench-load:")
                // Long enough that no L1 entry expires during the run.
                .l1_max_ttl(Duration::from_secs(3600))
                .build()
                .await
                .unwrap(),
        );
        let redis: Arc<dyn CacheService> =
            Arc::new(RedisCacheService::new(&url, 300).await.unwrap());
        let backends = vec![("moka", moka), ("tiered L1", tiered), ("redis", redis)];
        for (backend, cache) in &backends {
            for i in 0..KEYS {
                cache
                    .set(&key(backend, i), &OrgContext::sample(i as u64), Some(3600))
                    .await
                    .unwrap();
            }
        }
        backends
    });

    for (backend, cache) in &backends {
        let mut group = c.benchmark_group(format!("get_or_load_hit/{backend}"));
        let mut i = 0;
        group.bench_function("get", |bench| {
            bench.to_async(&rt).iter(|| {
                i = (i + 1) % KEYS;
                let key = key(backend, i);
                async move { black_box(cache.get::<OrgContext>(&key).await.unwrap().unwrap()) }
            })
        });
        let mut i = 0;
        group.bench_function("get_or_load", |bench| {
            bench.to_async(&rt).iter(|| {
                i = (i + 1) % KEYS;
                let key = key(backend, i);
                async move {
                    let hit = cache
                        .get_or_load::<OrgContext, std::io::Error, _, _>(&key, None, || async {
                            unreachable!("every key is cached")
                        })
                        .await;
                    black_box(hit.unwrap())
                }
            })
        });
        group.finish();
    }

    // Interleaved: rounds alternating get and get_or_load (and which goes first), per-op
    // medians; steadier on this small shared VM than criterion's one-after-the-other groups.
    for (backend, cache) in &backends {
        let ops = if *backend == "redis" { 2_000 } else { 20_000 };
        let (mut plain, mut loading) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for round in 0..15 {
                for first_plain in [round % 2 == 0, round % 2 != 0] {
                    let started = std::time::Instant::now();
                    for i in 0..ops {
                        let key = key(backend, (i * 7 + round) % KEYS);
                        if first_plain {
                            black_box(cache.get::<OrgContext>(&key).await.unwrap());
                        } else {
                            let hit = cache
                                .get_or_load::<OrgContext, std::io::Error, _, _>(
                                    &key,
                                    None,
                                    || async { unreachable!("every key is cached") },
                                )
                                .await;
                            black_box(hit.unwrap());
                        }
                    }
                    let per_op = started.elapsed().as_nanos() as f64 / ops as f64;
                    if first_plain {
                        plain.push(per_op)
                    } else {
                        loading.push(per_op)
                    }
                }
            }
        });
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p, l) = (median(&mut plain), median(&mut loading));
        println!(
            "get_or_load_hit_interleaved/{backend}: get {p:.0} ns, get_or_load {l:.0} ns per op (medians of 15 rounds): {:.3}x",
            l / p
        );
    }

    // Stampede: 200 concurrent misses of a fresh key per round.
    for (backend, cache) in &backends {
        let (calls, rounds) = rt.block_on(async {
            let calls = Arc::new(AtomicUsize::new(0));
            let rounds = 20;
            for round in 0..rounds {
                let key = format!("bench:load:stampede:{backend}:{round}");
                let mut tasks = Vec::with_capacity(200);
                for _ in 0..200 {
                    let (cache, key, calls) = (Arc::clone(cache), key.clone(), Arc::clone(&calls));
                    tasks.push(tokio::spawn(async move {
                        cache
                            .get_or_load(&key, Some(60), || async {
                                calls.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                Ok::<_, std::io::Error>(OrgContext::sample(1))
                            })
                            .await
                            .unwrap()
                    }));
                }
                for task in tasks {
                    black_box(task.await.unwrap());
                }
            }
            (calls.load(Ordering::SeqCst), rounds)
        });
        println!(
            "get_or_load_miss_stampede/{backend}: {rounds} rounds x 200 concurrent misses -> {calls} loader calls ({:.2} per round)",
            calls as f64 / rounds as f64
        );
    }
}

criterion_group! {
    name = load_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(load_benches);
