//! The records the node keeps in redb, serialized with postcard. Field order is the format: add
//! fields only at the end, and give the table a new name (with a migration) for anything else.
//!
//! A path's record holds one or more *claims* about its NAR (each a signed narinfo, the NAR's
//! BLAKE3 with the signatures binding it to the narinfo, and who holds those bytes), best
//! first: the one served is the first not failed whose NAR can be had ([`PathRecord::served`]).
//! Two honest builds of the same path may differ, and a claim whose bytes fail the signed
//! NarHash gives way to the next. Whether this node holds a NAR is the storage's to say, never
//! a record's.

use serde::{Deserialize, Serialize};

/// A report waiting in the durable queue: a build's derivation and/or output paths, already
/// validated as store paths (full paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    pub drv: Option<String>,
    pub outs: Vec<String>,
}

/// A recorded store path (table `paths_v3`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRecord {
    /// Full store path.
    pub store_path: String,
    /// Claims about its NAR, best first.
    pub claims: Vec<Claim>,
    /// Seconds since the epoch when this node first recorded the path.
    pub recorded_at: u64,
}

/// Most claims kept per path (failed ones included, so they are not taken in again).
pub const MAX_CLAIMS: usize = 4;
/// Binding signatures a claim keeps, at most (one per node that computed its BLAKE3).
pub const MAX_BINDINGS: usize = 8;
/// Most provider statements kept per claim.
pub const MAX_PROVIDERS: usize = 32;

/// One claim about a path's NAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The narinfo as served here: the origin's Nix signatures plus this node's, `URL:
    /// nar/<blake3>.nar`, `Compression: none`.
    pub narinfo: String,
    /// BLAKE3 of the NAR.
    pub blake3: [u8; 32],
    pub nar_size: u64,
    /// Signatures binding the BLAKE3 to the narinfo (`name:base64`); empty for a claim learnt
    /// from a version 1 peer, which could not bind it.
    pub bindings: Vec<String>,
    /// Hash parts of references signed upstream, so not recorded (nobody waits for them).
    pub upstream_refs: Vec<String>,
    /// Made here, from the local Nix store.
    pub own: bool,
    /// Who holds these bytes, as they stated it (latest statement per provider).
    pub providers: Vec<Provider>,
    /// The bytes failed the signed NarHash: never served nor fetched again.
    pub failed: bool,
    /// This node held these bytes and no longer does (lost from its store, or evicted): what
    /// it says of them says so, until it holds them again.
    pub withdrawn: bool,
}

/// A provider's statement about one NAR (see `narmesh_proto::gossip::ProviderStatement`). A
/// version 1 peer's provider list becomes statements with `at_ms` 0 and no signature: hints
/// that any signed statement overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    pub id: [u8; 32],
    pub holds: bool,
    pub at_ms: u64,
    pub sig: Vec<u8>,
}

impl Claim {
    /// A peer says it holds these bytes (its latest word). `me`'s statements, repeated by
    /// peers, do not count: what this node holds its storage says.
    pub fn held_by_peer(&self, me: Option<&[u8; 32]>) -> bool {
        self.providers.iter().any(|p| p.holds && Some(&p.id) != me)
    }
}

impl PathRecord {
    /// The hash part of the store path: the record's key.
    pub fn hash_part(&self) -> &str {
        hash_part_of(&self.store_path)
    }

    /// The first claim that has not failed: the best, whether or not anyone holds its NAR.
    pub fn active(&self) -> Option<&Claim> {
        self.claims.iter().find(|c| !c.failed)
    }

    /// The first claim, not failed, whose NAR is held here (`here`), else the first a peer
    /// holds (`elsewhere`); `None` if no claim's NAR can be had.
    pub fn obtainable(
        &self,
        mut here: impl FnMut(&Claim) -> bool,
        mut elsewhere: impl FnMut(&Claim) -> bool,
    ) -> Option<&Claim> {
        let live = || self.claims.iter().filter(|c| !c.failed);
        live()
            .find(|c| here(c))
            .or_else(|| live().find(|c| elsewhere(c)))
    }

