//! The in-process backend, on `moka` 0.12 (`sync` cache) and a read index of its own.

mod builder;
mod index;

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::Expiry;
use moka::sync::Cache as MokaCache;

use crate::codec::Codec;
use crate::codec::frame::now_ms;
use crate::load::{Frame, Lease, LeaseRead, LeaseRequest, LeaseToken, StoredVersion};
use crate::observe::{CacheStats, Instruments, Op, observed};
use crate::service::{DecodedSlot, Decoder, SharedValue, resolve_ttl};
use crate::{CacheError, CacheService};

use index::Index;

pub use builder::MokaCacheServiceBuilder;

/// Default capacity of [`MokaCacheService::default`], in entries.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;

/// The share of the capacity that cached "not found" markers get by default, in their own
/// space: one tenth (see [`MokaCacheServiceBuilder::max_negative_entries`]).
pub const DEFAULT_NEGATIVE_SHARE: u64 = 10;

/// What the byte weigher adds to each entry besides its key and value (bookkeeping).
const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// One stored value and how long it lives from its write; or a cache-aside lease on the
/// key (then `value` is empty and reads see a miss).
///
/// One `Arc`: a hit clones it, one reference count (the bytes, the lease and the decoded
/// slot are behind it, in one allocation).
#[derive(Clone)]
struct Entry(Arc<EntryData>);

/// What an [`Entry`] holds.
struct EntryData {
    /// What `value` decodes to, made by the first shared read (`get_shared`); first, so
    /// that a shared hit reads the reference count and the slot from one cache line.
    decoded: DecodedSlot,
    value: Bytes,
    /// When the entry stops being readable (its write plus its TTL). Reads check it; moka
    /// drops the entry around then (it counts `ttl` from the same write).
    deadline: Instant,
    ttl: Duration,
    /// Numbers the writes, so that a lease can replace exactly the value a caller saw.
    id: u64,
    lease: Option<LeaseMark>,
    /// A cached "not found" marker: lives in moka's space for those.
    negative: bool,
}

impl std::ops::Deref for Entry {
    type Target = EntryData;

    #[inline]
    fn deref(&self) -> &EntryData {
        &self.0
    }
}

/// A lease held on a key: its holder's token (it ends at the entry's deadline).
struct LeaseMark {
    token: LeaseToken,
}

impl Entry {
    fn value(value: Bytes, ttl: Duration) -> Self {
        let negative = Frame::is_absent_marker(&value);
        Entry::new(value, ttl, Instant::now(), None, negative)
    }

    /// A lease on the key for `ttl`, held by `token` (an empty value: reads see a miss).
    fn lease(token: LeaseToken, ttl: Duration, now: Instant) -> Self {
        Entry::new(Bytes::new(), ttl, now, Some(LeaseMark { token }), false)
    }

    fn new(
        value: Bytes,
        ttl: Duration,
        now: Instant,
        lease: Option<LeaseMark>,
        negative: bool,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Entry(Arc::new(EntryData {
            decoded: DecodedSlot::new(),
            value,
            // Past what `Instant` can hold (centuries): never, in practice.
            deadline: now
                .checked_add(ttl)
                .unwrap_or_else(|| now + Duration::from_secs(1 << 32)),
            ttl,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            lease,
            negative,
        }))
    }

    /// Whether the entry is still readable at `now`.
    #[inline]
    fn live(&self, now: Instant) -> bool {
        now < self.deadline
    }

    /// The value, unless this is a lease.
    fn readable(&self) -> Option<Bytes> {
        self.lease.is_none().then(|| self.value.clone())
    }
}

/// How moka learns what is read, for its eviction policy (TinyLFU: a new entry is admitted
/// only if read more often than the one it would evict). A miss is always handed to moka
/// (it counts the key, as a read of moka would; a miss is followed by a load anyway); a hit
/// only with probability one in `TOUCH_EVERY`, drawn at random (never in a fixed rhythm,
/// which a periodic access pattern could alias with): moka's ranking of the keys by reads
/// stays, at a thirty-second of the cost of telling it every hit (a moka read costs
/// several times an index read).
const TOUCH_EVERY: u64 = 32;

