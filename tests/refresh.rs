//! Eager refresh and the soft timeout where the caller must not wait and where instances
//! meet: `get_or_load_detached` (the reload is a task of its own), one reload across
//! instances (the claim in the stored value), a reload dropped because another instance
//! invalidated the key meanwhile, `OrgResolver` and `TokenCache`. What every backend shares
//! (the inline form, `replace_if`) is in `cachet::conformance` (refresh checks). Redis runs
//! for real (tests/support), never 6379.
//!
//! TTLs are whole seconds: values live 4 s and are due for refresh after 1 s, and the
//! checks sleep 1.2 s, leaving a slow machine 2.8 s of margin (never a timing assert).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cachet::conformance::unique_prefix;
use cachet::{
    CacheService, CacheServiceExt, LoadOptions, LoadSource, MokaCacheService, OrgResolver,
    RedisCacheService, TieredCacheService, TokenCache, ValidToken,
};
use support::{Gate, MemoryOrgStore, OrgContext, RedisServer};

/// Bound on anything that should take milliseconds: only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);

/// Past the refresh point of a value loaded with [`options`], well before its end.
const PAST_REFRESH_POINT: Duration = Duration::from_millis(1_200);

fn options() -> LoadOptions {
    LoadOptions::default().ttl_secs(4).eager_refresh(0.25)
}

#[derive(Debug)]
struct StoreDown;

impl std::fmt::Display for StoreDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("store down")
    }
}

impl std::error::Error for StoreDown {}

async fn tiered(url: String, channel: &str) -> Arc<dyn CacheService> {
    Arc::new(
        TieredCacheService::builder(RedisCacheService::builder(url))
            .channel_prefix(channel)
            .build()
            .await
            .expect("tiered"),
    )
}

async fn redis(url: String) -> Arc<dyn CacheService> {
    Arc::new(RedisCacheService::new(&url, 300).await.expect("redis"))
}

/// Every backend kind, one instance each.
async fn one_of_each() -> Vec<(&'static str, Arc<dyn CacheService>)> {
    let url = RedisServer::shared().url();
    vec![
        (
            "memory",
            Arc::new(MokaCacheService::default()) as Arc<dyn CacheService>,
        ),
        ("redis", redis(url.clone()).await),
        ("tiered", tiered(url, &unique_prefix("refresh-bus")).await),
    ]
}

/// Waits (bounded) until `key` reads as `want` through `cache`.
async fn eventually_reads(cache: &dyn CacheService, key: &str, want: Option<&str>, what: &str) {
    let deadline = Instant::now() + HANG;
    loop {
        let got = cache.get::<String>(key).await.unwrap();
        if got.as_deref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The detached form: a hit past the refresh point answers at once although the reload is
/// held at a gate (were the caller running it, it would hang here); the reload then lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_refresh_never_makes_the_caller_wait() {
    for (name, cache) in one_of_each().await {
        let key = format!("{}plan", unique_prefix("detached-refresh"));
        let first = cache
            .get_or_load_detached(&key, &options(), || async {
                Ok::<_, StoreDown>(Some("free".to_string()))
            })
            .await
            .unwrap();
        assert_eq!(first.source, LoadSource::Loader, "{name}");
        tokio::time::sleep(PAST_REFRESH_POINT).await;

        let gate = Arc::new(Gate::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let reload = {
            let (gate, loads) = (Arc::clone(&gate), Arc::clone(&loads));
            move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                gate.pause().await;
                Ok::<_, StoreDown>(Some("pro".to_string()))
            }
        };
        let served =
            tokio::time::timeout(HANG, cache.get_or_load_detached(&key, &options(), reload))
                .await
                .unwrap_or_else(|_| panic!("{name}: the caller waited for the reload"))
                .unwrap();
        assert_eq!(
            (served.value.as_deref().map(String::as_str), served.source),
            (Some("free"), LoadSource::Cache),
            "{name}"
        );
        gate.reached().await;
        // More hits while the reload runs: served, no second reload.
        for _ in 0..20 {
            let hit = cache
                .get_or_load_detached(&key, &options(), || async {
                    Ok::<_, StoreDown>(Some("never".to_string()))
                })
                .await
                .unwrap();
            assert_eq!(
                hit.value.as_deref().map(String::as_str),
                Some("free"),
                "{name}"
            );
        }
        gate.open();
        eventually_reads(&*cache, &key, Some("pro"), name).await;
        assert_eq!(loads.load(Ordering::SeqCst), 1, "{name}: one reload");
    }
}

/// Three instances of each kind on one Redis, 30 callers each, all past the refresh point
/// at once: one reload in all (the claim in the stored value), and every instance then
/// reads the reloaded value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_past_the_refresh_point_reload_once_in_all() {
    let url = RedisServer::shared().url();
    let channel = unique_prefix("refresh-fleet");
    for kind in ["redis", "tiered"] {
        let mut fleet = Vec::new();
        for _ in 0..3 {
            fleet.push(match kind {
                "redis" => redis(url.clone()).await,
                _ => tiered(url.clone(), &channel).await,
            });
        }
        let key = format!("{}plan", unique_prefix("refresh-fleet"));
        fleet[0]
            .get_or_load_detached(&key, &options(), || async {
                Ok::<_, StoreDown>(Some("free".to_string()))
            })
            .await
            .unwrap();
        for cache in &fleet {
            eventually_reads(&**cache, &key, Some("free"), kind).await; // fills the L1s
        }
        tokio::time::sleep(PAST_REFRESH_POINT).await;
        let loads = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for i in 0..90 {
            let (cache, key, loads) = (Arc::clone(&fleet[i % 3]), key.clone(), Arc::clone(&loads));
            callers.push(tokio::spawn(async move {
                let load = move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, StoreDown>(Some("pro".to_string()))
                };
                cache.get_or_load_detached(&key, &options(), load).await
            }));
        }
        for caller in callers {
            let loaded = caller.await.unwrap().unwrap();
            assert_eq!(loaded.source, LoadSource::Cache, "{kind}");
        }
        for cache in &fleet {
            eventually_reads(&**cache, &key, Some("pro"), kind).await;
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "{kind}: three instances, one reload"
        );
    }
}

