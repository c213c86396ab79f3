//! One core: the glue between the I/O-free router ([`crate::route`]) and the runtime.
//!
//! The core feeds its router events (a connection registered or removed, a client's request,
//! a batch from another core's mailbox, an API call) and carries out the actions it answers
//! with: frames pushed to connections' queues, messages posted to other cores in batches
//! (one batch and one wake per destination per scheduler pass), registrations settled, API
//! calls answered. Everything else here is the core's runtime life: the flusher, the mailbox
//! task, the liveness sweeper, backpressure and shutdown. The routing rules themselves, and
//! why they are correct, are in src/route.rs.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::key::{ConnKey, GenSlab};
use crate::mailbox::{self, Mailbox, MailboxSender, Pressure, Reason};
use crate::outbox::{wait_until, CloseReq, ConnShared, Millis, Push};
use crate::route::{Action, Joined, Limits, Msg, Owners, Reply, Router};
use crate::stats::{self, CoreStats, Snapshot};

/// What all cores share (read-only after start, apart from atomics).
pub(crate) struct Shared {
    pub config: Config,
    pub cores: usize,
    pub mailboxes: Vec<MailboxSender<Msg>>,
    pub stats: Vec<Arc<CoreStats>>,
    pub shutdown: AtomicBool,
    /// Open WebSocket connections over all cores, for `--max-connections` (touched once per
    /// connect and disconnect, never per message).
    pub total_connections: std::sync::atomic::AtomicUsize,
    /// Open not-yet-upgraded and plain-HTTP connections over all cores, for
    /// `--max-http-connections` (touched once per connection).
    pub http_connections: std::sync::atomic::AtomicUsize,
    /// On while any queue is over its bound: cores stop reading from clients.
    pub pressure: Arc<Pressure>,
    /// Which core owns a user or a room (keyed at random per process).
    pub owners: Owners,
    /// `--tls-cert`/`--tls-key`: every connection is TLS. Read once per handshake.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Cluster mode: the broker bridge (`None` without `--cluster`).
    pub cluster: Option<Arc<crate::cluster::ClusterShared>>,
}

impl Shared {
    /// Each core's share of `--max-total-queued-bytes`.
    pub fn queued_bytes_share(&self) -> usize {
        (self.config.max_total_queued_bytes / self.cores).max(1)
    }

    /// Asks every core to shut down.
    pub fn trigger_shutdown(&self) {
        if self.shutdown.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(c) = &self.cluster {
            // The other nodes stop counting on this one at once.
            c.leaving.store(true, Ordering::SeqCst);
        }
        for mb in &self.mailboxes {
            mb.send_batch(vec![Msg::Shutdown]);
        }
    }

    /// Every core's counters (mailbox depths included) and their sum.
    pub fn snapshot(&self) -> (Snapshot, Vec<Snapshot>) {
        let per_core: Vec<Snapshot> = self
            .stats
            .iter()
            .zip(&self.mailboxes)
            .map(|(s, mb)| {
                let mut snap = s.snapshot();
                snap.mailbox_depth = mb.depth() as i64;
                snap.mailbox_peak = mb.peak() as i64;
                snap
            })
            .collect();
        (Snapshot::total(&per_core), per_core)
    }

    /// `GET /api/stats`: totals and per-core counters as JSON.
    pub fn stats_json(&self) -> String {
        let (total, cores) = self.snapshot();
        let mut v = serde_json::json!({
            "connections": total.connections,
            "users": total.users,
            "total": total,
            "cores": cores,
        });
        if let Some(c) = &self.cluster {
            v["cluster"] = c.json();
        }
        v.to_string()
    }
}

/// A one-shot count for a local task to await.
#[derive(Default)]
pub(crate) struct Slot {
    value: Cell<Option<u64>>,
    waker: Cell<Option<Waker>>,
}

