//! Forgetting dead records. A path that nobody holds any more (every provider withdrew it: Nix
//! GC, `nix-store --delete`, eviction; this node holds it neither in its store nor as a file)
//! is dropped once it has been unchanged for the caller's `after`, with its log entry and every
//! row that names it: the database, and every new node's catch-up, then follow what the
//! cluster holds rather than everything it ever built.
//!
//! Which log entries are that old is told by *marks*: each step notes the log's last sequence
//! number with the time, so the entries up to the newest mark at least `after` old have not
//! changed since. A path that dies moves to the end of the log (every withdrawal changes its
//! record), so one cursor walks the log once: an entry it passed alive comes back behind it
//! when it dies. Kept whatever their state: pinned paths and the paths of every NAR in a
//! pinned closure, and on the mirror node the paths not yet done in the bucket (or not yet
//! taken into its outbox). A log entry left without its record goes too, and so does the
//! outbox row of a path an audit found gone from the bucket while nobody held it.

use redb::{ReadableMultimapTable, ReadableTable};

use super::leaves::Leaves;
use super::outbox::OUTBOX;
use super::paths::record_in;
use super::storage::{NARS, OWN, PINS, WANTS, held_here};
use super::{
    BLOBS, Db, DbError, LOG, LOG_INDEX, LOG_NEXT, META, MirrorState, PATHS, PathRecord, bump,
    durable, get_meta,
};

/// Marks: unix seconds -> the log's last sequence number then.
pub(super) const MARKS: redb::TableDefinition<u64, u64> =
    redb::TableDefinition::new("forget_marks_v1");
/// Where the walk stopped: the last log sequence number it examined.
const CURSOR: &str = "forget.cursor";
/// Records forgotten, ever.
pub(super) const FORGOTTEN: &str = "records.forgotten";
/// The mirror's cursor in the log (see `outbox`).
const MIRROR_CURSOR: &str = "mirror.cursor";

/// One step of forgetting.
#[derive(Debug, Clone, Copy)]
pub struct ForgetStep<'a> {
    /// This node's endpoint id: its own statements in records are judged by what its storage
    /// holds, not by what peers repeat of them.
    pub me: Option<&'a [u8; 32]>,
    /// Unix seconds now.
    pub now: u64,
    /// Seconds a record must be unchanged before it may be forgotten.
    pub after: u64,
    /// Log entries examined at most in this step.
    pub limit: usize,
    /// This node runs the S3 mirror: paths not done in its bucket are kept.
    pub mirror: bool,
    /// NARs of pinned closures (`narmesh pin`): their paths are kept.
    pub pinned: &'a std::collections::HashSet<[u8; 32]>,
}

/// What a step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Hash parts of the records dropped.
    pub hashes: Vec<String>,
    /// The step stopped at its limit: entries old enough remain to be examined.
    pub more: bool,
}

