//! The database's own tests: durability of the queue and records across reopening, the log's
//! order, storage bookkeeping, and the migration of an `e5a6e05` data dir (golden fixture).

use super::*;

/// An own record of path `h` whose NAR is `b` repeated, `size` bytes.
pub(crate) fn own(h: &str, b: u8, size: u64) -> OwnRecord {
    OwnRecord {
        store_path: format!("/nix/store/{h}-x"),
        claim: Claim {
            narinfo: String::new(),
            blake3: [b; 32],
            nar_size: size,
            bindings: vec!["me-1:x".into()],
            upstream_refs: vec![],
            own: true,
            providers: vec![],
            failed: false,
            withdrawn: false,
        },
        leaves: vec![b; 32],
    }
}

/// A claim learnt from `provider` on path `h` (NAR `b` repeated), holding it or not at `at`.
pub(crate) fn remote(h: &str, b: u8, provider: u8, at: u64, holds: bool) -> RemoteClaim {
    RemoteClaim {
        store_path: format!("/nix/store/{h}-x"),
        claim: Claim {
            narinfo: String::new(),
            blake3: [b; 32],
            nar_size: 7,
            bindings: vec![],
            upstream_refs: vec![],
            own: false,
            providers: vec![Provider {
                id: [provider; 32],
                holds,
                at_ms: at,
                sig: vec![1],
            }],
            failed: false,
            withdrawn: false,
        },
    }
}

/// A peer's claim on path `h` (NAR `b` repeated) referencing `refs` (store path names, space
/// separated), said held or not.
pub(crate) fn remote_referring(h: &str, b: u8, refs: &str, holds: bool) -> RemoteClaim {
    let mut c = remote(h, b, 5, 1, holds);
    c.claim.narinfo = format!(
        "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:{}\nNarSize: 7\nReferences: {refs}\n",
        c.store_path,
        "0".repeat(52)
    );
    c
}

fn log_order(db: &Db) -> Vec<String> {
    db.log_after(0, 100)
        .unwrap()
        .0
        .into_iter()
        .map(|(_, r)| r.hash_part().to_owned())
        .collect()
}

#[test]
fn queue_record_and_counters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let h1 = "a".repeat(32);
    {
        let db = Db::open(&path).unwrap();
        let item = QueueItem {
            drv: None,
            outs: vec!["/nix/store/x".into()],
        };
        db.enqueue(&[item.clone(), item.clone()]).unwrap();
        let batch = db.queue_batch(10).unwrap();
        assert_eq!(batch.len(), 2);
        db.record_own(&[batch[0].0], &[own(&h1, 1, 10), own(&h1, 1, 10)], 1)
            .unwrap();
    }
    let db = Db::open(&path).unwrap();
    let c = db.counters().unwrap();
    assert_eq!(
        c,
        Counters {
            queue_depth: 1,
            paths: 1,
            failures: 1,
            forgotten: 0,
        }
    );
    let s = db.storage_counters().unwrap();
    assert_eq!((s.own_paths, s.own_bytes), (1, 10));
    assert_eq!(db.known(&[&h1, "b"]).unwrap(), vec![true, false]);
    assert_eq!(db.has_own(&[&h1]).unwrap(), vec![true]);
    assert_eq!(
        db.path(&h1).unwrap().unwrap().active().unwrap().nar_size,
        10
    );
    assert_eq!(db.leaves(&[1; 32]).unwrap(), Some(vec![1; 32]));
    let item = QueueItem {
        drv: None,
        outs: vec![],
    };
    db.enqueue(&[item]).unwrap();
    let seqs: Vec<u64> = db.queue_batch(10).unwrap().iter().map(|x| x.0).collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "sequence numbers keep growing across restarts"
    );
}

#[test]
fn a_peer_record_first_does_not_stop_our_own_and_changes_move_to_the_end_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    let new = db
        .record_remote(
            vec![remote(&a, 9, 5, 1, true), remote(&b, 8, 5, 1, true)],
            None,
            false,
            None,
        )
        .unwrap();
    assert_eq!(new.len(), 2);
    assert_eq!(
        db.has_own(&[&a]).unwrap(),
        vec![false],
        "a peer's record is not ours"
    );
    assert_eq!(log_order(&db), vec![a.clone(), b.clone()]);
    // The same statement again changes nothing; a later withdrawal does.
    assert!(
        db.record_remote(vec![remote(&a, 9, 5, 1, true)], None, false, None)
            .unwrap()
            .is_empty()
    );
    let changed = db
        .record_remote(vec![remote(&a, 9, 5, 2, false)], None, false, None)
        .unwrap();
    assert_eq!(changed.len(), 1);
    assert!(!changed[0].1, "no new claim, only news of a provider");
    assert!(!changed[0].0.claims[0].providers[0].holds);
    assert_eq!(log_order(&db), vec![b.clone(), a.clone()]);
    // Our own build of `b` (other bytes than the peer's) comes first in its record.
    db.record_own(&[], &[own(&b, 3, 10)], 0).unwrap();
    let rec = db.path(&b).unwrap().unwrap();
    assert_eq!(rec.active().unwrap().blake3, [3; 32]);
    assert_eq!(rec.claims.len(), 2);
    assert_eq!(log_order(&db), vec![a.clone(), b.clone()]);
    // Two paths with the same NAR bytes are both found by it.
    db.record_own(&[], &[own(&a, 3, 10)], 0).unwrap();
    assert_eq!(db.by_blake3(&[3; 32]).unwrap().len(), 2);
    // Lost from the store: no longer own, and at the end of the log again.
    assert_eq!(db.own_lost(&[([3; 32], b.clone())]).unwrap(), 1);
    assert_eq!(db.has_own(&[&b, &a]).unwrap(), vec![false, true]);
    assert_eq!(db.own_holder(&[3; 32]).unwrap().unwrap().0, a);
    assert_eq!(log_order(&db).last(), Some(&b));
    assert_eq!(db.storage_counters().unwrap().gc_lost, 1);
}

