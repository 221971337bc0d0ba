//! A NAR readable from any offset without serializing what comes before it: the layout of a
//! path's NAR (where each header and each file's contents sit) is found by walking the tree
//! with `readdir`, `lstat` and `readlink` only, never reading a file; then a read at any offset
//! copies header bytes from the layout and file bytes straight from the file that holds them.
//! The bytes are those of [`super::nar::dump`] (tests hold them to it at random offsets).
//!
//! This is how a node serves the NARs of its own builds from the live Nix store, keeping no copy:
//! a range request (HTTP `Range`, a peer's range of chunk groups) reads only its own bytes.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::nar::NarError;

/// One stretch of the NAR.
#[derive(Debug, Clone)]
enum Piece {
    /// `len` bytes of headers, names and padding, at `start` in [`NarLayout::structure`].
    Structure { start: usize, len: usize },
    /// The contents of the regular file `files[file]`, `len` bytes.
    File { file: usize, len: u64 },
}

/// Where everything of one path's NAR sits.
#[derive(Debug)]
pub struct NarLayout {
    root: PathBuf,
    structure: Vec<u8>,
    /// Paths of the regular files, relative to `root` (empty for a root that is a file).
    files: Vec<PathBuf>,
    /// NAR offset of each piece, and the piece.
    pieces: Vec<(u64, Piece)>,
    size: u64,
}

impl NarLayout {
    /// Walk `root` (metadata only) and lay its NAR out.
    pub fn of(root: &Path) -> Result<Self, NarError> {
        let mut b = Builder {
            layout: NarLayout {
                root: root.to_owned(),
                structure: Vec::new(),
                files: Vec::new(),
                pieces: Vec::new(),
                size: 0,
            },
            open: None,
        };
        b.str(b"nix-archive-1");
        b.node(root, PathBuf::new())?;
        b.close();
        Ok(b.layout)
    }

    /// The NAR's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes kept in memory for this layout (headers and file names), for cache accounting.
    pub fn weight(&self) -> usize {
        self.structure.len()
            + self
                .files
                .iter()
                .map(|f| f.as_os_str().len() + 32)
                .sum::<usize>()
            + self.pieces.len() * 32
    }

    /// Fill `buf` with the NAR's bytes from `offset` on (the tests' shorthand for
    /// [`NarLayout::read_into`]).
    #[cfg(test)]
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), NarError> {
        let mut v = Vec::with_capacity(buf.len());
        self.read_into(offset, buf.len(), &mut v)?;
        buf.copy_from_slice(&v);
        Ok(())
    }

    /// Append `len` of the NAR's bytes from `offset` on to `out` (whose spare room is never
    /// zeroed first: pieces are megabytes). Files are read at the position asked; a file that is
    /// shorter than laid out (changed since) is an error.
    pub fn read_into(
        &self,
        mut offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), NarError> {
        if offset + len as u64 > self.size {
            return Err(NarError::Read {
                path: self.root.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "read past the NAR's end"),
            });
        }
        out.reserve(len);
        let mut left = len;
        let mut i = match self.pieces.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let mut open: Option<(usize, File)> = None;
        while left > 0 {
            let (start, piece) = &self.pieces[i];
            let within = offset - start;
            let n = match piece {
                Piece::Structure { start: s, len } => {
                    let n = (*len - within as usize).min(left);
                    let from = s + within as usize;
                    out.extend_from_slice(&self.structure[from..from + n]);
                    n
                }
                Piece::File { file, len } => {
                    let n = ((len - within) as usize).min(left);
                    let rel = &self.files[*file];
                    // A root that is a file has an empty relative path (joining it would add a '/').
                    let path = if rel.as_os_str().is_empty() {
                        self.root.clone()
                    } else {
                        self.root.join(rel)
                    };
                    let read_err = |source| NarError::Read {
                        path: path.clone(),
                        source,
                    };
                    if open.as_ref().is_none_or(|(f, _)| f != file) {
                        open = Some((*file, File::open(&path).map_err(read_err)?));
                    }
                    let Some((_, f)) = &mut open else {
                        unreachable!("opened above")
                    };
                    f.seek(io::SeekFrom::Start(within)).map_err(read_err)?;
                    // `read_to_end` reads into the spare room without zeroing it.
                    let got = Read::take(&mut *f, n as u64)
                        .read_to_end(out)
                        .map_err(read_err)?;
                    if got < n {
                        return Err(NarError::Changed(path.clone()));
                    }
                    n
                }
            };
            left -= n;
            offset += n as u64;
            i += 1;
        }
        Ok(())
    }
}

struct Builder {
    layout: NarLayout,
    /// Start of the structure piece being written.
    open: Option<usize>,
}

