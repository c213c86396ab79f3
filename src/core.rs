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
//!
//! # Rooms
//!
//! Membership belongs to a connection and lives on the connection's core: each core keeps
//! `room → member keys` for its own connections. Each room also has an owner core,
//! `hash(room) % cores`, which keeps the set of cores holding members: a core tells it with
//! `RoomCores` when its member set appears or empties (first join, last leave: never per
//! message), and the owner answers an appearance with `RoomConfirmed`. A join is acked once
//! the core's set is confirmed, so every publish the owner handles after the ack reaches the
//! new member, from whichever core it came.
//!
//! A publish fans out to the publishing core's own members, then goes to the owner
//! (`RoomPublish`), which fans out to its members and sends one `RoomDeliver` (the frame
//! encoded once) to each other core with members. Cores without members receive nothing.
//! Counts flow back through waiters for `delivered`. Per sender and recipient core the path
//! is fixed (publisher core → owner → member core, each hop FIFO), so order holds. The owner
//! counts each room once, however many cores its members sit on.
//!
//! # Waiters
//!
//! Answers that need counts from other cores (publish and broadcast `delivered`, API calls)
//! wait in a per-core generational slab of waiters; other cores answer with `Count`. A stale
//! waiter key (its caller gave up) is a no-op, like every other key.

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
use indexmap::IndexSet;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::config::Config;
use crate::conn::{CloseReq, ConnShared, Push};
use crate::key::{ConnKey, GenSlab};
use crate::mailbox::{self, Mailbox, MailboxSender, Pressure, Reason};
use crate::protocol;
use crate::stats::{self, CoreStats};

/// Keys of one user's connections, kept sorted so that keys of one core are contiguous.
type KeyList = SmallVec<[ConnKey; 2]>;

/// Sorted ids of the cores holding members of a room (a core id fits a byte: `MAX_CORES`).
type CoreSet = SmallVec<[u8; 4]>;

/// This core's members of one room.
struct LocalRoom {
    members: IndexSet<ConnKey>,
    /// Numbers this appearance of the set (see [`CoreMsg::RoomCores`]).
    seq: u64,
    /// The room's owner has recorded that this core has members: publishes from other cores
    /// reach them.
    confirmed: bool,
    /// Join acks held until then: (connection, request id).
    waiting: Vec<(ConnKey, Box<RawValue>)>,
}

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
    /// A waiter on the key's core: send it the count.
    Waiter(ConnKey),
}

/// What a waiter does once every count is in.
enum Done {
    /// Ack a WebSocket request.
    Ack { conn: ConnKey, id: Box<RawValue> },
    /// Wake a local task (an API call).
    Local(Rc<Slot>),
    /// Pass the total on to whoever waits on another core (a room's owner gathering for the
    /// publishing core).
    Reply(Reply),
}

