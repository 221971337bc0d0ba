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
//!
//! The parts: [`handle`] (one transfer as its readers see it), [`fetch`] (the ranges from every
//! provider, and version 1's whole NAR), [`streak`] (what a provider's answers lead to: asked
//! again when busy, avoided when it lies or keeps failing), [`tickets`] (the opt-in bulk
//! channel's tickets) and [`check`] (the whole NAR's sha256 and BLAKE3 leaves, read back from
//! its file).

mod check;
mod fetch;
mod handle;
mod memory;
mod streak;
mod tickets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use iroh::EndpointId;

use super::peer::{PeerError, Pool};
use crate::chunks::{GROUP, Leaves};
use crate::db::{Claim, Db};
use crate::metrics::Metrics;
use crate::nix::NarInfo;
use crate::storage::{Storage, StorageError};
use handle::EndOnDrop;
pub use handle::{Progress, Transfer};
use tickets::HeldTicket;

/// How long a provider that misbehaved is skipped.
const AVOID_FOR: Duration = Duration::from_secs(60);
/// Transfers at once; more wait.
pub const MAX_TRANSFERS: usize = 32;
/// What one range being fetched may buffer at most: a piece read from the provider (up to
/// 1 MiB), verified groups not yet written (up to 1 MiB and a group), a group gathered
/// across pieces. `[mesh] fetch-memory` divided by this is how many ranges run at once, less
/// what transfers' leaves take of it ([`memory`]).
pub const RANGE_MEMORY: u64 = 2 << 20;

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
    /// `[mesh] fetch-memory`: the ranges (and version 1 whole-NAR fetches) in flight over
    /// every transfer, and the leaves of the transfers running.
    memory: memory::FetchMemory,
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

/// What to fetch: the claim and the providers to ask.
#[derive(Debug, Clone)]
pub struct Want {
    pub claim: Claim,
    /// Hash parts of the records with this claim (marked failed if its bytes are bad).
    pub paths: Vec<String>,
}

