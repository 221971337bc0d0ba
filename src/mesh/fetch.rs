//! Fetching NARs from peers by BLAKE3 hash, verified: the bytes stream into the blob store
//! (which computes their BLAKE3) while their sha256 is computed; the NAR is kept and marked
//! local only if both match the signed record. A provider that fails, stalls or sends bad
//! data is logged and avoided for a while; the next one resumes at the same offset.
//! Optionally every byte is also handed on as it arrives (to the local Nix, on demand).

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointId};
use narmesh_proto::sync::{NAR_ALPN, NarHeader, NarRequest};
use sha2::Digest as _;
use tokio::sync::mpsc;

use super::wire;
use crate::blobs::BlobStore;
use crate::db::{Db, PathRecord};
use crate::nix::NarInfo;

/// How long a provider that misbehaved is skipped.
const AVOID_FOR: Duration = Duration::from_secs(60);
/// Attempts per provider while each attempt makes progress.
const RETRIES: u32 = 3;
/// Idle connections kept per provider.
const MAX_IDLE: usize = 4;
/// A provider that sends nothing for this long is given up on.
const STALL: Duration = Duration::from_secs(10);

/// Fetches NARs from peers into the blob store.
#[derive(Debug)]
pub struct Fetcher {
    pub ep: Endpoint,
    pub db: Db,
    pub blobs: BlobStore,
    avoid: Mutex<HashMap<EndpointId, Instant>>,
    /// Idle connections per provider, reused by later fetches (a NAR is one stream on a
    /// connection a fetch has to itself): a handshake per small NAR cost more than sending it.
    idle: Mutex<HashMap<EndpointId, Vec<Connection>>>,
}

/// Where the bytes of one fetch go.
struct Sinks<'a> {
    store: &'a mpsc::Sender<io::Result<Bytes>>,
    tee: Option<&'a mpsc::Sender<io::Result<Bytes>>>,
    sha: Hasher,
    got: u64,
}

/// sha256 on a thread of its own, so hashing runs beside receiving instead of after it.
struct Hasher {
    tx: Option<mpsc::Sender<Bytes>>,
    thread: Option<std::thread::JoinHandle<[u8; 32]>>,
}

impl Hasher {
    fn new() -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let thread = std::thread::Builder::new()
            .name("narmesh-fetch-sha256".into())
            .spawn(move || {
                let mut h = sha2::Sha256::new();
                while let Some(chunk) = rx.blocking_recv() {
                    h.update(&chunk);
                }
                h.finalize().into()
            })
            .ok();
        Hasher {
            tx: Some(tx),
            thread,
        }
    }

    /// Hash `chunk` (a cheap reference-counted clone goes to the thread).
    async fn update(&mut self, chunk: &Bytes) {
        if let Some(tx) = &self.tx
            && tx.send(chunk.clone()).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The digest of everything passed in; `None` if the thread failed.
    fn finish(&mut self) -> Option<[u8; 32]> {
        drop(self.tx.take());
        self.thread.take()?.join().ok()
    }
}

/// Size of the pieces handed to the blob store and the local reader.
const CHUNK: usize = 1 << 20;

impl Sinks<'_> {
    /// Hash a verified-later chunk and hand it on.
    async fn pass(&mut self, chunk: Bytes) -> Result<(), String> {
        self.sha.update(&chunk).await;
        self.got += chunk.len() as u64;
        if let Some(t) = self.tee
            && t.send(Ok(chunk.clone())).await.is_err()
        {
            // The local reader went away; finish the copy for later readers anyway.
            self.tee = None;
        }
        self.store
            .send(Ok(chunk))
            .await
            .map_err(|_| "blob store stopped".to_owned())
    }
}

