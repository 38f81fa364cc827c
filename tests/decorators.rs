//! The two decorators, `EncryptedCacheService` and `NamespacedCacheService`: the conformance
//! suite through each of them (over moka, over a real redis-server, stacked, and through
//! `Arc<dyn CacheService>`), then what only they promise, checked by reading and writing
//! Redis directly: no secret in the stored bytes, values bound to their key, tampering and
//! unknown keys detected, key rotation, and namespaces that cannot reach each other.
//!
//! One standalone redis-server is shared by the tests of this binary (each test has its own
//! key prefix); tests that count every key on a server start a private one.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use cachet::conformance::unique_prefix;
use cachet::{
    CacheError, CacheService, CacheServiceExt, EncryptedCacheService, EncryptedEnvelope,
    EncryptionKey, EncryptionKeys, MokaCacheService, NamespacedCacheService, RedisCacheService,
};
use serde::{Deserialize, Serialize};
use support::RedisServer;

async fn connect(url: String) -> RedisCacheService {
    match RedisCacheService::new(&url, 300).await {
        Ok(service) => service,
        Err(e) => panic!("cannot connect to {url}: {e}"),
    }
}

async fn redis() -> RedisCacheService {
    connect(RedisServer::shared().url()).await
}

const KEY_1: [u8; 32] = [0x11; 32];
const KEY_2: [u8; 32] = [0x22; 32];

fn keys() -> EncryptionKeys {
    EncryptionKeys::new(1, KEY_1)
}

fn encrypted<S: CacheService>(inner: S) -> EncryptedCacheService<S> {
    EncryptedCacheService::new(inner, keys())
}

