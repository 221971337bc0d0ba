//! The mesh: this node's iroh endpoint and what runs on it. Recorded paths are announced on
//! the cluster's gossip topic; announcements from peers are checked ([`accept`]) and recorded;
//! catch-up pulls each peer's log after our cursor when it connects and every few seconds,
//! so no announcement is missed for good; NARs move between peers by BLAKE3 hash ([`fetch`]),
//! on demand or eagerly. Only allowed peers get past the handshake ([`endpoint::AllowList`]).

mod accept;
mod endpoint;
mod fetch;
mod serve;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use iroh::address_lookup::MemoryLookup;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointId};
use iroh_gossip::api::{Event, GossipSender};
use iroh_gossip::{Gossip, TopicId};
use narmesh_proto::control::PeerStatus;
use narmesh_proto::gossip::{Announce, MAX_ANNOUNCE};
use narmesh_proto::sync::{MAX_SYNC_BATCH, NAR_ALPN, SYNC_ALPN, SyncBatch, SyncRequest};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use endpoint::{PeerAddr, parse_endpoint_id};

use crate::blobs::BlobStore;
use crate::config::{MeshConfig, Replicate};
use crate::db::{Db, PathRecord};
use crate::nix::{SecretKey, TrustedKeys};

/// How often every peer's log is checked even without a reason.
const SYNC_EVERY: Duration = Duration::from_secs(5);
/// Eager fetches at once.
const EAGER_FETCHES: usize = 2;

/// The endpoint id of the key at `path` (made there if missing), so others can name this node
/// in `peers` before it starts.
pub fn endpoint_id_of_key(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(endpoint::load_or_make_key(path)?.public().to_string())
}

/// What the mesh needs from the node.
pub struct MeshParts {
    pub cfg: MeshConfig,
    pub data_dir: std::path::PathBuf,
    pub db: Db,
    pub blobs: BlobStore,
    pub key: SecretKey,
    pub trusted: TrustedKeys,
    pub recorded: broadcast::Receiver<PathRecord>,
}

#[derive(Debug, Default)]
struct PeerState {
    neighbor: bool,
    last_sync: Option<Instant>,
    failing: bool,
}

/// A handle to the running mesh; cheap to clone.
#[derive(Clone, Debug)]
pub struct MeshHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ep: Endpoint,
    router: Router,
    gossip: Gossip,
    fetcher: fetch::Fetcher,
    db: Db,
    key: SecretKey,
    trusted: TrustedKeys,
    allow: endpoint::AllowList,
    peers: Mutex<HashMap<EndpointId, PeerState>>,
    sync_now: Notify,
    eager: Option<Semaphore>,
    tasks: TaskTracker,
}

