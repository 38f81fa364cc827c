//! The small header [`get_or_load_with`](crate::CacheServiceExt::get_or_load_with) puts
//! around a value when it needs more than the value itself: a logical expiry for fail-safe
//! (the entry outlives its freshness so that it can be served when the loader fails), or the
//! marker of a cached "not found".
//!
//! Layout (big-endian): `0x00`, `b"cf"`, version `1`, flags (bit 0: absent; bit 1: a stale
//! value that fail-safe keeps serving for a throttle time; bit 2: eager refresh, see below;
//! the others reserved and rejected), fresh-until and stale-until in Unix milliseconds (`u64`
//! each), with bit 2 two more: refresh-at and claimed-until (Unix ms), then the JSON payload
//! (empty when absent).
//!
//! Eager refresh ([`LoadOptions::eager_refresh`](crate::LoadOptions::eager_refresh)): a
//! value read at or after its refresh-at time is served and reloaded in the background by
//! one caller in the whole fleet, who first rewrites the stored frame with a claimed-until
//! time (a compare-and-set on the exact stored value,
//! [`CacheService::replace_if`](crate::CacheService::replace_if)); others see the claim and
//! leave the refresh to it. A claim that is not followed by a new value ends by itself. JSON text never starts with a NUL byte, so a
//! framed value cannot be mistaken for a plain one; the typed
//! [`get`](crate::CacheServiceExt::get) understands both, and a framed value that is past its
//! freshness, or absent, reads as `None` there. Anything malformed is a
//! [`CacheError::Integrity`], never a panic (a fuzz target checks it).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;

use crate::{CacheError, IntegrityProblem, codec};

/// The first bytes of every framed value.
pub const MAGIC: &[u8; 3] = b"\0cf";
const VERSION: u8 = 1;
const FLAG_ABSENT: u8 = 1;
const FLAG_STALE: u8 = 2;
const FLAG_REFRESH: u8 = 4;
/// Bytes before the payload (without eager refresh).
pub const HEADER_LEN: usize = 3 + 1 + 1 + 8 + 8;
/// Bytes before the payload of a value with eager refresh (refresh-at, claimed-until).
pub const REFRESH_HEADER_LEN: usize = HEADER_LEN + 8 + 8;

