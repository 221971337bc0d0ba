//! Bounded disk, with real Nix and real node processes: a node keeps no copy of what its host
//! built (it serves it from the Nix store), keeps what it fetched from peers within its cap
//! (least recently used evicted, never a NAR being read), follows Nix GC, and takes over a data
//! dir of the previous format.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use narmesh::nix::StorePath;

use crate::harness::{NixHost, disk_usage, http, run_ok, wait_until};
use crate::node_harness::Node;
use crate::trust::metric;

/// Bytes the process has caused to be written to storage (`/proc/PID/io`).
fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes")
}

/// `n` paths of `mib` MiB of random bytes each (plus `marker` in each), built by `host`.
fn build_big(host: &NixHost, tag: &str, n: usize, mib: usize, marker: &str) -> Vec<StorePath> {
    host.build(&format!(
        r#"builtins.genList (i: mk "{tag}-${{toString i}}" "mkdir $out; head -c {} /dev/urandom > $out/data; echo {marker} > $out/marker") {n}"#,
        mib << 20
    ))
}

fn full(paths: &[StorePath]) -> Vec<String> {
    paths.iter().map(|p| p.full()).collect()
}

/// The narinfo `node`'s cache serves for `p`.
pub fn narinfo(node: &Node, p: &StorePath) -> narmesh::nix::NarInfo {
    let (_, _, info) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", p.hash_part()),
        &[],
    );
    narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap()
}

/// The file of `node`'s storage that holds the NAR `info` names.
fn nar_file(node: &Node, info: &narmesh::nix::NarInfo) -> std::path::PathBuf {
    node.dir.join("data/nars").join(format!(
        "{}.nar",
        info.url.trim_start_matches("nar/").trim_end_matches(".nar")
    ))
}

/// Nodes A (building host, hook), B and C, meshed; C's host substitutes through C's node.
struct Three {
    // Dropped in this order: the nodes (killed, their logs shown if the test failed) before
    // their directory.
    nodes: Vec<Node>,
    a: NixHost,
    _t: tempfile::TempDir,
}

fn three(b_replicate: &'static str, b_extra: &str) -> Three {
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    crate::node_harness::full_mesh(&mut nodes);
    nodes[0].store_root = a.root.clone();
    nodes[0].extra_config = "[store]\ngc-check-secs = 1\n".into();
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        n.store_root = n.dir.join("store");
        if i == 1 {
            n.replicate = b_replicate;
            n.extra_config = b_extra.into();
        }
    }
    Three { nodes, a, _t: t }
}

