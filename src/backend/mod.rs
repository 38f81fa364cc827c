//! The backends, and [`Cache`], the enum over them that the builders return.

pub mod moka;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod tiered;

use enum_dispatch::enum_dispatch;

pub use moka::{MokaCacheService, MokaCacheServiceBuilder};
#[cfg(feature = "redis")]
pub use redis::{
    RedisCacheService, RedisCacheServiceBuilder, RedisConnection, RedisConnectionBuilder,
    redact_url,
};
#[cfg(feature = "redis")]
pub use tiered::{TieredCacheService, TieredCacheServiceBuilder};
// `enum_dispatch` writes `impl CacheService for Cache` here, after the trait (declared first
// in lib.rs) was seen: the generated code names these types.
#[allow(unused_imports)]
use crate::CacheError;
#[allow(unused_imports)]
use crate::codec::Codec;
#[allow(unused_imports)]
use crate::service::{
    CacheService, Decoder, Lease, LeaseRead, LeaseRequest, SharedValue, StoredVersion,
};
#[allow(unused_imports)]
use bytes::Bytes;

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
    #[cfg(feature = "redis")]
    Redis(RedisCacheService),
    /// An in-memory L1 per instance in front of Redis, invalidated over pub/sub.
    #[cfg(feature = "redis")]
    Tiered(TieredCacheService),
}