#[test]
fn nar_files_are_counted_and_evictions_clear_wishes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let a = "a".repeat(32);
    db.record_remote(vec![remote(&a, 9, 5, 1, true)], None, false, None)
        .unwrap();
    db.want(&[([9; 32], a.clone())]).unwrap();
    assert_eq!(db.wants().unwrap().len(), 1);
    db.add_nar_files(&[(
        [9; 32],
        NarFile {
            size: 7,
            last_used: 1,
        },
        &[0; 32],
    )])
    .unwrap();
    assert!(db.wants().unwrap().is_empty(), "held: no longer wanted");
    let s = db.storage_counters().unwrap();
    assert_eq!((s.files, s.file_bytes), (1, 7));
    db.touch_nar_files(&[([9; 32], 50)]).unwrap();
    assert_eq!(db.nar_file(&[9; 32]).unwrap().unwrap().last_used, 50);
    db.want(&[([9; 32], a.clone())]).unwrap();
    assert!(db.wants().unwrap().is_empty(), "a NAR held is never wanted");
    db.remove_nar_files(&[[9; 32]], true).unwrap();
    let s = db.storage_counters().unwrap();
    assert_eq!((s.files, s.file_bytes, s.evictions), (0, 0, 1));
    assert_eq!(db.leaves(&[9; 32]).unwrap(), None);
}

/// A golden fixture (`tests/fixtures/datadir-<commit>.tar.zst`) unpacked.
fn fixture(commit: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/datadir-{commit}.tar.zst"));
    let ok = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(&fixture)
        .arg("-C")
        .arg(t.path())
        .status()
        .unwrap();
    assert!(ok.success());
    t
}

/// The `e5a6e05` fixture: its records, log order and the NARs its blob store held.
#[test]
fn a_data_dir_of_e5a6e05_is_migrated() {
    let t = fixture("e5a6e05");
    let db = Db::open(&t.path().join("n1/data/narmesh.redb")).unwrap();
    assert_eq!(db.counters().unwrap().paths, 4);
    let (entries, more) = db.log_after(0, 100).unwrap();
    assert!(!more);
    let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "sequence numbers kept");
    for (_, r) in &entries {
        let c = r.active().unwrap();
        assert!(c.narinfo.starts_with("StorePath: /nix/store/"));
        assert!(c.bindings.is_empty(), "version 1 never bound BLAKE3 hashes");
        assert_eq!(db.by_blake3(&c.blake3).unwrap().len(), 1);
    }
    assert_eq!(db.legacy_blobs().unwrap().len(), 4, "n1 held every NAR");
    db.drop_legacy().unwrap();
    assert!(db.legacy_blobs().unwrap().is_empty());
    drop(db);
    // Opened again: nothing to migrate, nothing lost.
    let db = Db::open(&t.path().join("n1/data/narmesh.redb")).unwrap();
    assert_eq!(db.counters().unwrap().paths, 4);
}

