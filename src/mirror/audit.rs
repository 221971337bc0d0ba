//! The bucket audit: what the mirror completed may still go missing from the bucket (a
//! lifecycle rule, an operator's cleanup, a bucket emptied or replaced, an object cut short).
//! Every `[mirror.s3] audit-secs` the mirror lists the bucket once and compares the listing
//! with its outbox (`Db::outbox_audit`): a done path whose narinfo is gone, or whose NAR is gone
//! or of another size, is lost. A narinfo left naming a missing NAR is deleted first, as Nix
//! fails on it rather than build; it is read first, and one naming a NAR the bucket holds whole
//! (checked again just before) stays. The lost paths go to the mirror, which hands them back to
//! its plan (`Db::outbox_again`: only the narinfo where the NAR is whole in the bucket, else
//! the NAR from whoever holds it; a path nobody holds waits, not pending, until someone does).
//! A missing `nix-cache-info` is put back. A partial listing is never acted on; a narinfo that
//! cannot be read or deleted is left for the next audit, which then comes sooner.
//!
//! The listing is held as a sorted list of 64-bit digests of the keys with their sizes (16
//! bytes an object, at most [`MAX_OBJECTS`]), so a bucket of millions of paths is audited in
//! bounded memory; the listing has a deadline, and no new batch starts after it. When audits
//! are due is [`Schedule`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::mpsc;

use super::s3::{Bucket, CACHE_INFO_TYPE, S3Error};
use crate::db::{Db, DbError, Lost};
use crate::nix::NarInfo;

/// Objects an audit lists at most (16 bytes each in memory).
pub const MAX_OBJECTS: u64 = 8 << 20;
/// An audit past this starts no new batch (the next one starts over).
const DEADLINE: Duration = Duration::from_secs(3600);
/// Lost paths handed on per batch (and a read looks at 64 times as many done paths at most).
const BATCH: usize = 1000;
/// Narinfos read (and deleted) at once.
const AT_ONCE: usize = 16;
/// The longest narinfo read.
const MAX_NARINFO: u64 = 1 << 20;

/// Why an audit ended early.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("took longer than {DEADLINE:?}")]
    Deadline,
    #[error("the mirror stopped")]
    Stopped,
}

/// What an audit tells the mirror, in order.
#[derive(Debug)]
pub enum Msg {
    /// Lost paths (hash parts, and whether the NAR is still whole in the bucket), their
    /// dangling narinfos deleted: the mirror's again.
    Lost(Vec<(String, bool)>),
    /// The audit ended.
    End(Result<Found, AuditError>),
}

/// What one audit found (the mirror counts what it did with the lost paths).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// Objects listed.
    pub objects: u64,
    /// Narinfos deleted, as they named a NAR the bucket lost.
    pub dangling: u64,
    /// `nix-cache-info` was missing and was put back.
    pub cache_info: bool,
    /// Narinfos that could not be read or deleted (left for the next audit), and the last
    /// error.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Lost paths an audit names in the log, at most.
const NAMED: usize = 10;

/// What the mirror did with an audit's lost paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Back to the plan, of which `narinfo_only` with their NARs still whole in the bucket.
    pub back: u64,
    pub narinfo_only: u64,
    /// Held by nobody: waiting, not pending, until someone holds them.
    pub gone: u64,
    /// Forgotten here (nobody held them for long): dropped from the outbox.
    pub forgotten: u64,
    /// The first lost paths, by store path (hash part when forgotten).
    pub named: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, again: &crate::db::Again) {
        self.back += again.back.len() as u64;
        self.narinfo_only += again
            .back
            .iter()
            .filter(|(_, s)| matches!(s, crate::db::MirrorState::NarStored { .. }))
            .count() as u64;
        self.gone += again.gone.len() as u64;
        self.forgotten += again.forgotten.len() as u64;
        let room = NAMED.saturating_sub(self.named.len());
        let names = again
            .back
            .iter()
            .map(|(r, _)| &r.store_path)
            .chain(&again.gone)
            .chain(&again.forgotten);
        self.named.extend(names.take(room).cloned());
    }

    pub fn lost(&self) -> u64 {
        self.back + self.gone + self.forgotten
    }
}

