//! `narmesh doctor`: checks a running host the way an operator would, one line per check,
//! pass or fail with the fix. It reads the node's config and `nix.conf` and asks the node
//! itself (status over the socket); the bucket is checked with the configured settings and
//! the credentials of this process's environment (or `--environment-file`, the service's).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use narmesh_proto::control::{Request, Response, StatusReport};

use crate::client::Client;
use crate::config::Config;

mod hook_env;

/// Where a NixOS host and the install guide put the node's config.
pub const DEFAULT_CONFIG: &str = "/etc/narmesh.toml";

/// `narmesh doctor` flags.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The node's config (default: `NARMESH_CONFIG`, else /etc/narmesh.toml if it
    /// exists, else the built-in defaults with `NARMESH_SOCKET` and `NARMESH_SPOOL`, as
    /// `serve` takes them without a config file).
    #[arg(long, short, env = "NARMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The Nix configuration the host's builds and substitutions use.
    #[arg(long, default_value = "/etc/nix/nix.conf")]
    pub nix_conf: PathBuf,
    /// The user the hook runs as: root under nix-daemon, the building user on a single-user
    /// install.
    #[arg(long, default_value = "root")]
    pub hook_user: String,
    /// `KEY=VALUE` lines (the service's `EnvironmentFile`, e.g. S3 credentials) to check the
    /// bucket with.
    #[arg(long)]
    pub environment_file: Option<PathBuf>,
    /// The process whose environment the hook runs in, for the socket and spool it uses
    /// (`NARMESH_SOCKET`, `NARMESH_SPOOL`; default: the running nix-daemon, else this
    /// command's own environment, as on a single-user install).
    #[arg(long, value_name = "PID")]
    pub hook_env_of: Option<u32>,
}

/// One check's outcome.
enum Outcome {
    Pass(String),
    /// What is wrong, and the fix.
    Fail(String, String),
    /// Not applicable here.
    Skip(String),
}

use Outcome::{Fail, Pass, Skip};

/// Run every check, print one line each; an error if any failed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let config_path = args.config.clone().or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG);
        p.exists().then_some(p)
    });
    let cfg = match &config_path {
        Some(p) => Config::load(p)?,
        None => Config::without_file(),
    };
    cfg.validate()?;
    let nix_conf = NixConf::read(&args.nix_conf);
    let status = node_status(&cfg.socket);
    let mut checks: Vec<(&str, Outcome)> = Vec::new();
    checks.push((
        "node",
        match &status {
            Ok(s) => Pass(format!(
                "narmesh {} answers on {}",
                s.version,
                cfg.socket.display()
            )),
            Err(e) => Fail(
                format!("{e:#}"),
                "start the node (systemctl start narmesh) and see its log".into(),
            ),
        },
    ));
    checks.push(("problems", problems(status.as_ref().ok())));
    checks.push(("hook", hook(&args.nix_conf, &nix_conf)));
    checks.push((
        "hook-env",
        hook_env::check(
            &cfg,
            args.hook_env_of,
            nix_conf.get("post-build-hook").first().map(Path::new),
        ),
    ));
    checks.push(("socket", socket_access(&cfg, &args.hook_user)));
    let status = status.ok();
    checks.push((
        "substituter",
        substituter(&args.nix_conf, &nix_conf, status.as_ref()),
    ));
    checks.push((
        "keys",
        keys(&args.nix_conf, &nix_conf, &cfg, status.as_ref()),
    ));
    checks.push(("disk", disk(&cfg)));
    checks.extend(peers(&cfg, status.as_ref()));
    checks.push(("bucket", bucket(&cfg, args.environment_file.as_deref())));
    let mut failed = 0;
    for (name, outcome) in &checks {
        match outcome {
            Pass(what) => println!("ok    {name}: {what}"),
            Skip(why) => println!("skip  {name}: {why}"),
            Fail(what, fix) => {
                failed += 1;
                println!("FAIL  {name}: {what}\n      fix: {fix}");
            }
        }
    }
    if failed == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        anyhow::bail!("{failed} check(s) failed")
    }
}

/// What the node itself says is wrong now (`narmesh_problem` in its metrics).
fn problems(status: Option<&StatusReport>) -> Outcome {
    match status {
        None => Skip("the node does not answer".into()),
        Some(s) if s.problems.is_empty() => Pass("the node reports none".into()),
        Some(s) => Fail(
            s.problems.join("; "),
            "see `narmesh status` and the node's log (journalctl -u narmesh); each clears once \
             its cause is gone"
                .into(),
        ),
    }
}

/// The data dir's disk against `[store] min-free`: under it, no NAR from peers is kept.
fn disk(cfg: &Config) -> Outcome {
    let floor = cfg.store.min_free.0;
    match crate::storage::free_space(&cfg.data_dir) {
        None => Skip(format!(
            "cannot ask {} for its free space (no node has run yet?)",
            cfg.data_dir.display()
        )),
        Some(free) => match crate::storage::under_floor(&cfg.data_dir, free, floor) {
            Some(what) => Fail(
                what,
                "free space on that disk, or lower [store] min-free".into(),
            ),
            None => Pass(format!(
                "{} MiB free on the data dir's disk, above [store] min-free ({} MiB)",
                free >> 20,
                floor >> 20
            )),
        },
    }
}

