//! The data path on io_uring beyond readiness: one ring per core of our own, beside monoio's,
//! through which every plain WebSocket connection reads and writes once upgraded.
//!
//! * **Reads without a poll or a `recv` each.** Every such connection has one multishot
//!   `recv` armed on the ring, with buffer selection from a provided-buffer ring (up to
//!   [`BUF_COUNT`] × [`BUF_SIZE`] per core, mapped once, resident only as used; the ring
//!   holds about twice what a turn takes, see [`BufRing::adapt`]). The kernel takes a buffer
//!   only when bytes arrive: an idle connection holds no buffer and no pending operation of
//!   ours in user memory, and a busy one costs no system call per read.
//! * **Writes without a `sendmsg` each.** One `sendmsg` on the ring per connection at a time,
//!   built when the dispatcher submits so that it carries every frame queued by then.
//! * **One dispatcher task per core** ([`Ring::run`]) builds the requested sends, submits
//!   what the connections' tasks queued (one `io_uring_enter` for all of them), makes and
//!   reaps the completions (`DEFER_TASKRUN`: the kernel copies received bytes only then),
//!   hands each connection the parts of buffers it received (its `rx` list) and wakes its
//!   task, which decodes the bytes straight from the buffer and gives the part back. It sleeps on an eventfd
//!   the kernel signals, polled through monoio's ring.
//! * **Bounds.** A connection may hold [`RX_CAP`] received parts not yet decoded (it is paused under
//!   backpressure, or slow); at that many its `recv` is cancelled, and its task re-arms it once
//!   it has caught up. When the buffer ring runs dry (`ENOBUFS`, which ends a multishot recv),
//!   the connection waits on the core's starved list until buffers come back.
//! * **Lifetimes.** An armed recv owns one strong reference to its connection's shared state
//!   ([`ConnShared`]), taken when it is armed and dropped with its last completion, and a send
//!   in flight owns one plus a reference to every frame it carries: a completion never finds
//!   freed memory, whatever the timing. Closing a connection shuts its socket, which ends the
//!   recv (a completion without `IORING_CQE_F_MORE`); entries naming a socket are submitted
//!   before it closes.
//!
//! TLS connections, plain HTTP and the upgrade itself keep monoio's readiness path, and so
//! does everything under the epoll driver, with `--no-ring`, and, for good, a connection
//! that receives large messages (see `conn.rs`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::outbox::{ConnShared, SEND_REQUESTED as REQUESTED};
use crate::stats;

/// Submission queue entries of the ring.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: multishot receives complete many times per submission.
const CQ_ENTRIES: u32 = 16384;
/// Buffers in the provided-buffer ring (a power of two).
pub(crate) const BUF_COUNT: u16 = 4096;
/// Size of one provided buffer: a 16 KiB message and its header fit in one.
pub(crate) const BUF_SIZE: usize = 4 * 1024;
/// The buffer group of the ring.
const BGID: u16 = 0;
/// The fewest free buffers the ring holds (see [`BufRing::adapt`]).
const MIN_FILL: u16 = 64;
/// Bytes one read decodes at most (the readiness path's scratch buffer is as large).
const READ_BUDGET: usize = 64 * 1024;
/// Received parts a connection may hold before its recv is stopped.
pub(crate) const RX_CAP: usize = 8;
/// Entries into the kernel one dispatcher turn makes at most to take completions (each makes
/// a bounded number, by default 20).
const MAX_ENTRIES_PER_TURN: u32 = 256;
/// Turns the dispatcher takes in a row on the connections' wake-ups before it lets monoio
/// reap its own completions (accepts, timers, upgrades).
const EAGER_TURNS: u32 = 8;

/// What a completion belongs to, in the low bits of its user data (the rest is the address
/// of the connection's shared state, which is at least 8-byte aligned).
const TAG_RECV: u64 = 1;
const TAG_CANCEL: u64 = 2;
const TAG_SEND: u64 = 3;
const TAG_MASK: u64 = 7;

// Per-connection ring state, in `ConnShared::ring`.
/// A multishot recv is armed (until its last completion).
pub(crate) const ARMED: u8 = 1;
/// Its cancellation was asked for.
pub(crate) const CANCELLING: u8 = 2;
/// The peer's end of the stream (or a socket error) arrived after the buffers in `rx`.
pub(crate) const EOF: u8 = 4;
/// The recv ended for want of buffers: waiting on the starved list.
pub(crate) const STARVED: u8 = 8;
/// A send completed; its result is in `ConnShared::sent`.
pub(crate) const SENT: u8 = 16;
/// The send in flight is being cancelled.
const SEND_CANCELLING: u8 = 32;
/// The connection is leaving the ring for readiness reads (large messages; see conn.rs).
pub(crate) const LEAVING: u8 = 64;
/// The connection has left the ring.
pub(crate) const OFF: u8 = 128;

/// Frames one send carries at most.
const MAX_IOV: usize = 64;
/// Spare send states a core keeps for reuse.
const SEND_POOL: usize = 256;

/// One send in flight: the message header and vectors the kernel reads, and a reference to
/// every frame they point into, so the bytes stay put whatever happens to the connection's
/// queue (or the connection) before the send completes. The vectors are sized to the send:
/// a ping round puts one send in flight on every connection at once, and a fixed array of
/// [`MAX_IOV`] vectors made each cost 1.1 KB (the full soak's RSS peaked 25 MB higher).
struct SendState {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
    frames: Vec<bytes::Bytes>,
    conn: Option<Rc<ConnShared>>,
}

