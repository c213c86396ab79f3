//! Cross-core mailboxes: a crossbeam channel of batches plus one waker per core, and the
//! gateway-wide backpressure signal that keeps every queue bounded.
//!
//! Senders push a whole batch, then wake the receiving core once. The receiver drains
//! everything with `try_recv` before registering its waker again, and checks the channel once
//! more after registering, so a batch sent in between is never missed. A wake from another
//! thread is legal because monoio is built with its `sync` feature.
//!
//! # Bounds
//!
//! Every mailbox counts the messages queued to its core and not yet handled (its depth). A
//! sender that takes a mailbox over its limit turns on [`Pressure`]; while it is on, every
//! core stops *reading from clients* (WebSocket frames and HTTP requests), which is the only
//! source of new cross-core traffic, until the congested core has worked its mailbox down to
//! half the limit and turns it off again, waking the other cores. Mailboxes themselves are
//! always drained (a core never stops handling what other cores sent it), so two cores
//! waiting on each other cannot deadlock. The depth can pass the limit only by what is
//! already read when the pressure turns on: bounded by one read per connection.
//!
//! The same signal bounds the bytes queued to connections: a core whose connections' queues
//! together pass its share of `--max-total-queued-bytes` turns pressure on until its
//! clients have read them down to three quarters of it.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// Why a core asks everyone to stop reading from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its mailbox is over the limit.
    Mailbox = 0,
    /// Its connections' queued bytes are over its share of the global bound.
    QueuedBytes = 1,
    /// Cluster mode: the broker bridge's queue is over half its bound (set on core 0's
    /// flags; the node has one bridge).
    Bridge = 2,
}

/// The gateway-wide backpressure signal: on while any core is over a bound.
pub struct Pressure {
    /// How many (core, reason) flags are on.
    on: AtomicUsize,
    /// How many times a flag turned on since start.
    episodes: std::sync::atomic::AtomicU64,
    flags: Vec<[AtomicBool; 3]>,
    /// Each core's resume task, woken when the pressure goes off.
    wakers: Vec<AtomicWaker>,
}

impl Pressure {
    /// A signal for `cores` cores, off.
    pub fn new(cores: usize) -> Pressure {
        Pressure {
            on: AtomicUsize::new(0),
            episodes: std::sync::atomic::AtomicU64::new(0),
            flags: (0..cores)
                .map(|_| std::array::from_fn(|_| AtomicBool::new(false)))
                .collect(),
            wakers: (0..cores).map(|_| AtomicWaker::new()).collect(),
        }
    }

