//! The typed helpers every [`CacheService`] gets: [`CacheServiceExt`].
//!
//! Thin by design: `get` and `set` encode with the [`codec`]; the cache-aside methods hand
//! over to [`load`](crate::load), where single flight, leases, negative caching and fail-safe
//! live. This module sits above both (the contract in [`service`](crate::service) knows
//! neither).

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::load::{LoadError, LoadOptions, Loaded};
use crate::{CacheError, CacheService, codec};

/// The typed helpers, for every [`CacheService`] (`dyn CacheService` included).
///
/// Values are encoded with [`codec`] (JSON). Nobody implements this trait: the blanket
/// implementation covers every service.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrgContext { slug: String, plan: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
/// let ctx = OrgContext { slug: "acme".into(), plan: "pro".into() };
/// cache.set("org:acme", &ctx, Some(300)).await?;
/// let cached: Option<OrgContext> = cache.get::<OrgContext>("org:acme").await?;
/// assert_eq!(cached, Some(ctx));
/// cache.invalidate("org:acme").await?;
/// assert_eq!(cache.get::<OrgContext>("org:acme").await?, None);
/// # Ok(()) }
/// ```
pub trait CacheServiceExt: CacheService {
    /// Reads `key` and decodes it as a `T`; `Ok(None)` when it is missing or expired.
    ///
    /// Stored bytes that do not decode as `T` give [`CacheError::Serialization`] and stay
    /// stored.
    fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<T>, CacheError>> + Send {
        // An in-memory backend answers at once: no boxed future on a hit.
        let now = self.get_bytes_now(key);
        async move {
            let stored = match now {
                Some(answer) => answer?,
                None => self.get_bytes(key).await?,
            };
            match stored {
                Some(bytes) => codec::frame::decode_stored(key, &bytes),
                None => Ok(None),
            }
        }
    }

    /// Cache-aside: the value under `key`, or else `loader`'s, which is then stored for
    /// `ttl_secs` (`None`: the backend's default TTL).
    ///
    /// Concurrent misses of one key on one service run `loader` once in this process; the
    /// other callers wait for it and decode its value (or receive its error, shared as an
    /// `Arc`). A loader error is never cached. A cache that cannot be read is treated as a
    /// miss, and one that cannot be written does not fail the call: the database stays the
    /// source of truth when the cache is down. The loader runs under a 30 s timeout
    /// ([`LoadError::Timeout`]). For negative caching, fail-safe, another timeout, or to know
    /// where the value came from, use [`get_or_load_with`](Self::get_or_load_with).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    /// let loads = AtomicU32::new(0);
    /// let load_plan = || async {
    ///     loads.fetch_add(1, Ordering::SeqCst);
    ///     Ok::<_, std::io::Error>("pro".to_string())
    /// };
    /// let plan = cache.get_or_load("plan:acme", Some(300), load_plan).await.unwrap();
    /// assert_eq!(plan, "pro");
    /// let again: String = cache.get_or_load("plan:acme", Some(300), load_plan).await.unwrap();
    /// assert_eq!((again.as_str(), loads.load(Ordering::SeqCst)), ("pro", 1)); // a hit
    /// # }
    /// ```
    fn get_or_load<T, E, F, Fut>(
        &self,
        key: &str,
        ttl_secs: Option<u64>,
        loader: F,
    ) -> impl Future<Output = Result<T, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        crate::load::aside::get_or_load(self, key, ttl_secs, loader)
    }

    /// Cache-aside with options: negative caching of "not found" (`loader` returns
    /// `Ok(None)`), fail-safe (serve the last known value when the loader fails), a load
    /// timeout; the result says where the value came from ([`LoadSource`](crate::LoadSource)) and which cache
    /// error, if any, was worked around. Single flight as in
    /// [`get_or_load`](Self::get_or_load).
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachet::{CacheServiceExt, LoadOptions, LoadSource, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = MokaCacheService::default();
    /// let options = LoadOptions::default()
    ///     .ttl_secs(60)
    ///     .negative_ttl_secs(10)
    ///     .fail_safe(Duration::from_secs(600));
    ///
    /// // An unknown org: the store says "not found", and that is cached for 10 s.
    /// let missing = cache
    ///     .get_or_load_with::<String, std::io::Error, _, _>("org:nope", &options, || async { Ok(None) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((missing.value, missing.source), (None, LoadSource::Loader));
    /// let again = cache
    ///     .get_or_load_with::<String, std::io::Error, _, _>("org:nope", &options, || async {
    ///         panic!("not called: the \"not found\" is cached")
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((again.value, again.source), (None, LoadSource::Cache));
    /// # }
    /// ```
    fn get_or_load_with<T, E, F, Fut>(
        &self,
        key: &str,
        options: &LoadOptions,
        loader: F,
    ) -> impl Future<Output = Result<Loaded<T>, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<Option<T>, E>> + Send,
    {
        crate::load::aside::get_or_load_with(self, key, options, loader)
    }

    /// Encodes `value` and stores it under `key` (see [`CacheService::set_bytes`] for
    /// `ttl_secs`).
    fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl_secs: Option<u64>,
    ) -> impl Future<Output = Result<(), CacheError>> + Send {
        // Encode before the future is built, so that it does not hold `&T` (no `T: Sync`).
        let encoded = codec::encode(key, value);
        async move { self.set_bytes(key, encoded?, ttl_secs).await }
    }
}

impl<S: CacheService + ?Sized> CacheServiceExt for S {}