/// The `ae93e66` fixture, as that release left it: the building node's own paths (one lost
/// from its store, its claim withdrawn) with their leaves and no NAR files; the eager node's
/// four NAR files with their leaves and last-used times, and its pinned closure.
#[test]
fn a_data_dir_of_ae93e66_reads_as_it_was() {
    let t = fixture("ae93e66");
    let paths = std::fs::read_to_string(t.path().join("paths.txt")).unwrap();
    let paths: Vec<&str> = paths.lines().collect();
    let gone = paths.iter().find(|p| p.ends_with("-fixture-gone")).unwrap();
    let dep = paths.iter().find(|p| p.ends_with("-fixture-dep")).unwrap();
    let hash = |p: &str| {
        crate::nix::StorePath::parse(p)
            .unwrap()
            .hash_part()
            .to_owned()
    };
    for n in ["n0", "n1"] {
        let db = Db::open(&t.path().join(n).join("data/narmesh.redb")).unwrap();
        assert_eq!(db.counters().unwrap().paths, 4, "{n}");
        let (entries, more) = db.log_after(0, 100).unwrap();
        assert!(!more);
        let mut logged: Vec<&str> = entries.iter().map(|(_, r)| r.store_path.as_str()).collect();
        logged.sort();
        let mut want = paths.clone();
        want.sort();
        assert_eq!(logged, want, "{n}: every path in the log");
        for (_, r) in &entries {
            let c = r.active().unwrap();
            assert!(!c.bindings.is_empty(), "{n}: bound: {c:?}");
            // Kept by what holds the NAR (n0 its own paths, n1 its files).
            let held = n == "n1" || r.store_path != *gone;
            assert_eq!(
                db.leaves(&c.blake3).unwrap().is_some(),
                held,
                "{n}: leaves of {}",
                r.store_path
            );
        }
        let s = db.storage_counters().unwrap();
        if n == "n0" {
            assert_eq!((s.own_paths, s.gc_lost, s.files), (3, 1, 0), "{s:?}");
            let own: Vec<String> = db
                .own_paths()
                .unwrap()
                .into_iter()
                .map(|(_, _, p)| p)
                .collect();
            assert_eq!(own.len(), 3);
            assert!(!own.iter().any(|p| p == gone), "{own:?}");
            let (_, r) = entries.iter().find(|(_, r)| r.store_path == *gone).unwrap();
            let c = r.active().unwrap();
            assert!(
                c.withdrawn && c.providers.iter().any(|p| p.holds),
                "withdrawn after leaving the store, held by n1: {c:?}"
            );
        } else {
            assert_eq!((s.own_paths, s.files), (0, 4), "{s:?}");
            assert!(s.file_bytes > 200_000, "{s:?}");
            for (b, f) in db.nar_files().unwrap() {
                let (_, r) = entries
                    .iter()
                    .find(|(_, r)| r.active().unwrap().blake3 == b)
                    .unwrap();
                assert_eq!(f.size, r.active().unwrap().nar_size, "{f:?}");
                // Written back from the fixture's reads (2026-12-07), in seconds.
                assert!(
                    (1_796_000_000..1_797_000_000).contains(&f.last_used),
                    "{f:?}"
                );
                assert!(db.leaves(&b).unwrap().is_some());
            }
            assert_eq!(db.pins().unwrap(), vec![hash(dep)], "the pin kept");
        }
    }
}

#[test]
fn an_eager_node_wishes_for_new_claims_in_the_same_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    db.record_remote(vec![remote(&a, 9, 5, 1, true)], None, true, None)
        .unwrap();
    assert_eq!(db.wants().unwrap(), vec![([9; 32], a.clone())]);
    // News of a provider is no new claim: nothing wished again once the wish is gone.
    db.unwant(&[[9; 32]]).unwrap();
    db.record_remote(vec![remote(&a, 9, 5, 2, true)], None, true, None)
        .unwrap();
    assert!(db.wants().unwrap().is_empty());
    // Not eager: no wish.
    db.record_remote(vec![remote(&b, 8, 5, 1, true)], None, false, None)
        .unwrap();
    assert!(db.wants().unwrap().is_empty());
}

/// A path built again with other bytes after every holder of the first build lost it: the
/// new claim's NAR is wished for (the one a node holds), not the first build's, which nobody
/// holds; `me`'s own word, repeated by a peer, does not make a claim held.
#[test]
fn an_eager_node_wishes_for_the_claim_a_node_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let a = "a".repeat(32);
    // The first build: its provider withdrew it; our own old word says we hold it.
    let mut first = remote(&a, 1, 5, 2, false);
    first.claim.providers.push(Provider {
        id: [8; 32],
        holds: true,
        at_ms: 1,
        sig: vec![1],
    });
    db.record_remote(vec![first], None, true, Some(&[8; 32]))
        .unwrap();
    assert_eq!(
        db.wants().unwrap(),
        vec![([1; 32], a.clone())],
        "nobody holds any: the first"
    );
    db.unwant(&[[1; 32]]).unwrap();
    // The second build, which node 6 holds.
    db.record_remote(vec![remote(&a, 2, 6, 3, true)], None, true, Some(&[8; 32]))
        .unwrap();
    assert_eq!(db.wants().unwrap(), vec![([2; 32], a.clone())]);
    let rec = db.path(&a).unwrap().unwrap();
    assert_eq!(
        rec.active().unwrap().blake3,
        [1; 32],
        "still first in the record"
    );
}

