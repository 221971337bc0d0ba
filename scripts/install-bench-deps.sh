#!/usr/bin/env bash
# Installs what the benchmarks need beyond the tests: nginx and wrk (the narinfo-serving
# baseline and its client), on top of scripts/install-test-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
