//! Server-assisted invalidation: `CLIENT TRACKING` (default mode, not BCAST) on the
//! connections that read, redirected to a connection of this instance's own that receives
//! the server's invalidations, so that the server tells this instance about any change to a
//! key it read (by any client, an expiry, an eviction, a flush), not only writes made through
//! cachet.
//!
//! - Why a separate invalidation connection (`REDIRECT` to a RESP2 subscriber of
//!   `__redis__:invalidate`) and not the RESP3 pushes on the reading connection: fred 10.1.0
//!   drops the push by which the server reports a flush (its key list is null), so a
//!   `FLUSHALL` would not be heard. On the pub/sub path fred reads the null as "every key".
//!   The reading connections speak RESP2 too: a RESP3 connection's flush notice reaches a
//!   RESP2 subscriber as a RESP3 null, which RESP2 cannot parse (seen on Redis 7.0).
//! - `NOLOOP`: this instance's own writes are not echoed back; it applies them to its L1
//!   itself, under the per-key version check.
//! - The races of the Redis client-side caching docs: an invalidation can overtake the reply
//!   to a read of its key (two connections): every fill checks a per-key version taken
//!   before the read was sent, so such a fill is dropped. The invalidation connection can be
//!   lost: on any error or reconnect of any connection involved the L1 is cleared and fills
//!   stop until tracking is confirmed on again; and every [`CHECK_EVERY`] each invalidation
//!   connection is pinged and each reading connection's `CLIENT TRACKINGINFO` checked (on,
//!   redirected to the right connection, not broken), so that a connection that died without
//!   the client hearing of it is noticed within about that period.
//! - Tracking is per connection and dies with it, and fred does not turn it on again after a
//!   reconnect (checked in fred 10.1.0's source: nothing re-sends `CLIENT TRACKING`). So on
//!   every reconnect or cluster topology change this module subscribes again where needed and
//!   turns tracking on again on every reading connection (on a cluster: per primary, pointed
//!   at that primary's invalidation connection), retrying with backoff (each failed round
//!   counted), and only then lets the L1 fill again.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fred::interfaces::{
    ClientInterface, ClientLike, EventInterface, PubsubInterface, TrackingInterface,
};
use fred::prelude::FredResult;
use fred::prelude::{Builder, Client, ClusterInterface};
use fred::types::config::{Server, ServerConfig};
use fred::types::{Value, client::Invalidation};
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use super::bus::SUBSCRIBER_CAPACITY;
use super::shared::Shared;
use crate::observe::ResetReason;
use crate::{CacheError, RedisCacheService};

/// The channel on which Redis sends redirected invalidations to a RESP2 connection.
const INVALIDATE_CHANNEL: &str = "__redis__:invalidate";

/// How often every invalidation connection is pinged and every reading connection's
/// tracking state checked: the bound on noticing a connection that died silently.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// No client id known (never subscribed, or the connection changed since).
const UNKNOWN: i64 = -1;

pub(super) struct Tracking {
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.stop();
        let nodes = std::mem::take(&mut *self.state.nodes());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for node in nodes {
                    node.close().await;
                }
            });
        }
    }
}

/// One invalidation connection: per primary on a cluster, else one.
struct Node {
    /// The cluster primary it connects to (`None`: the server the URL names, or the primary
    /// sentinel names).
    primary: Option<Server>,
    subscriber: Client,
    /// Its connection's client id while it is subscribed, else [`UNKNOWN`].
    id: Arc<AtomicI64>,
    listeners: Vec<JoinHandle<()>>,
}

impl Node {
    async fn close(self) {
        for listener in &self.listeners {
            listener.abort();
        }
        let _ = self.subscriber.quit().await;
    }
}

struct State {
    shared: Arc<Shared>,
    l2: RedisCacheService,
    /// How a subscriber is built (the L2's configuration, RESP2).
    template: Builder,
    bound: Duration,
    nodes: Mutex<Vec<Node>>,
    /// Bumped by every loss; a round confirms only if none happened while it ran. Held while
    /// a loss resets the L1 and while a round confirms, so that the two cannot interleave.
    losses: Mutex<u64>,
    wake: Notify,
}

