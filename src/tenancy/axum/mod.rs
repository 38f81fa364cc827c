//! A tower middleware for axum (feature `axum`): resolves the request's org through an
//! [`OrgResolver`] and hands its context to the handlers.
//!
//! [`OrgLayer`] takes the org's slug (or id) from where [`OrgSource`] says: a path segment,
//! a header, or the first label of the `Host` under a base domain. Then:
//!
//! | what the resolver says | response |
//! | --- | --- |
//! | the org | the inner service runs, with a [`ResolvedOrg`] in the request extensions (take it with axum's `Extension<ResolvedOrg<C>>`) |
//! | the last known org, served by fail-safe because the store failed | the same, and the response carries `x-org-stale: true` ([`STALE_HEADER`]) |
//! | no such org; no identifier in the request, or a malformed one | `404 Not Found` |
//! | the store failed or timed out, and nothing usable is cached | `503 Service Unavailable` |
//! | another cache error (a value that does not encode, a bad TTL setting) | `500 Internal Server Error` |
//!
//! The bodies of these responses are short fixed texts: the error behind a 503 or 500 never
//! goes to the client (it may name a database or hold a secret). It is in the response's
//! extensions instead, as an [`OrgRejection`], for an outer layer that logs.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Extension, Router, body::Body, http::{Request, StatusCode}, routing::get};
//! use cachet::middleware::{OrgLayer, OrgSource, ResolvedOrg};
//! use cachet::org::{OrgIdentity, OrgStore};
//! use cachet::{CacheService, MokaCacheService, OrgResolver};
//! use serde::{Deserialize, Serialize};
//! use tower::ServiceExt; // oneshot
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct OrgContext { id: String, slug: String, name: String }
//!
//! impl OrgIdentity for OrgContext {
//!     fn org_slug(&self) -> &str { &self.slug }
//!     fn org_id(&self) -> String { self.id.clone() }
//! }
//!
//! struct Database;
//!
//! impl OrgStore for Database {
//!     type Context = OrgContext;
//!     type Error = std::io::Error;
//!     async fn load_by_slug(&self, slug: &str) -> Result<Option<OrgContext>, std::io::Error> {
//!         Ok((slug == "acme").then(|| OrgContext {
//!             id: "42".into(), slug: "acme".into(), name: "Acme Corp".into(),
//!         }))
//!     }
//!     async fn load_by_id(&self, _id: &str) -> Result<Option<OrgContext>, std::io::Error> {
//!         Ok(None)
//!     }
//! }
//!
//! async fn dashboard(Extension(org): Extension<ResolvedOrg<OrgContext>>) -> String {
//!     format!("welcome to {}", org.name)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let cache: Arc<dyn CacheService> = Arc::new(MokaCacheService::default());
//! let resolver = Arc::new(OrgResolver::new(cache, Database));
//! let app = Router::new()
//!     .route("/orgs/{slug}/dashboard", get(dashboard))
//!     // Segment 1 of /orgs/{slug}/dashboard; route_layer: unmatched paths stay plain 404s.
//!     .route_layer(OrgLayer::new(resolver, OrgSource::path_segment(1)));
//!
//! let request = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
//! let found = app.clone().oneshot(request("/orgs/acme/dashboard")).await.unwrap();
//! assert_eq!(found.status(), StatusCode::OK);
//! let unknown = app.oneshot(request("/orgs/nope/dashboard")).await.unwrap();
//! assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::header::{CONTENT_TYPE, HOST};
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use crate::load::{LoadError, LoadSource};
use crate::org::{OrgResolver, OrgStore, Resolved, validate_id, validate_slug};

/// The response header set on responses served with a stale org context (fail-safe):
/// `x-org-stale: true`. Responses with a fresh context do not carry it.
///
/// ```
/// assert_eq!(cachet::middleware::STALE_HEADER, "x-org-stale");
/// ```
pub const STALE_HEADER: &str = "x-org-stale";

/// The org context of a request, as [`OrgLayer`] put it into the request extensions: a
/// cheap clone (an `Arc` of the context), dereferencing to the context.
///
/// Take it in a handler with `axum::Extension<ResolvedOrg<C>>`, or from
/// `request.extensions()` in another middleware.
///
/// ```
/// use cachet::LoadSource;
/// use cachet::middleware::ResolvedOrg;
///
/// #[derive(Debug)]
/// struct OrgContext { name: String }
///
/// // Handlers can be unit-tested with a hand-made one.
/// let org = ResolvedOrg::new(OrgContext { name: "Acme".into() }, LoadSource::Stale);
/// assert_eq!(org.name, "Acme");          // Deref to the context
/// assert!(org.is_stale());
/// let copy = org.clone();                // an Arc clone, not a copy of the context
/// assert!(std::sync::Arc::ptr_eq(copy.context_arc(), org.context_arc()));
/// ```
pub struct ResolvedOrg<C> {
    context: Arc<C>,
    source: LoadSource,
}

