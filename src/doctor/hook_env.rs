//! Where the hook hands its reports: the socket and the spool it takes from the environment it
//! runs in (nix-daemon's under a daemon, the building user's on a single-user install), or
//! from the script `post-build-hook` names (the NixOS module writes one that exports both
//! when they are not the defaults), against the node's. A node whose `data-dir`, `socket` or `spool-dir` moved while the hook's
//! environment stayed would never hear from the hook: every build's hook would wait out its
//! deadline and spool where the node never looks, and nothing built would be shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use narmesh_proto::hook::{DEFAULT_SOCKET, DEFAULT_SPOOL};

use super::Outcome::{self, Fail, Pass, Skip};
use crate::config::Config;

/// `NAME=VALUE` entries of a `/proc/PID/environ`.
fn parse_environ(raw: &[u8]) -> HashMap<String, String> {
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Where nix-daemon listens: a daemon serves this host if it exists.
const DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// The nix-daemon that runs this host's builds: of the processes of this PID namespace (not a
/// container's) running `nix-daemon` or `nix daemon`, neither serving one client over stdio
/// (`--stdio`, a remote build's) nor a worker of another (whose parent is one: workers share
/// its environment, and one left from before a restart has the old one), the newest.
fn nix_daemon() -> Option<u32> {
    let own_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let daemons: HashMap<u32, (u32, u64)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = Path::new(args.first()?).file_name()?.to_str()?;
            let daemon = program == "nix-daemon"
                || (program == "nix" && args.get(1).is_some_and(|a| a == "daemon"));
            if !daemon
                || args.iter().any(|a| a == "--stdio")
                || std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != own_ns
            {
                return None;
            }
            // `pid (comm) state ppid ...`: the parent is the 4th field, the start the 22nd.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((
                pid,
                (fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?),
            ))
        })
        .collect();
    daemons
        .iter()
        .filter(|(_, (parent, _))| !daemons.contains_key(parent))
        .max_by_key(|(_, (_, started))| *started)
        .map(|(pid, _)| *pid)
}

/// The variables of the hook's that a `post-build-hook` script sets (`export NAME=value`
/// lines, as the NixOS module writes them); none for an executable that is not a script. An
/// error if it sets one in a way this check does not read.
fn script_sets(path: &Path) -> Result<HashMap<String, String>, String> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !text.starts_with(b"#!") {
        return Ok(HashMap::new());
    }
    let mut set = HashMap::new();
    for line in String::from_utf8_lossy(&text).lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if name == "NARMESH_SOCKET" || name == "NARMESH_SPOOL" {
            let value = shell_word(value).ok_or_else(|| {
                format!(
                    "{} sets {name} in a way this check does not read",
                    path.display()
                )
            })?;
            set.insert(name.to_owned(), value);
        }
    }
    Ok(set)
}

/// A shell word of plain characters, single-quoted parts (what `lib.escapeShellArg` makes),
/// double-quoted parts without expansions, and backslash escapes; `None` for anything the
/// shell would expand or split.
fn shell_word(word: &str) -> Option<String> {
    let (mut out, mut chars) = (String::new(), word.chars());
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '$' | '`' | '\\' => return None,
                    c => out.push(c),
                }
            },
            '\\' => out.push(chars.next()?),
            c if c.is_ascii_alphanumeric() || ",._+:@%/-".contains(c) => out.push(c),
            _ => return None,
        }
    }
    Some(out)
}

