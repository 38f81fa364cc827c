//! The org service itself: settings, the file-backed org store, the cache, the routes.
//! `main.rs` runs it as a server; `tests/org_service_e2e.rs` runs the same code, two
//! instances at a time.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::extract::{Path as UrlPath, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use cachet::middleware::{OrgLayer, OrgSource, ResolvedOrg};
use cachet::org::{OrgIdentity, OrgStore};
use cachet::token::{MIN_DIGEST_KEY_LEN, ValidToken};
use cachet::{
    CacheError, CacheService, EncryptionKey, EncryptionKeys, MokaCacheService, OrgResolver,
    RedisCacheService, TieredCacheService, TokenCache,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The longest a validated API key stays cached, in seconds: a key revoked behind the
/// service's back (an org file edited by hand) works at most this long.
pub const TOKEN_TTL_SECS: u64 = 60;

/// The content type of `GET /metrics`: Prometheus's text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The buckets (upper bounds, in seconds) of every `*_seconds` histogram: cachet's
/// operation, load and lock-wait durations. From 50 µs (about an L1 hit; a Redis round trip
/// takes longer, even on loopback) to 2.5 s (above the 2 s load timeouts, so a load that
/// timed out lands in a bucket of its own); slower is `+Inf`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// The Prometheus recorder of `GET /metrics`: durations (`*_seconds`) as histograms with
/// [`DURATION_BUCKETS`] (which Prometheus can aggregate across instances), not the default
/// summaries. No HTTP listener of its own (the exporter's default features are off): the
/// service's router answers `/metrics`.
///
/// Install it (`.install_recorder()`) **before** [`build_state`]: cachet's services register
/// their metric handles when they are built, and one built before the recorder reports to
/// nothing for its whole life. Whoever installs it runs [`PrometheusHandle::run_upkeep`] now
/// and then (a scrape does it too), so that histogram samples do not pile up between scrapes.
pub fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &DURATION_BUCKETS)
        .expect("the buckets are not empty")
}

/// What the service needs to start.
#[derive(Clone)]
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
    /// The key that encrypts what goes to Redis (AES-256-GCM-SIV at the tiered cache's L2
    /// boundary, see `cachet::TieredCacheServiceBuilder::encrypt_l2`; the L1 holds plain
    /// values); required with Redis, since org contexts hold secrets. Every instance uses
    /// the same one.
    pub encryption_key: Option<EncryptionKey>,
    /// The HMAC-SHA256 key under which API keys are cached (`token:<hex HMAC(key, api
    /// key)>`, see `cachet::TokenCache::with_digest_key`), so that a copy of the cache's
    /// keys does not let anyone test guessed API keys offline. At least 16 bytes (32 random
    /// bytes recommended). Required with Redis, and the same on every instance (a different
    /// key only misses the others' entries); without Redis, `None` draws a random key at
    /// startup (only this process reads its in-memory cache).
    pub token_digest_key: Option<Vec<u8>>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(cachet::redact_url),
            )
            .field("store_dir", &self.store_dir)
            .field("store_delay", &self.store_delay)
            .field("channel_prefix", &self.channel_prefix)
            .field("encryption_key", &self.encryption_key)
            .field(
                "token_digest_key",
                &self.token_digest_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Parses a token digest key: 64 hex digits (32 bytes), or base64 (standard or URL-safe,
/// padding optional) of at least [`MIN_DIGEST_KEY_LEN`] bytes. Hex with a typo (64
/// characters not all hex digits, or hex digits but not 64) is refused rather than read as
/// base64, which would silently give this instance a key of its own. The error never
/// repeats the text (it may be a real key with a typo).
pub fn parse_token_digest_key(text: &str) -> Result<Vec<u8>, String> {
    /// Longer than any sensible key (the base64 of 192 bytes).
    const MAX_TEXT_LEN: usize = 256;
    let text = text.trim();
    let all_hex = !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit());
    match (text.len(), all_hex) {
        (64, true) => return hex::decode(text).map_err(|e| format!("is not valid hex: {e}")),
        (64, false) => {
            return Err(
                "is 64 characters but not all hex digits (a typo?); use 64 hex digits \
                        or the base64 of 32 bytes (`openssl rand -base64 32`)"
                    .to_owned(),
            );
        }
        (n, true) => return Err(format!("is {n} hex digits; a hex key is 64")),
        _ => {}
    }
    let malformed = || {
        format!(
            "({} characters) is neither 64 hex digits nor the base64 of at least \
             {MIN_DIGEST_KEY_LEN} bytes; make one with `openssl rand -base64 32`",
            text.chars().count()
        )
    };
    if text.len() > MAX_TEXT_LEN {
        return Err(malformed());
    }
    let key = STANDARD_PAD_INDIFFERENT
        .decode(text)
        .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(text))
        .map_err(|_| malformed())?;
    if key.len() < MIN_DIGEST_KEY_LEN {
        return Err(format!(
            "decodes as base64 to {} bytes; at least {MIN_DIGEST_KEY_LEN} are needed (32 \
             recommended: `openssl rand -base64 32`)",
            key.len()
        ));
    }
    Ok(key)
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

/// What `GET /me` returns for a valid API key, and what the token cache holds for it (no
/// secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub id: String,
    pub slug: String,
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
    /// API keys validated against the org store by this instance (cache misses of `GET /me`).
    pub token_validations: u64,
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

/// Builds the cache: a [`TieredCacheService`] over Redis when a URL is set, whose values are
/// encrypted on their way to Redis with `settings.encryption_key` (key id 1) while its L1
/// keeps them plain, so an org read served by the L1 costs neither a decryption nor (through
/// `get_shared`) a decode; the in-memory [`MokaCacheService`] otherwise.
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
            let tiered = builder
                .encrypt_l2(EncryptionKeys::new(1, key))
                .build()
                .await?;
            (Arc::new(tiered.clone()), Some(tiered))
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
    /// Validated API keys, on the resolver's cache, keyed by HMAC under the digest key.
    pub tokens: TokenCache<TokenClaims>,
    /// API keys validated against the store so far (`FileOrgStore::current` counts no load).
    pub token_validations: Arc<AtomicU64>,
    /// What `GET /metrics` renders (`None`: 404). Set with [`AppState::with_metrics`].
    pub metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// Serves `GET /metrics` from this Prometheus recorder, which was installed before
    /// [`build_state`] built the caches (see [`prometheus_builder`]).
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `TokenCache`'s Debug says whether it is keyed, never the key.
        f.debug_struct("AppState")
            .field("resolver", &self.resolver)
            .field("tiered", &self.tiered)
            .field("tokens", &self.tokens)
            .field(
                "token_validations",
                &self.token_validations.load(Ordering::SeqCst),
            )
            .field("metrics", &self.metrics.as_ref().map(|_| "Prometheus"))
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
    #[error("TOKEN_DIGEST_KEY: {0}")]
    TokenDigestKey(String),
}

