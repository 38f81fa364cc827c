//! Locks that hold within one process ([`LocalConcurrencyService`]) or across every process
//! that shares a Redis (`RedisConcurrencyService`, feature `redis`).
//!
//! The same rule as the cache: the object-safe [`ConcurrencyService`] has one method,
//! `acquire`, returning a [`LockGuard`]; the generic [`ConcurrencyServiceExt::with_lock`]
//! runs a future under the lock. Waiting is always bounded ([`LockOptions::wait_timeout`]),
//! and every acquisition carries a fencing token that strictly increases per key, so a store
//! can refuse a write from a holder whose lease has run out.

#[cfg(feature = "redis")]
mod keeper;
pub mod local;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use enum_dispatch::enum_dispatch;
use tokio::sync::watch;

use crate::{KeyName, LockError, WithLockError};
pub use local::LocalConcurrencyService;
#[cfg(feature = "redis")]
pub use redis::RedisConcurrencyService;

/// How to take a lock: lease, bounded wait, backoff between tries.
///
/// ```
/// use std::time::Duration;
/// use cachet::LockOptions;
///
/// let options = LockOptions::default()
///     .lease(Duration::from_secs(10))
///     .wait_timeout(Duration::from_secs(2));
/// assert_eq!(options.lease_duration(), Duration::from_secs(10));
/// let try_once = LockOptions::default().wait_timeout(Duration::ZERO);
/// # let _ = try_once;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    lease: Duration,
    wait_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    renew: bool,
    replicas: Option<(u32, Duration)>,
}

impl Default for LockOptions {
    /// Lease 30 s (renewed while the guard lives), wait at most 30 s, backoff 10 ms to
    /// 200 ms with jitter.
    fn default() -> Self {
        LockOptions {
            lease: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            renew: true,
            replicas: None,
        }
    }
}

impl LockOptions {
    /// How long the lock lives without renewal (default 30 s). While the guard lives, a
    /// distributed lock renews it about every third of the lease; if the holder stops (its
    /// process dies, its connection breaks), the lock frees itself after the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long `acquire` waits for another holder to let go (default 30 s); zero tries
    /// once.
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.wait_timeout = wait;
        self
    }

    /// Delays between tries while waiting: doubling from `min` up to `max`, each with
    /// random jitter (defaults 10 ms and 200 ms).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Whether a distributed lock renews its lease while the guard lives (default `true`).
    /// Off, the lock simply expires after the lease.
    pub fn renew(mut self, renew: bool) -> Self {
        self.renew = renew;
        self
    }

    /// After taking a distributed lock, wait until at least `replicas` replicas have it
    /// (`WAIT replicas timeout` on the connection that took it), else let it go and fail
    /// with `LockError::NotReplicated` (default: do not wait). For a primary with replicas:
    /// a failover right after the acquire then promotes a replica that has the lock, so a
    /// second holder cannot take it there. It does not make replication synchronous: a
    /// replica that confirmed can still be lost, the lease keeps counting on the old
    /// primary's clock, and renewals are not waited for. `WAIT` holds the connection it
    /// runs on for up to `timeout` (fred queues other commands on it behind). In-process
    /// locks ignore it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachet::LockOptions;
    ///
    /// let options = LockOptions::default().wait_for_replicas(1, Duration::from_millis(100));
    /// # let _ = options;
    /// ```
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    /// The lease.
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The wait timeout.
    pub fn wait_duration(&self) -> Duration {
        self.wait_timeout
    }

    fn check(&self, key: &str) -> Result<(), LockError> {
        let invalid = |message: &str| LockError::InvalidArgument {
            key: KeyName::new(key),
            message: message.to_owned(),
        };
        if key.is_empty() {
            return Err(invalid("a lock key must not be empty"));
        }
        if self.lease < Duration::from_millis(10) {
            return Err(invalid("the lease must be at least 10 ms"));
        }
        if self.lease > Duration::from_secs(crate::MAX_TTL_SECS) {
            return Err(invalid("the lease must be at most 100 years"));
        }
        if let Some((replicas, timeout)) = self.replicas {
            if replicas == 0 || timeout.is_zero() {
                return Err(invalid(
                    "wait_for_replicas needs at least one replica and a timeout above zero",
                ));
            }
        }
        Ok(())
    }

    /// The delay before try number `attempt` (0-based), with jitter in [50%, 100%].
    #[cfg(feature = "redis")]
    fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .min_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        let jitter: f64 = rand::random(); // in [0, 1)
        base.mul_f64(0.5 + 0.5 * jitter)
    }
}

