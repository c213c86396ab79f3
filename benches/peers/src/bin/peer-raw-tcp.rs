//! The physical ceiling: a raw TCP echo on tokio (multi-thread, or `--current-thread`; one
//! 64 KiB buffer per connection, `read` then `write_all` back), with just enough WebSocket to
//! be measured by the same load generator as everything else.
//!
//! * The upgrade: read the HTTP request head up to `\r\n\r\n`, answer `101 Switching
//!   Protocols` with the `Sec-WebSocket-Accept` derived from the request's key (tungstenite's
//!   `derive_accept_key`). Nothing else of the request is checked; any path works.
//! * The frames: clients mask their frames (RFC 6455 5.3) and servers must not, and
//!   wsgate-bench's frame parser (`parse` in src/bin/wsgate-bench/client.rs) ignores the MASK
//!   bit, so echoing the client's bytes verbatim would hand it frames with 4 stray key bytes
//!   in front of every payload. So this peer does the least framing that yields valid server
//!   frames: per frame header it clears the MASK bit and drops the 4 key bytes, and shifts the
//!   payload down over them in place (one `memmove` per frame). wsgate-bench masks with a zero
//!   key, so there is nothing to XOR; a non-zero key (other clients) is unmasked on the way.
//!   A ping is echoed as a pong, a close is echoed (that is the close answer) and the socket
//!   is shut down. No UTF-8 validation, no reassembly, no size limits: a ceiling, not a server.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BUF: usize = 64 * 1024;

fn main() {
    wsgate_peers::serve_forever("peer-raw-tcp", serve);
}

async fn serve(mut s: TcpStream) {
    wsgate_peers::nodelay(&s);
    let mut buf = vec![0u8; BUF];
    // The request head.
    let mut len = 0;
    let head_end = loop {
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if let Some(p) = find(&buf[..len], b"\r\n\r\n") {
            break p + 4;
        }
        if len == buf.len() {
            return;
        }
    };
    let Some(key) = header(&buf[..head_end], "sec-websocket-key") else {
        let _ = s
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key)
    );
    if s.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    // Frames that came with the head.
    buf.copy_within(head_end..len, 0);
    len -= head_end;
    let mut unmask = Unmask::default();
    loop {
        if len > 0 {
            let (out, carry, close) = unmask.process(&mut buf[..len]);
            if s.write_all(&buf[..out]).await.is_err() {
                return;
            }
            if close {
                let _ = s.shutdown().await;
                return;
            }
            buf.copy_within(len - carry..len, 0);
            len = carry;
        }
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` (lower case) in a request head.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// Client-to-server frame rewriting, resumable across reads.
#[derive(Default)]
struct Unmask {
    /// Payload bytes of the current frame not yet seen.
    remaining: u64,
    key: [u8; 4],
    /// Position in the mask key of the next payload byte.
    off: usize,
    /// The current frame is a close: stop after its payload.
    closing: bool,
}

impl Unmask {
    /// Rewrites `buf` in place into server frames. Returns (bytes of output at the front of
    /// `buf`, bytes of an unfinished header at its end to keep for the next read, close seen).
    /// Output never overtakes input: a header only shrinks, a payload keeps its size.
    fn process(&mut self, buf: &mut [u8]) -> (usize, usize, bool) {
        let (mut r, mut w) = (0, 0);
        let len = buf.len();
        loop {
            if self.remaining > 0 {
                let k = (self.remaining.min((len - r) as u64)) as usize;
                if self.key != [0; 4] {
                    for (i, b) in buf[r..r + k].iter_mut().enumerate() {
                        *b ^= self.key[(self.off + i) & 3];
                    }
                    self.off = (self.off + k) & 3;
                }
                if r != w {
                    buf.copy_within(r..r + k, w);
                }
                r += k;
                w += k;
                self.remaining -= k as u64;
                if self.remaining > 0 {
                    return (w, 0, false);
                }
                if self.closing {
                    return (w, 0, true);
                }
            }
            // A header at r?
            let avail = len - r;
            if avail < 2 {
                return (w, avail, false);
            }
            let (b0, b1) = (buf[r], buf[r + 1]);
            let masked = b1 & 0x80 != 0;
            let ext = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let hlen = 2 + ext + if masked { 4 } else { 0 };
            if avail < hlen {
                return (w, avail, false);
            }
            let plen = match ext {
                2 => u16::from_be_bytes([buf[r + 2], buf[r + 3]]) as u64,
                8 => u64::from_be_bytes(buf[r + 2..r + 10].try_into().expect("8 bytes")),
                _ => (b1 & 0x7f) as u64,
            };
            self.key = if masked {
                buf[r + 2 + ext..r + 6 + ext].try_into().expect("4 bytes")
            } else {
                [0; 4]
            };
            let opcode = b0 & 0x0f;
            // Ping -> pong, everything else as it came.
            buf[w] = if opcode == 0x9 { (b0 & 0xf0) | 0xA } else { b0 };
            buf[w + 1] = b1 & 0x7f;
            buf.copy_within(r + 2..r + 2 + ext, w + 2);
            w += 2 + ext;
            r += hlen;
            self.remaining = plen;
            self.off = 0;
            self.closing = opcode == 0x8;
            if plen == 0 && self.closing {
                return (w, 0, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Unmask;

    fn masked(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        f
    }

    fn unmasked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = masked(opcode, payload, [0; 4]);
        f[1] &= 0x7f;
        let at = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        f.drain(at..at + 4);
        f
    }

    /// Feeds `input` in chunks of `step` bytes, as reads would deliver it.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut u = Unmask::default();
        let (mut buf, mut out, mut i) = (Vec::new(), Vec::new(), 0);
        while i < input.len() {
            let end = (i + step).min(input.len());
            buf.extend_from_slice(&input[i..end]);
            i = end;
            let (o, carry, close) = u.process(&mut buf);
            out.extend_from_slice(&buf[..o]);
            if close {
                return (out, true);
            }
            let keep = buf[buf.len() - carry..].to_vec();
            buf = keep;
        }
        (out, false)
    }

    #[test]
    fn rewrites_frames_across_any_split() {
        let big = vec![b'y'; 70_000];
        let mid = vec![b'z'; 300];
        let mut input = masked(0x1, b"hello", [0; 4]);
        input.extend(masked(0x2, &mid, [1, 2, 3, 4]));
        input.extend(masked(0x9, b"p", [9, 9, 9, 9]));
        input.extend(masked(0x1, &big, [0; 4]));
        input.extend(masked(0x8, &[0x03, 0xe8], [5, 6, 7, 8]));
        input.extend(masked(0x1, b"after close", [0; 4]));
        let mut want = unmasked(0x1, b"hello");
        want.extend(unmasked(0x2, &mid));
        want.extend(unmasked(0xA, b"p"));
        want.extend(unmasked(0x1, &big));
        want.extend(unmasked(0x8, &[0x03, 0xe8]));
        for step in [1, 2, 3, 7, 13, 1000, 65536, input.len()] {
            assert_eq!(run(&input, step), (want.clone(), true), "step {step}");
        }
    }
}