fn namespaced<S: CacheService>(inner: S, namespace: &str) -> NamespacedCacheService<S> {
    match NamespacedCacheService::new(inner, namespace) {
        Ok(service) => service,
        Err(e) => panic!("namespace {namespace:?}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// The conformance suite through the decorators.

mod encrypted_moka {
    cachet::conformance_tests!(super::encrypted(cachet::MokaCacheService::default()));
}

mod namespaced_moka {
    cachet::conformance_tests!(super::namespaced(
        cachet::MokaCacheService::default(),
        "tenant-a"
    ));
}

mod encrypted_redis {
    cachet::conformance_tests!(super::encrypted(super::redis().await));
}

mod namespaced_redis {
    cachet::conformance_tests!(super::namespaced(super::redis().await, "tenant-a"));
}

/// Encryption outside the namespace: `encrypted(namespaced(redis))`.
mod encrypted_namespaced_redis {
    cachet::conformance_tests!(super::encrypted(super::namespaced(
        super::redis().await,
        "tenant-b"
    )));
}

/// Encryption inside the namespace, the order the docs recommend: `namespaced(encrypted(redis))`.
mod namespaced_encrypted_redis {
    cachet::conformance_tests!(super::namespaced(
        super::encrypted(super::redis().await),
        "tenant-c"
    ));
}

/// `Arc<dyn CacheService>` inside and outside: the decorator wraps a trait object and is one.
mod encrypted_arc_dyn {
    use std::sync::Arc;

    use cachet::CacheService;

    cachet::conformance_tests!(Arc::new(super::encrypted(
        Arc::new(super::redis().await) as Arc<dyn CacheService>
    )) as Arc<dyn CacheService>);
}

mod namespaced_arc_dyn {
    use std::sync::Arc;

    use cachet::CacheService;

    cachet::conformance_tests!(Arc::new(super::namespaced(
        Arc::new(super::redis().await) as Arc<dyn CacheService>,
        "tenant-d"
    )) as Arc<dyn CacheService>);
}

// ---------------------------------------------------------------------------------------
// Helpers that read and write Redis directly.

/// The raw bytes stored under `key`, read with a plain `GET` on a new connection.
fn raw_get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    server
        .query(&["GET", key])
        .unwrap_or_else(|e| panic!("GET {key:?}: {e}"))
}

/// Every key on `server` that starts with `prefix` (which must hold no glob characters), by
/// a `SCAN` loop, with its raw value.
fn raw_entries(server: &RedisServer, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let pattern = format!("{prefix}*");
    let mut cursor = "0".to_owned();
    let mut entries = Vec::new();
    loop {
        let (next, keys): (String, Vec<String>) = server
            .query(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
            .unwrap_or_else(|e| panic!("SCAN: {e}"));
        cursor = next;
        for key in keys {
            if let Some(value) = raw_get(server, &key) {
                entries.push((key, value));
            }
        }
        if cursor == "0" {
            return entries;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The error of a read that must fail an integrity check (the value does not decrypt), as
/// text.
fn integrity_error<T: std::fmt::Debug>(result: Result<T, CacheError>) -> String {
    match result {
        Err(e @ CacheError::Integrity { .. }) => e.to_string(),
        other => panic!("expected CacheError::Integrity, got {other:?}"),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgSecrets {
    slug: String,
    client_id: String,
    client_secret: String,
}

const SECRET: &str = "sk_live_9f8e7d6c5b4a-very-secret";

fn secrets(slug: &str) -> OrgSecrets {
    OrgSecrets {
        slug: slug.to_owned(),
        client_id: format!("client-{slug}"),
        client_secret: SECRET.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Encryption.

#[tokio::test]
async fn the_secret_is_nowhere_in_redis_and_round_trips() {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    let server = RedisServer::shared();
    let prefix = unique_prefix("secret");
    let cache = encrypted(redis().await);
    for slug in ["acme", "globex", "initech"] {
        let key = format!("{prefix}org:{slug}:secrets");
        cache.set(&key, &secrets(slug), None).await.unwrap();
    }
    cache
        .set(&format!("{prefix}raw"), SECRET, Some(60))
        .await
        .unwrap();

    let entries = raw_entries(server, &prefix);
    assert_eq!(
        entries.len(),
        4,
        "every write is one Redis key under its name"
    );
    let secret = SECRET.as_bytes();
    let encodings: Vec<Vec<u8>> = vec![
        secret.to_vec(),
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
        secret
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
            .into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        b"very-secret".to_vec(),
        b"client-acme".to_vec(),
        b"client_secret".to_vec(),
    ];
    for (key, value) in &entries {
        for needle in &encodings {
            assert!(
                !contains(value, needle),
                "{key}: stored bytes contain {:?}",
                String::from_utf8_lossy(needle)
            );
        }
        let envelope = EncryptedEnvelope::parse(key, &Bytes::copy_from_slice(value)).unwrap();
        assert_eq!(envelope.key_id(), 1, "{key}");
        assert_eq!(&value[..3], b"CS\x02", "{key}: magic and version");
    }

    for slug in ["acme", "globex", "initech"] {
        let key = format!("{prefix}org:{slug}:secrets");
        assert_eq!(
            cache.get::<OrgSecrets>(&key).await.unwrap(),
            Some(secrets(slug))
        );
    }
    assert_eq!(
        cache
            .get::<String>(&format!("{prefix}raw"))
            .await
            .unwrap()
            .as_deref(),
        Some(SECRET)
    );
    let ttl: i64 = server
        .cli(&["TTL", &format!("{prefix}raw")])
        .trim()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&ttl), "the TTL passes through: {ttl}");
}

#[tokio::test]
async fn a_value_copied_to_another_key_does_not_decrypt() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("copied");
    let inner = redis().await;
    let cache = encrypted(inner.clone());
    let acme = format!("{prefix}org:acme:secrets");
    cache.set(&acme, &secrets("acme"), None).await.unwrap();
    let original = raw_get(server, &acme).unwrap();
    assert_eq!(&original[..3], b"CS\x02", "a version 2 envelope");

    // Copied on the server (binary safe), as someone with access to Redis could.
    let by_server = format!("{prefix}org:evil:secrets");
    assert_eq!(server.command(&["COPY", &acme, &by_server]).unwrap(), "1");
    let msg = integrity_error(cache.get::<OrgSecrets>(&by_server).await);
    assert!(msg.contains("org:evil:secrets"), "names the key: {msg}");
    assert!(msg.contains("authentication failed with key id 1"), "{msg}");
    assert_eq!(
        raw_get(server, &by_server).unwrap(),
        original,
        "left untouched"
    );

    // Copied through the inner service: raw GET, raw SET.
    let by_client = format!("{prefix}org:acme:secrets2");
    let raw = inner.get_bytes(&acme).await.unwrap().unwrap();
    inner.set_bytes(&by_client, raw, None).await.unwrap();
    integrity_error(cache.get_bytes(&by_client).await);
    integrity_error(cache.get::<OrgSecrets>(&by_client).await);
    assert_eq!(
        raw_get(server, &by_client).unwrap(),
        original,
        "left untouched"
    );

    assert_eq!(
        cache.get::<OrgSecrets>(&acme).await.unwrap(),
        Some(secrets("acme")),
        "the original still reads"
    );
}

#[tokio::test]
async fn one_flipped_byte_anywhere_fails_and_stays_stored() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("flipped");
    let inner = redis().await;
    let cache = encrypted(inner.clone());
    let key = format!("{prefix}org:acme");
    cache.set(&key, &secrets("acme"), None).await.unwrap();
    let original = raw_get(server, &key).unwrap();
    let len = original.len();
    // magic, version, key id, expiry, nonce, first ciphertext byte, middle, last tag byte
    for position in [0, 1, 2, 3, 6, 7, 14, 15, 26, 27, len / 2, len - 16, len - 1] {
        let mut flipped = original.clone();
        flipped[position] ^= 0x01;
        inner
            .set_bytes(&key, Bytes::from(flipped.clone()), None)
            .await
            .unwrap();
        let msg = integrity_error(cache.get::<OrgSecrets>(&key).await);
        assert!(msg.contains("org:acme"), "byte {position}: {msg}");
        assert_eq!(
            raw_get(server, &key).unwrap(),
            flipped,
            "byte {position} untouched"
        );
    }
    inner
        .set_bytes(&key, Bytes::from(original), None)
        .await
        .unwrap();
    assert_eq!(
        cache.get::<OrgSecrets>(&key).await.unwrap(),
        Some(secrets("acme"))
    );
}

#[tokio::test]
async fn garbage_truncated_and_plaintext_values_are_integrity_errors() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("garbage");
    let plain = redis().await;
    let cache = encrypted(plain.clone());

    // Written before encryption was turned on: plain JSON.
    let legacy = format!("{prefix}legacy");
    plain.set(&legacy, &secrets("acme"), None).await.unwrap();
    let msg = integrity_error(cache.get::<OrgSecrets>(&legacy).await);
    assert!(msg.contains("magic"), "{msg}");

    // Garbage written with redis-cli.
    let garbage = format!("{prefix}garbage");
    server.cli(&["SET", &garbage, "CS\u{1}this is not a real envelope at all"]);
    integrity_error(cache.get_bytes(&garbage).await);
    assert_eq!(
        raw_get(server, &garbage).unwrap(),
        b"CS\x01this is not a real envelope at all"
    );

    // A real envelope cut short, at the server (SETRANGE cannot shorten; GETRANGE + SET).
    let whole = format!("{prefix}whole");
    cache.set(&whole, &secrets("acme"), None).await.unwrap();
    let bytes = raw_get(server, &whole).unwrap();
    for cut in [0, 2, 18, 19, 34, bytes.len() - 1] {
        let key = format!("{prefix}cut:{cut}");
        plain
            .set_bytes(&key, Bytes::copy_from_slice(&bytes[..cut]), None)
            .await
            .unwrap();
        let msg = integrity_error(cache.get::<OrgSecrets>(&key).await);
        assert!(msg.contains(&format!("cut:{cut}")), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------
// Authenticated expiry: the replay of a saved value after it expired.

/// A plain client of the `redis` crate, for binary-safe raw commands.
async fn plain_client(server: &RedisServer) -> redis::aio::ConnectionManager {
    match redis::Client::open(server.url()) {
        Ok(client) => match client.get_connection_manager().await {
            Ok(connection) => connection,
            Err(e) => panic!("redis crate cannot connect: {e}"),
        },
        Err(e) => panic!("redis crate: {e}"),
    }
}

/// `SET key bytes`, with no TTL, as someone with write access to Redis could.
async fn raw_set(conn: &mut redis::aio::ConnectionManager, key: &str, bytes: &[u8]) {
    redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .query_async::<()>(conn)
        .await
        .unwrap_or_else(|e| panic!("SET {key:?}: {e}"));
}

/// Waits (at most 10 s) until the server has expired `key`.
async fn wait_until_gone(server: &RedisServer, key: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.cli(&["EXISTS", key]).trim() != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} did not expire within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn server_ttl(server: &RedisServer, key: &str) -> i64 {
    let text = server.cli(&["TTL", key]);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("TTL {key}: {text:?}: {e}"))
}

/// The attack the authenticated expiry exists for: the encrypted bytes of a value saved
/// while it was valid and written back, without a TTL, after it expired. Before envelope
/// version 2 they decrypted and were served forever.
#[tokio::test]
async fn an_expired_value_written_back_without_a_ttl_is_a_miss_on_redis() {
    let server = RedisServer::shared();
    let key = format!("{}org:acme:secrets", unique_prefix("replay"));
    let inner = redis().await;
    let cache = encrypted(inner.clone());
    cache.set(&key, &secrets("acme"), Some(1)).await.unwrap();
    assert_eq!(
        cache.get::<OrgSecrets>(&key).await.unwrap(),
        Some(secrets("acme"))
    );
    let saved = raw_get(server, &key).unwrap();

    wait_until_gone(server, &key).await;
    let mut conn = plain_client(server).await;
    raw_set(&mut conn, &key, &saved).await;
    assert_eq!(server_ttl(server, &key), -1, "stored without a TTL");
    assert_eq!(raw_get(server, &key).unwrap(), saved);

    assert_eq!(
        cache.get::<OrgSecrets>(&key).await.unwrap(),
        None,
        "a replayed expired value must be a miss"
    );
    assert_eq!(cache.get_bytes(&key).await.unwrap(), None);
    assert_eq!(
        raw_get(server, &key).unwrap(),
        saved,
        "a read leaves it stored"
    );

    // Cache-aside over the replayed bytes: the lease replaces them as a miss, the loader
    // runs, and the fresh value is what is stored and read.
    let lease = match cache
        .lease(&key, &cachet::load::LeaseRequest::new())
        .await
        .unwrap()
    {
        cachet::load::LeaseRead::Granted(lease) => lease,
        other => panic!("expected the lease over an expired value, got {other:?}"),
    };
    let fresh = Bytes::from(serde_json::to_vec(&secrets("fresh")).unwrap());
    assert!(
        cache
            .set_leased(&key, &lease, fresh, Some(60))
            .await
            .unwrap()
    );
    assert_eq!(
        cache.get::<OrgSecrets>(&key).await.unwrap(),
        Some(secrets("fresh"))
    );
    let ttl = server_ttl(server, &key);
    assert!((55..=60).contains(&ttl), "the leased write's TTL: {ttl}");
    let stored = Bytes::from(raw_get(server, &key).unwrap());
    let expires = EncryptedEnvelope::parse(&key, &stored)
        .unwrap()
        .expires_at()
        .unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        (55..=60).contains(&left.as_secs()),
        "the leased write carries its expiry: {left:?}"
    );

    // get_or_load over replayed bytes loads.
    let other = format!("{}org:globex", unique_prefix("replay-load"));
    cache
        .set(&other, &secrets("globex"), Some(1))
        .await
        .unwrap();
    let saved = raw_get(server, &other).unwrap();
    wait_until_gone(server, &other).await;
    raw_set(&mut conn, &other, &saved).await;
    let loaded: OrgSecrets = cache
        .get_or_load(&other, Some(60), || async {
            Ok::<_, std::convert::Infallible>(secrets("loaded"))
        })
        .await
        .unwrap();
    assert_eq!(loaded, secrets("loaded"), "the loader ran");
    assert_eq!(
        cache.get::<OrgSecrets>(&other).await.unwrap(),
        Some(secrets("loaded"))
    );
}

/// The same replay on the in-memory backend (which has no "no TTL": a long one).
#[tokio::test]
async fn an_expired_value_written_back_is_a_miss_on_moka() {
    let moka = MokaCacheService::default();
    let cache = encrypted(moka.clone());
    cache
        .set("org:acme", &secrets("acme"), Some(1))
        .await
        .unwrap();
    let saved = moka.get_bytes("org:acme").await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while moka.get_bytes("org:acme").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "did not expire");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    moka.set_bytes("org:acme", saved.clone(), Some(86_400))
        .await
        .unwrap();
    assert_eq!(cache.get::<OrgSecrets>("org:acme").await.unwrap(), None);
    assert_eq!(
        cache.get_bytes_now("org:acme").transpose().unwrap(),
        Some(None),
        "the fast path too"
    );
    assert_eq!(moka.get_bytes("org:acme").await.unwrap(), Some(saved));
    let loaded: OrgSecrets = cache
        .get_or_load("org:acme", None, || async {
            Ok::<_, std::convert::Infallible>(secrets("loaded"))
        })
        .await
        .unwrap();
    assert_eq!(loaded, secrets("loaded"));
    assert_eq!(
        cache.get::<OrgSecrets>("org:acme").await.unwrap(),
        Some(secrets("loaded"))
    );
}

/// `None` seals the decorator's default TTL (300 s unless set), and passes `None` down.
#[tokio::test]
async fn the_default_ttl_is_sealed_and_the_inner_ttl_passes_through() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("default-ttl");
    let cache = encrypted(redis().await);
    let short = EncryptedCacheService::new(redis().await, keys())
        .with_default_ttl_secs(30)
        .unwrap();
    for (service, key, expected) in [
        (&cache, format!("{prefix}a"), 300),
        (&short, format!("{prefix}b"), 30),
    ] {
        service.set(&key, &1, None).await.unwrap();
        let stored = Bytes::from(raw_get(server, &key).unwrap());
        let expires = EncryptedEnvelope::parse(&key, &stored)
            .unwrap()
            .expires_at()
            .unwrap();
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((expected - 5..=expected).contains(&left), "{key}: {left}");
        let ttl = server_ttl(server, &key);
        assert!(
            (295..=300).contains(&ttl),
            "the server's own default: {ttl}"
        );
    }
    let err = cache
        .set(&format!("{prefix}zero"), &1, Some(0))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::InvalidArgument { .. }), "{err}");
}

#[tokio::test]
async fn changed_expiry_bytes_fail_authentication_and_stay_stored() {
    let server = RedisServer::shared();
    let key = format!("{}org:acme", unique_prefix("expiry-bytes"));
    let cache = encrypted(redis().await);
    cache.set(&key, &secrets("acme"), Some(60)).await.unwrap();
    let original = raw_get(server, &key).unwrap();
    let mut conn = plain_client(server).await;
    for new_expiry in [u64::MAX, 0, {
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&original[7..15]);
        u64::from_be_bytes(ms) + 1
    }] {
        let mut changed = original.clone();
        changed[7..15].copy_from_slice(&new_expiry.to_be_bytes());
        raw_set(&mut conn, &key, &changed).await;
        let msg = integrity_error(cache.get::<OrgSecrets>(&key).await);
        assert!(msg.contains("authentication failed with key id 1"), "{msg}");
        assert_eq!(raw_get(server, &key).unwrap(), changed, "left untouched");
    }
}

/// Values an earlier release wrote (envelope version 1, AES-256-GCM) still read, under the
/// key they were written for only; a keyring that refuses version 1 says so.
#[tokio::test]
async fn version_1_values_still_decrypt() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("v1");
    let inner = redis().await;
    let cache = encrypted(inner.clone());
    let key = format!("{prefix}org:acme");
    let json = serde_json::to_vec(&secrets("acme")).unwrap();
    let old = keys().encrypt_v1(&key, &json).unwrap();
    assert_eq!(&old[..3], b"CS\x01");
    inner.set_bytes(&key, old.clone(), Some(60)).await.unwrap();
    assert_eq!(
        cache.get::<OrgSecrets>(&key).await.unwrap(),
        Some(secrets("acme"))
    );
    // Moved to another key, it does not decrypt.
    let moved = format!("{prefix}org:evil");
    assert_eq!(server.command(&["COPY", &key, &moved]).unwrap(), "1");
    let msg = integrity_error(cache.get::<OrgSecrets>(&moved).await);
    assert!(msg.contains("authentication failed with key id 1"), "{msg}");
    // Refused once version-1 reads are off.
    let strict = EncryptedCacheService::new(inner.clone(), keys().accept_v1(false));
    let msg = integrity_error(strict.get::<OrgSecrets>(&key).await);
    assert!(msg.contains("version 1"), "{msg}");
    // A rewrite stores version 2.
    cache.set(&key, &secrets("acme"), Some(60)).await.unwrap();
    assert_eq!(&raw_get(server, &key).unwrap()[..3], b"CS\x02");
    assert_eq!(
        strict.get::<OrgSecrets>(&key).await.unwrap(),
        Some(secrets("acme"))
    );
}

