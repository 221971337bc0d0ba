//! Months of a build farm pressed into minutes, to find what grows. Three real nodes run for
//! `NARMESH_SOAK_SECS` (900) under a steady load with everything a farm does to them:
//! - A's host (real Nix 2.8, `narmesh-hook` as its post-build-hook) builds a round of paths every
//!   `NARMESH_SOAK_ROUND_SECS` (3): five small ones (1-64 KiB) and one of 1-6 MiB referring to
//!   one of them; A serves them from its Nix store;
//! - B replicates eagerly within a 24 MiB cap, so it fetches and evicts all the time;
//! - C mirrors everything into a local SeaweedFS within the same cap (it may drop a NAR once
//!   it is in the bucket), audits the bucket every 5 s (nothing takes objects from it, so every
//!   audit must find nothing lost while paths are done, forgotten and killed mid-upload), and
//!   is killed with SIGKILL and started again every 15 rounds (the mirror resumes; A and B see
//!   a peer go and come back);
//! - every 5 rounds, Nix GC on A's host deletes the rounds older than 20 (A follows: it
//!   withdraws them, and serves them only while a peer still has them);
//! - a record nobody holds any more is forgotten after `NARMESH_SOAK_FORGET_SECS` (60; seven
//!   days by default), so what a farm sees over weeks, records coming and going, happens here
//!   within the run;
//! - every round, a random path still in A's store is fetched through B's or C's HTTP cache
//!   (narinfo and NAR, the NAR checked against the narinfo's NarHash).
//!
//! A and B are never restarted: their samples after each round (RSS, anonymous RSS, open file
//! descriptors, threads, data dir, redb file) show what grows with time and paths. It fails if
//! a fetch of a path A still has fails, if B's NAR files pass its cap plus one NAR, if A's or
//! B's open descriptors grow by more than 32 from the warm-up to the end, or if, at the end, the
//! bucket is not closure-complete or lacks a path A's store still holds.
//!
//! Run: `cargo bench --bench soak` (needs nix-bin and SeaweedFS, as the tests do). The figures
//! of a run are in BENCHMARKS.md.

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/node_harness.rs"]
mod node_harness;
#[path = "../tests/it/s3_harness.rs"]
mod s3_harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::{NixHost, disk_usage, http, require, run_ok, wait_until};
use narmesh::nix::{NarInfo, StorePath};
use node_harness::Node;
use s3_harness::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, check_cache, credentials_env};
use sha2::Digest as _;

const CAP_MIB: u64 = 24;
const BIG_MAX_MIB: u64 = 6;
const GC_EVERY: usize = 5;
const KEEP_ROUNDS: usize = 20;
const RESTART_EVERY: usize = 15;
/// Rounds before the first sample that growth is measured from (caches filled, peers met).
const WARM_UP: usize = 10;
/// Rounds from which the growth is measured: after the first records were forgotten.
fn steady_from(rows: usize, forget_secs: f64, round_secs: f64) -> usize {
    let first_forgotten = ((KEEP_ROUNDS as f64 * round_secs + forget_secs) / round_secs) as usize;
    first_forgotten.max(rows / 2).min(rows.saturating_sub(2))
}

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One node process at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Proc {
    rss_mib: f64,
    anon_mib: f64,
    fds: usize,
    threads: usize,
    data_mib: f64,
    redb_mib: f64,
}

fn sample(node: &Node) -> Proc {
    let pid = node.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let data = node.dir.join("data");
    Proc {
        rss_mib: field("VmRSS:") / 1024.0,
        anon_mib: field("RssAnon:") / 1024.0,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        threads: field("Threads:") as usize,
        data_mib: disk_usage(&data) as f64 / 1048576.0,
        redb_mib: std::fs::metadata(data.join("narmesh.redb")).map_or(0, |m| m.len()) as f64
            / 1048576.0,
    }
}

/// A sample of every long-lived node after a round.
struct Row {
    round: usize,
    paths: usize,
    secs: f64,
    a: Proc,
    b: Proc,
    b_files_mib: f64,
    b_evictions: u64,
    a_gc_lost: u64,
    a_records: u64,
    b_records: u64,
    a_forgotten: u64,
}

