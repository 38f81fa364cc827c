//! The org middleware end to end (a `Router` with the layer, an in-memory store that counts
//! its loads) and its parsing helpers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, Request, StatusCode};
use axum::routing::get;
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::source::{org_label, percent_decode};
use super::*;
use crate::load::{Frame, LoadError, now_ms};
use crate::org::{OrgIdentity, OrgResolver, OrgStore, slug_key};
use crate::{CacheError, CacheService, MokaCacheService, codec};

/// Bounds a request that must not hang (not a timing assert).
const HANG_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ctx {
    id: String,
    slug: String,
    name: String,
}

impl OrgIdentity for Ctx {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

fn acme() -> Ctx {
    Ctx {
        id: "42".into(),
        slug: "acme".into(),
        name: "Acme Corp".into(),
    }
}

/// The store's error; its text holds something a client must never see.
#[derive(Debug, thiserror::Error)]
#[error("database at db.internal:5432 refused user app password hunter2")]
struct StoreDown;

/// An in-memory test double for the app's store, counting its loads.
#[derive(Default)]
struct CountingStore {
    orgs: Mutex<HashMap<String, Ctx>>,
    loads: AtomicUsize,
    down: AtomicBool,
    hang: AtomicBool,
}

impl CountingStore {
    fn with(orgs: &[Ctx]) -> Self {
        let store = CountingStore::default();
        let mut map = store.orgs.lock().unwrap();
        for org in orgs {
            map.insert(org.slug.clone(), org.clone());
        }
        drop(map);
        store
    }

    async fn enter(&self) -> Result<(), StoreDown> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreDown);
        }
        Ok(())
    }
}

impl OrgStore for CountingStore {
    type Context = Ctx;
    type Error = StoreDown;

    async fn load_by_slug(&self, slug: &str) -> Result<Option<Ctx>, StoreDown> {
        self.enter().await?;
        Ok(self.orgs.lock().unwrap().get(slug).cloned())
    }

    async fn load_by_id(&self, id: &str) -> Result<Option<Ctx>, StoreDown> {
        self.enter().await?;
        let orgs = self.orgs.lock().unwrap();
        Ok(orgs.values().find(|org| org.id == id).cloned())
    }
}

fn resolver(store: CountingStore) -> Arc<OrgResolver<CountingStore>> {
    Arc::new(OrgResolver::new(
        Arc::new(MokaCacheService::default()),
        store,
    ))
}

async fn show(Extension(org): Extension<ResolvedOrg<Ctx>>) -> String {
    let stale = if org.is_stale() { " (stale)" } else { "" };
    format!("{} {}{stale}", org.slug, org.name)
}

fn router(resolver: &Arc<OrgResolver<CountingStore>>, route: &str, source: OrgSource) -> Router {
    Router::new()
        .route(route, get(show))
        .route_layer(OrgLayer::new(Arc::clone(resolver), source))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    rejection: Option<OrgRejection>,
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = tokio::time::timeout(HANG_BOUND, app.clone().oneshot(request))
        .await
        .expect("the middleware answered within the hang bound")
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let rejection = response.extensions().get::<OrgRejection>().cloned();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
        rejection,
    }
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn with_header(uri: &str, name: &str, value: &str) -> Request<Body> {
    Request::get(uri)
        .header(name, value)
        .body(Body::empty())
        .unwrap()
}

