//! The small versioned header the tiered cache puts around values in Redis: it carries the
//! absolute expiry, so that an instance filling its L1 from L2 knows how long the value may
//! live without a `PTTL` round trip.
//!
//! Layout (big-endian): `b"CE"`, version `1`, flags (`0`: none defined yet), expiry in Unix
//! milliseconds (`u64`), then the payload. Anything else is a
//! [`CacheError::Integrity`], never a panic.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::{CacheError, IntegrityProblem};

const MAGIC: &[u8; 2] = b"CE";
const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 8;

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// When the value stops being valid, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The stored value.
    pub payload: Bytes,
}

/// Milliseconds since the Unix epoch, now (the clock cache-aside's frames use too).
pub use crate::codec::frame::now_ms;

impl Envelope {
    /// An envelope for `payload` valid for `ttl` from now.
    pub fn new(payload: Bytes, ttl: Duration) -> Self {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Envelope {
            expires_at_ms: now_ms().saturating_add(ttl_ms),
            payload,
        }
    }

    /// How long the value stays valid from now (zero once expired).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(now_ms()))
    }

    /// The stored form.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use cachet::envelope::Envelope;
    ///
    /// let envelope = Envelope::new(Bytes::from_static(b"{}"), Duration::from_secs(60));
    /// let decoded = Envelope::decode("k", &envelope.encode()).unwrap();
    /// assert_eq!(decoded, envelope);
    /// assert!(Envelope::decode("k", &Bytes::from_static(b"{}")).is_err());
    /// ```
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(0);
        out.put_u64(self.expires_at_ms);
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Reads an envelope; anything malformed is [`CacheError::Integrity`] naming `key` (layer
    /// `"envelope"`).
    pub fn decode(key: &str, stored: &Bytes) -> Result<Envelope, CacheError> {
        let bad = |problem| CacheError::integrity(key, "envelope", problem);
        if stored.len() < HEADER_LEN {
            return Err(bad(IntegrityProblem::Truncated));
        }
        if &stored[..2] != MAGIC {
            return Err(bad(IntegrityProblem::BadMagic));
        }
        if stored[2] != VERSION {
            return Err(bad(IntegrityProblem::UnknownVersion(stored[2])));
        }
        if stored[3] != 0 {
            return Err(bad(IntegrityProblem::Malformed("flags")));
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&stored[4..12]);
        Ok(Envelope {
            expires_at_ms: u64::from_be_bytes(expiry),
            payload: stored.slice(HEADER_LEN..),
        })
    }
}
