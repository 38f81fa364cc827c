//! The Redis backend, on `fred` 10: standalone, Cluster, Sentinel (and Valkey).
//!
//! - [`RedisConnection`] (`connection.rs`): the `fred` client or pool, its timeouts and the
//!   server label; the cache, the tiered cache's L2 and the Redis locks all run on one, and
//!   can share it.
//! - [`RedisCacheService`] (here): the [`CacheService`] on a connection; its builder
//!   (`builder.rs`), prefix invalidation by `SCAN` (`scan.rs`), cache-aside leases
//!   ([`lease`]), URL parsing, TLS and redaction (`config.rs`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{Client, Error as RedisError, Expiration, KeysInterface};

mod builder;
mod config;
mod connection;
pub mod lease;
mod scan;

pub use self::builder::RedisCacheServiceBuilder;
pub use self::config::redact_url;
pub use self::connection::{
    DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, RedisConnection, RedisConnectionBuilder,
};
pub use self::scan::{DEFAULT_SCAN_COUNT, escape_glob};
use crate::codec::Codec;
#[cfg(feature = "future-slots")]
use crate::future_slot::boxed as box_future;
use crate::load::{Lease, LeaseRead, LeaseRequest, StoredVersion};
use crate::observe::{Backend, Instruments, Op, observed};
use crate::service::{BoxFuture, resolve_ttl};
use crate::{BoxError, CacheError, CacheService};

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
    connection: RedisConnection,
    settings: Settings,
    instruments: Instruments,
}

/// The cache's own settings, on top of its connection's.
pub(super) struct Settings {
    namespace: String,
    default_ttl: Duration,
    scan_count: u32,
    /// The typed helpers' codec ([`CacheService::codec`]).
    codec: Arc<dyn Codec>,
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
        RedisCacheServiceBuilder::new(redis_url.into())
    }

    /// A cache on an existing connection (shared with its other users, such as a
    /// [`RedisConcurrencyService`](crate::RedisConcurrencyService)), without a namespace,
    /// with `default_ttl_secs` for `set` calls that pass `None`. A default TTL of 0 is
    /// [`CacheError::Config`].
    ///
    /// ```no_run
    /// use cachet::backend::redis::RedisConnection;
    /// use cachet::RedisCacheService;
    ///
    /// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
    /// let connection = RedisConnection::connect("redis://127.0.0.1:6379").await?;
    /// let cache = RedisCacheService::from_connection(connection, 300)?;
    /// # let _ = cache; Ok(()) }
    /// ```
    pub fn from_connection(
        connection: RedisConnection,
        default_ttl_secs: u64,
    ) -> Result<Self, CacheError> {
        let settings = Settings::new(default_ttl_secs, String::new(), DEFAULT_SCAN_COUNT)?;
        Ok(Self::with_settings(connection, settings))
    }

    pub(super) fn with_settings(connection: RedisConnection, settings: Settings) -> Self {
        RedisCacheService {
            inner: Arc::new(Inner {
                instruments: Instruments::new(Backend::Redis, Some(connection.server())),
                connection,
                settings,
            }),
        }
    }

    /// The connection this service uses, to share with other services (clone it: clones
    /// share the connections).
    pub fn connection(&self) -> &RedisConnection {
        &self.inner.connection
    }

    /// The TTL applied when a `set` passes `None`.
    pub fn default_ttl(&self) -> Duration {
        self.inner.settings.default_ttl
    }

    /// The server(s) this service talks to, as errors name them.
    pub fn server(&self) -> &str {
        self.inner.connection.server()
    }

    /// The namespace put before every key (`""` for none).
    pub fn namespace(&self) -> &str {
        &self.inner.settings.namespace
    }

    /// Every connection's client (one, or the pool's).
    pub(crate) fn clients(&self) -> Vec<Client> {
        self.inner.connection.clients()
    }

    /// The underlying `fred` client (one of the pool's, if a pool is configured), for
    /// commands cachet does not wrap. Keys written through it are not namespaced.
    pub fn client(&self) -> &Client {
        self.inner.connection.client()
    }

    pub(super) fn scan_count(&self) -> u32 {
        self.inner.settings.scan_count
    }

    pub(super) fn full_key<'k>(&self, key: &'k str) -> Cow<'k, str> {
        let namespace = &self.inner.settings.namespace;
        if namespace.is_empty() {
            Cow::Borrowed(key)
        } else {
            Cow::Owned(format!("{namespace}{key}"))
        }
    }

    /// A failed command as a [`CacheError`]: [`CacheError::Timeout`] when fred gave up
    /// waiting (the command timeout), [`CacheError::Backend`] otherwise.
    pub(super) fn backend_error(
        &self,
        operation: &'static str,
        key: &str,
        error: RedisError,
    ) -> CacheError {
        let connection = self.connection();
        if *error.kind() == fred::error::ErrorKind::Timeout {
            return CacheError::timeout(
                connection.server_label(),
                operation,
                key,
                connection.command_timeout(),
            );
        }
        CacheError::backend(
            connection.server_label(),
            operation,
            key,
            Box::new(error) as BoxError,
        )
    }
}

