//! WebSocket frames: an incremental decoder for client frames and encoders for server frames.
//!
//! Header parsing comes from tungstenite (`FrameHeader::parse`); this module adds what a
//! server with no per-connection I/O buffers needs: decoding straight out of a per-core
//! scratch buffer, keeping only an unfinished frame per connection, and encoding each server
//! frame once into [`Bytes`] that every recipient shares (server frames are unmasked, so the
//! bytes on the wire are the same for all of them).

use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Why the decoder gave up on a connection; each maps to the close code the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Violation of RFC 6455 framing (close 1002).
    Protocol(&'static str),
    /// A message above the configured size limit (close 1009).
    TooBig,
    /// A text message or close reason that is not UTF-8 (close 1007).
    BadUtf8,
}

impl DecodeError {
    /// The close code that answers this error.
    pub fn close_code(self) -> u16 {
        match self {
            DecodeError::Protocol(_) => 1002,
            DecodeError::TooBig => 1009,
            DecodeError::BadUtf8 => 1007,
        }
    }

    /// The close reason sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::Protocol(why) => why,
            DecodeError::TooBig => "message too big",
            DecodeError::BadUtf8 => "invalid utf-8",
        }
    }
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// A complete text message (already checked to be UTF-8).
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping; the payload must be echoed in a pong.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
    /// A close frame: code (absent when the frame had no payload) and reason.
    Close(Option<u16>, &'a str),
}

/// Incremental decoder of client-to-server frames.
///
/// Holds only what spans reads: an unfinished frame and an unfinished fragmented message,
/// boxed together and only while there is one, so an idle connection carries 16 bytes of
/// decoder in its task (it is in every connection's task; 72 bytes inline before).
#[derive(Default)]
pub struct Decoder {
    held: Option<Box<Held>>,
    max_message: usize,
}

/// What spans reads.
#[derive(Default)]
struct Held {
    partial: Vec<u8>,
    fragments: Vec<u8>,
    fragment_kind: Option<Data>,
    /// How much of `fragments` is known to be valid UTF-8 (for fail-fast text checks).
    utf8_checked: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.fragments.is_empty() && self.fragment_kind.is_none()
    }
}

/// Capacity above which an emptied buffer is released, so idle connections stay small.
const KEEP_CAPACITY: usize = 4096;

