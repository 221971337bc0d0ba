//! The mesh: this node's iroh endpoint and what runs on it, wired here. Recorded paths are
//! announced on the cluster's gossip topic ([`gossip`]); announcements and catch-up entries are
//! checked ([`accept`], pure) and recorded; catch-up ([`sync`]) pulls each peer's log after our
//! cursor, concurrently and within a budget; NARs move between peers by BLAKE3 hash as verified
//! ranges ([`transfer`] and [`peer`] fetch, [`nar`] serves), on demand or eagerly ([`eager`]).
//! Only allowed peers get past the handshake ([`endpoint::AllowList`]).

mod accept;
mod behind;
mod bulk;
mod eager;
mod endpoint;
mod gossip;
mod nar;
mod pace;
mod peer;
mod ranges;
mod ready;
mod sync;
mod transfer;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use iroh::address_lookup::MemoryLookup;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointId};
use iroh_gossip::{Gossip, TopicId};
use narmesh_proto::control::PeerStatus;
use narmesh_proto::gossip::{Incoming, MAX_ANNOUNCE};
use narmesh_proto::sync::{BULK_ALPN, NAR_ALPN, NAR_ALPN_V1, SYNC_ALPN, SYNC_ALPN_V1};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use bulk::{CONNECTIONS as BULK_CONNECTIONS, HEADERLESS_PER_HOST as BULK_HEADERLESS_PER_HOST};
pub use endpoint::{PeerAddr, parse_endpoint_id};
pub use transfer::{MAX_TRANSFERS, Progress, Transfer, Want};

use crate::config::{MeshConfig, Replicate};
use crate::db::{Db, PathRecord, RemoteClaim};
use crate::metrics::Metrics;
use crate::nix::{SecretKey, TrustedKeys};
use crate::storage::Storage;

/// The endpoint id of the key at `path` (made there if missing), so others can name this node
/// in `peers` before it starts.
pub fn endpoint_id_of_key(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(endpoint::load_or_make_key(path)?.public().to_string())
}

/// Milliseconds since the epoch (provider statements).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the mesh needs from the node.
pub struct MeshParts {
    pub cfg: MeshConfig,
    pub data_dir: std::path::PathBuf,
    pub db: Db,
    pub storage: Storage,
    pub key: SecretKey,
    pub trusted: TrustedKeys,
    pub recorded: broadcast::Receiver<PathRecord>,
    pub metrics: Arc<Metrics>,
    /// Largest NAR taken in (`[mesh] max-nar-size`, at most the storage's cap).
    pub max_nar_size: u64,
    /// `[store] forget-after-secs`: a peer not caught up with for longer is reviewed.
    pub forget_after_secs: u64,
    /// The node's watch over the mesh's gossip, catch-up, bulk channel and eager fetches.
    pub vital: crate::vital::Vital,
}

#[derive(Debug, Default)]
struct PeerState {
    neighbor: bool,
    last_sync: Option<Instant>,
    failing: bool,
    /// A peer whose catch-up entries were not acceptable is left alone until then, for a time
    /// that doubles each round it stays so (up to 5 minutes).
    penalty: Option<(Instant, Duration)>,
    /// The catch-up connection kept between rounds (its version, and when it was last used), so
    /// a round with nothing new costs one stream, not a handshake.
    sync_conn: Option<(iroh::endpoint::Connection, u8, Instant)>,
    /// Entries asked for per catch-up batch, when fewer than the most (a batch did not come
    /// back).
    batch_limit: Option<u32>,
}

/// What the mesh's tasks share.
#[derive(Debug)]
pub struct Ctx {
    ep: Endpoint,
    db: Db,
    storage: Storage,
    key: SecretKey,
    endpoint_key: iroh::SecretKey,
    trusted: TrustedKeys,
    allow: endpoint::AllowList,
    metrics: Arc<Metrics>,
    max_nar_size: u64,
    eager: bool,
    transfers: Arc<transfer::Transfers>,
    eager_wake: Notify,
    peers: Mutex<HashMap<EndpointId, PeerState>>,
    sync_now: Notify,
    sync_every: Duration,
    /// `[store] forget-after-secs` (see `db::review`).
    forget_after_secs: u64,
    /// When each refusal reason was last logged, and how many were not logged since.
    refusal_log: Mutex<HashMap<&'static str, endpoint::EverySecond>>,
    /// When the node's own failure to record what peers said was last logged (a full disk
    /// fails every gossip message and catch-up batch: one line a second).
    record_log: crate::logging::EverySecond,
}

