//! Cache-aside loading: [`get_or_load`](crate::CacheServiceExt::get_or_load) and
//! [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with).
//!
//! - Single flight: concurrent misses of one key on one service (every clone of a backend
//!   counts as the same service, see [`CacheService::flight_scope`]) run the loader once in
//!   this process; the others wait for it and receive its value or its error. A waiter
//!   whose leader is cancelled (its request dropped) takes over instead of hanging.
//! - A loader error is never cached. A cache that fails to read is treated as a miss and one
//!   that fails to write does not fail the call (the loaded value is returned); both are
//!   reported in [`Loaded::cache_error`]. A value loaded without a lease (the cache could
//!   not be reached to take one) is returned but not written. Stored bytes that do not decode are a miss too, and
//!   the fresh load overwrites them.
//! - Negative caching (opt-in): a loader's `Ok(None)` ("not found") is cached for a short
//!   time, so that unknown keys cannot hammer the store.
//! - Fail-safe (opt-in): the value stays stored for a grace period after its TTL; when a
//!   reload fails or times out inside that period, the last known value is served and the
//!   result says so ([`LoadSource::Stale`]). A value served this way is kept for a short
//!   throttle time before the store is asked again, never past the grace period.
//! - Bounded: the loader runs under a timeout (default 30 s), and waiters give up with it.
//! - Leases ([`lease`]): a miss takes a short lease on the key in the store that holds the
//!   truth (Redis for the Redis and tiered backends, the map in memory), and the loaded
//!   value is written back only if the lease is still there. Any `set`, `invalidate` or
//!   `invalidate_prefix` of the key meanwhile, from any instance, voids it: a slow load can
//!   never write back a value that an invalidation overtook (its callers still get it,
//!   while callers that joined it read again). The same lease is the single flight across
//!   instances: a miss that finds another instance's live lease waits for its value.

pub(crate) mod aside;
mod flight;
mod leader;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::flight::{Outcome, Role};
// The stored frame lives with the codec and the lease types with the contract; these are
// their first-release paths (`cachet::load::Frame`, `cachet::load::lease::…`).
pub use crate::codec::frame::{self, Frame, decode_stored, now_ms};
use crate::lock::ConcurrencyService;
pub use crate::service::lease::{
    self, DEFAULT_LEASE_TTL, LEASE_RENEW_EVERY, Lease, LeaseRead, LeaseRequest, LeaseToken,
    StoredVersion,
};
use crate::service::resolve_ttl;
use crate::{CacheError, CacheService, KeyName, codec};

/// Default bound on a loader call (and on waiting for another caller's): 30 seconds.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time a value served by fail-safe is kept before the store is asked again.
pub const DEFAULT_FAIL_SAFE_THROTTLE: Duration = Duration::from_secs(5);

/// How [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with) caches.
///
/// ```
/// use std::time::Duration;
/// use cachet::LoadOptions;
///
/// let options = LoadOptions::default()
///     .ttl_secs(300)                              // fresh for 5 minutes
///     .negative_ttl_secs(30)                      // "not found" cached for 30 s
///     .fail_safe(Duration::from_secs(3600))       // serve the last value up to 1 h late
///     .load_timeout(Duration::from_secs(2));      // when the store fails or hangs
/// assert_eq!(options.ttl(), Some(300));
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    ttl_secs: Option<u64>,
    negative_ttl_secs: Option<u64>,
    fail_safe: Option<Duration>,
    fail_safe_throttle: Duration,
    load_timeout: Duration,
    locks: Option<Arc<dyn ConcurrencyService>>,
}

impl Default for LoadOptions {
    /// The backend's default TTL, no negative caching, no fail-safe, a 30 s load timeout.
    fn default() -> Self {
        LoadOptions {
            ttl_secs: None,
            negative_ttl_secs: None,
            fail_safe: None,
            fail_safe_throttle: DEFAULT_FAIL_SAFE_THROTTLE,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            locks: None,
        }
    }
}

impl LoadOptions {
    /// How long a loaded value is fresh (default: the backend's default TTL; fail-safe needs
    /// an explicit TTL).
    pub fn ttl_secs(mut self, secs: u64) -> Self {
        self.ttl_secs = Some(secs);
        self
    }

    /// Caches a loader's "not found" (`Ok(None)`) for `secs` seconds.
    pub fn negative_ttl_secs(mut self, secs: u64) -> Self {
        self.negative_ttl_secs = Some(secs);
        self
    }

    /// Stops caching "not found" (the default).
    pub fn no_negative_caching(mut self) -> Self {
        self.negative_ttl_secs = None;
        self
    }

