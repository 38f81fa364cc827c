//! [`EncryptedCacheService`]: authenticated encryption around every value, with the key
//! name bound as associated data, an authenticated expiry, and a key id for rotation.
//!
//! # Stored form
//!
//! Every value is stored as a small versioned envelope (integers big-endian). This code
//! writes version 2:
//!
//! | bytes | what |
//! | --- | --- |
//! | 2 | magic `b"CS"` |
//! | 1 | version `2` (AES-256-GCM-SIV, RFC 8452: 96-bit nonce, 128-bit tag) |
//! | 4 | key id (`u32`) of the key that encrypted it |
//! | 8 | expiry (`u64`): milliseconds since the Unix epoch after which the value is dead |
//! | 12 | nonce, random per value |
//! | n + 16 | ciphertext of the n-byte value, then the tag |
//!
//! The associated data is the 27 header bytes followed by the cache key's name, so the tag
//! covers the header (a changed key id, version or expiry fails) and the key (a value copied
//! under another key fails). The header has a fixed length, so the concatenation is
//! unambiguous. The AES-256-GCM-SIV key is not the configured 32 bytes themselves but
//! HMAC-SHA256(configured key, `"cachet encrypted envelope v2: AES-256-GCM-SIV"`), so the
//! same bytes are never the key of two algorithms (version 1 uses them for AES-GCM).
//!
//! The nonces come from `rand`'s thread-local generator ([`rand::rng`]: ChaCha12 seeded from
//! the OS and reseeded from it periodically, a cryptographically secure generator), not from
//! a system call per write. Like every use of that generator, it is not reseeded when a
//! process forks: a child that keeps writing with the key repeats its parent's nonces, which
//! with AES-GCM-SIV discloses only which values were identical (below); reseed it after a
//! fork (`rand::rng().reseed()`) to avoid even that.
//!
//! **Authenticated expiry.** The expiry is the instant the write's TTL ends (`set`'s TTL, or
//! the decorator's default TTL for `None`), by the writer's clock. A read after it is a miss
//! (`Ok(None)`), whatever TTL the server holds: someone with write access to the store who
//! saved a value while it was valid and writes it back later, without a TTL, gets nothing
//! served. The expiry is checked after the tag, so changed expiry bytes are an error, not a
//! miss. Clocks of the instances should agree (NTP): a reader whose clock is behind the
//! writer's by `d` accepts a value for `d` longer.
//!
//! **Why AES-256-GCM-SIV.** Version 1 used AES-256-GCM with random 96-bit nonces, which
//! limits a key to about 2^32 messages (NIST SP 800-38D, section 8.3): a single repeated
//! nonce discloses the XOR of the two plaintexts and the GHASH authentication key, with which
//! anyone can forge values under that key; a cache writing 10 000 values a second reaches
//! 2^32 in five days. AES-GCM-SIV (RFC 8452) derives fresh authentication and encryption
//! keys from each nonce and starts the counter at a synthetic IV (the tag, computed over the
//! associated data and the plaintext), so a repeated random nonce discloses only whether the
//! two messages (the value, the key name and the header, expiry millisecond included) were
//! identical: no key is recovered and nothing can be forged. Random nonces therefore need no
//! practical bound on the writes per key.
//!
//! Its cost, measured with `cargo bench --bench encryption` (three runs on a 2-core VM while
//! other builds ran, hence ranges): encrypting then decrypting a 64-byte value takes about
//! 1.4-1.5 µs, 1.7-2.0 times version 1's AES-256-GCM envelope (AES-GCM-SIV derives two keys,
//! and an AES key schedule, per value); an 851-byte value 1.1-1.25 times; a 16 KiB value
//! 0.6-0.9 times. A typed `get` hit through the decorator over moka (decrypt, then JSON
//! decode of the 851-byte value) measured 0.97-1.19 times the same hit in version 1 (five
//! runs), a difference within this machine's noise. It is that fast only with AES and
//! carry-less multiplication instructions (AES-NI and PCLMULQDQ on x86-64, the ARMv8
//! cryptography extensions), which the `aes` and `polyval` crates detect at run time; on a
//! CPU without them they fall back to constant-time software, which is slower (not measured
//! here; so does version 1's AES-GCM).
//!
//! # Version 1 (read only)
//!
//! Version 1, which earlier releases wrote, is still read, so values written before an
//! upgrade keep working until their server TTL ends:
//!
//! | bytes | what |
//! | --- | --- |
//! | 2 | magic `b"CS"` |
//! | 1 | version `1` (AES-256-GCM, 96-bit nonce, 128-bit tag) |
//! | 4 | key id (`u32`) |
//! | 12 | nonce |
//! | n + 16 | ciphertext, then the tag |
//!
//! with the 19 header bytes and the key name as associated data. **Version 1 has no
//! authenticated expiry**: a version-1 value saved by someone with write access decrypts
//! whenever it is written back. Writing version 2 closes that hole only for new values; to
//! close it for the old ones, once the longest TTL in use has passed since the upgrade,
//! either turn version-1 reads off ([`EncryptionKeys::accept_v1`]`(false)`), or rotate to a
//! new key and drop the old one.
//!
//! # Errors
//!
//! Reading a value that is not such an envelope, one whose key id the keyring does not
//! hold, or one whose tag does not verify (tampered bytes, a wrong key, a value copied from
//! another key) is [`CacheError::Serialization`] naming the key and, where there is one, the
//! key id; nothing is written back, so the stored entry stays as it was.
//!
//! # Plaintext in memory
//!
//! Key bytes (the configured key, the derived version-2 key, the ciphers' key state and the
//! per-value keys AES-GCM-SIV derives) are zeroed when dropped. A decrypted value is returned as [`Bytes`] whose buffer is
//! zeroed when its last handle drops; a value being encrypted is encrypted in place in the
//! output buffer, and the caller's plaintext buffer is zeroed after sealing when this layer
//! holds its only handle. What a caller decodes the bytes into is the caller's to protect.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::Aes256GcmSiv;
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::load::{Lease, LeaseRead, LeaseRequest};
use crate::service::{DEFAULT_TTL_SECS, check_default_ttl, resolve_ttl};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use bytes::Bytes;
use zeroize::{Zeroize, Zeroizing};

