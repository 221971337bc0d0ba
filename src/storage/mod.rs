//! The node's storage, the one owner of what it holds on disk and of its disk budget. It
//! answers one question for serving, the mesh and the mirror alike, [`Storage::held`]: a NAR is
//! held as an own path in the local Nix store (served by serializing the path on the fly, no
//! copy kept: only the NAR's BLAKE3 leaves, 0.2% of its size) or as a NAR file fetched from a
//! peer. Every read is verified against the leaves, group by group.
//!
//! NAR files live in `<data-dir>/nars/<blake3>.nar` within `[store] max-size` (and leaving
//! `min-free` free on the disk): the least recently used (fetched or served) go first, never
//! one being read, pinned (`narmesh pin`), or not yet in the S3 mirror's bucket. Fetches in
//! progress are `nars/partial/<blake3>.nar`, removed at start if a crash left them.
//! Own paths that leave the local store (Nix GC, `nix-store --delete`) stop being held: the
//! watcher in `gc` notices and the paths move to the end of the log, so peers learn that this
//! node no longer provides them.

mod budget;
mod evict;
mod files;
mod gc;
mod legacy;
mod read;
mod record;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use files::{PartialNar, free_space, under_floor};
pub use read::ReadError;

use crate::chunks::Leaves;
use crate::db::{Db, DbError, StorageCounters};
use crate::metrics::Metrics;
use crate::nix::nar_layout::NarLayout;
use crate::store::LocalStore;
pub use budget::ReadBudget;
use evict::Lru;
use read::{RangeReader, Source};

/// Errors of the storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("the NAR is not held here")]
    NotHeld,
    #[error("a NAR of {size} bytes is larger than the store's cap of {cap} bytes")]
    TooLarge { size: u64, cap: u64 },
    #[error("no room for {need} bytes: {why}")]
    Full { need: u64, why: String },
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("storage task: {0}")]
    Task(String),
}

/// `[store]` as the storage uses it.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Most bytes of NAR files (fetched from peers) kept.
    pub max_size: u64,
    /// Free space left on the data dir's file system.
    pub min_free: u64,
    /// How often own paths are checked against the local store.
    pub gc_interval: Duration,
    /// This node runs the S3 mirror: a NAR is kept while the mirror's durable outbox still
    /// has to upload it (or has not taken its path in yet), even before the mirror protects
    /// it itself (at start, while the bucket is away, during a migration).
    pub mirror: bool,
    /// What the pieces of all reads may hold together (`[store] read-memory`).
    pub read_memory: u64,
    /// The node's watch over its recording thread.
    pub vital: crate::vital::Vital,
}

/// How this node holds a NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// An own path in the local Nix store (hash part, full store path).
    Store { hash: String, store_path: String },
    /// A NAR file of the storage.
    File { size: u64 },
}

/// A handle to the storage; cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    db: Db,
    store: Arc<LocalStore>,
    cfg: StorageConfig,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Layouts of own paths being read (a range request need not walk the tree again).
    layouts: quick_cache::sync::Cache<[u8; 32], Arc<NarLayout>, LayoutWeight>,
    /// Records fetched NAR files, a group per commit.
    recorder: record::Recorder,
    /// One change of pins or recomputation of the pinned closures at a time (`pins_lock`).
    pins_lock: Mutex<()>,
    /// The memory of every read's pieces.
    budget: ReadBudget,
}

