//! The leader's guard: its flight slot, the way its load may write back (under the key's
//! lease, or plainly) and the cross-instance lock it took, owned together so that no exit of
//! the lead path can forget one.
//!
//! The normal end is one [`LeaderGuard::finish`]: release the lease if nothing was stored
//! under it, release the lock, tell the waiters. A guard dropped before that (the caller's
//! future was cancelled) ends each part through its own `Drop`, in that order: the lock and
//! the lease are released in the background, and the waiters are told the load was
//! abandoned, so one of them takes over at once.

use std::future::Future;

use bytes::Bytes;
use tokio::time::Instant;

use super::flight::{Leader, Outcome};
use super::lease::{DEFAULT_LEASE_TTL, LEASE_RENEW_EVERY, Lease, LeaseRead, LeaseRequest};
use crate::lock::LockGuard;
use crate::{CacheError, CacheService};

/// How a load may write back.
pub(super) enum WriteBack {
    /// Under this lease (it is voided by any change of the key meanwhile).
    Leased(Lease),
    /// A service without leases: `set_bytes`, unless this process saw the key invalidated
    /// (the in-process check of [`invalidate_in_flight`](super::invalidate_in_flight)).
    Plain,
    /// Not at all: the lease could not be had (the cache is down), so nothing may be
    /// written that could overtake a change made meanwhile. Also the state before the
    /// leader has asked for a lease: nothing is held yet.
    Skip,
}

/// What became of a write-back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// It is in the cache.
    Yes,
    /// The key was changed or invalidated while the loader ran: what it loaded may predate
    /// the change. Its own caller still gets it; the callers that joined are sent to read
    /// (and load) again, since they may have arrived after the change.
    Overtaken,
    /// Not written (nothing may be, or the cache failed).
    No,
}

impl WriteBack {
    /// Stores `value`.
    async fn store<S: CacheService + ?Sized>(
        &mut self,
        cache: &S,
        key: &str,
        leader: &Leader,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Stored, CacheError> {
        match self {
            WriteBack::Leased(lease) => {
                let stored = cache.set_leased(key, lease, value, ttl_secs).await;
                if stored.is_ok() {
                    lease.disarm();
                }
                Ok(if stored? {
                    Stored::Yes
                } else {
                    Stored::Overtaken
                })
            }
            WriteBack::Plain if !leader.invalidated() => {
                cache.set_bytes(key, value, ttl_secs).await?;
                // An invalidation landing between the check and the write: undo it.
                if leader.invalidated() {
                    let _ = cache.invalidate(key).await;
                    return Ok(Stored::Overtaken);
                }
                Ok(Stored::Yes)
            }
            WriteBack::Plain => Ok(Stored::Overtaken),
            WriteBack::Skip => Ok(Stored::No),
        }
    }

    /// Nothing will be stored: release the lease now, so that waiters load at once.
    async fn abandon<S: CacheService + ?Sized>(&mut self, cache: &S, key: &str) {
        if let WriteBack::Leased(lease) = self {
            if cache.release_lease(key, lease).await.is_ok() {
                lease.disarm();
            }
        }
    }
}

/// The leader of one load and everything it holds. See the [module docs](self).
pub(super) struct LeaderGuard {
    // Fields drop in declaration order: on cancellation the lock and the lease are let go
    // before the waiters hear `Abandoned` and come back for them.
    /// The cross-instance lock of a service without leases, once taken.
    lock: Option<LockGuard>,
    /// How the load writes back; holds the lease once granted.
    write_back: WriteBack,
    /// Whether a store was made (even one that failed): then the lease is settled, and
    /// `finish` does not release it (a failed store leaves it armed, to be released in the
    /// background when the guard drops).
    stored: bool,
    /// The flight slot: the waiters of this process.
    leader: Leader,
}

impl LeaderGuard {
    /// Takes charge of `leader`; nothing else is held yet.
    pub(super) fn new(leader: Leader) -> Self {
        LeaderGuard {
            lock: None,
            write_back: WriteBack::Skip,
            stored: false,
            leader,
        }
    }

    /// Settles how the load writes back (holding the lease, if it is [`WriteBack::Leased`]).
    pub(super) fn write_back(&mut self, write_back: WriteBack) {
        self.write_back = write_back;
    }

    /// Whether the service has no leases (the load writes with `set_bytes`).
    pub(super) fn is_plain(&self) -> bool {
        matches!(self.write_back, WriteBack::Plain)
    }

