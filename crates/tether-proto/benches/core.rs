//! Cost of the sans-IO core: frame encode/decode (64 B and 4 KiB DATA, heartbeats) and the
//! liveness engine's per-call cost (`on_receive`, `poll_timeout`, `handle_timeout`), plus a
//! whole `Conn::handle_input` of a 64-message batch.
//!
//! `cargo bench -p tether-proto --bench core`

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tether_proto::codec::{self, Decoder, Frame, Hello};
use tether_proto::{Conn, ConnConfig, ConnEvent, Liveness, LivenessConfig};

/// The origin of virtual time. Read from the clock once per test; every later instant is
/// this plus a `Duration`.
#[allow(clippy::disallowed_methods)]
fn base() -> Instant {
    Instant::now()
}

fn codec_benches(c: &mut Criterion) {
    for size in [64usize, 4096] {
        let payload = vec![0xabu8; size];
        let mut g = c.benchmark_group(format!("data_{size}B"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("encode", |b| {
            let mut out = BytesMut::with_capacity(codec::data_frame_len(size));
            b.iter(|| {
                out.clear();
                codec::encode_data(black_box(&payload), &mut out);
                black_box(out.len())
            })
        });
        let mut one = BytesMut::new();
        codec::encode_data(&payload, &mut one);
        g.bench_function("decode", |b| {
            let mut d = Decoder::new(1 << 20);
            b.iter(|| {
                let mut n = 0;
                d.decode(black_box(&one), |f| {
                    if let Frame::Data(p) = f {
                        n += p.len();
                    }
                    true
                })
                .unwrap();
                black_box(n)
            })
        });
        // The same frame arriving in two reads (the tail is buffered once).
        g.bench_function("decode_split", |b| {
            let mut d = Decoder::new(1 << 20);
            let (a, z) = one.split_at(one.len() / 2);
            b.iter(|| {
                let mut n = 0;
                d.decode(black_box(a), |_| true).unwrap();
                d.decode(black_box(z), |f| {
                    n += matches!(f, Frame::Data(_)) as usize;
                    true
                })
                .unwrap();
                black_box(n)
            })
        });
        g.finish();
    }
    let mut g = c.benchmark_group("heartbeat");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| {
        let mut d = Decoder::new(1 << 20);
        let hb = [0u8; 4];
        b.iter(|| black_box(d.decode(black_box(&hb), |_| true).unwrap()))
    });
    g.finish();
}

fn engine_benches(c: &mut Criterion) {
    let mut cfg = LivenessConfig::new(Duration::from_secs(10), Duration::from_secs(30));
    cfg.suspect_after = Some(Duration::from_secs(15));
    cfg.idle_timeout = Some(Duration::from_secs(600));
    cfg.enforce_peer_heartbeat = Some(Duration::from_secs(10));
    let t0 = base();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("on_receive", |b| {
        let mut l = Liveness::new(t0, cfg.clone());
        let mut now = t0;
        b.iter(|| {
            now += Duration::from_micros(1);
            l.on_receive(black_box(now));
        })
    });
    g.bench_function("poll_timeout", |b| {
        let l = Liveness::new(t0, cfg.clone());
        b.iter(|| black_box(black_box(&l).poll_timeout()))
    });
    g.bench_function("handle_timeout_nothing_due", |b| {
        let mut l = Liveness::new(t0, cfg.clone());
        b.iter(|| l.handle_timeout(black_box(t0 + Duration::from_secs(1))))
    });
    g.bench_function("handle_timeout_heartbeat_due", |b| {
        // Each call sends one heartbeat (the engine hears from the peer in between).
        let mut l = Liveness::new(t0, cfg.clone());
        let mut now = t0;
        b.iter(|| {
            now += Duration::from_secs(10);
            l.on_receive(now);
            l.handle_timeout(black_box(now));
            black_box(l.poll_event())
        })
    });
    g.finish();
}

fn conn_benches(c: &mut Criterion) {
    let t0 = base();
    let hello = Hello {
        client_id: "bench".into(),
        requested_heartbeat: Duration::from_secs(10),
        want_session: false,
        resume: None,
        credential: None,
    };
    let live = LivenessConfig::new(Duration::from_secs(10), Duration::from_secs(30));
    let established = || {
        let mut client = Conn::client(t0, ConnConfig::default(), &hello, live.clone(), None);
        let mut server = Conn::server(t0, ConnConfig::default());
        server.handle_input(t0, client.pending_transmit());
        let n = client.pending_transmit().len();
        client.transmitted(n);
        while server.poll_event().is_some() {}
        server.accept(t0, live.clone(), None);
        while server.poll_event().is_some() {}
        let n = server.pending_transmit().len();
        server.transmitted(n);
        server
    };
    for size in [64usize, 4096] {
        let mut batch = BytesMut::new();
        for _ in 0..64 {
            codec::encode_data(&vec![1u8; size], &mut batch);
        }
        let mut g = c.benchmark_group(format!("conn_handle_input_{size}B"));
        g.throughput(Throughput::Elements(64));
        g.bench_function("64_messages", |b| {
            b.iter_batched_ref(
                established,
                |server| {
                    server.handle_input(t0, black_box(&batch));
                    let mut n = 0;
                    while let Some(ev) = server.poll_event() {
                        n += matches!(ev, ConnEvent::Message { .. }) as usize;
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, codec_benches, engine_benches, conn_benches);
criterion_main!(benches);