impl<C> ResolvedOrg<C> {
    /// A resolved org: the context and where it came from.
    pub fn new(context: C, source: LoadSource) -> Self {
        ResolvedOrg {
            context: Arc::new(context),
            source,
        }
    }

    /// The org's context.
    pub fn context(&self) -> &C {
        &self.context
    }

    /// The shared context, to keep it past the request without copying it.
    pub fn context_arc(&self) -> &Arc<C> {
        &self.context
    }

    /// Where the context came from: the cache, a store load (this request's or a concurrent
    /// one's), or fail-safe ([`LoadSource::Stale`]).
    pub fn source(&self) -> LoadSource {
        self.source
    }

    /// Whether the store failed and this is the last known context (fail-safe); the
    /// response then carries [`STALE_HEADER`].
    pub fn is_stale(&self) -> bool {
        self.source == LoadSource::Stale
    }
}

impl<C> From<Resolved<C>> for ResolvedOrg<C> {
    fn from(resolved: Resolved<C>) -> Self {
        let source = resolved.source;
        ResolvedOrg::new(resolved.context, source)
    }
}

impl<C> Clone for ResolvedOrg<C> {
    fn clone(&self) -> Self {
        ResolvedOrg {
            context: Arc::clone(&self.context),
            source: self.source,
        }
    }
}

impl<C> Deref for ResolvedOrg<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.context
    }
}

impl<C: fmt::Debug> fmt::Debug for ResolvedOrg<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedOrg")
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

/// Where in a request [`OrgLayer`] finds the org, and whether it names the org by slug
/// (the default) or by id ([`by_id`](Self::by_id)).
///
/// ```
/// use axum::http::HeaderName;
/// use cachet::middleware::OrgSource;
///
/// let path = OrgSource::path_segment(1);                        // /orgs/{slug}/...
/// let header = OrgSource::header(HeaderName::from_static("x-org-id")).by_id();
/// let host = OrgSource::host("example.com");                    // acme.example.com -> acme
/// # let _ = (path, header, host);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgSource {
    place: Place,
    by_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    PathSegment(usize),
    Header(HeaderName),
    Host { base_domain: String },
}

