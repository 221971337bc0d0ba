//! BLAKE3's tree over 16 KiB chunk groups: the chaining value of every group of a NAR (its
//! "leaves", 32 bytes per 16 KiB, about 0.2% of the NAR) is all it takes to verify any group on
//! its own, and the leaves verify against the NAR's BLAKE3 root, which a trusted signature
//! binds to the NAR's signed sha256. The upper levels of the tree (what a bao outboard also
//! stores, as iroh-blobs keeps them) are cheap to recompute from the leaves, so they are never
//! kept or sent. The tree is BLAKE3's own: a group is 16 of its 1 KiB chunks, and a run of
//! groups splits where BLAKE3 splits (the largest power of two below the count goes left).
//!
//! Used to check bytes before they are handed on: NARs served from the live Nix store or a
//! blob file, and NARs arriving from peers, range by range from any number of providers.

use blake3::hazmat::{
    ChainingValue, HasherExt as _, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes per chunk group.
pub const GROUP: u64 = 16 * 1024;

/// Largest NAR whose leaves this module handles (8 TiB: 512 Mi groups, 16 GiB of leaves).
pub const MAX_SIZE: u64 = 1 << 43;

/// How many groups a blob of `size` bytes has (an empty blob has one, empty, group).
pub fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP).max(1)
}

/// The byte range of group `i` in a blob of `size` bytes.
pub fn group_range(size: u64, i: u64) -> std::ops::Range<u64> {
    let start = i * GROUP;
    start..(start + GROUP).min(size)
}

/// Why leaves were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeavesError {
    #[error("{got} bytes of leaves for a blob of {size} bytes (expected {want})")]
    Length { size: u64, got: usize, want: u64 },
    #[error("blob of {0} bytes is larger than the largest handled")]
    TooLarge(u64),
    #[error("the leaves do not add up to the expected BLAKE3 root")]
    Root,
}

/// The leaves of one blob: its size and the chaining value of each chunk group. A blob of one
/// group has no non-root chaining value worth keeping: its single leaf is the root hash itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Leaves {
    size: u64,
    cvs: Vec<ChainingValue>,
}

impl std::fmt::Debug for Leaves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leaves({} bytes, {} groups)", self.size, self.cvs.len())
    }
}

impl Leaves {
    /// Leaves as stored or sent (the chaining values, concatenated), checked for length only.
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Result<Self, LeavesError> {
        if size > MAX_SIZE {
            return Err(LeavesError::TooLarge(size));
        }
        let want = groups(size);
        if bytes.len() as u64 != want * 32 {
            return Err(LeavesError::Length {
                size,
                got: bytes.len(),
                want: want * 32,
            });
        }
        let cvs = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        Ok(Leaves { size, cvs })
    }

    /// Leaves from the wire that must add up to `root`.
    pub fn verified(size: u64, bytes: &[u8], root: &[u8; 32]) -> Result<Self, LeavesError> {
        let leaves = Leaves::from_bytes(size, bytes)?;
        if leaves.root() != *root {
            return Err(LeavesError::Root);
        }
        Ok(leaves)
    }

    /// The leaves of `data`, in one go (tests, small blobs).
    pub fn of(data: &[u8]) -> Self {
        let mut h = LeafHasher::new();
        h.update(data);
        h.finish()
    }

    /// The concatenated chaining values.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    /// The concatenated chaining values, where they are.
    pub fn as_bytes(&self) -> &[u8] {
        self.cvs.as_flattened()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn groups(&self) -> u64 {
        self.cvs.len() as u64
    }

    /// The BLAKE3 hash of the whole blob.
    pub fn root(&self) -> [u8; 32] {
        match self.cvs.as_slice() {
            [only] => *only,
            cvs => {
                let (l, r) = split(cvs);
                *merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash).as_bytes()
            }
        }
    }

    /// True if `data` is exactly group `i` of the blob.
    pub fn check(&self, i: u64, data: &[u8]) -> bool {
        let Some(want) = self.cvs.get(i as usize) else {
            return false;
        };
        let range = group_range(self.size, i);
        if data.len() as u64 != range.end - range.start {
            return false;
        }
        group_cv(i, data, self.cvs.len() == 1) == *want
    }
}

/// Split a run of leaves where BLAKE3 splits it: the largest power of two below the count.
fn split(cvs: &[ChainingValue]) -> (&[ChainingValue], &[ChainingValue]) {
    let n = cvs.len();
    let left = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    cvs.split_at(left)
}

/// The non-root chaining value of a run of at least one leaf.
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs);
    merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
}

