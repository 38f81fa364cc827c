//! The leader of a load (the one caller per key and process that runs the loader): it takes
//! the key's lease where the truth lives, waits for another instance's load when that one
//! holds the lease, loads, and writes back only under its lease. Every exit goes through
//! [`WriteBack`], which stores, or releases the lease, exactly once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::flight::{Leader, Outcome};
use super::lease::{
    DEFAULT_LEASE_TTL, LEASE_RENEW_EVERY, Lease, LeaseRead, LeaseRequest, LeaseToken, StoredVersion,
};
use super::{
    Frame, LoadError, LoadOptions, LoadSource, LoadTtl, Loaded, Read, cached_source, classify,
    now_ms, secs_ceil,
};
use crate::lock::{LockGuard, LockOptions};
use crate::{CacheError, CacheService, KeyName, codec};

/// Longest pause between two polls of another instance's lease.
const MAX_POLL: Duration = Duration::from_millis(100);

/// How a load may write back.
enum WriteBack {
    /// Under this lease (it is voided by any change of the key meanwhile).
    Leased(Lease),
    /// A service without leases: `set_bytes`, unless this process saw the key invalidated
    /// (the in-process check of [`invalidate_in_flight`](super::invalidate_in_flight)).
    Plain,
    /// Not at all: the lease could not be had (the cache is down), so nothing may be
    /// written that could overtake a change made meanwhile.
    Skip,
}

/// What became of a write-back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// It is in the cache.
    Yes,
    /// The key was changed or invalidated while the loader ran: what it loaded may predate
    /// the change. Its own caller still gets it; the callers that joined are sent to read
    /// (and load) again, since they may have arrived after the change.
    Overtaken,
    /// Not written (nothing may be, or the cache failed).
    No,
}

