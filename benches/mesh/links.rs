//! The peer transfer over emulated links: network namespaces joined by veth pairs, each end
//! shaped with `tc tbf`, nodes, curl, nginx and Nix run inside them with `ip netns exec`. Each
//! figure beside its baseline over the same link in the same run:
//! - a 1 GiB NAR fetched on demand through the local node (curl), over QUIC and over the bulk
//!   channel, against curl fetching the same bytes from nginx on the peer (a TCP copy), at
//!   10 Gbit/s and at 1 Gbit/s;
//! - real Nix substituting the 1 GiB path through its local node (both ways), against the same Nix
//!   substituting it from nginx serving a `nix copy` cache on the peer (10 Gbit/s);
//! - two providers, each behind its own 1 Gbit/s link, to a fetcher on 10 Gbit/s, against one.
//!
//! `NARMESH_BENCH_LINKS_PART=two` runs only the last, `curl10` only the 10 Gbit/s fetches with
//! curl, `bulk10` only the one over the bulk channel (a profiling aid).
//!
//! Needs root (network namespaces), iproute2, curl and nginx. Traffic stays on the namespaces'
//! own addresses; every namespace is deleted when the bench ends, also when it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{NixHost, require, run_ok, wait_until};
use crate::node_harness::{Node, full_mesh};
use narmesh::nix::StorePath;
use narmesh_proto::control::Request;

const GIB: u64 = 1 << 30;
const NGINX_PORT: u16 = 8088;
/// The `[mesh]` line that turns the bulk channel on.
const BULK: &str = "bulk-listen = \"0.0.0.0:0\"\n";

/// The namespaces of one setup; deleted on drop.
struct Net {
    tag: String,
    spaces: Vec<String>,
    links: u8,
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

impl Net {
    fn new(tag: &str) -> Self {
        Net {
            tag: format!("nm{}{tag}", std::process::id() % 100_000),
            spaces: Vec::new(),
            links: 0,
        }
    }

    fn space(&mut self, name: &str) -> String {
        let ns = format!("{}{name}", self.tag);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &ns]);
        self.spaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth pair between `a` and `b` on a /24 of its own, each end shaped to its rate
    /// (`None`: not shaped). Returns the two ends' addresses.
    fn link(
        &mut self,
        a: &str,
        b: &str,
        rate_a: Option<&str>,
        rate_b: Option<&str>,
    ) -> (String, String) {
        self.links += 1;
        let n = self.links;
        let (va, vb) = (format!("{}v{n}a", self.tag), format!("{}v{n}b", self.tag));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", a]);
        ip(&["link", "set", &vb, "netns", b]);
        let (ipa, ipb) = (format!("10.231.{n}.1"), format!("10.231.{n}.2"));
        for (ns, dev, addr, rate) in [(a, &va, &ipa, rate_a), (b, &vb, &ipb, rate_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            if let Some(rate) = rate {
                let burst = if rate.starts_with("10g") {
                    "4mb"
                } else {
                    "512kb"
                };
                run_ok(Command::new("tc").args([
                    "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    burst, "latency", "10ms",
                ]));
            }
        }
        (ipa, ipb)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.spaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `cmd` run inside namespace `ns` (program, arguments and environment kept).
fn in_ns(ns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.stdin(Stdio::null());
    c
}

/// curl inside `ns`, given at most `secs` for the whole request, failing on HTTP errors.
fn curl_in(ns: &str, secs: u32) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "curl", "-sf", "--max-time"])
        .arg(secs.to_string());
    c
}

/// curl inside `ns`: fetch `url` into /dev/null; the bytes and the time it took.
fn curl(ns: &str, url: &str) -> (u64, Duration) {
    let started = Instant::now();
    let out = run_ok(curl_in(ns, 300).args(["-o", "/dev/null", "-w", "%{size_download}", url]));
    let took = started.elapsed();
    let n = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    (n, took)
}

/// True if `url` answers 2xx to curl inside `ns` within 10 s.
fn answers(ns: &str, url: &str) -> bool {
    curl_in(ns, 10)
        .args(["-o", "/dev/null", url])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// curl inside `ns`: the body of `url`.
fn curl_body(ns: &str, url: &str) -> String {
    String::from_utf8_lossy(&run_ok(curl_in(ns, 30).arg(url))).into_owned()
}

/// nginx inside `ns` on `addr`, serving `root`; killed on drop.
struct Nginx(std::process::Child);

impl Nginx {
    fn start(ns: &str, addr: &str, root: &Path, dir: &Path) -> Self {
        let conf = dir.join(format!("nginx-{ns}.conf"));
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {d}/nginx-{ns}.pid;\nerror_log {d}/nginx-{ns}.err;\nevents {{ worker_connections 256; }}\n\
                 http {{ access_log off; sendfile on; server {{ listen {addr}:{NGINX_PORT}; root {root}; \
                 location / {{ default_type application/octet-stream; }} }} }}\n",
                d = dir.display(),
                root = root.display()
            ),
        )
        .expect("nginx.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nginx", "-g", "daemon off;", "-c"])
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        let probe = format!("http://{addr}:{NGINX_PORT}/nix-cache-info");
        wait_until(10, "nginx", || answers(ns, &probe));
        Nginx(child)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn mbs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Nodes in namespaces: `spec` is (namespace, replicate) per node; `addr(i, j)` is the address
