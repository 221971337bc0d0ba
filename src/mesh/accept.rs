//! Deciding what to believe from peers: an announcement (from gossip or catch-up) becomes a
//! record only if its narinfo parses strictly, agrees with the announcement, and carries a
//! valid signature by one of this node's `trusted-public-keys`. The record names our own URL
//! for the NAR and adds this node's signature beside the originals.

use narmesh_proto::gossip::Announce;

use crate::db::PathRecord;
use crate::nix::{NarInfo, SecretKey, TrustedKeys};
use crate::pipeline::nar_url;

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("protocol version {0} not spoken here")]
    Version(u16),
    #[error("bad narinfo: {0}")]
    NarInfo(#[from] crate::nix::narinfo::NarInfoError),
    #[error("{0}: NarSize {1} but the announcement says {2}")]
    Size(String, u64, u64),
    #[error("{0}: not signed by any trusted public key")]
    Untrusted(String),
}

/// Turn an announcement into a record this node can serve, or say why not.
pub fn record_from(
    ann: &Announce,
    trusted: &TrustedKeys,
    key: &SecretKey,
    allowed: impl Fn(&[u8; 32]) -> bool,
) -> Result<PathRecord, Refused> {
    if ann.version != narmesh_proto::MESH_PROTOCOL_VERSION {
        return Err(Refused::Version(ann.version));
    }
    let mut info = NarInfo::parse(&ann.narinfo)?;
    let path = info.store_path.full();
    if info.nar_size != ann.nar_size {
        return Err(Refused::Size(path, info.nar_size, ann.nar_size));
    }
    if !info.is_trusted(trusted) {
        return Err(Refused::Untrusted(path));
    }
    info.url = nar_url(&ann.blake3);
    info.compression = "none".into();
    info.file_hash = Some(info.nar_hash);
    info.file_size = Some(info.nar_size);
    info.sign(key);
    Ok(PathRecord {
        store_path: path,
        narinfo: info.render(),
        blake3: ann.blake3,
        nar_size: ann.nar_size,
        recorded_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        local: false,
        providers: ann
            .providers
            .iter()
            .filter(|p| allowed(p))
            .copied()
            .collect(),
    })
}

/// The announcement of a record, naming this node as a provider if it holds the NAR.
pub fn announce_of(rec: &PathRecord, me: [u8; 32]) -> Announce {
    let mut providers = rec.providers.clone();
    if rec.local && !providers.contains(&me) {
        providers.insert(0, me);
    }
    Announce {
        version: narmesh_proto::MESH_PROTOCOL_VERSION,
        narinfo: rec.narinfo.clone(),
        blake3: rec.blake3,
        nar_size: rec.nar_size,
        providers,
    }
}
