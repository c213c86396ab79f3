#!/usr/bin/env bash
# Checks the operations kit in deploy/ against the real gateway:
#  1. promtool check rules + promtool test rules (alert unit tests);
#  2. the Grafana dashboard is valid JSON and is what deploy/make-dashboard.py writes, and
#     every metric name (and every label value it selects on, like
#     wsgate_limit{name="mailbox_limit"}) that the dashboard or the alerts use exists in the
#     /metrics output of the real gateway: a renamed metric fails here;
#  3. promtool check metrics on that output;
#  4. systemd-analyze verify deploy/wsgate.service (no warnings allowed), when present;
#  5. every system call the gateway makes (strace, under a WebSocket + API workload) is
#     allowed by the unit's SystemCallFilter, when strace is present.
# Installs prometheus (for promtool) with apt when missing. The gateway is $WSGATE_BIN, else
# built with `cargo build --bin wsgate`. Loopback only; everything started is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

if ! command -v promtool >/dev/null; then
  log "installing prometheus (promtool)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi

if [ -n "${WSGATE_BIN:-}" ]; then
  BIN=$WSGATE_BIN
else
  log "building wsgate"
  cargo build --bin wsgate
  BIN=${CARGO_TARGET_DIR:-target}/debug/wsgate
fi
[ -x "$BIN" ] || fail "no gateway binary at $BIN"
BIN=$(readlink -f "$BIN")

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

passed=0
failed=0
check() { # check NAME CMD...: runs one check, counts it
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); log "ok: $name"; else failed=$((failed + 1)); log "FAILED: $name"; fi
}

