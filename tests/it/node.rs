//! The node end to end with the real Nix: hook -> durable queue -> signed NARs -> local HTTP
//! substituter; the node down (spool), killed with SIGKILL mid-burst, fed bad input, and
//! stopped while a client stalls a NAR answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use narmesh::nix::StorePath;
use narmesh_proto::control::{Request, Response};
use narmesh_proto::hook::HookReport;

use crate::harness::{Nix, NixHost, http, run_ok, wait_until};
use crate::node_harness::Node;

/// Three chained derivations and a tree that references the chain's end.
const CHAIN: &str = r#"
  let
    a = mk "chain-a" "echo a > $out";
    b = mk "chain-b" "echo ${a} > $out";
    c = mk "chain-c" "mkdir -p $out/bin; echo ${b} > $out/ref; printf '#!/bin/sh\n' > $out/bin/x; chmod +x $out/bin/x";
  in mk "chain-top" "mkdir $out; ln -s ${c}/bin/x $out/run; echo ${c} > $out/ref; head -c 3000000 /dev/urandom > $out/blob"
"#;

/// Host B, substituting only from `node`, gets `top` and verifies it.
fn substitute_from(node: &Node, top: &StorePath) {
    substitute_with(Nix::V2_8, node, top)
}

/// Host B, running `nix` and substituting only from `node`, gets `top` and verifies it.
fn substitute_with(nix: Nix, node: &Node, top: &StorePath) {
    let b = NixHost::substituter_nix(
        nix,
        &format!("http://{}", node.http),
        &node.status().public_key,
    );
    run_ok(b.cmd("nix-store").args(["-r", &top.full()]));
    run_ok(b.cmd("nix-store").args(["--verify-path", &top.full()]));
    let all = b.closure(std::slice::from_ref(top));
    assert_eq!(all.len(), 4, "B holds the whole closure: {all:?}");
}

/// Host A runs `builder` with the hook; host B runs `substituter` and takes the closure from
/// A's node. Returns what the check after it needs.
fn hook_to_substitution(
    builder: Nix,
    substituter: Nix,
) -> (tempfile::TempDir, Node, NixHost, StorePath) {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("unused"));
    let a = NixHost::with_hook_nix(builder, &node.socket(), &node.spool());
    node.store_root = a.root.clone();
    node.start();
    let top = a.build(CHAIN)[0].clone();
    let paths = a.closure(std::slice::from_ref(&top));
    assert_eq!(paths.len(), 4);
    wait_until(30, "the closure to be served", || node.serves(&paths));
    assert!(
        !node.spool().exists() || std::fs::read_dir(node.spool()).unwrap().next().is_none(),
        "nothing spooled"
    );
    // Nix 2.8 leaves OUT_PATHS empty (the node reads the derivation's outputs); 2.26 names them.
    let (_, _, metrics) = http(&node.http, "GET", "/metrics", &[]);
    let metrics = String::from_utf8(metrics).unwrap();
    let how = match builder {
        Nix::V2_8 => "narmesh_hook_reports_total{outputs=\"from-derivation\"} 4",
        Nix::V2_26 => "narmesh_hook_reports_total{outputs=\"named\"} 4",
    };
    assert!(metrics.contains(how), "{how} in:\n{metrics}");
    substitute_with(substituter, &node, &top);
    (t, node, a, top)
}

#[test]
fn nix_2_26_builds_and_nix_2_8_substitutes() {
    hook_to_substitution(Nix::V2_26, Nix::V2_8).1.stop();
}

#[test]
fn nix_2_8_builds_and_nix_2_26_substitutes() {
    hook_to_substitution(Nix::V2_8, Nix::V2_26).1.stop();
}

#[test]
fn nix_2_26_builds_and_substitutes() {
    hook_to_substitution(Nix::V2_26, Nix::V2_26).1.stop();
}

#[test]
fn builds_are_substitutable_from_the_node() {
    let (_t, mut node, a, top) = hook_to_substitution(Nix::V2_8, Nix::V2_8);

    // The NAR is served whole and by range, matching Nix's own serialization.
    let (code, _, info) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", top.hash_part()),
        &[],
    );
    assert_eq!(code, 200);
    let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap();
    let nar = a.dump(&top);
    let (code, hdrs, body) = http(&node.http, "GET", &format!("/{}", info.url), &[]);
    assert_eq!(code, 200);
    assert!(body == nar, "served NAR equals nix's");
    assert!(
        hdrs.iter()
            .any(|(k, v)| k == "accept-ranges" && v == "bytes")
    );
    let (code, hdrs, body) = http(
        &node.http,
        "GET",
        &format!("/{}", info.url),
        &[("Range", "bytes=100-2099")],
    );
    assert_eq!(code, 206);
    assert!(body == nar[100..2100], "range body");
    let want = format!("bytes 100-2099/{}", nar.len());
    assert!(
        hdrs.iter().any(|(k, v)| k == "content-range" && *v == want),
        "{hdrs:?}"
    );
    let (code, _, _) = http(&node.http, "HEAD", &format!("/{}", info.url), &[]);
    assert_eq!(code, 200);
    let (code, _, metrics) = http(&node.http, "GET", "/metrics", &[]);
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("narmesh_paths_recorded_total 4"),
        "{metrics}"
    );
    node.stop();
}

