//! Deterministic simulation of the router: several cores' [`Router`]s, connected by FIFO
//! queues (one per ordered pair of cores, as the mailboxes are), driven by a seeded scheduler
//! that interleaves connect, close, reconnect, send, join, leave, publish, API calls and the
//! delivery of cross-core messages in whatever order the seed picks. After every step and at
//! the end it checks the invariants the gateway promises:
//!
//! * stale keys never act: a closed connection never receives anything, and a connection
//!   never gets a room message for a room it has left;
//! * per-sender order: each recipient sees each sender's messages to a user (or a room) in
//!   the order they were sent, without duplicates;
//! * no silent loss: a connection that was welcomed (or whose join was acked) before a message
//!   was sent, and stays open, receives it;
//! * counts are exact whenever the system is quiet: `delivered`, presence, and the users and
//!   rooms gauges;
//! * nothing leaks: once everyone has gone, every directory, room table, waiter table and
//!   connection slab is empty.
//!
//! The network of cores is a `Node`. A second test runs two or three nodes in cluster mode,
//! joined by a model of the broker bridge (`src/cluster.rs`) and of the broker: subjects with
//! subscriptions registered when the bridge handles them, one FIFO per (publisher, subscriber,
//! subject), probes and gathered counts; a count that can never complete is timed out as the
//! bridge's `--cluster-timeout` would, and is an error when the system was quiet. The same
//! invariants are checked across nodes. Defaults: 1,500 seeds of 250 steps (500 for the
//! cluster). `WSGATE_SIM_SEEDS=N` runs more; `WSGATE_SIM_SEED=S` replays one seed and
//! prints its trace. A failure prints the seed and the command that replays it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use wsgate::key::ConnKey;
use wsgate::route::{
    Action, ClusterOut, Joined, Kind, Limits, Msg, Owners, RemoteReq, Reply, Router,
};
use wsgate::stats::CoreStats;

mod common;
use common::Rng;

/// A simulated connection, named by an id that is never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct H(usize);

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    Connecting,
    Live,
    Closed,
}

struct Conn {
    node: usize,
    core: usize,
    key: ConnKey,
    user: String,
    state: State,
    /// Rooms whose join was acked and not left since.
    member_of: HashSet<String>,
    /// Rooms joined (acked or not) and not left: room messages for others are violations.
    joined: HashSet<String>,
    /// Last sequence number seen per (sender, target).
    last_seen: HashMap<(usize, String), u64>,
    /// Everything received: (sender, target, seq).
    received: HashSet<(usize, String, u64)>,
    next_seq: u64,
    /// How many times the connection left each room (a member that left and came back may
    /// have missed what was published while it was out).
    leaves: HashMap<String, u32>,
    /// Acks received: request id -> delivered (None for join acks).
    acks: HashMap<u64, Option<u64>>,
    /// Join requests in flight: request id -> room.
    pending_joins: HashMap<u64, String>,
}

impl Conn {
    /// A connection just inserted on `core` of `node`, not yet registered.
    fn new(node: usize, core: usize, key: ConnKey, user: String) -> Conn {
        Conn {
            node,
            core,
            key,
            user,
            state: State::Connecting,
            member_of: HashSet::new(),
            joined: HashSet::new(),
            last_seen: HashMap::new(),
            received: HashSet::new(),
            leaves: HashMap::new(),
            next_seq: 1,
            acks: HashMap::new(),
            pending_joins: HashMap::new(),
        }
    }
}

/// A message that must reach `recipients` (those that stay open).
struct Expect {
    sender: usize,
    target: String,
    seq: u64,
    recipients: Vec<usize>,
    /// For a room message: each recipient's leave count when it was published.
    leaves: Vec<u32>,
}

/// One gateway process: its cores and the FIFO paths between them (and from its bridge).
struct Node {
    cores: Vec<Router<H>>,
    stats: Vec<Arc<CoreStats>>,
    queues: BTreeMap<(usize, usize), VecDeque<Msg>>,
    owners: Owners,
    bridge: Bridge,
}

/// The `from` of the path from a node's bridge to one of its cores.
const BRIDGE: usize = usize::MAX;

