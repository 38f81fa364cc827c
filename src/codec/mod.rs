//! Typed values to bytes and back: JSON through `serde_json` by default, or a codec chosen at
//! run time through the object-safe [`Codec`] trait.
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
//! # Choosing a codec
//!
//! A [`Codec`] is a value (`&dyn Codec`, `Arc<dyn Codec>`): a service can take one from its
//! configuration. [`encode_with`] and [`decode_with`] are the typed calls over it.
//!
//! | codec | output | choose it when |
//! | --- | --- | --- |
//! | [`Json`] (default) | plain JSON, byte for byte [`encode`]'s, no header | other languages or tools read the values, or you want to read them in `redis-cli`; through `&dyn Codec` it costs what [`encode`] / [`decode`] cost (a direct path, no type erasure) |
//! | [`MessagePack`] | `\0cb` + a codec id, then MessagePack with field names | only Rust services read the values and size or codec time matters: for the benches' org context 0.81x JSON's size (238 bytes against 293), about 0.55x its encode time and 0.8x its decode time (`benches/codecs.rs`) |
//!
//! Both are called directly by [`encode_with`] and [`decode_with`]; a codec from outside the
//! crate goes through `erased-serde`, which costs 2-4x on a decode (an allocation per string,
//! sequence and struct).
//!
//! The compact codec is MessagePack with structs as maps, not a denser format without field
//! names (postcard, bitcode), although those are smaller and faster: they cannot decode
//! `serde_json::Value`, untagged enums or `#[serde(flatten)]`, and a field skipped with
//! `skip_serializing_if` shifts the fields after it, which can decode as a *different value*
//! without any error. A cache must never return a wrong value; `benches/codecs.rs` measures
//! the candidates and prints what each does with these types.
//!
//! What [`MessagePack`] cannot do: be read by code that does not strip its 4-byte header
//! (after it, any MessagePack library reads the rest), or tell `Some(())` and `Some(None)`
//! from `None` — JSON cannot either (`null` for all three).
//!
//! Reading bytes with a codec other than the one that wrote them is a
//! [`CacheError::Serialization`] whose source is a [`CodecMismatch`] naming both codecs:
//! binary output starts with [`tag::MAGIC`] (a NUL byte, which JSON text never starts with)
//! and the writer's id, and JSON is recognised by having no such header.
//!
//! [`frame`] is the small header cache-aside stores around a value (its fresh and fail-safe
//! deadlines, or "not found"); the typed `get` reads through it. Its magic is `\0cf`: a frame
//! wraps a codec's output, and a codec handed a whole frame says so
//! ([`WrittenWith::Frame`]).

mod erased;
pub mod frame;
mod msgpack;
pub mod tag;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::CacheError;
pub use erased::{Codec, DeserializeFn, Json, decode_with, encode_with};
/// The type-erased serde traits [`Codec`]'s methods take, for implementing a codec.
pub use erased_serde;
pub use frame::Frame;
pub use msgpack::MessagePack;
pub use tag::{CodecMismatch, WrittenWith};

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
