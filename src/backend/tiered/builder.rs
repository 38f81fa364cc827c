//! Building a [`TieredCacheService`]: L2, the L1, and the invalidation stream the instance
//! listens to (tracking, or the bus).

use std::sync::Arc;
use std::time::Duration;

use super::bus::Bus;
use super::sealed::SealedL2;
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
    /// The keys that seal values in L2 ([`encrypt_l2`](Self::encrypt_l2)).
    #[cfg(feature = "encryption")]
    pub(super) l2_keys: Option<crate::EncryptionKeys>,
}

impl TieredCacheServiceBuilder {
    pub(super) fn new(redis: RedisCacheServiceBuilder) -> Self {
        TieredCacheServiceBuilder {
            redis,
            l1_max_ttl: DEFAULT_L1_MAX_TTL,
            l1: MokaCacheService::builder(),
            channel_prefix: invalidation::DEFAULT_CHANNEL_PREFIX.to_owned(),
            mode: InvalidationMode::Auto,
            #[cfg(feature = "encryption")]
            l2_keys: None,
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

    /// Encrypts at the L2 boundary: every value this instance writes to Redis is sealed
    /// with `keys` (AES-256-GCM-SIV, the key name authenticated, the write's expiry sealed,
    /// the key id stored for rotation: the envelope, keys and rotation of
    /// [`EncryptedCacheService`](crate::EncryptedCacheService)), and every value it reads
    /// from Redis is opened with them, while its L1 holds the plain values.
    ///
    /// - Writes (`set`, and the cache-aside write-back through a lease) seal the value with
    ///   the expiry of the write's TTL; `None` is the Redis service's default TTL, so the
    ///   sealed expiry and the server's TTL agree.
    /// - Reads from Redis (an L1 miss, a lease that finds a value) decrypt it: a value past
    ///   its sealed expiry is a miss, whatever TTL the server holds (a lease replaces it, as
    ///   an expired entry); one that does not decrypt (tampered, a plain value, a key id
    ///   the keyring does not hold, a wrong key) is [`CacheError::Integrity`] naming the key,
    ///   and stays stored; cache-aside loads treat it as unusable and overwrite it.
    /// - The L1 holds plain payloads: an L1 hit costs no decryption, and
    ///   [`get_shared`](crate::CacheServiceExt::get_shared) hits share one decoded value.
    /// - Invalidations (tracking or the bus), leases, `invalidate_prefix` and the L1
    ///   coherence rules are unchanged: they carry key names, never values. Key names are not
    ///   encrypted: keep secrets out of them.
    ///
    /// Rotation as with the decorator: deploy `EncryptionKeys::new(2, new).with_previous(1,
    /// old)?` on every instance; values written with key 1 still read, new writes use key
    /// 2; drop key 1 once the longest TTL in use has passed. While that rollout runs, an
    /// instance still on key 1 alone cannot read key-2 values (`Integrity`, reloaded by
    /// cache-aside); to avoid even that, first deploy `EncryptionKeys::new(1,
    /// old).with_previous(2, new)?` everywhere, then make key 2 current.
    ///
    /// **When to choose it over wrapping the tiered service in
    /// [`EncryptedCacheService`](crate::EncryptedCacheService).** Both keep Redis free of
    /// plaintext. With L2 encryption, the process's own cache memory holds plain values,
    /// which is as trusted as the app that decrypts them anyway: an L1 hit is a lookup (no
    /// AES-GCM-SIV, and with `get_shared` no decode either), and only fills and writes pay
    /// the cipher. Wrapped, the L1 holds ciphertext and every hit decrypts and decodes; choose
    /// it when nothing plain may sit in the process's cache memory (a heap dump or a core
    /// file must not show the secrets; values live there up to the L1 lifetime, not only
    /// while a request uses them).
    ///
    /// **Switching a fleet between the two.** They store the same bytes in Redis for the same
    /// write (the tiered envelope around the encrypted envelope of the value; the decorator
    /// binds the same key name), so with the same keyring each reads what the other wrote and
    /// instances of both kinds can run side by side during a rollout. Two differences: a
    /// write with a `None` TTL is sealed with the Redis service's default TTL here, and with
    /// the decorator's own default (300 s unless
    /// [`with_default_ttl_secs`](crate::EncryptedCacheService::with_default_ttl_secs)) there;
    /// and an instance *without* any encryption reading sealed values gets the sealed bytes
    /// (a typed read is a [`CacheError::Serialization`] error), while an instance with L2
    /// encryption reading a plain value gets [`CacheError::Integrity`]: turning encryption on
    /// or off across a fleet means misses and errors, which cache-aside loads turn into
    /// reloads, until the old values are overwritten or expire.
    ///
    /// ```no_run
    /// use cachet::{CacheServiceExt, EncryptionKey, EncryptionKeys, RedisCacheService, TieredCacheService};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let key = EncryptionKey::parse(&std::env::var("CACHE_ENCRYPTION_KEY")?)?;
    /// let cache = TieredCacheService::builder(RedisCacheService::builder("redis://127.0.0.1:6379"))
    ///     .encrypt_l2(EncryptionKeys::new(1, key))
    ///     .build()
    ///     .await?;
    /// cache.set("org:acme:sso", &"client-secret", None).await?; // ciphertext in Redis
    /// // A read from Redis decrypts (and fills the L1); L1 hits after it cost no decryption.
    /// let secret = cache.get_shared::<String>("org:acme:sso").await?;
    /// assert_eq!(secret.as_deref().map(String::as_str), Some("client-secret"));
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "encryption")]
    pub fn encrypt_l2(mut self, keys: crate::EncryptionKeys) -> Self {
        self.l2_keys = Some(keys);
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

    /// L2 as the service uses it: sealed with the L2 keys, if any.
    fn seal(&self, l2: RedisCacheService) -> SealedL2 {
        #[cfg(feature = "encryption")]
        if let Some(keys) = &self.l2_keys {
            return SealedL2::encrypted(l2, keys.clone());
        }
        SealedL2::plain(l2)
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
                l2: self.seal(l2),
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
                l2: self.seal(l2),
                stream: Stream::Bus(bus),
            }),
        })
    }
}

/// A random id for this instance.
fn instance_id() -> u64 {
    rand::random()
}
