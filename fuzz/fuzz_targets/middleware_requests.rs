//! Arbitrary request targets, `Host` headers and org headers through the org middleware
//! (path segment, header and host sources; by slug and by id): never a panic, and nothing
//! reaches the store that is not a canonical identifier (ASCII letters, digits, `-`, `_`;
//! slugs lowercase and at most 63, ids at most 128).
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{HeaderName, Request, Response};
use cachet::middleware::{OrgLayer, OrgSource};
use cachet::org::{OrgIdentity, OrgStore, canonical_id, canonical_slug};
use cachet::{MokaCacheService, OrgResolver};
use libfuzzer_sys::fuzz_target;
use tower::{Layer, ServiceExt, service_fn};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Org {
    slug: String,
    id: String,
}

impl OrgIdentity for Org {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

/// Knows one org, `acme` / `42`, and checks everything it is handed.
#[derive(Clone, Default)]
struct CheckingStore {
    handed: Arc<Mutex<Vec<String>>>,
}

impl OrgStore for CheckingStore {
    type Context = Org;
    type Error = Infallible;
    async fn load_by_slug(&self, slug: &str) -> Result<Option<Org>, Infallible> {
        assert_eq!(
            canonical_slug(slug).ok().as_deref(),
            Some(slug),
            "slug {slug:?}"
        );
        self.handed.lock().unwrap().push(slug.to_owned());
        Ok((slug == "acme").then(|| Org {
            slug: "acme".into(),
            id: "42".into(),
        }))
    }
    async fn load_by_id(&self, id: &str) -> Result<Option<Org>, Infallible> {
        assert_eq!(canonical_id(id).ok().as_deref(), Some(id), "id {id:?}");
        self.handed.lock().unwrap().push(id.to_owned());
        Ok((id == "42").then(|| Org {
            slug: "acme".into(),
            id: "42".into(),
        }))
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    target: String,
    host: Option<Vec<u8>>,
    org_header: Option<Vec<u8>>,
    source: u8,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn resolver() -> Arc<OrgResolver<CheckingStore>> {
    // A fresh cache per input would hide nothing and cost a lot: one for the whole run.
    static RESOLVER: OnceLock<Arc<OrgResolver<CheckingStore>>> = OnceLock::new();
    Arc::clone(RESOLVER.get_or_init(|| {
        Arc::new(OrgResolver::new(
            Arc::new(MokaCacheService::default()),
            CheckingStore::default(),
        ))
    }))
}

fuzz_target!(|input: Input| {
    let mut request = Request::builder().uri(input.target.as_str());
    if let Some(host) = &input.host {
        request = request.header("host", host.as_slice());
    }
    if let Some(value) = &input.org_header {
        request = request.header("x-org", value.as_slice());
    }
    // What the HTTP layer would refuse never reaches the middleware.
    let Ok(request) = request.body(Body::empty()) else {
        return;
    };
    let source = match input.source % 3 {
        0 => OrgSource::path_segment(1),
        1 => OrgSource::header(HeaderName::from_static("x-org")),
        _ => OrgSource::host("example.com"),
    };
    let source = if input.source & 0x80 != 0 {
        source.by_id()
    } else {
        source
    };
    let inner = service_fn(|_request: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let service = OrgLayer::new(resolver(), source).layer(inner);
    let response = runtime().block_on(service.oneshot(request)).unwrap();
    let status = response.status().as_u16();
    assert!(matches!(status, 200 | 404), "status {status}");
});
