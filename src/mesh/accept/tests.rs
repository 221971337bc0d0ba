//! The trust decisions, one by one: what is taken in, what is refused and why, and what this
//! node says about what it holds.

use std::collections::BTreeSet;

use super::*;
use crate::db::PathRecord;
use crate::nix::{Sha256, StorePath};

const PATH: &str = "/nix/store/h06bh0s5rcfi480fiz4q44bzrg5l95jg-hello";
const REF: &str = "/nix/store/0c0bh0s5rcfi480fiz4q44bzrg5l95jg-dep";

struct World {
    origin: SecretKey,
    node: SecretKey,
    trusted: TrustedKeys,
    peer: EndpointSecret,
    stranger: EndpointSecret,
}

fn world() -> World {
    let origin = SecretKey::generate("origin-1").unwrap();
    let node = SecretKey::generate("node-1").unwrap();
    World {
        trusted: TrustedKeys::new([origin.public()]),
        origin,
        node,
        peer: EndpointSecret::from_bytes(&[7; 32]),
        stranger: EndpointSecret::from_bytes(&[8; 32]),
    }
}

fn narinfo(key: &SecretKey, size: u64) -> String {
    let mut info = NarInfo {
        store_path: StorePath::parse(PATH).unwrap(),
        url: "nar/x.nar".into(),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        nar_hash: Sha256([5; 32]),
        nar_size: size,
        references: BTreeSet::from([StorePath::parse(REF).unwrap()]),
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    info.sign(key);
    info.render()
}

fn announce(w: &World, blake3: [u8; 32], bound_to: [u8; 32]) -> PathAnnounce {
    let p = StorePath::parse(PATH).unwrap();
    PathAnnounce {
        narinfo: narinfo(&w.origin, 100),
        blake3,
        nar_size: 100,
        bindings: vec![crate::binding::sign(
            &w.origin,
            &p,
            &Sha256([5; 32]),
            100,
            &bound_to,
        )],
        upstream_refs: vec!["0c0bh0s5rcfi480fiz4q44bzrg5l95jg".into(), "notaref".into()],
        providers: vec![],
    }
}

fn judge<'a>(w: &'a World, allowed: &'a [[u8; 32]]) -> Judge<'a, impl Fn(&[u8; 32]) -> bool + 'a> {
    Judge {
        trusted: &w.trusted,
        key: &w.node,
        allowed: move |id: &[u8; 32]| allowed.contains(id),
        max_nar_size: 1 << 20,
    }
}

#[test]
fn a_trusted_bound_claim_is_taken_in_with_our_url_and_signature() {
    let w = world();
    let mut ann = announce(&w, [1; 32], [1; 32]);
    let peer_id = *w.peer.public().as_bytes();
    ann.providers = vec![
        proto_statement(statement(&w.peer, &[1; 32], true, 10)),
        // Signed by someone else than the provider it names: dropped.
        ProviderStatement {
            sig: statement(&w.stranger, &[1; 32], true, 10).sig,
            ..proto_statement(statement(&w.peer, &[1; 32], true, 11))
        },
        // Not an allowed peer: dropped.
        proto_statement(statement(&w.stranger, &[1; 32], true, 10)),
    ];
    let c = judge(&w, &[peer_id]).claim(&ann).unwrap();
    assert_eq!(c.store_path, PATH);
    assert_eq!(c.claim.providers.len(), 1);
    assert_eq!(c.claim.providers[0].id, peer_id);
    assert_eq!(
        c.claim.upstream_refs,
        vec!["0c0bh0s5rcfi480fiz4q44bzrg5l95jg"]
    );
    let info = NarInfo::parse(&c.claim.narinfo).unwrap();
    assert_eq!(info.url, nar_url(&[1; 32]));
    assert_eq!(info.sigs.len(), 2, "the origin's signature and ours");
    assert!(!c.claim.own);
}

