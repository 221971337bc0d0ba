//! The shared test harness: real Nix "hosts" (chroot stores on one machine), a static HTTP
//! server for binary cache directories, and helpers to run our binaries.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use narmesh::nix::StorePath;

/// Panic loudly (never skip) when a prerequisite the tests need is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not on PATH: the tests need it. Run the README's test command \
         (scripts/test.sh), which installs every prerequisite."
    );
}

/// Run a command, panic with its output if it fails, return stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Which real Nix a host runs: Debian bookworm's 2.8 on the machine itself, or Debian trixie's
/// 2.26 in a root of its own run through bubblewrap (`scripts/install-nix-2.26.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nix {
    V2_8,
    V2_26,
}

impl Nix {
    pub const ALL: [Nix; 2] = [Nix::V2_8, Nix::V2_26];

    /// The root the 2.26 client lives in.
    pub fn root_2_26() -> PathBuf {
        std::env::var_os("NARMESH_NIX226_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/opt/narmesh-nix-2.26"))
    }

    /// Panic loudly (never skip) if this Nix is not installed.
    pub fn require(self) {
        match self {
            Nix::V2_8 => {
                require("nix-store");
                require("nix-build");
            }
            Nix::V2_26 => {
                require("bwrap");
                let root = Nix::root_2_26();
                assert!(
                    root.join("usr/bin/nix-store").is_file()
                        && root.join(".narmesh-ready").is_file(),
                    "Nix 2.26 is not installed in {}: the tests need it. Run the README's test \
                     command (scripts/test.sh), which installs it with scripts/install-nix-2.26.sh.",
                    root.display()
                );
            }
        }
    }
}

/// A simulated Nix host: its own chroot store, configuration and caches.
pub struct NixHost {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    conf_dir: PathBuf,
    /// Extra environment for every command (such as the hook's socket and spool).
    pub env: Vec<(String, String)>,
    pub nix: Nix,
}

/// Derivation boilerplate for builds without nixpkgs.
pub const DRV_PRELUDE: &str = r#"
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
"#;

impl NixHost {
    /// A Nix 2.8 host whose `nix.conf` is the minimal one plus `extra` lines.
    pub fn new(extra_conf: &str) -> Self {
        NixHost::with_nix(Nix::V2_8, extra_conf)
    }

    /// A host running `nix` whose `nix.conf` is the minimal one plus `extra` lines.
    pub fn with_nix(nix: Nix, extra_conf: &str) -> Self {
        nix.require();
        let dir = tempfile::Builder::new()
            .prefix("narmesh-nixhost")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        let conf_dir = dir.path().join("conf");
        std::fs::create_dir_all(&root).expect("mkdir root");
        std::fs::create_dir_all(&conf_dir).expect("mkdir conf");
        // 2.26 builds as root only with build users (its root has the nixbld group).
        let users = match nix {
            Nix::V2_8 => "",
            Nix::V2_26 => "nixbld",
        };
        let conf = format!(
            "store = {}\nbuild-users-group = {users}\nsandbox = true\nsandbox-paths = /bin /usr /lib /lib64\n\
             experimental-features = nix-command\nsubstituters =\nrequire-sigs = true\n{extra_conf}\n",
            root.display()
        );
        std::fs::write(conf_dir.join("nix.conf"), conf).expect("write nix.conf");
        NixHost {
            dir,
            root,
            conf_dir,
            env: Vec::new(),
            nix,
        }
    }

    /// A Nix 2.8 building host whose post-build-hook is `narmesh-hook`, talking to `socket`.
    pub fn with_hook(socket: &Path, spool: &Path) -> Self {
        NixHost::with_hook_nix(Nix::V2_8, socket, spool)
    }

    /// A building host running `nix` whose post-build-hook is `narmesh-hook`.
    pub fn with_hook_nix(nix: Nix, socket: &Path, spool: &Path) -> Self {
        let mut h = NixHost::with_nix(
            nix,
            &format!("post-build-hook = {}", bin("narmesh-hook").display()),
        );
        h.env
            .push(("NARMESH_SOCKET".into(), socket.display().to_string()));
        h.env
            .push(("NARMESH_SPOOL".into(), spool.display().to_string()));
        h
    }

