//! The nodes of a benchmark run: real `narmesh serve` processes on loopback, each with its own
//! data directory, socket, signing key, store root and mesh port, all peers and trusted by each
//! other. Reads each process's CPU time and peak memory from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use narmesh_proto::control::{Request, Response, StatusReport};

use crate::client::Client;
use crate::nix::SecretKey;

/// One node of the cluster.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub store_root: PathBuf,
    pub public_key: String,
    pub peer_address: String,
    /// The HTTP binary cache (`127.0.0.1:PORT`), known once started.
    pub http: String,
    mesh_port: u16,
    child: Option<Child>,
}

/// What every node of a run shares.
pub struct Spec {
    /// `on-demand` or `eager`.
    pub replicate: String,
    /// Move NARs over the bulk channel (`[mesh] bulk-listen`) instead of QUIC.
    pub bulk: bool,
    /// The mirror node's S3 target, if the run has one.
    pub mirror: Option<MirrorSpec>,
    /// The gossip topic's name.
    pub cluster: String,
}

/// The mirror node's `[mirror.s3]` and the environment it needs (credentials).
pub struct MirrorSpec {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    /// `zstd`, `xz` or `none`.
    pub compression: String,
    pub env: Vec<(String, String)>,
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    /// Prepare a node in `dir` (keys made now, so the others can name and trust it).
    pub fn new(name: &str, dir: &Path, store_root: &Path) -> anyhow::Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let key = SecretKey::generate(&format!("bench-{name}-1"))?;
        crate::fsutil::write_atomic(
            &dir.join("signing.sec"),
            key.to_nix_string().as_bytes(),
            0o600,
        )?;
        let id = crate::mesh::endpoint_id_of_key(&data.join("endpoint-key"))?;
        let mesh_port = free_udp_port()?;
        Ok(Node {
            name: name.to_owned(),
            dir: dir.to_owned(),
            store_root: store_root.to_owned(),
            public_key: key.public().to_string(),
            peer_address: format!("{id}@127.0.0.1:{mesh_port}"),
            http: String::new(),
            mesh_port,
            child: None,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("node.sock")
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// The node's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    fn config(&self, all: &[&Node], spec: &Spec, mirror: bool) -> toml::Table {
        let path = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned());
        let strings = |v: Vec<String>| toml::Value::Array(v.into_iter().map(Into::into).collect());
        let others: Vec<&&Node> = all.iter().filter(|n| n.name != self.name).collect();
        let mut t = toml::Table::new();
        t.insert("data-dir".into(), path(self.dir.join("data")));
        t.insert("socket".into(), path(self.socket()));
        t.insert("spool-dir".into(), path(self.spool()));
        t.insert("secret-key-file".into(), path(self.dir.join("signing.sec")));
        t.insert(
            "trusted-public-keys".into(),
            strings(all.iter().map(|n| n.public_key.clone()).collect()),
        );
        // Every path of the workload is ours to share, whoever signed it before.
        t.insert("upstream-keys".into(), strings(Vec::new()));
        // The bench measures, it does not guard the host's disk: its nodes keep 256 MiB free
        // instead of the default 5 GiB, so a machine with little disk to spare can run it (the
        // bench checks first that its workload fits).
        let mut store = toml::Table::new();
        store.insert("min-free".into(), "256MiB".into());
        t.insert("store".into(), store.into());
        let mut nix = toml::Table::new();
        nix.insert("store-root".into(), path(self.store_root.clone()));
        t.insert("nix".into(), nix.into());
        let mut http = toml::Table::new();
        http.insert("listen".into(), strings(vec!["127.0.0.1:0".into()]));
        t.insert("http".into(), http.into());
        let mut mesh = toml::Table::new();
        mesh.insert(
            "listen".into(),
            format!("127.0.0.1:{}", self.mesh_port).into(),
        );
        mesh.insert("lan-discovery".into(), false.into());
        mesh.insert(
            "peers".into(),
            strings(others.iter().map(|n| n.peer_address.clone()).collect()),
        );
        mesh.insert("replicate".into(), spec.replicate.clone().into());
        mesh.insert("cluster".into(), spec.cluster.clone().into());
        if spec.bulk {
            mesh.insert("bulk-listen".into(), "127.0.0.1:0".into());
        }
        t.insert("mesh".into(), mesh.into());
        if let (true, Some(m)) = (mirror, &spec.mirror) {
            let mut s3 = toml::Table::new();
            s3.insert("bucket".into(), m.bucket.clone().into());
            if let Some(ep) = &m.endpoint {
                s3.insert("endpoint".into(), ep.clone().into());
            }
            s3.insert("region".into(), m.region.clone().into());
            s3.insert("compression".into(), m.compression.clone().into());
            let mut section = toml::Table::new();
            section.insert("s3".into(), s3.into());
            t.insert("mirror".into(), section.into());
        }
        t
    }

