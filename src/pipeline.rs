//! The pipeline: queued reports -> closures -> metadata from the store database -> NAR
//! serialized from the store and hashed (sha256 checked against the database's narHash; BLAKE3
//! leaves kept so the path can be served from the store, verified, with no copy) -> signed
//! narinfo and BLAKE3 binding -> redb. No NAR bytes are written. A batch's paths are ingested
//! references first and committed in groups as they finish, each group closed under references.
//! Work resumes after a crash from what redb says: a report leaves the queue only in the batch's
//! last commit, so a batch cut short is planned again and what it recorded is skipped. A path a
//! peer recorded first is still ingested: this node's own claim is served from its own store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::db::{Claim, Db, OwnRecord, PathRecord, QueueItem};
use crate::metrics::Metrics;
use crate::nix::store_db::{PathInfo, StoreDb, StoreDbError};
use crate::nix::{NarInfo, SecretKey, StorePath, TrustedKeys};
use crate::store::LocalStore;

/// What the pipeline needs; built by the node.
pub struct Pipeline {
    pub db: Db,
    pub store: Arc<LocalStore>,
    pub key: SecretKey,
    pub upstream: TrustedKeys,
    pub workers: usize,
    pub batch: usize,
    /// Where NARs are serialized and hashed: low-priority threads (builds come first).
    pub hashing: crate::background::Background,
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Every newly recorded path, for whoever listens (the mesh).
    pub recorded: broadcast::Sender<PathRecord>,
}

/// How long finished records wait for the next NAR of their batch before they are committed
/// on their own.
const FLUSH_AFTER: Duration = Duration::from_millis(10);

/// A transient failure: the batch is retried.
type Retry = String;

impl Pipeline {
    /// Ingest queued reports until cancelled; finishes the batch in hand first.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let r = self.step().await;
            match &r {
                Err(e) => self.metrics.problem("pipeline", Some(e.clone())),
                Ok(_) => self.metrics.problem("pipeline", None),
            }
            match r {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    tracing::error!("pipeline: {e}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Process one batch; false if the queue was empty.
    async fn step(&self) -> Result<bool, Retry> {
        let db = self.db.clone();
        let max = self.batch;
        let batch = blocking(move || db.queue_batch(max).map_err(|e| e.to_string())).await?;
        if batch.is_empty() {
            return Ok(false);
        }
        if crate::killpoint::fault("pipeline.plan-late") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if crate::killpoint::fault("pipeline.panics") {
            panic!("the pipeline panics at a batch (NARMESH_TEST_FAULT)");
        }
        let started = Instant::now();
        let (todo, upstream, mut failures) = self
            .plan(batch.iter().map(|(_, i)| i.clone()).collect())
            .await?;
        let upstream = Arc::new(upstream);
        // Records are committed in groups as their NARs complete: when the next NAR takes
        // longer than FLUSH_AFTER, what is done so far is committed, so small paths do not
        // wait for a large NAR later in the batch (while a stream of small NARs still shares
        // one commit). The reports leave the queue only in the last commit: after a crash in
        // between, the batch is planned again and what was recorded is skipped.
        let mut pending: Vec<OwnRecord> = Vec::new();
        let (mut paths, mut bytes) = (0usize, 0u64);
        // Each NAR is ingested in a task of its own, so NARs in flight keep streaming while a
        // group is being committed.
        let mut results = futures::stream::iter(todo)
            .map(|info| {
                let (store, key, upstream) =
                    (self.store.clone(), self.key.clone(), upstream.clone());
                let hashing = self.hashing.clone();
                let (path, refs) = (info.path.clone(), info.references.clone());
                async move {
                    let r = hashing
                        .run(move || ingest_one(&store, &key, info, &upstream))
                        .await
                        .unwrap_or_else(|| {
                            Err(Failure::Path(format!("{path}: ingest task failed")))
                        });
                    (path, refs, r)
                }
            })
            .buffered(self.workers);
        // Paths of this batch that failed: whatever references them (directly or through
        // others; the batch is ordered references first) is not recorded either.
        let mut failed: HashSet<StorePath> = HashSet::new();
        loop {
            let next = if pending.is_empty() {
                results.next().await
            } else {
                // `next()` is cancel-safe: a timed-out wait loses nothing.
                match tokio::time::timeout(FLUSH_AFTER, results.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        (paths, bytes) = self.commit(&[], &mut pending, 0, (paths, bytes)).await?;
                        results.next().await
                    }
                }
            };
            let Some((path, refs, result)) = next else {
                break;
            };
            if let Some(bad) = refs.iter().find(|r| **r != path && failed.contains(*r)) {
                tracing::error!(
                    "ingest: {path}: it references {bad}, which could not be ingested; not recorded"
                );
                failed.insert(path);
                failures += 1;
                continue;
            }
            match result {
                Ok(r) => pending.push(r),
                Err(Failure::Path(why)) => {
                    tracing::error!("ingest: {why}");
                    failed.insert(path);
                    failures += 1;
                }
                Err(Failure::Retry(why)) => {
                    // What is done so far is kept; the batch (its reports still queued) is
                    // planned again after the pipeline's backoff, and skips it.
                    drop(results);
                    self.commit(&[], &mut pending, 0, (paths, bytes)).await?;
                    return Err(format!("ingest: {why}; the batch is tried again"));
                }
            }
        }
        drop(results);
        let done: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
        (paths, bytes) = self
            .commit(&done, &mut pending, failures, (paths, bytes))
            .await?;
        self.metrics.ingest_failures.inc_by(failures);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            "recorded {paths} path(s), {bytes} NAR bytes, {failures} failure(s) from {} report(s) in {:?}",
            batch.len(),
            started.elapsed()
        );
        Ok(true)
    }

