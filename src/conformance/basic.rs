//! The contract every backend keeps: typed round trips, TTLs, invalidation, bad stored
//! bytes, unusual keys and values, concurrent use.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use super::{OrgContext, ok};
use crate::{CacheError, CacheService, CacheServiceExt};

/// How long a check waits for a 1 s TTL to pass: generous, never a timing assert.
const PAST_ONE_SECOND: Duration = Duration::from_millis(1_600);

/// A typed org context (nested structs, options, lists, maps, unicode) round-trips.
pub async fn typed_round_trip(cache: &dyn CacheService, prefix: &str) {
    for n in 0..6 {
        let key = format!("{prefix}org:{n}");
        let ctx = OrgContext::sample(n);
        ok("set", cache.set(&key, &ctx, Some(300)).await);
        let got: Option<OrgContext> = ok("get", cache.get(&key).await);
        assert_eq!(got, Some(ctx), "round trip of {key}");
    }
}

/// Strings, numbers, lists and maps round-trip through the typed helpers.
pub async fn typed_primitives_round_trip(cache: &dyn CacheService, prefix: &str) {
    let k = |s: &str| format!("{prefix}{s}");
    ok("set", cache.set(&k("s"), "héllo\0world", None).await);
    ok("set", cache.set(&k("n"), &u64::MAX, None).await);
    ok("set", cache.set(&k("i"), &i64::MIN, None).await);
    ok("set", cache.set(&k("f"), &-1.5e-300_f64, None).await);
    ok("set", cache.set(&k("v"), &vec![1u8, 2, 3], None).await);
    let map = BTreeMap::from([("a".to_string(), vec![Some(1)]), ("b".into(), vec![None])]);
    ok("set", cache.set(&k("m"), &map, None).await);
    assert_eq!(
        ok("get", cache.get::<String>(&k("s")).await).as_deref(),
        Some("héllo\0world")
    );
    assert_eq!(ok("get", cache.get::<u64>(&k("n")).await), Some(u64::MAX));
    assert_eq!(ok("get", cache.get::<i64>(&k("i")).await), Some(i64::MIN));
    assert_eq!(ok("get", cache.get::<f64>(&k("f")).await), Some(-1.5e-300));
    assert_eq!(
        ok("get", cache.get::<Vec<u8>>(&k("v")).await),
        Some(vec![1, 2, 3])
    );
    assert_eq!(ok("get", cache.get(&k("m")).await), Some(map));
}

/// A stored `None` (JSON `null`) reads back as `Some(None)`, distinct from a missing key.
pub async fn stored_null_is_not_missing(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}nothing");
    ok(
        "set",
        cache.set(&key, &Option::<OrgContext>::None, None).await,
    );
    let got: Option<Option<OrgContext>> = ok("get", cache.get(&key).await);
    assert_eq!(got, Some(None), "a stored null must not look like a miss");
}

/// A key never written is `Ok(None)`, both typed and as bytes.
pub async fn missing_key_is_none(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}never-written");
    assert_eq!(ok("get_bytes", cache.get_bytes(&key).await), None);
    assert_eq!(ok("get", cache.get::<OrgContext>(&key).await), None);
}

/// A second `set` replaces the first value.
pub async fn overwrite_replaces_value(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org");
    ok("set", cache.set(&key, &OrgContext::sample(1), None).await);
    ok("set", cache.set(&key, &OrgContext::sample(2), None).await);
    assert_eq!(
        ok("get", cache.get(&key).await),
        Some(OrgContext::sample(2))
    );
}

/// `Some(1)` expires the entry: present at once, gone after 1.6 s.
pub async fn ttl_expires_entry(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}short");
    ok("set", cache.set(&key, &"soon gone", Some(1)).await);
    assert!(
        ok("get", cache.get::<String>(&key).await).is_some(),
        "present right after set"
    );
    tokio::time::sleep(PAST_ONE_SECOND).await;
    assert_eq!(
        ok("get", cache.get::<String>(&key).await),
        None,
        "expired after 1 s TTL"
    );
    assert_eq!(ok("get_bytes", cache.get_bytes(&key).await), None);
}

/// `None` applies the default TTL (minutes, not seconds): such an entry outlives a `Some(1)`.
pub async fn default_ttl_outlives_short_ttl(cache: &dyn CacheService, prefix: &str) {
    let short = format!("{prefix}short");
    let default = format!("{prefix}default");
    ok("set", cache.set(&short, &1, Some(1)).await);
    ok("set", cache.set(&default, &2, None).await);
    tokio::time::sleep(PAST_ONE_SECOND).await;
    assert_eq!(ok("get", cache.get::<i32>(&short).await), None);
    assert_eq!(ok("get", cache.get::<i32>(&default).await), Some(2));
}

