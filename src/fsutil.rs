//! Small file-system helpers every part uses, depending on nothing of ours: atomic, durable
//! file writes (temp file, fsync, rename, fsync of the directory), so a crash at any moment
//! leaves either the old file or the new one, never an empty or half-written one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Write `data` to `path` with `mode`, atomically and durably: a hidden temporary file beside
/// it is written and fsync'd, renamed over `path`, and the directory is fsync'd. A crash leaves
/// the old content (or nothing) and at worst a stray `.NAME.tmp-PID` file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode of a file that already existed is not changed by `open`.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory, so the names created or renamed in it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Create `dir` (and its parents) and give it exactly `mode`.
pub fn create_dir_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// `len` bytes of `file` from `offset`, read into a new buffer that is never zeroed first (a
/// NAR's pieces are megabytes). Blocking; an early end of file is `UnexpectedEof`.
pub fn read_vec_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let (at, want) = (offset + buf.len() as u64, len - buf.len());
        let n = match rustix::io::pread(file, &mut buf.spare_capacity_mut()[..want], at) {
            Ok((read, _)) => read.len(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ends early",
            ));
        }
        // SAFETY: pread initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn replaces_whole_files_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        write_atomic(&p, b"first", 0o600).unwrap();
        write_atomic(&p, b"second", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        write_atomic(&p, b"old", 0o600).unwrap();
        // A path whose parent is a file cannot be written.
        assert!(write_atomic(&p.join("x"), b"new", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn read_vec_at_reads_exactly_and_refuses_a_short_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(read_vec_at(&f, 0, data.len()).unwrap(), data);
        assert_eq!(read_vec_at(&f, 1000, 5000).unwrap(), &data[1000..6000]);
        assert!(read_vec_at(&f, 0, 0).unwrap().is_empty());
        let e = read_vec_at(&f, 299_000, 2000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
