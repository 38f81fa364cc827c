//! The contract: the object-safe [`CacheService`], the lease types its cache-aside methods
//! take ([`lease`]), the TTL rules every backend applies, and the forwarding impls that make
//! `Arc<S>`, `Box<S>` and `&S` services themselves.
//!
//! This module depends on nothing above it (no backend, no loader): the typed helpers
//! ([`CacheServiceExt`](crate::CacheServiceExt)) and cache-aside ([`load`](crate::load)) are
//! built on it, and the [`Cache`](crate::Cache) enum's impl is generated next to the enum.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use enum_dispatch::enum_dispatch;

pub use self::lease::{Lease, LeaseRead, LeaseRequest, StoredVersion};
pub use self::shared::{Decoded, DecodedSlot, Decoder, SharedValue};
use crate::CacheError;
use crate::codec::{Codec, Json};

pub mod lease;
pub mod shared;
pub mod tags;

/// The longest TTL any backend accepts: 100 years of 365 days, in seconds. Longer is a
/// [`CacheError::InvalidArgument`] rather than an overflow somewhere below.
pub const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 60 * 60;

/// The default TTL of every backend unless configured: 300 seconds.
pub const DEFAULT_TTL_SECS: u64 = 300;

/// A byte-level cache, object safe so that an app can hold an `Arc<dyn CacheService>`.
///
/// Every backend and decorator implements these four methods; the typed helpers
/// (`get::<T>`, `set`) come from [`CacheServiceExt`](crate::CacheServiceExt), which every `CacheService`, including
/// `dyn CacheService`, gets for free.
///
/// Semantics shared by every implementation (the [`conformance`](crate) suite checks them):
/// a missing key is `Ok(None)`; `ttl_secs: Some(n)` expires the entry after `n` seconds,
/// `None` applies the backend's default TTL, `Some(0)` is [`CacheError::InvalidArgument`];
/// removing a missing key is `Ok`; [`invalidate_prefix`](CacheService::invalidate_prefix)
/// treats its argument as a literal string (glob characters included) and returns how many
/// entries it removed.
///
/// ```
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use cachet::{CacheService, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
/// cache.set_bytes("org:acme", Bytes::from_static(b"raw"), Some(60)).await?;
/// assert_eq!(cache.get_bytes("org:acme").await?, Some(Bytes::from_static(b"raw")));
/// assert_eq!(cache.invalidate_prefix("org:").await?, 1);
/// assert_eq!(cache.get_bytes("org:acme").await?, None);
/// # Ok(()) }
/// ```
#[async_trait]
#[enum_dispatch]
pub trait CacheService: Send + Sync + fmt::Debug {
    /// The bytes stored under `key`, or `None` when it is missing or expired.
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError>;

    /// A fast path for backends that can answer a read without waiting (in process memory):
    /// `Some(answer)`, the same answer [`get_bytes`](CacheService::get_bytes) would give, or
    /// `None` to say "call `get_bytes`". The default is `None`.
    ///
    /// The typed helpers try it first, so an in-memory hit costs no boxed future. Wrappers
    /// must forward it (the `Arc`, `Box` and `&` impls do); a backend that answers `Some`
    /// must give exactly what `get_bytes` would.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{CacheService, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// cache.set_bytes("k", Bytes::from_static(b"v"), None).await?;
    /// assert_eq!(cache.get_bytes_now("k").transpose()?, Some(Some(Bytes::from_static(b"v"))));
    /// # Ok(()) }
    /// ```
    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        let _ = key;
        None
    }

    /// A read answered from a decoded value kept in process memory (see [`shared`]):
    /// `Some(answer)`, the same answer [`get_bytes_now`](CacheService::get_bytes_now) and
    /// decoding its bytes with `decoder` would give, the value shared rather than decoded
    /// again; or `None` to say "read the bytes" (this backend keeps no decoded values, or
    /// the key is not in its memory). The default is `None`.
    ///
    /// [`get_shared`](crate::CacheServiceExt::get_shared) tries it first. Wrappers that keep
    /// the bytes as they are must forward it (the `Arc`, `Box` and `&` impls and
    /// [`NamespacedCacheService`](crate::NamespacedCacheService) do); one that changes the
    /// bytes (encryption) must not, since the inner service's values are not its own.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
    /// cache.set("org:acme", &"Acme".to_string(), None).await?;
    /// let first: Arc<String> = cache.get_shared("org:acme").await?.unwrap();
    /// let second: Arc<String> = cache.get_shared("org:acme").await?.unwrap();
    /// assert!(Arc::ptr_eq(&first, &second)); // decoded once
    /// # Ok(()) }
    /// ```
    fn get_shared_now(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        let _ = (key, decoder);
        None
    }

    /// The bytes stored under each of `keys`, in the order given (`None` where missing or
    /// expired; a key given twice is answered twice). One call for the whole batch: Redis
    /// sends one `MGET` per hash slot (one in all on a single server), a tiered instance
    /// answers what its L1 holds and asks Redis for the rest only.
    ///
    /// The default reads the keys one after the other with
    /// [`get_bytes`](CacheService::get_bytes) (right for a store in process memory).
    /// Wrappers must forward it; a decorator that changes keys or bytes maps both.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{CacheService, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// cache.set_bytes("org:a", Bytes::from_static(b"A"), None).await?;
    /// let found = cache.get_many_bytes(&["org:a", "org:b"]).await?;
    /// assert_eq!(found, vec![Some(Bytes::from_static(b"A")), None]);
    /// # Ok(()) }
    /// ```
    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            found.push(self.get_bytes(key).await?);
        }
        Ok(found)
    }

    /// Stores `value` under `key`, replacing any previous value and its TTL.
    ///
    /// `ttl_secs`: `Some(n)` expires the entry after `n` seconds (`1..=MAX_TTL_SECS`),
    /// `None` uses the backend's default TTL.
    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError>;

    /// Removes `key`. Removing a key that is not there is `Ok`.
    async fn invalidate(&self, key: &str) -> Result<(), CacheError>;

    /// Removes every entry whose key starts with the literal string `prefix` and returns how
    /// many were removed. `*`, `?`, `[`, `]` and `\` are ordinary characters here.
    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError>;

    /// Invalidates every entry written with `tag` by
    /// [`set_tagged`](crate::CacheServiceExt::set_tagged) before this call, on every instance
    /// (within the bound of [`invalidate`](CacheService::invalidate)); entries tagged `tag`
    /// afterwards are served. One small write whatever the number of entries: it stores a
    /// new version in the tag's record, and tagged entries are checked against their tags'
    /// records when read ([`tags`]). A tag is 1 to 1024 bytes.
    ///
    /// The default writes the record with this service's own
    /// [`set_bytes`](CacheService::set_bytes) ([`tags::invalidate`]); a decorator that
    /// changes keys or bytes must do the same on itself rather than forward, so that the
    /// record is where its own reads look.
    ///
    /// ```
    /// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// cache.set_tagged("token:a1", &"alice", Some(60), &["user:42"]).await?;
    /// cache.set_tagged("token:b2", &"alice", Some(60), &["user:42", "org:acme"]).await?;
    /// cache.invalidate_tag("user:42").await?;
    /// assert_eq!(cache.get::<String>("token:a1").await?, None);
    /// assert_eq!(cache.get::<String>("token:b2").await?, None);
    /// # Ok(()) }
    /// ```
    async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        tags::invalidate(self, tag).await
    }

    /// Cache-aside's lease (see [`lease`]): the value stored under
    /// `key`, read from the store that holds the truth (never a local copy), or, when there
    /// is none (or it is the unusable value `request.replace` names), a lease on the key for
    /// `request.token`, stored in the key itself so that any change to the key voids it.
    /// [`LeaseRead::Held`] when someone else's lease is live.
    ///
    /// The default answers [`LeaseRead::Unsupported`]: loads then run without a lease. Every
    /// backend and decorator of this crate implements it; a wrapper must forward it (and
    /// [`set_leased`](CacheService::set_leased), [`release_lease`](CacheService::release_lease)).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{CacheService, MokaCacheService};
    /// use cachet::load::{LeaseRead, LeaseRequest};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// let LeaseRead::Granted(lease) = cache.lease("org:acme", &LeaseRequest::new()).await? else {
    ///     panic!("a missing key is leased")
    /// };
    /// assert!(matches!(cache.lease("org:acme", &LeaseRequest::new()).await?, LeaseRead::Held { .. }));
    /// cache.invalidate("org:acme").await?; // voids the lease
    /// assert!(!cache.set_leased("org:acme", &lease, Bytes::from_static(b"old"), None).await?);
    /// assert_eq!(cache.get_bytes("org:acme").await?, None);
    /// # Ok(()) }
    /// ```
    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        let _ = (key, request);
        Ok(LeaseRead::Unsupported)
    }

    /// Stores `value` under `key` only if `lease` is still held there; whether it did.
    /// A `set`, `invalidate` or `invalidate_prefix` of the key since the lease was granted
    /// voided it, and then nothing is written. The default (no leases) stores
    /// unconditionally.
    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let _ = lease;
        self.set_bytes(key, value, ttl_secs).await.map(|()| true)
    }

    /// Ends `lease` on `key` if it is still held there (a load that stores nothing), so that
    /// callers waiting on it load at once instead of waiting out its TTL.
    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        let _ = (key, lease);
        Ok(())
    }

    /// Stores `value` under `key` only if the key still holds exactly the value `version`
    /// names (a version from [`LeaseRead::Value`], or from an earlier `replace_if`), and
    /// returns the new value's version; `None` when the key changed since (written,
    /// invalidated, expired, evicted or leased) and nothing was stored. One atomic step
    /// where the truth lives (a Lua script on the key's one slot in Redis).
    ///
    /// Eager refresh ([`LoadOptions::eager_refresh`](crate::LoadOptions::eager_refresh))
    /// claims a refresh and writes its result this way, so that a refresh can never
    /// overwrite a `set` or resurrect an invalidated key. The default answers `None`
    /// (a service without it): eager refresh then never claims, and values reload when they
    /// expire. Wrappers must forward it.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{CacheService, MokaCacheService};
    /// use cachet::load::{LeaseRead, LeaseRequest};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::default();
    /// cache.set_bytes("k", Bytes::from_static(b"1"), None).await?;
    /// let LeaseRead::Value { version, .. } = cache.lease("k", &LeaseRequest::new()).await? else {
    ///     panic!("the key holds a value")
    /// };
    /// let next = cache.replace_if("k", &version, Bytes::from_static(b"2"), None).await?;
    /// assert!(next.is_some());
    /// // The version seen first is gone: a second replace of it stores nothing.
    /// assert!(cache.replace_if("k", &version, Bytes::from_static(b"3"), None).await?.is_none());
    /// assert_eq!(cache.get_bytes("k").await?, Some(Bytes::from_static(b"2")));
    /// # Ok(()) }
    /// ```
    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        let _ = (key, version, value, ttl_secs);
        Ok(None)
    }

    /// How the typed helpers ([`CacheServiceExt`](crate::CacheServiceExt)) encode values
    /// for this service and decode what it stores: [`Json`] unless the backend was built
    /// with another [`Codec`] (`codec(..)` on the builders). Wrappers forward it; every
    /// service that shares a store should use one codec (bytes written with another are a
    /// [`CacheError::Serialization`] naming both).
    ///
    /// ```
    /// use cachet::{CacheService, MokaCacheService};
    ///
    /// assert_eq!(MokaCacheService::default().codec().name(), "json");
    /// let packed = MokaCacheService::builder().codec(cachet::codec::MessagePack).build().unwrap();
    /// assert_eq!(packed.codec().name(), "msgpack");
    /// ```
    fn codec(&self) -> &dyn Codec {
        &Json
    }

    /// Which store this service is, for the single flight of
    /// [`get_or_load`](crate::CacheServiceExt::get_or_load): concurrent loads of one key through
    /// services with the same scope share one loader call.
    ///
    /// The default is the service's address, so two services never share loads. The
    /// backends override it so that every clone of one backend (they share their store)
    /// answers the same scope; wrappers (`Arc`, `Box`, `&`, [`Cache`](crate::Cache)) forward it. A
    /// decorator that changes keys needs a scope of its own per mapping
    /// ([`NamespacedCacheService`](crate::NamespacedCacheService) mixes its namespace into
    /// the inner scope); one that keeps them forwards the inner scope.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{CacheService, MokaCacheService};
    ///
    /// let cache = MokaCacheService::default();
    /// let shared: Arc<dyn CacheService> = Arc::new(cache.clone());
    /// assert_eq!(shared.flight_scope(), cache.flight_scope());
    /// assert_ne!(MokaCacheService::default().flight_scope(), cache.flight_scope());
    /// ```
    fn flight_scope(&self) -> u64 {
        (self as *const Self).cast::<()>().addr() as u64
    }
}

