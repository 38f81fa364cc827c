//! One connection to a Redis deployment (a `fred` client or pool, the server label errors
//! name, the timeouts), shared by everything cachet runs on it: the cache
//! ([`RedisCacheService`](super::RedisCacheService)), the tiered cache's L2, and the locks
//! ([`RedisConcurrencyService`](crate::RedisConcurrencyService)).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Error as RedisError, Pool, ReconnectPolicy};

use super::config::{describe_server, parse_url, redact_url, tls_with_roots};
use crate::{BoxError, CacheError};

/// Default time allowed to connect (TCP, TLS, `AUTH`) before the service fails to build.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one command, reconnection waits included.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A live connection to a Redis (or Valkey) deployment: one auto-pipelined `fred` client or
/// a pool, with its timeouts and the server label errors name (never a password).
///
/// Cloning is cheap and every clone shares the same connections; they close when the last
/// clone (or service built on it) is dropped. Build one and share it, so that the cache and
/// the locks of an app use one pool:
///
/// ```no_run
/// use std::time::Duration;
/// use cachet::backend::redis::RedisConnection;
/// use cachet::{ConcurrencyServiceExt, RedisCacheService, RedisConcurrencyService};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = RedisConnection::builder("redis://127.0.0.1:6379")
///     .command_timeout(Duration::from_millis(500))
///     .connect()
///     .await?;
/// let cache = RedisCacheService::from_connection(connection.clone(), 300)?;
/// let locks = RedisConcurrencyService::from_connection(connection);
/// locks.with_lock("nightly-report", async { /* ... */ }).await?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Clients,
    /// What errors name: the server(s), never a password.
    server: Arc<str>,
    clustered: bool,
    connect_timeout: Duration,
    command_timeout: Duration,
    /// The settings the connection was made with, for the further connections a user of
    /// it opens itself (the tiered cache's subscriber and tracking connections).
    template: Builder,
}

enum Clients {
    Single(Client),
    Pool(Pool),
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the connections (and stop reconnecting) when the last handle goes away.
        let clients = match &self.clients {
            Clients::Single(client) => vec![client.clone()],
            Clients::Pool(pool) => pool.clients().to_vec(),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for client in clients {
                    let _ = client.quit().await;
                }
            });
        }
    }
}

impl RedisConnection {
    /// Connects to `redis_url` with the defaults (one client, connect timeout 5 s, command
    /// timeout 2 s). A malformed URL is [`CacheError::Config`]; a server that cannot be
    /// reached within the connect timeout is [`CacheError::Backend`] naming it.
    pub async fn connect(redis_url: &str) -> Result<Self, CacheError> {
        Self::builder(redis_url).connect().await
    }

    /// A builder for `redis_url` with the defaults.
    ///
    /// ```
    /// use cachet::backend::redis::RedisConnection;
    ///
    /// let builder = RedisConnection::builder("redis://127.0.0.1:6379").pool_size(2);
    /// # let _ = builder;
    /// ```
    pub fn builder(redis_url: impl Into<String>) -> RedisConnectionBuilder {
        RedisConnectionBuilder {
            url: redis_url.into(),
            pool_size: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
            reconnect_max_attempts: 0,
            tls_root_certificates_pem: None,
        }
    }

    /// The server(s) this connection talks to, as errors name them.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The server label, shared: what every error of this connection carries.
    pub(crate) fn server_label(&self) -> Arc<str> {
        Arc::clone(&self.inner.server)
    }

    /// Whether the deployment is a Redis Cluster.
    pub fn is_clustered(&self) -> bool {
        self.inner.clustered
    }

    /// How long one command may take before it is an error.
    pub fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }

    /// The underlying `fred` client (the pool's next one, if a pool is configured), for
    /// commands cachet does not wrap.
    pub fn client(&self) -> &Client {
        match &self.inner.clients {
            Clients::Single(client) => client,
            Clients::Pool(pool) => pool.next(),
        }
    }

    /// Every connection's client (one, or the pool's).
    pub(crate) fn clients(&self) -> Vec<Client> {
        match &self.inner.clients {
            Clients::Single(client) => vec![client.clone()],
            Clients::Pool(pool) => pool.clients().to_vec(),
        }
    }

    /// A `fred` builder with this connection's settings, for a further connection of the
    /// caller's own (a subscriber, a tracking redirect target).
    pub(crate) fn fred_builder(&self) -> Builder {
        self.inner.template.clone()
    }

    /// The bound on connecting: the connect timeout plus one command.
    pub(crate) fn connect_bound(&self) -> Duration {
        self.inner.connect_timeout + self.inner.command_timeout
    }

    /// Whether `self` and `other` are clones of one connection.
    pub fn same_connection(&self, other: &RedisConnection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pool_size = match &self.inner.clients {
            Clients::Single(_) => 1,
            Clients::Pool(pool) => pool.size(),
        };
        f.debug_struct("RedisConnection")
            .field("server", &self.inner.server)
            .field("clustered", &self.inner.clustered)
            .field("pool_size", &pool_size)
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("command_timeout", &self.inner.command_timeout)
            .finish()
    }
}