/// `[http] metrics-listen` answers `/metrics` and nothing else, beside the cache. Every metric
/// the README's "Monitoring" names is exported, and each part's `narmesh_problem` series and
/// each reason's `narmesh_mesh_refused_total` are there from the start, at 0, so an alert on
/// them does not wait for (or, with `increase()`, miss) the first.
#[test]
fn metrics_listen_answers_metrics_only_and_every_metric_the_readme_names_is_exported() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.http_extra = "metrics-listen = [\"127.0.0.1:0\"]\n".into();
    node.start();
    let log = node.log();
    let addr = log
        .split("metrics only ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the metrics address in the log")
        .trim_end_matches(',')
        .to_owned();
    let (code, _, body) = http(&addr, "GET", "/metrics", &[]);
    assert_eq!(code, 200);
    let body = String::from_utf8(body).unwrap();
    for target in [
        "/nix-cache-info",
        "/00000000000000000000000000000000.narinfo",
        "/nar/0000000000000000000000000000000000000000000000000000.nar",
        "/",
    ] {
        assert_eq!(http(&addr, "GET", target, &[]).0, 404, "{target}");
    }
    assert_eq!(http(&node.http, "GET", "/nix-cache-info", &[]).0, 200);
    let zeros = (narmesh::metrics::PARTS.iter())
        .map(|part| format!("narmesh_problem{{part=\"{part}\"}} 0"))
        .chain(
            (narmesh::metrics::REFUSALS.iter())
                .map(|r| format!("narmesh_mesh_refused_total{{reason=\"{r}\"}} 0")),
        );
    for zero in zeros {
        assert!(body.contains(&zero), "{zero} in:\n{body}");
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Monitoring\n")
        .nth(1)
        .and_then(|r| r.split("\n## ").next())
        .expect("a Monitoring section");
    let mut named: Vec<&str> = section
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("narmesh_"))
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 15, "{named:?}");
    // The reasons an alert on refusals may see are the node's, each with its series from the
    // start.
    let mut reasons: Vec<&str> = section
        .split("by reason:")
        .nth(1)
        .and_then(|r| r.split("\nincrease(").next())
        .expect("the refusal reasons")
        .split([',', '\n', '#'])
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    reasons.sort();
    let mut known = narmesh::metrics::REFUSALS.to_vec();
    known.sort();
    assert_eq!(reasons, known, "the README's refusal reasons");
    let registered = narmesh::metrics::Metrics::new().names();
    for name in named {
        // A counter is exported as `<name>_total`, a histogram as `<name>_bucket` and more.
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            registered.iter().any(|r| r == base),
            "the README names {name}, not a metric of the node: {registered:?}"
        );
    }
    // What has a series is in the text (a family only once it has one).
    for name in &registered {
        let family = [
            "http_requests",
            "http_request_seconds",
            "hook_reports",
            "served_nar_bytes",
            "mesh_fetched_bytes",
        ]
        .iter()
        .any(|f| name == &format!("narmesh_{f}"));
        assert!(
            family || body.contains(&format!("# TYPE {name} ")),
            "{name} not in:\n{body}"
        );
    }
    node.stop();
}

#[test]
fn node_down_builds_succeed_and_spooled_paths_arrive_later() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("unused"));
    let a = NixHost::with_hook(&node.socket(), &node.spool());
    node.store_root = a.root.clone();
    // No node: every hook call must still exit 0, quickly, having spooled its report.
    let started = Instant::now();
    let top = a.build(CHAIN)[0].clone();
    let took = started.elapsed();
    let spooled: Vec<_> = std::fs::read_dir(node.spool()).unwrap().collect();
    assert_eq!(spooled.len(), 4, "one spool file per build");
    assert!(took < Duration::from_secs(60), "builds took {took:?}");
    node.start();
    let paths = a.closure(std::slice::from_ref(&top));
    wait_until(30, "spooled paths to be served", || node.serves(&paths));
    // The spool round removes its files, then counts them, after the last is recorded.
    wait_until(10, "the spool round to end", || {
        node.status().spool_taken >= 4
    });
    assert_eq!(node.status().spool_taken, 4);
    let left: Vec<_> = std::fs::read_dir(node.spool())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .collect();
    assert!(left.is_empty(), "spool emptied: {left:?}");
    substitute_from(&node, &top);
}

