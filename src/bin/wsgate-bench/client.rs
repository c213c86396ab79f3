//! The load generator's lean WebSocket client: monoio, readiness waits without a pinned buffer,
//! a per-thread read buffer, frames built once per message, a zero mask key (legal in RFC 6455
//! and free to apply), and `SO_LINGER 0` closes so runs leave no TIME_WAIT behind.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;
use socket2::{Domain, Socket, Type};

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

/// A client TLS session shared by a connection's reader and its sender (`--tls-ca`).
type Tls = Option<Rc<RefCell<rustls::ClientConnection>>>;

/// A connected, upgraded WebSocket.
pub struct WsConn {
    stream: Rc<TcpStream>,
    fd: RawFd,
    tls: Tls,
    /// Bytes read but not yet parsed (an unfinished frame).
    pending: Vec<u8>,
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

/// Opens a TCP connection from `src` (if given), with TLS when `tls` is given (server name
/// `localhost`), and performs the upgrade for `path`.
pub async fn connect(
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    path: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> io::Result<WsConn> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
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
    let tls = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid name");
            let session = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
            Some(Rc::new(RefCell::new(session)))
        }
        None => None,
    };
    let mut conn = WsConn {
        stream: Rc::new(stream),
        fd,
        tls,
        pending: Vec::new(),
    };
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
            return Ok(conn);
        }
        if conn.pending.len() > 16 * 1024 {
            return Err(io::Error::other("oversized upgrade answer"));
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
    tls: Tls,
}

impl Sender {
    /// Sends all of `data`, waiting for writability when the socket is full.
    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        send(&self.stream, self.fd, &self.tls, data).await
    }
}

/// A non-blocking socket as `Read`/`Write` for rustls.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region.
        errno_result(unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        })
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid readable region.
        errno_result(unsafe {
            libc::send(
                self.0,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn send(stream: &TcpStream, fd: RawFd, tls: &Tls, data: &[u8]) -> io::Result<()> {
    match tls {
        None => send_all(stream, fd, data).await,
        Some(t) => {
            t.borrow_mut().writer().write_all(data)?;
            flush_tls(stream, fd, t).await
        }
    }
}

/// Sends every record the session holds, waiting for writability when the socket is full.
async fn flush_tls(
    stream: &TcpStream,
    fd: RawFd,
    t: &RefCell<rustls::ClientConnection>,
) -> io::Result<()> {
    loop {
        let r = {
            let mut t = t.borrow_mut();
            let mut r = Ok(());
            while t.wants_write() {
                if let Err(e) = t.write_tls(&mut Fd(fd)) {
                    r = Err(e);
                    break;
                }
            }
            r
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

async fn send_all(stream: &TcpStream, fd: RawFd, mut data: &[u8]) -> io::Result<()> {
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
            tls: self.tls.clone(),
        }
    }

    /// Sends all of `data`, waiting for writability when the socket is full.
    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        send(&self.stream, self.fd, &self.tls, data).await
    }

    /// Waits for bytes and appends them to the pending buffer. Errors at the end of stream.
    async fn read_some(&mut self) -> io::Result<()> {
        if let Some(t) = self.tls.clone() {
            return self.read_some_tls(&t).await;
        }
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

    /// [`WsConn::read_some`] through TLS: records read and decrypted (driving the handshake,
    /// whose answers are sent on the way) until some plaintext arrived.
    async fn read_some_tls(&mut self, t: &RefCell<rustls::ClientConnection>) -> io::Result<()> {
        loop {
            flush_tls(&self.stream, self.fd, t).await?;
            let got = {
                let mut t = t.borrow_mut();
                let before = self.pending.len();
                let mut r = Ok(());
                loop {
                    match t.read_tls(&mut Fd(self.fd)) {
                        Ok(0) => {
                            r = Err(io::ErrorKind::UnexpectedEof.into());
                            break;
                        }
                        Ok(_) => {
                            t.process_new_packets().map_err(io::Error::other)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                match t.reader().read_to_end(&mut self.pending) {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
                r?;
                self.pending.len() > before
            };
            if got {
                return Ok(());
            }
            if t.borrow().wants_write() {
                continue;
            }
            self.stream.readable(false).await?;
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
                0x8 => closed = true,
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
    (b.len() >= start + len).then_some((opcode, start, len))
}
