//! wsgate-bench: the load generator every speed and memory claim comes from.
//!
//! Scenarios: `connect` (handshakes/s; against a peer with `--path`), `idle` (hold N
//! connections, gateway RSS per connection), `direct` (users send to random users: delivered/s
//! and end-to-end latency, same-core vs cross-core), `room` (one publisher, M members; paced
//! with `--rate`, or saturating with `--rate 0`), `echo` (closed-loop echo against any
//! WebSocket echo server, for peers). One process holds at most ~19,000
//! connections here (20,000 fds), so `--processes P` forks P copies of itself, each taking
//! every P-th connection, and merges their results. Progress goes to stderr once a second;
//! the final result is one JSON object on stdout. `soak` (see `soak.rs`) is a long mixed run
//! with faults that checks order, loss, memory and queue bounds and fails loudly.

mod client;
mod soak;

use std::cell::RefCell;
use std::io::{BufRead, BufReader, IsTerminal};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;

use client::{client_frame, WsConn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Connect,
    Idle,
    Direct,
    Room,
    Echo,
    Soak,
}

/// What the soak's flooders send.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum FloodTo {
    /// `send` to users nobody holds and `publish` to empty rooms: routed across cores.
    Cross,
    /// `leave` of rooms the flooder is not in: handled on its own core.
    Local,
}

