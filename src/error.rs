//! Errors returned by every cache backend and decorator, grouped by outcome: what a caller
//! does next differs for each variant (fix the code, retry later, treat the entry as gone,
//! alert: stored data was tampered with or written by an incompatible version).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error kept as the [`source`](std::error::Error::source) of a [`CacheError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Longest key, in bytes, that an error message repeats in full; longer keys are cut.
const MAX_KEY_IN_MESSAGE: usize = 120;

/// What went wrong in a cache call.
///
/// Every variant names the key (or prefix) it concerns, so a log line says what failed and
/// where. The enum is `#[non_exhaustive]`: match it with a wildcard arm.
///
/// ```
/// use cachet::{CacheError, CacheService, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cache = MokaCacheService::default();
/// let err = cache
///     .set_bytes("org:acme", bytes::Bytes::from_static(b"{}"), Some(0))
///     .await
///     .unwrap_err();
/// assert!(matches!(err, CacheError::InvalidArgument { .. }));
/// assert!(err.to_string().contains("org:acme"));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// A value could not be encoded, or the stored bytes could not be decoded as the
    /// requested type (the wrong type, or bytes that are not JSON). The stored entry is left
    /// untouched. Stored bytes that fail a check *before* decoding (a frame or envelope
    /// header, authenticated decryption) are [`CacheError::Integrity`] instead.
    #[error("cannot {action} the value under key {key} as `{type_name}`: {source}")]
    Serialization {
        /// The key, as it appears in messages (very long keys are shortened).
        key: KeyName,
        /// `"encode"` or `"decode"`.
        action: &'static str,
        /// The Rust type that was being encoded or decoded.
        type_name: &'static str,
        /// What the codec reported.
        #[source]
        source: BoxError,
    },
    /// Stored bytes failed a check before any decoding: an unknown magic or format version,
    /// a truncated header, a value whose authentication failed (wrong key, tampered or
    /// swapped ciphertext), a key id no configured key has. Nothing was decoded and the
    /// stored entry is left untouched; cache-aside treats it as a miss and overwrites it.
    #[error("stored value under key {key} failed the {layer} check: {problem}")]
    Integrity {
        /// The key, as it appears in messages.
        key: KeyName,
        /// The layer whose check failed: `"frame"` (cache-aside's header), `"envelope"` (the
        /// tiered cache's header), `"encryption"`.
        layer: &'static str,
        /// What failed.
        problem: IntegrityProblem,
    },
    /// The backend did not answer within its time limit (a command timeout, a connection
    /// that could not be made or re-made in time). The call may or may not have taken effect.
    #[error("cache backend {backend} did not answer {operation} {key} within {after:?}")]
    Timeout {
        /// The backend and, for a remote one, its server address.
        backend: Arc<str>,
        /// The operation that timed out.
        operation: &'static str,
        /// The key or prefix of the call.
        key: KeyName,
        /// The limit that ran out.
        after: Duration,
    },
    /// The backend (a server, a connection) failed.
    #[error("cache backend {backend} failed on {operation} {key}: {source}")]
    Backend {
        /// The backend and, for a remote one, its server address.
        backend: Arc<str>,
        /// The operation that failed (`get`, `set`, `invalidate`, `invalidate_prefix`, ...).
        operation: &'static str,
        /// The key or prefix of the call.
        key: KeyName,
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
    /// A service could not be built from its settings: a malformed URL, a default TTL of 0,
    /// a server that cannot be reached when the service starts.
    #[error("cannot build the cache service: {message}")]
    Config {
        /// What is wrong, with the server or setting it concerns (never a password).
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The call itself was wrong, for example a TTL of zero seconds.
    #[error("invalid argument for key {key}: {message}")]
    InvalidArgument {
        /// The key of the call.
        key: KeyName,
        /// What is wrong with it.
        message: String,
    },
}

impl CacheError {
    /// A [`CacheError::Serialization`] for `key` and the type `T`.
    pub fn serialization<T: ?Sized>(
        key: &str,
        action: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        CacheError::Serialization {
            key: KeyName::new(key),
            action,
            type_name: std::any::type_name::<T>(),
            source: source.into(),
        }
    }

    /// A [`CacheError::Integrity`] for `key`: `layer`'s check found `problem`.
    pub fn integrity(key: &str, layer: &'static str, problem: IntegrityProblem) -> Self {
        CacheError::Integrity {
            key: KeyName::new(key),
            layer,
            problem,
        }
    }

    /// A [`CacheError::Timeout`] for `operation` on `key`, after `after`.
    pub fn timeout(
        backend: impl Into<Arc<str>>,
        operation: &'static str,
        key: &str,
        after: Duration,
    ) -> Self {
        CacheError::Timeout {
            backend: backend.into(),
            operation,
            key: KeyName::new(key),
            after,
        }
    }

    /// A [`CacheError::Backend`] for `operation` on `key`, on the named backend or server.
    pub fn backend(
        backend: impl Into<Arc<str>>,
        operation: &'static str,
        key: &str,
        source: impl Into<BoxError>,
    ) -> Self {
        CacheError::Backend {
            backend: backend.into(),
            operation,
            key: KeyName::new(key),
            source: source.into(),
        }
    }

    /// A [`CacheError::Config`].
    pub fn config(message: impl Into<String>, source: Option<BoxError>) -> Self {
        CacheError::Config {
            message: message.into(),
            source,
        }
    }

    /// A [`CacheError::InvalidArgument`] for `key`.
    pub fn invalid_argument(key: &str, message: impl Into<String>) -> Self {
        CacheError::InvalidArgument {
            key: KeyName::new(key),
            message: message.into(),
        }
    }
}

/// What an integrity check found ([`CacheError::Integrity`]).
///
/// ```
/// use cachet::{CacheError, IntegrityProblem};
///
/// let err = CacheError::integrity("org:acme", "frame", IntegrityProblem::UnknownVersion(9));
/// assert!(err.to_string().contains("unknown format version 9"));
/// assert!(matches!(err, CacheError::Integrity { problem: IntegrityProblem::UnknownVersion(9), .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IntegrityProblem {
    /// The bytes do not start with the layer's magic.
    BadMagic,
    /// The magic is right, the format version is not one this build reads (a newer writer).
    UnknownVersion(u8),
    /// A format version this build can read but was configured to refuse (an encrypted
    /// version-1 value once [`accept_v1(false)`](crate::EncryptionKeys::accept_v1)).
    VersionRefused(u8),
    /// Shorter than the layer's header, or a length field that runs past the end.
    Truncated,
    /// A header field holds a value the format does not define.
    Malformed(&'static str),
    /// Authenticated decryption with the key of this id failed: the wrong key, or ciphertext
    /// that was altered, truncated or moved from another cache key.
    AuthenticationFailed {
        /// The key id the value names.
        key_id: u32,
    },
    /// The value names an encryption key id that no configured key has.
    UnknownKeyId(u32),
    /// The value is past its authenticated expiry, and each retry found an expired value
    /// again.
    Expired,
}

impl fmt::Display for IntegrityProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntegrityProblem::BadMagic => f.write_str("bad magic"),
            IntegrityProblem::UnknownVersion(v) => write!(f, "unknown format version {v}"),
            IntegrityProblem::VersionRefused(v) => {
                write!(f, "format version {v}, which this reader no longer accepts")
            }
            IntegrityProblem::Truncated => f.write_str("truncated"),
            IntegrityProblem::Malformed(what) => write!(f, "malformed {what}"),
            IntegrityProblem::AuthenticationFailed { key_id } => write!(
                f,
                "authentication failed with key id {key_id}: the bytes were changed, the value \
                 was stored under another key, or key id {key_id} is not the key that \
                 encrypted it"
            ),
            IntegrityProblem::UnknownKeyId(id) => {
                write!(
                    f,
                    "the value names key id {id}, which no configured key has"
                )
            }
            IntegrityProblem::Expired => f.write_str(
                "past its authenticated expiry (an expired value was written again on every retry)",
            ),
        }
    }
}

