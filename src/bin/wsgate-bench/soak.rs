//! The `soak` scenario: a bounded, loopback-only soak and fault run against a live gateway that
//! fails loudly (`scripts/soak.sh` drives it).
//!
//! A parent process forks `--processes` children (one monoio thread each); connection slot `i`
//! belongs to child `i % P`. Every slot has a role computed from `i` alone, so every process
//! agrees on who sends what to whom:
//!
//! * **stable**: one connection for the whole run, reading (answering pings) and checking what
//!   it receives;
//! * **churn**: a connection that lives 0.5 s..`--churn-lifetime`, is closed with a close
//!   handshake or a reset (`SO_LINGER 0`) and replaced at once, so the number of connections
//!   stays the same;
//! * **senders** (stable or churn, one slot in `N / --senders`): `send` to three fixed users
//!   and `publish` to their room at `--rate`, `data` = `{"s":SENDER,"n":SEQ}` with SEQ counted
//!   per (sender connection, user or room); a stable sender ends with `"last":1`;
//! * **stalled** (`--stalled`): never read; the even ones keep sending to themselves (the
//!   gateway must close them with 1013), the odd ones go silent (closed with 4000);
//! * **flooders** (`--flooders`): write frames as fast as the socket takes them, to users and
//!   rooms nobody holds.
//!
//! Each child also opens a throwaway connection every `--malformed-every` with bad input (bad
//! JSON, unknown type, binary, oversized, invalid UTF-8, unmasked frame, garbage before the
//! HTTP request, half a request then a reset) and records what the gateway answered.
//!
//! Every user id is one slot (`u{i}`), so a direct message reaches that slot's connection(s);
//! each connection checks its own deliveries: per (sender, user-or-room) the sequence numbers
//! must be contiguous from the first one it saw (order per sender, no silent loss while both
//! ends are open). A message from a sender whose connection closed may be the last one. A
//! stable receiver, whose join is acknowledged before any sender starts, must see every
//! stable sender that targets it from n = 1 through its `last` marker.
//!
//! The parent starts the load once every child has connected, samples the gateway's RSS every
//! second and `/metrics` every `--metrics-every`, prints progress every 5 s on stderr, and at
//! the end one JSON summary on stdout, with the reasons in `failures` and a non-zero exit when
//! there are any.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{self, client_frame, WsConn};
use crate::{now_ns, rss_kib, Args};

/// Channel number for direct messages (rooms use their index).
const DIRECT: u32 = u32::MAX;
/// Direct targets per sender.
const TARGETS: usize = 3;
/// Generations of a slot fit in the low bits of a sender id.
const GEN_BITS: u32 = 20;
/// Most problems printed one by one per process (the counters keep counting).
const MAX_REPORTS: u64 = 10;

// ---------------------------------------------------------------------------------------------
// Roles: the same in every process.

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Kind {
    Stable,
    Churn,
    Stalled,
    Flooder,
}

#[derive(Copy, Clone, Debug)]
struct Role {
    kind: Kind,
    sends: bool,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: a well-spread hash of a slot number.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Who does what, from the arguments alone.
struct Plan {
    n: usize,
    p: usize,
    k: usize,
    stalled: usize,
    flooders: usize,
    sender_every: usize,
    rooms: usize,
    churn_per_10k: u64,
}

impl Plan {
    fn new(args: &Args, k: usize) -> Plan {
        let n = args.connections;
        let special = (args.stalled + args.flooders).min(n);
        let rest = n - special;
        let senders = if args.senders == 0 {
            (rest / 100).max(1)
        } else {
            args.senders
        };
        Plan {
            n,
            p: args.processes.max(1),
            k,
            stalled: args.stalled.min(n),
            flooders: args.flooders.min(n - args.stalled.min(n)),
            sender_every: (rest / senders.max(1)).max(1),
            rooms: (rest / args.room_size.max(1)).max(1),
            churn_per_10k: (args.churn.clamp(0.0, 1.0) * 10_000.0) as u64,
        }
    }

    fn role(&self, i: usize) -> Role {
        if i < self.stalled {
            return Role {
                kind: Kind::Stalled,
                sends: false,
            };
        }
        if i < self.stalled + self.flooders {
            return Role {
                kind: Kind::Flooder,
                sends: false,
            };
        }
        let j = i - self.stalled - self.flooders;
        let churn = mix(i as u64) % 10_000 < self.churn_per_10k;
        Role {
            kind: if churn { Kind::Churn } else { Kind::Stable },
            sends: j.is_multiple_of(self.sender_every),
        }
    }

    fn mine(&self, i: usize) -> bool {
        i % self.p == self.k
    }

    fn room_of(&self, i: usize) -> u32 {
        (i % self.rooms) as u32
    }

    /// The rooms sender `i` publishes to: with S senders, the o-th one takes rooms o, o+S,
    /// o+2S, ... so that every room has a publisher (there are more rooms than senders).
    fn publish_rooms(&self, i: usize) -> Vec<u32> {
        let o = (i - self.stalled - self.flooders) / self.sender_every;
        let senders = (self.n - self.stalled - self.flooders).div_ceil(self.sender_every);
        let mut out: Vec<u32> = (o..self.rooms)
            .step_by(senders.max(1))
            .map(|r| r as u32)
            .collect();
        if out.is_empty() {
            out.push(self.room_of(i));
        }
        out
    }

    /// A sender's direct targets: distinct well-behaved slots other than itself.
    fn targets(&self, i: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(TARGETS);
        for t in 0..TARGETS as u64 {
            let mut x = (mix(i as u64 * 7 + t + 1) % self.n as u64) as usize;
            for _ in 0..self.n {
                let r = self.role(x);
                if x != i && matches!(r.kind, Kind::Stable | Kind::Churn) && !out.contains(&x) {
                    out.push(x);
                    break;
                }
                x = (x + 1) % self.n;
            }
        }
        out
    }

