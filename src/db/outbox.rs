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
    },
    /// Its narinfo is in the bucket too: done for good.
    Done,
}

/// A path's state as the outbox keeps it: [`MirrorState`]'s three as every release wrote them
/// (same order, same fields), and, since the bucket audit, a done path with where its NAR is,
/// so an audit can check the NAR is still there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Kept {
    Pending,
    NarStored {
        url: String,
        compression: String,
        file_hash: [u8; 32],
        file_size: u64,
    },
    /// Done, as earlier releases wrote it (an audit checks its narinfo only).
    Done,
    /// Done at `at` (unix seconds), its NAR `file_size` bytes at `url`.
    DoneAt {
        url: String,
        file_size: u64,
        at: u64,
    },
}

impl From<Kept> for MirrorState {
    fn from(k: Kept) -> Self {
        match k {
            Kept::Pending => MirrorState::Pending,
            Kept::NarStored {
                url,
                compression,
                file_hash,
                file_size,
            } => MirrorState::NarStored {
                url,
                compression,
                file_hash,
                file_size,
            },
            Kept::Done | Kept::DoneAt { .. } => MirrorState::Done,
        }
    }
}

fn decode_kept(v: &[u8]) -> Result<Kept, DbError> {
    Ok(postcard::from_bytes(v)?)
}

/// A state as the mirror sees it.
pub(super) fn decode(v: &[u8]) -> Result<MirrorState, DbError> {
    Ok(decode_kept(v)?.into())
}

/// How `state` is kept, given what was kept before: done remembers where the NAR went.
fn keep(state: &MirrorState, before: Option<Kept>, now: u64) -> Kept {
    match (state, before) {
        (MirrorState::Pending, _) => Kept::Pending,
        (
            MirrorState::NarStored {
                url,
                compression,
                file_hash,
                file_size,
            },
            _,
        ) => Kept::NarStored {
            url: url.clone(),
            compression: compression.clone(),
            file_hash: *file_hash,
            file_size: *file_size,
        },
        (MirrorState::Done, Some(Kept::NarStored { url, file_size, .. })) => Kept::DoneAt {
            url,
            file_size,
            at: now,
        },
        (MirrorState::Done, Some(k @ Kept::DoneAt { .. })) => k,
        (MirrorState::Done, _) => Kept::Done,
    }
}

/// A done path the bucket lost something of ([`Db::outbox_audit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub hash: String,
    /// Its narinfo is still in the bucket, naming a NAR that is not (or not whole): Nix would
    /// fail on it, so it goes first.
    pub dangling: bool,
    /// Its record is still here, so it can go up again.
    pub again: bool,
}

impl Db {
    /// What the mirror still needs of each of these NARs, in one read: a path whose served
    /// claim is the NAR is not done in the bucket ([`MirrorNeed::Unfinished`]), or not yet
    /// taken into the outbox (its log entry after the mirror's cursor: [`MirrorNeed::NotTaken`]).
    /// Claims a path no longer serves do not count: the mirror uploads only the served one. For
    /// the storage's eviction on the mirror node.
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
                let serves = record_in(&paths, h.value())?
                    .is_some_and(|r| r.active().is_some_and(|c| c.blake3 == *b));
                if !serves {
                    continue;
                }
                if let Some(v) = outbox.get(h.value())?
                    && decode(v.value())? != MirrorState::Done
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
            let pending = postcard::to_allocvec(&Kept::Pending)?;
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

    /// A multipart upload of `key` is about to be created (fsync'd before the request): should
    /// the mirror die before it learns the upload's id, the next start finds the upload by key
    /// and time. Returns the intent's token.
    pub fn upload_intent(&self, key: &str, at_ms: u64) -> Result<String, DbError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("{INTENT}{at_ms:x}-{n}");
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
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
        let mut tx = db.begin_write()?;
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
        let mut tx = db.begin_write()?;
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

