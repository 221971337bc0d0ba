//! Reading a range of a NAR the node holds, verified: whole 16 KiB chunk groups are read (from a
//! NAR file, or serialized from the live Nix store through its layout) and each is checked
//! against the NAR's leaves before any of its bytes are handed on. A mismatch ends the read
//! with [`ReadError::Mismatch`]: bytes that do not match their record are never served.
//!
//! The blocking reads run a piece at a time on the blocking pool and feed an async channel, so
//! a slow consumer holds no thread, only a small buffer. A piece is read only once the channel
//! has room for it, and its bytes come out of the storage's [`ReadBudget`]: with the budget
//! spent (stalled clients hold their pieces until they read or are cut off), readers go on with
//! pieces of one chunk group, so memory stays bounded and nobody is starved.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::chunks::{GROUP, Leaves};
use crate::nix::nar::NarError;
use crate::nix::nar_layout::NarLayout;

/// Bytes read and checked per step (whole groups), at most.
const PIECE_GROUPS: u64 = 64;

/// The piece sizes (in groups) a reader tries to take from the budget, largest first; with
/// none to be had it reads one group outside it.
const TRY_GROUPS: [u64; 3] = [PIECE_GROUPS, 16, 4];

/// The memory all readers' pieces may take together (`[store] read-memory`): a piece's share
/// is given back when its last byte is dropped (written to its client, or the client gone).
#[derive(Debug, Clone)]
pub struct ReadBudget {
    /// Permits in chunk groups.
    groups: Arc<Semaphore>,
    /// Bytes of pieces read and not yet dropped, in or out of the budget.
    buffered: Gauge,
}

impl ReadBudget {
    pub fn new(bytes: u64, buffered: Gauge) -> Self {
        ReadBudget {
            groups: Arc::new(Semaphore::new((bytes / GROUP).max(1) as usize)),
            buffered,
        }
    }

    /// The share of the next piece: the largest of [`TRY_GROUPS`] free now, else one group
    /// outside the budget.
    fn take(&self) -> (u64, Option<OwnedSemaphorePermit>) {
        for n in TRY_GROUPS {
            if let Ok(p) = self.groups.clone().try_acquire_many_owned(n as u32) {
                return (n, Some(p));
            }
        }
        (1, None)
    }
}

/// A piece's bytes, with its share of the budget: both go when the last slice is dropped.
struct Piece {
    buf: Vec<u8>,
    _share: Option<OwnedSemaphorePermit>,
    buffered: Gauge,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        self.buffered.dec_by(self.buf.len() as i64);
    }
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{what}: chunk group {group} does not match the NAR's BLAKE3 leaves")]
    Mismatch { what: String, group: u64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Nar(#[from] NarError),
}

/// Where a NAR's bytes come from.
pub enum Source {
    /// A NAR file of the storage.
    File { file: File, path: PathBuf },
    /// A path in the local Nix store, serialized on the fly.
    Store(Arc<NarLayout>),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::Store(_) => "the local store's copy".into(),
        }
    }

    /// `len` bytes from `offset`, in a buffer not zeroed first.
    fn read_vec_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        match self {
            Source::File { file, path } => {
                crate::fsutil::read_vec_at(file, offset, len).map_err(|source| ReadError::Io {
                    what: path.display().to_string(),
                    source,
                })
            }
            Source::Store(layout) => {
                let mut buf = Vec::new();
                layout.read_into(offset, len, &mut buf)?;
                Ok(buf)
            }
        }
    }
}

/// A verified reader of `start..end` of one NAR.
pub struct RangeReader {
    source: Source,
    leaves: Arc<Leaves>,
    pos: u64,
    end: u64,
}

impl RangeReader {
    pub fn new(source: Source, leaves: Arc<Leaves>, start: u64, end: u64) -> Self {
        let end = end.min(leaves.size());
        RangeReader {
            source,
            leaves,
            pos: start,
            end,
        }
    }

