//! What an operator sees of cachet: metrics through the [`metrics`](https://docs.rs/metrics)
//! facade (feature `metrics`), a [`tracing`](https://docs.rs/tracing) span per operation
//! (feature `tracing`), and [`CacheStats`] snapshots.
//!
//! With both features off, none of this is compiled into the operations: no counter, no
//! clock read, no branch (the per-service instruments are then a zero-sized type whose
//! methods are empty and inlined away).
//!
//! # Metrics
//!
//! The names are the constants of [`names`]; every label value comes from a fixed set
//! (never a key, a tenant or a token):
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `cachet_hits_total` | counter | `layer` = `memory`, `l1`, `redis` | reads that found a value (a cached "not found" counts) |
//! | `cachet_misses_total` | counter | `layer` | reads that found nothing |
//! | `cachet_loads_total` | counter | `outcome` = `loaded`, `joined`, `stale`, `negative`, `error`, `timeout`, `refreshed`, `refresh_dropped` | cache-aside loads (a miss that ran, joined or gave up on a loader; an eager refresh stored or dropped) |
//! | `cachet_load_duration_seconds` | histogram | `outcome` | how long such a load made its caller wait |
//! | `cachet_invalidations_sent_total` | counter | `source` = `bus` | invalidation messages a tiered instance published |
//! | `cachet_invalidations_received_total` | counter | `source` = `bus`, `tracking` | invalidations a tiered instance applied (other instances' messages, the server's tracking pushes) |
//! | `cachet_l1_resets_total` | counter | `reason` = `lagged`, `reconnect`, `lost`, `shutdown` | whole-L1 clears because messages may have been lost |
//! | `cachet_operation_duration_seconds` | histogram | `operation`, `backend` = `memory`, `redis`, `tiered`, `l1` | each call of the [`CacheService`](crate::CacheService) methods |
//! | `cachet_errors_total` | counter | `kind`, `operation`, `backend` | operations that failed, by [`CacheError`] kind |
//! | `cachet_lock_wait_seconds` | histogram | `backend` = `local`, `redis`, `outcome` = `acquired`, `timeout`, `error` | how long `acquire` waited |
//! | `cachet_lock_acquired_total` | counter | `backend` | locks acquired |
//! | `cachet_lock_lost_total` | counter | `backend` | held locks found lost (expired, or taken over) |
//!
//! The per-operation handles are registered once, when a service is built, as the `metrics`
//! crate advises for hot paths: **install the recorder before building the caches** (a
//! service built before it reports to the no-op recorder for its whole life).
//!
//! # Spans
//!
//! Each operation of the Redis, tiered and in-memory backends runs in a `DEBUG` span of
//! target `cachet` named after the operation (`cachet.get`, `cachet.set`, …), with the
//! attributes of OpenTelemetry's database-client conventions: `db.system.name` (`redis`
//! for the Redis and tiered backends), `db.operation.name` (the Redis command, or the
//! cachet operation where several commands run), `server.address`, `server.port`,
//! `otel.kind` = `client`; and cachet's own: `cachet.backend`, `cachet.layer` and
//! `cachet.hit` (set by reads), `error.type` (the [`CacheError`] kind, on failure). Keys
//! are not recorded (they can hold tenant ids) unless the app calls [`record_keys`]`(true)`;
//! then `cachet.key` holds them. A tiered read that misses its L1 shows the Redis read as
//! a child span.

// Which of these a build uses depends on its features (`metrics`, `tracing`, `redis`): with
// both of the first two off, the instruments are empty and what feeds them goes unused.
#![allow(dead_code)]

#[cfg(feature = "metrics")]
mod counting;
#[cfg(feature = "tracing")]
mod spans;
mod stats;

pub use self::stats::CacheStats;
use crate::CacheError;

