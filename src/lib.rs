//! # cachet
//!
//! One typed cache API for multi-tenant web services, usable as `Arc<dyn CacheService>`.
//!
//! - [`CacheService`]: the object-safe, byte-level trait every backend implements
//!   (`get_bytes`, `set_bytes`, `invalidate`, `invalidate_prefix`).
//! - [`CacheServiceExt`]: the typed helpers (`get::<T>`, `set`, and cache-aside
//!   [`get_or_load`](CacheServiceExt::get_or_load) with a single flight, negative caching and
//!   fail-safe) for every service, `dyn CacheService` included.
//! - [`OrgResolver`] (org/tenant contexts under `org:<slug>` and `org:id:<id>`, from the
//!   app's [`OrgStore`]) and [`TokenCache`] (validated tokens under the hash of the token).
//! - [`MokaCacheService`]: the in-process backend (moka), with per-entry TTL and capacity in
//!   entries or bytes.
//! - [`Cache`]: the enum over the backends.
//! - [`EncryptedCacheService`] and [`NamespacedCacheService`]: decorators around any service
//!   (AES-256-GCM-SIV values with authenticated expiry and key rotation; a tenant namespace), see [`decorate`].
//!
//! ```
//! use std::sync::Arc;
//! use cachet::{CacheService, CacheServiceExt, MokaCacheService};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! struct OrgContext { slug: String, name: String, features: Vec<String> }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cachet::CacheError> {
//! let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
//! let ctx = OrgContext { slug: "acme".into(), name: "Acme".into(), features: vec!["sso".into()] };
//!
//! cache.set("org:acme", &ctx, Some(300)).await?;        // ttl_secs: None = default TTL
//! let hit: Option<OrgContext> = cache.get::<OrgContext>("org:acme").await?;
//! assert_eq!(hit.as_ref(), Some(&ctx));
//!
//! cache.invalidate("org:acme").await?;
//! let removed: u64 = cache.invalidate_prefix("org:").await?;
//! assert_eq!(removed, 0);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
// The one module with `unsafe` code (`future_slot`, behind the `future-slots` feature) opts in
// below.
#![deny(unsafe_code)]

pub mod backend;
pub mod codec;
mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod decorate;
pub mod envelope;
mod error;
#[cfg(feature = "future-slots")]
#[allow(unsafe_code)] // type-erased futures in reused heap slots; see the module docs
mod future_slot;
pub mod invalidation;
pub mod load;
pub mod lock;
#[cfg(feature = "axum")]
pub mod middleware;
#[cfg(feature = "mock")]
mod mock;
pub mod org;
pub mod service;
pub mod token;

pub use backend::{
    Cache, MokaCacheService, MokaCacheServiceBuilder, RedisCacheService, RedisCacheServiceBuilder,
    TieredCacheService, TieredCacheServiceBuilder, redact_url,
};
pub use config::{CacheSettings, build_cache_service};
pub use decorate::{
    EncryptedCacheService, EncryptedEnvelope, EncryptionKey, EncryptionKeys, NamespacedCacheService,
};
pub use error::{BoxError, CacheError, KeyName, LockError, WithLockError};
pub use load::{LoadError, LoadOptions, LoadSource, Loaded};
pub use lock::{
    Concurrency, ConcurrencyService, ConcurrencyServiceExt, LocalConcurrencyService, LockGuard,
    LockOptions, RedisConcurrencyService, build_concurrency_service,
};
#[cfg(feature = "axum")]
pub use middleware::{OrgLayer, OrgRejection, OrgService, OrgSource, ResolvedOrg};
#[cfg(feature = "mock")]
pub use mock::MockCacheService;
pub use org::{OrgIdentity, OrgResolver, OrgStore, Resolved};
pub use service::{CacheService, CacheServiceExt, DEFAULT_TTL_SECS, MAX_TTL_SECS};
pub use token::{TokenCache, ValidToken};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