#[test]
fn sigkill_mid_burst_loses_nothing_acknowledged() {
    let t = tempfile::tempdir().unwrap();
    let a = NixHost::new("");
    let outs = a
        .build(r#"builtins.genList (i: mk "burst-${toString i}" "echo ${toString i} > $out") 120"#);
    assert_eq!(outs.len(), 120);
    let mut node = Node::new(&t.path().join("node"), &a.root);
    node.start();
    let socket = node.socket();
    // Four senders report paths one by one, as concurrent hooks would; the node dies mid-burst.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let senders: Vec<_> = outs
        .chunks(30)
        .map(|chunk| {
            let chunk: Vec<String> = chunk.iter().map(|p| p.full()).collect();
            let (socket, acked) = (socket.clone(), acked.clone());
            std::thread::spawn(move || {
                for p in chunk {
                    let report = Request::Hook(HookReport {
                        drv_path: None,
                        out_paths: vec![p.clone()],
                    });
                    let env = narmesh_proto::control::Envelope {
                        version: 1,
                        request: report,
                    };
                    let Ok(mut s) = UnixStream::connect(&socket) else {
                        continue;
                    };
                    if narmesh_proto::frame::write_frame(&mut s, &env).is_err() {
                        continue;
                    }
                    if let Ok(Response::Accepted { .. }) = narmesh_proto::frame::read_frame(&mut s)
                    {
                        acked.lock().unwrap().push(p);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    wait_until(30, "some acknowledgements", || {
        acked.lock().unwrap().len() >= 25
    });
    node.kill9();
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 25 && acked.len() < 120,
        "killed mid-burst: {} acked",
        acked.len()
    );
    node.start();
    wait_until(
        60,
        "every acknowledged path to be served after restart",
        || node.serves(&acked),
    );
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let a = NixHost::new("");
    let good = a.build(r#"mk "good" "echo good > $out""#)[0].clone();
    let mut node = Node::new(&t.path().join("node"), &a.root);
    node.start();
    assert!(matches!(
        node.call(Request::Push {
            paths: vec![good.full()]
        })
        .unwrap(),
        Response::Accepted { .. }
    ));
    wait_until(30, "the good path", || node.serves(&[good.full()]));

    let refused = |req: Request| match node.call(req).unwrap() {
        Response::Error { message } => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = refused(Request::Push {
        paths: vec!["/etc/passwd".into()],
    });
    assert!(m.contains("not in the store directory"), "{m}");
    let m = refused(Request::Push {
        paths: vec!["/nix/store/00000000000000000000000000000000-absent".into()],
    });
    assert!(m.contains("not a valid path"), "{m}");
    let m = refused(Request::Hook(HookReport {
        drv_path: None,
        out_paths: vec![],
    }));
    assert!(m.contains("names no path"), "{m}");
    let m = refused(Request::Hook(HookReport {
        drv_path: Some(good.full()),
        out_paths: vec![],
    }));
    assert!(m.contains("not a derivation"), "{m}");
    // A partly bad report is refused whole.
    refused(Request::Push {
        paths: vec![good.full(), "/nix/store/x".into()],
    });

    let raw = |bytes: &[u8]| -> Vec<u8> {
        let mut s = UnixStream::connect(node.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let answer =
        |out: Vec<u8>| -> Option<Response> { narmesh_proto::frame::read_frame(&mut &out[..]).ok() };
    // Garbage payload, oversized length, zero length, a truncated frame, an unknown version.
    for bytes in [
        vec![5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
        vec![0, 0, 0, 0],
        vec![100, 0, 0, 0, 1, 2],
    ] {
        let out = raw(&bytes);
        assert!(
            matches!(answer(out.clone()), Some(Response::Error { .. }) | None),
            "{out:?}"
        );
    }
    let future = narmesh_proto::frame::encode(&narmesh_proto::control::Envelope {
        version: 999,
        request: Request::Status,
    })
    .unwrap();
    match answer(raw(&future)) {
        Some(Response::Error { message }) => assert!(
            message.contains("unsupported protocol version"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    // HTTP: traversal and junk never touch anything.
    for (target, want) in [
        ("/../../etc/passwd", 400),
        ("/nar/..%2f..%2fetc%2fpasswd", 400),
        ("/%2e%2e/secret-key", 400),
        ("/secret-key", 404),
        ("/narmesh.redb", 404),
        ("/00000000000000000000000000000000.narinfo", 404),
        ("/nar/0000.nar", 404),
        (&format!("/nar/{}.nar", "0".repeat(64)), 404),
    ] {
        let (code, _, _) = http(&node.http, "GET", target, &[]);
        assert_eq!(code, want, "{target}");
    }
    let (code, _, _) = http(&node.http, "DELETE", "/nix-cache-info", &[]);
    assert_eq!(code, 405);
    // Still running, still serving what it accepted.
    assert!(node.serves(&[good.full()]));
    assert!(node.status().paths_recorded >= 1);
    node.stop();
}

#[test]
fn hook_never_fails_nor_blocks_past_its_deadline() {
    let t = tempfile::tempdir().unwrap();
    let spool = t.path().join("spool");
    let hook = |socket: &std::path::Path| {
        let started = Instant::now();
        let out = std::process::Command::new(crate::harness::bin("narmesh-hook"))
            .env(
                "DRV_PATH",
                "/nix/store/00000000000000000000000000000000-x.drv",
            )
            .env("OUT_PATHS", "")
            .env("NARMESH_SOCKET", socket)
            .env("NARMESH_SPOOL", &spool)
            .env("NARMESH_HOOK_TIMEOUT_MS", "300")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "hook exit status {}", out.status);
        assert!(out.stdout.is_empty(), "the hook writes nothing to stdout");
        (
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No node at all.
    let (_, err) = hook(&t.path().join("absent.sock"));
    assert!(err.contains("spooled"), "{err}");
    // A node that accepts but never answers (a stalled node; the real one cannot be made to stall).
    let stalled = t.path().join("stalled.sock");
    let listener = std::os::unix::net::UnixListener::bind(&stalled).unwrap();
    let held = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(5));
        drop(conn);
    });
    let (took, err) = hook(&stalled);
    assert!(err.contains("spooled"), "{err}");
    assert!(
        took < Duration::from_secs(4),
        "the hook waited {took:?} for a stalled node"
    );
    drop(held);
    // A node that answers a byte every 100 ms: each read is quick, the answer never whole in
    // time (a timeout per read would let it hold the hook 6.4 s).
    let dripping = t.path().join("dripping.sock");
    let listener = std::os::unix::net::UnixListener::bind(&dripping).unwrap();
    let drip = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let _: narmesh_proto::control::Envelope =
            narmesh_proto::frame::read_frame(&mut conn).unwrap();
        let _ = conn.write_all(&64u32.to_le_bytes());
        for _ in 0..64 {
            std::thread::sleep(Duration::from_millis(100));
            if conn.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    let (took, err) = hook(&dripping);
    assert!(err.contains("spooled"), "{err}");
    assert!(
        took < Duration::from_secs(4),
        "the hook waited {took:?} for a node answering a byte at a time"
    );
    drip.join().unwrap();
    let frames = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "frame"))
        .count();
    assert_eq!(frames, 3, "every report spooled");
}

#[test]
fn push_and_status_cli_and_upstream_paths_skipped() {
    let t = tempfile::tempdir().unwrap();
    let a = NixHost::new("");
    let top = a.build(
        r#"let up = mk "upstream-dep" "echo up > $out"; in mk "pushed" "echo ${up} > $out""#,
    )[0]
    .clone();
    let up = a.closure(std::slice::from_ref(&top))[1].clone();
    // Sign the dependency in A's store with an "upstream" key, as cache.nixos.org paths are.
    let keys = t.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let narmesh = crate::harness::bin("narmesh");
    run_ok(
        std::process::Command::new(&narmesh)
            .arg("keygen")
            .arg("upstream-1")
            .arg(keys.join("up.sec"))
            .arg(keys.join("up.pub")),
    );
    run_ok(
        a.cmd("nix")
            .args(["store", "sign", "--key-file"])
            .arg(keys.join("up.sec"))
            .arg(&up),
    );
    let up_pub = std::fs::read_to_string(keys.join("up.pub")).unwrap();

    let mut node = Node::new(&t.path().join("node"), &a.root);
    node.upstream_keys = vec![up_pub.trim().to_owned()];
    node.start();
    let out = run_ok(
        std::process::Command::new(&narmesh)
            .arg("push")
            .arg("--socket")
            .arg(node.socket())
            .arg(top.full()),
    );
    assert!(out.is_empty(), "push prints its progress on stderr only");
    assert!(
        node.serves(&[top.full()]),
        "push returns once the path is servable"
    );
    let (code, _, _) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", &up["/nix/store/".len()..][..32]),
        &[],
    );
    assert_eq!(
        code, 404,
        "a path signed by an upstream key is not ingested"
    );
    let json = run_ok(
        std::process::Command::new(&narmesh)
            .args(["status", "--json", "--socket"])
            .arg(node.socket()),
    );
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["paths_recorded"], 1);
    assert_eq!(v["queue_depth"], 0);
    assert_eq!(v["http_listen"][0], node.http.as_str());
    let refused = std::process::Command::new(&narmesh)
        .args(["push", "--socket"])
        .arg(node.socket())
        .arg("/etc/passwd")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not a store path"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    node.stop();
}

/// A client that asks for a NAR and stops reading holds a stopping node for at most the HTTP
/// grace (10 s), not for ever: the node exits, and says it dropped an answer.
#[test]
fn a_stalled_http_client_holds_shutdown_only_for_the_grace() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    // Far more than the loopback socket buffers hold: the answer blocks on the client.
    let big = host.build(r#"mk "stall-big" "head -c 64000000 /dev/urandom > $out""#)[0].clone();
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.start();
    crate::harness::run_hook(&node.socket(), &node.spool(), "", &big.full(), 2000);
    wait_until(30, "the path to be served", || {
        node.serves(std::slice::from_ref(&big.full()))
    });
    let (_, _, info) = http(
        &node.http,
        "GET",
        &format!("/{}.narinfo", big.hash_part()),
        &[],
    );
    let info = narmesh::nix::NarInfo::parse(std::str::from_utf8(&info).unwrap()).unwrap();

    let mut client = std::net::TcpStream::connect(&node.http).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(client, "GET /{} HTTP/1.1\r\nHost: cache\r\n\r\n", info.url).unwrap();
    let mut first = [0u8; 4096];
    let n = client.read(&mut first).unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    // The client reads nothing more and keeps its connection open.
    let pid = node.pid();
    let stopping = Instant::now();
    run_ok(std::process::Command::new("kill").arg(pid.to_string()));
    assert!(
        node.wait_exit(30),
        "a stalled client held the node past 30 s; log:\n{}",
        node.log()
    );
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the node took {took:?} to stop"
    );
    assert!(
        node.log().contains("answers still in flight"),
        "{}",
        node.log()
    );
    drop(client);
}

/// Each thread of `pid` by name (`comm`, at most 15 bytes) with its nice values.
fn thread_nice(pid: u32) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut out: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        // After the name: state (field 3) ... nice (field 19).
        let nice: i64 = stat[close + 2..]
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        out.entry(comm).or_default().push(nice);
    }
    out
}

/// Priorities as the README states them: the socket's and the HTTP cache's threads at normal
/// priority, the main runtime's threads (its workers and blocking threads) and the storage's
/// recorder at nice 5, hashing at nice 10, so the host's builds and the hook's
/// acknowledgements come first.
#[test]
fn the_front_runs_at_normal_priority_and_the_rest_below() {
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::with_hook(
        &t.path().join("node/node.sock"),
        &t.path().join("node/spool"),
    );
    let mut node = Node::new(&t.path().join("node"), &host.root);
    node.start();
    let out = host.build(r#"mk "priorities" "head -c 1000000 /dev/urandom > $out""#);
    wait_until(30, "the node to serve the path", || {
        node.serves(&[out[0].full()])
    });
    let threads = thread_nice(node.pid());
    let nice_of = |name: &str| {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(name))
            .flat_map(|(_, v)| v.iter().copied())
            .collect::<Vec<i64>>()
    };
    for (name, nice) in [
        ("narmesh-front", 0),
        ("narmesh-http", 0),
        ("tokio-rt-worker", 5),
        ("narmesh-record", 5),
        ("narmesh-hash", 10),
    ] {
        let got = nice_of(name);
        assert!(!got.is_empty(), "no thread {name}: {threads:?}");
        assert!(
            got.iter().all(|n| *n == nice),
            "{name}: {got:?} (want {nice}); all: {threads:?}"
        );
    }
}

/// Which settings win, as the README says: `serve`'s flags over its config file, and a config
/// file over the hook's `NARMESH_SOCKET` / `NARMESH_SPOOL`; `status` finds the socket by
/// `--socket`, else `--config` or `NARMESH_CONFIG`, else `NARMESH_SOCKET`, else the `socket` of
/// `/etc/narmesh.toml`, else `/run/narmesh/narmesh.sock`.
#[test]
fn flags_beat_the_config_file_which_beats_the_hooks_variables() {
    use std::process::{Command, Stdio};
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let narmesh = crate::harness::bin("narmesh");
    let conf = crate::harness::lone_config(
        d,
        "precedence-1",
        &d.join("file.sock"),
        &d.join("file-spool"),
        "",
    );
    let sock = d.join("flag.sock");
    let log = std::fs::File::create(d.join("node.log")).unwrap();
    let child = Command::new(&narmesh)
        .args(["serve", "--config"])
        .arg(&conf)
        .arg("--socket")
        .arg(&sock)
        .env("NARMESH_SOCKET", d.join("env.sock"))
        .env("NARMESH_SPOOL", d.join("env-spool"))
        .env_remove("NARMESH_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _node = Killed(child);
    wait_until(30, "the node to listen on the flag's socket", || {
        sock.exists()
    });
    assert!(!d.join("file.sock").exists(), "the flag beats the file");
    assert!(
        !d.join("env.sock").exists(),
        "the file beats NARMESH_SOCKET"
    );
    assert!(d.join("file-spool").is_dir() && !d.join("env-spool").exists());

    // `status`: a config file naming the flag's socket, and one naming the file's (not there).
    let at_flag = d.join("at-flag.toml");
    std::fs::write(&at_flag, format!("socket = {sock:?}\n")).unwrap();
    let status = |args: &[&std::ffi::OsStr], env: &[(&str, &std::path::Path)]| {
        let mut cmd = Command::new(&narmesh);
        cmd.arg("status")
            .args(args)
            .env_remove("NARMESH_CONFIG")
            .env_remove("NARMESH_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).output().unwrap().status.success()
    };
    let nowhere = d.join("nowhere.sock");
    let (flag, cfg) = (
        std::ffi::OsStr::new("--socket"),
        std::ffi::OsStr::new("--config"),
    );
    assert!(status(
        &[flag, sock.as_os_str()],
        &[("NARMESH_CONFIG", &conf)]
    ));
    assert!(status(
        &[cfg, at_flag.as_os_str()],
        &[("NARMESH_SOCKET", &nowhere)]
    ));
    assert!(status(
        &[],
        &[("NARMESH_CONFIG", &at_flag), ("NARMESH_SOCKET", &nowhere)]
    ));
    assert!(!status(
        &[],
        &[("NARMESH_CONFIG", &conf), ("NARMESH_SOCKET", &sock)]
    ));
    assert!(status(&[], &[("NARMESH_SOCKET", &sock)]));

    // Then the host's /etc/narmesh.toml, then /run/narmesh/narmesh.sock: run in a mount
    // namespace whose /etc holds only the given config file (or none) and whose /run/narmesh
    // is `run`. The socket tried, from stderr, or None if the node answered.
    crate::harness::require("bwrap");
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    let tried = |etc: Option<&std::path::Path>, env: &[(&str, &std::path::Path)]| {
        let mut cmd = Command::new("bwrap");
        // (A tmpfs on /run: the mount point /run/narmesh is made there, not on the host.)
        cmd.args(["--dev-bind", "/", "/", "--tmpfs", "/etc", "--tmpfs", "/run"]);
        if let Some(etc) = etc {
            cmd.arg("--ro-bind").arg(etc).arg("/etc/narmesh.toml");
        }
        cmd.arg("--bind")
            .arg(&run)
            .arg("/run/narmesh")
            .arg(&narmesh)
            .arg("status")
            .env_remove("NARMESH_CONFIG")
            .env_remove("NARMESH_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success()).then(|| {
            err.split("connecting to the node at ")
                .nth(1)
                .and_then(|e| e.split(' ').next())
                .unwrap_or_else(|| panic!("status failed without naming a socket: {err}"))
                .to_owned()
        })
    };
    let nowhere_toml = d.join("at-nowhere.toml");
    std::fs::write(&nowhere_toml, format!("socket = {nowhere:?}\n")).unwrap();
    assert_eq!(
        tried(Some(&at_flag), &[]),
        None,
        "/etc/narmesh.toml's socket"
    );
    assert_eq!(
        tried(Some(&nowhere_toml), &[("NARMESH_SOCKET", &sock)]),
        None,
        "NARMESH_SOCKET beats /etc/narmesh.toml"
    );
    assert_eq!(
        tried(Some(&at_flag), &[("NARMESH_SOCKET", &nowhere)]).as_deref(),
        Some(nowhere.to_str().unwrap()),
        "NARMESH_SOCKET naming nowhere beats a working /etc/narmesh.toml"
    );
    assert_eq!(
        tried(None, &[]).as_deref(),
        Some("/run/narmesh/narmesh.sock"),
        "with neither, the default"
    );
    std::os::unix::fs::symlink(&sock, run.join("narmesh.sock")).unwrap();
    assert_eq!(tried(None, &[]), None, "the default reaches a node there");
}

/// Idle clients cannot hold the HTTP cache's every slot: with `[http] idle-secs = 2`, as many
/// idle connections as the cap allows are closed after two seconds without a byte, and a
/// client that comes after them is answered (it waited in the backlog meanwhile).
#[test]
fn idle_connections_cannot_hold_every_slot() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("store"));
    std::fs::create_dir_all(t.path().join("store")).unwrap();
    node.http_extra = "idle-secs = 2\n".into();
    node.start();
    // The first of them can go two seconds after this at the earliest; the late client is
    // accepted after all of them (the backlog is first in, first out).
    let started = Instant::now();
    let idle: Vec<std::net::TcpStream> = (0..narmesh::http::MAX_CONNECTIONS)
        .map(|_| std::net::TcpStream::connect(&node.http).unwrap())
        .collect();
    let mut late = std::net::TcpStream::connect(&node.http).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        late,
        "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    late.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("StoreDir: /nix/store"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "answered before the idle ones went: the cap did not hold"
    );
    // The idle ones were closed by the node.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(first.read(&mut buf).unwrap(), 0, "closed by the node");
}

/// A client that drips its request head, a byte well inside `idle-secs`, still has to send it
/// whole within `idle-secs` (2 here): its connection is closed, where before it could hold its
/// slot for good. A client that sends a head over 64 KiB is refused with 431, and the next
/// client is answered.
#[test]
fn a_request_head_must_come_whole_in_time_and_within_its_size() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("store"));
    std::fs::create_dir_all(t.path().join("store")).unwrap();
    node.http_extra = "idle-secs = 2\n".into();
    node.start();

    let mut drip = std::net::TcpStream::connect(&node.http).unwrap();
    drip.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let started = Instant::now();
    drip.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a head dripped for 15 s kept its connection"
        );
        // One header byte about every 400 ms: never idle for 2 s.
        if drip.write_all(b"X").is_err() {
            break started.elapsed();
        }
        match drip.read(&mut buf) {
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || !answer.starts_with("HTTP/1.1 200"), "{answer}");
                break started.elapsed();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break started.elapsed(),
        }
    };
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed after {closed_after:?}, before its deadline"
    );

    let get = |extra: &str| -> String {
        let mut c = std::net::TcpStream::connect(&node.http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head =
            format!("GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
        // The node may close before it has read it all.
        let _ = c.write_all(head.as_bytes());
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert_eq!(narmesh::http::MAX_HEAD, 64 << 10, "the README's limit");
    let big = format!("X-Big: {}\r\n", "a".repeat(narmesh::http::MAX_HEAD + 8192));
    let answer = get(&big);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "a head over the limit was not refused with 431: {:?}",
        &answer[..answer.len().min(200)]
    );
    let answer = get(&format!("X-Fine: {}\r\n", "a".repeat(1024)));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("StoreDir: /nix/store"), "{answer}");
}

