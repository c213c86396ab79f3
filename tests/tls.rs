//! TLS: `--tls-cert`/`--tls-key` serve `wss://` and HTTPS on the one listener, and SIGHUP
//! reloads the certificate without touching open connections. Certificates are generated per
//! run (rcgen) into a temporary directory; clients are rustls (Rust) and Python's `ssl`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use common::{venv, wait_for, Gateway, T};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A temporary directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsgate-tls-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, with a fresh key.
struct Cert {
    pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    not_after: i64,
}

fn make_cert(not_after: (i32, u8, u8)) -> Cert {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let expiry = params.not_after.unix_timestamp();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Cert {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
        not_after: expiry,
    }
}

/// Writes the certificate and key the way a deployment tool would: each file replaced by a
/// rename, so a reload never reads a half-written file.
fn install(dir: &TempDir, cert: &Cert) {
    for (name, text) in [("cert.pem", &cert.pem), ("key.pem", &cert.key_pem)] {
        let tmp = dir.path(&format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.path(name)).unwrap();
    }
}

fn tls_args(dir: &TempDir) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.path("cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.path("key.pem").display().to_string(),
    ]
}

fn start(dir: &TempDir, extra: &[&str]) -> Gateway {
    let mut args = tls_args(dir);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start(&args)
}

/// A client configuration trusting exactly `certs`.
fn trusting(certs: &[&Cert]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TCP connection with its TLS handshake done.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(T))?;
    tcp.set_write_timeout(Some(T))?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The certificate a new handshake presents (the client trusts every one in `config`).
fn presented(addr: SocketAddr, config: &Arc<ClientConfig>) -> Option<CertificateDer<'static>> {
    let s = tls_connect(addr, config).ok()?;
    s.conn
        .peer_certificates()?
        .first()
        .map(|c| c.clone().into_owned())
}

/// One HTTPS request with `Connection: close`; status and body. The answer must end with the
/// TLS close_notify (a read to the end fails on a truncated stream).
fn https(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = tls_connect(addr, config).expect("TLS handshake");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    match body {
        Some(b) => req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len())),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("the answer, ended by close_notify");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A metric's value over HTTPS (summed over its samples with `labels`).
fn metric(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str, labels: &str) -> f64 {
    let (status, m) = https(addr, config, "GET", "/metrics", None);
    assert_eq!(status, 200, "{m}");
    common::metric_in(&m, name, labels)
}

/// A WebSocket over TLS.
struct Wss {
    ws: WebSocket<Tls>,
}

