//! The redb file's handle, which outlives I/O errors. After a failed write (a full disk, a
//! flaky device) redb refuses every later call with "Previous I/O error occurred" until the
//! file is closed and opened again; this handle does that, so a node whose disk filled up
//! carries on by itself once space is freed. Opening again is also redb's repair of a
//! half-written commit: what was committed before the error is kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::Database;

use super::DbError;

/// I/O errors seen from redb by any handle in this process (errors carry no handle, so the
/// count is global; a handle that did not fail merely reopens once more than it needed).
static IO_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Note an error on its way out: I/O errors ask every handle to reopen its file.
pub(super) fn note(e: &redb::Error) {
    if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
        IO_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often a failing file is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// How long a reopen waits for the transactions still running on the old handle.
const DRAIN: Duration = Duration::from_secs(2);

struct Slot {
    db: Option<Arc<Database>>,
    /// [`IO_FAILURES`] when the file was last opened.
    seen: u64,
    tried: Option<Instant>,
}

pub(super) struct Handle {
    path: PathBuf,
    cache_bytes: usize,
    slot: Mutex<Slot>,
}

impl Handle {
    pub(super) fn open(path: &Path, cache_bytes: usize) -> Result<Self, DbError> {
        let seen = IO_FAILURES.load(Ordering::Relaxed);
        let db = open(path, cache_bytes)?;
        Ok(Handle {
            path: path.to_owned(),
            cache_bytes,
            slot: Mutex::new(Slot {
                db: Some(Arc::new(db)),
                seen,
                tried: None,
            }),
        })
    }

    /// The open database, opened again first if an I/O error was seen since.
    pub(super) fn get(&self) -> Result<Arc<Database>, DbError> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let failures = IO_FAILURES.load(Ordering::Relaxed);
        let stale = slot.db.is_none() || slot.seen != failures;
        if stale && slot.tried.is_none_or(|t| t.elapsed() >= RETRY_EVERY) {
            slot.tried = Some(Instant::now());
            self.reopen(&mut slot, failures);
        }
        slot.db.clone().ok_or(DbError::Closed)
    }

    fn reopen(&self, slot: &mut Slot, failures: u64) {
        if let Some(old) = slot.db.take() {
            // Transactions still running on the old handle end by themselves; one that waits
            // for this lock would wait for ever, so give up after a while and try later.
            let deadline = Instant::now() + DRAIN;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            match Arc::try_unwrap(old) {
                Ok(db) => drop(db),
                Err(old) => {
                    slot.db = Some(old);
                    return;
                }
            }
        }
        match open(&self.path, self.cache_bytes) {
            Ok(db) => {
                tracing::info!(
                    "node database {} opened again after an I/O error",
                    self.path.display()
                );
                slot.db = Some(Arc::new(db));
                slot.seen = failures;
            }
            Err(e) => tracing::warn!("opening the node database again: {e}"),
        }
    }
}

fn open(path: &Path, cache_bytes: usize) -> Result<Database, DbError> {
    Ok(redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)?)
}
