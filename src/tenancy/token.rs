//! Caching validated tokens (API keys, opaque access tokens) so that each request does not
//! re-validate them against the identity provider or the database.
//!
//! - The cache key is `token:<hex digest of the token>`: the raw token is never part of a
//!   key (so it never shows in `SCAN`, `MONITOR` or a key dump), and the value holds only the
//!   claims the app chose to cache. With a digest key
//!   ([`TokenCache::with_digest_key`]) the digest is HMAC-SHA256 under that key, so a copy of
//!   the keys does not let anyone test guessed tokens offline; without one it is plain
//!   SHA-256, fit only for tokens with enough entropy that guessing is hopeless (random
//!   128-bit or longer), not for short or human-chosen API keys.
//! - An entry never outlives the token: its TTL is `min(configured TTL, token expiry - skew)`,
//!   and a token too close to its expiry is not cached at all.
//! - Concurrent first requests with one token validate it once per instance (single flight).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::load::{LoadError, LoadOptions, LoadTtl};
use crate::{CacheError, CacheService, CacheServiceExt};

/// Default longest life of a cached token: 300 seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;
/// Default margin kept before a token's expiry: 30 seconds.
pub const DEFAULT_TOKEN_SKEW: Duration = Duration::from_secs(30);

/// The cache key of `token`: `token:` and the lowercase hex SHA-256 of its bytes.
///
/// ```
/// let key = cachet::token::token_key("secret-token");
/// assert!(key.starts_with("token:") && key.len() == "token:".len() + 64);
/// assert!(!key.contains("secret-token"));
/// ```
pub fn token_key(token: &str) -> String {
    format!("token:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// The shortest digest key [`TokenCache::with_digest_key`] accepts, in bytes.
pub const MIN_DIGEST_KEY_LEN: usize = 16;

/// The cache key of `token` under a digest key: `token:` and the lowercase hex
/// HMAC-SHA256(`digest_key`, token). A [`CacheError::InvalidArgument`] if the key is shorter
/// than [`MIN_DIGEST_KEY_LEN`] bytes.
///
/// ```
/// // RFC 4231, test case 1.
/// let key = cachet::token::keyed_token_key(&[0x0b; 20], "Hi There")?;
/// assert_eq!(
///     key,
///     "token:b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
/// );
/// # Ok::<(), cachet::CacheError>(())
/// ```
pub fn keyed_token_key(digest_key: &[u8], token: &str) -> Result<String, CacheError> {
    if digest_key.len() < MIN_DIGEST_KEY_LEN {
        return Err(CacheError::invalid_argument(
            "",
            format!(
                "a token digest key must be at least {MIN_DIGEST_KEY_LEN} bytes (32 random \
                 bytes recommended), got {}",
                digest_key.len()
            ),
        ));
    }
    // HMAC accepts a key of any length (RFC 2104: long keys are hashed, short ones padded),
    // so this cannot fail; the length check above is our own policy.
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(digest_key).expect("HMAC takes a key of any length");
    mac.update(token.as_bytes());
    Ok(format!(
        "token:{}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

/// A token the app's validator accepted: its claims and when it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidToken<C> {
    /// What the app caches about the token (user, org, scopes, ...).
    pub claims: C,
    /// When the token stops being valid.
    pub expires_at: SystemTime,
}

/// Validated tokens, cached under the hash of the token (see the [module docs](self)).
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, SystemTime};
/// use cachet::{CacheService, MokaCacheService, TokenCache};
/// use cachet::token::ValidToken;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// struct Claims { user: String, org: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
/// let tokens: TokenCache<Claims> = TokenCache::new(cache);
///
/// let validate = |token: &str| {
///     let ok = token == "tok-123";
///     async move {
///         // Ask the identity provider; here every "tok-123" is valid for one hour.
///         Ok::<_, std::io::Error>(ok.then(|| ValidToken {
///             claims: Claims { user: "ada".into(), org: "acme".into() },
///             expires_at: SystemTime::now() + Duration::from_secs(3600),
///         }))
///     }
/// };
/// let claims = tokens.get_or_validate("tok-123", validate("tok-123")).await?;
/// assert_eq!(claims.map(|c| c.user).as_deref(), Some("ada"));
/// assert!(tokens.get("tok-123").await?.is_some());            // cached, under the hash
/// assert!(tokens.get_or_validate("forged", validate("forged")).await?.is_none());
///
/// tokens.invalidate("tok-123").await?;                         // e.g. on logout
/// assert!(tokens.get("tok-123").await?.is_none());
/// # Ok(()) }
/// ```
pub struct TokenCache<C> {
    cache: Arc<dyn CacheService>,
    /// HMAC key for the cache keys (zeroed when the last clone drops); `None`: SHA-256.
    digest_key: Option<Arc<Zeroizing<Vec<u8>>>>,
    max_ttl_secs: u64,
    skew: Duration,
    load_timeout: Duration,
    eager_refresh: Option<f64>,
    claims: PhantomData<fn() -> C>,
}

impl<C> fmt::Debug for TokenCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("cache", &self.cache)
            .field("max_ttl_secs", &self.max_ttl_secs)
            .field("skew", &self.skew)
            .field(
                "digest",
                &if self.digest_key.is_some() {
                    "HMAC-SHA256 (keyed)"
                } else {
                    "SHA-256"
                },
            )
            .finish_non_exhaustive()
    }
}

impl<C> Clone for TokenCache<C> {
    fn clone(&self) -> Self {
        TokenCache {
            cache: Arc::clone(&self.cache),
            digest_key: self.digest_key.clone(),
            max_ttl_secs: self.max_ttl_secs,
            skew: self.skew,
            load_timeout: self.load_timeout,
            eager_refresh: self.eager_refresh,
            claims: PhantomData,
        }
    }
}

impl<C: Serialize + DeserializeOwned + Send> TokenCache<C> {
    /// A token cache over `cache`: entries live at most 300 s and end 30 s before their
    /// token expires.
    pub fn new(cache: Arc<dyn CacheService>) -> Self {
        TokenCache {
            cache,
            digest_key: None,
            max_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            skew: DEFAULT_TOKEN_SKEW,
            load_timeout: crate::load::DEFAULT_LOAD_TIMEOUT,
            eager_refresh: None,
            claims: PhantomData,
        }
    }

    /// Keys entries by HMAC-SHA256(`key`, token) instead of SHA-256(token), so that someone
    /// with a copy of the cache's keys (a Redis dump, `MONITOR`) cannot test guessed tokens
    /// offline without also having `key`. Every instance that shares the cache must use the
    /// same key (changing it orphans the entries, which then expire). At least
    /// [`MIN_DIGEST_KEY_LEN`] bytes; 32 random bytes recommended. The key is zeroed in memory
    /// when the last clone of this cache drops.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{MokaCacheService, TokenCache};
    ///
    /// let secret = [7u8; 32]; // from your secret store
    /// let tokens: TokenCache<String> = TokenCache::new(Arc::new(MokaCacheService::default()))
    ///     .with_digest_key(&secret)?;
    /// assert_ne!(tokens.key_for("api-key-1"), cachet::token::token_key("api-key-1"));
    /// assert!(TokenCache::<String>::new(Arc::new(MokaCacheService::default()))
    ///     .with_digest_key(b"short")
    ///     .is_err());
    /// # Ok::<(), cachet::CacheError>(())
    /// ```
    pub fn with_digest_key(mut self, key: &[u8]) -> Result<Self, CacheError> {
        keyed_token_key(key, "")?;
        self.digest_key = Some(Arc::new(Zeroizing::new(key.to_vec())));
        Ok(self)
    }

    /// The cache key this cache uses for `token`.
    pub fn key_for(&self, token: &str) -> String {
        match &self.digest_key {
            // Invariant: `with_digest_key`, the only way to set the key, checked its length.
            Some(key) => keyed_token_key(key, token).expect("checked by with_digest_key"),
            None => token_key(token),
        }
    }

    /// The longest an entry lives, in seconds (at least 1).
    pub fn max_ttl_secs(mut self, secs: u64) -> Self {
        self.max_ttl_secs = secs.max(1);
        self
    }

    /// How long before the token's expiry its entry ends.
    pub fn skew(mut self, skew: Duration) -> Self {
        self.skew = skew;
        self
    }

    /// The longest one validation may take (default 30 s).
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// Eager refresh of cached tokens ([`LoadOptions::eager_refresh`]): a lookup of a token
    /// whose entry is past `fraction` (in `(0, 1)`) of its TTL revalidates it, once in the
    /// fleet, while every other lookup is answered from the cache. The validation future
    /// is the caller's (it may borrow), so the one caller that claims the refresh runs it
    /// before it returns. A refreshed entry's TTL is bounded by the token's expiry, as
    /// every entry's is, so a refresh never keeps a token past it.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cachet::{MokaCacheService, TokenCache};
    ///
    /// let tokens: TokenCache<String> =
    ///     TokenCache::new(Arc::new(MokaCacheService::default())).eager_refresh(0.8);
    /// # let _ = tokens;
    /// ```
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(fraction);
        self
    }

    /// How long an entry for a token expiring at `expires_at` may live, in whole seconds:
    /// `None` when the token is within the skew of its expiry (do not cache it).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use cachet::{MokaCacheService, TokenCache};
    ///
    /// let tokens: TokenCache<String> = TokenCache::new(std::sync::Arc::new(MokaCacheService::default()));
    /// let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
    /// assert_eq!(tokens.ttl_for(in_an_hour), Some(300));             // the configured maximum
    /// let soon = SystemTime::now() + Duration::from_secs(100);
    /// assert!(matches!(tokens.ttl_for(soon), Some(69..=70)));        // expiry - 30 s skew
    /// assert_eq!(tokens.ttl_for(SystemTime::now() + Duration::from_secs(20)), None);
    /// ```
    pub fn ttl_for(&self, expires_at: SystemTime) -> Option<u64> {
        let left = expires_at.duration_since(SystemTime::now()).ok()?;
        let usable = left.checked_sub(self.skew)?.as_secs();
        (usable >= 1).then(|| usable.min(self.max_ttl_secs))
    }

    /// The cached claims of `token`, if any.
    pub async fn get(&self, token: &str) -> Result<Option<C>, CacheError> {
        self.cache.get::<C>(&self.key_for(token)).await
    }

    /// Caches `claims` for `token`; `Ok(false)` when the token is too close to its expiry to
    /// be cached.
    pub async fn insert(
        &self,
        token: &str,
        claims: &C,
        expires_at: SystemTime,
    ) -> Result<bool, CacheError> {
        let Some(ttl) = self.ttl_for(expires_at) else {
            return Ok(false);
        };
        self.cache
            .set(&self.key_for(token), claims, Some(ttl))
            .await?;
        Ok(true)
    }

    /// The cached claims of `token`, or else `validate`'s verdict: a [`ValidToken`] is cached
    /// (for [`ttl_for`](Self::ttl_for) its expiry) and its claims returned; `Ok(None)` (an
    /// invalid token) is returned and not cached; an error is returned and not cached.
    /// Concurrent calls with one token validate it once per instance.
    pub async fn get_or_validate<E, Fut>(
        &self,
        token: &str,
        validate: Fut,
    ) -> Result<Option<C>, LoadError<E>>
    where
        E: Send + Sync + 'static,
        Fut: Future<Output = Result<Option<ValidToken<C>>, E>> + Send,
    {
        let mut options = LoadOptions::default()
            .ttl_secs(self.max_ttl_secs)
            .load_timeout(self.load_timeout);
        if let Some(fraction) = self.eager_refresh {
            options = options.eager_refresh(fraction);
        }
        let key = self.key_for(token);
        let first_read = self.cache.get_bytes_now(&key);
        let validate = || async {
            let verdict = validate.await?;
            Ok(verdict.map(|valid| {
                let ttl = match self.ttl_for(valid.expires_at) {
                    Some(secs) => LoadTtl::Secs(secs),
                    None => LoadTtl::DontStore,
                };
                (valid.claims, ttl)
            }))
        };
        let (result, refresh) =
            crate::load::load(&*self.cache, &key, &options, first_read, validate).await;
        if let Some(validate) = refresh {
            crate::load::aside::refresh_inline(&*self.cache, &key, &options, validate).await;
        }
        Ok(result?.value)
    }

    /// Removes `token`'s entry (a logout, a revoked key).
    pub async fn invalidate(&self, token: &str) -> Result<(), CacheError> {
        let key = self.key_for(token);
        // A validation running meanwhile must not cache the token again.
        crate::load::invalidate_in_flight(&*self.cache, &key);
        self.cache.invalidate(&key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_sha256_of_the_token() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            token_key("abc"),
            "token:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
