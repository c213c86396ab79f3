//! The protocol checked by a third-party client: Python `websockets` (installed by
//! `scripts/setup-python.sh` into a private venv).

mod common;

use std::process::Command;

use common::{http, send_acked, venv, Gateway};

#[test]
fn python_websockets_client_speaks_the_protocol() {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = venv();

    let gw = Gateway::start(&["--max-message-size", "4096"]);
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(format!("{root}/tests/python/protocol_check.py"))
        .arg(gw.addr.to_string())
        .output()
        .expect("run the python check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("protocol check: ok"), "{stdout}");
}

#[test]
fn metrics_parse_with_the_reference_prometheus_parser() {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = venv();

    let gw = Gateway::start(&[]);
    let mut a = gw.connect("a");
    let _b = gw.connect("b");
    for i in 0..5 {
        send_acked(&mut a, "b", serde_json::json!(i), i);
    }
    assert_eq!(
        http(
            gw.addr,
            "GET",
            "/ws",
            None,
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ]
        )
        .0,
        401
    );
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(format!("{root}/tests/python/metrics_check.py"))
        .arg(gw.addr.to_string())
        .output()
        .expect("run the metrics check");
    assert!(
        out.status.success(),
        "metrics check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
