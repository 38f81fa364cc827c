//! Arbitrary bytes read through `EncryptedCacheService` (stored raw in the inner service, then
//! read back through the decorator, both `get_bytes` and the `get_bytes_now` fast path):
//! never a panic, always `CacheError::Integrity` naming the key, and the stored bytes stay
//! as they were. Each input is also tried behind a valid header of both envelope versions (1:
//! AES-256-GCM; 2: AES-256-GCM-SIV with an authenticated expiry) for a current, a previous
//! and an unknown key id, so that the paths past the magic and version checks (key lookup, tag
//! check) get fuzzed on every run. Finally the input is split into a key name and a value: the
//! value round-trips under that name in both versions and does not decrypt under another; a
//! version-2 value past its expiry is a miss, and one with changed expiry bytes fails.
//!
//! The inner service is a one-slot store defined here rather than moka: moka keeps and frees
//! memory in the background, which makes libFuzzer run a leak scan after every input.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use bytes::Bytes;
use std::time::{Duration, SystemTime};

use cachet::decorate::encrypted::{HEADER_LEN, HEADER_LEN_V1, TAG_LEN, VERSION, VERSION_V1};
use cachet::{CacheError, CacheService, EncryptedCacheService, EncryptedEnvelope, EncryptionKeys};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "org:fuzz";

/// Holds the bytes of one key, `KEY`; answers on the fast path too.
#[derive(Debug, Default)]
struct Slot(Mutex<Option<Bytes>>);

impl Slot {
    fn put(&self, value: Bytes) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }

    fn read(&self, key: &str) -> Option<Bytes> {
        assert_eq!(key, KEY);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait]
impl CacheService for Slot {
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        Ok(self.read(key))
    }

    fn get_bytes_now(&self, key: &str) -> Option<Result<Option<Bytes>, CacheError>> {
        Some(Ok(self.read(key)))
    }

    async fn set_bytes(&self, key: &str, value: Bytes, _: Option<u64>) -> Result<(), CacheError> {
        assert_eq!(key, KEY);
        self.put(value);
        Ok(())
    }

    async fn invalidate(&self, _: &str) -> Result<(), CacheError> {
        unreachable!("the fuzz target only reads")
    }

    async fn invalidate_prefix(&self, _: &str) -> Result<u64, CacheError> {
        unreachable!("the fuzz target only reads")
    }
}

fn service() -> &'static EncryptedCacheService<Slot> {
    static SERVICE: OnceLock<EncryptedCacheService<Slot>> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let keys = EncryptionKeys::new(1, [1u8; 32])
            .with_previous(2, [2u8; 32])
            .expect("distinct key ids");
        EncryptedCacheService::new(Slot::default(), keys)
    })
}

/// Runs a future that completes without waiting (the slot never waits).
fn ready<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the one-slot store did not answer at once"),
    }
}

fn check_answer(stored: &Bytes, answer: Result<Option<Bytes>, CacheError>) {
    match answer {
        // Forging a tag is not expected; if it ever happens, the plaintext must fit.
        Ok(Some(plain)) => {
            let header = if stored[2] == VERSION {
                HEADER_LEN
            } else {
                HEADER_LEN_V1
            };
            assert_eq!(plain.len() + header + TAG_LEN, stored.len());
        }
        // A miss only for a version-2 value (past its expiry), which needs a forged tag too.
        Ok(None) => assert_eq!(stored[2], VERSION),
        Err(e @ CacheError::Integrity { .. }) => {
            assert!(e.to_string().contains(KEY), "names the key: {e}");
        }
        other => panic!("expected an Integrity error, got {other:?}"),
    }
}

fn check_stored(stored: Bytes) {
    let service = service();
    service.inner().put(stored.clone());
    check_answer(&stored, ready(service.get_bytes(KEY)));
    check_answer(
        &stored,
        service
            .get_bytes_now(KEY)
            .expect("the slot has a fast path"),
    );
    assert_eq!(
        service.inner().read(KEY),
        Some(stored.clone()),
        "left untouched"
    );

    if let Ok(envelope) = EncryptedEnvelope::parse(KEY, &stored) {
        let header = match envelope.version() {
            VERSION => HEADER_LEN,
            VERSION_V1 => HEADER_LEN_V1,
            other => panic!("parsed an unknown version {other}"),
        };
        assert_eq!(envelope.ciphertext().len() + header, stored.len());
        assert!(envelope.ciphertext().len() >= TAG_LEN);
        assert_eq!(envelope.key_id().to_be_bytes(), stored[3..7]);
        assert_eq!(
            envelope.expires_at().is_some(),
            envelope.version() == VERSION
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check_stored(Bytes::copy_from_slice(data));
    for version in [VERSION_V1, VERSION] {
        for key_id in [1u32, 2, 3] {
            let mut enveloped = b"CS".to_vec();
            enveloped.push(version);
            enveloped.extend_from_slice(&key_id.to_be_bytes());
            enveloped.extend_from_slice(data);
            check_stored(Bytes::from(enveloped));
        }
    }

    // Round trip through the decorator, under a key name taken from the input.
    let keys = service().keys();
    let split = data
        .first()
        .map_or(0, |&n| usize::from(n) % 32)
        .min(data.len());
    let (name, value) = data.split_at(split);
    let name = String::from_utf8_lossy(name);
    let now = SystemTime::now();
    let sealed = keys
        .encrypt(&name, value, Duration::from_secs(3600))
        .expect("encrypt");
    let old = keys.encrypt_v1(&name, value).expect("encrypt v1");
    for sealed in [&sealed, &old] {
        assert_eq!(
            keys.decrypt(&name, sealed).expect("decrypt").as_deref(),
            Some(value)
        );
        assert!(keys.decrypt(&format!("{name}!"), sealed).is_err());
    }
    // Past its expiry, a miss; with its expiry bytes changed, an error.
    let dead = keys
        .encrypt_until(&name, value, now - Duration::from_secs(1))
        .expect("encrypt");
    assert_eq!(keys.decrypt(&name, &dead).expect("a miss"), None);
    let mut extended = dead.to_vec();
    extended[7..15].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(keys.decrypt(&name, &Bytes::from(extended)).is_err());
    service().inner().put(sealed);
    assert_eq!(
        ready(service().get_bytes(KEY)).ok(),
        (name == KEY).then(|| Some(Bytes::copy_from_slice(value)))
    );
});
