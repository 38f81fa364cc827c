//! [`MessagePack`]: the compact binary codec (rmp-serde, structs as maps).

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::erased::{Codec, DeserializeFn};
use super::tag::{self, MSGPACK_V1};
use crate::BoxError;

/// Nesting deeper than this does not decode: the same limit as JSON's (`serde_json` stops at
/// 128), so that a hostile stored value cannot overflow the stack (rmp-serde's own default is
/// 1024 levels, each a few frames deeper through type erasure).
const MAX_DEPTH: usize = 128;

/// MessagePack through `rmp-serde`, with structs written as maps (field names included): the
/// compact binary codec, for values only Rust services read.
///
/// Its output is the header `\0cb` + `1` (this codec, format version 1), then MessagePack.
/// Writing field names keeps it self-describing, so what formats without them get wrong
/// decodes here as it does from JSON — `serde_json::Value`, untagged and internally tagged
/// enums, `#[serde(flatten)]`, fields skipped with `skip_serializing_if`, fields added or
/// removed between versions of a type — and where a value does not fit its type the result
/// is an error, never another value. Unlike JSON it keeps `NaN` and the infinities, and maps
/// whose keys are not strings.
///
/// What it cannot do: be read by anything that does not know the header (strip the first
/// 4 bytes and any MessagePack library reads the rest); tell `Some(())` or `Some(None)`
/// from `None` (neither can JSON: all three are `nil`, as they are `null`); carry types
/// whose serde impls only work with `serde_json` (its `RawValue`).
///
/// ```
/// use cachet::codec::{self, MessagePack};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Org {
///     slug: String,
///     #[serde(skip_serializing_if = "Option::is_none")]
///     parent: Option<u64>,
///     seats: u32,
/// }
///
/// let org = Org { slug: "acme".into(), parent: None, seats: 25 };
/// let bytes = codec::encode_with(&MessagePack, "org:acme", &org)?;
/// assert!(bytes.starts_with(b"\0cb\x01"));
/// assert!(bytes.len() < codec::encode("org:acme", &org)?.len());
/// assert_eq!(codec::decode_with::<Org>(&MessagePack, "org:acme", &bytes)?, org);
///
/// // Read with JSON, it is an error that names both codecs.
/// let err = codec::decode_with::<Org>(&codec::Json, "org:acme", &bytes).unwrap_err();
/// assert!(err.to_string().contains("written with the msgpack codec, read with the json codec"));
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessagePack;

impl Codec for MessagePack {
    fn name(&self) -> &'static str {
        "msgpack"
    }

    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        Ok(encode(value)?)
    }

    fn decode_erased(
        &self,
        bytes: &[u8],
        deserialize: &mut DeserializeFn<'_>,
    ) -> Result<(), BoxError> {
        decode_by(bytes, |de| {
            deserialize(&mut <dyn erased_serde::Deserializer>::erase(de))
        })
    }
}

/// The decoder's reader: over a slice, borrowing from it (the fastest rmp-serde has).
type Reader<'a> = rmp_serde::decode::ReadRefReader<'a, [u8]>;

/// The stored form of `value`: the header, then MessagePack with structs as maps.
/// [`encode_with`](super::encode_with) calls it directly, `encode_erased` with a trait
/// object: one format either way.
pub(super) fn encode<T: Serialize + ?Sized>(
    value: &T,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    // What serde_json starts with; an org context (~240 bytes here) grows once.
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&tag::header(MSGPACK_V1));
    value.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())?;
    Ok(out)
}

/// Decodes a `T` from bytes [`encode`] wrote ([`decode_with`](super::decode_with)'s direct
/// path).
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BoxError> {
    let mut value = None;
    decode_by(bytes, |de| {
        value = Some(T::deserialize(de)?);
        Ok::<_, rmp_serde::decode::Error>(())
    })?;
    value.ok_or_else(|| "no value decoded".into())
}

