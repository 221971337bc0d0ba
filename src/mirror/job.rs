//! The mirror's two uploads: a path's NAR and its narinfo (the signed record pointing at the
//! compressed NAR). The NAR is read verified from the storage, or from its transfer while it
//! still arrives from peers, and compressed into a temporary file on a low-priority thread; a
//! NAR of at least the multipart threshold goes up in parts while it is compressed, under
//! `nar/<NarHash>` (known before the end), a smaller one whole once complete, under
//! `nar/<FileHash>` as Nix names it. Each is idempotent: after a crash it is simply done again,
//! and a NAR already in the bucket with the same size is not uploaded twice.

use std::path::PathBuf;
use std::time::Instant;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use super::compress::{Compressor, FileDigest};
use super::s3::{Bucket, Growth, NAR_TYPE, NARINFO_TYPE, S3Error, UploadLog};
use crate::config::Compression;
use crate::db::{Claim, Db, MirrorState, OpenUpload, PathRecord};
use crate::mesh::Arriving;
use crate::nix::{NarInfo, Sha256, base32};
use crate::storage::Storage;

/// What the mirror needs of a record: the claim it uploads.
#[derive(Debug, Clone)]
pub struct Entry {
    pub store_path: String,
    pub hash: String,
    pub narinfo: String,
    pub blake3: [u8; 32],
    pub nar_size: u64,
    /// Hash parts of references signed upstream (not waited for).
    pub upstream_refs: Vec<String>,
}

impl Entry {
    /// One claim of the record.
    pub fn of(rec: &PathRecord, c: &Claim) -> Self {
        Entry {
            store_path: rec.store_path.clone(),
            hash: rec.hash_part().to_owned(),
            narinfo: c.narinfo.clone(),
            blake3: c.blake3,
            nar_size: c.nar_size,
            upstream_refs: c.upstream_refs.clone(),
        }
    }

    /// What the mirror uploads of a path in `state`: the claim whose NAR is in the bucket
    /// already (its narinfo must go with it), else the one the path serves (`served`, given
    /// what this node can read), with the state that goes with it. A stored NAR whose claim
    /// failed or left the record goes up again, as the served claim's.
    pub fn choose(
        rec: &PathRecord,
        state: MirrorState,
        served: Option<&Claim>,
    ) -> Option<(Self, MirrorState)> {
        if let MirrorState::NarStored { blake3, .. } = &state {
            let stored = match blake3 {
                Some(b) => rec.claim(b).filter(|c| !c.failed),
                // Stored by an earlier release: the first claim not failed, then.
                None => rec.active(),
            };
            if let Some(c) = stored {
                return Some((Self::of(rec, c), state));
            }
        }
        let state = match state {
            MirrorState::Done => MirrorState::Done,
            _ => MirrorState::Pending,
        };
        Some((Self::of(rec, served?), state))
    }

    /// Hash parts of the references the narinfo must wait for: not itself, not signed upstream.
    pub fn references(&self) -> Vec<String> {
        let Ok(info) = NarInfo::parse(&self.narinfo) else {
            return Vec::new();
        };
        info.references
            .iter()
            .map(|r| r.hash_part().to_owned())
            .filter(|r| *r != self.hash && !self.upstream_refs.contains(r))
            .collect()
    }
}

/// Why an upload failed.
#[derive(Debug)]
pub enum JobError {
    /// The bucket asked to slow down.
    SlowDown(String),
    /// The NAR is neither held here nor arriving (a transfer ended between the plan's look and
    /// the job's): not a failure, the path waits for its NAR again.
    NotHere,
    /// The bucket as a whole failed (credentials refused, no bucket, no answer at all): every
    /// other upload would too, so the mirror pauses until the bucket answers again.
    Bucket(String),
    Other(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::SlowDown(m) | JobError::Bucket(m) | JobError::Other(m) => f.write_str(m),
            JobError::NotHere => f.write_str("the NAR is not here"),
        }
    }
}

impl From<S3Error> for JobError {
    fn from(e: S3Error) -> Self {
        match e {
            e @ S3Error::SlowDown { .. } => JobError::SlowDown(e.to_string()),
            e @ (S3Error::Auth { .. } | S3Error::NoBucket { .. } | S3Error::Unreachable { .. }) => {
                JobError::Bucket(e.to_string())
            }
            e => JobError::Other(e.to_string()),
        }
    }
}