#[tokio::test]
async fn key_rotation_reads_old_values_and_writes_with_the_new_key() {
    let server = RedisServer::shared();
    let prefix = unique_prefix("rotation");
    let old_key = format!("{prefix}org:acme");
    let new_key = format!("{prefix}org:globex");

    let before = EncryptedCacheService::new(redis().await, EncryptionKeys::new(1, KEY_1));
    before.set(&old_key, &secrets("acme"), None).await.unwrap();
    let stored_id = |key: &str| {
        let raw = raw_get(server, key).unwrap();
        EncryptedEnvelope::parse(key, &Bytes::from(raw))
            .unwrap()
            .key_id()
    };
    assert_eq!(stored_id(&old_key), 1);

    // Keys as they would come from settings: the new one in hex, the old one in base64.
    let hex_2: String = KEY_2.iter().map(|b| format!("{b:02x}")).collect();
    let base64_1 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(KEY_1)
    };
    let rotated_keys = EncryptionKeys::new(2, EncryptionKey::parse(&hex_2).unwrap())
        .with_previous(1, EncryptionKey::parse(&base64_1).unwrap())
        .unwrap();
    let after = EncryptedCacheService::new(redis().await, rotated_keys);
    assert_eq!(
        after.get::<OrgSecrets>(&old_key).await.unwrap(),
        Some(secrets("acme")),
        "the old value still reads"
    );
    after.set(&new_key, &secrets("globex"), None).await.unwrap();
    assert_eq!(stored_id(&new_key), 2, "new writes use the current key");

    let only_new = EncryptedCacheService::new(redis().await, EncryptionKeys::new(2, KEY_2));
    let msg = integrity_error(only_new.get::<OrgSecrets>(&old_key).await);
    assert!(msg.contains("key id 1"), "{msg}");
    assert!(msg.contains("org:acme"), "{msg}");
    assert_eq!(
        only_new.get::<OrgSecrets>(&new_key).await.unwrap(),
        Some(secrets("globex"))
    );
    let msg = integrity_error(before.get::<OrgSecrets>(&new_key).await);
    assert!(msg.contains("key id 2"), "{msg}");

    // Rewriting an old value moves it to the new key.
    after.set(&old_key, &secrets("acme"), None).await.unwrap();
    assert_eq!(stored_id(&old_key), 2);
    assert_eq!(
        only_new.get::<OrgSecrets>(&old_key).await.unwrap(),
        Some(secrets("acme"))
    );
}

