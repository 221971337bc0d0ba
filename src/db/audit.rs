//! The database's side of the mirror's bucket audit: where each completed path's NAR went (so
//! an audit can check it is still whole in the bucket), the paths an audit found gone while
//! nobody held them, and the two steps of an audit (compare the outbox with a listing; hand the
//! lost paths back to the mirror).
//!
//! This lives in its own table beside the outbox, which keeps exactly the states every earlier
//! release wrote: a data dir stays readable by the release before (a node can be rolled back).
//! A path completed by an earlier release has no entry here, and is checked by its narinfo
//! only.

use redb::{
    Durability, ReadableDatabase, ReadableMultimapTable, ReadableTable, Table, TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::outbox::{MIRROR_CLAIMS, MirrorState, OUTBOX, decode, with_claim};
use super::paths::record_in;
use super::storage::{NARS, OWN, WANTS, held_here, served_in};
use super::{Db, DbError, PATHS, PathRecord};

/// What became of each completed path (by hash part): [`Finished`].
pub(super) const FINISHED: TableDefinition<&str, &[u8]> =
    TableDefinition::new("mirror_finished_v1");

/// A completed path, beyond its outbox state (`Done`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Finished {
    /// Completed at unix second `.1`, its NAR where `.0` (a [`MirrorState::NarStored`]) says.
    At(MirrorState, u64),
    /// An audit found it lost from the bucket while nobody held its NAR: not the mirror's to
    /// upload (nor pending, nor complete for its referrers) until a change of its record says
    /// someone holds it again (`Db::outbox_take`).
    Gone,
}

fn read(v: &[u8]) -> Result<Finished, DbError> {
    Ok(postcard::from_bytes(v)?)
}

/// Note that `hash`, whose NAR was `stored`, is done at `now` (in `Db::outbox_set`'s commit).
pub(super) fn finished(
    table: &mut Table<&str, &[u8]>,
    hash: &str,
    stored: MirrorState,
    now: u64,
) -> Result<(), DbError> {
    if matches!(stored, MirrorState::NarStored { .. }) {
        let at = postcard::to_allocvec(&Finished::At(stored, now))?;
        table.insert(hash, at.as_slice())?;
    }
    Ok(())
}

/// Whether an audit found `hash` gone from the bucket while nobody held it.
pub(super) fn is_gone(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    hash: &str,
) -> Result<bool, DbError> {
    Ok(match table.get(hash)? {
        Some(v) => read(v.value())? == Finished::Gone,
        None => false,
    })
}

/// Someone holds the NAR of `rec`'s served claim: this node (a file, or its Nix store), or a
/// peer by its own latest word (`me`'s statements repeated by peers do not count).
pub(super) fn obtainable(
    rec: &PathRecord,
    me: Option<&[u8; 32]>,
    nars: &impl ReadableTable<&'static [u8], &'static [u8]>,
    own: &impl ReadableMultimapTable<&'static [u8], &'static str>,
) -> Result<bool, DbError> {
    let Some(c) = served_in(rec, me, nars, own)? else {
        return Ok(false);
    };
    Ok(held_here(nars, own, c.blake3.as_slice())? || c.held_by_peer(me))
}

/// A completed path the bucket lost something of ([`Db::outbox_audit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub hash: String,
    /// Its narinfo is still in the bucket and its NAR is not (or not whole): Nix would fail on
    /// the narinfo, so it goes first.
    pub dangling: bool,
    /// Its NAR is in the bucket, whole: only its narinfo goes up again.
    pub nar_whole: bool,
}

/// What [`Db::outbox_again`] did with lost paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Again {
    /// Records back in the mirror's hands, with their states: `NarStored` where the NAR is
    /// still whole in the bucket (only the narinfo goes up), else `Pending`.
    pub back: Vec<(PathRecord, MirrorState)>,
    /// Store paths nobody holds: gone until a node holds them again.
    pub gone: Vec<String>,
    /// Hash parts of paths whose records were forgotten: dropped from the outbox.
    pub forgotten: Vec<String>,
}

