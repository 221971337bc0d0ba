//! A hostile peer for the mesh tests: a real iroh endpoint that the honest nodes allow (it is in
//! their `peers`), with or without a Nix key they trust. It speaks our protocols from our wire
//! types, but lies: it replays trusted narinfos with BLAKE3 hashes and sizes of its choosing,
//! answers catch-up forever, serves junk NAR bytes (or a consistent fake NAR for a BLAKE3 it
//! made up, or honest bytes with one wrong in the middle of each range), reads NARs one byte a
//! second, and opens hundreds of streams. It can also play a node of version 1 (`e5a6e05`),
//! speaking only the `/1` protocols, with honest bytes.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{Connection, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey};
use narmesh::chunks::GROUP;
use narmesh_proto::gossip::{PathAnnounce, ProviderStatement, v1};
use narmesh_proto::sync::{
    NAR_ALPN, NAR_ALPN_V1, NarHeader, NarQuery, NarReply, NarRequest, NarWhat, SYNC_ALPN,
    SYNC_ALPN_V1, SyncBatch, SyncBatchV2, SyncRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the hostile peer does when asked.
#[derive(Default)]
pub struct Mode {
    /// Answer catch-up with `entries` junk announcements and `more: true`, forever.
    pub endless_catchup: AtomicBool,
    /// Answer NAR ranges with junk bytes.
    pub junk_ranges: AtomicBool,
    /// Answer NAR ranges with the honest bytes, but one byte wrong in the second chunk group of
    /// each range: it lies in the middle of a stream that started well.
    pub lie_mid_range: AtomicBool,
    /// Answer NAR ranges with the honest bytes of their first chunk group, then one byte every
    /// 5 s (each read of the fetcher gets something within its deadline), for at most 10 min.
    pub drip_ranges: AtomicBool,
    /// Answer `NotFound` for a NAR it does not serve (as an honest provider does once Nix GC
    /// took the path), instead of junk.
    pub not_found: AtomicBool,
    /// The ranges it was asked for (version 2), in order.
    pub asked: Mutex<Vec<(u64, u64)>>,
    /// NARs it serves consistently (leaves and ranges that match), by BLAKE3: honest bytes, or
    /// a fake NAR whose BLAKE3 it made up.
    pub nars: Mutex<HashMap<[u8; 32], Vec<u8>>>,
    /// Speak only version 1 (`/1` ALPNs; `/2` is not served).
    pub v1_only: bool,
    /// What it answers catch-up with (version 1 entries, when playing an old node).
    pub log_v1: Mutex<Vec<v1::Announce>>,
    pub log_v2: Mutex<Vec<PathAnnounce>>,
    /// Entries it can send in one catch-up batch (0: all): a request for more gets no answer,
    /// as a node of the previous release gave none when a batch outgrew its frame. Within it,
    /// batches of what was asked for.
    pub max_batch: std::sync::atomic::AtomicU32,
    /// The `limit` of every catch-up request, in order.
    pub limits: Mutex<Vec<u32>>,
}

/// A hostile (or old) peer on loopback.
pub struct Hostile {
    pub rt: tokio::runtime::Runtime,
    pub ep: Endpoint,
    router: Option<Router>,
    pub gossip: iroh_gossip::Gossip,
    pub key: SecretKey,
    /// What honest nodes put in `peers`.
    pub address: String,
    pub mode: Arc<Mode>,
    book: MemoryLookup,
}

async fn read_frame<T: serde::de::DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> Option<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let len = narmesh_proto::frame::payload_len(len).ok()?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.ok()?;
    narmesh_proto::frame::decode(&buf).ok()
}

async fn write_frame<T: serde::Serialize>(w: &mut (impl AsyncWrite + Unpin), msg: &T) {
    if let Ok(bytes) = narmesh_proto::frame::encode(msg) {
        let _ = w.write_all(&bytes).await;
    }
}

