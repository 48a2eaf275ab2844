//! Benchmark (not a test): throughput of one connection through `tether tunnel` (entry →
//! exit, sessions on) against a direct loopback connection and against `socat` forwarding
//! the same connection (issue 17, target 5: the tunnel ≥ socat).
//!
//! ```text
//! cargo bench -p tether --bench tunnel                      # 256 MiB, 5 rounds
//! TUNNEL_BENCH_MB=512 TUNNEL_BENCH_ROUNDS=7 cargo bench -p tether --bench tunnel
//! TUNNEL_BENCH_PATHS=tunnel cargo bench -p tether --bench tunnel   # one path (profiling)
//! TUNNEL_BENCH_WORKERS=2 cargo bench -p tether --bench tunnel      # workers per runtime (1)
//! ```
//!
//! ```text
//!  direct   program ──────────────────────────────────────────▶ sink
//!  socat    program ──▶ socat ─────────────────────────────────▶ sink
//!           (as installed: 8 KiB buffer; and `socat-256k`: `-b 262144`)
//!  socat-2hops  program ──▶ socat ──▶ socat ─────────────────────▶ sink   (both -b 262144:
//!           the tunnel's shape, two relays and three TCP connections, without its guarantees)
//!  tunnel   program ──▶ entry ══ tether session ══▶ exit ──────▶ sink
//! ```
//!
//! Two modes, each a fresh connection per run: **one way** (the program writes
//! `TUNNEL_BENCH_MB` MiB in 256 KiB writes and half-closes; timed until the sink has read the
//! last byte) and **both ways** (the program and the server each write that much at once and
//! half-close; timed until both have read EOF; the figure counts both directions). Every run
//! checks the byte counts, and the tunnel's connections must end `closed`. The paths take
//! turns within each round (the order rotates), so load from elsewhere hits all of them;
//! printed: median, lowest and highest MiB/s per path, and tunnel/socat of the medians; then
//! the same for CPU time per MiB moved (user + system of this process, whose threads are the
//! programs and the tunnel's two runtimes, plus the socat processes and their per-connection
//! children, from `/proc`, 10 ms ticks): the figure that still means something on a loaded
//! machine, measured around each run so the paths take turns for it too.
//!
//! The programs are blocking std threads; the entry and the exit each run on their own tokio
//! runtime with `TUNNEL_BENCH_WORKERS` workers, by default 1 as `tether tunnel` runs
//! (`--workers`), as two `tether tunnel` processes would; socat is a child process.
//! Everything shares the machine's cores, so read the ratios, measured in the same run.
//! Under `cargo test --benches` (scripts/test) one quick pass with 4 MiB checks that every
//! path works, no timing.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{
    env_or, load, mib_per_s, one_way, read_all, send_all, serve, spawn_server, start_socat_with,
};
use tether::tunnel::{EntryConfig, ExitConfig, TunnelEntry, TunnelEvent, TunnelExit};

/// A server that, per connection, writes `bytes` and reads to EOF at once; reports what it
/// read and when both were done.
fn spawn_both_server(bytes: u64) -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    serve(move |mut s| {
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || send_all(&mut w, bytes));
        let got = read_all(&mut s).unwrap_or(0);
        // A readiness probe (socat's) closes at once: writing to it fails.
        let _ = writer.join();
        got
    })
}

/// One connection that writes `bytes` and reads `bytes` at once; MiB/s of both directions
/// together, until both ends have read EOF.
fn both_ways(target: SocketAddr, done: &mpsc::Receiver<(u64, Instant)>, bytes: u64) -> f64 {
    let mut c = TcpStream::connect(target).unwrap();
    let _ = c.set_nodelay(true);
    let t0 = Instant::now();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || send_all(&mut w, bytes));
    let got = read_all(&mut c).unwrap();
    let ours = Instant::now();
    writer.join().unwrap().unwrap();
    let (theirs, at) = done.recv().unwrap();
    assert_eq!((got, theirs), (bytes, bytes), "bytes lost");
    mib_per_s(2 * bytes, ours.max(at) - t0)
}

/// An exit to `target` and an entry to it, each on its own runtime. Tunnelled connections
/// that end in any way but `closed` are counted in `failures`.
struct Tunnel {
    addr: SocketAddr,
    _rts: [tokio::runtime::Runtime; 2],
}

