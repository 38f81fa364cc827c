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
//! ## Features
//!
//! The default build is the whole product; `default-features = false` is the lean
//! in-memory core, and each feature adds one layer:
//!
//! | feature | adds | pulls in |
//! | --- | --- | --- |
//! | (core, always) | the contract ([`CacheService`], [`CacheServiceExt`]), [`codec`], errors, [`MokaCacheService`], cache-aside ([`load`]), [`NamespacedCacheService`], in-process locks | moka, serde_json, erased-serde, rmp-serde, tokio |
//! | `redis` (default) | [`RedisCacheService`] (standalone, Cluster, Sentinel, TLS), [`TieredCacheService`], [`RedisConcurrencyService`] | fred, rustls |
//! | `encryption` (default) | [`EncryptedCacheService`] | aes-gcm-siv, aes-gcm |
//! | `tenancy` (default) | [`OrgResolver`], [`TokenCache`] | sha2, hmac |
//! | `axum` | `middleware`: the org layer for axum (implies `tenancy`) | axum, tower |
//! | `mock` | `MockCacheService` for apps' unit tests | mockall |
//! | `conformance` | `conformance`: the behaviour suite for backends and decorators | |
//! | `future-slots` | reused slots for the Redis backend's boxed futures (implies `redis`) | |
//! | `metrics` | metrics through the `metrics` facade, hit/miss counts in `stats()` ([`observe`]) | metrics |
//! | `tracing` | a span per operation ([`observe`]) | tracing |
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
#![cfg_attr(docsrs, feature(doc_cfg))]

// Layers, bottom up. The contract (`error`, `codec`, `service`) depends on nothing above it;
// `ext` and `load` are built on it; backends and decorators implement it; `tenancy` uses the
// public API only.
//
// `service` must be declared before `backend` (rustfmt sorts each group of `mod` lines, so
// they are two groups): `enum_dispatch` writes the `Cache` enum's impl where the second of
// its two attributes is seen, and so writes it beside the enum, not inside the contract.
pub mod codec;
mod error;
pub mod observe;
pub mod service;

mod ext;
pub mod load;

pub mod backend;
mod config;
pub mod decorate;
pub mod lock;
#[cfg(feature = "tenancy")]
pub mod tenancy;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "future-slots")]
#[allow(unsafe_code)] // type-erased futures in reused heap slots; see the module docs
mod future_slot;
#[cfg(feature = "mock")]
mod mock;

// The paths of the first release, kept: `cachet::org`, `cachet::token`, `cachet::middleware`,
// `cachet::envelope`, `cachet::invalidation`.
#[cfg(feature = "redis")]
pub use backend::tiered::{envelope, invalidation};
#[cfg(feature = "axum")]
pub use tenancy::axum as middleware;
#[cfg(feature = "tenancy")]
pub use tenancy::{org, token};

pub use backend::{Cache, MokaCacheService, MokaCacheServiceBuilder};
#[cfg(feature = "redis")]
pub use backend::{
    RedisCacheService, RedisCacheServiceBuilder, RedisConnection, RedisConnectionBuilder,
    TieredCacheService, TieredCacheServiceBuilder, redact_url,
};
pub use config::{CacheSettings, build_cache_service};
pub use decorate::NamespacedCacheService;
#[cfg(feature = "encryption")]
pub use decorate::{EncryptedCacheService, EncryptedEnvelope, EncryptionKey, EncryptionKeys};
pub use error::{BoxError, CacheError, IntegrityProblem, KeyName, LockError, WithLockError};
pub use ext::CacheServiceExt;
pub use load::{LoadError, LoadOptions, LoadSource, Loaded};
#[cfg(feature = "redis")]
pub use lock::RedisConcurrencyService;
pub use lock::{
    Concurrency, ConcurrencyService, ConcurrencyServiceExt, LocalConcurrencyService, LockGuard,
    LockOptions, build_concurrency_service,
};
#[cfg(feature = "axum")]
pub use middleware::{OrgLayer, OrgRejection, OrgService, OrgSource, ResolvedOrg};
#[cfg(feature = "mock")]
pub use mock::MockCacheService;
pub use observe::CacheStats;
#[cfg(feature = "tenancy")]
pub use org::{OrgIdentity, OrgResolver, OrgStore, Resolved};
pub use service::{CacheService, DEFAULT_TTL_SECS, MAX_TTL_SECS};
#[cfg(feature = "tenancy")]
pub use token::{TokenCache, ValidToken};

/// The README's examples, compiled and run as doc tests (they use every default layer).
#[cfg(all(
    doctest,
    feature = "redis",
    feature = "encryption",
    feature = "tenancy"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