/// A builds 100 MiB; eager B, capped at 20 MiB, stays within its cap at every sample (a fetch
/// reserves its room before it starts), and a third host still substitutes every path through
/// its own node, from A's store or B's files.
#[test]
fn a_capped_eager_node_stays_within_its_cap_and_everything_stays_substitutable() {
    let mut cl = three(
        "eager",
        "[store]\nmax-size = \"20MiB\"\nmin-free = \"1MiB\"\n",
    );
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    let b_nars = cl.nodes[1].dir.join("data/nars");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, dir) = (stop.clone(), b_nars.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(disk_usage(&dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let outs = build_big(&cl.a, "capped", 10, 10, "m");
    let paths = full(&outs);
    wait_until(60, "A to serve everything", || cl.nodes[0].serves(&paths));
    // B fetches everything it learns, evicting to stay within its cap.
    wait_until(60, "B to have fetched every NAR once", || {
        let st = cl.nodes[1].status().storage;
        st.evictions + st.files == 10
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    let nar = 10 << 20;
    assert!(
        peak <= (20 << 20) + nar,
        "B's NAR files reached {peak} bytes on disk, over the cap of 20 MiB plus one NAR"
    );
    let st = cl.nodes[1].status().storage;
    assert!(st.file_bytes <= 20 << 20, "{st:?}");
    assert_eq!(st.cap_bytes, 20 << 20);
    // Evicted NARs are not wanted again: the eviction count stays put.
    let evictions = st.evictions;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cl.nodes[1].status().storage.evictions,
        evictions,
        "no fetch-evict loop"
    );
    // A third host, through its own node, gets every path.
    let key = cl.nodes[2].public_key();
    let c = NixHost::substituter(&format!("http://{}", cl.nodes[2].http), &key);
    let mut args = vec!["-r"];
    args.extend(paths.iter().map(|s| s.as_str()));
    run_ok(c.cmd("nix-store").args(&args));
    assert_eq!(c.closure(&outs).len(), 10);
    // What alerts read, in /metrics (`narmesh status` reads the same numbers another way).
    let b = &cl.nodes[1];
    let st = b.status().storage;
    assert!(st.evictions > 0, "{st:?}");
    assert_eq!(
        metric(b, "narmesh_storage_evictions_total "),
        st.evictions as f64
    );
    assert_eq!(
        metric(b, "narmesh_storage_cap_bytes "),
        (20u64 << 20) as f64
    );
    assert_eq!(
        metric(b, "narmesh_storage_file_bytes "),
        st.file_bytes as f64
    );
    let served = metric(
        &cl.nodes[2],
        "narmesh_served_nar_bytes_total{source=\"peer\"} ",
    );
    assert!(served >= (100u64 << 20) as f64, "C served {served} bytes");
    let acks = metric(&cl.nodes[0], "narmesh_hook_ack_seconds_count ");
    assert!(acks >= 10.0, "A acknowledged {acks} hooks");
}

/// The building host's node writes no NAR bytes: about 50 MiB of builds cost it a few hundred
/// KiB of writes (records, leaves, logs), and a marker inside the outputs is nowhere in its data
/// dir. It still serves everything, verified, from the Nix store.
#[test]
fn the_building_node_keeps_no_copy_of_what_it_built() {
    let mut cl = three("on-demand", "");
    cl.nodes[0].start();
    let marker = format!("narmesh-marker-{}", std::process::id() as u64 * 7919 + 4242);
    let before = write_bytes(cl.nodes[0].pid());
    let outs = build_big(&cl.a, "nocopy", 5, 10, &marker);
    let paths = full(&outs);
    wait_until(60, "A to serve everything", || cl.nodes[0].serves(&paths));
    let written = write_bytes(cl.nodes[0].pid()) - before;
    let built: u64 = 50 << 20;
    assert!(
        written * 50 < built,
        "A wrote {written} bytes for {built} bytes of builds (at most 2% allowed)"
    );
    let data = cl.nodes[0].dir.join("data");
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                assert!(
                    !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                    "the marker is in {}",
                    p.display()
                );
            }
        }
    }
    assert!(
        !data
            .join("nars")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().path().is_file())
    );
    let st = cl.nodes[0].status().storage;
    assert_eq!((st.own_paths, st.files), (5, 0), "{st:?}");
    // Served from the store, byte for byte as Nix dumps it.
    let (_, _, info) = http(
        &cl.nodes[0].http,
        "GET",
        &format!("/{}.narinfo", outs[0].hash_part()),
        &[],
    );
    let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap();
    let (code, _, body) = http(&cl.nodes[0].http, "GET", &format!("/{}", info.url), &[]);
    assert_eq!(code, 200);
    assert!(
        body == cl.a.dump(&outs[0]),
        "the NAR served equals Nix's own"
    );
    let (code, _, part) = http(
        &cl.nodes[0].http,
        "GET",
        &format!("/{}", info.url),
        &[("Range", "bytes=5000000-5100000")],
    );
    assert_eq!(code, 206);
    assert!(
        part == body[5_000_000..=5_100_000],
        "a range from the middle"
    );
}

