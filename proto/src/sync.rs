//! Catch-up and NAR transfer between peers, each on its own ALPN over iroh (QUIC).
//! Every request is one length-prefixed postcard frame (see [`crate::frame`]) on a fresh
//! bidirectional stream; the answer comes back on the same stream.

use serde::{Deserialize, Serialize};

use crate::gossip::Announce;

/// ALPN of catch-up: "what did you record after my cursor?".
pub const SYNC_ALPN: &[u8] = b"narmesh/sync/1";
/// ALPN of NAR transfer by BLAKE3 hash.
pub const NAR_ALPN: &[u8] = b"narmesh/nar/1";
/// Most log entries a node returns per catch-up batch.
pub const MAX_SYNC_BATCH: u32 = 512;

/// Catch-up request: entries of the peer's log with sequence number `> after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub version: u16,
    pub after: u64,
    pub limit: u32,
}

/// Catch-up answer: entries in log order, and the sequence number to ask after next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBatch {
    pub entries: Vec<Announce>,
    /// The cursor to send next time (the last entry's sequence number, or `after` if none).
    pub next: u64,
    /// True if the log holds more entries after `next`.
    pub more: bool,
}

/// NAR request. The answer is a [`NarHeader`] frame, then (if found) `size` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarRequest {
    pub version: u16,
    pub blake3: [u8; 32],
    /// First byte wanted (for resuming).
    pub offset: u64,
}

/// The head of a NAR answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NarHeader {
    /// `size` bytes follow, starting at the requested offset.
    Found {
        size: u64,
    },
    NotFound,
    Error {
        message: String,
    },
}