/// What a request says about its org.
#[derive(Debug, PartialEq, Eq)]
enum Ident<'a> {
    Found(Cow<'a, str>),
    Missing,
    Malformed(&'static str),
}

impl OrgSource {
    /// The `index`-th segment of the request path, counted from 0 after the leading `/`
    /// (in `/orgs/acme/users`, segment 1 is `acme`), percent-decoded like axum's `Path`.
    ///
    /// Under `Router::nest`, the path the layer sees is the one inside the nested router
    /// (without the nest prefix) when the layer is on the nested router.
    ///
    /// ```
    /// let source = cachet::middleware::OrgSource::path_segment(1);
    /// # let _ = source;
    /// ```
    pub fn path_segment(index: usize) -> Self {
        OrgSource {
            place: Place::PathSegment(index),
            by_id: false,
        }
    }

    /// The value of the header `name` (for example `x-org`); a missing header, or one that
    /// is not visible ASCII, is a 404.
    ///
    /// ```
    /// use axum::http::HeaderName;
    ///
    /// let source = cachet::middleware::OrgSource::header(HeaderName::from_static("x-org"));
    /// # let _ = source;
    /// ```
    pub fn header(name: HeaderName) -> Self {
        OrgSource {
            place: Place::Header(name),
            by_id: false,
        }
    }

    /// The first label of the request's host under `base_domain`: with base domain
    /// `example.com`, `acme.example.com` (any port) names `acme`, and so does
    /// `acme.eu.example.com`. The host comes from the request URI's authority when it has
    /// one (an absolute-form request target, HTTP/2's `:authority`: then `Host` is ignored,
    /// RFC 9112 section 3.2.2), else from the `Host` header, compared case-insensitively. A
    /// host that is the base domain itself, or not under it, names no org: 404.
    ///
    /// ```
    /// let source = cachet::middleware::OrgSource::host("example.com");
    /// # let _ = source;
    /// ```
    pub fn host(base_domain: impl Into<String>) -> Self {
        let base_domain = base_domain.into();
        let base_domain = base_domain.trim_matches('.').to_ascii_lowercase();
        OrgSource {
            place: Place::Host { base_domain },
            by_id: false,
        }
    }

    /// The value is the org's id, resolved with [`OrgResolver::by_id`], instead of its slug.
    ///
    /// ```
    /// use axum::http::HeaderName;
    ///
    /// let source =
    ///     cachet::middleware::OrgSource::header(HeaderName::from_static("x-org-id")).by_id();
    /// # let _ = source;
    /// ```
    pub fn by_id(mut self) -> Self {
        self.by_id = true;
        self
    }

    /// What the request says about its org.
    fn find<'a, B>(&self, request: &'a Request<B>) -> Ident<'a> {
        match &self.place {
            Place::PathSegment(index) => {
                let path = request.uri().path();
                let path = path.strip_prefix('/').unwrap_or(path);
                match path.split('/').nth(*index) {
                    None | Some("") => Ident::Missing,
                    Some(segment) => match percent_decode(segment) {
                        Some(decoded) => Ident::Found(decoded),
                        None => Ident::Malformed("path segment is not valid percent-encoded UTF-8"),
                    },
                }
            }
            Place::Header(name) => match request.headers().get(name) {
                None => Ident::Missing,
                Some(value) => match value.to_str() {
                    Ok(text) => Ident::Found(Cow::Borrowed(text)),
                    Err(_) => Ident::Malformed("header is not visible ASCII"),
                },
            },
            Place::Host { base_domain } => {
                // An absolute-form request target (or HTTP/2's :authority) names the host;
                // the Host header then does not count (RFC 9112, section 3.2.2).
                let host = match (request.uri().host(), request.headers().get(HOST)) {
                    (Some(host), _) => Some(host),
                    (None, Some(value)) => match value.to_str() {
                        Ok(text) => Some(text),
                        Err(_) => return Ident::Malformed("Host header is not visible ASCII"),
                    },
                    (None, None) => None,
                };
                match host {
                    None => Ident::Missing,
                    Some(host) => match org_label(host, base_domain) {
                        Some(label) => Ident::Found(Cow::Owned(label)),
                        None => Ident::Missing,
                    },
                }
            }
        }
    }
}

/// The first label of `host` (port and trailing dot removed, lowercased) under
/// `base_domain`, when it is under it.
fn org_label(host: &str, base_domain: &str) -> Option<String> {
    if host.starts_with('[') {
        return None; // an IPv6 literal
    }
    let host = host.split(':').next().unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let subdomain = host.strip_suffix(base_domain)?.strip_suffix('.')?;
    let label = subdomain.split('.').next().unwrap_or(subdomain);
    (!label.is_empty()).then(|| label.to_owned())
}

/// Decodes `%XX` escapes; `None` when an escape is broken or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains('%') {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (high, low) = (
                hex_value(*bytes.get(i + 1)?)?,
                hex_value(*bytes.get(i + 2)?)?,
            );
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Why [`OrgLayer`] answered a request itself instead of calling the inner service. It is
/// the response (through [`IntoResponse`]), and the response also carries it in its
/// extensions, so that an outer layer can log the cause, which the body never shows.
///
/// ```
/// use axum::http::StatusCode;
/// use axum::response::IntoResponse;
/// use cachet::middleware::OrgRejection;
///
/// let rejection = OrgRejection::Unavailable("loading key \"org:acme\" failed: db down".into());
/// assert_eq!(rejection.status(), StatusCode::SERVICE_UNAVAILABLE);
/// let response = rejection.into_response();
/// assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
/// let logged = response.extensions().get::<OrgRejection>().unwrap();
/// assert!(logged.to_string().contains("db down")); // for logs; never in the body
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OrgRejection {
    /// The request names no org (no such path segment, header or subdomain): 404.
    Missing,
    /// The identifier is malformed (see [`validate_slug`]): 404. Holds what is wrong.
    Malformed(String),
    /// The store has no such org: 404.
    NotFound,
    /// The store failed or timed out and nothing usable is cached: 503. Holds the error's
    /// text, for logs only.
    Unavailable(String),
    /// Another cache error, such as a context that does not encode: 500. Holds the error's
    /// text, for logs only.
    Internal(String),
}

