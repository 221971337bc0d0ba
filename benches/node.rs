//! The node's speed goals, each beside its baseline measured in the same run:
//! - hook call latency (the real `narmesh-hook` process, as Nix runs it) with the node up and
//!   with it down (spooling), beside the seed approach: a hook running `nix copy --to file://`;
//! - ingest: small paths from hook report to signed and servable, per second;
//! - narinfo serving: requests per second from the node and from nginx serving the same
//!   narinfos as static files, with the same client (wrk).
//!
//! Run: `cargo bench --bench node` (needs nix-bin, nginx and wrk: scripts/install-bench-deps.sh).
//! Prints a table and writes target/bench-node.json.

#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "../tests/it/node_harness.rs"]
mod node_harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{NixHost, bin, require, wait_until};
use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::hook::HookReport;
use node_harness::Node;

const SMALL_PATHS: usize = 1000;
const HOOK_CALLS: usize = 300;
const SEED_CALLS: usize = 40;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Spread {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn spread(mut v: Vec<Duration>) -> Spread {
    v.sort();
    Spread {
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
        max: *v.last().expect("samples"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Run a post-build hook `n` times the way Nix does (fresh process, env, stdin null).
fn time_hook(program: &std::path::Path, env: &[(&str, String)], n: usize) -> Spread {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let st = Command::new(program)
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run hook");
        v.push(t.elapsed());
        assert!(st.success());
    }
    spread(v)
}

/// Requests per second of `wrk -t1 -c<conns>` against `base`, rotating over `targets` (a Lua
/// script picks the next one for every request); `misses` allows 404 answers.
fn wrk(base: &str, targets: &[String], conns: u32, misses: bool, dir: &std::path::Path) -> f64 {
    let script = dir.join(format!("rotate-{}.lua", std::process::id()));
    let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    std::fs::write(
        &script,
        format!(
            "local paths = {{{}}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n",
            list.join(", ")
        ),
    )
    .expect("write lua");
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{conns}"), "-d4s", "-s"])
        .arg(&script)
        .arg(base)
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let non2xx = text
        .lines()
        .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    assert!(misses || !non2xx, "wrk saw errors from {base}:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["nix-build", "nix", "nginx", "wrk"] {
        require(tool);
    }
    let t = tempfile::tempdir().expect("tempdir");
    println!("building {SMALL_PATHS} small store paths with Nix...");
    let a = NixHost::new("");
    let outs = a.build(&format!(r#"builtins.genList (i: mk "small-${{toString i}}" "echo ${{toString i}} > $out") {SMALL_PATHS}"#));
    let paths: Vec<String> = outs.iter().map(|p| p.full()).collect();
    let mut node = Node::new(&t.path().join("node"), &a.root);
    node.start();

    // Ingest: every path reported as its own hook frame by 8 concurrent senders.
    let started = Instant::now();
    let senders: Vec<_> = paths
        .chunks(SMALL_PATHS / 8)
        .map(|chunk| {
            let (chunk, socket) = (chunk.to_vec(), node.socket());
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
                for p in chunk {
                    let env = Envelope {
                        version: 1,
                        request: Request::Hook(HookReport {
                            drv_path: None,
                            out_paths: vec![p],
                        }),
                    };
                    narmesh_proto::frame::write_frame(&mut s, &env).expect("send");
                    let r: Response = narmesh_proto::frame::read_frame(&mut s).expect("ack");
                    assert!(matches!(r, Response::Accepted { .. }), "{r:?}");
                }
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender");
    }
    let acked = started.elapsed();
    wait_until(300, "all small paths recorded", || {
        node.status().paths_recorded as usize >= SMALL_PATHS
    });
    let ingest = started.elapsed();
    let ingest_rate = SMALL_PATHS as f64 / ingest.as_secs_f64();
    assert!(node.serves(&paths[..10]));

    // Hook latency: node up (acknowledged), node down (spooled), seed (`nix copy` in the hook).
    let one = paths[0].clone();
    let hook = bin("narmesh-hook");
    let up = time_hook(
        &hook,
        &[
            ("OUT_PATHS", one.clone()),
            ("NARMESH_SOCKET", node.socket().display().to_string()),
        ],
        HOOK_CALLS,
    );
    let spool = t.path().join("spool");
    let down = time_hook(
        &hook,
        &[
            ("OUT_PATHS", one.clone()),
            (
                "NARMESH_SOCKET",
                t.path().join("absent.sock").display().to_string(),
            ),
            ("NARMESH_SPOOL", spool.display().to_string()),
        ],
        HOOK_CALLS,
    );
    let seed_hook = t.path().join("seed-hook.sh");
    let seed_cache = t.path().join("seed-cache");
    std::fs::write(
        &seed_hook,
        format!(
            "#!/bin/sh\nexec nix copy --to 'file://{}?compression=none' $OUT_PATHS\n",
            seed_cache.display()
        ),
    )
    .expect("write");
    Command::new("chmod")
        .arg("+x")
        .arg(&seed_hook)
        .status()
        .expect("chmod");
    let nix_env: Vec<(&str, String)> = vec![
        ("OUT_PATHS", one.clone()),
        (
            "NIX_CONFIG",
            format!(
                "store = {}\nexperimental-features = nix-command\nsubstituters =",
                a.root.display()
            ),
        ),
        ("NIX_USER_CONF_FILES", "/dev/null".into()),
        (
            "XDG_CACHE_HOME",
            t.path().join("seed-xdg").display().to_string(),
        ),
        ("HOME", t.path().display().to_string()),
    ];
    let seed = time_hook(&seed_hook, &nix_env, SEED_CALLS);

    // narinfo serving: the node vs nginx serving the same narinfos as static files, same
    // client, rotating over 200 recorded paths (hits) and 200 unknown ones (misses).
    let static_dir = t.path().join("static");
    std::fs::create_dir_all(&static_dir).expect("mkdir");
    let mut hits = Vec::new();
    for p in paths.iter().take(200) {
        let hash = &p["/nix/store/".len()..][..32];
        let target = format!("/{hash}.narinfo");
        let (_, _, body) = harness::http(&node.http, "GET", &target, &[]);
        std::fs::write(static_dir.join(format!("{hash}.narinfo")), &body).expect("write narinfo");
        hits.push(target);
    }
    let misses: Vec<String> = (0..200u32)
        .map(|i| {
            let h = blake3::hash(&i.to_le_bytes());
            format!(
                "/{}.narinfo",
                narmesh::nix::base32::encode(&h.as_bytes()[..20])
            )
        })
        .collect();
    let nginx_port = free_port();
    let nginx_conf = t.path().join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err;\nevents {{ worker_connections 1024; }}\n\
             http {{ access_log off; log_not_found off; server {{ listen 127.0.0.1:{nginx_port}; root {root}; \
             location / {{ default_type text/x-nix-narinfo; }} }} }}\n",
            dir = t.path().display(),
            root = static_dir.display()
        ),
    )
    .expect("write nginx.conf");
    let mut nginx = Command::new("nginx")
        .args(["-g", "daemon off;", "-c"])
        .arg(&nginx_conf)
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    wait_until(10, "nginx", || {
        std::net::TcpStream::connect(("127.0.0.1", nginx_port)).is_ok()
    });
    let node_base = format!("http://{}", node.http);
    let nginx_base = format!("http://127.0.0.1:{nginx_port}");
    let mut narinfo_rows = Vec::new();
    for (what, targets, is_miss) in [("hits", &hits, false), ("misses", &misses, true)] {
        for conns in [1, 16] {
            let n = wrk(&node_base, targets, conns, is_miss, t.path());
            let x = wrk(&nginx_base, targets, conns, is_miss, t.path());
            narinfo_rows.push((what, conns, n, x));
        }
    }
    // SIGTERM: a SIGKILLed master leaves its workers running (and holding our stdout).
    let _ = Command::new("kill").arg(nginx.id().to_string()).status();
    let _ = nginx.wait();
    node.stop();

    println!("\n| measure | narmesh | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| hook p50 / p99 / max, node up (ms) | {:.2} / {:.2} / {:.2} | seed `nix copy` hook: {:.1} / {:.1} / {:.1} | p99 {:.0}x faster |",
        ms(up.p50),
        ms(up.p99),
        ms(up.max),
        ms(seed.p50),
        ms(seed.p99),
        ms(seed.max),
        ms(seed.p99) / ms(up.p99)
    );
    println!(
        "| hook p50 / p99 / max, node down, spooling (ms) | {:.2} / {:.2} / {:.2} | seed `nix copy` hook: {:.1} / {:.1} / {:.1} | p99 {:.0}x faster |",
        ms(down.p50),
        ms(down.p99),
        ms(down.max),
        ms(seed.p50),
        ms(seed.p99),
        ms(seed.max),
        ms(seed.p99) / ms(down.p99)
    );
    println!(
        "| ingest, {SMALL_PATHS} small paths hook -> signed and servable | {ingest_rate:.0} paths/s ({:.2} s; all acked in {:.2} s) | goal 1000 paths/s | {:.2}x |",
        ingest.as_secs_f64(),
        acked.as_secs_f64(),
        ingest_rate / 1000.0
    );
    for (what, conns, n, x) in &narinfo_rows {
        println!(
            "| narinfo {what}, 200 rotating (wrk -t1 -c{conns}, 4 s) | {n:.0} req/s | nginx: {x:.0} req/s | {:.2}x |",
            n / x
        );
    }
    let json = format!(
        "{{\"hook_up_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"hook_down_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\
         \"seed_hook_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"ingest_paths_per_s\":{ingest_rate},\
         \"narinfo\":[{}]}}",
        ms(up.p50),
        ms(up.p99),
        ms(up.max),
        ms(down.p50),
        ms(down.p99),
        ms(down.max),
        ms(seed.p50),
        ms(seed.p99),
        ms(seed.max),
        narinfo_rows
            .iter()
            .map(|(w, c, n, x)| format!(
                "{{\"what\":\"{w}\",\"conns\":{c},\"narmesh\":{n},\"nginx\":{x}}}"
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = std::fs::write("target/bench-node.json", json);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
