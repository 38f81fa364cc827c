//! What the benchmarks share: the org-context fixture, the runtimes, the raw baselines (moka
//! and mini-moka doing the same typed work by hand), and the parsing of a server's
//! `INFO commandstats`.
#![allow(dead_code)] // each bench uses its own part

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Org contexts in the cache: a few thousand, as a multi-tenant service holds.
pub const ORGS: usize = 4_000;
/// Length of the pre-drawn random access sequence.
pub const ACCESSES: usize = 1 << 16;

/// A realistic tenant context, about 330 bytes of JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgContext {
    pub id: u64,
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub features: Vec<String>,
    pub settings: BTreeMap<String, String>,
    pub sso_issuer: Option<String>,
    pub sso_client_id: Option<String>,
    pub parent_id: Option<u64>,
    pub seats: u32,
    pub suspended: bool,
}

impl OrgContext {
    pub fn sample(n: u64) -> Self {
        OrgContext {
            id: n,
            slug: format!("org-{n}"),
            name: format!("Organisation numéro {n}"),
            plan: ["free", "pro", "enterprise"][n as usize % 3].into(),
            features: vec!["sso".into(), "audit-log".into(), "beta-search".into()],
            settings: BTreeMap::from([
                ("locale".into(), "fr-FR".into()),
                ("timezone".into(), "Europe/Paris".into()),
            ]),
            sso_issuer: Some("https://idp.example.com/realms/acme".into()),
            sso_client_id: Some(format!("client-{n}")),
            parent_id: (n % 5 == 0).then_some(n / 5),
            seats: 25,
            suspended: false,
        }
    }
}

/// Keys, values and a random access order over them (seeded: every run the same).
pub struct Fixture {
    pub keys: Vec<String>,
    pub values: Vec<OrgContext>,
    pub order: Vec<usize>,
}

pub fn fixture() -> Fixture {
    let keys: Vec<String> = (0..ORGS).map(|i| format!("org:org-{i}")).collect();
    let values = (0..ORGS as u64).map(OrgContext::sample).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let order = (0..ACCESSES).map(|_| rng.random_range(0..ORGS)).collect();
    Fixture {
        keys,
        values,
        order,
    }
}

/// Every routine runs inside the same current-thread runtime, so the harness costs the
/// same for all of them.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The runtime of the benches that talk to a server: tokio multi-thread, 2 workers (the
/// server shares the same 2 cores).
pub fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Raw moka, no expiry: the cheapest moka there is.
pub fn raw_moka() -> moka::sync::Cache<String, Bytes> {
    moka::sync::Cache::new(10_000)
}

/// A value with its own TTL, for raw moka with per-entry expiry.
#[derive(Clone)]
pub struct TtlValue {
    pub bytes: Bytes,
    pub ttl: Duration,
}

struct TtlExpiry;

impl moka::Expiry<String, TtlValue> for TtlExpiry {
    fn expire_after_create(&self, _: &String, v: &TtlValue, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &TtlValue,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// Raw moka with a per-entry TTL (moka's `Expiry`): the same work cachet's backend does.
pub fn raw_moka_per_entry_ttl() -> moka::sync::Cache<String, TtlValue> {
    moka::sync::Cache::builder()
        .max_capacity(10_000)
        .expire_after(TtlExpiry)
        .build()
}

/// The design cachet replaces: mini-moka, 10 000 entries, 300 s TTL, JSON strings.
pub fn raw_mini_moka() -> mini_moka::sync::Cache<String, String> {
    mini_moka::sync::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(300))
        .build()
}

/// The fastest safe decode of stored bytes, the one cachet uses: check UTF-8, parse `&str`.
pub fn decode(bytes: &[u8]) -> OrgContext {
    serde_json::from_str(std::str::from_utf8(bytes).unwrap()).unwrap()
}

pub fn encode(value: &OrgContext) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap())
}

/// Fills the three read contenders with the fixture, each cache in a loop of its own, so
/// that no contender's entries sit interleaved with another's in memory (that alone moves
/// results by 20%).
pub async fn fill_for_reads(
    f: &Fixture,
    cache: &dyn cachet::CacheService,
    raw_moka: &moka::sync::Cache<String, Bytes>,
    raw_mini: &mini_moka::sync::Cache<String, String>,
) {
    use cachet::CacheServiceExt;
    for (k, v) in f.keys.iter().zip(&f.values) {
        cache.set(k, v, None).await.unwrap();
    }
    for (k, v) in f.keys.iter().zip(&f.values) {
        raw_moka.insert(k.clone(), encode(v));
    }
    for (k, v) in f.keys.iter().zip(&f.values) {
        raw_mini.insert(k.clone(), serde_json::to_string(v).unwrap());
    }
}

/// One command's line of `INFO commandstats`: calls and total microseconds since the server
/// started (the commands scripts run count too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandStat {
    pub calls: u64,
    pub usec: u64,
}

/// Every command of an `INFO commandstats` reply (`cmdstat_<name>:calls=N,usec=U,...`), by
/// lowercase name.
pub fn command_stats(info: &str) -> BTreeMap<String, CommandStat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim_end().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((
                name.to_owned(),
                CommandStat {
                    calls: field("calls")?,
                    usec: field("usec")?,
                },
            ))
        })
        .collect()
}

/// `after - before`, per command, for the commands that ran in between.
pub fn command_stats_delta(
    before: &BTreeMap<String, CommandStat>,
    after: &BTreeMap<String, CommandStat>,
) -> BTreeMap<String, CommandStat> {
    after
        .iter()
        .filter_map(|(name, stat)| {
            let was = before.get(name).copied().unwrap_or_default();
            let delta = CommandStat {
                calls: stat.calls - was.calls,
                usec: stat.usec - was.usec,
            };
            (delta.calls > 0).then(|| (name.clone(), delta))
        })
        .collect()
}
