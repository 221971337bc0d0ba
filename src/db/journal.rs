//! The durable queue of hook reports: an append-only journal file (`queue.log`) of its own,
//! because a hook's acknowledgement waits for it. Appending a few hundred bytes and one
//! `fdatasync` costs a fraction of a B-tree commit (and writes one page, not a dozen), and the
//! commit never waits behind the pipeline's or the mesh's transactions.
//!
//! Records: `len: u32 LE`, `crc32: u32 LE` of the payload, `payload` (postcard [`Entry`]). An
//! item is appended and fsync'd before its report is acknowledged. When the pipeline has
//! recorded a batch, `Done { upto }` is appended without fsync: a crash that loses it only
//! plans that batch again, and its paths are found recorded (so is emptying the file once
//! nothing is pending). At open the journal is replayed;
//! a torn record at the end (a crash mid-append, before the acknowledgement) is cut off. The
//! file is rewritten with only the pending items (temp file, fsync, rename) once it has grown
//! large, and emptied when nothing is pending.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::QueueItem;

/// Largest record accepted (a report of a few thousand paths fits easily).
const MAX_RECORD: usize = 4 << 20;
/// Rewrite the journal once it is this large.
const COMPACT_AT: u64 = 8 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Entry {
    Item { seq: u64, item: QueueItem },
    Done { upto: u64 },
}

/// The queue: its journal file and the pending items in memory.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
    /// With the length of each one's record.
    pending: VecDeque<(u64, QueueItem, u64)>,
    /// The length of the pending items' records: what a compaction would leave.
    live: u64,
    next: u64,
    /// A failed append left bytes that could not be removed, or a compaction's rename may not
    /// be on disk: the file is opened again before the next append.
    poisoned: bool,
    /// Compactions since it was opened.
    compactions: u64,
}

/// Fsync the journal's directory (a unit test may make it fail).
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if let Some(e) = tests::dir_sync_fault() {
        return Err(e);
    }
    crate::fsutil::sync_dir(dir)
}

fn record(e: &Entry) -> io::Result<Vec<u8>> {
    let payload = postcard::to_allocvec(e).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decode the records of `bytes`; returns them with their lengths, and the length of the valid
/// prefix.
fn replay(bytes: &[u8]) -> (Vec<(Entry, u64)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while bytes.len() - pos >= 8 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap_or_default());
        if len == 0 || len > MAX_RECORD || bytes.len() - pos - 8 < len {
            break;
        }
        let payload = &bytes[pos + 8..pos + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(e) = postcard::from_bytes::<Entry>(payload) else {
            break;
        };
        out.push((e, 8 + len as u64));
        pos += 8 + len;
    }
    (out, pos)
}

