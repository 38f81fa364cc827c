//! The object-safe [`Codec`] (through `erased-serde`), the generic helpers over it, and the
//! default codec, [`Json`].

use std::any::{Any, TypeId};
use std::fmt;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::msgpack::{self, MessagePack};
use super::tag::{CodecMismatch, WrittenWith};
use crate::{BoxError, CacheError};

/// What [`Codec::decode_erased`] hands its deserializer to, once: it deserializes the caller's
/// type from it and keeps the value.
pub type DeserializeFn<'a> = dyn for<'de> FnMut(&mut dyn erased_serde::Deserializer<'de>) -> Result<(), erased_serde::Error>
    + 'a;

/// A format for typed values, chosen at run time: `&dyn Codec` (or `Arc<dyn Codec>`) can be
/// kept in a service and switched by configuration.
///
/// Its methods take type-erased values (`erased-serde`) so that the trait is object-safe;
/// call it through [`encode_with`] and [`decode_with`], which are generic and name the key
/// and the Rust type in their errors. [`Json`] is the default; [`MessagePack`](super::MessagePack)
/// is the compact one. Those two are called directly by the helpers, without type erasure
/// (which costs 2-4x on a decode: an allocation per string, sequence and struct); a codec
/// from outside the crate goes through its erased methods.
///
/// An implementation must reject bytes it did not write (with a [`CodecMismatch`] when it
/// can tell whose they are), must never panic on any input, and should tag its output with
/// a header of its own, as [`MessagePack`](super::MessagePack) does, so that another codec
/// can tell.
///
/// ```
/// use cachet::codec::{self, Codec, Json, MessagePack};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Org {
///     slug: String,
///     seats: u32,
/// }
///
/// let org = Org { slug: "acme".into(), seats: 25 };
/// let codecs: [&dyn Codec; 2] = [&Json, &MessagePack];
/// for codec in codecs {
///     let bytes = codec::encode_with(codec, "org:acme", &org)?;
///     let back: Org = codec::decode_with(codec, "org:acme", &bytes)?;
///     assert_eq!(back, org, "{}", codec.name());
/// }
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub trait Codec: Any + Send + Sync + fmt::Debug {
    /// The codec's short name, as error messages show it (`"json"`, `"msgpack"`).
    fn name(&self) -> &'static str;

    /// Encodes `value`: the bytes to store, header included if the codec has one.
    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError>;

    /// Decodes `bytes`: calls `deserialize` once with a deserializer over the payload, then
    /// checks that nothing follows the value. Bytes written by another codec are an error.
    fn decode_erased(
        &self,
        bytes: &[u8],
        deserialize: &mut DeserializeFn<'_>,
    ) -> Result<(), BoxError>;
}

/// The codecs of this crate, which [`encode_with`] and [`decode_with`] call directly: with no
/// type erasure, the same code and cost as calling the format itself (JSON exactly as
/// [`encode`](super::encode) and [`decode`](super::decode)). Through `erased-serde` every
/// string, sequence and struct a decode produces takes an extra allocation, and every
/// primitive a virtual call: 2-4x the direct cost (`benches/codecs.rs`). A wrapper around
/// one of them (a forwarding impl) would be `Other`: still correct, only slower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Builtin {
    Json,
    MessagePack,
    /// A codec from outside the crate: reached through its erased methods.
    Other,
}

impl Builtin {
    pub(super) fn of(codec: &dyn Codec) -> Self {
        // `Any` is a supertrait: this reads the concrete type's id through the vtable.
        let id = Any::type_id(codec);
        if id == TypeId::of::<Json>() {
            Builtin::Json
        } else if id == TypeId::of::<MessagePack>() {
            Builtin::MessagePack
        } else {
            Builtin::Other
        }
    }
}

/// Encodes `value` with `codec`; a failure is [`CacheError::Serialization`] naming `key` and
/// `T`.
///
/// ```
/// use cachet::codec::{self, Json, MessagePack};
///
/// assert_eq!(&codec::encode_with(&Json, "k", &[1, 2])?[..], b"[1,2]");
/// assert!(codec::encode_with(&MessagePack, "k", &[1, 2])?.starts_with(b"\0cb"));
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub fn encode_with<T: Serialize + ?Sized>(
    codec: &dyn Codec,
    key: &str,
    value: &T,
) -> Result<Bytes, CacheError> {
    let encoded = match Builtin::of(codec) {
        Builtin::Json => return super::encode(key, value),
        Builtin::MessagePack => msgpack::encode(value).map_err(BoxError::from),
        // `&T` is sized even when `T` is not, so it coerces to the trait object.
        Builtin::Other => codec.encode_erased(&value),
    };
    encoded
        .map(Bytes::from)
        .map_err(|e| CacheError::serialization::<T>(key, "encode", e))
}

