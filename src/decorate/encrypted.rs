//! [`EncryptedCacheService`]: AES-256-GCM around every value, with the key name bound as
//! associated data and a key id for rotation.
//!
//! # Stored form
//!
//! Every value is stored as a small versioned envelope (big-endian):
//!
//! | bytes | what |
//! | --- | --- |
//! | 2 | magic `b"CS"` |
//! | 1 | version `1` (AES-256-GCM, 96-bit nonce, 128-bit tag) |
//! | 4 | key id (`u32`) of the key that encrypted it |
//! | 12 | nonce, random per value (OS RNG) |
//! | n + 16 | ciphertext of the n-byte value, then the tag |
//!
//! The associated data is the 19 header bytes followed by the cache key's name, so the tag
//! covers the header (a changed key id or version fails) and the key (a value copied under
//! another key fails). The header has a fixed length, so the concatenation is unambiguous.
//!
//! Reading a value that is not such an envelope, one whose key id the keyring does not
//! hold, or one whose tag does not verify (tampered bytes, a wrong key, a value copied from
//! another key) is [`CacheError::Serialization`] naming the key and, where there is one, the
//! key id; nothing is written back, so the stored entry stays as it was.

use std::fmt;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;

use crate::load::{Lease, LeaseRead, LeaseRequest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use bytes::{BufMut, Bytes, BytesMut};
use zeroize::Zeroizing;

use crate::{CacheError, CacheService};

/// The magic bytes at the start of every encrypted value.
///
/// ```
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v")?;
/// assert!(sealed.starts_with(cachet::decorate::encrypted::MAGIC));
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const MAGIC: &[u8; 2] = b"CS";
/// The envelope version this code writes and reads.
///
/// ```
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v")?;
/// assert_eq!(sealed[2], cachet::decorate::encrypted::VERSION);
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const VERSION: u8 = 1;
/// Length of the random nonce, in bytes (96 bits).
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::NONCE_LEN * 8, 96);
/// ```
pub const NONCE_LEN: usize = 12;
/// Length of the authentication tag, in bytes (128 bits).
///
/// ```
/// use cachet::decorate::encrypted::{HEADER_LEN, TAG_LEN};
///
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"")?;
/// assert_eq!(sealed.len(), HEADER_LEN + TAG_LEN); // an empty value
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext: magic, version, key id, nonce.
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::HEADER_LEN, 2 + 1 + 4 + 12);
/// ```
pub const HEADER_LEN: usize = 2 + 1 + 4 + NONCE_LEN;

/// One 256-bit AES key. Its `Debug` never shows the key, and its bytes are zeroed on drop.
///
/// Built from raw bytes, or parsed from text read from the environment or settings: 64 hex
/// digits, or base64 (standard or URL-safe alphabet, padding optional) of 32 bytes.
/// Surrounding whitespace is ignored.
///
/// ```
/// use cachet::EncryptionKey;
///
/// let from_hex = EncryptionKey::parse(&"07".repeat(32))?;
/// let from_base64 = EncryptionKey::parse("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=")?;
/// assert_eq!(from_hex, EncryptionKey::from([7u8; 32]));
/// assert_eq!(from_base64, from_hex);
/// assert_eq!(format!("{from_hex:?}"), "EncryptionKey(<redacted>)");
/// assert!(EncryptionKey::parse("not a key").is_err());
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Clone)]
pub struct EncryptionKey(Zeroizing<[u8; 32]>);

