//! Decoded values kept beside in-memory entries: what
//! [`CacheServiceExt::get_shared`](crate::CacheServiceExt::get_shared) reads through
//! [`CacheService::get_shared_now`](super::CacheService::get_shared_now).
//!
//! A backend that keeps entries in process memory (the in-memory backend, a tiered
//! instance's L1) gives each entry a [`DecodedSlot`]: the first `get_shared::<T>` of the
//! entry decodes its bytes with the caller's [`Decoder`] and keeps the result there; later
//! ones clone an `Arc`. A new write of the key is a new entry with an empty slot, so
//! invalidation, TTL and every coherence rule apply to the decoded value exactly as to the
//! bytes it came from.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::CacheError;
use crate::codec::Codec;

/// A decoded value, shared: an `Arc<T>` behind `dyn Any` (the `T` of the [`Decoder`] that
/// made it).
pub type SharedValue = Arc<dyn Any + Send + Sync>;

/// How stored bytes become a value of one type, for
/// [`get_shared_now`](super::CacheService::get_shared_now): the type, and the service's
/// [`Codec`]. Made by the typed helpers for their `T`; backends call
/// [`decode`](Decoder::decode) (or let a [`DecodedSlot`] call it) and wrappers pass it on.
pub struct Decoder<'c> {
    type_id: TypeId,
    type_name: &'static str,
    codec: &'c dyn Codec,
    decode: DecodeFn,
}

/// What a [`Decoder`] runs: the codec, the key, the stored bytes.
type DecodeFn = fn(&dyn Codec, &str, &Bytes) -> Result<Decoded, CacheError>;

impl<'c> Decoder<'c> {
    /// The decoder of the type `type_id` (named `type_name`) that `decode` produces with
    /// `codec`.
    pub(crate) fn new(
        type_id: TypeId,
        type_name: &'static str,
        codec: &'c dyn Codec,
        decode: DecodeFn,
    ) -> Self {
        Decoder {
            type_id,
            type_name,
            codec,
            decode,
        }
    }

    /// The type the values are decoded as.
    #[inline]
    pub fn type_id(&self) -> TypeId {
        self.type_id
    }

    /// That type's name (`std::any::type_name`).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Decodes the bytes stored under `key`: a [`CacheError::Serialization`] when they are
    /// not a `T` (or were written with another codec), or a [`CacheError::Integrity`] when a
    /// cache-aside frame is malformed.
    pub fn decode(&self, key: &str, stored: &Bytes) -> Result<Decoded, CacheError> {
        (self.decode)(self.codec, key, stored)
    }
}

impl fmt::Debug for Decoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("type", &self.type_name)
            .field("codec", &self.codec.name())
            .finish()
    }
}

/// What an entry's bytes decode to: a value, or nothing (a cached "not found", or a value
/// that fail-safe keeps for cache-aside only), and until when the value may be served (a
/// cache-aside frame's freshness; plain values have no end of their own).
#[derive(Clone)]
pub struct Decoded {
    value: Option<SharedValue>,
    fresh_until_ms: u64,
}

impl Decoded {
    /// A value with no freshness of its own (plain stored bytes).
    pub(crate) fn plain(value: SharedValue) -> Self {
        Decoded {
            value: Some(value),
            fresh_until_ms: u64::MAX,
        }
    }

    /// A framed value, fresh until `fresh_until_ms` (Unix milliseconds).
    pub(crate) fn fresh_until(value: SharedValue, fresh_until_ms: u64) -> Self {
        Decoded {
            value: Some(value),
            fresh_until_ms,
        }
    }

    /// What reads as "no value" whenever it is read.
    pub(crate) fn nothing() -> Self {
        Decoded {
            value: None,
            fresh_until_ms: u64::MAX,
        }
    }

    /// The value as a read sees it now: `None` once a framed value is past its freshness
    /// (`now_ms` is called only then, so a plain value costs no clock read).
    #[inline]
    pub fn value(&self, now_ms: impl FnOnce() -> u64) -> Option<SharedValue> {
        let value = self.value.as_ref()?;
        if self.fresh_until_ms != u64::MAX && now_ms() >= self.fresh_until_ms {
            return None;
        }
        Some(Arc::clone(value))
    }
}

/// The decoded value of one stored entry, made on its first shared read: an entry's bytes
/// never change, so neither does what they decode to. It holds one type; a read as another
/// type decodes without keeping the result (one key is read as one type in practice).
#[derive(Default)]
pub struct DecodedSlot(OnceLock<(TypeId, Decoded)>);

impl DecodedSlot {
    /// An empty slot.
    pub fn new() -> Self {
        DecodedSlot(OnceLock::new())
    }

    /// What `stored` (the entry's bytes) decodes to as `decoder`'s type: kept from an
    /// earlier read of that type, or decoded now and kept. Errors are not kept (the entry
    /// stays as it is, and every read reports them).
    pub fn get_or_decode(
        &self,
        key: &str,
        stored: &Bytes,
        decoder: &Decoder,
    ) -> Result<Decoded, CacheError> {
        if let Some((type_id, decoded)) = self.0.get() {
            if *type_id == decoder.type_id() {
                return Ok(decoded.clone());
            }
            return decoder.decode(key, stored);
        }
        let decoded = decoder.decode(key, stored)?;
        // Two first readers may both decode; one result is kept, both are equal.
        let _ = self.0.set((decoder.type_id(), decoded.clone()));
        Ok(decoded)
    }

    /// The value kept for `type_id`, if the slot holds one of that type.
    #[inline]
    pub fn kept(&self, type_id: TypeId) -> Option<&Decoded> {
        match self.0.get() {
            Some((kept, decoded)) if *kept == type_id => Some(decoded),
            _ => None,
        }
    }

    /// What a read of `stored` as `decoder`'s type sees now:
    /// [`get_or_decode`](Self::get_or_decode) then [`Decoded::value`], without cloning the
    /// kept [`Decoded`] (a hit clones the value's `Arc`, nothing else).
    #[inline]
    pub fn value_now(
        &self,
        key: &str,
        stored: &Bytes,
        decoder: &Decoder,
        now_ms: impl FnOnce() -> u64,
    ) -> Result<Option<SharedValue>, CacheError> {
        match self.0.get() {
            Some((type_id, decoded)) if *type_id == decoder.type_id() => Ok(decoded.value(now_ms)),
            _ => self.decode_now(key, stored, decoder, now_ms),
        }
    }

    /// [`value_now`](Self::value_now) past the kept value (a first read, or another type).
    #[cold]
    #[inline(never)]
    fn decode_now(
        &self,
        key: &str,
        stored: &Bytes,
        decoder: &Decoder,
        now_ms: impl FnOnce() -> u64,
    ) -> Result<Option<SharedValue>, CacheError> {
        Ok(self.get_or_decode(key, stored, decoder)?.value(now_ms))
    }
}

impl fmt::Debug for DecodedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedSlot")
            .field("decoded", &self.0.get().is_some())
            .finish()
    }
}
