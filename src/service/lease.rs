//! Leases for cache-aside: the rule that keeps a slow load from writing back a value that was
//! changed or invalidated while it ran (the "stale set" of Facebook's memcache design,
//! Nishtala et al., NSDI 2013, section 3.2.1), and the cross-instance single flight.
//!
//! A miss in [`get_or_load`](crate::CacheServiceExt::get_or_load) asks the store that holds
//! the truth for a lease on the key ([`CacheService::lease`](crate::CacheService::lease)):
//!
//! - if the key holds a value, that value comes back instead (someone filled it meanwhile);
//! - if another caller holds a live lease, the answer says so, and this caller waits for
//!   that caller's value rather than loading too (polling with backoff, bounded by the load
//!   timeout); when the lease ends without a value, the next poll takes it;
//! - else this caller now holds the lease: a marker stored *in the entry's own key*, which
//!   reads as a miss. It loads, and writes back with
//!   [`CacheService::set_leased`](crate::CacheService::set_leased), which stores the value
//!   only if the marker is still this caller's. Any `set`, `invalidate`, `invalidate_prefix`
//!   (or expiry, eviction, flush) of the key in the meantime replaced or removed the marker,
//!   so the late write-back is dropped; its callers still get the value they loaded.
//!
//! Why the marker lives in the entry's key rather than beside it (`<key>:lease`): a second
//! key lands in another hash slot on a cluster (so the write-back check could not be one
//! atomic step), and `invalidate_prefix` would have to find and void it separately. In the
//! entry's own key, every operation that changes the entry voids the lease by construction,
//! and the check-and-store is one Lua script on one slot. On Redis the marker is a hash
//! (`HSET key cachet-lease <token>` with a `PEXPIRE`), a type no cachet value has, so no
//! stored string can ever be mistaken for it; in memory it is a flag on the map's entry.
//!
//! A lease is short ([`DEFAULT_LEASE_TTL`]) and renewed while its loader runs, so that a
//! process that dies mid-load holds up the other instances for a few seconds at most; a
//! load that is cancelled (its request dropped) releases its lease in the background.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::CacheError;

/// How long a lease lives unless renewed: 3 seconds. A loader that runs longer keeps its
/// lease by renewing it every [`LEASE_RENEW_EVERY`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// How often a running loader renews its lease.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(1);

/// A lease token: 128 random bits as 32 hex digits, chosen by the caller so that asking
/// again with the same token renews the lease (and a request replayed after a reconnect
/// is harmless).
///
/// ```
/// use cachet::load::LeaseToken;
///
/// let a = LeaseToken::random();
/// assert_eq!(a.as_str().len(), 32);
/// assert_ne!(a, LeaseToken::random());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(Arc<str>);

impl LeaseToken {
    /// A fresh random token.
    pub fn random() -> Self {
        // `rand`'s thread-local generator, seeded from the OS.
        let bytes: [u8; 16] = rand::random();
        LeaseToken(Arc::from(hex::encode(bytes)))
    }

    /// The token's text, as stored in the marker.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", &self.0)
    }
}

/// Which stored value a caller saw: passed back in [`LeaseRequest::replace`] to say "that
/// value is unusable to me (past its freshness, a 'not found' I do not trust, undecodable):
/// replace it with a lease, unless it changed since". Opaque; backends make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVersion(VersionRepr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum VersionRepr {
    /// The raw bytes as the server stores them (Redis compares their SHA-1 in the script).
    Bytes(Bytes),
    /// A write id (in-memory backends number their writes).
    Id(u64),
}

impl StoredVersion {
    /// The version of a value stored as exactly these bytes.
    pub fn of_bytes(raw: Bytes) -> Self {
        StoredVersion(VersionRepr::Bytes(raw))
    }

    /// The version of a value with this write id.
    pub fn of_id(id: u64) -> Self {
        StoredVersion(VersionRepr::Id(id))
    }

