//! The entry points of [`CacheServiceExt`](crate::CacheServiceExt)'s cache-aside methods:
//! the in-memory fast path (a fresh hit answered without boxing a future), then the boxed
//! miss path ([`load`](super::load)).

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LoadError, LoadOptions, LoadTtl, Loaded, refresh};
use crate::codec::Frame;
use crate::service::{BoxFuture, MAX_TTL_SECS};
use crate::{CacheError, CacheService, codec};

/// [`CacheServiceExt::get_or_load`](crate::CacheServiceExt::get_or_load).
pub(crate) fn get_or_load<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    ttl_secs: Option<u64>,
    loader: F,
) -> impl Future<Output = Result<T, LoadError<E>>> + Send
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T, E>> + Send,
{
    // The in-memory fast path, as in `get`: a hit is decoded at once and costs no boxed
    // future. The miss path is boxed, so that this future stays small.
    let now = cache.get_bytes_now(key);
    let valid_ttl = ttl_secs.is_none_or(|secs| (1..=MAX_TTL_SECS).contains(&secs));
    let hit = match &now {
        Some(Ok(Some(stored))) if valid_ttl && !Frame::is_framed(stored) => {
            codec::decode_with(cache.codec(), key, stored).ok()
        }
        _ => None,
    };
    async move {
        if let Some(value) = hit {
            return Ok(value);
        }
        let mut options = LoadOptions::default();
        if let Some(ttl) = ttl_secs {
            options = options.ttl_secs(ttl);
        }
        let miss: BoxFuture<'_, super::Ended<T, E, _>> =
            Box::pin(super::load(cache, key, &options, now, || async move {
                loader().await.map(|value| Some((value, LoadTtl::Options)))
            }));
        // No eager refresh without options: the loader never comes back.
        let loaded = miss.await.0?;
        loaded.value.ok_or_else(|| {
            // Only when a concurrent `get_or_load_with` with negative caching led the
            // load and found nothing.
            LoadError::Cache(CacheError::invalid_argument(
                key,
                "a concurrent get_or_load_with of this key found nothing (negative caching)",
            ))
        })
    }
}

/// [`CacheServiceExt::get_or_load_with`](crate::CacheServiceExt::get_or_load_with).
pub(crate) fn get_or_load_with<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    loader: F,
) -> impl Future<Output = Result<Loaded<T>, LoadError<E>>> + Send
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<T>, E>> + Send,
{
    // As in `get_or_load`: a fresh in-memory hit is answered at once, the rest boxed.
    let now = cache.get_bytes_now(key);
    let hit = match options.check(key) {
        Ok(()) => super::read::fresh_hit::<T>(cache.codec(), key, options, &now),
        Err(_) => None, // reported by the slow path
    };
    let loader = move || async move {
        loader()
            .await
            .map(|found| found.map(|value| (value, LoadTtl::Options)))
    };
    async move {
        if let Some((loaded, refresh)) = hit {
            if refresh {
                refresh_inline(cache, key, options, loader).await;
            }
            return Ok(loaded);
        }
        let miss: BoxFuture<'_, super::Ended<T, E, _>> =
            Box::pin(super::load(cache, key, options, now, loader));
        let (result, refresh) = miss.await;
        if let Some(loader) = refresh {
            refresh_inline(cache, key, options, loader).await;
        }
        result
    }
}

/// Runs the eager refresh of `key` in this caller, unless one runs here already (boxed: the
/// hit's future stays small).
pub(crate) async fn refresh_inline<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    loader: F,
) where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send,
{
    if let Some(slot) = refresh::Slot::take(cache.flight_scope(), key) {
        let run: BoxFuture<'_, refresh::Refreshed> =
            Box::pin(refresh::run(slot, cache, key, options, loader));
        run.await;
    }
}

/// Starts the eager refresh of `key` as a task of its own, unless one runs here already (or
/// there is no tokio runtime: then it runs in this caller).
fn refresh_detached<S, T, E, F, Fut>(cache: &S, key: &str, options: &LoadOptions, loader: F)
where
    S: CacheService + Clone + 'static,
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<(T, LoadTtl)>, E>> + Send + 'static,
{
    let Some(slot) = refresh::Slot::take(cache.flight_scope(), key) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return; // no runtime to run it on: the value reloads at its expiry
    };
    let (cache, key, options) = (cache.clone(), key.to_owned(), options.clone());
    runtime.spawn(async move {
        refresh::run(slot, &cache, &key, &options, loader).await;
    });
}

