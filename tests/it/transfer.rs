//! Peer transfer from several providers, with real node processes and real Nix: a provider that
//! lies in the middle of a NAR is caught within one chunk group and the fetch completes from
//! another; two providers send ranges of one NAR at once, and the fetch survives one of them
//! being killed mid-fetch.

use std::time::Duration;

use crate::harness::{NixHost, http, wait_until, wait_until_or_show};
use crate::hostile::Hostile;
use crate::node_harness::{Node, built_on_first};
use crate::trust::{honest_with, metric, substitute_all};
use narmesh::chunks::GROUP;
use narmesh::nix::StorePath;

/// The node's verified bytes fetched from the peer with endpoint id `id`.
fn fetched_from(node: &Node, id: &str) -> f64 {
    metric(
        node,
        &format!("narmesh_mesh_fetched_bytes_total{{peer=\"{id}\"}}"),
    )
}

fn endpoint_id(address: &str) -> &str {
    address.split_once('@').expect("peer address").0
}

/// The hostile peer relays A's honest announcement of `path` to B, naming itself a provider
/// too (serving `nar` for it, if given); returned once B took it in.
fn relayed_by(
    h: &Hostile,
    nodes: &[Node],
    path: &StorePath,
    nar: Option<Vec<u8>>,
) -> narmesh_proto::gossip::PathAnnounce {
    let mut ann = h
        .catch_up_from(&nodes[0].address)
        .into_iter()
        .find(|x| x.narinfo.contains(&path.full()))
        .expect("the honest announcement");
    if let Some(nar) = nar {
        h.mode.nars.lock().unwrap().insert(ann.blake3, nar);
    }
    ann.providers.push(h.holds(&ann.blake3));
    let changed = metric(&nodes[1], "narmesh_mesh_records_changed_total");
    h.gossip(&[nodes[1].address.clone()], vec![ann.encode().unwrap()]);
    wait_until(30, "B to take the peer as a provider", || {
        metric(&nodes[1], "narmesh_mesh_records_changed_total") > changed
    });
    ann
}

/// A trusted, allowed peer names itself a provider of an honest NAR and serves its ranges with
/// one byte wrong in the second chunk group of each. The fetcher takes that range's first
/// group, refuses the second (the log names it), drops the liar for the rest, and completes
/// from the honest provider: real Nix substitutes the path, and the NAR served over HTTP is
/// byte for byte the honest one.
#[test]
fn a_provider_lying_mid_nar_is_caught_within_one_chunk_group() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(44, false);
    h.mode
        .lie_mid_range
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let path = a.build(r#"mk "transfer-liar" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    // The liar relays A's honest announcement, naming itself a provider too.
    let nar = a.dump(&path);
    let ann = relayed_by(&h, &nodes, &path, Some(nar.clone()));
    assert_eq!(nar.len() as u64, ann.nar_size);
    // Real Nix substitutes through B, which fetches from A and the liar at once.
    substitute_all(&nodes[1], &[path.full()]);
    let asked = h.mode.asked.lock().unwrap().clone();
    assert_eq!(
        asked.len(),
        1,
        "the liar was asked for one range, then dropped: {asked:?}"
    );
    let (start, end) = asked[0];
    assert!(end - start > GROUP, "its range spans more than one group");
    let log = nodes[1].log();
    let bad = start / GROUP + 1;
    assert!(
        log.contains(&format!("chunk group {bad} does not match")),
        "the lie was caught at its own chunk group {bad}; B's log:\n{log}"
    );
    // Of the liar's range, only the group before the lie was taken.
    let from_liar = fetched_from(&nodes[1], &h.endpoint_id());
    let from_a = fetched_from(&nodes[1], endpoint_id(&nodes[0].address));
    assert_eq!(
        from_liar, GROUP as f64,
        "verified bytes taken from the liar"
    );
    assert_eq!(from_a, (nar.len() as u64 - GROUP) as f64, "the rest from A");
    let (code, _, body) = http(
        &nodes[1].http,
        "GET",
        &format!("/{}", narmesh::pipeline::nar_url(&ann.blake3)),
        &[],
    );
    assert_eq!(code, 200);
    assert!(body == nar, "the NAR B serves is the honest one");
}

