//! The typed helpers every [`CacheService`] gets: [`CacheServiceExt`].
//!
//! Thin by design: `get` and `set` encode with the [`codec`]; the cache-aside methods hand
//! over to [`load`](crate::load), where single flight, leases, negative caching and fail-safe
//! live. This module sits above both (the contract in [`service`](crate::service) knows
//! neither).

use std::any::{TypeId, type_name};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Codec, Frame};
use crate::load::{LoadError, LoadOptions, Loaded};
use crate::service::{Decoded, Decoder, MAX_TTL_SECS, SharedValue, tags};
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
                // Boxed, so that the plain path's future stays small.
                Some(bytes) if tags::is_tagged(&bytes) => {
                    match Box::pin(tags::resolve_one(self, key, Some(bytes))).await? {
                        Some(bytes) => codec::frame::decode_stored_with(self.codec(), key, &bytes),
                        None => Ok(None),
                    }
                }
                Some(bytes) => codec::frame::decode_stored_with(self.codec(), key, &bytes),
                None => Ok(None),
            }
        }
    }

    /// Reads `key` as a shared `T`: like [`get`](Self::get), but on the in-memory backend
    /// and a tiered instance's L1 a hit is the value decoded on the entry's first shared
    /// read, kept beside its bytes: an `Arc` clone, no decode. Elsewhere (Redis, an L1
    /// miss, an [`EncryptedCacheService`](crate::EncryptedCacheService)) the bytes are read
    /// and decoded as by `get`.
    ///
    /// Everything else is as for `get`: bytes that are not a `T` are a
    /// [`CacheError::Serialization`] (and stay stored); a write, an invalidation or the TTL's
    /// end replaces or removes the entry and its decoded value with it. One entry keeps the
    /// value of one type: reading a key as two types decodes the second each time.
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
    /// cache.set("org:acme", &OrgContext { slug: "acme".into(), plan: "pro".into() }, None).await?;
    /// let ctx: Arc<OrgContext> = cache.get_shared("org:acme").await?.expect("cached");
    /// assert_eq!(ctx.plan, "pro");
    /// let again = cache.get_shared::<OrgContext>("org:acme").await?.expect("cached");
    /// assert!(Arc::ptr_eq(&ctx, &again)); // the same decoded value
    /// cache.invalidate("org:acme").await?;
    /// assert!(cache.get_shared::<OrgContext>("org:acme").await?.is_none());
    /// # Ok(()) }
    /// ```
    fn get_shared<T>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Arc<T>>, CacheError>> + Send
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let now = self.get_shared_now(key, &decoder::<T>(self.codec()));
        async move {
            match now {
                Some(Ok(Some(value))) => downcast::<T>(key, value).map(Some),
                Some(Err(error)) => Err(error),
                // Nothing to share: a miss, or an entry only a read can judge (tagged).
                Some(Ok(None)) | None => Ok(self.get::<T>(key).await?.map(Arc::new)),
            }
        }
    }

    /// [`get_or_load`](Self::get_or_load) with a shared value: a hit is answered as by
    /// [`get_shared`](Self::get_shared) (no decode where the value is kept in memory); a
    /// miss loads as `get_or_load` does (single flight, leases) and wraps the value in an
    /// `Arc`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    /// let load = || async { Ok::<_, std::io::Error>("pro".to_string()) };
    /// let plan: Arc<String> = cache.get_or_load_shared("plan:acme", Some(300), load).await.unwrap();
    /// let hit = cache.get_or_load_shared("plan:acme", Some(300), load).await.unwrap();
    /// let again = cache.get_or_load_shared("plan:acme", Some(300), load).await.unwrap();
    /// assert_eq!((plan.as_str(), hit.as_str()), ("pro", "pro"));
    /// assert!(Arc::ptr_eq(&hit, &again)); // decoded once, then shared
    /// # }
    /// ```
    fn get_or_load_shared<T, E, F, Fut>(
        &self,
        key: &str,
        ttl_secs: Option<u64>,
        loader: F,
    ) -> impl Future<Output = Result<Arc<T>, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        let valid_ttl = ttl_secs.is_none_or(|secs| (1..=MAX_TTL_SECS).contains(&secs));
        let hit = valid_ttl.then(|| shared_hit::<T, _>(self, key)).flatten();
        async move {
            if let Some(value) = hit {
                return Ok(value);
            }
            self.get_or_load(key, ttl_secs, loader).await.map(Arc::new)
        }
    }

    /// [`get_or_load_with`](Self::get_or_load_with) with a shared value: a fresh hit is
    /// answered as by [`get_shared`](Self::get_shared); everything else (a miss, a cached
    /// "not found", a stale value of fail-safe) goes through `get_or_load_with`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{CacheServiceExt, LoadOptions, LoadSource, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = MokaCacheService::default();
    /// let options = LoadOptions::default().ttl_secs(60).negative_ttl_secs(10);
    /// let load = || async { Ok::<_, std::io::Error>(Some("pro".to_string())) };
    /// let first = cache.get_or_load_shared_with("plan:acme", &options, load).await.unwrap();
    /// let second = cache.get_or_load_shared_with("plan:acme", &options, load).await.unwrap();
    /// assert_eq!((first.source, second.source), (LoadSource::Loader, LoadSource::Cache));
    /// assert_eq!(second.value.as_deref().map(String::as_str), Some("pro"));
    /// # }
    /// ```
    fn get_or_load_shared_with<T, E, F, Fut>(
        &self,
        key: &str,
        options: &LoadOptions,
        loader: F,
    ) -> impl Future<Output = Result<Loaded<Arc<T>>, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<Option<T>, E>> + Send,
    {
        let hit = options
            .check(key)
            .is_ok()
            .then(|| shared_hit::<T, _>(self, key))
            .flatten()
            // A value due for its eager refresh goes the long way (which runs it).
            .filter(|_| {
                options.eager_refresh_fraction().is_none()
                    || !crate::load::aside::refresh_due_now(self, key)
            });
        async move {
            if let Some(value) = hit {
                return Ok(Loaded::from_cache(value));
            }
            let loaded = self.get_or_load_with(key, options, loader).await?;
            Ok(loaded.map(Arc::new))
        }
    }

    /// Cache-aside with an owned loader: [`get_or_load_shared_with`](Self::get_or_load_shared_with)
    /// for a service handle that can move to a task (`Arc<dyn CacheService>`, or any backend:
    /// they are `Clone`) and a `'static` loader, so that the work no caller needs to wait for
    /// runs as a task of its own on the tokio runtime:
    ///
    /// - eager refresh ([`LoadOptions::eager_refresh`]): a hit past the refresh point
    ///   answers at once and starts the reload in the background (the caller never runs the
    ///   loader);
    /// - the soft timeout ([`LoadOptions::soft_timeout`]): with a stale value at hand, a
    ///   load still running at the soft timeout lets every caller have the stale value, and
    ///   goes on to store its own (up to the hard timeout, [`LoadOptions::load_timeout`]).
    ///
    /// Everything else (single flight, leases, negative caching, fail-safe, coherence) is
    /// that of [`get_or_load_with`](Self::get_or_load_with). A panic in the loader reaches
    /// the caller that awaited it. Outside a tokio runtime it runs as `get_or_load_shared_with`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use cachet::{CacheService, CacheServiceExt, LoadOptions, LoadSource, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    /// let options = LoadOptions::default().ttl_secs(60).eager_refresh(0.8);
    /// let plan = cache
    ///     .get_or_load_detached("plan:acme", &options, || async {
    ///         Ok::<_, std::io::Error>(Some("pro".to_string()))
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((plan.value.as_deref().map(String::as_str), plan.source), (Some("pro"), LoadSource::Loader));
    /// // Read after 48 s, it would answer "pro" at once and reload it in the background.
    /// # }
    /// ```
    fn get_or_load_detached<T, E, F, Fut>(
        &self,
        key: &str,
        options: &LoadOptions,
        loader: F,
    ) -> impl Future<Output = Result<Loaded<Arc<T>>, LoadError<E>>> + Send
    where
        Self: Clone + Sized + 'static,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<T>, E>> + Send + 'static,
    {
        let hit = shared_hit::<T, _>(self, key);
        crate::load::aside::get_or_load_detached(self, key, options, hit, loader)
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

    /// Reads every one of `keys` and decodes each as a `T`, in the order given (`None` where
    /// missing or expired). One round trip for the batch on a Redis server (one `MGET` per
    /// hash slot on a cluster, sent together); a tiered instance answers from its L1 what it
    /// holds and reads the rest from Redis at once.
    ///
    /// Stored bytes that do not decode as a `T` are a [`CacheError::Serialization`] for the
    /// whole call, as for [`get`](Self::get).
    ///
    /// ```
    /// use cachet::{CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// cache.set("org:a", &1u32, None).await?;
    /// cache.set("org:c", &3u32, None).await?;
    /// let found = cache.get_many::<u32>(&["org:a", "org:b", "org:c"]).await?;
    /// assert_eq!(found, vec![Some(1), None, Some(3)]);
    /// # Ok(()) }
    /// ```
    fn get_many<T: DeserializeOwned>(
        &self,
        keys: &[&str],
    ) -> impl Future<Output = Result<Vec<Option<T>>, CacheError>> + Send {
        async move {
            let stored = self.get_many_bytes(keys).await?;
            let stored = tags::resolve(self, keys, stored).await?;
            keys.iter()
                .zip(stored)
                .map(|(key, stored)| match stored {
                    Some(bytes) => codec::frame::decode_stored_with(self.codec(), key, &bytes),
                    None => Ok(None),
                })
                .collect()
        }
    }

    /// Batch cache-aside: the values of `keys`, in the order given, loading those that are
    /// not cached with **one** call of `loader`, which gets exactly the keys that missed and
    /// returns the values it found (a key it leaves out is not found: `None` in the result).
    /// Loaded values are stored for `ttl_secs` (`None`: the backend's default).
    ///
    /// One read for the batch ([`get_many`](Self::get_many)); then every missed key keeps
    /// the guarantees of [`get_or_load`](Self::get_or_load): single flight per key (a key
    /// that another caller, or through its lease another instance, is loading is awaited,
    /// not asked for again), the lease, and a write-back that an invalidation overtook is
    /// dropped. The loader is called once every missed key has either asked for its value or
    /// been found meanwhile; it is not called when none is left. Should a key that waited
    /// for another load find that load cancelled after the loader was called, that key is a
    /// [`LoadError::Cache`] (the loader is never called twice). A loader error fails the
    /// call. With options (negative caching of the keys left out, fail-safe, timeouts), see
    /// [`get_or_load_many_with`](Self::get_or_load_many_with).
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use cachet::{CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = MokaCacheService::default();
    /// cache.set("org:a", &"Acme".to_string(), None).await.unwrap();
    /// let orgs = cache
    ///     .get_or_load_many::<String, std::io::Error, _, _>(&["org:a", "org:b", "org:zz"], Some(60), |missed| async move {
    ///         assert_eq!(missed, ["org:b", "org:zz"]); // only what the cache did not hold
    ///         Ok(HashMap::from([("org:b".to_string(), "Bolt".to_string())]))
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(orgs, [Some("Acme".into()), Some("Bolt".into()), None]);
    /// assert_eq!(cache.get::<String>("org:b").await.unwrap().as_deref(), Some("Bolt"));
    /// # }
    /// ```
    fn get_or_load_many<T, E, F, Fut>(
        &self,
        keys: &[&str],
        ttl_secs: Option<u64>,
        loader: F,
    ) -> impl Future<Output = Result<Vec<Option<T>>, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send + Sync + 'static,
        F: FnOnce(Vec<String>) -> Fut + Send,
        Fut: Future<Output = Result<std::collections::HashMap<String, T>, E>> + Send,
    {
        async move {
            let mut options = LoadOptions::default();
            if let Some(ttl) = ttl_secs {
                options = options.ttl_secs(ttl);
            }
            crate::load::batch::load_many(self, keys, &options, loader).await
        }
    }

    /// [`get_or_load_many`](Self::get_or_load_many) with [`LoadOptions`]: with negative
    /// caching on, a key the loader leaves out is cached as "not found" for the negative TTL
    /// (and read as `None` without asking again); fail-safe, the soft timeout and the load
    /// timeout apply per key as for [`get_or_load_with`](Self::get_or_load_with). Batches do
    /// not start eager refreshes (single reads of the keys do).
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use cachet::{CacheServiceExt, LoadOptions, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = MokaCacheService::default();
    /// let options = LoadOptions::default().ttl_secs(60).negative_ttl_secs(10);
    /// let none = |_: Vec<String>| async { Ok::<HashMap<String, u32>, std::io::Error>(HashMap::new()) };
    /// let first = cache.get_or_load_many_with(&["org:nope"], &options, none).await.unwrap();
    /// assert_eq!(first, [None]);
    /// // The "not found" is cached: the loader is not asked again.
    /// let again = cache
    ///     .get_or_load_many_with::<u32, std::io::Error, _, _>(&["org:nope"], &options, |_| async {
    ///         panic!("not called")
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(again, [None]);
    /// # }
    /// ```
    fn get_or_load_many_with<T, E, F, Fut>(
        &self,
        keys: &[&str],
        options: &LoadOptions,
        loader: F,
    ) -> impl Future<Output = Result<Vec<Option<T>>, LoadError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send + Sync + 'static,
        F: FnOnce(Vec<String>) -> Fut + Send,
        Fut: Future<Output = Result<std::collections::HashMap<String, T>, E>> + Send,
    {
        crate::load::batch::load_many(self, keys, options, loader)
    }

    /// Encodes `value` and stores it under `key` with `tags` (1 to 64, each 1 to 1024
    /// bytes): [`CacheService::invalidate_tag`] of any of them invalidates it, on every
    /// instance. [`get`](Self::get), [`get_many`](Self::get_many) and
    /// [`get_shared`](Self::get_shared) serve it while none of its tags was invalidated since
    /// it was written (they read the tags' records: in one batch, from the L1 on a tiered
    /// cache); `get_bytes` returns the tagged frame as stored ([`tags`]).
    ///
    /// A tagged entry is decoded on each read (its shared value is not kept, since only a
    /// read of the records can tell whether it is served), and the cache-aside methods do
    /// not write tags: `get_or_load` of a key written by `set_tagged` loads it again. Tags
    /// are versioned records that live 30 days after their last write; an entry whose TTL
    /// outlives its tag's record reads as missing then (never as a stale value).
    ///
    /// ```
    /// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// // Every cached token of user 42, whatever its key.
    /// cache.set_tagged("token:9f2c", &"alice", Some(300), &["user:42"]).await?;
    /// cache.set_tagged("token:77aa", &"alice", Some(300), &["user:42"]).await?;
    /// cache.set_tagged("token:0b1d", &"bob", Some(300), &["user:7"]).await?;
    /// cache.invalidate_tag("user:42").await?;
    /// let left = cache.get_many::<String>(&["token:9f2c", "token:77aa", "token:0b1d"]).await?;
    /// assert_eq!(left, [None, None, Some("bob".to_string())]);
    /// // Written after the invalidation: served.
    /// cache.set_tagged("token:9f2c", &"alice", Some(300), &["user:42"]).await?;
    /// assert_eq!(cache.get::<String>("token:9f2c").await?.as_deref(), Some("alice"));
    /// # Ok(()) }
    /// ```
    fn set_tagged<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl_secs: Option<u64>,
        tags: &[&str],
    ) -> impl Future<Output = Result<(), CacheError>> + Send {
        let encoded = codec::encode_with(self.codec(), key, value);
        async move { tags::set_tagged(self, key, encoded?, ttl_secs, tags).await }
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
        let encoded = codec::encode_with(self.codec(), key, value);
        async move { self.set_bytes(key, encoded?, ttl_secs).await }
    }
}

impl<S: CacheService + ?Sized> CacheServiceExt for S {}

/// The [`Decoder`] of `T`: stored bytes (plain, or a cache-aside frame) as a shared `T`,
/// with the meaning [`get`](CacheServiceExt::get) gives them (a cached "not found" and a
/// value fail-safe keeps for cache-aside read as nothing; a frame past its freshness too).
fn decoder<T: DeserializeOwned + Send + Sync + 'static>(codec: &dyn Codec) -> Decoder<'_> {
    Decoder::new(
        TypeId::of::<T>(),
        type_name::<T>(),
        codec,
        decode_shared::<T>,
    )
}

fn decode_shared<T: DeserializeOwned + Send + Sync + 'static>(
    codec: &dyn Codec,
    key: &str,
    stored: &Bytes,
) -> Result<Decoded, CacheError> {
    if tags::is_tagged(stored) {
        // Whether it is served depends on its tags' records: `get_shared` reads it.
        return Ok(Decoded::nothing());
    }
    if !Frame::is_framed(stored) {
        let value: T = codec::decode_with(codec, key, stored)?;
        return Ok(Decoded::plain(Arc::new(value)));
    }
    let frame = Frame::decode(key, stored)?;
    if frame.absent || frame.stale {
        return Ok(Decoded::nothing());
    }
    let value: T = codec::decode_with(codec, key, &frame.payload)?;
    Ok(Decoded::fresh_until(Arc::new(value), frame.fresh_until_ms))
}

