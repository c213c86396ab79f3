//! A small blocking client for the gateway (tests, tools, smoke checks), on tungstenite.
//!
//! ```no_run
//! use std::time::Duration;
//! let addr = "127.0.0.1:8080".parse().unwrap();
//! let mut a = wsgate::client::Client::connect(addr, "alice").unwrap();
//! let mut b = wsgate::client::Client::connect(addr, "bob").unwrap();
//! a.send_to("bob", serde_json::json!({"hi": 1}), Some(1.into())).unwrap();
//! let msg = b.recv(Duration::from_secs(1)).unwrap();
//! assert_eq!(msg["from"], "alice");
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, the handshake or a frame failed.
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    /// Nothing arrived in time.
    #[error("timed out")]
    Timeout,
    /// The server closed the connection (with its close frame, if any).
    #[error("closed by the server: {0:?}")]
    Closed(Option<CloseFrame>),
    /// The server sent something that is not JSON text.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

/// A connection to the gateway as one user.
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// The user id this connection authenticated as.
    pub user: String,
    /// The opaque connection id from `welcome`.
    pub conn: String,
    /// Messages read while waiting for an ack, returned by the next `recv`.
    stash: VecDeque<Value>,
}

/// How long the upgrade answer may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a WebSocket to `path_and_query` (e.g. `/ws?user=a`) without reading anything.
pub fn connect_raw(
    addr: SocketAddr,
    path_and_query: &str,
) -> Result<WebSocket<TcpStream>, ClientError> {
    let stream = TcpStream::connect(addr).map_err(tungstenite::Error::Io)?;
    stream.set_nodelay(true).map_err(tungstenite::Error::Io)?;
    // A server that accepts but never answers fails the handshake instead of hanging it.
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(tungstenite::Error::Io)?;
    let url = format!("ws://{addr}{path_and_query}");
    let (ws, _resp) = tungstenite::client::client(url.as_str(), stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "no upgrade answer within the handshake timeout",
        )),
    })?;
    // Reads block again until a caller sets its own timeout.
    ws.get_ref()
        .set_read_timeout(None)
        .map_err(tungstenite::Error::Io)?;
    Ok(ws)
}

impl Client {
    /// Connects as `user` (development identity) and waits for the `welcome`.
    pub fn connect(addr: SocketAddr, user: &str) -> Result<Client, ClientError> {
        Self::connect_query(addr, &format!("user={user}"))
    }

    /// Connects with an arbitrary query string (e.g. `token=...`) and waits for `welcome`.
    pub fn connect_query(addr: SocketAddr, query: &str) -> Result<Client, ClientError> {
        let ws = connect_raw(addr, &format!("/ws?{query}"))?;
        let mut c = Client {
            ws,
            user: String::new(),
            conn: String::new(),
            stash: VecDeque::new(),
        };
        let welcome = c.recv(Duration::from_secs(10))?;
        if welcome["type"] != "welcome" {
            return Err(ClientError::Unexpected(welcome.to_string()));
        }
        c.user = welcome["user"].as_str().unwrap_or_default().to_string();
        c.conn = welcome["conn"].as_str().unwrap_or_default().to_string();
        Ok(c)
    }

    /// Sends raw text.
    pub fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.ws.send(Message::text(text))?;
        Ok(())
    }

    /// Sends a JSON request.
    pub fn send_json(&mut self, v: &Value) -> Result<(), ClientError> {
        self.send_text(&v.to_string())
    }

    /// Sends `data` to every connection of `to`; with an `id` the server acks.
    pub fn send_to(&mut self, to: &str, data: Value, id: Option<Value>) -> Result<(), ClientError> {
        let mut req = serde_json::json!({"type": "send", "to": to, "data": data});
        if let Some(id) = id {
            req["id"] = id;
        }
        self.send_json(&req)
    }

    /// Sends a binary frame (not part of protocol v1: the server answers with an error).
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.ws.send(Message::binary(data.to_vec()))?;
        Ok(())
    }

    /// Sends with `id` and waits for its `ack` (or `error`), keeping every other message
    /// for later `recv` calls. Returns the ack or error message.
    pub fn request(
        &mut self,
        mut req: Value,
        id: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        req["id"] = id.clone();
        self.send_json(&req)?;
        let mut later = Vec::new();
        let found = loop {
            match self.read_frame(timeout) {
                Ok(v) if (v["type"] == "ack" || v["type"] == "error") && v["id"] == id => {
                    break Ok(v)
                }
                Ok(v) => later.push(v),
                Err(e) => break Err(e),
            }
        };
        self.stash.extend(later);
        found
    }

    /// Sends `data` to `to` with `id` and returns the ack's `delivered`.
    pub fn send_acked(
        &mut self,
        to: &str,
        data: Value,
        id: Value,
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let req = serde_json::json!({"type": "send", "to": to, "data": data});
        let v = self.request(req, id, timeout)?;
        v["delivered"]
            .as_u64()
            .ok_or_else(|| ClientError::Unexpected(v.to_string()))
    }

    /// The next server message as JSON. Pings are answered on the way.
    pub fn recv(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        if let Some(v) = self.stash.pop_front() {
            return Ok(v);
        }
        self.read_frame(timeout)
    }

    fn read_frame(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        self.ws
            .get_mut()
            .set_read_timeout(Some(timeout))
            .map_err(tungstenite::Error::Io)?;
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(&t)
                        .map_err(|_| ClientError::Unexpected(t.to_string()))
                }
                Ok(Message::Close(frame)) => return Err(ClientError::Closed(frame)),
                Ok(Message::Binary(b)) => {
                    return Err(ClientError::Unexpected(format!("binary {b:?}")))
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(tungstenite::Error::ConnectionClosed) => return Err(ClientError::Closed(None)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next `message` (skipping acks and errors).
    pub fn recv_message(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        loop {
            let v = self.recv(timeout)?;
            if v["type"] == "message" {
                return Ok(v);
            }
        }
    }

    /// Waits for the server to close and returns its close frame.
    pub fn recv_close(&mut self, timeout: Duration) -> Result<Option<CloseFrame>, ClientError> {
        loop {
            match self.recv(timeout) {
                Err(ClientError::Closed(f)) => return Ok(f),
                Err(e) => return Err(e),
                Ok(_) => continue,
            }
        }
    }

    /// Closes with a close handshake.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(2)));
        while self.ws.read().is_ok() {}
    }

    /// Drops the connection without a close handshake (a reset, like a crashed device).
    pub fn abort(self) {
        let stream = self.ws.get_ref();
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }

    /// The underlying WebSocket, for tests that need raw access.
    pub fn ws(&mut self) -> &mut WebSocket<TcpStream> {
        &mut self.ws
    }
}
