#!/usr/bin/env python3
"""Writes deploy/grafana-dashboard.json (the dashboard is generated: edit this, then run
`python3 deploy/make-dashboard.py`; scripts/test-deploy.sh checks the two agree and that every
metric used exists in the gateway's /metrics)."""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"
panels = []
y = 0
pid = 0
def nid():
    global pid; pid += 1; return pid

def row(title):
    global y
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1

def targets(exprs):
    out = []
    for i, (expr, legend) in enumerate(exprs):
        out.append({"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i), "range": True})
    return out

x = 0
def place(w, h):
    global x, y
    if x + w > 24:
        x = 0; y += h_last[0]
    pos = {"h": h, "w": w, "x": x, "y": y}
    x += w; h_last[0] = h
    return pos
h_last = [0]
def newline():
    global x, y
    if x: y += h_last[0]; x = 0

def stat(title, expr, unit="short", desc=""):
    panels.append({"type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
                   "gridPos": place(4, 4), "targets": targets([(expr, "")]),
                   "fieldConfig": {"defaults": {"unit": unit, "decimals": 0 if unit == "short" else None,
                                                "color": {"mode": "thresholds"},
                                                "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}},
                                   "overrides": []},
                   "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                               "colorMode": "value", "graphMode": "area", "textMode": "auto", "justifyMode": "auto",
                               "orientation": "auto"}})

def ts(title, exprs, unit="short", desc="", w=12, h=8, stack=False):
    panels.append({"type": "timeseries", "title": title, "id": nid(), "datasource": DS, "description": desc,
                   "gridPos": place(w, h), "targets": targets(exprs),
                   "fieldConfig": {"defaults": {"unit": unit, "min": 0,
                                                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                           "showPoints": "never", "spanNulls": False,
                                                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}}},
                                   "overrides": []},
                   "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                               "tooltip": {"mode": "multi", "sort": "desc"}}})

row("Overview")
stat("Connections", f"sum(wsgate_connections{{{SEL}}})", desc="Open WebSocket connections.")
stat("Users", f"sum(wsgate_users{{{SEL}}})", desc="Users with at least one connection (each counted once, on its owner core).")
stat("Rooms", f"sum(wsgate_rooms{{{SEL}}})", desc="Rooms with members (each counted once).")
stat("Deliveries/s", f"sum(rate(wsgate_deliveries_total{{{SEL}}}[{RI}]))", unit="short", desc="Messages handed to recipient connections per second.")
stat("Slow-consumer closes (1h)", f"sum(increase(wsgate_slow_consumer_closes_total{{{SEL}}}[1h]))", desc="Connections closed with 1013 because their outbound queue overflowed.")
stat("Refused upgrades/s", f"sum(rate(wsgate_handshake_failures_total{{{SEL}}}[{RI}]))", desc="Upgrades answered with a plain HTTP error.")
newline()

row("Connections")
ts("Connections by core", [(f"sum by (instance, core) (wsgate_connections{{{SEL}}})", "{{instance}} core {{core}}")])
ts("Users and rooms", [(f"sum by (instance) (wsgate_users{{{SEL}}})", "users {{instance}}"),
                       (f"sum by (instance) (wsgate_rooms{{{SEL}}})", "rooms {{instance}}"),
                       (f"sum by (instance) (wsgate_local_rooms{{{SEL}}})", "local rooms (per core, summed) {{instance}}")])
newline()
ts("New connections/s", [(f"sum by (instance) (rate(wsgate_connections_accepted_total{{{SEL}}}[{RI}]))", "accepted {{instance}}")], unit="cps")
ts("HTTP connections (not upgraded, API)", [(f"sum by (instance, core) (wsgate_http_connections{{{SEL}}})", "{{instance}} core {{core}}"),
                       (f"max by (instance) (wsgate_limit{{{SEL}, name=\"max_http_connections\"}}) > 0", "limit {{instance}}"),
                       (f"sum by (instance) (rate(wsgate_http_connections_refused_total{{{SEL}}}[{RI}]))", "refused/s (at the limit) {{instance}}")],
   desc="TCP connections not upgraded to WebSocket: reading their request, answering plain HTTP or the API, or idle between keep-alive requests. Over --max-http-connections new ones are refused with 503.")
newline()

row("Traffic")
ts("Messages/s", [(f"sum by (instance) (rate(wsgate_messages_in_total{{{SEL}}}[{RI}]))", "in {{instance}}"),
                  (f"sum by (instance) (rate(wsgate_messages_out_total{{{SEL}}}[{RI}]))", "frames out {{instance}}"),
                  (f"sum by (instance) (rate(wsgate_deliveries_total{{{SEL}}}[{RI}]))", "deliveries {{instance}}")], unit="short")
ts("Bytes/s", [(f"sum by (instance) (rate(wsgate_bytes_in_total{{{SEL}}}[{RI}]))", "in {{instance}}"),
               (f"sum by (instance) (rate(wsgate_bytes_out_total{{{SEL}}}[{RI}]))", "out {{instance}}")], unit="Bps")
newline()

row("Closes and refusals")
ts("Closes by code /s", [(f"sum by (code) (rate(wsgate_closes_total{{{SEL}}}[{RI}]))", "{{code}}")],
   desc="Connections ended, by the close code the gateway sent (none: no close frame). 1001 shutdown, 1008 policy, 1013 slow consumer, 4000 idle.", stack=True)
ts("Slow consumers, idle, protocol and rate-limit closes /s",
   [(f"sum by (instance) (rate(wsgate_slow_consumer_closes_total{{{SEL}}}[{RI}]))", "slow consumer (1013) {{instance}}"),
    (f"sum by (instance) (rate(wsgate_idle_closes_total{{{SEL}}}[{RI}]))", "idle (4000) {{instance}}"),
    (f"sum by (instance) (rate(wsgate_protocol_closes_total{{{SEL}}}[{RI}]))", "protocol {{instance}}"),
    (f"sum by (instance) (rate(wsgate_rate_limit_closes_total{{{SEL}}}[{RI}]))", "rate abuse (1008) {{instance}}")])
newline()
ts("Refused upgrades by status /s", [(f"sum by (status) (rate(wsgate_handshake_failures_total{{{SEL}}}[{RI}]))", "{{status}}")],
   desc="401 identity, 403 origin, 429 per-user limit, 503 connection limit or shutting down, 400/413/431 malformed.", stack=True)
ts("Refused messages and accept errors /s",
   [(f"sum by (instance) (rate(wsgate_rate_limited_total{{{SEL}}}[{RI}]))", "rate limited {{instance}}"),
    (f"sum by (instance) (rate(wsgate_too_many_rooms_total{{{SEL}}}[{RI}]))", "too many rooms {{instance}}"),
    (f"sum by (instance) (rate(wsgate_accept_errors_total{{{SEL}}}[{RI}]))", "accept errors {{instance}}")],
   desc="accept() errors usually mean the file-descriptor limit (EMFILE/ENFILE) was reached.")
newline()

row("Cores, queues and backpressure")
ts("Cross-core batches/s", [(f"sum by (instance, core) (rate(wsgate_crosscore_batches_total{{{SEL}}}[{RI}]))", "{{instance}} core {{core}}")])
ts("Mean cross-core batch size", [(f"sum by (instance) (rate(wsgate_crosscore_batched_messages_total{{{SEL}}}[{RI}])) / sum by (instance) (rate(wsgate_crosscore_batches_total{{{SEL}}}[{RI}]))", "{{instance}}")],
   desc="Messages per cross-core batch (one wake per batch): higher under load is the design working.")
newline()
ts("Queued outbound bytes", [(f"sum by (instance, core) (wsgate_queued_bytes{{{SEL}}})", "{{instance}} core {{core}}"),
                            (f"max by (instance, core) (wsgate_queued_bytes_peak{{{SEL}}})", "peak since start {{instance}} core {{core}}"),
                            (f"max by (instance) (wsgate_limit{{{SEL}, name=\"max_total_queued_bytes\"}}) > 0", "limit (all cores) {{instance}}")], unit="bytes",
   desc="Outbound bytes waiting in connection queues, per core, and the most ever queued. Each core's share of max_total_queued_bytes is the limit divided by the cores; past it the core pauses reading (backpressure).")
ts("Mailbox depth (cross-core messages waiting)", [(f"max by (instance, core) (wsgate_mailbox_depth{{{SEL}}})", "{{instance}} core {{core}}"),
                            (f"max by (instance, core) (wsgate_mailbox_peak{{{SEL}}})", "peak since start {{instance}} core {{core}}"),
                            (f"max by (instance) (wsgate_limit{{{SEL}, name=\"mailbox_limit\"}}) > 0", "limit {{instance}}")])
newline()
ts("Backpressure pauses/s", [(f"sum by (instance, core) (rate(wsgate_backpressure_pauses_total{{{SEL}}}[{RI}]))", "{{instance}} core {{core}}")],
   desc="Times a core paused reading because queues were full. Sustained pauses: the gateway is overloaded or consumers are slow.")
panels.append({"type": "table", "title": "Configured limits (0 = off)", "id": nid(), "datasource": DS,
               "gridPos": place(12, 8),
               "targets": [{"datasource": DS, "expr": f"max by (instance, name) (wsgate_limit{{{SEL}}})", "format": "table", "instant": True, "refId": "A"}],
               "fieldConfig": {"defaults": {}, "overrides": []},
               "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": "value"}}}],
               "options": {"showHeader": True}})

