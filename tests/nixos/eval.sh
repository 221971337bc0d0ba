#!/usr/bin/env bash
# Developer helper: evaluates nix/module.nix (tests/nixos/eval.nix) and prints the result as JSON.
#
#   tests/nixos/eval.sh                     # a typical build host (tests/nixos/typical.nix)
#   tests/nixos/eval.sh '{ services.narmesh = { enable = true; secretKeyFile = "/nix/store/..."; }; }'
#   tests/nixos/eval.sh --parse             # only parse the Nix files
#   tests/nixos/eval.sh ... | jq -r .unitText   # the unit NixOS would write
#
# Nix 2.26 and nixpkgs' lib: see tests/nixos/common.sh (NARMESH_NIXPKGS_LIB, NIX_PATH,
# ../shared/nixpkgs-lib/lib; NARMESH_NIX226_ROOT). tests/nixos/verify-units.sh runs the checks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_nix226

if [ "${1:-}" = --parse ]; then
  for f in "$REPO"/flake.nix "$REPO"/nix/*.nix "$REPO"/tests/nixos/*.nix; do
    nix226 nix-instantiate --parse "$f" >/dev/null
    echo "parsed $f"
  done
  exit 0
fi

resolve_nixpkgs_lib
trap 'rm -rf ${NIXPKGS_LIB_COPY:+"$NIXPKGS_LIB_COPY"}' EXIT
echo "nixpkgs lib: $NIXPKGS_LIB (from $NIXPKGS_LIB_FROM)" >&2
eval_module "${1:-$REPO/tests/nixos/typical.nix}"
