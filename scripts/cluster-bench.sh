#!/usr/bin/env bash
# Cluster benchmark: 100,000 WebSocket connections over six wsgate nodes joined by one
# nats-server (or one redis-server with --broker redis), on one 2-vCPU machine, all on
# loopback.
#
#   scripts/cluster-bench.sh            full run: 100,000 connections, ~3 min
#   scripts/cluster-bench.sh --quick    10,000 connections, shorter phases, ~1.5 min
#   options: --out DIR (default bench-results/cluster-latest; it is emptied first),
#            --connections N, --nodes K (each node must stay under ~17,000 connections),
#            --build (cargo build --release --bins first; default: use target/release),
#            --broker nats|redis (default nats)
#   env:     CARGO_TARGET_DIR (honoured), CLUSTER_BENCH_PYTHON (a python with `websockets`
#            for the latency probe; default target/pyenv/bin/python, else python3)
#
# Phases, each bounded by a timeout, on one broker and K nodes started by this script
# (`wsgate --workers 1 --no-pin`, see below):
# 1. idle: one `wsgate-bench idle` group per node (a node has one address and --target takes
#    one), each group 2 processes over 4 source addresses (a process holds at most 20,000
#    fds). Reports the wall time until every node counts its connections (/api/stats), each
#    group's own connect time, and each node's RSS per connection (RSS after minus RSS
#    before, read from /proc by this script and by the bench).
# 2. broadcast: one POST /api/broadcast on n1 while every connection is open. `delivered`
#    must equal the connections counted over all nodes. The idle bench discards what it
#    reads, so it cannot time the last delivery; instead this script polls every node's
#    /api/stats (from a second thread, while the call runs) until each node's `messages_out` grew by its connection count
#    and its `queued_bytes` is back to 0 (every frame written to its socket): that time,
#    from just before the POST, is the server-side time to the last delivery (upper bound
#    with the poll's resolution; a client's read after the kernel handoff is not in it).
# 3. direct, closed loop (1,000 connections, 8 sends in flight each, acked with counts):
#    - single node: a standalone wsgate (no --cluster, --workers = CPUs, the configuration
#      of BENCHMARKS.md) - the reference;
#    - cluster, one node: the same load on n1 only (cluster mode, every user local);
#    - cluster, cross node: the same 1,000 connections split over the K nodes by running
#      the bench's K children by hand (`--processes K --child k`, child k on node k: it
#      holds connections i = k mod K, users u<i>), so a send to a random user leaves its
#      node with probability (K-1)/K. wsgate-bench has no "all remote" mode; the share of
#      cross-node deliveries is reported with the figure.
# 4. latency at a moderate rate (uncounted `send`, 1,000 msg/s, one sender and one
#    receiver, a small Python client, the same for every case): standalone node, cluster
#    same node, cluster cross node (sender on n1, receiver on n2). Every delivery crosses
#    in the last case; added p99 = cross - standalone.
# Nodes run --workers 1 --no-pin: six nodes already oversubscribe two vCPUs, a second worker
# per node would add cross-core hops inside a node without adding CPU, and --no-pin because
# worker 0 of every node would otherwise be pinned to CPU 0.
# Output: DIR/summary.json, one JSON per bench run under DIR/runs/, logs under DIR/logs/, and
# a summary table on stdout. The trap stops every process this script started (by PID), and
# a watchdog ends the script after a fixed limit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

quick=0
build=0
out=bench-results/cluster-latest
conns=100000
nodes=6
hold=35         # seconds each idle group holds its connections after its connects
dur=8           # direct: measured seconds
warm=2
probe_secs=6
broker=nats
args_seen=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; conns=10000; hold=15; dur=4; warm=1; probe_secs=3 ;;
    --out) out=$2; shift ;;
    --connections) conns=$2; shift ;;
    --nodes) nodes=$2; shift ;;
    --broker) broker=$2; shift ;;
    --build) build=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
per_node=$(( (conns + nodes - 1) / nodes ))
if [ "$per_node" -gt 17000 ]; then
  echo "$per_node connections per node: over ~17,000 (20,000 fds per process); add --nodes" >&2
  exit 2