row("Cluster (with --cluster)")
ts("Connected to the broker", [(f"min by (instance) (wsgate_cluster_connected{{{SEL}}})", "{{instance}}")],
   desc="1 while the node is connected to its broker (NATS). 0: it serves only its own connections; cross-node delivery stops (alert WsgateCutOffFromBroker).")
ts("Live nodes seen", [(f"max by (instance) (wsgate_cluster_nodes{{{SEL}}})", "{{instance}}")],
   desc="Nodes heard from within 3 s, this one included. Every node should see the same number.")
newline()
ts("Broker messages/s", [(f"sum by (instance) (rate(wsgate_cluster_messages_to_broker_total{{{SEL}}}[{RI}]))", "to broker {{instance}}"),
                         (f"sum by (instance) (rate(wsgate_cluster_messages_from_broker_total{{{SEL}}}[{RI}]))", "from broker {{instance}}")])
ts("Reconnects, late and missing node answers, drops /s",
   [(f"sum by (instance) (rate(wsgate_cluster_reconnects_total{{{SEL}}}[{RI}]))", "reconnects {{instance}}"),
    (f"sum by (instance) (rate(wsgate_cluster_late_answers_total{{{SEL}}}[{RI}]))", "late answers {{instance}}"),
    (f"sum by (instance) (rate(wsgate_cluster_missing_answers_total{{{SEL}}}[{RI}]))", "missing answers {{instance}}"),
    (f"sum by (instance) (rate(wsgate_cluster_dropped_total{{{SEL}}}[{RI}]))", "dropped {{instance}}")],
   desc="Missing answers: a node left out of a count after --cluster-timeout. Dropped: requests the bridge's full queue refused.")

