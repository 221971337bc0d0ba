//! `narmesh bench`: replication benchmarked on one machine, beside its baselines.
//!
//! It starts N real node processes on loopback (own data dirs, stores, keys and mesh ports; all
//! peers and trusted by each other), optionally a mirror node against S3 (a local SeaweedFS it
//! starts, or a given endpoint), and feeds the first node a workload through the real hook: one
//! `narmesh-hook` process per build, as Nix runs it, `--concurrency` at a time. Watchers ask each
//! node which paths it serves (batched lookups over its socket) and list the bucket, so every
//! path gets its time from the hook call to servable on the origin, on every node and in S3.
//! Then (once the mirror has every narinfo in the bucket, so neither measure takes the other's
//! CPU) each peer's HTTP cache is asked for every NAR (fetched over the mesh on demand), which
//! is checked against the narinfo's hash and size. In the same run: the same NAR bytes over a plain
//! TCP copy, plain aws-sdk-s3 PUTs of them, and the seed approach (`nix copy` per build).
//!
//! Parts: [`synth`] (workloads), [`cluster`] (node processes), [`watch`] (the hook calls and
//! the watchers' timeline), [`verify`] (NARs fetched from the peers and checked), [`s3`] (local
//! server and the bench's S3 client), [`baseline`] (TCP copy, seed hook), [`report`] (spreads,
//! table, JSON).

pub mod baseline;
pub mod cluster;
pub mod report;
pub mod s3;
pub mod synth;
pub mod verify;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use cluster::Node;
use report::{Report, Spread, mib_s};
use verify::fetch_all;
use watch::{Timeline, feed, watch_bucket, watch_node};

/// `narmesh bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Nodes to start; the builds happen on the first.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Store paths in the workload (builds, one hook call each).
    #[arg(long, default_value_t = 50)]
    pub paths: usize,
    /// Sizes of the small paths' files: log-uniform in LO..HI.
    #[arg(long, default_value = "1KiB..256KiB", value_parser = synth::parse_size_range)]
    pub small: (u64, u64),
    /// Size of the large paths' files.
    #[arg(long, default_value = "32MiB", value_parser = synth::parse_size)]
    pub large: u64,
    /// Every Nth path is large (0: none).
    #[arg(long, default_value_t = 10)]
    pub large_every: usize,
    /// Paths form reference chains of this length (1: no references).
    #[arg(long, default_value_t = 4)]
    pub chain: usize,
    /// Seed of the synthetic workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Take the workload from this real Nix store instead (`/` for the system store): its
    /// first `--paths` valid paths.
    #[arg(long)]
    pub store_root: Option<PathBuf>,
    /// Builds finishing at once (hook calls in flight, like Nix's max-jobs).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// The `narmesh-hook` executable the builds run (default: the one beside `narmesh`).
    #[arg(long, env = "NARMESH_HOOK_BIN")]
    pub hook: Option<PathBuf>,
    /// Spread the builds evenly over this many seconds (0: back to back).
    #[arg(long, default_value_t = 0.0)]
    pub duration: f64,
    /// `on-demand` or `eager`.
    #[arg(long, default_value = "on-demand", value_parser = ["on-demand", "eager"])]
    pub replicate: String,
    /// Nodes move NARs over the opt-in bulk channel (TCP, `[mesh] bulk-listen`) instead of QUIC.
    #[arg(long)]
    pub bulk: bool,
    /// Add a mirror node writing to a local S3 server started for the run (SeaweedFS `weed`).
    #[arg(long)]
    pub s3_local: bool,
    /// The `weed` executable for --s3-local (default: on PATH).
    #[arg(long, env = "NARMESH_WEED")]
    pub weed: Option<PathBuf>,
    /// Or add a mirror node writing to this bucket (credentials the usual AWS way).
    #[arg(long, conflicts_with = "s3_local")]
    pub s3_bucket: Option<String>,
    /// The S3 endpoint for --s3-bucket (default: AWS).
    #[arg(long, requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub s3_region: String,
    /// The mirror's NAR compression: `zstd`, `xz` or `none`.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "xz", "none"])]
    pub compression: String,
    /// Leave out the seed approach even when a Nix client is installed.
    #[arg(long)]
    pub no_seed: bool,
    /// Keep the run's files here (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up waiting for replication after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A progress bar on stderr (drawn only on a terminal, and not with --json).
fn bar(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {msg:32} {bar:30} {pos}/{len}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(100));
    b
}