/// A trusted, allowed peer names itself a provider of an honest NAR and sends its range slowly
/// enough that no read ever times out: its first chunk group, then a byte every 5 s. The
/// honest provider takes over that range from what was written of it (the group the slow one
/// verified waits in its buffer), and the fetch ends as soon as every byte is in: it does not
/// wait for the slow provider's range (which never ends), nor for the chunk group deadline
/// (20 s) that would end it.
#[test]
fn a_provider_that_drips_its_range_is_not_waited_for() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(50, false);
    h.mode
        .drip_ranges
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let path = a.build(r#"mk "transfer-drip" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    let nar = a.dump(&path);
    let size = nar.len();
    relayed_by(&h, &nodes, &path, Some(nar));
    let started = std::time::Instant::now();
    substitute_all(&nodes[1], &[path.full()]);
    // Nix has every byte once they are written; the fetch itself must end too, its place and
    // its ranges' memory given back.
    wait_until(15, "B's fetch to end", || {
        metric(&nodes[1], "narmesh_mesh_transfers ") == 0.0
            && metric(&nodes[1], "narmesh_mesh_ranges ") == 0.0
    });
    let took = started.elapsed();
    let asked = h.mode.asked.lock().unwrap().clone();
    assert_eq!(
        asked.len(),
        1,
        "the slow peer was asked for a range, once: {asked:?}; B's log:\n{}",
        nodes[1].log()
    );
    // What it verified waited in its buffer, unwritten: taken over, it came from A.
    assert_eq!(fetched_from(&nodes[1], &h.endpoint_id()), 0.0);
    assert_eq!(
        fetched_from(&nodes[1], endpoint_id(&nodes[0].address)),
        size as f64
    );
    assert!(
        took < Duration::from_secs(15),
        "the fetch waited for the slow provider: {took:?}"
    );
}

/// A provider that drips its ranges (its first chunk group, then a byte every 5 s: no read
/// ever waits past the 10 s allowed between pieces) is the only one B knows of (B and A are
/// not peers; the slow peer relays A's record naming itself alone). Only the chunk group
/// deadline (20 s) cuts it off: after three such ranges it is avoided, the fetch ends and
/// gives its place back, and the client of B's cache gets a short NAR, not one that never
/// ends.
#[test]
fn a_lone_provider_that_drips_is_cut_off_by_the_chunk_group_deadline() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(52, false);
    h.mode
        .drip_ranges
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    let (a_addr, b_addr) = (nodes[0].address.clone(), nodes[1].address.clone());
    nodes[0].peers.retain(|p| *p != b_addr);
    nodes[1].peers.retain(|p| *p != a_addr);
    for n in nodes.iter_mut() {
        n.start();
    }
    let path =
        a.build(r#"mk "transfer-lone-drip" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    let nar = a.dump(&path);
    let mut ann = None;
    wait_until(30, "the slow peer to catch up with A", || {
        ann = h
            .catch_up_from(&a_addr)
            .into_iter()
            .find(|x| x.narinfo.contains(&path.full()));
        ann.is_some()
    });
    let mut ann = ann.unwrap();
    h.mode.nars.lock().unwrap().insert(ann.blake3, nar.clone());
    ann.providers = vec![h.holds(&ann.blake3)];
    h.gossip(std::slice::from_ref(&b_addr), vec![ann.encode().unwrap()]);
    wait_until(30, "B to learn the path from the slow peer", || {
        nodes[1].serves(&[path.full()])
    });

    let started = std::time::Instant::now();
    let mut conn = std::net::TcpStream::connect(&nodes[1].http).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(150)))
        .unwrap();
    write!(
        conn,
        "GET /nar/{}.nar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        narmesh::storage::hex(&ann.blake3)
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    let took = started.elapsed();
    let head = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    let body = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| got.len() - i - 4);
    eprintln!("B's client: {body} bytes of {} in {took:?}", nar.len());
    assert!(
        head.starts_with("HTTP/1.1 200") && body < nar.len(),
        "B's client got {body} bytes of the NAR's {} ({head:?}); B's log:\n{}",
        nar.len(),
        nodes[1].log()
    );
    // Three ranges of at least 20 s each; without the deadline the drip goes on for 10 min.
    assert!(
        took >= Duration::from_secs(50) && took < Duration::from_secs(120),
        "the answer ended after {took:?}, not at the third chunk group deadline; B's log:\n{}",
        nodes[1].log()
    );
    wait_until_or_show(
        30,
        "B's fetch to end and give its place back",
        || {
            metric(&nodes[1], "narmesh_mesh_transfers ") == 0.0
                && metric(&nodes[1], "narmesh_mesh_ranges ") == 0.0
        },
        || nodes[1].log(),
    );
    let log = nodes[1].log();
    assert!(
        log.contains("a chunk group took too long") && log.contains("avoiding peer"),
        "B's log:\n{log}"
    );
}

