//! Org (tenant) configuration, cache-aside: the app supplies its store ([`OrgStore`]) and
//! its context type; [`OrgResolver`] caches contexts under `org:<slug>` and `org:id:<id>`.
//!
//! - Both keys hold the same context: a load by slug also fills the id key and the other
//!   way round, and [`OrgResolver::invalidate_org`] clears both. Through a
//!   [`TieredCacheService`](crate::TieredCacheService) the invalidation reaches every
//!   instance.
//! - Concurrent misses of one org load it once per instance (single flight).
//! - Unknown slugs and ids are cached as "not found" for a short time (30 s by default), so
//!   that bogus slugs cannot hammer the database.
//! - Fail-safe (opt-in): when the store fails, the last known context is served for a
//!   bounded grace period, and [`Resolved::is_stale`] says so.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use bytes::Bytes;

use crate::load::{LeaseRead, LeaseRequest, LoadError, LoadOptions, LoadSource};
use crate::{CacheError, CacheService, CacheServiceExt, ConcurrencyService};

/// Default freshness of a cached org context: 300 seconds.
pub const DEFAULT_ORG_TTL_SECS: u64 = 300;
/// Default life of a cached "no such org": 30 seconds.
pub const DEFAULT_ORG_NEGATIVE_TTL_SECS: u64 = 30;
/// Default bound on one store call: 10 seconds.
pub const DEFAULT_ORG_LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest slug accepted: 63 characters (a DNS label, so a slug can be a subdomain).
pub const MAX_SLUG_LEN: usize = 63;
/// The longest id accepted: 128 characters.
pub const MAX_ID_LEN: usize = 128;
/// The longest slug or id accepted before slugs and ids got their own bounds.
#[deprecated(since = "0.2.0", note = "use MAX_SLUG_LEN or MAX_ID_LEN")]
pub const MAX_ORG_IDENT_LEN: usize = MAX_ID_LEN;

/// What an org context must say about itself: its slug and its id, which name its two cache
/// keys.
///
/// ```
/// use cachet::org::OrgIdentity;
///
/// struct Org { id: u64, slug: String }
///
/// impl OrgIdentity for Org {
///     fn org_slug(&self) -> &str { &self.slug }
///     fn org_id(&self) -> String { self.id.to_string() }
/// }
/// ```
pub trait OrgIdentity {
    /// The org's slug, as in `org:<slug>`.
    fn org_slug(&self) -> &str;
    /// The org's id, as in `org:id:<id>`.
    fn org_id(&self) -> String;
}

/// The app's source of truth for orgs (its database). `Ok(None)` means "no such org".
///
/// Implement it with `async fn`:
///
/// ```
/// use cachet::org::{OrgIdentity, OrgStore};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct OrgContext { id: String, slug: String, api_secret: String }
///
/// impl OrgIdentity for OrgContext {
///     fn org_slug(&self) -> &str { &self.slug }
///     fn org_id(&self) -> String { self.id.clone() }
/// }
///
/// struct Database;
///
/// impl OrgStore for Database {
///     type Context = OrgContext;
///     type Error = std::io::Error;
///
///     async fn load_by_slug(&self, slug: &str) -> Result<Option<OrgContext>, std::io::Error> {
///         Ok((slug == "acme").then(|| OrgContext {
///             id: "42".into(), slug: "acme".into(), api_secret: "s3cr3t".into(),
///         }))
///     }
///
///     async fn load_by_id(&self, id: &str) -> Result<Option<OrgContext>, std::io::Error> {
///         if id == "42" { self.load_by_slug("acme").await } else { Ok(None) }
///     }
/// }
/// ```
pub trait OrgStore: Send + Sync {
    /// The org context the app caches (decrypted secrets included: wrap the cache in an
    /// [`EncryptedCacheService`](crate::decorate) when it is shared).
    type Context: OrgIdentity + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The org with this slug, or `None`.
    fn load_by_slug(
        &self,
        slug: &str,
    ) -> impl Future<Output = Result<Option<Self::Context>, Self::Error>> + Send;

    /// The org with this id, or `None`.
    fn load_by_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Self::Context>, Self::Error>> + Send;
}

/// A resolved org context and where it came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Resolved<C> {
    /// The context, shared: on the in-memory backend and a tiered instance's L1, the same
    /// decoded value for every request until the entry changes (no decode per request; see
    /// [`get_shared`](crate::CacheServiceExt::get_shared)).
    pub context: Arc<C>,
    /// The cache, this call's store load, another caller's load, or fail-safe.
    pub source: LoadSource,
}

