#!/usr/bin/env bash
# Side-by-side A/B of two wsgate builds on the gateway scenarios, alternating A and B each
# round so that the machine's drift hits both alike. Prints one JSON line per run and a
# summary of medians and ratios (B / A). Loopback only; every run is bounded by a timeout.
#
#   scripts/ab.sh OLD_WSGATE NEW_WSGATE [ROUNDS]     (wsgate-bench from target/release)
#   env: AB_BENCH (wsgate-bench path), AB_SCENARIOS (default "direct room room1k idle")
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
bench=${AB_BENCH:-target/release/wsgate-bench}
scenarios=${AB_SCENARIOS:-"direct room room1k idle"}
out=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT
start() {
  "$1" --listen 127.0.0.1:0 --workers 2 >"$out/gw.out" 2>"$out/gw.err" &
  pid=$!
  for _ in $(seq 100); do grep -q '^listening on' "$out/gw.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^listening on //p' "$out/gw.out")
}
run() {
  local which=$1 bin=$2 sc=$3 round=$4
  start "$bin"
  case $sc in
    direct) args=(direct --connections 1000 --window 8 --duration 8s --warmup 2s) ;;
    room) args=(room --connections 10001 --rate 10 --duration 8s --warmup 2s) ;;
    room1k) args=(room --connections 1001 --rate 100 --duration 8s --warmup 2s) ;;
    idle) args=(idle --connections 10000 --gateway-pid "$pid" --duration 3s --warmup 2s) ;;
  esac
  local res
  res=$(timeout 120 "$bench" "${args[@]}" --target "$addr" 2>/dev/null | tail -1) || res=
  if [ -n "$res" ]; then
    echo "{\"build\":\"$which\",\"scenario\":\"$sc\",\"round\":$round,\"result\":$res}" | tee -a "$out/all.jsonl"
  else
    echo "run $which $sc round $round failed (no result)" >&2
  fi
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=
}
for r in $(seq "$rounds"); do
  for sc in $scenarios; do
    if [ $((r % 2)) = 1 ]; then run A "$a" "$sc" "$r"; run B "$b" "$sc" "$r"; else run B "$b" "$sc" "$r"; run A "$a" "$sc" "$r"; fi
  done
done
python3 - "$out/all.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def metric(r):
    res = r["result"]
    if r["scenario"] == "idle":
        g = res.get("gateway") or {}
        return g.get("rss_per_conn_bytes") or g.get("bytes_per_conn")
    return res.get("msgs_per_sec")
for sc in sorted({r["scenario"] for r in rows}):
    vals = {b: [metric(r) for r in rows if r["scenario"] == sc and r["build"] == b] for b in "AB"}
    vals = {b: [v for v in vs if v is not None] for b, vs in vals.items()}
    if vals["A"] and vals["B"]:
        ma, mb = statistics.median(vals["A"]), statistics.median(vals["B"])
        print(f"{sc:8} A median {ma:12.1f}  B median {mb:12.1f}  B/A {mb/ma:5.2f}  A {vals['A']}  B {vals['B']}")
PY