    /// Record `records` (and take `done` off the queue) in one fsync'd commit, then announce
    /// them. Returns the running totals plus these.
    async fn commit(
        &self,
        done: &[u64],
        records: &mut Vec<OwnRecord>,
        failures: u64,
        (paths, bytes): (usize, u64),
    ) -> Result<(usize, u64), Retry> {
        let db = self.db.clone();
        let recs = std::mem::take(records);
        let done = done.to_vec();
        if !recs.is_empty() {
            crate::killpoint::reach("pipeline.hashed");
        }
        let recs = blocking(move || {
            db.record_own(&done, &recs, failures)
                .map(|()| recs)
                .map_err(|e| e.to_string())
        })
        .await?;
        if !recs.is_empty() {
            crate::killpoint::reach("pipeline.recorded");
        }
        let n: u64 = recs.iter().map(|r| r.claim.nar_size).sum();
        self.metrics.paths_recorded.inc_by(recs.len() as u64);
        self.metrics.nar_bytes.inc_by(n);
        let totals = (paths + recs.len(), bytes + n);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for r in recs {
            let _ = self.recorded.send(PathRecord {
                store_path: r.store_path,
                claims: vec![r.claim],
                recorded_at: now,
            });
        }
        Ok(totals)
    }

    /// Closures of the reports, minus paths recorded as our own and upstream-signed paths,
    /// references first; the upstream-signed paths met; failures.
    async fn plan(&self, items: Vec<QueueItem>) -> Result<Plan, Retry> {
        let store = self.store.clone();
        let db = self.db.clone();
        let upstream = self.upstream.clone();
        blocking(move || {
            store
                .with(|sdb| plan_blocking(sdb, &db, &upstream, &items))
                .map_err(|e| e.to_string())?
        })
        .await
    }
}

/// What a batch will ingest, the upstream-signed paths its closures met (hash parts: references
/// that are public already), and how many of its reports or paths failed.
type Plan = (Vec<PathInfo>, HashSet<String>, u64);