    /// Whether readers must pause. One relaxed load: cheap enough for every read.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed) > 0
    }

    /// How many times a core turned the pressure on (for a reason) since start.
    pub fn episodes(&self) -> u64 {
        self.episodes.load(Ordering::Relaxed)
    }

    /// Whether `core` has `reason` on.
    pub fn has(&self, core: usize, reason: Reason) -> bool {
        self.flags[core][reason as usize].load(Ordering::SeqCst)
    }

    /// Sets or clears one flag; returns true when this call turned it on. Clearing the last
    /// flag wakes every core's resume task.
    pub fn set(&self, core: usize, reason: Reason, on: bool) -> bool {
        let flag = &self.flags[core][reason as usize];
        if flag.swap(on, Ordering::SeqCst) == on {
            return false;
        }
        if on {
            self.on.fetch_add(1, Ordering::SeqCst);
            self.episodes.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            if self.on.fetch_sub(1, Ordering::SeqCst) == 1 {
                for w in &self.wakers {
                    w.wake();
                }
            }
            false
        }
    }

    /// Waits until the pressure is off (for `core`'s resume task).
    pub async fn off(&self, core: usize) {
        poll_fn(|cx| {
            if !self.is_on() {
                return Poll::Ready(());
            }
            self.wakers[core].register(cx.waker());
            if self.is_on() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

struct Shared {
    waker: AtomicWaker,
    /// Messages sent to this mailbox and not yet handled.
    depth: AtomicUsize,
    /// The highest depth seen.
    peak: AtomicUsize,
}

/// The sending side of one core's mailbox. Cheap to clone; `Send`.
pub struct MailboxSender<T> {
    tx: Sender<Vec<T>>,
    shared: Arc<Shared>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The receiving side, owned by the core.
pub struct Mailbox<T> {
    rx: Receiver<Vec<T>>,
    shared: Arc<Shared>,
    /// This core's id in [`Pressure`].
    core: usize,
    limit: usize,
    pressure: Arc<Pressure>,
}

/// A new mailbox for core `core`, holding at most about `limit` messages before it turns
/// `pressure` on.
pub fn mailbox<T>(
    core: usize,
    limit: usize,
    pressure: Arc<Pressure>,
) -> (MailboxSender<T>, Mailbox<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        waker: AtomicWaker::new(),
        depth: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    (
        MailboxSender {
            tx,
            shared: shared.clone(),
        },
        Mailbox {
            rx,
            shared,
            core,
            limit: limit.max(1),
            pressure,
        },
    )
}

impl<T> MailboxSender<T> {
    /// Sends a batch and wakes the receiver once. Returns false when the receiver is gone
    /// (its core has stopped). Not bounded: see [`send_bounded`] for routed traffic.
    pub fn send_batch(&self, batch: Vec<T>) -> bool {
        let n = batch.len();
        // Counted before it can be handled, so the receiver never subtracts first.
        let depth = self.shared.depth.fetch_add(n, Ordering::SeqCst) + n;
        self.shared.peak.fetch_max(depth, Ordering::Relaxed);
        let ok = self.tx.send(batch).is_ok();
        if !ok {
            self.shared.depth.fetch_sub(n, Ordering::SeqCst);
        }
        self.shared.waker.wake();
        ok
    }

    /// Messages queued and not yet handled.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// The highest depth since start.
    pub fn peak(&self) -> usize {
        self.shared.peak.load(Ordering::Relaxed)
    }
}

/// Sends a batch to core `to`'s mailbox and turns the pressure on when that takes the mailbox
/// past `limit`. The receiver turns it off (see [`Mailbox::handled`]), after being woken by
/// this very send, so a flag set here is always re-examined.
pub fn send_bounded<T>(
    to: usize,
    sender: &MailboxSender<T>,
    batch: Vec<T>,
    limit: usize,
    pressure: &Pressure,
) -> bool {
    let n = batch.len();
    let before = sender.shared.depth.load(Ordering::Relaxed);
    if before + n > limit && !pressure.has(to, Reason::Mailbox) {
        pressure.set(to, Reason::Mailbox, true);
    }
    sender.send_batch(batch)
}

impl<T> Mailbox<T> {
    /// Waits for at least one batch and returns every batch queued so far; `None` when
    /// every sender is gone. Call [`Mailbox::handled`] for each batch once it is handled.
    pub async fn recv_all(&self, out: &mut Vec<Vec<T>>) -> Option<()> {
        poll_fn(|cx| {
            loop {
                match self.rx.try_recv() {
                    Ok(b) => out.push(b),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return Poll::Ready(if out.is_empty() { None } else { Some(()) })
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(()));
            }
            self.settle();
            self.shared.waker.register(cx.waker());
            // A batch may have landed between the drain and the registration.
            match self.rx.try_recv() {
                Ok(b) => {
                    out.push(b);
                    Poll::Ready(Some(()))
                }
                Err(TryRecvError::Empty) => Poll::Pending,
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
            }
        })
        .await
    }

    /// `n` messages of a received batch are handled: lowers the depth, and turns this core's
    /// pressure off once the depth is down to half the limit.
    pub fn handled(&self, n: usize) {
        self.shared.depth.fetch_sub(n, Ordering::SeqCst);
        self.settle();
    }

    fn settle(&self) {
        if self.pressure.has(self.core, Reason::Mailbox)
            && self.shared.depth.load(Ordering::SeqCst) <= self.limit / 2
        {
            self.pressure.set(self.core, Reason::Mailbox, false);
        }
    }

    /// Messages queued and not yet handled.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_turns_on_past_the_limit_and_off_at_half() {
        let p = Arc::new(Pressure::new(2));
        let (tx, rx) = mailbox::<u32>(1, 10, p.clone());
        assert!(send_bounded(1, &tx, vec![1; 8], 10, &p));
        assert!(!p.is_on());
        assert!(send_bounded(1, &tx, vec![2; 4], 10, &p));
        assert!(p.is_on(), "12 queued against a limit of 10");
        assert_eq!(rx.depth(), 12);
        // Handling 6 leaves 6: still over half the limit.
        rx.handled(6);
        assert!(p.is_on());
        rx.handled(1);
        assert!(!p.is_on(), "5 left: off again");
        assert_eq!(tx.depth(), 5);
    }

    #[test]
    fn two_reasons_must_both_clear() {
        let p = Pressure::new(2);
        assert!(p.set(0, Reason::Mailbox, true));
        assert!(p.set(1, Reason::QueuedBytes, true));
        assert!(!p.set(1, Reason::QueuedBytes, true), "already on");
        p.set(0, Reason::Mailbox, false);
        assert!(p.is_on());
        p.set(1, Reason::QueuedBytes, false);
        assert!(!p.is_on());
    }
}
