#!/usr/bin/env bash
# A three-node cluster on loopback: one nats-server and three wsgate nodes (n1, n2, n3),
# each with the demo page. Ctrl-C stops everything (every process this script started, by
# PID), within about 5 s. Ports: broker 4222 (NATS_PORT), nodes 8081-8083 (BASE_PORT+1..3),
# all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_PORT=${NATS_PORT:-4222}
BASE_PORT=${BASE_PORT:-8080}
command -v nats-server >/dev/null || {
  echo "nats-server is missing: apt-get install -y nats-server" >&2
  exit 1
}
# WSGATE_BIN: a wsgate binary to use instead of building the release one.
if [ -z "${WSGATE_BIN:-}" ]; then
  cargo build --release --bin wsgate >&2
  WSGATE_BIN="${CARGO_TARGET_DIR:-target}/release/wsgate"
fi
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping..." >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  # Bounded: whatever has not exited after 5 s is killed.
  for _ in $(seq 50); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT
nats-server -a 127.0.0.1 -p "$NATS_PORT" &
pids+=($!)
for i in 1 2 3; do
  "$WSGATE_BIN" --listen "127.0.0.1:$((BASE_PORT + i))" --workers 2 --demo \
    --cluster "nats://127.0.0.1:$NATS_PORT" --node-id "n$i" &
  pids+=($!)
done
sleep 1
cat <<MSG

A three-node wsgate cluster is running on loopback (Ctrl-C stops it):
  broker  nats://127.0.0.1:$NATS_PORT
  nodes   http://127.0.0.1:$((BASE_PORT + 1))  http://127.0.0.1:$((BASE_PORT + 2))  http://127.0.0.1:$((BASE_PORT + 3))

Open the demo on two different nodes and talk across them:
  http://127.0.0.1:$((BASE_PORT + 1))/demo/   and   http://127.0.0.1:$((BASE_PORT + 3))/demo/
Or:
  websocat 'ws://127.0.0.1:$((BASE_PORT + 1))/ws?user=alice'
  curl -s -XPOST 127.0.0.1:$((BASE_PORT + 3))/api/send -d '{"to":"alice","data":"hi"}'   # {"delivered":1}
  curl -s 127.0.0.1:$((BASE_PORT + 2))/api/stats | jq .cluster
MSG
wait