/// Load generator for wsgate and WebSocket echo servers (loopback only).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "wsgate-bench", version)]
struct Args {
    /// connect | idle | direct | room | echo | soak
    #[arg(value_enum)]
    scenario: Scenario,
    /// Server address (loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// Path for `echo` (default /echo) and `connect`. `connect` without it opens
    /// /ws?user=... and waits for wsgate's welcome; with it, only for the 101 (any WebSocket
    /// server). The other scenarios always use /ws?user=....
    #[arg(long)]
    path: Option<String>,
    /// Connections in total (over all processes).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Distinct users for the gateway scenarios (connection i is user u{i % users}); 0 = one
    /// per connection.
    #[arg(long, default_value_t = 0)]
    users: usize,
    /// Source addresses 127.0.0.1..127.0.0.N (one address reaches ~28,000 connections).
    #[arg(long, default_value_t = 1)]
    source_addrs: u8,
    /// Processes (each is limited to 20,000 file descriptors here).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Threads per process, one monoio runtime each.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Payload size in bytes (echo payload, or padding in the JSON `data`).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second per sending connection; 0 = closed loop (`--window` in flight).
    /// `room`: publishes per second; 0 = as fast as the server acknowledges them, with
    /// `--window` acknowledged publishes in flight (saturation).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Closed loop: messages in flight per connection.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "2s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    warmup: Duration,
    /// Connection attempts in flight per thread.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Gateway PID, to read its RSS from /proc (idle, connect).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Room members for `room` (connections beyond the publisher).
    #[arg(long, default_value = "bench-room")]
    room: String,
    /// Set up the generator's io_uring rings with `IORING_SETUP_COOP_TASKRUN` (as the
    /// gateway does): a completion for a busy generator thread then waits for its next
    /// kernel entry instead of interrupting it from the server's CPU. Without it, every
    /// server's sends pay for inter-processor interrupts to the generator's CPU, in amounts
    /// that depend on the pair's timing (BENCHMARKS.md, Experiments).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    coop_taskrun: bool,
    /// soak: share of the connections that churn (closed and replaced continuously).
    #[arg(long, default_value_t = 0.1)]
    churn: f64,
    /// soak: longest life of a churning connection (each lives 0.5 s up to this).
    #[arg(long, default_value = "10s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    churn_lifetime: Duration,
    /// soak: share of churn closes done with a reset (SO_LINGER 0) instead of a close handshake.
    #[arg(long, default_value_t = 0.5)]
    rst_share: f64,
    /// soak: sending connections (0 = one per 100); each sends --rate messages/s (default 5).
    #[arg(long, default_value_t = 0)]
    senders: usize,
    /// soak: connections per room (every well-behaved connection joins one room).
    #[arg(long, default_value_t = 50)]
    room_size: usize,
    /// soak: clients that stop reading (half keep writing: 1013; half go silent: 4000).
    #[arg(long, default_value_t = 4)]
    stalled: usize,
    /// soak: how long a stalled client lives before it is replaced.
    #[arg(long, default_value = "25s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    stall_lifetime: Duration,
    /// soak: clients that write as fast as their socket takes it.
    #[arg(long, default_value_t = 2)]
    flooders: usize,
    /// soak: what the flooders send: cross (to other cores' mailboxes) or local (own core).
    #[arg(long, value_enum, default_value = "cross")]
    flood_to: FloodTo,
    /// soak: a flooder's pause after each 64 KiB write (it yields the thread to the others).
    #[arg(long, default_value = "1ms", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    flood_pause: Duration,
    /// soak: each process opens one connection with bad input this often.
    #[arg(long, default_value = "500ms", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    malformed_every: Duration,
    /// soak: the gateway's --max-message-size (the oversized frame is one byte more).
    #[arg(long, default_value_t = 65536)]
    max_message_size: usize,
    /// soak: after the senders stop, time for the last messages to arrive.
    #[arg(long, default_value = "5s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    drain: Duration,
    /// soak: scrape the gateway's /metrics this often.
    #[arg(long, default_value = "2s", value_parser = wsgate::config::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    metrics_every: Duration,
    /// soak: fail when the gateway's RSS grows more than this (percent, last third of the
    /// measured period against the first).
    #[arg(long, default_value_t = 5.0)]
    rss_drift_max: f64,
    /// soak: fail when a queue gauge exceeds its limit by more than this factor.
    #[arg(long, default_value_t = 2.0)]
    queue_slack: f64,
    /// soak: fail (not only warn) when the queue gauges or their limits are missing.
    /// (also from the environment: SOAK_REQUIRE_METRICS=1).
    #[arg(long, env = "SOAK_REQUIRE_METRICS", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    require_metrics: bool,
    /// Internal: this process is child K of --processes.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Counters one process's threads update (each its own field family, relaxed).
#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicU64,
    received: AtomicU64,
    measured_received: AtomicU64,
    measured_bytes: AtomicU64,
    threads_ready: AtomicUsize,
    /// Longest time a thread took to open its connections.
    connect_ns: AtomicU64,
    /// Connections the server closed with a close frame during the load (`room`, `direct`).
    server_closes: AtomicU64,
    /// Of those, closed with 1013 (a slow consumer, or overloaded).
    closes_1013: AtomicU64,
}