/// A peer's answer that it lacks a NAR replaces its older word that it held it (and only
/// that: a record naming it as no holder, or not at all, is left alone); the stale signed word
/// relayed again does not bring it back, its newer one does.
#[test]
fn a_peer_that_answers_it_lacks_a_nar_is_no_longer_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    db.record_remote(
        vec![remote(&a, 1, 5, 10, true), remote(&b, 1, 6, 10, true)],
        None,
        false,
        None,
    )
    .unwrap();
    let holds = |h: &str| db.path(h).unwrap().unwrap().claims[0].held_by_peer(None);
    assert_eq!(db.provider_lacks(&[1; 32], &[5; 32], 20).unwrap(), 1);
    assert!(!holds(&a) && holds(&b), "only peer 5's word changes");
    assert_eq!(
        db.provider_lacks(&[1; 32], &[5; 32], 21).unwrap(),
        0,
        "no news"
    );
    assert_eq!(
        db.provider_lacks(&[2; 32], &[5; 32], 21).unwrap(),
        0,
        "no such NAR"
    );
    db.record_remote(vec![remote(&a, 1, 5, 10, true)], None, false, None)
        .unwrap();
    assert!(!holds(&a), "the stale word relayed again");
    db.record_remote(vec![remote(&a, 1, 5, 30, true)], None, false, None)
        .unwrap();
    assert!(holds(&a), "its newer word");
}

#[test]
fn the_wish_list_is_read_a_window_at_a_time_in_blake3_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let hashes: Vec<String> = ["d", "a", "f", "c", "b"]
        .iter()
        .map(|c| c.repeat(32))
        .collect();
    for (i, h) in hashes.iter().enumerate() {
        // BLAKE3s 5, 1, 4, 3, 2 (out of the order they are recorded in).
        let b = [5u8, 1, 4, 3, 2][i];
        db.record_remote(vec![remote(h, b, 5, 1, true)], None, true, None)
            .unwrap();
    }
    let keys = |w: Vec<([u8; 32], String)>| w.iter().map(|(b, _)| b[0]).collect::<Vec<_>>();
    assert_eq!(keys(db.wants_after(None, 2).unwrap()), vec![1, 2]);
    assert_eq!(keys(db.wants_after(Some(&[2; 32]), 2).unwrap()), vec![3, 4]);
    // A window that reaches the end is short; after the last key there is nothing.
    assert_eq!(keys(db.wants_after(Some(&[4; 32]), 2).unwrap()), vec![5]);
    assert!(db.wants_after(Some(&[5; 32]), 2).unwrap().is_empty());
    // From a key no longer wished: the next one after it.
    db.unwant(&[[3; 32]]).unwrap();
    assert_eq!(keys(db.wants_after(Some(&[2; 32]), 9).unwrap()), vec![4, 5]);
    assert_eq!(db.wants().unwrap().len(), 4);
    let (_, hash_of_one) = &db.wants_after(None, 1).unwrap()[0];
    assert_eq!(hash_of_one, &"a".repeat(32));
}

#[test]
fn nar_files_recorded_together_are_each_counted_once_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    db.record_remote(
        vec![remote(&a, 1, 5, 1, true), remote(&b, 2, 5, 1, true)],
        None,
        true,
        None,
    )
    .unwrap();
    assert_eq!(db.wants().unwrap().len(), 2);
    let file = |size| NarFile { size, last_used: 1 };
    // The same file twice in one group (and once more later) counts once.
    db.add_nar_files(&[
        ([1; 32], file(10), &[1; 32]),
        ([2; 32], file(20), &[2; 32]),
        ([1; 32], file(10), &[1; 32]),
    ])
    .unwrap();
    db.add_nar_files(&[([1; 32], file(10), &[1; 32])]).unwrap();
    db.add_nar_files(&[]).unwrap();
    let s = db.storage_counters().unwrap();
    assert_eq!((s.files, s.file_bytes), (2, 30));
    assert!(db.wants().unwrap().is_empty(), "both held: no wish left");
    assert_eq!(db.leaves(&[2; 32]).unwrap(), Some(vec![2; 32]));
    assert_eq!(db.nar_file(&[2; 32]).unwrap(), Some(file(20)));
}

