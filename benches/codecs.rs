//! The codecs, and the candidates for the compact one, in one run (criterion). Compare the
//! rows of one group: the ratios are the result, not the times.
//!
//! - `encode` / `decode`: one org context (`OrgContext::sample(7)`, 293 bytes of JSON) to
//!   bytes and back. `json codec::encode` / `codec::decode` are the free functions the typed
//!   calls use today; `<codec> encode_with (direct)` / `decode_with (direct)` are the
//!   helpers over `&dyn Codec` for this crate's two codecs, which they call without type
//!   erasure (JSON's must cost what the free functions cost); `<codec> erased` is the
//!   codec's `Codec::encode_erased` / `decode_erased`, the path a codec from outside the
//!   crate takes, for JSON, MessagePack (the codec kept) and the candidates it was chosen
//!   against, postcard and bitcode (serde support), each with the same 4-byte header as
//!   MessagePack's; `<candidate> typed` calls the library itself (no header, no erasure).
//! - bitcode's serde API has no `Deserializer` to erase (only `bitcode::deserialize::<T>`),
//!   so it cannot implement `Codec::decode_erased`: its decode row is the typed call, a lower
//!   bound of what an erased path would cost.
//!
//! - `typed_cache`: what a codec changes for an app, through a cache: `MokaCacheService` built
//!   with `.codec(MessagePack)` against the default (JSON), both as `Arc<dyn CacheService>`,
//!   a typed `get::<OrgContext>` hit and a typed `set` of the fixture's 4,000 org contexts in
//!   random order (`benches/common`). Before criterion's rows the bench prints the same four
//!   interleaved in rounds (the order rotating, medians, and msgpack / json), which is
//!   steadier on a small, shared machine (`ROUNDS`, `OPS` override 15 and 100 000).
//!
//! Before the measurements the bench prints each codec's size for the value and what each
//! one does with the types that a format without field names gets wrong: `ok` (decodes to
//! the value written), `error` (encode or decode fails, with the message), `WRONG VALUE`
//! (decodes, to something else, without an error) or `PANIC`.
//!
//! `cargo bench --bench codecs` (a short run: `-- --warm-up-time 1 --measurement-time 2`).
//! Instruction counts of the `typed_cache` rows: see [`count_instructions`]; e.g.
//! `CONTENDER=get/msgpack OPS=100000 valgrind --tool=callgrind target/release/deps/codecs-*`.

mod common;

use std::any::Any;
use std::fmt::Debug;
use std::hint::black_box;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use cachet::codec::{self, Codec, DeserializeFn, Json, MessagePack, erased_serde};
use cachet::{BoxError, CacheService, CacheServiceExt, MokaCacheService};
use common::{ACCESSES, Fixture, OrgContext, fixture, runtime};
use criterion::{Criterion, criterion_group};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const KEY: &str = "org:acme:context";

/// postcard through `&dyn Codec`, with a binary header like MessagePack's (id 0xf1, which no
/// cachet codec uses).
#[derive(Debug)]
struct Postcard;

/// bitcode (serde) through `&dyn Codec` for encoding, with a header (id 0xf2).
#[derive(Debug)]
struct Bitcode;

fn header(id: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(codec::tag::MAGIC);
    out.push(id);
    out
}

fn payload(bytes: &[u8], id: u8) -> Result<&[u8], BoxError> {
    match bytes.split_first_chunk::<{ codec::tag::HEADER_LEN }>() {
        Some((head, payload)) if head[..3] == codec::tag::MAGIC[..] && head[3] == id => Ok(payload),
        _ => Err("not written by this codec".into()),
    }
}

impl Codec for Postcard {
    fn name(&self) -> &'static str {
        "postcard"
    }

    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        Ok(postcard::to_extend(value, header(0xf1))?)
    }

    fn decode_erased(
        &self,
        bytes: &[u8],
        deserialize: &mut DeserializeFn<'_>,
    ) -> Result<(), BoxError> {
        let mut de = postcard::Deserializer::from_bytes(payload(bytes, 0xf1)?);
        deserialize(&mut <dyn erased_serde::Deserializer>::erase(&mut de))?;
        if !de.finalize()?.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(())
    }
}

impl Codec for Bitcode {
    fn name(&self) -> &'static str {
        "bitcode"
    }

    fn encode_erased(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, BoxError> {
        let mut out = header(0xf2);
        out.extend_from_slice(&bitcode::serialize(value)?);
        Ok(out)
    }

    fn decode_erased(&self, _: &[u8], _: &mut DeserializeFn<'_>) -> Result<(), BoxError> {
        Err("bitcode's serde API has no Deserializer to erase".into())
    }
}

