//! The hook's spool directory as the node reads it. The spool is writable by the socket
//! group, so what lies in it is untrusted:
//! - report files are read oldest first, in batches of at most [`BATCH_FILES`] files and about
//!   [`BATCH_BYTES`], so a spool that grew for days is taken in with bounded memory;
//! - each is opened without following a link and without blocking, and read only if it is a
//!   regular file of at most one frame: a link, a FIFO or a directory is removed unread, a
//!   larger file rejected unread;
//! - rejected files are kept for inspection in `rejected/` (the node's own directory, never
//!   reached through a link), the newest [`KEEP_REJECTED`] within [`KEEP_REJECTED_BYTES`] of
//!   disk;
//! - a file that can be neither taken in nor set aside (a mount point) is passed over, so it
//!   never holds back the reports behind it;
//! - temporary files of hooks killed while spooling are removed.
//!
//! Taking the reports in (validation, the durable queue) is [`crate::ingest`]'s.

use std::collections::HashMap;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use narmesh_proto::control::{Envelope, Request};
use narmesh_proto::frame::{self, MAX_FRAME};
use narmesh_proto::hook::HookReport;
use rustix::fs::{AtFlags, CWD, Mode, OFlags};

/// Report files read in one batch, at most.
pub const BATCH_FILES: usize = 512;
/// A batch stops once it has read this many bytes (a file is at most one frame more).
pub const BATCH_BYTES: u64 = 16 << 20;
/// Rejected files kept, at most (the newest).
pub const KEEP_REJECTED: usize = 1000;
/// Bytes of rejected files kept, at most (the newest).
pub const KEEP_REJECTED_BYTES: u64 = 64 << 20;
/// Rejected files a round names in the log, each with why; the rest are counted in one line.
pub const LOG_REJECTED: usize = 10;
/// How old a hook's temporary spool file must be before it is taken as left by a hook that was
/// killed mid-write (a live hook renames its file within milliseconds).
pub(crate) const STALE_TEMP: Duration = Duration::from_secs(60);
/// A spool file holds one frame: its length prefix and at most [`MAX_FRAME`] bytes.
const MAX_FILE: u64 = 4 + MAX_FRAME as u64;

/// The oldest report files of the spool, each decoded or with why not.
#[derive(Debug, Default)]
pub struct Batch {
    pub files: Vec<(PathBuf, Result<HookReport, Unread>)>,
    /// More report files wait behind this batch.
    pub more: bool,
}

/// Read the oldest report files of `dir` (none if it does not exist), within the batch bounds,
/// passing over those in `ignored` (files that could be neither taken in nor set aside; those
/// gone from the spool leave the set).
pub fn read_batch(dir: &Path, ignored: &mut PassedOver) -> std::io::Result<Batch> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Batch::default()),
        Err(e) => return Err(e),
    };
    // The hook names its files by the time they were written: the oldest are the least. Only
    // the batch's worth is kept while the directory is read (a spool of a million files is
    // read in 2,000 batches: sorting all of it each time cost memory and time for every one).
    let now = Instant::now();
    ignored.retain(|_, until| until.is_none_or(|t| now < t));
    let mut oldest = std::collections::BinaryHeap::with_capacity(BATCH_FILES + 1);
    let (mut waiting, mut still_ignored) = (0usize, std::collections::HashSet::new());
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if !is_report(&p) {
            continue;
        }
        if ignored.contains_key(&p) {
            still_ignored.insert(p);
            continue;
        }
        waiting += 1;
        oldest.push(p);
        if oldest.len() > BATCH_FILES {
            oldest.pop();
        }
    }
    // Files gone from the spool leave the set.
    ignored.retain(|p, _| still_ignored.contains(p));
    let paths = oldest.into_sorted_vec();
    let mut batch = Batch::default();
    let mut bytes = 0;
    for p in paths {
        if bytes >= BATCH_BYTES {
            break;
        }
        let (report, read) = read_report(&p);
        bytes += read;
        batch.files.push((p, report));
    }
    batch.more = waiting > batch.files.len();
    Ok(batch)
}