impl Wss {
    fn open(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> Result<Wss, String> {
        let s = tls_connect(addr, config).map_err(|e| e.to_string())?;
        let url = format!("wss://localhost:{}{path}", addr.port());
        let (ws, _) = tungstenite::client::client(url.as_str(), s).map_err(|e| e.to_string())?;
        Ok(Wss { ws })
    }

    /// Connects as `user` and checks the welcome.
    fn connect(addr: SocketAddr, config: &Arc<ClientConfig>, user: &str) -> Wss {
        let mut w = Self::open(addr, config, &format!("/ws?user={user}")).unwrap();
        let welcome = w.recv(T);
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["user"], user);
        w
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    fn next(&mut self, within: Duration) -> Result<Message, tungstenite::Error> {
        self.ws
            .get_ref()
            .sock
            .set_read_timeout(Some(within))
            .unwrap();
        loop {
            match self.ws.read()? {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => return Ok(m),
            }
        }
    }

    fn recv(&mut self, within: Duration) -> Value {
        match self.next(within) {
            Ok(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }
}

#[test]
fn wss_clients_send_and_ack_and_https_answers_the_api() {
    let dir = TempDir::new("basic");
    let cert = make_cert((2031, 5, 17));
    install(&dir, &cert);
    let gw = start(&dir, &[]);
    let trust = trusting(&[&cert]);

    let mut a = Wss::connect(gw.addr, &trust, "alice");
    let mut b = Wss::connect(gw.addr, &trust, "bob");
    a.send(json!({"type": "send", "to": "bob", "id": 1, "data": {"hi": "over TLS"}}));
    assert_eq!(a.recv(T), json!({"type": "ack", "id": 1, "delivered": 1}));
    assert_eq!(
        b.recv(T),
        json!({"type": "message", "from": "alice", "data": {"hi": "over TLS"}})
    );

    // Many frames queued at once leave in order (several per TLS record).
    for i in 0..300 {
        a.send(json!({"type": "send", "to": "bob", "data": i}));
    }
    for i in 0..300 {
        assert_eq!(b.recv(T)["data"], i);
    }

    // HTTPS on the same listener: health, the API, metrics.
    assert_eq!(
        https(gw.addr, &trust, "GET", "/healthz", None),
        (200, "ok".into())
    );
    let (status, body) = https(
        gw.addr,
        &trust,
        "POST",
        "/api/send",
        Some(r#"{"to":"bob","data":"from the backend"}"#),
    );
    assert_eq!((status, body.as_str()), (200, r#"{"delivered":1}"#));
    let m = b.recv(T);
    assert_eq!(m["data"], "from the backend", "{m}");
    let (status, body) = https(gw.addr, &trust, "GET", "/api/presence/alice", None);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["connections"],
        1
    );
    // The served certificate's expiry, as generated.
    assert_eq!(
        metric(gw.addr, &trust, "wsgate_tls_cert_not_after_seconds", ""),
        cert.not_after as f64
    );

    // Closing handshake over TLS.
    a.ws.close(None).unwrap();
    match a.next(T) {
        Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {}
        other => panic!("expected the close reply, got {other:?}"),
    }
}

#[test]
fn large_messages_cross_many_tls_records_both_ways() {
    let dir = TempDir::new("large");
    let cert = make_cert((2031, 1, 1));
    install(&dir, &cert);
    let gw = start(&dir, &["--echo-path", "/echo"]);
    let trust = trusting(&[&cert]);
    let mut e = Wss::open(gw.addr, &trust, "/echo").unwrap();
    for size in [1, 1000, 16 * 1024, 60 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        e.ws.send(Message::binary(payload.clone())).unwrap();
        match e.next(T) {
            Ok(Message::Binary(got)) => assert!(got[..] == payload[..], "echo of {size} bytes"),
            other => panic!("expected the echo of {size} bytes, got {other:?}"),
        }
    }
}

#[test]
fn python_websockets_over_tls() {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = venv();
    let dir = TempDir::new("python");
    let cert = make_cert((2031, 1, 1));
    install(&dir, &cert);
    let gw = start(&dir, &[]);
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(format!("{root}/tests/python/tls_check.py"))
        .arg(gw.addr.port().to_string())
        .arg(dir.path("cert.pem"))
        .output()
        .expect("run the python TLS check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python TLS check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tls check: ok"), "{stdout}");
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    let dir = TempDir::new("reload");
    let a = make_cert((2030, 1, 1));
    let b = make_cert((2032, 6, 30));
    install(&dir, &a);
    let gw = start(&dir, &[]);
    let trust_a = trusting(&[&a]);
    let trust_b = trusting(&[&b]);
    let trust_both = trusting(&[&a, &b]);
    assert_eq!(presented(gw.addr, &trust_both), Some(a.der.clone()));

    let mut c1 = Wss::connect(gw.addr, &trust_a, "one");

    install(&dir, &b);
    gw.signal(libc::SIGHUP);
    wait_for("a new handshake to present certificate B", T, &mut || {
        presented(gw.addr, &trust_both).as_ref() == Some(&b.der)
    });
    // A client that trusts only the old certificate can no longer connect.
    assert!(tls_connect(gw.addr, &trust_a).is_err());

    // The connection made under A is untouched: it still sends and receives.
    let mut c2 = Wss::connect(gw.addr, &trust_b, "two");
    c2.send(json!({"type": "send", "to": "one", "id": 7, "data": "after the reload"}));
    assert_eq!(c2.recv(T), json!({"type": "ack", "id": 7, "delivered": 1}));
    assert_eq!(c1.recv(T)["data"], "after the reload");
    c1.send(json!({"type": "send", "to": "two", "id": 8, "data": "still here"}));
    assert_eq!(c1.recv(T), json!({"type": "ack", "id": 8, "delivered": 1}));
    assert_eq!(c2.recv(T)["data"], "still here");
    assert_eq!(
        metric(
            gw.addr,
            &trust_b,
            "wsgate_tls_reloads_total",
            "result=\"ok\""
        ),
        1.0
    );
    assert_eq!(
        metric(gw.addr, &trust_b, "wsgate_tls_cert_not_after_seconds", ""),
        b.not_after as f64
    );

    // A broken certificate file: the reload fails, is counted, and B is still served.
    std::fs::write(
        dir.path("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    wait_for("the failed reload to be counted", T, &mut || {
        metric(
            gw.addr,
            &trust_b,
            "wsgate_tls_reloads_total",
            "result=\"error\"",
        ) == 1.0
    });
    // A key that does not match the certificate fails the same way.
    std::fs::write(dir.path("cert.pem"), &a.pem).unwrap();
    std::fs::write(dir.path("key.pem"), &b.key_pem).unwrap();
    gw.signal(libc::SIGHUP);
    wait_for("the second failed reload to be counted", T, &mut || {
        metric(
            gw.addr,
            &trust_b,
            "wsgate_tls_reloads_total",
            "result=\"error\"",
        ) == 2.0
    });
    assert_eq!(presented(gw.addr, &trust_both), Some(b.der.clone()));
    assert_eq!(
        metric(
            gw.addr,
            &trust_b,
            "wsgate_tls_reloads_total",
            "result=\"ok\""
        ),
        1.0
    );
    c2.send(json!({"type": "send", "to": "one", "id": 9, "data": "and after a failed one"}));
    assert_eq!(c2.recv(T), json!({"type": "ack", "id": 9, "delivered": 1}));
    assert_eq!(c1.recv(T)["data"], "and after a failed one");
}

#[test]
fn plaintext_clients_fail_cleanly_and_stalled_handshakes_are_cut() {
    let dir = TempDir::new("plain");
    let cert = make_cert((2031, 1, 1));
    install(&dir, &cert);
    let gw = start(&dir, &["--handshake-timeout", "1s"]);
    let trust = trusting(&[&cert]);

    // Plain HTTP to the TLS port: a plain 400 that says why, then the end of the stream.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("TLS"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A plain WebSocket client fails its handshake at once rather than hanging.
    let started = Instant::now();
    let err = common::Client::connect(gw.addr, "plain").err();
    assert!(err.is_some(), "a plain ws:// client must not get in");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A client that starts a TLS record and stalls is cut by --handshake-timeout (1 s).
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80, 0x01]).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "stalled handshake ended after {took:?}"
    );

    // A client that connects and sends nothing at all, likewise.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "silent client ended after {took:?}"
    );

