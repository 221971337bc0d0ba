//! Catch-up, client and server, both versions: every node keeps a log of its records (a path
//! moves to the end whenever its record or what this node holds of it changes); a peer asks for
//! the entries after its cursor, batch by batch. The client checks each entry as an
//! announcement and stores its cursor in the same commit as the records.
//!
//! Liveness: peers are caught up with concurrently, each within a round budget of time and
//! batches, so a slow or endless peer delays nobody else and cannot keep a node busy; every
//! network step has a deadline. A peer that speaks only version 1 is asked in version 1.

use std::time::{Duration, Instant};

use iroh::EndpointId;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use narmesh_proto::gossip::PathAnnounce;
use narmesh_proto::sync::{
    MAX_SYNC_BATCH, SYNC_ALPN, SYNC_ALPN_V1, SyncBatch, SyncBatchV2, SyncRequest,
};

use super::endpoint::{REUSE_WITHIN, next_stream};
use super::{Ctx, wire};

/// Encoded bytes of entries per catch-up batch, so a batch frame stays far below the frame
/// limit.
const SYNC_BATCH_BYTES: usize = 512 * 1024;
/// The largest entry a batch (alone) can carry: a frame, less the batch's own fields.
const MAX_ENTRY: usize = narmesh_proto::frame::MAX_FRAME - 64;
/// Batches taken from one peer per round, at most.
const BATCHES_PER_ROUND: usize = 64;
/// Time one peer gets per round.
pub const ROUND_BUDGET: Duration = Duration::from_secs(20);
/// Deadline of a connection's handshake, and of each answer.
const CONNECT: Duration = Duration::from_secs(5);
const ANSWER: Duration = Duration::from_secs(15);
/// A request must arrive within this.
const REQUEST: Duration = Duration::from_secs(10);

/// Answers catch-up requests of version `version` (1 or 2) from this node's log.
#[derive(Debug, Clone)]
pub struct SyncServer {
    pub ctx: std::sync::Arc<Ctx>,
    pub version: u8,
    pub per_peer: super::endpoint::ConnSlots,
}

fn user(e: impl std::fmt::Display) -> AcceptError {
    AcceptError::from_err(std::io::Error::other(e.to_string()))
}

impl ProtocolHandler for SyncServer {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let Some(_slot) = self.per_peer.take(&conn) else {
            return Ok(());
        };
        loop {
            let Some((mut send, mut recv)) = next_stream(&conn).await else {
                return Ok(());
            };
            let req: SyncRequest =
                match tokio::time::timeout(REQUEST, wire::read_request(&mut recv)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) if wire::broke_off(&e) => continue,
                    _ => {
                        self.per_peer.bad_request(&conn, "sync");
                        return Ok(());
                    }
                };
            let ctx = self.ctx.clone();
            let version = self.version;
            let answer = tokio::task::spawn_blocking(move || batch(&ctx, &req, version))
                .await
                .map_err(user)?
                .map_err(user)?;
            let sent = tokio::time::timeout(ANSWER, async {
                match answer {
                    Answer::V1(b) => wire::write(&mut send, &b).await,
                    Answer::V2(b) => wire::write(&mut send, &b).await,
                }
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                _ => return Ok(()),
            }
            send.finish().map_err(user)?;
        }
    }
}

enum Answer {
    V1(SyncBatch),
    V2(SyncBatchV2),
}

/// The claim `rec` serves here, and whether this node holds its NAR. Blocking.
fn served_here<'r>(
    ctx: &Ctx,
    rec: &'r crate::db::PathRecord,
    me: &[u8; 32],
) -> Option<(&'r crate::db::Claim, bool)> {
    let mut held = false;
    let c = rec.served(Some(me), |c| {
        held = ctx.storage.holds_blocking(&c.blake3);
        held
    })?;
    Some((c, held))
}

