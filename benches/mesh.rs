//! The mesh's speed goals, each beside its baseline measured in the same run:
//! - peer NAR transfer of a 256 MiB NAR on loopback (node B fetching from node A over iroh,
//!   verified and kept), beside a plain TCP copy of the same bytes into a file;
//! - the CPU seconds per GiB both nodes spend on it, beside a verified TCP copy's;
//! - from the hook's acknowledgement on A to the narinfo being served on every one of 3 nodes;
//! - the transfer over emulated 10 and 1 Gbit/s links, real Nix over them, and two providers at
//!   once (`links`: needs root; `NARMESH_BENCH_LINKS=0` leaves them out).
//!
//! Run: `cargo bench --bench mesh` (needs nix-bin, and for the links iproute2, curl and nginx).
//! Prints a table.

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "mesh/links.rs"]
mod links;
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

/// Start each measurement with no dirty pages waiting, so earlier writes' writeback does not
/// throttle it.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn mesh(t: &std::path::Path, a: &NixHost, n: usize, replicate: &'static str) -> Vec<Node> {
    mesh_with(t, a, n, replicate, false)
}

fn mesh_with(
    t: &std::path::Path,
    a: &NixHost,
    n: usize,
    replicate: &'static str,
    bulk: bool,
) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(&t.join(format!("n{i}")), &a.root))
        .collect();
    node_harness::full_mesh(&mut nodes);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.replicate = replicate;
        if bulk {
            node.mesh_extra.push_str("bulk-listen = \"127.0.0.1:0\"\n");
        }
        if i > 0 {
            node.store_root = node.dir.join("store");
        }
        node.start();
    }
    nodes
}

