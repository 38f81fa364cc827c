//! Property tests: random operation sequences give the same results on the in-memory backend
//! as on a plain `BTreeMap`, and the same results on a real Redis as on the in-memory backend.

mod support;

use cachet::conformance::model::{Op, run_on_model, run_on_service};
use cachet::conformance::unique_prefix;
use cachet::{CacheService, MokaCacheService, RedisCacheService};
use proptest::prelude::*;
use support::RedisServer;

/// Keys from a small alphabet, glob characters included, so that operations collide often
/// and prefixes with `*`, `?`, `[`, `]`, `\` get exercised.
fn key() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop::sample::select(vec!['a', 'b', ':', '*', '?', '[', ']', '\\', '^', 'é']),
        0..4,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(k, v)| Op::Set(k, v)),
        4 => key().prop_map(Op::Get),
        1 => key().prop_map(Op::Invalidate),
        1 => key().prop_map(Op::InvalidatePrefix),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn moka_matches_btreemap(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cache = MokaCacheService::default();
        let prefix = unique_prefix("model");
        let got = runtime.block_on(run_on_service(&cache as &dyn CacheService, &prefix, &ops));
        prop_assert_eq!(got, run_on_model(&ops));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn redis_matches_moka(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (on_redis, on_moka) = runtime.block_on(async {
            let redis = RedisCacheService::new(&RedisServer::shared().url(), 300).await.unwrap();
            let moka = MokaCacheService::default();
            let prefix = unique_prefix("model-redis");
            (
                run_on_service(&redis, &prefix, &ops).await,
                run_on_service(&moka, &prefix, &ops).await,
            )
        });
        prop_assert_eq!(&on_redis, &on_moka);
        prop_assert_eq!(on_redis, run_on_model(&ops));
    }
}
