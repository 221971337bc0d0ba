//! One NAR being fetched, as its readers see it: how far its verified prefix has got, whether
//! it ended, the file the verified bytes are read from, and a stream of those bytes in order.

use std::fs::File;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::chunks::GROUP;

/// Where a transfer stands, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes from the start that are verified and written.
    pub verified: u64,
    /// `Some` once over.
    pub done: Option<Result<(), String>>,
}

/// One NAR being fetched.
#[derive(Debug)]
pub struct Transfer {
    pub blake3: [u8; 32],
    pub size: u64,
    progress: watch::Sender<Progress>,
    /// The partial file (kept open by readers after it becomes the NAR file).
    file: Mutex<Option<Arc<File>>>,
    /// Where its readers are (pages they all passed leave the page cache).
    pub(super) readers: Arc<super::super::behind::Readers>,
    /// What to fetch, until the task that runs it takes it: the task queued with it, or an
    /// earlier one queued for the same NAR whose readers all left meanwhile (a client that
    /// had its 502 and asks again keeps its place in the queue). Shared with its own queued
    /// task, which so knows whether an earlier one took it.
    pub(super) job: Job,
}

/// What a transfer fetches, until a task takes it to run; while in there, the transfer counts
/// as waiting for a slot (`narmesh_mesh_transfers_queued`).
pub(super) type Job = Arc<Mutex<Option<(super::Want, crate::metrics::Counted)>>>;

impl Transfer {
    /// A transfer of `want`'s NAR with nothing verified yet and no file, `waiting` for a slot.
    pub(super) fn new(want: super::Want, waiting: crate::metrics::Counted) -> Self {
        Transfer {
            blake3: want.claim.blake3,
            size: want.claim.nar_size,
            job: Arc::new(Mutex::new(Some((want, waiting)))),
            progress: watch::Sender::new(Progress {
                verified: 0,
                done: None,
            }),
            file: Mutex::new(None),
            readers: Default::default(),
        }
    }

    /// What to fetch, to the first task that asks: `None` once one took it.
    pub(super) fn take_job(&self) -> Option<super::Want> {
        take(&self.job)
    }

    /// The file verified bytes are written to and read from.
    pub(super) fn set_file(&self, file: Arc<File>) {
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The file verified bytes are read from, once the transfer has one.
    pub fn file(&self) -> Option<Arc<File>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn advance(&self, verified: u64) {
        self.progress.send_if_modified(|p| {
            if verified > p.verified {
                p.verified = verified;
                true
            } else {
                false
            }
        });
    }

    pub(super) fn end(&self, result: Result<(), String>) {
        self.progress.send_modify(|p| p.done = Some(result));
    }

    /// The verified bytes, in order and in pieces of at most 1 MiB, as they become verified;
    /// `guard` lives as long as the reader. A failed transfer ends the stream with its error.
    /// With `whole`, the stream's end (not its last piece) also waits for the transfer's end,
    /// so a reader that takes the end as complete (like the mirror) has a NAR whose sha256
    /// matched the signed NarHash; without, it ends with the last verified byte (the local Nix
    /// checks the NarHash itself).
    ///
    /// A piece is read once the stream has room for it, under a share of `budget` (as the
    /// storage's own reads are: see [`crate::storage::ReadBudget`]).
    pub fn follow(
        self: &Arc<Self>,
        budget: crate::storage::ReadBudget,
        guard: impl Send + 'static,
        whole: bool,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, String>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (t, mut progress) = (self.clone(), self.progress());
        let cursor = self.readers.cursor();
        tokio::spawn(async move {
            let _guard = guard;
            let mut pos = 0u64;
            loop {
                let p = progress.borrow_and_update().clone();
                if p.verified > pos {
                    // The reader's pace: an async wait, no piece held.
                    let Ok(slot) = tx.reserve().await else {
                        return;
                    };
                    let Some(file) = t.file() else {
                        slot.send(Err("the transfer has no file".into()));
                        return;
                    };
                    let share = budget.take((p.verified - pos).div_ceil(GROUP));
                    let to = p.verified.min(pos + share.groups() * GROUP);
                    let read = tokio::task::spawn_blocking(move || {
                        crate::fsutil::read_vec_at(&file, pos, (to - pos) as usize)
                    })
                    .await;
                    let piece = match read {
                        Ok(Ok(b)) => {
                            let len = b.len();
                            Ok(share.piece(b, 0..len))
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = piece.is_err();
                    if !failed {
                        cursor.set(to);
                    }
                    slot.send(piece);
                    if failed {
                        return;
                    }
                    pos = to;
                    continue;
                }
                match p.done {
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Some(Ok(())) => {
                        if pos < t.size {
                            let _ = tx.send(Err("the fetch ended short".into())).await;
                        }
                        return;
                    }
                    None if pos >= t.size && !whole => return,
                    None => {}
                }
                if progress.changed().await.is_err() {
                    let _ = tx.send(Err("the fetch ended".into())).await;
                    return;
                }
            }
        });
        rx
    }
}

/// What `job` holds, taken out (no longer waiting): `None` if a task took it before.
pub(super) fn take(job: &Job) -> Option<super::Want> {
    let taken = job.lock().unwrap_or_else(|p| p.into_inner()).take();
    taken.map(|(want, _waiting)| want)
}

/// Ends a transfer in error if its task stops before ending it, so no reader waits for ever
/// (weak: a transfer nobody holds has no reader to tell).
pub(super) struct EndOnDrop(pub(super) std::sync::Weak<Transfer>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let Some(t) = self.0.upgrade() else {
            return;
        };
        t.progress.send_if_modified(|p| {
            if p.done.is_none() {
                p.done = Some(Err("the transfer stopped".into()));
                true
            } else {
                false
            }
        });
    }
}