/// Instance A reloads; instance B invalidates the key while A's loader runs (the database
/// changed): A's reload is dropped, and no instance reads the key again until a new load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_overtaken_by_another_instances_invalidation_is_dropped() {
    let url = RedisServer::shared().url();
    let channel = unique_prefix("refresh-race");
    for kind in ["redis", "tiered"] {
        let (a, b) = match kind {
            "redis" => (redis(url.clone()).await, redis(url.clone()).await),
            _ => (
                tiered(url.clone(), &channel).await,
                tiered(url.clone(), &channel).await,
            ),
        };
        let key = format!("{}plan", unique_prefix("refresh-race"));
        a.get_or_load_detached(&key, &options(), || async {
            Ok::<_, StoreDown>(Some("free".to_string()))
        })
        .await
        .unwrap();
        eventually_reads(&*b, &key, Some("free"), kind).await;
        tokio::time::sleep(PAST_REFRESH_POINT).await;
        let gate = Arc::new(Gate::default());
        let held = Arc::clone(&gate);
        a.get_or_load_detached(&key, &options(), move || async move {
            held.pause().await;
            Ok::<_, StoreDown>(Some("read before the change".to_string()))
        })
        .await
        .unwrap();
        gate.reached().await;
        b.invalidate(&key).await.unwrap();
        gate.open();
        let deadline = Instant::now() + HANG;
        while cachet::load::refreshes_in_flight() > 0 {
            assert!(Instant::now() < deadline, "the reload never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (name, cache) in [("A", &a), ("B", &b)] {
            assert_eq!(
                cache.get::<String>(&key).await.unwrap(),
                None,
                "{kind}: {name} reads a reload that an invalidation overtook"
            );
        }
    }
}

