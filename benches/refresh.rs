//! Requests that never wait for an expiry: 64 tasks read random orgs of 50 for 4 s, each
//! entry living 1 s, each database load taking 5 ms; every request is timed, and the
//! database loads are counted. Contenders, in one run, the order rotating every round:
//!
//! - `seed hand-written`: the seed's cache-aside written by hand on mini-moka (TTL 1 s) +
//!   `serde_json`: read, on a miss load and insert (no single flight);
//! - `cachet get_or_load_with`: single flight and leases, no eager refresh (every expiry
//!   makes the requests of that key wait for one load);
//! - `cachet eager 0.9, detached`: `get_or_load_detached` with `eager_refresh(0.9)`: a hit
//!   in the last tenth of the TTL reloads in the background;
//! - `cachet eager 0.9, inline`: `get_or_load_with` with `eager_refresh(0.9)`: the one
//!   request that claims the reload runs it;
//! - `cachet eager 0.8, detached`: the same with the fraction of the examples.
//!
//! Every cache is filled before its measured window (the first load of each org is not
//! counted), so the loads counted are the reloads of 4 s: 4 TTL periods per org, 200 in
//! all. The report gives p50, p99, p99.9 and max of the request latency, the share of
//! requests slower than 1 ms, and loads per TTL period.
//!
//! Each task yields to the runtime between two requests (outside the timed part), as a
//! server's request loop does when it waits for the next request: a task whose requests
//! are all hits would otherwise hold its worker thread, and the latency measured would be
//! the scheduler's.
//!
//! `cargo bench --bench refresh` (`ROUNDS` rounds, default 2; `SECS` seconds per window,
//! default 4). In-process only: no server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachet::{CacheService, CacheServiceExt, LoadOptions, MokaCacheService};
use common::OrgContext;
use rand::{Rng, SeedableRng};

const ORGS: u64 = 50;
const TASKS: usize = 64;
const TTL_SECS: u64 = 1;
const DB_LATENCY: Duration = Duration::from_millis(5);

const NAMES: [&str; 5] = [
    "seed hand-written",
    "cachet get_or_load_with",
    "cachet eager 0.9, detached",
    "cachet eager 0.9, inline",
    "cachet eager 0.8, detached",
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The app's database: counts its loads, answers after 5 ms.
#[derive(Clone, Default)]
struct Db(Arc<AtomicUsize>);

impl Db {
    async fn load(&self, n: u64) -> Result<Option<OrgContext>, std::io::Error> {
        self.0.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(DB_LATENCY).await;
        Ok(Some(OrgContext::sample(n)))
    }

    fn loads(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One contender's cache.
#[derive(Clone)]
enum Contender {
    Seed(mini_moka::sync::Cache<String, String>),
    Cachet(Arc<dyn CacheService>, LoadOptions, Mode),
}

#[derive(Clone, Copy)]
enum Mode {
    Inline,
    Detached,
}

impl Contender {
    fn new(who: usize) -> Self {
        let cachet = |options: LoadOptions, mode| {
            let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
            Contender::Cachet(cache, options.ttl_secs(TTL_SECS), mode)
        };
        match who {
            0 => Contender::Seed(
                mini_moka::sync::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(Duration::from_secs(TTL_SECS))
                    .build(),
            ),
            1 => cachet(LoadOptions::default(), Mode::Inline),
            2 => cachet(LoadOptions::default().eager_refresh(0.9), Mode::Detached),
            3 => cachet(LoadOptions::default().eager_refresh(0.9), Mode::Inline),
            _ => cachet(LoadOptions::default().eager_refresh(0.8), Mode::Detached),
        }
    }

    /// One request: the org context of org `n`.
    async fn request(&self, db: &Db, n: u64) -> OrgContext {
        let key = format!("org:{n}");
        match self {
            Contender::Seed(cache) => {
                if let Some(json) = cache.get(&key) {
                    return serde_json::from_str(&json).expect("JSON");
                }
                let value = db.load(n).await.unwrap().expect("org");
                cache.insert(key, serde_json::to_string(&value).expect("JSON"));
                value
            }
            Contender::Cachet(cache, options, Mode::Inline) => {
                let loaded = cache
                    .get_or_load_with(&key, options, || db.load(n))
                    .await
                    .expect("load");
                loaded.value.expect("org")
            }
            Contender::Cachet(cache, options, Mode::Detached) => {
                let db = db.clone();
                let loaded = cache
                    .get_or_load_detached(&key, options, move || async move { db.load(n).await })
                    .await
                    .expect("load");
                OrgContext::clone(&loaded.value.expect("org"))
            }
        }
    }
}

/// Latency percentiles of one window, and its loads.
struct Window {
    sorted_ns: Vec<u32>,
    loads: usize,
}

impl Window {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.sorted_ns.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_nanos(u64::from(self.sorted_ns[i]))
    }

    fn slower_than(&self, bound: Duration) -> f64 {
        let bound = u32::try_from(bound.as_nanos()).unwrap_or(u32::MAX);
        let slow = self.sorted_ns.len() - self.sorted_ns.partition_point(|&ns| ns <= bound);
        slow as f64 / self.sorted_ns.len() as f64
    }
}

async fn window(who: usize, secs: u64, seed: u64) -> Window {
    let contender = Contender::new(who);
    let db = Db::default();
    // Fill: the first load of every org is not a reload.
    for n in 0..ORGS {
        contender.request(&db, n).await;
    }
    let filled = db.loads();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (contender, db) = (contender.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1_000 + t as u64);
            let mut samples = Vec::with_capacity(1 << 16);
            while Instant::now() < end {
                let n = rng.random_range(0..ORGS);
                let started = Instant::now();
                std::hint::black_box(contender.request(&db, n).await);
                let ns = started.elapsed().as_nanos();
                samples.push(u32::try_from(ns).unwrap_or(u32::MAX));
                // A server's next request comes from the network: let the other tasks (and
                // the background reloads) run, as a real request loop does. Without it, a
                // task whose hits never wait would hold its worker for the whole window.
                tokio::task::yield_now().await;
            }
            samples
        }));
    }
    let mut sorted_ns = Vec::new();
    for task in tasks {
        sorted_ns.extend(task.await.expect("task"));
    }
    let loads = db.loads() - filled;
    sorted_ns.sort_unstable();
    Window { sorted_ns, loads }
}

