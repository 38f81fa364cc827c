//! The org_service example, end to end: two instances of the same code as
//! `cargo run --example org_service`, each with its own `TieredCacheService` (its own L1 and
//! subscriber) and its own HTTP listener, on one real Redis and one store directory, driven
//! over real HTTP/1.1 (a raw request on a TCP stream, `Connection: close`).
//!
//! No fixed sleeps: a test waits on an instance's invalidation counter before it checks what
//! that instance serves. The timeouts below only bound hangs.
//!
//! The process has one Prometheus recorder ([`prometheus`]), installed by the test that
//! scrapes `/metrics` before it builds its instance; instances that other tests build after
//! that report to it too, so that test checks the growth its own requests caused, at least.

mod support;

// The example's binary uses all of it; each test here some.
#[allow(dead_code)]
#[path = "../examples/org_service/app.rs"]
mod app;

use cachet::backend::tiered::InvalidationMode;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use support::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;

/// Bounds one HTTP exchange (a hang, not a speed).
const REQUEST_BOUND: Duration = Duration::from_secs(30);
/// Bounds the delivery of an invalidation to another instance.
const DELIVERY: Duration = Duration::from_secs(10);
/// The deployments' token digest key.
const DIGEST_KEY: [u8; 32] = [7u8; 32];

/// One running instance: its state (for its counters) and its HTTP server task.
struct Instance {
    addr: SocketAddr,
    state: app::AppState,
    server: JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Instance {
    async fn start(settings: &app::Settings) -> Instance {
        Instance::start_with(settings, None).await
    }

    /// An instance that serves `GET /metrics` from `metrics` (installed before this is
    /// called: the caches register their metric handles when they are built).
    async fn start_with(settings: &app::Settings, metrics: Option<PrometheusHandle>) -> Instance {
        let mut state = app::build_state(settings)
            .await
            .expect("the instance starts");
        if let Some(handle) = metrics {
            state = state.with_metrics(handle);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app::app(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("the server runs");
        });
        Instance {
            addr,
            state,
            server,
        }
    }

    fn store_loads(&self) -> u64 {
        self.state.resolver.store().loads()
    }

    fn tiered(&self) -> &cachet::TieredCacheService {
        self.state.tiered.as_ref().expect("a tiered backend")
    }

    async fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, None).await
    }

    /// `GET /me` with this `authorization` header (none for `None`).
    async fn me(&self, authorization: Option<&str>) -> Reply {
        let headers: Vec<(&str, &str)> = authorization
            .map(|value| ("authorization", value))
            .into_iter()
            .collect();
        http_with_headers(self.addr, "GET", "/me", &headers, None).await
    }

    /// API keys this instance validated against the store.
    fn token_validations(&self) -> u64 {
        self.state
            .token_validations
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn put_org(&self, slug: &str, id: &str, name: &str, secret: &str) -> Reply {
        let body = serde_json::json!({
            "id": id, "name": name, "plan": "pro", "api_secret": secret,
        })
        .to_string();
        http(self.addr, "PUT", &format!("/orgs/{slug}"), Some(&body)).await
    }

    async fn stats(&self) -> app::Stats {
        let reply = self.get("/stats").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    /// `GET /metrics`, as Prometheus scrapes it: a 200 in the text format, parsed.
    async fn scrape(&self) -> Scrape {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, 200, "{}\n{}", reply.head, reply.body);
        let content_type = reply
            .header("content-type")
            .unwrap_or_else(|| panic!("no content type:\n{}", reply.head));
        assert_eq!(content_type, app::PROMETHEUS_CONTENT_TYPE);
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape::parse(&reply.body)
    }
}

/// The settings of an instance on `redis` (tiered, encrypted) with the store in `store`.
fn tiered_settings(redis: &RedisServer, store: &Path, store_delay: Duration) -> app::Settings {
    app::Settings {
        redis_url: Some(redis.url()),
        store_dir: store.to_owned(),
        store_delay,
        // Each deployment has its own Redis; a channel of its own all the same.
        channel_prefix: Some(format!("org-service-{}:", redis.port())),
        encryption_key: Some(cachet::EncryptionKey::from([9u8; 32])),
        token_digest_key: Some(DIGEST_KEY.to_vec()),
    }
}

