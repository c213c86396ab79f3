//! Echo server on fastwebsockets 0.10 with hyper 1.x doing the HTTP/1.1 upgrade, shaped like
//! fastwebsockets' own `examples/echo_server.rs` (hyper `serve_connection(..).with_upgrades()`,
//! `upgrade::upgrade`, a `FragmentCollector`, the handler run `unconstrained`), but on a
//! multi-thread tokio runtime with one worker per CPU (or `--current-thread`). auto_close and auto_pong are on (pings
//! and closes are answered by the library), writev is on (header and payload in one
//! `writev` for payloads above fastwebsockets' 1 KiB threshold). Any path is accepted.

use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};

fn main() {
    wsgate_peers::serve_forever("peer-fastwebsockets", |stream| async move {
        let io = hyper_util::rt::TokioIo::new(stream);
        let _ = http1::Builder::new()
            .serve_connection(io, service_fn(server_upgrade))
            .with_upgrades()
            .await;
    });
}

async fn server_upgrade(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let _ = tokio::task::unconstrained(handle_client(fut)).await;
    });
    Ok(response)
}

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fut.await?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws.set_writev(true);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}
