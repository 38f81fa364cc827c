//! Building a [`MokaCacheService`]: capacity, the "not found" markers' share, codec, default
//! TTL; and the two moka spaces with their eviction listener.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache as MokaCache;

use super::index::Index;
use super::{
    Capacity, DEFAULT_MAX_ENTRIES, DEFAULT_NEGATIVE_SHARE, ENTRY_OVERHEAD_BYTES, Entry,
    EntryExpiry, MokaCacheService, WriteStripes,
};
use crate::CacheError;
use crate::codec::{Codec, Json};
use crate::observe::{Backend, Instruments};
use crate::service::{DEFAULT_TTL_SECS, check_default_ttl};

/// One moka cache bounded by `capacity`, each entry living for its own TTL; what it evicts
/// or expires leaves `index` too.
fn space(
    capacity: Capacity,
    index: &Arc<Index<Entry>>,
) -> MokaCache<Arc<str>, Entry, ahash::RandomState> {
    let index = Arc::clone(index);
    let builder = MokaCache::builder()
        .expire_after(EntryExpiry)
        .eviction_listener(move |key: Arc<Arc<str>>, entry: Entry, cause| {
            // Explicit removals and replacements are the backend's own writes, which
            // changed the index themselves (and may already have put a newer entry there).
            if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                index.remove_if(&key, |held| Arc::ptr_eq(&held.0, &entry.0));
            }
        });
    // aHash with per-process random keys: several times faster than std's SipHash on
    // short keys (every get, set and prefix scan hashes), and still resistant to
    // crafted-collision floods from tenant-chosen keys.
    let hasher = ahash::RandomState::new();
    match capacity {
        Capacity::Entries(n) => builder.max_capacity(n).build_with_hasher(hasher),
        Capacity::Bytes(n) => builder
            .max_capacity(n)
            .weigher(|key: &Arc<str>, entry: &Entry| {
                let weight = key.len() as u64 + entry.value.len() as u64 + ENTRY_OVERHEAD_BYTES;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .build_with_hasher(hasher),
    }
}

/// Builds a [`MokaCacheService`]: capacity in entries or in bytes, default TTL.
///
/// ```
/// use cachet::MokaCacheService;
///
/// let by_count = MokaCacheService::builder().max_entries(50_000).build().unwrap();
/// let by_size = MokaCacheService::builder().max_bytes(256 << 20).default_ttl_secs(60).build().unwrap();
/// assert!(MokaCacheService::builder().default_ttl_secs(0).build().is_err());
/// # let _ = (by_count, by_size);
/// ```
#[derive(Debug, Clone)]
pub struct MokaCacheServiceBuilder {
    capacity: Capacity,
    negative_entries: Option<u64>,
    default_ttl_secs: u64,
    codec: Arc<dyn Codec>,
}

impl Default for MokaCacheServiceBuilder {
    fn default() -> Self {
        MokaCacheServiceBuilder {
            capacity: Capacity::Entries(DEFAULT_MAX_ENTRIES),
            negative_entries: None,
            default_ttl_secs: DEFAULT_TTL_SECS,
            codec: Arc::new(Json),
        }
    }
}

impl MokaCacheServiceBuilder {
    /// Bounds the cache to `n` entries, whatever their size (the default, 10 000).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.capacity = Capacity::Entries(n);
        self
    }

    /// Bounds the cache to about `n` bytes of keys and values (each entry also counts 64
    /// bytes of bookkeeping), so that a few huge values cannot exhaust memory. Replaces
    /// [`max_entries`](Self::max_entries). A single value larger than `n` is not kept.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.capacity = Capacity::Bytes(n);
        self
    }

    /// Bounds the space of cached "not found" markers to `n` entries, apart from the
    /// values' capacity. By default it gets a tenth of the capacity
    /// ([`DEFAULT_NEGATIVE_SHARE`]) in the capacity's unit: 1,000 markers for 10,000
    /// entries, 6.4 MB for 64 MB. A flood of unique unknown keys evicts older markers only.
    ///
    /// ```
    /// use cachet::{CacheService, MokaCacheService};
    /// use cachet::load::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
    /// let cache = MokaCacheService::builder().max_entries(100).max_negative_entries(10).build()?;
    /// cache.set_bytes("org:acme", "{}".into(), None).await?;
    /// for n in 0..1_000 {
    ///     // What a negatively cached lookup of an unknown slug stores.
    ///     cache.set_bytes(&format!("org:bogus-{n}"), Frame::absent(u64::MAX).encode(), None).await?;
    /// }
    /// cache.run_pending_tasks();
    /// assert!(cache.negative_entry_count() <= 10);
    /// assert!(cache.get_bytes("org:acme").await?.is_some());
    /// # Ok(()) }
    /// ```
    pub fn max_negative_entries(mut self, n: u64) -> Self {
        self.negative_entries = Some(n);
        self
    }

    /// How the typed helpers encode values for this cache ([`Json`] by default; see
    /// [`codec`](crate::codec) for [`MessagePack`](crate::codec::MessagePack)).
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// The TTL for a `set` that passes `None` (default 300 s; `1..=MAX_TTL_SECS`).
    pub fn default_ttl_secs(mut self, secs: u64) -> Self {
        self.default_ttl_secs = secs;
        self
    }

    /// Builds the service; a default TTL of 0 or above [`MAX_TTL_SECS`](crate::MAX_TTL_SECS) is
    /// [`CacheError::Config`].
    pub fn build(self) -> Result<MokaCacheService, CacheError> {
        check_default_ttl(self.default_ttl_secs)?;
        Ok(self.build_unchecked())
    }

    /// The cache as a tiered instance's L1: its operations are labelled `l1` (the tiered
    /// service counts its reads), and no `memory` series is registered for it.
    #[cfg(feature = "redis")]
    pub(crate) fn build_l1(self) -> Result<MokaCacheService, CacheError> {
        check_default_ttl(self.default_ttl_secs)?;
        Ok(self.build_as(Backend::L1Store))
    }

    pub(super) fn build_unchecked(self) -> MokaCacheService {
        self.build_as(Backend::Memory)
    }

    fn build_as(self, backend: Backend) -> MokaCacheService {
        let negative_capacity = match (self.negative_entries, self.capacity) {
            (Some(n), _) => Capacity::Entries(n),
            (None, Capacity::Entries(n)) => Capacity::Entries((n / DEFAULT_NEGATIVE_SHARE).max(1)),
            (None, Capacity::Bytes(n)) => Capacity::Bytes((n / DEFAULT_NEGATIVE_SHARE).max(1)),
        };
        let index = Arc::new(Index::new());
        MokaCacheService {
            cache: space(self.capacity, &index),
            negatives: space(negative_capacity, &index),
            index,
            default_ttl: Duration::from_secs(self.default_ttl_secs),
            capacity: self.capacity,
            scope: crate::service::new_flight_scope(),
            stripes: Arc::new(WriteStripes::new()),
            instruments: Instruments::new(backend, None),
            resets: Arc::new(AtomicU64::new(0)),
            codec: self.codec,
        }
    }
}
