//! The hook's report: what Nix's post-build-hook saw. Paths are strings here; the node
//! validates every one before accepting the report.

use serde::{Deserialize, Serialize};

/// The socket the hook connects to unless `NARMESH_SOCKET` names another (the node's default
/// `socket`).
pub const DEFAULT_SOCKET: &str = "/run/narmesh/narmesh.sock";
/// Where the hook spools unless `NARMESH_SPOOL` names another (the node's default `spool-dir`
/// with the default `data-dir`).
pub const DEFAULT_SPOOL: &str = "/var/lib/narmesh/spool";
/// The hook's deadline for the node's acknowledgement, in milliseconds, unless
/// `NARMESH_HOOK_TIMEOUT_MS` says otherwise.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;

/// One post-build-hook call: `DRV_PATH` and the space-separated `OUT_PATHS`.
/// Nix 2.8 leaves `OUT_PATHS` empty: the node then takes the outputs of `drv_path` from the
/// store database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub drv_path: Option<String>,
    pub out_paths: Vec<String>,
}

impl HookReport {
    /// Build a report from the hook's environment values.
    pub fn from_env_values(drv_path: Option<&str>, out_paths: Option<&str>) -> Self {
        HookReport {
            drv_path: drv_path
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            out_paths: out_paths
                .unwrap_or_default()
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
        }
    }
}
