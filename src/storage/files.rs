//! NAR files: reconciling the directory with the database at start (a crash leaves at most a
//! partial fetch or a file without its row: both removed), room for a new NAR within the cap
//! (evicting the least recently used), and the partial file a fetch writes its verified chunk
//! groups into before it becomes a NAR file (fsync'd, renamed, then recorded).

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Inner, Storage, StorageError, hex, now_secs};
use crate::db::{MirrorNeed, NarFile};

fn parse_hex(name: &str) -> Option<[u8; 32]> {
    let h = name.strip_suffix(".nar")?;
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Storage {
    pub(super) fn partial_dir(&self) -> PathBuf {
        self.inner.dir.join("partial")
    }

    /// Make the directory and the database agree: partial fetches and files without a row are
    /// removed, rows without a file (or of another size) are forgotten.
    pub(super) fn reconcile(&self) -> Result<(), StorageError> {
        let partial = self.partial_dir();
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        let rows = self.inner.db.nar_files()?;
        let mut on_disk = std::collections::HashMap::new();
        for e in std::fs::read_dir(&self.inner.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(b) = parse_hex(&name.to_string_lossy()) else {
                continue;
            };
            on_disk.insert(b, e.metadata()?.len());
        }
        let mut gone = Vec::new();
        let mut st = self.inner.lock();
        for (b, f) in &rows {
            match on_disk.remove(b) {
                Some(len) if len == f.size => st.lru.insert(*b, f.size, f.last_used),
                _ => gone.push(*b),
            }
        }
        drop(st);
        for b in on_disk.keys() {
            tracing::info!("storage: removing {}.nar, left without a record", hex(b));
            let _ = std::fs::remove_file(self.file_path(b));
        }
        if !gone.is_empty() {
            tracing::warn!(
                "storage: {} NAR file(s) missing on disk; forgotten",
                gone.len()
            );
            self.inner.db.remove_nar_files(&gone, false)?;
        }
        Ok(())
    }

    /// Start a NAR file of `size` bytes: room is made within the cap (evicting if need be) and
    /// reserved until the fetch finishes or is dropped. Blocking.
    pub fn begin(&self, blake3: &[u8; 32], size: u64) -> Result<PartialNar, StorageError> {
        let cap = self.inner.cfg.max_size;
        if size > cap {
            return Err(StorageError::TooLarge { size, cap });
        }
        self.make_room(size)?;
        let path = self
            .partial_dir()
            .join(format!("{}.{}.nar", hex(blake3), fastrand_suffix()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .inspect_err(|_| {
                self.inner.lock().reserved -= size;
            })?;
        if let Err(e) = file.set_len(size) {
            self.inner.lock().reserved -= size;
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        Ok(PartialNar {
            inner: self.inner.clone(),
            storage: self.clone(),
            blake3: *blake3,
            size,
            file: Arc::new(file),
            path,
            done: false,
        })
    }

    /// Evict until `need` more bytes fit within the cap and the disk's free-space floor, and
    /// reserve them.
    pub(super) fn make_room(&self, need: u64) -> Result<(), StorageError> {
        let free = free_space(&self.inner.dir);
        if self.pins_stale_for_eviction(need, free)
            && let Err(e) = self.refresh_pins_if_stale()
        {
            tracing::warn!("storage: pinned closures: {e}");
        }
        // On the mirror node, the files a plan would evict are first asked about in the
        // mirror's outbox, outside the lock, and the plan made again: what the outbox still has
        // to upload is protected from then on (released when done, as what the mirror protects
        // itself), what it has not taken in yet is kept this time, the rest may go.
        let mut cleared: HashSet<[u8; 32]> = HashSet::new();
        let mut kept: HashSet<[u8; 32]> = HashSet::new();
        let mut unfinished: Vec<[u8; 32]> = Vec::new();
        let (evict, nothing_to_do) = loop {
            let mut st = self.inner.lock();
            st.protected.extend(unfinished.drain(..));
            let cap = self.inner.cfg.max_size;
            let (over_cap, under_floor) = self.shortfall(&st, need, free);
            let want = over_cap.max(under_floor);
            if want == 0 {
                st.reserved += need;
                break (Vec::new(), true);
            }
            let plan = st.lru.plan(want, |b| {
                st.readers.contains_key(b)
                    || st.protected.contains(b)
                    || st.pinned.contains(b)
                    || kept.contains(b)
            });
            let Some(plan) = plan else {
                // Name the limit that cannot be met: an operator fixes the two differently (a
                // larger cap, or space freed on the disk).
                let why = match free {
                    Some(f) if under_floor >= over_cap => format!(
                        "the disk has {f} bytes free and [store] min-free keeps {} free; the \
                         NAR files that may go would not make up the rest",
                        self.inner.cfg.min_free
                    ),
                    _ => format!(
                        "[store] max-size is {cap} bytes and the NAR files that may go would not \
                         make up the rest (the others are in use, pinned or waiting for the \
                         mirror)"
                    ),
                };
                return Err(StorageError::Full { need, why });
            };
            let ask: Vec<[u8; 32]> = if st.mirror {
                plan.iter()
                    .filter(|b| !cleared.contains(*b))
                    .copied()
                    .collect()
            } else {
                Vec::new()
            };
            if ask.is_empty() {
                st.reserved += need;
                break (plan, false);
            }
            drop(st);
            match self.inner.db.mirror_needs(&ask) {
                Ok(needs) => {
                    for (b, n) in ask.into_iter().zip(needs) {
                        match n {
                            MirrorNeed::Nothing => {
                                cleared.insert(b);
                            }
                            MirrorNeed::Unfinished => unfinished.push(b),
                            // Taken in, it may be done: asked again the next time.
                            MirrorNeed::NotTaken => {
                                kept.insert(b);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("storage: asking the mirror's outbox: {e}");
                    kept.extend(ask);
                }
            }
        };
        if nothing_to_do {
            return Ok(());
        }
        if let Err(e) = self.forget_files(&evict, true) {
            self.inner.lock().reserved -= need;
            return Err(e);
        }
        tracing::info!("storage: evicted {} NAR file(s) to make room", evict.len());
        Ok(())
    }

    /// Bytes over the cap and under the free-space floor (`free`: the disk's free bytes) once
    /// `need` more are added.
    fn shortfall(&self, st: &super::State, need: u64, free: Option<u64>) -> (u64, u64) {
        let over_cap =
            (st.lru.bytes() + st.reserved + need).saturating_sub(self.inner.cfg.max_size);
        let under_floor = match free {
            Some(f) => (self.inner.cfg.min_free + need).saturating_sub(f),
            None => 0,
        };
        (over_cap, under_floor)
    }

    /// Whether making room for `need` bytes evicts while the pinned closures may have grown:
    /// they named paths not recorded when last computed (a pin made before its closure
    /// arrived), more than [`super::PINS_FRESH`] ago. Then they are computed again first, so a
    /// path that has joined a pinned closure since is not evicted (and, its wish cleared,
    /// never fetched again).
    fn pins_stale_for_eviction(&self, need: u64, free: Option<u64>) -> bool {
        let st = self.inner.lock();
        if !st.pins_stale() {
            return false;
        }
        let (over_cap, under_floor) = self.shortfall(&st, need, free);
        over_cap.max(under_floor) > 0
    }

    /// Evict what is over the cap or under the free-space floor now (the floor may have moved
    /// because other programs wrote to the disk). Blocking.
    pub(super) fn trim(&self) -> Result<(), StorageError> {
        match self.make_room(0) {
            Ok(()) | Err(StorageError::Full { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete NAR files and their rows (`evicted`: counted as evictions). Blocking.
    pub(super) fn forget_files(
        &self,
        blake3s: &[[u8; 32]],
        evicted: bool,
    ) -> Result<(), StorageError> {
        {
            let mut st = self.inner.lock();
            for b in blake3s {
                st.lru.remove(b);
            }
        }
        for b in blake3s {
            match std::fs::remove_file(self.file_path(b)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.db.remove_nar_files(blake3s, evicted)?;
        self.publish();
        Ok(())
    }
}

/// Free bytes on the file system of `dir` (for unprivileged users), if it can be asked.
pub fn free_space(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What an operator is told when `dir`'s disk has `free` bytes, under the `floor` of
/// `[store] min-free` (`None`: at or above it). Status and doctor say it alike.
pub fn under_floor(dir: &std::path::Path, free: u64, floor: u64) -> Option<String> {
    (free < floor).then(|| {
        format!(
            "the disk of {} has {} MiB free, under [store] min-free ({} MiB): no NAR from peers \
             is kept until space is freed or min-free lowered",
            dir.display(),
            free >> 20,
            floor >> 20
        )
    })
}

/// A suffix that keeps two concurrent fetches of one NAR apart.
fn fastrand_suffix() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A NAR file being written by a fetch: verified chunk groups are written at their offsets (from
/// any number of tasks); [`PartialNar::finish`] makes it a NAR file of the storage. Dropped
/// unfinished, it is removed and its reservation returned.
#[derive(Debug)]
pub struct PartialNar {
    inner: Arc<Inner>,
    storage: Storage,
    blake3: [u8; 32],
    size: u64,
    file: Arc<File>,
    path: PathBuf,
    done: bool,
}

impl PartialNar {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the partial file is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The open file (for writers on other threads and for readers of the verified prefix).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Write verified bytes at `offset`. Blocking.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// The fetch is complete and verified: fsync, rename into place, fsync the directory, and
    /// record the file with its leaves (the last two shared with the files finished meanwhile,
    /// `record`). Blocking.
    pub fn finish(mut self, leaves: &[u8]) -> Result<(), StorageError> {
        self.file.sync_all()?;
        crate::killpoint::reach("storage.fetched");
        let dest = self.storage.file_path(&self.blake3);
        std::fs::rename(&self.path, &dest)?;
        let now = now_secs();
        // The directory's fsync and the commit are shared with the files finished meanwhile.
        let recorded = self
            .inner
            .recorder
            .record(
                self.blake3,
                NarFile {
                    size: self.size,
                    last_used: now,
                },
                leaves,
            )
            .map_err(|e| StorageError::Io(std::io::Error::other(e)));
        {
            let mut st = self.inner.lock();
            st.reserved -= self.size;
            if recorded.is_ok() {
                st.lru.insert(self.blake3, self.size, now);
            }
        }
        self.done = true;
        if let Err(e) = recorded {
            let _ = std::fs::remove_file(&dest);
            return Err(e);
        }
        self.storage.publish();
        Ok(())
    }
}

impl Drop for PartialNar {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
            self.inner.lock().reserved -= self.size;
        }
    }
}
