//! The Redis backend's ratios against the raw clients, measured interleaved: each round runs
//! every contender for the same number of operations, one after the other (the order rotates
//! every round), and the report gives the median over rounds. On a small shared machine this
//! is steadier than criterion's one-contender-at-a-time stretches (`benches/redis.rs`), where
//! the same pair moved by 10-40% between runs.
//!
//! Rows: typed GET and SET of a ~330-byte org context with 64 concurrent tasks (time per
//! operation, so throughput = 1 / time), and one call at a time (latency); each also as the
//! client's CPU time per operation (this process, every thread; the server is a child
//! process and not counted), which moves less than wall-clock time when the machine is
//! shared. Contenders:
//!
//! - `cachet`: `RedisCacheService::new(url, 300)` through `Arc<dyn CacheService>`;
//! - `fred (cachet's config)`: a raw fred `Client` built as cachet builds its own (one
//!   auto-pipelined client, 2 s command timeout), `GET`/`SET PX` + serde_json;
//! - `fred (no timeout)`: the same without the command timeout, fred's fastest configuration
//!   measured on this machine (a `Pool` of 2 or 4 was slower);
//! - `redis crate`: the `redis` crate's `ConnectionManager` + serde_json (the client the
//!   original design used).
//!
//! `cargo bench --bench redis_ratios [-- ROW-FILTER]` (`ROUNDS`, `OPS` override 15 and
//! 20 000; `BENCH_SERVER=valkey` runs against valkey-server; `ONLY=N` runs contender N alone,
//! for a profiler; `ALLOC_PROBE=1` replaces the no-timeout contender with raw fred in
//! cachet's configuration that also holds one 7 KB heap allocation across each call, the
//! probe that showed what boxing fred's ~6.8 KB futures cost before `future_slot`). The redis-server is started by the
//! bench on a free loopback port; tokio has 2 workers, and the server shares the 2 cores.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet::{CacheService, CacheServiceExt, RedisCacheService};
use common::{OrgContext, decode, encode};
use fred::prelude::{Builder, Client, ClientLike, Config, Expiration, KeysInterface};
use redis::aio::ConnectionManager;

const KEYS: usize = 4_000;
const NAMES: [&str; 4] = [
    "cachet",
    "fred (cachet's config)",
    "fred (no timeout)",
    "redis crate",
];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone)]
struct Contenders {
    cachet: Arc<dyn CacheService>,
    fred: Client,
    fred_no_timeout: Client,
    redis: ConnectionManager,
    /// `ALLOC_PROBE=1`: contender 2 is raw fred + a 7 KB allocation per call.
    alloc_probe: bool,
}

async fn fred_client(url: &str, timeout: Duration) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("url"))
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .build()
        .expect("fred client");
    client.init().await.expect("fred connects");
    client
}

async fn contenders(url: &str) -> Contenders {
    Contenders {
        cachet: Arc::new(RedisCacheService::new(url, 300).await.expect("cachet")),
        fred: fred_client(url, Duration::from_secs(2)).await,
        fred_no_timeout: fred_client(url, Duration::ZERO).await,
        redis: redis::Client::open(url)
            .expect("url")
            .get_connection_manager()
            .await
            .expect("redis crate connects"),
        alloc_probe: std::env::var("ALLOC_PROBE").is_ok_and(|v| v == "1"),
    }
}

fn key(i: usize) -> String {
    format!("bench:org:{i}")
}

/// One typed operation by contender `who` on key `i`.
async fn op(k: &mut Contenders, who: usize, write: bool, i: usize, value: &OrgContext) {
    let key = key(i);
    // The allocation probe: what one future-sized heap allocation per call costs.
    let probe = (who == 2 && k.alloc_probe).then(Box::<[u8; 7 * 1024]>::new_uninit);
    let who = if probe.is_some() { 1 } else { who };
    black_box(&probe);
    match (who, write) {
        (0, false) => {
            black_box(k.cachet.get::<OrgContext>(&key).await.unwrap());
        }
        (0, true) => k.cachet.set(&key, value, None).await.unwrap(),
        (1 | 2, false) => {
            let client = if who == 1 {
                &k.fred
            } else {
                &k.fred_no_timeout
            };
            let bytes: Option<Bytes> = client.get(&key).await.unwrap();
            black_box(bytes.map(|b| decode(&b)));
        }
        (1 | 2, true) => {
            let client = if who == 1 {
                &k.fred
            } else {
                &k.fred_no_timeout
            };
            client
                .set::<(), _, _>(
                    &key,
                    encode(value),
                    Some(Expiration::PX(300_000)),
                    None,
                    false,
                )
                .await
                .unwrap();
        }
        (_, false) => {
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut k.redis)
                .await
                .unwrap();
            black_box(bytes.map(|b| decode(&b)));
        }
        (_, true) => {
            redis::cmd("SET")
                .arg(&key)
                .arg(encode(value).as_ref())
                .arg("PX")
                .arg(300_000)
                .query_async::<()>(&mut k.redis)
                .await
                .unwrap();
        }
    }
}

