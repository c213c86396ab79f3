#!/usr/bin/env python3
"""scripts/bench.sh's helper (python3, standard library only).

  run       run a command with a timeout; write its CPU time (wait4 rusage: user, system) and
            wall time; forward SIGINT/SIGTERM to it
  record    merge one wsgate-bench JSON result with the CPU times into runs/NAME.json
  report    medians, ratios, CPU cost, scenarios -> BENCHMARKS.md, plus SVG charts
  rerender  BENCHMARKS.md again from every mode's stored summary (after editing
            benches/experiments.md or benches/soak.md)
"""

import argparse
import datetime
import glob
import html
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

SERVERS = ["wsgate", "fastwebsockets", "tokio-tungstenite", "raw-tcp"]
LABELS = {
    "wsgate": "wsgate",
    "fastwebsockets": "fastwebsockets",
    "tokio-tungstenite": "tokio-tungstenite",
    "raw-tcp": "raw TCP (ceiling)",
}
COLORS = {
    "wsgate": "#d62728",
    "fastwebsockets": "#1f77b4",
    "tokio-tungstenite": "#2ca02c",
    "raw-tcp": "#7f7f7f",
}
LOADS = ["100x20", "100x1024", "500x16384"]


def load_label(load):
    conns, size = load.split("x")
    size = int(size)
    s = f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"
    return f"{conns} conns × {s}"


# ---------------------------------------------------------------------------------- run


