//! Tag invalidation, built on the four byte-level methods of any service: each tag has a
//! **record**, a small key (`cachet:tag:<tag>`, under the service's own keys, so namespaces
//! and encryption apply to it as to any value) holding a random 128-bit version. An entry
//! written with [`set_tagged`](crate::CacheServiceExt::set_tagged) stores the versions of its
//! tags beside its value (a [tagged frame](self#the-tagged-frame)); a read serves it only
//! while every one of its tags still holds the version it was written with.
//! [`invalidate_tag`](super::CacheService::invalidate_tag) writes a new version: one small
//! write, whatever the number of entries tagged (they are found stale when read, and expire
//! with their TTL).
//!
//! - Versions, not clocks: no instance's clock takes part, so skew cannot make an entry
//!   written before an invalidation look newer than it.
//! - A missing record (never written, or expired) has no version: entries tagged with it
//!   are stale, and the next `set_tagged` writes a fresh version. A record lives
//!   [`TAG_RECORD_TTL_SECS`] (30 days) from its last write, so a tag never used again
//!   leaves nothing behind; an entry tagged with it that outlives its record (a TTL above
//!   30 days) reads as missing from then on, never as a stale value.
//! - Two writers that find a record missing both write one; the second overwrites the
//!   first's version, so the first's entry reads as missing (a spurious miss, never a
//!   stale value: a version is never written twice).
//! - On a tiered cache the records live in the L1 like any value and follow the same
//!   invalidation (tracking or the bus), so a tagged read on an L1 hit checks its tags in
//!   the L1, and an `invalidate_tag` on one instance reaches the others within the bound of
//!   `invalidate`. On a cluster the records are ordinary keys in their own slots: a read
//!   asks for them with one `MGET` per slot.
//!
//! # The tagged frame
//!
//! `\0ct`, format version `1`, the number of tags (1 byte), then per tag its length (2
//! bytes, big-endian), its name and its 16-byte version, then the value's stored bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::CacheService;
use crate::{CacheError, IntegrityProblem};

/// The first bytes of a tagged entry.
pub const MAGIC: &[u8; 3] = b"\0ct";
const VERSION: u8 = 1;
/// A version's length in bytes.
const VERSION_LEN: usize = 16;

/// Where a tag's record is stored: this prefix and the tag.
pub const RECORD_PREFIX: &str = "cachet:tag:";

/// How long a tag's record lives after its last write: 30 days.
pub const TAG_RECORD_TTL_SECS: u64 = 30 * 24 * 60 * 60;

/// The most tags one entry may have.
pub const MAX_TAGS: usize = 64;

/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 1024;

/// The key of `tag`'s record.
///
/// ```
/// assert_eq!(cachet::service::tags::record_key("user:42"), "cachet:tag:user:42");
/// ```
pub fn record_key(tag: &str) -> String {
    let mut key = String::with_capacity(RECORD_PREFIX.len() + tag.len());
    key.push_str(RECORD_PREFIX);
    key.push_str(tag);
    key
}

/// Whether `stored` is a tagged entry.
pub fn is_tagged(stored: &[u8]) -> bool {
    stored.starts_with(MAGIC)
}

/// Checks one tag: not empty, at most [`MAX_TAG_LEN`] bytes.
fn check_tag(key: &str, tag: &str) -> Result<(), CacheError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(CacheError::invalid_argument(
            key,
            format!("a tag is 1 to {MAX_TAG_LEN} bytes long, not {}", tag.len()),
        ));
    }
    Ok(())
}

/// A fresh random version.
fn new_version() -> [u8; VERSION_LEN] {
    rand::random()
}

/// The current version of each of `tags` (`None` where the record is missing or not a
/// version).
async fn versions<S: CacheService + ?Sized>(
    cache: &S,
    tags: &[&str],
) -> Result<Vec<Option<[u8; VERSION_LEN]>>, CacheError> {
    let keys: Vec<String> = tags.iter().map(|tag| record_key(tag)).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let stored = cache.get_many_bytes(&keys).await?;
    Ok(stored
        .into_iter()
        .map(|record| record.and_then(|bytes| <[u8; VERSION_LEN]>::try_from(&bytes[..]).ok()))
        .collect())
}

/// Writes a new version of `tag`'s record: every entry written with `tag` before reads as
/// missing from now on. What [`CacheService::invalidate_tag`] does.
pub async fn invalidate<S: CacheService + ?Sized>(cache: &S, tag: &str) -> Result<(), CacheError> {
    let key = record_key(tag);
    check_tag(&key, tag)?;
    let version = Bytes::copy_from_slice(&new_version());
    cache
        .set_bytes(&key, version, Some(TAG_RECORD_TTL_SECS))
        .await
}

