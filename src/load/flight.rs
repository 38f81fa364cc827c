//! The single-flight table: one loader call per (service scope, key) at a time in this
//! process; the callers that arrive while it runs wait for its outcome.
//!
//! One table per process, sharded by hash. An entry lives exactly as long as its leader's
//! load: the leader removes it when it finishes, and its guard removes it (telling the
//! waiters to try again) if the leader's future is dropped first, so a cancelled request can
//! neither leave waiters hanging nor leak an entry.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::codec::Frame;

/// What a finished load tells the callers that waited for it.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The value's JSON payload (`None`: not found), and whether it is a stale value
    /// served by fail-safe.
    Value { payload: Option<Bytes>, stale: bool },
    /// The loader's error, as an `Arc<E>`.
    Failed(Arc<dyn Any + Send + Sync>),
    /// The loader did not finish within this long.
    TimedOut(Duration),
    /// The load could not be used (its value did not encode): the message says why.
    Unusable(Arc<str>),
    /// The leader's future was dropped before it finished: try again.
    Abandoned,
}

/// One load in flight: its outcome channel, and whether the key was invalidated while it
/// ran (then what it loaded may predate the change and must not stay cached).
pub(crate) struct Flight {
    outcome: watch::Sender<Option<Outcome>>,
    invalidated: AtomicBool,
    /// The leader's fail-safe candidate, for waiters that read after the leader's lease
    /// hid the value (the soft timeout serves it).
    stale: Option<Frame>,
}

type Slot = Arc<Flight>;
type Shard = Mutex<HashMap<(u64, Box<str>), Slot>>;

const SHARDS: usize = 32;

struct Table {
    shards: Vec<Shard>,
    hasher: ahash::RandomState,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| Table {
    shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
    hasher: ahash::RandomState::new(),
});

impl Table {
    fn shard(&self, scope: u64, key: &str) -> MutexGuard<'_, HashMap<(u64, Box<str>), Slot>> {
        let mut hasher = self.hasher.build_hasher();
        scope.hash(&mut hasher);
        key.hash(&mut hasher);
        let index = (hasher.finish() % SHARDS as u64) as usize;
        // A panic while holding the lock cannot leave the map inconsistent (every critical
        // section is a single insert, get or remove), so a poisoned lock is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The caller's part in a load.
pub(crate) enum Role {
    /// Nobody is loading this key: this caller loads, and reports through the guard.
    Leader(Leader),
    /// Another caller is loading it: wait for its outcome. With the leader's fail-safe
    /// candidate, if it had one.
    Waiter(watch::Receiver<Option<Outcome>>, Option<Frame>),
}

/// Joins the load of `key` in `scope`, or starts it (with `stale`, the caller's fail-safe
/// candidate, handed to the waiters).
pub(crate) fn join(scope: u64, key: &str, stale: Option<&Frame>) -> Role {
    let mut shard = TABLE.shard(scope, key);
    if let Some(slot) = shard.get(&(scope, Box::from(key))) {
        return Role::Waiter(slot.outcome.subscribe(), slot.stale.clone());
    }
    let slot: Slot = Arc::new(Flight {
        outcome: watch::Sender::new(None),
        invalidated: AtomicBool::new(false),
        stale: stale.cloned(),
    });
    shard.insert((scope, Box::from(key)), Arc::clone(&slot));
    Role::Leader(Leader {
        scope,
        key: Box::from(key),
        slot,
        finished: false,
    })
}

/// Marks the load of `key` in `scope` running now, if any, as invalidated.
pub(crate) fn invalidate(scope: u64, key: &str) {
    let shard = TABLE.shard(scope, key);
    if let Some(slot) = shard.get(&(scope, Box::from(key))) {
        slot.invalidated.store(true, Ordering::SeqCst);
    }
}

/// How many loads are in flight now, over every service (for tests).
pub(crate) fn in_flight() -> usize {
    TABLE
        .shards
        .iter()
        .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).len())
        .sum()
}

/// The leader's handle on its entry; dropping it unfinished abandons the load.
pub(crate) struct Leader {
    scope: u64,
    key: Box<str>,
    slot: Slot,
    finished: bool,
}

impl Leader {
    /// Ends the load: removes the entry, then tells every waiter.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.remove();
        self.slot.outcome.send_replace(Some(outcome));
    }

    /// Stops new callers from joining this load (they start their own), while the callers
    /// already waiting still get its outcome. The leader calls it once its loader returned:
    /// a caller arriving after that may have arrived after a change the loaded value
    /// predates, and must read again.
    pub(crate) fn close(&self) {
        self.remove();
    }

    /// Whether the key was invalidated (through [`invalidate`]) since this load began.
    pub(crate) fn invalidated(&self) -> bool {
        self.slot.invalidated.load(Ordering::SeqCst)
    }

    fn remove(&self) {
        let mut shard = TABLE.shard(self.scope, &self.key);
        let map_key = (self.scope, self.key.clone());
        if shard
            .get(&map_key)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot))
        {
            shard.remove(&map_key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.finished {
            self.remove();
            self.slot.outcome.send_replace(Some(Outcome::Abandoned));
        }
    }
}

/// Waits for the leader's outcome; a leader that went away without one reads as
/// [`Outcome::Abandoned`].
pub(crate) async fn wait(mut receiver: watch::Receiver<Option<Outcome>>) -> Outcome {
    match receiver.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Outcome::Abandoned),
        Err(_) => Outcome::Abandoned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_then_waiters_then_the_entry_is_gone() {
        let key = "flight-test:one-leader";
        let Role::Leader(leader) = join(1, key, None) else {
            panic!("the first caller must lead")
        };
        let Role::Waiter(waiter, _) = join(1, key, None) else {
            panic!("the second caller must wait")
        };
        // Another scope is another load.
        let Role::Leader(other) = join(2, key, None) else {
            panic!("another scope must lead its own load")
        };
        drop(other);
        let waiting = tokio::spawn(wait(waiter));
        leader.finish(Outcome::TimedOut(Duration::from_secs(1)));
        assert!(matches!(waiting.await.unwrap(), Outcome::TimedOut(_)));
        assert!(matches!(join(1, key, None), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_abandons_and_frees_the_key() {
        let key = "flight-test:dropped";
        let Role::Leader(leader) = join(3, key, None) else {
            panic!("the first caller must lead")
        };
        let Role::Waiter(waiter, _) = join(3, key, None) else {
            panic!("the second caller must wait")
        };
        drop(leader);
        assert!(matches!(wait(waiter).await, Outcome::Abandoned));
        let Role::Leader(next) = join(3, key, None) else {
            panic!("the key must be free again")
        };
        drop(next);
    }

    #[test]
    fn an_invalidation_marks_only_the_running_load() {
        let key = "flight-test:invalidated";
        invalidate(4, key); // nothing running: no effect, no entry
        let Role::Leader(leader) = join(4, key, None) else {
            panic!("the first caller must lead")
        };
        assert!(!leader.invalidated());
        invalidate(5, key); // another scope
        assert!(!leader.invalidated());
        invalidate(4, key);
        assert!(leader.invalidated());
        leader.finish(Outcome::Abandoned);
        let Role::Leader(next) = join(4, key, None) else {
            panic!("the key must be free again")
        };
        assert!(!next.invalidated(), "a new load starts clean");
        drop(next);
    }
}