// --- The hazards ------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Untagged {
    Id(u64),
    Named { name: String, seats: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flattened {
    id: u64,
    #[serde(flatten)]
    inner: Inner,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    region: String,
    seats: u32,
}

/// An org context as apps write it, optional fields left out when empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sparse {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<u64>,
    slug: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sso_issuer: Option<String>,
    seats: u32,
}

/// Skipped fields before others, with values that line up: read without field names, `count`
/// lands in `note`'s tag, `tags`' first bytes in `count` and `parent`'s tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Skipping {
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<u8>,
    count: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    tags: Vec<u8>,
}

/// What one codec does with `value`: `ok`, `error: ...`, `WRONG VALUE: ...`, or `PANIC: ...`
/// (bitcode panics on some types).
fn outcome<T>(
    value: &T,
    encode: impl Fn(&T) -> Result<Vec<u8>, String>,
    decode: impl Fn(&[u8]) -> Result<T, String>,
) -> String
where
    T: PartialEq + Debug,
{
    let bytes = match catch_unwind(AssertUnwindSafe(|| encode(value))) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return format!("encode error: {e}"),
        Err(panic) => return format!("PANIC in encode: {}", panic_message(&*panic)),
    };
    match catch_unwind(AssertUnwindSafe(|| decode(&bytes))) {
        Ok(Ok(back)) if back == *value => "ok".to_owned(),
        Ok(Ok(back)) => format!("WRONG VALUE: {back:?}"),
        Ok(Err(e)) => format!("decode error: {e}"),
        Err(panic) => format!("PANIC in decode: {}", panic_message(&*panic)),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// One hazard's outcome for every codec.
fn hazard<T>(name: &str, value: T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let through = |c: &'static dyn Codec| {
        outcome(
            &value,
            move |v| {
                codec::encode_with(c, KEY, v)
                    .map(|b| b.to_vec())
                    .map_err(|e| root(&e))
            },
            move |b| codec::decode_with(c, KEY, b).map_err(|e| root(&e)),
        )
    };
    let bitcode = outcome(
        &value,
        |v| bitcode::serialize(v).map_err(|e| e.to_string()),
        |b| bitcode::deserialize(b).map_err(|e| e.to_string()),
    );
    eprintln!("{name}:");
    for (codec, result) in [
        ("json", through(&Json)),
        ("msgpack", through(&MessagePack)),
        ("postcard", through(&Postcard)),
        ("bitcode (typed)", bitcode),
    ] {
        eprintln!("    {codec:<16} {result}");
    }
}

/// The codec's own message, without the key and type every one of them repeats.
fn root(e: &cachet::CacheError) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)
}

fn report() {
    let org = OrgContext::sample(7);
    let json = codec::encode(KEY, &org).unwrap();
    eprintln!("sizes of OrgContext::sample(7), header included where there is one:");
    eprintln!("    json             {} bytes", json.len());
    for c in [&MessagePack as &dyn Codec, &Postcard, &Bitcode] {
        let n = codec::encode_with(c, KEY, &org).unwrap().len();
        eprintln!(
            "    {:<16} {n} bytes ({:.2}x json)",
            c.name(),
            n as f64 / json.len() as f64
        );
    }
    eprintln!("hazards (ok / error / WRONG VALUE / PANIC):");
    // bitcode panics on some of them: report it, without the hook's backtrace.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    hazard(
        "serde_json::Value",
        serde_json::json!({"id": 7, "plan": "pro", "limits": [1.5, null, {"seats": 25}]}),
    );
    hazard(
        "#[serde(untagged)] enum",
        vec![
            Untagged::Id(7),
            Untagged::Named {
                name: "acme".into(),
                seats: 25,
            },
        ],
    );
    hazard(
        "#[serde(flatten)]",
        Flattened {
            id: 7,
            inner: Inner {
                region: "eu".into(),
                seats: 25,
            },
        },
    );
    hazard(
        "skip_serializing_if, then other fields (an org context)",
        Sparse {
            id: 7,
            parent_id: None,
            slug: "acme".into(),
            sso_issuer: None,
            seats: 25,
        },
    );
    hazard(
        "skip_serializing_if, then other fields (values that line up)",
        Skipping {
            note: None,
            count: 0,
            parent: None,
            tags: vec![0, 1, 9],
        },
    );
    hazard(
        "skip_serializing_if, nothing skipped",
        Skipping {
            note: Some(1),
            count: 0,
            parent: Some("p".into()),
            tags: vec![0, 1, 9],
        },
    );
    std::panic::set_hook(hook);
}

// --- The measurements -------------------------------------------------------------------

/// Encodes through the erased method, as `encode_with` does for a codec from outside.
fn erased_encode(codec: &dyn Codec, org: &OrgContext) -> Vec<u8> {
    codec.encode_erased(&org).unwrap()
}

