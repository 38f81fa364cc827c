//! Many instances, one truth: an in-memory L1 per instance in front of Redis (L2), kept
//! coherent by invalidation messages over Redis pub/sub, with every L1 insert checked
//! against per-key versions (the `coherence` module) so that no write path can put a value into the
//! L1 that a concurrent write or invalidation overtook.

mod coherence;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;

use self::coherence::{Coherence, Ticket};
use crate::envelope::Envelope;
use crate::invalidation::{self, Message, Operation};
use crate::load::{Lease, LeaseRead, LeaseRequest};
use crate::service::resolve_ttl;
use crate::{
    CacheError, CacheService, MokaCacheService, RedisCacheService, RedisCacheServiceBuilder,
};

/// Default longest life of an L1 entry: it bounds how stale an instance can be if an
/// invalidation message is lost.
pub const DEFAULT_L1_MAX_TTL: Duration = Duration::from_secs(30);

/// An in-memory L1 per instance in front of Redis (L2).
///
/// - `get`: the L1 if it has the key, else L2, then the L1 is filled for
///   `min(the value's remaining TTL in L2, the L1 maximum)` (default 30 s). The remaining TTL
///   comes from a small envelope stored with the value (see [`crate::envelope`]), so a fill
///   costs no extra round trip.
/// - `set`, `invalidate`, `invalidate_prefix`: L2 first, then the local L1, then a message on
///   the pub/sub channel tells every other instance to drop its copy.
/// - No L1 insert is overtaken: each checks a per-key version read before its L2 round trip,
///   and a write or invalidation of the key handled meanwhile drops it.
/// - Pub/sub is at most once: when the subscriber reconnects, the instance clears its whole
///   L1, since messages may have been lost, and fills it again only once it hears its own
///   hello on the new subscription ([`subscription_confirmed`](Self::subscription_confirmed));
///   L1 entries live at most the L1 maximum, which bounds staleness even then.
///
/// The guarantee: after a write or invalidation returned, a read on the instance that made it
/// sees it, and a read on another instance sees it once the message arrives (about a
/// millisecond on a LAN; measured), or after that instance's reconnect when messages were
/// lost, and in no case later than the L1 lifetime (30 s by default).
///
/// Values in L2 are enveloped: read them through a tiered service, not a plain
/// [`RedisCacheService`].
///
/// When to choose it: many instances reading the same hot keys (org contexts on every
/// request), where a local hit (hundreds of nanoseconds) instead of a round trip matters and a
/// short bounded staleness after a lost message is acceptable.
///
/// ```no_run
/// use std::time::Duration;
/// use cachet::{CacheServiceExt, RedisCacheService, TieredCacheService};
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
/// let cache = TieredCacheService::builder(RedisCacheService::builder("redis://127.0.0.1:6379"))
///     .l1_max_ttl(Duration::from_secs(10))
///     .build()
///     .await?;
/// cache.set("org:acme", &"Acme", None).await?; // L2, L1, then the other instances are told
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TieredCacheService {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    l2: RedisCacheService,
    channel: String,
    subscriber: SubscriberClient,
    listener: JoinHandle<()>,
    confirmer: JoinHandle<()>,
}

/// How many pub/sub messages may wait for the listener before it counts as fallen behind
/// (and clears the L1): fred's default of 32 was overrun by a burst of a few hundred.
pub const SUBSCRIBER_CAPACITY: usize = 16_384;

/// What the listener task shares with the service.
struct Shared {
    l1: MokaCacheService,
    l1_max_ttl: Duration,
    instance_id: u64,
    /// The per-key versions every L1 insert checks (see [`coherence`]).
    coherence: Coherence,
    /// Remote messages applied, L1 resets and malformed messages, for tests and metrics.
    applied: watch::Sender<u64>,
    resets: AtomicU64,
    malformed: AtomicU64,
    /// Hellos sent after a reconnect that this instance did not hear back in time, and
    /// explicit re-subscriptions that failed: a subscription that stays broken says so.
    confirm_failures: AtomicU64,
    /// Set when this instance hears its own hello: its subscription is live.
    heard_self: watch::Sender<bool>,
    /// Wakes the confirmer after a reset.
    reconfirm: Notify,
}

