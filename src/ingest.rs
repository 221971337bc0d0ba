//! Everything that enters the node locally: the Unix socket (hook reports and CLI requests,
//! validated, acknowledged only after the durable queue commit) and the hook's spool
//! directory (taken in at start and while running).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use narmesh_proto::control::{Envelope, Request, Response, StatusReport};
use narmesh_proto::frame::{self, FrameError, MAX_FRAME};
use narmesh_proto::hook::HookReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::db::{Db, QueueItem};
use crate::metrics::Metrics;
use crate::nix::StorePath;
use crate::nix::store_db::StoreDb;
use crate::queue::QueueHandle;
use crate::store::LocalStore;

/// How long a connection may sit idle between frames.
const IDLE: Duration = Duration::from_secs(30);
/// How often the spool directory is looked at while running.
const SPOOL_POLL: Duration = Duration::from_millis(500);

/// What the request handlers share.
#[derive(Clone)]
pub struct Ingest {
    pub queue: QueueHandle,
    pub db: Db,
    pub store: Arc<LocalStore>,
    pub metrics: Arc<Metrics>,
    /// Static part of the status report (key, addresses).
    pub status: Arc<StatusReport>,
    pub mesh: Option<crate::mesh::MeshHandle>,
    pub mirror: Option<crate::mirror::MirrorHandle>,
}

impl Ingest {
    /// Accept connections on `listener` until cancelled.
    pub async fn serve_socket(self, listener: UnixListener, cancel: CancellationToken) {
        let conns = tokio_util::task::TaskTracker::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let this = self.clone();
                        conns.spawn(async move { this.connection(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!("socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
    }

    async fn connection(&self, mut stream: UnixStream) {
        loop {
            let payload = match read_payload(&mut stream).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => {
                    self.metrics.socket_errors.inc();
                    tracing::warn!("socket: bad frame: {e}");
                    let _ = send(&mut stream, &error(format!("bad frame: {e}"))).await;
                    return;
                }
            };
            let response = match frame::decode::<Envelope>(&payload) {
                Ok(env) if env.version != narmesh_proto::PROTOCOL_VERSION => error(format!(
                    "unsupported protocol version {} (this node speaks {})",
                    env.version,
                    narmesh_proto::PROTOCOL_VERSION
                )),
                Ok(env) => self.handle(env.request).await,
                Err(e) => {
                    self.metrics.socket_errors.inc();
                    tracing::warn!("socket: undecodable request: {e}");
                    error(format!("undecodable request: {e}"))
                }
            };
            if let Response::Error { message } = &response {
                tracing::debug!("request refused: {message}");
            }
            if send(&mut stream, &response).await.is_err() {
                return;
            }
        }
    }

    /// Answer one request.
    pub async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Hook(report) => {
                self.metrics.hook_reports.inc();
                self.accept(vec![report]).await
            }
            Request::Push { paths } => {
                let report = HookReport {
                    drv_path: None,
                    out_paths: paths,
                };
                self.accept(vec![report]).await
            }
            Request::Lookup { paths } => self.lookup(paths).await,
            Request::Status => self.status_report().await,
        }
    }

    /// Validate reports and queue them durably; all or nothing.
    pub async fn accept(&self, reports: Vec<HookReport>) -> Response {
        let store = self.store.clone();
        let checked = tokio::task::spawn_blocking(move || {
            store
                .with(|db| {
                    Ok(reports
                        .iter()
                        .map(|r| validate(db, r))
                        .collect::<Result<Vec<_>, String>>())
                })
                .map_err(|e| e.to_string())?
        })
        .await;
        let items = match checked {
            Ok(Ok(items)) => items,
            Ok(Err(why)) => return error(why),
            Err(e) => return error(format!("validation failed: {e}")),
        };
        let roots = items.iter().map(|i| i.outs.len().max(1)).sum::<usize>() as u32;
        match self.queue.enqueue(items).await {
            Ok(()) => Response::Accepted { paths: roots },
            Err(e) => error(format!("could not record the report: {e}")),
        }
    }

    async fn lookup(&self, paths: Vec<String>) -> Response {
        let parsed: Result<Vec<StorePath>, _> = paths.iter().map(|p| StorePath::parse(p)).collect();
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => return error(e.to_string()),
        };
        let db = self.db.clone();
        let res = tokio::task::spawn_blocking(move || {
            let hashes: Vec<&str> = parsed.iter().map(|p| p.hash_part()).collect();
            db.known(&hashes)
        })
        .await;
        match res {
            Ok(Ok(recorded)) => Response::Known { recorded },
            Ok(Err(e)) => error(e.to_string()),
            Err(e) => error(e.to_string()),
        }
    }