struct Waiter {
    remaining: usize,
    sum: u64,
    done: Done,
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

/// What cores send each other.
#[derive(Debug)]
pub(crate) enum CoreMsg {
    /// To a user's owner: add this connection to the user's directory entry.
    Register { user: Box<str>, key: ConnKey },
    /// To a connection's core: its registration is in place (it may be welcomed), or was
    /// refused for the per-user connection limit.
    Registered { key: ConnKey, ok: bool },
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
    /// To a room's owner: deliver a frame to the members of `room` on every core that has
    /// some, except `origin` (which delivered to its own); `reply` learns the total.
    RoomPublish {
        room: Box<str>,
        frame: Bytes,
        origin: usize,
        reply: Option<Reply>,
    },
    /// From a room's owner to a core with members: deliver a frame to this core's members of
    /// `room`; answer with the count when a waiter is named.
    RoomDeliver {
        room: Box<str>,
        frame: Bytes,
        waiter: Option<ConnKey>,
    },
    /// To every other core: deliver a frame to every user connection.
    Broadcast {
        frame: Bytes,
        waiter: Option<ConnKey>,
    },
    /// To a user's owner: count the user's connections.
    Presence { user: Box<str>, waiter: ConnKey },
    /// To a user's owner: close every connection of the user with 1008.
    Disconnect { user: Box<str>, waiter: ConnKey },
    /// To a connection's core: close these connections with 1008.
    Kick { keys: SmallVec<[ConnKey; 4]> },
    /// To a room's owner: `core`'s member set of `room` appeared (`present`) or emptied.
    /// `seq` numbers the appearance, for the confirmation.
    RoomCores {
        room: Box<str>,
        core: usize,
        present: bool,
        seq: u64,
    },
    /// From a room's owner: it knows of this core's member set `seq` of `room`; publishes
    /// from every core reach its members from now on (held join acks may go).
    RoomConfirmed { room: Box<str>, seq: u64 },
    /// A count for a waiter of this core.
    Count { waiter: ConnKey, n: u64 },
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
    /// Open WebSocket connections over all cores, for `--max-connections` (touched once per
    /// connect and disconnect, never per message).
    pub total_connections: std::sync::atomic::AtomicUsize,
    /// Open not-yet-upgraded and plain-HTTP connections over all cores, for
    /// `--max-http-connections` (touched once per connection).
    pub http_connections: std::sync::atomic::AtomicUsize,
    /// On while any queue is over its bound: cores stop reading from clients.
    pub pressure: Arc<Pressure>,
    /// Keys of the owner hash: one random pair per process, the same on every core, so
    /// that nobody can choose user or room names that all land on one core.
    pub owner_hash: std::collections::hash_map::RandomState,
    /// `--tls-cert`/`--tls-key`: every connection is TLS. Read once per handshake.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Shared {
    /// The core that owns `user`'s directory entry (or a room's count). The same on every
    /// core of this process; SipHash keyed at random per process against chosen names.
    pub fn owner_of(&self, user: &str) -> usize {
        if self.cores == 1 {
            return 0;
        }
        let mut h = std::hash::BuildHasher::build_hasher(&self.owner_hash);
        user.hash(&mut h);
        (h.finish() % self.cores as u64) as usize
    }

