//! The S3 mirror: on the designated node, every recorded path (built here or learnt from
//! peers, whose NARs this node fetches eagerly) goes into an S3 binary cache in Nix's own
//! layout. It owns the outbox's progress: it takes paths from the node's log into the durable
//! outbox, uploads each compressed NAR, and uploads a narinfo only once its NAR and the
//! narinfos of all its references are in the bucket, so a reader never finds a narinfo whose
//! NAR or references are missing. Failures back off per path; nothing here blocks ingest, the
//! pipeline or the mesh.

mod compress;
pub mod s3;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use narmesh_proto::control::MirrorStatus;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use compress::{FileDigest, compress_into};
use s3::{Bucket, CACHE_INFO_TYPE, NAR_TYPE, NARINFO_TYPE};

use crate::config::{Compression, S3Config};
use crate::db::{Db, MirrorState, PathRecord};
use crate::metrics::Metrics;
use crate::nix::{NarInfo, Sha256, base32};
use crate::storage::Storage;

/// How often the mirror looks for new work when nothing woke it.
const TICK: Duration = Duration::from_millis(200);
/// Log entries taken into the outbox per commit.
const TAKE: usize = 1000;
/// A reference this node has never recorded is taken as public (signed upstream, never
/// ingested) once it has stayed unknown this long; before, it may still be on its way here.
const EXTERNAL_GRACE: Duration = Duration::from_secs(5);
/// Longest wait before retrying a failed path.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Window over which the upload rate in status is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the mirror needs from the node.
pub struct MirrorParts {
    pub cfg: S3Config,
    pub data_dir: PathBuf,
    pub db: Db,
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
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
        let task = tokio::spawn(async move {
            let mut m = Mirror::new(parts, stats).await;
            m.run(cancel).await;
        });
        (handle, task)
    }

    /// The mirror's state for `narmesh status`.
    pub fn status(&self) -> MirrorStatus {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            s.recent.pop_front();
        }
        let bytes: u64 = s.recent.iter().map(|(_, b)| b).sum();
        let m = &self.metrics;
        MirrorStatus {
            bucket: self.bucket.clone(),
            pending_paths: m.mirror_pending_paths.get().max(0) as u64,
            pending_bytes: m.mirror_pending_bytes.get().max(0) as u64,
            uploaded_paths: m.mirror_uploaded_paths.get(),
            uploaded_bytes: m.mirror_uploaded_bytes.get(),
            upload_bytes_per_sec: bytes / RATE_WINDOW.as_secs(),
            failures: m.mirror_failures.get(),
            last_error: s.last_error.clone(),
        }
    }
}

/// What the mirror needs of a record: its served claim.
#[derive(Debug, Clone)]
struct Entry {
    store_path: String,
    hash: String,
    narinfo: String,
    blake3: [u8; 32],
    nar_size: u64,
    /// References signed upstream (not waited for).
    upstream_refs: Vec<String>,
    /// Whether this node holds the NAR (the mesh fetches it otherwise).
    local: bool,
}

impl Entry {
    fn of(rec: &PathRecord, local: bool) -> Option<Self> {
        let c = rec.active()?;
        Some(Entry {
            store_path: rec.store_path.clone(),
            hash: rec.hash_part().to_owned(),
            narinfo: c.narinfo.clone(),
            blake3: c.blake3,
            nar_size: c.nar_size,
            upstream_refs: c.upstream_refs.clone(),
            local,
        })
    }

    fn hash_part(&self) -> &str {
        &self.hash
    }
}

/// One path on its way to the bucket.
struct Item {
    rec: Entry,
    state: MirrorState,
    busy: bool,
    failures: u32,
    retry_at: Option<Instant>,
    /// An earlier attempt (this run or a killed one) may have put its NAR in the bucket.
    tried: bool,
}

/// What a finished upload task reports.
struct Outcome {
    hash: String,
    result: Result<MirrorState, String>,
    bytes: u64,
}

