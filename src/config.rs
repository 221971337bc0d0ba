//! The node's configuration: TOML, every key optional with a default, unknown keys rejected,
//! checked by [`Config::validate`] after loading; command-line flags override.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::nix::{PublicKey, TrustedKeys};
use crate::units::ByteSize;

/// Default data directory (redb database, blob store, keys, spool).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/narmesh";
/// Default Unix socket the hook and the CLI talk to.
pub const DEFAULT_SOCKET: &str = narmesh_proto::hook::DEFAULT_SOCKET;
/// Default spool directory of the hook (`narmesh-hook`'s own default).
pub const DEFAULT_SPOOL: &str = narmesh_proto::hook::DEFAULT_SPOOL;
/// cache.nixos.org's key: paths it signed are public already and are not ingested.
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Configuration errors: clear, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config key {key}: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("rendering the config: {0}")]
    Render(#[from] toml::ser::Error),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Where the node keeps its database, blobs and generated keys.
    pub data_dir: PathBuf,
    /// The Unix socket for hook reports and CLI requests.
    pub socket: PathBuf,
    /// Where `narmesh-hook` spools reports while the node is down; taken in at start and while running.
    pub spool_dir: Option<PathBuf>,
    /// A group (name from /etc/group, or numeric gid) whose members may use the socket and the
    /// spool besides the node's own user. Unset: only the node's user (and root) may. The hook
    /// runs as root under nix-daemon (nothing needed), and as the building user on a
    /// single-user Nix install.
    pub socket_group: Option<String>,
    /// The Nix-format secret key to sign narinfos with; without one the node makes and keeps its own.
    pub secret_key_file: Option<PathBuf>,
    /// Name of the key the node makes for itself (default `<hostname>-1`).
    pub key_name: Option<String>,
    /// Keys whose signatures this node accepts (`name:base64`).
    pub trusted_public_keys: Vec<String>,
    /// Paths signed by these keys are public already and are not ingested.
    pub upstream_keys: Vec<String>,
    pub nix: NixConfig,
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    pub store: StoreConfig,
    pub mesh: MeshConfig,
    pub mirror: MirrorConfig,
}

/// `[store]`: the node's one disk budget. The NARs of its own builds are served from the Nix
/// store (no copy); NARs fetched from peers are kept within these bounds, least recently used
/// evicted first.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StoreConfig {
    /// Most bytes of NARs fetched from peers kept on disk (`"50GiB"`).
    pub max_size: ByteSize,
    /// Free space always left on the data dir's disk: NARs are evicted to keep it (`"5GiB"`).
    pub min_free: ByteSize,
    /// Seconds between checks of own paths against the local Nix store (after Nix GC).
    pub gc_check_secs: u64,
    /// Seconds the record of a path nobody holds any more (every provider withdrew it: Nix
    /// GC, eviction) is kept, unchanged, before it is forgotten (0: never).
    pub forget_after_secs: u64,
    /// Memory all reads of NARs (for the local Nix, for peers, for the mirror) may hold ahead
    /// of their readers together; past it each read goes on a chunk group at a time.
    pub read_memory: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_size: ByteSize(50 << 30),
            min_free: ByteSize(5 << 30),
            gc_check_secs: 10,
            forget_after_secs: 7 * 86_400,
            read_memory: ByteSize(128 << 20),
        }
    }
}

/// How a node replicates NARs its peers announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Replicate {
    /// Fetch a NAR when the local Nix asks for it.
    #[default]
    OnDemand,
    /// Fetch every announced NAR at once.
    Eager,
}

