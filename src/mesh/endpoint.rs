//! The node's iroh endpoint, built never to reach the internet: no relays, no port mapper, no
//! n0 discovery; peers are found from static addresses (and mDNS when enabled). The endpoint
//! key persists in the data dir, and a handshake hook refuses every peer that is not allowed,
//! on every protocol.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{
    AfterHandshakeOutcome, Connection, EndpointHooks, PortmapperConfig, VarInt, presets,
};
use iroh::{Endpoint, EndpointAddr, EndpointId, NetReportConfig, RelayMode, SecretKey};

/// A peer's address as configured and as `narmesh status` prints it: `<endpoint id>@<ip:port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub id: EndpointId,
    pub addr: SocketAddr,
}

impl PeerAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .trim()
            .split_once('@')
            .ok_or_else(|| format!("peer {s:?}: expected '<endpoint id>@<ip:port>'"))?;
        Ok(PeerAddr {
            id: parse_endpoint_id(id)?,
            addr: addr
                .parse()
                .map_err(|e| format!("peer {s:?}: bad socket address: {e}"))?,
        })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// Parse an endpoint id (64 hex digits).
pub fn parse_endpoint_id(s: &str) -> Result<EndpointId, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("endpoint id {s:?}: {e}"))
}

/// Refuses connections, in and out, with peers outside the allowed set.
#[derive(Debug, Clone)]
pub struct AllowList(pub Arc<RwLock<HashSet<EndpointId>>>);

impl AllowList {
    pub fn contains(&self, id: &EndpointId) -> bool {
        self.0.read().map(|s| s.contains(id)).unwrap_or(false)
    }
}

/// QUIC application close code for a refused peer.
pub const REFUSED: u32 = 403;

impl EndpointHooks for AllowList {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        let peer = conn.remote_id();
        if self.contains(&peer) {
            AfterHandshakeOutcome::Accept
        } else {
            tracing::warn!("mesh: refused a connection from {peer}: not in allowed-peers");
            AfterHandshakeOutcome::Reject {
                error_code: VarInt::from_u32(REFUSED),
                reason: b"not an allowed peer".to_vec(),
            }
        }
    }
}

/// The endpoint key from `path` (32 raw bytes, 0600), made on first start.
pub fn load_or_make_key(path: &Path) -> anyhow::Result<SecretKey> {
    if let Ok(bytes) = std::fs::read(path) {
        let raw: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: expected 32 bytes", path.display()))?;
        return Ok(SecretKey::from_bytes(&raw));
    }
    let key = SecretKey::generate();
    crate::fsutil::write_atomic(path, &key.to_bytes(), 0o600)?;
    Ok(key)
}

/// Bind the endpoint on `listen` with `key`; peers' addresses come from `book`.
pub async fn bind(
    listen: SocketAddr,
    key: SecretKey,
    book: MemoryLookup,
    allow: AllowList,
) -> anyhow::Result<Endpoint> {
    let ep = Endpoint::builder(presets::Minimal)
        .secret_key(key)
        .relay_mode(RelayMode::Disabled)
        .clear_address_lookup()
        .address_lookup(book)
        .portmapper_config(PortmapperConfig::Disabled)
        .net_report_config(NetReportConfig::minimal())
        .hooks(allow)
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| anyhow::anyhow!("mesh listen address {listen}: {e}"))?
        .bind()
        .await
        .map_err(|e| anyhow::anyhow!("binding the mesh endpoint on {listen}: {e}"))?;
    Ok(ep)
}

/// An address other nodes can put in their `peers`.
pub fn peer_address(ep: &Endpoint) -> String {
    let bound = ep.bound_sockets();
    let addr = bound
        .iter()
        .find(|a| !a.ip().is_unspecified())
        .copied()
        .or_else(|| {
            let port = bound.first().map(|a| a.port()).unwrap_or(0);
            ep.addr()
                .ip_addrs()
                .find(|a| a.is_ipv4() && !a.ip().is_loopback() && a.port() == port)
                .copied()
        })
        .or_else(|| bound.first().copied());
    match addr {
        Some(a) => PeerAddr {
            id: ep.id(),
            addr: a,
        }
        .to_string(),
        None => ep.id().to_string(),
    }
}

/// The IP address a connection's selected path reaches the peer at (none over a relay).
pub fn remote_ip(conn: &Connection) -> Option<std::net::IpAddr> {
    conn.paths()
        .iter()
        .filter(|p| p.is_selected())
        .find_map(|p| match p.remote_addr() {
            iroh::TransportAddr::Ip(a) => Some(a.ip()),
            _ => None,
        })
}

/// Tell the endpoint where a peer is.
pub fn add_peer(book: &MemoryLookup, peer: &PeerAddr) {
    book.add_endpoint_info(EndpointAddr::new(peer.id).with_ip_addr(peer.addr));
}

/// A connection to one of our protocols with no stream open for this long is let go
/// ([`let_go_idle`]): a peer's pooled connections do not hold the node's places forever.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// A client reuses a pooled connection only if it last used it this recently, well inside the
/// serving node's [`IDLE`], so a request never races the node letting the connection go.
pub const REUSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

// A request made just inside REUSE_WITHIN is accepted by the serving node long before its
// IDLE runs out (it counts from the last stream served, which is later still).
const _: () = assert!(REUSE_WITHIN.as_secs() + 5 <= IDLE.as_secs());

