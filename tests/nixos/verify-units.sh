#!/usr/bin/env bash
# Checks the NixOS module (nix/module.nix) and the plain systemd units (deploy/systemd/):
#
#   module: evaluates the module with nixpkgs' module system (eval.nix, Nix 2.26, see common.sh)
#           for a typical host (typical.nix) and a minimal one (minimal.nix); renders the unit
#           NixOS would write (render-unit.nix) and runs `systemd-analyze verify` and
#           `systemd-analyze security --offline` on it; checks what the module sets (hardening,
#           credential, hook, substituter, firewall); runs `narmesh check-config` on the TOML it
#           renders (and checks that an unknown key is refused); checks that a secretKeyFile or
#           environmentFile in the Nix store fails an assertion.
#   plain:  `systemd-analyze verify` and `security --offline` on deploy/systemd/narmesh.service,
#           `systemd-sysusers --dry-run` on narmesh.sysusers, `narmesh check-config` on
#           deploy/narmesh.toml.example (its placeholders filled in).
#
#   tests/nixos/verify-units.sh [all|module|plain]        (default: all)
#
# NARMESH_BIN: the narmesh binary (default: target/debug/narmesh of this repository).
# Debian's systemd-analyze reports unknown keys and bad values but still exits 0: its output is
# read, and any line fails the check except a missing executable (/nix/store/..., or the plain
# unit's /usr/local/bin/narmesh), which is not installed on the machine running the tests.
# Prints a PASS or FAIL line per check; exits non-zero if any failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WHAT="${1:-all}"
case "$WHAT" in all | module | plain) ;; *) die "usage: $0 [all|module|plain]" ;; esac

NARMESH_BIN="${NARMESH_BIN:-$REPO/target/debug/narmesh}"
# systemd-analyze security's exposure level (0-100 here, 10 times what it prints) above which a unit
# fails: both units are at 14 with systemd 252; some room for other versions' scoring.
MAX_EXPOSURE=20

for tool in systemd-analyze systemd-sysusers jq; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH (apt-get install systemd jq; scripts/test.sh installs them)"
done
[ -x "$NARMESH_BIN" ] || die "NARMESH_BIN=$NARMESH_BIN is not an executable (cargo build, or set NARMESH_BIN)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/narmesh-verify-units.XXXXXX")"
trap 'rm -rf "$WORK" ${NIXPKGS_LIB_COPY:+"$NIXPKGS_LIB_COPY"}' EXIT

failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
indent() { sed 's/^/    /'; }

# A missing executable is expected here (nothing is installed); anything else is a finding.
MISSING_EXEC='Command (/nix/store/[^ ]+|/usr/(local/)?bin/narmesh(-hook)?) is not executable: No such file or directory$'

# verify_unit LABEL FILE: systemd-analyze verify and security on a unit file named NAME.service.
verify_unit() {
  local label="$1" unit="$2" out rc=0 bad
  out="$(systemd-analyze verify --man=no "$unit" 2>&1)" || rc=$?
  bad="$(grep -vE "$MISSING_EXEC" <<<"$out" | grep -v '^$' || true)"
  if [ -n "$bad" ]; then
    fail "$label: systemd-analyze verify reports:"
    echo "$bad" | indent
  elif [ "$rc" != 0 ] && ! grep -qE "$MISSING_EXEC" <<<"$out"; then
    fail "$label: systemd-analyze verify exited $rc"
  else
    pass "$label: systemd-analyze verify (expected here: $(grep -cE "$MISSING_EXEC" <<<"$out") missing executable(s))"
  fi

  rc=0
  out="$(systemd-analyze security --offline=yes --threshold="$MAX_EXPOSURE" --no-pager "$unit" 2>&1)" || rc=$?
  if [ "$rc" = 0 ]; then
    pass "$label: $(grep -o 'Overall exposure level.*' <<<"$out" || echo 'systemd-analyze security')"
  else
    fail "$label: systemd-analyze security above $MAX_EXPOSURE/100 (exit $rc):"
    grep -E '✗|Overall' <<<"$out" | indent || echo "$out" | indent
  fi
}