    async fn status_report(&self) -> Response {
        let db = self.db.clone();
        let counters = match tokio::task::spawn_blocking(move || db.counters()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return error(e.to_string()),
            Err(e) => return error(e.to_string()),
        };
        let mut report = (*self.status).clone();
        report.queue_depth = counters.queue_depth;
        report.paths_recorded = counters.paths;
        report.nar_bytes = counters.nar_bytes;
        report.ingest_failures = counters.failures;
        report.spool_taken = self.metrics.spool_taken.get();
        report.mirror = self.mirror.as_ref().map(|m| m.status());
        if let Some(m) = &self.mesh {
            let m = m.clone();
            report.peers = tokio::task::spawn_blocking(move || m.peers())
                .await
                .unwrap_or_default();
        }
        Response::Status(Box::new(report))
    }

    /// Take in spooled reports now and then until cancelled.
    pub async fn watch_spool(self, dir: PathBuf, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.take_spool(&dir).await {
                tracing::warn!("spool {}: {e}", dir.display());
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(SPOOL_POLL) => {}
            }
        }
    }

    /// Queue every spooled report, then delete the files that were queued.
    pub async fn take_spool(&self, dir: &Path) -> std::io::Result<usize> {
        let dir2 = dir.to_owned();
        let files = tokio::task::spawn_blocking(move || read_spool(&dir2))
            .await
            .map_err(std::io::Error::other)??;
        if files.is_empty() {
            return Ok(0);
        }
        let mut taken = 0;
        for (path, report) in files {
            match report {
                Ok(report) => match self.accept(vec![report]).await {
                    Response::Accepted { .. } => {
                        std::fs::remove_file(&path)?;
                        taken += 1;
                    }
                    Response::Error { message } => reject(dir, &path, &message)?,
                    _ => {}
                },
                Err(why) => reject(dir, &path, &why)?,
            }
        }
        std::fs::File::open(dir)?.sync_all()?;
        self.metrics.spool_taken.inc_by(taken as u64);
        tracing::info!("took {taken} report(s) from the spool");
        Ok(taken)
    }
}

/// Move a spool file that cannot be taken in aside (kept for inspection, never retried).
fn reject(dir: &Path, path: &Path, why: &str) -> std::io::Result<()> {
    tracing::warn!("spool file {} rejected: {why}", path.display());
    let rejected = dir.join("rejected");
    std::fs::create_dir_all(&rejected)?;
    std::fs::rename(path, rejected.join(path.file_name().unwrap_or_default()))
}

/// The spool's complete report files, oldest first, each decoded or with why not.
fn read_spool(dir: &Path) -> std::io::Result<Vec<(PathBuf, Result<HookReport, String>)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "frame"))
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| {
            let report = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|bytes| decode_spooled(&bytes));
            (p, report)
        })
        .collect())
}

/// A spool file holds exactly one frame, as the hook would have sent it.
fn decode_spooled(bytes: &[u8]) -> Result<HookReport, String> {
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

/// Check a report against the store: every path a valid store path in this store.
fn validate(store: &StoreDb, r: &HookReport) -> Result<QueueItem, String> {
    let check = |s: &str| -> Result<String, String> {
        let p = StorePath::parse(s).map_err(|e| e.to_string())?;
        match store.is_valid(&p) {
            Ok(true) => Ok(p.full()),
            Ok(false) => Err(format!("{p} is not a valid path in the Nix store")),
            Err(e) => Err(e.to_string()),
        }
    };
    let outs = r
        .out_paths
        .iter()
        .map(|s| check(s))
        .collect::<Result<Vec<_>, _>>()?;
    let drv = match &r.drv_path {
        Some(d) if outs.is_empty() => {
            let full = check(d)?;
            if !full.ends_with(".drv") {
                return Err(format!("{full} is not a derivation"));
            }
            Some(full)
        }
        // The outputs were named: the derivation adds nothing.
        Some(_) => None,
        None => None,
    };
    if drv.is_none() && outs.is_empty() {
        return Err("the report names no path".into());
    }
    Ok(QueueItem { drv, outs })
}

fn error(message: String) -> Response {
    Response::Error { message }
}

/// Read one frame's payload; `None` on a clean close between frames.
async fn read_payload(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    match tokio::time::timeout(IDLE, stream.read_exact(&mut prefix)).await {
        Err(_) => return Ok(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let len = frame::payload_len(prefix)?;
    debug_assert!(len <= MAX_FRAME);
    let mut payload = vec![0u8; len];
    match tokio::time::timeout(IDLE, stream.read_exact(&mut payload)).await {
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "frame body timed out",
        ))),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(Some(payload)),
    }
}

async fn send(stream: &mut UnixStream, response: &Response) -> Result<(), FrameError> {
    let bytes = frame::encode(response)?;
    stream.write_all(&bytes).await?;
    Ok(())
}