/// The metric names (the contract; see the [module docs](self) for labels and meaning).
pub mod names {
    /// Reads that found a value, label `layer`.
    pub const HITS: &str = "cachet_hits_total";
    /// Reads that found nothing, label `layer`.
    pub const MISSES: &str = "cachet_misses_total";
    /// Cache-aside loads, label `outcome`.
    pub const LOADS: &str = "cachet_loads_total";
    /// How long a load made its caller wait, label `outcome`.
    pub const LOAD_DURATION: &str = "cachet_load_duration_seconds";
    /// Invalidation messages published, label `source`.
    pub const INVALIDATIONS_SENT: &str = "cachet_invalidations_sent_total";
    /// Invalidations applied from elsewhere, label `source`.
    pub const INVALIDATIONS_RECEIVED: &str = "cachet_invalidations_received_total";
    /// Whole-L1 clears, label `reason`.
    pub const L1_RESETS: &str = "cachet_l1_resets_total";
    /// Each operation's duration, labels `operation` and `backend`.
    pub const OPERATION_DURATION: &str = "cachet_operation_duration_seconds";
    /// Failed operations, labels `kind`, `operation` and `backend`.
    pub const ERRORS: &str = "cachet_errors_total";
    /// How long lock acquisitions waited, labels `backend` and `outcome`.
    pub const LOCK_WAIT: &str = "cachet_lock_wait_seconds";
    /// Locks acquired, label `backend`.
    pub const LOCK_ACQUIRED: &str = "cachet_lock_acquired_total";
    /// Held locks found lost, label `backend`.
    pub const LOCK_LOST: &str = "cachet_lock_lost_total";
}

/// Turns recording keys in spans on or off (off by default: keys can hold tenant ids).
/// Process-wide; has no effect without the `tracing` feature.
///
/// ```
/// cachet::observe::record_keys(false);
/// ```
pub fn record_keys(on: bool) {
    #[cfg(feature = "tracing")]
    spans::RECORD_KEYS.store(on, std::sync::atomic::Ordering::Relaxed);
    let _ = on;
}

/// Where a read was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layer {
    /// The in-memory backend.
    Memory,
    /// A tiered instance's L1.
    L1,
    /// Redis (plain, or below a tiered L1).
    Redis,
}

impl Layer {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Layer::Memory => "memory",
            Layer::L1 => "l1",
            Layer::Redis => "redis",
        }
    }
}

/// The operations of [`CacheService`](crate::CacheService), as metrics and spans name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    GetMany,
    Set,
    Invalidate,
    InvalidatePrefix,
    Lease,
    SetLeased,
    ReleaseLease,
    ReplaceIf,
}

impl Op {
    pub(crate) const ALL: [Op; 9] = [
        Op::Get,
        Op::GetMany,
        Op::Set,
        Op::Invalidate,
        Op::InvalidatePrefix,
        Op::Lease,
        Op::SetLeased,
        Op::ReleaseLease,
        Op::ReplaceIf,
    ];

    pub(crate) const fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::GetMany => "get_many",
            Op::Set => "set",
            Op::Invalidate => "invalidate",
            Op::InvalidatePrefix => "invalidate_prefix",
            Op::Lease => "lease",
            Op::SetLeased => "set_leased",
            Op::ReleaseLease => "release_lease",
            Op::ReplaceIf => "replace_if",
        }
    }
}

/// Which backend an [`Instruments`] speaks for (the `backend` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Memory,
    Redis,
    Tiered,
    /// The in-memory store inside a tiered instance (its own reads are counted as `l1` by
    /// the tiered service).
    L1Store,
}

impl Backend {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::Tiered => "tiered",
            Backend::L1Store => "l1",
        }
    }

    const fn layer(self) -> Layer {
        match self {
            Backend::Memory => Layer::Memory,
            Backend::Redis => Layer::Redis,
            Backend::Tiered | Backend::L1Store => Layer::L1,
        }
    }
}

/// Why a tiered instance cleared its whole L1 (the `reason` label).
#[cfg(feature = "redis")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResetReason {
    /// Its listener fell behind the messages.
    Lagged,
    /// The invalidation stream was re-established (subscriber reconnect).
    Reconnect,
    /// Tracking may have been lost (a reading or invalidation connection's error or
    /// reconnect, a topology change, a failed check).
    Lost,
    /// The instance stopped listening.
    Shutdown,
}

#[cfg(feature = "redis")]
impl ResetReason {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            ResetReason::Lagged => "lagged",
            ResetReason::Reconnect => "reconnect",
            ResetReason::Lost => "lost",
            ResetReason::Shutdown => "shutdown",
        }
    }
}