/// `[mesh]`: the peers this node shares with, over iroh.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MeshConfig {
    /// Run the mesh at all.
    pub enabled: bool,
    /// UDP address of the iroh endpoint.
    pub listen: SocketAddr,
    /// Static peers: `<endpoint id>@<ip:port>` (what `narmesh status` prints as peer address).
    pub peers: Vec<String>,
    /// Endpoint ids allowed to connect (the ids in `peers` are always allowed); anyone else
    /// is refused on every protocol.
    pub allowed_peers: Vec<String>,
    /// Find peers on the LAN with mDNS (they must still be allowed).
    pub lan_discovery: bool,
    pub replicate: Replicate,
    /// Nodes gossip on a topic derived from this name.
    pub cluster: String,
    /// Milliseconds between catch-up rounds with each peer.
    pub sync_interval_ms: u64,
    /// Largest NAR taken in from peers (default: `[store] max-size`).
    pub max_nar_size: Option<ByteSize>,
    /// Bytes per second all peers together may take from this node (`"100MiB"`; default: no
    /// limit), so a host that builds keeps the rest of its link.
    pub serve_rate: Option<ByteSize>,
    /// The opt-in bulk channel: serve NAR ranges over plain TCP on this address (tickets are
    /// handed out over the mesh), and fetch over it from peers that offer it. Unencrypted:
    /// for a LAN of build hosts, where QUIC's per-packet work costs more than the link is worth.
    pub bulk_listen: Option<SocketAddr>,
    /// Memory all fetches from peers together may hold in flight: each range being fetched
    /// buffers up to 2 MiB, each running transfer keeps its NAR's leaves (1/512 of it), and
    /// ranges beyond this wait for one to end.
    pub fetch_memory: ByteSize,
}

/// `[mirror]`: what this node mirrors the cluster's paths into.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MirrorConfig {
    /// An S3 binary cache; setting it makes this node the mirror (and replicate eagerly).
    pub s3: Option<S3Config>,
}

/// How NARs are compressed in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    #[default]
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// The narinfo `Compression:` value.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }

    /// The NAR file name extension after `.nar`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
            Compression::None => "",
        }
    }
}

/// `[mirror.s3]`: the bucket, in the layout `nix copy --to s3://` writes. Credentials come the
/// usual AWS way (environment, shared config and credentials files, `profile`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct S3Config {
    pub bucket: String,
    /// Endpoint URL of an S3-compatible server (path-style requests); AWS when absent.
    pub endpoint: Option<String>,
    /// Region (default: from the AWS config, else `us-east-1`).
    pub region: Option<String>,
    /// AWS profile to take credentials and region from.
    pub profile: Option<String>,
    /// Key prefix of the cache inside the bucket (`""` or e.g. `"cache/"`).
    pub prefix: String,
    pub compression: Compression,
    /// Uploads (NARs, narinfos, parts) in flight at once.
    pub concurrency: usize,
    /// NARs of at least this many bytes go up in parts, while they are compressed (and so do
    /// compressed files of this size).
    pub multipart_threshold: u64,
    /// Bytes per part (S3 needs at least 5 MiB).
    pub part_size: u64,
    /// `Priority` written to the bucket's `nix-cache-info` when the bucket has none.
    pub priority: u32,
    /// How often the mirror lists the bucket and puts back what the bucket lost of what it
    /// completed (a narinfo, a NAR, `nix-cache-info`); the first audit runs at most 10 minutes
    /// after start. 0: never.
    pub audit_secs: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            endpoint: None,
            region: None,
            profile: None,
            prefix: String::new(),
            compression: Compression::Zstd,
            concurrency: 8,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            priority: 50,
            audit_secs: 86_400,
        }
    }
}

/// `[nix]`: the local Nix store.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct NixConfig {
    /// `/` for the system store, or the root of a chroot store.
    pub store_root: PathBuf,
}

/// `[http]`: the binary cache the local Nix substitutes from.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HttpConfig {
    /// Addresses to listen on (loopback only by default).
    pub listen: Vec<SocketAddr>,
    /// Addresses that answer `/metrics` only (none by default), for a scraper on another host.
    pub metrics_listen: Vec<SocketAddr>,
    /// `Priority` in nix-cache-info (lower wins; cache.nixos.org uses 40).
    pub priority: u32,
    /// Microseconds the HTTP thread polls its connections after a narinfo answer before it
    /// sleeps (0: never).
    pub busy_poll_us: u64,
    /// Seconds a connection may go without a byte read or written before it is closed (an idle
    /// keep-alive, a client that stopped reading, also an answer whose NAR's bytes from peers
    /// stopped coming): it gives its slot back. Keep it above 30: an on-demand fetch waits up
    /// to 30 s for its first bytes before answering 502. A request head must also come whole
    /// within it, counted from the connection's start or its last answer.
    pub idle_secs: u64,
}

