//! The lease rule every backend and decorator keeps (see [`crate::load::lease`]): what a
//! lease reads as, what voids it, and that a load overtaken by a change does not stay
//! cached.

use std::time::Duration;

use bytes::Bytes;

use super::ok;
use crate::load::{LeaseRead, LeaseRequest, LeaseToken};
use crate::{CacheService, CacheServiceExt, LoadOptions};

/// A lease granted on `key` with a fresh token and `ttl`.
async fn granted(cache: &dyn CacheService, key: &str, ttl: Duration) -> crate::load::Lease {
    let request = LeaseRequest {
        ttl,
        ..LeaseRequest::new()
    };
    match ok("lease", cache.lease(key, &request).await) {
        LeaseRead::Granted(lease) => lease,
        other => panic!("lease on {key:?}: expected Granted, got {other:?}"),
    }
}

fn request(token: &LeaseToken, renew: bool) -> LeaseRequest {
    LeaseRequest {
        token: token.clone(),
        renew,
        ..LeaseRequest::new()
    }
}

/// A missing key is leased; the lease reads as a miss, another caller sees it held, and
/// the holder's write-back is stored.
pub async fn lease_on_a_missing_key_reads_as_a_miss(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    let mut lease = granted(cache, &key, Duration::from_secs(30)).await;
    assert_eq!(
        ok("get", cache.get_bytes(&key).await),
        None,
        "a lease is a miss"
    );
    let typed: Option<String> = ok("get", cache.get(&key).await);
    assert_eq!(typed, None);
    match ok("lease", cache.lease(&key, &LeaseRequest::new()).await) {
        LeaseRead::Held { remaining } => assert!(remaining <= Duration::from_secs(30)),
        other => panic!("a second caller must see the lease held, got {other:?}"),
    }
    let value = Bytes::from_static(b"loaded");
    assert!(ok(
        "set_leased",
        cache.set_leased(&key, &lease, value.clone(), None).await
    ));
    lease.disarm();
    assert_eq!(ok("get", cache.get_bytes(&key).await), Some(value.clone()));
    match ok("lease", cache.lease(&key, &LeaseRequest::new()).await) {
        LeaseRead::Value { value: got, .. } => assert_eq!(got, value),
        other => panic!("a stored key must come back as its value, got {other:?}"),
    }
}

/// `set`, `invalidate` and `invalidate_prefix` each void a lease: the late write-back is
/// dropped and the change stands.
pub async fn lease_is_voided_by_set_invalidate_and_prefix(cache: &dyn CacheService, prefix: &str) {
    let old = Bytes::from_static(b"old row");
    for change in ["set", "invalidate", "invalidate_prefix"] {
        let key = format!("{prefix}{change}:k");
        let mut lease = granted(cache, &key, Duration::from_secs(30)).await;
        let expected = match change {
            "set" => {
                ok(
                    "set",
                    cache
                        .set_bytes(&key, Bytes::from_static(b"new"), None)
                        .await,
                );
                Some(Bytes::from_static(b"new"))
            }
            "invalidate" => {
                ok("invalidate", cache.invalidate(&key).await);
                None
            }
            _ => {
                ok(
                    "invalidate_prefix",
                    cache.invalidate_prefix(&format!("{prefix}{change}:")).await,
                );
                None
            }
        };
        let stored = ok(
            "set_leased",
            cache.set_leased(&key, &lease, old.clone(), None).await,
        );
        lease.disarm();
        assert!(!stored, "{change} must void the lease");
        assert_eq!(
            ok("get", cache.get_bytes(&key).await),
            expected,
            "after {change}"
        );
    }
}

/// Releasing a lease lets the next caller lease the key at once.
pub async fn released_lease_frees_the_key(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    let mut lease = granted(cache, &key, Duration::from_secs(30)).await;
    ok("release_lease", cache.release_lease(&key, &lease).await);
    lease.disarm();
    let mut next = granted(cache, &key, Duration::from_secs(30)).await;
    // Releasing someone else's lease does nothing.
    ok("release_lease", cache.release_lease(&key, &lease).await);
    assert!(matches!(
        ok("lease", cache.lease(&key, &LeaseRequest::new()).await),
        LeaseRead::Held { .. }
    ));
    ok("release_lease", cache.release_lease(&key, &next).await);
    next.disarm();
}

