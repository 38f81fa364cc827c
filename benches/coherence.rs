//! What the tiered cache's coherence rules cost, in one run, on a redis-server this bench
//! starts itself on a free loopback port (tokio with 2 workers; the server shares the 2
//! cores):
//!
//! - **L1 fill rate under remote invalidations.** Instances A and B share one Redis and one
//!   channel. B invalidates keys unrelated to A's reads at a steady 0, 1 000 and 5 000
//!   messages per second (evenly spaced; the rate reached is printed), while A reads keys
//!   that are in Redis but not in its L1, one at a time, and checks `cached_locally` after
//!   each read: fill rate = filled / reads. The same reads also give the figure of the design
//!   this replaced, which bumped one global epoch per message applied and dropped any fill
//!   whose read began before a bump: a read during which A's `invalidations_applied()`
//!   changed is a fill that rule would have dropped (the window runs from just before the
//!   read to just after its fill, so this slightly overstates the old rule's drops).
//! - **Commands per cache-aside miss and hit**: N `get_or_load` calls per row
//!   (`RedisCacheService` and a tiered instance: miss; hit from Redis; tiered hit from its
//!   L1), per command. Twice over fresh keys: timed, with the server's `INFO commandstats`
//!   before and after (which counts the commands scripts run too), then under a `MONITOR`
//!   connection, which tells the client's commands (round trips) from the scripts' own.
//!
//! The `get_or_load` hit against a plain `get` hit (moka, tiered L1, Redis) is measured by
//! `benches/load.rs`; the instruction counts by `scripts/bench-instructions`.
//!
//! `cargo bench --bench coherence` (`READS` overrides 20 000 reads per rate, `MISSES` 1 000
//! calls per row of the command counts).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cachet::{CacheService, CacheServiceExt, RedisCacheService, TieredCacheService};
use common::OrgContext;

const RATES: [u64; 3] = [0, 1_000, 5_000];
/// How long B publishes before A starts reading, so that A reads under a steady rate.
const WARM_UP: Duration = Duration::from_millis(300);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn tiered(url: &str, channel_prefix: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(url))
        .invalidation(cachet::backend::tiered::InvalidationMode::Bus) // what its figures measure
        .channel_prefix(channel_prefix)
        // Neither expiry nor eviction may take an entry during the run: every key read
        // must fit (moka's admission policy may refuse new entries once full).
        .l1_max_ttl(Duration::from_secs(3600))
        .l1_max_entries(1_000_000)
        .build()
        .await
        .unwrap()
}

fn read_key(rate: u64, i: usize) -> String {
    format!("bench:coherence:{rate}:{i}")
}

/// B's paced invalidations of keys nobody reads, until `stop`: the n-th is sent at
/// `n / rate` seconds, evenly spaced (a thread that sleeps to each due time and hands the
/// call to the runtime; tokio's timer ticks every millisecond, which would send them in
/// bursts). Returns how many were sent, and over how long.
fn pace(
    rt: tokio::runtime::Handle,
    b: TieredCacheService,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut calls = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if rate == 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let n = calls.len() as u64;
            let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let b = b.clone();
            calls.push(
                rt.spawn(async move { b.invalidate(&format!("bench:coherence:noise:{n}")).await }),
            );
        }
        let elapsed = start.elapsed();
        rt.block_on(async {
            for call in calls.iter_mut() {
                call.await.unwrap().unwrap();
            }
        });
        (calls.len() as u64, elapsed)
    })
}

struct Reads {
    reads: usize,
    filled: usize,
    /// Reads during which A applied at least one of B's messages.
    saw_message: usize,
    elapsed: Duration,
}

