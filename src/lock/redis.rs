//! Locks on Redis: one holder per key across every process that shares the server.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::Client;
use fred::types::scripts::Script;
use tokio::sync::{Notify, watch};

use super::{ConcurrencyService, HeldLock, LockGuard, LockOptions};
use crate::{BoxError, KeyName, LockError, RedisCacheService};

/// Sets the lock if free (`SET NX PX`) and, only then, bumps the key's fencing counter
/// (`KEYS`: lock, fence; `ARGV`: token, lease in ms). Returns the fencing token, or 0.
pub const ACQUIRE_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0";

/// Deletes the lock only if this holder's token is still in it (`KEYS`: lock; `ARGV`:
/// token). Returns 1 if it did, else 0.
pub const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0";

/// Extends the lease only if this holder's token is still in the lock (`KEYS`: lock;
/// `ARGV`: token, lease in ms). Returns 1 if it did, else 0.
pub const RENEW_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

fn script(slot: &'static OnceLock<Script>, lua: &'static str) -> &'static Script {
    slot.get_or_init(|| Script::from_lua(lua))
}

fn acquire_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, ACQUIRE_SCRIPT)
}

fn release_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, RELEASE_SCRIPT)
}

fn renew_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, RENEW_SCRIPT)
}

/// Default prefix of the lock and fencing-counter keys.
pub const DEFAULT_LOCK_PREFIX: &str = "lock:";

/// Distributed locks on Redis (standalone, Cluster, Sentinel, Valkey).
///
/// - acquire: one Lua step sets `lock` to a random token with `NX PX lease` and, only if it
///   got it, increments the key's fencing counter, whose new value is the guard's fencing
///   token (strictly increasing per key, across processes; the counter key never expires);
/// - release: a Lua compare-and-delete, so only the holder's token can delete the lock;
/// - while the guard lives, its lease is extended (compare-and-`PEXPIRE`) every third of the
///   lease, by one keeper task per service (taking a lock spawns nothing); if the lock is
///   gone or someone else's, or the server cannot be reached for a whole lease, the guard is
///   marked lost ([`LockGuard::is_lost`], [`LockGuard::lost`]);
/// - waiting retries with doubling, jittered delays, and gives up with `LockError::Timeout`
///   after the wait timeout; a server that does not answer is `LockError::Backend` within the
///   command timeout.
///
/// Keys: `lock:{<hash of key>}:L:<key>` and `lock:{<hash of key>}:F:<key>` (the hash tag puts
/// both in one cluster slot).
///
/// ```no_run
/// use cachet::{ConcurrencyServiceExt, RedisConcurrencyService};
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::LockError> {
/// let locks = RedisConcurrencyService::new("redis://127.0.0.1:6379").await?;
/// let token = locks
///     .with_lock("oauth-refresh:user-42", async { "refreshed once, by one instance" })
///     .await?;
/// # let _ = token; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConcurrencyService {
    redis: RedisCacheService,
    prefix: String,
    leases: Arc<Leases>,
}

impl RedisConcurrencyService {
    /// Connects to `redis_url` (the timeouts of [`RedisCacheService::new`]).
    pub async fn new(redis_url: &str) -> Result<Self, LockError> {
        let redis = RedisCacheService::new(redis_url, crate::DEFAULT_TTL_SECS).await?;
        Ok(Self::from_connection(redis))
    }

    /// Uses the connection (and its timeouts) of an existing Redis cache service.
    pub fn from_connection(redis: RedisCacheService) -> Self {
        RedisConcurrencyService {
            redis,
            prefix: DEFAULT_LOCK_PREFIX.to_owned(),
            leases: Arc::default(),
        }
    }

    /// Puts the lock keys under `prefix` instead of `"lock:"`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The Redis key that holds the lock on `key` (and the holder's token while held).
    pub fn lock_key(&self, key: &str) -> String {
        format!("{}{{{:016x}}}:L:{key}", self.prefix, fnv1a(key))
    }

