//! The server side of NAR transfer, both versions: a NAR this node holds (an own path served
//! from the local Nix store, or a NAR file) and has a record of, read through the storage's
//! verified reader, so corrupt or tampered bytes are never sent. Version 2 answers leaves and
//! ranges of whole chunk groups; version 1 the whole NAR from an offset. Streams of one
//! connection are served side by side, at most [`STREAMS_PER_CONNECTION`] at once, and at most
//! [`MAX_SERVING`] across all peers and [`SERVING_PER_PEER`] to one peer (more get `Busy`);
//! every write has a deadline, a connection with no stream for [`IDLE`] is let go, and every
//! byte waits for the node's upload budget when `[mesh] serve-rate` sets one.

use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use narmesh_proto::sync::{NarHeader, NarQuery, NarReply, NarRequest, NarWhat};

use super::endpoint::{IDLE, let_go_idle};
use super::wire;
use crate::chunks::GROUP;
use crate::metrics::{Metrics, SourceLabels};
use crate::storage::{Held, Storage};

/// Streams served at once across all peers.
pub const MAX_SERVING: usize = 64;
/// Streams one peer may have served at once over all its connections: however many it opens,
/// it leaves a quarter of the places to the others. An honest fetcher stays below it (at most
/// 32 ranges in flight with the default `[mesh] fetch-memory`, and a leaves request each for
/// a moment); one that reaches it gets `Busy` and asks again shortly.
pub const SERVING_PER_PEER: usize = MAX_SERVING * 3 / 4;
/// Streams of one connection served at once.
pub const STREAMS_PER_CONNECTION: usize = 16;
/// A request must arrive within this.
const REQUEST: Duration = Duration::from_secs(10);
/// A peer that takes no data for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(20);
/// How long a stream whose bytes are all written waits for the peer to acknowledge them before
/// it counts as done (a stream's window, 1.25 MB, takes 50 s at 200 kbit/s).
const DELIVERY: Duration = Duration::from_secs(60);

/// Serves NARs by BLAKE3 hash, version `v` (1 or 2).
#[derive(Debug, Clone)]
pub struct NarServer {
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Each peer's share of `slots`, at most [`SERVING_PER_PEER`].
    pub serving_by_peer: super::endpoint::PeerSlots,
    pub version: u8,
    pub per_peer: super::endpoint::ConnSlots,
    /// `[mesh] serve-rate`, shared by every stream served.
    pub pacer: Option<Arc<super::pace::Pacer>>,
}

fn user(e: impl std::fmt::Display) -> AcceptError {
    AcceptError::from_err(std::io::Error::other(e.to_string()))
}

impl ProtocolHandler for NarServer {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let Some(_slot) = self.per_peer.take(&conn) else {
            return Ok(());
        };
        let mut streams = tokio::task::JoinSet::new();
        let per_conn = Arc::new(tokio::sync::Semaphore::new(STREAMS_PER_CONNECTION));
        loop {
            // Idle: no stream served, none asked for within IDLE (recounted at every event).
            tokio::select! {
                next = conn.accept_bi() => {
                    let Ok((send, recv)) = next else { break };
                    let Ok(permit) = per_conn.clone().acquire_owned().await else {
                        break;
                    };
                    let (this, c) = (self.clone(), conn.clone());
                    streams.spawn(async move {
                        let mut send = send;
                        let r = this.serve_stream(&c, &mut send, recv).await;
                        drop(permit);
                        // The stream is done once the peer has what was sent (the serving
                        // place is free already): closing the connection when it goes idle
                        // must not drop bytes still on their way.
                        if r.is_ok() {
                            let _ = tokio::time::timeout(DELIVERY, send.stopped()).await;
                        }
                        r
                    });
                }
                Some(done) = streams.join_next(), if !streams.is_empty() => {
                    if let Ok(Err(e)) = done {
                        tracing::debug!("mesh nar: stream to {}: {e}", conn.remote_id());
                    }
                }
                _ = tokio::time::sleep(IDLE), if streams.is_empty() => {
                    let_go_idle(&conn);
                    break;
                }
            }
        }
        while streams.join_next().await.is_some() {}
        Ok(())
    }
}

/// One of the [`MAX_SERVING`] places, counted in `narmesh_mesh_serving` while held.
pub struct ServingSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _mine: super::endpoint::PeerSlot,
    _counted: crate::metrics::Counted,
}

impl NarServer {
    /// A place to serve one more stream to `peer`, or `None` when [`MAX_SERVING`] are served,
    /// or [`SERVING_PER_PEER`] to that peer (`Busy`).
    pub fn slot(&self, peer: iroh::EndpointId) -> Option<ServingSlot> {
        let mine = self.serving_by_peer.take(peer)?;
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(ServingSlot {
            _permit: permit,
            _mine: mine,
            _counted: crate::metrics::Counted::new(&self.metrics.mesh_serving),
        })
    }

    /// Close the connection of a bad request (counted, logged at most once a second).
    fn bad_request(&self, conn: &Connection) -> Result<(), AcceptError> {
        self.per_peer.bad_request(conn, "nar");
        Ok(())
    }

