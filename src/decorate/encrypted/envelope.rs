//! The wire format of an encrypted value (see the [module docs](super) for its layout): the
//! header constants, [`EncryptedEnvelope`] (the layout read back), and the sealing and opening
//! of each version with one key's `Ciphers`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{self, AeadInOut, KeyInit, Nonce, Tag};
use aes_gcm_siv::Aes256GcmSiv;
use bytes::Bytes;
use zeroize::Zeroizing;

use crate::{CacheError, IntegrityProblem};

/// The magic bytes at the start of every encrypted value.
///
/// ```
/// use std::time::Duration;
///
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v", Duration::from_secs(60))?;
/// assert!(sealed.starts_with(cachet::decorate::encrypted::MAGIC));
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const MAGIC: &[u8; 2] = b"CS";
/// The envelope version this code writes: 2 (AES-256-GCM-SIV, authenticated expiry).
///
/// ```
/// use std::time::Duration;
///
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v", Duration::from_secs(60))?;
/// assert_eq!(sealed[2], cachet::decorate::encrypted::VERSION);
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const VERSION: u8 = 2;
/// The older envelope version this code still reads (AES-256-GCM, no authenticated expiry).
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::VERSION_V1, 1);
/// ```
pub const VERSION_V1: u8 = 1;
/// Length of the random nonce of version 2, in bytes (96 bits, as RFC 8452 defines it).
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::NONCE_LEN * 8, 96);
/// ```
pub const NONCE_LEN: usize = 12;
/// Length of the random nonce of version 1, in bytes (96 bits).
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::NONCE_LEN_V1 * 8, 96);
/// ```
pub const NONCE_LEN_V1: usize = 12;
/// Length of the authentication tag, in bytes (128 bits), in both versions.
///
/// ```
/// use std::time::Duration;
/// use cachet::decorate::encrypted::{HEADER_LEN, TAG_LEN};
///
/// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"", Duration::from_secs(60))?;
/// assert_eq!(sealed.len(), HEADER_LEN + TAG_LEN); // an empty value
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext in version 2: magic, version, key id, expiry, nonce.
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::HEADER_LEN, 2 + 1 + 4 + 8 + 12);
/// ```
pub const HEADER_LEN: usize = 2 + 1 + 4 + 8 + NONCE_LEN;
/// Bytes before the ciphertext in version 1: magic, version, key id, nonce.
///
/// ```
/// assert_eq!(cachet::decorate::encrypted::HEADER_LEN_V1, 2 + 1 + 4 + 12);
/// ```
pub const HEADER_LEN_V1: usize = 2 + 1 + 4 + NONCE_LEN_V1;

/// Bytes of an envelope before the key id: magic and version.
const PREFIX_LEN: usize = 3;
/// Bytes of the header before the ciphertext in `version` (one this code reads).
const fn header_len(version: u8) -> usize {
    if version == VERSION {
        HEADER_LEN
    } else {
        HEADER_LEN_V1
    }
}

/// The header, then the key name: the header of each version has a fixed length, so no two
/// (header, key) pairs give the same bytes.
fn associated_data(header: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + key.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// A parsed (not yet decrypted) encrypted value: the header fields and the ciphertext, of
/// either version.
///
/// [`parse`](Self::parse) checks the layout only; the tag (and so every header field) is
/// checked by [`EncryptionKeys::decrypt`](super::EncryptionKeys::decrypt).
///
/// ```
/// use std::time::Duration;
/// use cachet::{EncryptedEnvelope, EncryptionKeys};
///
/// let sealed = EncryptionKeys::new(42, [0u8; 32]).encrypt("k", b"v", Duration::from_secs(60))?;
/// let envelope = EncryptedEnvelope::parse("k", &sealed)?;
/// assert_eq!(envelope.key_id(), 42);
/// assert_eq!(envelope.version(), 2);
/// assert_eq!(envelope.ciphertext().len(), 1 + 16);
/// # Ok::<(), cachet::CacheError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedEnvelope {
    version: u8,
    key_id: u32,
    /// Milliseconds since the epoch; `None` in version 1.
    expires_at_ms: Option<u64>,
    /// The header bytes as stored (the start of the associated data).
    header: Bytes,
    /// The ciphertext followed by the tag.
    ciphertext: Bytes,
}