/// The chaining value of group `i` (its root hash if it is the blob's only group).
fn group_cv(i: u64, data: &[u8], only: bool) -> ChainingValue {
    if only {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(i * GROUP);
    h.update(data);
    h.finalize_non_root()
}

/// Computes the leaves of a blob streamed through it in pieces of any size.
pub struct LeafHasher {
    size: u64,
    /// The group being filled.
    pending: Vec<u8>,
    cvs: Vec<ChainingValue>,
    /// The first group's hasher state is kept until a second group shows whether it is the
    /// blob's only group (root) or not.
    first: Option<Vec<u8>>,
}

impl Default for LeafHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl LeafHasher {
    pub fn new() -> Self {
        LeafHasher {
            size: 0,
            pending: Vec::with_capacity(GROUP as usize),
            cvs: Vec::new(),
            first: None,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            if self.pending.is_empty() && data.len() >= GROUP as usize {
                // Whole groups straight from the caller's buffer.
                let (group, rest) = data.split_at(GROUP as usize);
                self.push(group);
                data = rest;
                continue;
            }
            let room = GROUP as usize - self.pending.len();
            let n = room.min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.pending.len() == GROUP as usize {
                let full = std::mem::take(&mut self.pending);
                self.push(&full);
                self.pending = full;
                self.pending.clear();
            }
        }
    }

    fn push(&mut self, group: &[u8]) {
        match self.first.take() {
            None if self.cvs.is_empty() => {
                // Not known yet whether this group is the only one.
                self.first = Some(group.to_vec());
            }
            None => {
                let i = self.cvs.len() as u64;
                self.cvs.push(group_cv(i, group, false));
            }
            Some(first) => {
                self.cvs.push(group_cv(0, &first, false));
                self.cvs.push(group_cv(1, group, false));
            }
        }
    }

    /// The leaves of everything passed in.
    pub fn finish(mut self) -> Leaves {
        let tail = std::mem::take(&mut self.pending);
        match (self.first.take(), self.cvs.is_empty()) {
            // One group in all (possibly empty or partial).
            (None, true) => self.cvs.push(group_cv(0, &tail, true)),
            (Some(first), _) if tail.is_empty() => self.cvs.push(group_cv(0, &first, true)),
            (Some(first), _) => {
                self.cvs.push(group_cv(0, &first, false));
                self.cvs.push(group_cv(1, &tail, false));
            }
            (None, false) => {
                if !tail.is_empty() {
                    let i = self.cvs.len() as u64;
                    self.cvs.push(group_cv(i, &tail, false));
                }
            }
        }
        Leaves {
            size: self.size,
            cvs: self.cvs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    #[test]
    fn roots_equal_blake3_at_the_edges() {
        let g = GROUP as usize;
        for len in [
            0,
            1,
            g - 1,
            g,
            g + 1,
            2 * g,
            2 * g + 1,
            3 * g,
            5 * g - 7,
            16 * g,
            17 * g + 3,
            33 * g,
        ] {
            let d = data(len, 7);
            let leaves = Leaves::of(&d);
            assert_eq!(leaves.root(), *blake3::hash(&d).as_bytes(), "len {len}");
            assert_eq!(leaves.groups(), groups(len as u64));
            for i in 0..leaves.groups() {
                let r = group_range(len as u64, i);
                assert!(
                    leaves.check(i, &d[r.start as usize..r.end as usize]),
                    "len {len} group {i}"
                );
            }
        }
    }

    #[test]
    fn a_changed_byte_fails_its_group_only() {
        let g = GROUP as usize;
        let mut d = data(4 * g + 100, 3);
        let leaves = Leaves::of(&d);
        d[2 * g + 5] ^= 1;
        for i in 0..leaves.groups() {
            let r = group_range(d.len() as u64, i);
            assert_eq!(
                leaves.check(i, &d[r.start as usize..r.end as usize]),
                i != 2
            );
        }
        // A group checked at the wrong index, or cut short, fails.
        assert!(!leaves.check(1, &d[0..g]));
        assert!(!leaves.check(4, &d[4 * g..4 * g + 99]));
    }

    #[test]
    fn wire_leaves_must_add_up_to_the_root() {
        let d = data(3 * GROUP as usize + 1, 1);
        let leaves = Leaves::of(&d);
        let root = *blake3::hash(&d).as_bytes();
        let bytes = leaves.to_bytes();
        assert_eq!(
            Leaves::verified(d.len() as u64, &bytes, &root).unwrap(),
            leaves
        );
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert_eq!(
            Leaves::verified(d.len() as u64, &bad, &root),
            Err(LeavesError::Root)
        );
        assert!(matches!(
            Leaves::verified(d.len() as u64 + GROUP, &bytes, &root),
            Err(LeavesError::Length { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_split_of_the_stream_gives_the_same_leaves(
            len in 0usize..(70 * 1024),
            cuts in proptest::collection::vec(1usize..40_000, 0..6),
            seed in any::<u8>(),
        ) {
            let d = data(len, seed);
            let whole = Leaves::of(&d);
            prop_assert_eq!(whole.root(), *blake3::hash(&d).as_bytes());
            let mut h = LeafHasher::new();
            let mut rest = &d[..];
            for c in cuts {
                let n = c.min(rest.len());
                h.update(&rest[..n]);
                rest = &rest[n..];
            }
            h.update(rest);
            prop_assert_eq!(h.finish(), whole);
        }

        #[test]
        fn arbitrary_wire_bytes_never_panic(size in 0u64..200_000, bytes in proptest::collection::vec(any::<u8>(), 0..512), root in any::<[u8; 32]>()) {
            let _ = Leaves::verified(size, &bytes, &root);
        }
    }
}