impl<C> Resolved<C> {
    /// Whether the store failed and this is the last known context (fail-safe).
    pub fn is_stale(&self) -> bool {
        self.source == LoadSource::Stale
    }
}

/// Why an org could not be resolved: the store failed (or timed out) with nothing usable
/// cached, or the slug or id is malformed ([`LoadError::Cache`] with
/// [`CacheError::InvalidArgument`]).
pub type OrgError<E> = LoadError<E>;

/// Resolves org contexts by slug or id through the cache (see the [module docs](self)).
///
/// ```
/// # use cachet::org::{OrgIdentity, OrgStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// # struct OrgContext { id: String, slug: String }
/// # impl OrgIdentity for OrgContext {
/// #     fn org_slug(&self) -> &str { &self.slug }
/// #     fn org_id(&self) -> String { self.id.clone() }
/// # }
/// # struct Database;
/// # impl OrgStore for Database {
/// #     type Context = OrgContext;
/// #     type Error = std::io::Error;
/// #     async fn load_by_slug(&self, slug: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok((slug == "acme").then(|| OrgContext { id: "42".into(), slug: "acme".into() }))
/// #     }
/// #     async fn load_by_id(&self, id: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok((id == "42").then(|| OrgContext { id: "42".into(), slug: "acme".into() }))
/// #     }
/// # }
/// use std::sync::Arc;
/// use std::time::Duration;
/// use cachet::{CacheService, LoadSource, MokaCacheService, OrgResolver};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
/// let orgs = OrgResolver::new(Arc::clone(&cache), Database)
///     .ttl_secs(300)
///     .fail_safe(Duration::from_secs(3600));
///
/// let acme = orgs.by_slug("acme").await?.expect("acme exists");
/// assert_eq!(acme.source, LoadSource::Loader);
/// // The same context is now cached under both keys.
/// assert_eq!(orgs.by_id("42").await?.unwrap().source, LoadSource::Cache);
/// assert!(orgs.by_slug("no-such-org").await?.is_none()); // cached as "not found" for 30 s
///
/// orgs.invalidate_org("acme", "42").await?;               // both keys, every instance
/// assert_eq!(orgs.by_slug("acme").await?.unwrap().source, LoadSource::Loader);
/// # Ok(()) }
/// ```
pub struct OrgResolver<S> {
    cache: Arc<dyn CacheService>,
    /// Shared with the loads, which run as tasks of their own (see `resolve`).
    store: Arc<S>,
    options: LoadOptions,
}

impl<S> fmt::Debug for OrgResolver<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgResolver")
            .field("cache", &self.cache)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The cache key of the org with this slug: `org:<slug>`.
///
/// ```
/// assert_eq!(cachet::org::slug_key("acme"), "org:acme");
/// ```
pub fn slug_key(slug: &str) -> String {
    format!("org:{slug}")
}

/// The cache key of the org with this id: `org:id:<id>`.
///
/// ```
/// assert_eq!(cachet::org::id_key("42"), "org:id:42");
/// ```
pub fn id_key(id: &str) -> String {
    format!("org:id:{id}")
}

/// Checks a slug or id taken from a request: 1 to `max` characters, each an ASCII letter,
/// digit, `-` or `_`. Nothing else gets near the store or the cache: no `/`, `.`, `\`,
/// `%`, `:`, glob characters, whitespace or non-ASCII look-alikes.
fn check_ident(what: &str, value: &str, max: usize) -> Result<(), CacheError> {
    let problem = if value.is_empty() {
        Some("is empty".to_owned())
    } else if value.len() > max {
        Some(format!(
            "is {} characters, longer than {max}",
            value.chars().count()
        ))
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            .map(|bad| {
                format!("contains {bad:?}: only ASCII letters, digits, '-' and '_' are allowed")
            })
    };
    match problem {
        Some(problem) => Err(CacheError::invalid_argument(
            value,
            format!("org {what} {problem}"),
        )),
        None => Ok(()),
    }
}

/// The canonical form of a slug: checked (1 to [`MAX_SLUG_LEN`] ASCII letters, digits, `-`
/// and `_`) and lowercased. [`OrgResolver`] caches, loads and invalidates by this form, so
/// `Acme` and `ACME` share one entry and one invalidation, and the store is handed the
/// canonical slug. Anything else is [`CacheError::InvalidArgument`], before the store or the
/// cache is touched. Apps that key other things by slug can use it too.
///
/// ```
/// use cachet::org::canonical_slug;
///
/// assert_eq!(canonical_slug("Acme-Corp_2")?, "acme-corp_2");
/// for bad in ["../../admin", "a/b", "a%2Fb", "a:b", "*", "", "ａcme"] {
///     assert!(canonical_slug(bad).is_err(), "{bad}");
/// }
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub fn canonical_slug(slug: &str) -> Result<String, CacheError> {
    check_ident("slug", slug, MAX_SLUG_LEN)?;
    Ok(slug.to_ascii_lowercase())
}

