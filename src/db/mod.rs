//! The node's own database (redb): the durable queue of reports, the recorded paths, the
//! append-only log of what was recorded (for catch-up), the S3 mirror's outbox, and counters. This module owns every
//! table definition; redb types stay inside it. All calls block: run them off async threads.

mod outbox;
mod records;

use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

pub use outbox::MirrorState;
pub use records::{Counters, PathRecord, QueueItem};

/// Reports waiting to be ingested, by sequence number.
const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue_v1");
/// Recorded paths by hash part.
const PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("paths_v2");
/// Append-only log of recorded hash parts, by sequence number.
const LOG: TableDefinition<u64, &str> = TableDefinition::new("log_v1");
/// Hash parts of recorded paths by the BLAKE3 hash of their NAR.
const BLOBS: TableDefinition<&[u8], &str> = TableDefinition::new("blobs_v2");
/// Catch-up cursors: the last log sequence number taken from each peer (by endpoint id).
const CURSORS: TableDefinition<&[u8], u64> = TableDefinition::new("cursors_v1");
/// Counters and sequence numbers.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");

const QUEUE_NEXT: &str = "queue.next";
const LOG_NEXT: &str = "log.next";
const NAR_BYTES: &str = "nar.bytes";
const FAILURES: &str = "failures";

