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
        let (address, port) = server.map_or((None, None), address_and_port);
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
            Op::GetMany => span!("cachet.get_many", "MGET"),
            Op::Set => span!("cachet.set", "SET"),
            Op::Invalidate => span!("cachet.invalidate", "DEL"),
            Op::InvalidatePrefix => span!("cachet.invalidate_prefix", "invalidate_prefix"),
            Op::Lease => span!("cachet.lease", "lease"),
            Op::SetLeased => span!("cachet.set_leased", "set_leased"),
            Op::ReplaceIf => span!("cachet.replace_if", "replace_if"),
            Op::ReleaseLease => span!("cachet.release_lease", "release_lease"),
        };
        if RECORD_KEYS.load(Ordering::Relaxed) && !span.is_disabled() {
            span.record("cachet.key", key);
        }
        span
    }
}

/// `server.address` and `server.port` of a connection's label (`redis://host:port`,
/// `rediss-cluster://a:1,b:2`, `redis-sentinel://a:1,b:2 (service name)`): the first
/// server of a list stands for the deployment.
fn address_and_port(label: &str) -> (Option<Box<str>>, Option<u16>) {
    let servers = label.split_once("://").map_or(label, |(_, rest)| rest);
    let first = servers.split([',', ' ']).next().unwrap_or_default().trim();
    if first.is_empty() {
        return (None, None);
    }
    // `[::1]:6379` keeps its brackets off; a bare host has no port.
    match first.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            (Some(host.into()), port.parse().ok())
        }
        _ => (Some(first.into()), None),
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

#[cfg(test)]
mod tests {
    use super::address_and_port;

    #[test]
    fn the_address_and_port_come_from_the_first_server_without_the_scheme() {
        let cases = [
            ("redis://127.0.0.1:6379", Some("127.0.0.1"), Some(6379)),
            (
                "rediss://cache.example:6380",
                Some("cache.example"),
                Some(6380),
            ),
            (
                "redis-cluster://10.0.0.1:7000,10.0.0.2:7001",
                Some("10.0.0.1"),
                Some(7000),
            ),
            (
                "redis-sentinel://s1:26379,s2:26379 (service mymaster)",
                Some("s1"),
                Some(26379),
            ),
            ("redis://[::1]:6379", Some("::1"), Some(6379)),
            ("redis server", Some("redis"), None),
            ("", None, None),
        ];
        for (label, address, port) in cases {
            let (a, p) = address_and_port(label);
            assert_eq!((a.as_deref(), p), (address, port), "{label}");
        }
    }
}
