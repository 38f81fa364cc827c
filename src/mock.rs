//! `MockCacheService`: a mockall double of [`CacheService`] for an app's own unit tests.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{CacheError, CacheService};

mockall::mock! {
    /// A [`CacheService`] whose answers a test sets (feature `mock`).
    ///
    /// Expectations are on the byte-level methods; the typed helpers of
    /// [`CacheServiceExt`](crate::CacheServiceExt) call them, so a test can check what an app
    /// reads and writes, or make the cache fail.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use cachet::{CacheError, CacheService, CacheServiceExt, MockCacheService};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut mock = MockCacheService::new();
    /// mock.expect_get_bytes()
    ///     .withf(|key| key == "org:acme")
    ///     .times(1)
    ///     .returning(|_| Ok(Some(Bytes::from_static(br#""pro""#))));
    /// mock.expect_set_bytes()
    ///     .returning(|key, _, _| Err(CacheError::backend("mock", "set", key, "down")));
    ///
    /// let cache: Arc<dyn CacheService> = Arc::new(mock);
    /// assert_eq!(cache.get::<String>("org:acme").await.unwrap().as_deref(), Some("pro"));
    /// assert!(cache.set("org:acme", &"free", None).await.is_err());
    /// # }
    /// ```
    #[derive(Debug)]
    pub CacheService {}

    #[async_trait]
    impl CacheService for CacheService {
        async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError>;
        async fn set_bytes(&self, key: &str, value: Bytes, ttl_secs: Option<u64>) -> Result<(), CacheError>;
        async fn invalidate(&self, key: &str) -> Result<(), CacheError>;
        async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError>;
    }
}
