//! The node's vital work: the tasks and threads that must run as long as the node does (the
//! front that acknowledges hooks, the pipeline, the HTTP cache, the storage's housekeeping and
//! recording, the mesh's gossip, catch-up and eager fetches, the mirror). Each holds a
//! [`Guard`]; one that ends before the node is stopping (a panic, or a return on an error it
//! could not get past) reports it here, and the node then stops with a failure, so that its
//! service manager starts it again (`Restart=on-failure`): everything acknowledged is durable,
//! and a restart picks up the work where it stopped. Without this, a node whose pipeline
//! panicked would go on acknowledging hooks and never ingest them, with nothing to say so.

use std::future::Future;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A vital task or thread that ended while the node was not stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub name: &'static str,
    /// It ended by panicking.
    pub panicked: bool,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(f, "{} {how} while the node was running", self.name)
    }
}

/// Hands out guards; cheap to clone.
#[derive(Debug, Clone)]
pub struct Vital {
    /// `None`: nobody watches (a command that is not the node, a test).
    ended: Option<mpsc::UnboundedSender<Ended>>,
    stopping: CancellationToken,
}

/// Held by a vital task or thread for as long as it runs: dropped (by its end, or while a
/// panic unwinds it) before `stopping` is cancelled, it reports the end.
#[derive(Debug)]
pub struct Guard {
    name: &'static str,
    vital: Vital,
}

impl Vital {
    /// Guards whose ends before `stopping` is cancelled arrive on the receiver.
    pub fn new(stopping: CancellationToken) -> (Self, mpsc::UnboundedReceiver<Ended>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Vital {
                ended: Some(tx),
                stopping,
            },
            rx,
        )
    }

    /// Guards nobody watches.
    pub fn unwatched() -> Self {
        Vital {
            ended: None,
            stopping: CancellationToken::new(),
        }
    }

    pub fn guard(&self, name: &'static str) -> Guard {
        Guard {
            name,
            vital: self.clone(),
        }
    }

    /// Spawn `fut` on the current runtime as vital work named `name`.
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(watched(self.guard(name), fut))
    }
}

/// `fut`, holding `guard` while it runs.
pub async fn watched<F: Future>(guard: Guard, fut: F) -> F::Output {
    let _guard = guard;
    fut.await
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.vital.stopping.is_cancelled() {
            return;
        }
        if let Some(tx) = &self.vital.ended {
            let _ = tx.send(Ended {
                name: self.name,
                panicked: std::thread::panicking(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_end_before_stopping_is_reported_and_one_after_is_not() {
        let stopping = CancellationToken::new();
        let (vital, mut ended) = Vital::new(stopping.clone());
        // A task that panics, one that returns, and a thread that panics.
        let panics = vital.spawn("panics", async { panic!("a vital task panics (test)") });
        assert!(panics.await.is_err());
        assert_eq!(
            ended.recv().await,
            Some(Ended {
                name: "panics",
                panicked: true
            })
        );
        vital.spawn("returns", async {}).await.unwrap();
        assert_eq!(
            ended.recv().await,
            Some(Ended {
                name: "returns",
                panicked: false
            })
        );
        let g = vital.guard("thread");
        let t = std::thread::spawn(move || {
            let _g = g;
            panic!("a vital thread panics (test)");
        });
        assert!(t.join().is_err());
        assert_eq!(
            ended.recv().await,
            Some(Ended {
                name: "thread",
                panicked: true
            })
        );
        // Once the node stops, ends are what is expected.
        let runs = vital.spawn("runs", {
            let s = stopping.clone();
            async move { s.cancelled().await }
        });
        stopping.cancel();
        runs.await.unwrap();
        drop(vital);
        assert_eq!(ended.recv().await, None, "nothing reported while stopping");
        // Unwatched guards report to nobody.
        drop(Vital::unwatched().guard("alone"));
    }
}