impl Journal {
    /// Open (or create) the journal at `path`, replaying it.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        // The file's directory entry must be on disk before anything in it is acknowledged.
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (entries, valid) = replay(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                "queue journal: {} byte(s) of a record cut short by a crash removed",
                bytes.len() - valid
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut pending = VecDeque::new();
        let (mut next, mut live) = (1, 0);
        for (e, len) in entries {
            match e {
                Entry::Item { seq, item } => {
                    next = next.max(seq + 1);
                    pending.push_back((seq, item, len));
                    live += len;
                }
                Entry::Done { upto } => {
                    while pending.front().is_some_and(|(s, _, _)| *s <= upto) {
                        live -= pending.pop_front().map_or(0, |(_, _, len)| len);
                    }
                }
            }
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            len: valid as u64,
            pending,
            live,
            next,
            poisoned: false,
            compactions: 0,
        })
    }

    /// Append items durably (written and fsync'd) and return when they are.
    pub fn append(&mut self, items: &[QueueItem]) -> io::Result<()> {
        if self.poisoned {
            // A failed append could not be cut off: replay the file to find where it is sound.
            let fresh = Journal::open(&self.path)?;
            *self = fresh;
        }
        let mut buf = Vec::new();
        let mut lens = Vec::with_capacity(items.len());
        let first = self.next;
        for (i, item) in items.iter().enumerate() {
            let rec = record(&Entry::Item {
                seq: first + i as u64,
                item: item.clone(),
            })?;
            lens.push(rec.len() as u64);
            buf.extend(rec);
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            // A full disk may have taken part of the record: cut it off again, or every later
            // record would follow garbage and be lost at the next replay.
            let cut = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            if let Err(c) = cut {
                tracing::error!("queue journal: removing a failed append: {c}");
                self.poisoned = true;
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.live += buf.len() as u64;
        self.next += items.len() as u64;
        for (i, (item, len)) in items.iter().zip(lens).enumerate() {
            self.pending
                .push_back((first + i as u64, item.clone(), len));
        }
        Ok(())
    }

    /// Up to `max` of the oldest pending items.
    pub fn batch(&self, max: usize) -> Vec<(u64, QueueItem)> {
        self.pending
            .iter()
            .take(max)
            .map(|(seq, item, _)| (*seq, item.clone()))
            .collect()
    }

    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    /// Every item up to `upto` is done (not fsync'd: see the module doc).
    pub fn done(&mut self, upto: u64) -> io::Result<()> {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|(s, _, _)| *s <= upto) {
            self.live -= self.pending.pop_front().map_or(0, |(_, _, len)| len);
        }
        if self.pending.len() == before {
            return Ok(());
        }
        if self.pending.is_empty() && self.len > 64 * 1024 {
            // Nothing pending: start the file over. Not fsync'd, as a `Done` is not (a hook's
            // acknowledgement, which waits for this lock, never waits for it): the next
            // append's `fdatasync` makes the new length durable with its record, and a crash
            // before that brings back items that are all done, planned again and found
            // recorded.
            self.file.set_len(0)?;
            (self.len, self.live) = (0, 0);
            return Ok(());
        }
        let rec = record(&Entry::Done { upto })?;
        if let Err(e) = self.file.write_all(&rec) {
            // Not written (a full disk): the batch is planned again after a restart, and its
            // paths are found recorded. What may have been written is cut off.
            if self.file.set_len(self.len).is_err() {
                self.poisoned = true;
            }
            return Err(e);
        }
        self.len += rec.len() as u64;
        // Rewritten once half of it at least is done items: a backlog of more than
        // COMPACT_AT is not copied again at every batch.
        if self.len > COMPACT_AT.max(2 * self.live) {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrite the journal with only the pending items.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("log.new");
        let mut buf = Vec::new();
        for (seq, item, _) in &self.pending {
            buf.extend(record(&Entry::Item {
                seq: *seq,
                item: item.clone(),
            })?);
        }
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        // The old file is unlinked now: appends go to the new one from here, whatever follows
        // (appending to the old handle would acknowledge items into a deleted file).
        self.file = f;
        (self.len, self.live) = (buf.len() as u64, buf.len() as u64);
        self.compactions += 1;
        if let Some(dir) = self.path.parent()
            && let Err(e) = sync_dir(dir)
        {
            // Until the rename is on disk, a crash would bring the old file back without what
            // is appended now: nothing more is acknowledged until a reopen syncs the directory.
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    thread_local! {
        /// Directory fsyncs on this thread so far, and how many of the next ones fail.
        static DIR_SYNCS: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    }

    /// Counts a directory fsync; the error it fails with, if it is to fail.
    pub(super) fn dir_sync_fault() -> Option<io::Error> {
        let (n, fail) = DIR_SYNCS.get();
        DIR_SYNCS.set((n + 1, fail.saturating_sub(1)));
        (fail > 0).then(|| io::Error::other("injected: directory fsync failed"))
    }

    /// A compaction whose directory fsync fails (its rename may not be on disk: a crash would
    /// bring back the old file without what is appended next) reports it, and nothing more is
    /// acknowledged until the directory is fsync'd: the next append does that first, and if it
    /// fails too, that append fails. Everything acknowledged replays.
    #[test]
    fn nothing_is_acknowledged_after_a_failed_directory_fsync_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queue.log");
        let mut j = Journal::open(&p).unwrap();
        let n = 160_000;
        j.append(&(0..n).map(item).collect::<Vec<_>>()).unwrap();
        assert!(j.len > COMPACT_AT, "{}", j.len);
        let syncs = || DIR_SYNCS.get().0;

        // The compaction renames, and its directory fsync fails.
        DIR_SYNCS.set((0, 1));
        assert!(
            j.done(n as u64 - 11).is_err(),
            "the failed fsync is reported"
        );
        assert_eq!((j.compactions, syncs()), (1, 1));

        // The next append fsyncs the directory before its item is acknowledged; it fails
        // again: nothing is acknowledged.
        DIR_SYNCS.set((0, 1));
        assert!(j.append(&[item(n)]).is_err(), "acknowledged unsynced");
        assert_eq!(syncs(), 1);
        // Now it succeeds: the item is acknowledged after the directory is on disk.
        DIR_SYNCS.set((0, 0));
        j.append(&[item(n + 1)]).unwrap();
        assert_eq!(syncs(), 1, "the directory was fsync'd before the append");
        // And from here on appends need no directory fsync.
        j.append(&[item(n + 2)]).unwrap();
        assert_eq!(syncs(), 1);
        drop(j);
        let j = Journal::open(&p).unwrap();
        let items: Vec<QueueItem> = j.batch(usize::MAX).into_iter().map(|(_, i)| i).collect();
        let mut want: Vec<QueueItem> = (n - 11..n).map(item).collect();
        want.extend([item(n + 1), item(n + 2)]);
        assert_eq!(items, want);
    }

    fn item(n: usize) -> QueueItem {
        QueueItem {
            drv: None,
            outs: vec![format!("/nix/store/{n:0>32}-x")],
        }
    }

    #[test]
    fn items_survive_reopen_until_done_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queue.log");
        let mut j = Journal::open(&p).unwrap();
        j.append(&[item(1), item(2)]).unwrap();
        j.append(&[item(3)]).unwrap();
        j.done(1).unwrap();
        drop(j);
        let mut j = Journal::open(&p).unwrap();
        let seqs: Vec<u64> = j.batch(10).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![2, 3]);
        j.append(&[item(4)]).unwrap();
        assert_eq!(
            j.batch(10).last().unwrap().0,
            4,
            "sequence numbers keep growing"
        );
        drop(j);
        // A crash mid-append leaves half a record: cut off, the rest kept.
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        let j = Journal::open(&p).unwrap();
        assert_eq!(
            j.batch(10).iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn the_journal_is_compacted_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queue.log");
        let mut j = Journal::open(&p).unwrap();
        let big: Vec<QueueItem> = (0..20_000).map(item).collect();
        j.append(&big).unwrap();
        j.append(&[item(99)]).unwrap();
        j.done(20_000).unwrap();
        assert_eq!(j.depth(), 1);
        j.done(20_001).unwrap();
        assert_eq!(j.depth(), 0);
        assert!(std::fs::metadata(&p).unwrap().len() < 1024, "emptied");
        drop(j);
        assert_eq!(Journal::open(&p).unwrap().depth(), 0);
    }

    /// A backlog larger than the compaction threshold (the pipeline stalled for long) is not
    /// rewritten at every batch that completes (each rewrite copies and fsyncs all of it while
    /// every hook's acknowledgement waits), however much is appended meanwhile: only once done
    /// items are over half the file; and what was appended replays whole.
    #[test]
    fn a_large_backlog_is_not_rewritten_at_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queue.log");
        let mut j = Journal::open(&p).unwrap();
        let n = 160_000;
        let big: Vec<QueueItem> = (0..n).map(item).collect();
        j.append(&big).unwrap();
        assert!(j.len > COMPACT_AT, "{}", j.len);
        for upto in 1..=100 {
            j.done(upto).unwrap();
        }
        assert_eq!(
            j.compactions, 0,
            "nearly all of it is pending: nothing to gain"
        );
        // Items keep coming while half the backlog is done: what was appended is pending too,
        // and the file is not rewritten until done items are half of it.
        let mut upto = 100;
        let mut next = n;
        while upto < n as u64 / 2 {
            j.append(&(next..next + 100).map(item).collect::<Vec<_>>())
                .unwrap();
            next += 100;
            upto += 1000;
            j.done(upto).unwrap();
            assert!(
                j.len <= 2 * j.live + 64 * 1024,
                "{} over twice {}",
                j.len,
                j.live
            );
        }
        assert_eq!(j.compactions, 0, "half of it is still pending");
        upto += 20_000;
        j.done(upto).unwrap();
        assert_eq!(j.compactions, 1, "done items are over half of it");
        assert_eq!(j.len, j.live);
        let depth = j.depth();
        assert_eq!(depth as u64, next as u64 - upto);
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.depth(), depth);
        assert_eq!(j.batch(usize::MAX).last().unwrap().1, item(next - 1));
    }

    proptest! {
        #[test]
        fn garbage_replays_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = replay(&bytes);
        }
    }
}