/// A key as carried by an error: displayed quoted, and shortened when very long (a 1 MiB
/// key must not become a 1 MiB log line).
///
/// ```
/// use cachet::KeyName;
///
/// assert_eq!(KeyName::new("org:acme").to_string(), "\"org:acme\"");
/// let long = "k".repeat(10_000);
/// let shown = KeyName::new(&long).to_string();
/// assert!(shown.len() < 200 && shown.contains("10000 bytes"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct KeyName {
    shown: String,
    len: usize,
}

impl KeyName {
    /// Keeps what a message needs of `key`.
    pub fn new(key: &str) -> Self {
        let mut end = key.len().min(MAX_KEY_IN_MESSAGE);
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        KeyName {
            shown: key[..end].to_owned(),
            len: key.len(),
        }
    }

    /// The key's full length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the key is the empty string.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the key (all of it when it is short).
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.shown.len() == self.len {
            write!(f, "{:?}", self.shown)
        } else {
            write!(f, "{:?}... ({} bytes)", self.shown, self.len)
        }
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What went wrong taking or holding a lock.
///
/// ```
/// use std::time::Duration;
/// use cachet::{ConcurrencyService, LocalConcurrencyService, LockError, LockOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let locks = LocalConcurrencyService::default();
/// let _held = locks.acquire("token:alice", &LockOptions::default()).await.unwrap();
/// let err = locks
///     .acquire("token:alice", &LockOptions::default().wait_timeout(Duration::ZERO))
///     .await
///     .unwrap_err();
/// assert!(matches!(err, LockError::Timeout { .. }));
/// assert!(err.to_string().contains("token:alice"));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another holder kept the lock for the whole wait.
    #[error("lock {key} still held by another holder after waiting {waited:?}")]
    Timeout {
        /// The lock's key.
        key: KeyName,
        /// How long this call waited.
        waited: std::time::Duration,
    },
    /// The lock's lease ran out (or the lock was taken away) before it was released: another
    /// holder may have run at the same time.
    #[error("the lease on lock {key} was lost before release")]
    LeaseLost {
        /// The lock's key.
        key: KeyName,
    },
    /// The backend did not answer within its time limit; the call may or may not have taken
    /// effect (a lock may have been taken: its lease will run out).
    #[error("lock backend {backend} did not answer {operation} of lock {key} within {after:?}")]
    BackendTimeout {
        /// The backend and, for a remote one, its server address.
        backend: Arc<str>,
        /// `acquire`, `release` or `renew`.
        operation: &'static str,
        /// The lock's key.
        key: KeyName,
        /// The limit that ran out.
        after: Duration,
    },
    /// The lock service could not be built from its settings (a malformed URL, a server
    /// that cannot be reached at start).
    #[error("cannot build the lock service: {message}")]
    Config {
        /// What is wrong (never a password).
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// A cache error with no lock counterpart, kept whole.
    #[error(transparent)]
    Cache(Box<CacheError>),
    /// The backend (a server, a connection) failed.
    #[error("lock backend {backend} failed on {operation} of lock {key}: {source}")]
    Backend {
        /// The backend and, for a remote one, its server address.
        backend: Arc<str>,
        /// `acquire`, `release` or `renew`.
        operation: &'static str,
        /// The lock's key.
        key: KeyName,
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
    /// The call or the settings were wrong (an empty key, a zero lease, a bad URL).
    #[error("invalid lock argument for {key}: {message}")]
    InvalidArgument {
        /// The lock's key (empty for settings).
        key: KeyName,
        /// What is wrong.
        message: String,
    },
    /// The lock was taken, but fewer replicas than asked for
    /// ([`LockOptions::wait_for_replicas`](crate::LockOptions::wait_for_replicas)) confirmed
    /// it in time; it was let go.
    #[error(
        "lock {key} reached {acknowledged} of {required} replicas within {waited:?}; it was let go"
    )]
    NotReplicated {
        /// The lock's key.
        key: KeyName,
        /// Replicas that confirmed the lock.
        acknowledged: u32,
        /// Replicas asked for.
        required: u32,
        /// How long the wait took.
        waited: std::time::Duration,
    },
}

