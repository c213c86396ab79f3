#!/usr/bin/env bash
# Measures wsgate against its peers and writes BENCHMARKS.md (plus raw JSON and SVG charts in
# bench-results/latest/).
#
#   scripts/bench.sh            full run: 3 rounds, 10 s measured + 2 s warm-up each (~8 min
#                               on 2 cores, plus the builds)
#   scripts/bench.sh --quick    1 round, 3 s + 1 s, 2,000 idle connections (~70 s)
#   scripts/bench.sh --per-core one pinned core per server: every server on CPU 1 with one
#                               thread (wsgate --workers 1, peers on tokio's current-thread
#                               runtime), the load generator on CPU 0 (taskset). Echo, fan-out
#                               and connect comparisons only; results in
#                               bench-results/per-core/ (the default mode's stay in
#                               bench-results/latest/, and BENCHMARKS.md shows both).
#   options: --no-build (use the binaries already in target/release and
#            benches/peers/target/release), --rounds N, --duration 10s, --warmup 2s
#            (durations in whole seconds; put --quick first if combined)
#   env:     BENCH_THREADS (load generator threads, default 1: on 2 cores a second thread
#            lowers every server's throughput), BENCH_WORKERS (server threads, default: number
#            of CPUs; 1 with --per-core), BENCH_WSGATE_ARGS (extra wsgate flags, e.g.
#            "--driver epoll"), BENCH_FANOUT_WINDOW (acknowledged publishes in flight at
#            fan-out saturation, default 4096), BENCH_FANOUT_DELIVERIES (deliveries/s of the
#            moderate fan-out rate, default 50000), BENCH_PEER_RUNTIME (with --per-core:
#            current-thread, the default, or multi-thread for tokio's multi-thread runtime with
#            one worker), CARGO_TARGET_DIR (honoured for the main crate)
#
# 1. Peer comparison: wsgate-bench `echo` (closed loop, one message in flight per connection)
#    at 100 conns x 20 B, 100 x 1 KiB and 500 x 16 KiB against wsgate's /echo,
#    fastwebsockets, tokio-tungstenite and a raw-TCP ceiling (benches/peers), alternating
#    A B C D per load and round, each server started fresh on port 0 and stopped after its run.
#    CPU time of the server (/proc/PID/stat) and of the load generator (wait4 rusage) is
#    recorded for every run.
# 2. Fan-out comparison: one publisher, rooms of 1,000 and 5,000 members (64 B padding),
#    wsgate against peer-broadcast (tokio-tungstenite + tokio::sync::broadcast), alternating
#    per load and round: (a) saturation, `wsgate-bench room --rate 0` with
#    $BENCH_FANOUT_WINDOW acknowledged publishes in flight (close to an open loop as fast as
#    the server takes publishes); delivered messages/s counted by the members, the peer's
#    skipped messages from its GET /stats, wsgate's 1013 closes from its /api/stats and from
#    the members' close frames; (b) a moderate rate ($BENCH_FANOUT_DELIVERIES deliveries/s
#    offered: 50 publishes/s to 1,000 members, 10/s to 5,000): latency p50/p99.
# 3. Connect comparison: `wsgate-bench connect` (10,000 connections, 200 in flight) against
#    wsgate's /echo (upgrade only, like the peers), wsgate's /ws (upgrade, registration and
#    welcome), fastwebsockets and tokio-tungstenite, alternating per round.
# 4. Gateway scenarios (not with --per-core), once each on a fresh gateway: connect, idle (RSS
#    per connection at ~19,000 and at 10,000 connections), direct (user-to-user messages),
#    room (one publisher, 10,000 members spread over both cores, 10 publishes/s).
# Everything targets 127.0.0.1 only, every run is bounded by a timeout, and the trap stops
# whatever this script started.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