/// Records of paths nobody holds are forgotten once unchanged for the time given, with every
/// row that names them; a holder (a peer's statement, an own path, a NAR file) or a pin keeps
/// one, and this node's own statement repeated by a peer counts for nothing.
#[test]
fn records_nobody_holds_are_forgotten_once_old_enough() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let me = [7u8; 32];
    let h = |c: char| c.to_string().repeat(32);
    let rec = |c: char, b: u8, provider: u8, holds: bool| {
        db.record_remote(
            vec![remote(&h(c), b, provider, 1, holds)],
            None,
            false,
            None,
        )
        .unwrap();
    };
    rec('a', 1, 5, true);
    db.record_remote(vec![remote(&h('a'), 1, 5, 2, false)], None, false, None)
        .unwrap();
    db.want(&[([1; 32], h('a'))]).unwrap();
    rec('b', 2, 5, true);
    db.record_own(&[], &[own(&h('c'), 3, 10)], 0).unwrap();
    rec('d', 4, 5, false);
    db.add_nar_files(&[(
        [4; 32],
        NarFile {
            size: 7,
            last_used: 1,
        },
        &[0; 32],
    )])
    .unwrap();
    rec('e', 5, 5, false);
    db.set_pins(&[h('e')], true).unwrap();
    rec('f', 6, me[0], true);
    // Nobody holds it, but its NAR is in a pinned closure.
    rec('p', 11, 5, false);
    // Its only claim failed, and a peer still has those bytes: the record keeps them out.
    rec('x', 12, 5, true);
    db.update_record(&h('x'), |r| {
        r.claims[0].failed = true;
        true
    })
    .unwrap();
    let pinned = std::collections::HashSet::from([[11u8; 32]]);
    let step = |now: u64, limit: usize, mirror: bool| {
        let mut got = db
            .forget_dead(ForgetStep {
                me: Some(&me),
                now,
                after: 100,
                limit,
                mirror,
                pinned: &pinned,
            })
            .unwrap();
        got.hashes.sort();
        got
    };
    assert!(
        step(1000, 100, false).hashes.is_empty(),
        "nothing is old enough"
    );
    // Dies after the mark at 1000.
    rec('g', 8, 5, false);
    assert!(
        step(1050, 100, false).hashes.is_empty(),
        "the mark is not 100 s old yet"
    );
    let got = step(1100, 100, false);
    assert_eq!(got.hashes, vec![h('a'), h('f')]);
    assert!(!got.more);
    assert_eq!(db.path(&h('a')).unwrap(), None);
    assert!(db.by_blake3(&[1; 32]).unwrap().is_empty());
    assert!(
        db.wants().unwrap().is_empty(),
        "no wish for bytes nobody claims"
    );
    assert!(!log_order(&db).contains(&h('a')));
    let c = db.counters().unwrap();
    assert_eq!((c.paths, c.forgotten), (7, 2));
    // `g` was in the log by the mark at 1050; a step with the mirror on waits for the mirror
    // to have taken it (its cursor is still 0), one without forgets it.
    assert!(step(1150, 100, true).hashes.is_empty());
    assert_eq!(step(1150, 100, false).hashes, vec![h('g')]);
    // What stays: held by a peer, own, a file, pinned, pinned closure, failed bytes about. A
    // record that dies later is walked to.
    assert_eq!(log_order(&db).len(), 6);
    db.record_remote(vec![remote(&h('b'), 2, 5, 9, false)], None, false, None)
        .unwrap();
    db.set_pins(&[h('e')], false).unwrap();
    assert!(
        step(1200, 100, false).hashes.is_empty(),
        "changed since the last mark"
    );
    let first = step(1300, 1, false);
    assert!(first.more && first.hashes.len() == 1, "one entry at a time");
    let mut rest = first.hashes;
    rest.extend(step(1301, 100, false).hashes);
    rest.sort();
    assert_eq!(rest, vec![h('b'), h('e')]);
    assert_eq!(log_order(&db), vec![h('c'), h('d'), h('p'), h('x')]);
    // On the mirror node, a dead path taken into the outbox stays until it is done there.
    rec('m', 9, 5, false);
    db.outbox_take(100, None).unwrap();
    assert!(step(1400, 100, true).hashes.is_empty());
    assert!(
        step(1500, 100, true).hashes.is_empty(),
        "not in the bucket yet"
    );
    db.outbox_set(&[(h('m'), MirrorState::Done)]).unwrap();
    db.outbox_take(100, None).unwrap();
    assert!(step(1600, 100, true).hashes.is_empty());
    assert_eq!(step(1700, 100, true).hashes, vec![h('m')]);
}

/// An own path lost from the store moves every path with the same bytes to the end of the log
/// (withdrawn): they were held only through it, and the walk that forgets dead records must
/// come to them again.
#[test]
fn a_lost_own_copy_moves_every_path_with_those_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let (s1, t, u) = ("s".repeat(32), "t".repeat(32), "u".repeat(32));
    db.record_own(&[], &[own(&s1, 13, 10)], 0).unwrap();
    db.record_remote(vec![remote(&t, 13, 5, 1, false)], None, false, None)
        .unwrap();
    db.record_remote(vec![remote(&u, 14, 5, 1, true)], None, false, None)
        .unwrap();
    assert_eq!(log_order(&db), vec![s1.clone(), t.clone(), u.clone()]);
    assert_eq!(db.own_lost(&[([13; 32], s1.clone())]).unwrap(), 1);
    assert_eq!(log_order(&db), vec![u.clone(), s1.clone(), t.clone()]);
    assert!(db.path(&t).unwrap().unwrap().claims[0].withdrawn);
    // A rebuild with other bytes does the same for the bytes it replaced.
    db.record_own(&[], &[own(&u, 15, 10)], 0).unwrap();
    db.record_own(&[], &[own(&s1, 14, 10)], 0).unwrap();
    assert_eq!(log_order(&db), vec![t.clone(), u.clone(), s1.clone()]);
    db.record_own(&[], &[own(&s1, 16, 10)], 0).unwrap();
    assert_eq!(
        log_order(&db)[0],
        t,
        "only the paths with the replaced bytes moved"
    );
    let u_rec = db.path(&u).unwrap().unwrap();
    assert!(u_rec.claim(&[14; 32]).unwrap().withdrawn);
    assert_eq!(
        db.leaves(&[14; 32]).unwrap(),
        None,
        "bytes nobody holds keep no leaves"
    );
}