/// A reads each of `keys` once (each is in Redis, not in A's L1) and checks its L1 after.
async fn read_all(a: TieredCacheService, keys: Vec<String>) -> Reads {
    let mut out = Reads {
        reads: keys.len(),
        filled: 0,
        saw_message: 0,
        elapsed: Duration::ZERO,
    };
    let start = Instant::now();
    for key in &keys {
        let before = a.invalidations_applied();
        let value = a.get::<OrgContext>(key).await.unwrap();
        let after = a.invalidations_applied();
        assert!(value.is_some(), "{key} is in Redis");
        out.filled += usize::from(a.cached_locally(key));
        out.saw_message += usize::from(after != before);
    }
    out.elapsed = start.elapsed();
    out
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn fill_rates(url: &str, rt: &tokio::runtime::Runtime, reads: usize) {
    let (a, b) = rt.block_on(async {
        let a = tiered(url, "bench-coherence:").await;
        let b = tiered(url, "bench-coherence:").await;
        // Written by an instance on another channel: A's L1 does not have them, and A hears
        // nothing of these writes.
        let writer = tiered(url, "bench-coherence-writer:").await;
        let value = OrgContext::sample(7);
        for rate in RATES {
            for chunk in (0..reads).collect::<Vec<_>>().chunks(1_000) {
                let writes = chunk.iter().map(|&i| {
                    let (writer, value) = (&writer, &value);
                    async move { writer.set(&read_key(rate, i), value, Some(3600)).await }
                });
                for result in futures_util::future::join_all(writes).await {
                    result.unwrap();
                }
            }
        }
        writer.shutdown().await;
        (a, b)
    });
    println!(
        "L1 fill rate: A reads {reads} keys per rate, one at a time, each in Redis and not in \
         its L1; B invalidates unrelated keys meanwhile"
    );
    for rate in RATES {
        let (outcome, (sent, paced_for), applied, resets) = rt.block_on(async {
            let stop = Arc::new(AtomicBool::new(false));
            let pacer = pace(
                tokio::runtime::Handle::current(),
                b.clone(),
                rate,
                Arc::clone(&stop),
            );
            tokio::time::sleep(WARM_UP).await;
            let (applied, resets) = (a.invalidations_applied(), a.l1_resets());
            let keys = (0..reads).map(|i| read_key(rate, i)).collect();
            let outcome = tokio::spawn(read_all(a.clone(), keys)).await.unwrap();
            let applied = a.invalidations_applied() - applied;
            let resets = a.l1_resets() - resets;
            stop.store(true, Ordering::SeqCst);
            let paced = tokio::task::spawn_blocking(move || pacer.join().unwrap())
                .await
                .unwrap();
            (outcome, paced, applied, resets)
        });
        let window = outcome.elapsed.as_secs_f64();
        println!(
            "fill rate at {rate} msg/s: {:.2}% ({} of {} reads filled); B sent {:.0} msg/s, A \
             applied {:.0} msg/s while reading, {resets} L1 resets; {:.1} µs per read",
            percent(outcome.filled, outcome.reads),
            outcome.filled,
            outcome.reads,
            sent as f64 / paced_for.as_secs_f64(),
            applied as f64 / window,
            window * 1e6 / outcome.reads as f64,
        );
        println!(
            "  old global-epoch rule would have filled {:.2}% (only the {} of {} reads during \
             which A applied no message)",
            percent(outcome.reads - outcome.saw_message, outcome.reads),
            outcome.reads - outcome.saw_message,
            outcome.reads,
        );
    }
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// Calls per command since the server started, from `INFO commandstats` (which counts the
/// commands a script runs as well as the client's own).
fn command_calls(server: &support::RedisServer) -> BTreeMap<String, u64> {
    let stats = server.command(&["INFO", "commandstats"]).unwrap();
    common::command_stats(&stats)
        .into_iter()
        .map(|(name, stat)| (name, stat.calls))
        .collect()
}

/// Commands the server received between two `ECHO` markers, from a `MONITOR` connection:
/// sent by clients (round trips) and run inside scripts (`[0 lua]`), by command.
#[derive(Default)]
struct Monitored {
    sent: BTreeMap<String, u64>,
    in_scripts: BTreeMap<String, u64>,
}

/// Starts `MONITOR` on a raw connection; the thread collects from the start marker to the
/// end marker (the caller sends both).
fn monitor(server: &support::RedisServer, marker: &str) -> std::thread::JoinHandle<Monitored> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
    stream.write_all(b"MONITOR\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "+OK", "MONITOR");
    let (start, end) = (format!("\"{marker}-start\""), format!("\"{marker}-end\""));
    std::thread::spawn(move || {
        let mut out = Monitored::default();
        let mut started = false;
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "MONITOR ended");
            if line.contains(&start) {
                started = true;
                continue;
            }
            if line.contains(&end) {
                return out;
            }
            // `+<time> [<db> <client address, or lua>] "<command>" "<arg>"...`
            let Some((origin, rest)) = line.split_once("] ") else {
                continue;
            };
            let Some(command) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                continue;
            };
            if !started {
                continue;
            }
            let counts = if origin.ends_with(" lua") {
                &mut out.in_scripts
            } else {
                &mut out.sent
            };
            *counts.entry(command.to_lowercase()).or_default() += 1;
        }
    })
}