/// Errors of the node database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("node database: {0}")]
    Redb(#[from] redb::Error),
    #[error("node database: undecodable record: {0}")]
    Decode(#[from] postcard::Error),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A handle to the node database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    db: Arc<Database>,
    /// Bumped after every commit that adds a record or marks one local, for those who wait on
    /// records (the mirror) instead of polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

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

impl Db {
    /// Open (or create) the database at `path`, creating every table.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(QUEUE)?;
        tx.open_table(PATHS)?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.open_table(BLOBS)?;
        tx.open_table(CURSORS)?;
        tx.open_table(outbox::OUTBOX)?;
        tx.commit()?;
        Ok(Db {
            db: Arc::new(db),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// Append reports to the queue in one fsync'd transaction.
    pub fn enqueue(&self, items: &[QueueItem]) -> Result<(), DbError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut queue = tx.open_table(QUEUE)?;
            let mut meta = tx.open_table(META)?;
            let first = bump(&mut meta, QUEUE_NEXT, items.len() as u64)?;
            for (i, item) in items.iter().enumerate() {
                queue.insert(first + i as u64, postcard::to_allocvec(item)?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `max` of the oldest queued reports.
    pub fn queue_batch(&self, max: usize) -> Result<Vec<(u64, QueueItem)>, DbError> {
        let tx = self.db.begin_read()?;
        let queue = tx.open_table(QUEUE)?;
        let mut out = Vec::new();
        for entry in queue.iter()?.take(max) {
            let (k, v) = entry?;
            out.push((k.value(), postcard::from_bytes(v.value())?));
        }
        Ok(out)
    }

    /// Which of these hash parts are recorded.
    pub fn known(&self, hash_parts: &[&str]) -> Result<Vec<bool>, DbError> {
        let tx = self.db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        hash_parts
            .iter()
            .map(|h| Ok(paths.get(*h)?.is_some()))
            .collect()
    }

    /// The record of one path, by hash part.
    pub fn path(&self, hash_part: &str) -> Result<Option<PathRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        match paths.get(hash_part)? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
            None => Ok(None),
        }
    }

    /// The record whose NAR has this BLAKE3 hash.
    pub fn by_blake3(&self, blake3: &[u8; 32]) -> Result<Option<PathRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let blobs = tx.open_table(BLOBS)?;
        let Some(hash) = blobs.get(blake3.as_slice())? else {
            return Ok(None);
        };
        let paths = tx.open_table(PATHS)?;
        match paths.get(hash.value())? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
            None => Ok(None),
        }
    }

    /// Record paths learnt from a peer (new ones only, each appended to the log), and move the
    /// peer's catch-up cursor to `cursor` if given, in one fsync'd transaction. Returns the
    /// records that were new.
    pub fn record_remote(
        &self,
        records: Vec<PathRecord>,
        cursor: Option<(&[u8; 32], u64)>,
    ) -> Result<Vec<PathRecord>, DbError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        let mut new = Vec::new();
        {
            let mut paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut meta = tx.open_table(META)?;
            let mut blobs = tx.open_table(BLOBS)?;
            for r in records {
                let hash = r.hash_part().to_owned();
                let existing: Option<PathRecord> = match paths.get(hash.as_str())? {
                    Some(v) => Some(postcard::from_bytes(v.value())?),
                    None => None,
                };
                if let Some(mut old) = existing {
                    // Known already: only learn new providers.
                    let before = old.providers.len();
                    for p in &r.providers {
                        if !old.providers.contains(p) {
                            old.providers.push(*p);
                        }
                    }
                    if old.providers.len() != before {
                        paths.insert(hash.as_str(), postcard::to_allocvec(&old)?.as_slice())?;
                    }
                    continue;
                }
                paths.insert(hash.as_str(), postcard::to_allocvec(&r)?.as_slice())?;
                blobs.insert(r.blake3.as_slice(), hash.as_str())?;
                let seq = bump(&mut meta, LOG_NEXT, 1)? + 1;
                log.insert(seq, hash.as_str())?;
                new.push(r);
            }
            if let Some((peer, seq)) = cursor {
                tx.open_table(CURSORS)?.insert(peer.as_slice(), seq)?;
            }
        }
        tx.commit()?;
        if !new.is_empty() {
            self.changed();
        }
        Ok(new)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes after each commit that adds a record or marks one local.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Mark a recorded path's NAR as held locally (after a verified fetch).
    pub fn mark_local(&self, hash_part: &str) -> Result<(), DbError> {
        let mut changed = false;
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut paths = tx.open_table(PATHS)?;
            let rec: Option<PathRecord> = match paths.get(hash_part)? {
                Some(v) => Some(postcard::from_bytes(v.value())?),
                None => None,
            };
            if let Some(mut rec) = rec
                && !rec.local
            {
                rec.local = true;
                paths.insert(hash_part, postcard::to_allocvec(&rec)?.as_slice())?;
                bump(&mut tx.open_table(META)?, NAR_BYTES, rec.nar_size)?;
                changed = true;
            }
        }
        tx.commit()?;
        if changed {
            self.changed();
        }
        Ok(())
    }

    /// The catch-up cursor of a peer (0 if never synced).
    pub fn cursor(&self, peer: &[u8; 32]) -> Result<u64, DbError> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(CURSORS)?
            .get(peer.as_slice())?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Up to `limit` log entries after sequence number `after`: (seq, record), and whether more follow.
    pub fn log_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, PathRecord)>, bool), DbError> {
        let tx = self.db.begin_read()?;
        let log = tx.open_table(LOG)?;
        let paths = tx.open_table(PATHS)?;
        let mut out = Vec::new();
        let mut more = false;
        for entry in log.range(after.saturating_add(1)..)? {
            let (seq, hash) = entry?;
            if out.len() == limit {
                more = true;
                break;
            }
            if let Some(v) = paths.get(hash.value())? {
                out.push((seq.value(), postcard::from_bytes(v.value())?));
            }
        }
        Ok((out, more))
    }

    /// In one fsync'd transaction: store `records` (appending each new one to the log), drop
    /// the finished queue entries `done`, and count `failures`.
    pub fn record(
        &self,
        done: &[u64],
        records: &[PathRecord],
        failures: u64,
    ) -> Result<(), DbError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut meta = tx.open_table(META)?;
            let mut queue = tx.open_table(QUEUE)?;
            let mut blobs = tx.open_table(BLOBS)?;
            for r in records {
                let hash = r.hash_part();
                if paths.get(hash)?.is_some() {
                    continue;
                }
                paths.insert(hash, postcard::to_allocvec(r)?.as_slice())?;
                blobs.insert(r.blake3.as_slice(), hash)?;
                let seq = bump(&mut meta, LOG_NEXT, 1)? + 1;
                log.insert(seq, hash)?;
                if r.local {
                    bump(&mut meta, NAR_BYTES, r.nar_size)?;
                }
            }
            for seq in done {
                queue.remove(*seq)?;
            }
            if failures > 0 {
                bump(&mut meta, FAILURES, failures)?;
            }
        }
        tx.commit()?;
        if !records.is_empty() {
            self.changed();
        }
        Ok(())
    }

    /// Current counters.
    pub fn counters(&self) -> Result<Counters, DbError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        let get = |k| -> Result<u64, DbError> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        Ok(Counters {
            queue_depth: tx.open_table(QUEUE)?.len()?,
            paths: tx.open_table(PATHS)?.len()?,
            nar_bytes: get(NAR_BYTES)?,
            failures: get(FAILURES)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(h: &str, size: u64) -> PathRecord {
        PathRecord {
            store_path: format!("/nix/store/{h}-x"),
            narinfo: String::new(),
            blake3: [0; 32],
            nar_size: size,
            recorded_at: 0,
            local: true,
            providers: vec![],
        }
    }

    #[test]
    fn queue_record_and_counters_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let h1 = "a".repeat(32);
        {
            let db = Db::open(&path).unwrap();
            let item = QueueItem {
                drv: None,
                outs: vec!["/nix/store/x".into()],
            };
            db.enqueue(&[item.clone(), item.clone()]).unwrap();
            let batch = db.queue_batch(10).unwrap();
            assert_eq!(batch.len(), 2);
            db.record(&[batch[0].0], &[rec(&h1, 10), rec(&h1, 10)], 1)
                .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let c = db.counters().unwrap();
        assert_eq!(
            c,
            Counters {
                queue_depth: 1,
                paths: 1,
                nar_bytes: 10,
                failures: 1
            }
        );
        assert_eq!(db.known(&[&h1, "b"]).unwrap(), vec![true, false]);
        assert_eq!(db.path(&h1).unwrap().unwrap().nar_size, 10);
        let item = QueueItem {
            drv: None,
            outs: vec![],
        };
        db.enqueue(&[item]).unwrap();
        let seqs: Vec<u64> = db.queue_batch(10).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(
            seqs,
            vec![1, 2],
            "sequence numbers keep growing across restarts"
        );
    }
}
