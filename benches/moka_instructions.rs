//! Instruction counts per operation, the measure that does not move with the machine's
//! noise: `scripts/bench-instructions` runs this binary under `valgrind --tool=callgrind`,
//! once with `OPS=0` and once with `OPS=N` for each contender, and divides the difference by
//! N. Run directly (`cargo bench --bench moka_instructions`), it only runs every contender
//! once as a smoke check.
//!
//! Environment: `CONTENDER` (one of the names below), `OPS` (operations to run), and
//! `RECORDER=prometheus` to install a Prometheus recorder before any cache is built (needs
//! the `metrics` feature; what an app exporting its metrics pays on each hit). The
//! `get-l1/tiered` contender starts its own redis-server (the tiered instance needs one; its
//! hits never reach it).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use cachet::{
    CacheService, CacheServiceExt, MokaCacheService, RedisCacheService, TieredCacheService,
};
use common::{OrgContext, TtlValue, decode, encode, fixture, runtime};

/// Every contender, in the order the script reports them.
const CONTENDERS: &[&str] = &[
    "get/cachet",
    "get-or-load-hit/cachet",
    // since-shared:start (scripts/bench-instructions drops these lines for builds before get_shared)
    "get-shared/cachet",
    // since-shared:end
    "get-l1/tiered",
    "get/raw-moka",
    "get/raw-mini-moka",
    "set/cachet",
    "set/raw-moka",
    "set/raw-moka-per-entry-ttl",
];

/// Installs the recorder `RECORDER` names, before any cache is built.
fn install_recorder() {
    match std::env::var("RECORDER").as_deref() {
        Err(_) | Ok("") | Ok("none") => {}
        #[cfg(feature = "metrics")]
        Ok("prometheus") => {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("the only recorder of this process");
        }
        Ok(other) => panic!("RECORDER={other:?}: `prometheus` needs the metrics feature"),
    }
}

/// A tiered instance on its own redis-server, its L1 holding every key of the fixture.
async fn tiered_l1(f: &common::Fixture) -> (support::RedisServer, Arc<dyn CacheService>) {
    let server = support::RedisServer::start();
    let tiered = TieredCacheService::builder(RedisCacheService::builder(server.url()))
        .invalidation(cachet::backend::tiered::InvalidationMode::Bus)
        .channel_prefix("bench:")
        .l1_max_ttl(Duration::from_secs(3_600))
        .build()
        .await
        .expect("a tiered instance");
    assert!(tiered.wait_until_confirmed(Duration::from_secs(30)).await);
    for (k, v) in f.keys.iter().zip(&f.values) {
        tiered.set(k, v, None).await.unwrap();
        // Read once: whatever a write leaves in the L1, every key is an L1 hit from here.
        let _ = tiered.get::<OrgContext>(k).await.unwrap();
    }
    (server, Arc::new(tiered))
}

fn run(contender: &str, ops: usize) {
    install_recorder();
    let f = fixture();
    let rt = runtime();
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let raw_moka = common::raw_moka();
    let raw_ttl = common::raw_moka_per_entry_ttl();
    let raw_mini = common::raw_mini_moka();
    rt.block_on(async {
        let l1 = match contender {
            "get-l1/tiered" => Some(tiered_l1(&f).await),
            _ => None,
        };
        // The reads need a full cache; the fill is the same whatever OPS is, so it cancels
        // out of the difference.
        for (k, v) in f.keys.iter().zip(&f.values) {
            match contender {
                "get/cachet" | "get-or-load-hit/cachet" => cache.set(k, v, None).await.unwrap(),
                // since-shared:start
                "get-shared/cachet" => {
                    cache.set(k, v, None).await.unwrap();
                    // Decoded once here, as by the first request of each org.
                    black_box(cache.get_shared::<OrgContext>(k).await.unwrap());
                }
                // since-shared:end
                "get/raw-moka" => raw_moka.insert(k.clone(), encode(v)),
                "get/raw-mini-moka" => {
                    raw_mini.insert(k.clone(), serde_json::to_string(v).unwrap())
                }
                _ => {}
            }
        }
        for op in 0..ops {
            let n = f.order[op % f.order.len()];
            let (key, value) = (&f.keys[n], &f.values[n]);
            match contender {
                "get/cachet" => {
                    black_box(cache.get::<OrgContext>(key).await.unwrap());
                }
                "get-or-load-hit/cachet" => {
                    let hit = cache
                        .get_or_load::<OrgContext, std::io::Error, _, _>(key, None, || async {
                            unreachable!("every key is cached")
                        })
                        .await;
                    black_box(hit.unwrap());
                }
                // since-shared:start
                "get-shared/cachet" => {
                    let hit = cache.get_shared::<OrgContext>(key).await.unwrap();
                    assert!(black_box(hit).is_some(), "a hit");
                }
                // since-shared:end
                "get-l1/tiered" => {
                    let (_, tiered) = l1.as_ref().expect("started above");
                    let hit = tiered.get::<OrgContext>(key).await.unwrap();
                    assert!(black_box(hit).is_some(), "an L1 hit");
                }
                "get/raw-moka" => {
                    black_box(raw_moka.get(key.as_str()).map(|b| decode(&b)));
                }
                "get/raw-mini-moka" => {
                    let json = raw_mini.get(key);
                    black_box(json.map(|j| serde_json::from_str::<OrgContext>(&j).unwrap()));
                }
                "set/cachet" => cache.set(key, value, None).await.unwrap(),
                "set/raw-moka" => raw_moka.insert(key.to_owned(), encode(value)),
                "set/raw-moka-per-entry-ttl" => {
                    let ttl = Duration::from_secs(300);
                    raw_ttl.insert(
                        key.to_owned(),
                        TtlValue {
                            bytes: encode(value),
                            ttl,
                        },
                    )
                }
                other => panic!("unknown CONTENDER {other:?}; one of {CONTENDERS:?}"),
            }
        }
    });
}

fn main() {
    let ops = std::env::var("OPS").ok().and_then(|v| v.parse().ok());
    match std::env::var("CONTENDER") {
        Ok(contender) => run(&contender, ops.unwrap_or(100_000)),
        Err(_) => {
            for contender in CONTENDERS {
                run(contender, ops.unwrap_or(1_000));
            }
            println!(
                "ran {} contenders; see scripts/bench-instructions",
                CONTENDERS.len()
            );
        }
    }
}
