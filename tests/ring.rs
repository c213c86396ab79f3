//! The io_uring data path (src/ring.rs): multishot receives into a per-core buffer ring and
//! sends on the ring. Run against the real gateway on io_uring (the default driver here); the
//! readiness path is covered by the epoll and `--no-ring` passes of the other suites.

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;
use tungstenite::{Message, WebSocket};

const T: Duration = Duration::from_secs(10);

fn echo_client(gw: &Gateway) -> WebSocket<TcpStream> {
    let ws = wsgate::client::connect_raw(gw.addr, "/echo").expect("connect /echo");
    ws.get_ref().set_read_timeout(Some(T)).unwrap();
    ws
}

fn read_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("read an echo") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text echo, got {other:?}"),
        }
    }
}

/// Every WebSocket holds exactly one armed multishot recv while open, and none is left once
/// the connections are gone, however they end (a close handshake, a reset, the server's
/// close): an armed recv holds a reference to its connection, so a leak would show here.
#[test]
fn every_recv_armed_on_the_ring_ends_with_its_connection() {
    let gw = Gateway::start(&[]);
    let mut clients: Vec<_> = (0..60).map(|i| gw.connect(&format!("r{i}"))).collect();
    // A round trip on each: its bytes came through the ring.
    for (i, c) in clients.iter_mut().enumerate() {
        let ack = c
            .request(json!({"type": "join", "room": "lobby"}), json!(i), T)
            .unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    gw.wait_for("60 armed receives", T, || {
        gw.metric("wsgate_ring_recvs_armed", "") == 60.0
    });
    assert!(gw.metric("wsgate_ring_recvs_total", "") >= 60.0);
    let mut rest = clients.split_off(20);
    // 20 close cleanly, 20 vanish, 20 are closed by the server (a kick through the API).
    for c in clients {
        c.close();
    }
    for c in rest.drain(..20) {
        c.abort();
    }
    for (i, _) in rest.iter().enumerate() {
        let body = json!({"user": format!("r{}", 40 + i)}).to_string();
        let (status, answer) = http(gw.addr, "POST", "/api/disconnect", Some(&body), &[]);
        assert_eq!(status, 200, "{answer}");
    }
    gw.wait_connections(0, T);
    gw.wait_for("no armed receive left", T, || {
        gw.metric("wsgate_ring_recvs_armed", "") == 0.0
    });
    drop(rest);
}

/// A connection that receives a large message leaves the ring for readiness reads; the switch
/// keeps every byte in order: small messages before the large one and a stream of them after
/// it (arriving while the switch is under way) come back in order and intact.
#[test]
fn a_large_message_moves_its_connection_off_the_ring_in_order() {
    use std::io::Write;
    let gw = Gateway::start(&["--echo-path", "/echo", "--workers", "1"]);
    let mut ws = echo_client(&gw);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(format!("before {i}"));
    }
    sent.push("L".repeat(20_000));
    for i in 0..3000 {
        sent.push(format!("after {i}"));
    }
    // Written as raw frames from a second handle, one write each, while this thread reads.
    let mut raw = ws.get_ref().try_clone().unwrap();
    let writer = {
        let sent = sent.clone();
        thread::spawn(move || {
            for m in &sent {
                raw.write_all(&client_frame(0x81, m.as_bytes())).unwrap();
            }
        })
    };
    for (i, m) in sent.iter().enumerate() {
        let got = read_text(&mut ws);
        assert!(
            got == *m,
            "echo {i}: {} bytes, expected {}",
            got.len(),
            m.len()
        );
    }
    writer.join().unwrap();
    assert_eq!(gw.metric("wsgate_ring_left_total", ""), 1.0);
    // Off the ring, it goes on like any connection: a round trip, then a clean close.
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(read_text(&mut ws), "still here");
    ws.close(None).unwrap();
    gw.wait_connections(0, T);
    gw.wait_for("no armed receive left", T, || {
        gw.metric("wsgate_ring_recvs_armed", "") == 0.0
    });
}

/// With the buffer ring run dry (4 buffers for 16 busy connections), receives end with
/// `ENOBUFS`; each such connection waits for buffers and carries on: nothing is lost, nothing
/// reordered, no connection hangs.
#[test]
fn an_empty_buffer_ring_starves_no_connection() {
    let gw = Gateway::start_with(&["--echo-path", "/echo", "--workers", "1"], |cmd| {
        cmd.env("WSGATE_FAULT_RING_BUFFERS", "4");
    });
    let addr = gw.addr;
    for round in 0..20 {
        thread::scope(|s| {
            for c in 0..16 {
                s.spawn(move || {
                    let mut ws = wsgate::client::connect_raw(addr, "/echo").unwrap();
                    ws.get_ref().set_read_timeout(Some(T)).unwrap();
                    let sent: Vec<String> = (0..300)
                        .map(|i| format!("{round}/{c}/{i}/{}", "x".repeat(i % 200)))
                        .collect();
                    for m in &sent {
                        ws.write(Message::text(m.clone())).unwrap();
                    }
                    ws.flush().unwrap();
                    for (i, m) in sent.iter().enumerate() {
                        assert_eq!(read_text(&mut ws), *m, "client {c}, echo {i}");
                    }
                    ws.close(None).unwrap();
                });
            }
        });
        if gw.metric("wsgate_ring_starved_total", "") > 0.0 {
            break;
        }
    }
    assert!(
        gw.metric("wsgate_ring_starved_total", "") > 0.0,
        "the buffer ring never ran dry: the test did not test starvation"
    );
    gw.wait_connections(0, T);
    gw.wait_for("no armed receive left", T, || {
        gw.metric("wsgate_ring_recvs_armed", "") == 0.0
    });
}

/// The running kernel's (major, minor) version.
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

/// Small messages from many connections share the ring's buffers (filled in parts, Linux
/// 6.12): 200 connections' 26-byte frames fill one or two 4 KiB buffers, not 200. Before,
/// each took a buffer of its own, and a ping round over thousands of connections made the
/// whole buffer ring resident (the soak's RSS swung by 15 MB).
#[test]
fn small_messages_from_many_connections_share_buffers() {
    if kernel() < (6, 12) {
        eprintln!(
            "skipped: buffers filled in parts need Linux 6.12 (this is {:?})",
            kernel()
        );
        return;
    }
    let gw = Gateway::start(&["--echo-path", "/echo", "--workers", "1"]);
    let mut clients: Vec<_> = (0..200).map(|_| echo_client(&gw)).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        let text = format!("small message {i:06}");
        assert_eq!(text.len(), 20);
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(read_text(ws), text);
    }
    let recvs = gw.metric("wsgate_ring_recvs_total", "");
    let filled = gw.metric("wsgate_ring_buffers_filled_total", "");
    assert!(
        recvs >= 200.0,
        "each message is a receive of its own: {recvs}"
    );
    // 200 x 26 bytes = 5,200: two buffers, with room to spare for the buffer the self-test
    // started (it is filled on from byte 3).
    assert!(
        filled <= 3.0,
        "{filled} buffers filled for {recvs} small receives: they do not share buffers"
    );
}
