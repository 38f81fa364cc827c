//! Arbitrary bytes into `cachet::codec::decode`, and into the MessagePack codec
//! (`codec::decode_with(&MessagePack, ..)`, given the bytes as they are and behind its header):
//! neither may panic, and whatever one accepts must encode again and decode to an equal value.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run codec_decode -- -max_total_time=20`
#![no_main]

use std::collections::HashMap;
use std::fmt::Debug;

use cachet::codec::{self, Codec, MessagePack};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const KEY: &str = "fuzz";

/// A tenant's context as an app would cache it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgContext {
    id: u64,
    slug: String,
    name: String,
    active: bool,
    balance_cents: i64,
    rate_limit_per_sec: f64,
    plan: Plan,
    parent: Option<OrgRef>,
    members: Vec<Member>,
    settings: HashMap<String, Setting>,
    feature_flags: HashMap<String, bool>,
    tags: Option<Vec<String>>,
    region: Region,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgRef {
    id: u64,
    slug: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    user_id: u64,
    email: String,
    role: Role,
    last_seen_unix: Option<i64>,
    score: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Role {
    Owner,
    Admin,
    Member,
    Guest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Plan {
    Free,
    Team { seats: u32, price: f64 },
    Enterprise(EnterprisePlan),
    Legacy(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EnterprisePlan {
    contract_id: String,
    sso: Option<Sso>,
    limits: HashMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Sso {
    Saml { metadata_url: String },
    Oidc { issuer: String, client_id: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Region {
    UsEast,
    EuWest,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Setting {
    Flag(bool),
    Int(i64),
    Number(f64),
    Text(String),
    List(Vec<String>),
    Nested(HashMap<String, String>),
}

/// Decodes `data` as `T`; on success, encode and decode again and compare.
///
/// JSON decoding cannot produce a non-finite float (serde_json rejects out-of-range
/// numbers), so `PartialEq` on types holding `f64` is exact here.
fn check<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = codec::decode::<T>(KEY, data) else {
        return;
    };
    let bytes = codec::encode(KEY, &value)
        .unwrap_or_else(|e| panic!("decoded value does not encode again: {e}\n{value:?}"));
    let again: T = codec::decode(KEY, &bytes).unwrap_or_else(|e| {
        panic!(
            "re-encoded value does not decode: {e}\nvalue: {value:?}\nbytes: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(
        value,
        again,
        "round trip changed the value; bytes: {}",
        String::from_utf8_lossy(&bytes)
    );
}

/// The same through a binary codec, which does decode `NaN`: values are compared with
/// `PartialEq`, or else as JSON values (where every `NaN` is `null`).
fn check_binary<T>(codec: &dyn Codec, data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = codec::decode_with::<T>(codec, KEY, data) else {
        return;
    };
    let bytes = codec::encode_with(codec, KEY, &value)
        .unwrap_or_else(|e| panic!("decoded value does not encode again: {e}\n{value:?}"));
    let again: T = codec::decode_with(codec, KEY, &bytes).unwrap_or_else(|e| {
        panic!("re-encoded value does not decode: {e}\nvalue: {value:?}\nbytes: {bytes:?}")
    });
    let as_json = |v: &T| serde_json::to_value(v).ok();
    assert!(
        value == again || as_json(&value) == as_json(&again),
        "round trip changed the value: {value:?} then {again:?}; bytes: {bytes:?}"
    );
}

/// One type through JSON, and through MessagePack given `data` as it is and behind the codec's
/// header (`tagged`, so that the fuzzer reaches the MessagePack decoder at once).
fn check_type<T>(data: &[u8], tagged: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    check::<T>(data);
    check_binary::<T>(&MessagePack, data);
    check_binary::<T>(&MessagePack, tagged);
}

fuzz_target!(|data: &[u8]| {
    let tagged = [&b"\0cb\x01"[..], data].concat();
    check_type::<OrgContext>(data, &tagged);
    check_type::<Vec<OrgContext>>(data, &tagged);
    check_type::<HashMap<String, Setting>>(data, &tagged);
    check_type::<Member>(data, &tagged);
    check_type::<Plan>(data, &tagged);
    check_type::<Option<Sso>>(data, &tagged);
    check_type::<String>(data, &tagged);
    check_type::<Vec<u8>>(data, &tagged);
    check_type::<u64>(data, &tagged);
    check_type::<i64>(data, &tagged);
    check_type::<f64>(data, &tagged);
    check_type::<bool>(data, &tagged);
    check_type::<Option<String>>(data, &tagged);
});