/// Checks the header, runs `deserialize` over the payload, then checks that nothing follows
/// the value.
fn decode_by<E: Into<BoxError>>(
    bytes: &[u8],
    deserialize: impl FnOnce(&mut rmp_serde::Deserializer<Reader<'_>>) -> Result<(), E>,
) -> Result<(), BoxError> {
    let payload = tag::payload(bytes, MSGPACK_V1, MessagePack.name())?;
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    de.set_max_depth(MAX_DEPTH);
    deserialize(&mut de).map_err(Into::into)?;
    // rmp-serde does not say where the value ended (its reader over `&mut &[u8]` would, but
    // copies every string and made a decode about a third slower): measure it.
    match value_len(payload) {
        Some(len) if len == payload.len() => Ok(()),
        Some(len) => {
            Err(format!("trailing bytes after the value ({})", payload.len() - len).into())
        }
        None => Err("malformed MessagePack".into()),
    }
}

/// The length of the one MessagePack value `bytes` starts with; `None` if it is cut short or
/// malformed. Iterative (a count of the items still to skip), so no input can exhaust the
/// stack. Hand-written because `rmp::decode::MessageLen` panics (`todo!`) on extension types,
/// which the decoder accepts as bytes.
fn value_len(bytes: &[u8]) -> Option<usize> {
    use rmp::Marker as M;

    let mut at = 0;
    // Big-endian length fields of 1, 2 or 4 bytes.
    let read_len = |at: &mut usize, n: usize| -> Option<usize> {
        let field = bytes.get(*at..*at + n)?;
        *at += n;
        Some(field.iter().fold(0, |len, &b| (len << 8) | usize::from(b)))
    };
    let mut pending: usize = 1;
    while pending > 0 {
        pending -= 1;
        let marker = M::from_u8(*bytes.get(at)?);
        at += 1;
        let (skip, items) = match marker {
            M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => (0, 0),
            M::U8 | M::I8 => (1, 0),
            M::U16 | M::I16 => (2, 0),
            M::U32 | M::I32 | M::F32 => (4, 0),
            M::U64 | M::I64 | M::F64 => (8, 0),
            M::FixStr(n) => (usize::from(n), 0),
            M::Str8 | M::Bin8 => (read_len(&mut at, 1)?, 0),
            M::Str16 | M::Bin16 => (read_len(&mut at, 2)?, 0),
            M::Str32 | M::Bin32 => (read_len(&mut at, 4)?, 0),
            M::FixArray(n) => (0, usize::from(n)),
            M::Array16 => (0, read_len(&mut at, 2)?),
            M::Array32 => (0, read_len(&mut at, 4)?),
            M::FixMap(n) => (0, 2 * usize::from(n)),
            M::Map16 => (0, 2 * read_len(&mut at, 2)?),
            M::Map32 => (0, read_len(&mut at, 4)?.checked_mul(2)?),
            // A type byte, then the data.
            M::FixExt1 => (2, 0),
            M::FixExt2 => (3, 0),
            M::FixExt4 => (5, 0),
            M::FixExt8 => (9, 0),
            M::FixExt16 => (17, 0),
            M::Ext8 => (read_len(&mut at, 1)? + 1, 0),
            M::Ext16 => (read_len(&mut at, 2)? + 1, 0),
            M::Ext32 => (read_len(&mut at, 4)?.checked_add(1)?, 0),
            M::Reserved => return None,
        };
        at = at.checked_add(skip).filter(|&end| end <= bytes.len())?;
        // Every item takes at least a byte: more pending items than bytes left is cut short
        // (and keeps `pending` from overflowing).
        pending = pending
            .checked_add(items)
            .filter(|&p| p <= bytes.len() - at)?;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::de;

    use super::*;

    fn payload_of<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        encode(value).unwrap()[tag::HEADER_LEN..].to_vec()
    }

    #[test]
    fn value_len_measures_every_kind_of_value() {
        let long = "x".repeat(70_000);
        let values = [
            payload_of(
                &serde_json::json!({"a": [1, -1, 300, -300, 70_000, -70_000, u64::MAX, i64::MIN], "b": null, "c": true}),
            ),
            payload_of(&serde_json::json!([0.5, "é", "", {}, []])),
            payload_of(&(long.as_str(), vec![7u8; 300], vec![1u16; 70_000])),
            payload_of(&std::collections::BTreeMap::from([(1u8, "a"); 1])),
            payload_of(&(1.5f32, 'x', (), Some(3))),
            // Extension types: fixext 1 / 16, ext 8 / 16 / 32 (rmp-serde decodes them as bytes).
            vec![0xd4, 1, 9],
            [&[0xd8, 1][..], &[0; 16]].concat(),
            vec![0xc7, 2, 5, 1, 2],
            vec![0xc8, 0, 1, 5, 1],
            vec![0xc9, 0, 0, 0, 1, 5, 1],
        ];
        for (i, payload) in values.into_iter().enumerate() {
            assert_eq!(value_len(&payload), Some(payload.len()), "{payload:?}");
            if i < 5 {
                // rmp's own measure agrees where it works (it panics on extension types).
                let len = rmp::decode::MessageLen::len_of(&payload).unwrap();
                assert_eq!(len, payload.len());
            } else {
                // The decoder skips them (an unknown field holding one, say), so a measure that
                // panicked on them would panic here.
                let tagged = [&tag::header(MSGPACK_V1)[..], &payload].concat();
                let read = super::super::decode_with::<de::IgnoredAny>(&MessagePack, "k", &tagged);
                assert!(read.is_ok(), "{payload:?}: {read:?}");
            }
            for cut in 0..payload.len().min(64) {
                assert_eq!(value_len(&payload[..cut]), None, "{cut} of {payload:?}");
            }
            let longer = [&payload[..], &[0xc0, 1]].concat();
            assert_eq!(value_len(&longer), Some(payload.len()));
        }
        assert_eq!(value_len(&[0xc1]), None);
        assert_eq!(value_len(&[0xdf, 0xff, 0xff, 0xff, 0xff]), None);
    }

    proptest! {
        #[test]
        fn value_len_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Some(len) = value_len(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }
    }
}
