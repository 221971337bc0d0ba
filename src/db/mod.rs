//! The node's own databases. The durable queue of hook reports is an append-only journal of its
//! own (`queue.log`, [`journal`]), so acknowledging a hook waits only for one small fsync'd
//! append, never behind the pipeline's or the mesh's commits. The main file (redb) holds the
//! recorded paths and their
//! claims, the append-only log of changes (for catch-up), what the storage holds (own paths in
//! the Nix store, NAR files, their BLAKE3 leaves, pins, eager wishes), the S3 mirror's outbox,
//! and counters. This module owns every table definition; redb types stay inside it. All calls
//! block: run them off async threads.
//!
//! Files: [`records`] (the record types), `paths` (recording, the log), `storage` (the
//! storage's tables), `outbox` (the mirror's), `forget` (dropping the records of paths nobody
//! holds any more), `review` (a peer's statements checked again after a long absence), `audit`
//! (the mirror's bucket audit), `migrate` (reading a data dir of `e5a6e05`), [`writes`] (every
//! write transaction begins there, counted while in flight for the watchdog).

mod audit;
mod forget;
mod handle;
mod journal;
mod leaves;
mod migrate;
mod outbox;
mod paths;
mod records;
mod review;
mod storage;
pub mod writes;

use std::path::Path;
use std::sync::Arc;

use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

pub use audit::{Again, Lost};
pub use forget::{ForgetStep, Forgotten};
pub use migrate::LegacyBlob;
pub use outbox::{MirrorNeed, MirrorState, OpenUpload};
pub use paths::{OwnRecord, RemoteClaim};
pub use records::{
    Claim, Counters, MAX_BINDINGS, PathRecord, Provider, QueueItem, hash_part_of, merge_provider,
};
pub use storage::{NarFile, StorageCounters, WRITE_PART};

/// Reports waiting to be ingested, as `e5a6e05` kept them in the main file: taken over into the
/// journal at start.
const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue_v1");
/// Recorded paths by hash part ([`PathRecord`]).
const PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("paths_v3");
/// The log: hash parts of recorded paths by sequence number; a path's entry moves to the end
/// whenever its record changes, so the log holds each path once, in order of last change.
const LOG: TableDefinition<u64, &str> = TableDefinition::new("log_v2");
/// Where each path's entry is in the log.
const LOG_INDEX: TableDefinition<&str, u64> = TableDefinition::new("log_index_v1");
/// Hash parts of the paths with a claim on each NAR, by the NAR's BLAKE3.
const BLOBS: MultimapTableDefinition<&[u8], &str> = MultimapTableDefinition::new("blobs_v3");
/// Catch-up cursors: the last log sequence number taken from each peer (by endpoint id).
const CURSORS: TableDefinition<&[u8], u64> = TableDefinition::new("cursors_v1");
/// Counters and sequence numbers.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");

const QUEUE_NEXT: &str = "queue.next";
const LOG_NEXT: &str = "log.next";
const FAILURES: &str = "failures";
/// A fingerprint of the trust configuration the records were last checked against.
const TRUST_FINGERPRINT: &str = "trust.fingerprint";

