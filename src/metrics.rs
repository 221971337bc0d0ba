//! The node's Prometheus metrics: one registry, owned here, rendered at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of HTTP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

/// A part of the node that can have a problem (`narmesh status` says what it is).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabels {
    pub part: &'static str,
}

/// The parts that report problems: each has its `narmesh_problem` series from the start (0), so
/// an alert on it never waits for a first problem.
pub const PARTS: &[&str] = &[
    "database", "mirror", "pipeline", "queue", "runtime", "spool", "storage",
];

/// Why the mesh refuses something from a peer: each has its `narmesh_mesh_refused_total`
/// series from the start (0), so `increase()` sees a peer's first refusal too.
pub const REFUSALS: &[&str] = &[
    // Announcements and catch-up entries.
    "bad-narinfo",
    "size-mismatch",
    "untrusted-signature",
    "unbound-blake3",
    "too-large",
    "too-many-entries",
    "undecodable",
    "inconsistent-batch",
    // Connections and requests.
    "bad-request",
    "too-many-connections",
    "unknown-ticket",
];

/// The node's runtimes, as the watchdog probes them: `front` (hook acknowledgements), `http`
/// (the cache), `main` (the pipeline, the mesh, the mirror). Each has its
/// `narmesh_runtime_lag_seconds` series from the start.
pub const RUNTIMES: &[&str] = &["front", "http", "main"];

/// Raise a counter to `total`, a count kept elsewhere (the database's), never lowering it
/// (in one step: threads publishing at once never add the same difference twice).
pub fn raise_to(counter: &Counter, total: u64) {
    counter
        .inner()
        .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
}

/// One of [`RUNTIMES`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: &'static str,
}

/// How a hook report named its outputs: `named` (Nix filled `OUT_PATHS`) or `from-derivation`
/// (Nix 2.8 leaves it empty; the node reads the derivation's outputs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub outputs: &'static str,
}

/// Labels of HTTP latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// Counts one of something in a gauge for as long as it lives (a transfer running, a stream
/// being served).
#[derive(Debug)]
pub struct Counted(Gauge);

