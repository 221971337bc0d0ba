//! The storage's housekeeping: own paths checked against the local Nix store whenever a path
//! left it (Nix GC or `nix-store --delete` removes paths this node serves from it: they stop
//! being held, and peers learn it; builds only add, and cost one count), last-used times written back in batches, the
//! disk's free-space floor kept, and pinned closures recomputed (paths recorded after a pin
//! join it).

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Storage, StorageError};
use crate::nix::StorePath;

/// How often last-used times are written back and the free-space floor checked.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How often pinned closures are recomputed while there are pins.
const PINS_EVERY: Duration = Duration::from_secs(60);

/// What tells that the store database changed: the size and time of its file and its WAL.
fn store_stamp(storage: &Storage) -> Option<Vec<(u64, SystemTime)>> {
    let db = crate::nix::store_db::db_path(storage.inner.store.root());
    let mut out = Vec::new();
    for p in [db.clone(), db.with_extension("sqlite-wal")] {
        match std::fs::metadata(&p) {
            Ok(m) => out.push((m.len(), m.modified().ok()?)),
            Err(_) => out.push((0, SystemTime::UNIX_EPOCH)),
        }
    }
    Some(out)
}

pub(super) async fn run(storage: Storage, cancel: CancellationToken) {
    let mut last_stamp = None;
    // The store's removals mark as of the last full check of own paths.
    let mut mark = None;
    let mut next_check = tokio::time::Instant::now();
    let mut next_flush = tokio::time::Instant::now() + FLUSH_EVERY;
    let mut next_pins = tokio::time::Instant::now() + PINS_EVERY;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next_check.min(next_flush).min(next_pins)) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= next_check {
            next_check = now + storage.inner.cfg.gc_interval;
            let stamp = store_stamp(&storage);
            if stamp.is_none() || stamp != last_stamp {
                let s = storage.clone();
                let checked = tokio::task::spawn_blocking(move || s.check_own_paths(mark))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match checked {
                    Ok(m) => (last_stamp, mark) = (stamp, m),
                    // What it took of the paths recorded lately is checked with the rest next
                    // time.
                    Err(e) => {
                        tracing::warn!("storage: checking own paths: {e}");
                        mark = None;
                    }
                }
            }
        }
        if now >= next_flush {
            next_flush = now + FLUSH_EVERY;
            let s = storage.clone();
            let _ = tokio::task::spawn_blocking(move || s.flush_and_trim()).await;
        }
        if now >= next_pins {
            next_pins = now + PINS_EVERY;
            let s = storage.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let any = s.inner.db.pins().is_ok_and(|p| !p.is_empty())
                    || s.inner.db.unpinned(1).is_ok_and(|u| !u.is_empty());
                if (any || !s.inner.lock().pinned.is_empty())
                    && let Err(e) = s.refresh_pins()
                {
                    tracing::warn!("storage: pinned closures: {e}");
                }
            })
            .await;
        }
    }
    let _ = tokio::task::spawn_blocking(move || storage.flush_touched()).await;
}

impl Storage {
    /// Own paths no longer valid in the local store stop being held. All of them are looked
    /// up unless the store's removals mark is still `since` (nothing left the store since the
    /// check that saw it: a busy build host's store changes with every build, and it may hold
    /// a great many own paths); then only those recorded since the last check are (one
    /// removed before it was recorded leaves the mark as it was). Returns the mark as it was
    /// before this check looked (`since` if there are no own paths: a path recorded later and
    /// deleted lowers the mark below it). Blocking.
    pub fn check_own_paths(&self, since: Option<i64>) -> Result<Option<i64>, StorageError> {
        if self.inner.db.storage_counters()?.own_paths == 0 {
            // Nothing to lose (and a node that builds nothing needs no store database).
            let _ = self.inner.db.take_recent_own();
            return Ok(since);
        }
        let store_err = |e: crate::nix::store_db::StoreDbError| StorageError::Task(e.to_string());
        let mark = self
            .inner
            .store
            .with(|db| db.removals_mark())
            .map_err(store_err)?;
        // Taken after the mark is read: a path recorded later is in the next check's.
        let recent = self.inner.db.take_recent_own();
        let own = match recent {
            Some(recent) if mark.is_some() && mark == since => {
                if recent.is_empty() {
                    return Ok(mark);
                }
                recent
            }
            _ => {
                self.inner.metrics.storage_own_checks.inc();
                self.inner.db.own_paths()?
            }
        };
        if own.is_empty() {
            return Ok(mark);
        }
        let parsed: Vec<Option<StorePath>> = own
            .iter()
            .map(|(_, _, p)| StorePath::parse(p).ok())
            .collect();
        let valid: Vec<bool> = self
            .inner
            .store
            .with(|db| {
                parsed
                    .iter()
                    .map(|p| match p {
                        Some(p) => db.is_valid(p),
                        None => Ok(false),
                    })
                    .collect()
            })
            .map_err(store_err)?;
        let lost: Vec<([u8; 32], String)> = own
            .into_iter()
            .zip(valid)
            .filter(|(_, v)| !v)
            .map(|((b, h, p), _)| {
                tracing::info!("storage: {p} left the local Nix store; no longer served from it");
                (b, h)
            })
            .collect();
        if lost.is_empty() {
            return Ok(mark);
        }
        for (b, _) in &lost {
            self.inner.layouts.remove(b);
        }
        self.inner.db.own_lost(&lost)?;
        self.publish();
        Ok(mark)
    }

    /// Write back last-used times, then evict what is over the cap or under the floor, even
    /// if the times could not be written: on a full disk, where they cannot, what eviction
    /// deletes is what frees space.
    pub(super) fn flush_and_trim(&self) {
        let (flushed, trimmed) = (self.flush_touched(), self.trim());
        for e in [flushed.err(), trimmed.err()].into_iter().flatten() {
            tracing::warn!("storage: {e}");
        }
        self.publish();
    }

    /// Write back last-used times. Those a failed write (a full disk) did not write wait for
    /// the next flush: the eviction order after a restart is read from them.
    pub(super) fn flush_touched(&self) -> Result<(), StorageError> {
        let touched = std::mem::take(&mut self.inner.lock().touched);
        let rows: Vec<([u8; 32], u64)> = touched.iter().map(|(b, t)| (*b, *t)).collect();
        if let Err(e) = write_touched(&self.inner.db, &rows) {
            let mut st = self.inner.lock();
            for (b, t) in touched {
                let kept = st.touched.entry(b).or_insert(t);
                *kept = (*kept).max(t);
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// Write last-used times to the database (a unit test may make it fail).
fn write_touched(db: &crate::db::Db, rows: &[([u8; 32], u64)]) -> Result<(), crate::db::DbError> {
    #[cfg(test)]
    if TOUCH_WRITE_FAILS.get() {
        return Err(crate::db::DbError::Closed);
    }
    db.touch_nar_files(rows)
}

#[cfg(test)]
thread_local! {
    /// Writes of last-used times on this thread fail while set.
    pub(super) static TOUCH_WRITE_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
