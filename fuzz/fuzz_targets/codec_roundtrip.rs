//! Structured values through `cachet::codec::encode` then `decode`: the result must equal
//! the input, and neither step may fail.
//!
//! JSON cannot carry `NaN` or the infinities (the codec documents it), so non-finite floats
//! are mapped to `0.0` before encoding.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run codec_roundtrip -- -max_total_time=20`
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use cachet::codec;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

const KEY: &str = "org:fuzz";

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
struct OrgContext {
    id: u64,
    slug: String,
    display_name: String,
    active: bool,
    created_unix: i64,
    rate_limit_per_sec: f64,
    burst: f32,
    max_upload_mb: u32,
    priority: i8,
    plan: Plan,
    parent: Option<OrgRef>,
    members: Vec<Member>,
    settings: BTreeMap<String, Setting>,
    quotas: BTreeMap<String, u64>,
    tags: Option<Vec<String>>,
    region: Region,
    logo_png: Option<Vec<u8>>,
    initial: char,
    billing: Billing,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
struct OrgRef {
    id: u64,
    slug: String,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
struct Member {
    user_id: u64,
    email: String,
    role: Role,
    last_seen_unix: Option<i64>,
    score: Option<f64>,
    groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary, Serialize, Deserialize)]
enum Role {
    Owner,
    Admin,
    Member,
    Guest,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
enum Plan {
    Free,
    Team { seats: u32, price: f64 },
    Enterprise(EnterprisePlan),
    Legacy(String),
    Trial(u16, Option<i64>),
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
struct EnterprisePlan {
    contract_id: String,
    sso: Option<Sso>,
    limits: BTreeMap<String, u64>,
    discount: f64,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Sso {
    Saml { metadata_url: String },
    Oidc { issuer: String, client_id: String },
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Region {
    UsEast,
    EuWest,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
enum Setting {
    Flag(bool),
    Int(i64),
    Unsigned(u64),
    Number(f64),
    Text(String),
    List(Vec<String>),
    Nested(BTreeMap<String, String>),
    Empty,
}

#[derive(Debug, Clone, PartialEq, Arbitrary, Serialize, Deserialize)]
struct Billing {
    currency: String,
    balance_cents: i64,
    tax_rate: f64,
    history: Vec<(i64, f64)>,
}

/// `x`, or `0.0` when it is `NaN` or infinite.
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

fn finite32(x: f32) -> f32 {
    if x.is_finite() { x } else { 0.0 }
}

impl OrgContext {
    /// Maps every non-finite float to `0.0`: JSON has no way to write them.
    fn make_finite(&mut self) {
        self.rate_limit_per_sec = finite(self.rate_limit_per_sec);
        self.burst = finite32(self.burst);
        match &mut self.plan {
            Plan::Team { price, .. } => *price = finite(*price),
            Plan::Enterprise(e) => e.discount = finite(e.discount),
            Plan::Free | Plan::Legacy(_) | Plan::Trial(..) => {}
        }
        for m in &mut self.members {
            m.score = m.score.map(finite);
        }
        for s in self.settings.values_mut() {
            if let Setting::Number(x) = s {
                *x = finite(*x);
            }
        }
        self.billing.tax_rate = finite(self.billing.tax_rate);
        for (_, amount) in &mut self.billing.history {
            *amount = finite(*amount);
        }
    }
}

fuzz_target!(|input: (OrgContext, Vec<Setting>, String, Vec<u8>)| {
    let (mut ctx, mut list, text, raw) = input;
    ctx.make_finite();
    for s in &mut list {
        if let Setting::Number(x) = s {
            *x = finite(*x);
        }
    }

    let bytes = codec::encode(KEY, &ctx).expect("encode OrgContext");
    let back: OrgContext = codec::decode(KEY, &bytes).unwrap_or_else(|e| {
        panic!(
            "decode OrgContext: {e}\nbytes: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(ctx, back, "bytes: {}", String::from_utf8_lossy(&bytes));

    let bytes = codec::encode(KEY, &list).expect("encode Vec<Setting>");
    let back: Vec<Setting> = codec::decode(KEY, &bytes).expect("decode Vec<Setting>");
    assert_eq!(list, back);

    let bytes = codec::encode(KEY, &text).expect("encode String");
    let back: String = codec::decode(KEY, &bytes).expect("decode String");
    assert_eq!(text, back);

    let bytes = codec::encode(KEY, &raw).expect("encode Vec<u8>");
    let back: Vec<u8> = codec::decode(KEY, &bytes).expect("decode Vec<u8>");
    assert_eq!(raw, back);
});
