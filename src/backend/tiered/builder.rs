//! Building a [`TieredCacheService`]: L2, the L1, and the invalidation stream the instance
//! listens to (tracking, or the bus).

use std::sync::Arc;
use std::time::Duration;

use super::bus::Bus;
use super::shared::Shared;
use super::tracking::Tracking;
use super::{DEFAULT_L1_MAX_TTL, Inner, Stream, TieredCacheService};
use crate::invalidation;
use crate::observe::{Backend, Instruments};
use crate::{CacheError, MokaCacheService, RedisCacheService, RedisCacheServiceBuilder};

/// How an instance learns that what its L1 holds changed in Redis.
///
/// ```
/// use cachet::backend::tiered::InvalidationMode;
///
/// assert_eq!(InvalidationMode::default(), InvalidationMode::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InvalidationMode {
    /// Tracking if the server accepts it (`CLIENT TRACKING ... REDIRECT`), else the bus: chosen
    /// when the service is built ([`TieredCacheService::invalidation_mode`] says which).
    #[default]
    Auto,
    /// Client tracking on the reading connections, redirected to an invalidation connection
    /// of this instance's own (one per cluster primary): the server reports every change to
    /// a key this instance read, by any client, an expiry, an eviction or a flush. Building
    /// fails if the server refuses it.
    Tracking,
    /// The pub/sub bus (`cachet:invalidate:v1`, with `:<namespace>` appended for a namespaced
    /// service): instances tell each other what they wrote
    /// through cachet. Writes by other clients, expiries and evictions are not heard; the L1
    /// lifetime bounds them.
    Bus,
}

/// Builds a [`TieredCacheService`].
#[derive(Debug, Clone)]
pub struct TieredCacheServiceBuilder {
    pub(super) redis: RedisCacheServiceBuilder,
    pub(super) l1_max_ttl: Duration,
    pub(super) l1: crate::MokaCacheServiceBuilder,
    pub(super) channel_prefix: String,
    pub(super) mode: InvalidationMode,
}

impl TieredCacheServiceBuilder {
    pub(super) fn new(redis: RedisCacheServiceBuilder) -> Self {
        TieredCacheServiceBuilder {
            redis,
            l1_max_ttl: DEFAULT_L1_MAX_TTL,
            l1: MokaCacheService::builder(),
            channel_prefix: invalidation::DEFAULT_CHANNEL_PREFIX.to_owned(),
            mode: InvalidationMode::Auto,
        }
    }

    /// The longest life of an L1 entry (default 30 s): the bound on staleness when every
    /// invalidation was lost.
    pub fn l1_max_ttl(mut self, ttl: Duration) -> Self {
        self.l1_max_ttl = ttl;
        self
    }

    /// L1 capacity in entries (default 10 000).
    pub fn l1_max_entries(mut self, n: u64) -> Self {
        self.l1 = self.l1.max_entries(n);
        self
    }

    /// L1 capacity in bytes instead of entries.
    pub fn l1_max_bytes(mut self, n: u64) -> Self {
        self.l1 = self.l1.max_bytes(n);
        self
    }

    /// Bounds the L1's space of cached "not found" markers (unknown keys, e.g. bogus tenant
    /// slugs) to `n` entries, apart from the values; by default a tenth of the L1 capacity.
    /// See [`MokaCacheServiceBuilder::max_negative_entries`](crate::MokaCacheServiceBuilder::max_negative_entries).
    pub fn l1_max_negative_entries(mut self, n: u64) -> Self {
        self.l1 = self.l1.max_negative_entries(n);
        self
    }

    /// The bus channel prefix (default `"cachet:invalidate:"`; the channel is `<prefix>v1`, or
    /// `<prefix>v1:<namespace>` when the Redis service has a namespace).
    /// Instances that must see each other's invalidations over the bus use the same one.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// How the L1 hears of changes (default [`InvalidationMode::Auto`]). Every instance of
    /// one fleet should end up in the same mode: a bus instance does not hear a tracking
    /// instance's writes.
    ///
    /// ```no_run
    /// use cachet::backend::tiered::InvalidationMode;
    /// use cachet::{RedisCacheService, TieredCacheService};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = TieredCacheService::builder(RedisCacheService::builder("redis://127.0.0.1:6379"))
    ///     .invalidation(InvalidationMode::Bus)
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.invalidation_mode(), InvalidationMode::Bus);
    /// # Ok(()) }
    /// ```
    pub fn invalidation(mut self, mode: InvalidationMode) -> Self {
        self.mode = mode;
        self
    }

    /// Connects L2, starts listening for invalidations, and returns once that stream is
    /// known to be live.
    pub async fn build(self) -> Result<TieredCacheService, CacheError> {
        if self.l1_max_ttl.is_zero() {
            return Err(CacheError::config(
                "l1_max_ttl must be longer than zero",
                None,
            ));
        }
        match self.mode {
            InvalidationMode::Bus => self.build_bus().await,
            InvalidationMode::Tracking => self.build_tracking().await,
            InvalidationMode::Auto => match self.clone().build_tracking().await {
                Ok(service) => Ok(service),
                // A server that refuses tracking (some managed services do), or is
                // down: the bus, which reports its own error if the server is down.
                Err(_) => self.build_bus().await,
            },
        }
    }

    fn shared(
        &self,
        l2: &RedisCacheService,
        own_writes_fill: bool,
    ) -> Result<Arc<Shared>, CacheError> {
        Ok(Arc::new(Shared::new(
            self.l1.clone().build_l1()?,
            self.l1_max_ttl,
            instance_id(),
            own_writes_fill,
            Instruments::new(Backend::Tiered, Some(l2.connection().server())),
        )))
    }

    async fn build_tracking(self) -> Result<TieredCacheService, CacheError> {
        let l2 = self.redis.clone().build().await?;
        let shared = self.shared(&l2, false)?;
        // The invalidation connections are opened with the L2 connection's settings.
        let connection = l2.connection();
        let (fred, bound) = (connection.fred_builder(), connection.connect_bound());
        let tracking = Tracking::start(&shared, &l2, fred, bound).await?;
        Ok(TieredCacheService {
            inner: Arc::new(Inner {
                shared,
                l2,
                stream: Stream::Tracking(tracking),
            }),
        })
    }

    async fn build_bus(self) -> Result<TieredCacheService, CacheError> {
        let l2 = self.redis.clone().build().await?;
        let shared = self.shared(&l2, true)?;
        let connection = l2.connection();
        let (fred, bound) = (connection.fred_builder(), connection.connect_bound());
        let server = connection.server();
        let bus = Bus::start(&shared, fred, server, &l2, &self.channel_prefix, bound).await?;
        Ok(TieredCacheService {
            inner: Arc::new(Inner {
                shared,
                l2,
                stream: Stream::Bus(bus),
            }),
        })
    }
}

/// A random id for this instance.
fn instance_id() -> u64 {
    rand::random()
}
