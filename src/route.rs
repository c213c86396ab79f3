//! The router: the user directory, rooms, waiters and the rules that route a message, as
//! plain data and functions. It does no I/O and knows nothing of the runtime: it is fed events
//! (a connection inserted or removed, a client's request, a message from another core) and
//! answers with [`Action`]s (push a frame to a connection, post a message to a core, answer a
//! waiter), which the caller carries out. quinn-proto is the model. `Core` (src/core.rs) is
//! the thin glue that runs it on a monoio runtime; `tests/route_sim.rs` runs several routers
//! under a seeded scheduler that interleaves every event in every order.
//!
//! # The user directory
//!
//! Each user id is *owned* by one core ([`Owners::of`]). The owner keeps the list of that
//! user's connection keys, wherever the connections live. A connection registers with its
//! user's owner before it is welcomed ([`Action::Registered`]), and unregisters after it
//! closed. A `send` goes to the owner, which counts the keys (the `delivered` of the ack) and
//! forwards one `Deliver` per destination core carrying the frame encoded once.
//!
//! Why this is correct under concurrent connects and disconnects of one user on several cores:
//! * registration and removal name one exact generational key; removing connection A's key
//!   never touches connection B's, whatever order they arrive in;
//! * a core's messages to another core travel one FIFO path (the caller's duty), so a
//!   connection's `Unregister` never overtakes its `Register`, and one sender's messages to
//!   one user stay in order (sender core → owner core → recipient core, each hop FIFO);
//! * a key that went stale while a `Deliver` was in flight misses in the slab: a no-op.
//!
//! # Rooms
//!
//! Membership belongs to a connection and lives on the connection's core. Each room also has
//! an owner core, which keeps the set of cores holding members: a core tells it when its
//! member set appears or empties (never per message), and the owner confirms an appearance.
//! A join is acked once its core's set is confirmed, so every publish the owner handles after
//! the ack reaches the new member, from whichever core it came. A publish fans out to the
//! publishing core's own members, then goes to the owner, which fans out to its members and
//! forwards the frame once to each other core with members; cores without members receive
//! nothing. Counts flow back through waiters for `delivered`.
//!
//! A core hands room messages to its members in runs: publishes to one room handled one after
//! another wait in one pending [`Action::Fanout`] until the caller flushes it or something
//! that could reorder a member's frames or change the members comes first (see
//! [`Router::flush_fanout`]), so a member gets a run of messages as one piece.
//!
//! # Waiters
//!
//! Answers that need counts from other cores (publish and broadcast `delivered`, API calls)
//! wait in a per-core generational slab of waiters; other cores answer with `Count`. A stale
//! waiter key (its caller gave up) is a no-op, like every other key.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexSet;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::key::{ConnKey, GenSlab};
use crate::protocol;
use crate::stats::{self, CoreStats};

/// Keys of one user's connections, kept sorted so that keys of one core are contiguous.
pub type KeyList = SmallVec<[ConnKey; 2]>;

/// Sorted ids of the cores holding members of a room (a core id fits a byte: `MAX_CORES`).
type CoreSet = SmallVec<[u8; 4]>;

/// Which core owns a user's directory entry or a room's core set: the same answer on every
/// core of a process, SipHash keyed at random per process so that nobody can choose names
/// that all land on one core.
#[derive(Clone, Copy, Debug)]
pub struct Owners {
    cores: usize,
    keys: (u64, u64),
}

impl Owners {
    /// Owners among `cores` cores, with a fresh random key.
    pub fn new(cores: usize) -> Owners {
        let random = RandomState::new();
        Self::with_keys(cores, (random.hash_one(0u64), random.hash_one(1u64)))
    }

    /// Owners with a chosen key: the same names land on the same cores every time (the
    /// simulation's seeds replay).
    pub fn with_keys(cores: usize, keys: (u64, u64)) -> Owners {
        Owners {
            cores: cores.max(1),
            keys,
        }
    }

    /// The number of cores.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The core that owns `id` (a user or a room).
    pub fn of(&self, id: &str) -> usize {
        if self.cores == 1 {
            return 0;
        }
        // SipHash-2-4 with the process's keys (std's keyed hasher; deprecated only in favour
        // of the RandomState it is seeded from here).
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(self.keys.0, self.keys.1);
        id.hash(&mut h);
        (h.finish() % self.cores as u64) as usize
    }
}

/// The limits the router enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rooms one connection may be in.
    pub max_rooms_per_conn: usize,
    /// Connections one user may hold (0: no limit).
    pub max_connections_per_user: usize,
}

/// Who is waiting for a routed message's outcome.
#[derive(Debug)]
pub enum Reply {
    /// A WebSocket request with an `id`: send it an `ack` with the `delivered` count.
    Ack {
        /// The requesting connection.
        conn: ConnKey,
        /// The request's `id`, raw JSON.
        id: Box<RawValue>,
    },
    /// A waiter on the key's core: send it the count.
    Waiter(ConnKey),
    /// Another node's request (cluster mode): the bridge's token for it.
    Remote(u64),
}

/// What a waiter does once every count is in.
#[derive(Debug)]
enum Done {
    /// Ack a WebSocket request.
    Ack { conn: ConnKey, id: Box<RawValue> },
    /// Answer the caller's token (an API call).
    Local(u64),
    /// Pass the total on to whoever waits on another core.
    Reply(Reply),
    /// Answer another node's request (the bridge's token).
    Remote(u64),
}

/// What a node subscribes to on the broker (cluster mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A user's subject: the node holds a connection of the user.
    User,
    /// A room's subject: the node holds a member of the room.
    Room,
}

/// A request that came from another node (cluster mode), carried out on this node only.
#[derive(Clone, Debug)]
pub enum RemoteReq {
    /// Deliver to this node's connections of `user`.
    Send {
        /// The user.
        user: Box<str>,
        /// The frame, as the origin encoded it.
        frame: Bytes,
    },
    /// Deliver to this node's members of `room`.
    Publish {
        /// The room.
        room: Box<str>,
        /// The frame.
        frame: Bytes,
    },
    /// Deliver to every user connection of this node.
    Broadcast {
        /// The frame.
        frame: Bytes,
    },
    /// Count this node's connections of `user`.
    Presence {
        /// The user.
        user: Box<str>,
    },
    /// Close this node's connections of `user` with 1008.
    Disconnect {
        /// The user.
        user: Box<str>,
    },
}

