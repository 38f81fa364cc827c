//! The encryption decorator's cost, envelope version 1 (AES-256-GCM, what earlier releases
//! wrote) against version 2 (XChaCha20-Poly1305 with an authenticated expiry, what this
//! release writes), in one run (criterion). Compare the rows of one group: the ratios are the
//! result, not the times.
//!
//! - `seal_open/<size>`: encrypt then decrypt one value with a keyring, no cache: the crypto
//!   and envelope cost alone, for a small value (64 bytes) and an org context of about 1 KiB
//!   of JSON.
//! - `decorator_get_hit`: a typed `get` hit through `EncryptedCacheService` over moka, the
//!   stored value in either version (decrypt and JSON decode of the 1 KiB org context).
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

fn seal_open(c: &mut Criterion) {
    let keys = keys();
    let org = encode(&org_1k());
    let small = Bytes::from(vec![0x5a; 64]);
    eprintln!("org context: {} bytes of JSON", org.len());
    let mut group = c.benchmark_group("seal_open");
    for (name, value) in [("64B", &small), ("org_1KiB", &org)] {
        let key = "org:acme:context";
        group.bench_with_input(BenchmarkId::new("v1_aes256gcm", name), value, |b, v| {
            b.iter(|| {
                let sealed = keys.encrypt_v1(key, v).unwrap();
                black_box(keys.decrypt(key, &sealed).unwrap())
            })
        });
        group.bench_with_input(
            BenchmarkId::new("v2_xchacha20poly1305", name),
            value,
            |b, v| {
                b.iter(|| {
                    let sealed = keys.encrypt(key, v, TTL).unwrap();
                    black_box(keys.decrypt(key, &sealed).unwrap())
                })
            },
        );
    }
    group.finish();
}

fn decorator_get_hit(c: &mut Criterion) {
    let rt = runtime();
    let moka = MokaCacheService::default();
    let cache = EncryptedCacheService::new(moka.clone(), keys());
    let org = org_1k();
    rt.block_on(async {
        let v1 = keys().encrypt_v1("org:v1", &encode(&org)).unwrap();
        moka.set_bytes("org:v1", v1, None).await.unwrap();
        cache.set("org:v2", &org, None).await.unwrap();
        for key in ["org:v1", "org:v2"] {
            assert_eq!(
                cache.get::<OrgContext>(key).await.unwrap().as_ref(),
                Some(&org)
            );
        }
    });
    let mut group = c.benchmark_group("decorator_get_hit");
    for (name, key) in [
        ("v1_aes256gcm", "org:v1"),
        ("v2_xchacha20poly1305", "org:v2"),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(cache.get::<OrgContext>(key).await.unwrap()) })
        });
    }
    group.finish();
}

criterion_group!(benches, seal_open, decorator_get_hit);
criterion_main!(benches);
