//! Cluster mode over NATS or Redis: the bridge between this node's cores and the broker.
//!
//! One thread per node owns the broker client (`async-nats` on a current-thread tokio
//! runtime); the cores never touch tokio. Cores hand it what must leave the node through
//! `ClusterShared::submit`: a tokio channel whose *requests* are counted. Past half of
//! [`QUEUE_LIMIT`] the node's backpressure signal turns on (every core stops reading from
//! clients, the sources of requests) until the bridge has worked the queue down to a
//! quarter; past the limit itself a request is dropped, counted, and its count answered 0
//! at once. A core never blocks. The bridge hands what arrives to the right core's
//! mailbox (the user's or room's owner core, so one sender's messages stay in order), with
//! the mailboxes' usual backpressure.
//!
//! # Subjects
//!
//! Every subject starts with the prefix (`--cluster-prefix`, default `wsgate`), so a cluster
//! needs broker permissions on `PREFIX.>` only:
//!
//! | subject | who subscribes | what travels |
//! | --- | --- | --- |
//! | `PREFIX.u.<hex(user)>` | nodes holding a connection of the user | send, presence, disconnect |
//! | `PREFIX.r.<hex(room)>` | nodes holding a member of the room | publish |
//! | `PREFIX.b` | every node | broadcast |
//! | `PREFIX.q` | every node | count probes (below) |
//! | `PREFIX.hb` | every node | heartbeats, once a second; hello (answered at once by a heartbeat) on (re)connecting; goodbye on shutdown |
//! | `PREFIX.n.<hex(node)>` | that node | answers to its counted requests |
//! | `PREFIX.sync.<hex(node)>` | nobody | round trips (the server answers "no responders") |
//! | `PREFIX._INBOX.>` | (the client's inbox prefix; unused so far) | |
//!
//! Names are hex-encoded bytes: any id is a single subject token of `0-9a-f` (`.`, `*`, `>`,
//! `:` and `@` included), and two different ids never share a subject.
//!
//! # Messages
//!
//! One binary header, then the body: the WebSocket frame exactly as the origin encoded it
//! (encoded once, delivered as is). Header: kind (1 byte), token (u64 LE, 0 when nobody
//! counts), origin node (u8 length + bytes), name (u16 LE length + bytes). The client is
//! connected with `no_echo`: a node never receives what it published.
//!
//! # Counts
//!
//! A counted request (an ack'd `send`/`publish`, every API call) waits on its core for two
//! counts: the node's own, and the other nodes' total, which the bridge gathers. The bridge
//! expects an answer from every *live* node (one heard from on `PREFIX.hb` within
//! [`LIVE_FOR`]): nodes holding the target answer through the request itself (after their
//! cores counted), and the others answer a *probe* published on `PREFIX.q` right after the
//! request: a node that is not subscribed to the target answers it with 0 at once, one that
//! is subscribed (and had the subscription confirmed) leaves it to the request, which reached
//! it first: the broker delivers one publisher's messages in order. Probes and answers travel
//! in batches: the bridge drains up to 1,025 commands at a time, publishes their requests,
//! then *one* probe message listing every counted request of the drain (token, kind, name);
//! each node answers everything it owes one origin in one message of (token, count) pairs.
//! So a counted request costs its own publish plus a share of two messages per node, not two
//! messages per node. The gather ends when every expected node has
//! answered, when a node stops being live, or at `--cluster-timeout` (then the missing
//! nodes are left out and counted in `wsgate_cluster_missing_answers_total`). So an ack costs
//! one broker round trip, not a fixed quiet window. With the broker down, requests are not
//! published and their remote count is 0 at once.
//!
//! # Subscriptions and "routable at welcome"
//!
//! A user's owner core asks for the user's subscription when the node's first connection of
//! the user registers, and drops it when the last one leaves (rooms: when the node's first
//! member joins / last member leaves). The bridge subscribes, makes one round trip through
//! the server (`Bridge::round_trip`) and confirms to the core, which only then welcomes
//! the connection (or acks the join).
//!
//! # Redis
//!
//! `redis://` URLs use the same channels (named as the subjects above; `sync` and inboxes are
//! unused), messages, heartbeats and live list, through [`RedisLink`]: a pub/sub connection
//! whose SUBSCRIBE replies are awaited (that reply is the round trip: Redis sends it once it
//! holds the subscription), and a multiplexed connection for PUBLISH, whose reply is the
//! number of subscribers that received the message; a drain's requests go out as one
//! pipeline, in order, and its replies come back in one read. A count waits for exactly that many
//! answers (less this node: Redis has no `no_echo`, so a node's own messages come back and are
//! dropped by origin), with no probe. When either connection fails the bridge drops both,
//! reconnects (every 0.1 to 1 s) and subscribes every channel it holds again before saying
//! hello. Heartbeats carry a per-process nonce, which tells this node's own echoed heartbeats
//! from a duplicate `--node-id`'s.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::key::ConnKey;
use crate::mailbox::{self, MailboxSender, Pressure, Reason};
use crate::route::{ClusterOut, Kind, Msg, Owners, RemoteReq};

/// What the bridge needs of the node: the cores' mailboxes and who owns what.
pub(crate) struct Node {
    /// Each core's mailbox.
    pub mailboxes: Vec<MailboxSender<Msg>>,
    /// The owner core of a user or room.
    pub owners: Owners,
    /// The gateway-wide backpressure signal.
    pub pressure: Arc<Pressure>,
    /// `--mailbox-limit`.
    pub mailbox_limit: usize,
    /// `--cluster-timeout`.
    pub timeout: Duration,
    /// `--cluster`.
    pub urls: Vec<String>,
    /// What the cores and the HTTP side share with the bridge.
    pub cluster: Arc<ClusterShared>,
}

/// Requests queued from the cores to the bridge beyond which new ones are dropped (counted).
pub const QUEUE_LIMIT: usize = 65536;
/// Heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node is live while it was heard from within this.
pub const LIVE_FOR: Duration = Duration::from_secs(3);

const SEND: u8 = 1;
const PUBLISH: u8 = 2;
const BROADCAST: u8 = 3;
const PRESENCE: u8 = 4;
const DISCONNECT: u8 = 5;
const PROBE: u8 = 6;
const ANSWER: u8 = 7;
const HEARTBEAT_KIND: u8 = 8;
const BYE: u8 = 9;
/// A heartbeat that asks every node for theirs at once (sent on (re)connecting).
const HELLO: u8 = 10;

/// What the cores and the HTTP side share with the bridge.
pub(crate) struct ClusterShared {
    /// This node's id.
    pub node: String,
    /// The subject prefix.
    pub prefix: String,
    /// `"nats"` or `"redis"`.
    pub broker: &'static str,
    tx: mpsc::UnboundedSender<(usize, ClusterOut)>,
    depth: AtomicUsize,
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Live nodes, this one included, sorted.
    pub nodes: Mutex<Vec<String>>,
    /// Messages published to the broker.
    pub to_broker: AtomicU64,
    /// Messages received from the broker.
    pub from_broker: AtomicU64,
    /// Reconnections to the broker after a loss.
    pub reconnects: AtomicU64,
    /// Answers that came after their count was settled.
    pub late_answers: AtomicU64,
    /// Nodes left out of a count (no answer in time).
    pub missing_answers: AtomicU64,
    /// Requests dropped because the bridge's queue was full.
    pub dropped: AtomicU64,
    /// The node is shutting down: it says goodbye, and stops its heartbeats.
    pub leaving: AtomicBool,
    /// The goodbye is out (or there is no broker to say it to).
    bye_sent: AtomicBool,
    /// The node's backpressure signal.
    pressure: Arc<Pressure>,
}

