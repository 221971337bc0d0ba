//! What the mirror uploads next: a pure state machine fed events (a path taken in, its NAR now
//! held here, an upload done or failed), with no I/O, so the order the bucket sees is tested
//! on its own. A NAR goes up once it is held; a narinfo once its NAR is in the bucket and the
//! narinfos of all its references are (references signed upstream excepted). A reverse index
//! of referrers makes a completed path wake exactly the paths waiting for it: the cost of an
//! event does not grow with the backlog.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use crate::db::MirrorState;

/// Longest wait before retrying a failed path.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One upload to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Compress the NAR and put it in the bucket.
    Nar(String),
    /// Put the narinfo in the bucket.
    Narinfo(String),
}

#[derive(Debug)]
struct Item {
    /// Log order: ties go to the path taken in first.
    order: u64,
    state: MirrorState,
    /// The NAR is held here, or arriving from peers (readable as it comes); else the mirror
    /// waits for it.
    local: bool,
    /// References whose narinfos are not in the bucket yet.
    missing: usize,
    busy: bool,
    failures: u32,
    nar_size: u64,
}

/// The mirror's plan.
#[derive(Debug, Default)]
pub struct Plan {
    items: HashMap<String, Item>,
    /// Referrers waiting for each path's narinfo.
    waiting_on: HashMap<String, Vec<String>>,
    nar_ready: BTreeSet<(u64, String)>,
    narinfo_ready: BTreeSet<(u64, String)>,
    /// Failed paths waiting to be tried again: (when, order, hash).
    delayed: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_order: u64,
    /// NAR bytes of the paths whose NAR is not in the bucket yet.
    pending_bytes: u64,
}

