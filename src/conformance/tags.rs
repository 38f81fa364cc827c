//! Tags on any service: [`set_tagged`](crate::CacheServiceExt::set_tagged) entries are
//! served by `get`, `get_many` and `get_shared` until
//! [`invalidate_tag`](crate::CacheService::invalidate_tag) of one of their tags, entries of
//! other tags and untagged ones are untouched, entries tagged afterwards are served, and bad
//! tags and corrupt tagged bytes are clear errors that store nothing.

use std::sync::Arc;

use bytes::Bytes;

use super::{OrgContext, ok};
use crate::{CacheError, CacheService, CacheServiceExt};

/// What `get`, `get_shared` and `get_many` each answer for `keys`, which must agree.
async fn read_all(cache: &dyn CacheService, keys: &[&str]) -> Vec<Option<OrgContext>> {
    let many = ok("get_many", cache.get_many::<OrgContext>(keys).await);
    for (key, batched) in keys.iter().zip(&many) {
        let single = ok("get", cache.get::<OrgContext>(key).await);
        assert_eq!(&single, batched, "get and get_many agree on {key}");
        let shared = ok("get_shared", cache.get_shared::<OrgContext>(key).await);
        assert_eq!(
            shared.as_deref(),
            batched.as_ref(),
            "get_shared agrees on {key}"
        );
    }
    many
}

/// Four entries: tagged `t`, tagged `t` and `u`, tagged `u`, untagged. `invalidate_tag(t)`
/// hides the first two only; `invalidate_tag(u)` then the third; an entry tagged `t` after
/// the invalidation is served.
pub async fn invalidate_tag_hides_exactly_its_entries(cache: &dyn CacheService, prefix: &str) {
    let names: Vec<String> = ["tg:a", "tg:b", "tg:c", "tg:d"]
        .iter()
        .map(|name| format!("{prefix}{name}"))
        .collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let (t, u) = (format!("{prefix}user:42"), format!("{prefix}org:acme"));
    let sample = |n| Some(OrgContext::sample(n));
    ok(
        "set_tagged",
        cache
            .set_tagged(keys[0], &OrgContext::sample(0), None, &[&t])
            .await,
    );
    ok(
        "set_tagged",
        cache
            .set_tagged(keys[1], &OrgContext::sample(1), Some(60), &[&t, &u])
            .await,
    );
    ok(
        "set_tagged",
        cache
            .set_tagged(keys[2], &OrgContext::sample(2), None, &[&u])
            .await,
    );
    ok(
        "set",
        cache.set(keys[3], &OrgContext::sample(3), None).await,
    );
    assert_eq!(
        read_all(cache, &keys).await,
        [sample(0), sample(1), sample(2), sample(3)],
        "every entry served before any invalidation"
    );

    ok("invalidate_tag", cache.invalidate_tag(&t).await);
    assert_eq!(
        read_all(cache, &keys).await,
        [None, None, sample(2), sample(3)],
        "the entries tagged {t} are gone, the others stay"
    );
    ok("invalidate_tag", cache.invalidate_tag(&u).await);
    assert_eq!(read_all(cache, &keys).await, [None, None, None, sample(3)]);

    ok(
        "set_tagged",
        cache
            .set_tagged(keys[0], &OrgContext::sample(10), None, &[&t])
            .await,
    );
    assert_eq!(
        read_all(cache, &keys).await,
        [sample(10), None, None, sample(3)],
        "tagged after the invalidation: served"
    );
    let shared: Arc<OrgContext> = ok("get_shared", cache.get_shared(keys[0]).await).unwrap();
    assert_eq!(*shared, OrgContext::sample(10));
}