    /// For each stable receiver of this process, the (sender, channel) pairs whose `last`
    /// marker it must see: stable senders publishing to its room or sending to its user.
    fn expected(&self) -> HashMap<usize, Vec<(u64, u32)>> {
        let mut by_room: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut by_target: HashMap<usize, Vec<u64>> = HashMap::new();
        for s in 0..self.n {
            let r = self.role(s);
            if r.kind != Kind::Stable || !r.sends {
                continue;
            }
            for room in self.publish_rooms(s) {
                by_room.entry(room).or_default().push(sender_id(s, 0));
            }
            for t in self.targets(s) {
                if self.mine(t) && self.role(t).kind == Kind::Stable {
                    by_target.entry(t).or_default().push(sender_id(s, 0));
                }
            }
        }
        let mut out = HashMap::new();
        for i in (0..self.n).filter(|&i| self.mine(i)) {
            if self.role(i).kind != Kind::Stable {
                continue;
            }
            let mut keys: Vec<(u64, u32)> = by_room
                .get(&self.room_of(i))
                .into_iter()
                .flatten()
                .map(|&s| (s, self.room_of(i)))
                .collect();
            keys.extend(
                by_target
                    .get(&i)
                    .into_iter()
                    .flatten()
                    .map(|&s| (s, DIRECT)),
            );
            out.insert(i, keys);
        }
        out
    }
}

fn sender_id(i: usize, gen: u64) -> u64 {
    ((i as u64) << GEN_BITS) | (gen & ((1 << GEN_BITS) - 1))
}

// ---------------------------------------------------------------------------------------------
// Counters of one child (summed over children by the parent, field by field).

#[derive(Serialize, Deserialize, Default, Clone)]
struct Stats {
    /// Slots (stable + churn) connected before the load started, and those that failed.
    initial_connected: u64,
    initial_failed: u64,
    /// Every successful upgrade of a well-behaved connection (initial and reconnects).
    connects: u64,
    connect_failures: u64,
    closes_clean: u64,
    /// Clean closes the server answered with its own close frame 1000.
    closes_clean_answered: u64,
    closes_rst: u64,
    /// Well-behaved connections the gateway closed (or that broke) before their planned end.
    unexpected_closes: u64,
    unexpected_close_codes: BTreeMap<String, u64>,
    sent_direct: u64,
    sent_room: u64,
    received_direct: u64,
    received_room: u64,
    /// Deliveries whose sequence number skipped ahead, and how many numbers were skipped.
    gaps: u64,
    missing: u64,
    /// Deliveries whose sequence number was not above the last one seen (repeat or reorder).
    dups: u64,
    /// (stable sender, stable receiver) pairs where the receiver never saw the `last` marker.
    tail_missing: u64,
    /// Message frames whose `data` was not ours, and `error` frames on well-behaved connections.
    foreign: u64,
    errors_received: u64,
    /// Stable connections open at the end.
    stable_open_at_end: u64,
    stalled_cycles: u64,
    /// Stalled writers whose socket the gateway closed (a write failed).
    stalled_closed: u64,
    flood_connects: u64,
    flood_bytes: u64,
    malformed: u64,
    malformed_expected: u64,
    malformed_outcomes: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------------------------------------
// The child: one monoio thread.

/// The phase times the parent sends (CLOCK_MONOTONIC nanoseconds, shared by all processes).
#[derive(Serialize, Deserialize, Clone, Copy)]
struct GoMsg {
    stop_send_ns: u64,
    end_ns: u64,
}

static GO: OnceLock<GoMsg> = OnceLock::new();

#[derive(Clone, Copy)]
struct Go {
    at: Instant,
    stop_send: Instant,
    end: Instant,
}

fn instant_of(ns: u64) -> Instant {
    let now = now_ns();
    if ns >= now {
        Instant::now() + Duration::from_nanos(ns - now)
    } else {
        Instant::now()
    }
}

struct State {
    args: Args,
    plan: Plan,
    go: Cell<Option<Go>>,
    stats: RefCell<Stats>,
    reports: Cell<u64>,
    expected: HashMap<usize, Vec<(u64, u32)>>,
    pad: String,
    /// Every load task has ended (stops the stats ticker).
    done: Cell<bool>,
    /// Connections whose join was acknowledged.
    joined: Cell<u64>,
}

impl State {
    fn go(&self) -> Option<Go> {
        if let Some(g) = self.go.get() {
            return Some(g);
        }
        let m = GO.get()?;
        let g = Go {
            at: Instant::now(),
            stop_send: instant_of(m.stop_send_ns),
            end: instant_of(m.end_ns),
        };
        self.go.set(Some(g));
        Some(g)
    }

    async fn wait_go(&self) -> Go {
        loop {
            if let Some(g) = self.go() {
                return g;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.borrow_mut());
    }

    /// Prints one problem on stderr, at most `MAX_REPORTS` per process.
    fn report(&self, msg: impl FnOnce() -> String) {
        let n = self.reports.get();
        if n < MAX_REPORTS {
            self.reports.set(n + 1);
            eprintln!("soak p{}: {}", self.plan.k, msg());
        }
    }

    fn source(&self, i: usize) -> Option<Ipv4Addr> {
        let n = self.args.source_addrs.max(1) as usize;
        (n > 1).then(|| Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8))
    }

    fn past_stop_send(&self) -> bool {
        self.go().is_some_and(|g| Instant::now() >= g.stop_send)
    }
}

/// What a receiving connection saw, per (sender, channel): last number, `last` marker seen.
#[derive(Default)]
struct Tracker {
    seen: HashMap<(u64, u32), (u64, bool)>,
    /// (sender, channel) pairs whose every message this connection must see, from n = 1: a
    /// stable receiver's, for stable senders (it joined and was registered before any sender
    /// started).
    strict: std::collections::HashSet<(u64, u32)>,
    /// The join was acknowledged.
    joined: bool,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    room: Option<&'a str>,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Deserialize)]
struct Payload {
    s: u64,
    n: u64,
    #[serde(default)]
    last: u8,
}

impl Tracker {
    fn on_frame(&mut self, payload: &[u8], st: &State, slot: usize, gen: u64) {
        let Ok(m) = serde_json::from_slice::<Incoming>(payload) else {
            st.stat(|s| s.foreign += 1);
            st.report(|| format!("conn u{slot}/g{gen}: unparsable frame {}", preview(payload)));
            return;
        };
        match m.kind {
            "message" => {}
            "error" => {
                st.stat(|s| s.errors_received += 1);
                st.report(|| format!("conn u{slot}/g{gen}: got {}", preview(payload)));
                return;
            }
            "ack" => {
                if !self.joined {
                    self.joined = true;
                    st.joined.set(st.joined.get() + 1);
                }
                return;
            }
            _ => return, // welcome
        }
        let data = m
            .data
            .and_then(|d| serde_json::from_str::<Payload>(d.get()).ok());
        let channel = match m.room {
            None => Some(DIRECT),
            Some(r) => r.strip_prefix('r').and_then(|n| n.parse::<u32>().ok()),
        };
        let (Some(d), Some(channel)) = (data, channel) else {
            st.stat(|s| s.foreign += 1);
            st.report(|| format!("conn u{slot}/g{gen}: foreign message {}", preview(payload)));
            return;
        };
        st.stat(|s| {
            if channel == DIRECT {
                s.received_direct += 1
            } else {
                s.received_room += 1
            }
        });
        let last = d.last != 0;
        match self.seen.get_mut(&(d.s, channel)) {
            None => {
                self.seen.insert((d.s, channel), (d.n, last));
                if d.n != 1 && self.strict.contains(&(d.s, channel)) {
                    st.stat(|s| {
                        s.gaps += 1;
                        s.missing += d.n.saturating_sub(1);
                    });
                    st.report(|| {
                        format!(
                            "GAP on conn u{slot}/g{gen}: sender {} channel {} expected n=1 got n={} (first message)",
                            fmt_sender(d.s),
                            fmt_channel(channel),
                            d.n
                        )
                    });
                }
            }
            Some(e) => {
                if d.n == e.0 + 1 {
                    *e = (d.n, e.1 || last);
                } else if d.n <= e.0 {
                    let prev = e.0;
                    st.stat(|s| s.dups += 1);
                    st.report(|| {
                        format!(
                            "DUP on conn u{slot}/g{gen}: sender {} channel {} got n={} after n={prev}",
                            fmt_sender(d.s),
                            fmt_channel(channel),
                            d.n
                        )
                    });
                } else {
                    let prev = e.0;
                    st.stat(|s| {
                        s.gaps += 1;
                        s.missing += d.n - prev - 1;
                    });
                    st.report(|| {
                        format!(
                            "GAP on conn u{slot}/g{gen}: sender {} channel {} expected n={} got n={}",
                            fmt_sender(d.s),
                            fmt_channel(channel),
                            prev + 1,
                            d.n
                        )
                    });
                    *e = (d.n, e.1 || last);
                }
            }
        }
    }
}

fn fmt_sender(id: u64) -> String {
    format!("u{}/g{}", id >> GEN_BITS, id & ((1 << GEN_BITS) - 1))
}

fn fmt_channel(c: u32) -> String {
    if c == DIRECT {
        "direct".into()
    } else {
        format!("room r{c}")
    }
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(160)]).into_owned();
    if b.len() > 160 {
        format!("{s}...")
    } else {
        s
    }
}

/// Entry point of a child process.
pub(crate) fn child(args: &Args) -> Result<()> {
    let k = args.child.context("child index")?;
    // The parent sends one line with the phase times; its end of stream means the parent is
    // gone, and so must this process be.
    std::thread::Builder::new()
        .name("soak-stdin".into())
        .spawn(|| {
            let mut lines = std::io::stdin().lock().lines();
            if let Some(Ok(l)) = lines.next() {
                if let Ok(m) = serde_json::from_str::<GoMsg>(&l) {
                    let _ = GO.set(m);
                }
            }
            for _ in lines.by_ref() {}
            eprintln!("soak p?: the parent went away; exiting");
            std::process::exit(3);
        })?;
    // A bound on the whole life of this process, whatever happens to its tasks.
    let limit = Duration::from_secs(600) + args.warmup + args.duration + args.drain;
    std::thread::Builder::new()
        .name("soak-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("soak p{k}: watchdog: still running after {limit:?}; exiting");
            std::process::exit(4);
        })?;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(4096)
        .enable_timer()
        .build()?;
    let stats = rt.block_on(child_main(args.clone(), k));
    println!("{}", serde_json::to_string(&json!({ "result": stats }))?);
    Ok(())
}