/// Files passed over: for good (`None`: they can be neither taken in nor set aside) or until
/// a time (they could not be read, and are read again then). Those gone from the spool leave.
pub type PassedOver = HashMap<PathBuf, Option<Instant>>;

/// Why a report file was not read.
#[derive(Debug, PartialEq)]
pub enum Unread {
    /// It is not a report and never will be (a link, a FIFO, too large, garbage): set aside.
    Bad(String),
    /// Reading it failed (an I/O error, no file descriptor or memory left): it stays where
    /// it is and is read again later; it is not the file's fault, and it may be the only
    /// record of a build.
    Failed(String),
    /// It is no longer there (taken by hand meanwhile).
    Gone,
}

fn is_report(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "frame")
}

/// One report file (a regular file, not a link nor a FIFO, of one frame), and the bytes read.
fn read_report(path: &Path) -> (Result<HookReport, Unread>, u64) {
    let mut bytes = Vec::new();
    let read = read_file(path, &mut bytes);
    let n = bytes.len() as u64;
    (read.and_then(|()| decode(&bytes).map_err(Unread::Bad)), n)
}

fn read_file(path: &Path, bytes: &mut Vec<u8>) -> Result<(), Unread> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Unread::Bad("a symbolic link, not a report".to_owned()),
            // A socket (or a device node whose driver is absent) cannot be opened.
            Some(libc::ENXIO | libc::ENODEV) => Unread::Bad(format!("not a regular file ({e})")),
            Some(libc::ENOENT) => Unread::Gone,
            // Not readable by the node (a hook always writes what the node may read).
            Some(libc::EACCES | libc::EPERM) => Unread::Bad(format!("not readable here ({e})")),
            _ => Unread::Failed(format!("opening it: {e}")),
        })?;
    let meta = f
        .metadata()
        .map_err(|e| Unread::Failed(format!("looking at it: {e}")))?;
    if !meta.is_file() {
        return Err(Unread::Bad(format!(
            "not a regular file ({:?})",
            meta.file_type()
        )));
    }
    if meta.len() > MAX_FILE {
        return Err(Unread::Bad(format!(
            "{} bytes, over the limit of one frame ({MAX_FILE})",
            meta.len()
        )));
    }
    bytes.reserve_exact(meta.len() as usize);
    // The file may grow after it was looked at: read no more than a frame, and one byte to see.
    (&mut f)
        .take(MAX_FILE + 1)
        .read_to_end(bytes)
        .map_err(|e| Unread::Failed(format!("reading it: {e}")))?;
    Ok(())
}

/// A spool file holds exactly one frame, as the hook would have sent it.
fn decode(bytes: &[u8]) -> Result<HookReport, String> {
    let prefix: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated")?;
    let len = frame::payload_len(prefix).map_err(|e| e.to_string())?;
    if bytes.len() != 4 + len {
        return Err("truncated or trailing bytes".into());
    }
    match frame::decode::<Envelope>(&bytes[4..])
        .map_err(|e| e.to_string())?
        .request
    {
        Request::Hook(r) => Ok(r),
        _ => Err("not a hook report".into()),
    }
}

/// Set a spool file that cannot be taken in aside, never retried: a regular file is moved to
/// `rejected/` for inspection; anything else (a link, a FIFO, a directory), or any file when
/// `rejected/` is not the node's own directory, is removed.
pub fn reject(dir: &Path, path: &Path) -> std::io::Result<()> {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    match rejected_dir(dir, true)? {
        Some(rejected) if regular => {
            let name = path.file_name().unwrap_or_default();
            Ok(rustix::fs::renameat(CWD, path, &rejected, name)?)
        }
        _ => remove_entry(path),
    }
}

