//! A transfer's page-cache footprint. Verified bytes are handed to the kernel's writeback as they
//! arrive (so the file is on disk by the final fsync, not all written then), and the pages that
//! every reader of the transfer has passed (the sha256 and each follower: the local Nix, the
//! mirror) are dropped from the page cache. A NAR fetched from a peer then moves through a few
//! dozen MiB of cache instead of its whole size: a build host's cache keeps the build's files,
//! and the cache's pages are reused rather than new ones taken (on a VM every page the guest has
//! not touched lately costs a host fault: BENCHMARKS.md, the 10 Gbit/s link). The bytes stay in
//! the NAR file: a dropped page is read from disk again by whoever asks for it later.
//!
//! Advice only: what a reader reads never changes, and a failed call is logged and ignored. The
//! task giving it ends by itself, like the transfer's other tasks: at a failed end, or once the
//! transfer is over and its last reader left.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd as _;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::transfer::Progress;

/// Verified bytes are handed to writeback this many at a time (or at the end).
const WRITE_STEP: u64 = 4 << 20;
/// Pages are dropped this far behind the slowest reader (time for their writeback to end: a
/// page still dirty is not dropped)...
const LAG: u64 = 16 << 20;
/// ...this many at a time.
const DROP_STEP: u64 = 8 << 20;

/// Whether a NAR of `size` bytes is worth the advice (smaller ones are written and fsync'd at
/// once).
pub fn worth(size: u64) -> bool {
    size > WRITE_STEP
}

/// Where each reader of a transfer is.
#[derive(Debug, Default)]
pub struct Readers {
    at: Mutex<Places>,
    moved: Notify,
}

/// Each reader's place, by its id.
#[derive(Debug, Default)]
struct Places {
    next_id: u64,
    at: HashMap<u64, u64>,
}

impl Readers {
    /// A new reader, at the start.
    pub fn cursor(self: &Arc<Self>) -> Cursor {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        let id = at.next_id;
        at.next_id += 1;
        at.at.insert(id, 0);
        Cursor {
            readers: self.clone(),
            id,
        }
    }

    /// How far the slowest reader has got (`None`: no reader).
    fn slowest(&self) -> Option<u64> {
        let at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        at.at.values().min().copied()
    }
}

/// One reader's place; it stops counting when dropped.
#[derive(Debug)]
pub struct Cursor {
    readers: Arc<Readers>,
    id: u64,
}

impl Cursor {
    /// The reader has everything before `pos` (read into memory, or hashed).
    pub fn set(&self, pos: u64) {
        let mut at = self.readers.at.lock().unwrap_or_else(|p| p.into_inner());
        at.at.insert(self.id, pos);
        drop(at);
        self.readers.moved.notify_one();
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        let mut at = self.readers.at.lock().unwrap_or_else(|p| p.into_inner());
        at.at.remove(&self.id);
        drop(at);
        self.readers.moved.notify_one();
    }
}

/// A byte range of the file, `from..to`.
type Span = (u64, u64);

/// What to advise next, given where the transfer and its readers are; moves the marks.
fn next(
    verified: u64,
    done: bool,
    slowest: Option<u64>,
    (written, dropped): (&mut u64, &mut u64),
) -> (Option<Span>, Option<Span>) {
    let write = (verified >= *written + WRITE_STEP || (done && verified > *written)).then(|| {
        let r = (*written, verified);
        *written = verified;
        r
    });
    // Never past what was handed to writeback, nor past the slowest reader less the lag.
    let upto = slowest
        .unwrap_or(0)
        .min(*written)
        .saturating_sub(LAG)
        .div_euclid(4096)
        * 4096;
    let drop = (upto >= *dropped + DROP_STEP).then(|| {
        let r = (*dropped, upto);
        *dropped = upto;
        r
    });
    (write, drop)
}