/// Multipart upload ids kept in the node database.
pub struct DbUploads(pub Db);

impl UploadLog for DbUploads {
    async fn intent(&self, key: &str) -> Result<String, S3Error> {
        let (db, key2) = (self.0.clone(), key.to_owned());
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let failed = |message: String| S3Error::Other {
            op: "recording an upload",
            key: key.to_owned(),
            message,
        };
        tokio::task::spawn_blocking(move || db.upload_intent(&key2, at_ms))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))
    }

    async fn started(&self, id: &str, key: &str, intent: &str) -> Result<(), S3Error> {
        let (db, id2, key2, intent) = (
            self.0.clone(),
            id.to_owned(),
            key.to_owned(),
            intent.to_owned(),
        );
        let failed = |message: String| S3Error::Other {
            op: "recording an upload",
            key: key.to_owned(),
            message,
        };
        tokio::task::spawn_blocking(move || db.upload_started(&id2, &key2, &intent))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))
    }

    async fn ended(&self, id: &str) {
        let (db, id) = (self.0.clone(), id.to_owned());
        let _ = tokio::task::spawn_blocking(move || db.upload_ended(&id)).await;
    }

    async fn intents_of(&self, key: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let (db, key2) = (self.0.clone(), key.to_owned());
        let failed = |message: String| S3Error::Other {
            op: "reading recorded uploads",
            key: key.to_owned(),
            message,
        };
        let open = tokio::task::spawn_blocking(move || db.open_uploads())
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(open
            .into_iter()
            .filter_map(|u| match u {
                OpenUpload::Intent { token, key, at_ms } if key == key2 => Some((token, at_ms)),
                _ => None,
            })
            .collect())
    }
}

/// Compress one NAR and put it in the bucket (unless an identical object is there already, as
/// after a crash between upload and commit).
pub struct NarJob {
    pub rec: Entry,
    pub how: Compression,
    pub tmp: PathBuf,
    pub storage: Storage,
    pub bucket: Bucket,
    pub db: Db,
    /// Ask the bucket first whether the object is there (only worth a request when an
    /// earlier attempt may have put it).
    pub check_first: bool,
    /// Compressing is CPU work: a few at a time, on low-priority threads.
    pub compressing: crate::background::Background,
    /// NARs arriving from peers (none without a mesh).
    pub arriving: Option<Arriving>,
}

/// Hand a stream of NAR pieces on to the compressor, errors as I/O errors.
async fn feed<E: std::fmt::Display>(
    mut from: mpsc::Receiver<Result<Bytes, E>>,
    to: mpsc::Sender<std::io::Result<Bytes>>,
) {
    while let Some(chunk) = from.recv().await {
        let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
        if to.send(chunk).await.is_err() {
            return;
        }
    }
}