/// What a backend does to let go of a lock it handed out.
#[async_trait]
pub trait HeldLock: Send + Sync {
    /// Releases now; `LockError::LeaseLost` if the lock was no longer this holder's.
    async fn release(self: Box<Self>) -> Result<(), LockError>;

    /// Releases without waiting (from `Drop`): in a background task when a runtime is
    /// there, else the lease expires by itself.
    fn release_in_background(self: Box<Self>);
}

/// A held lock. Release it with [`release`](Self::release); dropping it releases in the
/// background.
///
/// ```
/// use cachet::{ConcurrencyService, LocalConcurrencyService, LockOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
/// let locks = LocalConcurrencyService::default();
/// let guard = locks.acquire("refresh:alice", &LockOptions::default()).await?;
/// let fence = guard.fencing_token(); // pass it to the store with the write
/// assert!(!guard.is_lost());
/// guard.release().await?;
/// let again = locks.acquire("refresh:alice", &LockOptions::default()).await?;
/// assert!(again.fencing_token() > fence);
/// # Ok(()) }
/// ```
pub struct LockGuard {
    key: String,
    fencing_token: u64,
    lost: watch::Receiver<bool>,
    held: Option<Box<dyn HeldLock>>,
}

impl LockGuard {
    /// Wraps what a backend holds. `lost` turns `true` when the backend learns that the lease
    /// is gone.
    pub fn new(
        key: impl Into<String>,
        fencing_token: u64,
        lost: watch::Receiver<bool>,
        held: Box<dyn HeldLock>,
    ) -> Self {
        LockGuard {
            key: key.into(),
            fencing_token,
            lost,
            held: Some(held),
        }
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Strictly increases with each acquisition of this key, across processes: a store that
    /// remembers the highest token it has seen can refuse a stale holder's write.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Whether the lease is known to be lost (the lock expired or was taken away).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost; never, while it holds. Race it against the work
    /// (`tokio::select!`) to stop work that must not outlive the lock.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the backend's side is gone without saying "lost": keep waiting.
        if lost.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Releases the lock. `LockError::LeaseLost` if it was no longer held (another holder
    /// may have run meanwhile); `LockError::Backend` if the server did not answer (the lease
    /// then frees the lock by itself).
    pub async fn release(mut self) -> Result<(), LockError> {
        match self.held.take() {
            Some(held) => held.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.release_in_background();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &KeyName::new(&self.key))
            .field("fencing_token", &self.fencing_token)
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// Hands out locks: one holder per key at a time.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{ConcurrencyService, ConcurrencyServiceExt, LocalConcurrencyService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
/// let locks: Arc<dyn ConcurrencyService> = Arc::new(LocalConcurrencyService::default());
/// let mut refreshed = 0;
/// let token = locks
///     .with_lock("refresh:alice", async {
///         refreshed += 1; // the future may borrow locals
///         "new-token"
///     })
///     .await?;
/// assert_eq!((token, refreshed), ("new-token", 1));
/// # Ok(()) }
/// ```
#[async_trait]
#[enum_dispatch]
pub trait ConcurrencyService: Send + Sync + fmt::Debug {
    /// Takes the lock on `key`, waiting at most `options.wait_timeout` for another holder
    /// (`LockError::Timeout` naming the key after that).
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError>;
}

/// Running a future under a lock, for every [`ConcurrencyService`].
pub trait ConcurrencyServiceExt: ConcurrencyService {
    /// Runs `future` while holding the lock on `key` (default [`LockOptions`]) and releases
    /// it afterwards. The future's own output, errors included, comes back unchanged.
    ///
    /// If the lease was lost while the work ran (it ran, but maybe not alone), the result is
    /// [`WithLockError::LeaseLost`] with the work's output in it: the work may have had
    /// effects (a refresh token rotated) that the caller must not lose. If the lock could
    /// not be taken, [`WithLockError::Lock`] (the work did not run). `?` turns either into a
    /// [`LockError`]. A release the server did not answer is not an error (the lease frees
    /// the lock).
    ///
    /// ```
    /// use cachet::{ConcurrencyServiceExt, LocalConcurrencyService, WithLockError};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
    /// let locks = LocalConcurrencyService::default();
    /// match locks.with_lock("refresh:alice", async { "new-refresh-token" }).await {
    ///     Ok(token) => assert_eq!(token, "new-refresh-token"),
    ///     // Keep what the work produced; others may have run meanwhile.
    ///     Err(WithLockError::LeaseLost { output, .. }) => { let _ = output; }
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    fn with_lock<'a, F>(
        &'a self,
        key: &'a str,
        future: F,
    ) -> impl Future<Output = Result<F::Output, WithLockError<F::Output>>> + Send + 'a
    where
        F: Future + Send + 'a,
        F::Output: Send,
    {
        async move {
            self.with_lock_options(key, &LockOptions::default(), future)
                .await
        }
    }

    /// [`with_lock`](Self::with_lock) with explicit options.
    fn with_lock_options<'a, F>(
        &'a self,
        key: &'a str,
        options: &'a LockOptions,
        future: F,
    ) -> impl Future<Output = Result<F::Output, WithLockError<F::Output>>> + Send + 'a
    where
        F: Future + Send + 'a,
        F::Output: Send,
    {
        async move {
            let guard = self.acquire(key, options).await?;
            let output = future.await;
            let lost = guard.is_lost();
            match guard.release().await {
                Ok(()) | Err(LockError::Backend { .. }) if !lost => Ok(output),
                _ => Err(WithLockError::LeaseLost {
                    key: KeyName::new(key),
                    output,
                }),
            }
        }
    }
}

impl<S: ConcurrencyService + ?Sized> ConcurrencyServiceExt for S {}

#[async_trait]
impl<S: ConcurrencyService + ?Sized> ConcurrencyService for Arc<S> {
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        (**self).acquire(key, options).await
    }
}

/// Both lock services in one type.
///
/// ```
/// use cachet::{Concurrency, ConcurrencyServiceExt, LocalConcurrencyService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
/// let locks = Concurrency::from(LocalConcurrencyService::default());
/// assert_eq!(locks.with_lock("k", async { 1 }).await?, 1);
/// # Ok(()) }
/// ```
#[enum_dispatch(ConcurrencyService)]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Concurrency {
    /// In-process locks.
    Local(LocalConcurrencyService),
    /// Locks on Redis, across processes.
    #[cfg(feature = "redis")]
    Redis(RedisConcurrencyService),
}

