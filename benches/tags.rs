//! `invalidate_tag` on a tag with one entry against a tag with 100,000 entries, in the same
//! run, on the in-memory backend and on a redis-server this bench starts itself (issue 18:
//! the invalidating side's cost must not grow with the entries tagged). Interleaved rounds
//! (the order alternating), medians per call. `INFO commandstats` gives the server's own
//! count of commands per invalidation, the number that would grow if it walked the entries.
//! After the rounds, a sample of each tag's entries is read back to check that they are
//! gone.
//!
//! `cargo bench --bench tags` (`ROUNDS`, `OPS` override 15 and 200 calls per tag and round).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use cachet::{CacheService, CacheServiceExt, MokaCacheService, RedisCacheService};
use futures_util::future::join_all;

const MANY: usize = 100_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Tags `one` with one entry and `many` with [`MANY`], 500 writes at a time.
async fn fill(cache: &dyn CacheService) {
    cache
        .set_tagged("single:0", &0u64, Some(3_600), &["one"])
        .await
        .unwrap();
    let keys: Vec<String> = (0..MANY).map(|i| format!("entry:{i}")).collect();
    for chunk in keys.chunks(500) {
        let writes = chunk
            .iter()
            .map(|key| cache.set_tagged(key, &1u64, Some(3_600), &["many"]));
        for written in join_all(writes).await {
            written.unwrap();
        }
    }
    assert_eq!(cache.get::<u64>("entry:99999").await.unwrap(), Some(1));
}

/// Median ns per `invalidate_tag` of `one` and of `many`.
async fn measure(cache: &dyn CacheService, rounds: usize, ops: usize) -> (f64, f64) {
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for which in [round % 2, 1 - round % 2] {
            let (tag, samples) = if which == 0 {
                ("one", &mut one)
            } else {
                ("many", &mut many)
            };
            let start = Instant::now();
            for _ in 0..ops {
                cache.invalidate_tag(tag).await.unwrap();
            }
            samples.push(start.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(one), median(many))
}

async fn check_gone(cache: &dyn CacheService) {
    assert_eq!(cache.get::<u64>("single:0").await.unwrap(), None);
    let sample: Vec<String> = (0..MANY)
        .step_by(997)
        .map(|i| format!("entry:{i}"))
        .collect();
    let sample: Vec<&str> = sample.iter().map(String::as_str).collect();
    let found = cache.get_many::<u64>(&sample).await.unwrap();
    assert!(
        found.iter().all(Option::is_none),
        "every sampled entry gone"
    );
}

fn commands(server: &support::RedisServer) -> u64 {
    let stats = server.command(&["INFO", "commandstats"]).unwrap();
    stats
        .lines()
        .filter_map(|line| line.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn main() {
    let (rounds, ops) = (env_or("ROUNDS", 15), env_or("OPS", 200));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = support::RedisServer::start();
    rt.block_on(async {
        let memory: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
        let redis: Arc<dyn CacheService> =
            Arc::new(RedisCacheService::new(&server.url(), 300).await.unwrap());
        println!(
            "invalidate_tag: a tag with 1 entry against a tag with {MANY} entries, \
             median of {rounds} interleaved rounds of {ops} calls"
        );
        for (name, cache) in [("memory", &memory), ("redis", &redis)] {
            fill(cache.as_ref()).await;
            let before = commands(&server);
            let (one, many) = measure(cache.as_ref(), rounds, ops).await;
            let sent = commands(&server) - before;
            let per_call = sent as f64 / (2 * rounds * ops) as f64;
            println!(
                "{name:<8} 1 entry {one:>9.0} ns   {MANY} entries {many:>9.0} ns   \
                 ratio {:.2}   server commands per call {per_call:.2}",
                many / one
            );
            check_gone(cache.as_ref()).await;
        }
    });
}