/// The socket serves at most 256 connections at once, and a frame must come whole within 30 s:
/// 256 clients that send nothing hold every slot, and a 257th is answered only once one of them
/// goes (it waits in the backlog meanwhile); a client that drips a frame, a byte a second, is
/// let go at the deadline.
#[test]
fn the_socket_serves_256_connections_and_a_frame_must_come_in_time() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("store"));
    std::fs::create_dir_all(t.path().join("store")).unwrap();
    node.start();
    let status = narmesh_proto::control::Envelope {
        version: narmesh_proto::HOOK_PROTOCOL_VERSION,
        request: Request::Status,
    };
    let mut idle: Vec<UnixStream> = (0..256)
        .map(|_| UnixStream::connect(node.socket()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut extra = UnixStream::connect(node.socket()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    narmesh_proto::frame::write_frame(&mut extra, &status).unwrap();
    assert!(
        narmesh_proto::frame::read_frame::<Response>(&mut extra).is_err(),
        "a 257th connection was served"
    );
    drop(idle.pop());
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let answer = narmesh_proto::frame::read_frame::<Response>(&mut extra);
    assert!(matches!(answer, Ok(Response::Status(_))), "{answer:?}");
    drop(idle);

    let mut drip = UnixStream::connect(node.socket()).unwrap();
    drip.write_all(&100u32.to_le_bytes()).unwrap();
    let started = Instant::now();
    let let_go = loop {
        std::thread::sleep(Duration::from_secs(1));
        if drip.write_all(&[0]).is_err() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "a frame dripped for 45 s kept its connection"
        );
    };
    assert!(
        let_go >= Duration::from_secs(20),
        "let go after {let_go:?}, before its deadline"
    );
    assert!(
        node.try_status().is_some(),
        "the node answers the next client"
    );
}

/// A socket client that sends requests without reading the answers is let go once an answer
/// has waited 30 s to be written, so it cannot keep one of the 256 connections for good: it
/// sends 20,000 status requests and reads nothing for 40 s, then finds the connection closed
/// after the answers its socket buffer took (with no deadline on the write, the node went on
/// answering all 20,000 once the client read). The node answers the next client.
#[test]
fn a_socket_client_that_does_not_read_its_answers_is_let_go() {
    let t = tempfile::tempdir().unwrap();
    let mut node = Node::new(&t.path().join("node"), &t.path().join("store"));
    std::fs::create_dir_all(t.path().join("store")).unwrap();
    node.start();
    const ASKED: usize = 20_000;
    let conn = UnixStream::connect(node.socket()).unwrap();
    let mut to = conn.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let env = narmesh_proto::control::Envelope {
            version: narmesh_proto::HOOK_PROTOCOL_VERSION,
            request: Request::Status,
        };
        // Blocks once the node stops reading (its answers unread); fails once it lets go.
        for _ in 0..ASKED {
            if narmesh_proto::frame::write_frame(&mut to, &env).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(40));
    let mut from = conn;
    from.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answers = 0;
    while let Ok(r) = narmesh_proto::frame::read_frame::<Response>(&mut from) {
        assert!(matches!(r, Response::Status(_)), "{r:?}");
        answers += 1;
    }
    assert!(
        answers > 0 && answers < ASKED,
        "{answers} answers read: the node waited for the client to read them"
    );
    writer.join().unwrap();
    assert!(
        node.try_status().is_some(),
        "the node answers the next client"
    );
}

/// Status from whatever node answers on `socket`.
fn status_at(socket: &std::path::Path) -> Option<narmesh_proto::control::StatusReport> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let env = narmesh_proto::control::Envelope {
        version: narmesh_proto::HOOK_PROTOCOL_VERSION,
        request: Request::Status,
    };
    narmesh_proto::frame::write_frame(&mut s, &env).ok()?;
    match narmesh_proto::frame::read_frame(&mut s).ok()? {
        Response::Status(st) => Some(*st),
        _ => None,
    }
}

