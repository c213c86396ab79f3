//! Room fan-out peer: tokio-tungstenite 0.30 with one `tokio::sync::broadcast` channel per
//! room, the way a plain tokio chat server is usually written. It speaks the part of wsgate's
//! protocol v1 that `wsgate-bench room` uses, so the same generator drives both unchanged:
//!
//! * `GET /ws?user=ID` (any path; `user` from the query, `anonymous` without one), then the
//!   welcome `{"type":"welcome","user":ID,"conn":"<16 hex digits>"}` (top byte 0: "core 0").
//! * `join` / `leave` / `publish` with an optional `id`, answered like wsgate:
//!   `{"type":"ack","id":ID}` for join and leave, `{"type":"ack","id":ID,"delivered":N}` for
//!   publish, where N is the number of receivers the broadcast channel handed it to (0 when the
//!   room has none); deliveries are `{"type":"message","from":ID,"room":R,"data":DATA}` with
//!   `data` passed through byte for byte and the frame built once per publish (a refcounted
//!   `Utf8Bytes` cloned per receiver). Anything else gets `{"type":"error","code":"bad_request"}`.
//!
//! One task per connection. Per wake-up it takes every ready room message (and every ready
//! client message), `feed`s them into the sink and then `flush`es once.
//!
//! **Skipped messages.** A broadcast receiver that falls more than the channel's capacity
//! behind gets `RecvError::Lagged(n)`: n messages it will never see. The peer does not close
//! such a connection (that is the behaviour under comparison); it counts them. `GET /stats` on
//! the same port answers `{"published":…,"fed":…,"skipped":…,"lagged_events":…,…}` over the
//! whole life of the process: `fed` room messages were written into a connection's sink,
//! `skipped` never were. A skipped message is not a delivery. (The request is recognized from
//! its first bytes with `peek`: it must arrive in one segment, which a `curl` on loopback does.)
//!
//! Capacity of each room's channel: `PEER_BROADCAST_CAPACITY` (default 1024 messages).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Counters over the life of the process (`GET /stats`).
#[derive(Default)]
struct Stats {
    /// Publishes broadcast.
    published: AtomicU64,
    /// Room messages written into a connection's sink.
    fed: AtomicU64,
    /// Room messages receivers skipped (`Lagged(n)` sums).
    skipped: AtomicU64,
    /// `Lagged` errors seen.
    lagged_events: AtomicU64,
    /// WebSocket connections accepted.
    connections: AtomicU64,
}

struct State {
    rooms: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    capacity: usize,
    stats: Stats,
}

type Ws = WebSocketStream<TcpStream>;

fn main() {
    let capacity = std::env::var("PEER_BROADCAST_CAPACITY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(1024);
    let st = Arc::new(State {
        rooms: Mutex::new(HashMap::new()),
        capacity,
        stats: Stats::default(),
    });
    wsgate_peers::serve_forever("peer-broadcast", move |s| serve(st.clone(), s));
}

// The handshake callback's error type is tungstenite's (an HTTP response), large by design.
#[allow(clippy::result_large_err)]
async fn serve(st: Arc<State>, s: TcpStream) {
    let mut first = [0u8; 11];
    if let Ok(n) = s.peek(&mut first).await {
        if first[..n] == *b"GET /stats " {
            return stats(&st, s).await;
        }
    }
    let mut user = None;
    let callback = |req: &Request, resp: Response| {
        user = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("user="))
                .map(str::to_owned)
        });
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, callback).await else {
        return;
    };
    let conn = st.stats.connections.fetch_add(1, Relaxed);
    let user = user.unwrap_or_else(|| "anonymous".to_owned());
    let welcome = format!(r#"{{"type":"welcome","user":"{user}","conn":"{conn:016x}"}}"#);
    if ws.send(Message::text(welcome)).await.is_err() {
        return;
    }
    let mut subs: StreamMap<String, BroadcastStream<Utf8Bytes>> = StreamMap::new();
    loop {
        // Wait for one thing to do...
        let mut open = tokio::select! {
            m = ws.next() => request(&st, &user, &mut ws, &mut subs, m).await,
            Some((_, item)) = subs.next(), if !subs.is_empty() => deliver(&st, &mut ws, item).await,
        };
        // ...then take every room message and request that is ready without waiting.
        while open {
            if let Some(Some((_, item))) = subs.next().now_or_never() {
                open = deliver(&st, &mut ws, item).await;
            } else if let Some(m) = ws.next().now_or_never() {
                open = request(&st, &user, &mut ws, &mut subs, m).await;
            } else {
                break;
            }
        }
        // One flush for the batch (also sends queued pongs and the close answer).
        if ws.flush().await.is_err() || !open {
            break;
        }
    }
}

