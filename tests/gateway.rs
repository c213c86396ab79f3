//! End-to-end tests of the core gateway: the real binary on port 0, real sockets, 2 workers.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn health_and_refusals_are_plain_http() {
    let gw = Gateway::start(&[]);
    assert_eq!(
        http(gw.addr, "GET", "/healthz", None, &[]),
        (200, "ok".into())
    );
    // No identity.
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let (status, body) = http(gw.addr, "GET", "/ws", None, &upgrade);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(gw.addr, "GET", "/ws?user=not%20valid", None, &upgrade);
    assert_eq!(status, 401);
    // Malformed upgrades.
    let (status, body) = http(gw.addr, "GET", "/ws?user=a", None, &[]);
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(gw.addr, "GET", "/ws?user=a", None, &upgrade[..3]);
    assert_eq!(status, 400);
    let (status, _) = http(gw.addr, "GET", "/nope", None, &[]);
    assert_eq!(status, 404);
    // Garbage instead of HTTP gets an answer, not a hang or a crash.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"\x16\x03\x01 definitely not http\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let stats = gw.stats();
    assert_eq!(stats["connections"], 0);
    assert!(stats["total"]["handshake_failures"].as_u64().unwrap() >= 4);
}

#[test]
fn welcome_then_send_reaches_every_connection_of_the_user() {
    let gw = Gateway::start(&[]);
    let mut a = gw.connect("alice");
    assert_eq!(a.user, "alice");
    assert!(!a.conn.is_empty());
    let mut b1 = gw.connect("bob");
    let mut b2 = gw.connect("bob");
    assert_ne!(b1.conn, b2.conn);
    assert_eq!(send_acked(&mut a, "bob", json!({"x": 1}), 1), 2);
    for b in [&mut b1, &mut b2] {
        let m = b.recv(T).unwrap();
        assert_eq!(
            m,
            json!({"type": "message", "from": "alice", "data": {"x": 1}})
        );
    }
    // Offline user: delivered 0. Sending to oneself includes one's own connections.
    assert_eq!(send_acked(&mut a, "nobody", json!(null), 2), 0);
    assert_eq!(send_acked(&mut b1, "bob", json!("self"), 3), 2);
    assert_eq!(b1.recv_message(T).unwrap()["data"], "self");
    assert_eq!(b2.recv_message(T).unwrap()["data"], "self");
    // Without an id there is no ack, but delivery happens.
    a.send_to("bob", json!(4), None).unwrap();
    assert_eq!(b2.recv(T).unwrap()["data"], 4);
}

