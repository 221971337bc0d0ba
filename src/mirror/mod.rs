//! The S3 mirror: on the designated node, every recorded path (built here or learnt from
//! peers, whose NARs this node fetches eagerly) goes into an S3 binary cache in Nix's own
//! layout. It owns the outbox's progress: it takes paths from the node's log into the durable
//! outbox ([`intake`]) and uploads them ([`uploads`]) in the order [`plan`] decides (a narinfo
//! only once its NAR and the narinfos of all its references are in the bucket, references
//! signed upstream excepted, so a reader never finds a narinfo whose NAR or closure is
//! missing). A NAR still arriving from peers is compressed as it arrives (the mesh's
//! [`Arriving`]), not after. The uploads are [`job`]s; failures back off per path, and a
//! `SlowDown` from the bucket lowers the number in flight ([`throttle`]); identical NARs go up
//! once ([`same`]). Multipart uploads are recorded while open, so after a crash exactly this
//! mirror's are aborted. What the bucket loses later is found by a periodic [`audit`] and put
//! up again. Nothing here blocks ingest, the pipeline or the mesh.

mod audit;
mod compress;
mod intake;
mod job;
mod pause;
mod plan;
pub mod s3;
mod same;
mod throttle;
mod uploads;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use narmesh_proto::control::MirrorStatus;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use compress::FileDigest;
use intake::to_recheck;
pub use job::bucket_narinfo;
use job::{Entry, JobError, NarJob, put_narinfo};
use plan::{Job, Plan};
use s3::{Bucket, CACHE_INFO_TYPE};

use crate::config::S3Config;
use crate::db::{Db, MirrorState, OpenUpload, PathRecord};
use crate::mesh::Arriving;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Log entries taken into the outbox per commit.
const TAKE: usize = 1000;
/// Longest wait before retrying to reach the bucket at start.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Window over which the upload rate in status is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often paths whose NAR is not here yet are looked at again even without news of them.
const RECHECK: Duration = Duration::from_secs(5);
/// How often orphaned paths are: news that a node holds one again (a changed record) brings
/// it at once, so this only covers news lost; a mirror that joins a farm after its hosts
/// collected much of what they built may wait for a great many of them.
const ORPHANS_RECHECK: Duration = Duration::from_secs(300);

/// What the mirror needs from the node.
pub struct MirrorParts {
    pub cfg: S3Config,
    pub data_dir: PathBuf,
    pub db: Db,
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    /// NARs arriving from peers: a NAR is compressed and uploaded while it arrives, not after.
    pub arriving: Option<Arriving>,
    /// This node's endpoint id (its own statements, repeated by peers, do not say a peer holds
    /// a NAR).
    pub me: Option<[u8; 32]>,
    /// The node's watch over the mirror's task.
    pub vital: crate::vital::Vital,
}

/// A handle for status; the mirror itself runs as a task.
#[derive(Clone, Debug)]
pub struct MirrorHandle {
    bucket: String,
    metrics: Arc<Metrics>,
    stats: Arc<Mutex<Stats>>,
}

/// What status needs beyond the metrics (which hold the counts).
#[derive(Debug, Default)]
struct Stats {
    last_error: Option<String>,
    /// Upload completions in the last `RATE_WINDOW`: (when, bytes).
    recent: VecDeque<(Instant, u64)>,
}

impl Stats {
    /// Drop completions older than the window (at every completion, so a mirror that nobody
    /// asks the status of keeps no more than a window's worth).
    fn trim(&mut self) {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// An upload of `bytes` completed now.
    fn completed(&mut self, bytes: u64) {
        self.recent.push_back((Instant::now(), bytes));
        self.trim();
    }

    /// Bytes uploaded per second over the last window.
    fn rate(&mut self) -> u64 {
        self.trim();
        self.recent.iter().map(|(_, b)| b).sum::<u64>() / RATE_WINDOW.as_secs()
    }
}

impl MirrorHandle {
    /// Start the mirror; it runs until `cancel` fires.
    pub fn start(
        parts: MirrorParts,
        cancel: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let stats = Arc::new(Mutex::new(Stats::default()));
        let handle = MirrorHandle {
            bucket: parts.cfg.bucket.clone(),
            metrics: parts.metrics.clone(),
            stats: stats.clone(),
        };
        let task = parts.vital.clone().spawn("mirror", async move {
            let mut m = Mirror::new(parts, stats).await;
            m.run(cancel).await;
        });
        (handle, task)
    }