/// Close a connection that went [`IDLE`] (QUIC code 0, reason `idle`).
pub fn let_go_idle(conn: &Connection) {
    conn.close(0u32.into(), b"idle");
}

/// The next stream the peer opens on `conn`, or `None` once the connection has ended or went
/// [`IDLE`] waiting for one (it is then let go).
pub async fn next_stream(
    conn: &Connection,
) -> Option<(iroh::endpoint::SendStream, iroh::endpoint::RecvStream)> {
    match tokio::time::timeout(IDLE, conn.accept_bi()).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(_)) => None,
        Err(_) => {
            let_go_idle(conn);
            None
        }
    }
}

/// Connections one peer may have open to one of our protocols at once; more are closed with
/// QUIC application code 429 (a peer needs one or two; a hostile one gets no more).
pub const CONNECTIONS_PER_PEER: usize = 8;

/// Counts what each peer (or each address, `K`) holds of something (connections to a
/// protocol, streams served, bulk connections that have not said what they want), up to a cap
/// per peer.
#[derive(Debug, Clone)]
pub struct PeerSlots<K = EndpointId> {
    open: Arc<std::sync::Mutex<std::collections::HashMap<K, usize>>>,
    cap: usize,
}

/// A peer's place among its `cap`; given back when dropped.
#[derive(Debug)]
pub struct PeerSlot<K: std::hash::Hash + Eq + Copy = EndpointId> {
    slots: PeerSlots<K>,
    peer: K,
}

impl<K: std::hash::Hash + Eq + Copy> PeerSlots<K> {
    pub fn new(cap: usize) -> Self {
        PeerSlots {
            open: Arc::default(),
            cap,
        }
    }

    /// A place for one more of `peer`'s, or `None` when it holds `cap` already.
    pub fn take(&self, peer: K) -> Option<PeerSlot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(peer).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

pub use crate::logging::EverySecond;

/// Each peer's connections to a protocol, at most [`CONNECTIONS_PER_PEER`]; a connection over
/// that is closed (QUIC code 429), counted in
/// `narmesh_mesh_refused_total{reason="too-many-connections"}` and logged at most once a second.
/// A connection that sends a bad request is closed the same way ([`ConnSlots::bad_request`]).
#[derive(Debug, Clone)]
pub struct ConnSlots {
    slots: PeerSlots,
    metrics: Arc<crate::metrics::Metrics>,
    too_many: EverySecond,
    bad: EverySecond,
    /// The bulk channel's TCP port's refusals.
    bulk: EverySecond,
}

impl ConnSlots {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        ConnSlots {
            slots: PeerSlots::new(CONNECTIONS_PER_PEER),
            metrics,
            too_many: EverySecond::default(),
            bad: EverySecond::default(),
            bulk: EverySecond::default(),
        }
    }

    /// `conn` sent a request that is late or not one (`what` names the protocol): close it
    /// (QUIC code 400), count it in `narmesh_mesh_refused_total{reason="bad-request"}` and log
    /// it at most once a second.
    pub fn bad_request(&self, conn: &Connection, what: &str) {
        self.metrics.refused("bad-request");
        if let Some(unlogged) = self.bad.allow() {
            tracing::warn!(
                "mesh {what}: bad request from {} ({unlogged} more bad requests meanwhile)",
                conn.remote_id()
            );
        }
        conn.close(400u32.into(), b"bad request");
    }

    /// A connection to the bulk channel's TCP port from `from` was refused for what it sent
    /// (`why`): a late, cut or malformed header or a bad range (`reason` `bad-request`), or a
    /// token the node does not know from that address (`unknown-ticket`: guessed, expired, or
    /// issued before a restart). Counted, and logged at most once a second.
    pub fn bad_bulk_header(&self, from: SocketAddr, reason: &'static str, why: &str) {
        self.metrics.refused(reason);
        if let Some(unlogged) = self.bulk.allow() {
            tracing::warn!(
                "mesh bulk: {from}: {why}; closed ({unlogged} more bulk connections refused \
                 meanwhile)"
            );
        }
    }

    /// The bulk channel's TCP port has its `cap` connections `what` (open; without a header
    /// from that address): one from `from` is closed (the fetcher takes that range over QUIC),
    /// counted as `too-many-connections` and logged at most once a second.
    pub fn too_many_bulk(&self, from: SocketAddr, cap: usize, what: &str) {
        self.metrics.refused("too-many-connections");
        if let Some(unlogged) = self.bulk.allow() {
            tracing::info!(
                "mesh bulk: {cap} connections {what}; closed one from {from} ({unlogged} more \
                 bulk connections refused meanwhile)"
            );
        }
    }

    /// A place for one more connection of its peer, or `None` (the connection is then closed).
    pub fn take(&self, conn: &Connection) -> Option<PeerSlot> {
        let peer = conn.remote_id();
        if let Some(slot) = self.slots.take(peer) {
            return Some(slot);
        }
        self.metrics.refused("too-many-connections");
        if let Some(unlogged) = self.too_many.allow() {
            tracing::warn!(
                "mesh: {peer} has {CONNECTIONS_PER_PEER} connections open already; refused \
                 another ({unlogged} more refused meanwhile)"
            );
        }
        conn.close(VarInt::from_u32(429), b"too many connections");
        None
    }
}

impl<K: std::hash::Hash + Eq + Copy> Drop for PeerSlot<K> {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}