    /// The next verified piece of at most `max_groups` chunk groups, or `None` at the end of
    /// the range. Blocking.
    /// The piece comes as whole groups read and the part of them that is in the range.
    #[allow(clippy::type_complexity)]
    fn next_piece(
        &mut self,
        max_groups: u64,
    ) -> Option<Result<(Vec<u8>, std::ops::Range<usize>), ReadError>> {
        if self.pos >= self.end {
            return None;
        }
        let size = self.leaves.size();
        let first = self.pos / GROUP;
        let last = (self.end - 1) / GROUP;
        let groups = (last - first + 1).min(max_groups.max(1));
        let from = first * GROUP;
        let to = ((first + groups) * GROUP).min(size);
        let buf = match self.source.read_vec_at(from, (to - from) as usize) {
            Ok(b) => b,
            Err(e) => {
                self.pos = self.end;
                return Some(Err(e));
            }
        };
        for (k, chunk) in buf.chunks(GROUP as usize).enumerate() {
            let g = first + k as u64;
            if !self.leaves.check(g, chunk) {
                self.pos = self.end;
                return Some(Err(ReadError::Mismatch {
                    what: self.source.describe(),
                    group: g,
                }));
            }
        }
        let out_from = (self.pos - from) as usize;
        let out_to = (self.end.min(to) - from) as usize;
        self.pos = self.end.min(to);
        Some(Ok((buf, out_from..out_to)))
    }

    /// Stream the range: pieces are read on the blocking pool one after another, each once the
    /// channel has room for it (at most two wait there: one read ahead left a 1 GiB NAR served
    /// over HTTP at 0.7x the rate), sized by what `budget` has free. `on_error` hears of a failed read (a mismatch means the source
    /// is bad) before the stream ends with the error. `guard` lives as long as the stream.
    pub fn stream<G: Send + 'static>(
        self,
        budget: ReadBudget,
        guard: G,
        on_error: impl FnOnce(&ReadError) + Send + 'static,
    ) -> mpsc::Receiver<Result<Bytes, ReadError>> {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _guard = guard;
            let mut reader = Some(self);
            let mut on_error = Some(on_error);
            while let Some(mut r) = reader.take() {
                // The consumer's pace: an async wait, no thread and no piece held.
                let Ok(slot) = tx.reserve().await else {
                    return;
                };
                let (groups, share) = budget.take();
                let step = tokio::task::spawn_blocking(move || {
                    let piece = r.next_piece(groups);
                    (r, piece)
                })
                .await;
                let Ok((r, piece)) = step else {
                    return;
                };
                let Some(piece) = piece else {
                    return;
                };
                let piece = piece.map(|(buf, part)| {
                    budget.buffered.inc_by(buf.len() as i64);
                    Bytes::from_owner(Piece {
                        buf,
                        _share: share,
                        buffered: budget.buffered.clone(),
                    })
                    .slice(part)
                });
                if let Err(e) = &piece
                    && let Some(f) = on_error.take()
                {
                    f(e);
                }
                let failed = piece.is_err();
                slot.send(piece);
                if failed {
                    return;
                }
                reader = Some(r);
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(data: &[u8]) -> (tempfile::TempDir, Source) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nar");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        (dir, Source::File { file, path })
    }

    fn read_all(mut r: RangeReader) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        while let Some(p) = r.next_piece(PIECE_GROUPS) {
            let (buf, part) = p?;
            out.extend_from_slice(&buf[part]);
        }
        Ok(out)
    }

    #[test]
    fn ranges_read_back_verified() {
        let data: Vec<u8> = (0..(3 * 1024 * 1024 + 777))
            .map(|i| (i % 251) as u8)
            .collect();
        let leaves = Arc::new(Leaves::of(&data));
        for (s, e) in [
            (0, data.len()),
            (5, 6),
            (16383, 16385),
            (1 << 20, data.len() - 3),
        ] {
            let (_d, src) = file_with(&data);
            let r = RangeReader::new(src, leaves.clone(), s as u64, e as u64);
            assert!(read_all(r).unwrap() == data[s..e], "{s}..{e}");
        }
    }

    #[test]
    fn a_changed_byte_is_never_served() {
        let mut data: Vec<u8> = (0..200_000).map(|i| (i % 7) as u8).collect();
        let leaves = Arc::new(Leaves::of(&data));
        data[100_000] ^= 1;
        let (_d, src) = file_with(&data);
        let r = RangeReader::new(src, leaves, 0, data.len() as u64);
        assert!(matches!(
            read_all(r),
            Err(ReadError::Mismatch { group: 6, .. })
        ));
    }
}
