//! The database's writes in flight, for [`crate::watchdog`]: every write transaction is begun
//! here and counted from the moment it asks for redb's write lock until it commits or is
//! dropped. redb runs one write at a time, so a write that never ends (a disk that does not
//! answer its fsync, a writer blocked while it holds its transaction) holds up every other:
//! the pipeline, the mesh, the storage and the mirror all wait behind it while every runtime
//! still answers. How long the oldest write has been in flight is what the watchdog watches.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, Durability};

use super::DbError;

/// The writes in flight in this process, by number: when each began.
static IN_FLIGHT: Mutex<BTreeMap<u64, Instant>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How long the oldest write in flight has been, if any is.
pub fn oldest() -> Option<Duration> {
    let writes = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
    writes.values().min().map(Instant::elapsed)
}

/// One write in flight: counted until it is dropped.
struct InFlight(u64);

impl InFlight {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut writes = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        writes.insert(n, Instant::now());
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut writes = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        writes.remove(&self.0);
    }
}

/// A write transaction, counted while it is in flight.
pub(super) struct Write {
    tx: redb::WriteTransaction,
    _in_flight: InFlight,
}

impl Deref for Write {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl DerefMut for Write {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Write {
    pub(super) fn commit(self) -> Result<(), redb::CommitError> {
        self.tx.commit()
    }

    pub(super) fn abort(self) -> Result<(), redb::StorageError> {
        self.tx.abort()
    }
}

/// Begin a write transaction (redb's default durability).
pub(super) fn begin(db: &Database) -> Result<Write, DbError> {
    let in_flight = InFlight::new();
    let tx = db.begin_write()?;
    Ok(Write {
        tx,
        _in_flight: in_flight,
    })
}

/// Begin a write transaction whose commit is fsync'd before it returns.
pub(super) fn durable(db: &Database) -> Result<Write, DbError> {
    let mut tx = begin(db)?;
    tx.set_durability(Durability::Immediate)?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write is counted from its start until it commits or is dropped; the oldest one is
    /// what is told.
    #[test]
    fn writes_are_counted_while_in_flight() {
        let t = tempfile::tempdir().unwrap();
        let db = Database::create(t.path().join("db")).unwrap();
        // Other tests write meanwhile: only this one's own writes are looked at.
        let mine = |w: &Write| {
            let writes = IN_FLIGHT.lock().unwrap();
            writes.get(&w._in_flight.0).copied()
        };
        let w = begin(&db).unwrap();
        let began = mine(&w).expect("counted");
        std::thread::sleep(Duration::from_millis(20));
        assert!(oldest().unwrap() >= Duration::from_millis(20));
        let n = w._in_flight.0;
        w.commit().unwrap();
        assert!(
            !IN_FLIGHT.lock().unwrap().contains_key(&n),
            "gone at commit"
        );
        let w = durable(&db).unwrap();
        assert!(mine(&w).unwrap() > began);
        let n = w._in_flight.0;
        drop(w);
        assert!(
            !IN_FLIGHT.lock().unwrap().contains_key(&n),
            "gone when dropped"
        );
    }
}
