//! The Redis backend, on `fred` 10: standalone, Cluster, Sentinel (and Valkey).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as RedisError, Expiration, KeysInterface, Pool,
    ReconnectPolicy,
};
use fred::types::Key;
use fred::types::scan::Scanner;
use futures_util::stream::StreamExt;

mod config;
pub mod lease;

pub use self::config::redact_url;
use self::config::{describe_server, tls_with_roots};
#[cfg(feature = "future-slots")]
use crate::future_slot::boxed as box_future;
use crate::load::{Lease, LeaseRead, LeaseRequest};
use crate::service::{BoxFuture, DEFAULT_TTL_SECS, check_default_ttl, resolve_ttl};
use crate::{BoxError, CacheError, CacheService};

/// Default time allowed to connect (TCP, TLS, `AUTH`) before the service fails to build.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one command, reconnection waits included.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `COUNT` hint of the first `SCAN` page in `invalidate_prefix`.
pub const DEFAULT_SCAN_COUNT: u32 = 1_000;

/// The URL schemes a Redis service accepts (anything else is refused before connecting).
const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
    "valkey-cluster",
    "valkeys-cluster",
    "valkey-sentinel",
    "valkeys-sentinel",
];

/// The cache on Redis (or Valkey): many instances share what one writes.
///
/// One auto-pipelined `fred` client by default (the fastest on the machines measured; a
/// pool is one builder call away). Every command has a timeout (2 s by default), so a server
/// that is down or dies mid-call gives [`CacheError::Backend`] naming it within that bound,
/// never a hang; the client reconnects in the background, and the same service works again
/// once the server is back.
///
/// The guarantee: a read that starts after a `set`, `invalidate` or `invalidate_prefix`
/// returned sees that write or a later one, on every instance; a cache-aside load overtaken
/// by one of them does not write back (see [`crate::load::lease`]).
///
/// A key is stored under exactly its name (one Redis key per entry) unless a namespace is
/// configured; a key being loaded holds a lease (a hash, which reads as a miss); `None` as TTL stores it with the default TTL; `invalidate_prefix` runs `SCAN
/// MATCH` on the escaped literal prefix (on every primary of a cluster) and `UNLINK`s what it
/// finds in batches, grouped by hash slot.
///
/// URLs: `redis://[user:password@]host:port[/db]`, `rediss://` (TLS, system roots),
/// `redis-cluster://host:port?node=host2:port2&node=...`,
/// `redis-sentinel://host:port/db?sentinelServiceName=NAME&node=...` (the hosts are
/// sentinels).
///
/// ```no_run
/// use cachet::{CacheServiceExt, RedisCacheService};
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = RedisCacheService::new("redis://127.0.0.1:6379", 300).await?;
/// cache.set("org:acme", &"Acme", None).await?;
///
/// let tuned = RedisCacheService::builder("redis-cluster://10.0.0.1:7000?node=10.0.0.2:7000")
///     .command_timeout(Duration::from_millis(500))
///     .namespace("billing:")
///     .build()
///     .await?;
/// # let _ = tuned; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisCacheService {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    /// What errors name: the server(s), never a password.
    server: String,
    namespace: String,
    default_ttl: Duration,
    command_timeout: Duration,
    scan_count: u32,
    clustered: bool,
}

enum Connection {
    Single(Client),
    Pool(Pool),
}

impl Connection {
    fn client(&self) -> &Client {
        match self {
            Connection::Single(client) => client,
            Connection::Pool(pool) => pool.next(),
        }
    }

    fn clients(&self) -> Vec<Client> {
        match self {
            Connection::Single(client) => vec![client.clone()],
            Connection::Pool(pool) => pool.clients().to_vec(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the connections (and stop reconnecting) when the last handle goes away.
        let clients = self.connection.clients();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for client in clients {
                    let _ = client.quit().await;
                }
            });
        }
    }
}

impl RedisCacheService {
    /// Connects to `redis_url` with the defaults (one client, connect timeout 5 s, command
    /// timeout 2 s, no namespace) and `default_ttl_secs` for `set` calls that pass `None`.
    ///
    /// A malformed URL or a default TTL of 0 is [`CacheError::Config`]; a server that cannot
    /// be reached within the connect timeout is [`CacheError::Backend`] naming it.
    pub async fn new(redis_url: &str, default_ttl_secs: u64) -> Result<Self, CacheError> {
        Self::builder(redis_url)
            .default_ttl_secs(default_ttl_secs)
            .build()
            .await
    }