fn main() {
    let rounds = env_or("ROUNDS", 2);
    let secs = env_or("SECS", 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let periods = (ORGS * secs / TTL_SECS) as f64;
    println!(
        "{TASKS} tasks, {ORGS} orgs, TTL {TTL_SECS} s, database {DB_LATENCY:?}, {secs} s per \
         window, {rounds} rounds ({periods} TTL periods per window)"
    );
    let mut p999 = vec![Vec::new(); NAMES.len()];
    let mut ratios = vec![Vec::new(); NAMES.len()];
    for round in 0..rounds {
        for step in 0..NAMES.len() {
            let who = (step + round as usize) % NAMES.len();
            let w = runtime.block_on(window(who, secs, round));
            let per_period = w.loads as f64 / periods;
            println!(
                "round {round} {:<28} requests {:>9}  p50 {:>9.1?}  p99 {:>9.1?}  p99.9 {:>9.1?}  \
                 max {:>9.1?}  >1ms {:>6.3}%  loads {:>4} ({per_period:.2} per TTL period)",
                NAMES[who],
                w.sorted_ns.len(),
                w.percentile(0.50),
                w.percentile(0.99),
                w.percentile(0.999),
                w.percentile(1.0),
                w.slower_than(Duration::from_millis(1)) * 100.0,
                w.loads,
            );
            p999[who].push(w.percentile(0.999));
            ratios[who].push(per_period);
        }
    }
    println!("summary (per round): seed p99.9 / contender p99.9, loads per TTL period");
    for who in 1..NAMES.len() {
        let ratio: Vec<String> = p999[0]
            .iter()
            .zip(&p999[who])
            .map(|(seed, own)| format!("{:.1}x", seed.as_secs_f64() / own.as_secs_f64().max(1e-9)))
            .collect();
        let loads: Vec<String> = ratios[who].iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "  {:<28} p99.9 lower by {}  loads/period {}",
            NAMES[who],
            ratio.join(", "),
            loads.join(", ")
        );
    }
    let seed_loads: Vec<String> = ratios[0].iter().map(|r| format!("{r:.2}")).collect();
    println!("  {:<28} loads/period {}", NAMES[0], seed_loads.join(", "));
}