/// Overwriting an entry replaces its TTL too: a short TTL followed by a default one lives on.
pub async fn overwrite_resets_ttl(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    ok("set", cache.set(&key, &1, Some(1)).await);
    ok("set", cache.set(&key, &2, None).await);
    tokio::time::sleep(PAST_ONE_SECOND).await;
    assert_eq!(ok("get", cache.get::<i32>(&key).await), Some(2));
}

/// `Some(0)` is `InvalidArgument`, stores nothing, and leaves a previous value alone.
pub async fn zero_ttl_is_invalid_argument(cache: &dyn CacheService, prefix: &str) {
    let fresh = format!("{prefix}fresh");
    let err = cache
        .set(&fresh, &1, Some(0))
        .await
        .expect_err("Some(0) must fail");
    assert!(
        matches!(err, CacheError::InvalidArgument { .. }),
        "got {err:?}"
    );
    assert_eq!(ok("get", cache.get::<i32>(&fresh).await), None);

    let existing = format!("{prefix}existing");
    ok("set", cache.set(&existing, &1, None).await);
    let err = cache
        .set_bytes(&existing, Bytes::from_static(b"2"), Some(0))
        .await;
    assert!(
        matches!(err, Err(CacheError::InvalidArgument { .. })),
        "got {err:?}"
    );
    assert_eq!(ok("get", cache.get::<i32>(&existing).await), Some(1));
}

/// A TTL above [`MAX_TTL_SECS`](crate::MAX_TTL_SECS) is `InvalidArgument`; the maximum works.
pub async fn too_long_ttl_is_invalid_argument(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}forever");
    let err = cache.set(&key, &1, Some(u64::MAX)).await;
    assert!(
        matches!(err, Err(CacheError::InvalidArgument { .. })),
        "got {err:?}"
    );
    ok("set", cache.set(&key, &1, Some(crate::MAX_TTL_SECS)).await);
    assert_eq!(ok("get", cache.get::<i32>(&key).await), Some(1));
}

/// `invalidate` removes exactly its key: neighbours sharing a prefix stay.
pub async fn invalidate_removes_exactly_one_key(cache: &dyn CacheService, prefix: &str) {
    let keys =
        ["org:acme", "org:acme:users", "org:acm", "org:acme2"].map(|k| format!("{prefix}{k}"));
    for k in &keys {
        ok("set", cache.set(k, k, None).await);
    }
    ok("invalidate", cache.invalidate(&keys[0]).await);
    assert_eq!(ok("get", cache.get::<String>(&keys[0]).await), None);
    for k in &keys[1..] {
        assert_eq!(
            ok("get", cache.get::<String>(k).await).as_ref(),
            Some(k),
            "{k} must stay"
        );
    }
}

/// Invalidating a key that is not there is `Ok`, twice in a row too.
pub async fn invalidate_missing_key_is_ok(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}ghost");
    ok("invalidate", cache.invalidate(&key).await);
    ok("set", cache.set(&key, &1, None).await);
    ok("invalidate", cache.invalidate(&key).await);
    ok("invalidate", cache.invalidate(&key).await);
    assert_eq!(ok("get", cache.get::<i32>(&key).await), None);
}

/// `invalidate_prefix` removes every key under the prefix, returns that count, and keeps
/// the rest.
pub async fn invalidate_prefix_counts_removed(cache: &dyn CacheService, prefix: &str) {
    for i in 0..150 {
        ok(
            "set",
            cache.set(&format!("{prefix}org:acme:{i}"), &i, None).await,
        );
    }
    for i in 0..20 {
        ok(
            "set",
            cache.set(&format!("{prefix}org:acmf:{i}"), &i, None).await,
        );
    }
    ok(
        "set",
        cache.set(&format!("{prefix}org:acme"), &0, None).await,
    );
    let removed = ok(
        "invalidate_prefix",
        cache.invalidate_prefix(&format!("{prefix}org:acme:")).await,
    );
    assert_eq!(removed, 150);
    for i in [0, 77, 149] {
        assert_eq!(
            ok(
                "get",
                cache.get::<i32>(&format!("{prefix}org:acme:{i}")).await
            ),
            None
        );
    }
    assert_eq!(
        ok("get", cache.get::<i32>(&format!("{prefix}org:acme")).await),
        Some(0)
    );
    assert_eq!(
        ok(
            "get",
            cache.get::<i32>(&format!("{prefix}org:acmf:3")).await
        ),
        Some(3)
    );
    let again = ok(
        "invalidate_prefix",
        cache.invalidate_prefix(&format!("{prefix}org:acme:")).await,
    );
    assert_eq!(again, 0, "a second call finds nothing left");
}

