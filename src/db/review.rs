//! Reviewing a peer after a long absence. A path nobody holds is forgotten, log entry and all,
//! after `[store] forget-after-secs` (see `forget`): a node that has not read a peer's log to
//! its end for longer than that (it was down; or it never did, and knows the peer's paths from
//! gossip) may have missed the withdrawal that made a path dead, and would keep the peer's old
//! "holds" statement for ever. So its next catch-up with that peer reads the peer's whole log
//! again, and every record that said the peer holds its NAR is checked against it:
//! - in an entry where the peer says it holds the NAR it serves: kept;
//! - in an entry where it does not (an entry carries the peer's own statement exactly when it
//!   holds the claim served, or has withdrawn it): the peer's statements of holding give way,
//!   unless one is on another claim than the one served, which the entry cannot judge (kept);
//! - not in the log at all: they give way (a node keeps the record of what it holds, and every
//!   record is in its log).
//!
//! Giving way, once the log is read to its end: a signed statement becomes a local, unsigned
//! "no longer holds" stamped now (never passed on, since only signed statements are; no
//! statement the peer made before now, relayed by anyone, undoes it; one it signs later does),
//! an unsigned hint (a version 1 peer's) is dropped (its next announcement may name the peer
//! again). While a review reads the log, each batch counts as a catch-up, so only a review
//! that stalls longer than `forget-after-secs` starts over.

use redb::{ReadableDatabase, ReadableMultimapTable, ReadableTable};

use super::paths::{record_in, relog};
use super::{CURSORS, Db, DbError, LOG, LOG_INDEX, META, PATHS, PathRecord, Provider, durable};

/// When catch-up with each peer last read its log to the end: peer -> unix seconds.
pub(super) const SYNCED: redb::TableDefinition<&[u8], u64> =
    redb::TableDefinition::new("synced_at_v1");
/// Paths whose records say the peer holds their NAR, not seen in its log yet: peer -> hash
/// parts.
pub(super) const REVIEW: redb::MultimapTableDefinition<&[u8], &str> =
    redb::MultimapTableDefinition::new("review_v1");
/// Reviews under way: peer -> when it started (unix seconds). Written once the paths waiting
/// are all written, so a review cut short by a crash while it starts is started again.
pub(super) const REVIEWING: redb::TableDefinition<&[u8], u64> =
    redb::TableDefinition::new("reviewing_v1");

/// Paths written per commit when a review starts or ends.
const PART: usize = 4096;

