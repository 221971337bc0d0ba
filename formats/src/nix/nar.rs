//! The NAR serializer: a filesystem tree to Nix ARchive bytes, byte-identical to
//! `nix-store --dump`, streamed through fixed-size chunks so no file is ever held whole.
//!
//! [`dump`] writes the NAR alone; [`dump_hashed`] also computes its sha256 (for Nix) and BLAKE3
//! (for content addressing) in the same pass, sha256 on a second core once the NAR outgrows
//! one chunk.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::Digest;

use super::hash::Sha256;

/// Size of the chunks the NAR is produced in.
pub const CHUNK: usize = 1 << 20;

/// What went wrong while serializing a path.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the NAR: {0}")]
    Write(#[source] io::Error),
    #[error("{0}: not a regular file, directory or symlink")]
    FileType(PathBuf),
    #[error("{0}: changed size while being read")]
    Changed(PathBuf),
}

/// The size and both hashes of a NAR, from [`dump_hashed`], and the BLAKE3 leaves (the chunk
/// groups' chaining values) that verify any range of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarDigests {
    pub nar_size: u64,
    pub sha256: Sha256,
    pub blake3: [u8; 32],
    pub leaves: crate::chunks::Leaves,
}

/// Serialize `path` as a NAR into `out`; returns the NAR size.
pub fn dump(path: &Path, out: impl Write) -> Result<u64, NarError> {
    let mut enc = Encoder::new(PlainSink { out });
    enc.archive(path)?;
    enc.finish()
}

/// Serialize `path` as a NAR into `out`, computing sha256 and BLAKE3 of the NAR on the way.
pub fn dump_hashed(path: &Path, out: impl Write) -> Result<NarDigests, NarError> {
    let mut enc = Encoder::new(HashSink::new(out));
    enc.archive(path)?;
    let nar_size = enc.finish()?;
    let (sha256, leaves) = enc.sink.digests();
    Ok(NarDigests {
        nar_size,
        sha256,
        blake3: leaves.root(),
        leaves,
    })
}

/// Where full chunks go.
trait ChunkSink {
    fn consume(&mut self, chunk: Vec<u8>) -> io::Result<Vec<u8>>;
}

struct PlainSink<W> {
    out: W,
}

impl<W: Write> ChunkSink for PlainSink<W> {
    fn consume(&mut self, mut chunk: Vec<u8>) -> io::Result<Vec<u8>> {
        self.out.write_all(&chunk)?;
        chunk.clear();
        Ok(chunk)
    }
}

/// Hashes and forwards chunks. BLAKE3 (the faster hash, as the leaves of its tree) runs inline; sha256 moves to a helper
/// thread from the first full chunk on, so a large NAR is hashed on two cores.
struct HashSink<W> {
    out: W,
    blake: crate::chunks::LeafHasher,
    sha: Sha,
}

enum Sha {
    Inline(sha2::Sha256),
    Thread {
        to: mpsc::SyncSender<Vec<u8>>,
        back: mpsc::Receiver<Vec<u8>>,
        handle: JoinHandle<[u8; 32]>,
        in_flight: usize,
    },
}

/// Chunks in flight to the sha256 thread (bounds memory to a few MiB).
const IN_FLIGHT: usize = 4;

fn helper_gone() -> io::Error {
    io::Error::other("sha256 thread ended early")
}

impl<W: Write> HashSink<W> {
    fn new(out: W) -> Self {
        HashSink {
            out,
            blake: crate::chunks::LeafHasher::new(),
            sha: Sha::Inline(sha2::Sha256::new()),
        }
    }

    fn digests(self) -> (Sha256, crate::chunks::Leaves) {
        let sha = match self.sha {
            Sha::Inline(h) => h.finalize().into(),
            Sha::Thread { to, handle, .. } => {
                drop(to);
                // The helper only ends by returning its digest; a panic there is a bug.
                handle.join().expect("sha256 thread panicked")
            }
        };
        (Sha256(sha), self.blake.finish())
    }

    fn start_thread(&mut self) {
        let Sha::Inline(h) = &mut self.sha else {
            return;
        };
        let mut hasher = std::mem::take(h);
        let (to, rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (tx_back, back) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            for buf in rx {
                hasher.update(&buf);
                let _ = tx_back.send(buf);
            }
            hasher.finalize().into()
        });
        self.sha = Sha::Thread {
            to,
            back,
            handle,
            in_flight: 0,
        };
    }
}