    /// The Redis key of `key`'s fencing counter.
    pub fn fence_key(&self, key: &str) -> String {
        format!("{}{{{:016x}}}:F:{key}", self.prefix, fnv1a(key))
    }

    fn backend(&self, operation: &'static str, key: &str, source: BoxError) -> LockError {
        LockError::Backend {
            backend: self.redis.server().to_owned(),
            operation,
            key: KeyName::new(key),
            source,
        }
    }
}

impl fmt::Debug for RedisConcurrencyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConcurrencyService")
            .field("server", &self.redis.server())
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// FNV-1a, 64 bits: the same in every process and every Rust version (it picks the hash
/// tag, so every instance must agree on it).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A token no other holder has: 128 random bits, in hex.
fn random_token() -> String {
    let (a, b) = (super::random_u64(), super::random_u64());
    format!("{a:016x}{b:016x}{:08x}", std::process::id())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A held Redis lock: what releasing and renewing need.
struct RedisHeld {
    service: RedisConcurrencyService,
    key: String,
    token: String,
    /// This hold's entry in the service's lease keeper.
    lease_id: u64,
}

impl RedisHeld {
    async fn release_now(self) -> Result<(), LockError> {
        self.service.leases.forget(self.lease_id);
        let client = self.service.redis.client().clone();
        let keys = vec![self.service.lock_key(&self.key)];
        let released = release_script()
            .evalsha_with_reload::<i64, _, _>(&client, keys, vec![self.token.clone()])
            .await
            .map_err(|e| self.service.backend("release", &self.key, Box::new(e)))?;
        if released == 1 {
            Ok(())
        } else {
            Err(LockError::LeaseLost {
                key: KeyName::new(&self.key),
            })
        }
    }
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        (*self).release_now().await
    }

    fn release_in_background(self: Box<Self>) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = (*self).release_now().await;
            });
        }
        // Without a runtime the lease frees the lock by itself.
    }
}

/// One held lease, as the keeper tracks it.
struct Lease {
    lock_key: String,
    token: String,
    lease: Duration,
    renew: bool,
    /// Until when the lease is known to hold (the last successful write or renewal + lease).
    valid_until: Instant,
    lost: watch::Sender<bool>,
}

