//! The whole NAR's checks, read back from its file: the sha256 (against the signed NarHash)
//! following the verified prefix as it grows, and the BLAKE3 leaves of a NAR that came whole
//! from a version 1 provider.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use sha2::Digest as _;

use super::Transfer;
use crate::chunks::Leaves;

/// The sha256 of a transfer's NAR, hashed from its file as the verified prefix grows (read back
/// from the page cache, on a blocking thread, a stretch at a time).
pub(super) async fn follow_sha256(
    t: Arc<Transfer>,
    file: Arc<File>,
    at: super::super::behind::Cursor,
) -> Result<[u8; 32], String> {
    let mut progress = t.progress();
    let mut h = sha2::Sha256::new();
    let mut pos = 0u64;
    // One buffer for every stretch (a fresh one each time is a megabyte of page faults).
    let mut buf = vec![0u8; (1 << 20).min(t.size as usize)];
    loop {
        let p = progress.borrow_and_update().clone();
        if p.verified > pos {
            let (from, to, f) = (pos, p.verified.min(t.size), file.clone());
            (h, buf) = tokio::task::spawn_blocking(move || {
                let mut at = from;
                while at < to {
                    let n = (to - at).min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], at)?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                Ok::<_, std::io::Error>((h, buf))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading the NAR back for its sha256: {e}"))?;
            pos = to;
            at.set(pos);
            if pos >= t.size {
                return Ok(h.finalize().into());
            }
            continue;
        }
        if p.done.is_some() || progress.changed().await.is_err() {
            return Err("the transfer ended before its last byte".into());
        }
    }
}

pub(super) fn leaves_of(file: &File, size: u64) -> std::io::Result<Leaves> {
    let mut h = crate::chunks::LeafHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finish())
}
