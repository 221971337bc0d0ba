# Sourced by tests/nixos/eval.sh and tests/nixos/verify-units.sh: runs Nix 2.26 (Debian trixie's,
# made by scripts/install-nix-2.26.sh) through bubblewrap, without network, and finds nixpkgs' lib.
#
# nixpkgs' lib, first found wins; a place that is given but wrong is an error, never skipped:
#   1. $NARMESH_NIXPKGS_LIB: the lib directory itself (the one holding default.nix and modules.nix);
#   2. <nixpkgs/lib>, as Nix 2.26 resolves it from NIX_PATH (or its nix-path setting);
#   3. ../shared/nixpkgs-lib/lib beside the repository (nixpkgs' lib 26.11, for this project's machines).
# nixpkgs' lib 26.11 needs Nix >= 2.18, hence 2.26 rather than the host's 2.8.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NIX_ROOT="${NARMESH_NIX226_ROOT:-/opt/narmesh-nix-2.26}"
# Extra bubblewrap arguments (read-only binds) for every run of nix226.
NIX226_BINDS=()

die() {
  echo "FAIL: $*" >&2
  exit 1
}

require_nix226() {
  command -v bwrap >/dev/null 2>&1 || die "bwrap is not on PATH (apt-get install bubblewrap; scripts/test.sh installs it)"
  [ -x "$NIX_ROOT/usr/bin/nix-instantiate" ] && [ -f "$NIX_ROOT/.narmesh-ready" ] ||
    die "Nix 2.26 is not installed in $NIX_ROOT: run scripts/install-nix-2.26.sh (scripts/test.sh does)"
}

nix226() {
  bwrap --ro-bind "$NIX_ROOT/usr" /usr --ro-bind "$NIX_ROOT/etc" /etc \
    --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
    --proc /proc --dev /dev --tmpfs /tmp \
    --ro-bind "$REPO" "$REPO" "${NIX226_BINDS[@]}" \
    --unshare-net --die-with-parent --setenv HOME /tmp \
    "$@"
}

is_lib_dir() { [ -f "$1/default.nix" ] && [ -f "$1/modules.nix" ]; }

# <nixpkgs/lib> as Nix 2.26 resolves it, or nothing. NIX_PATH's directories (and /nix, where
# channels live) are bound in at their own paths, so what Nix prints is a path of this machine.
find_nixpkgs_lib_in_nix_path() {
  local binds=(--ro-bind-try /nix /nix) entries=() entry dir
  IFS=: read -ra entries <<<"${NIX_PATH:-}"
  for entry in "${entries[@]}"; do
    dir="${entry#*=}"
    case "$dir" in /*) if [ -e "$dir" ]; then binds+=(--ro-bind "$dir" "$dir"); fi ;; esac
  done
  local saved=("${NIX226_BINDS[@]}")
  NIX226_BINDS=("${binds[@]}")
  nix226 nix-instantiate --store dummy:// --find-file nixpkgs/lib 2>/dev/null || true
  NIX226_BINDS=("${saved[@]}")
}

# Sets NIXPKGS_LIB (a directory of this machine) and NIXPKGS_LIB_FROM, and binds it into nix226.
NIXPKGS_LIB_COPY=""
resolve_nixpkgs_lib() {
  local found
  if [ -n "${NARMESH_NIXPKGS_LIB:-}" ]; then
    is_lib_dir "$NARMESH_NIXPKGS_LIB" ||
      die "NARMESH_NIXPKGS_LIB=$NARMESH_NIXPKGS_LIB is not nixpkgs' lib directory (no default.nix and modules.nix there)"
    NIXPKGS_LIB="$(realpath "$NARMESH_NIXPKGS_LIB")"
    NIXPKGS_LIB_FROM="NARMESH_NIXPKGS_LIB"
  elif found="$(find_nixpkgs_lib_in_nix_path)" && [ -n "$found" ] && is_lib_dir "$found"; then
    NIXPKGS_LIB="$(realpath "$found")"
    NIXPKGS_LIB_FROM="<nixpkgs/lib> (NIX_PATH)"
  elif is_lib_dir "$REPO/../shared/nixpkgs-lib/lib"; then
    NIXPKGS_LIB="$(realpath "$REPO/../shared/nixpkgs-lib/lib")"
    NIXPKGS_LIB_FROM="../shared/nixpkgs-lib/lib"
  else
    die "no nixpkgs lib found: set NARMESH_NIXPKGS_LIB to nixpkgs' lib directory, put nixpkgs in NIX_PATH (<nixpkgs/lib>), or provide $REPO/../shared/nixpkgs-lib/lib"
  fi
  local storedir=/nix/store/
  if [ "${NIXPKGS_LIB#"$storedir"}" != "$NIXPKGS_LIB" ]; then
    # The evaluation runs on a store of its own in /tmp, whose /nix/store is not this machine's:
    # a lib in this machine's store is read from a copy (NIXPKGS_LIB_COPY: the caller removes it).
    NIXPKGS_LIB_COPY="$(mktemp -d "${TMPDIR:-/tmp}/narmesh-nixpkgs-lib.XXXXXX")"
    cp -rL "$NIXPKGS_LIB" "$NIXPKGS_LIB_COPY/lib"
    NIXPKGS_LIB="$NIXPKGS_LIB_COPY/lib"
  fi
  NIX226_BINDS=(--ro-bind "$NIXPKGS_LIB" "$NIXPKGS_LIB")
}

# Evaluates tests/nixos/eval.nix with the module CONFIG (a Nix expression: an attrset, or a path
# to a module) and prints the result as JSON. --read-write-mode on a throwaway store in the
# sandbox's tmpfs, because --eval alone does not write what builtins.toFile makes, and eval.nix
# reads the rendered files back.
eval_module() {
  nix226 nix-instantiate --read-write-mode --store /tmp/evalstore --eval --strict --json \
    --arg lib "import $NIXPKGS_LIB" --arg config "$1" "$REPO/tests/nixos/eval.nix"
}
