//! The header that tags a binary codec's output, and what a codec reports when it is handed
//! bytes another codec wrote.
//!
//! Layout: `0x00`, `b"cb"`, then one byte naming the codec and its format version (`1`:
//! [`MessagePack`](super::MessagePack), structs as maps), then the codec's payload. JSON text
//! never starts with a NUL byte, so tagged bytes can never be mistaken for JSON, and JSON
//! stays plain (no header: other languages read it as it is). The cache-aside
//! [frame](super::frame) starts with `\0cf`: same NUL byte, different second and third bytes,
//! and it wraps a codec's payload instead of being one.

use std::fmt;

/// The first bytes of every binary codec's output.
pub const MAGIC: &[u8; 3] = b"\0cb";
/// Bytes before a binary codec's payload: [`MAGIC`] and the codec id.
pub const HEADER_LEN: usize = MAGIC.len() + 1;
/// The id of [`MessagePack`](super::MessagePack), version 1 (structs as maps).
pub(crate) const MSGPACK_V1: u8 = 1;

/// The name of the binary codec with this id, when this build knows it.
fn known(id: u8) -> Option<&'static str> {
    match id {
        MSGPACK_V1 => Some("msgpack"),
        _ => None,
    }
}

/// The header of the binary codec `id`.
pub(crate) const fn header(id: u8) -> [u8; HEADER_LEN] {
    [MAGIC[0], MAGIC[1], MAGIC[2], id]
}

/// What stored bytes were written with, as far as their first bytes tell.
///
/// ```
/// use cachet::codec::{self, MessagePack, WrittenWith};
///
/// let packed = codec::encode_with(&MessagePack, "k", &7u8).unwrap();
/// assert_eq!(WrittenWith::of(&packed), WrittenWith::Codec("msgpack"));
/// assert_eq!(WrittenWith::of(b"7"), WrittenWith::Untagged);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WrittenWith {
    /// No binary codec header: JSON, or bytes that no cachet codec wrote.
    Untagged,
    /// The binary codec of this name.
    Codec(&'static str),
    /// A binary codec header with an id this build does not know (a newer writer), or `0`
    /// when the header stops before its id.
    UnknownCodec(u8),
    /// A cache-aside frame (`\0cf`): it wraps a codec's payload, it is not one.
    Frame,
}

impl WrittenWith {
    /// Reads the first bytes of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        if bytes.starts_with(MAGIC) {
            return match bytes.get(MAGIC.len()) {
                Some(&id) => known(id).map_or(WrittenWith::UnknownCodec(id), WrittenWith::Codec),
                // The magic alone, with no id: tagged but truncated.
                None => WrittenWith::UnknownCodec(0),
            };
        }
        if bytes.starts_with(super::frame::MAGIC) {
            return WrittenWith::Frame;
        }
        WrittenWith::Untagged
    }
}

/// Stored bytes written with one codec and read with another: the
/// [`source`](std::error::Error::source) of the [`CacheError::Serialization`](crate::CacheError::Serialization)
/// such a read returns (downcast it to tell this case from corrupt bytes).
///
/// ```
/// use std::error::Error as _;
/// use cachet::codec::{self, CodecMismatch, Json, MessagePack, WrittenWith};
///
/// let packed = codec::encode_with(&MessagePack, "org:acme", &vec![1, 2]).unwrap();
/// let err = codec::decode_with::<Vec<u32>>(&Json, "org:acme", &packed).unwrap_err();
/// assert!(err.to_string().contains("written with the msgpack codec, read with the json codec"));
/// let mismatch = err.source().unwrap().downcast_ref::<CodecMismatch>().unwrap();
/// assert_eq!(mismatch.written_with, WrittenWith::Codec("msgpack"));
/// assert_eq!(mismatch.read_with, "json");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecMismatch {
    /// What the bytes say they were written with.
    pub written_with: WrittenWith,
    /// The name of the codec that was asked to read them.
    pub read_with: &'static str,
}

impl CodecMismatch {
    /// The mismatch of `read_with` reading `bytes`.
    pub(crate) fn of(bytes: &[u8], read_with: &'static str) -> Self {
        CodecMismatch {
            written_with: WrittenWith::of(bytes),
            read_with,
        }
    }
}

impl fmt::Display for CodecMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let read = self.read_with;
        match self.written_with {
            WrittenWith::Untagged => write!(
                f,
                "written with the json codec or not by a cachet codec (no \\0cb header), \
                 read with the {read} codec"
            ),
            WrittenWith::Codec(written) => {
                write!(
                    f,
                    "written with the {written} codec, read with the {read} codec"
                )
            }
            WrittenWith::UnknownCodec(id) => write!(
                f,
                "written with a binary codec this build does not know (id {id}), \
                 read with the {read} codec"
            ),
            WrittenWith::Frame => write!(
                f,
                "a cache-aside frame (\\0cf), not a codec's output, read with the {read} codec \
                 (decode the frame first, then its payload)"
            ),
        }
    }
}

impl std::error::Error for CodecMismatch {}

/// The payload of bytes tagged with the binary codec `id`, or the mismatch `read_with` reports.
pub(crate) fn payload<'a>(
    bytes: &'a [u8],
    id: u8,
    read_with: &'static str,
) -> Result<&'a [u8], CodecMismatch> {
    match bytes.split_first_chunk::<HEADER_LEN>() {
        Some((head, payload)) if *head == header(id) => Ok(payload),
        _ => Err(CodecMismatch::of(bytes, read_with)),
    }
}
