//! The module's tests: the wire format of both versions (known answers, every malformed
//! form), the keyring, key text, and the decorator.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::Aes256GcmSiv;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use bytes::Bytes;

use super::keys::{derive_v2_key, unix_ms};
use super::*;

const MINUTE: Duration = Duration::from_secs(60);

fn keys() -> EncryptionKeys {
    EncryptionKeys::new(1, [1u8; 32])
}

fn decrypt_error(keys: &EncryptionKeys, key: &str, stored: &[u8]) -> String {
    match keys.decrypt(key, &Bytes::copy_from_slice(stored)) {
        Err(e @ CacheError::Integrity { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(key), "names the key: {msg}");
            msg
        }
        other => panic!("expected Integrity for {stored:?}, got {other:?}"),
    }
}

fn plain(keys: &EncryptionKeys, key: &str, stored: &Bytes) -> Bytes {
    match keys.decrypt(key, stored) {
        Ok(Some(plain)) => plain,
        other => panic!("expected a value, got {other:?}"),
    }
}

/// Both versions of the same value, for tests that hold for either.
fn both(keys: &EncryptionKeys, key: &str, value: &[u8]) -> [Bytes; 2] {
    [
        keys.encrypt(key, value, MINUTE).unwrap(),
        keys.encrypt_v1(key, value).unwrap(),
    ]
}

#[test]
fn round_trip_of_empty_small_and_large_values() {
    let keys = keys();
    for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 1 << 20] {
        let value: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let sealed = keys.encrypt("k", &value, MINUTE).unwrap();
        assert_eq!(sealed.len(), HEADER_LEN + len + TAG_LEN);
        assert_eq!(&sealed[..2], MAGIC);
        assert_eq!(sealed[2], VERSION);
        assert_eq!(&sealed[3..7], &1u32.to_be_bytes());
        assert_eq!(plain(&keys, "k", &sealed), value);

        let old = keys.encrypt_v1("k", &value).unwrap();
        assert_eq!(old.len(), HEADER_LEN_V1 + len + TAG_LEN);
        assert_eq!(old[2], VERSION_V1);
        assert_eq!(plain(&keys, "k", &old), value);
    }
}

/// Computed independently of this code (Python's `cryptography` 48: AES-GCM for version
/// 1; HMAC-SHA256 and `AESGCMSIV` for version 2), so that the format cannot drift
/// unnoticed.
#[test]
fn known_answers_of_both_versions() {
    let keys = EncryptionKeys::new(1, [0x11u8; 32]);
    let v1 = hex::decode(
        "43530100000001000102030405060708090a0b68c1c67f1acd17ce36c8a1f0e6d299d205b1ad39691d\
         943bb2a73fe8da29",
    )
    .unwrap();
    let v2 = hex::decode(
        "435302000000010000018bcfe56800000102030405060708090a0b41b2575f7d9d2cd48f3da4565082\
         33a589db618c33c589d2e0ecbf30cf9d",
    )
    .unwrap();
    let value = br#"{"plan":"pro"}"#;
    let nonce_v1: [u8; 12] = std::array::from_fn(|i| i as u8);
    let nonce_v2: [u8; NONCE_LEN] = std::array::from_fn(|i| i as u8);
    assert_eq!(keys.seal_v1_with("org:acme", value, nonce_v1).unwrap(), v1);
    let expires = 1_700_000_000_000;
    assert_eq!(
        keys.seal_v2_with("org:acme", value, expires, nonce_v2)
            .unwrap(),
        v2
    );
    assert_eq!(
        hex::encode(*derive_v2_key(&EncryptionKey::from([0x11u8; 32]))),
        "d0f1820a9fae8f1b19343aac450e0e5669f5d1567deb7528ac295d8cbdb8e03d"
    );
    let before = UNIX_EPOCH + Duration::from_millis(expires - 1);
    let v2 = Bytes::from(v2);
    assert_eq!(
        keys.decrypt_at("org:acme", &v2, before).unwrap().as_deref(),
        Some(&value[..])
    );
    assert_eq!(
        keys.decrypt_at("org:acme", &v2, UNIX_EPOCH + Duration::from_millis(expires))
            .unwrap(),
        None
    );
    // Version 1 has no expiry: it reads at any time.
    assert_eq!(plain(&keys, "org:acme", &Bytes::from(v1)), &value[..]);
}