#[tokio::test]
async fn a_wrong_key_under_a_known_id_fails_without_touching_the_entry() {
    let server = RedisServer::shared();
    let key = format!("{}k", unique_prefix("wrong-key"));
    let writer = encrypted(redis().await);
    writer.set(&key, &secrets("acme"), None).await.unwrap();
    let stored = raw_get(server, &key).unwrap();
    let impostor = EncryptedCacheService::new(redis().await, EncryptionKeys::new(1, KEY_2));
    let msg = integrity_error(impostor.get::<OrgSecrets>(&key).await);
    assert!(msg.contains("authentication failed with key id 1"), "{msg}");
    assert_eq!(raw_get(server, &key).unwrap(), stored);
}

#[tokio::test]
async fn invalidation_passes_through_the_encryption() {
    let prefix = unique_prefix("enc-invalidate");
    let inner = redis().await;
    let cache = encrypted(inner.clone());
    for i in 0..10 {
        cache
            .set(&format!("{prefix}a:{i}"), &i, None)
            .await
            .unwrap();
    }
    cache.set(&format!("{prefix}b"), &0, None).await.unwrap();
    cache.invalidate(&format!("{prefix}a:0")).await.unwrap();
    assert_eq!(
        inner.get_bytes(&format!("{prefix}a:0")).await.unwrap(),
        None
    );
    assert_eq!(
        cache
            .invalidate_prefix(&format!("{prefix}a:"))
            .await
            .unwrap(),
        9
    );
    assert_eq!(
        cache.get::<i32>(&format!("{prefix}b")).await.unwrap(),
        Some(0)
    );
}