    /// Each core's share of `--max-total-queued-bytes`.
    pub fn queued_bytes_share(&self) -> usize {
        (self.config.max_total_queued_bytes / self.cores).max(1)
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
    /// State shared with the connection's task.
    pub conn: Rc<ConnShared>,
    /// Rooms this connection is a member of (empty for most connections).
    pub rooms: Vec<Box<str>>,
}

/// Outcome of a `join`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// Member now (or already).
    Ok,
    /// At `--max-rooms-per-conn` already.
    TooMany,
}

/// One core: everything here is touched only by this core's thread.
pub(crate) struct Core {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub conns: RefCell<GenSlab<ConnEntry>>,
    directory: RefCell<HashMap<Box<str>, KeyList>>,
    rooms: RefCell<HashMap<Box<str>, LocalRoom>>,
    /// Rooms this core owns (`hash(room) % cores`): which cores hold members of each.
    owned_rooms: RefCell<HashMap<Box<str>, CoreSet>>,
    /// Numbers each appearance of a local member set, so the owner's confirmation of an old
    /// one is not taken for a newer one.
    room_seq: Cell<u64>,
    /// Outbound bytes queued on this core's connections (the gateway-wide bound's share).
    queued_bytes: Cell<usize>,
    /// The most ever queued (exported with the sweep).
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
    waiters: RefCell<GenSlab<Waiter>>,
    outbox: RefCell<Vec<Vec<CoreMsg>>>,
    flush_pending: Cell<bool>,
    flush_waker: Cell<Option<Waker>>,
    /// Per-core read buffer: connections read into it and keep only unfinished frames.
    pub scratch: RefCell<Vec<u8>>,
    pub shutting_down: Cell<bool>,
    /// Woken when shutdown starts and whenever a connection is removed during shutdown.
    drain_waker: Cell<Option<Waker>>,
    accept_canceller: RefCell<Option<monoio::io::Canceller>>,
    /// The core's listening socket, shut at shutdown (see [`Core::begin_shutdown`]).
    pub listener_fd: Cell<Option<std::os::fd::RawFd>>,
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
            rooms: RefCell::new(HashMap::new()),
            owned_rooms: RefCell::new(HashMap::new()),
            room_seq: Cell::new(0),
            queued_bytes: Cell::new(0),
            queued_peak: Cell::new(0),
            any_paused: Cell::new(false),
            resume_waker: Cell::new(None),
            http_open: Cell::new(0),
            shutdown_waiters: RefCell::new(slab::Slab::new()),
            waiters: RefCell::new(GenSlab::new(id)),
            outbox: RefCell::new((0..cores).map(|_| Vec::new()).collect()),
            flush_pending: Cell::new(false),
            flush_waker: Cell::new(None),
            scratch: RefCell::new(vec![0; SCRATCH]),
            shutting_down: Cell::new(false),
            drain_waker: Cell::new(None),
            accept_canceller: RefCell::new(None),
            listener_fd: Cell::new(None),
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
            wait_until(&self.flush_waker, || self.flush_pending.get()).await;
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
                mailbox::send_bounded(
                    core,
                    &self.shared.mailboxes[core],
                    batch,
                    self.config().mailbox_limit,
                    &self.shared.pressure,
                );
            }
        }
    }

    /// The mailbox task: applies every batch other cores sent here.
    pub async fn run_mailbox(self: Rc<Self>, mailbox: Mailbox<CoreMsg>) {
        let mut batches = Vec::new();
        while mailbox.recv_all(&mut batches).await.is_some() {
            for batch in batches.drain(..) {
                let n = batch.len();
                for msg in batch {
                    self.handle(msg);
                }
                mailbox.handled(n);
            }
        }
    }

    fn handle(&self, msg: CoreMsg) {
        match msg {
            CoreMsg::Register { user, key } => self.directory_add(user, key),
            CoreMsg::Registered { key, ok } => self.on_registered(key, ok),
            CoreMsg::Unregister { user, key } => self.directory_remove(&user, key),
            CoreMsg::Route { user, frame, reply } => self.route_owned(&user, frame, reply),
            CoreMsg::Deliver { keys, frame } => {
                for key in keys {
                    self.deliver_local(key, frame.clone());
                }
            }
            CoreMsg::RoomPublish {
                room,
                frame,
                origin,
                reply,
            } => {
                let local = self.publish_local(&room, &frame);
                self.fan_out_room(&room, &frame, origin, local, reply.map(Done::Reply));
            }
            CoreMsg::RoomDeliver {
                room,
                frame,
                waiter,
            } => {
                let n = self.publish_local(&room, &frame);
                if let Some(w) = waiter {
                    self.count_to(w, n);
                }
            }
            CoreMsg::Broadcast { frame, waiter } => {
                let n = self.broadcast_local(&frame);
                if let Some(w) = waiter {
                    self.count_to(w, n);
                }
            }
            CoreMsg::Presence { user, waiter } => {
                let n = self.presence_owned(&user);
                self.count_to(waiter, n);
            }
            CoreMsg::Disconnect { user, waiter } => {
                let n = self.disconnect_owned(&user);
                self.count_to(waiter, n);
            }
            CoreMsg::Kick { keys } => {
                for key in keys {
                    self.kick_local(key);
                }
            }
            CoreMsg::RoomCores {
                room,
                core,
                present,
                seq,
            } => self.room_cores_owned(room, core, present, seq),
            CoreMsg::RoomConfirmed { room, seq } => self.room_confirmed(&room, seq),
            CoreMsg::Count { waiter, n } => self.count(waiter, n),
            CoreMsg::Shutdown => self.begin_shutdown(),
        }
    }

    // ---- directory -----------------------------------------------------------------------

    /// Registers a connection of `user`; the connection is told through
    /// [`ConnShared::set_registered`] once the owner has it.
    pub fn register(&self, user: &str, key: ConnKey) {
        let msg = CoreMsg::Register {
            user: user.into(),
            key,
        };
        self.on_owner_of(user, msg);
    }

    /// Removes exactly this connection from `user`'s entry (a no-op if it is not there).
    pub fn unregister(&self, user: &str, key: ConnKey) {
        let msg = CoreMsg::Unregister {
            user: user.into(),
            key,
        };
        self.on_owner_of(user, msg);
    }

    /// Handles `msg` on the owner of `id` (a user or a room): right here when this core owns
    /// it, else posted there. Not for the per-message path, which avoids building the message
    /// when it stays on this core.
    fn on_owner_of(&self, id: &str, msg: CoreMsg) {
        let owner = self.shared.owner_of(id);
        if owner == self.id {
            self.handle(msg);
        } else {
            self.post(owner, msg);
        }
    }

    fn directory_add(&self, user: Box<str>, key: ConnKey) {
        let limit = self.config().max_connections_per_user;
        let ok = {
            let mut dir = self.directory.borrow_mut();
            let full = limit > 0 && dir.get(&user).is_some_and(|k| k.len() >= limit);
            if !full {
                let keys = dir.entry(user).or_insert_with(|| {
                    stats::add_gauge(&self.stats().users, 1);
                    KeyList::new()
                });
                if let Err(pos) = keys.binary_search(&key) {
                    keys.insert(pos, key);
                }
            }
            !full
        };
        if key.core() == self.id {
            self.on_registered(key, ok);
        } else {
            self.post(key.core(), CoreMsg::Registered { key, ok });
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

    fn on_registered(&self, key: ConnKey, ok: bool) {
        if let Some(entry) = self.conns.borrow().get(key) {
            entry.conn.set_registered(ok);
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
        let keys = self.user_keys(user);
        let delivered = keys.len() as u64;
        self.per_core(
            &keys,
            |key| self.deliver_local(key, frame.clone()),
            |keys| CoreMsg::Deliver {
                keys,
                frame: frame.clone(),
            },
        );
        stats::add(&self.stats().deliveries, delivered);
        if let Some(reply) = reply {
            self.complete(reply, delivered);
        }
    }

    /// Hands a routed message's count to whoever waits for it.
    fn complete(&self, reply: Reply, n: u64) {
        match reply {
            Reply::Ack { conn, id } => self.deliver_to(conn, protocol::ack(&id, Some(n))),
            Reply::Waiter(key) => self.count_to(key, n),
        }
    }

    fn count_to(&self, waiter: ConnKey, n: u64) {
        if waiter.core() == self.id {
            self.count(waiter, n);
        } else {
            self.post(waiter.core(), CoreMsg::Count { waiter, n });
        }
    }

    /// Adds a count to a local waiter; the last count finishes it. A stale key is a no-op.
    fn count(&self, key: ConnKey, n: u64) {
        let finished = {
            let mut waiters = self.waiters.borrow_mut();
            let Some(w) = waiters.get_mut(key) else {
                return;
            };
            w.sum += n;
            w.remaining = w.remaining.saturating_sub(1);
            if w.remaining > 0 {
                return;
            }
            waiters.remove(key)
        };
        if let Some(w) = finished {
            self.finish(w.done, w.sum);
        }
    }

    fn finish(&self, done: Done, sum: u64) {
        match done {
            Done::Ack { conn, id } => self.deliver_to(conn, protocol::ack(&id, Some(sum))),
            Done::Local(slot) => slot.set(sum),
            Done::Reply(reply) => self.complete(reply, sum),
        }
    }

    /// Registers a waiter for `remaining` counts starting from `sum`; `None` when the core's
    /// waiter table is full (then the caller is answered at once with `sum`).
    fn add_waiter(&self, remaining: usize, sum: u64, done: Done) -> Option<ConnKey> {
        match self.waiters.borrow_mut().insert(Waiter {
            remaining,
            sum,
            done,
        }) {
            Ok(k) => Some(k),
            Err(w) => {
                self.finish(w.done, w.sum);
                None
            }
        }
    }

    /// Runs a local fan-out, then sends `msg(waiter)` to every other core and gathers their
    /// counts into `done` (if any).
    fn gather_all(&self, local: u64, done: Option<Done>, msg: impl Fn(Option<ConnKey>) -> CoreMsg) {
        let others = self.shared.cores - 1;
        let waiter = match done {
            Some(done) if others == 0 => {
                self.finish(done, local);
                None
            }
            Some(done) => self.add_waiter(others, local, done),
            None => None,
        };
        for core in (0..self.shared.cores).filter(|c| *c != self.id) {
            self.post(core, msg(waiter));
        }
    }

    // ---- rooms ---------------------------------------------------------------------------

    /// Makes a connection of this core a member of `room`, and acks `id` (if any) once
    /// publishes from every core reach it: at once when the room's owner already knows this
    /// core has members, else when the owner confirms (the join's round trip).
    pub fn join(&self, key: ConnKey, room: &str, id: Option<&RawValue>) -> Joined {
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(key) else {
            return Joined::Ok;
        };
        if !entry.rooms.iter().any(|r| &**r == room) {
            if entry.rooms.len() >= self.config().max_rooms_per_conn {
                return Joined::TooMany;
            }
            entry.rooms.push(room.into());
        }
        drop(conns);
        let owner_here = self.shared.owner_of(room) == self.id;
        let mut rooms = self.rooms.borrow_mut();
        let mut appeared = None;
        let local = rooms.entry(room.into()).or_insert_with(|| {
            let seq = self.room_seq.get() + 1;
            self.room_seq.set(seq);
            appeared = Some(seq);
            LocalRoom {
                members: IndexSet::new(),
                seq,
                confirmed: owner_here,
                waiting: Vec::new(),
            }
        });
        local.members.insert(key);
        let ack_now = local.confirmed;
        if let (false, Some(id)) = (ack_now, id) {
            local.waiting.push((key, id.to_owned()));
        }
        drop(rooms);
        if let Some(seq) = appeared {
            // Told with nothing borrowed: on the owner core this is handled right here.
            stats::add_gauge(&self.stats().local_rooms, 1);
            self.room_cores(room, true, seq);
        }
        if let (true, Some(id)) = (ack_now, id) {
            self.deliver_local(key, protocol::ack(id, None));
        }
        Joined::Ok
    }

    /// Ends a membership (a no-op when there is none).
    pub fn leave(&self, key: ConnKey, room: &str) {
        if let Some(entry) = self.conns.borrow_mut().get_mut(key) {
            entry.rooms.retain(|r| &**r != room);
        }
        self.leave_room_set(key, room);
    }

    fn leave_room_set(&self, key: ConnKey, room: &str) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(local) = rooms.get_mut(room) else {
            return;
        };
        local.members.swap_remove(&key);
        // A join ack still held goes out before whatever follows the leave (its ack).
        let mut acks: Vec<(ConnKey, Box<RawValue>)> = Vec::new();
        let emptied = if local.members.is_empty() {
            let gone = rooms.remove(room).expect("present");
            acks = gone.waiting;
            Some(gone.seq)
        } else {
            if local.waiting.iter().any(|(k, _)| *k == key) {
                local.waiting.retain(|(k, id)| {
                    if *k == key {
                        acks.push((*k, id.clone()));
                    }
                    *k != key
                });
            }
            None
        };
        drop(rooms);
        for (k, id) in acks {
            self.deliver_local(k, protocol::ack(&id, None));
        }
        if let Some(seq) = emptied {
            stats::add_gauge(&self.stats().local_rooms, -1);
            self.room_cores(room, false, seq);
        }
    }

    /// Tells `room`'s owner that this core's member set appeared or emptied.
    fn room_cores(&self, room: &str, present: bool, seq: u64) {
        let msg = CoreMsg::RoomCores {
            room: room.into(),
            core: self.id,
            present,
            seq,
        };
        self.on_owner_of(room, msg);
    }

    /// On a room's owner: which cores hold members; the room exists while any does. Each
    /// core's appear/empty messages travel one FIFO path, so they arrive in order. An
    /// appearance is confirmed to its core once recorded: every publish the owner handles
    /// after it reaches that core's members.
    fn room_cores_owned(&self, room: Box<str>, core: usize, present: bool, seq: u64) {
        let Ok(c) = u8::try_from(core) else {
            return;
        };
        let mut owned = self.owned_rooms.borrow_mut();
        if present {
            let set = owned.entry(room.clone()).or_default();
            if set.is_empty() {
                stats::add_gauge(&self.stats().rooms, 1);
            }
            if let Err(pos) = set.binary_search(&c) {
                set.insert(pos, c);
            }
            drop(owned);
            if core != self.id {
                self.post(core, CoreMsg::RoomConfirmed { room, seq });
            }
        } else if let Some(set) = owned.get_mut(&room) {
            set.retain(|x| *x != c);
            if set.is_empty() {
                owned.remove(&room);
                stats::add_gauge(&self.stats().rooms, -1);
            }
        }
    }

    /// On a member core: the owner has recorded member set `seq`; held join acks go out.
    fn room_confirmed(&self, room: &str, seq: u64) {
        let waiting = {
            let mut rooms = self.rooms.borrow_mut();
            match rooms.get_mut(room) {
                Some(local) if local.seq == seq => {
                    local.confirmed = true;
                    std::mem::take(&mut local.waiting)
                }
                // An older appearance of the set (it emptied since): nothing to do.
                _ => return,
            }
        };
        for (key, id) in waiting {
            self.deliver_local(key, protocol::ack(&id, None));
        }
    }

    /// Delivers to this core's members of `room`; returns how many.
    fn publish_local(&self, room: &str, frame: &Bytes) -> u64 {
        let members: SmallVec<[ConnKey; 16]> = match self.rooms.borrow().get(room) {
            Some(m) => m.members.iter().copied().collect(),
            None => return 0,
        };
        for key in &members {
            self.deliver_local(*key, frame.clone());
        }
        stats::add(&self.stats().deliveries, members.len() as u64);
        members.len() as u64
    }

    /// Publishes to every member of `room` on every core; `ack` names the requesting
    /// connection and its `id` when the total `delivered` must be acked.
    pub fn publish(&self, room: &str, frame: Bytes, ack: Option<(ConnKey, Box<RawValue>)>) {
        let local = self.publish_local(room, &frame);
        let done = ack.map(|(conn, id)| Done::Ack { conn, id });
        self.publish_remote(room, frame, local, done);
    }

    /// After delivering to this core's members (`local` of them): the other cores with
    /// members get the frame through the room's owner, which alone knows where they are.
    /// Cores without members of the room receive nothing.
    fn publish_remote(&self, room: &str, frame: Bytes, local: u64, done: Option<Done>) {
        let owner = self.shared.owner_of(room);
        if owner == self.id {
            self.fan_out_room(room, &frame, self.id, local, done);
            return;
        }
        let reply = match done {
            Some(done) => self.add_waiter(1, local, done).map(Reply::Waiter),
            None => None,
        };
        self.post(
            owner,
            CoreMsg::RoomPublish {
                room: room.into(),
                frame,
                origin: self.id,
                reply,
            },
        );
    }

    /// On a room's owner (which has delivered to its own members, `sum` so far): sends the
    /// frame to every other core with members except `origin`, and gathers their counts into
    /// `done`.
    fn fan_out_room(&self, room: &str, frame: &Bytes, origin: usize, sum: u64, done: Option<Done>) {
        let targets: CoreSet = match self.owned_rooms.borrow().get(room) {
            Some(set) => set
                .iter()
                .copied()
                .filter(|c| usize::from(*c) != origin && usize::from(*c) != self.id)
                .collect(),
            None => CoreSet::new(),
        };
        let waiter = match done {
            Some(done) if targets.is_empty() => {
                self.finish(done, sum);
                None
            }
            Some(done) => self.add_waiter(targets.len(), sum, done),
            None => None,
        };
        for core in targets {
            self.post(
                usize::from(core),
                CoreMsg::RoomDeliver {
                    room: room.into(),
                    frame: frame.clone(),
                    waiter,
                },
            );
        }
    }

    /// Delivers to every user connection of this core; returns how many.
    fn broadcast_local(&self, frame: &Bytes) -> u64 {
        let conns: Vec<Rc<ConnShared>> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, e)| e.user.is_some())
            .map(|(_, e)| e.conn.clone())
            .collect();
        for conn in &conns {
            self.push_to(conn, frame.clone());
        }
        stats::add(&self.stats().deliveries, conns.len() as u64);
        conns.len() as u64
    }

    // ---- backend API ---------------------------------------------------------------------

    fn local_waiter(&self, remaining: usize) -> (Rc<Slot>, Option<ConnKey>) {
        let slot = Rc::new(Slot::default());
        let key = self.add_waiter(remaining, 0, Done::Local(slot.clone()));
        (slot, key)
    }

    /// `POST /api/send`: the count of connections the frame was handed to.
    pub fn api_send(&self, user: &str, frame: Bytes) -> Rc<Slot> {
        let (slot, key) = self.local_waiter(1);
        if let Some(key) = key {
            self.send_to_user(user, frame, Some(Reply::Waiter(key)));
        }
        slot
    }

    /// `POST /api/publish`.
    pub fn api_publish(&self, room: &str, frame: Bytes) -> Rc<Slot> {
        let slot = Rc::new(Slot::default());
        let local = self.publish_local(room, &frame);
        self.publish_remote(room, frame, local, Some(Done::Local(slot.clone())));
        slot
    }

    /// `POST /api/broadcast`.
    pub fn api_broadcast(&self, frame: Bytes) -> Rc<Slot> {
        let slot = Rc::new(Slot::default());
        let local = self.broadcast_local(&frame);
        self.gather_all(local, Some(Done::Local(slot.clone())), |waiter| {
            CoreMsg::Broadcast {
                frame: frame.clone(),
                waiter,
            }
        });
        slot
    }

    /// `GET /api/presence/{user}`.
    pub fn api_presence(&self, user: &str) -> Rc<Slot> {
        self.ask_owner(user, Core::presence_owned, |user, waiter| {
            CoreMsg::Presence { user, waiter }
        })
    }

    /// `POST /api/disconnect`.
    pub fn api_disconnect(&self, user: &str) -> Rc<Slot> {
        self.ask_owner(user, Core::disconnect_owned, |user, waiter| {
            CoreMsg::Disconnect { user, waiter }
        })
    }

    /// Runs `on_owner` on `user`'s owner core (here, or through `msg`) and returns the slot
    /// its count arrives in.
    fn ask_owner(
        &self,
        user: &str,
        on_owner: fn(&Core, &str) -> u64,
        msg: fn(Box<str>, ConnKey) -> CoreMsg,
    ) -> Rc<Slot> {
        let (slot, key) = self.local_waiter(1);
        if let Some(waiter) = key {
            let owner = self.shared.owner_of(user);
            if owner == self.id {
                let n = on_owner(self, user);
                self.count(waiter, n);
            } else {
                self.post(owner, msg(user.into(), waiter));
            }
        }
        slot
    }

    /// On the owner: how many connections `user` has.
    fn presence_owned(&self, user: &str) -> u64 {
        self.directory
            .borrow()
            .get(user)
            .map_or(0, |k| k.len() as u64)
    }

    /// On the owner: closes every connection of `user` with 1008; returns how many.
    fn disconnect_owned(&self, user: &str) -> u64 {
        let keys = self.user_keys(user);
        self.per_core(
            &keys,
            |key| self.kick_local(key),
            |keys| CoreMsg::Kick { keys },
        );
        keys.len() as u64
    }

    /// On the owner: a copy of `user`'s keys (the directory stays unborrowed while they are
    /// acted on), sorted so that each core's keys are contiguous.
    fn user_keys(&self, user: &str) -> KeyList {
        self.directory
            .borrow()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// Acts on each key of this core with `local`, and sends each other core one message
    /// made by `remote` from its keys.
    fn per_core(
        &self,
        keys: &[ConnKey],
        local: impl Fn(ConnKey),
        remote: impl Fn(SmallVec<[ConnKey; 4]>) -> CoreMsg,
    ) {
        for group in keys.chunk_by(|a, b| a.core() == b.core()) {
            let core = group[0].core();
            if core == self.id {
                group.iter().copied().for_each(&local);
            } else {
                self.post(core, remote(group.iter().copied().collect()));
            }
        }
    }

    fn kick_local(&self, key: ConnKey) {
        let conn = match self.conns.borrow().get(key) {
            Some(e) => e.conn.clone(),
            None => return,
        };
        conn.request_close(CloseReq::initiate(1008, "disconnected by the server", true));
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

    /// Copies the queued-bytes figures into the shared counters (once per sweep and on
    /// demand: the hot path touches only cells).
    pub fn publish_queue_gauges(&self) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let stats = self.stats();
        stats
            .queued_bytes
            .store(self.queued_bytes.get() as i64, relaxed);
        stats
            .queued_bytes_peak
            .store(self.queued_peak.get() as i64, relaxed);
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
            let paused: Vec<Rc<ConnShared>> = self
                .conns
                .borrow()
                .iter()
                .filter(|(_, e)| e.conn.is_paused())
                .map(|(_, e)| e.conn.clone())
                .collect();
            for conn in paused {
                conn.resume();
            }
        }
    }

    // ---- connection life -----------------------------------------------------------------

    /// Forgets a closed connection: slab slot and directory entry. Idempotent: with a stale
    /// key nothing happens.
    pub fn remove_conn(&self, key: ConnKey) {
        let removed = self.conns.borrow_mut().remove(key);
        if let Some(entry) = removed {
            stats::add_gauge(&self.stats().connections, -1);
            self.shared
                .total_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            for room in &entry.rooms {
                self.leave_room_set(key, room);
            }
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
        let conns: Vec<Rc<ConnShared>> = self
            .conns
            .borrow()
            .iter()
            .map(|(_, e)| e.conn.clone())
            .collect();
        for conn in conns {
            conn.request_close(CloseReq::initiate(1001, "server shutting down", true));
        }
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
            let now = crate::conn::Millis::now();
            let mut idle_closed = 0;
            let mut pings = 0;
            for (_, entry) in self.conns.borrow().iter() {
                let (closed, pinged) = entry.conn.sweep(now, ping, idle);
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

    /// Resolves once shutdown has begun and every connection of this core is gone, plain
    /// HTTP ones included (each is answered or cut short first).
    pub async fn drained(&self) {
        wait_until(&self.drain_waker, || {
            self.shutting_down.get() && self.conns.borrow().is_empty() && self.http_open.get() == 0
        })
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_started(&self) {
        wait_until(&self.drain_waker, || self.shutting_down.get()).await
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
    use super::*;

    fn shared(cores: usize) -> Shared {
        let config = Config::with_listen("127.0.0.1:0".parse().unwrap());
        let pressure = Arc::new(Pressure::new(cores));
        Shared {
            config,
            cores,
            mailboxes: (0..cores)
                .map(|i| mailbox::mailbox(i, 8, pressure.clone()).0)
                .collect(),
            stats: (0..cores).map(|_| CoreStats::default()).collect(),
            shutdown: AtomicBool::new(false),
            total_connections: Default::default(),
            http_connections: Default::default(),
            pressure,
            owner_hash: std::collections::hash_map::RandomState::new(),
            tls: None,
        }
    }

    /// Owners are stable within a process and differ between processes: nobody can pick
    /// user or room names that all land on one core of every gateway.
    #[test]
    fn owner_hash_is_keyed_per_process() {
        let names: Vec<String> = (0..64).map(|i| format!("user{i}")).collect();
        let a = shared(4);
        let b = shared(4);
        let owners = |s: &Shared| names.iter().map(|n| s.owner_of(n)).collect::<Vec<_>>();
        assert_eq!(owners(&a), owners(&a));
        assert_ne!(
            owners(&a),
            owners(&b),
            "two processes share their owner hash"
        );
        assert!(owners(&a).iter().all(|o| *o < 4));
    }
}
