//! One TCP connection's life: HTTP request(s), the WebSocket upgrade, then exactly one task,
//! [`run_connection`], which is the connection's reader and its only writer.
//!
//! * **Writing**: that task owns the socket's write side. It is the only code that writes
//!   after the upgrade answer and the only code that shuts the socket down, exactly once, as
//!   its last act. Everyone else (the router, shutdown, the idle check, and the task's own
//!   reading half) puts frames or a close request in the connection's bounded queue
//!   ([`ConnShared`]) and wakes it.
//! * **Reading**: the same task waits for readiness without a buffer (an io_uring poll or
//!   epoll), reads into the core's scratch buffer, and keeps only an unfinished frame. Pongs
//!   and close replies it owes go through the queue like everything else.
//! * One task rather than a reader and a writer: an idle connection then holds one task's
//!   state, not two (about 500 bytes less each; see BENCHMARKS.md).
//! * Liveness: the core's sweeper (see [`ConnShared::sweep`]) queues a ping every
//!   `ping_interval` and closes with 4000 a connection with nothing received for
//!   `idle_timeout`. There is no read timeout on a WebSocket, and no timer per connection.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::net::TcpStream;

use crate::auth;
use crate::codec::{self, DecodeError, Decoder, Msg};
use crate::core::Core;
use crate::http::{self, HttpError, Request};
use crate::key::ConnKey;
use crate::outbox::{CloseKind, CloseReq, ConnShared, Millis, DIRTY, EXPIRED, PAUSED, PEER_CLOSED};
use crate::protocol::{self, ErrorCode, ProtoError, Request as ProtoRequest};
use crate::route::{Joined, Reply};
use crate::stats;

/// How long a server-initiated close waits without progress (the peer neither reading what is
/// left nor answering the close frame) before the socket is shut anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The most a close may take while the peer keeps draining slowly.
const CLOSE_MAX: Duration = Duration::from_secs(30);
/// Reads a connection may make in a row, each finding more bytes already waiting, before it
/// lets the rest of its core run (see [`run_connection`]).
const READ_BURST: u32 = 16;

// ---- socket helpers ------------------------------------------------------------------------

/// One non-blocking `recv` into `buf`.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable region of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Shuts both directions of the socket; wakes any pending poll on it.
fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on an fd we own; errors (already shut) are irrelevant.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// A connection's TLS session before the upgrade (`None`: plain TCP). Boxed: rustls' state
/// is large, and a plain connection carries only the pointer's niche.
type TlsConn = Option<Box<rustls::ServerConnection>>;

/// Writes all of `data` before the upgrade (plain HTTP answers), with readiness waits; with
/// TLS, encrypted.
async fn write_all(stream: &TcpStream, data: &[u8], tls: &mut TlsConn) -> io::Result<()> {
    match tls {
        None => write_plain(stream, data).await,
        Some(t) => {
            let mut data = data;
            while !data.is_empty() {
                let n = io::Write::write(&mut t.writer(), data)?;
                data = &data[n..];
                flush_tls(stream, t).await?;
            }
            flush_tls(stream, t).await
        }
    }
}

