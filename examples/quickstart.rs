//! cachet in five minutes: cache-aside loading of an org (tenant) context in front of a slow
//! store (`get_or_load_with`), with hits, misses, TTL expiry, prefix invalidation, and a
//! stampede of concurrent first requests that reaches the store once.
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
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cachet::{CacheService, CacheServiceExt, CacheSettings, LoadError, LoadOptions, LoadSource};

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

/// Cache-aside: the cache first; on a miss the store (once, however many callers miss at
/// the same time), then the cache is filled.
async fn resolve(
    cache: &dyn CacheService,
    store: &FakeOrgStore,
    slug: &str,
    ttl_secs: Option<u64>,
) -> Result<Option<OrgContext>, LoadError<Infallible>> {
    let key = format!("{PREFIX}org:{slug}");
    let mut options = LoadOptions::default();
    if let Some(secs) = ttl_secs {
        options = options.ttl_secs(secs);
    }
    let loaded = cache
        .get_or_load_with(&key, &options, || async {
            Ok(store.load_by_slug(slug).await)
        })
        .await?;
    match (&loaded.value, loaded.source) {
        (Some(ctx), LoadSource::Cache) => println!("  {key:<24} hit   -> {}", ctx.name),
        (Some(ctx), _) => println!(
            "  {key:<24} miss  -> loaded {} from the store, cached",
            ctx.name
        ),
        (None, _) => println!("  {key:<24} miss  -> not in the store"),
    }
    Ok(loaded.value)
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("quickstart: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // REDIS_URL set: Redis; unset: in memory. A bad URL or an unreachable server is an error
    // that says which, within the connect timeout.
    let cache: Arc<dyn CacheService> = CacheSettings::from_env()?.build().await?;
    // Start clean: remove what an earlier run left (only this example's keys).
    cache.invalidate_prefix(PREFIX).await?;
    let store = Arc::new(FakeOrgStore::default());
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

    println!("\n5. 100 concurrent first requests for one org reach the store once:");
    let before = store.loads.load(Ordering::Relaxed);
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let (cache, store) = (Arc::clone(&cache), Arc::clone(&store));
            tokio::spawn(async move {
                let key = format!("{PREFIX}org:initech");
                cache
                    .get_or_load(&key, None, || async {
                        Ok::<_, Infallible>(store.load_by_slug("initech").await)
                    })
                    .await
            })
        })
        .collect();
    for request in requests {
        request.await??;
    }
    println!(
        "  100 concurrent requests, {} store load",
        store.loads.load(Ordering::Relaxed) - before
    );

    println!(
        "\nstore loads: {} (for 108 resolutions)",
        store.loads.load(Ordering::Relaxed)
    );
    cache.invalidate_prefix(PREFIX).await?;
    Ok(())
}
