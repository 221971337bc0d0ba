//! Deciding what to believe from peers, and what to tell them. Pure functions, no I/O.
//!
//! A claim is taken in only if its narinfo parses strictly, agrees with the announcement, is
//! signed by one of this node's `trusted-public-keys`, and (version 2) its BLAKE3 is bound to
//! the narinfo by a trusted binding signature. Provider statements count only when signed by
//! the stating peer's endpoint key and that peer is allowed. A version 1 announcement carries
//! no binding: its claim is taken in *unbound*, served only when no bound claim exists, never
//! in the way of a local build, and its bytes are trusted only once they match the signed
//! NarHash. The record names this node's own URL for the NAR and adds its signature beside
//! the originals.

use iroh::{PublicKey as EndpointKey, SecretKey as EndpointSecret};
use narmesh_proto::gossip::{Incoming, PathAnnounce, ProviderStatement, v1};

use std::collections::HashSet;

use crate::db::{Claim, MAX_BINDINGS, Provider, RemoteClaim, merge_provider};
use crate::nix::{NarInfo, SecretKey, TrustedKeys};
use crate::pipeline::nar_url;

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("bad narinfo: {0}")]
    NarInfo(String),
    #[error("{0}: NarSize {1} but the announcement says {2}")]
    Size(String, u64, u64),
    #[error("{0}: not signed by any trusted public key")]
    Untrusted(String),
    #[error("{0}: its BLAKE3 is not bound to the narinfo by a trusted key")]
    Unbound(String),
    #[error("{0}: a NAR of {1} bytes is over mesh.max-nar-size")]
    TooLarge(String, u64),
    #[error("an announcement lists more bindings, providers or references than any node sends")]
    TooMany,
}

impl Refused {
    /// The reason, as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::NarInfo(_) => "bad-narinfo",
            Refused::Size(..) => "size-mismatch",
            Refused::Untrusted(_) => "untrusted-signature",
            Refused::Unbound(_) => "unbound-blake3",
            Refused::TooLarge(..) => "too-large",
            Refused::TooMany => "too-many-entries",
        }
    }
}

/// What a node checks announcements against.
pub struct Judge<'a, A: Fn(&[u8; 32]) -> bool> {
    pub trusted: &'a TrustedKeys,
    /// This node's Nix key: its signature is added to every narinfo it serves.
    pub key: &'a SecretKey,
    /// Whether an endpoint id is an allowed peer.
    pub allowed: A,
    pub max_nar_size: u64,
}