/// A tag never used can be invalidated; tags are literal strings (glob characters
/// included): invalidating `user:*` leaves `user:1` alone; an entry written again with a tag
/// replaces the value and is served.
pub async fn tags_are_literal_and_unused_tags_are_fine(cache: &dyn CacheService, prefix: &str) {
    ok(
        "invalidate_tag",
        cache.invalidate_tag(&format!("{prefix}never-used")).await,
    );
    let key = format!("{prefix}tg:glob");
    let literal = format!("{prefix}user:1");
    ok(
        "set_tagged",
        cache
            .set_tagged(&key, &OrgContext::sample(1), None, &[&literal])
            .await,
    );
    for glob in ["user:*", "user:?", "user:[1]", "user:\\1", "user:"] {
        ok(
            "invalidate_tag",
            cache.invalidate_tag(&format!("{prefix}{glob}")).await,
        );
    }
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(1)),
        "no glob tag matched the literal {literal}"
    );
    ok(
        "set_tagged",
        cache
            .set_tagged(&key, &OrgContext::sample(2), None, &[&literal])
            .await,
    );
    assert_eq!(
        ok("get", cache.get::<OrgContext>(&key).await),
        Some(OrgContext::sample(2))
    );
}

/// Bad arguments are `InvalidArgument` and store nothing: no tags, 65 tags, an empty tag, a
/// tag of 1025 bytes, a zero TTL. `invalidate_tag` of an empty tag too.
pub async fn bad_tags_are_invalid_arguments(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}tg:bad");
    let many: Vec<String> = (0..65).map(|i| format!("{prefix}t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let long = "x".repeat(1025);
    let cases: [(&str, &[&str], Option<u64>); 5] = [
        ("no tags", &[], None),
        ("65 tags", &many, None),
        ("an empty tag", &[""], None),
        ("a 1025-byte tag", &[&long], None),
        ("a zero TTL", &["ok"], Some(0)),
    ];
    for (what, tags, ttl) in cases {
        match cache.set_tagged(&key, &1u32, ttl, tags).await {
            Err(CacheError::InvalidArgument { .. }) => {}
            other => panic!("set_tagged with {what}: expected InvalidArgument, got {other:?}"),
        }
        assert_eq!(
            ok("get_bytes", cache.get_bytes(&key).await),
            None,
            "set_tagged with {what} stored nothing"
        );
    }
    assert!(matches!(
        cache.invalidate_tag("").await,
        Err(CacheError::InvalidArgument { .. })
    ));
    let max: Vec<String> = (0..64).map(|i| format!("{prefix}t{i}")).collect();
    let max: Vec<&str> = max.iter().map(String::as_str).collect();
    let longest = format!("{prefix}{}", "y".repeat(1024 - prefix.len()));
    ok("64 tags", cache.set_tagged(&key, &1u32, None, &max).await);
    ok(
        "a 1024-byte tag",
        cache.set_tagged(&key, &2u32, None, &[&longest]).await,
    );
    assert_eq!(ok("get", cache.get::<u32>(&key).await), Some(2));
}

/// Tagged bytes cut short or with an unknown format version are a `CacheError::Integrity`
/// naming the key, for `get` and `get_many` alike, and stay stored.
pub async fn corrupt_tagged_bytes_are_integrity_errors(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}tg:corrupt");
    for corrupt in [
        &b"\0ct"[..],
        b"\0ct\x01\x01\x00\x05ab",
        b"\0ct\x09\x01",
        b"\0ct\x01\x00{}",
    ] {
        ok(
            "set_bytes",
            cache
                .set_bytes(&key, Bytes::copy_from_slice(corrupt), None)
                .await,
        );
        for (what, result) in [
            ("get", cache.get::<u32>(&key).await.map(|_| ())),
            ("get_many", cache.get_many::<u32>(&[&key]).await.map(|_| ())),
        ] {
            match result {
                Err(error @ CacheError::Integrity { .. }) => {
                    assert!(error.to_string().contains("tg:corrupt"), "{what}: {error}");
                }
                other => panic!("{what} of {corrupt:?}: expected Integrity, got {other:?}"),
            }
        }
        assert!(ok("get_bytes", cache.get_bytes(&key).await).is_some());
    }
}