impl OrgRejection {
    /// The response status: 404, 503 or 500.
    pub fn status(&self) -> StatusCode {
        match self {
            OrgRejection::Missing | OrgRejection::Malformed(_) | OrgRejection::NotFound => {
                StatusCode::NOT_FOUND
            }
            OrgRejection::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OrgRejection::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The fixed body sent to the client.
    fn body(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "org not found\n",
            StatusCode::SERVICE_UNAVAILABLE => "org service temporarily unavailable\n",
            _ => "internal error\n",
        }
    }

    fn from_load_error<E: fmt::Display>(error: LoadError<E>) -> Self {
        match error {
            LoadError::Loader { .. } | LoadError::Timeout { .. } => {
                OrgRejection::Unavailable(error.to_string())
            }
            other => OrgRejection::Internal(other.to_string()),
        }
    }
}

impl fmt::Display for OrgRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrgRejection::Missing => f.write_str("the request names no org"),
            OrgRejection::Malformed(what) => write!(f, "malformed org identifier: {what}"),
            OrgRejection::NotFound => f.write_str("no such org"),
            OrgRejection::Unavailable(error) => write!(f, "org store unavailable: {error}"),
            OrgRejection::Internal(error) => write!(f, "org resolution failed: {error}"),
        }
    }
}

impl IntoResponse for OrgRejection {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body()).into_response();
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response.extensions_mut().insert(self);
        response
    }
}

/// A tower [`Layer`] that resolves each request's org (see the [module docs](self)).
///
/// ```
/// # use cachet::org::{OrgIdentity, OrgStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Serialize, Deserialize)]
/// # struct OrgContext { id: String, slug: String }
/// # impl OrgIdentity for OrgContext {
/// #     fn org_slug(&self) -> &str { &self.slug }
/// #     fn org_id(&self) -> String { self.id.clone() }
/// # }
/// # struct Database;
/// # impl OrgStore for Database {
/// #     type Context = OrgContext;
/// #     type Error = std::io::Error;
/// #     async fn load_by_slug(&self, slug: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok((slug == "acme").then(|| OrgContext { id: "42".into(), slug: "acme".into() }))
/// #     }
/// #     async fn load_by_id(&self, id: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok((id == "42").then(|| OrgContext { id: "42".into(), slug: "acme".into() }))
/// #     }
/// # }
/// use std::sync::Arc;
/// use std::time::Duration;
/// use axum::{Extension, Router, body::Body, http::{Request, StatusCode}, routing::get};
/// use cachet::middleware::{OrgLayer, OrgSource, ResolvedOrg, STALE_HEADER};
/// use cachet::{MokaCacheService, OrgResolver};
/// use tower::ServiceExt;
///
/// async fn whoami(Extension(org): Extension<ResolvedOrg<OrgContext>>) -> String {
///     org.slug.clone()
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let resolver = OrgResolver::new(Arc::new(MokaCacheService::default()), Database)
///     .ttl_secs(300)
///     .fail_safe(Duration::from_secs(3600)) // serve the last known org when the store fails
///     .load_timeout(Duration::from_secs(2));
/// let layer = OrgLayer::new(Arc::new(resolver), OrgSource::host("example.com"));
/// let app = Router::new().route("/whoami", get(whoami)).route_layer(layer);
///
/// let request = Request::get("/whoami")
///     .header("host", "acme.example.com:8080")
///     .body(Body::empty())
///     .unwrap();
/// let response = app.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), StatusCode::OK);
/// assert!(response.headers().get(STALE_HEADER).is_none()); // fresh
/// # }
/// ```
pub struct OrgLayer<S> {
    resolver: Arc<OrgResolver<S>>,
    source: Arc<OrgSource>,
}

impl<S: OrgStore> OrgLayer<S> {
    /// A layer that finds the org where `source` says and resolves it through `resolver`.
    pub fn new(resolver: Arc<OrgResolver<S>>, source: OrgSource) -> Self {
        OrgLayer {
            resolver,
            source: Arc::new(source),
        }
    }
}

impl<S> Clone for OrgLayer<S> {
    fn clone(&self) -> Self {
        OrgLayer {
            resolver: Arc::clone(&self.resolver),
            source: Arc::clone(&self.source),
        }
    }
}

impl<S> fmt::Debug for OrgLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgLayer")
            .field("resolver", &self.resolver)
            .field("source", &self.source)
            .finish()
    }
}

impl<S, I> Layer<I> for OrgLayer<S> {
    type Service = OrgService<S, I>;

    fn layer(&self, inner: I) -> OrgService<S, I> {
        OrgService {
            inner,
            resolver: Arc::clone(&self.resolver),
            source: Arc::clone(&self.source),
        }
    }
}

