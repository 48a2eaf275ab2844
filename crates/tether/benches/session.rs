//! Message throughput with sessions on vs off: a `Client` streams messages to a `Server`
//! over loopback; each configuration runs several rounds, alternating, and the ratio of the
//! medians is printed.
//!
//! `cargo bench -p tether --bench session` (under `cargo test --all-targets` it runs a quick
//! smoke version).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether::{Client, ClientConfig, ClientEvent, Server, ServerConfig, ServerEvent};

async fn run(session: bool, size: usize, n: u64) -> f64 {
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
    let tx = client.sender();
    let msg = Bytes::from(vec![7u8; size]);
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(msg.clone()).await.unwrap();
        }
    });
    let mut got = 0;
    while got < n {
        if let Some(ServerEvent::Message { .. }) = srv.next_event().await {
            got += 1;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    sender.await.unwrap();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, scale) = if full { (7, 1) } else { (1, 100) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:>6}  {:>14}  {:>14}  {:>6}",
        "size", "off msg/s", "on msg/s", "on/off"
    );
    for (size, n) in [(64usize, 200_000u64), (4096, 50_000)] {
        let n = n / scale;
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            off.push(rt.block_on(run(false, size, n)));
            on.push(rt.block_on(run(true, size, n)));
        }
        let (off, on) = (median(off), median(on));
        println!("{size:>6}  {off:>14.0}  {on:>14.0}  {:>6.2}", on / off);
    }
}
