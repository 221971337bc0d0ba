//! The deployment files are right: the NixOS module (nix/module.nix) evaluated with nixpkgs'
//! module system, the unit NixOS would write for it and the plain unit (deploy/systemd/) pass
//! `systemd-analyze verify` and `security`, the sysusers snippet passes `systemd-sysusers`, and
//! the configuration files pass `narmesh check-config`. tests/nixos/verify-units.sh does the
//! checking (runnable by hand; it says what it checks); these tests run it with our binary.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::{Nix, bin, require};

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
/// HTTP cache answer, so `systemctl start` returns only when the node can be reached.
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
    node.stop();
}