use crate::{CacheError, CacheService};

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

/// The label of the version-2 key derivation (HMAC-SHA256 keyed with the configured key).
const V2_KEY_LABEL: &[u8] = b"cachet encrypted envelope v2: AES-256-GCM-SIV";

/// Bytes of an envelope before the key id: magic and version.
const PREFIX_LEN: usize = 3;

/// One 256-bit key. Its `Debug` never shows the key, and its bytes are zeroed on drop.
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
                format!("the encryption key decodes as base64 to {n} bytes; the key is 32"),
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
/// Its `Debug` shows the key ids only, never the keys. The keys, the derived keys and the
/// ciphers' key state are zeroed when the keyring is dropped.
///
/// ```
/// use std::time::Duration;
/// use cachet::{EncryptionKey, EncryptionKeys};
///
/// let ttl = Duration::from_secs(300);
/// let old = EncryptionKeys::new(1, [1u8; 32]);
/// let sealed = old.encrypt("org:acme", b"secret", ttl)?;
///
/// let rotated = EncryptionKeys::new(2, [2u8; 32]).with_previous(1, [1u8; 32])?;
/// assert_eq!(rotated.decrypt("org:acme", &sealed)?.as_deref(), Some(&b"secret"[..]));
/// let new = rotated.encrypt("org:acme", b"x", ttl)?;
/// assert_eq!(cachet::EncryptedEnvelope::parse("org:acme", &new)?.key_id(), 2);
/// assert_eq!(format!("{rotated:?}"), "EncryptionKeys { current_id: 2, previous_ids: [1], accept_v1: true }");
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
    entries: Vec<KeyEntry>,
    accept_v1: bool,
}

/// One key of the ring, as the two ciphers that use it. Both zero their key state on drop
/// (the crates' `zeroize` features).
#[derive(Clone)]
struct KeyEntry {
    id: u32,
    /// Version 1: AES-256-GCM under the configured key (read only).
    v1: Aes256Gcm,
    /// Version 2: AES-256-GCM-SIV under the derived key.
    v2: Aes256GcmSiv,
}

impl KeyEntry {
    fn new(id: u32, key: &EncryptionKey) -> Self {
        let v2_key = derive_v2_key(key);
        KeyEntry {
            id,
            v1: Aes256Gcm::new(&(*key.as_bytes()).into()),
            v2: Aes256GcmSiv::new(&(*v2_key).into()),
        }
    }
}

/// HMAC-SHA256(key, label): the version-2 key, so that the configured bytes are never the key
/// of two algorithms.
fn derive_v2_key(key: &EncryptionKey) -> Zeroizing<[u8; 32]> {
    // HMAC pads a key shorter than the hash's block (64 bytes) with zeros: padding it here
    // gives the same MAC through the infallible fixed-size constructor.
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(key.as_bytes());
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(
        hmac::digest::generic_array::GenericArray::from_slice(&block[..]),
    );
    mac.update(V2_KEY_LABEL);
    let mut tag = mac.finalize().into_bytes();
    let mut derived = Zeroizing::new([0u8; 32]);
    derived.copy_from_slice(&tag);
    tag.as_mut_slice().zeroize();
    derived
}

/// What [`EncryptionKeys::open`] found, before the time check.
struct Opened {
    plaintext: Bytes,
    /// Milliseconds since the epoch; `None` for version 1.
    expires_at_ms: Option<u64>,
}

