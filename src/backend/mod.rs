//! The backends, and [`Cache`], the enum over them that the builders return.

pub mod moka;
pub mod redis;
mod redis_config;
pub mod redis_lease;
pub mod tiered;

use enum_dispatch::enum_dispatch;

pub use moka::{MokaCacheService, MokaCacheServiceBuilder};
pub use redis::{RedisCacheService, RedisCacheServiceBuilder};
pub use redis_config::redact_url;
pub use tiered::{TieredCacheService, TieredCacheServiceBuilder};

/// Every backend in one type: calls dispatch through a `match`, not a vtable.
///
/// Use it where the backend is chosen at run time but a concrete type is wanted; wrap it as
/// `Arc::new(cache) as Arc<dyn CacheService>` where a trait object is wanted.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{Cache, CacheService, CacheServiceExt, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = Cache::from(MokaCacheService::default());
/// cache.set("plan:acme", &"pro", None).await?;
/// let shared: Arc<dyn CacheService> = Arc::new(cache);
/// assert_eq!(shared.get::<String>("plan:acme").await?.as_deref(), Some("pro"));
/// # Ok(()) }
/// ```
#[enum_dispatch(CacheService)]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Cache {
    /// The in-process backend.
    Moka(MokaCacheService),
    /// Redis or Valkey: standalone, Cluster or Sentinel.
    Redis(RedisCacheService),
    /// An in-memory L1 per instance in front of Redis, invalidated over pub/sub.
    Tiered(TieredCacheService),
}