/// What the router asks the node's broker bridge to do (cluster mode). `waiter` names a
/// waiter of the emitting core that expects one count: the sum over the other nodes.
#[derive(Debug)]
pub enum ClusterOut {
    /// Subscribe to (`on`) or drop a user's or room's subject. A subscription is confirmed
    /// with [`Msg::Subscribed`] carrying `seq`, to the emitting core.
    Interest {
        /// User or room.
        kind: Kind,
        /// Its name.
        name: Box<str>,
        /// Subscribe or unsubscribe.
        on: bool,
        /// Numbers the subscription, for the confirmation.
        seq: u64,
    },
    /// Publish a request to the other nodes.
    Request {
        /// What to do there.
        req: RemoteReq,
        /// Who learns the other nodes' total (`None`: nobody counts).
        waiter: Option<ConnKey>,
    },
    /// This node's count for another node's request.
    Answer {
        /// The bridge's token of the request.
        token: u64,
        /// The count.
        n: u64,
    },
}

/// What an owner holds until the broker confirmed a subscription (cluster mode).
#[derive(Debug)]
enum Held {
    /// A registration: the welcome waits for the user's subscription.
    Register(ConnKey),
    /// A core's member set of a room: its join acks wait for the room's subscription.
    RoomConfirm { core: usize, seq: u64 },
}

#[derive(Debug)]
struct Waiter {
    remaining: usize,
    sum: u64,
    done: Done,
}

/// What cores send each other.
#[derive(Debug)]
pub enum Msg {
    /// To a user's owner: add this connection to the user's directory entry.
    Register {
        /// The user.
        user: Box<str>,
        /// The connection.
        key: ConnKey,
    },
    /// To a connection's core: its registration is in place, or was refused (per-user limit).
    Registered {
        /// The connection.
        key: ConnKey,
        /// Whether it was accepted.
        ok: bool,
    },
    /// To a user's owner: remove exactly this connection from the user's entry.
    Unregister {
        /// The user.
        user: Box<str>,
        /// The connection.
        key: ConnKey,
    },
    /// To a user's owner: deliver a frame to every connection of the user.
    Route {
        /// The user.
        user: Box<str>,
        /// The frame, encoded once.
        frame: Bytes,
        /// Who learns the count.
        reply: Option<Reply>,
    },
    /// To a connection's core: hand the frame to each of these connections.
    Deliver {
        /// The connections.
        keys: SmallVec<[ConnKey; 4]>,
        /// The frame.
        frame: Bytes,
    },
    /// To a room's owner: deliver to the members on every core with some, except `origin`.
    RoomPublish {
        /// The room.
        room: Box<str>,
        /// The frame.
        frame: Bytes,
        /// The publishing core (it delivered to its own members).
        origin: usize,
        /// Who learns the total.
        reply: Option<Reply>,
    },
    /// From a room's owner to a core with members: deliver to this core's members.
    RoomDeliver {
        /// The room.
        room: Box<str>,
        /// The frame.
        frame: Bytes,
        /// Who learns this core's count.
        waiter: Option<ConnKey>,
    },
    /// To every other core: deliver a frame to every user connection.
    Broadcast {
        /// The frame.
        frame: Bytes,
        /// Who learns this core's count.
        waiter: Option<ConnKey>,
    },
    /// To a user's owner: count the user's connections.
    Presence {
        /// The user.
        user: Box<str>,
        /// Who learns the count.
        waiter: ConnKey,
    },
    /// To a user's owner: close every connection of the user with 1008.
    Disconnect {
        /// The user.
        user: Box<str>,
        /// Who learns how many.
        waiter: ConnKey,
    },
    /// To a connection's core: close these connections with 1008.
    Kick {
        /// The connections.
        keys: SmallVec<[ConnKey; 4]>,
    },
    /// To a room's owner: `core`'s member set of `room` appeared (`present`) or emptied.
    RoomCores {
        /// The room.
        room: Box<str>,
        /// The core.
        core: usize,
        /// Appeared or emptied.
        present: bool,
        /// Numbers the appearance, for the confirmation.
        seq: u64,
    },
    /// From a room's owner: it knows of this core's member set `seq` of `room`.
    RoomConfirmed {
        /// The room.
        room: Box<str>,
        /// The appearance confirmed.
        seq: u64,
    },
    /// From the bridge to the core that asked: the subscription `seq` is confirmed by the
    /// broker.
    Subscribed {
        /// User or room.
        kind: Kind,
        /// Its name.
        name: Box<str>,
        /// The subscription confirmed.
        seq: u64,
    },
    /// From the bridge: another node's request, to carry out on this node only.
    Remote {
        /// The request.
        req: RemoteReq,
        /// The bridge's token when the other node counts.
        token: Option<u64>,
    },
    /// A count for a waiter of this core.
    Count {
        /// The waiter.
        waiter: ConnKey,
        /// The count.
        n: u64,
    },
    /// Stop accepting and close every connection with 1001.
    Shutdown,
}

/// What the router asks its caller to do. `C` is the caller's handle of a connection.
#[derive(Debug)]
pub enum Action<C> {
    /// Queue `frame` on this live connection of this core.
    Push {
        /// The connection.
        conn: C,
        /// The frame.
        frame: Bytes,
    },
    /// Queue `frames`, in order, on each of these live connections of this core: the
    /// publishes to one room that the core handled one after another (see
    /// [`Router::flush_fanout`]). The caller may join the frames into one buffer first.
    Fanout {
        /// The room's members on this core.
        conns: Vec<C>,
        /// The frames, oldest first.
        frames: Vec<Bytes>,
    },
    /// Send `msg` to core `core` (FIFO per pair of cores).
    Post {
        /// The destination.
        core: usize,
        /// The message.
        msg: Msg,
    },
    /// The connection's registration is settled: welcome it (`ok`) or refuse it (429).
    Registered {
        /// The connection.
        conn: C,
        /// Accepted.
        ok: bool,
    },
    /// Close the connection with 1008 ("disconnected by the server").
    Kick {
        /// The connection.
        conn: C,
    },
    /// An API call's count is in.
    Answer {
        /// The caller's token.
        token: u64,
        /// The count.
        n: u64,
    },
    /// Shutdown was asked for.
    Shutdown,
    /// Hand this to the node's broker bridge (cluster mode only).
    Cluster(ClusterOut),
}