/// `*`, `?`, `[`, `]` and `\` in a prefix are literal characters, never patterns.
pub async fn invalidate_prefix_is_literal(cache: &dyn CacheService, prefix: &str) {
    // (prefix to invalidate, keys that start with it literally, keys a glob would also hit)
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("a*b", &["a*b", "a*b:1", "a*bc"], &["axb", "aXYZb:1", "ab"]),
        ("q?r", &["q?r:1", "q?r"], &["qxr:1", "qr"]),
        ("s[ab]t", &["s[ab]t:1"], &["sat:1", "sbt:1"]),
        ("u[", &["u[:1"], &["u:1"]),
        ("v]w", &["v]w"], &["vw"]),
        ("x\\y", &["x\\y:1", "x\\y"], &["xy:1", "x\\\\y"]),
        ("z\\", &["z\\*"], &["z*", "z"]),
        ("[^m]*", &["[^m]*n"], &["n", "o*"]),
    ];
    for (case, (p, literal, glob_only)) in cases.iter().enumerate() {
        let base = format!("{prefix}{case}/");
        for k in literal.iter().chain(glob_only.iter()) {
            ok("set", cache.set(&format!("{base}{k}"), k, None).await);
        }
        let removed = ok(
            "invalidate_prefix",
            cache.invalidate_prefix(&format!("{base}{p}")).await,
        );
        assert_eq!(removed, literal.len() as u64, "prefix {p:?}");
        for k in literal.iter() {
            assert_eq!(
                ok("get", cache.get::<String>(&format!("{base}{k}")).await),
                None,
                "{k:?} under {p:?}"
            );
        }
        for k in glob_only.iter() {
            let got = ok("get", cache.get::<String>(&format!("{base}{k}")).await);
            assert_eq!(got.as_deref(), Some(*k), "{k:?} must survive prefix {p:?}");
        }
    }
}

/// A prefix that matches nothing removes nothing and returns 0.
pub async fn invalidate_prefix_without_match_is_zero(cache: &dyn CacheService, prefix: &str) {
    ok("set", cache.set(&format!("{prefix}a"), &1, None).await);
    let removed = ok(
        "invalidate_prefix",
        cache.invalidate_prefix(&format!("{prefix}b")).await,
    );
    assert_eq!(removed, 0);
    assert_eq!(
        ok("get", cache.get::<i32>(&format!("{prefix}a")).await),
        Some(1)
    );
}

/// Expired entries are not counted as removed by `invalidate_prefix`.
pub async fn invalidate_prefix_skips_expired(cache: &dyn CacheService, prefix: &str) {
    for i in 0..5 {
        ok(
            "set",
            cache.set(&format!("{prefix}gone:{i}"), &i, Some(1)).await,
        );
    }
    for i in 0..3 {
        ok(
            "set",
            cache.set(&format!("{prefix}live:{i}"), &i, None).await,
        );
    }
    tokio::time::sleep(PAST_ONE_SECOND).await;
    let removed = ok("invalidate_prefix", cache.invalidate_prefix(prefix).await);
    assert_eq!(removed, 3, "only the 3 live entries count");
}

/// Stored bytes that are not the requested type's JSON give `Serialization` naming the key
/// and type, and the entry stays as it was.
pub async fn corrupt_bytes_are_serialization_error(cache: &dyn CacheService, prefix: &str) {
    let corrupt: [&[u8]; 4] = [
        b"\xff\xfe\x00garbage",
        b"{\"id\": 1, \"slug\": ",
        b"",
        b"[1,2,3]",
    ];
    for (i, bytes) in corrupt.into_iter().enumerate() {
        let key = format!("{prefix}corrupt:{i}");
        ok(
            "set_bytes",
            cache
                .set_bytes(&key, Bytes::copy_from_slice(bytes), None)
                .await,
        );
        match cache.get::<OrgContext>(&key).await {
            Err(err @ CacheError::Serialization { .. }) => {
                let msg = err.to_string();
                assert!(
                    msg.contains(&format!("corrupt:{i}")),
                    "message names the key: {msg}"
                );
                assert!(msg.contains("OrgContext"), "message names the type: {msg}");
            }
            other => panic!("corrupt bytes {bytes:?}: expected Serialization, got {other:?}"),
        }
        let still = ok("get_bytes", cache.get_bytes(&key).await);
        assert_eq!(
            still.as_deref(),
            Some(bytes),
            "the corrupt entry is left untouched"
        );
    }
}

/// Reading a value as the wrong type is `Serialization`, not a panic or a wrong value.
pub async fn wrong_type_is_serialization_error(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org");
    ok("set", cache.set(&key, &OrgContext::sample(3), None).await);
    let err = cache.get::<Vec<u64>>(&key).await;
    assert!(
        matches!(err, Err(CacheError::Serialization { .. })),
        "got {err:?}"
    );
    assert_eq!(
        ok("get", cache.get(&key).await),
        Some(OrgContext::sample(3))
    );
}