fn per_call(counts: &BTreeMap<String, u64>, calls: usize) -> (f64, String) {
    let total = counts.values().sum::<u64>() as f64 / calls as f64;
    let parts: Vec<String> = counts
        .iter()
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / calls as f64))
        .collect();
    let parts = if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    };
    (total, parts)
}

async fn get_or_load_all(cache: &dyn CacheService, prefix: &str, calls: usize) {
    for i in 0..calls {
        let value: OrgContext = cache
            .get_or_load(&format!("{prefix}{i}"), Some(300), || async move {
                Ok::<_, std::io::Error>(OrgContext::sample(i as u64))
            })
            .await
            .unwrap();
        black_box(value);
    }
}

/// The rows: which cache, and which keys (the misses' keys are the hits' keys).
const ROWS: [(&str, usize, &str); 5] = [
    ("miss, RedisCacheService", 0, "redis"),
    ("miss, tiered", 1, "tiered"),
    ("hit, RedisCacheService (from Redis)", 0, "redis"),
    (
        "hit, tiered, from Redis (another instance, L1 miss)",
        2,
        "tiered",
    ),
    ("hit, tiered, from its L1", 1, "tiered"),
];

fn round_trips(
    server: &support::RedisServer,
    url: &str,
    rt: &tokio::runtime::Runtime,
    calls: usize,
) {
    let caches = rt.block_on(async {
        let redis = RedisCacheService::new(url, 300).await.unwrap();
        let a = tiered(url, "bench-coherence-load:").await;
        let b = tiered(url, "bench-coherence-load:").await;
        // One miss each first: the scripts are loaded (a first EVALSHA fails with NOSCRIPT).
        get_or_load_all(&redis, "bench:coherence:warm:redis:", 1).await;
        get_or_load_all(&a, "bench:coherence:warm:tiered:", 1).await;
        let caches: [Arc<dyn CacheService>; 3] = [Arc::new(redis), Arc::new(a), Arc::new(b)];
        caches
    });
    println!(
        "commands per get_or_load call, {calls} calls per row: sent by the client (MONITOR), \
         executed by the server (INFO commandstats, script internals included)"
    );
    // Two passes over fresh keys: one timed (and counted by INFO commandstats), one counted
    // by MONITOR, which slows the server.
    let mut timed = Vec::new();
    for (row, cache, keys) in ROWS {
        let before = command_calls(server);
        let start = Instant::now();
        rt.block_on(get_or_load_all(
            &*caches[cache],
            &format!("bench:coherence:timed:{keys}:"),
            calls,
        ));
        let elapsed = start.elapsed();
        let mut executed = command_calls(server);
        executed.remove("info");
        for (name, n) in executed.iter_mut() {
            *n -= before.get(name).copied().unwrap_or(0);
        }
        executed.retain(|_, n| *n > 0);
        timed.push((row, elapsed, executed));
    }
    for ((row, cache, keys), (_, elapsed, executed)) in ROWS.into_iter().zip(timed) {
        let marker = format!("bench-coherence-{}", row.replace([' ', ','], "-"));
        let monitored = monitor(server, &marker);
        server
            .command(&["ECHO", &format!("{marker}-start")])
            .unwrap();
        rt.block_on(get_or_load_all(
            &*caches[cache],
            &format!("bench:coherence:monitored:{keys}:"),
            calls,
        ));
        server.command(&["ECHO", &format!("{marker}-end")]).unwrap();
        let monitored = monitored.join().unwrap();
        let (sent, sent_parts) = per_call(&monitored.sent, calls);
        let (in_scripts, _) = per_call(&monitored.in_scripts, calls);
        let (total, executed_parts) = per_call(&executed, calls);
        println!(
            "{row}: {sent:.2} round trips ({sent_parts}); server executed {total:.2} commands \
             ({executed_parts}), {in_scripts:.2} of them inside scripts; {:.1} µs per call",
            elapsed.as_secs_f64() * 1e6 / calls as f64
        );
    }
}

fn main() {
    let reads = env_or("READS", 20_000);
    let calls = env_or("MISSES", 1_000);
    let server = support::RedisServer::start();
    let url = server.url();
    let rt = common::multi_thread_runtime();
    println!("redis-server on 127.0.0.1:{}", server.port());
    fill_rates(&url, &rt, reads);
    round_trips(&server, &url, &rt, calls);
}
