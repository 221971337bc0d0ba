//! Catch-up and NAR transfer between peers, each on its own ALPN over iroh (QUIC). Every request
//! is one length-prefixed postcard frame (see [`crate::frame`]) on a fresh bidirectional stream;
//! the answer comes back on the same stream.
//!
//! Version 2 (`/2` ALPNs) carries [`PathAnnounce`]s in catch-up and moves NARs as verified
//! ranges: a fetcher first gets the NAR's BLAKE3 leaves (one chaining value per 16 KiB chunk
//! group, checked against the signed BLAKE3), then asks any provider for any range of chunk
//! groups and checks every group as it arrives. Nodes still answer version 1 on the `/1` ALPNs.

use serde::{Deserialize, Serialize};

use crate::gossip::{PathAnnounce, v1};

/// ALPN of catch-up, version 1: "what did you record after my cursor?".
pub const SYNC_ALPN_V1: &[u8] = b"narmesh/sync/1";
/// ALPN of catch-up, version 2.
pub const SYNC_ALPN: &[u8] = b"narmesh/sync/2";
/// ALPN of NAR transfer by BLAKE3 hash, version 1 (the whole NAR from an offset).
pub const NAR_ALPN_V1: &[u8] = b"narmesh/nar/1";
/// ALPN of NAR transfer, version 2 (leaves, then verified ranges).
pub const NAR_ALPN: &[u8] = b"narmesh/nar/2";
/// ALPN of the opt-in bulk channel's tickets, version 1: "may I fetch this NAR over TCP?".
pub const BULK_ALPN: &[u8] = b"narmesh/bulk/1";
/// Most log entries a node returns per catch-up batch.
pub const MAX_SYNC_BATCH: u32 = 512;

/// Catch-up request (both versions): entries of the peer's log with sequence number `> after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub version: u16,
    pub after: u64,
    pub limit: u32,
}

/// Catch-up answer, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBatch {
    pub entries: Vec<v1::Announce>,
    /// The cursor to send next time (the last entry's sequence number, or `after` if none).
    pub next: u64,
    /// True if the log holds more entries after `next`.
    pub more: bool,
}

/// Catch-up answer, version 2: entries in log order, and the sequence number to ask after next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBatchV2 {
    pub entries: Vec<PathAnnounce>,
    /// The cursor to send next time (the last entry's sequence number, or `after` if none).
    pub next: u64,
    /// True if the log holds more entries after `next`.
    pub more: bool,
}

/// NAR request, version 1. The answer is a [`NarHeader`] frame, then (if found) `size` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarRequest {
    pub version: u16,
    pub blake3: [u8; 32],
    /// First byte wanted (for resuming).
    pub offset: u64,
}

/// The head of a version 1 NAR answer.
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

/// NAR request, version 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarQuery {
    pub version: u16,
    pub blake3: [u8; 32],
    pub what: NarWhat,
}

/// What a version 2 request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NarWhat {
    /// The NAR's size and leaves.
    Leaves,
    /// Bytes `start..end`; `start` is a multiple of 16 KiB, `end` too or the NAR's size.
    Range { start: u64, end: u64 },
}

/// The head of a version 2 answer; raw bytes follow where it says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NarReply {
    /// The leaves follow: 32 bytes per 16 KiB chunk group of a NAR of `size` bytes.
    Leaves {
        size: u64,
    },
    /// The `len` bytes of the range asked follow.
    Range {
        len: u64,
    },
    NotFound,
    /// The provider is at its limit of transfers: ask again later or elsewhere.
    Busy,
    Error {
        message: String,
    },
}

/// Asked on [`BULK_ALPN`]: a ticket to fetch ranges of this NAR over the provider's TCP bulk
/// channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkAsk {
    pub blake3: [u8; 32],
}

/// The answer to a [`BulkAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BulkReply {
    /// Connect to `port` (at the address the mesh connection came from) and send a
    /// [`BulkHeader`] with `token`; good for ranges of that NAR for `valid_ms`.
    Ticket {
        port: u16,
        token: [u8; 32],
        valid_ms: u64,
    },
    NotFound,
    /// Too many tickets out, or no bulk channel: use the QUIC ranges.
    Busy,
}

/// The first bytes of a bulk TCP connection: `NMB1`, the ticket's token, then the range
/// (`start`, `end`, big-endian u64, the same rules as a version 2 `Range`). The answer is the
/// range's bytes, exactly, then the connection closes; anything wrong closes it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkHeader {
    pub token: [u8; 32],
    pub start: u64,
    pub end: u64,
}

