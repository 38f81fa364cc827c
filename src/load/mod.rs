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

// `aside`: the entry points of `CacheServiceExt`; `read`: what a read means; `flight`: the
// in-process single flight; `leader` and its `guard`: the one caller that loads.
pub(crate) mod aside;
pub(crate) mod batch;
mod error;
mod flight;
mod guard;
mod leader;
mod loaded;
mod options;
mod read;
pub(crate) mod refresh;
pub use self::refresh::{refresh_in_flight, refreshes_in_flight};

use std::future::Future;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::error::LoadError;
use self::flight::{Outcome, Role};
pub use self::loaded::{LoadSource, Loaded};
pub(crate) use self::options::LoadTtl;
pub use self::options::{DEFAULT_FAIL_SAFE_THROTTLE, DEFAULT_LOAD_TIMEOUT, LoadOptions};
use self::read::{Read, cached_source, classify};
// The stored frame lives with the codec and the lease types with the contract; these are
// their first-release paths (`cachet::load::Frame`, `cachet::load::lease::…`).
pub use crate::codec::frame::{self, Frame, decode_stored, now_ms};
pub use crate::service::lease::{
    self, DEFAULT_LEASE_TTL, LEASE_RENEW_EVERY, Lease, LeaseRead, LeaseRequest, LeaseToken,
    StoredVersion,
};
use crate::{CacheError, CacheService, KeyName, codec};

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

/// What [`load`] ends with: the caller's result, and the loader back when it was not called
/// and the value's eager refresh is due (the caller runs [`refresh::run`] with it, inline
/// or as a task of its own).
pub(crate) type Ended<T, E, F> = (Result<Loaded<T>, LoadError<E>>, Option<F>);

/// The whole of `get_or_load_with`: read, join or lead the single flight, load, store.
/// `first_read` is a read already made (the in-memory fast path), if any.
pub(crate) async fn load<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    first_read: Option<Result<Option<Bytes>, CacheError>>,
    loader: F,
) -> Ended<T, E, F>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    #[cfg(feature = "metrics")]
    {
        let started = std::time::Instant::now();
        let ended = load_unobserved(cache, key, options, first_read, loader).await;
        if let Some(outcome) = load_outcome(&ended.0) {
            crate::observe::load_finished(outcome, started.elapsed());
        }
        ended
    }
    #[cfg(not(feature = "metrics"))]
    load_unobserved(cache, key, options, first_read, loader).await
}

/// What `cachet_loads_total` counts a finished slow path as; `None` for a hit found on it
/// (no load ran or was joined).
#[cfg(feature = "metrics")]
fn load_outcome<T, E>(
    result: &Result<Loaded<T>, LoadError<E>>,
) -> Option<crate::observe::LoadOutcome> {
    use crate::observe::LoadOutcome;
    Some(match result {
        Ok(loaded) => match loaded.source {
            LoadSource::Cache => return None,
            LoadSource::Loader if loaded.value.is_none() => LoadOutcome::Negative,
            LoadSource::Loader => LoadOutcome::Loaded,
            LoadSource::Joined => LoadOutcome::Joined,
            LoadSource::Stale => LoadOutcome::Stale,
        },
        Err(LoadError::Timeout { .. }) => LoadOutcome::Timeout,
        Err(_) => LoadOutcome::Error,
    })
}

async fn load_unobserved<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    first_read: Option<Result<Option<Bytes>, CacheError>>,
    loader: F,
) -> Ended<T, E, F>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    if let Err(error) = options.check(key) {
        return (Err(error.into()), None);
    }

    let mut cache_error = None;
    let read = match first_read {
        Some(read) => read,
        None => cache.get_bytes(key).await,
    };
    let stale = match classify::<T>(cache.codec(), key, read, options, &mut cache_error) {
        Read::Hit(value, _, stale, refresh) => {
            let loaded = Loaded {
                value,
                source: cached_source(stale),
                cache_error,
                written: None,
            };
            return (Ok(loaded), refresh.then_some(loader));
        }
        Read::Miss { stale } => stale,
    };
    (
        miss(cache, key, options, stale, cache_error, loader, None).await,
        None,
    )
}

/// Told `true` when a load starts waiting for another one (another caller's in this
/// process, or another instance's lease) and `false` when it stops: a batch
/// ([`batch`]) must not wait for keys that wait for someone else before calling its loader.
type WaitHook<'a> = Option<&'a (dyn Fn(bool) + Send + Sync)>;

/// The miss path of [`load_unobserved`]: join or lead the single flight.
async fn miss<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    mut stale: Option<Frame>,
    mut cache_error: Option<CacheError>,
    loader: F,
    hook: WaitHook<'_>,
) -> Result<Loaded<T>, LoadError<E>>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    let leader = loop {
        let receiver = match flight::join(cache.flight_scope(), key, stale.as_ref()) {
            Role::Leader(leader) => break leader,
            Role::Waiter(receiver, leaders) => {
                stale = stale.or(leaders);
                receiver
            }
        };
        if let Some(hook) = hook {
            hook(true);
        }
        let wait = flight::wait(receiver);
        tokio::pin!(wait);
        // The soft timeout: with a stale value at hand, wait that long only. A load that
        // ends inside it is the outcome (the wait is done: it must not be polled again).
        let mut outcome = None;
        if let Some(soft) = options
            .soft_timeout
            .filter(|soft| *soft < options.load_timeout)
        {
            if let Some(frame) = &stale {
                match tokio::time::timeout(soft, &mut wait).await {
                    Ok(ended) => outcome = Some(ended),
                    Err(_) => {
                        if let Some(loaded) =
                            serve_stale(cache.codec(), key, frame, &mut cache_error)
                        {
                            return Ok(loaded);
                        }
                    }
                }
            }
        }
        let outcome = match outcome {
            Some(ended) => Ok(ended),
            None => tokio::time::timeout(options.load_timeout, &mut wait).await,
        };
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
                    Some(payload) => Some(codec::decode_with::<T>(cache.codec(), key, &payload)?),
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
                Err(_) => {
                    if let Some(hook) = hook {
                        hook(false);
                    }
                    continue;
                }
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
            Outcome::Abandoned => {
                if let Some(hook) = hook {
                    hook(false);
                }
                continue;
            }
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
        hook,
    )
    .await
}

/// A fail-safe value served at the soft timeout (the load goes on): `None` when it is past
/// its grace period or does not decode.
pub(super) fn serve_stale<T: DeserializeOwned>(
    codec: &dyn codec::Codec,
    key: &str,
    frame: &Frame,
    cache_error: &mut Option<CacheError>,
) -> Option<Loaded<T>> {
    if now_ms() >= frame.stale_until_ms {
        return None;
    }
    let value = codec::decode_with::<T>(codec, key, &frame.payload).ok()?;
    Some(Loaded {
        value: Some(value),
        source: LoadSource::Stale,
        cache_error: cache_error.take(),
        written: None,
    })
}