/// Decodes through the erased method, as `decode_with` does for a codec from outside.
fn erased_decode(codec: &dyn Codec, bytes: &[u8]) -> OrgContext {
    let mut value = None;
    codec
        .decode_erased(bytes, &mut |de| {
            value = Some(erased_serde::deserialize::<OrgContext>(de)?);
            Ok(())
        })
        .unwrap();
    value.unwrap()
}

fn encode(c: &mut Criterion) {
    report();
    let org = OrgContext::sample(7);
    let mut group = c.benchmark_group("encode");
    group.bench_function("json codec::encode", |b| {
        b.iter(|| black_box(codec::encode(KEY, black_box(&org)).unwrap()))
    });
    for codec in [&Json as &dyn Codec, &MessagePack] {
        group.bench_function(format!("{} encode_with (direct)", codec.name()), |b| {
            b.iter(|| {
                black_box(codec::encode_with(black_box(codec), KEY, black_box(&org)).unwrap())
            })
        });
    }
    for codec in [&Json as &dyn Codec, &MessagePack, &Postcard, &Bitcode] {
        group.bench_function(format!("{} erased", codec.name()), |b| {
            b.iter(|| black_box(erased_encode(black_box(codec), black_box(&org))))
        });
    }
    group.bench_function("msgpack typed (rmp_serde::to_vec_named)", |b| {
        b.iter(|| black_box(rmp_serde::to_vec_named(black_box(&org)).unwrap()))
    });
    group.bench_function("postcard typed", |b| {
        b.iter(|| black_box(postcard::to_allocvec(black_box(&org)).unwrap()))
    });
    group.bench_function("bitcode typed", |b| {
        b.iter(|| black_box(bitcode::serialize(black_box(&org)).unwrap()))
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let org = OrgContext::sample(7);
    let json = codec::encode(KEY, &org).unwrap();
    let mut group = c.benchmark_group("decode");
    group.bench_function("json codec::decode", |b| {
        b.iter(|| black_box(codec::decode::<OrgContext>(KEY, black_box(&json)).unwrap()))
    });
    for codec in [&Json as &dyn Codec, &MessagePack] {
        let bytes = codec::encode_with(codec, KEY, &org).unwrap();
        assert_eq!(
            codec::decode_with::<OrgContext>(codec, KEY, &bytes).unwrap(),
            org
        );
        group.bench_function(format!("{} decode_with (direct)", codec.name()), |b| {
            b.iter(|| {
                black_box(
                    codec::decode_with::<OrgContext>(black_box(codec), KEY, black_box(&bytes))
                        .unwrap(),
                )
            })
        });
    }
    for codec in [&Json as &dyn Codec, &MessagePack, &Postcard] {
        let bytes = codec::encode_with(codec, KEY, &org).unwrap();
        assert_eq!(erased_decode(codec, &bytes), org);
        group.bench_function(format!("{} erased", codec.name()), |b| {
            b.iter(|| black_box(erased_decode(black_box(codec), black_box(&bytes))))
        });
    }
    let packed = rmp_serde::to_vec_named(&org).unwrap();
    group.bench_function("msgpack typed (rmp_serde::from_slice)", |b| {
        b.iter(|| black_box(rmp_serde::from_slice::<OrgContext>(black_box(&packed)).unwrap()))
    });
    let post = postcard::to_allocvec(&org).unwrap();
    group.bench_function("postcard typed", |b| {
        b.iter(|| black_box(postcard::from_bytes::<OrgContext>(black_box(&post)).unwrap()))
    });
    let bit = bitcode::serialize(&org).unwrap();
    group.bench_function("bitcode typed (no erased path exists)", |b| {
        b.iter(|| black_box(bitcode::deserialize::<OrgContext>(black_box(&bit)).unwrap()))
    });
    group.finish();
}

// --- Through a cache ---------------------------------------------------------------------

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An in-memory cache with the default codec (JSON) or MessagePack.
fn moka(packed: bool) -> Arc<dyn CacheService> {
    let builder = MokaCacheService::builder();
    let builder = if packed {
        builder.codec(MessagePack)
    } else {
        builder
    };
    Arc::new(builder.build().unwrap())
}

/// Every org context written, each cache in a loop of its own (entries of two caches
/// interleaved in memory move results by 20%; see `benches/common`).
async fn fill(f: &Fixture, caches: &[&Arc<dyn CacheService>]) {
    for cache in caches {
        for (key, value) in f.keys.iter().zip(&f.values) {
            cache.set(key, value, None).await.unwrap();
        }
    }
}

/// Runs each of `N` contenders `ops` times per round for `rounds` rounds, the order rotating
/// every round; the median ns per op of each.
async fn interleaved<const N: usize>(
    rounds: usize,
    ops: usize,
    mut run: impl AsyncFnMut(usize, usize),
) -> [f64; N] {
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); N];
    for round in 0..rounds {
        for k in 0..N {
            let which = (k + round) % N;
            let start = Instant::now();
            for op in 0..ops {
                run(which, (op + round * 7919) % ACCESSES).await;
            }
            samples[which].push(start.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    let mut out = [0.0; N];
    for (slot, mut times) in out.iter_mut().zip(samples) {
        times.sort_by(f64::total_cmp);
        *slot = times[times.len() / 2];
    }
    out
}

/// The interleaved medians of a typed get hit and a typed set, JSON and MessagePack.
fn cache_interleaved(f: &Fixture) {
    let (rounds, ops) = (env_or("ROUNDS", 15), env_or("OPS", 100_000));
    let rt = runtime();
    rt.block_on(async {
        let (json, packed) = (moka(false), moka(true));
        fill(f, &[&json, &packed]).await;
        let stored = json.get_bytes(&f.keys[0]).await.unwrap().unwrap();
        assert!(stored.starts_with(b"{"), "JSON");
        let stored = packed.get_bytes(&f.keys[0]).await.unwrap().unwrap();
        assert!(
            stored.starts_with(codec::tag::MAGIC),
            "MessagePack's header"
        );
        let [get_json, get_packed] = interleaved::<2>(rounds, ops, async |which, i| {
            let cache = if which == 0 { &json } else { &packed };
            let key = &f.keys[f.order[i]];
            black_box(cache.get::<OrgContext>(key).await.unwrap().unwrap());
        })
        .await;
        let (json, packed) = (moka(false), moka(true));
        let [set_json, set_packed] = interleaved::<2>(rounds, ops, async |which, i| {
            let cache = if which == 0 { &json } else { &packed };
            let n = f.order[i];
            cache.set(&f.keys[n], &f.values[n], None).await.unwrap();
        })
        .await;
        eprintln!(
            "typed through MokaCacheService, ns/op (median of {rounds} interleaved rounds of \
             {ops}): get hit json {get_json:.0}, msgpack {get_packed:.0} (msgpack / json = \
             {:.3}); set json {set_json:.0}, msgpack {set_packed:.0} (msgpack / json = {:.3})",
            get_packed / get_json,
            set_packed / set_json
        );
    });
}

fn typed_cache(c: &mut Criterion) {
    let f = fixture();
    cache_interleaved(&f);
    let rt = runtime();
    let mut group = c.benchmark_group("typed_cache");
    for (name, packed) in [("json", false), ("msgpack", true)] {
        let cache = moka(packed);
        rt.block_on(fill(&f, &[&cache]));
        let mut i = 0usize;
        group.bench_function(format!("{name} get hit"), |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % ACCESSES;
                let (key, cache) = (&f.keys[f.order[i]], &cache);
                async move { black_box(cache.get::<OrgContext>(key).await.unwrap().unwrap()) }
            })
        });
        let mut i = 0usize;
        group.bench_function(format!("{name} set"), |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % ACCESSES;
                let n = f.order[i];
                let (key, value, cache) = (&f.keys[n], &f.values[n], &cache);
                async move { cache.set(key, value, None).await.unwrap() }
            })
        });
    }
    group.finish();
}