/// One Redis, one store directory, two instances.
struct Deployment {
    redis: RedisServer,
    store: tempfile::TempDir,
    a: Instance,
    b: Instance,
}

impl Deployment {
    async fn start(store_delay: Duration) -> Deployment {
        let redis = RedisServer::start();
        let store = tempfile::tempdir().unwrap();
        let settings = tiered_settings(&redis, store.path(), store_delay);
        let a = Instance::start(&settings).await;
        let b = Instance::start(&settings).await;
        assert_eq!(a.stats().await.backend, "tiered");
        Deployment { redis, store, a, b }
    }

    fn dir(&self) -> &Path {
        self.store.path()
    }
}

/// Writes an org file the way an operator (or another tool) would, behind the service's back.
fn write_org_file(dir: &Path, org: &app::OrgContext) {
    let path: PathBuf = dir.join(format!("{}.json", org.slug));
    std::fs::write(path, serde_json::to_vec(org).unwrap()).unwrap();
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    /// The value of the response header `name` (case-insensitive), if there is one.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    fn view(&self) -> app::OrgView {
        assert_eq!(self.status, 200, "{}\n{}", self.head, self.body);
        serde_json::from_str(&self.body).unwrap()
    }

    fn claims(&self) -> app::TokenClaims {
        assert_eq!(self.status, 200, "{}\n{}", self.head, self.body);
        serde_json::from_str(&self.body).unwrap()
    }

    /// A 401, with the one body every rejected key gets.
    fn assert_unauthorized(&self, what: &str) {
        assert_eq!(self.status, 401, "{what}: {}\n{}", self.head, self.body);
        assert_eq!(self.body, "invalid or missing API key\n", "{what}");
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{what}: {}",
            self.head
        );
    }
}

/// One HTTP/1.1 exchange on a fresh connection.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    http_with_headers(addr, method, path, &[], body).await
}