/// `nix-store --delete` on A: A stops serving the path as its own. Where a peer holds it, it
/// stays substitutable (through A too); where none does, A answers 404 for its narinfo.
#[test]
fn nix_gc_on_the_building_host_is_followed() {
    let mut cl = three("on-demand", "");
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    let outs = cl.a.build(
        r#"[ (mk "gc-kept" "head -c 100000 /dev/urandom > $out") (mk "gc-alone" "head -c 100000 /dev/urandom > $out") ]"#,
    );
    let (kept, alone) = (outs[0].clone(), outs[1].clone());
    wait_until(30, "B to learn the paths", || {
        cl.nodes[1].serves(&full(&outs))
    });
    // B fetches `kept` (its Nix substitutes it), so B holds a copy.
    let key = cl.nodes[1].public_key();
    let b_host = NixHost::substituter(&format!("http://{}", cl.nodes[1].http), &key);
    run_ok(b_host.cmd("nix-store").args(["-r", &kept.full()]));
    wait_until(10, "B to keep the NAR", || {
        cl.nodes[1].status().storage.files == 1
    });
    // Builds only add to A's store: A looks its own paths up once (its first check with
    // some), not at every check after a build.
    let checks = "narmesh_storage_own_path_checks_total ";
    wait_until(10, "A to check its own paths", || {
        metric(&cl.nodes[0], checks) == 1.0
    });
    let more = cl.a.build(r#"mk "gc-more" "echo more > $out""#);
    wait_until(10, "A to serve the new path", || {
        cl.nodes[0].serves(&full(&more))
    });
    std::thread::sleep(Duration::from_secs(3)); // three of A's checks
    assert_eq!(metric(&cl.nodes[0], checks), 1.0);
    for p in [&kept, &alone] {
        run_ok(cl.a.cmd("nix-store").args(["--delete", &p.full()]));
    }
    wait_until(20, "A to notice the deletions", || {
        cl.nodes[0].status().storage.gc_lost == 2
    });
    assert_eq!(cl.nodes[0].status().storage.own_paths, 1);
    assert!(metric(&cl.nodes[0], checks) >= 2.0);
    let narinfo = |p: &StorePath| format!("/{}.narinfo", p.hash_part());
    wait_until(20, "A to stop offering the path no peer holds", || {
        http(&cl.nodes[0].http, "GET", &narinfo(&alone), &[]).0 == 404
    });
    wait_until(20, "the others to stop offering it", || {
        http(&cl.nodes[1].http, "GET", &narinfo(&alone), &[]).0 == 404
            && http(&cl.nodes[2].http, "GET", &narinfo(&alone), &[]).0 == 404
    });
    // `kept` is still had from B, also through A and C.
    for n in [&cl.nodes[0], &cl.nodes[2]] {
        assert_eq!(http(&n.http, "GET", &narinfo(&kept), &[]).0, 200);
        let host = NixHost::substituter(&format!("http://{}", n.http), &n.public_key());
        run_ok(host.cmd("nix-store").args(["-r", &kept.full()]));
        run_ok(host.cmd("nix-store").args(["--verify-path", &kept.full()]));
    }
}

/// A path A deleted and built again with other bytes while C was away: C learns the second
/// build, but its record still says A holds the first (A speaks only of the build it holds now,
/// so its withdrawal of the first never reaches C). C serves the first build's narinfo until
/// A answers that it lacks that NAR; from then on C serves the second build, and Nix
/// substitutes it through C.
#[test]
fn a_holder_that_lacks_a_nar_is_taken_at_its_word() {
    let mut cl = three("on-demand", "");
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    let expr = r#"mk "stale-holder" "head -c 100000 /dev/urandom > $out""#;
    let path = cl.a.build(expr)[0].clone();
    wait_until(30, "C to learn the path", || {
        cl.nodes[2].serves(&[path.full()])
    });
    let nar_hash = |host: &NixHost| {
        let out = run_ok(host.cmd("nix-store").args(["-q", "--hash", &path.full()]));
        String::from_utf8(out).unwrap().trim().to_owned()
    };
    let first = nar_hash(&cl.a);
    let narinfo = format!("/{}.narinfo", path.hash_part());
    // The NarHash and URL of the narinfo a node serves (empty if it serves none).
    let served = |n: &Node| {
        let (status, _, body) = http(&n.http, "GET", &narinfo, &[]);
        if status != 200 {
            return (String::new(), String::new());
        }
        let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&body).unwrap()).unwrap();
        let hash = format!("sha256:{}", narmesh::nix::base32::encode(&info.nar_hash.0));
        (hash, info.url)
    };
    assert_eq!(served(&cl.nodes[2]).0, first);

    cl.nodes[2].signal("STOP");
    run_ok(cl.a.cmd("nix-store").args(["--delete", &path.full()]));
    wait_until(20, "A to notice the deletion", || {
        cl.nodes[0].status().storage.gc_lost == 1
    });
    assert_eq!(cl.a.build(expr)[0], path);
    let second = nar_hash(&cl.a);
    assert_ne!(first, second, "the build is not reproducible");
    wait_until(20, "A to serve the second build", || {
        served(&cl.nodes[0]).0 == second
    });
    cl.nodes[2].signal("CONT");
    let c = &cl.nodes[2];
    // C still believes A holds the first build: its narinfo, and a NAR A answers it lacks.
    let (hash, url) = served(c);
    assert_eq!(hash, first, "C's record lists the first build first");
    let status = http(&c.http, "GET", &format!("/{url}"), &[]).0;
    assert_ne!(status, 200, "A no longer holds the first build's NAR");
    wait_until(20, "C to serve the second build", || served(c).0 == second);
    let host = NixHost::substituter(&format!("http://{}", c.http), &c.public_key());
    run_ok(host.cmd("nix-store").args(["-r", &path.full()]));
    assert_eq!(nar_hash(&host), second);
}

/// Whether each path is recorded (and servable) on `node`.
fn recorded(node: &Node, paths: &[&StorePath]) -> Vec<bool> {
    use narmesh_proto::control::{Request, Response};
    let paths = paths.iter().map(|p| p.full()).collect();
    match node.call(Request::Lookup { paths }) {
        Ok(Response::Known { recorded }) => recorded,
        other => panic!("lookup: {other:?}"),
    }
}