impl WriteBack {
    /// Stores `value`.
    async fn store<S: CacheService + ?Sized>(
        &mut self,
        cache: &S,
        key: &str,
        leader: &Leader,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Stored, CacheError> {
        match self {
            WriteBack::Leased(lease) => {
                let stored = cache.set_leased(key, lease, value, ttl_secs).await;
                if stored.is_ok() {
                    lease.disarm();
                }
                Ok(if stored? {
                    Stored::Yes
                } else {
                    Stored::Overtaken
                })
            }
            WriteBack::Plain if !leader.invalidated() => {
                cache.set_bytes(key, value, ttl_secs).await?;
                // An invalidation landing between the check and the write: undo it.
                if leader.invalidated() {
                    let _ = cache.invalidate(key).await;
                    return Ok(Stored::Overtaken);
                }
                Ok(Stored::Yes)
            }
            WriteBack::Plain => Ok(Stored::Overtaken),
            WriteBack::Skip => Ok(Stored::No),
        }
    }

    /// Nothing will be stored: release the lease now, so that waiters load at once.
    async fn abandon<S: CacheService + ?Sized>(&mut self, cache: &S, key: &str) {
        if let WriteBack::Leased(lease) = self {
            if cache.release_lease(key, lease).await.is_ok() {
                lease.disarm();
            }
        }
    }
}

/// Runs `loader` while renewing `lease`'s hold on `key` every [`LEASE_RENEW_EVERY`].
async fn renewing<S, Fut>(cache: &S, key: &str, write_back: &WriteBack, loader: Fut) -> Fut::Output
where
    S: CacheService + ?Sized,
    Fut: Future,
{
    let WriteBack::Leased(lease) = write_back else {
        return loader.await;
    };
    let renewal = LeaseRequest {
        token: lease.token().clone(),
        ttl: DEFAULT_LEASE_TTL,
        replace: None,
        renew: true,
    };
    let mut loader = std::pin::pin!(loader);
    let mut tick = tokio::time::interval_at(Instant::now() + LEASE_RENEW_EVERY, LEASE_RENEW_EVERY);
    loop {
        tokio::select! {
            output = &mut loader => return output,
            _ = tick.tick() => {
                // A lost lease is not an error here: the write-back will find it gone.
                if let Ok(LeaseRead::Granted(mut handle)) = cache.lease(key, &renewal).await {
                    handle.disarm(); // the first handle is the one that releases
                }
            }
        }
    }
}

/// What [`lead`] was handed by the caller: the leader's slot, a fail-safe candidate and a
/// cache error worked around so far.
pub(super) struct Lead {
    pub(super) leader: Leader,
    pub(super) stale: Option<Frame>,
    pub(super) cache_error: Option<CacheError>,
}

/// The leader's whole part: lease, wait or load, write back, tell the waiters.
pub(super) async fn lead<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    lead: Lead,
    loader: F,
) -> Result<Loaded<T>, LoadError<E>>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    let Lead {
        leader,
        mut stale,
        mut cache_error,
    } = lead;
    let started = Instant::now();
    let deadline = started + options.load_timeout;

    // The lease also reads the key once more: a load that finished between the first read
    // and taking the lead (here or on another instance) is not repeated.
    let token = LeaseToken::random();
    let mut replace: Option<StoredVersion> = None;
    let mut joined = false;
    let mut poll = Duration::from_millis(2);
    let mut write_back = loop {
        let request = LeaseRequest {
            token: token.clone(),
            ttl: DEFAULT_LEASE_TTL,
            replace: replace.take(),
            renew: false,
        };
        match cache.lease(key, &request).await {
            Ok(LeaseRead::Value { value, version }) => {
                let mut read_error = None;
                match classify::<T>(key, Ok(Some(value)), options, &mut read_error) {
                    Read::Hit(value, payload, was_stale) => {
                        leader.finish(Outcome::Value {
                            payload,
                            stale: was_stale,
                        });
                        let source = match (was_stale, joined) {
                            (false, true) => LoadSource::Joined,
                            (was_stale, _) => cached_source(was_stale),
                        };
                        return Ok(Loaded {
                            value,
                            source,
                            cache_error: read_error.or(cache_error),
                            written: None,
                        });
                    }
                    // Stale, undecodable, or a "not found" this caller does not trust:
                    // replace exactly that value with our lease.
                    Read::Miss { stale: again } => {
                        stale = again.or(stale);
                        cache_error = read_error.or(cache_error);
                        replace = Some(version);
                    }
                }
            }
            Ok(LeaseRead::Unreadable { error, version }) => {
                cache_error = Some(error);
                replace = Some(version);
            }
            Ok(LeaseRead::Granted(lease)) => break WriteBack::Leased(lease),
            Ok(LeaseRead::Held { remaining }) => {
                // Another instance is loading this key: wait for its value.
                joined = true;
                let now = Instant::now();
                if now >= deadline {
                    leader.finish(Outcome::TimedOut(options.load_timeout));
                    return Err(LoadError::Timeout {
                        key: KeyName::new(key),
                        after: options.load_timeout,
                    });
                }
                let pause = poll
                    .min(remaining.max(Duration::from_millis(1)))
                    .min(deadline - now);
                tokio::time::sleep(pause).await;
                poll = (poll * 2).min(MAX_POLL);
            }
            Ok(LeaseRead::Unsupported) => break WriteBack::Plain,
            // Not for a first request; treated as "ask again".
            Ok(LeaseRead::Lost) => {}
            Err(error) => {
                cache_error = Some(error);
                break WriteBack::Skip;
            }
        }
        if Instant::now() >= deadline {
            leader.finish(Outcome::TimedOut(options.load_timeout));
            return Err(LoadError::Timeout {
                key: KeyName::new(key),
                after: options.load_timeout,
            });
        }
    };

    // A service without leases: read once more, and hold the cross-instance lock if the
    // options name one (the single flight leases give everyone else).
    let mut lock: Option<LockGuard> = None;
    if matches!(write_back, WriteBack::Plain) {
        let mut recheck_error = None;
        match classify::<T>(key, cache.get_bytes(key).await, options, &mut recheck_error) {
            Read::Hit(value, payload, was_stale) => {
                leader.finish(Outcome::Value {
                    payload,
                    stale: was_stale,
                });
                return Ok(Loaded {
                    value,
                    source: cached_source(was_stale),
                    cache_error: recheck_error.or(cache_error),
                    written: None,
                });
            }
            Read::Miss { stale: again } => {
                stale = again.or(stale);
                cache_error = recheck_error.or(cache_error);
            }
        }
        if let Some(locks) = &options.locks {
            let lock_options = LockOptions::default()
                .wait_timeout(options.load_timeout)
                .lease(options.load_timeout.max(Duration::from_secs(1)));
            if let Ok(guard) = locks
                .acquire(&format!("cachet:load:{key}"), &lock_options)
                .await
            {
                let mut under_lock_error = None;
                if let Read::Hit(value, payload, was_stale) = classify::<T>(
                    key,
                    cache.get_bytes(key).await,
                    options,
                    &mut under_lock_error,
                ) {
                    let _ = guard.release().await;
                    leader.finish(Outcome::Value {
                        payload,
                        stale: was_stale,
                    });
                    return Ok(Loaded {
                        value,
                        source: cached_source(was_stale),
                        cache_error: under_lock_error.or(cache_error),
                        written: None,
                    });
                }
                lock = Some(guard);
            }
        }
    }

    let remaining = deadline.saturating_duration_since(Instant::now());
    let loaded = renewing(
        cache,
        key,
        &write_back,
        tokio::time::timeout(remaining, loader()),
    )
    .await;
    let result = finish_load(
        cache,
        key,
        options,
        &leader,
        &mut write_back,
        stale,
        cache_error,
        loaded,
    )
    .await;
    if let Some(guard) = lock {
        // Not answered: the lock's own lease frees it.
        let _ = guard.release().await;
    }
    let (result, outcome) = result;
    leader.finish(outcome);
    result
}

