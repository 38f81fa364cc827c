//! Decorators: services that wrap any [`CacheService`](crate::CacheService) and are services
//! themselves, so they stack and go behind `Arc<dyn CacheService>` like a backend.
//!
//! - [`EncryptedCacheService`]: AES-256-GCM-SIV around every value, the key name bound as
//!   associated data, key ids for rotation ([`EncryptionKeys`]).
//! - [`NamespacedCacheService`]: every key under `namespace:`, and prefix invalidation that
//!   stays inside the namespace.
//!
//! ```
//! use std::sync::Arc;
//! use cachet::{
//!     CacheService, CacheServiceExt, EncryptedCacheService, EncryptionKeys, MokaCacheService,
//!     NamespacedCacheService,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
//! let shared = MokaCacheService::default(); // a RedisCacheService in production
//! let keys = EncryptionKeys::new(1, [7u8; 32]);
//! // Encryption inside the namespace: each value is bound to its full stored name.
//! let acme: Arc<dyn CacheService> = Arc::new(NamespacedCacheService::new(
//!     EncryptedCacheService::new(shared.clone(), keys),
//!     "acme",
//! )?);
//! acme.set("sso", &"client-secret", None).await?;
//! assert_eq!(acme.get::<String>("sso").await?.as_deref(), Some("client-secret"));
//! assert!(shared.get_bytes("acme:sso").await?.is_some());
//! # Ok(()) }
//! ```

#[cfg(feature = "encryption")]
pub mod encrypted;
pub mod namespaced;

#[cfg(feature = "encryption")]
pub use encrypted::{EncryptedCacheService, EncryptedEnvelope, EncryptionKey, EncryptionKeys};
pub use namespaced::NamespacedCacheService;