    // The gateway serves on, and counted the failed handshakes.
    let mut a = Wss::connect(gw.addr, &trust, "after");
    a.send(json!({"type": "send", "to": "after", "id": 1, "data": 1}));
    let first = a.recv(T);
    let second = a.recv(T);
    let mut types = [first["type"].clone(), second["type"].clone()];
    types.sort_by_key(|t| t.to_string());
    assert_eq!(types, [json!("ack"), json!("message")]);
    assert!(metric(gw.addr, &trust, "wsgate_tls_handshake_failures_total", "") >= 2.0);
}

/// Runs the binary with `args` (expected to fail at start); exit code and stderr.
fn start_fails(args: &[String]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    if !args.iter().any(|a| a == "--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let mut child = cmd
        .args(["--workers", "1"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("wsgate {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn bad_certificate_files_stop_the_start_naming_the_flag() {
    let dir = TempDir::new("bad");
    let a = make_cert((2031, 1, 1));
    let b = make_cert((2031, 1, 1));
    std::fs::write(dir.path("a.pem"), &a.pem).unwrap();
    std::fs::write(dir.path("a.key"), &a.key_pem).unwrap();
    std::fs::write(dir.path("b.key"), &b.key_pem).unwrap();
    std::fs::write(dir.path("garbage.pem"), "hello\n").unwrap();
    let flag = |f: &str, p: &str| vec![f.to_string(), path_arg(&dir.path(p))];

    // Only one of the two flags.
    let (code, err) = start_fails(&flag("--tls-cert", "a.pem"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");
    // No certificate in the file.
    let (code, err) = start_fails(
        &[
            flag("--tls-cert", "garbage.pem"),
            flag("--tls-key", "a.key"),
        ]
        .concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-cert"), "{err}");
    // No key in the file.
    let (code, err) = start_fails(
        &[
            flag("--tls-cert", "a.pem"),
            flag("--tls-key", "garbage.pem"),
        ]
        .concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");
    // A missing file.
    let (code, err) =
        start_fails(&[flag("--tls-cert", "nope.pem"), flag("--tls-key", "a.key")].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-cert"), "{err}");
    // The key of another certificate.
    let (code, err) =
        start_fails(&[flag("--tls-cert", "a.pem"), flag("--tls-key", "b.key")].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tls-key") && err.contains("does not go with"),
        "{err}"
    );
    // TLS does not stand in for authentication on a public address.
    let mut args = [flag("--tls-cert", "a.pem"), flag("--tls-key", "a.key")].concat();
    args.extend(["--listen".to_string(), "0.0.0.0:0".to_string()]);
    let (code, err) = start_fails(&args);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--insecure"), "{err}");
}