    /// The claim this node serves, wishes for, mirrors and speaks of: the first whose NAR can
    /// be had ([`Self::obtainable`]: held here by `here`'s word, else by a peer's own latest
    /// word, `me`'s repeated by peers not counting), else the first not failed, which waits
    /// for a holder. A path built again with other bytes after every node lost the first
    /// build's NAR is served, fetched and mirrored as the second build, and a node holding one
    /// build speaks of that one.
    pub fn served(
        &self,
        me: Option<&[u8; 32]>,
        here: impl FnMut(&Claim) -> bool,
    ) -> Option<&Claim> {
        self.obtainable(here, |c| c.held_by_peer(me))
            .or_else(|| self.active())
    }

    /// The BLAKE3 of every claim.
    pub fn blake3s(&self) -> Vec<[u8; 32]> {
        self.claims.iter().map(|c| c.blake3).collect()
    }

    /// The claim this node made from its own store, if any.
    pub fn own(&self) -> Option<&Claim> {
        self.claims.iter().find(|c| c.own && !c.failed)
    }

    /// The claim about the NAR with this BLAKE3, if any.
    pub fn claim(&self, blake3: &[u8; 32]) -> Option<&Claim> {
        self.claims.iter().find(|c| &c.blake3 == blake3)
    }

    pub fn claim_mut(&mut self, blake3: &[u8; 32]) -> Option<&mut Claim> {
        self.claims.iter_mut().find(|c| &c.blake3 == blake3)
    }

    /// Take in `new`: a claim about bytes not claimed yet is added (own claims first, then
    /// bound ones, then unbound, failed last; at most [`MAX_CLAIMS`]); for bytes claimed
    /// already, the provider statements are merged and bindings added. Returns true if
    /// anything changed.
    pub fn merge(&mut self, new: Claim) -> bool {
        if let Some(old) = self.claim_mut(&new.blake3) {
            let mut changed = false;
            for p in new.providers {
                changed |= merge_provider(&mut old.providers, p);
            }
            for b in new.bindings {
                if !old.bindings.contains(&b) && old.bindings.len() < MAX_BINDINGS {
                    old.bindings.push(b);
                    changed = true;
                }
            }
            if new.own && !old.own {
                // Our own build of the same bytes: it is served from the local store now.
                old.own = true;
                old.withdrawn = false;
                old.narinfo = new.narinfo;
                old.upstream_refs = new.upstream_refs;
                old.failed = false;
                changed = true;
            }
            if changed {
                self.sort_claims();
            }
            return changed;
        }
        if new.own {
            // A build of our own replaces any earlier own claim of other bytes.
            self.claims.retain(|c| !c.own);
        }
        self.claims.push(new);
        self.sort_claims();
        if self.claims.len() > MAX_CLAIMS {
            self.claims.truncate(MAX_CLAIMS);
        }
        true
    }

    fn sort_claims(&mut self) {
        // Stable: among equals, the earlier claim stays first.
        self.claims
            .sort_by_key(|c| (c.failed, !c.own, c.bindings.is_empty()));
    }
}

/// Keep the latest statement of each provider; true if `p` is news: the provider now says the
/// opposite, is new, or signs what it had only hinted. A provider restates what it holds with a
/// fresh time whenever it announces a record; taking that as news would move the record to
/// the end of the log, where the provider reads it back and restates it again: two nodes that
/// hold the same paths would trade them for ever.
pub fn merge_provider(list: &mut Vec<Provider>, p: Provider) -> bool {
    if let Some(old) = list.iter_mut().find(|o| o.id == p.id) {
        let news = is_news(old, p.holds, p.at_ms, !p.sig.is_empty());
        // A later restatement of the same thing refreshes the time, but an unsigned hint never
        // takes the place of a signed statement (that would lose the signature, and make the
        // signed restatement that follows look like news).
        let refresh = p.at_ms > old.at_ms && (!p.sig.is_empty() || old.sig.is_empty());
        if news || refresh {
            *old = p;
        }
        return news;
    }
    if list.len() >= MAX_PROVIDERS {
        // Only a statement newer than the oldest kept is taken (an older one may be the stale
        // echo of a statement dropped before). Room is made by dropping the oldest withdrawal,
        // else the oldest statement of holding: a list full of withdrawals must not push out
        // the one provider that still holds the NAR (the record would look dead, and be
        // forgotten); a withdrawal does not take a holder's room.
        let oldest = list.iter().map(|o| o.at_ms).min().unwrap_or(0);
        let rank = |o: &Provider| (o.holds, o.at_ms);
        if let Some((i, first)) = list.iter().enumerate().min_by_key(|(_, o)| rank(o)) {
            if oldest >= p.at_ms || rank(first) >= rank(&p) {
                return false;
            }
            list.remove(i);
        }
    }
    list.push(p);
    true
}