impl EncryptionKey {
    /// Parses 64 hex digits or the base64 of 32 bytes. Anything else is
    /// [`CacheError::Config`]; the message never repeats the text (it may be a real key with
    /// a typo).
    ///
    /// ```
    /// use cachet::{CacheError, EncryptionKey};
    ///
    /// let key = EncryptionKey::parse("  000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")?;
    /// assert_eq!(key.as_bytes()[31], 0x1f);
    /// let err = EncryptionKey::parse("c2VjcmV0").unwrap_err(); // 6 bytes, not 32
    /// assert!(matches!(err, CacheError::Config { .. }));
    /// assert!(!err.to_string().contains("c2VjcmV0"));
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self, CacheError> {
        let text = text.trim();
        let mut key = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return match hex::decode_to_slice(text, &mut key[..]) {
                Ok(()) => Ok(EncryptionKey(key)),
                Err(e) => Err(CacheError::config(
                    "the encryption key is not valid hex",
                    Some(Box::new(e)),
                )),
            };
        }
        // Base64 of 32 bytes is 43 characters, 44 with padding; decode into a larger buffer
        // so that a wrong length is reported as such rather than as a buffer error.
        let mut buffer = Zeroizing::new([0u8; 48]);
        let decoded = if text.len() > 64 {
            None
        } else {
            STANDARD_PAD_INDIFFERENT
                .decode_slice(text, &mut buffer[..])
                .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode_slice(text, &mut buffer[..]))
                .ok()
        };
        match decoded {
            Some(32) => {
                key.copy_from_slice(&buffer[..32]);
                Ok(EncryptionKey(key))
            }
            Some(n) => Err(CacheError::config(
                format!("the encryption key decodes as base64 to {n} bytes; AES-256 needs 32"),
                None,
            )),
            None => Err(CacheError::config(
                format!(
                    "the encryption key ({} characters) is neither 64 hex digits nor the base64 of 32 bytes",
                    text.chars().count()
                ),
                None,
            )),
        }
    }

    /// The raw key bytes.
    ///
    /// ```
    /// let key = cachet::EncryptionKey::from([1u8; 32]);
    /// assert_eq!(key.as_bytes(), &[1u8; 32]);
    /// ```
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for EncryptionKey {
    fn from(bytes: [u8; 32]) -> Self {
        EncryptionKey(Zeroizing::new(bytes))
    }
}

/// Compares every byte, whatever the first difference, so the time taken says nothing about
/// where two keys differ.
impl PartialEq for EncryptionKey {
    fn eq(&self, other: &Self) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for EncryptionKey {}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// A keyring: the current key, which encrypts every new value, and previous keys, which
/// still decrypt values written before a rotation. Each key has a `u32` id that is stored
/// with every value.
///
/// Rotation: deploy `EncryptionKeys::new(2, new_key).with_previous(1, old_key)?`
/// everywhere; new writes use key 2, old values still read; once every value written with
/// key 1 has expired (the longest TTL in use), drop key 1.
///
/// Its `Debug` shows the key ids only, never the keys.
///
/// ```
/// use cachet::{EncryptionKey, EncryptionKeys};
///
/// let old = EncryptionKeys::new(1, [1u8; 32]);
/// let sealed = old.encrypt("org:acme", b"secret")?;
///
/// let rotated = EncryptionKeys::new(2, [2u8; 32]).with_previous(1, [1u8; 32])?;
/// assert_eq!(rotated.decrypt("org:acme", &sealed)?, &b"secret"[..]);
/// assert_eq!(cachet::EncryptedEnvelope::parse("org:acme", &rotated.encrypt("org:acme", b"x")?)?.key_id(), 2);
/// assert_eq!(format!("{rotated:?}"), "EncryptionKeys { current_id: 2, previous_ids: [1] }");
///
/// // Keys read from settings: hex or base64 text.
/// let from_env = EncryptionKeys::new(3, EncryptionKey::parse(&"ab".repeat(32))?);
/// assert_eq!(from_env.current_id(), 3);
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Clone)]
pub struct EncryptionKeys {
    current_id: u32,
    /// The current key first, then the previous ones in the order they were added.
    ciphers: Vec<(u32, Aes256Gcm)>,
}