impl Plan {
    /// Take in a path in `state`; `missing` are its references (not itself, not signed
    /// upstream) whose narinfos are not known to be in the bucket.
    pub fn add(
        &mut self,
        hash: &str,
        state: MirrorState,
        local: bool,
        nar_size: u64,
        missing: &[String],
    ) {
        if state == MirrorState::Done || self.items.contains_key(hash) {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        let mut count = 0;
        for r in missing {
            if r == hash {
                continue;
            }
            self.waiting_on
                .entry(r.clone())
                .or_default()
                .push(hash.to_owned());
            count += 1;
        }
        if state == MirrorState::Pending {
            self.pending_bytes += nar_size;
        }
        self.items.insert(
            hash.to_owned(),
            Item {
                order,
                state,
                local,
                missing: count,
                busy: false,
                failures: 0,
                nar_size,
            },
        );
        self.wake(hash);
    }

    /// True if the plan knows this path (not yet complete in the bucket).
    pub fn has(&self, hash: &str) -> bool {
        self.items.contains_key(hash)
    }

    /// True if the path's NAR is not in the bucket yet (whether or not it is here).
    pub fn needs_nar(&self, hash: &str) -> bool {
        self.items
            .get(hash)
            .is_some_and(|i| i.state == MirrorState::Pending)
    }

    /// The path's NAR is now one of `nar_size` bytes (another claim of the path, whose NAR can
    /// be had): what is pending follows.
    pub fn resize(&mut self, hash: &str, nar_size: u64) {
        if let Some(i) = self.items.get_mut(hash) {
            if i.state == MirrorState::Pending {
                self.pending_bytes = self.pending_bytes - i.nar_size + nar_size;
            }
            i.nar_size = nar_size;
        }
    }

    /// The path now waits for `missing` (not for the references `old` it waited for): it is
    /// another claim of the path, with other references.
    pub fn rewire(&mut self, hash: &str, old: &[String], missing: &[String]) {
        if !self.items.contains_key(hash) {
            return;
        }
        for r in old {
            if let Some(v) = self.waiting_on.get_mut(r) {
                v.retain(|w| w != hash);
                if v.is_empty() {
                    self.waiting_on.remove(r);
                }
            }
        }
        let mut count = 0;
        for r in missing.iter().filter(|r| *r != hash) {
            self.waiting_on
                .entry(r.clone())
                .or_default()
                .push(hash.to_owned());
            count += 1;
        }
        if let Some(i) = self.items.get_mut(hash) {
            i.missing = count;
        }
        self.wake(hash);
    }

    /// True if the plan waits for this path's NAR to be held here before it can upload it.
    pub fn waits_for_nar(&self, hash: &str) -> bool {
        self.items
            .get(hash)
            .is_some_and(|i| i.state == MirrorState::Pending && !i.local)
    }

    /// Paths whose NAR is not held here yet.
    pub fn not_local(&self) -> impl Iterator<Item = &str> {
        self.items
            .iter()
            .filter(|(_, i)| !i.local)
            .map(|(h, _)| h.as_str())
    }

    /// Put a path in the ready set its state calls for, if it is ready.
    fn wake(&mut self, hash: &str) {
        let Some(i) = self.items.get(hash) else {
            return;
        };
        if i.busy {
            return;
        }
        match i.state {
            MirrorState::Pending if i.local => {
                self.nar_ready.insert((i.order, hash.to_owned()));
            }
            MirrorState::NarStored { .. } if i.missing == 0 => {
                self.narinfo_ready.insert((i.order, hash.to_owned()));
            }
            _ => {}
        }
    }

    /// The path's NAR is held here now.
    pub fn held(&mut self, hash: &str) {
        if let Some(i) = self.items.get_mut(hash)
            && !i.local
        {
            i.local = true;
            self.wake(hash);
        }
    }

    /// Up to `room` uploads to start now: narinfos first (they are cheap and complete paths),
    /// then NARs, each in log order.
    pub fn next_jobs(&mut self, now: Instant, room: usize) -> Vec<Job> {
        while let Some(Reverse((at, _, _))) = self.delayed.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, hash))) = self.delayed.pop() else {
                break;
            };
            self.wake(&hash);
        }
        let mut out = Vec::new();
        while out.len() < room {
            let job = if let Some(x) = self.narinfo_ready.pop_first() {
                Job::Narinfo(x.1)
            } else if let Some(x) = self.nar_ready.pop_first() {
                Job::Nar(x.1)
            } else {
                break;
            };
            let Some(i) = self.items.get_mut(match &job {
                Job::Nar(h) | Job::Narinfo(h) => h.as_str(),
            }) else {
                continue;
            };
            // A ready entry may be stale (the path moved on since): only what is ready now.
            let ready = !i.busy
                && match &job {
                    Job::Nar(_) => i.state == MirrorState::Pending && i.local,
                    Job::Narinfo(_) => {
                        matches!(i.state, MirrorState::NarStored { .. }) && i.missing == 0
                    }
                };
            if ready {
                i.busy = true;
                out.push(job);
            }
        }
        out
    }

    /// The path's NAR is in the bucket (`state` says where).
    pub fn nar_stored(&mut self, hash: &str, state: MirrorState) {
        if let Some(i) = self.items.get_mut(hash) {
            if i.state == MirrorState::Pending {
                self.pending_bytes -= i.nar_size;
            }
            i.state = state;
            i.busy = false;
            i.failures = 0;
            self.wake(hash);
        }
    }

    /// The path's narinfo is in the bucket: it is complete; the paths waiting for it are woken.
    pub fn done(&mut self, hash: &str) {
        if let Some(i) = self.items.remove(hash)
            && i.state == MirrorState::Pending
        {
            self.pending_bytes -= i.nar_size;
        }
        self.complete(hash);
    }

    /// A path not in the plan is known complete in the bucket (done on an earlier run).
    pub fn complete(&mut self, hash: &str) {
        for r in self.waiting_on.remove(hash).unwrap_or_default() {
            if let Some(i) = self.items.get_mut(&r) {
                i.missing = i.missing.saturating_sub(1);
            }
            self.wake(&r);
        }
    }

    /// The path's NAR turned out not to be here (nor arriving) when its upload began: it waits
    /// for [`Plan::held`] again, with no backoff (nothing failed).
    pub fn not_held(&mut self, hash: &str) {
        if let Some(i) = self.items.get_mut(hash) {
            i.busy = false;
            i.local = false;
        }
    }

    /// A path whose job was handed out but set aside (it stayed busy: another path's upload of
    /// the same NAR runs) is ready again.
    pub fn resume(&mut self, hash: &str) {
        if let Some(i) = self.items.get_mut(hash) {
            i.busy = false;
            self.wake(hash);
        }
    }

    /// An upload of the path failed: it is tried again after a backoff that doubles.
    pub fn failed(&mut self, hash: &str, now: Instant) -> Duration {
        let Some(i) = self.items.get_mut(hash) else {
            return Duration::ZERO;
        };
        i.busy = false;
        i.failures += 1;
        let wait =
            (Duration::from_millis(500) * 2u32.saturating_pow(i.failures.min(8))).min(MAX_BACKOFF);
        self.delayed
            .push(Reverse((now + wait, i.order, hash.to_owned())));
        wait
    }

    /// Paths not complete in the bucket, and the NAR bytes not in it yet.
    pub fn pending(&self) -> (u64, u64) {
        (self.items.len() as u64, self.pending_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> MirrorState {
        MirrorState::NarStored {
            url: "nar/x.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: [0; 32],
            file_size: 1,
            blake3: None,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Only a path whose NAR is not in the bucket and not here waits for it (one whose NAR
    /// went up waits for its references' narinfos, whatever this node holds).
    #[test]
    fn a_path_waits_for_its_nar_until_held_or_stored() {
        let mut p = Plan::default();
        p.add("a", MirrorState::Pending, false, 10, &[]);
        p.add("b", stored(), false, 10, &s(&["a"]));
        p.add("c", MirrorState::Pending, true, 10, &[]);
        assert!(p.waits_for_nar("a") && !p.waits_for_nar("b") && !p.waits_for_nar("c"));
        assert!(!p.waits_for_nar("unknown"));
        p.resize("a", 25);
        assert_eq!(p.pending(), (3, 35), "b's NAR is in the bucket");
        p.held("a");
        assert!(!p.waits_for_nar("a"));
    }

    /// Another claim of a path, with other references: the path waits for those, not the
    /// first claim's (whose completion no longer touches it).
    #[test]
    fn a_path_rewired_waits_for_its_new_references_only() {
        let mut p = Plan::default();
        let t = Instant::now();
        p.add("old", MirrorState::Pending, false, 1, &[]);
        p.add("new", MirrorState::Pending, false, 1, &[]);
        p.add("x", stored(), false, 1, &s(&["old"]));
        p.rewire("x", &s(&["old"]), &s(&["new"]));
        p.done("old");
        assert!(p.next_jobs(t, 10).is_empty(), "x waits for new");
        p.done("new");
        assert_eq!(p.next_jobs(t, 10), vec![Job::Narinfo("x".into())]);
        p.rewire("unknown", &[], &s(&["new"]));
        assert!(!p.has("unknown"));
    }

    #[test]
    fn narinfos_wait_for_their_references_nars_for_their_bytes() {
        let mut p = Plan::default();
        let t = Instant::now();
        // top references mid, mid references base; base is not held yet.
        p.add("top", MirrorState::Pending, true, 10, &s(&["mid"]));
        p.add("mid", MirrorState::Pending, true, 10, &s(&["base"]));
        p.add("base", MirrorState::Pending, false, 10, &[]);
        assert_eq!(
            p.next_jobs(t, 8),
            vec![Job::Nar("top".into()), Job::Nar("mid".into())]
        );
        p.nar_stored("top", stored());
        p.nar_stored("mid", stored());
        assert!(
            p.next_jobs(t, 8).is_empty(),
            "narinfos wait for their references"
        );
        p.held("base");
        assert_eq!(p.next_jobs(t, 8), vec![Job::Nar("base".into())]);
        p.nar_stored("base", stored());
        assert_eq!(p.next_jobs(t, 8), vec![Job::Narinfo("base".into())]);
        p.done("base");
        assert_eq!(p.next_jobs(t, 8), vec![Job::Narinfo("mid".into())]);
        p.done("mid");
        assert_eq!(p.next_jobs(t, 8), vec![Job::Narinfo("top".into())]);
        p.done("top");
        assert_eq!(p.pending(), (0, 0));
        assert!(
            p.waiting_on.is_empty() && p.items.is_empty(),
            "nothing is kept"
        );
    }

    #[test]
    fn failures_back_off_and_room_is_respected() {
        let mut p = Plan::default();
        let t = Instant::now();
        for h in ["a", "b", "c"] {
            p.add(h, MirrorState::Pending, true, 1, &[]);
        }
        assert_eq!(p.next_jobs(t, 2).len(), 2);
        let wait = p.failed("a", t);
        assert_eq!(p.next_jobs(t, 8), vec![Job::Nar("c".into())]);
        assert!(
            p.next_jobs(t + wait / 2, 8).is_empty(),
            "not before its backoff"
        );
        assert_eq!(p.next_jobs(t + wait, 8), vec![Job::Nar("a".into())]);
        assert_eq!(p.failed("a", t + wait), wait * 2, "the backoff doubles");
    }

    #[test]
    fn a_reference_complete_earlier_counts_and_waiting_does_not_grow_per_event() {
        let mut p = Plan::default();
        let t = Instant::now();
        p.add("x", MirrorState::Pending, true, 1, &s(&["old", "x"]));
        p.nar_stored("x", stored());
        let _ = p.next_jobs(t, 8);
        assert!(p.next_jobs(t, 8).is_empty());
        // "old" was done on an earlier run (the outbox says so).
        p.complete("old");
        assert_eq!(p.next_jobs(t, 8), vec![Job::Narinfo("x".into())]);
    }

    #[test]
    fn a_nar_gone_when_its_job_began_waits_again_without_backoff() {
        let mut p = Plan::default();
        let t = Instant::now();
        p.add("a", MirrorState::Pending, true, 1, &[]);
        assert_eq!(p.next_jobs(t, 8), vec![Job::Nar("a".into())]);
        // Its transfer ended between the plan's look and the job's.
        p.not_held("a");
        assert!(p.next_jobs(t, 8).is_empty(), "it waits for its NAR");
        p.held("a");
        assert_eq!(
            p.next_jobs(t, 8),
            vec![Job::Nar("a".into())],
            "at once: no backoff"
        );
    }
}
