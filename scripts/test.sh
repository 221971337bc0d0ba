#!/usr/bin/env bash
# The whole test suite: install what the tests need, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
export NARMESH_WEED="${NARMESH_S3_VENV:-/opt/narmesh-s3}/bin/weed"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# Every fuzz target for 20 s, no sanitizer (the corpora also replay in cargo test above).
scripts/fuzz.sh 20 none
