//! The mesh against hostile, lying, old, frozen and killed peers, with real node processes and
//! real Nix: nothing untrusted is believed, nothing stalls or exhausts an honest node, a lying
//! claim gives way to an honest one, a node of version 1 is still heard, and replication never
//! gives up.

use std::time::Duration;

use narmesh::nix::{NarInfo, SecretKey, StorePath};
use narmesh_proto::gossip::{PathAnnounce, v1};
use narmesh_proto::sync::{BULK_ALPN, NAR_ALPN, NAR_ALPN_V1, SYNC_ALPN, SYNC_ALPN_V1};

use crate::harness::{NixHost, http, run_ok, wait_until};
use crate::hostile::{Hostile, leaves_of};
use crate::node_harness::Node;

const CHAIN: &str = r#"
  let
    a = mk "trust-a" "echo a > $out";
    b = mk "trust-b" "mkdir -p $out; echo ${a} > $out/ref; head -c 40000 /dev/zero | tr '\0' b > $out/b";
  in mk "trust-top" "mkdir $out; echo ${b} > $out/ref; head -c 3000000 /dev/urandom > $out/blob"
"#;

/// `VmHWM` (peak RSS, bytes) and `Threads` of a process.
pub fn budget(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:") * 1024, field("Threads:"))
}