/// B's first dial of A for a NAR panics (an injected fault): that fetch gets its NAR by the
/// version 1 fallback, and the dial does not stay in B's table of dials under way, so the next
/// fetch dials again (left there, its error would be every later fetch's answer from A until
/// a restart).
#[test]
fn a_dial_that_panics_is_not_the_answer_for_good() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[1]
        .env
        .push(("NARMESH_TEST_FAULT".into(), "mesh.dial-panics:1".into()));
    for n in nodes.iter_mut() {
        n.start();
    }
    let paths = a.build(
        r#"builtins.genList (i: mk "transfer-dial-panics-${toString i}" "head -c 300000 /dev/urandom > $out") 2"#,
    );
    wait_until(30, "B to learn the paths", || {
        nodes[1].serves(&paths.iter().map(|p| p.full()).collect::<Vec<_>>())
    });
    // The dial's error as B's log tells it (a debug line of the ask that got it).
    let dial_errors = || nodes[1].log().matches("dial: task").count();
    let mut seen = Vec::new();
    for p in &paths {
        let info = crate::storage::narinfo(&nodes[1], p);
        let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{}", info.url), &[]);
        assert_eq!(code, 200, "B's log:\n{}", nodes[1].log());
        assert!(body == a.dump(p), "the NAR B served is A's");
        seen.push(dial_errors());
    }
    let log = nodes[1].log();
    assert!(
        log.contains("fault injected at mesh.dial-panics") && seen[0] >= 1,
        "the fault was not met; B's log:\n{log}"
    );
    assert_eq!(
        seen[1], seen[0],
        "the second fetch got the panicked dial's error again; B's log:\n{log}"
    );
}

/// A provider named in a record that answers it no longer holds the NAR (as one does once Nix
/// GC took the path, before its withdrawal arrives) is asked once and left to the others for
/// this NAR: not asked again and again, and not avoided as if it had failed (no warning, and it
/// stays first choice for other NARs).
#[test]
fn a_provider_that_no_longer_holds_a_nar_is_asked_once_and_not_avoided() {
    let t = tempfile::tempdir().unwrap();
    let h = Hostile::start(45, false);
    h.mode
        .not_found
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, mut nodes) = honest_with(&t, 2, &h, &[]);
    // A sends its range slowly enough for B to ask the other provider many times meanwhile.
    nodes[0].mesh_extra.push_str("serve-rate = \"8MiB\"\n");
    for n in nodes.iter_mut() {
        n.start();
    }
    let path = a.build(r#"mk "transfer-gone" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    let ann = relayed_by(&h, &nodes, &path, None);
    substitute_all(&nodes[1], &[path.full()]);
    let asked = h.mode.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "asked once for a range: {asked:?}");
    let log = nodes[1].log();
    assert!(
        !log.contains("avoiding peer"),
        "a provider without the NAR is not avoided; B's log:\n{log}"
    );
    assert_eq!(
        fetched_from(&nodes[1], endpoint_id(&nodes[0].address)),
        ann.nar_size as f64,
        "every byte from A"
    );
}

/// Two providers (A built the path, C replicated it eagerly) each serve at most 8 MiB/s
/// (`[mesh] serve-rate`). D fetches the NAR for real Nix from both at once: both counters move.
/// A is killed mid-fetch; C takes over A's ranges and Nix still gets the path.
#[test]
fn two_providers_send_ranges_at_once_and_one_killed_mid_fetch_is_taken_over() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 3);
    for node in nodes.iter_mut() {
        node.mesh_extra = "serve-rate = \"8MiB\"\n".into();
    }
    nodes[1].replicate = "eager";
    nodes[0].start();
    nodes[1].start();
    let path = a.build(r#"mk "transfer-two" "head -c 25000000 /dev/urandom > $out""#)[0].clone();
    let size = a.dump(&path).len() as f64;
    wait_until(60, "C to hold the NAR", || {
        nodes[1].status().storage.files == 1
    });
    // D starts now and learns the path from C, whose record names both providers.
    nodes[2].start();
    let c_id = endpoint_id(&nodes[1].address).to_owned();
    let a_id = endpoint_id(&nodes[0].address).to_owned();
    // Whichever peer D caught up with first, once it has read C's log its record names C
    // (C's entry carries C's own statement; A's may not yet).
    wait_until(30, "D to learn C provides the path", || {
        nodes[2].serves(&[path.full()])
            && nodes[2]
                .status()
                .peers
                .iter()
                .any(|p| p.endpoint_id == c_id && p.cursor > 0)
    });
    let d_http = nodes[2].http.clone();
    let d_key = nodes[2].public_key();
    let full = path.full();
    let nix = std::thread::spawn(move || {
        let host = NixHost::substituter(&format!("http://{d_http}"), &d_key);
        let out = host.output("nix-store", &["-r", &full]);
        (out, host)
    });
    wait_until(30, "both providers to send ranges", || {
        fetched_from(&nodes[2], &a_id) > 0.0 && fetched_from(&nodes[2], &c_id) > 0.0
    });
    let at_kill = fetched_from(&nodes[2], &a_id) + fetched_from(&nodes[2], &c_id);
    assert!(
        at_kill < size,
        "the fetch is still under way when A is killed"
    );
    nodes[0].kill9();
    let (out, host) = nix.join().expect("nix thread");
    assert!(
        out.status.success(),
        "Nix substitutes through D with A killed mid-fetch: {}\nD's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        nodes[2].log()
    );
    crate::harness::run_ok(host.cmd("nix-store").args(["--verify-path", &path.full()]));
    let (from_a, from_c) = (
        fetched_from(&nodes[2], &a_id),
        fetched_from(&nodes[2], &c_id),
    );
    assert_eq!(
        from_a + from_c,
        size,
        "every byte came from one of them, once"
    );
    assert!(
        from_c > size / 2.0,
        "C took over A's part: A {from_a}, C {from_c} of {size}"
    );
}

