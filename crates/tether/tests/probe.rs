//! `tether probe` over loopback against a real `Server`, through an in-process userspace
//! proxy that forgets flows idle for `T` or longer (like conntrack with loose pickup off) and
//! then drops their packets silently or resets whoever sends next, and can blackhole
//! everything.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tether::probe::{self, Direction, Expiry, ProbeConfig};
use tether::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
enum AtExpiry {
    Drop,
    Reset,
}

struct Proxy {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
}

async fn server() -> Server {
    Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap()
}

/// A proxy to `upstream` that forgets a flow once it has been idle (no byte either way) for
/// `timeout`: the first byte after that is dropped with everything after it (`Drop`), or
/// the side that sent it is reset (`Reset`, like `ct state invalid reject with tcp reset`).
async fn proxy(upstream: SocketAddr, timeout: Duration, at_expiry: AtExpiry) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let blackhole = Arc::new(AtomicBool::new(false));
    let bh = blackhole.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let bh = bh.clone();
            tokio::spawn(async move {
                let Ok(u) = TcpStream::connect(upstream).await else {
                    return;
                };
                flow(c, u, timeout, at_expiry, bh).await;
            });
        }
    });
    Proxy { addr, blackhole }
}

async fn flow(
    c: TcpStream,
    u: TcpStream,
    timeout: Duration,
    at_expiry: AtExpiry,
    blackhole: Arc<AtomicBool>,
) {
    let mut c = Some(c);
    let mut u = Some(u);
    let mut last = Instant::now();
    let mut expired = false;
    let (mut bc, mut bu) = ([0u8; 4096], [0u8; 4096]);
    loop {
        // Read from whichever side is still there.
        let (from_client, n) = tokio::select! {
            r = async { c.as_mut().unwrap().read(&mut bc).await }, if c.is_some() => (true, r),
            r = async { u.as_mut().unwrap().read(&mut bu).await }, if u.is_some() => (false, r),
            else => return,
        };
        let n = match n {
            // Once the flow is forgotten, a close on one side does not reach the other.
            Ok(0) | Err(_) if expired => {
                if from_client {
                    c = None;
                } else {
                    u = None;
                }
                continue;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackhole.load(Relaxed) {
            continue;
        }
        let now = Instant::now();
        if !expired && now.duration_since(last) >= timeout {
            expired = true;
            if at_expiry == AtExpiry::Reset {
                // Reset the sender; the other side hears nothing.
                let sender = if from_client { c.take() } else { u.take() };
                if let Some(s) = sender {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    drop(s);
                }
                continue;
            }
        }
        if expired {
            continue;
        }
        last = now;
        let (data, to) = if from_client {
            (&bc[..n], u.as_mut())
        } else {
            (&bu[..n], c.as_mut())
        };
        if let Some(to) = to {
            if to.write_all(data).await.is_err() {
                return;
            }
        }
    }
}

fn cfg(addr: SocketAddr, max: f64) -> ProbeConfig {
    ProbeConfig::new(addr)
        .max(Duration::from_secs_f64(max))
        .connections(48)
}

#[tokio::test]
async fn no_timeout_below_max() {
    let s = server().await;
    let r = probe::run(cfg(s.local_addr(), 2.0), |_| {}).await.unwrap();
    assert!(r.conclusive, "{r:?}");
    assert_eq!(r.upper, None, "{r:?}");
    // The top rung is 2 s; measured ages are a little longer.
    assert!(r.lower >= Duration::from_secs(2), "{r:?}");
    assert!(r.lower < Duration::from_millis(2200), "{r:?}");
    for d in [Direction::ClientFirst, Direction::ServerFirst] {
        let dr = r.direction(d).unwrap();
        assert_eq!((dr.upper, dr.expiry), (None, None), "{dr:?}");
    }
    // Loose two-sided bound: the top rung is tested at about 2 s after set-up.
    assert!(
        r.wall >= Duration::from_secs(2) && r.wall < Duration::from_secs(6),
        "{r:?}"
    );
}

/// The regression behind "no timeout below 3 s (idle periods up to 2.998 s survived)": a
/// server-first idle period was timed by the client from when its task got round to reading
/// the answer, which on a busy client is later than the answer arrived, so the top rung came
/// out shorter than `--max`. The responder, which ends the idle period, times it now.
///
/// The client runtime is kept busy (a task that blocks it 25 ms at a time, like a loaded
/// machine), the responder runs on its own runtime, and six single-rung probes run at once:
/// the old measure came out below the rung in about half of the tests.
#[test]
fn a_busy_client_still_reports_every_surviving_idle_period_in_full() {
    let (addr, _stop) = responder_thread(None);
    let max = Duration::from_secs(1);
    let probes = (0..6)
        .map(|_| {
            let mut c = ProbeConfig::new(addr).max(max).connections(2);
            c.min = max;
            c
        })
        .collect();
    let reports = on_a_busy_runtime(Duration::from_millis(25), probes);
    for r in &reports {
        assert!(r.conclusive, "{r:?}");
        assert_eq!(r.upper, None, "{r:?}");
        for d in [Direction::ClientFirst, Direction::ServerFirst] {
            let dr = r.direction(d).unwrap();
            assert_eq!(dr.tests, 1, "{dr:?}");
            assert!(
                dr.lower >= max,
                "{d:?}: only {:?} of {max:?} counted: {r:?}",
                dr.lower
            );
        }
        // Loose upper side: a late wake-up tests a longer period, not a much longer one.
        assert!(r.lower < max + Duration::from_millis(500), "{r:?}");
    }
}

/// Runs the responder, and an idle-expiring proxy in front of it when `expiry` is given, on
/// a runtime of their own (so that a busy probe client does not slow them down); returns the
/// address to probe and a guard that stops them.
fn responder_thread(expiry: Option<(Duration, AtExpiry)>) -> (SocketAddr, impl Drop) {
    struct Stop(
        Option<tokio::sync::oneshot::Sender<()>>,
        Option<std::thread::JoinHandle<()>>,
    );
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
            if let Some(t) = self.1.take() {
                let _ = t.join();
            }
        }
    }
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let s = server().await;
            let addr = match expiry {
                Some((t, at)) => proxy(s.local_addr(), t, at).await.addr,
                None => s.local_addr(),
            };
            addr_tx.send(addr).unwrap();
            let _ = stop_rx.await;
        });
    });
    let addr = addr_rx.recv().unwrap();
    (addr, Stop(Some(stop_tx), Some(thread)))
}