impl NarJob {
    /// Compress and upload; `Ok` says where the NAR is in the bucket, and whether it was read
    /// while it still arrived from peers.
    pub async fn run(self) -> Result<(MirrorState, bool), JobError> {
        // Few pieces ahead: a job waiting for a compressing thread holds its read's share of
        // `[store] read-memory` meanwhile.
        let (tx, rx) = mpsc::channel(2);
        let b = self.rec.blake3;
        let held = || async {
            self.storage
                .held(&b)
                .await
                .map(|h| h.is_some())
                .map_err(|e| JobError::Other(e.to_string()))
        };
        let arriving = if held().await? {
            None
        } else {
            let guard = self.storage.hold(&b);
            match self.arriving.as_ref().and_then(|a| a.follow(&b, guard)) {
                Some(nar) => Some(nar),
                // Its transfer may have ended just now, leaving it held.
                None if held().await? => None,
                None => return Err(JobError::NotHere),
            }
        };
        let streamed = arriving.is_some();
        let feeder = AbortOnDropHandle::new(match arriving {
            Some(nar) => tokio::spawn(feed(nar, tx)),
            None => {
                let nar = self
                    .storage
                    .read(&b, 0, self.rec.nar_size)
                    .await
                    .map_err(|e| JobError::Other(e.to_string()))?;
                tokio::spawn(feed(nar, tx))
            }
        });
        let started = Instant::now();
        // A NAR of at least the multipart threshold goes up in parts while it is compressed,
        // under a key known before its end: its NarHash's.
        let growth = Arc::new(watch::Sender::new(Growth::default()));
        let large = self.rec.nar_size >= self.bucket.multipart_threshold();
        let early = match (self.check_first || !large, self.narhash_url()) {
            (false, Some(url)) => Some(AbortOnDropHandle::new(tokio::spawn(upload_early(
                self.bucket.clone(),
                url,
                self.tmp.clone(),
                DbUploads(self.db.clone()),
                self.bucket
                    .part_size_for(compressed_bound(self.rec.nar_size)),
                growth.subscribe(),
            )))),
            _ => None,
        };
        let digest = self.compress(rx, growth.clone(), streamed).await;
        feeder.abort();
        growth.send_modify(|g| {
            g.end = Some(digest.as_ref().map(|d| d.size).map_err(|_| ()));
        });
        let early = match early {
            Some(task) => task
                .await
                .map_err(|e| JobError::Other(format!("the upload task failed: {e}")))
                .and_then(|r| r.map_err(JobError::from)),
            None => Ok(None),
        };
        let digest = match digest {
            Ok(d) => d,
            Err(e) => {
                remove(self.tmp.clone()).await;
                return Err(e);
            }
        };
        let compressed = started.elapsed();
        let result = match early {
            Ok(Some(url)) => Ok(url),
            Ok(None) => self.upload_whole(&digest).await.map_err(JobError::from),
            Err(e) => Err(e),
        };
        remove(self.tmp.clone()).await;
        let url = result?;
        crate::killpoint::reach("mirror.nar-stored");
        tracing::debug!(
            "mirror: {} -> {url} ({} bytes): compressed in {compressed:?}, stored in {:?}",
            self.rec.store_path,
            digest.size,
            started.elapsed()
        );
        Ok((
            MirrorState::NarStored {
                url,
                compression: self.how.name().to_owned(),
                file_hash: digest.sha256,
                file_size: digest.size,
                blake3: Some(self.rec.blake3),
            },
            streamed,
        ))
    }

    /// True if the bucket still holds the object an identical NAR was put at (`state`), whole.
    pub async fn still_there(&self, state: &MirrorState) -> bool {
        let MirrorState::NarStored { url, file_size, .. } = state else {
            return false;
        };
        matches!(self.bucket.size_of(url).await, Ok(Some(n)) if n == *file_size)
    }

    /// The bucket key of the compressed NAR named by `hash` (its file hash, or its NarHash).
    fn nar_key(&self, hash: &[u8; 32]) -> String {
        format!("nar/{}.nar{}", base32::encode(hash), self.how.extension())
    }

    /// The key of the compressed NAR named by its NarHash (known before compressing).
    fn narhash_url(&self) -> Option<String> {
        let info = NarInfo::parse(&self.rec.narinfo).ok()?;
        Some(self.nar_key(&info.nar_hash.0))
    }

    /// Put the compressed file, complete, under the key its file hash names, unless (on a
    /// retry) an earlier attempt put it there or, for a NAR of at least the threshold, under its
    /// NarHash's: where it is.
    async fn upload_whole(&self, digest: &FileDigest) -> Result<String, S3Error> {
        let url = self.nar_key(&digest.sha256);
        let log = DbUploads(self.db.clone());
        if self.check_first {
            let mut earlier = vec![url.clone()];
            // A first attempt put a NAR of at least the threshold in parts, under its NarHash.
            if self.rec.nar_size >= self.bucket.multipart_threshold() {
                earlier.extend(self.narhash_url());
            }
            for u in earlier {
                if self.bucket.size_of(&u).await? == Some(digest.size) {
                    return Ok(u);
                }
            }
        }
        self.bucket
            .put_file(&url, &self.tmp, digest.size, NAR_TYPE, &log)
            .await?;
        Ok(url)
    }

