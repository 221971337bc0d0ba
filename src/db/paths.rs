//! Recording paths: the pipeline's own (with the leaves that verify them, served from the local
//! Nix store) and claims learnt from peers; reading records back; and the log that catch-up
//! serves, in which a path moves to the end whenever its record or what this node holds of it
//! changes, so peers learn of withdrawals as they learn of new paths.

use redb::{ReadableDatabase, ReadableMultimapTable, ReadableTable};

use super::leaves::Leaves;
use super::storage::{NARS, OWN, OWN_BYTES, OWN_PATHS};
use super::{
    BLOBS, CURSORS, Claim, Db, DbError, FAILURES, LOG, LOG_INDEX, LOG_NEXT, META, PATHS,
    PathRecord, bump, durable, lower,
};

/// A path the pipeline made from the local Nix store: its record's own claim, and the leaves
/// of its NAR (what serving it from the store verifies against).
#[derive(Debug, Clone)]
pub struct OwnRecord {
    pub store_path: String,
    pub claim: Claim,
    pub leaves: Vec<u8>,
}

/// A claim about a path, learnt from a peer and checked.
#[derive(Debug, Clone)]
pub struct RemoteClaim {
    pub store_path: String,
    pub claim: Claim,
}

/// Records checked per commit when the trust configuration changed.
pub(super) const RETRUST_BATCH: usize = 1024;

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode(v: &[u8]) -> Result<PathRecord, DbError> {
    Ok(postcard::from_bytes(v)?)
}

/// The record of `hash` in an open `PATHS` table.
pub(super) fn record_in(
    paths: &impl ReadableTable<&'static str, &'static [u8]>,
    hash: &str,
) -> Result<Option<PathRecord>, DbError> {
    paths.get(hash)?.map(|v| decode(v.value())).transpose()
}