/// A node that uses the bulk channel fetches from a provider without one over QUIC: real Nix
/// substitutes the path through B, and not one byte came over the bulk channel.
#[test]
fn a_provider_without_the_bulk_channel_is_fetched_from_over_quic() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[1]
        .mesh_extra
        .push_str("bulk-listen = \"127.0.0.1:0\"\n");
    for n in nodes.iter_mut() {
        n.start();
    }
    let path = a.build(r#"mk "transfer-no-bulk" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    let size = a.dump(&path).len() as f64;
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    substitute_all(&nodes[1], &[path.full()]);
    assert_eq!(metric(&nodes[1], "narmesh_mesh_bulk_bytes_total"), 0.0);
    assert_eq!(
        fetched_from(&nodes[1], endpoint_id(&nodes[0].address)),
        size,
        "every byte came from A, over QUIC"
    );
}

/// With `[mesh] bulk-listen` on both nodes, B fetches A's NAR ranges over TCP with a ticket from
/// the mesh, and real Nix substitutes the path through B, while a stranger (at another loopback
/// address) holds as many connections to A's bulk port as A takes at all, saying nothing: A
/// takes 16 of them, and B's still get in. A stranger on A's bulk port (a guessed token, or
/// garbage), while B's ticket is still good, gets not one byte.
#[test]
fn the_bulk_channel_carries_ranges_and_a_stranger_gets_nothing() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    for node in nodes.iter_mut() {
        node.mesh_extra.push_str("bulk-listen = \"127.0.0.1:0\"\n");
        node.start();
    }
    let log = nodes[0].log();
    let port: u16 = log
        .lines()
        .find_map(|l| {
            l.split("bulk channel (TCP, unencrypted) on 127.0.0.1:")
                .nth(1)
        })
        .and_then(|p| p.trim().parse().ok())
        .expect("A's bulk port in its log");
    let path = a.build(r#"mk "transfer-bulk" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    let size = a.dump(&path).len() as f64;
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    // The silent stranger: its connections are taken or closed at once, and those taken are
    // let go only after A's header deadline (10 s), long after B's fetch.
    let connected = std::time::Instant::now();
    let silent: Vec<std::net::TcpStream> = (0..narmesh::mesh::BULK_CONNECTIONS)
        .map(|_| crate::harness::tcp_from([127, 0, 0, 2].into(), ([127, 0, 0, 1], port).into()))
        .collect();
    let closed = || {
        silent
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                matches!((&**s).read(&mut [0u8; 1]), Ok(0))
            })
            .count()
    };
    let refused = narmesh::mesh::BULK_CONNECTIONS - narmesh::mesh::BULK_HEADERLESS_PER_HOST;
    wait_until(5, "A to close the stranger's connections past 16", || {
        closed() >= refused
    });
    substitute_all(&nodes[1], &[path.full()]);
    assert_eq!(
        metric(&nodes[1], "narmesh_mesh_bulk_bytes_total"),
        size,
        "every range came over the bulk channel"
    );
    // Unless the fetch outlasted A's header deadline (a very slow machine), the 16 were held
    // all along it.
    if connected.elapsed() < std::time::Duration::from_secs(9) {
        assert_eq!(closed(), refused, "A still holds the stranger's first 16");
    }
    drop(silent);
    // Strangers, while B's ticket is out: a well-formed header with a guessed token, and
    // garbage.
    let guessed = narmesh_proto::sync::BulkHeader {
        token: [0x42; 32],
        start: 0,
        end: GROUP,
    }
    .encode()
    .to_vec();
    for attempt in [guessed, vec![0xff; 52]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        s.write_all(&attempt).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.is_empty(), "a stranger got {} bytes", got.len());
    }
}

/// A bulk fetch that outlasts a ticket (A keeps one 60 s from when it issued it) asks for a new
/// one in time: A serves 70 MB at 1 MiB/s, all of it over the bulk channel, and not one range
/// comes with a token A no longer knows (`unknown-ticket`).
#[test]
fn a_bulk_fetch_longer_than_a_ticket_asks_for_a_new_one_in_time() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[0].mesh_extra.push_str("serve-rate = \"1MiB\"\n");
    for node in nodes.iter_mut() {
        node.mesh_extra.push_str("bulk-listen = \"127.0.0.1:0\"\n");
        node.start();
    }
    let path =
        a.build(r#"mk "transfer-bulk-long" "head -c 70000000 /dev/urandom > $out""#)[0].clone();
    let size = a.dump(&path).len() as f64;
    wait_until(30, "B to learn the path", || {
        nodes[1].serves(&[path.full()])
    });
    let started = std::time::Instant::now();
    substitute_all(&nodes[1], &[path.full()]);
    assert!(
        started.elapsed() > Duration::from_secs(62),
        "too fast to outlast a ticket: {:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &nodes[0],
            "narmesh_mesh_refused_total{reason=\"unknown-ticket\"}"
        ),
        0.0,
        "B used a ticket A had let go"
    );
    assert_eq!(
        metric(&nodes[1], "narmesh_mesh_bulk_bytes_total"),
        size,
        "every range came over the bulk channel"
    );
}