/// What a thread measured.
struct ThreadHists {
    latency: Histogram<u64>,
    same_core: Histogram<u64>,
    cross_core: Histogram<u64>,
    connect: Histogram<u64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// One process's result (children print it as JSON for the parent to merge).
#[derive(Serialize, Deserialize, Default)]
struct ProcResult {
    connected: usize,
    failed: usize,
    sent: u64,
    received: u64,
    measured_received: u64,
    measured_bytes: u64,
    measured_secs: f64,
    connect_secs: f64,
    #[serde(default)]
    server_closes: u64,
    #[serde(default)]
    closes_1013: u64,
    latency: Vec<(u64, u64)>,
    same_core: Vec<(u64, u64)>,
    cross_core: Vec<(u64, u64)>,
    connect: Vec<(u64, u64)>,
}

fn dump(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn load(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for (v, c) in pairs {
        let _ = h.record_n(*v, *c);
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer. CLOCK_MONOTONIC is shared by all processes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.target.ip().is_loopback() {
        bail!(
            "wsgate-bench only targets loopback addresses (got {})",
            args.target
        );
    }
    if args.scenario == Scenario::Soak {
        return match args.child {
            Some(_) => soak::child(&args),
            None => match soak::parent(&args)? {
                true => Ok(()),
                false => std::process::exit(1),
            },
        };
    }
    if args.processes > 1 && args.child.is_none() {
        return parent(&args);
    }
    let controller = args.child.is_none();
    let (result, sample) = run_process(&args, controller)?;
    if args.child.is_some() {
        println!("{}", serde_json::to_string(&json!({ "result": result }))?);
        return Ok(());
    }
    report(&args, vec![result], sample)
}

/// Forks the children, relays progress, samples the gateway once everyone is connected, and
/// merges the results.
fn parent(args: &Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut children = Vec::new();
    for k in 0..args.processes {
        let child = Command::new(&exe)
            .args(&raw)
            .args(["--child", &k.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn a bench child")?;
        children.push(child);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for (k, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((k, line));
            }
        });
    }
    drop(tx);
    let rss_before = args.gateway_pid.and_then(rss_kib);
    let mut connected = 0;
    let mut results = Vec::new();
    let mut sample = None;
    for (_k, line) in rx {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["event"] == "connected" {
            connected += 1;
            if connected == args.processes {
                sample = Some(sample_gateway(args, rss_before));
            }
        } else if let Some(r) = v.get("result") {
            results.push(serde_json::from_value(r.clone())?);
        }
    }
    for mut c in children {
        c.wait()?;
    }
    report(args, results, sample)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Kernel TCP memory in KiB (from /proc/net/sockstat, pages of 4 KiB).
fn tcp_mem_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse::<u64>().ok().map(|p| p * 4);
        }
    }
    None
}

/// Gateway memory once every connection is open (after a short settle).
fn sample_gateway(args: &Args, rss_before: Option<u64>) -> serde_json::Value {
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = args.gateway_pid.and_then(rss_kib);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if args.connections > 0 => {
            Some((a.saturating_sub(b)) as f64 * 1024.0 / args.connections as f64)
        }
        _ => None,
    };
    json!({
        "gateway_rss_before_kib": rss_before,
        "gateway_rss_after_kib": rss_after,
        "gateway_rss_per_conn_bytes": per_conn.map(|b| b.round()),
        "kernel_tcp_mem_kib": tcp_mem_kib(),
    })
}

