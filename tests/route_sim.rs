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
//! The network of cores is a `Node`; the cluster work adds nodes beside it. Defaults: 1,500
//! seeds of 250 steps. `WSGATE_SIM_SEEDS=N` runs more; `WSGATE_SIM_SEED=S` replays one seed and
//! prints its trace. A failure prints the seed and the command that replays it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use wsgate::key::ConnKey;
use wsgate::route::{Action, Joined, Limits, Msg, Owners, Reply, Router};
use wsgate::stats::CoreStats;

/// xorshift64*: seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}

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

/// A message that must reach `recipients` (those that stay open).
struct Expect {
    sender: usize,
    target: String,
    seq: u64,
    recipients: Vec<usize>,
    /// For a room message: each recipient's leave count when it was published.
    leaves: Vec<u32>,
}

/// One gateway process: its cores and the FIFO paths between them.
struct Node {
    cores: Vec<Router<H>>,
    stats: Vec<Arc<CoreStats>>,
    queues: BTreeMap<(usize, usize), VecDeque<Msg>>,
}

struct Sim {
    rng: Rng,
    node: Node,
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
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let cores = 1 + rng.below(4);
        let owners = Owners::with_keys(cores, (rng.next(), rng.next()));
        let limits = Limits {
            max_rooms_per_conn: 2,
            max_connections_per_user: 0,
        };
        let stats: Vec<Arc<CoreStats>> = (0..cores).map(|_| Arc::default()).collect();
        let routers = (0..cores)
            .map(|i| Router::new(i, owners, limits, stats[i].clone()))
            .collect();
        Sim {
            rng,
            node: Node {
                cores: routers,
                stats,
                queues: BTreeMap::new(),
            },
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
    fn run(&mut self, core: usize) -> Result<(), String> {
        let mut actions = Vec::new();
        self.node.cores[core].take_actions(&mut actions);
        for a in actions {
            match a {
                Action::Post { core: to, msg } => {
                    self.node
                        .queues
                        .entry((core, to))
                        .or_default()
                        .push_back(msg);
                }
                Action::Push { conn, frame } => self.receive(conn.0, &frame)?,
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
                // Single-node simulation: cluster mode is off.
                Action::Cluster(out) => return Err(format!("cluster action {out:?}")),
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

    fn connect(&mut self) -> Result<(), String> {
        let core = self.rng.below(self.node.cores.len());
        let user = USERS[self.rng.below(USERS.len())].to_string();
        let id = self.conns.len();
        let key = self.node.cores[core]
            .insert(Some(user.as_str().into()), H(id))
            .map_err(|_| "slab full")?;
        self.log(format!(
            "connect conn {id} user {user} core {core} key {key}"
        ));
        self.conns.push(Conn {
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
        });
        self.node.cores[core].register(key);
        self.run(core)
    }

    fn close(&mut self, id: usize) -> Result<(), String> {
        let (core, key) = (self.conns[id].core, self.conns[id].key);
        self.log(format!("close conn {id}"));
        self.conns[id].state = State::Closed;
        if self.node.cores[core].remove(key).is_none() {
            return Err(format!("removing open conn {id} found nothing"));
        }
        // A second removal with the now stale key is a no-op.
        if self.node.cores[core].remove(key).is_some() {
            return Err(format!("stale removal of conn {id} removed something"));
        }
        self.run(core)
    }

    fn send(&mut self, from: usize) -> Result<(), String> {
        let to = USERS[self.rng.below(USERS.len())].to_string();
        let c = &mut self.conns[from];
        let seq = c.next_seq;
        c.next_seq += 1;
        let (core, key) = (c.core, c.key);
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
        self.node.cores[core].send(&to, frame, Some(reply));
        self.run(core)
    }

    fn join(&mut self, id: usize) -> Result<(), String> {
        let room = ROOMS[self.rng.below(ROOMS.len())].to_string();
        let c = &mut self.conns[id];
        let rid = c.next_seq;
        c.next_seq += 1;
        let (core, key) = (c.core, c.key);
        self.log(format!("join conn {id} {room} (req {rid})"));
        let joined = self.node.cores[core].join(key, &room, Some(&raw(rid)));
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
        self.run(core)
    }

    fn leave(&mut self, id: usize) -> Result<(), String> {
        let rooms: Vec<String> = self.conns[id].joined.iter().cloned().collect();
        let Some(room) = self.rng.pick(&rooms).cloned() else {
            return Ok(());
        };
        let (core, key) = (self.conns[id].core, self.conns[id].key);
        self.log(format!("leave conn {id} {room}"));
        self.node.cores[core].leave(key, &room);
        // The held join ack (if any) went out before the leave returned.
        self.run(core)?;
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
        let (core, key) = (c.core, c.key);
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
        self.node.cores[core].publish(&room, frame, Some((key, raw(seq))));
        self.run(core)
    }

    /// Hands the oldest message of one random path to its core.
    fn deliver_one(&mut self) -> Result<bool, String> {
        let paths: Vec<(usize, usize)> = self
            .node
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let Some(&(from, to)) = self.rng.pick(&paths) else {
            return Ok(false);
        };
        let msg = self
            .node
            .queues
            .get_mut(&(from, to))
            .unwrap()
            .pop_front()
            .unwrap();
        self.log(format!("deliver {from}->{to}: {}", short(&msg)));
        self.node.cores[to].handle(msg);
        self.run(to)?;
        Ok(true)
    }

    fn drain(&mut self) -> Result<(), String> {
        let mut steps = 0;
        while self.deliver_one()? {
            steps += 1;
            if steps > 1_000_000 {
                return Err("messages never stop flowing".into());
            }
        }
        Ok(())
    }

    /// With nothing in flight, counts must be exact.
    fn quiet_checks(&mut self) -> Result<(), String> {
        self.drain()?;
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
            let core = self.rng.below(self.node.cores.len());
            let token = self.next_token;
            self.next_token += 1;
            self.node.cores[core].api_presence(user, token);
            self.run(core)?;
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
        // Gauges: users and rooms counted once each, on their owners.
        let users: HashSet<&str> = self
            .live()
            .iter()
            .map(|i| self.conns[*i].user.as_str())
            .collect();
        let gauge =
            |f: fn(&CoreStats) -> i64| -> i64 { self.node.stats.iter().map(|s| f(s)).sum() };
        let got_users = gauge(|s| s.users.load(std::sync::atomic::Ordering::Relaxed));
        if got_users != users.len() as i64 {
            return Err(format!("users gauge {got_users}, want {}", users.len()));
        }
        let rooms: HashSet<&String> = self
            .open()
            .iter()
            .flat_map(|i| self.conns[*i].joined.iter())
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
                    let core = self.rng.below(self.node.cores.len());
                    let nid = self.conns.len();
                    let key = self.node.cores[core]
                        .insert(Some(user.as_str().into()), H(nid))
                        .unwrap();
                    self.log(format!(
                        "reconnect conn {id} as {nid} user {user} core {core}"
                    ));
                    self.conns.push(Conn {
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
                    });
                    self.node.cores[core].register(key);
                    self.run(core)?;
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
        for (i, r) in self.node.cores.iter().enumerate() {
            let leaks = [
                ("connections", r.conns().len()),
                ("directory entries", r.directory_len()),
                ("local rooms", r.local_room_count()),
                ("owned rooms", r.owned_room_count()),
                ("waiters", r.waiter_count()),
            ];
            for (what, n) in leaks {
                if n != 0 {
                    return Err(format!("core {i} leaks {n} {what} after everyone left"));
                }
            }
            let s = &self.node.stats[i];
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            let gauges = [
                ("users", s.users.load(relaxed)),
                ("rooms", s.rooms.load(relaxed)),
                ("local_rooms", s.local_rooms.load(relaxed)),
            ];
            for (what, n) in gauges {
                if n != 0 {
                    return Err(format!("core {i}: gauge {what} is {n} after everyone left"));
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

fn run_seed(seed: u64, steps: usize, verbose: bool) -> Result<(), String> {
    let mut sim = Sim::new(seed, verbose);
    let result = (|| {
        for _ in 0..steps {
            sim.step()?;
        }
        sim.finish()
    })();
    result.map_err(|e| {
        format!(
            "seed {seed} ({} cores) failed: {e}\nlast events:\n  {}\nreplay: WSGATE_SIM_SEED={seed} cargo test --test route_sim -- --nocapture",
            sim.node.cores.len(),
            sim.trace.join("\n  ")
        )
    })
}

#[test]
fn routing_invariants_hold_under_every_interleaving() {
    if let Ok(seed) = std::env::var("WSGATE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("WSGATE_SIM_SEED is a number");
        if let Err(e) = run_seed(seed, 250, true) {
            panic!("{e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("WSGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_500);
    for seed in 0..seeds {
        if let Err(e) = run_seed(seed, 250, false) {
            panic!("{e}");
        }
    }
}
