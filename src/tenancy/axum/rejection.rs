//! How [`OrgLayer`](super::OrgLayer) answers when it cannot resolve the org:
//! [`OrgRejection`], its status code and its fixed body.

use std::fmt;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::load::LoadError;

/// Why [`OrgLayer`](super::OrgLayer) answered a request itself instead of calling the inner service. It is
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
    /// The identifier is malformed (see [`validate_slug`](crate::org::validate_slug)): 404. Holds what is wrong.
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

    /// The rejection for a failed resolution: 503 when the store failed or timed out,
    /// 500 for any other cache error.
    pub(super) fn from_load_error<E: fmt::Display>(error: LoadError<E>) -> Self {
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
