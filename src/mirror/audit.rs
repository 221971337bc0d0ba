//! The bucket audit: what the mirror completed may still go missing from the bucket (a
//! lifecycle rule, an operator's cleanup, a bucket emptied or replaced, an object cut short).
//! Every `[mirror.s3] audit-secs` the mirror lists the bucket once and compares the listing
//! with its outbox: a done path whose narinfo is gone, or whose NAR is gone or of another
//! size, goes back to pending and up again (`Db::outbox_again`), NAR before narinfo as
//! always. A narinfo left naming a missing NAR is deleted first, as Nix fails on it rather than
//! build; a missing `nix-cache-info` is put back. A partial listing is never acted on.
//!
//! The listing is held as a sorted list of 64-bit digests of the keys with their sizes (16
//! bytes an object, at most [`MAX_OBJECTS`]), so a bucket of millions of paths is audited in
//! bounded memory, and the whole audit has a deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;

use super::s3::{Bucket, CACHE_INFO_TYPE, S3Error};
use crate::db::{Db, DbError, PathRecord};

/// Objects an audit lists at most (16 bytes each in memory).
pub const MAX_OBJECTS: u64 = 8 << 20;
/// An audit that takes longer is abandoned (the next one starts over).
const DEADLINE: Duration = Duration::from_secs(3600);
/// Lost paths handed on per batch (and a read looks at 64 times as many done paths at most).
const BATCH: usize = 1000;
/// Dangling narinfos deleted at once.
const DELETES_AT_ONCE: usize = 16;

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

/// What one audit found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Objects listed.
    pub objects: u64,
    /// Done paths put back to pending.
    pub again: u64,
    /// Narinfos deleted, as they named a NAR the bucket lost.
    pub dangling: u64,
    /// Lost paths whose records are gone (nobody held them any more): not put back.
    pub unrecoverable: u64,
    /// `nix-cache-info` was missing and was put back.
    pub cache_info: bool,
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
    pub async fn of(bucket: &Bucket) -> Result<Listing, S3Error> {
        let mut keys = Vec::new();
        bucket
            .list_each(MAX_OBJECTS, |key, size| keys.push((digest(key), size)))
            .await?;
        keys.sort_unstable();
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One audit: list, compare, delete dangling narinfos, put paths back (each batch of records
/// sent to the mirror's plan through `again`), put back `nix-cache-info` (`cache_info`, the
/// body the mirror writes) if it is gone.
pub async fn run(
    bucket: Bucket,
    db: Db,
    cache_info: String,
    again: mpsc::Sender<Vec<PathRecord>>,
) -> Result<Found, AuditError> {
    tokio::time::timeout(DEADLINE, audit(bucket, db, cache_info, again))
        .await
        .unwrap_or(Err(AuditError::Deadline))
}

async fn audit(
    bucket: Bucket,
    db: Db,
    cache_info: String,
    again: mpsc::Sender<Vec<PathRecord>>,
) -> Result<Found, AuditError> {
    let listed_at = unix_now();
    let listing = std::sync::Arc::new(Listing::of(&bucket).await?);
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
        let (d, l) = (db.clone(), listing.clone());
        let from = after.clone();
        let (lost, next) = tokio::task::spawn_blocking(move || {
            d.outbox_audit(from.as_deref(), BATCH, listed_at, &|k| l.size_of(k))
        })
        .await
        .map_err(|_| AuditError::Stopped)??;
        // A narinfo naming a lost NAR goes before its path is pending again: killed between
        // the two, the next audit finds the path done without its narinfo, and puts it back.
        let dangling: Vec<String> = lost
            .iter()
            .filter(|l| l.dangling)
            .map(|l| format!("{}.narinfo", l.hash))
            .collect();
        found.dangling += dangling.len() as u64;
        let deletes = dangling.into_iter().map(|key| {
            let b = bucket.clone();
            async move { b.delete(&key).await }
        });
        futures::stream::iter(deletes)
            .buffer_unordered(DELETES_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        found.unrecoverable += lost.iter().filter(|l| !l.again).count() as u64;
        let hashes: Vec<String> = lost
            .into_iter()
            .filter(|l| l.again)
            .map(|l| l.hash)
            .collect();
        if !hashes.is_empty() {
            let d = db.clone();
            let recs = tokio::task::spawn_blocking(move || d.outbox_again(&hashes))
                .await
                .map_err(|_| AuditError::Stopped)??;
            found.again += recs.len() as u64;
            if again.send(recs).await.is_err() {
                return Err(AuditError::Stopped);
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(found),
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
}