impl Fetcher {
    pub fn new(ep: Endpoint, db: Db, blobs: BlobStore) -> Self {
        Fetcher {
            ep,
            db,
            blobs,
            avoid: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// An idle connection to `peer` that is still open, if any.
    fn take_idle(&self, peer: &EndpointId) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(peer)?;
        while let Some(c) = list.pop() {
            if c.close_reason().is_none() {
                return Some(c);
            }
        }
        None
    }

    /// Give a connection whose exchange ended cleanly back for later fetches.
    fn put_idle(&self, peer: EndpointId, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(peer).or_default();
        if list.len() < MAX_IDLE {
            list.push(conn);
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

    /// Fetch the NAR of `rec` from its providers, verify it, keep it, mark it local.
    pub async fn fetch(
        &self,
        rec: &PathRecord,
        tee: Option<mpsc::Sender<io::Result<Bytes>>>,
    ) -> Result<(), String> {
        let info = NarInfo::parse(&rec.narinfo).map_err(|e| e.to_string())?;
        let me = self.ep.id();
        let providers: Vec<EndpointId> = rec
            .providers
            .iter()
            .filter_map(|p| EndpointId::from_bytes(p).ok())
            .filter(|p| *p != me)
            .collect();
        let mut order: Vec<EndpointId> = providers
            .iter()
            .filter(|p| !self.avoided(p))
            .copied()
            .collect();
        order.extend(providers.iter().filter(|p| self.avoided(p)).copied());
        if order.is_empty() {
            return Err(format!("{}: no provider", rec.store_path));
        }
        let (tx, rx) = mpsc::channel(16);
        let blobs = self.blobs.clone();
        let import = tokio::spawn(async move { blobs.import_stream(rx).await });
        let mut sinks = Sinks {
            store: &tx,
            tee: tee.as_ref(),
            sha: Hasher::new(),
            got: 0,
        };
        let mut used = Vec::new();
        let started = Instant::now();
        'providers: for p in order {
            used.push(p);
            // A provider whose connection drops after sending something is asked again (from
            // where it stopped) a few times before the next provider is tried.
            for attempt in 1..=RETRIES {
                let before = sinks.got;
                match self.pull(p, rec, &mut sinks).await {
                    Ok(()) => break 'providers,
                    Err(e) if sinks.got > before && attempt < RETRIES => {
                        tracing::info!(
                            "mesh: {}: {p} stopped at byte {} ({e}); resuming",
                            rec.store_path,
                            sinks.got
                        );
                    }
                    Err(e) => {
                        self.avoid(p, &format!("fetching {}: {e}", rec.store_path));
                        break;
                    }
                }
            }
        }
        if sinks.got != rec.nar_size {
            let _ = tx.send(Err(io::Error::other("incomplete"))).await;
            drop(tx);
            let _ = import.await;
            if let Some(t) = &tee {
                let _ = t
                    .send(Err(io::Error::other("no provider could send the NAR")))
                    .await;
            }
            return Err(format!(
                "{}: no provider sent the whole NAR",
                rec.store_path
            ));
        }
        let sha = sinks.sha.finish().ok_or("the sha256 thread failed")?;
        // `tee` loses its sender when the local reader went away mid-way.
        let tee = if sinks.tee.is_some() { tee } else { None };
        drop(tx);
        let received = started.elapsed();
        let blake = import
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            "{}: received in {received:?}, stored in {:?}",
            rec.store_path,
            started.elapsed()
        );
        if sha != info.nar_hash.0 || blake != rec.blake3 {
            for p in used {
                self.avoid(
                    p,
                    &format!(
                        "{}: sent a NAR that does not match its signed hash",
                        rec.store_path
                    ),
                );
            }
            if let Some(t) = &tee {
                let _ = t
                    .send(Err(io::Error::other("the NAR failed verification")))
                    .await;
            }
            return Err(format!(
                "{}: NAR from peers failed verification; not kept",
                rec.store_path
            ));
        }
        // The local reader has every byte and they check out: its response ends now, not
        // after the NAR is made durable here.
        drop(tee);
        self.blobs
            .keep(&rec.blake3)
            .await
            .map_err(|e| e.to_string())?;
        self.blobs.sync().await.map_err(|e| e.to_string())?;
        let db = self.db.clone();
        let hash = rec.hash_part().to_owned();
        tokio::task::spawn_blocking(move || db.mark_local(&hash))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "fetched {} ({} bytes) from peers, verified",
            rec.store_path,
            rec.nar_size
        );
        Ok(())
    }

    /// Pull the rest of the NAR (from `sinks.got` on) from one provider, on an idle connection
    /// if there is one. A reused connection that fails before sending anything may have gone
    /// stale (the peer restarted): the provider is then asked once more on a new connection.
    async fn pull(
        &self,
        peer: EndpointId,
        rec: &PathRecord,
        sinks: &mut Sinks<'_>,
    ) -> Result<(), String> {
        if let Some(conn) = self.take_idle(&peer) {
            let before = sinks.got;
            match self.pull_on(&conn, rec, sinks).await {
                Ok(()) => {
                    self.put_idle(peer, conn);
                    return Ok(());
                }
                Err(e) if sinks.got > before => return Err(e),
                Err(e) => {
                    tracing::debug!("mesh: reused connection to {peer} failed ({e}); reconnecting")
                }
            }
        }
        let conn = self
            .ep
            .connect(peer, NAR_ALPN)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        self.pull_on(&conn, rec, sinks).await?;
        self.put_idle(peer, conn);
        Ok(())
    }

    /// One exchange on `conn`: ask for the NAR from `sinks.got` on and pass the bytes on.
    async fn pull_on(
        &self,
        conn: &Connection,
        rec: &PathRecord,
        sinks: &mut Sinks<'_>,
    ) -> Result<(), String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| crate::error_chain(&e))?;
        let req = NarRequest {
            version: narmesh_proto::MESH_PROTOCOL_VERSION,
            blake3: rec.blake3,
            offset: sinks.got,
        };
        wire::write(&mut send, &req)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let header: NarHeader = tokio::time::timeout(STALL, wire::read(&mut recv))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        let want = rec.nar_size - sinks.got;
        match header {
            NarHeader::Found { size } if size == want => {}
            NarHeader::Found { size } => {
                return Err(format!("offers {size} bytes, expected {want}"));
            }
            NarHeader::NotFound => return Err("does not hold it".into()),
            NarHeader::Error { message } => return Err(message),
        }
        // QUIC hands over small pieces: gather them into large chunks before passing them on.
        let mut buf = bytes::BytesMut::with_capacity(CHUNK);
        let mut received = sinks.got;
        while received < rec.nar_size {
            let piece = tokio::time::timeout(STALL, recv.read_chunk(CHUNK))
                .await
                .map_err(|_| "stalled".to_owned())?
                .map_err(|e| crate::error_chain(&e))?
                .ok_or("stream ended early")?;
            received += piece.len() as u64;
            if received > rec.nar_size {
                return Err("sent more than the NAR's size".into());
            }
            buf.extend_from_slice(&piece);
            if buf.len() >= CHUNK || received == rec.nar_size {
                sinks.pass(buf.split().freeze()).await?;
            }
        }
        Ok(())
    }
}