impl State {
    fn nodes(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracking may be lost (a connection error, a reconnect, a topology change, a failed
    /// check): the L1 goes, fills stop, and the supervisor restores tracking.
    fn lost(&self) {
        let mut losses = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
        *losses += 1;
        if self.shared.coherence.is_confirmed() {
            self.shared.reset_unconfirmed(ResetReason::Lost);
        }
        drop(losses);
        self.wake.notify_one();
    }

    fn losses(&self) -> u64 {
        *self.losses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Confirms tracking on unless a loss happened since `seen`.
    fn confirm(&self, seen: u64) -> bool {
        let losses = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
        if *losses != seen {
            return false;
        }
        self.shared.coherence.set_confirmed(true);
        true
    }

    fn backend_error(&self, what: impl std::fmt::Display) -> CacheError {
        CacheError::backend(
            self.l2.server().to_owned(),
            "client tracking",
            "",
            what.to_string(),
        )
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        future: impl Future<Output = Result<T, E>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.bound, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.backend_error(format!("{what}: {e}"))),
            Err(_) => Err(self.backend_error(format!("{what}: no answer within {:?}", self.bound))),
        }
    }
}

impl Tracking {
    /// Connects the invalidation connection(s), turns tracking on for every reading
    /// connection of `l2` (which must speak RESP2) and starts listening. An error means the
    /// server refused it (or is unreachable).
    pub(super) async fn start(
        shared: &Arc<Shared>,
        l2: &RedisCacheService,
        mut template: Builder,
        bound: Duration,
    ) -> Result<Tracking, CacheError> {
        template.with_performance_config(|perf| {
            perf.broadcast_channel_capacity = SUBSCRIBER_CAPACITY;
        });
        let state = Arc::new(State {
            shared: Arc::clone(shared),
            l2: l2.clone(),
            template,
            bound,
            nodes: Mutex::new(Vec::new()),
            losses: Mutex::new(0),
            wake: Notify::new(),
        });
        let seen = state.losses();
        if let Err(e) = round(&state).await {
            let nodes = std::mem::take(&mut *state.nodes());
            for node in nodes {
                node.close().await;
            }
            return Err(e);
        }
        let mut tasks: Vec<JoinHandle<()>> = l2
            .clients()
            .into_iter()
            .map(|client| tokio::spawn(watch_reader(Arc::clone(&state), client)))
            .collect();
        state.confirm(seen);
        tasks.push(tokio::spawn(supervise(Arc::clone(&state))));
        Ok(Tracking { state, tasks })
    }

    pub(super) fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
        for node in self.state.nodes().iter() {
            for listener in &node.listeners {
                listener.abort();
            }
        }
    }
}

/// Restores tracking after every loss, and checks the connections every [`CHECK_EVERY`].
async fn supervise(state: Arc<State>) {
    loop {
        let woken = tokio::select! {
            () = state.wake.notified() => true,
            () = tokio::time::sleep(CHECK_EVERY) => false,
        };
        if !woken && state.shared.coherence.is_confirmed() {
            if check(&state).await {
                continue;
            }
            state.lost();
        }
        restore(&state).await;
    }
}