    /// A builder for `redis_url` with the defaults.
    pub fn builder(redis_url: impl Into<String>) -> RedisCacheServiceBuilder {
        RedisCacheServiceBuilder {
            url: redis_url.into(),
            default_ttl_secs: DEFAULT_TTL_SECS,
            pool_size: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            namespace: String::new(),
            scan_count: DEFAULT_SCAN_COUNT,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
            reconnect_max_attempts: 0,
            tls_root_certificates_pem: None,
        }
    }

    /// The TTL applied when a `set` passes `None`.
    pub fn default_ttl(&self) -> Duration {
        self.inner.default_ttl
    }

    /// The server(s) this service talks to, as errors name them.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The namespace put before every key (`""` for none).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Every connection's client (one, or the pool's).
    /// How long one command may take before it is an error.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }

    pub(crate) fn clients(&self) -> Vec<Client> {
        self.inner.connection.clients()
    }

    /// The underlying `fred` client (one of the pool's, if a pool is configured), for
    /// commands cachet does not wrap. Keys written through it are not namespaced.
    pub fn client(&self) -> &Client {
        self.inner.connection.client()
    }

    pub(super) fn full_key<'k>(&self, key: &'k str) -> Cow<'k, str> {
        if self.inner.namespace.is_empty() {
            Cow::Borrowed(key)
        } else {
            Cow::Owned(format!("{}{key}", self.inner.namespace))
        }
    }

    pub(super) fn backend_error(
        &self,
        operation: &'static str,
        key: &str,
        error: RedisError,
    ) -> CacheError {
        CacheError::backend(
            self.inner.server.clone(),
            operation,
            key,
            Box::new(error) as BoxError,
        )
    }

    fn timeout_error(&self, operation: &'static str, key: &str) -> CacheError {
        CacheError::backend(
            self.inner.server.clone(),
            operation,
            key,
            format!(
                "no answer within the command timeout of {:?}",
                self.inner.command_timeout
            ),
        )
    }

    /// Unlinks `keys`, in one command per hash slot on a cluster; returns how many existed.
    async fn unlink_batch(
        &self,
        client: &Client,
        keys: Vec<Key>,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        if !self.inner.clustered {
            return client
                .unlink::<u64, _>(keys)
                .await
                .map_err(|e| self.backend_error("invalidate_prefix", prefix, e));
        }
        let groups = fred::util::group_by_hash_slot(keys)
            .map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
        let unlinks = groups
            .into_values()
            .map(|group| client.unlink::<u64, _>(group.into_iter().collect::<Vec<_>>()));
        let mut removed = 0;
        for result in futures_util::future::join_all(unlinks).await {
            removed += result.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
        }
        Ok(removed)
    }
}

/// Boxes the future `make` returns: plain `Box::pin` without the `future-slots` feature
/// (with it, `future_slot::boxed`, which keeps it in a reused per-thread slot).
#[cfg(not(feature = "future-slots"))]
#[inline(always)]
fn box_future<'a, F>(make: impl FnOnce() -> F) -> BoxFuture<'a, F::Output>
where
    F: std::future::Future + Send + 'a,
{
    Box::pin(make())
}

impl fmt::Debug for RedisCacheService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheService")
            .field("server", &self.inner.server)
            .field("namespace", &self.inner.namespace)
            .field("default_ttl", &self.inner.default_ttl)
            .field("command_timeout", &self.inner.command_timeout)
            .field("clustered", &self.inner.clustered)
            .finish()
    }
}

#[async_trait]
impl CacheService for RedisCacheService {
    fn flight_scope(&self) -> u64 {
        // Every clone shares `inner` (and so the store).
        Arc::as_ptr(&self.inner).addr() as u64
    }