/// Three nodes that forget dead records after 2 s (C: `c_forget_after`), A checking its store
/// every second; A and B started, A has built two small paths (`<tag>-kept`, `<tag>-gone`)
/// and B has learnt both.
fn forgetting(tag: &str, c_forget_after: u64) -> (Three, StorePath, StorePath) {
    let store = |extra: &str| format!("[store]\nmin-free = \"64MiB\"\n{extra}");
    let mut cl = three("on-demand", &store("forget-after-secs = 2\n"));
    cl.nodes[0].extra_config = store("gc-check-secs = 1\nforget-after-secs = 2\n");
    cl.nodes[2].extra_config = store(&format!("forget-after-secs = {c_forget_after}\n"));
    cl.nodes[0].start();
    cl.nodes[1].start();
    let outs = cl.a.build(&format!(
        r#"[ (mk "{tag}-kept" "head -c 10000 /dev/urandom > $out") (mk "{tag}-gone" "head -c 10000 /dev/urandom > $out") ]"#
    ));
    wait_until(30, "B to learn both paths", || {
        cl.nodes[1].serves(&full(&outs))
    });
    let (kept, gone) = (outs[0].clone(), outs[1].clone());
    (cl, kept, gone)
}

/// A path nobody holds any more is forgotten everywhere once `forget-after-secs` passed: A
/// deletes it from its store, B (which never fetched it) learns of the withdrawal, both drop
/// its record, and a node that joins later never hears of it; a path A still holds, recorded
/// before it, stays on every node.
#[test]
fn a_path_nobody_holds_is_forgotten_everywhere() {
    // C never forgets: whatever a peer's catch-up still carried would stay to be seen.
    let (mut cl, kept, gone) = forgetting("forget", 0);
    let before: Vec<u64> = cl.nodes[..2]
        .iter()
        .map(|n| n.status().paths_recorded)
        .collect();
    run_ok(cl.a.cmd("nix-store").args(["--delete", &gone.full()]));
    wait_until(30, "A and B to forget the path nobody holds", || {
        cl.nodes[..2]
            .iter()
            .all(|n| n.status().records_forgotten == 1)
    });
    let narinfo = |p: &StorePath| format!("/{}.narinfo", p.hash_part());
    for (n, before) in cl.nodes[..2].iter().zip(before) {
        assert_eq!(n.status().paths_recorded, before - 1);
        assert_eq!(recorded(n, &[&kept, &gone]), vec![true, false]);
        assert_eq!(http(&n.http, "GET", &narinfo(&gone), &[]).0, 404);
        assert_eq!(http(&n.http, "GET", &narinfo(&kept), &[]).0, 200);
    }
    // However long it stays unchanged, a path someone holds is kept.
    std::thread::sleep(Duration::from_secs(4));
    for n in &cl.nodes[..2] {
        assert_eq!(n.status().records_forgotten, 1);
        assert_eq!(recorded(n, &[&kept]), vec![true]);
    }
    // C joins now and catches up with A and B: `kept`, never `gone`.
    cl.nodes[2].start();
    let a_paths = cl.nodes[0].status().paths_recorded;
    wait_until(30, "C to catch up", || {
        cl.nodes[2].status().paths_recorded >= a_paths && cl.nodes[2].serves(&[kept.full()])
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(recorded(&cl.nodes[2], &[&kept, &gone]), vec![true, false]);
    assert_eq!(cl.nodes[2].status().paths_recorded, a_paths);
}

/// A node away longer than `forget-after-secs` reviews its peers when it comes back: A
/// deleted a path and forgot it while B was down, so no withdrawal is left in A's log; B reads
/// A's whole log again, finds that A no longer says it holds the path, stops offering it and
/// forgets it in turn, while the path A still holds stays.
#[test]
fn a_node_back_from_a_long_absence_learns_what_was_forgotten_meanwhile() {
    let (mut cl, kept, gone) = forgetting("absent", 2);
    cl.nodes[1].stop();
    run_ok(cl.a.cmd("nix-store").args(["--delete", &gone.full()]));
    wait_until(30, "A to forget the path nobody holds", || {
        cl.nodes[0].status().records_forgotten == 1
    });
    std::thread::sleep(Duration::from_secs(3));
    cl.nodes[1].start();
    let narinfo = |p: &StorePath| format!("/{}.narinfo", p.hash_part());
    wait_until(30, "B to stop offering the path A no longer holds", || {
        http(&cl.nodes[1].http, "GET", &narinfo(&gone), &[]).0 == 404
    });
    assert_eq!(http(&cl.nodes[1].http, "GET", &narinfo(&kept), &[]).0, 200);
    wait_until(30, "B to forget it in turn", || {
        cl.nodes[1].status().records_forgotten == 1
    });
    assert_eq!(recorded(&cl.nodes[1], &[&kept, &gone]), vec![true, false]);
}

/// A NAR being read is never evicted: B holds a 24 MiB NAR that a slow client reads through
/// B's cache while newer NARs push B past its cap; the read completes with the right bytes,
/// and the NAR goes once the client is done.
#[test]
fn a_nar_being_read_is_never_evicted() {
    let mut cl = three(
        "eager",
        "[store]\nmax-size = \"40MiB\"\nmin-free = \"1MiB\"\n",
    );
    cl.nodes[0].start();
    cl.nodes[1].start();
    let first = build_big(&cl.a, "read-first", 1, 24, "x");
    wait_until(60, "B to hold the first NAR", || {
        cl.nodes[1].status().storage.files == 1
    });
    let info = narinfo(&cl.nodes[1], &first[0]);
    let mut conn = TcpStream::connect(&cl.nodes[1].http).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        conn,
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        info.url
    )
    .unwrap();
    let mut got = vec![0u8; 64 << 10];
    conn.read_exact(&mut got).unwrap();
    // Newer NARs arrive: B must evict, but not the one being read.
    let more = build_big(&cl.a, "read-more", 4, 8, "y");
    wait_until(60, "B to fetch the newer NARs", || {
        cl.nodes[1].status().storage.evictions >= 1
    });
    let nar_file = nar_file(&cl.nodes[1], &info);
    assert!(nar_file.exists(), "the NAR being read was evicted");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    got.extend_from_slice(&rest);
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let body = &got[split + 4..];
    assert!(
        body == cl.a.dump(&first[0]),
        "the slow reader got the whole NAR, intact"
    );
    drop(conn);
    // Once nobody reads it, it may go like any other.
    let _ = more;
    let c = cl.nodes[1].status().storage;
    assert!(c.file_bytes <= 40 << 20, "{c:?}");
}

/// A client that asks `node` for the NAR at `url` with a small receive window (so the answer
/// stalls once the kernel's buffers of both ends are full), and has read its first 64 KiB.
fn stalled_client(node: &Node, url: &str) -> TcpStream {
    use std::os::fd::AsRawFd;
    let mut conn = TcpStream::connect(&node.http).unwrap();
    let size: libc::c_int = 64 << 10;
    // SAFETY: a valid socket and a c_int option of its size.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        conn,
        "GET /{url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = vec![0u8; 64 << 10];
    conn.read_exact(&mut first).unwrap();
    conn
}

/// `CLIENTS` stalled clients of `node`'s NAR at `url` hold at most its read-memory of 4 MiB
/// between them (and past it, each: what hyper's 64 KiB write buffer takes, and a chunk group
/// or two in the stream), at every sample over 3 s; and they hold it all (the budget is spent,
/// or the test shows nothing). Returns the clients.
fn stall_within_the_read_memory(node: &Node, url: &str) -> Vec<TcpStream> {
    const CLIENTS: u64 = 32;
    const BUDGET: f64 = (4 << 20) as f64;
    let stalled: Vec<TcpStream> = (0..CLIENTS).map(|_| stalled_client(node, url)).collect();
    let buffered = || crate::trust::metric(node, "narmesh_storage_read_buffered_bytes ");
    let mut most = 0f64;
    for _ in 0..30 {
        most = most.max(buffered());
        std::thread::sleep(Duration::from_millis(100));
    }
    let past = (CLIENTS * 8 * (16 << 10)) as f64;
    eprintln!("{CLIENTS} stalled clients: at most {most} bytes held");
    assert!(
        most <= BUDGET + past,
        "{CLIENTS} stalled clients held {most} bytes, over read-memory's {BUDGET} and {past} past it"
    );
    assert!(
        most >= BUDGET * 0.75,
        "the clients did not stall the node's answers ({most} bytes held): the test shows nothing"
    );
    stalled
}

/// HTTP clients that ask for a NAR and stop reading hold at most `[store] read-memory` of the
/// node's memory between them; a client after them still gets the NAR whole; and what they
/// held is given back when they go.
#[test]
fn clients_that_stop_reading_hold_at_most_the_read_memory() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("a"), &t.path().join("unused"));
    let host = NixHost::with_hook(&node.socket(), &node.spool());
    node.store_root = host.root.clone();
    node.extra_config = "[store]\nread-memory = \"4MiB\"\n".into();
    node.start();
    let built = build_big(&host, "stall", 1, 24, "z");
    wait_until(60, "A to serve it", || node.serves(&full(&built)));
    let info = narinfo(&node, &built[0]);
    let stalled = stall_within_the_read_memory(&node, &info.url);

    // A client now still gets the whole NAR, byte for byte.
    let (code, _, body) = http(&node.http, "GET", &format!("/{}", info.url), &[]);
    assert_eq!(code, 200);
    assert!(
        body == host.dump(&built[0]),
        "a client after the stalled ones got the NAR whole"
    );

    // The stalled clients go: what their answers held goes too.
    drop(stalled);
    wait_until(
        30,
        "the answers of clients gone to give their pieces back",
        || crate::trust::metric(&node, "narmesh_storage_read_buffered_bytes ") == 0.0,
    );
}

