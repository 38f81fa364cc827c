//! The leader of a load (the one caller per key and process that runs the loader): it takes
//! the key's lease where the truth lives, waits for another instance's load when that one
//! holds the lease, loads, and writes back only under its lease. Everything it holds lives
//! in a [`LeaderGuard`]: every exit of the path below hands its outcome to one
//! [`LeaderGuard::finish`], and a cancelled one drops the guard, which lets go of all.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::flight::{Leader, Outcome};
use super::guard::{LeaderGuard, Stored, WriteBack};
use super::lease::{DEFAULT_LEASE_TTL, LeaseRead, LeaseRequest, LeaseToken, StoredVersion};
use super::read::{Read, cached_source, classify};
use super::{Frame, LoadError, LoadOptions, LoadSource, LoadTtl, Loaded, now_ms};
use crate::lock::LockOptions;
use crate::{CacheError, CacheService, KeyName, codec};

/// Longest pause between two polls of another instance's lease.
const MAX_POLL: Duration = Duration::from_millis(100);

/// What [`lead`] was handed by the caller: the leader's slot, a fail-safe candidate and a
/// cache error worked around so far.
pub(super) struct Lead {
    pub(super) leader: Leader,
    pub(super) stale: Option<Frame>,
    pub(super) cache_error: Option<CacheError>,
}

/// What the lead path ends with: the caller's result, and what the waiters are told.
type Ended<T, E> = (Result<Loaded<T>, LoadError<E>>, Outcome);

/// The leader's whole part: lease, wait or load, write back, tell the waiters.
pub(super) async fn lead<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    lead: Lead,
    loader: F,
    hook: super::WaitHook<'_>,
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
        stale,
        cache_error,
    } = lead;
    let mut guard = LeaderGuard::new(leader);
    let (result, outcome) = run(
        cache,
        key,
        options,
        &mut guard,
        (stale, cache_error),
        loader,
        hook,
    )
    .await;
    guard.finish(cache, key, outcome).await;
    result
}

/// A hit found by the leader: its caller's result and its waiters' outcome.
fn hit<T, E>(
    value: Option<T>,
    payload: Option<Bytes>,
    source: LoadSource,
    cache_error: Option<CacheError>,
) -> Ended<T, E> {
    let was_stale = source == LoadSource::Stale;
    let loaded = Loaded {
        value,
        source,
        cache_error,
        written: None,
    };
    let outcome = Outcome::Value {
        payload,
        stale: was_stale,
    };
    (Ok(loaded), outcome)
}

/// The load timed out before the loader ran (another instance's load outlasted it).
fn timed_out<T, E>(key: &str, options: &LoadOptions) -> Ended<T, E> {
    let error = LoadError::Timeout {
        key: KeyName::new(key),
        after: options.load_timeout,
    };
    (Err(error), Outcome::TimedOut(options.load_timeout))
}