/// The leaves of `data` as our wire carries them (32 bytes per 16 KiB chunk group).
pub fn leaves_of(data: &[u8]) -> Vec<u8> {
    narmesh::chunks::Leaves::of(data).to_bytes()
}

#[derive(Clone)]
struct Sync(Arc<Mode>, u8);

impl std::fmt::Debug for Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostileSync")
    }
}

impl ProtocolHandler for Sync {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Some(req) = read_frame::<SyncRequest>(&mut recv).await else {
                return Ok(());
            };
            if self.0.endless_catchup.load(Ordering::SeqCst) {
                // Junk that decodes, `next` moving just enough, and always more.
                let n = 512;
                let junk = PathAnnounce {
                    narinfo: "StorePath: /nix/store/00000000000000000000000000000000-junk\n".into(),
                    blake3: [1; 32],
                    nar_size: 1,
                    bindings: vec![],
                    upstream_refs: vec![],
                    providers: vec![],
                };
                write_frame(
                    &mut send,
                    &SyncBatchV2 {
                        entries: vec![junk; n],
                        next: req.after + n as u64,
                        more: true,
                    },
                )
                .await;
            } else if self.1 == 2 {
                self.0.limits.lock().unwrap().push(req.limit);
                let max = self.0.max_batch.load(Ordering::SeqCst);
                if max > 0 && req.limit > max {
                    // No answer: the stream ends.
                    let _ = send.finish();
                    continue;
                }
                let log = self.0.log_v2.lock().unwrap().clone();
                let from = (req.after as usize).min(log.len());
                let to = if max > 0 {
                    (from + req.limit as usize).min(log.len())
                } else {
                    log.len()
                };
                write_frame(
                    &mut send,
                    &SyncBatchV2 {
                        entries: log[from..to].to_vec(),
                        next: to as u64,
                        more: to < log.len(),
                    },
                )
                .await;
            } else {
                let log = self.0.log_v1.lock().unwrap().clone();
                let from = (req.after as usize).min(log.len());
                write_frame(
                    &mut send,
                    &SyncBatch {
                        entries: log[from..].to_vec(),
                        next: log.len() as u64,
                        more: false,
                    },
                )
                .await;
            }
            let _ = send.finish();
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Nar(Arc<Mode>, u8);

impl std::fmt::Debug for Nar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostileNar")
    }
}

impl ProtocolHandler for Nar {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mode = self.0.clone();
            let version = self.1;
            tokio::spawn(async move {
                if version == 1 {
                    let Some(req) = read_frame::<NarRequest>(&mut recv).await else {
                        return;
                    };
                    let nar = mode.nars.lock().unwrap().get(&req.blake3).cloned();
                    match nar {
                        Some(nar) if (req.offset as usize) <= nar.len() => {
                            let rest = &nar[req.offset as usize..];
                            write_frame(
                                &mut send,
                                &NarHeader::Found {
                                    size: rest.len() as u64,
                                },
                            )
                            .await;
                            let _ = send.write_all(rest).await;
                        }
                        _ => write_frame(&mut send, &NarHeader::NotFound).await,
                    }
                    let _ = send.finish();
                    return;
                }
                let Some(q) = read_frame::<NarQuery>(&mut recv).await else {
                    return;
                };
                let nar = mode.nars.lock().unwrap().get(&q.blake3).cloned();
                match (q.what, nar) {
                    (NarWhat::Range { start, end }, None)
                        if mode.not_found.load(Ordering::SeqCst) =>
                    {
                        mode.asked.lock().unwrap().push((start, end));
                        write_frame(&mut send, &NarReply::NotFound).await;
                    }
                    (NarWhat::Leaves, Some(nar)) => {
                        write_frame(
                            &mut send,
                            &NarReply::Leaves {
                                size: nar.len() as u64,
                            },
                        )
                        .await;
                        let _ = send.write_all(&leaves_of(&nar)).await;
                    }
                    (NarWhat::Range { start, end }, nar) => {
                        mode.asked.lock().unwrap().push((start, end));
                        let len = end.saturating_sub(start);
                        write_frame(&mut send, &NarReply::Range { len }).await;
                        let mut body = match nar {
                            Some(n) if !mode.junk_ranges.load(Ordering::SeqCst) => {
                                n[start as usize..(end as usize).min(n.len())].to_vec()
                            }
                            _ => vec![0x5a; len as usize],
                        };
                        let lie_at = GROUP as usize + 100;
                        if mode.lie_mid_range.load(Ordering::SeqCst) && body.len() > lie_at {
                            body[lie_at] ^= 0xff;
                        }
                        if mode.drip_ranges.load(Ordering::SeqCst) {
                            let first = body.len().min(GROUP as usize);
                            let _ = send.write_all(&body[..first]).await;
                            for b in body[first..].iter().take(120) {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                if send.write_all(std::slice::from_ref(b)).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        let _ = send.write_all(&body).await;
                    }
                    (NarWhat::Leaves, None) => write_frame(&mut send, &NarReply::NotFound).await,
                }
                let _ = send.finish();
            });
        }
        Ok(())
    }
}

