//! The mesh at the scale of a build farm's LAN, each goal beside its baseline from the same run:
//! - 12 nodes: from the hook's acknowledgement on A to the narinfo served by every live node,
//!   with all 12 healthy (the baseline) and with one frozen by SIGSTOP (goal: p99 < 100 ms);
//!   the frozen node then catches up after SIGCONT;
//! - catch-up of 20,000 records from one peer by a node that was away (goal: < 5 s), beside
//!   fetching the same 20,000 narinfos from that peer's HTTP cache one after another on one
//!   keep-alive connection;
//! - peak RSS (`VmHWM`) of a node that knows 100,000 records, after catching up and after serving
//!   every narinfo once (goal: < 100 MiB), beside an idle node's.
//!
//! Run: `cargo bench --bench scale` (needs nix-bin). `NARMESH_BENCH_RECORDS` sets the records of
//! the memory measure (100,000), `NARMESH_BENCH_NODES` the nodes of the latency one (12),
//! `NARMESH_BENCH_ONLY` (`latency` or `records`) runs one part; `NARMESH_BENCH_DUMP` prints
//! each path's latency in order (periodic spikes show work done in rounds).

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/node_harness.rs"]
mod node_harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::{NixHost, http, require, wait_until};
use narmesh::bench::synth::{self, Shape};
use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::hook::HookReport;
use node_harness::Node;

