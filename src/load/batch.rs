//! Batch cache-aside: [`get_or_load_many`](crate::CacheServiceExt::get_or_load_many).
//!
//! One read of every key ([`CacheService::get_many_bytes`]), then each missed key goes the
//! single-key miss path of its own ([`miss`](super::miss): join or lead the single flight,
//! the lease, the write-back under it), all of them at once. The leaders' loader calls are
//! gathered ([`Gather`]) into one call of the batch's loader, made when every missed key
//! has either asked for its value, ended without loading (another caller or instance
//! loaded it meanwhile), or is waiting for someone else's load of it. A key that waits is
//! never asked for again; one whose wait ends without a value after the loader was called
//! (the other load was cancelled or failed with another error type) fails with
//! [`LoadError::Cache`] rather than call the loader twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use super::read::{Read, classify};
use super::{LoadError, LoadOptions, LoadTtl, Loaded, miss};
use crate::{CacheError, CacheService, codec};

/// Where a missed key's own path stands, for the gather.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// May still ask for its value: the loader waits for it.
    Open,
    /// Waits for another load of the key (not counted against the loader's start).
    Waiting,
    /// Asked for its value, or ended without.
    Settled,
}

/// Why a key's share of the batch failed (the per-key paths' error type).
enum Failure<E> {
    /// The batch's loader failed: every key it was asked for fails with its error.
    Loader(Arc<E>),
    /// The key asked for its value after the loader was called (see the module docs).
    Late,
}

type Values<T, E> = Result<HashMap<String, T>, Arc<E>>;

struct State<T, E> {
    keys: Vec<KeyState>,
    /// How many keys are `Open`.
    open: usize,
    /// The keys that asked, in order.
    asked: Vec<usize>,
    fired: bool,
    values: Option<Values<T, E>>,
}

/// The gather of the per-key loader calls into one call of the batch's loader.
struct Gather<T, E> {
    names: Vec<String>,
    state: Mutex<State<T, E>>,
    /// Wakes the driver when the last open key settles.
    settled: Notify,
    /// Set once the loader has answered.
    answered: watch::Sender<bool>,
}

