//! Announcements on the cluster's gossip topic, and the entries of catch-up batches: "this path
//! is recorded: here is its signed narinfo, the BLAKE3 of its NAR bound to the narinfo by a
//! signature, and who holds the NAR". Receivers trust nothing in it but signatures, checked
//! against their own `trusted-public-keys` (narinfo and binding) and, for provider statements,
//! against the stating peer's endpoint key.
//!
//! Version 2 adds the binding signatures, the references left out because they are signed
//! upstream, and signed provider statements (a provider can withdraw). A node still takes in
//! version 1 ([`v1::Announce`]); [`decode`] tells them apart by their leading version.

use serde::{Deserialize, Serialize};

/// Largest announcement a node sends or accepts (gossip's own limit is set to match).
pub const MAX_ANNOUNCE: usize = 64 * 1024;
/// Most provider statements, binding signatures or upstream references one announcement carries.
pub const MAX_LIST: usize = 64;

/// Version 1, as nodes of `e5a6e05` send it.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    /// One recorded path.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Announce {
        /// Protocol version of the sender (1).
        pub version: u16,
        /// The rendered narinfo, with every signature.
        pub narinfo: String,
        /// BLAKE3 of the NAR (not covered by any signature in version 1).
        pub blake3: [u8; 32],
        pub nar_size: u64,
        /// Endpoint ids (32-byte public keys) said to hold the NAR.
        pub providers: Vec<[u8; 32]>,
    }
}

/// "Peer `id` holds (or no longer holds) the NAR with this BLAKE3, as of `at_ms`", signed by
/// `id`'s endpoint key over [`ProviderStatement::signed_bytes`]. For each provider the
/// statement with the latest `at_ms` wins, whatever order statements arrive in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatement {
    pub id: [u8; 32],
    pub holds: bool,
    /// Milliseconds since the epoch, by the provider's clock.
    pub at_ms: u64,
    /// Ed25519 signature (64 bytes) by `id`.
    pub sig: Vec<u8>,
}

impl ProviderStatement {
    /// What the provider signs.
    pub fn signed_bytes(blake3: &[u8; 32], holds: bool, at_ms: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(b"narmesh-provider/1");
        m.extend_from_slice(blake3);
        m.push(holds as u8);
        m.extend_from_slice(&at_ms.to_le_bytes());
        m
    }
}

/// One recorded path (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathAnnounce {
    /// The rendered narinfo, with every Nix signature.
    pub narinfo: String,
    /// BLAKE3 of the NAR: its key for transfers, and the root its chunk groups verify against.
    pub blake3: [u8; 32],
    pub nar_size: u64,
    /// Binding signatures (`name:base64`, Nix key format) over store path, NarHash, NarSize and
    /// BLAKE3, by the nodes that computed the BLAKE3 from the bytes.
    pub bindings: Vec<String>,
    /// Hash parts of the narinfo's references that were not recorded because a key in the
    /// origin's `upstream-keys` signed them (public already): nobody waits for them.
    pub upstream_refs: Vec<String>,
    pub providers: Vec<ProviderStatement>,
}

/// A version 2 gossip message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gossip {
    /// 2; its position (first) is what tells versions apart.
    pub version: u16,
    pub announce: PathAnnounce,
}

/// A gossip message of any version this crate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    V1(v1::Announce),
    V2(PathAnnounce),
}

/// Why a gossip message was not read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("announcement of {0} bytes is over the limit of {MAX_ANNOUNCE}")]
    TooLarge(usize),
    #[error("announcement of protocol version {0} is not spoken here")]
    Version(u16),
    #[error("undecodable announcement: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("announcement lists more than {MAX_LIST} entries")]
    TooMany,
}

/// Read a gossip message of version 1 or 2 (both start with their version).
pub fn decode(bytes: &[u8]) -> Result<Incoming, DecodeError> {
    if bytes.len() > MAX_ANNOUNCE {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (version, _) = postcard::take_from_bytes::<u16>(bytes)?;
    match version {
        1 => {
            let a: v1::Announce = postcard::from_bytes(bytes)?;
            if a.providers.len() > MAX_LIST {
                return Err(DecodeError::TooMany);
            }
            Ok(Incoming::V1(a))
        }
        2 => {
            let g: Gossip = postcard::from_bytes(bytes)?;
            g.announce.check_lengths()?;
            Ok(Incoming::V2(g.announce))
        }
        v => Err(DecodeError::Version(v)),
    }
}

impl PathAnnounce {
    /// Refuse lists longer than a sender would ever make.
    pub fn check_lengths(&self) -> Result<(), DecodeError> {
        if self.bindings.len() > MAX_LIST
            || self.upstream_refs.len() > MAX_LIST * 16
            || self.providers.len() > MAX_LIST
        {
            return Err(DecodeError::TooMany);
        }
        Ok(())
    }

    /// The message as version 2 gossip.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(&Gossip {
            version: 2,
            announce: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PathAnnounce {
        PathAnnounce {
            narinfo: "StorePath: /nix/store/x\n".into(),
            blake3: [3; 32],
            nar_size: 120,
            bindings: vec!["a-1:sig".into()],
            upstream_refs: vec!["0".repeat(32)],
            providers: vec![ProviderStatement {
                id: [9; 32],
                holds: true,
                at_ms: 5,
                sig: vec![1; 64],
            }],
        }
    }

    #[test]
    fn versions_are_told_apart() {
        let v2 = sample().encode().unwrap();
        assert_eq!(decode(&v2).unwrap(), Incoming::V2(sample()));
        let v1 = postcard::to_allocvec(&v1::Announce {
            version: 1,
            narinfo: "x".into(),
            blake3: [1; 32],
            nar_size: 2,
            providers: vec![[4; 32]],
        })
        .unwrap();
        assert!(matches!(decode(&v1).unwrap(), Incoming::V1(a) if a.nar_size == 2));
        let mut v9 = v2.clone();
        v9[0] = 9;
        assert!(matches!(decode(&v9), Err(DecodeError::Version(9))));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn v2_round_trips(narinfo in "\\PC{0,200}", size in any::<u64>(), at in any::<u64>()) {
            let mut a = sample();
            a.narinfo = narinfo;
            a.nar_size = size;
            a.providers[0].at_ms = at;
            prop_assert_eq!(decode(&a.encode().unwrap()).unwrap(), Incoming::V2(a));
        }
    }
}
