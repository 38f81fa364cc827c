//! The behaviour every [`CacheService`](crate::CacheService) shares, as one suite of checks
//! (feature `conformance`): the contract itself (round trips, TTLs, invalidation, bad bytes,
//! unusual keys and values), the lease rule, and cache-aside (single flight, loader errors,
//! negative caching, fail-safe, load timeouts, eager refresh, the soft timeout).
//!
//! Each check is a `pub async fn(&dyn CacheService, prefix)` that panics with a message
//! naming what broke; [`CHECKS`] lists them all. Every key a check touches starts with `prefix`, so checks can run in
//! parallel against one shared server without flushing it: give each a fresh
//! [`unique_prefix`]. [`conformance_tests!`](crate::conformance_tests) turns the whole suite
//! into one `#[tokio::test]` per check for a given backend.
//!
//! The [`model`] module drives a service and a plain `BTreeMap` with the same operation
//! sequence, for property tests.
//!
//! ```
//! use cachet::{conformance, MokaCacheService};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let cache = MokaCacheService::default();
//! let prefix = conformance::unique_prefix("doc");
//! conformance::typed_round_trip(&cache, &prefix).await;
//! conformance::invalidate_prefix_is_literal(&cache, &prefix).await;
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::CacheError;

/// Declares the suite: for each file of checks, the names of its `pub async fn` checks.
///
/// From this one list come the public re-exports (`conformance::<check>`), [`CHECKS`], and
/// the hidden exported macro `__cachet_conformance_checks!` through which
/// [`conformance_tests!`](crate::conformance_tests) generates one test per check. A name
/// listed without its function does not resolve, and a check left out of the list is dead
/// code (denied on the check modules): either way the crate does not build, so the list
/// cannot drift from the checks.
///
/// `$d` is a `$` token the macro passes to itself (as `[$]`), so that the macro it defines
/// can have metavariables of its own.
macro_rules! checks {
    (@with [$d:tt] $($file:ident: $($check:ident),+ $(,)?;)+) => {
        $(pub use self::$file::{$($check),+};)+

        /// The names of every check, in the order
        /// [`conformance_tests!`](crate::conformance_tests) generates their tests.
        pub const CHECKS: &[&str] = &[$($(stringify!($check)),+),+];

        /// Calls `callback! { args.. check check .. }` with the name of every check, in the
        /// order of [`CHECKS`](crate::conformance::CHECKS). Used by
        /// [`conformance_tests!`](crate::conformance_tests); not an API of its own.
        #[doc(hidden)]
        #[macro_export]
        macro_rules! __cachet_conformance_checks {
            ($d($d callback:ident)::+ ! { $d($d args:tt)* }) => {
                $d($d callback)::+ ! { $d($d args)* $($($check)+)+ }
            };
        }
    };
    ($($files:tt)+) => {
        checks!(@with [$] $($files)+);
    };
}

checks! {
    batch:
        get_many_answers_every_key_in_order,
        load_many_asks_for_exactly_the_missed_keys,
        load_many_caches_not_found_and_never_errors,
        load_many_awaits_a_key_another_caller_loads,
        crossed_batches_load_each_key_once;
    basic:
        typed_round_trip,
        typed_primitives_round_trip,
        stored_null_is_not_missing,
        missing_key_is_none,
        overwrite_replaces_value,
        ttl_expires_entry,
        default_ttl_outlives_short_ttl,
        overwrite_resets_ttl,
        zero_ttl_is_invalid_argument,
        too_long_ttl_is_invalid_argument,
        invalidate_removes_exactly_one_key,
        invalidate_missing_key_is_ok,
        invalidate_prefix_counts_removed,
        invalidate_prefix_is_literal,
        invalidate_prefix_without_match_is_zero,
        invalidate_prefix_skips_expired,
        corrupt_bytes_are_serialization_error,
        wrong_type_is_serialization_error,
        empty_key,
        unusual_keys,
        huge_key,
        empty_value,
        binary_value,
        huge_value,
        concurrent_tasks;
    leases:
        lease_on_a_missing_key_reads_as_a_miss,
        lease_is_voided_by_set_invalidate_and_prefix,
        released_lease_frees_the_key,
        lease_expires_unless_renewed,
        renewal_never_takes_a_voided_lease,
        lease_replaces_only_the_value_seen,
        dropped_lease_is_released,
        load_overtaken_by_an_invalidation_is_not_cached,
        load_overtaken_by_a_set_keeps_the_set;
    load:
        concurrent_misses_load_once,
        load_sources_say_where_the_value_came_from,
        loader_error_reaches_every_waiter_and_is_not_cached,
        a_cancelled_leader_hands_over,
        hits_do_not_call_the_loader,
        not_found_is_cached_only_when_asked,
        fail_safe_serves_the_last_value_within_its_grace,
        a_slow_loader_times_out_for_every_caller,
        corrupt_entries_are_reloaded_and_overwritten,
        invalid_options_are_errors;
    refresh:
        eager_refresh_reloads_before_expiry,
        eager_refresh_runs_once_for_concurrent_hits,
        eager_refresh_never_undoes_an_invalidation,
        eager_refresh_never_overwrites_a_set,
        replace_if_swaps_only_the_version_seen,
        soft_timeout_serves_stale_to_waiters,
        soft_timeout_waiters_get_a_load_that_finishes_in_time;
    shared:
        shared_round_trip,
        shared_value_follows_writes_and_invalidations,
        shared_wrong_type_is_serialization_error,
        shared_value_expires_with_its_ttl,
        shared_cache_aside;
    tags:
        invalidate_tag_hides_exactly_its_entries,
        tags_are_literal_and_unused_tags_are_fine,
        bad_tags_are_invalid_arguments,
        corrupt_tagged_bytes_are_integrity_errors;
}

