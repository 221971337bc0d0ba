//! The README's install guide ("Install on a Debian or Ubuntu host running Nix") works as
//! written: tests/guide/run.sh runs its blocks literally on two hosts (network namespaces with
//! filesystems of their own, an S3 server beside them) with the binaries built here, and
//! `narmesh doctor` must say "all checks passed" on both. The script says what it stands in for
//! (cargo, apt-get, systemctl, scp) and is runnable by hand, as root.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::{bin, require};

#[test]
fn the_readme_install_guide_ends_with_doctor_passing_on_both_hosts() {
    for tool in [
        "bash", "ip", "unshare", "nsenter", "setpriv", "ss", "curl", "apt-get",
    ] {
        require(tool);
    }
    // The guide installs both binaries from one directory: the ones under test, side by side.
    let dir = tempfile::tempdir().unwrap();
    for b in ["narmesh", "narmesh-hook"] {
        std::os::unix::fs::symlink(bin(b), dir.path().join(b)).unwrap();
    }
    let bin_dir = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guide/run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("NARMESH_BIN_DIR", bin_dir)
        .env("NARMESH_WEED", crate::s3_harness::weed())
        .env_remove("NARMESH_GUIDE_KEEP")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    assert!(
        stdout.contains("PASS: the README install guide ends with doctor passing on both hosts"),
        "{} did not report success:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(
        stdout.matches("| all checks passed").count() >= 2,
        "narmesh doctor did not pass on both hosts:\n{stdout}\n{stderr}"
    );
}
