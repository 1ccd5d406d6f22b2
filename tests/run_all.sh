#!/usr/bin/env bash
# Install everything the tests need, then run every test: the Rust core's (cargo test) and the
# Python ones (pytest: API, command lines, interop with the reference originals, terminal, the
# benchmark's quick smoke run, and the network-namespace tests, which need root and nftables and skip with a reason otherwise).
# This is the README's test command, and exactly what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "== installing nftables and iproute2 for the network-namespace tests"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2; } >/dev/null; then
        echo "   could not install them; the network-namespace tests will skip"
    fi
fi

echo "== pip install .[test]  (builds the Rust core in release mode, with the benchmark's helpers for test_bench)"
MATURIN_PEP517_ARGS="--features python,bench" "$PYTHON" -m pip install --quiet --disable-pip-version-check ".[test]"

echo "== ruff, mypy --strict on the package, stubtest of _core.pyi against the built module"
"$PYTHON" -m ruff check python server.py client.py examples tests benches
"$PYTHON" -m mypy
"$PYTHON" -m mypy.stubtest p2pchat._core

echo "== cargo fmt --check, cargo clippy (warnings denied)"
cargo fmt --check
cargo clippy --locked --all-targets --features python,bench -- -D warnings

echo "== cargo test (the Rust core and the room simulator, no Python needed; each \`cargo bench\` case runs once)"
cargo test --locked --all-targets --features bench
cargo test --locked --doc --features bench

echo "== pytest (real processes and sockets on loopback)"
"$PYTHON" -m pytest tests
