//! [`CacheStats`]: a snapshot for apps without a metrics pipeline.

/// A snapshot of one in-memory cache or one tiered instance's L1, from
/// [`MokaCacheService::stats`](crate::MokaCacheService::stats) or
/// `TieredCacheService::stats`.
///
/// `hits` and `misses` are counted only with the `metrics` feature (which keeps the hot path
/// free of counting when it is off): `None` without it.
///
/// ```
/// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = MokaCacheService::default();
/// cache.set("org:acme", &"Acme", None).await?;
/// let _: Option<String> = cache.get("org:acme").await?;
/// let _: Option<String> = cache.get("org:nope").await?;
/// cache.run_pending_tasks(); // moka counts entries in batches
/// let stats = cache.stats();
/// assert_eq!(stats.entries, 1);
/// if cfg!(feature = "metrics") {
///     assert_eq!((stats.hits, stats.misses), (Some(1), Some(1)));
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Entries held now, cached "not found" markers included (approximate, as moka's count:
    /// writes reach its bookkeeping in batches).
    pub entries: u64,
    /// Their weight: bytes of keys and values plus 64 per entry when the cache is bounded in
    /// bytes, else the entry count.
    pub weighted_size: u64,
    /// Reads that found a value (a cached "not found" included) since the service was built.
    pub hits: Option<u64>,
    /// Reads that found nothing.
    pub misses: Option<u64>,
    /// Times the whole cache was cleared: [`clear`](crate::MokaCacheService::clear) calls,
    /// or a tiered instance's L1 resets.
    pub resets: u64,
}
