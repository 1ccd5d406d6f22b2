#!/usr/bin/env bash
# Install everything the tests need, then run every test: the Rust core's (cargo test) and the
# Python ones (pytest: API, command lines, interop with the reference originals, terminal, the
# benchmark's quick smoke run, and the network-namespace tests, which need root and nftables and skip with a reason otherwise).
# This is the README's test command, and exactly what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# Everything is installed into a virtual environment of its own (.venv-test), so a system Python that
# refuses global installs (PEP 668: Debian, Ubuntu, Homebrew) works as well as any other.
VENV="${P2PCHAT_TEST_VENV:-.venv-test}"

if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "== installing nftables and iproute2 for the network-namespace tests"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2; } >/dev/null; then
        echo "   could not install them; the network-namespace tests will skip"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== python3 -m venv $VENV"
    if ! "$PYTHON" -m venv "$VENV" && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # Debian's Python comes without venv's pip bootstrap: python3-venv brings it.
        rm -rf "$VENV"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "cannot make a virtual environment with $PYTHON (on Debian or Ubuntu: apt install python3-venv)"; exit 1; }

echo "== pip install -r tests/requirements.txt, then . (builds the Rust core in release mode, with the benchmark's helpers for test_bench)"
"$PY" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
MATURIN_PEP517_ARGS="--features python,bench" "$PY" -m pip install --quiet --disable-pip-version-check .

echo "== ruff, mypy --strict on the package, stubtest of _core.pyi against the built module"
"$PY" -m ruff check python server.py client.py examples tests benches
"$PY" -m mypy
"$PY" -m mypy.stubtest p2pchat._core

echo "== cargo fmt --check, cargo clippy (warnings denied)"
cargo fmt --check
cargo clippy --locked --all-targets --features python,bench -- -D warnings

echo "== cargo test (the Rust core and the room simulator, no Python needed; each \`cargo bench\` case runs once)"
cargo test --locked --all-targets --features bench
cargo test --locked --doc --features bench

echo "== pytest (real processes and sockets on loopback)"
"$PY" -m pytest tests
