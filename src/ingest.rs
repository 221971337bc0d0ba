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
use crate::nix::store_db::StoreDbError;
use crate::queue::QueueHandle;
use crate::spool;
use crate::store::LocalStore;

/// How long a connection may sit idle between frames, and how long a frame may take to arrive.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// Socket connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How often the spool directory is looked at while running.
pub(crate) const SPOOL_POLL: Duration = Duration::from_millis(500);
/// The longest wait before the spool is tried again after a transient failure.
pub(crate) const SPOOL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait before the spool is tried again after a transient failure, `wait` the last one:
/// twice as long (a second at least), up to [`SPOOL_BACKOFF_MAX`].
fn spool_backoff(wait: Duration) -> Duration {
    (wait * 2).clamp(Duration::from_secs(1), SPOOL_BACKOFF_MAX)
}

/// How long a hook's validation on the front's thread waits for another process's lock on the
/// Nix store database (a writer's, under a rollback journal) before the report is queued
/// unchecked: the pipeline checks every path against the database anyway, and the front's
/// thread must not wait there (the node's usual wait is 10 s; every hook meanwhile would wait
/// out its deadline and spool).
pub const FRONT_BUSY_WAIT: Duration = Duration::from_millis(5);

/// Where a report's validation (reads of the Nix database) runs.
#[derive(Clone, Copy)]
enum Validate {
    /// On the calling thread: the front's, for a hook waiting on it.
    Here,
    /// On a blocking thread: a push of many paths, the spool.
    Blocking,
}

/// What the request handlers share.
#[derive(Clone)]
pub struct Ingest {
    pub queue: QueueHandle,
    pub db: Db,
    /// The Nix store, for pushes and the spool (queries wait for a lock up to 10 s).
    pub store: Arc<LocalStore>,
    /// The Nix store for hooks' reports on the front's thread: its own connection, whose
    /// queries give up after [`FRONT_BUSY_WAIT`] while another process holds the lock.
    pub front_store: Arc<LocalStore>,
    pub metrics: Arc<Metrics>,
    /// Static part of the status report (key, addresses).
    pub status: Arc<StatusReport>,
    pub mesh: Option<crate::mesh::MeshHandle>,
    pub mirror: Option<crate::mirror::MirrorHandle>,
    /// The hook's spool directory.
    pub spool: PathBuf,
    pub storage: crate::storage::Storage,
    /// The node's main runtime: every request but a hook report is answered there, so the
    /// front's thread is free for hooks.
    pub main: tokio::runtime::Handle,
}

