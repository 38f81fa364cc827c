//! The codecs: round trips, the types a binary format gets wrong, cross-codec reads, garbage.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::fmt::Debug;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::*;
use crate::{BoxError, CacheError};

const KEY: &str = "org:acme";

fn codecs() -> [&'static dyn Codec; 3] {
    [&Json, &MessagePack, &Outside]
}

/// Encodes and decodes `value` with `codec`, through the helpers.
fn round_trip<T>(codec: &dyn Codec, value: &T) -> T
where
    T: Serialize + DeserializeOwned + Debug,
{
    let bytes = encode_with(codec, KEY, value)
        .unwrap_or_else(|e| panic!("{}: encode {value:?}: {e}", codec.name()));
    decode_with(codec, KEY, &bytes)
        .unwrap_or_else(|e| panic!("{}: decode {value:?} from {bytes:?}: {e}", codec.name()))
}

/// `value` comes back equal from every codec.
fn assert_round_trips<T>(value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    for codec in codecs() {
        assert_eq!(&round_trip(codec, value), value, "{}", codec.name());
    }
}

/// The benches' org context, about 330 bytes of JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrgContext {
    id: u64,
    slug: String,
    name: String,
    plan: String,
    features: Vec<String>,
    settings: BTreeMap<String, String>,
    sso_issuer: Option<String>,
    sso_client_id: Option<String>,
    parent_id: Option<u64>,
    seats: u32,
    suspended: bool,
}

