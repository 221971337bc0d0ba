//! `narmesh doctor` on a healthy two-node mesh with an S3 mirror (every check passes), then
//! with each piece broken in turn: the right line fails, with its fix, and doctor exits 1.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{bin, wait_until};
use crate::node_harness::{Node, full_mesh};
use crate::s3_harness::{ACCESS_KEY, S3Server, SECRET_KEY};

/// A `nix.conf` as a host using the node would have it.
fn nix_conf(dir: &Path, node: &Node, hook: &Path, keys: &[String]) -> PathBuf {
    let http = &node.status().http_listen[0];
    let p = dir.join("nix.conf");
    std::fs::write(
        &p,
        format!(
            "build-users-group =\npost-build-hook = {}\nsubstituters = https://cache.nixos.org\nextra-substituters = http://{http}\ntrusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= {}\n",
            hook.display(),
            keys.join(" ")
        ),
    )
    .unwrap();
    p
}

struct Run {
    ok: bool,
    out: String,
}

fn doctor(node: &Node, nix_conf: &Path, env_file: Option<&Path>) -> Run {
    doctor_with(&node.dir.join("narmesh.toml"), nix_conf, env_file)
}

fn doctor_with(config: &Path, nix_conf: &Path, env_file: Option<&Path>) -> Run {
    doctor_args(config, nix_conf, env_file, &[])
}

/// A process standing for nix-daemon, in whose environment the hook runs; killed on drop.
struct HookEnv(std::process::Child);

