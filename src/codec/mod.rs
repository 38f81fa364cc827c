//! Typed values to bytes and back: JSON through `serde_json`.
//!
//! Every backend stores opaque bytes; [`CacheServiceExt`](crate::CacheServiceExt) encodes
//! with [`encode`] before a write and decodes with [`decode`] after a read. Errors name the
//! key and the Rust type, and decoding never panics on arbitrary input (a fuzz target checks
//! it).
//!
//! JSON cannot represent a non-finite float: `f64::NAN` and the infinities are written as
//! `null` by `serde_json`, and reading that `null` back as an `f64` is a
//! [`CacheError::Serialization`]. Floats that are finite round-trip exactly. Values nested
//! more than 127 levels deep encode but do not decode (`serde_json`'s recursion limit, which
//! keeps a hostile stored value from overflowing the stack).
//!
//! [`frame`] is the small header cache-aside stores around a value (its fresh and fail-safe
//! deadlines, or "not found"); the typed `get` reads through it.

pub mod frame;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::CacheError;
pub use frame::Frame;

/// Encodes `value` as JSON.
///
/// ```
/// let bytes = cachet::codec::encode("org:acme", &vec![1, 2, 3]).unwrap();
/// assert_eq!(&bytes[..], b"[1,2,3]");
/// ```
pub fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Bytes, CacheError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| CacheError::serialization::<T>(key, "encode", e))
}

/// Decodes JSON `bytes` as a `T`; bad input is a [`CacheError::Serialization`], never a panic.
///
/// ```
/// use cachet::{codec, CacheError};
///
/// let n: Vec<u32> = codec::decode("k", b"[1,2,3]").unwrap();
/// assert_eq!(n, vec![1, 2, 3]);
/// let err = codec::decode::<Vec<u32>>("k", b"\xff not json").unwrap_err();
/// assert!(matches!(err, CacheError::Serialization { .. }));
/// ```
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, CacheError> {
    // Checking UTF-8 once up front (vectorised) and parsing from `&str` is faster than
    // `from_slice`, which re-checks every string it meets; JSON is UTF-8 either way.
    let text =
        std::str::from_utf8(bytes).map_err(|e| CacheError::serialization::<T>(key, "decode", e))?;
    serde_json::from_str(text).map_err(|e| CacheError::serialization::<T>(key, "decode", e))
}