/// Nodes A (built on, serving peers at `rate`) and B, started, and a path of `bytes` random
/// bytes built on A that B has learnt.
fn paced_pair(
    t: &tempfile::TempDir,
    rate: &str,
    name: &str,
    bytes: u64,
) -> (NixHost, Vec<Node>, StorePath) {
    paced(t, 2, rate, name, bytes)
}

/// [`paced_pair`] with `n` nodes: A and the others, which have all learnt the path.
fn paced(
    t: &tempfile::TempDir,
    n: usize,
    rate: &str,
    name: &str,
    bytes: u64,
) -> (NixHost, Vec<Node>, StorePath) {
    let (a, mut nodes) = built_on_first(t.path(), n);
    nodes[0]
        .mesh_extra
        .push_str(&format!("serve-rate = \"{rate}\"\n"));
    for n in nodes.iter_mut() {
        n.start();
    }
    let path = a.build(&format!(
        r#"mk "{name}" "head -c {bytes} /dev/urandom > $out""#
    ))[0]
        .clone();
    wait_until(30, "the others to learn the path", || {
        nodes[1..].iter().all(|n| n.serves(&[path.full()]))
    });
    (a, nodes, path)
}

/// The URL of `path`'s NAR in the narinfo `node` serves.
fn nar_url_of(node: &Node, path: &StorePath) -> String {
    let (code, _, info) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", path.hash_part()),
        &[],
    );
    assert_eq!(code, 200);
    narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap())
        .unwrap()
        .url
}

/// `[mesh] serve-rate` caps what all peers together take: 8 MB from a node serving at 4 MiB/s
/// cannot arrive in less than about 1.9 s, and 8 MB to each of two peers at once (16 MB) not
/// in less than about 3.8 s (lower bounds: a slower machine only takes longer).
#[test]
fn serve_rate_caps_what_peers_take() {
    let t = tempfile::tempdir().unwrap();
    let (a, nodes, path) = paced(&t, 3, "4MiB", "transfer-paced", 8_000_000);
    let fetch = |node: &Node, path: &StorePath| {
        let url = nar_url_of(node, path);
        let started = std::time::Instant::now();
        let (code, _, body) = http(&node.http, "GET", &format!("/{url}"), &[]);
        assert_eq!(code, 200);
        assert!(body.len() >= 8_000_000);
        started.elapsed()
    };
    let took = fetch(&nodes[1], &path);
    assert!(
        took >= Duration::from_millis(1500),
        "8 MB at 4 MiB/s arrived in {took:?}"
    );
    // Two more paths, which only A holds, fetched by B and C at once.
    let two = a.build(
        r#"builtins.genList (i: mk "transfer-paced-${toString i}" "head -c 8000000 /dev/urandom > $out") 2"#,
    );
    wait_until(30, "B and C to learn the paths", || {
        let all: Vec<String> = two.iter().map(|p| p.full()).collect();
        nodes[1].serves(&all) && nodes[2].serves(&all)
    });
    let took = std::thread::scope(|s| {
        let b = s.spawn(|| fetch(&nodes[1], &two[0]));
        let c = s.spawn(|| fetch(&nodes[2], &two[1]));
        b.join().unwrap().max(c.join().unwrap())
    });
    assert!(
        took >= Duration::from_millis(3000),
        "16 MB to two peers at 4 MiB/s arrived in {took:?}"
    );
}

/// Node A, built on, serving peers at 4 MiB/s, and node B, eager; neither started.
fn slow_provider_and_eager_node(t: &tempfile::TempDir) -> (NixHost, Vec<Node>) {
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[0].mesh_extra.push_str("serve-rate = \"4MiB\"\n");
    nodes[1].replicate = "eager";
    (a, nodes)
}

