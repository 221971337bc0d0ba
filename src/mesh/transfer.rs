//! Fetching NARs from peers: one transfer per NAR, shared by every reader that wants it (the
//! local Nix on demand, the eager wish list, the mirror). A transfer first gets the NAR's leaves
//! (checked against its bound BLAKE3), then splits the NAR into ranges of whole chunk groups and
//! has every provider that holds it work through them at once (the plan is [`super::ranges`]):
//! a slow provider simply does fewer, and near the end the others split or take over what it
//! still has; a provider whose bytes fail their chunk group is dropped within that group and its
//! range goes back to the others. Only verified groups are written to the NAR's partial file,
//! and readers see only the verified prefix. The sha256 follows that prefix; at the end it must
//! equal the signed NarHash, or the claim is marked failed (never served, never fetched again).
//! The file's pages go to disk as they arrive and leave the page cache once every reader passed
//! them ([`super::behind`]).
//!
//! A provider that speaks only version 1 sends the whole NAR from an offset: its bytes are
//! checked group by group when leaves came from a version 2 provider, else at the end.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iroh::EndpointId;
use sha2::Digest as _;
use tokio::sync::watch;

use super::peer::{PeerError, Pool, Source, next_piece};
use super::ranges::{Next, Ranges};
use super::ready::{Ready, flush};
use crate::chunks::{GROUP, Leaves};
use crate::db::{Claim, Db};
use crate::metrics::Metrics;
use crate::nix::NarInfo;
use crate::storage::{PartialNar, Storage, StorageError};

/// How long a provider that misbehaved is skipped.
const AVOID_FOR: Duration = Duration::from_secs(60);
/// Providers a transfer uses at once.
const PROVIDERS_AT_ONCE: usize = 4;
/// Transfers at once; more wait.
pub const MAX_TRANSFERS: usize = 32;

/// Where a transfer stands, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes from the start that are verified and written.
    pub verified: u64,
    /// `Some` once over.
    pub done: Option<Result<(), String>>,
}

/// One NAR being fetched.
#[derive(Debug)]
pub struct Transfer {
    pub blake3: [u8; 32],
    pub size: u64,
    progress: watch::Sender<Progress>,
    /// The partial file (kept open by readers after it becomes the NAR file).
    file: Mutex<Option<Arc<File>>>,
    /// Where its readers are (pages they all passed leave the page cache).
    readers: Arc<super::behind::Readers>,
}

impl Transfer {
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The file verified bytes are read from, once the transfer has one.
    pub fn file(&self) -> Option<Arc<File>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn advance(&self, verified: u64) {
        self.progress.send_if_modified(|p| {
            if verified > p.verified {
                p.verified = verified;
                true
            } else {
                false
            }
        });
    }

    fn end(&self, result: Result<(), String>) {
        self.progress.send_modify(|p| p.done = Some(result));
    }

    /// The verified bytes, in order and in pieces of at most 1 MiB, as they become verified;
    /// `guard` lives as long as the reader. A failed transfer ends the stream with its error.
    /// With `whole`, the stream's end (not its last piece) also waits for the transfer's end,
    /// so a reader that takes the end as complete (like the mirror) has a NAR whose sha256
    /// matched the signed NarHash; without, it ends with the last verified byte (the local Nix
    /// checks the NarHash itself).
    pub fn follow(
        self: &Arc<Self>,
        guard: impl Send + 'static,
        whole: bool,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, String>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (t, mut progress) = (self.clone(), self.progress());
        let cursor = self.readers.cursor();
        tokio::spawn(async move {
            let _guard = guard;
            let mut pos = 0u64;
            loop {
                let p = progress.borrow_and_update().clone();
                if p.verified > pos {
                    let Some(file) = t.file() else {
                        let _ = tx.send(Err("the transfer has no file".into())).await;
                        return;
                    };
                    let to = p.verified.min(pos + (1 << 20));
                    let read = tokio::task::spawn_blocking(move || {
                        crate::fsutil::read_vec_at(&file, pos, (to - pos) as usize).map(Bytes::from)
                    })
                    .await;
                    let piece = match read {
                        Ok(Ok(b)) => Ok(b),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = piece.is_err();
                    if !failed {
                        cursor.set(to);
                    }
                    if tx.send(piece).await.is_err() || failed {
                        return;
                    }
                    pos = to;
                    continue;
                }
                match p.done {
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Some(Ok(())) => {
                        if pos < t.size {
                            let _ = tx.send(Err("the fetch ended short".into())).await;
                        }
                        return;
                    }
                    None if pos >= t.size && !whole => return,
                    None => {}
                }
                if progress.changed().await.is_err() {
                    let _ = tx.send(Err("the fetch ended".into())).await;
                    return;
                }
            }
        });
        rx
    }
}

/// Ends a transfer in error if its task stops before ending it, so no reader waits for ever.
struct EndOnDrop(Arc<Transfer>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.progress.send_if_modified(|p| {
            if p.done.is_none() {
                p.done = Some(Err("the transfer stopped".into()));
                true
            } else {
                false
            }
        });
    }
}