/// This process's CPU time (every thread, user and system; not the server's, which is a
/// child process), from `CLOCK_PROCESS_CPUTIME_ID`.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant libc defines.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `ops` operations by `tasks` concurrent tasks; wall-clock ns and client CPU ns per operation.
async fn run(
    k: &Contenders,
    who: usize,
    write: bool,
    tasks: usize,
    ops: usize,
    seed: usize,
) -> (f64, f64) {
    let per_task = ops.div_ceil(tasks);
    let value = Arc::new(OrgContext::sample(7));
    let cpu = process_cpu_time();
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (mut k, value) = (k.clone(), value.clone());
            tokio::spawn(async move {
                for n in 0..per_task {
                    op(&mut k, who, write, (seed + t * 61 + n * 7) % KEYS, &value).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let done = (per_task * tasks) as f64;
    (
        start.elapsed().as_nanos() as f64 / done,
        (process_cpu_time() - cpu).as_nanos() as f64 / done,
    )
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks rows by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let rounds = env_or("ROUNDS", 15);
    let ops = env_or("OPS", 20_000);
    let only = std::env::var("ONLY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let (server, server_name) = match std::env::var("BENCH_SERVER").as_deref() {
        Ok("valkey") => (support::RedisServer::start_valkey(), "valkey-server"),
        _ => (support::RedisServer::start(), "redis-server"),
    };
    let rt = common::multi_thread_runtime();
    let k = rt.block_on(contenders(&server.url()));
    rt.block_on(async {
        let value = OrgContext::sample(7);
        for i in 0..KEYS {
            k.cachet.set(&key(i), &value, None).await.unwrap();
        }
    });
    println!(
        "{} on 127.0.0.1:{}, {rounds} rounds, median ns per operation (lower is better)",
        server_name,
        server.port()
    );
    let third = if k.alloc_probe {
        "fred +7KB"
    } else {
        "fred 0 to"
    };
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}   cachet throughput vs fred / {third} / redis crate",
        "row", NAMES[0], "fred cfg", third, NAMES[3]
    );
    for (row, write, tasks, row_ops) in [
        ("typed GET, 64 tasks", false, 64, ops),
        ("typed SET, 64 tasks", true, 64, ops),
        ("typed GET, one at a time", false, 1, ops / 10),
        ("typed SET, one at a time", true, 1, ops / 10),
    ] {
        if filter.as_deref().is_some_and(|f| !row.contains(f)) {
            continue;
        }
        let mut samples = vec![Vec::with_capacity(rounds); NAMES.len()];
        let mut cpu = vec![Vec::with_capacity(rounds); NAMES.len()];
        rt.block_on(async {
            // One unmeasured warm-up round.
            for who in (0..NAMES.len()).filter(|w| only.is_none_or(|only| only == *w)) {
                run(&k, who, write, tasks, row_ops / 4, 0).await;
            }
            for round in 0..rounds {
                for n in 0..NAMES.len() {
                    let who = (n + round) % NAMES.len();
                    if only.is_some_and(|only| only != who) {
                        samples[who].push(f64::NAN);
                        cpu[who].push(f64::NAN);
                        continue;
                    }
                    let (ns, cpu_ns) = run(&k, who, write, tasks, row_ops, round * 131).await;
                    samples[who].push(ns);
                    cpu[who].push(cpu_ns);
                }
            }
        });
        for (what, samples) in [("wall", samples), ("client CPU", cpu)] {
            let m: Vec<f64> = samples.into_iter().map(median).collect();
            println!(
                "{:<34} {:>10.0} {:>10.0} {:>10.0} {:>10.0}   {:.2}x / {:.2}x / {:.2}x",
                format!("{row}, {what}"),
                m[0],
                m[1],
                m[2],
                m[3],
                m[1] / m[0],
                m[2] / m[0],
                m[3] / m[0]
            );
        }
    }
}