/// Round `r`'s paths on `host`: five small, then a large one referring to the first.
fn build_round(host: &NixHost, r: usize, rng: &mut u64) -> Vec<StorePath> {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let smalls: Vec<String> = (0..5)
        .map(|i| {
            let size = 1024 + next() % (63 * 1024);
            format!(
                r#"s{i} = mk "soak-{r}-{i}" "mkdir $out; head -c {size} /dev/urandom > $out/data";"#
            )
        })
        .collect();
    let big = (1 << 20) + next() % ((BIG_MAX_MIB - 1) << 20);
    let body = format!(
        r#"let {} in [ s0 s1 s2 s3 s4 (mk "soak-{r}-big" "mkdir $out; head -c {big} /dev/urandom > $out/data; echo ${{s0}} > $out/ref") ]"#,
        smalls.join(" ")
    );
    host.build(&body)
}

/// Why a fetch through a node's cache did not give the path.
enum Miss {
    /// The narinfo is not there yet (announcement or catch-up still on its way): ask again.
    NotYet,
    /// Anything else: the node failed.
    Bad(String),
}

/// Fetch `p`'s narinfo and NAR through `node`'s cache; the NAR must match the narinfo.
fn fetch_through(node: &Node, p: &StorePath) -> Result<(), Miss> {
    let (code, _, body) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", p.hash_part()),
        &[],
    );
    if code == 404 {
        return Err(Miss::NotYet);
    }
    if code != 200 {
        return Err(Miss::Bad(format!("narinfo of {}: HTTP {code}", p.full())));
    }
    let info = std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string()))
        .map_err(Miss::Bad)?;
    let (code, _, nar) = http(&node.http, "GET", &format!("/{}", info.url), &[]);
    if code != 200 {
        return Err(Miss::Bad(format!("NAR of {}: HTTP {code}", p.full())));
    }
    if nar.len() as u64 != info.nar_size || sha2::Sha256::digest(&nar)[..] != info.nar_hash.0 {
        return Err(Miss::Bad(format!(
            "NAR of {}: {} bytes not matching the narinfo",
            p.full(),
            nar.len()
        )));
    }
    Ok(())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require("nix-build");
    let secs = env_or("NARMESH_SOAK_SECS", 900.0);
    let round_secs = env_or("NARMESH_SOAK_ROUND_SECS", 3.0);
    let forget_secs = env_or("NARMESH_SOAK_FORGET_SECS", 60.0);
    let forget = format!("forget-after-secs = {}\n", forget_secs as u64);
    let t = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let host = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    node_harness::full_mesh(&mut nodes);
    nodes[0].store_root = host.root.clone();
    nodes[0].extra_config = format!("[store]\ngc-check-secs = 1\n{forget}");
    nodes[1].store_root = nodes[1].dir.join("store");
    nodes[1].replicate = "eager";
    nodes[1].extra_config =
        format!("[store]\nmax-size = \"{CAP_MIB}MiB\"\nmin-free = \"1MiB\"\n{forget}");
    nodes[2].store_root = nodes[2].dir.join("store");
    nodes[2].extra_config = format!(
        "{}\n[store]\nmax-size = \"{CAP_MIB}MiB\"\nmin-free = \"1MiB\"\n{forget}",
        s3.mirror_config("audit-secs = 5")
    );
    nodes[2].env = credentials_env(ACCESS_KEY, SECRET_KEY);
    for n in nodes.iter_mut() {
        n.start();
    }
    println!(
        "soak: {secs} s, a round every {round_secs} s; B capped at {CAP_MIB} MiB; C mirrors to \
         {BUCKET} and restarts every {RESTART_EVERY} rounds; GC every {GC_EVERY} rounds keeps {KEEP_ROUNDS}; \
         records nobody holds forgotten after {forget_secs} s"
    );

    let started = Instant::now();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ started.elapsed().as_nanos() as u64;
    let mut rounds: Vec<Vec<StorePath>> = Vec::new();
    // The first round still in A's store.
    let mut kept_from = 0;
    let (mut built, mut built_bytes, mut fetches, mut restarts, mut gc_deleted) =
        (0, 0u64, 0, 0, 0);
    let mut rows: Vec<Row> = Vec::new();
    let mut b_peak_disk = 0u64;
    // Fetches asked again because the node did not know the path yet.
    let mut not_yet = 0;
    let nars_b = nodes[1].dir.join("data/nars");
    // C's bucket audits over all its lives.
    let mut audits = Audits::default();
    while started.elapsed().as_secs_f64() < secs {
        let r = rounds.len();
        let round_start = Instant::now();
        if r > 0 && r.is_multiple_of(RESTART_EVERY) {
            audits.add(&nodes[2]);
            nodes[2].kill9();
            nodes[2].start();
            restarts += 1;
        }
        let outs = build_round(&host, r, &mut rng);
        built += outs.len();
        built_bytes += outs
            .iter()
            .map(|p| disk_usage(&host.real_path(p)))
            .sum::<u64>();
        rounds.push(outs);
        if r > 0 && r.is_multiple_of(GC_EVERY) && r >= KEEP_ROUNDS {
            let upto = r + 1 - KEEP_ROUNDS;
            let doomed: Vec<String> = rounds[kept_from..upto]
                .iter()
                .flatten()
                .map(StorePath::full)
                .collect();
            if !doomed.is_empty() {
                let mut args = vec!["--delete".to_owned()];
                args.extend(doomed.iter().cloned());
                run_ok(host.cmd("nix-store").args(&args));
                gc_deleted += doomed.len();
            }
            kept_from = upto;
        }
        // A random path A's store still holds, through B's cache or C's.
        let pick = kept_from + (rng as usize) % (rounds.len() - kept_from);
        let p = &rounds[pick][(rng >> 32) as usize % rounds[pick].len()];
        let via = &nodes[1 + r % 2];
        // Just built, or C just restarted: give the announcement or catch-up a moment; any
        // other failure fails the run at once.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fetch_through(via, p) {
                Ok(()) => break,
                Err(Miss::NotYet) if Instant::now() < deadline => {
                    not_yet += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(Miss::NotYet) => {
                    panic!("round {r}: node {} never learnt {}", 1 + r % 2, p.full())
                }
                Err(Miss::Bad(e)) => panic!("round {r}: through node {}: {e}", 1 + r % 2),
            }
        }
        fetches += 1;
        let (status_a, status_b) = (nodes[0].status(), nodes[1].status());
        let (st_a, st_b) = (&status_a.storage, &status_b.storage);
        let disk = disk_usage(&nars_b);
        b_peak_disk = b_peak_disk.max(disk);
        assert!(
            st_b.file_bytes <= CAP_MIB << 20 && disk <= (CAP_MIB + BIG_MAX_MIB + 1) << 20,
            "round {r}: B holds {} bytes ({disk} on disk), cap {CAP_MIB} MiB",
            st_b.file_bytes
        );
        rows.push(Row {
            round: r,
            paths: built,
            secs: started.elapsed().as_secs_f64(),
            a: sample(&nodes[0]),
            b: sample(&nodes[1]),
            b_files_mib: st_b.file_bytes as f64 / 1048576.0,
            b_evictions: st_b.evictions,
            a_gc_lost: st_a.gc_lost,
            a_records: status_a.paths_recorded,
            b_records: status_b.paths_recorded,
            a_forgotten: status_a.records_forgotten,
        });
        if let Some(rest) = Duration::from_secs_f64(round_secs).checked_sub(round_start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let run_secs = started.elapsed().as_secs_f64();

    // The end: the mirror has everything A's store still holds, and the bucket is complete.
    let on_a: Vec<&StorePath> = rounds[kept_from..].iter().flatten().collect();
    let drained = Instant::now();
    wait_until(600, "the mirror to have every path A still holds", || {
        let keys: BTreeSet<String> = s3.objects().into_iter().map(|(k, _)| k).collect();
        on_a.iter()
            .all(|p| keys.contains(&format!("{}.narinfo", p.hash_part())))
    });
    let drain_secs = drained.elapsed().as_secs_f64();
    // Every object read back and checked (hashes and sizes), every closure complete.
    let on_a: Vec<String> = on_a.iter().map(|p| p.full()).collect();
    let in_bucket = check_cache(&s3, "", "zstd", &on_a, &[]);
    let status_c = nodes[2].status();
    let mirror = status_c.mirror.clone().expect("mirror status");
    audits.add(&nodes[2]);

    println!(
        "\n{} rounds in {run_secs:.0} s: {built} paths built ({:.0} MiB), {gc_deleted} deleted by \
         Nix GC, {fetches} fetched through B or C and checked ({not_yet} asked again: not known yet), C \
         restarted {restarts} times",
        rounds.len(),
        built_bytes as f64 / 1048576.0
    );
    println!(
        "bucket: {} narinfos, closure-complete, every path A still holds among them (the mirror \
         finished {drain_secs:.1} s after the last round; {} pending, {} failures since C's last \
         start)",
        in_bucket, mirror.pending_paths, mirror.failures
    );
    println!(
        "C's bucket audits: {} completed, {} paths found lost",
        audits.done, audits.lost
    );
    println!(
        "B: peak {:.1} MiB of NAR files on disk (cap {CAP_MIB} MiB), {} evictions; A: {} paths lost to Nix GC",
        b_peak_disk as f64 / 1048576.0,
        rows.last().map_or(0, |r| r.b_evictions),
        rows.last().map_or(0, |r| r.a_gc_lost)
    );
    println!(
        "C (restarted last in round {}): {} records, {:.1} MiB of NAR files, {} forgotten since",
        (rounds.len() - 1) / RESTART_EVERY * RESTART_EVERY,
        status_c.paths_recorded,
        status_c.storage.file_bytes as f64 / 1048576.0,
        status_c.records_forgotten
    );
    println!(
        "\n| round | paths | s | A records / forgotten | A RSS / anon MiB | A fds | A threads | A data / redb MiB | B records | B RSS / anon MiB | B fds | B threads | B data / redb MiB | B NAR files MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let n = rows.len();
    let steady = steady_from(n, forget_secs, round_secs);
    let mut picks: Vec<usize> =
        [WARM_UP.min(n - 1), n / 4, steady, n / 2, 3 * n / 4, n - 1].to_vec();
    picks.sort();
    picks.dedup();
    for &i in &picks {
        let w = &rows[i];
        println!(
            "| {} | {} | {:.0} | {} / {} | {:.1} / {:.1} | {} | {} | {:.1} / {:.1} | {} | {:.1} / {:.1} | {} | {} | {:.1} / {:.1} | {:.1} |",
            w.round,
            w.paths,
            w.secs,
            w.a_records,
            w.a_forgotten,
            w.a.rss_mib,
            w.a.anon_mib,
            w.a.fds,
            w.a.threads,
            w.a.data_mib,
            w.a.redb_mib,
            w.b_records,
            w.b.rss_mib,
            w.b.anon_mib,
            w.b.fds,
            w.b.threads,
            w.b.data_mib,
            w.b.redb_mib,
            w.b_files_mib
        );
    }
    // Growth once records come and go (from the first forgotten on, or the second half), per
    // 1,000 paths built: a least-squares slope, so one busy sample does not decide it.
    let tail = &rows[steady..];
    let slope = |f: &dyn Fn(&Row) -> f64| -> f64 {
        let xs: Vec<f64> = tail.iter().map(|r| r.paths as f64).collect();
        let ys: Vec<f64> = tail.iter().map(f).collect();
        let (mx, my) = (
            xs.iter().sum::<f64>() / xs.len() as f64,
            ys.iter().sum::<f64>() / ys.len() as f64,
        );
        let num: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        if den == 0.0 { 0.0 } else { num / den * 1000.0 }
    };
    println!(
        "\ngrowth from round {} on, per 1,000 paths built: A records {:+.0}, anon {:+.2} MiB, redb {:+.2} MiB, \
         fds {:+.1}; B records {:+.0}, anon {:+.2} MiB, redb {:+.2} MiB, fds {:+.1}",
        rows[steady].round,
        slope(&|r| r.a_records as f64),
        slope(&|r| r.a.anon_mib),
        slope(&|r| r.a.redb_mib),
        slope(&|r| r.a.fds as f64),
        slope(&|r| r.b_records as f64),
        slope(&|r| r.b.anon_mib),
        slope(&|r| r.b.redb_mib),
        slope(&|r| r.b.fds as f64),
    );
    let (warm, last) = (&rows[WARM_UP.min(n - 1)], &rows[n - 1]);
    for (name, w, l) in [("A", warm.a, last.a), ("B", warm.b, last.b)] {
        assert!(
            l.fds <= w.fds + 32,
            "{name}'s open file descriptors grew from {} to {}",
            w.fds,
            l.fds
        );
    }
    assert!(audits.done > 0.0, "C never completed a bucket audit");
    assert_eq!(
        audits.lost, 0.0,
        "an audit found lost what the bucket holds"
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
    s3.stop();
}

/// The mirror's audit counters, summed over a node's lives (its metrics start again at 0).
#[derive(Default)]
struct Audits {
    done: f64,
    lost: f64,
}

impl Audits {
    fn add(&mut self, node: &Node) {
        let (_, _, body) = http(&node.http, "GET", "/metrics", &[]);
        let body = String::from_utf8_lossy(&body);
        let get = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        self.done += get("narmesh_mirror_audits_total ");
        self.lost += get("narmesh_mirror_audit_lost_total ");
    }
}