/// The bucket's keys as digests with sizes, sorted.
#[derive(Debug, Default)]
pub struct Listing {
    keys: Vec<(u64, u64)>,
}

fn digest(key: &str) -> u64 {
    let h = blake3::hash(key.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl Listing {
    /// Every object of the bucket (under its prefix).
    pub async fn of(bucket: &Bucket) -> Result<Listing, AuditError> {
        let mut keys = Vec::new();
        bucket
            .list_each(MAX_OBJECTS, |key, size| keys.push((digest(key), size)))
            .await?;
        let keys = tokio::task::spawn_blocking(move || {
            keys.sort_unstable();
            keys.shrink_to_fit();
            keys
        })
        .await
        .map_err(|_| AuditError::Stopped)?;
        Ok(Listing { keys })
    }

    /// The size of object `key` (relative to the cache root), if listed.
    pub fn size_of(&self, key: &str) -> Option<u64> {
        let d = digest(key);
        let i = self.keys.partition_point(|(k, _)| *k < d);
        self.keys.get(i).filter(|(k, _)| *k == d).map(|(_, n)| *n)
    }

    pub fn len(&self) -> u64 {
        self.keys.len() as u64
    }
}

/// One audit, told to the mirror through `tell`: list, compare, delete dangling narinfos,
/// hand on the lost paths a batch at a time, put back `nix-cache-info` (`cache_info`, the body
/// the mirror writes) if it is gone, and end.
pub async fn run(bucket: Bucket, db: Db, cache_info: String, tell: mpsc::Sender<Msg>) {
    let end = audit(&bucket, &db, cache_info, &tell).await;
    let _ = tell.send(Msg::End(end)).await;
}

async fn audit(
    bucket: &Bucket,
    db: &Db,
    cache_info: String,
    tell: &mpsc::Sender<Msg>,
) -> Result<Found, AuditError> {
    let started = Instant::now();
    let listed_at = crate::mesh::now_ms() / 1000;
    let listing = tokio::time::timeout(DEADLINE, Listing::of(bucket))
        .await
        .map_err(|_| AuditError::Deadline)??;
    let listing = Arc::new(listing);
    let mut found = Found {
        objects: listing.len(),
        ..Found::default()
    };
    if listing.size_of("nix-cache-info").is_none() {
        bucket
            .put("nix-cache-info", cache_info.into_bytes(), CACHE_INFO_TYPE)
            .await?;
        found.cache_info = true;
    }
    let mut after: Option<String> = None;
    loop {
        if started.elapsed() > DEADLINE {
            return Err(AuditError::Deadline);
        }
        let (d, l) = (db.clone(), listing.clone());
        let from = after.clone();
        let (lost, next) = tokio::task::spawn_blocking(move || {
            d.outbox_audit(from.as_deref(), BATCH, listed_at, &|k| l.size_of(k))
        })
        .await
        .map_err(|_| AuditError::Stopped)??;
        let checked: Vec<Result<Option<(Lost, bool)>, S3Error>> = futures::stream::iter(
            lost.into_iter()
                .map(|l| settle(bucket.clone(), listing.clone(), l)),
        )
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
        let mut batch = Vec::new();
        for c in checked {
            match c {
                Ok(Some((l, deleted))) => {
                    found.dangling += u64::from(deleted);
                    batch.push((l.hash, l.nar_whole));
                }
                Ok(None) => {}
                Err(e) => {
                    found.errors += 1;
                    found.last_error = Some(e.to_string());
                }
            }
        }
        if !batch.is_empty() && tell.send(Msg::Lost(batch)).await.is_err() {
            return Err(AuditError::Stopped);
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(found),
        }
    }
}

/// Settle one lost path's narinfo: a narinfo still there is read, and kept if it names a NAR
/// the bucket holds whole (another writer put the path there since: nothing is lost, `None`),
/// else deleted before the path is handed on: killed between the two, the next audit finds
/// the path done without its narinfo, and hands it on then. Returns the path and whether its
/// narinfo was deleted.
async fn settle(
    bucket: Bucket,
    listing: Arc<Listing>,
    l: Lost,
) -> Result<Option<(Lost, bool)>, S3Error> {
    if !l.dangling {
        return Ok(Some((l, false)));
    }
    let key = format!("{}.narinfo", l.hash);
    let Some(text) = bucket.get_small(&key, MAX_NARINFO).await? else {
        return Ok(Some((l, false)));
    };
    if let Some(info) = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| NarInfo::parse(t).ok())
    {
        let whole =
            |size: Option<u64>| size.is_some() && info.file_size.is_none_or(|n| size == Some(n));
        // The listing may be an hour old: ask the bucket itself before deleting.
        if whole(listing.size_of(&info.url)) || whole(bucket.size_of(&info.url).await?) {
            return Ok(None);
        }
    }
    bucket.delete(&key).await?;
    Ok(Some((l, true)))
}

/// The first audit runs this long after the bucket is ready, at most (`audit-secs` apart after
/// that): a restart after a bucket was emptied mends it soon. An audit that failed, or left
/// narinfos unsettled, is followed as soon.
pub const FIRST_AUDIT: Duration = Duration::from_secs(600);

/// When the next audit is due. `audit-secs = 0`: never (a bucket whose lifecycle rule is meant
/// to forget is not fought). Pure.
#[derive(Debug, Clone)]
pub struct Schedule {
    every: Duration,
    at: Option<tokio::time::Instant>,
}

impl Schedule {
    /// Audits `every` apart, for a bucket ready at `now`.
    pub fn new(every: Duration, now: tokio::time::Instant) -> Self {
        Schedule {
            every,
            at: (!every.is_zero()).then(|| now + every.min(FIRST_AUDIT)),
        }
    }

    /// When the next audit is due, if ever.
    pub fn at(&self) -> Option<tokio::time::Instant> {
        self.at
    }

    /// An audit started at `now`: the next one is a whole `every` later.
    pub fn started(&mut self, now: tokio::time::Instant) {
        if !self.every.is_zero() {
            self.at = Some(now + self.every);
        }
    }

    /// An audit that failed, or left work for the next (`clean` false), ended at `now`: the
    /// next one comes sooner.
    pub fn ended(&mut self, now: tokio::time::Instant, clean: bool) {
        if !clean && !self.every.is_zero() {
            self.at = Some(now + self.every.min(FIRST_AUDIT));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_answers_sizes_by_key() {
        let mut keys: Vec<(u64, u64)> = (0..1000u64)
            .map(|i| (digest(&format!("nar/{i}.nar.zst")), i))
            .collect();
        keys.sort_unstable();
        let l = Listing { keys };
        assert_eq!(l.size_of("nar/7.nar.zst"), Some(7));
        assert_eq!(l.size_of("nar/999.nar.zst"), Some(999));
        assert_eq!(l.size_of("nar/1000.nar.zst"), None);
        assert_eq!(l.size_of(""), None);
        assert_eq!(l.len(), 1000);
    }

    #[test]
    fn audits_are_due_every_audit_secs_sooner_after_a_failure_and_never_at_zero() {
        let now = tokio::time::Instant::now();
        let day = Duration::from_secs(86_400);
        let mut s = Schedule::new(day, now);
        assert_eq!(
            s.at(),
            Some(now + FIRST_AUDIT),
            "the first at most 10 minutes after start"
        );
        assert_eq!(FIRST_AUDIT, Duration::from_secs(600));
        s.started(now + FIRST_AUDIT);
        assert_eq!(s.at(), Some(now + FIRST_AUDIT + day));
        s.ended(now + FIRST_AUDIT * 2, true);
        assert_eq!(
            s.at(),
            Some(now + FIRST_AUDIT + day),
            "a clean audit changes nothing"
        );
        s.ended(now + FIRST_AUDIT * 2, false);
        assert_eq!(
            s.at(),
            Some(now + FIRST_AUDIT * 3),
            "after a failure, 10 minutes"
        );
        let short = Schedule::new(Duration::from_secs(5), now);
        assert_eq!(short.at(), Some(now + Duration::from_secs(5)));
        let mut never = Schedule::new(Duration::ZERO, now);
        never.started(now);
        never.ended(now, false);
        assert_eq!(never.at(), None, "audit-secs = 0: never");
    }
}