fn node_status(socket: &Path) -> anyhow::Result<StatusReport> {
    match Client::connect(socket)?.call(Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// The settings of a `nix.conf` that matter here (`extra-` values appended, `include`s read).
#[derive(Default)]
struct NixConf {
    values: HashMap<String, Vec<String>>,
    error: Option<String>,
}

impl NixConf {
    fn read(path: &Path) -> Self {
        let mut conf = NixConf::default();
        if let Err(e) = conf.read_file(path, 0) {
            conf.error = Some(format!("reading {}: {e}", path.display()));
        }
        conf
    }

    fn read_file(&mut self, path: &Path, depth: u32) -> std::io::Result<()> {
        let text = std::fs::read_to_string(path)?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(rest) = line
                .strip_prefix("!include ")
                .or_else(|| line.strip_prefix("include "))
            {
                let inc = path.parent().unwrap_or(Path::new("/")).join(rest.trim());
                if depth < 8 {
                    let _ = self.read_file(&inc, depth + 1);
                }
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.split_whitespace().map(str::to_owned));
            match key.strip_prefix("extra-") {
                Some(k) => self.values.entry(k.to_owned()).or_default().extend(value),
                None => {
                    self.values.insert(key.to_owned(), value.collect());
                }
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> &[String] {
        self.values.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn hook(path: &Path, conf: &NixConf) -> Outcome {
    let fix = format!(
        "set `post-build-hook = /path/to/narmesh-hook` in {} and restart nix-daemon",
        path.display()
    );
    if let Some(e) = &conf.error {
        return Fail(e.clone(), fix);
    }
    let Some(hook) = conf.get("post-build-hook").first() else {
        return Fail(format!("{} names no post-build-hook", path.display()), fix);
    };
    match std::fs::metadata(hook) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
            // How it starts is about half of what a build waits for; any kind works.
            use crate::linkage::Linkage;
            let how = match crate::linkage::of_file(Path::new(hook)) {
                Ok(Linkage::Static) => "statically linked".to_string(),
                Ok(Linkage::Dynamic) => "dynamically linked: starts slower under load than the \
                                         static build (README, \"The binaries\")"
                    .to_string(),
                Ok(Linkage::Script) => "a script: a shell starts before the hook".to_string(),
                Ok(Linkage::Unknown) => "not an ELF executable this check reads".to_string(),
                Err(e) => format!("unreadable: {e}"),
            };
            Pass(format!("post-build-hook = {hook} ({how})"))
        }
        Ok(_) => Fail(format!("post-build-hook {hook} is not executable"), fix),
        Err(e) => Fail(format!("post-build-hook {hook}: {e}"), fix),
    }
}

/// A user's uid and groups, from /etc/passwd and /etc/group.
fn user_ids(name: &str) -> Option<(u32, Vec<u32>)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let (uid, gid): (u32, u32) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && (f[0] == name || f[2] == name))
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })?;
    let mut groups = vec![gid];
    let user = passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| name.to_owned());
    if let Ok(group) = std::fs::read_to_string("/etc/group") {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3
                && f[3].split(',').any(|m| m == user)
                && let Ok(g) = f[2].parse()
            {
                groups.push(g);
            }
        }
    }
    Some((uid, groups))
}

/// Whether `uid` (in `groups`) may do `want` (rwx bits, as 0o7) on a file of this metadata.
fn allowed(m: &std::fs::Metadata, uid: u32, groups: &[u32], want: u32) -> bool {
    let mode = m.mode();
    let bits = if uid == 0 {
        return true;
    } else if m.uid() == uid {
        mode >> 6
    } else if groups.contains(&m.gid()) {
        mode >> 3
    } else {
        mode
    } & 0o7;
    bits & want == want
}

fn socket_access(cfg: &Config, user: &str) -> Outcome {
    let sock = &cfg.socket;
    let fix_group = "set `socket-group` in the node's config to a group of the hook's user (or run the hook as root, as nix-daemon does)";
    let Some((uid, groups)) = user_ids(user) else {
        return Fail(
            format!("no user {user:?} in /etc/passwd"),
            "name the user the hook runs as with --hook-user".into(),
        );
    };
    let meta = match std::fs::metadata(sock) {
        Ok(m) => m,
        Err(e) => {
            return Fail(
                format!("{}: {e}", sock.display()),
                "start the node; check `socket` in its config".into(),
            );
        }
    };
    for dir in sock.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir)
            && !allowed(&m, uid, &groups, 0o1)
        {
            return Fail(
                format!("{user} cannot enter {}", dir.display()),
                fix_group.into(),
            );
        }
    }
    if allowed(&meta, uid, &groups, 0o2) {
        Pass(format!("{user} may write to {}", sock.display()))
    } else {
        Fail(
            format!(
                "{user} may not write to {} (mode {:o}, group {})",
                sock.display(),
                meta.mode() & 0o777,
                meta.gid()
            ),
            fix_group.into(),
        )
    }
}