/// `[pipeline]`: how paths are turned into signed NARs.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PipelineConfig {
    /// NARs serialized at once.
    pub workers: usize,
    /// Queued reports taken per batch (one redb commit per batch).
    pub batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: DEFAULT_DATA_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            spool_dir: None,
            socket_group: None,
            secret_key_file: None,
            key_name: None,
            trusted_public_keys: Vec::new(),
            upstream_keys: vec![CACHE_NIXOS_ORG_KEY.to_owned()],
            nix: NixConfig::default(),
            http: HttpConfig::default(),
            pipeline: PipelineConfig::default(),
            store: StoreConfig::default(),
            mesh: MeshConfig::default(),
            mirror: MirrorConfig::default(),
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5481)),
            peers: Vec::new(),
            allowed_peers: Vec::new(),
            lan_discovery: true,
            replicate: Replicate::OnDemand,
            cluster: "narmesh".to_owned(),
            sync_interval_ms: 5000,
            max_nar_size: None,
            serve_rate: None,
            bulk_listen: None,
            fetch_memory: ByteSize(64 << 20),
        }
    }
}

impl Default for NixConfig {
    fn default() -> Self {
        NixConfig {
            store_root: "/".into(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 5480))],
            metrics_listen: Vec::new(),
            priority: 30,
            busy_poll_us: 50,
            idle_secs: 60,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 2,
            batch: 256,
        }
    }
}

impl Config {
    /// Load and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration of a node run without a config file: the defaults, with the socket
    /// and spool of the hook's variables (`NARMESH_SOCKET`, `NARMESH_SPOOL`) if set.
    pub fn without_file() -> Config {
        let mut cfg = Config::default();
        if let Some(s) = std::env::var_os("NARMESH_SOCKET").filter(|s| !s.is_empty()) {
            cfg.socket = s.into();
        }
        if let Some(s) = std::env::var_os("NARMESH_SPOOL").filter(|s| !s.is_empty()) {
            cfg.spool_dir = Some(s.into());
        }
        cfg
    }

