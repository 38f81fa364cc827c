//! [`EncryptedCacheService`]: authenticated encryption around every value, with the key
//! name bound as associated data, an authenticated expiry, and a key id for rotation.
//!
//! # Stored form
//!
//! Every value is stored as a small versioned envelope (integers big-endian). This code
//! writes version 2:
//!
//! | bytes | what |
//! | --- | --- |
//! | 2 | magic `b"CS"` |
//! | 1 | version `2` (AES-256-GCM-SIV, RFC 8452: 96-bit nonce, 128-bit tag) |
//! | 4 | key id (`u32`) of the key that encrypted it |
//! | 8 | expiry (`u64`): milliseconds since the Unix epoch after which the value is dead |
//! | 12 | nonce, random per value |
//! | n + 16 | ciphertext of the n-byte value, then the tag |
//!
//! The associated data is the 27 header bytes followed by the cache key's name, so the tag
//! covers the header (a changed key id, version or expiry fails) and the key (a value copied
//! under another key fails). The header has a fixed length, so the concatenation is
//! unambiguous. The AES-256-GCM-SIV key is not the configured 32 bytes themselves but
//! HMAC-SHA256(configured key, `"cachet encrypted envelope v2: AES-256-GCM-SIV"`), so the
//! same bytes are never the key of two algorithms (version 1 uses them for AES-GCM).
//!
//! The nonces come from `rand`'s thread-local generator ([`rand::rng`]: ChaCha12 seeded from
//! the OS and reseeded from it periodically, a cryptographically secure generator), not from
//! a system call per write. Like every use of that generator, it is not reseeded when a
//! process forks: a child that keeps writing with the key repeats its parent's nonces, which
//! with AES-GCM-SIV discloses only which values were identical (below); reseed it after a
//! fork (`rand::rng().reseed()`) to avoid even that.
//!
//! **Authenticated expiry.** The expiry is the instant the write's TTL ends (`set`'s TTL, or
//! the decorator's default TTL for `None`), by the writer's clock. A read after it is a miss
//! (`Ok(None)`), whatever TTL the server holds: someone with write access to the store who
//! saved a value while it was valid and writes it back later, without a TTL, gets nothing
//! served. The expiry is checked after the tag, so changed expiry bytes are an error, not a
//! miss. Clocks of the instances should agree (NTP): a reader whose clock is behind the
//! writer's by `d` accepts a value for `d` longer.
//!
//! **Why AES-256-GCM-SIV.** Version 1 used AES-256-GCM with random 96-bit nonces, which
//! limits a key to about 2^32 messages (NIST SP 800-38D, section 8.3): a single repeated
//! nonce discloses the XOR of the two plaintexts and the GHASH authentication key, with which
//! anyone can forge values under that key; a cache writing 10 000 values a second reaches
//! 2^32 in five days. AES-GCM-SIV (RFC 8452) derives fresh authentication and encryption
//! keys from each nonce and starts the counter at a synthetic IV (the tag, computed over the
//! associated data and the plaintext), so a repeated random nonce discloses only whether the
//! two messages (the value, the key name and the header, expiry millisecond included) were
//! identical: no key is recovered and nothing can be forged. Random nonces therefore need no
//! practical bound on the writes per key.
//!
//! Its cost, measured with `cargo bench --bench encryption` (three runs on a 2-core VM while
//! other builds ran, hence ranges): encrypting then decrypting a 64-byte value takes about
//! 1.4-1.5 µs, 1.7-2.0 times version 1's AES-256-GCM envelope (AES-GCM-SIV derives two keys,
//! and an AES key schedule, per value); an 851-byte value 1.1-1.25 times; a 16 KiB value
//! 0.6-0.9 times. A typed `get` hit through the decorator over moka (decrypt, then JSON
//! decode of the 851-byte value) measured 0.97-1.19 times the same hit in version 1 (five
//! runs), a difference within this machine's noise. It is that fast only with AES and
//! carry-less multiplication instructions (AES-NI and PCLMULQDQ on x86-64, the ARMv8
//! cryptography extensions), which the `aes` and `polyval` crates detect at run time; on a
//! CPU without them they fall back to constant-time software, which is slower (not measured
//! here; so does version 1's AES-GCM).
//!
//! # Version 1 (read only)
//!
//! Version 1, which earlier releases wrote, is still read, so values written before an
//! upgrade keep working until their server TTL ends:
//!
//! | bytes | what |
//! | --- | --- |
//! | 2 | magic `b"CS"` |
//! | 1 | version `1` (AES-256-GCM, 96-bit nonce, 128-bit tag) |
//! | 4 | key id (`u32`) |
//! | 12 | nonce |
//! | n + 16 | ciphertext, then the tag |
//!
//! with the 19 header bytes and the key name as associated data. **Version 1 has no
//! authenticated expiry**: a version-1 value saved by someone with write access decrypts
//! whenever it is written back. Writing version 2 closes that hole only for new values; to
//! close it for the old ones, once the longest TTL in use has passed since the upgrade,
//! either turn version-1 reads off ([`EncryptionKeys::accept_v1`]`(false)`), or rotate to a
//! new key and drop the old one.
//!
//! # Errors
//!
//! Reading a value that is not such an envelope, one whose key id the keyring does not
//! hold, or one whose tag does not verify (tampered bytes, a wrong key, a value copied from
//! another key) is [`CacheError::Integrity`] naming the key and, where there is one, the
//! key id; nothing is written back, so the stored entry stays as it was.
//!
//! # Plaintext in memory
//!
//! Key bytes (the configured key, the derived version-2 key, the ciphers' key state and the
//! per-value keys AES-GCM-SIV derives) are zeroed when dropped. A decrypted value is returned as [`Bytes`] whose buffer is
//! zeroed when its last handle drops; a value being encrypted is encrypted in place in the
//! output buffer, and the caller's plaintext buffer is zeroed after sealing when this layer
//! holds its only handle. What a caller decodes the bytes into is the caller's to protect.
//!
//! # Layout
//!
//! - `keys`: key text parsing ([`EncryptionKey`]), the keyring and its rotation
//!   ([`EncryptionKeys`]), the version-2 key derivation;
//! - `envelope`: the wire format above ([`EncryptedEnvelope`], [`MAGIC`], [`HEADER_LEN`], …)
//!   and the sealing and opening of each version with one key's ciphers;
//! - this module: the [`EncryptedCacheService`] decorator.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use zeroize::Zeroize;