/// The primitive alone, pinned to RFC 8452 Appendix C.2 (AEAD_AES_256_GCM_SIV), apart
/// from the envelope: two of its vectors, one with a random-looking key, nonce, associated
/// data and a partial block, one with two full blocks of plaintext.
#[test]
fn the_v2_cipher_is_rfc_8452_aes_256_gcm_siv() {
    struct Vector {
        key: &'static str,
        nonce: &'static str,
        aad: &'static str,
        plaintext: &'static str,
        /// The ciphertext, then the tag.
        sealed: &'static str,
    }
    let vectors = [
        Vector {
            key: "bae8e37fc83441b16034566b7a806c46bb91c3c5aedb64a6c590bc84d1a5e269",
            nonce: "e4b47801afc0577e34699b9e",
            aad: "4fbdc66f14",
            plaintext: "671fdd",
            sealed: "0eaccb93da9bb81333aee0c785b240d319719d",
        },
        Vector {
            key: "0100000000000000000000000000000000000000000000000000000000000000",
            nonce: "030000000000000000000000",
            aad: "01",
            plaintext: "0200000000000000000000000000000003000000000000000000000000000000",
            sealed: "07dad364bfc2b9da89116d7bef6daaaf6f255510aa654f920ac81b94e8bad365\
                     aea1bad12702e1965604374aab96dbbc",
        },
    ];
    for v in vectors {
        let key: [u8; 32] = hex::decode(v.key).unwrap().try_into().unwrap();
        let nonce: [u8; 12] = hex::decode(v.nonce).unwrap().try_into().unwrap();
        let aad = hex::decode(v.aad).unwrap();
        let plaintext = hex::decode(v.plaintext).unwrap();
        let sealed = hex::decode(v.sealed).unwrap();
        let cipher = Aes256GcmSiv::new(&key.into());
        let mut buffer = plaintext.clone();
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), &aad, buffer.as_mut_slice().into())
            .unwrap();
        buffer.extend_from_slice(&tag);
        assert_eq!(hex::encode(&buffer), hex::encode(&sealed), "{}", v.key);
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = tag.try_into().unwrap();
        let mut opened = body.to_vec();
        cipher
            .decrypt_inout_detached(
                &nonce.into(),
                &aad,
                opened.as_mut_slice().into(),
                &tag.into(),
            )
            .unwrap();
        assert_eq!(opened, plaintext);
    }
}

#[test]
fn every_length_shorter_than_header_and_tag_is_an_error() {
    let keys = keys();
    for sealed in both(&keys, "k", b"") {
        assert_eq!(
            sealed.len(),
            if sealed[2] == VERSION {
                HEADER_LEN
            } else {
                HEADER_LEN_V1
            } + TAG_LEN
        );
        for len in 0..sealed.len() {
            let msg = decrypt_error(&keys, "k", &sealed[..len]);
            assert!(msg.contains("truncated"), "{msg}");
        }
    }
}

#[test]
fn truncated_and_extended_values_fail() {
    let keys = keys();
    for sealed in both(&keys, "k", b"a longer secret value") {
        for len in 0..sealed.len() {
            decrypt_error(&keys, "k", &sealed[..len]);
        }
        let mut longer = sealed.to_vec();
        longer.push(0);
        decrypt_error(&keys, "k", &longer);
    }
}

#[test]
fn bad_magic_and_unknown_versions_are_reported_as_such() {
    let keys = keys();
    let sealed = keys.encrypt("k", b"value", MINUTE).unwrap().to_vec();
    let mut magic = sealed.clone();
    magic[0] = b'X';
    assert!(decrypt_error(&keys, "k", &magic).contains("magic"));
    for version in [0u8, 3, 0x7f, 0xff] {
        let mut changed = sealed.clone();
        changed[2] = version;
        let msg = decrypt_error(&keys, "k", &changed);
        assert!(
            msg.ends_with(&format!("unknown format version {version}")),
            "{msg}"
        );
    }
    // A version 2 value relabelled 1 (and the reverse) parses, and fails the tag.
    let mut as_v1 = sealed.clone();
    as_v1[2] = VERSION_V1;
    assert!(decrypt_error(&keys, "k", &as_v1).contains("authentication failed"));
    let mut as_v2 = keys.encrypt_v1("k", &[7u8; 40]).unwrap().to_vec();
    as_v2[2] = VERSION;
    assert!(decrypt_error(&keys, "k", &as_v2).contains("authentication failed"));
    let plain_json = br#"{"id":1,"slug":"acme","secret":"a long enough plaintext"}"#;
    assert!(decrypt_error(&keys, "k", plain_json).contains("magic"));
}