    /// The spool directory in effect.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(|| {
            if self.data_dir == Path::new(DEFAULT_DATA_DIR) {
                DEFAULT_SPOOL.into()
            } else {
                self.data_dir.join("spool")
            }
        })
    }

    /// The configuration as TOML with every default filled in (what `check-config` prints).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }

    /// Check every value that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| ConfigError::Invalid { key, why };
        self.trusted_keys()?;
        self.upstream_trusted_keys()?;
        if let Some(g) = &self.socket_group
            && g.parse::<u32>().is_err()
            && (g.is_empty()
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)))
        {
            return Err(invalid(
                "socket-group",
                format!("{g:?} is not a group name or gid"),
            ));
        }
        if self.http.listen.is_empty() {
            return Err(invalid(
                "http.listen",
                "at least one address is needed".into(),
            ));
        }
        if self.pipeline.workers == 0 || self.pipeline.workers > 64 {
            return Err(invalid("pipeline.workers", "must be 1..=64".into()));
        }
        if self.store.max_size.0 < 1 << 20 {
            return Err(invalid("store.max-size", "must be at least 1MiB".into()));
        }
        if !(1 << 20..=4 << 30).contains(&self.store.read_memory.0) {
            return Err(invalid(
                "store.read-memory",
                "must be 1MiB..=4GiB (a full-size piece is 1 MiB)".into(),
            ));
        }
        if self.store.gc_check_secs == 0 || self.store.gc_check_secs > 86_400 {
            return Err(invalid("store.gc-check-secs", "must be 1..=86400".into()));
        }
        if self.pipeline.batch == 0 || self.pipeline.batch > 10_000 {
            return Err(invalid("pipeline.batch", "must be 1..=10000".into()));
        }
        for p in &self.mesh.peers {
            crate::mesh::PeerAddr::parse(p).map_err(|e| invalid("mesh.peers", e))?;
        }
        for p in &self.mesh.allowed_peers {
            crate::mesh::parse_endpoint_id(p).map_err(|e| invalid("mesh.allowed-peers", e))?;
        }
        if self.http.busy_poll_us > 1000 {
            return Err(invalid("http.busy-poll-us", "must be 0..=1000".into()));
        }
        if !(1..=86_400).contains(&self.http.idle_secs) {
            return Err(invalid("http.idle-secs", "must be 1..=86400".into()));
        }
        if !(50..=3_600_000).contains(&self.mesh.sync_interval_ms) {
            return Err(invalid(
                "mesh.sync-interval-ms",
                "must be 50..=3600000".into(),
            ));
        }
        if self
            .mesh
            .max_nar_size
            .is_some_and(|m| m > self.store.max_size)
        {
            return Err(invalid(
                "mesh.max-nar-size",
                "must not be above store.max-size (a NAR over the cap cannot be kept)".into(),
            ));
        }
        if self.mesh.serve_rate.is_some_and(|r| r.0 < 64 << 10) {
            return Err(invalid(
                "mesh.serve-rate",
                "must be at least 64KiB (per second), or left out for no limit".into(),
            ));
        }
        if !(2 << 20..=4 << 30).contains(&self.mesh.fetch_memory.0) {
            return Err(invalid(
                "mesh.fetch-memory",
                "must be 2MiB..=4GiB (a range in flight takes up to 2 MiB)".into(),
            ));
        }
        if self.mesh.cluster.is_empty() {
            return Err(invalid("mesh.cluster", "must not be empty".into()));
        }
        if let Some(s3) = &self.mirror.s3 {
            if s3.bucket.is_empty() {
                return Err(invalid("mirror.s3.bucket", "is required".into()));
            }
            if s3.concurrency == 0 || s3.concurrency > 256 {
                return Err(invalid("mirror.s3.concurrency", "must be 1..=256".into()));
            }
            if s3.part_size < 5 << 20 || s3.part_size > 5 << 30 {
                return Err(invalid(
                    "mirror.s3.part-size",
                    "must be 5 MiB..=5 GiB (S3's limits)".into(),
                ));
            }
            if s3.audit_secs > 30 * 86_400 {
                return Err(invalid(
                    "mirror.s3.audit-secs",
                    "must be 0 (never) or at most 2592000 (30 days)".into(),
                ));
            }
            if s3.multipart_threshold < s3.part_size {
                return Err(invalid(
                    "mirror.s3.multipart-threshold",
                    "must be at least part-size".into(),
                ));
            }
            if !(s3.prefix.is_empty() || s3.prefix.ends_with('/')) || s3.prefix.starts_with('/') {
                return Err(invalid(
                    "mirror.s3.prefix",
                    "must be empty or end with '/' (and not start with one)".into(),
                ));
            }
            if let Some(ep) = &s3.endpoint
                && !(ep.starts_with("http://") || ep.starts_with("https://"))
            {
                return Err(invalid(
                    "mirror.s3.endpoint",
                    "must be an http:// or https:// URL".into(),
                ));
            }
        }
        if let Some(name) = &self.key_name {
            crate::nix::SecretKey::generate(name)
                .map_err(|e| invalid("key-name", e.to_string()))?;
        }
        Ok(())
    }

    /// The gid of `socket-group`, looked up in /etc/group unless it is a number.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        let Some(g) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(n) = g.parse() {
            return Ok(Some(n));
        }
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        groups
            .lines()
            .find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(g.as_str()))
                    .then(|| f.nth(1).and_then(|gid| gid.parse().ok()))
                    .flatten()
            })
            .map(Some)
            .ok_or_else(|| ConfigError::Invalid {
                key: "socket-group",
                why: format!("no group {g:?} in /etc/group (give its numeric gid)"),
            })
    }

    /// The largest NAR the mesh takes in.
    pub fn max_nar_size(&self) -> u64 {
        self.mesh.max_nar_size.unwrap_or(self.store.max_size).0
    }

    /// `trusted-public-keys`, parsed.
    pub fn trusted_keys(&self) -> Result<TrustedKeys, ConfigError> {
        parse_keys(&self.trusted_public_keys, "trusted-public-keys")
    }

    /// `upstream-keys`, parsed.
    pub fn upstream_trusted_keys(&self) -> Result<TrustedKeys, ConfigError> {
        parse_keys(&self.upstream_keys, "upstream-keys")
    }
}

