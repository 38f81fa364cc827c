//! In-process locks: one async mutex per key, forgotten when nobody holds or waits for it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{OwnedMutexGuard, watch};

use super::{ConcurrencyService, HeldLock, LockGuard, LockOptions};
use crate::{KeyName, LockError};

/// Locks within one process: one holder per key among the tasks of this process.
///
/// Each key gets an async mutex while someone holds or waits for it, and loses it as soon as
/// nobody does, so the map never outgrows the keys in use. A local lock cannot be lost: the
/// lease of [`LockOptions`] does not apply. Fencing tokens come from one counter, so they
/// strictly increase per key (and overall).
///
/// ```
/// use cachet::{ConcurrencyServiceExt, LocalConcurrencyService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
/// let locks = LocalConcurrencyService::default();
/// let value = locks.with_lock("org:acme", async { 42 }).await?;
/// assert_eq!(value, 42);
/// assert_eq!(locks.keys_in_use(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct LocalConcurrencyService {
    shared: Arc<Shared>,
}

/// A key's mutex and how many holders and waiters use it.
type KeyEntry = (Arc<tokio::sync::Mutex<()>>, usize);

#[derive(Default)]
struct Shared {
    keys: Mutex<HashMap<String, KeyEntry>>,
    fences: AtomicU64,
}

impl Shared {
    /// One user fewer for `key`; the entry goes when nobody uses it.
    fn leave(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, users)) = keys.get_mut(key) {
            *users -= 1;
            if *users == 0 {
                keys.remove(key);
            }
        }
    }
}

impl LocalConcurrencyService {
    /// How many keys are held or waited for now (the map's size).
    pub fn keys_in_use(&self) -> usize {
        self.shared
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl fmt::Debug for LocalConcurrencyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConcurrencyService")
            .field("keys_in_use", &self.keys_in_use())
            .finish()
    }
}

/// Leaves the key's entry when dropped: waiting that is cancelled or times out cleans up too.
struct Membership {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.shared.leave(&self.key);
    }
}

struct LocalHeld {
    _guard: OwnedMutexGuard<()>,
    _membership: Membership,
    _lost: watch::Sender<bool>,
}

#[async_trait]
impl HeldLock for LocalHeld {
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        Ok(()) // dropping the guard, then the membership, lets go
    }

    fn release_in_background(self: Box<Self>) {}
}

#[async_trait]
impl ConcurrencyService for LocalConcurrencyService {
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let result = self.acquire_now(key, options).await;
        super::observe_acquire("local", &result, started);
        result
    }
}

impl LocalConcurrencyService {
    async fn acquire_now(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        options.check(key)?;
        let mutex = {
            let mut keys = self
                .shared
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (mutex, users) = keys.entry(key.to_owned()).or_default();
            *users += 1;
            Arc::clone(mutex)
        };
        let membership = Membership {
            shared: Arc::clone(&self.shared),
            key: key.to_owned(),
        };
        let started = Instant::now();
        let guard = if options.wait_timeout.is_zero() {
            mutex.try_lock_owned().ok()
        } else {
            tokio::time::timeout(options.wait_timeout, mutex.lock_owned())
                .await
                .ok()
        };
        let Some(guard) = guard else {
            return Err(LockError::Timeout {
                key: KeyName::new(key),
                waited: started.elapsed(),
            });
        };
        let fence = self.shared.fences.fetch_add(1, Ordering::Relaxed) + 1;
        let (lost_tx, lost_rx) = watch::channel(false);
        Ok(LockGuard::new(
            key,
            fence,
            lost_rx,
            Box::new(LocalHeld {
                _guard: guard,
                _membership: membership,
                _lost: lost_tx,
            }),
        ))
    }
}
