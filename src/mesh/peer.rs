//! The client side of NAR transfer: one pooled QUIC connection per provider and protocol
//! version (reused within [`REUSE_WITHIN`] of its last use, dialled once however many ask for
//! it at the same time), streams side by side on it, and a
//! deadline on every step (connect, open a stream, the answer's head, each piece of data).
//! Version 2 asks for leaves and ranges; a provider that speaks only version 1 (an older node)
//! is asked for the whole NAR from an offset. With the bulk channel on, a range may come over
//! TCP instead, with a ticket asked on `narmesh/bulk/1`; both arrive as a [`Source`] of pieces.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, RecvStream};
use iroh::{Endpoint, EndpointId};
use narmesh_proto::sync::{
    BULK_ALPN, BulkAsk, BulkHeader, BulkReply, NAR_ALPN, NAR_ALPN_V1, NarHeader, NarQuery,
    NarReply, NarRequest, NarWhat,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::endpoint::REUSE_WITHIN;
use super::wire;

/// Deadline of a connection's handshake.
pub const CONNECT: Duration = Duration::from_secs(5);
/// Deadline of opening a stream and of an answer's head.
pub const ANSWER: Duration = Duration::from_secs(10);
/// A provider that sends nothing for this long is given up on.
pub const STALL: Duration = Duration::from_secs(10);

/// What went wrong with a provider.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("connect: {0}")]
    Connect(String),
    /// The provider speaks only version 1 of the NAR protocol.
    #[error("speaks only version 1")]
    OnlyV1,
    #[error("{0}")]
    Stream(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("does not hold it")]
    NotFound,
    #[error("busy")]
    Busy,
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl PeerError {
    /// True if the provider misbehaved (as opposed to being unreachable or busy).
    pub fn misbehaved(&self) -> bool {
        matches!(self, PeerError::Protocol(_))
    }
}

/// The pool's key for bulk ticket connections.
pub const BULK: u8 = 3;

/// Where a range's bytes come from: a QUIC stream, or a bulk TCP connection.
#[derive(Debug)]
pub enum Source {
    Quic(RecvStream),
    Tcp(tokio::net::TcpStream, bytes::BytesMut),
}

/// Room a bulk read needs before the buffer is renewed.
const MIN_READ: usize = 64 << 10;

impl Source {
    /// The next piece (at most `max` bytes), within the stall deadline; `None` at the end.
    pub async fn piece(&mut self, max: usize) -> Result<Option<bytes::Bytes>, PeerError> {
        match self {
            Source::Quic(recv) => next_piece(recv, max).await,
            Source::Tcp(stream, buf) => {
                // Pieces are split off one buffer and keep it alive until the last is written:
                // a fresh one is taken only once this one is all but used, so the pieces of a
                // range pin about the bytes they hold, not a buffer of `max` each.
                if buf.capacity() - buf.len() < MIN_READ.min(max) {
                    buf.reserve(max);
                }
                match tokio::time::timeout(STALL, stream.read_buf(buf)).await {
                    Err(_) => Err(PeerError::Timeout("stalled")),
                    Ok(Err(e)) => Err(PeerError::Stream(format!("bulk: {e}"))),
                    Ok(Ok(0)) => Ok(None),
                    Ok(Ok(_)) => Ok(Some(buf.split().freeze())),
                }
            }
        }
    }
}

/// Open connections to providers, by (provider, protocol version).
#[derive(Debug)]
pub struct Pool {
    ep: Endpoint,
    /// Each with when it was last asked for: one idle past [`REUSE_WITHIN`] is not used again
    /// (the provider lets it go at its [`IDLE`](super::endpoint::IDLE)).
    conns: Arc<Mutex<Conns>>,
    /// Dials under way: whoever else needs the same connection meanwhile waits for that dial
    /// (32 fetches starting at once would dial 32 connections, and a provider lets one peer
    /// have 8: the rest were refused, and their fetches failed).
    dialing: Arc<Mutex<HashMap<(EndpointId, u8), Dial>>>,
    /// Where dials run: a task of their own on the mesh's runtime, so one ends (and leaves
    /// `dialing`) even if everyone waiting for it gave up, and its timer is never another
    /// runtime's (on-demand fetches run on the HTTP thread's).
    rt: tokio::runtime::Handle,
}

type Conns = HashMap<(EndpointId, u8), (Connection, Instant)>;

/// A dial shared by everyone who asked for its connection while it was under way.
type Dial =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Connection, PeerError>>>;

/// Takes a dial that never ended (its task panicked or was dropped) out of `dialing`, so its
/// error is not what every later ask for that connection gets.
struct Forget {
    dialing: Arc<Mutex<HashMap<(EndpointId, u8), Dial>>>,
    /// Cleared once the dial ended and left `dialing` itself.
    key: Option<(EndpointId, u8)>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.dialing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    }
}