/// Plain TCP on loopback: send `file`'s bytes, the receiver writes them into a file. With
/// `verify`, the receiver also does the least a verified transfer must: sha256 (on a second
/// thread, as the node does) and BLAKE3 of every byte; this is the floor of any transport here.
fn tcp_copy(file: &std::path::Path, dest: &std::path::Path, verify: bool) -> Duration {
    use sha2::Digest as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dest = dest.to_owned();
    let started = Instant::now();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut out = std::fs::File::create(&dest).expect("create");
        // Buffers go to the sha256 thread and come back, so none is allocated per chunk.
        let (sha_tx, sha_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let sha = std::thread::spawn(move || {
            let mut h = sha2::Sha256::new();
            for chunk in sha_rx {
                h.update(&chunk);
                let _ = back_tx.send(chunk);
            }
            h.finalize()
        });
        let mut b3 = blake3::Hasher::new();
        let mut spare = vec![vec![0u8; 1 << 20]; 6];
        loop {
            let mut buf = spare
                .pop()
                .unwrap_or_else(|| back_rx.recv().expect("buffer back"));
            buf.resize(1 << 20, 0);
            let mut n = 0;
            while n < buf.len() {
                let r = s.read(&mut buf[n..]).expect("read");
                if r == 0 {
                    break;
                }
                n += r;
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            out.write_all(&buf).expect("write");
            if verify {
                b3.update(&buf);
                sha_tx.send(buf).expect("sha thread");
            } else {
                spare.push(buf);
            }
        }
        drop(sha_tx);
        std::hint::black_box((b3.finalize(), sha.join().expect("sha")));
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
    // NARMESH_BENCH_ONLY=links: only the emulated links.
    if std::env::var("NARMESH_BENCH_ONLY").as_deref() == Ok("links") {
        for r in links::run(t.path()) {
            println!("{r}");
        }
        return;
    }
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
    let mut floor_times = Vec::new();
    let mut cpu = Vec::new();
    let mut floor_cpu = Vec::new();
    // NARMESH_BENCH_BULK=1: the transfer over the bulk channel (TCP) instead of QUIC.
    let bulk = std::env::var_os("NARMESH_BENCH_BULK").is_some();
    for run in 0..runs() {
        let dir = t.path().join(format!("transfer{run}"));
        let nodes = mesh_with(&dir, &a, 2, "on-demand", bulk);
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
        settle();
        let cpu0 = [nodes[0].cpu_seconds(), nodes[1].cpu_seconds()];
        // NARMESH_BENCH_PERF=FILE: profile both nodes during the transfer with `perf record`.
        let perf = std::env::var("NARMESH_BENCH_PERF").ok().map(|out| {
            let child = std::process::Command::new("perf")
                .args(["record", "-g", "-F", "999", "-o"])
                .arg(format!("{out}.{run}"))
                .arg("-p")
                .arg(format!("{},{}", nodes[0].pid(), nodes[1].pid()))
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf");
            std::thread::sleep(Duration::from_millis(300));
            child
        });
        let started = Instant::now();
        let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{}", info.url), &[]);
        assert_eq!(code, 200);
        assert_eq!(
            body.len() as u64,
            info.nar_size,
            "NAR length; A's log:\n{}\nB's log:\n{}",
            nodes[0].log(),
            nodes[1].log()
        );
        wait_until(60, "B to keep the NAR", || {
            nodes[1].status().nar_bytes >= BIG as u64
        });
        iroh_times.push(started.elapsed());
        cpu.push((
            nodes[0].cpu_seconds() - cpu0[0],
            nodes[1].cpu_seconds() - cpu0[1],
        ));
        if let Some(mut p) = perf {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &p.id().to_string()])
                .status();
            let _ = p.wait();
        }
        if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
            println!(
                "transfer {:?}: CPU A (pid {}) {:.2} s, B (pid {}) {:.2} s",
                started.elapsed(),
                nodes[0].pid(),
                nodes[0].cpu_seconds() - cpu0[0],
                nodes[1].pid(),
                nodes[1].cpu_seconds() - cpu0[1]
            );
        }
        drop(body);
        if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
            println!("--- B's log ---\n{}", nodes[1].log());
        }
        drop(nodes);
        for (verify, times) in [(false, &mut tcp_times), (true, &mut floor_times)] {
            settle();
            let dest = t.path().join(format!("copy{run}-{verify}.nar"));
            let cpu0 = node_harness::proc_cpu_seconds("self");
            let took = tcp_copy(&nar_file, &dest, verify);
            if verify {
                floor_cpu.push(node_harness::proc_cpu_seconds("self") - cpu0);
            }
            if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
                println!("TCP copy (verify: {verify}): {took:?}");
            }
            times.push(took);
        }
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
    let (mi, mt, mf) = (
        med(&mut iroh_times),
        med(&mut tcp_times),
        med(&mut floor_times),
    );
    // Ratios compare best runs: writes into files on this disk vary from run to run with
    // writeback, and the best run of each is the least disturbed.
    println!(
        "\npeer transfer over {}",
        if bulk {
            "the bulk channel (TCP)"
        } else {
            "QUIC"
        }
    );
    println!("\n| measure | narmesh | baseline (same run) | ratio (best runs) |");
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
        tcp_times[0].as_secs_f64() / iroh_times[0].as_secs_f64()
    );
    println!(
        "| verified floor: TCP copy into a file + sha256 + BLAKE3 at the receiver, median of {} | {:.0} MiB/s ({:.0}..{:.0}) | TCP copy into a file (above) | {:.2}x |",
        runs(),
        mbs(&mf),
        mbs(floor_times.last().expect("runs")),
        mbs(&floor_times[0]),
        tcp_times[0].as_secs_f64() / floor_times[0].as_secs_f64()
    );
    cpu.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ca, cb) = cpu[cpu.len() / 2];
    println!(
        "| CPU time of the transfer (run of median sender CPU) | sender {ca:.2} s, receiver {cb:.2} s, for {:.2} s of wall time | 2 cores | |",
        mi.as_secs_f64()
    );
    floor_cpu.sort_by(f64::total_cmp);
    let per_gib = |s: f64| s * (1u64 << 30) as f64 / BIG as f64;
    let floor = per_gib(floor_cpu[floor_cpu.len() / 2]);
    println!(
        "| CPU seconds per GiB moved, sender + receiver | {:.2} s | verified TCP copy (sender + receiver, median): {floor:.2} s | {:.2}x (goal <= 2x) |",
        per_gib(ca + cb),
        per_gib(ca + cb) / floor
    );
    println!(
        "| hook ack -> narinfo served on all 3 nodes, {LATENCY_PATHS} paths | p50 {:.1} / p99 {:.1} / max {:.1} ms | goal p99 < 50 ms | |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    if std::env::var("NARMESH_BENCH_LINKS").as_deref() != Ok("0") {
        drop(nodes);
        println!("\nover emulated links (network namespaces, tc tbf):");
        let rows = links::run(t.path());
        println!("\n| measure | narmesh | baseline (same run) | ratio |");
        println!("|---|---|---|---|");
        for r in rows {
            println!("{r}");
        }
    }
}