#[derive(Debug, Default)]
struct State {
    lru: Lru,
    /// Bytes promised to fetches in progress.
    reserved: u64,
    /// Readers of each NAR (never evicted while read).
    readers: HashMap<[u8; 32], usize>,
    /// The leaves of each NAR being read, shared by all its readers (a 10 GiB NAR's are
    /// 20 MiB: loaded for every reader, 64 peers reading it would hold 1.3 GiB); gone with
    /// its last reader.
    leaves_read: HashMap<[u8; 32], std::sync::Weak<Leaves>>,
    /// NARs the mirror still needs.
    protected: HashSet<[u8; 32]>,
    /// This node runs the S3 mirror (`StorageConfig::mirror`).
    mirror: bool,
    /// NARs of pinned closures.
    pinned: HashSet<[u8; 32]>,
    /// The pinned closures name paths not recorded (yet) when last computed.
    pins_incomplete: bool,
    /// When the pinned closures were last computed.
    pins_at: Option<std::time::Instant>,
    /// Last-used times not yet written to the database (the latest of each NAR).
    touched: HashMap<[u8; 32], u64>,
}

impl State {
    /// The pinned closures named unrecorded paths when last computed, more than
    /// [`PINS_FRESH`] ago: they may have grown since.
    fn pins_stale(&self) -> bool {
        self.pins_incomplete && self.pins_at.is_none_or(|t| t.elapsed() >= PINS_FRESH)
    }
}

#[derive(Debug, Clone)]
struct LayoutWeight;

impl quick_cache::Weighter<[u8; 32], Arc<NarLayout>> for LayoutWeight {
    fn weight(&self, _: &[u8; 32], v: &Arc<NarLayout>) -> u64 {
        v.weight() as u64 + 64
    }
}

/// Bytes of layouts kept in memory.
const LAYOUT_CACHE_BYTES: u64 = 8 << 20;

/// Unpinned paths whose closures are revisited together (see `refresh_pins`).
const UNPINNED_BATCH: usize = 1024;

/// How old the pinned closures may be, when they name paths not recorded when computed, before
/// an eviction computes them again (a path recorded meanwhile may have joined them).
const PINS_FRESH: Duration = Duration::from_secs(1);

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
}

/// Keeps a NAR from eviction while it is read.
struct ReadGuard {
    inner: Arc<Inner>,
    blake3: [u8; 32],
}

/// A NAR's shared leaves as the bytes sent to a peer, a reader of it while they are held.
struct SharedLeaves {
    leaves: Arc<Leaves>,
    _guard: ReadGuard,
}