/// Advise the kernel on `file` while the transfer runs and its readers read. The sha256's cursor
/// must exist before this starts (no reader at all means nothing is dropped). After a successful
/// end the NAR file is fsync'd, so its pages are clean: they go right behind each reader, and
/// all of them once the last reader left (pages that were still dirty when first asked go then).
pub async fn run(
    file: Arc<File>,
    size: u64,
    readers: Arc<Readers>,
    mut progress: watch::Receiver<Progress>,
) {
    let (mut written, mut dropped) = (0u64, 0u64);
    loop {
        let p = progress.borrow_and_update().clone();
        let over = match &p.done {
            Some(Err(_)) => return,
            Some(Ok(())) => true,
            None => false,
        };
        let slowest = readers.slowest();
        let before = dropped;
        let (write, mut drop) = next(p.verified, over, slowest, (&mut written, &mut dropped));
        let last = over && slowest.is_none();
        if over {
            // Clean pages: no lag (from where the last drop ended, so the lagged one just
            // planned is part of it); with no reader left, the whole file.
            let upto = if last { size } else { slowest.unwrap_or(0) };
            drop = (upto > before || last).then_some((if last { 0 } else { before }, upto));
            dropped = dropped.max(upto);
        }
        if write.is_some() || drop.is_some() {
            let f = file.clone();
            let _ = tokio::task::spawn_blocking(move || advise(&f, write, drop)).await;
        }
        if last {
            return;
        }
        if over {
            readers.moved.notified().await;
            continue;
        }
        tokio::select! {
            r = progress.changed() => if r.is_err() { return },
            _ = readers.moved.notified() => {}
        }
    }
}

fn advise(file: &File, write: Option<Span>, drop: Option<Span>) {
    let (write, drop) = (write.filter(|(a, b)| b > a), drop.filter(|(a, b)| b > a));
    if let Some((from, to)) = write {
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            tracing::debug!(
                "mesh: writeback of a NAR being fetched: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if let Some((from, to)) = drop
        && let Err(e) = rustix::fs::fadvise(
            file,
            from,
            NonZeroU64::new(to - from),
            rustix::fs::Advice::DontNeed,
        )
    {
        tracing::debug!("mesh: dropping the cached pages of a NAR being fetched: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pages_go_behind_the_slowest_reader_and_after_their_writeback() {
        let (mut w, mut d) = (0, 0);
        // 3 MiB verified: too little to hand over yet.
        assert_eq!(
            next(3 << 20, false, Some(0), (&mut w, &mut d)),
            (None, None)
        );
        // 40 MiB verified, the slowest reader at 10 MiB: written, nothing dropped.
        let (write, drop) = next(40 << 20, false, Some(10 << 20), (&mut w, &mut d));
        assert_eq!((write, drop), (Some((0, 40 << 20)), None));
        // The slowest at 30 MiB: dropped up to 14 MiB.
        let (write, drop) = next(40 << 20, false, Some(30 << 20), (&mut w, &mut d));
        assert_eq!((write, drop), (None, Some((0, 14 << 20))));
        // A reader that joins at 0 holds everything from here.
        assert_eq!(
            next(48 << 20, false, Some(0), (&mut w, &mut d)),
            (Some((40 << 20, 48 << 20)), None)
        );
        // No reader: nothing dropped. The end hands over the rest.
        assert_eq!(
            next(49 << 20, true, None, (&mut w, &mut d)),
            (Some((48 << 20, 49 << 20)), None)
        );
    }

    proptest! {
        /// Whatever the readers do, a page is dropped only once written back, behind every
        /// reader by the lag, and never twice.
        #[test]
        fn drops_stay_behind(steps in proptest::collection::vec((0u64..1 << 30, any::<bool>(), proptest::option::of(0u64..1 << 30)), 1..60)) {
            let (mut w, mut d) = (0u64, 0u64);
            let mut verified = 0;
            for (v, done, slowest) in steps {
                verified = verified.max(v);
                let slowest = slowest.map(|s| s.min(verified));
                let before = (w, d);
                let (write, drop) = next(verified, done, slowest, (&mut w, &mut d));
                if let Some((a, b)) = write {
                    prop_assert_eq!(a, before.0);
                    prop_assert!(b > a && b == verified);
                }
                if let Some((a, b)) = drop {
                    prop_assert_eq!(a, before.1);
                    prop_assert!(b > a && b % 4096 == 0);
                    prop_assert!(b + LAG <= slowest.unwrap());
                    prop_assert!(b + LAG <= w);
                }
            }
        }
    }
}