fn run_process(args: &Args, controller: bool) -> Result<(ProcResult, Option<serde_json::Value>)> {
    let (k, p) = (args.child.unwrap_or(0), args.processes.max(1));
    let mine: Vec<usize> = (0..args.connections).filter(|i| i % p == k).collect();
    let threads = args.threads.max(1);
    let counters = Arc::new(Counters::default());
    let rss_before = if controller {
        args.gateway_pid.and_then(rss_kib)
    } else {
        None
    };
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads {
        let idx: Vec<usize> = mine
            .iter()
            .copied()
            .enumerate()
            .filter(|(j, _)| j % threads == t)
            .map(|(_, i)| i)
            .collect();
        let args = args.clone();
        let counters = counters.clone();
        let total_threads = threads;
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || -> Result<ThreadHists> {
                    let mut uring = io_uring::IoUring::builder();
                    if args.coop_taskrun {
                        uring.setup_coop_taskrun();
                    }
                    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .with_entries(4096)
                        .uring_builder(uring)
                        .enable_timer()
                        .build()?;
                    Ok(rt.block_on(thread_main(args, idx, counters, total_threads)))
                })?,
        );
    }
    // Progress, once a second, until every thread is done.
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut last = (0u64, Instant::now());
    let mut announced = false;
    let mut sample = None;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let connected = counters.connected.load(Relaxed);
        let failed = counters.failed.load(Relaxed);
        if !announced && connected + failed >= mine.len() {
            announced = true;
            if args.child.is_some() {
                println!("{}", json!({"event": "connected", "n": connected}));
            } else if controller && matches!(args.scenario, Scenario::Idle | Scenario::Connect) {
                sample = Some(sample_gateway(args, rss_before));
            }
        }
        if last.1.elapsed() >= Duration::from_secs(1) {
            let recv = counters.received.load(Relaxed);
            let rate = (recv - last.0) as f64 / last.1.elapsed().as_secs_f64();
            let line = format!(
                "[{}{:?}] t={:.0}s connected={} failed={} sent={} received={} recv/s={:.0}",
                args.child.map(|c| format!("p{c} ")).unwrap_or_default(),
                args.scenario,
                started.elapsed().as_secs_f64(),
                connected,
                failed,
                counters.sent.load(Relaxed),
                recv,
                rate
            );
            match &bar {
                Some(b) => b.set_message(line),
                None => eprintln!("{line}"),
            }
            last = (recv, Instant::now());
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut latency = hist();
    let mut same = hist();
    let mut cross = hist();
    let mut connect = hist();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        latency.add(&r.latency)?;
        same.add(&r.same_core)?;
        cross.add(&r.cross_core)?;
        connect.add(&r.connect)?;
    }
    let result = ProcResult {
        connected: counters.connected.load(Relaxed),
        failed: counters.failed.load(Relaxed),
        sent: counters.sent.load(Relaxed),
        received: counters.received.load(Relaxed),
        measured_received: counters.measured_received.load(Relaxed),
        measured_bytes: counters.measured_bytes.load(Relaxed),
        measured_secs: args.duration.as_secs_f64(),
        connect_secs: counters.connect_ns.load(Relaxed) as f64 / 1e9,
        server_closes: counters.server_closes.load(Relaxed),
        closes_1013: counters.closes_1013.load(Relaxed),
        latency: dump(&latency),
        same_core: dump(&same),
        cross_core: dump(&cross),
        connect: dump(&connect),
    };
    Ok((result, sample))
}

fn user_of(args: &Args, i: usize) -> String {
    let users = if args.users == 0 {
        args.connections
    } else {
        args.users
    };
    format!("u{}", i % users.max(1))
}

fn source_of(args: &Args, i: usize) -> Option<Ipv4Addr> {
    (args.source_addrs > 1)
        .then(|| Ipv4Addr::new(127, 0, 0, 1 + (i % args.source_addrs as usize) as u8))
}

fn path_of(args: &Args, i: usize) -> String {
    match (args.scenario, &args.path) {
        (Scenario::Echo, p) => p.clone().unwrap_or_else(|| "/echo".into()),
        (Scenario::Connect, Some(p)) => p.clone(),
        _ => format!("/ws?user={}", user_of(args, i)),
    }
}

/// Whether the server is wsgate's /ws, which sends a welcome first.
fn expects_welcome(args: &Args) -> bool {
    match args.scenario {
        Scenario::Echo => false,
        Scenario::Connect => args.path.is_none(),
        _ => true,
    }
}

/// Opens this thread's connections, `concurrency` at a time; records handshake latency.
async fn open_all(
    args: &Args,
    idx: &[usize],
    counters: &Counters,
    connect_hist: &RefCell<Histogram<u64>>,
) -> Vec<(usize, WsConn, u8)> {
    let out = Rc::new(RefCell::new(Vec::with_capacity(idx.len())));
    for chunk in idx.chunks(args.concurrency.max(1)) {
        let mut joins = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let (target, src, path) = (args.target, source_of(args, i), path_of(args, i));
            let gateway = expects_welcome(args);
            let out = out.clone();
            joins.push(monoio::spawn(async move {
                let t0 = Instant::now();
                let mut conn = client::connect(target, src, &path).await?;
                let mut core = 0u8;
                if gateway {
                    // The welcome: its conn id's top byte is the core (see wsgate::key).
                    let w = conn.next_message().await?;
                    let v: serde_json::Value = serde_json::from_slice(&w)?;
                    let id = v["conn"].as_str().unwrap_or("");
                    core = u64::from_str_radix(id, 16).map_or(0, |k| (k >> 56) as u8);
                }
                out.borrow_mut().push((i, conn, core));
                anyhow::Ok(t0.elapsed())
            }));
        }
        for j in joins {
            match j.await {
                Ok(d) => {
                    counters.connected.fetch_add(1, Relaxed);
                    let _ = connect_hist.borrow_mut().record(d.as_nanos() as u64);
                }
                Err(e) => {
                    if counters.failed.fetch_add(1, Relaxed) < 3 {
                        eprintln!("connect failed: {e:#}");
                    }
                }
            }
        }
    }
    Rc::try_unwrap(out)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