/// An eager node fetches small NARs beside large ones instead of behind them: A serves peers at
/// 4 MiB/s, so B's eager fetches of two 12 MB NARs take about 6 s; a small path built after
/// them is held on B while neither large one is (with two fetches at once whatever their size,
/// the small one waited for a large one to finish).
#[test]
fn an_eager_node_fetches_small_nars_beside_large_ones() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = slow_provider_and_eager_node(&t);
    for n in nodes.iter_mut() {
        n.start();
    }
    let large = a.build(
        r#"builtins.genList (i: mk "eager-large-${toString i}" "head -c 12000000 /dev/urandom > $out") 2"#,
    );
    let large: Vec<String> = large.iter().map(|p| p.full()).collect();
    wait_until(30, "B to learn the large paths", || nodes[1].serves(&large));
    let small = a.build(r#"mk "eager-small" "echo small > $out""#)[0].full();
    wait_until(30, "B to hold a NAR", || {
        nodes[1].status().storage.files >= 1
    });
    let st = nodes[1].status().storage;
    assert!(
        st.files == 1 && st.file_bytes < 1_000_000,
        "the first NAR B holds is the small one: {st:?}"
    );
    assert!(nodes[1].serves(std::slice::from_ref(&small)));
    wait_until(60, "B to hold all three", || {
        nodes[1].status().storage.files == 3
    });
}

/// An eager node fetches at most two large NARs (over 4 MiB) at once: two fill a link, and the
/// other slots stay free for small paths (README). A serves peers at 4 MiB/s, so three 6 MB
/// NARs wished at the same time would all run for seconds if nothing held the third back.
/// B starts only once A serves all three, so its first catch-up wishes for them together;
/// B's `narmesh_mesh_transfers` is sampled throughout.
#[test]
fn an_eager_node_fetches_at_most_two_large_nars_at_once() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = slow_provider_and_eager_node(&t);
    nodes[0].start();
    let large = a.build(
        r#"builtins.genList (i: mk "eager-cap-${toString i}" "head -c 6000000 /dev/urandom > $out") 3"#,
    );
    let large: Vec<String> = large.iter().map(|p| p.full()).collect();
    wait_until(30, "A to serve the three", || nodes[0].serves(&large));
    nodes[1].start();
    let (mut most, mut samples) = (0.0f64, 0);
    wait_until(90, "B to hold all three", || {
        most = most.max(metric(&nodes[1], "narmesh_mesh_transfers "));
        samples += 1;
        nodes[1].status().storage.files == 3
    });
    assert_eq!(
        most, 2.0,
        "large transfers running at once on B, the most of {samples} samples"
    );
}

/// Bytes of `path` in the page cache (`mincore` over a mapping of it).
fn cached_bytes(path: &std::path::Path) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    // SAFETY: sysconf only reads a value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file, unmapped before returning; mincore
    // writes one byte per page into `vec`, which has one per page.
    unsafe {
        use std::os::fd::AsRawFd as _;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0, "mincore");
        libc::munmap(p, len);
    }
    vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64
}

/// Waits (10 s at most) for less than an eighth of `file` to be in the page cache.
fn leaves_the_cache(file: &std::path::Path) {
    let size = file.metadata().unwrap().len();
    let mut cached = 0;
    let left = (0..100).any(|_| {
        cached = cached_bytes(file);
        cached < size / 8 || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        }
    });
    assert!(
        left,
        "{cached} of the NAR's {size} bytes are still in the page cache after 10 s"
    );
}

