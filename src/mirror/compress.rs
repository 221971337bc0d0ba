//! Compressing a NAR into a file on its way to the bucket: the bytes stream in piece by piece,
//! go through the configured compressor, and land in a file while their sha256 (the narinfo's
//! `FileHash`) and size are taken. Never a whole NAR in memory.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::Digest as _;

use tokio::sync::watch;

use super::s3::Growth;
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

/// The configured compressor over [`Forward`].
enum Encoder {
    None(Forward),
    Zstd(zstd::stream::write::Encoder<'static, Forward>),
    Xz(xz2::write::XzEncoder<Forward>),
}

/// A NAR being compressed into a file, fed piece by piece as its bytes come (from the storage,
/// or from peers as they arrive): between pieces it holds no thread, so a NAR that arrives
/// slowly does not keep the compressing threads from other NARs. Each call is blocking CPU
/// work: run it on a low-priority thread. The file is hashed and written on a thread of its
/// own, so compressing and hashing run on two cores.
pub struct Compressor {
    enc: Encoder,
    /// `None` once joined early (it stopped: its error was the answer).
    writer: Option<std::thread::JoinHandle<io::Result<FileDigest>>>,
}

impl Compressor {
    /// Start compressing into `dest` (created anew); `growth`, if given, learns how many bytes
    /// the file holds as it grows (an upload may send its parts before the end).
    pub fn new(
        how: Compression,
        dest: &Path,
        growth: Option<Arc<watch::Sender<Growth>>>,
    ) -> io::Result<Self> {
        let mut file = File::create(dest)?;
        let (tx, pieces) = std::sync::mpsc::sync_channel::<Bytes>(4);
        let writer = std::thread::Builder::new()
            .name("narmesh-mirror-write".into())
            .spawn(move || -> io::Result<FileDigest> {
                let mut sha = sha2::Sha256::new();
                let mut size = 0u64;
                // Pieces are 1 MiB (the last may be less): written as they come, unbuffered,
                // so what `growth` counts is in the file.
                for piece in pieces {
                    sha.update(&piece);
                    size += piece.len() as u64;
                    file.write_all(&piece)?;
                    if let Some(g) = &growth {
                        g.send_modify(|g| g.written = size);
                    }
                }
                // No fsync: a temporary file; after a crash the NAR is compressed again.
                Ok(FileDigest {
                    sha256: sha.finalize().into(),
                    size,
                })
            })?;
        let out = Forward {
            buf: BytesMut::with_capacity(PIECE),
            tx,
        };
        let enc = match how {
            Compression::None => Encoder::None(out),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?),
            Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(out, XZ_PRESET)),
        };
        Ok(Compressor {
            enc,
            writer: Some(writer),
        })
    }

    /// Compress the next piece of the NAR.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let written = match &mut self.enc {
            Encoder::None(w) => w.write_all(data),
            Encoder::Zstd(w) => w.write_all(data),
            Encoder::Xz(w) => w.write_all(data),
        };
        // The writer stopped (its end of the channel is gone): its own error (a full disk,
        // say) says more than the broken channel.
        match written {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                Err(self.writer_error().unwrap_or(e))
            }
            r => r,
        }
    }

    /// The error the writer stopped with; only once it has stopped.
    fn writer_error(&mut self) -> Option<io::Error> {
        match self.writer.take()?.join() {
            Ok(Err(e)) => Some(e),
            Ok(Ok(_)) => None,
            Err(_) => Some(io::Error::other("the file writer panicked")),
        }
    }

    /// End the stream: the compressed file's sha256 and size, once it is all written.
    pub fn finish(self) -> io::Result<FileDigest> {
        let out = match self.enc {
            Encoder::None(w) => Ok(w),
            Encoder::Zstd(w) => w.finish(),
            Encoder::Xz(w) => w.finish(),
        };
        // On success flush the last piece; either way close the channel so the writer ends.
        let sent = out.and_then(|mut out| out.flush());
        let Some(writer) = self.writer else {
            return Err(io::Error::other("the file writer stopped"));
        };
        let written = writer
            .join()
            .map_err(|_| io::Error::other("the file writer panicked"))?;
        // The writer's error first: it is the cause when both failed.
        let digest = written?;
        sent?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn run(how: Compression, data: &[u8]) -> (FileDigest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let mut c = Compressor::new(how, &dest, None).unwrap();
        for piece in data.chunks(7000) {
            c.write(piece).unwrap();
        }
        let d = c.finish().unwrap();
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
    fn a_full_disk_is_named_not_hidden_behind_the_broken_channel() {
        // /dev/full takes the open and fails every write with ENOSPC.
        let mut c = Compressor::new(Compression::None, Path::new("/dev/full"), None).unwrap();
        let piece = vec![7u8; 1 << 20];
        let mut failed = None;
        for _ in 0..64 {
            if let Err(e) = c.write(&piece) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => c.finish().expect_err("nothing fits on /dev/full"),
        };
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
    }
}