/// The request extension holds the cache's shared context: from the second request on
/// (the first is the load), every request gets the same `Arc`, decoded once.
#[tokio::test]
async fn requests_share_one_decoded_context() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let seen: Arc<Mutex<Vec<Arc<Ctx>>>> = Arc::default();
    let keep = Arc::clone(&seen);
    let app = Router::new()
        .route(
            "/orgs/{slug}",
            get(move |Extension(org): Extension<ResolvedOrg<Ctx>>| {
                let keep = Arc::clone(&keep);
                async move {
                    keep.lock().unwrap().push(Arc::clone(org.context_arc()));
                    "ok"
                }
            }),
        )
        .route_layer(OrgLayer::new(
            Arc::clone(&resolver),
            OrgSource::path_segment(1),
        ));
    for _ in 0..4 {
        assert_eq!(
            send(&app, get_req("/orgs/acme")).await.status,
            StatusCode::OK
        );
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|ctx| **ctx == acme()));
    assert!(
        Arc::ptr_eq(&seen[1], &seen[2]) && Arc::ptr_eq(&seen[2], &seen[3]),
        "hits share the decoded context"
    );
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn path_segment_puts_the_context_into_the_extensions() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let app = router(&resolver, "/orgs/{slug}/users", OrgSource::path_segment(1));
    for _ in 0..3 {
        let reply = send(&app, get_req("/orgs/acme/users")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "acme Acme Corp");
        assert!(reply.headers.get(STALE_HEADER).is_none());
        assert!(reply.rejection.is_none());
    }
    // Percent-encoded like axum's Path: %61 is 'a'.
    assert_eq!(
        send(&app, get_req("/orgs/%61cme/users")).await.status,
        StatusCode::OK
    );
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 1, "cached");
}

#[tokio::test]
async fn header_source_by_slug_and_by_id() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let slug_app = router(
        &resolver,
        "/me",
        OrgSource::header(HeaderName::from_static("x-org")),
    );
    let id_app = router(
        &resolver,
        "/me",
        OrgSource::header(HeaderName::from_static("x-org-id")).by_id(),
    );
    let reply = send(&slug_app, with_header("/me", "x-org", "acme")).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "acme Acme Corp")
    );
    let reply = send(&id_app, with_header("/me", "x-org-id", "42")).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "acme Acme Corp")
    );
    // The load by slug filled the id key too.
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 1);

    let missing = send(&slug_app, get_req("/me")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.rejection, Some(OrgRejection::Missing));
    let unknown_id = send(&id_app, with_header("/me", "x-org-id", "7")).await;
    assert_eq!(unknown_id.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown_id.rejection, Some(OrgRejection::NotFound));
}

#[tokio::test]
async fn host_source_takes_the_first_label_under_the_base_domain() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let app = router(&resolver, "/me", OrgSource::host("Example.com."));
    for host in [
        "acme.example.com",
        "acme.example.com:3000",
        "ACME.Example.COM.",
        "acme.eu.example.com",
    ] {
        let reply = send(&app, with_header("/me", "host", host)).await;
        assert_eq!(reply.status, StatusCode::OK, "{host}");
        assert_eq!(reply.body, "acme Acme Corp");
    }
    // HTTP/2 style: no Host header, the authority is in the URI.
    let reply = send(&app, get_req("http://acme.example.com/me")).await;
    assert_eq!(reply.status, StatusCode::OK);

    for host in [
        "example.com",
        "acme.example.org",
        "acmeexample.com",
        "[::1]:80",
    ] {
        let reply = send(&app, with_header("/me", "host", host)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{host}");
        assert_eq!(reply.rejection, Some(OrgRejection::Missing), "{host}");
    }
    let unknown = send(&app, with_header("/me", "host", "globex.example.com")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.rejection, Some(OrgRejection::NotFound));
    // An absolute-form request target wins over Host (RFC 9112, section 3.2.2): a
    // request for globex cannot borrow acme's context through its Host header.
    let absolute = send(
        &app,
        with_header("http://globex.example.com/me", "host", "acme.example.com"),
    )
    .await;
    assert_eq!(absolute.rejection, Some(OrgRejection::NotFound));
    let absolute = send(
        &app,
        with_header("http://acme.example.com/me", "host", "globex.example.com"),
    )
    .await;
    assert_eq!(absolute.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_org_is_404_and_cached_as_not_found() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    for _ in 0..3 {
        let reply = send(&app, get_req("/orgs/no-such-org")).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.body, "org not found\n");
        assert_eq!(reply.rejection, Some(OrgRejection::NotFound));
    }
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_slugs_are_404_without_reaching_the_store() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    let long = format!("/orgs/{}", "a".repeat(MAX_LEN_PLUS_ONE));
    for uri in [
        "/orgs/ac%20me", // whitespace
        "/orgs/id:42",   // would look like an id key
        "/orgs/%0Aacme", // control character
        "/orgs/%FF",     // not UTF-8
        "/orgs/%zz",     // broken escape
        "/orgs/acme%",   // truncated escape
        long.as_str(),
    ] {
        let reply = send(&app, get_req(uri)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.body, "org not found\n", "{uri}");
        assert!(
            matches!(reply.rejection, Some(OrgRejection::Malformed(_))),
            "{uri}: {:?}",
            reply.rejection
        );
    }
    // No such segment: the layer runs on a route with fewer segments.
    let short = router(&resolver, "/orgs", OrgSource::path_segment(1));
    let reply = send(&short, get_req("/orgs")).await;
    assert_eq!(reply.rejection, Some(OrgRejection::Missing));
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 0);
}

