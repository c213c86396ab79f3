#!/usr/bin/env bash
# Tests of the JavaScript client (clients/js) against the real gateway:
#  - node's test runner: unit tests (backoff, close policy, a scripted WebSocket) and the client
#    against the real gateway (dev mode and JWT mode, restarts on the same port);
#  - headless Chromium (Debian's chromium, driven by playwright-core): the client in a page,
#    and the demo page served by the gateway's --demo, two users chatting; writes a screenshot
#    to clients/js/test-results/demo.png.
# Installs what is missing: chromium (apt, as root) and playwright-core (npm ci, dev only; it
# downloads no browser). The gateway is $WSGATE_BIN, else built with `cargo build --bin wsgate`.
# Loopback only; the tests stop every gateway and browser they start.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 1; }
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || { echo "node >= 20 is required (found $(node --version))" >&2; exit 1; }
# Node 22+ has a global WebSocket; Node 20 needs the flag.
NODE_FLAGS=()
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)'; then
  NODE_FLAGS+=(--experimental-websocket)
fi

if [ -z "${WSGATE_BIN:-}" ]; then
  log "building wsgate"
  cargo build --bin wsgate
  WSGATE_BIN=${CARGO_TARGET_DIR:-target}/debug/wsgate
fi
WSGATE_BIN=$(readlink -f "$WSGATE_BIN")
[ -x "$WSGATE_BIN" ] || { echo "no gateway binary at $WSGATE_BIN" >&2; exit 1; }
export WSGATE_BIN

if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  log "installing chromium (apt)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q chromium >/dev/null
fi

want=$(node -p 'require("./clients/js/package.json").devDependencies["playwright-core"]')
have=$(node -p 'try { require("./clients/js/node_modules/playwright-core/package.json").version } catch { "" }')
if [ "$have" != "$want" ]; then
  log "installing playwright-core $want (npm ci)"
  (cd clients/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout 300 npm ci --no-audit --no-fund --loglevel=error)
fi

log "node tests and headless Chromium tests (gateway: $WSGATE_BIN)"
cd clients/js
exec timeout --kill-after=10 600 node "${NODE_FLAGS[@]}" --test \
  test/*.test.js test-browser/*.test.js