/// A model of a node's broker bridge (src/cluster.rs).
#[derive(Default)]
struct Bridge {
    /// What the cores handed it, in order.
    inbox: VecDeque<(usize, ClusterOut)>,
    /// Subscriptions in place (the model registers and confirms in one step).
    subs: HashSet<(Kind, String)>,
    /// Counts gathered for this node's requests: token -> (nodes to hear from, sum, waiter).
    gathers: BTreeMap<u64, (HashSet<usize>, u64, ConnKey)>,
    /// Other nodes' counted requests carried out here: local token -> (origin, token).
    remote: HashMap<u64, (usize, u64)>,
    next: u64,
}

/// What travels between nodes.
enum Wire {
    Req {
        req: RemoteReq,
        token: u64,
    },
    Probe {
        kind: Kind,
        name: String,
        token: u64,
    },
    Answer {
        token: u64,
        n: u64,
    },
}

struct Sim {
    rng: Rng,
    nodes: Vec<Node>,
    /// Which nodes subscribe to each user or room subject.
    broker: BTreeMap<(Kind, String), BTreeSet<usize>>,
    /// One FIFO per (publisher, subscriber, subject).
    links: BTreeMap<(usize, usize, String), VecDeque<Wire>>,
    /// Quiet: a count that times out is an error.
    strict: bool,
    conns: Vec<Conn>,
    expects: Vec<Expect>,
    trace: Vec<String>,
    verbose: bool,
    next_token: u64,
    answers: HashMap<u64, u64>,
}

const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
const ROOMS: [&str; 3] = ["r0", "r1", "r2"];

fn raw(n: u64) -> Box<RawValue> {
    RawValue::from_string(n.to_string()).unwrap()
}

