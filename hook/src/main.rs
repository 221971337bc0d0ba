//! `narmesh-hook`: Nix's `post-build-hook`. Hands the built paths to the local node over its
//! Unix socket and waits for the node's acknowledgement that they are durably recorded. If the
//! node is unreachable, does not acknowledge in time, answers anything but `Accepted`, or
//! anything else goes wrong, the report is written to the spool directory (fsync'd) for the
//! node to take in later. It always exits 0 and starts no child process: it never fails a build.
//!
//! Its time budget: connecting, sending and waiting for the acknowledgement share one deadline,
//! `NARMESH_HOOK_TIMEOUT_MS` (default 500) from the hook's start; a connect refused because the
//! listen backlog of a frozen node is full is tried again until that deadline. Then,
//! only if needed, the spool write: a small file written, fsync'd and renamed, bounded by the
//! disk alone (about a millisecond on an idle disk; a full disk fails it at once with ENOSPC, and
//! the report is then lost with a message on stderr while the build still succeeds). When it
//! spools, the hook prints where each phase's time went.
//!
//! Environment: `DRV_PATH`, `OUT_PATHS` (set by Nix; 2.8 leaves `OUT_PATHS` empty, the node then
//! reads the outputs of `DRV_PATH` from the store database), `NARMESH_SOCKET` (default
//! `/run/narmesh/narmesh.sock`), `NARMESH_SPOOL` (default `/var/lib/narmesh/spool`),
//! `NARMESH_HOOK_TIMEOUT_MS` (default 500), `NARMESH_HOOK_TRACE` (set: print the phases' times
//! on every call, not only when spooling).
//!
//! A package of its own, std-only (plus the wire types, and rustix for a non-blocking connect),
//! built statically linked as the README installs it: no dynamic loader runs before it, so it
//! starts in about half a millisecond on an idle host, and its start stays short on a busy one.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::frame;
use narmesh_proto::hook::{DEFAULT_SOCKET, DEFAULT_SPOOL, DEFAULT_TIMEOUT_MS, HookReport};

fn main() -> ExitCode {
    // Whatever happens, the build must not fail because of us.
    let _ = std::panic::catch_unwind(run);
    ExitCode::SUCCESS
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Where the hook's time went, measured inside it (printed when it had to spool).
#[derive(Default)]
struct Phases {
    connect: Option<Duration>,
    exchange: Option<Duration>,
    spool: Option<Duration>,
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        };
        write!(
            f,
            "connect {}, send and answer {}, spool write {}",
            ms(self.connect),
            ms(self.exchange),
            ms(self.spool)
        )
    }
}

fn run() {
    let started = Instant::now();
    let report =
        HookReport::from_env_values(env("DRV_PATH").as_deref(), env("OUT_PATHS").as_deref());
    if report.drv_path.is_none() && report.out_paths.is_empty() {
        return;
    }
    let envelope = Envelope {
        version: narmesh_proto::HOOK_PROTOCOL_VERSION,
        request: Request::Hook(report),
    };
    let Ok(bytes) = frame::encode(&envelope) else {
        eprintln!("narmesh-hook: report too large to send; not shared");
        return;
    };
    let socket = env("NARMESH_SOCKET").unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
    let timeout = env("NARMESH_HOOK_TIMEOUT_MS")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_millis(DEFAULT_TIMEOUT_MS));
    let mut phases = Phases::default();
    let why = match send(Path::new(&socket), &bytes, started + timeout, &mut phases) {
        Ok(Response::Accepted { .. }) => {
            if env("NARMESH_HOOK_TRACE").is_some() {
                eprintln!(
                    "narmesh-hook: acknowledged ({phases}; {:.2} ms in all)",
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            return;
        }
        // Anything but an acknowledgement is spooled: a refusal may be transient (a node of
        // another release during a rolling upgrade, a store database briefly unreadable); the
        // node sorts out what can never succeed when it takes the spool in.
        Ok(Response::Error { message }) => format!("the node refused the report: {message}"),
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(e) => e,
    };
    let spool = PathBuf::from(env("NARMESH_SPOOL").unwrap_or_else(|| DEFAULT_SPOOL.to_owned()));
    let t = Instant::now();
    let written = write_spool(&spool, &bytes);
    phases.spool = Some(t.elapsed());
    match written {
        Ok(path) => eprintln!(
            "narmesh-hook: node unavailable ({why}); spooled to {} ({phases}; {:.1} ms in all)",
            path.display(),
            started.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => eprintln!(
            "narmesh-hook: node unavailable ({why}) and spooling to {} failed: {e}; not shared ({phases})",
            spool.display()
        ),
    }
}

/// Connect before `deadline`. `connect(2)` on a blocking Unix socket has no timeout and blocks
/// while the node's listen backlog is full (a frozen node); a non-blocking socket is refused
/// with EAGAIN instead, and the hook tries again every millisecond until its deadline.
fn connect(socket: &Path, deadline: Instant) -> Result<UnixStream, String> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fail = |e: std::io::Error| format!("connect {}: {e}", socket.display());
    let addr = SocketAddrUnix::new(socket).map_err(|e| fail(e.into()))?;
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| fail(e.into()))?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false).map_err(fail)?;
                return Ok(stream);
            }
            Err(rustix::io::Errno::AGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(rustix::io::Errno::AGAIN) => {
                return Err(format!(
                    "connect {}: no connection within the deadline (node frozen or overloaded)",
                    socket.display()
                ));
            }
            Err(e) => return Err(fail(e.into())),
        }
    }
}

/// Send the frame and wait for the answer, all before `deadline`.
fn send(
    socket: &Path,
    bytes: &[u8],
    deadline: Instant,
    phases: &mut Phases,
) -> Result<Response, String> {
    let t = Instant::now();
    let connected = connect(socket, deadline);
    phases.connect = Some(t.elapsed());
    let stream = connected?;
    let t = Instant::now();
    let mut timed = Timed {
        stream: &stream,
        deadline,
    };
    let res = (|| {
        timed.write_all(bytes).map_err(|e| format!("send: {e}"))?;
        frame::read_frame::<Response>(&mut timed).map_err(|e| format!("no acknowledgement: {e}"))
    })();
    phases.exchange = Some(t.elapsed());
    res
}

/// The node's socket under the hook's one deadline: each read and write waits at most the time
/// left (a socket timeout counts per call, so a node answering a byte at a time would stretch
/// the hook past its deadline, as often as it has bytes).
struct Timed<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"))
    }
}

impl std::io::Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        std::io::Read::read(&mut &*self.stream, buf)
    }
}

impl std::io::Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        std::io::Write::write(&mut &*self.stream, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write the frame into the spool: temp file, fsync, rename, fsync the directory.
fn write_spool(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("{nanos:024}-{}", std::process::id());
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.frame"));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        // Readable by the node whatever the umask of the process Nix runs the hook in (the
        // node runs as its own user; the hook, under nix-daemon, as root).
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = res {
        // A full disk: leave nothing half-written behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}
