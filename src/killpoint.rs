//! Named points in ingest, storage, mirroring and the mesh's catch-up where a test can make
//! the node die at once (SIGKILL to itself, as a crash or power cut would).
//! `NARMESH_TEST_KILL_AT=NAME` (or `NAME:N`, the Nth time the point is reached) arms one
//! point; unset, each point costs one load of a cached value. The fault-injection test loops over [`POINTS`] and checks that,
//! after a restart, nothing acknowledged is missing and the bucket is closure-complete;
//! [`MESH_POINTS`] have tests of their own.
//!
//! Beside them, [`FAULTS`]: points where a test makes one step fail in a way no real part
//! produces on demand (an upload task panicking, a database commit refused), so the node's
//! recovery from it is tested, or one step hang for good ([`hang`]: blocked work, for the
//! watchdog). `NARMESH_TEST_FAULT=NAME:N[,NAME:N...]` fails each named point the first N times
//! it is reached.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every point, in the order a path passes them.
pub const POINTS: &[&str] = &[
    // The queue's append is fsync'd; the hook has not been answered yet.
    "queue.appended",
    // A NAR was hashed (and stored or found in the Nix store); its record is not committed.
    "pipeline.hashed",
    // The records are committed and their reports marked done; nothing announced yet.
    "pipeline.recorded",
    // A NAR fetched from a peer is complete on disk; not yet renamed into place nor recorded.
    "storage.fetched",
    // A multipart NAR upload is created in the bucket; the mirror has not recorded its id.
    "mirror.upload-created",
    // One part of a multipart NAR upload is in the bucket; the upload is not complete.
    "mirror.part-uploaded",
    // A NAR is in the bucket; the mirror's outbox does not know it yet.
    "mirror.nar-stored",
    // A narinfo is in the bucket; the outbox does not know it yet.
    "mirror.narinfo-put",
];

/// Points in the mesh's catch-up, each with a test of its own (the loop over [`POINTS`]
/// builds and mirrors; it would not reach these).
pub const MESH_POINTS: &[&str] = &[
    // Reviewing a peer's whole log: a batch was confirmed and taken in, and the cursor moved
    // past it; the review has not ended.
    "mesh.review-batch-taken",
];

fn listed(name: &str) -> bool {
    POINTS.contains(&name) || MESH_POINTS.contains(&name)
}

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("NARMESH_TEST_KILL_AT").ok()?;
            let (name, nth) = match v.split_once(':') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (v, 1),
            };
            if !listed(&name) {
                tracing::error!("NARMESH_TEST_KILL_AT: no kill point {name:?}");
            }
            Some(Armed {
                name,
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Die here if this point is armed (and reached for the Nth time).
pub fn reach(name: &'static str) {
    debug_assert!(listed(name), "unlisted kill point {name}");
    let Some(a) = armed() else { return };
    if a.name == name && a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
        eprintln!("narmesh: killed at {name} (NARMESH_TEST_KILL_AT)");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// Fault points, each with a test of its own.
pub const FAULTS: &[&str] = &[
    // A mirror task uploading a NAR panics before it starts.
    "mirror.nar-task-panics",
    // A mirror task putting a narinfo panics before it starts.
    "mirror.narinfo-task-panics",
    // The mirror's commit of a round of finished uploads fails.
    "mirror.commit-fails",
    // A round of catch-up with a peer panics before it asks anything.
    "mesh.catch-up-round-panics",
    // A dial of a peer for NAR transfer panics before it connects.
    "mesh.dial-panics",
    // Recording announcements from a peer (gossip or a catch-up batch) fails: the node's own
    // database did not take them.
    "mesh.record-fails",
    // An eager node's look at the record a wish is for fails (its database did not answer).
    "mesh.eager-lookup-fails",
    // A batch of reports is planned 3 s late: a window in which a test locks the Nix store
    // database between a report's acknowledgement and its planning.
    "pipeline.plan-late",
    // The pipeline panics at a batch of reports it has not planned yet.
    "pipeline.panics",
    // Answering `/nix-cache-info` blocks the HTTP cache's thread for good (as a blocking call
    // in a task would): the watchdog's to see.
    "http.hangs",
    // Taking in a hook report blocks the front's thread for good.
    "front.hangs",
    // A pin's database write blocks for good, holding its write transaction (every other
    // write waits behind it; the runtimes still run).
    "db.write-hangs",
];

/// Block this thread for good (a fault point's hung work): only a kill ends it.
pub fn hang() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

struct Fault {
    name: String,
    times: u64,
    seen: AtomicU64,
}

fn faults() -> &'static [Fault] {
    static FAULTS_ARMED: OnceLock<Vec<Fault>> = OnceLock::new();
    FAULTS_ARMED.get_or_init(|| {
        let Ok(v) = std::env::var("NARMESH_TEST_FAULT") else {
            return Vec::new();
        };
        v.split(',')
            .filter(|f| !f.is_empty())
            .map(|f| {
                let (name, times) = match f.split_once(':') {
                    Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                    None => (f.to_owned(), 1),
                };
                if !FAULTS.contains(&name.as_str()) {
                    tracing::error!("NARMESH_TEST_FAULT: no fault point {name:?}");
                }
                Fault {
                    name,
                    times,
                    seen: AtomicU64::new(0),
                }
            })
            .collect()
    })
}

/// True if this fault point is armed and has failed fewer times than it was asked to: the
/// caller fails the step.
pub fn fault(name: &'static str) -> bool {
    debug_assert!(FAULTS.contains(&name), "unlisted fault point {name}");
    faults().iter().any(|f| {
        f.name == name && f.seen.fetch_add(1, Ordering::SeqCst) < f.times && {
            tracing::warn!("fault injected at {name} (NARMESH_TEST_FAULT)");
            true
        }
    })
}