impl ClusterShared {
    /// From a core: hands `out` to the bridge. A request is given back when the queue is
    /// full (its count must then be settled by the caller).
    pub fn submit(&self, core: usize, out: ClusterOut) -> Result<(), ClusterOut> {
        let request = matches!(out, ClusterOut::Request { .. });
        if request {
            if self.depth.load(Relaxed) >= QUEUE_LIMIT {
                self.dropped.fetch_add(1, Relaxed);
                return Err(out);
            }
            let depth = self.depth.fetch_add(1, Relaxed) + 1;
            if depth > QUEUE_LIMIT / 2 && !self.pressure.has(0, Reason::Bridge) {
                self.pressure.set(0, Reason::Bridge, true);
            }
        }
        self.tx.send((core, out)).map_err(|e| {
            if request {
                self.depth.fetch_sub(1, Relaxed);
            }
            e.0 .1
        })
    }

    /// The bridge took a request off the queue; at a quarter of the bound the backpressure
    /// it caused ends.
    fn taken(&self) {
        let left = self.depth.fetch_sub(1, Relaxed).saturating_sub(1);
        if left <= QUEUE_LIMIT / 4 {
            self.settle();
        }
    }

    /// Turns the bridge's backpressure off when the queue is low (also checked every tick:
    /// a core may turn it on just after the bridge's last look).
    fn settle(&self) {
        if self.pressure.has(0, Reason::Bridge) && self.depth.load(Relaxed) <= QUEUE_LIMIT / 4 {
            self.pressure.set(0, Reason::Bridge, false);
        }
    }

    /// At exit: waits (bounded) until the bridge has said goodbye.
    pub fn wait_bye(&self, within: Duration) {
        let end = Instant::now() + within;
        while !self.bye_sent.load(Relaxed) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `/api/stats`'s `cluster` object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "node": self.node,
            "broker": self.broker,
            "connected": self.connected.load(Relaxed),
            "nodes": *self.nodes.lock().unwrap(),
        })
    }
}

/// Creates the shared state and the bridge's receiving end.
pub(crate) fn shared(
    config: &crate::Config,
    pressure: Arc<Pressure>,
) -> (ClusterShared, mpsc::UnboundedReceiver<(usize, ClusterOut)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let node = config.node_name();
    let shared = ClusterShared {
        nodes: Mutex::new(vec![node.clone()]),
        node,
        prefix: config.cluster_prefix.clone(),
        broker: if config.cluster.first().is_some_and(|u| is_redis(u)) {
            "redis"
        } else {
            "nats"
        },
        tx,
        depth: AtomicUsize::new(0),
        connected: AtomicBool::new(false),
        to_broker: AtomicU64::new(0),
        from_broker: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        late_answers: AtomicU64::new(0),
        missing_answers: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        leaving: AtomicBool::new(false),
        bye_sent: AtomicBool::new(false),
        pressure,
    };
    (shared, rx)
}

/// A `redis://` URL (the scheme picks the broker).
pub fn is_redis(url: &str) -> bool {
    url.trim().to_ascii_lowercase().starts_with("redis://")
}

/// A name as one subject token: its bytes in lowercase hex.
pub fn encode_name(name: &str) -> String {
    let mut s = String::with_capacity(name.len() * 2);
    for b in name.bytes() {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

/// The subject of a user or a room.
pub fn subject(prefix: &str, kind: Kind, name: &str) -> String {
    let k = match kind {
        Kind::User => 'u',
        Kind::Room => 'r',
    };
    format!("{prefix}.{k}.{}", encode_name(name))
}

/// A decoded broker message.
#[derive(Debug, PartialEq, Eq)]
pub struct Wire<'a> {
    /// What it is.
    pub kind: u8,
    /// The origin's token (0: not counted).
    pub token: u64,
    /// The node that sent it.
    pub origin: &'a str,
    /// The user or room (empty when none).
    pub name: &'a str,
    /// Offset of the body in the payload.
    pub body: usize,
}

/// Encodes a header and body.
pub fn encode(kind: u8, token: u64, origin: &str, name: &str, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + 8 + 1 + origin.len() + 2 + name.len() + body.len());
    b.put_u8(kind);
    b.put_u64_le(token);
    b.put_u8(origin.len().min(255) as u8);
    b.put_slice(&origin.as_bytes()[..origin.len().min(255)]);
    b.put_u16_le(name.len().min(65535) as u16);
    b.put_slice(&name.as_bytes()[..name.len().min(65535)]);
    b.put_slice(body);
    b.freeze()
}

/// Decodes a header; `None` for anything malformed (ignored, never trusted).
pub fn decode(p: &[u8]) -> Option<Wire<'_>> {
    let kind = *p.first()?;
    let token = u64::from_le_bytes(p.get(1..9)?.try_into().ok()?);
    let olen = usize::from(*p.get(9)?);
    let origin = std::str::from_utf8(p.get(10..10 + olen)?).ok()?;
    let at = 10 + olen;
    let nlen = usize::from(u16::from_le_bytes(p.get(at..at + 2)?.try_into().ok()?));
    let name = std::str::from_utf8(p.get(at + 2..at + 2 + nlen)?).ok()?;
    Some(Wire {
        kind,
        token,
        origin,
        name,
        body: at + 2 + nlen,
    })
}

/// Largest batch of probes or answers in one broker message (well under NATS' 1 MB
/// default payload limit); a batch that reaches it is published at once.
const BATCH_BYTES: usize = 64 * 1024;

/// Appends a probe entry: token, target kind, name.
fn put_probe(b: &mut BytesMut, token: u64, kind: Kind, name: &str) {
    let name = &name.as_bytes()[..name.len().min(65535)];
    b.put_u64_le(token);
    b.put_u8(kind as u8);
    b.put_u16_le(name.len() as u16);
    b.put_slice(name);
}

/// The entries of a probe batch; stops at the first malformed one (never trusted).
fn probes(mut p: &[u8]) -> impl Iterator<Item = (u64, Kind, &str)> {
    std::iter::from_fn(move || {
        let token = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
        let kind = if *p.get(8)? == Kind::Room as u8 {
            Kind::Room
        } else {
            Kind::User
        };
        let len = usize::from(u16::from_le_bytes(p.get(9..11)?.try_into().ok()?));
        let name = std::str::from_utf8(p.get(11..11 + len)?).ok()?;
        p = &p[11 + len..];
        Some((token, kind, name))
    })
}