impl EncryptionKeys {
    /// A keyring whose current key is `key`, with id `current_id`.
    ///
    /// ```
    /// let keys = cachet::EncryptionKeys::new(1, [9u8; 32]);
    /// assert_eq!(keys.current_id(), 1);
    /// ```
    pub fn new(current_id: u32, key: impl Into<EncryptionKey>) -> Self {
        EncryptionKeys {
            current_id,
            ciphers: vec![(current_id, cipher(&key.into()))],
        }
    }

    /// Adds a previous key, which decrypts values stored under its id but never encrypts.
    /// An id already in the keyring is [`CacheError::Config`].
    ///
    /// ```
    /// use cachet::{CacheError, EncryptionKeys};
    ///
    /// let keys = EncryptionKeys::new(3, [3u8; 32]).with_previous(2, [2u8; 32])?.with_previous(1, [1u8; 32])?;
    /// assert_eq!(keys.key_ids().collect::<Vec<_>>(), [3, 2, 1]);
    /// let err = EncryptionKeys::new(3, [3u8; 32]).with_previous(3, [4u8; 32]).unwrap_err();
    /// assert!(matches!(err, CacheError::Config { .. }));
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn with_previous(
        mut self,
        id: u32,
        key: impl Into<EncryptionKey>,
    ) -> Result<Self, CacheError> {
        if self.cipher_for(id).is_some() {
            return Err(CacheError::config(
                format!("encryption key id {id} is given twice"),
                None,
            ));
        }
        self.ciphers.push((id, cipher(&key.into())));
        Ok(self)
    }

    /// The id of the key that encrypts new values.
    ///
    /// ```
    /// assert_eq!(cachet::EncryptionKeys::new(7, [0u8; 32]).current_id(), 7);
    /// ```
    pub fn current_id(&self) -> u32 {
        self.current_id
    }

