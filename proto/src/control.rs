//! Requests to the node over its Unix socket, and its responses. One request frame, one
//! response frame, per exchange; a connection may carry several exchanges.

use serde::{Deserialize, Serialize};

use crate::hook::HookReport;

/// A request, always wrapped in a [`Envelope`] with the sender's protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// From `narmesh-hook`: record these built paths. Answered with `Accepted` only once the
    /// report is durably recorded (fsync'd).
    Hook(HookReport),
    /// From `narmesh push`: record these store paths (full paths) and their closures.
    Push { paths: Vec<String> },
    /// Which of these store paths (full paths) the node has recorded and can serve.
    Lookup { paths: Vec<String> },
    /// The node's state.
    Status,
    /// Keep (or stop keeping) the closures of these store paths (full paths) from eviction.
    Pin { paths: Vec<String>, pinned: bool },
}

/// What every frame carries: the sender's protocol version, then the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub request: Request,
}

/// The node's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The request is durably recorded; `paths` roots were queued.
    Accepted {
        paths: u32,
    },
    /// For `Lookup`: one flag per path asked, in order.
    Known {
        recorded: Vec<bool>,
    },
    Status(Box<StatusReport>),
    /// The request was refused; nothing of it was recorded.
    Error {
        message: String,
    },
}

/// The node's state, for `narmesh status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub public_key: String,
    pub socket: String,
    pub http_listen: Vec<String>,
    /// Reports waiting in the durable queue.
    pub queue_depth: u64,
    /// Store paths recorded, signed and servable.
    pub paths_recorded: u64,
    /// NAR bytes held here (own paths in the Nix store, and NAR files).
    pub nar_bytes: u64,
    /// Paths that could not be ingested (bad hash, vanished from the store, ...).
    pub ingest_failures: u64,
    /// Spool files taken in since start.
    pub spool_taken: u64,
    /// The mesh endpoint id (empty when the mesh is off).
    pub endpoint_id: String,
    /// What another node puts in its `[mesh] peers` to reach this one.
    pub peer_address: String,
    pub peers: Vec<PeerStatus>,
    /// The S3 mirror, on the node that runs one.
    pub mirror: Option<MirrorStatus>,
    /// Spooled hook reports waiting to be taken in (a transient failure holds them back).
    pub spool_waiting: u64,
    /// Spooled hook reports that can never be accepted, kept in `<spool>/rejected/`.
    pub spool_rejected: u64,
    /// What the node holds on disk.
    pub storage: StorageStatus,
    /// What is wrong now (a full disk, an unreadable store database, ...), one line each.
    pub problems: Vec<String>,
    /// Records of paths nobody held any more, forgotten (`[store] forget-after-secs`).
    pub records_forgotten: u64,
}

/// What a node holds, and its disk budget.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageStatus {
    /// Own paths served straight from the local Nix store (no copy), and their NAR bytes.
    pub own_paths: u64,
    pub own_bytes: u64,
    /// NAR files fetched from peers: count and bytes, and the cap on those bytes.
    pub files: u64,
    pub file_bytes: u64,
    pub cap_bytes: u64,
    /// NAR files evicted to stay within the cap.
    pub evictions: u64,
    /// Own paths that left the local Nix store (Nix GC, `nix-store --delete`).
    pub gc_lost: u64,
}

/// The S3 mirror as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub bucket: String,
    /// Paths recorded but not yet complete in the bucket (mirror lag).
    pub pending_paths: u64,
    /// NAR bytes of the paths whose NAR is not yet in the bucket.
    pub pending_bytes: u64,
    /// Paths completed (narinfo uploaded) since the node started.
    pub uploaded_paths: u64,
    /// Compressed NAR bytes uploaded since the node started.
    pub uploaded_bytes: u64,
    /// Upload rate over the last 10 seconds.
    pub upload_bytes_per_sec: u64,
    /// Failed attempts since the node started (each is retried).
    pub failures: u64,
    /// The latest failure, cleared by the next success.
    pub last_error: Option<String>,
}

/// One mesh peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub endpoint_id: String,
    /// `unreachable` (the last catch-up failed), `neighbor` (gossip link up), `known`
    /// (configured or discovered, no link).
    pub state: String,
    /// Last log sequence number taken from this peer by catch-up.
    pub cursor: u64,
    /// Seconds since the last successful catch-up, if any.
    pub last_sync_secs_ago: Option<u64>,
}
