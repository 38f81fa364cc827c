//! OrgResolver and TokenCache over the in-memory backend and over real Redis (standalone and
//! tiered instances), with a counting in-memory org store standing in for the app's database
//! (an app-side seam; Redis itself is never mocked).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use cachet::conformance::unique_prefix;
use cachet::org::{self, OrgIdentity};
use cachet::token::{ValidToken, token_key};
use cachet::{
    CacheError, CacheService, CacheServiceExt, LoadError, LoadSource, MokaCacheService,
    NamespacedCacheService, OrgResolver, RedisCacheService, TieredCacheService, TokenCache,
};
use serde::{Deserialize, Serialize};
use support::{MemoryOrgStore, OrgContext, RedisServer, StoreDown};

const DELIVERY: Duration = Duration::from_secs(10);

/// Every test runs on a fresh namespace of one shared service, so they run in parallel.
fn namespaced(cache: Arc<dyn CacheService>) -> Arc<dyn CacheService> {
    let ns = unique_prefix("orgtest").replace(':', "-");
    Arc::new(NamespacedCacheService::new(cache, ns).expect("namespace"))
}

async fn redis_cache() -> Arc<dyn CacheService> {
    Arc::new(
        RedisCacheService::new(&RedisServer::shared().url(), 300)
            .await
            .expect("redis"),
    )
}

async fn tiered(channel: &str) -> TieredCacheService {
    TieredCacheService::builder(RedisCacheService::builder(RedisServer::shared().url()))
        .channel_prefix(channel)
        .build()
        .await
        .expect("tiered")
}

fn acme_db() -> MemoryOrgStore {
    MemoryOrgStore::with([
        OrgContext::new("42", "acme", "pro"),
        OrgContext::new("7", "globex", "free"),
    ])
}

macro_rules! resolver_checks {
    ($make:expr; $($check:ident),+ $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let cache: std::sync::Arc<dyn cachet::CacheService> = super::namespaced($make);
            super::$check(cache).await;
        }
    )+};
    ($make:expr) => {
        resolver_checks!($make;
            concurrent_first_requests_reach_the_store_once,
            both_keys_hold_the_same_context,
            unknown_orgs_are_cached_briefly,
            malformed_slugs_never_reach_the_store,
            a_failing_store_without_fail_safe_is_an_error,
            fail_safe_serves_the_last_context_within_its_grace,
            invalidate_org_clears_both_keys,
            an_update_during_a_load_is_not_overwritten_by_it,
        );
    };
}

mod resolver_moka {
    resolver_checks!(std::sync::Arc::new(cachet::MokaCacheService::default()));
}

mod resolver_redis {
    resolver_checks!(super::redis_cache().await);
}

async fn concurrent_first_requests_reach_the_store_once(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    db.set_delay(Duration::from_millis(100));
    let orgs = Arc::new(OrgResolver::new(cache, db.clone()));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let orgs = Arc::clone(&orgs);
        tasks.push(tokio::spawn(async move { orgs.by_slug("acme").await }));
    }
    for task in tasks {
        let resolved = task.await.unwrap().unwrap().expect("acme exists");
        assert_eq!(resolved.context.plan, "pro");
    }
    assert_eq!(
        db.loads(),
        1,
        "200 concurrent first requests, one store load"
    );
}

async fn both_keys_hold_the_same_context(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    let orgs = OrgResolver::new(Arc::clone(&cache), db.clone());
    let by_slug = orgs.by_slug("acme").await.unwrap().unwrap();
    assert_eq!(by_slug.source, LoadSource::Loader);
    let by_id = orgs.by_id("42").await.unwrap().unwrap();
    assert_eq!(by_id.source, LoadSource::Cache, "filled by the slug load");
    assert_eq!(by_id.context, by_slug.context);
    assert_eq!(db.loads(), 1);
    let raw: Option<OrgContext> = cache.get(&org::id_key("42")).await.unwrap();
    assert_eq!(raw.as_ref(), Some(&*by_slug.context));

    // And the other way round.
    let globex = orgs.by_id("7").await.unwrap().unwrap();
    assert_eq!(globex.source, LoadSource::Loader);
    let again = orgs.by_slug("globex").await.unwrap().unwrap();
    assert_eq!(
        (again.source, again.context.id.as_str()),
        (LoadSource::Cache, "7")
    );
    assert_eq!(db.loads(), 2);
}

async fn unknown_orgs_are_cached_briefly(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    let orgs = OrgResolver::new(cache, db.clone()).negative_ttl_secs(Some(1));
    for _ in 0..50 {
        assert!(orgs.by_slug("no-such-org").await.unwrap().is_none());
    }
    assert_eq!(db.loads(), 1, "a bogus slug hits the store once per TTL");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    db.put(OrgContext::new("99", "no-such-org", "trial"));
    let created = orgs.by_slug("no-such-org").await.unwrap();
    assert_eq!(
        created.map(|r| r.context.plan.clone()).as_deref(),
        Some("trial")
    );
    assert_eq!(db.loads(), 2);
}