impl AsRef<[u8]> for SharedLeaves {
    fn as_ref(&self) -> &[u8] {
        self.leaves.as_bytes()
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(n) = st.readers.get_mut(&self.blake3) {
            *n -= 1;
            if *n == 0 {
                st.readers.remove(&self.blake3);
                st.leaves_read.remove(&self.blake3);
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn guard(self: &Arc<Self>, blake3: [u8; 32]) -> ReadGuard {
        *self.lock().readers.entry(blake3).or_default() += 1;
        ReadGuard {
            inner: self.clone(),
            blake3,
        }
    }
}

impl Storage {
    /// Open the storage in `data_dir`: clean what a crash left, reconcile files with the
    /// database, and take over the NARs of a data dir of the previous format. Blocking.
    pub fn open(
        data_dir: &Path,
        db: Db,
        store: Arc<LocalStore>,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        let dir = data_dir.join("nars");
        let recorder = record::Recorder::start(
            db.clone(),
            dir.clone(),
            cfg.vital.guard("storage recording"),
        )?;
        let mirror = cfg.mirror;
        let budget = ReadBudget::new(cfg.read_memory, metrics.storage_read_buffered_bytes.clone());
        let inner = Arc::new(Inner {
            budget,
            recorder,
            dir,
            db,
            store,
            cfg,
            metrics,
            state: Mutex::new(State {
                mirror,
                ..State::default()
            }),
            layouts: quick_cache::sync::Cache::with_weighter(
                1024,
                LAYOUT_CACHE_BYTES,
                LayoutWeight,
            ),
            pins_lock: Mutex::new(()),
        });
        let storage = Storage { inner };
        storage.reconcile()?;
        legacy::migrate(&storage, data_dir)?;
        storage.refresh_pins()?;
        storage.publish();
        Ok(storage)
    }

    /// The database the storage keeps its books in.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// How this node holds the NAR with this BLAKE3, if it does.
    pub async fn held(&self, blake3: &[u8; 32]) -> Result<Option<Held>, StorageError> {
        if let Some(size) = self.inner.lock().lru.size_of(blake3) {
            return Ok(Some(Held::File { size }));
        }
        let db = self.inner.db.clone();
        let b = *blake3;
        blocking(move || {
            Ok(db
                .own_holder(&b)?
                .map(|(hash, store_path)| Held::Store { hash, store_path }))
        })
        .await
    }

    /// True if this node holds the NAR. Blocking (a database read for own paths).
    pub fn holds_blocking(&self, blake3: &[u8; 32]) -> bool {
        self.inner.lock().lru.contains(blake3)
            || matches!(self.inner.db.own_holder(blake3), Ok(Some(_)))
    }

    /// Keep a NAR from eviction for as long as the returned guard lives (a reader of it that
    /// does not go through [`Storage::read`]).
    pub fn hold(&self, blake3: &[u8; 32]) -> impl Send + 'static {
        self.inner.guard(*blake3)
    }

    /// The leaves of a NAR held here, as sent to peers: the copy its readers share (however
    /// many peers ask for them at a time, a 10 GiB NAR's 20 MiB are held once), and the NAR is
    /// being read while the bytes are held.
    pub async fn leaves(&self, blake3: &[u8; 32]) -> Result<Option<Bytes>, StorageError> {
        let this = self.clone();
        let b = *blake3;
        let guard = self.inner.guard(b);
        blocking(move || match this.shared_leaves(&b) {
            Ok(leaves) => Ok(Some(Bytes::from_owner(SharedLeaves {
                leaves,
                _guard: guard,
            }))),
            Err(StorageError::NotHeld) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    fn leaves_blocking(&self, blake3: &[u8; 32]) -> Result<Option<Arc<Leaves>>, StorageError> {
        let Some(bytes) = self.inner.db.leaves(blake3)? else {
            return Ok(None);
        };
        // Not under the lock: an own path's size is a database read.
        let fetched = self.inner.lock().lru.size_of(blake3);
        let size = match fetched {
            Some(s) => s,
            None => {
                // An own path: its size is its claim's.
                let recs = self.inner.db.by_blake3(blake3)?;
                let Some(size) = recs
                    .iter()
                    .find_map(|r| r.claim(blake3).map(|c| c.nar_size))
                else {
                    return Ok(None);
                };
                size
            }
        };
        match Leaves::from_bytes(size, &bytes) {
            Ok(l) => Ok(Some(Arc::new(l))),
            Err(e) => {
                tracing::error!("storage: leaves of {}: {e}", hex(blake3));
                Ok(None)
            }
        }
    }

    /// The memory budget of every read of a NAR (those of NARs still arriving too).
    pub fn read_budget(&self) -> ReadBudget {
        self.inner.budget.clone()
    }

    /// Read `start..end` of a NAR held here, verified chunk group by chunk group. Bytes that do
    /// not match (a tampered store path, a corrupt file) end the stream with an error, and the
    /// NAR stops being held.
    pub async fn read(
        &self,
        blake3: &[u8; 32],
        start: u64,
        end: u64,
    ) -> Result<mpsc::Receiver<Result<Bytes, ReadError>>, StorageError> {
        let this = self.clone();
        let b = *blake3;
        // A reader from here on: the NAR is not evicted while it opens, and the leaves it
        // shares are dropped with the last reader (the guard goes along to the blocking pool,
        // so one whose asker left is still a reader until it has opened).
        let guard = self.inner.guard(*blake3);
        let (opened, guard) = blocking(move || Ok((this.open_source(&b), guard))).await?;
        let (source, leaves, own) = opened?;
        self.touch(blake3);
        let this = self.clone();
        let b = *blake3;
        let on_error = move |e: &ReadError| this.read_failed(b, own, e);
        Ok(RangeReader::new(source, leaves, start, end).stream(
            self.inner.budget.clone(),
            guard,
            on_error,
        ))
    }

    /// The leaves of a NAR, the copy its readers share (loaded, and shared, if none is);
    /// `NotHeld` if there are none. The caller holds a [`ReadGuard`] of it.
    fn shared_leaves(&self, blake3: &[u8; 32]) -> Result<Arc<Leaves>, StorageError> {
        let shared = self
            .inner
            .lock()
            .leaves_read
            .get(blake3)
            .and_then(std::sync::Weak::upgrade);
        if let Some(l) = shared {
            return Ok(l);
        }
        let loaded = self.leaves_blocking(blake3)?.ok_or(StorageError::NotHeld)?;
        // Readers that came together each loaded them: the first to get here shares its copy,
        // the others take it and drop theirs.
        let mut st = self.inner.lock();
        match st
            .leaves_read
            .get(blake3)
            .and_then(std::sync::Weak::upgrade)
        {
            Some(l) => Ok(l),
            None => {
                st.leaves_read.insert(*blake3, Arc::downgrade(&loaded));
                Ok(loaded)
            }
        }
    }

    /// Where to read a held NAR from, its leaves (shared with its other readers), and the own
    /// path it is (if it is one). The caller holds a [`ReadGuard`] of it.
    #[allow(clippy::type_complexity)]
    fn open_source(
        &self,
        blake3: &[u8; 32],
    ) -> Result<(Source, Arc<Leaves>, Option<String>), StorageError> {
        let leaves = self.shared_leaves(blake3)?;
        if self.inner.lock().lru.contains(blake3) {
            let path = self.file_path(blake3);
            match std::fs::File::open(&path) {
                Ok(file) => return Ok((Source::File { file, path }, leaves, None)),
                Err(e) => {
                    tracing::error!("storage: {}: {e}; forgetting it", path.display());
                    self.forget_files(&[*blake3], false)?;
                    return Err(StorageError::NotHeld);
                }
            }
        }
        let (hash, store_path) = self
            .inner
            .db
            .own_holder(blake3)?
            .ok_or(StorageError::NotHeld)?;
        let layout = match self.inner.layouts.get(blake3) {
            Some(l) => l,
            None => {
                let sp = crate::nix::StorePath::parse(&store_path)
                    .map_err(|e| StorageError::Task(e.to_string()))?;
                let real = self.inner.store.real_path(&sp);
                let layout = match NarLayout::of(&real) {
                    Ok(l) if l.size() == leaves.size() => Arc::new(l),
                    Ok(l) => {
                        tracing::error!(
                            "storage: {store_path} is {} bytes as a NAR, recorded as {}; no longer served",
                            l.size(),
                            leaves.size()
                        );
                        self.inner.db.own_lost(&[(*blake3, hash)])?;
                        return Err(StorageError::NotHeld);
                    }
                    Err(e) => {
                        tracing::warn!("storage: {store_path}: {e}; no longer served");
                        self.inner.db.own_lost(&[(*blake3, hash)])?;
                        return Err(StorageError::NotHeld);
                    }
                };
                self.inner.layouts.insert(*blake3, layout.clone());
                layout
            }
        };
        Ok((Source::Store(layout), leaves, Some(hash)))
    }

    /// A read found the bytes bad: the NAR is no longer held as that (an own path whose store
    /// copy changed is withdrawn; a corrupt file is removed).
    fn read_failed(&self, blake3: [u8; 32], own: Option<String>, e: &ReadError) {
        tracing::error!("storage: reading {}: {e}", hex(&blake3));
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.inner.layouts.remove(&blake3);
            let res: Result<(), String> = match own {
                Some(hash) => this
                    .inner
                    .db
                    .own_lost(&[(blake3, hash)])
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => this
                    .forget_files(&[blake3], false)
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = res {
                tracing::error!("storage: forgetting {}: {e}", hex(&blake3));
            }
        });
    }

    /// Mark a NAR file used now (for eviction order).
    pub fn touch(&self, blake3: &[u8; 32]) {
        let now = now_secs();
        let mut st = self.inner.lock();
        if st.lru.touch(blake3, now) {
            st.touched.insert(*blake3, now);
        }
    }

    /// Keep these NARs until the mirror releases them.
    pub fn protect(&self, blake3s: impl IntoIterator<Item = [u8; 32]>) {
        self.inner.lock().protected.extend(blake3s);
    }

    /// True if nothing protects this NAR for the mirror.
    pub fn is_released(&self, blake3: &[u8; 32]) -> bool {
        !self.inner.lock().protected.contains(blake3)
    }

    /// The mirror has these NARs in its bucket: they may be evicted like the rest.
    pub fn release(&self, blake3s: &[[u8; 32]]) {
        let mut st = self.inner.lock();
        for b in blake3s {
            st.protected.remove(b);
        }
    }

    /// Pin (or unpin) the closures of these paths (by hash part) against eviction.
    pub async fn pin(&self, hashes: Vec<String>, pinned: bool) -> Result<(), StorageError> {
        let this = self.clone();
        blocking(move || {
            let _one = this.pins_lock();
            this.inner.db.set_pins(&hashes, pinned)?;
            this.refresh_pins_locked()
        })
        .await
    }

    /// The NARs of pinned closures.
    pub fn pinned_nars(&self) -> HashSet<[u8; 32]> {
        self.inner.lock().pinned.clone()
    }

    /// One change of pins or recomputation of the pinned closures at a time: each works out
    /// what left the set from what the one before it left.
    fn pins_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .pins_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Recompute the NARs of pinned closures (records' references, as far as recorded: run
    /// again by the housekeeping, so paths recorded after the pin join it). The paths of NARs
    /// that left the set move to the end of the log: the walk that forgets dead records
    /// (`crate::forget`) passed them while they were kept, and must come to them again. What
    /// left is told by the set this process knew and by the closures of the paths the
    /// database still notes as unpinned (a crash after an unpin's commit: done at the next
    /// start); the note is cleared once their paths have moved. Blocking.
    fn refresh_pins(&self) -> Result<(), StorageError> {
        let _one = self.pins_lock();
        self.refresh_pins_locked()
    }

    /// `refresh_pins` if the pinned closures named unrecorded paths when last computed, more
    /// than [`PINS_FRESH`] ago (asked again under the lock: of fetches that found them stale
    /// at once, one recomputes).
    fn refresh_pins_if_stale(&self) -> Result<(), StorageError> {
        let _one = self.pins_lock();
        if !self.inner.lock().pins_stale() {
            return Ok(());
        }
        self.refresh_pins_locked()
    }

    fn refresh_pins_locked(&self) -> Result<(), StorageError> {
        let at = std::time::Instant::now();
        let (pinned, incomplete) = self.closure_nars(self.inner.db.pins()?)?;
        let left: Vec<[u8; 32]> = {
            let mut st = self.inner.lock();
            let left = st.pinned.difference(&pinned).copied().collect();
            st.pinned = pinned.clone();
            st.pins_incomplete = incomplete;
            st.pins_at = Some(at);
            left
        };
        if let Err(e) = self.revisit(&left) {
            // Kept until a later refresh revisits them.
            self.inner.lock().pinned.extend(left);
            return Err(e);
        }
        loop {
            let roots = self.inner.db.unpinned(UNPINNED_BATCH)?;
            if roots.is_empty() {
                return Ok(());
            }
            let (was, _) = self.closure_nars(roots.clone())?;
            let left: Vec<[u8; 32]> = was.difference(&pinned).copied().collect();
            self.revisit(&left)?;
            self.inner.db.unpinned_done(&roots)?;
        }
    }

    /// The NARs (of every claim not failed) of the closures of these paths (by hash part), as
    /// far as recorded, and whether they name a path not recorded (or recorded without a claim
    /// to serve).
    fn closure_nars(&self, roots: Vec<String>) -> Result<(HashSet<[u8; 32]>, bool), StorageError> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut todo = roots;
        let mut nars = HashSet::new();
        let mut incomplete = false;
        while !todo.is_empty() {
            let batch: Vec<String> = todo.drain(..).filter(|h| seen.insert(h.clone())).collect();
            for rec in self.inner.db.paths(&batch)? {
                // Every claim not failed: the one a path serves may become another.
                let live: Vec<_> = rec
                    .iter()
                    .flat_map(|r| &r.claims)
                    .filter(|c| !c.failed)
                    .collect();
                if live.is_empty() {
                    incomplete = true;
                }
                for c in live {
                    nars.insert(c.blake3);
                    // References signed upstream are never recorded (nor held as files).
                    if let Ok(info) = crate::nix::NarInfo::parse(&c.narinfo) {
                        todo.extend(
                            info.references
                                .iter()
                                .map(|r| r.hash_part())
                                .filter(|h| !c.upstream_refs.iter().any(|u| u == h))
                                .map(str::to_owned),
                        );
                    }
                }
            }
        }
        Ok((nars, incomplete))
    }

    /// Move the paths claiming these NARs to the end of the log, a bounded batch per commit.
    fn revisit(&self, blake3s: &[[u8; 32]]) -> Result<(), StorageError> {
        let mut hashes = Vec::new();
        for b in blake3s {
            hashes.extend(
                self.inner
                    .db
                    .by_blake3(b)?
                    .iter()
                    .map(|r| r.hash_part().to_owned()),
            );
        }
        for batch in hashes.chunks(1024) {
            self.inner.db.relog(batch)?;
        }
        Ok(())
    }

    /// What the storage holds, for status.
    pub fn counters(&self) -> Result<StorageCounters, StorageError> {
        Ok(self.inner.db.storage_counters()?)
    }

    /// `[store] max-size`.
    pub fn cap(&self) -> u64 {
        self.inner.cfg.max_size
    }

    /// Publish gauges (bytes held, cap, own paths).
    fn publish(&self) {
        let m = &self.inner.metrics;
        m.storage_file_bytes
            .set(self.inner.lock().lru.bytes() as i64);
        m.storage_cap_bytes.set(self.inner.cfg.max_size as i64);
        if let Ok(c) = self.inner.db.storage_counters() {
            m.storage_own_paths.set(c.own_paths as i64);
            // The totals follow the database's own (what `narmesh status` says) at each
            // publish, whichever write counted them: parts of a long list written before a
            // later part failed, a store copy found changed at a read.
            crate::metrics::raise_to(&m.storage_evictions, c.evictions);
            crate::metrics::raise_to(&m.storage_gc_lost, c.gc_lost);
        }
        // A disk under the floor refuses every NAR from peers: say so where an operator looks
        // (`narmesh status`, doctor), not only in each failed fetch's log line.
        let dir = &self.inner.dir;
        let low = files::free_space(dir)
            .and_then(|free| files::under_floor(dir, free, self.inner.cfg.min_free));
        m.problem("storage", low);
    }

    /// Run the storage's housekeeping (own paths against the Nix store, last-used times, free
    /// space, pinned closures) until cancelled.
    pub async fn run(self, cancel: tokio_util::sync::CancellationToken) {
        gc::run(self, cancel).await
    }

    fn file_path(&self, blake3: &[u8; 32]) -> PathBuf {
        self.inner.dir.join(format!("{}.nar", hex(blake3)))
    }
}

/// Lower-case hex of a BLAKE3 hash (how NAR files and URLs name it).
pub fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
