//! Many instances, one truth: an in-memory L1 per instance in front of Redis (L2), kept
//! coherent by invalidation messages over Redis pub/sub, with every L1 insert checked
//! against per-key versions (the `coherence` module) so that no write path can put a value into the
//! L1 that a concurrent write or invalidation overtook.

mod builder;
mod bus;
mod coherence;
pub mod envelope;
pub mod invalidation;
mod sealed;
mod shared;
mod tracking;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use self::builder::{InvalidationMode, TieredCacheServiceBuilder};
pub use self::bus::SUBSCRIBER_CAPACITY;
pub use self::coherence::STRIPES;
use self::envelope::Envelope;
use self::invalidation::Operation;
use self::sealed::{SealedL2, SealedLease};
use self::shared::Shared;
pub use self::tracking::CHECK_EVERY as TRACKING_CHECK_EVERY;
use crate::codec::Codec;
use crate::load::{Lease, LeaseRead, LeaseRequest, StoredVersion};
use crate::observe::{CacheStats, Op, ResetReason, observed};
use crate::service::{Decoder, SharedValue, resolve_ttl};
use crate::{CacheError, CacheService, RedisCacheServiceBuilder};

/// Default longest life of an L1 entry: it bounds how stale an instance can be if an
/// invalidation message is lost.
pub const DEFAULT_L1_MAX_TTL: Duration = Duration::from_secs(30);

/// An in-memory L1 per instance in front of Redis (L2).
///
/// - `get`: the L1 if it has the key, else L2, then the L1 is filled for
///   `min(the value's remaining TTL in L2, the L1 maximum)` (default 30 s). The remaining TTL
///   comes from a small envelope stored with the value (see [`crate::envelope`]), so a fill
///   costs no extra round trip.
/// - `set`, `invalidate`, `invalidate_prefix`: L2 first, then the local L1; the other
///   instances hear of it from the server itself ([`InvalidationMode::Tracking`], the
///   default where the server accepts client tracking: any change to a key an instance
///   read, by any client, an expiry, an eviction or a flush) or from a message on the
///   pub/sub channel
///   ([`InvalidationMode::Bus`]: writes made through cachet only).
/// - No L1 insert is overtaken: each checks a per-key version read before its L2 round trip,
///   and a write or invalidation of the key handled meanwhile drops it.
/// - Invalidations are at most once: when the subscriber (or a tracked or invalidation
///   connection) reconnects or fails a check, the instance clears its whole L1, since
///   messages may have been lost, and fills it again only once the new stream is confirmed live
///   ([`subscription_confirmed`](Self::subscription_confirmed)); L1 entries live at most
///   the L1 maximum, which bounds staleness even then.
///
/// The guarantee: after a write or invalidation returned, a read on the instance that made it
/// sees it, and a read on another instance sees it once the invalidation arrives (about a
/// millisecond on loopback; measured), or after that instance's reconnect when invalidations
/// were lost, and in no case later than the L1 lifetime (30 s by default). With tracking the
/// same holds for writes by other clients, expiries, evictions and flushes.
///
/// Values in L2 are enveloped: read them through a tiered service, not a plain
/// [`RedisCacheService`](crate::RedisCacheService). With
/// [`encrypt_l2`](TieredCacheServiceBuilder::encrypt_l2) they are also encrypted there (the
/// L1 keeps them plain).
///
/// When to choose it: many instances reading the same hot keys (org contexts on every
/// request), where a local hit (hundreds of nanoseconds) instead of a round trip matters and a
/// short bounded staleness after a lost message is acceptable.
///
/// ```no_run
/// use std::time::Duration;
/// use cachet::{CacheServiceExt, RedisCacheService, TieredCacheService};
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = TieredCacheService::builder(RedisCacheService::builder("redis://127.0.0.1:6379"))
///     .l1_max_ttl(Duration::from_secs(10))
///     .build()
///     .await?;
/// cache.set("org:acme", &"Acme", None).await?; // L2, L1, then the other instances are told
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TieredCacheService {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Every L2 call that carries value bytes goes through it (envelope, L2 encryption).
    l2: SealedL2,
    stream: Stream,
}

/// Where invalidations come from (each stops its tasks when dropped).
enum Stream {
    Tracking(tracking::Tracking),
    Bus(bus::Bus),
}

impl TieredCacheService {
    /// A builder over the Redis settings of L2 (and of the pub/sub subscriber).
    pub fn builder(redis: RedisCacheServiceBuilder) -> TieredCacheServiceBuilder {
        TieredCacheServiceBuilder::new(redis)
    }

