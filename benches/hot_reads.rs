//! Hot org reads, the request path of a multi-tenant service: 64 tasks read random orgs of
//! 2,000 (org contexts of about 330 bytes of JSON) as fast as they can, interleaved in
//! rounds (the order rotates every round; the report gives the median over rounds), on a
//! redis-server this bench starts itself. Contenders:
//!
//! - `redis crate per request` (the seed's design): the `redis` crate's `ConnectionManager`,
//!   `GET` + `serde_json` on every request;
//! - `tiered get`: a `TieredCacheService` typed `get` (an L1 hit decodes the JSON);
//! - `tiered get_shared`: the same instance's `get_shared` (an L1 hit clones an `Arc`);
//! - `encrypted(tiered) get_shared`: `EncryptedCacheService<TieredCacheService>`, the stack the
//!   org service example used to run (its L1 holds ciphertext: a hit decrypts and decodes);
//! - `tiered, L2 encrypted, get_shared`: a tiered cache that encrypts only what it writes to
//!   Redis (its L1 holds plain values), the example's stack now.
//!
//! Every cache is filled and read once before the rounds (each org's first request), so the
//! rounds measure hits. tokio has 2 workers; the server shares the 2 cores.
//!
//! `cargo bench --bench hot_reads` (`ROUNDS`, `OPS` override 9 and 200 000 reads per contender
//! and round).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::{
    CacheService, CacheServiceExt, EncryptedCacheService, EncryptionKey, EncryptionKeys,
    RedisCacheService, TieredCacheService,
};
use common::{OrgContext, decode};
use redis::aio::ConnectionManager;

const ORGS: usize = 2_000;
const TASKS: usize = 64;
const NAMES: [&str; 5] = [
    "redis crate per request",
    "tiered get",
    "tiered get_shared",
    "encrypted(tiered) get_shared",
    "tiered, L2 encrypted, get_shared",
];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Org `i`'s key for contender `who`: each stack writes its own layout (JSON, the tiered
/// envelope, ciphertext), so each has its own keys (`tiered get` and `tiered get_shared`
/// share one instance and its keys).
fn key(who: usize, i: usize) -> String {
    let stack = if who == 2 { 1 } else { who };
    format!("bench:hot:{stack}:{i}")
}

#[derive(Clone)]
struct Contenders {
    redis: ConnectionManager,
    tiered: Arc<TieredCacheService>,
    encrypted: Arc<EncryptedCacheService<TieredCacheService>>,
    l2_encrypted: Arc<TieredCacheService>,
}

fn keys() -> EncryptionKeys {
    EncryptionKeys::new(1, EncryptionKey::from([7u8; 32]))
}

async fn tiered(url: &str, channel: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(url))
        .channel_prefix(channel)
        .l1_max_ttl(Duration::from_secs(3_600))
        .build()
        .await
        .expect("a tiered instance")
}

async fn contenders(url: &str) -> Contenders {
    let tiered_plain = tiered(url, "bench:hot:plain:").await;
    let under_encryption = tiered(url, "bench:hot:wrapped:").await;
    let l2_encrypted = TieredCacheService::builder(RedisCacheService::builder(url))
        .channel_prefix("bench:hot:l2:")
        .l1_max_ttl(Duration::from_secs(3_600))
        .encrypt_l2(keys())
        .build()
        .await
        .expect("a tiered instance with L2 encryption");
    Contenders {
        redis: redis::Client::open(url)
            .expect("url")
            .get_connection_manager()
            .await
            .expect("redis crate connects"),
        tiered: Arc::new(tiered_plain),
        encrypted: Arc::new(EncryptedCacheService::new(under_encryption, keys())),
        l2_encrypted: Arc::new(l2_encrypted),
    }
}

/// One request of contender `who` for org `i`.
async fn read(k: &mut Contenders, who: usize, i: usize) {
    let key = key(who, i);
    match who {
        0 => {
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut k.redis)
                .await
                .unwrap();
            assert!(black_box(bytes.map(|b| decode(&b))).is_some());
        }
        1 => assert!(black_box(k.tiered.get::<OrgContext>(&key).await.unwrap()).is_some()),
        2 => {
            let hit = k.tiered.get_shared::<OrgContext>(&key).await.unwrap();
            assert!(black_box(hit).is_some());
        }
        3 => {
            let hit = k.encrypted.get_shared::<OrgContext>(&key).await.unwrap();
            assert!(black_box(hit).is_some());
        }
        _ => {
            let hit = k.l2_encrypted.get_shared::<OrgContext>(&key).await.unwrap();
            assert!(black_box(hit).is_some());
        }
    }
}

/// `ops` reads by [`TASKS`] tasks of contender `who`: reads per second.
async fn run(k: &Contenders, who: usize, ops: usize, seed: usize) -> f64 {
    let per_task = ops.div_ceil(TASKS);
    let start = Instant::now();
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut k = k.clone();
            tokio::spawn(async move {
                for n in 0..per_task {
                    read(&mut k, who, (seed + t * 61 + n * 7) % ORGS).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    (per_task * TASKS) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rounds = env_or("ROUNDS", 9);
    let ops = env_or("OPS", 200_000);
    let server = support::RedisServer::start();
    let rt = common::multi_thread_runtime();
    let k = rt.block_on(contenders(&server.url()));
    rt.block_on(async {
        let mut k = k.clone();
        for i in 0..ORGS {
            let value = OrgContext::sample(i as u64);
            // The seed's design reads what a plain SET wrote: the JSON cachet writes too.
            redis::cmd("SET")
                .arg(key(0, i))
                .arg(serde_json::to_vec(&value).unwrap())
                .query_async::<()>(&mut k.redis)
                .await
                .unwrap();
        }
        let stacks: [(usize, &dyn CacheService); 3] =
            [(1, &*k.tiered), (3, &*k.encrypted), (4, &*k.l2_encrypted)];
        for (who, cache) in stacks {
            for i in 0..ORGS {
                let value = OrgContext::sample(i as u64);
                cache.set(&key(who, i), &value, Some(3_600)).await.unwrap();
            }
        }
        for who in 1..NAMES.len() {
            for i in 0..ORGS {
                read(&mut k.clone(), who, i).await;
            }
        }
    });
    println!(
        "hot org reads: {TASKS} tasks, {ORGS} orgs, redis-server on 127.0.0.1:{}, median of \
         {rounds} interleaved rounds of {ops} reads (reads per second, higher is better)",
        server.port()
    );
    let mut samples = vec![Vec::with_capacity(rounds); NAMES.len()];
    rt.block_on(async {
        for who in 0..NAMES.len() {
            run(&k, who, ops / 10, 0).await; // warm-up, unmeasured
        }
        for round in 0..rounds {
            for n in 0..NAMES.len() {
                let who = (n + round) % NAMES.len();
                samples[who].push(run(&k, who, ops, round * 131).await);
            }
        }
    });
    let rates: Vec<f64> = samples.into_iter().map(median).collect();
    for (name, rate) in NAMES.iter().zip(&rates) {
        println!(
            "{name:<34} {:>12.0} reads/s   {:>6.2}x the redis crate per request",
            rate,
            rate / rates[0]
        );
    }
}
