//! Plain HTTP on the gateway's port: health, Prometheus metrics and the backend API.
//!
//! Each call is answered before the next request on the same connection is read, so one
//! HTTP client's calls are carried out in order (pipelined requests too). A call that routes
//! across cores answers once every core involved has counted its deliveries.

use std::time::Duration;

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use serde_json::json;

use crate::auth;
use crate::core::{ApiCall, Core};
use crate::http::{self, Request};
use crate::protocol::{self, ApiRequest, ErrorCode};
use crate::stats::Snapshot;

/// How long an API call waits for the cores' counts before answering 503.
const API_WAIT: Duration = Duration::from_secs(10);

/// Answers one plain HTTP request.
pub(crate) async fn answer(core: &Core, req: &Request, keep_alive: bool) -> Vec<u8> {
    let get = req.method == "GET" || req.method == "HEAD";
    let path = req.path.as_str();
    match path {
        "/healthz" if get => http::response(200, "text/plain", b"ok", keep_alive, ""),
        "/metrics" if get => http::response(
            200,
            "text/plain; version=0.0.4",
            metrics(core).as_bytes(),
            keep_alive,
            "",
        ),
        "/readyz" if get => readyz(core, keep_alive),
        "/healthz" | "/metrics" | "/readyz" => method_not_allowed("GET", keep_alive),
        "/demo" | "/demo/" | "/demo/wsgate.js" if core.config().demo => demo(path, get, keep_alive),
        _ if path.starts_with("/api/") => api(core, req, keep_alive).await,
        _ => http::json_error(404, "not_found", "no such path", keep_alive),
    }
}

/// `GET /readyz`: `200 ready` while the node can serve fully; `503` with the reason
/// otherwise (a load balancer takes it out of rotation, its connections stay served).
fn readyz(core: &Core, keep_alive: bool) -> Vec<u8> {
    let shutting_down = core.shutting_down.get()
        || core
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::Relaxed);
    let reason = if shutting_down {
        Some("shutting down")
    } else if core
        .shared
        .cluster
        .as_ref()
        .is_some_and(|c| !c.connected.load(std::sync::atomic::Ordering::Relaxed))
    {
        Some("broker disconnected")
    } else {
        None
    };
    match reason {
        None => http::response(200, "text/plain", b"ready", keep_alive, ""),
        Some(r) => http::response(503, "text/plain", r.as_bytes(), keep_alive, ""),
    }
}

/// The demo chat page and the JavaScript client it runs on (`--demo`), compiled in.
const DEMO_PAGE: &str = include_str!("../clients/js/demo/index.html");
const DEMO_CLIENT: &str = include_str!("../clients/js/wsgate.js");

fn demo(path: &str, get: bool, keep_alive: bool) -> Vec<u8> {
    if !get {
        return method_not_allowed("GET", keep_alive);
    }
    match path {
        "/demo" => http::response(301, "text/plain", b"", keep_alive, "Location: /demo/\r\n"),
        "/demo/wsgate.js" => http::response(
            200,
            "text/javascript; charset=utf-8",
            DEMO_CLIENT.as_bytes(),
            keep_alive,
            "Cache-Control: no-cache\r\n",
        ),
        _ => http::response(
            200,
            "text/html; charset=utf-8",
            DEMO_PAGE.as_bytes(),
            keep_alive,
            "Cache-Control: no-cache\r\n",
        ),
    }
}

fn method_not_allowed(allowed: &str, keep_alive: bool) -> Vec<u8> {
    http::json_error(
        405,
        "method_not_allowed",
        &format!("use {allowed}"),
        keep_alive,
    )
}

fn ok_json(body: serde_json::Value, keep_alive: bool) -> Vec<u8> {
    http::response(
        200,
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
        "",
    )
}

fn bad(code: ErrorCode, message: &str, keep_alive: bool) -> Vec<u8> {
    http::json_error(400, code.as_str(), message, keep_alive)
}

/// The count for an API call, or `None` (answered 503) after `API_WAIT` or at shutdown.
async fn wait(core: &Core, call: &ApiCall<'_>) -> Option<u64> {
    let counted = monoio::time::timeout(API_WAIT, call.slot.wait());
    core.unless_shutdown(counted).await?.ok()
}