/// With the encryption inside the namespace, the full stored name is bound: a value copied
/// from one tenant's namespace to another's does not decrypt.
#[tokio::test]
async fn encryption_inside_a_namespace_binds_the_tenant() {
    let server = RedisServer::shared();
    let base = unique_prefix("tenants").replace(':', "-");
    let (acme_ns, globex_ns) = (format!("{base}acme"), format!("{base}globex"));
    let acme = namespaced(encrypted(redis().await), &acme_ns);
    let globex = namespaced(encrypted(redis().await), &globex_ns);
    acme.set("sso", &secrets("acme"), None).await.unwrap();
    let (from, to) = (format!("{acme_ns}:sso"), format!("{globex_ns}:sso"));
    assert_eq!(server.command(&["COPY", &from, &to]).unwrap(), "1");
    let msg = integrity_error(globex.get::<OrgSecrets>("sso").await);
    assert!(msg.contains(&to), "names the stored key: {msg}");
}

/// With the encryption outside the namespace, only the name within the namespace is bound
/// (documented on `EncryptedCacheService`): the same copy decrypts. This pins the documented
/// behaviour, so that a change to it is noticed.
#[tokio::test]
async fn encryption_outside_a_namespace_binds_only_the_name_within_it() {
    let server = RedisServer::shared();
    let base = unique_prefix("tenants-outside").replace(':', "-");
    let (acme_ns, globex_ns) = (format!("{base}acme"), format!("{base}globex"));
    let acme = encrypted(namespaced(redis().await, &acme_ns));
    let globex = encrypted(namespaced(redis().await, &globex_ns));
    acme.set("sso", &secrets("acme"), None).await.unwrap();
    let (from, to) = (format!("{acme_ns}:sso"), format!("{globex_ns}:sso"));
    assert_eq!(server.command(&["COPY", &from, &to]).unwrap(), "1");
    assert_eq!(
        globex.get::<OrgSecrets>("sso").await.unwrap(),
        Some(secrets("acme"))
    );
}