/// The entries of an answer batch: (token, count) pairs; a trailing partial one is ignored.
fn answers(p: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    p.chunks_exact(16).map(|c| {
        let (t, n) = c.split_at(8);
        (
            u64::from_le_bytes(t.try_into().unwrap_or_default()),
            u64::from_le_bytes(n.try_into().unwrap_or_default()),
        )
    })
}

/// Starts the bridge thread. It lives as long as the process; a panic in it aborts the
/// process, like a worker's (a node cut off from its cluster must not look healthy).
pub(crate) fn start(shared: Node, rx: mpsc::UnboundedReceiver<(usize, ClusterOut)>) {
    std::thread::Builder::new()
        .name("wsgate-cluster".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the cluster bridge");
                rt.block_on(run(shared, rx));
            }));
            if outcome.is_err() {
                eprintln!("wsgate: the cluster bridge panicked; aborting");
                std::process::abort();
            }
        })
        .expect("spawn the cluster bridge");
}

/// `%XX` escapes of a URL's user or password decoded (anything malformed kept as is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Gather {
    waiting: Waiting,
    sum: u64,
    deadline: Instant,
    waiter: ConnKey,
}

/// Whose answers a count waits for.
enum Waiting {
    /// NATS: every live node, by name (holders answer the request, the others the probe).
    Nodes(HashSet<String>),
    /// Redis: `PUBLISH` said how many nodes received the request; each answers once.
    Count { left: usize, seen: HashSet<String> },
}