async fn api(core: &Core, req: &Request, keep_alive: bool) -> Vec<u8> {
    if let Some(key) = &core.config().api_key {
        if !req.bearer().is_some_and(|t| auth::api_key_matches(t, key)) {
            return http::response(
                401,
                "application/json",
                br#"{"error":"unauthorized","message":"missing or wrong API key: send Authorization: Bearer <key>"}"#,
                keep_alive,
                "WWW-Authenticate: Bearer\r\n",
            );
        }
    }
    let call = &req.path["/api/".len()..];
    let method = req.method.as_str();
    if let Some(user) = call.strip_prefix("presence/") {
        if method != "GET" {
            return method_not_allowed("GET", keep_alive);
        }
        let user = percent_decode(user);
        if !protocol::valid_user(&user) {
            return bad(ErrorCode::BadUser, "invalid user id", keep_alive);
        }
        let slot = core.api_presence(&user);
        return match wait(core, &slot).await {
            Some(n) => ok_json(json!({"user": user, "connections": n}), keep_alive),
            None => unavailable(keep_alive),
        };
    }
    match call {
        "stats" if method == "GET" => {
            let body = core.shared.stats_json();
            http::response(200, "application/json", body.as_bytes(), keep_alive, "")
        }
        "stats" => method_not_allowed("GET", keep_alive),
        "send" | "publish" | "broadcast" | "disconnect" if method != "POST" => {
            method_not_allowed("POST", keep_alive)
        }
        "send" | "publish" | "broadcast" | "disconnect" => {
            let parsed = match protocol::parse_api(call, &req.body) {
                Ok(p) => p,
                Err(e) => return bad(e.code, &e.message, keep_alive),
            };
            let (slot, field) = match parsed {
                ApiRequest::Send { to, data } => (
                    core.api_send(&to, protocol::message(None, None, data)),
                    "delivered",
                ),
                ApiRequest::Publish { room, data } => (
                    core.api_publish(&room, protocol::message(None, Some(&room), data)),
                    "delivered",
                ),
                ApiRequest::Broadcast { data } => (
                    core.api_broadcast(protocol::message(None, None, data)),
                    "delivered",
                ),
                ApiRequest::Disconnect { user } => (core.api_disconnect(&user), "closed"),
            };
            match wait(core, &slot).await {
                Some(n) => ok_json(json!({ field: n }), keep_alive),
                None => unavailable(keep_alive),
            }
        }
        _ => http::json_error(404, "not_found", "no such API call", keep_alive),
    }
}

