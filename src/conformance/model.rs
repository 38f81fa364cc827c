//! Operation sequences run on a service and on a plain `BTreeMap`, for property tests:
//! both must give the same [`Outcome`]s.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::CacheService;

/// One cache call. Keys and prefixes are relative to the run's key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `set_bytes(key, value, None)`.
    Set(String, Vec<u8>),
    /// `get_bytes(key)`.
    Get(String),
    /// `invalidate(key)`.
    Invalidate(String),
    /// `invalidate_prefix(prefix)`.
    InvalidatePrefix(String),
}

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `set` succeeded.
    Stored,
    /// What a `get` returned.
    Got(Option<Vec<u8>>),
    /// An `invalidate` succeeded.
    Invalidated,
    /// How many entries an `invalidate_prefix` removed.
    Removed(u64),
    /// The call failed; the message.
    Failed(String),
}

/// Runs `ops` on `cache`, every key under `prefix`.
pub async fn run_on_service(cache: &dyn CacheService, prefix: &str, ops: &[Op]) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let outcome = match op {
            Op::Set(k, v) => cache
                .set_bytes(&format!("{prefix}{k}"), Bytes::from(v.clone()), None)
                .await
                .map(|()| Outcome::Stored),
            Op::Get(k) => cache
                .get_bytes(&format!("{prefix}{k}"))
                .await
                .map(|v| Outcome::Got(v.map(|b| b.to_vec()))),
            Op::Invalidate(k) => cache
                .invalidate(&format!("{prefix}{k}"))
                .await
                .map(|()| Outcome::Invalidated),
            Op::InvalidatePrefix(p) => cache
                .invalidate_prefix(&format!("{prefix}{p}"))
                .await
                .map(Outcome::Removed),
        };
        out.push(outcome.unwrap_or_else(|e| Outcome::Failed(e.to_string())));
    }
    out
}

/// Runs `ops` on a `BTreeMap`: the reference behaviour.
pub fn run_on_model(ops: &[Op]) -> Vec<Outcome> {
    let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    ops.iter()
        .map(|op| match op {
            Op::Set(k, v) => {
                map.insert(k.clone(), v.clone());
                Outcome::Stored
            }
            Op::Get(k) => Outcome::Got(map.get(k).cloned()),
            Op::Invalidate(k) => {
                map.remove(k);
                Outcome::Invalidated
            }
            Op::InvalidatePrefix(p) => {
                let before = map.len();
                map.retain(|k, _| !k.starts_with(p.as_str()));
                Outcome::Removed((before - map.len()) as u64)
            }
        })
        .collect()
}