/// Stores `stored` (a value's encoded bytes) under `key` with `tags`: reads their records
/// (writing one for each tag that has none) and stores the tagged frame.
pub async fn set_tagged<S: CacheService + ?Sized>(
    cache: &S,
    key: &str,
    stored: Bytes,
    ttl_secs: Option<u64>,
    tags: &[&str],
) -> Result<(), CacheError> {
    if tags.is_empty() || tags.len() > MAX_TAGS {
        return Err(CacheError::invalid_argument(
            key,
            format!("set_tagged takes 1 to {MAX_TAGS} tags, not {}", tags.len()),
        ));
    }
    for tag in tags {
        check_tag(key, tag)?;
    }
    // Checked before the records are written (`set_bytes` would only say so at the end).
    if let Some(secs) = ttl_secs {
        super::resolve_ttl(key, Some(secs), std::time::Duration::from_secs(1))?;
    }
    let mut found = versions(cache, tags).await?;
    let mut writes = Vec::new();
    for (tag, version) in tags.iter().zip(found.iter_mut()) {
        if version.is_none() {
            let fresh = new_version();
            *version = Some(fresh);
            writes.push((record_key(tag), Bytes::copy_from_slice(&fresh)));
        }
    }
    let records = writes.iter().map(|(record, version)| {
        cache.set_bytes(record, version.clone(), Some(TAG_RECORD_TTL_SECS))
    });
    for written in futures_util::future::join_all(records).await {
        written?;
    }
    let mut frame = BytesMut::with_capacity(
        MAGIC.len()
            + 2
            + tags
                .iter()
                .map(|t| 2 + t.len() + VERSION_LEN)
                .sum::<usize>()
            + stored.len(),
    );
    frame.put_slice(MAGIC);
    frame.put_u8(VERSION);
    frame.put_u8(tags.len() as u8);
    for (tag, version) in tags.iter().zip(&found) {
        frame.put_u16(tag.len() as u16);
        frame.put_slice(tag.as_bytes());
        frame.put_slice(&version.unwrap_or_default());
    }
    frame.put_slice(&stored);
    cache.set_bytes(key, frame.freeze(), ttl_secs).await
}

/// A tagged entry taken apart: its tags with the versions it was written with, and the
/// value's stored bytes.
pub struct Tagged<'a> {
    tags: Vec<(&'a str, [u8; VERSION_LEN])>,
    stored: Bytes,
}

impl<'a> Tagged<'a> {
    /// Parses the tagged frame `bytes` stored under `key`; a malformed one is a
    /// [`CacheError::Integrity`].
    pub fn parse(key: &str, bytes: &'a Bytes) -> Result<Self, CacheError> {
        let bad = |problem| CacheError::integrity(key, "tags", problem);
        if !is_tagged(bytes) {
            return Err(bad(IntegrityProblem::BadMagic));
        }
        let mut at = MAGIC.len();
        let header = bytes
            .get(at..at + 2)
            .ok_or(bad(IntegrityProblem::Truncated))?;
        if header[0] != VERSION {
            return Err(bad(IntegrityProblem::UnknownVersion(header[0])));
        }
        let count = usize::from(header[1]);
        at += 2;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            let len = bytes
                .get(at..at + 2)
                .ok_or(bad(IntegrityProblem::Truncated))?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            at += 2;
            let name = bytes
                .get(at..at + len)
                .ok_or(bad(IntegrityProblem::Truncated))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| bad(IntegrityProblem::Malformed("a tag is not UTF-8")))?;
            at += len;
            let version = bytes
                .get(at..at + VERSION_LEN)
                .ok_or(bad(IntegrityProblem::Truncated))?;
            at += VERSION_LEN;
            tags.push((
                name,
                <[u8; VERSION_LEN]>::try_from(version).unwrap_or_default(),
            ));
        }
        if count == 0 {
            return Err(bad(IntegrityProblem::Malformed(
                "a tagged entry without tags",
            )));
        }
        Ok(Tagged {
            tags,
            stored: bytes.slice(at..),
        })
    }

    /// The entry's tags.
    pub fn tags(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.tags.iter().map(|(tag, _)| *tag)
    }

    /// The value's stored bytes, if every tag still holds the version the entry was
    /// written with (`current`: the tags' versions now, in the order of [`tags`](Self::tags)).
    fn valid(self, current: &[Option<[u8; VERSION_LEN]>]) -> Option<Bytes> {
        let valid = self.tags.len() == current.len()
            && self
                .tags
                .iter()
                .zip(current)
                .all(|((_, written), now)| now.as_ref() == Some(written));
        valid.then_some(self.stored)
    }
}

/// The values of `entries` (stored bytes read under `keys`) as a read serves them: plain
/// ones as they are, tagged ones unwrapped while their tags hold, `None` once a tag was
/// invalidated. One batch read of every record involved.
pub async fn resolve<S: CacheService + ?Sized>(
    cache: &S,
    keys: &[&str],
    entries: Vec<Option<Bytes>>,
) -> Result<Vec<Option<Bytes>>, CacheError> {
    if !entries.iter().flatten().any(|bytes| is_tagged(bytes)) {
        return Ok(entries);
    }
    let mut parsed = Vec::with_capacity(entries.len());
    for (key, entry) in keys.iter().zip(&entries) {
        parsed.push(match entry {
            Some(bytes) if is_tagged(bytes) => Some(Tagged::parse(key, bytes)?),
            _ => None,
        });
    }
    let mut all: Vec<&str> = parsed.iter().flatten().flat_map(Tagged::tags).collect();
    all.sort_unstable();
    all.dedup();
    let current = versions(cache, &all).await?;
    let version_of = |tag: &str| all.binary_search(&tag).ok().and_then(|i| current[i]);
    Ok(entries
        .iter()
        .zip(parsed)
        .map(|(entry, tagged)| match tagged {
            None => entry.clone(),
            Some(tagged) => {
                let now: Vec<_> = tagged.tags().map(version_of).collect();
                tagged.valid(&now)
            }
        })
        .collect())
}

/// [`resolve`] for one entry.
pub async fn resolve_one<S: CacheService + ?Sized>(
    cache: &S,
    key: &str,
    entry: Option<Bytes>,
) -> Result<Option<Bytes>, CacheError> {
    match entry {
        Some(bytes) if is_tagged(&bytes) => {
            let mut resolved = resolve(cache, &[key], vec![Some(bytes)]).await?;
            Ok(resolved.pop().flatten())
        }
        other => Ok(other),
    }
}