#[tokio::test]
async fn the_fast_path_is_forwarded_and_decrypts() {
    let moka = MokaCacheService::default();
    let cache = namespaced(encrypted(moka.clone()), "ns");
    cache.set("k", &"v", None).await.unwrap();
    assert_eq!(
        cache.get_bytes_now("k").transpose().unwrap(),
        Some(Some(Bytes::from_static(b"\"v\"")))
    );
    assert_eq!(
        cache.get_bytes_now("missing").transpose().unwrap(),
        Some(None)
    );
    let stored = moka.get_bytes_now("ns:k").unwrap().unwrap().unwrap();
    assert_eq!(&stored[..3], b"CS\x02");
    moka.set_bytes("ns:bad", Bytes::from_static(b"garbage"), None)
        .await
        .unwrap();
    assert!(matches!(
        cache.get_bytes_now("bad"),
        Some(Err(CacheError::Integrity { .. }))
    ));
    // A backend with no fast path still answers through `get_bytes`.
    let over_redis = encrypted(redis().await);
    assert!(over_redis.get_bytes_now("k").is_none());
}

#[test]
fn decorators_are_send_sync_debug_without_key_material() {
    fn assert_service<T: CacheService + Send + Sync + std::fmt::Debug + 'static>() {}
    assert_service::<EncryptedCacheService<MokaCacheService>>();
    assert_service::<NamespacedCacheService<MokaCacheService>>();
    assert_service::<EncryptedCacheService<Arc<dyn CacheService>>>();
    assert_service::<NamespacedCacheService<EncryptedCacheService<Arc<dyn CacheService>>>>();

    let key = [0x5au8; 32]; // 'Z'
    let cache = namespaced(
        EncryptedCacheService::new(
            MokaCacheService::default(),
            EncryptionKeys::new(9, key)
                .with_previous(8, [0xa5; 32])
                .unwrap(),
        ),
        "acme",
    );
    let debug = format!("{cache:?}");
    for needle in ["ZZZZ", "5a", "90, 90", "a5", "165"] {
        assert!(!debug.contains(needle), "{needle:?} in {debug}");
    }
    assert!(
        debug.contains("acme") && debug.contains("current_id: 9"),
        "{debug}"
    );
}

