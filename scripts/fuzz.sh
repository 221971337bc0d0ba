#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each, seeded from fuzz/corpus/<target>
# (new finds go to a scratch directory; copy the worth-keeping ones into the corpus by hand),
# and prints libFuzzer's executions and cov/ft per target. A crash fails the run and leaves its
# input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [SANITIZER]     # defaults: 25, none (CI); `address` for campaigns
#   FUZZ_JOBS=2 scripts/fuzz.sh 1800 address  # two targets at a time
#
# cargo-fuzz drives nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them,
# for this command only.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-25}"
SANITIZER="${2:-none}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
(cd fuzz && cargo fuzz build --sanitizer "$SANITIZER" >/dev/null)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# FUZZ_JOBS targets at a time (default 1); each libFuzzer process uses one core.
JOBS="${FUZZ_JOBS:-1}"
run_one() {
  local target=$1 log="$scratch/$1.log"
  mkdir -p "$scratch/$target"
  if ! (cd fuzz && cargo fuzz run --sanitizer "$SANITIZER" "$target" \
      "$scratch/$target" "corpus/$target" -- -max_total_time="$SECONDS_EACH" -max_len=65536 \
      >"$log" 2>&1); then
    tail -40 "$log"
    echo "FAIL: fuzz target $target crashed (input in fuzz/artifacts/$target/)" >&2
    return 1
  fi
}
targets=$(cd fuzz && cargo fuzz list)
failed=0
running=0
for target in $targets; do
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  run_one "$target" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
for target in $targets; do
  summary=$(grep -E '^#[0-9]+' "$scratch/$target.log" | tail -1 || true)
  echo "fuzz $target ($SANITIZER, ${SECONDS_EACH}s): $summary"
done
exit "$failed"