/// The provided-buffer ring: [`BUF_COUNT`] entries the kernel takes buffers from, and the
/// buffers themselves, each mapped once.
struct BufRing {
    /// `BUF_COUNT` `io_uring_buf` entries of 16 bytes; entry 0's last 2 bytes are the tail.
    entries: *mut u8,
    bufs: *mut u8,
    /// Buffers in all (a power of two).
    count: u16,
    tail: Cell<u16>,
    /// Buffers in the ring, free for the kernel to take.
    free: Cell<u16>,
    /// Free buffers held back from the ring, the most recently used last.
    reserve: RefCell<Vec<u16>>,
    /// How many free buffers the ring should hold (see [`BufRing::adapt`]).
    target: Cell<u16>,
    /// Buffers the kernel took since the last [`BufRing::adapt`].
    taken: Cell<u16>,
    /// Reserve entries below this index hold no resident memory (never used, or trimmed).
    cold: Cell<usize>,
    /// Turns since the last [`BufRing::trim`], and when that was.
    turns: Cell<u32>,
    trimmed_at: Cell<std::time::Instant>,
    /// The kernel fills each buffer in parts (`IOU_PBUF_RING_INC`, Linux 6.12): see
    /// [`BufRing::received`].
    incremental: Cell<bool>,
    /// Per buffer, while the kernel or a connection holds it: see [`Slot`].
    slots: Box<[Slot]>,
}

/// What one buffer holds for the connections. With incremental consumption the kernel puts
/// each receive where the previous one into the same buffer ended, whichever connection it
/// was for, and moves on to the next buffer only once this one is full: many small reads
/// (4,500 pongs after a ping round) share a few buffers instead of taking 4 KiB each. The
/// buffer is free again once the kernel has moved past it and every connection has decoded
/// its part.
#[derive(Default)]
struct Slot {
    /// Bytes the kernel has put in the buffer so far (where the next receive starts).
    filled: Cell<u16>,
    /// Parts received into it and not yet decoded.
    parts: Cell<u16>,
    /// The kernel has moved past it (it takes nothing more from this buffer).
    done: Cell<bool>,
}

impl BufRing {
    fn new(count: u16) -> io::Result<BufRing> {
        debug_assert!(count.is_power_of_two());
        let entries = map(count as usize * 16)?;
        let bufs = match map(count as usize * BUF_SIZE) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: unmapping the region just mapped, unused.
                unsafe { libc::munmap(entries.cast(), count as usize * 16) };
                return Err(e);
            }
        };
        Ok(BufRing {
            entries,
            bufs,
            count,
            tail: Cell::new(0),
            free: Cell::new(0),
            // Highest ids first, so that the lowest are used first.
            reserve: RefCell::new((0..count).rev().collect()),
            target: Cell::new(MIN_FILL.min(count)),
            taken: Cell::new(0),
            cold: Cell::new(count as usize),
            turns: Cell::new(0),
            trimmed_at: Cell::new(std::time::Instant::now()),
            incremental: Cell::new(false),
            slots: (0..count).map(|_| Slot::default()).collect(),
        })
    }

    /// A receive put `len` bytes into buffer `bid`; `more` is the completion's
    /// `IORING_CQE_F_BUF_MORE` (the kernel keeps filling the buffer). Returns where the bytes
    /// start in the buffer, and whether the kernel has moved past the buffer. The part stays
    /// the caller's until [`BufRing::consumed`].
    fn received(&self, bid: u16, len: usize, more: bool) -> (usize, bool) {
        let slot = &self.slots[bid as usize];
        let start = slot.filled.get() as usize;
        // The kernel hands out each buffer's bytes in order, in the order of its
        // completions, and never past the buffer's end: anything else would be a broken
        // kernel interface, and decoding on from a wrong offset would corrupt streams.
        assert!(
            !slot.done.get() && start + len <= BUF_SIZE,
            "io_uring buffer {bid}: {len} bytes at {start} past its end or after its last part"
        );
        slot.filled.set((start + len) as u16);
        slot.parts.set(slot.parts.get() + 1);
        let finished = !(more && self.incremental.get());
        if finished {
            slot.done.set(true);
            self.free.set(self.free.get().saturating_sub(1));
            self.taken.set(self.taken.get().saturating_add(1));
        }
        (start, finished)
    }

    /// A part of buffer `bid` is decoded (or discarded); the last one frees the buffer once
    /// the kernel is done with it.
    fn consumed(&self, bid: u16) {
        let slot = &self.slots[bid as usize];
        debug_assert!(slot.parts.get() > 0, "buffer {bid} given back twice");
        let parts = slot.parts.get().saturating_sub(1);
        slot.parts.set(parts);
        if parts == 0 && slot.done.get() {
            slot.done.set(false);
            slot.filled.set(0);
            self.release(bid);
        }
    }

    /// A buffer is free again: into the ring if it holds fewer than its target, else into
    /// the reserve.
    fn release(&self, bid: u16) {
        if self.free.get() < self.target.get() {
            self.put(bid);
        } else {
            self.reserve.borrow_mut().push(bid);
        }
    }

    /// Fills the ring up to its target from the reserve, most recently used buffers first.
    fn top_up(&self) {
        let mut reserve = self.reserve.borrow_mut();
        while self.free.get() < self.target.get() {
            match reserve.pop() {
                Some(bid) => self.put(bid),
                None => break,
            }
        }
        self.cold.set(self.cold.get().min(reserve.len()));
    }

    /// At most once a second: gives the memory of the reserve's buffers back to the system,
    /// all but the [`MIN_FILL`] most recently used. A burst that once needed thousands of
    /// buffers would otherwise keep them resident for good (the soak saw the gateway's RSS
    /// climb 3 MB to such a high-water mark and stay). A trimmed buffer reads as zeros and
    /// costs a page fault when the kernel next fills it.
    fn trim(&self) {
        let turns = self.turns.get().wrapping_add(1);
        self.turns.set(turns);
        if !turns.is_multiple_of(256) || self.trimmed_at.get().elapsed() < Duration::from_secs(1) {
            return;
        }
        self.trimmed_at.set(std::time::Instant::now());
        let reserve = self.reserve.borrow();
        let end = reserve.len().saturating_sub(MIN_FILL as usize);
        let start = self.cold.get().min(end);
        for &bid in &reserve[start..end] {
            // SAFETY: the buffer is in the reserve: neither the kernel nor a connection holds
            // it, and its pages are ours to drop.
            unsafe {
                libc::madvise(
                    self.bufs.add(bid as usize * BUF_SIZE).cast(),
                    BUF_SIZE,
                    libc::MADV_DONTNEED,
                )
            };
        }
        self.cold.set(self.cold.get().max(end));
    }

    /// Once per dispatcher turn: sizes the ring's fill to twice what the kernel took in the
    /// turn (at least [`MIN_FILL`]), growing at once and shrinking slowly; doubles it after
    /// a receive found the ring empty. The kernel takes buffers in ring order, so every
    /// buffer in the ring is touched once per lap: a ring holding only what a turn needs
    /// keeps the buffers in use few, and warm in the cache (a fixed 4,096-buffer ring made
    /// a 1 KiB echo 1.1x the CPU of a 256-buffer one).
    fn adapt(&self, starved: bool) {
        let taken = self.taken.replace(0);
        let want = taken.saturating_mul(2).max(MIN_FILL).min(self.count);
        let now = self.target.get();
        let next = if starved {
            now.saturating_mul(2).min(self.count)
        } else if want >= now {
            want
        } else {
            now - ((now - want) / 16).max(1)
        };
        self.target.set(next.max(want));
        self.top_up();
        self.trim();
    }

    /// Gives buffer `bid` (back) to the kernel.
    fn put(&self, bid: u16) {
        debug_assert!(bid < self.count);
        let tail = self.tail.get();
        let idx = (tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, so the entry is inside the mapping; only its addr, len and
        // bid fields are written (entry 0's last field is the ring's tail, written below).
        unsafe {
            let e = self.entries.add(idx * 16);
            e.cast::<u64>()
                .write(self.bufs.add(bid as usize * BUF_SIZE) as u64);
            e.add(8).cast::<u32>().write(BUF_SIZE as u32);
            e.add(12).cast::<u16>().write(bid);
        }
        let tail = tail.wrapping_add(1);
        self.tail.set(tail);
        // SAFETY: the tail is a 2-byte aligned u16 shared with the kernel, which reads it
        // with acquire semantics; the release store publishes the entry written above.
        unsafe { (*self.entries.add(14).cast::<AtomicU16>()).store(tail, Ordering::Release) };
        self.free.set(self.free.get() + 1);
    }

    /// The `len` bytes at `start` the kernel put in buffer `bid`.
    ///
    /// # Safety
    /// The part must be held by the caller (received, not yet consumed), `start + len` at
    /// most [`BUF_SIZE`], and no other reference to the part may live (parts of one buffer
    /// never overlap).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, bid: u16, start: usize, len: usize) -> &mut [u8] {
        debug_assert!(bid < self.count && start + len <= BUF_SIZE);
        std::slice::from_raw_parts_mut(self.bufs.add(bid as usize * BUF_SIZE + start), len)
    }
}