/// The same for a NAR still arriving from a peer: B's clients follow it while B fetches it
/// (slowly: A serves 2 MiB/s), stop reading, and hold at most B's read-memory between them;
/// the fetch goes on, and B then serves the NAR whole.
#[test]
fn clients_following_an_arriving_nar_hold_at_most_the_read_memory() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = crate::node_harness::built_on_first(t.path(), 2);
    nodes[0].mesh_extra.push_str("serve-rate = \"2MiB\"\n");
    nodes[1].extra_config = "[store]\nread-memory = \"4MiB\"\n".into();
    for n in nodes.iter_mut() {
        n.start();
    }
    let built = build_big(&a, "follow", 1, 24, "f");
    wait_until(30, "B to learn the path", || nodes[1].serves(&full(&built)));
    let info = narinfo(&nodes[1], &built[0]);
    let stalled = stall_within_the_read_memory(&nodes[1], &info.url);
    assert_eq!(
        nodes[1].status().storage.files,
        0,
        "the NAR was still arriving while the clients stalled"
    );
    wait_until(60, "B to hold the NAR", || {
        nodes[1].status().storage.files == 1
    });
    let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{}", info.url), &[]);
    assert_eq!(code, 200);
    assert!(body == a.dump(&built[0]), "B serves the NAR whole");
    drop(stalled);
    wait_until(30, "the followers gone to give their pieces back", || {
        crate::trust::metric(&nodes[1], "narmesh_storage_read_buffered_bytes ") == 0.0
    });
}

