//! The encryption decorator's cost, envelope version 1 (AES-256-GCM, what earlier releases
//! wrote) against version 2 (AES-256-GCM-SIV with an authenticated expiry, what this release
//! writes), in one run (criterion). Compare the rows of one group: the ratios are the result,
//! not the times.
//!
//! - `seal/<version>/<size>`: encrypt one value with a keyring (nonce drawn, envelope built),
//!   no cache; `open/<version>/<size>`: decrypt one such value (tag checked, expiry checked
//!   for version 2). Three sizes: a small value (64 bytes), an org context of about 1 KiB of
//!   JSON (851 bytes; the row names its exact length) and 16 KiB.
//! - `decorator_get_hit`: a typed `get` hit over moka of the org context: `plain_moka` reads
//!   it from a `MokaCacheService` directly (JSON decode only); the other two read it through
//!   `EncryptedCacheService`, stored in either envelope version (decrypt, then JSON decode).
//!
//! `cargo bench --bench encryption`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use cachet::{
    CacheService, CacheServiceExt, EncryptedCacheService, EncryptionKeys, MokaCacheService,
};
use common::{OrgContext, encode, runtime};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const TTL: Duration = Duration::from_secs(300);
const KEY: &str = "org:acme:context";
const V1: &str = "v1_aes256gcm";
const V2: &str = "v2_aes256gcmsiv";

fn keys() -> EncryptionKeys {
    EncryptionKeys::new(1, [0x42; 32])
}

/// An org context of about 1 KiB of JSON: the common sample with more settings.
fn org_1k() -> OrgContext {
    let mut org = OrgContext::sample(7);
    for i in 0..18 {
        org.settings
            .insert(format!("setting-{i:02}"), format!("value number {i:02}"));
    }
    org
}

/// The three values of the seal and open rows, with their row names.
fn values() -> Vec<(String, Bytes)> {
    let org = encode(&org_1k());
    eprintln!("org context: {} bytes of JSON", org.len());
    vec![
        ("64B".to_owned(), Bytes::from(vec![0x5a; 64])),
        (format!("org_{}B", org.len()), org),
        ("16KiB".to_owned(), Bytes::from(vec![0xa5; 16 * 1024])),
    ]
}

fn seal(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("seal");
    for (name, value) in values() {
        group.bench_with_input(BenchmarkId::new(V1, &name), &value, |b, v| {
            b.iter(|| black_box(keys.encrypt_v1(KEY, v).unwrap()))
        });
        group.bench_with_input(BenchmarkId::new(V2, &name), &value, |b, v| {
            b.iter(|| black_box(keys.encrypt(KEY, v, TTL).unwrap()))
        });
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("open");
    for (name, value) in values() {
        let v1 = keys.encrypt_v1(KEY, &value).unwrap();
        // Valid for the whole run: an expired value would be a (cheaper) miss.
        let v2 = keys
            .encrypt(KEY, &value, Duration::from_secs(24 * 3600))
            .unwrap();
        for (version, sealed) in [(V1, &v1), (V2, &v2)] {
            assert_eq!(keys.decrypt(KEY, sealed).unwrap().as_ref(), Some(&value));
            group.bench_with_input(BenchmarkId::new(version, &name), sealed, |b, s| {
                b.iter(|| black_box(keys.decrypt(KEY, s).unwrap()))
            });
        }
    }
    group.finish();
}

fn decorator_get_hit(c: &mut Criterion) {
    let rt = runtime();
    let moka = MokaCacheService::default();
    let cache = EncryptedCacheService::new(moka.clone(), keys());
    let org = org_1k();
    rt.block_on(async {
        moka.set("org:plain", &org, None).await.unwrap();
        let v1 = keys().encrypt_v1("org:v1", &encode(&org)).unwrap();
        moka.set_bytes("org:v1", v1, None).await.unwrap();
        cache.set("org:v2", &org, None).await.unwrap();
        assert_eq!(
            moka.get::<OrgContext>("org:plain").await.unwrap().as_ref(),
            Some(&org)
        );
        for key in ["org:v1", "org:v2"] {
            assert_eq!(
                cache.get::<OrgContext>(key).await.unwrap().as_ref(),
                Some(&org)
            );
        }
    });
    let mut group = c.benchmark_group("decorator_get_hit");
    group.bench_function("plain_moka", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(moka.get::<OrgContext>("org:plain").await.unwrap()) })
    });
    for (name, key) in [(V1, "org:v1"), (V2, "org:v2")] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(cache.get::<OrgContext>(key).await.unwrap()) })
        });
    }
    group.finish();
}

criterion_group!(benches, seal, open, decorator_get_hit);
criterion_main!(benches);