impl Waiting {
    /// `node` answered: true when the answer was expected.
    fn answered(&mut self, node: &str) -> bool {
        match self {
            Waiting::Nodes(w) => w.remove(node),
            Waiting::Count { left, seen } => {
                if *left > 0 && seen.insert(node.to_string()) {
                    *left -= 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        match self {
            Waiting::Nodes(w) => w.len(),
            Waiting::Count { left, .. } => *left,
        }
    }

    /// `node` said goodbye. (Redis: whether it was among the receivers is unknown; a node
    /// gone is no longer counted by later `PUBLISH`es, and a count in flight waits at most
    /// the timeout.)
    fn forget(&mut self, node: &str) {
        if let Waiting::Nodes(w) = self {
            w.remove(node);
        }
    }

    /// Nodes that stopped being live, or everyone when the broker is gone.
    fn retain_live(&mut self, connected: bool, live: &HashSet<&String>) {
        match self {
            Waiting::Nodes(w) => w.retain(|n| connected && live.contains(n)),
            Waiting::Count { left, .. } => {
                if !connected {
                    *left = 0;
                }
            }
        }
    }
}

/// What arrives from the broker's reading side.
enum Incoming {
    /// A message's payload.
    Msg(Bytes),
    /// Redis: the pub/sub connection of this generation ended.
    Lost(u64),
}

/// The broker client.
enum Link {
    Nats(async_nats::Client),
    Redis(Box<RedisLink>),
}

/// Redis: one pub/sub connection (SUBSCRIBE, messages in) and one multiplexed connection
/// (PUBLISH), re-made together by the bridge after a loss, every channel subscribed again.
struct RedisLink {
    client: redis::Client,
    session: Option<RedisSession>,
    /// Generation of the session (a loss reported by an older one is ignored).
    gen: u64,
    next_attempt: Instant,
    attempts: u32,
    /// Channels this node wants.
    wanted: HashSet<String>,
    /// Channels the server has confirmed for the current session.
    server_has: HashSet<String>,
    /// Channels whose wanted state changed since the last sync.
    dirty: HashSet<String>,
    /// The connection attempt under way.
    connecting: Option<tokio::task::JoinHandle<RedisConnected>>,
}

/// A finished connection attempt: the session, the channels subscribed, its generation.
type RedisConnected = redis::RedisResult<(RedisSession, Vec<String>, u64)>;

struct RedisSession {
    sink: redis::aio::PubSubSink,
    conn: redis::aio::MultiplexedConnection,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RedisSession {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Bound of one Redis command (connect, subscribe, publish).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisLink {
    fn want(&mut self, channel: String, on: bool) {
        if on {
            self.wanted.insert(channel.clone());
        } else {
            self.wanted.remove(&channel);
        }
        self.dirty.insert(channel);
    }

    fn lost(&mut self) {
        if self.session.take().is_some() {
            tracing::debug!("redis session lost");
        }
        self.server_has.clear();
        self.gen += 1;
        self.next_attempt = Instant::now();
    }

    /// SUBSCRIBE / UNSUBSCRIBE (awaiting the server's confirmations) what changed; false
    /// when the connection failed.
    async fn sync(&mut self) -> bool {
        let Some(session) = self.session.as_mut() else {
            self.dirty.clear();
            return true;
        };
        let mut sub = Vec::new();
        let mut unsub = Vec::new();
        for c in self.dirty.drain() {
            match (self.wanted.contains(&c), self.server_has.contains(&c)) {
                (true, false) => sub.push(c),
                (false, true) => unsub.push(c),
                _ => {}
            }
        }
        for chunk in unsub.chunks(512) {
            let done = tokio::time::timeout(REDIS_TIMEOUT, session.sink.unsubscribe(chunk)).await;
            if !matches!(done, Ok(Ok(()))) {
                return false;
            }
            for c in chunk {
                self.server_has.remove(c);
            }
        }
        for chunk in sub.chunks(512) {
            let done = tokio::time::timeout(REDIS_TIMEOUT, session.sink.subscribe(chunk)).await;
            if !matches!(done, Ok(Ok(()))) {
                return false;
            }
            self.server_has.extend(chunk.iter().cloned());
        }
        true
    }

    /// Starts connecting both connections, and subscribing every wanted channel, in a task
    /// of its own: the bridge must never wait on a server that may not answer.
    fn start_connect(&mut self, in_tx: &mpsc::Sender<Incoming>) {
        self.gen += 1;
        let all: Vec<String> = self.wanted.iter().cloned().collect();
        let task = connect_redis(self.client.clone(), all, in_tx.clone(), self.gen);
        self.connecting = Some(tokio::spawn(task));
    }

    /// The outcome of the connection attempt once it has finished (`None` before, or when
    /// a newer generation made it stale); on success the session is in place.
    async fn finish_connect(&mut self) -> Option<redis::RedisResult<()>> {
        if !self.connecting.as_ref()?.is_finished() {
            return None;
        }
        let done = self.connecting.take()?.await.unwrap_or_else(|e| {
            Err(redis::RedisError::from(std::io::Error::other(
                e.to_string(),
            )))
        });
        let (session, subscribed, gen) = match done {
            Ok(ok) => ok,
            Err(e) => return Some(Err(e)),
        };
        if gen != self.gen {
            return None;
        }
        self.server_has = subscribed.into_iter().collect();
        // What changed while connecting is set right by the next `sync`.
        self.dirty = self.wanted.union(&self.server_has).cloned().collect();
        self.session = Some(session);
        self.attempts = 0;
        Some(Ok(()))
    }

    /// PUBLISH; the number of *other* subscribers that received it (Redis echoes to this
    /// node's own subscription), `None` when it failed.
    async fn publish(&mut self, channel: String, payload: Bytes) -> Option<u64> {
        let session = self.session.as_mut()?;
        let me_too = u64::from(self.server_has.contains(&channel));
        let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(&payload[..])
            .query_async(&mut session.conn)
            .await;
        match sent {
            Ok(n) => Some(n.saturating_sub(me_too)),
            Err(e) => {
                tracing::debug!(error = %e, "publish failed");
                self.lost();
                None
            }
        }
    }
}

impl RedisLink {
    /// `PUBLISH`es every (channel, payload) in one pipeline, in order: how many *other*
    /// nodes received each, or `None` (and the session dropped) when it failed.
    async fn publish_all<T>(&mut self, out: &[(String, Bytes, T)]) -> Option<Vec<u64>> {
        let session = self.session.as_mut()?;
        let mut pipe = redis::pipe();
        for (channel, payload, _) in out {
            pipe.cmd("PUBLISH").arg(channel).arg(&payload[..]);
        }
        let sent: redis::RedisResult<Vec<u64>> = pipe.query_async(&mut session.conn).await;
        match sent {
            Ok(n) if n.len() == out.len() => Some(
                n.iter()
                    .zip(out)
                    .map(|(n, (c, _, _))| n.saturating_sub(u64::from(self.server_has.contains(c))))
                    .collect(),
            ),
            Ok(n) => {
                tracing::warn!(
                    sent = out.len(),
                    replies = n.len(),
                    "pipeline replies do not match"
                );
                self.lost();
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "publish failed");
                self.lost();
                None
            }
        }
    }
}

/// Connects a Redis session of generation `gen` and subscribes `all`: the session and the
/// channels the server confirmed.
async fn connect_redis(
    client: redis::Client,
    all: Vec<String>,
    tx: mpsc::Sender<Incoming>,
    gen: u64,
) -> redis::RedisResult<(RedisSession, Vec<String>, u64)> {
    let timed_out = || redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    let (mut sink, mut stream) = pubsub.split();
    for chunk in all.chunks(512) {
        tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(chunk))
            .await
            .map_err(|_| timed_out())??;
    }
    let reader = tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            let payload = Bytes::copy_from_slice(m.get_payload_bytes());
            if tx.send(Incoming::Msg(payload)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Incoming::Lost(gen)).await;
    });
    Ok((RedisSession { sink, conn, reader }, all, gen))
}

/// A request's token and the connection waiting for its count, when counted.
type Counted = Option<(u64, ConnKey)>;

/// A user or room subscription: NATS's forwarding task, and whether the broker confirmed it.
type Sub = (Option<tokio::task::JoinHandle<()>>, bool);

struct Bridge {
    shared: Node,
    link: Link,
    /// Random per process: tells this node's own heartbeats (echoed by Redis) from a
    /// duplicate node id's.
    nonce: u64,
    me: String,
    prefix: String,
    /// This node's user and room subscriptions: the forwarding task, and whether the
    /// broker confirmed it (a round trip returned after it).
    subs: HashMap<(Kind, Box<str>), Sub>,
    confirms: Vec<(usize, Kind, Box<str>, u64)>,
    pending: HashMap<u64, Gather>,
    next_token: u64,
    /// Counted requests from other nodes being carried out here: local token -> origin's.
    remote: HashMap<u64, (String, u64)>,
    next_local: u64,
    last_seen: HashMap<String, Instant>,
    connected: bool,
    ever_connected: bool,
    said_bye: bool,
    /// A node said hello: answer with a heartbeat now.
    answer_hello: bool,
    /// When a duplicate node id was last reported.
    duplicate_warned: Option<Instant>,
    in_tx: mpsc::Sender<Incoming>,
    /// Messages for each core, sent as one batch per drain.
    batches: Vec<Vec<Msg>>,
    /// NATS: probes for this drain's counted requests, published as one message after them.
    probe_batch: BytesMut,
    /// Answers owed to each origin node, published as one message per origin per drain.
    answer_batches: HashMap<String, BytesMut>,
    /// Redis: this drain's requests (channel, message, token and waiter when counted),
    /// published as one pipeline, and their bytes.
    redis_out: Vec<(String, Bytes, Counted)>,
    redis_bytes: usize,
    /// NATS: the liveness task found the server not answering while the client still
    /// thinks it is connected (a network cut, a frozen server).
    cut: Arc<AtomicBool>,
}

async fn run(shared: Node, rx: mpsc::UnboundedReceiver<(usize, ClusterOut)>) {
    let me = shared.cluster.node.clone();
    let prefix = shared.cluster.prefix.clone();
    let link = match shared.urls.first() {
        Some(url) if is_redis(url) => redis_link(url.trim()).await,
        _ => Link::Nats(nats_client(&shared, &me, &prefix).await),
    };
    bridge(shared, rx, link, me, prefix).await
}

async fn redis_link(url: &str) -> Link {
    let client = loop {
        match redis::Client::open(url) {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the broker client; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    Link::Redis(Box::new(RedisLink {
        client,
        session: None,
        gen: 0,
        next_attempt: Instant::now(),
        attempts: 0,
        wanted: HashSet::new(),
        server_has: HashSet::new(),
        dirty: HashSet::new(),
        connecting: None,
    }))
}

async fn nats_client(shared: &Node, me: &str, prefix: &str) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = shared
        .urls
        .iter()
        .filter_map(|u| match u.trim().parse() {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(url = %u, error = %e, "bad --cluster URL");
                None
            }
        })
        .collect();
    // async-nats does not take credentials from the URLs itself: the first URL with some
    // gives them (`nats://user:pass@host`, or `nats://token@host`).
    let creds = addrs.iter().find(|a| a.has_user_pass()).map(|a| {
        (
            percent_decode(a.username().unwrap_or_default()),
            a.password().map(percent_decode),
        )
    });
    loop {
        let mut opts = async_nats::ConnectOptions::new();
        opts = match creds.clone() {
            Some((user, Some(pass))) => opts.user_and_password(user, pass),
            Some((token, None)) => opts.token(token),
            None => opts,
        };
        let opts = opts
            .name(format!("wsgate {me}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            // At most a second between attempts: delivery resumes within seconds of the
            // broker's return.
            .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(1000)))
            .connection_timeout(Duration::from_secs(2))
            .custom_inbox_prefix(format!("{prefix}._INBOX"))
            .subscription_capacity(1 << 16)
            .client_capacity(1 << 12);
        match opts.connect(addrs.clone()).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the broker client; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn bridge(
    shared: Node,
    mut rx: mpsc::UnboundedReceiver<(usize, ClusterOut)>,
    link: Link,
    me: String,
    prefix: String,
) {
    let (in_tx, mut in_rx) = mpsc::channel(1 << 16);
    let mut b = Bridge {
        batches: (0..shared.mailboxes.len()).map(|_| Vec::new()).collect(),
        shared,
        link,
        nonce: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32),
        me: me.clone(),
        prefix: prefix.clone(),
        subs: HashMap::new(),
        confirms: Vec::new(),
        pending: HashMap::new(),
        // Not 1: answers still in flight for a previous process with the same --node-id must
        // not match this one's requests.
        next_token: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        remote: HashMap::new(),
        next_local: 1,
        last_seen: HashMap::new(),
        connected: false,
        ever_connected: false,
        said_bye: false,
        answer_hello: false,
        duplicate_warned: None,
        in_tx,
        probe_batch: BytesMut::new(),
        answer_batches: HashMap::new(),
        redis_out: Vec::new(),
        redis_bytes: 0,
        cut: Arc::new(AtomicBool::new(false)),
    };
    if let Link::Nats(client) = &b.link {
        tokio::spawn(liveness(
            client.clone(),
            format!("{prefix}.sync.{}", encode_name(&me)),
            b.cut.clone(),
        ));
    }
    for s in [
        format!("{prefix}.b"),
        format!("{prefix}.q"),
        format!("{prefix}.hb"),
        format!("{prefix}.n.{}", encode_name(&me)),
    ] {
        if let Link::Redis(r) = &mut b.link {
            r.want(s, true);
        } else {
            b.subscribe(s).await;
        }
    }
    b.maintain().await;
    tracing::info!(node = %me, %prefix, "cluster bridge started");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut hb = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some((core, out)) = cmd else { return };
                b.command(core, out).await;
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok((core, out)) => b.command(core, out).await,
                        Err(_) => break,
                    }
                }
                b.flush_redis().await;
                b.send_probes().await;
                b.send_answers().await;
                b.confirm().await;
                b.flush_batches();
            }
            msg = in_rx.recv() => {
                let Some(msg) = msg else { return };
                b.incoming(msg).await;
                for _ in 0..1024 {
                    match in_rx.try_recv() {
                        Ok(msg) => b.incoming(msg).await,
                        Err(_) => break,
                    }
                }
                b.send_answers().await;
                b.flush_batches();
                if std::mem::take(&mut b.answer_hello) {
                    b.heartbeat(HEARTBEAT_KIND).await;
                }
            }
            _ = tick.tick() => {
                b.maintain().await;
                if b.tick() {
                    // Just (re)connected: tell the others, and ask for their heartbeats.
                    b.heartbeat(HELLO).await;
                } else if b.cs().leaving.load(Relaxed) && !b.said_bye {
                    b.heartbeat(HEARTBEAT_KIND).await;
                }
                b.flush_batches();
            }
            _ = hb.tick() => b.heartbeat(HEARTBEAT_KIND).await,
        }
    }
}