/// A `narmesh serve` run by hand, killed on drop.
struct Serve(std::process::Child);

impl Serve {
    fn start(cmd: &mut std::process::Command, socket: &std::path::Path) -> Self {
        let mut child = Serve(
            cmd.env_remove("NARMESH_CONFIG")
                .env("NARMESH_LOG", "info")
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_until(60, "the node to answer on its socket", || {
            assert!(child.0.try_wait().unwrap().is_none(), "the node exited");
            status_at(socket).is_some()
        });
        child
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `serve`'s flags win over its config file (`--data-dir`, `--socket`, `--spool-dir`,
/// `--store-root`, `--http-listen`, `--secret-key-file`): builds reach it through the flagged
/// socket, from the flagged store, signed with the flagged key, and what the hook spooled while
/// it was down comes in from the flagged spool. Without a config file, `NARMESH_SOCKET` and
/// `NARMESH_SPOOL` (the hook's) say where the socket and the spool are.
#[test]
fn serve_flags_win_over_the_config_file_and_the_hooks_variables_count_without_one() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (socket, spool) = (d.join("flag.sock"), d.join("flag-spool"));
    let host = NixHost::with_hook(&socket, &spool);
    run_ok(
        std::process::Command::new(crate::harness::bin("narmesh"))
            .args(["keygen", "flagged-1"])
            .arg(d.join("flag.sec"))
            .arg(d.join("flag.pub")),
    );
    let config = d.join("narmesh.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nsocket = {:?}\nspool-dir = {:?}\n[store]\nmin-free = \"64MiB\"\n\
             [nix]\nstore-root = \"/nonexistent\"\n[http]\nlisten = [\"127.0.0.1:1\"]\n\
             [mesh]\nenabled = false\n",
            d.join("file-data"),
            d.join("file.sock"),
            d.join("file-spool"),
        ),
    )
    .unwrap();
    let flagged = || {
        let mut cmd = std::process::Command::new(crate::harness::bin("narmesh"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(d.join("flag-data"))
            .arg("--socket")
            .arg(&socket)
            .arg("--spool-dir")
            .arg(&spool)
            .arg("--store-root")
            .arg(&host.root)
            .args(["--http-listen", "127.0.0.1:0", "--secret-key-file"])
            .arg(d.join("flag.sec"));
        cmd
    };
    let node = Serve::start(&mut flagged(), &socket);
    let st = status_at(&socket).unwrap();
    assert_ne!(st.http_listen, ["127.0.0.1:1"]);
    let narinfo = |at: &str, p: &str| {
        let base = p.trim_start_matches("/nix/store/");
        let (code, _, body) = http(at, "GET", &format!("/{}.narinfo", &base[..32]), &[]);
        (code == 200).then(|| String::from_utf8_lossy(&body).into_owned())
    };
    let built = host.build(r#"mk "flagged" "echo flagged > $out""#)[0].full();
    let http_at = st.http_listen[0].clone();
    wait_until(30, "the build to be served", || {
        narinfo(&http_at, &built).is_some()
    });
    let info = narinfo(&http_at, &built).unwrap();
    assert!(info.contains("Sig: flagged-1:"), "{info}");
    assert!(d.join("flag-data").is_dir() && !d.join("file-data").exists());
    assert!(!d.join("file.sock").exists() && !d.join("file-spool").exists());
    drop(node);
    let spooled = host.build(r#"mk "flagged-spooled" "echo spooled > $out""#)[0].full();
    assert_eq!(crate::harness::spooled(&spool).len(), 1, "the hook spooled");
    let _node = Serve::start(&mut flagged(), &socket);
    let http_at = status_at(&socket).unwrap().http_listen[0].clone();
    wait_until(30, "the spooled report to be taken in", || {
        narinfo(&http_at, &spooled).is_some()
    });

    // No config file: the hook's variables place the socket and the spool (the node in a
    // network namespace of its own: the default mesh port and LAN discovery stay in there).
    crate::harness::require("unshare");
    let (env_socket, env_spool) = (d.join("env.sock"), d.join("env-spool"));
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(crate::harness::bin("narmesh"))
        .arg("serve")
        .arg("--data-dir")
        .arg(d.join("env-data"))
        .arg("--store-root")
        .arg(&host.root)
        .args(["--http-listen", "127.0.0.1:0"])
        .env("NARMESH_SOCKET", &env_socket)
        .env("NARMESH_SPOOL", &env_spool);
    let _bare = Serve::start(&mut cmd, &env_socket);
    assert!(
        env_spool.is_dir(),
        "the node made its spool where NARMESH_SPOOL says"
    );
}