fn org(n: u64) -> OrgContext {
    OrgContext {
        id: n,
        slug: format!("org-{n}"),
        name: format!("Organisation numéro {n}"),
        plan: ["free", "pro", "enterprise"][n as usize % 3].into(),
        features: vec!["sso".into(), "audit-log".into(), "beta-search".into()],
        settings: BTreeMap::from([
            ("locale".into(), "fr-FR".into()),
            ("timezone".into(), "Europe/Paris".into()),
        ]),
        sso_issuer: Some("https://idp.example.com/realms/acme".into()),
        sso_client_id: Some(format!("client-{n}")),
        parent_id: (n % 5 == 0).then_some(n / 5),
        seats: 25,
        suspended: false,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Plan {
    Free,
    Team(u32),
    Pair(u32, String),
    Enterprise {
        contract: String,
        seats: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tree {
    label: String,
    children: Vec<Tree>,
    plan: Option<Box<Plan>>,
}

#[test]
fn org_contexts_round_trip_and_msgpack_is_smaller() {
    for n in [0, 1, 5, u64::MAX] {
        assert_round_trips(&org(n));
    }
    let json = encode_with(&Json, KEY, &org(7)).unwrap();
    let packed = encode_with(&MessagePack, KEY, &org(7)).unwrap();
    assert!(
        packed.len() < json.len(),
        "{} vs {}",
        packed.len(),
        json.len()
    );
}

#[test]
fn unicode_empty_and_nested_values_round_trip() {
    assert_round_trips(&"numéro 名前 🦀 \u{202e}rtl\u{0} nul \"quoted\" \\".to_owned());
    assert_round_trips(&String::new());
    assert_round_trips(&Vec::<u8>::new());
    assert_round_trips(&BTreeMap::<String, u8>::new());
    assert_round_trips(&());
    assert_round_trips(&None::<u8>);
    assert_round_trips(&(u64::MAX, i64::MIN, -1i8, 0.1f64, 1e300f64, -0.0f64, 'é'));
    assert_round_trips(&vec![Plan::Free, Plan::Team(3), Plan::Pair(1, "x".into())]);
    assert_round_trips(&Plan::Enterprise {
        contract: "c-1".into(),
        seats: None,
    });
    let leaf = |label: &str| Tree {
        label: label.into(),
        children: vec![],
        plan: Some(Box::new(Plan::Team(2))),
    };
    assert_round_trips(&Tree {
        label: "root".into(),
        children: vec![
            leaf("a"),
            Tree {
                label: "b".into(),
                children: vec![leaf("b1"), leaf("")],
                plan: None,
            },
        ],
        plan: None,
    });
    assert_round_trips(&vec![vec![vec![1u8, 2], vec![]], vec![]]);
    assert_round_trips(&HashMap::from([("k".to_owned(), vec![org(2)])]));
}

#[test]
fn msgpack_keeps_what_json_cannot() {
    let floats = vec![f64::INFINITY, f64::NEG_INFINITY, f64::MIN_POSITIVE];
    assert_eq!(round_trip(&MessagePack, &floats), floats);
    assert!(round_trip(&MessagePack, &f64::NAN).is_nan());
    let int_keys = BTreeMap::from([(1u32, "a".to_owned()), (7, "b".to_owned())]);
    assert_eq!(round_trip(&MessagePack, &int_keys), int_keys);
    assert_eq!(round_trip(&MessagePack, &0.1f32), 0.1f32);
    assert_eq!(round_trip(&MessagePack, &u128::MAX), u128::MAX);
}

#[test]
fn nested_options_lose_some_none_in_both_codecs() {
    // A documented limit shared with JSON (`null`/`nil` for all three), not a regression.
    for codec in codecs() {
        assert_eq!(
            round_trip(codec, &Some(None::<u8>)),
            None,
            "{}",
            codec.name()
        );
        assert_eq!(round_trip(codec, &Some(())), None, "{}", codec.name());
    }
}

#[test]
fn json_takes_the_direct_path_with_identical_bytes() {
    let boxed: Box<dyn Codec> = Box::new(Json);
    let shared: Arc<dyn Codec> = Arc::new(Json);
    let value = org(3);
    let plain = encode(KEY, &value).unwrap();
    for codec in [&Json as &dyn Codec, &*boxed, &*shared] {
        assert_eq!(
            super::erased::Builtin::of(codec),
            super::erased::Builtin::Json
        );
        assert_eq!(encode_with(codec, KEY, &value).unwrap(), plain);
        assert_eq!(
            decode_with::<OrgContext>(codec, KEY, &plain).unwrap(),
            value
        );
    }
    assert_eq!(
        super::erased::Builtin::of(&MessagePack),
        super::erased::Builtin::MessagePack
    );
    // The erased implementation writes the same bytes and reads them back too.
    assert_eq!(Json.encode_erased(&&value).unwrap(), plain.to_vec());
    let mut back = None;
    Json.decode_erased(&plain, &mut |de| {
        back = Some(erased_serde::deserialize::<OrgContext>(de)?);
        Ok(())
    })
    .unwrap();
    assert_eq!(back, Some(value));
    // Unsized values go through both paths.
    assert_eq!(&encode_with(&Json, KEY, "abc").unwrap()[..], b"\"abc\"");
    let slice: &[u8] = &[1, 2];
    let packed = encode_with(&MessagePack, KEY, slice).unwrap();
    assert_eq!(
        decode_with::<Vec<u8>>(&MessagePack, KEY, &packed).unwrap(),
        [1, 2]
    );
}

/// A codec from outside the crate: MessagePack's erased methods, reached through the erased
/// path of `encode_with` / `decode_with`.
#[derive(Debug)]
struct Outside;

impl Codec for Outside {
    fn name(&self) -> &'static str {
        "outside"
    }

    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        MessagePack.encode_erased(value)
    }

    fn decode_erased(&self, bytes: &[u8], de: &mut DeserializeFn<'_>) -> Result<(), BoxError> {
        MessagePack.decode_erased(bytes, de)
    }
}

/// A broken codec that returns success without decoding anything.
#[derive(Debug)]
struct DecodesNothing;

impl Codec for DecodesNothing {
    fn name(&self) -> &'static str {
        "nothing"
    }

    fn encode_erased(&self, _: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        Ok(Vec::new())
    }

    fn decode_erased(&self, _: &[u8], _: &mut DeserializeFn<'_>) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn msgpack_direct_and_erased_paths_write_and_read_the_same_bytes() {
    assert_eq!(
        super::erased::Builtin::of(&Outside),
        super::erased::Builtin::Other
    );
    for value in [org(1), org(5)] {
        let direct = encode_with(&MessagePack, KEY, &value).unwrap();
        let erased = encode_with(&Outside, KEY, &value).unwrap();
        assert_eq!(direct, erased);
        assert_eq!(MessagePack.encode_erased(&&value).unwrap(), direct.to_vec());
        assert_eq!(
            decode_with::<OrgContext>(&Outside, KEY, &direct).unwrap(),
            value
        );
    }
    assert_eq!(round_trip(&Outside, &value_sample()), value_sample());
    assert_eq!(round_trip(&Outside, &shifting()), shifting());
    // Errors through the erased path carry the same information.
    let json = encode(KEY, &org(1)).unwrap();
    let err = decode_with::<OrgContext>(&Outside, KEY, &json).unwrap_err();
    assert_eq!(mismatch(&err).read_with, "msgpack");
    let packed = encode_with(&MessagePack, KEY, &org(1)).unwrap();
    let err = decode_with::<Vec<u32>>(&Outside, KEY, &packed).unwrap_err();
    assert!(err.to_string().contains("Vec<u32>"), "{err}");
    let mut trailing = packed.to_vec();
    trailing.push(0);
    assert!(decode_with::<OrgContext>(&Outside, KEY, &trailing).is_err());
}

#[test]
fn a_codec_that_decodes_nothing_is_an_error() {
    let err = decode_with::<u8>(&DecodesNothing, KEY, b"").unwrap_err();
    assert!(
        err.to_string()
            .contains("the nothing codec decoded no value"),
        "{err}"
    );
}

// --- The types non-self-describing formats get wrong -------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Untagged {
    Id(u64),
    Named { name: String, seats: Option<u32> },
    Pair(String, bool),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Internal {
    Saml { url: String },
    Oidc { issuer: String, client: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flattened {
    id: u64,
    #[serde(flatten)]
    inner: Inner,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    region: String,
    seats: u32,
}

/// Skipped fields followed by others: a format without field names reads the next field's
/// bytes in the skipped one's place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Skipping {
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<u8>,
    count: u8,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    parent: Option<String>,
    tags: Vec<u8>,
}

fn value_sample() -> serde_json::Value {
    serde_json::json!({
        "id": u64::MAX, "neg": -5, "ratio": 0.25, "none": null, "ok": true,
        "name": "numéro", "list": [1, "two", [3.5], {"four": 4}], "empty": {}
    })
}

#[test]
fn every_hazard_decodes_to_the_value_written() {
    assert_round_trips(&value_sample());
    assert_round_trips(&vec![serde_json::Value::Null, serde_json::json!([])]);
    assert_round_trips(&vec![
        Untagged::Id(7),
        Untagged::Named {
            name: "acme".into(),
            seats: None,
        },
        Untagged::Pair("x".into(), true),
    ]);
    assert_round_trips(&vec![
        Internal::Saml { url: "u".into() },
        Internal::Oidc {
            issuer: "i".into(),
            client: 3,
        },
    ]);
    assert_round_trips(&Flattened {
        id: 1,
        inner: Inner {
            region: "eu".into(),
            seats: 9,
        },
        extra: BTreeMap::from([("beta".to_owned(), serde_json::json!([1, {"a": null}]))]),
    });
    let skipping = |note, parent: Option<&str>| Skipping {
        note,
        count: 1,
        parent: parent.map(Into::into),
        tags: vec![0],
    };
    for value in [
        skipping(None, None),
        skipping(Some(4), None),
        skipping(None, Some("p")),
        skipping(Some(0), Some("")),
    ] {
        assert_round_trips(&value);
    }
    assert_round_trips(&shifting());
}

/// A value whose skipped fields make a format without field names read `count` where `note`
/// was skipped, and so on down: postcard decodes it, without an error, as
/// `Skipping { note: None, count: 3, parent: None, tags: [9] }`.
fn shifting() -> Skipping {
    Skipping {
        note: None,
        count: 0,
        parent: None,
        tags: vec![0, 1, 9],
    }
}

#[test]
fn postcard_would_decode_a_skipped_field_as_another_value() {
    // Why the binary codec writes field names (the reason postcard was not chosen).
    let bytes = postcard::to_allocvec(&shifting()).unwrap();
    let read: Skipping = postcard::from_bytes(&bytes).unwrap();
    assert_ne!(read, shifting());
    assert_eq!(read.count, 3);
    assert_eq!(round_trip(&MessagePack, &shifting()), shifting());
}

#[test]
fn schema_changes_read_like_json() {
    #[derive(Serialize)]
    struct V1 {
        slug: String,
        retired: u8,
    }
    #[derive(Debug, PartialEq, Deserialize)]
    struct V2 {
        slug: String,
        #[serde(default)]
        seats: u32,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only its decoding is checked")]
    struct Strict {
        slug: String,
    }
    let old = V1 {
        slug: "acme".into(),
        retired: 1,
    };
    for codec in codecs() {
        let bytes = encode_with(codec, KEY, &old).unwrap();
        let new: V2 = decode_with(codec, KEY, &bytes).unwrap();
        assert_eq!(new.slug, "acme", "{}", codec.name());
        assert_eq!(new.seats, 0);
        let err = decode_with::<Strict>(codec, KEY, &bytes).unwrap_err();
        assert!(
            err.to_string().contains("retired"),
            "{}: {err}",
            codec.name()
        );
    }
}

#[test]
fn a_value_of_another_type_is_an_error_naming_key_and_type() {
    for codec in codecs() {
        let bytes = encode_with(codec, KEY, &org(1)).unwrap();
        for err in [
            decode_with::<Vec<u32>>(codec, KEY, &bytes).unwrap_err(),
            decode_with::<u64>(codec, KEY, &bytes).unwrap_err(),
            decode_with::<Plan>(codec, KEY, &bytes).unwrap_err(),
        ] {
            assert!(matches!(
                err,
                CacheError::Serialization {
                    action: "decode",
                    ..
                }
            ));
            assert!(err.to_string().contains(KEY), "{err}");
        }
        let err = decode_with::<Vec<u32>>(codec, KEY, &bytes).unwrap_err();
        assert!(err.to_string().contains("Vec<u32>"), "{err}");
        // A negative number is not a `u8`, a large one neither: an error, not a wrap.
        let bytes = encode_with(codec, KEY, &(-1i64, 300u32)).unwrap();
        assert!(decode_with::<(u8, u8)>(codec, KEY, &bytes).is_err());
    }
}

#[test]
fn encode_failures_name_key_and_type() {
    struct Failing;
    impl Serialize for Failing {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no way"))
        }
    }
    for codec in codecs() {
        let err = encode_with(codec, KEY, &Failing).unwrap_err();
        assert!(matches!(
            err,
            CacheError::Serialization {
                action: "encode",
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains(KEY) && text.contains("Failing") && text.contains("no way"),
            "{text}"
        );
    }
    // JSON object keys are strings; MessagePack has no such limit.
    let int_keys = HashMap::from([((1u8, 2u8), 3u8)]);
    assert!(encode_with(&Json, KEY, &int_keys).is_err());
    assert_eq!(round_trip(&MessagePack, &int_keys), int_keys);
}

// --- Cross-codec reads --------------------------------------------------------------------

fn mismatch(err: &CacheError) -> &CodecMismatch {
    err.source()
        .and_then(|s| s.downcast_ref::<CodecMismatch>())
        .unwrap_or_else(|| panic!("not a codec mismatch: {err}"))
}

#[test]
fn reading_with_the_other_codec_names_both() {
    let json = encode_with(&Json, KEY, &org(1)).unwrap();
    let packed = encode_with(&MessagePack, KEY, &org(1)).unwrap();

    let err = decode_with::<OrgContext>(&Json, KEY, &packed).unwrap_err();
    assert!(matches!(err, CacheError::Serialization { .. }));
    let text = err.to_string();
    assert!(
        text.contains("written with the msgpack codec, read with the json codec"),
        "{text}"
    );
    assert!(text.contains(KEY) && text.contains("OrgContext"), "{text}");
    assert_eq!(mismatch(&err).written_with, WrittenWith::Codec("msgpack"));

    let err = decode_with::<OrgContext>(&MessagePack, KEY, &json).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("json") && text.contains("read with the msgpack codec"),
        "{text}"
    );
    assert_eq!(mismatch(&err).written_with, WrittenWith::Untagged);
    assert_eq!(mismatch(&err).read_with, "msgpack");

    // The erased Json path reports the same.
    let err = Json
        .decode_erased(&packed, &mut |de| {
            erased_serde::deserialize::<OrgContext>(de)?;
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("written with the msgpack codec"),
        "{err}"
    );
}

#[test]
fn frames_and_unknown_binary_codecs_are_named() {
    let payload = encode_with(&MessagePack, KEY, &1u8).unwrap();
    let framed = Frame::value(payload, 1, 2).encode();
    for codec in codecs() {
        let err = decode_with::<u8>(codec, KEY, &framed).unwrap_err();
        assert_eq!(
            mismatch(&err).written_with,
            WrittenWith::Frame,
            "{}",
            codec.name()
        );
        assert!(err.to_string().contains("cache-aside frame"), "{err}");
    }
    let mut newer = encode_with(&MessagePack, KEY, &1u8).unwrap().to_vec();
    newer[3] = 9;
    for codec in codecs() {
        let err = decode_with::<u8>(codec, KEY, &newer).unwrap_err();
        assert_eq!(mismatch(&err).written_with, WrittenWith::UnknownCodec(9));
        assert!(err.to_string().contains("(id 9)"), "{err}");
    }
    // The magic cut short, or alone.
    for bytes in [&b"\0c"[..], b"\0cb", b"\0"] {
        assert!(decode_with::<u8>(&MessagePack, KEY, bytes).is_err());
        assert!(decode_with::<u8>(&Json, KEY, bytes).is_err());
    }
}

#[test]
fn the_binary_header_never_starts_json_text() {
    for codec in codecs() {
        for value in [
            serde_json::json!(null),
            serde_json::json!(""),
            serde_json::json!(0),
        ] {
            let bytes = encode_with(codec, KEY, &value).unwrap();
            let tagged = bytes.starts_with(tag::MAGIC);
            assert_eq!(tagged, codec.name() != "json", "{bytes:?}");
            assert!(!Frame::is_absent_marker(&bytes));
        }
    }
    assert_ne!(&tag::MAGIC[..], &frame::MAGIC[..]);
}

// --- Garbage ------------------------------------------------------------------------------

/// Decodes `bytes` as several types with both codecs; only errors may come out.
fn decode_everything(bytes: &[u8]) {
    for codec in codecs() {
        let _ = decode_with::<OrgContext>(codec, KEY, bytes);
        let _ = decode_with::<serde_json::Value>(codec, KEY, bytes);
        let _ = decode_with::<Vec<Untagged>>(codec, KEY, bytes);
        let _ = decode_with::<Flattened>(codec, KEY, bytes);
        let _ = decode_with::<Skipping>(codec, KEY, bytes);
        let _ = decode_with::<Tree>(codec, KEY, bytes);
        let _ = decode_with::<(String, f64, u128, char)>(codec, KEY, bytes);
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for codec in codecs() {
        let mut bytes = encode_with(codec, KEY, &org(1)).unwrap().to_vec();
        bytes.push(0xc0);
        let err = decode_with::<OrgContext>(codec, KEY, &bytes).unwrap_err();
        assert!(matches!(err, CacheError::Serialization { .. }), "{err}");
    }
}

#[test]
fn hostile_nesting_and_lengths_are_errors() {
    let header = tag::header(tag::MSGPACK_V1);
    // 100 000 nested one-element arrays, and maps.
    for marker in [0x91u8, 0x81] {
        let mut deep = header.to_vec();
        deep.extend(std::iter::repeat_n(marker, 100_000));
        for codec in codecs() {
            assert!(decode_with::<serde_json::Value>(codec, KEY, &deep).is_err());
            assert!(decode_with::<Tree>(codec, KEY, &deep).is_err());
        }
    }
    // Lengths of 4 G elements with nothing after them: no allocation of that size, an error.
    for prefix in [
        &[0xddu8, 0xff, 0xff, 0xff, 0xff][..],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0xdb, 0xff, 0xff, 0xff, 0xff],
        &[0xc6, 0xff, 0xff, 0xff, 0xff],
    ] {
        let bytes = [&header[..], prefix].concat();
        decode_everything(&bytes);
        assert!(decode_with::<Vec<u64>>(&MessagePack, KEY, &bytes).is_err());
        assert!(decode_with::<String>(&MessagePack, KEY, &bytes).is_err());
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
        // The same bytes behind the header reach the MessagePack decoder itself.
        let tagged = [&tag::header(tag::MSGPACK_V1)[..], &bytes].concat();
        decode_everything(&tagged);
    }

    #[test]
    fn damaged_values_never_panic(n in any::<u64>(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        for codec in codecs() {
            let good = encode_with(codec, KEY, &vec![org(n)]).unwrap().to_vec();
            let mut flipped = good.clone();
            let i = at % flipped.len();
            flipped[i] = byte;
            decode_everything(&flipped);
            decode_everything(&good[..cut % good.len()]);
        }
    }

    #[test]
    fn org_contexts_and_values_round_trip(n in any::<u64>(), name in "\\PC*", seats in any::<u32>(), extra in any::<i64>()) {
        let mut value = org(n);
        value.name = name.clone();
        value.seats = seats;
        value.settings.insert(name, extra.to_string());
        assert_round_trips(&value);
        let json = serde_json::json!({"n": n, "extra": extra, "list": [seats]});
        assert_round_trips(&json);
    }
}

#[test]
fn encode_with_returns_bytes_a_backend_stores_as_they_are() {
    let bytes: Bytes = encode_with(&MessagePack, KEY, &org(1)).unwrap();
    assert_eq!(&bytes[..tag::HEADER_LEN], b"\0cb\x01");
}