/// The digest key from the settings, or (no Redis, none set) a random one.
fn token_digest_key(settings: &Settings) -> Result<Zeroizing<Vec<u8>>, StartError> {
    match &settings.token_digest_key {
        Some(key) if key.len() < MIN_DIGEST_KEY_LEN => Err(StartError::TokenDigestKey(format!(
            "the key is {} bytes; at least {MIN_DIGEST_KEY_LEN} are needed (make one with \
             `openssl rand -base64 32`)",
            key.len()
        ))),
        Some(key) => Ok(Zeroizing::new(key.clone())),
        None if settings.redis_url.is_some() => Err(StartError::TokenDigestKey(format!(
            "required with REDIS_URL: 64 hex digits or the base64 of at least \
             {MIN_DIGEST_KEY_LEN} bytes (e.g. `export TOKEN_DIGEST_KEY=\"$(openssl rand -base64 \
             32)\"`), the same on every instance"
        ))),
        None => {
            // Only this process reads its in-memory cache: a key of its own will do.
            let mut key = Zeroizing::new(vec![0u8; 32]);
            rand::fill(&mut key[..]);
            Ok(key)
        }
    }
}

/// Opens the store and builds the cache, the resolver and the token cache.
pub async fn build_state(settings: &Settings) -> Result<AppState, StartError> {
    // Checked first: a missing key is a configuration error, not worth a connection.
    let digest_key = token_digest_key(settings)?;
    let store =
        FileOrgStore::open(&settings.store_dir, settings.store_delay).map_err(|source| {
            StartError::Store {
                dir: settings.store_dir.clone(),
                source,
            }
        })?;
    let (cache, tiered) = build_cache(settings).await?;
    let tokens = TokenCache::new(Arc::clone(&cache))
        .with_digest_key(&digest_key)
        .map_err(|e| StartError::TokenDigestKey(e.to_string()))?
        .max_ttl_secs(TOKEN_TTL_SECS)
        .load_timeout(Duration::from_secs(2));
    let resolver = OrgResolver::new(cache, store)
        .ttl_secs(300)
        .negative_ttl_secs(Some(30))
        // When the store fails, serve the last known org for up to an hour (marked stale).
        .fail_safe(Duration::from_secs(3600))
        .load_timeout(Duration::from_secs(2) + settings.store_delay);
    Ok(AppState {
        resolver: Arc::new(resolver),
        tiered,
        tokens,
        token_validations: Arc::new(AtomicU64::new(0)),
        metrics: None,
    })
}

