//! [`LoadOptions`]: how a cache-aside load caches (TTLs, negative caching, fail-safe,
//! timeout), and their defaults.

use std::sync::Arc;
use std::time::Duration;

use crate::CacheError;
use crate::lock::ConcurrencyService;
use crate::service::resolve_ttl;

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
    pub(super) ttl_secs: Option<u64>,
    pub(super) negative_ttl_secs: Option<u64>,
    pub(super) fail_safe: Option<Duration>,
    pub(super) fail_safe_throttle: Duration,
    pub(super) load_timeout: Duration,
    pub(super) locks: Option<Arc<dyn ConcurrencyService>>,
    pub(super) eager_refresh: Option<f64>,
    pub(super) soft_timeout: Option<Duration>,
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
            eager_refresh: None,
            soft_timeout: None,
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
    /// [`LoadSource::Stale`](super::LoadSource::Stale)) when a reload fails or times out within that time.
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

    /// The longest a loader may run, and a waiter wait for it (default 30 s): the hard
    /// timeout, which ends every wait for a load.
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// Eager refresh: a hit on a value past `fraction` of its TTL (`0 < fraction < 1`,
    /// e.g. `0.8`) is answered at once with the cached value, and starts one reload of it,
    /// so that a hot key is reloaded before it expires and no request waits for its
    /// loader. At most one reload per key runs at a time in the whole fleet: the first
    /// caller claims it in the stored value itself (a compare-and-set,
    /// [`CacheService::replace_if`](crate::CacheService::replace_if)), and its result
    /// replaces the value only if the key was not written or invalidated meanwhile. A
    /// claimed reload that fails or dies leaves the value in place; its claim ends after the
    /// load timeout, and the value expires at its TTL as usual (fail-safe applies then).
    ///
    /// Where the reload runs: with
    /// [`get_or_load_detached`](crate::CacheServiceExt::get_or_load_detached) (an owned
    /// loader) it is a task of its own and the caller never waits. The other cache-aside
    /// methods take a loader that may borrow from the caller, so the one caller that
    /// claims the reload runs it before it returns (every other caller, on every instance,
    /// is answered from the cache meanwhile). Needs an explicit TTL
    /// ([`ttl_secs`](Self::ttl_secs)).
    ///
    /// ```
    /// use cachet::LoadOptions;
    ///
    /// let options = LoadOptions::default().ttl_secs(60).eager_refresh(0.8); // reload after 48 s
    /// assert_eq!(options.eager_refresh_fraction(), Some(0.8));
    /// assert!(options.check("k").is_ok());
    /// assert!(LoadOptions::default().ttl_secs(60).eager_refresh(1.0).check("k").is_err());
    /// ```
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(fraction);
        self
    }

    /// The soft timeout: with a stale value at hand (fail-safe), a loader still running
    /// after `timeout` no longer makes callers wait: they are answered with the stale
    /// value ([`LoadSource::Stale`](super::LoadSource::Stale)), and the load goes on up to
    /// the hard timeout ([`load_timeout`](Self::load_timeout)), its value stored when it
    /// ends. Without a stale value, callers wait up to the hard timeout. Default: none
    /// (every caller waits up to the hard timeout).
    ///
    /// With [`get_or_load_detached`](crate::CacheServiceExt::get_or_load_detached) the
    /// load runs as a task of its own and every caller gets the stale value at the soft
    /// timeout; the other cache-aside methods run the loader in the caller that leads the
    /// load (it may borrow from that caller), so that one caller waits for it, up to the
    /// hard timeout, while the callers that joined it get the stale value.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachet::LoadOptions;
    ///
    /// let options = LoadOptions::default()
    ///     .ttl_secs(60)
    ///     .fail_safe(Duration::from_secs(3600))
    ///     .soft_timeout(Duration::from_millis(100)) // stale after 100 ms
    ///     .load_timeout(Duration::from_secs(5)); // the loader itself gets 5 s
    /// assert_eq!(options.soft(), Some(Duration::from_millis(100)));
    /// ```
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Single flight across instances under a lock, for a cache service *without* leases
    /// (a custom [`CacheService`](crate::CacheService) that keeps the default
    /// [`CacheService::lease`](crate::CacheService::lease)): before loading, the leader takes
    /// `cachet:load:<key>` in `locks` (shared by the instances) and reads the cache again
    /// once it holds it. If the lock cannot be had, it loads anyway.
    ///
    /// Every cache of this crate has leases ([`lease`](super::lease)): a miss leases the key in the store
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
        if let Some(fraction) = self.eager_refresh {
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(CacheError::invalid_argument(
                    key,
                    format!("eager_refresh takes a fraction of the TTL in (0, 1), got {fraction}"),
                ));
            }
            if self.ttl_secs.is_none() {
                return Err(CacheError::invalid_argument(
                    key,
                    "eager refresh needs an explicit TTL (LoadOptions::ttl_secs)",
                ));
            }
        }
        if self.soft_timeout.is_some_and(|soft| soft.is_zero()) {
            return Err(CacheError::invalid_argument(
                key,
                "soft_timeout must be longer than zero",
            ));
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

    /// The load timeout (the hard one).
    pub fn timeout(&self) -> Duration {
        self.load_timeout
    }

    /// The eager refresh fraction, when on.
    pub fn eager_refresh_fraction(&self) -> Option<f64> {
        self.eager_refresh
    }

    /// The soft timeout, when set.
    pub fn soft(&self) -> Option<Duration> {
        self.soft_timeout
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