#[test]
fn data_and_id_pass_through_byte_exact() {
    let gw = Gateway::start(&[]);
    let mut a = gw.connect("a");
    let mut b = gw.connect("b");
    let raw = r#"{"type":"send","to":"b","id":"x-1","data":{"big":18446744073709551615,"odd":9007199254740993,"f":0.1000000000000000055511151231257827,"s":"\u00e9\n\"q\""}}"#;
    a.send_text(raw).unwrap();
    let b_raw = match b.ws().read().unwrap() {
        tungstenite::Message::Text(t) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        b_raw,
        r#"{"type":"message","from":"a","data":{"big":18446744073709551615,"odd":9007199254740993,"f":0.1000000000000000055511151231257827,"s":"\u00e9\n\"q\""}}"#
    );
    let ack = match a.ws().read().unwrap() {
        tungstenite::Message::Text(t) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ack, r#"{"type":"ack","id":"x-1","delivered":1}"#);
}

/// The production bug this gateway exists to make impossible: one user's disconnect must
/// never cut another user off.
#[test]
fn seed_scenario_disconnects_do_not_cut_off_others() {
    let gw = Gateway::start(&[]);
    let mut c: HashMap<&str, Client> = ["1001", "1002", "1003", "1004"]
        .into_iter()
        .map(|u| (u, gw.connect(u)))
        .collect();
    let users = ["1001", "1002", "1003", "1004"];
    let mut id = 0;
    for from in users {
        for to in users {
            if from != to {
                id += 1;
                let sender = c.get_mut(from).unwrap();
                assert_eq!(
                    send_acked(sender, to, json!({"from": from, "n": id}), id),
                    1
                );
            }
        }
    }
    for to in users {
        let r = c.get_mut(to).unwrap();
        let mut from: Vec<String> = (0..3)
            .map(|_| {
                r.recv_message(T).unwrap()["from"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        from.sort();
        let want: Vec<String> = users
            .iter()
            .filter(|u| **u != to)
            .map(|u| u.to_string())
            .collect();
        assert_eq!(from, want, "messages received by {to}");
    }
    c.remove("1004").unwrap().close();
    gw.wait_presence("1004", 0, T);
    let s = c.get_mut("1003").unwrap();
    assert_eq!(send_acked(s, "1001", json!("after 1004 left"), 100), 1);
    assert_eq!(
        c.get_mut("1001").unwrap().recv_message(T).unwrap()["data"],
        "after 1004 left"
    );
    c.remove("1002").unwrap().abort();
    gw.wait_presence("1002", 0, T);
    let s = c.get_mut("1003").unwrap();
    assert_eq!(send_acked(s, "1001", json!("after 1002 left"), 101), 1);
    assert_eq!(
        c.get_mut("1001").unwrap().recv_message(T).unwrap()["data"],
        "after 1002 left"
    );
    // And the departed users are really gone (the directory drops them a moment after the
    // connection count).
    gw.wait_connections(2, T);
    gw.wait_stats("2 users", T, |s| s["users"] == 2);
    let s = c.get_mut("1003").unwrap();
    assert_eq!(send_acked(s, "1004", json!(0), 102), 0);
    assert_eq!(send_acked(s, "1002", json!(0), 103), 0);
    // The users who stayed still reach each other, both ways, after both departures.
    assert_eq!(send_acked(s, "1001", json!("last"), 104), 1);
    assert_eq!(
        c.get_mut("1001").unwrap().recv_message(T).unwrap()["data"],
        "last"
    );
    let s = c.get_mut("1001").unwrap();
    assert_eq!(send_acked(s, "1003", json!("back"), 105), 1);
    assert_eq!(
        c.get_mut("1003").unwrap().recv_message(T).unwrap()["data"],
        "back"
    );
}

/// Reconnect storms: the new connection opens before the old one closes (cleanly or by a
/// reset). The old one's late cleanup must never remove the new one.
#[test]
fn reconnect_race_always_reaches_exactly_the_live_connection() {
    let gw = Gateway::start(&[]);
    let mut sender = gw.connect("sender");
    let mut old = gw.connect("phone");
    for round in 0..60u64 {
        let mut new = gw.connect("phone");
        if round % 2 == 0 {
            old.abort();
        } else {
            old.close();
        }
        // The live connection gets every message, whatever the cleanup timing.
        sender.send_to("phone", json!(round), None).unwrap();
        let m = new.recv_message(T).unwrap();
        assert_eq!(m["data"], round, "round {round}");
        old = new;
    }
    // Once the cleanups have landed, exactly one connection is counted.
    let end = Instant::now() + T;
    let mut id = 1000;
    loop {
        id += 1;
        let d = send_acked(&mut sender, "phone", json!("count"), id);
        old.recv_message(T).unwrap();
        if d == 1 {
            break;
        }
        assert!(Instant::now() < end, "delivered stayed at {d}");
        thread::sleep(Duration::from_millis(20));
    }
    gw.wait_connections(2, T);
}

/// Hundreds of connections of tens of users connect and disconnect concurrently across two
/// workers; afterwards every user's `delivered` equals its live connections.
#[test]
fn churn_leaves_the_directory_exact() {
    let gw = Gateway::start(&[]);
    let addr = gw.addr;
    let threads = 8;
    let per_thread = 40;
    let live: Vec<Vec<Client>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..per_thread {
                        let user = format!("u{}", (t * per_thread + i) % 25);
                        let c = Client::connect(addr, &user).unwrap();
                        match i % 3 {
                            0 => c.close(),
                            1 => c.abort(),
                            _ => kept.push(c),
                        }
                    }
                    kept
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut expected: HashMap<String, u64> = HashMap::new();
    for c in live.iter().flatten() {
        *expected.entry(c.user.clone()).or_default() += 1;
    }
    let total: u64 = expected.values().sum();
    gw.wait_connections(total as i64, T);
    let mut probe = gw.connect("probe");
    let mut id = 0;
    for u in 0..25 {
        let user = format!("u{u}");
        let want = expected.get(&user).copied().unwrap_or(0);
        // The last departures reach the owner core a moment after the connection count
        // drops; then routing must count exactly the live connections.
        gw.wait_presence(&user, want, T);
        id += 1;
        assert_eq!(
            send_acked(&mut probe, &user, json!(null), id),
            want,
            "user {user}"
        );
    }
    let users = expected.len() as u64 + 1;
    gw.wait_stats(&format!("{users} users"), T, |s| s["users"] == users);
}

#[test]
fn routable_at_welcome_under_concurrent_connects() {
    let gw = Gateway::start(&[]);
    let addr = gw.addr;
    thread::scope(|s| {
        for t in 0..6 {
            s.spawn(move || {
                let mut sender = Client::connect(addr, &format!("s{t}")).unwrap();
                for i in 0..30 {
                    let user = format!("w{t}-{i}");
                    let mut c = Client::connect(addr, &user).unwrap();
                    // Welcome received: a send issued now must count and arrive.
                    assert_eq!(send_acked(&mut sender, &user, json!(i), i), 1);
                    assert_eq!(c.recv_message(T).unwrap()["data"], i);
                }
            });
        }
    });
}

/// Several senders to several receivers across two workers: every sequence complete and in
/// order.
#[test]
fn order_is_kept_per_sender_across_workers() {
    let gw = Gateway::start(&[]);
    let n = 400u64;
    let receivers: Vec<Client> = (0..4).map(|r| gw.connect(&format!("r{r}"))).collect();
    // Two connections of one receiver user, which may sit on different cores.
    let extra = gw.connect("r0");
    let start = Arc::new(Barrier::new(4));
    let addr = gw.addr;
    let senders: Vec<_> = (0..3)
        .map(|s| {
            let start = start.clone();
            thread::spawn(move || {
                let mut c = Client::connect(addr, &format!("s{s}")).unwrap();
                start.wait();
                for i in 0..n {
                    for r in 0..4 {
                        c.send_to(&format!("r{r}"), json!({"s": s, "i": i}), None)
                            .unwrap();
                    }
                }
                c
            })
        })
        .collect();
    start.wait();
    let check = |mut c: Client| {
        thread::spawn(move || {
            let mut next = [0u64; 3];
            for _ in 0..3 * n {
                let m = c.recv_message(T).unwrap();
                let s = m["data"]["s"].as_u64().unwrap() as usize;
                assert_eq!(m["data"]["i"], next[s], "sender {s} out of order");
                next[s] += 1;
            }
            assert_eq!(next, [n; 3]);
        })
    };
    let checks: Vec<_> = receivers.into_iter().chain([extra]).map(check).collect();
    for c in checks {
        c.join().unwrap();
    }
    for s in senders {
        s.join().unwrap();
    }
}

/// A pair keeps exchanging messages while other connections misbehave in every way.
#[test]
fn bad_input_is_answered_and_isolated() {
    let gw = Gateway::start(&["--max-message-size", "1024"]);
    let stop = Arc::new(AtomicBool::new(false));
    // Both connected (welcomed, so routable) before anything else happens: the bad client
    // below sends to pair-a and expects `delivered: 1`.
    let mut a = gw.connect("pair-a");
    let mut b = gw.connect("pair-b");
    let pair = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut i = 0u64;
            // At least a few exchanges however fast the misbehaving side finishes.
            while i < 20 || !stop.load(Ordering::Relaxed) {
                assert_eq!(send_acked(&mut a, "pair-b", json!(i), i), 1);
                assert_eq!(b.recv_message(T).unwrap()["data"], i);
                i += 1;
            }
            i
        })
    };

    let mut c = gw.connect("bad");
    let err = |c: &mut Client, text: &str| {
        c.send_text(text).unwrap();
        let v = c.recv(T).unwrap();
        assert_eq!(v["type"], "error", "{text} -> {v}");
        v
    };
    assert_eq!(err(&mut c, "{not json")["code"], "bad_json");
    let v = err(&mut c, r#"{"type":"fly","id":7}"#);
    assert_eq!(
        (v["code"].as_str(), &v["id"]),
        (Some("bad_request"), &json!(7))
    );
    let v = err(
        &mut c,
        r#"{"type":"send","to":"no spaces","data":1,"id":"s"}"#,
    );
    assert_eq!(
        (v["code"].as_str(), &v["id"]),
        (Some("bad_user"), &json!("s"))
    );
    assert_eq!(
        err(&mut c, r#"{"type":"send","to":"x"}"#)["code"],
        "bad_request"
    );
    assert_eq!(
        err(&mut c, r#"{"type":"send","to":5,"data":1}"#)["code"],
        "bad_request"
    );
    assert_eq!(err(&mut c, "[1]")["code"], "bad_request");
    assert_eq!(err(&mut c, "")["code"], "bad_json");
    c.send_binary(b"\x00\x01").unwrap();
    assert_eq!(c.recv(T).unwrap()["code"], "bad_request");
    // Still open and working after all that.
    assert_eq!(send_acked(&mut c, "pair-a", json!("hi"), 99), 1);

    // Too big: close 1009.
    let mut big = gw.connect("big");
    big.send_text(&format!(
        "{{\"type\":\"send\",\"to\":\"x\",\"data\":\"{}\"}}",
        "a".repeat(2000)
    ))
    .unwrap();
    expect_close(&mut big, 1009, T);

    // Raw bytes a fresh connection sends, and the close code they must get.
    let raw_closes: [(&str, Vec<u8>, u16); 3] = [
        // Invalid UTF-8 in a text frame.
        ("utf", client_frame(0x81, b"\xff\xfe"), 1007),
        // Reserved bits: a protocol error.
        ("rsv", client_frame(0xC1, b"{}"), 1002),
        // An unmasked frame: a protocol error.
        ("unmasked", vec![0x81, 0x02, b'{', b'}'], 1002),
    ];
    for (user, bytes, code) in raw_closes {
        let mut c = gw.connect(user);
        c.ws().get_mut().write_all(&bytes).unwrap();
        expect_close(&mut c, code, T);
    }

    // A peer that vanishes mid-frame.
    let mut half = gw.connect("half");
    half.ws()
        .get_mut()
        .write_all(&client_frame(0x81, &[b'x'; 500])[..100])
        .unwrap();
    half.abort();

    stop.store(true, Ordering::Relaxed);
    let exchanged = pair.join().unwrap();
    assert!(exchanged > 0);
    gw.wait_connections(1, T);
    assert!(gw.stats()["total"]["protocol_closes"].as_u64().unwrap() >= 4);
}

/// A consumer that stops reading is closed with 1013 once its queue is full, and counted;
/// nobody else notices.
#[test]
fn slow_consumer_is_closed_with_1013_and_others_are_unaffected() {
    let gw = Gateway::start(&["--max-queued-bytes", "65536"]);
    let mut slow = gw.connect("slow");
    let mut fast = gw.connect("fast");
    let mut sender = gw.connect("sender");
    // The slow client reads nothing until the gateway gives up on it: the kernel buffers
    // fill, then the gateway's queue passes its limit.
    let chunk = "x".repeat(32_000);
    let mut closed_at = None;
    for i in 0..3000u64 {
        sender.send_to("slow", json!(chunk), None).unwrap();
        if i % 20 == 0 {
            assert_eq!(send_acked(&mut sender, "fast", json!(i), i), 1);
            assert_eq!(fast.recv_message(T).unwrap()["data"], i);
            if gw.stats()["total"]["slow_consumer_closes"] == 1 {
                closed_at = Some(i);
                break;
            }
        }
    }
    assert!(closed_at.is_some(), "never closed: {}", gw.stats());
    // The slow client, reading at last, finds its backlog cut and a 1013 close.
    expect_close(&mut slow, 1013, T);
    assert_eq!(send_acked(&mut sender, "fast", json!("still here"), 1), 1);
    gw.wait_connections(2, T);
}

/// Idle clients that answer pings stay connected indefinitely: no read deadline. With a
/// 500 ms ping interval and a 2 s idle timeout, 8 s of silence (but pongs) spans four idle
/// timeouts and many pings.
#[test]
fn idle_connection_that_answers_pings_stays_and_receives() {
    let gw = Gateway::start(&["--ping-interval", "500ms", "--idle-timeout", "2s"]);
    let mut idle = gw.connect("idle");
    let mut pings = 0;
    idle.ws()
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        // The client library answers each ping as it reads it.
        match idle.ws().read() {
            Ok(tungstenite::Message::Ping(_)) => {
                pings += 1;
                idle.ws().flush().unwrap();
            }
            Ok(other) => panic!("idle client got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("idle client lost its connection: {e}"),
        }
    }
    assert!(pings >= 8, "saw {pings} pings in 8 s at a 500 ms interval");
    assert_eq!(gw.stats()["total"]["idle_closes"], 0);
    let mut sender = gw.connect("sender");
    assert_eq!(send_acked(&mut sender, "idle", json!("still there"), 1), 1);
    assert_eq!(idle.recv_message(T).unwrap()["data"], "still there");
}

/// A client that answers pings survives many idle timeouts; one that answers nothing is
/// closed with 4000 after the idle timeout (not before).
#[test]
fn pings_keep_alive_and_silent_peers_are_closed_with_4000() {
    let gw = Gateway::start(&["--ping-interval", "300ms", "--idle-timeout", "2500ms"]);
    let mut answering = gw.connect("answering");
    let mut silent = gw.connect("silent");
    let started = Instant::now();
    // The answering client reads (and so answers pings) for three idle timeouts.
    while started.elapsed() < Duration::from_millis(7500) {
        match answering.recv(Duration::from_millis(200)) {
            Err(ClientError::Timeout) => {}
            other => panic!("answering client got {other:?}"),
        }
    }
    // The silent one never answered: by now it has been pinged, then closed with 4000.
    let frames = read_raw_frames(&mut silent, T);
    assert!(
        frames.iter().any(|(op, _)| *op == 9),
        "no ping in {frames:?}"
    );
    assert_eq!(raw_close_code(&frames), Some(4000), "{frames:?}");
    let stats = gw.stats();
    assert_eq!(stats["total"]["idle_closes"], 1, "{stats}");
    gw.wait_presence("silent", 0, T);
    let mut sender = gw.connect("sender");
    assert_eq!(send_acked(&mut sender, "answering", json!(1), 1), 1);
    assert_eq!(send_acked(&mut sender, "silent", json!(1), 2), 0);
}

#[test]
fn silent_peer_is_not_closed_before_the_idle_timeout() {
    let gw = Gateway::start(&["--ping-interval", "500ms", "--idle-timeout", "5s"]);
    let silent = gw.connect("silent");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(gw.stats()["connections"], 1);
    drop(silent);
}

/// Hundreds of connections close from both sides at once (client close frame right after a
/// frame that makes the server close) while messages flow to them.
#[test]
fn double_close_under_traffic_is_harmless() {
    let gw = Gateway::start(&[]);
    let addr = gw.addr;
    let n = 240;
    let mut clients: Vec<Client> = (0..n)
        .map(|i| gw.connect(&format!("d{}", i % 40)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = Client::connect(addr, "pump").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                s.send_to(&format!("d{}", i % 40), json!(i), None).unwrap();
                i += 1;
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    let barrier = Arc::new(Barrier::new(4));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let mine: Vec<Client> = clients.split_off(clients.len() - n / 4);
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                for (i, mut c) in mine.into_iter().enumerate() {
                    let stream = c.ws().get_mut();
                    match (i + w) % 4 {
                        // A reserved opcode (server closes 1002) and our close, back to back.
                        0 => {
                            let mut bytes = client_frame(0x83, b"");
                            bytes.extend(client_frame(0x88, &1000u16.to_be_bytes()));
                            let _ = stream.write_all(&bytes);
                            c.abort();
                        }
                        1 => {
                            let _ = stream.write_all(&client_frame(0x83, b""));
                            c.close();
                        }
                        2 => c.close(),
                        _ => c.abort(),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    pump.join().unwrap();
    gw.wait_connections(0, T);
    gw.wait_stats("no users", T, |s| s["users"] == 0);
    assert_eq!(http(gw.addr, "GET", "/healthz", None, &[]).0, 200);
    let mut a = gw.connect("after");
    assert_eq!(send_acked(&mut a, "after", json!(1), 1), 1);
}

#[test]
fn client_close_handshake_is_answered() {
    let gw = Gateway::start(&[]);
    let mut c = gw.connect("closer");
    c.ws().close(None).unwrap();
    // tungstenite reports a completed handshake as ConnectionClosed after the server's reply.
    let end = Instant::now() + T;
    loop {
        match c.ws().read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake not answered cleanly: {e}"),
        }
        assert!(Instant::now() < end);
    }
    gw.wait_connections(0, T);
}

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits() {
    let mut gw = Gateway::start(&["--shutdown-timeout", "5s"]);
    let mut clients: Vec<Client> = (0..20).map(|i| gw.connect(&format!("x{i}"))).collect();
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    for c in &mut clients {
        expect_close(c, 1001, T);
    }
    drop(clients);
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(8), "did not exit");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    // New connections are refused once it is gone.
    assert!(std::net::TcpStream::connect(gw.addr).is_err());
}

#[test]
fn shutdown_timeout_bounds_exit_when_clients_never_close() {
    let mut gw = Gateway::start(&["--shutdown-timeout", "1s"]);
    // A client that never reads never sees the close frame and never answers it.
    let _stuck: Vec<Client> = (0..5).map(|i| gw.connect(&format!("s{i}"))).collect();
    let started = Instant::now();
    gw.signal(libc::SIGINT);
    loop {
        if gw.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not exit in time"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--listen", "127.0.0.1:0", "--ping-interval", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("500ms"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ping-interval",
            "2s",
            "--idle-timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout"));
}

/// A client that floods the gateway with small messages (faster than the gateway can parse
/// them, so bytes always wait on its socket) cannot hold its core: with one worker, others
/// still connect and exchange messages.
fn flooding_client_does_not_stall_its_core(driver: &str) {
    let gw = Gateway::start(&["--workers", "1", "--driver", driver]);
    let addr = gw.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut c = Client::connect(addr, "flooder").unwrap();
            let msg = br#"{"type":"send","to":"nobody","data":1}"#;
            let bulk: Vec<u8> = (0..2000).flat_map(|_| client_frame(0x81, msg)).collect();
            while !stop.load(Ordering::Relaxed) {
                if c.ws().get_mut().write_all(&bulk).is_err() {
                    break;
                }
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    let mut a = gw.connect("a");
    let mut b = gw.connect("b");
    for i in 0..20 {
        assert_eq!(send_acked(&mut a, "b", json!(i), i), 1);
        assert_eq!(b.recv_message(T).unwrap()["data"], i);
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
}

#[test]
fn a_flooding_client_does_not_stall_its_core() {
    // `auto`: io_uring here, and epoll in the test command's epoll pass
    // (MONOIO_FORCE_LEGACY_DRIVER=1), which an explicit `io-uring` would override.
    flooding_client_does_not_stall_its_core("auto");
}

/// On the epoll driver readiness is reported at once while bytes wait, so the flooder's task
/// must pause by itself every few reads (and a self-wake would not do: monoio runs such a
/// task again first).
#[test]
fn a_flooding_client_does_not_stall_its_core_on_epoll() {
    flooding_client_does_not_stall_its_core("epoll");
}

#[test]
fn epoll_fallback_serves_the_same_protocol() {
    let gw = Gateway::start(&["--driver", "epoll"]);
    let mut a = gw.connect("a");
    let mut b = gw.connect("b");
    assert_eq!(send_acked(&mut a, "b", json!([1, 2]), 1), 1);
    assert_eq!(b.recv_message(T).unwrap()["data"], json!([1, 2]));
}

/// Regression: the liveness sweeper must not queue anything on a connection whose upgrade has
/// not been answered yet (a ping ahead of the 101 broke the handshake).
#[test]
fn no_frame_ever_precedes_the_upgrade_answer() {
    // A 10 ms sweeper tick and many concurrent upgrades make the window likely.
    let gw = Gateway::start(&["--ping-interval", "50ms", "--idle-timeout", "10s"]);
    let addr = gw.addr;
    thread::scope(|s| {
        for t in 0..8 {
            s.spawn(move || {
                for i in 0..60 {
                    let c = Client::connect(addr, &format!("h{t}-{i}"))
                        .unwrap_or_else(|e| panic!("upgrade {t}/{i}: {e}"));
                    c.abort();
                }
            });
        }
    });
}

/// Regression: a connection is routable (in the directory) a moment before its welcome is
/// written; deliveries arriving then must follow the 101 and the welcome, never precede them.
#[test]
fn deliveries_racing_a_new_connection_follow_its_welcome() {
    let gw = Gateway::start(&[]);
    let addr = gw.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = Client::connect(addr, "flooder").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                s.send_to("target", json!(i), None).unwrap();
                i += 1;
            }
        })
    };
    thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..50 {
                    // connect() fails unless the 101 and then the welcome come first.
                    let c = Client::connect(addr, "target")
                        .unwrap_or_else(|e| panic!("connect {t}/{i}: {e}"));
                    c.abort();
                }
            });
        }
    });
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
}
