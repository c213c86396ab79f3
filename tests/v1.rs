//! The whole v1 protocol: rooms, the backend API, JWT identity, limits, metrics, config.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};
use wsgate::auth::{sign_jwt, sign_with_header};

fn request(c: &mut Client, req: Value, id: u64) -> Value {
    c.request(req, id.into(), T).unwrap()
}

fn join(c: &mut Client, room: &str, id: u64) {
    let v = request(c, json!({"type": "join", "room": room}), id);
    assert_eq!(v, json!({"type": "ack", "id": id}), "join {room}");
}

fn publish(c: &mut Client, room: &str, data: Value, id: u64) -> u64 {
    let v = request(
        c,
        json!({"type": "publish", "room": room, "data": data}),
        id,
    );
    assert_eq!(v["type"], "ack", "{v}");
    v["delivered"].as_u64().unwrap()
}

/// Connections until both cores hold at least `per_core` of them (keys name the core).
fn spread(gw: &Gateway, user: &str, per_core: usize) -> Vec<Client> {
    let mut by_core = [Vec::new(), Vec::new()];
    for _ in 0..200 {
        let c = gw.connect(user);
        let core = (u64::from_str_radix(&c.conn, 16).unwrap() >> 56) as usize;
        by_core[core].push(c);
        if by_core.iter().all(|v| v.len() >= per_core) {
            break;
        }
    }
    assert!(
        by_core.iter().all(|v| v.len() >= per_core),
        "connections did not spread"
    );
    let [mut a, mut b] = by_core;
    // Close the extra connections and wait until the directory has dropped them, so exact
    // counts that follow see only the ones returned.
    for extra in a
        .split_off(per_core)
        .into_iter()
        .chain(b.split_off(per_core))
    {
        extra.close();
    }
    gw.wait_presence(user, 2 * per_core as u64, T);
    a.into_iter().chain(b).collect()
}

/// Asserts that the `/metrics` text `m` has each of `lines` (a sample with its labels and
/// value, or a prefix of one).
fn assert_metrics_have(m: &str, lines: &[&str]) {
    for line in lines {
        assert!(m.contains(line), "no {line} in:\n{m}");
    }
}