# Starts the gateway (optionally under a wrapper such as strace); sets ADDR and GW_PID.
start_gateway() {
  local out=$WORK/gw.$RANDOM.out
  # shellcheck disable=SC2086
  "$@" "$BIN" --listen 127.0.0.1:0 --workers 2 ${GW_ARGS:-} >"$out" 2>"$out.err" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  local deadline=$((SECONDS + 20))
  until grep -q '^listening on ' "$out"; do
    kill -0 "$GW_PID" 2>/dev/null || { cat "$out.err" >&2; fail "gateway exited"; }
    [ "$SECONDS" -lt "$deadline" ] || fail "gateway did not start in 20 s"
    sleep 0.05
  done
  ADDR=$(sed -n 's/^listening on //p' "$out" | head -1)
  # Under a wrapper (strace), signal the gateway itself: a signalled strace would detach
  # and leave the gateway running.
  SIG_PID=$GW_PID
  if [ $# -gt 0 ]; then
    SIG_PID=$(cat /proc/"$GW_PID"/task/*/children 2>/dev/null | awk '{print $1; exit}')
    [ -n "$SIG_PID" ] || fail "no gateway process under $1"
    PIDS+=("$SIG_PID")
  fi
}

stop_gateway() { # SIGTERM to the gateway, wait (bounded) for it and its wrapper
  kill -TERM "$SIG_PID" 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while kill -0 "$SIG_PID" 2>/dev/null || kill -0 "$GW_PID" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { kill -KILL "$SIG_PID" "$GW_PID" 2>/dev/null || true; break; }
    sleep 0.05
  done
  wait "$GW_PID" 2>/dev/null || true
  PIDS=()
}

# A little of everything: refused upgrades, a WebSocket session, API calls.
workload() {
  local base=http://$ADDR
  curl -s -m 5 -o /dev/null "$base/ws" || true                                        # 400
  curl -s -m 5 -o /dev/null -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
    -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "$base/ws" || true  # 401
  if node --experimental-websocket -e 1 2>/dev/null; then
    timeout 20 node --experimental-websocket --input-type=module -e "
      const open = (u) => new Promise((res, rej) => { const w = new WebSocket('ws://$ADDR/ws?user=' + u);
        w.onmessage = (e) => { const m = JSON.parse(e.data); if (m.type === 'welcome') res(w); };
        w.onerror = rej; });
      const [a, b] = await Promise.all([open('a'), open('b')]);
      const acks = [];
      a.onmessage = (e) => acks.push(JSON.parse(e.data));
      a.send(JSON.stringify({type: 'join', room: 'r', id: 1}));
      b.send(JSON.stringify({type: 'join', room: 'r', id: 1}));
      for (let i = 0; i < 50; i++) a.send(JSON.stringify({type: 'send', to: 'b', data: i, id: 10 + i}));
      a.send(JSON.stringify({type: 'publish', room: 'r', data: 'x', id: 99}));
      const t0 = Date.now();
      while (!acks.some((m) => m.id === 99) && Date.now() - t0 < 10000) await new Promise((r) => setTimeout(r, 10));
      a.close(); b.close();
    " || fail "WebSocket workload failed"
  fi
  curl -s -m 5 -o /dev/null -XPOST "$base/api/publish" -d '{"room":"r","data":1}'
  curl -s -m 5 -o /dev/null "$base/api/presence/a"
  curl -s -m 5 -o /dev/null "$base/api/stats"
  curl -s -m 5 -o /dev/null "$base/healthz"
}

# ---- 1. alert rules ----
check "promtool check rules" promtool check rules deploy/prometheus-alerts.yml
check "promtool test rules" promtool test rules deploy/prometheus-alerts.test.yml

# ---- 2, 3. metrics used by the dashboard and the alerts exist in the real /metrics ----
# In cluster mode, so that the cluster panels and alert are checked too: a nats-server on a
# free loopback port (installed by scripts/test-cluster.sh when missing).
if ! command -v nats-server >/dev/null; then
  log "installing nats-server (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q nats-server >/dev/null
fi
NATS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
deadline=$((SECONDS + 10))
until (exec 3<>/dev/tcp/127.0.0.1/"$NATS_PORT") 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || fail "nats-server did not start"
  sleep 0.05
done
log "scraping the real gateway ($BIN) in cluster mode"
GW_ARGS="--cluster nats://127.0.0.1:$NATS_PORT --node-id deploy-check" start_gateway
deadline=$((SECONDS + 10))
until curl -sf -m 2 "http://$ADDR/readyz" >/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the gateway never became ready (broker)"
  sleep 0.1
done
workload
curl -sf -m 5 "http://$ADDR/metrics" >"$WORK/metrics.txt" || fail "GET /metrics failed"
stop_gateway
kill "$NATS_PID" 2>/dev/null || true
wait "$NATS_PID" 2>/dev/null || true

check_metric_names() {
  python3 - "$WORK/metrics.txt" deploy/grafana-dashboard.json deploy/prometheus-alerts.yml <<'PY'
import json, re, sys

metrics_file, dashboard_file, alerts_file = sys.argv[1:4]
series = {}  # name -> list of label dicts
for line in open(metrics_file):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s', line)
    if not m:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
    series.setdefault(m.group(1), []).append(labels)

try:
    dash = json.load(open(dashboard_file))
except ValueError as e:
    sys.exit(f"{dashboard_file} is not valid JSON: {e}")

exprs = []  # (where, expression)
def walk(node, where):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                exprs.append((where, v))
            else:
                walk(v, where)
    elif isinstance(node, list):
        for item in node:
            title = item.get("title") if isinstance(item, dict) else None
            walk(item, f"{dashboard_file}: panel '{title}'" if title else where)
walk(dash, dashboard_file)

# Alerts: the expression lines, without comments (the cluster placeholder stays a comment).
text = "".join("\n" if l.lstrip().startswith("#") else l for l in open(alerts_file))
for m in re.finditer(r"expr:[ \t]*(\|[^\n]*\n((?:[ \t]+[^\n]*\n)+)|[^\n]+)", text):
    exprs.append((alerts_file, m.group(2) if m.group(2) else m.group(1)))

problems, used = [], set()
for where, expr in exprs:
    for m in re.finditer(r'\b(wsgate_[a-zA-Z0-9_]+)(\{([^}]*)\})?', expr):
        name, matchers = m.group(1), m.group(3) or ""
        used.add(name)
        if name not in series:
            problems.append(f"{where}: metric {name} is not exported by the gateway")
            continue
        for label, value in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"]*)"', matchers):
            if label in ("job", "instance") or "$" in value:
                continue
            if not any(s.get(label) == value for s in series[name]):
                problems.append(f'{where}: {name}{{{label}="{value}"}} has no such series in /metrics')
if not exprs or not used:
    problems.append("no expressions found: the checker is broken")
for p in sorted(set(problems)):
    print("  " + p, file=sys.stderr)
unused = sorted(n for n in series if n.startswith("wsgate_") and n not in used)
print(f"  {len(used)} metric names used, all checked against {len(series)} exported"
      + (f"; exported but not on the dashboard/alerts: {', '.join(unused)}" if unused else ""), file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}
check "dashboard JSON parses; its metrics and the alerts' exist in /metrics" check_metric_names
check "deploy/grafana-dashboard.json is what deploy/make-dashboard.py writes" \
  sh -c "python3 deploy/make-dashboard.py - | cmp -s - deploy/grafana-dashboard.json"
check "promtool check metrics" sh -c "promtool check metrics < '$WORK/metrics.txt'"

# ---- 4. systemd unit ----
verify_unit() {
  # verify insists that ExecStart exists: point it at the binary under test.
  mkdir -p "$WORK/unit"
  sed "s#^ExecStart=/usr/local/bin/wsgate#ExecStart=$BIN#" deploy/wsgate.service >"$WORK/unit/wsgate.service"
  local out
  out=$(systemd-analyze verify "$WORK/unit/wsgate.service" 2>&1) || { echo "$out" >&2; return 1; }
  [ -z "$out" ] || { echo "$out" >&2; echo "  (warnings count as failures)" >&2; return 1; }
}
if command -v systemd-analyze >/dev/null; then
  check "systemd-analyze verify deploy/wsgate.service" verify_unit
else
  log "skipped: systemd-analyze verify (systemd-analyze is not installed)"
fi

# ---- 5. the gateway's system calls are all allowed by SystemCallFilter ----
syscall_filter() {
  start_gateway strace -f -qq -o "$WORK/strace.txt"
  workload
  curl -sf -m 5 -o /dev/null "http://$ADDR/metrics"
  stop_gateway
  python3 - "$WORK/strace.txt" deploy/wsgate.service <<'PY'
import re, subprocess, sys
trace, unit = sys.argv[1:3]
cache = {}
def expand(item):
    if not item.startswith("@"):
        return {item}
    if item not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", item], capture_output=True, text=True, check=True).stdout
        names = set()
        for line in out.splitlines()[1:]:
            t = line.strip()
            if t and not t.startswith("#"):
                names |= expand(t)
        cache[item] = names
    return cache[item]
allowed, denied = set(), set()
for line in open(unit):
    m = re.match(r"SystemCallFilter=(~?)(.*)", line.strip())
    if m:
        names = set().union(*(expand(t) for t in m.group(2).split()))
        (denied if m.group(1) else allowed).update(names)
used = set()
for line in open(trace):
    m = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
    if m:
        used.add(m.group(1))
# The gateway's own calls: the exec and the dynamic loader run before the filter applies too,
# but they are in @system-service as well, so nothing is exempted.
bad = sorted(s for s in used if s not in allowed or s in denied)
print(f"  {len(used)} distinct system calls traced", file=sys.stderr)
if bad:
    print("  not allowed by the unit's SystemCallFilter: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
PY
}
if command -v strace >/dev/null && command -v systemd-analyze >/dev/null; then
  check "every system call the gateway makes is allowed by SystemCallFilter" syscall_filter
else
  log "skipped: system-call check (needs strace and systemd-analyze)"
fi

echo "test-deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
