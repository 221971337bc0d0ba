//! The durable queue writer: an actor that group-commits reports into the queue's journal
//! (`db::journal`), so a burst of hook calls shares one fsync. A report is acknowledged only after its commit. It runs on the
//! front's own thread and commits there, blocking it (reports arriving meanwhile wait in the
//! socket and join the next group): handing each commit to a blocking-pool thread and back
//! cost two wake-ups, each a wait for a CPU on a loaded build host (hook p99 6.7 against 4.7
//! ms in `narmesh bench`, BENCHMARKS.md).

use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::db::{Db, QueueItem};

type Reply = oneshot::Sender<Result<(), String>>;

/// Handle to the queue writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    tx: mpsc::Sender<(Vec<QueueItem>, Reply)>,
}

/// Reports merged into one commit at the most.
const MAX_GROUP: usize = 512;

impl QueueHandle {
    /// Start the writer on the current runtime (the front's: its commits block that thread);
    /// `wake` is notified after every commit (the pipeline listens).
    pub fn spawn(
        db: Db,
        wake: Arc<Notify>,
        metrics: Arc<crate::metrics::Metrics>,
        guard: crate::vital::Guard,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(crate::vital::watched(guard, run(db, rx, wake, metrics)));
        (QueueHandle { tx }, task)
    }

    /// Durably queue `items`; returns once they are committed (fsync'd).
    pub async fn enqueue(&self, items: Vec<QueueItem>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((items, reply))
            .await
            .map_err(|_| "the node is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the node is shutting down".to_owned())?
    }
}

async fn run(
    db: Db,
    mut rx: mpsc::Receiver<(Vec<QueueItem>, Reply)>,
    wake: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let items: Vec<QueueItem> = group.iter().flat_map(|(i, _)| i.iter().cloned()).collect();
        let res = {
            let t = std::time::Instant::now();
            let r = db.enqueue(&items);
            metrics
                .queue_commit_seconds
                .observe(t.elapsed().as_secs_f64());
            if r.is_ok() {
                crate::killpoint::reach("queue.appended");
            }
            r.map_err(|e| e.to_string())
        };
        match &res {
            Err(e) => {
                tracing::error!("queue commit failed: {e}");
                metrics.problem(
                    "queue",
                    Some(format!(
                        "hook reports cannot be recorded (hooks spool): {e}"
                    )),
                );
            }
            Ok(()) => metrics.problem("queue", None),
        }
        for (_, reply) in group {
            let _ = reply.send(res.clone());
        }
        wake.notify_one();
    }
}
