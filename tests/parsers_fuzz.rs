//! Randomized robustness: whatever a peer sends, the parsers answer with a value or an error,
//! never a panic, and the decoder never holds more than the message limit. Seeded, so a
//! failure reproduces; mutations of valid inputs reach deeper than pure noise.

use wsgate::codec::{self, Decoder};
use wsgate::{http, protocol};

/// xorshift64*: small, seeded, good enough to explore inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Flips, inserts, deletes and duplicates bytes of `seed`.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let j = (i + rng.below(16)).min(v.len());
                let chunk = v[i..j].to_vec();
                v.splice(i..i, chunk);
            }
            _ => v.truncate(rng.below(v.len() + 1)),
        }
    }
    v
}

#[test]
fn frame_decoder_survives_anything() {
    let mut rng = Rng(0x5eed_0001);
    let seeds: Vec<Vec<u8>> = vec![
        codec::client_frame(0x81, br#"{"type":"send","to":"a","data":1}"#, [1, 2, 3, 4]),
        codec::client_frame(0x01, b"frag", [9, 9, 9, 9]),
        codec::client_frame(0x80, b"ment", [9, 9, 9, 9]),
        codec::client_frame(0x89, b"ping", [0; 4]),
        codec::client_frame(0x88, &1000u16.to_be_bytes(), [7; 4]),
        codec::client_frame(0x82, &[0u8; 300], [3; 4]),
    ];
    let max = 1024;
    let mut messages = 0;
    for round in 0..20_000 {
        let mut dec = Decoder::new(max);
        // A stream of several mutated frames, fed in random cuts.
        let mut stream = Vec::new();
        for _ in 0..=rng.below(4) {
            let seed = &seeds[rng.below(seeds.len())];
            if rng.below(4) == 0 {
                let n = rng.below(40);
                stream.extend(rng.bytes(n));
            } else {
                stream.extend(mutate(&mut rng, seed));
            }
        }
        let mut pos = 0;
        while pos < stream.len() {
            let cut = (pos + 1 + rng.below(64)).min(stream.len());
            let mut chunk = stream[pos..cut].to_vec();
            let r = dec.feed(&mut chunk, |m| {
                messages += 1;
                !matches!(m, codec::Msg::Close(..))
            });
            assert!(
                dec.buffered() <= 2 * max + 4096 + 64,
                "round {round}: decoder holds {} bytes",
                dec.buffered()
            );
            if r.is_err() {
                break;
            }
            pos = cut;
        }
    }
    // The mutations must reach past the header checks, or this test proves little.
    assert!(messages > 2_000, "only {messages} messages decoded");
}

#[test]
fn http_parser_survives_anything() {
    let mut rng = Rng(0x5eed_0002);
    let seeds: [&[u8]; 3] = [
        b"GET /ws?user=a%40b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"POST /api/send HTTP/1.1\r\nContent-Length: 24\r\nAuthorization: Bearer k\r\n\r\n\
          {\"to\":\"a\",\"data\":[1,2]}",
        b"GET /api/presence/%ZZ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ];
    let mut parsed = 0;
    for _ in 0..50_000 {
        let input = if rng.below(5) == 0 {
            let n = rng.below(200);
            rng.bytes(n)
        } else {
            let seed = seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        if let Ok(Some((req, used))) = http::parse_request(&input, 64) {
            parsed += 1;
            assert!(used <= input.len());
            let _ = http::check_upgrade(&req);
            let _ = req.query_param("user");
            let _ = req.bearer();
            let _ = req.keep_alive();
        }
    }
    assert!(parsed > 5_000, "only {parsed} requests parsed");
}

#[test]
fn protocol_parser_survives_anything() {
    let mut rng = Rng(0x5eed_0003);
    let seeds: [&[u8]; 4] = [
        br#"{"type":"send","to":"u1","id":7,"data":{"a":[1,2,{"b":null}]}}"#,
        br#"{"type":"publish","room":"r","id":"x","data":"s\u00e9"}"#,
        br#"{"type":"join","room":"lobby"}"#,
        br#"{"to":"a","data":18446744073709551616,"user":"u"}"#,
    ];
    let mut ok = 0;
    for _ in 0..50_000 {
        let seed = seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        let Ok(text) = std::str::from_utf8(&input) else {
            continue;
        };
        let parsed = protocol::parse(text);
        ok += usize::from(parsed.request.is_ok());
        // Whatever was parsed can be answered.
        match parsed.request {
            Ok(protocol::Request::Send { data, .. })
            | Ok(protocol::Request::Publish { data, .. }) => {
                let _ = protocol::message(Some("u"), None, data);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = protocol::error(parsed.id, &e);
            }
        }
        for call in ["send", "publish", "broadcast", "disconnect"] {
            let _ = protocol::parse_api(call, &input);
        }
    }
    assert!(ok > 400, "only {ok} requests parsed");
}
