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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Forgetting {
    /// How often a step runs.
    fn every(&self) -> Duration {
        Duration::from_secs(self.after_secs / 8)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600))
    }

    /// Step until cancelled (at once: the first step's mark starts the clock).
    pub async fn run(self, cancel: CancellationToken) {
        if self.after_secs == 0 {
            return;
        }
        let every = self.every();
        loop {
            self.round().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Steps until the walk has caught up with what is old enough.
    async fn round(&self) {
        loop {
            let (db, me, after, mirror) = (self.db.clone(), self.me, self.after_secs, self.mirror);
            let pinned = self.storage.pinned_nars();
            let step = tokio::task::spawn_blocking(move || {
                db.forget_dead(ForgetStep {
                    me: me.as_ref(),
                    now: now_secs(),
                    after,
                    limit: BATCH,
                    mirror,
                    pinned: &pinned,
                })
            })
            .await;
            match step {
                Ok(Ok(done)) => {
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
                Ok(Err(e)) => {
                    tracing::warn!("forgetting dead records: {e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!("forgetting dead records: {e}");
                    return;
                }
            }
        }
    }
}
