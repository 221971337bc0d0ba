//! A small pool of threads for bulk CPU work (hashing NARs, compressing them), run at a lower
//! scheduling priority (nice 10): a build host's builds and the node's own latency-bound work
//! (acknowledging a hook, answering Nix) come first. A leaf module.

use std::sync::{Arc, Mutex, mpsc};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The nice value background threads run at.
pub const NICE: i32 = 10;

/// A fixed set of low-priority threads taking jobs in order.
#[derive(Clone, Debug)]
pub struct Background {
    tx: mpsc::Sender<Job>,
}

impl Background {
    /// Start `threads` threads named `name`.
    pub fn new(name: &str, threads: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                            guard.recv()
                        };
                        match job {
                            // A job that panics is its caller's failure (`run` answers
                            // `None`), not the thread's: the pool keeps its threads.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("starting a {name} thread: {e}");
            }
        }
        Background { tx }
    }

    /// Run `f` on the pool; its result arrives when it is done (`None` if the pool is gone or
    /// `f` panicked).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx.send(job).ok()?;
        rx.await.ok()
    }
}

/// Lower the calling thread's priority to [`NICE`] (threads it starts inherit it).
pub fn lower_priority() {
    set_nice(NICE)
}

/// Set the calling thread's nice value (threads it starts inherit it); a failure is logged.
pub fn set_nice(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::debug!("setting a thread's priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_return_their_results() {
        let bg = Background::new("test", 2);
        let results = futures::future::join_all((0..8u64).map(|i| bg.run(move || i * i))).await;
        assert_eq!(results, (0..8u64).map(|i| Some(i * i)).collect::<Vec<_>>());
        let nice = bg
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await;
        assert!(matches!(nice, Some(Ok(n)) if n >= NICE));
    }

    /// A job that panics answers `None`, and the thread that ran it goes on with the next
    /// jobs (a pool of one thread would otherwise be gone, and every later job with it).
    #[tokio::test]
    async fn a_panicking_job_leaves_its_thread_running() {
        let bg = Background::new("test", 1);
        for _ in 0..3 {
            assert_eq!(bg.run(|| -> u8 { panic!("a job panics") }).await, None);
            assert_eq!(bg.run(|| 7).await, Some(7));
        }
    }
}
