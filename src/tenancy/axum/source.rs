//! Where a request names its org: [`OrgSource`] (a path segment, a header, or a subdomain
//! of a base domain), and the checks an identifier passes before it reaches the resolver.

use std::borrow::Cow;

use axum::http::header::HOST;
use axum::http::{HeaderName, Request};
use percent_encoding::percent_decode_str;

use super::OrgRejection;
use crate::org::{validate_id, validate_slug};

/// Where in a request [`OrgLayer`](super::OrgLayer) finds the org, and whether it names the org by slug
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
    /// (in `/orgs/acme/users`, segment 1 is `acme`), percent-decoded like axum's `Path`,
    /// but stricter: a broken escape (a `%` not followed by two hex digits) or a decoded
    /// value that is not UTF-8 is a malformed identifier (404), where axum's `Path` would
    /// keep the `%` as it is.
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

    /// The value is the org's id, resolved with [`OrgResolver::by_id`](crate::OrgResolver::by_id), instead of its slug.
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

    /// Whether the identifier is the org's id ([`by_id`](Self::by_id)) rather than its slug.
    pub(super) fn names_id(&self) -> bool {
        self.by_id
    }

    /// The org identifier of `request`, checked ([`validate_slug`] or [`validate_id`]), or
    /// why there is none.
    pub(super) fn identify<B>(&self, request: &Request<B>) -> Result<String, OrgRejection> {
        match self.find(request) {
            Ident::Found(ident) => {
                let checked = if self.by_id {
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
        }
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
pub(super) fn org_label(host: &str, base_domain: &str) -> Option<String> {
    if host.starts_with('[') {
        return None; // an IPv6 literal
    }
    let host = host.split(':').next().unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let subdomain = host.strip_suffix(base_domain)?.strip_suffix('.')?;
    let label = subdomain.split('.').next().unwrap_or(subdomain);
    (!label.is_empty()).then(|| label.to_owned())
}

/// Decodes `%XX` escapes; `None` when an escape is broken (a `%` not followed by two hex
/// digits) or the result is not UTF-8.
///
/// `percent-encoding` keeps a broken escape as it is (`%zz` stays `%zz`), so they are
/// looked for first: a request whose identifier cannot be decoded names no org.
pub(super) fn percent_decode(text: &str) -> Option<Cow<'_, str>> {
    // A hex digit is never a `%`, so every `%` in the text must start an escape.
    let bytes = text.as_bytes();
    let well_formed = text.match_indices('%').all(|(at, _)| {
        bytes
            .get(at + 1..at + 3)
            .is_some_and(|digits| digits.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_decode_str(text).decode_utf8().ok()
}
