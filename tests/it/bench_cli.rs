//! `narmesh bench`: a small smoke run (3 nodes, a local S3 mirror, the seed approach through
//! real Nix) whose report must be complete and sane (every path replicated and verified, no
//! errors, every figure present), not fast; and its synthetic store, which real Nix must accept.

use std::process::{Command, Stdio};

use crate::harness::{bin, require, run_ok};
use crate::s3_harness::weed;

/// `narmesh bench` with these arguments, running the hook under test, stdin closed.
fn bench(args: &[&str]) -> Command {
    let mut c = Command::new(bin("narmesh"));
    c.arg("bench")
        .args(args)
        .env("NARMESH_HOOK_BIN", bin("narmesh-hook"))
        .stdin(Stdio::null());
    c
}

/// The JSON report of a run that must have succeeded.
fn report(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "narmesh bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("JSON report")
}

#[test]
fn a_small_bench_run_reports_every_figure_and_replicates_everything() {
    require("nix");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bench(&["--nodes", "3", "--paths", "24", "--large", "2MiB"])
        .args([
            "--large-every",
            "8",
            "--concurrency",
            "3",
            "--timeout",
            "120",
        ])
        .args(["--s3-local", "--json", "--dir"])
        .arg(dir.path())
        .env("NARMESH_WEED", weed())
        .output()
        .expect("run narmesh bench");
    let r = report(&out);
    let num = |ptr: &str| {
        r.pointer(ptr)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("{ptr} missing in {r:#}"))
    };
    assert_eq!(r["errors"], serde_json::json!([]), "{r:#}");
    assert_eq!(num("/workload/paths"), 24.0);
    // The report says how the hook it ran starts: the README's static build here.
    assert_eq!(r["workload"]["hook"], "statically linked", "{r:#}");
    assert_eq!(num("/replicated_paths"), 24.0);
    // Every NAR fetched from both peers' caches and checked against its narinfo.
    assert_eq!(num("/verified_nars"), 48.0);
    assert!(num("/workload/nar_bytes") > 3.0 * 2097152.0);
    for spread in [
        "/hook_ms",
        "/origin_servable_ms",
        "/all_nodes_servable_ms",
        "/mirror/lag_ms",
        "/seed/blocked_ms",
    ] {
        assert_eq!(num(&format!("{spread}/count")), 24.0, "{spread}");
        let (min, p50, p99, max) = (
            num(&format!("{spread}/min")),
            num(&format!("{spread}/p50")),
            num(&format!("{spread}/p99")),
            num(&format!("{spread}/max")),
        );
        assert!(
            0.0 < min && min <= p50 && p50 <= p99 && p99 <= max && max < 120_000.0,
            "{spread}: {min} {p50} {p99} {max}"
        );
    }
    // The floor under the hook's figure was measured during the burst.
    assert!(num("/hook_floor_ms/count") >= 1.0, "{r:#}");
    assert!(num("/hook_floor_ms/p50") > 0.0, "{r:#}");
    // Servable everywhere is never before servable on the origin.
    assert!(num("/all_nodes_servable_ms/p50") >= num("/origin_servable_ms/min"));
    for figure in [
        "/ingest_paths_per_sec",
        "/peer_transfer/tcp_copy_mib_s",
        "/peer_transfer/spread_mib_s/p50",
        "/peer_transfer/ratio",
        "/mirror/mib_s",
        "/mirror/plain_put_mib_s",
        "/mirror/ratio",
        "/seed/ratio_p50",
    ] {
        let v = num(figure);
        assert!(v.is_finite() && v > 0.0, "{figure} = {v}");
    }
    assert_eq!(num("/mirror/uploaded_paths"), 24.0);
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 4, "three nodes and the mirror");
    for n in nodes {
        assert!(n["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{n}");
        assert!(n["peak_rss_mib"].as_f64().unwrap_or(0.0) > 1.0, "{n}");
    }
    // The peers are asked for NARs only once the mirror is done (README): each peer's first
    // fetch ends after the mirror's last, which came before its last narinfo went up.
    let fetched = |node: &str| -> Vec<String> {
        let log = std::fs::read_to_string(dir.path().join(node).join("node.log"))
            .unwrap_or_else(|e| panic!("{node}'s log: {e}"));
        log.lines()
            .filter(|l| l.contains("narmesh::mesh::transfer: fetched "))
            // RFC 3339 UTC with fixed-width fractions: ordered as strings.
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let mirror_last = fetched("mirror")
        .into_iter()
        .max()
        .expect("the mirror fetched");
    for peer in ["n1", "n2"] {
        let first = fetched(peer).into_iter().min().expect("the peer fetched");
        assert!(
            first > mirror_last,
            "{peer} fetched at {first}, before the mirror's last fetch at {mirror_last}"
        );
    }
}

/// An eager node walks its wish list a window at a time (256 wishes), round and round: with 700
/// wishes arriving while it fetches (more than two windows, some behind where the walk is), it
/// still comes to hold every NAR.
#[test]
fn an_eager_node_fetches_a_wish_list_longer_than_its_window() {
    let out = bench(&["--nodes", "2", "--paths", "700", "--replicate", "eager"])
        .args([
            "--large-every",
            "0",
            "--small",
            "1KiB..2KiB",
            "--chain",
            "1",
        ])
        .args(["--no-seed", "--timeout", "120", "--json"])
        .output()
        .expect("run narmesh bench");
    let r = report(&out);
    assert_eq!(r["errors"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["replicated_paths"], serde_json::json!(700), "{r:#}");
    let eager = r["peer_transfer"]["per_peer_mib_s"][0]
        .as_f64()
        .unwrap_or(0.0);
    assert!(eager > 0.0, "the eager peer came to hold every NAR: {r:#}");
}

/// A run that does not replicate everything still prints its report, naming what failed, and
/// then exits 1: here the peer's database refuses every announcement (an injected fault the
/// bench's nodes inherit), so no path becomes servable on it.
#[test]
fn a_run_that_does_not_replicate_everything_reports_and_exits_1() {
    let out = bench(&["--nodes", "2", "--paths", "4", "--large-every", "0"])
        .args(["--no-seed", "--timeout", "5", "--json"])
        .env("NARMESH_TEST_FAULT", "mesh.record-fails:1000000")
        .output()
        .expect("run narmesh bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no report ({e}): {stdout}"));
    assert!(
        r["replicated_paths"].as_u64().is_some_and(|n| n < 4),
        "{r:#}"
    );
    let errors = r["errors"].as_array().expect("errors");
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .is_some_and(|e| e.contains("were not servable on every node"))),
        "{r:#}"
    );
    assert!(stderr.contains("error(s), see the report"), "{stderr}");
}