#[tokio::test]
async fn futures_are_send() {
    fn assert_send<F: std::future::Future + Send>(f: F) -> F {
        f
    }
    let cache: Arc<dyn CacheService> =
        Arc::new(namespaced(encrypted(MokaCacheService::default()), "ns"));
    assert_send(cache.set("k", &1, None)).await.unwrap();
    assert_eq!(assert_send(cache.get::<i32>("k")).await.unwrap(), Some(1));
    assert_send(cache.invalidate("k")).await.unwrap();
    assert_eq!(assert_send(cache.invalidate_prefix("")).await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------
// Namespaces.

/// Two namespaces and un-namespaced keys on one inner service: `invalidate_prefix("")` in one
/// namespace removes exactly its keys, and everything else survives.
async fn namespaces_are_disjoint(inner: Arc<dyn CacheService>) {
    let acme = namespaced(Arc::clone(&inner), "acme");
    let globex = namespaced(Arc::clone(&inner), "globex");
    for i in 0..30 {
        acme.set(&format!("org:{i}"), &i, None).await.unwrap();
    }
    for i in 0..20 {
        globex.set(&format!("org:{i}"), &i, None).await.unwrap();
    }
    // Un-namespaced keys, some of which look like acme's at a glance.
    let outside = [
        "org:1",
        "acme",
        "acmeorg:1",
        "acm:org:1",
        "globex",
        "x:acme:org:1",
        "",
    ];
    for key in outside {
        inner.set(key, &key, None).await.unwrap();
    }

    assert_eq!(acme.get::<i32>("org:7").await.unwrap(), Some(7));
    assert_eq!(acme.get::<i32>("org:25").await.unwrap(), Some(25));
    assert_eq!(globex.get::<i32>("org:25").await.unwrap(), None);
    assert_eq!(inner.get::<i32>("acme:org:7").await.unwrap(), Some(7));

    assert_eq!(acme.invalidate_prefix("org:2").await.unwrap(), 11); // 2, 20..=29
    assert_eq!(acme.invalidate_prefix("").await.unwrap(), 19);
    assert_eq!(acme.invalidate_prefix("").await.unwrap(), 0);
    for i in 0..20 {
        assert_eq!(
            globex.get::<i32>(&format!("org:{i}")).await.unwrap(),
            Some(i)
        );
    }
    for key in outside {
        assert_eq!(
            inner.get::<String>(key).await.unwrap().as_deref(),
            Some(key),
            "{key:?} is in no namespace and survives"
        );
    }
    assert_eq!(globex.invalidate_prefix("").await.unwrap(), 20);
    assert_eq!(
        inner.invalidate_prefix("").await.unwrap(),
        outside.len() as u64
    );
}

#[tokio::test]
async fn namespaces_are_disjoint_on_moka() {
    namespaces_are_disjoint(Arc::new(MokaCacheService::default())).await;
}

#[tokio::test]
async fn namespaces_are_disjoint_on_redis() {
    let server = RedisServer::start(); // private: DBSIZE counts only this test's keys
    namespaces_are_disjoint(Arc::new(connect(server.url()).await)).await;
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
}

/// Namespace `a` against namespace `ab` and against keys written raw as `a:...`, `ab...`.
async fn a_is_not_a_prefix_of_ab(inner: Arc<dyn CacheService>) {
    let a = namespaced(Arc::clone(&inner), "a");
    let ab = namespaced(Arc::clone(&inner), "ab");
    a.set("b:c", &"a's b:c", None).await.unwrap();
    a.set("x", &"a's x", None).await.unwrap();
    ab.set("c", &"ab's c", None).await.unwrap();
    ab.set("x", &"ab's x", None).await.unwrap();
    // Written raw: `a:y` is namespace a's key `y` (documented); the rest belong to no namespace.
    for raw in ["a:y", "ab", "a", "abc:x", "b:a:x", "a;x", "A:x"] {
        inner.set(raw, &raw, None).await.unwrap();
    }

    assert_eq!(a.get::<String>("y").await.unwrap().as_deref(), Some("a:y"));
    assert_eq!(
        a.get::<String>("b:c").await.unwrap().as_deref(),
        Some("a's b:c")
    );
    assert_eq!(ab.get::<String>("b:c").await.unwrap(), None);
    assert_eq!(
        a.get::<String>("b:x").await.unwrap(),
        None,
        "ab's x is not a's b:x"
    );
    assert_eq!(
        ab.get::<String>("x").await.unwrap().as_deref(),
        Some("ab's x")
    );
    assert_eq!(
        a.get::<String>("x").await.unwrap().as_deref(),
        Some("a's x")
    );

    assert_eq!(
        a.invalidate_prefix("").await.unwrap(),
        3,
        "b:c, x and the raw a:y"
    );
    assert_eq!(
        ab.get::<String>("c").await.unwrap().as_deref(),
        Some("ab's c")
    );
    assert_eq!(
        ab.get::<String>("x").await.unwrap().as_deref(),
        Some("ab's x")
    );
    for raw in ["ab", "a", "abc:x", "b:a:x", "a;x", "A:x"] {
        assert_eq!(
            inner.get::<String>(raw).await.unwrap().as_deref(),
            Some(raw),
            "{raw:?} survives namespace a"
        );
    }
    assert_eq!(ab.invalidate_prefix("").await.unwrap(), 2);
    assert_eq!(inner.invalidate_prefix("").await.unwrap(), 6);

    for bad in ["a:b", "a:", ":", ""] {
        let err = NamespacedCacheService::new(Arc::clone(&inner), bad).unwrap_err();
        assert!(matches!(err, CacheError::Config { .. }), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn a_is_not_a_prefix_of_ab_on_moka() {
    a_is_not_a_prefix_of_ab(Arc::new(MokaCacheService::default())).await;
}

#[tokio::test]
async fn a_is_not_a_prefix_of_ab_on_redis() {
    let server = RedisServer::start();
    a_is_not_a_prefix_of_ab(Arc::new(connect(server.url()).await)).await;
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
}

/// Glob characters in a namespace and in a prefix are literal: a namespace `t*` or `[ab]`
/// does not reach `tx:...` or `a:...`, and a prefix `k*` removes only keys starting `k*`.
async fn glob_characters_are_literal(inner: Arc<dyn CacheService>) {
    let glob_namespaces = ["t*", "[ab]", "?", "\\", "x\\*", "[^z]"];
    let neighbours = ["tx", "t", "a", "b", "x", "y", "x\\y", "q"];
    for ns in glob_namespaces.iter().chain(neighbours.iter()) {
        let cache = namespaced(Arc::clone(&inner), ns);
        cache.set("k", ns, None).await.unwrap();
        cache.set("k*1", ns, None).await.unwrap();
        cache.set("kx1", ns, None).await.unwrap();
        cache.set("k?", ns, None).await.unwrap();
        cache.set("k[a]", ns, None).await.unwrap();
    }

    for ns in glob_namespaces {
        let cache = namespaced(Arc::clone(&inner), ns);
        assert_eq!(cache.invalidate_prefix("k*").await.unwrap(), 1, "{ns:?} k*");
        assert_eq!(cache.invalidate_prefix("k?").await.unwrap(), 1, "{ns:?} k?");
        assert_eq!(cache.invalidate_prefix("k[").await.unwrap(), 1, "{ns:?} k[");
        assert_eq!(
            cache.invalidate_prefix("").await.unwrap(),
            2,
            "{ns:?} the rest"
        );
    }
    for ns in neighbours {
        let cache = namespaced(Arc::clone(&inner), ns);
        for key in ["k", "k*1", "kx1", "k?", "k[a]"] {
            assert_eq!(
                cache.get::<String>(key).await.unwrap().as_deref(),
                Some(ns),
                "namespace {ns:?} key {key:?} survives the glob namespaces"
            );
        }
        assert_eq!(cache.invalidate_prefix("").await.unwrap(), 5, "{ns:?}");
    }
}

#[tokio::test]
async fn glob_characters_in_namespace_and_prefix_are_literal_on_moka() {
    glob_characters_are_literal(Arc::new(MokaCacheService::default())).await;
}

#[tokio::test]
async fn glob_characters_in_namespace_and_prefix_are_literal_on_redis() {
    let server = RedisServer::start();
    glob_characters_are_literal(Arc::new(connect(server.url()).await)).await;
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
}

#[tokio::test]
async fn namespaced_keys_are_stored_under_namespace_colon_key() {
    let server = RedisServer::shared();
    let ns = unique_prefix("layout").replace(':', "-");
    let cache = namespaced(redis().await, &ns);
    cache.set("org:acme", &"v", Some(120)).await.unwrap();
    let stored = format!("{ns}:org:acme");
    assert_eq!(server.cli(&["GET", &stored]).trim(), "\"v\"");
    let ttl: i64 = server.cli(&["TTL", &stored]).trim().parse().unwrap();
    assert!((115..=120).contains(&ttl), "TTL {ttl}");
    assert_eq!(cache.stored_key("org:acme"), stored);
}