/// Outcome of a `join`.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Member now (or already); the ack is sent (or held until the owner confirms).
    Ok,
    /// At `max_rooms_per_conn` already.
    TooMany,
}

/// A connection as the router holds it.
pub struct Entry<C> {
    /// The authenticated user; `None` for echo connections (not in the directory).
    pub user: Option<Rc<str>>,
    /// The caller's handle.
    pub handle: C,
    /// Rooms this connection is a member of (empty for most connections).
    rooms: Vec<Box<str>>,
}

/// This core's members of one room.
struct LocalRoom {
    members: IndexSet<ConnKey>,
    /// Numbers this appearance of the set (see [`Msg::RoomCores`]).
    seq: u64,
    /// The room's owner has recorded that this core has members.
    confirmed: bool,
    /// Join acks held until then: (connection, request id).
    waiting: Vec<(ConnKey, Box<RawValue>)>,
}

/// Publishes to one room that this core handled one after another and has not yet handed to
/// the room's members here (see [`Router::flush_fanout`]).
struct Fanout {
    room: Box<str>,
    frames: Vec<Bytes>,
    bytes: usize,
}

/// The most frames a pending fan-out gathers before it is handed out.
const FANOUT_MAX_FRAMES: usize = 1024;
/// The most bytes it gathers (a member's queue takes it as one buffer; far below the
/// smallest sensible `--max-queued-bytes` share of a read).
const FANOUT_MAX_BYTES: usize = 64 * 1024;

/// One core's routing state.
pub struct Router<C> {
    id: usize,
    owners: Owners,
    limits: Limits,
    stats: Arc<CoreStats>,
    conns: GenSlab<Entry<C>>,
    directory: HashMap<Box<str>, KeyList>,
    rooms: HashMap<Box<str>, LocalRoom>,
    owned_rooms: HashMap<Box<str>, CoreSet>,
    room_seq: u64,
    waiters: GenSlab<Waiter>,
    out: Vec<Action<C>>,
    /// Room messages handled and not yet handed to this core's members.
    fanout: Option<Fanout>,
    /// Cluster mode: requests also go to the other nodes through the broker.
    cluster: bool,
    /// Subscriptions this core asked for and the broker has not confirmed yet.
    interest: HashMap<(Kind, Box<str>), (u64, Vec<Held>)>,
    interest_seq: u64,
}

impl<C: Clone> Router<C> {
    /// The router of core `id`.
    pub fn new(id: usize, owners: Owners, limits: Limits, stats: Arc<CoreStats>) -> Self {
        Router {
            id,
            owners,
            limits,
            stats,
            conns: GenSlab::new(id),
            directory: HashMap::new(),
            rooms: HashMap::new(),
            owned_rooms: HashMap::new(),
            room_seq: 0,
            waiters: GenSlab::new(id),
            out: Vec::new(),
            fanout: None,
            cluster: false,
            interest: HashMap::new(),
            interest_seq: 0,
        }
    }

    /// Turns cluster mode on: requests also go to the other nodes (through
    /// [`Action::Cluster`]), users and rooms are subscribed on the broker while this node
    /// holds them, and welcomes and join acks wait for those subscriptions.
    pub fn set_cluster(&mut self, on: bool) {
        self.cluster = on;
    }

    /// This core's id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Moves the actions produced so far into `into` (appending). A pending fan-out stays
    /// pending: see [`Router::flush_fanout`].
    pub fn take_actions(&mut self, into: &mut Vec<Action<C>>) {
        into.append(&mut self.out);
    }

    /// Whether room messages wait for [`Router::flush_fanout`].
    pub fn has_fanout(&self) -> bool {
        self.fanout.is_some()
    }

    /// Hands the pending room messages to the room's members on this core, as one
    /// [`Action::Fanout`].
    ///
    /// Publishes to one room handled one after another (the publishes of one read, the
    /// room messages of one mailbox batch) are gathered, so that each member's queue gets
    /// them in one piece and its writer sends them in one write, instead of one queue entry
    /// and one write per message and member. The caller flushes once it has handled what was
    /// ready (the gateway: after the other tasks that ran in the same pass). The router
    /// flushes by itself before anything that could reorder a member's frames or change who
    /// gets them: another frame for a member of the room, a broadcast, a join or leave of the
    /// room, a removal, a publish to another room. The members are the room's members when
    /// the messages were handled (no membership change of the room happens in between), so
    /// `delivered` counts stay exact.
    pub fn flush_fanout(&mut self) {
        let Some(f) = self.fanout.take() else {
            return;
        };
        let Some(local) = self.rooms.get(&f.room) else {
            return;
        };
        let conns: Vec<C> = local
            .members
            .iter()
            .filter_map(|k| self.conns.get(*k).map(|e| e.handle.clone()))
            .collect();
        if !conns.is_empty() {
            self.out.push(Action::Fanout {
                conns,
                frames: f.frames,
            });
        }
    }

    /// Flushes the pending fan-out if `key` is a member of its room (a frame for `key` must
    /// not overtake it).
    fn flush_fanout_for(&mut self, key: ConnKey) {
        let member = match &self.fanout {
            Some(f) => self
                .rooms
                .get(&f.room)
                .is_some_and(|r| r.members.contains(&key)),
            None => false,
        };
        if member {
            self.flush_fanout();
        }
    }

    /// Flushes the pending fan-out if it is for `room` (its members are about to change).
    fn flush_fanout_of(&mut self, room: &str) {
        if self.fanout.as_ref().is_some_and(|f| &*f.room == room) {
            self.flush_fanout();
        }
    }

    /// This core's connections.
    pub fn conns(&self) -> &GenSlab<Entry<C>> {
        &self.conns
    }

    /// The handle of a live connection of this core (`None` for a stale key).
    pub fn get(&self, key: ConnKey) -> Option<&C> {
        self.conns.get(key).map(|e| &e.handle)
    }

    // ---- connection life -------------------------------------------------------------------

    /// Adds a connection of this core; `Err` gives the handle back when the table is full.
    /// A user connection must then [`register`](Router::register) before it is welcomed.
    pub fn insert(&mut self, user: Option<Rc<str>>, handle: C) -> Result<ConnKey, C> {
        self.conns
            .insert(Entry {
                user,
                handle,
                rooms: Vec::new(),
            })
            .map_err(|e| e.handle)
    }

