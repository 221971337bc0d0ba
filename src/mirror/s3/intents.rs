//! Multipart uploads this mirror may have left open, and how they are found again: the upload
//! log (intents before CreateMultipartUpload, ids after), creating an upload one try per
//! intent, settling an intent whose answer never came, and aborting. One upload of a key at a
//! time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::ProvideErrorMetadata;

use super::{Bucket, S3Error};

/// A key being uploaded; released when dropped.
pub(super) struct KeyClaim {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Tries of CreateMultipartUpload in one attempt at a NAR (200 ms apart, doubling).
pub(super) const CREATE_TRIES: u32 = 4;

/// Where a mirror keeps the ids of the multipart uploads it starts, so that after a crash it
/// aborts its own and never anyone else's.
pub trait UploadLog: Send + Sync {
    /// An upload of `key` is about to be created (durably, before the request); its token.
    fn intent(&self, key: &str) -> impl Future<Output = Result<String, S3Error>> + Send;
    /// It was created with `id`, in place of the intent `intent`.
    fn started(
        &self,
        id: &str,
        key: &str,
        intent: &str,
    ) -> impl Future<Output = Result<(), S3Error>> + Send;
    /// An upload (or an intent) is over.
    fn ended(&self, id: &str) -> impl Future<Output = ()> + Send;
    /// The intents still recorded for `key`: token and when (unix ms).
    fn intents_of(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<(String, u64)>, S3Error>> + Send;
}

/// An upload found under the key of an intent is taken as this mirror's if the bucket says it
/// was initiated at most this long before the intent was recorded (clocks differ).
const INTENT_SKEW: Duration = Duration::from_secs(60);

impl Bucket {
    /// The multipart uploads open under exactly `key` (prefix included): id and when each was
    /// initiated (unix ms, when the bucket says). At most 10 pages of the listing.
    pub async fn uploads_of(&self, key: &str) -> Result<Vec<(String, Option<i64>)>, S3Error> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        for _ in 0..10 {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(key)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.err("ListMultipartUploads", key, e))?;
            for u in page.uploads() {
                if u.key() == Some(key)
                    && let Some(id) = u.upload_id()
                {
                    out.push((
                        id.to_owned(),
                        u.initiated().and_then(|t| t.to_millis().ok()),
                    ));
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Mark `key` as being uploaded by this mirror until the guard goes; refused if it is
    /// already (the job retries later and then finds the object there).
    pub(super) fn claim_key(&self, key: &str) -> Result<KeyClaim, S3Error> {
        let mut keys = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.to_owned()) {
            return Err(S3Error::Other {
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                message: "an upload of the same bytes is in flight".into(),
            });
        }
        Ok(KeyClaim {
            keys: self.uploading.clone(),
            key: key.to_owned(),
        })
    }

    /// Create a multipart upload of `key`, each try under a fresh intent. An earlier try whose
    /// answer never came (the bucket may have created an upload) is settled before the next:
    /// the uploads under the key from then are aborted and its intent ends, so intents do not
    /// pile up on a flaky link. The SDK does not retry this call itself: a second upload made
    /// under one intent after a lost answer would be recorded nowhere.
    pub(super) async fn create_upload(
        &self,
        key: &str,
        content_type: &str,
        log: &impl UploadLog,
    ) -> Result<(String, String), S3Error> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            // If the bucket cannot say what is open, this try stops here and adds no intent.
            for (token, at_ms) in log.intents_of(key).await? {
                self.settle_intent(key, at_ms).await?;
                log.ended(&token).await;
            }
            let intent = log.intent(key).await?;
            let created = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .customize()
                .config_override(
                    aws_sdk_s3::config::Builder::default().retry_config(RetryConfig::disabled()),
                )
                .send()
                .await;
            let e = match created {
                Ok(c) => match c.upload_id().filter(|id| !id.is_empty()) {
                    Some(id) => return Ok((intent, id.to_owned())),
                    // An answer without the upload's id: whatever it created is found by the
                    // intent, which stays to be settled.
                    None => {
                        let e = S3Error::Other {
                            op: "CreateMultipartUpload",
                            key: key.to_owned(),
                            message: "no UploadId in the answer".into(),
                        };
                        if tries >= CREATE_TRIES {
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(tries - 1)).await;
                        continue;
                    }
                },
                Err(e) => e,
            };
            // The bucket said no: nothing was created. Else (no answer) it may have been: the
            // intent stays for the next try (or the next start) to settle.
            if matches!(e, aws_sdk_s3::error::SdkError::ServiceError(_)) {
                log.ended(&intent).await;
            }
            let e = self.err("CreateMultipartUpload", key, e);
            if tries >= CREATE_TRIES || matches!(e, S3Error::Auth { .. } | S3Error::NoBucket { .. })
            {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(tries - 1)).await;
        }
    }

    /// Abort what the bucket has open under `key` (prefix included) initiated from
    /// [`INTENT_SKEW`] before `at_ms` on: the uploads an intent recorded then may have created.
    /// Returns how many were aborted.
    pub async fn settle_intent(&self, key: &str, at_ms: u64) -> Result<usize, S3Error> {
        let since = at_ms as i64 - INTENT_SKEW.as_millis() as i64;
        let mut aborted = 0;
        for (id, at) in self.uploads_of(key).await? {
            if at.is_some_and(|at| at < since) {
                continue;
            }
            // An error (other than already gone) keeps the intent for a later try.
            self.abort(key, &id).await?;
            aborted += 1;
        }
        Ok(aborted)
    }

    /// Abort a multipart upload (the key as the bucket has it, prefix included).
    /// An upload already completed or aborted (`NoSuchUpload`, 404) counts as aborted.
    pub async fn abort(&self, key: &str, id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.code() == Some("NoSuchUpload")
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("AbortMultipartUpload", key, e)),
        }
    }
}