#[deny(dead_code)]
mod basic;
#[deny(dead_code)]
mod batch;
#[deny(dead_code)]
mod leases;
#[deny(dead_code)]
mod load;
pub mod model;
#[deny(dead_code)]
mod refresh;
#[deny(dead_code)]
mod shared;
#[deny(dead_code)]
mod tags;

/// Generates one `#[tokio::test]` per conformance check (see [`CHECKS`]), each on a fresh
/// service built by `$make` (an expression evaluated inside the async test; it may `.await`)
/// and with its own key prefix. The caller's crate needs `tokio` with the `macros` and
/// `rt-multi-thread` features.
///
/// ```no_run
/// mod moka {
///     cachet::conformance_tests!(cachet::MokaCacheService::default());
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::__cachet_conformance_checks!($crate::conformance_tests! { @each [$make] });
    };
    (@each [$make:expr] $($check:ident)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let cache = $make;
            let prefix = $crate::conformance::unique_prefix(stringify!($check));
            $crate::conformance::$check(&cache, &prefix).await;
        }
    )+};
}

/// A key prefix no other test uses: `cachet-test:<name>:<random hex>:`.
pub fn unique_prefix(name: &str) -> String {
    let random: u64 = rand::random();
    format!("cachet-test:{name}:{random:016x}:")
}

/// A realistic tenant context: nested structs, options, lists, maps, unicode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgContext {
    /// Database id.
    pub id: u64,
    /// URL slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Billing plan.
    pub plan: Plan,
    /// Feature flags.
    pub features: Vec<String>,
    /// Free-form settings.
    pub settings: BTreeMap<String, String>,
    /// Per-region limits.
    pub limits: HashMap<String, u32>,
    /// Single sign-on, when configured.
    pub sso: Option<SsoConfig>,
    /// Parent org, when any.
    pub parent_id: Option<u64>,
    /// A ratio with a fractional part.
    pub discount: f64,
    /// Whether the org is suspended.
    pub suspended: bool,
}

/// Billing plan of an [`OrgContext`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Plan {
    /// Free tier.
    Free,
    /// Paid tier with a seat count.
    Pro {
        /// Seats paid for.
        seats: u32,
    },
    /// Custom contract.
    Enterprise(String),
}

/// Single sign-on settings of an [`OrgContext`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SsoConfig {
    /// Identity provider URL.
    pub issuer: String,
    /// Client id at the provider.
    pub client_id: String,
    /// Decrypted client secret.
    pub client_secret: String,
    /// Allowed e-mail domains.
    pub domains: Vec<String>,
}

impl OrgContext {
    /// A sample context for org number `n`.
    pub fn sample(n: u64) -> Self {
        OrgContext {
            id: n,
            slug: format!("org-{n}"),
            name: format!("Société Ünïcødé {n} — 東京 🚀"),
            plan: match n % 3 {
                0 => Plan::Free,
                1 => Plan::Pro { seats: 25 },
                _ => Plan::Enterprise("contract \"A\"\n\tline 2".into()),
            },
            features: vec!["sso".into(), "audit-log".into(), format!("beta-{n}")],
            settings: BTreeMap::from([
                ("locale".into(), "fr-FR".into()),
                ("timezone".into(), "Europe/Paris".into()),
                ("empty".into(), String::new()),
            ]),
            limits: HashMap::from([("eu".into(), 1000), ("us".into(), 250)]),
            sso: (n % 2 == 0).then(|| SsoConfig {
                issuer: "https://idp.example.com/realms/acme".into(),
                client_id: format!("client-{n}"),
                client_secret: "s3cr3t-πσ".into(),
                domains: vec!["acme.example".into(), "acme.test".into()],
            }),
            parent_id: (n % 5 == 0).then_some(n / 5),
            discount: 0.125 + n as f64 / 1000.0,
            suspended: n % 7 == 0,
        }
    }
}

pub(crate) fn ok<T>(what: &str, result: Result<T, CacheError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    /// What `conformance_tests!` generates, as names: the same walk over the list.
    macro_rules! generated {
        ($($check:ident)+) => {
            [$(stringify!($check)),+]
        };
    }

    #[test]
    fn checks_and_generated_tests_agree() {
        let generated: &[&str] = &__cachet_conformance_checks!(generated! {});
        assert_eq!(generated, super::CHECKS);
        let mut unique = generated.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), generated.len(), "every check is listed once");
    }
}
