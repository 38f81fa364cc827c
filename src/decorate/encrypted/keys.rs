//! Keys: [`EncryptionKey`] (raw bytes or text from settings), and [`EncryptionKeys`], the
//! keyring that encrypts with its current key, decrypts with any of its keys (rotation) and
//! decides which envelope versions it reads.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::envelope::{Ciphers, EncryptedEnvelope, NONCE_LEN, NONCE_LEN_V1, VERSION_V1};
use crate::{CacheError, IntegrityProblem};

/// The label of the version-2 key derivation (HMAC-SHA256 keyed with the configured key).
const V2_KEY_LABEL: &[u8] = b"cachet encrypted envelope v2: AES-256-GCM-SIV";

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

/// One key of the ring: its id and the ciphers of both envelope versions (the configured
/// key for version 1, the derived one for version 2), which zero their key state on drop.
#[derive(Clone)]
struct KeyEntry {
    id: u32,
    ciphers: Ciphers,
}

impl KeyEntry {
    fn new(id: u32, key: &EncryptionKey) -> Self {
        KeyEntry {
            id,
            ciphers: Ciphers::new(key.as_bytes(), &derive_v2_key(key)),
        }
    }
}

/// HMAC-SHA256(key, label): the version-2 key, so that the configured bytes are never the key
/// of two algorithms.
pub(super) fn derive_v2_key(key: &EncryptionKey) -> Zeroizing<[u8; 32]> {
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
    /// value is then [`CacheError::Integrity`] ([`IntegrityProblem::VersionRefused`]).
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
    /// assert!(matches!(err, CacheError::Integrity { .. }));
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

    /// The entry of the current key, for a write under the cache key `key`.
    fn current(&self, key: &str) -> Result<&KeyEntry, CacheError> {
        self.entry_for(self.current_id).ok_or_else(|| {
            CacheError::serialization::<EncryptedEnvelope>(
                key,
                "encrypt",
                format!("no cipher for the current key id {}", self.current_id),
            )
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
        self.seal_v2_with(key, plaintext, expires_at_ms, random_nonce())
    }

    /// [`seal_v2`](Self::seal_v2) with a given nonce (the known-answer tests).
    pub(super) fn seal_v2_with(
        &self,
        key: &str,
        plaintext: &[u8],
        expires_at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Bytes, CacheError> {
        let entry = self.current(key)?;
        entry
            .ciphers
            .seal_v2(key, plaintext, entry.id, expires_at_ms, nonce)
    }

    /// Encrypts in the old version-1 format (AES-256-GCM, no expiry), for tests and
    /// benchmarks that need what earlier releases wrote. Never used by the decorator.
    #[doc(hidden)]
    pub fn encrypt_v1(&self, key: &str, plaintext: &[u8]) -> Result<Bytes, CacheError> {
        self.seal_v1_with(key, plaintext, random_nonce())
    }

    /// [`encrypt_v1`](Self::encrypt_v1) with a given nonce (the known-answer tests).
    pub(super) fn seal_v1_with(
        &self,
        key: &str,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN_V1],
    ) -> Result<Bytes, CacheError> {
        let entry = self.current(key)?;
        entry.ciphers.seal_v1(key, plaintext, entry.id, nonce)
    }

    /// Decrypts an envelope stored under the cache key `key`: `Ok(None)` if it is a
    /// version-2 value past its authenticated expiry (a miss, like an expired entry), else
    /// the plaintext, in a buffer zeroed when its last handle drops.
    ///
    /// Anything that is not an envelope [`encrypt`](Self::encrypt) (or an earlier release)
    /// wrote for this `key` with a key of this keyring is [`CacheError::Integrity`]
    /// (layer `"encryption"`) naming `key` and, when the envelope names one, the key id. The tag
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
    /// assert!(matches!(moved, CacheError::Integrity { .. }));
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
        let fail = |problem| CacheError::integrity(key, "encryption", problem);
        if envelope.version() == VERSION_V1 && !self.accept_v1 {
            // Written before the upgrade to version 2, or written back by someone who saved it.
            return Err(fail(IntegrityProblem::VersionRefused(VERSION_V1)));
        }
        let Some(entry) = self.entry_for(envelope.key_id()) else {
            return Err(fail(IntegrityProblem::UnknownKeyId(envelope.key_id())));
        };
        let Ok(plaintext) = entry.ciphers.open(key, &envelope) else {
            return Err(fail(IntegrityProblem::AuthenticationFailed {
                key_id: envelope.key_id(),
            }));
        };
        Ok(Opened {
            plaintext: Bytes::from_owner(plaintext),
            expires_at_ms: envelope.expires_at_ms(),
        })
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

/// A fresh random nonce from [`rand::rng`] (see the [module docs](super) on forks).
fn random_nonce<const N: usize>() -> [u8; N] {
    let mut nonce = [0u8; N];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// Milliseconds since the Unix epoch; 0 before it.
pub(super) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