/// Whether a statement (`holds`, made at `at_ms`, signed or a hint) is news against the one
/// kept of the same provider: it says the opposite later, or signs what was only hinted.
fn is_news(old: &Provider, holds: bool, at_ms: u64, signed: bool) -> bool {
    let signs = at_ms >= old.at_ms && old.sig.is_empty() && signed;
    signs || (at_ms > old.at_ms && holds != old.holds)
}

/// One provider statement as [`PathRecord::could_change`] weighs it: id, holds, time, signed.
pub type StatementView = ([u8; 32], bool, u64, bool);

impl PathRecord {
    /// Whether taking a claim on the bytes `blake3` of `nar_size` with these bindings and
    /// provider statements could change this record. False when a claim on those bytes, of that
    /// size, already knows every binding (or is full) and no statement is news: then the claim
    /// is known, whatever its signatures say, and the checks can be skipped (a size that
    /// differs goes to the checks, to be refused and counted). Every peer restates the paths it learnt in its own
    /// catch-up log, so most catch-up entries are known: this makes each cost a lookup instead
    /// of three signature checks. Anything that might change the record is checked as before.
    pub fn could_change(
        &self,
        blake3: &[u8; 32],
        nar_size: u64,
        bindings: &[String],
        providers: impl IntoIterator<Item = StatementView>,
    ) -> bool {
        let Some(c) = self.claim(blake3) else {
            return true;
        };
        if c.nar_size != nar_size {
            return true;
        }
        if c.bindings.len() < MAX_BINDINGS && bindings.iter().any(|b| !c.bindings.contains(b)) {
            return true;
        }
        providers.into_iter().any(|(id, holds, at_ms, signed)| {
            match c.providers.iter().find(|o| o.id == id) {
                Some(old) => is_news(old, holds, at_ms, signed),
                None => true,
            }
        })
    }
}

/// The hash part of a full store path (or of whatever the string is, cut to 32 characters).
pub fn hash_part_of(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    base.get(..crate::nix::store_path::HASH_LEN).unwrap_or(base)
}

/// The record as `e5a6e05` kept it (table `paths_v2`), read once to migrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRecordV2 {
    pub store_path: String,
    pub narinfo: String,
    pub blake3: [u8; 32],
    pub nar_size: u64,
    pub recorded_at: u64,
    /// True once the NAR was in that node's blob store.
    pub local: bool,
    pub providers: Vec<[u8; 32]>,
}

