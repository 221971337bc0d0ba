//! Running real `narmesh serve` processes for tests: start, query over the socket, SIGTERM or
//! SIGKILL, restart on the same data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use narmesh_proto::control::{Envelope, Request, Response, StatusReport};
use narmesh_proto::frame;

use crate::harness::{bin, wait_until};

/// A node process and its directories (kept across restarts).
pub struct Node {
    pub dir: PathBuf,
    pub store_root: PathBuf,
    pub extra_config: String,
    /// `upstream-keys` (none by default, so test paths are ingested).
    pub upstream_keys: Vec<String>,
    /// The mesh: off unless `mesh_port` is set.
    pub mesh_port: Option<u16>,
    pub peers: Vec<String>,
    pub allowed_peers: Vec<String>,
    pub trusted: Vec<String>,
    pub replicate: &'static str,
    /// Extra environment for the node process (such as S3 credentials).
    pub env: Vec<(String, String)>,
    /// This node's peer address (`<endpoint id>@127.0.0.1:<port>`), once its mesh is on.
    pub address: String,
    /// More lines of the `[mesh]` section (tests catch up every 500 ms, not every 5 s).
    pub mesh_extra: String,
    /// A command the node is started under (such as `unshare -n ...`), which must `exec` it.
    pub wrap: Vec<String>,
    /// The address the mesh listens on (loopback unless the node runs in a network namespace).
    pub mesh_ip: String,
    /// `[mesh] lan-discovery` (off: tests name their peers, and loopback has no multicast).
    pub lan_discovery: bool,
    /// The spool inside the data dir (as the default puts it), not beside it.
    pub spool_in_data: bool,
    /// More lines of the `[http]` section.
    pub http_extra: String,
    child: Option<Child>,
    pub http: String,
}

impl Node {
    /// Paths of a node living in `dir` for the store at `store_root`; not started.
    pub fn new(dir: &Path, store_root: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir node dir");
        Node {
            dir: dir.to_owned(),
            store_root: store_root.to_owned(),
            extra_config: String::new(),
            upstream_keys: Vec::new(),
            mesh_port: None,
            peers: Vec::new(),
            allowed_peers: Vec::new(),
            trusted: Vec::new(),
            replicate: "on-demand",
            env: Vec::new(),
            wrap: Vec::new(),
            mesh_ip: "127.0.0.1".into(),
            lan_discovery: false,
            spool_in_data: false,
            http_extra: String::new(),
            mesh_extra: "sync-interval-ms = 500\n".into(),
            address: String::new(),
            child: None,
            http: String::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("node.sock")
    }

    pub fn spool(&self) -> PathBuf {
        if self.spool_in_data {
            self.dir.join("data/spool")
        } else {
            self.dir.join("spool")
        }
    }

    /// The node's Nix signing key (made by the harness so peers can trust it before it starts).
    pub fn public_key(&self) -> String {
        let path = self.dir.join("signing.sec");
        if !path.exists() {
            let name = format!(
                "{}-1",
                self.dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("node")
            );
            let key = narmesh::nix::SecretKey::generate(&name).expect("key");
            std::fs::write(&path, key.to_nix_string()).expect("write key");
        }
        let key: narmesh::nix::SecretKey = std::fs::read_to_string(&path)
            .expect("read key")
            .parse()
            .expect("parse key");
        key.public().to_string()
    }

    /// Turn the mesh on with the endpoint key already in the data dir (a data dir of an earlier
    /// run); returns its peer address.
    pub fn enable_mesh_with_key(&mut self) -> String {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .expect("udp")
            .local_addr()
            .expect("addr")
            .port();
        self.mesh_port = Some(port);
        let raw: [u8; 32] = std::fs::read(self.dir.join("data/endpoint-key"))
            .expect("endpoint key")
            .try_into()
            .expect("32 bytes");
        let id = iroh::SecretKey::from_bytes(&raw).public();
        self.address = format!("{id}@{}:{port}", self.mesh_ip);
        self.address.clone()
    }

    /// Turn the mesh on: a fixed loopback UDP port and an endpoint key made now, so other
    /// nodes can name this one in `peers` before it starts. Returns its peer address.
    pub fn enable_mesh(&mut self) -> String {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .expect("udp")
            .local_addr()
            .expect("addr")
            .port();
        self.mesh_port = Some(port);
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).expect("mkdir data");
        let raw: [u8; 32] = rand_bytes();
        std::fs::write(data.join("endpoint-key"), raw).expect("write endpoint key");
        let id = iroh::SecretKey::from_bytes(&raw).public();
        self.address = format!("{id}@{}:{port}", self.mesh_ip);
        self.address.clone()
    }

