//! The mirror's two uploads: a path's NAR (read verified from the storage, compressed to a
//! temporary file on a low-priority thread, put in the bucket) and its narinfo (the signed
//! record pointing at the compressed NAR). Each is idempotent: after a crash it is simply done
//! again, and a NAR already in the bucket with the same size is not uploaded twice.

use std::path::PathBuf;
use std::time::Instant;

use tokio::sync::mpsc;

use super::compress::compress_into;
use super::s3::{Bucket, NAR_TYPE, NARINFO_TYPE, S3Error, UploadLog};
use crate::config::Compression;
use crate::db::{Db, MirrorState, OpenUpload, PathRecord};
use crate::nix::{NarInfo, Sha256, base32};
use crate::storage::Storage;

/// What the mirror needs of a record: its served claim.
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
    pub fn of(rec: &PathRecord) -> Option<Self> {
        let c = rec.active()?;
        Some(Entry {
            store_path: rec.store_path.clone(),
            hash: rec.hash_part().to_owned(),
            narinfo: c.narinfo.clone(),
            blake3: c.blake3,
            nar_size: c.nar_size,
            upstream_refs: c.upstream_refs.clone(),
        })
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
    Other(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::SlowDown(m) | JobError::Other(m) => f.write_str(m),
        }
    }
}

impl From<S3Error> for JobError {
    fn from(e: S3Error) -> Self {
        match e {
            e @ S3Error::SlowDown { .. } => JobError::SlowDown(e.to_string()),
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
}

impl NarJob {
    pub async fn run(self) -> Result<MirrorState, JobError> {
        let (tx, rx) = mpsc::channel(8);
        let mut nar = self
            .storage
            .read(&self.rec.blake3, 0, self.rec.nar_size)
            .await
            .map_err(|e| JobError::Other(e.to_string()))?;
        let feeder = tokio::spawn(async move {
            while let Some(chunk) = nar.recv().await {
                let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let (how, tmp) = (self.how, self.tmp.clone());
        let started = Instant::now();
        let digest = self
            .compressing
            .run(move || compress_into(rx, how, &tmp))
            .await
            .ok_or_else(|| JobError::Other("the compressing thread failed".into()))?
            .map_err(|e| JobError::Other(format!("compressing the NAR: {e}")));
        let _ = feeder.await;
        let digest = match digest {
            Ok(d) => d,
            Err(e) => {
                remove(self.tmp.clone()).await;
                return Err(e);
            }
        };
        let url = format!(
            "nar/{}.nar{}",
            base32::encode(&digest.sha256),
            self.how.extension()
        );
        let compressed = started.elapsed();
        let log = DbUploads(self.db.clone());
        let result = async {
            if !self.check_first || self.bucket.size_of(&url).await? != Some(digest.size) {
                self.bucket
                    .put_file(&url, &self.tmp, digest.size, NAR_TYPE, &log)
                    .await?;
            }
            Ok::<_, S3Error>(())
        }
        .await;
        remove(self.tmp.clone()).await;
        result?;
        crate::killpoint::reach("mirror.nar-stored");
        tracing::debug!(
            "mirror: {} -> {url} ({} bytes): compressed in {compressed:?}, stored in {:?}",
            self.rec.store_path,
            digest.size,
            started.elapsed()
        );
        Ok(MirrorState::NarStored {
            url,
            compression: self.how.name().to_owned(),
            file_hash: digest.sha256,
            file_size: digest.size,
        })
    }
}

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
    } = state
    else {
        return Err("the NAR is not in the bucket yet".into());
    };
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
