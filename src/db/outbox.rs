//! The S3 mirror's durable outbox: each recorded path's upload state, and how far the mirror
//! has read the log. A path enters as `Pending` when the mirror takes it from the log; its state
//! moves forward only after the bucket holds what the state says, so after a crash the mirror
//! redoes at most the step it was in.

use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::paths::{record_in, relog};
use super::storage::{NARS, OWN, held_here};
use super::{Db, DbError, LOG, LOG_INDEX, META, PATHS, PathRecord};

/// Upload state by hash part.
pub(super) const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("mirror_outbox_v1");
/// Multipart uploads this node's mirror started and has not completed or aborted: upload id ->
/// object key; and uploads it was about to create: `intent:<token>` -> `<unix ms> <key>`. At
/// start they are aborted (never anyone else's).
pub(super) const UPLOADS: TableDefinition<&str, &str> = TableDefinition::new("mirror_uploads_v1");
/// The claim whose NAR the mirror put in the bucket for a path, by hash part: its BLAKE3, then
/// the stored file's hash (64 bytes). Set with the path's `NarStored`, cleared with `Pending`,
/// kept once done (for the audit). Trusted only for the file it names: an earlier release (a
/// rollback) may have put another claim's NAR up since, without touching this table.
pub(super) const MIRROR_CLAIMS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("mirror_claims_v1");
/// How an intent's token starts (upload ids never do: they come from the bucket, which the
/// mirror reaches only after the intent is recorded).
const INTENT: &str = "intent:";

/// An entry of [`UPLOADS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenUpload {
    /// An upload the mirror started: abort it.
    Known { id: String, key: String },
    /// An upload the mirror was about to create at `at_ms`: abort what the bucket has open
    /// under `key` from about then.
    Intent {
        token: String,
        key: String,
        at_ms: u64,
    },
}

/// The last log sequence number the mirror has taken in.
const CURSOR: &str = "mirror.cursor";

/// What the mirror still needs of a NAR ([`Db::mirror_needs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorNeed {
    /// Every path of it is done in the bucket (or there is none).
    Nothing,
    /// A path of it changed (or is new) and the mirror has not taken it in yet: it may be
    /// done already, or not.
    NotTaken,
    /// A path of it is in the outbox, not done: the mirror will upload it.
    Unfinished,
}

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
        /// The BLAKE3 of the claim whose NAR it is, so that its narinfo goes up with that
        /// claim's NarHash whatever the path serves by then. Not in the outbox's value, which
        /// stays as earlier releases wrote and read it, but beside it ([`MIRROR_CLAIMS`]);
        /// `None` for a NAR an earlier release stored (the first claim not failed, then).
        #[serde(skip)]
        blake3: Option<[u8; 32]>,
    },
    /// Its narinfo is in the bucket too: done for good.
    Done,
}

pub(super) fn decode(v: &[u8]) -> Result<MirrorState, DbError> {
    Ok(postcard::from_bytes(v)?)
}

/// `state` with the BLAKE3 of its stored NAR's claim, as noted beside the outbox.
pub(super) fn with_claim(
    state: MirrorState,
    claims: &impl ReadableTable<&'static str, &'static [u8]>,
    hash: &str,
) -> Result<MirrorState, DbError> {
    Ok(match state {
        MirrorState::NarStored {
            url,
            compression,
            file_hash,
            file_size,
            ..
        } => MirrorState::NarStored {
            url,
            compression,
            file_hash,
            file_size,
            blake3: claims.get(hash)?.and_then(|v| {
                let v = v.value();
                (v.len() == 64 && v[32..] == file_hash).then(|| {
                    let mut b = [0; 32];
                    b.copy_from_slice(&v[..32]);
                    b
                })
            }),
        },
        s => s,
    })
}