/// Runs `probes` on a current-thread runtime that a task keeps busy, blocking it `block` at
/// a time (like a loaded machine): the probe client's tasks wake late, by up to `block`.
fn on_a_busy_runtime(block: Duration, probes: Vec<ProbeConfig>) -> Vec<tether::probe::ProbeReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let busy = tokio::spawn(async move {
            loop {
                std::thread::sleep(block);
                tokio::task::yield_now().await;
            }
        });
        let running: Vec<_> = probes
            .into_iter()
            .map(|c| tokio::spawn(probe::run(c, |_| {})))
            .collect();
        let mut out = Vec::new();
        for p in running {
            out.push(p.await.unwrap().unwrap());
        }
        busy.abort();
        out
    })
}

/// The other half of the same fault, client-first: a test timed from when a late task read
/// the answer idled longer than it counted, and an expired test then claimed a timeout
/// below the true one (the lab saw `(2.751, 2.902]` for a 3 s router). The start of the idle
/// period now comes from the kernel's timestamp of the answer, each test counts for the
/// least (survived) or the most (expired) its idle period can have lasted, and the bracket
/// holds the truth however late the client runs.
#[test]
fn a_busy_client_still_brackets_the_true_timeout() {
    // 30 ms above the 1.40 s rung: a client 30-100 ms late expired that rung and claimed
    // a timeout of at most 1.40 s, in most runs of three probes at once.
    let timeout = 1.43;
    let (addr, _stop) = responder_thread(Some((Duration::from_secs_f64(timeout), AtExpiry::Drop)));
    let reports = on_a_busy_runtime(Duration::from_millis(100), vec![cfg(addr, 3.0); 3]);
    for r in &reports {
        eprintln!("{r:?}");
        for d in [Direction::ClientFirst, Direction::ServerFirst] {
            let dr = r.direction(d).unwrap();
            let (l, u) = (dr.lower.as_secs_f64(), dr.upper.map(|u| u.as_secs_f64()));
            assert!(
                l < timeout && u.is_some_and(|u| timeout <= u),
                "{d:?}: ({l}, {u:?}] does not hold T = {timeout}: {r:?}"
            );
        }
    }
}