    /// Every key id in the keyring: the current one first, then the previous ones.
    ///
    /// ```
    /// let keys = cachet::EncryptionKeys::new(2, [2u8; 32]).with_previous(1, [1u8; 32])?;
    /// assert_eq!(keys.key_ids().collect::<Vec<_>>(), [2, 1]);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn key_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ciphers.iter().map(|(id, _)| *id)
    }

    fn cipher_for(&self, id: u32) -> Option<&Aes256Gcm> {
        self.ciphers
            .iter()
            .find(|(held, _)| *held == id)
            .map(|(_, cipher)| cipher)
    }

    /// Encrypts `plaintext` for storage under the cache key `key` with the current key and a
    /// fresh random nonce, and returns the envelope.
    ///
    /// Fails ([`CacheError::Serialization`], action `encrypt`) only if the OS random number
    /// generator fails or the value exceeds AES-GCM's limit of 64 GiB.
    ///
    /// ```
    /// let keys = cachet::EncryptionKeys::new(1, [1u8; 32]);
    /// let a = keys.encrypt("k", b"same value")?;
    /// let b = keys.encrypt("k", b"same value")?;
    /// assert_ne!(a, b); // a fresh nonce each time
    /// assert_eq!(a.len(), cachet::decorate::encrypted::HEADER_LEN + 10 + 16);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn encrypt(&self, key: &str, plaintext: &[u8]) -> Result<Bytes, CacheError> {
        let fail =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "encrypt", what);
        let nonce = <[u8; NONCE_LEN]>::try_generate()
            .map_err(|e| fail(format!("the OS random number generator failed: {e}")))?;
        let header = header(self.current_id, &nonce);
        let cipher = self.cipher_for(self.current_id).ok_or_else(|| {
            fail(format!(
                "no cipher for the current key id {}",
                self.current_id
            ))
        })?;
        let aad = associated_data(&header, key);
        let sealed = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                fail(format!(
                    "AES-GCM refused a {}-byte value (the limit is 64 GiB)",
                    plaintext.len()
                ))
            })?;
        let mut out = BytesMut::with_capacity(HEADER_LEN + sealed.len());
        out.put_slice(&header);
        out.put_slice(&sealed);
        Ok(out.freeze())
    }

    /// Decrypts an envelope stored under the cache key `key`.
    ///
    /// Anything that is not an envelope [`encrypt`](Self::encrypt) wrote for this `key` with
    /// a key of this keyring is [`CacheError::Serialization`] (action `decrypt`) naming `key`
    /// and, when the envelope names one, the key id. Never panics, whatever the input.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::{CacheError, EncryptionKeys};
    ///
    /// let keys = EncryptionKeys::new(1, [1u8; 32]);
    /// let sealed = keys.encrypt("org:acme", b"{\"secret\":1}")?;
    /// assert_eq!(keys.decrypt("org:acme", &sealed)?, &b"{\"secret\":1}"[..]);
    ///
    /// let moved = keys.decrypt("org:evil", &sealed).unwrap_err();
    /// assert!(matches!(moved, CacheError::Serialization { .. }));
    /// assert!(moved.to_string().contains("org:evil"));
    ///
    /// let other_ring = EncryptionKeys::new(2, [2u8; 32]);
    /// let unknown = other_ring.decrypt("org:acme", &sealed).unwrap_err();
    /// assert!(unknown.to_string().contains("key id 1"));
    ///
    /// assert!(keys.decrypt("org:acme", &Bytes::from_static(b"{}")).is_err());
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn decrypt(&self, key: &str, stored: &Bytes) -> Result<Bytes, CacheError> {
        let envelope = EncryptedEnvelope::parse(key, stored)?;
        let fail =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "decrypt", what);
        let Some(cipher) = self.cipher_for(envelope.key_id) else {
            return Err(fail(format!(
                "the value was encrypted with key id {}, which this keyring does not hold (it holds {})",
                envelope.key_id,
                self.ids_text()
            )));
        };
        let header = header(envelope.key_id, &envelope.nonce);
        let aad = associated_data(&header, key);
        cipher
            .decrypt(
                &Nonce::from(envelope.nonce),
                Payload {
                    msg: &envelope.ciphertext,
                    aad: &aad,
                },
            )
            .map(Bytes::from)
            .map_err(|_| {
                fail(format!(
                    "authentication failed with key id {}: the bytes were changed, the value was \
                     stored under another key, or key id {} is not the key that encrypted it",
                    envelope.key_id, envelope.key_id
                ))
            })
    }

    fn ids_text(&self) -> String {
        let ids: Vec<String> = self.key_ids().map(|id| id.to_string()).collect();
        ids.join(", ")
    }
}

impl fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let previous: Vec<u32> = self.key_ids().skip(1).collect();
        f.debug_struct("EncryptionKeys")
            .field("current_id", &self.current_id)
            .field("previous_ids", &previous)
            .finish()
    }
}

fn cipher(key: &EncryptionKey) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key.as_bytes()))
}

fn header(key_id: u32, nonce: &[u8; NONCE_LEN]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..2].copy_from_slice(MAGIC);
    header[2] = VERSION;
    header[3..7].copy_from_slice(&key_id.to_be_bytes());
    header[7..].copy_from_slice(nonce);
    header
}

