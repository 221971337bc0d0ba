#!/usr/bin/env bash
# Installs a second, newer real Nix for the tests: Debian trixie's nix-bin (2.26.x) in a root of
# its own at $NARMESH_NIX226_ROOT (default /opt/narmesh-nix-2.26), run through bubblewrap
# (tests/it/nix226.rs). The host's own Nix (bookworm's 2.8) is untouched. Idempotent; fails loudly.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
ROOT="${NARMESH_NIX226_ROOT:-/opt/narmesh-nix-2.26}"

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing from Debian: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

version() { bwrap --bind "$ROOT" / --proc /proc --dev /dev --tmpfs /tmp nix-store --version 2>/dev/null || true; }

if [ -x "$ROOT/usr/bin/nix-store" ] && [ -f "$ROOT/.narmesh-ready" ]; then
  echo "Nix 2.26 root present: $(version)"
  exit 0
fi

MIRROR="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
echo "making a Debian trixie root with nix-bin at $ROOT (mirror $MIRROR)"
$SUDO rm -rf "$ROOT"
$SUDO mkdir -p "$ROOT"
$SUDO debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >/tmp/narmesh-debootstrap.log 2>&1 || {
  tail -n 30 /tmp/narmesh-debootstrap.log >&2
  echo "error: debootstrap of trixie failed (log above)" >&2
  exit 1
}
echo "deb $MIRROR trixie main" | $SUDO tee "$ROOT/etc/apt/sources.list" >/dev/null
# The package's post-install complains about /proc inside a chroot: harmless.
$SUDO chroot "$ROOT" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nix-bin' \
  >/tmp/narmesh-nix226-apt.log 2>&1 || true
if [ ! -x "$ROOT/usr/bin/nix-store" ]; then
  tail -n 30 /tmp/narmesh-nix226-apt.log >&2
  echo "error: nix-bin did not install in the trixie root" >&2
  exit 1
fi
$SUDO chroot "$ROOT" sh -c 'getent group nixbld >/dev/null || groupadd -r nixbld;
  for n in 1 2 3 4 5 6 7 8; do id nixbld$n >/dev/null 2>&1 || useradd -r -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin nixbld$n; done'
$SUDO touch "$ROOT/.narmesh-ready"
v="$(version)"
case "$v" in
  *" 2.26."*) echo "Nix 2.26 root ready: $v" ;;
  *) echo "error: the trixie root's Nix does not run through bwrap (got: '$v')" >&2; exit 1 ;;
esac
