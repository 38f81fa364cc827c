//! [`LoadError`]: why a load returned no value.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{CacheError, KeyName};

/// Why [`get_or_load`](crate::CacheServiceExt::get_or_load) returned no value.
///
/// ```
/// use cachet::{CacheServiceExt, LoadError, MokaCacheService};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cache = MokaCacheService::default();
/// let err = cache
///     .get_or_load::<u32, _, _, _>("org:acme", None, || async { Err("database down") })
///     .await
///     .unwrap_err();
/// assert!(matches!(&err, LoadError::Loader { source, .. } if **source == "database down"));
/// assert!(err.to_string().contains("org:acme"));
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError<E> {
    /// The loader failed. Every caller that waited on the same load receives the same error,
    /// hence the `Arc`. It is not cached: the next call loads again.
    Loader {
        /// The key being loaded.
        key: KeyName,
        /// The loader's error.
        source: Arc<E>,
    },
    /// The loader did not finish in time (see
    /// [`LoadOptions::load_timeout`](super::LoadOptions::load_timeout)).
    Timeout {
        /// The key being loaded.
        key: KeyName,
        /// How long it was given.
        after: Duration,
    },
    /// A cache error that cannot be worked around: an invalid TTL, a loaded value that does
    /// not encode.
    Cache(CacheError),
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Loader { key, source } => write!(f, "loading key {key} failed: {source}"),
            LoadError::Timeout { key, after } => {
                write!(f, "loading key {key} did not finish within {after:?}")
            }
            LoadError::Cache(error) => fmt::Display::fmt(error, f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Loader { source, .. } => Some(&**source),
            LoadError::Timeout { .. } => None,
            LoadError::Cache(error) => Some(error),
        }
    }
}

impl<E> From<CacheError> for LoadError<E> {
    fn from(error: CacheError) -> Self {
        LoadError::Cache(error)
    }
}