use crate::codec::Codec;
use crate::load::{Lease, LeaseRead, LeaseRequest, StoredVersion};
use crate::service::{DEFAULT_TTL_SECS, Decoder, SharedValue, check_default_ttl, resolve_ttl};
use crate::{CacheError, CacheService, IntegrityProblem};

mod envelope;
mod keys;

pub use self::envelope::{
    EncryptedEnvelope, HEADER_LEN, HEADER_LEN_V1, MAGIC, NONCE_LEN, NONCE_LEN_V1, TAG_LEN, VERSION,
    VERSION_V1,
};
pub use self::keys::{EncryptionKey, EncryptionKeys};

/// Encrypts every value written through it and decrypts every value read, around any
/// [`CacheService`] (`Arc<dyn CacheService>` too).
///
/// - AES-256-GCM-SIV (RFC 8452) with a random 96-bit nonce per value (envelope version 2,
///   [module docs](self)); values an earlier release wrote with AES-256-GCM (version 1)
///   still read, until their server TTL ends;
/// - the key's name (and the envelope header) is the associated data, so a value copied
///   under another key does not decrypt;
/// - every value carries its expiry, authenticated: the end of the TTL the write used
///   (`ttl_secs`, or this decorator's [default TTL](Self::with_default_ttl_secs) for
///   `None`). A read after it is a miss (`Ok(None)`), whatever TTL the inner store holds, so
///   a value saved and written back later by someone with write access to the store is not
///   served. The same holds for the lease paths: an expired value found by
///   [`lease`](CacheService::lease) is replaced by the lease, as a miss;
/// - the key id travels in the envelope, so a keyring with previous keys still reads values
///   written before a rotation, while new writes use the current key;
/// - a value that does not decrypt is [`CacheError::Integrity`] naming the key (and the
///   key id), never a panic, and stays stored as it was;
/// - keys are stored under exactly their names: `invalidate` and `invalidate_prefix` pass
///   through unchanged, and so does `ttl_secs` (`None` stays `None` for the inner service).
///
/// Only values are encrypted; key names are not. Keep secrets out of key names (hash tokens,
/// as `token:<sha256>`). What it does not stop: someone with write access can still delete
/// or overwrite entries, or write back a value that is still within its TTL (an older
/// value of the same key, until it expires); and a version-1 value saved before the upgrade
/// can be written back until version-1 reads are turned off
/// ([`EncryptionKeys::accept_v1`]).
///
/// The default TTL: the inner service's default TTL is not visible through
/// [`CacheService`], so this decorator has its own (300 s, as every backend unless
/// configured). If the inner service was built with another default TTL, give this
/// decorator the same one ([`with_default_ttl_secs`](Self::with_default_ttl_secs)): a
/// shorter one ends `None` writes earlier than the store does, a longer one leaves a replay
/// window past the store's TTL.
///
/// With [`NamespacedCacheService`](crate::NamespacedCacheService), the order matters: the
/// associated data is the key name this service sees. Put the encryption inside the
/// namespace (`NamespacedCacheService::new(EncryptedCacheService::new(redis, keys), "acme")`)
/// to bind each value to its full stored name, so that a value copied from one tenant's
/// namespace into another's does not decrypt either; outside it, the name without the
/// namespace is bound.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{CacheService, CacheServiceExt, EncryptedCacheService, EncryptionKeys, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let shared = MokaCacheService::default(); // a Redis service in production
/// let keys = EncryptionKeys::new(1, [7u8; 32]);
/// let cache: Arc<dyn CacheService> = Arc::new(EncryptedCacheService::new(shared.clone(), keys));
///
/// cache.set("org:acme:sso", &"client-secret", None).await?;
/// assert_eq!(cache.get::<String>("org:acme:sso").await?.as_deref(), Some("client-secret"));
///
/// let raw = shared.get_bytes("org:acme:sso").await?.unwrap();
/// assert!(!raw.windows(13).any(|w| w == b"client-secret"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EncryptedCacheService<S> {
    inner: S,
    keys: EncryptionKeys,
    default_ttl: Duration,
}