fi
case "$broker" in
  nats|redis) ;;
  *) echo "--broker must be nats or redis, not $broker" >&2; exit 2 ;;
esac
command -v "$broker-server" >/dev/null || { echo "$broker-server is missing: scripts/test-cluster.sh --no-run installs it" >&2; exit 1; }
py=${CLUSTER_BENCH_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x target/pyenv/bin/python ]; then py=target/pyenv/bin/python; else py=python3; fi
fi
have_ws=1
"$py" -c 'import websockets' 2>/dev/null || have_ws=0

tmp=$(mktemp -d /tmp/cluster-bench.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  local p alive
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in ${pids[@]+"${pids[@]}"}; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

started=$(date +%s)
# Watchdog: the whole run is bounded (the phases below have their own, shorter limits).
limit=$(( quick == 1 ? 300 : 900 ))
(
  trap 'kill "$s" 2>/dev/null; exit 0' TERM
  sleep "$limit" & s=$!
  wait "$s"
  echo "cluster-bench: over ${limit}s, stopping" >&2
  kill -TERM $$
) &
pids+=($!)

if [ "$build" = 1 ]; then cargo build --release --bins; fi
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin=$tmp/bin
mkdir -p "$bin"
for f in wsgate wsgate-bench; do
  [ -x "$target_dir/release/$f" ] || { echo "missing $target_dir/release/$f (cargo build --release --bins, or --build)" >&2; exit 1; }
  cp "$target_dir/release/$f" "$bin/"
done
rm -rf "$out"
mkdir -p "$out/runs" "$out/logs"
B=$bin/wsgate-bench

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
stat_json() { curl -s --max-time 2 "http://$1/api/stats"; }
jget() { "$py" -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

# start_node NAME [args]: sets node_pid, node_addr.
start_node() {
  local name=$1
  shift
  "$bin/wsgate" --listen 127.0.0.1:0 --log warn --shutdown-timeout 2s "$@" \
    >"$tmp/$name.out" 2>"$out/logs/$name.err" &
  node_pid=$!
  pids+=("$node_pid")
  node_addr=
  for _ in $(seq 200); do
    node_addr=$(sed -n '1s/^listening on //p' "$tmp/$name.out")
    [ -n "$node_addr" ] && break
    kill -0 "$node_pid" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$node_addr" ] || { echo "$name did not start:" >&2; cat "$out/logs/$name.err" >&2; exit 1; }
  case "$node_addr" in 127.0.0.1:*) ;; *) echo "$name listens on $node_addr" >&2; exit 1 ;; esac
}

stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

total_conns() {
  local n=0 a c
  for a in "${addr[@]}"; do
    c=$(stat_json "$a" | jget 'd["connections"]' 2>/dev/null || echo 0)
    n=$((n + c))
  done
  echo "$n"
}

# The Python helper: broadcast timing, latency probe, summary.
cat >"$tmp/helper.py" <<'PY'
import asyncio, json, sys, time, urllib.request

def stats(a):
    with urllib.request.urlopen(f"http://{a}/api/stats", timeout=2) as r:
        return json.load(r)