const LATENCY_PATHS: usize = 100;
const CATCH_UP: usize = 20_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmHWM`, `VmRSS` and `RssAnon` of a process, in MiB, and its threads.
fn memory(pid: u32) -> (f64, f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("a memory field")
            / 1024.0
    };
    (
        field("VmHWM:"),
        field("VmRSS:"),
        field("RssAnon:"),
        field("Threads:") * 1024.0,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

/// Report `paths` to a node as hook frames of up to 500 paths each, on one connection.
fn report(node: &Node, paths: &[String]) {
    let mut s = std::os::unix::net::UnixStream::connect(node.socket()).expect("connect");
    for chunk in paths.chunks(500) {
        let env = Envelope {
            version: 1,
            request: Request::Hook(HookReport {
                drv_path: None,
                out_paths: chunk.to_vec(),
            }),
        };
        narmesh_proto::frame::write_frame(&mut s, &env).expect("send");
        let r: Response = narmesh_proto::frame::read_frame(&mut s).expect("ack");
        assert!(matches!(r, Response::Accepted { .. }), "{r:?}");
    }
}

/// GET every target on one keep-alive HTTP/1.1 connection; every answer must be 200.
fn get_all(addr: &str, targets: impl Iterator<Item = String>) -> usize {
    let conn = TcpStream::connect(addr).expect("connect http");
    conn.set_nodelay(true).expect("nodelay");
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let mut n = 0;
    for t in targets {
        write!(w, "GET {t} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send");
        let mut line = String::new();
        r.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200"), "{t}: {line}");
        let mut len = 0usize;
        loop {
            line.clear();
            r.read_line(&mut line).expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("body");
        n += 1;
    }
    n
}

/// Hook acknowledgement on `nodes[0]` to the narinfo served by every node in `live`, per path.
fn latency(nodes: &[Node], live: &[usize], paths: &[narmesh::nix::StorePath]) -> Vec<Duration> {
    let mut lat = Vec::new();
    for p in paths {
        let r = nodes[0]
            .call(Request::Hook(HookReport {
                drv_path: None,
                out_paths: vec![p.full()],
            }))
            .expect("hook");
        assert!(matches!(r, Response::Accepted { .. }), "{r:?}");
        let acked = Instant::now();
        let target = format!("/{}.narinfo", p.hash_part());
        let mut pending: Vec<usize> = live.to_vec();
        while !pending.is_empty() {
            pending.retain(|&i| http(&nodes[i].http, "GET", &target, &[]).0 != 200);
            assert!(
                acked.elapsed() < Duration::from_secs(60),
                "narinfo of {} never arrived on nodes {pending:?}",
                p.full()
            );
        }
        lat.push(acked.elapsed());
    }
    if std::env::var("NARMESH_BENCH_DUMP").is_ok() {
        let ms: Vec<u128> = lat.iter().map(|d| d.as_millis()).collect();
        println!("{ms:?}");
    }
    lat.sort();
    lat
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require("nix-build");
    let n_nodes = env_or("NARMESH_BENCH_NODES", 12);
    let records = env_or("NARMESH_BENCH_RECORDS", 100_000).max(CATCH_UP);
    let t = tempfile::tempdir().expect("tempdir");
    let mut rows: Vec<String> = Vec::new();

    // 1. Latency on n nodes, healthy then with the last one frozen.
    let only = std::env::var("NARMESH_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "latency" {
        latency_part(&t, n_nodes, &mut rows);
    }
    if only.is_empty() || only == "records" {
        records_part(&t, records, &mut rows);
    }
    println!("\n| measure | narmesh | baseline (same run) | ratio / goal |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

fn latency_part(t: &tempfile::TempDir, n_nodes: usize, rows: &mut Vec<String>) {
    println!("building {} small paths with Nix...", 2 * LATENCY_PATHS);
    let a = NixHost::new("");
    let outs = a.build(&format!(
        r#"builtins.genList (i: mk "scale-${{toString i}}" "echo ${{toString i}} > $out") {}"#,
        2 * LATENCY_PATHS
    ));
    let mut nodes: Vec<Node> = (0..n_nodes)
        .map(|i| Node::new(&t.path().join(format!("lat{i}")), &a.root))
        .collect();
    node_harness::full_mesh(&mut nodes);
    for (i, node) in nodes.iter_mut().enumerate() {
        if i > 0 {
            node.store_root = node.dir.join("store");
        }
        // Catch-up every 0.5 s (the test harness's, a tenth of the default): ten rounds with
        // every peer per second of the measure. `NARMESH_BENCH_MESH_EXTRA` replaces it.
        if let Ok(extra) = std::env::var("NARMESH_BENCH_MESH_EXTRA") {
            node.mesh_extra = extra;
        }
        node.start();
    }
    // Let every gossip link come up.
    std::thread::sleep(Duration::from_secs(5));
    let all: Vec<usize> = (0..n_nodes).collect();
    println!("latency, {n_nodes} healthy nodes...");
    let healthy = latency(&nodes, &all, &outs[..LATENCY_PATHS]);
    let frozen = n_nodes - 1;
    nodes[frozen].signal("STOP");
    let live: Vec<usize> = (0..frozen).collect();
    println!("latency, node {frozen} frozen...");
    let with_frozen = latency(&nodes, &live, &outs[LATENCY_PATHS..]);
    let thawed = Instant::now();
    nodes[frozen].signal("CONT");
    let every: Vec<String> = outs.iter().map(|p| p.full()).collect();
    wait_until(120, "the frozen node to catch up after SIGCONT", || {
        nodes[frozen].serves(&every)
    });
    let thaw = thawed.elapsed();
    rows.push(format!(
        "| hook ack -> narinfo served on every live node, {n_nodes} nodes, one frozen (SIGSTOP), {LATENCY_PATHS} paths | p50 {:.1} / p99 {:.1} / max {:.1} ms | all {n_nodes} healthy: p50 {:.1} / p99 {:.1} / max {:.1} ms | goal p99 < 100 ms |",
        percentile(&with_frozen, 0.5),
        percentile(&with_frozen, 0.99),
        percentile(&with_frozen, 1.0),
        percentile(&healthy, 0.5),
        percentile(&healthy, 0.99),
        percentile(&healthy, 1.0),
    ));
    rows.push(format!(
        "| the frozen node, after SIGCONT, serves all {} paths | {:.2} s | | |",
        every.len(),
        thaw.as_secs_f64()
    ));
    for n in nodes.iter_mut() {
        n.stop();
    }
}

fn records_part(t: &tempfile::TempDir, records: usize, rows: &mut Vec<String>) {
    // 2. Catch-up of 20,000 records, and memory with `records` known.
    println!("generating {records} synthetic store paths...");
    let store = t.path().join("synth");
    let made = Instant::now();
    let work = synth::generate(
        &store,
        &Shape {
            paths: records,
            small: (16, 256),
            large: 0,
            large_every: 0,
            chain: 0,
            seed: 11,
        },
    )
    .expect("synthetic store");
    println!("  in {:.1} s", made.elapsed().as_secs_f64());
    let paths: Vec<String> = work.iter().map(|w| w.path.full()).collect();
    let mut nodes: Vec<Node> = ["origin", "away"]
        .iter()
        .map(|n| Node::new(&t.path().join(n), &store))
        .collect();
    node_harness::full_mesh(&mut nodes);
    nodes[1].store_root = nodes[1].dir.join("store");
    // A profiler to run the node that catches up under, such as `heaptrack -o /tmp/away`.
    if let Ok(w) = std::env::var("NARMESH_BENCH_WRAP_AWAY") {
        nodes[1].wrap = w.split_whitespace().map(str::to_owned).collect();
    }
    let mut idle = Node::new(&t.path().join("idle"), &t.path().join("idle/store"));
    node_harness::full_mesh(std::slice::from_mut(&mut idle));
    idle.start();
    nodes[0].start();
    let ingest = Instant::now();
    report(&nodes[0], &paths[..CATCH_UP]);
    wait_until(600, "the origin to record the first batch", || {
        nodes[0].status().paths_recorded as usize >= CATCH_UP
    });
    let ingest_first = ingest.elapsed();
    // Baseline: the same records as narinfos over HTTP, one after another.
    let fetched = Instant::now();
    let got = get_all(
        &nodes[0].http,
        work[..CATCH_UP]
            .iter()
            .map(|w| format!("/{}.narinfo", w.path.hash_part())),
    );
    let http_time = fetched.elapsed();
    assert_eq!(got, CATCH_UP);
    println!("catch-up of {CATCH_UP} records...");
    let started = Instant::now();
    nodes[1].start();
    wait_until(300, "the node that was away to catch up", || {
        nodes[1].status().paths_recorded as usize >= CATCH_UP
    });
    let catch_up = started.elapsed();
    rows.push(format!(
        "| catch-up of {CATCH_UP} records from one peer (node start to all recorded) | {:.2} s ({:.0} records/s) | the same {CATCH_UP} narinfos over HTTP from that peer, one keep-alive connection: {:.2} s | {:.2}x; goal < 5 s |",
        catch_up.as_secs_f64(),
        CATCH_UP as f64 / catch_up.as_secs_f64(),
        http_time.as_secs_f64(),
        http_time.as_secs_f64() / catch_up.as_secs_f64()
    ));
    println!("the rest: {} records...", records - CATCH_UP);
    report(&nodes[0], &paths[CATCH_UP..]);
    wait_until(1200, "the origin to record everything", || {
        nodes[0].status().paths_recorded as usize >= records
    });
    let ingest_all = ingest.elapsed();
    wait_until(600, "the other node to learn everything", || {
        nodes[1].status().paths_recorded as usize >= records
    });
    let learnt = ingest.elapsed();
    let after_catch_up = memory(nodes[1].pid());
    let served = Instant::now();
    let got = get_all(
        &nodes[1].http,
        work.iter()
            .map(|w| format!("/{}.narinfo", w.path.hash_part())),
    );
    assert_eq!(got, records);
    let serve_time = served.elapsed();
    let after_serving = memory(nodes[1].pid());
    let origin = memory(nodes[0].pid());
    let idle_mem = memory(idle.pid());
    rows.push(format!(
        "| peak RSS (VmHWM) of a node knowing {records} records, after catch-up / after serving each narinfo once | {:.0} / {:.0} MiB (RSS now {:.0}, anonymous {:.0}; {:.0} threads) | an idle node: {:.0} MiB; the origin that ingested them: {:.0} MiB | goal < 100 MiB |",
        after_catch_up.0,
        after_serving.0,
        after_serving.1,
        after_serving.2,
        after_serving.3,
        idle_mem.0,
        origin.0
    ));
    rows.push(format!(
        "| ingest of {records} paths by the origin (first {CATCH_UP} / all) | {:.1} s / {:.1} s ({:.0} paths/s) | | |",
        ingest_first.as_secs_f64(),
        ingest_all.as_secs_f64(),
        records as f64 / ingest_all.as_secs_f64()
    ));
    rows.push(format!(
        "| the other node knows all {records} (from the first report) / serves each narinfo once | {:.1} s / {:.1} s ({:.0} narinfos/s) | | |",
        learnt.as_secs_f64(),
        serve_time.as_secs_f64(),
        records as f64 / serve_time.as_secs_f64()
    ));
    for n in nodes.iter_mut() {
        n.stop();
    }
    idle.stop();
}
