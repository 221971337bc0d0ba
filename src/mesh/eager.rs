//! Eager replication: what an eager node still wants is durable (the wish list in redb, written
//! in the commit that records a claim it does not hold), and is fetched, a few at a time, with a
//! backoff per NAR, across restarts, until it is held or no trusted record wants it any more.
//! A wish is for the claim its path serves (`PathRecord::served`): when that becomes another
//! (every holder lost the NAR wished for, and a node holds another build of the path), the
//! other is wished for instead, at the wish's next turn. Eviction clears a wish, so nothing is
//! fetched and evicted in a loop. Up to eight at once, of
//! which two large: a small NAR is never stuck behind large ones. A wish no node holds the NAR
//! of (every holder's Nix GC took it first) starts no fetch: it waits, without a word, for news
//! of its path (a changed record; of the path its wish names, or the one it was wished for
//! by), or [`MAX_BACKOFF`] without any.
//!
//! The wish list is walked a window at a time ([`WINDOW`] wishes in BLAKE3 order, from where the
//! last look stopped, round and round): a look costs the same whether ten wishes wait or a
//! million (a new eager node, or the mirror node, catching up on a farm's history), and every
//! wish gets its turn. What the walk remembers of a wish (its backoff, that it is large) is
//! forgotten once a whole round passes without it: it is no longer wished.

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
/// Wishes read from the list at a time.
const WINDOW: usize = 256;
/// Windows one look reads at most when none of their wishes can start (all fetching or waiting
/// out a backoff): the rest of the round waits for the next look.
const WINDOWS_PER_LOOK: usize = 64;

/// What a wish's look at the records found.
#[derive(Debug)]
enum Look {
    /// Fetch this claim for this path; the path's own served claim (another) is wished for too.
    Fetch(crate::db::Claim, String, Option<crate::db::Claim>),
    /// The path serves another claim, and no path serves the one wished for: wish for that one.
    Instead(crate::db::Claim),
    /// No record wants these bytes any more.
    Unwanted,
}

/// What the walk over the wish list remembers between looks.
#[derive(Debug, Default)]
struct Walk {
    /// The next look starts after this wish (`None`: from the first).
    cursor: Option<[u8; 32]>,
    /// Rounds of the list completed.
    round: u64,
    /// When each NAR may be tried again, the wait after its next failure, and the round it was
    /// last seen in.
    retry: HashMap<[u8; 32], (Instant, Duration, u64)>,
    /// Wished-for NARs known to be large (skipped without a lookup while the large slots are
    /// full), with the round each was last seen in.
    large: HashMap<[u8; 32], u64>,
    /// Wishes that wait for a holder (no node holds their NAR), with the path their wish
    /// names: news of it, or of the path the NAR was wished for by, ends the wait, and so does
    /// the wish naming another path (one with the same bytes was recorded).
    unheld: HashMap<[u8; 32], String>,
    /// The same by path (both of them), for news.
    unheld_by_path: HashMap<String, Vec<[u8; 32]>>,
}

impl Walk {
    /// The walk passes `b`, a wish.
    fn pass(&mut self, b: &[u8; 32]) {
        self.cursor = Some(*b);
        if let Some(r) = self.retry.get_mut(b) {
            r.2 = self.round;
        }
        if let Some(r) = self.large.get_mut(b) {
            *r = self.round;
        }
    }

    /// The walk reached the end of the list: what a whole round passed without is no longer
    /// wished and is forgotten; the next look starts from the first wish.
    fn wrap(&mut self) {
        let round = self.round;
        self.retry.retain(|_, r| r.2 == round);
        self.large.retain(|_, r| *r == round);
        let retry = &self.retry;
        self.unheld.retain(|b, _| retry.contains_key(b));
        let unheld = &self.unheld;
        self.unheld_by_path.retain(|_, bs| {
            bs.retain(|b| unheld.contains_key(b));
            !bs.is_empty()
        });
        self.round += 1;
        self.cursor = None;
    }

    /// Whether `b` waits out a backoff at `now`.
    fn backing_off(&self, b: &[u8; 32], now: Instant) -> bool {
        self.retry.get(b).is_some_and(|(t, _, _)| *t > now)
    }

    fn known_large(&self, b: &[u8; 32]) -> bool {
        self.large.contains_key(b)
    }

    fn is_large(&mut self, b: [u8; 32]) {
        self.large.insert(b, self.round);
    }