    /// The mirror's state for `narmesh status`.
    pub fn status(&self) -> MirrorStatus {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let rate = s.rate();
        let m = &self.metrics;
        MirrorStatus {
            bucket: self.bucket.clone(),
            pending_paths: m.mirror_pending_paths.get().max(0) as u64,
            pending_bytes: m.mirror_pending_bytes.get().max(0) as u64,
            uploaded_paths: m.mirror_uploaded_paths.get(),
            uploaded_bytes: m.mirror_uploaded_bytes.get(),
            upload_bytes_per_sec: rate,
            failures: m.mirror_failures.get(),
            last_error: s.last_error.clone(),
        }
    }
}

/// What a finished upload reports.
struct Outcome {
    hash: String,
    /// The NAR's BLAKE3, for a NAR job.
    nar: Option<[u8; 32]>,
    result: Result<MirrorState, JobError>,
    bytes: u64,
    /// The NAR was read while it still arrived from peers.
    streamed: bool,
}

struct Mirror {
    cfg: S3Config,
    tmp: PathBuf,
    db: Db,
    storage: Storage,
    metrics: Arc<Metrics>,
    stats: Arc<Mutex<Stats>>,
    bucket: Bucket,
    plan: Plan,
    /// The records of the paths in the plan.
    entries: HashMap<String, Entry>,
    /// Paths an earlier attempt (this run or a killed one) may have put the NAR of.
    tried: std::collections::HashSet<String>,
    /// Where the NARs of paths waiting for their narinfo are in the bucket.
    stored: HashMap<String, MirrorState>,
    /// NAR uploads running and put lately, by BLAKE3: identical NARs go up once.
    same: same::SameNars,
    /// The path of each upload task running.
    running: HashMap<tokio::task::Id, String>,
    throttle: throttle::Throttle,
    compressing: crate::background::Background,
    arriving: Option<Arriving>,
    me: Option<[u8; 32]>,
    /// What the running (or last) audit's lost paths became.
    tally: audit::Tally,
    /// Paths the plan waits for whose NAR no node holds, as of their last look
    /// (`narmesh_mirror_orphaned_paths`).
    orphaned: std::collections::HashSet<String>,
    /// Paths the outbox took in that the plan could not (every claim of the record failed,
    /// or looking at them failed): added again on news of them, when news was lost, and at
    /// the orphans' sweep, since the outbox does not offer a path it took twice.
    unplanned: std::collections::HashSet<String>,
    /// Uploads paused while the bucket fails as a whole, until a probe finds it back.
    pause: pause::Pause,
    /// When a cut of the uploads at once (a `SlowDown`) was last logged.
    slow_log: crate::logging::EverySecond,
}

impl Mirror {
    async fn new(p: MirrorParts, stats: Arc<Mutex<Stats>>) -> Self {
        let bucket = Bucket::connect(&p.cfg).await;
        let threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
        Mirror {
            tmp: p.data_dir.join("mirror-tmp"),
            throttle: throttle::Throttle::new(p.cfg.concurrency),
            cfg: p.cfg,
            db: p.db,
            storage: p.storage,
            metrics: p.metrics,
            stats,
            bucket,
            plan: Plan::default(),
            entries: HashMap::new(),
            tried: Default::default(),
            unplanned: Default::default(),
            pause: Default::default(),
            stored: HashMap::new(),
            same: Default::default(),
            running: HashMap::new(),
            compressing: crate::background::Background::new("narmesh-zstd", threads),
            arriving: p.arriving,
            me: p.me,
            tally: audit::Tally::default(),
            orphaned: Default::default(),
            slow_log: Default::default(),
        }
    }