    // `get_bytes`, `set_bytes` and `invalidate` box their futures through `box_future` rather
    // than `#[async_trait]`: each holds a fred command future of ~6.8 KB. With the
    // `future-slots` feature they go to reused per-thread slots (`future_slot`), which saves
    // ~9% of the client's instructions per GET with glibc's malloc (64 tasks) but under 5%
    // with mimalloc or jemalloc (`scripts/bench-allocators`); without it, plain `Box::pin`.
    // Advice: with glibc, enable `future-slots` or use mimalloc/jemalloc.
    fn get_bytes<'s, 'k, 'f>(
        &'s self,
        key: &'k str,
    ) -> BoxFuture<'f, Result<Option<Bytes>, CacheError>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        box_future(move || async move {
            let full = self.full_key(key);
            match self.client().get::<Option<Bytes>, _>(full.as_ref()).await {
                Ok(value) => Ok(value),
                // A cache-aside lease (a hash, see `redis_lease`) reads as a miss.
                Err(e) if e.details().starts_with("WRONGTYPE") => Ok(None),
                Err(e) => Err(self.backend_error("get", key, e)),
            }
        })
    }

    fn set_bytes<'s, 'k, 'f>(
        &'s self,
        key: &'k str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> BoxFuture<'f, Result<(), CacheError>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        box_future(move || async move {
            let ttl = resolve_ttl(key, ttl_secs, self.inner.default_ttl)?;
            // At most 100 years of milliseconds: far inside i64.
            let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let full = self.full_key(key);
            self.client()
                .set::<(), _, _>(
                    full.as_ref(),
                    value,
                    Some(Expiration::PX(millis)),
                    None,
                    false,
                )
                .await
                .map_err(|e| self.backend_error("set", key, e))
        })
    }

    fn invalidate<'s, 'k, 'f>(&'s self, key: &'k str) -> BoxFuture<'f, Result<(), CacheError>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        box_future(move || async move {
            let full = self.full_key(key);
            self.client()
                .unlink::<u64, _>(full.as_ref())
                .await
                .map(drop)
                .map_err(|e| self.backend_error("invalidate", key, e))
        })
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        self.lease_now(key, request).await
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        self.set_leased_now(key, lease, value, ttl_secs).await
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.release_lease_now(key, lease).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let pattern = format!("{}*", escape_glob(&self.full_key(prefix)));
        let client = self.client().clone();
        if self.inner.clustered {
            self.invalidate_prefix_cluster(&client, pattern, prefix)
                .await
        } else {
            self.invalidate_prefix_adaptive(&client, pattern, prefix)
                .await
        }
    }
}

/// `SCAN` pages are resized to take about this long each (round trip included): long
/// enough to need few round trips, short enough that other clients' commands never wait
/// behind one for long.
const SCAN_PAGE_TARGET: Duration = Duration::from_millis(1);
/// Bounds of the adaptive `COUNT`.
const SCAN_COUNT_RANGE: (u32, u32) = (100, 20_000);

