//! The run's clock: the hook calls that feed the origin (`--concurrency` at a time, spread over
//! `--duration`), and the watchers that stamp when each path became servable on each node
//! (batched lookups over its socket) and when its narinfo reached the bucket. Every stamp is an
//! `Instant` from this process's clock.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use narmesh_proto::control::{Request, Response};

use super::BenchArgs;
use super::cluster::Node;
use super::s3;
use super::synth::WorkPath;
use crate::client::Client;

/// When each path reached each place, as `Instant`s from one clock.
pub struct Timeline {
    pub hook_start: Vec<OnceLock<Instant>>,
    pub hook_end: Vec<OnceLock<Instant>>,
    /// `[node][path]`: the first lookup that found the path servable.
    pub servable: Vec<Vec<OnceLock<Instant>>>,
    pub in_bucket: Vec<OnceLock<Instant>>,
}

impl Timeline {
    pub fn new(paths: usize, nodes: usize) -> Self {
        let col = || (0..paths).map(|_| OnceLock::new()).collect::<Vec<_>>();
        Timeline {
            hook_start: col(),
            hook_end: col(),
            servable: (0..nodes).map(|_| col()).collect(),
            in_bucket: col(),
        }
    }
}

/// The hook as Nix starts it for `origin`, without a derivation, output and stdio.
fn hook_command(hook: &Path, origin: &Node) -> std::process::Command {
    let mut c = std::process::Command::new(hook);
    c.env_remove("DRV_PATH")
        .env("NARMESH_SOCKET", origin.socket())
        .env("NARMESH_SPOOL", origin.spool())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// Clears its flag when dropped.
struct ClearOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Run the real hook once per path against `origin`, `--concurrency` at a time, each at its
/// scheduled time when `--duration` spreads them. Returns the floor's samples (the hook
/// started with nothing to report, during the same burst).
pub fn feed(
    args: &BenchArgs,
    hook: &Path,
    origin: &Node,
    work: &[WorkPath],
    tl: &Timeline,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Duration>> {
    let next = AtomicUsize::new(0);
    let feeding = std::sync::atomic::AtomicBool::new(true);
    let floor: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let start = Instant::now();
    let step = Duration::from_secs_f64(args.duration.max(0.0) / work.len() as f64);
    std::thread::scope(|s| {
        // The floor under the hook's figure, in the same burst: the same binary started the
        // same way with nothing to report (it exits at once), every 5 ms while the builds are
        // reported, at least once.
        s.spawn(|| {
            loop {
                let t0 = Instant::now();
                let ok = hook_command(hook, origin)
                    .env_remove("OUT_PATHS")
                    .status()
                    .is_ok();
                if ok {
                    floor
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t0.elapsed());
                }
                if !feeding.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // However the feeders end (a thread that cannot start panics here), the floor stops.
        let _stop_floor = ClearOnDrop(&feeding);
        let feeders: Vec<_> = (0..args.concurrency.min(work.len()))
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= work.len() {
                            return;
                        }
                        let due = start + step * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let t0 = Instant::now();
                        let _ = tl.hook_start[i].set(t0);
                        let res = hook_command(hook, origin)
                            .env("OUT_PATHS", work[i].path.full())
                            .status();
                        let _ = tl.hook_end[i].set(Instant::now());
                        if let Err(e) = res {
                            *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("running {}: {e}", hook.display()));
                        }
                        progress.inc(1);
                    }
                })
            })
            .collect();
        for f in feeders {
            let _ = f.join();
        }
    });
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => anyhow::bail!(e),
        None => Ok(floor.into_inner().unwrap_or_else(|e| e.into_inner())),
    }
}

/// Ask node `k` which of the reported paths it serves, in batched lookups, until it serves
/// all or the deadline (set once the builds are done) passes.
pub fn watch_node(
    socket: &Path,
    k: usize,
    paths: &[String],
    tl: &Timeline,
    deadline: &OnceLock<Instant>,
) -> anyhow::Result<()> {
    // The watchers are the bench's, not the host's: they yield to the hooks and the nodes.
    crate::background::set_nice(crate::background::NICE);
    let mut client = Client::connect(socket)?;
    let col = &tl.servable[k];
    loop {
        let pending: Vec<usize> = (0..paths.len())
            .filter(|&i| col[i].get().is_none() && tl.hook_start[i].get().is_some())
            .collect();
        if col.iter().all(|t| t.get().is_some()) {
            return Ok(());
        }
        if deadline.get().is_some_and(|d| Instant::now() > *d) {
            return Ok(());
        }
        if !pending.is_empty() {
            let ask = pending.iter().map(|&i| paths[i].clone()).collect();
            let Response::Known { recorded } = client.call(Request::Lookup { paths: ask })? else {
                anyhow::bail!("node {k} answered a lookup with something else");
            };
            let now = Instant::now();
            for (&i, ok) in pending.iter().zip(recorded) {
                if ok {
                    let _ = col[i].set(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(WATCH_EVERY_MS));
    }
}

/// How often a watcher asks its node (each ask is served by the node's front thread, the one
/// that acknowledges hooks).
const WATCH_EVERY_MS: u64 = 10;

/// List the bucket's narinfos until every path's is there or the deadline passes. A listing
/// that fails or hangs (10 s) is retried; the last failure is reported if paths are missing.
pub fn watch_bucket(
    probe: &s3::Probe,
    work: &[WorkPath],
    tl: &Timeline,
    deadline: &OnceLock<Instant>,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let keys: Vec<String> = work
        .iter()
        .map(|p| format!("{}.narinfo", p.path.hash_part()))
        .collect();
    let mut last_error = None;
    loop {
        if tl.in_bucket.iter().all(|t| t.get().is_some()) {
            return Ok(());
        }
        if deadline.get().is_some_and(|d| Instant::now() > *d) {
            return match last_error {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
        let listed = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), probe.narinfo_keys(""))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("listing the bucket: no answer in 10 s")))
        });
        match listed {
            Ok(present) => {
                let present: std::collections::HashSet<String> = present.into_iter().collect();
                let now = Instant::now();
                for (i, k) in keys.iter().enumerate() {
                    if present.contains(k) {
                        let _ = tl.in_bucket[i].set(now);
                    }
                }
            }
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