impl EncryptionKeys {
    /// A keyring whose current key is `key`, with id `current_id`. It reads both envelope
    /// versions ([`accept_v1`](Self::accept_v1) turns version 1 off) and writes version 2.
    ///
    /// ```
    /// let keys = cachet::EncryptionKeys::new(1, [9u8; 32]);
    /// assert_eq!(keys.current_id(), 1);
    /// assert!(keys.accepts_v1());
    /// ```
    pub fn new(current_id: u32, key: impl Into<EncryptionKey>) -> Self {
        EncryptionKeys {
            current_id,
            entries: vec![KeyEntry::new(current_id, &key.into())],
            accept_v1: true,
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
        if self.entry_for(id).is_some() {
            return Err(CacheError::config(
                format!("encryption key id {id} is given twice"),
                None,
            ));
        }
        self.entries.push(KeyEntry::new(id, &key.into()));
        Ok(self)
    }

    /// Whether version-1 envelopes (AES-256-GCM, no authenticated expiry) are read; `true`
    /// unless turned off. Turn them off once the longest TTL in use has passed since every
    /// instance writes version 2: after that, no version-1 value is legitimately stored, and
    /// one that appears was written back by someone replaying an old value. A version-1
    /// value is then [`CacheError::Serialization`].
    ///
    /// ```
    /// use cachet::{CacheError, EncryptionKeys};
    ///
    /// let keys = EncryptionKeys::new(1, [1u8; 32]);
    /// let old = keys.encrypt_v1("k", b"from before the upgrade")?;
    /// assert!(keys.decrypt("k", &old)?.is_some());
    ///
    /// let strict = keys.accept_v1(false);
    /// assert!(!strict.accepts_v1());
    /// let err = strict.decrypt("k", &old).unwrap_err();
    /// assert!(matches!(err, CacheError::Serialization { .. }));
    /// assert!(err.to_string().contains("version 1"));
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn accept_v1(mut self, accept: bool) -> Self {
        self.accept_v1 = accept;
        self
    }

    /// Whether version-1 envelopes are read ([`accept_v1`](Self::accept_v1)).
    ///
    /// ```
    /// assert!(cachet::EncryptionKeys::new(1, [1u8; 32]).accepts_v1());
    /// ```
    pub fn accepts_v1(&self) -> bool {
        self.accept_v1
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
        self.entries.iter().map(|entry| entry.id)
    }

    fn entry_for(&self, id: u32) -> Option<&KeyEntry> {
        self.entries.iter().find(|entry| entry.id == id)
    }

    fn current(&self, fail: impl Fn(String) -> CacheError) -> Result<&KeyEntry, CacheError> {
        self.entry_for(self.current_id).ok_or_else(|| {
            fail(format!(
                "no cipher for the current key id {}",
                self.current_id
            ))
        })
    }

    /// Encrypts `plaintext` for storage under the cache key `key` for `ttl` from now: a
    /// version-2 envelope with the current key, a fresh random nonce and the expiry
    /// `now + ttl` authenticated. Reads after that instant are misses.
    ///
    /// Fails ([`CacheError::Serialization`], action `encrypt`) only if the value exceeds
    /// AES-GCM-SIV's limit of 64 GiB (2^36 bytes, RFC 8452). The nonce is drawn from
    /// [`rand::rng`], whose fill cannot fail; like every use of that generator, it panics
    /// only if the OS cannot provide the seed when the thread's generator is first used or
    /// reseeded.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let keys = cachet::EncryptionKeys::new(1, [1u8; 32]);
    /// let a = keys.encrypt("k", b"same value", Duration::from_secs(60))?;
    /// let b = keys.encrypt("k", b"same value", Duration::from_secs(60))?;
    /// assert_ne!(a, b); // a fresh nonce each time
    /// assert_eq!(a.len(), cachet::decorate::encrypted::HEADER_LEN + 10 + 16);
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn encrypt(&self, key: &str, plaintext: &[u8], ttl: Duration) -> Result<Bytes, CacheError> {
        let expires_at_ms = unix_ms(SystemTime::now()).saturating_add(duration_ms(ttl));
        self.seal_v2(key, plaintext, expires_at_ms)
    }

    /// Like [`encrypt`](Self::encrypt), with the expiry given as an instant (rounded down to
    /// the millisecond; an instant before the Unix epoch is the epoch).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// let keys = cachet::EncryptionKeys::new(1, [1u8; 32]);
    /// let at = SystemTime::now() + Duration::from_secs(60);
    /// let sealed = keys.encrypt_until("k", b"v", at)?;
    /// let expires = cachet::EncryptedEnvelope::parse("k", &sealed)?.expires_at().unwrap();
    /// assert!(at.duration_since(expires).unwrap() < Duration::from_millis(1));
    /// assert_eq!(keys.decrypt_at("k", &sealed, at)?, None); // dead at that instant
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn encrypt_until(
        &self,
        key: &str,
        plaintext: &[u8],
        expires_at: SystemTime,
    ) -> Result<Bytes, CacheError> {
        self.seal_v2(key, plaintext, unix_ms(expires_at))
    }

    fn seal_v2(
        &self,
        key: &str,
        plaintext: &[u8],
        expires_at_ms: u64,
    ) -> Result<Bytes, CacheError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.seal_v2_with(key, plaintext, expires_at_ms, nonce)
    }

    fn seal_v2_with(
        &self,
        key: &str,
        plaintext: &[u8],
        expires_at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Bytes, CacheError> {
        let fail =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "encrypt", what);
        let entry = self.current(fail)?;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&entry.id.to_be_bytes());
        out.extend_from_slice(&expires_at_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        let aad = associated_data(&out, key);
        // Encrypted in place: the plaintext is copied into the output buffer and overwritten
        // there by the ciphertext, so no other copy of it is made.
        out.extend_from_slice(plaintext);
        let tag = entry
            .v2
            .encrypt_inout_detached(&nonce.into(), &aad, (&mut out[HEADER_LEN..]).into())
            .map_err(|_| {
                fail(format!(
                    "AES-GCM-SIV refused a {}-byte value (the limit is 64 GiB)",
                    plaintext.len()
                ))
            })?;
        out.extend_from_slice(&tag);
        Ok(Bytes::from(out))
    }

    /// Encrypts in the old version-1 format (AES-256-GCM, no expiry), for tests and
    /// benchmarks that need what earlier releases wrote. Never used by the decorator.
    #[doc(hidden)]
    pub fn encrypt_v1(&self, key: &str, plaintext: &[u8]) -> Result<Bytes, CacheError> {
        let mut nonce = [0u8; NONCE_LEN_V1];
        rand::rng().fill_bytes(&mut nonce);
        self.seal_v1_with(key, plaintext, nonce)
    }