/// Errors of the node database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("node database: {0}")]
    Redb(redb::Error),
    #[error("node database: closed after an I/O error, not yet opened again")]
    Closed,
    #[error("node database: undecodable record: {0}")]
    Decode(#[from] postcard::Error),
    #[error("queue journal: {0}")]
    Journal(#[from] std::io::Error),
    /// A commit or lookup a test made fail (`NARMESH_TEST_FAULT`, [`crate::killpoint::FAULTS`]).
    #[error("node database: a step failed (a fault injected by NARMESH_TEST_FAULT)")]
    Injected,
}

impl From<redb::Error> for DbError {
    fn from(e: redb::Error) -> Self {
        handle::note(&e);
        DbError::Redb(e)
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Bytes of redb's page cache: enough for the hot part of 100,000 records, far below redb's
/// default (1 GiB), which would let a node's memory grow with its history.
const CACHE_BYTES: usize = 16 << 20;

/// A handle to the node database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    db: Arc<handle::Handle>,
    queue: Arc<std::sync::Mutex<journal::Journal>>,
    /// Bumped after every commit that adds or changes a record, for those who wait on records
    /// (the mirror) instead of polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Hash parts of records written or changed: for caches of rendered records and answers.
    changed_paths: Arc<tokio::sync::broadcast::Sender<String>>,
    /// When a commit of claims learnt from peers was last fsync'd (see `record_remote`).
    remote_synced: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Own paths recorded since the storage last took them ([`Db::take_recent_own`]).
    recent_own: Arc<std::sync::Mutex<RecentOwn>>,
    /// Told the queue's depth at each change, under the queue's lock
    /// ([`Db::observe_queue_depth`]).
    depth_observer: Arc<std::sync::OnceLock<DepthObserver>>,
}

/// What is told the queue's depth (the node's `narmesh_queue_depth`).
type DepthObserver = Box<dyn Fn(u64) + Send + Sync>;

/// Own paths recorded lately, as (BLAKE3, hash part, store path); `None` once more than
/// [`RECENT_OWN`] were.
type RecentOwn = Option<Vec<([u8; 32], String, String)>>;

/// Own paths recorded lately kept at most for the storage's next check; past that, it checks
/// them all.
const RECENT_OWN: usize = 4096;

/// What a broadcast of hash parts ([`Db::subscribe_changed_paths`], or the like) holds now,
/// into `into`; `lost` if some of it was lost (the receiver lagged).
pub fn drain(
    rx: &mut tokio::sync::broadcast::Receiver<String>,
    into: &mut Vec<String>,
    lost: &mut bool,
) {
    use tokio::sync::broadcast::error::TryRecvError;
    loop {
        match rx.try_recv() {
            Ok(h) => into.push(h),
            Err(TryRecvError::Lagged(_)) => *lost = true,
            Err(_) => return,
        }
    }
}

/// How long claims learnt from peers may wait for an fsync: they are copies, asked for again
/// after a crash (see `record_remote`).
const REMOTE_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

fn bump(meta: &mut redb::Table<&str, u64>, key: &str, by: u64) -> Result<u64, DbError> {
    let cur = meta.get(key)?.map(|v| v.value()).unwrap_or(0);
    meta.insert(key, cur + by)?;
    Ok(cur)
}

fn lower(meta: &mut redb::Table<&str, u64>, key: &str, by: u64) -> Result<(), DbError> {
    let cur = meta.get(key)?.map(|v| v.value()).unwrap_or(0);
    meta.insert(key, cur.saturating_sub(by))?;
    Ok(())
}

fn get_meta(meta: &impl redb::ReadableTable<&'static str, u64>, key: &str) -> Result<u64, DbError> {
    Ok(meta.get(key)?.map(|v| v.value()).unwrap_or(0))
}

use writes::durable;

impl Db {
    /// Open (or create) the database at `path` (and its queue beside it), creating every
    /// table and migrating the records of an earlier format.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let handle = handle::Handle::open(path, CACHE_BYTES)?;
        let db = handle.get()?;
        let queue = journal::Journal::open(&path.with_file_name("queue.log"))?;
        let tx = durable(&db)?;
        tx.open_table(PATHS)?;
        tx.open_table(LOG)?;
        tx.open_table(LOG_INDEX)?;
        tx.open_table(META)?;
        tx.open_multimap_table(BLOBS)?;
        tx.open_table(CURSORS)?;
        tx.open_table(outbox::OUTBOX)?;
        tx.open_table(outbox::UPLOADS)?;
        tx.open_table(audit::FINISHED)?;
        tx.open_table(outbox::MIRROR_CLAIMS)?;
        storage::create_tables(&tx)?;
        tx.open_table(forget::MARKS)?;
        tx.open_table(review::SYNCED)?;
        tx.open_multimap_table(review::REVIEW)?;
        tx.open_table(review::REVIEWING)?;
        tx.commit()?;
        drop(db);
        let db = Db {
            db: Arc::new(handle),
            queue: Arc::new(std::sync::Mutex::new(queue)),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            changed_paths: Arc::new(tokio::sync::broadcast::channel(1024).0),
            remote_synced: Arc::new(std::sync::Mutex::new(None)),
            recent_own: Arc::new(std::sync::Mutex::new(Some(Vec::new()))),
            depth_observer: Arc::default(),
        };
        db.migrate()?;
        db.take_over_queue()?;
        Ok(db)
    }

    /// Move reports queued in the main file (as `e5a6e05` kept them) into the queue's file:
    /// durably there first, then gone from the main file.
    fn take_over_queue(&self) -> Result<(), DbError> {
        let items: Vec<QueueItem> = {
            let db = self.db.get()?;
            let tx = db.begin_read()?;
            let Ok(old) = tx.open_table(QUEUE) else {
                return Ok(());
            };
            let mut out = Vec::new();
            for entry in old.iter()? {
                out.push(postcard::from_bytes(entry?.1.value())?);
            }
            out
        };
        if !items.is_empty() {
            self.enqueue(&items)?;
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        tx.delete_table(QUEUE)?;
        tx.open_table(META)?.remove(QUEUE_NEXT)?;
        tx.commit()?;
        Ok(())
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, journal::Journal> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make every commit so far durable (one fsync'd commit: redb keeps commits in order, so
    /// the ones written without fsync, claims learnt from peers in the last second and the
    /// review's confirmations, become durable with it). For a clean stop, which otherwise may
    /// end the process before the database is closed.
    pub fn sync(&self) -> Result<(), DbError> {
        let db = self.db.get()?;
        durable(&db)?.commit()?;
        Ok(())
    }

    /// Append reports to the queue durably (written and fsync'd).
    pub fn enqueue(&self, items: &[QueueItem]) -> Result<(), DbError> {
        let mut journal = self.journal();
        journal.append(items)?;
        self.depth_changed(&journal);
        Ok(())
    }

    /// Reports in the queue not done yet (cheap: no database read).
    pub fn queue_depth(&self) -> u64 {
        self.journal().depth() as u64
    }

    /// Tell `observer` the queue's depth now and at every change, in the order of the changes
    /// (under the queue's lock: a reader of the metric never sees an older depth after a newer
    /// one). Once; a second observer is ignored.
    pub fn observe_queue_depth(&self, observer: impl Fn(u64) + Send + Sync + 'static) {
        let journal = self.journal();
        if self.depth_observer.set(Box::new(observer)).is_ok() {
            self.depth_changed(&journal);
        }
    }

    fn depth_changed(&self, journal: &journal::Journal) {
        if let Some(observe) = self.depth_observer.get() {
            observe(journal.depth() as u64);
        }
    }

    /// Take finished reports (a prefix of the queue) off it. Not fsync'd: a removal lost to a
    /// crash only means a batch planned again, whose paths are found recorded.
    pub fn dequeue(&self, done: &[u64]) -> Result<(), DbError> {
        match done.iter().max() {
            Some(upto) => {
                let mut journal = self.journal();
                let done = journal.done(*upto);
                self.depth_changed(&journal);
                Ok(done?)
            }
            None => Ok(()),
        }
    }

    /// Up to `max` of the oldest queued reports.
    pub fn queue_batch(&self, max: usize) -> Result<Vec<(u64, QueueItem)>, DbError> {
        Ok(self.journal().batch(max))
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes after each commit that adds or changes a record.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The own paths recorded since the last call, as (BLAKE3, hash part, store path), so the
    /// storage's check against the Nix store sees each at least once (one removed before it
    /// was recorded leaves no trace in the store's removals mark); `None` if more than
    /// [`RECENT_OWN`] were (then every own path is to be checked).
    pub fn take_recent_own(&self) -> RecentOwn {
        let mut r = self.recent_own.lock().unwrap_or_else(|p| p.into_inner());
        r.replace(Vec::new())
    }

    /// Hash parts of records as they are written or change.
    pub fn subscribe_changed_paths(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changed_paths.subscribe()
    }

    /// The catch-up cursor of a peer (0 if never synced).
    pub fn cursor(&self, peer: &[u8; 32]) -> Result<u64, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        Ok(tx
            .open_table(CURSORS)?
            .get(peer.as_slice())?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// The trust fingerprint the records were last checked against (0: never).
    pub fn trust_fingerprint(&self) -> Result<u64, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        get_meta(&tx.open_table(META)?, TRUST_FINGERPRINT)
    }

    /// Current counters.
    pub fn counters(&self) -> Result<Counters, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(Counters {
            queue_depth: self.queue_depth(),
            paths: tx.open_table(PATHS)?.len()?,
            failures: get_meta(&meta, FAILURES)?,
            forgotten: get_meta(&meta, forget::FORGOTTEN)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
