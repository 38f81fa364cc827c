//! Reading a Redis configuration: the URL (its scheme checked), the server label errors
//! name, a URL with its password hidden, and a TLS configuration from PEM roots.

use std::sync::Arc;

use fred::prelude::{Config, ServerConfig};

use crate::{BoxError, CacheError};

/// `url` with any password replaced by `***`, for messages and logs: whatever precedes the
/// last `@` (credentials, or a typo around them) and the value of every query parameter
/// whose name contains `pass`. Every message and `Debug` output of cachet goes through it;
/// apps that log their Redis URL can too.
///
/// ```
/// use cachet::redact_url;
///
/// assert_eq!(redact_url("redis://user:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redact_url("redis:/:hunter2@cache"), "***@cache"); // a typo: all of it goes
/// assert_eq!(
///     redact_url("redis-sentinel://s:26379/mymaster?sentinelPassword=hunter2"),
///     "redis-sentinel://s:26379/mymaster?sentinelPassword=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    // Whatever precedes the last `@` is credentials (or a typo around them): all of it goes,
    // but a well-formed scheme stays, for a readable message.
    let rest = match url.rfind('@') {
        Some(at) => {
            let scheme = url
                .find("://")
                .filter(|&end| end < at)
                .filter(|&end| {
                    url[..end]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
                })
                .map_or("", |end| &url[..end + 3]);
            format!("{scheme}***{}", &url[at..])
        }
        None => url.to_owned(),
    };
    // Query parameters that carry a password (`sentinelPassword=`, `password=`).
    match rest.split_once('?') {
        Some((head, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("pass") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{head}?{}", query.join("&"))
        }
        None => rest,
    }
}

/// The URL schemes a Redis connection accepts (anything else is refused before connecting).
const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
    "valkey-cluster",
    "valkeys-cluster",
    "valkey-sentinel",
    "valkeys-sentinel",
];

/// The `fred` configuration `url` describes; [`CacheError::Config`] for an unknown scheme or
/// a URL `fred` cannot read (the message shows the URL redacted).
pub(super) fn parse_url(url: &str) -> Result<Config, CacheError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !scheme.is_some_and(|s| SCHEMES.contains(&s.to_ascii_lowercase().as_str())) {
        return Err(CacheError::config(
            format!(
                "invalid Redis URL {}: the scheme must be one of {}",
                redact_url(url),
                SCHEMES.join(", ")
            ),
            None,
        ));
    }
    Config::from_url(url).map_err(|e| {
        CacheError::config(
            format!("invalid Redis URL {}", redact_url(url)),
            Some(Box::new(e)),
        )
    })
}

/// A TLS configuration that trusts exactly the certificates in `pem`.
pub(super) fn tls_with_roots(pem: &[u8]) -> Result<fred::types::config::TlsConfig, CacheError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let bad = |what: &str, e: BoxError| CacheError::config(format!("TLS roots: {what}"), Some(e));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad("unreadable PEM", Box::new(e)))?;
        roots
            .add(cert)
            .map_err(|e| bad("unusable certificate", Box::new(e)))?;
    }
    if roots.is_empty() {
        return Err(CacheError::config(
            "TLS roots: no certificate in the PEM",
            None,
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", Box::new(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(fred::types::config::TlsConnector::from(client).into())
}

/// The server(s) of a config, as messages name them.
pub(super) fn describe_server(config: &Config) -> String {
    let scheme = if config.tls.is_some() {
        "rediss"
    } else {
        "redis"
    };
    match &config.server {
        ServerConfig::Centralized { server } => {
            format!("{scheme}://{}:{}", server.host, server.port)
        }
        ServerConfig::Clustered { hosts, .. } => {
            let hosts: Vec<String> = hosts
                .iter()
                .map(|h| format!("{}:{}", h.host, h.port))
                .collect();
            format!("{scheme}-cluster://{}", hosts.join(","))
        }
        ServerConfig::Sentinel {
            hosts,
            service_name,
            ..
        } => {
            let hosts: Vec<String> = hosts
                .iter()
                .map(|h| format!("{}:{}", h.host, h.port))
                .collect();
            format!(
                "{scheme}-sentinel://{} (service {service_name})",
                hosts.join(",")
            )
        }
        #[allow(unreachable_patterns)]
        _ => format!("{scheme} server"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_and_password_parameters_never_show() {
        for (url, shown) in [
            ("redis://user:pw@host:6379/0", "redis://***@host:6379/0"),
            ("redis://:pw@host", "redis://***@host"),
            ("redis:/:pw@host", "***@host"),
            ("user:pw@host", "***@host"),
            ("redis//:pw@h", "***@h"),
            ("redis://:p@w@host", "redis://***@host"),
            ("redis://host:6379", "redis://host:6379"),
            (
                "redis-sentinel://h:26379/m?sentinelPassword=pw&x=1",
                "redis-sentinel://h:26379/m?sentinelPassword=***&x=1",
            ),
            ("redis://h/0?password=pw", "redis://h/0?password=***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