/// node `i` reaches node `j` at. Node 0 serves `a`'s store.
fn nodes_in(
    dir: &Path,
    a: &NixHost,
    spec: &[(&str, &'static str)],
    addr: impl Fn(usize, usize) -> String,
) -> Vec<Node> {
    let mut nodes: Vec<Node> = spec
        .iter()
        .enumerate()
        .map(|(i, (ns, replicate))| {
            let mut n = Node::new(&dir.join(format!("n{i}")), &a.root);
            if i > 0 {
                n.store_root = n.dir.join("store");
            }
            n.mesh_ip = "0.0.0.0".into();
            n.replicate = replicate;
            n.wrap = vec!["ip".into(), "netns".into(), "exec".into(), ns.to_string()];
            n
        })
        .collect();
    full_mesh(&mut nodes);
    let ids: Vec<(String, String)> = nodes
        .iter()
        .map(|n| {
            let (id, at) = n.address.split_once('@').expect("address");
            (
                id.to_owned(),
                at.rsplit_once(':').expect("port").1.to_owned(),
            )
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.peers = (0..ids.len())
            .filter(|j| *j != i)
            .map(|j| format!("{}@{}:{}", ids[j].0, addr(i, j), ids[j].1))
            .collect();
    }
    nodes
}

/// Two on-demand nodes, A (serving `a`'s store) in `ns[0]` at `ip[0]` and B in `ns[1]` at
/// `ip[1]`, started; with `bulk`, both use the bulk channel.
fn pair(dir: &Path, a: &NixHost, ns: [&str; 2], ip: [&str; 2], bulk: bool) -> Vec<Node> {
    let mut nodes = nodes_in(
        dir,
        a,
        &[(ns[0], "on-demand"), (ns[1], "on-demand")],
        |i, _| ip[1 - i].to_owned(),
    );
    for n in nodes.iter_mut() {
        if bulk {
            n.mesh_extra.push_str(BULK);
        }
        n.start();
    }
    nodes
}

/// The on-demand NAR URL a node serves for `path`, read from its narinfo inside `ns`.
fn nar_url(ns: &str, node: &Node, path: &StorePath) -> String {
    let info = curl_body(
        ns,
        &format!("http://{}/{}.narinfo", node.http, path.hash_part()),
    );
    let url = info
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL in narinfo");
    format!("http://{}/{url}", node.http)
}

/// A's node pushes `path`; `b` (inside `ns_b`) learns it. Returns the NAR URL at `b`.
fn announce(nodes: &[Node], b: usize, ns_b: &str, path: &StorePath) -> String {
    nodes[0]
        .call(Request::Push {
            paths: vec![path.full()],
        })
        .expect("push");
    let probe = format!("http://{}/{}.narinfo", nodes[b].http, path.hash_part());
    wait_until(300, "the fetcher to learn the big path", || {
        answers(ns_b, &probe)
    });
    nar_url(ns_b, &nodes[b], path)
}

/// Run every measurement; the table's rows.
pub fn run(t: &Path) -> Vec<String> {
    assert!(
        rustix::process::geteuid().is_root(),
        "the link benches need root (network namespaces); NARMESH_BENCH_LINKS=0 skips them"
    );
    for tool in ["ip", "tc", "curl", "nginx"] {
        require(tool);
    }
    let mut rows = Vec::new();
    let a = NixHost::new("");
    println!("links: building a 1 GiB store path with Nix...");
    let big = a.build(&format!(
        r#"mk "link-big" "head -c {GIB} /dev/urandom > $out""#
    ))[0]
        .clone();
    // The `nix copy` cache nginx serves (uncompressed, signed with A's node key).
    let signer = Node::new(&t.join("signer"), &a.root);
    let key = signer.public_key();
    let cache = t.join("cache");
    run_ok(a.cmd("nix").args([
        "copy",
        "--to",
        &format!(
            "file://{}?compression=none&secret-key={}",
            cache.display(),
            signer.dir.join("signing.sec").display()
        ),
        &big.full(),
    ]));
    let nar_file: PathBuf = std::fs::read_dir(cache.join("nar"))
        .expect("cache nar dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .expect("the NAR in the cache");
    let nar_rel = format!("nar/{}", nar_file.file_name().unwrap().to_string_lossy());

    // NARMESH_BENCH_LINKS_PART: `two` (only the two providers), `curl10` (only the 10 Gbit/s
    // fetches with curl) or `bulk10` (only the 10 Gbit/s fetch over the bulk channel: a
    // profiling aid).
    let part = std::env::var("NARMESH_BENCH_LINKS_PART").unwrap_or_default();
    let curl10 = part == "bulk10" || part == "curl10";
    for (rate, with_nix) in [("10gbit", true), ("1gbit", false)] {
        if part == "two" || (curl10 && rate != "10gbit") {
            break;
        }
        let mut net = Net::new(if with_nix { "x" } else { "g" });
        let (ns_a, ns_b) = (net.space("a"), net.space("b"));
        let (ip_a, ip_b) = net.link(&ns_a, &ns_b, Some(rate), Some(rate));
        let _nginx = Nginx::start(&ns_a, &ip_a, &cache, t);
        // The TCP copy: curl fetching the NAR file from nginx, best of two.
        let tcp = (0..2)
            .map(|_| {
                let (n, d) = curl(&ns_b, &format!("http://{ip_a}:{NGINX_PORT}/{nar_rel}"));
                mbs(n, d)
            })
            .fold(0.0, f64::max);
        // narmesh: B fetches from A on demand, for curl inside B's namespace; over QUIC, then
        // over the bulk channel.
        for bulk in [false, true] {
            if part == "bulk10" && !bulk {
                continue;
            }
            let dir = t.join(format!("curl-{rate}-{bulk}"));
            let nodes = pair(&dir, &a, [&ns_a, &ns_b], [&ip_a, &ip_b], bulk);
            let url = announce(&nodes, 1, &ns_b, &big);
            let wall = std::time::SystemTime::now();
            let (n, d) = curl(&ns_b, &url);
            assert!(n >= GIB, "the whole NAR came ({n} bytes)");
            let ours = mbs(n, d);
            if std::env::var_os("NARMESH_BENCH_LOGS").is_some() {
                let at = wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                println!(
                    "curl from {:.3} s (Unix time) for {d:?}\n--- B's log ---\n{}",
                    at.as_secs_f64(),
                    nodes[1].log()
                );
            }
            drop(nodes);
            let _ = std::fs::remove_dir_all(&dir);
            rows.push(format!(
                "| {rate} link: 1 GiB NAR on demand through the local node (curl), {} | {ours:.1} MB/s | TCP copy (curl from nginx on the peer): {tcp:.1} MB/s | {:.2}x |",
                if bulk { "bulk channel (TCP)" } else { "QUIC" },
                ours / tcp
            ));
        }
        if !with_nix || curl10 {
            continue;
        }
        // Real Nix through its node (QUIC, then the bulk channel), against the same Nix from
        // nginx's `nix copy` cache.
        let substitute = |cache_url: &str, key: &str| {
            let host = NixHost::substituter(cache_url, key);
            let started = Instant::now();
            run_ok(&mut in_ns(
                &ns_b,
                host.cmd("nix-store").args(["-r", &big.full()]),
            ));
            started.elapsed()
        };
        let from_nginx = substitute(&format!("http://{ip_a}:{NGINX_PORT}"), &key);
        for bulk in [false, true] {
            let dir = t.join(format!("nix-{rate}-{bulk}"));
            let nodes = pair(&dir, &a, [&ns_a, &ns_b], [&ip_a, &ip_b], bulk);
            announce(&nodes, 1, &ns_b, &big);
            let through_node =
                substitute(&format!("http://{}", nodes[1].http), &nodes[1].public_key());
            drop(nodes);
            let _ = std::fs::remove_dir_all(&dir);
            rows.push(format!(
                "| {rate} link: real Nix substitutes the 1 GiB path through its node, {} | {:.1} s ({:.1} MB/s) | the same Nix from nginx serving a `nix copy` cache on the peer: {:.1} s ({:.1} MB/s) | {:.2}x |",
                if bulk { "bulk channel (TCP)" } else { "QUIC" },
                through_node.as_secs_f64(),
                mbs(GIB, through_node),
                from_nginx.as_secs_f64(),
                mbs(GIB, from_nginx),
                from_nginx.as_secs_f64() / through_node.as_secs_f64()
            ));
        }
    }

    if curl10 {
        return rows;
    }
    // Two providers, each behind its own 1 Gbit/s link, to a fetcher on 10 Gbit/s.
    let mut net = Net::new("p");
    let (ns_a, ns_c, ns_f) = (net.space("a"), net.space("c"), net.space("f"));
    let (af_a, af_f) = net.link(&ns_a, &ns_f, Some("1gbit"), Some("10gbit"));
    let (cf_c, cf_f) = net.link(&ns_c, &ns_f, Some("1gbit"), Some("10gbit"));
    let (ac_a, ac_c) = net.link(&ns_a, &ns_c, None, None);
    let spaces = [ns_a.clone(), ns_c.clone(), ns_f.clone()];
    // addr[i][j]: where node i reaches node j.
    let addr = |i: usize, j: usize| -> String {
        match (i, j) {
            (1, 0) => ac_a.clone(),
            (0, 1) => ac_c.clone(),
            (2, 0) => af_a.clone(),
            (0, 2) => af_f.clone(),
            (2, 1) => cf_c.clone(),
            (1, 2) => cf_f.clone(),
            _ => unreachable!(),
        }
    };
    let dir = t.join("two");
    let mut nodes = nodes_in(
        &dir,
        &a,
        &[
            (&spaces[0], "on-demand"),
            (&spaces[1], "eager"),
            (&spaces[2], "on-demand"),
        ],
        addr,
    );
    let fetcher = nodes.pop().expect("fetcher");
    let f_peers = fetcher.peers.clone();
    for n in nodes.iter_mut() {
        // The providers offer the bulk channel; each fetcher below decides whether to use it.
        n.mesh_extra.push_str(BULK);
        n.start();
    }
    nodes[0]
        .call(Request::Push {
            paths: vec![big.full()],
        })
        .expect("push");
    wait_until(300, "C to hold the 1 GiB NAR", || {
        nodes[1].status().storage.files == 1
    });
    let fetch_with = |peers: Vec<String>, name: &str, bulk: bool| -> (f64, String) {
        let mut f = Node::new(&dir.join(name), &dir.join(name).join("store"));
        if bulk {
            f.mesh_extra.push_str(BULK);
        }
        std::fs::create_dir_all(f.dir.join("data")).expect("data dir");
        std::fs::copy(
            fetcher.dir.join("data/endpoint-key"),
            f.dir.join("data/endpoint-key"),
        )
        .expect("endpoint key");
        std::fs::copy(fetcher.dir.join("signing.sec"), f.dir.join("signing.sec")).expect("key");
        f.mesh_port = fetcher.mesh_port;
        f.mesh_ip = "0.0.0.0".into();
        f.trusted = fetcher.trusted.clone();
        f.wrap = fetcher.wrap.clone();
        f.peers = peers;
        f.start();
        let probe = format!("http://{}/{}.narinfo", f.http, big.hash_part());
        wait_until(60, "the fetcher to learn the path", || {
            answers(&ns_f, &probe)
        });
        // Let catch-up with every peer bring each one's provider statement.
        std::thread::sleep(Duration::from_secs(2));
        let url = nar_url(&ns_f, &f, &big);
        let (n, d) = curl(&ns_f, &url);
        assert!(n >= GIB, "the whole NAR came ({n} bytes)");
        // What each provider sent, in MB (the fetcher's verified bytes per peer).
        let metrics = curl_body(&ns_f, &format!("http://{}/metrics", f.http));
        let mut shares: Vec<String> = metrics
            .lines()
            .filter(|l| l.starts_with("narmesh_mesh_fetched_bytes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|b| format!("{:.0}", b / 1e6))
            .collect();
        shares.sort();
        drop(f);
        (mbs(n, d), shares.join(" + "))
    };
    let a_only: Vec<String> = f_peers
        .iter()
        .filter(|p| p.contains(&format!("@{af_a}:")))
        .cloned()
        .collect();
    for bulk in [false, true] {
        let tag = if bulk { "bulk" } else { "quic" };
        let (one, _) = fetch_with(a_only.clone(), &format!("f-one-{tag}"), bulk);
        let (two, shares) = fetch_with(f_peers.clone(), &format!("f-two-{tag}"), bulk);
        rows.push(format!(
            "| two providers, each behind its own 1 Gbit/s link, to a fetcher on 10 Gbit/s (1 GiB, curl), {} | {two:.1} MB/s (MB from each: {shares}) | one provider alone: {one:.1} MB/s | {:.2}x |",
            if bulk { "bulk channel (TCP)" } else { "QUIC" },
            two / one
        ));
    }
    drop(nodes);
    drop(net);
    rows
}