fn phase(b: &indicatif::ProgressBar, msg: &'static str, len: usize) {
    b.set_message(msg);
    b.set_length(len as u64);
    b.set_position(0);
}

/// Run the benchmark and print its report; fails (after printing) if any path was not
/// replicated or any check failed.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    anyhow::ensure!(args.paths >= 1, "--paths must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.duration.is_finite() && (0.0..=86_400.0).contains(&args.duration),
        "--duration must be between 0 and 86400 seconds"
    );
    let exe = std::env::current_exe().context("finding the narmesh executable")?;
    let hook = match &args.hook {
        Some(h) => h.clone(),
        None => exe.with_file_name("narmesh-hook"),
    };
    anyhow::ensure!(
        hook.is_file(),
        "{} is missing (build or install both binaries, or give --hook)",
        hook.display()
    );
    let (_tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new().prefix("narmesh-bench").tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let json = args.json;
    // The HTTP client needs a TLS provider even for plain-HTTP loopback requests.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || bench(&args, &exe, &hook, &dir, &rt)).await?
    })?;
    let failed = !report.errors.is_empty();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    anyhow::ensure!(!failed, "{} error(s), see the report", report.errors.len());
    Ok(())
}

fn bench(
    args: &BenchArgs,
    exe: &Path,
    hook: &Path,
    dir: &Path,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<Report> {
    let progress = bar(args.json);
    let started_all = Instant::now();

    // The workload.
    let (origin_root, work, source) = match &args.store_root {
        Some(root) => (
            root.clone(),
            synth::from_store(root, args.paths)?,
            root.display().to_string(),
        ),
        None => {
            progress.set_message("generating the workload");
            let root = dir.join("store-n0");
            let shape = synth::Shape {
                paths: args.paths,
                small: args.small,
                large: args.large,
                large_every: args.large_every,
                chain: args.chain.max(1),
                seed: args.seed,
            };
            (
                root.clone(),
                synth::generate(&root, &shape)?,
                "synthetic".to_owned(),
            )
        }
    };
    let total_bytes: u64 = work.iter().map(|p| p.nar_size).sum();
    // Every node but the origin keeps a copy (and the mirror a compressed one on its way): a
    // disk that cannot take them would stall the run, not fail it.
    let need = total_bytes.saturating_mul(args.nodes as u64) + (512 << 20);
    if let Some(free) = crate::storage::free_space(dir) {
        anyhow::ensure!(
            free >= need,
            "{} has {} MiB free; this workload needs about {} MiB (its {} MiB of NARs on each \
             of {} nodes, and room to spare): free some space, or give --dir elsewhere",
            dir.display(),
            free >> 20,
            need >> 20,
            total_bytes >> 20,
            args.nodes
        );
    }

    // S3.
    let local_s3 = if args.s3_local {
        progress.set_message("starting the local S3 server");
        let weed = args.weed.clone().unwrap_or_else(|| "weed".into());
        Some(rt.block_on(s3::LocalS3::start(&weed, &dir.join("s3")))?)
    } else {
        None
    };
    let target = match (&local_s3, &args.s3_bucket) {
        (Some(l), _) => Some(l.target()),
        (None, Some(b)) => Some(s3::Target {
            endpoint: args.s3_endpoint.clone(),
            bucket: b.clone(),
            region: args.s3_region.clone(),
            credentials: None,
        }),
        (None, None) => None,
    };

    // The nodes.
    progress.set_message("starting the nodes");
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let root = if i == 0 {
            origin_root.clone()
        } else {
            let r = dir.join(format!("store-n{i}"));
            synth::init_store(&r)?;
            r
        };
        nodes.push(Node::new(
            &format!("n{i}"),
            &dir.join(format!("n{i}")),
            &root,
        )?);
    }
    let mirror_index = if target.is_some() {
        let r = dir.join("store-mirror");
        synth::init_store(&r)?;
        nodes.push(Node::new("mirror", &dir.join("mirror"), &r)?);
        Some(nodes.len() - 1)
    } else {
        None
    };
    let spec = cluster::Spec {
        replicate: args.replicate.clone(),
        bulk: args.bulk,
        mirror: target.as_ref().map(|t| cluster::MirrorSpec {
            bucket: t.bucket.clone(),
            endpoint: t.endpoint.clone(),
            region: t.region.clone(),
            compression: args.compression.clone(),
            env: t.env(),
        }),
        cluster: format!("narmesh-bench-{}", std::process::id()),
    };
    cluster::start_all(exe, &mut nodes, &spec, mirror_index)?;
    let mut errors = Vec::new();
    if nodes.len() > 1 && !cluster::wait_for_links(&nodes, Duration::from_secs(15)) {
        errors.push("some node had no gossip link after 15 s".to_owned());
    }

    // Start with no dirty pages waiting (the generated store, earlier runs), so their writeback
    // does not land in the measurement.
    let _ = std::process::Command::new("sync").status();

    // Watchers, then the builds.
    let tl = Arc::new(Timeline::new(work.len(), args.nodes));
    let deadline = Arc::new(OnceLock::<Instant>::new());
    let paths: Arc<Vec<String>> = Arc::new(work.iter().map(|p| p.path.full()).collect());
    let watchers: Vec<_> = nodes[..args.nodes]
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let (tl, paths, deadline, socket) =
                (tl.clone(), paths.clone(), deadline.clone(), n.socket());
            std::thread::spawn(move || watch_node(&socket, k, &paths, &tl, &deadline))
        })
        .collect();
    let probe = target
        .as_ref()
        .map(|t| Arc::new(rt.block_on(s3::Probe::connect(t))));
    let bucket_watcher = probe.clone().map(|probe| {
        let (tl, work, deadline, rt) = (tl.clone(), work.clone(), deadline.clone(), rt.clone());
        std::thread::spawn(move || watch_bucket(&probe, &work, &tl, &deadline, &rt))
    });

    phase(&progress, "building (hook calls)", work.len());
    // Disk writes are counted from here: the nodes' start-up (new databases) is not the run.
    let written_before: Vec<u64> = nodes.iter().map(|n| n.written_bytes()).collect();
    let feed_started = Instant::now();
    let floor = feed(args, hook, &nodes[0], &work, &tl, &progress)?;
    let _ = deadline.set(Instant::now() + Duration::from_secs(args.timeout));
    phase(&progress, "replicating", work.len() * args.nodes);
    while !watchers.iter().all(|w| w.is_finished()) {
        let done: usize = tl
            .servable
            .iter()
            .map(|c| c.iter().filter(|t| t.get().is_some()).count())
            .sum();
        progress.set_position(done as u64);
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in watchers {
        if let Err(e) = w.join().map_err(|_| anyhow::anyhow!("watcher panicked"))? {
            errors.push(e.to_string());
        }
    }
    // The mirror: every narinfo in the bucket before the peers are asked for NARs, so neither
    // measure takes the other's CPU (all nodes and the S3 server share this machine's cores;
    // on a farm each node has its own).
    if let Some(w) = bucket_watcher {
        phase(&progress, "mirror uploading", 1);
        if let Err(e) = w
            .join()
            .map_err(|_| anyhow::anyhow!("bucket watcher panicked"))?
        {
            errors.push(e.to_string());
        }
    }
    let spooled = std::fs::read_dir(nodes[0].spool())
        .map(|d| d.count())
        .unwrap_or(0);
    if spooled > 0 {
        errors.push(format!(
            "{spooled} hook report(s) were spooled: the node did not acknowledge in time"
        ));
    }

    // Eager peers: wait until each holds every NAR, stamping each when it does.
    let mut eager_done: Vec<Option<Duration>> = vec![None; args.nodes.saturating_sub(1)];
    if args.replicate == "eager" {
        phase(&progress, "eager peers fetching NARs", args.nodes - 1);
        let limit = Instant::now() + Duration::from_secs(args.timeout);
        while eager_done.iter().any(Option::is_none) && Instant::now() < limit {
            for (slot, n) in eager_done.iter_mut().zip(&nodes[1..args.nodes]) {
                if slot.is_none() && n.status().is_ok_and(|s| s.nar_bytes >= total_bytes) {
                    *slot = Some(feed_started.elapsed());
                    progress.inc(1);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (slot, n) in eager_done.iter().zip(&nodes[1..args.nodes]) {
            if slot.is_none() {
                errors.push(format!("node {} did not hold every NAR in time", n.name));
            }
        }
    }

    // Every NAR from every peer's HTTP cache, verified.
    phase(
        &progress,
        "fetching NARs from peers",
        work.len() * (args.nodes - 1),
    );
    let mut per_peer = Vec::new();
    let mut verified = 0;
    for n in &nodes[1..args.nodes] {
        let (d, ok, errs) = rt.block_on(fetch_all(
            &n.http,
            &work,
            Duration::from_secs(args.timeout),
            &progress,
        ));
        verified += ok;
        errors.extend(errs.into_iter().map(|e| format!("node {}: {e}", n.name)));
        per_peer.push(d);
    }

    // The same NARs again: from the origin (its own builds, from its Nix store) and from the
    // first peer (NAR files it now holds).
    let serving = if args.nodes > 1 {
        phase(&progress, "serving: Nix store vs NAR files", work.len() * 2);
        let (store_d, ok_s, errs_s) = rt.block_on(fetch_all(
            &nodes[0].http,
            &work,
            Duration::from_secs(args.timeout),
            &progress,
        ));
        let (file_d, ok_f, errs_f) = rt.block_on(fetch_all(
            &nodes[1].http,
            &work,
            Duration::from_secs(args.timeout),
            &progress,
        ));
        errors.extend(errs_s.into_iter().map(|e| format!("origin serving: {e}")));
        errors.extend(
            errs_f
                .into_iter()
                .map(|e| format!("peer file serving: {e}")),
        );
        (ok_s == work.len() && ok_f == work.len()).then(|| {
            let (s, f) = (mib_s(total_bytes, store_d), mib_s(total_bytes, file_d));
            report::Serving {
                from_store_mib_s: s,
                from_file_mib_s: f,
                ratio: s / f,
            }
        })
    } else {
        None
    };

    let usage: Vec<report::NodeUsage> = nodes
        .iter()
        .zip(&written_before)
        .map(|(n, before)| report::NodeUsage {
            name: n.name.clone(),
            cpu_seconds: n.cpu_seconds(),
            peak_rss_mib: n.peak_rss() as f64 / (1u64 << 20) as f64,
            written_bytes: n.written_bytes().saturating_sub(*before),
        })
        .collect();
    for n in nodes.iter_mut() {
        if !n.alive() {
            errors.push(format!(
                "node {} exited during the run; its log: {}",
                n.name,
                n.log_path().display()
            ));
        }
    }
    drop(nodes);

    // Baselines, after the nodes are gone. A baseline that fails is reported as an error; the
    // measurements above are kept.
    progress.set_message("baseline: TCP copy");
    let nar_files = match baseline::dump_nars(&origin_root, &work, &dir.join("nars")) {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(format!("baselines: writing the NARs: {e:#}"));
            None
        }
    };
    let _ = std::process::Command::new("sync").status();
    let tcp = nar_files.as_ref().and_then(|files| {
        baseline::tcp_copy(files, &dir.join("tcp-copy"))
            .map_err(|e| errors.push(format!("baseline TCP copy: {e:#}")))
            .ok()
    });
    let tcp_mib_s = tcp.map_or(0.0, |d| mib_s(total_bytes, d));
    let plain_put = match (&probe, &nar_files) {
        (Some(p), Some(files)) => {
            progress.set_message("baseline: plain S3 PUTs");
            rt.block_on(p.put_all(files, "narmesh-bench-baseline/", 8))
                .map_err(|e| errors.push(format!("baseline S3 PUTs: {e:#}")))
                .ok()
        }
        _ => None,
    };
    let nix = (!args.no_seed).then(baseline::find_nix).flatten();
    let seed = match &nix {
        Some(nix) => {
            let target = match &local_s3 {
                Some(l) => format!("{}?compression={}", l.seed_cache_url(), args.compression),
                None => format!(
                    "file://{}?compression={}",
                    dir.join("seed-cache").display(),
                    args.compression
                ),
            };
            phase(&progress, "baseline: seed `nix copy` hook", work.len());
            match baseline::seed_hook(nix, &origin_root, &target, &work, &dir.join("seed"), || {
                progress.inc(1)
            }) {
                Ok(times) => Some((target, Spread::of_ms(times))),
                Err(e) => {
                    errors.push(format!("baseline seed hook: {e:#}"));
                    None
                }
            }
        }
        None => None,
    };
    progress.finish_and_clear();

    // The report.
    let hook_ms = Spread::of_ms(
        (0..work.len()).filter_map(|i| Some(*tl.hook_end[i].get()? - *tl.hook_start[i].get()?)),
    );
    let since_hook = |i: usize, t: Option<&Instant>| Some(*t? - *tl.hook_start[i].get()?);
    let origin_servable_ms =
        Spread::of_ms((0..work.len()).filter_map(|i| since_hook(i, tl.servable[0][i].get())));
    let all_times: Vec<Option<Instant>> = (0..work.len())
        .map(|i| {
            let mut latest = None;
            for col in &tl.servable {
                latest = latest.max(Some(*col[i].get()?));
            }
            latest
        })
        .collect();
    let replicated = all_times.iter().filter(|t| t.is_some()).count();
    let all_nodes_servable_ms = if args.nodes > 1 {
        Spread::of_ms((0..work.len()).filter_map(|i| since_hook(i, all_times[i].as_ref())))
    } else {
        Spread::default()
    };
    let first_hook = tl.hook_start.iter().filter_map(|t| t.get()).min().copied();
    let last_origin = tl.servable[0].iter().filter_map(|t| t.get()).max().copied();
    let ingest_paths_per_sec = match (first_hook, last_origin) {
        (Some(a), Some(b)) => {
            tl.servable[0].iter().filter(|t| t.get().is_some()).count() as f64
                / (b - a).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    };
    let peer_transfer = (args.nodes > 1).then(|| {
        let (how, rates): (&str, Vec<f64>) = if args.replicate == "eager" {
            (
                "eager: first hook call to the peer holding every NAR",
                eager_done
                    .iter()
                    .map(|d| d.map_or(0.0, |d| mib_s(total_bytes, d)))
                    .collect(),
            )
        } else {
            (
                "on-demand: GET of every NAR from the peer's cache",
                per_peer.iter().map(|d| mib_s(total_bytes, *d)).collect(),
            )
        };
        let spread = Spread::of(rates.iter().copied());
        report::PeerTransfer {
            how: how.to_owned(),
            ratio: if tcp_mib_s > 0.0 {
                spread.p50 / tcp_mib_s
            } else {
                0.0
            },
            spread_mib_s: spread,
            per_peer_mib_s: rates,
            tcp_copy_mib_s: tcp_mib_s,
        }
    });
    let mirror = match (&target, plain_put) {
        (Some(t), Some(put)) => {
            let lag =
                Spread::of_ms((0..work.len()).filter_map(|i| since_hook(i, tl.in_bucket[i].get())));
            let last = tl.in_bucket.iter().filter_map(|t| t.get()).max().copied();
            let uploaded = tl.in_bucket.iter().filter(|t| t.get().is_some()).count();
            let m = match (first_hook, last) {
                (Some(a), Some(b)) => mib_s(total_bytes, b - a),
                _ => 0.0,
            };
            let put = mib_s(total_bytes, put);
            Some(report::Mirror {
                bucket: t.bucket.clone(),
                lag_ms: lag,
                mib_s: m,
                plain_put_mib_s: put,
                ratio: m / put,
                uploaded_paths: uploaded,
            })
        }
        _ => None,
    };
    if let Some(m) = &mirror
        && m.uploaded_paths < work.len()
    {
        errors.push(format!(
            "{} of {} paths never reached the bucket",
            work.len() - m.uploaded_paths,
            work.len()
        ));
    }
    if replicated < work.len() {
        errors.push(format!(
            "{} of {} paths were not servable on every node after {} s",
            work.len() - replicated,
            work.len(),
            args.timeout
        ));
    }
    let seed = seed.map(|(target, blocked)| report::Seed {
        ratio_p50: blocked.p50 / hook_ms.p50,
        ratio_p99: blocked.p99 / hook_ms.p99,
        target,
        blocked_ms: blocked,
    });
    tracing::debug!(elapsed = ?started_all.elapsed(), "bench done");
    Ok(Report {
        workload: report::Workload {
            source,
            paths: work.len(),
            nar_bytes: total_bytes,
            largest_nar: work.iter().map(|p| p.nar_size).max().unwrap_or(0),
            nodes: args.nodes,
            mirror: target.is_some(),
            replicate: args.replicate.clone(),
            transport: if args.bulk { "bulk TCP" } else { "QUIC" }.into(),
            concurrency: args.concurrency,
            hook: crate::linkage::of_file(hook)
                .map_or_else(|e| format!("unreadable: {e}"), |l| l.to_string()),
        },
        hook_ms,
        hook_floor_ms: Spread::of_ms(floor),
        origin_servable_ms,
        all_nodes_servable_ms,
        ingest_paths_per_sec,
        peer_transfer,
        origin_written_per_nar_byte: usage
            .first()
            .map_or(0.0, |u| u.written_bytes as f64 / total_bytes.max(1) as f64),
        serving,
        mirror,
        seed,
        nodes: usage,
        replicated_paths: replicated,
        verified_nars: verified,
        errors,
    })
}
