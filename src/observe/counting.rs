//! The `metrics` side of `Instruments`: handles registered once per
//! service, and the hit and miss counts its [`CacheStats`](super::CacheStats) reports.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use metrics::{Counter, Histogram};

use super::{Backend, Op, error_kind, names};
use crate::CacheError;

/// Shards of the local hit and miss counts: each thread adds to its own cache line, so
/// that many tasks hitting one cache do not bounce a single counter between cores.
const SHARDS: usize = 8;

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// This thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|index| {
        let mut value = index.get();
        if value == usize::MAX {
            value = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            index.set(value);
        }
        value
    })
}

pub(super) struct Handles {
    backend: &'static str,
    hits: Counter,
    misses: Counter,
    durations: [Histogram; Op::ALL.len()],
    local: [Shard; SHARDS],
}

impl Handles {
    pub(super) fn new(backend: Backend) -> Self {
        let layer = backend.layer().label();
        let backend = backend.label();
        Handles {
            backend,
            hits: metrics::counter!(names::HITS, "layer" => layer),
            misses: metrics::counter!(names::MISSES, "layer" => layer),
            durations: Op::ALL.map(|op| {
                metrics::histogram!(
                    names::OPERATION_DURATION,
                    "operation" => op.label(),
                    "backend" => backend
                )
            }),
            local: Default::default(),
        }
    }

    #[inline]
    pub(super) fn read(&self, hit: bool) {
        let shard = &self.local[shard_index()];
        if hit {
            self.hits.increment(1);
            shard.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.increment(1);
            shard.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(super) fn finish<T>(&self, op: Op, started: Instant, result: &Result<T, CacheError>) {
        self.durations[op as usize].record(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            metrics::counter!(
                names::ERRORS,
                "kind" => error_kind(error),
                "operation" => op.label(),
                "backend" => self.backend
            )
            .increment(1);
        }
    }

    pub(super) fn reads(&self) -> (u64, u64) {
        self.local.iter().fold((0, 0), |(hits, misses), shard| {
            (
                hits + shard.hits.load(Ordering::Relaxed),
                misses + shard.misses.load(Ordering::Relaxed),
            )
        })
    }
}