impl Db {
    /// What the mirror still needs of each of these NARs, in one read: a path with a claim on
    /// the NAR has not had its NAR put in the bucket ([`MirrorNeed::Unfinished`]), or is not
    /// yet taken into the outbox (its log entry after the mirror's cursor:
    /// [`MirrorNeed::NotTaken`]). A path whose NAR is in the bucket needs none (its narinfo
    /// may still wait for its references, for as long as one of them waits for a NAR no node
    /// holds). Every claim of a path that has not failed counts: the mirror uploads the one
    /// the path serves (`PathRecord::served`), which may become another while the path waits
    /// (the mirror releases every claim of a path once its NAR is up: [`Db::outbox_set`]).
    /// For the storage's eviction on the mirror node.
    pub fn mirror_needs(&self, blake3s: &[[u8; 32]]) -> Result<Vec<MirrorNeed>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let blobs = tx.open_multimap_table(super::BLOBS)?;
        let paths = tx.open_table(PATHS)?;
        let outbox = tx.open_table(OUTBOX)?;
        let index = tx.open_table(LOG_INDEX)?;
        let cursor = super::get_meta(&tx.open_table(META)?, CURSOR)?;
        let mut out = Vec::with_capacity(blake3s.len());
        'nars: for b in blake3s {
            let mut need = MirrorNeed::Nothing;
            for h in blobs.get(b.as_slice())? {
                let h = h?;
                let Some(rec) = record_in(&paths, h.value())? else {
                    continue;
                };
                if rec.claim(b).is_none_or(|c| c.failed) {
                    continue;
                }
                if let Some(v) = outbox.get(h.value())?
                    && decode(v.value())? == MirrorState::Pending
                {
                    out.push(MirrorNeed::Unfinished);
                    continue 'nars;
                }
                if index
                    .get(h.value())?
                    .is_some_and(|seq| seq.value() > cursor)
                {
                    need = MirrorNeed::NotTaken;
                }
            }
            out.push(need);
        }
        Ok(out)
    }

    /// Take up to `limit` log entries after the mirror's cursor into the outbox (as `Pending`)
    /// and move the cursor, in one commit: new paths, and paths an audit found gone from the
    /// bucket while nobody held them, once someone does (`me`: this node, see
    /// [`Db::outbox_again`]). Returns the entries taken and whether more follow.
    pub fn outbox_take(
        &self,
        limit: usize,
        me: Option<&[u8; 32]>,
    ) -> Result<(Vec<PathRecord>, bool), DbError> {
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
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        let mut out = Vec::new();
        let mut more = false;
        {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let log = tx.open_table(LOG)?;
            let paths = tx.open_table(PATHS)?;
            let mut finished = tx.open_table(super::audit::FINISHED)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
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
                // Taken in already (a change of the record does not change what is in the
                // bucket), unless gone from the bucket while nobody held it (its record may
                // have been forgotten since, and come back: only its end is kept then).
                let taken = outbox.get(hash)?.is_some();
                let gone = super::audit::is_gone(&finished, hash)?;
                if taken && !gone {
                    continue;
                }
                let Some(rec) = record_in(&paths, hash)? else {
                    continue;
                };
                if gone && !super::audit::obtainable(&rec, me, &nars, &own)? {
                    continue;
                }
                finished.remove(hash)?;
                outbox.insert(hash, pending.as_slice())?;
                out.push(rec);
            }
            if last != after {
                meta.insert(CURSOR, last)?;
            }
        }
        tx.commit()?;
        Ok((out, more))
    }

    /// A multipart upload of `key` is about to be created (fsync'd before the request): should
    /// the mirror die before it learns the upload's id, the next start finds the upload by key
    /// and time. Returns the intent's token.
    pub fn upload_intent(&self, key: &str, at_ms: u64) -> Result<String, DbError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("{INTENT}{at_ms:x}-{n}");
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        tx.open_table(UPLOADS)?
            .insert(token.as_str(), format!("{at_ms} {key}").as_str())?;
        tx.commit()?;
        Ok(token)
    }

    /// A multipart upload started, in place of its intent (fsync'd before its first part goes
    /// up).
    pub fn upload_started(&self, id: &str, key: &str, intent: &str) -> Result<(), DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut t = tx.open_table(UPLOADS)?;
            t.insert(id, key)?;
            t.remove(intent)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A multipart upload completed or was aborted, or an intent came to nothing (not
    /// fsync'd: if lost, it is aborted again at start, which the bucket answers harmlessly).
    pub fn upload_ended(&self, id: &str) -> Result<(), DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::None)
            .map_err(redb::Error::from)?;
        tx.open_table(UPLOADS)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Multipart uploads this mirror left open, and uploads it was about to create.
    pub fn open_uploads(&self) -> Result<Vec<OpenUpload>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let Ok(t) = tx.open_table(UPLOADS) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let (k, v) = (k.value(), v.value());
            if k.starts_with(INTENT) {
                let (at, key) = v.split_once(' ').unwrap_or(("0", v));
                out.push(OpenUpload::Intent {
                    token: k.to_owned(),
                    key: key.to_owned(),
                    at_ms: at.parse().unwrap_or(0),
                });
            } else {
                out.push(OpenUpload::Known {
                    id: k.to_owned(),
                    key: v.to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// Which of these paths (by hash part) the mirror has completed in the bucket (and an
    /// audit has not found gone from it).
    pub fn outbox_done(&self, hashes: &[String]) -> Result<Vec<bool>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let finished = tx.open_table(super::audit::FINISHED)?;
        hashes
            .iter()
            .map(|h| {
                Ok(match outbox.get(h.as_str())? {
                    Some(v) => {
                        decode(v.value())? == MirrorState::Done
                            && !super::audit::is_gone(&finished, h)?
                    }
                    None => false,
                })
            })
            .collect()
    }

    /// Every path the mirror has not finished, with its record and state.
    pub fn outbox_unfinished(&self) -> Result<Vec<(PathRecord, MirrorState)>, DbError> {
        self.unfinished(None)
    }

    /// Of `hashes`, those the outbox took in and has not finished, as
    /// [`Self::outbox_unfinished`] gives them.
    pub fn outbox_unfinished_of(
        &self,
        hashes: &[String],
    ) -> Result<Vec<(PathRecord, MirrorState)>, DbError> {
        self.unfinished(Some(hashes))
    }

    /// Every unfinished path of the outbox, or those of `only`.
    fn unfinished(
        &self,
        only: Option<&[String]>,
    ) -> Result<Vec<(PathRecord, MirrorState)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let paths = tx.open_table(PATHS)?;
        let claims = tx.open_table(MIRROR_CLAIMS)?;
        let mut out = Vec::new();
        // A row that does not decode (written by no release of ours) is passed over, never
        // the reason no other path is mirrored.
        let mut take = |hash: &str, state: &[u8]| -> Result<(), DbError> {
            let state = match decode(state) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("mirror outbox: {hash}: passed over: {e}");
                    return Ok(());
                }
            };
            if state == MirrorState::Done {
                return Ok(());
            }
            if let Some(v) = paths.get(hash)? {
                let state = with_claim(state, &claims, hash)?;
                match postcard::from_bytes(v.value()) {
                    Ok(rec) => out.push((rec, state)),
                    Err(e) => tracing::warn!("mirror outbox: {hash}: its record: {e}"),
                }
            }
            Ok(())
        };
        match only {
            None => {
                for entry in outbox.iter()? {
                    let (hash, state) = entry?;
                    take(hash.value(), state.value())?;
                }
            }
            Some(hashes) => {
                for h in hashes {
                    if let Some(state) = outbox.get(h.as_str())? {
                        take(h, state.value())?;
                    }
                }
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

    /// Store new states, in one fsync'd commit; a path done keeps where its NAR went (see
    /// `audit`). A path done whose NAR this node does not hold moves to the end of the log: its
    /// record may be dead, and was kept only for the mirror (see `forget`), so the walk that
    /// forgets dead records must come to it again. Returns the NARs of every claim of the paths
    /// done or whose NAR is in the bucket: the mirror needs none of them any more.
    pub fn outbox_set(&self, states: &[(String, MirrorState)]) -> Result<Vec<[u8; 32]>, DbError> {
        let mut released = Vec::new();
        if states.is_empty() {
            return Ok(released);
        }
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut outbox = tx.open_table(OUTBOX)?;
            let paths = tx.open_table(PATHS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let mut finished = tx.open_table(super::audit::FINISHED)?;
            let mut claims = tx.open_table(MIRROR_CLAIMS)?;
            let now = super::paths::now_secs();
            for (hash, state) in states {
                let before = outbox
                    .insert(hash.as_str(), postcard::to_allocvec(state)?.as_slice())?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                match state {
                    MirrorState::NarStored {
                        blake3: Some(b),
                        file_hash,
                        ..
                    } => {
                        claims.insert(hash.as_str(), [*b, *file_hash].concat().as_slice())?;
                    }
                    MirrorState::Pending | MirrorState::NarStored { blake3: None, .. } => {
                        claims.remove(hash.as_str())?;
                    }
                    MirrorState::Done => {}
                }
                if *state == MirrorState::Pending {
                    continue;
                }
                let done = *state == MirrorState::Done;
                // Where its NAR went, for the audit.
                if done && let Some(stored @ MirrorState::NarStored { .. }) = before {
                    super::audit::finished(&mut finished, hash, stored, now)?;
                }
                let Some(rec) = record_in(&paths, hash)? else {
                    continue;
                };
                let mut held = false;
                for c in &rec.claims {
                    released.push(c.blake3);
                    held |= held_here(&nars, &own, c.blake3.as_slice())?;
                }
                if done && !held {
                    relog(&mut log, &mut index, &mut meta, hash)?;
                }
            }
        }
        tx.commit()?;
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR is needed by the mirror until every path with a claim on it is done: before the
    /// mirror takes the path in, while it is pending, and again when the record changes (its
    /// log entry moves after the cursor) until taken in once more.
    #[test]
    fn the_mirror_needs_a_nar_until_every_path_of_it_is_done() {
        use super::super::tests::remote;
        use MirrorNeed::*;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let need = || db.mirror_needs(&[[1; 32]]).unwrap()[0];
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        assert_eq!(need(), Nothing, "no path of it");
        // Two paths with the same NAR.
        db.record_remote(
            vec![remote(&a, 1, 5, 1, true), remote(&b, 1, 5, 1, true)],
            None,
            false,
            None,
        )
        .unwrap();
        assert_eq!(need(), NotTaken);
        assert_eq!(db.outbox_take(10, None).unwrap().0.len(), 2);
        assert_eq!(need(), Unfinished);
        // (Done moves a path not held here to the end of the log; the mirror takes the log
        // in as it goes.)
        db.outbox_set(&[(a.clone(), MirrorState::Done)]).unwrap();
        db.outbox_take(10, None).unwrap();
        assert_eq!(need(), Unfinished, "one path is not done");
        // Its NAR in the bucket, b needs it no more, though its narinfo waits.
        let up = MirrorState::NarStored {
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: [3; 32],
            file_size: 5,
            blake3: Some([1; 32]),
        };
        assert_eq!(
            db.outbox_set(&[(b.clone(), up)]).unwrap(),
            [[1; 32]],
            "released"
        );
        assert_eq!(need(), Nothing, "the NAR is up");
        db.outbox_set(&[(b.clone(), MirrorState::Done)]).unwrap();
        assert_eq!(need(), NotTaken, "moved, not taken in again");
        db.outbox_take(10, None).unwrap();
        assert_eq!(need(), Nothing, "both done");
        // A peer's newer word on a: its entry moves to the end of the log.
        db.record_remote(vec![remote(&a, 1, 6, 2, true)], None, false, None)
            .unwrap();
        assert_eq!(need(), NotTaken, "changed, not taken in again");
        db.outbox_take(10, None).unwrap();
        assert_eq!(need(), Nothing, "taken in, still done");
    }

    /// Every build of a path not done is needed (the one uploaded may become another); done,
    /// the path gives every build's NAR back to the storage.
    #[test]
    fn the_mirror_needs_every_build_of_a_path_until_it_is_done() {
        use super::super::tests::remote;
        use MirrorNeed::*;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let a = "a".repeat(32);
        db.record_remote(vec![remote(&a, 1, 5, 1, false)], None, false, None)
            .unwrap();
        db.record_remote(vec![remote(&a, 2, 6, 1, true)], None, false, None)
            .unwrap();
        db.outbox_take(10, None).unwrap();
        assert_eq!(
            db.mirror_needs(&[[1; 32], [2; 32]]).unwrap(),
            [Unfinished, Unfinished]
        );
        let released = db.outbox_set(&[(a.clone(), MirrorState::Done)]).unwrap();
        assert_eq!(released, [[1; 32], [2; 32]]);
        db.outbox_take(10, None).unwrap();
        assert_eq!(
            db.mirror_needs(&[[1; 32], [2; 32]]).unwrap(),
            [Nothing, Nothing]
        );
    }

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
        let (first, more) = db.outbox_take(1, None).unwrap();
        assert_eq!((first.len(), more), (1, true));
        let (second, more) = db.outbox_take(10, None).unwrap();
        assert_eq!((second.len(), more), (1, false));
        assert!(db.outbox_take(10, None).unwrap().0.is_empty());
        db.outbox_set(&[(a.clone(), MirrorState::Done)]).unwrap();
        let open = db.outbox_unfinished().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].1, MirrorState::Pending);
        assert_eq!(db.outbox_state(&a).unwrap(), Some(MirrorState::Done));
        drop(db);
        // Reopened: the cursor and the states persist.
        let db = Db::open(&dir.path().join("db")).unwrap();
        assert!(db.outbox_take(10, None).unwrap().0.is_empty());
        assert_eq!(db.outbox_unfinished().unwrap().len(), 1);
    }

    /// A row that does not decode is passed over, not the reason no other path is read; the
    /// unfinished paths of a few hashes are read alike.
    #[test]
    fn an_undecodable_outbox_row_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let (a, b, c) = ("a".repeat(32), "b".repeat(32), "c".repeat(32));
        let own = super::super::tests::own;
        db.record_own(&[], &[own(&a, 1, 10), own(&b, 2, 10), own(&c, 3, 10)], 0)
            .unwrap();
        db.outbox_take(10, None).unwrap();
        {
            let d = db.db.get().unwrap();
            let tx = d.begin_write().unwrap();
            tx.open_table(OUTBOX)
                .unwrap()
                .insert(b.as_str(), [0xff; 9].as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let hashes = |open: Vec<(PathRecord, MirrorState)>| -> Vec<String> {
            open.iter().map(|(r, _)| r.hash_part().to_owned()).collect()
        };
        assert_eq!(
            hashes(db.outbox_unfinished().unwrap()),
            [a.clone(), c.clone()]
        );
        let asked = [c.clone(), b, "d".repeat(32)];
        assert_eq!(hashes(db.outbox_unfinished_of(&asked).unwrap()), [c]);
    }

    #[test]
    fn an_intent_becomes_its_upload_and_survives_a_reopen_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let t1 = db.upload_intent("nar/x.nar.zst", 1000).unwrap();
        let t2 = db.upload_intent("nar/y.nar.zst", 2000).unwrap();
        assert_ne!(t1, t2);
        db.upload_started("id-1", "nar/x.nar.zst", &t1).unwrap();
        drop(db);
        let db = Db::open(&dir.path().join("db")).unwrap();
        let mut open = db.open_uploads().unwrap();
        open.sort_by_key(|u| format!("{u:?}"));
        assert_eq!(
            open,
            vec![
                OpenUpload::Intent {
                    token: t2.clone(),
                    key: "nar/y.nar.zst".into(),
                    at_ms: 2000
                },
                OpenUpload::Known {
                    id: "id-1".into(),
                    key: "nar/x.nar.zst".into()
                },
            ]
        );
        db.upload_ended("id-1").unwrap();
        db.upload_ended(&t2).unwrap();
        assert!(db.open_uploads().unwrap().is_empty());
    }
}