    /// Registers a connection with its user's owner; [`Action::Registered`] follows.
    pub fn register(&mut self, key: ConnKey) {
        let Some(user) = self.conns.get(key).and_then(|e| e.user.clone()) else {
            return;
        };
        let msg = Msg::Register {
            user: (*user).into(),
            key,
        };
        self.on_owner_of(&user, msg);
    }

    /// Forgets a connection: slab slot, rooms and directory entry. A stale key is a no-op
    /// (returns `None`).
    pub fn remove(&mut self, key: ConnKey) -> Option<Entry<C>> {
        let entry = self.conns.remove(key)?;
        for room in &entry.rooms {
            self.leave_room_set(key, room);
        }
        if let Some(user) = &entry.user {
            let msg = Msg::Unregister {
                user: (**user).into(),
                key,
            };
            self.on_owner_of(user, msg);
        }
        Some(entry)
    }

    // ---- cross-core messages ---------------------------------------------------------------

    /// Applies a message another core sent (or this core sent itself).
    pub fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Register { user, key } => self.directory_add(user, key),
            Msg::Registered { key, ok } => self.on_registered(key, ok),
            Msg::Unregister { user, key } => self.directory_remove(&user, key),
            Msg::Route { user, frame, reply } => self.route_owned(&user, frame, reply),
            Msg::Deliver { keys, frame } => {
                for key in keys {
                    self.deliver_local(key, frame.clone());
                }
            }
            Msg::RoomPublish {
                room,
                frame,
                origin,
                reply,
            } => {
                let local = self.publish_local(&room, &frame);
                self.fan_out_room(&room, &frame, origin, local, reply.map(Done::Reply));
            }
            Msg::RoomDeliver {
                room,
                frame,
                waiter,
            } => {
                let n = self.publish_local(&room, &frame);
                if let Some(w) = waiter {
                    self.count_to(w, n);
                }
            }
            Msg::Broadcast { frame, waiter } => {
                let n = self.broadcast_local(&frame);
                if let Some(w) = waiter {
                    self.count_to(w, n);
                }
            }
            Msg::Presence { user, waiter } => {
                let n = self.presence_owned(&user);
                self.count_to(waiter, n);
            }
            Msg::Disconnect { user, waiter } => {
                let n = self.disconnect_owned(&user);
                self.count_to(waiter, n);
            }
            Msg::Kick { keys } => {
                for key in keys {
                    self.kick_local(key);
                }
            }
            Msg::RoomCores {
                room,
                core,
                present,
                seq,
            } => self.room_cores_owned(room, core, present, seq),
            Msg::RoomConfirmed { room, seq } => self.room_confirmed(&room, seq),
            Msg::Subscribed { kind, name, seq } => self.subscribed(kind, name, seq),
            Msg::Remote { req, token } => self.remote(req, token),
            Msg::Count { waiter, n } => self.count(waiter, n),
            Msg::Shutdown => {
                self.flush_fanout();
                self.out.push(Action::Shutdown);
            }
        }
    }

    fn post(&mut self, core: usize, msg: Msg) {
        debug_assert_ne!(core, self.id);
        self.out.push(Action::Post { core, msg });
    }

    /// Handles `msg` on the owner of `id` (a user or a room): right here when this core owns
    /// it, else posted there.
    fn on_owner_of(&mut self, id: &str, msg: Msg) {
        let owner = self.owners.of(id);
        if owner == self.id {
            self.handle(msg);
        } else {
            self.post(owner, msg);
        }
    }

    // ---- directory -------------------------------------------------------------------------

    fn directory_add(&mut self, user: Box<str>, key: ConnKey) {
        let limit = self.limits.max_connections_per_user;
        let full = limit > 0 && self.directory.get(&user).is_some_and(|k| k.len() >= limit);
        if !full {
            let stats = &self.stats;
            let mut created = false;
            let keys = self.directory.entry(user.clone()).or_insert_with(|| {
                stats::add_gauge(&stats.users, 1);
                created = true;
                KeyList::new()
            });
            if let Err(pos) = keys.binary_search(&key) {
                keys.insert(pos, key);
            }
            // Cluster mode: the first connection of the user on this node subscribes to the
            // user's subject, and every registration waits until the broker has it.
            if created && self.cluster {
                self.interest_on(Kind::User, user, Held::Register(key));
                return;
            }
            if let Some((_, held)) = self.interest.get_mut(&(Kind::User, user)) {
                held.push(Held::Register(key));
                return;
            }
        }
        if key.core() == self.id {
            self.on_registered(key, !full);
        } else {
            self.post(key.core(), Msg::Registered { key, ok: !full });
        }
    }

    fn directory_remove(&mut self, user: &str, key: ConnKey) {
        if let Some(keys) = self.directory.get_mut(user) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.directory.remove(user);
                stats::add_gauge(&self.stats.users, -1);
                if self.cluster {
                    self.interest_off(Kind::User, user);
                }
            }
        }
    }

    fn on_registered(&mut self, key: ConnKey, ok: bool) {
        if let Some(e) = self.conns.get(key) {
            let conn = e.handle.clone();
            self.flush_fanout_for(key);
            self.out.push(Action::Registered { conn, ok });
        }
    }

    /// On the owner: a copy of `user`'s keys, sorted so that each core's keys are contiguous.
    fn user_keys(&self, user: &str) -> KeyList {
        self.directory.get(user).cloned().unwrap_or_default()
    }

    // ---- routing ---------------------------------------------------------------------------

    /// Delivers `frame` to every connection of `to`; `reply` learns how many there were.
    pub fn send(&mut self, to: &str, frame: Bytes, reply: Option<Reply>) {
        let reply = if self.cluster {
            let done = self.also_to_cluster(reply.map(Done::Reply), || RemoteReq::Send {
                user: to.into(),
                frame: frame.clone(),
            });
            match done {
                Some(Done::Reply(r)) => Some(r),
                _ => None,
            }
        } else {
            reply
        };
        self.send_local(to, frame, reply);
    }

    /// Delivers `frame` to every connection of `to` on this node.
    fn send_local(&mut self, to: &str, frame: Bytes, reply: Option<Reply>) {
        let owner = self.owners.of(to);
        if owner == self.id {
            self.route_owned(to, frame, reply);
        } else {
            let msg = Msg::Route {
                user: to.into(),
                frame,
                reply,
            };
            self.post(owner, msg);
        }
    }

    /// On the owner: fan out to the user's connections, one `Deliver` per remote core.
    fn route_owned(&mut self, user: &str, frame: Bytes, reply: Option<Reply>) {
        let keys = self.user_keys(user);
        let delivered = keys.len() as u64;
        for group in keys.chunk_by(|a, b| a.core() == b.core()) {
            let core = group[0].core();
            if core == self.id {
                for key in group {
                    self.deliver_local(*key, frame.clone());
                }
            } else {
                let msg = Msg::Deliver {
                    keys: group.iter().copied().collect(),
                    frame: frame.clone(),
                };
                self.post(core, msg);
            }
        }
        stats::add(&self.stats.deliveries, delivered);
        if let Some(reply) = reply {
            self.complete(reply, delivered);
        }
    }

    /// Hands a routed message's count to whoever waits for it.
    fn complete(&mut self, reply: Reply, n: u64) {
        match reply {
            Reply::Ack { conn, id } => self.deliver(conn, protocol::ack(&id, Some(n))),
            Reply::Waiter(key) => self.count_to(key, n),
            Reply::Remote(token) => self
                .out
                .push(Action::Cluster(ClusterOut::Answer { token, n })),
        }
    }

    fn count_to(&mut self, waiter: ConnKey, n: u64) {
        if waiter.core() == self.id {
            self.count(waiter, n);
        } else {
            self.post(waiter.core(), Msg::Count { waiter, n });
        }
    }

    /// Adds a count to a local waiter; the last count finishes it. A stale key is a no-op.
    fn count(&mut self, key: ConnKey, n: u64) {
        let Some(w) = self.waiters.get_mut(key) else {
            return;
        };
        w.sum += n;
        w.remaining = w.remaining.saturating_sub(1);
        if w.remaining > 0 {
            return;
        }
        if let Some(w) = self.waiters.remove(key) {
            self.finish(w.done, w.sum);
        }
    }

    fn finish(&mut self, done: Done, sum: u64) {
        match done {
            Done::Ack { conn, id } => self.deliver(conn, protocol::ack(&id, Some(sum))),
            Done::Local(token) => self.out.push(Action::Answer { token, n: sum }),
            Done::Remote(token) => self
                .out
                .push(Action::Cluster(ClusterOut::Answer { token, n: sum })),
            Done::Reply(reply) => self.complete(reply, sum),
        }
    }

    // ---- cluster mode ----------------------------------------------------------------------

    /// Subscribes to a user's or room's subject; `first` waits for the confirmation.
    fn interest_on(&mut self, kind: Kind, name: Box<str>, first: Held) {
        self.interest_seq += 1;
        let seq = self.interest_seq;
        self.out.push(Action::Cluster(ClusterOut::Interest {
            kind,
            name: name.clone(),
            on: true,
            seq,
        }));
        self.interest.insert((kind, name), (seq, vec![first]));
    }

    /// Drops a subscription. What still waited on it is moot: those connections or member
    /// sets are gone already.
    fn interest_off(&mut self, kind: Kind, name: &str) {
        self.interest.remove(&(kind, Box::from(name)));
        self.out.push(Action::Cluster(ClusterOut::Interest {
            kind,
            name: name.into(),
            on: false,
            seq: 0,
        }));
    }

    /// The broker confirmed subscription `seq`: what waited on it goes on.
    fn subscribed(&mut self, kind: Kind, name: Box<str>, seq: u64) {
        let key = (kind, name);
        match self.interest.get(&key) {
            Some((s, _)) if *s == seq => {}
            // An older subscription (dropped since): nothing waits on it.
            _ => return,
        }
        let (_, held) = self.interest.remove(&key).expect("present");
        for h in held {
            self.release(&key.1, h);
        }
    }

    fn release(&mut self, name: &str, held: Held) {
        match held {
            Held::Register(key) => {
                // Still in the directory? (It may have closed while waiting.)
                let ok = self.directory.get(name).is_some_and(|k| k.contains(&key));
                if !ok {
                    return;
                }
                if key.core() == self.id {
                    self.on_registered(key, true);
                } else {
                    self.post(key.core(), Msg::Registered { key, ok: true });
                }
            }
            Held::RoomConfirm { core, seq } => {
                if core == self.id {
                    self.room_confirmed(name, seq);
                } else {
                    self.post(
                        core,
                        Msg::RoomConfirmed {
                            room: name.into(),
                            seq,
                        },
                    );
                }
            }
        }
    }

    /// Cluster mode: hands `req` to the other nodes. When `done` waits for a count, it now
    /// waits for two: this node's (through the returned waiter) and the other nodes' total
    /// (through the bridge). Outside cluster mode, `done` is returned as it is.
    fn also_to_cluster(
        &mut self,
        done: Option<Done>,
        req: impl FnOnce() -> RemoteReq,
    ) -> Option<Done> {
        if !self.cluster {
            return done;
        }
        let (local, waiter) = match done {
            Some(done) => match self.add_waiter(2, 0, done) {
                Some(w) => (Some(Done::Reply(Reply::Waiter(w))), Some(w)),
                // The waiter table is full: answered already.
                None => (None, None),
            },
            None => (None, None),
        };
        self.out
            .push(Action::Cluster(ClusterOut::Request { req: req(), waiter }));
        local
    }

    /// Another node's request: carried out on this node only, never sent on.
    fn remote(&mut self, req: RemoteReq, token: Option<u64>) {
        let done = token.map(Done::Remote);
        match req {
            RemoteReq::Send { user, frame } => {
                let reply = token.map(Reply::Remote);
                self.send_local(&user, frame, reply);
            }
            RemoteReq::Publish { room, frame } => {
                let local = self.publish_local(&room, &frame);
                self.publish_remote(&room, frame, local, done);
            }
            RemoteReq::Broadcast { frame } => self.broadcast_cores(frame, done),
            RemoteReq::Presence { user } => {
                self.ask_owner_done(&user, done, |user, waiter| Msg::Presence { user, waiter })
            }
            RemoteReq::Disconnect { user } => {
                self.ask_owner_done(&user, done, |user, waiter| Msg::Disconnect { user, waiter })
            }
        }
    }

    /// Registers a waiter for `remaining` counts starting from `sum`; `None` when the core's
    /// waiter table is full (then the caller is answered at once with `sum`).
    fn add_waiter(&mut self, remaining: usize, sum: u64, done: Done) -> Option<ConnKey> {
        match self.waiters.insert(Waiter {
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

    /// Delivers one frame to one connection on any core.
    pub fn deliver(&mut self, key: ConnKey, frame: Bytes) {
        if key.core() == self.id {
            self.deliver_local(key, frame);
        } else {
            let msg = Msg::Deliver {
                keys: smallvec::smallvec![key],
                frame,
            };
            self.post(key.core(), msg);
        }
    }

    /// Hands a frame to a connection of this core. A stale key is a no-op.
    fn deliver_local(&mut self, key: ConnKey, frame: Bytes) {
        if let Some(e) = self.conns.get(key) {
            let conn = e.handle.clone();
            self.flush_fanout_for(key);
            self.out.push(Action::Push { conn, frame });
        }
    }

    // ---- rooms -----------------------------------------------------------------------------

    /// Makes a connection of this core a member of `room`, and acks `id` (if any) once
    /// publishes from every core reach it: at once when the room's owner already knows this
    /// core has members, else when the owner confirms.
    pub fn join(&mut self, key: ConnKey, room: &str, id: Option<&RawValue>) -> Joined {
        // A new member must not get what was published before it joined.
        self.flush_fanout_of(room);
        let Some(entry) = self.conns.get_mut(key) else {
            return Joined::Ok;
        };
        if !entry.rooms.iter().any(|r| &**r == room) {
            if entry.rooms.len() >= self.limits.max_rooms_per_conn {
                return Joined::TooMany;
            }
            entry.rooms.push(room.into());
        }
        let owner_here = self.owners.of(room) == self.id;
        let mut appeared = None;
        let seq = self.room_seq + 1;
        let local = self.rooms.entry(room.into()).or_insert_with(|| {
            appeared = Some(seq);
            LocalRoom {
                members: IndexSet::new(),
                seq,
                // In cluster mode even the owner's own set waits for the broker.
                confirmed: owner_here && !self.cluster,
                waiting: Vec::new(),
            }
        });
        local.members.insert(key);
        let ack_now = local.confirmed;
        if let (false, Some(id)) = (ack_now, id) {
            local.waiting.push((key, id.to_owned()));
        }
        if let Some(seq) = appeared {
            self.room_seq = seq;
            stats::add_gauge(&self.stats.local_rooms, 1);
            self.room_cores(room, true, seq);
        }
        if let (true, Some(id)) = (ack_now, id) {
            self.deliver_local(key, protocol::ack(id, None));
        }
        Joined::Ok
    }

    /// Ends a membership (a no-op when there is none).
    pub fn leave(&mut self, key: ConnKey, room: &str) {
        if let Some(entry) = self.conns.get_mut(key) {
            entry.rooms.retain(|r| &**r != room);
        }
        self.leave_room_set(key, room);
    }

    fn leave_room_set(&mut self, key: ConnKey, room: &str) {
        // A member that leaves still gets what was published while it was in.
        self.flush_fanout_of(room);
        let Some(local) = self.rooms.get_mut(room) else {
            return;
        };
        local.members.swap_remove(&key);
        // A join ack still held goes out before whatever follows the leave (its ack).
        let mut acks: Vec<(ConnKey, Box<RawValue>)> = Vec::new();
        let emptied = if local.members.is_empty() {
            let gone = self.rooms.remove(room).expect("present");
            acks = gone.waiting;
            Some(gone.seq)
        } else {
            local.waiting.retain(|(k, id)| {
                if *k == key {
                    acks.push((*k, id.clone()));
                }
                *k != key
            });
            None
        };
        for (k, id) in acks {
            self.deliver_local(k, protocol::ack(&id, None));
        }
        if let Some(seq) = emptied {
            stats::add_gauge(&self.stats.local_rooms, -1);
            self.room_cores(room, false, seq);
        }
    }

    /// Tells `room`'s owner that this core's member set appeared or emptied.
    fn room_cores(&mut self, room: &str, present: bool, seq: u64) {
        let msg = Msg::RoomCores {
            room: room.into(),
            core: self.id,
            present,
            seq,
        };
        self.on_owner_of(room, msg);
    }

    /// On a room's owner: which cores hold members; the room exists while any does.
    fn room_cores_owned(&mut self, room: Box<str>, core: usize, present: bool, seq: u64) {
        let Ok(c) = u8::try_from(core) else {
            return;
        };
        if present {
            let set = self.owned_rooms.entry(room.clone()).or_default();
            let created = set.is_empty();
            if created {
                stats::add_gauge(&self.stats.rooms, 1);
            }
            if let Err(pos) = set.binary_search(&c) {
                set.insert(pos, c);
            }
            let held = Held::RoomConfirm { core, seq };
            if created && self.cluster {
                // The room's subject is subscribed while this node has members; the join
                // acks wait until the broker has the subscription.
                self.interest_on(Kind::Room, room, held);
            } else if let Some((_, waiting)) = self.interest.get_mut(&(Kind::Room, room.clone())) {
                waiting.push(held);
            } else {
                self.release(&room, held);
            }
        } else if let Some(set) = self.owned_rooms.get_mut(&room) {
            set.retain(|x| *x != c);
            if set.is_empty() {
                self.owned_rooms.remove(&room);
                stats::add_gauge(&self.stats.rooms, -1);
                if self.cluster {
                    self.interest_off(Kind::Room, &room);
                }
            }
        }
    }

    /// On a member core: the owner has recorded member set `seq`; held join acks go out.
    fn room_confirmed(&mut self, room: &str, seq: u64) {
        let waiting = match self.rooms.get_mut(room) {
            Some(local) if local.seq == seq => {
                local.confirmed = true;
                std::mem::take(&mut local.waiting)
            }
            // An older appearance of the set (it emptied since): nothing to do.
            _ => return,
        };
        for (key, id) in waiting {
            self.deliver_local(key, protocol::ack(&id, None));
        }
    }

    /// Delivers to this core's members of `room`; returns how many.
    fn publish_local(&mut self, room: &str, frame: &Bytes) -> u64 {
        let Some(local) = self.rooms.get(room) else {
            return 0;
        };
        let n = local.members.len() as u64;
        stats::add(&self.stats.deliveries, n);
        match &mut self.fanout {
            Some(f)
                if *f.room == *room
                    && f.frames.len() < FANOUT_MAX_FRAMES
                    && f.bytes + frame.len() <= FANOUT_MAX_BYTES =>
            {
                f.frames.push(frame.clone());
                f.bytes += frame.len();
            }
            _ => {
                self.flush_fanout();
                self.fanout = Some(Fanout {
                    room: room.into(),
                    frames: vec![frame.clone()],
                    bytes: frame.len(),
                });
            }
        }
        n
    }

    /// Publishes to every member of `room` on every core; `ack` names the requesting
    /// connection and its `id` when the total `delivered` must be acked.
    pub fn publish(&mut self, room: &str, frame: Bytes, ack: Option<(ConnKey, Box<RawValue>)>) {
        let done = ack.map(|(conn, id)| Done::Ack { conn, id });
        let done = self.also_to_cluster(done, || RemoteReq::Publish {
            room: room.into(),
            frame: frame.clone(),
        });
        let local = self.publish_local(room, &frame);
        self.publish_remote(room, frame, local, done);
    }

    /// After delivering to this core's members: the other cores with members get the frame
    /// through the room's owner, which alone knows where they are.
    fn publish_remote(&mut self, room: &str, frame: Bytes, local: u64, done: Option<Done>) {
        let owner = self.owners.of(room);
        if owner == self.id {
            self.fan_out_room(room, &frame, self.id, local, done);
            return;
        }
        let reply = match done {
            Some(done) => self.add_waiter(1, local, done).map(Reply::Waiter),
            None => None,
        };
        let msg = Msg::RoomPublish {
            room: room.into(),
            frame,
            origin: self.id,
            reply,
        };
        self.post(owner, msg);
    }

    /// On a room's owner (which has delivered to its own members, `sum` so far): sends the
    /// frame to every other core with members except `origin`, and gathers their counts.
    fn fan_out_room(
        &mut self,
        room: &str,
        frame: &Bytes,
        origin: usize,
        sum: u64,
        done: Option<Done>,
    ) {
        let targets: CoreSet = match self.owned_rooms.get(room) {
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
            let msg = Msg::RoomDeliver {
                room: room.into(),
                frame: frame.clone(),
                waiter,
            };
            self.post(usize::from(core), msg);
        }
    }

    /// Delivers to every user connection of this core; returns how many.
    fn broadcast_local(&mut self, frame: &Bytes) -> u64 {
        self.flush_fanout();
        let mut n = 0;
        for (_, e) in self.conns.iter() {
            if e.user.is_some() {
                n += 1;
                self.out.push(Action::Push {
                    conn: e.handle.clone(),
                    frame: frame.clone(),
                });
            }
        }
        stats::add(&self.stats.deliveries, n);
        n
    }

    // ---- backend API -----------------------------------------------------------------------

    /// `POST /api/send`: [`Action::Answer`] with `token` carries the count.
    pub fn api_send(&mut self, user: &str, frame: Bytes, token: u64) {
        if let Some(key) = self.add_waiter(1, 0, Done::Local(token)) {
            self.send(user, frame, Some(Reply::Waiter(key)));
        }
    }

    /// `POST /api/publish`.
    pub fn api_publish(&mut self, room: &str, frame: Bytes, token: u64) {
        let done = self.also_to_cluster(Some(Done::Local(token)), || RemoteReq::Publish {
            room: room.into(),
            frame: frame.clone(),
        });
        let local = self.publish_local(room, &frame);
        self.publish_remote(room, frame, local, done);
    }

    /// `POST /api/broadcast`: every user connection on every core.
    pub fn api_broadcast(&mut self, frame: Bytes, token: u64) {
        let done = self.also_to_cluster(Some(Done::Local(token)), || RemoteReq::Broadcast {
            frame: frame.clone(),
        });
        self.broadcast_cores(frame, done);
    }

    /// Delivers to every user connection of every core of this node.
    fn broadcast_cores(&mut self, frame: Bytes, done: Option<Done>) {
        let local = self.broadcast_local(&frame);
        let others = self.owners.cores() - 1;
        let waiter = match done {
            Some(done) if others == 0 => {
                self.finish(done, local);
                None
            }
            Some(done) => self.add_waiter(others, local, done),
            None => None,
        };
        let me = self.id;
        for core in (0..self.owners.cores()).filter(|c| *c != me) {
            let msg = Msg::Broadcast {
                frame: frame.clone(),
                waiter,
            };
            self.post(core, msg);
        }
    }

    /// `GET /api/presence/{user}`.
    pub fn api_presence(&mut self, user: &str, token: u64) {
        let remote = |user| RemoteReq::Presence { user };
        self.ask_owner(user, token, remote, |user, waiter| Msg::Presence {
            user,
            waiter,
        });
    }

    /// `POST /api/disconnect`.
    pub fn api_disconnect(&mut self, user: &str, token: u64) {
        let remote = |user| RemoteReq::Disconnect { user };
        self.ask_owner(user, token, remote, |user, waiter| Msg::Disconnect {
            user,
            waiter,
        });
    }

    fn ask_owner(
        &mut self,
        user: &str,
        token: u64,
        remote: fn(Box<str>) -> RemoteReq,
        msg: fn(Box<str>, ConnKey) -> Msg,
    ) {
        let done = self.also_to_cluster(Some(Done::Local(token)), || remote(user.into()));
        self.ask_owner_done(user, done, msg);
    }

    fn ask_owner_done(
        &mut self,
        user: &str,
        done: Option<Done>,
        msg: fn(Box<str>, ConnKey) -> Msg,
    ) {
        let Some(done) = done else { return };
        if let Some(waiter) = self.add_waiter(1, 0, done) {
            // Handled here when this core owns the user (the same rules either way).
            self.on_owner_of(user, msg(user.into(), waiter));
        }
    }

    /// On the owner: how many connections `user` has.
    fn presence_owned(&self, user: &str) -> u64 {
        self.directory.get(user).map_or(0, |k| k.len() as u64)
    }

    /// On the owner: closes every connection of `user` with 1008; returns how many.
    fn disconnect_owned(&mut self, user: &str) -> u64 {
        let keys = self.user_keys(user);
        for group in keys.chunk_by(|a, b| a.core() == b.core()) {
            let core = group[0].core();
            if core == self.id {
                for key in group {
                    self.kick_local(*key);
                }
            } else {
                let msg = Msg::Kick {
                    keys: group.iter().copied().collect(),
                };
                self.post(core, msg);
            }
        }
        keys.len() as u64
    }

    fn kick_local(&mut self, key: ConnKey) {
        if let Some(e) = self.conns.get(key) {
            let conn = e.handle.clone();
            self.flush_fanout_for(key);
            self.out.push(Action::Kick { conn });
        }
    }

    // ---- introspection (tests, the simulation) ---------------------------------------------

    /// The connection keys of `user` in this core's directory (meaningful on its owner).
    pub fn directory_keys(&self, user: &str) -> KeyList {
        self.user_keys(user)
    }

    /// Users in this core's directory.
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// This core's members of `room`.
    pub fn local_members(&self, room: &str) -> Vec<ConnKey> {
        self.rooms
            .get(room)
            .map(|r| r.members.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Rooms with members on this core.
    pub fn local_room_count(&self) -> usize {
        self.rooms.len()
    }

    /// On a room's owner: the cores it knows to hold members.
    pub fn room_cores_of(&self, room: &str) -> Vec<usize> {
        self.owned_rooms
            .get(room)
            .map(|s| s.iter().map(|c| usize::from(*c)).collect())
            .unwrap_or_default()
    }

    /// Rooms this core owns that have members somewhere.
    pub fn owned_room_count(&self) -> usize {
        self.owned_rooms.len()
    }

    /// Waiters still open on this core.
    pub fn waiter_count(&self) -> usize {
        self.waiters.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<u32> {
        let limits = Limits {
            max_rooms_per_conn: 8,
            max_connections_per_user: 0,
        };
        Router::new(0, Owners::with_keys(1, (1, 2)), limits, Arc::default())
    }

    fn member(r: &mut Router<u32>, handle: u32, room: &str) -> ConnKey {
        let key = r.insert(Some(format!("u{handle}").into()), handle).unwrap();
        r.register(key);
        assert_eq!(r.join(key, room, None), Joined::Ok);
        key
    }

    /// What the actions do to each connection, in order: (handle, frame).
    fn pushes(r: &mut Router<u32>) -> Vec<(u32, Bytes)> {
        let mut actions = Vec::new();
        r.take_actions(&mut actions);
        let mut out = Vec::new();
        for a in actions {
            match a {
                Action::Push { conn, frame } => out.push((conn, frame)),
                Action::Fanout { conns, frames } => {
                    for c in conns {
                        out.extend(frames.iter().map(|f| (c, f.clone())));
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn fanouts(r: &mut Router<u32>) -> Vec<(Vec<u32>, Vec<Bytes>)> {
        let mut actions = Vec::new();
        r.take_actions(&mut actions);
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Fanout { conns, frames } => Some((conns, frames)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn publishes_in_a_row_reach_each_member_as_one_fanout() {
        let mut r = router();
        member(&mut r, 1, "lobby");
        member(&mut r, 2, "lobby");
        pushes(&mut r);
        for i in 0..3 {
            r.publish("lobby", Bytes::from(format!("m{i}")), None);
        }
        assert!(r.has_fanout());
        assert!(fanouts(&mut r).is_empty(), "held until the flush");
        r.flush_fanout();
        assert!(!r.has_fanout());
        let f = fanouts(&mut r);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, vec![1, 2]);
        assert_eq!(f[0].1, vec!["m0", "m1", "m2"]);
    }

    #[test]
    fn anything_that_could_reorder_or_change_the_members_flushes_first() {
        let mut r = router();
        let a = member(&mut r, 1, "lobby");
        member(&mut r, 2, "lobby");
        member(&mut r, 3, "other");
        pushes(&mut r);

        // An ack to a member comes after the room messages published before it.
        let id = RawValue::from_string("7".into()).unwrap();
        r.publish("lobby", Bytes::from_static(b"m0"), Some((a, id)));
        let got = pushes(&mut r);
        let to_a: Vec<&Bytes> = got
            .iter()
            .filter(|(c, _)| *c == 1)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(to_a.len(), 2);
        assert_eq!(to_a[0], "m0");
        assert!(to_a[1].windows(12).any(|w| w == br#""type":"ack""#));

        // A newcomer does not get what was published before its join; one who leaves gets
        // what was published while it was in.
        r.publish("lobby", Bytes::from_static(b"m1"), None);
        member(&mut r, 4, "lobby");
        r.publish("lobby", Bytes::from_static(b"m2"), None);
        r.leave(a, "lobby");
        r.publish("lobby", Bytes::from_static(b"m3"), None);
        r.flush_fanout();
        let got = pushes(&mut r);
        let frames_of = |h: u32| -> Vec<Bytes> {
            got.iter()
                .filter(|(c, f)| *c == h && f.starts_with(b"m"))
                .map(|(_, f)| f.clone())
                .collect()
        };
        assert_eq!(frames_of(1), vec!["m1", "m2"]);
        assert_eq!(frames_of(2), vec!["m1", "m2", "m3"]);
        assert_eq!(frames_of(4), vec!["m2", "m3"]);

        // A publish to another room hands out the pending one first.
        r.publish("lobby", Bytes::from_static(b"m4"), None);
        r.publish("other", Bytes::from_static(b"o1"), None);
        assert_eq!(fanouts(&mut r).len(), 1);
        r.flush_fanout();
        let f = fanouts(&mut r);
        assert_eq!(f, vec![(vec![3], vec![Bytes::from_static(b"o1")])]);
    }

    #[test]
    fn a_fanout_is_bounded_in_bytes() {
        let mut r = router();
        member(&mut r, 1, "lobby");
        pushes(&mut r);
        let frame = Bytes::from(vec![b'x'; 1000]);
        for _ in 0..100 {
            r.publish("lobby", frame.clone(), None);
        }
        r.flush_fanout();
        let f = fanouts(&mut r);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].1.len(), FANOUT_MAX_BYTES / 1000);
        assert_eq!(f.iter().map(|x| x.1.len()).sum::<usize>(), 100);
    }
}
