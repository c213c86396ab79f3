//! Test helpers: start the real `wsgate` binary on port 0 and talk to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
#[allow(unused_imports)]
pub use wsgate::client::{Client, ClientError};

/// A gateway process; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Gateway {
    /// Starts `wsgate --listen 127.0.0.1:0 --workers 2 ARGS...` (ARGS may set `--workers`).
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_with(args, |_| {})
    }

    /// [`Gateway::start`], with a chance to change the command (environment, limits).
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        configure(&mut cmd);
        cmd.args(["--listen", "127.0.0.1:0"]);
        if !args.contains(&"--workers") {
            cmd.args(["--workers", "2"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start wsgate");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .expect("wsgate printed nothing")
            .expect("read stdout");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Gateway { child, addr }
    }

    pub fn connect(&self, user: &str) -> Client {
        Client::connect(self.addr, user).unwrap_or_else(|e| panic!("connect {user}: {e}"))
    }

    /// `GET /api/stats` as JSON.
    pub fn stats(&self) -> Value {
        let (status, body) = http(self.addr, "GET", "/api/stats", None, &[]);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `/api/stats` shows `n` connections; panics with the last stats otherwise.
    pub fn wait_connections(&self, n: i64, within: Duration) {
        self.wait_stats(&format!("{n} connections"), within, |s| {
            s["connections"] == n
        });
    }

    /// Waits until `/api/presence/{user}` reports `n` connections: a departure reaches the
    /// user's owner core a moment after the connection count drops.
    pub fn wait_presence(&self, user: &str, n: u64, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let (status, body) = http(
                self.addr,
                "GET",
                &format!("/api/presence/{user}"),
                None,
                &[],
            );
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if status == 200 && v["connections"] == n {
                return;
            }
            if Instant::now() > end {
                panic!("expected {n} connections of {user}, presence: {status} {body}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/api/stats` satisfies `ok`. The counts are summed from every core, and a
    /// connection leaves its user's directory (kept on the user's owner core) a moment after
    /// it leaves the connection count: tests wait for them to settle, bounded by `within`.
    pub fn wait_stats(&self, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) {
        let end = Instant::now() + within;
        loop {
            let s = self.stats();
            if ok(&s) {
                return;
            }
            if Instant::now() > end {
                panic!("expected {what}, stats: {s}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The sum over cores of a metric's samples whose labels contain `labels` (e.g.
    /// `code="1013"`; empty: every sample).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (status, m) = http(self.addr, "GET", "/metrics", None, &[]);
        assert_eq!(status, 200, "{m}");
        metric_in(&m, name, labels)
    }

    /// The highest value of a metric's samples (e.g. a per-core peak).
    pub fn metric_max(&self, name: &str) -> f64 {
        let (_, m) = http(self.addr, "GET", "/metrics", None, &[]);
        samples(&m, name, "").fold(0.0, f64::max)
    }

    /// Open file descriptors of the gateway process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until `ok()` holds, polling; panics with `what` after `within`.
    pub fn wait_for(&self, what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
        wait_for(what, within, &mut ok)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let out = String::from_utf8_lossy(&raw).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A masked client frame, for sending what a well-behaved client library refuses to.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    wsgate::codec::client_frame(first_byte, payload, [0x11, 0x22, 0x33, 0x44])
}

/// Asserts that the client's next close frame carries `code`.
pub fn expect_close(c: &mut Client, code: u16, within: Duration) {
    match c.recv_close(within) {
        Ok(Some(f)) => assert_eq!(u16::from(f.code), code, "close frame {f:?}"),
        other => panic!("expected close {code}, got {other:?}"),
    }
}

/// Sends with an id and returns the ack's `delivered`.
pub fn send_acked(c: &mut Client, to: &str, data: Value, id: u64) -> u64 {
    c.send_acked(to, data, id.into(), T)
        .unwrap_or_else(|e| panic!("send to {to} (id {id}): {e}"))
}

pub const T: Duration = Duration::from_secs(10);

/// Reads raw bytes from the socket until the server ends the stream, and returns the server's
/// frames as (opcode, payload). Writes nothing: a peer that answers no ping.
pub fn read_raw_frames(c: &mut Client, within: Duration) -> Vec<(u8, Vec<u8>)> {
    use std::io::Read;
    let s = c.ws().get_mut();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut frames = Vec::new();
    let mut p = 0;
    while p + 2 <= buf.len() {
        let op = buf[p] & 0x0f;
        let mut len = (buf[p + 1] & 0x7f) as usize;
        p += 2;
        if len == 126 {
            len = u16::from_be_bytes([buf[p], buf[p + 1]]) as usize;
            p += 2;
        } else if len == 127 {
            len = u64::from_be_bytes(buf[p..p + 8].try_into().unwrap()) as usize;
            p += 8;
        }
        if p + len > buf.len() {
            break;
        }
        frames.push((op, buf[p..p + len].to_vec()));
        p += len;
    }
    frames
}

/// The close code of the last close frame among raw frames.
pub fn raw_close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .rev()
        .find(|(op, _)| *op == 8)
        .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
}

/// Polls `ok` every 20 ms until it holds; panics with `what` after `within`.
pub fn wait_for(what: &str, within: Duration, ok: &mut dyn FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        if Instant::now() > end {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn samples<'a>(m: &'a str, name: &'a str, labels: &'a str) -> impl Iterator<Item = f64> + 'a {
    m.lines()
        .filter(move |l| !l.starts_with('#') && l.starts_with(name))
        .filter(move |l| {
            let rest = &l[name.len()..];
            (rest.starts_with('{') || rest.starts_with(' ')) && rest.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// The sum of a metric's samples in a `/metrics` text whose labels contain `labels`.
pub fn metric_in(m: &str, name: &str, labels: &str) -> f64 {
    samples(m, name, labels).sum()
}

/// The venv with the Python clients (`websockets`, `prometheus-client`), created by the
/// project's script on first use; returns its path.
pub fn venv() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let setup = Command::new("bash")
        .arg(format!("{root}/scripts/setup-python.sh"))
        .output()
        .expect("run scripts/setup-python.sh");
    assert!(
        setup.status.success(),
        "setting up the Python clients failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    String::from_utf8(setup.stdout).unwrap().trim().to_string()
}

/// xorshift64*: small, seeded, reproducible (the randomized tests and the simulation).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}