def bcast(origin, addrs, out, limit):
    before = {a: stats(a) for a in addrs}
    want = {a: before[a]["connections"] for a in addrs}
    base = {a: before[a]["total"]["messages_out"] for a in addrs}
    body = json.dumps({"data": {"bench": "broadcast", "t": time.time()}}).encode()
    req = urllib.request.Request(f"http://{origin}/api/broadcast", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    import threading
    resp, api = {}, [None]
    def call():
        with urllib.request.urlopen(req, timeout=30) as r:
            resp.update(json.load(r))
        api[0] = time.perf_counter() - t0
    th = threading.Thread(target=call)
    t0 = time.perf_counter()
    th.start()                                  # the nodes are polled while the call runs
    done, polls = {}, 0
    while len(done) < len(addrs) and time.perf_counter() - t0 < limit:
        for a in addrs:
            if a in done:
                continue
            s = stats(a)
            polls += 1
            if s["total"]["messages_out"] - base[a] >= want[a] and s["total"]["queued_bytes"] == 0:
                done[a] = time.perf_counter() - t0
        time.sleep(0.002)
    th.join(30)
    api = api[0]
    res = {
        "delivered": resp.get("delivered"),
        "connections_counted": sum(want.values()),
        "per_node_connections": want,
        "api_latency_ms": round(api * 1000, 2) if api is not None else None,
        "last_delivery_ms": round(max(done.values()) * 1000, 1) if len(done) == len(addrs) else None,
        "per_node_last_ms": {a: round(v * 1000, 1) for a, v in done.items()},
        "polls": polls,
        "note": "server side: every node's messages_out grew by its connections and queued_bytes is 0",
    }
    json.dump(res, open(out, "w"), indent=1)

async def probe(send_addr, recv_addr, rate, secs, tag, out):
    import websockets
    ru = f"probe-r-{tag}"
    async with websockets.connect(f"ws://{recv_addr}/ws?user={ru}", compression=None) as r, \
               websockets.connect(f"ws://{send_addr}/ws?user=probe-s-{tag}", compression=None) as s:
        await r.recv(); await s.recv()          # welcomes: routable from every node now
        n = int(rate * secs)
        lat = {}
        async def reader():
            async for m in r:
                now = time.perf_counter_ns()
                if m.startswith('{"type":"message"'):
                    d = json.loads(m)["data"]
                    lat[d["i"]] = now - d["t"]
                    if d["i"] == n - 1:
                        return
        async def drain():
            async for _ in s:
                pass
        rt = asyncio.create_task(reader())
        dt = asyncio.create_task(drain())
        period = 1.0 / rate
        t0 = time.perf_counter()
        for i in range(n):
            await s.send(json.dumps({"type": "send", "to": ru,
                                     "data": {"t": time.perf_counter_ns(), "i": i}}))
            delay = t0 + (i + 1) * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(rt, 5)
        except asyncio.TimeoutError:
            pass
        dt.cancel()
    skip = n // 10                               # warm-up: the first 10 %
    v = sorted(x for i, x in lat.items() if i >= skip)
    q = lambda p: round(v[min(len(v) - 1, int(p * len(v)))] / 1000, 1) if v else None
    res = {"sent": n, "received": len(lat), "rate": rate, "measured": len(v),
           "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999),
           "max_us": round(v[-1] / 1000, 1) if v else None}
    json.dump(res, open(out, "w"), indent=1)

def summary(d, meta_path):
    import os
    meta = json.load(open(meta_path))
    R = lambda f: json.load(open(os.path.join(d, "runs", f))) if os.path.exists(os.path.join(d, "runs", f)) else None
    K = meta["nodes"]
    idle = [R(f"idle-n{k}.json") for k in range(1, K + 1)]
    rss = []
    for k in range(1, K + 1):
        n = meta["rss"][f"n{k}"]
        c = n["connections"]
        rss.append({"node": f"n{k}", "connections": c, "rss_before_kib": n["before"],
                    "rss_after_kib": n["after"],
                    "rss_per_conn_bytes": round((n["after"] - n["before"]) * 1024 / c) if c else None,
                    "bench_rss_per_conn_bytes": ((idle[k - 1] or {}).get("gateway") or {}).get("gateway_rss_per_conn_bytes")})
    bc = R("broadcast.json")
    single = R("direct-single.json")
    local = R("direct-cluster-local.json")
    cross_parts = [R(f"direct-cross-c{k}.json") for k in range(K)]
    cp = [p["result"] for p in cross_parts if p]
    cross = None
    if cp:
        secs = cp[0]["measured_secs"]
        cross = {"connected": sum(p["connected"] for p in cp), "failed": sum(p["failed"] for p in cp),
                 "sent": sum(p["sent"] for p in cp), "received": sum(p["received"] for p in cp),
                 "msgs_per_sec": round(sum(p["measured_received"] for p in cp) / secs),
                 "cross_node_share": round((K - 1) / K, 3)}
    probes = {k: R(f"probe-{k}.json") for k in ("standalone", "cluster-local", "cluster-cross")}
    s_rate = (single or {}).get("msgs_per_sec")
    c_rate = (cross or {}).get("msgs_per_sec")
    ratio = round(c_rate / s_rate, 3) if s_rate and c_rate else None
    p_s = (probes["standalone"] or {}).get("p99_us")
    p_c = (probes["cluster-cross"] or {}).get("p99_us")
    added = round((p_c - p_s) / 1000, 3) if p_s is not None and p_c is not None else None
    connected = sum((i or {}).get("connected", 0) for i in idle)
    res = {"broker": meta.get("broker", "nats"),
        "mode": meta["mode"], "command": meta["command"], "elapsed_s": meta["elapsed"],
        "machine": meta["machine"], "nodes": K, "workers_per_node": 1,
        "connections_target": meta["connections"],
        "idle": {"connected": connected, "failed": sum((i or {}).get("failed", 0) for i in idle),
                 "counted_by_nodes": meta["counted"],
                 "connect_wall_s": meta["connect_wall_s"],
                 "connect_secs_per_group": [(i or {}).get("connect_secs") for i in idle],
                 "handshake_p99_us_per_group": [((i or {}).get("handshake") or {}).get("p99_us") for i in idle],
                 "rss": rss},
        "broadcast": bc,
        "direct": {"single_node_standalone": single, "cluster_one_node": local, "cluster_cross_node": cross},
        "latency_probe": probes,
        "goals": {
            "cross_vs_single_throughput": ratio, "throughput_goal_met": ratio is not None and ratio >= 0.5,
            "added_p99_ms": added, "latency_goal_met": added is not None and added <= 2.0,
            "broadcast_delivered": (bc or {}).get("delivered"),
            "broadcast_exact": bc is not None and bc.get("delivered") == meta["connections"] == meta["counted"],
        },
    }
    json.dump(res, open(os.path.join(d, "summary.json"), "w"), indent=1)
    f = lambda x, u="": "n/a" if x is None else (f"{int(x):,}{u}" if isinstance(x, int) or float(x).is_integer() else f"{x:,.1f}{u}")
    rows = [
        ("connections (connected / target)", f"{connected:,} / {meta['connections']:,} ({K} nodes, counted by nodes {meta['counted']:,})"),
        ("connect, wall time to all counted", f(meta["connect_wall_s"], " s") + f"  ({round(connected / meta['connect_wall_s']) if meta['connect_wall_s'] else 0:,}/s)"),
        ("RSS per connection, per node", ", ".join(f"{r['node']} {f(r['rss_per_conn_bytes'], ' B')}" for r in rss)),
        ("broadcast delivered", f"{f((bc or {}).get('delivered'))} (expected {meta['counted']:,})"),
        ("broadcast API call", f((bc or {}).get("api_latency_ms"), " ms")),
        ("broadcast, last delivery (server side)", f((bc or {}).get("last_delivery_ms"), " ms")),
        ("direct single node (standalone)", f"{f(s_rate)} msg/s, p99 {f(((single or {}).get('latency') or {}).get('p99_us'), ' us')}"),
        ("direct cluster, one node", f"{f((local or {}).get('msgs_per_sec'))} msg/s, p99 {f(((local or {}).get('latency') or {}).get('p99_us'), ' us')}"),
        ("direct cluster, cross node", f"{f(c_rate)} msg/s ({(K - 1)}/{K} of deliveries cross nodes), ratio {ratio} (goal >= 0.5)"),
    ]
    for k, p in probes.items():
        if p:
            rows.append((f"latency @{p['rate']}/s, {k}", f"p50 {f(p['p50_us'], ' us')}, p99 {f(p['p99_us'], ' us')}, received {p['received']}/{p['sent']}"))
    rows.append(("added p99, cross vs standalone", f(added, " ms") + " (goal <= 2 ms)"))
    w = max(len(a) for a, _ in rows)
    print(f"\n== cluster-bench ({meta['mode']}, {meta.get('broker', 'nats')}), {meta['elapsed']} s")
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    print(f"  goals: throughput {'met' if res['goals']['throughput_goal_met'] else 'NOT met'}, "
          f"latency {'met' if res['goals']['latency_goal_met'] else 'NOT met'}, "
          f"broadcast exact {'yes' if res['goals']['broadcast_exact'] else 'NO'}")

if __name__ == "__main__":
    c = sys.argv[1]
    if c == "bcast":
        bcast(sys.argv[2], sys.argv[3].split(","), sys.argv[4], float(sys.argv[5]))
    elif c == "probe":
        asyncio.run(asyncio.wait_for(probe(sys.argv[2], sys.argv[3], float(sys.argv[4]),
                                           float(sys.argv[5]), sys.argv[6], sys.argv[7]), 60))
    elif c == "summary":
        summary(sys.argv[2], sys.argv[3])
PY

# ---- broker and nodes
broker_port=$(free_port)
if [ "$broker" = nats ]; then
  nats-server -a 127.0.0.1 -p "$broker_port" >"$out/logs/nats.log" 2>&1 &
else
  redis-server --bind 127.0.0.1 --port "$broker_port" --save '' --appendonly no \
    >"$out/logs/redis.log" 2>&1 &
fi
pids+=($!)
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null && break
  sleep 0.1
done
addr=()
npid=()
for k in $(seq "$nodes"); do
  start_node "n$k" --workers 1 --no-pin --cluster "$broker://127.0.0.1:$broker_port" --node-id "n$k"
  addr+=("$node_addr")
  npid+=("$node_pid")
done
for _ in $(seq 100); do
  n=$(stat_json "${addr[0]}" | jget 'len(d["cluster"]["nodes"])' 2>/dev/null || echo 0)
  [ "$n" = "$nodes" ] && break
  sleep 0.1
done
[ "$n" = "$nodes" ] || { echo "only $n of $nodes nodes see each other" >&2; exit 1; }
echo "== broker $broker 127.0.0.1:$broker_port, nodes: ${addr[*]}" >&2

# ---- phase 1: idle connections
echo "== idle: $conns connections over $nodes nodes ($per_node per node, 2 processes x 4 source addresses each)" >&2
declare -A rss_before
gpids=()
left=$conns
t0=$(date +%s.%N)
for k in $(seq "$nodes"); do
  c=$(( left < per_node ? left : per_node ))
  left=$((left - c))
  rss_before[$k]=$(rss_kib "${npid[k-1]}")
  timeout -k 5 $((hold + 150)) "$B" idle --target "${addr[k-1]}" --connections "$c" \
    --processes 2 --source-addrs 4 --gateway-pid "${npid[k-1]}" --warmup 0s --duration "${hold}s" \
    >"$out/runs/idle-n$k.json" 2>"$out/logs/idle-n$k.log" &
  gpids+=($!)
  pids+=($!)
done
counted=0
connect_wall=
for _ in $(seq 1200); do      # up to 120 s
  counted=$(total_conns)
  if [ "$counted" -ge "$conns" ]; then
    connect_wall=$("$py" -c "import sys; print(round($(date +%s.%N) - $t0, 2))")
    break
  fi
  sleep 0.1
done
echo "   counted $counted connections${connect_wall:+ in ${connect_wall}s}" >&2
sleep 3    # the idle bench samples RSS 2 s after its connects; let the nodes settle as well
rss_json="{"
for k in $(seq "$nodes"); do
  c=$(stat_json "${addr[k-1]}" | jget 'd["connections"]')
  rss_json+="\"n$k\": {\"before\": ${rss_before[$k]}, \"after\": $(rss_kib "${npid[k-1]}"), \"connections\": $c},"
done
rss_json="${rss_json%,}}"

echo "== broadcast from n1" >&2
if [ "$counted" -gt 0 ]; then
  counted=$(total_conns)
  "$py" "$tmp/helper.py" bcast "${addr[0]}" "$(IFS=,; echo "${addr[*]}")" "$out/runs/broadcast.json" 20 \
    || echo "   broadcast measurement failed" >&2
  cat "$out/runs/broadcast.json" >&2 || true
fi
for p in "${gpids[@]}"; do wait "$p" || echo "   an idle group exited $?" >&2; done
# Every connection closed before the direct phases (they reuse user names u0, u1, ...).
for _ in $(seq 300); do [ "$(total_conns)" = 0 ] && break; sleep 0.1; done

# ---- phase 3: direct, closed loop
dlimit=$((dur + warm + 60))
dargs=(--connections 1000 --window 8 --warmup "${warm}s" --duration "${dur}s")
echo "== direct: standalone single node (--workers $(nproc))" >&2
start_node single
single_pid=$node_pid
single_addr=$node_addr
timeout -k 5 "$dlimit" "$B" direct --target "$single_addr" "${dargs[@]}" \
  >"$out/runs/direct-single.json" 2>"$out/logs/direct-single.log" || echo "   exited $?" >&2
echo "== direct: cluster, all on n1" >&2
timeout -k 5 "$dlimit" "$B" direct --target "${addr[0]}" "${dargs[@]}" \
  >"$out/runs/direct-cluster-local.json" 2>"$out/logs/direct-cluster-local.log" || echo "   exited $?" >&2
for _ in $(seq 100); do [ "$(total_conns)" = 0 ] && break; sleep 0.1; done
echo "== direct: cluster, connections split over $nodes nodes (child k on node k)" >&2
cpids=()
for k in $(seq 0 $((nodes - 1))); do
  timeout -k 5 "$dlimit" "$B" direct --target "${addr[k]}" "${dargs[@]}" --processes "$nodes" --child "$k" \
    >"$tmp/direct-cross-c$k.out" 2>"$out/logs/direct-cross-c$k.log" &
  cpids+=($!)
  pids+=($!)
done
for p in "${cpids[@]}"; do wait "$p" || echo "   a child exited $?" >&2; done
for k in $(seq 0 $((nodes - 1))); do
  grep '"result"' "$tmp/direct-cross-c$k.out" >"$out/runs/direct-cross-c$k.json" || rm -f "$out/runs/direct-cross-c$k.json"
done
for _ in $(seq 100); do [ "$(total_conns)" = 0 ] && break; sleep 0.1; done

# ---- phase 4: latency probe
if [ "$have_ws" = 1 ]; then
  echo "== latency probe: 1000 msg/s for ${probe_secs}s each" >&2
  for case in "standalone $single_addr $single_addr" "cluster-local ${addr[0]} ${addr[0]}" \
    "cluster-cross ${addr[0]} ${addr[1]}"; do
    set -- $case
    timeout -k 5 90 "$py" "$tmp/helper.py" probe "$2" "$3" 1000 "$probe_secs" "$1" "$out/runs/probe-$1.json" \
      2>"$out/logs/probe-$1.log" || echo "   probe $1 failed (log: $out/logs/probe-$1.log)" >&2
  done
else
  echo "== latency probe skipped: $py has no websockets package" >&2
fi
stop_pid "$single_pid"

elapsed=$(( $(date +%s) - started ))
cmd="scripts/cluster-bench.sh${args_seen[*]+ ${args_seen[*]}}"
machine="$(nproc) vCPU, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), fd limit $(ulimit -n)"
cat >"$tmp/meta.json" <<EOF
{"mode": "$([ $quick = 1 ] && echo quick || echo full)", "broker": "$broker", "command": "$cmd", "elapsed": $elapsed,
 "machine": "$machine", "nodes": $nodes, "connections": $conns, "counted": $counted,
 "connect_wall_s": ${connect_wall:-null}, "rss": $rss_json}
EOF
cp "$tmp/meta.json" "$out/meta.json"
"$py" "$tmp/helper.py" summary "$out" "$tmp/meta.json"
echo "== done in ${elapsed}s: $out/summary.json" >&2