    /// `b`'s fetch failed at `now`: how long until it is tried again (doubling each time).
    fn failed(&mut self, b: [u8; 32], now: Instant) -> Duration {
        let wait = self.next_wait(&b);
        self.retry
            .insert(b, (now + wait, (wait * 2).min(MAX_BACKOFF), self.round));
        wait
    }

    /// No node holds `b` at `now`, the wish for it naming path `named`, the NAR wished for by
    /// path `by` (the same, or another path with those bytes): it waits for news of either, or
    /// [`MAX_BACKOFF`]. A failure's backoff is left as it was.
    fn unheld(&mut self, b: [u8; 32], named: &str, by: &str, now: Instant) {
        let wait = self.next_wait(&b);
        self.retry.insert(b, (now + MAX_BACKOFF, wait, self.round));
        self.unheld.insert(b, named.to_owned());
        for p in [named, by] {
            let bs = self.unheld_by_path.entry(p.to_owned()).or_default();
            if !bs.contains(&b) {
                bs.push(b);
            }
        }
    }

    /// The wait after `b`'s next failure.
    fn next_wait(&self, b: &[u8; 32]) -> Duration {
        self.retry
            .get(b)
            .map_or(Duration::from_secs(1), |(_, w, _)| *w)
    }

    /// `b`'s wait for a holder is over.
    fn end_wait(&mut self, b: &[u8; 32]) -> bool {
        if self.unheld.remove(b).is_none() {
            return false;
        }
        if let Some(r) = self.retry.get_mut(b) {
            r.0 = Instant::now();
        }
        true
    }

    /// News of path `hash`: the wishes that waited for a holder on its account wait no more.
    /// True if one did.
    fn news(&mut self, hash: &str) -> bool {
        let mut any = false;
        for b in self.unheld_by_path.remove(hash).unwrap_or_default() {
            any |= self.end_wait(&b);
        }
        any
    }

    /// The walk passes the wish for `b`, naming path `named`: if it waited for a holder while
    /// naming another, it waits no more (a path with the same bytes was recorded since).
    fn named(&mut self, b: &[u8; 32], named: &str) {
        if self.unheld.get(b).is_some_and(|n| n != named) {
            self.end_wait(b);
        }
    }

    /// News may have been lost: every wish that waited for a holder waits no more.
    fn all_news(&mut self) {
        let now = Instant::now();
        for b in std::mem::take(&mut self.unheld).keys() {
            if let Some(r) = self.retry.get_mut(b) {
                r.0 = now;
            }
        }
        self.unheld_by_path.clear();
    }

    /// `b` is held, or no longer wished: nothing to remember.
    fn forget(&mut self, b: &[u8; 32]) {
        self.retry.remove(b);
        self.large.remove(b);
        self.unheld.remove(b);
    }
}