/// The header, then the key name: the header has a fixed length, so no two (header, key)
/// pairs give the same bytes.
fn associated_data(header: &[u8; HEADER_LEN], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + key.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// A parsed (not yet decrypted) encrypted value: the header fields and the ciphertext.
///
/// [`parse`](Self::parse) checks the layout only; the tag is checked by
/// [`EncryptionKeys::decrypt`].
///
/// ```
/// use cachet::{EncryptedEnvelope, EncryptionKeys};
///
/// let sealed = EncryptionKeys::new(42, [0u8; 32]).encrypt("k", b"v")?;
/// let envelope = EncryptedEnvelope::parse("k", &sealed)?;
/// assert_eq!(envelope.key_id(), 42);
/// assert_eq!(envelope.ciphertext().len(), 1 + 16);
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedEnvelope {
    key_id: u32,
    nonce: [u8; NONCE_LEN],
    ciphertext: Bytes,
}

impl EncryptedEnvelope {
    /// Reads the layout of `stored`, the value under the cache key `key`: anything malformed
    /// (too short, bad magic, unknown version) is [`CacheError::Serialization`] naming `key`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::EncryptedEnvelope;
    ///
    /// let err = EncryptedEnvelope::parse("org:acme", &Bytes::from_static(b"plain json")).unwrap_err();
    /// assert!(err.to_string().contains("org:acme"));
    /// ```
    pub fn parse(key: &str, stored: &Bytes) -> Result<Self, CacheError> {
        let bad =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "decrypt", what);
        if stored.len() < HEADER_LEN + TAG_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than the {} bytes of an encrypted value's header and tag \
                 (a value stored without encryption, or cut short)",
                stored.len(),
                HEADER_LEN + TAG_LEN
            )));
        }
        if &stored[..2] != MAGIC {
            return Err(bad(
                "not an encrypted cachet value (bad magic; stored without encryption?)".to_owned(),
            ));
        }
        if stored[2] != VERSION {
            return Err(bad(format!(
                "encrypted envelope version {} is not supported (this code reads version {VERSION})",
                stored[2]
            )));
        }
        let mut id = [0u8; 4];
        id.copy_from_slice(&stored[3..7]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&stored[7..HEADER_LEN]);
        Ok(EncryptedEnvelope {
            key_id: u32::from_be_bytes(id),
            nonce,
            ciphertext: stored.slice(HEADER_LEN..),
        })
    }

    /// The id of the key that encrypted the value.
    ///
    /// ```
    /// let sealed = cachet::EncryptionKeys::new(7, [0u8; 32]).encrypt("k", b"v")?;
    /// assert_eq!(cachet::EncryptedEnvelope::parse("k", &sealed)?.key_id(), 7);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The nonce the value was encrypted with.
    ///
    /// ```
    /// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v")?;
    /// let envelope = cachet::EncryptedEnvelope::parse("k", &sealed)?;
    /// assert_eq!(&sealed[7..19], envelope.nonce());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// The ciphertext followed by the 16-byte tag.
    ///
    /// ```
    /// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"value")?;
    /// let envelope = cachet::EncryptedEnvelope::parse("k", &sealed)?;
    /// assert_eq!(envelope.ciphertext().len(), 5 + 16);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn ciphertext(&self) -> &Bytes {
        &self.ciphertext
    }
}

/// Encrypts every value written through it and decrypts every value read, around any
/// [`CacheService`] (`Arc<dyn CacheService>` too).
///
/// - AES-256-GCM with a random 96-bit nonce per value, from the OS RNG;
/// - the key's name (and the envelope header) is the associated data, so a value copied
///   under another key does not decrypt;
/// - the key id travels in the envelope ([module docs](self)), so a keyring with previous
///   keys still reads values written before a rotation, while new writes use the current key;
/// - a value that does not decrypt is [`CacheError::Serialization`] naming the key (and the
///   key id), never a panic, and stays stored as it was;
/// - keys are stored under exactly their names: `invalidate` and `invalidate_prefix` pass
///   through unchanged.
///
/// Only values are encrypted; key names are not. Keep secrets out of key names (hash tokens,
/// as `token:<sha256>`).
///
/// With [`NamespacedCacheService`](crate::NamespacedCacheService), the order matters: the
/// associated data is the key name this service sees. Put the encryption inside the
/// namespace (`NamespacedCacheService::new(EncryptedCacheService::new(redis, keys), "acme")`)
/// to bind each value to its full stored name, so that a value copied from one tenant's
/// namespace into another's does not decrypt either; outside it, the name without the
/// namespace is bound.
///
/// ```
/// use std::sync::Arc;
/// use cachet::{CacheService, CacheServiceExt, EncryptedCacheService, EncryptionKeys, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cachet::CacheError> {
/// let shared = MokaCacheService::default(); // a Redis service in production
/// let keys = EncryptionKeys::new(1, [7u8; 32]);
/// let cache: Arc<dyn CacheService> = Arc::new(EncryptedCacheService::new(shared.clone(), keys));
///
/// cache.set("org:acme:sso", &"client-secret", None).await?;
/// assert_eq!(cache.get::<String>("org:acme:sso").await?.as_deref(), Some("client-secret"));
///
/// let raw = shared.get_bytes("org:acme:sso").await?.unwrap();
/// assert!(!raw.windows(13).any(|w| w == b"client-secret"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EncryptedCacheService<S> {
    inner: S,
    keys: EncryptionKeys,
}

