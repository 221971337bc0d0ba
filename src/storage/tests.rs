//! Tests of the storage as a whole (its parts test themselves): pins against eviction, the
//! leaves its readers share, the read budget under stalled readers, what a refusal says.

use super::*;

fn open(dir: &Path, max_size: u64, min_free: u64) -> (Storage, Arc<Metrics>) {
    open_reading(dir, max_size, min_free, 64 << 20)
}

fn open_reading(
    dir: &Path,
    max_size: u64,
    min_free: u64,
    read_memory: u64,
) -> (Storage, Arc<Metrics>) {
    // Opened again, once the last storage's recording thread has let the database go.
    let started = std::time::Instant::now();
    let db = loop {
        match Db::open(&dir.join("narmesh.redb")) {
            Ok(db) => break db,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let store = Arc::new(LocalStore::new(&dir.join("store")));
    let metrics = Arc::new(Metrics::new());
    let cfg = StorageConfig {
        max_size,
        min_free,
        gc_interval: Duration::from_secs(60),
        mirror: false,
        read_memory,
        vital: crate::vital::Vital::unwatched(),
    };
    let s = Storage::open(dir, db, store, cfg, metrics.clone()).unwrap();
    (s, metrics)
}

/// A NAR file of `size` bytes fetched into the storage.
fn fetched(s: &Storage, b: u8, size: usize) {
    let p = s.begin(&[b; 32], size as u64).unwrap();
    p.write_at(0, &vec![b; size]).unwrap();
    p.finish(&vec![0; size.div_ceil(16 << 10) * 32]).unwrap();
}

/// A pin made before its closure arrived: the dependency recorded and fetched afterwards
/// is kept when the next fetch must evict, without waiting for the housekeeping's
/// recomputation (a minute), and the newer unpinned NAR goes instead.
#[test]
fn a_path_that_joins_a_pinned_closure_after_the_pin_is_not_evicted() {
    use crate::db::tests::remote_referring as claim;
    let t = tempfile::tempdir().unwrap();
    let (s, _) = open(t.path(), 2 << 20, 0);
    let db = s.db().clone();
    let (root, dep) = ("a".repeat(32), "b".repeat(32));
    db.record_remote(
        vec![claim(&root, 1, &format!("{dep}-x"), true)],
        None,
        false,
        None,
    )
    .unwrap();
    db.set_pins(std::slice::from_ref(&root), true).unwrap();
    s.refresh_pins().unwrap();
    assert!(!s.pinned_nars().contains(&[2; 32]), "not recorded yet");
    db.record_remote(vec![claim(&dep, 2, "", true)], None, false, None)
        .unwrap();
    fetched(&s, 2, 1 << 20);
    fetched(&s, 3, 1 << 20);
    std::thread::sleep(PINS_FRESH + Duration::from_millis(100));
    // Over the cap: one of the two goes.
    fetched(&s, 4, 1 << 20);
    assert!(
        s.file_path(&[2; 32]).exists(),
        "the pinned dependency was evicted"
    );
    assert!(!s.file_path(&[3; 32]).exists());
}

/// Readers of one NAR share its leaves, loaded once (not once per reader: a 10 GiB NAR's
/// are 20 MiB), and what is shared goes with the last reader.
#[tokio::test]
async fn readers_of_a_nar_share_its_leaves() {
    let t = tempfile::tempdir().unwrap();
    let (s, _) = open(t.path(), 64 << 20, 0);
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let (b, size) = ([9; 32], data.len() as u64);
    let p = s.begin(&b, size).unwrap();
    p.write_at(0, &data).unwrap();
    p.finish(&Leaves::of(&data).to_bytes()).unwrap();
    let shared = || {
        s.inner
            .lock()
            .leaves_read
            .get(&b)
            .and_then(std::sync::Weak::upgrade)
    };

    // Each stream reads a piece ahead of its consumer, and waits: both are still reading.
    let mut first = s.read(&b, 0, size).await.unwrap();
    let leaves = shared().expect("the leaves are shared while read");
    let mut second = s.read(&b, 0, size).await.unwrap();
    assert_eq!(
        Arc::strong_count(&leaves),
        3,
        "the second reader has the first one's leaves (and this test holds them)"
    );
    for r in [&mut first, &mut second] {
        let mut got = Vec::new();
        while let Some(piece) = r.recv().await {
            got.extend_from_slice(&piece.unwrap());
        }
        assert!(got == data, "a reader of the shared leaves reads it whole");
    }
    drop(leaves);
    let gone = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.inner.lock().leaves_read.contains_key(&b) {
            assert!(
                std::time::Instant::now() < deadline,
                "the shared leaves stayed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    gone().await;

    // Leaves answered to peers are the readers' copy too, and keep it while they are held.
    let reader = s.read(&b, 0, size).await.unwrap();
    let leaves = shared().expect("shared while read");
    let answer = s.leaves(&b).await.unwrap().expect("held");
    assert_eq!(
        answer.as_ptr(),
        leaves.as_bytes().as_ptr(),
        "the answer is the readers' copy"
    );
    assert!(answer == Leaves::of(&data).to_bytes());
    drop((reader, leaves));
    let again = s.leaves(&b).await.unwrap().expect("held");
    assert_eq!(again.as_ptr(), answer.as_ptr(), "kept while an answer is");
    drop((answer, again));
    gone().await;

    // Two readers opening at the same time may both load the leaves: both keep one copy.
    // (Their loads overlap in some rounds only: 20 rounds, so that some do.)
    for _ in 0..20 {
        let (first, second) = tokio::join!(s.read(&b, 0, size), s.read(&b, 0, size));
        let (first, second) = (first.unwrap(), second.unwrap());
        let leaves = shared().expect("the leaves are shared while read");
        assert_eq!(Arc::strong_count(&leaves), 3, "readers that came together");
        drop((first, second, leaves));
        gone().await;
    }
}

/// Readers whose consumers stopped reading hold at most `read-memory` between them (and a
/// chunk group or two each past it); a reader after them is not starved but reads the NAR
/// whole, in small pieces; and what the readers held is given back when they go.
#[tokio::test]
async fn stalled_readers_hold_at_most_the_read_memory() {
    use crate::chunks::GROUP;
    const BUDGET: u64 = 4 << 20;
    let t = tempfile::tempdir().unwrap();
    let (s, metrics) = open_reading(t.path(), 64 << 20, 0, BUDGET);
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    let (b, size) = ([7; 32], data.len() as u64);
    let p = s.begin(&b, size).unwrap();
    p.write_at(0, &data).unwrap();
    p.finish(&Leaves::of(&data).to_bytes()).unwrap();
    let buffered = || metrics.storage_read_buffered_bytes.get() as u64;
    async fn until(what: &str, ok: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // 16 consumers each take a piece and stop: each stream then reads two more pieces into
    // its channel and waits.
    let (mut stalled, mut taken) = (Vec::new(), Vec::new());
    for _ in 0..16 {
        let mut r = s.read(&b, 0, size).await.unwrap();
        taken.push(r.recv().await.unwrap().unwrap());
        stalled.push(r);
    }
    until("every stalled stream read its next piece", || {
        stalled.iter().all(|r| r.len() == 2)
    })
    .await;
    let held = buffered();
    let past_budget = 16 * 3 * GROUP;
    assert!(
        held <= BUDGET + past_budget,
        "16 stalled readers hold {held} bytes, over the {BUDGET} of read-memory and {past_budget} past it"
    );
    assert!(held >= BUDGET, "the budget is spent: {held}");

    // A reader now still reads the whole NAR, a chunk group at a time.
    let mut late = s.read(&b, 0, size).await.unwrap();
    let mut got = Vec::new();
    while let Some(piece) = late.recv().await {
        let piece = piece.unwrap();
        assert!(piece.len() as u64 <= GROUP, "the budget is spent");
        got.extend_from_slice(&piece);
    }
    assert!(
        got == data,
        "a reader after the stalled ones reads it whole"
    );

    // What the stalled readers held goes with them, budget and all.
    drop((stalled, taken));
    until("the pieces of readers gone are given back", || {
        buffered() == 0
    })
    .await;
    let mut again = s.read(&b, 0, size).await.unwrap();
    let piece = again.recv().await.unwrap().unwrap();
    assert_eq!(piece.len(), 1 << 20, "the budget is whole again");
}

#[test]
fn a_refusal_names_its_limit_and_a_disk_under_the_floor_is_a_problem() {
    // A floor no disk meets: a problem for status, and a refusal that names the disk.
    let t = tempfile::tempdir().unwrap();
    let (s, metrics) = open(t.path(), 1 << 30, u64::MAX / 2);
    let problems = metrics.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("storage:") && p.contains("min-free")),
        "{problems:?}"
    );
    let e = s.make_room(1).unwrap_err().to_string();
    assert!(e.contains("min-free") && !e.contains("max-size"), "{e}");

    // No floor: no problem, and a NAR over what the cap can make room for names the cap.
    let t = tempfile::tempdir().unwrap();
    let (s, metrics) = open(t.path(), 1 << 20, 0);
    assert!(metrics.problems().is_empty(), "{:?}", metrics.problems());
    let e = s.make_room(2 << 20).unwrap_err().to_string();
    assert!(e.contains("max-size") && !e.contains("min-free"), "{e}");
}

/// An own path removed from the Nix store before the node recorded it (a check ran in between,
/// so the store's removals mark is the one that check saw) is still looked up, once, at the
/// next check, with no full check of every own path.
#[test]
fn an_own_path_removed_before_it_was_recorded_is_checked_all_the_same() {
    use crate::db::tests::own;
    let t = tempfile::tempdir().unwrap();
    let (s, metrics) = open(t.path(), 64 << 20, 0);
    let dir = t.path().join("store/nix/var/nix/db");
    std::fs::create_dir_all(&dir).unwrap();
    let c = rusqlite::Connection::open(dir.join("db.sqlite")).unwrap();
    c.execute_batch(
        "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, \
         path text unique not null, hash text not null, registrationTime integer not null, \
         deriver text, narSize integer, ultimate integer, sigs text, ca text);",
    )
    .unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    let path = |h: &str| format!("/nix/store/{h}-x");
    for h in [&a, &b] {
        c.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime) VALUES (?1, 'x', 0)",
            [path(h)],
        )
        .unwrap();
    }
    let db = s.db().clone();
    db.record_own(&[], &[own(&a, 1, 10)], 0).unwrap();
    let mark = s.check_own_paths(None).unwrap();
    assert!(mark.is_some());
    // b is built, and removed (Nix GC) before the node records it; a check runs meanwhile.
    c.execute("DELETE FROM ValidPaths WHERE path = ?1", [path(&b)])
        .unwrap();
    let mark = s.check_own_paths(mark).unwrap();
    db.record_own(&[], &[own(&b, 2, 10)], 0).unwrap();
    assert_eq!(db.storage_counters().unwrap().own_paths, 2);
    assert_eq!(s.check_own_paths(mark).unwrap(), mark, "nothing left since");
    let counters = db.storage_counters().unwrap();
    assert_eq!((counters.own_paths, counters.gc_lost), (1, 1), "b is lost");
    assert_eq!(
        metrics.storage_own_checks.get(),
        2,
        "every own path looked up only at the first check and after the removal"
    );
}

/// A failed write of last-used times (a full disk) keeps them for the next flush, which
/// writes them: a NAR read lately is not evicted first after a restart for want of its time.
#[test]
fn last_used_times_a_failed_write_did_not_write_wait_for_the_next() {
    let t = tempfile::tempdir().unwrap();
    let (s, _) = open(t.path(), 2 << 20, 0);
    fetched(&s, 1, 1000);
    let before = s.db().nar_file(&[1; 32]).unwrap().unwrap().last_used;
    s.inner.lock().touched.insert([1; 32], before + 100);
    gc::TOUCH_WRITE_FAILS.set(true);
    assert!(s.flush_touched().is_err());
    gc::TOUCH_WRITE_FAILS.set(false);
    s.flush_touched().unwrap();
    let file = s.db().nar_file(&[1; 32]).unwrap().unwrap();
    assert_eq!(file.last_used, before + 100);
}

/// Over its cap (lowered since the files came), the storage evicts at its housekeeping even
/// while last-used times cannot be written (a full disk: eviction is what frees space).
#[test]
fn eviction_goes_on_while_last_used_times_cannot_be_written() {
    let t = tempfile::tempdir().unwrap();
    let (s, _) = open(t.path(), 4 << 20, 0);
    fetched(&s, 1, 1 << 20);
    fetched(&s, 2, 1 << 20);
    drop(s);
    let (s, _) = open(t.path(), 3 << 19, 0);
    assert_eq!(s.db().storage_counters().unwrap().files, 2);
    s.inner.lock().touched.insert([1; 32], now_secs() + 100);
    gc::TOUCH_WRITE_FAILS.set(true);
    s.flush_and_trim();
    gc::TOUCH_WRITE_FAILS.set(false);
    assert_eq!(s.db().storage_counters().unwrap().files, 1, "one evicted");
    assert!(
        !s.inner.lock().touched.is_empty(),
        "the times wait for the next flush"
    );
}
