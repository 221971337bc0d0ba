//! The mesh protocols a node answers: catch-up (`narmesh/sync/1`: log entries after a cursor)
//! and NAR transfer (`narmesh/nar/1`: a NAR by BLAKE3 hash, from an offset). Peers reach them
//! only through the allow-list hook; every request is size-limited and checked.

use futures::StreamExt as _;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use narmesh_proto::gossip::Announce;
use narmesh_proto::sync::{MAX_SYNC_BATCH, NarHeader, NarRequest, SyncBatch, SyncRequest};

use super::accept::announce_of;
use super::wire;
use crate::blobs::BlobStore;
use crate::db::Db;

/// Bytes of narinfo text per catch-up batch, so a batch frame stays far below the frame limit.
const SYNC_BATCH_BYTES: usize = 512 * 1024;

fn user(e: impl std::error::Error + 'static) -> AcceptError {
    AcceptError::from_err(std::io::Error::other(crate::error_chain(&e)))
}

/// Answers catch-up requests from this node's log.
#[derive(Debug, Clone)]
pub struct SyncServer {
    pub db: Db,
    pub me: [u8; 32],
}

impl ProtocolHandler for SyncServer {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let req: SyncRequest = match wire::read(&mut recv).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("mesh sync: bad request from {}: {e}", conn.remote_id());
                    conn.close(400u32.into(), b"bad request");
                    return Ok(());
                }
            };
            let batch = self
                .batch(&req)
                .await
                .map_err(|e| AcceptError::from_err(std::io::Error::other(e)))?;
            wire::write(&mut send, &batch).await.map_err(user)?;
            send.finish().map_err(user)?;
        }
        Ok(())
    }
}

impl SyncServer {
    async fn batch(&self, req: &SyncRequest) -> Result<SyncBatch, String> {
        let db = self.db.clone();
        let (after, limit, me) = (
            req.after,
            req.limit.clamp(1, MAX_SYNC_BATCH) as usize,
            self.me,
        );
        tokio::task::spawn_blocking(move || {
            let (rows, mut more) = db.log_after(after, limit).map_err(|e| e.to_string())?;
            let mut entries: Vec<Announce> = Vec::with_capacity(rows.len());
            let (mut next, mut bytes) = (after, 0);
            for (seq, rec) in rows {
                bytes += rec.narinfo.len();
                if bytes > SYNC_BATCH_BYTES && !entries.is_empty() {
                    more = true;
                    break;
                }
                entries.push(announce_of(&rec, me));
                next = seq;
            }
            Ok(SyncBatch {
                entries,
                next,
                more,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Serves NARs this node holds, by BLAKE3 hash.
#[derive(Debug, Clone)]
pub struct NarServer {
    pub db: Db,
    pub blobs: BlobStore,
}

impl ProtocolHandler for NarServer {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        // A fetcher reuses its connection for later NARs, a stream each; streams are served
        // side by side.
        let mut streams = tokio::task::JoinSet::new();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (this, c) = (self.clone(), conn.clone());
            streams.spawn(async move { this.serve_stream(&c, send, recv).await });
            while let Some(done) = streams.try_join_next() {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("mesh nar: stream to {}: {e}", conn.remote_id()),
                    Err(e) => tracing::error!("mesh nar: stream to {}: {e}", conn.remote_id()),
                }
            }
        }
        while streams.join_next().await.is_some() {}
        Ok(())
    }
}

impl NarServer {
    /// One request: a NAR by BLAKE3 hash from an offset.
    async fn serve_stream(
        &self,
        conn: &Connection,
        mut send: iroh::endpoint::SendStream,
        mut recv: iroh::endpoint::RecvStream,
    ) -> Result<(), AcceptError> {
        let req: NarRequest = match wire::read(&mut recv).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("mesh nar: bad request from {}: {e}", conn.remote_id());
                conn.close(400u32.into(), b"bad request");
                return Ok(());
            }
        };
        let size = self.local_size(&req.blake3).await;
        let header = match size {
            Some(s) if req.offset <= s => NarHeader::Found {
                size: s - req.offset,
            },
            Some(_) => NarHeader::Error {
                message: "offset past the end".into(),
            },
            None => NarHeader::NotFound,
        };
        wire::write(&mut send, &header).await.map_err(user)?;
        if let NarHeader::Found { size } = header {
            let range = self.blobs.range(&req.blake3, req.offset, req.offset + size);
            let mut data = std::pin::pin!(range);
            while let Some(chunk) = data.next().await {
                send.write_chunk(chunk.map_err(user)?).await.map_err(user)?;
            }
        }
        send.finish().map_err(user)?;
        Ok(())
    }

    async fn local_size(&self, blake3: &[u8; 32]) -> Option<u64> {
        let db = self.db.clone();
        let h = *blake3;
        let rec = tokio::task::spawn_blocking(move || db.by_blake3(&h))
            .await
            .ok()?
            .ok()??;
        (rec.local && self.blobs.has(blake3).await.ok()?).then_some(rec.nar_size)
    }
}