/// A decoded frame.
///
/// ```
/// use bytes::Bytes;
/// use cachet::load::Frame;
///
/// let frame = Frame::value(Bytes::from_static(b"{\"plan\":\"pro\"}"), 2_000, 9_000);
/// let stored = frame.encode();
/// assert_eq!(Frame::decode("org:acme", &stored).unwrap(), frame);
/// assert!(Frame::is_framed(&stored));
/// assert!(!Frame::is_framed(b"{\"plan\":\"pro\"}"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Whether this is a cached "not found" (then the payload is empty).
    pub absent: bool,
    /// Whether this is a stale value that fail-safe serves until `fresh_until_ms` (the end
    /// of its throttle time) instead of asking a failing store again.
    pub stale: bool,
    /// Until when the value is fresh, in milliseconds since the Unix epoch.
    pub fresh_until_ms: u64,
    /// Until when a stale value may still be served by fail-safe, in Unix milliseconds.
    pub stale_until_ms: u64,
    /// Eager refresh: from when a read should reload the value in the background (Unix
    /// ms); `None` without eager refresh.
    pub refresh_at_ms: Option<u64>,
    /// Eager refresh: until when the caller who claimed the refresh is reloading it (Unix
    /// ms; 0 when nobody claimed it).
    pub claimed_until_ms: u64,
    /// The JSON payload.
    pub payload: Bytes,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Frame {
    /// A frame around a value's JSON `payload`.
    pub fn value(payload: Bytes, fresh_until_ms: u64, stale_until_ms: u64) -> Self {
        Frame {
            absent: false,
            stale: false,
            fresh_until_ms,
            stale_until_ms,
            refresh_at_ms: None,
            claimed_until_ms: 0,
            payload,
        }
    }

    /// Whether a read at `now_ms` should start the value's eager refresh: past its
    /// refresh-at time, still fresh, and not claimed by a refresh running now.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::load::Frame;
    ///
    /// let mut frame = Frame::value(Bytes::from_static(b"1"), 10_000, 10_000);
    /// assert!(!frame.refresh_due(9_000)); // no eager refresh
    /// frame.refresh_at_ms = Some(8_000);
    /// assert!(!frame.refresh_due(7_999));
    /// assert!(frame.refresh_due(8_000));
    /// frame.claimed_until_ms = 9_500;
    /// assert!(!frame.refresh_due(9_000)); // another caller is reloading it
    /// assert!(frame.refresh_due(9_500)); // its claim ran out
    /// assert!(!frame.refresh_due(10_000)); // no longer fresh: a plain reload
    /// ```
    pub fn refresh_due(&self, now_ms: u64) -> bool {
        !self.absent
            && !self.stale
            && self.is_fresh(now_ms)
            && self.refresh_at_ms.is_some_and(|at| now_ms >= at)
            && now_ms >= self.claimed_until_ms
    }

    /// A cached "not found", fresh until `fresh_until_ms`.
    pub fn absent(fresh_until_ms: u64) -> Self {
        Frame {
            absent: true,
            stale: false,
            fresh_until_ms,
            stale_until_ms: fresh_until_ms,
            refresh_at_ms: None,
            claimed_until_ms: 0,
            payload: Bytes::new(),
        }
    }

    /// Whether `stored` is framed (starts with the frame's NUL byte) rather than plain JSON.
    pub fn is_framed(stored: &[u8]) -> bool {
        // A binary codec's output starts with a NUL byte too, then its own magic.
        stored.first() == Some(&0) && !stored.starts_with(crate::codec::tag::MAGIC)
    }

    /// Whether `stored` is a well-formed cached "not found" (a marker of an unknown key):
    /// the in-memory backend and the tiered L1 keep those in a bounded space of their own,
    /// so that a flood of unknown keys cannot evict the values.
    ///
    /// ```
    /// use cachet::load::Frame;
    ///
    /// assert!(Frame::is_absent_marker(&Frame::absent(9_000).encode()));
    /// assert!(!Frame::is_absent_marker(&Frame::value("1".into(), 9_000, 9_000).encode()));
    /// assert!(!Frame::is_absent_marker(b"null"));
    /// ```
    pub fn is_absent_marker(stored: &[u8]) -> bool {
        stored.len() == HEADER_LEN
            && stored.starts_with(MAGIC)
            && stored[3] == VERSION
            && stored[4] == FLAG_ABSENT
    }

    /// Whether the value is fresh at `now_ms`.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// The stored form.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(REFRESH_HEADER_LEN + self.payload.len());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        let mut flags = 0;
        if self.absent {
            flags |= FLAG_ABSENT;
        }
        if self.stale {
            flags |= FLAG_STALE;
        }
        // Eager refresh belongs to values only (an absent marker stays exactly HEADER_LEN).
        let refresh = self.refresh_at_ms.filter(|_| !self.absent);
        if refresh.is_some() {
            flags |= FLAG_REFRESH;
        }
        out.put_u8(flags);
        out.put_u64(self.fresh_until_ms);
        out.put_u64(self.stale_until_ms);
        if let Some(at) = refresh {
            out.put_u64(at);
            out.put_u64(self.claimed_until_ms);
        }
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Reads a frame; anything malformed is [`CacheError::Integrity`] naming `key` (layer
    /// `"frame"`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{load::Frame, CacheError};
    ///
    /// let err = Frame::decode("k", &Bytes::from_static(b"\0cf\x09")).unwrap_err();
    /// assert!(matches!(err, CacheError::Integrity { layer: "frame", .. }));
    /// ```
    pub fn decode(key: &str, stored: &Bytes) -> Result<Frame, CacheError> {
        let bad = |problem| CacheError::integrity(key, "frame", problem);
        if stored.len() < HEADER_LEN {
            return Err(bad(IntegrityProblem::Truncated));
        }
        if &stored[..3] != MAGIC {
            return Err(bad(IntegrityProblem::BadMagic));
        }
        if stored[3] != VERSION {
            return Err(bad(IntegrityProblem::UnknownVersion(stored[3])));
        }
        let flags = stored[4];
        if flags & !(FLAG_ABSENT | FLAG_STALE | FLAG_REFRESH) != 0
            || flags & (FLAG_ABSENT | FLAG_STALE) == FLAG_ABSENT | FLAG_STALE
            || flags & (FLAG_ABSENT | FLAG_REFRESH) == FLAG_ABSENT | FLAG_REFRESH
        {
            return Err(bad(IntegrityProblem::Malformed("flags")));
        }
        let absent = flags & FLAG_ABSENT != 0;
        let stale = flags & FLAG_STALE != 0;
        let refresh = flags & FLAG_REFRESH != 0;
        if refresh && stored.len() < REFRESH_HEADER_LEN {
            return Err(bad(IntegrityProblem::Truncated));
        }
        if absent && stored.len() != HEADER_LEN {
            return Err(bad(IntegrityProblem::Malformed(
                "absent marker (it carries a payload)",
            )));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&stored[5..13]);
        let fresh_until_ms = u64::from_be_bytes(word);
        word.copy_from_slice(&stored[13..21]);
        let stale_until_ms = u64::from_be_bytes(word);
        let (refresh_at_ms, claimed_until_ms, start) = if refresh {
            word.copy_from_slice(&stored[21..29]);
            let at = u64::from_be_bytes(word);
            word.copy_from_slice(&stored[29..37]);
            (Some(at), u64::from_be_bytes(word), REFRESH_HEADER_LEN)
        } else {
            (None, 0, HEADER_LEN)
        };
        Ok(Frame {
            absent,
            stale,
            fresh_until_ms,
            stale_until_ms,
            refresh_at_ms,
            claimed_until_ms,
            payload: stored.slice(start..),
        })
    }
}

/// Decodes what a typed read finds: plain JSON as a `T`; a frame as its payload while fresh,
/// and as `None` once past its freshness or when it is a cached "not found".
///
/// ```
/// use bytes::Bytes;
/// use cachet::load::{decode_stored, now_ms, Frame};
///
/// let plain = Bytes::from_static(b"7");
/// assert_eq!(decode_stored::<u32>("k", &plain).unwrap(), Some(7));
/// let fresh = Frame::value(Bytes::from_static(b"7"), now_ms() + 60_000, now_ms() + 120_000);
/// assert_eq!(decode_stored::<u32>("k", &fresh.encode()).unwrap(), Some(7));
/// let stale = Frame::value(Bytes::from_static(b"7"), now_ms() - 1, now_ms() + 120_000);
/// assert_eq!(decode_stored::<u32>("k", &stale.encode()).unwrap(), None);
/// ```
///
/// A value fail-safe served past its TTL and keeps for a throttle time (flagged stale) reads
/// as `None` too: only cache-aside serves it, and says so ([`LoadSource::Stale`](crate::LoadSource::Stale)).
pub fn decode_stored<T: DeserializeOwned>(
    key: &str,
    stored: &Bytes,
) -> Result<Option<T>, CacheError> {
    decode_stored_with(&codec::Json, key, stored)
}

/// [`decode_stored`] with the value (plain, or a frame's payload) decoded by `codec`.
///
/// ```
/// use bytes::Bytes;
/// use cachet::codec::{self, MessagePack, frame::decode_stored_with};
///
/// let stored = codec::encode_with(&MessagePack, "k", &7u32).unwrap();
/// assert_eq!(decode_stored_with::<u32>(&MessagePack, "k", &stored).unwrap(), Some(7));
/// assert!(decode_stored_with::<u32>(&codec::Json, "k", &stored).is_err()); // names both codecs
/// ```
pub fn decode_stored_with<T: DeserializeOwned>(
    codec: &dyn codec::Codec,
    key: &str,
    stored: &Bytes,
) -> Result<Option<T>, CacheError> {
    if !Frame::is_framed(stored) {
        return codec::decode_with(codec, key, stored).map(Some);
    }
    let frame = Frame::decode(key, stored)?;
    // A value fail-safe re-stored past its TTL (flagged stale, fresh only for the throttle
    // time) is cache-aside's to serve, as `LoadSource::Stale`; a plain read never sees it.
    if frame.absent || frame.stale || !frame.is_fresh(now_ms()) {
        return Ok(None);
    }
    codec::decode_with(codec, key, &frame.payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_values_and_absent_markers() {
        let value = Frame::value(Bytes::from_static(b"[1]"), 5, 10);
        assert_eq!(Frame::decode("k", &value.encode()).unwrap(), value);
        let absent = Frame::absent(7);
        let stored = absent.encode();
        assert_eq!(stored.len(), HEADER_LEN);
        assert_eq!(Frame::decode("k", &stored).unwrap(), absent);
    }

    #[test]
    fn round_trips_eager_refresh() {
        let mut value = Frame::value(Bytes::from_static(b"[1]"), 5, 10);
        value.refresh_at_ms = Some(4);
        value.claimed_until_ms = 9;
        let stored = value.encode();
        assert_eq!(stored.len(), REFRESH_HEADER_LEN + 3);
        assert_eq!(Frame::decode("k", &stored).unwrap(), value);
        // Cut inside the refresh fields: truncated, not a shorter payload.
        let cut = stored.slice(..HEADER_LEN + 4);
        assert!(matches!(
            Frame::decode("k", &cut),
            Err(CacheError::Integrity { .. })
        ));
        // Refresh on an absent marker is not a thing.
        let mut both = stored.to_vec();
        both[4] = FLAG_ABSENT | FLAG_REFRESH;
        assert!(Frame::decode("k", &Bytes::from(both)).is_err());
    }

    #[test]
    fn round_trips_stale_values() {
        let mut value = Frame::value(Bytes::from_static(b"[1]"), 5, 10);
        value.stale = true;
        assert_eq!(Frame::decode("k", &value.encode()).unwrap(), value);
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        let good = Frame::value(Bytes::from_static(b"1"), 5, 10).encode();
        let mut version = good.to_vec();
        version[3] = 2;
        let mut flags = good.to_vec();
        flags[4] = 0x80;
        let mut both = good.to_vec();
        both[4] = FLAG_ABSENT | FLAG_STALE;
        let mut absent_with_payload = good.to_vec();
        absent_with_payload[4] = FLAG_ABSENT;
        for bad in [
            Bytes::new(),
            Bytes::from_static(b"\0cf"),
            Bytes::from(version),
            Bytes::from(flags),
            Bytes::from(both),
            Bytes::from(absent_with_payload),
            Bytes::from_static(b"\0xx\x01\x00aaaaaaaabbbbbbbb"),
        ] {
            let err = Frame::decode("org:acme", &bad).unwrap_err();
            assert!(
                matches!(err, CacheError::Integrity { layer: "frame", .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("org:acme"), "{err}");
        }
    }

    #[test]
    fn typed_reads_see_fresh_values_only() {
        let now = now_ms();
        let absent = Frame::absent(now + 60_000).encode();
        assert_eq!(decode_stored::<u32>("k", &absent).unwrap(), None);
        let corrupt_payload = Frame::value(Bytes::from_static(b"nope"), now + 60_000, now + 60_000);
        assert!(decode_stored::<u32>("k", &corrupt_payload.encode()).is_err());
        assert!(decode_stored::<u32>("k", &Bytes::from_static(b"\0")).is_err());
        // Served by fail-safe past its TTL, kept for the throttle time: not for plain reads.
        let mut throttled = Frame::value(Bytes::from_static(b"7"), now + 60_000, now + 120_000);
        throttled.stale = true;
        assert_eq!(
            decode_stored::<u32>("k", &throttled.encode()).unwrap(),
            None
        );
    }
}
