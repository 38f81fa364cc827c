//! What keeps an L1 from drifting: per-key (striped) versions that every L1 insert checks.
//!
//! The rule: no value goes into the L1 if a write or invalidation of its key was handled
//! (locally, or as a message from another instance) after the L2 round trip that produced
//! the value began. A fill reads a [`Ticket`] before it sends its L2 read; the insert happens
//! only if the ticket is still valid, and is undone if it stopped being valid meanwhile. An
//! instance's own write also bumps its stripe, and a write that finds the stripe bumped by
//! someone else since its ticket does not insert at all but drops the key: it cannot know
//! whose write Redis ordered last, so it leaves the next read to ask Redis.
//!
//! Stripes, not one global counter: an invalidation of one key voids only fills of keys in
//! the same stripe (1 in [`STRIPES`]), so a fleet sending thousands of invalidations per
//! second of unrelated keys does not stop an instance's L1 from filling. Prefix
//! invalidations, clears and resets bump the `epoch`, which voids every fill in flight.
//!
//! A prefix invalidation heard from another instance is scanned out of the L1 on a task of
//! its own (the listener must not stall behind a long scan); until that scan ends, the
//! prefix is "pending" and L1 hits on keys under it are treated as misses.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Number of version stripes (a power of two; 32 KiB of counters).
pub const STRIPES: usize = 4096;

/// What a fill or write read before its L2 round trip.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    stripe: usize,
    version: u64,
    epoch: u64,
}

pub(super) struct Coherence {
    stripes: Box<[AtomicU64]>,
    hasher: ahash::RandomState,
    epoch: AtomicU64,
    pending: RwLock<Vec<Arc<str>>>,
    pending_count: AtomicUsize,
    /// The subscription is known to be live (this instance heard its own hello since the
    /// last reset). While it is not, nothing goes into the L1.
    confirmed: AtomicBool,
}

impl Coherence {
    pub(super) fn new() -> Self {
        Coherence {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: ahash::RandomState::new(),
            epoch: AtomicU64::new(0),
            pending: RwLock::new(Vec::new()),
            pending_count: AtomicUsize::new(0),
            confirmed: AtomicBool::new(false),
        }
    }

    fn stripe(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) & (STRIPES - 1)
    }

    /// Taken before an L2 round trip whose result may go into the L1.
    pub(super) fn ticket(&self, key: &str) -> Ticket {
        let stripe = self.stripe(key);
        Ticket {
            stripe,
            version: self.stripes[stripe].load(Ordering::SeqCst),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    /// Whether nothing touched the ticket's stripe (nor everything) since it was taken.
    pub(super) fn still_valid(&self, ticket: &Ticket) -> bool {
        self.confirmed.load(Ordering::SeqCst)
            && self.stripes[ticket.stripe].load(Ordering::SeqCst) == ticket.version
            && self.epoch.load(Ordering::SeqCst) == ticket.epoch
    }

    /// A write or invalidation of `key` (before its L1 copy is dropped): voids the fills of
    /// its stripe in flight. Returns the stripe's version before the bump.
    pub(super) fn touch(&self, key: &str) -> u64 {
        self.stripes[self.stripe(key)].fetch_add(1, Ordering::SeqCst)
    }

    /// This instance's own write of `key` with `ticket`: bumps the stripe; whether the write
    /// may put its value into the L1 (nobody else touched the stripe since the ticket).
    pub(super) fn own_write(&self, ticket: &Ticket) -> Option<Ticket> {
        let before = self.stripes[ticket.stripe].fetch_add(1, Ordering::SeqCst);
        let after = Ticket {
            stripe: ticket.stripe,
            version: before + 1,
            epoch: ticket.epoch,
        };
        (before == ticket.version && self.still_valid(&after)).then_some(after)
    }

    /// Voids every fill in flight (prefix invalidations, clears, resets).
    pub(super) fn touch_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks the invalidation stream live (or not). Going live also voids every ticket
    /// taken before: a read sent while the stream was not yet live may have missed the
    /// message of a write that followed it.
    pub(super) fn set_confirmed(&self, confirmed: bool) {
        if confirmed {
            self.touch_all();
        }
        self.confirmed.store(confirmed, Ordering::SeqCst);
    }

    pub(super) fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::SeqCst)
    }

    /// Marks `prefix` as being scanned out of the L1.
    pub(super) fn begin_prefix(&self, prefix: Arc<str>) {
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        pending.push(prefix);
        self.pending_count.store(pending.len(), Ordering::SeqCst);
    }

    /// The scan of `prefix` is over.
    pub(super) fn end_prefix(&self, prefix: &Arc<str>) {
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = pending.iter().position(|p| Arc::ptr_eq(p, prefix)) {
            pending.swap_remove(at);
        }
        self.pending_count.store(pending.len(), Ordering::SeqCst);
    }

    /// Whether `key` is under a prefix still being scanned out (then an L1 hit is a miss).
    /// One atomic load when nothing is pending.
    pub(super) fn is_pending(&self, key: &str) -> bool {
        if self.pending_count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let pending = self.pending.read().unwrap_or_else(|p| p.into_inner());
        pending.iter().any(|prefix| key.starts_with(&**prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmed() -> Coherence {
        let coherence = Coherence::new();
        coherence.set_confirmed(true);
        coherence
    }

    #[test]
    fn a_touch_voids_a_ticket_of_that_key_and_not_of_another_stripe() {
        let c = confirmed();
        let ticket = c.ticket("a");
        let other = (0..10_000)
            .map(|i| format!("k{i}"))
            .find(|k| c.stripe(k) != c.stripe("a"))
            .unwrap();
        let other_ticket = c.ticket(&other);
        c.touch("a");
        assert!(!c.still_valid(&ticket));
        assert!(c.still_valid(&other_ticket));
        c.touch_all();
        assert!(!c.still_valid(&other_ticket));
    }

    #[test]
    fn an_own_write_overtaken_by_another_does_not_insert() {
        let c = confirmed();
        let mine = c.ticket("k");
        let theirs = c.ticket("k");
        assert!(c.own_write(&theirs).is_some(), "first write back inserts");
        assert!(
            c.own_write(&mine).is_none(),
            "the second saw the first's bump"
        );
    }

    #[test]
    fn nothing_is_valid_while_unconfirmed_and_pending_prefixes_hide_hits() {
        let c = Coherence::new();
        let before = c.ticket("k");
        assert!(!c.still_valid(&before));
        c.set_confirmed(true);
        assert!(
            !c.still_valid(&before),
            "a read sent before the stream was live"
        );
        assert!(c.still_valid(&c.ticket("k")));
        c.set_confirmed(false);
        let prefix: Arc<str> = Arc::from("org:");
        c.begin_prefix(Arc::clone(&prefix));
        assert!(c.is_pending("org:acme"));
        assert!(!c.is_pending("user:1"));
        c.end_prefix(&prefix);
        assert!(!c.is_pending("org:acme"));
    }
}