/// How many times [`CacheService::lease`] replaces an expired value before it reports the
/// last one as unreadable (each replacement can only fail if the key is written again).
const EXPIRED_LEASE_RETRIES: usize = 3;

impl<S: CacheService> EncryptedCacheService<S> {
    /// Wraps `inner`: values are encrypted with `keys`' current key; `None` TTLs are 300 s
    /// ([`DEFAULT_TTL_SECS`]) in the sealed expiry.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.keys().current_id(), 1);
    /// assert_eq!(cache.default_ttl().as_secs(), 300);
    /// ```
    pub fn new(inner: S, keys: EncryptionKeys) -> Self {
        EncryptedCacheService {
            inner,
            keys,
            default_ttl: Duration::from_secs(DEFAULT_TTL_SECS),
        }
    }

    /// Sets the TTL sealed into values written with `ttl_secs: None`: give it the inner
    /// service's default TTL. Outside `1..=MAX_TTL_SECS` is [`CacheError::Config`].
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let moka = MokaCacheService::builder().default_ttl_secs(60).build()?;
    /// let cache = EncryptedCacheService::new(moka, EncryptionKeys::new(1, [1u8; 32]))
    ///     .with_default_ttl_secs(60)?;
    /// assert_eq!(cache.default_ttl().as_secs(), 60);
    /// assert!(EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]))
    ///     .with_default_ttl_secs(0)
    ///     .is_err());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn with_default_ttl_secs(mut self, secs: u64) -> Result<Self, CacheError> {
        self.default_ttl = check_default_ttl(secs)?;
        Ok(self)
    }

    /// The TTL sealed into values written with `ttl_secs: None`.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.default_ttl(), std::time::Duration::from_secs(300));
    /// ```
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// The wrapped service, which sees only encrypted values.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.inner().entry_count(), 0);
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The keyring.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(4, [1u8; 32]));
    /// assert_eq!(cache.keys().current_id(), 4);
    /// ```
    pub fn keys(&self) -> &EncryptionKeys {
        &self.keys
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// let moka: MokaCacheService = cache.into_inner();
    /// # let _ = moka;
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn open(&self, key: &str, stored: Option<Bytes>) -> Result<Option<Bytes>, CacheError> {
        match stored {
            Some(bytes) => self.keys.decrypt(key, &bytes),
            None => Ok(None),
        }
    }

    /// Encrypts `value` with the expiry of the write's TTL; zeroes `value`'s buffer after
    /// if this is its only handle.
    fn seal(&self, key: &str, value: Bytes, ttl_secs: Option<u64>) -> Result<Bytes, CacheError> {
        let ttl = resolve_ttl(key, ttl_secs, self.default_ttl)?;
        let sealed = self.keys.encrypt(key, &value, ttl);
        if let Ok(mut unique) = value.try_into_mut() {
            unique[..].zeroize();
        }
        sealed
    }
}