impl<S: CacheService> EncryptedCacheService<S> {
    /// Wraps `inner`: values are encrypted with `keys`' current key.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.keys().current_id(), 1);
    /// ```
    pub fn new(inner: S, keys: EncryptionKeys) -> Self {
        EncryptedCacheService { inner, keys }
    }

    /// The wrapped service, which sees only encrypted values.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.inner().entry_count(), 0);
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The keyring.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(4, [1u8; 32]));
    /// assert_eq!(cache.keys().current_id(), 4);
    /// ```
    pub fn keys(&self) -> &EncryptionKeys {
        &self.keys
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// let moka: MokaCacheService = cache.into_inner();
    /// # let _ = moka;
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn open(&self, key: &str, stored: Option<Bytes>) -> Result<Option<Bytes>, CacheError> {
        stored
            .map(|bytes| self.keys.decrypt(key, &bytes))
            .transpose()
    }
}

impl<S: fmt::Debug> fmt::Debug for EncryptedCacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedCacheService")
            .field("keys", &self.keys)
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl<S: CacheService> CacheService for EncryptedCacheService<S> {
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let stored = self.inner.get_bytes(key).await?;
        self.open(key, stored)
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        self.inner
            .get_bytes_now(key)
            .map(|answer| answer.and_then(|stored| self.open(key, stored)))
    }

    async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<(), CacheError> {
        let sealed = self.keys.encrypt(key, &value)?;
        self.inner.set_bytes(key, sealed, ttl_secs).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.invalidate(key).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        self.inner.invalidate_prefix(prefix).await
    }

    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        Ok(match self.inner.lease(key, request).await? {
            LeaseRead::Value { value, version } => match self.keys.decrypt(key, &value) {
                Ok(value) => LeaseRead::Value { value, version },
                Err(error) => LeaseRead::Unreadable { error, version },
            },
            other => other,
        })
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let sealed = self.keys.encrypt(key, &value)?;
        self.inner.set_leased(key, lease, sealed, ttl_secs).await
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.inner.release_lease(key, lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> EncryptionKeys {
        EncryptionKeys::new(1, [1u8; 32])
    }

    fn decrypt_error(keys: &EncryptionKeys, key: &str, stored: &[u8]) -> String {
        match keys.decrypt(key, &Bytes::copy_from_slice(stored)) {
            Err(e @ CacheError::Serialization { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key), "names the key: {msg}");
                msg
            }
            other => panic!("expected Serialization for {stored:?}, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_of_empty_small_and_large_values() {
        let keys = keys();
        for len in [0usize, 1, 15, 16, 17, 1000, 1 << 20] {
            let value: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = keys.encrypt("k", &value).unwrap();
            assert_eq!(sealed.len(), HEADER_LEN + len + TAG_LEN);
            assert_eq!(&sealed[..2], MAGIC);
            assert_eq!(sealed[2], VERSION);
            assert_eq!(&sealed[3..7], &1u32.to_be_bytes());
            assert_eq!(keys.decrypt("k", &sealed).unwrap(), value);
        }
    }

    #[test]
    fn every_length_shorter_than_header_and_tag_is_an_error() {
        let keys = keys();
        let sealed = keys.encrypt("k", b"").unwrap();
        assert_eq!(sealed.len(), HEADER_LEN + TAG_LEN);
        for len in 0..sealed.len() {
            let msg = decrypt_error(&keys, "k", &sealed[..len]);
            assert!(msg.contains("shorter"), "{msg}");
        }
    }

    #[test]
    fn truncated_values_fail() {
        let keys = keys();
        let sealed = keys.encrypt("k", b"a longer secret value").unwrap();
        for len in 0..sealed.len() {
            decrypt_error(&keys, "k", &sealed[..len]);
        }
        let mut longer = sealed.to_vec();
        longer.push(0);
        decrypt_error(&keys, "k", &longer);
    }

    #[test]
    fn bad_magic_and_version_are_reported_as_such() {
        let keys = keys();
        let sealed = keys.encrypt("k", b"value").unwrap().to_vec();
        let mut magic = sealed.clone();
        magic[0] = b'X';
        assert!(decrypt_error(&keys, "k", &magic).contains("magic"));
        let mut version = sealed.clone();
        version[2] = 2;
        assert!(decrypt_error(&keys, "k", &version).contains("version 2"));
        let plain_json = br#"{"id":1,"slug":"acme","secret":"a long enough plaintext"}"#;
        assert!(decrypt_error(&keys, "k", plain_json).contains("magic"));
    }

    #[test]
    fn every_flipped_bit_fails() {
        let keys = keys();
        let sealed = keys.encrypt("k", b"value").unwrap().to_vec();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut flipped = sealed.clone();
                flipped[i] ^= 1 << bit;
                decrypt_error(&keys, "k", &flipped);
            }
        }
    }

    #[test]
    fn a_changed_key_id_is_unknown_or_fails_authentication() {
        let keys = EncryptionKeys::new(1, [1u8; 32])
            .with_previous(2, [2u8; 32])
            .unwrap();
        let sealed = keys.encrypt("k", b"value").unwrap().to_vec();
        let mut other_known = sealed.clone();
        other_known[3..7].copy_from_slice(&2u32.to_be_bytes());
        let msg = decrypt_error(&keys, "k", &other_known);
        assert!(msg.contains("authentication failed with key id 2"), "{msg}");
        let mut unknown = sealed.clone();
        unknown[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
        let msg = decrypt_error(&keys, "k", &unknown);
        assert!(msg.contains(&format!("key id {}", u32::MAX)), "{msg}");
        assert!(msg.contains("holds 1, 2"), "{msg}");
    }

    #[test]
    fn the_key_name_is_bound() {
        let keys = keys();
        let sealed = keys.encrypt("org:acme", b"value").unwrap();
        for other in ["org:acm", "org:acme ", "", "org:acmf", "ORG:ACME"] {
            let msg = decrypt_error(&keys, other, &sealed);
            assert!(msg.contains("authentication failed with key id 1"), "{msg}");
        }
        assert_eq!(keys.decrypt("org:acme", &sealed).unwrap(), &b"value"[..]);
    }

    #[test]
    fn a_wrong_key_with_the_same_id_fails_authentication() {
        let sealed = keys().encrypt("k", b"value").unwrap();
        let impostor = EncryptionKeys::new(1, [9u8; 32]);
        assert!(decrypt_error(&impostor, "k", &sealed).contains("authentication failed"));
    }

    #[test]
    fn previous_keys_decrypt_and_the_current_one_encrypts() {
        let old = EncryptionKeys::new(1, [1u8; 32]);
        let sealed_old = old.encrypt("k", b"old").unwrap();
        let rotated = EncryptionKeys::new(2, [2u8; 32])
            .with_previous(1, [1u8; 32])
            .unwrap();
        assert_eq!(rotated.decrypt("k", &sealed_old).unwrap(), &b"old"[..]);
        let sealed_new = rotated.encrypt("k", b"new").unwrap();
        assert_eq!(
            EncryptedEnvelope::parse("k", &sealed_new).unwrap().key_id(),
            2
        );
        let msg = decrypt_error(&old, "k", &sealed_new);
        assert!(msg.contains("key id 2"), "{msg}");
        let only_new = EncryptionKeys::new(2, [2u8; 32]);
        let msg = decrypt_error(&only_new, "k", &sealed_old);
        assert!(msg.contains("key id 1"), "{msg}");
    }

    #[test]
    fn duplicate_key_ids_are_a_config_error() {
        let err = EncryptionKeys::new(1, [1u8; 32])
            .with_previous(2, [2u8; 32])
            .unwrap()
            .with_previous(2, [3u8; 32])
            .unwrap_err();
        assert!(matches!(err, CacheError::Config { .. }), "{err}");
        assert!(err.to_string().contains("key id 2"), "{err}");
    }

    #[test]
    fn nonces_differ_between_writes() {
        let keys = keys();
        let nonces: std::collections::HashSet<[u8; NONCE_LEN]> = (0..1000)
            .map(|_| {
                *EncryptedEnvelope::parse("k", &keys.encrypt("k", b"same").unwrap())
                    .unwrap()
                    .nonce()
            })
            .collect();
        assert_eq!(nonces.len(), 1000);
    }

    #[test]
    fn key_text_forms() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 8 + 3) as u8);
        let expected = EncryptionKey::from(bytes);
        let hex_lower: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let std_b64 = STANDARD_PAD_INDIFFERENT.encode(bytes);
        let url_b64 = URL_SAFE_PAD_INDIFFERENT.encode(bytes);
        assert_ne!(std_b64, url_b64, "the sample covers both alphabets");
        for text in [
            hex_lower.clone(),
            hex_lower.to_uppercase(),
            format!(" \t{hex_lower}\n"),
            std_b64.clone(),
            std_b64.trim_end_matches('=').to_owned(),
            url_b64.clone(),
            url_b64.trim_end_matches('=').to_owned(),
            format!("{std_b64}\n"),
        ] {
            assert_eq!(EncryptionKey::parse(&text).unwrap(), expected, "{text:?}");
        }
    }

    #[test]
    fn bad_key_text_is_a_config_error_that_does_not_repeat_it() {
        let b64_31 = STANDARD_PAD_INDIFFERENT.encode([5u8; 31]);
        let b64_33 = STANDARD_PAD_INDIFFERENT.encode([5u8; 33]);
        let b64_48 = STANDARD_PAD_INDIFFERENT.encode([5u8; 48]);
        let hex_62 = "ab".repeat(31);
        let hex_66 = "ab".repeat(33);
        let cases = [
            String::new(),
            "   ".to_owned(),
            "zz".repeat(32),
            hex_62,
            hex_66,
            b64_31,
            b64_33,
            b64_48,
            "é".repeat(32),
            "secret-key-material!".to_owned(),
            "x".repeat(10_000),
        ];
        for text in cases {
            match EncryptionKey::parse(&text) {
                Err(e @ CacheError::Config { .. }) => {
                    let msg = e.to_string();
                    if !text.trim().is_empty() {
                        assert!(!msg.contains(text.trim()), "{msg} repeats the input");
                    }
                }
                other => panic!("{text:?}: expected Config, got {other:?}"),
            }
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key_bytes = [0xabu8; 32];
        let keys = EncryptionKeys::new(5, key_bytes)
            .with_previous(4, [0xcdu8; 32])
            .unwrap();
        let service = EncryptedCacheService::new(crate::MokaCacheService::default(), keys);
        let debug = format!("{service:?} {:?}", EncryptionKey::from(key_bytes));
        for needle in ["ab, ab", "171", "0xab", "abab", "cdcd", "205"] {
            assert!(!debug.contains(needle), "{needle} in {debug}");
        }
        assert!(debug.contains("current_id: 5"), "{debug}");
        assert!(debug.contains("previous_ids: [4]"), "{debug}");
    }
}