/// `dir/rejected`, opened (made if missing and `make`), never through a link: a link or a file
/// of that name is replaced by a directory. `None` if it is a directory of another user (or
/// missing and not to be made). Everything done in it goes through this descriptor, so a name
/// swapped meanwhile changes nothing.
fn rejected_dir(dir: &Path, make: bool) -> std::io::Result<Option<OwnedFd>> {
    let rejected = dir.join("rejected");
    let open = || {
        rustix::fs::openat(
            CWD,
            &rejected,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) => {
            match e {
                rustix::io::Errno::NOENT if !make => return Ok(None),
                rustix::io::Errno::NOENT => {}
                rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                    tracing::warn!("{} is not a directory: replaced by one", rejected.display());
                    rustix::fs::unlink(&rejected)?;
                }
                e => return Err(e.into()),
            }
            match rustix::fs::mkdir(&rejected, Mode::RWXU) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            match open() {
                Ok(fd) => fd,
                // Replaced again meanwhile: set aside nothing this time.
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let owner = rustix::fs::fstat(&fd)?.st_uid;
    if owner != rustix::process::geteuid().as_raw() {
        tracing::warn!(
            "{} belongs to uid {owner}, not to the node: rejected spool files are removed",
            rejected.display()
        );
        return Ok(None);
    }
    Ok(Some(fd))
}

/// Remove a directory entry, whatever it is (never following a link).
fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keep the newest [`KEEP_REJECTED`] rejected files within [`KEEP_REJECTED_BYTES`] of disk;
/// how many others were removed. Newest by when they were rejected (the change time a rename sets).
pub fn prune_rejected(dir: &Path) -> std::io::Result<usize> {
    let Some(rejected) = rejected_dir(dir, false)? else {
        return Ok(0);
    };
    let mut kept = Vec::new();
    for e in rustix::fs::Dir::read_from(&rejected)? {
        let name = e?.file_name().to_owned();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let st = match rustix::fs::statat(&rejected, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let when = (st.st_ctime as i64, st.st_ctime_nsec as i64);
        // The disk it takes (a sparse file takes little).
        kept.push((when, name, st.st_blocks as u64 * 512));
    }
    if kept.len() <= KEEP_REJECTED && kept.iter().map(|k| k.2).sum::<u64>() <= KEEP_REJECTED_BYTES {
        return Ok(0);
    }
    // Newest first; files rejected at the same tick by name, as the hook names them by time.
    kept.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let (mut n, mut bytes, mut removed) = (0, 0, 0);
    for (_, name, len) in kept {
        if n < KEEP_REJECTED && bytes + len <= KEEP_REJECTED_BYTES {
            // Kept; a file larger than the bound goes alone.
            n += 1;
            bytes += len;
        } else {
            // Only the node writes here, and only regular files.
            match rustix::fs::unlinkat(&rejected, &name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => removed += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    if removed > 0 {
        rustix::fs::fsync(&rejected)?;
        tracing::info!(
            "spool: removed {removed} rejected file(s), keeping the newest within {KEEP_REJECTED} files and {} MiB",
            KEEP_REJECTED_BYTES >> 20
        );
    }
    Ok(removed)
}

/// Spooled reports waiting, and reports rejected for good (kept in `rejected/`): regular files.
pub fn counts(dir: &Path) -> (u64, u64) {
    let count = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| is_report(&e.path()) && e.file_type().is_ok_and(|t| t.is_file()))
                    .count() as u64
            })
            .unwrap_or(0)
    };
    (count(dir), count(&dir.join("rejected")))
}

/// Remove the temporary files of hooks killed while spooling.
pub fn clean_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP);
        if old && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!("spool: removed {name}, left by a hook killed while spooling");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A temporary file a hook may still be writing is kept; one older than a minute, left by
    /// a hook killed mid-write, goes; a report file is never touched, however old.
    #[test]
    fn only_temporary_files_older_than_a_minute_are_cleaned() {
        let t = tempfile::tempdir().unwrap();
        let at = |name: &str, age: Duration| {
            let p = t.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(std::time::SystemTime::now() - age).unwrap();
            p
        };
        let writing = at(".000000000000000000000002-2.tmp", Duration::from_secs(50));
        let left = at(".000000000000000000000001-1.tmp", Duration::from_secs(70));
        let report = at(
            "000000000000000000000001-1.frame",
            Duration::from_secs(3600),
        );
        clean_stale_temps(t.path());
        assert!(writing.exists(), "a temporary file 50 s old was removed");
        assert!(!left.exists(), "a temporary file 70 s old was kept");
        assert!(report.exists());
    }

    /// A hook of the previous release (socket protocol v1, `tests/fixtures/v1`) spooled a
    /// frame this node still takes in, and would send it over the socket the same way: a
    /// rolling upgrade leaves no spooled report behind in `rejected/`.
    #[test]
    fn a_previous_hooks_frame_is_still_a_report() {
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/v1/hook-frame.bin"),
        )
        .unwrap();
        let report = decode(&bytes).unwrap();
        assert_eq!(
            report.drv_path.as_deref(),
            Some("/nix/store/lpl217al9ljda6d7jg8rwcylhxcn94qi-fixture-mid.drv")
        );
        assert_eq!(
            report.out_paths,
            ["/nix/store/xhk6fzqnwsnl4a9k2rm073ryw945cnh1-fixture-mid"]
        );
        let sent: Envelope = frame::read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(sent.version, 1);
        assert_eq!(sent.request, Request::Hook(report));
    }

    proptest! {
        /// Any bytes give a report or an error, never a panic; a report's frame gives the
        /// report back, and the frame cut short or with a byte more is refused.
        #[test]
        fn decode_takes_exactly_one_hook_frame(
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            drv in proptest::option::of("[a-z0-9/.-]{0,80}"),
            outs in proptest::collection::vec("[a-z0-9/.-]{0,80}", 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let _ = decode(&junk);
            let r = HookReport { drv_path: drv, out_paths: outs };
            let bytes = frame::encode(&Envelope {
                version: narmesh_proto::HOOK_PROTOCOL_VERSION,
                request: Request::Hook(r.clone()),
            })
            .unwrap();
            prop_assert_eq!(decode(&bytes), Ok(r));
            prop_assert!(decode(&bytes[..cut.index(bytes.len())]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(decode(&longer).is_err());
        }
    }

    fn report(i: usize) -> Vec<u8> {
        frame::encode(&Envelope {
            version: narmesh_proto::HOOK_PROTOCOL_VERSION,
            request: Request::Hook(HookReport {
                drv_path: None,
                out_paths: vec![format!("/nix/store/{i:032}-x")],
            }),
        })
        .unwrap()
    }

    #[test]
    fn a_batch_is_the_oldest_files_within_its_bounds() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..BATCH_FILES + 3 {
            std::fs::write(d.path().join(format!("{i:06}.frame")), report(i)).unwrap();
        }
        std::fs::write(d.path().join(".x.tmp"), b"half").unwrap();
        let b = read_batch(d.path(), &mut PassedOver::new()).unwrap();
        assert!(b.more);
        assert_eq!(b.files.len(), BATCH_FILES);
        // The oldest, in order, whatever order the directory lists them in.
        for (i, (p, _)) in b.files.iter().enumerate() {
            assert_eq!(p.file_name().unwrap(), format!("{i:06}.frame").as_str());
        }
        assert!(b.files.iter().all(|(_, r)| r.is_ok()));
        // Large files end a batch by bytes.
        let d = tempfile::tempdir().unwrap();
        let big = vec![0u8; MAX_FILE as usize];
        for i in 0..20 {
            std::fs::write(d.path().join(format!("{i:06}.frame")), &big).unwrap();
        }
        let b = read_batch(d.path(), &mut PassedOver::new()).unwrap();
        assert!(b.more);
        assert_eq!(b.files.len() as u64, BATCH_BYTES.div_ceil(MAX_FILE));
        assert!(b.files.iter().all(|(_, r)| r.is_err()));
        assert!(
            read_batch(&d.path().join("none"), &mut PassedOver::new())
                .unwrap()
                .files
                .is_empty()
        );
        // Files passed over do not count; those gone leave the set.
        let mut ignored: PassedOver = [
            (d.path().join("000000.frame"), None),
            (d.path().join("gone.frame"), None),
            // Passed over until a time already past: read again.
            (d.path().join("000001.frame"), Some(Instant::now())),
        ]
        .into();
        let b = read_batch(d.path(), &mut ignored).unwrap();
        assert_eq!(b.files[0].0.file_name().unwrap(), "000001.frame");
        assert_eq!(ignored.len(), 1);
    }

    #[test]
    fn what_is_not_a_regular_file_of_one_frame_is_refused_unread() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        rustix::fs::mkfifoat(CWD, p.join("1.frame"), Mode::RUSR | Mode::WUSR).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p.join("2.frame")).unwrap();
        std::fs::create_dir(p.join("3.frame")).unwrap();
        let f = std::fs::File::create(p.join("4.frame")).unwrap();
        f.set_len(1 << 40).unwrap();
        std::fs::write(p.join("5.frame"), report(5)).unwrap();
        let b = read_batch(p, &mut PassedOver::new()).unwrap();
        let why: Vec<String> = b
            .files
            .iter()
            .map(|(_, r)| match r {
                Err(Unread::Bad(why)) => why.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert!(why[0].contains("not a regular file"), "{why:?}");
        assert!(why[1].contains("symbolic link"), "{why:?}");
        assert!(why[2].contains("not a regular file"), "{why:?}");
        assert!(why[3].contains("over the limit"), "{why:?}");
        assert!(why[4].starts_with("Ok("), "{why:?}");
        for (path, _) in &b.files[..4] {
            reject(p, path).unwrap();
        }
        // The oversized file is kept for inspection; the FIFO, the link (not what it points
        // to) and the directory are removed.
        assert_eq!(counts(p), (1, 1));
        assert!(p.join("rejected/4.frame").is_file());
        assert_eq!(std::fs::read_dir(p).unwrap().count(), 2);
    }

    #[test]
    fn rejected_files_never_follow_a_link_and_stay_within_bounds() {
        let d = tempfile::tempdir().unwrap();
        let (spool, elsewhere) = (d.path().join("spool"), d.path().join("elsewhere"));
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("precious"), b"x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, spool.join("rejected")).unwrap();
        std::fs::write(spool.join("a.frame"), b"junk").unwrap();
        reject(&spool, &spool.join("a.frame")).unwrap();
        assert!(!spool.join("rejected").is_symlink());
        assert!(spool.join("rejected/a.frame").exists());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1);
        for i in 0..KEEP_REJECTED + 5 {
            std::fs::write(spool.join(format!("rejected/b{i:05}.frame")), b"junk").unwrap();
        }
        assert_eq!(prune_rejected(&spool).unwrap(), 6);
        assert_eq!(counts(&spool).1, KEEP_REJECTED as u64);
        assert!(
            spool
                .join(format!("rejected/b{:05}.frame", KEEP_REJECTED + 4))
                .exists()
        );
        assert_eq!(prune_rejected(&spool).unwrap(), 0);
        // A file over the bytes kept goes alone, newest or not.
        std::fs::write(
            spool.join("rejected/c.frame"),
            vec![1u8; KEEP_REJECTED_BYTES as usize + 1],
        )
        .unwrap();
        assert_eq!(prune_rejected(&spool).unwrap(), 1);
        assert_eq!(counts(&spool).1, KEEP_REJECTED as u64);
    }
}