/// The label of an error's kind (`error.type`, `kind`).
pub(crate) fn error_kind(error: &CacheError) -> &'static str {
    match error {
        CacheError::Serialization { .. } => "serialization",
        CacheError::Integrity { .. } => "integrity",
        CacheError::Timeout { .. } => "timeout",
        CacheError::Backend { .. } => "backend",
        CacheError::Config { .. } => "config",
        CacheError::InvalidArgument { .. } => "invalid_argument",
    }
}

/// A service's metric handles and span settings, made once when it is built. Clones share
/// them. Zero-sized, and every method empty, with both features off.
#[derive(Clone)]
pub(crate) struct Instruments {
    #[cfg(feature = "metrics")]
    counting: std::sync::Arc<counting::Handles>,
    #[cfg(feature = "tracing")]
    spans: std::sync::Arc<spans::SpanSettings>,
}

/// When an operation started (nothing with the `metrics` feature off).
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Instruments {
    /// The instruments of a `backend` talking to `server` (`host:port`, or several of them
    /// comma-separated; `None` in process).
    #[cfg_attr(
        not(any(feature = "metrics", feature = "tracing")),
        allow(unused_variables)
    )]
    pub(crate) fn new(backend: Backend, server: Option<&str>) -> Self {
        #[cfg(not(feature = "tracing"))]
        let _ = server;
        Instruments {
            #[cfg(feature = "metrics")]
            counting: std::sync::Arc::new(counting::Handles::new(backend)),
            #[cfg(feature = "tracing")]
            spans: std::sync::Arc::new(spans::SpanSettings::new(backend, server)),
        }
    }

    /// A read answered by this service's layer: found something or not.
    #[inline(always)]
    #[cfg_attr(
        not(any(feature = "metrics", feature = "tracing")),
        allow(unused_variables)
    )]
    pub(crate) fn read(&self, hit: bool) {
        #[cfg(feature = "metrics")]
        self.counting.read(hit);
        #[cfg(feature = "tracing")]
        spans::record_read(self.spans.layer, hit);
    }

    /// Starts timing an operation.
    #[inline(always)]
    pub(crate) fn start(&self) -> Timer {
        Timer {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    /// An operation ended: its duration, and its error if it failed.
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn finish<T>(&self, op: Op, timer: Timer, result: &Result<T, CacheError>) {
        #[cfg(feature = "metrics")]
        self.counting.finish(op, timer.started, result);
    }

    /// Runs the synchronous `body` of `op` on `key` as one observed operation.
    #[inline(always)]
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) fn now<T>(
        &self,
        op: Op,
        key: &str,
        body: impl FnOnce() -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        #[cfg(feature = "tracing")]
        let span = self.spans.span(op, key);
        #[cfg(feature = "tracing")]
        let _entered = span.enter();
        let timer = self.start();
        let result = body();
        self.finish(op, timer, &result);
        #[cfg(feature = "tracing")]
        spans::record_result(&span, &result);
        result
    }

    /// A read answered in memory or not at all: `lookup` finds the answer; an answer is
    /// counted (as a hit unless it is an error) and timed as one `op`, a `None` is left to
    /// the slow path that follows (which counts it), so nothing is counted twice.
    #[inline(always)]
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) fn hit_now<V>(
        &self,
        op: Op,
        key: &str,
        lookup: impl FnOnce() -> Option<Result<Option<V>, CacheError>>,
    ) -> Option<Result<Option<V>, CacheError>> {
        let timer = self.start();
        let result = lookup()?;
        #[cfg(feature = "tracing")]
        let span = self.spans.span(op, key);
        #[cfg(feature = "tracing")]
        let _entered = span.enter();
        if result.is_ok() {
            self.read(true);
        }
        self.finish(op, timer, &result);
        #[cfg(feature = "tracing")]
        spans::record_result(&span, &result);
        Some(result)
    }

    /// Runs the future `body` of `op` on `key` as one observed operation (in its span).
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) async fn run<T, F>(&self, op: Op, key: &str, body: F) -> Result<T, CacheError>
    where
        F: Future<Output = Result<T, CacheError>>,
    {
        #[cfg(feature = "tracing")]
        let span = self.spans.span(op, key);
        let timer = self.start();
        #[cfg(feature = "tracing")]
        let result = tracing::Instrument::instrument(body, span.clone()).await;
        #[cfg(not(feature = "tracing"))]
        let result = body.await;
        self.finish(op, timer, &result);
        #[cfg(feature = "tracing")]
        spans::record_result(&span, &result);
        result
    }

    /// Hits and misses counted so far by this service's layer (`None` without the `metrics`
    /// feature, which does the counting).
    pub(crate) fn reads(&self) -> (Option<u64>, Option<u64>) {
        #[cfg(feature = "metrics")]
        return {
            let (hits, misses) = self.counting.reads();
            (Some(hits), Some(misses))
        };
        #[cfg(not(feature = "metrics"))]
        (None, None)
    }
}