/// What a shared read finds under the index's lock.
enum Shared {
    Nothing,
    Leased,
    Kept(Option<SharedValue>, bool),
    Decode(Entry),
}

thread_local! {
    /// This thread's random draws (xorshift64) for picking the hits moka sees; each thread
    /// starts from its own seed.
    static DRAWS: Cell<u64> = Cell::new({
        static SEEDS: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
        SEEDS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) | 1
    });
}

/// Whether this hit is one of those moka sees.
#[inline(always)]
fn draw_touch() -> bool {
    DRAWS.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x % TOUCH_EVERY == 0
    })
}

/// Stripes of the per-key write lock: every change of a key (`set`, `invalidate`, lease
/// steps) holds its stripe, so that a lease check and the write it guards are one step.
/// Reads take no lock.
const WRITE_STRIPES: usize = 64;

/// Per-entry TTL: each entry lives for the TTL stored in it, counted from its last write
/// (moka passes the write's instant, so `set` needs no clock read of its own).
struct EntryExpiry;

impl Expiry<Arc<str>, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The in-process cache: one instance's memory, no server.
///
/// Each entry honours the TTL of its own `set` (moka's per-entry expiry), `None` meaning the
/// default TTL. Capacity is bounded in entries (default 10 000) or in bytes; past it, moka
/// evicts the least useful entries. Cloning gives another handle on the same cache.
///
/// Reads look only at a sharded index of the live entries kept beside moka (one hash, one
/// shard read lock, one probe), not at moka itself, whose read bookkeeping would cost
/// several times that; moka still decides what stays (it sees every miss and a random
/// thirty-second of the hits), and what it evicts or expires leaves the index too.
///
/// Cached "not found" markers (what [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with)
/// with negative caching writes for an unknown key, e.g. a bogus tenant slug) live in a
/// space of their own, bounded apart (by default a tenth of the capacity, in the same unit),
/// so that a flood of unique unknown keys evicts older markers, never the values.
///
/// ```
/// use cachet::{CacheService, CacheServiceExt, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = MokaCacheService::builder()
///     .max_bytes(64 * 1024 * 1024)
///     .default_ttl_secs(120)
///     .build()?;
/// cache.set("org:acme", &"Acme Corp", None).await?;          // lives 120 s
/// cache.set("org:id:42", &"Acme Corp", Some(10)).await?;     // lives 10 s
/// assert_eq!(cache.invalidate_prefix("org:").await?, 2);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MokaCacheService {
    /// Every live entry by key: what reads look at (see `index.rs`). An entry is in the
    /// index while moka holds it in one of the two spaces below: writes go to the index
    /// first and then to moka, under the key's write stripe, and moka's eviction listener
    /// removes from the index what moka evicts or expires (that very entry, not a newer
    /// one of the same key).
    index: Arc<Index<Entry>>,
    /// The values' space: moka bounds it, admits, evicts and expires.
    cache: MokaCache<Arc<str>, Entry, ahash::RandomState>,
    /// Cached "not found" markers, bounded apart from the values (see the type's docs). A
    /// key is in at most one of the two spaces once its write is done.
    negatives: MokaCache<Arc<str>, Entry, ahash::RandomState>,
    default_ttl: Duration,
    capacity: Capacity,
    /// Shared by every clone (they share the store): see [`CacheService::flight_scope`].
    scope: u64,
    stripes: Arc<WriteStripes>,
    instruments: Instruments,
    /// `clear` calls, for [`stats`](Self::stats).
    resets: Arc<AtomicU64>,
    /// The typed helpers' codec ([`CacheService::codec`]).
    codec: Arc<dyn Codec>,
}

struct WriteStripes {
    locks: Vec<Mutex<()>>,
    hasher: ahash::RandomState,
}

