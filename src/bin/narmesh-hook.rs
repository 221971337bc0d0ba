//! `narmesh-hook`: Nix's `post-build-hook`. Hands the built paths to the local node over its
//! Unix socket and waits for the node's acknowledgement that they are durably recorded. If the
//! node is unreachable, refuses to answer in time, or anything else goes wrong, the report is
//! written to the spool directory (fsync'd) for the node to take in later. It always exits 0,
//! never blocks past its deadline, and starts no child process: it never fails or stalls a build.
//!
//! Environment: `DRV_PATH`, `OUT_PATHS` (set by Nix; 2.8 leaves `OUT_PATHS` empty, the node then
//! reads the outputs of `DRV_PATH` from the store database), `NARMESH_SOCKET` (default
//! `/run/narmesh/narmesh.sock`), `NARMESH_SPOOL` (default `/var/lib/narmesh/spool`),
//! `NARMESH_HOOK_TIMEOUT_MS` (default 500).
//!
//! Std-only (plus the wire types), so it starts in about a millisecond.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::frame;
use narmesh_proto::hook::HookReport;

const DEFAULT_SOCKET: &str = "/run/narmesh/narmesh.sock";
const DEFAULT_SPOOL: &str = "/var/lib/narmesh/spool";
const DEFAULT_TIMEOUT_MS: u64 = 500;

fn main() -> ExitCode {
    // Whatever happens, the build must not fail because of us.
    let _ = std::panic::catch_unwind(run);
    ExitCode::SUCCESS
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn run() {
    let started = Instant::now();
    let report =
        HookReport::from_env_values(env("DRV_PATH").as_deref(), env("OUT_PATHS").as_deref());
    if report.drv_path.is_none() && report.out_paths.is_empty() {
        return;
    }
    let envelope = Envelope {
        version: narmesh_proto::PROTOCOL_VERSION,
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
    let why = match send(Path::new(&socket), &bytes, started + timeout) {
        Ok(Response::Accepted { .. }) => return,
        Ok(Response::Error { message }) => {
            // The node answered and refused: spooling would only be refused again.
            eprintln!("narmesh-hook: the node refused the report: {message}");
            return;
        }
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(e) => e,
    };
    let spool = PathBuf::from(env("NARMESH_SPOOL").unwrap_or_else(|| DEFAULT_SPOOL.to_owned()));
    match write_spool(&spool, &bytes) {
        Ok(path) => eprintln!(
            "narmesh-hook: node unavailable ({why}); spooled to {}",
            path.display()
        ),
        Err(e) => {
            eprintln!("narmesh-hook: node unavailable ({why}) and spooling failed: {e}; not shared")
        }
    }
}

/// Send the frame and wait for the answer, all before `deadline`.
fn send(socket: &Path, bytes: &[u8], deadline: Instant) -> Result<Response, String> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let t = left().ok_or("deadline passed")?;
    stream
        .set_write_timeout(Some(t))
        .map_err(|e| e.to_string())?;
    stream.write_all(bytes).map_err(|e| format!("send: {e}"))?;
    let t = left().ok_or("deadline passed")?;
    stream
        .set_read_timeout(Some(t))
        .map_err(|e| e.to_string())?;
    frame::read_frame::<Response>(&mut stream).map_err(|e| format!("no acknowledgement: {e}"))
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
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}