/// How often the NATS liveness task makes a round trip through the server.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);
/// A round trip slower than this failed.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the NATS client to take a publish or subscribe (its command queue is
/// full only when the server does not keep up): past it the message is dropped, counted in
/// `wsgate_cluster_dropped_total`, and the bridge goes on serving the cores.
const ENQUEUE_TIMEOUT: Duration = Duration::from_millis(100);

/// NATS: a connection cut without a FIN or RST, or a frozen server, leaves the client
/// "connected" for minutes (its own pings are put off by every publish, and the heartbeats
/// publish every second). So once a second: a round trip through the server; two failing in
/// a row mark the link cut (the node serves locally and `/readyz` says so) and make the
/// client reconnect; one answered clears it.
async fn liveness(client: async_nats::Client, subject: String, cut: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(LIVENESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = 0u32;
    loop {
        tick.tick().await;
        if client.connection_state() != async_nats::connection::State::Connected {
            failed = 0;
            cut.store(false, Relaxed);
            continue;
        }
        let asked = client.request(subject.clone(), Bytes::new());
        let ok = match tokio::time::timeout(LIVENESS_TIMEOUT, asked).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == async_nats::RequestErrorKind::NoResponders,
            Err(_) => false,
        };
        if ok {
            failed = 0;
            cut.store(false, Relaxed);
            continue;
        }
        failed += 1;
        if failed >= 2 && !cut.swap(true, Relaxed) {
            tracing::warn!("the broker does not answer: reconnecting");
            let _ = tokio::time::timeout(Duration::from_secs(2), client.force_reconnect()).await;
        }
    }
}

impl Bridge {
    fn cs(&self) -> &ClusterShared {
        &self.shared.cluster
    }