#[test]
fn every_flipped_bit_fails() {
    let keys = keys();
    for sealed in both(&keys, "k", b"value") {
        let sealed = sealed.to_vec();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut flipped = sealed.clone();
                flipped[i] ^= 1 << bit;
                decrypt_error(&keys, "k", &flipped);
            }
        }
    }
}

#[test]
fn a_changed_expiry_fails_authentication_whichever_way() {
    let keys = keys();
    let now = SystemTime::now();
    let live = keys.encrypt_until("k", b"v", now + MINUTE).unwrap();
    let dead = keys.encrypt_until("k", b"v", now - MINUTE).unwrap();
    assert_eq!(
        keys.decrypt("k", &dead).unwrap(),
        None,
        "a miss, not an error"
    );
    for (sealed, new_expiry) in [
        (&dead, u64::MAX),
        (&dead, unix_ms(now + MINUTE)),
        (&live, 0),
        (&live, unix_ms(now - MINUTE)),
        (&live, unix_ms(now + MINUTE) + 1),
    ] {
        let mut changed = sealed.to_vec();
        changed[7..15].copy_from_slice(&new_expiry.to_be_bytes());
        let msg = decrypt_error(&keys, "k", &changed);
        assert!(msg.contains("authentication failed with key id 1"), "{msg}");
    }
}

#[test]
fn the_expiry_is_the_ttl_from_now_and_is_checked_at_read_time() {
    let keys = keys();
    let before = unix_ms(SystemTime::now());
    let sealed = keys.encrypt("k", b"v", Duration::from_secs(5)).unwrap();
    let after = unix_ms(SystemTime::now());
    let envelope = EncryptedEnvelope::parse("k", &sealed).unwrap();
    let expires = unix_ms(envelope.expires_at().unwrap());
    assert!(
        (before + 5000..=after + 5000).contains(&expires),
        "{expires}"
    );
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    assert!(
        keys.decrypt_at("k", &sealed, at(expires - 1))
            .unwrap()
            .is_some()
    );
    assert!(
        keys.decrypt_at("k", &sealed, at(expires))
            .unwrap()
            .is_none()
    );
    assert!(
        keys.decrypt_at("k", &sealed, at(u64::MAX))
            .unwrap()
            .is_none()
    );
    // Extremes: a TTL past the end of time saturates; an instant before the epoch is 0.
    let forever = keys.encrypt("k", b"v", Duration::MAX).unwrap();
    assert_eq!(&forever[7..15], &u64::MAX.to_be_bytes());
    let ancient = keys
        .encrypt_until("k", b"v", UNIX_EPOCH - Duration::from_secs(1))
        .unwrap();
    assert_eq!(&ancient[7..15], &[0u8; 8]);
    assert_eq!(keys.decrypt("k", &ancient).unwrap(), None);
    // A version 1 value has no expiry: it reads whenever.
    let old = keys.encrypt_v1("k", b"v").unwrap();
    assert_eq!(
        EncryptedEnvelope::parse("k", &old).unwrap().expires_at(),
        None
    );
    assert!(keys.decrypt_at("k", &old, at(u64::MAX)).unwrap().is_some());
}

#[test]
fn version_1_can_be_refused() {
    let keys = keys().accept_v1(false);
    let old = keys.encrypt_v1("k", b"v").unwrap();
    let msg = decrypt_error(&keys, "k", &old);
    assert!(msg.contains("version 1"), "{msg}");
    assert_eq!(
        plain(&keys, "k", &keys.encrypt("k", b"v", MINUTE).unwrap()),
        &b"v"[..]
    );
    assert!(format!("{keys:?}").contains("accept_v1: false"));
}