/// Builds a [`RedisConnection`]; every setting has a default.
///
/// ```no_run
/// use std::time::Duration;
/// use cachet::backend::redis::RedisConnection;
///
/// # #[tokio::main] async fn main() -> Result<(), cachet::CacheError> {
/// let connection = RedisConnection::builder("rediss://cache:secret@10.0.0.1:6380/0")
///     .pool_size(2)
///     .connect_timeout(Duration::from_secs(2))
///     .command_timeout(Duration::from_millis(250))
///     .reconnect_backoff(Duration::from_millis(20), Duration::from_secs(1))
///     .connect()
///     .await?;
/// # let _ = connection; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnectionBuilder {
    url: String,
    pool_size: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
    reconnect_min_delay: Duration,
    reconnect_max_delay: Duration,
    reconnect_max_attempts: u32,
    tls_root_certificates_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RedisConnectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnectionBuilder")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConnectionBuilder {
    /// Connections: 1 (the default) is one auto-pipelined client, which measured fastest;
    /// more builds a round-robin `fred` pool.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Time allowed to connect when the connection is built and on each reconnection
    /// (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for each command, including waiting for a reconnection (default 2 s);
    /// past it the call fails with [`CacheError::Backend`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Reconnection delays: exponential from `min` to `max` (defaults 50 ms, 2 s), with
    /// jitter, forever unless [`reconnect_max_attempts`](Self::reconnect_max_attempts).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max.max(min);
        self
    }

    /// Stop reconnecting after this many failed attempts in a row (default 0: never stop).
    pub fn reconnect_max_attempts(mut self, attempts: u32) -> Self {
        self.reconnect_max_attempts = attempts;
        self
    }

    /// Trusts the CA certificate(s) in `pem` (PEM text) instead of the system's roots, for a
    /// `rediss://` server whose certificate a private CA signed. Needs a TLS URL.
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificates_pem = Some(pem.into());
        self
    }

    /// Checks the settings and makes the `fred` builder they describe, with the server
    /// label and whether it is a cluster.
    fn fred_builder(&self) -> Result<(Builder, String, bool), CacheError> {
        if self.command_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(CacheError::config(
                "timeouts must be longer than zero",
                None,
            ));
        }
        let mut config = parse_url(&self.url)?;
        if let Some(pem) = &self.tls_root_certificates_pem {
            if config.tls.is_none() {
                return Err(CacheError::config(
                    format!(
                        "TLS root certificates were given, but {} is not a TLS URL (rediss://)",
                        redact_url(&self.url)
                    ),
                    None,
                ));
            }
            config.tls = Some(tls_with_roots(pem)?);
        }
        let server = describe_server(&config);
        let clustered = config.server.is_clustered();

        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let policy = ReconnectPolicy::new_exponential(
            self.reconnect_max_attempts,
            millis(self.reconnect_min_delay),
            millis(self.reconnect_max_delay),
            2,
        );
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| {
                perf.default_command_timeout = self.command_timeout;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = self.connect_timeout;
                conn.internal_command_timeout = self.command_timeout.max(self.connect_timeout);
            })
            .set_policy(policy);
        Ok((builder, server, clustered))
    }

    /// Parses the URL, connects, and checks the server answers.
    pub async fn connect(self) -> Result<RedisConnection, CacheError> {
        let (template, server, clustered) = self.fred_builder()?;
        let config_error = |e: RedisError| {
            CacheError::config(
                format!("cannot configure a client for {server}"),
                Some(Box::new(e)),
            )
        };
        let clients = if self.pool_size > 1 {
            Clients::Pool(template.build_pool(self.pool_size).map_err(config_error)?)
        } else {
            Clients::Single(template.build().map_err(config_error)?)
        };
        let connect = async {
            match &clients {
                Clients::Single(client) => client.init().await.map(drop),
                Clients::Pool(pool) => pool.init().await.map(drop),
            }
        };
        // `init` gives up on the first failed attempt; the outer bound also covers a server
        // that accepts the connection and then never answers.
        let bound = self.connect_timeout + self.command_timeout;
        let connected = match tokio::time::timeout(bound, connect).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Box::new(e) as BoxError),
            Err(_) => Err(format!("no connection within {bound:?}").into()),
        };
        let connection = RedisConnection {
            inner: Arc::new(Inner {
                clients,
                server: server.into(),
                clustered,
                connect_timeout: self.connect_timeout,
                command_timeout: self.command_timeout,
                template,
            }),
        };
        // On failure, dropping `connection` closes the half-open client.
        connected
            .map_err(|source| CacheError::backend(connection.server(), "connect", "", source))?;
        Ok(connection)
    }
}