    /// Store new states, in one fsync'd commit. A path done whose NAR this node does not hold
    /// moves to the end of the log: its record may be dead, and was kept only for the mirror
    /// (see `forget`), so the walk that forgets dead records must come to it again.
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
            let paths = tx.open_table(PATHS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let now = super::paths::now_secs();
            for (hash, state) in states {
                let before = outbox
                    .get(hash.as_str())?
                    .map(|v| decode_kept(v.value()))
                    .transpose()?;
                let kept = keep(state, before, now);
                outbox.insert(hash.as_str(), postcard::to_allocvec(&kept)?.as_slice())?;
                if *state != MirrorState::Done {
                    continue;
                }
                let Some(rec) = record_in(&paths, hash)? else {
                    continue;
                };
                let mut held = false;
                for c in &rec.claims {
                    held |= held_here(&nars, &own, c.blake3.as_slice())?;
                }
                if !held {
                    relog(&mut log, &mut index, &mut meta, hash)?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl Db {
    /// Compare up to `limit` done paths, in hash order after `after`, with a listing of the
    /// bucket (`listed`: an object's size by key relative to the cache root, `None` if absent)
    /// that started at `listed_at` (unix seconds): the paths whose narinfo is gone, or whose
    /// NAR is gone or of another size. A path done since shortly before the listing started is
    /// left alone (the listing may have passed its keys). Reads only; returns the paths and
    /// where the next call goes on (`None`: the outbox ended).
    pub fn outbox_audit(
        &self,
        after: Option<&str>,
        limit: usize,
        listed_at: u64,
        listed: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<(Vec<Lost>, Option<String>), DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let paths = tx.open_table(PATHS)?;
        let range = match after {
            Some(a) => {
                outbox.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?
            }
            None => outbox.range::<&str>(..)?,
        };
        let mut out = Vec::new();
        let mut examined = 0;
        for entry in range {
            let (hash, kept) = entry?;
            let hash = hash.value();
            examined += 1;
            let nar = match decode_kept(kept.value())? {
                // Done before the listing began (a second's margin either way), else its keys
                // may have come after the listing passed them.
                Kept::DoneAt { url, file_size, at } if at.saturating_add(2) < listed_at => {
                    Some((url, file_size))
                }
                // An earlier release's: done before this node started.
                Kept::Done => None,
                Kept::DoneAt { .. } | Kept::Pending | Kept::NarStored { .. } => continue,
            };
            let narinfo = listed(&format!("{hash}.narinfo")).is_some();
            let nar_whole = nar
                .as_ref()
                .is_none_or(|(url, size)| listed(url) == Some(*size));
            if narinfo && nar_whole {
                continue;
            }
            out.push(Lost {
                hash: hash.to_owned(),
                dangling: narinfo,
                again: paths.get(hash)?.is_some(),
            });
            if out.len() == limit || examined >= limit * 64 {
                return Ok((out, Some(hash.to_owned())));
            }
        }
        Ok((out, None))
    }

    /// Done paths the bucket lost go back to `Pending`, in one fsync'd commit, with a wish
    /// for each NAR this node does not hold (the mirror node replicates eagerly): the mirror
    /// puts them up again. Returns the records of those that went back (a path with no record,
    /// or not done, is left as it is).
    pub fn outbox_again(&self, hashes: &[String]) -> Result<Vec<PathRecord>, DbError> {
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        let mut out = Vec::new();
        {
            let mut outbox = tx.open_table(OUTBOX)?;
            let paths = tx.open_table(PATHS)?;
            let mut wants = tx.open_table(super::storage::WANTS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            let pending = postcard::to_allocvec(&Kept::Pending)?;
            for hash in hashes {
                let done = match outbox.get(hash.as_str())? {
                    Some(v) => decode(v.value())? == MirrorState::Done,
                    None => false,
                };
                let Some(rec) = record_in(&paths, hash)? else {
                    continue;
                };
                if !done {
                    continue;
                }
                outbox.insert(hash.as_str(), pending.as_slice())?;
                if let Some(c) = rec.active()
                    && !held_here(&nars, &own, c.blake3.as_slice())?
                {
                    wants.insert(c.blake3.as_slice(), hash.as_str())?;
                }
                out.push(rec);
            }
        }
        tx.commit()?;
        Ok(out)
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
        )
        .unwrap();
        assert_eq!(need(), NotTaken);
        assert_eq!(db.outbox_take(10).unwrap().0.len(), 2);
        assert_eq!(need(), Unfinished);
        // (Done moves a path not held here to the end of the log; the mirror takes the log
        // in as it goes.)
        db.outbox_set(&[(a.clone(), MirrorState::Done)]).unwrap();
        db.outbox_take(10).unwrap();
        assert_eq!(need(), Unfinished, "one path is not done");
        db.outbox_set(&[(b.clone(), MirrorState::Done)]).unwrap();
        assert_eq!(need(), NotTaken, "moved, not taken in again");
        db.outbox_take(10).unwrap();
        assert_eq!(need(), Nothing, "both done");
        // A peer's newer word on a: its entry moves to the end of the log.
        db.record_remote(vec![remote(&a, 1, 6, 2, true)], None, false)
            .unwrap();
        assert_eq!(need(), NotTaken, "changed, not taken in again");
        db.outbox_take(10).unwrap();
        assert_eq!(need(), Nothing, "taken in, still done");
    }

    /// The states earlier releases wrote (postcard of `MirrorState`) read as they were, and a
    /// done path now keeps where its NAR went.
    #[test]
    fn states_of_earlier_releases_read_the_same_and_done_keeps_its_nar() {
        let stored = MirrorState::NarStored {
            url: "nar/a.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: [3; 32],
            file_size: 77,
        };
        // The bytes of `e5a6e05` and every release since, for the three states.
        assert_eq!(decode(&[0]).unwrap(), MirrorState::Pending);
        assert_eq!(decode(&[2]).unwrap(), MirrorState::Done);
        let old = postcard::to_allocvec(&stored).unwrap();
        assert_eq!(old[0], 1);
        assert_eq!(decode(&old).unwrap(), stored);
        assert_eq!(postcard::to_allocvec(&Kept::Pending).unwrap(), [0]);
        assert_eq!(
            keep(&MirrorState::Done, Some(decode_kept(&old).unwrap()), 9),
            Kept::DoneAt {
                url: "nar/a.nar.zst".into(),
                file_size: 77,
                at: 9
            }
        );
        let done_at = postcard::to_allocvec(&keep(&MirrorState::Done, decode_kept(&old).ok(), 9));
        assert_eq!(decode(&done_at.unwrap()).unwrap(), MirrorState::Done);
        assert_eq!(keep(&MirrorState::Done, None, 9), Kept::Done);
    }

    /// An audit finds the done paths whose narinfo, or NAR (gone or of another size), the
    /// bucket lost; leaves alone those done since the listing began and those not done; and
    /// `outbox_again` makes the lost ones pending, wishing for a NAR not held here.
    #[test]
    fn an_audit_finds_what_the_bucket_lost_and_puts_it_back() {
        use super::super::tests::{own, remote};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let h = |c: char| c.to_string().repeat(32);
        db.record_own(&[], &[own(&h('a'), 1, 10), own(&h('b'), 2, 10)], 0)
            .unwrap();
        db.record_remote(
            vec![
                remote(&h('c'), 3, 5, 1, true),
                remote(&h('d'), 4, 5, 1, true),
                remote(&h('e'), 5, 5, 1, true),
            ],
            None,
            false,
        )
        .unwrap();
        assert_eq!(db.outbox_take(10).unwrap().0.len(), 5);
        let nar = |c: char| MirrorState::NarStored {
            url: format!("nar/{c}.nar.zst"),
            compression: "zstd".into(),
            file_hash: [0; 32],
            file_size: 100,
        };
        let all = ['a', 'b', 'c', 'd'];
        db.outbox_set(&all.map(|c| (h(c), nar(c)))).unwrap();
        db.outbox_set(&all.map(|c| (h(c), MirrorState::Done)))
            .unwrap();
        // e: done as an earlier release kept it (no NAR known).
        db.outbox_set(&[(h('e'), MirrorState::Done)]).unwrap();
        let now = crate::db::paths::now_secs();
        // The bucket: a whole; b's narinfo gone; c's NAR gone; d's NAR cut short; e's
        // narinfo gone.
        let listed = |k: &str| -> Option<u64> {
            match k {
                k if k.ends_with(".narinfo") => {
                    (!k.starts_with('b') && !k.starts_with('e')).then_some(1)
                }
                "nar/a.nar.zst" | "nar/b.nar.zst" | "nar/e.nar.zst" => Some(100),
                "nar/d.nar.zst" => Some(60),
                _ => None,
            }
        };
        let lost = |l: &str, dangling| Lost {
            hash: h(l.chars().next().unwrap()),
            dangling,
            again: true,
        };
        let (found, next) = db.outbox_audit(None, 100, now + 10, &listed).unwrap();
        assert_eq!(next, None);
        assert_eq!(
            found,
            vec![
                lost("b", false),
                lost("c", true),
                lost("d", true),
                lost("e", false)
            ]
        );
        // Done since the listing began: left alone (its keys may have been passed); an
        // earlier release's done has no time and is always looked at.
        let (found, _) = db.outbox_audit(None, 100, now, &listed).unwrap();
        assert_eq!(found, vec![lost("e", false)]);
        // A batch at a time, in hash order.
        let (first, next) = db.outbox_audit(None, 2, now + 10, &listed).unwrap();
        assert_eq!((first.len(), next.as_deref()), (2, Some(h('c').as_str())));
        let (rest, next) = db
            .outbox_audit(next.as_deref(), 2, now + 10, &listed)
            .unwrap();
        assert_eq!((rest.len(), next.as_deref()), (2, Some(h('e').as_str())));
        assert_eq!(
            db.outbox_audit(next.as_deref(), 2, now + 10, &listed)
                .unwrap()
                .0,
            vec![]
        );

        // Put back: pending again; a remote NAR not held here is wished for, an own one not.
        let again = db
            .outbox_again(&[h('b'), h('c'), h('d'), h('e'), h('z')])
            .unwrap();
        assert_eq!(again.len(), 4, "z has no record");
        for c in ['b', 'c', 'd', 'e'] {
            assert_eq!(db.outbox_state(&h(c)).unwrap(), Some(MirrorState::Pending));
        }
        let mut wished: Vec<[u8; 32]> = db.wants().unwrap().into_iter().map(|(b, _)| b).collect();
        wished.sort();
        assert_eq!(wished, vec![[3; 32], [4; 32], [5; 32]]);
        // Pending paths are the mirror's plan's: an audit passes them by.
        let (found, _) = db.outbox_audit(None, 100, now + 10, &|_| None).unwrap();
        assert_eq!(
            found,
            vec![lost("a", false)],
            "only a is done; nothing listed"
        );
        // Not done: not put back.
        assert!(db.outbox_again(&[h('b')]).unwrap().is_empty());
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