#[test]
fn a_replayed_narinfo_with_another_blake3_is_refused() {
    let w = world();
    // The narinfo is trusted, but the binding is for other bytes than the BLAKE3 announced.
    let ann = announce(&w, [9; 32], [1; 32]);
    assert_eq!(
        judge(&w, &[]).claim(&ann).unwrap_err(),
        Refused::Unbound(PATH.into())
    );
    // A binding by a key that is not trusted binds nothing.
    let mut ann = announce(&w, [9; 32], [9; 32]);
    let p = StorePath::parse(PATH).unwrap();
    ann.bindings = vec![crate::binding::sign(
        &w.node,
        &p,
        &Sha256([5; 32]),
        100,
        &[9; 32],
    )];
    assert_eq!(
        judge(&w, &[]).claim(&ann).unwrap_err().reason(),
        "unbound-blake3"
    );
    // No binding at all.
    ann.bindings.clear();
    assert!(matches!(
        judge(&w, &[]).claim(&ann),
        Err(Refused::Unbound(_))
    ));
}

#[test]
fn untrusted_wrong_size_and_oversized_claims_are_refused() {
    let w = world();
    let mut ann = announce(&w, [1; 32], [1; 32]);
    ann.narinfo = narinfo(&w.node, 100);
    assert_eq!(
        judge(&w, &[]).claim(&ann).unwrap_err().reason(),
        "untrusted-signature"
    );
    let mut ann = announce(&w, [1; 32], [1; 32]);
    ann.nar_size = 101;
    assert_eq!(
        judge(&w, &[]).claim(&ann).unwrap_err().reason(),
        "size-mismatch"
    );
    let mut big = announce(&w, [1; 32], [1; 32]);
    big.narinfo = narinfo(&w.origin, 2 << 20);
    big.nar_size = 2 << 20;
    assert_eq!(
        judge(&w, &[]).claim(&big).unwrap_err().reason(),
        "too-large"
    );
    let mut junk = announce(&w, [1; 32], [1; 32]);
    junk.narinfo = "StorePath: nonsense".into();
    assert_eq!(
        judge(&w, &[]).claim(&junk).unwrap_err().reason(),
        "bad-narinfo"
    );
}

#[test]
fn a_version_1_claim_is_taken_in_unbound_with_hints() {
    let w = world();
    let ann = v1::Announce {
        version: 1,
        narinfo: narinfo(&w.origin, 100),
        blake3: [1; 32],
        nar_size: 100,
        providers: vec![[7; 32], [8; 32]],
    };
    let c = judge(&w, &[[7; 32]]).claim_v1(&ann).unwrap();
    assert!(c.claim.bindings.is_empty());
    assert_eq!(c.claim.providers.len(), 1);
    assert_eq!(
        (c.claim.providers[0].at_ms, c.claim.providers[0].sig.len()),
        (0, 0)
    );
}

#[test]
fn what_we_say_follows_what_we_hold_and_peers_believe_it() {
    let w = world();
    let me = EndpointSecret::from_bytes(&[3; 32]);
    let my_id = *me.public().as_bytes();
    let c = judge(&w, &[])
        .claim(&announce(&w, [1; 32], [1; 32]))
        .unwrap();
    let mut rec = PathRecord {
        store_path: c.store_path.clone(),
        claims: vec![c.claim],
        recorded_at: 0,
    };
    // Not held, never said: no statement of ours.
    let a = announce_of(&rec.claims[0], &me, &w.node, false, 5);
    assert!(a.providers.iter().all(|p| p.id != my_id));
    // Held: a statement that we hold it, and our binding beside the origin's.
    let a = announce_of(&rec.claims[0], &me, &w.node, true, 6);
    assert_eq!((a.providers[0].id, a.providers[0].holds), (my_id, true));
    assert_eq!(a.bindings.len(), 2);
    // A peer that trusts our key (and allows us) takes our word for it.
    let peer_trust = TrustedKeys::new([w.origin.public(), w.node.public()]);
    let peer = Judge {
        trusted: &peer_trust,
        key: &w.origin,
        allowed: |id: &[u8; 32]| *id == my_id,
        max_nar_size: 1 << 20,
    };
    let got = peer.claim(&a).unwrap();
    assert_eq!(got.claim.providers.len(), 1);
    assert_eq!(got.claim.bindings.len(), 2);
    // Once we held it and lost it, we say so.
    rec.claims[0].withdrawn = true;
    let a = announce_of(&rec.claims[0], &me, &w.node, false, 7);
    assert_eq!((a.providers[0].id, a.providers[0].holds), (my_id, false));
    let v1 = announce_v1_of(&rec.claims[0], my_id, false);
    assert!(v1.providers.is_empty());
}

