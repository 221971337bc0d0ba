//! The plan of one NAR's fetch from several providers: which ranges (whole chunk groups) are
//! left, which are being fetched and how far each has got, which are done. Providers take
//! ranges as they free up, so a fast one does more. When none is left, a provider that is free
//! splits the range with the most left in two and takes the back half (down to [`MIN_SPLIT`]),
//! or takes the rest of a range that made no progress for [`STALE`], so a slow or dead provider
//! does not hold back the end of the NAR. Pure bookkeeping: no I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::chunks::GROUP;

/// A range in flight is split only if both halves would be at least this big.
pub const MIN_SPLIT: u64 = 256 << 10;
/// A range in flight that has not moved for this long is taken over whole.
pub const STALE: Duration = Duration::from_secs(2);

/// One range being fetched.
#[derive(Debug)]
struct Flight {
    /// Verified up to here (from the range's start).
    pos: u64,
    /// Where its provider stops: the range's end, brought forward when another takes the rest.
    limit: u64,
    moved: Instant,
    /// Written up to here: verified bytes past it wait in the provider's buffer.
    written: u64,
}

/// What a provider gets from the plan.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Fetch `start..end`; report progress and the end with this id.
    Range {
        id: u64,
        start: u64,
        end: u64,
    },
    /// Nothing to take now, but ranges in flight may come back: wait.
    Wait,
    Done,
}

/// The ranges of one NAR.
#[derive(Debug)]
pub struct Ranges {
    size: u64,
    todo: VecDeque<(u64, u64)>,
    /// Done, by start: end.
    done: BTreeMap<u64, u64>,
    flights: HashMap<u64, Flight>,
    next_id: u64,
}

impl Ranges {
    pub fn new(size: u64, providers: usize) -> Self {
        // Several ranges per provider, so a slow one holds back little; whole groups each.
        let per = (size / (4 * providers.max(1) as u64)).clamp(256 << 10, 8 << 20);
        let per = per.div_ceil(GROUP) * GROUP;
        let mut todo = VecDeque::new();
        let mut s = 0;
        while s < size {
            let e = (s + per).min(size);
            todo.push_back((s, e));
            s = e;
        }
        Ranges {
            size,
            todo,
            done: Default::default(),
            flights: Default::default(),
            next_id: 0,
        }
    }

    fn fly(&mut self, start: u64, end: u64, now: Instant) -> Next {
        let id = self.next_id;
        self.next_id += 1;
        self.flights.insert(
            id,
            Flight {
                pos: start,
                limit: end,
                moved: now,
                written: start,
            },
        );
        Next::Range { id, start, end }
    }

    /// The next range for a provider that is free at `now`.
    pub fn next(&mut self, now: Instant) -> Next {
        if let Some((s, e)) = self.todo.pop_front() {
            return self.fly(s, e, now);
        }
        // The range in flight with the most left.
        let Some((&id, f)) = self
            .flights
            .iter()
            .max_by_key(|(_, f)| f.limit.saturating_sub(f.pos))
        else {
            return Next::Done;
        };
        let left = f.limit.saturating_sub(f.pos);
        if left >= 2 * MIN_SPLIT {
            let mid = (f.pos + left / 2).div_ceil(GROUP) * GROUP;
            let end = f.limit;
            if let Some(f) = self.flights.get_mut(&id) {
                f.limit = mid;
            }
            return self.fly(mid, end, now);
        }
        // A range that stopped moving: take the rest, from what it wrote (what it verified
        // past that waits in its buffer, and a provider that stopped may never write it).
        let stale = self
            .flights
            .iter()
            .filter(|(_, f)| f.limit > f.written && now.duration_since(f.moved) >= STALE)
            .max_by_key(|(_, f)| f.limit - f.written)
            .map(|(id, _)| *id);
        if let Some(id) = stale
            && let Some(f) = self.flights.get_mut(&id)
        {
            let (start, end) = (f.written, f.limit);
            // Its verified bytes past `written` are no longer its to keep.
            (f.limit, f.pos) = (f.written, f.written);
            return self.fly(start, end, now);
        }
        Next::Wait
    }

    /// Range `id` verified up to `pos` at `now`; `false` if that is past where it must stop
    /// (another took the rest): the bytes past its limit are not its to keep.
    pub fn progress(&mut self, id: u64, pos: u64, now: Instant) -> bool {
        match self.flights.get_mut(&id) {
            Some(f) if pos <= f.limit => {
                f.pos = pos;
                f.moved = now;
                true
            }
            _ => false,
        }
    }

    /// `start..got` of range `id` (in flight) is written: readers may have it.
    pub fn written(&mut self, id: u64, start: u64, got: u64) {
        if let Some(f) = self.flights.get_mut(&id) {
            f.written = f.written.max(got);
        }
        self.mark(start, got);
    }

    fn mark(&mut self, start: u64, got: u64) {
        if got > start {
            let e = self.done.entry(start).or_insert(got);
            *e = (*e).max(got);
        }
    }