/// Counts a running transfer in a gauge for as long as it lives.
struct Running(prometheus_client::metrics::gauge::Gauge);

impl Running {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Running(g.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every transfer in progress, and what they share.
#[derive(Debug)]
pub struct Transfers {
    pub pool: Pool,
    storage: Storage,
    db: Db,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<[u8; 32], Weak<Transfer>>>,
    avoid: Mutex<HashMap<EndpointId, Instant>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Transfers that met a provider speaking only version 1.
    only_v1: Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Use providers' bulk channels (`[mesh] bulk-listen` is set here).
    bulk: bool,
    /// Hash parts of the paths each new transfer is for, as transfers start (the mirror
    /// reads a NAR while it arrives).
    started: tokio::sync::broadcast::Sender<String>,
    /// Bulk tickets in hand: (provider, NAR) -> address, token, good until.
    tickets: Mutex<HashMap<(EndpointId, [u8; 32]), HeldTicket>>,
    /// Providers whose bulk channel failed or is off lately: QUIC for them.
    no_bulk: Mutex<HashMap<EndpointId, Instant>>,
}

/// A bulk ticket in hand: the provider's TCP address, the token, good until.
type HeldTicket = (std::net::SocketAddr, [u8; 32], Instant);

/// How long a bulk ticket is used (the provider keeps it 60 s).
const TICKET_USE: Duration = Duration::from_secs(45);

/// What to fetch: the claim and the providers to ask.
#[derive(Debug, Clone)]
pub struct Want {
    pub claim: Claim,
    /// Hash parts of the records with this claim (marked failed if its bytes are bad).
    pub paths: Vec<String>,
}

impl Transfers {
    pub fn new(pool: Pool, storage: Storage, db: Db, metrics: Arc<Metrics>, bulk: bool) -> Self {
        Transfers {
            pool,
            storage,
            db,
            metrics,
            active: Mutex::new(HashMap::new()),
            avoid: Mutex::new(HashMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            only_v1: Mutex::new(Default::default()),
            bulk,
            started: tokio::sync::broadcast::channel(1024).0,
            tickets: Mutex::new(HashMap::new()),
            no_bulk: Mutex::new(HashMap::new()),
        }
    }

    /// Range `start..end` of `blake3` from `peer`'s bulk channel, if both sides use one and it
    /// answers; else `None` (QUIC, and no bulk with that peer for a while).
    async fn bulk_source(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        start: u64,
        end: u64,
    ) -> Option<Source> {
        if !self.bulk {
            return None;
        }
        let now = Instant::now();
        {
            let mut no = self.no_bulk.lock().unwrap_or_else(|p| p.into_inner());
            match no.get(&peer) {
                Some(t) if t.elapsed() < AVOID_FOR => return None,
                Some(_) => {
                    no.remove(&peer);
                }
                None => {}
            }
        }
        let key = (peer, blake3);
        let cached = self
            .tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|x| x.2 > now)
            .map(|x| (x.0, x.1));
        let ticket = match cached {
            Some(t) => Ok(t),
            None => self.pool.bulk_ticket(peer, blake3).await,
        };
        let res = match ticket {
            Ok((addr, token)) => {
                {
                    let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
                    tickets.retain(|_, x| x.2 > now);
                    tickets.insert(key, (addr, token, now + TICKET_USE));
                }
                Pool::bulk_range(addr, token, start, end).await
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(src) => Some(src),
            Err(e) => {
                self.no_bulk_for(peer, &key, &e.to_string());
                None
            }
        }
    }

    /// `peer`'s bulk channel failed: QUIC with it for a while.
    fn no_bulk_for(&self, peer: EndpointId, key: &(EndpointId, [u8; 32]), why: &str) {
        tracing::debug!("mesh: bulk channel of {peer}: {why}; QUIC for {AVOID_FOR:?}");
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.no_bulk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now());
    }

    fn avoided(&self, id: &EndpointId) -> bool {
        let map = self.avoid.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).is_some_and(|t| t.elapsed() < AVOID_FOR)
    }

    fn avoid(&self, id: EndpointId, why: &str) {
        tracing::warn!("mesh: avoiding peer {id} for {AVOID_FOR:?}: {why}");
        self.avoid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
    }

    /// Count verified bytes `peer` sent.
    fn fetched_from(&self, peer: EndpointId, n: u64) {
        if n > 0 {
            self.metrics
                .mesh_fetched_bytes
                .get_or_create(&crate::metrics::PeerLabels {
                    peer: peer.to_string(),
                })
                .inc_by(n);
        }
    }

    /// The providers to ask for a claim's NAR, the ones not avoided first.
    pub fn providers(&self, claim: &Claim) -> Vec<EndpointId> {
        let me = self.pool.endpoint().id();
        let mut all: Vec<EndpointId> = claim
            .providers
            .iter()
            .filter(|p| p.holds)
            .filter_map(|p| EndpointId::from_bytes(&p.id).ok())
            .filter(|p| *p != me)
            .collect();
        all.sort_by_key(|p| self.avoided(p));
        all
    }

    /// The transfer of this NAR in progress (or over, while a reader still has it), if any.
    pub fn in_flight(&self, blake3: &[u8; 32]) -> Option<Arc<Transfer>> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.get(blake3).and_then(Weak::upgrade)
    }