impl MeshHandle {
    /// Bind the endpoint, start gossip, catch-up and the protocol handlers.
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
        let allow = endpoint::AllowList(Arc::new(RwLock::new(allowed)));
        let book = MemoryLookup::new();
        for p in &static_peers {
            endpoint::add_peer(&book, p);
        }
        let key = endpoint::load_or_make_key(&parts.data_dir.join("endpoint-key"))?;
        let ep = endpoint::bind(cfg.listen, key, book.clone(), allow.clone()).await?;
        let gossip = Gossip::builder()
            .max_message_size(MAX_ANNOUNCE + 1024)
            .broadcast_config(iroh_gossip::proto::PlumtreeConfig {
                graft_timeout_1: Duration::from_millis(20),
                ..Default::default()
            })
            .spawn(ep.clone());
        let me = *ep.id().as_bytes();
        let router = Router::builder(ep.clone())
            .accept(iroh_gossip::ALPN, gossip.clone())
            .accept(
                SYNC_ALPN,
                serve::SyncServer {
                    db: parts.db.clone(),
                    me,
                },
            )
            .accept(
                NAR_ALPN,
                serve::NarServer {
                    db: parts.db.clone(),
                    blobs: parts.blobs.clone(),
                },
            )
            .spawn();
        let inner = Arc::new(Inner {
            fetcher: fetch::Fetcher::new(ep.clone(), parts.db.clone(), parts.blobs.clone()),
            ep,
            router,
            gossip,
            db: parts.db,
            key: parts.key,
            trusted: parts.trusted,
            allow,
            peers: Mutex::new(
                static_peers
                    .iter()
                    .map(|p| (p.id, PeerState::default()))
                    .collect(),
            ),
            sync_now: Notify::new(),
            eager: (cfg.replicate == Replicate::Eager).then(|| Semaphore::new(EAGER_FETCHES)),
            tasks: TaskTracker::new(),
        });
        let handle = MeshHandle { inner };
        let topic = TopicId::from_bytes(
            *blake3::hash(format!("narmesh-cluster:{}", cfg.cluster).as_bytes()).as_bytes(),
        );
        let bootstrap: Vec<EndpointId> = static_peers.iter().map(|p| p.id).collect();
        let (sender, receiver) = handle
            .inner
            .gossip
            .subscribe(topic, bootstrap)
            .await
            .map_err(|e| anyhow::anyhow!("joining the gossip topic: {e}"))?
            .split();
        let t = &handle.inner.tasks;
        t.spawn(
            handle
                .clone()
                .announce_loop(parts.recorded, sender.clone(), cancel.clone()),
        );
        t.spawn(handle.clone().receive_loop(receiver, cancel.clone()));
        t.spawn(handle.clone().sync_loop(cancel.clone()));
        if cfg.lan_discovery {
            handle.start_mdns(sender, cancel.clone()).await;
        }
        tracing::info!(
            "mesh: endpoint {} at {}",
            handle.inner.ep.id(),
            endpoint::peer_address(&handle.inner.ep)
        );
        Ok(handle)
    }

    /// This node's endpoint id.
    pub fn endpoint_id(&self) -> String {
        self.inner.ep.id().to_string()
    }

    /// What another node puts in `peers` to reach this one.
    pub fn peer_address(&self) -> String {
        endpoint::peer_address(&self.inner.ep)
    }

    /// The peers and their state.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, st)| PeerStatus {
                endpoint_id: id.to_string(),
                state: if st.neighbor {
                    "neighbor"
                } else if st.failing {
                    "unreachable"
                } else {
                    "known"
                }
                .into(),
                cursor: self.inner.db.cursor(id.as_bytes()).unwrap_or(0),
                last_sync_secs_ago: st.last_sync.map(|t| t.elapsed().as_secs()),
            })
            .collect();
        out.sort_by(|a, b| a.endpoint_id.cmp(&b.endpoint_id));
        out
    }

    /// Fetch a recorded path's NAR from peers (verified), handing bytes to `tee` as they arrive.
    pub async fn fetch(
        &self,
        rec: &PathRecord,
        tee: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    ) -> Result<(), String> {
        self.inner.fetcher.fetch(rec, tee).await
    }

    /// Stop everything and close the endpoint.
    pub async fn shutdown(&self) {
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
        let _ = self.inner.router.shutdown().await;
    }

    fn peer_state(&self, id: EndpointId, f: impl FnOnce(&mut PeerState)) {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        f(peers.entry(id).or_default());
    }

    /// Announce every path the pipeline records.
    async fn announce_loop(
        self,
        mut recorded: broadcast::Receiver<PathRecord>,
        sender: GossipSender,
        cancel: CancellationToken,
    ) {
        let me = *self.inner.ep.id().as_bytes();
        loop {
            let rec = tokio::select! {
                _ = cancel.cancelled() => return,
                r = recorded.recv() => match r {
                    Ok(rec) => rec,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("mesh: {n} announcements skipped (catch-up covers them)");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let ann = accept::announce_of(&rec, me);
            match postcard::to_allocvec(&ann) {
                Ok(bytes) if bytes.len() <= MAX_ANNOUNCE => {
                    if let Err(e) = sender.broadcast(Bytes::from(bytes)).await {
                        tracing::warn!("mesh: announcing {}: {e}", rec.store_path);
                    }
                }
                Ok(_) => tracing::warn!(
                    "mesh: narinfo of {} too large to announce; peers catch up",
                    rec.store_path
                ),
                Err(e) => tracing::error!("mesh: encoding announcement: {e}"),
            }
        }
    }

    /// Take in announcements and track neighbors.
    async fn receive_loop(
        self,
        mut receiver: iroh_gossip::api::GossipReceiver,
        cancel: CancellationToken,
    ) {
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                ev = receiver.next() => ev,
            };
            match ev {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!("mesh: gossip: {e}");
                    return;
                }
                Some(Ok(Event::NeighborUp(id))) => {
                    self.peer_state(id, |s| s.neighbor = true);
                    self.inner.sync_now.notify_one();
                }
                Some(Ok(Event::NeighborDown(id))) => self.peer_state(id, |s| s.neighbor = false),
                Some(Ok(Event::Lagged)) => {
                    tracing::warn!(
                        "mesh: gossip receiver lagged; catch-up covers what was dropped"
                    );
                    self.inner.sync_now.notify_one();
                }
                Some(Ok(Event::Received(msg))) => {
                    match postcard::from_bytes::<Announce>(&msg.content) {
                        Ok(ann) => {
                            self.take(vec![ann], None, &msg.delivered_from.to_string())
                                .await
                        }
                        Err(e) => tracing::warn!(
                            "mesh: undecodable announcement via {}: {e}",
                            msg.delivered_from
                        ),
                    }
                }
            }
        }
    }

    /// Check and record announcements (and move a peer's cursor); fetch eagerly if asked.
    async fn take(&self, anns: Vec<Announce>, cursor: Option<(EndpointId, u64)>, from: &str) {
        let allow = self.inner.allow.clone();
        let mut records = Vec::new();
        for ann in &anns {
            match accept::record_from(ann, &self.inner.trusted, &self.inner.key, |p| {
                EndpointId::from_bytes(p).is_ok_and(|id| allow.contains(&id))
            }) {
                Ok(r) => records.push(r),
                Err(e) => tracing::warn!("mesh: refused an announcement from {from}: {e}"),
            }
        }
        let db = self.inner.db.clone();
        let cur = cursor.map(|(id, seq)| (*id.as_bytes(), seq));
        let res = tokio::task::spawn_blocking(move || {
            db.record_remote(records, cur.as_ref().map(|(id, s)| (id, *s)))
        })
        .await;
        let new = match res {
            Ok(Ok(new)) => new,
            Ok(Err(e)) => return tracing::error!("mesh: recording announcements: {e}"),
            Err(e) => return tracing::error!("mesh: recording announcements: {e}"),
        };
        if !new.is_empty() {
            tracing::debug!("mesh: recorded {} path(s) from {from}", new.len());
        }
        if self.inner.eager.is_some() {
            for rec in new {
                let this = self.clone();
                self.inner.tasks.spawn(async move {
                    let Some(sem) = this.inner.eager.as_ref() else {
                        return;
                    };
                    let Ok(_permit) = sem.acquire().await else {
                        return;
                    };
                    if let Err(e) = this.fetch(&rec, None).await {
                        tracing::warn!("mesh: eager fetch: {e}");
                    }
                });
            }
        }
    }

    /// Catch up with every peer now and then, and whenever a neighbor comes up.
    async fn sync_loop(self, cancel: CancellationToken) {
        loop {
            let peers: Vec<EndpointId> = self
                .inner
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect();
            for peer in peers {
                if cancel.is_cancelled() {
                    return;
                }
                match self.sync_from(peer).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!("mesh: caught up {n} entries from {peer}");
                        }
                        self.peer_state(peer, |s| {
                            s.last_sync = Some(Instant::now());
                            s.failing = false;
                        });
                    }
                    Err(e) => {
                        tracing::debug!("mesh: catch-up from {peer}: {e}");
                        self.peer_state(peer, |s| s.failing = true);
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.sync_now.notified() => {}
                _ = tokio::time::sleep(SYNC_EVERY) => {}
            }
        }
    }

    /// Pull a peer's log after our cursor, batch by batch; returns the entries taken.
    async fn sync_from(&self, peer: EndpointId) -> Result<usize, String> {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            self.inner.ep.connect(peer, SYNC_ALPN),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let db = self.inner.db.clone();
        let mut after = tokio::task::spawn_blocking(move || db.cursor(peer.as_bytes()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut taken = 0;
        loop {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let req = SyncRequest {
                version: narmesh_proto::MESH_PROTOCOL_VERSION,
                after,
                limit: MAX_SYNC_BATCH,
            };
            wire::write(&mut send, &req)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let batch: SyncBatch =
                tokio::time::timeout(Duration::from_secs(30), wire::read(&mut recv))
                    .await
                    .map_err(|_| "catch-up answer timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            if batch.next < after || batch.entries.len() > MAX_SYNC_BATCH as usize {
                return Err("peer sent an inconsistent catch-up batch".into());
            }
            taken += batch.entries.len();
            let advanced = batch.next > after;
            self.take(batch.entries, Some((peer, batch.next)), &peer.to_string())
                .await;
            after = batch.next;
            if !batch.more || !advanced {
                break;
            }
        }
        conn.close(0u32.into(), b"done");
        Ok(taken)
    }

    /// Join allowed peers found on the LAN.
    async fn start_mdns(&self, sender: GossipSender, cancel: CancellationToken) {
        use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
        let mdns = match MdnsAddressLookup::builder()
            .service_name("narmesh")
            .build(self.inner.ep.id())
        {
            Ok(m) => m,
            Err(e) => return tracing::warn!("mesh: LAN discovery unavailable: {e}"),
        };
        match self.inner.ep.address_lookup() {
            Ok(l) => l.add(mdns.clone()),
            Err(e) => return tracing::warn!("mesh: LAN discovery unavailable: {e}"),
        }
        let this = self.clone();
        self.inner.tasks.spawn(async move {
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
                if !this.inner.allow.contains(&id) {
                    tracing::debug!("mesh: ignoring {id} found on the LAN: not allowed");
                    continue;
                }
                let known = this
                    .inner
                    .peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&id);
                if !known {
                    tracing::info!("mesh: found peer {id} on the LAN");
                    this.peer_state(id, |_| {});
                    let _ = sender.join_peers(vec![id]).await;
                    this.inner.sync_now.notify_one();
                }
            }
        });
    }
}