/// What [`with_lock`](crate::ConcurrencyServiceExt::with_lock) returns when it fails: the
/// lock was not taken (the work did not run), or the lease was lost while the work ran (its
/// output is here: it may have had effects). `?` turns it into a [`LockError`].
///
/// ```
/// use cachet::{KeyName, LockError, WithLockError};
///
/// let lost = WithLockError::LeaseLost { key: KeyName::new("refresh:alice"), output: 7 };
/// assert!(lost.to_string().contains("refresh:alice"));
/// assert_eq!(lost.into_output(), Some(7));
/// let as_lock_error: LockError = WithLockError::LeaseLost { key: KeyName::new("k"), output: () }.into();
/// assert!(matches!(as_lock_error, LockError::LeaseLost { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WithLockError<T> {
    /// The lock could not be taken; the work did not run.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The work ran, but the lease was lost before it was released: another holder may have
    /// run at the same time.
    #[error("the lease on lock {key} was lost while the work ran (its output is kept)")]
    LeaseLost {
        /// The lock's key.
        key: KeyName,
        /// What the work returned.
        output: T,
    },
}

impl<T> WithLockError<T> {
    /// The work's output, if it ran.
    pub fn into_output(self) -> Option<T> {
        match self {
            WithLockError::LeaseLost { output, .. } => Some(output),
            WithLockError::Lock(_) => None,
        }
    }
}

impl<T> From<WithLockError<T>> for LockError {
    /// Drops the work's output, if any.
    fn from(error: WithLockError<T>) -> Self {
        match error {
            WithLockError::Lock(e) => e,
            WithLockError::LeaseLost { key, .. } => LockError::LeaseLost { key },
        }
    }
}

impl From<CacheError> for LockError {
    /// A lock service built on a cache connection reports the connection's errors, each as
    /// the lock error of the same kind: a backend failure stays [`LockError::Backend`], a
    /// timeout [`LockError::BackendTimeout`], bad settings [`LockError::Config`], a bad
    /// argument [`LockError::InvalidArgument`] with its key; anything else is kept whole in
    /// [`LockError::Cache`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachet::{CacheError, LockError};
    ///
    /// let timeout = CacheError::timeout("redis 10.0.0.1:6379", "acquire", "k", Duration::from_secs(2));
    /// assert!(matches!(LockError::from(timeout), LockError::BackendTimeout { .. }));
    /// let config = CacheError::config("bad URL", None);
    /// assert!(matches!(LockError::from(config), LockError::Config { .. }));
    /// ```
    fn from(error: CacheError) -> Self {
        match error {
            CacheError::Backend {
                backend,
                operation,
                key,
                source,
            } => LockError::Backend {
                backend,
                operation,
                key,
                source,
            },
            CacheError::Timeout {
                backend,
                operation,
                key,
                after,
            } => LockError::BackendTimeout {
                backend,
                operation,
                key,
                after,
            },
            CacheError::Config { message, source } => LockError::Config { message, source },
            CacheError::InvalidArgument { key, message } => {
                LockError::InvalidArgument { key, message }
            }
            other => LockError::Cache(Box::new(other)),
        }
    }
}