# has_lines LABEL FILE LINE...: every LINE is a whole line of FILE.
has_lines() {
  local label="$1" file="$2" missing=()
  shift 2
  for l in "$@"; do grep -qxF -- "$l" "$file" || missing+=("$l"); done
  if [ ${#missing[@]} = 0 ]; then
    pass "$label"
  else
    fail "$label: missing line(s):"
    printf '%s\n' "${missing[@]}" | indent
  fi
}

# lacks_lines LABEL FILE PATTERN...: no line of FILE starts with PATTERN.
lacks_lines() {
  local label="$1" file="$2" found=()
  shift 2
  for p in "$@"; do grep -q -- "^$p" "$file" && found+=("$p"); done
  if [ ${#found[@]} = 0 ]; then
    pass "$label"
  else
    fail "$label: unexpected line(s): ${found[*]}"
  fi
}

# check_config LABEL FILE: `narmesh check-config FILE` accepts it.
check_config() {
  local out rc=0
  out="$("$NARMESH_BIN" check-config "$2" 2>&1)" || rc=$?
  if [ "$rc" = 0 ]; then
    pass "$1: narmesh check-config accepts it"
  else
    fail "$1: narmesh check-config exited $rc:"
    echo "$out" | indent
  fi
}

# The hardening both units share (the issue's: read-only system with the store and its database,
# no capabilities, a private umask, state and runtime directories of systemd's).
HARDENING=(
  "User=narmesh"
  "Group=narmesh"
  "StateDirectory=narmesh"
  "RuntimeDirectory=narmesh"
  "UMask=0077"
  "ProtectSystem=strict"
  "ReadOnlyPaths=/nix/store"
  "ReadOnlyPaths=/nix/var/nix/db"
  "CapabilityBoundingSet="
  "AmbientCapabilities="
)

# How systemd keeps the node running: readiness, and a start again 5 s after the node stopped
# with a failure (it does when a part it needs ended; the start limit, 5 in 10 s, never hits).
SUPERVISION=(
  "Type=notify"
  "Restart=on-failure"
  "RestartSec=5s"
  # A node whose runtime stalls stops telling the watchdog (src/watchdog.rs).
  "WatchdogSec=60s"
)

# jq_check LABEL JSONFILE FILTER: the jq FILTER is true of the evaluation.
jq_check() {
  if jq -e "$3" "$2" >/dev/null; then
    pass "$1"
  else
    fail "$1: not true: $3"
  fi
}

# eval_to LABEL CONFIG FILE: the module's evaluation for CONFIG as JSON in FILE.
eval_to() {
  if eval_module "$2" >"$3" 2>"$3.err"; then
    pass "$1: the module evaluates"
  else
    fail "$1: the module does not evaluate:"
    indent <"$3.err"
    return 1
  fi
}

check_module() {
  require_nix226
  resolve_nixpkgs_lib
  echo "nixpkgs lib: $NIXPKGS_LIB (from $NIXPKGS_LIB_FROM)"
  local host json dir
  for host in typical minimal; do
    json="$WORK/$host.json"
    dir="$WORK/$host"
    mkdir -p "$dir"
    eval_to "module ($host)" "$REPO/tests/nixos/$host.nix" "$json" || continue
    if jq -e '.failedAssertions == [] and .warnings == []' "$json" >/dev/null; then
      pass "module ($host): no failed assertion, no warning"
    else
      fail "module ($host): failed assertions or warnings:"
      jq -r '.failedAssertions[], .warnings[]' "$json" | indent
    fi
    jq -r .unitText "$json" >"$dir/narmesh.service"
    jq -r .configToml "$json" >"$dir/narmesh.toml"
    verify_unit "module ($host) unit" "$dir/narmesh.service"
    has_lines "module ($host) unit: hardening" "$dir/narmesh.service" "${HARDENING[@]}"
    has_lines "module ($host) unit: supervision" "$dir/narmesh.service" "${SUPERVISION[@]}"
    check_config "module ($host) config" "$dir/narmesh.toml"
    jq_check "module ($host): user and group" "$json" \
      '.users.narmesh.isSystemUser and .users.narmesh.group == "narmesh" and (.users.groups | index("narmesh"))'
  done

  json="$WORK/typical.json"
  if [ -s "$json" ]; then
    has_lines "module (typical) unit: secret key and S3 credentials" "$WORK/typical/narmesh.service" \
      "LoadCredential=secret-key:/etc/narmesh/key.sec" "EnvironmentFile=/etc/narmesh/s3.env"
    grep -qxF 'secret-key-file = "/run/credentials/narmesh.service/secret-key"' "$WORK/typical/narmesh.toml" &&
      pass "module (typical) config: secret-key-file is the unit's credential" ||
      fail "module (typical) config: secret-key-file is not /run/credentials/narmesh.service/secret-key"
    # The default socket and spool are the hook's own: Nix runs the binary, no shell first.
    jq_check "module (typical): post-build-hook is the hook binary itself" "$json" \
      '.hook == "/nix/store/00000000000000000000000000000000-narmesh/bin/narmesh-hook"
       and .hookScript == null'
    jq_check "module (typical): substituter and its keys" "$json" \
      '.nixSettings."extra-substituters" == ["http://127.0.0.1:5480"]
       and .nixSettings."extra-trusted-public-keys" == [.finalSettings."trusted-public-keys"[0], "buildhost-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]'
    jq_check "module (typical): firewall opens the mesh port" "$json" '.allowedUDPPorts == [5481]'
  fi
  json="$WORK/minimal.json"
  if [ -s "$json" ]; then
    lacks_lines "module (minimal) unit: no credential, no environment file" "$WORK/minimal/narmesh.service" \
      "LoadCredential=" "EnvironmentFile=" "SupplementaryGroups="
    jq_check "module (minimal): no hook, no substituter, no open port" "$json" \
      '.nixSettings == {} and .allowedUDPPorts == [] and (.finalSettings | has("secret-key-file") | not)'
  fi

  # Another socket or spool: a script gives the hook both.
  json="$WORK/custom-hook.json"
  if eval_to "module (hook with another socket and spool)" \
    '{ services.narmesh = { enable = true; hook.enable = true; settings = { socket = "/run/narmesh/other.sock"; spool-dir = "/var/lib/narmesh/other spool"; }; }; }' "$json"; then
    jq_check "module (another socket and spool): post-build-hook finds them" "$json" \
      '(.hookScript | contains("export NARMESH_SOCKET=/run/narmesh/other.sock\n"))
       and (.hookScript | contains("export NARMESH_SPOOL=\u0027/var/lib/narmesh/other spool\u0027\n"))
       and (.hookScript | test("exec /nix/store/[^ ]+/bin/narmesh-hook\n$"))'
  fi

  # A socket group: the node is a member (to hand the socket and the spool to it), its config
  # names it, and the group's hook gets through the state directory to the spool.
  json="$WORK/socket-group.json"
  if eval_to "module (socketGroup)" '{ services.narmesh = { enable = true; socketGroup = "builders"; }; }' "$json"; then
    jq_check "module (socketGroup): the node is in the group, its config names it, the state dir lets it through" "$json" \
      '.service.serviceConfig.SupplementaryGroups == ["builders"]
       and .service.serviceConfig.StateDirectoryMode == "0711"
       and .finalSettings."socket-group" == "builders"'
    jq -r .configToml "$json" >"$WORK/socket-group.toml"
    check_config "module (socketGroup) config" "$WORK/socket-group.toml"
  fi

  # A store path (world-readable) or a relative path is refused.
  local store_key='/nix/store/00000000000000000000000000000000-key.sec'
  json="$WORK/store-key.json"
  if eval_to "module (secretKeyFile in the store)" \
    "{ services.narmesh = { enable = true; secretKeyFile = \"$store_key\"; environmentFile = \"/nix/store/00000000000000000000000000000000-s3.env\"; }; }" "$json"; then
    jq_check "module: a secretKeyFile in the Nix store fails an assertion" "$json" \
      "any(.failedAssertions[]; contains(\"services.narmesh.secretKeyFile = \\\"$store_key\\\"\"))"
    jq_check "module: an environmentFile in the Nix store fails an assertion" "$json" \
      'any(.failedAssertions[]; contains("services.narmesh.environmentFile"))'
  fi
  json="$WORK/relative-key.json"
  if eval_to "module (relative secretKeyFile)" '{ services.narmesh = { enable = true; secretKeyFile = "key.sec"; }; }' "$json"; then
    jq_check "module: a relative secretKeyFile fails an assertion" "$json" \
      'any(.failedAssertions[]; contains("services.narmesh.secretKeyFile"))'
  fi

  # The build-time check: an unknown key must fail it.
  json="$WORK/unknown-key.json"
  if eval_to "module (unknown settings key)" '{ services.narmesh = { enable = true; settings.no-such-key = 1; }; }' "$json"; then
    jq -r .configToml "$json" >"$WORK/unknown-key.toml"
    if "$NARMESH_BIN" check-config "$WORK/unknown-key.toml" >"$WORK/unknown-key.out" 2>&1; then
      fail "module (unknown settings key): narmesh check-config accepts it (the system build would not fail)"
    elif grep -q 'no-such-key' "$WORK/unknown-key.out"; then
      pass "module (unknown settings key): narmesh check-config refuses it, naming the key"
    else
      fail "module (unknown settings key): narmesh check-config failed without naming the key:"
      indent <"$WORK/unknown-key.out"
    fi
  fi
}

check_plain() {
  local dir="$WORK/plain"
  mkdir -p "$dir"
  cp "$REPO/deploy/systemd/narmesh.service" "$dir/narmesh.service"
  verify_unit "plain unit" "$dir/narmesh.service"
  has_lines "plain unit: hardening" "$dir/narmesh.service" "${HARDENING[@]}"
  has_lines "plain unit: supervision" "$dir/narmesh.service" "${SUPERVISION[@]}"

  # The sysusers snippet, applied to an empty root (nothing is written with --dry-run).
  local out rc=0 bad
  mkdir -p "$dir/root/etc"
  out="$(systemd-sysusers --root="$dir/root" --dry-run "$REPO/deploy/systemd/narmesh.sysusers" 2>&1)" || rc=$?
  bad="$(grep -vE "^(Creating (user|group) 'narmesh'|Would write /etc/)" <<<"$out" || true)"
  if [ "$rc" = 0 ] && [ -z "$bad" ] && grep -q "^Creating user 'narmesh'" <<<"$out" &&
    grep -q "^Creating group 'narmesh'" <<<"$out"; then
    pass "plain sysusers: creates the unit's user and group (systemd-sysusers --dry-run)"
  else
    fail "plain sysusers: systemd-sysusers --dry-run exited $rc:"
    echo "$out" | indent
  fi

  # The example configuration the unit reads, its placeholders filled in with real values.
  sed -e 's|<base64 public key of build2>|L0Hn3m91rH+ELJbeITSCf4qr8zwL04sSf3GxQXiA6HE=|' \
    -e 's|<endpoint id of build2>|2f41e7de6f75ac7f842c96de2134827f8aabf33c0bd38b127f71b1417880e871|' \
    "$REPO/deploy/narmesh.toml.example" >"$dir/narmesh.toml"
  if grep -n '<[^>]*>' "$dir/narmesh.toml" | grep -v '^[0-9]*:#'; then
    fail "plain config: placeholders left in deploy/narmesh.toml.example (above)"
  else
    check_config "plain config (deploy/narmesh.toml.example)" "$dir/narmesh.toml"
  fi
}

echo "narmesh: $NARMESH_BIN"
case "$WHAT" in
  all)
    check_module
    check_plain
    ;;
  module) check_module ;;
  plain) check_plain ;;
esac

if [ "$failures" = 0 ]; then
  echo "PASS: all checks ($WHAT)"
else
  echo "FAIL: $failures check(s) failed ($WHAT)"
  exit 1
fi