struct Mirror {
    cfg: S3Config,
    tmp: PathBuf,
    db: Db,
    storage: Storage,
    metrics: Arc<Metrics>,
    stats: Arc<Mutex<Stats>>,
    bucket: Bucket,
    /// Unfinished paths by hash part, and their order (log order: references first).
    items: HashMap<String, Item>,
    order: Vec<String>,
    /// Compressions at once: compressing is CPU work, so a few at a time, letting the first
    /// NARs go up while later ones are still being compressed.
    compress_gate: Arc<tokio::sync::Semaphore>,
    /// References never recorded here: when first seen, and those taken as public.
    unknown_since: HashMap<String, Instant>,
    external: HashSet<String>,
    /// Paths known to be complete in the bucket (referenced by paths still in flight).
    done: HashSet<String>,
}

impl Mirror {
    async fn new(p: MirrorParts, stats: Arc<Mutex<Stats>>) -> Self {
        let bucket = Bucket::connect(&p.cfg).await;
        Mirror {
            tmp: p.data_dir.join("mirror-tmp"),
            cfg: p.cfg,
            db: p.db,
            storage: p.storage,
            metrics: p.metrics,
            stats,
            bucket,
            items: HashMap::new(),
            order: Vec::new(),
            unknown_since: HashMap::new(),
            external: HashSet::new(),
            done: HashSet::new(),
            compress_gate: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            )),
        }
    }

    fn set_error(&self, e: Option<String>) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.last_error = e;
    }

    /// Wait until the bucket answers, abort the parts of uploads a killed node left behind,
    /// and put `nix-cache-info` in the bucket unless it has one (an operator's own is kept),
    /// all before any upload starts: Nix reads it before any narinfo. False if cancelled first.
    async fn prepare(&self, cancel: &CancellationToken) -> bool {
        let mut wait = Duration::from_secs(1);
        let info = crate::nix::narinfo::cache_info(self.cfg.priority);
        loop {
            let r = async {
                self.bucket.check().await?;
                let stale = self.bucket.abort_stale_uploads("nar/").await?;
                if self.bucket.size_of("nix-cache-info").await?.is_none() {
                    self.bucket
                        .put("nix-cache-info", info.clone().into_bytes(), CACHE_INFO_TYPE)
                        .await?;
                }
                Ok::<_, s3::S3Error>(stale)
            }
            .await;
            match r {
                Ok(stale) => {
                    if stale > 0 {
                        tracing::info!(
                            "mirror: aborted {stale} unfinished upload(s) left by a previous run"
                        );
                    }
                    self.set_error(None);
                    tracing::info!("mirror: bucket {} ready", self.bucket.name());
                    return true;
                }
                Err(e) => {
                    tracing::error!("mirror: {e}; retrying in {wait:?}");
                    self.record_failure(e.to_string());
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn record_failure(&self, e: String) {
        self.metrics.mirror_failures.inc();
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.last_error = Some(e);
    }

    async fn run(&mut self, cancel: CancellationToken) {
        let _ = std::fs::remove_dir_all(&self.tmp);
        if let Err(e) = std::fs::create_dir_all(&self.tmp) {
            tracing::error!(
                "mirror: creating {}: {e}; mirror stopped",
                self.tmp.display()
            );
            self.set_error(Some(format!("creating {}: {e}", self.tmp.display())));
            return;
        }
        // Load what a previous run left unfinished.
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.outbox_unfinished()).await {
            Ok(Ok(open)) => {
                for (rec, state) in open {
                    self.add(rec, state, true);
                }
            }
            Ok(Err(e)) => tracing::error!("mirror: reading the outbox: {e}"),
            Err(e) => tracing::error!("mirror: reading the outbox: {e}"),
        }
        self.publish_counts();
        if !self.prepare(&cancel).await {
            return;
        }
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut changes = self.db.subscribe();
        loop {
            self.take_new().await;
            self.refresh_remote().await;
            self.resolve_references().await;
            self.schedule(&mut tasks);
            self.publish_counts();
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tasks.join_next(), if !tasks.is_empty() => r,
                // New records, or NARs fetched for waiting ones.
                _ = changes.changed() => None,
                _ = tokio::time::sleep(TICK) => None,
            };
            let mut done = Vec::new();
            if let Some(r) = first {
                done.push(r);
                while let Some(r) = tasks.try_join_next() {
                    done.push(r);
                }
            }
            self.finish(done).await;
        }
        // Uploads in flight are dropped; their paths' states were not advanced, so the next
        // run redoes them (and aborts their unfinished parts).
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    fn add(&mut self, rec: PathRecord, state: MirrorState, tried: bool) {
        let local = rec
            .active()
            .is_some_and(|c| self.storage.holds_blocking(&c.blake3));
        let Some(rec) = Entry::of(&rec, local) else {
            return;
        };
        let hash = rec.hash.clone();
        if self.items.contains_key(&hash) {
            return;
        }
        // Kept from eviction until its NAR is in the bucket.
        self.storage.protect([rec.blake3]);
        self.order.push(hash.clone());
        self.items.insert(
            hash,
            Item {
                rec,
                state,
                busy: false,
                failures: 0,
                retry_at: None,
                tried,
            },
        );
    }

    /// Take newly logged paths into the outbox.
    async fn take_new(&mut self) {
        loop {
            let db = self.db.clone();
            match tokio::task::spawn_blocking(move || db.outbox_take(TAKE)).await {
                Ok(Ok((new, more))) => {
                    for rec in new {
                        self.add(rec, MirrorState::Pending, false);
                    }
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

    /// Look again whether the NARs of waiting paths are here yet (the mesh fetches them).
    async fn refresh_remote(&mut self) {
        let waiting: Vec<(String, [u8; 32])> = self
            .items
            .iter()
            .filter(|(_, i)| !i.rec.local && i.state == MirrorState::Pending)
            .map(|(h, i)| (h.clone(), i.rec.blake3))
            .collect();
        if waiting.is_empty() {
            return;
        }
        let storage = self.storage.clone();
        let held = tokio::task::spawn_blocking(move || {
            waiting
                .into_iter()
                .filter(|(_, b)| storage.holds_blocking(b))
                .map(|(h, _)| h)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for h in held {
            if let Some(i) = self.items.get_mut(&h) {
                i.rec.local = true;
            }
        }
    }

    /// Find out, off the async threads, where the references of the paths waiting for their
    /// narinfo stand: complete in the bucket, still on their way, or public (never recorded
    /// here for `EXTERNAL_GRACE`).
    async fn resolve_references(&mut self) {
        let mut unknown: Vec<String> = Vec::new();
        for (hash, item) in &self.items {
            if item.busy || !matches!(item.state, MirrorState::NarStored { .. }) {
                continue;
            }
            let Ok(info) = NarInfo::parse(&item.rec.narinfo) else {
                continue;
            };
            for r in &info.references {
                let rh = r.hash_part();
                if item.rec.upstream_refs.iter().any(|u| u == rh) {
                    continue;
                }
                if rh != hash
                    && !self.items.contains_key(rh)
                    && !self.done.contains(rh)
                    && !self.external.contains(rh)
                {
                    unknown.push(rh.to_owned());
                }
            }
        }
        if unknown.is_empty() {
            return;
        }
        unknown.sort();
        unknown.dedup();
        let db = self.db.clone();
        let found = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = unknown.iter().map(String::as_str).collect();
            let recorded = db.known(&refs);
            let states: Vec<_> = unknown.iter().map(|h| db.outbox_state(h)).collect();
            (unknown, states, recorded)
        })
        .await;
        let Ok((unknown, states, Ok(recorded))) = found else {
            tracing::warn!("mirror: reading the state of references failed");
            return;
        };
        for ((h, state), recorded) in unknown.into_iter().zip(states).zip(recorded) {
            match (state, recorded) {
                (Ok(Some(MirrorState::Done)), _) => {
                    self.done.insert(h);
                }
                (Ok(None), false) => {
                    let since = *self
                        .unknown_since
                        .entry(h.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() >= EXTERNAL_GRACE {
                        tracing::debug!("mirror: taking {h} as public (never recorded here)");
                        self.external.insert(h);
                    }
                }
                (Err(e), _) => tracing::warn!("mirror: {e}"),
                // Recorded but not complete yet: wait for it.
                _ => {}
            }
        }
    }

    /// Whether every reference of `hash` (but itself) has its narinfo in the bucket, or is
    /// public (as far as `resolve_references` found out).
    fn references_ready(&self, hash: &str) -> bool {
        let Some(item) = self.items.get(hash) else {
            return false;
        };
        let Ok(info) = NarInfo::parse(&item.rec.narinfo) else {
            return false;
        };
        info.references.iter().all(|r| {
            let rh = r.hash_part();
            rh == hash
                || self.done.contains(rh)
                || self.external.contains(rh)
                || item.rec.upstream_refs.iter().any(|u| u == rh)
        })
    }

    /// Start uploads, in log order, up to the concurrency limit.
    fn schedule(&mut self, tasks: &mut JoinSet<Outcome>) {
        let now = Instant::now();
        let order = self.order.clone();
        for hash in order {
            if tasks.len() >= self.cfg.concurrency {
                return;
            }
            let Some(item) = self.items.get(&hash) else {
                continue;
            };
            if item.busy || item.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            match item.state.clone() {
                MirrorState::Pending if item.rec.local => {
                    let job = NarJob {
                        rec: item.rec.clone(),
                        how: self.cfg.compression,
                        tmp: self.tmp.join(format!("{hash}.nar")),
                        storage: self.storage.clone(),
                        bucket: self.bucket.clone(),
                        check_first: item.tried,
                        gate: self.compress_gate.clone(),
                    };
                    let h = hash.clone();
                    tasks.spawn(async move {
                        let r = job.run().await;
                        let bytes = match &r {
                            Ok(MirrorState::NarStored { file_size, .. }) => *file_size,
                            _ => 0,
                        };
                        Outcome {
                            hash: h,
                            result: r,
                            bytes,
                        }
                    });
                }
                MirrorState::NarStored { .. } if self.references_ready(&hash) => {
                    let Some(item) = self.items.get(&hash) else {
                        continue;
                    };
                    let (rec, state, bucket) =
                        (item.rec.clone(), item.state.clone(), self.bucket.clone());
                    let h = hash.clone();
                    tasks.spawn(async move {
                        let r = put_narinfo(&bucket, &rec, &state).await;
                        Outcome {
                            bytes: 0,
                            hash: h,
                            result: r.map(|()| MirrorState::Done),
                        }
                    });
                }
                _ => continue,
            }
            if let Some(item) = self.items.get_mut(&hash) {
                item.busy = true;
            }
        }
    }

    /// Record finished uploads (one commit) and plan retries for failed ones.
    async fn finish(&mut self, done: Vec<Result<Outcome, tokio::task::JoinError>>) {
        if done.is_empty() {
            return;
        }
        let mut updates = Vec::new();
        let mut failed = Vec::new();
        for r in done {
            let out = match r {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("mirror: an upload task failed: {e}");
                    continue;
                }
            };
            match out.result {
                Ok(state) => {
                    if out.bytes > 0 {
                        self.metrics.mirror_uploaded_bytes.inc_by(out.bytes);
                        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                        s.recent.push_back((Instant::now(), out.bytes));
                    }
                    updates.push((out.hash, state));
                }
                Err(e) => failed.push((out.hash, e)),
            }
        }
        let db = self.db.clone();
        let batch = updates.clone();
        let committed = tokio::task::spawn_blocking(move || db.outbox_set(&batch))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = committed {
            // Nothing advanced: the same steps run again later (each is idempotent).
            tracing::error!("mirror: recording progress: {e}");
            for (h, _) in &updates {
                if let Some(i) = self.items.get_mut(h) {
                    i.busy = false;
                }
            }
            return;
        }
        let any_ok = !updates.is_empty();
        for (h, state) in updates {
            if state == MirrorState::Done {
                if let Some(i) = self.items.remove(&h) {
                    self.storage.release(&[i.rec.blake3]);
                }
                self.done.insert(h.clone());
                self.metrics.mirror_uploaded_paths.inc();
            } else if let Some(i) = self.items.get_mut(&h) {
                i.state = state;
                i.busy = false;
                i.failures = 0;
                i.retry_at = None;
            }
        }
        if any_ok {
            self.order.retain(|h| self.items.contains_key(h));
            if failed.is_empty() {
                self.set_error(None);
            }
        }
        for (h, e) in failed {
            self.metrics.mirror_failures.inc();
            let Some(i) = self.items.get_mut(&h) else {
                continue;
            };
            i.busy = false;
            i.tried = true;
            i.failures += 1;
            let wait = (Duration::from_millis(500) * 2u32.saturating_pow(i.failures.min(8)))
                .min(MAX_BACKOFF);
            i.retry_at = Some(Instant::now() + wait);
            tracing::warn!(
                "mirror: {} (attempt {}): {e}; retrying in {wait:?}",
                i.rec.store_path,
                i.failures
            );
            let msg = format!("{}: {e}", i.rec.store_path);
            self.set_error(Some(msg));
        }
    }

    fn publish_counts(&self) {
        let paths = self.items.len() as u64;
        let bytes: u64 = self
            .items
            .values()
            .filter(|i| i.state == MirrorState::Pending)
            .map(|i| i.rec.nar_size)
            .sum();
        self.metrics.mirror_pending_paths.set(paths as i64);
        self.metrics.mirror_pending_bytes.set(bytes as i64);
    }
}

/// Compress one NAR from the blob store and put it in the bucket (unless an identical
/// object is there already, as after a crash between upload and commit).
struct NarJob {
    rec: Entry,
    how: Compression,
    tmp: PathBuf,
    storage: Storage,
    bucket: Bucket,
    /// Ask the bucket first whether the object is there (only worth a request when an
    /// earlier attempt may have put it).
    check_first: bool,
    gate: Arc<tokio::sync::Semaphore>,
}

impl NarJob {
    async fn run(self) -> Result<MirrorState, String> {
        let permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(8);
        let mut nar = self
            .storage
            .read(&self.rec.blake3, 0, self.rec.nar_size)
            .await
            .map_err(|e| e.to_string())?;
        let feeder = tokio::spawn(async move {
            while let Some(chunk) = nar.recv().await {
                let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let (how, tmp) = (self.how, self.tmp.clone());
        let started = Instant::now();
        let digest = tokio::task::spawn_blocking(move || compress_into(rx, how, &tmp))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("compressing the NAR: {e}"));
        let _ = feeder.await;
        let digest = match digest {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp);
                return Err(e);
            }
        };
        let url = format!(
            "nar/{}.nar{}",
            base32::encode(&digest.sha256),
            self.how.extension()
        );
        drop(permit);
        let compressed = started.elapsed();
        let result = async {
            if !self.check_first || self.bucket.size_of(&url).await? != Some(digest.size) {
                self.bucket
                    .put_file(&url, &self.tmp, digest.size, NAR_TYPE)
                    .await?;
            }
            Ok::<_, s3::S3Error>(())
        }
        .await;
        let _ = std::fs::remove_file(&self.tmp);
        result.map_err(|e| e.to_string())?;
        tracing::debug!(
            "mirror: {} -> {url} ({} bytes): compressed in {compressed:?}, stored in {:?}",
            self.rec.store_path,
            digest.size,
            started.elapsed()
        );
        Ok(MirrorState::NarStored {
            url,
            compression: self.how.name().to_owned(),
            file_hash: digest.sha256,
            file_size: digest.size,
        })
    }
}

/// The narinfo as the bucket serves it: the signed record, pointing at the compressed NAR.
fn bucket_narinfo(rec: &Entry, state: &MirrorState) -> Result<String, String> {
    let MirrorState::NarStored {
        url,
        compression,
        file_hash,
        file_size,
    } = state
    else {
        return Err("the NAR is not in the bucket yet".into());
    };
    let mut info = NarInfo::parse(&rec.narinfo).map_err(|e| e.to_string())?;
    info.url = url.clone();
    info.compression = compression.clone();
    info.file_hash = Some(Sha256(*file_hash));
    info.file_size = Some(*file_size);
    Ok(info.render())
}

async fn put_narinfo(bucket: &Bucket, rec: &Entry, state: &MirrorState) -> Result<(), String> {
    let text = bucket_narinfo(rec, state)?;
    bucket
        .put(
            &format!("{}.narinfo", rec.hash_part()),
            text.into_bytes(),
            NARINFO_TYPE,
        )
        .await
        .map_err(|e| e.to_string())
}
