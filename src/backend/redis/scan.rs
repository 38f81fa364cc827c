//! Prefix invalidation: `SCAN MATCH <escaped prefix>*` (on every primary of a cluster), then
//! `UNLINK` of each page, grouped by hash slot on a cluster. It never blocks the server the
//! way `KEYS` does, and counts what `UNLINK` removed, not what `SCAN` returned.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{Client, KeysInterface};
use fred::types::Key;
use fred::types::scan::Scanner;
use futures_util::stream::StreamExt;

use super::RedisCacheService;
use crate::CacheError;
use crate::service::BoxFuture;

/// Default `COUNT` hint of the first `SCAN` page in `invalidate_prefix`.
pub const DEFAULT_SCAN_COUNT: u32 = 1_000;

/// `SCAN` pages are resized to take about this long each (round trip included): long
/// enough to need few round trips, short enough that other clients' commands never wait
/// behind one for long.
const SCAN_PAGE_TARGET: Duration = Duration::from_millis(1);
/// Bounds of the adaptive `COUNT`.
const SCAN_COUNT_RANGE: (u32, u32) = (100, 20_000);

impl RedisCacheService {
    /// Removes every key that starts with the literal `prefix` (in the namespace); returns
    /// how many it removed.
    pub(super) async fn invalidate_prefix_now(&self, prefix: &str) -> Result<u64, CacheError> {
        let pattern = format!("{}*", escape_glob(&self.full_key(prefix)));
        let client = self.client().clone();
        if self.connection().is_clustered() {
            self.invalidate_prefix_cluster(&client, pattern, prefix)
                .await
        } else {
            self.invalidate_prefix_adaptive(&client, pattern, prefix)
                .await
        }
    }

    /// Standalone and Sentinel: a `SCAN` cursor loop whose `COUNT` adapts so that each call
    /// takes about [`SCAN_PAGE_TARGET`], with each page's `UNLINK` sent while the next page
    /// is scanned.
    async fn invalidate_prefix_adaptive(
        &self,
        client: &Client,
        pattern: String,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        let mut cursor = String::from("0");
        let mut count = self.scan_count();
        let mut removed = 0u64;
        let mut unlinking: Option<BoxFuture<'_, Result<u64, CacheError>>> = None;
        loop {
            let scan = async {
                let started = Instant::now();
                let page = client
                    .scan_page::<(String, Vec<Bytes>), _, _>(
                        cursor.clone(),
                        pattern.clone(),
                        Some(count),
                        None,
                    )
                    .await;
                (page, started.elapsed())
            };
            let ((page, took), unlinked) = match unlinking.take() {
                Some(unlink) => {
                    let (scanned, unlinked) = futures_util::future::join(scan, unlink).await;
                    (scanned, Some(unlinked))
                }
                None => (scan.await, None),
            };
            if let Some(unlinked) = unlinked {
                removed += unlinked?;
            }
            let (next, keys) =
                page.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
            count = if took < SCAN_PAGE_TARGET / 2 {
                count.saturating_mul(2).min(SCAN_COUNT_RANGE.1)
            } else if took > SCAN_PAGE_TARGET * 2 {
                (count / 2).max(SCAN_COUNT_RANGE.0)
            } else {
                count
            };
            if !keys.is_empty() {
                let keys: Vec<Key> = keys.into_iter().map(Key::from).collect();
                unlinking = Some(Box::pin(self.unlink_batch(client, keys, prefix)));
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        if let Some(unlink) = unlinking {
            removed += unlink.await?;
        }
        Ok(removed)
    }

    /// Cluster: `SCAN` on every primary (fred's `scan_cluster`), `UNLINK` per page grouped
    /// by hash slot, the next page requested before the current one is unlinked.
    async fn invalidate_prefix_cluster(
        &self,
        client: &Client,
        pattern: String,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        let mut pages = client
            .scan_cluster(pattern, Some(self.scan_count()), None)
            .boxed();
        let mut removed = 0u64;
        let command_timeout = self.connection().command_timeout();
        loop {
            let page = tokio::time::timeout(command_timeout, pages.next())
                .await
                .map_err(|_| self.timeout_error("invalidate_prefix", prefix))?;
            let Some(page) = page else { break };
            let mut page = page.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
            let keys = page.take_results().unwrap_or_default();
            page.next();
            if !keys.is_empty() {
                // SCAN can return a key twice: the UNLINK results count each key once.
                removed += self.unlink_batch(client, keys, prefix).await?;
            }
        }
        Ok(removed)
    }

    /// Unlinks `keys`, in one command per hash slot on a cluster; returns how many existed.
    async fn unlink_batch(
        &self,
        client: &Client,
        keys: Vec<Key>,
        prefix: &str,
    ) -> Result<u64, CacheError> {
        if !self.connection().is_clustered() {
            return client
                .unlink::<u64, _>(keys)
                .await
                .map_err(|e| self.backend_error("invalidate_prefix", prefix, e));
        }
        let groups = fred::util::group_by_hash_slot(keys)
            .map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
        let unlinks = groups
            .into_values()
            .map(|group| client.unlink::<u64, _>(group.into_iter().collect::<Vec<_>>()));
        let mut removed = 0;
        for result in futures_util::future::join_all(unlinks).await {
            removed += result.map_err(|e| self.backend_error("invalidate_prefix", prefix, e))?;
        }
        Ok(removed)
    }

    fn timeout_error(&self, operation: &'static str, key: &str) -> CacheError {
        let connection = self.connection();
        CacheError::timeout(
            connection.server_label(),
            operation,
            key,
            connection.command_timeout(),
        )
    }
}

/// Escapes every glob character of `literal` for `SCAN MATCH`, so the pattern
/// `escape_glob(p) + "*"` matches exactly the keys that start with `p`.
///
/// ```
/// use cachet::backend::redis::escape_glob;
///
/// assert_eq!(escape_glob("org:acme"), "org:acme");
/// assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
/// ```
pub fn escape_glob(literal: &str) -> String {
    let mut escaped = String::with_capacity(literal.len() + 8);
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
