//! Batches where round trips and instances meet: `get_many` of 100 keys sends one `MGET` per
//! hash slot on a real 3-primary cluster and one on a single server (counted by the
//! servers' own `INFO commandstats`), a tiered instance answers from its L1 first and
//! asks Redis for the rest only, its L1 filled by a batch follows another instance's
//! writes, and two instances loading the same keys at once load each key once in all.
//! What every backend shares is in `cachet::conformance` (batch checks). Servers run for
//! real (tests/support), never 6379.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachet::conformance::unique_prefix;
use cachet::{CacheService, CacheServiceExt, LoadOptions, RedisCacheService, TieredCacheService};
use support::{RedisCluster, RedisServer};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

/// How many times `command` ran on `server` since it started (`INFO commandstats`).
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.command(&["INFO", "commandstats"]).expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a call count")
        })
        .unwrap_or(0)
}

fn cluster_calls(cluster: &RedisCluster, command: &str) -> u64 {
    cluster
        .nodes()
        .iter()
        .map(|node| calls(node, command))
        .sum()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

/// 100 keys on a cluster: one `MGET` per hash slot the keys fall in (asked of the cluster
/// with `CLUSTER KEYSLOT`), every value in order; 100 keys under 4 hash tags: 4 `MGET`s.
/// Nothing else on this binary's cluster sends `MGET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_takes_one_round_trip_per_slot() {
    let cluster = RedisCluster::shared();
    let cache = RedisCacheService::new(&cluster.url(), 300)
        .await
        .expect("cluster");
    let prefix = unique_prefix("batch-slots");
    let plain: Vec<String> = (0..100).map(|i| format!("{prefix}org:{i}")).collect();
    let tagged: Vec<String> = (0..100)
        .map(|i| format!("{prefix}{{tenant-{}}}:org:{i}", i % 4))
        .collect();
    for (i, key) in plain.iter().chain(&tagged).enumerate() {
        if i % 3 != 0 {
            cache.set(key, &(i as u64), None).await.unwrap();
        }
    }
    for keys in [&plain, &tagged] {
        let slots: BTreeSet<String> = keys
            .iter()
            .map(|key| {
                cluster
                    .node(0)
                    .command(&["CLUSTER", "KEYSLOT", key])
                    .unwrap()
            })
            .collect();
        let before = cluster_calls(cluster, "mget");
        let found = cache.get_many::<u64>(&refs(keys)).await.unwrap();
        let sent = cluster_calls(cluster, "mget") - before;
        assert_eq!(
            sent,
            slots.len() as u64,
            "one MGET per slot for {} keys",
            keys.len()
        );
        let offset = if std::ptr::eq(keys, &plain) { 0 } else { 100 };
        for (n, value) in found.iter().enumerate() {
            let i = n + offset;
            let expected = (i % 3 != 0).then_some(i as u64);
            assert_eq!(*value, expected, "{}", keys[n]);
        }
    }
    let tags: BTreeSet<String> = tagged
        .iter()
        .map(|key| {
            cluster
                .node(0)
                .command(&["CLUSTER", "KEYSLOT", key])
                .unwrap()
        })
        .collect();
    assert_eq!(tags.len(), 4, "four hash tags, four slots");
}

/// On one server a batch of 100 keys is one `MGET`, and `get_or_load_many` of 100 missed
/// keys reads them with one `MGET` and calls its loader once with all 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_one_server_is_one_mget() {
    let server = RedisServer::start();
    let cache = RedisCacheService::new(&server.url(), 300).await.unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("org:{i}")).collect();
    let before = calls(&server, "mget");
    let found = cache.get_many::<u64>(&refs(&keys)).await.unwrap();
    assert_eq!(found, vec![None; 100]);
    assert_eq!(calls(&server, "mget") - before, 1);

    let asked = Mutex::new(Vec::new());
    let loaded = cache
        .get_or_load_many(&refs(&keys), Some(60), |missed| async {
            asked.lock().unwrap().push(missed.len());
            let values = missed.into_iter().map(|key| {
                let n: u64 = key["org:".len()..].parse().unwrap();
                (key, n)
            });
            Ok::<_, std::io::Error>(values.collect::<HashMap<_, _>>())
        })
        .await
        .unwrap();
    assert_eq!(loaded, (0..100).map(Some).collect::<Vec<_>>());
    assert_eq!(
        *asked.lock().unwrap(),
        [100],
        "one loader call with every key"
    );
    assert_eq!(
        calls(&server, "mget") - before,
        2,
        "one more MGET for the batch's read"
    );
    assert_eq!(
        cache.get_many::<u64>(&refs(&keys)).await.unwrap(),
        (0..100).map(Some).collect::<Vec<_>>(),
        "the loaded values are stored"
    );
}

