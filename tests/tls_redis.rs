//! `rediss://`: a real redis-server with a TLS port, its certificate signed by a CA these
//! tests make with `openssl`, and the client trusting that CA.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cachet::{CacheError, RedisCacheService};
use support::{RedisServer, free_port};

struct TlsServer {
    server: RedisServer,
    tls_port: u16,
    ca_pem: Vec<u8>,
    _certs: CertDir,
}

/// Removes the certificates when the test binary's static is dropped (or a test panics).
struct CertDir(PathBuf);

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl is needed for the TLS tests (apt-get install -y openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate for 127.0.0.1 signed by it.
fn make_certs() -> CertDir {
    let dir =
        std::env::temp_dir().join(format!("cachet-tls-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let subj = |cn: &str| format!("/CN={cn}");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            &subj("cachet test CA"),
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &subj("127.0.0.1"),
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    CertDir(dir)
}

fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certs = make_certs();
        let path = |f: &str| certs.0.join(f).display().to_string();
        let tls_port = free_port();
        let server = RedisServer::start_with(
            &support::binaries::redis_server(),
            &[
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cert-file",
                &path("server.crt"),
                "--tls-key-file",
                &path("server.key"),
                "--tls-ca-cert-file",
                &path("ca.crt"),
                "--tls-auth-clients",
                "no",
            ],
        );
        let ca_pem = std::fs::read(certs.0.join("ca.crt")).unwrap();
        TlsServer {
            server,
            tls_port,
            ca_pem,
            _certs: certs,
        }
    })
}

async fn tls_cache() -> RedisCacheService {
    let s = tls_server();
    RedisCacheService::builder(format!("rediss://127.0.0.1:{}", s.tls_port))
        .tls_root_certificates_pem(s.ca_pem.clone())
        .build()
        .await
        .expect("TLS connection with the test CA")
}

mod over_tls {
    cachet::conformance_tests!(super::tls_cache().await);
}

#[tokio::test]
async fn what_goes_over_tls_is_in_the_server() {
    use cachet::CacheServiceExt;
    let cache = tls_cache().await;
    cache.set("tls:k", &"over tls", None).await.unwrap();
    assert_eq!(
        tls_server().server.cli(&["GET", "tls:k"]).trim(),
        "\"over tls\""
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    // Only the system roots: the test CA is not among them.
    let url = format!("rediss://127.0.0.1:{}", tls_server().tls_port);
    let result = RedisCacheService::builder(&url)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await;
    assert!(
        matches!(result, Err(CacheError::Backend { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn plain_text_to_the_tls_port_fails_within_the_bound() {
    let url = format!("redis://127.0.0.1:{}", tls_server().tls_port);
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        RedisCacheService::builder(&url)
            .connect_timeout(Duration::from_secs(1))
            .command_timeout(Duration::from_secs(1))
            .build(),
    )
    .await
    .expect("no hang");
    assert!(
        matches!(result, Err(CacheError::Backend { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn roots_without_a_tls_url_or_without_certificates_are_config_errors() {
    let s = tls_server();
    let plain = RedisCacheService::builder(s.server.url())
        .tls_root_certificates_pem(s.ca_pem.clone())
        .build()
        .await;
    assert!(matches!(plain, Err(CacheError::Config { .. })), "{plain:?}");
    let empty = RedisCacheService::builder(format!("rediss://127.0.0.1:{}", s.tls_port))
        .tls_root_certificates_pem(b"not a certificate".to_vec())
        .build()
        .await;
    assert!(matches!(empty, Err(CacheError::Config { .. })), "{empty:?}");
}
