//! cachet in five minutes: cache-aside loading of an org (tenant) context in front of a slow
//! store, with hits, misses, TTL expiry and prefix invalidation.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! With no setup it runs on the in-memory backend (`MokaCacheService`); with `REDIS_URL` set
//! (for example `REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart`) it runs
//! the same steps on Redis. Every key it writes starts with `quickstart:`, and it removes
//! only those, so it is safe to point at a Redis that holds other data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachet::{CacheError, CacheService, CacheServiceExt, CacheSettings};

/// Every key this example writes starts with this, and it removes nothing else.
const PREFIX: &str = "quickstart:";
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
    let key = format!("{PREFIX}org:{slug}");
    if let Some(ctx) = cache.get::<OrgContext>(&key).await? {
        println!("  {key:<24} hit   -> {}", ctx.name);
        return Ok(Some(ctx));
    }
    let Some(ctx) = store.load_by_slug(slug).await else {
        println!("  {key:<24} miss  -> not in the store");
        return Ok(None);
    };
    cache.set(&key, &ctx, ttl_secs).await?;
    println!(
        "  {key:<24} miss  -> loaded {} from the store, cached",
        ctx.name
    );
    Ok(Some(ctx))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("quickstart: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), CacheError> {
    // REDIS_URL set: Redis; unset: in memory. A bad URL or an unreachable server is an error
    // that says which, within the connect timeout.
    let cache: Arc<dyn CacheService> = CacheSettings::from_env()?.build().await?;
    // Start clean: remove what an earlier run left (only this example's keys).
    cache.invalidate_prefix(PREFIX).await?;
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
    cache.set(&format!("{PREFIX}org:id:1"), &1, None).await?;
    cache
        .set(&format!("{PREFIX}session:42"), &"not an org key", None)
        .await?;
    let removed = cache.invalidate_prefix(&format!("{PREFIX}org:")).await?;
    println!("  invalidate_prefix(\"{PREFIX}org:\") removed {removed} entries");
    resolve(&*cache, &store, "acme", None).await?;
    let session: Option<String> = cache.get(&format!("{PREFIX}session:42")).await?;
    println!("  {PREFIX}session:42 still cached: {}", session.is_some());

    println!("\n4. a bad value under a key is an error that names it, not a panic:");
    let corrupt = format!("{PREFIX}org:corrupt");
    cache
        .set_bytes(&corrupt, bytes::Bytes::from_static(b"{not json"), None)
        .await?;
    match cache.get::<OrgContext>(&corrupt).await {
        Err(e) => println!("  {e}"),
        Ok(v) => println!("  unexpected: {v:?}"),
    }

    println!(
        "\nstore loads: {} (for 8 resolutions)",
        store.loads.load(Ordering::Relaxed)
    );
    cache.invalidate_prefix(PREFIX).await?;
    Ok(())
}
