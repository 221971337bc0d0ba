//! The `narmesh` command line: argument parsing and one function per subcommand.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

use narmesh_proto::control::{Request, Response};

use crate::client::Client;
use crate::config::{self, Config};
use crate::nix::{self, SecretKey};

/// narmesh: share every Nix build across your build hosts, without slowing the build.
#[derive(Debug, Parser)]
#[command(name = "narmesh", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a Nix binary cache signing key pair (like `nix-store --generate-binary-cache-key`).
    Keygen {
        /// Key name, conventionally `<host>-1`.
        name: String,
        /// Where to write the secret key (mode 0600).
        secret_file: PathBuf,
        /// Where to write the public key.
        public_file: PathBuf,
    },
    /// Write the NAR serialization of PATH to stdout (like `nix-store --dump`).
    Nar {
        /// A file, directory or symlink.
        path: PathBuf,
    },
    /// Run the node: take hook reports, sign and store NARs, serve them over HTTP.
    Serve(ServeArgs),
    /// Hand store paths (and their closures) to the running node, showing progress.
    Push {
        #[command(flatten)]
        node: NodeArgs,
        /// Return once the node has queued the paths, without waiting for them to be signed.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Store paths (`/nix/store/...`, or links to them such as `./result`).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Benchmark replication on this machine: N node processes on loopback, a workload fed
    /// through the real hook, optionally an S3 mirror, beside baselines from the same run.
    Bench(crate::bench::BenchArgs),
    /// Keep the closures of store paths from eviction (`--remove` to stop keeping them).
    Pin {
        #[command(flatten)]
        node: NodeArgs,
        /// Stop keeping them.
        #[arg(long)]
        remove: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the running node's state.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and print it resolved, every default filled in.
    CheckConfig {
        /// The TOML file `narmesh serve --config` would read.
        file: PathBuf,
    },
    /// Check this host the way an operator would: the node, the hook, the socket, keys,
    /// peers, the bucket and the local Nix's settings; one line each, with the fix.
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (`narmesh.1` and one per subcommand) into a directory.
    Man {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// How a command finds the running node's socket: `--socket`, else the `socket` of the
/// config file (`--config`, or `NARMESH_CONFIG`), else `NARMESH_SOCKET` (the hook's variable),
/// else the `socket` of /etc/narmesh.toml if there is one, else /run/narmesh/narmesh.sock.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeArgs {
    /// The node's configuration file (its `socket` is used).
    #[arg(long, short, env = "NARMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The node's Unix socket (overrides the config file).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl NodeArgs {
    /// The socket to talk to, by the precedence above.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            return Ok(Config::load(c)?.socket);
        }
        if let Some(s) = std::env::var_os("NARMESH_SOCKET").filter(|s| !s.is_empty()) {
            return Ok(s.into());
        }
        let host = Path::new(crate::doctor::DEFAULT_CONFIG);
        if host.exists() {
            return Ok(Config::load(host)?.socket);
        }
        Ok(PathBuf::from(config::DEFAULT_SOCKET))
    }
}

/// `narmesh serve` flags; each overrides the config file. Precedence for the socket and the
/// spool: the flag, else the config file, else (only without `--config`) `NARMESH_SOCKET` /
/// `NARMESH_SPOOL`, else the defaults: a variable exported for the hook never overrides what
/// the config file says.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration (every key optional; `NARMESH_CONFIG` if not given).
    #[arg(long, short, env = "NARMESH_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The Unix socket (else the config file's, else `NARMESH_SOCKET` without a config file).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where the hook spools reports while the node is down (else as for `--socket`, with
    /// `NARMESH_SPOOL`).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    #[arg(long)]
    pub store_root: Option<PathBuf>,
    /// HTTP listen address (repeatable).
    #[arg(long)]
    pub http_listen: Vec<std::net::SocketAddr>,
    #[arg(long)]
    pub secret_key_file: Option<PathBuf>,
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen {
            name,
            secret_file,
            public_file,
        } => keygen(&name, &secret_file, &public_file),
        Command::Nar { path } => nar(&path),
        Command::Serve(args) => serve(args),
        Command::Push {
            node,
            no_wait,
            timeout,
            paths,
        } => push(&node.socket()?, &paths, no_wait, timeout),
        Command::Status { node, json } => status(&node.socket()?, json),
        Command::Pin {
            node,
            remove,
            paths,
        } => pin(&node.socket()?, &paths, !remove),
        Command::Bench(args) => crate::bench::run(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Doctor(args) => crate::doctor::run(args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "narmesh", &mut script);
            write_stdout(&script)
        }
        Command::Man { dir } => man(&dir),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::without_file(),
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    if let Some(d) = args.spool_dir {
        cfg.spool_dir = Some(d);
    }
    if let Some(r) = args.store_root {
        cfg.nix.store_root = r;
    }
    if !args.http_listen.is_empty() {
        cfg.http.listen = args.http_listen;
    }
    if let Some(k) = args.secret_key_file {
        cfg.secret_key_file = Some(k);
    }
    cfg.validate()?;
    crate::memory::start_trimming();
    // Everything but the front (hook acknowledgements, on a thread of its own) runs a little
    // below normal priority: the host's builds come first.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| crate::background::set_nice(5))
        .build()?;
    rt.block_on(crate::node::serve(cfg))
}

