#!/usr/bin/env bash
# End-to-end tests with the real Segment / RudderStack client libraries.
# Installs the pinned clients (Python venv under target/, npm packages from package-lock.json),
# then runs pytest against the handoff binary at $HANDOFF_BIN (default: target/debug/handoff).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${E2E_VENV:-$root/target/e2e-venv}
export HANDOFF_BIN=${HANDOFF_BIN:-$root/target/debug/handoff}

[ -x "$HANDOFF_BIN" ] || { echo "no handoff binary at $HANDOFF_BIN; run cargo build first" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.lock"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
cd "$here"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$here"