/// Decodes `bytes` with `codec` as a `T`; bad bytes, or bytes another codec wrote, are a
/// [`CacheError::Serialization`] naming `key` and `T` (and both codecs), never a panic.
///
/// ```
/// use cachet::{codec::{self, Json, MessagePack}, CacheError};
///
/// let packed = codec::encode_with(&MessagePack, "k", &vec!["a"])?;
/// assert_eq!(codec::decode_with::<Vec<String>>(&MessagePack, "k", &packed)?, ["a"]);
/// let err = codec::decode_with::<Vec<String>>(&MessagePack, "k", br#"["a"]"#).unwrap_err();
/// assert!(matches!(err, CacheError::Serialization { .. }));
/// assert!(err.to_string().contains("read with the msgpack codec"), "{err}");
/// # Ok::<(), CacheError>(())
/// ```
pub fn decode_with<T: DeserializeOwned>(
    codec: &dyn Codec,
    key: &str,
    bytes: &[u8],
) -> Result<T, CacheError> {
    match Builtin::of(codec) {
        Builtin::Json => return decode_json(key, bytes),
        Builtin::MessagePack => {
            return msgpack::decode(bytes)
                .map_err(|e| CacheError::serialization::<T>(key, "decode", e));
        }
        Builtin::Other => {}
    }
    let mut value = None;
    codec
        .decode_erased(bytes, &mut |de| {
            value = Some(erased_serde::deserialize::<T>(de)?);
            Ok(())
        })
        .map_err(|e| CacheError::serialization::<T>(key, "decode", e))?;
    value.ok_or_else(|| {
        let message = format!("the {} codec decoded no value", codec.name());
        CacheError::serialization::<T>(key, "decode", message)
    })
}

/// [`decode`](super::decode), and when it fails on bytes a binary codec wrote (or on a frame),
/// the error says so instead of what the JSON parser saw. Success costs the same as
/// `decode`: the header is only looked at on the error path.
fn decode_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, CacheError> {
    super::decode(key, bytes).map_err(|e| match foreign_to_json(bytes) {
        Some(mismatch) => CacheError::serialization::<T>(key, "decode", mismatch),
        None => e,
    })
}

/// The mismatch to report when JSON fails on `bytes` that are tagged as something else.
fn foreign_to_json(bytes: &[u8]) -> Option<CodecMismatch> {
    let mismatch = CodecMismatch::of(bytes, Json.name());
    (mismatch.written_with != WrittenWith::Untagged).then_some(mismatch)
}

/// JSON through `serde_json`: the default codec, and the format other languages read.
///
/// Its output is plain JSON, byte for byte what [`codec::encode`](super::encode) writes, with
/// no header; [`encode_with`] and [`decode_with`] call those functions for it (no type
/// erasure), so choosing `Json` through `&dyn Codec` costs what they cost.
///
/// ```
/// use cachet::codec::{self, Json};
///
/// let bytes = codec::encode_with(&Json, "k", &("acme", 25))?;
/// assert_eq!(bytes, codec::encode("k", &("acme", 25))?);
/// assert_eq!(&bytes[..], br#"["acme",25]"#);
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

impl Codec for Json {
    fn name(&self) -> &'static str {
        "json"
    }

    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(value)?)
    }

    fn decode_erased(
        &self,
        bytes: &[u8],
        deserialize: &mut DeserializeFn<'_>,
    ) -> Result<(), BoxError> {
        let foreign = |e: BoxError| foreign_to_json(bytes).map_or(e, |m| m.into());
        // As in `decode`: check UTF-8 once, then parse from `&str`.
        let text = std::str::from_utf8(bytes).map_err(|e| foreign(e.into()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        deserialize(&mut <dyn erased_serde::Deserializer>::erase(&mut de))
            .map_err(|e| foreign(e.into()))?;
        de.end()?;
        Ok(())
    }
}