async fn malformed_slugs_never_reach_the_store(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    let orgs = OrgResolver::new(cache, db.clone());
    let long = "a".repeat(10_000);
    for bad in ["", "id:42", "ac me", "acme\n", long.as_str()] {
        let err = orgs.by_slug(bad).await.unwrap_err();
        assert!(
            matches!(err, LoadError::Cache(CacheError::InvalidArgument { .. })),
            "{bad:?}: {err}"
        );
    }
    assert!(orgs.by_id("").await.is_err());
    assert_eq!(db.loads(), 0);
}

async fn a_failing_store_without_fail_safe_is_an_error(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    db.set_down(true);
    let orgs = OrgResolver::new(cache, db.clone());
    let err = orgs.by_slug("acme").await.unwrap_err();
    assert!(matches!(err, LoadError::Loader { .. }), "{err}");
    assert!(err.to_string().contains("database unavailable"), "{err}");
    // Not cached: once the store is back, it is asked again.
    db.set_down(false);
    assert!(orgs.by_slug("acme").await.unwrap().is_some());
    assert_eq!(db.loads(), 2);
}

async fn fail_safe_serves_the_last_context_within_its_grace(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    let orgs = OrgResolver::new(cache, db.clone())
        .ttl_secs(1)
        .fail_safe(Duration::from_secs(2));
    assert!(!orgs.by_slug("acme").await.unwrap().unwrap().is_stale());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    db.set_down(true);
    let stale = orgs.by_slug("acme").await.unwrap().unwrap();
    assert!(stale.is_stale(), "{:?}", stale.source);
    assert_eq!(stale.context.plan, "pro");
    // Past TTL + grace nothing usable is left: the store's error comes through.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = orgs.by_slug("acme").await.unwrap_err();
    assert!(matches!(err, LoadError::Loader { .. }), "{err}");
}

async fn invalidate_org_clears_both_keys(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    let orgs = OrgResolver::new(Arc::clone(&cache), db.clone());
    orgs.by_slug("acme").await.unwrap();
    db.put(OrgContext::new("42", "acme", "enterprise"));
    orgs.invalidate_org("acme", "42").await.unwrap();
    assert_eq!(cache.get_bytes(&org::slug_key("acme")).await.unwrap(), None);
    assert_eq!(cache.get_bytes(&org::id_key("42")).await.unwrap(), None);
    let fresh = orgs.by_id("42").await.unwrap().unwrap();
    assert_eq!(
        (fresh.source, fresh.context.plan.as_str()),
        (LoadSource::Loader, "enterprise")
    );
}