dash = {
  "title": "wsgate",
  "uid": "wsgate-overview",
  "description": "wsgate WebSocket push gateway: connections, traffic, closes, refusals, cross-core batching, queues.",
  "tags": ["wsgate", "websocket"],
  "timezone": "browser",
  "editable": True,
  "graphTooltip": 1,
  "refresh": "30s",
  "schemaVersion": 39,
  "version": 1,
  "time": {"from": "now-3h", "to": "now"},
  "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
                            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
  "templating": {"list": [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
    {"name": "job", "label": "Job", "type": "query", "datasource": DS, "query": {"query": "label_values(wsgate_connections, job)", "refId": "job"},
     "definition": "label_values(wsgate_connections, job)", "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1, "hide": 0},
    {"name": "instance", "label": "Instance", "type": "query", "datasource": DS, "query": {"query": "label_values(wsgate_connections{job=~\"$job\"}, instance)", "refId": "instance"},
     "definition": "label_values(wsgate_connections{job=~\"$job\"}, instance)", "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1, "hide": 0},
  ]},
  "panels": panels,
}
text = json.dumps(dash, indent=2) + "\n"
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana-dashboard.json")
if out == "-":
    sys.stdout.write(text)
else:
    with open(out, "w") as f:
        f.write(text)
    print(f"{out}: {len(panels)} panels", file=sys.stderr)
