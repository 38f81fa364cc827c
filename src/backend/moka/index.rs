//! The read index of the in-memory backend: every live entry by key, in shards behind
//! read-write locks. Reads look here only; moka keeps the same entries for what it is good
//! at (the size bound, admission, eviction, expiry) and tells the index what it drops
//! through its eviction listener.
//!
//! Why not read moka itself: a moka `get` records the read for its policy (a channel push,
//! and every so often a batch of frequency-sketch updates and list moves), and with
//! per-entry expiry reads its clock too. Under random access over a few thousand entries
//! that is most of a hit's cost (`benches/moka_ratios.rs`: a raw moka hit of an `Arc` costs
//! several times a sharded map's). Here a hit is one hash, one shard read lock and one
//! probe, whose slot holds a short key itself (no pointer to follow to compare it); the
//! backend hands moka one read in `TOUCH_EVERY` so that its popularity estimate still sees
//! which keys are read.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

/// Shards of the index: enough that writers to different keys rarely share one, few enough
/// that an empty cache stays small.
const SHARDS: usize = 64;

/// Keys up to this many bytes are kept in the slot itself.
const INLINE: usize = 22;

/// A key as a slot holds it: its bytes when short (a probe compares them without a cache
/// miss), else the shared allocation moka's copy uses too.
#[derive(Clone)]
enum SlotKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl SlotKey {
    fn new(key: &Arc<str>) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key.as_bytes());
            SlotKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            SlotKey::Shared(Arc::clone(key))
        }
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            SlotKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            SlotKey::Shared(key) => key.as_bytes(),
        }
    }

    #[inline]
    fn is(&self, key: &str) -> bool {
        self.as_bytes() == key.as_bytes()
    }

    fn to_arc(&self) -> Arc<str> {
        match self {
            SlotKey::Inline { .. } => {
                // Inline keys were copied from a `&str`: valid UTF-8.
                Arc::from(std::str::from_utf8(self.as_bytes()).unwrap_or_default())
            }
            SlotKey::Shared(key) => Arc::clone(key),
        }
    }
}

/// One shard: slots of keys and entries.
type Shard<V> = RwLock<HashTable<(SlotKey, V)>>;

/// Entries by key, sharded. `V` is cheap to clone (the backend's entry is one `Arc`).
pub(super) struct Index<V> {
    shards: Box<[Shard<V>]>,
    hasher: ahash::RandomState,
}

impl<V: Clone> Index<V> {
    pub(super) fn new() -> Self {
        Index {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            // Per-process random keys: tenant-chosen keys cannot be crafted to collide.
            hasher: ahash::RandomState::new(),
        }
    }

    #[inline]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of `hash`, from bits the shard's table does not use: it places entries by
    /// the low bits and tags them with the top seven.
    #[inline]
    fn shard(&self, hash: u64) -> &Shard<V> {
        &self.shards[(hash >> 40) as usize % SHARDS]
    }

    /// The entry of `key`, if any.
    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.with(key, V::clone)
    }

    /// What `look` makes of the entry of `key`, if any, under the shard's read lock (keep
    /// `look` short: writers to the shard wait for it).
    #[inline]
    pub(super) fn with<R>(&self, key: &str, look: impl FnOnce(&V) -> R) -> Option<R> {
        let hash = self.hash(key.as_bytes());
        let shard = read(self.shard(hash));
        shard
            .find(hash, |(k, _)| k.is(key))
            .map(|(_, value)| look(value))
    }

    /// Stores `value` under `key`; what it replaced.
    pub(super) fn insert(&self, key: &Arc<str>, value: V) -> Option<V> {
        let hash = self.hash(key.as_bytes());
        let mut shard = write(self.shard(hash));
        match shard.find_mut(hash, |(k, _)| k.is(key)) {
            Some(slot) => Some(std::mem::replace(&mut slot.1, value)),
            None => {
                let slot = (SlotKey::new(key), value);
                shard.insert_unique(hash, slot, |(k, _)| self.hash(k.as_bytes()));
                None
            }
        }
    }

    /// Removes `key`; what was there.
    pub(super) fn remove(&self, key: &str) -> Option<V> {
        let hash = self.hash(key.as_bytes());
        let mut shard = write(self.shard(hash));
        match shard.find_entry(hash, |(k, _)| k.is(key)) {
            Ok(found) => Some(found.remove().0.1),
            Err(_) => None,
        }
    }

    /// Removes `key` if its entry is `is_it` (moka dropped that entry: a newer one stays).
    pub(super) fn remove_if(&self, key: &str, is_it: impl FnOnce(&V) -> bool) {
        let hash = self.hash(key.as_bytes());
        let mut shard = write(self.shard(hash));
        if let Ok(found) = shard.find_entry(hash, |(k, _)| k.is(key))
            && is_it(&found.get().1)
        {
            found.remove();
        }
    }

    /// How many entries the index holds.
    pub(super) fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| read(shard).len() as u64)
            .sum()
    }

    /// Drops every entry.
    pub(super) fn clear(&self) {
        for shard in self.shards.iter() {
            write(shard).clear();
        }
    }

    /// The number of shards, for scans that go one shard at a time.
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The keys of shard `n` that start with `prefix` (one read lock).
    pub(super) fn keys_with_prefix(&self, n: usize, prefix: &str) -> Vec<Arc<str>> {
        read(&self.shards[n])
            .iter()
            .filter(|(key, _)| key.as_bytes().starts_with(prefix.as_bytes()))
            .map(|(key, _)| key.to_arc())
            .collect()
    }
}

// The sections under these locks cannot panic halfway (a probe, an insert, a remove), so a
// poisoned shard is still consistent.
#[inline]
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