/// A counter of the node's metrics (`name{labels} value`), 0 if absent.
pub fn metric(node: &Node, line_prefix: &str) -> f64 {
    let (_, _, body) = http(&node.http, "GET", "/metrics", &[]);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Honest nodes, all of them also naming `hostile` as a peer (so it is allowed and caught up
/// with), trusting each other's keys (and `extra_trusted`).
pub fn honest_with(
    t: &tempfile::TempDir,
    n: usize,
    hostile: &Hostile,
    extra_trusted: &[String],
) -> (NixHost, Vec<Node>) {
    let (a, mut nodes) = crate::node_harness::built_on_first(t.path(), n);
    for node in nodes.iter_mut() {
        node.peers.push(hostile.address.clone());
        node.trusted.extend(extra_trusted.iter().cloned());
    }
    (a, nodes)
}

pub fn substitute_all(node: &Node, paths: &[String]) {
    let host = NixHost::substituter(&format!("http://{}", node.http), &node.public_key());
    let mut args = vec!["-r"];
    args.extend(paths.iter().map(|s| s.as_str()));
    run_ok(host.cmd("nix-store").args(&args));
    for p in paths {
        run_ok(host.cmd("nix-store").args(["--verify-path", p]));
    }
}

/// An allowed but untrusted peer replays trusted narinfos with BLAKE3 hashes and sizes of its
/// choosing, names itself a provider of honest claims and serves junk for them, answers
/// catch-up forever, floods a node with streams and reads its NARs a byte a second. The honest
/// nodes believe none of it, stay within their budgets, count what they refused by reason, and
/// their hosts still substitute everything through real Nix.
#[test]
fn an_untrusted_peer_cannot_poison_stall_or_exhaust_the_mesh() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(41, false);
    h.mode
        .endless_catchup
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.mode
        .junk_ranges
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, mut nodes) = honest_with(&t, 3, &h, &[]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let top = a.build(CHAIN)[0].clone();
    let paths = a.closure(std::slice::from_ref(&top));
    for n in &nodes {
        wait_until(30, "every node to serve the paths", || n.serves(&paths));
    }
    // Replays: the honest announcements with another BLAKE3 (bindings copied), with a huge
    // size, and with the hostile peer named as a provider of the honest bytes.
    let honest = h.catch_up_from(&nodes[0].address);
    assert_eq!(honest.len(), 3, "the hostile peer learnt the honest log");
    let mut lies = Vec::new();
    for ann in &honest {
        let mut wrong = ann.clone();
        wrong.blake3 = *blake3::hash(b"not these bytes").as_bytes();
        wrong.providers = vec![h.holds(&wrong.blake3)];
        lies.push(wrong.encode().unwrap());
        let mut huge = ann.clone();
        huge.nar_size = 1 << 40;
        lies.push(huge.encode().unwrap());
        let mut providing = ann.clone();
        providing.providers.push(h.holds(&ann.blake3));
        lies.push(providing.encode().unwrap());
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    h.gossip(&peers, lies);
    // Abuse of the honest nodes' NAR service.
    let top_ann = honest
        .iter()
        .find(|a| a.narinfo.contains(&top.full()))
        .unwrap();
    h.flood_streams(&peers[0], 300, Duration::from_secs(30));
    h.slow_readers(
        &peers[0],
        top_ann.blake3,
        top_ann.nar_size,
        40,
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_secs(2));
    // Every host still substitutes everything, through its own node.
    for n in &nodes[1..] {
        substitute_all(n, &paths);
    }
    // Nothing untrusted was believed: the served narinfos name the honest BLAKE3.
    for n in &nodes {
        for ann in &honest {
            let info = NarInfo::parse(&ann.narinfo).unwrap();
            let (code, _, body) = http(
                &n.http,
                "GET",
                &format!("/{}.narinfo", info.store_path.hash_part()),
                &[],
            );
            assert_eq!(code, 200);
            let served = NarInfo::parse(std::str::from_utf8(&body).unwrap()).unwrap();
            assert_eq!(served.url, narmesh::pipeline::nar_url(&ann.blake3));
        }
    }
    for n in &nodes[1..] {
        assert!(
            metric(n, "narmesh_mesh_refused_total{reason=\"unbound-blake3\"}") >= 1.0,
            "refusals counted by reason"
        );
        assert!(
            metric(n, "narmesh_mesh_refused_total{reason=\"size-mismatch\"}") >= 1.0,
            "refusals counted by reason"
        );
        assert!(
            n.log().contains("left alone for"),
            "the endless catch-up was cut short"
        );
    }
    assert!(
        nodes[1].log().contains("does not match the NAR's BLAKE3")
            || nodes[2].log().contains("does not match the NAR's BLAKE3")
            || nodes[1].log().contains("avoiding peer"),
        "the junk provider was caught"
    );
    // Budgets: memory and threads stay bounded under the abuse.
    for n in &nodes {
        let (rss, threads) = budget(n.pid());
        assert!(rss < 150 << 20, "peak RSS {} MiB", rss >> 20);
        assert!(threads < 64, "{threads} threads");
    }
    // And the mesh still works: a new build reaches every node.
    let more = a.build(r#"mk "trust-later" "echo later > $out""#)[0].full();
    for n in &nodes {
        wait_until(30, "a later build on every node", || {
            n.serves(std::slice::from_ref(&more))
        });
    }
}

/// One allowed peer cannot take a node's whole NAR service. The hostile peer asks for a large
/// NAR on 24 streams of one connection and reads nothing, which stalls the node's writes: 16
/// are served at once (the rest wait for a place); 16 more on each of two more connections
/// bring it to 48 served, three quarters of the node's 64, and 8 on a fourth are answered
/// `Busy`. Another peer still substitutes through the node meanwhile. Of 8 more connections
/// to the NAR protocol, the 9th and later are closed with code 429 and counted.
#[test]
fn one_peer_gets_8_connections_and_three_quarters_of_the_streams_served() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(45, false);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let large = a.build(r#"mk "caps-large" "head -c 8000000 /dev/urandom > $out""#)[0].full();
    let small = a.build(r#"mk "caps-small" "head -c 300000 /dev/urandom > $out""#)[0].full();
    wait_until(30, "B to learn the paths", || {
        nodes[1].serves(&[large.clone(), small.clone()])
    });
    let ann = h
        .catch_up_from(&nodes[0].address)
        .into_iter()
        .find(|x| x.narinfo.contains(&large))
        .expect("the large path's announcement");
    let hold = Duration::from_secs(60);
    let (peer, blake3, size) = (&nodes[0].address, ann.blake3, ann.nar_size);
    // The node drops a stream that takes no data for 20 s, and then serves one that waited.
    let stalled_at = std::time::Instant::now();
    let serving = || {
        let n = metric(&nodes[0], "narmesh_mesh_serving ");
        assert!(
            stalled_at.elapsed() < Duration::from_secs(18),
            "too slow: the node's write deadline may have freed streams"
        );
        n
    };
    assert_eq!(
        h.stalled_ranges(peer, blake3, size, 24, hold),
        (16, 0),
        "16 streams of a connection served at once, none refused"
    );
    assert_eq!(serving(), 16.0);
    for _ in 0..2 {
        assert_eq!(h.stalled_ranges(peer, blake3, size, 16, hold), (16, 0));
    }
    assert_eq!(serving(), 48.0);
    assert_eq!(
        h.stalled_ranges(peer, blake3, size, 8, hold),
        (0, 8),
        "48 streams served to one peer, the rest Busy"
    );
    assert_eq!(serving(), 48.0);
    // Another peer still gets its NAR.
    substitute_all(&nodes[1], std::slice::from_ref(&small));
    // Four NAR connections are open: of 8 more, 4 are refused.
    assert_eq!(h.connections(peer, 8, hold), 4);
    assert_eq!(
        metric(
            &nodes[0],
            "narmesh_mesh_refused_total{reason=\"too-many-connections\"}"
        ),
        4.0
    );
}

/// A fetcher answered `Busy` asks again shortly instead of giving the provider up. Two peers
/// hold all 64 of A's serving places (48 and 16 stalled streams) for 4 s; meanwhile B's host
/// substitutes a path only A has, and gets it once places free, with no error on the way. Both
/// nodes have the bulk channel: a second time, B's host substitutes a one-group path (no
/// leaves to ask first), whose bulk connection A closes with nothing sent while it is full; B
/// asks QUIC (`Busy`), then a new ticket, and gets the range over the bulk channel once places
/// free, not over QUIC for a minute.
#[test]
fn a_fetcher_answered_busy_asks_again_and_gets_the_nar() {
    let t = tempfile::tempdir().unwrap();
    let (h1, h2) = (Hostile::start(46, false), Hostile::start(47, false));
    let (a, mut nodes) = honest_with(&t, 2, &h1, &[]);
    for n in nodes.iter_mut() {
        n.peers.push(h2.address.clone());
        n.mesh_extra.push_str("bulk-listen = \"127.0.0.1:0\"\n");
        n.start();
    }
    let large = a.build(r#"mk "busy-large" "head -c 8000000 /dev/urandom > $out""#)[0].full();
    let small = a.build(r#"mk "busy-small" "head -c 300000 /dev/urandom > $out""#)[0].full();
    let tiny = a.build(r#"mk "busy-tiny" "head -c 8000 /dev/urandom > $out""#)[0].full();
    wait_until(30, "B to learn the paths", || {
        nodes[1].serves(&[large.clone(), small.clone(), tiny.clone()])
    });
    let ann = h1
        .catch_up_from(&nodes[0].address)
        .into_iter()
        .find(|x| x.narinfo.contains(&large))
        .expect("the large path's announcement");
    let (peer, blake3, size) = (&nodes[0].address, ann.blake3, ann.nar_size);
    let fill = || {
        let hold = Duration::from_secs(4);
        let stalled_at = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(h1.stalled_ranges(peer, blake3, size, 16, hold), (16, 0));
        }
        assert_eq!(h2.stalled_ranges(peer, blake3, size, 16, hold), (16, 0));
        assert_eq!(metric(&nodes[0], "narmesh_mesh_serving "), 64.0);
        assert!(
            stalled_at.elapsed() < hold - Duration::from_secs(1),
            "too slow: the places may be free before B asks"
        );
    };
    // B never answers its host with an error (Nix would retry one and succeed).
    let no_errors = || no_http_errors(&nodes[1]);
    fill();
    substitute_all(&nodes[1], std::slice::from_ref(&small));
    no_errors();
    let bulk = || metric(&nodes[1], "narmesh_mesh_bulk_bytes_total");
    let before = bulk();
    fill();
    substitute_all(&nodes[1], std::slice::from_ref(&tiny));
    no_errors();
    assert!(
        bulk() > before,
        "the one-group path came over QUIC: B gave up A's bulk channel ({before} bytes before)"
    );
}

/// `node` has answered its host no HTTP error (5xx) so far.
fn no_http_errors(node: &Node) {
    let (_, _, body) = http(&node.http, "GET", "/metrics", &[]);
    let text = String::from_utf8_lossy(&body);
    let errors: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("narmesh_http_requests_total{") && l.contains("status=\"5"))
        .map(str::to_owned)
        .collect();
    assert!(errors.is_empty(), "the node answered errors: {errors:?}");
}

/// A connection left without a stream for 30 s is let go (QUIC code 0, `idle`), on every
/// protocol of the node (NAR transfer's two versions, bulk tickets, catch-up's two versions): an
/// allowed peer's idle connections do not hold the node's places forever. The nodes' own pools
/// do not race it: B's host substitutes a path only A has, and once A has let B's connections
/// go, another, with no error.
#[test]
fn idle_mesh_connections_are_let_go() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(49, false);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    for n in nodes.iter_mut() {
        n.mesh_extra.push_str("bulk-listen = \"127.0.0.1:0\"\n");
        n.start();
    }
    let one = a.build(r#"mk "idle-one" "head -c 300000 /dev/urandom > $out""#)[0].full();
    let two = a.build(r#"mk "idle-two" "head -c 300000 /dev/urandom > $out""#)[0].full();
    wait_until(30, "B to learn the paths", || {
        nodes[1].serves(&[one.clone(), two.clone()])
    });
    substitute_all(&nodes[1], std::slice::from_ref(&one));
    let alpns = [NAR_ALPN, NAR_ALPN_V1, BULK_ALPN, SYNC_ALPN, SYNC_ALPN_V1];
    let ended = h.idle_connections(&nodes[0].address, &alpns, Duration::from_secs(36));
    assert_eq!(
        ended,
        vec![Some((0, "idle".to_owned())); alpns.len()],
        "after 36 s, every idle connection let go as idle (None: still open)"
    );
    substitute_all(&nodes[1], std::slice::from_ref(&two));
    no_http_errors(&nodes[1]);
    // Not even a failed attempt on the way: B asked A on fresh connections.
    let log = nodes[1].log();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| {
            [
                "mesh: leaves from",
                "mesh: range from",
                "bulk channel of",
                "mesh: fetching",
            ]
            .iter()
            .any(|m| l.contains(m))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "B's fetches failed on the way: {failed:#?}"
    );
}

/// An allowed peer that sends bad requests in a loop gets each connection closed (code 400),
/// counted in `narmesh_mesh_refused_total{reason="bad-request"}`, and does not flood the log:
/// a line at most once a second, however many it sends. A request frame announced longer than
/// 4 KiB is refused at its length prefix, not waited for (10 s) with room held for it. Bad
/// headers on the bulk channel's TCP port are counted the same way (a guessed token as
/// `unknown-ticket`), closed with nothing sent, and so is a connection over its 64.
#[test]
fn bad_requests_are_counted_and_logged_once_a_second() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(48, false);
    let (_a, mut nodes) = honest_with(&t, 1, &h, &[]);
    nodes[0]
        .mesh_extra
        .push_str("bulk-listen = \"127.0.0.1:0\"\n");
    nodes[0].start();
    let peer = &nodes[0].address;
    let started = std::time::Instant::now();
    assert_eq!(h.bad_requests(peer, 60, &[0xff; 8]), 60);
    assert_eq!(
        h.bad_requests(peer, 3, &100_000u32.to_le_bytes()),
        3,
        "a long request's prefix closes its connection at once"
    );
    let secs = started.elapsed().as_secs() + 1;
    assert_eq!(
        metric(
            &nodes[0],
            "narmesh_mesh_refused_total{reason=\"bad-request\"}"
        ),
        63.0
    );
    let lines = nodes[0].log().matches("bad request from").count() as u64;
    assert!(
        (1..=secs).contains(&lines),
        "{lines} log lines for 63 bad requests in {secs} s"
    );
    // The bulk channel's TCP port, open to anyone who can reach it: junk, a header cut short
    // and a guessed token are counted too, and logged at most once a second.
    let log = nodes[0].log();
    let bulk: std::net::SocketAddr = log
        .lines()
        .find_map(|l| l.split("bulk channel (TCP, unencrypted) on ").nth(1))
        .expect("the bulk channel's address in the log")
        .trim()
        .parse()
        .unwrap();
    let started = std::time::Instant::now();
    let guessed = narmesh_proto::sync::BulkHeader {
        token: [7; 32],
        start: 0,
        end: 16384,
    }
    .encode();
    // Junk, a header cut short, a guessed token; and nothing at all (a fetch given up before
    // it asked), which is not counted.
    let sends: Vec<&[u8]> = [[0xffu8; 52].as_slice(), &guessed[..20], &guessed[..], &[]]
        .into_iter()
        .cycle()
        .take(40)
        .collect();
    for bytes in sends {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(bulk).unwrap();
        c.write_all(bytes).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("closed within 5 s");
        assert!(got.is_empty(), "nothing sent for a bad header");
    }
    let secs = started.elapsed().as_secs() + 1;
    wait_until(5, "the bulk refusals counted", || {
        metric(
            &nodes[0],
            "narmesh_mesh_refused_total{reason=\"bad-request\"}",
        ) == 63.0 + 20.0
            && metric(
                &nodes[0],
                "narmesh_mesh_refused_total{reason=\"unknown-ticket\"}",
            ) == 10.0
    });
    let lines = nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("mesh bulk: 127.0.0.1"))
        .count() as u64;
    assert!(
        (1..=secs).contains(&lines),
        "{lines} log lines for 30 refused bulk connections in {secs} s"
    );
    // 64 bulk connections at once (16 from each of four hosts, as many as one host may have
    // without a header): a 65th, from a fifth host, is closed at once and counted; the 64,
    // cut before their headers end, are bad requests.
    let host = |i: u8| std::net::Ipv4Addr::new(127, 0, 0, 2 + i);
    let held: Vec<std::net::TcpStream> = (0..64u8)
        .map(|i| {
            let mut c = crate::harness::tcp_from(host(i / 16), bulk);
            std::io::Write::write_all(&mut c, b"NMB1").unwrap();
            c
        })
        .collect();
    let mut extra = crate::harness::tcp_from(host(4), bulk);
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut extra, &mut got).expect("the 65th closed within 5 s");
    drop(held);
    wait_until(5, "the 65th and the 64 counted", || {
        metric(
            &nodes[0],
            "narmesh_mesh_refused_total{reason=\"too-many-connections\"}",
        ) == 1.0
            && metric(
                &nodes[0],
                "narmesh_mesh_refused_total{reason=\"bad-request\"}",
            ) == 63.0 + 20.0 + 64.0
    });
}

/// A peer with a trusted key claims a path first, bound to a BLAKE3 of junk it serves
/// consistently: every chunk group checks out, the NarHash does not. An eager node drops that
/// claim (and avoids the peer); the honest build's claim takes its place, and a host
/// substituting through that node gets the honest path.
#[test]
fn a_trusted_peer_that_lies_loses_its_claim_to_the_honest_one() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(42, false);
    let liar = SecretKey::generate("liar-1").unwrap();
    let (a, mut nodes) = honest_with(&t, 2, &h, &[liar.public().to_string()]);
    nodes[1].replicate = "eager";
    let expr = r#"mk "trust-lied-about" "head -c 200000 /dev/zero | tr '\0' L > $out""#;
    let (path, fake, lie) = lie_about(&h, &liar, expr);
    for n in nodes.iter_mut() {
        n.start();
    }
    let peers: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    h.gossip(&peers[1..], vec![lie.encode().unwrap()]);
    wait_until(30, "B to drop the lying claim", || {
        nodes[1].log().contains("claim dropped")
    });
    // The honest build of the same path.
    let built = a.build(expr)[0].clone();
    assert_eq!(built, path);
    wait_until(30, "B to hold the honest NAR", || {
        nodes[1].status().storage.files == 1
    });
    let (_, _, body) = http(
        &nodes[1].http,
        "GET",
        &format!("/{}.narinfo", path.hash_part()),
        &[],
    );
    let served = NarInfo::parse(std::str::from_utf8(&body).unwrap()).unwrap();
    assert_ne!(
        served.url,
        narmesh::pipeline::nar_url(&fake),
        "the lie is not served"
    );
    substitute_all(&nodes[1], &[path.full()]);
}

/// The mirror node, restarted after it caught a trusted peer's lie, finds the path's only
/// claim failed: its outbox took the path in before, and there is nothing to upload. When the
/// honest build comes, the mirror plans the path again at once (no restart, which is what it
/// took before), and its narinfo goes into the bucket.
#[test]
fn a_mirror_plans_a_path_whose_only_claim_failed_once_an_honest_one_comes() {
    use crate::s3_harness::{ACCESS_KEY, S3Server, SECRET_KEY, credentials_env};
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(53, false);
    let liar = SecretKey::generate("liar-2").unwrap();
    let (a, mut nodes) = honest_with(&t, 2, &h, &[liar.public().to_string()]);
    let s3 = S3Server::start();
    nodes[1].extra_config = s3.mirror_config("");
    nodes[1].env = credentials_env(ACCESS_KEY, SECRET_KEY);
    let expr = r#"mk "trust-mirror-lied-about" "head -c 100000 /dev/zero | tr '\0' M > $out""#;
    let (path, _, lie) = lie_about(&h, &liar, expr);
    for n in nodes.iter_mut() {
        n.start();
    }
    h.gossip(&[nodes[1].address.clone()], vec![lie.encode().unwrap()]);
    wait_until(30, "B to drop the lying claim", || {
        nodes[1].log().contains("claim dropped")
    });
    nodes[1].stop();
    nodes[1].start();
    wait_until(30, "B to find nothing to upload for the path", || {
        nodes[1].log().contains("with no claim to upload")
    });
    assert_eq!(a.build(expr)[0], path);
    crate::mirror::wait_in_bucket(&s3, &nodes[1], &[path.full()], 60);
}

/// A node of version 1 (only the `/1` protocols, unbound BLAKE3s) is still heard: its catch-up
/// log and its gossip are taken in, and its NARs are fetched (whole, checked against the signed
/// NarHash) so a host substitutes them through a node of this version.
#[test]
fn a_version_1_peer_is_heard() {
    let t = tempfile::tempdir().unwrap();
    let old = Hostile::start(43, true);
    let key = SecretKey::generate("old-1").unwrap();
    let x = NixHost::new("");
    let outs = x.build(
        r#"[ (mk "v1-first" "head -c 50000 /dev/urandom > $out") (mk "v1-second" "echo second > $out") ]"#,
    );
    let db = narmesh::nix::store_db::StoreDb::open(&x.root).unwrap();
    let mut anns = Vec::new();
    for p in &outs {
        let info = db.query_path(p).unwrap().unwrap();
        let nar = x.dump(p);
        let b3 = *blake3::hash(&nar).as_bytes();
        old.mode.nars.lock().unwrap().insert(b3, nar);
        let mut n = NarInfo {
            store_path: p.clone(),
            url: format!("nar/{}.nar", narmesh::storage::hex(&b3)),
            compression: "none".into(),
            file_hash: Some(info.nar_hash),
            file_size: Some(info.nar_size),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.iter().cloned().collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        n.sign(&key);
        anns.push(v1::Announce {
            version: 1,
            narinfo: n.render(),
            blake3: b3,
            nar_size: info.nar_size,
            providers: vec![old.id()],
        });
    }
    // The first through catch-up, the second through gossip.
    old.mode.log_v1.lock().unwrap().push(anns[0].clone());
    let mut b = Node::new(&t.path().join("b"), &t.path().join("b/store"));
    let b_addr = b.enable_mesh();
    b.peers = vec![old.address.clone()];
    b.trusted = vec![key.public().to_string(), b.public_key()];
    b.start();
    wait_until(30, "B to catch up from the old node", || {
        b.serves(&[outs[0].full()])
    });
    old.gossip(&[b_addr], vec![postcard::to_allocvec(&anns[1]).unwrap()]);
    wait_until(30, "B to take in its gossip", || {
        b.serves(&[outs[1].full()])
    });
    let paths: Vec<String> = outs.iter().map(StorePath::full).collect();
    substitute_all(&b, &paths);
    let fixture = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/v1/announce.postcard"),
    )
    .unwrap();
    assert!(matches!(
        narmesh_proto::gossip::decode(&fixture),
        Ok(narmesh_proto::gossip::Incoming::V1(_))
    ));
    let _ = leaves_of(&[]);
}

/// A version 2 announcement of `path` (whose store metadata is `info`) with NAR `blake3`: its
/// narinfo and its binding signed by `key`, naming `provider`.
/// The path `expr` builds, built on a host of its own (the liar knows the path's real
/// metadata), and `liar`'s signed announcement of it, bound to junk of the same size that `h`
/// serves (consistently: every chunk group checks out, the NarHash does not); with the junk's
/// BLAKE3.
fn lie_about(h: &Hostile, liar: &SecretKey, expr: &str) -> (StorePath, [u8; 32], PathAnnounce) {
    let x = NixHost::new("");
    let path = x.build(expr)[0].clone();
    let info = narmesh::nix::store_db::StoreDb::open(&x.root)
        .unwrap()
        .query_path(&path)
        .unwrap()
        .unwrap();
    let junk: Vec<u8> = (0..info.nar_size).map(|i| (i % 251) as u8).collect();
    let fake = *blake3::hash(&junk).as_bytes();
    h.mode.nars.lock().unwrap().insert(fake, junk);
    let lie = signed_announce(liar, &path, &info, fake, h.holds(&fake));
    (path, fake, lie)
}

fn signed_announce(
    key: &SecretKey,
    path: &StorePath,
    info: &narmesh::nix::store_db::PathInfo,
    blake3: [u8; 32],
    provider: narmesh_proto::gossip::ProviderStatement,
) -> PathAnnounce {
    let mut narinfo = NarInfo {
        store_path: path.clone(),
        url: "nar/x.nar".into(),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.iter().cloned().collect(),
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    narinfo.sign(key);
    PathAnnounce {
        narinfo: narinfo.render(),
        blake3,
        nar_size: info.nar_size,
        bindings: vec![narmesh::binding::sign(
            key,
            path,
            &info.nar_hash,
            info.nar_size,
            &blake3,
        )],
        upstream_refs: vec![],
        providers: vec![provider],
    }
}

/// A peer that cannot send a catch-up batch as large as asked (a node of the previous release
/// could not send one whose entries outgrew its frame: it answered nothing, for ever, at the
/// same cursor) is asked for smaller batches after each one that does not come back, down to
/// what it can send, and every entry of its log arrives.
#[test]
fn a_peer_that_cannot_send_a_full_batch_is_asked_for_smaller_ones() {
    let t = tempfile::tempdir().unwrap();
    let old = Hostile::start(51, false);
    old.mode
        .max_batch
        .store(40, std::sync::atomic::Ordering::SeqCst);
    let key = SecretKey::generate("small-batches-1").unwrap();
    let x = NixHost::new("");
    let outs = x.build(
        r#"builtins.genList (i: mk "small-batch-${toString i}" "echo ${toString i} > $out") 100"#,
    );
    let db = narmesh::nix::store_db::StoreDb::open(&x.root).unwrap();
    for p in &outs {
        let info = db.query_path(p).unwrap().unwrap();
        let nar = x.dump(p);
        let b3 = *blake3::hash(&nar).as_bytes();
        let ann = signed_announce(&key, p, &info, b3, old.holds(&b3));
        old.mode.log_v2.lock().unwrap().push(ann);
    }
    let mut b = Node::new(&t.path().join("b"), &t.path().join("b/store"));
    b.enable_mesh();
    b.peers = vec![old.address.clone()];
    b.trusted = vec![key.public().to_string(), b.public_key()];
    b.start();
    let paths: Vec<String> = outs.iter().map(StorePath::full).collect();
    wait_until(60, "B to catch up every entry", || b.serves(&paths));
    let limits = old.mode.limits.lock().unwrap().clone();
    assert_eq!(
        limits[..5],
        [512, 256, 128, 64, 32],
        "halved after each batch that did not come back: {limits:?}"
    );
    // A round that took as many as it asked for a batch tries twice as many again: the peer
    // answers no more than it can, and B stays within a step of it.
    assert!(
        limits[5..].iter().all(|l| *l == 32 || *l == 64),
        "then within a step: {limits:?}"
    );
    assert!(b.log().contains("asking for 32 entries a batch"));
}

/// A host taken out of the cluster, and a key no longer trusted, as an operator does it (the
/// config changed, the node restarted): B learnt a path that only A holds; with A down, B
/// still counts A as its holder. Restarted without A in `peers`, B no longer does (its narinfo
/// is a 404, never an answer whose NAR cannot be had); restarted without A's key in
/// `trusted-public-keys`, B drops the record itself.
#[test]
fn a_host_taken_out_of_the_cluster_stops_counting_at_the_next_start() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = crate::node_harness::built_on_first(t.path(), 2);
    for n in nodes.iter_mut() {
        n.start();
    }
    let out = a.build(r#"mk "taken-out" "echo out > $out""#);
    let path = out[0].full();
    let narinfo = |n: &Node| {
        http(
            &n.http,
            "GET",
            &format!("/{}.narinfo", out[0].hash_part()),
            &[],
        )
        .0
    };
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(std::slice::from_ref(&path))
    });
    nodes[0].stop();
    assert_eq!(
        narinfo(&nodes[1]),
        200,
        "A is down, but still in the cluster"
    );
    nodes[1].stop();
    nodes[1].peers.clear();
    nodes[1].start();
    assert_eq!(
        narinfo(&nodes[1]),
        404,
        "A is out of the cluster: nobody holds it"
    );
    let recorded = |n: &Node| match n.call(narmesh_proto::control::Request::Lookup {
        paths: vec![path.clone()],
    }) {
        Ok(narmesh_proto::control::Response::Known { recorded }) => recorded[0],
        other => panic!("{other:?}"),
    };
    assert!(
        recorded(&nodes[1]),
        "A's key is still trusted: the record stays"
    );
    nodes[1].stop();
    nodes[1].trusted.clear();
    nodes[1].start();
    assert!(
        !recorded(&nodes[1]),
        "A's key is no longer trusted: the record goes"
    );
    assert_eq!(narinfo(&nodes[1]), 404);
}
