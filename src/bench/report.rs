//! What `narmesh bench` reports: every figure with its spread and its baseline from the same
//! run, as a table for people and as JSON (`--json`) for scripts.

use std::time::Duration;

use serde::Serialize;

/// A distribution of one measure (milliseconds or MiB/s).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Spread {
            count: v.len(),
            min: v[0],
            p50: rank(0.5),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }

    pub fn of_ms(d: impl IntoIterator<Item = Duration>) -> Spread {
        Spread::of(d.into_iter().map(|d| d.as_secs_f64() * 1e3))
    }
}

/// MiB/s of `bytes` in `d`.
pub fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// `synthetic` or the root of the real store the paths came from.
    pub source: String,
    pub paths: usize,
    pub nar_bytes: u64,
    pub largest_nar: u64,
    pub nodes: usize,
    pub mirror: bool,
    pub replicate: String,
    /// How NARs move between nodes: `QUIC` or `bulk TCP`.
    pub transport: String,
    pub concurrency: usize,
    /// How the hook binary starts (`statically linked`, `dynamically linked`, ...): starting
    /// the process is about half of a hook call on a busy machine.
    pub hook: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeUsage {
    pub name: String,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    /// Bytes the node process caused to be written to disk from the first hook call to the end
    /// of the run (`/proc/PID/io`), the serving phases included.
    pub written_bytes: u64,
}

/// The same NARs served by the origin (its own builds, serialized from its Nix store, no
/// copy) and by a peer (NAR files it fetched), each through its HTTP cache.
#[derive(Debug, Clone, Serialize)]
pub struct Serving {
    pub from_store_mib_s: f64,
    pub from_file_mib_s: f64,
    /// Store / file.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerTransfer {
    /// How it was measured: `on-demand` (the bench GETs every NAR from each peer's HTTP
    /// cache, which fetches it from the mesh) or `eager` (first hook to the peer holding all).
    pub how: String,
    /// MiB/s per peer node.
    pub per_peer_mib_s: Vec<f64>,
    pub spread_mib_s: Spread,
    /// The same NAR bytes over plain loopback TCP into files, one after another.
    pub tcp_copy_mib_s: f64,
    /// Median peer / TCP copy.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub bucket: String,
    /// Hook call to the narinfo being in the bucket, per path.
    pub lag_ms: Spread,
    /// NAR bytes over the time from the first hook call to the last narinfo in the bucket.
    pub mib_s: f64,
    /// The same NAR bytes PUT with plain aws-sdk-s3 `put_object`, 8 at a time.
    pub plain_put_mib_s: f64,
    pub ratio: f64,
    pub uploaded_paths: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Seed {
    /// Where `nix copy` wrote.
    pub target: String,
    /// Build-loop time blocked per build by the seed hook.
    pub blocked_ms: Spread,
    /// Seed p50 / narmesh hook p50, and the same at p99.
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

/// One run's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: Workload,
    /// The `narmesh-hook` process, start to exit: the build-loop time blocked per build.
    pub hook_ms: Spread,
    /// The same binary started the same way during the burst with nothing to report (it exits
    /// at once), every 5 ms: what starting a process costs then.
    pub hook_floor_ms: Spread,
    /// Hook call to signed and servable on the node where the build ran.
    pub origin_servable_ms: Spread,
    /// Hook call to servable on every node (empty with one node).
    pub all_nodes_servable_ms: Spread,
    /// Paths recorded per second on the origin, first hook call to last path servable.
    pub ingest_paths_per_sec: f64,
    pub peer_transfer: Option<PeerTransfer>,
    /// The origin's disk writes over the run per NAR byte built (it keeps no NAR copy).
    pub origin_written_per_nar_byte: f64,
    pub serving: Option<Serving>,
    pub mirror: Option<Mirror>,
    pub seed: Option<Seed>,
    pub nodes: Vec<NodeUsage>,
    /// Paths servable on every node at the end / paths in the workload.
    pub replicated_paths: usize,
    /// NARs fetched from peers and verified (sha256 and size against the narinfo).
    pub verified_nars: usize,
    pub errors: Vec<String>,
}

fn ms(s: &Spread) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!("p50 {:.2} / p99 {:.2} / max {:.2} ms", s.p50, s.p99, s.max)
}

fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let w = &self.workload;
        let mut rows: Vec<[String; 4]> = Vec::new();
        let seed = self.seed.as_ref();
        rows.push([
            "hook call (build loop blocked)".into(),
            ms(&self.hook_ms),
            seed.map_or("-".into(), |s| {
                format!("seed `nix copy` hook: {}", ms(&s.blocked_ms))
            }),
            seed.map_or("-".into(), |s| {
                format!(
                    "{:.1}x faster at p50, {:.1}x at p99",
                    s.ratio_p50, s.ratio_p99
                )
            }),
        ]);
        rows.push([
            "hook process with nothing to report, same burst".into(),
            ms(&self.hook_floor_ms),
            "-".into(),
            format!(
                "hook call minus this: p50 {:.2} / p99 {:.2} ms",
                self.hook_ms.p50 - self.hook_floor_ms.p50,
                self.hook_ms.p99 - self.hook_floor_ms.p99
            ),
        ]);
        rows.push([
            "hook -> servable on origin".into(),
            ms(&self.origin_servable_ms),
            "-".into(),
            "-".into(),
        ]);
        rows.push([
            format!("hook -> servable on all {} nodes", w.nodes),
            ms(&self.all_nodes_servable_ms),
            "-".into(),
            "-".into(),
        ]);
        rows.push([
            "ingest rate".into(),
            format!("{:.0} paths/s", self.ingest_paths_per_sec),
            "-".into(),
            "-".into(),
        ]);
        if let Some(p) = &self.peer_transfer {
            rows.push([
                format!("peer NAR throughput ({})", p.how),
                format!(
                    "min {:.0} / median {:.0} / max {:.0} MiB/s",
                    p.spread_mib_s.min, p.spread_mib_s.p50, p.spread_mib_s.max
                ),
                format!("TCP copy: {:.0} MiB/s", p.tcp_copy_mib_s),
                format!("{:.2}x", p.ratio),
            ]);
        }
        rows.push([
            "origin disk written per NAR byte built".into(),
            format!("{:.3}%", self.origin_written_per_nar_byte * 100.0),
            "a node that copies NARs: 100%".into(),
            "-".into(),
        ]);
        if let Some(s) = &self.serving {
            rows.push([
                "NARs served from the Nix store (origin)".into(),
                format!("{:.0} MiB/s", s.from_store_mib_s),
                format!("from NAR files (peer): {:.0} MiB/s", s.from_file_mib_s),
                format!("{:.2}x", s.ratio),
            ]);
        }
        if let Some(m) = &self.mirror {
            rows.push([
                "hook -> narinfo in S3 (mirror lag)".into(),
                ms(&m.lag_ms),
                "-".into(),
                "-".into(),
            ]);
            rows.push([
                "S3 mirror throughput".into(),
                format!("{:.1} MiB/s", m.mib_s),
                format!("plain PUTs: {:.1} MiB/s", m.plain_put_mib_s),
                format!("{:.2}x", m.ratio),
            ]);
        }
        for n in &self.nodes {
            rows.push([
                format!("node {}", n.name),
                format!(
                    "{:.2} CPU-s, peak RSS {:.0} MiB, {:.1} MiB written",
                    n.cpu_seconds,
                    n.peak_rss_mib,
                    n.written_bytes as f64 / (1u64 << 20) as f64
                ),
                "-".into(),
                "-".into(),
            ]);
        }
        let widths: Vec<usize> = (0..4)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0).max(8))
            .collect();
        let mut out = format!(
            "narmesh bench: {} paths ({}, largest {}, {}), {} nodes{}, {} replication over {}, {} at once, hook {}\n\n",
            w.paths,
            size(w.nar_bytes),
            size(w.largest_nar),
            w.source,
            w.nodes,
            if w.mirror { " + S3 mirror" } else { "" },
            w.replicate,
            w.transport,
            w.concurrency,
            w.hook
        );
        let header = ["measure", "narmesh", "baseline (same run)", "ratio"];
        let line = |r: &[String]| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        out.push_str(&line(&header.map(String::from)));
        out.push('\n');
        out.push_str(
            &widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-|-"),
        );
        out.push('\n');
        for r in &rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out.push_str(&format!(
            "\nreplicated: {}/{} paths on every node; NARs fetched and verified: {}\n",
            self.replicated_paths, w.paths, self.verified_nars
        ));
        if self.errors.is_empty() {
            out.push_str("errors: none\n");
        } else {
            for e in &self.errors {
                out.push_str(&format!("error: {e}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_nearest_rank() {
        let s = Spread::of((1..=100).map(f64::from));
        assert_eq!(
            (s.min, s.p50, s.p99, s.max, s.count),
            (1.0, 50.0, 99.0, 100.0, 100)
        );
        let one = Spread::of([3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Spread::of([]).count, 0);
    }
}