/// One outbox entry against the listing: lost, or not (see [`Db::outbox_audit`]).
fn judge(
    hash: &str,
    state: &[u8],
    finished: &impl ReadableTable<&'static str, &'static [u8]>,
    listed_at: u64,
    listed: &dyn Fn(&str) -> Option<u64>,
) -> Result<Option<Lost>, DbError> {
    if decode(state)? != MirrorState::Done {
        return Ok(None);
    }
    let nar = match finished.get(hash)?.map(|v| read(v.value())).transpose()? {
        // Done before the listing began (a second's margin either way).
        Some(Finished::At(MirrorState::NarStored { url, file_size, .. }, when))
            if when.saturating_add(2) < listed_at =>
        {
            Some((url, file_size))
        }
        Some(Finished::At(..) | Finished::Gone) => return Ok(None),
        // Done by an earlier release: its NAR's key was not kept.
        None => None,
    };
    let narinfo = listed(&format!("{hash}.narinfo")).is_some();
    let nar_whole = nar
        .as_ref()
        .is_some_and(|(url, size)| listed(url) == Some(*size));
    if narinfo && (nar_whole || nar.is_none()) {
        return Ok(None);
    }
    Ok(Some(Lost {
        hash: hash.to_owned(),
        dangling: narinfo,
        nar_whole,
    }))
}

impl Db {
    /// Compare up to `limit` completed paths, in hash order after `after`, with a listing of
    /// the bucket (`listed`: an object's size by key relative to the cache root, `None` if
    /// absent) that started at `listed_at` (unix seconds): the paths whose narinfo is gone, or
    /// whose NAR is gone or of another size. A path completed since shortly before the listing
    /// started is left alone (the listing may have passed its keys), and so is one found gone
    /// before. Reads only (at most 64 times `limit` paths); returns the lost paths and where
    /// the next call goes on (`None`: the outbox ended).
    pub fn outbox_audit(
        &self,
        after: Option<&str>,
        limit: usize,
        listed_at: u64,
        listed: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<(Vec<Lost>, Option<String>), DbError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let finished = tx.open_table(FINISHED)?;
        let range = match after {
            Some(a) => outbox.range::<&str>((Excluded(a), Unbounded))?,
            None => outbox.range::<&str>(..)?,
        };
        let mut out = Vec::new();
        for (i, entry) in range.enumerate() {
            let (hash, state) = entry?;
            let hash = hash.value();
            if let Some(l) = judge(hash, state.value(), &finished, listed_at, listed)? {
                out.push(l);
            }
            if out.len() == limit || i + 1 >= limit * 64 {
                return Ok((out, Some(hash.to_owned())));
            }
        }
        Ok((out, None))
    }

