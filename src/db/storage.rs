//! The storage's tables: which NARs this node holds and how. Own paths are held in the local
//! Nix store (no copy; only their leaves are kept here); NARs fetched from peers are files of
//! the storage, each with its size and when it was last used (for eviction). Also pins, and
//! the NARs an eager node still wants. The policy lives in `crate::storage`; this is its
//! bookkeeping, each change one fsync'd commit that also moves the affected paths to the end
//! of the log, so peers learn what this node now holds or no longer holds.

use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::leaves::Leaves;
use super::paths::relog;
use super::{Db, DbError, LOG, LOG_INDEX, META, PATHS, PathRecord, bump, durable, get_meta, lower};

/// Hash parts of the paths whose own claim has this NAR, held in the local Nix store.
pub(super) const OWN: MultimapTableDefinition<&[u8], &str> = MultimapTableDefinition::new("own_v1");
/// NAR files held by the storage ([`NarFile`]).
pub(super) const NARS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("nars_v1");
/// Pinned paths (closures kept from eviction), by hash part: when pinned.
pub(super) const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins_v1");
/// Paths unpinned whose closure the walk that forgets dead records has not been brought back
/// to yet, by hash part: when unpinned. Written in the unpin's commit, cleared once the
/// storage has moved the closure's paths to the end of the log, so a crash in between loses
/// nothing (`crate::storage::Storage::refresh_pins` does it again at the next start).
const UNPINNED: TableDefinition<&str, u64> = TableDefinition::new("unpinned_v1");
/// NARs an eager node still wants, by BLAKE3: the hash part of a path that wants it.
pub(super) const WANTS: TableDefinition<&[u8], &str> = TableDefinition::new("wants_v1");

pub(super) const OWN_BYTES: &str = "own.bytes";
pub(super) const OWN_PATHS: &str = "own.paths";
const FILE_BYTES: &str = "files.bytes";
const EVICTIONS: &str = "files.evictions";
const GC_LOST: &str = "own.gc_lost";

pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), DbError> {
    tx.open_multimap_table(OWN)?;
    super::leaves::create_tables(tx)?;
    tx.open_table(NARS)?;
    tx.open_table(PINS)?;
    tx.open_table(UNPINNED)?;
    tx.open_table(WANTS)?;
    Ok(())
}

/// Whether this node holds the NAR `blake3`: as a file, or in the local Nix store for an own
/// path.
pub(super) fn held_here(
    nars: &impl ReadableTable<&'static [u8], &'static [u8]>,
    own: &impl ReadableMultimapTable<&'static [u8], &'static str>,
    blake3: &[u8],
) -> Result<bool, DbError> {
    Ok(nars.get(blake3)?.is_some() || own.get(blake3)?.next().is_some())
}

/// The claim `rec` serves ([`PathRecord::served`]), with what this node holds read in the
/// transaction's tables.
pub(super) fn served_in<'r>(
    rec: &'r PathRecord,
    me: Option<&[u8; 32]>,
    nars: &impl ReadableTable<&'static [u8], &'static [u8]>,
    own: &impl ReadableMultimapTable<&'static [u8], &'static str>,
) -> Result<Option<&'r super::Claim>, DbError> {
    let mut failed = None;
    let served = rec.served(me, |c| {
        held_here(nars, own, c.blake3.as_slice()).unwrap_or_else(|e| {
            failed.get_or_insert(e);
            false
        })
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(served),
    }
}

/// Paths or NARs one write changes at most where the caller's list has no bound (a Nix GC of
/// a build host's store, an eviction of many small NARs): each commit stays short (the
/// watchdog takes writes in flight for 30 s with none ending for a hung database).
pub const WRITE_PART: usize = 1024;

/// A NAR file of the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarFile {
    pub size: u64,
    /// Seconds since the epoch it was last fetched or served.
    pub last_used: u64,
}

/// What the storage holds, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageCounters {
    /// NAR bytes of own paths, served from the Nix store.
    pub own_bytes: u64,
    pub own_paths: u64,
    /// Bytes and count of NAR files (fetched from peers, kept within the cap).
    pub file_bytes: u64,
    pub files: u64,
    pub evictions: u64,
    /// Own paths lost from the local Nix store (garbage-collected or deleted).
    pub gc_lost: u64,
}

