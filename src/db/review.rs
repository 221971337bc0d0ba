//! Reviewing a peer after a long absence. A path nobody holds is forgotten, log entry and all,
//! after `[store] forget-after-secs` (see `forget`): a node that has not read a peer's log to
//! its end for longer than that (it was down; or it never did, and knows the peer's paths from
//! gossip) may have missed the withdrawal that made a path dead, and would keep the peer's old
//! "holds" statement for ever. So its next catch-up with that peer reads the peer's whole log
//! again, and every record that said the peer holds its NAR must be confirmed by an
//! entry in which the peer still says so; what is not confirmed once the log is read to its
//! end, the peer no longer holds (a node holding a NAR keeps its record, and the record is in
//! its log). The peer's statement there becomes a local, unsigned "no longer holds" of that
//! moment: never passed on (only signed statements are), and overridden only by a statement
//! the peer signs later.

use redb::{ReadableDatabase, ReadableMultimapTable, ReadableTable};

use super::paths::{record_in, relog};
use super::{CURSORS, Db, DbError, LOG, LOG_INDEX, META, PATHS, PathRecord, Provider, durable};

/// When catch-up with each peer last read its log to the end: peer -> unix seconds.
pub(super) const SYNCED: redb::TableDefinition<&[u8], u64> =
    redb::TableDefinition::new("synced_at_v1");
/// Paths whose records say the peer holds their NAR, not confirmed by its log yet: peer ->
/// hash parts.
pub(super) const REVIEW: redb::MultimapTableDefinition<&[u8], &str> =
    redb::MultimapTableDefinition::new("review_v1");

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
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        tx.open_table(SYNCED)?.insert(peer.as_slice(), now)?;
        tx.commit()?;
        Ok(())
    }

    /// Start reviewing `peer` at `now` (see the module): its catch-up cursor goes back to 0,
    /// every path whose record says the peer holds its NAR waits to be confirmed (a review
    /// under way is known by them, across rounds and restarts), and the peer counts as synced
    /// now (the review does not start again). Returns how many wait. The cursor goes first (a
    /// crash while the rest is written leaves a review of fewer paths, never one that would
    /// miss part of the log); the records are read from a snapshot and written
    /// [`PART`] at a time, so the database's one writer is never held for long.
    pub fn begin_review(&self, peer: &[u8; 32], now: u64) -> Result<usize, DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            tx.open_multimap_table(REVIEW)?
                .remove_all(peer.as_slice())?;
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
                let mut tx = db.begin_write()?;
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
        tx.commit()?;
        Ok(n)
    }

    /// Whether a review of `peer` is under way.
    pub fn reviewing(&self, peer: &[u8; 32]) -> Result<bool, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        Ok(tx
            .open_multimap_table(REVIEW)?
            .get(peer.as_slice())?
            .next()
            .is_some())
    }

    /// The peer's log says it holds these paths' NARs (by hash part): confirmed. Not fsync'd
    /// (a confirmation lost to a crash is asked for again: the cursor goes with it).
    pub fn confirm(&self, peer: &[u8; 32], hashes: &[&str]) -> Result<(), DbError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        {
            let mut review = tx.open_multimap_table(REVIEW)?;
            for h in hashes {
                review.remove(peer.as_slice(), *h)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The peer's log was read to its end: on every path still waiting, the peer's statement
    /// becomes an unsigned "no longer holds" made at `now_ms`, and the path moves to the end of
    /// the log; fsync'd commits of [`PART`] paths each. Returns how many paths changed.
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

/// Replace the peer's statements of holding with an unsigned "no longer holds" at `now_ms`;
/// true if any was.
fn disprove(rec: &mut PathRecord, peer: &[u8; 32], now_ms: u64) -> bool {
    let mut any = false;
    for c in &mut rec.claims {
        for p in c.providers.iter_mut().filter(|p| &p.id == peer && p.holds) {
            *p = Provider {
                id: *peer,
                holds: false,
                at_ms: now_ms.max(p.at_ms + 1),
                sig: Vec::new(),
            };
            any = true;
        }
    }
    any
}