/// Bytes free on the file system of `dir` (`df`).
fn free_bytes(dir: &Path) -> u64 {
    let out = run_ok(
        std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(dir),
    );
    let text = String::from_utf8(out).unwrap();
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// Another program fills the disk B's NARs are on (a 64 MiB file system,
/// `min-free` 16 MiB, the cap far away): within its housekeeping's ten seconds B evicts its
/// least recently used NARs until 16 MiB are free again, and keeps the rest.
#[test]
fn a_node_gives_space_back_when_another_program_fills_the_disk() {
    let mut cl = three(
        "eager",
        "[store]\nmax-size = \"1GiB\"\nmin-free = \"16MiB\"\n",
    );
    // The NAR files' own file system (the rest of the data dir, the mesh key with it, stays).
    let data = cl.nodes[1].dir.join("data/nars");
    let _fs = crate::harness::Tmpfs::mount(&data, "64m");
    cl.nodes[0].start();
    cl.nodes[1].start();
    let _outs = build_big(&cl.a, "floor", 3, 8, "f");
    wait_until(60, "B to hold the three NARs", || {
        cl.nodes[1].status().storage.files == 3
    });
    let free = free_bytes(&data);
    assert!(free > 22 << 20, "{free} bytes free before the filler");
    // The other program leaves 10 MiB free: 6 MiB under the floor.
    let filler = std::fs::File::create(data.join("filler")).unwrap();
    std::io::copy(
        &mut std::io::repeat(7).take(free - (10 << 20)),
        &mut std::io::BufWriter::new(&filler),
    )
    .unwrap();
    filler.sync_all().unwrap();
    // (No check of the 10 MiB here: B's housekeeping may already be evicting, as it should.)
    // The NAR's file goes first (the space is back), then its record and the count.
    wait_until(30, "B to give space back", || {
        free_bytes(&data) >= 16 << 20 && cl.nodes[1].status().storage.evictions >= 1
    });
    let st = cl.nodes[1].status().storage;
    assert_eq!((st.files, st.evictions), (2, 1), "one NAR went: {st:?}");
}

/// `narmesh pin` keeps a closure from eviction, across a restart: eager B, capped at 30 MiB,
/// holds a root and its dependency (8 MiB each, the oldest of its files) pinned while newer
/// NARs push it past its cap; once unpinned (`--remove`), they are the first to go.
#[test]
fn a_pinned_closure_is_never_evicted_until_unpinned() {
    let mut cl = three(
        "eager",
        "[store]\nmax-size = \"30MiB\"\nmin-free = \"1MiB\"\n",
    );
    cl.nodes[0].start();
    cl.nodes[1].start();
    let closure = cl.a.build(
        r#"let dep = mk "pin-dep" "mkdir $out; head -c 8388608 /dev/urandom > $out/data"; in
           [ (mk "pin-root" "mkdir $out; head -c 8388608 /dev/urandom > $out/data; echo ${dep} > $out/ref") dep ]"#,
    );
    assert_eq!(closure.len(), 2);
    wait_until(60, "B to hold the closure", || {
        cl.nodes[1].status().storage.files == 2
    });
    let files: Vec<std::path::PathBuf> = closure
        .iter()
        .map(|p| nar_file(&cl.nodes[1], &narinfo(&cl.nodes[1], p)))
        .collect();
    assert!(files.iter().all(|f| f.exists()), "{files:?}");
    let socket = cl.nodes[1].socket();
    let pin = |remove: bool| {
        let mut cmd = std::process::Command::new(crate::harness::bin("narmesh"));
        cmd.arg("pin").arg("--socket").arg(&socket);
        if remove {
            cmd.arg("--remove");
        }
        run_ok(cmd.arg(closure[0].full()));
    };
    // Only the root is named: its dependency is kept as part of its closure.
    pin(false);
    cl.nodes[1].stop();
    cl.nodes[1].start();
    let _more = build_big(&cl.a, "pin-more", 4, 8, "p");
    wait_until(90, "B to evict for the newer NARs", || {
        cl.nodes[1].status().storage.evictions >= 3
    });
    for f in &files {
        assert!(f.exists(), "{} was evicted while pinned", f.display());
    }
    let st = cl.nodes[1].status().storage;
    assert!(st.file_bytes <= 30 << 20, "{st:?}");
    pin(true);
    let _later = build_big(&cl.a, "pin-later", 2, 8, "q");
    wait_until(90, "the unpinned closure to be evicted", || {
        files.iter().all(|f| !f.exists())
    });
}

/// Two nodes started on a golden fixture's data dirs (`tests/fixtures/datadir-<commit>`: `n0`
/// built the paths into `store-a`, `n1` replicated them eagerly): each serves every path, its
/// storage is as `check` expects, and Nix substitutes everything from both.
fn a_data_dir_of(commit: &str, check: impl Fn(&[Node])) {
    let t = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/datadir-{commit}.tar.zst"));
    run_ok(
        std::process::Command::new("tar")
            .arg("--zstd")
            .arg("-xf")
            .arg(&fixture)
            .arg("-C")
            .arg(t.path()),
    );
    let paths: Vec<String> = std::fs::read_to_string(t.path().join("paths.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let store_a = t.path().join("store-a");
    let mut nodes = vec![
        Node::new(&t.path().join("n0"), &store_a),
        Node::new(&t.path().join("n1"), &t.path().join("n1/store")),
    ];
    crate::node_harness::keep_mesh_keys(&mut nodes);
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in &nodes {
        wait_until(30, "the previous records to be served", || n.serves(&paths));
    }
    check(&nodes);
    let top: Vec<StorePath> = paths.iter().map(|p| StorePath::parse(p).unwrap()).collect();
    for n in &nodes {
        let host = NixHost::substituter(&format!("http://{}", n.http), &n.public_key());
        let mut args = vec!["-r"];
        args.extend(paths.iter().map(|s| s.as_str()));
        run_ok(host.cmd("nix-store").args(&args));
        assert_eq!(host.closure(&top).len(), 4);
    }
}

/// A data dir written by `e5a6e05` (n1's NARs in its iroh-blobs store): n0's own paths are
/// served from its store with no copy, n1's NARs become files counted against its cap.
#[test]
fn a_data_dir_of_the_previous_format_keeps_working() {
    a_data_dir_of("e5a6e05", |nodes| {
        for n in nodes {
            assert!(
                !n.dir.join("data/blobs").exists(),
                "the old blob store is gone"
            );
        }
        let s0 = nodes[0].status().storage;
        assert_eq!(
            (s0.own_paths, s0.files),
            (4, 0),
            "n0 serves its builds from its store: {s0:?}"
        );
        let s1 = nodes[1].status().storage;
        assert_eq!(s1.files, 4, "n1 keeps the NARs it had: {s1:?}");
        assert!(s1.file_bytes > 200_000, "{s1:?}");
    });
}

/// A data dir written by `ae93e66` (bounded storage, mesh protocol 2): n0 serves three own
/// paths from its store and remembers the fourth left it (Nix GC), which n1 still holds and
/// serves to both; n1 keeps its four NAR files. Nothing is migrated, counted again or lost.
#[test]
fn a_data_dir_of_the_last_release_keeps_working() {
    a_data_dir_of("ae93e66", |nodes| {
        let s0 = nodes[0].status().storage;
        assert_eq!(
            (s0.own_paths, s0.files, s0.gc_lost),
            (3, 0, 1),
            "n0 serves three builds from its store: {s0:?}"
        );
        // The totals on /metrics are the data dir's, as the status says.
        assert_eq!(metric(&nodes[0], "narmesh_storage_gc_lost_total "), 1.0);
        let s1 = nodes[1].status().storage;
        assert_eq!((s1.files, s1.evictions), (4, 0), "{s1:?}");
        assert!(s1.file_bytes > 200_000, "{s1:?}");
        for n in nodes {
            assert!(!n.log().contains("migrat"), "{}", n.log());
        }
    });
}

/// A review cut short by a crash keeps what it confirmed: B, back after an absence, reviews
/// A's log and dies (SIGKILL) right after taking in a batch, the cursor past it; started again
/// (with a long `forget-after-secs`, so the review goes on rather than starting over), B ends
/// the review and still counts A as the holder of both paths, which A never stopped holding.
/// A confirmation written after the batch was taken in would be lost with the crash, and
/// the review's end would drop A as their holder.
#[test]
fn a_review_cut_short_by_a_crash_keeps_what_it_confirmed() {
    let (mut cl, kept, also) = forgetting("review-crash", 2);
    cl.nodes[1].stop();
    // A path B learns only in the review's batch: that batch's commit (the cursor's move with
    // it) is then fsync'd, not merely written.
    let new =
        cl.a.build(r#"mk "review-crash-new" "echo new > $out""#)
            .remove(0);
    std::thread::sleep(Duration::from_secs(3));
    let point = "mesh.review-batch-taken";
    cl.nodes[1]
        .env
        .push(("NARMESH_TEST_KILL_AT".into(), point.into()));
    cl.nodes[1].spawn();
    assert!(
        cl.nodes[1].wait_exit(60),
        "B never reached {point}:\n{}",
        cl.nodes[1].log()
    );
    assert!(
        cl.nodes[1].log().contains(&format!("killed at {point}")),
        "B died elsewhere:\n{}",
        cl.nodes[1].log()
    );
    cl.nodes[1].env.retain(|(k, _)| k != "NARMESH_TEST_KILL_AT");
    cl.nodes[1].extra_config = "[store]\nmin-free = \"64MiB\"\nforget-after-secs = 3600\n".into();
    cl.nodes[1].start();
    wait_until(30, "B to end its review of A's log", || {
        cl.nodes[1].log().contains("reviewed ")
    });
    let log = cl.nodes[1].log();
    assert!(
        log.contains("it no longer holds 0 path(s)"),
        "the review's end dropped A as a holder:\n{log}"
    );
    let narinfo = |p: &StorePath| format!("/{}.narinfo", p.hash_part());
    for p in [&kept, &also, &new] {
        assert_eq!(http(&cl.nodes[1].http, "GET", &narinfo(p), &[]).0, 200);
    }
}

/// A clean stop keeps what the node learnt from peers in its last second (those commits are
/// fsync'd at most once a second, and the process may end before the database is closed):
/// stopped right after learning two paths, B has both when its database is opened again.
/// Three rounds: without the last commit at the stop, a round lost a path one time in three.
#[test]
fn a_clean_stop_keeps_what_was_learnt_last() {
    let (mut cl, kept, also) = forgetting("stop", 0);
    let mut learnt = vec![kept, also];
    for round in 0..3 {
        if round > 0 {
            cl.nodes[1].start();
            learnt = cl.a.build(&format!(
                r#"[ (mk "stop-{round}-x" "echo {round} x > $out") (mk "stop-{round}-y" "echo {round} y > $out") ]"#
            ));
            wait_until(30, "B to learn both paths", || {
                cl.nodes[1].serves(&full(&learnt))
            });
        }
        cl.nodes[1].stop();
        let db = narmesh::db::Db::open(&cl.nodes[1].dir.join("data/narmesh.redb")).unwrap();
        for p in &learnt {
            assert!(
                db.path(p.hash_part()).unwrap().is_some(),
                "{} lost",
                p.full()
            );
        }
    }
}
