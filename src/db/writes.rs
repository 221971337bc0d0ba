//! The database's writes in flight, for [`crate::watchdog`]: every write transaction is begun
//! here and counted from the moment it asks for redb's write lock until it commits or is
//! dropped. redb runs one write at a time, so a write that never ends (a disk that does not
//! answer its fsync, a writer blocked while it holds its transaction) holds up every other:
//! the pipeline, the mesh, the storage and the mirror all wait behind it while every runtime
//! still answers. What the watchdog watches is how long the database has had writes in flight
//! with none ending ([`stalled_for`]): a busy database whose writes queue up for long (redb's
//! write lock is not first come, first served) still ends one after another, and is not hung.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{Database, Durability};

use super::DbError;

struct State {
    /// The writes in flight in this process, by number: when each began, and where.
    in_flight: BTreeMap<u64, (Instant, &'static Location<'static>)>,
    next: u64,
    /// When a write last ended.
    last_end: Option<Instant>,
}

static STATE: Mutex<State> = Mutex::new(State {
    in_flight: BTreeMap::new(),
    next: 0,
    last_end: None,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long the database has had writes in flight and none ended (since the oldest began, or
/// the last one ended if that was later), and where the oldest began; `None` with none in
/// flight.
pub fn stalled_for() -> Option<(Duration, &'static Location<'static>)> {
    let st = state();
    let (began, at) = st.in_flight.values().min_by_key(|(t, _)| *t)?;
    let since = st.last_end.map_or(*began, |e| e.max(*began));
    Some((since.elapsed(), at))
}

/// One write in flight: counted until it is dropped.
struct InFlight(u64);

impl InFlight {
    #[track_caller]
    fn new() -> Self {
        let mut st = state();
        let n = st.next;
        st.next += 1;
        st.in_flight.insert(n, (Instant::now(), Location::caller()));
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = state();
        st.in_flight.remove(&self.0);
        st.last_end = Some(Instant::now());
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
        #[cfg(test)]
        COMMITS.set(COMMITS.get() + 1);
        self.tx.commit()
    }

    pub(super) fn abort(self) -> Result<(), redb::StorageError> {
        self.tx.abort()
    }
}

/// Begin a write transaction (redb's default durability).
#[track_caller]
pub(super) fn begin(db: &Database) -> Result<Write, DbError> {
    let in_flight = InFlight::new();
    let tx = db.begin_write()?;
    Ok(Write {
        tx,
        _in_flight: in_flight,
    })
}

/// Begin a write transaction whose commit is fsync'd before it returns.
#[track_caller]
pub(super) fn durable(db: &Database) -> Result<Write, DbError> {
    let mut tx = begin(db)?;
    tx.set_durability(Durability::Immediate)?;
    Ok(tx)
}

#[cfg(test)]
thread_local! {
    /// Commits begun on this thread, for tests of how work is split into writes.
    pub(super) static COMMITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write is counted from its start until it commits or is dropped, and names where it
    /// began; the database has stalled only while writes are in flight and none ends.
    #[test]
    fn writes_are_counted_while_in_flight_and_one_ending_is_progress() {
        let t = tempfile::tempdir().unwrap();
        let db = Database::create(t.path().join("db")).unwrap();
        // Other tests write meanwhile: this one looks at its own writes, and at the verdict
        // only while it holds the state.
        let mine = |w: &Write| state().in_flight.get(&w._in_flight.0).copied();
        let w = begin(&db).unwrap();
        let (began, at) = mine(&w).expect("counted");
        assert!(at.file().ends_with("writes.rs"), "{at}");
        let n = w._in_flight.0;
        w.commit().unwrap();
        assert!(!state().in_flight.contains_key(&n), "gone at commit");
        let w = durable(&db).unwrap();
        assert!(mine(&w).unwrap().0 > began);
        let n = w._in_flight.0;
        drop(w);
        assert!(!state().in_flight.contains_key(&n), "gone when dropped");
        // One write in flight for long, another ending now: no stall.
        let mut st = state();
        let long_ago = Instant::now().checked_sub(Duration::from_secs(60)).unwrap();
        st.in_flight
            .insert(u64::MAX, (long_ago, Location::caller()));
        st.last_end = Some(Instant::now());
        drop(st);
        let (stalled, _) = stalled_for().unwrap();
        assert!(stalled < Duration::from_secs(60), "{stalled:?}");
        let mut st = state();
        st.in_flight.remove(&u64::MAX);
    }
}
