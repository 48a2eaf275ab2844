//! Loopback echo: tether `Connection` against plain tokio + `LengthDelimitedCodec`, same
//! machine, same runtime (current-thread, so the figures are CPU cost per message rather than
//! scheduler luck on a shared box).
//!
//! - `latency`: one message in flight, round trip.
//! - `pipelined`: a window of messages in flight (about 1 MiB, at most 1000 messages);
//!   reported per message.
//! - `stream` (profile runs only): `tether bench echo`'s throughput shape, one task sending
//!   every message back to back while another receives them (no window); with
//!   `ECHO_WORKERS=2` on a multi-threaded runtime of two workers, as that command runs it.
//! - `server` (profile runs only, see [`profile`]): the same client against a [`Server`]
//!   whose application echoes each [`ServerEvent::Message`] with [`ServerHandle::send`]:
//!   the server's per-message path (events, client ids, sends by id), not the standalone
//!   `Connection`'s.
//!
//! `cargo bench -p tether --bench echo -- --warm-up-time 1 --measurement-time 3`
//!
//! For profilers, one fixed run without criterion (see [`profile`]):
//! `ECHO_PROFILE=tether:pipelined:64:20000 valgrind --tool=callgrind target/release/deps/echo-*`

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use futures::{FutureExt, SinkExt, StreamExt};
use tether::{Connection, Policy, Server, ServerConfig, ServerEvent};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const SIZES: [usize; 2] = [64, 4096];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn window(size: usize) -> u64 {
    ((1usize << 20) / size).min(1000) as u64
}

/// A tether echo server on loopback; returns a connected client.
async fn tether_pair() -> Connection {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut conn, _hello) = Connection::accept(stream, &Policy::default())
            .await
            .unwrap();
        while let Ok(m) = conn.recv().await {
            if conn.send(m).await.is_err() {
                break;
            }
        }
    });
    Connection::connect(addr, "bench", &Policy::default())
        .await
        .unwrap()
}

/// A [`Server`] on loopback whose application echoes every message with
/// [`ServerHandle::send`](tether::ServerHandle::send); returns a connected client.
async fn server_pair() -> Connection {
    let mut server = Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = server.local_addr();
    tokio::spawn(async move {
        let handle = server.handle();
        while let Some(ev) = server.next_event().await {
            if let ServerEvent::Message { client_id, msg, .. } = ev {
                if handle.send(&client_id, msg).await.is_err() {
                    break;
                }
            }
        }
    });
    Connection::connect(addr, "bench", &Policy::default())
        .await
        .unwrap()
}

type Plain = Framed<TcpStream, LengthDelimitedCodec>;

/// A length-delimited echo server on loopback; returns a connected client.
async fn plain_pair() -> Plain {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sink, stream) = Framed::new(stream, LengthDelimitedCodec::new()).split();
        // `forward` feeds and flushes only when the input has nothing ready: batched writes,
        // like tether's driver.
        let _ = stream.map(|m| m.map(|b| b.freeze())).forward(sink).await;
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    Framed::new(stream, LengthDelimitedCodec::new())
}

async fn tether_latency(c: &mut Connection, msg: &Bytes, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        c.send(msg.clone()).await.unwrap();
        let back = c.recv().await.unwrap();
        debug_assert_eq!(back.len(), msg.len());
    }
    start.elapsed()
}

async fn plain_latency(c: &mut Plain, msg: &Bytes, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        c.send(msg.clone()).await.unwrap();
        let back = c.next().await.unwrap().unwrap();
        debug_assert_eq!(back.len(), msg.len());
    }
    start.elapsed()
}

async fn tether_pipelined(c: &mut Connection, msg: &Bytes, iters: u64, w: u64) -> Duration {
    let start = Instant::now();
    let mut in_flight = 0;
    for _ in 0..iters {
        c.send(msg.clone()).await.unwrap();
        in_flight += 1;
        if in_flight >= w {
            c.recv().await.unwrap();
            in_flight -= 1;
        }
    }
    for _ in 0..in_flight {
        c.recv().await.unwrap();
    }
    start.elapsed()
}

async fn plain_pipelined(c: &mut Plain, msg: &Bytes, iters: u64, w: u64) -> Duration {
    // Batched like tether's driver: fill the window, flush once, then take every reply that
    // is already decoded before refilling (a flush per message would cost a syscall each and
    // make the baseline look worse than it is).
    let start = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    while received < iters {
        while sent < iters && sent - received < w {
            c.feed(msg.clone()).await.unwrap();
            sent += 1;
        }
        SinkExt::<Bytes>::flush(c).await.unwrap();
        c.next().await.unwrap().unwrap();
        received += 1;
        while received < sent {
            match c.next().now_or_never() {
                Some(Some(Ok(_))) => received += 1,
                _ => break,
            }
        }
    }
    start.elapsed()
}

