//! Which NAR files to evict: least recently used (fetched or served) first, never one that is
//! protected (being read, pinned, or not yet in the S3 mirror's bucket). Pure bookkeeping, so
//! the policy is tested without a disk.

use std::collections::{BTreeSet, HashMap};

/// The NAR files and when each was last used.
#[derive(Debug, Default)]
pub struct Lru {
    by_time: BTreeSet<(u64, [u8; 32])>,
    entries: HashMap<[u8; 32], (u64, u64)>,
    bytes: u64,
}

impl Lru {
    /// Add (or replace) a file of `size` bytes last used at `at`.
    pub fn insert(&mut self, b: [u8; 32], size: u64, at: u64) {
        self.remove(&b);
        self.by_time.insert((at, b));
        self.entries.insert(b, (size, at));
        self.bytes += size;
    }

    pub fn remove(&mut self, b: &[u8; 32]) -> Option<u64> {
        let (size, at) = self.entries.remove(b)?;
        self.by_time.remove(&(at, *b));
        self.bytes -= size;
        Some(size)
    }

    /// Mark a file used at `at`; true if it is known and its time moved.
    pub fn touch(&mut self, b: &[u8; 32], at: u64) -> bool {
        let Some((size, old)) = self.entries.get(b).copied() else {
            return false;
        };
        if at <= old {
            return false;
        }
        self.by_time.remove(&(old, *b));
        self.by_time.insert((at, *b));
        self.entries.insert(*b, (size, at));
        true
    }

    pub fn contains(&self, b: &[u8; 32]) -> bool {
        self.entries.contains_key(b)
    }

    pub fn size_of(&self, b: &[u8; 32]) -> Option<u64> {
        self.entries.get(b).map(|(s, _)| *s)
    }

    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Files to evict, least recently used first, to free at least `need` bytes, skipping the
    /// ones `keep` protects; `None` if that many bytes cannot be freed.
    pub fn plan(&self, need: u64, keep: impl Fn(&[u8; 32]) -> bool) -> Option<Vec<[u8; 32]>> {
        if need == 0 {
            return Some(Vec::new());
        }
        let mut freed = 0;
        let mut out = Vec::new();
        for (_, b) in &self.by_time {
            if keep(b) {
                continue;
            }
            freed += self.entries[b].0;
            out.push(*b);
            if freed >= need {
                return Some(out);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_first_and_protected_never() {
        let mut lru = Lru::default();
        lru.insert([1; 32], 10, 100);
        lru.insert([2; 32], 10, 50);
        lru.insert([3; 32], 10, 70);
        assert_eq!(lru.bytes(), 30);
        assert_eq!(lru.plan(15, |_| false), Some(vec![[2; 32], [3; 32]]));
        assert_eq!(
            lru.plan(15, |b| *b == [2; 32]),
            Some(vec![[3; 32], [1; 32]])
        );
        assert!(lru.touch(&[2; 32], 200));
        assert!(!lru.touch(&[2; 32], 150), "time never goes back");
        assert_eq!(lru.plan(5, |_| false), Some(vec![[3; 32]]));
        assert_eq!(lru.plan(31, |_| false), None);
        assert_eq!(lru.plan(25, |b| *b == [1; 32]), None);
        assert_eq!(lru.remove(&[3; 32]), Some(10));
        assert_eq!(lru.bytes(), 20);
        lru.insert([1; 32], 5, 1);
        assert_eq!(
            (lru.bytes(), lru.len()),
            (15, 2),
            "replacing keeps one entry"
        );
    }
}