/// A fetched NAR goes through the page cache instead of staying in it: its pages are written
/// back as they arrive and dropped once every reader passed them (README). B fetches a 64 MB
/// NAR eagerly; soon after it holds it, less than an eighth of the file is still cached (all of
/// it stayed, before).
#[test]
fn a_fetched_nar_leaves_the_page_cache_behind_its_readers() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[1].replicate = "eager";
    for n in nodes.iter_mut() {
        n.start();
    }
    a.build(r#"mk "cache-large" "head -c 64000000 /dev/urandom > $out""#);
    wait_until(90, "B to hold the NAR", || {
        nodes[1].status().storage.files == 1
    });
    let nars = nodes[1].dir.join("data/nars");
    let file = std::fs::read_dir(&nars)
        .expect("nars dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "nar"))
        .expect("B's NAR file");
    let size = file.metadata().unwrap().len();
    assert!(size >= 64_000_000, "{size}");
    leaves_the_cache(&file);
}

/// A client that leaves in the middle of a NAR B fetches on demand leaves the fetch and the node
/// whole (README: hostile HTTP clients): A serves peers at 8 MiB/s, the client reads 1 MB of a
/// 48 MB NAR and hangs up; B still completes and keeps the NAR, serves it whole to the next
/// client, and its pages still leave the page cache (the leaver no longer holds them back).
#[test]
fn a_client_leaving_mid_nar_leaves_the_fetch_and_the_node_whole() {
    use std::io::{Read as _, Write as _};
    let t = tempfile::tempdir().unwrap();
    let (a, nodes, path) = paced_pair(&t, "8MiB", "leaver", 48_000_000);
    let url = nar_url_of(&nodes[1], &path);

    let mut conn = std::net::TcpStream::connect(&nodes[1].http).expect("connect");
    write!(conn, "GET /{url} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (mut got, mut buf) = (0, vec![0u8; 64 << 10]);
    while got < 1_000_000 {
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0, "the answer ended after {got} bytes");
        got += n;
    }
    drop(conn);
    assert_eq!(
        nodes[1].status().storage.files,
        0,
        "the fetch is still running"
    );

    wait_until_or_show(
        60,
        "B to hold the NAR",
        || nodes[1].status().storage.files == 1,
        || format!("B's log:\n{}", nodes[1].log()),
    );
    leaves_the_cache(&nodes[1].dir.join("data").join(url.replace("nar/", "nars/")));
    let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{url}"), &[]);
    assert_eq!(code, 200);
    assert!(body == a.dump(&path), "the NAR B serves is whole and right");
}

/// A large NAR comes as two ranges of its one provider at once (while one range starts or is
/// written, the other's bytes flow): the provider, paced at 8 MiB/s so the fetch of 48 MB takes
/// seconds, serves two streams at the same time (`narmesh_mesh_serving`), and what B serves is
/// the whole NAR. With one range per provider at a time the gauge never passes 1.
///
/// B runs with `[http] idle-secs = 3` and the NAR is asked for on a keep-alive connection: an
/// answer that takes longer than that (bytes flowing) is not cut by the request head deadline,
/// and the connection answers its next request after it.
#[test]
fn a_large_nar_comes_as_two_ranges_of_one_provider_at_once() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes, path) = paced_pair(&t, "8MiB", "overlap", 48_000_000);
    nodes[1].stop();
    nodes[1].http_extra = "idle-secs = 3\n".into();
    nodes[1].start();
    let url = nar_url_of(&nodes[1], &path);
    let get = {
        let (addr, url) = (nodes[1].http.clone(), url.clone());
        std::thread::spawn(move || {
            let c = std::net::TcpStream::connect(&addr).expect("connect");
            c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            // One answer on the kept-alive connection: its status and body.
            let mut answer = |target: &str| -> (String, Vec<u8>) {
                write!(&c, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let (mut status, mut len, mut line) = (String::new(), 0usize, String::new());
                r.read_line(&mut status).unwrap();
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).expect("the whole body");
                (status, body)
            };
            let started = std::time::Instant::now();
            let nar = answer(&format!("/{url}"));
            let took = started.elapsed();
            (nar, took, answer("/nix-cache-info"))
        })
    };
    let mut most = 0.0f64;
    while !get.is_finished() {
        most = most.max(metric(&nodes[0], "narmesh_mesh_serving"));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ((status, body), took, (next, info)) = get.join().expect("the GET");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body == a.dump(&path), "the NAR B serves is whole and right");
    assert!(
        took > std::time::Duration::from_secs(3),
        "the answer took {took:?}: not longer than idle-secs"
    );
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    assert!(String::from_utf8_lossy(&info).contains("StoreDir"));
    assert!(
        most >= 2.0,
        "A served at most {most} streams at once during the fetch"
    );
}

/// `[mesh] fetch-memory` caps the ranges in flight and the transfers' leaves over all transfers
/// together: with room for two ranges (4 MiB) and both NARs' leaves (2 × 77 KiB) in 5 MiB, two
/// large NARs fetched at once (each of which would take two ranges of its provider) never have
/// more than two ranges running, their leaves are counted in it while they run, and both
/// arrive whole.
#[test]
fn fetch_memory_caps_the_ranges_in_flight_over_all_transfers() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    nodes[0].mesh_extra.push_str("serve-rate = \"16MiB\"\n");
    nodes[1].mesh_extra.push_str("fetch-memory = \"5MiB\"\n");
    for n in nodes.iter_mut() {
        n.start();
    }
    let paths: Vec<StorePath> = ["capped-1", "capped-2"]
        .iter()
        .map(|name| {
            a.build(&format!(
                r#"mk "{name}" "head -c 40000000 /dev/urandom > $out""#
            ))[0]
                .clone()
        })
        .collect();
    wait_until(30, "B to learn both paths", || {
        nodes[1].serves(&paths.iter().map(StorePath::full).collect::<Vec<_>>())
    });
    let gets: Vec<_> = paths
        .iter()
        .map(|p| {
            let (addr, url) = (nodes[1].http.clone(), nar_url_of(&nodes[1], p));
            std::thread::spawn(move || http(&addr, "GET", &format!("/{url}"), &[]))
        })
        .collect();
    let (mut most, mut leaves) = (0.0f64, 0.0f64);
    while !gets.iter().all(|g| g.is_finished()) {
        most = most.max(metric(&nodes[1], "narmesh_mesh_ranges "));
        leaves = leaves.max(metric(&nodes[1], "narmesh_mesh_leaves_bytes "));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut want_leaves = 0;
    for (get, p) in gets.into_iter().zip(&paths) {
        let (code, _, body) = get.join().expect("the GET");
        assert_eq!(code, 200);
        assert!(body == a.dump(p), "{} arrives whole and right", p.full());
        // 32 bytes a 16 KiB group, counted in whole KiB.
        want_leaves += (body.len() as u64).div_ceil(16 << 10) * 32;
    }
    assert_eq!(
        most, 2.0,
        "ranges in flight on B at most (room for 2 in [mesh] fetch-memory)"
    );
    let per_nar_kib = (want_leaves / 2).div_ceil(1024);
    assert_eq!(
        leaves,
        (2 * per_nar_kib * 1024) as f64,
        "both transfers' leaves held in [mesh] fetch-memory at once"
    );
    assert_eq!(metric(&nodes[1], "narmesh_mesh_leaves_bytes "), 0.0);
}