    /// The latest failure (`None`: the latest attempt succeeded), for status and as the
    /// node's "mirror" problem.
    fn set_error(&self, e: Option<String>) {
        self.metrics.problem("mirror", e.clone());
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.last_error = e;
    }

    fn record_failure(&self, e: String) {
        self.metrics.mirror_failures.inc();
        self.set_error(Some(e));
    }

    /// Wait until the bucket is ready ([`Mirror::prepare_once`]), retrying with backoff. New
    /// paths are taken into the outbox and the plan meanwhile, so their NARs are kept from
    /// eviction while the bucket is away (an eager mirror node keeps fetching). False if
    /// cancelled first.
    async fn prepare(&mut self, cancel: &CancellationToken) -> bool {
        let mut wait = Duration::from_secs(1);
        let mut changes = self.db.subscribe();
        loop {
            self.take_new().await;
            self.publish_counts();
            // A bucket that hangs must not hold up a stopping node (an attempt may take a
            // minute, and the SDK tries three times).
            let once = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = self.prepare_once() => r,
            };
            match once {
                Ok(stale) => {
                    if stale > 0 {
                        tracing::info!(
                            "mirror: aborted {stale} unfinished upload(s) of a previous run"
                        );
                    }
                    self.set_error(None);
                    tracing::info!("mirror: bucket {} ready", self.bucket.name());
                    return true;
                }
                Err(e) => {
                    tracing::error!("mirror: {e}; retrying in {wait:?}");
                    self.record_failure(e.to_string());
                    let until = tokio::time::Instant::now() + wait;
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return false,
                            _ = tokio::time::sleep_until(until) => break,
                            _ = changes.changed() => {
                                self.take_new().await;
                                self.publish_counts();
                            }
                        }
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Check the bucket answers, abort the multipart uploads this mirror left open, and put
    /// `nix-cache-info` in the bucket unless it has one (an operator's own is kept), all before
    /// any upload starts: Nix reads it before any narinfo. Returns the uploads aborted.
    async fn prepare_once(&self) -> Result<usize, s3::S3Error> {
        let info = crate::nix::narinfo::cache_info(self.cfg.priority);
        self.bucket.check().await?;
        let db = self.db.clone();
        let open = tokio::task::spawn_blocking(move || db.open_uploads())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut stale = 0;
        for entry in &open {
            let (entry_id, settled) = match entry {
                // Already completed or aborted counts as aborted.
                OpenUpload::Known { id, key } => {
                    (id.clone(), self.bucket.abort(key, id).await.map(|()| 1))
                }
                // Died between asking for an upload and recording its id: whatever the bucket
                // has open under that key since shortly before is this mirror's.
                OpenUpload::Intent { token, key, at_ms } => {
                    (token.clone(), self.bucket.settle_intent(key, *at_ms).await)
                }
            };
            // One the bucket would not abort now stays recorded for the next start (and an
            // intent for the next upload of its key); the mirror goes on.
            match settled {
                Ok(n) => stale += n,
                Err(e) => {
                    tracing::warn!("mirror: an upload of a previous run stays open: {e}");
                    continue;
                }
            }
            let db = self.db.clone();
            let _ = tokio::task::spawn_blocking(move || db.upload_ended(&entry_id)).await;
        }
        if self.bucket.size_of("nix-cache-info").await?.is_none() {
            self.bucket
                .put("nix-cache-info", info.into_bytes(), CACHE_INFO_TYPE)
                .await?;
        }
        Ok(stale)
    }

    async fn run(&mut self, cancel: CancellationToken) {
        self.metrics
            .mirror_upload_slots
            .set(self.throttle.allowed() as i64);
        // Its work directory, made afresh; a full disk or a permission is tried again later,
        // never the mirror's end.
        let mut wait = Duration::from_secs(1);
        loop {
            let tmp = self.tmp.clone();
            let made = tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp)
            })
            .await;
            let (Ok(Err(e)) | Err(e)) = made.map_err(std::io::Error::other) else {
                break;
            };
            let why = format!("creating {}: {e}", self.tmp.display());
            tracing::error!("mirror: {why}; trying again in {wait:?}");
            self.set_error(Some(why));
            if !backed_off(&cancel, &mut wait).await {
                return;
            }
        }
        if wait > Duration::from_secs(1) {
            self.set_error(None);
        }
        // What a previous run left unfinished: the outbox does not offer it again, so a failure
        // to read it is tried again, never passed over.
        let mut wait = Duration::from_secs(1);
        loop {
            let db = self.db.clone();
            let read = tokio::task::spawn_blocking(move || db.outbox_unfinished()).await;
            let e = match read {
                Ok(Ok(open)) => {
                    let open: Vec<_> = open.into_iter().map(|(r, s)| (r, s, true)).collect();
                    self.add(open).await;
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::error!("mirror: reading the outbox: {e}; trying again in {wait:?}");
            self.record_failure(format!("reading the outbox: {e}"));
            if !backed_off(&cancel, &mut wait).await {
                return;
            }
        }
        self.publish_counts();
        if !self.prepare(&cancel).await {
            return;
        }
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut changes = self.db.subscribe();
        let mut paths = self.db.subscribe_changed_paths();
        let mut started = self.arriving.as_ref().map(Arriving::subscribe);
        let mut recheck = tokio::time::Instant::now() + RECHECK;
        let mut orphans_at = tokio::time::Instant::now() + ORPHANS_RECHECK;
        let mut audits = audit::Schedule::new(
            Duration::from_secs(self.cfg.audit_secs),
            tokio::time::Instant::now(),
        );
        let mut auditing: Option<tokio::task::JoinHandle<()>> = None;
        let (audit_tx, mut audit_rx) = tokio::sync::mpsc::channel(1);
        let mut probing: Option<tokio::task::JoinHandle<Result<(), s3::S3Error>>> = None;
        loop {
            self.take_new().await;
            self.schedule(&mut tasks);
            self.publish_counts();
            let mut touched = Vec::new();
            let mut done = Vec::new();
            let probe_at = self
                .pause
                .probe_at()
                .filter(|_| probing.is_none())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = cancel.cancelled() => break,
                // Uploads are paused: is the bucket back?
                _ = sleep_until_some(probe_at) => {
                    let bucket = self.bucket.clone();
                    probing = Some(tokio::spawn(async move { bucket.check().await }));
                }
                r = async { probing.as_mut().expect("a probe").await }, if probing.is_some() => {
                    probing = None;
                    self.probed(r.unwrap_or_else(|e| {
                        Err(s3::S3Error::Other {
                            op: "HEAD bucket",
                            key: String::new(),
                            message: e.to_string(),
                        })
                    }));
                }
                Some(r) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    done.push(r);
                    while let Some(r) = tasks.try_join_next_with_id() {
                        done.push(r);
                    }
                }
                // New records.
                _ = changes.changed() => {}
                // A record changed: among others, a NAR the mirror waits for may be here now.
                p = paths.recv() => match p {
                    Ok(h) => touched.push(h),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        touched.extend(self.news_lost());
                    }
                    Err(_) => {}
                },
                // A NAR the mirror waits for started to arrive: it can be read as it comes.
                p = next_started(&mut started) => match p {
                    Ok(h) => touched.push(h),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        touched.extend(self.plan.not_local().map(str::to_owned));
                    }
                    Err(_) => started = None,
                },
                _ = tokio::time::sleep_until(recheck) => {
                    let now = tokio::time::Instant::now();
                    recheck = now + RECHECK;
                    let orphans_too = now >= orphans_at;
                    if orphans_too {
                        orphans_at = now + ORPHANS_RECHECK;
                    }
                    touched.extend(to_recheck(&self.plan, &self.orphaned, orphans_too));
                    if orphans_too {
                        touched.extend(self.unplanned.iter().cloned());
                    }
                }
                _ = sleep_until_some(audits.at()), if auditing.as_ref().is_none_or(|a| a.is_finished()) => {
                    // The last audit has ended: what it said and was not read yet comes first.
                    while let Ok(msg) = audit_rx.try_recv() {
                        self.on_audit(msg, &mut audits).await;
                    }
                    audits.started(tokio::time::Instant::now());
                    self.tally = audit::Tally::default();
                    auditing = Some(tokio::spawn(audit::run(
                        self.bucket.clone(),
                        self.db.clone(),
                        crate::nix::narinfo::cache_info(self.cfg.priority),
                        audit_tx.clone(),
                    )));
                }
                Some(msg) = audit_rx.recv() => self.on_audit(msg, &mut audits).await,
            }
            // News lost while this turn ran (a burst of changes): every path whose NAR is not
            // here is looked at, orphans too.
            let mut lost = false;
            crate::db::drain(&mut paths, &mut touched, &mut lost);
            if let Some(s) = started.as_mut() {
                crate::db::drain(s, &mut touched, &mut lost);
            }
            if lost {
                touched.extend(self.news_lost());
            }
            self.refresh_held(touched).await;
            self.finish(done).await;
        }
        // Uploads in flight are dropped; their paths' states were not advanced, so the next
        // run redoes them (and aborts their unfinished parts). An audit stops where it is
        // (what it put back is pending in the outbox, which the next run reads).
        if let Some(a) = auditing {
            a.abort();
        }
        if let Some(p) = probing {
            p.abort();
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// What a running audit says: lost paths, handed back; its end, reported (a failed audit,
    /// or one that left narinfos unsettled, comes again sooner).
    async fn on_audit(&mut self, msg: audit::Msg, audits: &mut audit::Schedule) {
        match msg {
            audit::Msg::Lost(lost) => self.put_back(lost).await,
            audit::Msg::End(r) => {
                let clean = r.as_ref().is_ok_and(|f| f.errors == 0);
                audits.ended(tokio::time::Instant::now(), clean);
                self.audited(r);
            }
        }
    }

    /// Lost paths an audit found, back into the mirror's hands (`Db::outbox_again`) and into
    /// the plan; counted for the audit's report.
    async fn put_back(&mut self, lost: Vec<(String, bool)>) {
        let (db, me) = (self.db.clone(), self.me);
        match tokio::task::spawn_blocking(move || db.outbox_again(&lost, me.as_ref())).await {
            Ok(Ok(again)) => {
                self.tally.add(&again);
                let back = again.back.into_iter().map(|(r, s)| (r, s, true)).collect();
                self.add(back).await;
            }
            // Still done in the outbox: the next audit finds them again.
            Ok(Err(e)) => tracing::error!("mirror: putting back paths the bucket lost: {e}"),
            Err(e) => tracing::error!("mirror: putting back paths the bucket lost: {e}"),
        }
    }

    /// Report an audit's end: logged and counted. A failure is the mirror's problem until an
    /// upload or the next audit succeeds.
    fn audited(&self, r: Result<audit::Found, audit::AuditError>) {
        let t = &self.tally;
        self.metrics.mirror_audit_lost.inc_by(t.lost());
        let f = match r {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("mirror: audit of bucket {}: {e}", self.bucket.name());
                self.set_error(Some(format!("audit: {e}")));
                return;
            }
        };
        self.metrics.mirror_audits.inc();
        if t.lost() > 0 || f.cache_info {
            tracing::warn!(
                "mirror: audit of bucket {}: {} objects listed; {} completed path(s) lost their \
                 narinfo or NAR: {} going up again ({} of them only their narinfo, the NAR being \
                 whole in the bucket), {} held by nobody (waiting until a node holds them), {} \
                 forgotten here; {} narinfo(s) naming a lost NAR deleted first{}{}{}",
                self.bucket.name(),
                f.objects,
                t.lost(),
                t.back,
                t.narinfo_only,
                t.gone,
                t.forgotten,
                f.dangling,
                if f.cache_info {
                    "; nix-cache-info put back"
                } else {
                    ""
                },
                if t.named.is_empty() { "" } else { "; lost: " },
                t.named.join(", "),
            );
        } else {
            tracing::info!(
                "mirror: audit of bucket {}: {} objects listed, nothing lost",
                self.bucket.name(),
                f.objects
            );
        }
        if let Some(e) = &f.last_error {
            let msg = format!(
                "audit: {} narinfo(s) could not be checked or deleted, left for the next audit: {e}",
                f.errors
            );
            tracing::warn!("mirror: {msg}");
            self.set_error(Some(msg));
            return;
        }
        // Only an audit's own failure is over: an upload's stands until one succeeds.
        let audit_failed = self
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("audit: "));
        if audit_failed {
            self.set_error(None);
        }
    }

    fn publish_counts(&mut self) {
        let (paths, bytes) = self.plan.pending();
        self.metrics.mirror_pending_paths.set(paths as i64);
        self.metrics.mirror_pending_bytes.set(bytes as i64);
        let plan = &self.plan;
        self.orphaned.retain(|h| plan.waits_for_nar(h));
        self.metrics
            .mirror_orphaned_paths
            .set(self.orphaned.len() as i64);
    }
}

