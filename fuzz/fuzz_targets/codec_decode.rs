//! Arbitrary bytes into `cachet::codec::decode`: it must never panic, and whatever it
//! accepts must encode again and decode to an equal value.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run codec_decode -- -max_total_time=20`
#![no_main]

use std::collections::HashMap;
use std::fmt::Debug;

use cachet::codec;
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

fuzz_target!(|data: &[u8]| {
    check::<OrgContext>(data);
    check::<Vec<OrgContext>>(data);
    check::<HashMap<String, Setting>>(data);
    check::<Member>(data);
    check::<Plan>(data);
    check::<Option<Sso>>(data);
    check::<String>(data);
    check::<Vec<u8>>(data);
    check::<u64>(data);
    check::<i64>(data);
    check::<f64>(data);
    check::<bool>(data);
    check::<Option<String>>(data);
});