quick=0
per_core=0
build=1
rounds=3
duration=10s
warmup=2s
idle_conns=19000
idle10k_conns=10000
connect_conns=5000
connect_cmp_conns=10000
fanout_members=(1000 5000)
direct_conns=1000
room_members=10000
args_seen=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; rounds=1; duration=3s; warmup=1s; idle_conns=2000; idle10k_conns=1000; room_members=1000
             connect_cmp_conns=2000 ;;
    --per-core) per_core=1 ;;
    --no-build) build=0 ;;
    --rounds) rounds=$2; shift ;;
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
threads=${BENCH_THREADS:-1}
fanout_window=${BENCH_FANOUT_WINDOW:-4096}
fanout_deliveries=${BENCH_FANOUT_DELIVERIES:-50000}
srv_prefix=()
gen_prefix=()
peer_rt=()
if [ "$per_core" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "--per-core needs 2 CPUs (server on 1, generator on 0)" >&2; exit 2; }
  command -v taskset >/dev/null || { echo "--per-core needs taskset (util-linux)" >&2; exit 2; }
  workers=${BENCH_WORKERS:-1}
  srv_prefix=(taskset -c 1)
  gen_prefix=(taskset -c 0)
  # One thread per peer: accept loop and connections on tokio's current-thread runtime (it
  # measured 5-15% less CPU per 20 B message for fastwebsockets than the multi-thread runtime
  # with one worker: benches/experiments.md).
  case "${BENCH_PEER_RUNTIME:-current-thread}" in
    current-thread) peer_rt=(--current-thread) ;;
    multi-thread) peer_rt=() ;;
    *) echo "BENCH_PEER_RUNTIME is current-thread or multi-thread" >&2; exit 2 ;;
  esac
else
  workers=${BENCH_WORKERS:-$(nproc)}
fi
secs() { case "$1" in *ms) echo 1 ;; *s) echo "${1%s}" ;; *) echo "$1" ;; esac; }
run_limit=$(( $(secs "$duration") + $(secs "$warmup") + 60 ))

out=bench-results/latest
[ "$per_core" = 1 ] && out=bench-results/per-core
report=scripts/bench_report.py
tmp=$(mktemp -d)
srv_pid=
run_pid=