/// A fresh scope id for a backend's [`CacheService::flight_scope`]: never an address (the
/// top bit is set), never handed out twice.
pub(crate) fn new_flight_scope() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1 << 63);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Turns a call's `ttl_secs` into a duration: `None` is `default`, `Some(0)` and values
/// above [`MAX_TTL_SECS`] are [`CacheError::InvalidArgument`].
///
/// ```
/// use std::time::Duration;
/// use cachet::service::resolve_ttl;
///
/// let default = Duration::from_secs(300);
/// assert_eq!(resolve_ttl("k", None, default).unwrap(), default);
/// assert_eq!(resolve_ttl("k", Some(5), default).unwrap(), Duration::from_secs(5));
/// assert!(resolve_ttl("k", Some(0), default).is_err());
/// ```
pub fn resolve_ttl(
    key: &str,
    ttl_secs: Option<u64>,
    default: Duration,
) -> Result<Duration, CacheError> {
    match ttl_secs {
        None => Ok(default),
        Some(0) => Err(CacheError::invalid_argument(
            key,
            "ttl_secs must be at least 1 (Some(0) would store nothing); use None for the default TTL",
        )),
        Some(secs) if secs > MAX_TTL_SECS => Err(CacheError::invalid_argument(
            key,
            format!("ttl_secs {secs} is longer than the maximum of {MAX_TTL_SECS} (100 years)"),
        )),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}

/// Checks a backend's configured default TTL: `1..=MAX_TTL_SECS`, else [`CacheError::Config`].
///
/// ```
/// assert!(cachet::service::check_default_ttl(300).is_ok());
/// assert!(cachet::service::check_default_ttl(0).is_err());
/// ```
pub fn check_default_ttl(secs: u64) -> Result<Duration, CacheError> {
    if secs == 0 || secs > MAX_TTL_SECS {
        return Err(CacheError::config(
            format!("default_ttl_secs must be within 1..={MAX_TTL_SECS}, got {secs}"),
            None,
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// The boxed future `#[async_trait]` methods return.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Forwarding impls: a wrapped service is a service itself. They hand back the inner
/// service's future as it is, so an `Arc<dyn CacheService>` costs no second allocation.
macro_rules! forward_cache_service {
    ($($wrapper:ty),+) => {$(
        // A method the trait gains must be forwarded here too (a defaulted one left out
        // would silently answer for the wrapper instead of the inner service).
        #[deny(clippy::missing_trait_methods)]
        impl<S: CacheService + ?Sized> CacheService for $wrapper {
            fn get_bytes<'s, 'k, 'f>(
                &'s self,
                key: &'k str,
            ) -> BoxFuture<'f, Result<Option<Bytes>, CacheError>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).get_bytes(key)
            }

            fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
                (**self).get_bytes_now(key)
            }

            fn get_shared_now(
                &self,
                key: &str,
                decoder: &Decoder,
            ) -> Option<Result<Option<SharedValue>, CacheError>> {
                (**self).get_shared_now(key, decoder)
            }

            fn get_many_bytes<'s, 'k, 'a, 'f>(
                &'s self,
                keys: &'k [&'a str],
            ) -> BoxFuture<'f, Result<Vec<Option<Bytes>>, CacheError>>
            where
                's: 'f,
                'k: 'f,
                'a: 'f,
                Self: 'f,
            {
                (**self).get_many_bytes(keys)
            }

            fn set_bytes<'s, 'k, 'f>(
                &'s self,
                key: &'k str,
                value: Bytes,
                ttl_secs: Option<u64>,
            ) -> BoxFuture<'f, Result<(), CacheError>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).set_bytes(key, value, ttl_secs)
            }

            fn invalidate<'s, 'k, 'f>(&'s self, key: &'k str) -> BoxFuture<'f, Result<(), CacheError>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).invalidate(key)
            }

            fn invalidate_prefix<'s, 'k, 'f>(
                &'s self,
                prefix: &'k str,
            ) -> BoxFuture<'f, Result<u64, CacheError>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).invalidate_prefix(prefix)
            }

            fn invalidate_tag<'s, 'k, 'f>(&'s self, tag: &'k str) -> BoxFuture<'f, Result<(), CacheError>>
            where
                's: 'f,
                'k: 'f,
                Self: 'f,
            {
                (**self).invalidate_tag(tag)
            }

            fn flight_scope(&self) -> u64 {
                (**self).flight_scope()
            }

            fn codec(&self) -> &dyn Codec {
                (**self).codec()
            }
            fn lease<'s, 'k, 'r, 'f>(
                &'s self,
                key: &'k str,
                request: &'r LeaseRequest,
            ) -> BoxFuture<'f, Result<LeaseRead, CacheError>>
            where
                's: 'f,
                'k: 'f,
                'r: 'f,
                Self: 'f,
            {
                (**self).lease(key, request)
            }

            fn set_leased<'s, 'k, 'l, 'f>(
                &'s self,
                key: &'k str,
                lease: &'l Lease,
                value: Bytes,
                ttl_secs: Option<u64>,
            ) -> BoxFuture<'f, Result<bool, CacheError>>
            where
                's: 'f,
                'k: 'f,
                'l: 'f,
                Self: 'f,
            {
                (**self).set_leased(key, lease, value, ttl_secs)
            }

            fn release_lease<'s, 'k, 'l, 'f>(
                &'s self,
                key: &'k str,
                lease: &'l Lease,
            ) -> BoxFuture<'f, Result<(), CacheError>>
            where
                's: 'f,
                'k: 'f,
                'l: 'f,
                Self: 'f,
            {
                (**self).release_lease(key, lease)
            }

            fn replace_if<'s, 'k, 'v, 'f>(
                &'s self,
                key: &'k str,
                version: &'v StoredVersion,
                value: Bytes,
                ttl_secs: Option<u64>,
            ) -> BoxFuture<'f, Result<Option<StoredVersion>, CacheError>>
            where
                's: 'f,
                'k: 'f,
                'v: 'f,
                Self: 'f,
            {
                (**self).replace_if(key, version, value, ttl_secs)
            }

        }
    )+};
}

forward_cache_service!(Arc<S>, Box<S>, &S);