/// Runs an operation's future through the service's instruments; with both features off,
/// just the future (no wrapper at all).
macro_rules! observed {
    ($instruments:expr, $op:expr, $key:expr, $body:expr) => {{
        #[cfg(any(feature = "metrics", feature = "tracing"))]
        {
            $instruments.run($op, $key, $body).await
        }
        #[cfg(not(any(feature = "metrics", feature = "tracing")))]
        {
            let _ = (&$instruments, $op, $key);
            $body.await
        }
    }};
}
pub(crate) use observed;

/// Counts invalidations a tiered instance sent (`source` = `bus`).
#[cfg(feature = "redis")]
#[inline(always)]
pub(crate) fn invalidation_sent() {
    #[cfg(feature = "metrics")]
    metrics::counter!(names::INVALIDATIONS_SENT, "source" => "bus").increment(1);
}

/// Counts an invalidation a tiered instance applied, from `source` (`bus`, `tracking`).
#[cfg(feature = "redis")]
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn invalidation_received(source: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(names::INVALIDATIONS_RECEIVED, "source" => source).increment(1);
}

/// Counts a whole-L1 clear.
#[cfg(feature = "redis")]
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn l1_reset(reason: ResetReason) {
    #[cfg(feature = "metrics")]
    metrics::counter!(names::L1_RESETS, "reason" => reason.label()).increment(1);
}

/// A cache-aside load's outcome (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LoadOutcome {
    Loaded,
    Joined,
    Stale,
    Negative,
    Error,
    Timeout,
    Refreshed,
    RefreshDropped,
}

impl LoadOutcome {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            LoadOutcome::Loaded => "loaded",
            LoadOutcome::Joined => "joined",
            LoadOutcome::Stale => "stale",
            LoadOutcome::Negative => "negative",
            LoadOutcome::Error => "error",
            LoadOutcome::Timeout => "timeout",
            LoadOutcome::Refreshed => "refreshed",
            LoadOutcome::RefreshDropped => "refresh_dropped",
        }
    }
}

/// Counts a finished cache-aside load that made its caller wait `waited`.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn load_finished(outcome: LoadOutcome, waited: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(names::LOADS, "outcome" => outcome.label()).increment(1);
        metrics::histogram!(names::LOAD_DURATION, "outcome" => outcome.label())
            .record(waited.as_secs_f64());
    }
}

/// Counts an eager refresh that reached its write-back: stored (`refreshed`), or dropped
/// because the key changed while it ran (`refresh_dropped`). No caller waited for it, so no
/// duration is recorded.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn refresh_finished(stored: bool) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if stored {
            LoadOutcome::Refreshed
        } else {
            LoadOutcome::RefreshDropped
        };
        metrics::counter!(names::LOADS, "outcome" => outcome.label()).increment(1);
    }
}

/// A lock acquisition's outcome (the `outcome` label of the lock wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockOutcome {
    Acquired,
    Timeout,
    Error,
}

/// Counts a finished `acquire` on the `backend` (`local`, `redis`) lock service.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn lock_acquire(
    backend: &'static str,
    outcome: LockOutcome,
    waited: std::time::Duration,
) {
    #[cfg(feature = "metrics")]
    {
        let label = match outcome {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Timeout => "timeout",
            LockOutcome::Error => "error",
        };
        metrics::histogram!(names::LOCK_WAIT, "backend" => backend, "outcome" => label)
            .record(waited.as_secs_f64());
        if outcome == LockOutcome::Acquired {
            metrics::counter!(names::LOCK_ACQUIRED, "backend" => backend).increment(1);
        }
    }
}

/// Counts a held lock found lost on the `backend` lock service.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn lock_lost(backend: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(names::LOCK_LOST, "backend" => backend).increment(1);
}