/// A peer reviewed after a long absence: its signed statements of holding on the paths its log
/// no longer has become a local "no longer holds", which a stale echo of them cannot undo and
/// a statement it signs later can; its unsigned hints there are dropped.
#[test]
fn a_review_disproves_what_the_peer_no_longer_says() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let peer = [5u8; 32];
    let (a, b, c, v) = (
        "a".repeat(32),
        "b".repeat(32),
        "c".repeat(32),
        "v".repeat(32),
    );
    let (d, e) = ("d".repeat(32), "e".repeat(32));
    let mut hint = remote(&v, 4, 5, 0, true);
    hint.claim.providers[0].sig.clear();
    db.record_remote(
        vec![
            remote(&a, 1, 5, 1, true),
            remote(&b, 2, 5, 1, true),
            remote(&c, 3, 6, 1, true),
            hint,
            remote(&d, 7, 5, 1, true),
            remote(&e, 8, 5, 1, true),
        ],
        Some((&peer, 40)),
        false,
        None,
    )
    .unwrap();
    // `e` has a second claim, the one a peer's log would serve.
    db.record_remote(vec![remote(&e, 9, 6, 1, true)], None, false, None)
        .unwrap();
    assert_eq!(db.synced_at(&peer).unwrap(), None);
    db.set_synced(&peer, 1000, 60).unwrap();
    db.set_synced(&peer, 1050, 60).unwrap();
    assert_eq!(
        db.synced_at(&peer).unwrap(),
        Some(1000),
        "written once a minute"
    );
    db.set_synced(&peer, 1060, 60).unwrap();
    assert_eq!(db.synced_at(&peer).unwrap(), Some(1060));
    assert!(!db.reviewing(&peer).unwrap());
    assert_eq!(db.begin_review(&peer, 2000).unwrap(), 5, "a, b, v, d and e");
    assert_eq!(db.cursor(&peer).unwrap(), 0, "its whole log again");
    assert_eq!(db.synced_at(&peer).unwrap(), Some(2000));
    assert!(db.reviewing(&peer).unwrap());
    // In the peer's log: `a` with its word that it holds it (kept); `c`, which it never said it
    // held; `d` without its word on the claim served (gives way); `e` served with another
    // claim than the one it said it held (cannot be judged: kept).
    let seen = [
        (a.clone(), [1; 32], true),
        (c.clone(), [3; 32], false),
        (d.clone(), [7; 32], false),
        (e.clone(), [9; 32], false),
    ];
    db.confirm(&peer, 2500, &seen).unwrap();
    assert_eq!(
        db.synced_at(&peer).unwrap(),
        Some(2500),
        "a review making progress"
    );
    assert_eq!(db.end_review(&peer, 5000).unwrap(), 3, "b, d and v");
    assert!(!db.reviewing(&peer).unwrap());
    let p = db.path(&b).unwrap().unwrap().claims[0].providers[0].clone();
    assert_eq!((p.holds, p.at_ms, p.sig.is_empty()), (false, 5000, true));
    assert!(db.path(&v).unwrap().unwrap().claims[0].providers.is_empty());
    assert!(db.path(&a).unwrap().unwrap().claims[0].providers[0].holds);
    assert!(
        db.path(&e)
            .unwrap()
            .unwrap()
            .claim(&[8; 32])
            .unwrap()
            .providers[0]
            .holds
    );
    let order = log_order(&db);
    assert_eq!(
        &order[order.len() - 3..],
        &[b.clone(), d.clone(), v.clone()]
    );
    assert!(
        db.record_remote(vec![remote(&b, 2, 5, 4000, true)], None, false, None)
            .unwrap()
            .is_empty(),
        "a statement made before the review, relayed late, changes nothing"
    );
    let fresh = db
        .record_remote(vec![remote(&b, 2, 5, 6000, true)], None, false, None)
        .unwrap();
    assert!(
        fresh[0].0.claims[0].providers[0].holds,
        "a later statement does"
    );
    // A peer this node has no statement of: nothing to review.
    assert_eq!(db.begin_review(&[9; 32], 3000).unwrap(), 0);
    assert!(!db.reviewing(&[9; 32]).unwrap());
}

/// Commits written without fsync (claims learnt from peers within a second of the last fsync)
/// are lost with a crash; [`Db::sync`], as a clean stop calls it, makes them durable. The
/// database file is copied while open, as a crash would leave it.
#[test]
fn a_sync_makes_the_commits_written_without_fsync_durable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("live")).unwrap();
    let db = Db::open(&dir.path().join("live/db.redb")).unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    // The first new claim is fsync'd, the next one within a second is not.
    db.record_remote(vec![remote(&a, 1, 5, 1, true)], None, false, None)
        .unwrap();
    db.record_remote(vec![remote(&b, 2, 5, 1, true)], None, false, None)
        .unwrap();
    let crash = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(dir.path().join("live/db.redb"), to.join("db.redb")).unwrap();
        to.join("db.redb")
    };
    let before = crash("before");
    db.sync().unwrap();
    let after = crash("after");
    let before = Db::open(&before).unwrap();
    assert!(before.path(&a).unwrap().is_some());
    assert_eq!(before.path(&b).unwrap(), None, "lost without the sync");
    let after = Db::open(&after).unwrap();
    assert!(after.path(&a).unwrap().is_some());
    assert!(after.path(&b).unwrap().is_some(), "kept with it");
}