/// The hash part of the store path a narinfo names, if it names one.
fn narinfo_hash_part(narinfo: &str) -> Option<&str> {
    let path = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("StorePath: "))?;
    let h = crate::db::hash_part_of(path.trim());
    (h.len() == crate::nix::store_path::HASH_LEN).then_some(h)
}

/// Split off the version 2 announcements that could not change what `db` knows; returns how
/// many were dropped, and the rest, in order.
fn drop_known(db: &Db, anns: Vec<Incoming>) -> Result<(usize, Vec<Incoming>), crate::db::DbError> {
    let views: Vec<_> = anns
        .iter()
        .map(|a| match a {
            Incoming::V2(a) => narinfo_hash_part(&a.narinfo).map(|h| {
                (
                    h,
                    &a.blake3,
                    a.nar_size,
                    a.bindings.as_slice(),
                    a.providers
                        .iter()
                        .map(|p| (p.id, p.holds, p.at_ms, !p.sig.is_empty()))
                        .collect::<Vec<_>>(),
                )
            }),
            Incoming::V1(_) => None,
        })
        .collect();
    let mut which = db
        .could_change(views.iter().flatten().cloned())?
        .into_iter();
    let keep: Vec<bool> = views
        .iter()
        .map(|v| v.is_none() || which.next().unwrap_or(true))
        .collect();
    let before = anns.len();
    let rest: Vec<Incoming> = anns
        .into_iter()
        .zip(keep)
        .filter_map(|(a, k)| k.then_some(a))
        .collect();
    Ok((before - rest.len(), rest))
}

impl Ctx {
    fn peer_state(&self, id: EndpointId, f: impl FnOnce(&mut PeerState)) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        f(peers.entry(id).or_default());
    }

    /// Count and log a refusal.
    fn refused(&self, from: &str, reason: &'static str, why: &str) {
        self.metrics.refused(reason);
        // A peer that floods refusals must not flood the log: one line per reason a second.
        let log = self
            .refusal_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default()
            .clone();
        if let Some(skipped) = log.allow() {
            let more = if skipped > 0 {
                format!(" ({skipped} more refused for this reason meanwhile)")
            } else {
                String::new()
            };
            tracing::warn!("mesh: refused an announcement from {from}: {why}{more}");
        }
    }

    /// Check and record announcements (and move a peer's cursor); an eager node wishes for
    /// the NARs it does not hold. Returns how many were acceptable, or why this node could not
    /// record them (its own failure, not the peer's: nothing was recorded and the cursor did
    /// not move).
    async fn take(
        self: &Arc<Self>,
        anns: Vec<Incoming>,
        cursor: Option<(EndpointId, u64)>,
        from: &str,
    ) -> Result<usize, String> {
        let ctx = self.clone();
        let from2 = from.to_owned();
        // Signature checks are CPU work: off the async threads.
        let res = tokio::task::spawn_blocking(move || {
            let allow = ctx.allow.clone();
            let judge = accept::Judge {
                trusted: &ctx.trusted,
                key: &ctx.key,
                allowed: |p: &[u8; 32]| {
                    EndpointId::from_bytes(p).is_ok_and(|id| allow.contains(&id))
                },
                max_nar_size: ctx.max_nar_size,
            };
            // Entries that could not change anything known (most of a catch-up batch: every
            // peer restates what it learnt) are taken as they are, without their checks.
            let (known, anns) = drop_known(&ctx.db, anns)?;
            let judged = judge.judge_all(&anns);
            let mut claims: Vec<RemoteClaim> = Vec::with_capacity(anns.len());
            for r in judged {
                match r {
                    Ok(c) => claims.push(c),
                    Err(e) => ctx.refused(&from2, e.reason(), &e.to_string()),
                }
            }
            let accepted = known + claims.len();
            let cur = cursor.map(|(id, seq)| (*id.as_bytes(), seq));
            if !claims.is_empty() && crate::killpoint::fault("mesh.record-fails") {
                return Err(crate::db::DbError::Injected);
            }
            let changed = ctx
                .db
                // An eager node wishes for the NARs of claims new to it in the same commit
                // (news of providers, or of its own eviction coming back from peers, never
                // starts a fetch again).
                .record_remote(
                    claims,
                    cur.as_ref().map(|(id, s)| (id, *s)),
                    ctx.eager,
                    Some(ctx.endpoint_key.public().as_bytes()),
                )?;
            Ok::<_, crate::db::DbError>((accepted, changed.len()))
        })
        .await;
        match res {
            Ok(Ok((accepted, n))) => {
                let missed = self.record_log.take_unlogged();
                if missed > 0 {
                    tracing::info!(
                        "mesh: recording announcements works again ({missed} more failure(s) \
                         were not logged)"
                    );
                }
                if n > 0 {
                    self.metrics.mesh_records_changed.inc_by(n as u64);
                    tracing::debug!("mesh: recorded {n} new or changed path(s) from {from}");
                    if self.eager {
                        self.eager_wake.notify_one();
                    }
                }
                Ok(accepted)
            }
            Ok(Err(e)) => Err(self.record_failed(from, e.to_string())),
            Err(e) => Err(self.record_failed(from, e.to_string())),
        }
    }

    /// Log the node's own failure to record what `from` said, at most once a second.
    fn record_failed(&self, from: &str, e: String) -> String {
        if let Some(skipped) = self.record_log.allow() {
            let more = if skipped > 0 {
                format!(" ({skipped} more failed meanwhile)")
            } else {
                String::new()
            };
            tracing::error!("mesh: recording announcements from {from}: {e}{more}");
        }
        e
    }
}