/// The leases of one service and the one task that keeps them: it renews each about every
/// third of its lease (compare-and-`PEXPIRE`) and marks a guard lost when its lock is gone,
/// someone else's, or unreachable for a whole lease. Taking and releasing a lock only
/// touch this map (no task per lock); the keeper is woken only when a new lease is due
/// before everything it already waits for.
#[derive(Default)]
struct Leases {
    state: Mutex<LeaseState>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct LeaseState {
    next_id: u64,
    held: HashMap<u64, Lease>,
    /// (when to look at it next, id); entries of released leases are skipped when due.
    schedule: BTreeSet<(Instant, u64)>,
    /// The instant the keeper sleeps until, if it is running.
    keeper_wakes_at: Option<Instant>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks a new lease; starts the keeper if needed, wakes it if this lease is due first.
    fn track(self: &Arc<Self>, client: &Client, lease: Lease) -> u64 {
        let due = next_look(&lease);
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.held.insert(id, lease);
        state.schedule.insert((due, id));
        let running = state.keeper.as_ref().is_some_and(|k| !k.is_finished());
        if !running {
            state.keeper_wakes_at = None;
            let keeper = keep_leases(Arc::downgrade(self), Arc::clone(&self.wake), client.clone());
            state.keeper = Some(tokio::spawn(keeper));
        } else if state.keeper_wakes_at.is_none_or(|at| due < at) {
            self.wake.notify_one();
        }
        id
    }

    fn forget(&self, id: u64) {
        self.lock().held.remove(&id);
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        if let Some(keeper) = self.lock().keeper.take() {
            keeper.abort();
        }
    }
}

/// When the keeper should look at `lease` next.
fn next_look(lease: &Lease) -> Instant {
    if lease.renew {
        Instant::now() + lease.lease / 3
    } else {
        lease.valid_until
    }
}

/// The keeper task of one service; ends when the service is gone.
async fn keep_leases(leases: Weak<Leases>, wake: Arc<Notify>, client: Client) {
    loop {
        let Some(shared) = leases.upgrade() else {
            return;
        };
        // Take what is due; note when to wake next.
        let now = Instant::now();
        let mut due = Vec::new();
        let wake_at = {
            let mut state = shared.lock();
            while let Some(&(at, id)) = state.schedule.first() {
                if at > now {
                    break;
                }
                state.schedule.pop_first();
                if let Some(lease) = state.held.get(&id) {
                    due.push((
                        id,
                        lease.lock_key.clone(),
                        lease.token.clone(),
                        lease.lease,
                        lease.renew,
                    ));
                }
            }
            let wake_at = state.schedule.first().map(|&(at, _)| at);
            state.keeper_wakes_at = if due.is_empty() { wake_at } else { Some(now) };
            wake_at
        };

        if due.is_empty() {
            // Hold no strong reference while asleep: dropping the service ends this task.
            drop(shared);
            let notified = wake.notified();
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => notified.await,
            }
            continue;
        }

        let renewals = due.into_iter().map(|(id, lock_key, token, lease, renew)| {
            let client = client.clone();
            async move {
                if !renew {
                    return (id, None);
                }
                let args = vec![token, millis(lease).to_string()];
                let result = renew_script()
                    .evalsha_with_reload::<i64, _, _>(&client, vec![lock_key], args)
                    .await;
                (id, Some(result))
            }
        });
        let results = futures_util::future::join_all(renewals).await;
        let now = Instant::now();
        let mut state = shared.lock();
        for (id, result) in results {
            let Some(lease) = state.held.get_mut(&id) else {
                continue;
            };
            let lost = match result {
                None => true, // not renewing: the lease has run out
                Some(Ok(1)) => {
                    lease.valid_until = now + lease.lease;
                    false
                }
                Some(Ok(_)) => true, // gone, or someone else's
                Some(Err(_)) => now >= lease.valid_until,
            };
            if lost {
                let _ = lease.lost.send(true);
                state.held.remove(&id);
            } else {
                let lease = &state.held[&id];
                let next = if now >= lease.valid_until {
                    now
                } else {
                    next_look(lease)
                };
                state.schedule.insert((next, id));
            }
        }
    }
}

#[async_trait]
impl ConcurrencyService for RedisConcurrencyService {
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        options.check(key)?;
        let client = self.redis.client().clone();
        let token = random_token();
        let keys = vec![self.lock_key(key), self.fence_key(key)];
        let args = vec![token.clone(), millis(options.lease).to_string()];
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            // The lease counts from before the request left: never later than the server's.
            let started_try = Instant::now();
            let fence = acquire_script()
                .evalsha_with_reload::<i64, _, _>(&client, keys.clone(), args.clone())
                .await
                .map_err(|e| self.backend("acquire", key, Box::new(e)))?;
            if fence > 0 {
                let (lost_tx, lost_rx) = watch::channel(false);
                let lease_id = self.leases.track(
                    &client,
                    Lease {
                        lock_key: self.lock_key(key),
                        token: token.clone(),
                        lease: options.lease,
                        renew: options.renew,
                        valid_until: started_try + options.lease,
                        lost: lost_tx,
                    },
                );
                let held = RedisHeld {
                    service: self.clone(),
                    key: key.to_owned(),
                    token,
                    lease_id,
                };
                return Ok(LockGuard::new(key, fence as u64, lost_rx, Box::new(held)));
            }
            let waited = started.elapsed();
            if waited >= options.wait_timeout {
                return Err(LockError::Timeout {
                    key: KeyName::new(key),
                    waited,
                });
            }
            let delay = options.delay(attempt).min(options.wait_timeout - waited);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}