type LoaderResult<T, E> = Result<Result<Option<(T, LoadTtl)>, E>, tokio::time::error::Elapsed>;

/// After the loader: write back (or not), and say what the waiters get.
#[allow(clippy::too_many_arguments)]
async fn finish_load<S, T, E>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    leader: &Leader,
    write_back: &mut WriteBack,
    stale: Option<Frame>,
    mut cache_error: Option<CacheError>,
    loaded: LoaderResult<T, E>,
) -> (Result<Loaded<T>, LoadError<E>>, Outcome)
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
{
    // From here on, callers that arrive read for themselves (see `Leader::close`).
    leader.close();
    let failure = match loaded {
        Ok(Ok(Some((value, ttl)))) => {
            let payload = match codec::encode(key, &value) {
                Ok(payload) => payload,
                Err(error) => {
                    write_back.abandon(cache, key).await;
                    let outcome = Outcome::Unusable(Arc::from(error.to_string()));
                    return (Err(LoadError::Cache(error)), outcome);
                }
            };
            let mut overtaken = false;
            let written = match stored_form(options, ttl, &payload) {
                None => {
                    write_back.abandon(cache, key).await;
                    None
                }
                Some((stored, physical)) => {
                    match write_back
                        .store(cache, key, leader, stored.clone(), physical)
                        .await
                    {
                        Ok(Stored::Yes) => Some((stored, physical)),
                        Ok(Stored::Overtaken) => {
                            overtaken = true;
                            None
                        }
                        Ok(Stored::No) => None,
                        Err(error) => {
                            cache_error = Some(error);
                            None
                        }
                    }
                }
            };
            let outcome = if overtaken {
                Outcome::Abandoned
            } else {
                Outcome::Value {
                    payload: Some(payload),
                    stale: false,
                }
            };
            let loaded = Loaded {
                value: Some(value),
                source: LoadSource::Loader,
                cache_error,
                written,
            };
            return (Ok(loaded), outcome);
        }
        Ok(Ok(None)) => {
            let mut written = None;
            let mut overtaken = false;
            match options.negative_ttl_secs {
                Some(secs) => {
                    let marker = Frame::absent(now_ms().saturating_add(secs.saturating_mul(1000)));
                    let stored = marker.encode();
                    match write_back
                        .store(cache, key, leader, stored.clone(), Some(secs))
                        .await
                    {
                        Ok(Stored::Yes) => written = Some((stored, Some(secs))),
                        Ok(Stored::Overtaken) => overtaken = true,
                        Ok(Stored::No) => {}
                        Err(error) => cache_error = Some(error),
                    }
                }
                None => write_back.abandon(cache, key).await,
            }
            let outcome = if overtaken {
                Outcome::Abandoned
            } else {
                Outcome::Value {
                    payload: None,
                    stale: false,
                }
            };
            let loaded = Loaded {
                value: None,
                source: LoadSource::Loader,
                cache_error,
                written,
            };
            return (Ok(loaded), outcome);
        }
        Ok(Err(error)) => Err(Arc::new(error)),
        Err(_) => Ok(options.load_timeout),
    };

    // The loader failed or timed out: fail-safe serves the last known value, if any, and
    // keeps serving it for a throttle time (written under the lease, like any write-back).
    if let Some(frame) = stale {
        let now = now_ms();
        if now < frame.stale_until_ms {
            if let Ok(value) = codec::decode::<T>(key, &frame.payload) {
                let throttle_ms =
                    u64::try_from(options.fail_safe_throttle.as_millis()).unwrap_or(u64::MAX);
                let mut throttled = Frame::value(
                    frame.payload.clone(),
                    now.saturating_add(throttle_ms).min(frame.stale_until_ms),
                    frame.stale_until_ms,
                );
                throttled.stale = true;
                let ttl = secs_ceil(frame.stale_until_ms - now);
                if let Err(error) = write_back
                    .store(cache, key, leader, throttled.encode(), Some(ttl))
                    .await
                {
                    cache_error = Some(error);
                }
                let outcome = Outcome::Value {
                    payload: Some(frame.payload),
                    stale: true,
                };
                let loaded = Loaded {
                    value: Some(value),
                    source: LoadSource::Stale,
                    cache_error,
                    written: None,
                };
                return (Ok(loaded), outcome);
            }
        }
    }
    write_back.abandon(cache, key).await;
    match failure {
        Err(source) => {
            let outcome = Outcome::Failed(source.clone());
            let error = LoadError::Loader {
                key: KeyName::new(key),
                source,
            };
            (Err(error), outcome)
        }
        Ok(after) => (
            Err(LoadError::Timeout {
                key: KeyName::new(key),
                after,
            }),
            Outcome::TimedOut(after),
        ),
    }
}

/// The stored form of a loaded value (plain, or framed for fail-safe) and its TTL in
/// seconds; `None` when it is not to be stored.
fn stored_form(
    options: &LoadOptions,
    ttl: LoadTtl,
    payload: &Bytes,
) -> Option<(Bytes, Option<u64>)> {
    let ttl_secs = match ttl {
        LoadTtl::DontStore => return None,
        LoadTtl::Secs(secs) => Some(secs),
        LoadTtl::Options => options.ttl_secs,
    };
    Some(match (options.fail_safe, ttl_secs) {
        (Some(grace), Some(ttl)) => {
            let fresh_until = now_ms().saturating_add(ttl.saturating_mul(1000));
            let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
            let stale_until = fresh_until.saturating_add(grace_ms);
            let physical = ttl.saturating_add(secs_ceil(grace_ms));
            let frame = Frame::value(payload.clone(), fresh_until, stale_until);
            (frame.encode(), Some(physical))
        }
        _ => (payload.clone(), ttl_secs),
    })
}