cleanup() {
  local p
  for p in $run_pid $srv_pid; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in $run_pid $srv_pid; do
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

started=$(date +%s)
if [ "$build" = 1 ]; then
  echo "== build (release): wsgate, wsgate-bench, peers" >&2
  cargo build --release --bins
  # Its own workspace and its own target dir, whatever CARGO_TARGET_DIR says.
  (cd benches/peers && CARGO_TARGET_DIR="$repo/benches/peers/target" cargo build --release)
fi
target_dir=${CARGO_TARGET_DIR:-$repo/target}
# Private copies, so a rebuild elsewhere cannot swap a binary in the middle of the run.
bin=$tmp/bin
mkdir -p "$bin"
for f in "$target_dir/release/wsgate" "$target_dir/release/wsgate-bench" \
  benches/peers/target/release/peer-fastwebsockets \
  benches/peers/target/release/peer-tokio-tungstenite \
  benches/peers/target/release/peer-raw-tcp \
  benches/peers/target/release/peer-broadcast; do
  [ -x "$f" ] || { echo "missing $f (run without --no-build)" >&2; exit 1; }
  cp "$f" "$bin/"
done

rm -rf "$out"
mkdir -p "$out/runs" "$out/logs"

# User and system CPU ticks of a live process ("0 0" once it is gone).
cpu_ticks() {
  local line rest
  read -r line <"/proc/$1/stat" 2>/dev/null || { echo "0 0"; return; }
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo "${12} ${13}"
}

# start_server NAME [extra args]: sets srv_pid and srv_addr.
start_server() {
  local name=$1
  shift
  local cmd
  case "$name" in
    # shellcheck disable=SC2086
    wsgate) cmd=("$bin/wsgate" --listen 127.0.0.1:0 --workers "$workers" --echo-path /echo
                 --log warn --shutdown-timeout 2s ${BENCH_WSGATE_ARGS:-} "$@") ;;
    fastwebsockets) cmd=("$bin/peer-fastwebsockets" --threads "$workers" ${peer_rt[@]+"${peer_rt[@]}"}) ;;
    tokio-tungstenite) cmd=("$bin/peer-tokio-tungstenite" --threads "$workers" ${peer_rt[@]+"${peer_rt[@]}"}) ;;
    raw-tcp) cmd=("$bin/peer-raw-tcp" --threads "$workers" ${peer_rt[@]+"${peer_rt[@]}"}) ;;
    broadcast) cmd=("$bin/peer-broadcast" --threads "$workers" ${peer_rt[@]+"${peer_rt[@]}"}) ;;
    *) echo "unknown server $name" >&2; exit 1 ;;
  esac
  # Emptied here, not by the background redirect: the loop below must not read the previous
  # server's address before the new process has truncated the file.
  : >"$tmp/srv.out"
  ${srv_prefix[@]+"${srv_prefix[@]}"} "${cmd[@]}" >"$tmp/srv.out" 2>"$tmp/srv.err" &
  srv_pid=$!
  srv_addr=
  for _ in $(seq 200); do
    srv_addr=$(sed -n '1s/^listening on //p' "$tmp/srv.out")
    [ -n "$srv_addr" ] && break
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$srv_addr" ]; then
    echo "$name did not start:" >&2
    cat "$tmp/srv.out" "$tmp/srv.err" >&2
    exit 1
  fi
  case "$srv_addr" in 127.0.0.1:*) ;; *) echo "$name listens on $srv_addr, not loopback" >&2; exit 1 ;; esac
  if [ "$per_core" = 1 ]; then
    # Every thread of the server must be on CPU 1 (wsgate pins its worker inside the mask).
    local cpus
    cpus=$(cat /proc/"$srv_pid"/task/*/status 2>/dev/null | sed -n 's/^Cpus_allowed_list:\s*//p' | sort -u | tr '\n' ' ')
    [ "$cpus" = "1 " ] || { echo "$name runs on CPUs '$cpus', not 1" >&2; exit 1; }
  fi
  if [ "$name" = wsgate ] && [ ! -f "$out/wsgate-driver.txt" ]; then
    # `--driver auto` picks io_uring where the kernel allows it: count the rings.
    local rings
    rings=$(ls -l "/proc/$srv_pid/fd" 2>/dev/null | grep -c io_uring || true)
    if [ "${rings:-0}" -gt 0 ]; then echo "io_uring ($rings rings)"; else echo "epoll"; fi \
      >"$out/wsgate-driver.txt"
  fi
}

stop_server() {
  kill -TERM "$srv_pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$srv_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$srv_pid" 2>/dev/null || true
  wait "$srv_pid" 2>/dev/null || true
  srv_pid=
}

# The server's own counters after a run, as JSON (empty when it has none): wsgate's
# /api/stats (slow-consumer closes, deliveries), peer-broadcast's /stats (skipped messages).
server_stats() {
  local path
  case "$1" in wsgate) path=/api/stats ;; broadcast) path=/stats ;; *) return 0 ;; esac
  curl -s --max-time 5 "http://$srv_addr$path" || true
}

