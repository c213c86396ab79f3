//! What the rest of the gateway may touch of a connection: its bounded outbound queue, its
//! close request, its liveness times and the waker of its task ([`ConnShared`]). The router's
//! glue, the sweeper and shutdown put frames or a close request here and wake the task; only
//! the connection's own task (src/conn.rs) drains the queue to the socket and shuts it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec;
use std::future::poll_fn;
use std::task::Poll;

/// Outcome of queueing a frame on a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued; the connection's task will send it.
    Queued,
    /// The queue would exceed its limit: the connection is being closed with 1013.
    Overflow,
    /// The connection is closing or closed; nothing was queued.
    Closed,
}

/// How a close proceeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseKind {
    /// The peer sent a close frame: answer it, then shut the socket.
    Reply,
    /// The server closes: send a close frame, wait (bounded) for the peer's, then shut.
    /// `flush`: send what is already queued first (shutdown), or discard it (errors).
    Initiate { flush: bool },
    /// The peer broke the protocol (RFC 6455 §7.1.7, "fail the connection"): send what is
    /// queued and a close frame, then shut the socket without waiting for a reply.
    Fail,
    /// The peer is gone: no frame, shut the socket now.
    Abort,
}

/// A request to close a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CloseReq {
    /// Close code; `None` sends an empty close frame.
    pub code: Option<u16>,
    /// Close reason.
    pub reason: &'static str,
    /// How to proceed.
    pub kind: CloseKind,
}

impl CloseReq {
    pub fn initiate(code: u16, reason: &'static str, flush: bool) -> Self {
        CloseReq {
            code: Some(code),
            reason,
            kind: CloseKind::Initiate { flush },
        }
    }
}

/// A point in time in milliseconds since the process first asked: 8 bytes where an `Instant`
/// takes 16, for the four times every connection keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Millis(u64);

impl Millis {
    /// Never reached: an unset deadline.
    pub const NEVER: Millis = Millis(u64::MAX);

    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    pub fn now() -> Self {
        Self::from(Instant::now())
    }

    /// `d` later (saturating at [`Millis::NEVER`]).
    pub fn after(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(ms))
    }

    /// How long after `earlier` this is (zero if it is not later).
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl From<Instant> for Millis {
    fn from(t: Instant) -> Self {
        let ms = t.saturating_duration_since(Self::epoch()).as_millis();
        Millis(u64::try_from(ms).unwrap_or(u64::MAX - 1))
    }
}

pub(crate) const REGISTERED: u8 = 1;
pub(crate) const PEER_CLOSED: u8 = 2;
pub(crate) const DONE: u8 = 4;
pub(crate) const DIRTY: u8 = 8;
/// The close handshake the server started ran out of time: the writer shuts the socket.
pub(crate) const EXPIRED: u8 = 16;
/// The user's owner refused the registration (per-user connection limit).
pub(crate) const REFUSED: u8 = 32;
/// The upgrade answer is written and the connection's task about to run: the sweeper may
/// queue pings and judge idleness. Before that a connection is in the slab but still
/// mid-handshake.
pub(crate) const LIVE: u8 = 64;
/// The task stopped reading under backpressure; the core's resume task wakes it.
pub(crate) const PAUSED: u8 = 128;

/// `ConnShared::sending` of a send on the io_uring data path that is requested and not yet
/// built (src/ring.rs).
pub(crate) const SEND_REQUESTED: u8 = u8::MAX;

/// State of one connection shared by its task (reading half and writing half) and the core's
/// router.
pub(crate) struct ConnShared {
    pub(crate) queue: RefCell<VecDeque<Bytes>>,
    pub(crate) queued_bytes: Cell<usize>,
    pub(crate) close: Cell<Option<CloseReq>>,
    pub(crate) flags: Cell<u8>,
    /// The task driving the connection: the upgrade while it waits for the registration,
    /// then the connection's task.
    pub(crate) waker: Cell<Option<Waker>>,
    pub(crate) last_seen: Cell<Millis>,
    pub(crate) next_ping: Cell<Millis>,
    /// Set once a close frame is queued: when the writer gives up waiting.
    pub(crate) close_deadline: Cell<Millis>,
    /// When the connection's token expires (closed with 1008 then).
    pub(crate) expires_at: Cell<Millis>,
    /// On the io_uring data path (src/ring.rs): parts of buffers received and not yet
    /// decoded, in order (buffer id, start and length, packed). Two fit without an
    /// allocation, in the space a `Vec` takes: an idle connection's pong every ping interval
    /// then costs no heap memory held between reads.
    pub(crate) rx: RefCell<smallvec::SmallVec<[u64; 2]>>,
    /// On the io_uring data path: the state of the connection's recv (`ring::ARMED`, ...).
    pub(crate) ring: Cell<u8>,
    /// On the io_uring data path: queued frames a send in flight carries (0: none in flight).
    pub(crate) sending: Cell<u8>,
    /// On the io_uring data path: the result of the last send, once `ring::SENT`.
    pub(crate) sent: Cell<i32>,
    /// On the io_uring data path: the user data of the send in flight (to cancel it).
    pub(crate) send_ud: Cell<u64>,
}

