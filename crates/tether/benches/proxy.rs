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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether::proxy::{CopyMode, Proxy, ProxyConfig};
use tether::Policy;

const CHUNK: usize = 256 * 1024;
const MSG: usize = 64;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A server that, per connection, either discards everything (reporting the count) or echoes.
fn spawn_server(echo: bool) -> (SocketAddr, std::sync::mpsc::Receiver<(u64, Instant)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            if echo && s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send((total, Instant::now()));
            });
        }
    });
    (addr, rx)
}

fn throughput(
    target: SocketAddr,
    done: &std::sync::mpsc::Receiver<(u64, Instant)>,
    bytes: u64,
) -> f64 {
    let mut best = 0f64;
    let chunk = vec![0x5au8; CHUNK];
    for _ in 0..3 {
        let mut c = TcpStream::connect(target).unwrap();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            c.write_all(&chunk[..n]).unwrap();
            sent += n as u64;
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let (got, at) = done.recv().unwrap();
        assert_eq!(got, bytes, "bytes lost");
        let secs = (at - t0).as_secs_f64();
        best = best.max(bytes as f64 / secs / (1 << 20) as f64);
    }
    best
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

struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_socat(upstream: SocketAddr) -> Option<(SocketAddr, Socat)> {
    let port = free_port();
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},reuseaddr,fork"))
        .arg(format!("TCP:{upstream}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let guard = Socat(child);
    for _ in 0..100 {
        if TcpStream::connect(addr).is_ok() {
            // That probe connection reached the upstream; harmless for both servers.
            return Some((addr, guard));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
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
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
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