/// The next news of a transfer starting; never, without a mesh.
async fn next_started(
    rx: &mut Option<tokio::sync::broadcast::Receiver<String>>,
) -> Result<String, tokio::sync::broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Wait out `wait` (false if cancelled first), and double it for the next time, up to a minute.
async fn backed_off(cancel: &CancellationToken, wait: &mut Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => return false,
        _ = tokio::time::sleep(*wait) => {}
    }
    *wait = (*wait * 2).min(Duration::from_secs(60));
    true
}

/// Sleep until `at`; forever if `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The completions kept for the upload rate are a window's worth, whether or not anyone
    /// asks for the status: a mirror uploading for months keeps no more.
    #[test]
    fn the_rate_keeps_a_window_of_completions() {
        let mut s = Stats::default();
        let old = Instant::now()
            .checked_sub(RATE_WINDOW + Duration::from_secs(1))
            .expect("a clock older than the window");
        s.recent.extend((0..1000).map(|_| (old, 1 << 20)));
        s.completed(100);
        assert_eq!(s.recent.len(), 1, "older completions stayed");
        s.completed(100);
        assert_eq!(s.rate(), 200 / RATE_WINDOW.as_secs());
    }

    /// Orphaned paths are not read again every few seconds (news of one brings it at once),
    /// only at the slow sweep; the others waiting for a NAR not here are; one whose NAR is in
    /// the bucket never is.
    #[test]
    fn orphans_wait_for_news_or_the_slow_sweep() {
        let mut plan = Plan::default();
        plan.add("lost", MirrorState::Pending, false, 1, &[]);
        plan.add("fetching", MirrorState::Pending, false, 1, &[]);
        plan.add("here", MirrorState::Pending, true, 1, &[]);
        let up = MirrorState::NarStored {
            url: "nar/x".into(),
            compression: "none".into(),
            file_hash: [0; 32],
            file_size: 1,
            blake3: None,
        };
        plan.add("up", up, false, 1, &["lost".to_owned()]);
        let orphaned = ["lost".to_owned()].into_iter().collect();
        assert_eq!(to_recheck(&plan, &orphaned, false), ["fetching"]);
        // Lost news is seen as such.
        let (tx, mut rx) = tokio::sync::broadcast::channel(2);
        for h in ["a", "b", "c"] {
            tx.send(h.to_owned()).unwrap();
        }
        let (mut touched, mut lost) = (Vec::new(), false);
        crate::db::drain(&mut rx, &mut touched, &mut lost);
        assert!(lost);
        assert_eq!(touched, ["b", "c"]);
        let mut all = to_recheck(&plan, &orphaned, true);
        all.sort();
        assert_eq!(all, ["fetching", "lost"]);
    }
}
