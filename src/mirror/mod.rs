//! The S3 mirror: on the designated node, every recorded path (built here or learnt from
//! peers, whose NARs this node fetches eagerly) goes into an S3 binary cache in Nix's own
//! layout. It owns the outbox's progress: it takes paths from the node's log into the durable
//! outbox and uploads them in the order [`plan`] decides (a narinfo only once its NAR and the
//! narinfos of all its references are in the bucket, references signed upstream excepted, so a
//! reader never finds a narinfo whose NAR or closure is missing). A NAR still arriving from
//! peers is compressed as it arrives (the mesh's [`Arriving`]), not after. The uploads are
//! [`job`]s; failures back off per path, and a `SlowDown` from the bucket lowers the number in
//! flight ([`throttle`]); identical NARs go up once ([`same`]). Multipart uploads are recorded
//! while open, so after a crash exactly this mirror's are aborted. What the bucket loses later
//! is found by a periodic [`audit`] and put up again. Nothing here blocks ingest, the pipeline
//! or the mesh.

mod audit;
mod compress;
mod job;
mod pause;
mod plan;
pub mod s3;
mod same;
mod throttle;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use narmesh_proto::control::MirrorStatus;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use compress::FileDigest;
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

    /// Take paths into the plan: their records, states, whether their NARs are here, and which
    /// of their references are not complete in the bucket yet (looked up off the async threads).
    async fn add(&mut self, recs: Vec<(PathRecord, MirrorState, bool)>) {
        if recs.is_empty() {
            return;
        }
        let recs: Vec<_> = recs
            .into_iter()
            .filter(|(r, _, _)| !self.plan.has(r.hash_part()))
            .collect();
        let hashes: Vec<String> = recs
            .iter()
            .map(|(r, ..)| r.hash_part().to_owned())
            .collect();
        // The claim each path uploads, as this node can read them, and whether its NAR is here
        // (off the async threads); the paths of which no claim can be uploaded.
        let (storage, arriving, me) = (self.storage.clone(), self.arriving.clone(), self.me);
        let Ok((entries, none)) = tokio::task::spawn_blocking(move || {
            let mut none = Vec::new();
            let entries = recs
                .into_iter()
                .filter_map(|(r, s, tried)| {
                    let readable = |b: &[u8; 32]| readable(&storage, arriving.as_ref(), b);
                    let served = r.served(me.as_ref(), |c| readable(&c.blake3));
                    let Some((e, s)) = Entry::choose(&r, s, served) else {
                        none.push(r.hash_part().to_owned());
                        return None;
                    };
                    let local = readable(&e.blake3);
                    Some((e, s, tried, local))
                })
                .collect::<Vec<(Entry, MirrorState, bool, bool)>>();
            (entries, none)
        })
        .await
        else {
            tracing::error!("mirror: choosing the claims to upload failed");
            self.unplanned.extend(hashes);
            return;
        };
        if !none.is_empty() {
            tracing::warn!(
                "mirror: {} path(s) with no claim to upload (every NAR failed its checks), e.g. \
                 {}: they wait for a record that brings another",
                none.len(),
                none[0]
            );
        }
        self.unplanned.extend(none);
        // References the plan knows are incomplete by definition; the others are asked.
        let mut ask: Vec<String> = entries
            .iter()
            .flat_map(|(e, ..)| e.references())
            .filter(|r| !self.plan.has(r))
            .collect();
        ask.sort();
        ask.dedup();
        let batch: std::collections::HashSet<String> =
            entries.iter().map(|(e, ..)| e.hash.clone()).collect();
        let db = self.db.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let done = db
                .outbox_done(&ask)
                .unwrap_or_else(|_| vec![false; ask.len()]);
            ask.into_iter().zip(done).collect::<HashMap<_, _>>()
        })
        .await;
        let Ok(done) = looked else {
            tracing::error!("mirror: looking up references failed");
            self.unplanned
                .extend(entries.into_iter().map(|(e, ..)| e.hash));
            return;
        };
        for (e, state, tried, local) in entries {
            self.unplanned.remove(&e.hash);
            let missing: Vec<String> = e
                .references()
                .into_iter()
                .filter(|r| {
                    batch.contains(r) || self.plan.has(r) || !done.get(r).copied().unwrap_or(false)
                })
                .collect();
            // Kept from eviction until its NAR is in the bucket.
            if state == MirrorState::Pending {
                self.storage.protect([e.blake3]);
            }
            if tried {
                self.tried.insert(e.hash.clone());
            }
            if matches!(state, MirrorState::NarStored { .. }) {
                self.stored.insert(e.hash.clone(), state.clone());
            }
            self.plan.add(&e.hash, state, local, e.nar_size, &missing);
            self.entries.insert(e.hash.clone(), e);
        }
    }

    /// What is looked at when news of changed records was lost: every path whose NAR is not
    /// here, and every path the plan could not take in.
    fn news_lost(&self) -> Vec<String> {
        let not_local = self.plan.not_local().map(str::to_owned);
        not_local.chain(self.unplanned.iter().cloned()).collect()
    }

    /// Paths the plan could not take in before, as the outbox has them now (one it finished
    /// or forgot meanwhile is no longer waited for).
    async fn add_again(&mut self, hashes: Vec<String>) {
        let db = self.db.clone();
        let asked = hashes.clone();
        match tokio::task::spawn_blocking(move || db.outbox_unfinished_of(&asked)).await {
            Ok(Ok(open)) => {
                for h in &hashes {
                    self.unplanned.remove(h);
                }
                let open: Vec<_> = open.into_iter().map(|(r, s)| (r, s, true)).collect();
                self.add(open).await;
            }
            Ok(Err(e)) => tracing::warn!("mirror: reading the outbox: {e}"),
            Err(e) => tracing::warn!("mirror: reading the outbox: {e}"),
        }
    }

    /// Take newly logged paths into the outbox and the plan.
    async fn take_new(&mut self) {
        loop {
            let (db, me) = (self.db.clone(), self.me);
            match tokio::task::spawn_blocking(move || db.outbox_take(TAKE, me.as_ref())).await {
                Ok(Ok((new, more))) => {
                    let new = new
                        .into_iter()
                        .map(|r| (r, MirrorState::Pending, false))
                        .collect();
                    self.add(new).await;
                    if !more {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!("mirror: taking new paths: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!("mirror: taking new paths: {e}");
                    return;
                }
            }
        }
    }

    /// Of these paths, those the plan waits for whose NAR is here now (or arriving: it is read
    /// as it comes) go ahead; of the others, one whose record serves another claim now that can
    /// be had takes it (`look`, `switch`), and those of which no claim can be had (every
    /// holder's Nix GC took it, or its cap evicted it, before this node fetched it) are
    /// orphaned: they, and the closures above them, wait until a node holds it again (news of
    /// that changes the record, which brings the path here again).
    async fn refresh_held(&mut self, touched: Vec<String>) {
        let again: Vec<String> = touched
            .iter()
            .filter(|h| self.unplanned.contains(*h))
            .cloned()
            .collect();
        if !again.is_empty() {
            self.add_again(again).await;
        }
        let waiting: Vec<(String, [u8; 32], bool)> = touched
            .into_iter()
            .filter_map(|h| {
                let e = self.entries.get(&h)?;
                let waits = self.plan.waits_for_nar(&h);
                Some((h, e.blake3, waits))
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let (storage, arriving) = (self.storage.clone(), self.arriving.clone());
        let (db, me) = (self.db.clone(), self.me);
        let looked = tokio::task::spawn_blocking(move || {
            waiting
                .into_iter()
                .map(|(h, b, waits)| {
                    let seen = if readable(&storage, arriving.as_ref(), &b) {
                        Seen::Held
                    } else if !waits {
                        // Only a NAR not in the bucket yet is waited for.
                        Seen::Offered
                    } else {
                        look(&db, &storage, arriving.as_ref(), me.as_ref(), &h, &b)
                    };
                    (h, seen)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut newly = Vec::new();
        for (h, seen) in looked {
            let seen = match seen {
                Seen::Other(e, held, done) => self.switch(&h, e, held, &done),
                seen => seen,
            };
            match seen {
                Seen::Orphaned => {
                    if self.orphaned.insert(h.clone()) {
                        newly.push(h);
                    }
                }
                Seen::Held => {
                    self.orphaned.remove(&h);
                    self.plan.held(&h);
                }
                Seen::Offered => {
                    self.orphaned.remove(&h);
                }
                Seen::Other(..) => {}
            }
        }
        if let Some(first) = newly.first().and_then(|h| self.entries.get(h)) {
            tracing::warn!(
                "mirror: {} path(s) wait for a NAR that no node holds any more (the first: {}); \
                 they and what refers to them are mirrored once a node holds it again",
                newly.len(),
                first.store_path
            );
        }
    }

    /// Path `h` waits for a NAR, and its record serves `e` now (every holder of the first lost
    /// it and a node holds another build, or this node holds another build): the plan takes
    /// that claim instead, waiting for `e`'s references (`done`: those complete in the bucket)
    /// where they differ. Nothing of the first claim went to the bucket (the path waits for its
    /// NAR), so nothing is kept of it; the NAR that goes up notes its claim, and the narinfo
    /// follows that one.
    fn switch(&mut self, h: &str, e: Entry, held: bool, done: &HashMap<String, bool>) -> Seen {
        let Some(old) = self.entries.get(h) else {
            return Seen::Orphaned;
        };
        let (mut a, mut b) = (old.references(), e.references());
        a.sort();
        b.sort();
        if a != b {
            let missing: Vec<String> = b
                .iter()
                .filter(|r| self.plan.has(r) || !done.get(*r).copied().unwrap_or(false))
                .cloned()
                .collect();
            self.plan.rewire(h, &a, &missing);
        }
        tracing::info!(
            "mirror: {}: taking the build a node holds ({} bytes), not the one it waited for",
            e.store_path,
            e.nar_size
        );
        // The first claim's NAR is released unless another path waits for the same bytes.
        let first = old.blake3;
        if !self
            .entries
            .iter()
            .any(|(k, x)| k.as_str() != h && x.blake3 == first)
        {
            self.storage.release(&[first]);
        }
        self.storage.protect([e.blake3]);
        self.plan.resize(h, e.nar_size);
        self.entries.insert(h.to_owned(), e);
        if held {
            self.plan.held(h);
            Seen::Held
        } else {
            Seen::Offered
        }
    }

    /// Start uploads, as the plan decides, up to what the throttle allows.
    fn schedule(&mut self, tasks: &mut JoinSet<Outcome>) {
        if self.pause.is_paused() {
            return;
        }
        // A job set aside (its NAR's upload runs for another path) takes no room: ask again.
        // Each job handed out is busy in the plan from then on, so this ends.
        loop {
            let room = self.throttle.allowed().saturating_sub(tasks.len());
            let jobs = self.plan.next_jobs(Instant::now(), room);
            if jobs.is_empty() {
                return;
            }
            self.start_jobs(jobs, tasks);
        }
    }

    /// Start these uploads (a NAR job whose NAR goes up for another path is set aside).
    fn start_jobs(&mut self, jobs: Vec<Job>, tasks: &mut JoinSet<Outcome>) {
        for job in jobs {
            match job {
                Job::Nar(hash) => {
                    let Some(rec) = self.entries.get(&hash).cloned() else {
                        continue;
                    };
                    let b = rec.blake3;
                    let put = match self.same.starting(&b, &hash) {
                        same::Start::Go(put) => put,
                        // Set aside until the upload of the same NAR ends: it stays busy in the
                        // plan (as every job handed out) until `resume`.
                        same::Start::Wait => continue,
                    };
                    let job = NarJob {
                        tmp: self.tmp.join(format!("{hash}.nar")),
                        rec,
                        how: self.cfg.compression,
                        storage: self.storage.clone(),
                        bucket: self.bucket.clone(),
                        db: self.db.clone(),
                        check_first: self.tried.contains(&hash),
                        compressing: self.compressing.clone(),
                        arriving: self.arriving.clone(),
                    };
                    let path = hash.clone();
                    let task = tasks.spawn(async move {
                        if crate::killpoint::fault("mirror.nar-task-panics") {
                            panic!("a fault injected into a NAR upload task");
                        }
                        if let Some(state) = put
                            && job.still_there(&state).await
                        {
                            return Outcome {
                                hash,
                                nar: Some(b),
                                result: Ok(state),
                                bytes: 0,
                                streamed: false,
                            };
                        }
                        let (result, streamed) = match job.run().await {
                            Ok((state, streamed)) => (Ok(state), streamed),
                            Err(e) => (Err(e), false),
                        };
                        let bytes = match &result {
                            Ok(MirrorState::NarStored { file_size, .. }) => *file_size,
                            _ => 0,
                        };
                        Outcome {
                            hash,
                            nar: Some(b),
                            result,
                            bytes,
                            streamed,
                        }
                    });
                    self.same.started(b, &path, task.id());
                    self.running.insert(task.id(), path);
                }
                Job::Narinfo(hash) => {
                    let Some(rec) = self.entries.get(&hash).cloned() else {
                        continue;
                    };
                    let (bucket, state) = (self.bucket.clone(), self.state_of(&hash));
                    let path = hash.clone();
                    let task = tasks.spawn(async move {
                        if crate::killpoint::fault("mirror.narinfo-task-panics") {
                            panic!("a fault injected into a narinfo upload task");
                        }
                        let result = match state {
                            Some(s) => put_narinfo(&bucket, &rec, &s)
                                .await
                                .map(|()| MirrorState::Done),
                            None => Err(JobError::Other("no state".into())),
                        };
                        Outcome {
                            hash,
                            nar: None,
                            result,
                            bytes: 0,
                            streamed: false,
                        }
                    });
                    self.running.insert(task.id(), path);
                }
            }
        }
    }

    /// Where a path's NAR is in the bucket (the state its narinfo is written from).
    fn state_of(&self, hash: &str) -> Option<MirrorState> {
        self.stored.get(hash).cloned()
    }

    /// Record finished uploads (one commit) and plan retries for failed ones.
    async fn finish(
        &mut self,
        done: Vec<Result<(tokio::task::Id, Outcome), tokio::task::JoinError>>,
    ) {
        if done.is_empty() {
            return;
        }
        let mut updates = Vec::new();
        let mut failed = Vec::new();
        let mut shared = 0;
        for r in done {
            let out = match r {
                Ok((id, o)) => {
                    self.running.remove(&id);
                    o
                }
                Err(e) => {
                    // It panicked: its path is tried again, like a failed one, and the paths
                    // that waited for its NAR are ready again.
                    tracing::error!("mirror: an upload task failed: {e}");
                    for h in self.same.lost(e.id()) {
                        self.plan.resume(&h);
                    }
                    if let Some(path) = self.running.remove(&e.id()) {
                        failed.push((
                            path,
                            JobError::Other(format!("the upload task failed: {e}")),
                        ));
                    }
                    continue;
                }
            };
            if let Some(b) = &out.nar {
                // The paths set aside for this upload: ready again (to point at what it put, or
                // to try it themselves).
                for h in self.same.ended(b, out.result.as_ref().ok()) {
                    self.plan.resume(&h);
                }
            }
            match out.result {
                Err(JobError::NotHere) => self.plan.not_held(&out.hash),
                // Only a NAR job that pointed at an identical NAR's object puts no bytes: no
                // upload, so no news for the throttle.
                Ok(state) if out.nar.is_some() && out.bytes == 0 => {
                    shared += 1;
                    updates.push((out.hash, state));
                }
                Ok(state) => {
                    self.throttle.success();
                    self.pause.uploaded();
                    if out.streamed {
                        self.metrics.mirror_streamed_nars.inc();
                    }
                    if out.bytes > 0 {
                        self.metrics.mirror_uploaded_bytes.inc_by(out.bytes);
                        self.stats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .completed(out.bytes);
                    }
                    updates.push((out.hash, state));
                }
                Err(e) => {
                    if matches!(e, JobError::SlowDown(_)) {
                        self.throttle.slow_down();
                        if let Some(more) = self.slow_log.allow() {
                            let more = if more > 0 {
                                format!(" ({more} more such answers meanwhile)")
                            } else {
                                String::new()
                            };
                            tracing::info!(
                                "mirror: the bucket asked to slow down: {} upload(s) at \
                                 once{more}",
                                self.throttle.allowed()
                            );
                        }
                    }
                    failed.push((out.hash, e));
                }
            }
        }
        self.metrics
            .mirror_upload_slots
            .set(self.throttle.allowed() as i64);
        let db = self.db.clone();
        let batch = updates.clone();
        let committed = tokio::task::spawn_blocking(move || {
            if !batch.is_empty() && crate::killpoint::fault("mirror.commit-fails") {
                return Err(crate::db::DbError::Injected);
            }
            db.outbox_set(&batch)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let now = Instant::now();
        let any_ok = committed.is_ok() && !updates.is_empty();
        let mut others = Vec::new();
        match committed {
            Err(e) => {
                // Nothing advanced: the same steps run again later (each is idempotent).
                tracing::error!("mirror: recording progress: {e}");
                for (h, _) in &updates {
                    self.plan.failed(h, now);
                }
                updates.clear();
            }
            Ok(released) => {
                self.metrics.mirror_shared_nars.inc_by(shared);
                others = released;
            }
        }
        for (h, state) in updates {
            if state == MirrorState::Done {
                self.plan.done(&h);
                self.stored.remove(&h);
                self.tried.remove(&h);
                if let Some(e) = self.entries.remove(&h) {
                    self.storage.release(&[e.blake3]);
                }
                self.metrics.mirror_uploaded_paths.inc();
            } else {
                self.stored.insert(h.clone(), state.clone());
                self.plan.nar_stored(&h, state);
            }
        }
        // Every build of the paths done or whose NAR went up (the eviction guard kept every
        // build of a path whose NAR was not up; a narinfo needs none), unless a path still in
        // the plan waits for the same bytes.
        others.retain(|b| !self.storage.is_released(b));
        if !others.is_empty() {
            let waited: std::collections::HashSet<[u8; 32]> = self
                .entries
                .iter()
                .filter(|(h, _)| self.plan.needs_nar(h))
                .map(|(_, e)| e.blake3)
                .collect();
            others.retain(|b| !waited.contains(b));
            self.storage.release(&others);
        }
        if any_ok && failed.is_empty() {
            self.set_error(None);
        }
        for (h, e) in failed {
            self.metrics.mirror_failures.inc();
            self.tried.insert(h.clone());
            let wait = self.plan.failed(&h, now);
            let path = self
                .entries
                .get(&h)
                .map_or(h.clone(), |e| e.store_path.clone());
            if let JobError::Bucket(why) = &e {
                // Every upload would fail alike: none starts until the bucket answers.
                tracing::debug!("mirror: {path}: {e}");
                if let Some(wait) = self.pause.bucket_failed(now) {
                    tracing::error!(
                        "mirror: {why}; uploads paused until the bucket answers (asked in \
                         {wait:?})"
                    );
                }
                self.set_error(Some(why.clone()));
                continue;
            }
            tracing::warn!("mirror: {path}: {e}; retrying in {wait:?}");
            self.set_error(Some(format!("{path}: {e}")));
        }
    }

    /// What a probe of the paused bucket found: uploads resume once it answers.
    fn probed(&mut self, r: Result<(), s3::S3Error>) {
        match r {
            Ok(()) => {
                if self.pause.probe_answered() {
                    tracing::info!(
                        "mirror: bucket {} answers again; uploads resume",
                        self.bucket.name()
                    );
                    self.set_error(None);
                }
            }
            Err(e) => {
                if let Some(wait) = self.pause.probe_failed(Instant::now()) {
                    tracing::warn!("mirror: {e}; uploads stay paused (asked again in {wait:?})");
                    self.record_failure(e.to_string());
                }
            }
        }
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

/// The paths that wait for a NAR not here yet to look at again without news of them: orphaned
/// ones only if `orphans_too`. (One whose NAR is in the bucket needs it no more.)
fn to_recheck(
    plan: &Plan,
    orphaned: &std::collections::HashSet<String>,
    orphans_too: bool,
) -> Vec<String> {
    plan.not_local()
        .filter(|h| plan.waits_for_nar(h) && (orphans_too || !orphaned.contains(*h)))
        .map(str::to_owned)
        .collect()
}

/// What the mirror saw of a NAR it waits for.
enum Seen {
    /// Held here, or arriving from peers.
    Held,
    /// A peer says it holds it (or the path does not wait for it).
    Offered,
    /// The path serves another claim now, whose NAR can be had: its entry, whether it is held
    /// here (or arriving), and which of its references are complete in the bucket.
    Other(Entry, bool, HashMap<String, bool>),
    /// Nobody says they hold it, nor any other claim of the path.
    Orphaned,
}

/// What the NAR `blake3` of path `hash`, not readable here, is to the mirror now, by the rule
/// the eager fetches follow (`PathRecord::served`): the path still serves it and a peer says
/// it holds it (or the record could not be read: not taken for orphaned on a doubt); or the
/// path serves another claim whose NAR can be had (with which of that claim's references are
/// complete in the bucket); or no claim of the path can be had. Blocking.
fn look(
    db: &Db,
    storage: &Storage,
    arriving: Option<&Arriving>,
    me: Option<&[u8; 32]>,
    hash: &str,
    blake3: &[u8; 32],
) -> Seen {
    let rec = match db.path(hash) {
        Ok(Some(rec)) => rec,
        Ok(None) => return Seen::Orphaned,
        Err(_) => return Seen::Offered,
    };
    let mut held = false;
    let served = rec.obtainable(
        |c| {
            held = readable(storage, arriving, &c.blake3);
            held
        },
        |c| c.held_by_peer(me),
    );
    match served {
        Some(c) if c.blake3 == *blake3 => Seen::Offered,
        Some(c) => {
            let e = Entry::of(&rec, c);
            let refs = e.references();
            let done = db
                .outbox_done(&refs)
                .unwrap_or_else(|_| vec![false; refs.len()]);
            Seen::Other(e, held, refs.into_iter().zip(done).collect())
        }
        None => Seen::Orphaned,
    }
}

/// True if the NAR can be read now: held here, or arriving from peers. Blocking.
fn readable(storage: &Storage, arriving: Option<&Arriving>, blake3: &[u8; 32]) -> bool {
    storage.holds_blocking(blake3) || arriving.is_some_and(|a| a.is_arriving(blake3))
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

/// Sleep until `at`; forever if `None`.
/// Wait out `wait` (false if cancelled first), and double it for the next time, up to a minute.
async fn backed_off(cancel: &CancellationToken, wait: &mut Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => return false,
        _ = tokio::time::sleep(*wait) => {}
    }
    *wait = (*wait * 2).min(Duration::from_secs(60));
    true
}

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
