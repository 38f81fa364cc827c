//! The Redis `GET` path through `Arc<dyn CacheService>` under whatever global allocator the
//! bench binary that includes this module declares (`benches/allocators/glibc.rs`,
//! `mimalloc.rs`, `jemalloc.rs`; a package of its own, so that the main crate does not build two
//! C allocators), with or without the `future-slots` feature (the
//! build decides; the output says which). `scripts/bench-allocators` builds and runs the six
//! combinations and prints the table; run by hand:
//!
//! ```text
//! cargo bench --manifest-path benches/allocators/Cargo.toml --bench alloc_mimalloc [--features future-slots]
//! ```
//!
//! A `redis-server` is started on a free loopback port (never 6379), 4 000 keys are filled
//! with a ~330-byte org context, and a fixed warm-up runs; then, for each task count (64
//! concurrent tasks, and 1: one call at a time), `ROUNDS` measured rounds of typed
//! `get::<OrgContext>` (`OP=bytes`: `get_bytes`, no decoding). Each round prints one line:
//!
//! ```text
//! RESULT alloc=mimalloc slots=off op=typed tasks=64 ops=100000 wall_ns=... cpu_ns=...
//! ```
//!
//! with wall-clock and client CPU time (this process, every thread; the server is a child
//! process and not counted) per operation. Under callgrind the script runs it with `OPS=0`
//! and with `OPS=N` and divides the difference by N: set-up and warm-up are the same in both.
//!
//! Environment: `TASKS` (`64`, `1` or `both`, the default), `OPS` (operations per round with
//! 64 tasks, default 100 000), `OPS1` (one at a time, default `OPS / 10`), `ROUNDS` (default
//! 1), `OP` (`typed` or `bytes`). Tokio runs multi-threaded with 2 workers, as in
//! `benches/redis_ratios.rs`; the server shares the same 2 cores.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::{CacheService, CacheServiceExt, RedisCacheService};

use crate::common::{self, OrgContext};
use crate::support::RedisServer;

const KEYS: usize = 4_000;
/// Warm-up operations per task count: the same whatever `OPS` is, so that a run with
/// `OPS=0` is an exact baseline.
const WARMUP_OPS: usize = 2_000;

fn env_usize(name: &str) -> Option<usize> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: not a number")),
    )
}

/// This process's CPU time (every thread, user and system), from `CLOCK_PROCESS_CPUTIME_ID`.
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

/// `ops` GETs spread over `tasks` concurrent tasks: (wall ns, client CPU ns) per operation.
async fn run(
    cache: &Arc<dyn CacheService>,
    keys: &Arc<Vec<String>>,
    typed: bool,
    tasks: usize,
    ops: usize,
    seed: usize,
) -> (f64, f64) {
    let per_task = ops.div_ceil(tasks);
    let cpu = process_cpu_time();
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (cache, keys) = (cache.clone(), keys.clone());
            tokio::spawn(async move {
                for n in 0..per_task {
                    let key = &keys[(seed + t * 61 + n * 7) % KEYS];
                    if typed {
                        let hit = cache.get::<OrgContext>(key).await.unwrap();
                        assert!(black_box(hit).is_some(), "{key} is filled");
                    } else {
                        let hit = cache.get_bytes(key).await.unwrap();
                        assert!(black_box(hit).is_some(), "{key} is filled");
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let done = ((per_task * tasks) as f64).max(1.0);
    (
        start.elapsed().as_nanos() as f64 / done,
        (process_cpu_time() - cpu).as_nanos() as f64 / done,
    )
}

/// The bench's `main`, for the global allocator named `alloc`.
pub fn main(alloc: &str) {
    let slots = if cfg!(feature = "future-slots") {
        "on"
    } else {
        "off"
    };
    let typed = match std::env::var("OP").as_deref() {
        Ok("bytes") => false,
        Ok("typed") | Err(_) => true,
        Ok(other) => panic!("OP={other}: typed or bytes"),
    };
    let task_counts: &[usize] = match std::env::var("TASKS").as_deref() {
        Ok("64") => &[64],
        Ok("1") => &[1],
        Ok("both") | Err(_) => &[64, 1],
        Ok(other) => panic!("TASKS={other}: 64, 1 or both"),
    };
    let ops = env_usize("OPS").unwrap_or(100_000);
    let ops1 = env_usize("OPS1").unwrap_or(ops / 10);
    let rounds = env_usize("ROUNDS").unwrap_or(1);

    let server = RedisServer::start();
    let rt = common::multi_thread_runtime();
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("bench:org:{i}")).collect());
    let cache: Arc<dyn CacheService> = rt.block_on(async {
        let cache: Arc<dyn CacheService> = Arc::new(
            RedisCacheService::new(&server.url(), 300)
                .await
                .expect("cachet connects"),
        );
        // Filled by 64 tasks: cheap under callgrind too.
        let value = Arc::new(OrgContext::sample(7));
        let fills: Vec<_> = (0..64)
            .map(|t| {
                let (cache, keys, value) = (cache.clone(), keys.clone(), value.clone());
                tokio::spawn(async move {
                    for key in keys.iter().skip(t).step_by(64) {
                        cache.set(key, &*value, None).await.unwrap();
                    }
                })
            })
            .collect();
        for fill in fills {
            fill.await.unwrap();
        }
        cache
    });
    let op = if typed { "typed" } else { "bytes" };
    for &tasks in task_counts {
        let ops = if tasks == 1 { ops1 } else { ops };
        rt.block_on(async {
            run(&cache, &keys, typed, tasks, WARMUP_OPS, 0).await;
            for round in 0..rounds {
                let (wall, cpu) = run(&cache, &keys, typed, tasks, ops, 1 + round * 131).await;
                println!(
                    "RESULT alloc={alloc} slots={slots} op={op} tasks={tasks} ops={ops} \
                     wall_ns={wall:.0} cpu_ns={cpu:.0}"
                );
            }
        });
    }
    drop(cache);
    drop(rt);
    drop(server);
}
