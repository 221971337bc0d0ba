//! The S3 mirror's durable outbox: each recorded path's upload state, and how far the mirror
//! has read the log. A path enters as `Pending` when the mirror takes it from the log; its state
//! moves forward only after the bucket holds what the state says, so after a crash the mirror
//! redoes at most the step it was in.

use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Db, DbError, LOG, META, PATHS, PathRecord};

/// Upload state by hash part.
pub(super) const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("mirror_outbox_v1");
/// Multipart uploads this node's mirror started and has not completed or aborted: upload id ->
/// object key. At start they are aborted (never anyone else's).
pub(super) const UPLOADS: TableDefinition<&str, &str> = TableDefinition::new("mirror_uploads_v1");
/// The last log sequence number the mirror has taken in.
const CURSOR: &str = "mirror.cursor";

/// Where one path stands in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorState {
    /// Nothing of it is known to be in the bucket.
    Pending,
    /// Its compressed NAR is in the bucket at `url` (relative to the cache root).
    NarStored {
        url: String,
        compression: String,
        file_hash: [u8; 32],
        file_size: u64,
    },
    /// Its narinfo is in the bucket too: done for good.
    Done,
}

fn decode(v: &[u8]) -> Result<MirrorState, DbError> {
    Ok(postcard::from_bytes(v)?)
}

impl Db {
    /// Take up to `limit` log entries after the mirror's cursor into the outbox (as `Pending`)
    /// and move the cursor, in one commit. Returns the new entries and whether more follow.
    pub fn outbox_take(&self, limit: usize) -> Result<(Vec<PathRecord>, bool), DbError> {
        // Most calls find nothing new: answer those from a read, without a commit.
        {
            let db = self.db.get()?;
            let tx = db.begin_read()?;
            let after = tx
                .open_table(META)?
                .get(CURSOR)?
                .map(|v| v.value())
                .unwrap_or(0);
            if tx
                .open_table(LOG)?
                .range(after.saturating_add(1)..)?
                .next()
                .is_none()
            {
                return Ok((Vec::new(), false));
            }
        }
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        let mut out = Vec::new();
        let mut more = false;
        {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let log = tx.open_table(LOG)?;
            let paths = tx.open_table(PATHS)?;
            let after = meta.get(CURSOR)?.map(|v| v.value()).unwrap_or(0);
            let mut last = after;
            let pending = postcard::to_allocvec(&MirrorState::Pending)?;
            for entry in log.range(after.saturating_add(1)..)? {
                let (seq, hash) = entry?;
                if out.len() == limit {
                    more = true;
                    break;
                }
                last = seq.value();
                let hash = hash.value();
                if outbox.get(hash)?.is_some() {
                    continue;
                }
                if let Some(v) = paths.get(hash)? {
                    outbox.insert(hash, pending.as_slice())?;
                    out.push(postcard::from_bytes(v.value())?);
                }
            }
            if last != after {
                meta.insert(CURSOR, last)?;
            }
        }
        tx.commit()?;
        Ok((out, more))
    }

    /// A multipart upload started (fsync'd before its first part goes up).
    pub fn upload_started(&self, id: &str, key: &str) -> Result<(), DbError> {
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        tx.open_table(UPLOADS)?.insert(id, key)?;
        tx.commit()?;
        Ok(())
    }

    /// A multipart upload completed or was aborted (not fsync'd: if lost, it is aborted again
    /// at start, which the bucket answers harmlessly).
    pub fn upload_ended(&self, id: &str) -> Result<(), DbError> {
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::None)
            .map_err(redb::Error::from)?;
        tx.open_table(UPLOADS)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Multipart uploads this mirror left open: (upload id, key).
    pub fn open_uploads(&self) -> Result<Vec<(String, String)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let Ok(t) = tx.open_table(UPLOADS) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    /// Which of these paths (by hash part) the mirror has completed in the bucket.
    pub fn outbox_done(&self, hashes: &[String]) -> Result<Vec<bool>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        hashes
            .iter()
            .map(|h| {
                Ok(match outbox.get(h.as_str())? {
                    Some(v) => decode(v.value())? == MirrorState::Done,
                    None => false,
                })
            })
            .collect()
    }

    /// Every path the mirror has not finished, with its record and state.
    pub fn outbox_unfinished(&self) -> Result<Vec<(PathRecord, MirrorState)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let paths = tx.open_table(PATHS)?;
        let mut out = Vec::new();
        for entry in outbox.iter()? {
            let (hash, state) = entry?;
            let state = decode(state.value())?;
            if state == MirrorState::Done {
                continue;
            }
            if let Some(v) = paths.get(hash.value())? {
                out.push((postcard::from_bytes(v.value())?, state));
            }
        }
        Ok(out)
    }

    /// The mirror state of one path (`None`: not taken in by the mirror).
    pub fn outbox_state(&self, hash_part: &str) -> Result<Option<MirrorState>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        match outbox.get(hash_part)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Store new states, in one fsync'd commit.
    pub fn outbox_set(&self, states: &[(String, MirrorState)]) -> Result<(), DbError> {
        if states.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut outbox = tx.open_table(OUTBOX)?;
            for (hash, state) in states {
                outbox.insert(hash.as_str(), postcard::to_allocvec(state)?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_takes_the_log_once_and_keeps_states() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        db.record_own(
            &[],
            &[
                super::super::tests::own(&a, 1, 10),
                super::super::tests::own(&b, 2, 10),
            ],
            0,
        )
        .unwrap();
        let (first, more) = db.outbox_take(1).unwrap();
        assert_eq!((first.len(), more), (1, true));
        let (second, more) = db.outbox_take(10).unwrap();
        assert_eq!((second.len(), more), (1, false));
        assert!(db.outbox_take(10).unwrap().0.is_empty());
        db.outbox_set(&[(a.clone(), MirrorState::Done)]).unwrap();
        let open = db.outbox_unfinished().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].1, MirrorState::Pending);
        assert_eq!(db.outbox_state(&a).unwrap(), Some(MirrorState::Done));
        drop(db);
        // Reopened: the cursor and the states persist.
        let db = Db::open(&dir.path().join("db")).unwrap();
        assert!(db.outbox_take(10).unwrap().0.is_empty());
        assert_eq!(db.outbox_unfinished().unwrap().len(), 1);
    }
}
