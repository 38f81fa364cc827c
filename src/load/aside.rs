//! The entry points of [`CacheServiceExt`](crate::CacheServiceExt)'s cache-aside methods:
//! the in-memory fast path (a fresh hit answered without boxing a future), then the boxed
//! miss path ([`load`](super::load)).

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LoadError, LoadOptions, LoadTtl, Loaded};
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
        let miss: BoxFuture<'_, Result<Loaded<T>, LoadError<E>>> =
            Box::pin(super::load(cache, key, &options, now, || async move {
                loader().await.map(|value| Some((value, LoadTtl::Options)))
            }));
        let loaded = miss.await?;
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
    async move {
        if let Some(loaded) = hit {
            return Ok(loaded);
        }
        let miss: BoxFuture<'_, Result<Loaded<T>, LoadError<E>>> =
            Box::pin(super::load(cache, key, options, now, || async move {
                loader()
                    .await
                    .map(|found| found.map(|value| (value, LoadTtl::Options)))
            }));
        miss.await
    }
}
