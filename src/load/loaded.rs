//! What a load returns: [`Loaded`] and where its value came from ([`LoadSource`]).

use bytes::Bytes;

use crate::CacheError;

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

    /// A fresh value found in the cache.
    pub(crate) fn from_cache(value: T) -> Self {
        Loaded {
            value: Some(value),
            source: LoadSource::Cache,
            cache_error: None,
            written: None,
        }
    }

    /// The same result with the value mapped by `f`.
    ///
    /// ```
    /// use cachet::{CacheServiceExt, MokaCacheService, LoadOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = MokaCacheService::default();
    /// let loaded = cache
    ///     .get_or_load_with("n", &LoadOptions::default(), || async { Ok::<_, std::io::Error>(Some(2u32)) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(loaded.map(|n| n * 10).value, Some(20));
    /// # }
    /// ```
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Loaded<U> {
        Loaded {
            value: self.value.map(f),
            source: self.source,
            cache_error: self.cache_error,
            written: self.written,
        }
    }
}
