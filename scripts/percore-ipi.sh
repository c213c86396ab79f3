#!/usr/bin/env bash
# Per-core echo, wsgate against fastwebsockets, with the load generator's io_uring rings set
# up with and without IORING_SETUP_COOP_TASKRUN, counting the rescheduling interrupts (RES,
# /proc/interrupts) on the generator's CPU per message. Server on CPU 1 (one thread), the
# generator on CPU 0, 100 connections, 5 s after 1 s of warm-up, ROUNDS rounds alternating.
# Loopback only; every run bounded by a timeout. Needs the release binaries:
#   cargo build --release --bins && (cd benches/peers && cargo build --release)
#   scripts/percore-ipi.sh [ROUNDS]          (BENCHMARKS.md, Experiments: "COOP_TASKRUN")
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
gw=target/release/wsgate bench=target/release/wsgate-bench
fws=benches/peers/target/release/peer-fastwebsockets
out=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$out"' EXIT
hz=$(getconf CLK_TCK)
cpu() { awk -v hz="$hz" '{print ($14+$15)/hz}' "/proc/$1/stat"; }
res0() { awk '/RES:/ {print $2}' /proc/interrupts; }
for r in $(seq "$rounds"); do
  for size in 20 1024; do
    for coop in false true; do
      for name in wsgate fastwebsockets; do
        if [ "$name" = wsgate ]; then
          taskset -c 1 "$gw" --listen 127.0.0.1:0 --workers 1 --echo-path /echo --log warn >"$out/srv" 2>&1 &
        else
          taskset -c 1 "$fws" --current-thread >"$out/srv" 2>&1 &
        fi
        pid=$!
        for _ in $(seq 100); do grep -qo '127.0.0.1:[0-9]*' "$out/srv" && break; sleep 0.05; done
        addr=$(grep -o '127.0.0.1:[0-9]*' "$out/srv" | head -1)
        c0=$(cpu "$pid"); i0=$(res0)
        json=$(taskset -c 0 timeout 60 "$bench" echo --coop-taskrun "$coop" --target "$addr" \
          --path /echo --connections 100 --size "$size" --duration 5s --warmup 1s 2>/dev/null | tail -1)
        c1=$(cpu "$pid"); i1=$(res0)
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
        python3 - "$json" "$r" "$size" "$coop" "$name" "$c0" "$c1" "$i0" "$i1" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); n = max(1, d["received"])
r, size, coop, name = sys.argv[2:6]; c0, c1, i0, i1 = map(float, sys.argv[6:10])
print(f"round {r} size {size} coop_taskrun={coop} {name}: {d['msgs_per_sec']:.0f} msg/s, "
      f"server {(c1 - c0) * 1e6 / n:.2f} us/msg, RES on CPU 0 {(i1 - i0) / n:.3f}/msg")
PY
      done
    done
  done
done
