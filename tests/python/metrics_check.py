"""/metrics read by the reference Prometheus text parser (Python prometheus_client).

Usage: metrics_check.py HOST:PORT. The gateway has had traffic before this runs.
"""
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

ADDR = sys.argv[1]
with urllib.request.urlopen(f"http://{ADDR}/metrics", timeout=10) as r:
    ctype = r.headers["Content-Type"]
    text = r.read().decode()
assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype

families = {f.name: f for f in text_string_to_metric_families(text)}
need = {
    "wsgate_connections": "gauge",
    "wsgate_users": "gauge",
    "wsgate_rooms": "gauge",
    "wsgate_local_rooms": "gauge",
    "wsgate_messages_in": "counter",
    "wsgate_messages_out": "counter",
    "wsgate_deliveries": "counter",
    "wsgate_bytes_in": "counter",
    "wsgate_bytes_out": "counter",
    "wsgate_closes": "counter",
    "wsgate_slow_consumer_closes": "counter",
    "wsgate_rate_limited": "counter",
    "wsgate_handshake_failures": "counter",
    "wsgate_crosscore_batches": "counter",
    "wsgate_crosscore_batched_messages": "counter",
    "wsgate_limit": "gauge",
}
for name, kind in need.items():
    assert name in families, f"missing {name}: {sorted(families)}"
    assert families[name].type == kind, (name, families[name].type)


def total(name, **labels):
    return sum(
        s.value
        for s in families[name].samples
        if s.name in (name, name + "_total")
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


cores = {s.labels["core"] for s in families["wsgate_connections"].samples}
assert cores == {"0", "1"}, cores
assert total("wsgate_connections") == 2, total("wsgate_connections")
assert total("wsgate_messages_in") >= 5
assert total("wsgate_deliveries") >= 5
assert total("wsgate_handshake_failures", status="401") >= 1
print("prometheus parser check: ok")