    /// Where this instance hears of changes: [`InvalidationMode::Tracking`] or
    /// [`InvalidationMode::Bus`] (what `Auto` chose at build time).
    pub fn invalidation_mode(&self) -> InvalidationMode {
        match self.inner.stream {
            Stream::Tracking(_) => InvalidationMode::Tracking,
            Stream::Bus(_) => InvalidationMode::Bus,
        }
    }

    /// The L2's connection, to share with the locks
    /// ([`RedisConcurrencyService::from_connection`](crate::RedisConcurrencyService::from_connection))
    /// or another cache; the tiered cache's own tracking or bus connection is not part of it.
    pub fn connection(&self) -> &crate::backend::redis::RedisConnection {
        self.inner.l2.redis().connection()
    }

    /// The keyring that seals what this instance writes to Redis and opens what it reads
    /// ([`encrypt_l2`](TieredCacheServiceBuilder::encrypt_l2)); `None`: values are stored
    /// plain.
    ///
    /// ```no_run
    /// use cachet::{EncryptionKeys, RedisCacheService, TieredCacheService};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = TieredCacheService::builder(RedisCacheService::builder("redis://127.0.0.1:6379"))
    ///     .encrypt_l2(EncryptionKeys::new(2, [2u8; 32]).with_previous(1, [1u8; 32])?)
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.l2_encryption_keys().map(|keys| keys.current_id()), Some(2));
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "encryption")]
    pub fn l2_encryption_keys(&self) -> Option<&crate::EncryptionKeys> {
        self.inner.l2.keys()
    }

    /// This instance's id in invalidation messages.
    pub fn instance_id(&self) -> u64 {
        self.inner.shared.instance_id
    }

    /// The pub/sub channel in bus mode; `None` with tracking (there is no bus).
    pub fn channel(&self) -> Option<&str> {
        match &self.inner.stream {
            Stream::Bus(bus) => Some(&bus.channel),
            Stream::Tracking(_) => None,
        }
    }

    /// The longest life of an L1 entry.
    pub fn l1_max_ttl(&self) -> Duration {
        self.inner.shared.l1_max_ttl
    }

    /// Whether this instance's L1 holds `key` now.
    pub fn cached_locally(&self, key: &str) -> bool {
        self.inner.shared.l1_hit(key).is_some()
    }

    /// Whether this instance's invalidation stream is confirmed live since the last
    /// reconnect (bus: it heard its own hello on the new subscription; tracking: the
    /// invalidation connection is subscribed and every reading connection accepted `CLIENT
    /// TRACKING ... REDIRECT` to it). While it is not, the L1 stays empty
    /// and every read goes to Redis.
    pub fn subscription_confirmed(&self) -> bool {
        self.inner.shared.coherence.is_confirmed()
    }

    /// Waits until [`subscription_confirmed`](Self::subscription_confirmed), at most
    /// `timeout`; whether it is.
    pub async fn wait_until_confirmed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.subscription_confirmed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Rounds since this instance was built in which a reconnected stream could not be
    /// confirmed (a hello not heard back in time, a re-subscription or `CLIENT TRACKING`
    /// refused). Rising
    /// while [`subscription_confirmed`](Self::subscription_confirmed) stays false means the
    /// instance cannot hear the others, and serves from Redis only, until it can.
    pub fn subscription_failures(&self) -> u64 {
        self.inner.shared.confirm_failures.load(Ordering::SeqCst)
    }

    /// Other instances' messages applied plus L1 resets so far.
    pub fn invalidations_applied(&self) -> u64 {
        *self.inner.shared.applied.borrow()
    }

    /// Waits until [`invalidations_applied`](Self::invalidations_applied) reaches
    /// `at_least`, at most `timeout`; whether it did.
    pub async fn wait_for_invalidations(&self, at_least: u64, timeout: Duration) -> bool {
        let mut applied = self.inner.shared.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|n| *n >= at_least))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many times the L1 was cleared because messages may have been lost (subscriber
    /// reconnections, a listener that fell behind; with tracking also an error or reconnect
    /// of a reading or invalidation connection, a cluster topology change, or a failed
    /// check every [`TRACKING_CHECK_EVERY`]).
    pub fn l1_resets(&self) -> u64 {
        self.inner.shared.resets.load(Ordering::SeqCst)
    }

    /// A snapshot of this instance's L1: entries, their weight, L1 hits and misses (with the
    /// `metrics` feature; Redis reads are counted by the `redis` layer's metrics) and resets
    /// ([`l1_resets`](Self::l1_resets)). See [`CacheStats`].
    pub fn stats(&self) -> CacheStats {
        let shared = &self.inner.shared;
        let l1 = shared.l1.stats();
        let (hits, misses) = shared.instruments.reads();
        CacheStats {
            hits,
            misses,
            resets: shared.resets.load(Ordering::SeqCst),
            ..l1
        }
    }

    /// Malformed messages seen on the channel (ignored).
    pub fn malformed_messages(&self) -> u64 {
        self.inner.shared.malformed.load(Ordering::SeqCst)
    }

    /// Stops listening: the listener task ends and the subscriber disconnects. Later reads
    /// and writes still work but, with no listener, this instance no longer hears the others:
    /// call it when the instance is going away (dropping the last handle does the same).
    pub async fn shutdown(&self) {
        match &self.inner.stream {
            Stream::Bus(bus) => bus.stop().await,
            Stream::Tracking(tracking) => tracking.stop(),
        }
        // Nothing heard from now on: what the L1 holds may go stale, so drop it, and keep
        // it empty.
        self.inner.shared.coherence.set_confirmed(false);
        self.inner.shared.reset(ResetReason::Shutdown);
    }

    /// Bus mode: publishes `operation` for the other instances. With tracking the server
    /// tells them itself.
    async fn publish(&self, operation: Operation, key: &str) -> Result<(), CacheError> {
        match &self.inner.stream {
            Stream::Bus(bus) => {
                bus.publish(&self.inner.shared, self.inner.l2.redis(), operation, key)
                    .await
            }
            Stream::Tracking(_) => Ok(()),
        }
    }
}

