//! Locks on Redis: one holder per key across every process that shares the server.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::{Client, ClientLike, ServerInterface};
use fred::types::ClusterHash;
use fred::types::config::Options;
use fred::types::scripts::Script;
use tokio::sync::watch;

use super::keeper::{self, Lease, Leases};
use super::{ConcurrencyService, HeldLock, LockGuard, LockOptions};
use crate::backend::redis::RedisConnection;
use crate::{BoxError, KeyName, LockError};

/// Takes the lock if it is free, or returns this holder's own lease if the lock already
/// holds its token (fred sent the command again after a reconnect, or the first reply was
/// lost). `KEYS`: lock, fence; `ARGV`: token, lease in ms, fence idle time in ms. The lock's
/// value is `<token>:<fence>`. The fence is `max(stored + 1, server time in µs)`, so it
/// strictly increases per lock even when the server lost the counter (a flush, a restart,
/// a failover, the counter's own idle expiry), as long as the server clock does not go back
/// by more than the time since the last acquisition. Returns the fence, or 0 if someone else
/// holds the lock.
pub const ACQUIRE_SCRIPT: &str = r"
local mine = ARGV[1] .. ':'
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, 1, #mine) == mine then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(held, #mine + 1))
  end
  return 0
end
local stored = tonumber(redis.call('GET', KEYS[2])) or 0
local now = redis.call('TIME')
local fence = math.max(stored + 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
local text = string.format('%d', fence)
redis.call('SET', KEYS[2], text, 'PX', ARGV[3])
redis.call('SET', KEYS[1], mine .. text, 'PX', ARGV[2])
return fence";

/// Deletes the lock only if it holds this holder's token, and leaves a short-lived mark that
/// this token released it, so that the same release sent again (fred's replay after a
/// reconnect) is still a success. `KEYS`: lock, released mark; `ARGV`: token, mark lifetime
/// in ms. Returns 1 if this token released it (now or before), else 0.
pub const RELEASE_SCRIPT: &str = r"
local mine = ARGV[1] .. ':'
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #mine) == mine then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  return 1
end
return 0";

/// Extends the lease only if the lock holds this holder's token (`KEYS`: lock; `ARGV`:
/// token, lease in ms). Returns 1 if it did, else 0.
pub const RENEW_SCRIPT: &str = r"
local mine = ARGV[1] .. ':'
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #mine) == mine then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// How long a fencing counter lives after the last acquisition of its lock (default): after
/// that it is rebuilt from the server clock.
pub const DEFAULT_FENCE_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long the mark of a release lives: long enough for fred to send a release again after
/// a reconnect.
pub const RELEASED_MARK_TTL: Duration = Duration::from_secs(60);

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

pub(super) fn renew_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    script(&SCRIPT, RENEW_SCRIPT)
}

/// Default prefix of the lock and fencing-counter keys.
pub const DEFAULT_LOCK_PREFIX: &str = "lock:";

/// Distributed locks on Redis (standalone, Cluster, Sentinel, Valkey).
///
/// - acquire: one Lua step sets `lock` to `<random token>:<fence>` with `PX lease` if it is
///   free, and returns the fencing token: `max(last + 1, the server's clock in µs)`, so it
///   strictly increases per key across processes, and does not go back when the server lost
///   the counter (a `FLUSHALL`, a restart without persistence, a failover to a replica that
///   missed it). The assumption: the clock of whichever server is primary does not go back
///   by more than the time since the lock's last acquisition. The counter key expires after
///   [`with_fence_idle`](Self::with_fence_idle) (7 days by default) without acquisitions;
///   it is then rebuilt from the clock. Every key the service writes expires.
/// - acquire and release are idempotent per token: fred sends a command again after a
///   reconnect when its reply did not arrive; an acquire that finds its own token returns
///   that lease, a release whose token released the lock already is a success. An
///   acquisition dropped before it returned (a request timeout, a client gone) releases its
///   token in the background, so it never leaves the lock held with nobody to let it go.
/// - release: a compare-and-delete, so only the holder's token can delete the lock;
/// - while the guard lives, its lease is extended (compare-and-`PEXPIRE`) every third of the
///   lease, by one keeper task per service (taking a lock spawns nothing). The guard is
///   marked lost ([`LockGuard::is_lost`], [`LockGuard::lost`]) when the lock is found gone
///   or someone else's, and in any case at the lease's end counted from the send time of the
///   last command that set or extended it (less a clock drift allowance of 1% + 2 ms) unless
///   a renewal confirmed first: whatever the server does (a pause, a cut network), the
///   holder knows before anyone else can take the lock.
/// - [`LockOptions::wait_for_replicas`]: after acquiring, `WAIT` for replicas, or let the
///   lock go and fail with `LockError::NotReplicated`.
/// - waiting retries with doubling, jittered delays, and gives up with `LockError::Timeout`
///   after the wait timeout; a server that does not answer is `LockError::Backend` within the
///   command timeout.
///
/// Keys: `lock:{<hash of key>}:L:<key>` (the lock), `...:F:<key>` (the fencing counter) and
/// `...:R:<key>` (the mark of the last release, 60 s); the hash tag puts them in one cluster
/// slot.
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
///
/// The service runs on a [`RedisConnection`]: [`new`](Self::new) opens one of its own;
/// [`from_connection`](Self::from_connection) shares the connection of a cache (or one
/// built alone), so that an app's cache and locks use one pool.
#[derive(Clone)]
pub struct RedisConcurrencyService {
    redis: RedisConnection,
    prefix: String,
    fence_idle: Duration,
    leases: Arc<Leases>,
}