/// The entries after `req.after`, as announcements of the version asked. Blocking.
///
/// A batch holds at most [`SYNC_BATCH_BYTES`] of encoded entries (their narinfos, and the
/// provider statements and bindings that grow with the cluster), so its frame stays below the
/// frame limit however many nodes restate a path; an entry larger than that alone can never be
/// sent, and is passed over with a warning rather than stop every peer's catch-up there.
fn batch(ctx: &Ctx, req: &SyncRequest, version: u8) -> Result<Answer, String> {
    let limit = req.limit.clamp(1, MAX_SYNC_BATCH) as usize;
    let (rows, more) = ctx
        .db
        .log_after(req.after, limit)
        .map_err(|e| e.to_string())?;
    let now = super::now_ms();
    let me = ctx.endpoint_key.clone();
    let my_id = *me.public().as_bytes();
    // Each row's announcement is made only when the batch reaches it: of the claim the record
    // serves here, with whether this node holds it. A row with no claim to serve has none,
    // and is passed.
    Ok(if version == 2 {
        let f = fill(
            req.after,
            rows.into_iter().map(|(seq, rec)| {
                let a = served_here(ctx, &rec, &my_id)
                    .map(|(c, h)| super::accept::announce_of(c, &me, &ctx.key, h, now));
                (seq, rec.store_path, a)
            }),
        )?;
        Answer::V2(SyncBatchV2 {
            entries: f.entries,
            next: f.next,
            more: more || f.full,
        })
    } else {
        let f = fill(
            req.after,
            rows.into_iter().map(|(seq, rec)| {
                let a = served_here(ctx, &rec, &my_id)
                    .map(|(c, h)| super::accept::announce_v1_of(c, my_id, h));
                (seq, rec.store_path, a)
            }),
        )?;
        Answer::V1(SyncBatch {
            entries: f.entries,
            next: f.next,
            more: more || f.full,
        })
    })
}

/// A catch-up batch's entries, filled from the log's rows up to [`SYNC_BATCH_BYTES`] encoded.
struct Filled<T> {
    entries: Vec<T>,
    /// The last sequence number the batch covers (sent, or passed).
    next: u64,
    /// Rows were left for the next batch.
    full: bool,
}

/// Take `rows` (sequence number, store path, the entry to send if any) into a batch after
/// `after`, until the next entry would take it over [`SYNC_BATCH_BYTES`] encoded (a larger one
/// goes alone); an entry over [`MAX_ENTRY`] is passed with a warning (no frame carries it).
fn fill<T: serde::Serialize>(
    after: u64,
    rows: impl Iterator<Item = (u64, String, Option<T>)>,
) -> Result<Filled<T>, String> {
    let mut f = Filled {
        entries: Vec::new(),
        next: after,
        full: false,
    };
    let mut bytes = 0;
    for (seq, path, entry) in rows {
        if let Some(e) = entry {
            let size = postcard::experimental::serialized_size(&e).map_err(|e| e.to_string())?;
            if size > MAX_ENTRY {
                tracing::warn!(
                    "mesh: the catch-up entry of {path} is {size} bytes, too large to send; \
                     peers do not learn of it from this node"
                );
            } else if !f.entries.is_empty() && bytes + size > SYNC_BATCH_BYTES {
                f.full = true;
                break;
            } else {
                bytes += size;
                f.entries.push(e);
            }
        }
        f.next = seq;
    }
    Ok(f)
}

/// How a round that ended because a batch did not come back (the request went out, no whole
/// answer came) shows in its error.
const NO_ANSWER: &str = "no batch came back: ";
/// Fewest entries a batch is asked for.
const MIN_SYNC_LIMIT: u32 = 16;

/// How a round that ended because the peer's entries were not acceptable shows in its error:
/// such a peer is asked again only after a backoff.
pub const PENALTY_PREFIX: &str = "nothing acceptable: ";

/// How a round that ended for this node's own failure (its database did not take a batch)
/// shows in its error: neither the peer's fault nor a sign it is failing.
pub const OWN_FAILURE_PREFIX: &str = "this node: ";

/// Entries of one batch, whatever the version.
enum Entries {
    V1(Vec<narmesh_proto::gossip::v1::Announce>),
    V2(Vec<PathAnnounce>),
}