impl<S: fmt::Debug> fmt::Debug for EncryptedCacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedCacheService")
            .field("keys", &self.keys)
            .field("default_ttl", &self.default_ttl)
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
// Every method, defaulted ones included, is written out: a new one must be too.
#[deny(clippy::missing_trait_methods)]
impl<S: CacheService> CacheService for EncryptedCacheService<S> {
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let stored = self.inner.get_bytes(key).await?;
        self.open(key, stored)
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        self.inner
            .get_bytes_now(key)
            .map(|answer| answer.and_then(|stored| self.open(key, stored)))
    }

    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let stored = self.inner.get_many_bytes(keys).await?;
        keys.iter()
            .zip(stored)
            .map(|(key, stored)| self.open(key, stored))
            .collect()
    }

    /// Not forwarded: the inner service holds ciphertext, whose decoded value is not this
    /// service's. Shared reads through this decorator decrypt and decode each time.
    fn get_shared_now(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        let _ = (key, decoder);
        None
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        let sealed = self.seal(key, value, ttl_secs)?;
        self.inner.set_bytes(key, sealed, ttl_secs).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.invalidate(key).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        self.inner.invalidate_prefix(prefix).await
    }

    /// The inner service's scope: keys are stored under their own names, so a load of `k`
    /// through this decorator is a load of the inner store's `k`, and every clone of the
    /// decorator over one store shares it (as do [`load::invalidate_in_flight`] calls on the
    /// inner store).
    ///
    /// [`load::invalidate_in_flight`]: crate::load::invalidate_in_flight
    fn flight_scope(&self) -> u64 {
        self.inner.flight_scope()
    }

    fn codec(&self) -> &dyn Codec {
        self.inner.codec()
    }

    /// Decrypts a value the inner lease returns. One past its authenticated expiry is a
    /// miss: it is replaced by the lease at once (a new request for the same token with
    /// `replace` set to that value), so the caller sees what it would see for an expired
    /// entry. A value that does not decrypt is [`LeaseRead::Unreadable`].
    /// On this service itself (not forwarded): the record goes where its reads look.
    async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        crate::service::tags::invalidate(self, tag).await
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        let mut answer = self.inner.lease(key, request).await?;
        let mut replaced = 0;
        loop {
            let LeaseRead::Value { value, version } = answer else {
                return Ok(answer);
            };
            match self.keys.decrypt(key, &value) {
                Ok(Some(value)) => return Ok(LeaseRead::Value { value, version }),
                Err(error) => return Ok(LeaseRead::Unreadable { error, version }),
                Ok(None) if replaced == EXPIRED_LEASE_RETRIES => {
                    let error = CacheError::integrity(key, "encryption", IntegrityProblem::Expired);
                    return Ok(LeaseRead::Unreadable { error, version });
                }
                Ok(None) => {
                    replaced += 1;
                    let replace = LeaseRequest {
                        replace: Some(version),
                        ..request.clone()
                    };
                    answer = self.inner.lease(key, &replace).await?;
                }
            }
        }
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let sealed = self.seal(key, value, ttl_secs)?;
        self.inner.set_leased(key, lease, sealed, ttl_secs).await
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.inner.release_lease(key, lease).await
    }

    /// Seals `value` and replaces the inner service's value `version` names (versions are
    /// the inner service's: of the ciphertext).
    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        let sealed = self.seal(key, value, ttl_secs)?;
        self.inner.replace_if(key, version, sealed, ttl_secs).await
    }
}

#[cfg(test)]
mod tests;