fn unavailable(keep_alive: bool) -> Vec<u8> {
    http::json_error(
        503,
        "unavailable",
        "the gateway did not answer in time (shutting down?)",
        keep_alive,
    )
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `GET /metrics`: every counter per core, in the Prometheus text format (0.0.4).
pub(crate) fn metrics(core: &Core) -> String {
    let (_, snaps) = core.shared.snapshot();
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, get: fn(&Snapshot) -> i64| {
        let g = IntGaugeVec::new(Opts::new(name, help), &["core"]).expect("valid metric");
        for (i, s) in snaps.iter().enumerate() {
            g.with_label_values(&[&i.to_string()]).set(get(s));
        }
        registry.register(Box::new(g)).expect("unique metric");
    };
    gauge("wsgate_connections", "Open WebSocket connections.", |s| {
        s.connections
    });
    gauge(
        "wsgate_users",
        "Users with connections (each counted on its owner core).",
        |s| s.users,
    );
    gauge(
        "wsgate_rooms",
        "Rooms with members (each counted on its owner core).",
        |s| s.rooms,
    );
    gauge(
        "wsgate_local_rooms",
        "Rooms with members on the core (a room spread over cores counts on each).",
        |s| s.local_rooms,
    );
    gauge(
        "wsgate_http_connections",
        "TCP connections not upgraded to WebSocket (request, plain HTTP, keep-alive wait).",
        |s| s.http_connections,
    );
    gauge(
        "wsgate_ring_recvs_armed",
        "Multishot receives armed on the core's io_uring data path (one per plain WebSocket).",
        |s| s.ring_recvs_armed,
    );
    gauge(
        "wsgate_queued_bytes",
        "Outbound bytes queued on the core's connections, not yet written.",
        |s| s.queued_bytes,
    );
    gauge(
        "wsgate_queued_bytes_peak",
        "The most outbound bytes the core ever had queued (compare with max_total_queued_bytes / cores).",
        |s| s.queued_bytes_peak,
    );
    gauge(
        "wsgate_mailbox_depth",
        "Messages other cores queued to this core, not yet handled.",
        |s| s.mailbox_depth,
    );
    gauge(
        "wsgate_mailbox_peak",
        "The highest mailbox depth since start (compare with mailbox_limit).",
        |s| s.mailbox_peak,
    );
    let counter = |name: &str, help: &str, get: fn(&Snapshot) -> u64| {
        let c = IntCounterVec::new(Opts::new(name, help), &["core"]).expect("valid metric");
        for (i, s) in snaps.iter().enumerate() {
            c.with_label_values(&[&i.to_string()]).inc_by(get(s));
        }
        registry.register(Box::new(c)).expect("unique metric");
    };
    counter(
        "wsgate_connections_accepted_total",
        "WebSocket connections accepted.",
        |s| s.connections_total,
    );
    counter(
        "wsgate_messages_in_total",
        "Client messages received.",
        |s| s.messages_in,
    );
    counter(
        "wsgate_messages_out_total",
        "Frames queued to connections.",
        |s| s.messages_out,
    );
    counter(
        "wsgate_deliveries_total",
        "Messages handed to recipient connections.",
        |s| s.deliveries,
    );
    counter(
        "wsgate_bytes_in_total",
        "Bytes read from WebSocket connections.",
        |s| s.bytes_in,
    );
    counter(
        "wsgate_bytes_out_total",
        "Bytes written to WebSocket connections.",
        |s| s.bytes_out,
    );
    counter(
        "wsgate_slow_consumer_closes_total",
        "Connections closed with 1013 for a full queue.",
        |s| s.slow_consumer_closes,
    );
    counter(
        "wsgate_idle_closes_total",
        "Connections closed with 4000 for idleness.",
        |s| s.idle_closes,
    );
    counter(
        "wsgate_protocol_closes_total",
        "Connections closed for protocol errors (1002, 1007, 1009).",
        |s| s.protocol_closes,
    );
    counter(
        "wsgate_rate_limited_total",
        "Messages refused by the rate limit.",
        |s| s.rate_limited,
    );
    counter(
        "wsgate_rate_limit_closes_total",
        "Connections closed with 1008 for rate abuse.",
        |s| s.rate_limit_closes,
    );
    counter(
        "wsgate_too_many_rooms_total",
        "Joins refused by the per-connection room limit.",
        |s| s.too_many_rooms,
    );
    counter(
        "wsgate_crosscore_batches_total",
        "Cross-core batches sent.",
        |s| s.batches_sent,
    );
    counter(
        "wsgate_crosscore_batched_messages_total",
        "Messages carried in cross-core batches (divide by batches for the mean batch size).",
        |s| s.batched_messages,
    );
    counter(
        "wsgate_http_connections_refused_total",
        "Connections refused at once for --max-http-connections.",
        |s| s.http_connections_refused,
    );
    counter(
        "wsgate_backpressure_pauses_total",
        "Times the core stopped reading from clients because a queue was over its bound.",
        |s| s.backpressure_pauses,
    );
    counter(
        "wsgate_accept_errors_total",
        "Failed accepts (out of file descriptors, or other errors).",
        |s| s.accept_errors,
    );
    counter(
        "wsgate_ring_recvs_total",
        "Parts received on the io_uring data path (one per completion of a multishot recv).",
        |s| s.ring_recvs,
    );
    counter(
        "wsgate_ring_buffers_filled_total",
        "Provided buffers the kernel filled and moved past on the io_uring data path (with buffers filled in parts, Linux 6.12: about one per 4 KiB received; else one per part).",
        |s| s.ring_buffers_filled,
    );
    counter(
        "wsgate_ring_starved_total",
        "Receives on the io_uring data path that found the core's buffer ring empty.",
        |s| s.ring_starved,
    );
    counter(
        "wsgate_ring_sends_total",
        "Sends completed on the io_uring data path (each carries every frame queued, up to 64).",
        |s| s.ring_sends,
    );
    counter(
        "wsgate_ring_left_total",
        "Connections that left the io_uring data path for readiness reads after 4 KiB or more arrived in one receive (a large message or a burst).",
        |s| s.ring_left,
    );
    let labelled =
        |name: &str,
         help: &str,
         label: &str,
         get: fn(&Snapshot) -> &std::collections::BTreeMap<String, u64>| {
            let c =
                IntCounterVec::new(Opts::new(name, help), &["core", label]).expect("valid metric");
            for (i, s) in snaps.iter().enumerate() {
                for (k, v) in get(s) {
                    c.with_label_values(&[&i.to_string(), k.as_str()])
                        .inc_by(*v);
                }
            }
            registry.register(Box::new(c)).expect("unique metric");
        };
    labelled(
        "wsgate_closes_total",
        "Connections ended, by the close code sent (none: no close frame).",
        "code",
        |s| &s.closes,
    );
    labelled(
        "wsgate_handshake_failures_total",
        "Refused upgrades, by HTTP status.",
        "status",
        |s| &s.refusals,
    );
    let episodes = prometheus::IntCounter::new(
        "wsgate_backpressure_episodes_total",
        "Times a core turned the gateway-wide backpressure on (a mailbox or its queued bytes over the bound).",
    )
    .expect("valid metric");
    episodes.inc_by(core.shared.pressure.episodes());
    registry
        .register(Box::new(episodes))
        .expect("unique metric");
    let limits = IntGaugeVec::new(
        Opts::new("wsgate_limit", "Configured limits (0 = off)."),
        &["name"],
    )
    .expect("valid metric");
    let c = core.config();
    for (name, v) in [
        ("max_connections", c.max_connections as i64),
        (
            "max_connections_per_user",
            c.max_connections_per_user as i64,
        ),
        ("max_rooms_per_conn", c.max_rooms_per_conn as i64),
        ("max_message_size", c.max_message_size as i64),
        ("max_queued_bytes", c.max_queued_bytes as i64),
        ("max_total_queued_bytes", c.max_total_queued_bytes as i64),
        ("mailbox_limit", c.mailbox_limit as i64),
        ("max_http_connections", c.http_connection_limit() as i64),
        ("rate_limit", c.rate_limit as i64),
    ] {
        limits.with_label_values(&[name]).set(v);
    }
    registry.register(Box::new(limits)).expect("unique metric");
    if let Some(tls) = &core.shared.tls {
        let reloads = IntCounterVec::new(
            Opts::new(
                "wsgate_tls_reloads_total",
                "Certificate reloads (SIGHUP), by result; a failed one keeps the old certificate.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let (ok, error) = tls.reloads();
        reloads.with_label_values(&["ok"]).inc_by(ok);
        reloads.with_label_values(&["error"]).inc_by(error);
        registry.register(Box::new(reloads)).expect("unique metric");
        let failures = prometheus::IntCounter::new(
            "wsgate_tls_handshake_failures_total",
            "Connections whose TLS handshake failed (not TLS, bad records, certificate refused).",
        )
        .expect("valid metric");
        failures.inc_by(tls.handshake_failures());
        registry
            .register(Box::new(failures))
            .expect("unique metric");
        if let Some(t) = tls.not_after() {
            let expiry = prometheus::IntGauge::new(
                "wsgate_tls_cert_not_after_seconds",
                "The served certificate's notAfter, in Unix seconds.",
            )
            .expect("valid metric");
            expiry.set(t);
            registry.register(Box::new(expiry)).expect("unique metric");
        }
    }
    if let Some(cl) = &core.shared.cluster {
        cluster_metrics(&registry, cl);
    }
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Cluster mode's metrics (one per node, no `core` label).
fn cluster_metrics(registry: &Registry, c: &crate::cluster::ClusterShared) {
    use std::sync::atomic::Ordering::Relaxed;
    let gauge = |name: &str, help: &str, v: i64| {
        let g = prometheus::IntGauge::new(name, help).expect("valid metric");
        g.set(v);
        registry.register(Box::new(g)).expect("unique metric");
    };
    gauge(
        "wsgate_cluster_connected",
        "1 while connected to the broker.",
        i64::from(c.connected.load(Relaxed)),
    );
    let nodes = c.nodes.lock().map(|n| n.len()).unwrap_or(0);
    gauge(
        "wsgate_cluster_nodes",
        "Live nodes of the cluster (heard from within 3 s), this one included.",
        nodes as i64,
    );
    let counter = |name: &str, help: &str, v: u64| {
        let g = prometheus::IntCounter::new(name, help).expect("valid metric");
        g.inc_by(v);
        registry.register(Box::new(g)).expect("unique metric");
    };
    counter(
        "wsgate_cluster_messages_to_broker_total",
        "Messages published to the broker.",
        c.to_broker.load(Relaxed),
    );
    counter(
        "wsgate_cluster_messages_from_broker_total",
        "Messages received from the broker.",
        c.from_broker.load(Relaxed),
    );
    counter(
        "wsgate_cluster_reconnects_total",
        "Reconnections to the broker after losing it.",
        c.reconnects.load(Relaxed),
    );
    counter(
        "wsgate_cluster_late_answers_total",
        "Nodes' answers that came after their count was settled.",
        c.late_answers.load(Relaxed),
    );
    counter(
        "wsgate_cluster_missing_answers_total",
        "Nodes left out of a count for not answering within --cluster-timeout.",
        c.missing_answers.load(Relaxed),
    );
    counter(
        "wsgate_cluster_dropped_total",
        "Requests to other nodes dropped because the bridge's queue was full.",
        c.dropped.load(Relaxed),
    );
}