impl HookEnv {
    fn with(vars: &[(&str, &Path)]) -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("600").env_clear();
        for (k, v) in vars {
            cmd.env(k, v);
        }
        HookEnv(cmd.spawn().unwrap())
    }

    /// The environment a hook needs for the node of `config`.
    fn of(config: &Path) -> Self {
        let cfg = narmesh::config::Config::load(config).unwrap();
        HookEnv::with(&[
            ("NARMESH_SOCKET", &cfg.socket),
            ("NARMESH_SPOOL", &cfg.spool_dir()),
        ])
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for HookEnv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Doctor, with the hook's environment right for `config` unless `extra` names another.
fn doctor_args(config: &Path, nix_conf: &Path, env_file: Option<&Path>, extra: &[&str]) -> Run {
    let mut cmd = Command::new(bin("narmesh"));
    cmd.arg("doctor");
    let hook_env = (!extra.contains(&"--hook-env-of")).then(|| HookEnv::of(config));
    if let Some(env) = &hook_env {
        cmd.arg("--hook-env-of").arg(env.pid());
    }
    cmd.args(extra)
        .arg("--config")
        .arg(config)
        .arg("--nix-conf")
        .arg(nix_conf)
        .env_remove("NARMESH_CONFIG")
        .env_remove("NARMESH_SOCKET");
    for (k, _) in crate::s3_harness::credentials_env("", "") {
        cmd.env_remove(k);
    }
    if let Some(f) = env_file {
        cmd.arg("--environment-file").arg(f);
    }
    let out = cmd.output().unwrap();
    Run {
        ok: out.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The line of check `name` (the first if several).
fn line<'a>(run: &'a Run, name: &str) -> &'a str {
    run.out
        .lines()
        .find(|l| l[6.min(l.len())..].starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} line in:\n{}", run.out))
}

fn assert_only_fails(run: &Run, name: &str) {
    assert!(!run.ok, "doctor should fail:\n{}", run.out);
    assert!(
        line(run, name).starts_with("FAIL"),
        "{name} should fail:\n{}",
        run.out
    );
    let fails = run.out.lines().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(fails, 1, "only {name} fails:\n{}", run.out);
    assert!(run.out.contains("fix: "), "{}", run.out);
}

#[test]
fn doctor_passes_a_healthy_mesh_and_names_each_broken_piece() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(&t.path().join(format!("n{i}")), &t.path().join("unused")))
        .collect();
    full_mesh(&mut nodes);
    for n in nodes.iter_mut() {
        n.store_root = n.dir.join("store");
    }
    nodes[1].extra_config = s3.mirror_config("");
    nodes[1].env = crate::s3_harness::credentials_env(ACCESS_KEY, SECRET_KEY);
    let keys: Vec<String> = nodes.iter().map(|n| n.public_key()).collect();
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_until(60, "both nodes to catch up with each other", || {
        nodes.iter().all(|n| {
            let peers = n.status().peers;
            !peers.is_empty() && peers.iter().all(|p| p.last_sync_secs_ago.is_some())
        })
    });
    let hook = bin("narmesh-hook");
    let env_file = t.path().join("s3.env");
    std::fs::write(
        &env_file,
        format!("AWS_ACCESS_KEY_ID={ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={SECRET_KEY}\n"),
    )
    .unwrap();
    let confs: Vec<PathBuf> = nodes
        .iter()
        .map(|n| nix_conf(&n.dir, n, &hook, &keys))
        .collect();

    // Healthy: every check passes on both hosts.
    for (i, n) in nodes.iter().enumerate() {
        let run = doctor(n, &confs[i], (i == 1).then_some(env_file.as_path()));
        assert!(run.ok, "node {i}:\n{}", run.out);
        assert!(run.out.contains("all checks passed"), "{}", run.out);
        assert!(line(&run, "peer").starts_with("ok"), "{}", run.out);
        assert!(line(&run, "problems").starts_with("ok"), "{}", run.out);
        assert!(line(&run, "hook-env").starts_with("ok"), "{}", run.out);
        // The hook under test is the README's static build (scripts/test.sh makes it).
        assert!(
            line(&run, "hook").contains("(statically linked)"),
            "{}",
            run.out
        );
        if i == 1 {
            assert!(line(&run, "bucket").starts_with("ok"), "{}", run.out);
        }
    }

    // The hook missing from nix.conf.
    let no_hook = t.path().join("no-hook.conf");
    let text = std::fs::read_to_string(&confs[0]).unwrap();
    std::fs::write(
        &no_hook,
        text.lines()
            .filter(|l| !l.starts_with("post-build-hook"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    assert_only_fails(&doctor(&nodes[0], &no_hook, None), "hook");

    // The hook's environment (nix-daemon's) names another spool than the node's: builds would
    // spool where the node never looks. Without NARMESH_* at all, it uses the defaults.
    let config = nodes[0].dir.join("narmesh.toml");
    let elsewhere = t.path().join("elsewhere");
    let env = HookEnv::with(&[
        ("NARMESH_SOCKET", &nodes[0].socket()),
        ("NARMESH_SPOOL", &elsewhere),
    ]);
    let run = doctor_args(&config, &confs[0], None, &["--hook-env-of", &env.pid()]);
    assert_only_fails(&run, "hook-env");
    let spool = nodes[0].spool().display().to_string();
    assert!(
        line(&run, "hook-env").contains("spools to")
            && !line(&run, "hook-env").contains("connects to")
            && run.out.contains(&format!("NARMESH_SPOOL={spool}")),
        "{}",
        run.out
    );
    let env = HookEnv::with(&[]);
    let run = doctor_args(&config, &confs[0], None, &["--hook-env-of", &env.pid()]);
    assert_only_fails(&run, "hook-env");
    assert!(
        line(&run, "hook-env").contains("connects to /run/narmesh/narmesh.sock")
            && line(&run, "hook-env").contains("spools to /var/lib/narmesh/spool"),
        "{}",
        run.out
    );

    // A post-build-hook script that exports them (as the NixOS module writes one) counts.
    let script = t.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport NARMESH_SOCKET='{}'\nexport NARMESH_SPOOL='{}'\nexec {}\n",
            nodes[0].socket().display(),
            nodes[0].spool().display(),
            hook.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let scripted = t.path().join("scripted.conf");
    let hook_line = format!("post-build-hook = {}", hook.display());
    assert!(text.contains(&hook_line));
    std::fs::write(
        &scripted,
        text.replace(
            &hook_line,
            &format!("post-build-hook = {}", script.display()),
        ),
    )
    .unwrap();
    let run = doctor_args(&config, &scripted, None, &["--hook-env-of", &env.pid()]);
    assert!(run.ok, "{}", run.out);
    assert!(line(&run, "hook-env").contains("sets them"), "{}", run.out);

    // The node's cache not among the local Nix's substituters.
    let no_cache = t.path().join("no-cache.conf");
    std::fs::write(
        &no_cache,
        text.lines()
            .filter(|l| !l.starts_with("extra-substituters"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let run = doctor(&nodes[0], &no_cache, None);
    assert_only_fails(&run, "substituter");
    assert!(
        run.out.contains("add `extra-substituters = http://"),
        "{}",
        run.out
    );

    // The node's key not trusted by the local Nix.
    let untrusted = t.path().join("untrusted.conf");
    std::fs::write(&untrusted, text.replace(&keys[0], "")).unwrap();
    let run = doctor(&nodes[0], &untrusted, None);
    assert_only_fails(&run, "keys");
    assert!(line(&run, "keys").contains("n0-1"), "{}", run.out);

    // A disk with less free space than `[store] min-free` keeps.
    let config = std::fs::read_to_string(nodes[0].dir.join("narmesh.toml")).unwrap();
    assert!(config.contains("min-free = \"64MiB\""), "{config}");
    let greedy = t.path().join("greedy.toml");
    std::fs::write(
        &greedy,
        config.replace("min-free = \"64MiB\"", "min-free = \"1000TiB\""),
    )
    .unwrap();
    let run = doctor_with(&greedy, &confs[0], None);
    assert_only_fails(&run, "disk");
    assert!(line(&run, "disk").contains("min-free"), "{}", run.out);

    // Wrong bucket credentials.
    let wrong = t.path().join("wrong.env");
    std::fs::write(
        &wrong,
        "AWS_ACCESS_KEY_ID=nobody\nAWS_SECRET_ACCESS_KEY=wrong-secret\n",
    )
    .unwrap();
    assert_only_fails(&doctor(&nodes[1], &confs[1], Some(&wrong)), "bucket");

    // A peer that went away.
    nodes[1].kill9();
    wait_until(30, "node 0 to notice its peer is gone", || {
        nodes[0]
            .status()
            .peers
            .iter()
            .any(|p| p.state == "unreachable")
    });
    assert_only_fails(&doctor(&nodes[0], &confs[0], None), "peer");

    // A problem the node itself reports: its disk under its own floor.
    nodes[0].stop();
    nodes[0].extra_config = "[store]\nmin-free = \"1000TiB\"\n".into();
    nodes[0].start();
    // Its cache listens on a new port.
    let conf = nix_conf(&nodes[0].dir, &nodes[0], &hook, &keys);
    let run = doctor(&nodes[0], &conf, None);
    let mut fails: Vec<&str> = run
        .out
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL  ")?.split(':').next())
        .collect();
    fails.sort();
    assert_eq!(fails, ["disk", "peer", "problems"], "{}", run.out);
    assert!(line(&run, "problems").contains("storage: "), "{}", run.out);

    // And the node itself down.
    nodes[0].stop();
    let run = doctor(&nodes[0], &confs[0], None);
    assert!(!run.ok);
    assert!(line(&run, "node").starts_with("FAIL"), "{}", run.out);
}

/// `--hook-user USER` checks that the hook, run as USER, may reach the socket: by default
/// (mode 0600, the node's user and root) `nobody` may not, and the fix names `socket-group`;
/// with `socket-group` set to `nobody`'s group, it may. (Run as root, as the tests are.)
#[test]
fn doctor_checks_the_hook_users_access_to_the_socket() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut node = Node::new(&t.path().join("n"), &t.path().join("unused"));
    node.store_root = node.dir.join("store");
    node.start();
    let hook = bin("narmesh-hook");
    let conf = nix_conf(&node.dir, &node, &hook, &[node.public_key()]);
    let config = node.dir.join("narmesh.toml");
    let run = doctor_args(&config, &conf, None, &["--hook-user", "nobody"]);
    let socket = line(&run, "socket");
    assert!(socket.starts_with("FAIL"), "{}", run.out);
    assert!(run.out.contains("socket-group"), "the fix: {}", run.out);
    assert!(
        line(&doctor(&node, &conf, None), "socket").starts_with("ok"),
        "root may: {}",
        run.out
    );
    node.stop();
    // `nobody`'s own group, by number (its name differs between distributions).
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let gid = passwd
        .lines()
        .find_map(|l| l.strip_prefix("nobody:"))
        .and_then(|l| l.split(':').nth(2))
        .expect("nobody in /etc/passwd");
    node.extra_config
        .push_str(&format!("socket-group = \"{gid}\"\n"));
    node.start();
    let run = doctor_args(&config, &conf, None, &["--hook-user", "nobody"]);
    assert!(line(&run, "socket").starts_with("ok"), "{}", run.out);

    // No config file: the node's socket and spool are the hook's variables, as `serve` takes
    // them without one.
    assert!(
        !Path::new(narmesh::doctor::DEFAULT_CONFIG).exists(),
        "this test needs a host without {}",
        narmesh::doctor::DEFAULT_CONFIG
    );
    let env = HookEnv::with(&[
        ("NARMESH_SOCKET", &node.socket()),
        ("NARMESH_SPOOL", &node.spool()),
    ]);
    let out = Command::new(bin("narmesh"))
        .args(["doctor", "--hook-env-of", &env.pid(), "--nix-conf"])
        .arg(&conf)
        .env_remove("NARMESH_CONFIG")
        .env("NARMESH_SOCKET", node.socket())
        .env("NARMESH_SPOOL", node.spool())
        .output()
        .unwrap();
    let run = Run {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    assert!(line(&run, "node").starts_with("ok"), "{}", run.out);
    assert!(line(&run, "hook-env").starts_with("ok"), "{}", run.out);
}