/// A lease lives for its TTL unless renewed; a renewal extends it.
pub async fn lease_expires_unless_renewed(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    let mut lease = granted(cache, &key, Duration::from_millis(300)).await;
    lease.disarm();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ok("lease", cache.lease(&key, &LeaseRequest::new()).await) {
            LeaseRead::Granted(mut next) => {
                // Renewing the new one keeps it held past its first TTL.
                let token = next.token().clone();
                tokio::time::sleep(Duration::from_millis(100)).await;
                match ok("renew", cache.lease(&key, &request(&token, true)).await) {
                    LeaseRead::Granted(mut renewed) => renewed.disarm(),
                    other => panic!("renewing a live lease: {other:?}"),
                }
                assert!(matches!(
                    ok("lease", cache.lease(&key, &LeaseRequest::new()).await),
                    LeaseRead::Held { .. }
                ));
                ok("release_lease", cache.release_lease(&key, &next).await);
                next.disarm();
                return;
            }
            LeaseRead::Held { .. } => {}
            other => panic!("while the first lease expires: {other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A renewal of a lease that a change voided says so, and does not take a new lease.
pub async fn renewal_never_takes_a_voided_lease(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    let mut lease = granted(cache, &key, Duration::from_secs(30)).await;
    lease.disarm();
    ok("invalidate", cache.invalidate(&key).await);
    let renewal = ok(
        "renew",
        cache.lease(&key, &request(lease.token(), true)).await,
    );
    assert!(matches!(renewal, LeaseRead::Lost), "got {renewal:?}");
    assert!(!ok(
        "set_leased",
        cache
            .set_leased(&key, &lease, Bytes::from_static(b"old"), None)
            .await
    ));
    assert_eq!(ok("get", cache.get_bytes(&key).await), None);
}

/// `replace` swaps exactly the value the caller saw for a lease; a value written since is
/// returned instead.
pub async fn lease_replaces_only_the_value_seen(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    ok(
        "set",
        cache.set_bytes(&key, Bytes::from_static(b"v1"), None).await,
    );
    let LeaseRead::Value { version: seen, .. } =
        ok("lease", cache.lease(&key, &LeaseRequest::new()).await)
    else {
        panic!("a stored key is read back")
    };
    ok(
        "set",
        cache.set_bytes(&key, Bytes::from_static(b"v2"), None).await,
    );
    let replace_v1 = LeaseRequest {
        replace: Some(seen),
        ..LeaseRequest::new()
    };
    let LeaseRead::Value { value, version: v2 } = ok("lease", cache.lease(&key, &replace_v1).await)
    else {
        panic!("v1 was overwritten: v2 must be returned, not replaced")
    };
    assert_eq!(value, Bytes::from_static(b"v2"));
    let replace_v2 = LeaseRequest {
        replace: Some(v2),
        ..LeaseRequest::new()
    };
    let LeaseRead::Granted(mut lease) = ok("lease", cache.lease(&key, &replace_v2).await) else {
        panic!("the value seen is replaced by the lease")
    };
    assert_eq!(ok("get", cache.get_bytes(&key).await), None);
    ok("release_lease", cache.release_lease(&key, &lease).await);
    lease.disarm();
}

/// A lease handle dropped unused (a cancelled load) is released soon, well before its TTL.
pub async fn dropped_lease_is_released(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}k");
    drop(granted(cache, &key, Duration::from_secs(60)).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let LeaseRead::Granted(mut lease) =
            ok("lease", cache.lease(&key, &LeaseRequest::new()).await)
        {
            ok("release_lease", cache.release_lease(&key, &lease).await);
            lease.disarm();
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a dropped lease was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stale set: a load that read the old row while the key was invalidated does not
/// write it back (its caller still gets it).
pub async fn load_overtaken_by_an_invalidation_is_not_cached(
    cache: &dyn CacheService,
    prefix: &str,
) {
    let key = format!("{prefix}org");
    let options = LoadOptions::default().ttl_secs(300);
    let loaded = cache
        .get_or_load_with::<String, std::io::Error, _, _>(&key, &options, || async {
            // The row changes and someone invalidates the key while this load runs.
            ok("invalidate", cache.invalidate(&key).await);
            Ok(Some("old row".to_owned()))
        })
        .await
        .expect("the load itself succeeds");
    assert_eq!(loaded.value.as_deref(), Some("old row"));
    let cached: Option<String> = ok("get", cache.get(&key).await);
    assert_eq!(cached, None, "the overtaken load must not be cached");
}

/// A `set` while a load runs wins over the load's write-back.
pub async fn load_overtaken_by_a_set_keeps_the_set(cache: &dyn CacheService, prefix: &str) {
    let key = format!("{prefix}org");
    let loaded = cache
        .get_or_load::<String, std::io::Error, _, _>(&key, Some(300), || async {
            ok("set", cache.set(&key, &"new row", None).await);
            Ok("old row".to_owned())
        })
        .await
        .expect("the load itself succeeds");
    assert_eq!(loaded, "old row");
    let cached: Option<String> = ok("get", cache.get(&key).await);
    assert_eq!(cached.as_deref(), Some("new row"));
}
