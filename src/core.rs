//! One core's state and the router: connection slab, user directory, cross-core batches.
//!
//! # The user directory
//!
//! Each user id is *owned* by one core, `hash(user) % cores`. The owner keeps the list of
//! that user's connection keys, wherever the connections live. A connection registers with its
//! user's owner before it is welcomed (the owner confirms with `Registered`), and unregisters
//! after it closed. A `send` goes to the owner, which counts the keys (the `delivered` of the
//! ack), and forwards one `Deliver` per destination core carrying the frame encoded once.
//!
//! Why this is correct under concurrent connects and disconnects of one user on several cores:
//! * registration and removal name one exact generational key; removing connection A's key
//!   never touches connection B's, whatever order they arrive in;
//! * a core's messages to another core travel one FIFO channel, so a connection's
//!   `Unregister` never overtakes its `Register`, and one sender's messages to one user stay
//!   in order (sender core → owner core → recipient core, each hop FIFO);
//! * a key that went stale while a `Deliver` was in flight misses in the slab: a no-op.
//!
//! Cost: a send to a user owned elsewhere crosses twice (to the owner, then to the recipient's
//! core if that is not the owner). Every hop is batched: messages bound for one core during
//! one scheduler pass travel as one batch with one wake.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::config::Config;
use crate::conn::{CloseReq, ConnShared, Push};
use crate::key::{ConnKey, GenSlab};
use crate::mailbox::{Mailbox, MailboxSender};
use crate::protocol;
use crate::stats::{self, CoreStats};

/// Keys of one user's connections, kept sorted so that keys of one core are contiguous.
type KeyList = SmallVec<[ConnKey; 2]>;

/// Who is waiting for a routed message's outcome.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A WebSocket request with an `id`: send it an `ack` with the `delivered` count.
    Ack {
        /// The requesting connection.
        conn: ConnKey,
        /// The request's `id`, raw JSON.
        id: Box<RawValue>,
    },
}

/// What cores send each other.
#[derive(Debug)]
pub(crate) enum CoreMsg {
    /// To a user's owner: add this connection to the user's directory entry.
    Register { user: Box<str>, key: ConnKey },
    /// To a connection's core: its registration is in place; it may be welcomed.
    Registered { key: ConnKey },
    /// To a user's owner: remove exactly this connection from the user's entry.
    Unregister { user: Box<str>, key: ConnKey },
    /// To a user's owner: deliver a frame to every connection of the user.
    Route {
        user: Box<str>,
        frame: Bytes,
        reply: Option<Reply>,
    },
    /// To a connection's core: hand the frame to each of these connections.
    Deliver {
        keys: SmallVec<[ConnKey; 4]>,
        frame: Bytes,
    },
    /// Stop accepting and close every connection with 1001.
    Shutdown,
}

/// What all cores share (read-only after start, apart from atomics).
pub(crate) struct Shared {
    pub config: Config,
    pub cores: usize,
    pub mailboxes: Vec<MailboxSender<CoreMsg>>,
    pub stats: Vec<CoreStats>,
    pub shutdown: AtomicBool,
}

impl Shared {
    /// The core that owns `user`'s directory entry. Deterministic across cores (SipHash with
    /// fixed keys); the maps themselves use random seeds against hash flooding.
    pub fn owner_of(&self, user: &str) -> usize {
        if self.cores == 1 {
            return 0;
        }
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        user.hash(&mut h);
        (h.finish() % self.cores as u64) as usize
    }

    /// Asks every core to shut down.
    pub fn trigger_shutdown(&self) {
        if self.shutdown.swap(true, Ordering::SeqCst) {
            return;
        }
        for mb in &self.mailboxes {
            mb.send_batch(vec![CoreMsg::Shutdown]);
        }
    }
}

/// A connection as the core's slab holds it.
pub(crate) struct ConnEntry {
    /// The authenticated user; `None` for echo connections (not in the directory).
    pub user: Option<Rc<str>>,
    /// State shared with the connection's reader and writer.
    pub conn: Rc<ConnShared>,
}

/// One core: everything here is touched only by this core's thread.
pub(crate) struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub conns: RefCell<GenSlab<ConnEntry>>,
    directory: RefCell<HashMap<Box<str>, KeyList>>,
    outbox: RefCell<Vec<Vec<CoreMsg>>>,
    flush_pending: Cell<bool>,
    flush_waker: Cell<Option<Waker>>,
    /// Per-core read buffer: connections read into it and keep only unfinished frames.
    pub scratch: RefCell<Vec<u8>>,
    pub shutting_down: Cell<bool>,
    /// Woken when shutdown starts and whenever a connection is removed during shutdown.
    drain_waker: Cell<Option<Waker>>,
    accept_canceller: RefCell<Option<monoio::io::Canceller>>,
}

/// Size of the per-core read buffer.
const SCRATCH: usize = 64 * 1024;