/// The canonical form of an id: checked (1 to [`MAX_ID_LEN`] ASCII letters, digits, `-` and
/// `_`) and otherwise unchanged (ids are compared exactly: lowercase them first if your
/// store treats them case-insensitively).
///
/// ```
/// use cachet::org::canonical_id;
///
/// assert_eq!(canonical_id("42")?, "42");
/// assert!(canonical_id("4/2").is_err());
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub fn canonical_id(id: &str) -> Result<String, CacheError> {
    check_ident("id", id, MAX_ID_LEN)?;
    Ok(id.to_owned())
}

/// Checks a slug the way [`OrgResolver::by_slug`] does before it reads the cache (see
/// [`canonical_slug`], which also gives the form it is cached under). A malformed slug is
/// [`CacheError::InvalidArgument`]. Use it to tell a bad identifier from a request apart
/// from other errors before resolving.
///
/// ```
/// use cachet::org::validate_slug;
///
/// assert!(validate_slug("acme").is_ok());
/// assert!(validate_slug("id:42").is_err());
/// assert!(validate_slug("ac me").is_err());
/// ```
pub fn validate_slug(slug: &str) -> Result<(), CacheError> {
    check_ident("slug", slug, MAX_SLUG_LEN)
}

/// Checks an id the way [`OrgResolver::by_id`] does (see [`canonical_id`]).
///
/// ```
/// use cachet::org::validate_id;
///
/// assert!(validate_id("tenant-42").is_ok());
/// assert!(validate_id("tenant:42").is_err());
/// assert!(validate_id("").is_err());
/// ```
pub fn validate_id(id: &str) -> Result<(), CacheError> {
    check_ident("id", id, MAX_ID_LEN)
}

