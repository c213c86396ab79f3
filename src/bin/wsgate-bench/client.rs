//! The load generator's lean WebSocket client: monoio, readiness waits without a pinned buffer,
//! a per-thread read buffer, frames built once per message, a zero mask key (legal in RFC 6455
//! and free to apply), and `SO_LINGER 0` closes so runs leave no TIME_WAIT behind.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::net::TcpStream;
use socket2::{Domain, Socket, Type};

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

/// A connected, upgraded WebSocket.
pub struct WsConn {
    stream: Rc<TcpStream>,
    fd: RawFd,
    /// A write is under way (shared with the [`Sender`]s): see `send_all`.
    busy: Rc<Cell<bool>>,
    /// Bytes read but not yet parsed (an unfinished frame).
    pending: Vec<u8>,
    /// The code of the close frame the server sent, once one arrived (0: none in it).
    close_code: Option<u16>,
}

/// A server data frame's payload.
pub struct Frame<'a> {
    pub payload: &'a [u8],
}

fn errno_result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Opens a TCP connection from `src` (if given) and performs the upgrade for `path`.
pub async fn connect(target: SocketAddr, src: Option<Ipv4Addr>, path: &str) -> io::Result<WsConn> {
    connect_with(target, src, path, None).await
}

/// [`connect`] with a receive buffer of `rcvbuf` bytes (a small one makes a client that stops
/// reading fill the server's queue quickly).
pub async fn connect_with(
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    path: &str,
    rcvbuf: Option<usize>,
) -> io::Result<WsConn> {
    let mut conn = tcp(target, src, rcvbuf).await?;
    conn.upgrade(target, path).await?;
    Ok(conn)
}

/// A plain TCP connection, not upgraded (for raw bytes: garbage, broken requests).
pub async fn tcp(
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    rcvbuf: Option<usize>,
) -> io::Result<WsConn> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(ip) = src {
        // Lets many connections share a source address without reserving a port at bind.
        let one: libc::c_int = 1;
        // SAFETY: valid socket, option pointer and length.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of_val(&one) as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::new(ip.into(), 0).into())?;
    }
    sock.set_nodelay(true)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std: std::net::TcpStream = sock.into();
    let stream = TcpStream::from_std(std)?;
    stream.writable(false).await?;
    let fd = stream.as_raw_fd();
    if let Some(e) = with_sock(fd, |s| s.take_error())? {
        return Err(e);
    }
    Ok(WsConn {
        stream: Rc::new(stream),
        fd,
        busy: Rc::new(Cell::new(false)),
        pending: Vec::new(),
        close_code: None,
    })
}

impl WsConn {
    /// Sends the upgrade request for `path` and waits for the `101`.
    async fn upgrade(&mut self, target: SocketAddr, path: &str) -> io::Result<()> {
        let conn = self;
        let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
        conn.send(req.as_bytes()).await?;
        loop {
            conn.read_some().await?;
            if let Some(end) = find(&conn.pending, b"\r\n\r\n") {
                if !conn.pending.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&conn.pending[..end]).into_owned();
                    return Err(io::Error::other(format!("upgrade refused: {head}")));
                }
                conn.pending.drain(..end + 4);
                return Ok(());
            }
            if conn.pending.len() > 16 * 1024 {
                return Err(io::Error::other("oversized upgrade answer"));
            }
        }
    }
}

/// Runs `f` with socket2 access to a descriptor the monoio stream owns.
fn with_sock<R>(fd: RawFd, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    // SAFETY: callers pass the fd of a stream they hold for the duration of the call.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    f(socket2::SockRef::from(&b))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A final client frame with a zero mask key (legal, and free to apply).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    wsgate::codec::client_frame(0x80 | opcode, payload, [0; 4])
}

/// A handle that sends on a connection while another task reads it.
#[derive(Clone)]
pub struct Sender {
    stream: Rc<TcpStream>,
    fd: RawFd,
    busy: Rc<Cell<bool>>,
}

impl Sender {
    /// Sends all of `data`, waiting for writability when the socket is full.
    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        send_all(&self.stream, self.fd, &self.busy, data).await
    }
}