    /// A Nix 2.8 host substituting only from `cache_url`, trusting `key`.
    pub fn substituter(cache_url: &str, key: &str) -> Self {
        NixHost::substituter_nix(Nix::V2_8, cache_url, key)
    }

    /// A host running `nix`, substituting only from `cache_url`, trusting `key`.
    pub fn substituter_nix(nix: Nix, cache_url: &str, key: &str) -> Self {
        NixHost::with_nix(
            nix,
            &format!(
                "substituters = {cache_url}\ntrusted-public-keys = {key}\nnarinfo-cache-negative-ttl = 0\n\
             narinfo-cache-positive-ttl = 0\nconnect-timeout = 5\n"
            ),
        )
    }

    /// The closure of `roots` in this host's store, as full paths.
    pub fn closure(&self, roots: &[StorePath]) -> Vec<String> {
        narmesh::nix::store_db::StoreDb::open(&self.root)
            .expect("store db")
            .closure(roots)
            .expect("closure")
            .iter()
            .map(|p| p.full())
            .collect()
    }

    /// A command with this host's environment, run by this host's Nix. Nix 2.26 runs in its
    /// own root through bubblewrap, with the host's `/tmp` and `$TMPDIR` (where the tests'
    /// stores, sockets and spools live) and the hook's directory bound in at the same paths.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = match self.nix {
            Nix::V2_8 => Command::new(program),
            Nix::V2_26 => {
                let mut c = Command::new("bwrap");
                let bins = bin("narmesh-hook");
                let bins = bins.parent().expect("binary dir");
                c.arg("--bind")
                    .arg(Nix::root_2_26())
                    .arg("/")
                    .args(["--bind", "/proc", "/proc", "--dev-bind", "/dev", "/dev"])
                    .args(["--bind", "/tmp", "/tmp"]);
                // The tests' files are under `$TMPDIR` (`/tmp` unless it says otherwise).
                let tmp = std::env::temp_dir();
                if !tmp.starts_with("/tmp") {
                    c.arg("--bind").arg(&tmp).arg(&tmp);
                }
                c.arg("--ro-bind").arg(bins).arg(bins).arg(program);
                c
            }
        };
        c.env("NIX_CONF_DIR", &self.conf_dir)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("NIX_USER_CONF_FILES", "/dev/null")
            .env("HOME", self.dir.path())
            .env_remove("NIX_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Build a Nix expression (`let <prelude> in <body>`); returns its output paths.
    pub fn build(&self, body: &str) -> Vec<StorePath> {
        let expr = format!("let {DRV_PRELUDE} in {body}");
        let out = run_ok(self.cmd("nix-build").args(["--no-out-link", "-E", &expr]));
        String::from_utf8(out)
            .expect("utf8")
            .lines()
            .map(|l| StorePath::parse(l.trim()).expect("nix-build printed a store path"))
            .collect()
    }

    /// Where a store path's files are on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        narmesh::nix::store_db::real_path(&self.root, p)
    }

    /// The NAR of a path as this store serves it (`nix store dump-path`, the same serializer as `nix-store --dump`).
    pub fn dump(&self, p: &StorePath) -> Vec<u8> {
        run_ok(self.cmd("nix").args(["store", "dump-path", &p.full()]))
    }

    /// Run a nix command with this host's environment, returning its whole output.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program).args(args).output().expect("spawn nix")
    }
}

/// A static file server on loopback (a plain HTTP binary cache directory), for as long as it lives.
pub struct StaticServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl StaticServer {
    pub fn start(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, stop2) = (dir.to_owned(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let dir = dir.clone();
                    std::thread::spawn(move || serve_one(conn, &dir));
                }
            }
        });
        StaticServer { port, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_one(conn: TcpStream, dir: &Path) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let rel = target
            .trim_start_matches('/')
            .split('?')
            .next()
            .unwrap_or("");
        let file = (!rel.contains(".."))
            .then(|| dir.join(rel))
            .filter(|p| p.is_file());
        let resp = match file {
            Some(p) => {
                let mut body = Vec::new();
                std::fs::File::open(p)
                    .and_then(|mut f| f.read_to_end(&mut body))
                    .expect("read");
                let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                    .into_bytes();
                if method != "HEAD" {
                    head.extend_from_slice(&body);
                }
                head
            }
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        if conn.write_all(&resp).is_err() {
            return;
        }
    }
}