impl Decoder {
    /// A decoder that refuses messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            ..Default::default()
        }
    }

    /// Bytes held between reads (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, |h| h.partial.capacity() + h.fragments.capacity())
    }

    /// Feeds bytes just read. Calls `on_msg` for every complete message, in order; stops early
    /// when it returns `false` (after a close, say). `data` is unmasked in place.
    pub fn feed(
        &mut self,
        data: &mut [u8],
        mut on_msg: impl FnMut(Msg<'_>) -> bool,
    ) -> Result<(), DecodeError> {
        let partial = self.held.as_mut().map(|h| std::mem::take(&mut h.partial));
        match partial {
            Some(mut buf) if !buf.is_empty() => {
                buf.extend_from_slice(data);
                let used = self.decode(&mut buf, &mut on_msg)?;
                buf.drain(..used);
                if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
                    buf = Vec::new();
                }
                self.held.get_or_insert_with(Box::default).partial = buf;
            }
            kept => {
                let used = self.decode(data, &mut on_msg)?;
                if used < data.len() {
                    let h = self.held.get_or_insert_with(Box::default);
                    h.partial = kept.unwrap_or_default();
                    h.partial.extend_from_slice(&data[used..]);
                }
            }
        }
        // Nothing spans reads any more: an idle connection holds no box.
        if self.held.as_ref().is_some_and(|h| h.is_empty()) {
            self.held = None;
        }
        Ok(())
    }

    /// Decodes every complete frame in `data`; returns how many bytes were used.
    fn decode(
        &mut self,
        data: &mut [u8],
        on_msg: &mut impl FnMut(Msg<'_>) -> bool,
    ) -> Result<usize, DecodeError> {
        let mut pos = 0;
        while pos < data.len() {
            let mut cursor = Cursor::new(&data[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return Err(DecodeError::Protocol("reserved opcode")),
            };
            let header_len = cursor.position() as usize;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(DecodeError::Protocol("reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(DecodeError::Protocol("client frame not masked"));
            };
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return Err(DecodeError::Protocol("bad control frame"));
            }
            if len > self.max_message as u64 {
                return Err(DecodeError::TooBig);
            }
            let len = len as usize;
            if data.len() - pos - header_len < len {
                // Refuse early a fragmented message that will not fit.
                let fragmented = self.held.as_ref().map_or(0, |h| h.fragments.len());
                if !is_control && fragmented + len > self.max_message {
                    return Err(DecodeError::TooBig);
                }
                break;
            }
            let start = pos + header_len;
            let payload = &mut data[start..start + len];
            unmask(payload, mask);
            pos = start + len;
            let go_on = self.frame(header.opcode, header.is_final, payload, on_msg)?;
            if !go_on {
                return Ok(data.len());
            }
        }
        Ok(pos)
    }

    fn frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
        on_msg: &mut impl FnMut(Msg<'_>) -> bool,
    ) -> Result<bool, DecodeError> {
        let in_message = self.held.as_ref().and_then(|h| h.fragment_kind);
        match opcode {
            OpCode::Control(Control::Ping) => Ok(on_msg(Msg::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_msg(Msg::Pong)),
            OpCode::Control(Control::Close) => {
                let (code, reason) = parse_close(payload)?;
                on_msg(Msg::Close(code, reason));
                Ok(false)
            }
            OpCode::Data(Data::Continue) => {
                let Some(kind) = in_message else {
                    return Err(DecodeError::Protocol("continuation without a message"));
                };
                let max = self.max_message;
                let h = self.held.get_or_insert_with(Box::default);
                if h.fragments.len() + payload.len() > max {
                    return Err(DecodeError::TooBig);
                }
                h.fragments.extend_from_slice(payload);
                if kind == Data::Text {
                    h.check_fragment_utf8(fin)?;
                }
                if !fin {
                    return Ok(true);
                }
                let body = std::mem::take(&mut h.fragments);
                h.fragment_kind = None;
                h.utf8_checked = 0;
                let go_on = deliver(kind, &body, on_msg)?;
                if body.capacity() <= KEEP_CAPACITY {
                    if let Some(h) = self.held.as_mut() {
                        h.fragments = body;
                        h.fragments.clear();
                    }
                }
                Ok(go_on)
            }
            OpCode::Data(kind) => {
                if in_message.is_some() {
                    return Err(DecodeError::Protocol("new message inside a fragmented one"));
                }
                if fin {
                    return deliver(kind, payload, on_msg);
                }
                let h = self.held.get_or_insert_with(Box::default);
                h.fragment_kind = Some(kind);
                h.fragments.extend_from_slice(payload);
                if kind == Data::Text {
                    h.check_fragment_utf8(false)?;
                }
                Ok(true)
            }
            OpCode::Control(_) => Err(DecodeError::Protocol("reserved opcode")),
        }
    }
}

impl Held {
    /// Checks the fragments received so far: an invalid sequence fails at once; an unfinished
    /// one at the end is allowed until the final fragment.
    fn check_fragment_utf8(&mut self, fin: bool) -> Result<(), DecodeError> {
        match std::str::from_utf8(&self.fragments[self.utf8_checked..]) {
            Ok(_) => {
                self.utf8_checked = self.fragments.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.utf8_checked += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(DecodeError::BadUtf8),
        }
    }
}

fn deliver(
    kind: Data,
    payload: &[u8],
    on_msg: &mut impl FnMut(Msg<'_>) -> bool,
) -> Result<bool, DecodeError> {
    match kind {
        Data::Text => {
            let text = std::str::from_utf8(payload).map_err(|_| DecodeError::BadUtf8)?;
            Ok(on_msg(Msg::Text(text)))
        }
        Data::Binary => Ok(on_msg(Msg::Binary(payload))),
        _ => Err(DecodeError::Protocol("reserved opcode")),
    }
}

fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), DecodeError> {
    match payload.len() {
        0 => Ok((None, "")),
        1 => Err(DecodeError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| DecodeError::BadUtf8)?;
            Ok((Some(code), reason))
        }
    }
}

/// XORs `buf` with the 4-byte mask, eight bytes at a time.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8])) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    let done = buf.len() - buf.len() % 8;
    for (i, b) in buf[done..].iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Room reserved in front of a payload for the largest server frame header.
pub const HEADER_ROOM: usize = 10;

/// Writes a server frame header for `len` payload bytes ending exactly at `room.len()`;
/// returns where the header starts.
fn put_header(room: &mut [u8; HEADER_ROOM], opcode: u8, len: usize) -> usize {
    let first = 0x80 | opcode;
    if len < 126 {
        room[8] = first;
        room[9] = len as u8;
        8
    } else if len <= u16::MAX as usize {
        room[6] = first;
        room[7] = 126;
        room[8..10].copy_from_slice(&(len as u16).to_be_bytes());
        6
    } else {
        room[0] = first;
        room[1] = 127;
        room[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        0
    }
}

/// Builds a complete text frame whose payload `write` appends to the given buffer.
/// The payload is written once and the header put in front of it without a copy.
pub fn text_frame_with(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    frame_with(0x1, capacity, write)
}

fn frame_with(opcode: u8, capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(HEADER_ROOM + capacity);
    buf.extend_from_slice(&[0; HEADER_ROOM]);
    write(&mut buf);
    let len = buf.len() - HEADER_ROOM;
    let mut room = [0u8; HEADER_ROOM];
    let start = put_header(&mut room, opcode, len);
    buf[start..HEADER_ROOM].copy_from_slice(&room[start..]);
    // Vec -> Bytes is free; the slice drops the unused head room.
    Bytes::from(buf).slice(start..)
}

/// A complete frame of any opcode around an existing payload (copies the payload once).
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    frame_with(opcode, payload.len(), |b| b.extend_from_slice(payload))
}

/// A text frame.
pub fn text(payload: &[u8]) -> Bytes {
    frame(0x1, payload)
}

/// A pong answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    frame(0xA, payload)
}

/// A ping (the server's liveness probe).
pub fn ping() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

/// A close frame with a code and a reason (truncated to fit a control frame).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut r = reason.as_bytes();
    if r.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    frame_with(0x8, 2 + r.len(), |b| {
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(r);
    })
}