fn start_tunnel(target: SocketAddr, failures: &Arc<AtomicUsize>, workers: usize) -> Tunnel {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    };
    let (rx, re) = (runtime(), runtime());
    let relay = rx.block_on(async {
        let mut cfg = ExitConfig::new("127.0.0.1:0".parse().unwrap(), target);
        cfg.server = cfg.server.session_linger(Some(Duration::from_secs(30)));
        let mut exit = TunnelExit::bind(cfg).await.unwrap();
        let relay = exit.local_addr();
        let failures = failures.clone();
        tokio::spawn(async move {
            while let Some(ev) = exit.next_event().await {
                note(ev, &failures);
            }
        });
        relay
    });
    let addr = re.block_on(async {
        let cfg = EntryConfig::new("127.0.0.1:0".parse().unwrap(), relay);
        let mut entry = TunnelEntry::bind(cfg).await.unwrap();
        let addr = entry.local_addr();
        let failures = failures.clone();
        tokio::spawn(async move {
            while let Some(ev) = entry.next_event().await {
                note(ev, &failures);
            }
        });
        addr
    });
    Tunnel {
        addr,
        _rts: [rx, re],
    }
}

/// Counts a tunnelled connection that ended in any way but `closed`.
fn note(ev: TunnelEvent, failures: &AtomicUsize) {
    if let TunnelEvent::Closed { id, end, .. } = ev {
        if end.is_failure() {
            eprintln!("tunnel {id} ended {end}");
            failures.fetch_add(1, Relaxed);
        }
    }
}

/// One path of the benchmark: where the program connects for each mode.
struct Path {
    name: &'static str,
    one_way: SocketAddr,
    both: SocketAddr,
    /// MiB/s per round: one way, both ways.
    figures: [Vec<f64>; 2],
    /// CPU milliseconds per MiB moved, per round: one way, both ways.
    cpu: [Vec<f64>; 2],
}

/// CPU time (user + system, milliseconds) of this process (every thread: the programs and
/// the tunnel's runtimes) and of the socat processes with their reaped per-connection
/// children, from `/proc` (clock ticks of 10 ms).
fn cpu_ms(socats: &[u32]) -> f64 {
    let ticks = |pid: &str, fields: usize| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0;
        };
        // After the command name: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
        rest.split_whitespace()
            .skip(11)
            .take(fields)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum()
    };
    let total = ticks("self", 2) + socats.iter().map(|p| ticks(&p.to_string(), 4)).sum::<u64>();
    total as f64 * 10.0
}

/// Runs `f`, returning its result and the CPU milliseconds spent meanwhile per MiB of
/// `bytes`; waits a little after it for socat to reap its per-connection child.
fn with_cpu(socats: &[u32], bytes: u64, f: impl FnOnce() -> f64) -> (f64, f64) {
    let before = cpu_ms(socats);
    let r = f();
    std::thread::sleep(Duration::from_millis(100));
    (
        r,
        (cpu_ms(socats) - before) / (bytes as f64 / (1 << 20) as f64),
    )
}