impl RedisCacheService {
    /// Standalone and Sentinel: a `SCAN` cursor loop whose `COUNT` adapts so that each call
    /// takes about [`SCAN_PAGE_TARGET`], with each page's `UNLINK` sent while the next page
    /// is scanned.
    async fn invalidate_prefix_adaptive(
        &self,
        client: &Client,
        pattern: String,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        let mut cursor = String::from("0");
        let mut count = self.inner.scan_count;
        let mut removed = 0u64;
        let mut unlinking: Option<BoxFuture<'_, Result<u64, CacheError>>> = None;
        loop {
            let scan = async {
                let started = Instant::now();
                let page = client
                    .scan_page::<(String, Vec<Bytes>), _, _>(
                        cursor.clone(),
                        pattern.clone(),
                        Some(count),
                        None,
                    )
                    .await;
                (page, started.elapsed())
            };
            let ((page, took), unlinked) = match unlinking.take() {
                Some(unlink) => {
                    let (scanned, unlinked) = futures_util::future::join(scan, unlink).await;
                    (scanned, Some(unlinked))
                }
                None => (scan.await, None),
            };
            if let Some(unlinked) = unlinked {
                removed += unlinked?;
            }
            let (next, keys) =
                page.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
            count = if took < SCAN_PAGE_TARGET / 2 {
                count.saturating_mul(2).min(SCAN_COUNT_RANGE.1)
            } else if took > SCAN_PAGE_TARGET * 2 {
                (count / 2).max(SCAN_COUNT_RANGE.0)
            } else {
                count
            };
            if !keys.is_empty() {
                let keys: Vec<Key> = keys.into_iter().map(Key::from).collect();
                unlinking = Some(Box::pin(self.unlink_batch(client, keys, prefix)));
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        if let Some(unlink) = unlinking {
            removed += unlink.await?;
        }
        Ok(removed)
    }

    /// Cluster: `SCAN` on every primary (fred's `scan_cluster`), `UNLINK` per page grouped
    /// by hash slot, the next page requested before the current one is unlinked.
    async fn invalidate_prefix_cluster(
        &self,
        client: &Client,
        pattern: String,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        let mut pages = client
            .scan_cluster(pattern, Some(self.inner.scan_count), None)
            .boxed();
        let mut removed = 0u64;
        loop {
            let page = tokio::time::timeout(self.inner.command_timeout, pages.next())
                .await
                .map_err(|_| self.timeout_error("invalidate_prefix", prefix))?;
            let Some(page) = page else { break };
            let mut page = page.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
            let keys = page.take_results().unwrap_or_default();
            page.next();
            if !keys.is_empty() {
                // SCAN can return a key twice: the UNLINK results count each key once.
                removed += self.unlink_batch(client, keys, prefix).await?;
            }
        }
        Ok(removed)
    }
}

/// Escapes every glob character of `literal` for `SCAN MATCH`, so the pattern
/// `escape_glob(p) + "*"` matches exactly the keys that start with `p`.
///
/// ```
/// use cachet::backend::redis::escape_glob;
///
/// assert_eq!(escape_glob("org:acme"), "org:acme");
/// assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
/// ```
pub fn escape_glob(literal: &str) -> String {
    let mut escaped = String::with_capacity(literal.len() + 8);
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Builds a [`RedisCacheService`]; every setting has a default.
///
/// ```no_run
/// use std::time::Duration;
/// use cachet::RedisCacheService;
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = RedisCacheService::builder("redis://cache:secret@127.0.0.1:6379/0")
///     .default_ttl_secs(600)
///     .connect_timeout(Duration::from_secs(2))
///     .command_timeout(Duration::from_millis(250))
///     .reconnect_backoff(Duration::from_millis(20), Duration::from_secs(1))
///     .namespace("myapp:")
///     .build()
///     .await?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisCacheServiceBuilder {
    url: String,
    default_ttl_secs: u64,
    pool_size: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
    namespace: String,
    scan_count: u32,
    reconnect_min_delay: Duration,
    reconnect_max_delay: Duration,
    reconnect_max_attempts: u32,
    tls_root_certificates_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RedisCacheServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheServiceBuilder")
            .field("url", &redact_url(&self.url))
            .field("default_ttl_secs", &self.default_ttl_secs)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl RedisCacheServiceBuilder {
    /// The TTL for a `set` that passes `None` (default 300 s; `1..=MAX_TTL_SECS`).
    pub fn default_ttl_secs(mut self, secs: u64) -> Self {
        self.default_ttl_secs = secs;
        self
    }

    /// Connections: 1 (the default) is one auto-pipelined client, which measured fastest;
    /// more builds a round-robin `fred` pool.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Time allowed to connect when the service is built and on each reconnection (default
    /// 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for each command, including waiting for a reconnection (default 2 s);
    /// past it the call fails with [`CacheError::Backend`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// A prefix put before every key (for example `"myapp:"`), so that several apps can share
    /// one Redis; `invalidate_prefix` never reaches outside it. Default: none, a key is
    /// stored under exactly its name.
    ///
    /// A non-empty namespace must end with `:`, or `build` returns [`CacheError::Config`]:
    /// without the separator, namespace `"a"` would be a prefix of namespace `"ab"`'s keys,
    /// and `invalidate_prefix("")` in `"a"` would remove them. (Nested namespaces such as
    /// `"app:"` and `"app:v2:"` still contain one another, as their names say.)
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The `COUNT` hint of the first `SCAN` page in `invalidate_prefix` (default 1 000). On
    /// a standalone or Sentinel server later pages adapt (100 to 20 000) so that each call
    /// takes about 1 ms; on a cluster every page uses this count.
    pub fn scan_count(mut self, count: u32) -> Self {
        self.scan_count = count.max(1);
        self
    }

    /// Reconnection delays: exponential from `min` to `max` (defaults 50 ms, 2 s), with
    /// jitter, forever unless [`reconnect_max_attempts`](Self::reconnect_max_attempts).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max.max(min);
        self
    }

    /// Stop reconnecting after this many failed attempts in a row (default 0: never stop).
    pub fn reconnect_max_attempts(mut self, attempts: u32) -> Self {
        self.reconnect_max_attempts = attempts;
        self
    }

    /// Trusts the CA certificate(s) in `pem` (PEM text) instead of the system's roots, for a
    /// `rediss://` server whose certificate a private CA signed. Needs a TLS URL.
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificates_pem = Some(pem.into());
        self
    }

    /// Checks the settings and makes the `fred` builder they describe, with the server
    /// label and whether it is a cluster.
    pub(crate) fn fred_builder(&self) -> Result<(Builder, String, bool), CacheError> {
        check_default_ttl(self.default_ttl_secs)?;
        if self.command_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(CacheError::config(
                "timeouts must be longer than zero",
                None,
            ));
        }
        if !self.namespace.is_empty() && !self.namespace.ends_with(':') {
            return Err(CacheError::config(
                format!(
                    "the namespace {:?} must end with ':', so that it is not a prefix of another \
                     namespace's keys (\"a\" would reach \"ab...\")",
                    self.namespace
                ),
                None,
            ));
        }
        let scheme = self.url.split_once("://").map(|(scheme, _)| scheme);
        if !scheme.is_some_and(|s| SCHEMES.contains(&s.to_ascii_lowercase().as_str())) {
            return Err(CacheError::config(
                format!(
                    "invalid Redis URL {}: the scheme must be one of {}",
                    redact_url(&self.url),
                    SCHEMES.join(", ")
                ),
                None,
            ));
        }
        let mut config = Config::from_url(&self.url).map_err(|e| {
            CacheError::config(
                format!("invalid Redis URL {}", redact_url(&self.url)),
                Some(Box::new(e)),
            )
        })?;
        if let Some(pem) = &self.tls_root_certificates_pem {
            if config.tls.is_none() {
                return Err(CacheError::config(
                    format!(
                        "TLS root certificates were given, but {} is not a TLS URL (rediss://)",
                        redact_url(&self.url)
                    ),
                    None,
                ));
            }
            config.tls = Some(tls_with_roots(pem)?);
        }
        let server = describe_server(&config);
        let clustered = config.server.is_clustered();

        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let policy = ReconnectPolicy::new_exponential(
            self.reconnect_max_attempts,
            millis(self.reconnect_min_delay),
            millis(self.reconnect_max_delay),
            2,
        );
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| {
                perf.default_command_timeout = self.command_timeout;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = self.connect_timeout;
                conn.internal_command_timeout = self.command_timeout.max(self.connect_timeout);
            })
            .set_policy(policy);
        Ok((builder, server, clustered))
    }

    /// The bound on connecting: the connect timeout plus one command.
    pub(crate) fn connect_bound(&self) -> Duration {
        self.connect_timeout + self.command_timeout
    }

    /// Parses the URL, connects, and checks the server answers.
    pub async fn build(self) -> Result<RedisCacheService, CacheError> {
        let (builder, server, clustered) = self.fred_builder()?;
        let config_error = |e: RedisError| {
            CacheError::config(
                format!("cannot configure a client for {server}"),
                Some(Box::new(e)),
            )
        };
        let connection = if self.pool_size > 1 {
            Connection::Pool(builder.build_pool(self.pool_size).map_err(config_error)?)
        } else {
            Connection::Single(builder.build().map_err(config_error)?)
        };

        let connect = async {
            match &connection {
                Connection::Single(client) => client.init().await.map(drop),
                Connection::Pool(pool) => pool.init().await.map(drop),
            }
        };
        // `init` gives up on the first failed attempt; the outer bound also covers a server
        // that accepts the connection and then never answers.
        let bound = self.connect_bound();
        let connected = match tokio::time::timeout(bound, connect).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Box::new(e) as BoxError),
            Err(_) => Err(format!("no connection within {bound:?}").into()),
        };
        let service = RedisCacheService {
            inner: Arc::new(Inner {
                connection,
                server: server.clone(),
                namespace: self.namespace,
                default_ttl: Duration::from_secs(self.default_ttl_secs),
                command_timeout: self.command_timeout,
                scan_count: self.scan_count,
                clustered,
            }),
        };
        // On failure, dropping `service` closes the half-open client.
        connected.map_err(|source| CacheError::backend(server, "connect", "", source))?;
        Ok(service)
    }
}