/// Catch up with `peer`: its log after our cursor, batch by batch, within the round budget.
/// Returns the entries taken.
pub async fn from_peer(ctx: &std::sync::Arc<Ctx>, peer: EndpointId) -> Result<usize, String> {
    if crate::killpoint::fault("mesh.catch-up-round-panics") {
        panic!("a catch-up round panics (NARMESH_TEST_FAULT)");
    }
    let started = Instant::now();
    let (conn, version, reused) = kept_or_new(ctx, peer).await?;
    let mut limit = MAX_SYNC_BATCH;
    ctx.peer_state(peer, |s| limit = s.batch_limit.unwrap_or(MAX_SYNC_BATCH));
    let mut r = round(ctx, peer, &conn, version, started, limit).await;
    let (conn, version) = match r {
        // The peer may have let a kept connection go (restarted, or idle past its limit) just
        // as it was used: once, start over on a fresh one.
        Err(_) if reused && conn.close_reason().is_some() => {
            conn.close(0u32.into(), b"stale");
            let (conn, version) = connect(ctx, peer).await?;
            r = round(ctx, peer, &conn, version, started, limit).await;
            (conn, version)
        }
        _ => (conn, version),
    };
    // A batch that did not come back may be one too large for the peer to send (a node of the
    // previous release cut batches by narinfo bytes only, and could not send one of long
    // entries at all): ask for half as many. A round that took as many entries as were asked
    // for a batch asks for twice as many again, so a passing fault costs little.
    match &r {
        Err(e) if e.starts_with(NO_ANSWER) && limit > MIN_SYNC_LIMIT => {
            let smaller = (limit / 2).max(MIN_SYNC_LIMIT);
            tracing::info!("mesh: catch-up from {peer}: {e}; asking for {smaller} entries a batch");
            ctx.peer_state(peer, |s| s.batch_limit = Some(smaller));
        }
        Ok((taken, _)) if limit < MAX_SYNC_BATCH && *taken >= limit as usize => {
            let larger = (limit * 2).min(MAX_SYNC_BATCH);
            ctx.peer_state(peer, |s| {
                s.batch_limit = (larger < MAX_SYNC_BATCH).then_some(larger)
            });
        }
        _ => {}
    }
    // A round that went well and left no request in flight leaves its connection for the next
    // one; anything else drops it, so the next round starts on a fresh one.
    let keep = matches!(r, Ok((_, true))) && conn.close_reason().is_none();
    if !keep {
        conn.close(0u32.into(), b"done");
    }
    ctx.peer_state(peer, |s| {
        s.sync_conn = keep.then(|| (conn, version, Instant::now()));
    });
    r.map(|(taken, _)| taken)
}

/// The connection kept from the last round with `peer` if it is still fresh and open, else a
/// new one.
async fn kept_or_new(
    ctx: &std::sync::Arc<Ctx>,
    peer: EndpointId,
) -> Result<(Connection, u8, bool), String> {
    let mut kept = None;
    ctx.peer_state(peer, |s| kept = s.sync_conn.take());
    if let Some((conn, version, used)) = kept {
        if used.elapsed() < REUSE_WITHIN && conn.close_reason().is_none() {
            return Ok((conn, version, true));
        }
        conn.close(0u32.into(), b"stale");
    }
    let (conn, version) = connect(ctx, peer).await?;
    Ok((conn, version, false))
}

