//! What the tiered cache stores in Redis and reads back: every L2 call that carries value
//! bytes goes through [`SealedL2`], which puts the tiered [`Envelope`] around the value and,
//! with L2 encryption ([`TieredCacheServiceBuilder::encrypt_l2`]), seals the value inside
//! it with [`EncryptionKeys`]. The L1 only ever sees opened, plain payloads.
//!
//! # Stored form with L2 encryption
//!
//! `CE` envelope (magic, version, flags, expiry) around a `CS` encrypted envelope (the
//! format of [`EncryptedCacheService`]) of the plain value, both with the same expiry to the
//! millisecond:
//!
//! ```text
//! "CE" 1 0 <expiry ms> | "CS" 2 <key id> <expiry ms> <nonce> <ciphertext + tag>
//! ```
//!
//! The tiered envelope stays outside the ciphertext because:
//!
//! - it is the bytes `EncryptedCacheService<TieredCacheService>` stores for the same write
//!   (that stack seals first, then the tiered cache envelopes the sealed bytes), so the two
//!   stacks read each other's values, and a fleet can move from one to the other without a
//!   miss;
//! - nothing the tiered cache does with a stored value before it decrypts changes: the
//!   lease script compares raw bytes, an expired envelope is replaced by a lease before any
//!   decryption, a corrupt one is [`LeaseRead::Unreadable`] as before; tracking and the bus
//!   carry key names only.
//!
//! The outer expiry is not authenticated, the inner one is: a value is a miss once either has
//! passed, and an L1 fill lives at most until the earlier of the two, so rewriting the outer
//! expiry in Redis can shorten a value's life but never lengthen it.
//!
//! [`TieredCacheServiceBuilder::encrypt_l2`]: super::TieredCacheServiceBuilder::encrypt_l2
//! [`EncryptedCacheService`]: crate::EncryptedCacheService
//! [`EncryptionKeys`]: crate::EncryptionKeys

#[cfg(feature = "encryption")]
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;

use super::envelope::Envelope;
use crate::load::{Lease, LeaseRead, LeaseRequest, StoredVersion};
use crate::{CacheError, CacheService, RedisCacheService};
#[cfg(feature = "encryption")]
use crate::{EncryptedEnvelope, EncryptionKeys};

/// The tiered cache's L2: the Redis service, and the keys that seal its values (if any).
pub(super) struct SealedL2 {
    redis: RedisCacheService,
    #[cfg(feature = "encryption")]
    keys: Option<EncryptionKeys>,
}

/// What a lease on L2 found, its value opened.
pub(super) enum SealedLease {
    /// A live value.
    Value {
        envelope: Envelope,
        version: StoredVersion,
    },
    /// A value past its expiry (the envelope's or the sealed one): a miss, to replace.
    Expired { version: StoredVersion },
    /// Anything else, as the Redis service answered it (a value that cannot be opened is
    /// [`LeaseRead::Unreadable`]).
    Other(LeaseRead),
}

impl SealedL2 {
    /// Plain envelopes.
    pub(super) fn plain(redis: RedisCacheService) -> Self {
        SealedL2 {
            redis,
            #[cfg(feature = "encryption")]
            keys: None,
        }
    }

    /// Values sealed with `keys`.
    #[cfg(feature = "encryption")]
    pub(super) fn encrypted(redis: RedisCacheService, keys: EncryptionKeys) -> Self {
        SealedL2 {
            redis,
            keys: Some(keys),
        }
    }

    /// The Redis service, for the calls that carry no value bytes (invalidations, lease
    /// release, the bus, the connection).
    pub(super) fn redis(&self) -> &RedisCacheService {
        &self.redis
    }

    /// The keys values are sealed with; `None`: plain envelopes.
    #[cfg(feature = "encryption")]
    pub(super) fn keys(&self) -> Option<&EncryptionKeys> {
        self.keys.as_ref()
    }