fn post(gw: &Gateway, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(gw.addr, "POST", path, Some(&body.to_string()), &[]);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(gw: &Gateway, path: &str) -> (u16, Value) {
    let (status, text) = http(gw.addr, "GET", path, None, &[]);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn rooms_across_two_workers() {
    let gw = Gateway::start(&[]);
    let mut members = spread(&gw, "member", 3);
    for (i, m) in members.iter_mut().enumerate() {
        join(m, "lobby", i as u64);
    }
    // One room with members on both cores counts once in the total, and on each core locally.
    gw.wait_stats("1 room", T, |s| {
        s["total"]["rooms"] == 1 && s["total"]["local_rooms"] == 2
    });
    // A member of another user on the same room, and a non-member publisher.
    let mut outsider = gw.connect("outsider");
    let mut other_conn_of_member = gw.connect("member");
    assert_eq!(publish(&mut outsider, "lobby", json!({"n": 1}), 100), 6);
    for m in &mut members {
        assert_eq!(
            m.recv_message(T).unwrap(),
            json!({"type": "message", "from": "outsider", "room": "lobby", "data": {"n": 1}})
        );
    }
    // Membership belongs to the connection: the user's other connection got nothing.
    assert!(matches!(
        other_conn_of_member.recv(Duration::from_millis(300)),
        Err(ClientError::Timeout)
    ));
    // A publishing member receives its own message too.
    assert_eq!(publish(&mut members[0], "lobby", json!(2), 101), 6);
    for m in &mut members {
        assert_eq!(m.recv_message(T).unwrap()["data"], 2);
    }
    // Leave on each core.
    let v = request(
        &mut members[0],
        json!({"type": "leave", "room": "lobby"}),
        5,
    );
    assert_eq!(v, json!({"type": "ack", "id": 5}));
    let v = request(
        &mut members[5],
        json!({"type": "leave", "room": "lobby"}),
        6,
    );
    assert_eq!(v["type"], "ack");
    assert_eq!(publish(&mut outsider, "lobby", json!(3), 102), 4);
    // Disconnect cleanup on both cores (one clean, one reset).
    // members[0] and members[5] left already; close two who did not.
    members.remove(4).abort();
    members.remove(1).close();
    let mut delivered = 0;
    for i in 0..50 {
        delivered = publish(&mut outsider, "lobby", json!("after"), 200 + i);
        if delivered == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(delivered, 2, "closed members must leave their rooms");
    // A reconnect of a member is not a member.
    let mut again = gw.connect("member");
    assert_eq!(publish(&mut outsider, "lobby", json!("x"), 300), 2);
    assert!(matches!(
        again.recv(Duration::from_millis(300)),
        Err(ClientError::Timeout)
    ));
    // Publishing to an empty room is fine.
    assert_eq!(publish(&mut outsider, "nobody-here", json!(1), 301), 0);
    // Without an id: delivered without an ack.
    outsider
        .send_json(&json!({"type": "publish", "room": "lobby", "data": "quiet"}))
        .unwrap();
    let member = &mut members[1];
    while member.recv_message(T).unwrap()["data"] != "quiet" {}
    // The last members leave by closing: no room is left anywhere.
    for m in members {
        m.close();
    }
    gw.wait_stats("no rooms", T, |s| {
        s["total"]["rooms"] == 0 && s["total"]["local_rooms"] == 0
    });
}

#[test]
fn room_publishes_keep_order_per_sender() {
    let gw = Gateway::start(&[]);
    let mut members = spread(&gw, "m", 2);
    for (i, m) in members.iter_mut().enumerate() {
        join(m, "ordered", i as u64);
    }
    let mut sender = gw.connect("sender");
    for i in 0..300 {
        sender
            .send_json(&json!({"type": "publish", "room": "ordered", "data": i}))
            .unwrap();
    }
    for m in &mut members {
        for i in 0..300 {
            assert_eq!(m.recv_message(T).unwrap()["data"], i);
        }
    }
}

#[test]
fn room_errors_and_the_room_limit() {
    let gw = Gateway::start(&["--max-rooms-per-conn", "2"]);
    let mut c = gw.connect("joiner");
    join(&mut c, "a", 1);
    join(&mut c, "b", 2);
    join(&mut c, "a", 3); // already a member: not counted twice
    let v = request(&mut c, json!({"type": "join", "room": "c"}), 4);
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("too_many_rooms"))
    );
    assert_eq!(v["id"], 4);
    let v = request(&mut c, json!({"type": "join", "room": "bad room"}), 5);
    assert_eq!(v["code"], "bad_room");
    let v = request(&mut c, json!({"type": "publish", "room": "a"}), 6);
    assert_eq!(v["code"], "bad_request");
    let v = request(&mut c, json!({"type": "join"}), 7);
    assert_eq!(v["code"], "bad_request");
    // Leaving frees a place.
    request(&mut c, json!({"type": "leave", "room": "b"}), 8);
    join(&mut c, "c", 9);
    let m = metrics(&gw);
    assert!(m.contains("wsgate_too_many_rooms_total{core="), "{m}");
}

#[test]
fn backend_api_calls() {
    let gw = Gateway::start(&[]);
    let mut users = spread(&gw, "api-user", 1);
    let mut other = gw.connect("other");
    join(&mut users[0], "news", 1);
    join(&mut other, "news", 2);

    let (s, v) = post(
        &gw,
        "/api/send",
        json!({"to": "api-user", "data": {"k": [1, 2]}}),
    );
    assert_eq!((s, v), (200, json!({"delivered": 2})));
    for u in &mut users {
        // From the backend: no `from` key at all.
        assert_eq!(
            u.recv_message(T).unwrap(),
            json!({"type": "message", "data": {"k": [1, 2]}})
        );
    }
    let (s, v) = post(
        &gw,
        "/api/publish",
        json!({"room": "news", "data": "headline"}),
    );
    assert_eq!((s, v), (200, json!({"delivered": 2})));
    assert_eq!(
        other.recv_message(T).unwrap(),
        json!({"type": "message", "room": "news", "data": "headline"})
    );
    assert_eq!(users[0].recv_message(T).unwrap()["room"], "news");
    let (s, v) = post(&gw, "/api/broadcast", json!({"data": null}));
    assert_eq!((s, v), (200, json!({"delivered": 3})));
    for c in users.iter_mut().chain([&mut other]) {
        assert_eq!(c.recv_message(T).unwrap()["data"], Value::Null);
    }
    assert_eq!(
        get(&gw, "/api/presence/api-user"),
        (200, json!({"user": "api-user", "connections": 2}))
    );
    assert_eq!(
        get(&gw, "/api/presence/ghost"),
        (200, json!({"user": "ghost", "connections": 0}))
    );
    let (s, v) = get(&gw, "/api/stats");
    assert_eq!(s, 200);
    assert_eq!(v["connections"], 3);
    assert_eq!(v["cores"].as_array().unwrap().len(), 2);
    // "news" has members on one or two cores: one room, counted on its owner core (which
    // hears of a member set a moment after the join's ack).
    gw.wait_stats("1 room", T, |s| s["total"]["rooms"] == 1);

    // Disconnect: every connection of the user is closed with 1008.
    let (s, v) = post(&gw, "/api/disconnect", json!({"user": "api-user"}));
    assert_eq!((s, v), (200, json!({"closed": 2})));
    for u in &mut users {
        expect_close(u, 1008, T);
    }
    gw.wait_connections(1, T);
    // The user's owner core drops it from the directory a moment after its connections end.
    let end = std::time::Instant::now() + T;
    while get(&gw, "/api/presence/api-user").1["connections"] != 0 {
        assert!(std::time::Instant::now() < end, "presence never reached 0");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (s, v) = post(&gw, "/api/disconnect", json!({"user": "api-user"}));
    assert_eq!((s, v), (200, json!({"closed": 0})));
}

#[test]
fn backend_api_error_cases() {
    let gw = Gateway::start(&["--max-message-size", "1000"]);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/api/send", "{nope", 400, "bad_json"),
        ("POST", "/api/send", "[1]", 400, "bad_request"),
        ("POST", "/api/send", r#"{"to":"a"}"#, 400, "bad_request"),
        (
            "POST",
            "/api/send",
            r#"{"to":"a b","data":1}"#,
            400,
            "bad_user",
        ),
        (
            "POST",
            "/api/send",
            r#"{"to":7,"data":1}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/publish",
            r#"{"room":"","data":1}"#,
            400,
            "bad_room",
        ),
        ("POST", "/api/broadcast", r#"{}"#, 400, "bad_request"),
        (
            "POST",
            "/api/disconnect",
            r#"{"user":null}"#,
            400,
            "bad_request",
        ),
        ("GET", "/api/send", "", 405, "method_not_allowed"),
        ("POST", "/api/stats", "{}", 405, "method_not_allowed"),
        ("GET", "/api/nothing", "", 404, "not_found"),
        ("GET", "/api/presence/bad%20user", "", 400, "bad_user"),
    ];
    for (method, path, body, status, code) in cases {
        let body = (!body.is_empty()).then_some(*body);
        let (s, text) = http(gw.addr, method, path, body, &[]);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(
            (s, v["error"].as_str()),
            (*status, Some(*code)),
            "{method} {path} {text}"
        );
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{text}"
        );
    }
    let big = format!(r#"{{"to":"a","data":"{}"}}"#, "x".repeat(2000));
    assert_eq!(http(gw.addr, "POST", "/api/send", Some(&big), &[]).0, 413);
    // Still serving.
    assert_eq!(post(&gw, "/api/send", json!({"to": "a", "data": 1})).0, 200);
}

/// Keep-alive and pipelining: three requests in one write, three answers in order; one HTTP
/// client's sends reach the user in the order made.
#[test]
fn api_keep_alive_pipelining_and_order() {
    let gw = Gateway::start(&[]);
    let mut rx = gw.connect("rx");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut pipeline = String::new();
    for i in 0..3 {
        let body = json!({"to": "rx", "data": i}).to_string();
        pipeline.push_str(&format!(
            "POST /api/send HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    pipeline.push_str("GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(pipeline.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 4, "{out}");
    assert_eq!(out.matches(r#"{"delivered":1}"#).count(), 3, "{out}");
    assert!(out.ends_with("ok"), "{out}");
    for i in 0..3 {
        assert_eq!(rx.recv_message(T).unwrap()["data"], i);
    }
    // Many calls on one keep-alive connection, one after another.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..200 {
        let body = json!({"to": "rx", "data": i}).to_string();
        let req = format!(
            "POST /api/send HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .ends_with(r#"{"delivered":1}"#));
    }
    for i in 0..200 {
        assert_eq!(rx.recv_message(T).unwrap()["data"], i);
    }
}

#[test]
fn api_key_guards_every_api_call_but_not_health_or_metrics() {
    let gw = Gateway::start(&["--api-key", "k3y"]);
    let body = r#"{"to":"a","data":1}"#;
    assert_eq!(http(gw.addr, "POST", "/api/send", Some(body), &[]).0, 401);
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(
        http(gw.addr, "POST", "/api/send", Some(body), &wrong).0,
        401
    );
    assert_eq!(http(gw.addr, "GET", "/api/stats", None, &wrong).0, 401);
    assert_eq!(http(gw.addr, "GET", "/api/presence/a", None, &[]).0, 401);
    let right = [("Authorization", "Bearer k3y")];
    assert_eq!(
        http(gw.addr, "POST", "/api/send", Some(body), &right).0,
        200
    );
    assert_eq!(http(gw.addr, "GET", "/api/stats", None, &right).0, 200);
    assert_eq!(http(gw.addr, "GET", "/healthz", None, &[]).0, 200);
    assert_eq!(http(gw.addr, "GET", "/metrics", None, &[]).0, 200);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn upgrade_status(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut all = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    all.extend_from_slice(headers);
    // Read only the answer's head: a 101 keeps the connection open.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in &all {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn jwt_identity() {
    let secret = b"jwt-secret";
    let gw = Gateway::start(&["--jwt-secret", "jwt-secret", "--jwt-leeway", "0s"]);
    // Valid via the query.
    let t = sign_jwt(&json!({"sub": "alice", "exp": now() + 60.0}), secret);
    let mut a = Client::connect_query(gw.addr, &format!("token={t}")).unwrap();
    assert_eq!(a.user, "alice");
    // Valid via the header.
    let t = sign_jwt(&json!({"sub": "bob"}), secret);
    let auth = format!("Bearer {t}");
    assert_eq!(upgrade_status(&gw, "/ws", &[("Authorization", &auth)]), 101);
    // That connection was dropped right after its 101: wait until bob has none.
    gw.wait_presence("bob", 0, T);
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/ws", gw.addr))
            .unwrap();
    req.headers_mut()
        .insert("Authorization", auth.parse().unwrap());
    let stream = TcpStream::connect(gw.addr).unwrap();
    let (mut bob, _) = tungstenite::client::client(req, stream).unwrap();
    let welcome = bob.read().unwrap();
    assert!(welcome.to_text().unwrap().contains(r#""user":"bob""#));
    assert_eq!(send_acked(&mut a, "bob", json!(1), 1), 1);

    let refused = |token: &str| upgrade_status(&gw, &format!("/ws?token={token}"), &[]);
    assert_eq!(
        refused(&sign_jwt(&json!({"sub": "x", "exp": now() - 30.0}), secret)),
        401
    );
    assert_eq!(refused(&sign_jwt(&json!({"sub": "x"}), b"wrong")), 401);
    assert_eq!(
        refused(&sign_with_header(
            r#"{"alg":"none"}"#,
            &json!({"sub": "x"}),
            secret
        )),
        401
    );
    let none = sign_with_header(
        r#"{"alg":"none","typ":"JWT"}"#,
        &json!({"sub": "x"}),
        secret,
    );
    assert_eq!(
        refused(&format!("{}.", none.rsplit_once('.').unwrap().0)),
        401
    );
    assert_eq!(
        refused(&sign_with_header(
            r#"{"alg":"HS512"}"#,
            &json!({"sub": "x"}),
            secret
        )),
        401
    );
    assert_eq!(
        refused(&sign_with_header(
            r#"{"alg":"RS256"}"#,
            &json!({"sub": "x"}),
            secret
        )),
        401
    );
    assert_eq!(refused("garbage"), 401);
    // Once a secret is set, ?user= is refused.
    assert_eq!(upgrade_status(&gw, "/ws?user=alice", &[]), 401);
}

#[test]
fn token_expiring_while_connected_closes_with_1008() {
    let secret = b"s";
    let gw = Gateway::start(&["--jwt-secret", "s", "--jwt-leeway", "0s"]);
    // Taken before the token's `exp` is computed: the close may not come before it.
    let issued = std::time::Instant::now();
    let t = sign_jwt(&json!({"sub": "short", "exp": now() + 2.0}), secret);
    let mut c = Client::connect_query(gw.addr, &format!("token={t}")).unwrap();
    expect_close(&mut c, 1008, Duration::from_secs(10));
    assert!(
        issued.elapsed() >= Duration::from_millis(1990),
        "closed {:?} after issue, before exp",
        issued.elapsed()
    );
}

#[test]
fn connection_limits() {
    let gw = Gateway::start(&["--max-connections", "3", "--max-connections-per-user", "2"]);
    let _a1 = gw.connect("a");
    let _a2 = gw.connect("a");
    assert_eq!(upgrade_status(&gw, "/ws?user=a", &[]), 429);
    let b1 = gw.connect("b");
    assert_eq!(upgrade_status(&gw, "/ws?user=c", &[]), 503);
    // Limits free up when connections close.
    b1.close();
    gw.wait_connections(2, T);
    let _c = gw.connect("c");
    // Every series is exported, zeros included: check the values, summed over cores.
    assert_eq!(
        gw.metric("wsgate_handshake_failures_total", r#"status="429""#),
        1.0
    );
    assert_eq!(
        gw.metric("wsgate_handshake_failures_total", r#"status="503""#),
        1.0
    );
    assert_eq!(
        gw.metric("wsgate_handshake_failures_total", r#"status="401""#),
        0.0
    );
    let m = metrics(&gw);
    assert_metrics_have(&m, &[r#"wsgate_limit{name="max_connections"} 3"#]);
}

#[test]
fn rate_limit_answers_then_closes_persistent_abuse() {
    let gw = Gateway::start(&[
        "--rate-limit",
        "5",
        "--rate-burst",
        "5",
        "--rate-limit-close-after",
        "30",
    ]);
    let mut c = gw.connect("chatty");
    let t0 = std::time::Instant::now();
    for i in 0..20 {
        c.send_to("nobody", json!(i), Some(i.into())).unwrap();
    }
    let (mut acks, mut limited) = (0, 0);
    for _ in 0..20 {
        let v = c.recv(T).unwrap();
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                assert!(v["id"].is_u64(), "{v}");
                limited += 1;
            }
            _ => panic!("{v}"),
        }
    }
    // The burst of 5, plus what the 5/s refill allows while the 20 are in flight (a slow
    // machine takes longer over them, and the bucket refills meanwhile).
    let refill = (t0.elapsed().as_secs_f64() * 5.0).floor() as u32 + 1;
    assert!(
        (5..=5 + refill).contains(&acks),
        "acks {acks}, refill {refill}"
    );
    assert_eq!(acks + limited, 20);
    // Keeps going far over the limit: closed with 1008.
    for i in 0..100 {
        if c.send_to("nobody", json!(i), None).is_err() {
            break;
        }
    }
    expect_close(&mut c, 1008, T);
    let m = metrics(&gw);
    assert!(m.contains("wsgate_rate_limit_closes_total"), "{m}");
    // A well-behaved connection is unaffected.
    let mut calm = gw.connect("calm");
    assert_eq!(send_acked(&mut calm, "calm", json!(1), 1), 1);
}

#[test]
fn allowed_origins() {
    let gw = Gateway::start(&[
        "--allowed-origins",
        "https://ok.example,https://also.example",
    ]);
    assert_eq!(
        upgrade_status(&gw, "/ws?user=a", &[("Origin", "https://evil.example")]),
        403
    );
    assert_eq!(
        upgrade_status(&gw, "/ws?user=a", &[("Origin", "https://ok.example")]),
        101
    );
    assert_eq!(
        upgrade_status(&gw, "/ws?user=a", &[("Origin", "https://also.example")]),
        101
    );
    assert_eq!(upgrade_status(&gw, "/ws?user=a", &[]), 101);
}

fn metrics(gw: &Gateway) -> String {
    let (status, body) = http(gw.addr, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    body
}

#[test]
fn metrics_count_what_happened() {
    let gw = Gateway::start(&[]);
    let mut a = gw.connect("a");
    let _b = gw.connect("b");
    for i in 0..10 {
        send_acked(&mut a, "b", json!(i), i);
    }
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let m = metrics(&gw);
    let sum = |name: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(sum("wsgate_connections"), 2.0);
    assert!(sum("wsgate_messages_in_total") >= 10.0);
    assert!(sum("wsgate_deliveries_total") >= 10.0);
    assert_eq!(sum("wsgate_users"), 2.0);
    assert!(m.contains("# TYPE wsgate_crosscore_batches_total counter"));
    // Closes are counted by code once the connection is gone.
    drop(_b);
    gw.wait_connections(1, T);
    gw.wait_for("b's close to be counted", T, || {
        gw.metric("wsgate_closes_total", "") == 1.0
    });
}

#[test]
fn refuses_to_start_on_a_public_address_without_secrets() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("--jwt-secret"),
        "{err}"
    );
}

#[test]
fn config_file_env_and_flags_in_that_precedence() {
    let dir = std::env::temp_dir().join(format!("wsgate-cfg-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gw.toml");
    std::fs::write(
        &file,
        "max_message_size = 111\nmax-queued-bytes = 222333\nmax_rooms_per_conn = 7\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .args([
            "--config",
            file.to_str().unwrap(),
            "--max-rooms-per-conn",
            "9",
        ])
        .env("WSGATE_MAX_QUEUED_BYTES", "444555")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let (_, m) = http(addr, "GET", "/metrics", None, &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert_metrics_have(
        &m,
        &[
            // From the file.
            r#"wsgate_limit{name="max_message_size"} 111"#,
            // The env var over the file.
            r#"wsgate_limit{name="max_queued_bytes"} 444555"#,
            // The flag over the file.
            r#"wsgate_limit{name="max_rooms_per_conn"} 9"#,
        ],
    );
}

#[test]
fn help_documents_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--workers",
        "--ping-interval",
        "--idle-timeout",
        "--max-message-size",
        "--max-queued-bytes",
        "--shutdown-timeout",
        "--jwt-secret",
        "--api-key",
        "--insecure",
        "--max-connections",
        "--max-connections-per-user",
        "--max-rooms-per-conn",
        "--rate-limit",
        "--rate-burst",
        "--config",
        "--allowed-origins",
        "WSGATE_API_KEY",
        "--max-total-queued-bytes",
        "--mailbox-limit",
        "--max-http-connections",
        "--tls-cert",
        "--cluster",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    // Grouped for a newcomer, each with its default.
    for heading in [
        "Network:",
        "Identity and access:",
        "Liveness:",
        "Limits:",
        "TLS:",
        "Cluster:",
        "Observability and development:",
    ] {
        assert!(help.contains(heading), "--help lacks the group {heading}");
    }
    assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
    // A refusal names the setting and the fix.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen") && err.contains("port 0"), "{err}");
}