/// Sends every TLS record rustls has ready, with readiness waits.
async fn flush_tls(stream: &TcpStream, t: &mut rustls::ServerConnection) -> io::Result<()> {
    loop {
        match crate::tls::flush(t, stream.as_raw_fd()) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
}

async fn write_plain(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !data.is_empty() {
        // SAFETY: data is a valid readable region.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => stream.writable(false).await?,
            io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

/// [`write_all`] within `--handshake-timeout`: a client that never reads cannot hold the
/// connection (and its descriptor) by leaving an answer unsent.
async fn write_timed(
    core: &Core,
    stream: &TcpStream,
    data: &[u8],
    tls: &mut TlsConn,
) -> io::Result<()> {
    let write = write_all(stream, data, tls);
    match monoio::time::timeout(core.config().handshake_timeout, write).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Reads until `buf` holds a whole request. `Ok(None)`: the peer closed. Answers
/// `Expect: 100-continue` once the head is in and the body is still to come.
async fn read_request(
    core: &Core,
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    max_body: usize,
    tls: &mut TlsConn,
) -> Result<Option<Request>, HttpError> {
    let fd = stream.as_raw_fd();
    let mut continued = false;
    loop {
        if !buf.is_empty() {
            if let Some((req, used)) = http::parse_request(buf, max_body)? {
                buf.drain(..used);
                return Ok(Some(req));
            }
            if !continued && http::wants_continue(buf) {
                continued = true;
                if write_all(stream, http::CONTINUE, tls).await.is_err() {
                    return Ok(None);
                }
            }
        }
        // Backpressure: an API call is a source of deliveries like a client's frame.
        while core.shared.pressure.is_on() {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(t) = tls.as_deref_mut() {
            // The handshake's records (and any alert) go out before waiting for the peer.
            if flush_tls(stream, t).await.is_err() {
                return Ok(None);
            }
        }
        if stream.readable(false).await.is_err() {
            return Ok(None);
        }
        if tls.is_some() {
            if !read_tls_request(core, fd, buf, tls)? {
                return Ok(None);
            }
            continue;
        }
        let mut scratch = core.scratch.borrow_mut();
        match recv(fd, &mut scratch) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Ok(None),
        }
    }
}

/// One TLS read before the upgrade: records from the socket, the handshake driven on, the
/// plaintext appended to `buf`. False when the connection is over (end of stream, a TLS
/// error, the peer's close_notify). A client speaking plain HTTP to the TLS port gets a
/// plain `400` telling it so: the session is dropped and the answer goes out unencrypted.
fn read_tls_request(
    core: &Core,
    fd: RawFd,
    buf: &mut Vec<u8>,
    tls: &mut TlsConn,
) -> Result<bool, HttpError> {
    let Some(t) = tls.as_deref_mut() else {
        return Ok(false);
    };
    match t.read_tls(&mut crate::tls::Fd(fd)) {
        Ok(0) => return Ok(false),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return Ok(true)
        }
        Err(_) => return Ok(false),
    }
    if let Err(e) = t.process_new_packets() {
        if let Some(tls_state) = &core.shared.tls {
            tls_state.count_handshake_failure();
        }
        let plain_http = t.is_handshaking()
            && matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            );
        tracing::debug!(error = %e, plain_http, "TLS handshake failed");
        if plain_http {
            *tls = None;
            return Err(HttpError::new(
                400,
                "this port speaks TLS: use https:// or wss://",
            ));
        }
        // The alert rustls queued, if the socket takes it at once.
        let _ = crate::tls::flush(t, fd);
        return Ok(false);
    }
    let mut scratch = core.scratch.borrow_mut();
    loop {
        match io::Read::read(&mut t.reader(), &mut scratch) {
            // The peer's close_notify.
            Ok(0) => return Ok(false),
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(_) => return Ok(false),
        }
    }
}

/// How long, and how much, a closing plain-HTTP connection keeps reading what the client
/// still sends after our last answer (nginx's lingering close): closing a socket with unread
/// bytes makes the kernel send a reset, which can destroy the answer (a 413 sent while the
/// client is still uploading) before the client reads it.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Ends a plain-HTTP connection: sends our FIN, then discards what the client still sends
/// for a bounded time and amount, or until it closes too. The socket closes when the stream
/// is dropped.
async fn linger_close(core: &Core, stream: &TcpStream, tls: &mut TlsConn) {
    let fd = stream.as_raw_fd();
    if let Some(t) = tls.as_deref_mut() {
        // The TLS end of the stream, if the socket takes it at once.
        t.send_close_notify();
        let _ = crate::tls::flush(t, fd);
    }
    // SAFETY: shutdown of the write side of a socket we own.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
    let drain = async {
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            if stream.readable(false).await.is_err() {
                return;
            }
            let mut scratch = core.scratch.borrow_mut();
            match recv(fd, &mut scratch) {
                Ok(0) => return,
                Ok(n) => discarded += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    };
    let _ = monoio::time::timeout(LINGER_TIME, drain).await;
}

/// Holds one of `--max-http-connections` for a connection that is not (yet) a WebSocket.
struct HttpSlot(Rc<Core>);

impl HttpSlot {
    fn take(core: &Rc<Core>) -> Option<HttpSlot> {
        let limit = core.config().http_connection_limit();
        let open = &core.shared.http_connections;
        if open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= limit {
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        core.http_open.set(core.http_open.get() + 1);
        stats::add_gauge(&core.stats().http_connections, 1);
        Some(HttpSlot(core.clone()))
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.0.http_closed();
    }
}

// ---- the connection task -------------------------------------------------------------------

/// Serves one accepted TCP connection until it closes.
pub(crate) async fn serve(core: Rc<Core>, stream: TcpStream) {
    let Some(slot) = HttpSlot::take(&core) else {
        // Over the limit of not-yet-upgraded connections: one non-blocking attempt at a 503,
        // then close. Nothing here waits on the client.
        stats::inc(&core.stats().http_connections_refused);
        core.stats().count_refusal(503);
        if core.shared.tls.is_some() {
            // A TLS client could not read a plain answer: the connection just ends.
            return;
        }
        let e = HttpError::new(503, "too many connections in progress: retry later");
        let answer = http::error_response(&e);
        // SAFETY: a non-blocking send of a valid buffer on our socket.
        unsafe {
            libc::send(
                stream.as_raw_fd(),
                answer.as_ptr() as *const libc::c_void,
                answer.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            );
        }
        return;
    };
    // With TLS, the session starts with the connection: its handshake is read and written by
    // the first request's read, within --handshake-timeout like the request itself. The
    // configuration is read here, once per handshake: a reload affects new connections only.
    let mut tls: TlsConn = match &core.shared.tls {
        None => None,
        Some(t) => match rustls::ServerConnection::new(t.config()) {
            Ok(session) => Some(Box::new(session)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a TLS session");
                return;
            }
        },
    };
    let stream = Rc::new(stream);
    let mut buf = Vec::new();
    let mut wait = core.config().handshake_timeout;
    let mut peer_gone = false;
    loop {
        let max_body = core.config().max_message_size;
        let read = read_request(&core, &stream, &mut buf, max_body, &mut tls);
        let read = monoio::time::timeout(wait, read);
        // Waiting for a next keep-alive request ends at shutdown; a first request is read on
        // (it may be an upgrade, which shutdown then refuses with 503).
        let read = if wait == core.config().handshake_timeout {
            Some(read.await)
        } else {
            core.unless_shutdown(read).await
        };
        let req = match read {
            None | Some(Err(_)) => break,
            Some(Ok(Ok(Some(req)))) => req,
            Some(Ok(Ok(None))) => {
                peer_gone = true;
                break;
            }
            Some(Ok(Err(e))) => {
                let _ = write_timed(&core, &stream, &http::error_response(&e), &mut tls).await;
                break;
            }
        };
        let is_echo = core.config().echo_path.as_deref() == Some(req.path.as_str());
        if req.path == "/ws" || is_echo {
            let leftover = std::mem::take(&mut buf);
            upgrade(core, stream, req, leftover, is_echo, slot, tls).await;
            return;
        }
        let keep_alive = req.keep_alive() && !core.shutting_down.get();
        let mut answer = crate::api::answer(&core, &req, keep_alive).await;
        if req.method == "HEAD" {
            // The head alone, with the Content-Length the body would have had.
            answer.truncate(http::head_len(&answer));
        }
        if write_timed(&core, &stream, &answer, &mut tls)
            .await
            .is_err()
        {
            peer_gone = true;
            break;
        }
        if !keep_alive {
            break;
        }
        wait = core.config().http_idle_timeout;
    }
    if !peer_gone {
        linger_close(&core, &stream, &mut tls).await;
    }
    shutdown(stream.as_raw_fd());
    drop(slot);
}

/// Refuses an upgrade with a plain HTTP answer.
async fn refuse(core: &Core, stream: &TcpStream, e: HttpError, mut tls: TlsConn) {
    stats::inc(&core.stats().handshake_failures);
    core.stats().count_refusal(e.status);
    tracing::debug!(status = e.status, reason = %e.message, "upgrade refused");
    if write_timed(core, stream, &http::error_response(&e), &mut tls)
        .await
        .is_ok()
    {
        linger_close(core, stream, &mut tls).await;
    }
    shutdown(stream.as_raw_fd());
}

async fn upgrade(
    core: Rc<Core>,
    stream: Rc<TcpStream>,
    req: Request,
    leftover: Vec<u8>,
    echo: bool,
    slot: HttpSlot,
    mut tls: TlsConn,
) {
    let accept = match http::check_upgrade(&req) {
        Ok(a) => a,
        Err(e) => return refuse(&core, &stream, e, tls).await,
    };
    if let Err(e) = check_origin(core.config(), &req) {
        return refuse(&core, &stream, e, tls).await;
    }
    let (user, expires): (Option<Rc<str>>, Option<Duration>) = if echo {
        (None, None)
    } else {
        match identity(core.config(), &req) {
            Ok(id) => {
                let expires = id.remaining();
                (Some(id.user.into()), expires)
            }
            Err(e) => return refuse(&core, &stream, e, tls).await,
        }
    };
    drop(req);
    fault_injection(user.as_deref());
    if core.shutting_down.get() {
        let e = HttpError::new(503, "server shutting down");
        return refuse(&core, &stream, e, tls).await;
    }
    let max = core.config().max_connections;
    let total = &core.shared.total_connections;
    if total.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= max && max > 0 {
        total.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let e = HttpError::new(503, format!("connection limit reached ({max})"));
        return refuse(&core, &stream, e, tls).await;
    }
    let conn = Rc::new(ConnShared::new());
    if let Some(left) = expires {
        conn.expires_at.set(Millis::now().after(left));
    }
    let inserted = core.insert_conn(user.clone(), conn.clone());
    let key = match inserted {
        Ok(k) => k,
        Err(_) => {
            total.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let e = HttpError::new(503, "connection table full");
            return refuse(&core, &stream, e, tls).await;
        }
    };
    stats::add_gauge(&core.stats().connections, 1);
    stats::inc(&core.stats().connections_total);

    // Routable at welcome: the welcome goes out only once the directory has the connection.
    if let Some(user) = &user {
        if !fault_skip_register(user) {
            core.register(key);
        }
        let registered = monoio::time::timeout(core.config().handshake_timeout, conn.registered());
        match registered.await {
            Ok(true) => {}
            Ok(false) => {
                core.remove_conn(key);
                let limit = core.config().max_connections_per_user;
                let e = HttpError::new(429, format!("user already has {limit} connections"));
                return refuse(&core, &stream, e, tls).await;
            }
            Err(_) => {
                tracing::warn!(%key, "registration not confirmed in time");
                core.remove_conn(key);
                let e = HttpError::new(503, "the gateway is overloaded: retry later");
                return refuse(&core, &stream, e, tls).await;
            }
        }
    }
    // The 101 and the welcome go out first, straight to the socket: deliveries that reach the
    // connection from now on (it is in the directory already) wait in its queue behind them.
    let mut handshake = http::switching_protocols(&accept);
    if let Some(user) = &user {
        handshake.extend_from_slice(&protocol::welcome(user, &key.to_string()));
    }
    if write_timed(&core, &stream, &handshake, &mut tls)
        .await
        .is_err()
    {
        // Counted with the closes, so closes add up to connections that ended.
        core.stats().count_close(None);
        core.queued_sub(conn.finish());
        core.remove_conn(key);
        shutdown(stream.as_raw_fd());
        return;
    }
    // A WebSocket now: counted by --max-connections, no longer as plain HTTP.
    drop(slot);
    stats::add(&core.stats().bytes_out, handshake.len() as u64);
    drop(handshake);
    conn.start_liveness(core.config().ping_interval);
    let mut session = Session {
        key,
        user,
        echo,
        decoder: Decoder::new(core.config().max_message_size),
        state: ReadState::Open,
        limiter: (core.config().rate_limit > 0.0).then(|| {
            Box::new(RateLimiter {
                tokens: 0.0,
                last: Instant::now() - Duration::from_secs(3600),
                refused_in_a_row: 0,
            })
        }),
    };
    // Frames the client sent right behind its upgrade request.
    let mut leftover = leftover;
    if !leftover.is_empty() {
        conn.touch();
        session.feed(&core, &conn, &mut leftover);
    }
    drop(leftover);
    // The connection lives on in one small task; this one, with the HTTP request and the
    // upgrade's state, ends here so an idle connection does not keep them.
    // Plain or TLS, each a copy of the task made for it: the plain one is what it was
    // before TLS existed (its transport is a zero-sized type).
    let ring = core.ring.borrow().clone();
    match tls {
        None => match ring {
            Some(ring) => monoio::spawn(run_connection(core, stream, conn, session, Ringed(ring))),
            None => monoio::spawn(run_connection(core, stream, conn, session, Plain)),
        },
        Some(t) => monoio::spawn(run_connection(core, stream, conn, session, t)),
    };
}

/// Test builds only: a worker panics when the user named by `WSGATE_FAULT_PANIC_USER`
/// connects, so the tests can check that a dead worker takes the process down with it.
#[cfg(debug_assertions)]
fn fault_injection(user: Option<&str>) {
    if let (Some(user), Ok(target)) = (user, std::env::var("WSGATE_FAULT_PANIC_USER")) {
        assert!(
            user != target,
            "injected fault: WSGATE_FAULT_PANIC_USER={target}"
        );
    }
}

#[cfg(not(debug_assertions))]
fn fault_injection(_user: Option<&str>) {}

/// Test builds only: the registration of the user named by `WSGATE_FAULT_SKIP_REGISTER` is
/// never sent, as if its owner core were stuck, so the tests can check the answer to a
/// registration that times out.
#[cfg(debug_assertions)]
fn fault_skip_register(user: &str) -> bool {
    std::env::var("WSGATE_FAULT_SKIP_REGISTER").is_ok_and(|u| u == user)
}

#[cfg(not(debug_assertions))]
fn fault_skip_register(_user: &str) -> bool {
    false
}

/// With `--allowed-origins`, an upgrade carrying an `Origin` must name one of them.
fn check_origin(config: &crate::Config, req: &Request) -> Result<(), HttpError> {
    if config.allowed_origins.is_empty() {
        return Ok(());
    }
    match req.header("origin") {
        Some(o) if !config.allowed_origins.iter().any(|a| same_origin(a, o)) => {
            Err(HttpError::new(403, "origin not allowed"))
        }
        _ => Ok(()),
    }
}

/// Whether two serialized origins name the same origin (RFC 6454 §5): scheme and host compare
/// case-insensitively (ASCII), the port exactly; surrounding spaces and a trailing `/` in a
/// configured value are forgiven.
pub(crate) fn same_origin(configured: &str, presented: &str) -> bool {
    let norm = |s: &str| s.trim().trim_end_matches('/').to_ascii_lowercase();
    norm(configured) == norm(presented)
}

/// The identity of an upgrade: a JWT (`Authorization: Bearer` or `?token=`) when a secret is
/// configured, else `?user=ID` (development mode).
fn identity(config: &crate::Config, req: &Request) -> Result<auth::Identity, HttpError> {
    if let Some(secret) = &config.jwt_secret {
        let token = req
            .bearer()
            .map(str::to_string)
            .or_else(|| req.query_param("token"))
            .ok_or_else(|| {
                HttpError::new(401, "missing token: send Authorization: Bearer or ?token=")
            })?;
        return auth::verify_jwt(&token, secret.as_bytes(), config.jwt_leeway)
            .map_err(|e| HttpError::new(401, e.to_string()));
    }
    let user = req
        .query_param("user")
        .ok_or_else(|| HttpError::new(401, "missing identity: connect with ?user=ID"))?;
    if !protocol::valid_user(&user) {
        return Err(HttpError::new(
            401,
            "invalid user id: 1-64 bytes of A-Z a-z 0-9 _ - . : @",
        ));
    }
    Ok(auth::Identity {
        user,
        expires_at: None,
    })
}

// ---- reader --------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Interpreting messages.
    Open,
    /// A protocol error closed the connection: only watch for the peer's close frame.
    Failed,
    /// The peer's close frame arrived: ignore everything until the end of the stream.
    Closed,
}

struct Session {
    key: ConnKey,
    user: Option<Rc<str>>,
    echo: bool,
    decoder: Decoder,
    state: ReadState,
    limiter: Option<Box<RateLimiter>>,
}

/// Token bucket for `--rate-limit`, allocated only when the limit is on.
struct RateLimiter {
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
}

/// Whether a message may pass the rate limit.
enum Rate {
    Pass,
    Refuse,
    /// Refused too many times in a row: close with 1008.
    Abuse,
}

impl RateLimiter {
    fn check(&mut self, config: &crate::Config) -> Rate {
        let rate = config.rate_limit;
        let burst = if config.rate_burst == 0 {
            rate.max(1.0)
        } else {
            config.rate_burst as f64
        };
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Rate::Pass;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= config.rate_limit_close_after {
            Rate::Abuse
        } else {
            Rate::Refuse
        }
    }
}

impl Session {
    /// One `recv` into the core's scratch buffer, fed to the decoder. False at the end of the
    /// stream (or on a socket error).
    fn read(&mut self, core: &Core, conn: &ConnShared, fd: RawFd) -> bool {
        let mut scratch = core.scratch.borrow_mut();
        match recv(fd, &mut scratch) {
            Ok(0) => false,
            Ok(n) => {
                conn.touch();
                stats::add(&core.stats().bytes_in, n as u64);
                self.feed(core, conn, &mut scratch[..n]);
                true
            }
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }

    /// [`Session::read`] through TLS: records from the socket (up to 64 KiB per wake-up, in
    /// rustls' reads of at most 4 KiB), decrypted, and the plaintext fed from the core's
    /// scratch buffer. False at the end of the stream, the peer's close_notify or a TLS error.
    fn read_tls(
        &mut self,
        core: &Core,
        conn: &ConnShared,
        tls: &mut rustls::ServerConnection,
        fd: RawFd,
    ) -> bool {
        const MAX_PER_WAKE: usize = 64 * 1024;
        let mut total = 0;
        let mut open = true;
        while total < MAX_PER_WAKE {
            match tls.read_tls(&mut crate::tls::Fd(fd)) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    open = false;
                    break;
                }
            }
            if let Err(e) = tls.process_new_packets() {
                tracing::debug!(key = %self.key, error = %e, "TLS error");
                // The alert rustls queued goes out with the next write, if any.
                open = false;
                break;
            }
            let mut scratch = core.scratch.borrow_mut();
            loop {
                match io::Read::read(&mut tls.reader(), &mut scratch) {
                    // The peer's close_notify: the end of its stream.
                    Ok(0) => {
                        open = false;
                        break;
                    }
                    Ok(n) => self.feed(core, conn, &mut scratch[..n]),
                    Err(_) => break,
                }
            }
            if !open {
                break;
            }
        }
        if total > 0 {
            conn.touch();
            stats::add(&core.stats().bytes_in, total as u64);
        }
        open
    }

    fn feed(&mut self, core: &Core, conn: &ConnShared, data: &mut [u8]) {
        match self.state {
            ReadState::Closed => {}
            ReadState::Failed => {
                // Anything but a close frame is ignored; a second error ends the watch.
                let r = self.decoder.feed(data, |m| {
                    if matches!(m, Msg::Close(..)) {
                        conn.set_peer_closed();
                        return false;
                    }
                    true
                });
                if r.is_err() || conn.has(PEER_CLOSED) {
                    self.state = ReadState::Closed;
                }
            }
            ReadState::Open => {
                let mut decoder = std::mem::take(&mut self.decoder);
                let result = decoder.feed(data, |m| self.on_msg(core, conn, m));
                self.decoder = decoder;
                if let Err(e) = result {
                    self.fail(core, conn, e);
                }
            }
        }
    }

    fn fail(&mut self, core: &Core, conn: &ConnShared, e: DecodeError) {
        tracing::debug!(key = %self.key, error = ?e, "closing on a protocol error");
        stats::inc(&core.stats().protocol_closes);
        // What was answered before the bad frame still goes out, then the close.
        conn.request_close(CloseReq {
            code: Some(e.close_code()),
            reason: e.reason(),
            kind: CloseKind::Fail,
        });
        self.state = ReadState::Failed;
        self.decoder = Decoder::new(core.config().max_message_size);
    }

    /// Handles one message; returns whether to keep decoding.
    fn on_msg(&mut self, core: &Core, conn: &ConnShared, msg: Msg<'_>) -> bool {
        if self.state == ReadState::Failed {
            // Closing (rate abuse): the rest of this read is only watched for a close frame.
            if matches!(msg, Msg::Close(..)) {
                conn.set_peer_closed();
                self.state = ReadState::Closed;
                return false;
            }
            return true;
        }
        match msg {
            Msg::Ping(payload) => core.push_to(conn, codec::pong(payload)),
            Msg::Pong => {}
            Msg::Close(code, _) => {
                conn.request_close(CloseReq {
                    code,
                    reason: "",
                    kind: CloseKind::Reply,
                });
                conn.set_peer_closed();
                self.state = ReadState::Closed;
                return false;
            }
            Msg::Text(text) => {
                stats::inc(&core.stats().messages_in);
                if !self.within_rate(core, conn, text) {
                    return true;
                }
                if self.echo {
                    core.push_to(conn, codec::text(text.as_bytes()));
                } else {
                    self.on_request(core, conn, text);
                }
            }
            Msg::Binary(bytes) => {
                stats::inc(&core.stats().messages_in);
                if self.echo {
                    core.push_to(conn, codec::frame(0x2, bytes));
                } else {
                    let e = ProtoError {
                        code: ErrorCode::BadRequest,
                        message: "binary frames are not part of protocol v1: send JSON text".into(),
                    };
                    core.push_to(conn, protocol::error(None, &e));
                }
            }
        }
        true
    }

    /// Applies `--rate-limit`; false when the message is refused (and answered).
    fn within_rate(&mut self, core: &Core, conn: &ConnShared, text: &str) -> bool {
        let Some(limiter) = self.limiter.as_mut() else {
            return true;
        };
        match limiter.check(core.config()) {
            Rate::Pass => true,
            Rate::Refuse => {
                stats::inc(&core.stats().rate_limited);
                let id = protocol::parse(text).id.map(|i| i.to_owned());
                let e = ProtoError {
                    code: ErrorCode::RateLimited,
                    message: "over the message rate limit; slow down".into(),
                };
                core.push_to(conn, protocol::error(id.as_deref(), &e));
                false
            }
            Rate::Abuse => {
                stats::inc(&core.stats().rate_limited);
                stats::inc(&core.stats().rate_limit_closes);
                conn.request_close(CloseReq::initiate(1008, "rate limit exceeded", true));
                // Read on for the client's close reply, which ends the close at once.
                self.state = ReadState::Failed;
                false
            }
        }
    }

    fn on_request(&mut self, core: &Core, conn: &ConnShared, text: &str) {
        let parsed = protocol::parse(text);
        let from = self.user.as_deref();
        let ack = |id: Option<&serde_json::value::RawValue>| {
            id.map(|id| Reply::Ack {
                conn: self.key,
                id: id.to_owned(),
            })
        };
        match parsed.request {
            Ok(ProtoRequest::Send { to, data }) => {
                let frame = protocol::message(from, None, data);
                core.send_to_user(&to, frame, ack(parsed.id));
            }
            Ok(ProtoRequest::Publish { room, data }) => {
                let frame = protocol::message(from, Some(&room), data);
                core.publish(&room, frame, parsed.id.map(|id| (self.key, id.to_owned())));
            }
            Ok(ProtoRequest::Join { room }) => match core.join(self.key, &room, parsed.id) {
                // Acked by the core, once publishes from every core reach the member.
                Joined::Ok => {}
                Joined::TooMany => {
                    stats::inc(&core.stats().too_many_rooms);
                    let e = ProtoError {
                        code: ErrorCode::TooManyRooms,
                        message: format!(
                            "a connection may join at most {} rooms",
                            core.config().max_rooms_per_conn
                        )
                        .into(),
                    };
                    core.push_to(conn, protocol::error(parsed.id, &e));
                }
            },
            Ok(ProtoRequest::Leave { room }) => {
                core.leave(self.key, &room);
                if let Some(id) = parsed.id {
                    core.push_to(conn, protocol::ack(id, None));
                }
            }
            Err(e) => core.push_to(conn, protocol::error(parsed.id, &e)),
        }
    }
}

// ---- the connection's task ----------------------------------------------------------------

/// How an upgraded connection's bytes meet its socket. [`run_connection`] is generic over it,
/// so the plain connection's task is compiled for [`Plain`], a zero-sized type whose methods
/// are the plain reads and writes: no branch, no field, no allocation added for TLS.
trait Transport: 'static {
    /// Whether the connection's bytes go through the core's io_uring data path (src/ring.rs)
    /// now, rather than readiness waits, `recv` and `sendmsg`.
    #[inline(always)]
    fn on_ring(&self, _conn: &ConnShared) -> bool {
        false
    }
    /// On the ring: whether a read has something to do (buffers received, the end of the
    /// stream, or a recv to arm).
    fn ready(&self, _conn: &ConnShared) -> bool {
        false
    }
    /// One read (at least one `recv`, or the buffers the ring received), fed to the session.
    /// False at the end of the stream.
    fn read(
        &mut self,
        session: &mut Session,
        core: &Core,
        conn: &Rc<ConnShared>,
        fd: RawFd,
    ) -> bool;
    /// One write of the queue's front; the plaintext bytes taken from the queue.
    fn write(&mut self, conn: &ConnShared, fd: RawFd, head: &mut usize) -> io::Result<usize>;
    /// On the ring: starts a send of the queue's front.
    fn send(&mut self, _conn: &Rc<ConnShared>, _fd: RawFd, _head: usize) {}
    /// On the ring: cancels the send in flight; true when nothing is in flight any more.
    fn cancel_send(&mut self, _conn: &ConnShared) -> bool {
        true
    }
    /// Bytes held outside the queue that still have to be sent (TLS records).
    fn pending(&self) -> bool;
    /// The end of the connection, just before the socket is shut.
    fn end(&mut self, conn: &ConnShared, fd: RawFd);
}

/// A plain TCP connection.
struct Plain;

impl Transport for Plain {
    #[inline(always)]
    fn read(
        &mut self,
        session: &mut Session,
        core: &Core,
        conn: &Rc<ConnShared>,
        fd: RawFd,
    ) -> bool {
        session.read(core, conn, fd)
    }

    #[inline(always)]
    fn write(&mut self, conn: &ConnShared, fd: RawFd, head: &mut usize) -> io::Result<usize> {
        conn.write_to(fd, head)
    }

    #[inline(always)]
    fn pending(&self) -> bool {
        false
    }

    #[inline(always)]
    fn end(&mut self, _conn: &ConnShared, _fd: RawFd) {}
}

/// A TLS connection: its rustls session, driven over the same readiness waits.
impl Transport for Box<rustls::ServerConnection> {
    fn read(
        &mut self,
        session: &mut Session,
        core: &Core,
        conn: &Rc<ConnShared>,
        fd: RawFd,
    ) -> bool {
        session.read_tls(core, conn, self, fd)
    }

    fn write(&mut self, conn: &ConnShared, fd: RawFd, head: &mut usize) -> io::Result<usize> {
        conn.write_tls(self, fd, head)
    }

    fn pending(&self) -> bool {
        self.wants_write()
    }

    fn end(&mut self, _conn: &ConnShared, fd: RawFd) {
        // close_notify, if the socket takes it at once (the WebSocket close came first).
        self.send_close_notify();
        let _ = crate::tls::flush(self, fd);
    }
}

/// A plain connection on the core's io_uring data path: its bytes arrive in the ring's
/// buffers (a multishot recv), are decoded from there and the buffers given back; its queue
/// leaves in sends on the ring, one in flight at a time.
struct Ringed(Rc<crate::ring::Ring>);

/// A receive this large (a buffer's worth at once: a large message or a burst) sends the
/// connection off the ring (see [`Ringed`]). Counted over the parts of one receive (see
/// `Ring::drain`): with buffers filled in parts a 5 KiB message may arrive as two parts of
/// 2.5 KiB, the first ending one buffer and the second starting the next.
const LEAVE_RING_AT: usize = crate::ring::BUF_SIZE;

impl Transport for Ringed {
    /// A connection that receives large messages (a read of [`LEAVE_RING_AT`] or more) leaves
    /// the ring for good: the ring's buffers rotate through memory that is cold by the time
    /// it is reused, while the readiness path reads into the core's one hot scratch buffer
    /// (measured in BENCHMARKS.md: 1.25x the CPU per 16 KiB message on the ring). It stops
    /// arming its recv, cancels the armed one, decodes what the ring already holds and lets
    /// its send in flight complete; then, and only then, it reads and writes like [`Plain`],
    /// so its bytes stay in order.
    #[inline(always)]
    fn on_ring(&self, conn: &ConnShared) -> bool {
        use crate::ring::{ARMED, LEAVING, OFF, SENT};
        if conn.ring_has(OFF) {
            return false;
        }
        if conn.ring_has(LEAVING)
            && !conn.ring_has(ARMED | SENT)
            && conn.sending.get() == 0
            && conn.rx.borrow().is_empty()
        {
            conn.ring_set(OFF);
            return false;
        }
        true
    }

    #[inline(always)]
    fn ready(&self, conn: &ConnShared) -> bool {
        use crate::ring::{ARMED, EOF, LEAVING, STARVED};
        !conn.rx.borrow().is_empty()
            || conn.ring_has(EOF)
            || !conn.ring_has(ARMED | STARVED | LEAVING)
    }

    fn read(
        &mut self,
        session: &mut Session,
        core: &Core,
        conn: &Rc<ConnShared>,
        fd: RawFd,
    ) -> bool {
        use crate::ring::{ARMED, CANCELLING, EOF, LEAVING, OFF, STARVED};
        if conn.ring_has(OFF) {
            return session.read(core, conn, fd);
        }
        let crate::ring::Drained { open, bytes, run } =
            self.0.drain(conn, |data| session.feed(core, conn, data));
        if bytes > 0 {
            conn.touch();
            stats::add(&core.stats().bytes_in, bytes as u64);
        }
        if run >= LEAVE_RING_AT && !conn.ring_has(LEAVING) {
            conn.ring_set(LEAVING);
            stats::inc(&core.stats().ring_left);
        }
        if conn.ring_has(LEAVING) {
            if conn.ring_has(ARMED) && !conn.ring_has(CANCELLING) {
                self.0.cancel(conn);
            }
        } else if open && !conn.ring_has(ARMED | STARVED | EOF) && conn.rx.borrow().is_empty() {
            // Re-armed once what it holds is decoded (a read decodes at most 64 KiB).
            self.0.arm(conn, fd);
        }
        open
    }

    #[inline(always)]
    fn write(&mut self, conn: &ConnShared, fd: RawFd, head: &mut usize) -> io::Result<usize> {
        conn.write_to(fd, head)
    }

    #[inline(always)]
    fn send(&mut self, conn: &Rc<ConnShared>, fd: RawFd, head: usize) {
        self.0.send(conn, fd, head);
    }

    fn cancel_send(&mut self, conn: &ConnShared) -> bool {
        self.0.cancel_send(conn)
    }

    #[inline(always)]
    fn pending(&self) -> bool {
        false
    }

    fn end(&mut self, conn: &ConnShared, _fd: RawFd) {
        // Entries naming this socket leave before it closes: the kernel resolves a
        // descriptor when an entry is submitted, and a closed number may be reused at once.
        self.0.flush();
        // The connection is marked done: the buffers it held go back now, later completions
        // give theirs straight back, and the shutdown that follows ends the recv.
        self.0.discard(conn);
    }
}

/// What woke the connection's task.
enum Event {
    /// The queue, a close request, a deadline or the peer's state changed.
    Work,
    /// The socket has bytes to read (or failed).
    Readable(io::Result<()>),
    /// The socket can take more bytes (or failed).
    Writable(io::Result<()>),
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// A close in progress: its frame is queued.
#[derive(Clone, Copy)]
struct Closing {
    req: CloseReq,
    /// The close frame has left.
    sent: bool,
    started: Instant,
    /// The latest the close may end, however slowly the peer keeps draining.
    cap: Instant,
}

/// Accounts `n` bytes written to the socket. A peer still taking bytes is slow, not dead: a
/// close frame queued behind them gets more time, up to the cap, and never less than it had
/// (shutdown's budget is longer than CLOSE_WAIT).
fn written(core: &Core, conn: &ConnShared, closing: Option<&Closing>, n: usize) {
    stats::add(&core.stats().bytes_out, n as u64);
    core.queued_sub(n);
    if let Some(c) = closing {
        if c.started.elapsed() > CLOSE_WAIT / 4 {
            let later = Millis::from((Instant::now() + CLOSE_WAIT).min(c.cap));
            if later > conn.close_deadline.get() {
                conn.close_deadline.set(later);
            }
        }
    }
}

/// The connection after the upgrade answer: reads and interprets the peer's frames, and, as
/// its only writer, sends queued frames (pings included) and the close frame, and shuts the
/// socket exactly once when it returns. It holds no timer: deadlines come from the core's
/// sweeper.
///
/// A function returning an `async move` block rather than an `async fn`: an async fn keeps a
/// second copy of its arguments in its state (rust-lang/rust#62958), 130 bytes per idle
/// connection here.
#[allow(clippy::manual_async_fn)]
fn run_connection<T: Transport>(
    core: Rc<Core>,
    stream: Rc<TcpStream>,
    conn: Rc<ConnShared>,
    mut session: Session,
    mut io: T,
) -> impl Future<Output = ()> {
    async move {
        let fd = stream.as_raw_fd();
        let mut head = 0usize;
        // Boxed: only a closing connection carries it.
        let mut closing: Option<Box<Closing>> = None;
        let mut reading = true;
        // Rarely needed (a full socket buffer), so boxed: an idle connection does not carry it.
        let mut writable: Option<WritableFuture> = None;
        // Always armed while reading; kept across wake-ups so a delivery does not cancel it.
        let mut readable = std::pin::pin!(stream.readable(false));
        // Reads in a row that found the next bytes already waiting. On io_uring every read is
        // followed by a wait for the next completion, so this stays at 1. On the epoll driver
        // a peer that keeps bytes waiting makes `readable` ready at once, and monoio has no
        // cooperative budget: the flooder's task would hold its core. After READ_BURST such
        // reads it pauses. Not by waking itself: monoio puts a task that wakes itself back at
        // the *front* of its queue, so the pause is a timer, which wakes it from the back.
        let mut burst = 0u32;

        'run: loop {
            conn.flags.set(conn.flags.get() & !DIRTY);
            if conn.has(EXPIRED) {
                break 'run;
            }

            // On the io_uring data path: what the send that completed wrote leaves the queue.
            if conn.ring_has(crate::ring::SENT) {
                conn.ring_clear(crate::ring::SENT);
                match usize::try_from(conn.sent.get()) {
                    Ok(n) => {
                        conn.sent_bytes(&mut head, n);
                        written(&core, &conn, closing.as_deref(), n);
                    }
                    Err(_) if conn.sent.get() == -libc::ECANCELED => {}
                    Err(_) => break 'run,
                }
            }

            // A close request becomes a close frame at the end of the queue. One that discards
            // the queue first cancels the send in flight (io_uring data path) and waits for it:
            // what the send carries is discarded with the rest, unless it got out meanwhile.
            let mut wait_for_send = conn.sending.get() > 0
                && conn
                    .close
                    .get()
                    .is_some_and(|r| r.kind == CloseKind::Initiate { flush: false });
            if wait_for_send && closing.is_none() {
                wait_for_send = !io.cancel_send(&conn);
            }
            if closing.is_none() && !wait_for_send {
                if let Some(req) = conn.close.get() {
                    match req.kind {
                        CloseKind::Abort => break 'run,
                        CloseKind::Initiate { flush: false } => {
                            core.queued_sub(conn.discard_unstarted(head));
                        }
                        _ => {}
                    }
                    let frame = match req.code {
                        Some(code) => codec::close(code, req.reason),
                        None => Bytes::from_static(&[0x88, 0x00]),
                    };
                    core.queued_add(conn.push_unbounded(frame));
                    // Shutdown may flush a full queue to every client at once: it gets the
                    // shutdown budget. Every other close is bounded by CLOSE_WAIT.
                    let wait = if req.code == Some(1001) {
                        core.config().shutdown_timeout
                    } else {
                        CLOSE_WAIT
                    };
                    let now = Instant::now();
                    closing = Some(Box::new(Closing {
                        req,
                        sent: false,
                        started: now,
                        cap: now + wait.max(CLOSE_MAX),
                    }));
                    conn.close_deadline.set(Millis::now().after(wait));
                }
            }

            // Write while the socket takes it (on the io_uring data path: collect the send
            // that completed, and start the next with everything queued meanwhile).
            if io.on_ring(&conn) {
                if conn.sending.get() == 0 && !conn.queue.borrow().is_empty() {
                    io.send(&conn, fd, head);
                }
            } else if writable.is_none() {
                while !conn.queue.borrow().is_empty() || io.pending() {
                    match io.write(&conn, fd, &mut head) {
                        Ok(n) => written(&core, &conn, closing.as_deref(), n),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let s = stream.clone();
                            writable = Some(Box::pin(async move { s.writable(false).await }));
                            break;
                        }
                        Err(_) => break 'run,
                    }
                }
            }

            if let Some(c) = closing.as_mut() {
                if !c.sent && conn.queue.borrow().is_empty() && !io.pending() {
                    c.sent = true;
                    if matches!(c.req.kind, CloseKind::Reply | CloseKind::Fail) {
                        break 'run;
                    }
                }
                if c.sent && conn.has(PEER_CLOSED) {
                    break 'run;
                }
            }

            // Reading first: what a read queues then leaves in one `sendmsg` with what was
            // already waiting (each pass of the loop writes whatever the event was).
            if burst >= READ_BURST {
                burst = 0;
                // Boxed: a monoio timer is about 640 bytes, and held inline it would sit in
                // every connection's task, idle ones included.
                Box::pin(monoio::time::sleep(Duration::from_millis(1))).await;
            }
            let event = poll_fn(|cx| {
                // Under backpressure the socket is left unread (its bytes wait in the kernel,
                // and TCP flow control slows the client); queued frames still go out.
                let may_read = reading
                    && (core.may_read() || {
                        conn.set(PAUSED);
                        false
                    });
                if may_read && io.on_ring(&conn) {
                    if io.ready(&conn) {
                        burst += 1;
                        return Poll::Ready(Event::Readable(Ok(())));
                    }
                    burst = 0;
                } else if may_read {
                    match readable.as_mut().poll(cx) {
                        Poll::Ready(r) => {
                            burst += 1;
                            return Poll::Ready(Event::Readable(r));
                        }
                        // The socket had nothing waiting: the run of ready reads ends.
                        Poll::Pending => burst = 0,
                    }
                }
                if let Some(w) = writable.as_mut() {
                    if let Poll::Ready(r) = w.as_mut().poll(cx) {
                        writable = None;
                        return Poll::Ready(Event::Writable(r));
                    }
                }
                if conn.has(DIRTY) {
                    return Poll::Ready(Event::Work);
                }
                conn.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;

            match event {
                Event::Work | Event::Writable(Ok(())) => {}
                Event::Writable(Err(_)) => break 'run,
                Event::Readable(r) => {
                    if !io.on_ring(&conn) {
                        readable.set(stream.readable(false));
                    }
                    if r.is_err() || !io.read(&mut session, &core, &conn, fd) {
                        // The peer is gone (or sent its close frame and then the end of the
                        // stream): nothing more to write.
                        reading = false;
                        conn.set_peer_closed();
                        conn.request_close(CloseReq {
                            code: None,
                            reason: "",
                            kind: CloseKind::Abort,
                        });
                    }
                }
            }
        }
        let code = closing.map(|c| c.req.code.unwrap_or(1005));
        core.stats().count_close(code);
        core.queued_sub(conn.finish());
        io.end(&conn, fd);
        shutdown(fd);
        core.remove_conn(session.key);
    }
}