    /// Compress the NAR's pieces on the low-priority threads. One held here is read from
    /// the local disk: it is compressed in one go, one NAR after another on each thread, so each
    /// is complete (and uploaded) while the next compresses. One still arriving is fed a batch
    /// at a time (what has arrived, up to [`BATCH`]): between batches no thread waits for the
    /// network.
    async fn compress(
        &self,
        mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
        growth: Arc<watch::Sender<Growth>>,
        arriving: bool,
    ) -> Result<FileDigest, JobError> {
        let failed = || JobError::Other("the compressing thread failed".into());
        let err = |e: std::io::Error| JobError::Other(format!("compressing the NAR: {e}"));
        let (how, tmp, size) = (self.how, self.tmp.clone(), self.rec.nar_size);
        // A stream that ends early without an error is never taken for the whole NAR.
        let short = move |got: u64| {
            std::io::Error::other(format!("the NAR ended after {got} of its {size} bytes"))
        };
        if !arriving {
            return self
                .compressing
                .run(move || {
                    let mut c = Compressor::new(how, &tmp, Some(growth))?;
                    let mut got = 0u64;
                    while let Some(piece) = rx.blocking_recv() {
                        let piece = piece?;
                        got += piece.len() as u64;
                        c.write(&piece)?;
                    }
                    if got != size {
                        return Err(short(got));
                    }
                    c.finish()
                })
                .await
                .ok_or_else(failed)?
                .map_err(err);
        }
        let mut c = self
            .compressing
            .run(move || Compressor::new(how, &tmp, Some(growth)))
            .await
            .ok_or_else(failed)?
            .map_err(err)?;
        let mut got = 0u64;
        loop {
            let (batch, open) = match next_batch(&mut rx).await {
                Ok(b) => b,
                // The transfer failed (the mesh retries it): the path waits for its NAR again,
                // and the compressor is dropped where dropping it may still compress.
                Err(_) => {
                    let _ = self.compressing.run(move || drop(c)).await;
                    return Err(JobError::NotHere);
                }
            };
            got += batch.iter().map(|p| p.len() as u64).sum::<u64>();
            if !batch.is_empty() {
                c = self
                    .compressing
                    .run(move || {
                        for piece in &batch {
                            c.write(piece)?;
                        }
                        Ok::<_, std::io::Error>(c)
                    })
                    .await
                    .ok_or_else(failed)?
                    .map_err(err)?;
            }
            if !open {
                break;
            }
        }
        if got != size {
            let _ = self.compressing.run(move || drop(c)).await;
            return Err(err(short(got)));
        }
        self.compressing
            .run(move || c.finish())
            .await
            .ok_or_else(failed)?
            .map_err(err)
    }
}