/// The routes: `GET /orgs/{slug}` (through the org middleware), `PUT /orgs/{slug}`,
/// `GET /me` (by API key), `GET /stats`, `GET /metrics` (Prometheus text format; 404 without
/// [`AppState::with_metrics`]).
pub fn app(state: AppState) -> Router {
    let org_layer = OrgLayer::new(Arc::clone(&state.resolver), OrgSource::path_segment(1));
    Router::new()
        .route("/orgs/{slug}", get(get_org.layer(org_layer)).put(put_org))
        .route("/me", get(me))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What the recorder holds, in Prometheus's text format: every metric of this process (all
/// its caches report to the one global recorder).
async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
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

/// The one answer to every rejected API key: missing, malformed, unknown org, wrong secret.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "invalid or missing API key\n",
    )
        .into_response()
}

/// The API key of `authorization: Bearer <slug>.<api_secret>`, canonical (its slug
/// lowercased, so that `Acme.x` and `acme.x` are one cache entry and one invalidation):
/// `(key, slug, secret)`. `None` for anything else, before the store or the cache is touched.
fn api_key(headers: &HeaderMap) -> Option<(String, String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    // A slug has no '.', so the first one ends it; the secret may hold more.
    let (slug, secret) = credentials.trim().split_once('.')?;
    let slug = cachet::org::canonical_slug(slug).ok()?;
    if secret.is_empty() {
        return None;
    }
    Some((format!("{slug}.{secret}"), slug, secret.to_owned()))
}

/// Whether two byte strings are equal, in time that depends on neither their contents nor
/// their lengths: both are hashed first (so the comparison is of 32 bytes, always), then
/// compared without an early exit.
fn secrets_match(presented: &[u8], stored: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(presented), Sha256::digest(stored));
    let difference = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Checks `<slug>.<secret>` against the store: the truth, not the org cache, so a secret
/// changed behind the service's back counts. `Ok(None)` for an unknown org or a wrong secret.
async fn validate_api_key(
    store: &FileOrgStore,
    slug: &str,
    secret: &str,
) -> Result<Option<ValidToken<TokenClaims>>, StoreError> {
    let Some(org) = store.current(slug).await? else {
        return Ok(None);
    };
    if !secrets_match(secret.as_bytes(), org.api_secret.as_bytes()) {
        return Ok(None);
    }
    Ok(Some(ValidToken {
        claims: TokenClaims {
            id: org.id,
            slug: org.slug,
        },
        // API keys do not expire; the token cache's TTL bounds the entry.
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    }))
}

/// The org of the API key, checked against the store on a token-cache miss (cached for at
/// most [`TOKEN_TTL_SECS`]): 200 with its claims, 401 for any bad key, 503 when the store
/// fails.
async fn me(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((key, slug, secret)) = api_key(&headers) else {
        return unauthorized();
    };
    let validate = async {
        state.token_validations.fetch_add(1, Ordering::SeqCst);
        validate_api_key(state.resolver.store(), &slug, &secret).await
    };
    match state.tokens.get_or_validate(&key, validate).await {
        Ok(Some(claims)) => Json(claims).into_response(),
        Ok(None) => unauthorized(),
        Err(e) => {
            // The error names the cache key (a digest), never the API key.
            eprintln!("org_service: validating an API key of org {slug}: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "org service temporarily unavailable\n",
            )
                .into_response()
        }
    }
}

/// Writes the org to the store, then invalidates its two cache keys and, when its secret
/// (or id) changed, its previous API key (on every instance, through the tiered cache).
async fn put_org(
    State(state): State<AppState>,
    UrlPath(slug): UrlPath<String>,
    Json(input): Json<OrgInput>,
) -> Result<Json<OrgView>, Failure> {
    if !valid_slug(&slug) || cachet::org::validate_id(&input.id).is_err() {
        return Err((StatusCode::BAD_REQUEST, "invalid slug or id\n"));
    }
    let store = state.resolver.store();
    // The previous org: its id's cache key must go too if the id changes, its API key if the
    // secret (or the id, which the key's claims hold) changes.
    let previous = store.current(&slug).await.ok().flatten();
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
    if let Some(previous) = previous.as_ref().filter(|previous| previous.id != org.id) {
        invalidated = invalidated.and(state.resolver.invalidate_org(&org.slug, &previous.id).await);
    }
    if let Some(previous) =
        previous.filter(|previous| previous.id != org.id || previous.api_secret != org.api_secret)
    {
        // The old key stops working at once, on every instance.
        let old_key = format!("{}.{}", org.slug, previous.api_secret);
        invalidated = invalidated.and(state.tokens.invalidate(&old_key).await);
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
        token_validations: state.token_validations.load(Ordering::SeqCst),
    })
}
