//! Replication never gives up, and nothing waits on a dead or frozen peer: interrupted eager
//! fetches finish after restarts (and the mirror uploads what waited on them), a frozen and a
//! killed node catch up, and a NAR nobody can send is a clear 502 before any header.

use crate::harness::{NixHost, http, run_ok, wait_until};
use crate::node_harness::Node;
use crate::s3_harness::{ACCESS_KEY, S3Server, SECRET_KEY, credentials_env};

/// Bytes on disk of a node's partial fetches.
fn partial_bytes(node: &Node) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(node.dir.join("data/nars/partial"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn big_pair(host: &NixHost, tag: &str) -> Vec<String> {
    let outs = host.build(&format!(
        r#"let big = mk "{tag}-big" "head -c 120000000 /dev/urandom > $out"; in mk "{tag}-top" "echo ${{big}} > $out""#
    ));
    host.closure(&outs)
}

/// Eager mirror node M fetching a 120 MB NAR: first its provider is SIGKILLed mid-NAR, then M
/// itself. Each time, after a restart, the NAR arrives, and M's mirror uploads it and the path
/// that references it.
#[test]
fn interrupted_eager_fetches_finish_and_are_mirrored() {
    let s3 = S3Server::start();
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    crate::node_harness::full_mesh(&mut nodes);
    nodes[0].store_root = a.root.clone();
    nodes[1].store_root = nodes[1].dir.join("store");
    nodes[1].extra_config = s3.mirror_config("");
    nodes[1].env = credentials_env(ACCESS_KEY, SECRET_KEY);
    for n in nodes.iter_mut() {
        n.start();
    }
    // The provider dies mid-NAR.
    let first = big_pair(&a, "provider-killed");
    wait_until(60, "M to be fetching", || {
        partial_bytes(&nodes[1]) > 4 << 20
    });
    nodes[0].kill9();
    // Down until M has given this attempt up (no provider left).
    wait_until(60, "M's fetch to fail", || {
        nodes[1].log().contains("eager fetch failed")
    });
    assert!(
        nodes[1].status().storage.file_bytes < 120_000_000,
        "the big NAR cannot have arrived"
    );
    nodes[0].start();
    crate::mirror::wait_mirrored(&nodes[1], 2, 120);
    crate::mirror::check_bucket(&s3, &first);
    // The fetching node dies mid-NAR.
    let second = big_pair(&a, "fetcher-killed");
    wait_until(60, "M to be fetching", || {
        partial_bytes(&nodes[1]) > 4 << 20
    });
    nodes[1].kill9();
    nodes[1].start();
    crate::mirror::wait_mirrored(&nodes[1], 2, 120);
    let mut all = first.clone();
    all.extend(second);
    crate::mirror::check_bucket(&s3, &all);
}

/// Four nodes; during a burst of builds on A, C is frozen (SIGSTOP) and D killed. Every path
/// built is served on the live nodes (and substituted through one), C catches up after SIGCONT,
/// D after its restart.
#[test]
fn a_frozen_and_a_killed_node_hold_nobody_back_and_catch_up() {
    let t = tempfile::tempdir().unwrap();
    let (a, mut nodes) = crate::node_harness::built_on_first(t.path(), 4);
    for n in nodes.iter_mut() {
        n.start();
    }
    let early = a.build(r#"builtins.genList (i: mk "burst-early-${toString i}" "echo early ${toString i} > $out") 10"#);
    nodes[2].signal("STOP");
    nodes[3].kill9();
    let late = a.build(r#"builtins.genList (i: mk "burst-late-${toString i}" "echo late ${toString i} > $out") 20"#);
    let mut paths: Vec<String> = early.iter().map(|p| p.full()).collect();
    paths.extend(late.iter().map(|p| p.full()));
    for n in &nodes[..2] {
        wait_until(20, "the live nodes to serve every path", || {
            n.serves(&paths)
        });
    }
    let host = NixHost::substituter(&format!("http://{}", nodes[1].http), &nodes[1].public_key());
    let mut args = vec!["-r"];
    args.extend(paths.iter().map(|s| s.as_str()));
    run_ok(host.cmd("nix-store").args(&args));
    nodes[2].signal("CONT");
    wait_until(30, "the frozen node to catch up", || {
        nodes[2].serves(&paths)
    });
    nodes[3].start();
    wait_until(30, "the killed node to catch up", || {
        nodes[3].serves(&paths)
    });
}

/// B learnt a path from A, then A died: B's cache answers 502 for the NAR before sending any
/// header (never a 200 with a body cut short), and keeps running.
#[test]
fn a_nar_nobody_can_send_is_a_clear_502() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    let a = NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    crate::node_harness::full_mesh(&mut nodes);
    nodes[0].store_root = a.root.clone();
    nodes[1].store_root = nodes[1].dir.join("store");
    for n in nodes.iter_mut() {
        n.start();
    }
    let p = a.build(r#"mk "orphan" "head -c 3000000 /dev/urandom > $out""#)[0].clone();
    wait_until(30, "B to learn the path", || nodes[1].serves(&[p.full()]));
    let (_, _, info) = http(
        &nodes[1].http,
        "GET",
        &format!("/{}.narinfo", p.hash_part()),
        &[],
    );
    let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap();
    nodes[0].kill9();
    let (code, hdrs, body) = http(&nodes[1].http, "GET", &format!("/{}", info.url), &[]);
    assert_eq!(code, 502, "headers {hdrs:?}");
    assert!(body.is_empty(), "no body for a NAR that cannot be had");
    assert!(nodes[1].try_status().is_some(), "B keeps running");
}