impl<A: Fn(&[u8; 32]) -> bool> Judge<'_, A> {
    /// Check the narinfo and make the claim's served form; `None` binding check for version 1.
    fn narinfo(
        &self,
        text: &str,
        blake3: &[u8; 32],
        nar_size: u64,
    ) -> Result<(NarInfo, String), Refused> {
        let mut info = NarInfo::parse(text).map_err(|e| Refused::NarInfo(e.to_string()))?;
        let path = info.store_path.full();
        if info.nar_size != nar_size {
            return Err(Refused::Size(path, info.nar_size, nar_size));
        }
        if nar_size > self.max_nar_size {
            return Err(Refused::TooLarge(path, nar_size));
        }
        if !info.is_trusted(self.trusted) {
            return Err(Refused::Untrusted(path));
        }
        info.url = nar_url(blake3);
        info.compression = "none".into();
        info.file_hash = Some(info.nar_hash);
        info.file_size = Some(info.nar_size);
        info.sign(self.key);
        Ok((info, path))
    }

    /// Every announcement of a batch as a claim, or why not, in the batch's order. Each takes
    /// three or more signature checks: a catch-up batch is split across the cores, a small
    /// batch (gossip) stays on this thread.
    pub fn judge_all(&self, anns: &[Incoming]) -> Vec<Result<RemoteClaim, Refused>>
    where
        A: Sync,
    {
        let one = |ann: &Incoming| match ann {
            Incoming::V1(a) => self.claim_v1(a),
            Incoming::V2(a) => self.claim(a),
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        if threads < 2 || anns.len() < 64 {
            return anns.iter().map(one).collect();
        }
        let per = anns.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = anns
                .chunks(per)
                .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
                .collect();
            parts
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// A version 2 announcement as a claim, or why not. Its lists are taken as a record keeps
    /// them: each binding, reference and provider once, at most [`MAX_BINDINGS`] bindings and
    /// [`crate::db::merge_provider`]'s providers (a catch-up entry is not checked at decoding
    /// as gossip is, and repeats would grow the record and every announcement made of it).
    pub fn claim(&self, ann: &PathAnnounce) -> Result<RemoteClaim, Refused> {
        ann.check_lengths().map_err(|_| Refused::TooMany)?;
        let (info, path) = self.narinfo(&ann.narinfo, &ann.blake3, ann.nar_size)?;
        let mut bindings: Vec<String> = Vec::new();
        for b in &ann.bindings {
            if bindings.len() < MAX_BINDINGS
                && !bindings.contains(b)
                && crate::binding::verified(
                    self.trusted,
                    std::slice::from_ref(b),
                    &info.store_path,
                    &info.nar_hash,
                    info.nar_size,
                    &ann.blake3,
                )
            {
                bindings.push(b.clone());
            }
        }
        if bindings.is_empty() {
            return Err(Refused::Unbound(path));
        }
        let refs: HashSet<&str> = info.references.iter().map(|r| r.hash_part()).collect();
        let mut upstream_refs: Vec<String> = Vec::new();
        for h in &ann.upstream_refs {
            if refs.contains(h.as_str()) && !upstream_refs.contains(h) {
                upstream_refs.push(h.clone());
            }
        }
        let mut providers = Vec::new();
        for p in &ann.providers {
            if (self.allowed)(&p.id) && statement_checks(&ann.blake3, p) {
                merge_provider(
                    &mut providers,
                    Provider {
                        id: p.id,
                        holds: p.holds,
                        at_ms: p.at_ms,
                        sig: p.sig.clone(),
                    },
                );
            }
        }
        Ok(RemoteClaim {
            store_path: path,
            claim: Claim {
                narinfo: info.render(),
                blake3: ann.blake3,
                nar_size: ann.nar_size,
                bindings,
                upstream_refs,
                own: false,
                providers,
                failed: false,
                withdrawn: false,
            },
        })
    }

    /// A version 1 announcement as an unbound claim, or why not.
    pub fn claim_v1(&self, ann: &v1::Announce) -> Result<RemoteClaim, Refused> {
        if ann.providers.len() > narmesh_proto::gossip::MAX_LIST {
            return Err(Refused::TooMany);
        }
        let (info, path) = self.narinfo(&ann.narinfo, &ann.blake3, ann.nar_size)?;
        let mut providers = Vec::new();
        for id in ann.providers.iter().filter(|p| (self.allowed)(p)) {
            merge_provider(
                &mut providers,
                Provider {
                    id: *id,
                    holds: true,
                    at_ms: 0,
                    sig: Vec::new(),
                },
            );
        }
        Ok(RemoteClaim {
            store_path: path,
            claim: Claim {
                narinfo: info.render(),
                blake3: ann.blake3,
                nar_size: ann.nar_size,
                bindings: Vec::new(),
                upstream_refs: Vec::new(),
                own: false,
                providers,
                failed: false,
                withdrawn: false,
            },
        })
    }
}

impl<A: Fn(&[u8; 32]) -> bool> Judge<'_, A> {
    /// A stored claim (not made here) checked again after the trust configuration changed:
    /// kept (with only the providers still allowed) if a trusted key other than this node's
    /// own signed its narinfo, and, for a bound claim, its binding.
    pub fn still_trusted(&self, claim: &Claim) -> Option<Claim> {
        let mut info = NarInfo::parse(&claim.narinfo).ok()?;
        // Our own signature was added when we took it in: it proves nothing.
        info.sigs.retain(|s| s.key_name() != self.key.name());
        if !info.is_trusted(self.trusted) {
            return None;
        }
        let bindings: Vec<String> = claim
            .bindings
            .iter()
            .filter(|b| {
                crate::binding::verified(
                    self.trusted,
                    std::slice::from_ref(*b),
                    &info.store_path,
                    &info.nar_hash,
                    info.nar_size,
                    &claim.blake3,
                )
            })
            .cloned()
            .collect();
        if !claim.bindings.is_empty() && bindings.is_empty() {
            return None;
        }
        Some(Claim {
            bindings,
            providers: claim
                .providers
                .iter()
                .filter(|p| (self.allowed)(&p.id))
                .cloned()
                .collect(),
            ..claim.clone()
        })
    }
}