/// A fetch waiting for a transfer slot is dropped once whoever wanted its bytes has gone, and
/// one asked for again keeps its place in the queue: with A frozen, 32 NARs asked of B hold
/// every slot; a 33rd and a 34th wait and their HTTP clients leave; a 35th is asked, then the
/// 33rd again. Once A thaws the 32 arrive, the 33rd runs in its first ask's place (that task
/// takes over the later transfer of the same NAR: nothing dropped for it), the 34th is never
/// fetched (it was, for nobody, when the queued task held the transfer), and the 35th comes.
/// The 32 fetches share one dial of A: each dialling its own, A let B have 8 connections and
/// refused the rest, and their fetches failed (502).
#[test]
fn a_fetch_waiting_for_a_slot_is_dropped_when_its_client_leaves() {
    use std::io::Write as _;
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = built_on_first(t.path(), 2);
    for n in nodes.iter_mut() {
        n.start();
    }
    let n = narmesh::mesh::MAX_TRANSFERS;
    let paths = a.build(&format!(
        r#"builtins.genList (i: mk "queued-${{toString i}}" "head -c 20000 /dev/urandom > $out") {}"#,
        n + 3
    ));
    let full: Vec<String> = paths.iter().map(StorePath::full).collect();
    wait_until(30, "B to learn the paths", || nodes[1].serves(&full));
    let urls: Vec<String> = paths.iter().map(|p| nar_url_of(&nodes[1], p)).collect();
    let get = |u: &str| {
        let (addr, u) = (nodes[1].http.clone(), u.to_owned());
        std::thread::spawn(move || http(&addr, "GET", &format!("/{u}"), &[]))
    };
    let queued = |k: usize, what: &str| {
        wait_until(10, what, || {
            metric(&nodes[1], "narmesh_mesh_transfers_queued ") == k as f64
        })
    };

    nodes[0].signal("STOP");
    let gets: Vec<_> = urls[..n].iter().map(|u| get(u)).collect();
    wait_until(30, "the first NARs to hold every transfer slot", || {
        metric(&nodes[1], "narmesh_mesh_transfers ") == n as f64
    });
    let mut late = Vec::new();
    for (k, u) in urls[n..n + 2].iter().enumerate() {
        let mut c = std::net::TcpStream::connect(&nodes[1].http).unwrap();
        write!(c, "GET /{u} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        late.push(c);
        queued(k + 1, "the late NARs to wait for a slot");
    }
    drop(late);
    let other = get(&urls[n + 2]);
    queued(3, "the 35th NAR to wait");
    // The node notices the clients gone (hyper reads their close) and drops their waits (were
    // the 33rd's not dropped yet, the ask below would join it, and the queue stay at 3).
    std::thread::sleep(Duration::from_millis(500));
    let again = get(&urls[n]);
    queued(4, "the 33rd NAR, asked again, to wait");
    // A thaws well within the 5 s the shared dial of it may take.
    nodes[0].signal("CONT");
    for g in gets {
        assert_eq!(g.join().unwrap().0, 200);
    }
    for (g, p) in [(other, &paths[n + 2]), (again, &paths[n])] {
        let (code, _, body) = g.join().unwrap();
        assert_eq!(code, 200);
        assert!(body == a.dump(p), "{} arrives whole", p.full());
    }
    wait_until(30, "the transfers to end", || {
        metric(&nodes[1], "narmesh_mesh_transfers ") == 0.0
            && metric(&nodes[1], "narmesh_mesh_transfers_queued ") == 0.0
            && nodes[1].status().storage.files >= n as u64 + 2
    });
    assert_eq!(
        nodes[1].status().storage.files,
        n as u64 + 2,
        "the NAR whose client left was fetched for nobody"
    );
    // The queue is first come, first served: the 33rd's first task gets a slot before the
    // task of its second ask, and runs the transfer of that ask.
    assert_eq!(
        metric(&nodes[1], "narmesh_mesh_transfers_dropped_total "),
        1.0,
        "one fetch nobody wanted left the queue; the one asked again took its first place"
    );
    let (code, _, body) = http(&nodes[1].http, "GET", &format!("/{}", urls[n + 1]), &[]);
    assert_eq!(code, 200);
    assert!(
        body == a.dump(&paths[n + 1]),
        "the NAR asked for again is whole"
    );
}