def cmd_run(a):
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    t0 = time.monotonic()
    p = subprocess.Popen(cmd)
    reaped = threading.Event()

    def send(sig):
        if not reaped.is_set():
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def forward(signum, _frame):
        send(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def expire():
        if reaped.wait(a.timeout):
            return
        print(f"timeout after {a.timeout}s: stopping {cmd[0]}", file=sys.stderr)
        send(signal.SIGTERM)
        if not reaped.wait(5):
            send(signal.SIGKILL)

    threading.Thread(target=expire, daemon=True).start()
    _, status, ru = os.wait4(p.pid, 0)
    reaped.set()
    wall = time.monotonic() - t0
    with open(a.rusage, "w") as f:
        f.write(f"{ru.ru_utime:.3f} {ru.ru_stime:.3f} {wall:.3f}\n")
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


# ------------------------------------------------------------------------------- record


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        return lines[-n:]
    except OSError:
        return []


def cmd_record(a):
    try:
        with open(a.bench_json) as f:
            text = f.read().strip().splitlines()
        result = json.loads(text[-1]) if text else None
    except (OSError, ValueError):
        result = None
    try:
        with open(a.rusage) as f:
            user, sys_, wall = (float(x) for x in f.read().split())
    except (OSError, ValueError):
        user = sys_ = wall = None
    stats = None
    try:
        with open(a.server_stats) as f:
            text = f.read().strip()
        if text:
            stats = json.loads(text)
            # wsgate's /api/stats: the totals are enough (the per-core split is in "cores").
            if isinstance(stats, dict) and "total" in stats:
                stats = stats["total"]
    except (OSError, ValueError):
        stats = None
    rec = {
        "kind": a.kind,
        "server": a.server,
        "load": a.load,
        "round": a.round,
        "argv": a.argv,
        "exit_code": a.exit_code,
        "server_cpu_secs": (a.server_user_ticks + a.server_sys_ticks) / a.clk_tck,
        "server_user_secs": a.server_user_ticks / a.clk_tck,
        "server_sys_secs": a.server_sys_ticks / a.clk_tck,
        "bench_cpu_secs": None if user is None else round(user + sys_, 3),
        "bench_user_secs": user,
        "bench_sys_secs": sys_,
        "wall_secs": wall,
        "server_stderr_tail": tail(a.server_stderr),
        "server_stats": stats,
        "loadavg": a.loadavg,
        "result": result,
    }
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    if result is None:
        print(f"   no result for {a.out}", file=sys.stderr)
    else:
        lat = result.get("latency") or {}
        print(
            f"   -> {result.get('msgs_per_sec', 0):,.0f} msg/s, p50 {lat.get('p50_us')} µs, "
            f"p99 {lat.get('p99_us')} µs, connected {result.get('connected')}, "
            f"failed {result.get('failed')}; CPU server {rec['server_cpu_secs']:.2f}s, "
            f"bench {rec['bench_cpu_secs']}s",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_int(x):
    return "–" if x is None else f"{x:,.0f}"


def fmt(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": mem,
        "kernel": platform.release(),
        "rustc": out(["rustc", "--version"]),
        "git": head + (" (with uncommitted changes under src/ or Cargo.*)" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def peer_versions():
    """Versions from benches/peers/Cargo.lock, when it is there."""
    want = {"fastwebsockets", "tokio-tungstenite", "tungstenite", "tokio", "hyper"}
    found = {}
    try:
        with open("benches/peers/Cargo.lock") as f:
            name = None
            for line in f:
                if line.startswith("name = "):
                    name = line.split('"')[1]
                elif line.startswith("version = ") and name in want:
                    found[name] = line.split('"')[1]
    except OSError:
        pass
    return found


def load_runs(d):
    runs = []
    for p in sorted(glob.glob(os.path.join(d, "runs", "*.json"))):
        with open(p) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(p)
        runs.append(r)
    return runs


def lat(r, key, q):
    v = ((r.get("result") or {}).get(key)) or {}
    return v.get(q)


def summarize_echo(runs):
    """{(load, server): summary} with medians over rounds."""
    out = {}
    for load in LOADS:
        for server in SERVERS:
            rs = [r for r in runs if r["kind"] == "echo" and r["load"] == load and r["server"] == server]
            if not rs:
                continue
            ok = [r for r in rs if r.get("result")]
            res = [r["result"] for r in ok]
            per_msg_srv, per_msg_bench, srv_cores, bench_cores = [], [], [], []
            user_srv, user_bench = [], []
            for r in ok:
                n = r["result"].get("received") or 0
                wall = r.get("wall_secs") or 0
                if n:
                    per_msg_srv.append(r["server_cpu_secs"] / n * 1e6)
                    if r.get("server_user_secs") is not None:
                        user_srv.append(r["server_user_secs"] / n * 1e6)
                    if r.get("bench_cpu_secs") is not None:
                        per_msg_bench.append(r["bench_cpu_secs"] / n * 1e6)
                        user_bench.append(r["bench_user_secs"] / n * 1e6)
                if wall:
                    srv_cores.append(r["server_cpu_secs"] / wall)
                    if r.get("bench_cpu_secs") is not None:
                        bench_cores.append(r["bench_cpu_secs"] / wall)
            mps = [x.get("msgs_per_sec") for x in res]
            out[(load, server)] = {
                "runs": len(rs),
                "ok_runs": len(ok),
                "bad_exit": sum(1 for r in rs if r.get("exit_code") not in (0, "0")),
                "msgs_per_sec": med(mps),
                "msgs_min": min(mps) if mps else None,
                "msgs_max": max(mps) if mps else None,
                "mbytes_per_sec": med([x.get("mbytes_per_sec") for x in res]),
                "p50_us": med([lat(r, "latency", "p50_us") for r in ok]),
                "p99_us": med([lat(r, "latency", "p99_us") for r in ok]),
                "p999_us": med([lat(r, "latency", "p999_us") for r in ok]),
                "connected": min((x.get("connected") or 0) for x in res) if res else 0,
                "failed": sum((x.get("failed") or 0) for x in res),
                "srv_us_per_msg": med(per_msg_srv),
                "bench_us_per_msg": med(per_msg_bench),
                "srv_user_us_per_msg": med(user_srv),
                "bench_user_us_per_msg": med(user_bench),
                "srv_cores": med(srv_cores),
                "bench_cores": med(bench_cores),
                "stderr": sorted({line for r in rs for line in r.get("server_stderr_tail") or []}),
            }
    return out


# ---- SVG (hand-written) ---------------------------------------------------------------


def nice_max(v):
    if v <= 0:
        return 1
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def short(v):
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def svg_doc(w, h, body, title):
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="12">\n'
        f'<rect width="{w}" height="{h}" fill="white"/>\n'
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
        f"{html.escape(title)}</text>\n" + "\n".join(body) + "\n</svg>\n"
    )


def legend(body, items, x, y):
    for i, (label, color) in enumerate(items):
        xx = x + i * 150
        body.append(f'<rect x="{xx}" y="{y - 10}" width="12" height="12" fill="{color}"/>')
        body.append(f'<text x="{xx + 17}" y="{y}">{html.escape(label)}</text>')


def finish_chart(path, body, geom, ylabel, caption, title):
    """The part every chart shares: y-axis label, legend, caption, and the file."""
    w, h, left, top, ph = geom
    body.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
                f'text-anchor="middle">{ylabel}</text>')
    legend(body, [(LABELS[s], COLORS[s]) for s in SERVERS], left, top + ph + 40)
    body.append(f'<text x="{left}" y="{top + ph + 70}" font-size="10" fill="#555">{caption}</text>')
    with open(path, "w") as f:
        f.write(svg_doc(w, h, body, title))


def chart_throughput(summary, path):
    pw, ph, left, top, gap = 250, 260, 60, 60, 30
    loads = [l for l in LOADS if any((l, s) in summary for s in SERVERS)]
    w = left + len(loads) * (pw + gap)
    h = top + ph + 90
    body = []
    for i, load in enumerate(loads):
        x0 = left + i * (pw + gap)
        vals = [summary.get((load, s), {}) for s in SERVERS]
        vmax = nice_max(max([(v.get("msgs_max") or 0) for v in vals] + [1]))
        body.append(f'<text x="{x0 + pw / 2}" y="{top - 14}" text-anchor="middle" font-weight="bold">'
                    f"{html.escape(load_label(load))}</text>")
        for k in range(6):
            y = top + ph - ph * k / 5
            body.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            body.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">'
                        f"{short(vmax * k / 5)}</text>")
        bw = pw / len(SERVERS) * 0.7
        for j, (s, v) in enumerate(zip(SERVERS, vals)):
            m = v.get("msgs_per_sec")
            if m is None:
                continue
            bx = x0 + pw / len(SERVERS) * (j + 0.15)
            bh = ph * m / vmax
            body.append(f'<rect x="{bx:.1f}" y="{top + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                        f'fill="{COLORS[s]}"><title>{LABELS[s]}: {m:,.0f} msg/s</title></rect>')
            lo, hi = v.get("msgs_min"), v.get("msgs_max")
            if v.get("ok_runs", 0) > 1 and lo is not None and hi is not None and hi > lo:
                cx = bx + bw / 2
                y1, y2 = top + ph - ph * lo / vmax, top + ph - ph * hi / vmax
                body.append(f'<line x1="{cx:.1f}" y1="{y1:.1f}" x2="{cx:.1f}" y2="{y2:.1f}" stroke="black"/>')
                for yy in (y1, y2):
                    body.append(f'<line x1="{cx - 4:.1f}" y1="{yy:.1f}" x2="{cx + 4:.1f}" y2="{yy:.1f}" stroke="black"/>')
            label_at = max(m, hi or 0) if v.get("ok_runs", 0) > 1 else m
            body.append(f'<text x="{bx + bw / 2:.1f}" y="{top + ph - ph * label_at / vmax - 5:.1f}" '
                        f'text-anchor="middle" font-size="10">{short(m)}</text>')
        body.append(f'<line x1="{x0}" y1="{top + ph}" x2="{x0 + pw}" y2="{top + ph}" stroke="black"/>')
    finish_chart(path, body, (w, h, left, top, ph), "messages / s (echoed)",
                 "Median over rounds; whiskers: min–max. Closed loop, one message in flight per connection.",
                 "Echo throughput (higher is better)")


def chart_latency(summary, path):
    pw, ph, left, top, gap = 250, 260, 70, 60, 30
    loads = [l for l in LOADS if any((l, s) in summary for s in SERVERS)]
    w = left + len(loads) * (pw + gap)
    h = top + ph + 90
    qs = [("p50_us", "p50", 1.0), ("p99_us", "p99", 0.65), ("p999_us", "p99.9", 0.35)]
    vals_all = [v.get(q) for v in summary.values() for q, _, _ in qs if v.get(q)]
    lo = 10 ** math.floor(math.log10(min(vals_all))) if vals_all else 1
    hi = 10 ** math.ceil(math.log10(max(vals_all))) if vals_all else 10
    if hi <= lo:
        hi = lo * 10
    span = math.log10(hi) - math.log10(lo)

    def y_of(v):
        return top + ph - ph * (math.log10(v) - math.log10(lo)) / span

    def us(v):
        return f"{v / 1000:g} ms" if v >= 1000 else f"{v:g} µs"

    body = []
    for i, load in enumerate(loads):
        x0 = left + i * (pw + gap)
        body.append(f'<text x="{x0 + pw / 2}" y="{top - 14}" text-anchor="middle" font-weight="bold">'
                    f"{html.escape(load_label(load))}</text>")
        d = lo
        while d <= hi * 1.0001:
            y = y_of(d)
            body.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ccc"/>')
            body.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{us(d)}</text>')
            for m in (2, 5):
                if d * m < hi:
                    ym = y_of(d * m)
                    body.append(f'<line x1="{x0}" y1="{ym:.1f}" x2="{x0 + pw}" y2="{ym:.1f}" stroke="#eee"/>')
            d *= 10
        slot = pw / len(SERVERS)
        bw = slot * 0.8 / len(qs)
        for j, s in enumerate(SERVERS):
            v = summary.get((load, s))
            if not v:
                continue
            for k, (q, qname, op) in enumerate(qs):
                val = v.get(q)
                if not val:
                    continue
                bx = x0 + slot * j + slot * 0.1 + bw * k
                y = y_of(max(val, lo))
                body.append(f'<rect x="{bx:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{top + ph - y:.1f}" '
                            f'fill="{COLORS[s]}" fill-opacity="{op}"><title>{LABELS[s]} {qname}: '
                            f"{val:,.1f} µs</title></rect>")
        body.append(f'<line x1="{x0}" y1="{top + ph}" x2="{x0 + pw}" y2="{top + ph}" stroke="black"/>')
    finish_chart(path, body, (w, h, left, top, ph), "round-trip latency (log scale)",
                 "Per server, three bars: p50 (solid), p99, p99.9 (lighter). Medians over rounds.",
                 "Echo latency percentiles (lower is better)")


# ---- markdown ------------------------------------------------------------------------


def human_ns(ns):
    for unit, f in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= f:
            return f"{ns / f:.3g} {unit}"
    return f"{ns:.3g} ns"


def criterion_rows(root):
    """(name, mean, low, high, throughput) per benchmark from criterion's JSON output."""
    rows = []
    if not root or not os.path.isdir(root):
        return rows
    for dirpath, _dirs, files in sorted(os.walk(root)):
        if not dirpath.endswith(os.path.join("new")) or "estimates.json" not in files:
            continue
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)["mean"]
        bench = {}
        if "benchmark.json" in files:
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                bench = json.load(f)
        name = bench.get("full_id") or os.path.relpath(os.path.dirname(dirpath), root)
        mean = est["point_estimate"]
        ci = est["confidence_interval"]
        thr = ""
        t = bench.get("throughput") or {}
        if "Bytes" in t:
            thr = f"{t['Bytes'] / mean:.2f} GB/s"
        elif "Elements" in t:
            thr = f"{t['Elements'] / mean * 1e3:.0f} M elem/s"
        rows.append((name, human_ns(mean), human_ns(ci["lower_bound"]), human_ns(ci["upper_bound"]), thr))
    return rows


def by_round(runs, kind, load, server):
    return {r["round"]: r for r in runs
            if r["kind"] == kind and r["load"] == load and r["server"] == server and r.get("result")}


def spread(xs, f=fmt_ratio):
    """'median (min–max)' of a list, or '–'."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.median(xs))} ({f(min(xs))}–{f(max(xs))})"


def cpu_per(r, count_key="received"):
    n = (r.get("result") or {}).get(count_key) or 0
    return r["server_cpu_secs"] / n * 1e6 if n else None


def render_ratio_table(w, runs):
    """wsgate against fastwebsockets, round by round (servers alternate within a round)."""
    base = "fastwebsockets"
    if not any(r["kind"] == "echo" and r["server"] == base for r in runs):
        return
    w("#### Against fastwebsockets, round by round")
    w("")
    w("Ratios of wsgate (and of the raw-TCP floor) to fastwebsockets measured in the same round "
      "(the servers alternate within a round); median of the rounds' ratios, min–max in "
      "brackets. Server CPU per message below 1: cheaper than fastwebsockets; msgs/s above 1: "
      "faster.")
    w("")
    w("| Load | wsgate µs/msg | fastwebsockets µs/msg | raw TCP µs/msg | wsgate ÷ fastwebsockets: CPU/msg | msgs/s | raw TCP ÷ fastwebsockets: CPU/msg | msgs/s |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in LOADS:
        b = by_round(runs, "echo", load, base)
        if not b:
            continue
        row = [load_label(load)]
        cells = []
        for s in ("wsgate", base, "raw-tcp"):
            rr = by_round(runs, "echo", load, s)
            row.append(spread([cpu_per(r) for r in rr.values()], lambda x: f"{x:.2f}"))
        for s in ("wsgate", "raw-tcp"):
            rr = by_round(runs, "echo", load, s)
            cpu_r, mps_r = [], []
            for rnd, r in rr.items():
                if rnd not in b:
                    continue
                c1, c0 = cpu_per(r), cpu_per(b[rnd])
                if c1 and c0:
                    cpu_r.append(c1 / c0)
                m1, m0 = r["result"].get("msgs_per_sec"), b[rnd]["result"].get("msgs_per_sec")
                if m1 and m0:
                    mps_r.append(m1 / m0)
            cells += [spread(cpu_r), spread(mps_r)]
        w("| " + " | ".join(row + cells) + " |")
    w("")


FAN_LABELS = {"wsgate": "wsgate", "broadcast": "tokio broadcast peer"}


def render_fanout(w, runs):
    fr = [r for r in runs if r["kind"] == "fanout"]
    if not fr:
        return
    loads = sorted({r["load"] for r in fr}, key=lambda l: (int(l.split("-")[0]), l.split("-")[1] != "sat"))
    argv = fr[0].get("argv", "")

    def arg(name, text):
        return text.split(name, 1)[1].split()[0] if name in text else "?"

    sat_window = next((arg("--window", r["argv"]) for r in fr if r["load"].endswith("-sat")), "?")
    w("### Room fan-out: wsgate against a tokio broadcast server")
    w("")
    w("`wsgate-bench room`: a room of N members plus one publisher that joins it too (so N + 1 "
      f"receive every publish), 64 B of padding per message, {arg('--warmup', argv)} warm-up then "
      f"{arg('--duration', argv)} measured, servers alternating per load and round. "
      f"**Saturation**: `--rate 0 --window {sat_window}`, the publisher keeps {sat_window} "
      "acknowledged publishes in flight (about an open loop as fast as the server takes "
      "publishes); **moderate**: a fixed publish rate. The peer is `peer-broadcast` "
      "(tokio-tungstenite + one `tokio::sync::broadcast` channel per room, capacity 1024; each "
      "receiver feeds every ready message, then flushes once). A receiver that falls more than "
      "the capacity behind **skips** messages (`Lagged(n)`); the peer counts them (`GET "
      "/stats`), and a skipped message is not a delivery. wsgate never skips: a member that "
      "cannot keep up is closed with 1013 (counted by the members and by wsgate's "
      "`/api/stats`).")
    w("")
    w("- delivered/s: messages the members received in the measured window, per second "
      "(median over rounds, min–max).")
    w("- server µs/delivery: server CPU (`/proc/PID/stat`) over the whole run ÷ all messages the "
      "members received in it; generator cores: the load generator's CPU ÷ wall time (near 1.0 "
      "on one pinned CPU means the generator, not the server, set the pace).")
    w("- skipped: the peer's skipped messages over the whole run (warm-up included) and their "
      "share of what it handed to receivers (skipped ÷ (skipped + fed)).")
    w("")
    w("| Room | Load | Server | delivered/s | (min–max) | server µs/delivery | generator cores | p50 ms | p99 ms | skipped (share) | 1013 closes |")
    w("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in loads:
        members, mode = load.split("-")
        for s in ("wsgate", "broadcast"):
            rr = by_round(runs, "fanout", load, s)
            if not rr:
                continue
            res = [r["result"] for r in rr.values()]
            dps = [x.get("msgs_per_sec") for x in res]
            rate = arg("--rate", next(iter(rr.values()))["argv"])
            mode_txt = "saturation" if mode == "sat" else f"{rate} publishes/s"
            skipped, share, c1013 = [], [], []
            for r in rr.values():
                st = r.get("server_stats") or {}
                if "skipped" in st:
                    skipped.append(st["skipped"])
                    tot = st["skipped"] + st.get("fed", 0)
                    share.append(st["skipped"] / tot if tot else 0)
                c = r["result"].get("closes_1013") or 0
                c1013.append(max(c, st.get("slow_consumer_closes") or 0))
            sk = "–" if s == "wsgate" else (
                f"{fmt_int(med(skipped))} ({med(share) * 100:.0f}%)" if skipped else "not read")
            gen = [r["bench_cpu_secs"] / r["wall_secs"] for r in rr.values()
                   if r.get("bench_cpu_secs") is not None and r.get("wall_secs")]
            w(f"| {int(members):,} | {mode_txt} | {FAN_LABELS[s]} | {fmt_int(med(dps))} | "
              f"{short(min(dps))}–{short(max(dps))} | "
              f"{fmt(med([cpu_per(r) for r in rr.values()]), 3)} | {fmt(med(gen), 2)} | "
              f"{fmt(med([lat(r, 'latency', 'p50_us') for r in rr.values()]) and med([lat(r, 'latency', 'p50_us') for r in rr.values()]) / 1000, 1)} | "
              f"{fmt(med([lat(r, 'latency', 'p99_us') for r in rr.values()]) and med([lat(r, 'latency', 'p99_us') for r in rr.values()]) / 1000, 1)} | "
              f"{sk} | {sum(c1013)} |")
    w("")
    w("wsgate ÷ peer, round by round (median, min–max): delivered/s (above 1: wsgate delivered "
      "more), server CPU per delivery and p99 latency (below 1: wsgate is cheaper, faster).")
    w("")
    w("| Room | Load | delivered/s | server µs/delivery | p99 |")
    w("| ---: | --- | ---: | ---: | ---: |")
    for load in loads:
        members, mode = load.split("-")
        g, p = by_round(runs, "fanout", load, "wsgate"), by_round(runs, "fanout", load, "broadcast")
        d_r, c_r, l_r = [], [], []
        for rnd in sorted(set(g) & set(p)):
            a_, b_ = g[rnd], p[rnd]
            if a_["result"].get("msgs_per_sec") and b_["result"].get("msgs_per_sec"):
                d_r.append(a_["result"]["msgs_per_sec"] / b_["result"]["msgs_per_sec"])
            if cpu_per(a_) and cpu_per(b_):
                c_r.append(cpu_per(a_) / cpu_per(b_))
            la, lb = lat(a_, "latency", "p99_us"), lat(b_, "latency", "p99_us")
            if la and lb:
                l_r.append(la / lb)
        if not d_r:
            continue
        mode_txt = "saturation" if mode == "sat" else "moderate"
        w(f"| {int(members):,} | {mode_txt} | {spread(d_r)} | {spread(c_r)} | {spread(l_r)} |")
    w("")


CONN_LABELS = {
    "wsgate-echo": "wsgate `/echo` (upgrade only)",
    "wsgate-ws": "wsgate `/ws` (upgrade, registration, welcome)",
    "fastwebsockets": "fastwebsockets",
    "tokio-tungstenite": "tokio-tungstenite",
}


def render_connect(w, runs):
    cr = [r for r in runs if r["kind"] == "connect-cmp"]
    if not cr:
        return
    n = cr[0]["load"]
    w("### Connect: handshakes per second")
    w("")
    w(f"`wsgate-bench connect`: {int(n):,} connections, 200 connects in flight, each counted "
      "when its `101` (for wsgate's `/ws`: its welcome) arrived; connections/s = connections ÷ "
      "the time to open all. Servers alternate per round; the connections are reset afterwards. "
      "Server µs/handshake: its CPU over the run ÷ connections.")
    w("")
    w("| Server | handshakes/s | (min–max) | handshake p50 µs | p99 µs | server µs/handshake | ÷ fastwebsockets (median, min–max) |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = by_round(runs, "connect-cmp", n, "fastwebsockets")
    for s in CONN_LABELS:
        rr = by_round(runs, "connect-cmp", n, s)
        if not rr:
            continue
        cps = [r["result"].get("connects_per_sec") for r in rr.values()]
        ratios = [r["result"]["connects_per_sec"] / base[k]["result"]["connects_per_sec"]
                  for k, r in rr.items() if k in base and base[k]["result"].get("connects_per_sec")
                  and r["result"].get("connects_per_sec")]
        w(f"| {CONN_LABELS[s]} | {fmt_int(med(cps))} | {short(min(cps))}–{short(max(cps))} | "
          f"{fmt(med([lat(r, 'handshake', 'p50_us') for r in rr.values()]))} | "
          f"{fmt(med([lat(r, 'handshake', 'p99_us') for r in rr.values()]))} | "
          f"{fmt(med([cpu_per(r, 'connected') for r in rr.values()]), 1)} | "
          f"{spread(ratios) if s != 'fastwebsockets' else '1'} |")
    w("")


def render_per_core(w, a, m, rel, runs, summary, driver, vers):
    render_default(w, a, m, rel, runs, summary, driver, vers, per_core=True)


def render_default(w, a, m, rel, runs, summary, driver, vers, per_core=False):
    """One mode's section: echo, fan-out, connect and (default mode) the gateway scenarios."""
    if per_core:
        w("## Per-core mode: one pinned core per server")
    else:
        w("## Default mode: a thread per CPU, unpinned")
    w("")
    w(f"_`{canonical_command(a.command)}`, {m['date']}, wsgate at `{m['git'] or 'unknown'}`, "
      f"run took {a.elapsed} s. Raw results: [`{rel}/runs/`]({rel}/runs/)._")
    if "quick" in a.mode:
        w("")
        w("> **Quick mode**: one round of 3 s per run and 2,000 idle connections. A smoke test "
          "of the harness, not numbers to quote; `scripts/bench.sh` (full mode) gives 3 rounds "
          "of 10 s and ~19,000 idle connections.")
    if not a.built:
        w("")
        w("Binaries: prebuilt (`--no-build`), taken from `target/release` as found; they may "
          "not match the commit above.")
    loads = [r["loadavg"] for r in runs if r.get("loadavg") is not None]
    if loads:
        w("")
        w(f"1-minute load average before each run: {min(loads):.2f}–{max(loads):.2f} (median "
          f"{statistics.median(loads):.2f}; this run's server and generator add up to 2 when busy).")
    w("")
    if per_core:
        w("Every server ran on CPU 1 alone (`taskset -c 1`, one thread), the load generator on "
          "CPU 0 (`taskset -c 0`): no server shares a core with the generator and no runtime "
          "can steal work onto the other CPU, the fair comparison for a thread-per-core design. "
          "Server CPU per message is the figure to compare, within one run: about two thirds of "
          "it is the server's writes waking the generator's thread on the other vCPU (Experiments, "
          "\"two thirds of a server's CPU is waking the generator\"), so it moves with the pair's "
          "timing from run to run; msgs/s also includes that cost. Other users of this shared machine may "
          "have run builds meanwhile: treat differences under ~10% as noise unless they repeat.")
    else:
        w("Everything ran on 127.0.0.1: the load generator and the server share the same "
          f"{m['cores']} cores, so every number is a property of the pair on this machine, not of "
          "the server alone. Treat differences under ~10% as noise unless they repeat.")
    w("")
    w("### Method")
    w("")
    w(f"- Load generator: `wsgate-bench echo`, closed loop, one message in flight per connection, "
      f"{a.threads} thread(s), masked text frames (zero key), {a.warmup} warm-up then {a.duration} "
      f"measured; {a.rounds} round(s), servers alternating A B C D within each load, each server "
      "started fresh on port 0 for its run and stopped after it. Tables show the median over rounds.")
    if per_core:
        w(f"- Servers, one thread each on CPU 1 (`taskset -c 1`); the generator on CPU 0 "
          "(`taskset -c 0`). bench.sh checks every server thread's `Cpus_allowed_list`:")
    else:
        w(f"- Servers, {a.workers} threads each:")
    extra = f" {a.wsgate_args}" if a.wsgate_args else ""
    w(f"  - **wsgate**: its `/echo` endpoint (`--workers {a.workers} --echo-path /echo --log warn{extra}`), "
      f"I/O driver: {driver or 'auto'}. For the 16 KiB load: `--max-message-size 1048576 "
      "--max-queued-bytes 67108864`.")
    w(f"  - **fastwebsockets** {vers.get('fastwebsockets', '')} with hyper {vers.get('hyper', '')} "
      "upgrades (`benches/peers/src/bin/peer-fastwebsockets.rs`, shaped like its own "
      "echo_server example; auto_close, auto_pong, writev on).")
    w(f"  - **tokio-tungstenite** {vers.get('tokio-tungstenite', '')} (tungstenite "
      f"{vers.get('tungstenite', '')}), feeding every ready message then flushing once "
      "(`benches/peers/src/bin/peer-tokio-tungstenite.rs`).")
    w("  - **raw TCP**: read into a 64 KiB buffer and write it back, after a minimal 101 answer; "
      "it only clears the MASK bit and drops the 4 key bytes per frame "
      "(`benches/peers/src/bin/peer-raw-tcp.rs`). The ceiling: no WebSocket work at all.")
    if per_core and getattr(a, "peer_runtime", "current-thread") == "multi-thread":
        w(f"  - Peers run on tokio {vers.get('tokio', '')}'s multi-thread runtime with one "
          "worker (`BENCH_PEER_RUNTIME=multi-thread`; the accept loop on a second thread, "
          "also on CPU 1) and the system allocator (wsgate links mimalloc).")
    elif per_core:
        w(f"  - Peers run on tokio {vers.get('tokio', '')}'s current-thread runtime "
          "(`--current-thread`: accept loop and connections on one thread) and the system "
          "allocator (wsgate links mimalloc).")
    else:
        w(f"  - Peers run on a multi-thread tokio {vers.get('tokio', '')} runtime with one worker "
          "per CPU and the system allocator (wsgate links mimalloc).")
    w("- CPU time: the server's from `/proc/PID/stat` (utime+stime) just before and after the "
      "load generator runs; the load generator's from `wait4` rusage. Both cover the whole run "
      "(connects, warm-up, measurement), and are divided by all messages echoed in it.")
    w("")

    w("### Echo: throughput and latency")
    w("")
    w("| Load | Server | msgs/s | (min–max over rounds) | MB/s | p50 µs | p99 µs | p99.9 µs | connected | failed |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in LOADS:
        for s in SERVERS:
            v = summary.get((load, s))
            if not v:
                continue
            name = f"**{LABELS[s]}**" if s == "wsgate" else LABELS[s]
            spread = (f"{short(v['msgs_min'])}–{short(v['msgs_max'])}"
                      if v["ok_runs"] > 1 and v["msgs_min"] is not None else "–")
            w(f"| {load_label(load)} | {name} | {fmt_int(v['msgs_per_sec'])} | {spread} | "
              f"{fmt(v['mbytes_per_sec'], 2)} | {fmt(v['p50_us'])} | {fmt(v['p99_us'])} | "
              f"{fmt(v['p999_us'])} | {v['connected']} | {v['failed']} |")
    w("")
    w(f"![Echo throughput]({rel}/throughput.svg)")
    w("")
    w(f"![Echo latency percentiles]({rel}/latency.svg)")
    w("")

    w("#### wsgate relative to each peer")
    w("")
    w("Throughput ratio, wsgate msgs/s ÷ peer msgs/s (above 1: wsgate echoed more), and the "
      "same for p50 and p99 latency (below 1: wsgate answered faster).")
    w("")
    peers = [s for s in SERVERS if s != "wsgate"]
    w("| Load | " + " | ".join(f"vs {LABELS[p]}: msgs/s · p50 · p99" for p in peers) + " |")
    w("| --- | " + " | ".join("---:" for _ in peers) + " |")
    for load in LOADS:
        g = summary.get((load, "wsgate"))
        if not g:
            continue
        cells = []
        for p in peers:
            v = summary.get((load, p))

            def ratio(k):
                if not v or not g.get(k) or not v.get(k):
                    return None
                return g[k] / v[k]

            cells.append(f"{fmt_ratio(ratio('msgs_per_sec'))} · {fmt_ratio(ratio('p50_us'))} · "
                         f"{fmt_ratio(ratio('p99_us'))}")
        w(f"| {load_label(load)} | " + " | ".join(cells) + " |")
    w("")

    render_ratio_table(w, runs)
    w("### CPU cost per message (echo runs)")
    w("")
    w("CPU time per echoed message in µs (medians over rounds): all (user+system) and user "
      "only, for the server and for the load generator, and the average cores each kept busy. "
      "The load generator has to be cheaper per message than what it measures, or it, not the "
      "server, would set the pace. On loopback most of the cost is system time, and the kernel "
      "runs much of a segment's receive path in the *sender's* context (the softirq after "
      "`send`), so system time lands on the two ends about evenly whoever causes it; user time "
      "is the cleaner comparison of the two programs' own work.")
    w("")
    w("| Load | Server | server µs/msg | generator µs/msg | generator ÷ server | server user µs/msg | generator user µs/msg | server cores | generator cores |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    cheaper, cheaper_user, total = 0, 0, 0
    for load in LOADS:
        for s in SERVERS:
            v = summary.get((load, s))
            if not v:
                continue
            r = None
            if v["srv_us_per_msg"] and v["bench_us_per_msg"] is not None:
                r = v["bench_us_per_msg"] / v["srv_us_per_msg"]
                total += 1
                cheaper += r < 1
                if v["srv_user_us_per_msg"] and v["bench_user_us_per_msg"] is not None:
                    cheaper_user += v["bench_user_us_per_msg"] < v["srv_user_us_per_msg"]
            name = f"**{LABELS[s]}**" if s == "wsgate" else LABELS[s]
            w(f"| {load_label(load)} | {name} | {fmt(v['srv_us_per_msg'], 2)} | "
              f"{fmt(v['bench_us_per_msg'], 2)} | {fmt_ratio(r)} | {fmt(v['srv_user_us_per_msg'], 2)} | "
              f"{fmt(v['bench_user_us_per_msg'], 2)} | {fmt(v['srv_cores'], 2)} | "
              f"{fmt(v['bench_cores'], 2)} |")
    w("")
    gw = [summary.get((l, "wsgate")) for l in LOADS]
    gw_r = [g["bench_us_per_msg"] / g["srv_us_per_msg"] for g in gw
            if g and g.get("srv_us_per_msg") and g.get("bench_us_per_msg") is not None]
    gw_u = [g["bench_user_us_per_msg"] / g["srv_user_us_per_msg"] for g in gw
            if g and g.get("srv_user_us_per_msg") and g.get("bench_user_us_per_msg") is not None]
    if total:
        txt = (f"The load generator spent less CPU per message than the server in {cheaper} of "
               f"{total} server × load cells (user time alone: {cheaper_user} of {total})")
        if gw_r:
            txt += (f"; against wsgate it spent {min(gw_r):.2f}–{max(gw_r):.2f}× wsgate's CPU per "
                    "message")
            if gw_u:
                txt += f" ({min(gw_u):.2f}–{max(gw_u):.2f}× in user time)"
        w(txt + ".")
        if per_core:
            w("Here each has a CPU of its own: server CPU per message is the server's alone, and "
              "a generator near 1.0 cores was saturated and set the pace of msgs/s.")
        elif cheaper < total:
            w("Where the ratio reaches about 1× (the fastest servers and the raw-TCP ceiling), the "
              "generator and the server cost about the same per message and share two cores, so "
              "those numbers are bounded by the pair on this machine, not by the server alone.")
        w("")

    render_fanout(w, runs)
    render_connect(w, runs)
    sc = {r["kind"]: r for r in runs if r["kind"] in ("connect", "idle", "idle10k", "room", "direct")}
    if per_core and not sc:
        return
    w("### Gateway scenarios (wsgate only)")
    w("")
    if not sc:
        w("_No scenario ran._")
    w("| Scenario | Setup | Result | Gateway CPU s | Notes |")
    w("| --- | --- | --- | ---: | --- |")
    if "connect" in sc:
        r = sc["connect"]
        x = r.get("result") or {}
        hs = x.get("handshake") or {}
        g = x.get("gateway") or {}
        w(f"| connect | {x.get('connections', r['load'])} connections, {x.get('threads', '?')} thread(s), "
          f"200 in flight per thread | **{fmt_int(x.get('connects_per_sec'))} connects/s** "
          f"({fmt(x.get('connect_secs'), 3)} s for all); handshake p50 {fmt(hs.get('p50_us'))} µs, "
          f"p99 {fmt(hs.get('p99_us'))} µs | {fmt(r['server_cpu_secs'], 2)} | connected "
          f"{x.get('connected')}, failed {x.get('failed')}"
          + (f"; gateway RSS {fmt_int(g.get('gateway_rss_after_kib'))} KiB after" if g.get("gateway_rss_after_kib") else "")
          + " |")
    if "idle" in sc:
        r = sc["idle"]
        x = r.get("result") or {}
        g = x.get("gateway") or {}
        n = x.get("connected") or 0
        kt = g.get("kernel_tcp_mem_kib")
        w(f"| idle | {x.get('connections', r['load'])} connections held, {x.get('processes')} "
          f"load processes, 2 source addresses | **{fmt_int(g.get('gateway_rss_per_conn_bytes'))} "
          f"bytes of gateway RSS per connection** (RSS {fmt_int(g.get('gateway_rss_before_kib'))} → "
          f"{fmt_int(g.get('gateway_rss_after_kib'))} KiB) | {fmt(r['server_cpu_secs'], 2)} | "
          f"connected {n}, failed {x.get('failed')}; kernel TCP buffer memory {fmt_int(kt)} KiB "
          "in all (idle sockets hold next to no buffers) |")
    if "idle10k" in sc:
        r = sc["idle10k"]
        x = r.get("result") or {}
        g = x.get("gateway") or {}
        w(f"| idle | {x.get('connections', r['load'])} connections held, 1 load process | "
          f"**{fmt_int(g.get('gateway_rss_per_conn_bytes'))} bytes of gateway RSS per connection** "
          f"(RSS {fmt_int(g.get('gateway_rss_before_kib'))} → {fmt_int(g.get('gateway_rss_after_kib'))} KiB) "
          f"| {fmt(r['server_cpu_secs'], 2)} | connected {x.get('connected')}, failed {x.get('failed')} |")
    if "room" in sc:
        r = sc["room"]
        x = r.get("result") or {}
        l_ = x.get("latency") or {}
        members = (x.get("connections") or 1) - 1
        sent = x.get("sent") or 0
        w(f"| room | 1 publisher, {members} members on both cores, 10 publishes/s, "
          f"{x.get('size')} B padding | **{fmt_int(x.get('msgs_per_sec'))} deliveries/s**; "
          f"publish-to-member latency p50 {fmt(l_.get('p50_us'))} µs, p99 {fmt(l_.get('p99_us'))} µs, "
          f"max {fmt(l_.get('max_us'))} µs (the max is the time for one publish to reach every member) | "
          f"{fmt(r['server_cpu_secs'], 2)} | {sent} publishes; connected {x.get('connected')}, "
          f"failed {x.get('failed')} |")
    if "direct" in sc:
        r = sc["direct"]
        x = r.get("result") or {}
        l_ = x.get("latency") or {}
        s_ = x.get("latency_same_core") or {}
        c_ = x.get("latency_cross_core") or {}
        argv = r.get("argv", "")
        win = argv.split("--window", 1)[1].split()[0] if "--window" in argv else "1"
        w(f"| direct | {x.get('connections', r['load'])} users, each sending to random users, "
          f"{win} unacknowledged sends per connection, {x.get('size')} B padding | "
          f"**{fmt_int(x.get('msgs_per_sec'))} deliveries/s**; latency p50 {fmt(l_.get('p50_us'))} µs, "
          f"p99 {fmt(l_.get('p99_us'))} µs, p99.9 {fmt(l_.get('p999_us'))} µs | "
          f"{fmt(r['server_cpu_secs'], 2)} | same core p50/p99 {fmt(s_.get('p50_us'))}/"
          f"{fmt(s_.get('p99_us'))} µs, cross core {fmt(c_.get('p50_us'))}/{fmt(c_.get('p99_us'))} "
          f"µs; connected {x.get('connected')}, failed {x.get('failed')}. A saturated closed "
          "loop: latency is mostly queueing (messages in flight ÷ rate) |")
    w("")



def canonical_command(cmd):
    return " ".join(t for t in cmd.split() if t != "--no-build")


def problems_of(runs):
    problems = []
    for r in runs:
        x = r.get("result") or {}
        name = r["_file"]
        if r.get("exit_code") not in (0, "0"):
            problems.append(f"`{name}`: load generator exit code {r.get('exit_code')}")
        if not x:
            problems.append(f"`{name}`: no result")
        elif x.get("failed"):
            problems.append(f"`{name}`: {x['failed']} connection(s) failed")
        if x.get("closes_1013"):
            problems.append(f"`{name}`: {x['closes_1013']} connection(s) closed with 1013")
        for line in r.get("server_stderr_tail") or []:
            problems.append(f"`{name}` server stderr: `{line[:200]}`")
    return problems


# The modes bench.sh writes, each into its own directory under bench-results/; BENCHMARKS.md
# shows every mode that has results, so a run of one mode keeps the other's section.
MODE_DIRS = [("latest", render_default), ("per-core", None)]


def load_mode(d):
    """(meta namespace, machine, runs) of a results directory, or None without results."""
    try:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    meta = dict(s.get("meta") or {})
    meta.setdefault("mode", s.get("mode", "full"))
    meta.setdefault("command", s.get("command", "scripts/bench.sh"))
    meta.setdefault("elapsed", s.get("elapsed_secs", 0))
    return argparse.Namespace(**meta), s.get("machine") or {}, s.get("criterion") or [], load_runs(d)


def cmd_report(a):
    write_summary(a)
    render_page(a)


def cmd_rerender(a):
    """BENCHMARKS.md again from the stored summaries (after editing experiments.md, say)."""
    render_page(a)


def write_summary(a):
    """This run's directory: its summary, with what the page needs to render it again later."""
    runs = load_runs(a.dir)
    summary = summarize_echo(runs)
    chart_throughput(summary, os.path.join(a.dir, "throughput.svg"))
    chart_latency(summary, os.path.join(a.dir, "latency.svg"))
    meta = {k: getattr(a, k) for k in ("mode", "command", "elapsed", "rounds", "duration", "warmup",
                                       "threads", "workers", "wsgate_args", "built", "peer_runtime")}
    with open(os.path.join(a.dir, "summary.json"), "w") as f:
        json.dump({"machine": machine(), "mode": a.mode, "command": a.command, "elapsed_secs": a.elapsed,
                   "meta": meta, "criterion": criterion_rows(a.criterion),
                   "echo": [{"load": k[0], "server": k[1], **{kk: vv for kk, vv in v.items() if kk != "stderr"}}
                            for k, v in summary.items()]}, f, indent=1)
        f.write("\n")


def render_page(a):
    root = os.path.dirname(os.path.normpath(a.dir))
    md_dir = os.path.dirname(os.path.abspath(a.md)) or "."
    vers = peer_versions()
    modes = []
    for sub, _ in MODE_DIRS:
        d = os.path.join(root, sub)
        got = load_mode(d)
        if got:
            modes.append((sub, d, got))
    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    w("_Generated by `scripts/bench.sh` from the results of its last run in each mode; do not "
      "edit by hand, re-run the script (a run rewrites its own mode's section and keeps the "
      "other's)._")
    w("")
    w("## Machine")
    w("")
    m0 = modes[0][2][1] if modes else machine()
    mem = "" if m0.get("mem_gib") is None else f", {m0['mem_gib']:.0f} GiB RAM"
    w(f"- CPU: {m0.get('cpu')}, {m0.get('cores')} vCPUs{mem} (a VM)")
    w(f"- Kernel: Linux {m0.get('kernel')}")
    w(f"- Toolchain: {m0.get('rustc') or 'unknown'}")
    for sub, d, (ma, mm, _crit, _runs) in modes:
        w(f"- `{sub}` ({ma.mode} mode): {mm.get('date')}, wsgate at `{mm.get('git') or 'unknown'}`, "
          f"kernel {mm.get('kernel')}; `{canonical_command(ma.command)}`")
    w("")
    crit = []
    problems = []
    for sub, d, (ma, mm, mcrit, mruns) in modes:
        rel = os.path.relpath(d, md_dir)
        driver = ""
        try:
            with open(os.path.join(d, "wsgate-driver.txt")) as f:
                driver = f.read().strip()
        except OSError:
            pass
        msum = summarize_echo(mruns)
        if sub == "per-core":
            render_per_core(w, ma, mm, rel, mruns, msum, driver, vers)
        else:
            render_default(w, ma, mm, rel, mruns, msum, driver, vers)
        crit = crit or mcrit
        problems += problems_of(mruns)
    w("## Micro-benchmarks (criterion, `benches/hot_paths.rs`)")
    w("")
    if not crit:
        w("_Not run (`scripts/bench.sh` in full mode without `--per-core` runs "
          "`cargo bench --bench hot_paths`)._")
    else:
        w("| Benchmark | Mean | 95% interval | Throughput |")
        w("| --- | ---: | ---: | ---: |")
        for name, mean, lo, hi, thr in crit:
            w(f"| `{name}` | {mean} | {lo} – {hi} | {thr} |")
    w("")

    # The soak's summary and the hand-recorded A/B experiments (neither rerun by this script)
    # are kept with the benches.
    try:
        with open("benches/soak.md") as f:
            w(f.read().rstrip("\n"))
            w("")
    except OSError:
        pass
    try:
        with open("benches/experiments.md") as f:
            w(f.read().rstrip("\n"))
            w("")
    except OSError:
        pass

    w("## Anomalies")
    w("")
    if problems:
        for p in problems[:40]:
            w(f"- {p}")
        if len(problems) > 40:
            w(f"- … and {len(problems) - 40} more (see the `runs/` directories)")
    else:
        w("None: every run exited cleanly, no connection failed, no server wrote to stderr.")
    w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("scripts/bench.sh              # default mode: bench-results/latest/")
    w("scripts/bench.sh --per-core   # one pinned core per server: bench-results/per-core/")
    w("```")
    w("")
    w("Each builds `wsgate` and `wsgate-bench` (`cargo build --release --bins`) and the peers "
      "(`cd benches/peers && cargo build --release`, a separate workspace), runs everything "
      "in its section against 127.0.0.1, rewrites its own `bench-results/` directory (one JSON "
      "per run, the load generator's stderr in `logs/`, the charts) and regenerates this file "
      "from both directories. Run them under `flock /tmp/wsgate-bench.lock` on a shared "
      "machine. On this machine `--quick` takes about 2 minutes, the default mode about 12 "
      "and `--per-core` about 16, plus the builds.")
    w("")
    with open(a.md, "w") as f:
        f.write("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd_name", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rusage", required=True)
    r.add_argument("--timeout", type=float, required=True)
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("record")
    for k in ("out", "kind", "server", "load", "bench-json", "rusage", "server-stderr", "argv"):
        c.add_argument("--" + k, required=True)
    c.add_argument("--server-stats", default="", help="the server's own counters (JSON), if any")
    c.add_argument("--loadavg", type=float, default=None, help="1-minute load average before the run")
    c.add_argument("--round", type=int, required=True)
    c.add_argument("--exit-code", type=int, required=True)
    c.add_argument("--server-user-ticks", type=int, required=True)
    c.add_argument("--server-sys-ticks", type=int, required=True)
    c.add_argument("--clk-tck", type=int, required=True)
    c.set_defaults(fn=cmd_record)
    p = sub.add_parser("report")
    for k in ("dir", "md", "mode", "command", "duration", "warmup", "wsgate-args"):
        p.add_argument("--" + k, required=True)
    p.add_argument("--built", type=int, required=True)
    p.add_argument("--criterion", default="", help="criterion output dir (target/criterion)")
    p.add_argument("--peer-runtime", default="current-thread", help="the peers' runtime in --per-core")
    rr = sub.add_parser("rerender", help="BENCHMARKS.md again from bench-results/*/summary.json, "
                        "without running anything (run from the repository root)")
    rr.add_argument("--md", default="BENCHMARKS.md")
    rr.add_argument("--dir", default="bench-results/latest", help="any results directory")
    rr.set_defaults(fn=cmd_rerender)
    for k in ("elapsed", "rounds", "threads", "workers"):
        p.add_argument("--" + k, type=int, required=True)
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