/// `IOU_PBUF_RING_INC` (Linux 6.12): the kernel consumes a provided buffer in parts.
const IOU_PBUF_RING_INC: u16 = 2;
/// `IORING_CQE_F_BUF_MORE`: the kernel keeps filling the completion's buffer.
const CQE_F_BUF_MORE: u32 = 1 << 4;

/// Whether a completion's buffer is still being filled by the kernel.
fn buf_more(flags: u32) -> bool {
    flags & CQE_F_BUF_MORE != 0
}
/// `IORING_REGISTER_PBUF_RING`.
const IORING_REGISTER_PBUF_RING: libc::c_uint = 22;

/// Registers the buffer ring with `flags` (the io-uring crate's `register_buf_ring` takes
/// none; `struct io_uring_buf_reg` from `linux/io_uring.h`).
///
/// # Safety
/// `bufs.entries` must be a page-aligned mapping of `bufs.count` entries outliving the ring.
unsafe fn register_buf_ring(uring: &IoUring, bufs: &BufRing, flags: u16) -> io::Result<()> {
    #[repr(C)]
    struct BufReg {
        ring_addr: u64,
        ring_entries: u32,
        bgid: u16,
        flags: u16,
        resv: [u64; 3],
    }
    let reg = BufReg {
        ring_addr: bufs.entries as u64,
        ring_entries: bufs.count as u32,
        bgid: BGID,
        flags,
        resv: [0; 3],
    };
    let r = libc::syscall(
        libc::SYS_io_uring_register,
        uring.as_raw_fd(),
        IORING_REGISTER_PBUF_RING,
        &reg as *const BufReg,
        1,
    );
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An anonymous private mapping of `len` bytes (resident only once touched).
fn map(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping, no file involved.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// One core's ring.
pub(crate) struct Ring {
    uring: RefCell<IoUring>,
    /// The eventfd registered on the ring, until the dispatcher takes it.
    efd: Cell<Option<std::os::fd::OwnedFd>>,
    bufs: BufRing,
    /// Entries pushed since the last submit.
    unsubmitted: Cell<bool>,
    /// The dispatcher, parked.
    waker: Cell<Option<Waker>>,
    /// Connections whose recv ended with `ENOBUFS`.
    starved: RefCell<Vec<Rc<ConnShared>>>,
    /// A receive found the buffer ring empty this turn.
    ran_dry: Cell<bool>,
    /// Sends requested this turn: (connection, socket, bytes of its front frame written).
    sends: RefCell<Vec<(Rc<ConnShared>, RawFd, usize)>>,
    /// Send states not in flight, for reuse. Boxed: the kernel holds their address while a
    /// send is in flight (the header points into the vectors beside it).
    #[allow(clippy::vec_box)]
    pool: RefCell<Vec<Box<SendState>>>,
    stats: std::sync::Arc<stats::CoreStats>,
}

impl Ring {
    /// Sets up the ring and its buffers. Fails on kernels without multishot receives or
    /// provided-buffer rings (before 6.0); the caller then keeps the readiness path.
    pub(crate) fn new(stats: std::sync::Arc<stats::CoreStats>) -> io::Result<Rc<Ring>> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        let bufs = BufRing::new(buffer_count())?;
        // SAFETY: `entries` is a page-aligned mapping of `count` entries that lives as long
        // as the ring (it is never unmapped, see Drop).
        match unsafe { register_buf_ring(&uring, &bufs, IOU_PBUF_RING_INC) } {
            Ok(()) => bufs.incremental.set(true),
            // Kernels before 6.12 refuse the flag: one buffer per receive then.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => unsafe {
                // SAFETY: as above.
                register_buf_ring(&uring, &bufs, 0)?
            },
            Err(e) => return Err(e),
        }
        bufs.top_up();
        let mut uring = uring;
        self_test(&mut uring, &bufs)?;
        // An eventfd the kernel signals when completions wait (with DEFER_TASKRUN: when work
        // to make them waits), made here so that every descriptor of the core exists once
        // the gateway says it listens.
        // SAFETY: eventfd returns a fresh descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let efd = unsafe { std::os::fd::OwnedFd::from_raw_fd(efd) };
        uring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(Rc::new(Ring {
            efd: Cell::new(Some(efd)),
            uring: RefCell::new(uring),
            bufs,
            unsubmitted: Cell::new(false),
            waker: Cell::new(None),
            starved: RefCell::new(Vec::new()),
            ran_dry: Cell::new(false),
            sends: RefCell::new(Vec::new()),
            pool: RefCell::new(Vec::new()),
            stats,
        }))
    }

    /// Queues one entry; the dispatcher submits it with the others of this turn.
    fn push(&self, sqe: &squeue::Entry) {
        let mut uring = self.uring.borrow_mut();
        let mut tries = 0;
        loop {
            // SAFETY: the entries pushed here refer to no user memory but the buffer ring,
            // which outlives the ring, and user data the completion handler interprets.
            if unsafe { uring.submission().push(sqe) }.is_ok() {
                break;
            }
            // The queue is full: submit what it holds now. The kernel takes every entry
            // unless something is badly wrong; a worker whose data path is stuck is treated
            // like a dead one (the process aborts and is restarted).
            tries += 1;
            if let Err(e) = uring.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
                assert!(tries < 100, "the io_uring data path is stuck: {e}");
            }
        }
        drop(uring);
        self.wake();
    }

    /// Marks work for the dispatcher and wakes it.
    fn wake(&self) {
        if !self.unsubmitted.replace(true) {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    /// Submits what is queued now, not at the dispatcher's next turn.
    pub(crate) fn flush(&self) {
        self.build_sends();
        if self.unsubmitted.replace(false) {
            self.enter(false);
        }
    }

    /// One `io_uring_enter`: submits what is queued and, with `getevents`, makes the
    /// completions the kernel holds for this thread (`DEFER_TASKRUN`), without waiting for
    /// any. On failure the entries stay queued for the next turn.
    fn enter(&self, getevents: bool) {
        let flags = if getevents {
            1 /* IORING_ENTER_GETEVENTS */
        } else {
            0
        };
        let uring = self.uring.borrow();
        // SAFETY: only this thread touches the submission queue, and not meanwhile.
        let to_submit = unsafe { uring.submission_shared() }.len() as u32;
        // SAFETY: no argument pointer is passed.
        let r = unsafe {
            uring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, 0, flags, None)
        };
        if let Err(e) = r {
            if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR)) {
                tracing::error!(error = %e, "io_uring enter failed");
            }
            self.unsubmitted.set(true);
        }
    }

    /// Arms the connection's multishot recv; the recv holds a reference to `conn` until its
    /// last completion.
    pub(crate) fn arm(&self, conn: &Rc<ConnShared>, fd: RawFd) {
        let ptr = Rc::into_raw(conn.clone()) as u64;
        debug_assert_eq!(ptr & TAG_MASK, 0);
        let sqe = opcode::RecvMulti::new(types::Fd(fd), BGID)
            .build()
            .user_data(ptr | TAG_RECV);
        conn.ring_set(ARMED);
        stats::add_gauge(&self.stats.ring_recvs_armed, 1);
        self.push(&sqe);
    }

    /// Sends the front of the connection's queue (up to [`MAX_IOV`] frames, the first from
    /// `head` on) with one `sendmsg` on the ring. One send per connection is in flight at a
    /// time; its completion sets [`SENT`] and wakes the connection's task, which pops what
    /// was written and sends what queued up meanwhile.
    pub(crate) fn send(&self, conn: &Rc<ConnShared>, fd: RawFd, head: usize) {
        // Built only when the dispatcher submits, so that everything queued until then (the
        // other deliveries of this scheduler pass) leaves in this one send.
        conn.sending.set(REQUESTED);
        self.sends.borrow_mut().push((conn.clone(), fd, head));
        self.wake();
    }

    /// Turns the requested sends into entries, each with what its queue holds now.
    fn build_sends(&self) {
        let requests = self.sends.take();
        for (conn, fd, head) in &requests {
            // Withdrawn (a close that discards the queue), or the connection ended: its
            // socket may already be closed, and its number reused.
            if conn.sending.get() != REQUESTED || conn.has(crate::outbox::DONE) {
                if conn.sending.get() == REQUESTED {
                    conn.sending.set(0);
                }
                continue;
            }
            self.build_send(conn, *fd, *head);
        }
        let mut requests = requests;
        requests.clear();
        // Keep the list's allocation for the next turn (unless nothing else took its place).
        let mut sends = self.sends.borrow_mut();
        if sends.is_empty() {
            *sends = requests;
        }
    }

    fn build_send(&self, conn: &Rc<ConnShared>, fd: RawFd, head: usize) {
        let mut st = self.pool.borrow_mut().pop().unwrap_or_else(|| {
            Box::new(SendState {
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                msg: unsafe { std::mem::zeroed() },
                iov: Vec::new(),
                frames: Vec::new(),
                conn: None,
            })
        });
        let n = {
            let q = conn.queue.borrow();
            let n = q.len().min(MAX_IOV);
            st.iov.reserve_exact(n);
            st.frames.reserve_exact(n);
            for (i, frame) in q.iter().take(n).enumerate() {
                let part = if i == 0 { &frame[head..] } else { &frame[..] };
                st.iov.push(libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                });
                st.frames.push(frame.clone());
            }
            st.frames.len()
        };
        if n == 0 {
            conn.sending.set(0);
            self.pool.borrow_mut().push(st);
            return;
        }
        st.msg.msg_iov = st.iov.as_mut_ptr();
        st.msg.msg_iovlen = n as _;
        st.conn = Some(conn.clone());
        conn.sending.set(n as u8);
        let ptr = Box::into_raw(st);
        conn.send_ud.set(ptr as u64 | TAG_SEND);
        debug_assert_eq!(ptr as u64 & TAG_MASK, 0);
        // SAFETY: the header, the vectors and the frames they point into live in the boxed
        // state, which is reclaimed only by the send's completion (`on_send`).
        let sqe = opcode::SendMsg::new(types::Fd(fd), unsafe { &(*ptr).msg })
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(ptr as u64 | TAG_SEND);
        self.push(&sqe);
    }

    fn on_send(&self, ptr: u64, res: i32) {
        // SAFETY: the pointer came from Box::into_raw in `send`, and a send completes once.
        let mut st = unsafe { Box::from_raw(ptr as *mut SendState) };
        stats::inc(&self.stats.ring_sends);
        if let Some(conn) = st.conn.take() {
            conn.sent.set(res);
            conn.sending.set(0);
            conn.ring_clear(SEND_CANCELLING);
            conn.ring_set(SENT);
            conn.notify_writer();
        }
        st.frames.clear();
        st.iov.clear();
        let mut pool = self.pool.borrow_mut();
        if pool.len() < SEND_POOL {
            pool.push(st);
        }
    }

    /// Asks for the end of the connection's send in flight (a close that discards what is
    /// queued must not wait behind it). A send waiting for room in the socket has sent
    /// nothing, and completes with `ECANCELED`; one that got further completes as usual.
    /// Returns true when nothing is in flight any more (the send was only requested).
    pub(crate) fn cancel_send(&self, conn: &ConnShared) -> bool {
        if conn.sending.get() == REQUESTED {
            conn.sending.set(0);
            return true;
        }
        if conn.sending.get() == 0 || conn.ring_has(SEND_CANCELLING) {
            return conn.sending.get() == 0;
        }
        conn.ring_set(SEND_CANCELLING);
        // The send's state is reclaimed only by its completion, which the dispatcher reaps
        // after submitting this entry: the user data cannot name another send by then.
        let target = conn.send_ud.get();
        self.push(
            &opcode::AsyncCancel::new(target)
                .build()
                .user_data(TAG_CANCEL),
        );
        false
    }

    /// Asks for the end of the connection's recv (it holds enough buffers, or leaves).
    pub(crate) fn cancel(&self, conn: &ConnShared) {
        let target = conn as *const ConnShared as u64 | TAG_RECV;
        conn.ring_set(CANCELLING);
        self.push(
            &opcode::AsyncCancel::new(target)
                .build()
                .user_data(TAG_CANCEL),
        );
    }

    /// Decodes what the connection received, in order, giving each buffer back after use:
    /// buffers until [`READ_BUDGET`] bytes (the rest waits for the next read, so that
    /// backpressure is checked as often as on the readiness path). `feed` gets the bytes of
    /// one part.
    pub(crate) fn drain(&self, conn: &ConnShared, mut feed: impl FnMut(&mut [u8])) -> Drained {
        let mut rx = conn.rx.take();
        let mut bytes = 0;
        let mut used = 0;
        let mut runs = Runs::default();
        for &e in &rx {
            let (bid, start, len) = unpack(e);
            // SAFETY: the part was received for this connection and is consumed only below,
            // after this use; `received` checked that it lies inside the buffer.
            feed(unsafe { self.bufs.slice(bid, start, len) });
            self.give_back(bid);
            runs.add(start, len);
            used += 1;
            bytes += len;
            if bytes >= READ_BUDGET {
                break;
            }
        }
        rx.drain(..used);
        // Nothing was pushed meanwhile (the dispatcher runs in its own task): put what is
        // left back. An empty list that spilled to the heap (a burst) is dropped, so that a
        // connection gone quiet holds no allocation for it.
        let done = rx.is_empty();
        if !done || !rx.spilled() {
            *conn.rx.borrow_mut() = rx;
        }
        Drained {
            open: !(done && conn.ring_has(EOF)),
            bytes,
            run: runs.longest,
        }
    }

    /// Gives back what a closed connection still held.
    pub(crate) fn discard(&self, conn: &ConnShared) {
        for e in conn.rx.take() {
            self.give_back(unpack(e).0);
        }
    }

    fn give_back(&self, bid: u16) {
        self.bufs.consumed(bid);
        self.unstarve();
    }

    /// Starved connections are woken once the ring holds half its target again.
    fn unstarve(&self) {
        if self.bufs.free.get() >= self.bufs.target.get() / 2 && !self.starved.borrow().is_empty() {
            for c in self.starved.take() {
                c.ring_clear(STARVED);
                c.notify_writer();
            }
        }
    }

    /// The dispatcher: submits, reaps and hands out completions, until the runtime ends.
    pub(crate) async fn run(self: Rc<Self>) {
        // The eventfd's readiness, waited on through monoio's ring.
        let waiter = match self.efd.take() {
            // SAFETY: the descriptor moves from the OwnedFd to the wrapper, which owns it
            // from now on. It is not a socket, but the wrapper is only ever asked for
            // readiness.
            Some(fd) => monoio::net::UnixStream::from_std(unsafe {
                std::os::unix::net::UnixStream::from_raw_fd(fd.into_raw_fd())
            }),
            None => Err(io::Error::other("the dispatcher runs once")),
        };
        let efd = waiter.as_ref().map_or(-1, |w| w.as_raw_fd());
        let waiter = match waiter {
            Ok(w) => w,
            Err(e) => {
                // The worker cannot serve its connections without it: the process-wide policy
                // for a dead worker applies.
                panic!("cannot wait on the io_uring data path: {e}");
            }
        };
        let mut readable = Box::pin(waiter.readable(false));
        // Turns in a row taken on a submission's wake-up, without monoio reaping in between.
        let mut eager = 0u32;
        loop {
            let fired = std::future::poll_fn(|cx| {
                if self.unsubmitted.get() {
                    return Poll::Ready(false);
                }
                if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "waiting on the io_uring data path failed");
                    }
                    return Poll::Ready(true);
                }
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            if fired {
                let mut count = 0u64;
                // SAFETY: an 8-byte read into a u64 from our eventfd (non-blocking).
                unsafe { libc::read(efd, (&mut count as *mut u64).cast(), 8) };
                readable.set(waiter.readable(false));
                eager = 0;
            } else {
                eager += 1;
            }
            self.unsubmitted.set(false);
            // With DEFER_TASKRUN completions are made (and received bytes copied) only when
            // this thread enters with GETEVENTS, a bounded number per entry. Every one
            // waiting is made and reaped before the woken connections run: what they queue
            // for the same recipients then leaves in one send each, as on the readiness
            // path (taking the completions in small chunks instead made 1.6x the TCP
            // segments per message in the `direct` scenario, and cost 2x the CPU).
            let work = fired || eager < EAGER_TURNS;
            self.build_sends();
            let mut entries = 0;
            loop {
                self.enter(work);
                if !work {
                    break;
                }
                self.reap();
                entries += 1;
                // SAFETY: reading the queue's flags; only this thread uses the queue.
                let more = unsafe { self.uring.borrow().submission_shared() }.taskrun();
                if !more || entries == MAX_ENTRIES_PER_TURN {
                    break;
                }
            }
            if work {
                self.bufs.adapt(self.ran_dry.replace(false));
                self.unstarve();
            }
            // Work the kernel still holds for this thread signals nothing more: signal it
            // ourselves, so the next turn comes once the woken connections and monoio ran.
            // SAFETY: reading the queue's flags; only this thread uses the queue.
            if unsafe { self.uring.borrow().submission_shared() }.taskrun() {
                let one = 1u64;
                // SAFETY: an 8-byte write of a u64 to our eventfd.
                unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
            }
        }
    }

    /// Handles every completion waiting.
    fn reap(&self) {
        loop {
            let mut batch = [(0u64, 0i32, 0u32); 64];
            let mut n = 0;
            {
                let mut uring = self.uring.borrow_mut();
                let mut cq = uring.completion();
                // The kernel drops a completion only when the queue is full and it cannot
                // allocate room to hold it back (memory pressure). A lost receive would put
                // every later part of its buffer at a wrong offset, and a lost send would
                // hang its connection: the worker cannot go on, and the process-wide policy
                // for a dead worker applies (abort, so a supervisor restarts it).
                assert!(
                    cq.overflow() == 0,
                    "the io_uring data path lost {} completions",
                    cq.overflow()
                );
                for cqe in &mut cq {
                    batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                    n += 1;
                    if n == batch.len() {
                        break;
                    }
                }
            }
            for &(data, res, flags) in &batch[..n] {
                match data & TAG_MASK {
                    TAG_RECV => self.on_recv(data & !TAG_MASK, res, flags),
                    TAG_SEND => self.on_send(data & !TAG_MASK, res),
                    _ => {}
                }
                // TAG_CANCEL: the cancellation's own completion; the recv's tells the outcome.
            }
            if n < batch.len() {
                return;
            }
        }
    }

    fn on_recv(&self, ptr: u64, res: i32, flags: u32) {
        // SAFETY: the recv holds a strong reference to the connection until its last
        // completion (dropped at the end of this function), so it is alive here.
        let conn = unsafe { &*(ptr as *const ConnShared) };
        let more = cqueue::more(flags);
        let len = usize::try_from(res).unwrap_or(0);
        if let Some(bid) = cqueue::buffer_select(flags) {
            let (start, finished) = self.bufs.received(bid, len, buf_more(flags));
            if finished {
                stats::inc(&self.stats.ring_buffers_filled);
            }
            if len > 0 {
                stats::inc(&self.stats.ring_recvs);
            }
            // An empty receive may still carry a buffer (one issued from the kernel's worker
            // pool takes its whole buffer when it is selected, then meets EOF, an error or a
            // cancellation): it is free again at once, as are the bytes of a connection that
            // has ended.
            if len == 0 || conn.has(crate::outbox::DONE) || conn.ring_has(EOF) {
                self.give_back(bid);
            } else {
                let held = {
                    let mut rx = conn.rx.borrow_mut();
                    rx.push(pack(bid, start, len));
                    rx.len()
                };
                if more && held >= RX_CAP && !conn.ring_has(CANCELLING) {
                    self.cancel(conn);
                }
                conn.notify_writer();
            }
        }
        if res == -libc::ENOBUFS {
            stats::inc(&self.stats.ring_starved);
            self.ran_dry.set(true);
            conn.ring_set(STARVED);
            // SAFETY: ptr came from Rc::into_raw and the recv's reference is still held;
            // this takes one more for the starved list.
            let rc = unsafe {
                Rc::increment_strong_count(ptr as *const ConnShared);
                Rc::from_raw(ptr as *const ConnShared)
            };
            self.starved.borrow_mut().push(rc);
        } else if res <= 0 && res != -libc::ECANCELED {
            // The end of the peer's stream (0) or a socket error: after what rx holds.
            conn.ring_set(EOF);
            conn.notify_writer();
        }
        if !more {
            conn.ring_clear(ARMED | CANCELLING);
            stats::add_gauge(&self.stats.ring_recvs_armed, -1);
            conn.notify_writer();
            // SAFETY: the reference taken by `arm` for this recv, released once.
            drop(unsafe { Rc::from_raw(ptr as *const ConnShared) });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The buffer mappings are left in place: the kernel tears the ring down
        // asynchronously after its descriptor closes, and a late receive must never land in
        // memory reused for something else. A ring lives as long as its worker thread.
        for c in self.starved.take() {
            drop(c);
        }
    }
}