/// The [`Service`] made by [`OrgLayer`]: resolves the org, then calls `inner` or answers
/// with an [`OrgRejection`].
///
/// ```
/// # use cachet::org::{OrgIdentity, OrgStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Serialize, Deserialize)]
/// # struct OrgContext { id: String, slug: String }
/// # impl OrgIdentity for OrgContext {
/// #     fn org_slug(&self) -> &str { &self.slug }
/// #     fn org_id(&self) -> String { self.id.clone() }
/// # }
/// # struct Database;
/// # impl OrgStore for Database {
/// #     type Context = OrgContext;
/// #     type Error = std::io::Error;
/// #     async fn load_by_slug(&self, _: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok(None)
/// #     }
/// #     async fn load_by_id(&self, id: &str) -> Result<Option<OrgContext>, std::io::Error> {
/// #         Ok((id == "42").then(|| OrgContext { id: "42".into(), slug: "acme".into() }))
/// #     }
/// # }
/// use std::sync::Arc;
/// use axum::{body::Body, http::{HeaderName, Request, StatusCode}, response::IntoResponse};
/// use cachet::middleware::{OrgLayer, OrgSource};
/// use cachet::{MokaCacheService, OrgResolver};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let resolver = Arc::new(OrgResolver::new(Arc::new(MokaCacheService::default()), Database));
/// let source = OrgSource::header(HeaderName::from_static("x-org-id")).by_id();
/// // Any tower service whose response is IntoResponse can be wrapped, not only a Router.
/// let service = OrgLayer::new(resolver, source).layer(service_fn(|_req: Request<Body>| async {
///     Ok::<_, std::convert::Infallible>("hello".into_response())
/// }));
/// let request = Request::get("/").header("x-org-id", "42").body(Body::empty()).unwrap();
/// assert_eq!(service.oneshot(request).await.unwrap().status(), StatusCode::OK);
/// # }
/// ```
pub struct OrgService<S, I> {
    inner: I,
    resolver: Arc<OrgResolver<S>>,
    source: Arc<OrgSource>,
}

impl<S, I: Clone> Clone for OrgService<S, I> {
    fn clone(&self) -> Self {
        OrgService {
            inner: self.inner.clone(),
            resolver: Arc::clone(&self.resolver),
            source: Arc::clone(&self.source),
        }
    }
}

impl<S, I: fmt::Debug> fmt::Debug for OrgService<S, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgService")
            .field("inner", &self.inner)
            .field("resolver", &self.resolver)
            .field("source", &self.source)
            .finish()
    }
}

impl<S, I, B> Service<Request<B>> for OrgService<S, I>
where
    S: OrgStore + 'static,
    I: Service<Request<B>> + Clone + Send + 'static,
    I::Response: IntoResponse,
    I::Future: Send,
    B: Send + 'static,
{
    type Response = Response;
    type Error = I::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, I::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), I::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The instance that was polled ready serves this request; a clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let resolver = Arc::clone(&self.resolver);
        let by_id = self.source.by_id;
        let ident = match self.source.find(&request) {
            Ident::Found(ident) => {
                let checked = if by_id {
                    validate_id(&ident)
                } else {
                    validate_slug(&ident)
                };
                match checked {
                    Ok(()) => Ok(ident.into_owned()),
                    Err(error) => Err(OrgRejection::Malformed(error.to_string())),
                }
            }
            Ident::Missing => Err(OrgRejection::Missing),
            Ident::Malformed(what) => Err(OrgRejection::Malformed(what.to_owned())),
        };
        Box::pin(async move {
            let ident = match ident {
                Ok(ident) => ident,
                Err(rejection) => return Ok(rejection.into_response()),
            };
            let resolved = if by_id {
                resolver.by_id(&ident).await
            } else {
                resolver.by_slug(&ident).await
            };
            let org = match resolved {
                Ok(Some(resolved)) => ResolvedOrg::from(resolved),
                Ok(None) => return Ok(OrgRejection::NotFound.into_response()),
                Err(error) => return Ok(OrgRejection::from_load_error(error).into_response()),
            };
            let stale = org.is_stale();
            request.extensions_mut().insert(org);
            let mut response = inner.call(request).await?.into_response();
            if stale {
                response.headers_mut().insert(
                    HeaderName::from_static(STALE_HEADER),
                    HeaderValue::from_static("true"),
                );
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::HeaderMap;
    use axum::routing::get;
    use axum::{Extension, Router};
    use serde::{Deserialize, Serialize};
    use tower::ServiceExt;

    use super::*;
    use crate::load::{Frame, now_ms};
    use crate::org::{OrgIdentity, slug_key};
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

    fn router(
        resolver: &Arc<OrgResolver<CountingStore>>,
        route: &str,
        source: OrgSource,
    ) -> Router {
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
}