    /// The live value of `key`; `None` if missing or expired.
    pub(super) async fn get(&self, key: &str) -> Result<Option<Envelope>, CacheError> {
        match self.redis.get_bytes(key).await? {
            Some(stored) => self.open(key, &stored),
            None => Ok(None),
        }
    }

    /// The live values of `keys` (one `MGET` per hash slot), in their order.
    pub(super) async fn get_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Option<Envelope>>, CacheError> {
        let stored = self.redis.get_many_bytes(keys).await?;
        keys.iter()
            .zip(stored)
            .map(|(key, stored)| match stored {
                Some(stored) => self.open(key, &stored),
                None => Ok(None),
            })
            .collect()
    }

    /// Stores `envelope` under `key` (`ttl_secs` passes through to Redis).
    pub(super) async fn set(
        &self,
        key: &str,
        envelope: &Envelope,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        let stored = self.seal(key, envelope)?;
        self.redis.set_bytes(key, stored, ttl_secs).await
    }

    /// Stores `envelope` under `key` if `lease` still holds it.
    pub(super) async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        envelope: &Envelope,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let stored = self.seal(key, envelope)?;
        self.redis.set_leased(key, lease, stored, ttl_secs).await
    }

    /// Stores `envelope` under `key` if the key still holds the value `version` names.
    pub(super) async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        envelope: &Envelope,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        let stored = self.seal(key, envelope)?;
        self.redis.replace_if(key, version, stored, ttl_secs).await
    }

    /// A lease request on `key`, a value found opened.
    pub(super) async fn lease(
        &self,
        key: &str,
        request: &LeaseRequest,
    ) -> Result<SealedLease, CacheError> {
        Ok(match self.redis.lease(key, request).await? {
            LeaseRead::Value { value, version } => match self.open(key, &value) {
                Ok(Some(envelope)) => SealedLease::Value { envelope, version },
                Ok(None) => SealedLease::Expired { version },
                Err(error) => SealedLease::Other(LeaseRead::Unreadable { error, version }),
            },
            other => SealedLease::Other(other),
        })
    }

    /// The stored form of `envelope` under `key`.
    fn seal(&self, key: &str, envelope: &Envelope) -> Result<Bytes, CacheError> {
        #[cfg(feature = "encryption")]
        if let Some(keys) = &self.keys {
            // The sealed expiry is the envelope's, to the millisecond.
            let expires_at = UNIX_EPOCH + Duration::from_millis(envelope.expires_at_ms);
            let sealed = Envelope {
                expires_at_ms: envelope.expires_at_ms,
                payload: keys.encrypt_until(key, &envelope.payload, expires_at)?,
            };
            return Ok(sealed.encode());
        }
        let _ = key;
        Ok(envelope.encode())
    }

    /// Reads what Redis holds under `key`: `None` once past its expiry; a corrupt envelope
    /// or (with L2 encryption) a value that does not decrypt is [`CacheError::Integrity`].
    fn open(&self, key: &str, stored: &Bytes) -> Result<Option<Envelope>, CacheError> {
        let envelope = Envelope::decode(key, stored)?;
        if envelope.remaining().is_zero() {
            return Ok(None);
        }
        #[cfg(feature = "encryption")]
        if let Some(keys) = &self.keys {
            return decrypt(keys, key, envelope);
        }
        Ok(Some(envelope))
    }
}

/// Opens a sealed payload: its plaintext, valid until the earlier of the two expiries.
#[cfg(feature = "encryption")]
fn decrypt(
    keys: &EncryptionKeys,
    key: &str,
    envelope: Envelope,
) -> Result<Option<Envelope>, CacheError> {
    let Some(payload) = keys.decrypt(key, &envelope.payload)? else {
        return Ok(None);
    };
    // The tag verified the header, so this expiry is the writer's (none in version 1).
    let sealed_ms = EncryptedEnvelope::parse(key, &envelope.payload)?
        .expires_at()
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    Ok(Some(Envelope {
        expires_at_ms: envelope.expires_at_ms.min(sealed_ms),
        payload,
    }))
}