    /// News of transfers starting: the hash parts of the paths each is for.
    pub fn subscribe_started(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.started.subscribe()
    }

    /// The transfer of this claim's NAR: the one in progress, or a new one.
    pub fn start(self: &Arc<Self>, want: Want) -> Arc<Transfer> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = active.get(&want.claim.blake3).and_then(Weak::upgrade) {
            return t;
        }
        active.retain(|_, w| w.strong_count() > 0);
        let t = Arc::new(Transfer {
            blake3: want.claim.blake3,
            size: want.claim.nar_size,
            progress: watch::Sender::new(Progress {
                verified: 0,
                done: None,
            }),
            file: Mutex::new(None),
            readers: Default::default(),
        });
        active.insert(want.claim.blake3, Arc::downgrade(&t));
        drop(active);
        for p in &want.paths {
            let _ = self.started.send(p.clone());
        }
        let (this, task) = (self.clone(), t.clone());
        tokio::spawn(async move {
            // However this task ends (a panic, the runtime dropping it), readers learn it.
            let _ends = EndOnDrop(task.clone());
            let Ok(_slot) = this.slots.clone().acquire_owned().await else {
                return;
            };
            let running = Running::new(&this.metrics.mesh_transfers);
            let started = Instant::now();
            let result = this.run(&task, &want).await;
            match &result {
                Ok(()) => tracing::info!(
                    "fetched {} ({} bytes) from peers in {:?}, verified",
                    want.paths.first().map(String::as_str).unwrap_or("?"),
                    task.size,
                    started.elapsed()
                ),
                Err(e) => {
                    tracing::warn!("mesh: fetching {}: {e}", crate::storage::hex(&task.blake3))
                }
            }
            // Counted out before readers learn the end (the eager loop may start the next).
            drop(running);
            task.end(result);
        });
        t
    }

    async fn run(self: &Arc<Self>, t: &Arc<Transfer>, want: &Want) -> Result<(), String> {
        let info = NarInfo::parse(&want.claim.narinfo).map_err(|e| e.to_string())?;
        let providers = self.providers(&want.claim);
        if providers.is_empty() {
            return Err("no provider holds it".into());
        }
        let storage = self.storage.clone();
        let (b, size) = (t.blake3, t.size);
        let partial = tokio::task::spawn_blocking(move || storage.begin(&b, size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e: StorageError| e.to_string())?;
        *t.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(partial.file());
        let partial = Arc::new(partial);
        // The sha256 follows the verified prefix as it grows, so it is ready with the last byte
        // (aborted if the transfer fails, so it leaves no follower behind).
        let sha_at = t.readers.cursor();
        let mut sha = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow_sha256(
            t.clone(),
            partial.file(),
            sha_at,
        )));
        // Writeback as bytes arrive, and pages every reader passed out of the cache.
        if super::behind::worth(t.size) {
            tokio::spawn(super::behind::run(
                partial.file(),
                t.size,
                t.readers.clone(),
                t.progress(),
            ));
        }
        let leaves = self.leaves(t, &providers).await;
        let fetched = match &leaves {
            Some(l) => match self.ranges(t, l.clone(), &partial, &providers).await {
                // Providers that speak only version 1 cannot send ranges: ask them for the
                // whole NAR.
                Err(e)
                    if self
                        .only_v1
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&t.blake3) =>
                {
                    tracing::debug!("mesh: ranges failed ({e}); asking version 1 providers");
                    self.whole_v1(t, &partial, &providers).await
                }
                other => other,
            },
            None => self.whole_v1(t, &partial, &providers).await,
        };
        self.only_v1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.blake3);
        let leaves = fetched?;
        // Every byte is written; the sha256 must match the signed NarHash.
        let sha = (&mut sha).await.map_err(|e| e.to_string())??;
        if sha != info.nar_hash.0 {
            self.claim_failed(want, &providers).await;
            return Err(
                "the bytes match the BLAKE3 but not the signed NarHash: claim dropped".into(),
            );
        }
        let partial =
            Arc::try_unwrap(partial).map_err(|_| "a writer is still running".to_owned())?;
        let bytes = leaves.to_bytes();
        tokio::task::spawn_blocking(move || partial.finish(&bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.metrics
            .served_bytes
            .get_or_create(&crate::metrics::SourceLabels { source: "peer-in" })
            .inc_by(size);
        Ok(())
    }

    /// The claim's bytes are not what its narinfo says: never serve nor fetch it again.
    async fn claim_failed(&self, want: &Want, providers: &[EndpointId]) {
        for p in providers {
            self.avoid(*p, "sent a NAR whose sha256 is not the signed NarHash");
        }
        let db = self.db.clone();
        let (paths, b) = (want.paths.clone(), want.claim.blake3);
        let _ = tokio::task::spawn_blocking(move || {
            for h in paths {
                let _ = db.update_record(&h, |rec| match rec.claim_mut(&b) {
                    Some(c) if !c.failed => {
                        c.failed = true;
                        true
                    }
                    _ => false,
                });
            }
        })
        .await;
    }

    /// The NAR's leaves, from the first version 2 provider that has them right; `None` if
    /// none does (only version 1 providers).
    async fn leaves(&self, t: &Transfer, providers: &[EndpointId]) -> Option<Arc<Leaves>> {
        if t.size <= GROUP {
            // One group: its only leaf is the BLAKE3 itself.
            return Leaves::verified(t.size, &t.blake3, &t.blake3)
                .ok()
                .map(Arc::new);
        }
        for p in providers {
            match self.pool.leaves(*p, t.blake3, t.size).await {
                Ok(bytes) => match Leaves::verified(t.size, &bytes, &t.blake3) {
                    Ok(l) => return Some(Arc::new(l)),
                    Err(e) => self.avoid(*p, &format!("sent bad leaves: {e}")),
                },
                Err(PeerError::OnlyV1) => {}
                Err(e) if e.misbehaved() => self.avoid(*p, &e.to_string()),
                Err(e) => tracing::debug!("mesh: leaves from {p}: {e}"),
            }
        }
        None
    }

    /// Fetch every range, from every provider at once.
    async fn ranges(
        self: &Arc<Self>,
        t: &Arc<Transfer>,
        leaves: Arc<Leaves>,
        partial: &Arc<PartialNar>,
        providers: &[EndpointId],
    ) -> Result<Arc<Leaves>, String> {
        let plan = Arc::new(Mutex::new(Ranges::new(t.size, providers.len())));
        let returned = Arc::new(tokio::sync::Notify::new());
        let mut workers = tokio::task::JoinSet::new();
        // Providers avoided lately only if there is nobody else.
        let fresh: Vec<EndpointId> = providers
            .iter()
            .filter(|p| !self.avoided(p))
            .copied()
            .collect();
        let chosen = if fresh.is_empty() {
            providers.to_vec()
        } else {
            fresh
        };
        for p in chosen.into_iter().take(PROVIDERS_AT_ONCE) {
            let (this, t, leaves, partial, plan, returned) = (
                self.clone(),
                t.clone(),
                leaves.clone(),
                partial.clone(),
                plan.clone(),
                returned.clone(),
            );
            workers.spawn(async move {
                this.worker(p, &t, &leaves, &partial, &plan, &returned)
                    .await;
                // A worker leaving may leave the others waiting for a range that will not come.
                returned.notify_waiters();
            });
        }
        while workers.join_next().await.is_some() {}
        let done = plan.lock().unwrap_or_else(|p| p.into_inner()).complete();
        if done {
            Ok(leaves)
        } else {
            Err("no provider could send the whole NAR".into())
        }
    }

    /// One provider works through the ranges until none is left or it fails.
    async fn worker(
        &self,
        peer: EndpointId,
        t: &Transfer,
        leaves: &Leaves,
        partial: &PartialNar,
        plan: &Mutex<Ranges>,
        returned: &tokio::sync::Notify,
    ) {
        let mut failures = 0;
        loop {
            let next = plan
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next(Instant::now());
            let (id, start, end) = match next {
                Next::Range { id, start, end } => (id, start, end),
                Next::Done => return,
                Next::Wait => {
                    // Another provider's range may come back if it fails: stay to take it.
                    tokio::select! {
                        _ = returned.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            };
            let (mut got, mut bulk) = (start, false);
            let res = self
                .pull_range(
                    peer,
                    t,
                    leaves,
                    partial,
                    (id, start, end),
                    plan,
                    (&mut got, &mut bulk),
                )
                .await;
            self.fetched_from(peer, got - start);
            if bulk {
                self.metrics.mesh_bulk_bytes.inc_by(got - start);
            }
            let mut p = plan.lock().unwrap_or_else(|p| p.into_inner());
            p.finished(id, start, got);
            t.advance(p.prefix());
            drop(p);
            returned.notify_waiters();
            match res {
                Ok(()) => failures = 0,
                Err(PeerError::OnlyV1) => {
                    // Cannot serve ranges: the others will, or it sends the whole NAR later.
                    self.only_v1
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(t.blake3);
                    return;
                }
                Err(e) if e.misbehaved() => {
                    self.avoid(
                        peer,
                        &format!("fetching {}: {e}", crate::storage::hex(&t.blake3)),
                    );
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!("mesh: range from {peer}: {e}");
                    if failures >= 3 {
                        self.avoid(peer, &e.to_string());
                        return;
                    }
                }
            }
        }
    }

    /// Fetch range `id` (`start..end`) from `peer`, writing each verified group; `got` tracks
    /// how far (and whether it came over the bulk channel). Stops early, with what it has,
    /// where the plan says another provider took the rest.
    #[allow(clippy::too_many_arguments)]
    async fn pull_range(
        &self,
        peer: EndpointId,
        t: &Transfer,
        leaves: &Leaves,
        partial: &PartialNar,
        (id, start, end): (u64, u64, u64),
        plan: &Mutex<Ranges>,
        (got, used_bulk): (&mut u64, &mut bool),
    ) -> Result<(), PeerError> {
        let mut recv = match self.bulk_source(peer, t.blake3, start, end).await {
            Some(src) => src,
            None => Source::Quic(self.pool.range(peer, t.blake3, start, end).await?),
        };
        let bulk = matches!(recv, Source::Tcp(..));
        *used_bulk = bulk;
        let mut group = BytesMut::with_capacity(GROUP as usize);
        let mut ready = Ready::default();
        let mut pos = start;
        while pos < end {
            let piece = match recv.piece(1 << 20).await {
                Ok(Some(p)) => p,
                // A bulk channel that ends early or breaks (a ticket the provider no longer
                // knows, a restart) is not a lie: QUIC with that provider from here.
                Ok(None) | Err(_) if bulk => {
                    flush(partial, &mut ready, got).await?;
                    self.no_bulk_for(peer, &(peer, t.blake3), "the bulk range broke off");
                    return Err(PeerError::Stream("bulk range broke off".into()));
                }
                Ok(None) => return Err(PeerError::Protocol("range ended early".into())),
                Err(e) => return Err(e),
            };
            if pos + group.len() as u64 + piece.len() as u64 > end {
                return Err(PeerError::Protocol("sent more than asked".into()));
            }
            let mut off = 0;
            while off < piece.len() {
                let g = pos / GROUP;
                let want = crate::chunks::group_range(t.size, g);
                let len = (want.end - want.start) as usize;
                // A group wholly in this piece is checked where it lies and written from there;
                // one across pieces is gathered first.
                let gathered;
                let span = if group.is_empty() && piece.len() - off >= len {
                    off += len;
                    gathered = None;
                    off - len..off
                } else {
                    let n = (len - group.len()).min(piece.len() - off);
                    group.extend_from_slice(&piece[off..off + n]);
                    off += n;
                    if group.len() < len {
                        continue;
                    }
                    gathered = Some(group.split().freeze());
                    0..len
                };
                let bytes = gathered.as_ref().unwrap_or(&piece);
                if !leaves.check(g, &bytes[span.clone()]) {
                    flush(partial, &mut ready, got).await?;
                    return Err(PeerError::Protocol(format!(
                        "chunk group {g} does not match the NAR's BLAKE3"
                    )));
                }
                let mine = plan.lock().unwrap_or_else(|p| p.into_inner()).progress(
                    id,
                    want.end,
                    Instant::now(),
                );
                if !mine {
                    return flush(partial, &mut ready, got).await;
                }
                ready.push(bytes, span);
                pos = want.end;
                if ready.len >= 1 << 20 {
                    flush(partial, &mut ready, got).await?;
                    // Readers (and the sha256) may go on up to here.
                    let prefix = {
                        let mut p = plan.lock().unwrap_or_else(|p| p.into_inner());
                        p.written(start, *got);
                        p.prefix()
                    };
                    t.advance(prefix);
                }
            }
        }
        flush(partial, &mut ready, got).await
    }

    /// Version 1 providers: the whole NAR, in order, from one provider after another (resuming
    /// where the last stopped); checked when complete.
    async fn whole_v1(
        &self,
        t: &Arc<Transfer>,
        partial: &Arc<PartialNar>,
        providers: &[EndpointId],
    ) -> Result<Arc<Leaves>, String> {
        let mut got = 0u64;
        for p in providers {
            for _ in 0..3 {
                let before = got;
                let res = async {
                    let mut recv = self.pool.v1_from(*p, t.blake3, got, t.size).await?;
                    let mut ready = Ready::default();
                    while got + (ready.len as u64) < t.size {
                        let Some(piece) = next_piece(&mut recv, 1 << 20).await? else {
                            break;
                        };
                        if got + (ready.len + piece.len()) as u64 > t.size {
                            return Err(PeerError::Protocol("sent more than the NAR".into()));
                        }
                        let n = piece.len();
                        ready.push(&piece, 0..n);
                        if ready.len >= 1 << 20 {
                            flush(partial, &mut ready, &mut got).await?;
                            t.advance(got);
                        }
                    }
                    flush(partial, &mut ready, &mut got).await?;
                    t.advance(got);
                    Ok::<_, PeerError>(())
                }
                .await;
                // Checked only once whole (version 1), but a bad NAR fails the transfer.
                self.fetched_from(*p, got - before);
                if got == t.size {
                    break;
                }
                if let Err(e) = res {
                    tracing::debug!("mesh: version 1 fetch from {p}: {e}");
                }
                if got == before {
                    break;
                }
            }
            if got == t.size {
                break;
            }
        }
        if got != t.size {
            return Err("no provider sent the whole NAR".into());
        }
        let file = partial.file();
        let size = t.size;
        let leaves = tokio::task::spawn_blocking(move || leaves_of(&file, size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if leaves.root() != t.blake3 {
            for p in providers {
                self.avoid(*p, "sent a NAR that does not match its BLAKE3");
            }
            return Err("the NAR from version 1 providers does not match its BLAKE3".into());
        }
        Ok(Arc::new(leaves))
    }
}

/// The sha256 of a transfer's NAR, hashed from its file as the verified prefix grows (read back
/// from the page cache, on a blocking thread, a stretch at a time).
async fn follow_sha256(
    t: Arc<Transfer>,
    file: Arc<File>,
    at: super::behind::Cursor,
) -> Result<[u8; 32], String> {
    let mut progress = t.progress();
    let mut h = sha2::Sha256::new();
    let mut pos = 0u64;
    // One buffer for every stretch (a fresh one each time is a megabyte of page faults).
    let mut buf = vec![0u8; (1 << 20).min(t.size as usize)];
    loop {
        let p = progress.borrow_and_update().clone();
        if p.verified > pos {
            let (from, to, f) = (pos, p.verified.min(t.size), file.clone());
            (h, buf) = tokio::task::spawn_blocking(move || {
                let mut at = from;
                while at < to {
                    let n = (to - at).min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], at)?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                Ok::<_, std::io::Error>((h, buf))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading the NAR back for its sha256: {e}"))?;
            pos = to;
            at.set(pos);
            if pos >= t.size {
                return Ok(h.finalize().into());
            }
            continue;
        }
        if p.done.is_some() || progress.changed().await.is_err() {
            return Err("the transfer ended before its last byte".into());
        }
    }
}

fn leaves_of(file: &File, size: u64) -> std::io::Result<Leaves> {
    let mut h = crate::chunks::LeafHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finish())
}
