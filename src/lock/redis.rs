//! Locks on Redis: one holder per key across every process that shares the server.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::Client;
use fred::types::scripts::Script;
use tokio::sync::{oneshot, watch};

use super::{ConcurrencyService, HeldLock, LockGuard, LockOptions};
use crate::{BoxError, KeyName, LockError, RedisCacheService};

/// Sets the lock if free (`SET NX PX`) and, only then, bumps the key's fencing counter.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0";

/// Deletes the lock only if this holder's token is still in it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0";

/// Extends the lease only if this holder's token is still in the lock.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

fn script(slot: &'static OnceLock<Script>, lua: &'static str) -> &'static Script {
    slot.get_or_init(|| Script::from_lua(lua))
}

fn acquire_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, ACQUIRE)
}

fn release_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, RELEASE)
}

fn renew_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, RENEW)
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
///   lease; if the lock is gone or someone else's, or the server cannot be reached for a
///   whole lease, the guard is marked lost ([`LockGuard::is_lost`], [`LockGuard::lost`]);
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
    /// Stops the renewal (or lease-expiry) task; dropped on release.
    stop: Option<oneshot::Sender<()>>,
}

impl RedisHeld {
    async fn release_now(mut self) -> Result<(), LockError> {
        drop(self.stop.take());
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

/// Keeps the lease alive (or, without renewal, just marks it lost once it has run out)
/// until `stop` fires or is dropped.
async fn keep_lease(
    client: Client,
    lock_key: String,
    token: String,
    lease: Duration,
    renew: bool,
    lost: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut valid_until = Instant::now() + lease;
    loop {
        let wait = if renew {
            lease / 3
        } else {
            valid_until.saturating_duration_since(Instant::now())
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if !renew {
            let _ = lost.send(true);
            return;
        }
        let renewed = renew_script()
            .evalsha_with_reload::<i64, _, _>(
                &client,
                vec![lock_key.clone()],
                vec![token.clone(), millis(lease).to_string()],
            )
            .await;
        match renewed {
            Ok(1) => valid_until = Instant::now() + lease,
            // The lock is gone or someone else's.
            Ok(_) => {
                let _ = lost.send(true);
                return;
            }
            // Server unreachable: the lease may still hold until `valid_until`.
            Err(_) if Instant::now() >= valid_until => {
                let _ = lost.send(true);
                return;
            }
            Err(_) => {}
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
            let fence = acquire_script()
                .evalsha_with_reload::<i64, _, _>(&client, keys.clone(), args.clone())
                .await
                .map_err(|e| self.backend("acquire", key, Box::new(e)))?;
            if fence > 0 {
                let (lost_tx, lost_rx) = watch::channel(false);
                let (stop_tx, stop_rx) = oneshot::channel();
                tokio::spawn(keep_lease(
                    client,
                    self.lock_key(key),
                    token.clone(),
                    options.lease,
                    options.renew,
                    lost_tx,
                    stop_rx,
                ));
                let held = RedisHeld {
                    service: self.clone(),
                    key: key.to_owned(),
                    token,
                    stop: Some(stop_tx),
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