/// Clears the busy flag when a write ends, completed, failed or cancelled.
struct Writing<'a>(&'a Cell<bool>);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Writes all of `data`. One write at a time per connection: a write that blocks halfway (a
/// full socket) must not let another task's frame (a pong, another message) into the middle
/// of its frame.
async fn send_all(
    stream: &TcpStream,
    fd: RawFd,
    busy: &Cell<bool>,
    mut data: &[u8],
) -> io::Result<()> {
    while busy.get() {
        monoio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    busy.set(true);
    let _writing = Writing(busy);
    while !data.is_empty() {
        // SAFETY: data is a valid readable region.
        let r = errno_result(unsafe {
            libc::send(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        });
        match r {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl WsConn {
    /// A second handle for sending from another task.
    pub fn sender(&self) -> Sender {
        Sender {
            stream: self.stream.clone(),
            fd: self.fd,
            busy: self.busy.clone(),
        }
    }

    /// Sends all of `data`, waiting for writability when the socket is full.
    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        send_all(&self.stream, self.fd, &self.busy, data).await
    }

    /// Bytes received and not consumed by [`WsConn::read_frames`] (raw connections).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// The code of the server's close frame, once one arrived (0 when it carried none).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Waits for bytes and appends them to the pending buffer. Errors at the end of stream.
    pub async fn read_some(&mut self) -> io::Result<()> {
        loop {
            self.stream.readable(false).await?;
            let r = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                // SAFETY: s is a valid writable region.
                let r = errno_result(unsafe {
                    libc::recv(
                        self.fd,
                        s.as_mut_ptr() as *mut libc::c_void,
                        s.len(),
                        libc::MSG_DONTWAIT,
                    )
                });
                if let Ok(n) = r {
                    self.pending.extend_from_slice(&s[..n]);
                }
                r
            });
            match r {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls `on_frame` for every complete frame received, reading first when none is
    /// pending; answers pings. A close frame ends the connection with an error.
    pub async fn read_frames(&mut self, mut on_frame: impl FnMut(Frame<'_>)) -> io::Result<()> {
        // Frames may already be waiting (e.g. the welcome read together with the 101).
        if parse(&self.pending).is_none() {
            self.read_some().await?;
        }
        let mut pos = 0;
        let mut pongs = Vec::new();
        let mut closed = false;
        while let Some((opcode, start, len)) = parse(&self.pending[pos..]) {
            let payload = &self.pending[pos + start..pos + start + len];
            match opcode {
                0x9 => pongs.push(client_frame(0xA, payload)),
                0x8 => {
                    closed = true;
                    self.close_code = Some(match payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 0,
                    });
                }
                _ => on_frame(Frame { payload }),
            }
            pos += start + len;
        }
        self.pending.drain(..pos);
        if self.pending.capacity() > 64 * 1024 && self.pending.is_empty() {
            self.pending = Vec::new();
        }
        for p in pongs {
            self.send(&p).await?;
        }
        if closed {
            return Err(io::Error::other("closed by the server"));
        }
        Ok(())
    }

    /// Reads until one data frame arrives and returns a copy of its payload.
    pub async fn next_message(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let mut got = None;
            self.read_frames(|f| {
                if got.is_none() {
                    got = Some(f.payload.to_vec());
                }
            })
            .await?;
            if let Some(g) = got {
                return Ok(g);
            }
        }
    }

    /// Closes with a close handshake: sends a close frame with `code`, reads (discarding data)
    /// until the server's close frame and then its end of stream, for at most `wait`, then
    /// closes the socket. Returns the server's close code, if one came.
    pub async fn close(mut self, code: u16, wait: std::time::Duration) -> Option<u16> {
        if self
            .send(&client_frame(0x8, &code.to_be_bytes()))
            .await
            .is_err()
        {
            self.reset();
            return None;
        }
        let _ = monoio::time::timeout(wait, async {
            while self.read_frames(|_| {}).await.is_ok() {}
            // The server shuts the socket after its reply: wait for that, so this side closes
            // second and keeps no TIME_WAIT.
            while self.close_code.is_some() && self.read_some().await.is_ok() {}
        })
        .await;
        self.close_code
    }

    /// Closes the socket at once with `SO_LINGER 0`: the peer gets a reset, nothing else.
    pub fn reset(self) {
        let _ = with_sock(self.fd, |s| s.set_linger(Some(std::time::Duration::ZERO)));
    }

    /// Ends the connection with a reset (no TIME_WAIT left behind).
    pub fn abort(self) {
        let _ = with_sock(self.fd, |s| s.set_linger(Some(std::time::Duration::ZERO)));
        // SAFETY: shutdown on our fd.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }
}

/// Parses one unmasked server frame header: (opcode, payload offset, payload length).
fn parse(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    let (len, start) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    // A length near u64::MAX from a broken peer must not overflow.
    (b.len().saturating_sub(start) >= len).then_some((opcode, start, len))
}