/// [`BUF_COUNT`]; test builds take `WSGATE_FAULT_RING_BUFFERS` (a power of two) instead, so
/// the tests can run the ring dry with a few clients.
fn buffer_count() -> u16 {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("WSGATE_FAULT_RING_BUFFERS")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|n| n.is_power_of_two())
    {
        return n;
    }
    BUF_COUNT
}

/// Checks that the kernel does what the data path needs (a multishot recv on a socket, with a
/// provided buffer), on a socket pair, before any connection depends on it: two receives
/// ("x", then "yz") land where the bookkeeping says, and with buffers filled in parts the
/// second follows the first in the same buffer.
fn self_test(uring: &mut IoUring, bufs: &BufRing) -> io::Result<()> {
    use std::os::fd::OwnedFd;
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors, owned right after.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write = |bytes: &[u8]| {
        // SAFETY: a write from a live slice.
        if unsafe { libc::write(b.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) }
            == bytes.len() as isize
        {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // The next completion, made and reaped (the bytes are already there: it comes at once).
    let next = |uring: &mut IoUring| -> io::Result<(i32, u32)> {
        loop {
            if let Some(cqe) = uring.completion().next() {
                return Ok((cqe.result(), cqe.flags()));
            }
            uring.submit_and_wait(1)?;
        }
    };
    // One part received: (buffer, where it started) if it holds `want`.
    let part = |(res, flags): (i32, u32), want: &[u8]| -> Option<(u16, usize)> {
        let bid = cqueue::buffer_select(flags)?;
        let len = usize::try_from(res).unwrap_or(0);
        let (start, _) = bufs.received(bid, len, buf_more(flags));
        // SAFETY: the part was just received and is consumed right after.
        let same = unsafe { bufs.slice(bid, start, len) } == want;
        bufs.consumed(bid);
        (same && cqueue::more(flags)).then_some((bid, start))
    };
    write(b"x")?;
    let sqe = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), BGID)
        .build()
        .user_data(TAG_CANCEL);
    // SAFETY: the entry refers to the buffer ring only, which outlives the ring.
    unsafe { uring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    let first = next(uring)?;
    let mut armed = cqueue::more(first.1);
    let mut verdict = match part(first, b"x") {
        None => Err(io::Error::other(
            "the kernel has no multishot recv with provided buffers (Linux 6.0 or later)",
        )),
        Some(one) => {
            write(b"yz")?;
            let second = next(uring)?;
            armed = cqueue::more(second.1);
            match part(second, b"yz") {
                Some((bid, start)) if !bufs.incremental.get() || (bid, start) == (one.0, 1) => {
                    Ok(())
                }
                _ => Err(io::Error::other(
                    "the kernel's provided buffers filled in parts (IOU_PBUF_RING_INC) did \
                     not hold a second receive where expected",
                )),
            }
        }
    };
    // The peer's end of the stream ends the recv (if it is still armed).
    drop(b);
    while armed {
        let (res, flags) = next(uring)?;
        if let Some(bid) = cqueue::buffer_select(flags) {
            bufs.received(bid, usize::try_from(res).unwrap_or(0), buf_more(flags));
            bufs.consumed(bid);
            verdict = verdict.and(Err(io::Error::other("unexpected bytes in the self-test")));
        }
        armed = cqueue::more(flags);
    }
    drop(a);
    verdict
}

/// What one [`Ring::drain`] did.
pub(crate) struct Drained {
    /// The stream is still open (false once the peer's stream has ended and everything
    /// before the end is decoded).
    pub(crate) open: bool,
    /// Bytes decoded.
    pub(crate) bytes: usize,
    /// The longest run of bytes that arrived in one receive: a receive that reached the end
    /// of its buffer went on in a fresh one, so parts that follow one ending a buffer are
    /// counted as one run (parts held over turns, while the connection was paused, are not
    /// summed otherwise).
    pub(crate) run: usize,
}

/// The longest run of bytes among a connection's parts that came in one receive: a part
/// that starts a buffer continues a run when the part before it ended its buffer (the
/// kernel went on in a fresh one).
#[derive(Default)]
struct Runs {
    run: usize,
    longest: usize,
    joined: bool,
}

impl Runs {
    fn add(&mut self, start: usize, len: usize) {
        self.run = if self.joined && start == 0 {
            self.run + len
        } else {
            len
        };
        self.longest = self.longest.max(self.run);
        self.joined = start + len == BUF_SIZE;
    }
}

/// One received part in a connection's `rx` list: buffer, start, length (each < 2^16, as
/// BUF_SIZE is 4 KiB).
fn pack(bid: u16, start: usize, len: usize) -> u64 {
    debug_assert!(start + len <= BUF_SIZE && BUF_SIZE < 1 << 16);
    ((bid as u64) << 32) | ((start as u64 & 0xffff) << 16) | (len as u64 & 0xffff)
}

fn unpack(e: u64) -> (u16, usize, usize) {
    (
        (e >> 32) as u16,
        ((e >> 16) & 0xffff) as usize,
        (e & 0xffff) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_holds_what_a_turn_takes_and_grows_when_it_runs_dry() {
        let b = BufRing::new(1024).unwrap();
        b.top_up();
        assert_eq!((b.free.get(), b.target.get()), (MIN_FILL, MIN_FILL));
        // A turn that took every buffer the ring held (and gave them back): the ring holds
        // twice as many, at once.
        for bid in 0..MIN_FILL {
            b.received(bid, BUF_SIZE, false);
            b.consumed(bid);
        }
        b.adapt(false);
        assert_eq!((b.target.get(), b.free.get()), (2 * MIN_FILL, 2 * MIN_FILL));
        // Running dry doubles it, up to every buffer there is.
        b.adapt(true);
        b.adapt(true);
        b.adapt(true);
        assert_eq!((b.target.get(), b.free.get()), (1024, 1024));
        b.adapt(true);
        assert_eq!(b.target.get(), 1024);
        // Quiet turns shrink it by a sixteenth of the excess each, never under MIN_FILL;
        // buffers given back past the target go to the reserve, the ring keeps the rest.
        b.adapt(false);
        assert_eq!(b.target.get(), 1024 - (1024 - MIN_FILL) / 16);
        for _ in 0..2000 {
            b.adapt(false);
        }
        assert_eq!(b.target.get(), MIN_FILL);
        for bid in 0..10 {
            b.received(bid, 1, false);
            b.consumed(bid);
        }
        assert_eq!(b.reserve.borrow().len(), 10);
        assert_eq!(b.free.get(), 1014);
        // A small ring (the tests' 4 buffers) never asks for more than it has.
        let small = BufRing::new(4).unwrap();
        small.adapt(true);
        small.adapt(false);
        assert_eq!(small.target.get(), 4);
    }

    #[test]
    fn buffer_entries_pack_and_unpack() {
        for (bid, start, len) in [
            (0u16, 0usize, 1usize),
            (BUF_COUNT - 1, 0, BUF_SIZE),
            (7, 20, 20),
            (BUF_COUNT - 1, BUF_SIZE - 1, 1),
        ] {
            assert_eq!(unpack(pack(bid, start, len)), (bid, start, len));
        }
    }

    /// The kernel's (major, minor) version, from uname.
    fn kernel() -> (u32, u32) {
        // SAFETY: uname fills the struct it is given.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::uname(&mut u) }, 0);
        // SAFETY: release is a NUL-terminated string.
        let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
        let mut nums = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
    }

    #[test]
    fn the_ring_passes_its_self_test_and_fills_buffers_in_parts_from_linux_6_12() {
        let ring = Ring::new(std::sync::Arc::new(stats::CoreStats::default()))
            .expect("the io_uring data path's self-test on this kernel");
        assert_eq!(
            ring.bufs.incremental.get(),
            kernel() >= (6, 12),
            "kernel {:?}",
            kernel()
        );
        // The self-test's two receives are decoded, and their buffer stays the kernel's:
        // it fills on from byte 3.
        let filled: Vec<_> = (0..ring.bufs.count)
            .map(|bid| &ring.bufs.slots[bid as usize])
            .filter(|s| s.filled.get() > 0)
            .map(|s| (s.filled.get(), s.parts.get(), s.done.get()))
            .collect();
        if ring.bufs.incremental.get() {
            assert_eq!(filled, [(3, 0, false)]);
        }
    }

    #[test]
    fn a_receive_split_over_two_buffers_counts_as_one_run() {
        let longest = |parts: &[(usize, usize)]| {
            let mut r = Runs::default();
            for &(start, len) in parts {
                r.add(start, len);
            }
            r.longest
        };
        // A 5 KiB message: the rest of one buffer, then the start of the next.
        assert_eq!(longest(&[(BUF_SIZE - 3000, 3000), (0, 2120)]), 5120);
        // A 16 KiB one: whole buffers in a row.
        assert_eq!(
            longest(&[(100, BUF_SIZE - 100), (0, BUF_SIZE), (0, BUF_SIZE)]),
            12188
        );
        // Eight small messages held while the connection was paused: never summed, even
        // when one happened to end its buffer.
        let small: Vec<_> = (0..8).map(|i| (i * 600, 600)).collect();
        assert_eq!(longest(&small), 600);
        assert_eq!(
            longest(&[(BUF_SIZE - 600, 600), (0, 600), (600, 600)]),
            1200
        );
    }

    #[test]
    fn parts_of_one_buffer_follow_each_other_and_free_it_together() {
        let b = BufRing::new(16).unwrap();
        b.incremental.set(true);
        b.top_up();
        let free = b.free.get();
        // Three receives (say, of three connections) into buffer 3: each starts where the
        // previous one ended, and the buffer stays the kernel's until one fills it.
        assert_eq!(b.received(3, 100, true), (0, false));
        assert_eq!(b.received(3, 200, true), (100, false));
        assert_eq!(b.free.get(), free);
        b.consumed(3);
        b.consumed(3);
        assert_eq!(b.received(3, BUF_SIZE - 300, false), (300, true));
        assert_eq!((b.free.get(), b.taken.get()), (free - 1, 1));
        // Free again only once every part is decoded, and then from its start.
        b.consumed(3);
        assert_eq!(b.free.get(), free);
        assert_eq!(b.received(3, 10, true), (0, false));
        // Without incremental consumption every receive ends its buffer.
        b.incremental.set(false);
        assert_eq!(b.received(4, 10, true), (0, true));
        assert!(b.slots[4].done.get());
    }

    #[test]
    #[should_panic(expected = "past its end")]
    fn a_part_past_the_buffer_end_is_refused() {
        let b = BufRing::new(16).unwrap();
        b.incremental.set(true);
        b.received(2, BUF_SIZE - 10, true);
        b.received(2, 11, false);
    }
}
