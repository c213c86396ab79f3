//! Cross-core mailboxes: a crossbeam channel of batches plus one waker per core.
//!
//! Senders push a whole batch, then wake the receiving core once. The receiver drains
//! everything with `try_recv` before registering its waker again, and checks the channel once
//! more after registering, so a batch sent in between is never missed. A wake from another
//! thread is legal because monoio is built with its `sync` feature.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// The sending side of one core's mailbox. Cheap to clone; `Send`.
pub struct MailboxSender<T> {
    tx: Sender<Vec<T>>,
    waker: Arc<AtomicWaker>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

/// The receiving side, owned by the core.
pub struct Mailbox<T> {
    rx: Receiver<Vec<T>>,
    waker: Arc<AtomicWaker>,
}

/// A new mailbox.
pub fn mailbox<T>() -> (MailboxSender<T>, Mailbox<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        MailboxSender {
            tx,
            waker: waker.clone(),
        },
        Mailbox { rx, waker },
    )
}

impl<T> MailboxSender<T> {
    /// Sends a batch and wakes the receiver once. Returns false when the receiver is gone
    /// (its core has stopped).
    pub fn send_batch(&self, batch: Vec<T>) -> bool {
        let ok = self.tx.send(batch).is_ok();
        self.waker.wake();
        ok
    }
}

impl<T> Mailbox<T> {
    /// Waits for at least one batch and returns every batch queued so far; `None` when
    /// every sender is gone.
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
            self.waker.register(cx.waker());
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
}
