//! The mesh with real processes on loopback, each node with its own chroot Nix store: a path
//! built on host A is substituted by real Nix on host C from C's own node; nodes that were away
//! catch up; eager nodes hold every NAR; untrusted signatures and disallowed peers get nowhere.

use narmesh::nix::StorePath;
use narmesh::nix::store_db::StoreDb;

use crate::harness::{Nix, NixHost, http, run_ok, wait_until, wait_until_or_show};
use crate::node_harness::Node;

const CHAIN: &str = r#"
  let
    a = mk "mesh-a" "echo a > $out";
    b = mk "mesh-b" "mkdir -p $out/bin; echo ${a} > $out/ref; printf '#!/bin/sh\n' > $out/bin/x; chmod +x $out/bin/x";
  in mk "mesh-top" "mkdir $out; ln -s ${b}/bin/x $out/run; echo ${b} > $out/ref; head -c 300000 /dev/urandom > $out/blob"
"#;

/// A cluster of nodes that all know and trust each other; node 0 serves building host A.
struct Cluster {
    // Dropped in this order: the nodes (their logs shown if the test failed) before their
    // directory.
    nodes: Vec<Node>,
    a: NixHost,
    _t: tempfile::TempDir,
}

fn cluster(n: usize, replicate: &[&'static str]) -> Cluster {
    cluster_with(Nix::V2_8, n, replicate)
}

/// `cluster`, with host A running `nix`.
fn cluster_with(nix: Nix, n: usize, replicate: &[&'static str]) -> Cluster {
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook_nix(nix, &nodes[0].socket(), &nodes[0].spool());
    crate::node_harness::full_mesh(&mut nodes);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.replicate = replicate.get(i).copied().unwrap_or("on-demand");
        node.store_root = if i == 0 {
            a.root.clone()
        } else {
            node.dir.join("store")
        };
    }
    Cluster { _t: t, a, nodes }
}

/// Host C, substituting only from `node`, gets `top` and verifies it.
fn substitute_from(node: &Node, top: &StorePath, expect: usize) {
    substitute_with(Nix::V2_8, node, top, expect)
}

/// Host C, running `nix` and substituting only from `node`, gets `top` and verifies it.
fn substitute_with(nix: Nix, node: &Node, top: &StorePath, expect: usize) {
    let key = node.public_key();
    let c = NixHost::substituter_nix(nix, &format!("http://{}", node.http), &key);
    run_ok(c.cmd("nix-store").args(["-r", &top.full()]));
    run_ok(c.cmd("nix-store").args(["--verify-path", &top.full()]));
    assert_eq!(c.closure(std::slice::from_ref(top)).len(), expect);
}

#[test]
fn a_build_on_a_is_substituted_on_c_through_the_mesh() {
    let mut cl = cluster(3, &[]);
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    let st = cl.nodes[2].status();
    assert_eq!(st.peers.len(), 2, "{st:?}");
    assert!(
        st.peer_address.contains('@') && st.endpoint_id.len() == 64,
        "{st:?}"
    );
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    assert_eq!(paths.len(), 3);
    for n in &cl.nodes {
        wait_until(30, "every node to serve the narinfos", || n.serves(&paths));
    }
    // C's own node fetches the NARs from A over iroh while its Nix downloads them.
    substitute_from(&cl.nodes[2], &top, 3);
    // Once fetched, C's node holds the NAR and serves it by range like its own.
    let (_, _, info) = http(
        &cl.nodes[2].http,
        "GET",
        &format!("/{}.narinfo", top.hash_part()),
        &[],
    );
    let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap();
    wait_until(10, "C to keep the NAR", || {
        let (code, hdrs, _) = http(&cl.nodes[2].http, "HEAD", &format!("/{}", info.url), &[]);
        code == 200 && hdrs.iter().any(|(k, _)| k == "accept-ranges")
    });
    assert!(
        info.sigs.len() >= 2,
        "the origin's signature and C's: {info:?}"
    );
    // C now provides A's paths and says so: A hears its own paths come back and refuses
    // nothing (its own key counts, though no operator lists it in trusted-public-keys).
    std::thread::sleep(std::time::Duration::from_secs(2));
    for n in &cl.nodes {
        let (_, _, body) = http(&n.http, "GET", "/metrics", &[]);
        let refused: f64 = String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.starts_with("narmesh_mesh_refused_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(refused, 0.0, "an honest mesh refuses nothing:\n{}", n.log());
    }
}

#[test]
fn nix_2_26_builds_on_a_and_substitutes_on_c_through_the_mesh() {
    let mut cl = cluster_with(Nix::V2_26, 3, &[]);
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    for n in &cl.nodes {
        wait_until(30, "every node to serve the narinfos", || n.serves(&paths));
    }
    substitute_with(Nix::V2_26, &cl.nodes[2], &top, 3);
}

/// B and C learn by catch-up what A built while they were away. C's first two rounds (one
/// with each peer, started together) panic, an injected fault: a panicked round still frees
/// its peer, which is caught up with in the next round (were it left marked busy, C would
/// never ask it again). B's database fails to take its first two batches, another: the peer
/// is not blamed for it (not left alone as one that sends nothing acceptable).
#[test]
fn nodes_that_were_away_catch_up() {
    let mut cl = cluster(3, &[]);
    cl.nodes[1]
        .env
        .push(("NARMESH_TEST_FAULT".into(), "mesh.record-fails:6".into()));
    cl.nodes[2].env.push((
        "NARMESH_TEST_FAULT".into(),
        "mesh.catch-up-round-panics:2".into(),
    ));
    cl.nodes[0].start();
    cl.nodes[1].start();
    cl.nodes[1].stop();
    // B is stopped and C not started while A builds.
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    wait_until(30, "A to record its builds", || cl.nodes[0].serves(&paths));
    cl.nodes[1].start();
    cl.nodes[2].start();
    wait_until(30, "B to catch up", || cl.nodes[1].serves(&paths));
    wait_until_or_show(
        30,
        "C to catch up",
        || cl.nodes[2].serves(&paths),
        || format!("C's log:\n{}", cl.nodes[2].log()),
    );
    assert_eq!(
        cl.nodes[2]
            .log()
            .matches("fault injected at mesh.catch-up-round-panics")
            .count(),
        2,
        "C's first rounds panicked"
    );
    let b_log = cl.nodes[1].log();
    assert_eq!(
        b_log.matches("fault injected at mesh.record-fails").count(),
        6,
        "B's first batches were not recorded"
    );
    assert!(
        !b_log.contains("left alone for"),
        "B blamed a peer for its own failure:\n{b_log}"
    );
    // Its own failures are logged at most once a second (a full disk fails every gossip
    // message and catch-up batch).
    let stamps = |what: &str| -> Vec<f64> {
        b_log
            .lines()
            .filter(|l| l.contains(what))
            .map(|l| {
                // `2026-12-07T19:55:01.123456Z ...`: seconds into the day.
                let hms = l.get(11..26).expect("a timestamp");
                let mut parts = hms.split(':');
                let mut secs = 0.0;
                for _ in 0..3 {
                    secs = secs * 60.0 + parts.next().unwrap().parse::<f64>().unwrap();
                }
                secs
            })
            .collect()
    };
    let failed = stamps("fault injected at mesh.record-fails");
    let logged = stamps("mesh: recording announcements from");
    assert!(
        !logged.is_empty() && logged.len() <= failed.len(),
        "B logs its failures:\n{b_log}"
    );
    // (The limit counts by the monotonic clock, the log's stamps are the wall clock's, taken
    // a little later.)
    assert!(
        logged.windows(2).all(|w| w[1] - w[0] >= 0.9 || w[1] < w[0]),
        "B's failures logged within a second of each other: {logged:?}"
    );
    if failed.windows(2).any(|w| (w[1] - w[0]).abs() < 0.5) {
        assert!(
            logged.len() < failed.len()
                && (b_log.contains("more failed meanwhile")
                    || b_log.contains("more failure(s) were not logged")),
            "failures {failed:?} came together, and each was logged: {logged:?}"
        );
    }
    substitute_from(&cl.nodes[1], &top, 3);
    let st = cl.nodes[2].status();
    assert!(
        st.peers.iter().any(|p| p.cursor >= 3),
        "C's cursor on A moved: {st:?}"
    );
}

#[test]
fn eager_nodes_hold_every_nar_and_serve_with_the_origin_gone() {
    let mut cl = cluster(2, &["on-demand", "eager"]);
    cl.nodes[0].start();
    cl.nodes[1].start();
    let outs = cl.a.build(r#"builtins.genList (i: mk "eager-${toString i}" "head -c ${toString (1000 * i + 20000)} /dev/urandom > $out") 12"#);
    let paths: Vec<String> = outs.iter().map(|p| p.full()).collect();
    let bytes: u64 = {
        let db = StoreDb::open(&cl.a.root).unwrap();
        db.query_paths(&outs)
            .unwrap()
            .iter()
            .map(|i| i.as_ref().unwrap().nar_size)
            .sum()
    };
    wait_until(60, "B to hold every NAR", || {
        cl.nodes[1].status().nar_bytes >= bytes
    });
    // With nothing new, the mesh settles: no record keeps changing (a node restating what it
    // holds is not news, or A and B would trade these paths every catch-up round for ever).
    let changed = |n: &Node| -> f64 {
        let (_, _, body) = http(&n.http, "GET", "/metrics", &[]);
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.starts_with("narmesh_mesh_records_changed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut last = (changed(&cl.nodes[0]), changed(&cl.nodes[1]));
    let mut quiet = 0;
    wait_until(
        30,
        "the mesh to settle (6 catch-up rounds with no change)",
        || {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = (changed(&cl.nodes[0]), changed(&cl.nodes[1]));
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
            quiet >= 6
        },
    );
    cl.nodes[0].kill9();
    let key = cl.nodes[1].public_key();
    let c = NixHost::substituter(&format!("http://{}", cl.nodes[1].http), &key);
    let mut args = vec!["-r"];
    args.extend(paths.iter().map(|s| s.as_str()));
    run_ok(c.cmd("nix-store").args(&args));
}

#[test]
fn untrusted_signatures_and_disallowed_peers_get_nowhere() {
    let mut cl = cluster(2, &[]);
    // B does not trust A's key: A's announcements and catch-up entries are refused.
    cl.nodes[1].trusted = vec![cl.nodes[1].public_key()];
    // An outsider that names B as its peer, but B does not allow it.
    let t = tempfile::tempdir().unwrap();
    let mut outsider = Node::new(&t.path().join("outsider"), &cl.a.root);
    outsider.enable_mesh();
    outsider.peers = vec![cl.nodes[0].peers[0].clone()];
    outsider.trusted = vec![cl.nodes[0].public_key(), outsider.public_key()];
    for n in cl.nodes.iter_mut() {
        n.start();
    }
    outsider.start();
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    wait_until(30, "A to record", || cl.nodes[0].serves(&paths));
    // The outsider has the same store; give it the paths to announce.
    outsider
        .call(narmesh_proto::control::Request::Push {
            paths: vec![top.full()],
        })
        .unwrap();
    wait_until(30, "the outsider to record", || outsider.serves(&paths));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let b = cl.nodes[1].status();
    assert_eq!(
        b.paths_recorded, 0,
        "B recorded nothing it does not trust: {b:?}"
    );
    assert!(
        cl.nodes[1]
            .log()
            .contains("not signed by any trusted public key"),
        "refusals are logged"
    );
    assert!(
        cl.nodes[1].log().contains("not in allowed-peers"),
        "the outsider was refused:\n{}",
        cl.nodes[1].log()
    );
    assert!(cl.nodes[1].try_status().is_some(), "B keeps running");
}

/// A's store copy of a path it built is changed behind its back (a disk fault, or tampering):
/// A never serves the changed bytes as that path, neither to its own Nix nor to peers, and
/// stops offering it; C, substituting through B, gets nothing rather than bad bytes.
#[test]
fn a_tampered_store_copy_is_never_served() {
    let mut cl = cluster(2, &[]);
    cl.nodes[0].start();
    cl.nodes[1].start();
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    wait_until(30, "B to learn the paths", || cl.nodes[1].serves(&paths));
    // Flip bytes of the large file in A's store (Nix made it read-only).
    let blob = cl.a.real_path(&top).join("blob");
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    for b in bytes.iter_mut().skip(1000).step_by(4096) {
        *b ^= 0xff;
    }
    std::fs::write(&blob, &bytes).unwrap();
    let key = cl.nodes[1].public_key();
    let c = NixHost::substituter(&format!("http://{}", cl.nodes[1].http), &key);
    let out = c.output("nix-store", &["-r", &top.full()]);
    assert!(!out.status.success(), "Nix must not get the changed NAR");
    let valid = StoreDb::open(&c.root)
        .map(|db| db.is_valid(&top).unwrap())
        .unwrap_or(false);
    assert!(!valid, "the path is not valid on C");
    wait_until(10, "A to notice", || {
        cl.nodes[0]
            .log()
            .contains("does not match the NAR's BLAKE3 leaves")
    });
    // A no longer offers it: no narinfo on A, and B learns it by catch-up.
    let narinfo = format!("/{}.narinfo", top.hash_part());
    wait_until(10, "A to stop serving it", || {
        http(&cl.nodes[0].http, "GET", &narinfo, &[]).0 == 404
    });
    wait_until(20, "B to stop offering it", || {
        http(&cl.nodes[1].http, "GET", &narinfo, &[]).0 == 404
    });
    assert_eq!(cl.nodes[0].status().storage.gc_lost, 1);
    // The other paths are still fine.
    let others: Vec<String> = paths
        .iter()
        .filter(|p| **p != top.full())
        .cloned()
        .collect();
    assert!(cl.nodes[1].serves(&others));
    assert!(cl.nodes[1].try_status().is_some(), "B keeps running");
}

/// B refuses A's paths while it does not trust A's key; restarted with the key trusted it
/// learns them (catch-up starts over); restarted without it again it stops serving them.
#[test]
fn trusting_a_key_later_brings_back_what_was_refused_and_untrusting_drops_it() {
    let mut cl = cluster(2, &[]);
    let a_key = cl.nodes[0].public_key();
    let b_key = cl.nodes[1].public_key();
    cl.nodes[1].trusted = vec![b_key.clone()];
    cl.nodes[0].start();
    cl.nodes[1].start();
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    wait_until(30, "A to record", || cl.nodes[0].serves(&paths));
    wait_until(30, "B to refuse A's paths", || {
        cl.nodes[1]
            .log()
            .contains("not signed by any trusted public key")
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(cl.nodes[1].status().paths_recorded, 0);
    cl.nodes[1].stop();
    cl.nodes[1].trusted = vec![a_key, b_key.clone()];
    cl.nodes[1].start();
    wait_until(30, "B to learn what it refused before", || {
        cl.nodes[1].serves(&paths)
    });
    substitute_from(&cl.nodes[1], &top, 3);
    cl.nodes[1].stop();
    cl.nodes[1].trusted = vec![b_key];
    cl.nodes[1].start();
    let narinfo = format!("/{}.narinfo", top.hash_part());
    // B fetched `top`'s closure for its Nix, but what only A's key signed is no longer served.
    wait_until(
        10,
        "B to stop serving what only an untrusted key signed",
        || http(&cl.nodes[1].http, "GET", &narinfo, &[]).0 == 404,
    );
    assert_eq!(cl.nodes[1].status().paths_recorded, 0);
}

#[test]
fn garbage_on_every_alpn_is_refused_and_harmless() {
    let mut cl = cluster(2, &[]);
    let raw: [u8; 32] = *blake3::hash(b"narmesh test client").as_bytes();
    let client_key = iroh::SecretKey::from_bytes(&raw);
    cl.nodes[1].allowed_peers = vec![client_key.public().to_string()];
    cl.nodes[0].start();
    cl.nodes[1].start();
    let top = cl.a.build(CHAIN)[0].clone();
    let paths = cl.a.closure(std::slice::from_ref(&top));
    wait_until(30, "B to learn the paths", || cl.nodes[1].serves(&paths));
    let target = cl.nodes[0].peers[0].clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (id, addr) = target.split_once('@').unwrap();
        let id: iroh::EndpointId = id.parse().unwrap();
        let ep = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(client_key)
            .relay_mode(iroh::RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0")
            .unwrap()
            .bind()
            .await
            .unwrap();
        let peer = iroh::EndpointAddr::new(id).with_ip_addr(addr.parse().unwrap());
        for alpn in [&b"narmesh/sync/1"[..], b"narmesh/nar/1", b"/iroh-gossip/1"] {
            for garbage in [
                vec![0xffu8; 64],
                vec![5, 0, 0, 0, 1],
                vec![0xff, 0xff, 0xff, 0x7f],
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ] {
                let conn = ep
                    .connect(peer.clone(), alpn)
                    .await
                    .expect("allowed client connects");
                if let Ok((mut send, mut recv)) = conn.open_bi().await {
                    let _ = send.write_all(&garbage).await;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        recv.read_to_end(1 << 20),
                    )
                    .await;
                }
                conn.close(0u32.into(), b"bye");
            }
        }
        let unknown = ep.connect(peer.clone(), b"narmesh/unknown/9").await;
        assert!(
            unknown.is_err(),
            "an unknown ALPN is refused at the handshake"
        );
        ep.close().await;
    });
    assert!(cl.nodes[1].try_status().is_some(), "B keeps running");
    assert!(cl.nodes[1].serves(&paths), "and keeps serving what it had");
    assert_eq!(cl.nodes[1].status().paths_recorded, 3);
}

/// LAN discovery (`lan-discovery = true`, no `peers`), between two hosts on a LAN of their
/// own. Found peers must still be allowed: B, not allowing A yet, finds A by mDNS, ignores it
/// and learns nothing of A's build (A, which allows B, is refused by B). Restarted allowing A,
/// B finds A on the LAN, catches up, and B's host (on the LAN too) substitutes A's build
/// through B with real Nix.
#[test]
fn allowed_peers_found_on_the_lan_share_their_builds() {
    for p in ["ip", "curl"] {
        crate::harness::require(p);
    }
    let lan = crate::harness::Lan::new("nml");
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    let keys: Vec<String> = nodes.iter().map(|n| n.public_key()).collect();
    let mut ids = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.mesh_ip = crate::harness::Lan::ip(i);
        node.wrap = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            lan.ns[i].clone(),
        ];
        node.lan_discovery = true;
        let address = node.enable_mesh();
        ids.push(address.split('@').next().unwrap().to_owned());
        node.trusted = vec![keys[1 - i].clone()];
        node.store_root = if i == 0 {
            a.root.clone()
        } else {
            node.dir.join("store")
        };
        assert!(node.peers.is_empty());
    }
    nodes[0].allowed_peers = vec![ids[1].clone()];
    for n in nodes.iter_mut() {
        n.start();
    }
    let top = a.build(CHAIN)[0].clone();
    wait_until(30, "B to find A on the LAN and ignore it", || {
        nodes[1].log().contains(&format!(
            "ignoring {} found on the LAN: not allowed",
            ids[0]
        ))
    });
    wait_until(30, "B to refuse A, which found B", || {
        nodes[1]
            .log()
            .contains(&format!("refused a connection from {}", ids[0]))
    });
    assert_eq!(lan.narinfo_status(0, &nodes[0], &top), "200");
    assert_eq!(
        lan.narinfo_status(1, &nodes[1], &top),
        "404",
        "B learnt A's build from a peer it does not allow"
    );
    nodes[1].stop();
    nodes[1].allowed_peers = vec![ids[0].clone()];
    nodes[1].start();
    wait_until(30, "B to find A and learn its build", || {
        lan.narinfo_status(1, &nodes[1], &top) == "200"
    });
    assert!(
        nodes[1]
            .log()
            .contains(&format!("found peer {} on the LAN", ids[0])),
        "{}",
        nodes[1].log()
    );
    let c = NixHost::substituter(&format!("http://{}", nodes[1].http), &keys[1]);
    run_ok(&mut lan.on(1, c.cmd("nix-store").args(["-r", &top.full()])));
    run_ok(&mut lan.on(1, c.cmd("nix-store").args(["--verify-path", &top.full()])));
    assert_eq!(c.closure(std::slice::from_ref(&top)).len(), 3);
}

/// An eager node whose database fails to answer when it looks at a wish (an I/O error it
/// reopens after) keeps the wish and tries again after a backoff: it still comes to hold the
/// NAR. Wishes are written only when a claim is new, so one dropped is never made again.
#[test]
fn an_eager_node_keeps_a_wish_its_database_failed_to_look_up() {
    let mut cl = cluster(2, &["on-demand", "eager"]);
    cl.nodes[1].env.push((
        "NARMESH_TEST_FAULT".into(),
        "mesh.eager-lookup-fails:3".into(),
    ));
    cl.nodes[0].start();
    cl.nodes[1].start();
    let outs =
        cl.a.build(r#"mk "eager-lookup-fails" "head -c 30000 /dev/urandom > $out""#);
    let bytes = StoreDb::open(&cl.a.root)
        .unwrap()
        .query_path(&outs[0])
        .unwrap()
        .unwrap()
        .nar_size;
    wait_until(60, "B to hold the NAR", || {
        cl.nodes[1].status().nar_bytes >= bytes
    });
    let log = cl.nodes[1].log();
    assert_eq!(
        log.matches("fault injected at mesh.eager-lookup-fails")
            .count(),
        3,
        "B's first three looks failed"
    );
}

/// An eager node fetches up to eight NARs at once, at most two of them over 4 MiB, so small
/// paths are not held up behind large ones. A (its peers held to 4 MiB/s together) built three
/// NARs of 6 MiB and ten of 1 MiB before B started; B learns all thirteen at once. Its fetches
/// in flight (its partial files, each as long as its NAR), sampled every 5 ms, reach eight and
/// never pass it, reach two large ones and never pass that, and every 1 MiB NAR is held before
/// the last large one.
#[test]
fn an_eager_node_fetches_eight_at_once_and_two_large_at_most() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let mut cl = cluster(2, &["on-demand", "eager"]);
    cl.nodes[0].mesh_extra.push_str("serve-rate = \"4MiB\"\n");
    cl.nodes[0].start();
    let outs = cl.a.build(
        r#"builtins.genList (i: mk "eager-at-once-${toString i}" "head -c ${toString (if i < 3 then 6291456 else 1048576)} /dev/urandom > $out") 13"#,
    );
    let paths: Vec<String> = outs.iter().map(|p| p.full()).collect();
    wait_until(30, "A to serve every path", || cl.nodes[0].serves(&paths));
    let large = 4u64 << 20;
    let nars = cl.nodes[1].dir.join("data/nars");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, nars) = (stop.clone(), nars.clone());
        std::thread::spawn(move || {
            let lens = |dir: &std::path::Path| -> Vec<u64> {
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .collect()
            };
            let (mut most, mut most_large) = (0, 0);
            let (mut small_done, mut large_done) = (None, None);
            while !stop.load(Ordering::SeqCst) {
                let flight = lens(&nars.join("partial"));
                most = most.max(flight.len());
                most_large = most_large.max(flight.iter().filter(|l| **l > large).count());
                let held = lens(&nars);
                if small_done.is_none() && held.iter().filter(|l| **l <= large).count() == 10 {
                    small_done = Some(Instant::now());
                }
                if large_done.is_none() && held.iter().filter(|l| **l > large).count() == 3 {
                    large_done = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (most, most_large, small_done, large_done)
        })
    };
    cl.nodes[1].start();
    wait_until(60, "B to hold every NAR", || {
        cl.nodes[1].status().storage.files == 13
    });
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let (most, most_large, small_done, large_done) = sampler.join().unwrap();
    assert_eq!(most, 8, "fetches at once");
    assert_eq!(most_large, 2, "large fetches at once");
    let (small_done, large_done) = (small_done.unwrap(), large_done.unwrap());
    assert!(
        small_done < large_done,
        "the small NARs waited for the large ones: held {:?} after them",
        small_done - large_done
    );
}
