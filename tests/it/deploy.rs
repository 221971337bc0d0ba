//! The deployment files are right: the NixOS module (nix/module.nix) evaluated with nixpkgs'
//! module system, the unit NixOS would write for it and the plain unit (deploy/systemd/) pass
//! `systemd-analyze verify` and `security`, the sysusers snippet passes `systemd-sysusers`, and
//! the configuration files pass `narmesh check-config`. tests/nixos/verify-units.sh does the
//! checking (runnable by hand; it says what it checks); these tests run it with our binary.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::{Nix, bin, require, wait_until};

/// Run `tests/nixos/verify-units.sh PART` with the built `narmesh`; panic with its output unless
/// every check passed.
fn verify_units(part: &str) {
    for tool in ["bash", "systemd-analyze", "systemd-sysusers", "jq"] {
        require(tool);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nixos/verify-units.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(part)
        .env("NARMESH_BIN", bin("narmesh"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {part} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    assert!(
        stdout.contains(&format!("PASS: all checks ({part})")),
        "{} {part} did not report success:\n{stdout}\n{stderr}",
        script.display()
    );
}

/// The module for a typical and a minimal host: its unit, its settings, its assertions.
#[test]
fn nixos_module_units_and_config_pass() {
    Nix::V2_26.require();
    verify_units("module");
}

/// deploy/systemd/narmesh.service, narmesh.sysusers and deploy/narmesh.toml.example.
#[test]
fn plain_systemd_unit_passes() {
    verify_units("plain");
}

/// The units are `Type=notify`: the node says READY=1 on `NOTIFY_SOCKET` once its socket and
/// HTTP cache answer, so `systemctl start` returns only when the node can be reached, and
/// STOPPING=1 once it stops.
#[test]
fn the_node_tells_systemd_when_it_is_ready() {
    let t = tempfile::tempdir().unwrap();
    let notify = t.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut node = crate::node_harness::Node::new(&t.path().join("node"), &t.path().join("store"));
    node.env
        .push(("NOTIFY_SOCKET".into(), notify.display().to_string()));
    // Started without waiting for it: what READY=1 promises is checked at once, no retry.
    node.spawn();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from the node");
    assert_eq!(&buf[..n], b"READY=1");
    let status = node
        .try_status()
        .expect("ready means answering on the socket");
    let (code, _, _) = crate::harness::http(&status.http_listen[0], "GET", "/nix-cache-info", &[]);
    assert_eq!(code, 200, "ready means the HTTP cache answers");
    // And it says when it stops (systemd's watchdog is off from then on, its stop timeout
    // applies).
    node.stop();
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the node");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// Under systemd's watchdog (`WatchdogSec=`, here 10 s) the node says WATCHDOG=1 every quarter of
/// it while each of its runtimes runs tasks and its database writes end. Once one is blocked for
/// good (a blocking call in a task: the HTTP cache's thread in one run, the front's in another;
/// a database write that never ends, holding up every other, in a third), it sees the stall
/// within half the interval and from then on says nothing, so systemd restarts it; its log
/// names what stalled, and what still answers says what is wrong (the status over the socket,
/// `/metrics`).
#[test]
fn the_watchdog_is_told_only_while_nothing_has_stalled() {
    use crate::trust::metric;
    use std::time::{Duration, Instant};
    for (fault, runtime) in [
        ("http.hangs", "http"),
        ("front.hangs", "front"),
        ("db.write-hangs", "database"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let notify = t.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        let mut node =
            crate::node_harness::Node::new(&t.path().join("node"), &t.path().join("store"));
        node.env.extend([
            ("NOTIFY_SOCKET".into(), notify.display().to_string()),
            ("WATCHDOG_USEC".into(), "10000000".into()),
            ("NARMESH_TEST_FAULT".into(), format!("{fault}:1")),
        ]);
        node.start();
        // Every message until `until`, with the time it came.
        let read_until = |until: Instant| {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                match sock.recv(&mut buf) {
                    Ok(n) => got.push((Instant::now(), buf[..n].to_vec())),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                    Err(e) => panic!("notify socket: {e}"),
                }
            }
            got
        };
        let pings = |got: &[(Instant, Vec<u8>)]| {
            got.iter()
                .filter(|(_, m)| m.as_slice() == b"WATCHDOG=1")
                .count()
        };
        let before = read_until(Instant::now() + Duration::from_secs(8));
        let said = if runtime == "database" {
            "watchdog: the database has stalled: its writes have been in flight for".to_owned()
        } else {
            format!("watchdog: the {runtime} runtime has run nothing")
        };
        assert!(
            !node.log().contains("has run nothing") && !node.log().contains("has stalled"),
            "a stall before any was made:\n{}",
            node.log()
        );
        assert!(
            pings(&before) >= 3,
            "{runtime}: told every 2.5 s while all runs: {:?}",
            before
                .iter()
                .map(|(_, m)| String::from_utf8_lossy(m))
                .collect::<Vec<_>>()
        );
        // Block the runtime for good (the hook, which waits 300 ms for its answer and then
        // spools, on a thread of its own too).
        if runtime == "http" {
            let addr = node.http.clone();
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(&addr).unwrap();
                use std::io::{Read as _, Write as _};
                let _ = c.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n");
                let _ = c.read_to_end(&mut Vec::new());
            });
        } else if runtime == "front" {
            let (socket, spool) = (node.socket(), node.spool());
            std::thread::spawn(move || {
                let drv = "/nix/store/00000000000000000000000000000000-hang.drv";
                crate::harness::run_hook(&socket, &spool, drv, "", 300);
            });
        } else {
            // A pin's write (the front answers it from a blocking thread of its own: the
            // runtimes all still run). `narmesh pin` gives up after its own deadline.
            let socket = node.socket();
            std::thread::spawn(move || {
                let _ = std::process::Command::new(crate::harness::bin("narmesh"))
                    .args(["pin", "/nix/store/00000000000000000000000000000000-pinned"])
                    .env("NARMESH_SOCKET", &socket)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            });
        }
        wait_until(30, "the watchdog to see the stall", || {
            node.log().contains(&said)
        });
        // What was said before the stall was seen, read; from then on, nothing (over two
        // intervals of telling).
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        while sock.recv(&mut buf).is_ok() {}
        sock.set_nonblocking(false).unwrap();
        let silent = read_until(Instant::now() + Duration::from_secs(6));
        assert_eq!(
            pings(&silent),
            0,
            "{runtime}: still told the node is alive after it stalled"
        );
        let (part, problem) = if runtime == "database" {
            ("database", "its writes have been in flight for".to_owned())
        } else {
            (
                "runtime",
                format!("the {runtime} runtime has run nothing for"),
            )
        };
        if runtime != "front" {
            let status = node.status();
            assert!(
                status
                    .problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{part}: ")) && p.contains(&problem)),
                "the status says so: {:?}",
                status.problems
            );
        }
        // `/metrics` says so too (the cache serves it; 0 where a line is missing).
        if runtime != "http" {
            assert_eq!(
                metric(&node, &format!("narmesh_problem{{part=\"{part}\"}} ")),
                1.0
            );
        }
        if runtime == "front" {
            let lag = metric(&node, "narmesh_runtime_lag_seconds{runtime=\"front\"} ");
            assert!(lag >= 5.0, "the front's lag grows: {lag}");
        }
        if runtime == "database" {
            let stalled = metric(&node, "narmesh_database_stall_seconds ");
            assert!(stalled >= 5.0, "the stall grows: {stalled}");
            // The runtimes all ran on: only the database stalled, and the log names the write.
            let log = node.log();
            assert!(!log.contains("has run nothing"), "{log}");
            assert!(
                log.contains("(the one holding the lock began at src/db/storage.rs:"),
                "{log}"
            );
        }
        node.kill9();
    }
}

/// `check-config` of an empty file prints every default, and they are the ones the README's
/// configuration block shows (where it shows a default, not an example); what it prints is
/// itself a config file that prints the same. An unknown key or a bad value is refused with
/// its name, and nothing printed. `completions` and `man` write what they promise.
#[test]
fn check_config_prints_the_readmes_defaults_and_the_cli_writes_its_docs() {
    let t = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let f = t.path().join("c.toml");
        std::fs::write(&f, text).unwrap();
        Command::new(bin("narmesh"))
            .arg("check-config")
            .arg(&f)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = check("");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let again = check(&printed);
    assert_eq!(
        String::from_utf8(again.stdout).unwrap(),
        printed,
        "a fixpoint"
    );
    let defaults: toml::Table = printed.parse().unwrap();

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|s| s.split("```toml\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the README's configuration block");
    let shown: toml::Table = block.parse().expect("the README's block is TOML");
    // Keys the README shows as examples (its comment names the default), not defaults.
    let examples = [
        "socket-group",
        "spool-dir",
        "secret-key-file",
        "key-name",
        "mesh.peers",
        "mesh.max-nar-size",
        "mesh.serve-rate",
        "mesh.bulk-listen",
    ];
    let mut compared = 0;
    for (section, value) in &shown {
        let keys: Vec<(String, &toml::Value, Option<&toml::Value>)> = match value {
            toml::Value::Table(t) if section == "mirror" => {
                // [mirror.s3] is all examples: the mirror is off by default.
                assert!(t.contains_key("s3"));
                assert!(defaults["mirror"].as_table().unwrap().get("s3").is_none());
                continue;
            }
            toml::Value::Table(t) => t
                .iter()
                .map(|(k, v)| {
                    let d = defaults
                        .get(section)
                        .and_then(|s| s.as_table())
                        .and_then(|s| s.get(k));
                    (format!("{section}.{k}"), v, d)
                })
                .collect(),
            v => vec![(section.clone(), v, defaults.get(section))],
        };
        for (key, readme_value, default) in keys {
            if examples.contains(&key.as_str()) {
                continue;
            }
            assert_eq!(
                Some(readme_value),
                default,
                "{key}: the README shows {readme_value}, check-config prints {default:?}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 20, "only {compared} defaults compared");

    for (bad, named) in [
        ("[http]\nidle-secs = 0\n", "idle-secs"),
        ("[store]\nmax-size = \"lots\"\n", "max-size"),
        ("[mesh]\nno-such-key = 1\n", "no-such-key"),
    ] {
        let out = check(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was taken");
        assert!(out.stdout.is_empty(), "{bad:?}: printed something");
        assert!(err.contains(named), "{bad:?}: {err}");
    }

    let out = Command::new(bin("narmesh"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("complete -F") && script.contains("check-config"));
    let man = t.path().join("man");
    let out = Command::new(bin("narmesh"))
        .arg("man")
        .arg(&man)
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in ["narmesh.1", "narmesh-serve.1", "narmesh-doctor.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} is a man page");
    }
}

/// Every key of `t`, nested tables flattened (`mirror.s3.bucket`), with its value.
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            v => out.push((key, v.clone())),
        }
    }
}

/// The README's configuration block and deploy/narmesh.toml.example (what an operator copies)
/// name every key the node has (what `check-config` prints, with a mirror configured, and the
/// README's examples of keys without a default); the example's commented-out values are the
/// defaults.
#[test]
fn the_readme_and_the_example_config_name_every_key_and_the_example_its_defaults() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("c.toml");
    std::fs::write(&f, "[mirror.s3]\nbucket = \"b\"\n").unwrap();
    let out = Command::new(bin("narmesh"))
        .arg("check-config")
        .arg(&f)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    let mut defaults = Vec::new();
    flatten("", &printed, &mut defaults);
    defaults.retain(|(k, _)| k != "mirror.s3.bucket");
    assert!(defaults.len() >= 30, "{defaults:?}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block: toml::Table = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|s| s.split("```toml\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the README's configuration block")
        .parse()
        .unwrap();
    let mut shown = Vec::new();
    flatten("", &block, &mut shown);
    for (key, _) in &defaults {
        assert!(
            shown.iter().any(|(k, _)| k == key),
            "the README's configuration block lacks {key}"
        );
    }

    // The example: `#key = value` is a default left as it is; `[section]` sets where keys go.
    let example = std::fs::read_to_string(root.join("deploy/narmesh.toml.example")).unwrap();
    let (mut section, mut named, mut commented) = (String::new(), Vec::new(), 0);
    for line in example.lines() {
        if let Some(s) = line.strip_prefix('[') {
            section = format!("{}.", s.trim_end_matches(']'));
            continue;
        }
        let (is_default, text) = match line.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((key, value)) = text.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            continue;
        }
        let key = format!("{section}{key}");
        named.push(key.clone());
        let Some((_, default)) = defaults.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        if is_default {
            let value: toml::Table = format!("v = {value}").parse().expect("a TOML value");
            assert_eq!(
                &value["v"], default,
                "{key}: the example shows {value} as the default, check-config prints {default}"
            );
            commented += 1;
        }
    }
    // Every key the node has, also those without a default the README shows as examples.
    for (key, _) in defaults.iter().chain(&shown) {
        assert!(
            named.contains(key),
            "deploy/narmesh.toml.example lacks {key}"
        );
    }
    assert!(commented >= 25, "only {commented} defaults compared");
}

/// A node given no key makes one, named `<hostname>-1` (README: `key-name`'s default); a host
/// name that cannot name a Nix key (a `:` or a space in it) gives `narmesh-1`, never a key Nix
/// would refuse. Each node runs in a UTS namespace of its own, with its own host name.
#[test]
fn the_key_a_node_makes_is_named_after_its_host() {
    require("unshare");
    for (host, name) in [
        ("builder-7.farm", "builder-7.farm-1"),
        ("bad:name", "narmesh-1"),
        ("two words", "narmesh-1"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let conf = d.join("narmesh.toml");
        std::fs::write(
            &conf,
            format!(
                "data-dir = {:?}\nsocket = {:?}\nspool-dir = {:?}\n[store]\nmin-free = \
                 \"64MiB\"\n[http]\nlisten = [\"127.0.0.1:0\"]\n[mesh]\nenabled = false\n",
                d.join("data"),
                d.join("node.sock"),
                d.join("spool"),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("node.log")).unwrap();
        let mut child = Command::new("unshare")
            .args([
                "-u",
                "sh",
                "-c",
                "printf %s \"$0\" > /proc/sys/kernel/hostname && exec \"$@\"",
                host,
            ])
            .arg(bin("narmesh"))
            .args(["serve", "--config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let key = d.join("data/secret-key");
        let started = std::time::Instant::now();
        while !key.exists() && started.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&key).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
            panic!("no key made for host {host:?} ({e}):\n{log}")
        });
        assert!(
            text.starts_with(&format!("{name}:")),
            "host {host:?}: key named {:?}, not {name:?}",
            text.split(':').next()
        );
        let key: narmesh::nix::SecretKey = text.parse().expect("a key Nix takes");
        assert_eq!(key.name(), name);
    }
}
