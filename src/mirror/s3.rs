//! The bucket, behind our own small interface: put a small object, put a file (in parts above
//! a threshold, parts in parallel, aborted on failure), ask for an object's size, and clean up
//! parts left by a killed upload. No aws-sdk type leaves this module. Retries with backoff for
//! 5xx, throttling (SlowDown) and timeouts are the SDK's standard retry mode, without its retry
//! quota; CreateMultipartUpload alone is retried here, each try under its own intent.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::{RetryConfig, RetryPartition, TokenBucket};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::{StreamExt as _, TryStreamExt as _};

use crate::config::S3Config;

/// A failed bucket operation, with what S3 said.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// Credentials refused or missing rights: retrying will not help until someone acts.
    #[error("S3 refused the credentials for bucket {bucket}: {message}")]
    Auth { bucket: String, message: String },
    #[error("S3 bucket {bucket} does not exist")]
    NoBucket { bucket: String },
    /// The bucket asked to slow down (`SlowDown`, 503): the mirror lowers its request rate.
    #[error("S3 {op} {key}: slow down ({message})")]
    SlowDown {
        op: &'static str,
        key: String,
        message: String,
    },
    /// Anything else (unreachable server, 5xx after the SDK's retries, timeouts, ...).
    #[error("S3 {op} {key}: {message}")]
    Other {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// One bucket (and key prefix) of an S3-compatible server.
#[derive(Clone, Debug)]
pub struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    threshold: u64,
    concurrency: usize,
    /// Keys with a multipart upload of this mirror in flight.
    uploading: Arc<Mutex<HashSet<String>>>,
}

/// A key being uploaded; released when dropped.
struct KeyClaim {
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
const CREATE_TRIES: u32 = 4;

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

/// The deadline of one attempt to send `len` bytes: a minute plus the time at 1 MiB/s, so a
/// large part on a slow link is not cut off, and a small request does not wait minutes.
pub fn attempt_timeout(len: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs(len / (1 << 20))
}

/// Content types Nix's own S3 store writes.
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";

impl Bucket {
    /// A client for `cfg`, with credentials from the usual AWS sources.
    pub async fn connect(cfg: &S3Config) -> Bucket {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(ep) = &cfg.endpoint {
            loader = loader.endpoint_url(ep);
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            // Local servers (and most non-AWS ones) want path-style URLs.
            .force_path_style(cfg.endpoint.is_some())
            // Checksums only where S3 requires them: plain signed bodies work on every server.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            // No retry quota: the SDK's default bucket runs dry under sustained faults and then
            // stops retrying at all, so every request of a multipart upload had one try and a
            // large NAR almost never got up (seen: one stuck for minutes behind a 40% fault
            // rate). The mirror paces itself instead (`throttle`, and backoff per path).
            .retry_partition(
                RetryPartition::custom("narmesh-mirror")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // Bodies set their own, by size (`attempt_timeout`).
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if shared.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        Bucket {
            client: Client::from_conf(conf.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            part_size: cfg.part_size,
            threshold: cfg.multipart_threshold,
            concurrency: cfg.concurrency,
            uploading: Arc::default(),
        }
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.bucket
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn err<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let code = e.code().unwrap_or_default().to_owned();
        // Connection failures and timeouts have no S3 code: give the whole cause chain.
        let message = e
            .message()
            .map(str::to_owned)
            .unwrap_or_else(|| crate::error_chain(&e));
        match code.as_str() {
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "InvalidToken"
            | "ExpiredToken" => S3Error::Auth {
                bucket: self.bucket.clone(),
                message: format!("{code}: {message}"),
            },
            "NoSuchBucket" => S3Error::NoBucket {
                bucket: self.bucket.clone(),
            },
            "SlowDown" | "ServiceUnavailable" | "RequestLimitExceeded" | "Throttling" => {
                S3Error::SlowDown {
                    op,
                    key: key.to_owned(),
                    message,
                }
            }
            _ if e.raw_response().is_some_and(|r| r.status().as_u16() == 503) => {
                S3Error::SlowDown {
                    op,
                    key: key.to_owned(),
                    message,
                }
            }
            _ => S3Error::Other {
                op,
                key: key.to_owned(),
                message: if code.is_empty() {
                    message
                } else {
                    format!("{code}: {message}")
                },
            },
        }
    }

    /// Check the bucket exists and the credentials may use it.
    pub async fn check(&self) -> Result<(), S3Error> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                    return Err(S3Error::NoBucket {
                        bucket: self.bucket.clone(),
                    });
                }
                // HEAD answers carry no error body: 403 means the credentials.
                if let SdkError::ServiceError(s) = &e
                    && s.raw().status().as_u16() == 403
                {
                    return Err(S3Error::Auth {
                        bucket: self.bucket.clone(),
                        message: "403 Forbidden".into(),
                    });
                }
                Err(self.err("HEAD bucket", "", e))
            }
        }
    }