/// A handle to the running mesh; cheap to clone.
#[derive(Clone, Debug)]
pub struct MeshHandle {
    ctx: Arc<Ctx>,
    router: Arc<Router>,
    tasks: TaskTracker,
}

/// NARs on their way here from peers, as a reader that does not start fetches sees them: which
/// are arriving, news of new ones, and their verified bytes while they arrive.
#[derive(Clone, Debug)]
pub struct Arriving(Arc<transfer::Transfers>);

impl Arriving {
    /// True while a transfer of this NAR is under way.
    pub fn is_arriving(&self, blake3: &[u8; 32]) -> bool {
        self.0
            .in_flight(blake3)
            .is_some_and(|t| t.progress().borrow().done.is_none())
    }

    /// News of transfers starting: the hash parts of the paths each is for.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.subscribe_started()
    }

    /// The bytes of an arriving NAR, verified, the last piece only once its sha256 matched
    /// (see [`Transfer::follow`]); `None` if no transfer of it is under way (or it failed).
    pub fn follow(
        &self,
        blake3: &[u8; 32],
        guard: impl Send + 'static,
    ) -> Option<tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>> {
        let t = self.0.in_flight(blake3)?;
        if matches!(t.progress().borrow().done, Some(Err(_))) {
            return None;
        }
        Some(t.follow(self.0.read_budget(), guard, true))
    }
}