impl Core {
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Core> {
        let cores = shared.cores;
        Rc::new(Core {
            id,
            shared,
            conns: RefCell::new(GenSlab::new(id)),
            directory: RefCell::new(HashMap::new()),
            outbox: RefCell::new((0..cores).map(|_| Vec::new()).collect()),
            flush_pending: Cell::new(false),
            flush_waker: Cell::new(None),
            scratch: RefCell::new(vec![0; SCRATCH]),
            shutting_down: Cell::new(false),
            drain_waker: Cell::new(None),
            accept_canceller: RefCell::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn stats(&self) -> &CoreStats {
        &self.shared.stats[self.id]
    }

    pub fn set_accept_canceller(&self, c: monoio::io::Canceller) {
        *self.accept_canceller.borrow_mut() = Some(c);
    }

    // ---- cross-core batching -------------------------------------------------------------

    /// Queues a message for another core; the flusher sends it with everything else queued
    /// for that core in this scheduler pass.
    fn post(&self, core: usize, msg: CoreMsg) {
        debug_assert_ne!(core, self.id);
        self.outbox.borrow_mut()[core].push(msg);
        if !self.flush_pending.replace(true) {
            if let Some(w) = self.flush_waker.take() {
                w.wake();
            }
        }
    }

    /// The flusher task: after the tasks that queued messages have run, send each core's
    /// batch with a single wake.
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            poll_fn(|cx| {
                if self.flush_pending.get() {
                    Poll::Ready(())
                } else {
                    self.flush_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            self.flush_pending.set(false);
            let batches: Vec<(usize, Vec<CoreMsg>)> = self
                .outbox
                .borrow_mut()
                .iter_mut()
                .enumerate()
                .filter(|(_, b)| !b.is_empty())
                .map(|(i, b)| (i, std::mem::take(b)))
                .collect();
            for (core, batch) in batches {
                stats::inc(&self.stats().batches_sent);
                stats::add(&self.stats().batched_messages, batch.len() as u64);
                self.shared.mailboxes[core].send_batch(batch);
            }
        }
    }

    /// The mailbox task: applies every batch other cores sent here.
    pub async fn run_mailbox(self: Rc<Self>, mailbox: Mailbox<CoreMsg>) {
        let mut batches = Vec::new();
        while mailbox.recv_all(&mut batches).await.is_some() {
            for batch in batches.drain(..) {
                for msg in batch {
                    self.handle(msg);
                }
            }
        }
    }

    fn handle(&self, msg: CoreMsg) {
        match msg {
            CoreMsg::Register { user, key } => self.directory_add(user, key),
            CoreMsg::Registered { key } => self.on_registered(key),
            CoreMsg::Unregister { user, key } => self.directory_remove(&user, key),
            CoreMsg::Route { user, frame, reply } => self.route_owned(&user, frame, reply),
            CoreMsg::Deliver { keys, frame } => {
                for key in keys {
                    self.deliver_local(key, frame.clone());
                }
            }
            CoreMsg::Shutdown => self.begin_shutdown(),
        }
    }

    // ---- directory -----------------------------------------------------------------------

    /// Registers a connection of `user`; the connection is told through
    /// [`ConnShared::set_registered`] once the owner has it.
    pub fn register(&self, user: &str, key: ConnKey) {
        let owner = self.shared.owner_of(user);
        if owner == self.id {
            self.directory_add(user.into(), key);
        } else {
            self.post(
                owner,
                CoreMsg::Register {
                    user: user.into(),
                    key,
                },
            );
        }
    }

    /// Removes exactly this connection from `user`'s entry (a no-op if it is not there).
    pub fn unregister(&self, user: &str, key: ConnKey) {
        let owner = self.shared.owner_of(user);
        if owner == self.id {
            self.directory_remove(user, key);
        } else {
            self.post(
                owner,
                CoreMsg::Unregister {
                    user: user.into(),
                    key,
                },
            );
        }
    }

    fn directory_add(&self, user: Box<str>, key: ConnKey) {
        {
            let mut dir = self.directory.borrow_mut();
            let keys = dir.entry(user).or_insert_with(|| {
                stats::add_gauge(&self.stats().users, 1);
                KeyList::new()
            });
            if let Err(pos) = keys.binary_search(&key) {
                keys.insert(pos, key);
            }
        }
        if key.core() == self.id {
            self.on_registered(key);
        } else {
            self.post(key.core(), CoreMsg::Registered { key });
        }
    }

    fn directory_remove(&self, user: &str, key: ConnKey) {
        let mut dir = self.directory.borrow_mut();
        if let Some(keys) = dir.get_mut(user) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                dir.remove(user);
                stats::add_gauge(&self.stats().users, -1);
            }
        }
    }

    fn on_registered(&self, key: ConnKey) {
        if let Some(entry) = self.conns.borrow().get(key) {
            entry.conn.set_registered();
        }
    }

    // ---- routing -------------------------------------------------------------------------

    /// Delivers `frame` to every connection of `to`; `reply` learns how many there were.
    pub fn send_to_user(&self, to: &str, frame: Bytes, reply: Option<Reply>) {
        let owner = self.shared.owner_of(to);
        if owner == self.id {
            self.route_owned(to, frame, reply);
        } else {
            self.post(
                owner,
                CoreMsg::Route {
                    user: to.into(),
                    frame,
                    reply,
                },
            );
        }
    }

    /// On the owner: fan out to the user's connections, one `Deliver` per remote core.
    fn route_owned(&self, user: &str, frame: Bytes, reply: Option<Reply>) {
        let keys: KeyList = self
            .directory
            .borrow()
            .get(user)
            .cloned()
            .unwrap_or_default();
        let delivered = keys.len() as u64;
        for group in keys.chunk_by(|a, b| a.core() == b.core()) {
            let core = group[0].core();
            if core == self.id {
                for key in group {
                    self.deliver_local(*key, frame.clone());
                }
            } else {
                self.post(
                    core,
                    CoreMsg::Deliver {
                        keys: group.iter().copied().collect(),
                        frame: frame.clone(),
                    },
                );
            }
        }
        stats::add(&self.stats().deliveries, delivered);
        match reply {
            Some(Reply::Ack { conn, id }) => {
                self.deliver_to(conn, protocol::ack(&id, Some(delivered)));
            }
            None => {}
        }
    }

    /// Delivers one frame to one connection on any core.
    pub fn deliver_to(&self, key: ConnKey, frame: Bytes) {
        if key.core() == self.id {
            self.deliver_local(key, frame);
        } else {
            self.post(
                key.core(),
                CoreMsg::Deliver {
                    keys: smallvec::smallvec![key],
                    frame,
                },
            );
        }
    }

    /// Hands a frame to a connection of this core. A stale key is a no-op.
    pub fn deliver_local(&self, key: ConnKey, frame: Bytes) {
        let conn = match self.conns.borrow().get(key) {
            Some(entry) => entry.conn.clone(),
            None => return,
        };
        self.push_to(&conn, frame);
    }

    /// Queues a frame on a connection, closing it as a slow consumer on overflow.
    pub fn push_to(&self, conn: &ConnShared, frame: Bytes) {
        match conn.push(frame, self.config().max_queued_bytes) {
            Push::Queued => stats::inc(&self.stats().messages_out),
            Push::Overflow => stats::inc(&self.stats().slow_consumer_closes),
            Push::Closed => {}
        }
    }

    // ---- connection life -----------------------------------------------------------------

    /// Forgets a closed connection: slab slot and directory entry. Idempotent: with a stale
    /// key nothing happens.
    pub fn remove_conn(&self, key: ConnKey) {
        let removed = self.conns.borrow_mut().remove(key);
        if let Some(entry) = removed {
            stats::add_gauge(&self.stats().connections, -1);
            if let Some(user) = &entry.user {
                self.unregister(user, key);
            }
        }
        if self.shutting_down.get() {
            if let Some(w) = self.drain_waker.take() {
                w.wake();
            }
        }
    }

    fn begin_shutdown(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        if let Some(c) = self.accept_canceller.borrow_mut().take() {
            c.cancel();
        }
        let conns: Vec<Rc<ConnShared>> = self
            .conns
            .borrow()
            .iter()
            .map(|(_, e)| e.conn.clone())
            .collect();
        for conn in conns {
            conn.request_close(CloseReq::initiate(1001, "server shutting down", true));
        }
        if let Some(w) = self.drain_waker.take() {
            w.wake();
        }
    }

    /// The liveness sweeper: one pass over this core's connections per tick sends due pings,
    /// closes idle connections with 4000 and expires stuck close handshakes. One task per
    /// core instead of one timer per connection (a monoio timer is 640 bytes; a pass over
    /// 10,000 connections takes tens of microseconds).
    pub async fn run_sweeper(self: Rc<Self>) {
        let ping = self.config().ping_interval;
        let idle = self.config().idle_timeout;
        let tick = (ping.min(idle) / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            monoio::time::sleep(tick).await;
            let now = std::time::Instant::now();
            let mut idle_closed = 0;
            for (_, entry) in self.conns.borrow().iter() {
                idle_closed += u64::from(entry.conn.sweep(now, ping, idle));
            }
            stats::add(&self.stats().idle_closes, idle_closed);
        }
    }

    /// Resolves once shutdown has begun and every connection of this core is gone.
    pub async fn drained(&self) {
        poll_fn(|cx| {
            if self.shutting_down.get() && self.conns.borrow().is_empty() {
                Poll::Ready(())
            } else {
                self.drain_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_started(&self) {
        poll_fn(|cx| {
            if self.shutting_down.get() {
                Poll::Ready(())
            } else {
                self.drain_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}
