//! [`NamespacedCacheService`]: every key under a tenant or app namespace, and prefix
//! invalidation that cannot reach outside it.

use std::fmt;

use async_trait::async_trait;

use crate::codec::Codec;
use crate::load::{Lease, LeaseRead, LeaseRequest, StoredVersion};
use bytes::Bytes;

use crate::service::{Decoder, SharedValue};
use crate::{CacheError, CacheService};

/// The character between a namespace and a key in the stored name. A namespace may not
/// contain it.
///
/// ```
/// let cache = cachet::NamespacedCacheService::new(cachet::MokaCacheService::default(), "acme")?;
/// assert_eq!(cache.stored_key("k"), format!("acme{}k", cachet::decorate::namespaced::SEPARATOR));
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const SEPARATOR: char = ':';

/// Puts every key of the wrapped [`CacheService`] (`Arc<dyn CacheService>` too) under a
/// namespace: the key `k` of namespace `ns` is stored as `ns:k`, and
/// [`invalidate_prefix(p)`](CacheService::invalidate_prefix) removes the inner keys that
/// start with `ns:p`, so it never reaches another namespace (`invalidate_prefix("")` empties
/// this namespace alone and counts only its keys).
///
/// # Why namespaces are disjoint
///
/// A namespace is non-empty and does not contain `:`, so in every stored name the namespace
/// is exactly the text before the first `:`. Two different namespaces therefore own disjoint
/// sets of stored names, and neither prefix `a:` nor `ab:` starts the other: namespace `a`
/// never sees nor removes the keys of namespace `ab` (stored as `ab:...`). A namespace `a:b`
/// is refused, since its key `c` (`a:b:c`) would be namespace `a`'s key `b:c`.
///
/// What a namespace owns is every inner key that starts with `ns:`, whoever wrote it: a key
/// `a:x` written straight to the inner service is namespace `a`'s key `x`. Keys without a
/// `:`, or whose text before the first `:` is not a namespace in use, belong to no
/// namespace and are never touched through one.
///
/// The characters `*`, `?`, `[`, `]` and `\` in a namespace are literal, like everywhere
/// else (the inner service escapes them). A namespace such as `{acme}` makes every key of the
/// tenant share one Redis Cluster hash slot (a hash tag); that is allowed, but it puts the
/// whole tenant on one primary.
///
/// Errors from the inner service name the stored key (`ns:k`); errors from the typed helpers
/// name the key as the caller passed it.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{CacheService, CacheServiceExt, MokaCacheService, NamespacedCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let shared = MokaCacheService::default();
/// let acme = NamespacedCacheService::new(shared.clone(), "acme")?;
/// let globex = NamespacedCacheService::new(shared.clone(), "globex")?;
///
/// acme.set("org", &"Acme", None).await?;
/// globex.set("org", &"Globex", None).await?;
/// assert_eq!(shared.get::<String>("acme:org").await?.as_deref(), Some("Acme"));
///
/// assert_eq!(acme.invalidate_prefix("").await?, 1);       // acme's keys only
/// assert_eq!(globex.get::<String>("org").await?.as_deref(), Some("Globex"));
///
/// assert!(NamespacedCacheService::new(shared.clone(), "a:b").is_err());
/// let as_dyn: Arc<dyn CacheService> = Arc::new(globex);
/// assert_eq!(as_dyn.get::<String>("org").await?.as_deref(), Some("Globex"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NamespacedCacheService<S> {
    inner: S,
    /// The namespace followed by the separator: what every stored name starts with.
    prefix: String,
}

impl<S: CacheService> NamespacedCacheService<S> {
    /// Wraps `inner` with the namespace `namespace`. An empty namespace, or one that contains
    /// `:`, is [`CacheError::Config`].
    ///
    /// ```
    /// use cachet::{CacheError, MokaCacheService, NamespacedCacheService};
    ///
    /// let ok = NamespacedCacheService::new(MokaCacheService::default(), "tenant-42")?;
    /// assert_eq!(ok.namespace(), "tenant-42");
    /// for bad in ["", "a:b", ":", "tenant:"] {
    ///     let err = NamespacedCacheService::new(MokaCacheService::default(), bad).unwrap_err();
    ///     assert!(matches!(err, CacheError::Config { .. }), "{bad:?}");
    /// }
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn new(inner: S, namespace: impl Into<String>) -> Result<Self, CacheError> {
        let mut prefix = namespace.into();
        if prefix.is_empty() {
            return Err(CacheError::config(
                "a cache namespace must not be empty",
                None,
            ));
        }
        if prefix.contains(SEPARATOR) {
            return Err(CacheError::config(
                format!(
                    "the cache namespace {:?} contains {SEPARATOR:?}, the separator between \
                     namespace and key; namespaces with it could overlap",
                    crate::KeyName::new(&prefix)
                ),
                None,
            ));
        }
        prefix.push(SEPARATOR);
        Ok(NamespacedCacheService { inner, prefix })
    }