/// Feeds one room message, or counts what a lagging receiver skipped.
async fn deliver(
    st: &State,
    ws: &mut Ws,
    item: Result<Utf8Bytes, BroadcastStreamRecvError>,
) -> bool {
    match item {
        Ok(m) => {
            st.stats.fed.fetch_add(1, Relaxed);
            ws.feed(Message::Text(m)).await.is_ok()
        }
        Err(BroadcastStreamRecvError::Lagged(n)) => {
            st.stats.skipped.fetch_add(n, Relaxed);
            st.stats.lagged_events.fetch_add(1, Relaxed);
            true
        }
    }
}

/// A client request, as far as protocol v1 needs it here.
#[derive(Deserialize)]
struct Req<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    room: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Handles one message from the client; returns false once the connection is done.
async fn request(
    st: &State,
    user: &str,
    ws: &mut Ws,
    subs: &mut StreamMap<String, BroadcastStream<Utf8Bytes>>,
    m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> bool {
    let text = match m {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
        // Pings are answered by tungstenite; binary frames are not part of v1.
        Some(Ok(Message::Binary(_))) => return reply(ws, error(None)).await,
        Some(Ok(_)) => return true,
    };
    let Ok(req) = serde_json::from_str::<Req>(&text) else {
        return reply(ws, error(None)).await;
    };
    let id = req.id.map(RawValue::get);
    let answer = match (req.kind, req.room) {
        ("join", Some(room)) => {
            let rx = {
                let mut rooms = st.rooms.lock().expect("rooms lock");
                match rooms.get(room) {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (tx, rx) = broadcast::channel(st.capacity);
                        rooms.insert(room.to_owned(), tx);
                        rx
                    }
                }
            };
            subs.insert(room.to_owned(), BroadcastStream::new(rx));
            id.map(|id| format!(r#"{{"type":"ack","id":{id}}}"#))
        }
        ("leave", Some(room)) => {
            subs.remove(room);
            id.map(|id| format!(r#"{{"type":"ack","id":{id}}}"#))
        }
        ("publish", Some(room)) if req.data.is_some() => {
            let data = req.data.map_or("null", RawValue::get);
            let frame = Utf8Bytes::from(format!(
                r#"{{"type":"message","from":"{user}","room":"{room}","data":{data}}}"#
            ));
            let tx = st.rooms.lock().expect("rooms lock").get(room).cloned();
            let delivered = tx.map_or(0, |tx| tx.send(frame).unwrap_or(0));
            st.stats.published.fetch_add(1, Relaxed);
            id.map(|id| format!(r#"{{"type":"ack","id":{id},"delivered":{delivered}}}"#))
        }
        _ => Some(error(id)),
    };
    match answer {
        Some(a) => reply(ws, a).await,
        None => true,
    }
}

fn error(id: Option<&str>) -> String {
    match id {
        Some(id) => format!(
            r#"{{"type":"error","code":"bad_request","message":"not supported by this peer","id":{id}}}"#
        ),
        None => r#"{"type":"error","code":"bad_request","message":"not supported by this peer"}"#
            .to_owned(),
    }
}

async fn reply(ws: &mut Ws, text: String) -> bool {
    ws.feed(Message::text(text)).await.is_ok()
}

/// Answers `GET /stats` with the counters as JSON and closes.
async fn stats(st: &State, mut s: TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    }
    let c = &st.stats;
    let body = format!(
        r#"{{"published":{},"fed":{},"skipped":{},"lagged_events":{},"connections":{},"capacity":{}}}"#,
        c.published.load(Relaxed),
        c.fed.load(Relaxed),
        c.skipped.load(Relaxed),
        c.lagged_events.load(Relaxed),
        c.connections.load(Relaxed),
        st.capacity
    );
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}