impl RedisConcurrencyService {
    /// Connects to `redis_url` with the defaults of [`RedisConnection::connect`] (connect
    /// timeout 5 s, command timeout 2 s).
    pub async fn new(redis_url: &str) -> Result<Self, LockError> {
        Ok(Self::from_connection(
            RedisConnection::connect(redis_url).await?,
        ))
    }

    /// Runs on an existing connection (and its timeouts): a [`RedisConnection`], or a
    /// [`RedisCacheService`](crate::RedisCacheService) (by value or by reference) whose
    /// connection it then shares.
    ///
    /// ```no_run
    /// use cachet::{CacheServiceExt, ConcurrencyServiceExt, RedisCacheService, RedisConcurrencyService};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = RedisCacheService::builder("redis://127.0.0.1:6379")
    ///     .pool_size(2)
    ///     .build()
    ///     .await?;
    /// // One pool for both: the locks use the cache's connections.
    /// let locks = RedisConcurrencyService::from_connection(&cache);
    /// locks
    ///     .with_lock("report:daily", async { cache.set("report:daily", &"done", None).await })
    ///     .await??;
    /// # Ok(()) }
    /// ```
    pub fn from_connection(connection: impl Into<RedisConnection>) -> Self {
        RedisConcurrencyService {
            redis: connection.into(),
            prefix: DEFAULT_LOCK_PREFIX.to_owned(),
            fence_idle: DEFAULT_FENCE_IDLE,
            leases: Arc::default(),
        }
    }

    /// The connection the locks run on (clone it to share it).
    pub fn connection(&self) -> &RedisConnection {
        &self.redis
    }

    /// Puts the lock keys under `prefix` instead of `"lock:"`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a lock's fencing counter lives after its last acquisition (default 7 days,
    /// at least 1 ms). Tokens stay increasing after it expired as long as the server clock
    /// did not go back by more than this.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use cachet::RedisConcurrencyService;
    ///
    /// # #[tokio::main] async fn main() -> Result<(), cachet::LockError> {
    /// let locks = RedisConcurrencyService::new("redis://127.0.0.1:6379")
    ///     .await?
    ///     .with_fence_idle(Duration::from_secs(24 * 3600));
    /// # let _ = locks; Ok(()) }
    /// ```
    pub fn with_fence_idle(mut self, idle: Duration) -> Self {
        self.fence_idle = idle.max(Duration::from_millis(1));
        self
    }

    /// The Redis key that holds the lock on `key` (`<token>:<fence>` while held).
    pub fn lock_key(&self, key: &str) -> String {
        self.key_of(key, 'L')
    }

    /// The Redis key of `key`'s fencing counter.
    pub fn fence_key(&self, key: &str) -> String {
        self.key_of(key, 'F')
    }

    /// The Redis key of the mark left by `key`'s last release.
    pub fn released_key(&self, key: &str) -> String {
        self.key_of(key, 'R')
    }

    fn key_of(&self, key: &str, kind: char) -> String {
        format!("{}{{{:016x}}}:{kind}:{key}", self.prefix, fnv1a(key))
    }

    fn backend(&self, operation: &'static str, key: &str, source: BoxError) -> LockError {
        LockError::Backend {
            backend: self.redis.server().into(),
            operation,
            key: KeyName::new(key),
            source,
        }
    }

    /// `WAIT required <timeout>` on the connection (and, on a cluster, the node) that took
    /// the lock: how many replicas confirmed it.
    async fn replicas_acknowledged(
        &self,
        held: &RedisHeld,
        required: u32,
        timeout: Duration,
    ) -> Result<u32, LockError> {
        let slot = fred::util::redis_keyslot(self.lock_key(&held.key).as_bytes());
        let options = Options {
            cluster_hash: Some(ClusterHash::Custom(slot)),
            timeout: Some(timeout + self.redis.command_timeout()),
            ..Options::default()
        };
        let timeout_ms = i64::try_from(millis(timeout)).unwrap_or(i64::MAX);
        held.client
            .with_options(&options)
            .wait::<i64>(i64::from(required), timeout_ms)
            .await
            .map(|n| u32::try_from(n).unwrap_or(0))
            .map_err(|e| self.backend("wait for replicas", &held.key, Box::new(e)))
    }
}