    /// Keeps each value stored `grace` longer than its TTL, and serves it (marked
    /// [`LoadSource::Stale`]) when a reload fails or times out within that time.
    pub fn fail_safe(mut self, grace: Duration) -> Self {
        self.fail_safe = Some(grace);
        self
    }

    /// After fail-safe served a stale value, how long it is served before the store is
    /// asked again (default 5 s; never past the grace period).
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.fail_safe_throttle = throttle;
        self
    }

    /// The longest a loader may run, and a waiter wait for it (default 30 s).
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// Single flight across instances under a lock, for a cache service *without* leases
    /// (a custom [`CacheService`] that keeps the default [`CacheService::lease`]): before
    /// loading, the leader takes `cachet:load:<key>` in `locks` (shared by the instances)
    /// and reads the cache again once it holds it. If the lock cannot be had, it loads
    /// anyway.
    ///
    /// Every cache of this crate has leases ([`lease`]): a miss leases the key in the store
    /// that holds the truth, and the other instances wait for that load, so N instances
    /// missing one key load it once in all with no lock, and no key is left behind without
    /// an expiry. There the lock is not used at all.
    ///
    /// ```
    /// # #![allow(deprecated)]
    /// use std::sync::Arc;
    /// use cachet::{ConcurrencyService, LoadOptions, LocalConcurrencyService};
    ///
    /// let locks: Arc<dyn ConcurrencyService> = Arc::new(LocalConcurrencyService::default());
    /// let options = LoadOptions::default().ttl_secs(300).distributed_single_flight(locks);
    /// assert!(options.is_distributed());
    /// ```
    #[deprecated(
        since = "0.2.0",
        note = "cache-aside leases give every cachet backend a cross-instance single flight; \
                the lock is used only by services without leases"
    )]
    pub fn distributed_single_flight(mut self, locks: Arc<dyn ConcurrencyService>) -> Self {
        self.locks = Some(locks);
        self
    }

    /// Whether loads also take a cross-instance lock.
    pub fn is_distributed(&self) -> bool {
        self.locks.is_some()
    }

    /// Checks the options for a call on `key`: TTLs within `1..=MAX_TTL_SECS`, and an
    /// explicit TTL when fail-safe is on; else [`CacheError::InvalidArgument`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachet::LoadOptions;
    ///
    /// assert!(LoadOptions::default().ttl_secs(60).check("k").is_ok());
    /// assert!(LoadOptions::default().ttl_secs(0).check("k").is_err());
    /// assert!(LoadOptions::default().fail_safe(Duration::from_secs(60)).check("k").is_err());
    /// ```
    pub fn check(&self, key: &str) -> Result<(), CacheError> {
        if self.fail_safe.is_some() && self.ttl_secs.is_none() {
            return Err(CacheError::invalid_argument(
                key,
                "fail-safe needs an explicit TTL (LoadOptions::ttl_secs)",
            ));
        }
        if let Some(ttl) = self.ttl_secs {
            resolve_ttl(key, Some(ttl), Duration::ZERO)?;
        }
        if let Some(ttl) = self.negative_ttl_secs {
            resolve_ttl(key, Some(ttl), Duration::ZERO)?;
        }
        Ok(())
    }

    /// The fresh TTL, when set.
    pub fn ttl(&self) -> Option<u64> {
        self.ttl_secs
    }

    /// The negative-caching TTL, when set.
    pub fn negative_ttl(&self) -> Option<u64> {
        self.negative_ttl_secs
    }

    /// The fail-safe grace period, when on.
    pub fn fail_safe_grace(&self) -> Option<Duration> {
        self.fail_safe
    }

    /// The load timeout.
    pub fn timeout(&self) -> Duration {
        self.load_timeout
    }
}

/// Where a [`Loaded`] value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadSource {
    /// A fresh cache entry (a cached "not found" too).
    Cache,
    /// This call ran the loader.
    Loader,
    /// Another concurrent call ran the loader, and this one received its result.
    Joined,
    /// Fail-safe: the store failed (now, or within the throttle time), and this is the last
    /// known value, past its TTL but within the grace period.
    Stale,
}

/// What [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with) returns.
#[derive(Debug)]
#[non_exhaustive]
pub struct Loaded<T> {
    /// The value; `None` when the loader found nothing (or a cached "not found" was hit).
    pub value: Option<T>,
    /// Where it came from.
    pub source: LoadSource,
    /// A cache error the call worked around: a failed read (treated as a miss), stored
    /// bytes that did not decode (overwritten by the load), or a failed write.
    pub cache_error: Option<CacheError>,
    /// What this call wrote to the cache (stored bytes, TTL in seconds), for callers that
    /// store the same value under a second key (the org resolver).
    #[cfg_attr(not(feature = "tenancy"), allow(dead_code))]
    pub(crate) written: Option<(Bytes, Option<u64>)>,
}

