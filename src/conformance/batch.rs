//! Batches on any service: [`get_many`](crate::CacheServiceExt::get_many) answers every key
//! in order, and [`get_or_load_many`](crate::CacheServiceExt::get_or_load_many) calls its
//! loader once with exactly the keys that missed, caches what it returns (and, with negative
//! caching, what it leaves out), awaits a key another caller is loading instead of asking
//! for it again, and never deadlocks two batches that lead each other's keys.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::load::load_ok;
use super::{OrgContext, ok};
use crate::{CacheError, CacheService, CacheServiceExt, LoadError, LoadOptions};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

/// The loaders' error.
#[derive(Debug, PartialEq)]
struct StoreDown;

impl std::fmt::Display for StoreDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("store down")
    }
}

impl std::error::Error for StoreDown {}

fn keys(prefix: &str, names: &[&str]) -> Vec<String> {
    names.iter().map(|name| format!("{prefix}{name}")).collect()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

/// `get_many` answers each key in the order given: values, `None` for missing, expired and
/// invalidated keys, a key given twice twice; an empty batch is empty; bytes that are not
/// the type asked for are a `Serialization` error naming the key.
pub async fn get_many_answers_every_key_in_order(cache: &dyn CacheService, prefix: &str) {
    let names = keys(prefix, &["b:1", "b:2", "b:3", "b:gone", "b:missing"]);
    for (i, key) in names.iter().enumerate().take(4) {
        ok(
            "set",
            cache.set(key, &OrgContext::sample(i as u64), None).await,
        );
    }
    ok("invalidate", cache.invalidate(&names[3]).await);
    let asked = [
        &names[2], &names[4], &names[0], &names[3], &names[2], &names[1],
    ];
    let asked: Vec<&str> = asked.iter().map(|key| key.as_str()).collect();
    let found = ok("get_many", cache.get_many::<OrgContext>(&asked).await);
    let sample = |n| Some(OrgContext::sample(n));
    assert_eq!(
        found,
        [sample(2), None, sample(0), None, sample(2), sample(1)],
        "one answer per key, in the order given"
    );
    let bytes = ok("get_many_bytes", cache.get_many_bytes(&asked).await);
    for (key, stored) in asked.iter().zip(&bytes) {
        let single = ok("get_bytes", cache.get_bytes(key).await);
        assert_eq!(
            stored, &single,
            "get_many_bytes and get_bytes agree on {key}"
        );
    }
    let none: Vec<Option<OrgContext>> = ok("empty get_many", cache.get_many(&[]).await);
    assert!(none.is_empty());

    let corrupt = format!("{prefix}b:corrupt");
    ok(
        "set_bytes",
        cache
            .set_bytes(&corrupt, Bytes::from_static(b"\xff\x00not a value"), None)
            .await,
    );
    match cache
        .get_many::<OrgContext>(&[names[0].as_str(), corrupt.as_str()])
        .await
    {
        Err(error @ CacheError::Serialization { .. }) => {
            assert!(error.to_string().contains("b:corrupt"), "{error}");
        }
        other => panic!("corrupt bytes in a batch: expected Serialization, got {other:?}"),
    }
}

/// A batch with a cached key, two missing ones and a duplicate calls the loader once, with
/// the missing keys only (each once); the values come back in the order given and are
/// cached; a key the loader leaves out is `None` and, without negative caching, is asked for
/// again next time. A batch of cached keys does not call the loader.
pub async fn load_many_asks_for_exactly_the_missed_keys(cache: &dyn CacheService, prefix: &str) {
    let names = keys(prefix, &["lm:cached", "lm:a", "lm:b", "lm:unknown"]);
    ok(
        "set",
        cache.set(&names[0], &OrgContext::sample(0), None).await,
    );
    let calls = Mutex::new(Vec::new());
    let loader = |asked: Vec<String>| async {
        calls.lock().unwrap().push(asked.clone());
        let mut found = HashMap::new();
        for key in asked {
            if let Some(n) = ["lm:a", "lm:b"].iter().position(|s| key.ends_with(s)) {
                found.insert(key, OrgContext::sample(n as u64 + 1));
            }
        }
        Ok::<_, StoreDown>(found)
    };
    let asked = [&names[1], &names[0], &names[3], &names[2], &names[1]];
    let asked: Vec<&str> = asked.iter().map(|key| key.as_str()).collect();
    let values = load_ok(
        "get_or_load_many",
        cache.get_or_load_many(&asked, Some(60), loader).await,
    );
    let sample = |n| Some(OrgContext::sample(n));
    assert_eq!(values, [sample(1), sample(0), None, sample(2), sample(1)]);
    {
        let mut calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "one loader call: {calls:?}");
        calls[0].sort();
        let mut expected = vec![names[1].clone(), names[2].clone(), names[3].clone()];
        expected.sort();
        assert_eq!(calls[0], expected, "exactly the missed keys, each once");
        calls.clear();
    }
    for (key, n) in [(&names[1], 1), (&names[2], 2)] {
        assert_eq!(
            ok("get", cache.get::<OrgContext>(key).await),
            sample(n),
            "{key} cached"
        );
    }
    assert_eq!(ok("get", cache.get::<OrgContext>(&names[3]).await), None);

    let again = load_ok(
        "get_or_load_many",
        cache
            .get_or_load_many(&refs(&names), Some(60), loader)
            .await,
    );
    assert_eq!(again, [sample(0), sample(1), sample(2), None]);
    assert_eq!(
        *calls.lock().unwrap(),
        [vec![names[3].clone()]],
        "only the key not found is asked for again (no negative caching)"
    );

    let cached = refs(&names[..3]);
    let all_cached = cache
        .get_or_load_many::<OrgContext, StoreDown, _, _>(&cached, Some(60), |_| async {
            panic!("not called: every key is cached")
        })
        .await;
    assert_eq!(
        load_ok("cached batch", all_cached),
        [sample(0), sample(1), sample(2)]
    );
}