/// [`CacheServiceExt::get_or_load_detached`](crate::CacheServiceExt::get_or_load_detached).
pub(crate) fn get_or_load_detached<S, T, E, F, Fut>(
    cache: &S,
    key: &str,
    options: &LoadOptions,
    shared_hit: Option<Arc<T>>,
    loader: F,
) -> impl Future<Output = Result<Loaded<Arc<T>>, LoadError<E>>> + Send
where
    S: CacheService + Clone + 'static,
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<T>, E>> + Send + 'static,
{
    let loader = move || async move {
        loader()
            .await
            .map(|found| found.map(|value| (value, LoadTtl::Options)))
    };
    // A shared hit (decoded once, kept in memory) answers at once; its refresh, if due,
    // starts here.
    let checked = options.check(key);
    let shared = match (&checked, shared_hit) {
        (Ok(()), Some(value)) => Some(value),
        _ => None,
    };
    let mut loader = Some(loader);
    if shared.is_some() && options.eager_refresh.is_some() && refresh_due_now(cache, key) {
        if let Some(loader) = loader.take() {
            refresh_detached::<S, T, E, _, _>(cache, key, options, loader);
        }
    }
    async move {
        checked?;
        if let Some(value) = shared {
            return Ok(Loaded::from_cache(value));
        }
        let Some(loader) = loader else {
            unreachable!("the loader is taken only on a shared hit, which returned")
        };
        let mut cache_error = None;
        let read = match cache.get_bytes_now(key) {
            Some(read) => read,
            None => cache.get_bytes(key).await,
        };
        let replay = match &read {
            Ok(stored) => Some(Ok(stored.clone())),
            Err(_) => None,
        };
        let stale =
            match super::read::classify::<T>(cache.codec(), key, read, options, &mut cache_error) {
                super::read::Read::Hit(value, _, stale, refresh) => {
                    if refresh {
                        refresh_detached::<S, T, E, _, _>(cache, key, options, loader);
                    }
                    let loaded = Loaded {
                        value,
                        source: super::read::cached_source(stale),
                        cache_error,
                        written: None,
                    };
                    return Ok(loaded.map(Arc::new));
                }
                super::read::Read::Miss { stale } => stale,
            };
        // The load runs as a task of its own: past the soft timeout, with a stale value at
        // hand, this caller takes that value and the load goes on and stores its own.
        let (owned, owned_key, owned_options) = (cache.clone(), key.to_owned(), options.clone());
        let load = async move {
            super::load(&owned, &owned_key, &owned_options, replay, loader)
                .await
                .0
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Not on a tokio runtime: the load runs in this caller.
            return load.await.map(|loaded| loaded.map(Arc::new));
        };
        let task = runtime.spawn(load);
        tokio::pin!(task);
        if let (Some(soft), Some(frame)) = (options.soft_timeout, &stale) {
            if soft < options.load_timeout {
                if let Ok(joined) = tokio::time::timeout(soft, &mut task).await {
                    return finish(key, joined);
                }
                if let Some(loaded) =
                    super::serve_stale::<T>(cache.codec(), key, frame, &mut cache_error)
                {
                    return Ok(loaded.map(Arc::new));
                }
            }
        }
        finish(key, task.await)
    }
}

/// The result of a load task: its value, or its panic carried on to the caller.
fn finish<T, E>(
    key: &str,
    joined: Result<Result<Loaded<T>, LoadError<E>>, tokio::task::JoinError>,
) -> Result<Loaded<Arc<T>>, LoadError<E>> {
    match joined {
        Ok(result) => result.map(|loaded| loaded.map(Arc::new)),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // The runtime is shutting down.
        Err(error) => Err(LoadError::Cache(CacheError::backend(
            "cachet",
            "load",
            key,
            format!("the load task was cancelled: {error}"),
        ))),
    }
}

/// Whether the value stored under `key` in this process's memory is due for its eager
/// refresh (`false` when it is not in memory: a read from the store decides then).
pub(crate) fn refresh_due_now<S: CacheService + ?Sized>(cache: &S, key: &str) -> bool {
    matches!(cache.get_bytes_now(key), Some(Ok(Some(stored))) if super::read::refresh_due(&stored))
}