/// One round on `conn`: batches until the peer has nothing more, the batch cap or the budget.
/// Returns the entries taken, and whether no request was left in flight.
async fn round(
    ctx: &std::sync::Arc<Ctx>,
    peer: EndpointId,
    conn: &Connection,
    version: u8,
    started: Instant,
    limit: u32,
) -> Result<(usize, bool), String> {
    let db = ctx.db.clone();
    let forget_after = ctx.forget_after_secs;
    let (mut after, reviewing) =
        tokio::task::spawn_blocking(move || start_round(&db, peer, forget_after))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let peer_id = *peer.as_bytes();
    let mut at_end = false;
    let mut taken = 0;
    // The next batch is asked for while this one is checked and recorded (the peer reads and
    // signs while we verify).
    let ask_from = |after: u64| {
        let conn = conn.clone();
        // Aborted when dropped: a round that ends early leaves no request behind.
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            ask(&conn, after, version, limit).await
        }))
    };
    let mut asking = Some(ask_from(after));
    for _ in 0..BATCHES_PER_ROUND {
        let left = ROUND_BUDGET.saturating_sub(started.elapsed());
        let Some(pending) = asking.take() else { break };
        if left.is_zero() {
            break;
        }
        let (entries, next, more) = match tokio::time::timeout(left, pending).await {
            Err(_) => return Err("catch-up round budget spent".into()),
            Ok(Err(e)) => return Err(format!("asking for a batch: {e}")),
            Ok(Ok(r)) => r?,
        };
        let n = match &entries {
            Entries::V1(e) => e.len(),
            Entries::V2(e) => e.len(),
        };
        // `next` must move forward past what was sent (sequence numbers are unique), never
        // backwards.
        if next < after
            || n > MAX_SYNC_BATCH as usize
            || after.checked_add(n as u64).is_none_or(|least| next < least)
        {
            ctx.refused(
                &peer.to_string(),
                "inconsistent-batch",
                "an inconsistent catch-up batch",
            );
            return Err("peer sent an inconsistent catch-up batch".into());
        }
        taken += n;
        let advanced = next > after;
        if more && advanced {
            asking = Some(ask_from(next));
        }
        // Under review, the paths in the batch are seen before the cursor moves past them.
        if reviewing {
            let seen = seen_in(&entries, &peer_id);
            let db = ctx.db.clone();
            tokio::task::spawn_blocking(move || {
                db.confirm(&peer_id, super::now_ms() / 1000, &seen)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        let accepted = ctx
            .take(
                entries_to_incoming(entries),
                Some((peer, next)),
                &peer.to_string(),
            )
            .await
            // This node's own failure (its database): the round ends without blaming the peer.
            .map_err(|e| format!("{OWN_FAILURE_PREFIX}recording a batch: {e}"))?;
        if reviewing {
            crate::killpoint::reach("mesh.review-batch-taken");
        }
        at_end = !more;
        if n > 0 && accepted == 0 {
            // A batch with nothing acceptable: this peer is not worth more of this round (an
            // untrusted or hostile peer; a trusted one's refused entries come back once trust
            // changes, since catch-up then starts over).
            return Err(format!("{PENALTY_PREFIX}{n} entries, none acceptable"));
        }
        after = next;
        if !more || !advanced {
            break;
        }
    }
    let clean = asking.is_none();
    drop(asking);
    if at_end {
        let db = ctx.db.clone();
        let changed = tokio::task::spawn_blocking(move || -> Result<usize, crate::db::DbError> {
            let now_ms = super::now_ms();
            db.set_synced(&peer_id, now_ms / 1000, synced_every(forget_after))?;
            Ok(if reviewing {
                db.end_review(&peer_id, now_ms)?
            } else {
                0
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if reviewing {
            tracing::info!(
                "mesh: reviewed {peer}'s whole log; it no longer holds {changed} path(s) it had said it held"
            );
        }
    }
    Ok((taken, clean))
}

/// The cursor a round with `peer` starts from, and whether it reviews the peer: unless this
/// node read the peer's log to its end (or made progress reviewing it) within the last
/// `forget_after` seconds, the peer may have forgotten paths whose withdrawals this node never
/// heard (it was down, or it knows the paths from gossip only, or its data dir is of before,
/// or a review stalled that long), so the whole log is read again and what the peer said it
/// held is checked (see `db::review`).
fn start_round(
    db: &crate::db::Db,
    peer: EndpointId,
    forget_after: u64,
) -> Result<(u64, bool), crate::db::DbError> {
    let id = peer.as_bytes();
    let cursor = db.cursor(id)?;
    let now = super::now_ms() / 1000;
    if forget_after > 0 {
        let last = db.synced_at(id)?;
        if last.is_none_or(|t| now.saturating_sub(t) > forget_after) {
            let n = db.begin_review(id, now)?;
            if n > 0 {
                tracing::info!(
                    "mesh: {peer}'s log not read to its end in the last {forget_after} s \
                     (forget-after-secs): reading it whole to confirm the {n} path(s) it said \
                     it held"
                );
            }
            return Ok((0, n > 0));
        }
    }
    Ok((cursor, db.reviewing(id)?))
}

/// How stale the stored time of a peer's last full catch-up may get: a small part of the
/// absence that starts a review, at most ten minutes.
fn synced_every(forget_after: u64) -> u64 {
    (forget_after / 8).clamp(1, 600)
}

/// What a batch says under review (see `db::review`): each entry's path (hash part), the
/// BLAKE3 of the claim it serves, and whether `peer` says in it that it holds that NAR.
fn seen_in(entries: &Entries, peer: &[u8; 32]) -> Vec<(String, [u8; 32], bool)> {
    let hash = |narinfo: &str| super::narinfo_hash_part(narinfo).map(str::to_owned);
    match entries {
        Entries::V1(e) => e
            .iter()
            .filter_map(|a| Some((hash(&a.narinfo)?, a.blake3, a.providers.contains(peer))))
            .collect(),
        Entries::V2(e) => e
            .iter()
            .filter_map(|a| {
                let holds = a.providers.iter().any(|p| &p.id == peer && p.holds);
                Some((hash(&a.narinfo)?, a.blake3, holds))
            })
            .collect(),
    }
}

fn entries_to_incoming(e: Entries) -> Vec<narmesh_proto::gossip::Incoming> {
    use narmesh_proto::gossip::Incoming;
    match e {
        Entries::V1(v) => v.into_iter().map(Incoming::V1).collect(),
        Entries::V2(v) => v.into_iter().map(Incoming::V2).collect(),
    }
}

/// A catch-up connection to `peer`, version 2 if it speaks it.
async fn connect(ctx: &Ctx, peer: EndpointId) -> Result<(Connection, u8), String> {
    match tokio::time::timeout(CONNECT, ctx.ep.connect(peer, SYNC_ALPN)).await {
        Err(_) => Err("connect timed out".into()),
        Ok(Ok(c)) => Ok((c, 2)),
        Ok(Err(e)) => {
            let msg = crate::error_chain(&e);
            if msg.contains("application protocol") || msg.contains("120") {
                let c = tokio::time::timeout(CONNECT, ctx.ep.connect(peer, SYNC_ALPN_V1))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| crate::error_chain(&e))?;
                Ok((c, 1))
            } else {
                Err(msg)
            }
        }
    }
}

async fn ask(
    conn: &Connection,
    after: u64,
    version: u8,
    limit: u32,
) -> Result<(Entries, u64, bool), String> {
    let (mut send, mut recv) = tokio::time::timeout(ANSWER, conn.open_bi())
        .await
        .map_err(|_| "opening a stream timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let req = SyncRequest {
        version: version as u16,
        after,
        limit,
    };
    tokio::time::timeout(ANSWER, wire::write(&mut send, &req))
        .await
        .map_err(|_| "sending timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(ANSWER, async {
        if version == 2 {
            wire::read::<SyncBatchV2>(&mut recv)
                .await
                .map(|b| (Entries::V2(b.entries), b.next, b.more))
        } else {
            wire::read::<SyncBatch>(&mut recv)
                .await
                .map(|b| (Entries::V1(b.entries), b.next, b.more))
        }
    })
    .await
    .map_err(|_| format!("{NO_ANSWER}it timed out"))?
    .map_err(|e| format!("{NO_ANSWER}{e}"))?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use narmesh_proto::gossip::ProviderStatement;

    /// An entry as a large cluster makes it: a narinfo of 1 KiB, a statement from each of 33
    /// providers and a binding from each of 8 nodes.
    fn restated(i: u64) -> PathAnnounce {
        PathAnnounce {
            narinfo: format!("StorePath: /nix/store/{i:032}-x\n{}", "R".repeat(1000)),
            blake3: [7; 32],
            nar_size: 1 << 20,
            bindings: (0..8)
                .map(|n| format!("node-{n}:{}", "b".repeat(88)))
                .collect(),
            upstream_refs: Vec::new(),
            providers: (0..33)
                .map(|n| ProviderStatement {
                    id: [n; 32],
                    holds: true,
                    at_ms: 1_800_000_000_000,
                    sig: vec![1; 64],
                })
                .collect(),
        }
    }

    /// A full batch of such entries still fits a frame: the batch is cut by what its entries
    /// encode to, not by their narinfos alone (512 of them would be 2.8 MiB, over the 1 MiB
    /// frame, and every peer's catch-up from this node would stop there for good). The rows
    /// left over come in the next batch; an entry over the batch's budget goes alone, and one
    /// no frame could carry is passed.
    #[test]
    fn a_batch_of_large_entries_fits_a_frame() {
        let rows = (1..=MAX_SYNC_BATCH as u64).map(|i| (i, format!("p{i}"), Some(restated(i))));
        let f = fill(0, rows).unwrap();
        assert!(f.full);
        assert!(f.entries.len() > 50, "{}", f.entries.len());
        assert_eq!(f.next, f.entries.len() as u64);
        let frame = narmesh_proto::frame::encode(&SyncBatchV2 {
            entries: f.entries,
            next: f.next,
            more: true,
        })
        .expect("the batch fits a frame");
        assert!(frame.len() <= SYNC_BATCH_BYTES + 64, "{}", frame.len());
        let mut large = restated(2);
        large.narinfo = "L".repeat(SYNC_BATCH_BYTES + 1000);
        let mut huge = restated(4);
        huge.narinfo = "H".repeat(narmesh_proto::frame::MAX_FRAME);
        let rows = || {
            vec![
                (5, "a".to_owned(), Some(restated(1))),
                (6, "huge".to_owned(), Some(huge.clone())),
                (7, "gone".to_owned(), None),
                (8, "b".to_owned(), Some(restated(3))),
                (9, "large".to_owned(), Some(large.clone())),
                (10, "c".to_owned(), Some(restated(5))),
            ]
        };
        let f = fill(4, rows().into_iter()).unwrap();
        assert!(f.full);
        assert_eq!(f.next, 8);
        assert_eq!(f.entries, vec![restated(1), restated(3)]);
        // The next batch: the large entry alone, in a frame.
        let f = fill(8, rows().into_iter().skip(4)).unwrap();
        assert!(f.full);
        assert_eq!((f.next, f.entries.len()), (9, 1));
        narmesh_proto::frame::encode(&SyncBatchV2 {
            entries: f.entries,
            next: f.next,
            more: true,
        })
        .expect("the large entry fits a frame alone");
    }
}