/// The prefix alone (so, for an empty `prefix`, the empty key) is a key like any other.
pub async fn empty_key(cache: &dyn CacheService, prefix: &str) {
    ok(
        "set",
        cache.set(prefix, &"at the prefix itself", None).await,
    );
    assert_eq!(
        ok("get", cache.get::<String>(prefix).await).as_deref(),
        Some("at the prefix itself")
    );
    ok("invalidate", cache.invalidate(prefix).await);
    assert_eq!(ok("get", cache.get::<String>(prefix).await), None);
}

/// Keys with spaces, newlines, tabs, control characters, quotes, unicode and emoji are
/// distinct, opaque keys.
pub async fn unusual_keys(cache: &dyn CacheService, prefix: &str) {
    let suffixes = [
        " ",
        "  ",
        "a b",
        "line\nbreak",
        "tab\there",
        "\r\n",
        "nul\0byte",
        "\u{7f}",
        "\"quoted\"",
        "'single'",
        "東京",
        "emoji 🚀🔥",
        "עברית",
        "e\u{301}",
        "é",
        "{hash}tag",
        "%s%n",
        "$ENV",
    ];
    for (i, s) in suffixes.iter().enumerate() {
        ok("set", cache.set(&format!("{prefix}{s}"), &i, None).await);
    }
    for (i, s) in suffixes.iter().enumerate() {
        let got = ok("get", cache.get::<usize>(&format!("{prefix}{s}")).await);
        assert_eq!(got, Some(i), "key suffix {s:?}");
    }
    ok(
        "invalidate",
        cache.invalidate(&format!("{prefix}line\nbreak")).await,
    );
    assert_eq!(
        ok(
            "get",
            cache.get::<usize>(&format!("{prefix}line\nbreak")).await
        ),
        None
    );
    assert_eq!(
        ok(
            "get",
            cache.get::<usize>(&format!("{prefix}tab\there")).await
        ),
        Some(4)
    );
}

/// A 1 MiB key works, and is distinct from the same key one byte shorter.
pub async fn huge_key(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}{}", "k".repeat(1 << 20));
    let shorter = &key[..key.len() - 1];
    ok("set", cache.set(&key, &"long", None).await);
    assert_eq!(
        ok("get", cache.get::<String>(&key).await).as_deref(),
        Some("long")
    );
    assert_eq!(ok("get", cache.get::<String>(shorter).await), None);
    assert_eq!(
        ok("invalidate_prefix", cache.invalidate_prefix(&key).await),
        1
    );
}

/// An empty value is stored and read back as empty, not as missing.
pub async fn empty_value(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}empty");
    ok("set_bytes", cache.set_bytes(&key, Bytes::new(), None).await);
    assert_eq!(
        ok("get_bytes", cache.get_bytes(&key).await),
        Some(Bytes::new())
    );
    ok(
        "set",
        cache.set(&format!("{prefix}empty-string"), "", None).await,
    );
    assert_eq!(
        ok(
            "get",
            cache.get::<String>(&format!("{prefix}empty-string")).await
        )
        .as_deref(),
        Some("")
    );
}

/// Arbitrary binary values (every byte value, invalid UTF-8) round-trip as bytes.
pub async fn binary_value(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}binary");
    let value: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    ok(
        "set_bytes",
        cache
            .set_bytes(&key, Bytes::from(value.clone()), None)
            .await,
    );
    assert_eq!(
        ok("get_bytes", cache.get_bytes(&key).await).as_deref(),
        Some(&value[..])
    );
}

/// A 16 MiB value round-trips intact.
pub async fn huge_value(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}huge");
    let value: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    ok(
        "set_bytes",
        cache
            .set_bytes(&key, Bytes::from(value.clone()), None)
            .await,
    );
    let got = ok("get_bytes", cache.get_bytes(&key).await).expect("16 MiB value present");
    assert_eq!(got.len(), value.len());
    assert!(got == value, "16 MiB value differs after the round trip");
}

/// 64 concurrent tasks, each writing and reading its own keys, all see their own values.
pub async fn concurrent_tasks(cache: &dyn CacheService, prefix: &str) {
    let tasks = (0..64u64).map(|t| async move {
        for i in 0..25u64 {
            let key = format!("{prefix}task:{t}:{i}");
            let ctx = OrgContext::sample(t * 1000 + i);
            ok("set", cache.set(&key, &ctx, None).await);
            tokio::task::yield_now().await;
            let got: Option<OrgContext> = ok("get", cache.get(&key).await);
            assert_eq!(got, Some(ctx), "task {t} key {i}");
        }
    });
    futures_util::future::join_all(tasks).await;
    let removed = ok(
        "invalidate_prefix",
        cache.invalidate_prefix(&format!("{prefix}task:")).await,
    );
    assert_eq!(removed, 64 * 25);
}