/// Measurement window shared by a thread's tasks.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn measuring(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

async fn thread_main(
    args: Args,
    idx: Vec<usize>,
    counters: Arc<Counters>,
    threads: usize,
) -> ThreadHists {
    let hists = Rc::new(RefCell::new(ThreadHists {
        latency: hist(),
        same_core: hist(),
        cross_core: hist(),
        connect: hist(),
    }));
    let connect_hist = RefCell::new(hist());
    let t0 = Instant::now();
    let conns = open_all(&args, &idx, &counters, &connect_hist).await;
    hists.borrow_mut().connect = connect_hist.into_inner();
    // Every thread of the process starts the load together.
    counters.threads_ready.fetch_add(1, Relaxed);
    while counters.threads_ready.load(Relaxed) < threads {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    counters
        .connect_ns
        .fetch_max(t0.elapsed().as_nanos() as u64, Relaxed);
    let begin = Instant::now();
    let window = Window {
        start: begin + args.warmup,
        end: begin + args.warmup + args.duration,
    };
    let counters = &counters;
    let mut tasks = Vec::new();
    for (i, conn, core) in conns {
        let args = args.clone();
        let hists = hists.clone();
        let counters = counters.clone();
        match args.scenario {
            Scenario::Connect | Scenario::Soak => conn.abort(),
            Scenario::Idle => tasks.push(monoio::spawn(hold(conn, window.end))),
            Scenario::Echo => tasks.push(monoio::spawn(echo(args, conn, window, hists, counters))),
            Scenario::Direct => tasks.push(monoio::spawn(direct(
                args, i, conn, core, window, hists, counters,
            ))),
            Scenario::Room => tasks.push(monoio::spawn(room(
                args,
                i == 0,
                conn,
                core,
                window,
                hists,
                counters,
            ))),
        }
    }
    for t in tasks {
        t.await;
    }
    match Rc::try_unwrap(hists) {
        Ok(h) => h.into_inner(),
        Err(_) => unreachable!("every task has finished"),
    }
}

/// Holds an idle connection (answering pings) until `end`, then resets it.
async fn hold(mut conn: WsConn, end: Instant) {
    let until = monoio::time::Instant::from_std(end);
    let _ = monoio::time::timeout_at(until, async {
        loop {
            if conn.read_frames(|_| {}).await.is_err() {
                break;
            }
        }
    })
    .await;
    conn.abort();
}

async fn echo(
    args: Args,
    mut conn: WsConn,
    window: Window,
    hists: Rc<RefCell<ThreadHists>>,
    counters: Arc<Counters>,
) {
    let frame = client_frame(0x1, &vec![b'x'; args.size]);
    let window_n = args.window.max(1);
    let mut sent_at = std::collections::VecDeque::with_capacity(window_n);
    for _ in 0..window_n {
        if conn.send(&frame).await.is_err() {
            return;
        }
        sent_at.push_back(Instant::now());
    }
    counters.sent.fetch_add(window_n as u64, Relaxed);
    while Instant::now() < window.end {
        let mut got = 0;
        let ok = conn
            .read_frames(|_| {
                got += 1;
            })
            .await;
        if ok.is_err() {
            break;
        }
        let now = Instant::now();
        for _ in 0..got {
            let Some(t) = sent_at.pop_front() else { break };
            if window.measuring(now) {
                let _ = hists
                    .borrow_mut()
                    .latency
                    .record(now.duration_since(t).as_nanos() as u64);
                counters.measured_received.fetch_add(1, Relaxed);
                counters.measured_bytes.fetch_add(args.size as u64, Relaxed);
            }
        }
        counters.received.fetch_add(got, Relaxed);
        for _ in 0..got {
            if conn.send(&frame).await.is_err() {
                return;
            }
            sent_at.push_back(Instant::now());
        }
        counters.sent.fetch_add(got, Relaxed);
    }
    conn.abort();
}

/// Parses `"key":123` out of a message without a full JSON parse.
fn field_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let pos = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[pos..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&text[pos..pos + digits])
        .ok()?
        .parse()
        .ok()
}

