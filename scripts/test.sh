#!/usr/bin/env bash
# Runs every check and test Handoff has: formatting, clippy, the Rust tests (unit, property and
# integration tests that start the real binary), and the end-to-end tests with the real Segment
# and RudderStack client libraries. Installs what it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> Rust tests"
cargo build --locked -p handoff
cargo nextest run --workspace --locked --no-fail-fast
echo "==> end-to-end tests with real SDKs"
bash tests/e2e/run.sh