    fn seal_v1_with(
        &self,
        key: &str,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN_V1],
    ) -> Result<Bytes, CacheError> {
        let fail =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "encrypt", what);
        let entry = self.current(fail)?;
        let mut out = Vec::with_capacity(HEADER_LEN_V1 + plaintext.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION_V1);
        out.extend_from_slice(&entry.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        let aad = associated_data(&out, key);
        out.extend_from_slice(plaintext);
        let tag = entry
            .v1
            .encrypt_inout_detached(&nonce.into(), &aad, (&mut out[HEADER_LEN_V1..]).into())
            .map_err(|_| {
                fail(format!(
                    "AES-GCM refused a {}-byte value (the limit is 64 GiB)",
                    plaintext.len()
                ))
            })?;
        out.extend_from_slice(&tag);
        Ok(Bytes::from(out))
    }

    /// Decrypts an envelope stored under the cache key `key`: `Ok(None)` if it is a
    /// version-2 value past its authenticated expiry (a miss, like an expired entry), else
    /// the plaintext, in a buffer zeroed when its last handle drops.
    ///
    /// Anything that is not an envelope [`encrypt`](Self::encrypt) (or an earlier release)
    /// wrote for this `key` with a key of this keyring is [`CacheError::Serialization`]
    /// (action `decrypt`) naming `key` and, when the envelope names one, the key id. The tag
    /// is checked before the expiry, so changed expiry bytes are an error too. Never panics,
    /// whatever the input.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use bytes::Bytes;
    /// use cachet::{CacheError, EncryptionKeys};
    ///
    /// let keys = EncryptionKeys::new(1, [1u8; 32]);
    /// let sealed = keys.encrypt("org:acme", b"{\"secret\":1}", Duration::from_secs(60))?;
    /// assert_eq!(keys.decrypt("org:acme", &sealed)?.as_deref(), Some(&b"{\"secret\":1}"[..]));
    ///
    /// let moved = keys.decrypt("org:evil", &sealed).unwrap_err();
    /// assert!(matches!(moved, CacheError::Serialization { .. }));
    /// assert!(moved.to_string().contains("org:evil"));
    ///
    /// let other_ring = EncryptionKeys::new(2, [2u8; 32]);
    /// let unknown = other_ring.decrypt("org:acme", &sealed).unwrap_err();
    /// assert!(unknown.to_string().contains("key id 1"));
    ///
    /// let dead = keys.encrypt_until("org:acme", b"old", SystemTime::now() - Duration::from_secs(1))?;
    /// assert_eq!(keys.decrypt("org:acme", &dead)?, None);
    ///
    /// assert!(keys.decrypt("org:acme", &Bytes::from_static(b"{}")).is_err());
    /// # Ok::<(), CacheError>(())
    /// ```
    pub fn decrypt(&self, key: &str, stored: &Bytes) -> Result<Option<Bytes>, CacheError> {
        self.decrypt_at(key, stored, SystemTime::now())
    }

    /// Like [`decrypt`](Self::decrypt), with `now` as the current time: a version-2 value
    /// is a miss from its expiry instant on.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// let keys = cachet::EncryptionKeys::new(1, [1u8; 32]);
    /// let now = SystemTime::now();
    /// let sealed = keys.encrypt_until("k", b"v", now + Duration::from_secs(10))?;
    /// assert!(keys.decrypt_at("k", &sealed, now + Duration::from_secs(9))?.is_some());
    /// assert!(keys.decrypt_at("k", &sealed, now + Duration::from_secs(10))?.is_none());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn decrypt_at(
        &self,
        key: &str,
        stored: &Bytes,
        now: SystemTime,
    ) -> Result<Option<Bytes>, CacheError> {
        let opened = self.open(key, stored)?;
        Ok(match opened.expires_at_ms {
            Some(expires) if unix_ms(now) >= expires => None,
            _ => Some(opened.plaintext),
        })
    }

    /// Checks the tag and decrypts, whatever the expiry.
    fn open(&self, key: &str, stored: &Bytes) -> Result<Opened, CacheError> {
        let envelope = EncryptedEnvelope::parse(key, stored)?;
        let fail =
            |what: String| CacheError::serialization::<EncryptedEnvelope>(key, "decrypt", what);
        if envelope.version == VERSION_V1 && !self.accept_v1 {
            return Err(fail(format!(
                "the value is an envelope of version 1 (no authenticated expiry), which this \
                 keyring no longer accepts (key id {}); it was written before the upgrade to \
                 version 2, or written back by someone who saved it",
                envelope.key_id
            )));
        }
        let Some(entry) = self.entry_for(envelope.key_id) else {
            return Err(fail(format!(
                "the value was encrypted with key id {}, which this keyring does not hold (it holds {})",
                envelope.key_id,
                self.ids_text()
            )));
        };
        let aad = associated_data(&envelope.header, key);
        let sealed = &envelope.ciphertext;
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut plaintext = Zeroizing::new(body.to_vec());
        let nonce = envelope.nonce();
        let verified = if envelope.version == VERSION_V1 {
            let nonce: [u8; NONCE_LEN_V1] = nonce.try_into().unwrap_or_default();
            let tag: [u8; TAG_LEN] = tag.try_into().unwrap_or_default();
            entry.v1.decrypt_inout_detached(
                &nonce.into(),
                &aad,
                plaintext.as_mut_slice().into(),
                &tag.into(),
            )
        } else {
            let nonce: [u8; NONCE_LEN] = nonce.try_into().unwrap_or([0; NONCE_LEN]);
            let tag: [u8; TAG_LEN] = tag.try_into().unwrap_or_default();
            entry.v2.decrypt_inout_detached(
                &nonce.into(),
                &aad,
                plaintext.as_mut_slice().into(),
                &tag.into(),
            )
        };
        if verified.is_err() {
            return Err(fail(format!(
                "authentication failed with key id {}: the bytes were changed, the value was \
                 stored under another key, or key id {} is not the key that encrypted it",
                envelope.key_id, envelope.key_id
            )));
        }
        Ok(Opened {
            plaintext: Bytes::from_owner(plaintext),
            expires_at_ms: envelope.expires_at_ms,
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
            .field("accept_v1", &self.accept_v1)
            .finish()
    }
}

/// Milliseconds since the Unix epoch; 0 before it.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
/// checked by [`EncryptionKeys::decrypt`].
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
    /// [`CacheError::Serialization`] naming `key`.
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
        let short = |needed: usize, what: &str| {
            bad(format!(
                "{} bytes is shorter than the {needed} bytes of {what} (a value stored without \
                 encryption, or cut short)",
                stored.len()
            ))
        };
        if stored.len() < PREFIX_LEN {
            return Err(short(
                HEADER_LEN_V1 + TAG_LEN,
                "the smallest encrypted value's header and tag",
            ));
        }
        if &stored[..2] != MAGIC {
            return Err(bad(
                "not an encrypted cachet value (bad magic; stored without encryption?)".to_owned(),
            ));
        }
        let version = stored[2];
        let header_len = match version {
            VERSION => HEADER_LEN,
            VERSION_V1 => HEADER_LEN_V1,
            other => {
                return Err(bad(format!(
                    "encrypted envelope version {other} is not supported (this code writes \
                     version {VERSION} and reads versions {VERSION_V1} and {VERSION})"
                )));
            }
        };
        if stored.len() < header_len + TAG_LEN {
            return Err(short(
                header_len + TAG_LEN,
                &format!("a version-{version} encrypted value's header and tag"),
            ));
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
}

/// Encrypts every value written through it and decrypts every value read, around any
/// [`CacheService`] (`Arc<dyn CacheService>` too).
///
/// - AES-256-GCM-SIV (RFC 8452) with a random 96-bit nonce per value (envelope version 2,
///   [module docs](self)); values an earlier release wrote with AES-256-GCM (version 1)
///   still read, until their server TTL ends;
/// - the key's name (and the envelope header) is the associated data, so a value copied
///   under another key does not decrypt;
/// - every value carries its expiry, authenticated: the end of the TTL the write used
///   (`ttl_secs`, or this decorator's [default TTL](Self::with_default_ttl_secs) for
///   `None`). A read after it is a miss (`Ok(None)`), whatever TTL the inner store holds, so
///   a value saved and written back later by someone with write access to the store is not
///   served. The same holds for the lease paths: an expired value found by
///   [`lease`](CacheService::lease) is replaced by the lease, as a miss;
/// - the key id travels in the envelope, so a keyring with previous keys still reads values
///   written before a rotation, while new writes use the current key;
/// - a value that does not decrypt is [`CacheError::Serialization`] naming the key (and the
///   key id), never a panic, and stays stored as it was;
/// - keys are stored under exactly their names: `invalidate` and `invalidate_prefix` pass
///   through unchanged, and so does `ttl_secs` (`None` stays `None` for the inner service).
///
/// Only values are encrypted; key names are not. Keep secrets out of key names (hash tokens,
/// as `token:<sha256>`). What it does not stop: someone with write access can still delete
/// or overwrite entries, or write back a value that is still within its TTL (an older
/// value of the same key, until it expires); and a version-1 value saved before the upgrade
/// can be written back until version-1 reads are turned off
/// ([`EncryptionKeys::accept_v1`]).
///
/// The default TTL: the inner service's default TTL is not visible through
/// [`CacheService`], so this decorator has its own (300 s, as every backend unless
/// configured). If the inner service was built with another default TTL, give this
/// decorator the same one ([`with_default_ttl_secs`](Self::with_default_ttl_secs)): a
/// shorter one ends `None` writes earlier than the store does, a longer one leaves a replay
/// window past the store's TTL.
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
    default_ttl: Duration,
}

