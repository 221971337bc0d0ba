//! Compressing a NAR into a file on its way to the bucket: the bytes stream in, go through the
//! configured compressor, and land in a file while their sha256 (the narinfo's `FileHash`) and
//! size are taken. Never a whole NAR in memory.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use sha2::Digest as _;
use tokio::sync::mpsc;

use crate::config::Compression;

/// What a compressed file is: its sha256 and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: [u8; 32],
    pub size: u64,
}

/// Hands compressed output on in 1 MiB pieces to the thread that hashes and writes it, so
/// compressing and hashing run on two cores.
struct Forward {
    buf: BytesMut,
    tx: std::sync::mpsc::SyncSender<Bytes>,
}

const PIECE: usize = 1 << 20;

impl Forward {
    fn send(&mut self) -> io::Result<()> {
        let piece = self.buf.split().freeze();
        self.tx
            .send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the file writer stopped"))
    }
}

impl Write for Forward {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// zstd level Nix uses by default (its `compression-level` of -1 means the library default).
const ZSTD_LEVEL: i32 = 3;
/// xz preset Nix uses by default.
const XZ_PRESET: u32 = 6;

/// Compress the chunks arriving on `rx` into `dest` (created anew); blocking: run it on a
/// blocking thread. An `Err` chunk aborts.
pub fn compress_into(
    mut rx: mpsc::Receiver<io::Result<Bytes>>,
    how: Compression,
    dest: &Path,
) -> io::Result<FileDigest> {
    let file = File::create(dest)?;
    let (tx, pieces) = std::sync::mpsc::sync_channel::<Bytes>(4);
    let writer = std::thread::Builder::new()
        .name("narmesh-mirror-write".into())
        .spawn(move || -> io::Result<FileDigest> {
            let mut file = BufWriter::with_capacity(PIECE, file);
            let mut sha = sha2::Sha256::new();
            let mut size = 0u64;
            for piece in pieces {
                sha.update(&piece);
                size += piece.len() as u64;
                file.write_all(&piece)?;
            }
            // No fsync: a temporary file; after a crash the NAR is compressed again.
            file.flush()?;
            Ok(FileDigest {
                sha256: sha.finalize().into(),
                size,
            })
        })?;
    let out = Forward {
        buf: BytesMut::with_capacity(PIECE),
        tx,
    };
    let mut feed = |w: &mut dyn Write| -> io::Result<()> {
        while let Some(chunk) = rx.blocking_recv() {
            w.write_all(&chunk?)?;
        }
        Ok(())
    };
    let compressed = (|| -> io::Result<Forward> {
        Ok(match how {
            Compression::None => {
                let mut out = out;
                feed(&mut out)?;
                out
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                feed(&mut enc)?;
                enc.finish()?
            }
            Compression::Xz => {
                let mut enc = xz2::write::XzEncoder::new(out, XZ_PRESET);
                feed(&mut enc)?;
                enc.finish()?
            }
        })
    })();
    // On success flush the last piece; either way close the channel so the writer ends.
    let sent = compressed.and_then(|mut out| out.flush());
    let written = writer
        .join()
        .map_err(|_| io::Error::other("the file writer panicked"))?;
    sent?;
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn run(how: Compression, data: &[u8]) -> (FileDigest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let (tx, rx) = mpsc::channel(4);
        let chunks: Vec<Bytes> = data.chunks(7000).map(Bytes::copy_from_slice).collect();
        let feeder = std::thread::spawn(move || {
            for c in chunks {
                tx.blocking_send(Ok(c)).unwrap();
            }
        });
        let d = compress_into(rx, how, &dest).unwrap();
        feeder.join().unwrap();
        (d, std::fs::read(&dest).unwrap())
    }

    #[test]
    fn each_compression_round_trips_and_hashes_the_file() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for how in [Compression::None, Compression::Zstd, Compression::Xz] {
            let (d, file) = run(how, &data);
            assert_eq!(d.size, file.len() as u64);
            assert_eq!(d.sha256, <[u8; 32]>::from(sha2::Sha256::digest(&file)));
            let mut back = Vec::new();
            match how {
                Compression::None => back = file.clone(),
                Compression::Zstd => back = zstd::decode_all(file.as_slice()).unwrap(),
                Compression::Xz => {
                    xz2::read::XzDecoder::new(file.as_slice())
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, data, "{how:?}");
        }
    }

    #[test]
    fn output_is_deterministic() {
        let data = vec![42u8; 100_000];
        assert_eq!(
            run(Compression::Zstd, &data).0,
            run(Compression::Zstd, &data).0
        );
    }

    #[test]
    fn an_error_chunk_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.try_send(Err(io::Error::other("gone"))).unwrap();
        drop(tx);
        assert!(compress_into(rx, Compression::Zstd, &dir.path().join("o")).is_err());
    }
}