impl<T> Loaded<T> {
    /// Whether this is a stale value served by fail-safe.
    pub fn is_stale(&self) -> bool {
        self.source == LoadSource::Stale
    }
}

/// Why [`get_or_load`](crate::CacheServiceExt::get_or_load) returned no value.
///
/// ```
/// use cachet::{CacheServiceExt, LoadError, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cache = MokaCacheService::default();
/// let err = cache
///     .get_or_load::<u32, _, _, _>("org:acme", None, || async { Err("database down") })
///     .await
///     .unwrap_err();
/// assert!(matches!(&err, LoadError::Loader { source, .. } if **source == "database down"));
/// assert!(err.to_string().contains("org:acme"));
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError<E> {
    /// The loader failed. Every caller that waited on the same load receives the same error,
    /// hence the `Arc`. It is not cached: the next call loads again.
    Loader {
        /// The key being loaded.
        key: KeyName,
        /// The loader's error.
        source: Arc<E>,
    },
    /// The loader did not finish in time (see [`LoadOptions::load_timeout`]).
    Timeout {
        /// The key being loaded.
        key: KeyName,
        /// How long it was given.
        after: Duration,
    },
    /// A cache error that cannot be worked around: an invalid TTL, a loaded value that does
    /// not encode.
    Cache(CacheError),
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Loader { key, source } => write!(f, "loading key {key} failed: {source}"),
            LoadError::Timeout { key, after } => {
                write!(f, "loading key {key} did not finish within {after:?}")
            }
            LoadError::Cache(error) => fmt::Display::fmt(error, f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Loader { source, .. } => Some(&**source),
            LoadError::Timeout { .. } => None,
            LoadError::Cache(error) => Some(error),
        }
    }
}

impl<E> From<CacheError> for LoadError<E> {
    fn from(error: CacheError) -> Self {
        LoadError::Cache(error)
    }
}

/// How long a freshly loaded value is cached (crate-internal: the token cache derives it
/// from each token's expiry).
#[cfg_attr(not(feature = "tenancy"), allow(dead_code))]
pub(crate) enum LoadTtl {
    /// The options' TTL.
    Options,
    /// This many seconds (at least 1).
    Secs(u64),
    /// Return the value without caching it.
    DontStore,
}

/// Tells a load of `key` running now on `cache` (in this process) that the key was just
/// invalidated: the value it loads may predate the change, so it is returned to the callers
/// waiting for it but not cached. [`OrgResolver::invalidate_org`](crate::OrgResolver::invalidate_org)
/// and [`TokenCache::invalidate`](crate::TokenCache::invalidate) call it; an app that
/// invalidates keys it loads with `get_or_load` calls it before `invalidate`.
///
/// Without it, a load that read the store just before an update could write the old value
/// back right after the invalidation, where it would stay for its TTL. Loads on other
/// instances are not reached (their TTL bounds that case).
///
/// ```
/// use cachet::{CacheService, MokaCacheService, load};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = MokaCacheService::default();
/// // after the org changed in the database:
/// load::invalidate_in_flight(&cache, "org:acme");
/// cache.invalidate("org:acme").await?;
/// # Ok(()) }
/// ```
pub fn invalidate_in_flight<S: CacheService + ?Sized>(cache: &S, key: &str) {
    flight::invalidate(cache.flight_scope(), key);
}

/// How many loads are running now in this process, over every service: zero once every
/// `get_or_load` has returned or been dropped (the table never keeps finished loads).
///
/// ```
/// assert_eq!(cachet::load::loads_in_flight(), 0);
/// ```
pub fn loads_in_flight() -> usize {
    flight::in_flight()
}

/// What a cache read means for a load.
enum Read<T> {
    /// Fresh: the value (`None`: a cached "not found"), its JSON payload, and whether it is
    /// a stale value fail-safe keeps serving for a throttle time.
    Hit(Option<T>, Option<Bytes>, bool),
    /// Not usable: load. `stale` is a fail-safe candidate.
    Miss { stale: Option<Frame> },
}