/// The pieces that have arrived, up to [`BATCH`] bytes, waiting only for the first; and
/// whether more may come. An error piece is the stream's error.
async fn next_batch(
    rx: &mut mpsc::Receiver<std::io::Result<Bytes>>,
) -> std::io::Result<(Vec<Bytes>, bool)> {
    let mut batch = Vec::new();
    let mut len = 0;
    match rx.recv().await {
        Some(piece) => {
            let piece = piece?;
            len += piece.len();
            batch.push(piece);
        }
        None => return Ok((batch, false)),
    }
    while len < BATCH {
        match rx.try_recv() {
            Ok(piece) => {
                let piece = piece?;
                len += piece.len();
                batch.push(piece);
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => return Ok((batch, false)),
        }
    }
    Ok((batch, true))
}

/// Wait until the compressed file holds its first part, then put it as object `url` in parts
/// as it grows: `Some(url)` once complete, `None` if it ended smaller than one part (it then
/// goes up whole) or its compressing failed.
async fn upload_early(
    bucket: Bucket,
    url: String,
    tmp: PathBuf,
    log: DbUploads,
    part: u64,
    mut growth: watch::Receiver<Growth>,
) -> Result<Option<String>, S3Error> {
    loop {
        let g = *growth.borrow_and_update();
        match g.end {
            Some(Ok(size)) if size >= part => break,
            Some(_) => return Ok(None),
            None if g.written >= part => break,
            None => {}
        }
        if growth.changed().await.is_err() {
            return Ok(None);
        }
    }
    bucket
        .put_growing(&url, &tmp, NAR_TYPE, &log, part, growth)
        .await?;
    Ok(Some(url))
}

/// The most a NAR of `size` bytes can take compressed (zstd's and xz's worst cases are a
/// fraction of a percent over the input; `none` is the input).
fn compressed_bound(size: u64) -> u64 {
    size.saturating_add(size / 64).saturating_add(1 << 20)
}

/// Bytes compressed in one go on a compressing thread (at most; less if less has arrived).
const BATCH: usize = 1 << 20;

/// Remove a temporary file, off the async threads.
async fn remove(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
}

/// The narinfo as the bucket serves it: the signed record, pointing at the compressed NAR.
pub fn bucket_narinfo(rec: &Entry, state: &MirrorState) -> Result<String, String> {
    let MirrorState::NarStored {
        url,
        compression,
        file_hash,
        file_size,
        blake3,
    } = state
    else {
        return Err("the NAR is not in the bucket yet".into());
    };
    if blake3.is_some_and(|b| b != rec.blake3) {
        // Never a narinfo over another build's NAR (Nix would fail on its NarHash).
        return Err("the NAR in the bucket is another claim's".into());
    }
    let mut info = NarInfo::parse(&rec.narinfo).map_err(|e| e.to_string())?;
    info.url = url.clone();
    info.compression = compression.clone();
    info.file_hash = Some(Sha256(*file_hash));
    info.file_size = Some(*file_size);
    Ok(info.render())
}

/// Put a path's narinfo in the bucket.
pub async fn put_narinfo(
    bucket: &Bucket,
    rec: &Entry,
    state: &MirrorState,
) -> Result<(), JobError> {
    let text = bucket_narinfo(rec, state).map_err(JobError::Other)?;
    bucket
        .put(
            &format!("{}.narinfo", rec.hash),
            text.into_bytes(),
            NARINFO_TYPE,
        )
        .await?;
    crate::killpoint::reach("mirror.narinfo-put");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(b: u8) -> Claim {
        Claim {
            narinfo: format!(
                "StorePath: /nix/store/{}-x\nURL: nar/x.nar\nCompression: none\nNarHash: \
                 sha256:{}\nNarSize: 7\nReferences: \n",
                "a".repeat(32),
                base32::encode(&[b; 32])
            ),
            blake3: [b; 32],
            nar_size: 7,
            bindings: vec![],
            upstream_refs: vec![],
            own: false,
            providers: vec![],
            failed: false,
            withdrawn: false,
        }
    }

    fn stored(blake3: Option<u8>) -> MirrorState {
        MirrorState::NarStored {
            url: "nar/f.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: [0; 32],
            file_size: 5,
            blake3: blake3.map(|b| [b; 32]),
        }
    }

    /// The claim a path uploads: the one whose NAR is in the bucket (whatever the path serves
    /// by then), else the served one; a stored NAR whose claim failed goes up again; one an
    /// earlier release stored is the first claim not failed's. Its narinfo never goes up over
    /// another claim's NAR.
    #[test]
    fn the_narinfo_follows_the_claim_whose_nar_is_in_the_bucket() {
        let mut rec = PathRecord {
            store_path: format!("/nix/store/{}-x", "a".repeat(32)),
            claims: vec![claim(1), claim(2)],
            recorded_at: 0,
        };
        let served = Some(&rec.claims[0]);
        let (e, s) = Entry::choose(&rec, stored(Some(2)), served).unwrap();
        assert_eq!((e.blake3, s.clone()), ([2; 32], stored(Some(2))));
        let text = bucket_narinfo(&e, &s).unwrap();
        assert!(text.contains(&base32::encode(&[2; 32])), "{text}");
        let wrong = Entry::of(&rec, &rec.claims[0]);
        assert!(bucket_narinfo(&wrong, &s).is_err());
        let (e, s) = Entry::choose(&rec, stored(None), Some(&rec.claims[1])).unwrap();
        assert_eq!(
            (e.blake3, s),
            ([1; 32], stored(None)),
            "an earlier release's"
        );
        let (e, s) = Entry::choose(&rec, MirrorState::Pending, Some(&rec.claims[1])).unwrap();
        assert_eq!((e.blake3, s), ([2; 32], MirrorState::Pending));
        rec.claims[1].failed = true;
        let served = Some(&rec.claims[0]);
        let (e, s) = Entry::choose(&rec, stored(Some(2)), served).unwrap();
        assert_eq!((e.blake3, s), ([1; 32], MirrorState::Pending), "up again");
        assert!(Entry::choose(&rec, MirrorState::Pending, None).is_none());
    }
}