/// A client-to-server frame: `first` is the first header byte (FIN, RSV bits, opcode), the
/// payload is masked with `mask`. For clients, load generators and tests; the zero mask is
/// legal and makes masking free.
pub fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<String>, DecodeError> {
        let mut got = Vec::new();
        let mut data = bytes.to_vec();
        dec.feed(&mut data, |m| {
            got.push(format!("{m:?}"));
            true
        })?;
        Ok(got)
    }

    #[test]
    fn decodes_a_text_frame_split_anywhere() {
        let f = client_frame(0x81, "héllo wörld, a longer text".as_bytes(), [1, 2, 3, 4]);
        for cut in 0..f.len() {
            let mut dec = Decoder::new(1024);
            let mut got = collect(&mut dec, &f[..cut]).unwrap();
            got.extend(collect(&mut dec, &f[cut..]).unwrap());
            assert_eq!(
                got,
                vec!["Text(\"héllo wörld, a longer text\")"],
                "cut {cut}"
            );
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn reassembles_fragments_with_interleaved_ping() {
        let mut bytes = client_frame(0x01, b"ab", [9, 8, 7, 6]);
        bytes.extend(client_frame(0x89, b"p", [1, 1, 1, 1]));
        bytes.extend(client_frame(0x80, b"cd", [5, 5, 5, 5]));
        let mut dec = Decoder::new(1024);
        let got = collect(&mut dec, &bytes).unwrap();
        assert_eq!(got, vec!["Ping([112])", "Text(\"abcd\")"]);
    }

    #[test]
    fn refuses_unmasked_reserved_and_oversized_frames() {
        let mut dec = Decoder::new(10);
        assert_eq!(
            collect(&mut dec, &[0x81, 0x01, b'a']),
            Err(DecodeError::Protocol("client frame not masked"))
        );
        let mut dec = Decoder::new(10);
        assert_eq!(
            collect(&mut dec, &client_frame(0xC1, b"a", [0; 4])),
            Err(DecodeError::Protocol("reserved bits set"))
        );
        let mut dec = Decoder::new(10);
        assert_eq!(
            collect(&mut dec, &client_frame(0x83, b"a", [0; 4])),
            Err(DecodeError::Protocol("reserved opcode"))
        );
        // Too big is known from the header alone, before the payload arrives.
        let mut dec = Decoder::new(10);
        let f = client_frame(0x81, &[b'x'; 11], [0; 4]);
        assert_eq!(collect(&mut dec, &f[..6]), Err(DecodeError::TooBig));
        // Fragments adding up to too much.
        let mut dec = Decoder::new(10);
        let mut f = client_frame(0x01, &[b'x'; 6], [0; 4]);
        f.extend(client_frame(0x80, &[b'x'; 6], [0; 4]));
        assert_eq!(collect(&mut dec, &f), Err(DecodeError::TooBig));
    }

    #[test]
    fn invalid_utf8_fails_fast_in_fragments() {
        let mut dec = Decoder::new(1024);
        let f = client_frame(0x01, &[0xff, b'a'], [3; 4]);
        assert_eq!(collect(&mut dec, &f), Err(DecodeError::BadUtf8));
        // A multi-byte character split across fragments is fine.
        let mut dec = Decoder::new(1024);
        let mut f = client_frame(0x01, &"é".as_bytes()[..1], [3; 4]);
        f.extend(client_frame(0x80, &"é".as_bytes()[1..], [3; 4]));
        assert_eq!(collect(&mut dec, &f).unwrap(), vec!["Text(\"é\")"]);
    }

    #[test]
    fn close_frames_are_checked() {
        let mut dec = Decoder::new(1024);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        assert_eq!(
            collect(&mut dec, &client_frame(0x88, &p, [7; 4])).unwrap(),
            vec!["Close(Some(1000), \"bye\")"]
        );
        let mut dec = Decoder::new(1024);
        assert!(collect(&mut dec, &client_frame(0x88, &[3], [7; 4])).is_err());
        let mut dec = Decoder::new(1024);
        let bad = 1005u16.to_be_bytes();
        assert!(collect(&mut dec, &client_frame(0x88, &bad, [7; 4])).is_err());
    }

    #[test]
    fn server_frames_have_the_right_headers() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let big = text(&[b'a'; 300]);
        assert_eq!(&big[..4], &[0x81, 126, 1, 44]);
        assert_eq!(big.len(), 304);
        let huge = text(&vec![b'a'; 70_000]);
        assert_eq!(huge[1], 127);
        assert_eq!(huge.len(), 70_010);
        assert_eq!(&close(4000, "idle timeout")[..4], &[0x88, 14, 0x0f, 0xa0]);
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        for n in 0..40 {
            let orig: Vec<u8> = (0..n as u8).collect();
            let mut fast = orig.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