impl MeshHandle {
    /// Bind the endpoint, start gossip, catch-up, eager replication and the protocol handlers.
    pub async fn start(parts: MeshParts, cancel: CancellationToken) -> anyhow::Result<Self> {
        let cfg = &parts.cfg;
        let static_peers: Vec<PeerAddr> = cfg
            .peers
            .iter()
            .map(|p| PeerAddr::parse(p))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let mut allowed: HashSet<EndpointId> = static_peers.iter().map(|p| p.id).collect();
        for id in &cfg.allowed_peers {
            allowed.insert(parse_endpoint_id(id).map_err(anyhow::Error::msg)?);
        }
        retrust(&parts, &allowed).await?;
        let allow = endpoint::AllowList(Arc::new(RwLock::new(allowed)));
        let book = MemoryLookup::new();
        for p in &static_peers {
            endpoint::add_peer(&book, p);
        }
        let endpoint_key = endpoint::load_or_make_key(&parts.data_dir.join("endpoint-key"))?;
        let ep = endpoint::bind(
            cfg.listen,
            endpoint_key.clone(),
            book.clone(),
            allow.clone(),
        )
        .await?;
        let gossip = Gossip::builder()
            .max_message_size(MAX_ANNOUNCE + 1024)
            .broadcast_config(iroh_gossip::proto::PlumtreeConfig {
                graft_timeout_1: Duration::from_millis(20),
                // Messages are kept for neighbours that ask for them (a graft comes within
                // milliseconds on a LAN) and their ids to drop repeats. iroh-gossip's defaults
                // (30 s and 90 s) held 30 MiB of a 65 MiB heap while 100,000 paths went by;
                // what a node misses beyond these, catch-up brings.
                message_cache_retention: Duration::from_secs(5),
                message_id_retention: Duration::from_secs(20),
                ..Default::default()
            })
            .spawn(ep.clone());
        let transfers = Arc::new(transfer::Transfers::new(
            peer::Pool::new(ep.clone()),
            parts.storage.clone(),
            parts.db.clone(),
            parts.metrics.clone(),
            cfg.bulk_listen.is_some(),
            cfg.fetch_memory.0,
        ));
        let ctx = Arc::new(Ctx {
            ep: ep.clone(),
            db: parts.db,
            storage: parts.storage.clone(),
            key: parts.key,
            endpoint_key,
            trusted: parts.trusted,
            allow,
            metrics: parts.metrics.clone(),
            max_nar_size: parts.max_nar_size,
            eager: cfg.replicate == Replicate::Eager,
            transfers,
            eager_wake: Notify::new(),
            peers: Mutex::new(
                static_peers
                    .iter()
                    .map(|p| (p.id, PeerState::default()))
                    .collect(),
            ),
            sync_now: Notify::new(),
            sync_every: Duration::from_millis(cfg.sync_interval_ms),
            forget_after_secs: parts.forget_after_secs,
            refusal_log: Mutex::new(HashMap::new()),
            record_log: crate::logging::EverySecond::default(),
        });
        let serving = Arc::new(tokio::sync::Semaphore::new(nar::MAX_SERVING));
        let serving_by_peer = endpoint::PeerSlots::new(nar::SERVING_PER_PEER);
        let nar_slots = endpoint::ConnSlots::new(parts.metrics.clone());
        let sync_slots = endpoint::ConnSlots::new(parts.metrics.clone());
        let pacer = cfg.serve_rate.map(|r| Arc::new(pace::Pacer::new(r.0)));
        let nar_server = |version| nar::NarServer {
            pacer: pacer.clone(),
            storage: parts.storage.clone(),
            metrics: parts.metrics.clone(),
            slots: serving.clone(),
            serving_by_peer: serving_by_peer.clone(),
            version,
            per_peer: nar_slots.clone(),
        };
        let sync_server = |version| sync::SyncServer {
            ctx: ctx.clone(),
            version,
            per_peer: sync_slots.clone(),
        };
        let mut router = Router::builder(ep.clone())
            .accept(iroh_gossip::ALPN, gossip.clone())
            .accept(SYNC_ALPN, sync_server(2))
            .accept(SYNC_ALPN_V1, sync_server(1))
            .accept(NAR_ALPN, nar_server(2))
            .accept(NAR_ALPN_V1, nar_server(1));
        let mut bulk_tcp = None;
        if let Some(addr) = cfg.bulk_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("mesh bulk-listen {addr}: {e}"))?;
            let bound = listener.local_addr()?;
            let server = bulk::BulkServer::new(bound.port(), nar_server(2));
            router = router.accept(BULK_ALPN, server.clone());
            tracing::info!("mesh: bulk channel (TCP, unencrypted) on {bound}");
            bulk_tcp = Some((server, listener));
        }
        let router = router.spawn();
        let handle = MeshHandle {
            ctx: ctx.clone(),
            router: Arc::new(router),
            tasks: TaskTracker::new(),
        };
        let topic = gossip::Topic {
            gossip,
            id: TopicId::from_bytes(
                *blake3::hash(format!("narmesh-cluster:{}", cfg.cluster).as_bytes()).as_bytes(),
            ),
            bootstrap: static_peers.iter().map(|p| p.id).collect(),
        };
        let (join_tx, join_rx) = mpsc::channel(64);
        let t = &handle.tasks;
        let vital = &parts.vital;
        t.spawn(crate::vital::watched(
            vital.guard("mesh gossip"),
            gossip::run(ctx.clone(), topic, parts.recorded, join_rx, cancel.clone()),
        ));
        t.spawn(crate::vital::watched(
            vital.guard("mesh catch-up"),
            sync_loop(ctx.clone(), cancel.clone()),
        ));
        if let Some((server, listener)) = bulk_tcp {
            t.spawn(crate::vital::watched(
                vital.guard("mesh bulk channel"),
                server.serve_tcp(listener, cancel.clone()),
            ));
        }
        if ctx.eager {
            t.spawn(crate::vital::watched(
                vital.guard("mesh eager fetches"),
                eager::run(ctx.clone(), cancel.clone()),
            ));
        }
        if cfg.lan_discovery {
            handle.start_mdns(join_tx, cancel.clone()).await;
        }
        tracing::info!(
            "mesh: endpoint {} at {}",
            ep.id(),
            endpoint::peer_address(&ep)
        );
        Ok(handle)
    }

    /// This node's endpoint id.
    pub fn endpoint_id(&self) -> String {
        self.ctx.ep.id().to_string()
    }

    /// This node's endpoint id, as records hold provider ids.
    pub fn endpoint_bytes(&self) -> [u8; 32] {
        *self.ctx.ep.id().as_bytes()
    }

    /// What another node puts in `peers` to reach this one.
    pub fn peer_address(&self) -> String {
        endpoint::peer_address(&self.ctx.ep)
    }

    /// The peers and their state.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let peers = self.ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, st)| PeerStatus {
                endpoint_id: id.to_string(),
                // A failing catch-up says more than a gossip link that has not timed out yet.
                state: if st.failing {
                    "unreachable"
                } else if st.neighbor {
                    "neighbor"
                } else {
                    "known"
                }
                .into(),
                cursor: self.ctx.db.cursor(id.as_bytes()).unwrap_or(0),
                last_sync_secs_ago: st.last_sync.map(|t| t.elapsed().as_secs()),
            })
            .collect();
        out.sort_by(|a, b| a.endpoint_id.cmp(&b.endpoint_id));
        out
    }

    /// The transfer of a claim's NAR from peers (shared with whoever else fetches it).
    pub fn fetch(&self, want: Want) -> Arc<Transfer> {
        self.ctx.transfers.start(want)
    }

    /// NARs on their way here from peers (for the mirror, which reads them as they arrive).
    pub fn arriving(&self) -> Arriving {
        Arriving(self.ctx.transfers.clone())
    }

    /// The providers a claim's NAR could be fetched from (empty: nothing can be fetched).
    pub fn providers(&self, claim: &crate::db::Claim) -> usize {
        self.ctx.transfers.providers(claim).len()
    }

    /// Stop everything and close the endpoint.
    pub async fn shutdown(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        let _ = self.router.shutdown().await;
    }

    /// Join allowed peers found on the LAN.
    async fn start_mdns(&self, joins: mpsc::Sender<EndpointId>, cancel: CancellationToken) {
        use futures::StreamExt as _;
        use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
        let mdns = match MdnsAddressLookup::builder()
            .service_name("narmesh")
            .build(self.ctx.ep.id())
        {
            Ok(m) => m,
            Err(e) => return tracing::warn!("mesh: LAN discovery unavailable: {e}"),
        };
        match self.ctx.ep.address_lookup() {
            Ok(l) => l.add(mdns.clone()),
            Err(e) => return tracing::warn!("mesh: LAN discovery unavailable: {e}"),
        }
        let ctx = self.ctx.clone();
        self.tasks.spawn(async move {
            let mut events = mdns.subscribe().await;
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => return,
                    ev = events.next() => ev,
                };
                let Some(DiscoveryEvent::Discovered { endpoint_info, .. }) = ev else {
                    if ev.is_none() {
                        return;
                    }
                    continue;
                };
                let id = endpoint_info.endpoint_id;
                if !ctx.allow.contains(&id) {
                    tracing::debug!("mesh: ignoring {id} found on the LAN: not allowed");
                    continue;
                }
                let known = ctx
                    .peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&id);
                if !known {
                    tracing::info!("mesh: found peer {id} on the LAN");
                    ctx.peer_state(id, |_| {});
                    let _ = joins.send(id).await;
                    ctx.sync_now.notify_one();
                }
            }
        });
    }
}

