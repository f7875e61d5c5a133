#!/usr/bin/env bash
# Handoff's ingest benchmark, in one command: builds release binaries, starts a bare HTTP server
# and `handoff serve` as separate processes, drives load over loopback, prints the figures.
# Extra arguments go to `handoff-bench run` (e.g. --seconds 15 --connections 128).
# `bash benches/run.sh policy` runs the policy engine's criterion benchmark instead;
# `bash benches/run.sh delivery` the end-to-end one (ingest, policy, delivery to 4 local sinks).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = policy ]; then
  shift
  exec cargo bench --locked -p handoff-core --bench policy -- "$@"
fi
if [ "${1:-}" = delivery ]; then
  shift
  cargo build --release --locked -p handoff -p handoff-bench
  exec target/release/handoff-bench delivery --handoff target/release/handoff "$@"
fi
cargo build --release --locked -p handoff -p handoff-bench
exec target/release/handoff-bench run --handoff target/release/handoff "$@"