    /// Completed paths the bucket lost (`lost`: hash parts, and whether the NAR is still whole
    /// in the bucket) go back into the mirror's hands, in one fsync'd commit: as `NarStored`
    /// where the NAR is whole (only the narinfo goes up), else as `Pending` where someone holds
    /// the NAR (`me`: this node, whose own statements repeated by peers do not count), with a
    /// wish for it if this node does not (the mirror node replicates eagerly). A path nobody
    /// holds is noted gone (`outbox_take` takes it in again once a node holds it); one whose
    /// record was forgotten leaves the outbox. A path not done (or gone already) is left as it
    /// is.
    pub fn outbox_again(
        &self,
        lost: &[(String, bool)],
        me: Option<&[u8; 32]>,
    ) -> Result<Again, DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        let mut out = Again::default();
        {
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut finished = tx.open_table(FINISHED)?;
            let paths = tx.open_table(PATHS)?;
            let mut wants = tx.open_table(WANTS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            let mut claims = tx.open_table(MIRROR_CLAIMS)?;
            for (hash, nar_whole) in lost {
                let done = match outbox.get(hash.as_str())? {
                    Some(v) => decode(v.value())? == MirrorState::Done,
                    None => false,
                };
                let was = finished
                    .get(hash.as_str())?
                    .map(|v| read(v.value()))
                    .transpose()?;
                if !done || was == Some(Finished::Gone) {
                    continue;
                }
                let Some(rec) = record_in(&paths, hash)? else {
                    outbox.remove(hash.as_str())?;
                    finished.remove(hash.as_str())?;
                    claims.remove(hash.as_str())?;
                    out.forgotten.push(hash.clone());
                    continue;
                };
                let state = match was {
                    Some(Finished::At(stored, _)) if *nar_whole => {
                        with_claim(stored, &claims, hash)?
                    }
                    _ if obtainable(&rec, me, &nars, &own)? => {
                        // The NAR goes up again: of the claim the path serves now.
                        claims.remove(hash.as_str())?;
                        if let Some(c) = served_in(&rec, me, &nars, &own)?
                            && !held_here(&nars, &own, c.blake3.as_slice())?
                        {
                            wants.insert(c.blake3.as_slice(), hash.as_str())?;
                        }
                        MirrorState::Pending
                    }
                    _ => {
                        finished.insert(
                            hash.as_str(),
                            postcard::to_allocvec(&Finished::Gone)?.as_slice(),
                        )?;
                        out.gone.push(rec.store_path);
                        continue;
                    }
                };
                finished.remove(hash.as_str())?;
                outbox.insert(hash.as_str(), postcard::to_allocvec(&state)?.as_slice())?;
                out.back.push((rec, state));
            }
        }
        tx.commit()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outbox keeps exactly what earlier releases wrote and read (`MirrorState` in
    /// postcard): a NAR stored is the four fields they knew, its claim noted beside it; a path
    /// done is `Done` there, and where its NAR went (and whose NAR it is) is noted beside it,
    /// so an audit puts the narinfo of that claim up again.
    #[test]
    fn the_outbox_stays_readable_by_earlier_releases_and_done_keeps_its_nar() {
        /// `MirrorState` as earlier releases wrote and read it.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        enum Earlier {
            Pending,
            NarStored {
                url: String,
                compression: String,
                file_hash: [u8; 32],
                file_size: u64,
            },
            Done,
        }
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let h = "a".repeat(32);
        db.record_own(&[], &[super::super::tests::own(&h, 1, 10)], 0)
            .unwrap();
        db.outbox_take(10, None).unwrap();
        let stored = MirrorState::NarStored {
            url: "nar/a.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: [3; 32],
            file_size: 77,
            blake3: Some([1; 32]),
        };
        db.outbox_set(&[(h.clone(), stored.clone())]).unwrap();
        let raw = |t: TableDefinition<&str, &[u8]>| -> Option<Vec<u8>> {
            let inner = db.db.get().unwrap();
            let tx = inner.begin_read().unwrap();
            let table = tx.open_table(t).unwrap();
            table.get(h.as_str()).unwrap().map(|v| v.value().to_vec())
        };
        let earlier: Earlier = postcard::from_bytes(&raw(OUTBOX).unwrap()).unwrap();
        assert_eq!(
            earlier,
            Earlier::NarStored {
                url: "nar/a.nar.zst".into(),
                compression: "zstd".into(),
                file_hash: [3; 32],
                file_size: 77,
            }
        );
        assert_eq!(raw(MIRROR_CLAIMS), Some([[1; 32], [3; 32]].concat()));
        assert_eq!(
            db.outbox_unfinished().unwrap()[0].1,
            stored,
            "its claim read back"
        );
        // An earlier release (a rollback) puts another NAR up meanwhile: the note, naming
        // another file, is not taken for it.
        let other = Earlier::NarStored {
            url: "nar/b.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: [4; 32],
            file_size: 78,
        };
        {
            let inner = db.db.get().unwrap();
            let tx = inner.begin_write().unwrap();
            tx.open_table(OUTBOX)
                .unwrap()
                .insert(
                    h.as_str(),
                    postcard::to_allocvec(&other).unwrap().as_slice(),
                )
                .unwrap();
            tx.commit().unwrap();
        }
        let MirrorState::NarStored { blake3, .. } = &db.outbox_unfinished().unwrap()[0].1 else {
            panic!("not stored")
        };
        assert_eq!(
            *blake3, None,
            "an earlier release's: the first claim not failed"
        );
        db.outbox_set(&[(h.clone(), stored.clone())]).unwrap();
        db.outbox_set(&[(h.clone(), MirrorState::Done)]).unwrap();
        assert_eq!(
            raw(OUTBOX).unwrap(),
            [2],
            "MirrorState::Done, as every release wrote it"
        );
        let noted = raw(FINISHED).unwrap();
        let Finished::At(at, when) = read(&noted).unwrap() else {
            panic!("not noted")
        };
        assert_eq!(at, with_blake3(&stored, None));
        assert!(when > 0);
        // The bucket lost the narinfo: it goes up again, of the claim whose NAR is there.
        let again = db.outbox_again(&[(h.clone(), true)], None).unwrap();
        assert_eq!(again.back[0].1, stored);
        // Going up again from the start, the NAR may be another claim's: nothing noted.
        db.outbox_set(&[(h.clone(), MirrorState::Pending)]).unwrap();
        assert_eq!(raw(MIRROR_CLAIMS), None);
    }

    fn with_blake3(s: &MirrorState, b: Option<[u8; 32]>) -> MirrorState {
        let MirrorState::NarStored {
            url,
            compression,
            file_hash,
            file_size,
            ..
        } = s.clone()
        else {
            panic!("not stored")
        };
        MirrorState::NarStored {
            url,
            compression,
            file_hash,
            file_size,
            blake3: b,
        }
    }

    /// An audit finds the done paths whose narinfo, or NAR (gone or of another size), the
    /// bucket lost; leaves alone those done since the listing began and those not done; and
    /// `outbox_again` hands the lost ones back (only the narinfo where the NAR is whole; a NAR
    /// not held here wished for), notes the ones nobody holds gone until someone does, and
    /// drops forgotten ones.
    #[test]
    fn an_audit_finds_what_the_bucket_lost_and_puts_it_back() {
        use super::super::tests::{own, remote};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let h = |c: char| c.to_string().repeat(32);
        db.record_own(&[], &[own(&h('a'), 1, 10), own(&h('b'), 2, 10)], 0)
            .unwrap();
        // c, d, e held by peer 5; g by nobody; i only by this node (7), as peers repeat it.
        db.record_remote(
            vec![
                remote(&h('c'), 3, 5, 1, true),
                remote(&h('d'), 4, 5, 1, true),
                remote(&h('e'), 5, 5, 1, true),
                remote(&h('g'), 6, 5, 1, false),
                remote(&h('i'), 8, 7, 1, true),
            ],
            None,
            false,
            None,
        )
        .unwrap();
        assert_eq!(db.outbox_take(10, None).unwrap().0.len(), 7);
        let nar = |c: char| MirrorState::NarStored {
            url: format!("nar/{c}.nar.zst"),
            compression: "zstd".into(),
            file_hash: [0; 32],
            file_size: 100,
            blake3: None,
        };
        let all = ['a', 'b', 'c', 'd', 'g', 'i'];
        db.outbox_set(&all.map(|c| (h(c), nar(c)))).unwrap();
        db.outbox_set(&all.map(|c| (h(c), MirrorState::Done)))
            .unwrap();
        // e: done as an earlier release kept it (no NAR known).
        db.outbox_set(&[(h('e'), MirrorState::Done)]).unwrap();
        // (Done moves a path not held here to the end of the log; the mirror takes the log
        // in as it goes.)
        db.outbox_take(10, None).unwrap();
        let now = crate::db::paths::now_secs();
        // The bucket: a whole; b's narinfo gone (its NAR whole); c's NAR gone; d's NAR cut
        // short; e's narinfo gone; g and i: both gone.
        let listed = |k: &str| -> Option<u64> {
            match k {
                k if k.ends_with(".narinfo") => {
                    (!["b", "e", "g", "i"].iter().any(|c| k.starts_with(c))).then_some(1)
                }
                "nar/a.nar.zst" | "nar/b.nar.zst" | "nar/e.nar.zst" => Some(100),
                "nar/d.nar.zst" => Some(60),
                _ => None,
            }
        };
        let lost = |c: char, dangling, nar_whole| Lost {
            hash: h(c),
            dangling,
            nar_whole,
        };
        let expected = vec![
            lost('b', false, true),
            lost('c', true, false),
            lost('d', true, false),
            lost('e', false, false),
            lost('g', false, false),
            lost('i', false, false),
        ];
        let (found, next) = db.outbox_audit(None, 100, now + 10, &listed).unwrap();
        assert_eq!((&found, next), (&expected, None));
        // Done since the listing began: left alone (its keys may have been passed); an
        // earlier release's done has no time and is always looked at.
        let (recent, _) = db.outbox_audit(None, 100, now, &listed).unwrap();
        assert_eq!(recent, vec![lost('e', false, false)]);
        // A batch at a time, in hash order.
        let (first, next) = db.outbox_audit(None, 4, now + 10, &listed).unwrap();
        assert_eq!((first.len(), next.as_deref()), (4, Some(h('e').as_str())));
        let (rest, next) = db
            .outbox_audit(next.as_deref(), 4, now + 10, &listed)
            .unwrap();
        assert_eq!((rest.len(), next), (2, None));

        // Back into the mirror's hands: b with its NAR where it is (only the narinfo goes
        // up); c, d, e pending, their NARs (held by a peer) wished for; g and i gone (nobody
        // holds them: this node's own word repeated by peers does not count).
        let me = [7; 32];
        let arg: Vec<(String, bool)> = found
            .iter()
            .map(|l| (l.hash.clone(), l.nar_whole))
            .collect();
        let again = db.outbox_again(&arg, Some(&me)).unwrap();
        let back: Vec<(String, MirrorState)> = again
            .back
            .iter()
            .map(|(r, s)| (r.hash_part().to_owned(), s.clone()))
            .collect();
        assert_eq!(
            back,
            vec![
                (h('b'), nar('b')),
                (h('c'), MirrorState::Pending),
                (h('d'), MirrorState::Pending),
                (h('e'), MirrorState::Pending),
            ]
        );
        assert_eq!(
            again.gone,
            vec![
                format!("/nix/store/{}-x", h('g')),
                format!("/nix/store/{}-x", h('i'))
            ]
        );
        assert!(again.forgotten.is_empty());
        let mut wished: Vec<[u8; 32]> = db.wants().unwrap().into_iter().map(|(b, _)| b).collect();
        wished.sort();
        assert_eq!(wished, vec![[3; 32], [4; 32], [5; 32]]);
        // Gone is not pending: the mirror does not need its NAR, forgetting may drop it; nor
        // is it complete for its referrers. The outbox keeps what earlier releases read.
        assert_eq!(db.outbox_state(&h('g')).unwrap(), Some(MirrorState::Done));
        assert_eq!(
            db.outbox_done(&[h('g'), h('a')]).unwrap(),
            vec![false, true]
        );
        assert_eq!(
            db.mirror_needs(&[[6; 32]]).unwrap(),
            vec![crate::db::MirrorNeed::Nothing]
        );
        assert_eq!(db.outbox_unfinished().unwrap().len(), 4);
        // Paths in the mirror's hands, and gone ones, are not looked at again.
        let (found, _) = db.outbox_audit(None, 100, now + 10, &|_| None).unwrap();
        assert_eq!(found, vec![lost('a', false, false)], "only a is done");
        assert_eq!(
            db.outbox_again(&[(h('b'), true)], None).unwrap(),
            Again::default()
        );
        assert_eq!(
            db.outbox_again(&[(h('g'), false)], None).unwrap(),
            Again::default(),
            "gone already"
        );
        // A peer holds g again (a newer word): taken in again, pending.
        db.record_remote(vec![remote(&h('g'), 6, 5, 2, true)], None, false, None)
            .unwrap();
        let (taken, _) = db.outbox_take(10, Some(&me)).unwrap();
        assert_eq!(
            taken.iter().map(|r| r.hash_part()).collect::<Vec<_>>(),
            [h('g')]
        );
        assert_eq!(
            db.outbox_state(&h('g')).unwrap(),
            Some(MirrorState::Pending)
        );
        assert_eq!(db.outbox_done(&[h('g')]).unwrap(), vec![false]);

        // A done path whose record was forgotten (nobody held it) leaves the outbox: a later
        // record of it is taken in anew.
        db.record_remote(vec![remote(&h('f'), 9, 5, 1, false)], None, false, None)
            .unwrap();
        db.outbox_take(10, None).unwrap();
        db.outbox_set(&[(h('f'), nar('f'))]).unwrap();
        db.outbox_set(&[(h('f'), MirrorState::Done)]).unwrap();
        db.outbox_take(10, None).unwrap();
        let pinned = std::collections::HashSet::new();
        for now in [1000, 2000] {
            db.forget_dead(crate::db::ForgetStep {
                me: Some(&me),
                now,
                after: 100,
                limit: 100,
                mirror: true,
                pinned: &pinned,
            })
            .unwrap();
        }
        assert!(db.path(&h('f')).unwrap().is_none(), "forgotten");
        // A gone path forgotten leaves the outbox (audits walk it): only its end is kept. Its
        // record back, it is taken in once someone holds it, not before.
        assert!(db.path(&h('i')).unwrap().is_none(), "forgotten");
        assert_eq!(db.outbox_state(&h('i')).unwrap(), None);
        db.record_remote(vec![remote(&h('i'), 8, 7, 3, true)], None, false, None)
            .unwrap();
        assert!(db.outbox_take(10, Some(&me)).unwrap().0.is_empty());
        db.record_remote(vec![remote(&h('i'), 8, 5, 4, true)], None, false, None)
            .unwrap();
        let (taken, _) = db.outbox_take(10, Some(&me)).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            db.outbox_state(&h('i')).unwrap(),
            Some(MirrorState::Pending)
        );
        let (found, _) = db.outbox_audit(None, 100, now + 10, &|_| None).unwrap();
        assert!(found.contains(&lost('f', false, false)), "{found:?}");
        let again = db.outbox_again(&[(h('f'), false)], None).unwrap();
        assert_eq!(again.forgotten, vec![h('f')]);
        assert_eq!(db.outbox_state(&h('f')).unwrap(), None);
    }
}
