//! The cluster's gossip topic: every path the pipeline records is announced (version 2), every
//! announcement heard (version 1 or 2) is checked and taken in, and neighbors are tracked. One
//! task owns the subscription; when the topic fails it rejoins after a backoff instead of
//! going deaf (catch-up covers whatever was missed meanwhile).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use iroh::EndpointId;
use iroh_gossip::TopicId;
use iroh_gossip::api::{Event, GossipReceiver, GossipSender};
use narmesh_proto::gossip::{self, MAX_ANNOUNCE};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::db::PathRecord;

/// The gossip topic and who to join it through.
pub struct Topic {
    pub gossip: iroh_gossip::Gossip,
    pub id: TopicId,
    pub bootstrap: Vec<EndpointId>,
}

async fn join(topic: &Topic) -> Result<(GossipSender, GossipReceiver), String> {
    let t = tokio::time::timeout(
        Duration::from_secs(10),
        topic.gossip.subscribe(topic.id, topic.bootstrap.clone()),
    )
    .await
    .map_err(|_| "joining the gossip topic timed out".to_owned())?
    .map_err(|e| format!("joining the gossip topic: {e}"))?;
    Ok(t.split())
}

/// Announce recorded paths and take in announcements until cancelled; peers found later (LAN
/// discovery) arrive on `joins`.
pub async fn run(
    ctx: Arc<Ctx>,
    topic: Topic,
    mut recorded: broadcast::Receiver<PathRecord>,
    mut joins: mpsc::Receiver<EndpointId>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (sender, mut receiver) = match join(&topic).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("mesh: {e}; trying again in {backoff:?}");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = recorded.recv() => match r {
                    Ok(rec) => announce(&ctx, &sender, &rec).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("mesh: {n} announcements skipped (catch-up covers them)");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                Some(id) = joins.recv() => {
                    let _ = sender.join_peers(vec![id]).await;
                }
                ev = receiver.next() => match ev {
                    Some(Ok(ev)) => on_event(&ctx, ev).await,
                    Some(Err(e)) => {
                        tracing::warn!("mesh: gossip: {e}; rejoining");
                        break;
                    }
                    None => {
                        tracing::warn!("mesh: gossip ended; rejoining");
                        break;
                    }
                },
            }
        }
        ctx.sync_now.notify_one();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

async fn announce(ctx: &Arc<Ctx>, sender: &GossipSender, rec: &PathRecord) {
    // The pipeline's records are held here (in the local store): their own claim.
    let Some(c) = rec.own().or_else(|| rec.active()) else {
        return;
    };
    let ann = super::accept::announce_of(c, &ctx.endpoint_key, &ctx.key, true, super::now_ms());
    match ann.encode() {
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

async fn on_event(ctx: &Arc<Ctx>, ev: Event) {
    match ev {
        Event::NeighborUp(id) => {
            ctx.peer_state(id, |s| s.neighbor = true);
            ctx.sync_now.notify_one();
        }
        Event::NeighborDown(id) => ctx.peer_state(id, |s| s.neighbor = false),
        Event::Lagged => {
            tracing::warn!("mesh: gossip receiver lagged; catch-up covers what was dropped");
            ctx.sync_now.notify_one();
        }
        Event::Received(msg) => match gossip::decode(&msg.content) {
            Ok(inc) => {
                // Not recorded here (this node's own failure, logged): catch-up brings it
                // again at its next round.
                let _ = ctx
                    .take(vec![inc], None, &msg.delivered_from.to_string())
                    .await;
            }
            Err(e) => {
                ctx.refused(
                    &msg.delivered_from.to_string(),
                    "undecodable",
                    &e.to_string(),
                );
            }
        },
    }
}