impl<S: OrgStore + 'static> OrgResolver<S> {
    /// A resolver over `cache` and the app's `store`: contexts fresh for 300 s, unknown
    /// orgs cached for 30 s, no fail-safe, store calls bounded to 10 s.
    pub fn new(cache: Arc<dyn CacheService>, store: S) -> Self {
        OrgResolver {
            cache,
            store: Arc::new(store),
            options: LoadOptions::default()
                .ttl_secs(DEFAULT_ORG_TTL_SECS)
                .negative_ttl_secs(DEFAULT_ORG_NEGATIVE_TTL_SECS)
                .load_timeout(DEFAULT_ORG_LOAD_TIMEOUT),
        }
    }

    /// How long a context is fresh, in seconds (at least 1).
    pub fn ttl_secs(self, secs: u64) -> Self {
        self.with_options(|o| o.ttl_secs(secs))
    }

    /// How long "no such org" is cached (`None`: not cached).
    pub fn negative_ttl_secs(self, secs: Option<u64>) -> Self {
        self.with_options(|o| match secs {
            Some(secs) => o.negative_ttl_secs(secs),
            None => o.no_negative_caching(),
        })
    }

    /// Serve the last known context for up to `grace` past its TTL when the store fails.
    pub fn fail_safe(self, grace: Duration) -> Self {
        self.with_options(|o| o.fail_safe(grace))
    }

    /// Reload a context in the background once it is past `fraction` (in `(0, 1)`) of its
    /// TTL, so that no request waits for the store when a hot org's entry ends
    /// ([`LoadOptions::eager_refresh`]): one reload per key in the fleet, the cached context
    /// served meanwhile, its result dropped if the org was invalidated while it ran.
    ///
    /// ```
    /// # use cachet::{MokaCacheService, OrgResolver, OrgStore, OrgIdentity};
    /// # use std::sync::Arc;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Ctx { id: String, slug: String }
    /// # impl OrgIdentity for Ctx { fn org_id(&self) -> String { self.id.clone() } fn org_slug(&self) -> &str { &self.slug } }
    /// # struct Db;
    /// # impl OrgStore for Db {
    /// #     type Context = Ctx; type Error = std::io::Error;
    /// #     async fn load_by_slug(&self, _: &str) -> Result<Option<Ctx>, std::io::Error> { Ok(None) }
    /// #     async fn load_by_id(&self, _: &str) -> Result<Option<Ctx>, std::io::Error> { Ok(None) }
    /// # }
    /// let orgs = OrgResolver::new(Arc::new(MokaCacheService::default()), Db)
    ///     .ttl_secs(300)
    ///     .eager_refresh(0.8); // reloaded in the background after 240 s
    /// assert_eq!(orgs.options().eager_refresh_fraction(), Some(0.8));
    /// ```
    pub fn eager_refresh(self, fraction: f64) -> Self {
        self.with_options(|o| o.eager_refresh(fraction))
    }

    /// A store call slower than `timeout` no longer holds requests up when fail-safe has
    /// a last known context: they get it, and the call goes on in the background up to the
    /// load timeout ([`LoadOptions::soft_timeout`]).
    pub fn soft_timeout(self, timeout: Duration) -> Self {
        self.with_options(|o| o.soft_timeout(timeout))
    }

    /// The longest one store call may take.
    pub fn load_timeout(self, timeout: Duration) -> Self {
        self.with_options(|o| o.load_timeout(timeout))
    }

    /// Single flight across instances under a lock of `locks`, for a cache service without
    /// leases. Every cache of this crate has leases, which give the same promise (many
    /// instances missing one org load it once in all) with no lock and no extra key; there,
    /// this changes nothing. See [`LoadOptions::distributed_single_flight`].
    #[deprecated(
        since = "0.2.0",
        note = "cache-aside leases give every cachet backend a cross-instance single flight; \
                the lock is used only by services without leases"
    )]
    #[allow(deprecated)]
    pub fn distributed_single_flight(self, locks: Arc<dyn ConcurrencyService>) -> Self {
        self.with_options(|o| o.distributed_single_flight(locks))
    }

    /// Any other change to how contexts are cached (the [`LoadOptions`] of every lookup).
    ///
    /// ```
    /// # use cachet::org::{OrgIdentity, OrgStore};
    /// # struct Db;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Ctx;
    /// # impl OrgIdentity for Ctx { fn org_slug(&self) -> &str { "" } fn org_id(&self) -> String { String::new() } }
    /// # impl OrgStore for Db { type Context = Ctx; type Error = std::io::Error;
    /// #   async fn load_by_slug(&self, _: &str) -> Result<Option<Ctx>, std::io::Error> { Ok(None) }
    /// #   async fn load_by_id(&self, _: &str) -> Result<Option<Ctx>, std::io::Error> { Ok(None) } }
    /// use std::{sync::Arc, time::Duration};
    /// use cachet::{MokaCacheService, OrgResolver};
    ///
    /// let orgs = OrgResolver::new(Arc::new(MokaCacheService::default()), Db)
    ///     .with_options(|o| o.fail_safe(Duration::from_secs(600)).fail_safe_throttle(Duration::from_secs(1)));
    /// assert_eq!(orgs.options().fail_safe_grace(), Some(Duration::from_secs(600)));
    /// ```
    pub fn with_options(mut self, change: impl FnOnce(LoadOptions) -> LoadOptions) -> Self {
        self.options = change(self.options);
        self
    }

    /// How contexts are cached.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The app's store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<dyn CacheService> {
        &self.cache
    }

    /// The org with this slug: `Ok(None)` when the store has no such org.
    pub async fn by_slug(
        &self,
        slug: &str,
    ) -> Result<Option<Resolved<S::Context>>, OrgError<S::Error>> {
        let slug = canonical_slug(slug)?;
        let other_key =
            |context: &S::Context| canonical_id(&context.org_id()).ok().map(|id| id_key(&id));
        let (store, owned) = (Arc::clone(&self.store), slug.clone());
        let load = move || async move { store.load_by_slug(&owned).await };
        self.resolve(slug_key(&slug), other_key, load).await
    }

    /// The org with this id: `Ok(None)` when the store has no such org.
    pub async fn by_id(
        &self,
        id: &str,
    ) -> Result<Option<Resolved<S::Context>>, OrgError<S::Error>> {
        let id = canonical_id(id)?;
        let other_key = |context: &S::Context| {
            canonical_slug(context.org_slug())
                .ok()
                .map(|s| slug_key(&s))
        };
        let (store, owned) = (Arc::clone(&self.store), id.clone());
        let load = move || async move { store.load_by_id(&owned).await };
        self.resolve(id_key(&id), other_key, load).await
    }

    /// Loads `key` through the cache; a fresh load also fills the context's other key with
    /// the same stored form (best effort: a failure only costs a later load).
    async fn resolve<F, Fut>(
        &self,
        key: String,
        other_key: impl Fn(&S::Context) -> Option<String>,
        load: F,
    ) -> Result<Option<Resolved<S::Context>>, OrgError<S::Error>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<S::Context>, S::Error>> + Send + 'static,
    {
        // Detached: an eager refresh, and a load past the soft timeout, run as tasks of
        // their own, so no request waits for them.
        let loaded = self
            .cache
            .get_or_load_detached(&key, &self.options, load)
            .await?;
        if let (Some(context), Some((stored, ttl))) = (&loaded.value, &loaded.written) {
            if let Some(other) = other_key(context) {
                self.fill_second_key(&key, &other, stored, *ttl).await;
            }
        }
        Ok(loaded.value.map(|context| Resolved {
            context,
            source: loaded.source,
        }))
    }

    /// After a load of `first` wrote `stored` under its lease: the same context under the
    /// org's other key, by the same lease rule, so that an `invalidate_org` meanwhile cannot
    /// be overwritten.
    ///
    /// 1. lease `second` (if it holds a value, or another load holds it, leave it alone);
    /// 2. write `stored` under that lease (dropped if `second` was touched since);
    /// 3. read `first` back from the store that holds the truth: if it no longer holds what
    ///    this load wrote, an invalidation overtook us after step 1 may have begun, so
    ///    `second` is removed again.
    ///
    /// With [`invalidate_org`](Self::invalidate_org) removing slug, id, then slug again,
    /// every interleaving ends with neither key holding a context from before the change
    /// (the argument is in the method's docs).
    async fn fill_second_key(&self, first: &str, second: &str, stored: &Bytes, ttl: Option<u64>) {
        let cache = &*self.cache;
        let lease = match cache.lease(second, &LeaseRequest::new()).await {
            Ok(LeaseRead::Granted(lease)) => lease,
            Ok(LeaseRead::Unsupported) => {
                // A service without leases: as before them.
                let _ = cache.set_bytes(second, stored.clone(), ttl).await;
                return;
            }
            _ => return,
        };
        let mut lease = lease;
        let written = cache.set_leased(second, &lease, stored.clone(), ttl).await;
        lease.disarm();
        if !matches!(written, Ok(true)) {
            let _ = cache.release_lease(second, &lease).await;
            return;
        }
        let intact = match cache.lease(first, &LeaseRequest::new()).await {
            Ok(LeaseRead::Value { value, .. }) => value == *stored,
            Ok(LeaseRead::Granted(mut check)) => {
                check.disarm();
                let _ = cache.release_lease(first, &check).await;
                false
            }
            _ => false,
        };
        if !intact {
            let _ = cache.invalidate(second).await;
        }
    }

    /// Removes the org's context under both keys (through a tiered cache, on every
    /// instance). Call it after the org changed in the store.
    ///
    /// It removes `org:<slug>`, then `org:id:<id>`, then `org:<slug>` again. A load of
    /// either key that read the store before the change, on any instance, then cannot leave
    /// either key holding the old context: its write-back under the first key's lease fails
    /// if any of these removals of that key came first; otherwise the removal of its
    /// second key that follows one of the first key (slug then id, or id then slug) either
    /// voids its lease on the second key or finds the check of step 3 in
    /// `fill_second_key` failing, or removes the second key after it was written.
    ///
    /// `slug` and `id` are canonicalized first ([`canonical_slug`], [`canonical_id`]): every
    /// spelling of the slug is removed. A malformed one is [`CacheError::InvalidArgument`]
    /// and nothing is removed.
    pub async fn invalidate_org(&self, slug: &str, id: &str) -> Result<(), CacheError> {
        let (slug_key, id_key) = (slug_key(&canonical_slug(slug)?), id_key(&canonical_id(id)?));
        crate::load::invalidate_in_flight(&*self.cache, &slug_key);
        crate::load::invalidate_in_flight(&*self.cache, &id_key);
        let first = self.cache.invalidate(&slug_key).await;
        let second = self.cache.invalidate(&id_key).await;
        let third = self.cache.invalidate(&slug_key).await;
        first.and(second).and(third)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_cannot_collide_with_id_keys() {
        assert!(validate_slug("acme").is_ok());
        assert!(validate_slug("id:42").is_err());
        assert!(validate_id("tenant-42").is_ok());
        for bad in ["", " acme", "ac\nme", "ac\u{0}me", "é"] {
            assert!(validate_slug(bad).is_err(), "{bad:?}");
        }
        let long = "a".repeat(MAX_SLUG_LEN + 1);
        let err = validate_slug(&long).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        assert!(validate_id(&"1".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id(&"1".repeat(MAX_ID_LEN + 1)).is_err());
    }
}