/// Records of `n` paths (two batches of a change of trust and some), every other one said by
/// peer 5 (the others by peer 6), learnt from peer 9 whose catch-up cursor is at 77.
fn retrust_fixture() -> (tempfile::TempDir, Db, usize) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.redb")).unwrap();
    let n = 2 * super::paths::RETRUST_BATCH + 300;
    let claims: Vec<RemoteClaim> = (0..n)
        .map(|i| {
            remote(
                &format!("{i:032}"),
                (i % 250) as u8,
                5 + (i % 2) as u8,
                1,
                true,
            )
        })
        .collect();
    db.record_remote(claims, Some((&[9; 32], 77)), false, None)
        .unwrap();
    (dir, db, n)
}

/// A change of trust checks every record again, a batch per commit: across batches, claims no
/// longer trusted go (records left without any with them, and their log entries), own claims
/// and trusted ones stay, and only the last commit resets the catch-up cursors and notes the
/// new fingerprint.
#[test]
fn a_change_of_trust_checks_every_record_in_batches() {
    let (_dir, db, n) = retrust_fixture();
    let mine = "z".repeat(32);
    db.record_own(&[], &[own(&mine, 251, 10)], 0).unwrap();
    let keep = |_: &str, c: &Claim| (c.providers[0].id[0] == 5).then(|| c.clone());
    assert_eq!(db.retrust(42, keep).unwrap(), (n / 2, n / 2));
    assert_eq!(db.trust_fingerprint().unwrap(), 42);
    assert_eq!(db.cursor(&[9; 32]).unwrap(), 0, "catch-up starts over");
    assert_eq!(db.counters().unwrap().paths, (n / 2 + 1) as u64);
    for i in [0, 1, 1023, 1024, 1025, 2048, n - 1] {
        let rec = db.path(&format!("{i:032}")).unwrap();
        assert_eq!(rec.is_some(), i % 2 == 0, "record {i}");
    }
    assert!(
        db.path(&mine).unwrap().is_some(),
        "own claims are never checked"
    );
    let (entries, _) = db.log_after(0, 10 * n).unwrap();
    assert_eq!(entries.len(), n / 2 + 1, "no log entry without its record");
}

/// A change of trust cut short (here by a panic in the third batch; a crash at the same point
/// leaves the same commits) leaves the old fingerprint and the catch-up cursors as they were,
/// so the check is done again, whole, at the next start; the batches already committed are
/// not undone, and checking them again changes nothing.
#[test]
fn a_change_of_trust_cut_short_is_done_again() {
    let (_dir, db, n) = retrust_fixture();
    let keep = |_: &str, c: &Claim| (c.providers[0].id[0] == 5).then(|| c.clone());
    let calls = std::cell::Cell::new(0);
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.retrust(42, |p: &str, c: &Claim| {
            calls.set(calls.get() + 1);
            assert!(calls.get() <= 2 * super::paths::RETRUST_BATCH, "cut short");
            keep(p, c)
        })
    }));
    assert!(cut.is_err());
    assert_ne!(db.trust_fingerprint().unwrap(), 42, "not done");
    assert_eq!(
        db.cursor(&[9; 32]).unwrap(),
        77,
        "catch-up not started over yet"
    );
    let batch = super::paths::RETRUST_BATCH;
    assert_eq!(
        db.counters().unwrap().paths,
        (n - batch) as u64,
        "two batches committed"
    );
    assert_eq!(
        db.retrust(42, keep).unwrap(),
        (n / 2 - batch, n / 2 - batch)
    );
    assert_eq!(db.trust_fingerprint().unwrap(), 42);
    assert_eq!(db.cursor(&[9; 32]).unwrap(), 0, "catch-up starts over");
    assert_eq!(db.counters().unwrap().paths, (n / 2) as u64);
    for i in [0, 1, 1023, 1024, 2047, 2048, n - 1] {
        assert_eq!(
            db.path(&format!("{i:032}")).unwrap().is_some(),
            i % 2 == 0,
            "record {i}"
        );
    }
    let (entries, _) = db.log_after(0, 10 * n).unwrap();
    assert_eq!(entries.len(), n / 2, "no log entry without its record");
}