impl EncryptedEnvelope {
    /// Reads the layout of `stored`, the value under the cache key `key`: anything malformed
    /// (too short for its version, bad magic, unknown version) is
    /// [`CacheError::Integrity`] naming `key` (layer `"encryption"`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use cachet::EncryptedEnvelope;
    ///
    /// let err = EncryptedEnvelope::parse("org:acme", &Bytes::from_static(b"plain json")).unwrap_err();
    /// assert!(err.to_string().contains("org:acme"));
    /// ```
    pub fn parse(key: &str, stored: &Bytes) -> Result<Self, CacheError> {
        let bad = |problem| CacheError::integrity(key, "encryption", problem);
        if stored.len() < PREFIX_LEN {
            return Err(bad(IntegrityProblem::Truncated));
        }
        if &stored[..2] != MAGIC {
            // Most often a value stored without encryption.
            return Err(bad(IntegrityProblem::BadMagic));
        }
        let version = stored[2];
        let header_len = match version {
            VERSION => HEADER_LEN,
            VERSION_V1 => HEADER_LEN_V1,
            other => return Err(bad(IntegrityProblem::UnknownVersion(other))),
        };
        if stored.len() < header_len + TAG_LEN {
            return Err(bad(IntegrityProblem::Truncated));
        }
        let key_id = u32::from_be_bytes([stored[3], stored[4], stored[5], stored[6]]);
        let expires_at_ms = (version == VERSION).then(|| {
            let mut ms = [0u8; 8];
            ms.copy_from_slice(&stored[7..15]);
            u64::from_be_bytes(ms)
        });
        Ok(EncryptedEnvelope {
            version,
            key_id,
            expires_at_ms,
            header: stored.slice(..header_len),
            ciphertext: stored.slice(header_len..),
        })
    }

    /// The envelope version: [`VERSION`] (2) or [`VERSION_V1`] (1).
    ///
    /// ```
    /// use cachet::{EncryptedEnvelope, EncryptionKeys};
    ///
    /// let keys = EncryptionKeys::new(1, [0u8; 32]);
    /// let v1 = keys.encrypt_v1("k", b"v")?;
    /// assert_eq!(EncryptedEnvelope::parse("k", &v1)?.version(), 1);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The id of the key that encrypted the value.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let sealed = cachet::EncryptionKeys::new(7, [0u8; 32]).encrypt("k", b"v", Duration::from_secs(1))?;
    /// assert_eq!(cachet::EncryptedEnvelope::parse("k", &sealed)?.key_id(), 7);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The authenticated expiry as written (not yet verified: only a successful decrypt
    /// proves it); `None` for version 1, which has none.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    ///
    /// let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    /// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt_until("k", b"v", at)?;
    /// assert_eq!(&sealed[7..15], &1_700_000_000_123u64.to_be_bytes());
    /// assert_eq!(cachet::EncryptedEnvelope::parse("k", &sealed)?.expires_at(), Some(at));
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The nonce the value was encrypted with: [`NONCE_LEN`] bytes in version 2,
    /// [`NONCE_LEN_V1`] in version 1.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"v", Duration::from_secs(1))?;
    /// let envelope = cachet::EncryptedEnvelope::parse("k", &sealed)?;
    /// assert_eq!(&sealed[15..27], envelope.nonce());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn nonce(&self) -> &[u8] {
        let start = if self.version == VERSION { 15 } else { 7 };
        &self.header[start..]
    }

    /// The ciphertext followed by the 16-byte tag.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let sealed = cachet::EncryptionKeys::new(1, [0u8; 32]).encrypt("k", b"value", Duration::from_secs(1))?;
    /// let envelope = cachet::EncryptedEnvelope::parse("k", &sealed)?;
    /// assert_eq!(envelope.ciphertext().len(), 5 + 16);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn ciphertext(&self) -> &Bytes {
        &self.ciphertext
    }

    /// Milliseconds since the epoch as written (not yet verified); `None` for version 1.
    pub(super) fn expires_at_ms(&self) -> Option<u64> {
        self.expires_at_ms
    }
}

/// One key as the two ciphers that use it: AES-256-GCM under the configured key for version 1
/// (read only), AES-256-GCM-SIV under the derived key for version 2. Both zero their key state
/// on drop (the crates' `zeroize` features).
#[derive(Clone)]
pub(super) struct Ciphers {
    v1: Aes256Gcm,
    v2: Aes256GcmSiv,
}