/// Records a delivery's end-to-end latency (timestamp and sender core in the payload).
fn record_delivery(
    payload: &[u8],
    my_core: u8,
    window: Window,
    hists: &RefCell<ThreadHists>,
    counters: &Counters,
) {
    counters.received.fetch_add(1, Relaxed);
    let now = Instant::now();
    if !window.measuring(now) {
        return;
    }
    let (Some(t), Some(c)) = (field_u64(payload, b"\"t\":"), field_u64(payload, b"\"c\":")) else {
        return;
    };
    let lat = now_ns().saturating_sub(t);
    let mut h = hists.borrow_mut();
    let _ = h.latency.record(lat);
    let _ = if c == my_core as u64 {
        h.same_core.record(lat)
    } else {
        h.cross_core.record(lat)
    };
    counters.measured_received.fetch_add(1, Relaxed);
    counters
        .measured_bytes
        .fetch_add(payload.len() as u64, Relaxed);
}

fn padding(size: usize) -> String {
    "x".repeat(size)
}

async fn direct(
    args: Args,
    i: usize,
    mut conn: WsConn,
    core: u8,
    window: Window,
    hists: Rc<RefCell<ThreadHists>>,
    counters: Arc<Counters>,
) {
    let users = if args.users == 0 {
        args.connections
    } else {
        args.users
    };
    let pad = padding(args.size);
    let mut rng = (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
    let mut next_request = move |id: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let to = (rng % users as u64) as usize;
        let text = format!(
            r#"{{"type":"send","to":"u{to}","id":{id},"data":{{"t":{},"c":{core},"p":"{pad}"}}}}"#,
            now_ns()
        );
        client_frame(0x1, text.as_bytes())
    };
    let stop = monoio::time::Instant::from_std(window.end);
    if args.rate > 0.0 {
        // Open loop: a sender task at a fixed rate; this task reads.
        let send_task = spawn_paced(
            conn.sender(),
            args.rate,
            Duration::ZERO,
            window.end,
            counters.clone(),
            next_request,
        );
        receive_deliveries(&mut conn, core, window, &hists, &counters).await;
        send_task.await;
    } else {
        // Closed loop on acks: `window` sends in flight.
        let mut id = 0;
        for _ in 0..args.window.max(1) {
            id += 1;
            if conn.send(&next_request(id)).await.is_err() {
                return;
            }
            counters.sent.fetch_add(1, Relaxed);
        }
        let _ = monoio::time::timeout_at(stop, async {
            loop {
                let mut acks = 0;
                let r = conn
                    .read_frames(|f| {
                        if f.payload.starts_with(br#"{"type":"ack""#) {
                            acks += 1;
                        } else if f.payload.starts_with(br#"{"type":"message""#) {
                            record_delivery(f.payload, core, window, &hists, &counters);
                        }
                    })
                    .await;
                if r.is_err() {
                    break;
                }
                for _ in 0..acks {
                    id += 1;
                    if conn.send(&next_request(id)).await.is_err() {
                        return;
                    }
                }
                counters.sent.fetch_add(acks, Relaxed);
            }
        })
        .await;
    }
    conn.abort();
}

