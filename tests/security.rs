//! What someone who reads logs, error reports or a `Debug` dump must not learn: a password in
//! a Redis URL, whatever typo the URL has and whichever constructor it went through.

mod support;

use cachet::{
    CacheSettings, RedisCacheService, RedisConcurrencyService, TieredCacheService,
    build_cache_service, build_concurrency_service,
};
use support::MemoryOrgStore;

const SECRET: &str = "hunter2-s3cret";

/// URLs with typos, each carrying the password somewhere.
fn malformed_urls(port: u16) -> Vec<String> {
    let s = SECRET;
    vec![
        format!("redis:/:{s}@host"),
        format!("user:{s}@host"),
        format!("redis//:{s}@h"),
        format!("redis://:{s}@"),
        format!("redis://user:{s}@host:notaport"),
        format!("redis://:{s}@@host"),
        format!("http://:{s}@host"),
        format!("redis://:{s}@[::1"),
        format!("redis://:p@{s}@host"),
        format!("  redis://:{s}@host"),
        format!("redis://u:{s} x@host"),
        format!("redis-sentinel://:{s}@127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}/0?password={s}"),
        format!("redis-sentinel://127.0.0.1:{port}/mymaster?sentinelPassword={s}"),
        // Well formed, but nothing listens there: the connection error must not say it.
        format!("redis://:{s}@127.0.0.1:{port}"),
        format!("redis://user:{s}@127.0.0.1:{port}/0"),
    ]
}

/// Everything an error can print: Display, Debug, and the whole source chain.
fn everything_printed(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{error} | {error:?}");
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(&format!(" | {e} | {e:?}"));
        source = e.source();
    }
    out
}