impl Db {
    /// When catch-up with `peer` last read its log to the end (unix seconds), if ever.
    pub fn synced_at(&self, peer: &[u8; 32]) -> Result<Option<u64>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        Ok(tx
            .open_table(SYNCED)?
            .get(peer.as_slice())?
            .map(|v| v.value()))
    }

    /// Catch-up with `peer` read its log to the end at `now`. Written only when the stored
    /// time is `every` seconds old (it need only be precise to a fraction of the absence that
    /// starts a review), and not fsync'd: a time lost to a crash is an older one, which can
    /// only start a review early.
    pub fn set_synced(&self, peer: &[u8; 32], now: u64, every: u64) -> Result<(), DbError> {
        if self
            .synced_at(peer)?
            .is_some_and(|t| t.saturating_add(every) > now)
        {
            return Ok(());
        }
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(redb::Durability::None)?;
        tx.open_table(SYNCED)?.insert(peer.as_slice(), now)?;
        tx.commit()?;
        Ok(())
    }

    /// Start reviewing `peer` at `now` (see the module), or start a stalled review over: its
    /// catch-up cursor goes back to 0, every path whose record says the peer holds its NAR
    /// waits to be seen in its log, and the peer counts as synced now. Returns how many wait
    /// (none: no review is under way). The cursor goes back first and the review counts as
    /// under way only once every path waiting is written, so a crash in between starts it
    /// again; the records are read from a snapshot and written [`PART`] at a time, so the
    /// database's one writer is never held for long.
    pub fn begin_review(&self, peer: &[u8; 32], now: u64) -> Result<usize, DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            tx.open_multimap_table(REVIEW)?
                .remove_all(peer.as_slice())?;
            tx.open_table(REVIEWING)?.remove(peer.as_slice())?;
            tx.open_table(CURSORS)?.insert(peer.as_slice(), 0)?;
        }
        tx.commit()?;
        let snapshot = db.begin_read()?;
        let paths = snapshot.open_table(PATHS)?;
        let mut n = 0;
        let mut part: Vec<String> = Vec::with_capacity(PART);
        let mut entries = paths.iter()?;
        loop {
            let next = entries.next().transpose()?;
            if let Some((h, v)) = &next {
                let rec: PathRecord = postcard::from_bytes(v.value())?;
                if says_it_holds(&rec, peer) {
                    part.push(h.value().to_owned());
                }
            }
            if part.len() == PART || (next.is_none() && !part.is_empty()) {
                let mut tx = super::writes::begin(&db)?;
                tx.set_durability(redb::Durability::None)?;
                {
                    let mut review = tx.open_multimap_table(REVIEW)?;
                    for h in part.drain(..) {
                        review.insert(peer.as_slice(), h.as_str())?;
                        n += 1;
                    }
                }
                tx.commit()?;
            }
            if next.is_none() {
                break;
            }
        }
        let tx = durable(&db)?;
        tx.open_table(SYNCED)?.insert(peer.as_slice(), now)?;
        if n > 0 {
            tx.open_table(REVIEWING)?.insert(peer.as_slice(), now)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Whether a review of `peer` is under way.
    pub fn reviewing(&self, peer: &[u8; 32]) -> Result<bool, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        Ok(tx.open_table(REVIEWING)?.get(peer.as_slice())?.is_some())
    }

    /// A batch of the peer's log, read at `now` under review: for each entry, its path (hash
    /// part), the BLAKE3 of the claim it serves, and whether the peer says in it that it holds
    /// that NAR. The paths it settles (see the module) are no longer waiting, and the peer
    /// counts as synced at `now` (the review is making progress). Called before the batch is
    /// taken in and the cursor moves past it (redb keeps commits in order: a crash that loses
    /// this loses the cursor's move too, and the batch is asked for again). Not fsync'd.
    pub fn confirm(
        &self,
        peer: &[u8; 32],
        now: u64,
        seen: &[(String, [u8; 32], bool)],
    ) -> Result<(), DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        tx.set_durability(redb::Durability::None)?;
        {
            let mut review = tx.open_multimap_table(REVIEW)?;
            let paths = tx.open_table(PATHS)?;
            for (h, served, says_it_holds) in seen {
                let settled = *says_it_holds
                    || record_in(&paths, h)?.is_some_and(|r| {
                        r.claims.iter().any(|c| {
                            &c.blake3 != served
                                && c.providers.iter().any(|p| &p.id == peer && p.holds)
                        })
                    });
                if settled {
                    review.remove(peer.as_slice(), h.as_str())?;
                }
            }
            tx.open_table(SYNCED)?.insert(peer.as_slice(), now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The peer's log was read to its end: on every path still waiting, the peer's statements
    /// of holding give way (see the module; stamped `now_ms`) and the path moves to the end of
    /// the log; fsync'd commits of [`PART`] paths each, the last of which ends the review.
    /// Returns how many paths changed.
    pub fn end_review(&self, peer: &[u8; 32], now_ms: u64) -> Result<usize, DbError> {
        let mut n = 0;
        loop {
            let db = self.db.get()?;
            let tx = durable(&db)?;
            let mut changed = Vec::new();
            let more;
            {
                let mut review = tx.open_multimap_table(REVIEW)?;
                let mut paths = tx.open_table(PATHS)?;
                let mut log = tx.open_table(LOG)?;
                let mut index = tx.open_table(LOG_INDEX)?;
                let mut meta = tx.open_table(META)?;
                let waiting: Vec<String> = review
                    .get(peer.as_slice())?
                    .take(PART)
                    .map(|h| h.map(|h| h.value().to_owned()))
                    .collect::<Result<_, _>>()?;
                more = waiting.len() == PART;
                for h in waiting {
                    review.remove(peer.as_slice(), h.as_str())?;
                    let Some(mut rec) = record_in(&paths, &h)? else {
                        continue;
                    };
                    if !disprove(&mut rec, peer, now_ms) {
                        continue;
                    }
                    paths.insert(h.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
                    relog(&mut log, &mut index, &mut meta, &h)?;
                    changed.push(h);
                }
            }
            if !more {
                tx.open_table(REVIEWING)?.remove(peer.as_slice())?;
            }
            tx.commit()?;
            n += changed.len();
            self.announce_changes(changed);
            if !more {
                return Ok(n);
            }
        }
    }
}

/// Whether a claim of the record has the peer's statement that it holds the NAR.
fn says_it_holds(rec: &PathRecord, peer: &[u8; 32]) -> bool {
    rec.claims
        .iter()
        .any(|c| c.providers.iter().any(|p| &p.id == peer && p.holds))
}

/// The peer's statements of holding give way (see the module); true if any did.
fn disprove(rec: &mut PathRecord, peer: &[u8; 32], now_ms: u64) -> bool {
    let mut any = false;
    for c in &mut rec.claims {
        let before = c.providers.len();
        c.providers
            .retain(|p| !(&p.id == peer && p.holds && p.sig.is_empty()));
        any |= c.providers.len() != before;
        for p in c.providers.iter_mut().filter(|p| &p.id == peer && p.holds) {
            *p = Provider {
                id: *peer,
                holds: false,
                at_ms: now_ms.max(p.at_ms.saturating_add(1)),
                sig: Vec::new(),
            };
            any = true;
        }
    }
    any
}