impl Shared {
    fn apply(self: &Arc<Self>, message: Message) {
        if message.origin == self.instance_id {
            if message.operation == Operation::Hello {
                self.heard_self.send_replace(true);
            }
            return;
        }
        match message.operation {
            Operation::Key(key) => {
                self.coherence.touch(&key);
                self.l1.forget(&key);
            }
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
            Operation::Clear => {
                self.coherence.touch_all();
                self.l1.clear();
            }
            Operation::Hello => return,
        }
        self.applied.send_modify(|n| *n += 1);
    }

    /// Messages may have been lost: drop the whole L1.
    fn reset(&self) {
        self.coherence.touch_all();
        self.l1.clear();
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.applied.send_modify(|n| *n += 1);
    }

    /// The subscription was re-established: drop the L1, and fill it again only once this
    /// instance hears its own hello on the new subscription.
    fn reset_unconfirmed(&self) {
        self.coherence.set_confirmed(false);
        self.heard_self.send_replace(false);
        self.reset();
        self.reconfirm.notify_one();
    }

    /// An L1 hit for `key`, unless a prefix scan covering it is still running.
    fn l1_hit(&self, key: &str) -> Option<Bytes> {
        match self.l1.get_bytes_now(key) {
            Some(Ok(Some(hit))) if !self.coherence.is_pending(key) => Some(hit),
            _ => None,
        }
    }

    /// Puts a value read from L2 into the L1 if nothing touched its key since `ticket`.
    fn fill(&self, key: &str, envelope: &Envelope, ticket: &Ticket) {
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
    fn own_write(&self, key: &str, payload: Bytes, ttl: Duration, ticket: &Ticket) {
        let Some(after) = self.coherence.own_write(ticket) else {
            self.l1.forget(key);
            return;
        };
        self.l1.insert_for(key, payload, ttl.min(self.l1_max_ttl));
        if !self.coherence.still_valid(&after) {
            self.l1.forget(key);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
        self.confirmer.abort();
        let subscriber = self.subscriber.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
            });
        }
    }
}

