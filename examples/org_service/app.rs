//! The org service itself: settings, the file-backed org store, the cache, the routes.
//! `main.rs` runs it as a server; `tests/org_service_e2e.rs` runs the same code, two
//! instances at a time.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::handler::Handler;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use cachet::middleware::{OrgLayer, OrgSource, ResolvedOrg};
use cachet::org::{OrgIdentity, OrgStore};
use cachet::{
    CacheError, CacheService, EncryptedCacheService, EncryptionKey, EncryptionKeys,
    MokaCacheService, OrgResolver, RedisCacheService, TieredCacheService,
};
use serde::{Deserialize, Serialize};

/// What the service needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Redis (through a tiered cache: an in-memory L1 per instance, invalidated over
    /// pub/sub) when set, the in-memory cache alone otherwise.
    pub redis_url: Option<String>,
    /// The org store: one `<slug>.json` file per org; created if missing.
    pub store_dir: PathBuf,
    /// An artificial delay on every store load, to make loads visible.
    pub store_delay: Duration,
    /// The invalidation channel prefix (`None`: the library's default). Instances that must
    /// hear each other use the same one.
    pub channel_prefix: Option<String>,
    /// The key that encrypts what goes to Redis (XChaCha20-Poly1305, see
    /// `cachet::EncryptedCacheService`); required with Redis, since org contexts hold
    /// secrets. Every instance uses the same one.
    pub encryption_key: Option<EncryptionKey>,
}

/// What the service caches per org. It holds a secret: what goes to a shared Redis is to
/// be encrypted (see [`build_cache`]).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgContext {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub api_secret: String,
}

impl fmt::Debug for OrgContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgContext")
            .field("id", &self.id)
            .field("slug", &self.slug)
            .field("name", &self.name)
            .field("plan", &self.plan)
            .field("api_secret", &"<redacted>")
            .finish()
    }
}

impl OrgIdentity for OrgContext {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

/// What `GET /orgs/{slug}` returns: the context without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgView {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub plan: String,
    /// Served by fail-safe: the store failed and this is the last known context.
    pub stale: bool,
}

/// The body of `PUT /orgs/{slug}` (the slug comes from the path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrgInput {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub api_secret: String,
}

/// What `GET /stats` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `"tiered"` (Redis with an L1) or `"memory"`.
    pub backend: String,
    /// Loads from the org store by this instance so far.
    pub store_loads: u64,
    /// Other instances' invalidations applied to this instance's L1 (tiered only).
    pub invalidations_applied: Option<u64>,
}

/// Why the org store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read org file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("org file {path} is not a valid org: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot list the org store {dir}: {source}")]
    List { dir: PathBuf, source: io::Error },
}