fn parse_keys(keys: &[String], key: &'static str) -> Result<TrustedKeys, ConfigError> {
    let parsed = keys
        .iter()
        .map(|k| k.parse::<PublicKey>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Invalid {
            key,
            why: e.to_string(),
        })?;
    Ok(TrustedKeys::new(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest NAR taken from peers is the storage's cap unless set apart.
    #[test]
    fn max_nar_size_follows_the_store_cap_unless_set() {
        let cfg: Config = toml::from_str("[store]\nmax-size = \"20GiB\"").unwrap();
        assert_eq!(cfg.max_nar_size(), 20 << 30);
        let cfg: Config =
            toml::from_str("[store]\nmax-size = \"20GiB\"\n[mesh]\nmax-nar-size = \"2GiB\"")
                .unwrap();
        assert_eq!(cfg.max_nar_size(), 2 << 30);
    }

    #[test]
    fn empty_file_gives_defaults() {
        let cfg: Config = toml::from_str("").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.http.listen[0].to_string(), "127.0.0.1:5480");
        assert_eq!(cfg.spool_dir(), Path::new(DEFAULT_SPOOL));
    }

    #[test]
    fn full_file_parses() {
        let cfg: Config = toml::from_str(
            r#"
            data-dir = "/tmp/x"
            socket = "/tmp/x/s.sock"
            trusted-public-keys = ["cacheA-1:8gJDx84852w7xzEEMsHQbvrbMS6hKcwOPzC5GNuViqs="]
            upstream-keys = []
            [nix]
            store-root = "/tmp/root"
            [http]
            listen = ["127.0.0.1:0"]
            priority = 10
            [pipeline]
            workers = 1
            [mirror.s3]
            bucket = "cache"
            endpoint = "http://127.0.0.1:8333"
            prefix = "nix/"
            compression = "xz"
            part-size = 8388608
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let s3 = cfg.mirror.s3.as_ref().unwrap();
        assert_eq!((s3.compression, s3.concurrency), (Compression::Xz, 8));
        assert_eq!(cfg.spool_dir(), Path::new("/tmp/x/spool"));
        assert_eq!(cfg.trusted_keys().unwrap().keys().len(), 1);
    }

    #[test]
    fn rejects_bad_mirror_settings() {
        for bad in [
            "[mirror.s3]\nendpoint = \"http://x\"",
            "[mirror.s3]\nbucket = \"b\"\npart-size = 1024",
            "[mirror.s3]\nbucket = \"b\"\nprefix = \"nix\"",
            "[mirror.s3]\nbucket = \"b\"\nendpoint = \"ftp://x\"",
            "[mirror.s3]\nbucket = \"b\"\nconcurrency = 0",
            "[mirror.s3]\nbucket = \"b\"\ncompression = \"bzip2\"",
            "[mirror.s3]\nbucket = \"b\"\nregoin = \"x\"",
            "[mirror.s3]\nbucket = \"b\"\naudit-secs = 2592001",
        ] {
            let parsed: Result<Config, _> = toml::from_str(bad);
            assert!(
                parsed.map(|c| c.validate().is_err()).unwrap_or(true),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Config>("nope = 1").is_err());
        assert!(toml::from_str::<Config>("[http]\nport = 1").is_err());
        let cfg: Config = toml::from_str("trusted-public-keys = [\"junk\"]").unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                key: "trusted-public-keys",
                ..
            })
        ));
        let cfg: Config = toml::from_str("[pipeline]\nworkers = 0").unwrap();
        assert!(cfg.validate().is_err());
        let cfg: Config = toml::from_str("[http]\nbusy-poll-us = 5000").unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                key: "http.busy-poll-us",
                ..
            })
        ));
        let cfg: Config = toml::from_str("[http]\nbusy-poll-us = 0").unwrap();
        assert!(cfg.validate().is_ok());
        for (idle, ok) in [(0, false), (1, true), (86_400, true), (86_401, false)] {
            let cfg: Config = toml::from_str(&format!("[http]\nidle-secs = {idle}")).unwrap();
            assert_eq!(cfg.validate().is_ok(), ok, "idle-secs {idle}");
        }
        for (bad, ok) in [("1MiB", false), ("8GiB", false), ("2MiB", true)] {
            let cfg: Config = toml::from_str(&format!("[mesh]\nfetch-memory = \"{bad}\"")).unwrap();
            assert_eq!(cfg.validate().is_ok(), ok, "fetch-memory {bad}");
        }
        for (bad, ok) in [("512KiB", false), ("8GiB", false), ("1MiB", true)] {
            let cfg: Config = toml::from_str(&format!("[store]\nread-memory = \"{bad}\"")).unwrap();
            assert_eq!(cfg.validate().is_ok(), ok, "read-memory {bad}");
        }
    }
}
