#!/usr/bin/env bash
# Developer helper: evaluates nix/module.nix (tests/nixos/eval.nix) and prints the result as JSON.
#
#   tests/nixos/eval.sh                     # a typical build host (below)
#   tests/nixos/eval.sh '{ services.narmesh = { enable = true; secretKeyFile = "/nix/store/..."; }; }'
#   tests/nixos/eval.sh --parse             # only parse the Nix files
#
# nixpkgs' lib 26.11 needs Nix >= 2.18: this runs the second Nix (Debian trixie's 2.26, made by
# scripts/install-nix-2.26.sh) through bubblewrap, without network, on a throwaway store in a
# tmpfs: --read-write-mode, because --eval alone does not write what builtins.toFile makes, and
# eval.nix reads the rendered files back.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NIX_ROOT="${NARMESH_NIX226_ROOT:-/opt/narmesh-nix-2.26}"
NIXPKGS_LIB="${NIXPKGS_LIB:-/work/shared/nixpkgs-lib/lib}"

nix226() {
  bwrap --ro-bind "$NIX_ROOT/usr" /usr --ro-bind "$NIX_ROOT/etc" /etc \
    --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
    --proc /proc --dev /dev --tmpfs /tmp \
    --ro-bind "$REPO" "$REPO" --ro-bind "$NIXPKGS_LIB" "$NIXPKGS_LIB" \
    --unshare-net --die-with-parent --setenv HOME /tmp \
    "$@"
}

if [ "${1:-}" = --parse ]; then
  for f in "$REPO"/flake.nix "$REPO"/nix/*.nix "$REPO"/tests/nixos/*.nix; do
    nix226 nix-instantiate --parse "$f" >/dev/null
    echo "parsed $f"
  done
  exit 0
fi

# A typical build host: its own signing key, one peer, the S3 mirror.
TYPICAL=$(cat <<'EOF'
{
  services.narmesh = {
    enable = true;
    secretKeyFile = "/etc/narmesh/key.sec";
    environmentFile = "/etc/narmesh/s3.env";
    openFirewall = true;
    hook.enable = true;
    substituter.enable = true;
    publicKey = "buildhost-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    settings = {
      key-name = "buildhost-1";
      trusted-public-keys = [ "buildhost-2:0mfVpM3kHXOczE4Q2ADKq5OTKFp6EvXcAv2dxqCa/n4=" ];
      mesh.peers = [ "5b0d2b4e9c1f@10.0.0.2:5481" ];
      mirror.s3 = { bucket = "my-nix-cache"; region = "eu-west-1"; concurrency = 8; };
    };
  };
}
EOF
)

nix226 nix-instantiate --read-write-mode --store /tmp/evalstore --eval --strict --json \
  --arg lib "import $NIXPKGS_LIB" --arg config "${1:-$TYPICAL}" "$REPO/tests/nixos/eval.nix"