/// The JSON payload of a server text frame.
fn payload(frame: &[u8]) -> &[u8] {
    let len = frame[1] & 0x7f;
    let start = match len {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[start..]
}

impl Sim {
    /// A simulation of `nodes` nodes (cluster mode when more than one).
    fn new(seed: u64, verbose: bool, nodes: usize) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let limits = Limits {
            max_rooms_per_conn: 2,
            max_connections_per_user: 0,
        };
        let nodes = (0..nodes.max(1))
            .map(|_| {
                let cores = 1 + rng.below(4);
                let owners = Owners::with_keys(cores, (rng.next(), rng.next()));
                let stats: Vec<Arc<CoreStats>> = (0..cores).map(|_| Arc::default()).collect();
                let routers = (0..cores)
                    .map(|i| {
                        let mut r = Router::new(i, owners, limits, stats[i].clone());
                        r.set_cluster(nodes > 1);
                        r
                    })
                    .collect();
                Node {
                    cores: routers,
                    stats,
                    queues: BTreeMap::new(),
                    owners,
                    bridge: Bridge::default(),
                }
            })
            .collect();
        Sim {
            rng,
            nodes,
            broker: BTreeMap::new(),
            links: BTreeMap::new(),
            strict: false,
            conns: Vec::new(),
            expects: Vec::new(),
            trace: Vec::new(),
            verbose,
            next_token: 1,
            answers: HashMap::new(),
        }
    }

    fn log(&mut self, line: String) {
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
        if self.trace.len() > 40 {
            self.trace.remove(0);
        }
    }

    /// Carries out core `core`'s actions.
    fn run(&mut self, node: usize, core: usize) -> Result<(), String> {
        // Room messages a router gathers are handed out at some later point (the gateway:
        // once the other ready tasks have run): sometimes at once, sometimes after other
        // events (see `Ev::Flush`).
        if self.rng.below(2) == 0 {
            self.nodes[node].cores[core].flush_fanout();
        }
        let mut actions = Vec::new();
        self.nodes[node].cores[core].take_actions(&mut actions);
        for a in actions {
            match a {
                Action::Post { core: to, msg } => {
                    self.nodes[node]
                        .queues
                        .entry((core, to))
                        .or_default()
                        .push_back(msg);
                }
                Action::Push { conn, frame } => self.receive(conn.0, &frame)?,
                Action::Fanout { conns, frames } => {
                    for conn in conns {
                        for frame in &frames {
                            self.receive(conn.0, frame)?;
                        }
                    }
                }
                Action::Registered { conn, ok } => {
                    let c = &mut self.conns[conn.0];
                    if c.state == State::Closed {
                        return Err(format!("registration settled for closed conn {}", conn.0));
                    }
                    if !ok {
                        return Err(format!("conn {} refused with no limit set", conn.0));
                    }
                    c.state = State::Live;
                }
                Action::Kick { conn } => {
                    if self.conns[conn.0].state == State::Closed {
                        return Err(format!("kick of closed conn {}", conn.0));
                    }
                }
                Action::Answer { token, n } => {
                    self.answers.insert(token, n);
                }
                Action::Shutdown => return Err("unexpected shutdown".into()),
                Action::Cluster(out) => {
                    if self.nodes.len() == 1 {
                        return Err(format!("cluster action on a single node: {out:?}"));
                    }
                    self.nodes[node].bridge.inbox.push_back((core, out));
                }
            }
        }
        Ok(())
    }

    fn receive(&mut self, id: usize, frame: &Bytes) -> Result<(), String> {
        let c = &mut self.conns[id];
        if c.state == State::Closed {
            return Err(format!("stale key acted: conn {id} (closed) got a frame"));
        }
        if frame.starts_with(b"m|") {
            // m|sender|target|seq, target "@user" or a room name.
            let text = std::str::from_utf8(frame).unwrap();
            let parts: Vec<&str> = text.split('|').collect();
            let sender: usize = parts[1].parse().unwrap();
            let target = parts[2].to_string();
            let seq: u64 = parts[3].parse().unwrap();
            if !target.starts_with('@') && !c.joined.contains(&target) {
                return Err(format!(
                    "conn {id} got a message of room {target} it is not in"
                ));
            }
            let last = c.last_seen.entry((sender, target.clone())).or_insert(0);
            if seq <= *last {
                return Err(format!(
                    "order: conn {id} got seq {seq} from {sender} to {target} after {last}"
                ));
            }
            *last = seq;
            c.received.insert((sender, target, seq));
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_slice(payload(frame))
            .map_err(|e| format!("conn {id}: unreadable frame {frame:?}: {e}"))?;
        if v["type"] != "ack" {
            return Err(format!("conn {id}: unexpected frame {v}"));
        }
        let rid = v["id"].as_u64().unwrap();
        if c.acks.insert(rid, v["delivered"].as_u64()).is_some() {
            return Err(format!("conn {id}: ack {rid} twice"));
        }
        if let Some(room) = c.pending_joins.remove(&rid) {
            if c.joined.contains(&room) {
                c.member_of.insert(room);
            }
        }
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|i| self.conns[*i].state == State::Live)
            .collect()
    }

    fn open(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|i| self.conns[*i].state != State::Closed)
            .collect()
    }

    /// A random node (no draw with one node: single-node seeds replay as they always did).
    fn pick_node(&mut self) -> usize {
        if self.nodes.len() == 1 {
            0
        } else {
            self.rng.below(self.nodes.len())
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let node = self.pick_node();
        let core = self.rng.below(self.nodes[node].cores.len());
        let user = USERS[self.rng.below(USERS.len())].to_string();
        let id = self.conns.len();
        let key = self.nodes[node].cores[core]
            .insert(Some(user.as_str().into()), H(id))
            .map_err(|_| "slab full")?;
        self.log(format!(
            "connect conn {id} user {user} node {node} core {core} key {key}"
        ));
        self.conns.push(Conn::new(node, core, key, user));
        self.nodes[node].cores[core].register(key);
        self.run(node, core)
    }

    fn close(&mut self, id: usize) -> Result<(), String> {
        let (node, core, key) = (self.conns[id].node, self.conns[id].core, self.conns[id].key);
        self.log(format!("close conn {id}"));
        self.conns[id].state = State::Closed;
        if self.nodes[node].cores[core].remove(key).is_none() {
            return Err(format!("removing open conn {id} found nothing"));
        }
        // A second removal with the now stale key is a no-op.
        if self.nodes[node].cores[core].remove(key).is_some() {
            return Err(format!("stale removal of conn {id} removed something"));
        }
        self.run(node, core)
    }

    fn send(&mut self, from: usize) -> Result<(), String> {
        let to = USERS[self.rng.below(USERS.len())].to_string();
        let c = &mut self.conns[from];
        let seq = c.next_seq;
        c.next_seq += 1;
        let (node, core, key) = (c.node, c.core, c.key);
        let target = format!("@{to}");
        let frame = Bytes::from(format!("m|{from}|{target}|{seq}"));
        let recipients: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|i| self.conns[*i].user == to)
            .collect();
        self.log(format!(
            "send conn {from} -> {to} seq {seq} (live recipients {recipients:?})"
        ));
        self.expects.push(Expect {
            sender: from,
            target,
            seq,
            leaves: vec![0; recipients.len()],
            recipients,
        });
        let reply = Reply::Ack {
            conn: key,
            id: raw(seq),
        };
        self.nodes[node].cores[core].send(&to, frame, Some(reply));
        self.run(node, core)
    }

    fn join(&mut self, id: usize) -> Result<(), String> {
        let room = ROOMS[self.rng.below(ROOMS.len())].to_string();
        let c = &mut self.conns[id];
        let rid = c.next_seq;
        c.next_seq += 1;
        let (node, core, key) = (c.node, c.core, c.key);
        self.log(format!("join conn {id} {room} (req {rid})"));
        let joined = self.nodes[node].cores[core].join(key, &room, Some(&raw(rid)));
        let c = &mut self.conns[id];
        match joined {
            Joined::Ok => {
                c.joined.insert(room.clone());
                c.pending_joins.insert(rid, room);
            }
            Joined::TooMany => {
                if c.joined.len() < 2 {
                    return Err(format!("conn {id} refused a join with {:?}", c.joined));
                }
            }
        }
        self.run(node, core)
    }

    fn leave(&mut self, id: usize) -> Result<(), String> {
        let rooms: Vec<String> = self.conns[id].joined.iter().cloned().collect();
        let Some(room) = self.rng.pick(&rooms).cloned() else {
            return Ok(());
        };
        let (node, core, key) = (self.conns[id].node, self.conns[id].core, self.conns[id].key);
        self.log(format!("leave conn {id} {room}"));
        self.nodes[node].cores[core].leave(key, &room);
        // The held join ack (if any) went out before the leave returned.
        self.run(node, core)?;
        let c = &mut self.conns[id];
        if c.pending_joins.values().any(|r| *r == room) {
            return Err(format!(
                "conn {id}: join ack of {room} still held after leave"
            ));
        }
        c.joined.remove(&room);
        c.member_of.remove(&room);
        *c.leaves.entry(room).or_default() += 1;
        Ok(())
    }

    fn publish(&mut self, from: usize) -> Result<(), String> {
        let room = ROOMS[self.rng.below(ROOMS.len())].to_string();
        let c = &mut self.conns[from];
        let seq = c.next_seq;
        c.next_seq += 1;
        let (node, core, key) = (c.node, c.core, c.key);
        let frame = Bytes::from(format!("m|{from}|{room}|{seq}"));
        let recipients: Vec<usize> = self
            .open()
            .into_iter()
            .filter(|i| self.conns[*i].member_of.contains(&room))
            .collect();
        self.log(format!(
            "publish conn {from} -> {room} seq {seq} (members {recipients:?})"
        ));
        let leaves = recipients
            .iter()
            .map(|r| self.conns[*r].leaves.get(&room).copied().unwrap_or(0))
            .collect();
        self.expects.push(Expect {
            sender: from,
            target: room.clone(),
            seq,
            recipients,
            leaves,
        });
        self.nodes[node].cores[core].publish(&room, frame, Some((key, raw(seq))));
        self.run(node, core)
    }

    /// Takes one step of whatever is in flight, picked at random: the oldest message of a
    /// path between cores (or from a bridge to a core), of a bridge's inbox, of a link
    /// between nodes, or a core's gathered room messages handed to their members.
    fn deliver_one(&mut self) -> Result<bool, String> {
        enum Ev {
            Path(usize, usize, usize),
            Bridge(usize),
            Link((usize, usize, String)),
            Flush(usize, usize),
        }
        let mut events = Vec::new();
        for (n, node) in self.nodes.iter().enumerate() {
            for (c, core) in node.cores.iter().enumerate() {
                if core.has_fanout() {
                    events.push(Ev::Flush(n, c));
                }
            }
            for (k, q) in &node.queues {
                if !q.is_empty() {
                    events.push(Ev::Path(n, k.0, k.1));
                }
            }
            if !node.bridge.inbox.is_empty() {
                events.push(Ev::Bridge(n));
            }
        }
        for (k, q) in &self.links {
            if !q.is_empty() {
                events.push(Ev::Link(k.clone()));
            }
        }
        if events.is_empty() {
            return Ok(false);
        }
        let i = self.rng.below(events.len());
        match events.swap_remove(i) {
            Ev::Path(node, from, to) => {
                let msg = self.nodes[node]
                    .queues
                    .get_mut(&(from, to))
                    .unwrap()
                    .pop_front()
                    .unwrap();
                let from = if from == BRIDGE {
                    "bridge".to_string()
                } else {
                    from.to_string()
                };
                self.log(format!("deliver n{node} {from}->{to}: {}", short(&msg)));
                self.nodes[node].cores[to].handle(msg);
                self.run(node, to)?;
            }
            Ev::Bridge(node) => self.bridge_step(node),
            Ev::Link(key) => self.link_step(key),
            Ev::Flush(node, core) => {
                self.log(format!("flush n{node} core {core}"));
                self.nodes[node].cores[core].flush_fanout();
                self.run(node, core)?;
            }
        }
        Ok(true)
    }

    fn bridge_to_core(&mut self, node: usize, core: usize, msg: Msg) {
        self.nodes[node]
            .queues
            .entry((BRIDGE, core))
            .or_default()
            .push_back(msg);
    }

    fn wire(&mut self, from: usize, to: usize, subject: &str, w: Wire) {
        self.links
            .entry((from, to, subject.to_string()))
            .or_default()
            .push_back(w);
    }

    /// Node `n`'s bridge handles the oldest thing its cores handed it.
    fn bridge_step(&mut self, n: usize) {
        let (core, out) = self.nodes[n].bridge.inbox.pop_front().unwrap();
        self.log(format!("bridge n{n} from core {core}: {}", short_out(&out)));
        match out {
            ClusterOut::Interest {
                kind,
                name,
                on: true,
                seq,
            } => {
                let key = (kind, name.to_string());
                self.broker.entry(key.clone()).or_default().insert(n);
                self.nodes[n].bridge.subs.insert(key);
                self.bridge_to_core(n, core, Msg::Subscribed { kind, name, seq });
            }
            ClusterOut::Interest { kind, name, .. } => {
                let key = (kind, name.to_string());
                if let Some(s) = self.broker.get_mut(&key) {
                    s.remove(&n);
                    if s.is_empty() {
                        self.broker.remove(&key);
                    }
                }
                self.nodes[n].bridge.subs.remove(&key);
            }
            ClusterOut::Request { req, waiter } => {
                let b = &mut self.nodes[n].bridge;
                let token = if waiter.is_some() {
                    b.next += 1;
                    b.next
                } else {
                    0
                };
                let target = match &req {
                    RemoteReq::Send { user, .. }
                    | RemoteReq::Presence { user }
                    | RemoteReq::Disconnect { user } => Some((Kind::User, user.to_string())),
                    RemoteReq::Publish { room, .. } => Some((Kind::Room, room.to_string())),
                    RemoteReq::Broadcast { .. } => None,
                };
                let others: Vec<usize> = (0..self.nodes.len()).filter(|m| *m != n).collect();
                let (subject, dests) = match &target {
                    Some(t) => (
                        format!("{:?}:{}", t.0, t.1),
                        self.broker
                            .get(t)
                            .map(|s| s.iter().copied().filter(|m| *m != n).collect())
                            .unwrap_or_default(),
                    ),
                    None => ("b".to_string(), others.clone()),
                };
                for m in dests {
                    let w = Wire::Req {
                        req: req.clone(),
                        token,
                    };
                    self.wire(n, m, &subject, w);
                }
                let Some(waiter) = waiter else { return };
                if let Some((kind, name)) = target {
                    for m in &others {
                        let w = Wire::Probe {
                            kind,
                            name: name.clone(),
                            token,
                        };
                        self.wire(n, *m, "q", w);
                    }
                }
                let waiting: HashSet<usize> = others.into_iter().collect();
                self.nodes[n]
                    .bridge
                    .gathers
                    .insert(token, (waiting, 0, waiter));
            }
            ClusterOut::Answer { token, n: count } => {
                if let Some((origin, t)) = self.nodes[n].bridge.remote.remove(&token) {
                    let w = Wire::Answer { token: t, n: count };
                    self.wire(n, origin, "n", w);
                }
            }
        }
    }

    /// The oldest message of one link reaches its node's bridge.
    fn link_step(&mut self, key: (usize, usize, String)) {
        let (from, to) = (key.0, key.1);
        let w = self.links.get_mut(&key).unwrap().pop_front().unwrap();
        match w {
            Wire::Req { req, token } => {
                self.log(format!(
                    "link n{from}->n{to} {}: {req:?} token {token}",
                    key.2
                ));
                let b = &mut self.nodes[to].bridge;
                let local = (token != 0).then(|| {
                    b.next += 1;
                    b.remote.insert(b.next, (from, token));
                    b.next
                });
                let owners = self.nodes[to].owners;
                let core = match &req {
                    RemoteReq::Broadcast { .. } => 0,
                    RemoteReq::Send { user, .. }
                    | RemoteReq::Presence { user }
                    | RemoteReq::Disconnect { user } => owners.of(user),
                    RemoteReq::Publish { room, .. } => owners.of(room),
                };
                self.bridge_to_core(to, core, Msg::Remote { req, token: local });
            }
            Wire::Probe { kind, name, token } => {
                let holder = self.nodes[to].bridge.subs.contains(&(kind, name.clone()));
                self.log(format!(
                    "link n{from}->n{to} probe {kind:?}:{name} token {token} holder {holder}"
                ));
                if !holder {
                    self.wire(to, from, "n", Wire::Answer { token, n: 0 });
                }
            }
            Wire::Answer { token, n } => {
                self.log(format!("link n{from}->n{to} answer token {token}: {n}"));
                let b = &mut self.nodes[to].bridge;
                let Some(g) = b.gathers.get_mut(&token) else {
                    return;
                };
                if !g.0.remove(&from) {
                    return;
                }
                g.1 += n;
                if g.0.is_empty() {
                    let (_, sum, waiter) = b.gathers.remove(&token).unwrap();
                    self.bridge_to_core(to, waiter.core(), Msg::Count { waiter, n: sum });
                }
            }
        }
    }

    fn drain(&mut self) -> Result<(), String> {
        let mut steps = 0;
        loop {
            while self.deliver_one()? {
                steps += 1;
                if steps > 1_000_000 {
                    return Err("messages never stop flowing".into());
                }
            }
            // Nothing moves: counts still gathering wait for answers that will never come
            // (a subscription raced the request); the bridge's timeout settles them.
            let mut stuck = Vec::new();
            for (n, node) in self.nodes.iter_mut().enumerate() {
                for (_, (_, sum, waiter)) in std::mem::take(&mut node.bridge.gathers) {
                    stuck.push((n, sum, waiter));
                }
            }
            if stuck.is_empty() {
                return Ok(());
            }
            if self.strict {
                return Err(format!("a count of a quiet system timed out: {stuck:?}"));
            }
            for (n, sum, waiter) in stuck {
                self.log(format!("timeout n{n}: waiter {waiter} gets {sum}"));
                self.bridge_to_core(n, waiter.core(), Msg::Count { waiter, n: sum });
            }
        }
    }

    /// With nothing in flight, counts must be exact.
    fn quiet_checks(&mut self) -> Result<(), String> {
        self.drain()?;
        self.strict = true;
        let r = self.quiet_checks_strict();
        self.strict = false;
        r
    }

    fn quiet_checks_strict(&mut self) -> Result<(), String> {
        for c in self.conns.iter().filter(|c| c.state != State::Closed) {
            if c.state == State::Connecting {
                return Err(format!("conn of {} still unregistered when quiet", c.user));
            }
            if !c.pending_joins.is_empty() {
                return Err(format!(
                    "join acks {:?} still held when quiet",
                    c.pending_joins
                ));
            }
        }
        // Presence through the API, from a random core, equals the live connections.
        for user in USERS {
            let want = self
                .live()
                .iter()
                .filter(|i| self.conns[**i].user == user)
                .count();
            let node = self.pick_node();
            let core = self.rng.below(self.nodes[node].cores.len());
            let token = self.next_token;
            self.next_token += 1;
            self.nodes[node].cores[core].api_presence(user, token);
            self.run(node, core)?;
            self.drain()?;
            let got = self
                .answers
                .remove(&token)
                .ok_or("presence never answered")?;
            if got != want as u64 {
                return Err(format!("presence of {user}: {got}, want {want}"));
            }
        }
        // A quiet send's delivered is exact, and every live connection of the user gets it.
        if let Some(&from) = self.rng.pick(&self.live()) {
            let before = self.expects.len();
            self.send(from)?;
            self.drain()?;
            let e = &self.expects[before];
            let ack = self.conns[from].acks.get(&e.seq).copied().flatten();
            if ack != Some(e.recipients.len() as u64) {
                return Err(format!(
                    "quiet send delivered {ack:?}, want {}",
                    e.recipients.len()
                ));
            }
        }
        // The same for a quiet publish.
        if let Some(&from) = self.rng.pick(&self.live()) {
            let before = self.expects.len();
            self.publish(from)?;
            self.drain()?;
            let e = &self.expects[before];
            let ack = self.conns[from].acks.get(&e.seq).copied().flatten();
            if ack != Some(e.recipients.len() as u64) {
                return Err(format!(
                    "quiet publish to {} delivered {ack:?}, want {}",
                    e.target,
                    e.recipients.len()
                ));
            }
        }
        // Gauges: users and rooms counted once each per node, on their owners.
        let users: HashSet<(usize, &str)> = self
            .live()
            .iter()
            .map(|i| (self.conns[*i].node, self.conns[*i].user.as_str()))
            .collect();
        let gauge = |f: fn(&CoreStats) -> i64| -> i64 {
            self.nodes
                .iter()
                .flat_map(|n| n.stats.iter())
                .map(|s| f(s))
                .sum()
        };
        let got_users = gauge(|s| s.users.load(std::sync::atomic::Ordering::Relaxed));
        if got_users != users.len() as i64 {
            return Err(format!("users gauge {got_users}, want {}", users.len()));
        }
        let rooms: HashSet<(usize, &String)> = self
            .open()
            .iter()
            .flat_map(|i| {
                self.conns[*i]
                    .joined
                    .iter()
                    .map(|r| (self.conns[*i].node, r))
            })
            .collect();
        let got_rooms = gauge(|s| s.rooms.load(std::sync::atomic::Ordering::Relaxed));
        if got_rooms != rooms.len() as i64 {
            return Err(format!("rooms gauge {got_rooms}, want {}", rooms.len()));
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        let live = self.live();
        let open = self.open();
        match self.rng.below(100) {
            0..=11 => self.connect(),
            12..=17 => match self.rng.pick(&open) {
                Some(&id) => self.close(id),
                None => Ok(()),
            },
            // Reconnect: the same user opens a new connection, then the old one closes.
            18..=21 => match self.rng.pick(&open) {
                Some(&id) => {
                    let user = self.conns[id].user.clone();
                    let node = self.pick_node();
                    let core = self.rng.below(self.nodes[node].cores.len());
                    let nid = self.conns.len();
                    let key = self.nodes[node].cores[core]
                        .insert(Some(user.as_str().into()), H(nid))
                        .unwrap();
                    self.log(format!(
                        "reconnect conn {id} as {nid} user {user} node {node} core {core}"
                    ));
                    self.conns.push(Conn::new(node, core, key, user));
                    self.nodes[node].cores[core].register(key);
                    self.run(node, core)?;
                    self.close(id)
                }
                None => Ok(()),
            },
            22..=33 => match self.rng.pick(&live) {
                Some(&id) => self.send(id),
                None => Ok(()),
            },
            34..=41 => match self.rng.pick(&live) {
                Some(&id) => self.join(id),
                None => Ok(()),
            },
            42..=45 => match self.rng.pick(&live) {
                Some(&id) => self.leave(id),
                None => Ok(()),
            },
            46..=55 => match self.rng.pick(&live) {
                Some(&id) => self.publish(id),
                None => Ok(()),
            },
            56..=57 => self.quiet_checks(),
            _ => self.deliver_one().map(|_| ()),
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        self.quiet_checks()?;
        // No silent loss: every expected recipient still open received its message.
        for e in &self.expects {
            for (r, left_before) in e.recipients.iter().zip(&e.leaves) {
                let c = &self.conns[*r];
                if c.state == State::Closed {
                    continue;
                }
                let room = !e.target.starts_with('@');
                // A member that left the room since may have missed it, rightly.
                if room && c.leaves.get(&e.target).copied().unwrap_or(0) != *left_before {
                    continue;
                }
                if !c.received.contains(&(e.sender, e.target.clone(), e.seq)) {
                    return Err(format!(
                        "lost: conn {r} never got seq {} from {} to {}",
                        e.seq, e.sender, e.target
                    ));
                }
            }
        }
        // Everyone leaves: nothing may be left behind.
        for id in self.open() {
            self.close(id)?;
        }
        self.drain()?;
        for (n, node) in self.nodes.iter().enumerate() {
            let b = &node.bridge;
            if !b.subs.is_empty() || !b.gathers.is_empty() || !b.remote.is_empty() {
                return Err(format!(
                    "node {n}'s bridge leaks: subscriptions {:?}, {} gathers, {} remote requests",
                    b.subs,
                    b.gathers.len(),
                    b.remote.len()
                ));
            }
        }
        if !self.broker.is_empty() {
            return Err(format!(
                "subscriptions left on the broker: {:?}",
                self.broker
            ));
        }
        for (n, node) in self.nodes.iter().enumerate() {
            self.leaks(n, node)?;
        }
        Ok(())
    }

    fn leaks(&self, n: usize, node: &Node) -> Result<(), String> {
        for (i, r) in node.cores.iter().enumerate() {
            let leaks = [
                ("connections", r.conns().len()),
                ("directory entries", r.directory_len()),
                ("local rooms", r.local_room_count()),
                ("owned rooms", r.owned_room_count()),
                ("waiters", r.waiter_count()),
            ];
            for (what, c) in leaks {
                if c != 0 {
                    return Err(format!(
                        "node {n} core {i} leaks {c} {what} after everyone left"
                    ));
                }
            }
            let s = &node.stats[i];
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            let gauges = [
                ("users", s.users.load(relaxed)),
                ("rooms", s.rooms.load(relaxed)),
                ("local_rooms", s.local_rooms.load(relaxed)),
            ];
            for (what, c) in gauges {
                if c != 0 {
                    return Err(format!(
                        "node {n} core {i}: gauge {what} is {c} after everyone left"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn short(msg: &Msg) -> String {
    let s = format!("{msg:?}");
    s.chars().take(120).collect()
}

fn short_out(out: &ClusterOut) -> String {
    let s = format!("{out:?}");
    s.chars().take(120).collect()
}

fn run_seed(seed: u64, steps: usize, verbose: bool, nodes: usize) -> Result<(), String> {
    let mut sim = Sim::new(seed, verbose, nodes);
    let result = (|| {
        for _ in 0..steps {
            sim.step()?;
        }
        sim.finish()
    })();
    result.map_err(|e| {
        format!(
            "seed {seed} ({nodes} node(s), cores {:?}) failed: {e}\nlast events:\n  {}\nreplay: WSGATE_SIM_SEED={seed} cargo test --test route_sim -- --nocapture",
            sim.nodes.iter().map(|n| n.cores.len()).collect::<Vec<_>>(),
            sim.trace.join("\n  ")
        )
    })
}

#[test]
fn routing_invariants_hold_under_every_interleaving() {
    if let Ok(seed) = std::env::var("WSGATE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("WSGATE_SIM_SEED is a number");
        if let Err(e) = run_seed(seed, 250, true, 1) {
            panic!("{e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("WSGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_500);
    for seed in 0..seeds {
        if let Err(e) = run_seed(seed, 250, false, 1) {
            panic!("{e}");
        }
    }
}

/// Two or three nodes in cluster mode (the seed picks), joined by the bridge and broker
/// model. `WSGATE_SIM_CLUSTER_SEED=S` replays one seed with its trace.
#[test]
fn cluster_invariants_hold_under_every_interleaving() {
    let nodes = |seed: u64| 2 + (seed % 2) as usize;
    if let Ok(seed) = std::env::var("WSGATE_SIM_CLUSTER_SEED") {
        let seed: u64 = seed.parse().expect("WSGATE_SIM_CLUSTER_SEED is a number");
        if let Err(e) = run_seed(seed, 250, true, nodes(seed)) {
            panic!("{e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("WSGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(500, |n| n / 3);
    for seed in 0..seeds {
        if let Err(e) = run_seed(seed, 250, false, nodes(seed)) {
            panic!(
                "{}",
                e.replace("WSGATE_SIM_SEED", "WSGATE_SIM_CLUSTER_SEED")
            );
        }
    }
}