    /// The namespace, without the separator.
    ///
    /// ```
    /// let cache = cachet::NamespacedCacheService::new(cachet::MokaCacheService::default(), "acme")?;
    /// assert_eq!(cache.namespace(), "acme");
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn namespace(&self) -> &str {
        &self.prefix[..self.prefix.len() - SEPARATOR.len_utf8()]
    }

    /// The name the inner service stores `key` under: `namespace:key`.
    ///
    /// ```
    /// let cache = cachet::NamespacedCacheService::new(cachet::MokaCacheService::default(), "acme")?;
    /// assert_eq!(cache.stored_key("org:1"), "acme:org:1");
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn stored_key(&self, key: &str) -> String {
        let mut stored = String::with_capacity(self.prefix.len() + key.len());
        stored.push_str(&self.prefix);
        stored.push_str(key);
        stored
    }

    /// The wrapped service.
    ///
    /// ```
    /// let cache = cachet::NamespacedCacheService::new(cachet::MokaCacheService::default(), "acme")?;
    /// assert_eq!(cache.inner().entry_count(), 0);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// let cache = cachet::NamespacedCacheService::new(cachet::MokaCacheService::default(), "acme")?;
    /// let moka: cachet::MokaCacheService = cache.into_inner();
    /// # let _ = moka;
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for NamespacedCacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let namespace = &self.prefix[..self.prefix.len() - SEPARATOR.len_utf8()];
        f.debug_struct("NamespacedCacheService")
            .field("namespace", &namespace)
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
// Every method, defaulted ones included, is written out: a new one must be too.
#[deny(clippy::missing_trait_methods)]
impl<S: CacheService> CacheService for NamespacedCacheService<S> {
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        self.inner.get_bytes(&self.stored_key(key)).await
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        self.inner.get_bytes_now(&self.stored_key(key))
    }

    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let stored: Vec<String> = keys.iter().map(|key| self.stored_key(key)).collect();
        let stored: Vec<&str> = stored.iter().map(String::as_str).collect();
        self.inner.get_many_bytes(&stored).await
    }

    fn get_shared_now(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        self.inner.get_shared_now(&self.stored_key(key), decoder)
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        self.inner
            .set_bytes(&self.stored_key(key), value, ttl_secs)
            .await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.invalidate(&self.stored_key(key)).await
    }

    fn codec(&self) -> &dyn Codec {
        self.inner.codec()
    }

    /// The inner store's scope mixed with the namespace: every clone of this namespace over
    /// one store shares loads (its keys are the same stored keys), another namespace never
    /// does (its `k` is another stored key). The top bit is set, as for the backends' own
    /// scopes, so it is never an address.
    fn flight_scope(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // `DefaultHasher::new()` has fixed keys: the same scope for the same input.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.inner.flight_scope().hash(&mut hasher);
        self.prefix.hash(&mut hasher);
        hasher.finish() | (1 << 63)
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        self.inner.invalidate_prefix(&self.stored_key(prefix)).await
    }

    /// On this service itself (not forwarded): the record goes where its reads look.
    async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        crate::service::tags::invalidate(self, tag).await
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        self.inner.lease(&self.stored_key(key), request).await
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        self.inner
            .set_leased(&self.stored_key(key), lease, value, ttl_secs)
            .await
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.inner.release_lease(&self.stored_key(key), lease).await
    }

    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        self.inner
            .replace_if(&self.stored_key(key), version, value, ttl_secs)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheServiceExt, MokaCacheService};

    #[test]
    fn namespace_validation() {
        for good in [
            "a",
            "ab",
            "tenant-42",
            "*",
            "[x]",
            "a\\",
            "東京",
            " ",
            "{acme}",
        ] {
            let cache = NamespacedCacheService::new(MokaCacheService::default(), good).unwrap();
            assert_eq!(cache.namespace(), good);
            assert_eq!(cache.stored_key("k"), format!("{good}:k"));
        }
        for bad in ["", ":", "a:", ":a", "a:b", "a::b"] {
            let err = NamespacedCacheService::new(MokaCacheService::default(), bad).unwrap_err();
            assert!(matches!(err, CacheError::Config { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn debug_shows_the_namespace() {
        let cache = NamespacedCacheService::new(MokaCacheService::default(), "acme").unwrap();
        let debug = format!("{cache:?}");
        assert!(
            debug.starts_with("NamespacedCacheService { namespace: \"acme\""),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn fast_path_is_forwarded_under_the_namespace() {
        let moka = MokaCacheService::default();
        let cache = NamespacedCacheService::new(moka.clone(), "ns").unwrap();
        cache.set("k", &1, None).await.unwrap();
        assert_eq!(
            cache.get_bytes_now("k").transpose().unwrap(),
            Some(Some(Bytes::from_static(b"1")))
        );
        assert_eq!(cache.get_bytes_now("ns:k").transpose().unwrap(), Some(None));
        assert_eq!(moka.get::<i32>("ns:k").await.unwrap(), Some(1));
    }
}