    /// The raw bytes, for a version made by [`of_bytes`](Self::of_bytes).
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match &self.0 {
            VersionRepr::Bytes(bytes) => Some(bytes),
            VersionRepr::Id(_) => None,
        }
    }

    /// The write id, for a version made by [`of_id`](Self::of_id).
    pub fn as_id(&self) -> Option<u64> {
        match &self.0 {
            VersionRepr::Id(id) => Some(*id),
            VersionRepr::Bytes(_) => None,
        }
    }
}

/// What a caller asks of [`CacheService::lease`](crate::CacheService::lease).
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// The caller's token; asking again with the same token renews the caller's lease.
    pub token: LeaseToken,
    /// How long the lease lives unless renewed.
    pub ttl: Duration,
    /// A value the caller saw and cannot use: replace it with the lease if it is still
    /// exactly that value. `None`: any value stored is returned.
    pub replace: Option<StoredVersion>,
    /// Only extend the caller's lease if it still holds it ([`LeaseRead::Granted`]); never
    /// take a new one ([`LeaseRead::Lost`] instead). A running loader renews this way, so
    /// that a lease voided by an invalidation is not silently taken again.
    pub renew: bool,
}

impl LeaseRequest {
    /// A request for a fresh lease with a new random token and the default TTL.
    ///
    /// ```
    /// use cachet::load::{LeaseRequest, DEFAULT_LEASE_TTL};
    ///
    /// let request = LeaseRequest::new();
    /// assert_eq!(request.ttl, DEFAULT_LEASE_TTL);
    /// assert!(request.replace.is_none());
    /// ```
    pub fn new() -> Self {
        LeaseRequest {
            token: LeaseToken::random(),
            ttl: DEFAULT_LEASE_TTL,
            replace: None,
            renew: false,
        }
    }
}

impl Default for LeaseRequest {
    fn default() -> Self {
        LeaseRequest::new()
    }
}

/// The answer to [`CacheService::lease`](crate::CacheService::lease).
#[derive(Debug)]
#[non_exhaustive]
pub enum LeaseRead {
    /// The key holds a value: here it is (as [`get_bytes`](crate::CacheService::get_bytes)
    /// would return it), with its version.
    Value {
        /// The value.
        value: Bytes,
        /// Its version, to ask for its replacement.
        version: StoredVersion,
    },
    /// The key holds something this layer cannot read (a decorator's decryption failed, a
    /// corrupt envelope); it can be replaced through `version`.
    Unreadable {
        /// Why it cannot be read.
        error: CacheError,
        /// Its version.
        version: StoredVersion,
    },
    /// The caller holds the lease now (or still: a renewal).
    Granted(Lease),
    /// Another caller holds a live lease, ending within `remaining` unless renewed.
    Held {
        /// The lease's remaining life.
        remaining: Duration,
    },
    /// A renewal ([`LeaseRequest::renew`]) found the caller's lease gone: the key was
    /// written, invalidated or expired since.
    Lost,
    /// This service has no leases (a custom service that keeps the default methods): load
    /// without one and store with `set_bytes`.
    Unsupported,
}

/// A held lease. Dropping it without [`disarm`](Lease::disarm) releases it in the background
/// (a cancelled load must not keep the other instances waiting for a whole lease).
pub struct Lease {
    token: LeaseToken,
    release_on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Lease {
    /// A lease held with `token`; `release_on_drop` runs if it is dropped armed (it must not
    /// block: spawn the release).
    pub fn new(token: LeaseToken, release_on_drop: impl FnOnce() + Send + Sync + 'static) -> Self {
        Lease {
            token,
            release_on_drop: Some(Box::new(release_on_drop)),
        }
    }

    /// The lease's token.
    pub fn token(&self) -> &LeaseToken {
        &self.token
    }

    /// Keeps the lease from being released on drop (it was used, released, or is another
    /// handle on a lease still held elsewhere).
    pub fn disarm(&mut self) {
        self.release_on_drop = None;
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("token", &self.token)
            .field("armed", &self.release_on_drop.is_some())
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(release) = self.release_on_drop.take() {
            release();
        }
    }
}
