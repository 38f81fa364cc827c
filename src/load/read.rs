//! What a cache read means for a load: a fresh hit, or a miss (with a fail-safe candidate).

use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::{LoadOptions, LoadSource, Loaded};
use crate::CacheError;
use crate::codec::{self, Codec, Frame, frame::now_ms};

/// What a cache read means for a load.
pub(super) enum Read<T> {
    /// Fresh: the value (`None`: a cached "not found"), its JSON payload, whether it is
    /// a stale value fail-safe keeps serving for a throttle time, and whether its eager
    /// refresh is due ([`Frame::refresh_due`]).
    Hit(Option<T>, Option<Bytes>, bool, bool),
    /// Not usable: load. `stale` is a fail-safe candidate.
    Miss { stale: Option<Frame> },
}

/// What `read` (of `key`) means under `options`; an error worked around (a failed read,
/// bytes that do not decode) is left in `cache_error`.
pub(super) fn classify<T: DeserializeOwned>(
    codec: &dyn Codec,
    key: &str,
    read: Result<Option<Bytes>, CacheError>,
    options: &LoadOptions,
    cache_error: &mut Option<CacheError>,
) -> Read<T> {
    let stored = match read {
        Ok(Some(stored)) => stored,
        Ok(None) => return Read::Miss { stale: None },
        Err(error) => {
            *cache_error = Some(error);
            return Read::Miss { stale: None };
        }
    };
    if !Frame::is_framed(&stored) {
        return match codec::decode_with(codec, key, &stored) {
            Ok(value) => Read::Hit(Some(value), Some(stored), false, false),
            Err(error) => {
                *cache_error = Some(error);
                Read::Miss { stale: None }
            }
        };
    }
    let frame = match Frame::decode(key, &stored) {
        Ok(frame) => frame,
        Err(error) => {
            *cache_error = Some(error);
            return Read::Miss { stale: None };
        }
    };
    let now = now_ms();
    if !frame.is_fresh(now) {
        let usable = options.fail_safe.is_some() && !frame.absent && now < frame.stale_until_ms;
        return Read::Miss {
            stale: usable.then_some(frame),
        };
    }
    if frame.absent {
        // A caller that does not cache "not found" does not trust another caller's marker.
        return if options.negative_ttl_secs.is_some() {
            Read::Hit(None, None, false, false)
        } else {
            Read::Miss { stale: None }
        };
    }
    let refresh = options.eager_refresh.is_some() && frame.refresh_due(now);
    match codec::decode_with(codec, key, &frame.payload) {
        Ok(value) => Read::Hit(Some(value), Some(frame.payload), frame.stale, refresh),
        Err(error) => {
            *cache_error = Some(error);
            Read::Miss { stale: None }
        }
    }
}

/// A fresh hit in a read already made (the in-memory fast path), without touching the
/// flight table, and whether its eager refresh is due; `None` for anything else (a miss, a
/// stale value, an error, no read).
pub(super) fn fresh_hit<T: DeserializeOwned>(
    codec: &dyn Codec,
    key: &str,
    options: &LoadOptions,
    first_read: &Option<Result<Option<Bytes>, CacheError>>,
) -> Option<(Loaded<T>, bool)> {
    let Some(Ok(Some(stored))) = first_read else {
        return None;
    };
    let mut ignored = None;
    match classify::<T>(codec, key, Ok(Some(stored.clone())), options, &mut ignored) {
        Read::Hit(value, _, stale, refresh) => Some((
            Loaded {
                value,
                source: cached_source(stale),
                cache_error: None,
                written: None,
            },
            refresh,
        )),
        Read::Miss { .. } => None,
    }
}

/// Whether stored bytes are a value whose eager refresh is due now (for reads that did not
/// classify them: the shared fast path).
pub(super) fn refresh_due(stored: &Bytes) -> bool {
    Frame::is_framed(stored)
        && stored.len() >= crate::codec::frame::REFRESH_HEADER_LEN
        && Frame::decode("", stored).is_ok_and(|frame| frame.refresh_due(now_ms()))
}

/// The source of a cache hit: [`LoadSource::Stale`] for a value fail-safe keeps serving.
pub(super) fn cached_source(stale: bool) -> LoadSource {
    if stale {
        LoadSource::Stale
    } else {
        LoadSource::Cache
    }
}