/// Mark the claims on `blake3` as held (or withdrawn) by this node and move their paths to the
/// end of the log.
pub(super) fn relog_holders(
    tx: &redb::WriteTransaction,
    blake3: &[u8; 32],
    withdrawn: bool,
    changed: &mut Vec<String>,
) -> Result<(), DbError> {
    super::paths::change_claims(tx, blake3, true, changed, |c| {
        let news = c.withdrawn != withdrawn;
        c.withdrawn = withdrawn;
        news
    })
}

impl Db {
    pub(super) fn announce_changes(&self, changed: Vec<String>) {
        if changed.is_empty() {
            return;
        }
        self.changed();
        for h in changed {
            let _ = self.changed_paths.send(h);
        }
    }

    /// An own path holding this NAR in the local store: (hash part, full store path).
    pub fn own_holder(&self, blake3: &[u8; 32]) -> Result<Option<(String, String)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let own = tx.open_multimap_table(OWN)?;
        let paths = tx.open_table(PATHS)?;
        for h in own.get(blake3.as_slice())? {
            let h = h?;
            if let Some(v) = paths.get(h.value())? {
                let rec: PathRecord = postcard::from_bytes(v.value())?;
                return Ok(Some((h.value().to_owned(), rec.store_path)));
            }
        }
        Ok(None)
    }

    /// Every own path held in the local store: (BLAKE3, hash part, full store path).
    pub fn own_paths(&self) -> Result<Vec<([u8; 32], String, String)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let own = tx.open_multimap_table(OWN)?;
        let paths = tx.open_table(PATHS)?;
        let mut out = Vec::new();
        for entry in own.iter()? {
            let (b, hashes) = entry?;
            let mut blake3 = [0u8; 32];
            blake3.copy_from_slice(b.value());
            for h in hashes {
                let h = h?.value().to_owned();
                if let Some(v) = paths.get(h.as_str())? {
                    let rec: PathRecord = postcard::from_bytes(v.value())?;
                    out.push((blake3, h, rec.store_path));
                }
            }
        }
        Ok(out)
    }

    /// These own paths left the local store: their claims stay (peers may hold the bytes) but
    /// are no longer served from here, and the paths move to the end of the log. Returns the
    /// paths that were still held as own.
    pub fn own_lost(&self, lost: &[([u8; 32], String)]) -> Result<usize, DbError> {
        let mut n = 0;
        for part in lost.chunks(WRITE_PART) {
            n += self.own_lost_part(part)?;
        }
        Ok(n)
    }

    fn own_lost_part(&self, lost: &[([u8; 32], String)]) -> Result<usize, DbError> {
        if lost.is_empty() {
            return Ok(0);
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut changed = Vec::new();
        // NARs no longer held at all: every path claiming them is told (another path with the
        // same bytes was held through the lost one).
        let mut gone = Vec::new();
        {
            let mut own = tx.open_multimap_table(OWN)?;
            let mut paths = tx.open_table(PATHS)?;
            let mut meta = tx.open_table(META)?;
            let mut leaves = Leaves::open(&tx)?;
            let nars = tx.open_table(NARS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            for (blake3, hash) in lost {
                if !own.remove(blake3.as_slice(), hash.as_str())? {
                    continue;
                }
                let old = paths.get(hash.as_str())?.map(|v| v.value().to_vec());
                let size = match old {
                    Some(bytes) => {
                        let mut rec: PathRecord = postcard::from_bytes(&bytes)?;
                        let size = rec.claim(blake3).map_or(0, |c| c.nar_size);
                        if let Some(c) = rec.claim_mut(blake3) {
                            c.own = false;
                            c.withdrawn = true;
                        }
                        paths.insert(hash.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
                        size
                    }
                    None => 0,
                };
                if own.get(blake3.as_slice())?.next().is_none() {
                    lower(&mut meta, OWN_BYTES, size)?;
                    if nars.get(blake3.as_slice())?.is_none() {
                        leaves.remove(blake3)?;
                        gone.push(*blake3);
                    }
                }
                lower(&mut meta, OWN_PATHS, 1)?;
                bump(&mut meta, GC_LOST, 1)?;
                relog(&mut log, &mut index, &mut meta, hash)?;
                changed.push(hash.clone());
            }
        }
        let n = changed.len();
        for b in &gone {
            relog_holders(&tx, b, true, &mut changed)?;
        }
        tx.commit()?;
        self.announce_changes(changed);
        Ok(n)
    }

    /// The leaves of a NAR held here.
    pub fn leaves(&self, blake3: &[u8; 32]) -> Result<Option<Vec<u8>>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        super::leaves::read(&tx, blake3)
    }

    /// The NAR file of this BLAKE3, if the storage holds one.
    pub fn nar_file(&self, blake3: &[u8; 32]) -> Result<Option<NarFile>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        tx.open_table(NARS)?
            .get(blake3.as_slice())?
            .map(|v| Ok(postcard::from_bytes(v.value())?))
            .transpose()
    }

    /// Every NAR file: (BLAKE3, file).
    pub fn nar_files(&self) -> Result<Vec<([u8; 32], NarFile)>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let nars = tx.open_table(NARS)?;
        let mut out = Vec::with_capacity(nars.len()? as usize);
        for entry in nars.iter()? {
            let (k, v) = entry?;
            let mut b = [0u8; 32];
            b.copy_from_slice(k.value());
            out.push((b, postcard::from_bytes(v.value())?));
        }
        Ok(out)
    }

    /// NAR files are complete and durable: keep their rows and leaves, forget the wishes for
    /// them, and move the paths with a claim on them to the end of the log (this node holds
    /// them now); one commit for them all.
    pub fn add_nar_files(&self, files: &[([u8; 32], NarFile, &[u8])]) -> Result<(), DbError> {
        if files.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut changed = Vec::new();
        {
            let mut nars = tx.open_table(NARS)?;
            let mut meta = tx.open_table(META)?;
            let mut leaves_t = Leaves::open(&tx)?;
            let mut wants = tx.open_table(WANTS)?;
            for (blake3, file, leaves) in files {
                if nars.get(blake3.as_slice())?.is_none() {
                    bump(&mut meta, FILE_BYTES, file.size)?;
                }
                nars.insert(blake3.as_slice(), postcard::to_allocvec(file)?.as_slice())?;
                leaves_t.insert(blake3, leaves)?;
                wants.remove(blake3.as_slice())?;
            }
        }
        for (blake3, _, _) in files {
            relog_holders(&tx, blake3, false, &mut changed)?;
        }
        tx.commit()?;
        self.announce_changes(changed);
        Ok(())
    }

    /// Forget NAR files (evicted, or found bad): their rows, their leaves unless an own path
    /// still needs them, and any wish for them; the paths with a claim on them move to the end
    /// of the log. `evicted` counts them as evictions.
    pub fn remove_nar_files(&self, blake3s: &[[u8; 32]], evicted: bool) -> Result<(), DbError> {
        blake3s
            .chunks(WRITE_PART)
            .try_for_each(|part| self.remove_nar_files_part(part, evicted))
    }

    fn remove_nar_files_part(&self, blake3s: &[[u8; 32]], evicted: bool) -> Result<(), DbError> {
        if blake3s.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut changed = Vec::new();
        {
            let mut nars = tx.open_table(NARS)?;
            let mut meta = tx.open_table(META)?;
            let mut leaves = Leaves::open(&tx)?;
            let mut wants = tx.open_table(WANTS)?;
            let own = tx.open_multimap_table(OWN)?;
            for b in blake3s {
                let Some(file) = nars
                    .remove(b.as_slice())?
                    .map(|v| postcard::from_bytes::<NarFile>(v.value()))
                    .transpose()?
                else {
                    continue;
                };
                lower(&mut meta, FILE_BYTES, file.size)?;
                if evicted {
                    bump(&mut meta, EVICTIONS, 1)?;
                }
                if own.get(b.as_slice())?.next().is_none() {
                    leaves.remove(b)?;
                }
                wants.remove(b.as_slice())?;
            }
        }
        for b in blake3s {
            relog_holders(&tx, b, true, &mut changed)?;
        }
        tx.commit()?;
        self.announce_changes(changed);
        Ok(())
    }

    /// Remember when NAR files were last used (batched; a crash loses at most one batch).
    pub fn touch_nar_files(&self, used: &[([u8; 32], u64)]) -> Result<(), DbError> {
        used.chunks(WRITE_PART)
            .try_for_each(|part| self.touch_nar_files_part(part))
    }

    fn touch_nar_files_part(&self, used: &[([u8; 32], u64)]) -> Result<(), DbError> {
        if used.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = super::writes::begin(&db)?;
        {
            let mut nars = tx.open_table(NARS)?;
            for (b, at) in used {
                let file = nars
                    .get(b.as_slice())?
                    .map(|v| postcard::from_bytes::<NarFile>(v.value()))
                    .transpose()?;
                if let Some(mut f) = file {
                    f.last_used = f.last_used.max(*at);
                    nars.insert(b.as_slice(), postcard::to_allocvec(&f)?.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Pin (or unpin) paths by hash part. An unpinned path is also noted as unpinned until
    /// [`Db::unpinned_done`].
    pub fn set_pins(&self, hashes: &[String], pinned: bool) -> Result<(), DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        if crate::killpoint::fault("db.write-hangs") {
            crate::killpoint::hang();
        }
        {
            let mut pins = tx.open_table(PINS)?;
            let mut unpinned = tx.open_table(UNPINNED)?;
            let paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            for h in hashes {
                if pinned {
                    pins.insert(h.as_str(), now)?;
                    unpinned.remove(h.as_str())?;
                } else if pins.remove(h.as_str())?.is_some() {
                    unpinned.insert(h.as_str(), now)?;
                    if paths.get(h.as_str())?.is_some() {
                        // A dead record kept only for its pin: the walk that forgets dead
                        // records (`forget`) must come to it again.
                        relog(&mut log, &mut index, &mut meta, h)?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Pinned paths, by hash part.
    pub fn pins(&self) -> Result<Vec<String>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let pins = tx.open_table(PINS)?;
        let mut out = Vec::new();
        for entry in pins.iter()? {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Paths unpinned whose closures are still to be revisited (see [`Db::set_pins`]), by hash
    /// part; at most `limit`.
    pub fn unpinned(&self, limit: usize) -> Result<Vec<String>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let unpinned = tx.open_table(UNPINNED)?;
        let mut out = Vec::new();
        for entry in unpinned.iter()?.take(limit) {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }

    /// These unpinned paths' closures have been revisited.
    pub fn unpinned_done(&self, hashes: &[String]) -> Result<(), DbError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            let mut unpinned = tx.open_table(UNPINNED)?;
            for h in hashes {
                unpinned.remove(h.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Wish for these NARs (eager replication), by BLAKE3 with a path that wants each.
    pub fn want(&self, wishes: &[([u8; 32], String)]) -> Result<(), DbError> {
        if wishes.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            let mut wants = tx.open_table(WANTS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            for (b, h) in wishes {
                if !held_here(&nars, &own, b.as_slice())? {
                    wants.insert(b.as_slice(), h.as_str())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Give up wishes (no trusted record wants the NAR any more, or it was evicted).
    pub fn unwant(&self, blake3s: &[[u8; 32]]) -> Result<(), DbError> {
        if blake3s.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            let mut wants = tx.open_table(WANTS)?;
            for b in blake3s {
                wants.remove(b.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every wish: (BLAKE3, hash part of a path that wants it).
    pub fn wants(&self) -> Result<Vec<([u8; 32], String)>, DbError> {
        self.wants_after(None, usize::MAX)
    }

    /// At most `limit` wishes in BLAKE3 order, from just after `after` (from the first without):
    /// a window of the wish list, so whoever walks it pays for the window, not the whole list.
    pub fn wants_after(
        &self,
        after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<Vec<([u8; 32], String)>, DbError> {
        use std::ops::Bound;
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let wants = tx.open_table(WANTS)?;
        let from = match after {
            Some(a) => Bound::Excluded(a.as_slice()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in wants.range::<&[u8]>((from, Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let Ok(b) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            out.push((b, v.value().to_owned()));
        }
        Ok(out)
    }

    /// What the storage holds.
    pub fn storage_counters(&self) -> Result<StorageCounters, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(StorageCounters {
            own_bytes: get_meta(&meta, OWN_BYTES)?,
            own_paths: get_meta(&meta, OWN_PATHS)?,
            file_bytes: get_meta(&meta, FILE_BYTES)?,
            files: tx.open_table(NARS)?.len()?,
            evictions: get_meta(&meta, EVICTIONS)?,
            gc_lost: get_meta(&meta, GC_LOST)?,
        })
    }
}