/// A run whose nodes' copies would not fit refuses at once, naming the space it needs, instead
/// of stalling half-way: 800 MiB of room, a workload of 2 x 50 MiB (its store takes 100 MiB
/// of the room) kept by 3 nodes, plus 512 MiB to spare: 812 MiB. One copy would fit.
#[test]
fn a_bench_without_room_for_its_copies_refuses_before_starting_nodes() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("small");
    let _fs = crate::harness::Tmpfs::mount(&dir, "800m");
    let started = std::time::Instant::now();
    let out = bench(&["--nodes", "3", "--paths", "2", "--large", "50MiB"])
        .args([
            "--large-every",
            "1",
            "--no-seed",
            "--timeout",
            "20",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("run narmesh bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it ran: {stderr}");
    assert!(
        stderr.contains("MiB free; this workload needs about 812 MiB")
            && stderr.contains("on each of 3 nodes")
            && stderr.contains("--dir"),
        "{stderr}"
    );
    // Refused before any node was set up.
    assert!(!dir.join("n0").exists(), "a node was set up");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn the_synthetic_store_is_a_valid_nix_store() {
    require("nix-store");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let shape = narmesh::bench::synth::Shape {
        paths: 12,
        small: (1, 100_000),
        large: 3 << 20,
        large_every: 5,
        chain: 3,
        seed: 42,
    };
    let paths = narmesh::bench::synth::generate(&root, &shape).expect("generate");
    let nix = |args: &[&str]| {
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("nix.conf"),
            "build-users-group =\nexperimental-features = nix-command\nsubstituters =\n",
        )
        .expect("nix.conf");
        let mut c = Command::new(args[0]);
        c.args(&args[1..])
            .env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", "/dev/null")
            .env("XDG_CACHE_HOME", dir.path().join("cache"));
        String::from_utf8(run_ok(&mut c)).expect("utf-8")
    };
    let store = root.to_str().expect("utf-8 path");
    // Nix re-hashes every path's contents against the database.
    nix(&[
        "nix-store",
        "--store",
        store,
        "--verify",
        "--check-contents",
    ]);
    for (i, p) in paths.iter().enumerate() {
        let refs = nix(&[
            "nix-store",
            "--store",
            store,
            "-q",
            "--references",
            &p.path.full(),
        ]);
        let want = if i % 3 != 0 {
            format!("{}\n", paths[i - 1].path.full())
        } else {
            String::new()
        };
        assert_eq!(refs, want, "references of path {i}");
        nix(&[
            "nix-store",
            "--store",
            store,
            "--verify-path",
            &p.path.full(),
        ]);
        let size = nix(&[
            "nix-store",
            "--store",
            store,
            "-q",
            "--size",
            &p.path.full(),
        ]);
        assert_eq!(size.trim(), p.nar_size.to_string());
    }
}
