//! The memory every read of a NAR holds ahead of its reader (`[store] read-memory`): a piece
//! of a NAR file, of an own path serialized from the Nix store, or of a NAR still arriving from
//! peers, is read under a share of one budget, and the share goes back when the piece's last
//! byte is dropped (written to its client, or the client gone). With the budget spent (clients
//! that stopped reading hold it until they read or are cut off) a read goes on one chunk group
//! at a time outside it: memory stays bounded and no reader is starved.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::chunks::GROUP;

/// The most chunk groups one piece holds (1 MiB).
pub const PIECE_GROUPS: u64 = 64;

/// The piece sizes (in groups) a read tries to take from the budget, largest first; with none
/// to be had it reads one group outside it.
const TRY_GROUPS: [u64; 3] = [PIECE_GROUPS, 16, 4];

/// The budget; cheap to clone.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    /// Permits in chunk groups.
    groups: Arc<Semaphore>,
    /// Bytes of pieces read and not yet dropped, in or out of the budget
    /// (`narmesh_storage_read_buffered_bytes`).
    buffered: Gauge,
}

impl ReadBudget {
    /// A budget of `bytes` (at least one chunk group), its pieces counted in `buffered`.
    pub fn new(bytes: u64, buffered: Gauge) -> Self {
        ReadBudget {
            groups: Arc::new(Semaphore::new((bytes / GROUP).max(1) as usize)),
            buffered,
        }
    }

    /// The share of a next piece of at most `groups` chunk groups: the largest of
    /// [`TRY_GROUPS`] (no larger than `groups`) free now, else one group outside the budget.
    pub fn take(&self, groups: u64) -> Share {
        let most = groups.clamp(1, PIECE_GROUPS);
        let mut tried = 0;
        for n in TRY_GROUPS.map(|n| n.min(most)) {
            if n == tried {
                continue;
            }
            tried = n;
            if let Ok(p) = self.groups.clone().try_acquire_many_owned(n as u32) {
                return Share {
                    groups: n,
                    permit: Some(p),
                    buffered: self.buffered.clone(),
                };
            }
        }
        Share {
            groups: 1,
            permit: None,
            buffered: self.buffered.clone(),
        }
    }
}

/// One piece's share of the budget, before it is read.
#[derive(Debug)]
pub struct Share {
    groups: u64,
    permit: Option<OwnedSemaphorePermit>,
    buffered: Gauge,
}

impl Share {
    /// How many chunk groups the piece may hold.
    pub fn groups(&self) -> u64 {
        self.groups
    }

    /// The piece read under this share (`part` of `buf` handed on): the share goes back when
    /// the last slice of it is dropped.
    pub fn piece(self, buf: Vec<u8>, part: Range<usize>) -> Bytes {
        self.buffered.inc_by(buf.len() as i64);
        Bytes::from_owner(Piece {
            buf,
            permit: self.permit,
            buffered: self.buffered,
        })
        .slice(part)
    }
}

/// A piece's bytes, with its share of the budget.
struct Piece {
    buf: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    buffered: Gauge,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        // The budget is whole again before the gauge says so.
        drop(self.permit.take());
        self.buffered.dec_by(self.buf.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A piece takes no more of the budget than it can hold, and gives it back when dropped.
    #[test]
    fn a_share_is_no_larger_than_its_piece_and_goes_back_with_it() {
        let b = ReadBudget::new(1 << 20, Gauge::default());
        let free = || b.groups.available_permits() as u64;
        assert_eq!(b.take(1).groups(), 1, "a one-group NAR");
        assert_eq!(b.take(3).groups(), 3);
        assert_eq!(b.take(10).groups(), 10, "no more than it needs");
        assert_eq!(b.take(1 << 30).groups(), PIECE_GROUPS);
        let share = b.take(20);
        assert_eq!((share.groups(), free()), (20, PIECE_GROUPS - 20));
        let piece = share.piece(vec![7; 20 * GROUP as usize], 5..10);
        assert_eq!((&piece[..], b.buffered.get()), (&[7u8; 5][..], 20 << 14));
        let half = piece.slice(1..3);
        drop(piece);
        assert_eq!(free(), PIECE_GROUPS - 20, "a slice still holds it");
        drop(half);
        assert_eq!((free(), b.buffered.get()), (PIECE_GROUPS, 0));
        // Partly spent: the next smaller size; spent: one group at a time, outside the budget.
        let most = b.take(PIECE_GROUPS - 10);
        assert_eq!((b.take(PIECE_GROUPS).groups(), free()), (4, 6));
        let all = b.take(10);
        assert_eq!(free(), 0);
        let outside = b.take(PIECE_GROUPS);
        assert_eq!((outside.groups(), free()), (1, 0));
        drop((all, most));
        assert_eq!(free(), PIECE_GROUPS);
    }
}