async fn an_update_during_a_load_is_not_overwritten_by_it(cache: Arc<dyn CacheService>) {
    let db = acme_db();
    db.set_delay(Duration::from_millis(300));
    let orgs = Arc::new(OrgResolver::new(Arc::clone(&cache), db.clone()));
    // A request starts loading acme; the store answers the old plan after 300 ms...
    let slow = {
        let orgs = Arc::clone(&orgs);
        tokio::spawn(async move { orgs.by_slug("acme").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(db.loads(), 1, "the load is under way");
    // ...while the org is updated and invalidated.
    db.put(OrgContext::new("42", "acme", "enterprise"));
    orgs.invalidate_org("acme", "42").await.unwrap();
    let old = slow.await.unwrap().unwrap().unwrap();
    assert_eq!(
        old.context.plan, "pro",
        "the overtaken load still answers its request"
    );
    // The overtaken load's value was not cached under either key: the next lookups load the
    // new plan.
    db.set_delay(Duration::ZERO);
    let now = orgs.by_slug("acme").await.unwrap().unwrap();
    assert_eq!(
        (now.source, now.context.plan.as_str()),
        (LoadSource::Loader, "enterprise")
    );
    let by_id = orgs.by_id("42").await.unwrap().unwrap();
    assert_eq!(by_id.context.plan, "enterprise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_update_reaches_every_instance() {
    let channel = unique_prefix("org-bus");
    let ns = unique_prefix("org-inst").replace(':', "-");
    let (a, b) = (tiered(&channel).await, tiered(&channel).await);
    let db = acme_db();
    let resolver = |cache: &TieredCacheService| {
        let cache: Arc<dyn CacheService> = Arc::new(cache.clone());
        let cache: Arc<dyn CacheService> =
            Arc::new(NamespacedCacheService::new(cache, ns.clone()).unwrap());
        OrgResolver::new(cache, db.clone())
    };
    let (on_a, on_b) = (resolver(&a), resolver(&b));

    assert_eq!(
        on_a.by_slug("acme").await.unwrap().unwrap().context.plan,
        "pro"
    );
    let seen = b.invalidations_applied();
    let from_b = on_b.by_slug("acme").await.unwrap().unwrap();
    assert_eq!(
        (from_b.source, from_b.context.plan.as_str()),
        (LoadSource::Cache, "pro")
    );
    assert_eq!(db.loads(), 1, "B read what A loaded, from Redis");

    db.put(OrgContext::new("42", "acme", "enterprise"));
    on_a.invalidate_org("acme", "42").await.unwrap();
    // Over the bus, a message per key; with client tracking, only for the key B read
    // (org:acme).
    let expected = match b.invalidation_mode() {
        cachet::backend::tiered::InvalidationMode::Bus => 2,
        _ => 1,
    };
    assert!(
        b.wait_for_invalidations(seen + expected, DELIVERY).await,
        "B heard the invalidations"
    );
    for _ in 0..3 {
        let now = on_b.by_slug("acme").await.unwrap().unwrap();
        assert_eq!(
            now.context.plan, "enterprise",
            "B never serves the old context"
        );
        let by_id = on_b.by_id("42").await.unwrap().unwrap();
        assert_eq!(by_id.context.plan, "enterprise");
    }
}

// ---- tokens ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claims {
    user: String,
    org: String,
}

fn claims() -> Claims {
    Claims {
        user: "ada".into(),
        org: "acme".into(),
    }
}

fn valid_for(secs: u64) -> ValidToken<Claims> {
    ValidToken {
        claims: claims(),
        expires_at: SystemTime::now() + Duration::from_secs(secs),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_keyed_by_their_hash_and_never_outlive_their_expiry() {
    let server = RedisServer::shared();
    let tokens: TokenCache<Claims> = TokenCache::new(redis_cache().await);
    let raw = format!(
        "{}-sk_live_ABCDEF0123456789",
        unique_prefix("tok").replace(':', "")
    );

    // Expires in 100 s: the entry must end by expiry - 30 s skew.
    assert!(
        tokens
            .insert(&raw, &claims(), valid_for(100).expires_at)
            .await
            .unwrap()
    );
    let key = token_key(&raw);
    assert!(key.starts_with("token:") && !key.contains(&raw));
    let pttl: i64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        (1..=70_000).contains(&pttl),
        "PTTL {pttl} ms outlives expiry - skew"
    );
    assert_eq!(tokens.get(&raw).await.unwrap(), Some(claims()));

    // Long-lived tokens are capped by the configured TTL (300 s).
    let long = format!("{raw}-long");
    tokens
        .insert(&long, &claims(), valid_for(86_400).expires_at)
        .await
        .unwrap();
    let pttl: i64 = server
        .cli(&["PTTL", &token_key(&long)])
        .trim()
        .parse()
        .unwrap();
    assert!((1..=300_000).contains(&pttl), "PTTL {pttl}");

    // Inside the skew: not cached at all.
    let soon = format!("{raw}-soon");
    assert!(
        !tokens
            .insert(&soon, &claims(), valid_for(20).expires_at)
            .await
            .unwrap()
    );
    assert_eq!(server.cli(&["EXISTS", &token_key(&soon)]).trim(), "0");

    // No key in the whole server holds the raw token.
    let keys = server.cli(&["KEYS", "*"]);
    assert!(
        !keys.contains("sk_live_ABCDEF0123456789"),
        "a raw token in a key: {keys}"
    );

    tokens.invalidate(&raw).await.unwrap();
    assert_eq!(tokens.get(&raw).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_token_validate_it_once() {
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let tokens = Arc::new(TokenCache::<Claims>::new(cache));
    let validations = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (tokens, validations) = (Arc::clone(&tokens), Arc::clone(&validations));
        tasks.push(tokio::spawn(async move {
            tokens
                .get_or_validate("tok-1", async {
                    validations.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, StoreDown>(Some(valid_for(3600)))
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Some(claims()));
    }
    assert_eq!(validations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn invalid_tokens_and_validator_errors_are_not_cached() {
    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let tokens = TokenCache::<Claims>::new(Arc::clone(&cache));
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let verdict = tokens
            .get_or_validate("forged", async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, StoreDown>(None)
            })
            .await
            .unwrap();
        assert_eq!(verdict, None);
    }
    for _ in 0..2 {
        let err = tokens
            .get_or_validate("tok-2", async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<Option<ValidToken<Claims>>, _>(StoreDown)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, LoadError::Loader { .. }));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // A valid token close to its expiry is returned but not cached.
    let near = tokens
        .get_or_validate("tok-3", async { Ok::<_, StoreDown>(Some(valid_for(10))) })
        .await
        .unwrap();
    assert_eq!(near, Some(claims()));
    assert_eq!(cache.get_bytes(&token_key("tok-3")).await.unwrap(), None);
}

/// Two instances (separate services, so separate local flights) missing one org at once.
/// `distributed`: also the (deprecated) lock-based single flight, which leases made
/// redundant; it must still work and leave nothing behind.
#[allow(deprecated)]
async fn two_instances_resolving_at_once(distributed: bool) -> usize {
    let ns = unique_prefix("org-dist").replace(':', "-");
    let db = acme_db();
    db.set_delay(Duration::from_millis(200));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let cache: Arc<dyn CacheService> =
            Arc::new(NamespacedCacheService::new(redis_cache().await, ns.clone()).unwrap());
        let mut orgs = OrgResolver::new(cache, db.clone());
        if distributed {
            let locks = cachet::RedisConcurrencyService::new(&RedisServer::shared().url())
                .await
                .unwrap();
            orgs = orgs.distributed_single_flight(Arc::new(locks));
        }
        instances.push(Arc::new(orgs));
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let orgs = Arc::clone(&instances[i % 2]);
        tasks.push(tokio::spawn(async move { orgs.by_slug("acme").await }));
    }
    for task in tasks {
        let resolved = task.await.unwrap().unwrap().expect("acme exists");
        assert_eq!(resolved.context.plan, "pro");
    }
    db.loads()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_single_flight_loads_once_across_instances() {
    assert_eq!(
        two_instances_resolving_at_once(true).await,
        1,
        "two instances, 200 concurrent first requests, one store load in all"
    );
    // Leases give the same single flight without any lock: the first instance's miss takes
    // the lease on `org:acme` in Redis, and the other waits for its value.
    assert_eq!(two_instances_resolving_at_once(false).await, 1);
}

// ---- secrets at rest ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SecretOrg {
    id: String,
    slug: String,
    api_secret: String,
}

impl OrgIdentity for SecretOrg {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

/// The one org, with its secret.
fn secret_store() -> MemoryOrgStore<SecretOrg> {
    MemoryOrgStore::with([SecretOrg {
        id: "42".into(),
        slug: "acme".into(),
        api_secret: ORG_SECRET.into(),
    }])
}

const ORG_SECRET: &str = "sk_live_ORG_SECRET_5f1c9a";
const RAW_TOKEN: &str = "tok_RAW_BEARER_77e0b2";

/// The app layer on one Redis server of its own, through the encryption decorator over the
/// tiered backend (fail-safe frames, negative markers and token claims included): no key
/// holds the raw token, no value holds the org secret or the raw token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_redis_in_plaintext() {
    let server = RedisServer::start();
    let tiered = TieredCacheService::builder(RedisCacheService::builder(server.url()))
        .build()
        .await
        .unwrap();
    let keys = cachet::decorate::EncryptionKeys::new(1, [7u8; 32]);
    let cache: Arc<dyn CacheService> = Arc::new(cachet::EncryptedCacheService::new(tiered, keys));

    let orgs =
        OrgResolver::new(Arc::clone(&cache), secret_store()).fail_safe(Duration::from_secs(60));
    let acme = orgs.by_slug("acme").await.unwrap().unwrap();
    assert_eq!(acme.context.api_secret, ORG_SECRET);
    assert_eq!(
        orgs.by_id("42").await.unwrap().unwrap().source,
        LoadSource::Cache
    );
    assert!(orgs.by_slug("unknown").await.unwrap().is_none());

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct TokenClaims {
        org_secret_echo: String,
        bearer: String,
    }
    let tokens: TokenCache<TokenClaims> = TokenCache::new(Arc::clone(&cache));
    let claims = TokenClaims {
        org_secret_echo: ORG_SECRET.into(),
        bearer: RAW_TOKEN.into(),
    };
    assert!(
        tokens
            .insert(
                RAW_TOKEN,
                &claims,
                SystemTime::now() + Duration::from_secs(3600)
            )
            .await
            .unwrap()
    );
    assert_eq!(tokens.get(RAW_TOKEN).await.unwrap(), Some(claims));

    let names: Vec<String> = server.query(&["KEYS", "*"]).unwrap();
    assert!(
        names.len() >= 4,
        "org keys, the negative marker and the token: {names:?}"
    );
    for name in &names {
        assert!(!name.contains(RAW_TOKEN), "a raw token in a key: {name}");
        let value: Vec<u8> = server
            .query(&["GET", name])
            .unwrap_or_else(|e| panic!("{name} is not a string value: {e}"));
        for secret in [ORG_SECRET, RAW_TOKEN, "acme"] {
            assert!(
                !value.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in plaintext under {name}"
            );
        }
    }
}