    async fn serve_stream(
        &self,
        conn: &Connection,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Result<(), AcceptError> {
        let (blake3, range, v2_leaves) = if self.version == 2 {
            let q: NarQuery =
                match tokio::time::timeout(REQUEST, wire::read_request(&mut recv)).await {
                    Ok(Ok(q)) => q,
                    Ok(Err(e)) if wire::broke_off(&e) => return Ok(()),
                    _ => return self.bad_request(conn),
                };
            match q.what {
                NarWhat::Leaves => (q.blake3, None, true),
                NarWhat::Range { start, end } => (q.blake3, Some((start, end)), false),
            }
        } else {
            let r: NarRequest =
                match tokio::time::timeout(REQUEST, wire::read_request(&mut recv)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) if wire::broke_off(&e) => return Ok(()),
                    _ => return self.bad_request(conn),
                };
            (r.blake3, Some((r.offset, u64::MAX)), false)
        };
        let (held, size) = match self.held(&blake3).await {
            Ok(Some(h)) => h,
            Ok(None) => return self.refuse(send, None).await,
            Err(e) => return self.cannot_read(send, "a NAR", e).await,
        };
        let Some(_slot) = self.slot(conn.remote_id()) else {
            return self.refuse(send, Some(NarReply::Busy)).await;
        };
        if v2_leaves {
            let leaves = match self.storage.leaves(&blake3).await {
                Ok(Some(l)) => l,
                Ok(None) => return self.refuse(send, None).await,
                Err(e) => return self.cannot_read(send, "a NAR's leaves", e).await,
            };
            write(send, &NarReply::Leaves { size }).await?;
            timed(send.write_chunk(leaves)).await?;
            return send.finish().map_err(user);
        }
        let Some((start, end)) = range else {
            return self.bad_request(conn);
        };
        let end = end.min(size);
        let aligned = start % GROUP == 0 && (end % GROUP == 0 || end == size);
        if start > end || (self.version == 2 && (!aligned || start == end)) {
            return self
                .refuse(
                    send,
                    Some(NarReply::Error {
                        message: format!("bad range {start}..{end} of a NAR of {size} bytes"),
                    }),
                )
                .await;
        }
        if self.version == 2 {
            write(send, &NarReply::Range { len: end - start }).await?;
        } else {
            write(send, &NarHeader::Found { size: end - start }).await?;
        }
        let mut data = self.storage.read(&blake3, start, end).await.map_err(user)?;
        let counter = self.counter(&held);
        while let Some(piece) = data.recv().await {
            let piece = piece.map_err(user)?;
            if let Some(p) = &self.pacer {
                p.take(piece.len() as u64).await;
            }
            counter.inc_by(piece.len() as u64);
            timed(send.write_chunk(piece)).await?;
        }
        send.finish().map_err(user)
    }

    /// The counter of bytes served from where `held` keeps them.
    pub(super) fn counter(&self, held: &Held) -> prometheus_client::metrics::counter::Counter {
        let source = match held {
            Held::Store { .. } => "store",
            Held::File { .. } => "file",
        };
        self.metrics
            .served_bytes
            .get_or_create(&SourceLabels { source })
            .clone()
    }

    /// The NAR if this node holds it and has a record of it: how, and its size. An error of
    /// this node's own (its storage or database failing) is not "not held": the asker takes
    /// `NotFound` as this node's word that it lacks the NAR.
    pub(super) async fn held(&self, blake3: &[u8; 32]) -> Result<Option<(Held, u64)>, String> {
        let Some(held) = self.storage.held(blake3).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let db = self.storage.db().clone();
        let b = *blake3;
        let size = tokio::task::spawn_blocking(move || {
            Ok::<_, String>(
                db.by_blake3(&b)
                    .map_err(|e| e.to_string())?
                    .iter()
                    .find_map(|r| r.claim(&b).map(|c| c.nar_size)),
            )
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(size.map(|size| (held, size)))
    }

    /// This node's own failure to read its storage: an `Error`, never `NotFound` (which the
    /// asker takes as its word that it lacks the NAR).
    async fn cannot_read(
        &self,
        send: &mut SendStream,
        what: &str,
        e: impl std::fmt::Display,
    ) -> Result<(), AcceptError> {
        tracing::warn!("mesh: serving {what}: {e}");
        let message = "this node cannot read its storage now".to_owned();
        self.refuse(send, Some(NarReply::Error { message })).await
    }

    async fn refuse(
        &self,
        send: &mut SendStream,
        reply: Option<NarReply>,
    ) -> Result<(), AcceptError> {
        if self.version == 2 {
            write(send, &reply.unwrap_or(NarReply::NotFound)).await?;
        } else {
            let header = match reply {
                Some(NarReply::Busy) => NarHeader::Error {
                    message: "busy".into(),
                },
                Some(NarReply::Error { message }) => NarHeader::Error { message },
                _ => NarHeader::NotFound,
            };
            write(send, &header).await?;
        }
        send.finish().map_err(user)
    }
}

async fn timed<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, AcceptError> {
    match tokio::time::timeout(WRITE_STALL, f).await {
        Err(_) => Err(user("the peer stopped taking data")),
        Ok(r) => r.map_err(user),
    }
}

async fn write<T: serde::Serialize>(send: &mut SendStream, msg: &T) -> Result<(), AcceptError> {
    timed(wire::write(send, msg)).await
}
