//! The `tracing` side of `Instruments`: one span per operation, after
//! OpenTelemetry's database-client conventions.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Span;
use tracing::field::Empty;

use super::{Backend, Layer, Op, error_kind};
use crate::CacheError;

/// Whether spans record keys ([`record_keys`](super::record_keys)).
pub(super) static RECORD_KEYS: AtomicBool = AtomicBool::new(false);

pub(super) struct SpanSettings {
    backend: &'static str,
    pub(super) layer: Layer,
    /// `db.system.name`: `redis` for the Redis and tiered backends.
    system: Option<&'static str>,
    address: Option<Box<str>>,
    port: Option<u16>,
}

impl SpanSettings {
    pub(super) fn new(backend: Backend, server: Option<&str>) -> Self {
        // The first server of a list ("a:1,b:2") stands for the deployment.
        let first = server
            .and_then(|list| list.split(',').next())
            .map(str::trim);
        let (address, port) = match first.and_then(|server| server.rsplit_once(':')) {
            Some((host, port)) => (Some(host.into()), port.parse().ok()),
            None => (first.map(Into::into), None),
        };
        SpanSettings {
            backend: backend.label(),
            layer: backend.layer(),
            system: matches!(backend, Backend::Redis | Backend::Tiered).then_some("redis"),
            address,
            port,
        }
    }

    /// The span of `op` on `key`.
    pub(super) fn span(&self, op: Op, key: &str) -> Span {
        macro_rules! span {
            ($name:literal, $command:literal) => {
                tracing::debug_span!(
                    target: "cachet",
                    $name,
                    otel.kind = "client",
                    db.system.name = self.system,
                    db.operation.name = $command,
                    server.address = self.address.as_deref(),
                    server.port = self.port,
                    cachet.backend = self.backend,
                    cachet.layer = Empty,
                    cachet.hit = Empty,
                    cachet.key = Empty,
                    error.type = Empty,
                )
            };
        }
        let span = match op {
            Op::Get => span!("cachet.get", "GET"),
            Op::Set => span!("cachet.set", "SET"),
            Op::Invalidate => span!("cachet.invalidate", "DEL"),
            Op::InvalidatePrefix => span!("cachet.invalidate_prefix", "invalidate_prefix"),
            Op::Lease => span!("cachet.lease", "lease"),
            Op::SetLeased => span!("cachet.set_leased", "set_leased"),
            Op::ReleaseLease => span!("cachet.release_lease", "release_lease"),
        };
        if RECORD_KEYS.load(Ordering::Relaxed) && !span.is_disabled() {
            span.record("cachet.key", key);
        }
        span
    }
}

/// A read's answer, on the current span.
pub(super) fn record_read(layer: Layer, hit: bool) {
    let span = Span::current();
    if !span.is_disabled() {
        span.record("cachet.layer", layer.label());
        span.record("cachet.hit", hit);
    }
}

/// An operation's failure, on its span.
pub(super) fn record_result<T>(span: &Span, result: &Result<T, CacheError>) {
    if let Err(error) = result {
        span.record("error.type", error_kind(error));
    }
}