fn classify<T: DeserializeOwned>(
    key: &str,
    read: Result<Option<Bytes>, CacheError>,
    options: &LoadOptions,
    cache_error: &mut Option<CacheError>,
) -> Read<T> {
    let stored = match read {
        Ok(Some(stored)) => stored,
        Ok(None) => return Read::Miss { stale: None },
        Err(error) => {
            *cache_error = Some(error);
            return Read::Miss { stale: None };
        }
    };
    if !Frame::is_framed(&stored) {
        return match codec::decode(key, &stored) {
            Ok(value) => Read::Hit(Some(value), Some(stored), false),
            Err(error) => {
                *cache_error = Some(error);
                Read::Miss { stale: None }
            }
        };
    }
    let frame = match Frame::decode(key, &stored) {
        Ok(frame) => frame,
        Err(error) => {
            *cache_error = Some(error);
            return Read::Miss { stale: None };
        }
    };
    let now = now_ms();
    if !frame.is_fresh(now) {
        let usable = options.fail_safe.is_some() && !frame.absent && now < frame.stale_until_ms;
        return Read::Miss {
            stale: usable.then_some(frame),
        };
    }
    if frame.absent {
        // A caller that does not cache "not found" does not trust another caller's marker.
        return if options.negative_ttl_secs.is_some() {
            Read::Hit(None, None, false)
        } else {
            Read::Miss { stale: None }
        };
    }
    match codec::decode(key, &frame.payload) {
        Ok(value) => Read::Hit(Some(value), Some(frame.payload), frame.stale),
        Err(error) => {
            *cache_error = Some(error);
            Read::Miss { stale: None }
        }
    }
}

/// A fresh hit in a read already made (the in-memory fast path), without touching the
/// flight table; `None` for anything else (a miss, a stale value, an error, no read).
pub(crate) fn fresh_hit<T: DeserializeOwned>(
    key: &str,
    options: &LoadOptions,
    first_read: &Option<Result<Option<Bytes>, CacheError>>,
) -> Option<Loaded<T>> {
    let Some(Ok(Some(stored))) = first_read else {
        return None;
    };
    let mut ignored = None;
    match classify::<T>(key, Ok(Some(stored.clone())), options, &mut ignored) {
        Read::Hit(value, _, stale) => Some(Loaded {
            value,
            source: cached_source(stale),
            cache_error: None,
            written: None,
        }),
        Read::Miss { .. } => None,
    }
}

fn cached_source(stale: bool) -> LoadSource {
    if stale {
        LoadSource::Stale
    } else {
        LoadSource::Cache
    }
}

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The whole of `get_or_load_with`: read, join or lead the single flight, load, store.
/// `first_read` is a read already made (the in-memory fast path), if any.
pub(crate) async fn load<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    first_read: Option<Result<Option<Bytes>, CacheError>>,
    loader: F,
) -> Result<Loaded<T>, LoadError<E>>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    options.check(key)?;

    let mut cache_error = None;
    let read = match first_read {
        Some(read) => read,
        None => cache.get_bytes(key).await,
    };
    let stale = match classify::<T>(key, read, options, &mut cache_error) {
        Read::Hit(value, _, stale) => {
            return Ok(Loaded {
                value,
                source: cached_source(stale),
                cache_error,
                written: None,
            });
        }
        Read::Miss { stale } => stale,
    };

    let leader = loop {
        let receiver = match flight::join(cache.flight_scope(), key) {
            Role::Leader(leader) => break leader,
            Role::Waiter(receiver) => receiver,
        };
        let outcome = tokio::time::timeout(options.load_timeout, flight::wait(receiver)).await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(LoadError::Timeout {
                    key: KeyName::new(key),
                    after: options.load_timeout,
                });
            }
        };
        match outcome {
            Outcome::Value { payload, stale } => {
                let value = match payload {
                    Some(payload) => Some(codec::decode::<T>(key, &payload)?),
                    None => None,
                };
                let source = if stale {
                    LoadSource::Stale
                } else {
                    LoadSource::Joined
                };
                return Ok(Loaded {
                    value,
                    source,
                    cache_error,
                    written: None,
                });
            }
            Outcome::Failed(error) => match error.downcast::<E>() {
                Ok(source) => {
                    return Err(LoadError::Loader {
                        key: KeyName::new(key),
                        source,
                    });
                }
                // A concurrent load of the same key with another error type: load anew.
                Err(_) => continue,
            },
            Outcome::TimedOut(after) => {
                return Err(LoadError::Timeout {
                    key: KeyName::new(key),
                    after,
                });
            }
            Outcome::Unusable(message) => {
                return Err(LoadError::Cache(CacheError::serialization::<T>(
                    key,
                    "encode",
                    message.to_string(),
                )));
            }
            Outcome::Abandoned => continue,
        }
    };

    leader::lead(
        cache,
        key,
        options,
        leader::Lead {
            leader,
            stale,
            cache_error,
        },
        loader,
    )
    .await
}