impl<W: Write> ChunkSink for HashSink<W> {
    fn consume(&mut self, mut chunk: Vec<u8>) -> io::Result<Vec<u8>> {
        self.blake.update(&chunk);
        self.out.write_all(&chunk)?;
        if chunk.len() == CHUNK {
            self.start_thread();
        }
        match &mut self.sha {
            Sha::Inline(h) => {
                // The last (or only) chunk of a small NAR: no thread needed.
                h.update(&chunk);
                chunk.clear();
                Ok(chunk)
            }
            Sha::Thread {
                to,
                back,
                in_flight,
                ..
            } => {
                let recycled = if *in_flight >= IN_FLIGHT {
                    Some(back.recv().map_err(|_| helper_gone())?)
                } else {
                    back.try_recv().ok()
                };
                if recycled.is_some() {
                    *in_flight -= 1;
                }
                to.send(chunk).map_err(|_| helper_gone())?;
                *in_flight += 1;
                let mut next = recycled.unwrap_or_else(|| Vec::with_capacity(CHUNK));
                next.clear();
                Ok(next)
            }
        }
    }
}

/// Writes NAR tokens into a chunk buffer, handing full chunks to the sink.
struct Encoder<S> {
    buf: Vec<u8>,
    size: u64,
    sink: S,
}

impl<S: ChunkSink> Encoder<S> {
    fn new(sink: S) -> Self {
        Encoder {
            buf: Vec::with_capacity(CHUNK),
            size: 0,
            sink,
        }
    }

    fn flush(&mut self) -> Result<(), NarError> {
        let full = std::mem::take(&mut self.buf);
        self.size += full.len() as u64;
        self.buf = self.sink.consume(full).map_err(NarError::Write)?;
        Ok(())
    }

    fn bytes(&mut self, mut data: &[u8]) -> Result<(), NarError> {
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = (8 - (len % 8) as usize) % 8;
        self.bytes(&[0u8; 8][..pad])
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.bytes(&(s.len() as u64).to_le_bytes())?;
        self.bytes(s)?;
        self.padding(s.len() as u64)
    }

    fn archive(&mut self, path: &Path) -> Result<(), NarError> {
        self.str(b"nix-archive-1")?;
        self.node(path)
    }

    fn node(&mut self, path: &Path) -> Result<(), NarError> {
        let read_err = |source| NarError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(read_err)?;
        self.str(b"(")?;
        self.str(b"type")?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(read_err)?;
            self.str(b"symlink")?;
            self.str(b"target")?;
            self.str(target.as_os_str().as_bytes())?;
        } else if ft.is_file() {
            self.str(b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.str(b"executable")?;
                self.str(b"")?;
            }
            self.str(b"contents")?;
            self.contents(path)?;
        } else if ft.is_dir() {
            self.str(b"directory")?;
            let mut names: Vec<OsString> = fs::read_dir(path)
                .map_err(read_err)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.str(b"entry")?;
                self.str(b"(")?;
                self.str(b"name")?;
                self.str(name.as_bytes())?;
                self.str(b"node")?;
                self.node(&path.join(&name))?;
                self.str(b")")?;
            }
        } else {
            return Err(NarError::FileType(path.to_owned()));
        }
        self.str(b")")
    }

    /// Stream a regular file's contents straight into the chunk buffer.
    fn contents(&mut self, path: &Path) -> Result<(), NarError> {
        let read_err = |source| NarError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        self.bytes(&len.to_le_bytes())?;
        let mut left = len;
        while left > 0 {
            let start = self.buf.len();
            let want = ((CHUNK - start) as u64).min(left) as usize;
            self.buf.resize(start + want, 0);
            let n = loop {
                match file.read(&mut self.buf[start..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(start);
                        return Err(read_err(e));
                    }
                }
            };
            self.buf.truncate(start + n);
            if n == 0 && want > 0 {
                return Err(NarError::Changed(path.to_owned()));
            }
            left -= n as u64;
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        let mut probe = [0u8; 1];
        if file.read(&mut probe).map_err(read_err)? != 0 {
            return Err(NarError::Changed(path.to_owned()));
        }
        self.padding(len)
    }

    fn finish(&mut self) -> Result<u64, NarError> {
        if !self.buf.is_empty() {
            self.flush()?;
        }
        Ok(self.size)
    }
}