/// Whether `slug` can name a store file: 1 to 63 of `a-z`, `0-9` and `-`, not starting
/// with `-`. This keeps `..`, `/` and the like out of file paths.
pub fn valid_slug(slug: &str) -> bool {
    (1..=63).contains(&slug.len())
        && !slug.starts_with('-')
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The org store: a directory of `<slug>.json` files, an optional delay per load, and a
/// count of loads.
#[derive(Debug)]
pub struct FileOrgStore {
    dir: PathBuf,
    delay: Duration,
    loads: AtomicU64,
}

impl FileOrgStore {
    /// The store in `dir`, which is created if missing.
    pub fn open(dir: &Path, delay: Duration) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(FileOrgStore {
            dir: dir.to_owned(),
            delay,
            loads: AtomicU64::new(0),
        })
    }

    /// Loads (by slug or by id) so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    /// The file of a valid slug.
    pub fn path_of(&self, slug: &str) -> Option<PathBuf> {
        valid_slug(slug).then(|| self.dir.join(format!("{slug}.json")))
    }

    /// The org in `path`, or `None` when there is no such file.
    async fn read(&self, path: &Path) -> Result<Option<OrgContext>, StoreError> {
        let text = match tokio::fs::read(path).await {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // No such org, unless the store itself is gone: that is a failure.
                return match tokio::fs::metadata(&self.dir).await {
                    Ok(meta) if meta.is_dir() => Ok(None),
                    _ => Err(StoreError::Read {
                        path: path.to_owned(),
                        source: e,
                    }),
                };
            }
            Err(source) => {
                return Err(StoreError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_owned(),
                source,
            })
    }

    /// The current org with this slug, without counting a load (for writes).
    pub async fn current(&self, slug: &str) -> Result<Option<OrgContext>, StoreError> {
        match self.path_of(slug) {
            Some(path) => self.read(&path).await,
            None => Ok(None),
        }
    }

    /// Writes the org's file (a temporary file renamed over it, so that a reader never
    /// sees half of it).
    pub async fn write(&self, org: &OrgContext) -> io::Result<()> {
        let path = self
            .path_of(&org.slug)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a valid org slug"))?;
        let json = serde_json::to_vec_pretty(org)?;
        let temporary = self.dir.join(format!(".{}.json.tmp", org.slug));
        tokio::fs::write(&temporary, json).await?;
        tokio::fs::rename(&temporary, &path).await
    }

    async fn begin_load(&self) {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

impl OrgStore for FileOrgStore {
    type Context = OrgContext;
    type Error = StoreError;

    async fn load_by_slug(&self, slug: &str) -> Result<Option<OrgContext>, StoreError> {
        self.begin_load().await;
        match self.path_of(slug) {
            Some(path) => self.read(&path).await,
            None => Ok(None), // not a slug this store can hold
        }
    }

    /// A scan of every file: fine for a demo, an index in a real database.
    async fn load_by_id(&self, id: &str) -> Result<Option<OrgContext>, StoreError> {
        self.begin_load().await;
        let list_error = |source| StoreError::List {
            dir: self.dir.clone(),
            source,
        };
        let mut entries = tokio::fs::read_dir(&self.dir).await.map_err(list_error)?;
        while let Some(entry) = entries.next_entry().await.map_err(list_error)? {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            // A broken file belongs to some other org: skip it.
            if let Ok(Some(org)) = self.read(&path).await {
                if org.id == id {
                    return Ok(Some(org));
                }
            }
        }
        Ok(None)
    }
}

/// Builds the cache: a [`TieredCacheService`] over Redis when a URL is set, encrypted with
/// `settings.encryption_key` (key id 1), the in-memory [`MokaCacheService`] otherwise.
/// Returns the cache the app uses and, for the tiered backend, its handle (for its
/// invalidation counter).
pub async fn build_cache(
    settings: &Settings,
) -> Result<(Arc<dyn CacheService>, Option<TieredCacheService>), CacheError> {
    let (cache, tiered): (Arc<dyn CacheService>, _) = match &settings.redis_url {
        Some(url) => {
            let mut builder = TieredCacheService::builder(RedisCacheService::builder(url));
            if let Some(prefix) = &settings.channel_prefix {
                builder = builder.channel_prefix(prefix);
            }
            // Org contexts hold `api_secret`: nothing goes to the shared Redis unencrypted.
            let Some(key) = settings.encryption_key.clone() else {
                return Err(CacheError::config(
                    "with REDIS_URL, CACHE_ENCRYPTION_KEY is required (64 hex digits or the \
                     base64 of 32 bytes, e.g. from `openssl rand -base64 32`), the same on \
                     every instance",
                    None,
                ));
            };
            let tiered = builder.build().await?;
            let keys = EncryptionKeys::new(1, key);
            let encrypted = EncryptedCacheService::new(tiered.clone(), keys);
            (Arc::new(encrypted), Some(tiered))
        }
        None => (Arc::new(MokaCacheService::default()), None),
    };
    Ok((cache, tiered))
}

/// The service's shared state.
#[derive(Clone)]
pub struct AppState {
    pub resolver: Arc<OrgResolver<FileOrgStore>>,
    pub tiered: Option<TieredCacheService>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("resolver", &self.resolver)
            .field("tiered", &self.tiered)
            .finish()
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the org store {dir}: {source}")]
    Store { dir: PathBuf, source: io::Error },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Opens the store and builds the cache and the resolver.
pub async fn build_state(settings: &Settings) -> Result<AppState, StartError> {
    let store =
        FileOrgStore::open(&settings.store_dir, settings.store_delay).map_err(|source| {
            StartError::Store {
                dir: settings.store_dir.clone(),
                source,
            }
        })?;
    let (cache, tiered) = build_cache(settings).await?;
    let resolver = OrgResolver::new(cache, store)
        .ttl_secs(300)
        .negative_ttl_secs(Some(30))
        // When the store fails, serve the last known org for up to an hour (marked stale).
        .fail_safe(Duration::from_secs(3600))
        .load_timeout(Duration::from_secs(2) + settings.store_delay);
    Ok(AppState {
        resolver: Arc::new(resolver),
        tiered,
    })
}

/// The routes: `GET /orgs/{slug}` (through the org middleware), `PUT /orgs/{slug}`,
/// `GET /stats`.
pub fn app(state: AppState) -> Router {
    let org_layer = OrgLayer::new(Arc::clone(&state.resolver), OrgSource::path_segment(1));
    Router::new()
        .route("/orgs/{slug}", get(get_org.layer(org_layer)).put(put_org))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn get_org(Extension(org): Extension<ResolvedOrg<OrgContext>>) -> Json<OrgView> {
    Json(OrgView {
        id: org.id.clone(),
        slug: org.slug.clone(),
        name: org.name.clone(),
        plan: org.plan.clone(),
        stale: org.is_stale(),
    })
}

type Failure = (StatusCode, &'static str);

/// Writes the org to the store, then invalidates its two cache keys (on every instance,
/// through the tiered cache).
async fn put_org(
    State(state): State<AppState>,
    UrlPath(slug): UrlPath<String>,
    Json(input): Json<OrgInput>,
) -> Result<Json<OrgView>, Failure> {
    if !valid_slug(&slug) || cachet::org::validate_id(&input.id).is_err() {
        return Err((StatusCode::BAD_REQUEST, "invalid slug or id\n"));
    }
    let store = state.resolver.store();
    // The previous id, whose cache key must go too if the id changes.
    let previous = store.current(&slug).await.ok().flatten().map(|org| org.id);
    let org = OrgContext {
        id: input.id,
        slug,
        name: input.name,
        plan: input.plan,
        api_secret: input.api_secret,
    };
    if let Err(e) = store.write(&org).await {
        eprintln!("org_service: writing org {}: {e}", org.slug);
        return Err((StatusCode::INTERNAL_SERVER_ERROR, "cannot save the org\n"));
    }
    let mut invalidated = state.resolver.invalidate_org(&org.slug, &org.id).await;
    if let Some(previous) = previous.filter(|previous| *previous != org.id) {
        invalidated = invalidated.and(state.resolver.invalidate_org(&org.slug, &previous).await);
    }
    if let Err(e) = invalidated {
        // Saved, but other instances may serve the old org until its TTL runs out.
        eprintln!("org_service: invalidating org {}: {e}", org.slug);
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "saved, but the cache could not be invalidated\n",
        ));
    }
    Ok(Json(OrgView {
        id: org.id,
        slug: org.slug,
        name: org.name,
        plan: org.plan,
        stale: false,
    }))
}

async fn stats(State(state): State<AppState>) -> Json<Stats> {
    Json(Stats {
        backend: if state.tiered.is_some() {
            "tiered"
        } else {
            "memory"
        }
        .to_owned(),
        store_loads: state.resolver.store().loads(),
        invalidations_applied: state
            .tiered
            .as_ref()
            .map(TieredCacheService::invalidations_applied),
    })
}
