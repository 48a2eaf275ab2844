//! What the forwarding benchmarks (`proxy`, `tunnel`) share: blocking loopback servers, a
//! `socat` forwarder to compare against, and the statistics of several rounds.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes per read and per write of the blocking programs.
pub const CHUNK: usize = 256 * 1024;

/// `name` from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `cargo bench` passes `--bench`; `cargo test --benches` (scripts/test) runs the target
/// without it: one quick pass then.
pub fn quick() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// A server that runs `handle` on each connection in a thread of its own and reports what
/// it returned (the bytes it read) and when it returned.
pub fn serve(
    handle: impl Fn(TcpStream) -> u64 + Clone + Send + 'static,
) -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let (tx, handle) = (tx.clone(), handle.clone());
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let got = handle(s);
                let _ = tx.send((got, Instant::now()));
            });
        }
    });
    (addr, rx)
}

/// A server that, per connection, either discards everything (reporting the count and the
/// instant of EOF) or echoes.
pub fn spawn_server(echo: bool) -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    serve(move |mut s| {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    total += n as u64;
                    if echo && s.write_all(&buf[..n]).is_err() {
                        return total;
                    }
                }
            }
        }
    })
}

/// Writes `bytes` in [`CHUNK`] writes, then half-closes.
pub fn send_all(s: &mut TcpStream, bytes: u64) -> std::io::Result<()> {
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
}

/// Reads to EOF; the count.
pub fn read_all(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// One connection to `target` (a [`spawn_server`] sink) that writes `bytes`; MiB/s until the
/// sink read the last byte.
pub fn one_way(target: SocketAddr, done: &mpsc::Receiver<(u64, Instant)>, bytes: u64) -> f64 {
    let mut c = TcpStream::connect(target).unwrap();
    let t0 = Instant::now();
    send_all(&mut c, bytes).unwrap();
    let (got, at) = done.recv().unwrap();
    assert_eq!(got, bytes, "bytes lost");
    mib_per_s(bytes, at - t0)
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
}

/// Kills the `socat` child when dropped.
pub struct Socat(Child);

impl Socat {
    /// The listening socat's process id (its forked per-connection children are counted in
    /// its `cutime`/`cstime` once reaped).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `socat -t 30 TCP-LISTEN:port,reuseaddr,fork TCP:upstream`, once it accepts. Its readiness
/// probe reaches the upstream as an empty connection. `None` when socat is not installed.
/// (`-t 30`: after one direction's EOF socat forwards the other one for 30 s, not its
/// default 0.5 s, which would cut a two-way transfer whose directions end apart.)
pub fn start_socat(upstream: SocketAddr) -> Option<(SocketAddr, Socat)> {
    start_socat_with(upstream, &[])
}

/// [`start_socat`] with more options before the addresses (e.g. `-b 262144`).
pub fn start_socat_with(upstream: SocketAddr, opts: &[&str]) -> Option<(SocketAddr, Socat)> {
    let port = free_port();
    let child = Command::new("socat")
        .args(["-t", "30"])
        .args(opts)
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
            return Some((addr, guard));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Median, lowest and highest of `v` (not empty).
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// The machine's load averages (1, 5, 15 min), as `uptime` prints them.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