    /// Start the process with the cluster's config and wait until it answers on its socket.
    pub fn start(
        &mut self,
        exe: &Path,
        config: toml::Table,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let file = self.dir.join("narmesh.toml");
        std::fs::write(&file, toml::to_string(&config)?)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&file)
            .env(
                "NARMESH_LOG",
                std::env::var("NARMESH_BENCH_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("NARMESH_SOCKET")
            .env_remove("NARMESH_SPOOL")
            // A bench run under a service manager must not hand it to its nodes.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(rc) = c.try_wait()?
            {
                anyhow::bail!(
                    "node {} exited ({rc}) at start; its log: {}",
                    self.name,
                    self.log_path().display()
                );
            }
            if let Ok(s) = self.status() {
                self.http = s
                    .http_listen
                    .first()
                    .cloned()
                    .context("the node listens on no HTTP address")?;
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {} did not answer on its socket within 60 s; its log: {}",
                self.name,
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's status over its socket.
    pub fn status(&self) -> anyhow::Result<StatusReport> {
        match Client::connect(&self.socket())?.call(Request::Status)? {
            Response::Status(s) => Ok(*s),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }

    /// True if the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(c) = &self.child else { return 0.0 };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        // After the command name (which may hold spaces): utime is the 12th field, stime the
        // 13th, in clock ticks (100 per second on Linux).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        rest.split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<f64>().ok())
            .sum::<f64>()
            / 100.0
    }

    /// Peak resident memory in bytes (`VmHWM`).
    /// Bytes the process has caused to be written to disk (`/proc/PID/io` `write_bytes`).
    pub fn written_bytes(&self) -> u64 {
        let Some(c) = &self.child else { return 0 };
        std::fs::read_to_string(format!("/proc/{}/io", c.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn peak_rss(&self) -> u64 {
        let Some(c) = &self.child else { return 0 };
        std::fs::read_to_string(format!("/proc/{}/status", c.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Stop the process (SIGKILL: the run is over, nothing of it needs to survive).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start every node: `nodes[mirror]` (if any) gets the mirror config.
pub fn start_all(
    exe: &Path,
    nodes: &mut [Node],
    spec: &Spec,
    mirror: Option<usize>,
) -> anyhow::Result<()> {
    let configs: Vec<toml::Table> = {
        let all: Vec<&Node> = nodes.iter().collect();
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| n.config(&all, spec, Some(i) == mirror))
            .collect()
    };
    for (i, (n, cfg)) in nodes.iter_mut().zip(configs).enumerate() {
        let env = match (&spec.mirror, Some(i) == mirror) {
            (Some(m), true) => m.env.clone(),
            _ => Vec::new(),
        };
        n.start(exe, cfg, &env)?;
    }
    Ok(())
}

/// Wait until every node has a gossip link (at most `limit`); false if some never got one
/// (announcements then reach it by catch-up).
pub fn wait_for_links(nodes: &[Node], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let linked = nodes.iter().all(|n| {
            n.status()
                .is_ok_and(|s| s.peers.iter().any(|p| p.state == "neighbor"))
        });
        if linked {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