fn assert_no_secret(what: &str, url: &str, printed: &str) {
    assert!(
        !printed.contains(SECRET),
        "{what} with {url:?} printed the password: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_constructor_prints_the_password_of_a_url() {
    let port = support::free_port();
    let fast = |url: &str| {
        RedisCacheService::builder(url)
            .connect_timeout(std::time::Duration::from_millis(200))
            .reconnect_max_attempts(0)
    };
    for url in malformed_urls(port) {
        assert_no_secret("the builder's Debug", &url, &format!("{:?}", fast(&url)));
        if let Err(e) = RedisCacheService::new(&url, 60).await {
            assert_no_secret("RedisCacheService::new", &url, &everything_printed(&e));
        }
        if let Err(e) = fast(&url).build().await {
            assert_no_secret(
                "RedisCacheServiceBuilder::build",
                &url,
                &everything_printed(&e),
            );
        }
        let tiered = TieredCacheService::builder(fast(&url));
        assert_no_secret("the tiered builder's Debug", &url, &format!("{tiered:?}"));
        if let Err(e) = tiered.build().await {
            assert_no_secret(
                "TieredCacheServiceBuilder::build",
                &url,
                &everything_printed(&e),
            );
        }
        if let Err(e) = RedisConcurrencyService::new(&url).await {
            assert_no_secret(
                "RedisConcurrencyService::new",
                &url,
                &everything_printed(&e),
            );
        }
        if let Err(e) = build_cache_service(Some(&url)).await {
            assert_no_secret("build_cache_service", &url, &everything_printed(&e));
        }
        if let Err(e) = build_concurrency_service(Some(&url)).await {
            assert_no_secret("build_concurrency_service", &url, &everything_printed(&e));
        }
        let settings = CacheSettings::from_vars(|name| (name == "REDIS_URL").then(|| url.clone()))
            .expect("settings");
        assert_no_secret("CacheSettings' Debug", &url, &format!("{settings:?}"));
        if let Err(e) = settings.build().await {
            assert_no_secret("CacheSettings::build", &url, &everything_printed(&e));
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Claims {
    user: String,
}

/// With a digest key, a dump of Redis's keys does not let anyone test a guessed API key
/// offline: the SHA-256 of the guess is not among them, the HMAC under the app's key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_token_digests_resist_offline_guessing() {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};
    let server = support::RedisServer::start();
    let redis = RedisCacheService::new(&server.url(), 300).await.unwrap();
    let secret = [42u8; 32];
    let tokens: cachet::TokenCache<Claims> = cachet::TokenCache::new(Arc::new(redis))
        .with_digest_key(&secret)
        .unwrap();
    let api_key = "acme-1234"; // low entropy: guessable
    let claims = Claims { user: "ada".into() };
    let expires = SystemTime::now() + Duration::from_secs(3600);
    assert!(tokens.insert(api_key, &claims, expires).await.unwrap());
    assert_eq!(tokens.get(api_key).await.unwrap(), Some(claims));
    let dump = server.cli(&["--scan", "--pattern", "*"]);
    let keys: Vec<&str> = dump.lines().map(str::trim).collect();
    assert!(
        !keys.contains(&cachet::token::token_key(api_key).as_str()),
        "the plain SHA-256 of the guess is in the dump: {keys:?}"
    );
    let keyed = cachet::token::keyed_token_key(&secret, api_key).unwrap();
    assert!(keys.contains(&keyed.as_str()), "{keys:?}");
    assert!(!dump.contains(api_key));
    assert!(!format!("{tokens:?}").contains("42, 42"), "{tokens:?}");
    tokens.invalidate(api_key).await.unwrap();
    assert_eq!(tokens.get(api_key).await.unwrap(), None);
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Org {
    id: String,
    slug: String,
    suspended: bool,
}

impl cachet::org::OrgIdentity for Org {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

/// An org store that matches slugs case-insensitively (most databases' default collation)
/// and records every identifier it was handed; it holds acme (id 42), active.
fn collating_store() -> MemoryOrgStore<Org> {
    MemoryOrgStore::with([acme(false)]).collating()
}

fn acme(suspended: bool) -> Org {
    Org {
        id: "42".into(),
        slug: "acme".into(),
        suspended,
    }
}

/// Every spelling of a slug shares one cache entry and one invalidation: after the org is
/// suspended and `invalidate_org("acme", "42")` ran, no spelling still resolves to the
/// active org (on today's main `ACME` kept its own entry for the whole TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_slug_shares_one_entry_and_one_invalidation() {
    use std::sync::Arc;
    let server = support::RedisServer::start();
    let cache = Arc::new(RedisCacheService::new(&server.url(), 300).await.unwrap());
    let store = collating_store();
    let orgs = cachet::OrgResolver::new(cache, store.clone());
    for spelling in ["acme", "Acme", "ACME"] {
        let org = orgs.by_slug(spelling).await.unwrap().expect("found");
        assert!(!org.context.suspended);
    }
    assert_eq!(store.asked().len(), 1, "one load for every spelling");
    store.put(acme(true));
    orgs.invalidate_org("acme", "42").await.unwrap();
    for spelling in ["acme", "Acme", "ACME", "aCmE"] {
        let org = orgs.by_slug(spelling).await.unwrap().expect("found");
        assert!(
            org.context.suspended,
            "{spelling} still resolves to the active org"
        );
    }
    assert_eq!(cachet::org::canonical_slug("AcMe").unwrap(), "acme");
}

/// Path-like and other out-of-charset identifiers never reach the store or the cache: a
/// store that builds a file path or a URL from the slug is not one step from traversal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_identifiers_never_reach_the_store() {
    use std::sync::Arc;
    let cache = Arc::new(cachet::MokaCacheService::default());
    let store = collating_store();
    let orgs = cachet::OrgResolver::new(cache.clone(), store.clone());
    let too_long_slug = "a".repeat(64);
    let too_long_id = "1".repeat(129);
    let bad = [
        "../../admin",
        "a/b",
        "..",
        "a%2Fb",
        "a\\b",
        "*",
        "a?",
        "a:b",
        "a b",
        "",
        "ａcme",
        "acme\u{0}",
        "a.b",
        too_long_slug.as_str(),
    ];
    for slug in bad {
        match orgs.by_slug(slug).await {
            Err(cachet::org::OrgError::Cache(cachet::CacheError::InvalidArgument { .. })) => {}
            other => panic!("slug {slug:?}: expected InvalidArgument, got {other:?}"),
        }
        assert!(cachet::org::canonical_slug(slug).is_err(), "{slug:?}");
    }
    for id in ["../1", "1/2", "*", "4:2", too_long_id.as_str(), ""] {
        match orgs.by_id(id).await {
            Err(cachet::org::OrgError::Cache(cachet::CacheError::InvalidArgument { .. })) => {}
            other => panic!("id {id:?}: expected InvalidArgument, got {other:?}"),
        }
    }
    assert!(
        store.asked().is_empty(),
        "the store was handed {:?}",
        store.asked()
    );
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    // The widest valid ones still work.
    assert!(orgs.by_slug(&"a".repeat(63)).await.unwrap().is_none());
    assert!(orgs.by_id("A_b-9").await.unwrap().is_none());
}

/// Two apps share one Redis, each under its own namespace, both on the bus with the default
/// channel prefix: one app clearing its whole namespace (`invalidate_prefix("")`) or one of
/// its keys must not empty the other app's L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_in_other_namespaces_cannot_clear_each_others_l1() {
    use cachet::backend::tiered::InvalidationMode;
    use cachet::{CacheService, CacheServiceExt};
    use std::time::Duration;
    let server = support::RedisServer::start();
    let app = |namespace: &'static str| {
        let url = server.url();
        async move {
            TieredCacheService::builder(RedisCacheService::builder(url).namespace(namespace))
                .invalidation(InvalidationMode::Bus)
                .build()
                .await
                .unwrap()
        }
    };
    let (a1, a2, b) = (
        app("app-a:").await,
        app("app-a:").await,
        app("app-b:").await,
    );
    assert_ne!(a1.channel(), b.channel(), "one channel per namespace");
    // Each reader writes the value itself: an own `set` fills its L1 at once, and no bus
    // message of another instance's earlier write can arrive later and drop it.
    for reader in [&a2, &b] {
        assert!(reader.wait_until_confirmed(Duration::from_secs(20)).await);
        reader.set("k", &"v", None).await.unwrap();
    }
    assert!(a2.cached_locally("k") && b.cached_locally("k"));
    a1.invalidate("k").await.unwrap();
    a1.invalidate_prefix("").await.unwrap();
    // a2 (same app) hears both; b (other app) hears neither.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while a2.cached_locally("k") {
        assert!(
            std::time::Instant::now() < deadline,
            "a2 never heard its own app"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Both messages were published before a2 heard them; one more round trip for margin.
    a1.set("other", &"x", None).await.unwrap();
    assert!(
        b.cached_locally("k"),
        "another app's invalidation emptied b's L1"
    );
}

/// An org store with `hot` orgs (`hot-0`, `hot-1`, …, ids `0`, `1`, …); every other slug is
/// unknown.
fn hot_orgs(hot: usize) -> MemoryOrgStore<Org> {
    MemoryOrgStore::with((0..hot).map(|n| Org {
        id: n.to_string(),
        slug: format!("hot-{n}"),
        suspended: false,
    }))
}

/// Resolves `hot-0..hot` and then `bogus` unique unknown slugs through `orgs`, and checks
/// that the hot set is still served from the cache (not one more store load).
async fn flood_of_unknown_slugs_keeps_the_hot_set<S>(
    orgs: &cachet::OrgResolver<MemoryOrgStore<Org>>,
    store: &MemoryOrgStore<Org>,
    hot: usize,
    bogus: usize,
    settle: S,
) where
    S: Fn(),
{
    use futures_util::StreamExt;
    for round in 0..3 {
        for n in 0..hot {
            let slug = format!("hot-{n}");
            assert!(
                orgs.by_slug(&slug).await.unwrap().is_some(),
                "{round} {slug}"
            );
        }
    }
    assert_eq!(store.loads(), hot, "each hot org loads once");
    futures_util::stream::iter(0..bogus)
        .for_each_concurrent(64, |n| async move {
            let slug = format!("bogus-{n}");
            assert!(orgs.by_slug(&slug).await.unwrap().is_none());
        })
        .await;
    assert_eq!(store.loads(), hot + bogus);
    settle();
    let before = store.loads();
    for n in 0..hot {
        assert!(orgs.by_slug(&format!("hot-{n}")).await.unwrap().is_some());
    }
    assert_eq!(
        store.loads() - before,
        0,
        "hot orgs were evicted by markers of unknown slugs"
    );
}

/// A flood of unique bogus slugs (each cached as "not found") cannot evict the hot orgs of
/// the in-memory backend: markers live in a bounded space of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_slugs_cannot_evict_hot_orgs_in_memory() {
    use std::sync::Arc;
    let hot = 400;
    let cache = Arc::new(
        cachet::MokaCacheService::builder()
            .max_entries(1_000)
            .build()
            .unwrap(),
    );
    let store = hot_orgs(hot);
    let orgs = cachet::OrgResolver::new(cache.clone(), store.clone());
    flood_of_unknown_slugs_keeps_the_hot_set(&orgs, &store, hot, 100_000, || {
        cache.run_pending_tasks()
    })
    .await;
    cache.run_pending_tasks();
    // Markers are still cached, within their own space (a tenth of the capacity by default).
    let markers = cache.negative_entry_count();
    assert!((1..=100).contains(&markers), "{markers} markers");
    assert!(
        cache.entry_count() <= 1_100,
        "{} entries in a 1,000-entry cache with 100 markers",
        cache.entry_count()
    );
}

/// A flood through a tiered instance: its L1 keeps the hot orgs. On the bus, the
/// instance's own write of each marker goes into its L1 (with tracking it would take a
/// second read of each unknown slug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_slugs_cannot_evict_hot_orgs_from_the_l1() {
    use std::sync::Arc;
    let server = support::RedisServer::start();
    let hot = 400;
    let tiered = Arc::new(
        TieredCacheService::builder(RedisCacheService::builder(server.url()))
            .invalidation(cachet::backend::tiered::InvalidationMode::Bus)
            .l1_max_entries(1_000)
            .build()
            .await
            .unwrap(),
    );
    assert!(
        tiered
            .wait_until_confirmed(std::time::Duration::from_secs(20))
            .await
    );
    let store = hot_orgs(hot);
    let orgs = cachet::OrgResolver::new(tiered.clone(), store.clone());
    // 20,000: twenty times the L1 (the in-memory test above floods the same store type with
    // 100,000; through Redis in a debug build each unknown slug costs three round trips).
    flood_of_unknown_slugs_keeps_the_hot_set(&orgs, &store, hot, 20_000, || {}).await;
    for n in 0..hot {
        assert!(
            tiered.cached_locally(&cachet::org::slug_key(&format!("hot-{n}"))),
            "hot-{n} left the L1"
        );
    }
}