const MAX_LEN_PLUS_ONE: usize = crate::org::MAX_ID_LEN + 1;

#[tokio::test]
async fn store_down_with_nothing_cached_is_503_without_the_error_text() {
    let store = CountingStore::with(&[acme()]);
    store.down.store(true, Ordering::SeqCst);
    let resolver = resolver(store);
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    let reply = send(&app, get_req("/orgs/acme")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body, "org service temporarily unavailable\n");
    assert!(!reply.body.contains("hunter2"));
    assert!(
        reply
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
    );
    for value in reply.headers.values() {
        assert!(!value.as_bytes().windows(7).any(|w| w == b"hunter2"));
    }
    // The cause is kept for logs, in the response extensions.
    match reply.rejection {
        Some(OrgRejection::Unavailable(detail)) => assert!(detail.contains("hunter2")),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Errors are not cached: the store is back, the org is served.
    resolver.store().down.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&app, get_req("/orgs/acme")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn store_timeout_is_503() {
    let store = CountingStore::with(&[acme()]);
    store.hang.store(true, Ordering::SeqCst);
    let resolver = Arc::new(
        OrgResolver::new(Arc::new(MokaCacheService::default()), store)
            .load_timeout(Duration::from_millis(50)),
    );
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    let reply = send(&app, get_req("/orgs/acme")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(
        reply.rejection,
        Some(OrgRejection::Unavailable(_))
    ));
}

#[tokio::test]
async fn stale_fail_safe_context_is_served_with_the_stale_header() {
    let store = CountingStore::with(&[acme()]);
    store.down.store(true, Ordering::SeqCst);
    let cache = Arc::new(MokaCacheService::default());
    // The last known context: past its TTL, within the grace period.
    let key = slug_key("acme");
    let payload = codec::encode(&key, &acme()).unwrap();
    let now = now_ms();
    let frame = Frame::value(payload, now - 1_000, now + 3_600_000);
    cache
        .set_bytes(&key, frame.encode(), Some(3_600))
        .await
        .unwrap();
    let resolver = Arc::new(
        OrgResolver::new(cache, store)
            .ttl_secs(300)
            .fail_safe(Duration::from_secs(3_600)),
    );
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    for _ in 0..2 {
        let reply = send(&app, get_req("/orgs/acme")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "acme Acme Corp (stale)");
        assert_eq!(
            reply.headers.get(STALE_HEADER).map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
    }
    // The store was asked once; the second request got the throttled stale value.
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 1);
}

#[test]
fn rejections_map_to_statuses() {
    let loader: LoadError<StoreDown> = LoadError::Loader {
        key: crate::KeyName::new("org:acme"),
        source: Arc::new(StoreDown),
    };
    let cache: LoadError<StoreDown> =
        LoadError::Cache(CacheError::invalid_argument("org:acme", "ttl of 0"));
    assert_eq!(
        OrgRejection::from_load_error(loader).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A cache error past the identifier check is a server fault, not a 404.
    assert_eq!(
        OrgRejection::from_load_error(cache).status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(OrgRejection::Missing.status(), StatusCode::NOT_FOUND);
}

#[test]
fn host_labels_and_percent_decoding() {
    assert_eq!(
        org_label("acme.example.com", "example.com").as_deref(),
        Some("acme")
    );
    assert_eq!(
        org_label("a.b.example.com:1", "example.com").as_deref(),
        Some("a")
    );
    assert_eq!(org_label(".example.com", "example.com"), None);
    assert_eq!(org_label("example.com", "example.com"), None);
    assert_eq!(org_label("xexample.com", "example.com"), None);
    assert_eq!(percent_decode("acme").as_deref(), Some("acme"));
    assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
    assert_eq!(percent_decode("%e2%9c%93").as_deref(), Some("\u{2713}"));
    assert_eq!(percent_decode("%"), None);
    assert_eq!(percent_decode("%4"), None);
    assert_eq!(percent_decode("%c3"), None);
    assert_eq!(percent_decode("%+1"), None);
}

/// Every malformed escape the hand-written decoder rejected is still rejected, although
/// `percent-encoding` alone would keep it as it is.
#[test]
fn percent_decoding_rejects_every_broken_escape() {
    for broken in [
        "%",      // nothing after the %
        "acme%",  // truncated at the end
        "%4",     // one digit only
        "acme%4", // one digit at the end
        "%zz",    // no hex digit
        "%4z",    // second digit not hex
        "%z4",    // first digit not hex
        "%g0",    // just past 'f'
        "%%41",   // a % where a digit belongs
        "%41%",   // a good escape, then a broken one
        "%+1",    // a sign is not a digit
        "% 41",   // nor is a space
    ] {
        assert_eq!(percent_decode(broken), None, "{broken:?}");
    }
    // Decodes to bytes that are not UTF-8: a lone continuation byte, a truncated sequence,
    // an overlong encoding, a surrogate.
    for not_utf8 in ["%FF", "%80", "%c3", "%e2%9c", "%c0%af", "%ed%a0%80"] {
        assert_eq!(percent_decode(not_utf8), None, "{not_utf8:?}");
    }
    // Well-formed ones, either case, anywhere; an escaped % is an ordinary character.
    assert_eq!(percent_decode("%41%62c").as_deref(), Some("Abc"));
    assert_eq!(percent_decode("%2f%2F").as_deref(), Some("//"));
    assert_eq!(percent_decode("100%25").as_deref(), Some("100%"));
    assert_eq!(
        percent_decode("%2541").as_deref(),
        Some("%41"),
        "decoded once"
    );
    assert_eq!(percent_decode("").as_deref(), Some(""));
    // Nothing to decode: the text itself, not a copy.
    assert!(matches!(
        percent_decode("acme"),
        Some(Cow::Borrowed("acme"))
    ));
}

/// A broken escape in the path is rejected by the decoder (its message says so), before the
/// slug check, not passed through as a `%` for the slug check to catch.
#[tokio::test]
async fn broken_escapes_in_the_path_are_rejected_as_undecodable() {
    let resolver = resolver(CountingStore::with(&[acme()]));
    let app = router(&resolver, "/orgs/{slug}", OrgSource::path_segment(1));
    let by_id = router(&resolver, "/orgs/{id}", OrgSource::path_segment(1).by_id());
    for uri in [
        "/orgs/%zz",
        "/orgs/acme%",
        "/orgs/%4",
        "/orgs/%%41",
        "/orgs/%FF",
    ] {
        for app in [&app, &by_id] {
            let reply = send(app, get_req(uri)).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(
                reply.rejection,
                Some(OrgRejection::Malformed(
                    "path segment is not valid percent-encoded UTF-8".into()
                )),
                "{uri}"
            );
        }
    }
    assert_eq!(resolver.store().loads.load(Ordering::SeqCst), 0);
}