    /// Subscribes and forwards every message to the bridge's loop.
    async fn subscribe(&mut self, subject: String) -> Option<tokio::task::JoinHandle<()>> {
        let Link::Nats(client) = &self.link else {
            return None;
        };
        let asked = tokio::time::timeout(ENQUEUE_TIMEOUT, client.subscribe(subject.clone())).await;
        let Ok(asked) = asked else {
            tracing::warn!(%subject, "subscribe: the client's queue is full; retrying later");
            return None;
        };
        match asked {
            Ok(mut sub) => {
                let tx = self.in_tx.clone();
                Some(tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        if tx.send(Incoming::Msg(m.payload)).await.is_err() {
                            break;
                        }
                    }
                }))
            }
            Err(e) => {
                tracing::warn!(%subject, error = %e, "subscribe failed");
                None
            }
        }
    }

    /// Publishes one message: false when it was not sent (no broker).
    async fn publish(&mut self, subject: String, payload: Bytes) -> bool {
        if !self.connected {
            return false;
        }
        let sent = match &mut self.link {
            Link::Nats(client) => {
                match tokio::time::timeout(ENQUEUE_TIMEOUT, client.publish(subject, payload)).await
                {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "publish failed");
                        false
                    }
                    Err(_) => {
                        self.shared.cluster.dropped.fetch_add(1, Relaxed);
                        false
                    }
                }
            }
            Link::Redis(r) => r.publish(subject, payload).await.is_some(),
        };
        if sent {
            self.cs().to_broker.fetch_add(1, Relaxed);
        }
        sent
    }

    /// Redis: reconnects when due (at most a second between attempts). NATS: subscribes
    /// again what failed to subscribe (the client resubscribes the rest by itself).
    async fn maintain(&mut self) {
        if matches!(self.link, Link::Nats(_)) {
            if !self.connected {
                return;
            }
            let failed: Vec<(Kind, Box<str>)> = self
                .subs
                .iter()
                .filter(|(_, s)| s.0.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            for (kind, name) in failed {
                let h = self.subscribe(subject(&self.prefix, kind, &name)).await;
                if h.is_none() {
                    break;
                }
                if let Some(s) = self.subs.get_mut(&(kind, name)) {
                    s.0 = h;
                    // Confirmed by the next round trip's success; a late subscription is
                    // what a probe answers for with 0 meanwhile, so count it in at once.
                    s.1 = true;
                }
            }
            return;
        }
        let Link::Redis(r) = &mut self.link else {
            return;
        };
        if r.session.is_some() {
            return;
        }
        match r.finish_connect().await {
            None => {
                if r.connecting.is_none() && Instant::now() >= r.next_attempt {
                    r.start_connect(&self.in_tx);
                }
            }
            Some(Ok(())) => {
                // Every subscription is in place again (confirmed by the server), and those
                // changed meanwhile are made now.
                if !r.sync().await {
                    r.lost();
                    return;
                }
                for sub in self.subs.values_mut() {
                    sub.1 = true;
                }
            }
            Some(Err(e)) => {
                r.attempts += 1;
                if r.attempts == 1 || r.attempts % 60 == 0 {
                    tracing::warn!(error = %e, "cannot connect to the broker; retrying");
                }
                let delay = (u64::from(r.attempts) * 100).min(1000);
                r.next_attempt = Instant::now() + Duration::from_millis(delay);
            }
        }
    }

    fn hand_to_core(&mut self, core: usize, msg: Msg) {
        self.batches[core].push(msg);
    }

    fn flush_batches(&mut self) {
        let limit = self.shared.mailbox_limit;
        for (core, batch) in self.batches.iter_mut().enumerate() {
            if !batch.is_empty() {
                mailbox::send_bounded(
                    core,
                    &self.shared.mailboxes[core],
                    std::mem::take(batch),
                    limit,
                    &self.shared.pressure,
                );
            }
        }
    }

    async fn command(&mut self, core: usize, out: ClusterOut) {
        match out {
            ClusterOut::Interest {
                kind,
                name,
                on: true,
                seq,
            } => {
                let key = (kind, name.clone());
                if !self.subs.contains_key(&key) {
                    let subject = subject(&self.prefix, kind, &name);
                    if let Link::Redis(r) = &mut self.link {
                        // Subscribed (one SUBSCRIBE for the batch) in `confirm`.
                        r.want(subject, true);
                        self.subs.insert(key, (None, false));
                    } else {
                        // A failed subscribe is kept (no task) and retried by `maintain`.
                        let h = self.subscribe(subject).await;
                        self.subs.insert(key, (h, false));
                    }
                }
                self.confirms.push((core, kind, name, seq));
            }
            ClusterOut::Interest { kind, name, .. } => {
                if let Some((h, _)) = self.subs.remove(&(kind, name.clone())) {
                    if let Some(h) = h {
                        // Dropping the subscriber unsubscribes.
                        h.abort();
                    }
                    if let Link::Redis(r) = &mut self.link {
                        r.want(subject(&self.prefix, kind, &name), false);
                    }
                }
            }
            ClusterOut::Request { req, waiter } => {
                self.cs().taken();
                self.request(req, waiter).await;
            }
            ClusterOut::Answer { token, n } => {
                if let Some((origin, t)) = self.remote.remove(&token) {
                    self.owe(origin, t, n).await;
                }
            }
        }
    }

    async fn request(&mut self, req: RemoteReq, waiter: Option<ConnKey>) {
        let token = if waiter.is_some() {
            self.next_token = self.next_token.wrapping_add(1).max(1);
            self.next_token
        } else {
            0
        };
        let (kind, target, subject, body): (u8, Option<(Kind, &str)>, String, &[u8]) = match &req {
            RemoteReq::Send { user, frame } => (
                SEND,
                Some((Kind::User, user)),
                subject(&self.prefix, Kind::User, user),
                frame,
            ),
            RemoteReq::Publish { room, frame } => (
                PUBLISH,
                Some((Kind::Room, room)),
                subject(&self.prefix, Kind::Room, room),
                frame,
            ),
            RemoteReq::Broadcast { frame } => {
                (BROADCAST, None, format!("{}.b", self.prefix), frame)
            }
            RemoteReq::Presence { user } => (
                PRESENCE,
                Some((Kind::User, user)),
                subject(&self.prefix, Kind::User, user),
                &[],
            ),
            RemoteReq::Disconnect { user } => (
                DISCONNECT,
                Some((Kind::User, user)),
                subject(&self.prefix, Kind::User, user),
                &[],
            ),
        };
        let name = target.map_or("", |t| t.1);
        let payload = encode(kind, token, &self.me, name, body);
        if let Link::Redis(_) = self.link {
            // Pipelined with the rest of the drain's requests (`flush_redis`), in order.
            if !self.connected {
                if let Some(waiter) = waiter {
                    self.hand_to_core(waiter.core(), Msg::Count { waiter, n: 0 });
                }
                return;
            }
            self.redis_bytes += payload.len();
            self.redis_out
                .push((subject, payload, waiter.map(|w| (token, w))));
            if self.redis_out.len() >= 1024 || self.redis_bytes >= 16 * BATCH_BYTES {
                self.flush_redis().await;
            }
            return;
        }
        let sent = self.publish(subject, payload).await;
        let Some(waiter) = waiter else { return };
        let waiting = if sent {
            Waiting::Nodes(self.live_others().collect())
        } else {
            Waiting::Nodes(HashSet::new())
        };
        if let (Some((k, name)), false) = (target, waiting.is_empty()) {
            // Published once this drain's requests are out (`send_probes`): after the
            // request, as the holders' answers require, and one probe for many requests.
            put_probe(&mut self.probe_batch, token, k, name);
            if self.probe_batch.len() >= BATCH_BYTES {
                self.send_probes().await;
            }
        }
        self.gather(token, waiting, waiter);
    }

    /// Waits for `waiting`'s answers to `token`, then tells `waiter` (at once when nobody is
    /// to answer).
    fn gather(&mut self, token: u64, waiting: Waiting, waiter: ConnKey) {
        if waiting.is_empty() {
            self.hand_to_core(waiter.core(), Msg::Count { waiter, n: 0 });
            return;
        }
        let deadline = Instant::now() + self.shared.timeout;
        self.pending.insert(
            token,
            Gather {
                waiting,
                sum: 0,
                deadline,
                waiter,
            },
        );
    }

    /// Redis: publishes the drain's requests as one pipeline; each `PUBLISH`'s reply says
    /// how many other nodes received it, so how many answers its count waits for.
    async fn flush_redis(&mut self) {
        if self.redis_out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.redis_out);
        self.redis_bytes = 0;
        let Link::Redis(r) = &mut self.link else {
            return;
        };
        let counts = r.publish_all(&out).await;
        if counts.is_some() {
            self.cs().to_broker.fetch_add(out.len() as u64, Relaxed);
        }
        for (i, (_, _, waiter)) in out.into_iter().enumerate() {
            let Some((token, waiter)) = waiter else {
                continue;
            };
            let left = counts
                .as_ref()
                .and_then(|c| c.get(i))
                .map_or(0, |n| *n as usize);
            let waiting = Waiting::Count {
                left,
                seen: HashSet::new(),
            };
            self.gather(token, waiting, waiter);
        }
    }

    fn live_others(&self) -> impl Iterator<Item = String> + '_ {
        let now = Instant::now();
        self.last_seen
            .iter()
            .filter(move |(_, t)| now.duration_since(**t) < LIVE_FOR)
            .map(|(n, _)| n.clone())
    }

    /// After subscribing: one round trip to the server, then the cores go on.
    async fn confirm(&mut self) {
        if let Link::Redis(r) = &mut self.link {
            // Redis answers a SUBSCRIBE on the pub/sub connection once it holds it: awaiting
            // that is the round trip.
            if !r.sync().await {
                tracing::warn!("subscribing failed; reconnecting");
                r.lost();
            }
        }
        if self.confirms.is_empty() {
            return;
        }
        let nats = matches!(self.link, Link::Nats(_));
        if nats && self.connected && !self.round_trip().await {
            tracing::warn!("no round trip to the broker; welcoming anyway (serving locally)");
        }
        for (core, kind, name, seq) in std::mem::take(&mut self.confirms) {
            if let Some(sub) = self.subs.get_mut(&(kind, name.clone())) {
                // A NATS subscription that failed is no holder until `maintain` makes it.
                sub.1 = !nats || sub.0.is_some();
            }
            self.hand_to_core(core, Msg::Subscribed { kind, name, seq });
        }
    }

    /// One round trip through the server: everything this client sent before (its SUBs) has
    /// been processed by the server when it returns true. `Client::flush` is not enough: it
    /// only waits for the socket write. A request to a subject nobody serves is answered by
    /// the server itself ("no responders") once it has processed the request, hence every
    /// command before it on this connection.
    async fn round_trip(&self) -> bool {
        let Link::Nats(client) = &self.link else {
            return true;
        };
        let subject = format!("{}.sync.{}", self.prefix, encode_name(&self.me));
        let asked = client.request(subject, Bytes::new());
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "round trip failed");
                false
            }
            Err(_) => false,
        }
    }

    async fn incoming(&mut self, msg: Incoming) {
        let payload = match msg {
            Incoming::Msg(p) => p,
            Incoming::Lost(gen) => {
                if let Link::Redis(r) = &mut self.link {
                    if r.gen == gen && r.session.is_some() {
                        r.lost();
                    }
                }
                return;
            }
        };
        let Some(w) = decode(&payload) else { return };
        let redis = matches!(self.link, Link::Redis(_));
        if w.origin == self.me && redis {
            // Redis echoes this node's own messages back. Only a heartbeat with another
            // process's nonce means a duplicate id.
            let hb = matches!(w.kind, HEARTBEAT_KIND | HELLO | BYE);
            if !hb || payload.get(w.body..) == Some(&self.nonce.to_le_bytes()[..]) {
                return;
            }
        }
        self.cs().from_broker.fetch_add(1, Relaxed);
        if w.origin == self.me {
            // With no_echo this node never hears itself: another node uses the same id, and
            // each takes the other's messages for its own. Say so, at most every 10 s.
            let now = Instant::now();
            if self
                .duplicate_warned
                .is_none_or(|t| now.duration_since(t) > LIVE_FOR * 3)
            {
                self.duplicate_warned = Some(now);
                tracing::error!(node = %self.me, "another node uses this --node-id: give each node its own");
            }
            return;
        }
        let body = payload.slice(w.body..);
        let req = match w.kind {
            HEARTBEAT_KIND => {
                self.last_seen.insert(w.origin.to_string(), Instant::now());
                return;
            }
            HELLO => {
                self.last_seen.insert(w.origin.to_string(), Instant::now());
                self.answer_hello = true;
                return;
            }
            BYE => {
                self.forget_node(w.origin);
                return;
            }
            ANSWER => {
                for (token, n) in answers(&body) {
                    self.answer(token, w.origin, n);
                }
                return;
            }
            PROBE => {
                // Per entry: subscribed (and confirmed, so the request, published before
                // this probe, was delivered here): this node answers through the request
                // itself. Otherwise 0 now: a subscription still in flight concerns a
                // connection not welcomed yet, which no count promises to include (its
                // answer, if any, comes late).
                let origin = w.origin.to_string();
                let mut zeros = Vec::new();
                for (token, kind, name) in probes(&body) {
                    let holder = self.subs.get(&(kind, Box::from(name))).is_some_and(|s| s.1);
                    if !holder {
                        zeros.push(token);
                    }
                }
                for token in zeros {
                    self.owe(origin.clone(), token, 0).await;
                }
                return;
            }
            SEND => RemoteReq::Send {
                user: w.name.into(),
                frame: body,
            },
            PUBLISH => RemoteReq::Publish {
                room: w.name.into(),
                frame: body,
            },
            BROADCAST => RemoteReq::Broadcast { frame: body },
            PRESENCE => RemoteReq::Presence {
                user: w.name.into(),
            },
            DISCONNECT => RemoteReq::Disconnect {
                user: w.name.into(),
            },
            _ => return,
        };
        let token = (w.token != 0).then(|| {
            self.next_local += 1;
            self.remote
                .insert(self.next_local, (w.origin.to_string(), w.token));
            self.next_local
        });
        // The owner core of the user or room: one path per target keeps the order.
        let core = match &req {
            RemoteReq::Broadcast { .. } => 0,
            _ => self.shared.owners.of(w.name),
        };
        self.hand_to_core(core, Msg::Remote { req, token });
    }

    fn answer(&mut self, token: u64, node: &str, n: u64) {
        let Some(g) = self.pending.get_mut(&token) else {
            self.cs().late_answers.fetch_add(1, Relaxed);
            return;
        };
        if !g.waiting.answered(node) {
            self.cs().late_answers.fetch_add(1, Relaxed);
            return;
        }
        g.sum += n;
        if g.waiting.is_empty() {
            self.settle(token);
        }
    }

    /// Owes `origin` the answer `n` to its request `token`: sent with the others of this
    /// drain (`send_answers`), at once when the batch is full.
    async fn owe(&mut self, origin: String, token: u64, n: u64) {
        let b = self.answer_batches.entry(origin).or_default();
        b.put_u64_le(token);
        b.put_u64_le(n);
        if b.len() >= BATCH_BYTES {
            self.send_answers().await;
        }
    }

    /// Publishes the answers owed, one message per origin node.
    async fn send_answers(&mut self) {
        if self.answer_batches.is_empty() {
            return;
        }
        let owed: Vec<(String, BytesMut)> = self.answer_batches.drain().collect();
        for (origin, body) in owed {
            let p = encode(ANSWER, 0, &self.me, "", &body);
            let s = format!("{}.n.{}", self.prefix, encode_name(&origin));
            self.publish(s, p).await;
        }
    }

    /// Publishes this drain's probes as one message (NATS).
    async fn send_probes(&mut self) {
        if self.probe_batch.is_empty() {
            return;
        }
        let body = self.probe_batch.split().freeze();
        let p = encode(PROBE, 0, &self.me, "", &body);
        self.publish(format!("{}.q", self.prefix), p).await;
    }

    /// A gather is complete (or given up on): its sum goes to the waiting core.
    fn settle(&mut self, token: u64) {
        if let Some(g) = self.pending.remove(&token) {
            let msg = Msg::Count {
                waiter: g.waiter,
                n: g.sum,
            };
            self.hand_to_core(g.waiter.core(), msg);
        }
    }

    /// Publishes a heartbeat of `kind` (a goodbye instead once shutting down).
    async fn heartbeat(&mut self, kind: u8) {
        if self.said_bye {
            return;
        }
        let leaving = self.cs().leaving.load(Relaxed);
        let kind = if leaving { BYE } else { kind };
        let p = encode(kind, 0, &self.me, "", &self.nonce.to_le_bytes());
        if self.publish(format!("{}.hb", self.prefix), p).await && leaving {
            // Flushed, so the goodbye is out before the process exits (Redis: the PUBLISH
            // was answered).
            if let Link::Nats(client) = &self.link {
                let _ = tokio::time::timeout(Duration::from_millis(500), client.flush()).await;
            }
            self.said_bye = true;
            self.cs().bye_sent.store(true, Relaxed);
        } else if leaving && !self.connected {
            // Nobody to tell.
            self.said_bye = true;
            self.cs().bye_sent.store(true, Relaxed);
        }
    }

    /// A node said goodbye: counts stop waiting for it at once.
    fn forget_node(&mut self, node: &str) {
        self.last_seen.remove(node);
        let mut done = Vec::new();
        for (token, g) in self.pending.iter_mut() {
            g.waiting.forget(node);
            if g.waiting.is_empty() {
                done.push(*token);
            }
        }
        for token in done {
            self.settle(token);
        }
    }

    /// Connection state, live nodes, and counts that are due. True when the client has just
    /// (re)connected.
    fn tick(&mut self) -> bool {
        self.cs().settle();
        let connected = match &self.link {
            Link::Nats(client) => {
                matches!(
                    client.connection_state(),
                    async_nats::connection::State::Connected
                ) && !self.cut.load(Relaxed)
            }
            Link::Redis(r) => r.session.is_some(),
        };
        let was = self.connected;
        if connected != self.connected {
            if connected {
                if self.ever_connected {
                    self.cs().reconnects.fetch_add(1, Relaxed);
                }
                self.ever_connected = true;
                // Forget who was live: a node heard from from now on has its subscriptions
                // back in place (the client resends them on reconnecting, before anything it
                // publishes), so counts wait only for nodes that can be reached.
                self.last_seen.clear();
                tracing::info!("connected to the broker");
            } else {
                tracing::warn!("broker disconnected: serving local connections only");
            }
            self.connected = connected;
            self.cs().connected.store(connected, Relaxed);
        }
        let now = Instant::now();
        self.last_seen
            .retain(|_, t| now.duration_since(*t) < LIVE_FOR);
        let mut nodes: Vec<String> = self.last_seen.keys().cloned().collect();
        nodes.push(self.me.clone());
        nodes.sort();
        let live: HashSet<&String> = self.last_seen.keys().collect();
        let mut done = Vec::new();
        for (token, g) in self.pending.iter_mut() {
            // Nodes that stopped being live, or everyone when the broker is gone.
            g.waiting.retain_live(connected, &live);
            if g.waiting.is_empty() {
                done.push(*token);
            } else if now >= g.deadline {
                self.shared
                    .cluster
                    .missing_answers
                    .fetch_add(g.waiting.len() as u64, Relaxed);
                done.push(*token);
            }
        }
        for token in done {
            self.settle(token);
        }
        *self.cs().nodes.lock().unwrap() = nodes;
        connected && !was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bridge_queue_slows_clients_then_drops() {
        use clap::Parser;
        let config = crate::Config::parse_from(["wsgate", "--cluster", "nats://a:1"]);
        let pressure = Arc::new(Pressure::new(2));
        let (c, mut rx) = shared(&config, pressure.clone());
        let req = || ClusterOut::Request {
            req: RemoteReq::Broadcast {
                frame: Bytes::new(),
            },
            waiter: None,
        };
        for _ in 0..QUEUE_LIMIT / 2 {
            assert!(c.submit(1, req()).is_ok());
        }
        assert!(!pressure.is_on());
        assert!(c.submit(1, req()).is_ok());
        assert!(pressure.is_on(), "past half the bound: clients are slowed");
        for _ in QUEUE_LIMIT / 2 + 1..QUEUE_LIMIT {
            assert!(c.submit(0, req()).is_ok());
        }
        assert!(c.submit(0, req()).is_err(), "past the bound: dropped");
        assert_eq!(c.dropped.load(Relaxed), 1);
        // Answers and subscriptions are never dropped.
        let answer = ClusterOut::Answer { token: 1, n: 1 };
        assert!(c.submit(0, answer).is_ok());
        let mut taken = 0;
        while pressure.is_on() {
            let (_, out) = rx.try_recv().unwrap();
            assert!(matches!(out, ClusterOut::Request { .. }));
            c.taken();
            taken += 1;
        }
        assert_eq!(taken, QUEUE_LIMIT - QUEUE_LIMIT / 4);
    }

    #[test]
    fn names_are_single_tokens_and_injective() {
        let ids = ["a.b", "a", "b", "x:y@z", "a-b_c", "A", "ab", ".", "*", ">"];
        let subjects: HashSet<String> = ids
            .iter()
            .map(|i| subject("wsgate", Kind::User, i))
            .collect();
        assert_eq!(subjects.len(), ids.len());
        for s in &subjects {
            let token = s.strip_prefix("wsgate.u.").unwrap();
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{s}");
        }
        assert_eq!(encode_name("a.b"), "612e62");
        assert_ne!(subject("p", Kind::User, "x"), subject("p", Kind::Room, "x"));
    }

    #[test]
    fn url_credentials_are_decoded() {
        assert_eq!(percent_decode("p%40ss%2B1"), "p@ss+1");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }

    #[test]
    fn wire_round_trip_and_garbage() {
        let p = encode(SEND, 42, "node-1", "a.b", b"frame");
        let w = decode(&p).unwrap();
        assert_eq!(
            (w.kind, w.token, w.origin, w.name),
            (SEND, 42, "node-1", "a.b")
        );
        assert_eq!(&p[w.body..], b"frame");
        for cut in 0..p.len() - 5 {
            // Truncated headers are refused, never a panic.
            let _ = decode(&p[..cut]);
        }
        assert!(decode(&[]).is_none());
        assert!(decode(&[1, 0, 0]).is_none());
    }

    #[test]
    fn probe_and_answer_batches_round_trip_and_stop_at_garbage() {
        let mut b = BytesMut::new();
        put_probe(&mut b, 7, Kind::User, "a.b");
        put_probe(&mut b, u64::MAX, Kind::Room, "");
        put_probe(&mut b, 9, Kind::User, "ü:@");
        let got: Vec<_> = probes(&b).collect();
        assert_eq!(
            got,
            vec![
                (7, Kind::User, "a.b"),
                (u64::MAX, Kind::Room, ""),
                (9, Kind::User, "ü:@")
            ]
        );
        for cut in 0..b.len() {
            // A cut batch yields the whole entries before the cut, never a panic.
            let n = probes(&b[..cut]).count();
            assert!(n < 3, "cut {cut}");
        }
        // A length past the end stops the batch.
        let mut bad = BytesMut::new();
        bad.put_u64_le(1);
        bad.put_u8(0);
        bad.put_u16_le(u16::MAX);
        assert_eq!(probes(&bad).count(), 0);

        let mut a = BytesMut::new();
        for (t, n) in [(1u64, 0u64), (u64::MAX, 3), (5, u64::MAX)] {
            a.put_u64_le(t);
            a.put_u64_le(n);
        }
        let got: Vec<_> = answers(&a).collect();
        assert_eq!(got, vec![(1, 0), (u64::MAX, 3), (5, u64::MAX)]);
        assert_eq!(answers(&a[..40]).count(), 2);
    }
}