async fn child_main(args: Args, k: usize) -> Stats {
    let plan = Plan::new(&args, k);
    let expected = plan.expected();
    let pad = "x".repeat(args.size);
    let st = Rc::new(State {
        args,
        plan,
        go: Cell::new(None),
        stats: RefCell::new(Stats::default()),
        reports: Cell::new(0),
        expected,
        pad,
        done: Cell::new(false),
        joined: Cell::new(0),
    });
    let slots: Vec<usize> = (0..st.plan.n)
        .filter(|&i| st.plan.mine(i) && matches!(st.plan.role(i).kind, Kind::Stable | Kind::Churn))
        .collect();
    let mut tasks = Vec::new();
    // Open the well-behaved slots `concurrency` at a time; each starts reading (answering
    // pings) as soon as it is open.
    for chunk in slots.chunks(st.args.concurrency.max(1)) {
        let mut opening = Vec::new();
        for &i in chunk {
            let st = st.clone();
            opening.push((i, monoio::spawn(async move { open(&st, i, 0, None).await })));
        }
        for (i, h) in opening {
            match h.await {
                Ok(conn) => {
                    st.stat(|s| {
                        s.initial_connected += 1;
                        s.connects += 1;
                    });
                    tasks.push(monoio::spawn(slot(st.clone(), i, conn)));
                }
                Err(e) => {
                    st.stat(|s| s.initial_failed += 1);
                    st.report(|| format!("initial connect of u{i} failed: {e:#}"));
                }
            }
        }
    }
    // Every join processed before any sender starts: the stable receivers' checks start at
    // n = 1.
    let t0 = Instant::now();
    while st.joined.get() < st.stats.borrow().initial_connected
        && t0.elapsed() < Duration::from_secs(30)
    {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = st.stats.borrow().clone();
    if st.joined.get() < s.initial_connected {
        st.report(|| {
            format!(
                "only {} of {} joins acknowledged within 30 s",
                st.joined.get(),
                s.initial_connected
            )
        });
    }
    println!(
        "{}",
        json!({"event": "connected", "n": s.initial_connected, "failed": s.initial_failed})
    );
    st.wait_go().await;
    for i in (0..st.plan.n).filter(|&i| st.plan.mine(i)) {
        match st.plan.role(i).kind {
            Kind::Stalled => tasks.push(monoio::spawn(stalled(st.clone(), i))),
            Kind::Flooder => tasks.push(monoio::spawn(flooder(st.clone(), i))),
            _ => {}
        }
    }
    tasks.push(monoio::spawn(malformed(st.clone())));
    let ticker = {
        let st = st.clone();
        monoio::spawn(async move {
            while !st.done.get() {
                monoio::time::sleep(Duration::from_secs(1)).await;
                let s = st.stats.borrow().clone();
                println!("{}", json!({"event": "stats", "stats": s}));
            }
        })
    };
    for t in tasks {
        t.await;
    }
    st.done.set(true);
    ticker.await;
    let s = st.stats.borrow().clone();
    s
}

async fn open(st: &State, i: usize, gen: u64, rcvbuf: Option<usize>) -> Result<WsConn> {
    let path = format!("/ws?user=u{i}");
    let src = st.source(i + gen as usize);
    let conn = monoio::time::timeout(
        Duration::from_secs(10),
        client::connect_with(st.args.target, src, &path, rcvbuf),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    Ok(conn)
}

/// How a well-behaved connection's reading ended.
enum Ended {
    /// Its planned time came.
    Planned(WsConn),
    /// It broke or the gateway closed it first.
    Broken(String),
}

/// A stable or churn slot: its connections one after another until the end.
async fn slot(st: Rc<State>, i: usize, first: WsConn) {
    let role = st.plan.role(i);
    let mut conn = Some(first);
    let mut gen = 0u64;
    let mut rng = mix(i as u64 ^ 0x5eed);
    let mut next_rand = move || {
        rng = mix(rng);
        rng
    };
    let max_life = st.args.churn_lifetime.as_millis().max(600) as u64;
    loop {
        let Some(c) = conn.take() else { break };
        // Churn: 0.5 s..max; the first lifetime starts with the load.
        let life = Duration::from_millis(500 + next_rand() % (max_life - 500));
        let planned_at = Instant::now();
        let deadline = move |st: &State| -> Option<Instant> {
            let g = st.go()?;
            Some(match role.kind {
                Kind::Churn => ((if gen == 0 { g.at } else { planned_at }) + life).min(g.end),
                _ => g.end,
            })
        };
        let mut tracker = Tracker::default();
        if gen == 0 && role.kind == Kind::Stable {
            if let Some(keys) = st.expected.get(&i) {
                tracker.strict = keys.iter().copied().collect();
            }
        }
        let ended = run_conn(&st, i, gen, c, role, &deadline, &mut tracker).await;
        let conn_now = match ended {
            Ended::Planned(c) => c,
            Ended::Broken(why) => {
                st.stat(|s| {
                    s.unexpected_closes += 1;
                    *s.unexpected_close_codes.entry(why.clone()).or_default() += 1;
                });
                st.report(|| format!("conn u{i}/g{gen} ({:?}) closed early: {why}", role.kind));
                if role.kind == Kind::Stable {
                    break;
                }
                if st.past_stop_send() {
                    break;
                }
                gen += 1;
                conn = reconnect(&st, i, gen).await;
                continue;
            }
        };
        if role.kind == Kind::Stable {
            check_tail(&st, i, &tracker);
            st.stat(|s| s.stable_open_at_end += 1);
            conn_now.reset();
            break;
        }
        if st.past_stop_send() {
            // The end of the run: no handshake, no replacement.
            conn_now.reset();
            break;
        }
        if next_rand() % 10_000 < (st.args.rst_share.clamp(0.0, 1.0) * 10_000.0) as u64 {
            st.stat(|s| s.closes_rst += 1);
            conn_now.reset();
        } else {
            let code = conn_now.close(1000, Duration::from_secs(3)).await;
            st.stat(|s| {
                s.closes_clean += 1;
                if code == Some(1000) {
                    s.closes_clean_answered += 1;
                }
            });
        }
        gen += 1;
        conn = reconnect(&st, i, gen).await;
    }
}

/// A replacement connection for churn slot `i`, retried until the senders stop.
async fn reconnect(st: &State, i: usize, gen: u64) -> Option<WsConn> {
    while !st.past_stop_send() {
        match open(st, i, gen, None).await {
            Ok(c) => {
                st.stat(|s| s.connects += 1);
                return Some(c);
            }
            Err(e) => {
                st.stat(|s| s.connect_failures += 1);
                st.report(|| format!("reconnect of u{i}/g{gen} failed: {e:#}"));
                monoio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    None
}

/// Reads one connection until its planned end (checking deliveries), with its sender task
/// when the slot sends.
async fn run_conn(
    st: &Rc<State>,
    i: usize,
    gen: u64,
    mut conn: WsConn,
    role: Role,
    deadline: &dyn Fn(&State) -> Option<Instant>,
    tracker: &mut Tracker,
) -> Ended {
    let join = format!(
        r#"{{"type":"join","room":"r{}","id":1}}"#,
        st.plan.room_of(i)
    );
    if let Err(e) = conn.send(&client_frame(0x1, join.as_bytes())).await {
        return Ended::Broken(format!("join: {e}"));
    }
    let mut writer = None;
    let ended = loop {
        if writer.is_none() && role.sends {
            if let (Some(g), Some(d)) = (st.go(), deadline(st)) {
                let stable = role.kind == Kind::Stable;
                let until = d.min(g.stop_send);
                writer = Some(monoio::spawn(send_loop(
                    st.clone(),
                    i,
                    gen,
                    conn.sender(),
                    until,
                    stable,
                )));
            }
        }
        let limit = deadline(st).unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
        if Instant::now() >= limit && deadline(st).is_some() {
            break None;
        }
        let read = conn.read_frames(|f| tracker.on_frame(f.payload, st, i, gen));
        match monoio::time::timeout_at(monoio::time::Instant::from_std(limit), read).await {
            Err(_) => continue,
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                break Some(match conn.close_code() {
                    Some(code) => format!("close {code}"),
                    None => format!("{}", e.kind()),
                })
            }
        }
    };
    if let Some(w) = writer {
        w.await;
    }
    match ended {
        None => Ended::Planned(conn),
        Some(why) => Ended::Broken(why),
    }
}

/// Sends at `--rate` until `until`, alternating its rooms and its direct targets (each in
/// turn), each with its own sequence; a stable sender then sends its `last` marker on every
/// channel.
async fn send_loop(
    st: Rc<State>,
    i: usize,
    gen: u64,
    sender: client::Sender,
    until: Instant,
    stable: bool,
) {
    let id = sender_id(i, gen);
    let rooms = st.plan.publish_rooms(i);
    let targets = st.plan.targets(i);
    let mut seq_room = vec![0u64; rooms.len()];
    let mut seq_direct = vec![0u64; targets.len()];
    let rate = if st.args.rate > 0.0 {
        st.args.rate
    } else {
        5.0
    };
    let period = Duration::from_secs_f64(1.0 / rate);
    // Spread the senders over the period rather than all at once.
    let mut next = Instant::now() + period.mul_f64((mix(id) % 1000) as f64 / 1000.0);
    let pad = &st.pad;
    let mut turn = 0usize;
    let frame_room = |room: u32, n: u64, last: bool| {
        let text = format!(
            r#"{{"type":"publish","room":"r{room}","data":{{"s":{id},"n":{n}{},"p":"{pad}"}}}}"#,
            if last { r#","last":1"# } else { "" }
        );
        client_frame(0x1, text.as_bytes())
    };
    let frame_direct = |to: usize, n: u64, last: bool| {
        let text = format!(
            r#"{{"type":"send","to":"u{to}","data":{{"s":{id},"n":{n}{},"p":"{pad}"}}}}"#,
            if last { r#","last":1"# } else { "" }
        );
        client_frame(0x1, text.as_bytes())
    };
    loop {
        monoio::time::sleep_until(monoio::time::Instant::from_std(next)).await;
        if Instant::now() >= until {
            break;
        }
        next += period;
        turn += 1;
        let r = if turn.is_multiple_of(2) || targets.is_empty() {
            let k = (turn / 2) % rooms.len();
            seq_room[k] += 1;
            st.stat(|s| s.sent_room += 1);
            sender.send(&frame_room(rooms[k], seq_room[k], false)).await
        } else {
            let t = (turn / 2) % targets.len();
            seq_direct[t] += 1;
            st.stat(|s| s.sent_direct += 1);
            sender
                .send(&frame_direct(targets[t], seq_direct[t], false))
                .await
        };
        if r.is_err() {
            return; // the reader reports the connection's end
        }
    }
    if stable {
        for (k, &room) in rooms.iter().enumerate() {
            seq_room[k] += 1;
            st.stat(|s| s.sent_room += 1);
            if sender
                .send(&frame_room(room, seq_room[k], true))
                .await
                .is_err()
            {
                return;
            }
        }
        for (t, &to) in targets.iter().enumerate() {
            seq_direct[t] += 1;
            st.stat(|s| s.sent_direct += 1);
            if sender
                .send(&frame_direct(to, seq_direct[t], true))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// A stable receiver at the end: every stable sender that targets it must have reached its
/// `last` marker here.
fn check_tail(st: &State, i: usize, tracker: &Tracker) {
    let Some(keys) = st.expected.get(&i) else {
        return;
    };
    for &(s, c) in keys {
        let ok = tracker.seen.get(&(s, c)).is_some_and(|e| e.1);
        if !ok {
            st.stat(|x| x.tail_missing += 1);
            st.report(|| {
                let seen = tracker.seen.get(&(s, c)).map(|e| e.0);
                format!(
                    "TAIL on conn u{i}/g0: sender {} channel {}: last marker never arrived (last n seen: {seen:?})",
                    fmt_sender(s),
                    fmt_channel(c)
                )
            });
        }
    }
}

/// A client that stops reading. Even slots keep sending 4 KiB messages to themselves (the
/// gateway's queue for them fills: 1013); odd slots go silent (4000). Replaced every
/// `--stall-lifetime`.
async fn stalled(st: Rc<State>, i: usize) {
    let writer = i.is_multiple_of(2);
    let mut gen = 1u64;
    let msg = format!(
        r#"{{"type":"send","to":"u{i}","data":"{}"}}"#,
        "s".repeat(4096)
    );
    let frame = client_frame(0x1, msg.as_bytes());
    while !st.past_stop_send() {
        let Some(g) = st.go() else { return };
        let conn = match open(&st, i, gen, Some(4096)).await {
            Ok(c) => c,
            Err(_) => {
                monoio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        gen += 1;
        st.stat(|s| s.stalled_cycles += 1);
        let cycle_end = (Instant::now() + st.args.stall_lifetime).min(g.stop_send);
        if writer {
            let sender = conn.sender();
            while Instant::now() < cycle_end {
                if sender.send(&frame).await.is_err() {
                    st.stat(|s| s.stalled_closed += 1);
                    break;
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(sender);
        }
        monoio::time::sleep_until(monoio::time::Instant::from_std(cycle_end)).await;
        conn.reset();
    }
}

/// A client that writes as fast as its socket takes it, without ids (no answers): with
/// `--flood-to cross`, `send` to users nobody holds and `publish` to empty rooms (both routed
/// across cores: the cross-core mailboxes fill); with `local`, `leave` of rooms it is not in
/// (handled on its own core). It still reads, to answer pings. Reconnects when the gateway
/// closes it.
async fn flooder(st: Rc<State>, i: usize) {
    let cross = st.args.flood_to == crate::FloodTo::Cross;
    let mut chunk = Vec::with_capacity(70 * 1024);
    let mut x = 0u64;
    while chunk.len() < 64 * 1024 {
        x += 1;
        let text = if !cross {
            format!(r#"{{"type":"leave","room":"void{}"}}"#, x % 89)
        } else if x.is_multiple_of(2) {
            format!(r#"{{"type":"send","to":"nobody{}","data":{x}}}"#, x % 97)
        } else {
            format!(r#"{{"type":"publish","room":"void{}","data":{x}}}"#, x % 89)
        };
        chunk.extend_from_slice(&client_frame(0x1, text.as_bytes()));
    }
    let mut gen = 1u64;
    while !st.past_stop_send() {
        let Some(g) = st.go() else { return };
        let mut conn = match open(&st, i, gen, None).await {
            Ok(c) => c,
            Err(_) => {
                monoio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        gen += 1;
        st.stat(|s| s.flood_connects += 1);
        let sender = conn.sender();
        let until = g.stop_send;
        let pause = st.args.flood_pause.max(Duration::from_micros(100));
        let st2 = st.clone();
        let flood = monoio::spawn(async move {
            while Instant::now() < until {
                if sender.send(&chunk).await.is_err() {
                    break;
                }
                st2.stat(|s| s.flood_bytes += chunk.len() as u64);
                // monoio has no task budget: let this thread's other connections run.
                monoio::time::sleep(pause).await;
            }
            chunk
        });
        let stop = monoio::time::Instant::from_std(until);
        let _ = monoio::time::timeout_at(stop, async {
            while conn.read_frames(|_| {}).await.is_ok() {}
        })
        .await;
        chunk = flood.await;
        conn.reset();
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kinds of bad input, each on its own throwaway connection, with the answer wsgate documents.
const MALFORMED: &[(&str, &str)] = &[
    ("bad_json", "error bad_json"),
    ("unknown_type", "error bad_request"),
    ("binary", "error bad_request"),
    ("oversized", "close 1009"),
    ("bad_utf8", "close 1007"),
    ("unmasked", "close 1002"),
    ("garbage_http", "http 400"),
    ("half_request_rst", "reset sent"),
];

/// One throwaway connection with bad input every `--malformed-every` until the senders stop.
async fn malformed(st: Rc<State>) {
    let mut n = st.plan.k;
    let every = st.args.malformed_every.max(Duration::from_millis(10));
    while !st.past_stop_send() {
        let (kind, want) = MALFORMED[n % MALFORMED.len()];
        let slot = st.plan.n + n; // user ids beyond the slots: nobody sends to them
        let got = monoio::time::timeout(Duration::from_secs(5), malformed_one(&st, kind, slot))
            .await
            .unwrap_or_else(|_| "timeout".into());
        st.stat(|s| {
            s.malformed += 1;
            if got == want {
                s.malformed_expected += 1;
            }
            *s.malformed_outcomes
                .entry(format!("{kind}: {got}"))
                .or_default() += 1;
        });
        n += st.plan.p;
        monoio::time::sleep(every).await;
    }
}

async fn malformed_one(st: &State, kind: &str, slot: usize) -> String {
    let target = st.args.target;
    let src = st.source(slot);
    if kind == "garbage_http" || kind == "half_request_rst" {
        let Ok(mut c) = client::tcp(target, src, None).await else {
            return "connect failed".into();
        };
        if kind == "half_request_rst" {
            let _ = c
                .send(b"GET /ws?user=half HTTP/1.1\r\nHost: x\r\nUpg")
                .await;
            c.reset();
            return "reset sent".into();
        }
        let _ = c
            .send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n")
            .await;
        while c.read_some().await.is_ok() {
            if c.pending().len() >= 12 {
                break;
            }
        }
        let head = String::from_utf8_lossy(&c.pending()[..c.pending().len().min(12)]).into_owned();
        c.reset();
        return match head.strip_prefix("HTTP/1.1 ") {
            Some(code) => format!("http {}", code.trim()),
            None => "no http answer".into(),
        };
    }
    let mut c = match client::connect(target, src, &format!("/ws?user=u{slot}")).await {
        Ok(c) => c,
        Err(e) => return format!("connect failed: {}", e.kind()),
    };
    let frame = match kind {
        "bad_json" => client_frame(0x1, br#"{"type":"send","to":"#),
        "unknown_type" => client_frame(0x1, br#"{"type":"nope","id":7}"#),
        "binary" => client_frame(0x2, b"\x00\x01binary"),
        "oversized" => client_frame(0x1, &vec![b'a'; st.args.max_message_size + 1]),
        "bad_utf8" => client_frame(0x1, b"\"\xff\xfe\xfd\""),
        _ => {
            // unmasked: a client frame without the mask bit
            let mut f = vec![0x81, 2];
            f.extend_from_slice(b"{}");
            f
        }
    };
    // The gateway may close before it has read all of an oversized frame: a failed send is
    // fine, the answer is what counts.
    let _ = c.send(&frame).await;
    let mut got = None;
    loop {
        let r = c
            .read_frames(|f| {
                if got.is_none() && f.payload.starts_with(br#"{"type":"error""#) {
                    let v: Value = serde_json::from_slice(f.payload).unwrap_or_default();
                    got = Some(format!("error {}", v["code"].as_str().unwrap_or("?")));
                }
            })
            .await;
        if got.is_some() {
            break;
        }
        if let Err(e) = r {
            got = Some(match c.close_code() {
                Some(code) => format!("close {code}"),
                None => format!("{}", e.kind()),
            });
            break;
        }
    }
    if c.close_code().is_none() {
        let _ = c.close(1000, Duration::from_secs(2)).await;
    } else {
        c.reset();
    }
    got.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The parent: forks the children, starts the load, samples the gateway, judges.

/// One scrape of `/metrics`: the gauges and counters the soak judges or reports.
#[derive(Default, Clone, Serialize)]
struct Scrape {
    connections: f64,
    accepted: f64,
    closes_by_code: BTreeMap<String, f64>,
    slow_consumer_closes: f64,
    idle_closes: f64,
    protocol_closes: f64,
    /// Largest per-core value of the queue gauges (None: the gateway has no such metric).
    mailbox_depth: Option<f64>,
    queued_bytes: Option<f64>,
    mailbox_limit: Option<f64>,
    queued_limit: Option<f64>,
}

fn http_get(target: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len {
                if buf.len() >= end + 4 + len {
                    if !head.starts_with("http/1.1 200") {
                        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
                    }
                    return Ok(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned());
                }
            }
        }
        if buf.len() > 64 * 1024 * 1024 {
            bail!("GET {path}: answer too large");
        }
    }
    bail!("GET {path}: connection closed before the whole answer")
}

fn parse_metrics(text: &str) -> Scrape {
    let mut m = Scrape::default();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let label = |key: &str| -> Option<&str> {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"'))
            })
        };
        let max = |slot: &mut Option<f64>| *slot = Some(slot.map_or(v, |o: f64| o.max(v)));
        match name {
            "wsgate_connections" => m.connections += v,
            "wsgate_connections_accepted_total" => m.accepted += v,
            "wsgate_slow_consumer_closes_total" => m.slow_consumer_closes += v,
            "wsgate_idle_closes_total" => m.idle_closes += v,
            "wsgate_protocol_closes_total" => m.protocol_closes += v,
            "wsgate_closes_total" => {
                *m.closes_by_code
                    .entry(label("code").unwrap_or("?").to_string())
                    .or_default() += v
            }
            // The gateway's own high-water marks catch what happens between two samples;
            // the current gauges are taken too (a gateway without the peaks still has them).
            "wsgate_mailbox_depth" | "wsgate_mailbox_peak" => max(&mut m.mailbox_depth),
            "wsgate_queued_bytes" | "wsgate_queued_bytes_peak" => max(&mut m.queued_bytes),
            "wsgate_limit" => match label("name") {
                Some("mailbox_limit") => m.mailbox_limit = Some(v),
                Some("max_total_queued_bytes") => m.queued_limit = Some(v),
                _ => {}
            },
            _ => {}
        }
    }
    m
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Sums two JSON values field by field (numbers added, objects merged).
fn add_json(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                add_json(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a @ Value::Null, b) => *a = b.clone(),
        (Value::Number(a), Value::Number(b)) => {
            let sum = a.as_u64().unwrap_or(0) + b.as_u64().unwrap_or(0);
            *a = sum.into();
        }
        _ => {}
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Entry point of the parent process: `Ok(false)` when the run failed (the reasons are in the
/// JSON summary and on stderr).
pub(crate) fn parent(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let p = args.processes.max(1);
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Option<String>)>();
    for k in 0..p {
        let mut child = Command::new(&exe)
            .args(&raw)
            .args(["--child", &k.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn a soak child")?;
        stdins.push(child.stdin.take().context("piped stdin")?);
        let out = child.stdout.take().context("piped stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((k, Some(line)));
            }
            let _ = tx.send((k, None));
        });
        children.push(child);
    }
    drop(tx);
    let kill_all = |children: &mut Vec<std::process::Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };

    let mut failures: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    // Phase 1: every child connects its slots.
    let connect_limit = Duration::from_secs(60 + (args.connections / 500) as u64);
    let mut connected = vec![false; p];
    let mut initial_failed = 0u64;
    let mut initial_connected = 0u64;
    let mut gone = vec![false; p];
    while connected.iter().any(|c| !c) {
        let left = connect_limit.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((k, Some(line))) => {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                if v["event"] == "connected" {
                    connected[k] = true;
                    initial_connected += num(&v, "n");
                    initial_failed += num(&v, "failed");
                }
            }
            Ok((k, None)) => {
                gone[k] = true;
                kill_all(&mut children);
                bail!("soak child {k} ended before connecting");
            }
            Err(_) => {
                kill_all(&mut children);
                bail!("the soak children did not connect within {connect_limit:?}");
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[soak] {initial_connected} connections open in {connect_secs:.1}s ({initial_failed} failed); load starts, warm-up {:?}, measured {:?}",
        args.warmup, args.duration
    );
    if initial_failed > 0 {
        failures.push(format!(
            "{initial_failed} well-behaved connections could not be opened at the start"
        ));
    }

    // Phase 2: the load.
    let t_go = Instant::now();
    let go_ns = now_ns();
    let measure_start = t_go + args.warmup;
    let stop_send = measure_start + args.duration;
    let end = stop_send + args.drain;
    let msg = GoMsg {
        stop_send_ns: go_ns + (args.warmup + args.duration).as_nanos() as u64,
        end_ns: go_ns + (args.warmup + args.duration + args.drain).as_nanos() as u64,
    };
    let line = serde_json::to_string(&msg)? + "\n";
    for s in stdins.iter_mut() {
        s.write_all(line.as_bytes())?;
        s.flush()?;
    }
    let hard_end = end + Duration::from_secs(60);
    let mut latest: Vec<Value> = vec![Value::Null; p];
    let mut results: Vec<Option<Value>> = vec![None; p];
    let mut rss: Vec<(f64, f64)> = Vec::new(); // (seconds into the measured period, KiB)
    let mut conns: Vec<(f64, f64)> = Vec::new();
    let mut max_mailbox: Option<f64> = None;
    let mut max_queued: Option<f64> = None;
    let mut limits: (Option<f64>, Option<f64>) = (None, None);
    let mut scrape_failures = 0u64;
    let mut last_scrape: Option<Scrape> = None;
    let mut next_rss = measure_start;
    let mut next_scrape = t_go;
    let mut next_progress = t_go + Duration::from_secs(5);
    let mut gateway_gone = false;
    while results.iter().any(Option::is_none) && gone.iter().any(|g| !g) {
        let now = Instant::now();
        if now >= hard_end {
            kill_all(&mut children);
            failures.push("the soak children did not finish in time (killed)".into());
            break;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((k, Some(line))) => {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                if v["event"] == "stats" {
                    latest[k] = v["stats"].clone();
                } else if let Some(r) = v.get("result") {
                    results[k] = Some(r.clone());
                }
            }
            Ok((k, None)) => gone[k] = true,
            Err(_) => {}
        }
        let now = Instant::now();
        if let Some(pid) = args.gateway_pid {
            if now >= next_rss && now < stop_send {
                next_rss += Duration::from_secs(1);
                match rss_kib(pid) {
                    Some(kib) => {
                        rss.push((now.duration_since(measure_start).as_secs_f64(), kib as f64))
                    }
                    None => {
                        if !gateway_gone {
                            gateway_gone = true;
                            failures.push(format!("the gateway (pid {pid}) is gone"));
                            eprintln!("[soak] FAIL: the gateway (pid {pid}) is gone");
                        }
                    }
                }
            }
        }
        if now >= next_scrape && now < end {
            next_scrape = now + args.metrics_every;
            match http_get(args.target, "/metrics") {
                Ok(text) => {
                    let m = parse_metrics(&text);
                    if now >= measure_start && now < stop_send {
                        conns.push((
                            now.duration_since(measure_start).as_secs_f64(),
                            m.connections,
                        ));
                    }
                    let up = |slot: &mut Option<f64>, v: Option<f64>| {
                        if let Some(v) = v {
                            *slot = Some(slot.map_or(v, |o: f64| o.max(v)));
                        }
                    };
                    up(&mut max_mailbox, m.mailbox_depth);
                    up(&mut max_queued, m.queued_bytes);
                    limits = (m.mailbox_limit.or(limits.0), m.queued_limit.or(limits.1));
                    last_scrape = Some(m);
                }
                Err(e) => {
                    scrape_failures += 1;
                    if scrape_failures <= 3 {
                        eprintln!("[soak] GET /metrics failed: {e:#}");
                    }
                }
            }
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(5);
            let mut total = Value::Null;
            for s in &latest {
                add_json(&mut total, s);
            }
            let phase = if now < measure_start {
                "warm-up"
            } else if now < stop_send {
                "measure"
            } else {
                "drain"
            };
            let gw = last_scrape.as_ref();
            eprintln!(
                "[soak {:>4.0}s {phase}] gw_conns={} rss={} churn +{}/-{} (rst {}) sent={} recv={} gaps={} dups={} unexpected_closes={} flood={}MB malformed={} mailbox_max={} queued_max={}",
                now.duration_since(t_go).as_secs_f64(),
                gw.map_or("?".into(), |m| format!("{:.0}", m.connections)),
                rss.last().map_or("?".into(), |r| format!("{:.1}MB", r.1 / 1024.0)),
                num(&total, "connects").saturating_sub(initial_connected),
                num(&total, "closes_clean") + num(&total, "closes_rst"),
                num(&total, "closes_rst"),
                num(&total, "sent_direct") + num(&total, "sent_room"),
                num(&total, "received_direct") + num(&total, "received_room"),
                num(&total, "gaps"),
                num(&total, "dups"),
                num(&total, "unexpected_closes"),
                num(&total, "flood_bytes") / 1_000_000,
                num(&total, "malformed"),
                max_mailbox.map_or("n/a".into(), |v| format!("{v:.0}")),
                max_queued.map_or("n/a".into(), |v| format!("{v:.0}")),
            );
        }
    }
    for (k, c) in children.iter_mut().enumerate() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => failures.push(format!("soak child {k} exited with {s}")),
            Err(e) => failures.push(format!("soak child {k}: {e}")),
        }
    }
    drop(stdins);
    let final_scrape = http_get(args.target, "/metrics")
        .ok()
        .map(|t| parse_metrics(&t));

    // Judgement.
    let mut total = Value::Null;
    for (k, r) in results.iter().enumerate() {
        match r {
            Some(r) => add_json(&mut total, r),
            None => failures.push(format!("soak child {k} gave no result")),
        }
    }
    let t = |key: &str| num(&total, key);
    if t("gaps") > 0 {
        failures.push(format!(
            "{} sequence gaps ({} messages missing) on connections that stayed open",
            t("gaps"),
            t("missing")
        ));
    }
    if t("dups") > 0 {
        failures.push(format!(
            "{} duplicate or out-of-order deliveries",
            t("dups")
        ));
    }
    if t("tail_missing") > 0 {
        failures.push(format!(
            "{} (stable sender, stable receiver) pairs never got the sender's last message",
            t("tail_missing")
        ));
    }
    if t("unexpected_closes") > 0 {
        failures.push(format!(
            "{} well-behaved connections ended before their time: {}",
            t("unexpected_closes"),
            total["unexpected_close_codes"]
        ));
    }
    if t("foreign") + t("errors_received") > 0 {
        failures.push(format!(
            "{} foreign frames and {} error answers on well-behaved connections",
            t("foreign"),
            t("errors_received")
        ));
    }
    if t("received_direct") == 0 || t("received_room") == 0 {
        failures.push("no direct or no room message was received: nothing was checked".into());
    }

    // RSS: the last third of the measured period against the first third, with the same
    // number of connections in both (checked below). Each third is summarised by the mean of
    // its 5-second floors (the lowest sample of each 5 s): a flood's backlog waiting in a
    // queue comes and goes within seconds (up to +80 MB in single samples against a gateway
    // whose cross-core mailbox is unbounded), and judging leaks on it would make the check a
    // coin toss; a leak raises every sample, the floors included. Backlogs are the queue
    // check's business, and the plain means and the peak are reported too.
    // Why 5% (the default): the gateway holds ~1 KiB per idle connection plus a fixed part;
    // once the warm-up has brought queues, buffers and mimalloc's pages to a steady state,
    // the floors move by about 1% without flooders and 1-3% with them (measured here). Churn
    // replaces 10% of the connections every ~5 s, so 5% of a 20-30 MB gateway (1-1.5 MB) is
    // crossed by a leak of ~100 bytes per closed connection in the quick run's 90 s, and of
    // ~20 bytes in the full run's 10 minutes, or by anything that grows with time.
    let rss_kib_v: Vec<f64> = rss.iter().map(|r| r.1).collect();
    let third = rss_kib_v.len() / 3;
    let floors = |v: &[f64]| -> Option<f64> {
        let mins: Vec<f64> = v
            .chunks(5)
            .map(|c| c.iter().copied().fold(f64::INFINITY, f64::min))
            .collect();
        mean(&mins)
    };
    let (first_v, last_v) = if third > 0 {
        (&rss_kib_v[..third], &rss_kib_v[rss_kib_v.len() - third..])
    } else {
        (&rss_kib_v[..0], &rss_kib_v[..0])
    };
    let (rss_first, rss_last) = (floors(first_v), floors(last_v));
    let (raw_first, raw_last) = (mean(first_v), mean(last_v));
    let rss_peak = rss_kib_v
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let drift = match (rss_first, rss_last) {
        (Some(a), Some(b)) if a > 0.0 => Some((b - a) / a * 100.0),
        _ => None,
    };
    let dur = args.duration.as_secs_f64();
    let in_third = |v: &[(f64, f64)], first: bool| -> Option<f64> {
        let xs: Vec<f64> = v
            .iter()
            .filter(|(s, _)| {
                if first {
                    *s < dur / 3.0
                } else {
                    *s >= dur * 2.0 / 3.0
                }
            })
            .map(|x| x.1)
            .collect();
        mean(&xs)
    };
    let conns_first = in_third(&conns, true);
    let conns_last = in_third(&conns, false);
    match (args.gateway_pid, drift) {
        (None, _) => warnings.push("no --gateway-pid: RSS not sampled".into()),
        (Some(_), None) => failures.push("too few RSS samples to compare".into()),
        (Some(_), Some(d)) if d > args.rss_drift_max => failures.push(format!(
            "gateway RSS grew {d:.2}% between the first and last third (limit {}%)",
            args.rss_drift_max
        )),
        _ => {}
    }
    match (conns_first, conns_last) {
        (Some(a), Some(b)) if a > 0.0 => {
            // The comparison holds only at the same load: churn must replace what it closes.
            if ((b - a) / a).abs() > 0.02 {
                failures.push(format!(
                    "connections differ between the thirds ({a:.0} vs {b:.0}): the RSS comparison is not like for like"
                ));
            }
        }
        _ => failures.push("no connection counts from /metrics in the measured period".into()),
    }

    // Queues against their bounds, from the gateway's high-water marks (wsgate_mailbox_peak,
    // wsgate_queued_bytes_peak: nothing between samples is missed) and the sampled gauges; the
    // slack (default 2x) leaves room for the cores' batching (a batch is taken whole) and
    // for the gauges being read at different moments on each core; a queue that is not bounded
    // at all grows far past it under the flooders.
    let require = args.require_metrics;
    for (what, max, limit) in [
        ("wsgate_mailbox_depth", max_mailbox, limits.0),
        ("wsgate_queued_bytes", max_queued, limits.1),
    ] {
        let limit_name = if what == "wsgate_mailbox_depth" {
            "wsgate_limit{name=\"mailbox_limit\"}"
        } else {
            "wsgate_limit{name=\"max_total_queued_bytes\"}"
        };
        match (max, limit) {
            (None, _) | (_, None) => {
                let missing = if max.is_none() { what } else { limit_name };
                let w = format!("metric {missing} missing");
                if require {
                    failures.push(format!("{w} (SOAK_REQUIRE_METRICS=1)"));
                } else {
                    warnings.push(w);
                }
            }
            (Some(m), Some(l)) if l > 0.0 && m > l * args.queue_slack => failures.push(format!(
                "{what} reached {m:.0}, over {}x its limit {l:.0}",
                args.queue_slack
            )),
            _ => {}
        }
    }
    if scrape_failures > 0 {
        warnings.push(format!("{scrape_failures} scrapes of /metrics failed"));
    }
    for w in &warnings {
        eprintln!("[soak] warning: {w}");
    }

    let fin = final_scrape.or(last_scrape).unwrap_or_default();
    let round1 = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
    let out = json!({
        "scenario": "soak",
        "target": args.target.to_string(),
        "connections": args.connections,
        "processes": p,
        "source_addrs": args.source_addrs,
        "connect_secs": (connect_secs * 10.0).round() / 10.0,
        "warmup_secs": args.warmup.as_secs_f64(),
        "measured_secs": dur,
        "drain_secs": args.drain.as_secs_f64(),
        "total_secs": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "held": {
            "initial": initial_connected,
            "gateway_first_third": round1(conns_first),
            "gateway_last_third": round1(conns_last),
            "stable_open_at_end": t("stable_open_at_end"),
        },
        "churn": {
            "connects": t("connects"),
            "closes_clean": t("closes_clean"),
            "closes_clean_answered": t("closes_clean_answered"),
            "closes_rst": t("closes_rst"),
            "connect_failures": t("connect_failures"),
        },
        "messages": {
            "sent_direct": t("sent_direct"),
            "sent_room": t("sent_room"),
            "received_direct": t("received_direct"),
            "received_room": t("received_room"),
            "gaps": t("gaps"),
            "missing": t("missing"),
            "dups": t("dups"),
            "tail_missing": t("tail_missing"),
            "foreign": t("foreign"),
            "errors_received": t("errors_received"),
        },
        "unexpected_closes": t("unexpected_closes"),
        "unexpected_close_codes": total["unexpected_close_codes"],
        "stalled": {"cycles": t("stalled_cycles"), "write_failed": t("stalled_closed")},
        "flood": {"connects": t("flood_connects"), "bytes": t("flood_bytes")},
        "malformed": {
            "total": t("malformed"),
            "as_documented": t("malformed_expected"),
            "outcomes": total["malformed_outcomes"],
        },
        "rss_kib": {
            "samples": rss.len(),
            "first_third": round1(rss_first),
            "last_third": round1(rss_last),
            "drift_pct": drift.map(|d| (d * 100.0).round() / 100.0),
            "first_third_mean": round1(raw_first),
            "last_third_mean": round1(raw_last),
            "peak": rss_peak,
            "limit_pct": args.rss_drift_max,
            "series": rss_kib_v.iter().map(|v| *v as u64).collect::<Vec<_>>(),
        },
        "queues": {
            "max_mailbox_depth": max_mailbox,
            "mailbox_limit": limits.0,
            "max_queued_bytes": max_queued,
            "queued_bytes_limit": limits.1,
            "slack": args.queue_slack,
        },
        "gateway": {
            "connections_now": fin.connections,
            "accepted_total": fin.accepted,
            "closes_by_code": fin.closes_by_code,
            "slow_consumer_closes": fin.slow_consumer_closes,
            "idle_closes": fin.idle_closes,
            "protocol_closes": fin.protocol_closes,
        },
        "warnings": warnings,
        "failures": failures,
    });
    println!("{}", serde_json::to_string(&out)?);
    for f in &failures {
        eprintln!("[soak] FAIL: {f}");
    }
    Ok(failures.is_empty())
}
