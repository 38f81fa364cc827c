//! The in-memory backend's cost ratios, measured interleaved: each round runs every
//! contender for the same number of operations, one after the other, and the report gives
//! the median over rounds. On a small shared machine this is steadier than timing each
//! contender in its own stretch (what criterion does in `benches/moka.rs`).
//!
//! `cargo bench --bench moka_ratios` (`ROUNDS`, `OPS` override the defaults 15 and 200 000).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet::{CacheService, CacheServiceExt, MokaCacheService};
use common::{ACCESSES, OrgContext, TtlValue, decode, encode, fixture, runtime};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs each contender `ops` times per round for `rounds` rounds, in an order that rotates
/// every round; the median ns per op of each.
async fn interleaved<const N: usize>(
    rounds: usize,
    ops: usize,
    mut run: impl AsyncFnMut(usize, usize),
) -> [f64; N] {
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); N];
    for round in 0..rounds {
        // Rotate who goes first, so that no contender always follows the same other one.
        for k in 0..N {
            let which = (k + round) % N;
            let start = Instant::now();
            for op in 0..ops {
                run(which, (op + round * 7919) % ACCESSES).await;
            }
            samples[which].push(start.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    samples.map_or_else_median()
}

trait Median<const N: usize> {
    fn map_or_else_median(self) -> [f64; N];
}

impl<const N: usize> Median<N> for Vec<Vec<f64>> {
    fn map_or_else_median(mut self) -> [f64; N] {
        let mut out = [0.0; N];
        for (slot, times) in out.iter_mut().zip(self.iter_mut()) {
            times.sort_by(f64::total_cmp);
            *slot = times[times.len() / 2];
        }
        out
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood here.
    let rounds = env_or("ROUNDS", 15);
    let ops = env_or("OPS", 200_000);
    let f = fixture();
    let rt = runtime();
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let raw_moka = common::raw_moka();
    let raw_mini = common::raw_mini_moka();

    rt.block_on(async {
        common::fill_for_reads(&f, &*cache, &raw_moka, &raw_mini).await;
        // Every entry decoded once for the shared reads (as the first request of each org
        // would); the rounds then measure hits.
        for key in &f.keys {
            black_box(cache.get_shared::<OrgContext>(key).await.unwrap());
        }
        // The floor: raw moka holding decoded values (`Arc<OrgContext>`), no bytes at all.
        let raw_objects: moka::sync::Cache<String, Arc<OrgContext>, ahash::RandomState> =
            moka::sync::Cache::builder()
                .max_capacity(f.keys.len() as u64 * 2)
                .build_with_hasher(ahash::RandomState::new());
        for (key, value) in f.keys.iter().zip(&f.values) {
            raw_objects.insert(key.clone(), Arc::new(value.clone()));
        }
        // The same floor with cachet's store configuration: per-entry expiry (moka's
        // `Expiry`), which every cachet read pays.
        let raw_objects_ttl: moka::sync::Cache<String, TtlObject, ahash::RandomState> =
            moka::sync::Cache::builder()
                .max_capacity(f.keys.len() as u64 * 2)
                .expire_after(TtlObjectExpiry)
                .build_with_hasher(ahash::RandomState::new());
        for (key, value) in f.keys.iter().zip(&f.values) {
            let object = TtlObject(Arc::new(value.clone()), std::time::Duration::from_secs(300));
            raw_objects_ttl.insert(key.clone(), object);
        }
        let [cachet, shared, moka, mini, objects, objects_ttl] =
            interleaved::<6>(rounds, ops, async |which, i| {
            let key = &f.keys[f.order[i]];
            match which {
                0 => {
                    black_box(cache.get::<OrgContext>(key).await.unwrap());
                }
                1 => {
                    black_box(cache.get_shared::<OrgContext>(key).await.unwrap());
                }
                2 => {
                    black_box(decode(&raw_moka.get(key.as_str()).unwrap()));
                }
                3 => {
                    let json = raw_mini.get(key).unwrap();
                    black_box(serde_json::from_str::<OrgContext>(&json).unwrap());
                }
                4 => {
                    black_box(raw_objects.get(key.as_str()).unwrap());
                }
                _ => {
                    black_box(raw_objects_ttl.get(key.as_str()).unwrap().0);
                }
            }
        })
        .await;
        println!(
            "typed get hit, ns/op (median of {rounds} interleaved rounds of {ops}): \
             cachet get {cachet:.0}, cachet get_shared {shared:.0}, raw moka + decode {moka:.0}, \
             raw mini-moka + from_str {mini:.0}"
        );
        println!(
            "  ratio cachet / raw moka = {:.3}, cachet / raw mini-moka = {:.3}",
            cachet / moka,
            cachet / mini
        );
        println!(
            "  get_shared: {:.1}x as fast as raw mini-moka + from_str, {:.1}x as fast as get; \
             raw moka of Arc<OrgContext> (no bytes, the floor) {objects:.0}, get_shared / it = {:.2}",
            mini / shared,
            cachet / shared,
            shared / objects
        );
        println!(
            "  the floor with per-entry expiry (cachet's store configuration) {objects_ttl:.0}: \
             {:.1}x as fast as raw mini-moka + from_str; get_shared / it = {:.2}",
            mini / objects_ttl,
            shared / objects_ttl
        );

        // Fresh caches for the writes.
        let raw_moka_ttl = common::raw_moka_per_entry_ttl();
        let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
        let raw_moka = common::raw_moka();
        let [cachet, moka, moka_ttl] = interleaved::<3>(rounds, ops, async |which, i| {
            let n = f.order[i];
            let (key, value) = (&f.keys[n], &f.values[n]);
            match which {
                0 => cache.set(key, value, None).await.unwrap(),
                1 => raw_moka.insert(key.to_owned(), encode(value)),
                _ => {
                    let ttl = Duration::from_secs(300);
                    raw_moka_ttl.insert(
                        key.to_owned(),
                        TtlValue {
                            bytes: encode(value),
                            ttl,
                        },
                    )
                }
            }
        })
        .await;
        println!(
            "typed set, ns/op: cachet {cachet:.0}, raw moka insert + encode {moka:.0}, \
             raw moka per-entry TTL insert + encode {moka_ttl:.0}"
        );
        println!(
            "  ratio cachet / raw moka = {:.3}, cachet / raw moka per-entry TTL = {:.3}",
            cachet / moka,
            cachet / moka_ttl
        );
    });
}

/// A decoded value with its own TTL, for the floor with per-entry expiry.
#[derive(Clone)]
struct TtlObject(Arc<OrgContext>, std::time::Duration);

struct TtlObjectExpiry;

impl moka::Expiry<String, TtlObject> for TtlObjectExpiry {
    fn expire_after_create(
        &self,
        _: &String,
        v: &TtlObject,
        _: std::time::Instant,
    ) -> Option<std::time::Duration> {
        Some(v.1)
    }
}
