//! The node's logs over months: with the default filter (or the shipped units' `info`), a
//! dependency that warns on every retry cannot flood them. A node on a host with no multicast
//! route (a network namespace with only loopback) and LAN discovery on: mDNS fails a few times
//! a second, and the log says so once.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{bin, lone_config, run_ok};

#[test]
fn a_dependency_failing_every_second_is_logged_once_a_minute() {
    // The default filter, and the systemd unit's and the NixOS module's `info`.
    logged_once(None, "d");
    logged_once(Some("info"), "i");
}

fn logged_once(filter: Option<&str>, tag: &str) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let conf = lone_config(
        d,
        "logs-1",
        &d.join("node.sock"),
        &d.join("spool"),
        "[mesh]\nlisten = \"127.0.0.1:0\"\nlan-discovery = true\n",
    );
    let ns = format!("nmlogs{tag}{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &ns]));
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = Ns(ns.clone());
    run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
    let log = std::fs::File::create(d.join("node.log")).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns])
        .arg(bin("narmesh"))
        .args(["serve", "--config"])
        .arg(&conf);
    match filter {
        Some(f) => cmd.env("NARMESH_LOG", f),
        None => cmd.env_remove("NARMESH_LOG"),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(d.join("node.log")).unwrap();
    assert!(text.contains("serving:"), "the node ran:\n{text}");
    let mdns = text.matches("error sending mDNS").count();
    assert!(
        mdns <= 1,
        "{mdns} lines of the same mDNS failure in 6 s (NARMESH_LOG {filter:?}):\n{text}"
    );
}
