//! The node's configuration: TOML, every key optional with a default, unknown keys rejected,
//! checked by [`Config::validate`] after loading; command-line flags override.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::nix::{PublicKey, TrustedKeys};

/// Default data directory (redb database, blob store, keys, spool).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/narmesh";
/// Default Unix socket the hook and the CLI talk to.
pub const DEFAULT_SOCKET: &str = "/run/narmesh/narmesh.sock";
/// Default spool directory of the hook (matches `narmesh-hook`'s default).
pub const DEFAULT_SPOOL: &str = "/var/lib/narmesh/spool";
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
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Where the node keeps its database, blobs and generated keys.
    pub data_dir: PathBuf,
    /// The Unix socket for hook reports and CLI requests.
    pub socket: PathBuf,
    /// Where `narmesh-hook` spools reports while the node is down; taken in at start and while running.
    pub spool_dir: Option<PathBuf>,
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
    pub mesh: MeshConfig,
}

/// How a node replicates NARs its peers announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Replicate {
    /// Fetch a NAR when the local Nix asks for it.
    #[default]
    OnDemand,
    /// Fetch every announced NAR at once.
    Eager,
}

/// `[mesh]`: the peers this node shares with, over iroh.
#[derive(Debug, Clone, Deserialize)]
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
}

/// `[nix]`: the local Nix store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct NixConfig {
    /// `/` for the system store, or the root of a chroot store.
    pub store_root: PathBuf,
}

/// `[http]`: the binary cache the local Nix substitutes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HttpConfig {
    /// Addresses to listen on (loopback only by default).
    pub listen: Vec<SocketAddr>,
    /// `Priority` in nix-cache-info (lower wins; cache.nixos.org uses 40).
    pub priority: u32,
}

/// `[pipeline]`: how paths are turned into signed NARs.
#[derive(Debug, Clone, Deserialize)]
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
            secret_key_file: None,
            key_name: None,
            trusted_public_keys: Vec::new(),
            upstream_keys: vec![CACHE_NIXOS_ORG_KEY.to_owned()],
            nix: NixConfig::default(),
            http: HttpConfig::default(),
            pipeline: PipelineConfig::default(),
            mesh: MeshConfig::default(),
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
            priority: 30,
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

    /// Check every value that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| ConfigError::Invalid { key, why };
        self.trusted_keys()?;
        self.upstream_trusted_keys()?;
        if self.http.listen.is_empty() {
            return Err(invalid(
                "http.listen",
                "at least one address is needed".into(),
            ));
        }
        if self.pipeline.workers == 0 || self.pipeline.workers > 64 {
            return Err(invalid("pipeline.workers", "must be 1..=64".into()));
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
        if self.mesh.cluster.is_empty() {
            return Err(invalid("mesh.cluster", "must not be empty".into()));
        }
        if let Some(name) = &self.key_name {
            crate::nix::SecretKey::generate(name)
                .map_err(|e| invalid("key-name", e.to_string()))?;
        }
        Ok(())
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
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.spool_dir(), Path::new("/tmp/x/spool"));
        assert_eq!(cfg.trusted_keys().unwrap().keys().len(), 1);
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
    }
}