/// A claim a record drops (an own build of other bytes replaces the earlier own claim; past
/// the most claims a record keeps, the last goes) leaves the index of paths by NAR: nothing
/// else would ever remove it.
#[test]
fn a_dropped_claim_leaves_the_index_of_paths_by_nar() {
    use super::records::MAX_CLAIMS;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let rows = |b: u8| {
        let d = db.db.get().unwrap();
        let tx = d.begin_read().unwrap();
        let blobs = tx.open_multimap_table(BLOBS).unwrap();
        blobs.get([b; 32].as_slice()).unwrap().count()
    };
    let a = "a".repeat(32);
    db.record_own(&[], &[own(&a, 1, 10)], 0).unwrap();
    db.record_own(&[], &[own(&a, 2, 10)], 0).unwrap();
    assert_eq!((rows(1), rows(2)), (0, 1), "built again with other bytes");
    let b = "b".repeat(32);
    for n in 10..10 + MAX_CLAIMS as u8 {
        db.record_remote(vec![remote(&b, n, 5, 1, true)], None, false, None)
            .unwrap();
    }
    // A bound claim goes before the unbound ones: the last of those is dropped.
    let mut bound = remote(&b, 20, 5, 1, true);
    bound.claim.bindings = vec!["k-1:x".into()];
    db.record_remote(vec![bound], None, false, None).unwrap();
    let rec = db.path(&b).unwrap().unwrap();
    assert_eq!(rec.claims.len(), MAX_CLAIMS);
    let dropped = 10 + MAX_CLAIMS as u8 - 1;
    assert!(rec.claim(&[dropped; 32]).is_none());
    assert_eq!((rows(dropped), rows(20), rows(10)), (0, 1, 1));
    // A row an earlier release left (its record claims other bytes) is no claim: the path does
    // not move when those bytes change hands (here the own copy is lost), and the row goes.
    let c = "c".repeat(32);
    db.record_own(&[], &[own(&c, 30, 10)], 0).unwrap();
    {
        let d = db.db.get().unwrap();
        let tx = d.begin_write().unwrap();
        tx.open_multimap_table(BLOBS)
            .unwrap()
            .insert([30; 32].as_slice(), a.as_str())
            .unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(rows(30), 2);
    assert_eq!(log_order(&db), [a.clone(), b.clone(), c.clone()]);
    db.own_lost(&[([30; 32], c.clone())]).unwrap();
    assert_eq!(log_order(&db), [a, b, c], "a did not move");
    assert_eq!(rows(30), 1);
}

/// Own paths recorded are kept for the storage's next check, up to a bound: past it, the
/// storage is told to check them all.
#[test]
fn own_paths_recorded_lately_are_kept_for_the_next_check_up_to_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let a = "a".repeat(32);
    db.record_own(&[], &[own(&a, 1, 10)], 0).unwrap();
    let recent = db.take_recent_own().unwrap();
    assert_eq!(recent, [([1; 32], a.clone(), format!("/nix/store/{a}-x"))]);
    assert_eq!(db.take_recent_own(), Some(vec![]), "taken");
    let many: Vec<OwnRecord> = (0..=RECENT_OWN)
        .map(|i| own(&format!("{i:032}"), 2, 10))
        .collect();
    db.record_own(&[], &many, 0).unwrap();
    assert_eq!(db.take_recent_own(), None, "too many: check them all");
    assert_eq!(db.take_recent_own(), Some(vec![]));
}

/// The queue's depth is told at once and at every change, in order (what
/// `narmesh_queue_depth` shows, also while the pipeline is held up).
#[test]
fn the_queue_depth_is_told_at_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.redb")).unwrap();
    let item = QueueItem {
        drv: None,
        outs: vec!["/nix/store/x".into()],
    };
    db.enqueue(std::slice::from_ref(&item)).unwrap();
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = told.clone();
    db.observe_queue_depth(move |d| t.lock().unwrap().push(d));
    db.enqueue(&[item.clone(), item.clone()]).unwrap();
    let batch = db.queue_batch(10).unwrap();
    db.dequeue(&[batch[1].0]).unwrap();
    db.dequeue(&[batch[2].0]).unwrap();
    assert_eq!(*told.lock().unwrap(), [1, 3, 1, 0]);
    assert_eq!(db.queue_depth(), 0);
}

/// Lists with no bound (a Nix GC of many own paths, an eviction of many small NARs) are
/// written 1024 to a commit: no write runs for long, nor holds every other up.
#[test]
fn long_lists_are_written_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let lost: Vec<([u8; 32], String)> = (0..2500u32)
        .map(|i| {
            let mut b = [0; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            (b, format!("{i:032}"))
        })
        .collect();
    let commits = || super::writes::COMMITS.get();
    let before = commits();
    assert_eq!(db.own_lost(&lost).unwrap(), 0);
    assert_eq!(commits() - before, 3);
    let before = commits();
    let nars: Vec<[u8; 32]> = lost.iter().map(|(b, _)| *b).collect();
    db.remove_nar_files(&nars, true).unwrap();
    assert_eq!(commits() - before, 3);
    let before = commits();
    let used: Vec<([u8; 32], u64)> = nars.iter().map(|b| (*b, 1)).collect();
    db.touch_nar_files(&used).unwrap();
    assert_eq!(commits() - before, 3);
}