impl fmt::Debug for TieredCacheService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("TieredCacheService");
        out.field("l2", self.inner.l2.redis());
        // Key ids only: the keyring's `Debug` never shows a key.
        #[cfg(feature = "encryption")]
        out.field("l2_encryption", &self.inner.l2.keys());
        out.field("l1_max_ttl", &self.inner.shared.l1_max_ttl)
            .field("invalidation", &self.invalidation_mode())
            .field("channel", &self.channel())
            .field("instance_id", &self.inner.shared.instance_id)
            .finish()
    }
}

#[async_trait]
// Every method, defaulted ones included, is written out: a new one must be too.
#[deny(clippy::missing_trait_methods)]
impl CacheService for TieredCacheService {
    fn flight_scope(&self) -> u64 {
        // Every clone shares `inner` (and so the store).
        Arc::as_ptr(&self.inner).addr() as u64
    }

    /// The Redis service's codec (what Redis holds is its).
    fn codec(&self) -> &dyn Codec {
        self.inner.l2.redis().codec()
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        observed!(self.inner.shared.instruments, Op::Get, key, async {
            let shared = &self.inner.shared;
            if let Some(hit) = shared.l1_hit(key) {
                shared.instruments.read(true);
                return Ok(Some(hit));
            }
            shared.instruments.read(false);
            let ticket = shared.coherence.ticket(key);
            let Some(envelope) = self.inner.l2.get(key).await? else {
                return Ok(None);
            };
            shared.fill(key, &envelope, &ticket);
            Ok(Some(envelope.payload))
        })
    }

    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let first = keys.first().copied().unwrap_or_default();
        observed!(self.inner.shared.instruments, Op::GetMany, first, async {
            let shared = &self.inner.shared;
            let mut found = Vec::with_capacity(keys.len());
            let mut missed = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let hit = shared.l1_hit(key);
                shared.instruments.read(hit.is_some());
                if hit.is_none() {
                    // Taken before the read, as in `get_bytes`: an invalidation that
                    // arrives meanwhile keeps the value read out of the L1.
                    missed.push((i, shared.coherence.ticket(key)));
                }
                found.push(hit);
            }
            if missed.is_empty() {
                return Ok(found);
            }
            let names: Vec<&str> = missed.iter().map(|&(i, _)| keys[i]).collect();
            let envelopes = self.inner.l2.get_many(&names).await?;
            for ((i, ticket), envelope) in missed.iter().zip(envelopes) {
                if let Some(envelope) = envelope {
                    shared.fill(keys[*i], &envelope, ticket);
                    found[*i] = Some(envelope.payload);
                }
            }
            Ok(found)
        })
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        // A miss in L1 says nothing about L2 (`get_bytes` follows, and counts it).
        let instruments = &self.inner.shared.instruments;
        let hit = || self.inner.shared.l1_hit(key).map(|hit| Ok(Some(hit)));
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        return instruments.hit_now(Op::Get, key, hit);
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        {
            let _ = instruments;
            hit()
        }
    }

    fn get_shared_now(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        // As `get_bytes_now`: the L1's decoded value, or "read the bytes" (a miss).
        let instruments = &self.inner.shared.instruments;
        let hit = || self.inner.shared.l1_shared(key, decoder);
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        return instruments.hit_now(Op::Get, key, hit);
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        {
            let _ = instruments;
            hit()
        }
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        observed!(self.inner.shared.instruments, Op::Set, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.redis().default_ttl())?;
            let envelope = Envelope::new(value, ttl);
            let shared = &self.inner.shared;
            let ticket = shared.coherence.ticket(key);
            self.inner.l2.set(key, &envelope, ttl_secs).await?;
            shared.own_write(key, envelope.payload, ttl, &ticket);
            self.publish(Operation::Key(key.to_owned()), key).await
        })
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        observed!(self.inner.shared.instruments, Op::Invalidate, key, async {
            self.inner.l2.redis().invalidate(key).await?;
            self.inner.shared.coherence.touch(key);
            self.inner.shared.l1.forget(key);
            self.publish(Operation::Key(key.to_owned()), key).await
        })
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        observed!(
            self.inner.shared.instruments,
            Op::InvalidatePrefix,
            prefix,
            async {
                let removed = self.inner.l2.redis().invalidate_prefix(prefix).await?;
                self.inner.shared.coherence.touch_all();
                self.inner.shared.l1.invalidate_prefix(prefix).await?;
                self.publish(Operation::Prefix(prefix.to_owned()), prefix)
                    .await?;
                Ok(removed)
            }
        )
    }

    /// On this service itself (not forwarded): the record goes where its reads look.
    async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        crate::service::tags::invalidate(self, tag).await
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        observed!(self.inner.shared.instruments, Op::Lease, key, async {
            let shared = &self.inner.shared;
            let mut request = std::borrow::Cow::Borrowed(request);
            // Twice at most: a value found past its expiry (the envelope's, or with L2
            // encryption the sealed one) is replaced by the lease.
            for _ in 0..2 {
                let ticket = shared.coherence.ticket(key);
                match self.inner.l2.lease(key, &request).await? {
                    SealedLease::Expired { version } => {
                        request.to_mut().replace = Some(version);
                    }
                    SealedLease::Value { envelope, version } => {
                        // With tracking, a key read by a script may not be tracked: fill from plain reads only.
                        if matches!(self.inner.stream, Stream::Bus(_)) {
                            shared.fill(key, &envelope, &ticket);
                        }
                        return Ok(LeaseRead::Value {
                            value: envelope.payload,
                            version,
                        });
                    }
                    SealedLease::Other(LeaseRead::Granted(lease)) => {
                        // Whatever this L1 held for the key (an unusable copy) goes.
                        shared.coherence.touch(key);
                        shared.l1.forget(key);
                        return Ok(LeaseRead::Granted(lease));
                    }
                    SealedLease::Other(other) => return Ok(other),
                }
            }
            // It changed under us twice: let the caller ask again.
            Ok(LeaseRead::Held {
                remaining: Duration::ZERO,
            })
        })
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        observed!(self.inner.shared.instruments, Op::SetLeased, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.redis().default_ttl())?;
            let envelope = Envelope::new(value, ttl);
            let shared = &self.inner.shared;
            let ticket = shared.coherence.ticket(key);
            let stored = self
                .inner
                .l2
                .set_leased(key, lease, &envelope, ttl_secs)
                .await?;
            // The key held our lease, so no instance holds a usable copy: nobody to tell.
            if stored {
                shared.own_write(key, envelope.payload, ttl, &ticket);
            }
            Ok(stored)
        })
    }

    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        observed!(self.inner.shared.instruments, Op::ReplaceIf, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.redis().default_ttl())?;
            let envelope = Envelope::new(value, ttl);
            let shared = &self.inner.shared;
            let ticket = shared.coherence.ticket(key);
            let replaced = self
                .inner
                .l2
                .replace_if(key, version, &envelope, ttl_secs)
                .await?;
            if replaced.is_none() {
                // The key changed under us: whatever this L1 holds for it may be older.
                shared.coherence.touch(key);
                shared.l1.forget(key);
                return Ok(None);
            }
            // As a `set`: other instances may hold the value it replaced.
            shared.own_write(key, envelope.payload, ttl, &ticket);
            self.publish(Operation::Key(key.to_owned()), key).await?;
            Ok(replaced)
        })
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        observed!(
            self.inner.shared.instruments,
            Op::ReleaseLease,
            key,
            async { self.inner.l2.redis().release_lease(key, lease).await }
        )
    }
}