impl fmt::Debug for RedisConcurrencyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConcurrencyService")
            .field("server", &self.redis.server())
            .field("prefix", &self.prefix)
            .field("fence_idle", &self.fence_idle)
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

/// A token no other holder has: 128 random bits, in hex (never a `:`).
fn random_token() -> String {
    let (a, b): (u64, u64) = rand::random();
    format!("{a:016x}{b:016x}{:08x}", std::process::id())
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A held Redis lock, or one being taken: what releasing needs. Commands for one token go
/// through one client (one connection per server), so a release queued behind its acquire
/// runs after it, replays included.
struct RedisHeld {
    service: RedisConcurrencyService,
    client: Client,
    key: String,
    token: String,
    /// This hold's entry in the service's lease keeper, once it holds.
    lease_id: Option<u64>,
}

impl RedisHeld {
    async fn release_now(self) -> Result<(), LockError> {
        if let Some(id) = self.lease_id {
            self.service.leases.forget(id);
        }
        let keys = vec![
            self.service.lock_key(&self.key),
            self.service.released_key(&self.key),
        ];
        let args = vec![self.token.clone(), millis(RELEASED_MARK_TTL).to_string()];
        let released = release_script()
            .evalsha_with_reload::<i64, _, _>(&self.client, keys, args)
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

    fn release_in_background_now(self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = self.release_now().await;
            });
        }
        // Without a runtime the lease frees the lock by itself.
    }
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        (*self).release_now().await
    }

    fn release_in_background(self: Box<Self>) {
        (*self).release_in_background_now();
    }
}

/// An acquisition in progress: dropped before it returned (cancelled), it releases its
/// token in the background, since a script it sent may have taken the lock.
struct Pending(Option<RedisHeld>);

impl Pending {
    fn disarm(&mut self) -> RedisHeld {
        // Invariant: each `Pending` is disarmed at most once, on the path that returns.
        self.0.take().expect("disarmed once")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            held.release_in_background_now();
        }
    }
}

#[async_trait]
impl ConcurrencyService for RedisConcurrencyService {
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let result = self.acquire_now(key, options).await;
        super::observe_acquire("redis", &result, started);
        result
    }
}

impl RedisConcurrencyService {
    async fn acquire_now(&self, key: &str, options: &LockOptions) -> Result<LockGuard, LockError> {
        options.check(key)?;
        let client = self.redis.client().clone();
        let token = random_token();
        let mut pending = Pending(Some(RedisHeld {
            service: self.clone(),
            client: client.clone(),
            key: key.to_owned(),
            token: token.clone(),
            lease_id: None,
        }));
        let keys = vec![self.lock_key(key), self.fence_key(key)];
        let args = vec![
            token.clone(),
            millis(options.lease).to_string(),
            millis(self.fence_idle).to_string(),
        ];
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            // The lease counts from before the request left: never later than the server's.
            let sent = Instant::now();
            let fence = acquire_script()
                .evalsha_with_reload::<i64, _, _>(&client, keys.clone(), args.clone())
                .await
                .map_err(|e| self.backend("acquire", key, Box::new(e)))?;
            if fence > 0 {
                let (lost_tx, lost_rx) = watch::channel(false);
                let mut held = pending.disarm();
                held.lease_id = Some(self.leases.track(Lease {
                    client: client.clone(),
                    lock_key: self.lock_key(key),
                    token: token.clone(),
                    lease: options.lease,
                    renew: options.renew,
                    valid_until: keeper::valid_until(sent, options.lease),
                    lost: lost_tx,
                }));
                if let Some((required, timeout)) = options.replicas {
                    // Dropped while it waits, the lock is let go (in the background).
                    let mut waiting = Pending(Some(held));
                    let started = Instant::now();
                    let acknowledged = self
                        .replicas_acknowledged(
                            // Invariant: armed two lines above, disarmed only below.
                            waiting.0.as_ref().expect("armed"),
                            required,
                            timeout,
                        )
                        .await;
                    let held = waiting.disarm();
                    match acknowledged {
                        Ok(n) if n >= required => {}
                        Ok(acknowledged) => {
                            // Taken, but a failover may not keep it: let it go.
                            let _ = held.release_now().await;
                            return Err(LockError::NotReplicated {
                                key: KeyName::new(key),
                                acknowledged,
                                required,
                                waited: started.elapsed(),
                            });
                        }
                        Err(e) => {
                            held.release_in_background_now();
                            return Err(e);
                        }
                    }
                    return Ok(LockGuard::new(key, fence as u64, lost_rx, Box::new(held)));
                }
                return Ok(LockGuard::new(key, fence as u64, lost_rx, Box::new(held)));
            }
            let waited = started.elapsed();
            if waited >= options.wait_timeout {
                // Every try was answered "held by someone else": nothing of ours to let go.
                let _ = pending.disarm();
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