async fn bracket(timeout: f64, at_expiry: AtExpiry) {
    let s = server().await;
    let p = proxy(s.local_addr(), Duration::from_secs_f64(timeout), at_expiry).await;
    let r = probe::run(cfg(p.addr, 6.0), |_| {}).await.unwrap();
    eprintln!("{r:?}");
    assert!(r.conclusive, "{r:?}");
    let (lower, upper) = (r.lower.as_secs_f64(), r.upper.unwrap().as_secs_f64());
    assert!(
        lower < timeout && timeout <= upper,
        "T={timeout}: ({lower}, {upper}] {r:?}"
    );
    assert!(
        upper - lower <= (0.05 * timeout).max(0.3),
        "({lower}, {upper}]"
    );
    let want = match at_expiry {
        AtExpiry::Drop => Expiry::SilentDrop,
        AtExpiry::Reset => Expiry::Reset,
    };
    for d in [Direction::ClientFirst, Direction::ServerFirst] {
        let dr = r.direction(d).unwrap();
        assert_eq!(dr.expiry, Some(want), "{dr:?}");
        let (l, u) = (dr.lower.as_secs_f64(), dr.upper.unwrap().as_secs_f64());
        assert!(l < timeout && timeout <= u, "{dr:?}");
    }
    // Generous: this runs next to other tests on a shared machine.
    assert!(r.wall.as_secs_f64() < 1.3 * timeout + 3.0, "{r:?}");
}

#[tokio::test]
async fn idle_expiring_proxy_silent_drop_is_bracketed() {
    bracket(1.55, AtExpiry::Drop).await;
}

#[tokio::test]
async fn idle_expiring_proxy_reset_is_bracketed() {
    bracket(1.33, AtExpiry::Reset).await;
}

#[tokio::test]
async fn blackhole_mid_probe_is_inconclusive() {
    let s = server().await;
    let p = proxy(s.local_addr(), Duration::from_secs_f64(1.5), AtExpiry::Drop).await;
    let bh = p.blackhole.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        bh.store(true, Relaxed);
    });
    let r = probe::run(cfg(p.addr, 6.0), |_| {}).await.unwrap();
    assert!(!r.conclusive, "{r:?}");
    assert!(r.note.as_deref().unwrap_or("").contains("control"), "{r:?}");
    // It gives up soon after the outage, not at the end of the ladder.
    assert!(r.wall < Duration::from_secs(4), "{r:?}");
}

#[tokio::test]
async fn progress_is_reported_and_ends_near_zero() {
    let s = server().await;
    let mut last = None;
    let mut calls = 0;
    let r = probe::run(cfg(s.local_addr(), 1.0), |p| {
        calls += 1;
        last = Some(p.clone());
    })
    .await
    .unwrap();
    assert!(r.conclusive);
    assert!(calls >= 3, "{calls}");
    let last = last.unwrap();
    assert!(
        last.tests > 0 && last.remaining < Duration::from_secs(1),
        "{last:?}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_a_responder_is_an_error() {
    // Something that answers with garbage.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let e = probe::run(cfg(addr, 2.0), |_| {}).await.unwrap_err();
    assert!(
        e.to_string().contains("not a tether probe responder"),
        "{e}"
    );
}

#[tokio::test]
async fn a_bad_request_is_refused_with_a_reason() {
    let s = server().await;
    let mut c = TcpStream::connect(s.local_addr()).await.unwrap();
    let mut out = bytes::BytesMut::new();
    tether_proto::codec::encode_preamble(&mut out);
    tether_proto::codec::encode(
        &tether_proto::codec::Frame::Probe(bytes::Bytes::from_static(&[9, 1, 2])),
        &mut out,
    );
    c.write_all(&out).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("unsupported probe version 9"), "{text:?}");
}

#[tokio::test]
async fn settings_a_responder_would_refuse_are_errors_up_front() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let too_long = ProbeConfig::new(addr).max(Duration::from_secs(25 * 3600));
    let e = probe::run(too_long, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("longest idle period"), "{e}");
    let no_dir = ProbeConfig::new(addr).directions(false, false);
    let e = probe::run(no_dir, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("no direction"), "{e}");
    let grace = ProbeConfig::new(addr).grace(Some(Duration::from_secs(61)));
    let e = probe::run(grace, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("grace"), "{e}");
}
