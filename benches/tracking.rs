//! What server-assisted invalidation (`CLIENT TRACKING ... REDIRECT`, `NOLOOP`) costs and buys
//! against the pub/sub bus, in one run, on servers this bench starts itself on free loopback
//! ports (tokio with 2 workers; the servers share the same 2 cores):
//!
//! 1. **Propagation to the L1**, on a standalone Redis, a 3-primary Redis Cluster and a
//!    standalone Valkey. Rounds over 8 keys (on the cluster they spread over the primaries):
//!    - *external write, tracking*: instances A and B (tracking) each read the key, so it is
//!      in their L1; then a plain client that is not cachet (a separate `RedisCacheService`'s
//!      fred `client()`, which follows slots on the cluster) sends a raw `DEL` or a raw
//!      `SET`, alternately; and in a row of its own, a `FLUSHALL` (on a cluster, on every
//!      primary). Measured: from that command's reply until `cached_locally(key)` is
//!      false on A and on B (both pooled; each watcher wakes on its instance's invalidation
//!      counter, `wait_for_invalidations`, then checks `cached_locally`; no spinning).
//!    - *cachet write, tracking* and *cachet write, bus*: B reads the key, then A `set`s it;
//!      measured from the `set`'s return until B no longer holds it (in bus mode `set` returns
//!      after its `PUBLISH`, one round trip after the `SET`; its duration is printed too).
//!
//!    p50, p99 and max, the share already dropped when the reply arrived, and rounds in which
//!    the copy was still there after 2 s (never dropped).
//! 2. **Fan-out server cost** on one standalone Redis per row: a fleet of tiered instances
//!    (200 by default, in this process), of which only the first 10 read a set of keys (so
//!    only they hold, and in tracking mode only they are tracked for, each key); then the 11th
//!    instance `set`s every key once, one at a time. Per write, from the server: microseconds
//!    of `INFO commandstats` (`set`, whose call does the tracking invalidations, and in bus
//!    mode `publish` to every subscriber) and CPU time from `INFO cpu` (`used_cpu_user +
//!    used_cpu_sys`, which also counts writing the replies, pushes and messages to the
//!    sockets), each as a delta over the write phase only. Rows: tracking and bus, each with
//!    the 200-instance fleet and with only the 10 holders plus the writer.
//! 3. **Read costs**, interleaved batches on one standalone Redis: an L1 hit (typed `get` of
//!    a key in the L1; tracking and bus alternating) and an L2 read (`get` of a key the
//!    reader never read, so a miss in the L1 and, with tracking, a new entry in the server's
//!    tracking table), tracking vs bus, plus raw fred clients (plain, and with `CLIENT
//!    TRACKING ON REDIRECT <id> NOLOOP` to a subscribed second client) to tell what the
//!    difference comes from; the order rotates
//!    from batch to batch. Printed: medians of the batch means, the median (and quartiles)
//!    of the ratios of batches run next to each other, and the server's `get` time
//!    (commandstats) and CPU time per read over each contender's batches.
//!
//! Every measuring loop runs on a runtime worker (as request handlers would), not on the
//! thread that blocks on the runtime.
//!
//! `VALKEY_SERVER=/path/to/valkey-server cargo bench --bench tracking` (`ROUNDS` overrides
//! 1 000 rounds per propagation row, `FLEET` the 200 instances, `WRITES` the 1 000 keys
//! written per repetition, `REPS` the 3 repetitions of the write phase, `BATCHES` the 201
//! batches per read contender).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::backend::tiered::InvalidationMode;
use cachet::{CacheServiceExt, RedisCacheService, TieredCacheService};
use common::{CommandStat, OrgContext};
use fred::prelude::{ClientLike, KeysInterface};
use futures_util::future::join_all;

