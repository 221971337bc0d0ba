//! The bucket, behind our own small interface: put a small object, put a file (in parts above
//! a threshold, parts in parallel, aborted on failure), ask for an object's size, read a
//! small one, list the objects, delete one, and clean up parts left by a killed upload. No
//! aws-sdk type leaves this module. Retries with backoff for 5xx, throttling (SlowDown) and
//! timeouts are the SDK's standard retry mode, without its retry quota; CreateMultipartUpload
//! alone is retried here, each try under its own intent (see [`intents`], which owns the
//! upload log's side of the bucket). Every answer is read through a cap ([`capped`]).

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
use futures::TryStreamExt as _;

use crate::config::S3Config;

mod capped;
mod intents;
pub use intents::UploadLog;

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
    /// No answer at all: the server could not be reached (refused, reset, no route, DNS, no
    /// answer to connect in time) or answered no attempt in its time.
    #[error("S3 {op} {key}: unreachable: {message}")]
    Unreachable {
        op: &'static str,
        key: String,
        message: String,
    },
    /// Anything else (5xx after the SDK's retries, a body that stopped half-way, ...).
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

/// The deadline of one attempt to send `len` bytes: a minute plus the time at 1 MiB/s, so a
/// large part on a slow link is not cut off, and a small request does not wait minutes.
pub fn attempt_timeout(len: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs(len / (1 << 20))
}

/// The requests that send a body, whose deadline grows with it ([`attempt_timeout`]).
const BODY_OPS: &[&str] = &["PUT", "UploadPart"];

/// Content types Nix's own S3 store writes.
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";
/// Empty pages in a row a listing may give (S3 may page on with none, past delete markers of
/// a versioned bucket; a thousand empty pages in a row is a server going round in circles).
const MAX_EMPTY_PAGES: u32 = 1000;