impl Ingest {
    /// Accept connections on `listener` until cancelled, at most [`MAX_CONNECTIONS`] at once:
    /// past that, new connections wait in the listen backlog (a hook then spools at its
    /// deadline) instead of costing the node memory.
    pub async fn serve_socket(self, listener: UnixListener, cancel: CancellationToken) {
        let conns = tokio_util::task::TaskTracker::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        // A failing accept waits longer each time (up to 1 s), and is logged once a second.
        let (accept_log, mut accept_wait) = (
            crate::logging::EverySecond::default(),
            Duration::from_millis(50),
        );
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        accept_wait = Duration::from_millis(50);
                        let this = self.clone();
                        conns.spawn(async move {
                            this.connection(stream).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, say: the hook spools meanwhile.
                        if let Some(n) = accept_log.allow() {
                            tracing::warn!("socket accept failed: {e} ({n} more meanwhile)");
                        }
                        tokio::time::sleep(accept_wait).await;
                        accept_wait = (accept_wait * 2).min(Duration::from_secs(1));
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
                // Every earlier version is still spoken: a running hook of an older release
                // keeps being heard during an upgrade.
                Ok(env)
                    if env.version == 0 || env.version > narmesh_proto::HOOK_PROTOCOL_VERSION =>
                {
                    error(format!(
                        "unsupported protocol version {} (this node speaks 1..={})",
                        env.version,
                        narmesh_proto::HOOK_PROTOCOL_VERSION
                    ))
                }
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

    /// Answer one request: a hook report here, on the front's thread; anything else on the
    /// main runtime (a push of a closure, a status, a watcher's lookups never hold up a hook).
    pub async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Hook(report) => self.hook(report, Validate::Here).await,
            other => {
                let me = self.clone();
                match self
                    .main
                    .spawn(async move { me.off_front(other).await })
                    .await
                {
                    Ok(r) => r,
                    Err(e) => error(format!("the request failed: {e}")),
                }
            }
        }
    }

    /// A hook's report, validated and committed where `how` says.
    async fn hook(&self, report: HookReport, how: Validate) -> Response {
        if crate::killpoint::fault("front.hangs") {
            crate::killpoint::hang();
        }
        let outputs = if report.out_paths.is_empty() {
            "from-derivation"
        } else {
            "named"
        };
        self.metrics
            .hook_reports
            .get_or_create(&crate::metrics::HookLabels { outputs })
            .inc();
        let t = std::time::Instant::now();
        let r = self.accept(vec![report], how).await;
        self.metrics
            .hook_ack_seconds
            .observe(t.elapsed().as_secs_f64());
        r
    }

    /// Requests other than hook reports, on the main runtime.
    async fn off_front(&self, request: Request) -> Response {
        match request {
            Request::Hook(report) => self.hook(report, Validate::Blocking).await,
            Request::Push { paths } => {
                let report = HookReport {
                    drv_path: None,
                    out_paths: paths,
                };
                self.accept(vec![report], Validate::Blocking).await
            }
            Request::Lookup { paths } => self.lookup(paths).await,
            Request::Pin { paths, pinned } => self.pin(paths, pinned).await,
            Request::Status => self.status_report().await,
        }
    }

    /// Validate reports and queue them durably; all or nothing.
    async fn accept(&self, reports: Vec<HookReport>, how: Validate) -> Response {
        match self.queue_reports(reports, how).await {
            Ok(paths) => Response::Accepted { paths },
            Err(r) => error(r.message),
        }
    }

    /// Validate reports and queue them durably (all or nothing); returns the roots queued. A
    /// hook's report is validated on the front's own thread (ingest has its own connection to
    /// the Nix database, and a hand-over to another thread and back costs more than the read);
    /// a push, or the spool's reports, on a blocking thread. A hook's report whose paths the
    /// database cannot confirm now, another process holding it locked, is queued checked only
    /// for its form: the pipeline checks its paths once the database answers, and fails those
    /// not in the store (`narmesh_hook_unchecked_total` counts such reports).
    async fn queue_reports(&self, reports: Vec<HookReport>, how: Validate) -> Result<u32, Refusal> {
        let checked = match how {
            Validate::Here => match check(&self.front_store, &reports) {
                Err(e) if e.is_busy() => {
                    self.metrics.hook_unchecked.inc();
                    tracing::debug!("a hook's report queued unchecked: {e}");
                    unchecked(&reports)
                }
                other => other,
            },
            Validate::Blocking => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || check(&store, &reports))
                    .await
                    .map_err(|e| Refusal::transient(format!("validation failed: {e}")))?
            }
        };
        let items = match checked {
            Ok(Ok(items)) => items,
            Ok(Err(refusal)) => return Err(refusal),
            // The store database could not be read: that may pass (it is being replaced,
            // recovered, or locked).
            Err(e) => return Err(Refusal::transient(e.to_string())),
        };
        let roots = items.iter().map(|i| i.outs.len().max(1)).sum::<usize>() as u32;
        self.queue
            .enqueue(items)
            .await
            .map(|()| roots)
            .map_err(|e| Refusal::transient(format!("could not record the report: {e}")))
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