/// One HTTP/1.1 exchange on a fresh connection, with extra request headers.
async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let body = body.unwrap_or("");
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{extra}\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(REQUEST_BOUND, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {REQUEST_BOUND:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this client reads sized bodies only:\n{head}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_through_one_instance_is_served_by_the_other_once_delivered() {
    let deployment = Deployment::start(Duration::ZERO).await;
    let (a, b) = (&deployment.a, &deployment.b);

    assert_eq!(
        a.put_org("acme", "1", "Acme v1", "secret-1").await.status,
        200
    );
    // Read on B first, then A: B's load writes to the cache and tells A; A then reads what B
    // cached and publishes nothing. From here on, only A's PUTs reach B's counter.
    assert_eq!(b.get("/orgs/acme").await.view().name, "Acme v1");
    assert_eq!(a.get("/orgs/acme").await.view().name, "Acme v1");
    assert_eq!(b.get("/orgs/acme").await.view().name, "Acme v1"); // now from B's L1
    assert_eq!(
        b.store_loads() + a.store_loads(),
        1,
        "one load for both instances"
    );

    for round in 2..=6 {
        let name = format!("Acme v{round}");
        let before = b.tiered().invalidations_applied();
        let put = a
            .put_org("acme", "1", &name, &format!("secret-{round}"))
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        // invalidate_org removes org:acme, org:id:1, org:acme. Over the bus B hears a
        // message per key removed once (the repeat is of a key already gone: two); with
        // client tracking the server tells B only about the key B read and still tracks
        // (org:acme, once: one).
        let expected = match b.tiered().invalidation_mode() {
            InvalidationMode::Bus => 2,
            _ => 1,
        };
        assert!(
            b.tiered()
                .wait_for_invalidations(before + expected, DELIVERY)
                .await,
            "B heard A's invalidation"
        );
        assert!(b.stats().await.invalidations_applied >= Some(before + expected));
        // Once delivered, B never serves the old org.
        for _ in 0..3 {
            let view = b.get("/orgs/acme").await.view();
            assert_eq!(view.name, name, "round {round}");
            assert!(!view.stale);
        }
        assert_eq!(a.get("/orgs/acme").await.view().name, name);
    }
    let body = b.get("/orgs/acme").await.body;
    assert!(
        !body.contains("secret"),
        "the secret is never served: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_reach_the_store_at_most_once_per_instance() {
    const PER_INSTANCE: usize = 200;
    // Long enough for the requests to overlap the first load.
    let deployment = Deployment::start(Duration::from_millis(200)).await;
    let org = app::OrgContext {
        id: "7".into(),
        slug: "globex".into(),
        name: "Globex".into(),
        plan: "enterprise".into(),
        api_secret: "hunter2".into(),
    };
    write_org_file(deployment.dir(), &org);

    let start = Arc::new(Barrier::new(2 * PER_INSTANCE));
    let mut requests = Vec::new();
    for addr in [deployment.a.addr, deployment.b.addr] {
        for _ in 0..PER_INSTANCE {
            let start = Arc::clone(&start);
            requests.push(tokio::spawn(async move {
                start.wait().await;
                http(addr, "GET", "/orgs/globex", None).await
            }));
        }
    }
    for request in requests {
        let reply = request.await.unwrap();
        let view = reply.view();
        assert_eq!((view.id.as_str(), view.slug.as_str()), ("7", "globex"));
        assert_eq!(
            (view.name.as_str(), view.plan.as_str()),
            ("Globex", "enterprise")
        );
    }
    let (a_loads, b_loads) = (deployment.a.store_loads(), deployment.b.store_loads());
    eprintln!(
        "{PER_INSTANCE} concurrent first requests per instance: store loads A={a_loads} B={b_loads}"
    );
    assert!(a_loads <= 1 && b_loads <= 1, "A={a_loads} B={b_loads}");
    assert!(a_loads + b_loads >= 1);

    // Redis holds the org under both keys, encrypted: the secret is in no value.
    let names: Vec<String> = deployment.redis.query(&["KEYS", "*"]).unwrap();
    assert!(names.iter().any(|k| k == "org:globex"), "{names:?}");
    assert!(names.iter().any(|k| k == "org:id:7"), "{names:?}");
    for name in &names {
        let value: Option<Vec<u8>> = deployment.redis.query(&["GET", name]).unwrap();
        if let Some(value) = value {
            assert!(
                !value.windows(7).any(|w| w == b"hunter2"),
                "the org secret in plaintext under {name}"
            );
        }
    }
    assert_eq!(deployment.a.stats().await.store_loads, a_loads);
    assert_eq!(deployment.b.stats().await.store_loads, b_loads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_org_is_404_and_a_failing_store_with_nothing_cached_is_503() {
    let deployment = Deployment::start(Duration::ZERO).await;
    let (a, b) = (&deployment.a, &deployment.b);

    for instance in [a, b] {
        let reply = instance.get("/orgs/nobody").await;
        assert_eq!(reply.status, 404, "{}", reply.body);
        assert_eq!(reply.body, "org not found\n");
        // A malformed slug never reaches the store.
        assert_eq!(instance.get("/orgs/no%20body").await.status, 404);
    }

    // A corrupt org file: the store fails, and nothing is cached for this org.
    std::fs::write(deployment.dir().join("broken.json"), b"{\"id\": 3, oops").unwrap();
    for instance in [a, b] {
        let reply = instance.get("/orgs/broken").await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.body, "org service temporarily unavailable\n");
        assert!(!reply.head.contains("broken.json") && !reply.body.contains("json"));
    }

    // An org served before the store goes away stays served from the cache; one never
    // loaded is a 503, not a 404: a missing store is a failure, not "no such org".
    assert_eq!(a.put_org("acme", "1", "Acme", "s").await.status, 200);
    assert_eq!(a.get("/orgs/acme").await.view().name, "Acme");
    std::fs::remove_dir_all(deployment.dir()).unwrap();
    assert_eq!(a.get("/orgs/acme").await.view().name, "Acme");
    assert_eq!(b.get("/orgs/acme").await.view().name, "Acme"); // from Redis
    for instance in [a, b] {
        assert_eq!(instance.get("/orgs/initech").await.status, 503);
    }

    // Failures are not cached: once the store is back, the org is served.
    std::fs::create_dir_all(deployment.dir()).unwrap();
    write_org_file(
        deployment.dir(),
        &app::OrgContext {
            id: "9".into(),
            slug: "initech".into(),
            name: "Initech".into(),
            plan: "free".into(),
            api_secret: "x".into(),
        },
    );
    assert_eq!(a.get("/orgs/initech").await.view().name, "Initech");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_one_instance_runs_on_the_in_memory_cache() {
    let store = tempfile::tempdir().unwrap();
    let instance = Instance::start(&app::Settings {
        redis_url: None,
        store_dir: store.path().join("created-if-missing"),
        store_delay: Duration::ZERO,
        channel_prefix: None,
        encryption_key: None,
        // Drawn at random: only this instance reads its in-memory cache.
        token_digest_key: None,
    })
    .await;
    let stats = instance.stats().await;
    assert_eq!(
        (stats.backend.as_str(), stats.invalidations_applied),
        ("memory", None)
    );

    assert_eq!(instance.get("/orgs/acme").await.status, 404);
    assert_eq!(instance.put_org("acme", "1", "Acme", "s").await.status, 200);
    assert_eq!(instance.get("/orgs/acme").await.view().name, "Acme"); // "not found" was dropped
    assert_eq!(
        instance.put_org("acme", "1", "Acme 2", "s").await.status,
        200
    );
    assert_eq!(instance.get("/orgs/acme").await.view().name, "Acme 2");
    assert_eq!(instance.get("/orgs/acme").await.view().name, "Acme 2");
    assert_eq!(instance.stats().await.store_loads, 3);
    // No recorder handed to it: no metrics endpoint.
    assert_eq!(instance.get("/metrics").await.status, 404);
    // API keys work on the random digest key too.
    let claims = instance.me(Some("Bearer acme.s")).await.claims();
    assert_eq!((claims.id.as_str(), claims.slug.as_str()), ("1", "acme"));
    instance
        .me(Some("Bearer acme.t"))
        .await
        .assert_unauthorized("wrong secret, in memory");
    // A slug that cannot name a file is refused, not written.
    assert_eq!(
        instance.put_org("..%2Fescape", "1", "x", "s").await.status,
        400
    );
}

/// Every key of the deployment's Redis.
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    redis.query(&["KEYS", "*"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_validated_once_and_cached_under_its_hmac_on_both_instances() {
    let deployment = Deployment::start(Duration::ZERO).await;
    let (a, b) = (&deployment.a, &deployment.b);
    assert_eq!(
        a.put_org("acme", "1", "Acme", "acme-s3cr3t").await.status,
        200
    );
    let token = "acme.acme-s3cr3t";
    let bearer = format!("Bearer {token}");

    // A validates it against the store, B finds it in Redis; then each serves it from its
    // L1: one validation in all.
    for instance in [a, b, a, b, a, b] {
        let claims = instance.me(Some(&bearer)).await.claims();
        assert_eq!(
            claims,
            app::TokenClaims {
                id: "1".into(),
                slug: "acme".into()
            }
        );
    }
    assert_eq!((a.token_validations(), b.token_validations()), (1, 0));
    assert_eq!(a.stats().await.token_validations, 1);
    assert_eq!(b.stats().await.token_validations, 0);
    // The org's file is the truth for API keys, not the org cache: no org load either.
    assert_eq!(a.store_loads() + b.store_loads(), 0);
    // The scheme is case-insensitive, and so is the slug (one entry for both spellings).
    let claims = b.me(Some("bearer ACME.acme-s3cr3t")).await.claims();
    assert_eq!(claims.slug, "acme");
    assert_eq!((a.token_validations(), b.token_validations()), (1, 0));

    // Redis holds the key's entry under HMAC-SHA256(digest key, token): not under its plain
    // SHA-256 (which anyone could compute for a guessed key), and the token is in no key.
    let names = redis_keys(&deployment.redis);
    let keyed = cachet::token::keyed_token_key(&DIGEST_KEY, token).unwrap();
    assert!(names.contains(&keyed), "{keyed} not in {names:?}");
    assert!(
        !names.contains(&cachet::token::token_key(token)),
        "the plain SHA-256 key in {names:?}"
    );
    assert!(
        names.iter().all(|name| !name.contains("acme-s3cr3t")),
        "{names:?}"
    );
    assert_eq!(
        names
            .iter()
            .filter(|name| name.starts_with("token:"))
            .count(),
        1,
        "{names:?}"
    );
    // And no value holds the secret (values are encrypted; the claims hold no secret anyway).
    for name in &names {
        let value: Option<Vec<u8>> = deployment.redis.query(&["GET", name]).unwrap();
        if let Some(value) = value {
            assert!(
                !value.windows(11).any(|w| w == b"acme-s3cr3t"),
                "the org secret in plaintext under {name}"
            );
        }
    }
    // Debug output never shows the digest key.
    let debug = format!("{:?}", a.state);
    assert!(debug.contains("HMAC-SHA256 (keyed)"), "{debug}");
    assert!(!debug.contains("7, 7"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_api_key_is_401_with_one_body_and_a_malformed_one_never_reaches_the_store() {
    let deployment = Deployment::start(Duration::ZERO).await;
    let (a, b) = (&deployment.a, &deployment.b);
    assert_eq!(a.put_org("acme", "1", "Acme", "right").await.status, 200);

    for instance in [a, b] {
        // Well formed, so checked against the store: the same 401 for both (no oracle).
        let before = instance.token_validations();
        instance
            .me(Some("Bearer acme.wrong"))
            .await
            .assert_unauthorized("wrong secret");
        instance
            .me(Some("Bearer acme.righ"))
            .await
            .assert_unauthorized("a prefix of the secret");
        instance
            .me(Some("Bearer acme.right-and-more"))
            .await
            .assert_unauthorized("the secret and more");
        instance
            .me(Some("Bearer nobody.right"))
            .await
            .assert_unauthorized("unknown org");
        assert_eq!(instance.token_validations(), before + 4);

        // Malformed: refused before the store (and the cache) is touched.
        let before = instance.token_validations();
        instance.me(None).await.assert_unauthorized("no header");
        for (what, header) in [
            ("no scheme", "acme.right"),
            ("another scheme", "Basic acme.right"),
            ("no scheme separator", "Beareracme.right"),
            ("no '.'", "Bearer acmeright"),
            ("a path-like slug", "Bearer ../x.y"),
            ("an encoded path", "Bearer ..%2Fx.y"),
            ("a slash in the slug", "Bearer a/b.right"),
            ("an empty slug", "Bearer .right"),
            ("an empty secret", "Bearer acme."),
            ("an empty token", "Bearer "),
            (
                "a slug too long",
                &format!("Bearer {}.right", "a".repeat(200)),
            ),
        ] {
            instance.me(Some(header)).await.assert_unauthorized(what);
        }
        // A header value that is not visible ASCII (obs-text) is a 401 too, not a panic.
        let reply = http_with_headers(
            instance.addr,
            "GET",
            "/me",
            &[("authorization", "Bearer acm\u{e9}.right")],
            None,
        )
        .await;
        reply.assert_unauthorized("a non-ASCII header");
        assert_eq!(
            instance.token_validations(),
            before,
            "malformed keys reached the store"
        );
        assert_eq!(
            instance.me(Some("Bearer acme.right")).await.claims().id,
            "1"
        );
    }
    // Nothing was cached for a rejected key: the one entry is the valid key's.
    let tokens: Vec<String> = redis_keys(&deployment.redis)
        .into_iter()
        .filter(|name| name.starts_with("token:"))
        .collect();
    assert_eq!(
        tokens,
        [cachet::token::keyed_token_key(&DIGEST_KEY, "acme.right").unwrap()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_secret_revokes_the_old_key_on_both_instances_at_once() {
    let deployment = Deployment::start(Duration::ZERO).await;
    let (a, b) = (&deployment.a, &deployment.b);
    assert_eq!(
        a.put_org("acme", "1", "Acme", "old-secret").await.status,
        200
    );
    let (old, new) = ("Bearer acme.old-secret", "Bearer acme.new-secret");

    // Both instances hold the old key in their L1 (A validated it, B read A's entry).
    for instance in [a, b, a, b] {
        assert_eq!(instance.me(Some(old)).await.claims().slug, "acme");
    }
    assert_eq!((a.token_validations(), b.token_validations()), (1, 0));

    // An update that keeps the secret keeps the key's entry.
    assert_eq!(
        a.put_org("acme", "1", "Acme 2", "old-secret").await.status,
        200
    );
    for instance in [a, b] {
        assert_eq!(instance.me(Some(old)).await.claims().id, "1");
    }
    assert_eq!((a.token_validations(), b.token_validations()), (1, 0));

    // A new secret: A drops the old key's entry, and B hears of it.
    let before = b.tiered().invalidations_applied();
    assert_eq!(
        a.put_org("acme", "1", "Acme 3", "new-secret").await.status,
        200
    );
    // Over the bus B hears every key A invalidated: org:acme, org:id:1, org:acme, then the
    // token's. With client tracking the server tells B only about the keys B read and still
    // tracks: the token's (B never read the org's keys).
    let expected = match b.tiered().invalidation_mode() {
        InvalidationMode::Bus => 4,
        _ => 1,
    };
    assert!(
        b.tiered()
            .wait_for_invalidations(before + expected, DELIVERY)
            .await,
        "B heard A's invalidation"
    );
    for instance in [b, a, b, a] {
        instance
            .me(Some(old))
            .await
            .assert_unauthorized("the old key after the update");
        let claims = instance.me(Some(new)).await.claims();
        assert_eq!((claims.id.as_str(), claims.slug.as_str()), ("1", "acme"));
    }
    let names = redis_keys(&deployment.redis);
    assert!(
        !names.contains(&cachet::token::keyed_token_key(&DIGEST_KEY, "acme.old-secret").unwrap()),
        "{names:?}"
    );
    assert!(
        names.contains(&cachet::token::keyed_token_key(&DIGEST_KEY, "acme.new-secret").unwrap()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_missing_or_short_digest_key_stops_the_start() {
    let redis = RedisServer::start();
    let store = tempfile::tempdir().unwrap();
    let mut settings = app::Settings {
        redis_url: Some(redis.url()),
        store_dir: store.path().to_owned(),
        store_delay: Duration::ZERO,
        channel_prefix: Some(format!("org-service-{}:", redis.port())),
        encryption_key: Some(cachet::EncryptionKey::from([9u8; 32])),
        token_digest_key: None,
    };
    let error = app::build_state(&settings).await.unwrap_err().to_string();
    assert!(error.contains("TOKEN_DIGEST_KEY"), "{error}");
    assert!(error.contains("openssl rand -base64 32"), "{error}");

    settings.token_digest_key = Some(vec![7u8; 8]);
    let error = app::build_state(&settings).await.unwrap_err().to_string();
    assert!(error.contains("TOKEN_DIGEST_KEY"), "{error}");
    assert!(error.contains("at least 16"), "{error}");

    settings.token_digest_key = Some(DIGEST_KEY.to_vec());
    let debug = format!("{settings:?}");
    assert!(
        debug.contains("token_digest_key: Some(\"<redacted>\")"),
        "{debug}"
    );
    assert!(!debug.contains("7, 7"), "{debug}");
    assert!(app::build_state(&settings).await.is_ok());
}

#[test]
fn a_digest_key_is_64_hex_digits_or_base64_of_16_bytes_or_more() {
    let hex = "07".repeat(32);
    assert_eq!(app::parse_token_digest_key(&hex).unwrap(), DIGEST_KEY);
    let base64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    assert_eq!(app::parse_token_digest_key(base64).unwrap(), DIGEST_KEY);
    assert_eq!(
        app::parse_token_digest_key(" BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc\n").unwrap(),
        DIGEST_KEY
    );
    // 16 bytes is the least.
    assert_eq!(
        app::parse_token_digest_key("AAAAAAAAAAAAAAAAAAAAAA==").unwrap(),
        [0u8; 16]
    );
    for bad in [
        "c2VjcmV0",        // base64 of 6 bytes
        "not a key!",      // neither hex nor base64
        "",                // nothing
        &"z".repeat(64),   // 64 characters, not hex (a typo): not read as base64
        &"0".repeat(63),   // hex, a digit short: not read as base64
        &"A".repeat(1000), // too long
    ] {
        let error = app::parse_token_digest_key(bad).unwrap_err();
        assert!(bad.is_empty() || !error.contains(bad), "{error}");
    }
}

/// The process's one Prometheus recorder (there is one global recorder per process),
/// configured as the example's `main` configures it, installed on first use.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            app::prometheus_builder()
                .install_recorder()
                .expect("no other recorder in this test binary")
        })
        .clone()
}

/// One sample of a scrape: `name{label="value",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A scrape in Prometheus's text format, parsed (a line that is not of the format panics).
#[derive(Debug)]
struct Scrape {
    /// `# TYPE name kind`, by name.
    types: Vec<(String, String)>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(body: &str) -> Scrape {
        let mut scrape = Scrape {
            types: Vec::new(),
            samples: Vec::new(),
        };
        for line in body.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (name, kind) = (words.next(), words.next());
                    let (Some(name), Some(kind)) = (name, kind) else {
                        panic!("a TYPE line without a name and a type: {line:?}");
                    };
                    scrape.types.push((name.to_owned(), kind.to_owned()));
                }
                continue;
            }
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    /// The declared type of the metric `name` (`counter`, `histogram`, ...).
    fn kind(&self, name: &str) -> Option<&str> {
        self.types
            .iter()
            .find(|(declared, _)| declared == name)
            .map(|(_, kind)| kind.as_str())
    }

    /// The samples named `name` that have all of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.iter().any(|(k, v)| k == key && v == value))
        })
    }

    /// The sum of those samples (0 when there is none: a metric not reported yet).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .fold(0.0, |sum, sample| sum + sample.value)
    }

    /// Whether there is such a sample.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }
}

/// `name{label="value",...} value [timestamp]`, label values with `\\`, `\"` and `\n`
/// escaped.
fn parse_sample(line: &str) -> Sample {
    let malformed = |why: &str| -> ! { panic!("not a sample line ({why}): {line:?}") };
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or_else(|| malformed("no value"));
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        malformed("a bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices();
        loop {
            // A label name, `=`, a quoted value, then `,` or `}`.
            let mut key = String::new();
            let close = loop {
                match chars.next() {
                    Some((_, '=')) => break false,
                    Some((at, '}')) if key.trim().is_empty() => {
                        rest = &after_brace[at + 1..];
                        break true;
                    }
                    Some((_, c)) => key.push(c),
                    None => malformed("an unclosed label set"),
                }
            };
            if close {
                break;
            }
            if !matches!(chars.next(), Some((_, '"'))) {
                malformed("an unquoted label value");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => malformed("a bad escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => malformed("an unclosed label value"),
                }
            }
            labels.push((key.trim().trim_start_matches(',').trim().to_owned(), value));
            match chars.next() {
                Some((_, ',')) => {}
                Some((at, '}')) => {
                    rest = &after_brace[at + 1..];
                    break;
                }
                _ => malformed("no ',' or '}' after a label"),
            }
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| malformed("no value"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| malformed("a value that is not a number"));
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// What an operator scrapes: the instance's `/metrics` over HTTP, in Prometheus's text format,
/// with the hits, misses, loads, durations (as histograms) and invalidations that this
/// test's requests caused, compared between a scrape before them and one after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_in_the_prometheus_text_format_and_count_the_requests() {
    // First: the instance's caches register their metric handles when they are built.
    let metrics = prometheus();
    let redis = RedisServer::start();
    // A Redis that refuses CLIENT TRACKING (as some managed services do): the L1 falls back
    // to the pub/sub bus and publishes what this instance writes and invalidates, which
    // cachet_invalidations_sent_total counts. (With tracking, the server tells the other
    // instances itself, and nothing is sent.)
    let acl: String = redis
        .query(&["ACL", "SETUSER", "default", "-client|tracking"])
        .unwrap();
    assert_eq!(acl, "OK");
    let store = tempfile::tempdir().unwrap();
    let settings = tiered_settings(&redis, store.path(), Duration::ZERO);
    let instance = Instance::start_with(&settings, Some(metrics)).await;
    assert_eq!(instance.tiered().invalidation_mode(), InvalidationMode::Bus);

    let before = instance.scrape().await;
    // The PUT invalidates the org's keys (org:acme, org:id:1: two at least); the first GET misses the L1
    // and Redis and loads the org from the store (and caches it), the second is an L1 hit;
    // the unknown org misses and loads "not found".
    let put = instance.put_org("acme", "1", "Acme", "s3cr3t").await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(instance.get("/orgs/acme").await.view().name, "Acme");
    assert_eq!(instance.get("/orgs/acme").await.view().name, "Acme");
    assert_eq!(instance.get("/orgs/nobody").await.status, 404);
    assert_eq!(instance.store_loads(), 2);
    let after = instance.scrape().await;

    // Other tests' instances may report to the same recorder meanwhile: at least what this
    // test caused.
    let grew = |name: &str, labels: &[(&str, &str)], least: f64| {
        let (was, is) = (before.sum(name, labels), after.sum(name, labels));
        assert!(
            is - was >= least,
            "{name}{labels:?}: {was} before, {is} after, expected at least +{least}\n{:?}",
            after.matching(name, labels).collect::<Vec<_>>()
        );
    };
    for (name, kind) in [
        ("cachet_hits_total", "counter"),
        ("cachet_misses_total", "counter"),
        ("cachet_loads_total", "counter"),
        ("cachet_invalidations_sent_total", "counter"),
        ("cachet_operation_duration_seconds", "histogram"),
        ("cachet_load_duration_seconds", "histogram"),
    ] {
        assert_eq!(after.kind(name), Some(kind), "# TYPE of {name}");
    }
    grew("cachet_hits_total", &[("layer", "l1")], 1.0);
    grew("cachet_misses_total", &[("layer", "l1")], 2.0);
    grew("cachet_misses_total", &[("layer", "redis")], 2.0);
    grew("cachet_loads_total", &[("outcome", "loaded")], 1.0);
    grew("cachet_loads_total", &[("outcome", "negative")], 1.0);
    grew(
        "cachet_load_duration_seconds_count",
        &[("outcome", "loaded")],
        1.0,
    );
    grew("cachet_invalidations_sent_total", &[("source", "bus")], 2.0);
    let tiered_get = [("operation", "get"), ("backend", "tiered")];
    grew("cachet_operation_duration_seconds_count", &tiered_get, 3.0);
    grew(
        "cachet_operation_duration_seconds_count",
        &[("operation", "invalidate"), ("backend", "tiered")],
        2.0,
    );
    // A histogram with the example's buckets: every read is in the +Inf bucket, and the
    // buckets are cumulative.
    let bucket = "cachet_operation_duration_seconds_bucket";
    let le = |bound: &str| {
        let labels = [tiered_get[0], tiered_get[1], ("le", bound)];
        assert!(after.has(bucket, &labels), "no {bucket}{labels:?}");
        after.sum(bucket, &labels)
    };
    let bounds: Vec<String> = app::DURATION_BUCKETS
        .iter()
        .map(f64::to_string)
        .chain(["+Inf".to_owned()])
        .collect();
    let counts: Vec<f64> = bounds.iter().map(|bound| le(bound)).collect();
    assert!(
        counts.windows(2).all(|pair| pair[0] <= pair[1]),
        "{counts:?}"
    );
    assert_eq!(
        counts.last().copied(),
        Some(after.sum("cachet_operation_duration_seconds_count", &tiered_get))
    );
    assert!(after.sum("cachet_operation_duration_seconds_sum", &tiered_get) > 0.0);
    // No label of a scrape names a key, an org or a secret.
    for sample in &after.samples {
        for (_, value) in &sample.labels {
            assert!(
                !["acme", "nobody", "s3cr3t", "org:"]
                    .iter()
                    .any(|word| value.contains(word)),
                "{sample:?}"
            );
        }
    }
}