/// NAR serialized from the store and hashed (nothing written) -> checked -> signed narinfo and
/// binding. Blocking.
fn ingest_one(
    store: &LocalStore,
    key: &SecretKey,
    info: PathInfo,
    upstream: &HashSet<String>,
) -> Result<OwnRecord, Failure> {
    let real = store.real_path(&info.path);
    let d = crate::nix::nar::dump_hashed(&real, std::io::sink()).map_err(|e| {
        let why = format!("{}: {e}", info.path);
        match &e {
            crate::nix::nar::NarError::Read { source, .. } if transient(source) => {
                Failure::Retry(why)
            }
            _ => Failure::Path(why),
        }
    })?;
    if d.sha256 != info.nar_hash || d.nar_size != info.nar_size {
        return Err(Failure::Path(format!(
            "{}: NAR is {} ({} bytes) but the store database says {} ({} bytes); not recorded",
            info.path, d.sha256, d.nar_size, info.nar_hash, info.nar_size
        )));
    }
    let upstream_refs: Vec<String> = info
        .references
        .iter()
        .map(|r| r.hash_part().to_owned())
        .filter(|h| upstream.contains(h))
        .collect();
    let mut narinfo = NarInfo {
        store_path: info.path.clone(),
        url: nar_url(&d.blake3),
        compression: "none".into(),
        file_hash: Some(d.sha256),
        file_size: Some(d.nar_size),
        nar_hash: d.sha256,
        nar_size: d.nar_size,
        references: info.references,
        deriver: info.deriver,
        sigs: info.sigs,
        ca: info.ca,
    };
    narinfo.sign(key);
    let binding = crate::binding::sign(key, &info.path, &d.sha256, d.nar_size, &d.blake3);
    Ok(OwnRecord {
        store_path: info.path.full(),
        claim: Claim {
            narinfo: narinfo.render(),
            blake3: d.blake3,
            nar_size: d.nar_size,
            bindings: vec![binding],
            upstream_refs,
            own: true,
            providers: Vec::new(),
            failed: false,
            withdrawn: false,
        },
        leaves: d.leaves.to_bytes(),
    })
}

enum Failure {
    /// This path cannot be ingested; the rest of the batch goes on.
    Path(String),
    /// The system cannot read it now (out of file descriptors or memory): the batch is tried
    /// again later, its reports kept.
    Retry(String),
}

/// An error reading the store that says nothing of the path: the node (or the host) is short
/// of a resource for now. A path that is gone, unreadable or of a kind no NAR holds fails.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::OutOfMemory | K::Interrupted | K::WouldBlock | K::ResourceBusy
    ) || e
        .raw_os_error()
        .is_some_and(|n| [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS].contains(&n))
}

/// The URL a narinfo names for a NAR stored under `blake3`.
pub fn nar_url(blake3: &[u8; 32]) -> String {
    let hex: String = blake3.iter().map(|b| format!("{b:02x}")).collect();
    format!("nar/{hex}.nar")
}