fn main() {
    let quick = common::quick();
    let mb = env_or("TUNNEL_BENCH_MB", if quick { 4 } else { 256 });
    let rounds = env_or("TUNNEL_BENCH_ROUNDS", if quick { 1 } else { 5 }).max(1);
    let only = std::env::var("TUNNEL_BENCH_PATHS").unwrap_or_default();
    let bytes = (mb as u64) << 20;
    let failures = Arc::new(AtomicUsize::new(0));

    let (sink, sink_done) = spawn_server(false);
    let (both, both_done) = spawn_both_server(bytes);
    let mut paths = vec![Path {
        name: "direct",
        one_way: sink,
        both,
        figures: Default::default(),
        cpu: Default::default(),
    }];
    // socat as installed (8 KiB buffer), and with a 256 KiB buffer (what the programs write).
    let socats = [("socat", &[][..]), ("socat-256k", &["-b", "262144"][..])].map(|(name, opts)| {
        let pair = (start_socat_with(sink, opts), start_socat_with(both, opts));
        (name, pair)
    });
    for (name, pair) in &socats {
        match pair {
            (Some((a, _)), Some((b, _))) => {
                // Discard the readiness probes' (empty) reports.
                let _ = sink_done.recv_timeout(Duration::from_secs(2));
                let _ = both_done.recv_timeout(Duration::from_secs(2));
                paths.push(Path {
                    name,
                    one_way: *a,
                    both: *b,
                    figures: Default::default(),
                    cpu: Default::default(),
                });
            }
            _ => eprintln!("socat not found: skipping {name} (apt-get install -y socat)"),
        }
    }
    // Two socat hops in a row (-b 256k): the tunnel's shape (two relays, three TCP
    // connections) without its guarantees.
    let chain = socats[1]
        .1
         .0
        .as_ref()
        .zip(socats[1].1 .1.as_ref())
        .and_then(|(a, b)| {
            let first = (
                start_socat_with(a.0, &["-b", "262144"])?,
                start_socat_with(b.0, &["-b", "262144"])?,
            );
            let _ = sink_done.recv_timeout(Duration::from_secs(2));
            let _ = both_done.recv_timeout(Duration::from_secs(2));
            paths.push(Path {
                name: "socat-2hops",
                one_way: first.0 .0,
                both: first.1 .0,
                figures: Default::default(),
                cpu: Default::default(),
            });
            Some(first)
        });
    let workers = env_or("TUNNEL_BENCH_WORKERS", 1).max(1);
    let tunnels = (
        start_tunnel(sink, &failures, workers),
        start_tunnel(both, &failures, workers),
    );
    paths.push(Path {
        name: "tunnel",
        one_way: tunnels.0.addr,
        both: tunnels.1.addr,
        figures: Default::default(),
        cpu: Default::default(),
    });
    if !only.is_empty() {
        paths.retain(|p| only.split(',').any(|o| o == p.name));
    }

    println!(
        "tunnel benchmark: {mb} MiB per direction per run, {rounds} rounds, paths interleaved; \
         load {} at the start",
        load()
    );
    let mut socat_pids: Vec<u32> = socats
        .iter()
        .flat_map(|(_, (a, b))| [a, b])
        .filter_map(|s| s.as_ref().map(|(_, s)| s.pid()))
        .collect();
    if let Some((a, b)) = &chain {
        socat_pids.extend([a.1.pid(), b.1.pid()]);
    }
    for round in 0..rounds {
        let n = paths.len();
        for i in 0..n {
            let p = &mut paths[(i + round) % n];
            let (mbs, cpu) = with_cpu(&socat_pids, bytes, || one_way(p.one_way, &sink_done, bytes));
            p.figures[0].push(mbs);
            p.cpu[0].push(cpu);
            let (mbs, cpu) = with_cpu(&socat_pids, 2 * bytes, || {
                both_ways(p.both, &both_done, bytes)
            });
            p.figures[1].push(mbs);
            p.cpu[1].push(cpu);
        }
    }
    assert_eq!(failures.load(Relaxed), 0, "a tunnelled connection failed");
    if quick {
        println!("test mode: every path moved {mb} MiB each way; no figures");
        return;
    }
    println!(
        "{:<8} {:>22} {:>22}",
        "MiB/s", "one way: median (range)", "both ways: median (range)"
    );
    let cell = |v: &[f64]| {
        let (m, lo, hi) = common::spread(v);
        format!("{m:.0} ({lo:.0}-{hi:.0})")
    };
    for p in &paths {
        println!(
            "{:<8} {:>22} {:>22}",
            p.name,
            cell(&p.figures[0]),
            cell(&p.figures[1])
        );
    }
    let median = |name: &str, k: usize| {
        paths
            .iter()
            .find(|p| p.name == name)
            .map(|p| common::spread(&p.figures[k]).0)
    };
    for (k, mode) in ["one way", "both ways"].iter().enumerate() {
        for socat in ["socat", "socat-256k", "socat-2hops"] {
            if let (Some(t), Some(s)) = (median("tunnel", k), median(socat, k)) {
                println!("tunnel/{socat} {mode}: {:.2}x", t / s);
            }
        }
    }
    println!(
        "{:<8} {:>22} {:>22}",
        "CPU ms/MiB", "one way: median (range)", "both ways: median (range)"
    );
    let cell2 = |v: &[f64]| {
        let (m, lo, hi) = common::spread(v);
        format!("{m:.2} ({lo:.2}-{hi:.2})")
    };
    for p in &paths {
        println!(
            "{:<8} {:>22} {:>22}",
            p.name,
            cell2(&p.cpu[0]),
            cell2(&p.cpu[1])
        );
    }
    let cpu_median = |name: &str, k: usize| {
        paths
            .iter()
            .find(|p| p.name == name)
            .map(|p| common::spread(&p.cpu[k]).0)
    };
    for (k, mode) in ["one way", "both ways"].iter().enumerate() {
        for socat in ["socat-256k", "socat-2hops"] {
            if let (Some(t), Some(s)) = (cpu_median("tunnel", k), cpu_median(socat, k)) {
                println!("CPU per MiB tunnel/{socat} {mode}: {:.2}x", t / s);
            }
        }
    }
    println!("load {} at the end", load());
    drop(chain);
}