async fn tiered(url: &str, channel: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(url))
        .channel_prefix(channel)
        .build()
        .await
        .expect("tiered")
}

/// A tiered instance answers a batch from its L1 first: once a batch has filled it, the
/// same batch sends no `MGET`, and a batch with 10 new keys sends one for those. A value
/// another instance then writes replaces what the batch put in the L1 (within the
/// invalidation bound), and another instance's invalidation removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_batch_reads_the_l1_first_and_follows_other_instances() {
    let server = RedisServer::start();
    let channel = unique_prefix("batch-bus");
    let a = tiered(&server.url(), &channel).await;
    let b = tiered(&server.url(), &channel).await;
    let keys: Vec<String> = (0..60).map(|i| format!("org:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        b.set(key, &(i as u64), None).await.unwrap();
    }
    let expected: Vec<Option<u64>> = (0..60).map(Some).collect();
    let first = refs(&keys[..50]);
    assert_eq!(a.get_many::<u64>(&first).await.unwrap(), expected[..50]);
    assert!(a.cached_locally(&keys[0]) && a.cached_locally(&keys[49]));
    let before = calls(&server, "mget");
    assert_eq!(a.get_many::<u64>(&first).await.unwrap(), expected[..50]);
    assert_eq!(calls(&server, "mget"), before, "all 50 from the L1");
    assert_eq!(a.get_many::<u64>(&refs(&keys)).await.unwrap(), expected);
    assert_eq!(
        calls(&server, "mget"),
        before + 1,
        "one MGET for the 10 new keys"
    );

    b.set(&keys[3], &1_000u64, None).await.unwrap();
    b.invalidate(&keys[4]).await.unwrap();
    let deadline = Instant::now() + HANG;
    loop {
        let now = a.get_many::<u64>(&[&keys[3], &keys[4]]).await.unwrap();
        if now == [Some(1_000), None] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance A still serves {now:?} after B's write and invalidation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Two tiered instances over one Redis load the same 20 keys at once, listed in opposite
/// orders, 10 rounds: each key is loaded once in all per round (the lease is the single
/// flight across instances, and a key one instance waits for is not asked for again),
/// neither batch fails or times out, and both answer every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_loading_one_batch_load_each_key_once() {
    let url = RedisServer::shared().url();
    let channel = unique_prefix("batch-cross");
    let a: Arc<dyn CacheService> = Arc::new(tiered(&url, &channel).await);
    let b: Arc<dyn CacheService> = Arc::new(tiered(&url, &channel).await);
    let options = LoadOptions::default()
        .ttl_secs(60)
        .load_timeout(Duration::from_secs(10));
    for round in 0..10 {
        let prefix = unique_prefix(&format!("cross-{round}"));
        let keys: Vec<String> = (0..20).map(|i| format!("{prefix}org:{i}")).collect();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let run = |cache: Arc<dyn CacheService>, keys: Vec<String>| {
            let loaded = Arc::clone(&loaded);
            let options = options.clone();
            tokio::spawn(async move {
                let names = refs(&keys);
                cache
                    .get_or_load_many_with(&names, &options, |missed| async move {
                        loaded.lock().unwrap().extend(missed.clone());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let values = missed.into_iter().map(|key| {
                            let n = key.len() as u64;
                            (key, n)
                        });
                        Ok::<_, std::io::Error>(values.collect::<HashMap<_, _>>())
                    })
                    .await
                    .map(|values| keys.into_iter().zip(values).collect::<Vec<_>>())
            })
        };
        let backward: Vec<String> = keys.iter().rev().cloned().collect();
        let (left, right) = tokio::time::timeout(HANG, async {
            tokio::join!(
                run(Arc::clone(&a), keys.clone()),
                run(Arc::clone(&b), backward)
            )
        })
        .await
        .expect("both batches finished (bound on a hang)");
        for (side, result) in [("A", left), ("B", right)] {
            let pairs = result
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}, {side}: {e}"));
            for (key, value) in pairs {
                assert_eq!(
                    value,
                    Some(key.len() as u64),
                    "round {round}, {side}: {key}"
                );
            }
        }
        let mut loaded = loaded.lock().unwrap().clone();
        loaded.sort();
        let mut expected = keys.clone();
        expected.sort();
        assert_eq!(
            loaded, expected,
            "round {round}: each key loaded once in all"
        );
    }
}
