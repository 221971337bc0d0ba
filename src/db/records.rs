//! The records the node keeps in redb, serialized with postcard. Field order is the format:
//! add fields only at the end, and bump the table version for anything else.

use serde::{Deserialize, Serialize};

/// A report waiting in the durable queue: a build's derivation and/or output paths, already
/// validated as store paths (full paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    pub drv: Option<String>,
    pub outs: Vec<String>,
}

/// A recorded, signed, servable store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRecord {
    /// Full store path.
    pub store_path: String,
    /// The signed narinfo, rendered.
    pub narinfo: String,
    /// BLAKE3 of the NAR: its key in the blob store.
    pub blake3: [u8; 32],
    pub nar_size: u64,
    /// Seconds since the epoch.
    pub recorded_at: u64,
    /// True once the NAR is in this node's blob store (always for paths built here).
    pub local: bool,
    /// Peers (endpoint ids) said to hold the NAR.
    pub providers: Vec<[u8; 32]>,
}

impl PathRecord {
    /// The hash part of the store path: the record's key.
    pub fn hash_part(&self) -> &str {
        let base = self
            .store_path
            .rsplit('/')
            .next()
            .unwrap_or(&self.store_path);
        base.get(..crate::nix::store_path::HASH_LEN).unwrap_or(base)
    }
}

/// Counters kept with the data, so they survive restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub queue_depth: u64,
    pub paths: u64,
    pub nar_bytes: u64,
    pub failures: u64,
}
