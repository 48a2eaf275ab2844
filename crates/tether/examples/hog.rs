//! Measures what one client that never reads does to an echo server and to everyone else
//! (issue 11 §2): run it against `tether serve --echo` and it prints the figures.
//!
//! ```text
//! cargo build --release -p tether-cli -p tether --example hog
//! target/release/tether serve --echo --http off 2> serve.log & SERVER=$!
//! target/release/examples/hog 127.0.0.1:7300 --server-pid $SERVER --seconds 30
//! grep hog serve.log          # the hog's disconnect reason: slow-consumer
//! ```
//!
//! While the hog sends 64 KiB messages and never reads (and comes back whenever it is closed): 8 clients measure their echo round
//! trip every 20 ms, a new client connects every second (time to WELCOME), and the server's
//! resident memory is sampled from `/proc`. At the end the server gets SIGTERM and the time
//! until it exits is measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tether::{Connection, Policy};
use tether_proto::codec::{self, Frame, Hello};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    server_pid: Option<u32>,
    seconds: u64,
}

fn args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        addr: it
            .next()
            .unwrap_or_else(|| "127.0.0.1:7300".into())
            .parse()?,
        server_pid: None,
        seconds: 30,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or("a flag without a value")?;
        match flag.as_str() {
            "--server-pid" => a.server_pid = Some(value.parse()?),
            "--seconds" => a.seconds = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(a)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn policy() -> Policy {
    Policy::builder(Duration::from_secs(30))
        .build()
        .expect("a valid policy")
}

/// One echo client: a round trip every 20 ms, recorded while `record` is set.
async fn echo_client(
    addr: SocketAddr,
    id: String,
    rtts: Arc<Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut c = Connection::connect(addr, &id, &policy())
        .await
        .map_err(|e| format!("{id}: {e}"))?;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut m = BytesMut::with_capacity(64);
        m.put_u64(i);
        m.resize(64, 0);
        let t = Instant::now();
        c.send(m.freeze())
            .await
            .map_err(|d| format!("{id}: {}", d.reason))?;
        let back = tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .map_err(|_| format!("{id}: no echo within 10 s"))?
            .map_err(|d| format!("{id}: {}", d.reason))?;
        if back.len() == 64 {
            rtts.lock().unwrap().push(t.elapsed());
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The hog: a raw tether client that sends 64 KiB messages as fast as the server takes
/// them and never reads; when its connection fails it comes back, until `stop`. Returns how
/// long each of its connections lasted.
async fn hog(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut lasted = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match hog_once(addr, &stop).await {
            Ok(d) => lasted.push(d),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    lasted
}

async fn hog_once(addr: SocketAddr, stop: &AtomicBool) -> Result<Duration, std::io::Error> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    codec::encode_preamble(&mut out);
    let hello = Hello {
        client_id: "hog".into(),
        requested_heartbeat: Duration::ZERO,
        want_session: false,
        resume: None,
        credential: None,
    };
    codec::encode(&Frame::Hello(hello), &mut out);
    s.write_all(&out).await?;
    let mut frame = BytesMut::new();
    codec::encode_data(&Bytes::from(vec![0x68u8; 64 * 1024]), &mut frame);
    let started = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) || s.write_all(&frame).await.is_err() {
            return Ok(started.elapsed());
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = Arc::new(Mutex::new(Vec::new()));
    let during = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (addr, stop) = (a.addr, stop.clone());
        let rtts = before.clone();
        clients.push(tokio::spawn(echo_client(
            addr,
            format!("echo{i}"),
            rtts,
            stop,
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = std::mem::take(&mut *before.lock().unwrap());
    // Re-point the clients' samples: a fresh set of 8 records "during".
    stop.store(true, Ordering::Relaxed);
    for c in clients.drain(..) {
        c.await??;
    }
    stop.store(false, Ordering::Relaxed);
    for i in 0..8 {
        let (addr, stop) = (a.addr, stop.clone());
        let rtts = during.clone();
        clients.push(tokio::spawn(echo_client(
            addr,
            format!("echo{i}"),
            rtts,
            stop,
        )));
    }
    let hog_stop = Arc::new(AtomicBool::new(false));
    let hog_task = tokio::spawn(hog(a.addr, hog_stop.clone()));
    let mut connects = Vec::new();
    let mut rss_max = 0;
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        let c = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(a.addr, &format!("newcomer{n}"), &policy()),
        )
        .await;
        n += 1;
        match c {
            Ok(Ok(_)) => connects.push(t.elapsed()),
            Ok(Err(e)) => println!("newcomer could not connect: {e}"),
            Err(_) => println!("newcomer: no WELCOME within 10 s"),
        }
        if let Some(kib) = a.server_pid.and_then(rss_kib) {
            rss_max = rss_max.max(kib);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = 0;
    for c in clients {
        if let Err(e) = c.await? {
            println!("echo client failed: {e}");
            failures += 1;
        }
    }
    hog_stop.store(true, Ordering::Relaxed);
    let lasted = hog_task.await?;
    // The last one was ended by us, not by the server.
    let closed = &lasted[..lasted.len().saturating_sub(1)];
    let hog_closed = format!(
        "closed by the server {} times, each after {:.1}..{:.1} s (it reconnected each time)",
        closed.len(),
        closed
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
        closed
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
    );
    let mut base = baseline;
    let mut dur = std::mem::take(&mut *during.lock().unwrap());
    println!(
        "echo round trip without the hog: n={} p50={:?} p99={:?}",
        base.len(),
        pct(&mut base, 50),
        pct(&mut base, 99)
    );
    println!(
        "echo round trip with the hog ({} s): n={} p50={:?} p99={:?} max={:?}; {failures} echo clients failed",
        a.seconds,
        dur.len(),
        pct(&mut dur, 50),
        pct(&mut dur, 99),
        dur.iter().max().copied().unwrap_or_default()
    );
    println!(
        "new clients: {} of {n} connected, slowest {:?}",
        connects.len(),
        connects.iter().max().copied().unwrap_or_default()
    );
    println!("the hog: {hog_closed}");
    if let Some(pid) = a.server_pid {
        println!("server RSS peak: {} MiB", rss_max / 1024);
        let t = Instant::now();
        // SAFETY: kill(2) with a pid given on the command line and a valid signal.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if rc == 0 {
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && t.elapsed() < Duration::from_secs(30)
            {
                // A zombie (not yet reaped by its parent) counts as exited.
                let state =
                    std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if state.split_whitespace().nth(2) == Some("Z") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            println!("SIGTERM → exit in {:?}", t.elapsed());
        }
    }
    Ok(())
}