/// The lead path up to its outcome; `guard` takes what it holds on the way.
async fn run<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    guard: &mut LeaderGuard,
    (mut stale, mut cache_error): (Option<Frame>, Option<CacheError>),
    loader: F,
    hook: super::WaitHook<'_>,
) -> Ended<T, E>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    let started = Instant::now();
    let deadline = started + options.load_timeout;

    // The lease also reads the key once more: a load that finished between the first read
    // and taking the lead (here or on another instance) is not repeated.
    let token = LeaseToken::random();
    let mut replace: Option<StoredVersion> = None;
    let mut joined = false;
    let mut poll = Duration::from_millis(2);
    // Whether `hook` was told this load waits for another instance's.
    let mut waiting = false;
    let write_back = loop {
        let request = LeaseRequest {
            token: token.clone(),
            ttl: DEFAULT_LEASE_TTL,
            replace: replace.take(),
            renew: false,
        };
        let read = cache.lease(key, &request).await;
        let held = matches!(read, Ok(LeaseRead::Held { .. }));
        if let Some(hook) = hook.filter(|_| held != waiting) {
            waiting = held;
            hook(held);
        }
        match read {
            Ok(LeaseRead::Value { value, version }) => {
                let mut read_error = None;
                match classify::<T>(
                    cache.codec(),
                    key,
                    Ok(Some(value)),
                    options,
                    &mut read_error,
                ) {
                    Read::Hit(value, payload, was_stale, _) => {
                        let source = match (was_stale, joined) {
                            (false, true) => LoadSource::Joined,
                            (was_stale, _) => cached_source(was_stale),
                        };
                        return hit(value, payload, source, read_error.or(cache_error));
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
                    return timed_out(key, options);
                }
                // Past the soft timeout with a stale value at hand: serve it, and leave the
                // load to the instance that holds the lease.
                if let (Some(soft), Some(frame)) = (options.soft_timeout, &stale) {
                    if now >= started + soft {
                        if let Some(loaded) =
                            super::serve_stale::<T>(cache.codec(), key, frame, &mut cache_error)
                        {
                            let outcome = Outcome::Value {
                                payload: Some(frame.payload.clone()),
                                stale: true,
                            };
                            return (Ok(loaded), outcome);
                        }
                    }
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
            return timed_out(key, options);
        }
    };
    guard.write_back(write_back);

    // A service without leases: read once more, and hold the cross-instance lock if the
    // options name one (the single flight leases give everyone else).
    if guard.is_plain() {
        let mut recheck_error = None;
        match classify::<T>(
            cache.codec(),
            key,
            cache.get_bytes(key).await,
            options,
            &mut recheck_error,
        ) {
            Read::Hit(value, payload, was_stale, _) => {
                let source = cached_source(was_stale);
                return hit(value, payload, source, recheck_error.or(cache_error));
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
            if let Some(hook) = hook {
                hook(true);
            }
            let acquired = locks
                .acquire(&format!("cachet:load:{key}"), &lock_options)
                .await;
            if let Some(hook) = hook {
                hook(false);
            }
            if let Ok(lock) = acquired {
                guard.hold_lock(lock);
                let mut under_lock_error = None;
                if let Read::Hit(value, payload, was_stale, _) = classify::<T>(
                    cache.codec(),
                    key,
                    cache.get_bytes(key).await,
                    options,
                    &mut under_lock_error,
                ) {
                    let source = cached_source(was_stale);
                    return hit(value, payload, source, under_lock_error.or(cache_error));
                }
            }
        }
    }

    let remaining = deadline.saturating_duration_since(Instant::now());
    let loaded = guard
        .renewing(cache, key, tokio::time::timeout(remaining, loader()))
        .await;
    finish_load(cache, key, options, guard, stale, cache_error, loaded).await
}

type LoaderResult<T, E> = Result<Result<Option<(T, LoadTtl)>, E>, tokio::time::error::Elapsed>;

/// After the loader: write back (or not: then the guard's `finish` releases the lease), and
/// say what the waiters get.
async fn finish_load<S, T, E>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    guard: &mut LeaderGuard,
    stale: Option<Frame>,
    mut cache_error: Option<CacheError>,
    loaded: LoaderResult<T, E>,
) -> Ended<T, E>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
{
    // From here on, callers that arrive read for themselves (see `Leader::close`).
    guard.close();
    let failure = match loaded {
        Ok(Ok(Some((value, ttl)))) => {
            let payload = match codec::encode_with(cache.codec(), key, &value) {
                Ok(payload) => payload,
                Err(error) => {
                    let outcome = Outcome::Unusable(Arc::from(error.to_string()));
                    return (Err(LoadError::Cache(error)), outcome);
                }
            };
            let mut overtaken = false;
            let written = match stored_form(options, ttl, &payload) {
                None => None,
                Some((stored, physical)) => {
                    match guard.store(cache, key, stored.clone(), physical).await {
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
            if let Some(secs) = options.negative_ttl_secs {
                let marker = Frame::absent(now_ms().saturating_add(secs.saturating_mul(1000)));
                let stored = marker.encode();
                match guard.store(cache, key, stored.clone(), Some(secs)).await {
                    Ok(Stored::Yes) => written = Some((stored, Some(secs))),
                    Ok(Stored::Overtaken) => overtaken = true,
                    Ok(Stored::No) => {}
                    Err(error) => cache_error = Some(error),
                }
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
            if let Ok(value) = codec::decode_with::<T>(cache.codec(), key, &frame.payload) {
                let throttle_ms =
                    u64::try_from(options.fail_safe_throttle.as_millis()).unwrap_or(u64::MAX);
                let mut throttled = Frame::value(
                    frame.payload.clone(),
                    now.saturating_add(throttle_ms).min(frame.stale_until_ms),
                    frame.stale_until_ms,
                );
                throttled.stale = true;
                let ttl = secs_ceil(frame.stale_until_ms - now);
                if let Err(error) = guard.store(cache, key, throttled.encode(), Some(ttl)).await {
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
    // Nothing stored: the guard's `finish` releases the lease.
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

/// The stored form of a loaded value (plain, or framed for fail-safe and eager refresh)
/// and its TTL in seconds; `None` when it is not to be stored.
pub(super) fn stored_form(
    options: &LoadOptions,
    ttl: LoadTtl,
    payload: &Bytes,
) -> Option<(Bytes, Option<u64>)> {
    let ttl_secs = match ttl {
        LoadTtl::DontStore => return None,
        LoadTtl::Secs(secs) => Some(secs),
        LoadTtl::Options => options.ttl_secs,
    };
    Some(match (options.fail_safe, options.eager_refresh, ttl_secs) {
        (grace, refresh, Some(ttl)) if grace.is_some() || refresh.is_some() => {
            let now = now_ms();
            let ttl_ms = ttl.saturating_mul(1000);
            let fresh_until = now.saturating_add(ttl_ms);
            let grace_ms = grace.map_or(0, |grace| {
                u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)
            });
            let stale_until = fresh_until.saturating_add(grace_ms);
            let physical = if grace.is_some() {
                ttl.saturating_add(secs_ceil(grace_ms))
            } else {
                ttl
            };
            let mut frame = Frame::value(payload.clone(), fresh_until, stale_until);
            // `check` keeps the fraction within (0, 1): the cast cannot overflow.
            frame.refresh_at_ms =
                refresh.map(|fraction| now.saturating_add((ttl_ms as f64 * fraction) as u64));
            (frame.encode(), Some(physical))
        }
        _ => (payload.clone(), ttl_secs),
    })
}

/// `ms` in whole seconds, rounded up, at least one.
pub(super) fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}