/// Instruction counts (the measure the machine's load does not move): with `CONTENDER` set
/// (`get/json`, `get/msgpack`, `set/json`, `set/msgpack`) the binary fills that cache, runs
/// `OPS` (default 100 000) typed gets or sets of it and exits, so that
/// `valgrind --tool=callgrind` with `OPS=0` and `OPS=N` gives the instructions per operation
/// as their difference over N (the fill is the same whatever `OPS` is; as in
/// `scripts/bench-instructions`).
fn count_instructions(contender: &str) {
    let ops = env_or("OPS", 100_000);
    let (get, packed) = match contender {
        "get/json" => (true, false),
        "get/msgpack" => (true, true),
        "set/json" => (false, false),
        "set/msgpack" => (false, true),
        other => panic!("CONTENDER={other:?}: one of get/json, get/msgpack, set/json, set/msgpack"),
    };
    let f = fixture();
    let rt = runtime();
    rt.block_on(async {
        let cache = moka(packed);
        fill(&f, &[&cache]).await;
        for op_n in 0..ops {
            let n = f.order[op_n % ACCESSES];
            if get {
                black_box(cache.get::<OrgContext>(&f.keys[n]).await.unwrap().unwrap());
            } else {
                cache.set(&f.keys[n], &f.values[n], None).await.unwrap();
            }
        }
    });
}

criterion_group!(benches, encode, decode, typed_cache);

fn main() {
    match std::env::var("CONTENDER") {
        Ok(contender) => count_instructions(&contender),
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