impl Slot {
    fn set(&self, v: u64) {
        self.value.set(Some(v));
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits for the count.
    pub async fn wait(&self) -> u64 {
        poll_fn(|cx| match self.value.get() {
            Some(v) => Poll::Ready(v),
            None => {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// An API call waiting for its count; forgets its slot however the wait ends (a late count
/// then misses, like every stale key).
pub(crate) struct ApiCall<'a> {
    core: &'a Core,
    token: ConnKey,
    /// Where the count arrives.
    pub slot: Rc<Slot>,
}

impl Drop for ApiCall<'_> {
    fn drop(&mut self) {
        self.core.slots.borrow_mut().remove(self.token);
    }
}

/// The router as this core runs it: connections are the tasks' shared state.
type CoreRouter = Router<Rc<ConnShared>>;

/// One core: everything here is touched only by this core's thread.
pub(crate) struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    router: RefCell<CoreRouter>,
    /// Actions taken from the router and not yet carried out (reused buffer).
    actions: RefCell<Vec<Action<Rc<ConnShared>>>>,
    /// API calls waiting for counts, by token.
    slots: RefCell<GenSlab<Rc<Slot>>>,
    outbox: RefCell<Vec<Vec<Msg>>>,
    flush_pending: Cell<bool>,
    flush_waker: Cell<Option<Waker>>,
    /// Per-core read buffer: connections read into it and keep only unfinished frames.
    pub scratch: RefCell<Vec<u8>>,
    /// The io_uring data path of this core (src/ring.rs), when the worker runs on io_uring.
    pub ring: RefCell<Option<Rc<crate::ring::Ring>>>,
    pub shutting_down: Cell<bool>,
    /// Woken when shutdown starts and whenever a connection is removed during shutdown.
    drain_waker: Cell<Option<Waker>>,
    accept_canceller: RefCell<Option<monoio::io::Canceller>>,
    /// The core's listening socket, shut at shutdown (see [`Core::begin_shutdown`]).
    pub listener_fd: Cell<Option<std::os::fd::RawFd>>,
    /// Outbound bytes queued on this core's connections (the gateway-wide bound's share).
    queued_bytes: Cell<usize>,
    /// The most ever queued.
    queued_peak: Cell<usize>,
    /// Some connection of this core paused reading under backpressure.
    any_paused: Cell<bool>,
    /// The resume task, parked until a connection pauses.
    resume_waker: Cell<Option<Waker>>,
    /// Plain-HTTP connections of this core (counted in `Shared::http_connections` too).
    pub http_open: Cell<usize>,
    /// Tasks waiting on something that shutdown must cut short (a keep-alive wait, an API
    /// call's counts), woken when it begins.
    shutdown_waiters: RefCell<slab::Slab<Waker>>,
}

/// Size of the per-core read buffer.
const SCRATCH: usize = 64 * 1024;

impl Core {
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Core> {
        let cores = shared.cores;
        let limits = Limits {
            max_rooms_per_conn: shared.config.max_rooms_per_conn,
            max_connections_per_user: shared.config.max_connections_per_user,
        };
        let mut router = Router::new(id, shared.owners, limits, shared.stats[id].clone());
        router.set_cluster(shared.cluster.is_some());
        Rc::new(Core {
            id,
            router: RefCell::new(router),
            actions: RefCell::new(Vec::new()),
            slots: RefCell::new(GenSlab::new(id)),
            outbox: RefCell::new((0..cores).map(|_| Vec::new()).collect()),
            flush_pending: Cell::new(false),
            flush_waker: Cell::new(None),
            scratch: RefCell::new(vec![0; SCRATCH]),
            ring: RefCell::new(None),
            shutting_down: Cell::new(false),
            drain_waker: Cell::new(None),
            accept_canceller: RefCell::new(None),
            listener_fd: Cell::new(None),
            queued_bytes: Cell::new(0),
            queued_peak: Cell::new(0),
            any_paused: Cell::new(false),
            resume_waker: Cell::new(None),
            http_open: Cell::new(0),
            shutdown_waiters: RefCell::new(slab::Slab::new()),
            shared,
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

    // ---- the router and its actions --------------------------------------------------------

    /// Feeds the router one event, then carries out every action it produced.
    fn route<R>(&self, event: impl FnOnce(&mut CoreRouter) -> R) -> R {
        let r = event(&mut self.router.borrow_mut());
        self.run_actions();
        // Room messages the router gathers go out when the flusher runs: after the tasks
        // that are ready now, e.g. after every publish of a read or of a mailbox batch.
        if self.router.borrow().has_fanout() {
            self.wake_flusher();
        }
        r
    }

    /// Carries out the router's actions, with the router unborrowed (an action may lead
    /// back into it, e.g. shutdown walking the connections).
    fn run_actions(&self) {
        loop {
            let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
            self.router.borrow_mut().take_actions(&mut actions);
            if actions.is_empty() {
                *self.actions.borrow_mut() = actions;
                return;
            }
            for action in actions.drain(..) {
                match action {
                    Action::Push { conn, frame } => self.push_to(&conn, frame),
                    Action::Fanout { conns, frames } => self.push_fanout(&conns, frames),
                    Action::Post { core, msg } => self.post(core, msg),
                    Action::Registered { conn, ok } => conn.set_registered(ok),
                    Action::Kick { conn } => conn.request_close(CloseReq::initiate(
                        1008,
                        "disconnected by the server",
                        true,
                    )),
                    Action::Answer { token, n } => {
                        let slot = self.slots.borrow().get(ConnKey::from_u64(token)).cloned();
                        if let Some(slot) = slot {
                            slot.set(n);
                        }
                    }
                    Action::Shutdown => self.begin_shutdown(),
                    Action::Cluster(out) => self.hand_to_bridge(out),
                }
            }
            *self.actions.borrow_mut() = actions;
        }
    }

    /// Hands something to the broker bridge. A request the bridge cannot take (its queue is
    /// full) counts 0 for the other nodes at once: the core never blocks.
    fn hand_to_bridge(&self, out: crate::route::ClusterOut) {
        let Some(c) = &self.shared.cluster else {
            return;
        };
        if let Err(crate::route::ClusterOut::Request {
            waiter: Some(waiter),
            ..
        }) = c.submit(self.id, out)
        {
            self.router.borrow_mut().handle(Msg::Count { waiter, n: 0 });
        }
    }

    /// Runs `f` over this core's connections (sweeper, resume, shutdown).
    fn each_conn(&self, mut f: impl FnMut(&Rc<ConnShared>)) {
        let conns: Vec<Rc<ConnShared>> = self
            .router
            .borrow()
            .conns()
            .iter()
            .map(|(_, e)| e.handle.clone())
            .collect();
        for c in &conns {
            f(c);
        }
    }

    // ---- cross-core batching -------------------------------------------------------------

    /// Queues a message for another core; the flusher sends it with everything else queued
    /// for that core in this scheduler pass.
    fn post(&self, core: usize, msg: Msg) {
        debug_assert_ne!(core, self.id);
        let queued = {
            let mut outbox = self.outbox.borrow_mut();
            outbox[core].push(msg);
            outbox[core].len()
        };
        // Messages waiting for the flusher count against the destination's limit too: on
        // the epoll driver a connection may read many times before the flusher runs, and
        // every read must already see the pressure. (The destination turns it off once it
        // has handled them.)
        if queued >= self.config().mailbox_limit && !self.shared.pressure.has(core, Reason::Mailbox)
        {
            self.shared.pressure.set(core, Reason::Mailbox, true);
        }
        self.wake_flusher();
    }

    fn wake_flusher(&self) {
        if !self.flush_pending.replace(true) {
            if let Some(w) = self.flush_waker.take() {
                w.wake();
            }
        }
    }

    /// The flusher task: after the tasks that queued messages have run, sends each core's
    /// batch with a single wake, then hands the room messages gathered meanwhile to their
    /// members here (one queue entry per member).
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            wait_until(&self.flush_waker, || self.flush_pending.get()).await;
            self.flush_pending.set(false);
            let batches: Vec<(usize, Vec<Msg>)> = self
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
                mailbox::send_bounded(
                    core,
                    &self.shared.mailboxes[core],
                    batch,
                    self.config().mailbox_limit,
                    &self.shared.pressure,
                );
            }
            // The other cores first: their fan-out then runs while this core writes to its
            // own members. (Handing out room messages posts nothing.)
            self.route(|r| r.flush_fanout());
        }
    }

    /// The mailbox task: applies every batch other cores sent here.
    pub async fn run_mailbox(self: Rc<Self>, mailbox: Mailbox<Msg>) {
        let mut batches = Vec::new();
        while mailbox.recv_all(&mut batches).await.is_some() {
            for batch in batches.drain(..) {
                let n = batch.len();
                self.route(|r| {
                    for msg in batch {
                        r.handle(msg);
                    }
                });
                mailbox.handled(n);
            }
        }
    }

    // ---- what connections ask --------------------------------------------------------------

    /// Adds a connection of this core (`Err` when the table is full).
    pub fn insert_conn(
        &self,
        user: Option<Rc<str>>,
        conn: Rc<ConnShared>,
    ) -> Result<ConnKey, Rc<ConnShared>> {
        self.router.borrow_mut().insert(user, conn)
    }

    /// Registers a user connection with its owner; the connection is told through
    /// [`ConnShared::set_registered`] once the owner has it.
    pub fn register(&self, key: ConnKey) {
        self.route(|r| r.register(key));
    }

    /// Forgets a closed connection: slab slot, rooms, directory entry. Idempotent: with a
    /// stale key nothing happens.
    pub fn remove_conn(&self, key: ConnKey) {
        let removed = self.route(|r| r.remove(key));
        if removed.is_some() {
            stats::add_gauge(&self.stats().connections, -1);
            self.shared
                .total_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.shutting_down.get() {
            if let Some(w) = self.drain_waker.take() {
                w.wake();
            }
        }
    }

    /// Delivers `frame` to every connection of `to`; `reply` learns how many there were.
    pub fn send_to_user(&self, to: &str, frame: Bytes, reply: Option<Reply>) {
        self.route(|r| r.send(to, frame, reply));
    }

    /// Publishes to every member of `room` on every core.
    pub fn publish(&self, room: &str, frame: Bytes, ack: Option<(ConnKey, Box<RawValue>)>) {
        self.route(|r| r.publish(room, frame, ack));
    }

    /// Makes a connection of this core a member of `room`; acks `id` when it is effective.
    pub fn join(&self, key: ConnKey, room: &str, id: Option<&RawValue>) -> Joined {
        self.route(|r| r.join(key, room, id))
    }

    /// Ends a membership (a no-op when there is none).
    pub fn leave(&self, key: ConnKey, room: &str) {
        self.route(|r| r.leave(key, room));
    }

    /// Queues a frame on a connection, closing it as a slow consumer on overflow.
    pub fn push_to(&self, conn: &ConnShared, frame: Bytes) {
        let len = frame.len();
        match conn.push(frame, self.config().max_queued_bytes) {
            Push::Queued => {
                stats::inc(&self.stats().messages_out);
                self.queued_add(len);
            }
            Push::Overflow => stats::inc(&self.stats().slow_consumer_closes),
            Push::Closed => {}
        }
    }

    /// Queues `frames` on each of `conns` (room members), joined into one buffer: one queue
    /// entry, one reference count and, for the writer, one piece of a write per member,
    /// however many messages. Counted per message, like [`Core::push_to`].
    fn push_fanout(&self, conns: &[Rc<ConnShared>], mut frames: Vec<Bytes>) {
        let messages = frames.len() as u64;
        let frame = if frames.len() == 1 {
            frames.pop().expect("one frame")
        } else {
            let mut joined = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
            for f in &frames {
                joined.extend_from_slice(f);
            }
            Bytes::from(joined)
        };
        let max = self.config().max_queued_bytes;
        let (mut queued, mut overflows) = (0u64, 0u64);
        for conn in conns {
            match conn.push(frame.clone(), max) {
                Push::Queued => queued += 1,
                Push::Overflow => overflows += 1,
                Push::Closed => {}
            }
        }
        if queued > 0 {
            stats::add(&self.stats().messages_out, queued * messages);
            self.queued_add(frame.len() * queued as usize);
        }
        if overflows > 0 {
            stats::add(&self.stats().slow_consumer_closes, overflows);
        }
    }

    // ---- backend API ---------------------------------------------------------------------

    /// Starts an API call: `start` gives the router the call's token.
    fn api(&self, start: impl FnOnce(&mut CoreRouter, u64)) -> ApiCall<'_> {
        let slot = Rc::new(Slot::default());
        let token = self.slots.borrow_mut().insert(slot.clone());
        match token {
            Ok(token) => {
                self.route(|r| start(r, token.as_u64()));
                ApiCall {
                    core: self,
                    token,
                    slot,
                }
            }
            Err(slot) => {
                // The table is full (millions of calls in flight): answered at once, empty.
                slot.set(0);
                ApiCall {
                    core: self,
                    token: ConnKey::new(self.id, 0, 0),
                    slot,
                }
            }
        }
    }

    /// `POST /api/send`.
    pub fn api_send(&self, user: &str, frame: Bytes) -> ApiCall<'_> {
        self.api(|r, t| r.api_send(user, frame, t))
    }

    /// `POST /api/publish`.
    pub fn api_publish(&self, room: &str, frame: Bytes) -> ApiCall<'_> {
        self.api(|r, t| r.api_publish(room, frame, t))
    }

    /// `POST /api/broadcast`.
    pub fn api_broadcast(&self, frame: Bytes) -> ApiCall<'_> {
        self.api(|r, t| r.api_broadcast(frame, t))
    }