#[allow(clippy::too_many_arguments)]
async fn room(
    args: Args,
    publisher: bool,
    mut conn: WsConn,
    core: u8,
    window: Window,
    hists: Rc<RefCell<ThreadHists>>,
    counters: Arc<Counters>,
) {
    let join = format!(r#"{{"type":"join","room":"{}","id":0}}"#, args.room);
    if conn
        .send(&client_frame(0x1, join.as_bytes()))
        .await
        .is_err()
    {
        return;
    }
    if publisher && args.rate <= 0.0 {
        publish_closed_loop(&args, &mut conn, core, window, &hists, &counters).await;
        conn.abort();
        return;
    }
    if publisher {
        let pad = padding(args.size);
        let room = args.room.clone();
        let rate = args.rate;
        // Let the members' joins land first.
        let delay = Duration::from_millis(500);
        let make = move |_| {
            let text = format!(
                r#"{{"type":"publish","room":"{room}","data":{{"t":{},"c":{core},"p":"{pad}"}}}}"#,
                now_ns()
            );
            client_frame(0x1, text.as_bytes())
        };
        spawn_paced(
            conn.sender(),
            rate,
            delay,
            window.end,
            counters.clone(),
            make,
        );
    }
    receive_deliveries(&mut conn, core, window, &hists, &counters).await;
    conn.abort();
}

/// The saturating publisher (`room --rate 0`): after the members' joins had time to land,
/// keeps `--window` publishes with an `id` in flight and sends the next one for every `ack`
/// (or `error`) that comes back, as fast as the server acknowledges them. It is a member too,
/// so it records its own deliveries like every other member.
async fn publish_closed_loop(
    args: &Args,
    conn: &mut WsConn,
    core: u8,
    window: Window,
    hists: &RefCell<ThreadHists>,
    counters: &Counters,
) {
    let pad = padding(args.size);
    let room = &args.room;
    let request = |id: u64| {
        let text = format!(
            r#"{{"type":"publish","room":"{room}","id":{id},"data":{{"t":{},"c":{core},"p":"{pad}"}}}}"#,
            now_ns()
        );
        client_frame(0x1, text.as_bytes())
    };
    monoio::time::sleep(Duration::from_millis(500)).await;
    let stop = monoio::time::Instant::from_std(window.end);
    let _ = monoio::time::timeout_at(stop, async {
        let mut id = 0;
        for _ in 0..args.window.max(1) {
            id += 1;
            if conn.send(&request(id)).await.is_err() {
                return;
            }
            counters.sent.fetch_add(1, Relaxed);
        }
        loop {
            let mut answered = 0;
            let r = conn
                .read_frames(|f| {
                    let p = f.payload;
                    if p.starts_with(br#"{"type":"message""#) {
                        record_delivery(p, core, window, hists, counters);
                    } else if (p.starts_with(br#"{"type":"ack""#)
                        && p.windows(11).any(|w| w == br#""delivered""#))
                        || p.starts_with(br#"{"type":"error""#)
                    {
                        // The join's ack carries no `delivered`: not a publish's answer.
                        answered += 1;
                    }
                })
                .await;
            if r.is_err() {
                break;
            }
            for _ in 0..answered {
                id += 1;
                if conn.send(&request(id)).await.is_err() {
                    return;
                }
            }
            counters.sent.fetch_add(answered, Relaxed);
        }
    })
    .await;
    count_close(conn, counters);
}

/// Counts a close frame the server sent (1013: closed as a slow consumer).
fn count_close(conn: &WsConn, counters: &Counters) {
    if let Some(code) = conn.close_code() {
        counters.server_closes.fetch_add(1, Relaxed);
        if code == 1013 {
            counters.closes_1013.fetch_add(1, Relaxed);
        }
    }
}

/// Reads until the window ends, recording every delivery's latency.
async fn receive_deliveries(
    conn: &mut WsConn,
    core: u8,
    window: Window,
    hists: &RefCell<ThreadHists>,
    counters: &Counters,
) {
    let stop = monoio::time::Instant::from_std(window.end);
    let _ = monoio::time::timeout_at(stop, async {
        while conn
            .read_frames(|f| {
                if f.payload.starts_with(br#"{"type":"message""#) {
                    record_delivery(f.payload, core, window, hists, counters);
                }
            })
            .await
            .is_ok()
        {}
    })
    .await;
    count_close(conn, counters);
}

/// Sends `make(n)` for n = 1, 2, ... at `rate` per second until `end` (after `delay`).
fn spawn_paced(
    sender: client::Sender,
    rate: f64,
    delay: Duration,
    end: Instant,
    counters: Arc<Counters>,
    mut make: impl FnMut(u64) -> Vec<u8> + 'static,
) -> monoio::task::JoinHandle<()> {
    let period = Duration::from_secs_f64(1.0 / rate);
    monoio::spawn(async move {
        monoio::time::sleep(delay).await;
        let mut next = Instant::now();
        let mut n = 0;
        while Instant::now() < end {
            n += 1;
            if sender.send(&make(n)).await.is_err() {
                break;
            }
            counters.sent.fetch_add(1, Relaxed);
            next += period;
            monoio::time::sleep_until(monoio::time::Instant::from_std(next)).await;
        }
    })
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let us = |q: f64| (h.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0;
    json!({
        "count": h.len(),
        "p50_us": us(0.5),
        "p99_us": us(0.99),
        "p999_us": us(0.999),
        "max_us": (h.max() as f64 / 1000.0).round(),
    })
}

fn report(args: &Args, results: Vec<ProcResult>, sample: Option<serde_json::Value>) -> Result<()> {
    let mut latency = hist();
    let mut same = hist();
    let mut cross = hist();
    let mut connect = hist();
    let mut total = ProcResult::default();
    for r in &results {
        load(&mut latency, &r.latency);
        load(&mut same, &r.same_core);
        load(&mut cross, &r.cross_core);
        load(&mut connect, &r.connect);
        total.connected += r.connected;
        total.failed += r.failed;
        total.sent += r.sent;
        total.received += r.received;
        total.measured_received += r.measured_received;
        total.measured_bytes += r.measured_bytes;
        total.connect_secs = total.connect_secs.max(r.connect_secs);
        total.server_closes += r.server_closes;
        total.closes_1013 += r.closes_1013;
    }
    let secs = args.duration.as_secs_f64();
    let out = json!({
        "scenario": args.scenario,
        "target": args.target.to_string(),
        "connections": args.connections,
        "processes": args.processes,
        "threads": args.threads,
        "size": args.size,
        "connected": total.connected,
        "failed": total.failed,
        "connect_secs": (total.connect_secs * 1000.0).round() / 1000.0,
        "connects_per_sec": if total.connect_secs > 0.0 { (total.connected as f64 / total.connect_secs).round() } else { 0.0 },
        "sent": total.sent,
        "received": total.received,
        "server_closes": total.server_closes,
        "closes_1013": total.closes_1013,
        "msgs_per_sec": (total.measured_received as f64 / secs).round(),
        "mbytes_per_sec": ((total.measured_bytes as f64 / secs / 1e6) * 100.0).round() / 100.0,
        "latency": percentiles(&latency),
        "latency_same_core": percentiles(&same),
        "latency_cross_core": percentiles(&cross),
        "handshake": percentiles(&connect),
        "gateway": sample,
    });
    println!("{}", serde_json::to_string(&out)?);
    if total.connected == 0 {
        bail!("no connection could be opened");
    }
    Ok(())
}