/// The same directory entry, or the same name where there is none yet.
fn same(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The hook's socket and spool in the environment of process `of` (else of the running
/// nix-daemon, else of this command where no daemon serves the host), as the
/// `post-build-hook` script (if it is one) sets them, against the node's.
pub(super) fn check(cfg: &Config, of: Option<u32>, hook: Option<&Path>) -> Outcome {
    let sets = match hook.map(script_sets).transpose() {
        Ok(sets) => sets.unwrap_or_default(),
        Err(e) => return Skip(e),
    };
    let (mut whose, mut env) = match of
        .map(|p| (p, true))
        .or_else(|| nix_daemon().map(|p| (p, false)))
    {
        Some((pid, asked)) => match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(raw) => (
                format!("the environment of process {pid}"),
                parse_environ(&raw),
            ),
            Err(e) if asked => {
                return Fail(
                    format!("reading the environment of process {pid}: {e}"),
                    "name the process the hook runs under (nix-daemon) with --hook-env-of, \
                     and run doctor as root"
                        .into(),
                );
            }
            Err(e) => {
                return Skip(format!(
                    "cannot read nix-daemon's environment (process {pid}): {e}; run doctor as \
                     root"
                ));
            }
        },
        None if Path::new(DAEMON_SOCKET).exists() => {
            return Skip(format!(
                "a nix-daemon serves this host ({DAEMON_SOCKET}) but none of its processes \
                 can be read here: run doctor as root, or name it with --hook-env-of"
            ));
        }
        None => (
            "this command's environment".to_owned(),
            std::env::vars().collect(),
        ),
    };
    if !sets.is_empty() {
        whose = format!(
            "{whose} and as {} sets them",
            hook.unwrap_or(Path::new("")).display()
        );
        env.extend(sets);
    }
    let get = |name: &str, default: &str| {
        env.get(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| default.into())
    };
    let socket = get("NARMESH_SOCKET", DEFAULT_SOCKET);
    let spool = get("NARMESH_SPOOL", DEFAULT_SPOOL);
    let (mut wrong, mut set) = (Vec::new(), Vec::new());
    if !same(&socket, &cfg.socket) {
        wrong.push(format!(
            "connects to {} but the node listens on {}",
            socket.display(),
            cfg.socket.display()
        ));
        set.push(format!("NARMESH_SOCKET={}", cfg.socket.display()));
    }
    let node_spool = cfg.spool_dir();
    if !same(&spool, &node_spool) {
        wrong.push(format!(
            "spools to {} but the node takes in {}",
            spool.display(),
            node_spool.display()
        ));
        set.push(format!("NARMESH_SPOOL={}", node_spool.display()));
    }
    if wrong.is_empty() {
        return Pass(format!(
            "in {whose}, the hook connects to {} and spools to {}, as the node expects",
            socket.display(),
            spool.display()
        ));
    }
    Fail(
        format!("in {whose}, the hook {}", wrong.join(", and ")),
        format!(
            "give the hook `{}` in that environment (under nix-daemon: `systemctl edit \
             nix-daemon`, `Environment=` lines under [Service], then restart it), or set the \
             node's `socket` and `spool-dir` to the hook's",
            set.join(" ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_script_is_read_for_the_variables_it_exports() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("hook");
        std::fs::write(
            &script,
            "#!/bin/sh\nexport NARMESH_SOCKET=/run/narmesh/other.sock\n\
             export NARMESH_SPOOL='/var/lib/narmesh/other '\\''spool'\nexec /bin/narmesh-hook\n",
        )
        .unwrap();
        let set = script_sets(&script).unwrap();
        assert_eq!(set["NARMESH_SOCKET"], "/run/narmesh/other.sock");
        assert_eq!(set["NARMESH_SPOOL"], "/var/lib/narmesh/other 'spool");
        std::fs::write(&script, "#!/bin/sh\nNARMESH_SPOOL=$HOME/spool exec hook\n").unwrap();
        assert!(
            script_sets(&script).is_err(),
            "an expansion is not guessed at"
        );
        std::fs::write(&script, b"\x7fELF\x02NARMESH_SOCKET=/x\n").unwrap();
        assert!(
            script_sets(&script).unwrap().is_empty(),
            "a binary sets nothing"
        );
        assert_eq!(shell_word("a\\ b").as_deref(), Some("a b"));
        assert_eq!(shell_word("\"/a b\"/c").as_deref(), Some("/a b/c"));
        assert_eq!(shell_word("\"$HOME/spool\""), None);
        assert_eq!(shell_word("'unterminated"), None);
        assert_eq!(shell_word("a;b"), None);
    }

    /// The newest nix-daemon of this PID namespace is found, not a newer one serving a remote
    /// build over stdio, and its environment is read (shells named so).
    #[test]
    fn the_newest_nix_daemon_is_found() {
        use std::os::unix::process::CommandExt as _;
        let spawn = |extra: &[&str]| {
            std::process::Command::new("sh")
                .arg0("/run/current-system/sw/bin/nix-daemon")
                // Not the shell's last command: it stays, named so, with its arguments.
                .args(["-c", "sleep 30; :", "sh"])
                .args(extra)
                .env("NARMESH_SPOOL", "/x/spool")
                .spawn()
                .unwrap()
        };
        let mut daemon = spawn(&[]);
        // Start times are counted in ticks of 10 ms.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut remote = spawn(&["--stdio"]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let found = nix_daemon();
        let env = std::fs::read(format!("/proc/{}/environ", daemon.id())).unwrap();
        for c in [&mut daemon, &mut remote] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(found, Some(daemon.id()));
        assert_eq!(
            parse_environ(&env).get("NARMESH_SPOOL").map(String::as_str),
            Some("/x/spool")
        );
    }

    #[test]
    fn an_environ_is_split_into_its_entries() {
        let env = parse_environ(b"A=1\0NARMESH_SPOOL=/x/spool\0B=a=b\0junk\0\0");
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            env.get("NARMESH_SPOOL").map(String::as_str),
            Some("/x/spool")
        );
        assert_eq!(env.get("B").map(String::as_str), Some("a=b"));
        assert_eq!(env.len(), 3);
    }
}