/// Rounds until one runs without a loss happening meanwhile; failed rounds are counted and
/// retried with backoff.
async fn restore(state: &Arc<State>) {
    let mut delay = Duration::from_millis(20);
    loop {
        let seen = state.losses();
        match round(state).await {
            Ok(()) if state.confirm(seen) => return,
            Ok(()) => {}
            Err(_) => {
                state.shared.confirm_failures.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Every invalidation connection subscribed (a new one where the primaries changed or a
/// connection was replaced), and tracking on for every reading connection, redirected to the
/// invalidation connection of the server it reads from.
async fn round(state: &Arc<State>) -> Result<(), CacheError> {
    let clustered = state.l2.client().is_clustered();
    let primaries: Vec<Option<Server>> = if clustered {
        let routing = state
            .l2
            .client()
            .cached_cluster_state()
            .ok_or_else(|| state.backend_error("no cluster state yet"))?;
        routing
            .unique_primary_nodes()
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None]
    };
    for node in drop_departed(state, &primaries) {
        node.close().await;
    }
    for primary in primaries {
        if !state.nodes().iter().any(|n| n.primary == primary) {
            let node = connect(state, primary).await?;
            state.nodes().push(node);
        }
    }
    let nodes: Vec<(Option<Server>, Client, Arc<AtomicI64>)> = state
        .nodes()
        .iter()
        .map(|n| (n.primary.clone(), n.subscriber.clone(), Arc::clone(&n.id)))
        .collect();
    for (primary, subscriber, id) in nodes {
        let mut current = id.load(Ordering::SeqCst);
        if current == UNKNOWN {
            current = subscribe(state, &subscriber).await?;
            id.store(current, Ordering::SeqCst);
        }
        for client in state.l2.clients() {
            let on = match &primary {
                Some(server) => track_on(&client.with_cluster_node(server.clone()), current).await,
                None => track_on(&client, current).await,
            };
            state
                .bounded("CLIENT TRACKING ON REDIRECT", async { on })
                .await?;
        }
    }
    Ok(())
}

/// Takes out the nodes whose primary is no longer one.
fn drop_departed(state: &State, primaries: &[Option<Server>]) -> Vec<Node> {
    let mut nodes = state.nodes();
    let (keep, departed) = std::mem::take(&mut *nodes)
        .into_iter()
        .partition(|n| primaries.contains(&n.primary));
    *nodes = keep;
    departed
}

/// A new invalidation connection to `primary` (not yet subscribed), listened to.
async fn connect(state: &Arc<State>, primary: Option<Server>) -> Result<Node, CacheError> {
    let mut builder = state.template.clone();
    if let Some(server) = &primary {
        builder.with_config(|config| {
            config.server = ServerConfig::Centralized {
                server: server.clone(),
            };
        });
    }
    let subscriber = builder.build().map_err(|e| {
        CacheError::config(
            format!("cannot configure an invalidation connection for {primary:?}"),
            Some(Box::new(e)),
        )
    })?;
    if let Err(e) = state.bounded("connect", subscriber.init()).await {
        let _ = subscriber.quit().await;
        return Err(e);
    }
    let id = Arc::new(AtomicI64::new(UNKNOWN));
    let listeners = watch_subscriber(state, &subscriber, &id);
    Ok(Node {
        primary,
        subscriber,
        id,
        listeners,
    })
}

/// `CLIENT ID`, then `SUBSCRIBE __redis__:invalidate` (after which RESP2 allows only pub/sub
/// commands and `PING`). A connection found already subscribed (fred replayed a
/// `SUBSCRIBE` after a reconnect) is unsubscribed, and the round fails, to be retried.
async fn subscribe(state: &State, subscriber: &Client) -> Result<i64, CacheError> {
    let id = match state
        .bounded("CLIENT ID", subscriber.client_id::<i64>())
        .await
    {
        Ok(id) => id,
        Err(e) => {
            let _ = state
                .bounded("UNSUBSCRIBE", subscriber.unsubscribe(INVALIDATE_CHANNEL))
                .await;
            return Err(e);
        }
    };
    state
        .bounded("SUBSCRIBE", subscriber.subscribe(INVALIDATE_CHANNEL))
        .await?;
    Ok(id)
}

/// The invalidation connection's events: invalidations applied as they come; an error or a
/// reconnect means its id changed (or will): tracking must be pointed at it again.
fn watch_subscriber(
    state: &Arc<State>,
    subscriber: &Client,
    id: &Arc<AtomicI64>,
) -> Vec<JoinHandle<()>> {
    let shared = Arc::clone(&state.shared);
    let namespace = state.l2.namespace().to_owned();
    let mut invalidations = subscriber.invalidation_rx();
    let applier = tokio::spawn(async move {
        loop {
            match invalidations.recv().await {
                Ok(invalidation) => apply(&shared, &namespace, &invalidation),
                // Some were lost: the L1 goes (the stream itself is live).
                Err(broadcast::error::RecvError::Lagged(_)) => shared.reset(ResetReason::Lagged),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    vec![
        applier,
        watch_connection(state, subscriber, Some(Arc::clone(id))),
    ]
}

/// A reading connection's events: an error, a reconnect or a topology change loses tracking.
async fn watch_reader(state: Arc<State>, client: Client) {
    let mut changes = client.cluster_change_rx();
    let connection = watch_connection(&state, &client, None);
    while let Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) = changes.recv().await {
        state.lost();
    }
    connection.abort();
}

/// Calls [`State::lost`] (after forgetting `id`) on every error or reconnect of `client`.
fn watch_connection(
    state: &Arc<State>,
    client: &Client,
    id: Option<Arc<AtomicI64>>,
) -> JoinHandle<()> {
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        loop {
            let closed = tokio::select! {
                e = errors.recv() => matches!(e, Err(broadcast::error::RecvError::Closed)),
                r = reconnects.recv() => matches!(r, Err(broadcast::error::RecvError::Closed)),
            };
            if closed {
                return;
            }
            let Some(state) = weak.upgrade() else { return };
            if let Some(id) = &id {
                id.store(UNKNOWN, Ordering::SeqCst);
            }
            state.lost();
        }
    })
}

/// One check of every connection: each invalidation connection answers a `PING`, each
/// reading connection reports tracking on, redirected to its server's invalidation
/// connection, and not broken. A connection that failed is replaced.
async fn check(state: &State) -> bool {
    let nodes: Vec<(Option<Server>, Client, Arc<AtomicI64>)> = state
        .nodes()
        .iter()
        .map(|n| (n.primary.clone(), n.subscriber.clone(), Arc::clone(&n.id)))
        .collect();
    let mut healthy = true;
    for (primary, subscriber, id) in nodes {
        let expected = id.load(Ordering::SeqCst);
        if state
            .bounded("PING", subscriber.ping::<Value>(None))
            .await
            .is_err()
        {
            id.store(UNKNOWN, Ordering::SeqCst);
            let _ = subscriber.force_reconnection().await;
            healthy = false;
            continue;
        }
        for client in state.l2.clients() {
            let info = match &primary {
                Some(server) => {
                    tracking_info(state, &client.with_cluster_node(server.clone())).await
                }
                None => tracking_info(state, &client).await,
            };
            if !info.is_ok_and(|info| tracking_ok(&info, expected)) {
                healthy = false;
            }
        }
    }
    healthy
}

/// `CLIENT TRACKING ON REDIRECT <redirect> NOLOOP` on `client` (a connection, or one node's).
async fn track_on<C: ClientInterface + Sync>(client: &C, redirect: i64) -> FredResult<Value> {
    client
        .client_tracking("on", Some(redirect), None, false, false, false, true)
        .await
}

/// `CLIENT TRACKINGINFO` on `client` (a connection, or one node's), bounded.
async fn tracking_info<C: ClientInterface + Sync>(
    state: &State,
    client: &C,
) -> Result<Value, CacheError> {
    state
        .bounded("CLIENT TRACKINGINFO", client.client_trackinginfo::<Value>())
        .await
}

/// Whether a `CLIENT TRACKINGINFO` reply says tracking is on, redirected to `expected`, and
/// that connection still exists.
fn tracking_ok(info: &Value, expected: i64) -> bool {
    let Value::Array(fields) = info else {
        // RESP3 would answer with a map; the reading connections speak RESP2.
        return false;
    };
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|pair| pair[0].as_str().as_deref() == Some(name))
            .and_then(|pair| pair.get(1))
    };
    let flags: Vec<String> = match field("flags") {
        Some(Value::Array(flags)) => flags
            .iter()
            .filter_map(|f| f.as_str().map(|s| s.into_owned()))
            .collect(),
        _ => return false,
    };
    let redirect = field("redirect").and_then(Value::as_i64);
    flags.iter().any(|f| f == "on")
        && !flags.iter().any(|f| f == "broken_redirect")
        && redirect == Some(expected)
}

/// Drops the keys the server says changed (a flush: all of them).
fn apply(shared: &Shared, namespace: &str, invalidation: &Invalidation) {
    if invalidation.keys.is_empty() {
        shared.drop_all();
    } else {
        for key in &invalidation.keys {
            // Keys outside this service's namespace (or not UTF-8) are none of its own.
            if let Some(key) = key.as_str().and_then(|k| k.strip_prefix(namespace)) {
                shared.drop_key(key);
            }
        }
    }
    shared.count_applied();
}