/// A store path named on the command line, following links such as `./result`.
fn store_path_arg(p: &Path) -> anyhow::Result<String> {
    let s = p.to_string_lossy();
    if s.starts_with(crate::nix::store_path::STORE_DIR) {
        return Ok(s.into_owned());
    }
    let target = fs::read_link(p)
        .with_context(|| format!("{}: not a store path nor a link to one", p.display()))?;
    Ok(target.to_string_lossy().into_owned())
}

fn push(socket: &Path, paths: &[PathBuf], no_wait: bool, timeout: u64) -> anyhow::Result<()> {
    let paths: Vec<String> = paths
        .iter()
        .map(|p| store_path_arg(p))
        .collect::<anyhow::Result<_>>()?;
    let mut client = Client::connect(socket)?;
    client.call(Request::Push {
        paths: paths.clone(),
    })?;
    if no_wait {
        eprintln!("queued {} path(s)", paths.len());
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(paths.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} paths signed and servable",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    loop {
        let done = match client.call(Request::Lookup {
            paths: paths.clone(),
        })? {
            Response::Known { recorded } => recorded.iter().filter(|r| **r).count(),
            other => anyhow::bail!("unexpected answer {other:?}"),
        };
        bar.set_position(done as u64);
        if done == paths.len() {
            bar.finish();
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bar.abandon();
            anyhow::bail!(
                "{} of {} path(s) not recorded after {timeout} s (see `narmesh status`)",
                paths.len() - done,
                paths.len()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn pin(socket: &Path, paths: &[PathBuf], pinned: bool) -> anyhow::Result<()> {
    let paths: Vec<String> = paths
        .iter()
        .map(|p| store_path_arg(p))
        .collect::<anyhow::Result<_>>()?;
    let n = paths.len();
    Client::connect(socket)?.call(Request::Pin { paths, pinned })?;
    eprintln!(
        "{} the closure(s) of {n} path(s)",
        if pinned { "pinned" } else { "unpinned" }
    );
    Ok(())
}

fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    let Response::Status(s) = client.call(Request::Status)? else {
        anyhow::bail!("unexpected answer to a status request");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("narmesh {}", s.version);
    println!("public key:      {}", s.public_key);
    println!("socket:          {}", s.socket);
    println!("http:            {}", s.http_listen.join(", "));
    println!("queue depth:     {}", s.queue_depth);
    println!(
        "paths recorded:  {} ({} forgotten: nobody held them any more)",
        s.paths_recorded, s.records_forgotten
    );
    println!("NAR bytes held:  {}", s.nar_bytes);
    let st = &s.storage;
    println!(
        "own paths:       {} ({} NAR bytes), served from the Nix store",
        st.own_paths, st.own_bytes
    );
    println!(
        "NAR files:       {} ({} of {} bytes cap), {} evicted",
        st.files, st.file_bytes, st.cap_bytes, st.evictions
    );
    println!("lost to Nix GC:  {}", st.gc_lost);
    for p in &s.problems {
        println!("problem:         {p}");
    }
    println!("ingest failures: {}", s.ingest_failures);
    println!("spool taken:     {}", s.spool_taken);
    println!("spool waiting:   {}", s.spool_waiting);
    println!("spool rejected:  {}", s.spool_rejected);
    if !s.endpoint_id.is_empty() {
        println!("endpoint id:     {}", s.endpoint_id);
        println!("peer address:    {}", s.peer_address);
        for p in &s.peers {
            let synced = p
                .last_sync_secs_ago
                .map(|s| format!("{s} s ago"))
                .unwrap_or_else(|| "never".into());
            println!(
                "peer {}  {}  cursor {}  synced {}",
                p.endpoint_id, p.state, p.cursor, synced
            );
        }
    }
    if let Some(m) = &s.mirror {
        println!("mirror:          s3 bucket {}", m.bucket);
        println!(
            "mirror lag:      {} path(s), {} NAR bytes",
            m.pending_paths, m.pending_bytes
        );
        println!(
            "mirror uploaded: {} path(s), {} bytes, {} bytes/s now",
            m.uploaded_paths, m.uploaded_bytes, m.upload_bytes_per_sec
        );
        println!("mirror failures: {}", m.failures);
        if let Some(e) = &m.last_error {
            println!("mirror error:    {e}");
        }
    }
    Ok(())
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(file)?;
    cfg.validate()?;
    write_stdout(cfg.to_toml()?.as_bytes())
}

/// Write to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    match io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn man(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(())
}

fn keygen(name: &str, secret_file: &Path, public_file: &Path) -> anyhow::Result<()> {
    let key = SecretKey::generate(name)?;
    crate::fsutil::write_atomic(secret_file, key.to_nix_string().as_bytes(), 0o600)
        .with_context(|| format!("writing the secret key to {}", secret_file.display()))?;
    crate::fsutil::write_atomic(public_file, key.public().to_string().as_bytes(), 0o644)
        .with_context(|| format!("writing the public key to {}", public_file.display()))?;
    Ok(())
}

fn nar(path: &Path) -> anyhow::Result<()> {
    let stdout = io::stdout().lock();
    match nix::nar::dump(path, stdout) {
        Ok(_) => Ok(()),
        Err(nix::nar::NarError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.into()),
    }
}
