//! Many instances, one truth: an in-memory L1 per instance in front of Redis (L2), kept
//! coherent by invalidation messages over Redis pub/sub.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::envelope::Envelope;
use crate::invalidation::{self, Message, Operation};
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
/// - Pub/sub is at most once: when the subscriber reconnects, the instance clears its whole
///   L1, since messages may have been lost; and L1 entries live at most the L1 maximum, which
///   bounds staleness even then.
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
}

/// What the listener task shares with the service.
struct Shared {
    l1: MokaCacheService,
    l1_max_ttl: Duration,
    instance_id: u64,
    /// Bumped by every invalidation (local or remote) and L1 reset: an L1 fill that read L2
    /// before a bump is dropped.
    epoch: AtomicU64,
    /// Remote messages applied, L1 resets and malformed messages, for tests and metrics.
    applied: watch::Sender<u64>,
    resets: AtomicU64,
    malformed: AtomicU64,
    /// Set when this instance hears its own hello: its subscription is live.
    heard_self: watch::Sender<bool>,
}

impl Shared {
    async fn apply(&self, message: Message) {
        if message.origin == self.instance_id {
            if message.operation == Operation::Hello {
                self.heard_self.send_replace(true);
            }
            return;
        }
        if message.operation == Operation::Hello {
            return;
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match message.operation {
            Operation::Key(key) => {
                let _ = self.l1.invalidate(&key).await;
            }
            Operation::Prefix(prefix) => {
                let _ = self.l1.invalidate_prefix(&prefix).await;
            }
            Operation::Clear => self.l1.clear(),
            Operation::Hello => {}
        }
        self.applied.send_modify(|n| *n += 1);
    }

    fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.l1.clear();
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.applied.send_modify(|n| *n += 1);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
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
                        Ok(message) => shared.apply(message).await,
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
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => shared.reset(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
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
        matches!(self.inner.shared.l1.get_bytes_now(key), Some(Ok(Some(_))))
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
        let _ = self.inner.subscriber.quit().await;
        // Nothing heard from now on: what the L1 holds may go stale, so drop it.
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

    fn l1_fill(&self, key: &str, envelope: &Envelope, epoch_before: u64) {
        let shared = &self.inner.shared;
        let ttl = envelope.remaining().min(shared.l1_max_ttl);
        if ttl.is_zero() || shared.epoch.load(Ordering::SeqCst) != epoch_before {
            return;
        }
        shared.l1.insert_for(key, envelope.payload.clone(), ttl);
        // An invalidation that raced the fill: drop what was just put in.
        if shared.epoch.load(Ordering::SeqCst) != epoch_before {
            shared.l1.forget(key);
        }
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
        if let Some(Ok(Some(hit))) = self.inner.shared.l1.get_bytes_now(key) {
            return Ok(Some(hit));
        }
        let epoch = self.inner.shared.epoch.load(Ordering::SeqCst);
        let Some(stored) = self.inner.l2.get_bytes(key).await? else {
            return Ok(None);
        };
        let envelope = Envelope::decode(key, &stored)?;
        if envelope.remaining().is_zero() {
            return Ok(None);
        }
        self.l1_fill(key, &envelope, epoch);
        Ok(Some(envelope.payload))
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        match self.inner.shared.l1.get_bytes_now(key) {
            Some(Ok(Some(hit))) => Some(Ok(Some(hit))),
            _ => None, // a miss in L1 says nothing about L2
        }
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        let ttl = resolve_ttl(key, ttl_secs, self.inner.l2.default_ttl())?;
        let envelope = Envelope::new(value, ttl);
        self.inner
            .l2
            .set_bytes(key, envelope.encode(), ttl_secs)
            .await?;
        let shared = &self.inner.shared;
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        shared
            .l1
            .insert_for(key, envelope.payload, ttl.min(shared.l1_max_ttl));
        self.publish(Operation::Key(key.to_owned()), key).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.l2.invalidate(key).await?;
        self.inner.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.inner.shared.l1.forget(key);
        self.publish(Operation::Key(key.to_owned()), key).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let removed = self.inner.l2.invalidate_prefix(prefix).await?;
        self.inner.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.inner.shared.l1.invalidate_prefix(prefix).await?;
        self.publish(Operation::Prefix(prefix.to_owned()), prefix)
            .await?;
        Ok(removed)
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
        let (fred, server, _) = self.redis.fred_builder()?;
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
            epoch: AtomicU64::new(0),
            applied,
            resets: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            heard_self,
        });
        let listener = tokio::spawn(listen(
            Arc::clone(&shared),
            subscriber.message_rx(),
            subscriber.reconnect_rx(),
        ));
        let service = TieredCacheService {
            inner: Arc::new(Inner {
                shared,
                l2,
                channel,
                subscriber,
                listener,
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
        Ok(service)
    }
}

/// A random id for this instance.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), std::time::Instant::now()))
}
