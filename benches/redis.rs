//! The Redis backend against the raw clients doing the same typed work, in one run
//! (criterion), on a redis-server this bench starts itself on a free loopback port:
//!
//! - `redis_typed_get` / `redis_typed_set`: one call at a time (latency): cachet through
//!   `Arc<dyn CacheService>`, raw fred (a `Client` configured like cachet's: auto-pipelined,
//!   2 s command timeout) + serde_json, and the `redis` crate's `ConnectionManager` +
//!   serde_json (the client of the design cachet replaces);
//! - `redis_throughput_64_tasks_get` / `_set`: 64 concurrent tasks, time per operation;
//! - `invalidate_prefix_20k_of_400k`: cachet vs a raw fred SCAN + UNLINK loop vs the original
//!   design's `KEYS` + `DEL`; while each runs, another connection times GETs, and the p99 is
//!   printed per contender (criterion cannot report it), with the server's own time per
//!   invalidation in the enumerating and removing commands (`INFO commandstats`).
//!
//! Runtime: tokio multi-thread with 2 workers; redis-server shares the same 2 cores.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet::{CacheService, CacheServiceExt, RedisCacheService};
use common::{OrgContext, decode, encode};
use criterion::{Criterion, criterion_group, criterion_main};
use fred::prelude::{Builder, Client, ClientLike, Config, Expiration, KeysInterface};
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;

const KEYS: usize = 4_000;

struct Contenders {
    cachet: Arc<dyn CacheService>,
    fred: Client,
    redis: ConnectionManager,
}

async fn contenders(url: &str) -> Contenders {
    let cachet: Arc<dyn CacheService> = Arc::new(RedisCacheService::new(url, 300).await.unwrap());
    let fred = Builder::from_config(Config::from_url(url).unwrap())
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .build()
        .unwrap();
    fred.init().await.unwrap();
    let redis = redis::Client::open(url)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    Contenders {
        cachet,
        fred,
        redis,
    }
}

fn key(i: usize) -> String {
    format!("bench:org:{i}")
}

async fn fill(c: &Contenders) {
    for i in 0..KEYS {
        c.cachet
            .set(&key(i), &OrgContext::sample(i as u64), None)
            .await
            .unwrap();
    }
}

async fn redis_crate_get(conn: &mut ConnectionManager, key: &str) -> OrgContext {
    let bytes: Vec<u8> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    decode(&bytes)
}

async fn redis_crate_set(conn: &mut ConnectionManager, key: &str, value: &OrgContext) {
    redis::cmd("SET")
        .arg(key)
        .arg(encode(value).as_ref())
        .arg("PX")
        .arg(300_000)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

async fn fred_set(client: &Client, key: &str, value: &OrgContext) {
    client
        .set::<(), _, _>(
            key,
            encode(value),
            Some(Expiration::PX(300_000)),
            None,
            false,
        )
        .await
        .unwrap();
}

fn sequential(c: &mut Criterion, server: &support::RedisServer) {
    let rt = common::multi_thread_runtime();
    let k = rt.block_on(contenders(&server.url()));
    rt.block_on(fill(&k));
    let value = OrgContext::sample(7);

    let mut group = c.benchmark_group("redis_typed_get");
    let mut i = 0;
    group.bench_function("cachet Arc<dyn CacheService> get::<T>", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (cache, key) = (&k.cachet, key(i));
            async move { black_box(cache.get::<OrgContext>(&key).await.unwrap()) }
        })
    });
    let mut i = 0;
    group.bench_function("raw fred GET + serde_json", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (client, key) = (&k.fred, key(i));
            async move { black_box(decode(&client.get::<Bytes, _>(&key).await.unwrap())) }
        })
    });
    let mut i = 0;
    group.bench_function("redis crate ConnectionManager GET + serde_json", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (mut conn, key) = (k.redis.clone(), key(i));
            async move { black_box(redis_crate_get(&mut conn, &key).await) }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("redis_typed_set");
    let mut i = 0;
    group.bench_function("cachet Arc<dyn CacheService> set", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (cache, key, value) = (&k.cachet, key(i), &value);
            async move { cache.set(&key, value, None).await.unwrap() }
        })
    });
    let mut i = 0;
    group.bench_function("raw fred SET PX + serde_json", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (client, key, value) = (&k.fred, key(i), &value);
            async move { fred_set(client, &key, value).await }
        })
    });
    let mut i = 0;
    group.bench_function("redis crate ConnectionManager SET PX + serde_json", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let (mut conn, key, value) = (k.redis.clone(), key(i), &value);
            async move { redis_crate_set(&mut conn, &key, value).await }
        })
    });
    group.finish();
}

