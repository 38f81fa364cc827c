//! The pub/sub bus (`cachet:invalidate:v1`): every instance publishes what it wrote or
//! invalidated, and drops what the others publish. It hears only writes made through
//! cachet; it is the fallback for servers that refuse client tracking, or a builder choice.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{Builder, ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::shared::Shared;
use crate::invalidation::{self, Message, Operation};
use crate::observe::ResetReason;
use crate::{CacheError, RedisCacheService};

/// How many pub/sub messages may wait for the listener before it counts as fallen behind
/// (and clears the L1): fred's default of 32 was overrun by a burst of a few hundred. fred
/// gives each of a client's ten event channels this capacity, preallocated: 4,096 costs
/// about 3 MiB per instance (16,384 cost 13 MiB, measured).
pub const SUBSCRIBER_CAPACITY: usize = 4_096;

pub(super) struct Bus {
    pub(super) channel: String,
    subscriber: SubscriberClient,
    listener: JoinHandle<()>,
    confirmer: JoinHandle<()>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop_tasks();
        let subscriber = self.subscriber.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
            });
        }
    }
}

impl Bus {
    /// Subscribes, starts the listener, and returns once this instance heard its own hello
    /// on the channel (fred's `subscribe` can return before the server has the
    /// subscription), within `bound`.
    pub(super) async fn start(
        shared: &Arc<Shared>,
        mut fred: Builder,
        server: &str,
        l2: &RedisCacheService,
        channel_prefix: &str,
        bound: Duration,
    ) -> Result<Bus, CacheError> {
        fred.with_performance_config(|perf| {
            perf.broadcast_channel_capacity = SUBSCRIBER_CAPACITY;
        });
        let subscriber = fred.build_subscriber_client().map_err(|e| {
            CacheError::config(
                format!("cannot configure a subscriber for {server}"),
                Some(Box::new(e)),
            )
        })?;
        let channel = invalidation::channel_name(channel_prefix, l2.namespace());
        let subscribed = async {
            subscriber.init().await?;
            subscriber.subscribe(channel.as_str()).await
        };
        let backend = |what: String| CacheError::backend(server.to_owned(), "subscribe", "", what);
        match tokio::time::timeout(bound, subscribed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CacheError::backend(server.to_owned(), "subscribe", "", e)),
            Err(_) => return Err(backend(format!("no subscription within {bound:?}"))),
        }
        let _resubscriber = subscriber.manage_subscriptions();
        let listener = tokio::spawn(listen(
            Arc::clone(shared),
            subscriber.message_rx(),
            subscriber.reconnect_rx(),
        ));
        let confirmer = tokio::spawn(confirm(
            Arc::clone(shared),
            l2.clone(),
            subscriber.clone(),
            channel.clone(),
        ));
        let bus = Bus {
            channel,
            subscriber,
            listener,
            confirmer,
        };
        let mut heard = shared.heard_self.subscribe();
        let hello = async {
            // Repeated: the server may not have the subscription in place yet.
            loop {
                bus.publish(shared, l2, Operation::Hello, "").await?;
                let wait = tokio::time::timeout(Duration::from_millis(100), heard.wait_for(|h| *h));
                match wait.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => return Err(backend(e.to_string())),
                    Err(_) => continue,
                }
            }
        };
        match tokio::time::timeout(bound, hello).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(backend(format!(
                    "did not hear its own hello on the channel within {bound:?}"
                )));
            }
        }
        shared.coherence.set_confirmed(true);
        Ok(bus)
    }

    /// Publishes `operation` for the other instances.
    pub(super) async fn publish(
        &self,
        shared: &Shared,
        l2: &RedisCacheService,
        operation: Operation,
        key: &str,
    ) -> Result<(), CacheError> {
        let hello = operation == Operation::Hello;
        let message = Message {
            origin: shared.instance_id,
            operation,
        };
        l2.client()
            .publish::<i64, _, _>(self.channel.as_str(), message.encode())
            .await
            .map(|_| {
                if !hello {
                    crate::observe::invalidation_sent();
                }
            })
            .map_err(|e| {
                CacheError::backend(
                    l2.server().to_owned(),
                    "publish",
                    key,
                    format!(
                        "the change reached Redis, but the other instances were not told to \
                         drop their copies (they expire within {:?}): {e}",
                        shared.l1_max_ttl
                    ),
                )
            })
    }

    fn stop_tasks(&self) {
        self.listener.abort();
        self.confirmer.abort();
    }

    /// Stops listening and disconnects the subscriber.
    pub(super) async fn stop(&self) {
        self.stop_tasks();
        let _ = self.subscriber.quit().await;
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
                Err(broadcast::error::RecvError::Lagged(_)) => shared.reset(ResetReason::Lagged),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            reconnect = reconnects.recv() => match reconnect {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    shared.reset_unconfirmed(ResetReason::Reconnect)
                }
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
