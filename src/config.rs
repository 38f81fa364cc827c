//! Choosing and building a backend from settings: Redis when a URL is given, in-memory
//! otherwise. Every failure is a [`CacheError`], never a panic.

use std::sync::Arc;

use crate::service::DEFAULT_TTL_SECS;
use crate::{CacheError, CacheService, MokaCacheService};
#[cfg(feature = "redis")]
use crate::{RedisCacheService, TieredCacheService};

/// Builds the cache an app injects: Redis at `redis_url` when one is given (default TTL
/// 300 s, connect timeout 5 s, command timeout 2 s), the in-memory backend otherwise.
///
/// A malformed URL is [`CacheError::Config`]; an unreachable server is
/// [`CacheError::Backend`] naming it, within the connect timeout.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = cachet::build_cache_service(None).await?; // in-memory
/// assert!(format!("{cache:?}").starts_with("MokaCacheService"));
/// assert!(cachet::build_cache_service(Some("not a url")).await.is_err());
/// # Ok(()) }
/// ```
pub async fn build_cache_service(
    redis_url: Option<&str>,
) -> Result<Arc<dyn CacheService>, CacheError> {
    CacheSettings {
        redis_url: redis_url.map(str::to_owned),
        default_ttl_secs: DEFAULT_TTL_SECS,
        l1_ttl_secs: None,
    }
    .build()
    .await
}

/// The settings that choose a backend, readable from the environment.
///
/// ```
/// use cachet::CacheSettings;
///
/// let settings = CacheSettings::from_vars(|name| match name {
///     "REDIS_URL" => Some("redis://127.0.0.1:6379".to_owned()),
///     "CACHE_DEFAULT_TTL_SECS" => Some("60".to_owned()),
///     _ => None,
/// })
/// .unwrap();
/// assert_eq!(settings.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
/// assert_eq!(settings.default_ttl_secs, 60);
/// assert_eq!(settings.l1_ttl_secs, None); // CACHE_L1_TTL_SECS unset: plain Redis
/// assert!(CacheSettings::from_vars(|_| Some("soon".to_owned())).is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `REDIS_URL`: Redis when set and not empty, in-memory otherwise.
    pub redis_url: Option<String>,
    /// `CACHE_DEFAULT_TTL_SECS`: the TTL of a `set` with `None` (default 300).
    pub default_ttl_secs: u64,
    /// `CACHE_L1_TTL_SECS`: with a Redis URL, put an in-memory L1 of at most this many
    /// seconds per entry in front of Redis ([`TieredCacheService`], invalidated over
    /// pub/sub). Choose it when many instances read the same hot keys; leave it unset for
    /// plain Redis.
    pub l1_ttl_secs: Option<u64>,
}

impl std::fmt::Debug for CacheSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheSettings")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("default_ttl_secs", &self.default_ttl_secs)
            .field("l1_ttl_secs", &self.l1_ttl_secs)
            .finish()
    }
}

impl CacheSettings {
    /// Reads `REDIS_URL`, `CACHE_DEFAULT_TTL_SECS` and `CACHE_L1_TTL_SECS` from the process
    /// environment.
    pub fn from_env() -> Result<Self, CacheError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `var` (for tests, or another source of settings).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CacheError> {
        let redis_url = var("REDIS_URL").filter(|url| !url.trim().is_empty());
        let seconds = |name: &str| -> Result<Option<u64>, CacheError> {
            match var(name) {
                None => Ok(None),
                Some(text) => text.trim().parse().map(Some).map_err(|e| {
                    CacheError::config(
                        format!("{name} must be a number of seconds, got {text:?}"),
                        Some(Box::new(e)),
                    )
                }),
            }
        };
        Ok(CacheSettings {
            redis_url,
            default_ttl_secs: seconds("CACHE_DEFAULT_TTL_SECS")?.unwrap_or(DEFAULT_TTL_SECS),
            l1_ttl_secs: seconds("CACHE_L1_TTL_SECS")?,
        })
    }

    /// Builds the backend these settings choose.
    pub async fn build(&self) -> Result<Arc<dyn CacheService>, CacheError> {
        match (&self.redis_url, self.l1_ttl_secs) {
            #[cfg(not(feature = "redis"))]
            (Some(_), _) => Err(CacheError::config(
                "REDIS_URL is set, but cachet was built without its `redis` feature",
                None,
            )),
            #[cfg(feature = "redis")]
            (Some(url), Some(l1_secs)) => {
                let redis = RedisCacheService::builder(url).default_ttl_secs(self.default_ttl_secs);
                Ok(Arc::new(
                    TieredCacheService::builder(redis)
                        .l1_max_ttl(std::time::Duration::from_secs(l1_secs))
                        .build()
                        .await?,
                ))
            }
            #[cfg(feature = "redis")]
            (Some(url), None) => Ok(Arc::new(
                RedisCacheService::new(url, self.default_ttl_secs).await?,
            )),
            (None, _) => Ok(Arc::new(
                MokaCacheService::builder()
                    .default_ttl_secs(self.default_ttl_secs)
                    .build()?,
            )),
        }
    }
}