fn proto_statement(p: Provider) -> ProviderStatement {
    ProviderStatement {
        id: p.id,
        holds: p.holds,
        at_ms: p.at_ms,
        sig: p.sig,
    }
}

#[test]
fn a_large_batch_is_judged_on_several_threads_in_order() {
    let w = world();
    let anns: Vec<Incoming> = (0..200u8)
        .map(|i| {
            // Every third is bound to other bytes (refused), the rest are taken in.
            let bound_to = if i % 3 == 0 { [0xee; 32] } else { [i; 32] };
            Incoming::V2(announce(&w, [i; 32], bound_to))
        })
        .collect();
    let j = judge(&w, &[]);
    let all = j.judge_all(&anns);
    assert_eq!(all.len(), anns.len());
    for (i, r) in all.iter().enumerate() {
        match r {
            Ok(c) => {
                assert!(i % 3 != 0, "entry {i} should be refused");
                assert_eq!(c.claim.blake3, [i as u8; 32], "entry {i} out of order");
            }
            Err(e) => {
                assert_eq!(i % 3, 0, "entry {i} refused: {e}");
                assert_eq!(e.reason(), "unbound-blake3");
            }
        }
    }
}

/// A host taken out of the cluster (no longer an allowed peer): when trust is checked again,
/// its statements leave the claims it was in, so it no longer counts as a holder.
#[test]
fn a_peer_no_longer_allowed_stops_counting_as_a_holder() {
    let w = world();
    let mut ann = announce(&w, [1; 32], [1; 32]);
    let (peer_id, stranger_id) = (*w.peer.public().as_bytes(), *w.stranger.public().as_bytes());
    ann.providers = vec![
        proto_statement(statement(&w.peer, &[1; 32], true, 10)),
        proto_statement(statement(&w.stranger, &[1; 32], true, 10)),
    ];
    let both = [peer_id, stranger_id];
    let c = judge(&w, &both).claim(&ann).unwrap().claim;
    assert_eq!(c.providers.len(), 2);
    let kept = judge(&w, &[stranger_id]).still_trusted(&c).unwrap();
    assert_eq!(kept.providers.len(), 1);
    assert_eq!(kept.providers[0].id, stranger_id);
}

/// A catch-up entry is not checked at decoding as gossip is: its lists are checked here. One
/// that repeats a binding, a reference and a provider statement thousands of times (it would
/// grow the record, and every announcement made of it past the frame limit) is taken with
/// each once; one longer than any node sends is refused.
#[test]
fn repeats_in_an_announcement_are_taken_once_and_overlong_lists_refused() {
    let w = world();
    let peer_id = *w.peer.public().as_bytes();
    let mut ann = announce(&w, [1; 32], [1; 32]);
    let said = proto_statement(statement(&w.peer, &[1; 32], true, 10));
    ann.bindings = vec![ann.bindings[0].clone(); 64];
    ann.upstream_refs = vec!["0c0bh0s5rcfi480fiz4q44bzrg5l95jg".into(); 1024];
    ann.providers = vec![said.clone(); 64];
    let c = judge(&w, &[peer_id]).claim(&ann).unwrap();
    assert_eq!(c.claim.bindings.len(), 1);
    assert_eq!(c.claim.upstream_refs.len(), 1);
    assert_eq!(c.claim.providers.len(), 1);
    ann.upstream_refs = vec!["0c0bh0s5rcfi480fiz4q44bzrg5l95jg".into(); 30_000];
    let refused = judge(&w, &[peer_id]).claim(&ann).unwrap_err();
    assert_eq!(refused.reason(), "too-many-entries");
}