#[derive(Clone, Copy)]
enum Who {
    Cachet,
    Fred,
    RedisCrate,
}

/// 64 tasks share `ops` operations; returns the elapsed time.
async fn run_64(k: &Contenders, who: Who, write: bool, ops: u64) -> Duration {
    let per_task = ops.div_ceil(64) as usize;
    let value = Arc::new(OrgContext::sample(7));
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let (cache, fred, mut conn, value) = (
                k.cachet.clone(),
                k.fred.clone(),
                k.redis.clone(),
                value.clone(),
            );
            tokio::spawn(async move {
                for n in 0..per_task {
                    let key = key((t * 61 + n) % KEYS);
                    match (who, write) {
                        (Who::Cachet, false) => {
                            black_box(cache.get::<OrgContext>(&key).await.unwrap());
                        }
                        (Who::Fred, false) => {
                            black_box(decode(&fred.get::<Bytes, _>(&key).await.unwrap()));
                        }
                        (Who::RedisCrate, false) => {
                            black_box(redis_crate_get(&mut conn, &key).await);
                        }
                        (Who::Cachet, true) => cache.set(&key, &*value, None).await.unwrap(),
                        (Who::Fred, true) => fred_set(&fred, &key, &value).await,
                        (Who::RedisCrate, true) => redis_crate_set(&mut conn, &key, &value).await,
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed().div_f64((per_task * 64) as f64 / ops as f64)
}

fn throughput(c: &mut Criterion, server: &support::RedisServer) {
    let rt = common::multi_thread_runtime();
    let k = rt.block_on(contenders(&server.url()));
    rt.block_on(fill(&k));
    for (group_name, write) in [
        ("redis_throughput_64_tasks_get", false),
        ("redis_throughput_64_tasks_set", true),
    ] {
        let mut group = c.benchmark_group(group_name);
        for (name, who) in [
            ("cachet", Who::Cachet),
            ("raw fred", Who::Fred),
            ("redis crate ConnectionManager", Who::RedisCrate),
        ] {
            group.bench_function(name, |b| {
                b.iter_custom(|ops| rt.block_on(run_64(&k, who, write, ops)))
            });
        }
        group.finish();
    }
}

const TOTAL: usize = 400_000;
const MATCHING: usize = 20_000;

/// Writes the 20k matching keys (the 380k others are written once).
async fn refill_matching(client: &Client) {
    for chunk in (0..MATCHING).collect::<Vec<_>>().chunks(1_000) {
        let writes = chunk.iter().map(|i| {
            client.set::<(), _, _>(
                format!("hot:{i}"),
                "x",
                Some(Expiration::PX(600_000)),
                None,
                false,
            )
        });
        for result in futures_util::future::join_all(writes).await {
            result.unwrap();
        }
    }
}

async fn fred_scan_unlink(client: &Client) -> u64 {
    let mut pages = client.scan("hot:*", Some(1_000), None);
    let mut removed = 0;
    while let Some(page) = pages.next().await {
        let mut page = page.unwrap();
        let keys = page.take_results().unwrap_or_default();
        page.next();
        if !keys.is_empty() {
            removed += client.unlink::<u64, _>(keys).await.unwrap();
        }
    }
    removed
}

async fn keys_del(conn: &mut ConnectionManager) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("hot:*")
        .query_async(conn)
        .await
        .unwrap();
    if keys.is_empty() {
        return 0;
    }
    redis::cmd("DEL")
        .arg(&keys)
        .query_async(conn)
        .await
        .unwrap()
}

/// The server's own time in the enumeration (`SCAN`/`KEYS`) and removal (`UNLINK`/`DEL`)
/// commands since the last `CONFIG RESETSTAT`, in µs, from `INFO commandstats`.
fn server_usec(server: &support::RedisServer) -> (u64, u64) {
    let stats = server
        .command(&["INFO", "commandstats"])
        .unwrap_or_default();
    let usec = |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
            .and_then(|fields| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix("usec="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    (usec("scan") + usec("keys"), usec("unlink") + usec("del"))
}

fn invalidation(c: &mut Criterion, server: &support::RedisServer) {
    let rt = common::multi_thread_runtime();
    let k = rt.block_on(contenders(&server.url()));
    let prober = rt.block_on(contenders(&server.url())).fred;
    rt.block_on(async {
        let cold = (0..TOTAL - MATCHING).map(|i| {
            let client = &k.fred;
            async move {
                client
                    .set::<(), _, _>(
                        format!("cold:{i}"),
                        "x",
                        Some(Expiration::PX(3_600_000)),
                        None,
                        false,
                    )
                    .await
                    .unwrap()
            }
        });
        let cold: Vec<_> = cold.collect();
        let mut cold = cold.into_iter();
        loop {
            let chunk: Vec<_> = cold.by_ref().take(2_000).collect();
            if chunk.is_empty() {
                break;
            }
            futures_util::future::join_all(chunk).await;
        }
    });

    let mut group = c.benchmark_group("invalidate_prefix_20k_of_400k");
    group.sample_size(10);
    let mut report = Vec::new();
    for (name, who) in [
        ("cachet invalidate_prefix", Who::Cachet),
        ("raw fred SCAN + UNLINK loop", Who::Fred),
        ("original design KEYS + DEL", Who::RedisCrate),
    ] {
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut runs = 0u64;
        server.command(&["CONFIG", "RESETSTAT"]).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    runs += iters;
                    for _ in 0..iters {
                        refill_matching(&k.fred).await;
                        let running = Arc::new(AtomicBool::new(true));
                        let probe = tokio::spawn({
                            let (prober, running, latencies) =
                                (prober.clone(), running.clone(), latencies.clone());
                            async move {
                                while running.load(Ordering::Relaxed) {
                                    let start = Instant::now();
                                    let _: Option<Bytes> = prober.get("cold:1").await.unwrap();
                                    latencies.lock().unwrap().push(start.elapsed());
                                }
                            }
                        });
                        let start = Instant::now();
                        let removed = match who {
                            Who::Cachet => k.cachet.invalidate_prefix("hot:").await.unwrap(),
                            Who::Fred => fred_scan_unlink(&k.fred).await,
                            Who::RedisCrate => keys_del(&mut k.redis.clone()).await,
                        };
                        total += start.elapsed();
                        running.store(false, Ordering::Relaxed);
                        probe.await.unwrap();
                        assert_eq!(removed, MATCHING as u64, "{name}");
                    }
                    total
                })
            })
        });
        let mut all = latencies.lock().unwrap().clone();
        all.sort();
        let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or_default();
        let max = all.last().copied().unwrap_or_default();
        let (enumerate, remove) = server_usec(server);
        report.push(format!(
            "{name}: concurrent GET p99 {p99:?}, max {max:?} over {} GETs; server time per \
             invalidation: {:.1} ms enumerating (SCAN/KEYS), {:.1} ms removing (UNLINK/DEL)",
            all.len(),
            enumerate as f64 / runs.max(1) as f64 / 1000.0,
            remove as f64 / runs.max(1) as f64 / 1000.0,
        ));
    }
    group.finish();
    for line in report {
        println!("{line}");
    }
}

fn benches(c: &mut Criterion) {
    // BENCH_SERVER=valkey runs everything against valkey-server instead of redis-server.
    let server = match std::env::var("BENCH_SERVER").as_deref() {
        Ok("valkey") => support::RedisServer::start_valkey(),
        _ => support::RedisServer::start(),
    };
    sequential(c, &server);
    throughput(c, &server);
    invalidation(c, &server);
}

criterion_group! {
    name = redis_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(redis_benches);