#[test]
fn a_changed_key_id_is_unknown_or_fails_authentication() {
    let keys = EncryptionKeys::new(1, [1u8; 32])
        .with_previous(2, [2u8; 32])
        .unwrap();
    for sealed in both(&keys, "k", b"value") {
        let sealed = sealed.to_vec();
        let mut other_known = sealed.clone();
        other_known[3..7].copy_from_slice(&2u32.to_be_bytes());
        let msg = decrypt_error(&keys, "k", &other_known);
        assert!(msg.contains("authentication failed with key id 2"), "{msg}");
        let mut unknown = sealed.clone();
        unknown[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
        let msg = decrypt_error(&keys, "k", &unknown);
        assert!(msg.contains(&format!("key id {}", u32::MAX)), "{msg}");
        assert!(msg.contains("which no configured key has"), "{msg}");
    }
}

#[test]
fn the_key_name_is_bound() {
    let keys = keys();
    for sealed in both(&keys, "org:acme", b"value") {
        for other in ["org:acm", "org:acme ", "", "org:acmf", "ORG:ACME"] {
            let msg = decrypt_error(&keys, other, &sealed);
            assert!(msg.contains("authentication failed with key id 1"), "{msg}");
        }
        assert_eq!(plain(&keys, "org:acme", &sealed), &b"value"[..]);
    }
}

#[test]
fn a_wrong_key_with_the_same_id_fails_authentication() {
    let impostor = EncryptionKeys::new(1, [9u8; 32]);
    for sealed in both(&keys(), "k", b"value") {
        assert!(decrypt_error(&impostor, "k", &sealed).contains("authentication failed"));
    }
}

#[test]
fn previous_keys_decrypt_and_the_current_one_encrypts() {
    let old = EncryptionKeys::new(1, [1u8; 32]);
    let rotated = EncryptionKeys::new(2, [2u8; 32])
        .with_previous(1, [1u8; 32])
        .unwrap();
    for sealed_old in both(&old, "k", b"old") {
        assert_eq!(plain(&rotated, "k", &sealed_old), &b"old"[..]);
        let only_new = EncryptionKeys::new(2, [2u8; 32]);
        let msg = decrypt_error(&only_new, "k", &sealed_old);
        assert!(msg.contains("key id 1"), "{msg}");
    }
    let sealed_new = rotated.encrypt("k", b"new", MINUTE).unwrap();
    assert_eq!(
        EncryptedEnvelope::parse("k", &sealed_new).unwrap().key_id(),
        2
    );
    let msg = decrypt_error(&old, "k", &sealed_new);
    assert!(msg.contains("key id 2"), "{msg}");
}

#[test]
fn duplicate_key_ids_are_a_config_error() {
    let err = EncryptionKeys::new(1, [1u8; 32])
        .with_previous(2, [2u8; 32])
        .unwrap()
        .with_previous(2, [3u8; 32])
        .unwrap_err();
    assert!(matches!(err, CacheError::Config { .. }), "{err}");
    assert!(err.to_string().contains("key id 2"), "{err}");
}

#[test]
fn nonces_differ_between_writes() {
    let keys = keys();
    let nonces: std::collections::HashSet<Vec<u8>> = (0..1000)
        .map(|_| {
            let sealed = keys.encrypt("k", b"same", MINUTE).unwrap();
            EncryptedEnvelope::parse("k", &sealed)
                .unwrap()
                .nonce()
                .to_vec()
        })
        .collect();
    assert_eq!(nonces.len(), 1000);
    assert!(nonces.iter().all(|n| n.len() == NONCE_LEN));
}

#[test]
fn the_two_versions_use_different_keys() {
    let key = EncryptionKey::from([3u8; 32]);
    assert_ne!(&*derive_v2_key(&key), key.as_bytes());
    assert_ne!(
        derive_v2_key(&key),
        derive_v2_key(&EncryptionKey::from([4u8; 32]))
    );
}

#[test]
fn the_decorator_seals_with_its_ttl_and_checks_it() {
    let service = EncryptedCacheService::new(crate::MokaCacheService::default(), keys());
    let value = Bytes::from(b"secret plaintext".to_vec());
    let sealed = service.seal("k", value, None).unwrap();
    assert_eq!(
        plain(service.keys(), "k", &sealed),
        &b"secret plaintext"[..]
    );
    let err = service
        .seal("k", Bytes::from_static(b"v"), Some(0))
        .unwrap_err();
    assert!(matches!(err, CacheError::InvalidArgument { .. }), "{err}");
}

#[test]
fn key_text_forms() {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i * 8 + 3) as u8);
    let expected = EncryptionKey::from(bytes);
    let hex_lower = hex::encode(bytes);
    let std_b64 = STANDARD_PAD_INDIFFERENT.encode(bytes);
    let url_b64 = URL_SAFE_PAD_INDIFFERENT.encode(bytes);
    assert_ne!(std_b64, url_b64, "the sample covers both alphabets");
    for text in [
        hex_lower.clone(),
        hex_lower.to_uppercase(),
        format!(" \t{hex_lower}\n"),
        std_b64.clone(),
        std_b64.trim_end_matches('=').to_owned(),
        url_b64.clone(),
        url_b64.trim_end_matches('=').to_owned(),
        format!("{std_b64}\n"),
    ] {
        assert_eq!(EncryptionKey::parse(&text).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn bad_key_text_is_a_config_error_that_does_not_repeat_it() {
    let b64_31 = STANDARD_PAD_INDIFFERENT.encode([5u8; 31]);
    let b64_33 = STANDARD_PAD_INDIFFERENT.encode([5u8; 33]);
    let b64_48 = STANDARD_PAD_INDIFFERENT.encode([5u8; 48]);
    let hex_62 = "ab".repeat(31);
    let hex_66 = "ab".repeat(33);
    let cases = [
        String::new(),
        "   ".to_owned(),
        "zz".repeat(32),
        hex_62,
        hex_66,
        b64_31,
        b64_33,
        b64_48,
        "é".repeat(32),
        "secret-key-material!".to_owned(),
        "x".repeat(10_000),
    ];
    for text in cases {
        match EncryptionKey::parse(&text) {
            Err(e @ CacheError::Config { .. }) => {
                let msg = e.to_string();
                if !text.trim().is_empty() {
                    assert!(!msg.contains(text.trim()), "{msg} repeats the input");
                }
            }
            other => panic!("{text:?}: expected Config, got {other:?}"),
        }
    }
}

#[test]
fn debug_shows_no_key_material() {
    let key_bytes = [0xabu8; 32];
    let keys = EncryptionKeys::new(5, key_bytes)
        .with_previous(4, [0xcdu8; 32])
        .unwrap();
    let service = EncryptedCacheService::new(crate::MokaCacheService::default(), keys);
    let debug = format!("{service:?} {:?}", EncryptionKey::from(key_bytes));
    for needle in ["ab, ab", "171", "0xab", "abab", "cdcd", "205"] {
        assert!(!debug.contains(needle), "{needle} in {debug}");
    }
    assert!(debug.contains("current_id: 5"), "{debug}");
    assert!(debug.contains("previous_ids: [4]"), "{debug}");
}

/// Keys are stored under their own names, so the decorator is the inner store's scope: every
/// clone over one store shares loads, and a load through it is reached by
/// `invalidate_in_flight` on the inner store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flight_scope_is_the_inner_stores() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::CacheServiceExt;

    let store = crate::MokaCacheService::default();
    let a = EncryptedCacheService::new(store.clone(), keys());
    let b = a.clone();
    assert_eq!(a.flight_scope(), store.flight_scope());
    assert_eq!(a.flight_scope(), b.flight_scope());
    assert_ne!(
        a.flight_scope(),
        EncryptedCacheService::new(crate::MokaCacheService::default(), keys()).flight_scope()
    );

    let loads = AtomicUsize::new(0);
    let counter = &loads;
    let slow = move || async move {
        counter.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, std::io::Error>("secret".to_owned())
    };
    let (x, y) = tokio::join!(
        a.get_or_load::<String, _, _, _>("k", None, slow),
        b.get_or_load::<String, _, _, _>("k", None, slow),
    );
    assert_eq!(x.unwrap(), "secret");
    assert_eq!(y.unwrap(), "secret");
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one loader call for both clones"
    );
    let stored = store.get_bytes("k").await.unwrap().unwrap();
    assert_eq!(
        EncryptedEnvelope::parse("k", &stored).unwrap().version(),
        VERSION
    );
}
