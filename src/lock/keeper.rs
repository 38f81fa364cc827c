//! The lease keeper of one [`RedisConcurrencyService`](super::RedisConcurrencyService): one
//! task that renews every held lease about every third of it and marks a guard lost at the
//! lease's end unless a renewal confirmed first, whatever the server does meanwhile (a
//! renewal that gets no answer does not hold the verdict back).
//!
//! Taking and releasing a lock only touch the map (no task per lock); the keeper is woken
//! only when a new lease is due before everything it already waits for.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use fred::prelude::Client;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, watch};

use super::redis::renew_script;

/// One held lease, as the keeper tracks it.
pub(super) struct Lease {
    pub(super) client: Client,
    pub(super) lock_key: String,
    pub(super) token: String,
    pub(super) lease: Duration,
    pub(super) renew: bool,
    /// Until when the lease is known to hold, by this process's clock: the send time of the
    /// command that set or last extended it, plus the lease, less the clock drift allowance
    /// ([`drift`]). The guard is lost from then on unless a renewal confirmed first.
    pub(super) valid_until: Instant,
    pub(super) lost: watch::Sender<bool>,
}

/// What the lease's end is moved forward by, for the server's and this process's clocks
/// running at slightly different rates: 1% of the lease plus 2 ms (the allowance the
/// Redlock description uses).
pub(super) fn drift(lease: Duration) -> Duration {
    lease / 100 + Duration::from_millis(2)
}

/// When a lease set or extended by a command sent at `sent` ends, as far as this process
/// may count on it.
pub(super) fn valid_until(sent: Instant, lease: Duration) -> Instant {
    sent + lease.saturating_sub(drift(lease))
}

struct Held {
    lease: Lease,
    /// When to send the next renewal.
    renew_at: Instant,
    /// A renewal was sent and not answered yet.
    renewing: bool,
}

#[derive(Default)]
pub(super) struct Leases {
    state: Mutex<State>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: HashMap<u64, Held>,
    /// (when to look at it next, id); entries of released leases are skipped when due.
    schedule: BTreeSet<(Instant, u64)>,
    /// The instant the keeper sleeps until, if it is running.
    keeper_wakes_at: Option<Instant>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks a new lease; starts the keeper if needed, wakes it if this lease is due first.
    pub(super) fn track(self: &Arc<Self>, lease: Lease) -> u64 {
        let now = Instant::now();
        let renew_at = now + lease.lease / 3;
        let due = if lease.renew {
            renew_at.min(lease.valid_until)
        } else {
            lease.valid_until
        };
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.held.insert(
            id,
            Held {
                lease,
                renew_at,
                renewing: false,
            },
        );
        state.schedule.insert((due, id));
        let running = state.keeper.as_ref().is_some_and(|k| !k.is_finished());
        if !running {
            state.keeper_wakes_at = None;
            let keeper = keep(Arc::downgrade(self), Arc::clone(&self.wake));
            state.keeper = Some(tokio::spawn(keeper));
        } else if state.keeper_wakes_at.is_none_or(|at| due < at) {
            self.wake.notify_one();
        }
        id
    }

    pub(super) fn forget(&self, id: u64) {
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

/// A renewal's answer: (lease id, when it was sent, what the server said).
type Renewal = (u64, Instant, Result<i64, fred::error::Error>);

/// The keeper task of one service; ends when the service is gone.
async fn keep(leases: Weak<Leases>, wake: Arc<Notify>) {
    let mut renewals = FuturesUnordered::new();
    loop {
        let Some(shared) = leases.upgrade() else {
            return;
        };
        let wake_at = {
            let mut state = shared.lock();
            look(&mut state, &mut renewals);
            let wake_at = state.schedule.first().map(|&(at, _)| at);
            state.keeper_wakes_at = wake_at;
            wake_at
        };
        // Hold no strong reference while waiting: dropping the service ends this task.
        drop(shared);
        let sleep = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((id, sent, result)) = renewals.next(), if !renewals.is_empty() => {
                if let Some(shared) = leases.upgrade() {
                    answered(&mut shared.lock(), id, sent, result);
                }
            }
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// Handles every lease that is due: lost at its end, else a renewal sent when it is time
/// and none is out; then looked at again at the earlier of its end and its next renewal.
fn look(state: &mut State, renewals: &mut FuturesUnordered<BoxFuture<'static, Renewal>>) {
    let now = Instant::now();
    while let Some(&(at, id)) = state.schedule.first() {
        if at > now {
            break;
        }
        state.schedule.pop_first();
        let Some(held) = state.held.get_mut(&id) else {
            continue;
        };
        if now >= held.lease.valid_until {
            crate::observe::lock_lost("redis");
            let _ = held.lease.lost.send(true);
            state.held.remove(&id);
            continue;
        }
        if held.lease.renew && !held.renewing && now >= held.renew_at {
            held.renewing = true;
            renewals.push(renew(id, &held.lease));
        }
        let next = if held.lease.renew && !held.renewing {
            held.renew_at.min(held.lease.valid_until)
        } else {
            held.lease.valid_until
        };
        state.schedule.insert((next, id));
    }
}

fn renew(id: u64, lease: &Lease) -> BoxFuture<'static, Renewal> {
    let client = lease.client.clone();
    let keys = vec![lease.lock_key.clone()];
    let args = vec![
        lease.token.clone(),
        super::redis::millis(lease.lease).to_string(),
    ];
    async move {
        let sent = Instant::now();
        let result = renew_script()
            .evalsha_with_reload::<i64, _, _>(&client, keys, args)
            .await;
        (id, sent, result)
    }
    .boxed()
}

/// A renewal answered: extended from its send time, lost if the lock is gone or someone
/// else's, retried soon if the server did not answer (the lease's end still stands).
fn answered(state: &mut State, id: u64, sent: Instant, result: Result<i64, fred::error::Error>) {
    let Some(held) = state.held.get_mut(&id) else {
        return;
    };
    held.renewing = false;
    let now = Instant::now();
    match result {
        Ok(1) => {
            let until = valid_until(sent, held.lease.lease);
            held.lease.valid_until = held.lease.valid_until.max(until);
            held.renew_at = sent + held.lease.lease / 3;
        }
        Ok(_) => {
            crate::observe::lock_lost("redis");
            let _ = held.lease.lost.send(true);
            state.held.remove(&id);
            return;
        }
        Err(_) => {
            held.renew_at = now + (held.lease.lease / 10).max(Duration::from_millis(10));
        }
    }
    let next = held.renew_at.min(held.lease.valid_until);
    state.schedule.insert((next, id));
}
