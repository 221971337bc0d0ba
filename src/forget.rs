//! When the records of paths nobody holds any more are forgotten (`[store] forget-after-secs`):
//! a loop that steps the database's walk ([`crate::db::Db::forget_dead`]) every eighth of that
//! time (between 1 s and an hour), a bounded batch per commit, and counts what went. What
//! counts as dead, and what is kept whatever its state, is the database's to say (`db::forget`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{Db, ForgetStep};
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Log entries examined per commit (about 15 ms of the database's one writer, at most).
const BATCH: usize = 1024;

/// What the loop needs.
pub struct Forgetting {
    pub db: Db,
    /// Whose pinned closures are kept.
    pub storage: Storage,
    /// This node's endpoint id (none without the mesh).
    pub me: Option<[u8; 32]>,
    /// Seconds unchanged before a dead record goes (0: never).
    pub after_secs: u64,
    /// This node runs the S3 mirror.
    pub mirror: bool,
    pub metrics: Arc<Metrics>,
}

impl Forgetting {
    /// How often a step runs.
    fn every(&self) -> Duration {
        Duration::from_secs(self.after_secs / 8)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600))
    }

    /// Step until cancelled (at once: the first step's mark starts the clock). Off
    /// (`forget-after-secs = 0`), it only waits to be cancelled: it is vital work, whose end
    /// would stop the node.
    pub async fn run(self, cancel: CancellationToken) {
        if self.after_secs == 0 {
            return cancel.cancelled().await;
        }
        let every = self.every();
        loop {
            self.round(crate::mesh::now_ms() / 1000).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Steps until the walk has caught up with what is old enough (`now`: unix seconds).
    async fn round(&self, now: u64) {
        loop {
            let (db, me, after, mirror) = (self.db.clone(), self.me, self.after_secs, self.mirror);
            let pinned = self.storage.pinned_nars();
            let step = tokio::task::spawn_blocking(move || {
                db.forget_dead(ForgetStep {
                    me: me.as_ref(),
                    now,
                    after,
                    limit: BATCH,
                    mirror,
                    pinned: &pinned,
                })
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match step {
                Ok(done) => {
                    if !done.hashes.is_empty() {
                        tracing::info!(
                            "forgot {} record(s) of paths nobody holds any more",
                            done.hashes.len()
                        );
                        self.metrics
                            .records_forgotten
                            .inc_by(done.hashes.len() as u64);
                    }
                    if !done.more {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("forgetting dead records: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageConfig;
    use crate::store::LocalStore;

    use crate::db::tests::remote_referring as claim;

    /// The storage over `dir`'s database, as a node opens it at start.
    fn open_storage(dir: &std::path::Path, db: &Db, metrics: &Arc<Metrics>) -> Storage {
        let cfg = StorageConfig {
            max_size: 1 << 30,
            min_free: 0,
            gc_interval: Duration::from_secs(60),
            mirror: false,
            read_memory: 64 << 20,
            vital: crate::vital::Vital::unwatched(),
        };
        let store = Arc::new(LocalStore::new(&dir.join("store")));
        Storage::open(dir, db.clone(), store, cfg, metrics.clone()).unwrap()
    }

    /// The loop over `storage`'s pins, forgetting after 100 s.
    fn forgetting(db: &Db, storage: &Storage, metrics: Arc<Metrics>) -> Forgetting {
        Forgetting {
            db: db.clone(),
            storage: storage.clone(),
            me: Some([7; 32]),
            after_secs: 100,
            mirror: false,
            metrics,
        }
    }

    /// The walk keeps every path of a pinned closure, even one nobody holds (the storage's
    /// pinned set reaches it); unpinning brings the walk back to the whole closure, which
    /// it had passed, and the dead ones go. A path recorded after the pin joins the closure
    /// within a minute, when the storage's housekeeping recomputes it.
    #[tokio::test(start_paused = true)]
    async fn a_pinned_closure_is_kept_until_unpinned_then_its_dead_paths_go() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("narmesh.redb")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let storage = open_storage(t.path(), &db, &metrics);
        let (root, dep, late) = ("a".repeat(32), "b".repeat(32), "c".repeat(32));
        // The root is held by a peer; its dependency by nobody.
        db.record_remote(
            vec![
                claim(&root, 1, &format!("{dep}-x {late}-x"), true),
                claim(&dep, 2, "", false),
            ],
            None,
            false,
            None,
        )
        .unwrap();
        storage.pin(vec![root.clone()], true).await.unwrap();
        assert!(storage.pinned_nars().contains(&[2; 32]));
        // Recorded after the pin, dead too: pinned once the closure is recomputed.
        db.record_remote(vec![claim(&late, 3, "", false)], None, false, None)
            .unwrap();
        assert!(!storage.pinned_nars().contains(&[3; 32]));
        let cancel = CancellationToken::new();
        let housekeeping = tokio::spawn(storage.clone().run(cancel.clone()));
        // (The paused clock does not move while the housekeeping's blocking work runs.)
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(storage.pinned_nars().contains(&[3; 32]));
        cancel.cancel();
        housekeeping.await.unwrap();
        let f = forgetting(&db, &storage, metrics);
        f.round(1000).await;
        f.round(1100).await;
        for h in [&root, &dep, &late] {
            assert!(db.path(h).unwrap().is_some(), "{h} is in a pinned closure");
        }
        storage.pin(vec![root.clone()], false).await.unwrap();
        assert!(storage.pinned_nars().is_empty());
        f.round(1200).await;
        f.round(1300).await;
        assert!(db.path(&root).unwrap().is_some(), "a peer holds it");
        for h in [&dep, &late] {
            assert_eq!(db.path(h).unwrap(), None, "{h}: nobody holds it, unpinned");
        }
    }

    /// `forget-after-secs = 0` forgets nothing, however long the node runs, and the loop ends
    /// only when cancelled (it is vital work: its end would stop the node).
    #[tokio::test]
    async fn forgetting_off_forgets_nothing_and_runs_until_cancelled() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("narmesh.redb")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let storage = open_storage(t.path(), &db, &metrics);
        let dead = "d".repeat(32);
        db.record_remote(vec![claim(&dead, 4, "", false)], None, false, None)
            .unwrap();
        let f = Forgetting {
            after_secs: 0,
            ..forgetting(&db, &storage, metrics)
        };
        let cancel = CancellationToken::new();
        let run = tokio::spawn(f.run(cancel.clone()));
        // Were it on, rounds would run every second (its shortest step) and forget the dead
        // record at the second.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!run.is_finished(), "the loop ended by itself");
        cancel.cancel();
        run.await.unwrap();
        assert!(db.path(&dead).unwrap().is_some(), "a record was forgotten");
    }

    /// An unpin whose commit was made but whose closure the walk was not brought back to (the
    /// process killed in between) is finished when the storage opens at the next start: the
    /// dead dependency, passed while pinned, still goes.
    #[tokio::test]
    async fn an_unpin_cut_short_by_a_crash_is_finished_at_the_next_start() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("narmesh.redb")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let storage = open_storage(t.path(), &db, &metrics);
        let (root, dep) = ("a".repeat(32), "b".repeat(32));
        db.record_remote(
            vec![
                claim(&root, 1, &format!("{dep}-x"), true),
                claim(&dep, 2, "", false),
            ],
            None,
            false,
            None,
        )
        .unwrap();
        storage.pin(vec![root.clone()], true).await.unwrap();
        let f = forgetting(&db, &storage, metrics.clone());
        f.round(1000).await;
        f.round(1100).await;
        assert!(db.path(&dep).unwrap().is_some(), "in a pinned closure");
        // The unpin's commit, and nothing after it.
        db.set_pins(std::slice::from_ref(&root), false).unwrap();
        assert_eq!(db.unpinned(10).unwrap(), vec![root.clone()]);
        drop((f, storage));
        let storage = open_storage(t.path(), &db, &metrics);
        assert!(storage.pinned_nars().is_empty());
        assert!(db.unpinned(10).unwrap().is_empty(), "done at the start");
        let f = forgetting(&db, &storage, metrics);
        f.round(1200).await;
        f.round(1300).await;
        assert!(db.path(&root).unwrap().is_some(), "a peer holds it");
        assert_eq!(db.path(&dep).unwrap(), None, "nobody holds it, unpinned");
    }
}