/// `tether bench echo`'s throughput shape: a writer task sends all `n` messages while this
/// task receives them.
async fn tether_stream(mut c: Connection, msg: &Bytes, n: u64) -> Duration {
    let tx = c.sender();
    let start = Instant::now();
    let writer = tokio::spawn({
        let msg = msg.clone();
        async move {
            for _ in 0..n {
                tx.send(msg.clone()).await.unwrap();
            }
        }
    });
    for _ in 0..n {
        c.recv().await.unwrap();
    }
    let took = start.elapsed();
    writer.await.unwrap();
    took
}

/// The same for the baseline: the writer flushes every 64 messages (as `tether bench echo`).
async fn plain_stream(c: Plain, msg: &Bytes, n: u64) -> Duration {
    let (mut tx, mut rx) = c.split();
    let start = Instant::now();
    let writer = tokio::spawn({
        let msg = msg.clone();
        async move {
            for i in 0..n {
                tx.feed(msg.clone()).await.unwrap();
                if i % 64 == 63 {
                    tx.flush().await.unwrap();
                }
            }
            tx.flush().await.unwrap();
            tx
        }
    });
    for _ in 0..n {
        rx.next().await.unwrap().unwrap();
    }
    let took = start.elapsed();
    drop(writer.await.unwrap().reunite(rx));
    took
}

fn echo(cr: &mut Criterion) {
    let rt = runtime();
    let mut tether = rt.block_on(tether_pair());
    let mut plain = rt.block_on(plain_pair());
    for size in SIZES {
        let msg = Bytes::from(vec![0x5au8; size]);
        let mut g = cr.benchmark_group(format!("echo_latency_{size}B"));
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter("tether"), |b| {
            b.iter_custom(|iters| rt.block_on(tether_latency(&mut tether, &msg, iters)))
        });
        g.bench_function(BenchmarkId::from_parameter("length_delimited"), |b| {
            b.iter_custom(|iters| rt.block_on(plain_latency(&mut plain, &msg, iters)))
        });
        g.finish();

        let w = window(size);
        let mut g = cr.benchmark_group(format!("echo_pipelined_{size}B"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::from_parameter("tether"), |b| {
            b.iter_custom(|iters| rt.block_on(tether_pipelined(&mut tether, &msg, iters, w)))
        });
        g.bench_function(BenchmarkId::from_parameter("length_delimited"), |b| {
            b.iter_custom(|iters| rt.block_on(plain_pipelined(&mut plain, &msg, iters, w)))
        });
        g.finish();
    }
}

criterion_group!(benches, echo);

/// One fixed run for profilers (`valgrind --tool=callgrind`, `perf`), bypassing criterion:
/// `ECHO_PROFILE=<tether|plain|server>:<latency|pipelined|stream>:<size>:<messages>` runs that
/// scenario once and prints the wall time per message (`server`: a tether client against a
/// [`Server`] that echoes through its events and `ServerHandle::send`).
fn profile(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [imp, mode, size, n] = parts[..] else {
        panic!("ECHO_PROFILE=<tether|plain|server>:<latency|pipelined|stream>:<size>:<messages>");
    };
    let size: usize = size.parse().expect("size");
    let n: u64 = n.parse().expect("messages");
    let msg = Bytes::from(vec![0x5au8; size]);
    let rt = match std::env::var("ECHO_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
    {
        Some(w) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(w)
            .enable_all()
            .build()
            .expect("runtime"),
        None => runtime(),
    };
    let took = rt.block_on(async {
        match (imp, mode) {
            ("tether", "latency") => tether_latency(&mut tether_pair().await, &msg, n).await,
            ("tether", "pipelined") => {
                tether_pipelined(&mut tether_pair().await, &msg, n, window(size)).await
            }
            ("server", "latency") => tether_latency(&mut server_pair().await, &msg, n).await,
            ("server", "pipelined") => {
                tether_pipelined(&mut server_pair().await, &msg, n, window(size)).await
            }
            ("tether", "stream") => tether_stream(tether_pair().await, &msg, n).await,
            ("server", "stream") => tether_stream(server_pair().await, &msg, n).await,
            ("plain", "stream") => plain_stream(plain_pair().await, &msg, n).await,
            ("plain", "latency") => plain_latency(&mut plain_pair().await, &msg, n).await,
            ("plain", "pipelined") => {
                plain_pipelined(&mut plain_pair().await, &msg, n, window(size)).await
            }
            _ => panic!("unknown scenario {spec}"),
        }
    });
    println!("{spec}: {:?} per message", took / n as u32);
}

fn main() {
    if let Ok(spec) = std::env::var("ECHO_PROFILE") {
        profile(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