impl BulkHeader {
    pub const MAGIC: [u8; 4] = *b"NMB1";
    pub const LEN: usize = 4 + 32 + 8 + 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..36].copy_from_slice(&self.token);
        out[36..44].copy_from_slice(&self.start.to_be_bytes());
        out[44..52].copy_from_slice(&self.end.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Option<Self> {
        if b[..4] != Self::MAGIC {
            return None;
        }
        let mut token = [0u8; 32];
        token.copy_from_slice(&b[4..36]);
        let start = u64::from_be_bytes(b[36..44].try_into().ok()?);
        let end = u64::from_be_bytes(b[44..52].try_into().ok()?);
        Some(BulkHeader { token, start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = postcard::from_bytes::<SyncRequest>(&bytes);
            let _ = postcard::from_bytes::<SyncBatch>(&bytes);
            let _ = postcard::from_bytes::<SyncBatchV2>(&bytes);
            let _ = postcard::from_bytes::<NarRequest>(&bytes);
            let _ = postcard::from_bytes::<NarHeader>(&bytes);
            let _ = postcard::from_bytes::<NarQuery>(&bytes);
            let _ = postcard::from_bytes::<NarReply>(&bytes);
            let _ = postcard::from_bytes::<BulkAsk>(&bytes);
            let _ = postcard::from_bytes::<BulkReply>(&bytes);
            if let Ok(h) = <[u8; BulkHeader::LEN]>::try_from(&bytes[..bytes.len().min(BulkHeader::LEN)]) {
                let _ = BulkHeader::decode(&h);
            }
        }

        #[test]
        fn bulk_headers_round_trip(token in any::<[u8; 32]>(), start in any::<u64>(), end in any::<u64>()) {
            let h = BulkHeader { token, start, end };
            prop_assert_eq!(BulkHeader::decode(&h.encode()), Some(h));
            let mut bad = BulkHeader { token, start, end }.encode();
            bad[0] ^= 1;
            prop_assert_eq!(BulkHeader::decode(&bad), None);
        }

        #[test]
        fn bulk_replies_round_trip(token in any::<[u8; 32]>(), port in any::<u16>(), valid_ms in any::<u64>()) {
            for r in [BulkReply::Ticket { port, token, valid_ms }, BulkReply::NotFound, BulkReply::Busy] {
                let bytes = postcard::to_allocvec(&r).unwrap();
                prop_assert_eq!(postcard::from_bytes::<BulkReply>(&bytes).unwrap(), r);
            }
        }

        #[test]
        fn queries_round_trip(start in any::<u64>(), end in any::<u64>(), b in any::<[u8; 32]>()) {
            for what in [NarWhat::Leaves, NarWhat::Range { start, end }] {
                let q = NarQuery { version: 2, blake3: b, what };
                let bytes = postcard::to_allocvec(&q).unwrap();
                prop_assert_eq!(postcard::from_bytes::<NarQuery>(&bytes).unwrap(), q);
            }
        }
    }

    #[test]
    fn golden_v1_messages_still_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v1");
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        let batch: SyncBatch = postcard::from_bytes(&read("sync-batch.postcard")).unwrap();
        assert_eq!(batch.entries.len(), 4);
        assert!(!batch.more);
        let req: SyncRequest = postcard::from_bytes(&read("sync-request.postcard")).unwrap();
        assert_eq!((req.version, req.after, req.limit), (1, 3, 512));
        let nar: NarRequest = postcard::from_bytes(&read("nar-request.postcard")).unwrap();
        assert_eq!((nar.version, nar.offset), (1, 1000));
        let hdr: NarHeader = postcard::from_bytes(&read("nar-header.postcard")).unwrap();
        assert_eq!(hdr, NarHeader::Found { size: 123456 });
        match crate::gossip::decode(&read("announce.postcard")).unwrap() {
            crate::gossip::Incoming::V1(a) => assert!(a.narinfo.starts_with("StorePath: ")),
            other => panic!("{other:?}"),
        }
    }

    /// `ae93e66`'s messages (`tests/fixtures/v2`): a real catch-up batch of four paths, one of
    /// them as gossip, and the transfer's and bulk channel's requests and answers.
    #[test]
    fn golden_v2_messages_still_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v2");
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        let batch: SyncBatchV2 = postcard::from_bytes(&read("sync-batch.postcard")).unwrap();
        assert_eq!((batch.entries.len(), batch.next, batch.more), (4, 4, false));
        for e in &batch.entries {
            assert!(e.narinfo.starts_with("StorePath: /nix/store/"), "{e:?}");
            assert_eq!((e.bindings.len(), e.providers.len()), (1, 1), "{e:?}");
            assert!(e.providers[0].holds);
        }
        let req: SyncRequest = postcard::from_bytes(&read("sync-request.postcard")).unwrap();
        assert_eq!((req.version, req.after, req.limit), (2, 0, 512));
        let one = match crate::gossip::decode(&read("announce.postcard")).unwrap() {
            crate::gossip::Incoming::V2(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(one, batch.entries[1]);
        let b = one.blake3;
        let q = |n: &str| postcard::from_bytes::<NarQuery>(&read(n)).unwrap();
        assert_eq!(
            q("nar-query-leaves.postcard"),
            NarQuery {
                version: 2,
                blake3: b,
                what: NarWhat::Leaves
            }
        );
        let range = NarWhat::Range {
            start: 16384,
            end: 65536,
        };
        assert_eq!(
            q("nar-query-range.postcard"),
            NarQuery {
                version: 2,
                blake3: b,
                what: range
            }
        );
        let r = |n: &str| postcard::from_bytes::<NarReply>(&read(n)).unwrap();
        assert_eq!(
            r("nar-reply-leaves.postcard"),
            NarReply::Leaves { size: one.nar_size }
        );
        assert_eq!(
            r("nar-reply-range.postcard"),
            NarReply::Range { len: 49152 }
        );
        assert_eq!(r("nar-reply-busy.postcard"), NarReply::Busy);
        let ask: BulkAsk = postcard::from_bytes(&read("bulk-ask.postcard")).unwrap();
        assert_eq!(ask, BulkAsk { blake3: b });
        let reply: BulkReply = postcard::from_bytes(&read("bulk-reply.postcard")).unwrap();
        assert_eq!(
            reply,
            BulkReply::Ticket {
                port: 40123,
                token: [7; 32],
                valid_ms: 10_000
            }
        );
        let header: [u8; BulkHeader::LEN] = read("bulk-header.bin").try_into().unwrap();
        assert_eq!(
            BulkHeader::decode(&header),
            Some(BulkHeader {
                token: [7; 32],
                start: 16384,
                end: 65536
            })
        );
    }
}