/// Counters kept with the data, so they survive restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub queue_depth: u64,
    pub paths: u64,
    pub failures: u64,
    /// Records forgotten because nobody held their paths any more.
    pub forgotten: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(b: u8, own: bool, bound: bool) -> Claim {
        Claim {
            narinfo: format!("n{b}"),
            blake3: [b; 32],
            nar_size: 1,
            bindings: if bound { vec!["k:s".into()] } else { vec![] },
            upstream_refs: vec![],
            own,
            providers: vec![],
            failed: false,
            withdrawn: false,
        }
    }

    fn prov(id: u8, holds: bool, at: u64) -> Provider {
        Provider {
            id: [id; 32],
            holds,
            at_ms: at,
            sig: vec![1],
        }
    }

    /// The claim served is the first whose NAR can be had: held here first, then by a peer
    /// by its own word (not `me`'s word repeated), never a failed one; with none, the first
    /// not failed, which waits.
    #[test]
    fn the_claim_served_is_the_first_whose_nar_can_be_had() {
        let mut r = PathRecord {
            store_path: "/nix/store/x".into(),
            claims: vec![
                claim(1, false, true),
                claim(2, false, true),
                claim(3, false, true),
            ],
            recorded_at: 0,
        };
        let me = [9u8; 32];
        let served = |r: &PathRecord, here: u8| {
            r.served(Some(&me), |c| c.blake3 == [here; 32])
                .unwrap()
                .blake3[0]
        };
        assert_eq!(served(&r, 0), 1, "nobody holds any: the first, waiting");
        r.claims[1].providers.push(prov(9, true, 1));
        assert_eq!(served(&r, 0), 1, "me's own word repeated does not count");
        r.claims[2].providers.push(prov(5, true, 1));
        assert_eq!(served(&r, 0), 3, "the one a peer holds");
        r.claims[1].providers.push(prov(6, true, 1));
        assert_eq!(served(&r, 0), 2, "the first a peer holds");
        assert_eq!(served(&r, 3), 3, "one held here before one a peer holds");
        r.claims[2].failed = true;
        assert_eq!(served(&r, 3), 2, "never a failed one");
        assert!(r.obtainable(|_| false, |_| false).is_none());
        r.claims[1].providers[1].holds = false;
        assert_eq!(served(&r, 0), 1);
    }

    #[test]
    fn own_then_bound_then_unbound_and_failed_last() {
        let mut r = PathRecord {
            store_path: "/nix/store/x".into(),
            claims: vec![],
            recorded_at: 0,
        };
        assert!(r.merge(claim(1, false, false)));
        assert!(r.merge(claim(2, false, true)));
        assert_eq!(r.active().unwrap().blake3, [2; 32]);
        assert!(r.merge(claim(3, true, true)));
        assert_eq!(r.active().unwrap().blake3, [3; 32]);
        r.claims[0].failed = true;
        r.sort_claims();
        assert_eq!(r.active().unwrap().blake3, [2; 32]);
        assert!(!r.merge(claim(2, false, true)), "nothing new");
        for b in 4..10 {
            r.merge(claim(b, false, false));
        }
        assert!(r.claims.len() <= MAX_CLAIMS);
    }

    #[test]
    fn the_latest_statement_of_each_provider_wins_in_any_order() {
        let a = [
            prov(1, true, 5),
            prov(1, false, 9),
            prov(2, true, 1),
            prov(1, true, 7),
        ];
        let mut x = Vec::new();
        for p in a.iter().cloned() {
            merge_provider(&mut x, p);
        }
        let mut y = Vec::new();
        for p in a.iter().rev().cloned() {
            merge_provider(&mut y, p);
        }
        x.sort_by_key(|p| p.id);
        y.sort_by_key(|p| p.id);
        assert_eq!(x, y);
        assert!(!x[0].holds, "the withdrawal at 9 is the latest");
    }

    #[test]
    fn a_full_list_drops_withdrawals_before_the_providers_that_hold() {
        let mut x = vec![prov(1, true, 1)];
        for id in 2..=MAX_PROVIDERS as u8 {
            x.push(prov(id, false, 100 + u64::from(id)));
        }
        assert!(merge_provider(&mut x, prov(200, false, 500)));
        assert!(
            x.iter().any(|p| p.id[0] == 1 && p.holds),
            "the holder stays"
        );
        assert!(
            !x.iter().any(|p| p.id[0] == 2),
            "the oldest withdrawal went"
        );
        assert!(
            !merge_provider(&mut x, prov(201, true, 0)),
            "older than every statement kept"
        );
        assert!(
            merge_provider(&mut x, prov(201, true, 2)),
            "a holder takes a withdrawal's room"
        );
        assert_eq!(x.len(), MAX_PROVIDERS);
        let mut holders: Vec<Provider> = (1..=MAX_PROVIDERS as u8)
            .map(|i| prov(i, true, 10))
            .collect();
        assert!(
            !merge_provider(&mut holders, prov(202, false, 900)),
            "no room for a withdrawal"
        );
        assert!(holders.iter().all(|p| p.holds));
    }

    #[test]
    fn a_restatement_is_not_news() {
        let mut x = vec![prov(1, true, 5)];
        assert!(
            !merge_provider(&mut x, prov(1, true, 9)),
            "same, only later"
        );
        assert!(!merge_provider(&mut x, prov(1, false, 7)), "older");
        assert!(merge_provider(&mut x, prov(1, false, 10)), "withdrawn");
        assert!(merge_provider(&mut x, prov(1, true, 11)), "held again");
        assert!(merge_provider(&mut x, prov(2, true, 1)), "a new provider");
        let mut hint = vec![Provider {
            sig: vec![],
            ..prov(3, true, 0)
        }];
        assert!(
            merge_provider(&mut hint, prov(3, true, 4)),
            "signed at last"
        );
    }

    fn views(c: &Claim) -> Vec<StatementView> {
        c.providers
            .iter()
            .map(|p| (p.id, p.holds, p.at_ms, !p.sig.is_empty()))
            .collect()
    }

    #[test]
    fn a_known_claim_could_not_change_the_record() {
        let mut r = PathRecord {
            store_path: "/nix/store/x".into(),
            claims: vec![],
            recorded_at: 0,
        };
        let mut c = claim(1, false, true);
        c.providers = vec![prov(1, true, 5)];
        assert!(
            r.could_change(&c.blake3, c.nar_size, &c.bindings, views(&c)),
            "new"
        );
        r.merge(c.clone());
        assert!(
            !r.could_change(&c.blake3, c.nar_size, &c.bindings, views(&c)),
            "the same"
        );
        let later = vec![(c.providers[0].id, true, 9, true)];
        assert!(
            !r.could_change(&c.blake3, c.nar_size, &c.bindings, later),
            "restated"
        );
        let withdrawn = vec![(c.providers[0].id, false, 9, true)];
        assert!(r.could_change(&c.blake3, c.nar_size, &c.bindings, withdrawn));
        assert!(
            r.could_change(&c.blake3, c.nar_size, &["k2:t".into()], views(&c)),
            "new binding"
        );
        assert!(r.could_change(
            &c.blake3,
            c.nar_size,
            &c.bindings,
            vec![([2; 32], true, 1, true)]
        ));
        assert!(
            r.could_change(&c.blake3, 7, &c.bindings, views(&c)),
            "another size"
        );
        assert!(
            r.could_change(&[9; 32], c.nar_size, &c.bindings, views(&c)),
            "other bytes"
        );
    }

    proptest::proptest! {
        /// Whatever the record and the incoming claim, a claim said not to change the record
        /// does not change it when merged.
        #[test]
        fn could_change_never_misses_a_change(
            kept in proptest::collection::vec((0u8..3, proptest::bool::ANY, 0u64..6, proptest::bool::ANY), 0..6),
            came in proptest::collection::vec((0u8..4, proptest::bool::ANY, 0u64..8, proptest::bool::ANY), 0..6),
            kept_bound in proptest::bool::ANY,
            came_bound in proptest::bool::ANY,
            same_bytes in proptest::bool::ANY,
        ) {
            let mut r = PathRecord { store_path: "/nix/store/x".into(), claims: vec![], recorded_at: 0 };
            let mut k = claim(1, false, kept_bound);
            for (id, holds, at, signed) in kept {
                merge_provider(&mut k.providers, Provider { id: [id; 32], holds, at_ms: at, sig: if signed { vec![1] } else { vec![] } });
            }
            r.merge(k);
            let mut c = claim(if same_bytes { 1 } else { 2 }, false, came_bound);
            c.bindings = if came_bound { vec!["k2:s".into()] } else { vec![] };
            c.providers = came.iter().map(|&(id, holds, at, signed)| Provider { id: [id; 32], holds, at_ms: at, sig: if signed { vec![1] } else { vec![] } }).collect();
            let could = r.could_change(&c.blake3, c.nar_size, &c.bindings, views(&c));
            let mut merged = r.clone();
            let changed = merged.merge(c);
            proptest::prop_assert!(could || !changed, "said unchanged, but merge changed it");
        }
    }
}