async fn within<T, E: std::fmt::Display>(
    d: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, PeerError> {
    match tokio::time::timeout(d, f).await {
        Err(_) => Err(PeerError::Timeout(what)),
        Ok(Err(e)) => Err(PeerError::Stream(format!("{what}: {e}"))),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Dial `peer` for NAR protocol `version` (1 or 2) or [`BULK`], under [`CONNECT`].
async fn dial(ep: Endpoint, peer: EndpointId, version: u8) -> Result<Connection, PeerError> {
    let alpn = match version {
        2 => NAR_ALPN,
        BULK => BULK_ALPN,
        _ => NAR_ALPN_V1,
    };
    match tokio::time::timeout(CONNECT, ep.connect(peer, alpn)).await {
        Err(_) => Err(PeerError::Timeout("connect")),
        Ok(Err(e)) => {
            let msg = crate::error_chain(&e);
            // A node that does not serve the ALPN fails the handshake with "no application
            // protocol" (TLS alert 120).
            let no_alpn = msg.contains("application protocol") || msg.contains("120");
            if version == 2 && no_alpn {
                return Err(PeerError::OnlyV1);
            }
            if version == BULK && no_alpn {
                return Err(PeerError::Refused("no bulk channel".into()));
            }
            Err(PeerError::Connect(msg))
        }
        Ok(Ok(c)) => Ok(c),
    }
}

impl Pool {
    /// A pool dialling on the current runtime.
    pub fn new(ep: Endpoint) -> Self {
        Pool {
            ep,
            conns: Arc::default(),
            dialing: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    fn cached(&self, key: (EndpointId, u8)) -> Option<Connection> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get_mut(&key) {
            Some((c, used)) if c.close_reason().is_none() && used.elapsed() < REUSE_WITHIN => {
                *used = Instant::now();
                Some(c.clone())
            }
            // Streams still on a stale one keep it until they end.
            Some(_) => {
                conns.remove(&key);
                None
            }
            None => None,
        }
    }

    /// A connection to `peer` for protocol `version` (1 or 2 of NAR transfer, [`BULK`] for
    /// bulk tickets), reused while it is open.
    pub async fn conn(&self, peer: EndpointId, version: u8) -> Result<Connection, PeerError> {
        let key = (peer, version);
        if let Some(c) = self.cached(key) {
            return Ok(c);
        }
        let dial = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
            // A dial that ended just now left its connection in the pool first.
            if let Some(c) = self.cached(key) {
                return Ok(c);
            }
            dialing
                .entry(key)
                .or_insert_with(|| {
                    use futures::FutureExt as _;
                    let (ep, conns, dialing) =
                        (self.ep.clone(), self.conns.clone(), self.dialing.clone());
                    let task = self.rt.spawn(async move {
                        let mut forget = Forget {
                            dialing,
                            key: Some(key),
                        };
                        if crate::killpoint::fault("mesh.dial-panics") {
                            panic!("a dial panics (NARMESH_TEST_FAULT)");
                        }
                        let r = dial(ep, peer, version).await;
                        // Pooled and forgotten under the same lock, so a caller finds the one
                        // or the other; a failed dial is tried again by the next to ask.
                        forget.key = None;
                        let mut dialing = forget.dialing.lock().unwrap_or_else(|p| p.into_inner());
                        dialing.remove(&key);
                        if let Ok(c) = &r {
                            conns
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(key, (c.clone(), Instant::now()));
                        }
                        r
                    });
                    async move {
                        task.await
                            .unwrap_or_else(|e| Err(PeerError::Connect(format!("dial: {e}"))))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        dial.await
    }

    /// Forget `conn`, which failed (not a newer connection that took its place).
    fn drop_conn(&self, peer: EndpointId, version: u8, conn: &Connection) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns
            .get(&(peer, version))
            .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
        {
            conns.remove(&(peer, version));
        }
    }

    async fn ask(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        what: NarWhat,
    ) -> Result<(NarReply, RecvStream), PeerError> {
        let conn = self.conn(peer, 2).await?;
        let res = async {
            let (mut send, mut recv) = within(ANSWER, "open a stream", conn.open_bi()).await?;
            let q = NarQuery {
                version: narmesh_proto::MESH_PROTOCOL_VERSION,
                blake3,
                what,
            };
            within(ANSWER, "send the request", wire::write(&mut send, &q)).await?;
            send.finish()
                .map_err(|e| PeerError::Stream(e.to_string()))?;
            let reply: NarReply = match tokio::time::timeout(ANSWER, wire::read(&mut recv)).await {
                Err(_) => return Err(PeerError::Timeout("answer")),
                Ok(Err(e)) => return Err(PeerError::Protocol(format!("answer: {e}"))),
                Ok(Ok(r)) => r,
            };
            Ok((reply, recv))
        }
        .await;
        if matches!(&res, Err(PeerError::Stream(_) | PeerError::Timeout(_))) {
            self.drop_conn(peer, 2, &conn);
        }
        res
    }

    /// A ticket for `blake3` from `peer`'s bulk channel: the TCP address (the IP its mesh
    /// connection comes from) and the token.
    pub async fn bulk_ticket(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
    ) -> Result<(std::net::SocketAddr, [u8; 32]), PeerError> {
        let conn = self.conn(peer, BULK).await?;
        let res = async {
            let (mut send, mut recv) = within(ANSWER, "open a stream", conn.open_bi()).await?;
            within(
                ANSWER,
                "send the request",
                wire::write(&mut send, &BulkAsk { blake3 }),
            )
            .await?;
            send.finish()
                .map_err(|e| PeerError::Stream(e.to_string()))?;
            match tokio::time::timeout(ANSWER, wire::read(&mut recv)).await {
                Err(_) => Err(PeerError::Timeout("answer")),
                Ok(Err(e)) => Err(PeerError::Protocol(format!("answer: {e}"))),
                Ok(Ok(r)) => Ok(r),
            }
        }
        .await;
        if matches!(&res, Err(PeerError::Stream(_) | PeerError::Timeout(_))) {
            self.drop_conn(peer, BULK, &conn);
        }
        let (port, token) = match res? {
            BulkReply::Ticket { port, token, .. } => (port, token),
            BulkReply::NotFound => return Err(PeerError::NotFound),
            BulkReply::Busy => return Err(PeerError::Busy),
        };
        let ip = super::endpoint::remote_ip(&conn)
            .ok_or_else(|| PeerError::Connect("no direct IP path for the bulk channel".into()))?;
        Ok((std::net::SocketAddr::new(ip, port), token))
    }

    /// Range `start..end` over the bulk channel at `addr` with `token`.
    pub async fn bulk_range(
        addr: std::net::SocketAddr,
        token: [u8; 32],
        start: u64,
        end: u64,
    ) -> Result<Source, PeerError> {
        let mut stream = within(
            CONNECT,
            "bulk connect",
            tokio::net::TcpStream::connect(addr),
        )
        .await?;
        let _ = stream.set_nodelay(true);
        let head = BulkHeader { token, start, end }.encode();
        within(ANSWER, "bulk header", stream.write_all(&head)).await?;
        Ok(Source::Tcp(stream, bytes::BytesMut::new()))
    }

    /// The NAR's leaves (unchecked: the caller checks them against the BLAKE3).
    pub async fn leaves(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        size: u64,
    ) -> Result<Vec<u8>, PeerError> {
        let (reply, mut recv) = self.ask(peer, blake3, NarWhat::Leaves).await?;
        match reply {
            NarReply::Leaves { size: s } if s == size => {}
            NarReply::Leaves { size: s } => {
                return Err(PeerError::Protocol(format!(
                    "says the NAR is {s} bytes, not {size}"
                )));
            }
            other => return Err(refusal(other)),
        }
        let len = crate::chunks::groups(size) * 32;
        // Memory grows with the bytes that arrive, not all at once for a peer that stalls.
        let mut buf = Vec::with_capacity(len.min(64 << 10) as usize);
        let mut body = (&mut recv).take(len);
        let n = within(STALL, "leaves", body.read_to_end(&mut buf)).await?;
        if (n as u64) < len {
            return Err(PeerError::Protocol(format!(
                "sent {n} bytes of leaves, not {len}"
            )));
        }
        // Kept while the transfer runs: no more than its length (counted in fetch-memory).
        buf.shrink_to_fit();
        Ok(buf)
    }

    /// Ask for bytes `start..end`; returns the stream they follow on.
    pub async fn range(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        start: u64,
        end: u64,
    ) -> Result<RecvStream, PeerError> {
        let (reply, recv) = self
            .ask(peer, blake3, NarWhat::Range { start, end })
            .await?;
        match reply {
            NarReply::Range { len } if len == end - start => Ok(recv),
            NarReply::Range { len } => Err(PeerError::Protocol(format!(
                "offers {len} bytes, asked for {}",
                end - start
            ))),
            other => Err(refusal(other)),
        }
    }

    /// Version 1: the NAR from `offset` to its end; returns the stream the bytes follow on.
    pub async fn v1_from(
        &self,
        peer: EndpointId,
        blake3: [u8; 32],
        offset: u64,
        size: u64,
    ) -> Result<RecvStream, PeerError> {
        let conn = self.conn(peer, 1).await?;
        let (mut send, mut recv) = within(ANSWER, "open a stream", conn.open_bi()).await?;
        let req = NarRequest {
            version: 1,
            blake3,
            offset,
        };
        within(ANSWER, "send the request", wire::write(&mut send, &req)).await?;
        send.finish()
            .map_err(|e| PeerError::Stream(e.to_string()))?;
        let header: NarHeader = match tokio::time::timeout(ANSWER, wire::read(&mut recv)).await {
            Err(_) => return Err(PeerError::Timeout("answer")),
            Ok(Err(e)) => return Err(PeerError::Protocol(format!("answer: {e}"))),
            Ok(Ok(h)) => h,
        };
        match header {
            NarHeader::Found { size: s } if s == size - offset => Ok(recv),
            NarHeader::Found { size: s } => Err(PeerError::Protocol(format!(
                "offers {s} bytes, expected {}",
                size - offset
            ))),
            NarHeader::NotFound => Err(PeerError::NotFound),
            NarHeader::Error { message } => Err(PeerError::Refused(message)),
        }
    }
}

fn refusal(reply: NarReply) -> PeerError {
    match reply {
        NarReply::NotFound => PeerError::NotFound,
        NarReply::Busy => PeerError::Busy,
        NarReply::Error { message } => PeerError::Refused(message),
        other => PeerError::Protocol(format!("unexpected answer {other:?}")),
    }
}

/// The next piece of a data stream, within the stall deadline; `None` at its end.
pub async fn next_piece(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<bytes::Bytes>, PeerError> {
    match tokio::time::timeout(STALL, recv.read_chunk(max)).await {
        Err(_) => Err(PeerError::Timeout("stalled")),
        Ok(Err(e)) => Err(PeerError::Stream(crate::error_chain(&e))),
        Ok(Ok(c)) => Ok(c),
    }
}