/// The listener: applies other instances' messages; resets the L1 after a reconnection or
/// when it fell behind (messages were lost either way). Ends when the service is dropped.
async fn listen(
    shared: Arc<Shared>,
    mut messages: broadcast::Receiver<fred::types::Message>,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
) {
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => {
                    let parsed = message
                        .value
                        .as_bytes()
                        .ok_or_else(|| CacheError::config("not a byte string", None))
                        .and_then(Message::decode);
                    match parsed {
                        Ok(message) => shared.apply(message),
                        // A malformed message is counted and ignored.
                        Err(_) => {
                            shared.malformed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => shared.reset(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            reconnect = reconnects.recv() => match reconnect {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => shared.reset_unconfirmed(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// After each reset that needs it: publishes hellos until this instance hears one back on
/// its subscription, re-subscribing every few attempts, with backoff; counts each failed
/// round. Only then may the L1 fill again.
async fn confirm(
    shared: Arc<Shared>,
    l2: RedisCacheService,
    subscriber: SubscriberClient,
    channel: String,
) {
    loop {
        shared.reconfirm.notified().await;
        let mut heard = shared.heard_self.subscribe();
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let hello = Message {
                origin: shared.instance_id,
                operation: Operation::Hello,
            };
            let published = l2
                .client()
                .publish::<i64, _, _>(channel.as_str(), hello.encode())
                .await
                .is_ok();
            let wait = tokio::time::timeout(
                delay.max(Duration::from_millis(200)),
                heard.wait_for(|h| *h),
            );
            if published && matches!(wait.await, Ok(Ok(_))) {
                shared.coherence.set_confirmed(true);
                break;
            }
            shared.confirm_failures.fetch_add(1, Ordering::SeqCst);
            if attempt % 3 == 0 && subscriber.subscribe(channel.as_str()).await.is_err() {
                shared.confirm_failures.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

impl TieredCacheService {
    /// A builder over the Redis settings of L2 (and of the pub/sub subscriber).
    pub fn builder(redis: RedisCacheServiceBuilder) -> TieredCacheServiceBuilder {
        TieredCacheServiceBuilder {
            redis,
            l1_max_ttl: DEFAULT_L1_MAX_TTL,
            l1: MokaCacheService::builder(),
            channel_prefix: invalidation::DEFAULT_CHANNEL_PREFIX.to_owned(),
        }
    }

    /// This instance's id in invalidation messages.
    pub fn instance_id(&self) -> u64 {
        self.inner.shared.instance_id
    }

    /// The pub/sub channel.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The longest life of an L1 entry.
    pub fn l1_max_ttl(&self) -> Duration {
        self.inner.shared.l1_max_ttl
    }

    /// Whether this instance's L1 holds `key` now.
    pub fn cached_locally(&self, key: &str) -> bool {
        self.inner.shared.l1_hit(key).is_some()
    }

    /// Whether this instance's subscription is confirmed live (it heard its own hello since
    /// the last reconnect). While it is not, the L1 stays empty and every read goes to Redis.
    pub fn subscription_confirmed(&self) -> bool {
        self.inner.shared.coherence.is_confirmed()
    }

    /// Waits until [`subscription_confirmed`](Self::subscription_confirmed), at most
    /// `timeout`; whether it is.
    pub async fn wait_until_confirmed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.subscription_confirmed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Rounds since this instance was built in which a reconnected subscription could not
    /// be confirmed (a hello not heard back in time, a re-subscription refused). Rising
    /// while [`subscription_confirmed`](Self::subscription_confirmed) stays false means the
    /// instance cannot hear the others, and serves from Redis only, until it can.
    pub fn subscription_failures(&self) -> u64 {
        self.inner.shared.confirm_failures.load(Ordering::SeqCst)
    }

    /// Other instances' messages applied plus L1 resets so far.
    pub fn invalidations_applied(&self) -> u64 {
        *self.inner.shared.applied.borrow()
    }

    /// Waits until [`invalidations_applied`](Self::invalidations_applied) reaches
    /// `at_least`, at most `timeout`; whether it did.
    pub async fn wait_for_invalidations(&self, at_least: u64, timeout: Duration) -> bool {
        let mut applied = self.inner.shared.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|n| *n >= at_least))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many times the L1 was cleared because messages may have been lost (subscriber
    /// reconnections, a listener that fell behind).
    pub fn l1_resets(&self) -> u64 {
        self.inner.shared.resets.load(Ordering::SeqCst)
    }

    /// Malformed messages seen on the channel (ignored).
    pub fn malformed_messages(&self) -> u64 {
        self.inner.shared.malformed.load(Ordering::SeqCst)
    }

    /// Stops listening: the listener task ends and the subscriber disconnects. Later reads
    /// and writes still work but, with no listener, this instance no longer hears the others:
    /// call it when the instance is going away (dropping the last handle does the same).
    pub async fn shutdown(&self) {
        self.inner.listener.abort();
        self.inner.confirmer.abort();
        let _ = self.inner.subscriber.quit().await;
        // Nothing heard from now on: what the L1 holds may go stale, so drop it, and keep
        // it empty.
        self.inner.shared.coherence.set_confirmed(false);
        self.inner.shared.reset();
    }

    /// Publishes `operation` for the other instances.
    async fn publish(&self, operation: Operation, key: &str) -> Result<(), CacheError> {
        let message = Message {
            origin: self.inner.shared.instance_id,
            operation,
        };
        self.inner
            .l2
            .client()
            .publish::<i64, _, _>(self.inner.channel.as_str(), message.encode())
            .await
            .map(drop)
            .map_err(|e| {
                CacheError::backend(
                    self.inner.l2.server().to_owned(),
                    "publish",
                    key,
                    format!(
                        "the change reached Redis, but the other instances were not told to \
                         drop their copies (they expire within {:?}): {e}",
                        self.inner.shared.l1_max_ttl
                    ),
                )
            })
    }
}

impl fmt::Debug for TieredCacheService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCacheService")
            .field("l2", &self.inner.l2)
            .field("l1_max_ttl", &self.inner.shared.l1_max_ttl)
            .field("channel", &self.inner.channel)
            .field("instance_id", &self.inner.shared.instance_id)
            .finish()
    }
}

#[async_trait]
impl CacheService for TieredCacheService {
    fn flight_scope(&self) -> u64 {
        // Every clone shares `inner` (and so the store).
        Arc::as_ptr(&self.inner).addr() as u64
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let shared = &self.inner.shared;
        if let Some(hit) = shared.l1_hit(key) {
            return Ok(Some(hit));
        }
        let ticket = shared.coherence.ticket(key);
        let Some(stored) = self.inner.l2.get_bytes(key).await? else {
            return Ok(None);
        };
        let envelope = Envelope::decode(key, &stored)?;
        if envelope.remaining().is_zero() {
            return Ok(None);
        }
        shared.fill(key, &envelope, &ticket);
        Ok(Some(envelope.payload))
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        // A miss in L1 says nothing about L2.
        self.inner.shared.l1_hit(key).map(|hit| Ok(Some(hit)))
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.default_ttl())?;
        let envelope = Envelope::new(value, ttl);
        let shared = &self.inner.shared;
        let ticket = shared.coherence.ticket(key);
        self.inner
            .l2
            .set_bytes(key, envelope.encode(), ttl_secs)
            .await?;
        shared.own_write(key, envelope.payload, ttl, &ticket);
        self.publish(Operation::Key(key.to_owned()), key).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.l2.invalidate(key).await?;
        self.inner.shared.coherence.touch(key);
        self.inner.shared.l1.forget(key);
        self.publish(Operation::Key(key.to_owned()), key).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let removed = self.inner.l2.invalidate_prefix(prefix).await?;
        self.inner.shared.coherence.touch_all();
        self.inner.shared.l1.invalidate_prefix(prefix).await?;
        self.publish(Operation::Prefix(prefix.to_owned()), prefix)
            .await?;
        Ok(removed)
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        let shared = &self.inner.shared;
        let mut request = std::borrow::Cow::Borrowed(request);
        // Twice at most: a value found past its envelope's expiry is replaced by the lease.
        for _ in 0..2 {
            let ticket = shared.coherence.ticket(key);
            match self.inner.l2.lease(key, &request).await? {
                LeaseRead::Value { value, version } => {
                    let envelope = match Envelope::decode(key, &value) {
                        Ok(envelope) => envelope,
                        Err(error) => return Ok(LeaseRead::Unreadable { error, version }),
                    };
                    if envelope.remaining().is_zero() {
                        request.to_mut().replace = Some(version);
                        continue;
                    }
                    shared.fill(key, &envelope, &ticket);
                    return Ok(LeaseRead::Value {
                        value: envelope.payload,
                        version,
                    });
                }
                LeaseRead::Granted(lease) => {
                    // Whatever this L1 held for the key (an unusable copy) goes.
                    shared.coherence.touch(key);
                    shared.l1.forget(key);
                    return Ok(LeaseRead::Granted(lease));
                }
                other => return Ok(other),
            }
        }
        // It changed under us twice: let the caller ask again.
        Ok(LeaseRead::Held {
            remaining: Duration::ZERO,
        })
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.default_ttl())?;
        let envelope = Envelope::new(value, ttl);
        let shared = &self.inner.shared;
        let ticket = shared.coherence.ticket(key);
        let stored = self
            .inner
            .l2
            .set_leased(key, lease, envelope.encode(), ttl_secs)
            .await?;
        // The key held our lease, so no instance holds a usable copy: nobody to tell.
        if stored {
            shared.own_write(key, envelope.payload, ttl, &ticket);
        }
        Ok(stored)
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.inner.l2.release_lease(key, lease).await
    }
}

/// Builds a [`TieredCacheService`].
#[derive(Debug, Clone)]
pub struct TieredCacheServiceBuilder {
    redis: RedisCacheServiceBuilder,
    l1_max_ttl: Duration,
    l1: crate::MokaCacheServiceBuilder,
    channel_prefix: String,
}

impl TieredCacheServiceBuilder {
    /// The longest life of an L1 entry (default 30 s): the bound on staleness when a message
    /// is lost.
    pub fn l1_max_ttl(mut self, ttl: Duration) -> Self {
        self.l1_max_ttl = ttl;
        self
    }

    /// L1 capacity in entries (default 10 000).
    pub fn l1_max_entries(mut self, n: u64) -> Self {
        self.l1 = self.l1.max_entries(n);
        self
    }

    /// L1 capacity in bytes instead of entries.
    pub fn l1_max_bytes(mut self, n: u64) -> Self {
        self.l1 = self.l1.max_bytes(n);
        self
    }

    /// The channel prefix (default `"cachet:invalidate:"`; the channel is `<prefix>v1`).
    /// Instances that must see each other's invalidations use the same one.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// Connects L2 and the subscriber, subscribes, and starts the listener.
    pub async fn build(self) -> Result<TieredCacheService, CacheError> {
        if self.l1_max_ttl.is_zero() {
            return Err(CacheError::config(
                "l1_max_ttl must be longer than zero",
                None,
            ));
        }
        let l1 = self.l1.build()?;
        let (mut fred, server, _) = self.redis.fred_builder()?;
        fred.with_performance_config(|perf| {
            perf.broadcast_channel_capacity = SUBSCRIBER_CAPACITY;
        });
        let bound = self.redis.connect_bound();
        let l2 = self.redis.build().await?;
        let subscriber = fred.build_subscriber_client().map_err(|e| {
            CacheError::config(
                format!("cannot configure a subscriber for {server}"),
                Some(Box::new(e)),
            )
        })?;
        let channel = invalidation::channel_name(&self.channel_prefix);
        let subscribed = async {
            subscriber.init().await?;
            subscriber.subscribe(channel.as_str()).await
        };
        match tokio::time::timeout(bound, subscribed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CacheError::backend(server, "subscribe", "", e)),
            Err(_) => {
                return Err(CacheError::backend(
                    server,
                    "subscribe",
                    "",
                    format!("no subscription within {bound:?}"),
                ));
            }
        }
        let _resubscriber = subscriber.manage_subscriptions();
        let (applied, _) = watch::channel(0);
        let (heard_self, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            l1,
            l1_max_ttl: self.l1_max_ttl,
            instance_id: instance_id(),
            coherence: Coherence::new(),
            applied,
            resets: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            confirm_failures: AtomicU64::new(0),
            heard_self,
            reconfirm: Notify::new(),
        });
        let listener = tokio::spawn(listen(
            Arc::clone(&shared),
            subscriber.message_rx(),
            subscriber.reconnect_rx(),
        ));
        let confirmer = tokio::spawn(confirm(
            Arc::clone(&shared),
            l2.clone(),
            subscriber.clone(),
            channel.clone(),
        ));
        let service = TieredCacheService {
            inner: Arc::new(Inner {
                shared,
                l2,
                channel,
                subscriber,
                listener,
                confirmer,
            }),
        };
        // Serve only once the subscription is known to be live: publish a hello and wait
        // to hear it back (others ignore it).
        let mut heard = service.inner.shared.heard_self.subscribe();
        let hello = async {
            // Repeated: the server may not have the subscription in place yet.
            loop {
                service.publish(Operation::Hello, "").await?;
                let wait = tokio::time::timeout(Duration::from_millis(100), heard.wait_for(|h| *h));
                match wait.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => {
                        return Err(CacheError::backend(server.clone(), "subscribe", "", e));
                    }
                    Err(_) => continue,
                }
            }
        };
        match tokio::time::timeout(bound, hello).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(CacheError::backend(
                    server,
                    "subscribe",
                    "",
                    format!("did not hear its own hello on the channel within {bound:?}"),
                ));
            }
        }
        service.inner.shared.coherence.set_confirmed(true);
        Ok(service)
    }
}

/// A random id for this instance.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), std::time::Instant::now()))
}
