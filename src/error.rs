//! Errors returned by every cache backend and decorator.

use std::fmt;

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
    /// requested type. The stored entry is left untouched.
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
    /// The backend (a server, a connection) failed or did not answer in time.
    #[error("cache backend {backend} failed on {operation} {key}: {source}")]
    Backend {
        /// The backend and, for a remote one, its server address.
        backend: String,
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

    /// A [`CacheError::Backend`] for `operation` on `key`, on the named backend or server.
    pub fn backend(
        backend: impl Into<String>,
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
    /// The backend (a server, a connection) failed or did not answer in time.
    #[error("lock backend {backend} failed on {operation} of lock {key}: {source}")]
    Backend {
        /// The backend and, for a remote one, its server address.
        backend: String,
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
    /// A lock service built on a cache connection reports the connection's errors.
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
            other => LockError::InvalidArgument {
                key: KeyName::new(""),
                message: other.to_string(),
            },
        }
    }
}
