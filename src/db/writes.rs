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

/// One write in flight: when it began (asked for the write lock), where, and whether it holds
/// the lock (at most one does).
#[derive(Debug, Clone, Copy)]
struct Entry {
    began: Instant,
    at: &'static Location<'static>,
    holds: bool,
}

struct State {
    /// The writes in flight in this process, by number.
    in_flight: BTreeMap<u64, Entry>,
    next: u64,
    /// When a write that held the lock last ended.
    last_end: Option<Instant>,
}

impl State {
    const fn new() -> Self {
        State {
            in_flight: BTreeMap::new(),
            next: 0,
            last_end: None,
        }
    }

    fn begin(&mut self, at: &'static Location<'static>, now: Instant) -> u64 {
        let n = self.next;
        self.next += 1;
        let holds = false;
        self.in_flight.insert(
            n,
            Entry {
                began: now,
                at,
                holds,
            },
        );
        n
    }

    /// Write `n` got the lock.
    fn holds(&mut self, n: u64) {
        if let Some(e) = self.in_flight.get_mut(&n) {
            e.holds = true;
        }
    }

    /// Write `n` ended: committed, aborted or dropped, or it never got the lock (redb refused
    /// it at once, as after an I/O error: that is no progress, and a hung holder stays seen).
    fn end(&mut self, n: u64, now: Instant) {
        if self.in_flight.remove(&n).is_some_and(|e| e.holds) {
            self.last_end = Some(now);
        }
    }

    /// See [`stalled_for`].
    fn stalled_for(&self, now: Instant) -> Option<Stalled> {
        let oldest = self.in_flight.values().min_by_key(|e| e.began)?;
        let since = self.last_end.map_or(oldest.began, |e| e.max(oldest.began));
        let holder = self.in_flight.values().find(|e| e.holds);
        Some(Stalled {
            waited: now.saturating_duration_since(since),
            at: holder.unwrap_or(oldest).at,
            holds: holder.is_some(),
        })
    }
}

static STATE: Mutex<State> = Mutex::new(State::new());

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The database's writes as the watchdog sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    /// How long writes have been in flight and none that held the lock ended (since the oldest
    /// began, or the last one ended if that was later).
    pub waited: Duration,
    /// Where the write holding the lock began, or (none holds it) the oldest.
    pub at: &'static Location<'static>,
    pub holds: bool,
}

/// The database's writes in flight, if any are: how long with none ending, and which.
pub fn stalled_for() -> Option<Stalled> {
    state().stalled_for(Instant::now())
}

/// One write in flight: counted until it is dropped.
struct InFlight(u64);

impl InFlight {
    #[track_caller]
    fn new() -> Self {
        InFlight(state().begin(Location::caller(), Instant::now()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        state().end(self.0, Instant::now());
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
    state().holds(in_flight.0);
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
    /// began.
    #[test]
    fn writes_are_counted_while_in_flight() {
        let t = tempfile::tempdir().unwrap();
        let db = Database::create(t.path().join("db")).unwrap();
        // Other tests write meanwhile: this one looks at its own writes only.
        let mine = |w: &Write| state().in_flight.get(&w._in_flight.0).copied();
        let w = begin(&db).unwrap();
        let e = mine(&w).expect("counted");
        assert!(e.holds && e.at.file().ends_with("writes.rs"), "{e:?}");
        let n = w._in_flight.0;
        w.commit().unwrap();
        assert!(!state().in_flight.contains_key(&n), "gone at commit");
        let w = durable(&db).unwrap();
        assert!(mine(&w).unwrap().began > e.began);
        let n = w._in_flight.0;
        drop(w);
        assert!(!state().in_flight.contains_key(&n), "gone when dropped");
    }

    /// Writes stall the database while in flight with none that held the lock ending: one
    /// ending is progress, one refused at once (an I/O error) is not, and the holder is named.
    #[test]
    fn a_write_that_held_the_lock_ending_is_progress() {
        let (here, s) = (Location::caller(), Duration::from_secs);
        let t0 = Instant::now();
        let mut st = State::new();
        assert_eq!(st.stalled_for(t0), None);
        let waiting = st.begin(here, t0);
        let there = Location::caller();
        let holder = st.begin(there, t0 + s(1));
        st.holds(holder);
        let seen = st.stalled_for(t0 + s(60)).unwrap();
        assert_eq!(
            (seen.waited, seen.holds, seen.at),
            (s(60), true, there),
            "the holder"
        );
        // Refused at once: not progress.
        let refused = st.begin(here, t0 + s(59));
        st.end(refused, t0 + s(59));
        assert_eq!(st.stalled_for(t0 + s(60)).unwrap().waited, s(60));
        // The holder ends: progress; the waiting one is the oldest, holding nothing.
        st.end(holder, t0 + s(58));
        let seen = st.stalled_for(t0 + s(60)).unwrap();
        assert_eq!((seen.waited, seen.holds, seen.at), (s(2), false, here));
        st.end(waiting, t0 + s(60));
        assert_eq!(st.stalled_for(t0 + s(60)), None);
    }
}