/// If the trust configuration changed since the records were last checked: check every stored
/// claim again, drop what is no longer trusted (the HTTP cache stops serving it), and start
/// catch-up over with every peer, so what was refused before is learnt now.
async fn retrust(parts: &MeshParts, allowed: &HashSet<EndpointId>) -> anyhow::Result<()> {
    let ids: Vec<[u8; 32]> = allowed.iter().map(|id| *id.as_bytes()).collect();
    let fp = accept::trust_fingerprint(&parts.trusted, &ids);
    let (db, trusted, key, max) = (
        parts.db.clone(),
        parts.trusted.clone(),
        parts.key.clone(),
        parts.max_nar_size,
    );
    let allowed: HashSet<[u8; 32]> = ids.into_iter().collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let old = db.trust_fingerprint()?;
        if old == fp {
            return Ok(());
        }
        let judge = accept::Judge {
            trusted: &trusted,
            key: &key,
            allowed: |id: &[u8; 32]| allowed.contains(id),
            max_nar_size: max,
        };
        let (dropped, removed) = db.retrust(fp, |_, c| judge.still_trusted(c))?;
        if old != 0 {
            tracing::info!(
                "mesh: trust configuration changed: {dropped} claim(s) no longer trusted, \
                 {removed} path(s) removed; catching up with every peer from the start"
            );
        }
        Ok(())
    })
    .await?
}