    fn config_file(&self) -> PathBuf {
        let path = self.dir.join("narmesh.toml");
        let _ = self.public_key();
        let mesh = match self.mesh_port {
            Some(port) => format!(
                "[mesh]\nlisten = \"{}:{port}\"\nlan-discovery = {}\npeers = {:?}\nallowed-peers = {:?}\nreplicate = {:?}\n{}",
                self.mesh_ip,
                self.lan_discovery,
                self.peers,
                self.allowed_peers,
                self.replicate,
                self.mesh_extra
            ),
            None => "[mesh]\nenabled = false\n".to_owned(),
        };
        // The disk's free-space floor (5 GiB by default) is the host's, not the test's: a test
        // that does not set `[store]` itself keeps 64 MiB free, so a machine with little disk
        // to spare still runs it.
        let store = if self.extra_config.contains("[store]") {
            ""
        } else {
            "[store]\nmin-free = \"64MiB\"\n"
        };
        let text = format!(
            "data-dir = {:?}\nsocket = {:?}\nspool-dir = {:?}\nupstream-keys = {:?}\nsecret-key-file = {:?}\ntrusted-public-keys = {:?}\n{}\n{store}[nix]\nstore-root = {:?}\n[http]\nlisten = [\"127.0.0.1:0\"]\n{}\n{mesh}",
            self.dir.join("data"),
            self.socket(),
            self.spool(),
            self.upstream_keys,
            self.dir.join("signing.sec"),
            self.trusted,
            self.extra_config,
            self.store_root,
            self.http_extra,
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Start the process and wait until it answers on its socket.
    pub fn start(&mut self) -> &mut Self {
        self.spawn();
        let mut status = None;
        wait_until(60, "the node to answer on its socket", || {
            if let Some(c) = self.child.as_mut() {
                assert!(
                    c.try_wait().ok().flatten().is_none(),
                    "node exited; log:\n{}",
                    self.log()
                );
            }
            status = self.try_status();
            status.is_some()
        });
        self.http = status.expect("status").http_listen[0].clone();
        self
    }

    /// Start the process without waiting for it (it may die at a kill point before it
    /// answers).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .expect("log file");
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("narmesh"));
                c
            }
            None => Command::new(bin("narmesh")),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(self.config_file())
            .env("NARMESH_LOG", "info,narmesh=debug")
            .env_remove("NARMESH_SOCKET")
            .env_remove("NARMESH_SPOOL")
            // A test runner under systemd must not hand its own service manager to the node.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn narmesh serve");
        self.child = Some(child);
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// One request over the socket.
    pub fn call(&self, request: Request) -> std::io::Result<Response> {
        let mut s = std::os::unix::net::UnixStream::connect(self.socket())?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let env = Envelope {
            version: narmesh_proto::HOOK_PROTOCOL_VERSION,
            request,
        };
        frame::write_frame(&mut s, &env).map_err(std::io::Error::other)?;
        frame::read_frame(&mut s).map_err(std::io::Error::other)
    }

    pub fn try_status(&self) -> Option<StatusReport> {
        match self.call(Request::Status) {
            Ok(Response::Status(s)) => Some(*s),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusReport {
        self.try_status().expect("node status")
    }

    /// True if every path is recorded and its narinfo served over HTTP.
    pub fn serves(&self, paths: &[String]) -> bool {
        paths.iter().all(|p| {
            let base = p.trim_start_matches("/nix/store/");
            let (code, _, _) =
                crate::harness::http(&self.http, "GET", &format!("/{}.narinfo", &base[..32]), &[]);
            code == 200
        })
    }

    /// The running node's process id (0 when stopped).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// CPU seconds (user + system) the running node has used so far.
    #[allow(dead_code)]
    pub fn cpu_seconds(&self) -> f64 {
        match self.child.as_ref() {
            Some(c) => proc_cpu_seconds(&c.id().to_string()),
            None => 0.0,
        }
    }

    /// Send `signal` (such as `STOP` or `CONT`) to the running node.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        assert!(pid != 0, "node not running");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// Wait up to `secs` for the process to exit by itself (a kill point); true if it did.
    pub fn wait_exit(&mut self, secs: u64) -> bool {
        self.wait_exit_status(secs).is_some()
    }

    /// Wait up to `secs` for the process to exit by itself: how it exited (`None` if it
    /// did not, or was not running: then a success).
    pub fn wait_exit_status(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => {
                    self.child = None;
                    return Some(status);
                }
                None => return Some(std::process::ExitStatus::from_raw(0)),
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
        None
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let status = c.wait().expect("wait node");
            assert!(
                status.success(),
                "node exited with {status} on SIGTERM; log:\n{}",
                self.log()
            );
            // A clean stop closes the mesh's endpoint (else iroh aborts its connections).
            let log = self.log();
            assert!(
                !log.contains("Endpoint dropped without calling"),
                "the node dropped its endpoint without closing it; log:\n{log}"
            );
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The test failed: show the end of this node's log before its directory goes.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.dir.join("node.log").display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// CPU seconds (user + system) of process `pid` (a number, or `self`) so far, from `/proc`.
pub fn proc_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// `n` nodes under `dir` in a full mesh; node 0 serves the store of the returned Nix host, whose
/// post-build hook reports to it, and the others keep stores of their own. Not started.
pub fn built_on_first(dir: &Path, n: usize) -> (crate::harness::NixHost, Vec<Node>) {
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(&dir.join(format!("n{i}")), &dir.join("unused")))
        .collect();
    let a = crate::harness::NixHost::with_hook(&nodes[0].socket(), &nodes[0].spool());
    full_mesh(&mut nodes);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.store_root = if i == 0 {
            a.root.clone()
        } else {
            node.dir.join("store")
        };
    }
    (a, nodes)
}

fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("randomness");
    b
}

/// Make `nodes` a full mesh: each gets a mesh endpoint, lists every other node in `peers`, and
/// trusts every other node's signing key (as an operator writes it: not its own).
pub fn full_mesh(nodes: &mut [Node]) {
    let addrs: Vec<String> = nodes.iter_mut().map(|n| n.enable_mesh()).collect();
    mesh_of(nodes, addrs);
}

/// `full_mesh` for nodes whose data dirs hold their endpoint keys already.
pub fn keep_mesh_keys(nodes: &mut [Node]) {
    let addrs: Vec<String> = nodes.iter_mut().map(|n| n.enable_mesh_with_key()).collect();
    mesh_of(nodes, addrs);
}

fn mesh_of(nodes: &mut [Node], addrs: Vec<String>) {
    let keys: Vec<String> = nodes.iter().map(|n| n.public_key()).collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.peers = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| a.clone())
            .collect();
        node.trusted = keys
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, k)| k.clone())
            .collect();
    }
}