    /// Range `id` (from `start`) ended with `start..got` done; what it did not reach of its
    /// part goes back to the front.
    pub fn finished(&mut self, id: u64, start: u64, got: u64) {
        let Some(f) = self.flights.remove(&id) else {
            return;
        };
        self.mark(start, got);
        if got < f.limit {
            self.todo.push_front((got, f.limit));
        }
    }

    /// Bytes from the start that are done.
    pub fn prefix(&self) -> u64 {
        let mut p = 0;
        for (s, e) in &self.done {
            if *s > p {
                break;
            }
            p = p.max(*e);
        }
        p
    }

    pub fn complete(&self) -> bool {
        self.prefix() >= self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(n: Next) -> (u64, u64, u64) {
        match n {
            Next::Range { id, start, end } => (id, start, end),
            other => panic!("expected a range, got {other:?}"),
        }
    }

    #[test]
    fn ranges_cover_the_nar_and_return_what_failed() {
        let now = Instant::now();
        let size = 100 * GROUP + 5;
        let mut r = Ranges::new(size, 4);
        let mut seen = Vec::new();
        while !r.todo.is_empty() {
            seen.push(range(r.next(now)));
        }
        assert_eq!(seen.first().unwrap().1, 0);
        assert_eq!(seen.last().unwrap().2, size);
        for w in seen.windows(2) {
            assert_eq!(w[0].2, w[1].1);
            assert_eq!(w[0].2 % GROUP, 0);
        }
        // The first range half done, the second whole: the prefix stops at the gap.
        let (a, b) = (seen[0], seen[1]);
        r.finished(a.0, a.1, a.1 + GROUP);
        r.finished(b.0, b.1, b.2);
        assert_eq!(r.prefix(), GROUP);
        let again = range(r.next(now));
        assert_eq!((again.1, again.2), (a.1 + GROUP, a.2));
        r.finished(again.0, again.1, again.2);
        assert_eq!(r.prefix(), b.2);
        for x in &seen[2..] {
            r.finished(x.0, x.1, x.2);
        }
        assert!(r.complete());
        assert_eq!(r.next(now), Next::Done);
    }

    #[test]
    fn written_bytes_of_a_range_in_flight_count_for_readers() {
        let now = Instant::now();
        let mut r = Ranges::new(64 * GROUP, 1);
        let (id, start, end) = range(r.next(now));
        assert_eq!(r.prefix(), 0);
        r.written(id, start, start + 4 * GROUP);
        assert_eq!(r.prefix(), start + 4 * GROUP);
        r.finished(id, start, end);
        assert_eq!(r.prefix(), end);
    }

    #[test]
    fn a_free_provider_splits_the_range_with_most_left() {
        let now = Instant::now();
        let size = 64 * MIN_SPLIT;
        let mut r = Ranges::new(size, 1);
        let mut all = Vec::new();
        while !r.todo.is_empty() {
            all.push(range(r.next(now)));
        }
        // All but the last done; the last has moved a group.
        for x in &all[..all.len() - 1] {
            r.finished(x.0, x.1, x.2);
        }
        let (id, start, end) = *all.last().unwrap();
        assert!(r.progress(id, start + GROUP, now));
        let (id2, s2, e2) = range(r.next(now));
        assert_eq!(e2, end, "the back half");
        assert_eq!(s2 % GROUP, 0);
        assert!(s2 > start + GROUP && s2 < end);
        // The first provider stops at the split: a group past it is not its to keep.
        assert!(!r.progress(id, s2 + GROUP, now));
        assert!(r.progress(id, s2, now));
        r.finished(id, start, s2);
        r.finished(id2, s2, e2);
        assert!(r.complete());
        assert!(r.todo.is_empty());
    }

    #[test]
    fn a_range_that_stopped_moving_is_taken_over() {
        let t0 = Instant::now();
        let size = MIN_SPLIT; // too small to split
        let mut r = Ranges::new(size, 1);
        let (id, start, end) = range(r.next(t0));
        assert!(r.progress(id, start + 3 * GROUP, t0));
        r.written(id, start, start + GROUP);
        assert_eq!(r.next(t0 + Duration::from_millis(100)), Next::Wait);
        // Taken over from what it wrote: the two groups it verified but holds unwritten are
        // fetched again (it may never write them; a provider that drips its bytes stays in
        // the middle of its next group for ever).
        let (id2, s2, e2) = range(r.next(t0 + STALE));
        assert_eq!((s2, e2), (start + GROUP, end));
        // Another free provider finds nothing to split or take (the stalled range's position
        // follows its new limit): it waits.
        assert_eq!(r.next(t0 + STALE), Next::Wait);
        // The stalled provider, should it wake, keeps nothing more; nothing comes back twice.
        assert!(!r.progress(id, start + 4 * GROUP, t0 + STALE));
        r.finished(id2, s2, e2);
        assert!(r.complete(), "complete without the stalled provider");
        r.finished(id, start, start + 3 * GROUP);
        assert!(r.todo.is_empty());
        assert!(r.complete());
    }
}
