//! Benchmark (not a test): `tether::proxy` throughput and added latency against a direct
//! loopback connection and against `socat` doing the same forwarding
//! (`socat TCP-LISTEN:port,reuseaddr,fork TCP:127.0.0.1:up`).
//!
//! ```text
//! cargo bench -p tether --bench proxy                 # all paths, defaults below
//! PROXY_BENCH_MB=512 PROXY_BENCH_RTTS=50000 cargo bench -p tether --bench proxy
//! ```
//!
//! Throughput: one connection, the client writes `PROXY_BENCH_MB` MiB in 256 KiB writes, the
//! server reads and discards; timed until the server has read the last byte; best of 3.
//! Latency: one connection, 64-byte ping-pong `PROXY_BENCH_RTTS` times after 1000 warm-up
//! rounds; p50 and p99 of the round trip. Client and server are blocking std threads; the
//! proxy runs on a tokio multi-thread runtime in this process (as `tether proxy` does);
//! socat is a child process. Everything shares the same cores, so absolute figures depend on
//! the machine: read the ratios.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{env_or, one_way, spawn_server, start_socat};
use tether::proxy::{CopyMode, Proxy, ProxyConfig};
use tether::Policy;

const MSG: usize = 64;

fn throughput(
    target: SocketAddr,
    done: &std::sync::mpsc::Receiver<(u64, Instant)>,
    bytes: u64,
) -> f64 {
    (0..3)
        .map(|_| one_way(target, done, bytes))
        .fold(0f64, f64::max)
}

fn latency(target: SocketAddr, rounds: usize) -> (Duration, Duration) {
    let mut c = TcpStream::connect(target).unwrap();
    c.set_nodelay(true).unwrap();
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + 1000 {
        let t0 = Instant::now();
        c.write_all(&msg).unwrap();
        c.read_exact(&mut back).unwrap();
        if i >= 1000 {
            samples.push(t0.elapsed());
        }
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    (pct(0.50), pct(0.99))
}

fn start_proxy(rt: &tokio::runtime::Runtime, upstream: SocketAddr, copy: CopyMode) -> SocketAddr {
    rt.block_on(async {
        let cfg = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), upstream)
            .policy(Policy::default())
            .copy(copy);
        let p = Proxy::bind(cfg).await.unwrap();
        let addr = p.local_addr();
        tokio::spawn(p.run(|_| {}));
        addr
    })
}

fn main() {
    let quick = common::quick();
    let mb = env_or("PROXY_BENCH_MB", if quick { 8 } else { 256 });
    let rounds = env_or("PROXY_BENCH_RTTS", if quick { 500 } else { 20_000 });
    let bytes = (mb as u64) << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let (sink, sink_done) = spawn_server(false);
    let (echo, _echo_done) = spawn_server(true);
    let mut paths: Vec<(&str, SocketAddr, SocketAddr)> = vec![("direct", sink, echo)];
    let splice = (
        start_proxy(&rt, sink, CopyMode::Splice),
        start_proxy(&rt, echo, CopyMode::Splice),
    );
    let buffer = (
        start_proxy(&rt, sink, CopyMode::Buffer),
        start_proxy(&rt, echo, CopyMode::Buffer),
    );
    paths.push(("tether proxy (splice)", splice.0, splice.1));
    paths.push(("tether proxy (buffer)", buffer.0, buffer.1));
    let socat_sink = start_socat(sink);
    let socat_echo = start_socat(echo);
    match (&socat_sink, &socat_echo) {
        (Some((a, _)), Some((b, _))) => {
            // Discard the readiness probe's (empty) report from the sink server.
            let _ = sink_done.recv_timeout(Duration::from_secs(2));
            paths.push(("socat", *a, *b));
        }
        _ => eprintln!("socat not found: skipping it (apt-get install -y socat)"),
    }

    println!(
        "proxy benchmark: {mb} MiB one-way per run (best of 3), {rounds} round trips of {MSG} B"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "path", "MiB/s", "p50 rtt", "p99 rtt", "vs direct"
    );
    let mut direct = None;
    for (name, tput_addr, echo_addr) in paths {
        // PROXY_BENCH_MB=0 measures latency only.
        let tput = if bytes == 0 {
            f64::NAN
        } else {
            throughput(tput_addr, &sink_done, bytes)
        };
        let (p50, p99) = latency(echo_addr, rounds);
        let rel = match direct {
            None => {
                direct = Some((tput, p50, p99));
                "1.00x".to_owned()
            }
            Some((t, _, _)) => format!("{:.2}x", tput / t),
        };
        println!(
            "{name:<24} {tput:>10.0} {:>8.1}us {:>8.1}us {rel:>10}",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        if let Some((_, d50, d99)) = direct {
            if name != "direct" {
                println!(
                    "{:<24} added latency p50 {:+.1}us, p99 {:+.1}us",
                    "",
                    (p50.as_secs_f64() - d50.as_secs_f64()) * 1e6,
                    (p99.as_secs_f64() - d99.as_secs_f64()) * 1e6
                );
            }
        }
    }
}
