//! Echo server on tokio-tungstenite 0.30 (tungstenite 0.30, the version wsgate uses for its
//! handshake): multi-thread tokio runtime (or `--current-thread`), one task per connection, any
//! path.
//!
//! Per wake-up the task takes every message that is already decoded or readable without
//! waiting, `feed`s the text/binary ones into the sink (tungstenite's write buffer) and then
//! `flush`es once: one write per batch rather than per message, and never a message left
//! unflushed. Pings are answered by tungstenite itself (the pong is queued on read and goes
//! out with the next flush); a close is answered by tungstenite and ends the stream.
//!
//! The default `WebSocketConfig` is kept, as most users would: its 128 KiB read buffer is
//! zero-filled (`Vec::resize`) before every socket read in tungstenite 0.30, which shows up as
//! user time per message. A plain `send` per message measured the same as this batching here.

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn main() {
    wsgate_peers::serve_forever("peer-tokio-tungstenite", serve);
}

async fn serve(s: TcpStream) {
    wsgate_peers::nodelay(&s);
    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
        return;
    };
    loop {
        // Wait for one message...
        let mut open = match ws.next().await {
            Some(Ok(m)) => echo(&mut ws, m).await,
            _ => false,
        };
        // ...then take whatever else is ready without waiting.
        while open {
            match ws.next().now_or_never() {
                None => break,
                Some(Some(Ok(m))) => open = echo(&mut ws, m).await,
                Some(_) => open = false,
            }
        }
        // One flush for the batch (also sends queued pongs and the close answer).
        if ws.flush().await.is_err() || !open {
            break;
        }
    }
}

/// Feeds a data message back; returns false once the connection is done.
async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, m: Message) -> bool {
    match m {
        Message::Text(_) | Message::Binary(_) => ws.feed(m).await.is_ok(),
        Message::Close(_) => false,
        // Ping (answered by tungstenite), Pong, raw Frame: nothing to echo.
        _ => true,
    }
}