/// Whether nobody holds any of the record's NARs: no claim this node holds (as an own path or
/// a file) or keeps for a pinned closure, and no other provider's latest statement says it
/// holds one. Failed claims count too: while their bytes are about, the record is what keeps
/// them from being taken in again.
fn dead(
    rec: &PathRecord,
    step: &ForgetStep<'_>,
    nars: &impl ReadableTable<&'static [u8], &'static [u8]>,
    own: &impl ReadableMultimapTable<&'static [u8], &'static str>,
) -> Result<bool, DbError> {
    let me = step.me;
    for c in &rec.claims {
        if step.pinned.contains(&c.blake3) || held_here(nars, own, c.blake3.as_slice())? {
            return Ok(false);
        }
        if c.held_by_peer(me) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Db {
    /// One step of forgetting (see the module): note a mark at `step.now`, then examine at most
    /// `step.limit` log entries unchanged for `step.after` seconds, from where the last step
    /// stopped, and drop the dead ones. One fsync'd commit.
    pub fn forget_dead(&self, step: ForgetStep<'_>) -> Result<Forgotten, DbError> {
        let db = self.db.get()?;
        let tx = durable(&db)?;
        let mut out = Forgotten::default();
        {
            let mut meta = tx.open_table(META)?;
            let mut marks = tx.open_table(MARKS)?;
            let last = get_meta(&meta, LOG_NEXT)?;
            let noted = marks.get(step.now)?.map(|v| v.value()).unwrap_or(0);
            marks.insert(step.now, last.max(noted))?;
            // The newest mark old enough; the older ones are of no more use.
            let old_enough = step.now.saturating_sub(step.after);
            let found = marks
                .range(..=old_enough)?
                .next_back()
                .transpose()?
                .map(|(t, seq)| (t.value(), seq.value()));
            let Some((mark_at, mut cut)) = found else {
                drop((meta, marks));
                tx.commit()?;
                return Ok(out);
            };
            let older: Vec<u64> = marks
                .range(..mark_at)?
                .map(|e| e.map(|(t, _)| t.value()))
                .collect::<Result<_, _>>()?;
            for t in older {
                marks.remove(t)?;
            }
            if step.mirror {
                cut = cut.min(get_meta(&meta, MIRROR_CURSOR)?);
            }
            let from = get_meta(&meta, CURSOR)?;
            let mut log = tx.open_table(LOG)?;
            let entries: Vec<(u64, String)> = if cut > from {
                log.range(from + 1..=cut)?
                    .take(step.limit)
                    .map(|e| e.map(|(s, h)| (s.value(), h.value().to_owned())))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            out.more = entries.len() == step.limit;
            let mut paths = tx.open_table(PATHS)?;
            let mut index = tx.open_table(LOG_INDEX)?;
            let mut blobs = tx.open_multimap_table(BLOBS)?;
            let mut leaves = Leaves::open(&tx)?;
            let mut wants = tx.open_table(WANTS)?;
            let nars = tx.open_table(NARS)?;
            let own = tx.open_multimap_table(OWN)?;
            let pins = tx.open_table(PINS)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let finished = tx.open_table(super::audit::FINISHED)?;
            let mut claims = tx.open_table(super::outbox::MIRROR_CLAIMS)?;
            for (seq, hash) in &entries {
                let Some(rec) = record_in(&paths, hash)? else {
                    // An entry left without its record: nothing to offer.
                    log.remove(*seq)?;
                    if index.get(hash.as_str())?.map(|v| v.value()) == Some(*seq) {
                        index.remove(hash.as_str())?;
                    }
                    continue;
                };
                if pins.get(hash.as_str())?.is_some() || !dead(&rec, &step, &nars, &own)? {
                    continue;
                }
                let pending = step.mirror
                    && outbox
                        .get(hash.as_str())?
                        .map(|v| postcard::from_bytes::<MirrorState>(v.value()))
                        .transpose()?
                        .is_some_and(|s| s != MirrorState::Done);
                if pending {
                    continue;
                }
                paths.remove(hash.as_str())?;
                log.remove(*seq)?;
                index.remove(hash.as_str())?;
                if super::audit::is_gone(&finished, hash)? {
                    // Lost from the bucket while nobody held it, and now forgotten: the outbox
                    // has nothing to say of it any more (audits walk it); its end stays, so a
                    // record of it that comes back is taken in once someone holds it.
                    outbox.remove(hash.as_str())?;
                    claims.remove(hash.as_str())?;
                }
                for c in &rec.claims {
                    let b = c.blake3.as_slice();
                    blobs.remove(b, hash.as_str())?;
                    // Another path whose record still claims these bytes (a row may be left
                    // from a claim its record no longer has).
                    let mut other = None;
                    for h in blobs.get(b)? {
                        let h = h?.value().to_owned();
                        if record_in(&paths, &h)?.is_some_and(|r| r.claim(&c.blake3).is_some()) {
                            other = Some(h);
                            break;
                        }
                    }
                    let wished = wants.get(b)?.map(|v| v.value().to_owned());
                    match other {
                        // Nobody else claims these bytes: nothing of them is wanted or kept.
                        None => {
                            wants.remove(b)?;
                            if !held_here(&nars, &own, b)? {
                                leaves.remove(&c.blake3)?;
                            }
                        }
                        Some(other) if wished.as_deref() == Some(hash.as_str()) => {
                            wants.insert(b, other.as_str())?;
                        }
                        Some(_) => {}
                    }
                }
                out.hashes.push(hash.clone());
            }
            if let Some((seq, _)) = entries.last() {
                meta.insert(CURSOR, *seq)?;
            }
            if !out.hashes.is_empty() {
                bump(&mut meta, FORGOTTEN, out.hashes.len() as u64)?;
            }
        }
        tx.commit()?;
        if !out.hashes.is_empty() {
            self.announce_changes(out.hashes.clone());
        }
        Ok(out)
    }
}
