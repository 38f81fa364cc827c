//! A tower middleware for axum (feature `axum`): resolves the request's org through an
//! [`OrgResolver`](crate::OrgResolver) and hands its context to the handlers.
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
//!
//! The module's parts: [`OrgSource`] finds and checks the identifier (`source.rs`),
//! [`OrgRejection`] answers when there is no org (`rejection.rs`), [`ResolvedOrg`] is what
//! the handlers get (`resolved.rs`), and [`OrgLayer`] / [`OrgService`] tie them together
//! (`layer.rs`).

mod layer;
mod rejection;
mod resolved;
mod source;

pub use layer::{OrgLayer, OrgService};
pub use rejection::OrgRejection;
pub use resolved::{ResolvedOrg, STALE_HEADER};
pub use source::OrgSource;

#[cfg(test)]
mod tests;