/// How many times [`CacheService::lease`] replaces an expired value before it reports the
/// last one as unreadable (each replacement can only fail if the key is written again).
const EXPIRED_LEASE_RETRIES: usize = 3;

impl<S: CacheService> EncryptedCacheService<S> {
    /// Wraps `inner`: values are encrypted with `keys`' current key; `None` TTLs are 300 s
    /// ([`DEFAULT_TTL_SECS`]) in the sealed expiry.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.keys().current_id(), 1);
    /// assert_eq!(cache.default_ttl().as_secs(), 300);
    /// ```
    pub fn new(inner: S, keys: EncryptionKeys) -> Self {
        EncryptedCacheService {
            inner,
            keys,
            default_ttl: Duration::from_secs(DEFAULT_TTL_SECS),
        }
    }

    /// Sets the TTL sealed into values written with `ttl_secs: None`: give it the inner
    /// service's default TTL. Outside `1..=MAX_TTL_SECS` is [`CacheError::Config`].
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let moka = MokaCacheService::builder().default_ttl_secs(60).build()?;
    /// let cache = EncryptedCacheService::new(moka, EncryptionKeys::new(1, [1u8; 32]))
    ///     .with_default_ttl_secs(60)?;
    /// assert_eq!(cache.default_ttl().as_secs(), 60);
    /// assert!(EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]))
    ///     .with_default_ttl_secs(0)
    ///     .is_err());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn with_default_ttl_secs(mut self, secs: u64) -> Result<Self, CacheError> {
        self.default_ttl = check_default_ttl(secs)?;
        Ok(self)
    }

    /// The TTL sealed into values written with `ttl_secs: None`.
    ///
    /// ```
    /// use cachet::{EncryptedCacheService, EncryptionKeys, MokaCacheService};
    ///
    /// let cache = EncryptedCacheService::new(MokaCacheService::default(), EncryptionKeys::new(1, [1u8; 32]));
    /// assert_eq!(cache.default_ttl(), std::time::Duration::from_secs(300));
    /// ```
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
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
        match stored {
            Some(bytes) => self.keys.decrypt(key, &bytes),
            None => Ok(None),
        }
    }

    /// Encrypts `value` with the expiry of the write's TTL; zeroes `value`'s buffer after
    /// if this is its only handle.
    fn seal(&self, key: &str, value: Bytes, ttl_secs: Option<u64>) -> Result<Bytes, CacheError> {
        let ttl = resolve_ttl(key, ttl_secs, self.default_ttl)?;
        let sealed = self.keys.encrypt(key, &value, ttl);
        if let Ok(mut unique) = value.try_into_mut() {
            unique[..].zeroize();
        }
        sealed
    }
}