# measure NAME KIND SERVER LOAD ROUND -- wsgate-bench args...
# Runs the load generator against the running server, then stores one JSON record.
measure() {
  local name=$1 kind=$2 server=$3 load=$4 round=$5
  shift 6
  local u0 s0 u1 s1 rc=0 load0
  # The 1-minute load average before the run: other users of the machine show up here.
  read -r load0 _ </proc/loadavg
  read -r u0 s0 <<<"$(cpu_ticks "$srv_pid")"
  python3 "$report" run --rusage "$tmp/rusage" --timeout "$run_limit" -- \
    ${gen_prefix[@]+"${gen_prefix[@]}"} "$bin/wsgate-bench" "$@" >"$tmp/bench.json" 2>"$out/logs/$name.log" &
  run_pid=$!
  wait "$run_pid" || rc=$?
  run_pid=
  read -r u1 s1 <<<"$(cpu_ticks "$srv_pid")"
  : >"$tmp/srv-stats.json"
  [ "$kind" = fanout ] && server_stats "$server" >"$tmp/srv-stats.json"
  if ! kill -0 "$srv_pid" 2>/dev/null; then
    echo "   $server died during $name" >&2
    [ "$rc" != 0 ] || rc=97
  fi
  [ "$rc" = 0 ] || { echo "   wsgate-bench exited $rc (log: $out/logs/$name.log)" >&2; tail -3 "$out/logs/$name.log" >&2; }
  python3 "$report" record --out "$out/runs/$name.json" --kind "$kind" --server "$server" \
    --load "$load" --round "$round" --bench-json "$tmp/bench.json" --exit-code "$rc" \
    --server-user-ticks $((u1 - u0)) --server-sys-ticks $((s1 - s0)) --clk-tck "$(getconf CLK_TCK)" --rusage "$tmp/rusage" \
    --server-stderr "$tmp/srv.err" --server-stats "$tmp/srv-stats.json" --loadavg "$load0" --argv "$*"
}