impl<T, E> Gather<T, E> {
    fn new(names: Vec<String>) -> Self {
        let keys = vec![KeyState::Open; names.len()];
        Gather {
            state: Mutex::new(State {
                open: keys.len(),
                keys,
                asked: Vec::new(),
                fired: false,
                values: None,
            }),
            names,
            settled: Notify::new(),
            answered: watch::channel(false).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<T, E>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves key `slot` to `to`; wakes the driver when no key is open any more.
    fn mark(&self, slot: usize, to: KeyState) {
        let mut state = self.state();
        let from = state.keys[slot];
        if from == to || from == KeyState::Settled {
            return;
        }
        state.keys[slot] = to;
        match (from, to) {
            (KeyState::Open, _) => state.open -= 1,
            (_, KeyState::Open) => state.open += 1,
            _ => {}
        }
        if state.open == 0 && !state.fired {
            self.settled.notify_one();
        }
    }

    /// Key `slot`'s value from the batch's loader (asked for now).
    async fn value(&self, slot: usize) -> Result<Option<(T, LoadTtl)>, Failure<E>> {
        {
            let mut state = self.state();
            if state.fired {
                state.keys[slot] = KeyState::Settled;
                return Err(Failure::Late);
            }
            state.asked.push(slot);
        }
        self.mark(slot, KeyState::Settled);
        let mut answered = self.answered.subscribe();
        // The sender lives in `self`: this cannot fail while `self` is borrowed.
        let _ = answered.wait_for(|answered| *answered).await;
        let mut state = self.state();
        match state.values.as_mut() {
            Some(Ok(values)) => Ok(values
                .remove(&self.names[slot])
                .map(|value| (value, LoadTtl::Options))),
            Some(Err(error)) => Err(Failure::Loader(Arc::clone(error))),
            None => Err(Failure::Late),
        }
    }

    /// Waits until no key is open, then calls `loader` once with the keys that asked (not at
    /// all when none did) and hands out its answer.
    async fn drive<F, Fut>(&self, loader: F)
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<HashMap<String, T>, E>>,
    {
        let asked = loop {
            {
                let mut state = self.state();
                if state.open == 0 {
                    state.fired = true;
                    break std::mem::take(&mut state.asked);
                }
            }
            self.settled.notified().await;
        };
        let values = if asked.is_empty() {
            Ok(HashMap::new())
        } else {
            let keys = asked.iter().map(|&slot| self.names[slot].clone()).collect();
            loader(keys).await.map_err(Arc::new)
        };
        self.state().values = Some(values);
        self.answered.send_replace(true);
    }
}

/// A missed key's loader for its single-key path: asks the gather for its value. Dropped
/// without a call (the key ended without loading), it settles the key.
struct Ask<T, E> {
    gather: Arc<Gather<T, E>>,
    slot: usize,
}

impl<T, E> Drop for Ask<T, E> {
    fn drop(&mut self) {
        self.gather.mark(self.slot, KeyState::Settled);
    }
}

/// The whole of `get_or_load_many_with`: one read, then the missed keys' paths and the one
/// loader call.
pub(crate) async fn load_many<S, T, E, F, Fut>(
    cache: &S,
    keys: &[&str],
    options: &LoadOptions,
    loader: F,
) -> Result<Vec<Option<T>>, LoadError<E>>
where
    S: CacheService + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Send + Sync + 'static,
    F: FnOnce(Vec<String>) -> Fut + Send,
    Fut: Future<Output = Result<HashMap<String, T>, E>> + Send,
{
    for key in keys {
        options.check(key)?;
    }
    // Each key once, in the order first given.
    let mut unique: Vec<&str> = Vec::with_capacity(keys.len());
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    let slots: Vec<usize> = keys
        .iter()
        .map(|&key| {
            *position.entry(key).or_insert_with(|| {
                unique.push(key);
                unique.len() - 1
            })
        })
        .collect();

    let reads = match cache.get_many_bytes(&unique).await {
        Ok(reads) => reads.into_iter().map(Ok).collect(),
        // A cache that fails to read is a miss of every key, as for one key.
        Err(error) => {
            let mut reads: Vec<Result<_, CacheError>> = vec![Err(error)];
            reads.extend((1..unique.len()).map(|_| Ok(None)));
            reads
        }
    };
    let mut values: Vec<Option<T>> = Vec::with_capacity(unique.len());
    let mut missed = Vec::new();
    for (i, (key, read)) in unique.iter().zip(reads).enumerate() {
        let mut cache_error = None;
        match classify::<T>(cache.codec(), key, read, options, &mut cache_error) {
            // Batches do not start eager refreshes: the next single read of the key does.
            Read::Hit(value, ..) => values.push(value),
            Read::Miss { stale } => {
                values.push(None);
                missed.push((i, stale, cache_error));
            }
        }
    }

    if !missed.is_empty() {
        let gather: Arc<Gather<T, E>> = Arc::new(Gather::new(
            missed.iter().map(|(i, ..)| unique[*i].to_owned()).collect(),
        ));
        let paths = missed
            .into_iter()
            .enumerate()
            .map(|(slot, (i, stale, cache_error))| {
                let ask = Ask {
                    gather: Arc::clone(&gather),
                    slot,
                };
                let gather = Arc::clone(&gather);
                let key = unique[i];
                async move {
                    let hook = move |waiting: bool| {
                        let to = if waiting {
                            KeyState::Waiting
                        } else {
                            KeyState::Open
                        };
                        gather.mark(slot, to);
                    };
                    let load = || async move {
                        let ask = ask;
                        ask.gather.value(ask.slot).await
                    };
                    #[cfg(feature = "metrics")]
                    let started = std::time::Instant::now();
                    let result =
                        miss(cache, key, options, stale, cache_error, load, Some(&hook)).await;
                    #[cfg(feature = "metrics")]
                    if let Some(outcome) = super::load_outcome(&result) {
                        crate::observe::load_finished(outcome, started.elapsed());
                    }
                    (i, result)
                }
            });
        let (paths, ()) =
            futures_util::future::join(futures_util::future::join_all(paths), gather.drive(loader))
                .await;
        for (i, result) in paths {
            values[i] = unbatched(result)?.value;
        }
    }

    // Back in the order given; a key given twice gets its own copy of the value.
    let mut taken: Vec<Option<Option<T>>> = values.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(keys.len());
    for (n, &slot) in slots.iter().enumerate() {
        let later = slots[n + 1..].contains(&slot);
        let value = match (later, &taken[slot]) {
            (true, Some(Some(value))) => {
                let encoded = codec::encode_with(cache.codec(), keys[n], value)?;
                Some(codec::decode_with(cache.codec(), keys[n], &encoded)?)
            }
            _ => taken[slot].take().flatten(),
        };
        out.push(value);
    }
    Ok(out)
}

/// A key's result with the batch's own failure taken apart.
fn unbatched<T, E>(
    result: Result<Loaded<T>, LoadError<Failure<E>>>,
) -> Result<Loaded<T>, LoadError<E>> {
    result.map_err(|error| match error {
        LoadError::Loader { key, source } => match &*source {
            Failure::Loader(source) => LoadError::Loader {
                key,
                source: Arc::clone(source),
            },
            Failure::Late => late(key.shown()),
        },
        LoadError::Timeout { key, after } => LoadError::Timeout { key, after },
        LoadError::Cache(error) => LoadError::Cache(error),
    })
}

fn late<E>(key: &str) -> LoadError<E> {
    LoadError::Cache(CacheError::invalid_argument(
        key,
        "another load of this key, which this batch waited for, ended without a value after \
         the batch's loader was called; ask again",
    ))
}
