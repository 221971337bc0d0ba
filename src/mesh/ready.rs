//! Verified bytes of a transfer on their way into its partial file: the spans of received pieces
//! that passed their chunk group's check, kept in order without copying them (adjacent spans of
//! one piece become one span), and written at the transfer's offset on the blocking pool with as
//! few `pwritev` calls as it allows.

use std::fs::File;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::Bytes;

use super::peer::PeerError;
use crate::storage::PartialNar;

/// Verified bytes waiting to be written, in order: spans of received pieces (adjacent spans of
/// one piece are one write).
#[derive(Default)]
pub struct Ready {
    pieces: Vec<(Bytes, std::ops::Range<usize>)>,
    pub len: usize,
}

impl Ready {
    pub fn push(&mut self, piece: &Bytes, span: std::ops::Range<usize>) {
        self.len += span.len();
        if let Some((p, last)) = self.pieces.last_mut()
            && p.as_ptr() == piece.as_ptr()
            && p.len() == piece.len()
            && last.end == span.start
        {
            last.end = span.end;
            return;
        }
        self.pieces.push((piece.clone(), span));
    }
}

/// Write verified bytes at `*got` and move it on.
pub async fn flush(
    partial: &PartialNar,
    ready: &mut Ready,
    got: &mut u64,
) -> Result<(), PeerError> {
    write_at(&partial.file(), ready, got).await
}

async fn write_at(file: &Arc<File>, ready: &mut Ready, got: &mut u64) -> Result<(), PeerError> {
    if ready.len == 0 {
        return Ok(());
    }
    let pieces = std::mem::take(&mut ready.pieces);
    let n = std::mem::take(&mut ready.len) as u64;
    let (file, at) = (file.clone(), *got);
    tokio::task::spawn_blocking(move || write_spans(&file, &pieces, at))
        .await
        .map_err(|e| PeerError::Stream(e.to_string()))?
        .map_err(|e| PeerError::Stream(format!("writing the NAR: {e}")))?;
    *got += n;
    Ok(())
}

/// Spans at most one `pwritev` takes (`IOV_MAX` on Linux).
const MAX_IOV: usize = 1024;

/// Write the spans one after another from `at`, with as few calls as `pwritev` allows (a QUIC
/// range's groups are gathered one by one, a version 1 provider's pieces are a datagram each:
/// one call per span would be tens to hundreds per MiB).
fn write_spans(
    file: &File,
    pieces: &[(Bytes, std::ops::Range<usize>)],
    mut at: u64,
) -> std::io::Result<()> {
    for batch in pieces.chunks(MAX_IOV) {
        let mut bufs: Vec<IoSlice<'_>> = batch
            .iter()
            .map(|(p, s)| IoSlice::new(&p[s.clone()]))
            .collect();
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            let n = match rustix::io::pwritev(file, bufs, at) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            at += n as u64;
            IoSlice::advance_slices(&mut bufs, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt as _;

    #[test]
    fn adjacent_spans_of_one_piece_are_one_write_and_others_stay_apart() {
        let a = Bytes::from(vec![1u8; 100]);
        let b = Bytes::from(vec![2u8; 100]);
        let mut r = Ready::default();
        r.push(&a, 0..10);
        r.push(&a, 10..40);
        // A gap, another piece, then the first piece again: three more spans.
        r.push(&a, 50..60);
        r.push(&b, 60..100);
        r.push(&a, 60..70);
        assert_eq!(r.len, 10 + 30 + 10 + 40 + 10);
        let spans: Vec<_> = r.pieces.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(spans, vec![0..40, 50..60, 60..100, 60..70]);
        // A slice of the same bytes at another address is another piece.
        let c = a.slice(0..100);
        assert_eq!(c.as_ptr(), a.as_ptr());
        let d = a.slice(1..100);
        r.push(&d, 0..1);
        assert_eq!(r.pieces.len(), 5);
    }

    #[tokio::test]
    async fn flush_writes_every_span_in_order_and_moves_the_offset() {
        let t = tempfile::tempdir().unwrap();
        let f = std::sync::Arc::new(
            std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(t.path().join("f"))
                .unwrap(),
        );
        let a = Bytes::from((0u8..100).collect::<Vec<_>>());
        let mut r = Ready::default();
        r.push(&a, 10..20);
        r.push(&a, 20..30);
        r.push(&a, 90..100);
        let mut got = 5;
        write_at(&f, &mut r, &mut got).await.unwrap();
        assert_eq!((got, r.len, r.pieces.len()), (35, 0, 0));
        let mut back = vec![0u8; 30];
        f.read_exact_at(&mut back, 5).unwrap();
        let want: Vec<u8> = (10u8..30).chain(90..100).collect();
        assert_eq!(back, want);

        // More spans than one call takes, each its own piece (as from QUIC).
        let pieces: Vec<Bytes> = (0..2500u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 7]))
            .collect();
        for p in &pieces {
            r.push(p, 0..7);
        }
        write_at(&f, &mut r, &mut got).await.unwrap();
        assert_eq!(got, 35 + 2500 * 7);
        let mut back = vec![0u8; 2500 * 7];
        f.read_exact_at(&mut back, 35).unwrap();
        let want: Vec<u8> = (0..2500u32).flat_map(|i| [(i % 251) as u8; 7]).collect();
        assert!(back == want);
    }
}
