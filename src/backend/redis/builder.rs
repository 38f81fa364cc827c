//! Building a [`RedisCacheService`]: the connection's settings (a [`RedisConnectionBuilder`])
//! and the cache's own (default TTL, namespace, `SCAN` page size).

use std::fmt;
use std::time::Duration;

use super::connection::{RedisConnection, RedisConnectionBuilder};
use super::scan::DEFAULT_SCAN_COUNT;
use super::{RedisCacheService, Settings};
use std::sync::Arc;

use crate::CacheError;
use crate::codec::{Codec, Json};
use crate::service::{DEFAULT_TTL_SECS, check_default_ttl};

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
    connection: RedisConnectionBuilder,
    default_ttl_secs: u64,
    namespace: String,
    scan_count: u32,
    codec: Arc<dyn Codec>,
}

impl fmt::Debug for RedisCacheServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheServiceBuilder")
            .field("connection", &self.connection)
            .field("default_ttl_secs", &self.default_ttl_secs)
            .field("namespace", &self.namespace)
            .field("scan_count", &self.scan_count)
            .field("codec", &self.codec.name())
            .finish()
    }
}

impl RedisCacheServiceBuilder {
    pub(super) fn new(redis_url: String) -> Self {
        RedisCacheServiceBuilder {
            connection: RedisConnection::builder(redis_url),
            default_ttl_secs: DEFAULT_TTL_SECS,
            namespace: String::new(),
            scan_count: DEFAULT_SCAN_COUNT,
            codec: Arc::new(Json),
        }
    }

    /// The TTL for a `set` that passes `None` (default 300 s; `1..=MAX_TTL_SECS`).
    pub fn default_ttl_secs(mut self, secs: u64) -> Self {
        self.default_ttl_secs = secs;
        self
    }

    /// Connections: 1 (the default) is one auto-pipelined client, which measured fastest;
    /// more builds a round-robin `fred` pool.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.connection = self.connection.pool_size(size);
        self
    }

    /// Time allowed to connect when the service is built and on each reconnection (default
    /// 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connection = self.connection.connect_timeout(timeout);
        self
    }

    /// Time allowed for each command, including waiting for a reconnection (default 2 s);
    /// past it the call fails with [`CacheError::Backend`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.connection = self.connection.command_timeout(timeout);
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

    /// How the typed helpers encode values for this service ([`Json`] by default; see
    /// [`codec`](crate::codec) for when to choose [`MessagePack`](crate::codec::MessagePack)).
    /// Every service on the same keys needs the same codec: bytes written with another are a
    /// [`CacheError::Serialization`] naming both. A tiered cache uses its Redis builder's.
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// Reconnection delays: exponential from `min` to `max` (defaults 50 ms, 2 s), with
    /// jitter, forever unless [`reconnect_max_attempts`](Self::reconnect_max_attempts).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.connection = self.connection.reconnect_backoff(min, max);
        self
    }

    /// Stop reconnecting after this many failed attempts in a row (default 0: never stop).
    pub fn reconnect_max_attempts(mut self, attempts: u32) -> Self {
        self.connection = self.connection.reconnect_max_attempts(attempts);
        self
    }

    /// Trusts the CA certificate(s) in `pem` (PEM text) instead of the system's roots, for a
    /// `rediss://` server whose certificate a private CA signed. Needs a TLS URL.
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.connection = self.connection.tls_root_certificates_pem(pem);
        self
    }

    /// The cache's own settings, checked.
    fn settings(&self) -> Result<Settings, CacheError> {
        let mut settings = Settings::new(
            self.default_ttl_secs,
            self.namespace.clone(),
            self.scan_count,
        )?;
        settings.codec = Arc::clone(&self.codec);
        Ok(settings)
    }

    /// Parses the URL, connects, and checks the server answers.
    pub async fn build(self) -> Result<RedisCacheService, CacheError> {
        // The cache's settings are checked before anything connects.
        let settings = self.settings()?;
        let connection = self.connection.connect().await?;
        Ok(RedisCacheService::with_settings(connection, settings))
    }
}

impl Settings {
    /// Checks the default TTL and the namespace.
    pub(super) fn new(
        default_ttl_secs: u64,
        namespace: String,
        scan_count: u32,
    ) -> Result<Self, CacheError> {
        check_default_ttl(default_ttl_secs)?;
        if !namespace.is_empty() && !namespace.ends_with(':') {
            return Err(CacheError::config(
                format!(
                    "the namespace {namespace:?} must end with ':', so that it is not a prefix \
                     of another namespace's keys (\"a\" would reach \"ab...\")"
                ),
                None,
            ));
        }
        Ok(Settings {
            namespace,
            default_ttl: Duration::from_secs(default_ttl_secs),
            scan_count: scan_count.max(1),
            codec: Arc::new(Json),
        })
    }
}