servers=(wsgate fastwebsockets tokio-tungstenite raw-tcp)
loads=("100:20" "100:1024" "500:16384")
n_echo=$(( rounds * ${#loads[@]} * ${#servers[@]} ))
i=0
echo "== echo: ${#servers[@]} servers x ${#loads[@]} loads x $rounds rounds, $warmup + $duration each" >&2
for round in $(seq "$rounds"); do
  for load in "${loads[@]}"; do
    conns=${load%%:*}
    size=${load##*:}
    for server in "${servers[@]}"; do
      i=$((i + 1))
      extra=()
      # wsgate's defaults (64 KiB messages, 1 MiB backlog) are for a push gateway; the
      # 16 KiB x 500 load gets room to breathe. The peers have no such limits.
      if [ "$server" = wsgate ] && [ "$size" -ge 16384 ]; then
        extra=(--max-message-size 1048576 --max-queued-bytes 67108864)
      fi
      start_server "$server" ${extra[@]+"${extra[@]}"}
      name="echo-${conns}x${size}-${server}-r${round}"
      echo "   [$i/$n_echo] $name" >&2
      measure "$name" echo "$server" "${conns}x${size}" "$round" -- echo \
        --target "$srv_addr" --path /echo --connections "$conns" --size "$size" \
        --duration "$duration" --warmup "$warmup" --threads "$threads"
      stop_server
    done
  done
done

fan_servers=(wsgate broadcast)
n_fan=$(( rounds * ${#fanout_members[@]} * 2 * ${#fan_servers[@]} ))
i=0
echo "== fan-out: ${#fan_servers[@]} servers x ${#fanout_members[@]} room sizes x (saturation, moderate rate) x $rounds rounds" >&2
for round in $(seq "$rounds"); do
  for members in "${fanout_members[@]}"; do
    rate=$(( fanout_deliveries / members ))
    for mode in sat rate; do
      for server in "${fan_servers[@]}"; do
        i=$((i + 1))
        if [ "$mode" = sat ]; then pace=(--rate 0 --window "$fanout_window"); else pace=(--rate "$rate"); fi
        start_server "$server"
        name="fanout-${members}-${mode}-${server}-r${round}"
        echo "   [$i/$n_fan] $name" >&2
        measure "$name" fanout "$server" "${members}-${mode}" "$round" -- room \
          --target "$srv_addr" --connections "$((members + 1))" "${pace[@]}" --size 64 \
          --duration "$duration" --warmup "$warmup" --threads "$threads"
        stop_server
      done
    done
  done
done

# wsgate twice: /echo (the upgrade alone, as the peers do it) and /ws (upgrade, registration,
# welcome: what a gateway client waits for).
conn_servers=(wsgate-echo wsgate-ws fastwebsockets tokio-tungstenite)
n_conn=$(( rounds * ${#conn_servers[@]} ))
i=0
echo "== connect: ${#conn_servers[@]} servers x $rounds rounds, $connect_cmp_conns connections" >&2
for round in $(seq "$rounds"); do
  for server in "${conn_servers[@]}"; do
    i=$((i + 1))
    path=(--path /echo)
    srv=$server
    case "$server" in wsgate-ws) srv=wsgate; path=() ;; wsgate-echo) srv=wsgate ;; esac
    start_server "$srv"
    name="connect-${server}-r${round}"
    echo "   [$i/$n_conn] $name" >&2
    measure "$name" connect-cmp "$server" "$connect_cmp_conns" "$round" -- connect \
      --target "$srv_addr" ${path[@]+"${path[@]}"} --connections "$connect_cmp_conns" \
      --duration 1s --warmup 0s --threads "$threads"
    stop_server
  done
done

if [ "$per_core" = 0 ]; then
echo "== gateway scenarios" >&2
# scenario NAME LOAD DESCRIPTION -- WSGATE-BENCH-ARGS: on a fresh gateway, which the function
# names to the load generator with --target (and --gateway-pid where the args ask for @PID).
scenario() {
  local name=$1 load=$2 desc=$3
  shift 4
  start_server wsgate
  echo "   $name: $desc" >&2
  local args=()
  for a in "$@"; do [ "$a" = @PID ] && args+=("$srv_pid") || args+=("$a"); done
  measure "scenario-$name" "$name" wsgate "$load" 1 -- "${args[0]}" --target "$srv_addr" "${args[@]:1}"
  stop_server
}
scenario connect "$connect_conns" "$connect_conns connections" -- connect \
  --connections "$connect_conns" --gateway-pid @PID --duration 1s --warmup 0s --threads "$threads"
scenario idle "$idle_conns" "$idle_conns connections (2 processes, 2 source addresses)" -- idle \
  --connections "$idle_conns" --processes 2 --source-addrs 2 \
  --gateway-pid @PID --duration "$duration" --warmup "$warmup"
scenario idle10k "$idle10k_conns" "$idle10k_conns connections (1 process)" -- idle \
  --connections "$idle10k_conns" --gateway-pid @PID --duration "$duration" --warmup "$warmup"
scenario room "$room_members" "1 publisher + $room_members members, 10 publishes/s" -- room \
  --connections "$((room_members + 1))" --rate 10 \
  --duration "$duration" --warmup "$warmup" --threads "$threads"
scenario direct "$direct_conns" "$direct_conns connections, window 8" -- direct \
  --connections "$direct_conns" --window 8 --duration "$duration" --warmup "$warmup" --threads "$threads"

fi

crit_dir=
if [ "$quick" != 1 ] && [ "$per_core" = 0 ]; then
  echo "== criterion micro-benchmarks" >&2
  if cargo bench --bench hot_paths >"$out/logs/criterion.log" 2>&1; then
    crit_dir="${CARGO_TARGET_DIR:-$repo/target}/criterion"
  else
    echo "   cargo bench failed (log: $out/logs/criterion.log)" >&2
  fi
fi

elapsed=$(( $(date +%s) - started ))
cmd="scripts/bench.sh${args_seen[*]+ ${args_seen[*]}}"
mode=full
[ "$quick" = 1 ] && mode=quick
[ "$per_core" = 1 ] && mode="$mode per-core"
python3 "$report" report --dir "$out" --md BENCHMARKS.md --mode "$mode" \
  --command "$cmd" --built "$build" --wsgate-args "${BENCH_WSGATE_ARGS:-}" --elapsed "$elapsed" --rounds "$rounds" --duration "$duration" \
  --warmup "$warmup" --threads "$threads" --workers "$workers" --criterion "$crit_dir" \
  --peer-runtime "${BENCH_PEER_RUNTIME:-current-thread}"
echo "== done in ${elapsed}s: BENCHMARKS.md, $out/" >&2