impl WriteStripes {
    fn new() -> Self {
        WriteStripes {
            locks: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let index = (self.hasher.hash_one(key) % WRITE_STRIPES as u64) as usize;
        // The guarded sections cannot panic halfway (an insert or a remove), so a poisoned
        // stripe is still consistent.
        self.locks[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every stripe, in order (no write runs while they are held).
    fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        self.locks
            .iter()
            .map(|lock| lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capacity {
    Entries(u64),
    Bytes(u64),
}

impl MokaCacheService {
    /// A builder with the defaults: 10 000 entries, 300 s default TTL.
    pub fn builder() -> MokaCacheServiceBuilder {
        MokaCacheServiceBuilder::default()
    }

    /// The TTL applied when a `set` passes `None`.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// How many entries the cache holds now, "not found" markers included (expired entries
    /// count until moka drops them, and moka applies evictions in batches: call
    /// [`run_pending_tasks`](Self::run_pending_tasks) first for a settled count).
    pub fn entry_count(&self) -> u64 {
        self.index.len()
    }

    /// How many of [`entry_count`](Self::entry_count) are cached "not found" markers, kept
    /// in their own bounded space.
    pub fn negative_entry_count(&self) -> u64 {
        self.negatives.entry_count()
    }

    /// A snapshot: entries, their weight, hits and misses (with the `metrics` feature) and
    /// `clear` calls. See [`CacheStats`].
    pub fn stats(&self) -> CacheStats {
        let (hits, misses) = self.instruments.reads();
        CacheStats {
            entries: self.entry_count(),
            weighted_size: self.cache.weighted_size() + self.negatives.weighted_size(),
            hits,
            misses,
            resets: self.resets.load(Ordering::Relaxed),
        }
    }

    /// What a read of `key` sees, uncounted (the tiered cache's L1 reads).
    #[cfg(feature = "redis")]
    pub(crate) fn peek(&self, key: &str) -> Option<Bytes> {
        self.read(key)
    }

    /// Stores `value` under `key` for `ttl` (any duration; used by the tiered cache's L1).
    #[cfg(feature = "redis")]
    pub(crate) fn insert_for(&self, key: &str, value: Bytes, ttl: Duration) {
        let _write = self.stripes.lock(key);
        self.put(key, Entry::value(value, ttl));
    }

    /// Stores `entry` under `key`: in the index, then in the moka space its value belongs
    /// to (a "not found" marker or a value), removing `key` from the other space if it was
    /// there. Call with the key's stripe held. The index goes first so that moka's listener,
    /// should moka turn the entry away at once (admission, or a value above the byte
    /// bound), finds it there to remove.
    fn put(&self, key: &str, entry: Entry) {
        let key: Arc<str> = Arc::from(key);
        let previous = self.index.insert(&key, entry.clone());
        // Moka holds a key only in the space of the index's entry (what moka drops leaves
        // the index; what the backend removes leaves both), so the other space needs a
        // removal only when the key changes kind.
        if let Some(previous) = previous
            && previous.negative != entry.negative
        {
            self.space(&previous).invalidate(&*key);
        }
        self.space(&entry).insert(key, entry);
    }

    /// The moka space `entry` lives in.
    fn space(&self, entry: &Entry) -> &MokaCache<Arc<str>, Entry, ahash::RandomState> {
        if entry.negative {
            &self.negatives
        } else {
            &self.cache
        }
    }

    /// The entry of `key`, if live.
    fn current(&self, key: &str) -> Option<Entry> {
        self.index
            .get(key)
            .filter(|entry| entry.live(Instant::now()))
    }

    /// The live entry of `key`, as a read finds it.
    #[inline(always)]
    fn lookup(&self, key: &str) -> Option<Entry> {
        match self.index.get(key) {
            Some(entry) if entry.live(Instant::now()) => {
                self.count_hit(key, entry.negative);
                Some(entry)
            }
            _ => {
                self.count_miss(key);
                None
            }
        }
    }

    /// Counts a hit of `key` (see [`TOUCH_EVERY`]).
    #[inline(always)]
    fn count_hit(&self, key: &str, negative: bool) {
        if draw_touch() {
            self.touch(key, negative);
        }
    }

    /// Tells moka `key` was read.
    #[cold]
    #[inline(never)]
    fn touch(&self, key: &str, negative: bool) {
        if negative {
            self.negatives.get(key);
        } else {
            self.cache.get(key);
        }
    }

    /// Counts a miss of `key` in both spaces (whichever the key's next write goes to).
    #[cold]
    #[inline(never)]
    fn count_miss(&self, key: &str) {
        self.cache.get(key);
        self.negatives.get(key);
    }

    /// What a read of `key` sees.
    fn read(&self, key: &str) -> Option<Bytes> {
        self.lookup(key)?.readable()
    }

    /// What a shared read of `key` sees: `None` when there is no readable entry, else the
    /// entry's value decoded as `decoder`'s type (kept in the entry from its first such read).
    #[inline(always)]
    pub(crate) fn read_shared(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        // A kept value is read under the shard's lock (no clone of the entry); a first read
        // takes the entry out and decodes it there.
        let now = Instant::now();
        let found = self.index.with(key, |entry| {
            if !entry.live(now) {
                return Shared::Nothing;
            }
            if entry.lease.is_some() {
                return Shared::Leased;
            }
            match entry.decoded.kept(decoder.type_id()) {
                Some(decoded) => Shared::Kept(decoded.value(now_ms), entry.negative),
                None => Shared::Decode(entry.clone()),
            }
        });
        match found.unwrap_or(Shared::Nothing) {
            Shared::Nothing => {
                self.count_miss(key);
                None
            }
            Shared::Leased => None,
            Shared::Kept(value, negative) => {
                self.count_hit(key, negative);
                Some(Ok(value))
            }
            Shared::Decode(entry) => {
                self.count_hit(key, entry.negative);
                Some(entry.decoded.value_now(key, &entry.value, decoder, now_ms))
            }
        }
    }

    /// Removes `key` from the index and from moka (call with the key's stripe held); the
    /// entry it had, if any. Moka holds the key only if the index does, in that entry's
    /// space (see `put`).
    fn remove(&self, key: &str) -> Option<Entry> {
        let removed = self.index.remove(key)?;
        self.space(&removed).invalidate(key);
        Some(removed)
    }

    /// Whether `token` holds the lease on `key` now (call with the key's stripe held).
    fn holds(&self, key: &str, token: &LeaseToken) -> bool {
        self.current(key)
            .is_some_and(|entry| matches!(&entry.lease, Some(mark) if mark.token == *token))
    }

    /// Removes the lease on `key` if `token` holds it.
    fn release_now(&self, key: &str, token: &LeaseToken) {
        let _write = self.stripes.lock(key);
        if self.holds(key, token) {
            self.remove(key);
        }
    }

    /// Removes `key` (the synchronous form of `invalidate`; used by the tiered cache's L1).
    #[cfg(feature = "redis")]
    pub(crate) fn forget(&self, key: &str) {
        let _write = self.stripes.lock(key);
        self.remove(key);
    }

    /// Drops every entry: reads stop seeing them at once (moka frees its copies lazily).
    pub fn clear(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        // With every stripe held no write is halfway (in the index but not yet in moka),
        // so none can outlive the clear in the index alone.
        let _writes = self.stripes.lock_all();
        self.cache.invalidate_all();
        self.negatives.invalidate_all();
        self.index.clear();
    }

    /// Applies pending evictions and bookkeeping now (moka otherwise does it in batches).
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
        self.negatives.run_pending_tasks();
    }
}

impl Default for MokaCacheService {
    /// 10 000 entries, 300 s default TTL.
    fn default() -> Self {
        MokaCacheServiceBuilder::default().build_unchecked()
    }
}

impl fmt::Debug for MokaCacheService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaCacheService")
            .field("capacity", &self.capacity)
            .field("default_ttl", &self.default_ttl)
            .field("entry_count", &self.cache.entry_count())
            .field("negative_entry_count", &self.negatives.entry_count())
            .finish()
    }
}

#[async_trait]
impl CacheService for MokaCacheService {
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        self.get_now(key)
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        Some(self.get_now(key))
    }

    async fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>, CacheError> {
        keys.iter().map(|key| self.get_now(key)).collect()
    }

    fn get_shared_now(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        return Some(self.instruments.now(Op::Get, key, || {
            let found = self.read_shared(key, decoder);
            self.instruments.read(found.is_some());
            found.unwrap_or(Ok(None))
        }));
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        Some(self.read_shared(key, decoder).unwrap_or(Ok(None)))
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        observed!(
            self.instruments,
            Op::Lease,
            key,
            self.lease_now(key, request)
        )
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        observed!(self.instruments, Op::SetLeased, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.default_ttl)?;
            let _write = self.stripes.lock(key);
            if !self.holds(key, lease.token()) {
                return Ok(false);
            }
            self.put(key, Entry::value(value, ttl));
            Ok(true)
        })
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        observed!(self.instruments, Op::ReleaseLease, key, async {
            self.release_now(key, lease.token());
            Ok(())
        })
    }

    async fn replace_if(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        observed!(self.instruments, Op::ReplaceIf, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.default_ttl)?;
            let _write = self.stripes.lock(key);
            let seen = version.as_id();
            let current = self.current(key);
            if current.is_none_or(|entry| entry.lease.is_some() || Some(entry.id) != seen) {
                return Ok(None);
            }
            let entry = Entry::value(value, ttl);
            let id = entry.id;
            self.put(key, entry);
            Ok(Some(StoredVersion::of_id(id)))
        })
    }

    fn flight_scope(&self) -> u64 {
        self.scope
    }

    fn codec(&self) -> &dyn Codec {
        &*self.codec
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        observed!(self.instruments, Op::Set, key, async {
            let ttl = resolve_ttl(key, ttl_secs, self.default_ttl)?;
            let _write = self.stripes.lock(key);
            self.put(key, Entry::value(value, ttl));
            Ok(())
        })
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        observed!(self.instruments, Op::Invalidate, key, async {
            let _write = self.stripes.lock(key);
            self.remove(key);
            Ok(())
        })
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        observed!(
            self.instruments,
            Op::InvalidatePrefix,
            prefix,
            self.invalidate_prefix_now(prefix)
        )
    }
}

