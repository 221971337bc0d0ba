#!/usr/bin/env bash
# The whole test suite: install what the tests need, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
export NARMESH_WEED="${NARMESH_S3_VENV:-/opt/narmesh-s3}/bin/weed"
# A clean build (as in CI) keeps no incremental state: a gigabyte less on the disk.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-run
# The hook the tests run is the one the README installs: its own package, statically linked
# (seconds to build; it has three dependencies). tests/it/harness.rs finds it here.
cargo rustc --release --locked -p narmesh-hook -- -C target-feature=+crt-static
NARMESH_HOOK_BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}/release/narmesh-hook")
export NARMESH_HOOK_BIN
# The tests write their stores, nodes and buckets under $TMPDIR: about 2 GiB at the most, and
# SeaweedFS keeps about 1% of its file system free (measured: with 700 MB free of 98 GB it took
# no writes, with 1.5 GB it did). Too little is a clear failure here, not dozens of tests
# timing out later.
tmp=${TMPDIR:-/tmp}
read -r size avail < <(df -B1 --output=size,avail "$tmp" | tail -n 1)
need=$((size / 100 + (2 << 30)))
if [ "$avail" -lt "$need" ]; then
    echo "FAIL: $tmp has $((avail >> 20)) MiB free; the tests need $((need >> 20)) MiB" \
        "(2 GiB, and 1% of the file system that SeaweedFS keeps free)" >&2
    exit 1
fi
echo "disk: $((avail >> 20)) MiB free in $tmp (the tests need $((need >> 20)) MiB)"
cargo test --workspace --locked
# Every fuzz target for 20 s, no sanitizer (the corpora also replay in cargo test above).
scripts/fuzz.sh 20 none