/// The `Arc<T>` behind a value `decoder::<T>()` made.
#[inline]
fn downcast<T: Send + Sync + 'static>(key: &str, value: SharedValue) -> Result<Arc<T>, CacheError> {
    value.downcast::<T>().map_err(|_| wrong_type::<T>(key))
}

/// Only a backend that kept a value under the wrong type id could get here.
#[cold]
#[inline(never)]
fn wrong_type<T>(key: &str) -> CacheError {
    CacheError::serialization::<T>(key, "decode", "the kept value is of another type")
}

/// A fresh value of `key` kept decoded in memory, for the cache-aside fast paths; `None`
/// for anything else (not in memory, nothing, an error: the slow path sees to those).
fn shared_hit<T, S>(cache: &S, key: &str) -> Option<Arc<T>>
where
    T: DeserializeOwned + Send + Sync + 'static,
    S: CacheService + ?Sized,
{
    match cache.get_shared_now(key, &decoder::<T>(cache.codec())) {
        Some(Ok(Some(value))) => downcast(key, value).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde::{Deserialize, Deserializer, Serialize};

    use crate::{CacheService, CacheServiceExt, MokaCacheService};

    /// Decodes of [`Counted`] so far.
    static DECODES: AtomicUsize = AtomicUsize::new(0);

    /// A value that counts how often it is decoded.
    #[derive(Debug, PartialEq, Serialize)]
    struct Counted(u32);

    impl<'de> Deserialize<'de> for Counted {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            DECODES.fetch_add(1, Ordering::SeqCst);
            u32::deserialize(deserializer).map(Counted)
        }
    }

    #[tokio::test]
    async fn an_entry_is_decoded_once_for_its_shared_reads() {
        let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
        cache.set("n", &7u32, None).await.unwrap();
        let before = DECODES.load(Ordering::SeqCst);
        let first = cache.get_shared::<Counted>("n").await.unwrap().unwrap();
        for _ in 0..100 {
            let again = cache.get_shared::<Counted>("n").await.unwrap().unwrap();
            assert!(Arc::ptr_eq(&first, &again));
        }
        assert_eq!(DECODES.load(Ordering::SeqCst) - before, 1, "one decode");

        // A write is a new entry: decoded once again, and never the old value.
        cache.set("n", &8u32, None).await.unwrap();
        for _ in 0..10 {
            assert_eq!(
                *cache.get_shared::<Counted>("n").await.unwrap().unwrap(),
                Counted(8)
            );
        }
        assert_eq!(DECODES.load(Ordering::SeqCst) - before, 2);

        // The plain read decodes each time, as before.
        for _ in 0..3 {
            assert_eq!(cache.get::<Counted>("n").await.unwrap(), Some(Counted(8)));
        }
        assert_eq!(DECODES.load(Ordering::SeqCst) - before, 5);
    }
}