/// See [`Pipeline::plan`]; the outer error is the store database's, the inner one ours.
fn plan_blocking(
    store: &StoreDb,
    db: &Db,
    upstream: &TrustedKeys,
    items: &[QueueItem],
) -> Result<Result<Plan, Retry>, StoreDbError> {
    let mut failures = 0;
    let mut roots = Vec::new();
    for item in items {
        match resolve(store, item)? {
            Ok(r) => roots.extend(r),
            Err(why) => {
                tracing::error!("ingest: {why}");
                failures += 1;
            }
        }
    }
    // Roots failed already (their closure holds a bad row).
    let mut failed_roots = HashSet::new();
    let closure = match store.closure(&roots) {
        Ok(c) => c,
        // A bad row must not hold back the other reports: their closures one by one.
        Err(StoreDbError::Corrupt { .. }) => {
            let mut all = Vec::new();
            let mut seen = HashSet::new();
            for r in &roots {
                match store.closure(std::slice::from_ref(r)) {
                    Ok(c) => all.extend(c.into_iter().filter(|p| seen.insert(p.clone()))),
                    Err(e @ StoreDbError::Corrupt { .. }) => {
                        tracing::error!("ingest: {r}: {e}; not recorded");
                        failures += 1;
                        failed_roots.insert(r);
                    }
                    Err(e) => return Err(e),
                }
            }
            all
        }
        Err(e) => return Err(e),
    };
    // A root the store does not hold (gone since its report, or one queued before the
    // database could confirm it) fails here, not silently.
    let held: HashSet<&StorePath> = closure.iter().collect();
    let missing: std::collections::BTreeSet<&StorePath> = roots
        .iter()
        .filter(|r| !held.contains(r) && !failed_roots.contains(r))
        .collect();
    for r in missing {
        tracing::error!("ingest: {r} is not a valid path in the Nix store; not recorded");
        failures += 1;
    }
    let hashes: Vec<&str> = closure.iter().map(|p| p.hash_part()).collect();
    let known = match db.has_own(&hashes) {
        Ok(k) => k,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let unknown: Vec<StorePath> = closure
        .iter()
        .zip(known)
        .filter(|(_, k)| !k)
        .map(|(p, _)| p.clone())
        .collect();
    let mut bad = HashSet::new();
    let infos = match store.query_paths(&unknown) {
        Ok(infos) => infos,
        // One bad row must not hold back the rest: ask path by path, failing only the bad.
        Err(StoreDbError::Corrupt { .. }) => {
            let mut infos = Vec::with_capacity(unknown.len());
            for p in &unknown {
                match store.query_path(p) {
                    Ok(i) => infos.push(i),
                    Err(e @ StoreDbError::Corrupt { .. }) => {
                        tracing::error!("ingest: {e}; not recorded");
                        failures += 1;
                        bad.insert(p.clone());
                        // Keep `infos` aligned with `unknown`.
                        infos.push(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            infos
        }
        Err(e) => return Err(e),
    };
    let mut seen = HashSet::new();
    let mut public = HashSet::new();
    let mut todo = Vec::with_capacity(infos.len());
    for (path, info) in unknown.iter().zip(infos) {
        let Some(info) = info else {
            if !bad.contains(path) {
                // Gone from the store between the report and now (garbage-collected).
                tracing::error!("ingest: {path} is no longer valid in the Nix store; not recorded");
                failures += 1;
                bad.insert(path.clone());
            }
            continue;
        };
        if upstream_signed(&info, upstream) {
            public.insert(info.path.hash_part().to_owned());
        } else if seen.insert(info.path.clone()) {
            todo.push(info);
        }
    }
    let (todo, dropped) = references_first(todo, &bad);
    Ok(Ok((todo, public, failures + dropped)))
}

/// `infos` ordered so that every path comes after the paths it references (depth first, in
/// the given order otherwise), without the paths that reference a path in `failed` (directly
/// or through others): those are counted as failures, not recorded. Records are committed in
/// groups in this order, so every commit is closed under references.
fn references_first(infos: Vec<PathInfo>, failed: &HashSet<StorePath>) -> (Vec<PathInfo>, u64) {
    let index: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    // 0: not seen, 1: on the stack, 2: placed.
    let mut state = vec![0u8; infos.len()];
    let mut order = Vec::with_capacity(infos.len());
    for start in 0..infos.len() {
        let mut stack = vec![(start, false)];
        while let Some((i, expanded)) = stack.pop() {
            if expanded {
                state[i] = 2;
                order.push(i);
                continue;
            }
            if state[i] != 0 {
                continue;
            }
            state[i] = 1;
            stack.push((i, true));
            for r in infos[i].references.iter().rev() {
                if let Some(&j) = index.get(r)
                    && state[j] == 0
                {
                    stack.push((j, false));
                }
            }
        }
    }
    drop(index);
    let mut failed = failed.clone();
    let mut slots: Vec<Option<PathInfo>> = infos.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(order.len());
    let mut dropped = 0;
    for i in order {
        let Some(info) = slots[i].take() else {
            continue;
        };
        if info
            .references
            .iter()
            .any(|r| *r != info.path && failed.contains(r))
        {
            tracing::error!(
                "ingest: {}: a path it references could not be ingested; not recorded",
                info.path
            );
            failed.insert(info.path.clone());
            dropped += 1;
            continue;
        }
        out.push(info);
    }
    (out, dropped)
}

/// The output paths a queued report stands for: `Ok(Err(why))` if the report can never name
/// any (it fails), `Err` if the store database cannot answer now (the batch is tried again:
/// a report whose derivation's outputs a locked database could not tell is not dropped).
fn resolve(
    store: &StoreDb,
    item: &QueueItem,
) -> Result<Result<Vec<StorePath>, String>, StoreDbError> {
    if !item.outs.is_empty() {
        return Ok(item
            .outs
            .iter()
            .map(|o| StorePath::parse(o).map_err(|e| e.to_string()))
            .collect());
    }
    let Some(drv) = item.drv.as_deref() else {
        return Ok(Err("report without paths".into()));
    };
    let drv = match StorePath::parse(drv) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let outs = match store.derivation_outputs(&drv) {
        Ok(o) => o,
        Err(e @ StoreDbError::Corrupt { .. }) => return Ok(Err(e.to_string())),
        Err(e) => return Err(e),
    };
    if outs.is_empty() {
        return Ok(Err(format!("{drv} has no recorded outputs")));
    }
    Ok(Ok(outs.into_iter().map(|(_, p)| p).collect()))
}

/// True if a key in `upstream` signed this path: it is public already.
fn upstream_signed(info: &PathInfo, upstream: &TrustedKeys) -> bool {
    !upstream.is_empty()
        && upstream.names_any(&info.sigs)
        && upstream.verifies(
            &crate::nix::narinfo::fingerprint(
                &info.path,
                &info.nar_hash,
                info.nar_size,
                &info.references,
            ),
            &info.sigs,
        )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Retry> + Send + 'static,
) -> Result<T, Retry> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(
        shape: crate::bench::synth::Shape,
    ) -> (
        tempfile::TempDir,
        Vec<crate::bench::synth::WorkPath>,
        std::path::PathBuf,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let work = crate::bench::synth::generate(&root, &shape).unwrap();
        (dir, work, root)
    }

    fn plan_of(
        dir: &std::path::Path,
        root: &std::path::Path,
        outs: &[String],
    ) -> (Vec<StorePath>, u64) {
        let store = StoreDb::open(root).unwrap();
        let db = Db::open(&dir.join("db.redb")).unwrap();
        let items: Vec<QueueItem> = outs
            .iter()
            .map(|o| QueueItem {
                drv: None,
                outs: vec![o.clone()],
            })
            .collect();
        let (todo, _, failures) = plan_blocking(&store, &db, &TrustedKeys::new(Vec::new()), &items)
            .unwrap()
            .unwrap();
        (todo.into_iter().map(|i| i.path).collect(), failures)
    }

    /// Give `path` a hash the store database reader refuses.
    fn corrupt(root: &std::path::Path, path: &StorePath) {
        let conn = rusqlite::Connection::open(crate::nix::store_db::db_path(root)).unwrap();
        conn.execute(
            "UPDATE ValidPaths SET hash = 'sha256:nonsense' WHERE path = ?1",
            [path.full()],
        )
        .unwrap();
    }

    fn chain(paths: usize, seed: u64) -> crate::bench::synth::Shape {
        crate::bench::synth::Shape {
            paths,
            small: (10, 100),
            large: 0,
            large_every: 0,
            chain: paths,
            seed,
        }
    }

    /// Flip a byte of the first regular file of `path` in the store under `root`.
    fn tamper(root: &std::path::Path, path: &StorePath) {
        use std::os::unix::fs::PermissionsExt as _;
        let mut todo = vec![crate::nix::store_db::real_path(root, path)];
        while let Some(p) = todo.pop() {
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    todo.push(e.unwrap().path());
                }
            } else if meta.is_file() && meta.len() > 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
                let mut bytes = std::fs::read(&p).unwrap();
                bytes[0] ^= 1;
                std::fs::write(&p, bytes).unwrap();
                return;
            }
        }
        panic!("no file to tamper with in {path}");
    }

    /// p1 references p0, p2 references p1; p1's bytes no longer match the store database, so
    /// its NAR fails while being hashed: p2 must not be recorded either (a referrer of a path
    /// that is not there), p0 is.
    #[test]
    fn referrers_of_a_nar_that_fails_are_not_recorded() {
        let (dir, work, root) = setup(chain(3, 11));
        tamper(&root, &work[1].path);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let db = Db::open(&dir.path().join("db.redb")).unwrap();
        let items: Vec<QueueItem> = work
            .iter()
            .map(|w| QueueItem {
                drv: None,
                outs: vec![w.path.full()],
            })
            .collect();
        db.enqueue(&items).unwrap();
        let pipeline = Pipeline {
            db: db.clone(),
            store: Arc::new(LocalStore::new(&root)),
            key: SecretKey::generate("test-1").unwrap(),
            upstream: TrustedKeys::new(Vec::new()),
            workers: 2,
            batch: 100,
            hashing: crate::background::Background::new("test-hash", 2),
            wake: Arc::new(Notify::new()),
            metrics: Arc::new(Metrics::new()),
            recorded: broadcast::channel(16).0,
        };
        assert!(rt.block_on(pipeline.step()).unwrap());
        let hashes: Vec<&str> = work.iter().map(|w| w.path.hash_part()).collect();
        assert_eq!(db.known(&hashes).unwrap(), vec![true, false, false]);
        assert_eq!(db.counters().unwrap().failures, 2);
        assert_eq!(
            db.counters().unwrap().queue_depth,
            0,
            "the reports are done"
        );
    }

    #[test]
    fn a_batch_is_planned_references_first() {
        // p1 references p0, p2 references p1: reported together, in build order.
        let (dir, work, root) = setup(chain(3, 5));
        let outs: Vec<String> = work.iter().map(|w| w.path.full()).collect();
        let (todo, failures) = plan_of(dir.path(), &root, &outs);
        let want: Vec<StorePath> = work.iter().map(|w| w.path.clone()).collect();
        assert_eq!((todo, failures), (want.clone(), 0));
        // Reported in reverse, or only the last root: the same order.
        let rev: Vec<String> = outs.iter().rev().cloned().collect();
        assert_eq!(plan_of(dir.path(), &root, &rev).0, want);
        assert_eq!(plan_of(dir.path(), &root, &outs[2..]).0, want);
    }

    #[test]
    fn a_root_the_store_does_not_hold_fails_and_the_rest_go_on() {
        let (dir, work, root) = setup(chain(2, 7));
        let never = "/nix/store/00000000000000000000000000000000-never-built".to_owned();
        // Named twice: one failure.
        let outs = vec![never.clone(), work[1].path.full(), never];
        let want: Vec<StorePath> = work.iter().map(|w| w.path.clone()).collect();
        assert_eq!(plan_of(dir.path(), &root, &outs), (want, 1));
    }

    #[test]
    fn referrers_of_a_corrupt_row_are_not_recorded() {
        let (dir, work, root) = setup(chain(3, 6));
        corrupt(&root, &work[1].path);
        let outs: Vec<String> = work.iter().map(|w| w.path.full()).collect();
        assert_eq!(
            plan_of(dir.path(), &root, &outs),
            (vec![work[0].path.clone()], 2)
        );
    }

    #[test]
    fn a_corrupt_store_row_fails_that_path_only() {
        let (dir, work, root) = setup(crate::bench::synth::Shape {
            paths: 4,
            small: (10, 100),
            large: 0,
            large_every: 0,
            chain: 1,
            seed: 9,
        });
        corrupt(&root, &work[1].path);
        let outs: Vec<String> = work.iter().map(|w| w.path.full()).collect();
        let (mut got, failures) = plan_of(dir.path(), &root, &outs);
        assert_eq!(failures, 1);
        got.sort();
        let mut want: Vec<_> = [0, 2, 3].iter().map(|&i| work[i].path.clone()).collect();
        want.sort();
        assert_eq!(got, want);
    }
}
