//! Eager replication: what an eager node still wants is durable (the wish list in redb, written
//! in the commit that records a claim it does not hold), and is fetched, a few at a time, with a
//! backoff per NAR, across restarts, until it is held or no trusted record wants it any more.
//! Eviction clears a wish, so nothing is fetched and evicted in a loop. Up to eight at once, of
//! which two large: a small NAR is never stuck behind large ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::transfer::Want;

/// Eager fetches at once.
const AT_ONCE: usize = 8;
/// Of those, large NARs (over [`LARGE`]): two fill a link by themselves and more only share it,
/// while a small NAR's fetch is a few round trips: small ones never wait behind large ones.
const LARGE_AT_ONCE: usize = 2;
const LARGE: u64 = 4 << 20;
/// Longest wait before trying a NAR again.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Fetch wished-for NARs until cancelled.
pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    // When each NAR may be tried again, and the wait after the next failure.
    let mut retry: HashMap<[u8; 32], (Instant, Duration)> = HashMap::new();
    // What runs, and whether it is large.
    let mut running: HashMap<[u8; 32], bool> = HashMap::new();
    // Wished-for NARs known to be large (skipped without a lookup while large slots are full).
    let mut large_known: std::collections::HashSet<[u8; 32]> = Default::default();
    let mut fetches: JoinSet<([u8; 32], Result<(), String>)> = JoinSet::new();
    loop {
        let db = ctx.db.clone();
        let wants = tokio::task::spawn_blocking(move || db.wants())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let now = Instant::now();
        let mut gone = Vec::new();
        let wished: std::collections::HashSet<[u8; 32]> = wants.iter().map(|(b, _)| *b).collect();
        large_known.retain(|b| wished.contains(b));
        let mut large_running = running.values().filter(|l| **l).count();
        for (b, hash) in wants {
            if fetches.len() >= AT_ONCE {
                break;
            }
            if running.contains_key(&b) || retry.get(&b).is_some_and(|(t, _)| *t > now) {
                continue;
            }
            if large_running >= LARGE_AT_ONCE && large_known.contains(&b) {
                continue;
            }
            let db = ctx.db.clone();
            let h = hash.clone();
            let rec = tokio::task::spawn_blocking(move || db.path(&h))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            let Some(claim) = rec.as_ref().and_then(|r| r.claim(&b)).filter(|c| !c.failed) else {
                // No record wants these bytes any more.
                gone.push(b);
                continue;
            };
            let large = claim.nar_size > LARGE;
            if large {
                large_known.insert(b);
                if large_running >= LARGE_AT_ONCE {
                    continue;
                }
                large_running += 1;
            }
            let t = ctx.transfers.start(Want {
                claim: claim.clone(),
                paths: vec![hash],
            });
            running.insert(b, large);
            fetches.spawn(async move {
                let mut p = t.progress();
                let r = loop {
                    if let Some(r) = p.borrow().done.clone() {
                        break r;
                    }
                    if p.changed().await.is_err() {
                        break Err("transfer gone".into());
                    }
                };
                (b, r)
            });
        }
        if !gone.is_empty() {
            let db = ctx.db.clone();
            let _ = tokio::task::spawn_blocking(move || db.unwant(&gone)).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.eager_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(done) = fetches.join_next(), if !fetches.is_empty() => {
                if let Ok((b, r)) = done {
                    running.remove(&b);
                    match r {
                        Ok(()) => { retry.remove(&b); }
                        Err(e) => {
                            let wait = retry.get(&b).map_or(Duration::from_secs(1), |(_, w)| *w);
                            tracing::info!("mesh: eager fetch failed ({e}); trying again in {wait:?}");
                            retry.insert(b, (Instant::now() + wait, (wait * 2).min(MAX_BACKOFF)));
                        }
                    }
                }
            }
        }
    }
    fetches.abort_all();
}
