//! Shared reads ([`get_shared`](crate::CacheServiceExt::get_shared) and the shared
//! cache-aside methods): the same answers as the plain reads, on every backend and
//! decorator, whether or not the backend keeps decoded values.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::load::load_ok;
use super::{OrgContext, ok};
use crate::{CacheError, CacheService, CacheServiceExt, LoadOptions, LoadSource};

/// A whole second of TTL, and a margin for a slow machine.
const PAST_ONE_SECOND: Duration = Duration::from_millis(1_600);

/// A value set is read back shared, equal to what `get` reads; a missing key is `None`.
pub async fn shared_round_trip(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org:acme");
    let value = OrgContext::sample(42);
    ok("set", cache.set(&key, &value, None).await);
    for _ in 0..3 {
        let shared = ok("get_shared", cache.get_shared::<OrgContext>(&key).await);
        assert_eq!(
            shared.as_deref(),
            Some(&value),
            "shared read of a set value"
        );
    }
    assert_eq!(ok("get", cache.get::<OrgContext>(&key).await), Some(value));
    let missing = format!("{prefix}org:missing");
    assert!(ok("get_shared", cache.get_shared::<OrgContext>(&missing).await).is_none());
}

/// A `set` replaces the shared value, `invalidate` and `invalidate_prefix` remove it: a
/// value kept decoded never outlives the bytes it came from.
pub async fn shared_value_follows_writes_and_invalidations(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}plan:acme");
    let read = || async { ok("get_shared", cache.get_shared::<String>(&key).await) };
    ok("set", cache.set(&key, &"free", None).await);
    assert_eq!(read().await.as_deref().map(String::as_str), Some("free"));
    ok("set", cache.set(&key, &"pro", None).await);
    assert_eq!(
        read().await.as_deref().map(String::as_str),
        Some("pro"),
        "after a set"
    );
    ok("invalidate", cache.invalidate(&key).await);
    assert_eq!(read().await, None, "after invalidate");
    ok("set", cache.set(&key, &"enterprise", None).await);
    assert_eq!(
        read().await.as_deref().map(String::as_str),
        Some("enterprise")
    );
    ok("invalidate_prefix", cache.invalidate_prefix(prefix).await);
    assert_eq!(read().await, None, "after invalidate_prefix");
    // Bytes written below the typed helpers, in the service's codec.
    let raw = ok(
        "encode",
        crate::codec::encode_with(cache.codec(), &key, "raw"),
    );
    ok("set_bytes", cache.set_bytes(&key, raw, None).await);
    assert_eq!(
        read().await.as_deref().map(String::as_str),
        Some("raw"),
        "after set_bytes"
    );
}

/// Bytes that are not a `T` are a `Serialization` error for a shared read too, every time,
/// and the entry stays readable as what it is; one key read as two types gives each its
/// own value.
pub async fn shared_wrong_type_is_serialization_error(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}seats");
    ok("set", cache.set(&key, &"not a number", None).await);
    for _ in 0..2 {
        match cache.get_shared::<u32>(&key).await {
            Err(CacheError::Serialization { .. }) => {}
            other => panic!("a string read as u32: {other:?}"),
        }
    }
    let text = ok("get_shared", cache.get_shared::<String>(&key).await);
    assert_eq!(text.as_deref().map(String::as_str), Some("not a number"));
    let json = ok(
        "get_shared",
        cache.get_shared::<serde_json::Value>(&key).await,
    );
    assert_eq!(json.as_deref(), Some(&serde_json::json!("not a number")));
    let again = ok("get_shared", cache.get_shared::<String>(&key).await);
    assert_eq!(again, text);
}

/// A shared value expires with its entry's TTL.
pub async fn shared_value_expires_with_its_ttl(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}short");
    ok("set", cache.set(&key, &"soon gone", Some(1)).await);
    assert!(ok("get_shared", cache.get_shared::<String>(&key).await).is_some());
    tokio::time::sleep(PAST_ONE_SECOND).await;
    assert_eq!(
        ok("get_shared", cache.get_shared::<String>(&key).await),
        None,
        "expired after 1 s TTL"
    );
}

/// `get_or_load_shared` loads a miss once and shares the hits; `get_or_load_shared_with`
/// says where the value came from, and a cached "not found" reads as nothing through
/// `get_shared` as through `get`.
pub async fn shared_cache_aside(cache: &dyn CacheService, prefix: &str) {
    let loads = AtomicUsize::new(0);
    let key = format!("{prefix}org:acme");
    let value = OrgContext::sample(7);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(value.clone())
    };
    for _ in 0..3 {
        let got: Arc<OrgContext> = load_ok(
            "get_or_load_shared",
            cache.get_or_load_shared(&key, Some(60), load).await,
        );
        assert_eq!(*got, value);
    }
    assert_eq!(loads.swap(0, Ordering::SeqCst), 1, "one load, then hits");

    let options = LoadOptions::default().ttl_secs(60).negative_ttl_secs(60);
    let with = format!("{prefix}org:with");
    let load_some = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(Some(value.clone()))
    };
    let first = load_ok(
        "get_or_load_shared_with",
        cache
            .get_or_load_shared_with(&with, &options, load_some)
            .await,
    );
    let second = load_ok(
        "get_or_load_shared_with",
        cache
            .get_or_load_shared_with(&with, &options, load_some)
            .await,
    );
    assert_eq!(
        (first.source, second.source),
        (LoadSource::Loader, LoadSource::Cache)
    );
    assert_eq!(second.value.as_deref(), Some(&value));
    assert_eq!(loads.swap(0, Ordering::SeqCst), 1);

    let unknown = format!("{prefix}org:unknown");
    let load_none = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<OrgContext>, std::io::Error>(None)
    };
    for source in [LoadSource::Loader, LoadSource::Cache] {
        let nothing = load_ok(
            "get_or_load_shared_with",
            cache
                .get_or_load_shared_with(&unknown, &options, load_none)
                .await,
        );
        assert_eq!((nothing.value, nothing.source), (None, source));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the \"not found\" is cached"
    );
    assert!(
        ok("get_shared", cache.get_shared::<OrgContext>(&unknown).await).is_none(),
        "a cached \"not found\" reads as nothing"
    );
    let framed = ok("get_shared", cache.get_shared::<OrgContext>(&with).await);
    assert_eq!(
        framed.as_deref(),
        Some(&value),
        "a framed value reads as its value"
    );
}