/// `every`, give or take a tenth at random, so nodes started together do not all catch up in
/// the same instant round after round.
fn jittered(every: Duration) -> Duration {
    let r = getrandom::u32().unwrap_or(0) as f64 / u32::MAX as f64;
    every.mul_f64(0.9 + 0.2 * r)
}

/// Catch up with every peer at once, every `sync-interval` and whenever a neighbor comes up;
/// each peer on its own within its round budget, so a slow peer delays nobody: a peer still in
/// its round is simply not started again until it is done.
async fn sync_loop(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut busy: HashSet<EndpointId> = HashSet::new();
    let mut rounds = tokio::task::JoinSet::new();
    // Which peer each round is with, so a round that panicked still frees its peer.
    let mut round_of: HashMap<tokio::task::Id, EndpointId> = HashMap::new();
    let mut next = tokio::time::Instant::now() + jittered(ctx.sync_every);
    loop {
        let peers: Vec<EndpointId> = ctx
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let now = Instant::now();
        for peer in peers {
            let penalised = ctx
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer)
                .and_then(|s| s.penalty)
                .is_some_and(|(until, _)| until > now);
            if penalised || !busy.insert(peer) {
                continue;
            }
            let ctx = ctx.clone();
            let round = rounds.spawn(async move {
                let r = tokio::time::timeout(sync::ROUND_BUDGET, sync::from_peer(&ctx, peer))
                    .await
                    .unwrap_or_else(|_| Err("round budget spent".into()));
                (peer, r)
            });
            round_of.insert(round.id(), peer);
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ctx.sync_now.notified() => break,
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + jittered(ctx.sync_every);
                    break;
                }
                Some(done) = rounds.join_next_with_id(), if !rounds.is_empty() => {
                    // A round that panicked ends too: its peer is caught up with again.
                    let (peer, r) = match done {
                        Ok((id, (peer, r))) => {
                            round_of.remove(&id);
                            (peer, r)
                        }
                        Err(e) => match round_of.remove(&e.id()) {
                            Some(peer) => (peer, Err(format!("the round ended: {e}"))),
                            None => continue,
                        },
                    };
                    busy.remove(&peer);
                    match r {
                        Ok(n) => {
                            if n > 0 {
                                tracing::info!("mesh: caught up {n} entries from {peer}");
                            }
                            ctx.peer_state(peer, |s| {
                                s.last_sync = Some(Instant::now());
                                s.failing = false;
                                s.penalty = None;
                            });
                        }
                        Err(e) if e.starts_with(sync::PENALTY_PREFIX) => {
                            ctx.peer_state(peer, |s| {
                                let wait = s.penalty.map_or(ctx.sync_every * 2, |(_, w)| {
                                    (w * 2).min(Duration::from_secs(300))
                                });
                                tracing::info!("mesh: catch-up from {peer}: {e}; left alone for {wait:?}");
                                s.penalty = Some((Instant::now() + wait, wait));
                            });
                        }
                        // Logged where it failed; the peer is asked again at the next round.
                        Err(e) if e.starts_with(sync::OWN_FAILURE_PREFIX) => {
                            tracing::debug!("mesh: catch-up from {peer}: {e}");
                        }
                        Err(e) => {
                            tracing::debug!("mesh: catch-up from {peer}: {e}");
                            ctx.peer_state(peer, |s| s.failing = true);
                        }
                    }
                }
            }
        }
    }
}