impl Counted {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        Counted(g.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Register `metric` as `name`, and note the name.
fn register(
    (registry, names): (&mut Registry, &mut Vec<&'static str>),
    name: &'static str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    names.push(name);
    registry.register(name, help, metric);
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// The names registered, without the prefix.
    names: Vec<&'static str>,
    pub queue_depth: Gauge,
    pub paths_recorded: Counter,
    pub nar_bytes: Counter,
    pub ingest_failures: Counter,
    pub hook_reports: Family<HookLabels, Counter>,
    /// Hook reports acknowledged before the store database could confirm their paths.
    pub hook_unchecked: Counter,
    pub socket_errors: Counter,
    pub spool_taken: Counter,
    pub spool_deferred: Counter,
    /// Report files waiting in the spool, as of the node's last look.
    pub spool_waiting: Gauge,
    /// Report files kept in the spool's `rejected/`, as of the node's last look.
    pub spool_rejected: Gauge,
    /// Spool files refused for good (set aside or removed), counted as it happens: the gauge
    /// above stops growing at its bound.
    pub spool_refused: Counter,
    pub batch_seconds: Histogram,
    /// From a hook report's last byte to its acknowledgement (validation and the fsync'd queue
    /// commit).
    pub hook_ack_seconds: Histogram,
    pub queue_commit_seconds: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_seconds: Family<RouteLabels, Histogram>,
    pub mirror_pending_paths: Gauge,
    pub mirror_upload_slots: Gauge,
    pub mirror_pending_bytes: Gauge,
    /// Paths the mirror waits for whose NAR no node holds any more.
    pub mirror_orphaned_paths: Gauge,
    pub mirror_uploaded_paths: Counter,
    pub mirror_uploaded_bytes: Counter,
    pub mirror_failures: Counter,
    pub mirror_streamed_nars: Counter,
    pub mirror_shared_nars: Counter,
    /// Bucket audits completed.
    pub mirror_audits: Counter,
    /// Completed paths an audit found the bucket had lost something of.
    pub mirror_audit_lost: Counter,
    pub storage_file_bytes: Gauge,
    pub storage_cap_bytes: Gauge,
    pub storage_own_paths: Gauge,
    pub storage_evictions: Counter,
    pub storage_gc_lost: Counter,
    /// Times every own path was looked up in the local Nix store (after something left it).
    pub storage_own_checks: Counter,
    pub storage_read_buffered_bytes: Gauge,
    /// Records of paths nobody held any more, forgotten.
    pub records_forgotten: Counter,
    pub served_bytes: Family<SourceLabels, Counter>,
    pub mesh_refused: Family<ReasonLabels, Counter>,
    /// Verified NAR bytes fetched, by the provider that sent them.
    pub mesh_fetched_bytes: Family<PeerLabels, Counter>,
    /// Of those, the bytes that came over providers' bulk channels (TCP).
    pub mesh_bulk_bytes: Counter,
    /// NAR transfers from peers running now (eager and on demand), past their slot.
    pub mesh_transfers: Gauge,
    /// Fetches that waited for a transfer slot and were dropped there: whoever wanted the
    /// bytes (an HTTP client) had gone.
    pub mesh_transfers_dropped: Counter,
    /// Transfers waiting for one of the 32 slots.
    pub mesh_transfers_queued: Gauge,
    /// Ranges of NARs being fetched from peers now (each buffers up to 2 MiB; `[mesh]
    /// fetch-memory` caps them).
    pub mesh_ranges: Gauge,
    /// Bytes of `[mesh] fetch-memory` the leaves of running transfers hold.
    pub mesh_leaves_bytes: Gauge,
    /// Streams of NAR bytes (ranges, leaves, whole NARs; QUIC and bulk) this node serves to
    /// peers now.
    pub mesh_serving: Gauge,
    /// Records new or changed by what peers said (gossip and catch-up): flat once the mesh
    /// has settled.
    pub mesh_records_changed: Counter,
    /// How long each runtime's last probe waited to run (or the one waiting now has).
    pub runtime_lag: Family<RuntimeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// How long the database has had writes in flight and none ended (0 when none is).
    pub database_stall: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// What is wrong now, by part ("queue", "pipeline", ...), for `narmesh status`.
    problems: std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
    /// The same, 1 while a part has a problem, for alerts.
    problem: Family<PartLabels, Gauge>,
}

/// Why the mesh refused something from a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A peer, by endpoint id (only allowed peers send NAR bytes, so these are few).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Where served NAR bytes came from: `store` (an own path, serialized from the Nix store),
/// `file` (a NAR file of the storage) or `peer` (fetched while the client waited).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Count one refusal of the mesh (`narmesh_mesh_refused_total{reason}`).
    pub fn refused(&self, reason: &'static str) {
        debug_assert!(REFUSALS.contains(&reason), "{reason} is not in REFUSALS");
        self.mesh_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("narmesh");
        let mut names = Vec::new();
        let m = Metrics {
            queue_depth: Gauge::default(),
            paths_recorded: Counter::default(),
            nar_bytes: Counter::default(),
            ingest_failures: Counter::default(),
            hook_reports: Family::default(),
            hook_unchecked: Counter::default(),
            socket_errors: Counter::default(),
            spool_taken: Counter::default(),
            spool_deferred: Counter::default(),
            spool_waiting: Gauge::default(),
            spool_rejected: Gauge::default(),
            spool_refused: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            hook_ack_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            queue_commit_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 2.0, 16))
            }),
            mirror_pending_paths: Gauge::default(),
            mirror_upload_slots: Gauge::default(),
            mirror_pending_bytes: Gauge::default(),
            mirror_orphaned_paths: Gauge::default(),
            mirror_uploaded_paths: Counter::default(),
            mirror_uploaded_bytes: Counter::default(),
            mirror_failures: Counter::default(),
            mirror_streamed_nars: Counter::default(),
            mirror_shared_nars: Counter::default(),
            mirror_audits: Counter::default(),
            mirror_audit_lost: Counter::default(),
            storage_file_bytes: Gauge::default(),
            storage_cap_bytes: Gauge::default(),
            storage_own_paths: Gauge::default(),
            storage_evictions: Counter::default(),
            storage_gc_lost: Counter::default(),
            storage_own_checks: Counter::default(),
            storage_read_buffered_bytes: Gauge::default(),
            records_forgotten: Counter::default(),
            served_bytes: Family::default(),
            mesh_refused: Family::default(),
            mesh_fetched_bytes: Family::default(),
            mesh_bulk_bytes: Counter::default(),
            mesh_transfers: Gauge::default(),
            mesh_transfers_dropped: Counter::default(),
            mesh_transfers_queued: Gauge::default(),
            mesh_serving: Gauge::default(),
            mesh_ranges: Gauge::default(),
            mesh_leaves_bytes: Gauge::default(),
            mesh_records_changed: Counter::default(),
            problems: Default::default(),
            problem: Family::default(),
            runtime_lag: Family::default(),
            database_stall: Gauge::default(),
            registry: Registry::default(),
            names: Vec::new(),
        };
        register(
            (&mut registry, &mut names),
            "queue_depth",
            "Reports waiting in the durable queue",
            m.queue_depth.clone(),
        );
        register(
            (&mut registry, &mut names),
            "paths_recorded",
            "Store paths recorded, signed and servable",
            m.paths_recorded.clone(),
        );
        register(
            (&mut registry, &mut names),
            "nar_bytes",
            "NAR bytes recorded",
            m.nar_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "ingest_failures",
            "Paths that could not be ingested",
            m.ingest_failures.clone(),
        );
        register(
            (&mut registry, &mut names),
            "hook_reports",
            "Hook reports received on the socket, by how they named their outputs",
            m.hook_reports.clone(),
        );
        register(
            (&mut registry, &mut names),
            "hook_unchecked",
            "Hook reports acknowledged before the Nix store database could confirm their paths \
             (another process held it locked); the pipeline checks them once it answers",
            m.hook_unchecked.clone(),
        );
        register(
            (&mut registry, &mut names),
            "socket_errors",
            "Malformed frames on the socket",
            m.socket_errors.clone(),
        );
        register(
            (&mut registry, &mut names),
            "spool_taken",
            "Spooled hook reports taken in",
            m.spool_taken.clone(),
        );
        register(
            (&mut registry, &mut names),
            "spool_deferred",
            "Spool rounds stopped by a transient failure (the reports wait and are tried again)",
            m.spool_deferred.clone(),
        );
        register(
            (&mut registry, &mut names),
            "spool_waiting",
            "Hook reports waiting in the spool (the node was down or did not answer in time)",
            m.spool_waiting.clone(),
        );
        register(
            (&mut registry, &mut names),
            "spool_rejected",
            "Spooled files set aside for good in the spool's rejected/ (kept for inspection)",
            m.spool_rejected.clone(),
        );
        register(
            (&mut registry, &mut names),
            "spool_refused",
            "Spooled files refused for good (malformed, not a report file, or naming paths no \
             longer valid): set aside in rejected/, or removed",
            m.spool_refused.clone(),
        );
        for reason in REFUSALS {
            m.mesh_refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        for part in PARTS {
            m.problem.get_or_create(&PartLabels { part }).set(0);
        }
        for runtime in RUNTIMES {
            m.runtime_lag
                .get_or_create(&RuntimeLabels { runtime })
                .set(0.0);
        }
        register(
            (&mut registry, &mut names),
            "problem",
            "1 while a part of the node has a problem (`narmesh status` says what), else 0",
            m.problem.clone(),
        );
        register(
            (&mut registry, &mut names),
            "runtime_lag_seconds",
            &format!(
                "How long the watchdog's last probe of each runtime (front: hook \
                 acknowledgements; http: the cache; main: pipeline, mesh, mirror) waited to run, \
                 or its probe waiting now has: past {} s (or half of WatchdogSec=) the runtime \
                 has stalled",
                crate::watchdog::STALLED.as_secs()
            ),
            m.runtime_lag.clone(),
        );
        register(
            (&mut registry, &mut names),
            "database_stall_seconds",
            &format!(
                "How long the database has had writes in flight and none ended (0 when none is \
                 in flight): past {} s (or half of WatchdogSec=) the database has stalled",
                crate::watchdog::STALLED.as_secs()
            ),
            m.database_stall.clone(),
        );
        register(
            (&mut registry, &mut names),
            "pipeline_batch_seconds",
            "Time to ingest one batch",
            m.batch_seconds.clone(),
        );
        register(
            (&mut registry, &mut names),
            "hook_ack_seconds",
            "Hook report received to acknowledged (validation and the fsync'd queue commit)",
            m.hook_ack_seconds.clone(),
        );
        register(
            (&mut registry, &mut names),
            "queue_commit_seconds",
            "One group commit of the durable queue, fsync included",
            m.queue_commit_seconds.clone(),
        );
        register(
            (&mut registry, &mut names),
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        register(
            (&mut registry, &mut names),
            "http_request_seconds",
            "HTTP request latency by route",
            m.http_seconds.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_pending_paths",
            "Paths not yet complete in the S3 mirror (mirror lag)",
            m.mirror_pending_paths.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_upload_slots",
            "Uploads the S3 mirror lets run at once now: [mirror.s3] concurrency, cut to 0.7x at \
             each SlowDown from the bucket and grown back by one with each run of successes",
            m.mirror_upload_slots.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_pending_bytes",
            "NAR bytes not yet in the S3 mirror",
            m.mirror_pending_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_orphaned_paths",
            "Paths the mirror waits for whose NAR no node holds any more (every holder's Nix GC \
             took it first): they, and what refers to them, wait until a node holds it again",
            m.mirror_orphaned_paths.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_uploaded_paths",
            "Paths completed in the S3 mirror",
            m.mirror_uploaded_paths.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_uploaded_bytes",
            "Compressed NAR bytes uploaded to the S3 mirror",
            m.mirror_uploaded_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_failures",
            "Failed S3 mirror attempts (each is retried)",
            m.mirror_failures.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_streamed_nars",
            "NARs the S3 mirror compressed while they still arrived from peers",
            m.mirror_streamed_nars.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_shared_nars",
            "Paths the S3 mirror pointed at an identical NAR already in the bucket (not uploaded again)",
            m.mirror_shared_nars.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_audits",
            "Audits of the bucket completed (mirror.s3.audit-secs)",
            m.mirror_audits.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mirror_audit_lost",
            "Completed paths an audit found the bucket had lost their narinfo or NAR of (put back when still held)",
            m.mirror_audit_lost.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_file_bytes",
            "Bytes of NAR files held (fetched from peers; within store.max-size)",
            m.storage_file_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_cap_bytes",
            "store.max-size: the cap on NAR file bytes",
            m.storage_cap_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_own_paths",
            "Own paths served from the local Nix store (no copy kept)",
            m.storage_own_paths.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_evictions",
            "NAR files evicted to stay within the cap",
            m.storage_evictions.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_gc_lost",
            "Own paths that left the local Nix store (Nix GC, nix-store --delete) or were found \
             changed there",
            m.storage_gc_lost.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_own_path_checks",
            "Times every own path was looked up in the local Nix store, after paths left it",
            m.storage_own_checks.clone(),
        );
        register(
            (&mut registry, &mut names),
            "storage_read_buffered_bytes",
            "Bytes of NARs read for clients, peers and the mirror and not yet handed on (within store.read-memory; past it, single chunk groups)",
            m.storage_read_buffered_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "records_forgotten",
            "Records of paths nobody held any more, forgotten ([store] forget-after-secs)",
            m.records_forgotten.clone(),
        );
        register(
            (&mut registry, &mut names),
            "served_nar_bytes",
            "NAR bytes served over HTTP and to peers, by where they came from",
            m.served_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_refused",
            "Announcements, catch-up entries, transfers and connections refused from peers, by reason",
            m.mesh_refused.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_fetched_bytes",
            "Verified NAR bytes fetched from peers, by provider (endpoint id)",
            m.mesh_fetched_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_bulk_bytes",
            "Verified NAR bytes fetched over providers' bulk channels (TCP)",
            m.mesh_bulk_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_transfers",
            "NAR transfers from peers running now (eager and on demand)",
            m.mesh_transfers.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_transfers_dropped",
            "Fetches dropped while waiting for a transfer slot, nobody wanting their bytes any more",
            m.mesh_transfers_dropped.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_transfers_queued",
            "NAR transfers from peers waiting for one of the 32 slots",
            m.mesh_transfers_queued.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_ranges",
            "Ranges of NARs being fetched from peers now, each buffering up to 2 MiB ([mesh] fetch-memory caps them)",
            m.mesh_ranges.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_leaves_bytes",
            "Bytes of [mesh] fetch-memory the leaves of the NARs being fetched from peers hold",
            m.mesh_leaves_bytes.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_serving",
            "Streams of NAR bytes served to peers now (QUIC and bulk)",
            m.mesh_serving.clone(),
        );
        register(
            (&mut registry, &mut names),
            "mesh_records_changed",
            "Records new or changed by what peers said; flat once the mesh has settled",
            m.mesh_records_changed.clone(),
        );
        Metrics {
            registry,
            names,
            ..m
        }
    }

    /// Say what is wrong with `part` now (`None`: nothing any more).
    pub fn problem(&self, part: &'static str, what: Option<String>) {
        debug_assert!(PARTS.contains(&part), "{part} is not in PARTS");
        self.problem
            .get_or_create(&PartLabels { part })
            .set(i64::from(what.is_some()));
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match what {
            Some(w) => {
                p.insert(part, w);
            }
            None => {
                p.remove(part);
            }
        }
    }

    /// What is wrong now, one line per part.
    pub fn problems(&self) -> Vec<String> {
        let p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().map(|(k, v)| format!("{k}: {v}")).collect()
    }

    /// Every metric registered, as exported (`narmesh_<name>`; a counter gets `_total`, a
    /// histogram `_bucket`, `_sum` and `_count`). A family is in the text only once it has a
    /// series.
    pub fn names(&self) -> Vec<String> {
        self.names.iter().map(|n| format!("narmesh_{n}")).collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
