//! Announcements on the cluster's gossip topic: "I recorded this path, here is its signed
//! narinfo and where to fetch its NAR". Receivers trust nothing in it but the narinfo's
//! signatures, checked against their own `trusted-public-keys`.

use serde::{Deserialize, Serialize};

/// Largest announcement a node sends or accepts (gossip's own limit is set to match).
pub const MAX_ANNOUNCE: usize = 64 * 1024;

/// One recorded path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Protocol version of the sender.
    pub version: u16,
    /// The rendered narinfo, with every signature.
    pub narinfo: String,
    /// BLAKE3 of the NAR: its key for transfers.
    pub blake3: [u8; 32],
    pub nar_size: u64,
    /// Endpoint ids (32-byte public keys) known to hold the NAR.
    pub providers: Vec<[u8; 32]>,
}