/// A lone node's key pair (named `key_name`) and smallest config file under `d`: data dir
/// `d/data`, Nix store root `d/store`, HTTP on an ephemeral loopback port, the given socket and
/// spool dir, then `extra` (TOML sections). Returns the config file's path.
pub fn lone_config(d: &Path, key_name: &str, socket: &Path, spool: &Path, extra: &str) -> PathBuf {
    run_ok(
        Command::new(bin("narmesh"))
            .args(["keygen", key_name])
            .arg(d.join("signing.sec"))
            .arg(d.join("signing.pub")),
    );
    std::fs::create_dir_all(d.join("store")).unwrap();
    let conf = d.join("narmesh.toml");
    std::fs::write(
        &conf,
        format!(
            "data-dir = {:?}\nsocket = {:?}\nspool-dir = {:?}\nsecret-key-file = {:?}\n\
             [nix]\nstore-root = {:?}\n[http]\nlisten = [\"127.0.0.1:0\"]\n{extra}",
            d.join("data"),
            socket,
            spool,
            d.join("signing.sec"),
            d.join("store"),
        ),
    )
    .unwrap();
    conf
}

/// The path of one of our binaries: `narmesh` as cargo built it for the integration tests;
/// `narmesh-hook` (its own package, which cargo does not build for these tests) as installed:
/// `$NARMESH_HOOK_BIN`, else `release/narmesh-hook` of the target directory, the static build
/// of the README's install step, which `scripts/test.sh` makes first. Missing, or older than
/// its sources, is a loud failure.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "narmesh" => PathBuf::from(env!("CARGO_BIN_EXE_narmesh")),
        "narmesh-hook" => {
            static HOOK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            HOOK.get_or_init(hook_bin).clone()
        }
        other => panic!("unknown binary {other}"),
    }
}

fn hook_bin() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hook = std::env::var_os("NARMESH_HOOK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| repo.join("target"), PathBuf::from);
            target.join("release/narmesh-hook")
        });
    let build = "build the hook as the README installs it (`cargo rustc --release --locked -p \
                 narmesh-hook -- -C target-feature=+crt-static`; scripts/test.sh does) or set \
                 NARMESH_HOOK_BIN";
    // Canonical: the Nix 2.26 sandbox binds the hook's own directory.
    let hook =
        std::fs::canonicalize(&hook).unwrap_or_else(|e| panic!("{}: {e}: {build}", hook.display()));
    if !hook.starts_with(repo) {
        // Built elsewhere (an install, a Nix store path): not ours to date.
        return hook;
    }
    let built = std::fs::metadata(&hook)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: {build}", hook.display()));
    // Its Rust sources (what makes cargo rebuild it): the hook's and the wire types'.
    let mut newest = None;
    let mut dirs = vec![repo.join("hook/src"), repo.join("proto/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let p = e.path();
            if kind.is_dir() {
                dirs.push(p);
            } else if kind.is_file()
                && p.extension().is_some_and(|x| x == "rs")
                && let Ok(t) = e.metadata().and_then(|m| m.modified())
            {
                newest = newest.max(Some((t, p)));
            }
        }
    }
    if let Some((t, p)) = newest {
        assert!(
            t <= built,
            "{} is older than {}: {build}",
            hook.display(),
            p.display()
        );
    }
    hook
}

/// Poll `cond` every 20 ms until it holds; panic with `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, cond: impl FnMut() -> bool) {
    wait_until_or_show(secs, what, cond, String::new)
}

/// [`wait_until`], and on a timeout what `show` gives (a node's log, say) after the message.
pub fn wait_until_or_show(
    secs: u64,
    what: &str,
    mut cond: impl FnMut() -> bool,
    show: impl FnOnce() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {secs} s waiting for {what}\n{}", show());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A raw HTTP/1.1 GET (or other method) on loopback: (status, headers, body).
pub fn http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut conn = TcpStream::connect(addr).expect("connect http");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let hdrs = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    (status, hdrs, raw[split + 4..].to_vec())
}