/// A copy still in an L1 this long after the write counts as never dropped.
const NEVER: Duration = Duration::from_secs(2);
/// Keys the propagation rounds cycle through.
const PROPAGATION_KEYS: usize = 8;
/// Instances of the fan-out fleet that read the keys.
const HOLDERS: usize = 10;
/// Reads per L1-hit batch and per L2-read batch.
const HIT_BATCH: u32 = 2_000;
const MISS_BATCH: usize = 100;

/// Runs `task` on one of the runtime's workers (as a service's request handlers run), not
/// on the thread that blocks on it.
fn on_a_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    task: impl Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(async { tokio::spawn(task).await.unwrap() })
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiered instance in `mode`. Its L1 keeps entries an hour and holds every key read, so a
/// copy leaves it only when an invalidation drops it.
async fn instance(url: &str, mode: InvalidationMode, channel_prefix: &str) -> TieredCacheService {
    let instance =
        TieredCacheService::builder(RedisCacheService::builder(url).default_ttl_secs(3600))
            .invalidation(mode)
            .channel_prefix(channel_prefix)
            .l1_max_ttl(Duration::from_secs(3600))
            .l1_max_entries(100_000)
            .build()
            .await
            .unwrap();
    assert_eq!(instance.invalidation_mode(), mode);
    instance
}

fn mode_name(mode: InvalidationMode) -> &'static str {
    match mode {
        InvalidationMode::Tracking => "tracking",
        InvalidationMode::Bus => "bus",
        _ => "auto",
    }
}