impl Builder {
    fn bytes(&mut self, data: &[u8]) {
        if self.open.is_none() {
            self.open = Some(self.layout.structure.len());
        }
        self.layout.structure.extend_from_slice(data);
    }

    /// End the structure piece being written, if any.
    fn close(&mut self) {
        if let Some(start) = self.open.take() {
            let len = self.layout.structure.len() - start;
            if len > 0 {
                self.layout
                    .pieces
                    .push((self.layout.size, Piece::Structure { start, len }));
                self.layout.size += len as u64;
            }
        }
    }

    fn padding(&mut self, len: u64) {
        let pad = (8 - (len % 8) as usize) % 8;
        self.bytes(&[0u8; 8][..pad]);
    }

    fn str(&mut self, s: &[u8]) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s);
        self.padding(s.len() as u64);
    }

    fn node(&mut self, path: &Path, rel: PathBuf) -> Result<(), NarError> {
        let read_err = |source| NarError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(read_err)?;
        self.str(b"(");
        self.str(b"type");
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(read_err)?;
            self.str(b"symlink");
            self.str(b"target");
            self.str(target.as_os_str().as_bytes());
        } else if ft.is_file() {
            self.str(b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                self.str(b"executable");
                self.str(b"");
            }
            self.str(b"contents");
            let len = meta.len();
            self.bytes(&len.to_le_bytes());
            if len > 0 {
                self.close();
                let file = self.layout.files.len();
                self.layout.files.push(rel);
                self.layout
                    .pieces
                    .push((self.layout.size, Piece::File { file, len }));
                self.layout.size += len;
            }
            self.padding(len);
        } else if ft.is_dir() {
            self.str(b"directory");
            let mut names: Vec<OsString> = fs::read_dir(path)
                .map_err(read_err)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.str(b"entry");
                self.str(b"(");
                self.str(b"name");
                self.str(name.as_bytes());
                self.str(b"node");
                self.node(&path.join(&name), rel.join(&name))?;
                self.str(b")");
            }
        } else {
            return Err(NarError::FileType(path.to_owned()));
        }
        self.str(b")");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tree with files of many sizes (empty, odd, larger than a chunk group), an executable,
    /// nested directories and symlinks.
    fn tree(dir: &Path, seed: u64) -> PathBuf {
        let root = dir.join("root");
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) as u8
                })
                .collect()
        };
        fs::write(root.join("zero"), b"").unwrap();
        fs::write(root.join("a/odd"), bytes(13)).unwrap();
        fs::write(root.join("a/b/big"), bytes(70_001 + (seed as usize % 5000))).unwrap();
        fs::write(root.join("a/b/c/exe"), bytes(4096)).unwrap();
        fs::set_permissions(root.join("a/b/c/exe"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a/b/big", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/nowhere/at/all", root.join("a/dangling")).unwrap();
        root
    }

    fn dumped(root: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        super::super::nar::dump(root, &mut v).unwrap();
        v
    }

    #[test]
    fn the_whole_layout_reads_back_as_the_dump() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path(), 1);
        let want = dumped(&root);
        let layout = NarLayout::of(&root).unwrap();
        assert_eq!(layout.size(), want.len() as u64);
        let mut got = vec![0u8; want.len()];
        layout.read_exact_at(0, &mut got).unwrap();
        assert!(got == want);
        // A single file, and a symlink, as the root.
        for r in [root.join("a/b/big"), root.join("link"), root.join("zero")] {
            let want = dumped(&r);
            let l = NarLayout::of(&r).unwrap();
            let mut got = vec![0u8; want.len()];
            l.read_exact_at(0, &mut got).unwrap();
            assert!(got == want, "{}", r.display());
        }
    }

    #[test]
    fn a_file_cut_short_since_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path(), 2);
        let layout = NarLayout::of(&root).unwrap();
        fs::write(root.join("a/b/big"), b"short").unwrap();
        let mut buf = vec![0u8; layout.size() as usize];
        assert!(layout.read_exact_at(0, &mut buf).is_err());
        assert!(layout.read_exact_at(layout.size(), &mut [0u8; 1]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_range_reads_as_the_same_range_of_the_dump(seed in 0u64..1000, a in any::<u64>(), b in any::<u64>()) {
            let dir = tempfile::tempdir().unwrap();
            let root = tree(dir.path(), seed);
            let want = dumped(&root);
            let layout = NarLayout::of(&root).unwrap();
            let len = want.len() as u64;
            let (mut s, mut e) = (a % (len + 1), b % (len + 1));
            if s > e { std::mem::swap(&mut s, &mut e); }
            let mut got = vec![0u8; (e - s) as usize];
            layout.read_exact_at(s, &mut got).unwrap();
            prop_assert!(got[..] == want[s as usize..e as usize]);
        }
    }
}
