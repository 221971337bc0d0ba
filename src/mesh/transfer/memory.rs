//! `[mesh] fetch-memory`: what the node's fetches from peers hold at once, counted in KiB. The
//! buffers of each range in flight ([`RANGE_MEMORY`]) and the leaves each transfer keeps while
//! it runs (32 bytes a 16 KiB chunk group: 20 MiB for a 10 GiB NAR) come out of it together.
//! Leaves together take at most all of it but one range's room, so a range can always run and
//! every transfer holding leaves finishes; one transfer's at most half of it. Leaves of up to
//! [`SMALL_LEAVES`] (a NAR of up to 32 MiB) are not counted: the 32 transfers' come to 2 MiB at
//! most, and a small NAR never waits behind a large one's leaves.

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::RANGE_MEMORY;

const KIB: u64 = 1024;
/// Leaves this small are not counted.
pub(super) const SMALL_LEAVES: u64 = 64 * KIB;

/// The room of `[mesh] fetch-memory`.
#[derive(Debug)]
pub(super) struct FetchMemory {
    /// All of it, in KiB.
    all: Semaphore,
    /// What leaves may take of it together, in KiB: all but one range's room.
    leaves: Semaphore,
    /// One range's room, in KiB.
    range: u32,
    /// What one transfer's leaves may take at most, in KiB.
    leaves_most: u64,
    /// Bytes the leaves hold (`narmesh_mesh_leaves_bytes`).
    held: Gauge,
}

/// Room for one transfer's leaves, given back when dropped.
#[derive(Debug)]
pub(super) struct LeavesRoom<'a> {
    _permits: Option<(SemaphorePermit<'a>, SemaphorePermit<'a>)>,
    bytes: i64,
    held: &'a Gauge,
}

impl Drop for LeavesRoom<'_> {
    fn drop(&mut self) {
        self.held.dec_by(self.bytes);
    }
}

impl FetchMemory {
    /// `bytes`: `[mesh] fetch-memory` (the room of one range at least); `held` shows what
    /// leaves hold.
    pub(super) fn new(bytes: u64, held: Gauge) -> Self {
        let range = RANGE_MEMORY / KIB;
        let all = (bytes / KIB).clamp(range, Semaphore::MAX_PERMITS as u64);
        FetchMemory {
            all: Semaphore::new(all as usize),
            leaves: Semaphore::new((all - range) as usize),
            range: range as u32,
            leaves_most: (all - range).min(all / 2).min(u32::MAX as u64),
            held,
        }
    }

    /// Room for one range's buffers; `None` once the node is stopping.
    pub(super) async fn range(&self) -> Option<SemaphorePermit<'_>> {
        self.all.acquire_many(self.range).await.ok()
    }

    /// Room for leaves of `len` bytes (counted as no more than one transfer's may take; small
    /// ones not at all); `None` once the node is stopping. Taken before they are asked for,
    /// kept until the transfer ends.
    pub(super) async fn leaves(&self, len: u64) -> Option<LeavesRoom<'_>> {
        let kib = len.div_ceil(KIB).min(self.leaves_most) as u32;
        if len <= SMALL_LEAVES || kib == 0 {
            return Some(LeavesRoom {
                _permits: None,
                bytes: 0,
                held: &self.held,
            });
        }
        let leaves = self.leaves.acquire_many(kib).await.ok()?;
        let all = self.all.acquire_many(kib).await.ok()?;
        let bytes = i64::from(kib) * KIB as i64;
        self.held.inc_by(bytes);
        Some(LeavesRoom {
            _permits: Some((leaves, all)),
            bytes,
            held: &self.held,
        })
    }

    /// Ranges that could start now.
    #[cfg(test)]
    fn ranges_free(&self) -> usize {
        self.all.available_permits() / self.range as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn leaves_and_ranges_share_the_room() {
        let m = FetchMemory::new(8 * MIB, Gauge::default());
        assert_eq!(m.ranges_free(), 4);
        let small = m.leaves(2 * 1024).await.unwrap();
        // 2 KiB of leaves (a 1 MiB NAR) cost nothing; 65 KiB (a NAR over 32 MiB) their size,
        // not a range's room.
        assert_eq!(m.all.available_permits(), 8 * 1024);
        let counted = m.leaves(SMALL_LEAVES + 1).await.unwrap();
        assert_eq!(m.all.available_permits(), 8 * 1024 - 65);
        drop((small, counted));
        let big = m.leaves(3 * MIB).await.unwrap();
        assert_eq!(
            m.ranges_free(),
            2,
            "3 MiB of leaves leave room for 2 ranges"
        );
        assert_eq!(m.held.get(), 3 * MIB as i64);
        let r = m.range().await.unwrap();
        assert_eq!(m.ranges_free(), 1);
        drop((big, r));
        assert_eq!(m.ranges_free(), 4);
        assert_eq!(m.held.get(), 0);
    }

    /// However large the leaves, one range can still run beside them: the transfers holding
    /// them finish. One transfer's take half the room at most, and small ones never wait.
    #[tokio::test]
    async fn leaves_never_take_the_last_range_s_room() {
        let m = FetchMemory::new(8 * MIB, Gauge::default());
        let huge = m.leaves(100 * MIB).await.unwrap();
        assert_eq!(m.ranges_free(), 2, "one transfer's leaves: half the room");
        let a = m.leaves(2 * MIB).await.unwrap();
        assert_eq!(m.ranges_free(), 1);
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), m.leaves(100 * MIB)).await;
        assert!(waiting.is_err(), "more leaves wait for room");
        let small = tokio::time::timeout(std::time::Duration::from_secs(1), m.leaves(1024))
            .await
            .expect("small leaves never wait");
        assert_eq!(m.ranges_free(), 1);
        let r = tokio::time::timeout(std::time::Duration::from_secs(1), m.range())
            .await
            .expect("a range runs beside the leaves");
        drop((r, a, huge, small));
        assert_eq!(m.ranges_free(), 4);
    }

    #[test]
    fn the_least_room_is_one_range() {
        let m = FetchMemory::new(1, Gauge::default());
        assert_eq!(m.ranges_free(), 1);
        assert_eq!(m.leaves_most, 0);
    }
}