impl ConnShared {
    pub fn new() -> Self {
        ConnShared {
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            close: Cell::new(None),
            flags: Cell::new(0),
            waker: Cell::new(None),
            last_seen: Cell::new(Millis::NEVER),
            next_ping: Cell::new(Millis::NEVER),
            close_deadline: Cell::new(Millis::NEVER),
            expires_at: Cell::new(Millis::NEVER),
            rx: RefCell::new(smallvec::SmallVec::new()),
            ring: Cell::new(0),
            sending: Cell::new(0),
            sent: Cell::new(0),
            send_ud: Cell::new(0),
        }
    }

    pub(crate) fn ring_has(&self, f: u8) -> bool {
        self.ring.get() & f != 0
    }

    pub(crate) fn ring_set(&self, f: u8) {
        self.ring.set(self.ring.get() | f);
    }

    pub(crate) fn ring_clear(&self, f: u8) {
        self.ring.set(self.ring.get() & !f);
    }

    /// One liveness check, run by the core's sweeper for every upgraded connection:
    /// queue a due ping, close an idle connection with 4000, expire a stuck close.
    /// Returns whether it closed the connection for idleness, and the bytes of a ping it
    /// queued.
    pub fn sweep(
        &self,
        now: Millis,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> (bool, usize) {
        if self.has(DONE) || !self.has(LIVE) {
            return (false, 0);
        }
        let deadline = self.close_deadline.get();
        if deadline != Millis::NEVER {
            if now >= deadline && !self.has(EXPIRED) {
                self.set(EXPIRED);
                self.notify_writer();
            }
            return (false, 0);
        }
        if self.close.get().is_some() {
            return (false, 0);
        }
        if now >= self.expires_at.get() {
            self.request_close(CloseReq::initiate(1008, "token expired", true));
            return (false, 0);
        }
        if now.since(self.last_seen.get()) >= idle_timeout {
            self.request_close(CloseReq::initiate(4000, "idle timeout", false));
            return (true, 0);
        }
        if now >= self.next_ping.get() {
            self.next_ping.set(now.after(ping_interval));
            let queued = self.push_unbounded(codec::ping());
            self.notify_writer();
            return (false, queued);
        }
        (false, 0)
    }

    /// Whether the task paused reading under backpressure.
    pub fn is_paused(&self) -> bool {
        self.has(PAUSED)
    }

    /// Backpressure ended: the task may read again.
    pub fn resume(&self) {
        self.flags.set(self.flags.get() & !PAUSED);
        self.notify_writer();
    }

    /// Starts the ping schedule once the upgrade answer is queued; before this the sweeper
    /// leaves the connection alone, so nothing can precede the `101`.
    pub(crate) fn start_liveness(&self, ping_interval: Duration) {
        let now = Millis::now();
        self.last_seen.set(now);
        self.next_ping.set(now.after(ping_interval));
        self.set(LIVE);
    }

    pub(crate) fn has(&self, f: u8) -> bool {
        self.flags.get() & f != 0
    }

    pub(crate) fn set(&self, f: u8) {
        self.flags.set(self.flags.get() | f);
    }

    pub(crate) fn notify_writer(&self) {
        self.set(DIRTY);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Queues a frame for the writer, within the queue's byte limit.
    pub fn push(&self, frame: Bytes, max_queued: usize) -> Push {
        if self.has(DONE) || self.close.get().is_some() {
            return Push::Closed;
        }
        let queued = self.queued_bytes.get() + frame.len();
        if queued > max_queued {
            self.request_close(CloseReq::initiate(1013, "slow consumer", false));
            return Push::Overflow;
        }
        self.queued_bytes.set(queued);
        self.queue.borrow_mut().push_back(frame);
        self.notify_writer();
        Push::Queued
    }

    /// Asks the writer to close. The first request wins; later ones are ignored.
    pub fn request_close(&self, req: CloseReq) {
        if self.has(DONE) || self.close.get().is_some() {
            return;
        }
        self.close.set(Some(req));
        self.notify_writer();
    }

    /// The peer's close frame or the end of the stream arrived.
    pub(crate) fn set_peer_closed(&self) {
        self.set(PEER_CLOSED);
        self.notify_writer();
    }

    /// The directory has this connection (it may be welcomed), or refused it (`ok` false).
    pub fn set_registered(&self, ok: bool) {
        self.set(if ok { REGISTERED } else { REGISTERED | REFUSED });
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits for the owner's answer; true when registered.
    pub(crate) async fn registered(&self) -> bool {
        wait_until(&self.waker, || self.has(REGISTERED)).await;
        !self.has(REFUSED)
    }

    pub(crate) fn touch(&self) {
        self.last_seen.set(Millis::now());
    }

    /// Drops queued frames the writer has not started (keeps a half-written front frame, and
    /// the frames a send in flight carries). Returns the bytes dropped.
    pub(crate) fn discard_unstarted(&self, head_written: usize) -> usize {
        let mut q = self.queue.borrow_mut();
        let keep = usize::from(head_written > 0)
            .max(match self.sending.get() {
                // Requested but not built: nothing in flight yet.
                SEND_REQUESTED => 0,
                n => usize::from(n),
            })
            .min(q.len());
        q.truncate(keep);
        let before = self.queued_bytes.get();
        let after: usize = q
            .iter()
            .map(Bytes::len)
            .sum::<usize>()
            .saturating_sub(head_written);
        self.queued_bytes.set(after);
        before.saturating_sub(after)
    }

    /// Queues a frame past every limit (the close frame, the writer's own pings). Returns
    /// the bytes queued.
    pub(crate) fn push_unbounded(&self, frame: Bytes) -> usize {
        let len = frame.len();
        self.queued_bytes.set(self.queued_bytes.get() + len);
        self.queue.borrow_mut().push_back(frame);
        len
    }

    /// Writes as much of the queue as the socket takes in one `sendmsg`; pops what was
    /// written. `head` is how much of the front frame earlier calls wrote.
    pub(crate) fn write_to(&self, fd: RawFd, head: &mut usize) -> io::Result<usize> {
        const MAX_IOV: usize = 64;
        let mut q = self.queue.borrow_mut();
        let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for (i, frame) in q.iter().take(MAX_IOV).enumerate() {
            let part = if i == 0 { &frame[*head..] } else { &frame[..] };
            iov[n] = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
            n += 1;
        }
        // SAFETY: a zeroed msghdr is valid; iov points at `n` initialized iovecs whose
        // buffers (the queued frames) stay alive and unmoved for the duration of the call.
        let written = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n as _;
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = written as usize;
        self.consume(&mut q, head, written);
        Ok(written)
    }

    /// Pops what a completed send on the io_uring data path wrote.
    pub(crate) fn sent_bytes(&self, head: &mut usize, written: usize) {
        self.consume(&mut self.queue.borrow_mut(), head, written);
    }

    /// Pops what was written (`written` bytes from the front, `head` of which earlier).
    #[inline]
    fn consume(&self, q: &mut VecDeque<Bytes>, head: &mut usize, written: usize) {
        let mut left = written;
        while let Some(front) = q.front() {
            let rest = front.len() - *head;
            if left >= rest {
                left -= rest;
                *head = 0;
                q.pop_front();
            } else {
                *head += left;
                break;
            }
        }
        self.queued_bytes
            .set(self.queued_bytes.get().saturating_sub(written));
    }

    /// [`ConnShared::write_to`] through TLS: sends the records rustls still holds; once they
    /// are all out, encrypts the front of the queue (up to rustls' 64 KiB buffer, many frames
    /// per record) and sends what the socket takes. Returns the plaintext bytes taken from the
    /// queue; `WouldBlock` while earlier records wait for the socket. At most one buffer of
    /// records lives outside the queue, so `--max-queued-bytes` still bounds a connection.
    pub(crate) fn write_tls(
        &self,
        tls: &mut rustls::ServerConnection,
        fd: RawFd,
        head: &mut usize,
    ) -> io::Result<usize> {
        const MAX_IOV: usize = 64;
        crate::tls::flush(tls, fd)?;
        let mut q = self.queue.borrow_mut();
        if q.is_empty() {
            return Ok(0);
        }
        let mut parts: [io::IoSlice<'_>; MAX_IOV] = [io::IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (i, frame) in q.iter().take(MAX_IOV).enumerate() {
            parts[i] = io::IoSlice::new(if i == 0 { &frame[*head..] } else { frame });
            n += 1;
        }
        let taken = io::Write::write_vectored(&mut tls.writer(), &parts[..n])?;
        self.consume(&mut q, head, taken);
        drop(q);
        match crate::tls::flush(tls, fd) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    /// The connection's task is done: refuse everything from now on and free the queue.
    /// Returns the bytes that were still queued.
    pub(crate) fn finish(&self) -> usize {
        self.set(DONE);
        let mut q = self.queue.borrow_mut();
        q.clear();
        q.shrink_to_fit();
        self.queued_bytes.replace(0)
    }
}

/// Waits until `ready()` holds, parking the task's waker in `waker` in between; whoever makes
/// it hold takes the waker and wakes it. Single-threaded: no wake can be lost between the
/// check and the parking.
pub(crate) async fn wait_until(waker: &Cell<Option<Waker>>, ready: impl Fn() -> bool) {
    poll_fn(|cx| {
        if ready() {
            Poll::Ready(())
        } else {
            waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    /// The receive list holds two parts inline in the space a `Vec` takes (smallvec's `union`
    /// feature): every connection's shared state would grow by 8 bytes otherwise.
    #[test]
    fn the_inline_receive_list_is_no_larger_than_a_vec() {
        use std::mem::size_of;
        assert_eq!(
            size_of::<std::cell::RefCell<smallvec::SmallVec<[u64; 2]>>>(),
            size_of::<std::cell::RefCell<Vec<u64>>>()
        );
    }
}
