//! The multi-tenant layer (feature `tenancy`): org contexts ([`org`]), validated tokens
//! ([`token`]) and, with the `axum` feature, the request layer that resolves the org
//! ([`axum`]). Each is built on the public cache API only.

#[cfg(feature = "axum")]
pub mod axum;
pub mod org;
pub mod token;