    /// The size of object `rel`, or `None` if there is none.
    pub async fn size_of(&self, rel: &str) -> Result<Option<u64>, S3Error> {
        let key = self.key(rel);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(self.err("HEAD", &key, e)),
        }
    }

    /// Put a small object.
    pub async fn put(&self, rel: &str, body: Vec<u8>, content_type: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        let len = body.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type(content_type)
            .content_length(len)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.err("PUT", &key, e))?;
        Ok(())
    }

    /// A per-request config whose attempt deadline fits a body of `len` bytes.
    fn timeout_for(len: u64) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(attempt_timeout(len))
                .build(),
        )
    }

    /// Put the file `path` (`size` bytes) as object `rel`: one PUT below the multipart
    /// threshold, else parts in parallel; a multipart upload's id is in `log` from its start
    /// to its end, and a failed one is aborted.
    pub async fn put_file(
        &self,
        rel: &str,
        path: &Path,
        size: u64,
        content_type: &str,
        log: &impl UploadLog,
    ) -> Result<(), S3Error> {
        let key = self.key(rel);
        if size < self.threshold {
            let body = self.file_part(path, 0, size).await?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type(content_type)
                .content_length(size as i64)
                .body(body)
                .customize()
                .config_override(Self::timeout_for(size))
                .send()
                .await
                .map_err(|e| self.err("PUT", &key, e))?;
            return Ok(());
        }
        // One upload of a key at a time: two store paths with identical NARs share the key, and
        // settling one's intents must not abort the other's upload.
        let _key = self.claim_key(&key)?;
        let (intent, id) = self.create_upload(&key, content_type, log).await?;
        crate::killpoint::reach("mirror.upload-created");
        if let Err(e) = log.started(&id, &key, &intent).await {
            let _ = self.abort(&key, &id).await;
            return Err(e);
        }
        let result = match self.upload_parts(&key, &id, path, size).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(abort) = self.abort(&key, &id).await {
                    tracing::warn!("mirror: aborting the upload of {key}: {abort}");
                }
                Err(e)
            }
        };
        log.ended(&id).await;
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        id: &str,
        path: &Path,
        size: u64,
    ) -> Result<(), S3Error> {
        let count = size.div_ceil(self.part_size);
        let mut parts: Vec<CompletedPart> = futures::stream::iter(0..count)
            .map(|i| async move {
                let offset = i * self.part_size;
                let len = self.part_size.min(size - offset);
                let number = (i + 1) as i32;
                let body = self.file_part(path, offset, len).await?;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(number)
                    .content_length(len as i64)
                    .body(body)
                    .customize()
                    .config_override(Self::timeout_for(len))
                    .send()
                    .await
                    .map_err(|e| self.err("UploadPart", key, e))?;
                crate::killpoint::reach("mirror.part-uploaded");
                Ok::<_, S3Error>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .build(),
                )
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err("CompleteMultipartUpload", key, e))?;
        Ok(())
    }

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
    fn claim_key(&self, key: &str) -> Result<KeyClaim, S3Error> {
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
    async fn create_upload(
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
                Ok(c) => return Ok((intent, c.upload_id().unwrap_or_default().to_owned())),
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

    async fn file_part(&self, path: &Path, offset: u64, len: u64) -> Result<ByteStream, S3Error> {
        ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| S3Error::File {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
    }
}
