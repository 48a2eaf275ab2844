//! Message throughput with sessions on vs off, client to server over loopback.
//!
//! `cargo bench -p tether --bench session -- --warm-up-time 1 --measurement-time 5`
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tether::{Client, ClientConfig, ClientEvent, Server, ServerConfig, ServerEvent};

const BATCH: u64 = 20_000;

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("session_throughput");
    for size in [64usize, 4096] {
        g.throughput(Throughput::Elements(BATCH));
        for session in [false, true] {
            let name = if session {
                "sessions-on"
            } else {
                "sessions-off"
            };
            g.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
                            .session_linger(session.then_some(Duration::from_secs(30)));
                        let mut srv = Server::bind(cfg).await.unwrap();
                        let mut ccfg = ClientConfig::new(srv.local_addr(), "bench");
                        ccfg.session = session;
                        let mut client = Client::start(ccfg);
                        assert!(matches!(
                            client.next_event().await,
                            Some(ClientEvent::Connected { .. })
                        ));
                        let msg = Bytes::from(vec![7u8; size]);
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let tx = client.sender();
                            let m = msg.clone();
                            let start = Instant::now();
                            let sending = tokio::spawn(async move {
                                for _ in 0..BATCH {
                                    tx.send(m.clone()).await.unwrap();
                                }
                            });
                            let mut n = 0;
                            while n < BATCH {
                                if let Some(ServerEvent::Message { .. }) = srv.next_event().await {
                                    n += 1;
                                }
                            }
                            total += start.elapsed();
                            sending.await.unwrap();
                        }
                        drop(client);
                        total
                    })
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
