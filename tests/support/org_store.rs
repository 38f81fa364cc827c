//! One in-memory [`OrgStore`] for every test that needs the app's database behind an
//! `OrgResolver`: an app-side seam (Redis itself is never mocked here).
//!
//! [`MemoryOrgStore`] holds rows of any org context type, counts its loads, records what it
//! was asked, and can be slowed, broken or held at a [`Gate`]; rows can change under it.
//! Clones share one store: the resolver owns one, the test keeps another to change and to
//! count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cachet::org::{OrgIdentity, OrgStore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Gate;

/// An org context for tests that need nothing more: an id, a slug and a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgContext {
    pub id: String,
    pub slug: String,
    pub plan: String,
}

impl OrgContext {
    pub fn new(id: &str, slug: &str, plan: &str) -> Self {
        OrgContext {
            id: id.to_owned(),
            slug: slug.to_owned(),
            plan: plan.to_owned(),
        }
    }
}

impl OrgIdentity for OrgContext {
    fn org_slug(&self) -> &str {
        &self.slug
    }
    fn org_id(&self) -> String {
        self.id.clone()
    }
}

/// The store's error, while it is [`set_down`](MemoryOrgStore::set_down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreDown;

impl std::fmt::Display for StoreDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database unavailable")
    }
}

impl std::error::Error for StoreDown {}

/// The app's database, in memory. Rows are keyed by id (a [`put`](Self::put) replaces the
/// row with its id); a load finds its row by slug (exactly, or ignoring ASCII case once
/// [`collating`](Self::collating)) or by id.
///
/// A load, in order: counts itself and records the identifier it was handed
/// ([`loads`](Self::loads), [`asked`](Self::asked)); reads its row at once, like a query;
/// waits at the gate of [`hold_next_load`](Self::hold_next_load) if one is set (that load
/// only); sleeps the [`set_delay`](Self::set_delay); then answers the row, or
/// `Err(StoreDown)` if the store is [`set_down`](Self::set_down) by then.
pub struct MemoryOrgStore<C = OrgContext> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    rows: Mutex<Rows<C>>,
    collate: AtomicBool,
    by_slug: AtomicUsize,
    by_id: AtomicUsize,
    asked: Mutex<Vec<String>>,
    down: AtomicBool,
    delay: Mutex<Duration>,
    hold_next: Mutex<Option<Arc<Gate>>>,
}

struct Rows<C> {
    by_id: HashMap<String, C>,
    /// slug → id.
    slugs: HashMap<String, String>,
}

impl<C> Clone for MemoryOrgStore<C> {
    fn clone(&self) -> Self {
        MemoryOrgStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: OrgIdentity + Clone> Default for MemoryOrgStore<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: OrgIdentity + Clone> MemoryOrgStore<C> {
    /// An empty store: every org is unknown.
    pub fn new() -> Self {
        MemoryOrgStore {
            inner: Arc::new(Inner {
                rows: Mutex::new(Rows {
                    by_id: HashMap::new(),
                    slugs: HashMap::new(),
                }),
                collate: AtomicBool::new(false),
                by_slug: AtomicUsize::new(0),
                by_id: AtomicUsize::new(0),
                asked: Mutex::new(Vec::new()),
                down: AtomicBool::new(false),
                delay: Mutex::new(Duration::ZERO),
                hold_next: Mutex::new(None),
            }),
        }
    }

    /// A store holding `rows`.
    pub fn with(rows: impl IntoIterator<Item = C>) -> Self {
        let store = Self::new();
        for row in rows {
            store.put(row);
        }
        store
    }

    /// Matches slugs ignoring ASCII case, as most databases' default collation does.
    pub fn collating(self) -> Self {
        self.inner.collate.store(true, Ordering::SeqCst);
        self
    }

    /// Adds `row`, or replaces the row with its id (a changed org).
    pub fn put(&self, row: C) {
        let mut rows = lock(&self.inner.rows);
        let id = row.org_id();
        if let Some(old) = rows.by_id.get(&id) {
            let old_slug = old.org_slug().to_owned();
            rows.slugs.remove(&old_slug);
        }
        rows.slugs.insert(row.org_slug().to_owned(), id.clone());
        rows.by_id.insert(id, row);
    }

    /// The row with this slug (exactly), as the store holds it now.
    pub fn row(&self, slug: &str) -> Option<C> {
        let rows = lock(&self.inner.rows);
        rows.slugs
            .get(slug)
            .and_then(|id| rows.by_id.get(id))
            .cloned()
    }

    /// Loads so far, by slug and by id, failed ones included.
    pub fn loads(&self) -> usize {
        self.inner.by_slug.load(Ordering::SeqCst) + self.inner.by_id.load(Ordering::SeqCst)
    }

    /// Every slug and id the store was handed, in order.
    pub fn asked(&self) -> Vec<String> {
        lock(&self.inner.asked).clone()
    }

    /// Whether loads fail with [`StoreDown`].
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// How long each load takes after it read its row.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.inner.delay) = delay;
    }

    /// Holds the next load at `gate`, after it read its row, until the test opens the gate.
    pub fn hold_next_load(&self, gate: Arc<Gate>) {
        *lock(&self.inner.hold_next) = Some(gate);
    }

    fn find_by_slug(&self, slug: &str) -> Option<C> {
        let rows = lock(&self.inner.rows);
        if let Some(row) = rows.slugs.get(slug).and_then(|id| rows.by_id.get(id)) {
            return Some(row.clone());
        }
        if !self.inner.collate.load(Ordering::SeqCst) {
            return None;
        }
        rows.by_id
            .values()
            .find(|row| row.org_slug().eq_ignore_ascii_case(slug))
            .cloned()
    }

    fn find_by_id(&self, id: &str) -> Option<C> {
        lock(&self.inner.rows).by_id.get(id).cloned()
    }

    async fn answer(&self, identifier: &str, row: Option<C>) -> Result<Option<C>, StoreDown> {
        lock(&self.inner.asked).push(identifier.to_owned());
        let gate = lock(&self.inner.hold_next).take();
        if let Some(gate) = gate {
            gate.pause().await;
        }
        let delay = *lock(&self.inner.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.inner.down.load(Ordering::SeqCst) {
            return Err(StoreDown);
        }
        Ok(row)
    }
}

impl<C> OrgStore for MemoryOrgStore<C>
where
    C: OrgIdentity + Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Context = C;
    type Error = StoreDown;

    async fn load_by_slug(&self, slug: &str) -> Result<Option<C>, StoreDown> {
        self.inner.by_slug.fetch_add(1, Ordering::SeqCst);
        let row = self.find_by_slug(slug);
        self.answer(slug, row).await
    }

    async fn load_by_id(&self, id: &str) -> Result<Option<C>, StoreDown> {
        self.inner.by_id.fetch_add(1, Ordering::SeqCst);
        let row = self.find_by_id(id);
        self.answer(id, row).await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
