//! The tower middleware itself: [`OrgLayer`] and the [`OrgService`] it makes, which find
//! the org ([`OrgSource`]), resolve it, and either call the inner service with a
//! [`ResolvedOrg`] or answer with an [`OrgRejection`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderName, HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::{OrgRejection, OrgSource, ResolvedOrg, STALE_HEADER};
use crate::org::{OrgResolver, OrgStore};

/// A tower [`Layer`] that resolves each request's org (see the [module docs](super)).
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
        let by_id = self.source.names_id();
        let ident = self.source.identify(&request);
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