/// Fetch wished-for NARs until cancelled.
pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut walk = Walk::default();
    // What runs, and whether it is large.
    let mut running: HashMap<[u8; 32], bool> = HashMap::new();
    let mut fetches: JoinSet<([u8; 32], Result<(), String>)> = JoinSet::new();
    let my_id = *ctx.endpoint_key.public().as_bytes();
    let (mut news, mut news_closed) = (ctx.db.subscribe_changed_paths(), false);
    'run: loop {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut instead = Vec::new();
        let mut large_running = running.values().filter(|l| **l).count();
        // Windows of the list until the slots are full, the list ends, or the look has read
        // its share.
        'look: for _ in 0..WINDOWS_PER_LOOK {
            if fetches.len() >= AT_ONCE {
                break;
            }
            let db = ctx.db.clone();
            let after = walk.cursor;
            let Some(window) =
                tokio::task::spawn_blocking(move || db.wants_after(after.as_ref(), WINDOW))
                    .await
                    .ok()
                    .and_then(Result::ok)
            else {
                break;
            };
            let last_window = window.len() < WINDOW;
            for (b, hash) in window {
                if fetches.len() >= AT_ONCE {
                    break;
                }
                walk.pass(&b);
                walk.named(&b, &hash);
                if running.contains_key(&b) || walk.backing_off(&b, now) {
                    continue;
                }
                if large_running >= LARGE_AT_ONCE && walk.known_large(&b) {
                    continue;
                }
                let (db, storage, me) = (ctx.db.clone(), ctx.storage.clone(), my_id);
                let h = hash.clone();
                let looked = tokio::task::spawn_blocking(move || {
                    let here = |c: &crate::db::Claim| storage.holds_blocking(&c.blake3);
                    if crate::killpoint::fault("mesh.eager-lookup-fails") {
                        return Err(crate::db::DbError::Injected);
                    }
                    let Some(rec) = db.path(&h)? else {
                        return Ok(Look::Unwanted);
                    };
                    let Some(served) = rec.served(Some(&me), here) else {
                        return Ok(Look::Unwanted);
                    };
                    if served.blake3 == b {
                        return Ok(Look::Fetch(served.clone(), h, None));
                    }
                    // The path serves another claim; another path with the same bytes may
                    // still serve these (the fetch is then that path's).
                    let still = db.by_blake3(&b)?.into_iter().find_map(|r| {
                        let c = r.served(Some(&me), here).filter(|c| c.blake3 == b)?;
                        Some((c.clone(), r.hash_part().to_owned()))
                    });
                    Ok(match still {
                        Some((c, by)) => Look::Fetch(c, by, Some(served.clone())),
                        None => Look::Instead(served.clone()),
                    })
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
                let (claim, wanted_by) = match looked {
                    Ok(Look::Fetch(c, wanted_by, other)) => {
                        // The path's own served claim is wished for too.
                        if let Some(o) = other {
                            instead.push((o.blake3, hash.clone()));
                        }
                        (c, wanted_by)
                    }
                    // The path serves another claim now (every holder of this one lost it,
                    // and a node holds the other), and no other path serves this one: the
                    // other is wished for instead, if it is not held here already.
                    Ok(Look::Instead(c)) => {
                        walk.forget(&b);
                        gone.push(b);
                        instead.push((c.blake3, hash));
                        continue;
                    }
                    // No record wants these bytes any more.
                    Ok(Look::Unwanted) => {
                        walk.forget(&b);
                        gone.push(b);
                        continue;
                    }
                    // The node's own database failed to answer (an I/O error it reopens
                    // after): the wish stays, and is looked at again after a backoff; the
                    // rest wait for the next look (as when the list cannot be read).
                    Err(e) => {
                        let wait = walk.failed(b, now);
                        tracing::warn!(
                            "mesh: looking up the wish for {hash}: {e}; again in {wait:?}"
                        );
                        break 'look;
                    }
                };
                if !claim.held_by_peer(Some(&my_id)) {
                    // Nobody to fetch it from (every holder lost it): no fetch, no failure.
                    tracing::debug!("mesh: no node holds the NAR of {wanted_by}; waiting for one");
                    walk.unheld(b, &hash, &wanted_by, now);
                    continue;
                }
                let large = claim.nar_size > LARGE;
                if large {
                    walk.is_large(b);
                    if large_running >= LARGE_AT_ONCE {
                        continue;
                    }
                    large_running += 1;
                }
                let t = ctx.transfers.start(Want {
                    claim: claim.clone(),
                    paths: vec![wanted_by],
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
            if fetches.len() >= AT_ONCE {
                // The rest of this window is read again from after the last one started.
                break;
            }
            if last_window {
                walk.wrap();
                break;
            }
        }
        if !gone.is_empty() || !instead.is_empty() {
            let db = ctx.db.clone();
            let _ = tokio::task::spawn_blocking(move || {
                db.unwant(&gone)?;
                db.want(&instead)
            })
            .await;
        }
        // Wait for a reason to look again: news of a path only if it ends a wish's wait.
        let tick = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let look = tokio::select! {
                _ = cancel.cancelled() => break 'run,
                _ = ctx.eager_wake.notified() => true,
                n = news.recv(), if !news_closed => match n {
                    Ok(h) => {
                        let (mut heard, mut lost) = (vec![h], false);
                        crate::db::drain(&mut news, &mut heard, &mut lost);
                        if lost {
                            walk.all_news();
                        }
                        heard.iter().fold(lost, |any, h| walk.news(h) || any)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        walk.all_news();
                        true
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        news_closed = true;
                        false
                    }
                },
                _ = tokio::time::sleep_until(tick) => true,
                Some(done) = fetches.join_next(), if !fetches.is_empty() => {
                    if let Ok((b, r)) = done {
                        running.remove(&b);
                        match r {
                            Ok(()) => walk.forget(&b),
                            Err(e) => {
                                let wait = walk.failed(b, Instant::now());
                                tracing::info!("mesh: eager fetch failed ({e}); trying again in {wait:?}");
                            }
                        }
                    }
                    true
                }
            };
            if look {
                break;
            }
        }
    }
    fetches.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_limits() {
        assert_eq!((AT_ONCE, LARGE_AT_ONCE, LARGE), (8, 2, 4 << 20));
        crate::readme_limits::says(
            "it fetches up to eight NARs at once, at most two of them over 4 MiB",
        );
        // And at most 32 transfers at once, eager and on demand together.
        assert_eq!(crate::mesh::transfer::MAX_TRANSFERS, 32);
        crate::readme_limits::says("At most 32 transfers run at once");
    }

    #[test]
    fn a_failed_fetch_waits_twice_as_long_each_time_up_to_the_cap() {
        let mut w = Walk::default();
        let now = Instant::now();
        let waits: Vec<u64> = (0..12).map(|_| w.failed([1; 32], now).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(w.backing_off(&[1; 32], now));
        assert!(!w.backing_off(&[1; 32], now + MAX_BACKOFF));
        assert!(!w.backing_off(&[2; 32], now));
        w.forget(&[1; 32]);
        assert_eq!(
            w.failed([1; 32], now),
            Duration::from_secs(1),
            "held: backoff anew"
        );
    }

    #[test]
    fn what_a_whole_round_passes_without_is_forgotten() {
        let mut w = Walk::default();
        let now = Instant::now();
        w.failed([1; 32], now);
        w.failed([2; 32], now);
        w.is_large([3; 32]);
        w.is_large([4; 32]);
        // This round passes 1 and 3 (still wished) and ends.
        w.pass(&[1; 32]);
        w.pass(&[3; 32]);
        assert_eq!(w.cursor, Some([3; 32]));
        w.wrap();
        assert_eq!(w.cursor, None, "the next round starts from the first wish");
        // Learned during the round that just ended: kept for one more round.
        assert!(w.backing_off(&[1; 32], now) && w.backing_off(&[2; 32], now));
        assert!(w.known_large(&[3; 32]) && w.known_large(&[4; 32]));
        // The next round passes 1 and 3 again, not 2 and 4: those are no longer wished.
        w.pass(&[1; 32]);
        w.pass(&[3; 32]);
        w.wrap();
        assert!(w.backing_off(&[1; 32], now) && w.known_large(&[3; 32]));
        assert!(!w.backing_off(&[2; 32], now) && !w.known_large(&[4; 32]));
        assert_eq!((w.retry.len(), w.large.len()), (1, 1));
    }

    /// A wish no node holds the NAR of waits for news of its path (the one its wish names,
    /// or the one it was wished for by), or for its wish to name another, not for its backoff.
    #[test]
    fn a_wish_nobody_holds_waits_for_news_of_its_path() {
        let mut w = Walk::default();
        let now = Instant::now();
        let later = || Instant::now();
        w.failed([1; 32], now);
        w.unheld([1; 32], "p", "p", now);
        w.unheld([2; 32], "q", "r", now);
        assert!(w.backing_off(&[1; 32], now + MAX_BACKOFF / 2));
        assert_eq!(w.failed([1; 32], now), Duration::from_secs(2), "kept");
        w.unheld([1; 32], "p", "p", now);
        assert!(!w.news("other"));
        assert!(w.backing_off(&[1; 32], now + Duration::from_secs(1)));
        assert!(w.news("p"));
        assert!(!w.backing_off(&[1; 32], later()), "news of it");
        assert!(w.news("r"), "news of the path it was wished for by");
        assert!(!w.backing_off(&[2; 32], later()));
        assert!(!w.news("q"), "over already");
        // Its wish names another path now (same bytes, recorded since).
        w.unheld([3; 32], "s", "s", now);
        w.named(&[3; 32], "s");
        assert!(w.backing_off(&[3; 32], later()));
        w.named(&[3; 32], "s2");
        assert!(!w.backing_off(&[3; 32], later()));
        w.unheld([4; 32], "t", "t", now);
        w.all_news();
        assert!(!w.backing_off(&[4; 32], later()), "news lost");
        // Forgotten with the wish.
        w.unheld([5; 32], "u", "u", now);
        w.wrap();
        w.wrap();
        assert!(w.unheld.is_empty() && w.unheld_by_path.is_empty() && w.retry.is_empty());
    }
}