impl Hostile {
    /// Start a hostile peer on loopback (its endpoint key fixed by `seed`).
    pub fn start(seed: u8, v1_only: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let key = SecretKey::from_bytes(&[seed; 32]);
        let mode = Arc::new(Mode {
            v1_only,
            ..Default::default()
        });
        let book = MemoryLookup::new();
        let (ep, router, gossip) = rt.block_on(async {
            let ep = Endpoint::builder(presets::Minimal)
                .secret_key(key.clone())
                .relay_mode(RelayMode::Disabled)
                .clear_address_lookup()
                .address_lookup(book.clone())
                .clear_ip_transports()
                .bind_addr("127.0.0.1:0")
                .expect("bind addr")
                .bind()
                .await
                .expect("bind");
            let gossip = iroh_gossip::Gossip::builder()
                .max_message_size(70 * 1024)
                .spawn(ep.clone());
            let mut r = Router::builder(ep.clone())
                .accept(iroh_gossip::ALPN, gossip.clone())
                .accept(SYNC_ALPN_V1, Sync(mode.clone(), 1))
                .accept(NAR_ALPN_V1, Nar(mode.clone(), 1));
            if !v1_only {
                r = r
                    .accept(SYNC_ALPN, Sync(mode.clone(), 2))
                    .accept(NAR_ALPN, Nar(mode.clone(), 2));
            }
            (ep.clone(), r.spawn(), gossip)
        });
        let port = ep.bound_sockets()[0].port();
        let address = format!("{}@127.0.0.1:{port}", key.public());
        Hostile {
            rt,
            ep,
            router: Some(router),
            gossip,
            key,
            address,
            mode,
            book,
        }
    }

    pub fn id(&self) -> [u8; 32] {
        *self.key.public().as_bytes()
    }

    pub fn endpoint_id(&self) -> String {
        self.key.public().to_string()
    }

    fn addr_of(&self, peer: &str) -> EndpointAddr {
        let (id, addr) = peer.split_once('@').expect("peer address");
        let id: EndpointId = id.parse().expect("endpoint id");
        let a = EndpointAddr::new(id).with_ip_addr(addr.parse().expect("socket address"));
        self.book.add_endpoint_info(a.clone());
        a
    }

    /// A statement, signed by this peer's endpoint key, that it holds a NAR.
    pub fn holds(&self, blake3: &[u8; 32]) -> ProviderStatement {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let msg = ProviderStatement::signed_bytes(blake3, true, at_ms);
        ProviderStatement {
            id: self.id(),
            holds: true,
            at_ms,
            sig: self.key.sign(&msg).to_bytes().to_vec(),
        }
    }