    /// Holds `lock` until the guard finishes or drops.
    pub(super) fn hold_lock(&mut self, lock: LockGuard) {
        self.lock = Some(lock);
    }

    /// Stops new callers from joining this load (see [`Leader::close`]).
    pub(super) fn close(&self) {
        self.leader.close();
    }

    /// Writes `value` back under the guard's lease (or plainly, or not at all).
    pub(super) async fn store<S: CacheService + ?Sized>(
        &mut self,
        cache: &S,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Stored, CacheError> {
        self.stored = true;
        self.write_back
            .store(cache, key, &self.leader, value, ttl_secs)
            .await
    }

    /// Runs `loader` while renewing the guard's lease on `key`, if it holds one, every
    /// [`LEASE_RENEW_EVERY`].
    pub(super) async fn renewing<S, Fut>(&self, cache: &S, key: &str, loader: Fut) -> Fut::Output
    where
        S: CacheService + ?Sized,
        Fut: Future,
    {
        let WriteBack::Leased(lease) = &self.write_back else {
            return loader.await;
        };
        let renewal = LeaseRequest {
            token: lease.token().clone(),
            ttl: DEFAULT_LEASE_TTL,
            replace: None,
            renew: true,
        };
        let mut loader = std::pin::pin!(loader);
        let mut tick =
            tokio::time::interval_at(Instant::now() + LEASE_RENEW_EVERY, LEASE_RENEW_EVERY);
        loop {
            tokio::select! {
                output = &mut loader => return output,
                _ = tick.tick() => {
                    // A lost lease is not an error here: the write-back will find it gone.
                    if let Ok(LeaseRead::Granted(mut handle)) = cache.lease(key, &renewal).await {
                        handle.disarm(); // the first handle is the one that releases
                    }
                }
            }
        }
    }

    /// Ends the load: releases the lease if nothing was stored under it (so that the other
    /// instances load at once), then the lock, then tells the waiters `outcome`.
    pub(super) async fn finish<S: CacheService + ?Sized>(
        mut self,
        cache: &S,
        key: &str,
        outcome: Outcome,
    ) {
        if !self.stored {
            self.write_back.abandon(cache, key).await;
        }
        if let Some(lock) = self.lock.take() {
            // Not answered: the lock's own lease frees it.
            let _ = lock.release().await;
        }
        self.leader.finish(outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::Notify;

    use crate::load::{LeaseRead, LeaseRequest, LoadOptions, LoadSource};
    use crate::lock::ConcurrencyService;
    use crate::{
        CacheError, CacheService, CacheServiceExt, LocalConcurrencyService, MokaCacheService,
    };

    /// A service without leases (the default `lease`) over a shared store, counting its
    /// reads; each one is its own flight scope, as another instance would be.
    #[derive(Debug)]
    struct NoLeases(MokaCacheService, AtomicUsize);

    impl NoLeases {
        fn over(store: &MokaCacheService) -> Arc<Self> {
            Arc::new(NoLeases(store.clone(), AtomicUsize::new(0)))
        }

        fn reads(&self) -> usize {
            self.1.load(Ordering::SeqCst)
        }

        /// Lets the other tasks run until this service was read `reads` times.
        async fn read(&self, reads: usize) {
            while self.1.load(Ordering::SeqCst) < reads {
                tokio::task::yield_now().await;
            }
        }
    }

    #[async_trait::async_trait]
    impl CacheService for NoLeases {
        async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.get_bytes(key).await
        }
        async fn set_bytes(
            &self,
            key: &str,
            value: Bytes,
            ttl_secs: Option<u64>,
        ) -> Result<(), CacheError> {
            self.0.set_bytes(key, value, ttl_secs).await
        }
        async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
            self.0.invalidate(key).await
        }
        async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
            self.0.invalidate_prefix(prefix).await
        }
    }

    #[allow(deprecated)]
    fn locked(locks: &LocalConcurrencyService) -> LoadOptions {
        let locks: Arc<dyn ConcurrencyService> = Arc::new(locks.clone());
        LoadOptions::default()
            .ttl_secs(60)
            .load_timeout(Duration::from_secs(10))
            .distributed_single_flight(locks)
    }

    /// Bounds a wait that must not hang (not a timing assert).
    async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .unwrap_or_else(|_| panic!("{what} hung"))
    }

    // The runtimes below are single-threaded: a spawned task runs until it waits, so the test
    // knows where each one stands.

