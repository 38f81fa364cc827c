//! What the service shares with the task that listens for invalidations (the pub/sub bus or
//! the server's tracking pushes): the L1, its coherence state and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use super::coherence::{Coherence, Ticket};
use crate::envelope::Envelope;
use crate::invalidation::{Message, Operation};
use crate::observe::{self, Instruments, ResetReason};
use crate::service::{Decoder, SharedValue};
use crate::{CacheError, CacheService, MokaCacheService};

pub(super) struct Shared {
    pub(super) l1: MokaCacheService,
    pub(super) l1_max_ttl: Duration,
    pub(super) instance_id: u64,
    /// The per-key versions every L1 insert checks.
    pub(super) coherence: Coherence,
    /// Remote invalidations applied plus L1 resets, for tests and metrics.
    pub(super) applied: watch::Sender<u64>,
    pub(super) resets: AtomicU64,
    pub(super) malformed: AtomicU64,
    /// Rounds in which a lost invalidation stream could not be confirmed again (a hello not
    /// heard back, a re-subscription or `CLIENT TRACKING` refused): never silent.
    pub(super) confirm_failures: AtomicU64,
    /// Bus mode: set when this instance hears its own hello.
    pub(super) heard_self: watch::Sender<bool>,
    /// Wakes the confirmer after a reset.
    pub(super) reconfirm: Notify,
    /// Whether an own write may put its value into the L1. Not with tracking: the server
    /// tracks only keys this connection *read*, so a value written and never read would get
    /// no invalidation; the next read fills it (and so tracks it).
    pub(super) own_writes_fill: bool,
    /// The tiered service's metric handles and span settings (its reads are the `l1` layer).
    pub(super) instruments: Instruments,
}

impl Shared {
    pub(super) fn new(
        l1: MokaCacheService,
        l1_max_ttl: Duration,
        instance_id: u64,
        own_writes_fill: bool,
        instruments: Instruments,
    ) -> Self {
        Shared {
            instruments,
            own_writes_fill,
            l1,
            l1_max_ttl,
            instance_id,
            coherence: Coherence::new(),
            applied: watch::channel(0).0,
            resets: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            confirm_failures: AtomicU64::new(0),
            heard_self: watch::channel(false).0,
            reconfirm: Notify::new(),
        }
    }

    /// A bus message from another instance (or this one's hello).
    pub(super) fn apply(self: &Arc<Self>, message: Message) {
        if message.origin == self.instance_id {
            if message.operation == Operation::Hello {
                self.heard_self.send_replace(true);
            }
            return;
        }
        match message.operation {
            Operation::Key(key) => self.drop_key(&key),
            Operation::Prefix(prefix) => {
                // Hits under the prefix are misses from now on; the scan runs elsewhere.
                self.coherence.touch_all();
                let prefix: Arc<str> = Arc::from(prefix);
                self.coherence.begin_prefix(Arc::clone(&prefix));
                let shared = Arc::clone(self);
                tokio::spawn(async move {
                    let _ = shared.l1.invalidate_prefix(&prefix).await;
                    shared.coherence.end_prefix(&prefix);
                });
            }
            Operation::Clear => self.drop_all(),
            Operation::Hello => return,
        }
        observe::invalidation_received("bus");
        self.applied.send_modify(|n| *n += 1);
    }

    /// A key changed elsewhere: void fills in flight for it and drop its copy.
    pub(super) fn drop_key(&self, key: &str) {
        self.coherence.touch(key);
        self.l1.forget(key);
    }

    /// Everything changed (a flush): void every fill in flight and drop the L1.
    pub(super) fn drop_all(&self) {
        self.coherence.touch_all();
        self.l1.clear();
    }

    /// Counts one applied invalidation (tracking mode applies them itself).
    pub(super) fn count_applied(&self) {
        observe::invalidation_received("tracking");
        self.applied.send_modify(|n| *n += 1);
    }

    /// Messages may have been lost: drop the whole L1.
    pub(super) fn reset(&self, reason: ResetReason) {
        observe::l1_reset(reason);
        self.drop_all();
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.applied.send_modify(|n| *n += 1);
    }

    /// The invalidation stream was re-established: drop the L1, and fill it again only once
    /// the new stream is confirmed live.
    pub(super) fn reset_unconfirmed(&self, reason: ResetReason) {
        self.coherence.set_confirmed(false);
        self.heard_self.send_replace(false);
        self.reset(reason);
        self.reconfirm.notify_one();
    }

    /// An L1 hit for `key`, unless a prefix scan covering it is still running.
    pub(super) fn l1_hit(&self, key: &str) -> Option<Bytes> {
        self.l1
            .peek(key)
            .filter(|_| !self.coherence.is_pending(key))
    }

    /// [`l1_hit`](Self::l1_hit) decoded as `decoder`'s type (kept in the L1's entry).
    pub(super) fn l1_shared(
        &self,
        key: &str,
        decoder: &Decoder,
    ) -> Option<Result<Option<SharedValue>, CacheError>> {
        self.l1
            .read_shared(key, decoder)
            .filter(|_| !self.coherence.is_pending(key))
    }

    /// Puts a value read from L2 into the L1 if nothing touched its key since `ticket`.
    pub(super) fn fill(&self, key: &str, envelope: &Envelope, ticket: &Ticket) {
        let ttl = envelope.remaining().min(self.l1_max_ttl);
        if ttl.is_zero() || !self.coherence.still_valid(ticket) {
            return;
        }
        self.l1.insert_for(key, envelope.payload.clone(), ttl);
        // An invalidation that raced the fill: drop what was just put in.
        if !self.coherence.still_valid(ticket) {
            self.l1.forget(key);
        }
    }

    /// After this instance's own write of `key` reached L2: its value goes into the L1
    /// only if no other write or invalidation of the key was handled since `ticket`;
    /// otherwise the key is dropped from the L1 (whose write Redis kept is unknown here).
    pub(super) fn own_write(&self, key: &str, payload: Bytes, ttl: Duration, ticket: &Ticket) {
        let after = self.coherence.own_write(ticket);
        let Some(after) = after.filter(|_| self.own_writes_fill) else {
            self.l1.forget(key);
            return;
        };
        self.l1.insert_for(key, payload, ttl.min(self.l1_max_ttl));
        if !self.coherence.still_valid(&after) {
            self.l1.forget(key);
        }
    }
}