/// Locks on Redis at `redis_url` when one is given, in-process locks otherwise. Without the
/// `redis` feature a URL is a configuration error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::LockError> {
/// let locks = cachet::build_concurrency_service(None).await?;
/// assert!(cachet::build_concurrency_service(Some("nonsense")).await.is_err());
/// # let _ = locks; Ok(()) }
/// ```
pub async fn build_concurrency_service(
    redis_url: Option<&str>,
) -> Result<Arc<dyn ConcurrencyService>, LockError> {
    Ok(match redis_url {
        #[cfg(feature = "redis")]
        Some(url) => Arc::new(RedisConcurrencyService::new(url).await?),
        #[cfg(not(feature = "redis"))]
        Some(_) => {
            return Err(LockError::from(crate::CacheError::config(
                "a Redis URL was given, but cachet was built without its `redis` feature",
                None,
            )));
        }
        None => Arc::new(LocalConcurrencyService::default()),
    })
}

/// Counts a finished `acquire` on the `backend` lock service (`cachet_lock_wait_seconds`,
/// `cachet_lock_acquired_total`; nothing without the `metrics` feature).
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
fn observe_acquire(
    backend: &'static str,
    result: &Result<LockGuard, LockError>,
    started: std::time::Instant,
) {
    #[cfg(feature = "metrics")]
    {
        use crate::observe::LockOutcome;
        let outcome = match result {
            Ok(_) => LockOutcome::Acquired,
            Err(LockError::Timeout { .. }) => LockOutcome::Timeout,
            Err(_) => LockOutcome::Error,
        };
        crate::observe::lock_acquire(backend, outcome, started.elapsed());
    }
}