/// How the mirror's client talks to any S3 server: checksums, retries, deadlines, and the
/// cap on answers ([`capped`]).
fn ours(conf: aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder {
    let conf = conf
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
    capped::guarded(conf)
}

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
        // Local servers (and most non-AWS ones) want path-style URLs.
        let mut conf =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.endpoint.is_some());
        if shared.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        Bucket {
            client: Client::from_conf(ours(conf).build()),
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
            // Refused, reset, no answer to connect in time (a firewall that drops packets), or
            // no answer in time to any attempt of a request without a body (a server that
            // takes requests and hangs): after the SDK's retries, the bucket failing as a
            // whole. A body that outran its deadline (a slow link, many parts at once) is that
            // upload's failure, retried on its own backoff, not a pause of every upload.
            _ if matches!(&e, SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout())
                || (matches!(&e, SdkError::TimeoutError(_)) && !BODY_OPS.contains(&op)) =>
            {
                S3Error::Unreachable {
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

    /// Every object under the prefix, a page of up to 1,000 at a time, as (key relative to the
    /// prefix, size) handed to `each`; returns how many. Each page's request has the SDK's
    /// deadline and retries; an error on any page ends the listing (a partial listing is never
    /// taken for the whole). At most `cap` objects: more is an error.
    pub async fn list_each(
        &self,
        cap: u64,
        mut each: impl FnMut(&str, u64),
    ) -> Result<u64, S3Error> {
        let mut token: Option<String> = None;
        let (mut n, mut empty) = (0u64, 0u32);
        let wrong = |message: &str| S3Error::Other {
            op: "ListObjectsV2",
            key: self.prefix.clone(),
            message: message.to_owned(),
        };
        loop {
            let asked = token.clone();
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err("ListObjectsV2", &self.prefix, e))?;
            for o in page.contents() {
                let Some(rel) = o.key().and_then(|k| k.strip_prefix(self.prefix.as_str())) else {
                    continue;
                };
                n += 1;
                if n > cap {
                    return Err(S3Error::Other {
                        op: "ListObjectsV2",
                        key: self.prefix.clone(),
                        message: format!("more than {cap} objects"),
                    });
                }
                each(rel, o.size().unwrap_or(0).max(0) as u64);
            }
            // A listing that goes round in circles, or pages on with nothing in its pages,
            // is never taken as ending (each page would count against the cap of objects).
            empty = if page.contents().is_empty() {
                empty + 1
            } else {
                0
            };
            if empty > MAX_EMPTY_PAGES {
                return Err(wrong("page after page with no object in it"));
            }
            // Done only when the bucket says so; a server that leaves IsTruncated out but
            // gives a token has more.
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(false), _) | (None, None) => return Ok(n),
                (_, Some(t)) if asked.as_deref() == Some(t) => {
                    return Err(wrong(
                        "a page gave back the continuation token it was asked with",
                    ));
                }
                (_, Some(t)) => token = Some(t.to_owned()),
                (Some(true), None) => {
                    return Err(wrong(
                        "a page said more follow, without a continuation token",
                    ));
                }
            }
        }
    }

    /// The bytes of a small object `rel` (at most `max`: a longer one is an error), or `None`
    /// if there is none.
    pub async fn get_small(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>, S3Error> {
        let key = self.key(rel);
        let o = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.err("GET", &key, e)),
        };
        let too_long = || S3Error::Other {
            op: "GET",
            key: key.clone(),
            message: format!("longer than {max} bytes"),
        };
        if o.content_length().is_some_and(|n| n < 0 || n as u64 > max) {
            return Err(too_long());
        }
        let mut body = o.body;
        let read = async {
            let mut out = Vec::new();
            while let Some(chunk) = body.try_next().await.map_err(|e| S3Error::Other {
                op: "GET",
                key: key.clone(),
                message: crate::error_chain(&e),
            })? {
                if out.len() as u64 + chunk.len() as u64 > max {
                    return Err(too_long());
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        match tokio::time::timeout(attempt_timeout(max), read).await {
            Ok(r) => r.map(Some),
            Err(_) => Err(S3Error::Other {
                op: "GET",
                key: key.clone(),
                message: "the body did not arrive in time".into(),
            }),
        }
    }

    /// Delete object `rel` (one that is not there is no error).
    pub async fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.err("DELETE", &key, e))?;
        Ok(())
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
        let part = self.part_size_for(size);
        let count = size.div_ceil(part);
        let parts = futures::stream::iter(
            (0..count).map(move |i| Ok((i * part, part.min(size - i * part)))),
        );
        self.multipart(&key, path, content_type, log, part, parts)
            .await
    }

    /// Put the file `path` as object `rel` while it is still being written (the mirror's
    /// compressor writes it): always in parts, each sent as soon as the file holds it, the last
    /// once `growth` says the file is complete; an end in error aborts the upload. The caller
    /// decides it is worth parts (its NAR is at least `multipart_threshold()`), and the parts
    /// are `part` bytes long ([`Bucket::part_size_for`] the file's largest size).
    pub async fn put_growing(
        &self,
        rel: &str,
        path: &Path,
        content_type: &str,
        log: &impl UploadLog,
        part: u64,
        growth: tokio::sync::watch::Receiver<Growth>,
    ) -> Result<(), S3Error> {
        let key = self.key(rel);
        let parts = growing_parts(part, growth, path.display().to_string());
        self.multipart(&key, path, content_type, log, part, parts)
            .await
    }

    /// Objects at least this large go up in parts.
    pub fn multipart_threshold(&self) -> u64 {
        self.threshold
    }

    /// The size of each part but the last of an object of at most `size` bytes: the
    /// configured `part-size`, or more where that would take over S3's 10,000 parts (in whole
    /// MiB; 8 MiB parts reach 78 GiB, a NAR can be larger).
    pub fn part_size_for(&self, size: u64) -> u64 {
        part_size_for(self.part_size, size)
    }

    /// A multipart upload of `key` from the ranges `(offset, len)` of `path` that `parts`
    /// yields (in order; each but the last `part_size` long), recorded in `log` from its start
    /// to its end, aborted on failure.
    async fn multipart(
        &self,
        key: &str,
        path: &Path,
        content_type: &str,
        log: &impl UploadLog,
        part: u64,
        parts: impl futures::Stream<Item = Result<(u64, u64), S3Error>>,
    ) -> Result<(), S3Error> {
        // One upload of a key at a time: two store paths with identical NARs share the key, and
        // settling one's intents must not abort the other's upload.
        let _key = self.claim_key(key)?;
        let (intent, id) = self.create_upload(key, content_type, log).await?;
        crate::killpoint::reach("mirror.upload-created");
        if let Err(e) = log.started(&id, key, &intent).await {
            let _ = self.abort(key, &id).await;
            return Err(e);
        }
        match self.upload_parts(key, &id, path, part, parts).await {
            Ok(()) => {
                log.ended(&id).await;
                Ok(())
            }
            Err(e) => {
                // One the bucket would not abort stays recorded: the next start aborts it.
                match self.abort(key, &id).await {
                    Ok(()) => log.ended(&id).await,
                    Err(abort) => tracing::warn!(
                        "mirror: aborting the upload of {key}: {abort}; kept for the next start"
                    ),
                }
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        id: &str,
        path: &Path,
        part: u64,
        ranges: impl futures::Stream<Item = Result<(u64, u64), S3Error>>,
    ) -> Result<(), S3Error> {
        let mut parts: Vec<CompletedPart> = ranges
            .map_ok(|(offset, len)| async move {
                let number = (offset / part + 1) as i32;
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
            .try_buffer_unordered(self.concurrency)
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

/// Parts S3 takes in one upload, at most.
const MAX_PARTS: u64 = 10_000;

/// See [`Bucket::part_size_for`].
fn part_size_for(configured: u64, size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    configured.max(size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB)
}

/// How far a file being written has come: bytes in it so far, and its end (its size, or a
/// failure) once known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    pub written: u64,
    pub end: Option<Result<u64, ()>>,
}

/// The parts of a growing file, each as soon as the file holds it: whole `part`s while it
/// grows, then the rest once its end is known.
fn growing_parts(
    part: u64,
    growth: tokio::sync::watch::Receiver<Growth>,
    path: String,
) -> impl futures::Stream<Item = Result<(u64, u64), S3Error>> {
    let failed = move |why: &str| S3Error::File {
        path: path.clone(),
        source: std::io::Error::other(why.to_owned()),
    };
    futures::stream::unfold((growth, 0u64, false), move |(mut rx, next, over)| {
        let failed = failed.clone();
        async move {
            if over {
                return None;
            }
            loop {
                let g = *rx.borrow_and_update();
                match g.end {
                    Some(Err(())) => {
                        return Some((Err(failed("writing it failed")), (rx, next, true)));
                    }
                    Some(Ok(size)) => {
                        if next >= size {
                            return None;
                        }
                        let len = part.min(size - next);
                        return Some((Ok((next, len)), (rx, next + len, false)));
                    }
                    None if g.written >= next + part => {
                        return Some((Ok((next, part)), (rx, next + part, false)));
                    }
                    None => {}
                }
                if rx.changed().await.is_err() {
                    return Some((Err(failed("its writer went away")), (rx, next, true)));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn a_growing_file_yields_whole_parts_as_it_grows_then_the_rest() {
        let (tx, rx) = tokio::sync::watch::channel(Growth::default());
        let mut parts = Box::pin(growing_parts(10, rx, "f".into()));
        tx.send_modify(|g| g.written = 25);
        assert_eq!(parts.next().await.unwrap().unwrap(), (0, 10));
        assert_eq!(parts.next().await.unwrap().unwrap(), (10, 10));
        // 25 written: the third part waits for more, or for the end.
        let waiting = tokio::time::timeout(Duration::from_millis(50), parts.next()).await;
        assert!(waiting.is_err());
        tx.send_modify(|g| g.end = Some(Ok(27)));
        assert_eq!(parts.next().await.unwrap().unwrap(), (20, 7));
        assert!(parts.next().await.is_none());
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_file_ends_the_parts_in_error() {
        let (tx, rx) = tokio::sync::watch::channel(Growth::default());
        let mut parts = Box::pin(growing_parts(10, rx, "f".into()));
        tx.send_modify(|g| g.end = Some(Err(())));
        assert!(parts.next().await.unwrap().is_err());
        assert!(parts.next().await.is_none());
        let (tx, rx) = tokio::sync::watch::channel(Growth::default());
        let mut parts = Box::pin(growing_parts(10, rx, "f".into()));
        drop(tx);
        assert!(parts.next().await.unwrap().is_err());
    }

    #[test]
    fn parts_grow_so_that_no_object_takes_more_than_s3s_ten_thousand() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(8 * MIB, 0), 8 * MIB);
        assert_eq!(part_size_for(8 * MIB, 10_000 * 8 * MIB), 8 * MIB);
        let big = 10_000 * 8 * MIB + 1;
        assert_eq!(part_size_for(8 * MIB, big), 9 * MIB);
        for size in [big, 300 << 30, 5 << 40, u64::MAX / 2] {
            let part = part_size_for(8 * MIB, size);
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}: {part}");
            assert_eq!(part % MIB, 0);
        }
    }

    #[tokio::test]
    async fn an_end_on_a_part_boundary_adds_no_empty_part() {
        let (tx, rx) = tokio::sync::watch::channel(Growth::default());
        tx.send_modify(|g| {
            g.written = 20;
            g.end = Some(Ok(20));
        });
        let parts: Vec<_> = growing_parts(10, rx, "f".into()).collect().await;
        let parts: Vec<(u64, u64)> = parts.into_iter().map(Result::unwrap).collect();
        assert_eq!(parts, vec![(0, 10), (10, 10)]);
    }

    /// A bucket on an S3 server of this test's own (a real one cannot be made to answer in
    /// circles, or without an upload's id): `answer(method, query, n)` makes the status and
    /// body of the nth request.
    async fn fake_s3(
        answer: impl Fn(&str, &str, usize) -> (u16, String) + Send + Sync + 'static,
    ) -> (Bucket, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let (answer, count) = (Arc::new(answer), asked.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (answer, count) = (answer.clone(), count.clone());
            async move {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (status, body) = answer(
                    req.method().as_str(),
                    req.uri().query().unwrap_or_default(),
                    n,
                );
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [(axum::http::header::CONTENT_TYPE, "application/xml")],
                    body,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (bucket_at(addr, None), asked)
    }

    /// A bucket at `addr`, set up as `connect` sets up the node's client, with attempts cut
    /// off at `attempt` if given.
    fn bucket_at(addr: std::net::SocketAddr, attempt: Option<Duration>) -> Bucket {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://{addr}"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "key", "secret", None, None, "test",
            ));
        let mut conf = ours(conf);
        if let Some(t) = attempt {
            conf = conf.timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(t)
                    .build(),
            );
        }
        Bucket {
            client: Client::from_conf(conf.build()),
            bucket: "b".into(),
            prefix: String::new(),
            part_size: 8 << 20,
            threshold: 8 << 20,
            concurrency: 1,
            uploading: Arc::default(),
        }
    }

    /// A server that refuses connections and one that takes requests and never answers are
    /// both the bucket unreachable (which pauses the mirror's uploads until a probe gets an
    /// answer), not one path's failure to retry on its own backoff.
    /// A request without a body that no attempt got an answer to in time is the bucket
    /// unreachable; an upload whose body outran its deadline is that upload's failure.
    #[tokio::test]
    async fn a_timed_out_body_is_its_uploads_failure_not_the_buckets() {
        let bucket = bucket_at("127.0.0.1:9".parse().unwrap(), None);
        let timeout = || {
            SdkError::<aws_sdk_s3::operation::put_object::PutObjectError, _>::timeout_error(
                "attempt timed out",
            )
        };
        for op in ["PUT", "UploadPart"] {
            let e = bucket.err(op, "k", timeout());
            assert!(matches!(e, S3Error::Other { .. }), "{op}: {e:?}");
        }
        for op in ["HEAD", "GET", "ListObjectsV2", "CompleteMultipartUpload"] {
            let e = bucket.err(op, "k", timeout());
            assert!(matches!(e, S3Error::Unreachable { .. }), "{op}: {e:?}");
        }
    }

    #[tokio::test]
    async fn a_refusing_or_hanging_server_is_unreachable() {
        // A port bound but not listening: refused, and held so no other test takes it.
        let closed = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        rustix::net::bind(
            &closed,
            &"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap(),
        )
        .unwrap();
        let refused = match rustix::net::getsockname(&closed).unwrap().try_into() {
            Ok(std::net::SocketAddr::V4(a)) => std::net::SocketAddr::V4(a),
            other => panic!("{other:?}"),
        };
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_at = hanging.local_addr().unwrap();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = taken.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = hanging.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(c);
            }
        });
        for (addr, what) in [(refused, "refused"), (hanging_at, "hanging")] {
            let bucket = bucket_at(addr, Some(Duration::from_millis(300)));
            let r = tokio::time::timeout(Duration::from_secs(30), bucket.size_of("x.narinfo"))
                .await
                .expect("the SDK's deadlines end it");
            assert!(
                matches!(r, Err(S3Error::Unreachable { .. })),
                "{what}: {r:?}"
            );
            let r = tokio::time::timeout(Duration::from_secs(30), bucket.check())
                .await
                .expect("the SDK's deadlines end it");
            assert!(
                matches!(r, Err(S3Error::Unreachable { .. })),
                "{what}: {r:?}"
            );
        }
        assert!(taken.load(std::sync::atomic::Ordering::SeqCst) > 0);
    }

    /// [`fake_s3`] answering every request with a ListObjectsV2 page, `page(n)` inside it.
    async fn listing_server(
        page: impl Fn(usize) -> String + Send + Sync + 'static,
    ) -> (Bucket, Arc<std::sync::atomic::AtomicUsize>) {
        fake_s3(move |_, _, n| {
            (
                200,
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
                     xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name>\
                     <Prefix></Prefix><MaxKeys>1000</MaxKeys>{}</ListBucketResult>",
                    page(n)
                ),
            )
        })
        .await
    }

    fn object(key: &str) -> String {
        format!("<Contents><Key>{key}</Key><Size>3</Size></Contents>")
    }

    /// A listing ends only when the server says so, and never goes round in circles: a page
    /// that gives back the token it was asked with, pages without objects on and on, or a
    /// page that says more follow without a token are errors, not endless listings.
    #[tokio::test]
    async fn a_listing_that_goes_round_in_circles_is_an_error() {
        let list = |b: Bucket| async move {
            let mut keys = Vec::new();
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                b.list_each(1 << 20, |k, _| keys.push(k.to_owned())),
            )
            .await
            .expect("the listing ends");
            (r, keys)
        };
        let message = |r: Result<u64, S3Error>| r.expect_err("an error").to_string();

        // Two pages, then the end.
        let (b, asked) = listing_server(|n| match n {
            0 => format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>t1</NextContinuationToken>{}",
                object("a")
            ),
            _ => format!("<IsTruncated>false</IsTruncated>{}", object("b")),
        })
        .await;
        let (r, keys) = list(b).await;
        assert_eq!(
            (
                r.unwrap(),
                keys,
                asked.load(std::sync::atomic::Ordering::SeqCst)
            ),
            (2, vec!["a".to_owned(), "b".to_owned()], 2)
        );

        // The same token again and again, a new object on each page.
        let (b, asked) = listing_server(|n| {
            format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>same</NextContinuationToken>{}",
                object(&format!("o{n}"))
            )
        })
        .await;
        let (r, _) = list(b).await;
        assert!(message(r).contains("gave back the continuation token"));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);

        // A new token each time, never an object.
        let (b, asked) = listing_server(|n| {
            format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>t{n}</NextContinuationToken>"
            )
        })
        .await;
        let (r, keys) = list(b).await;
        assert!(message(r).contains("no object in it"));
        assert!(keys.is_empty());
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            MAX_EMPTY_PAGES as usize + 1
        );

        // More to come, but no token to ask for it with.
        let (b, _) =
            listing_server(|_| format!("<IsTruncated>true</IsTruncated>{}", object("a"))).await;
        let (r, _) = list(b).await;
        assert!(message(r).contains("without a continuation token"));
    }

    /// An answer longer than [`capped::MAX_ANSWER`] is an error, not read whole into memory
    /// (the SDK reads a listing page whole before parsing it, with no limit of its own).
    #[tokio::test]
    async fn an_answer_past_its_cap_is_an_error_not_held() {
        let over = capped::MAX_ANSWER as usize + (4 << 20);
        let mut page = String::from("<IsTruncated>false</IsTruncated>");
        while page.len() < over {
            page.push_str(&object(&format!("nar/{:052}.nar", page.len())));
        }
        let page = Arc::new(page);
        let (b, asked) = listing_server(move |_| page.to_string()).await;
        let mut listed = 0u64;
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            b.list_each(u64::MAX, |_, _| listed += 1),
        )
        .await
        .expect("the listing ends");
        let e = r.expect_err("a listing page past the cap is an error");
        assert!(
            crate::error_chain(&e).contains("longer than"),
            "{}",
            crate::error_chain(&e)
        );
        assert_eq!(listed, 0);
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "an answer past the cap is not asked for again"
        );

        // Under the cap, the same server's page is read.
        let mut page = String::from("<IsTruncated>false</IsTruncated>");
        for i in 0..1000 {
            page.push_str(&object(&format!("nar/{i:052}.nar")));
        }
        let (b, _) = listing_server(move |_| page.clone()).await;
        assert_eq!(b.list_each(u64::MAX, |_, _| ()).await.unwrap(), 1000);
    }

    /// The upload log in memory: intents made so far, those open (token, unix ms), those ended.
    #[derive(Default)]
    struct MemLog(Mutex<Intents>);

    type Intents = (u32, Vec<(String, u64)>, Vec<String>);

    impl UploadLog for MemLog {
        async fn intent(&self, _key: &str) -> Result<String, S3Error> {
            let mut l = self.0.lock().unwrap();
            l.0 += 1;
            let token = format!("intent-{}", l.0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            l.1.push((token.clone(), now));
            Ok(token)
        }
        async fn started(&self, _id: &str, _key: &str, _intent: &str) -> Result<(), S3Error> {
            Ok(())
        }
        async fn ended(&self, id: &str) {
            let mut l = self.0.lock().unwrap();
            l.1.retain(|(t, _)| t != id);
            l.2.push(id.to_owned());
        }
        async fn intents_of(&self, _key: &str) -> Result<Vec<(String, u64)>, S3Error> {
            Ok(self.0.lock().unwrap().1.clone())
        }
    }

    /// A CreateMultipartUpload answered without an upload id may have created an upload: its
    /// intent stays, and is settled before the next try (the uploads open under the key are
    /// aborted, then the intent ends). After the last try the error is the caller's and the
    /// last intent is still there, for the next start to settle.
    #[tokio::test]
    async fn an_upload_created_without_an_id_keeps_its_intent_until_settled() {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let (b, _) = fake_s3(move |method, query, _| {
            seen.lock().unwrap().push(method.to_owned());
            match method {
                // CreateMultipartUpload, with no UploadId in its answer.
                "POST" => (
                    200,
                    "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                     </InitiateMultipartUploadResult>"
                        .into(),
                ),
                // ListMultipartUploads: the upload that answer did not name.
                "GET" if query.contains("uploads") => (
                    200,
                    "<ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>false\
                     </IsTruncated><Upload><Key>k</Key><UploadId>made</UploadId></Upload>\
                     </ListMultipartUploadsResult>"
                        .into(),
                ),
                // AbortMultipartUpload.
                "DELETE" if query.contains("uploadId=made") => (204, String::new()),
                _ => (400, "<Error><Code>Unexpected</Code></Error>".into()),
            }
        })
        .await;
        let log = MemLog::default();
        let e = b
            .create_upload("k", NAR_TYPE, &log)
            .await
            .expect_err("no upload id");
        assert!(e.to_string().contains("no UploadId"), "{e}");
        let asked = requests.lock().unwrap().clone();
        let tries = super::intents::CREATE_TRIES as usize;
        let mut want = vec!["POST"];
        for _ in 1..tries {
            want.extend(["GET", "DELETE", "POST"]);
        }
        assert_eq!(asked, want);
        let l = log.0.lock().unwrap();
        assert_eq!(
            l.2.len(),
            tries - 1,
            "each try but the last settled: {:?}",
            l.2
        );
        assert_eq!(
            l.1.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            [format!("intent-{tries}")],
            "the last try's intent stays"
        );
    }
}