/// With negative caching, a key the loader leaves out is cached as "not found": the next
/// batch answers `None` for it without calling the loader. A loader error fails the call
/// and caches nothing.
pub async fn load_many_caches_not_found_and_never_errors(cache: &dyn CacheService, prefix: &str) {
    let names = keys(prefix, &["ln:found", "ln:nope"]);
    let options = LoadOptions::default().ttl_secs(60).negative_ttl_secs(30);
    let failed = cache
        .get_or_load_many_with::<OrgContext, _, _, _>(&refs(&names), &options, |_| async {
            Err(StoreDown)
        })
        .await;
    match failed {
        Err(LoadError::Loader { source, .. }) => assert_eq!(*source, StoreDown),
        other => panic!("a failing loader: expected LoadError::Loader, got {other:?}"),
    }
    for key in &names {
        assert_eq!(
            ok("get_bytes", cache.get_bytes(key).await),
            None,
            "nothing cached"
        );
    }
    let found = names[0].clone();
    let first = cache
        .get_or_load_many_with(&refs(&names), &options, |asked| async move {
            assert_eq!(asked.len(), 2);
            Ok::<_, StoreDown>(HashMap::from([(found, OrgContext::sample(7))]))
        })
        .await;
    assert_eq!(
        load_ok("first batch", first),
        [Some(OrgContext::sample(7)), None]
    );
    let again = cache
        .get_or_load_many_with::<OrgContext, StoreDown, _, _>(&refs(&names), &options, |_| async {
            panic!("not called: the value and the \"not found\" are cached")
        })
        .await;
    assert_eq!(
        load_ok("second batch", again),
        [Some(OrgContext::sample(7)), None]
    );
}

/// A key that a single `get_or_load` is loading when the batch misses it is awaited, not
/// asked for again: the batch's loader gets only the other key, and the batch answers the
/// single load's value for the shared one.
pub async fn load_many_awaits_a_key_another_caller_loads(cache: &dyn CacheService, prefix: &str) {
    let names = keys(prefix, &["lw:shared", "lw:own"]);
    let started = Notify::new();
    let single_loads = AtomicUsize::new(0);
    let single = async {
        cache
            .get_or_load(&names[0], Some(60), || async {
                single_loads.fetch_add(1, Ordering::SeqCst);
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, StoreDown>(OrgContext::sample(1))
            })
            .await
    };
    let asked = Mutex::new(Vec::new());
    let batch = async {
        started.notified().await;
        cache
            .get_or_load_many(&refs(&names), Some(60), |keys| async {
                asked.lock().unwrap().extend(keys.clone());
                Ok::<_, StoreDown>(
                    keys.into_iter()
                        .map(|key| (key, OrgContext::sample(2)))
                        .collect(),
                )
            })
            .await
    };
    let (single, batch) = tokio::time::timeout(HANG, async { tokio::join!(single, batch) })
        .await
        .expect("both finished (bound on a hang)");
    assert_eq!(load_ok("single", single), OrgContext::sample(1));
    assert_eq!(
        load_ok("batch", batch),
        [Some(OrgContext::sample(1)), Some(OrgContext::sample(2))],
        "the shared key has the single load's value"
    );
    assert_eq!(
        *asked.lock().unwrap(),
        [names[1].clone()],
        "only the batch's own key"
    );
    assert_eq!(single_loads.load(Ordering::SeqCst), 1);
}

/// Two batches that miss the same keys at once, listed in opposite orders, both finish and
/// load each key once in all (the second awaits what the first leads).
pub async fn crossed_batches_load_each_key_once(cache: &dyn CacheService, prefix: &str) {
    let names = keys(prefix, &["lx:1", "lx:2", "lx:3", "lx:4"]);
    let loaded = Mutex::new(Vec::new());
    let options = LoadOptions::default()
        .ttl_secs(60)
        .load_timeout(Duration::from_secs(10));
    let loader = |keys: Vec<String>| async {
        loaded.lock().unwrap().extend(keys.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let values = keys.into_iter().map(|key| {
            let n = key.len() as u64;
            (key, OrgContext::sample(n))
        });
        Ok::<_, StoreDown>(values.collect::<HashMap<_, _>>())
    };
    let forward = refs(&names);
    let backward: Vec<&str> = forward.iter().rev().copied().collect();
    let (a, b) = tokio::time::timeout(HANG, async {
        tokio::join!(
            cache.get_or_load_many_with(&forward, &options, loader),
            cache.get_or_load_many_with(&backward, &options, loader),
        )
    })
    .await
    .expect("both batches finished (bound on a hang)");
    let a = load_ok("forward batch", a);
    let b = load_ok("backward batch", b);
    for (i, key) in names.iter().enumerate() {
        let expected = Some(OrgContext::sample(key.len() as u64));
        assert_eq!(a[i], expected, "{key} in the forward batch");
        assert_eq!(
            b[names.len() - 1 - i],
            expected,
            "{key} in the backward batch"
        );
    }
    let mut loaded = loaded.lock().unwrap().clone();
    loaded.sort();
    assert_eq!(loaded, names, "each key loaded once in all");
}
