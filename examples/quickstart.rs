//! cachet in five minutes: cache-aside loading of an org (tenant) context in front of a slow
//! store, with hits, misses, TTL expiry and prefix invalidation.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! With no setup it runs on the in-memory backend (`MokaCacheService`). The Redis backend
//! joins with the Redis issue; until then, setting `REDIS_URL` makes this example say so and
//! exit with status 2 rather than silently use memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachet::{CacheError, CacheService, CacheServiceExt, MokaCacheService};
use serde::{Deserialize, Serialize};

/// What the app caches per org.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgContext {
    id: u64,
    slug: String,
    name: String,
    plan: String,
    features: Vec<String>,
    settings: BTreeMap<String, String>,
}

/// Stands in for the app's database: slow, and counts its loads.
#[derive(Default)]
struct FakeOrgStore {
    loads: AtomicUsize,
}

impl FakeOrgStore {
    async fn load_by_slug(&self, slug: &str) -> Option<OrgContext> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await; // a database round trip
        let (id, name) = match slug {
            "acme" => (1, "Acme Corp"),
            "globex" => (2, "Globex"),
            "initech" => (3, "Initech"),
            _ => return None,
        };
        Some(OrgContext {
            id,
            slug: slug.to_owned(),
            name: name.to_owned(),
            plan: "pro".to_owned(),
            features: vec!["sso".to_owned(), "audit-log".to_owned()],
            settings: BTreeMap::from([("locale".to_owned(), "en-GB".to_owned())]),
        })
    }
}

/// Cache-aside: the cache first, the store on a miss, then fill the cache.
async fn resolve(
    cache: &dyn CacheService,
    store: &FakeOrgStore,
    slug: &str,
    ttl_secs: Option<u64>,
) -> Result<Option<OrgContext>, CacheError> {
    let key = format!("org:{slug}");
    if let Some(ctx) = cache.get::<OrgContext>(&key).await? {
        println!("  {key:<14} hit   -> {}", ctx.name);
        return Ok(Some(ctx));
    }
    let Some(ctx) = store.load_by_slug(slug).await else {
        println!("  {key:<14} miss  -> not in the store");
        return Ok(None);
    };
    cache.set(&key, &ctx, ttl_secs).await?;
    println!(
        "  {key:<14} miss  -> loaded {} from the store, cached",
        ctx.name
    );
    Ok(Some(ctx))
}

#[tokio::main]
async fn main() -> Result<(), CacheError> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        eprintln!(
            "REDIS_URL is set ({url}), but the Redis backend is not part of cachet yet; \
             unset REDIS_URL to run this example on the in-memory backend."
        );
        std::process::exit(2);
    }

    let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    let store = FakeOrgStore::default();
    println!("backend: {cache:?}");

    println!("\n1. first request misses and loads, the second hits:");
    resolve(&*cache, &store, "acme", None).await?;
    resolve(&*cache, &store, "acme", None).await?;

    println!("\n2. a 1-second TTL: a hit at once, a miss once it has expired:");
    resolve(&*cache, &store, "globex", Some(1)).await?;
    resolve(&*cache, &store, "globex", Some(1)).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    println!("  ... 1.5 s later");
    resolve(&*cache, &store, "globex", Some(1)).await?;

    println!("\n3. prefix invalidation removes every org entry, and says how many:");
    resolve(&*cache, &store, "initech", None).await?;
    cache.set("org:id:1", &1, None).await?;
    cache.set("session:42", &"not an org key", None).await?;
    let removed = cache.invalidate_prefix("org:").await?;
    println!("  invalidate_prefix(\"org:\") removed {removed} entries");
    resolve(&*cache, &store, "acme", None).await?;
    let session: Option<String> = cache.get("session:42").await?;
    println!("  session:42 still cached: {}", session.is_some());

    println!("\n4. a bad value under a key is an error that names it, not a panic:");
    cache
        .set_bytes("org:corrupt", bytes::Bytes::from_static(b"{not json"), None)
        .await?;
    match cache.get::<OrgContext>("org:corrupt").await {
        Err(e) => println!("  {e}"),
        Ok(v) => println!("  unexpected: {v:?}"),
    }

    println!(
        "\nstore loads: {} (for 8 resolutions)",
        store.loads.load(Ordering::Relaxed)
    );
    Ok(())
}