    async fn pin(&self, paths: Vec<String>, pinned: bool) -> Response {
        let hashes: Result<Vec<String>, _> = paths
            .iter()
            .map(|p| StorePath::parse(p).map(|p| p.hash_part().to_owned()))
            .collect();
        let hashes = match hashes {
            Ok(h) => h,
            Err(e) => return error(e.to_string()),
        };
        let n = hashes.len() as u32;
        match self.storage.pin(hashes, pinned).await {
            Ok(()) => Response::Accepted { paths: n },
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
        report.records_forgotten = counters.forgotten;
        report.storage = self.storage_status().await;
        report.nar_bytes = report.storage.own_bytes + report.storage.file_bytes;
        report.ingest_failures = counters.failures;
        report.spool_taken = self.metrics.spool_taken.get();
        report.problems = self.metrics.problems();
        let spool = self.spool.clone();
        (report.spool_waiting, report.spool_rejected) =
            tokio::task::spawn_blocking(move || spool::counts(&spool))
                .await
                .unwrap_or_default();
        report.mirror = self.mirror.as_ref().map(|m| m.status());
        if let Some(m) = &self.mesh {
            let m = m.clone();
            report.peers = tokio::task::spawn_blocking(move || m.peers())
                .await
                .unwrap_or_default();
        }
        Response::Status(Box::new(report))
    }

    async fn storage_status(&self) -> narmesh_proto::control::StorageStatus {
        let storage = self.storage.clone();
        let c = tokio::task::spawn_blocking(move || storage.counters())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        narmesh_proto::control::StorageStatus {
            own_paths: c.own_paths,
            own_bytes: c.own_bytes,
            files: c.files,
            file_bytes: c.file_bytes,
            cap_bytes: self.storage.cap(),
            evictions: c.evictions,
            gc_lost: c.gc_lost,
        }
    }

    /// Take in spooled reports now and then until cancelled, batch after batch while more
    /// wait. After a transient failure (the store database unreadable, the disk full) the files
    /// stay and are tried again later, backing off up to 30 s.
    pub async fn watch_spool(self, dir: PathBuf, cancel: CancellationToken) {
        let mut wait = SPOOL_POLL;
        // Rejected files kept from before (an older release kept them all) are brought within
        // bounds at start; afterwards, whenever a round rejects one.
        let mut prune = true;
        let mut ignored = spool::PassedOver::new();
        // Why files were passed over for a while, as long as some are.
        let mut unread: Option<String> = None;
        loop {
            match self.take_spool(&dir, prune, &mut ignored).await {
                Ok(round) => {
                    wait = if round.more {
                        Duration::ZERO
                    } else {
                        SPOOL_POLL
                    };
                    prune = false;
                    if let Some(why) = round.unread {
                        tracing::warn!("spool {}: {why}", dir.display());
                        unread = Some(why);
                    } else if !ignored.values().any(Option::is_some) {
                        unread = None;
                    }
                    self.metrics.problem("spool", unread.clone());
                }
                Err(e) => {
                    wait = spool_backoff(wait);
                    prune = true;
                    self.metrics.problem("spool", Some(e.to_string()));
                    tracing::warn!("spool {}: {e}; trying again in {wait:?}", dir.display());
                    self.metrics.spool_deferred.inc();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Queue the oldest batch of spooled reports, then delete the files that were queued. A
    /// report that can never be accepted is set aside ([`spool::reject`]); a transient failure
    /// stops the round and leaves the rest where they are (the error says why); a file that
    /// could not be read stays, passed over for a while, and the round says so. `prune`: bring
    /// the rejected files within their bounds after. A file that can be neither taken in nor set
    /// aside joins `ignored`, passed over from then on.
    async fn take_spool(
        &self,
        dir: &Path,
        prune: bool,
        ignored: &mut spool::PassedOver,
    ) -> std::io::Result<SpoolRound> {
        let (dir2, mut passed) = (dir.to_owned(), std::mem::take(ignored));
        let (batch, passed) = blocking_io(move || {
            spool::clean_stale_temps(&dir2);
            let batch = spool::read_batch(&dir2, &mut passed);
            Ok((batch, passed))
        })
        .await?;
        *ignored = passed;
        let batch = batch?;
        if batch.files.is_empty() && !prune {
            self.metrics.spool_waiting.set(0);
            return Ok(SpoolRound {
                taken: 0,
                more: false,
                unread: None,
            });
        }
        let mut taken = Vec::new();
        let mut rejected = Vec::new();
        let mut stopped = None;
        // Files that could not be read stay, passed over for a while; the others are taken in
        // meanwhile.
        let (mut unread, mut first_unread) = (Vec::new(), None);
        for (path, report) in batch.files {
            match report {
                Ok(report) => match self.queue_reports(vec![report], Validate::Blocking).await {
                    Ok(_) => taken.push(path),
                    Err(r) if r.permanent => rejected.push((path, r.message)),
                    Err(r) => {
                        stopped = Some(r.message);
                        break;
                    }
                },
                Err(spool::Unread::Bad(why)) => rejected.push((path, why)),
                Err(spool::Unread::Failed(why)) => {
                    first_unread.get_or_insert_with(|| format!("{}: {why}", path.display()));
                    unread.push(path);
                }
                Err(spool::Unread::Gone) => {}
            }
        }
        let again = std::time::Instant::now() + UNREAD_AGAIN;
        let round = SpoolRound {
            taken: taken.len(),
            more: batch.more && stopped.is_none(),
            unread: first_unread.map(|first| {
                format!(
                    "{} file(s) could not be read: they stay, and are read again in {UNREAD_AGAIN:?} \
                     (the first, {first})",
                    unread.len()
                )
            }),
        };
        ignored.extend(unread.into_iter().map(|p| (p, Some(again))));
        self.metrics.spool_refused.inc_by(rejected.len() as u64);
        let dir2 = dir.to_owned();
        let done = blocking_io(move || {
            for p in &taken {
                std::fs::remove_file(p)?;
            }
            let (mut stuck, set_aside) = (Vec::new(), !rejected.is_empty());
            // A flood of bad files (the spool is the socket group's to write) must not flood
            // the log: a few are named, the rest counted.
            if rejected.len() > spool::LOG_REJECTED {
                tracing::warn!(
                    "spool: {} more file(s) rejected this round, not named here (see {})",
                    rejected.len() - spool::LOG_REJECTED,
                    dir2.join("rejected").display()
                );
            }
            for (i, (p, why)) in rejected.into_iter().enumerate() {
                if i < spool::LOG_REJECTED {
                    tracing::warn!("spool file {} rejected: {why}", p.display());
                }
                if let Err(e) = spool::reject(&dir2, &p) {
                    tracing::warn!(
                        "spool file {} can be neither taken in nor set aside ({e}): passed over",
                        p.display()
                    );
                    stuck.push(p);
                }
            }
            if !taken.is_empty() || set_aside {
                crate::fsutil::sync_dir(&dir2)?;
            }
            if prune || set_aside {
                spool::prune_rejected(&dir2)?;
            }
            Ok((stuck, spool::counts(&dir2)))
        })
        .await;
        let (stuck, (waiting, kept)) = done?;
        self.metrics.spool_waiting.set(waiting as i64);
        self.metrics.spool_rejected.set(kept as i64);
        ignored.extend(stuck.into_iter().map(|p| (p, None)));
        let n = round.taken;
        self.metrics.spool_taken.inc_by(n as u64);
        if n > 0 {
            tracing::info!("took {n} report(s) from the spool");
        }
        match stopped {
            Some(why) => Err(std::io::Error::other(format!(
                "{n} report(s) taken, the rest wait: {why}"
            ))),
            None => Ok(round),
        }
    }
}

/// What one round of [`Ingest::take_spool`] did.
struct SpoolRound {
    taken: usize,
    /// More reports wait behind this round's batch.
    more: bool,
    /// Files that could not be read, and why (the first): passed over for [`UNREAD_AGAIN`].
    unread: Option<String>,
}

/// How long a spool file that could not be read is passed over before it is read again.
const UNREAD_AGAIN: Duration = Duration::from_secs(60);

/// Why a report was not accepted, and whether it ever can be.
#[derive(Debug)]
struct Refusal {
    /// True if the report itself is at fault (a malformed or unknown path): it can never be
    /// accepted. False for what may pass (the store database unreadable, a full disk).
    permanent: bool,
    message: String,
}

impl Refusal {
    fn permanent(message: String) -> Self {
        Refusal {
            permanent: true,
            message,
        }
    }

    fn transient(message: String) -> Self {
        Refusal {
            permanent: false,
            message,
        }
    }
}

/// Run blocking file-system work off the async threads.
async fn blocking_io<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// What validating reports comes to: the items to queue, or why the reports cannot be
/// accepted; `Err` if the store database could not answer.
type Checked = Result<Result<Vec<QueueItem>, Refusal>, StoreDbError>;

/// Check reports against the store (blocking): every path a valid store path in this store.
fn check(store: &LocalStore, reports: &[HookReport]) -> Checked {
    store.with(|db| validate_all(&mut |p| db.is_valid(p), reports))
}

/// Check reports for their form only (store paths, a derivation's name), not against the
/// store.
fn unchecked(reports: &[HookReport]) -> Checked {
    validate_all(&mut |_| Ok(true), reports)
}

/// Check every report with [`validate`]; the first refusal refuses them all.
fn validate_all(
    is_valid: &mut impl FnMut(&StorePath) -> Result<bool, StoreDbError>,
    reports: &[HookReport],
) -> Checked {
    let mut items = Vec::with_capacity(reports.len());
    for r in reports {
        match validate(is_valid, r)? {
            Ok(item) => items.push(item),
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
    Ok(Ok(items))
}

/// Check one report: every path a store path that `is_valid` says is in the store.
fn validate(
    is_valid: &mut impl FnMut(&StorePath) -> Result<bool, StoreDbError>,
    r: &HookReport,
) -> Result<Result<QueueItem, Refusal>, StoreDbError> {
    let mut check = |s: &str| -> Result<Result<String, Refusal>, StoreDbError> {
        let p = match StorePath::parse(s) {
            Ok(p) => p,
            Err(e) => return Ok(Err(Refusal::permanent(e.to_string()))),
        };
        Ok(if is_valid(&p)? {
            Ok(p.full())
        } else {
            Err(Refusal::permanent(format!(
                "{p} is not a valid path in the Nix store"
            )))
        })
    };
    let mut outs = Vec::with_capacity(r.out_paths.len());
    for s in &r.out_paths {
        match check(s)? {
            Ok(full) => outs.push(full),
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
    let drv = match &r.drv_path {
        Some(d) if outs.is_empty() => {
            let full = match check(d)? {
                Ok(full) => full,
                Err(refusal) => return Ok(Err(refusal)),
            };
            if !full.ends_with(".drv") {
                return Ok(Err(Refusal::permanent(format!(
                    "{full} is not a derivation"
                ))));
            }
            Some(full)
        }
        // The outputs were named: the derivation adds nothing.
        Some(_) => None,
        None => None,
    };
    if drv.is_none() && outs.is_empty() {
        return Ok(Err(Refusal::permanent("the report names no path".into())));
    }
    Ok(Ok(QueueItem { drv, outs }))
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
    // Memory grows with the bytes that arrive, not with the length a client claims.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let mut body = (&mut *stream).take(len as u64);
    match tokio::time::timeout(IDLE, body.read_to_end(&mut payload)).await {
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "frame body timed out",
        ))),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(n)) if n < len => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed mid-frame",
        ))),
        Ok(Ok(_)) => Ok(Some(payload)),
    }
}

/// Write one answer: a client that does not read its answers (its socket buffer full) is let
/// go after [`IDLE`], so it cannot keep one of the [`MAX_CONNECTIONS`] for good.
async fn send(stream: &mut UnixStream, response: &Response) -> Result<(), FrameError> {
    let bytes = frame::encode(response)?;
    match tokio::time::timeout(IDLE, stream.write_all(&bytes)).await {
        Ok(written) => Ok(written?),
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its answer",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a round that found nothing wrong (a wait of `SPOOL_POLL` or none), failures wait
    /// 1 s, 2 s, 4 s ... and never more than 30 s.
    #[test]
    fn the_spool_backs_off_to_30_seconds() {
        for start in [Duration::ZERO, SPOOL_POLL] {
            let waits: Vec<u64> =
                std::iter::successors(Some(spool_backoff(start)), |w| Some(spool_backoff(*w)))
                    .take(8)
                    .map(|w| w.as_secs())
                    .collect();
            assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30], "from {start:?}");
        }
    }
}