impl MokaCacheService {
    /// A read, observed (the one `get_bytes` and `get_bytes_now` share).
    #[inline(always)]
    fn get_now(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        return self.instruments.now(Op::Get, key, || {
            let value = self.read(key);
            self.instruments.read(value.is_some());
            Ok(value)
        });
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        Ok(self.read(key))
    }

    async fn lease_now(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        let _write = self.stripes.lock(key);
        let now = Instant::now();
        if request.renew && !self.holds(key, &request.token) {
            return Ok(LeaseRead::Lost);
        }
        if let Some(entry) = self.current(key) {
            match &entry.lease {
                Some(mark) if mark.token != request.token && entry.deadline > now => {
                    return Ok(LeaseRead::Held {
                        remaining: entry.deadline - now,
                    });
                }
                None if request.replace.as_ref().and_then(StoredVersion::as_id)
                    != Some(entry.id) =>
                {
                    return Ok(LeaseRead::Value {
                        value: entry.value.clone(),
                        version: StoredVersion::of_id(entry.id),
                    });
                }
                _ => {}
            }
        }
        let ttl = request.ttl.max(Duration::from_millis(1));
        self.put(key, Entry::lease(request.token.clone(), ttl, now));
        let (service, owned_key, token) = (self.clone(), key.to_owned(), request.token.clone());
        Ok(LeaseRead::Granted(Lease::new(
            request.token.clone(),
            move || {
                service.release_now(&owned_key, &token);
            },
        )))
    }

    async fn invalidate_prefix_now(&self, prefix: &str) -> Result<u64, CacheError> {
        // Collect the matching keys shard by shard (yielding to the async runtime between
        // shards, not holding a worker thread for the whole cache), then remove them one by
        // one, counting those this call really removed: not the ones another caller removed
        // in between, nor the ones that expired in between.
        let mut matching: Vec<Arc<str>> = Vec::new();
        for shard in 0..self.index.shard_count() {
            matching.extend(self.index.keys_with_prefix(shard, prefix));
            tokio::task::yield_now().await;
        }
        let mut removed = 0u64;
        for (step, key) in matching.iter().enumerate() {
            // A key being loaded (its lease) is removed too, which voids the lease, and
            // counts as one, as in Redis where the lease is a key of its own.
            let counted = {
                let _write = self.stripes.lock(key);
                self.remove(key)
                    .is_some_and(|entry| entry.live(Instant::now()))
            };
            removed += u64::from(counted);
            if step % REMOVALS_PER_YIELD == REMOVALS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
        Ok(removed)
    }
}

/// Entries `invalidate_prefix` removes between two yields to the runtime (about 1 ms).
const REMOVALS_PER_YIELD: usize = 1_024;
