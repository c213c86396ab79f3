#!/usr/bin/env bash
# Autobahn TestSuite sections 1-10 against wsgate's echo endpoint (--echo-path /echo).
# Builds wsgate, starts it on a free loopback port, runs scripts/autobahn.sh (which installs
# the Python 2 suite privately on first use) and diffs against scripts/autobahn-expected.json.
# Limits are raised because section 9 echoes messages of up to 16 MiB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${1:-$repo/target/autobahn}
profile=${WSGATE_PROFILE:-debug}
if [ "$profile" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
bin="${CARGO_TARGET_DIR:-$repo/target}/$profile/wsgate"
log=$(mktemp)
"$bin" --listen 127.0.0.1:0 --workers 2 --echo-path /echo \
  --max-message-size 16777216 --max-queued-bytes 67108864 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  addr=$(sed -n 's/^listening on //p' "$log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "${addr:-}" ] || { echo "wsgate did not start:"; cat "$log"; exit 1; }
scripts/autobahn.sh run "ws://$addr/echo" "$out"