fn substituter(path: &Path, conf: &NixConf, status: Option<&StatusReport>) -> Outcome {
    let Some(s) = status else {
        return Skip("needs the node".into());
    };
    let urls: Vec<String> = s
        .http_listen
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    let subs = conf.get("substituters");
    if subs
        .iter()
        .any(|u| urls.iter().any(|w| u.trim_end_matches('/') == w))
    {
        Pass(format!(
            "the local Nix substitutes from {}",
            urls.join(", ")
        ))
    } else {
        Fail(
            format!(
                "{} lists none of {} in substituters",
                path.display(),
                urls.join(", ")
            ),
            format!(
                "add `extra-substituters = {}` to {}",
                urls.first().cloned().unwrap_or_default(),
                path.display()
            ),
        )
    }
}

fn keys(path: &Path, conf: &NixConf, cfg: &Config, status: Option<&StatusReport>) -> Outcome {
    let Some(s) = status else {
        return Skip("needs the node".into());
    };
    let trusted = conf.get("trusted-public-keys");
    let mut wanted = vec![s.public_key.clone()];
    wanted.extend(cfg.trusted_public_keys.iter().cloned());
    let missing: Vec<&String> = wanted.iter().filter(|k| !trusted.contains(k)).collect();
    if missing.is_empty() {
        Pass(format!(
            "the local Nix trusts this node's key and the {} key(s) it accepts",
            cfg.trusted_public_keys.len()
        ))
    } else {
        let names: Vec<&str> = missing
            .iter()
            .map(|k| k.split(':').next().unwrap_or(""))
            .collect();
        Fail(
            format!(
                "{} does not trust {} (narinfos the node serves are signed with them)",
                path.display(),
                names.join(", ")
            ),
            format!(
                "add `extra-trusted-public-keys = {}` to {}",
                missing
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                path.display()
            ),
        )
    }
}

fn peers(cfg: &Config, status: Option<&StatusReport>) -> Vec<(&'static str, Outcome)> {
    if !cfg.mesh.enabled {
        return vec![("peers", Skip("the mesh is off".into()))];
    }
    let Some(s) = status else {
        return vec![("peers", Skip("needs the node".into()))];
    };
    if cfg.mesh.peers.is_empty() {
        return vec![("peers", Skip("no static peers configured".into()))];
    }
    cfg.mesh
        .peers
        .iter()
        .map(|addr| {
            let id = addr.split('@').next().unwrap_or(addr);
            let fix = format!(
                "check that {addr} runs, that UDP {} is open between the hosts, and that each names the other in `peers` or `allowed-peers`",
                addr.rsplit(':').next().unwrap_or("")
            );
            let outcome = match s.peers.iter().find(|p| p.endpoint_id == id) {
                None => Fail(format!("{addr} is not known to the node"), fix),
                Some(p) if p.state == "unreachable" => Fail(
                    format!("{addr}: catch-up fails (unreachable, or it does not allow this node)"),
                    fix,
                ),
                Some(p) => match p.last_sync_secs_ago {
                    Some(ago) => Pass(format!("{addr}: {}, caught up {ago} s ago", p.state)),
                    None => Fail(format!("{addr}: never caught up with"), fix),
                },
            };
            ("peer", outcome)
        })
        .collect()
}

fn bucket(cfg: &Config, env_file: Option<&Path>) -> Outcome {
    let Some(s3) = &cfg.mirror.s3 else {
        return Skip("this node mirrors to no bucket".into());
    };
    if let Some(f) = env_file {
        match std::fs::read_to_string(f) {
            Ok(text) => {
                for line in text.lines().map(str::trim) {
                    if let Some((k, v)) = line.split_once('=')
                        && !k.trim().starts_with('#')
                    {
                        // SAFETY: single-threaded here; no other thread reads the environment.
                        unsafe { std::env::set_var(k.trim(), v.trim().trim_matches('"')) };
                    }
                }
            }
            Err(e) => {
                return Fail(
                    format!("{}: {e}", f.display()),
                    "pass the service's EnvironmentFile".into(),
                );
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Fail(format!("{e}"), "".into()),
    };
    let result = rt.block_on(async {
        let b = crate::mirror::s3::Bucket::connect(s3).await;
        tokio::time::timeout(Duration::from_secs(20), b.check()).await
    });
    let fix = "check [mirror.s3] (bucket, endpoint, region) and the credentials the service gets (its EnvironmentFile: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)";
    match result {
        Ok(Ok(())) => Pass(format!(
            "bucket {} answers with these credentials",
            s3.bucket
        )),
        Ok(Err(e)) => Fail(format!("bucket {}: {e}", s3.bucket), fix.into()),
        Err(_) => Fail(
            format!("bucket {}: no answer within 20 s", s3.bucket),
            fix.into(),
        ),
    }
}
