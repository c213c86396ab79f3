//! Randomized robustness: whatever a peer sends, the parsers answer with a value or an error,
//! never a panic, and the decoder never holds more than the message limit. Seeded, so a
//! failure reproduces; mutations of valid inputs reach deeper than pure noise.

use wsgate::codec::{self, Decoder};
use wsgate::{http, protocol};

mod common;
use common::Rng;

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

/// A random JSON value of the kinds a token's claims might hold: numbers at every scale and
/// sign (what a JavaScript backend writes for "never": `Number.MAX_VALUE`), strings, bools,
/// null, arrays, objects.
fn random_claim_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(12) {
        0 => json!(null),
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next()),
        3 => json!(-(rng.next() as i64).abs()),
        4 => json!(f64::from_bits(rng.next()).clamp(-f64::MAX, f64::MAX)),
        5 => json!(f64::MAX),
        6 => json!(-f64::MAX),
        7 => json!(1e20 * rng.below(1000) as f64),
        8 => json!(1.7e9 + (rng.below(1_000_000) as f64) - 500_000.0),
        9 => json!(format!("{}", rng.next())),
        10 => json!([rng.below(3)]),
        _ => json!({"n": rng.below(9)}),
    }
}

/// Any claim values in a correctly signed token: verification answers with an identity or a
/// refusal, and an identity's remaining lifetime is computed without a panic and within
/// bounds. (The bug this guards: `exp: 1e20` panicked in `Duration::from_secs_f64` and killed
/// a worker.)
#[test]
fn jwt_claims_of_any_value_never_panic() {
    use std::time::Duration;
    use wsgate::auth;
    let mut rng = Rng(0x5eed_0004);
    let secret = b"fuzz";
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), serde_json::json!("u1"));
        for name in ["exp", "nbf", "iat"] {
            if rng.below(3) != 0 {
                claims.insert(name.into(), random_claim_value(&mut rng));
            }
        }
        if rng.below(10) == 0 {
            claims.insert("sub".into(), random_claim_value(&mut rng));
        }
        let token = auth::sign_jwt(&serde_json::Value::Object(claims), secret);
        let leeway = Duration::from_secs(rng.below(3600) as u64);
        match auth::verify_jwt(&token, secret, leeway) {
            Ok(id) => {
                accepted += 1;
                if let Some(left) = id.remaining() {
                    assert!(left <= auth::MAX_LIFETIME);
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        accepted > 2_000 && refused > 2_000,
        "{accepted} accepted, {refused} refused"
    );
}

/// Requests with random heads and bodies: random Content-Length spellings (signs, spaces,
/// lists, repeats, huge values), Expect, Transfer-Encoding, split at random points. The
/// parser answers a request, "more", or an error; never a panic, never a body longer than
/// the limit, and a request is only complete once its whole body is there.
#[test]
fn http_heads_and_bodies_of_any_shape_never_panic() {
    let mut rng = Rng(0x5eed_0005);
    let lengths = [
        "0",
        "5",
        "+5",
        "-5",
        " 5 ",
        "5, 5",
        "5,6",
        "05",
        "0x5",
        "",
        "99999999999999999999999",
        "18446744073709551615",
        "5\t",
    ];
    let (mut complete, mut errors) = (0, 0);
    for _ in 0..30_000 {
        let mut head = format!(
            "{} /api/send HTTP/1.{}\r\nHost: x\r\n",
            ["POST", "GET", "HEAD", "PUT"][rng.below(4)],
            rng.below(2)
        );
        for _ in 0..rng.below(3) {
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                lengths[rng.below(lengths.len())]
            ));
        }
        if rng.below(4) == 0 {
            head.push_str("Expect: 100-continue\r\n");
        }
        if rng.below(10) == 0 {
            head.push_str("Transfer-Encoding: chunked\r\n");
        }
        head.push_str("\r\n");
        let mut input = head.into_bytes();
        let body = rng.below(12);
        input.extend(rng.bytes(body));
        let cut = rng.below(input.len() + 1);
        let input = &input[..cut];
        let _ = http::wants_continue(input);
        match http::parse_request(input, 8) {
            Ok(Some((req, used))) => {
                complete += 1;
                assert!(used <= input.len());
                assert!(req.body.len() <= 8);
            }
            Ok(None) => {}
            Err(e) => {
                errors += 1;
                assert!(matches!(e.status, 400 | 411 | 413 | 431), "{e:?}");
            }
        }
    }
    assert!(
        complete > 1_000 && errors > 1_000,
        "{complete} complete, {errors} errors"
    );
}
