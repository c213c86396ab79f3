#!/usr/bin/env bash
# Side-by-side A/B of two wsgate builds on the gateway scenarios, alternating A and B each
# round so that the machine's drift hits both alike. Prints one JSON line per run and a
# summary of medians and ratios (B / A). Loopback only; every run is bounded by a timeout.
#
#   scripts/ab.sh OLD_WSGATE NEW_WSGATE [ROUNDS]     (wsgate-bench from target/release)
#   env: AB_BENCH (wsgate-bench path), AB_SCENARIOS (default "direct room room1k idle"),
#        AB_PIN=1: one worker pinned to CPU 1 and the generator to CPU 0 (per-core mode).
#   Either build may be a peer server from benches/peers (named peer-*, e.g. peer-broadcast),
#   or a wrapper script that runs wsgate with other flags (e.g. `exec wsgate --no-ring "$@"`).
#   Echo scenarios (wsgate's /echo, closed loop): echo20 (100 x 20 B), echo1k (100 x 1 KiB),
#   echo16k (500 x 16 KiB); each reports the server's CPU per message (µs).
#   Room fan-out scenarios: fan1k and fan5k publish to rooms of 1,000 and 5,000 members as
#   fast as the gateway takes it (open loop at 100,000/s); fanmod publishes 100/s to 1,000
#   members (compare p99). Each run also reports the gateway's CPU per delivery (µs, from
#   /proc and its `deliveries` counter) and its slow-consumer (1013) closes.
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
bench=${AB_BENCH:-target/release/wsgate-bench}
scenarios=${AB_SCENARIOS:-"direct room room1k idle"}
out=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT
gen=()
start() {
  # A peer server from benches/peers (peer-*) runs on one thread or two, like wsgate.
  local one=(--workers 1 --echo-path /echo --max-message-size 1048576) two=(--workers 2 --echo-path /echo --max-message-size 1048576)
  case $(basename "$1") in peer-*) one=(--current-thread); two=(--threads 2) ;; esac
  if [ "${AB_PIN:-0}" = 1 ]; then
    taskset -c 1 "$1" --listen 127.0.0.1:0 "${one[@]}" >"$out/gw.out" 2>"$out/gw.err" &
    gen=(taskset -c 0)
  else
    "$1" --listen 127.0.0.1:0 "${two[@]}" >"$out/gw.out" 2>"$out/gw.err" &
  fi
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
    fan1k) args=(room --connections 1001 --rate 100000 --duration 8s --warmup 2s) ;;
    fan5k) args=(room --connections 5001 --rate 100000 --duration 8s --warmup 2s) ;;
    fanmod) args=(room --connections 1001 --rate 100 --duration 8s --warmup 2s) ;;
    echo20) args=(echo --path /echo --connections 100 --size 20 --duration 8s --warmup 2s) ;;
    echo1k) args=(echo --path /echo --connections 100 --size 1024 --duration 8s --warmup 2s) ;;
    echo16k) args=(echo --path /echo --connections 500 --size 16384 --duration 8s --warmup 2s) ;;
  esac
  local res cpu0 cpu1 stats
  cpu0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  res=$(timeout 120 "${gen[@]}" "$bench" "${args[@]}" --target "$addr" 2>/dev/null | tail -1) || res=
  cpu1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  case $(basename "$bin") in
    # The broadcast peer's deliveries are the messages it fed to a connection (not skipped).
    peer-*) stats=$(curl -s "http://$addr/stats" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(json.dumps({"deliveries":t["fed"],"skipped":t["skipped"],"slow_consumer_closes":0}))' 2>/dev/null) || stats=null ;;
    *) stats=$(curl -s "http://$addr/api/stats" | python3 -c 'import json,sys; t=json.load(sys.stdin)["total"]; print(json.dumps({"deliveries":t["deliveries"],"slow_consumer_closes":t["slow_consumer_closes"]}))' 2>/dev/null) || stats=null ;;
  esac
  if [ -n "$res" ]; then
    echo "{\"build\":\"$which\",\"scenario\":\"$sc\",\"round\":$round,\"cpu_ticks\":$((cpu1 - cpu0)),\"stats\":${stats:-null},\"result\":$res}" | tee -a "$out/all.jsonl"
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
        return g.get("gateway_rss_per_conn_bytes") or g.get("rss_per_conn_bytes")
    return res.get("msgs_per_sec")
def p99(r):
    return (r["result"].get("latency") or {}).get("p99_us")
def cpu_per_delivery(r):
    d = (r.get("stats") or {}).get("deliveries")
    return round(r["cpu_ticks"] * 1e4 / d, 4) if d else None
def cpu_per_msg(r):
    n = r["result"].get("received")
    return round(r["cpu_ticks"] * 1e4 / n, 4) if n else None
def slow(r):
    return (r.get("stats") or {}).get("slow_consumer_closes")
extra = {"fan1k": [("cpu_us_per_delivery", cpu_per_delivery), ("1013_closes", slow)],
         "fan5k": [("cpu_us_per_delivery", cpu_per_delivery), ("1013_closes", slow)],
         "fanmod": [("p99_us", p99), ("cpu_us_per_delivery", cpu_per_delivery)],
         "echo20": [("cpu_us_per_msg", cpu_per_msg)],
         "echo1k": [("cpu_us_per_msg", cpu_per_msg)],
         "echo16k": [("cpu_us_per_msg", cpu_per_msg)]}
for sc in sorted({r["scenario"] for r in rows}):
    for name, f in [("metric", metric)] + extra.get(sc, []):
        vals = {b: [f(r) for r in rows if r["scenario"] == sc and r["build"] == b] for b in "AB"}
        vals = {b: [v for v in vs if v is not None] for b, vs in vals.items()}
        if vals["A"] and vals["B"]:
            ma, mb = statistics.median(vals["A"]), statistics.median(vals["B"])
            ratio = f"{mb/ma:5.2f}" if ma else "  -  "
            print(f"{sc:8} {name:20} A median {ma:12.4g}  B median {mb:12.4g}  B/A {ratio}  A {vals['A']}  B {vals['B']}")
PY