    #[tokio::test]
    async fn instances_without_leases_load_once_under_the_lock() {
        let store = MokaCacheService::default();
        let locks = LocalConcurrencyService::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let first = {
            let cache = NoLeases::over(&store);
            let options = locked(&locks);
            let (calls, started, release) = (calls.clone(), started.clone(), release.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load_with::<u32, CacheError, _, _>("guard:once", &options, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        started.notify_one();
                        release.notified().await;
                        Ok(Some(7))
                    })
                    .await
            })
        };
        bounded("the first load", started.notified()).await;
        // Another instance: it misses twice (its first read, its read once it leads), waits
        // for the lock, then finds the first one's value under it.
        let other = NoLeases::over(&store);
        let second = {
            let (cache, options, calls) = (other.clone(), locked(&locks), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load_with::<u32, CacheError, _, _>("guard:once", &options, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(Some(8))
                    })
                    .await
            })
        };
        bounded("the second load", other.read(2)).await;
        release.notify_one();
        let first = bounded("the first load", first).await.unwrap().unwrap();
        let second = bounded("the second load", second).await.unwrap().unwrap();
        assert_eq!((first.value, first.source), (Some(7), LoadSource::Loader));
        assert_eq!((second.value, second.source), (Some(7), LoadSource::Cache));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(locks.keys_in_use(), 0, "both released the lock");
    }

    #[tokio::test]
    async fn a_cancelled_leader_lets_go_of_its_lock_and_its_waiters() {
        let cache = NoLeases::over(&MokaCacheService::default());
        let locks = LocalConcurrencyService::default();
        let started = Arc::new(Notify::new());
        let leader = {
            let (cache, options, started) = (cache.clone(), locked(&locks), started.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load_with::<u32, CacheError, _, _>("guard:cancel", &options, || async {
                        started.notify_one();
                        std::future::pending().await
                    })
                    .await
            })
        };
        bounded("the leader", started.notified()).await;
        assert_eq!(locks.keys_in_use(), 1, "the leader holds the lock");
        let reads = cache.reads();
        let waiter = {
            let (cache, options) = (cache.clone(), locked(&locks));
            tokio::spawn(async move {
                cache
                    .get_or_load_with::<u32, CacheError, _, _>("guard:cancel", &options, || async {
                        Ok(Some(3))
                    })
                    .await
            })
        };
        // Its first read done, the waiter has joined the leader's flight.
        bounded("the waiter", cache.read(reads + 1)).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        let taken_over = bounded("the waiter", waiter).await.unwrap().unwrap();
        assert_eq!(
            (taken_over.value, taken_over.source),
            (Some(3), LoadSource::Loader)
        );
        bounded("the lock's release", async {
            while locks.keys_in_use() != 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_load_that_stores_nothing_releases_its_lease_before_it_returns() {
        let cache = MokaCacheService::default();
        let options = LoadOptions::default().ttl_secs(60);
        let failed = cache
            .get_or_load_with::<u32, &str, _, _>("guard:failed", &options, || async {
                Err("store down")
            })
            .await;
        assert!(failed.is_err());
        let missing = cache
            .get_or_load_with::<u32, &str, _, _>("guard:missing", &options, || async { Ok(None) })
            .await
            .unwrap();
        assert_eq!(missing.value, None);
        for key in ["guard:failed", "guard:missing"] {
            let next = cache.lease(key, &LeaseRequest::new()).await.unwrap();
            assert!(
                matches!(next, LeaseRead::Granted(_)),
                "{key}: the lease is still held: {next:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_cancelled_leader_releases_its_lease() {
        let cache = Arc::new(MokaCacheService::default());
        let started = Arc::new(Notify::new());
        let leader = {
            let (cache, started) = (cache.clone(), started.clone());
            tokio::spawn(async move {
                let options = LoadOptions::default().ttl_secs(60);
                cache
                    .get_or_load_with::<u32, CacheError, _, _>("guard:lease", &options, || async {
                        started.notify_one();
                        std::future::pending().await
                    })
                    .await
            })
        };
        bounded("the leader", started.notified()).await;
        let held = cache
            .lease("guard:lease", &LeaseRequest::new())
            .await
            .unwrap();
        assert!(matches!(held, LeaseRead::Held { .. }), "{held:?}");
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        bounded("the lease's release", async {
            loop {
                let read = cache
                    .lease("guard:lease", &LeaseRequest::new())
                    .await
                    .unwrap();
                if matches!(read, LeaseRead::Granted(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }
}