    /// The honest log of `peer` (catch-up, version 2): announcements to replay.
    pub fn catch_up_from(&self, peer: &str) -> Vec<PathAnnounce> {
        let addr = self.addr_of(peer);
        self.rt.block_on(async {
            let conn = self
                .ep
                .connect(addr, SYNC_ALPN)
                .await
                .expect("connect sync");
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            write_frame(
                &mut send,
                &SyncRequest {
                    version: 2,
                    after: 0,
                    limit: 512,
                },
            )
            .await;
            let _ = send.finish();
            let batch: SyncBatchV2 = read_frame(&mut recv).await.expect("batch");
            batch.entries
        })
    }

    /// Say `messages` (encoded gossip messages) on the cluster's topic, through `peers`.
    pub fn gossip(&self, peers: &[String], messages: Vec<Vec<u8>>) {
        let ids: Vec<EndpointId> = peers.iter().map(|p| self.addr_of(p).id).collect();
        let topic =
            iroh_gossip::TopicId::from_bytes(*blake3::hash(b"narmesh-cluster:narmesh").as_bytes());
        self.rt.block_on(async {
            let (sender, mut receiver) = self
                .gossip
                .subscribe(topic, ids)
                .await
                .expect("subscribe")
                .split();
            let _ = tokio::time::timeout(Duration::from_secs(5), receiver.joined()).await;
            for m in messages {
                sender.broadcast(Bytes::from(m)).await.expect("broadcast");
            }
            // Let the messages out before the subscription is dropped.
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
    }

    /// Open `n` streams on a NAR connection to `peer` and send nothing on them; they stay open
    /// until `hold` has passed.
    pub fn flood_streams(&self, peer: &str, n: usize, hold: Duration) {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        self.rt.spawn(async move {
            let Ok(conn) = ep.connect(addr, NAR_ALPN).await else {
                return;
            };
            let mut kept = Vec::new();
            for _ in 0..n {
                match tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await {
                    Ok(Ok((mut send, recv))) => {
                        let _ = send.write_all(&[1, 0]).await;
                        kept.push((send, recv));
                    }
                    _ => break,
                }
            }
            tokio::time::sleep(hold).await;
            drop(kept);
        });
    }

    /// On one new NAR connection to `peer`, ask for the whole NAR `blake3` (`size` bytes) on `n`
    /// streams, and read each answer's header and nothing more until `hold` has passed: the
    /// sender stalls once a stream's window is full. Returns how many answered `Range` and how
    /// many `Busy` within 3 s (the others got no answer: they wait for a place).
    pub fn stalled_ranges(
        &self,
        peer: &str,
        blake3: [u8; 32],
        size: u64,
        n: usize,
        hold: Duration,
    ) -> (usize, usize) {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<bool>>();
        self.rt.spawn(async move {
            let Ok(conn) = ep.connect(addr, NAR_ALPN).await else {
                return;
            };
            let mut streams = tokio::task::JoinSet::new();
            for _ in 0..n {
                let (conn, tx) = (conn.clone(), tx.clone());
                streams.spawn(async move {
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    let what = NarWhat::Range {
                        start: 0,
                        end: size,
                    };
                    write_frame(
                        &mut send,
                        &NarQuery {
                            version: 2,
                            blake3,
                            what,
                        },
                    )
                    .await;
                    let _ = send.finish();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(3),
                        read_frame::<NarReply>(&mut recv),
                    )
                    .await;
                    let _ = tx.send(match reply {
                        Ok(Some(NarReply::Range { .. })) => Some(true),
                        Ok(Some(NarReply::Busy)) => Some(false),
                        _ => None,
                    });
                    drop(tx);
                    tokio::time::sleep(hold).await;
                    drop((send, recv));
                });
            }
            drop(tx);
            while streams.join_next().await.is_some() {}
        });
        self.rt.block_on(async {
            let (mut ranges, mut busy) = (0, 0);
            while let Some(answer) = rx.recv().await {
                match answer {
                    Some(true) => ranges += 1,
                    Some(false) => busy += 1,
                    None => {}
                }
            }
            (ranges, busy)
        })
    }

    /// Open `n` more NAR connections to `peer`, kept until `hold` has passed; returns how many
    /// `peer` closed with code 429 (too many connections) within 2 s.
    pub fn connections(&self, peer: &str, n: usize, hold: Duration) -> usize {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        let conns: Vec<Connection> = self.rt.block_on(async move {
            let mut conns = Vec::new();
            for _ in 0..n {
                if let Ok(c) = ep.connect(addr.clone(), NAR_ALPN).await {
                    conns.push(c);
                }
            }
            conns
        });
        std::thread::sleep(Duration::from_secs(2));
        let refused = conns
            .iter()
            .filter(|c| {
                matches!(c.close_reason(),
                    Some(iroh::endpoint::ConnectionError::ApplicationClosed(a))
                        if a.error_code == iroh::endpoint::VarInt::from_u32(429))
            })
            .count();
        self.rt.spawn(async move {
            tokio::time::sleep(hold).await;
            drop(conns);
        });
        refused
    }

    /// Open a connection to `peer` on each of `alpns` and send nothing on it; after `wait`,
    /// how each has ended: the QUIC application code and reason `peer` closed it with
    /// (`u64::MAX` and the error for any other end), or `None` while it is still open.
    pub fn idle_connections(
        &self,
        peer: &str,
        alpns: &[&'static [u8]],
        wait: Duration,
    ) -> Vec<Option<(u64, String)>> {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        let alpns = alpns.to_vec();
        let conns: Vec<Connection> = self.rt.block_on(async move {
            let mut conns = Vec::new();
            for alpn in alpns {
                conns.push(ep.connect(addr.clone(), alpn).await.expect("connect"));
            }
            conns
        });
        std::thread::sleep(wait);
        conns
            .iter()
            .map(|c| match c.close_reason() {
                None => None,
                Some(iroh::endpoint::ConnectionError::ApplicationClosed(a)) => Some((
                    a.error_code.into_inner(),
                    String::from_utf8_lossy(&a.reason).into_owned(),
                )),
                Some(e) => Some((u64::MAX, e.to_string())),
            })
            .collect()
    }

    /// Open `n` NAR connections to `peer` one after another, each sending `request`'s bytes on
    /// a stream it keeps open; returns how many `peer` closed with code 400 (bad request)
    /// within 2 s.
    pub fn bad_requests(&self, peer: &str, n: usize, request: &[u8]) -> usize {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        let request = request.to_vec();
        self.rt.block_on(async move {
            let mut closed = 0;
            for _ in 0..n {
                let Ok(conn) = ep.connect(addr.clone(), NAR_ALPN).await else {
                    continue;
                };
                let stream = match conn.open_bi().await {
                    Ok((mut send, recv)) => {
                        let _ = send.write_all(&request).await;
                        Some((send, recv))
                    }
                    Err(_) => None,
                };
                let reason = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                drop(stream);
                if matches!(reason,
                    Ok(iroh::endpoint::ConnectionError::ApplicationClosed(a))
                        if a.error_code == iroh::endpoint::VarInt::from_u32(400))
                {
                    closed += 1;
                }
            }
            closed
        })
    }

    /// Ask `peer` for the whole NAR `blake3` of `size` bytes on `n` streams, and read each one
    /// byte a second for `hold`.
    pub fn slow_readers(&self, peer: &str, blake3: [u8; 32], size: u64, n: usize, hold: Duration) {
        let addr = self.addr_of(peer);
        let ep = self.ep.clone();
        self.rt.spawn(async move {
            let Ok(conn) = ep.connect(addr, NAR_ALPN).await else {
                return;
            };
            let end = size.min(1 << 20);
            for _ in 0..n {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    write_frame(
                        &mut send,
                        &NarQuery {
                            version: 2,
                            blake3,
                            what: NarWhat::Range { start: 0, end },
                        },
                    )
                    .await;
                    let _ = send.finish();
                    let started = std::time::Instant::now();
                    let mut b = [0u8; 1];
                    while started.elapsed() < hold {
                        if recv.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
            }
        });
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(r) = self.router.take() {
            let _ = self.rt.block_on(r.shutdown());
        }
    }
}