    /// `GET /api/presence/{user}`.
    pub fn api_presence(&self, user: &str) -> ApiCall<'_> {
        self.api(|r, t| r.api_presence(user, t))
    }

    /// `POST /api/disconnect`.
    pub fn api_disconnect(&self, user: &str) -> ApiCall<'_> {
        self.api(|r, t| r.api_disconnect(user, t))
    }

    // ---- backpressure --------------------------------------------------------------------

    /// `n` more bytes are queued on one of this core's connections. Past the core's share of
    /// `--max-total-queued-bytes`, every core stops reading from clients.
    pub fn queued_add(&self, n: usize) {
        let total = self.queued_bytes.get().saturating_add(n);
        self.queued_bytes.set(total);
        if total > self.queued_peak.get() {
            self.queued_peak.set(total);
            // Rare (the peak only grows) and uncontended: the core's own counters.
            self.stats()
                .queued_bytes_peak
                .store(total as i64, std::sync::atomic::Ordering::Relaxed);
        }
        if total > self.shared.queued_bytes_share()
            && !self.shared.pressure.has(self.id, Reason::QueuedBytes)
        {
            self.shared.pressure.set(self.id, Reason::QueuedBytes, true);
        }
    }

    /// `n` queued bytes left (written, or dropped with their connection). At three quarters
    /// of the share, this core's pressure ends.
    pub fn queued_sub(&self, n: usize) {
        let total = self.queued_bytes.get().saturating_sub(n);
        self.queued_bytes.set(total);
        if total <= self.shared.queued_bytes_share() / 4 * 3
            && self.shared.pressure.has(self.id, Reason::QueuedBytes)
        {
            self.shared
                .pressure
                .set(self.id, Reason::QueuedBytes, false);
        }
    }

    /// Copies the queued-bytes figure into the shared counters (once per sweep: the hot
    /// path touches only cells).
    fn publish_queue_gauges(&self) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.stats()
            .queued_bytes
            .store(self.queued_bytes.get() as i64, relaxed);
    }

    /// Whether a connection may read from its client now. Under backpressure it may not: the
    /// connection is marked paused (by the caller) and the resume task wakes it when the
    /// pressure ends.
    pub fn may_read(&self) -> bool {
        if !self.shared.pressure.is_on() {
            return true;
        }
        if !self.any_paused.replace(true) {
            stats::inc(&self.stats().backpressure_pauses);
            if let Some(w) = self.resume_waker.take() {
                w.wake();
            }
        }
        false
    }

    /// The resume task: once connections have paused, waits for the pressure to end and
    /// wakes every paused connection of this core (one walk over the slab per episode).
    pub async fn run_resumer(self: Rc<Self>) {
        loop {
            wait_until(&self.resume_waker, || self.any_paused.get()).await;
            self.shared.pressure.off(self.id).await;
            self.any_paused.set(false);
            self.each_conn(|c| {
                if c.is_paused() {
                    c.resume();
                }
            });
        }
    }

    // ---- shutdown ------------------------------------------------------------------------

    fn begin_shutdown(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        if let Some(c) = self.accept_canceller.borrow_mut().take() {
            c.cancel();
        }
        // Leave the reuseport group now: new clients are refused at once (and try another
        // node) instead of waiting in a backlog nobody will accept from. Dropping the
        // listener is not enough on io_uring, where its close can wait on the cancelled
        // accept; shutting a listening socket down takes it out of LISTEN immediately.
        if let Some(fd) = self.listener_fd.take() {
            // SAFETY: shutdown on our own listening socket, which stays open until dropped.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
        self.each_conn(|c| c.request_close(CloseReq::initiate(1001, "server shutting down", true)));
        let waiters: Vec<Waker> = self
            .shutdown_waiters
            .borrow()
            .iter()
            .map(|(_, w)| w.clone())
            .collect();
        for w in waiters {
            w.wake();
        }
        if let Some(w) = self.drain_waker.take() {
            w.wake();
        }
    }

    /// Runs `fut` to completion unless shutdown begins first (then `None`).
    pub async fn unless_shutdown<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        /// Frees the waiter's slot however the wait ends.
        struct Slot<'a>(&'a RefCell<slab::Slab<Waker>>, Option<usize>);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                if let Some(i) = self.1 {
                    self.0.borrow_mut().try_remove(i);
                }
            }
        }
        let mut fut = std::pin::pin!(fut);
        let mut slot = Slot(&self.shutdown_waiters, None);
        poll_fn(|cx| {
            if self.shutting_down.get() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let mut waiters = self.shutdown_waiters.borrow_mut();
            match slot.1 {
                Some(i) => waiters[i] = cx.waker().clone(),
                None => slot.1 = Some(waiters.insert(cx.waker().clone())),
            }
            Poll::Pending
        })
        .await
    }

    /// A plain-HTTP connection of this core ended (see [`Core::http_open`]).
    pub fn http_closed(&self) {
        self.http_open.set(self.http_open.get().saturating_sub(1));
        self.shared
            .http_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        stats::add_gauge(&self.stats().http_connections, -1);
        if self.shutting_down.get() {
            if let Some(w) = self.drain_waker.take() {
                w.wake();
            }
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
            let now = Millis::now();
            let mut idle_closed = 0;
            let mut pings = 0;
            for (_, entry) in self.router.borrow().conns().iter() {
                let (closed, pinged) = entry.handle.sweep(now, ping, idle);
                idle_closed += u64::from(closed);
                pings += pinged;
            }
            self.queued_add(pings);
            stats::add(&self.stats().idle_closes, idle_closed);
            self.publish_queue_gauges();
            // mimalloc purges freed pages lazily, on later allocator activity: after a burst
            // of handshakes an idle core would keep their memory resident for good.
            // SAFETY: mi_collect only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    }

    /// Open WebSocket connections of this core.
    pub fn conn_count(&self) -> usize {
        self.router.borrow().conns().len()
    }

    /// Resolves once shutdown has begun and every connection of this core is gone, plain
    /// HTTP ones included (each is answered or cut short first).
    pub async fn drained(&self) {
        wait_until(&self.drain_waker, || {
            self.shutting_down.get() && self.conn_count() == 0 && self.http_open.get() == 0
        })
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_started(&self) {
        wait_until(&self.drain_waker, || self.shutting_down.get()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owners are stable within a process and differ between processes: nobody can pick
    /// user or room names that all land on one core of every gateway.
    #[test]
    fn owner_hash_is_keyed_per_process() {
        let names: Vec<String> = (0..64).map(|i| format!("user{i}")).collect();
        let a = Owners::new(4);
        let b = Owners::new(4);
        let owners = |o: &Owners| names.iter().map(|n| o.of(n)).collect::<Vec<_>>();
        assert_eq!(owners(&a), owners(&a));
        let copy = a;
        assert_eq!(owners(&a), owners(&copy), "copies share the key");
        assert_ne!(
            owners(&a),
            owners(&b),
            "two processes share their owner hash"
        );
        assert!(owners(&a).iter().all(|o| *o < 4));
    }
}
