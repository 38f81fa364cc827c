//! The in-memory backend against the raw dependencies doing the same work, in one run
//! (criterion). Compare the rows of one group: the ratios are the result, not the times.
//! `benches/moka_ratios.rs` measures the same pairs interleaved, which is steadier on a
//! small, shared machine.
//!
//! - `typed_get_hit`: typed `get` through `Arc<dyn CacheService>` vs raw moka `get` + JSON
//!   decode, and vs raw mini-moka `Cache<String, String>` (10 000 entries, 300 s TTL) `get` +
//!   `serde_json::from_str` (the design cachet replaces); 4 000 org contexts, random access.
//! - `typed_set`: typed `set` vs raw moka `insert` + encode, without expiry and with
//!   per-entry expiry.
//! - `invalidate_prefix_10k_of_100k`.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet::{CacheService, CacheServiceExt, MokaCacheService};
use common::{ACCESSES, OrgContext, TtlValue, decode, encode, fixture, runtime};
use criterion::{Criterion, criterion_group, criterion_main};

fn get_hit(c: &mut Criterion) {
    let f = fixture();
    let rt = runtime();
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let raw_moka = common::raw_moka();
    let raw_mini = common::raw_mini_moka();
    rt.block_on(common::fill_for_reads(&f, &*cache, &raw_moka, &raw_mini));

    let mut group = c.benchmark_group("typed_get_hit");
    let mut i = 0usize;
    group.bench_function("cachet Arc<dyn CacheService> get::<T>", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let key = &f.keys[f.order[i]];
            let cache = &cache;
            async move { black_box(cache.get::<OrgContext>(key).await.unwrap().unwrap()) }
        })
    });
    let mut i = 0usize;
    group.bench_function("raw moka get + serde_json decode", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let key = &f.keys[f.order[i]];
            let raw = &raw_moka;
            async move { black_box(decode(&raw.get(key.as_str()).unwrap())) }
        })
    });
    let mut i = 0usize;
    group.bench_function("raw mini-moka get + serde_json::from_str", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let key = &f.keys[f.order[i]];
            let raw = &raw_mini;
            async move {
                let json = raw.get(key).unwrap();
                black_box(serde_json::from_str::<OrgContext>(&json).unwrap())
            }
        })
    });
    group.finish();
}

fn set(c: &mut Criterion) {
    let f = fixture();
    let rt = runtime();
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let raw_moka = common::raw_moka();
    let raw_moka_ttl = common::raw_moka_per_entry_ttl();

    let mut group = c.benchmark_group("typed_set");
    let mut i = 0usize;
    group.bench_function("cachet Arc<dyn CacheService> set", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let n = f.order[i];
            let (key, value, cache) = (&f.keys[n], &f.values[n], &cache);
            async move { cache.set(key, value, None).await.unwrap() }
        })
    });
    let mut i = 0usize;
    group.bench_function("raw moka insert + encode", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let n = f.order[i];
            let (key, value, raw) = (&f.keys[n], &f.values[n], &raw_moka);
            async move { raw.insert(key.to_owned(), encode(value)) }
        })
    });
    let mut i = 0usize;
    group.bench_function("raw moka per-entry TTL insert + encode", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % ACCESSES;
            let n = f.order[i];
            let (key, value, raw) = (&f.keys[n], &f.values[n], &raw_moka_ttl);
            async move {
                let bytes = encode(value);
                let ttl = Duration::from_secs(300);
                raw.insert(key.to_owned(), TtlValue { bytes, ttl })
            }
        })
    });
    group.finish();
}

fn invalidate_prefix(c: &mut Criterion) {
    let rt = runtime();
    let keys: Vec<String> = (0..100_000)
        .map(|i| {
            if i % 10 == 0 {
                format!("org:hot:{i}")
            } else {
                format!("org:cold:{i}")
            }
        })
        .collect();
    let value = encode(&OrgContext::sample(1));

    let mut group = c.benchmark_group("invalidate_prefix_10k_of_100k");
    group.sample_size(10);
    group.bench_function("cachet MokaCacheService", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cache = MokaCacheService::builder()
                    .max_entries(200_000)
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for k in &keys {
                        cache
                            .set_bytes(k, Bytes::clone(&value), None)
                            .await
                            .unwrap();
                    }
                    cache.run_pending_tasks();
                    let start = Instant::now();
                    let removed = cache.invalidate_prefix("org:hot:").await.unwrap();
                    total += start.elapsed();
                    assert_eq!(removed, 10_000);
                });
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, get_hit, set, invalidate_prefix);
criterion_main!(benches);