fn show(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1_000.0)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// When `instance` no longer holds `key` in its L1, or `None` if it still does `NEVER` after
/// `from`. Woken by the instance's invalidation counter (which moves after the key is
/// dropped), so it does not spin.
async fn dropped_at(instance: &TieredCacheService, key: &str, from: Instant) -> Option<Instant> {
    loop {
        let seen = instance.invalidations_applied();
        if !instance.cached_locally(key) {
            return Some(Instant::now());
        }
        let left = NEVER.checked_sub(from.elapsed())?;
        instance
            .wait_for_invalidations(seen + 1, left.min(Duration::from_millis(5)))
            .await;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Writer {
    /// A plain client's raw `DEL` / `SET` (tracking mode only: the bus never hears it).
    External,
    /// `a.set`, observed on B.
    Cachet,
    /// A plain client's `FLUSHALL` (on a cluster, on every primary).
    Flush,
}

#[derive(Default)]
struct Propagation {
    latencies: Vec<Duration>,
    at_reply: usize,
    never: usize,
    not_filled: usize,
    writes: Vec<Duration>,
}

async fn propagation(
    url: String,
    mode: InvalidationMode,
    writer: Writer,
    rounds: usize,
    tag: usize,
) -> Propagation {
    let channel = format!("bench-tracking-{tag}:");
    let (a, b) = (
        instance(&url, mode, &channel).await,
        instance(&url, mode, &channel).await,
    );
    let plain = RedisCacheService::new(&url, 3600).await.unwrap();
    let client = plain.client().clone();
    let keys: Vec<String> = (0..PROPAGATION_KEYS)
        .map(|i| format!("bench:tracking:propagation:{tag}:{i}"))
        .collect();
    let value = OrgContext::sample(1);
    for key in &keys {
        a.set(key, &value, None).await.unwrap();
    }
    let mut out = Propagation::default();
    for round in 0..rounds {
        let key = &keys[round % keys.len()];
        let watchers: Vec<&TieredCacheService> = match writer {
            Writer::External | Writer::Flush => {
                // A raw SET or a flush left no value of cachet's: write one back first.
                a.set(key, &value, None).await.unwrap();
                vec![&a, &b]
            }
            Writer::Cachet => vec![&b],
        };
        let mut filled = true;
        for watcher in &watchers {
            let read = watcher.get::<OrgContext>(key).await.unwrap();
            filled &= read.is_some() && watcher.cached_locally(key);
        }
        if !filled {
            out.not_filled += 1;
            continue;
        }
        let start = Instant::now();
        match writer {
            Writer::External if round % 2 == 0 => client.del::<i64, _>(key).await.map(drop),
            Writer::External => {
                client
                    .set::<(), _, _>(key, "written by another client", None, None, false)
                    .await
            }
            Writer::Cachet => {
                a.set(key, &OrgContext::sample(round as u64), None)
                    .await
                    .unwrap();
                Ok(())
            }
            Writer::Flush if client.is_clustered() => client.flushall_cluster().await,
            Writer::Flush => client.flushall::<()>(false).await,
        }
        .unwrap();
        let replied = Instant::now();
        out.writes.push(replied - start);
        out.at_reply += watchers.iter().filter(|w| !w.cached_locally(key)).count();
        let dropped = join_all(watchers.iter().map(|w| dropped_at(w, key, replied))).await;
        for at in dropped {
            match at {
                Some(at) => out.latencies.push(at - replied),
                None => out.never += 1,
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    out
}

fn print_propagation(deployment: &str, row: &str, mut p: Propagation) {
    p.latencies.sort();
    p.writes.sort();
    let observed = p.latencies.len() + p.never;
    let figures = if p.latencies.is_empty() {
        "no copy ever dropped".to_owned()
    } else {
        format!(
            "p50 {}, p99 {}, max {}",
            show(percentile(&p.latencies, 0.5)),
            show(percentile(&p.latencies, 0.99)),
            show(*p.latencies.last().unwrap()),
        )
    };
    let write = if p.writes.is_empty() {
        String::new()
    } else {
        format!("; the write took p50 {}", show(percentile(&p.writes, 0.5)))
    };
    println!(
        "propagation, {deployment}, {row}: {figures} ({observed} copies over {} rounds; {:.1}% \
         already dropped at the reply; {} never dropped within {NEVER:?}; {} rounds skipped, \
         read did not fill){write}",
        p.writes.len(),
        100.0 * p.at_reply as f64 / observed.max(1) as f64,
        p.never,
        p.not_filled,
    );
}

fn server_label(server: &support::RedisServer) -> String {
    match server.info_field("server", "valkey_version") {
        Some(version) => format!("Valkey {version}"),
        None => format!(
            "Redis {}",
            server
                .info_field("server", "redis_version")
                .unwrap_or_default()
        ),
    }
}

fn propagation_rows(rt: &tokio::runtime::Runtime, deployment: &str, url: &str, rounds: usize) {
    let rows = [
        (
            "external DEL/SET -> A and B, tracking",
            InvalidationMode::Tracking,
            Writer::External,
        ),
        (
            "external FLUSHALL -> A and B, tracking",
            InvalidationMode::Tracking,
            Writer::Flush,
        ),
        (
            "a.set -> B, tracking",
            InvalidationMode::Tracking,
            Writer::Cachet,
        ),
        ("a.set -> B, bus", InvalidationMode::Bus, Writer::Cachet),
    ];
    for (i, (row, mode, writer)) in rows.into_iter().enumerate() {
        let outcome = on_a_worker(rt, propagation(url.to_owned(), mode, writer, rounds, i));
        print_propagation(deployment, row, outcome);
    }
}

/// This process's resident memory, MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `INFO commandstats` and the server's CPU time so far (user + sys, µs).
fn server_snapshot(server: &support::RedisServer) -> (BTreeMap<String, CommandStat>, f64) {
    let stats = common::command_stats(&server.command(&["INFO", "commandstats"]).unwrap());
    let cpu: f64 = ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .map(|field| {
            server
                .info_field("cpu", field)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap()
        })
        .sum();
    (stats, cpu * 1e6)
}

async fn build_fleet(url: &str, mode: InvalidationMode, n: usize) -> Vec<TieredCacheService> {
    let mut fleet = Vec::with_capacity(n);
    while fleet.len() < n {
        let chunk = (n - fleet.len()).min(20);
        fleet.extend(
            join_all((0..chunk).map(|_| instance(url, mode, "bench-tracking-fanout:"))).await,
        );
    }
    fleet
}

#[derive(Default)]
struct FanOut {
    writes: u64,
    /// Per command, over the write phases (`info` left out).
    stats: BTreeMap<String, CommandStat>,
    cpu_usec: f64,
    held: usize,
    expected_held: usize,
    left: usize,
    clients: String,
    rss_mib: f64,
    /// While the fleet was built (memory freed by an earlier row may be reused).
    rss_growth_mib: f64,
    built_in: Duration,
}

async fn fan_out(
    server: Arc<support::RedisServer>,
    mode: InvalidationMode,
    fleet_size: usize,
    keys: usize,
    reps: usize,
) -> FanOut {
    let rss_before = rss_mib();
    let started = Instant::now();
    let fleet = build_fleet(&server.url(), mode, fleet_size).await;
    let mut out = FanOut {
        built_in: started.elapsed(),
        rss_mib: rss_mib(),
        rss_growth_mib: rss_mib() - rss_before,
        clients: server
            .info_field("clients", "connected_clients")
            .unwrap_or_default(),
        ..FanOut::default()
    };
    let (readers, writer) = (&fleet[..HOLDERS], &fleet[HOLDERS]);
    let keys: Vec<String> = (0..keys)
        .map(|i| format!("bench:tracking:fanout:{i}"))
        .collect();
    let value = OrgContext::sample(3);
    for chunk in keys.chunks(500) {
        for result in join_all(chunk.iter().map(|k| writer.set(k, &value, None))).await {
            result.unwrap();
        }
    }
    for _ in 0..reps {
        // The holders read every key (each read tracks it, in tracking mode).
        join_all(readers.iter().map(|reader| async {
            for key in &keys {
                black_box(reader.get::<OrgContext>(key).await.unwrap().unwrap());
            }
        }))
        .await;
        out.expected_held += readers.len() * keys.len();
        out.held += readers
            .iter()
            .map(|r| keys.iter().filter(|k| r.cached_locally(k)).count())
            .sum::<usize>();
        let (stats_before, cpu_before) = server_snapshot(&server);
        for key in &keys {
            writer.set(key, &value, None).await.unwrap();
        }
        let (stats_after, cpu_after) = server_snapshot(&server);
        out.writes += keys.len() as u64;
        out.cpu_usec += cpu_after - cpu_before;
        for (name, delta) in common::command_stats_delta(&stats_before, &stats_after) {
            if name != "info" {
                let total = out.stats.entry(name).or_default();
                total.calls += delta.calls;
                total.usec += delta.usec;
            }
        }
        // Every holder's copy goes (bounded wait); what is left is counted.
        let deadline = Instant::now() + NEVER;
        let held = || {
            readers
                .iter()
                .map(|r| keys.iter().filter(|k| r.cached_locally(k)).count())
                .sum::<usize>()
        };
        while held() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.left += held();
    }
    for instance in &fleet {
        instance.shutdown().await;
    }
    out
}

fn fan_out_rows(rt: &tokio::runtime::Runtime, fleet: usize, keys: usize, reps: usize) {
    let small = HOLDERS + 1;
    println!(
        "fan-out: a fleet of tiered instances on one standalone Redis each row; {HOLDERS} of \
         them read {keys} keys, then another sets each key once ({reps} times over); server \
         cost per write over the write phases"
    );
    let mut per_write = BTreeMap::new();
    for (mode, size) in [
        (InvalidationMode::Tracking, fleet),
        (InvalidationMode::Tracking, small),
        (InvalidationMode::Bus, fleet),
        (InvalidationMode::Bus, small),
    ] {
        let server = Arc::new(support::RedisServer::start());
        let f = on_a_worker(rt, fan_out(Arc::clone(&server), mode, size, keys, reps));
        let writes = f.writes as f64;
        let stat = |name: &str| f.stats.get(name).copied().unwrap_or_default();
        let (set, publish) = (stat("set"), stat("publish"));
        let commands_usec: u64 = f.stats.values().map(|s| s.usec).sum();
        let others: Vec<String> = f
            .stats
            .iter()
            .filter(|(name, _)| !["set", "publish"].contains(&name.as_str()))
            .map(|(name, s)| format!("{name} {}", s.calls))
            .collect();
        let commandstats = commands_usec as f64 / writes;
        let cpu = f.cpu_usec / writes;
        println!(
            "fan-out, {}, {size} instances: {commandstats:.2} µs per write in commandstats \
             (set {:.2} µs/call over {} calls{}{}); server CPU {cpu:.2} µs per write (INFO cpu); \
             {} writes; holders' copies {} of {} filled, {} left after the writes; {} clients \
             connected, this process {:.0} MiB RSS ({:+.0} MiB while the fleet was built), fleet \
             built in {}",
            mode_name(mode),
            set.usec as f64 / set.calls.max(1) as f64,
            set.calls,
            if publish.calls > 0 {
                format!(
                    ", publish {:.2} µs/call over {} calls",
                    publish.usec as f64 / publish.calls as f64,
                    publish.calls
                )
            } else {
                String::new()
            },
            if others.is_empty() {
                String::new()
            } else {
                format!(", others: {}", others.join(", "))
            },
            f.writes,
            f.held,
            f.expected_held,
            f.left,
            f.clients,
            f.rss_mib,
            f.rss_growth_mib,
            show(f.built_in),
        );
        per_write.insert((mode_name(mode), size), (commandstats, cpu));
        drop(server);
    }
    let (tracking, tracking_small, bus, bus_small) = (
        per_write[&("tracking", fleet)],
        per_write[&("tracking", small)],
        per_write[&("bus", fleet)],
        per_write[&("bus", small)],
    );
    println!(
        "fan-out ratios: bus / tracking at {fleet} instances: commandstats {:.2}x, CPU {:.2}x; \
         tracking {fleet} / {small} instances: commandstats {:.2}x, CPU {:.2}x; bus {fleet} / \
         {small} instances: commandstats {:.2}x, CPU {:.2}x",
        bus.0 / tracking.0,
        bus.1 / tracking.1,
        tracking.0 / tracking_small.0,
        tracking.1 / tracking_small.1,
        bus.0 / bus_small.0,
        bus.1 / bus_small.1,
    );
}

/// Who reads in the read-cost rows.
enum Reader {
    Tiered(TieredCacheService),
    /// A raw fred client (GET of the stored bytes, no envelope, no JSON): where a difference
    /// between the two tiered modes comes from. The first client reads; the others (its
    /// invalidation connection) only need to live.
    Fred(Vec<fred::prelude::Client>),
}

impl Reader {
    async fn read(&self, key: &str) {
        match self {
            Reader::Tiered(tiered) => {
                black_box(tiered.get::<OrgContext>(key).await.unwrap().unwrap());
            }
            Reader::Fred(clients) => {
                black_box(clients[0].get::<bytes::Bytes, _>(key).await.unwrap());
            }
        }
    }

    fn not_filled(&self, keys: &[String]) -> usize {
        match self {
            Reader::Tiered(tiered) => keys.iter().filter(|k| !tiered.cached_locally(k)).count(),
            Reader::Fred(_) => 0,
        }
    }
}

/// A raw fred client (RESP2), with `CLIENT TRACKING ON REDIRECT <id> NOLOOP` to a second
/// raw client subscribed to `__redis__:invalidate` (what tracking mode runs), or not.
async fn raw_fred(url: &str, tracking: bool) -> Vec<fred::prelude::Client> {
    use fred::prelude::{Builder, ClientInterface, ClientLike, Config, PubsubInterface};
    let connect = || async {
        let client = Builder::from_config(Config::from_url(url).unwrap())
            .build()
            .unwrap();
        client.init().await.unwrap();
        client
    };
    let client = connect().await;
    if !tracking {
        return vec![client];
    }
    let invalidations = connect().await;
    let id: i64 = invalidations.client_id().await.unwrap();
    invalidations
        .subscribe("__redis__:invalidate")
        .await
        .unwrap();
    client
        .client_tracking::<fred::types::Value, _, _>(
            "on",
            Some(id),
            None,
            false,
            false,
            false,
            true,
        )
        .await
        .unwrap();
    vec![client, invalidations]
}

/// Per-batch mean costs (ns) of each contender, in batch order.
struct ReadCosts {
    names: Vec<&'static str>,
    hit: [Vec<f64>; 2],
    miss: Vec<Vec<f64>>,
    not_filled: Vec<usize>,
    /// The server's `get` calls and time, and its CPU time (µs), during each contender's
    /// L2-read batches.
    server_get: Vec<(CommandStat, f64)>,
}

async fn read_costs(server: Arc<support::RedisServer>, batches: usize) -> ReadCosts {
    let url = server.url();
    let tracking = instance(&url, InvalidationMode::Tracking, "bench-tracking-reads:").await;
    let bus = instance(&url, InvalidationMode::Bus, "bench-tracking-reads:").await;
    // Writes in tracking mode: neither fills its own L1 nor publishes anything.
    let writer = instance(&url, InvalidationMode::Tracking, "bench-tracking-reads:").await;
    let hit_key = "bench:tracking:reads:hit";
    let value = OrgContext::sample(5);
    writer.set(hit_key, &value, None).await.unwrap();
    for reader in [&tracking, &bus] {
        reader.get::<OrgContext>(hit_key).await.unwrap().unwrap();
        assert!(reader.cached_locally(hit_key));
    }
    let readers = [
        ("tiered, tracking", Reader::Tiered(tracking)),
        ("tiered, bus", Reader::Tiered(bus)),
        ("raw fred", Reader::Fred(raw_fred(&url, false).await)),
        (
            "raw fred + CLIENT TRACKING REDIRECT",
            Reader::Fred(raw_fred(&url, true).await),
        ),
    ];
    let n = readers.len();
    let miss_keys: Vec<String> = (0..batches * MISS_BATCH)
        .map(|i| format!("bench:tracking:reads:miss:{i}"))
        .collect();
    for chunk in miss_keys.chunks(500) {
        for result in join_all(chunk.iter().map(|k| writer.set(k, &value, None))).await {
            result.unwrap();
        }
    }
    let mut out = ReadCosts {
        names: readers.iter().map(|(name, _)| *name).collect(),
        hit: [Vec::new(), Vec::new()],
        miss: vec![Vec::new(); n],
        not_filled: vec![0; n],
        server_get: vec![(CommandStat::default(), 0.0); n],
    };
    for batch in 0..batches {
        // L1 hits: the two tiered instances, in alternating order.
        let pair = if batch % 2 == 0 { [0, 1] } else { [1, 0] };
        for m in pair {
            let Reader::Tiered(reader) = &readers[m].1 else {
                unreachable!()
            };
            let start = Instant::now();
            for _ in 0..HIT_BATCH {
                black_box(reader.get::<OrgContext>(hit_key).await.unwrap());
            }
            out.hit[m].push(start.elapsed().as_nanos() as f64 / f64::from(HIT_BATCH));
        }
        // L2 reads: every contender, the order rotating from batch to batch.
        let keys = &miss_keys[batch * MISS_BATCH..(batch + 1) * MISS_BATCH];
        for m in (0..n).map(|i| (i + batch) % n) {
            let reader = &readers[m].1;
            let (before, cpu_before) = server_snapshot(&server);
            let start = Instant::now();
            for key in keys {
                reader.read(key).await;
            }
            out.miss[m].push(start.elapsed().as_nanos() as f64 / keys.len() as f64);
            let (after, cpu_after) = server_snapshot(&server);
            if let Some(get) = common::command_stats_delta(&before, &after).get("get") {
                out.server_get[m].0.calls += get.calls;
                out.server_get[m].0.usec += get.usec;
            }
            out.server_get[m].1 += cpu_after - cpu_before;
            out.not_filled[m] += reader.not_filled(keys);
        }
    }
    for (_, reader) in &readers {
        if let Reader::Tiered(tiered) = reader {
            tiered.shutdown().await;
        }
    }
    writer.shutdown().await;
    out
}

/// Median and quartiles of `a[i] / b[i]`: each batch against the one next to it in time, so
/// that slow drifts of the machine cancel out.
fn paired_ratio(a: &[f64], b: &[f64]) -> String {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    ratios.sort_by(f64::total_cmp);
    let quartile = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    format!(
        "{:.3} (median of {} paired batch ratios, quartiles {:.3}..{:.3})",
        quartile(0.5),
        ratios.len(),
        quartile(0.25),
        quartile(0.75),
    )
}

fn read_rows(rt: &tokio::runtime::Runtime, batches: usize) {
    let server = Arc::new(support::RedisServer::start());
    let costs = on_a_worker(rt, read_costs(Arc::clone(&server), batches));
    println!(
        "reads, {} standalone, {batches} interleaved batches per contender (medians of the \
         batch means):",
        server_label(&server)
    );
    println!(
        "L1 hit (typed get of a key in the L1, {HIT_BATCH} per batch, the two modes \
         alternating): tracking {:.0} ns, bus {:.0} ns; tracking / bus = {}",
        median(&costs.hit[0]),
        median(&costs.hit[1]),
        paired_ratio(&costs.hit[0], &costs.hit[1]),
    );
    println!(
        "L2 read, L1 miss (get of a key this reader never read, {MISS_BATCH} per batch, the \
         order rotating; server figures over each contender's batches, the CPU one including \
         the INFO calls around each batch):"
    );
    for (m, name) in costs.names.iter().enumerate() {
        let (get, cpu) = costs.server_get[m];
        let against = match m {
            0 => format!(
                "; tracking / bus = {}",
                paired_ratio(&costs.miss[0], &costs.miss[1])
            ),
            3 => format!(
                "; / without tracking = {}",
                paired_ratio(&costs.miss[3], &costs.miss[2])
            ),
            _ => String::new(),
        };
        println!(
            "  {name}: {:.1} µs per read; server: get {:.2} µs/call, CPU {:.1} µs per read{}{}",
            median(&costs.miss[m]) / 1e3,
            get.usec as f64 / get.calls.max(1) as f64,
            cpu / get.calls.max(1) as f64,
            if costs.not_filled[m] > 0 {
                format!(" ({} reads did not fill the L1)", costs.not_filled[m])
            } else {
                String::new()
            },
            against,
        );
    }
}

fn main() {
    let rounds = env_or("ROUNDS", 1_000);
    let fleet = env_or("FLEET", 200).max(HOLDERS + 1);
    let writes = env_or("WRITES", 1_000);
    let reps = env_or("REPS", 3);
    let batches = env_or("BATCHES", 201);
    let rt = common::multi_thread_runtime();
    let started = Instant::now();

    {
        let server = support::RedisServer::start();
        let deployment = format!("{} standalone", server_label(&server));
        propagation_rows(&rt, &deployment, &server.url(), rounds);
    }
    {
        let cluster = support::RedisCluster::start();
        let deployment = format!("{} cluster (3 primaries)", server_label(cluster.node(0)));
        propagation_rows(&rt, &deployment, &cluster.url(), rounds);
        let spread: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|n| n.command(&["DBSIZE"]).unwrap_or_default())
            .collect();
        println!(
            "  (cluster: the propagation keys per primary: {})",
            spread.join(", ")
        );
    }
    {
        let server = support::RedisServer::start_valkey();
        let deployment = format!("{} standalone", server_label(&server));
        propagation_rows(&rt, &deployment, &server.url(), rounds);
    }

    fan_out_rows(&rt, fleet, writes, reps);
    read_rows(&rt, batches);
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}