/// A fingerprint of what decides trust (`trusted-public-keys`, the allowed peers): when it
/// changes, stored claims are checked again and catch-up starts over.
pub fn trust_fingerprint(trusted: &TrustedKeys, allowed: &[[u8; 32]]) -> u64 {
    let mut keys: Vec<String> = trusted.keys().iter().map(|k| k.to_string()).collect();
    keys.sort();
    let mut ids = allowed.to_vec();
    ids.sort();
    let mut h = blake3::Hasher::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    for id in ids {
        h.update(&id);
    }
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])).max(1)
}

/// True if a provider statement is signed by its provider.
pub fn statement_checks(blake3: &[u8; 32], p: &ProviderStatement) -> bool {
    let Ok(key) = EndpointKey::from_bytes(&p.id) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(p.sig.as_slice()) else {
        return false;
    };
    let msg = ProviderStatement::signed_bytes(blake3, p.holds, p.at_ms);
    key.verify(&msg, &iroh::Signature::from_bytes(&sig)).is_ok()
}

/// This node's own statement about a NAR, signed now.
pub fn statement(me: &EndpointSecret, blake3: &[u8; 32], holds: bool, at_ms: u64) -> Provider {
    let msg = ProviderStatement::signed_bytes(blake3, holds, at_ms);
    Provider {
        id: *me.public().as_bytes(),
        holds,
        at_ms,
        sig: me.sign(&msg).to_bytes().to_vec(),
    }
}

/// What this node says about a record: the claim `c` it speaks of (the one it serves,
/// `PathRecord::served`), with this node's fresh statement (holds it, or no longer does if it
/// had said it did), and its own binding when it holds the NAR (it computed or checked the
/// BLAKE3 against the signed NarHash itself).
pub fn announce_of(
    c: &Claim,
    me: &EndpointSecret,
    node_key: &SecretKey,
    holds: bool,
    now_ms: u64,
) -> PathAnnounce {
    let my_id = *me.public().as_bytes();
    let mut providers: Vec<ProviderStatement> = c
        .providers
        .iter()
        .filter(|p| p.id != my_id && !p.sig.is_empty())
        .map(|p| ProviderStatement {
            id: p.id,
            holds: p.holds,
            at_ms: p.at_ms,
            sig: p.sig.clone(),
        })
        .collect();
    if holds || c.withdrawn {
        let s = statement(me, &c.blake3, holds, now_ms);
        providers.insert(
            0,
            ProviderStatement {
                id: s.id,
                holds: s.holds,
                at_ms: s.at_ms,
                sig: s.sig,
            },
        );
    }
    providers.truncate(narmesh_proto::gossip::MAX_LIST);
    let mut bindings = c.bindings.clone();
    if holds
        && !crate::binding::has_binding_by(&bindings, node_key)
        && let Ok(info) = NarInfo::parse(&c.narinfo)
    {
        bindings.push(crate::binding::sign(
            node_key,
            &info.store_path,
            &info.nar_hash,
            info.nar_size,
            &c.blake3,
        ));
    }
    bindings.truncate(narmesh_proto::gossip::MAX_LIST);
    PathAnnounce {
        narinfo: c.narinfo.clone(),
        blake3: c.blake3,
        nar_size: c.nar_size,
        bindings,
        upstream_refs: c.upstream_refs.clone(),
        providers,
    }
}

/// The version 1 announcement of a record's claim `c` (the one served), for version 1 peers,
/// naming this node as provider if it holds the NAR.
pub fn announce_v1_of(c: &Claim, me: [u8; 32], holds: bool) -> v1::Announce {
    let mut providers: Vec<[u8; 32]> = c
        .providers
        .iter()
        .filter(|p| p.holds && p.id != me)
        .map(|p| p.id)
        .collect();
    if holds {
        providers.insert(0, me);
    }
    providers.truncate(narmesh_proto::gossip::MAX_LIST);
    v1::Announce {
        version: 1,
        narinfo: c.narinfo.clone(),
        blake3: c.blake3,
        nar_size: c.nar_size,
        providers,
    }
}

#[cfg(test)]
mod tests;