impl From<RedisCacheService> for RedisConnection {
    /// The cache's connection, shared.
    fn from(cache: RedisCacheService) -> Self {
        cache.inner.connection.clone()
    }
}

impl From<&RedisCacheService> for RedisConnection {
    /// The cache's connection, shared.
    fn from(cache: &RedisCacheService) -> Self {
        cache.inner.connection.clone()
    }
}

impl RedisCacheService {
    /// `keys` read with one `MGET` per hash slot (one in all off a cluster), sent together;
    /// the values in the order of `keys`. A key that holds no string (a cache-aside lease)
    /// reads as missing, as in `get_bytes`.
    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let first = keys.first().copied().unwrap_or_default();
        let client = self.client();
        let full: Vec<String> = keys
            .iter()
            .map(|key| self.full_key(key).into_owned())
            .collect();
        let groups: Vec<Vec<usize>> = if full.is_empty() {
            Vec::new()
        } else if self.connection().is_clustered() {
            let mut slots: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
            for (i, key) in full.iter().enumerate() {
                slots
                    .entry(fred::util::redis_keyslot(key.as_bytes()))
                    .or_default()
                    .push(i);
            }
            slots.into_values().collect()
        } else {
            vec![(0..full.len()).collect()]
        };
        let reads = groups.iter().map(|group| {
            let names: Vec<&str> = group.iter().map(|&i| full[i].as_str()).collect();
            client.mget::<Vec<Option<Bytes>>, _>(names)
        });
        let mut found = vec![None; keys.len()];
        for (group, read) in groups
            .iter()
            .zip(futures_util::future::join_all(reads).await)
        {
            let values = read.map_err(|e| self.backend_error("get_many", first, e))?;
            if values.len() != group.len() {
                return Err(CacheError::backend(
                    self.connection().server_label(),
                    "get_many",
                    first,
                    format!(
                        "MGET of {} keys answered {} values",
                        group.len(),
                        values.len()
                    ),
                ));
            }
            for (&i, value) in group.iter().zip(values) {
                found[i] = value;
            }
        }
        Ok(found)
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
        let connection = &self.inner.connection;
        f.debug_struct("RedisCacheService")
            .field("server", &connection.server())
            .field("namespace", &self.inner.settings.namespace)
            .field("default_ttl", &self.inner.settings.default_ttl)
            .field("command_timeout", &connection.command_timeout())
            .field("clustered", &connection.is_clustered())
            .finish()
    }
}

#[async_trait]
impl CacheService for RedisCacheService {
    fn flight_scope(&self) -> u64 {
        // Every clone shares `inner` (and so the store).
        Arc::as_ptr(&self.inner).addr() as u64
    }

    fn codec(&self) -> &dyn Codec {
        &*self.inner.settings.codec
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
            observed!(self.inner.instruments, Op::Get, key, async {
                let full = self.full_key(key);
                let value = match self.client().get::<Option<Bytes>, _>(full.as_ref()).await {
                    Ok(value) => value,
                    // A cache-aside lease (a hash, see `redis_lease`) reads as a miss.
                    Err(e) if e.details().starts_with("WRONGTYPE") => None,
                    Err(e) => return Err(self.backend_error("get", key, e)),
                };
                self.inner.instruments.read(value.is_some());
                Ok(value)
            })
        })
    }

    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let first = keys.first().copied().unwrap_or_default();
        observed!(self.inner.instruments, Op::GetMany, first, async {
            let found = self.mget(keys).await?;
            for value in &found {
                self.inner.instruments.read(value.is_some());
            }
            Ok(found)
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
            observed!(self.inner.instruments, Op::Set, key, async {
                let ttl = resolve_ttl(key, ttl_secs, self.default_ttl())?;
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
        })
    }

    fn invalidate<'s, 'k, 'f>(&'s self, key: &'k str) -> BoxFuture<'f, Result<(), CacheError>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        box_future(move || async move {
            observed!(self.inner.instruments, Op::Invalidate, key, async {
                let full = self.full_key(key);
                self.client()
                    .unlink::<u64, _>(full.as_ref())
                    .await
                    .map(drop)
                    .map_err(|e| self.backend_error("invalidate", key, e))
            })
        })
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        observed!(
            self.inner.instruments,
            Op::Lease,
            key,
            self.lease_now(key, request)
        )
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        observed!(
            self.inner.instruments,
            Op::SetLeased,
            key,
            self.set_leased_now(key, lease, value, ttl_secs)
        )
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        observed!(
            self.inner.instruments,
            Op::ReleaseLease,
            key,
            self.release_lease_now(key, lease)
        )
    }

    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        observed!(
            self.inner.instruments,
            Op::ReplaceIf,
            key,
            self.replace_if_now(key, version, value, ttl_secs)
        )
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        observed!(
            self.inner.instruments,
            Op::InvalidatePrefix,
            prefix,
            self.invalidate_prefix_now(prefix)
        )
    }
}
