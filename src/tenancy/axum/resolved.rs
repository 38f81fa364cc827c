//! What a handler receives: the request extension [`ResolvedOrg`], and the header
//! ([`STALE_HEADER`]) that marks a response served with a fail-safe context.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::load::LoadSource;
use crate::org::Resolved;

/// The response header set on responses served with a stale org context (fail-safe):
/// `x-org-stale: true`. Responses with a fresh context do not carry it.
///
/// ```
/// assert_eq!(cachet::middleware::STALE_HEADER, "x-org-stale");
/// ```
pub const STALE_HEADER: &str = "x-org-stale";

/// The org context of a request, as [`OrgLayer`](super::OrgLayer) put it into the request
/// extensions: a cheap clone (an `Arc` of the context), dereferencing to the context.
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

    /// A resolved org whose context is already shared.
    pub fn shared(context: Arc<C>, source: LoadSource) -> Self {
        ResolvedOrg { context, source }
    }
}

impl<C> From<Resolved<C>> for ResolvedOrg<C> {
    /// The resolver's shared context, as it is (no copy).
    fn from(resolved: Resolved<C>) -> Self {
        ResolvedOrg::shared(resolved.context, resolved.source)
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