/// A version 1 entry names each allowed provider once, however often it repeats it, and one
/// listing more than any node sends is refused.
#[test]
fn a_version_1_entry_names_each_provider_once() {
    let w = world();
    let peer_id = *w.peer.public().as_bytes();
    let mut ann = v1::Announce {
        version: 1,
        narinfo: narinfo(&w.origin, 100),
        blake3: [1; 32],
        nar_size: 100,
        providers: vec![peer_id; 64],
    };
    let c = judge(&w, &[peer_id]).claim_v1(&ann).unwrap();
    assert_eq!(c.claim.providers.len(), 1);
    ann.providers = vec![peer_id; 65];
    let refused = judge(&w, &[peer_id]).claim_v1(&ann).unwrap_err();
    assert_eq!(refused.reason(), "too-many-entries");
}

/// Every reason a refusal is counted under has its series from the start (and a debug build
/// would panic counting one that has not, dropping the whole batch with it).
#[test]
fn every_refusal_reason_is_a_metric_series_from_the_start() {
    let all = [
        Refused::NarInfo(String::new()),
        Refused::Size(String::new(), 1, 2),
        Refused::Untrusted(String::new()),
        Refused::Unbound(String::new()),
        Refused::TooLarge(String::new(), 1),
        Refused::TooMany,
    ];
    for r in all {
        // A variant added without a line here fails to compile.
        match r {
            Refused::NarInfo(_)
            | Refused::Size(..)
            | Refused::Untrusted(_)
            | Refused::Unbound(_)
            | Refused::TooLarge(..)
            | Refused::TooMany => {}
        }
        assert!(
            crate::metrics::REFUSALS.contains(&r.reason()),
            "{} is not in metrics::REFUSALS",
            r.reason()
        );
    }
}

/// `ae93e66`'s catch-up batch and gossip (`tests/fixtures/v2`, from a real run): every entry
/// is taken in, bound, with its origin (`n0`) as the holder, by a node that trusts `n0`'s key
/// and allows its endpoint; with the key not trusted, none is.
#[test]
fn the_golden_v2_messages_are_taken_in() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    let batch: narmesh_proto::sync::SyncBatchV2 =
        postcard::from_bytes(&read("sync-batch.postcard")).unwrap();
    let mut anns: Vec<Incoming> = batch.entries.into_iter().map(Incoming::V2).collect();
    anns.push(narmesh_proto::gossip::decode(&read("announce.postcard")).unwrap());
    // `n0`'s Nix key and endpoint key in the fixture.
    let n0: crate::nix::PublicKey = "n0-1:0UXMomBBsQAVWiWwzfl1eLZNcbTFNEpo+37fwXUzHDI="
        .parse()
        .unwrap();
    let endpoint: [u8; 32] = (0..32)
        .map(|i| {
            let h = "a911b9ee9569bbeb10d7bf2a01f9a07bdb8f59abfd21892f7c72cd595ba58c15";
            u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect::<Vec<u8>>()
        .try_into()
        .unwrap();
    let n0_id = *EndpointSecret::from_bytes(&endpoint).public().as_bytes();
    let node = SecretKey::generate("node-1").unwrap();
    let trusted = TrustedKeys::new([n0]);
    let judge = Judge {
        trusted: &trusted,
        key: &node,
        allowed: |id: &[u8; 32]| *id == n0_id,
        max_nar_size: 1 << 30,
    };
    let claims: Vec<RemoteClaim> = judge
        .judge_all(&anns)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(claims.len(), 5);
    for c in &claims {
        assert!(c.store_path.starts_with("/nix/store/"), "{}", c.store_path);
        assert_eq!(c.claim.bindings.len(), 1, "bound: {:?}", c.claim);
        let holders: Vec<_> = c.claim.providers.iter().map(|p| p.id).collect();
        assert_eq!(holders, vec![n0_id], "{:?}", c.claim);
    }
    let untrusted = TrustedKeys::new([node.public()]);
    let judge = Judge {
        trusted: &untrusted,
        ..judge
    };
    assert!(judge.judge_all(&anns).iter().all(|r| r.is_err()));
}