/// What one run of the real `narmesh-hook` did.
pub struct HookRun {
    /// Wall time from spawn to exit.
    pub took: std::time::Duration,
    pub stderr: String,
}

/// Run `narmesh-hook` the way Nix does (fresh process, stdin null) with this environment; it
/// must exit 0 and print nothing on stdout.
pub fn run_hook(socket: &Path, spool: &Path, drv: &str, outs: &str, timeout_ms: u64) -> HookRun {
    let started = std::time::Instant::now();
    let out = Command::new(bin("narmesh-hook"))
        .env("DRV_PATH", drv)
        .env("OUT_PATHS", outs)
        .env("NARMESH_SOCKET", socket)
        .env("NARMESH_SPOOL", spool)
        .env("NARMESH_HOOK_TIMEOUT_MS", timeout_ms.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("spawn narmesh-hook");
    assert!(out.status.success(), "hook exit status {}", out.status);
    assert!(out.stdout.is_empty(), "the hook writes nothing to stdout");
    HookRun {
        took: started.elapsed(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `*.frame` files in a spool directory.
pub fn spooled(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "frame"))
                .collect()
        })
        .unwrap_or_default()
}

/// A mounted tmpfs of its own for a test, unmounted when dropped.
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            ok.success(),
            "mounting a tmpfs at {} (the tests run as root)",
            dir.display()
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Two hosts on a LAN of their own: two network namespaces joined by a veth pair, with a
/// multicast route (what mDNS needs). Deleted when dropped.
pub struct Lan {
    pub ns: [String; 2],
}

impl Lan {
    pub fn new(tag: &str) -> Self {
        let id = std::process::id();
        let ns = [format!("{tag}{id}a"), format!("{tag}{id}b")];
        let veth = [format!("v{tag}{id}a"), format!("v{tag}{id}b")];
        let lan = Lan { ns: ns.clone() };
        for n in &ns {
            run_ok(std::process::Command::new("ip").args(["netns", "add", n]));
        }
        let ip = |args: &[&str]| run_ok(std::process::Command::new("ip").args(args));
        ip(&[
            "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ]);
        for i in 0..2 {
            ip(&["link", "set", &veth[i], "netns", &ns[i]]);
            let addr = format!("{}/24", Lan::ip(i));
            ip(&["-n", &ns[i], "addr", "add", &addr, "dev", &veth[i]]);
            ip(&["-n", &ns[i], "link", "set", "lo", "up"]);
            ip(&["-n", &ns[i], "link", "set", &veth[i], "up"]);
            ip(&["-n", &ns[i], "route", "add", "224.0.0.0/4", "dev", &veth[i]]);
        }
        lan
    }

    /// Host `i`'s address on the LAN.
    pub fn ip(i: usize) -> String {
        format!("10.202.0.{}", i + 1)
    }

    /// A command run on host `i`.
    pub fn on(&self, i: usize, c: &std::process::Command) -> std::process::Command {
        let mut w = std::process::Command::new("ip");
        w.args(["netns", "exec", &self.ns[i]])
            .arg(c.get_program())
            .args(c.get_args());
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        w
    }

    /// The HTTP status `node` (on host `i`) answers for `path`'s narinfo.
    pub fn narinfo_status(
        &self,
        i: usize,
        node: &crate::node_harness::Node,
        path: &narmesh::nix::StorePath,
    ) -> String {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{}/{}.narinfo", node.http, path.hash_part()));
        let out = self.on(i, &curl).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// Bytes on disk under `dir` (allocated blocks, partial files included).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += disk_usage(&e.path());
        } else {
            total += m.blocks() * 512;
        }
    }
    total
}

/// A TCP connection to `to` from loopback address `from` (127.x.y.z: each a host of its own to
/// the node, which counts some connections per host).
pub fn tcp_from(from: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((from, 0).into()).unwrap();
        let c = s.connect(to).await.unwrap().into_std().unwrap();
        c.set_nonblocking(false).unwrap();
        c
    })
}