impl<S: fmt::Debug> fmt::Debug for EncryptedCacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedCacheService")
            .field("keys", &self.keys)
            .field("default_ttl", &self.default_ttl)
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
        let sealed = self.seal(key, value, ttl_secs)?;
        self.inner.set_bytes(key, sealed, ttl_secs).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.inner.invalidate(key).await
    }

    async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        self.inner.invalidate_prefix(prefix).await
    }

    /// Decrypts a value the inner lease returns. One past its authenticated expiry is a
    /// miss: it is replaced by the lease at once (a new request for the same token with
    /// `replace` set to that value), so the caller sees what it would see for an expired
    /// entry. A value that does not decrypt is [`LeaseRead::Unreadable`].
    async fn lease(&self, key: &str, request: &LeaseRequest) -> Result<LeaseRead, CacheError> {
        let mut answer = self.inner.lease(key, request).await?;
        let mut replaced = 0;
        loop {
            let LeaseRead::Value { value, version } = answer else {
                return Ok(answer);
            };
            match self.keys.decrypt(key, &value) {
                Ok(Some(value)) => return Ok(LeaseRead::Value { value, version }),
                Err(error) => return Ok(LeaseRead::Unreadable { error, version }),
                Ok(None) if replaced == EXPIRED_LEASE_RETRIES => {
                    let error = CacheError::serialization::<EncryptedEnvelope>(
                        key,
                        "decrypt",
                        format!(
                            "the value is past its authenticated expiry, and an expired value \
                             was written again each of the {EXPIRED_LEASE_RETRIES} times a \
                             lease replaced it"
                        ),
                    );
                    return Ok(LeaseRead::Unreadable { error, version });
                }
                Ok(None) => {
                    replaced += 1;
                    let replace = LeaseRequest {
                        replace: Some(version),
                        ..request.clone()
                    };
                    answer = self.inner.lease(key, &replace).await?;
                }
            }
        }
    }

    async fn set_leased(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        let sealed = self.seal(key, value, ttl_secs)?;
        self.inner.set_leased(key, lease, sealed, ttl_secs).await
    }

    async fn release_lease(&self, key: &str, lease: &Lease) -> Result<(), CacheError> {
        self.inner.release_lease(key, lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

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

    fn plain(keys: &EncryptionKeys, key: &str, stored: &Bytes) -> Bytes {
        match keys.decrypt(key, stored) {
            Ok(Some(plain)) => plain,
            other => panic!("expected a value, got {other:?}"),
        }
    }

    /// Both versions of the same value, for tests that hold for either.
    fn both(keys: &EncryptionKeys, key: &str, value: &[u8]) -> [Bytes; 2] {
        [
            keys.encrypt(key, value, MINUTE).unwrap(),
            keys.encrypt_v1(key, value).unwrap(),
        ]
    }

    #[test]
    fn round_trip_of_empty_small_and_large_values() {
        let keys = keys();
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 1 << 20] {
            let value: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = keys.encrypt("k", &value, MINUTE).unwrap();
            assert_eq!(sealed.len(), HEADER_LEN + len + TAG_LEN);
            assert_eq!(&sealed[..2], MAGIC);
            assert_eq!(sealed[2], VERSION);
            assert_eq!(&sealed[3..7], &1u32.to_be_bytes());
            assert_eq!(plain(&keys, "k", &sealed), value);

            let old = keys.encrypt_v1("k", &value).unwrap();
            assert_eq!(old.len(), HEADER_LEN_V1 + len + TAG_LEN);
            assert_eq!(old[2], VERSION_V1);
            assert_eq!(plain(&keys, "k", &old), value);
        }
    }

    /// Computed independently of this code (Python's `cryptography` 48: AES-GCM for version
    /// 1; HMAC-SHA256 and `AESGCMSIV` for version 2), so that the format cannot drift
    /// unnoticed.
    #[test]
    fn known_answers_of_both_versions() {
        let keys = EncryptionKeys::new(1, [0x11u8; 32]);
        let v1 = hex::decode(
            "43530100000001000102030405060708090a0b68c1c67f1acd17ce36c8a1f0e6d299d205b1ad39691d\
             943bb2a73fe8da29",
        )
        .unwrap();
        let v2 = hex::decode(
            "435302000000010000018bcfe56800000102030405060708090a0b41b2575f7d9d2cd48f3da4565082\
             33a589db618c33c589d2e0ecbf30cf9d",
        )
        .unwrap();
        let value = br#"{"plan":"pro"}"#;
        let nonce_v1: [u8; 12] = std::array::from_fn(|i| i as u8);
        let nonce_v2: [u8; NONCE_LEN] = std::array::from_fn(|i| i as u8);
        assert_eq!(keys.seal_v1_with("org:acme", value, nonce_v1).unwrap(), v1);
        let expires = 1_700_000_000_000;
        assert_eq!(
            keys.seal_v2_with("org:acme", value, expires, nonce_v2)
                .unwrap(),
            v2
        );
        assert_eq!(
            hex::encode(*derive_v2_key(&EncryptionKey::from([0x11u8; 32]))),
            "d0f1820a9fae8f1b19343aac450e0e5669f5d1567deb7528ac295d8cbdb8e03d"
        );
        let before = UNIX_EPOCH + Duration::from_millis(expires - 1);
        let v2 = Bytes::from(v2);
        assert_eq!(
            keys.decrypt_at("org:acme", &v2, before).unwrap().as_deref(),
            Some(&value[..])
        );
        assert_eq!(
            keys.decrypt_at("org:acme", &v2, UNIX_EPOCH + Duration::from_millis(expires))
                .unwrap(),
            None
        );
        // Version 1 has no expiry: it reads at any time.
        assert_eq!(plain(&keys, "org:acme", &Bytes::from(v1)), &value[..]);
    }

    /// The primitive alone, pinned to RFC 8452 Appendix C.2 (AEAD_AES_256_GCM_SIV), apart
    /// from the envelope: two of its vectors, one with a random-looking key, nonce, associated
    /// data and a partial block, one with two full blocks of plaintext.
    #[test]
    fn the_v2_cipher_is_rfc_8452_aes_256_gcm_siv() {
        struct Vector {
            key: &'static str,
            nonce: &'static str,
            aad: &'static str,
            plaintext: &'static str,
            /// The ciphertext, then the tag.
            sealed: &'static str,
        }
        let vectors = [
            Vector {
                key: "bae8e37fc83441b16034566b7a806c46bb91c3c5aedb64a6c590bc84d1a5e269",
                nonce: "e4b47801afc0577e34699b9e",
                aad: "4fbdc66f14",
                plaintext: "671fdd",
                sealed: "0eaccb93da9bb81333aee0c785b240d319719d",
            },
            Vector {
                key: "0100000000000000000000000000000000000000000000000000000000000000",
                nonce: "030000000000000000000000",
                aad: "01",
                plaintext: "0200000000000000000000000000000003000000000000000000000000000000",
                sealed: "07dad364bfc2b9da89116d7bef6daaaf6f255510aa654f920ac81b94e8bad365\
                         aea1bad12702e1965604374aab96dbbc",
            },
        ];
        for v in vectors {
            let key: [u8; 32] = hex::decode(v.key).unwrap().try_into().unwrap();
            let nonce: [u8; 12] = hex::decode(v.nonce).unwrap().try_into().unwrap();
            let aad = hex::decode(v.aad).unwrap();
            let plaintext = hex::decode(v.plaintext).unwrap();
            let sealed = hex::decode(v.sealed).unwrap();
            let cipher = Aes256GcmSiv::new(&key.into());
            let mut buffer = plaintext.clone();
            let tag = cipher
                .encrypt_inout_detached(&nonce.into(), &aad, buffer.as_mut_slice().into())
                .unwrap();
            buffer.extend_from_slice(&tag);
            assert_eq!(hex::encode(&buffer), hex::encode(&sealed), "{}", v.key);
            let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            let tag: [u8; TAG_LEN] = tag.try_into().unwrap();
            let mut opened = body.to_vec();
            cipher
                .decrypt_inout_detached(
                    &nonce.into(),
                    &aad,
                    opened.as_mut_slice().into(),
                    &tag.into(),
                )
                .unwrap();
            assert_eq!(opened, plaintext);
        }
    }

    #[test]
    fn every_length_shorter_than_header_and_tag_is_an_error() {
        let keys = keys();
        for sealed in both(&keys, "k", b"") {
            assert_eq!(
                sealed.len(),
                if sealed[2] == VERSION {
                    HEADER_LEN
                } else {
                    HEADER_LEN_V1
                } + TAG_LEN
            );
            for len in 0..sealed.len() {
                let msg = decrypt_error(&keys, "k", &sealed[..len]);
                assert!(msg.contains("shorter"), "{msg}");
            }
        }
    }

    #[test]
    fn truncated_and_extended_values_fail() {
        let keys = keys();
        for sealed in both(&keys, "k", b"a longer secret value") {
            for len in 0..sealed.len() {
                decrypt_error(&keys, "k", &sealed[..len]);
            }
            let mut longer = sealed.to_vec();
            longer.push(0);
            decrypt_error(&keys, "k", &longer);
        }
    }

    #[test]
    fn bad_magic_and_unknown_versions_are_reported_as_such() {
        let keys = keys();
        let sealed = keys.encrypt("k", b"value", MINUTE).unwrap().to_vec();
        let mut magic = sealed.clone();
        magic[0] = b'X';
        assert!(decrypt_error(&keys, "k", &magic).contains("magic"));
        for version in [0u8, 3, 0x7f, 0xff] {
            let mut changed = sealed.clone();
            changed[2] = version;
            let msg = decrypt_error(&keys, "k", &changed);
            assert!(msg.contains(&format!("version {version} ")), "{msg}");
        }
        // A version 2 value relabelled 1 (and the reverse) parses, and fails the tag.
        let mut as_v1 = sealed.clone();
        as_v1[2] = VERSION_V1;
        assert!(decrypt_error(&keys, "k", &as_v1).contains("authentication failed"));
        let mut as_v2 = keys.encrypt_v1("k", &[7u8; 40]).unwrap().to_vec();
        as_v2[2] = VERSION;
        assert!(decrypt_error(&keys, "k", &as_v2).contains("authentication failed"));
        let plain_json = br#"{"id":1,"slug":"acme","secret":"a long enough plaintext"}"#;
        assert!(decrypt_error(&keys, "k", plain_json).contains("magic"));
    }

    #[test]
    fn every_flipped_bit_fails() {
        let keys = keys();
        for sealed in both(&keys, "k", b"value") {
            let sealed = sealed.to_vec();
            for i in 0..sealed.len() {
                for bit in 0..8 {
                    let mut flipped = sealed.clone();
                    flipped[i] ^= 1 << bit;
                    decrypt_error(&keys, "k", &flipped);
                }
            }
        }
    }

    #[test]
    fn a_changed_expiry_fails_authentication_whichever_way() {
        let keys = keys();
        let now = SystemTime::now();
        let live = keys.encrypt_until("k", b"v", now + MINUTE).unwrap();
        let dead = keys.encrypt_until("k", b"v", now - MINUTE).unwrap();
        assert_eq!(
            keys.decrypt("k", &dead).unwrap(),
            None,
            "a miss, not an error"
        );
        for (sealed, new_expiry) in [
            (&dead, u64::MAX),
            (&dead, unix_ms(now + MINUTE)),
            (&live, 0),
            (&live, unix_ms(now - MINUTE)),
            (&live, unix_ms(now + MINUTE) + 1),
        ] {
            let mut changed = sealed.to_vec();
            changed[7..15].copy_from_slice(&new_expiry.to_be_bytes());
            let msg = decrypt_error(&keys, "k", &changed);
            assert!(msg.contains("authentication failed with key id 1"), "{msg}");
        }
    }

    #[test]
    fn the_expiry_is_the_ttl_from_now_and_is_checked_at_read_time() {
        let keys = keys();
        let before = unix_ms(SystemTime::now());
        let sealed = keys.encrypt("k", b"v", Duration::from_secs(5)).unwrap();
        let after = unix_ms(SystemTime::now());
        let envelope = EncryptedEnvelope::parse("k", &sealed).unwrap();
        let expires = unix_ms(envelope.expires_at().unwrap());
        assert!(
            (before + 5000..=after + 5000).contains(&expires),
            "{expires}"
        );
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        assert!(
            keys.decrypt_at("k", &sealed, at(expires - 1))
                .unwrap()
                .is_some()
        );
        assert!(
            keys.decrypt_at("k", &sealed, at(expires))
                .unwrap()
                .is_none()
        );
        assert!(
            keys.decrypt_at("k", &sealed, at(u64::MAX))
                .unwrap()
                .is_none()
        );
        // Extremes: a TTL past the end of time saturates; an instant before the epoch is 0.
        let forever = keys.encrypt("k", b"v", Duration::MAX).unwrap();
        assert_eq!(&forever[7..15], &u64::MAX.to_be_bytes());
        let ancient = keys
            .encrypt_until("k", b"v", UNIX_EPOCH - Duration::from_secs(1))
            .unwrap();
        assert_eq!(&ancient[7..15], &[0u8; 8]);
        assert_eq!(keys.decrypt("k", &ancient).unwrap(), None);
        // A version 1 value has no expiry: it reads whenever.
        let old = keys.encrypt_v1("k", b"v").unwrap();
        assert_eq!(
            EncryptedEnvelope::parse("k", &old).unwrap().expires_at(),
            None
        );
        assert!(keys.decrypt_at("k", &old, at(u64::MAX)).unwrap().is_some());
    }

    #[test]
    fn version_1_can_be_refused() {
        let keys = keys().accept_v1(false);
        let old = keys.encrypt_v1("k", b"v").unwrap();
        let msg = decrypt_error(&keys, "k", &old);
        assert!(msg.contains("version 1"), "{msg}");
        assert_eq!(
            plain(&keys, "k", &keys.encrypt("k", b"v", MINUTE).unwrap()),
            &b"v"[..]
        );
        assert!(format!("{keys:?}").contains("accept_v1: false"));
    }

    #[test]
    fn a_changed_key_id_is_unknown_or_fails_authentication() {
        let keys = EncryptionKeys::new(1, [1u8; 32])
            .with_previous(2, [2u8; 32])
            .unwrap();
        for sealed in both(&keys, "k", b"value") {
            let sealed = sealed.to_vec();
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
    }

    #[test]
    fn the_key_name_is_bound() {
        let keys = keys();
        for sealed in both(&keys, "org:acme", b"value") {
            for other in ["org:acm", "org:acme ", "", "org:acmf", "ORG:ACME"] {
                let msg = decrypt_error(&keys, other, &sealed);
                assert!(msg.contains("authentication failed with key id 1"), "{msg}");
            }
            assert_eq!(plain(&keys, "org:acme", &sealed), &b"value"[..]);
        }
    }

    #[test]
    fn a_wrong_key_with_the_same_id_fails_authentication() {
        let impostor = EncryptionKeys::new(1, [9u8; 32]);
        for sealed in both(&keys(), "k", b"value") {
            assert!(decrypt_error(&impostor, "k", &sealed).contains("authentication failed"));
        }
    }

    #[test]
    fn previous_keys_decrypt_and_the_current_one_encrypts() {
        let old = EncryptionKeys::new(1, [1u8; 32]);
        let rotated = EncryptionKeys::new(2, [2u8; 32])
            .with_previous(1, [1u8; 32])
            .unwrap();
        for sealed_old in both(&old, "k", b"old") {
            assert_eq!(plain(&rotated, "k", &sealed_old), &b"old"[..]);
            let only_new = EncryptionKeys::new(2, [2u8; 32]);
            let msg = decrypt_error(&only_new, "k", &sealed_old);
            assert!(msg.contains("key id 1"), "{msg}");
        }
        let sealed_new = rotated.encrypt("k", b"new", MINUTE).unwrap();
        assert_eq!(
            EncryptedEnvelope::parse("k", &sealed_new).unwrap().key_id(),
            2
        );
        let msg = decrypt_error(&old, "k", &sealed_new);
        assert!(msg.contains("key id 2"), "{msg}");
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
        let nonces: std::collections::HashSet<Vec<u8>> = (0..1000)
            .map(|_| {
                let sealed = keys.encrypt("k", b"same", MINUTE).unwrap();
                EncryptedEnvelope::parse("k", &sealed)
                    .unwrap()
                    .nonce()
                    .to_vec()
            })
            .collect();
        assert_eq!(nonces.len(), 1000);
        assert!(nonces.iter().all(|n| n.len() == NONCE_LEN));
    }

    #[test]
    fn the_two_versions_use_different_keys() {
        let key = EncryptionKey::from([3u8; 32]);
        assert_ne!(&*derive_v2_key(&key), key.as_bytes());
        assert_ne!(
            derive_v2_key(&key),
            derive_v2_key(&EncryptionKey::from([4u8; 32]))
        );
    }

    #[test]
    fn the_decorator_seals_with_its_ttl_and_checks_it() {
        let service = EncryptedCacheService::new(crate::MokaCacheService::default(), keys());
        let value = Bytes::from(b"secret plaintext".to_vec());
        let sealed = service.seal("k", value, None).unwrap();
        assert_eq!(
            plain(service.keys(), "k", &sealed),
            &b"secret plaintext"[..]
        );
        let err = service
            .seal("k", Bytes::from_static(b"v"), Some(0))
            .unwrap_err();
        assert!(matches!(err, CacheError::InvalidArgument { .. }), "{err}");
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