/// Detached, past the soft timeout with a fail-safe value: the caller gets the stale value
/// although the loader is held; the load goes on and stores its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_load_past_the_soft_timeout_serves_stale_and_stores_later() {
    let options = LoadOptions::default()
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(50))
        .load_timeout(Duration::from_secs(10));
    for (name, cache) in one_of_each().await {
        let key = format!("{}plan", unique_prefix("soft"));
        cache
            .get_or_load_detached(&key, &options, || async {
                Ok::<_, StoreDown>(Some("free".to_string()))
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1_300)).await; // past the TTL
        let gate = Arc::new(Gate::default());
        let held = Arc::clone(&gate);
        let served = tokio::time::timeout(
            HANG,
            cache.get_or_load_detached(&key, &options, move || async move {
                held.pause().await;
                Ok::<_, StoreDown>(Some("pro".to_string()))
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the caller waited past the soft timeout"))
        .unwrap();
        assert_eq!(
            (served.value.as_deref().map(String::as_str), served.source),
            (Some("free"), LoadSource::Stale),
            "{name}"
        );
        gate.reached().await;
        gate.open();
        let deadline = Instant::now() + HANG;
        loop {
            let loaded = cache
                .get_or_load_with(&key, &options, || async {
                    Ok::<_, StoreDown>(Some("pro".to_string()))
                })
                .await
                .unwrap();
            if loaded.source == LoadSource::Cache {
                assert_eq!(loaded.value.as_deref(), Some("pro"), "{name}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: the load never stored its value"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `OrgResolver::eager_refresh`: a request past the refresh point gets the cached context
/// at once and the store is asked once in the background; the next requests see the new
/// plan, from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_contexts_are_refreshed_in_the_background() {
    for (name, cache) in one_of_each().await {
        let slug = format!("acme-{}", rand_suffix());
        let store = MemoryOrgStore::with([OrgContext::new("1", &slug, "free")]);
        let orgs = OrgResolver::new(cache, store.clone())
            .ttl_secs(4)
            .eager_refresh(0.25);
        let first = orgs.by_slug(&slug).await.unwrap().unwrap();
        assert_eq!(
            (first.context.plan.as_str(), first.source),
            ("free", LoadSource::Loader)
        );
        assert_eq!(store.loads(), 1);
        tokio::time::sleep(PAST_REFRESH_POINT).await;
        store.put(OrgContext::new("1", &slug, "pro"));
        let gate = Arc::new(Gate::default());
        store.hold_next_load(Arc::clone(&gate));
        let served = tokio::time::timeout(HANG, orgs.by_slug(&slug))
            .await
            .unwrap_or_else(|_| panic!("{name}: the request waited for the store"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (served.context.plan.as_str(), served.source),
            ("free", LoadSource::Cache)
        );
        gate.reached().await;
        gate.open();
        let deadline = Instant::now() + HANG;
        loop {
            let now = orgs.by_slug(&slug).await.unwrap().unwrap();
            if now.context.plan == "pro" {
                assert_eq!(now.source, LoadSource::Cache, "{name}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: the refresh never landed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.loads(), 2, "{name}: one background reload");
    }
}

/// `TokenCache::eager_refresh`: a lookup past the refresh point revalidates once and the
/// entry is replaced; the refreshed entry still ends before the token does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_revalidated_before_their_entry_ends() {
    for (name, cache) in one_of_each().await {
        let tokens: TokenCache<String> = TokenCache::new(cache)
            .max_ttl_secs(4)
            .skew(Duration::from_secs(1))
            .eager_refresh(0.25);
        let token = format!("tok-{}", rand_suffix());
        let validations = AtomicUsize::new(0);
        let validate = |claims: &'static str| {
            let validations = &validations;
            async move {
                validations.fetch_add(1, Ordering::SeqCst);
                Ok::<_, StoreDown>(Some(ValidToken {
                    claims: claims.to_string(),
                    expires_at: SystemTime::now() + Duration::from_secs(3600),
                }))
            }
        };
        let first = tokens
            .get_or_validate(&token, validate("v1"))
            .await
            .unwrap();
        assert_eq!(first.as_deref(), Some("v1"));
        let hit = tokens
            .get_or_validate(&token, validate("v2"))
            .await
            .unwrap();
        assert_eq!(hit.as_deref(), Some("v1"), "{name}: a hit");
        tokio::time::sleep(PAST_REFRESH_POINT).await;
        let due = tokens
            .get_or_validate(&token, validate("v2"))
            .await
            .unwrap();
        assert_eq!(due.as_deref(), Some("v1"), "{name}: served from the cache");
        assert_eq!(
            tokens.get(&token).await.unwrap().as_deref(),
            Some("v2"),
            "{name}"
        );
        assert_eq!(
            validations.load(Ordering::SeqCst),
            2,
            "{name}: validated on the miss and once by the refresh"
        );
    }
}

fn rand_suffix() -> String {
    unique_prefix("s")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase()
}
