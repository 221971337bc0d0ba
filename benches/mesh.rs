//! The mesh's speed goals, each beside its baseline measured in the same run:
//! - peer NAR transfer of a 256 MiB NAR on loopback (node B fetching from node A over iroh,
//!   verified and kept), beside a plain TCP copy of the same bytes into a file;
//! - from the hook's acknowledgement on A to the narinfo being served on every one of 3 nodes.
//!
//! Run: `cargo bench --bench mesh` (needs nix-bin). Prints a table.

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/node_harness.rs"]
mod node_harness;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use harness::{NixHost, http, require, wait_until};
use narmesh_proto::control::{Request, Response};
use narmesh_proto::hook::HookReport;
use node_harness::Node;

const BIG: usize = 256 << 20;
const LATENCY_PATHS: usize = 100;
/// Runs of the transfer (NARMESH_BENCH_RUNS overrides).
fn runs() -> usize {
    std::env::var("NARMESH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn mesh(t: &std::path::Path, a: &NixHost, n: usize, replicate: &'static str) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(&t.join(format!("n{i}")), &a.root))
        .collect();
    node_harness::full_mesh(&mut nodes);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.replicate = replicate;
        if i > 0 {
            node.store_root = node.dir.join("store");
        }
        node.start();
    }
    nodes
}

/// Plain TCP on loopback: send `file`'s bytes, the receiver writes them into a file.
fn tcp_copy(file: &std::path::Path, dest: &std::path::Path) -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dest = dest.to_owned();
    let started = Instant::now();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut out = std::fs::File::create(&dest).expect("create");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).expect("write");
        }
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut f = std::fs::File::open(file).expect("open");
    std::io::copy(&mut f, &mut s).expect("copy");
    drop(s);
    rx.join().expect("receiver");
    started.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require("nix-build");
    let t = tempfile::tempdir().expect("tempdir");
    let a = NixHost::new("");
    println!("building a 256 MiB store path and {LATENCY_PATHS} small ones with Nix...");
    let big = a.build(&format!(r#"mk "big" "head -c {BIG} /dev/urandom > $out""#))[0].clone();
    let small = a.build(&format!(r#"builtins.genList (i: mk "lat-${{toString i}}" "echo ${{toString i}} > $out") {LATENCY_PATHS}"#));
    let nar_file = t.path().join("big.nar");
    let nar = a.dump(&big);
    std::fs::write(&nar_file, &nar).expect("write nar");
    drop(nar);

    // Transfer: B fetches A's NAR over iroh (on demand, through B's HTTP), verified and kept.
    let mut iroh_times = Vec::new();
    let mut tcp_times = Vec::new();
    for run in 0..runs() {
        let dir = t.path().join(format!("transfer{run}"));
        let nodes = mesh(&dir, &a, 2, "on-demand");
        nodes[0]
            .call(Request::Push {
                paths: vec![big.full()],
            })
            .expect("push");
        wait_until(120, "B to learn the big path", || {
            nodes[1].serves(&[big.full()])
        });
        let (_, _, info) = http(
            &nodes[1].http,
            "GET",
            &format!("/{}.narinfo", big.hash_part()),
            &[],
        );
        let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).expect("utf8"))
            .expect("narinfo");
        let started = Instant::now();
        let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{}", info.url), &[]);
        assert_eq!(code, 200);
        assert_eq!(body.len() as u64, info.nar_size, "NAR length");
        wait_until(60, "B to keep the NAR", || {
            nodes[1].status().nar_bytes >= BIG as u64
        });
        iroh_times.push(started.elapsed());
        drop(body);
        if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
            println!("--- B's log ---\n{}", nodes[1].log());
        }
        drop(nodes);
        tcp_times.push(tcp_copy(&nar_file, &t.path().join(format!("tcp{run}.nar"))));
    }

    // Latency: hook acknowledgement on A -> narinfo served on A, B and C.
    let nodes = mesh(&t.path().join("latency"), &a, 3, "on-demand");
    std::thread::sleep(Duration::from_secs(2));
    let mut lat = Vec::new();
    for p in &small {
        let report = Request::Hook(HookReport {
            drv_path: None,
            out_paths: vec![p.full()],
        });
        let r = nodes[0].call(report).expect("hook");
        assert!(matches!(r, Response::Accepted { .. }));
        let acked = Instant::now();
        let target = format!("/{}.narinfo", p.hash_part());
        let mut pending: Vec<&Node> = nodes.iter().collect();
        while !pending.is_empty() {
            pending.retain(|n| http(&n.http, "GET", &target, &[]).0 != 200);
            assert!(
                acked.elapsed() < Duration::from_secs(30),
                "narinfo never arrived"
            );
        }
        lat.push(acked.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;

    let mbs = |d: &Duration| (BIG as f64 / (1 << 20) as f64) / d.as_secs_f64();
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mi, mt) = (med(&mut iroh_times), med(&mut tcp_times));
    println!("\n| measure | narmesh | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| peer NAR transfer, 256 MiB, median of {} (min..max) | {:.0} MiB/s ({:.0}..{:.0}) | TCP copy into a file: {:.0} MiB/s ({:.0}..{:.0}) | {:.2}x |",
        runs(),
        mbs(&mi),
        mbs(iroh_times.last().expect("runs")),
        mbs(&iroh_times[0]),
        mbs(&mt),
        mbs(tcp_times.last().expect("runs")),
        mbs(&tcp_times[0]),
        mt.as_secs_f64() / mi.as_secs_f64()
    );
    println!(
        "| hook ack -> narinfo served on all 3 nodes, {LATENCY_PATHS} paths | p50 {:.1} / p99 {:.1} / max {:.1} ms | goal p99 < 50 ms | |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
