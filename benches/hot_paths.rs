//! Micro-benchmarks of the hot paths: frame decode/encode, request parse and message build,
//! the generational slab, and the cross-core mailbox hand-off.
//!
//! Run: `cargo bench --bench hot_paths` (results in target/criterion).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use wsgate::codec::{self, Decoder};
use wsgate::key::GenSlab;
use wsgate::{http, mailbox, protocol};

/// A masked client text frame, as a browser would send it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x81];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn send_request(pad: usize) -> String {
    format!(
        r#"{{"type":"send","to":"user-4711","id":17,"data":{{"t":1732170000000,"p":"{}"}}}}"#,
        "x".repeat(pad)
    )
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 1024, 16 * 1024] {
        let one = client_frame(send_request(size).as_bytes());
        // Sixteen frames per read, as a busy connection delivers them.
        let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 16).collect();
        g.throughput(Throughput::Bytes(many.len() as u64));
        g.bench_function(format!("decode_16x{size}B"), |b| {
            let mut dec = Decoder::new(1 << 20);
            b.iter_batched_ref(
                || many.clone(),
                |buf| {
                    let mut n = 0;
                    dec.feed(buf, |_| {
                        n += 1;
                        true
                    })
                    .unwrap();
                    assert_eq!(n, 16);
                },
                BatchSize::SmallInput,
            )
        });
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("encode_text_{size}B"), |b| {
            b.iter(|| black_box(codec::text(black_box(&payload))))
        });
    }
    g.finish();
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    let text = send_request(64);
    g.bench_function("parse_send_64B", |b| {
        b.iter(|| black_box(protocol::parse(black_box(&text))))
    });
    g.bench_function("parse_and_build_message_64B", |b| {
        b.iter(|| {
            let p = protocol::parse(black_box(&text));
            match p.request {
                Ok(protocol::Request::Send { data, .. }) => {
                    black_box(protocol::message(Some("user-1"), None, data))
                }
                _ => unreachable!(),
            }
        })
    });
    let upgrade = b"GET /ws?user=alice HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\r\n";
    g.bench_function("http_upgrade_parse_and_check", |b| {
        b.iter(|| {
            let (req, _) = http::parse_request(black_box(upgrade), 0).unwrap().unwrap();
            black_box((http::check_upgrade(&req).unwrap(), req.query_param("user")))
        })
    });
    g.finish();
}

fn slab(c: &mut Criterion) {
    let mut g = c.benchmark_group("slab");
    g.bench_function("insert_lookup_remove", |b| {
        let mut s: GenSlab<[u64; 4]> = GenSlab::new(1);
        // A populated table, as on a busy core.
        let keep: Vec<_> = (0..10_000).map(|i| s.insert([i; 4]).unwrap()).collect();
        b.iter(|| {
            let k = s.insert([7; 4]).unwrap();
            black_box(s.get(k));
            black_box(s.get(keep[1234]));
            black_box(s.remove(k));
            // The stale key misses.
            black_box(s.get(k));
        })
    });
    g.finish();
}

fn mailbox_handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    const BATCH: usize = 1024;
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("batch_1024_to_other_thread", |b| {
        b.iter_custom(|iters| {
            let pressure = std::sync::Arc::new(mailbox::Pressure::new(1));
            let (tx, rx) = mailbox::mailbox::<u64>(0, usize::MAX, pressure);
            let consumer = std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut got = 0u64;
                    let mut out = Vec::new();
                    while got < iters * BATCH as u64 {
                        if rx.recv_all(&mut out).await.is_none() {
                            break;
                        }
                        for b in out.drain(..) {
                            got += b.len() as u64;
                            rx.handled(b.len());
                        }
                    }
                })
            });
            let start = Instant::now();
            for i in 0..iters {
                tx.send_batch(vec![i; BATCH]);
            }
            consumer.join().unwrap();
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = frames, requests, slab, mailbox_handoff
}
criterion_main!(benches);