impl Ciphers {
    /// The ciphers of one key: `v1_key` is the configured key, `v2_key` the one derived from
    /// it.
    pub(super) fn new(v1_key: &[u8; 32], v2_key: &[u8; 32]) -> Self {
        Ciphers {
            v1: Aes256Gcm::new(&(*v1_key).into()),
            v2: Aes256GcmSiv::new(&(*v2_key).into()),
        }
    }

    /// A version-2 envelope of `plaintext` under the cache key `key`: key id `key_id`, the
    /// expiry `expires_at_ms` (milliseconds since the epoch) and `nonce`.
    pub(super) fn seal_v2(
        &self,
        key: &str,
        plaintext: &[u8],
        key_id: u32,
        expires_at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Bytes, CacheError> {
        let header = Header {
            version: VERSION,
            key_id,
            expires_at_ms: Some(expires_at_ms),
        };
        seal(&self.v2, header, &nonce.into(), key, plaintext)
    }

    /// A version-1 envelope (no expiry) of `plaintext` under the cache key `key`.
    pub(super) fn seal_v1(
        &self,
        key: &str,
        plaintext: &[u8],
        key_id: u32,
        nonce: [u8; NONCE_LEN_V1],
    ) -> Result<Bytes, CacheError> {
        let header = Header {
            version: VERSION_V1,
            key_id,
            expires_at_ms: None,
        };
        seal(&self.v1, header, &nonce.into(), key, plaintext)
    }

    /// Checks the tag of `envelope`, stored under the cache key `key`, with the cipher of its
    /// version and decrypts it; the plaintext's buffer is zeroed when dropped. Whatever the
    /// reason it fails (a changed byte, another key name, another key), the error is the same.
    pub(super) fn open(
        &self,
        key: &str,
        envelope: &EncryptedEnvelope,
    ) -> Result<Zeroizing<Vec<u8>>, aead::Error> {
        if envelope.version == VERSION_V1 {
            open(&self.v1, key, envelope)
        } else {
            open(&self.v2, key, envelope)
        }
    }
}

/// The header fields a write sets (the nonce follows them).
struct Header {
    version: u8,
    key_id: u32,
    /// Version 2 only.
    expires_at_ms: Option<u64>,
}

/// Writes the header (magic, version, key id, the expiry in version 2, the nonce), then
/// `plaintext` encrypted in place, then the tag; the associated data is the header and `key`.
/// The plaintext is copied into the output buffer and overwritten there by the ciphertext, so
/// no other copy of it is made.
fn seal<C: AeadInOut>(
    cipher: &C,
    header: Header,
    nonce: &Nonce<C>,
    key: &str,
    plaintext: &[u8],
) -> Result<Bytes, CacheError> {
    let header_len = header_len(header.version);
    let mut out = Vec::with_capacity(header_len + plaintext.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(header.version);
    out.extend_from_slice(&header.key_id.to_be_bytes());
    if let Some(ms) = header.expires_at_ms {
        out.extend_from_slice(&ms.to_be_bytes());
    }
    out.extend_from_slice(nonce);
    debug_assert_eq!(out.len(), header_len);
    let aad = associated_data(&out, key);
    out.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(nonce, &aad, (&mut out[header_len..]).into())
        .map_err(|_| {
            let algorithm = if header.version == VERSION {
                "AES-GCM-SIV"
            } else {
                "AES-GCM"
            };
            CacheError::serialization::<EncryptedEnvelope>(
                key,
                "encrypt",
                format!(
                    "{algorithm} refused a {}-byte value (the limit is 64 GiB)",
                    plaintext.len()
                ),
            )
        })?;
    out.extend_from_slice(&tag);
    Ok(Bytes::from(out))
}

/// Checks the tag of `envelope` with `cipher` and decrypts a copy of its ciphertext.
fn open<C: AeadInOut>(
    cipher: &C,
    key: &str,
    envelope: &EncryptedEnvelope,
) -> Result<Zeroizing<Vec<u8>>, aead::Error> {
    let aad = associated_data(&envelope.header, key);
    // `parse` checked the lengths: the nonce is the cipher's and a tag follows the body.
    let nonce = Nonce::<C>::try_from(envelope.nonce()).map_err(|_| aead::Error)?;
    let sealed = &envelope.ciphertext;
    let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let tag = Tag::<C>::try_from(tag).map_err(|_| aead::Error)?;
    let mut plaintext = Zeroizing::new(body.to_vec());
    cipher.decrypt_inout_detached(&nonce, &aad, plaintext.as_mut_slice().into(), &tag)?;
    Ok(plaintext)
}