/// Change the claim on `blake3` of every path with one by `f` (true if it changed it), and move
/// the paths to the end of the log: every one (`all`), or those changed; their hash parts go to
/// `changed`. A row of the index naming a path whose record no longer claims those bytes (left
/// by a release that did not remove it) goes.
pub(super) fn change_claims(
    tx: &redb::WriteTransaction,
    blake3: &[u8; 32],
    all: bool,
    changed: &mut Vec<String>,
    mut f: impl FnMut(&mut Claim) -> bool,
) -> Result<(), DbError> {
    let mut blobs = tx.open_multimap_table(BLOBS)?;
    let mut paths = tx.open_table(PATHS)?;
    let mut log = tx.open_table(LOG)?;
    let mut index = tx.open_table(LOG_INDEX)?;
    let mut meta = tx.open_table(META)?;
    let named: Vec<String> = blobs
        .get(blake3.as_slice())?
        .map(|h| Ok(h?.value().to_owned()))
        .collect::<Result<_, DbError>>()?;
    for h in named {
        let Some(mut rec) = record_in(&paths, &h)? else {
            continue;
        };
        let Some(claim) = rec.claim_mut(blake3) else {
            blobs.remove(blake3.as_slice(), h.as_str())?;
            continue;
        };
        let news = f(claim);
        if news {
            paths.insert(h.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
        }
        if news || all {
            relog(&mut log, &mut index, &mut meta, &h)?;
            changed.push(h);
        }
    }
    Ok(())
}

/// Move `hash`'s entry to the end of the log.
pub(super) fn relog(
    log: &mut redb::Table<u64, &str>,
    index: &mut redb::Table<&str, u64>,
    meta: &mut redb::Table<&str, u64>,
    hash: &str,
) -> Result<(), DbError> {
    if let Some(old) = index.get(hash)?.map(|v| v.value()) {
        log.remove(old)?;
    }
    let seq = bump(meta, LOG_NEXT, 1)? + 1;
    log.insert(seq, hash)?;
    index.insert(hash, seq)?;
    Ok(())
}

impl Db {
    /// In one fsync'd transaction: record the pipeline's paths (an own claim each, first in its
    /// record; the NAR's leaves kept) and count `failures`; then take the finished reports
    /// `done` off the queue (after the records are durable: a crash in between plans them again).
    pub fn record_own(
        &self,
        done: &[u64],
        records: &[OwnRecord],
        failures: u64,
    ) -> Result<(), DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut changed = Vec::new();
        // Bytes of earlier builds no longer held at all: the paths claiming them are told.
        let mut gone = Vec::new();
        {
            let mut paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let mut blobs = tx.open_multimap_table(BLOBS)?;
            let mut own = tx.open_multimap_table(OWN)?;
            let mut leaves = Leaves::open(&tx)?;
            let nars = tx.open_table(NARS)?;
            for r in records {
                let hash = super::hash_part_of(&r.store_path).to_owned();
                let mut rec = match paths.get(hash.as_str())? {
                    Some(v) => decode(v.value())?,
                    None => PathRecord {
                        store_path: r.store_path.clone(),
                        claims: Vec::new(),
                        recorded_at: now_secs(),
                    },
                };
                if rec.own().is_some_and(|c| c.blake3 == r.claim.blake3) {
                    continue;
                }
                let rebuilt = rec.own().map(|c| (c.blake3, c.nar_size));
                if let Some((old, size)) = rebuilt {
                    // Built again with other bytes: the new build replaces the old claim.
                    own.remove(old.as_slice(), hash.as_str())?;
                    if own.get(old.as_slice())?.next().is_none() {
                        lower(&mut meta, OWN_BYTES, size)?;
                        if nars.get(old.as_slice())?.is_none() {
                            leaves.remove(&old)?;
                            gone.push(old);
                        }
                    }
                }
                let before = rec.blake3s();
                rec.merge(r.claim.clone());
                paths.insert(hash.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
                unindex_dropped(&mut blobs, &rec, &before)?;
                blobs.insert(r.claim.blake3.as_slice(), hash.as_str())?;
                let first = own.get(r.claim.blake3.as_slice())?.next().is_none();
                own.insert(r.claim.blake3.as_slice(), hash.as_str())?;
                if first {
                    bump(&mut meta, OWN_BYTES, r.claim.nar_size)?;
                }
                if rebuilt.is_none() {
                    bump(&mut meta, OWN_PATHS, 1)?;
                }
                leaves.insert(&r.claim.blake3, &r.leaves)?;
                relog(&mut log, &mut index, &mut meta, &hash)?;
                changed.push(hash);
            }
            if failures > 0 {
                bump(&mut meta, FAILURES, failures)?;
            }
        }
        for b in &gone {
            // (Unless a later path of the batch has the same bytes: it put their leaves back.)
            let held = tx
                .open_multimap_table(OWN)?
                .get(b.as_slice())?
                .next()
                .is_some();
            if !held {
                super::storage::relog_holders(&tx, b, true, &mut changed)?;
            }
        }
        tx.commit()?;
        {
            let mut recent = self.recent_own.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = recent.as_mut() {
                list.extend(records.iter().map(|r| {
                    let hash = super::hash_part_of(&r.store_path).to_owned();
                    (r.claim.blake3, hash, r.store_path.clone())
                }));
                if list.len() > super::RECENT_OWN {
                    *recent = None;
                }
            }
        }
        self.dequeue(done)?;
        if !records.is_empty() {
            self.changed();
        }
        for h in changed {
            let _ = self.changed_paths.send(h);
        }
        Ok(())
    }

    /// Take in claims learnt from a peer, and move the peer's catch-up cursor to `cursor` if
    /// given, in one fsync'd transaction. A record that is new or changed moves to the end of
    /// the log. Returns the records that are new or changed, as they now stand, each with
    /// whether the claim it took in is new to it (not merely news of its providers). With
    /// `wish` (an eager node), the NAR each record with a new claim serves
    /// ([`PathRecord::served`], `me` being this node) is wished for if not held yet, in the same
    /// commit, so that no crash can leave a claim recorded and never fetched.
    pub fn record_remote(
        &self,
        claims: Vec<RemoteClaim>,
        cursor: Option<(&[u8; 32], u64)>,
        wish: bool,
        me: Option<&[u8; 32]>,
    ) -> Result<Vec<(PathRecord, bool)>, DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        let mut out = Vec::new();
        let mut changed = Vec::new();
        let mut moved = false;
        {
            let mut paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let mut blobs = tx.open_multimap_table(BLOBS)?;
            for c in claims {
                let hash = super::hash_part_of(&c.store_path).to_owned();
                let existing = match paths.get(hash.as_str())? {
                    Some(v) => Some(decode(v.value())?),
                    None => None,
                };
                let mut rec = existing.unwrap_or_else(|| PathRecord {
                    store_path: c.store_path.clone(),
                    claims: Vec::new(),
                    recorded_at: now_secs(),
                });
                let blake3 = c.claim.blake3;
                let new_claim = rec.claim(&blake3).is_none();
                let before = rec.blake3s();
                if !rec.merge(c.claim) {
                    continue;
                }
                paths.insert(hash.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
                unindex_dropped(&mut blobs, &rec, &before)?;
                if rec.claim(&blake3).is_some() {
                    blobs.insert(blake3.as_slice(), hash.as_str())?;
                }
                relog(&mut log, &mut index, &mut meta, &hash)?;
                changed.push(hash);
                out.push((rec, new_claim));
            }
            if wish {
                let mut wants = tx.open_table(super::storage::WANTS)?;
                let nars = tx.open_table(super::storage::NARS)?;
                let own = tx.open_multimap_table(super::storage::OWN)?;
                for (rec, _) in out.iter().filter(|(_, new_claim)| *new_claim) {
                    let Some(c) = super::storage::served_in(rec, me, &nars, &own)? else {
                        continue;
                    };
                    let b = c.blake3.as_slice();
                    if !super::storage::held_here(&nars, &own, b)? {
                        wants.insert(b, rec.hash_part())?;
                    }
                }
            }
            if let Some((peer, seq)) = cursor {
                let mut cursors = tx.open_table(CURSORS)?;
                if cursors.get(peer.as_slice())?.map(|v| v.value()) != Some(seq) {
                    cursors.insert(peer.as_slice(), seq)?;
                    moved = true;
                }
            }
        }
        if out.is_empty() && !moved {
            // Nothing new (a repeated announcement): no commit, no fsync.
            tx.abort()?;
            return Ok(out);
        }
        // Claims learnt from peers are copies: a commit that is not fsync'd is lost in a crash
        // together with every later one (redb keeps commits in order), the catch-up cursors
        // with them, so whatever is lost is asked for again. New claims are fsync'd at most
        // once a second (and news of providers only, hints, never by themselves): an fsync per
        // gossip message on every node made a narinfo wait for the disk on each.
        let due = out.iter().any(|(_, new_claim)| *new_claim) && {
            let mut last = self.remote_synced.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= super::REMOTE_SYNC_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        let durability = if due {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        tx.set_durability(durability)?;
        tx.commit()?;
        if !out.is_empty() {
            self.changed();
        }
        for h in changed {
            let _ = self.changed_paths.send(h);
        }
        Ok(out)
    }

    /// Move the peer's catch-up cursor alone (a batch with nothing to take in).
    pub fn set_cursor(&self, peer: &[u8; 32], seq: u64) -> Result<(), DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        tx.open_table(CURSORS)?.insert(peer.as_slice(), seq)?;
        tx.commit()?;
        Ok(())
    }

    /// Peer `id` answered, over its own connection, that it does not hold the NAR `blake3`:
    /// every claim on it takes that as the peer's word at `at_ms` (this node's clock), a hint
    /// (unsigned, so never relayed) that replaces an older statement that it held it. Its
    /// signed withdrawal may never reach this node: a peer relays only the claim it serves,
    /// and the peer itself speaks of another build once it made one. Without this, a stale
    /// "holds" kept the path serving, wishing for and mirroring a NAR nobody had. A peer's
    /// later signed statement that it holds the NAR again takes its place. Returns the number
    /// of records changed (moved to the end of the log). Not fsync'd: a hint lost in a crash
    /// is learnt again at the next answer.
    pub fn provider_lacks(
        &self,
        blake3: &[u8; 32],
        id: &[u8; 32],
        at_ms: u64,
    ) -> Result<usize, DbError> {
        let db = self.db.get()?;
        let mut tx = super::writes::begin(&db)?;
        let mut changed = Vec::new();
        let hint = super::Provider {
            id: *id,
            holds: false,
            at_ms,
            sig: Vec::new(),
        };
        change_claims(&tx, blake3, false, &mut changed, |c| {
            c.providers.iter().any(|p| &p.id == id && p.holds)
                && super::merge_provider(&mut c.providers, hint.clone())
        })?;
        if changed.is_empty() {
            tx.abort()?;
            return Ok(0);
        }
        tx.set_durability(redb::Durability::None)?;
        tx.commit()?;
        let n = changed.len();
        self.announce_changes(changed);
        Ok(n)
    }

    /// Move these paths to the end of the log (what this node holds of them changed), in one
    /// fsync'd transaction.
    pub fn relog(&self, hashes: &[String]) -> Result<(), DbError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let db = self.db.get()?;
        let tx = durable(&db)?;
        {
            let paths = tx.open_table(PATHS)?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            for h in hashes {
                if paths.get(h.as_str())?.is_some() {
                    relog(&mut log, &mut index, &mut meta, h)?;
                }
            }
        }
        tx.commit()?;
        self.changed();
        for h in hashes {
            let _ = self.changed_paths.send(h.clone());
        }
        Ok(())
    }

    /// Change one record with `f` (which returns true if it changed anything), in one fsync'd
    /// transaction; a changed record moves to the end of the log.
    pub fn update_record(
        &self,
        hash: &str,
        f: impl FnOnce(&mut PathRecord) -> bool,
    ) -> Result<Option<PathRecord>, DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let rec = {
            let mut paths = tx.open_table(PATHS)?;
            let Some(mut rec) = paths.get(hash)?.map(|v| decode(v.value())).transpose()? else {
                return Ok(None);
            };
            if !f(&mut rec) {
                return Ok(Some(rec));
            }
            paths.insert(hash, postcard::to_allocvec(&rec)?.as_slice())?;
            let mut log = tx.open_table(LOG)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut meta = tx.open_table(META)?;
            relog(&mut log, &mut index, &mut meta, hash)?;
            rec
        };
        tx.commit()?;
        self.changed();
        let _ = self.changed_paths.send(hash.to_owned());
        Ok(Some(rec))
    }

    /// Which of these claims could change what is recorded (see [`PathRecord::could_change`]),
    /// by hash part, BLAKE3, bindings and provider statements; in one read.
    pub fn could_change<'a>(
        &self,
        claims: impl IntoIterator<
            Item = (
                &'a str,
                &'a [u8; 32],
                u64,
                &'a [String],
                Vec<super::records::StatementView>,
            ),
        >,
    ) -> Result<Vec<bool>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        claims
            .into_iter()
            .map(|(h, blake3, nar_size, bindings, providers)| {
                Ok(match paths.get(h)? {
                    None => true,
                    Some(v) => {
                        decode(v.value())?.could_change(blake3, nar_size, bindings, providers)
                    }
                })
            })
            .collect()
    }

    /// Which of these hash parts are recorded.
    pub fn known(&self, hash_parts: &[&str]) -> Result<Vec<bool>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        hash_parts
            .iter()
            .map(|h| Ok(paths.get(*h)?.is_some()))
            .collect()
    }

    /// Which of these hash parts are recorded with a claim of this node's own (made from its
    /// store): the pipeline skips those, and ingests the rest even if peers recorded them.
    pub fn has_own(&self, hash_parts: &[&str]) -> Result<Vec<bool>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        let own = tx.open_multimap_table(OWN)?;
        hash_parts
            .iter()
            .map(|h| {
                let Some(v) = paths.get(*h)? else {
                    return Ok(false);
                };
                let rec = decode(v.value())?;
                let Some(c) = rec.own() else {
                    return Ok(false);
                };
                // Its store copy may have been lost since (the claim stays for its providers).
                Ok(own
                    .get(c.blake3.as_slice())?
                    .any(|x| x.is_ok_and(|x| x.value() == *h)))
            })
            .collect()
    }

    /// The record of one path, by hash part.
    pub fn path(&self, hash_part: &str) -> Result<Option<PathRecord>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        paths.get(hash_part)?.map(|v| decode(v.value())).transpose()
    }

    /// The records of many paths, in one read.
    pub fn paths(&self, hash_parts: &[String]) -> Result<Vec<Option<PathRecord>>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let paths = tx.open_table(PATHS)?;
        hash_parts
            .iter()
            .map(|h| {
                paths
                    .get(h.as_str())?
                    .map(|v| decode(v.value()))
                    .transpose()
            })
            .collect()
    }

    /// The records with a claim on the NAR with this BLAKE3.
    pub fn by_blake3(&self, blake3: &[u8; 32]) -> Result<Vec<PathRecord>, DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let blobs = tx.open_multimap_table(BLOBS)?;
        let paths = tx.open_table(PATHS)?;
        let mut out = Vec::new();
        for h in blobs.get(blake3.as_slice())? {
            if let Some(v) = paths.get(h?.value())? {
                let rec = decode(v.value())?;
                if rec.claim(blake3).is_some_and(|c| !c.failed) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` log entries after sequence number `after`: (seq, record), and whether more follow.
    pub fn log_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, PathRecord)>, bool), DbError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let log = tx.open_table(LOG)?;
        let paths = tx.open_table(PATHS)?;
        let mut out = Vec::new();
        let mut more = false;
        for entry in log.range(after.saturating_add(1)..)? {
            let (seq, hash) = entry?;
            if out.len() == limit {
                more = true;
                break;
            }
            if let Some(v) = paths.get(hash.value())? {
                out.push((seq.value(), decode(v.value())?));
            }
        }
        Ok((out, more))
    }
}

impl Db {
    /// The trust configuration changed (its fingerprint is new): every claim not made here is
    /// checked again with `keep` (which returns it as it may stay, or `None`), records left
    /// without claims are removed, and every peer's catch-up cursor goes back to 0 so entries
    /// refused before are offered again. [`RETRUST_BATCH`] records per commit, so neither the
    /// memory nor the database's one writer is held by all of them at once; the new fingerprint
    /// and the cursors' reset are in the last commit, so a check cut short is done again at
    /// the next start. Returns (claims dropped, records removed).
    pub fn retrust(
        &self,
        fingerprint: u64,
        keep: impl Fn(&str, &Claim) -> Option<Claim>,
    ) -> Result<(usize, usize), DbError> {
        let db = self.db.get()?;
        let (mut dropped, mut removed) = (0, 0);
        let mut after: Option<String> = None;
        loop {
            let tx = durable(&db)?;
            let mut changed = Vec::new();
            let last;
            {
                let mut paths = tx.open_table(PATHS)?;
                let mut log = tx.open_table(LOG)?;
                let mut index = tx.open_table(LOG_INDEX)?;
                let mut meta = tx.open_table(META)?;
                let mut blobs = tx.open_multimap_table(BLOBS)?;
                let from = match &after {
                    Some(h) => std::ops::Bound::Excluded(h.as_str()),
                    None => std::ops::Bound::Unbounded,
                };
                let batch: Vec<(String, PathRecord)> = paths
                    .range::<&str>((from, std::ops::Bound::Unbounded))?
                    .take(RETRUST_BATCH)
                    .map(|e| {
                        let (h, v) = e?;
                        Ok((h.value().to_owned(), decode(v.value())?))
                    })
                    .collect::<Result<_, DbError>>()?;
                last = batch.len() < RETRUST_BATCH;
                after = batch.last().map(|(h, _)| h.clone());
                for (hash, mut rec) in batch {
                    let before = rec.claims.clone();
                    let store_path = rec.store_path.clone();
                    rec.claims = before
                        .iter()
                        .filter_map(|c| {
                            if c.own {
                                Some(c.clone())
                            } else {
                                keep(&store_path, c)
                            }
                        })
                        .collect();
                    if rec.claims == before {
                        continue;
                    }
                    for c in &before {
                        if rec.claim(&c.blake3).is_none() {
                            dropped += 1;
                            blobs.remove(c.blake3.as_slice(), hash.as_str())?;
                        }
                    }
                    changed.push(hash.clone());
                    if rec.claims.is_empty() {
                        removed += 1;
                        paths.remove(hash.as_str())?;
                        if let Some(seq) = index.remove(hash.as_str())?.map(|v| v.value()) {
                            log.remove(seq)?;
                        }
                    } else {
                        paths.insert(hash.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
                        relog(&mut log, &mut index, &mut meta, &hash)?;
                    }
                }
                if last {
                    let mut cursors = tx.open_table(CURSORS)?;
                    let peers: Vec<Vec<u8>> = cursors
                        .iter()?
                        .map(|e| e.map(|(k, _)| k.value().to_vec()))
                        .collect::<Result<_, _>>()?;
                    for p in peers {
                        cursors.remove(p.as_slice())?;
                    }
                    meta.insert(super::TRUST_FINGERPRINT, fingerprint)?;
                }
            }
            tx.commit()?;
            if !changed.is_empty() || last {
                self.changed();
            }
            for h in changed {
                let _ = self.changed_paths.send(h);
            }
            if last {
                return Ok((dropped, removed));
            }
        }
    }
}

/// The claims (by BLAKE3) a merge dropped from `rec` (an own build of other bytes replaces the
/// earlier own claim; past the most claims a record keeps, the last goes) leave the index of
/// paths by NAR, where nothing else would ever remove them.
fn unindex_dropped(
    blobs: &mut redb::MultimapTable<'_, &'static [u8], &'static str>,
    rec: &PathRecord,
    before: &[[u8; 32]],
) -> Result<(), DbError> {
    for b in before.iter().filter(|b| rec.claim(b).is_none()) {
        blobs.remove(b.as_slice(), rec.hash_part())?;
    }
    Ok(())
}