impl Transfers {
    /// `fetch_memory`: what all ranges in flight and the leaves of the transfers running may
    /// hold together (at least one range's room).
    pub fn new(
        pool: Pool,
        storage: Storage,
        db: Db,
        metrics: Arc<Metrics>,
        bulk: bool,
        fetch_memory: u64,
    ) -> Self {
        let memory = memory::FetchMemory::new(fetch_memory, metrics.mesh_leaves_bytes.clone());
        Transfers {
            pool,
            storage,
            db,
            metrics,
            active: Mutex::new(HashMap::new()),
            avoid: Mutex::new(HashMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            memory,
            only_v1: Mutex::new(Default::default()),
            bulk,
            started: tokio::sync::broadcast::channel(1024).0,
            tickets: Mutex::new(HashMap::new()),
            no_bulk: Mutex::new(HashMap::new()),
        }
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

    /// `peer` answered that it does not hold the NAR `blake3`: its records take its word
    /// (`Db::provider_lacks`), so that the path no longer counts on it.
    async fn lacks(&self, peer: EndpointId, blake3: [u8; 32]) {
        let db = self.db.clone();
        let (id, at) = (*peer.as_bytes(), crate::mesh::now_ms());
        match tokio::task::spawn_blocking(move || db.provider_lacks(&blake3, &id, at)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                "mesh: peer {peer} no longer holds {}: {n} record(s) updated",
                crate::storage::hex(&blake3)
            ),
            Ok(Err(e)) => tracing::warn!("mesh: noting that {peer} lacks a NAR: {e}"),
            Err(e) => tracing::warn!("mesh: noting that {peer} lacks a NAR: {e}"),
        }
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

    /// The read budget NARs still arriving are read under (the storage's).
    pub fn read_budget(&self) -> crate::storage::ReadBudget {
        self.storage.read_budget()
    }

    /// The transfer of this NAR in progress (or over, while a reader still has it), if any.
    pub fn in_flight(&self, blake3: &[u8; 32]) -> Option<Arc<Transfer>> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.get(blake3).and_then(Weak::upgrade)
    }

    /// The transfer a task that got its slot runs, and what to fetch: its own, if no earlier
    /// task took it over and someone still wants it; else a later transfer of the same NAR
    /// still waiting (a client asking again after it left, or after its 502), which so keeps
    /// the place in the queue its first ask had. `None`: nothing to run (counted as dropped
    /// if nobody wants the NAR any more).
    fn job(
        &self,
        own: &Weak<Transfer>,
        job: &handle::Job,
        blake3: &[u8; 32],
    ) -> Option<(Arc<Transfer>, Want)> {
        // Empty: an earlier task took it over and runs it.
        let want = handle::take(job)?;
        if let Some(t) = own.upgrade() {
            return Some((t, want));
        }
        let later = self
            .in_flight(blake3)
            .and_then(|t| t.take_job().map(|w| (t, w)));
        if later.is_none() {
            tracing::debug!("mesh: a fetch nobody waits for any more left the queue");
            self.metrics.mesh_transfers_dropped.inc();
        }
        later
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
        let waiting = crate::metrics::Counted::new(&self.metrics.mesh_transfers_queued);
        let t = Arc::new(Transfer::new(want.clone(), waiting));
        active.insert(want.claim.blake3, Arc::downgrade(&t));
        drop(active);
        for p in &want.paths {
            let _ = self.started.send(p.clone());
        }
        let (this, queued, job) = (self.clone(), Arc::downgrade(&t), t.job.clone());
        let blake3 = want.claim.blake3;
        tokio::spawn(async move {
            // However this task ends (a panic, the runtime dropping it), readers of the
            // transfer it runs learn it.
            let mut ends = EndOnDrop(queued.clone());
            // Waiting for a slot, the transfer is held only by whoever wants its bytes: one
            // they all left meanwhile (HTTP clients gone, a 502 after 30 s) is not fetched
            // for nobody once a slot frees.
            let Ok(_slot) = this.slots.clone().acquire_owned().await else {
                handle::take(&job);
                return;
            };
            let Some((task, want)) = this.job(&queued, &job, &blake3) else {
                // Not ours to end: run by the task whose place it took, or gone.
                ends.0 = Weak::new();
                return;
            };
            ends.0 = Arc::downgrade(&task);
            let running = crate::metrics::Counted::new(&this.metrics.mesh_transfers);
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
        t.set_file(partial.file());
        let partial = Arc::new(partial);
        // The sha256 follows the verified prefix as it grows, so it is ready with the last byte
        // (aborted if the transfer fails, so it leaves no follower behind).
        let sha_at = t.readers.cursor();
        let mut sha = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(check::follow_sha256(
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
        // The leaves' room in `[mesh] fetch-memory`, held until the transfer ends (they are
        // kept to check every group, and written with the NAR).
        let _room = self
            .memory
            .leaves(crate::chunks::groups(t.size) * 32)
            .await
            .ok_or("the node is stopping")?;
        let leaves = self.leaves(t, &providers).await;
        let fetched = match &leaves {
            Ok(l) => match self.ranges(t, l.clone(), &partial, &providers).await {
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
            Err(NoLeaves::Busy) => Err("every provider stayed busy".to_owned()),
            Err(NoLeaves::Other) => self.whole_v1(t, &partial, &providers).await,
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
        tokio::task::spawn_blocking(move || partial.finish(leaves.as_bytes()))
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

    /// The NAR's leaves, from the first version 2 provider that has them right.
    async fn leaves(
        &self,
        t: &Transfer,
        providers: &[EndpointId],
    ) -> Result<Arc<Leaves>, NoLeaves> {
        if t.size <= GROUP {
            // One group: its only leaf is the BLAKE3 itself.
            return Leaves::verified(t.size, &t.blake3, &t.blake3)
                .map(Arc::new)
                .map_err(|_| NoLeaves::Other);
        }
        // A provider that answers `Busy` is asked again, alone, after the waits a range's
        // fetcher makes (about 30 s in all); the others are asked once.
        let (mut asking, mut v1) = (providers.to_vec(), false);
        for round in 0..=streak::BUSY_TRIES {
            if round > 0 {
                tokio::time::sleep(streak::busy_wait(round)).await;
            }
            let mut busy = Vec::new();
            for p in &asking {
                match self.pool.leaves(*p, t.blake3, t.size).await {
                    Ok(bytes) => match Leaves::verified(t.size, &bytes, &t.blake3) {
                        Ok(l) => return Ok(Arc::new(l)),
                        Err(e) => self.avoid(*p, &format!("sent bad leaves: {e}")),
                    },
                    Err(PeerError::OnlyV1) => v1 = true,
                    Err(PeerError::Busy) => busy.push(*p),
                    Err(PeerError::NotFound) => self.lacks(*p, t.blake3).await,
                    Err(e) if e.misbehaved() => self.avoid(*p, &e.to_string()),
                    Err(e) => tracing::debug!("mesh: leaves from {p}: {e}"),
                }
            }
            if busy.is_empty() {
                break;
            }
            asking = busy;
            if round == streak::BUSY_TRIES && !v1 {
                return Err(NoLeaves::Busy);
            }
        }
        Err(NoLeaves::Other)
    }
}

/// Why no provider gave the NAR's leaves.
enum NoLeaves {
    /// Those that could stayed busy: the transfer fails (a version 1 provider would be busy
    /// too).
    Busy,
    /// None can (version 1 providers only, or none answered right): ask for the whole NAR.
    Other,
}
