//! `tether tunnel` in the lab: a tunnel across a flapping path.
//!
//! ```text
//!  client ns                              router ns                    server ns
//!  app (std TcpStream, ──▶ entry ══ tether ══ NAT, conntrack 2 s, ══▶ exit ──▶ sink (std
//!  sha256sum of what        127.0.0.1:7002     INVALID → RST              TcpListener,
//!  it sends)                                  faults injected here        sha256sum of what
//!                                                                         it receives)
//! ```
//!
//! The application is unmodified: a plain blocking `TcpStream` on a thread that entered the
//! client namespace streams 10 MiB (paced over about 20 s, with a 4 s pause in the middle, twice
//! the router's idle timeout) through one connection, half-closes, and waits for the sink's
//! verdict on the same connection. Meanwhile the path breaks: three blackholes of 1.8 s (the
//! router drops everything; longer than the tunnel's detection bound, so the tether
//! connections die and are resumed), and a nat-idle-rst: the router forgets every flow (the
//! state its idle expiry leaves behind; injected with `conntrack -F` so it hits the flow while
//! it is busy) and rejects the next packet of the forgotten flow with a TCP RST, as an AWS NAT
//! gateway or NLB does. Both sides' `sha256sum` must match, the sink must see exactly one
//! connection that ends with EOF after all 10 MiB, the app must never see an error, and the
//! entry must report the connection closed in order after riding out the outages.
//!
//! Without root or the lab tools (or with TETHER_LAB_SKIP set) the test reports
//! `SKIP: <test>: <reason>` and returns (scripts/test lists it as skipped).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::tunnel::{EntryConfig, ExitConfig, TunnelEnd, TunnelEntry, TunnelEvent, TunnelExit};
use tether::ServerConfig;
use tether_lab::topology::{Invalid, RouterConfig};
use tether_lab::{Role, Shape, Topology};
use tether_proto::Policy;

const TOTAL: usize = 10 << 20;
const CHUNK: usize = 64 << 10;
/// 160 chunks × 110 ms ≈ 18 s of streaming, plus the pause.
const PACE: Duration = Duration::from_millis(110);
const PAUSE: Duration = Duration::from_secs(4);
const ROUTER_IDLE: Duration = Duration::from_secs(2);
const DETECT: Duration = Duration::from_secs(1);
const LINGER: Duration = Duration::from_secs(10);
const SINK_PORT: u16 = 7001;
const ENTRY_PORT: u16 = 7002;

fn skip(test: &str) -> bool {
    let why = if let Some(why) = tether_lab::skip_reason() {
        Some(why)
    } else if Command::new("sha256sum")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        Some("sha256sum (coreutils) is missing".to_string())
    } else {
        None
    };
    if let Some(why) = why {
        tether_lab::report_skip(test, &why);
        return true;
    }
    false
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A running `sha256sum`, fed as bytes pass.
struct Sha(std::process::Child);

impl Sha {
    fn new() -> Sha {
        Sha(Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum"))
    }
    fn update(&mut self, b: &[u8]) {
        self.0
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b)
            .expect("feed sha256sum");
    }
    fn hex(mut self) -> String {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().expect("sha256sum output");
        let s = String::from_utf8_lossy(&out.stdout);
        s.split_whitespace().next().unwrap_or_default().to_string()
    }
}

/// What each side of the tunnel reported, until its connection closed.
fn collect_until_closed(next: &mut impl FnMut() -> Option<TunnelEvent>) -> Vec<TunnelEvent> {
    let mut evs = Vec::new();
    while let Some(ev) = next() {
        let closed = matches!(ev, TunnelEvent::Closed { .. });
        evs.push(ev);
        if closed {
            break;
        }
    }
    evs
}

fn policy() -> Policy {
    Policy::builder(DETECT)
        .build()
        .expect("a 1 s detection bound is valid")
}

#[test]
fn tunnel_across_a_flapping_path() {
    if skip("tunnel_across_a_flapping_path") {
        return;
    }
    let started = Instant::now();
    let topo = Arc::new(Topology::create(Shape::OutboundNat).expect("topology"));
    topo.configure_router(RouterConfig {
        idle_timeout: Some(ROUTER_IDLE),
        invalid: Invalid::Reset,
    })
    .expect("router");
    assert!(
        policy().heartbeat_interval < ROUTER_IDLE / 2,
        "the tunnel's heartbeats keep its flows alive through the NAT"
    );

    // The sink: one connection, sha256 of everything until EOF, the verdict back, and a check
    // that no second connection arrives (the first one never broke).
    let sink_addr = SocketAddr::from(([127, 0, 0, 1], SINK_PORT));
    let (sink_ready_tx, sink_ready_rx) = std::sync::mpsc::channel();
    let sink = tether_lab::spawn_in_netns(topo.netns(Role::Server), move || {
        let l = TcpListener::bind(sink_addr).expect("sink bind");
        sink_ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("sink accept");
        let mut sha = Sha::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0usize;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => {
                    sha.update(&buf[..k]);
                    n += k;
                }
                Err(e) => break Some(e.kind()),
            }
        };
        let hex = sha.hex();
        if end.is_none() {
            let _ = s.write_all(format!("{n} {hex}\n").as_bytes());
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        l.set_nonblocking(true).unwrap();
        let second = l.accept().is_ok();
        (n, hex, end, second)
    });
    sink_ready_rx.recv().expect("sink started");

    // The exit, next to the sink.
    let listen = topo.listen_addr();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let exit = tether_lab::spawn_in_netns(topo.netns(Role::Server), move || {
        let rt = runtime();
        rt.block_on(async move {
            let mut cfg = ExitConfig::new(listen, sink_addr);
            cfg.server = ServerConfig::new(listen)
                .policy(policy())
                .session_linger(Some(LINGER));
            let mut exit = TunnelExit::bind(cfg).await.expect("exit bind");
            exit_tx.send(()).unwrap();
            let mut evs = Vec::new();
            while let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_secs(90), exit.next_event()).await
            {
                let closed = matches!(ev, TunnelEvent::Closed { .. });
                evs.push(ev);
                if closed {
                    break;
                }
            }
            evs
        })
    });
    exit_rx.recv().expect("exit started");

    // The entry, next to the app.
    let entry_addr = SocketAddr::from(([127, 0, 0, 1], ENTRY_PORT));
    let relay = topo.connect_addr();
    let (entry_tx, entry_rx) = std::sync::mpsc::channel();
    let entry = tether_lab::spawn_in_netns(topo.netns(Role::Client), move || {
        let rt = runtime();
        let mut entry = rt.block_on(async move {
            let mut cfg = EntryConfig::new(entry_addr, relay);
            cfg.policy = policy();
            cfg.linger = LINGER;
            TunnelEntry::bind(cfg).await.expect("entry bind")
        });
        entry_tx.send(()).unwrap();
        let mut next = || {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(90), entry.next_event())
                    .await
                    .ok()
                    .flatten()
            })
        };
        collect_until_closed(&mut next)
    });
    entry_rx.recv().expect("entry started");

    // The app: 10 MiB, paced, one connection, then the verdict on the same connection.
    let app = tether_lab::spawn_in_netns(topo.netns(Role::Client), move || {
        let mut s = TcpStream::connect(entry_addr).expect("app connect");
        let mut sha = Sha::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut chunk = vec![0u8; CHUNK];
        let mut sent = 0;
        while sent < TOTAL {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
            s.write_all(&chunk)
                .unwrap_or_else(|e| panic!("app write failed after {sent} bytes: {e}"));
            sha.update(&chunk);
            sent += CHUNK;
            std::thread::sleep(if sent == TOTAL / 2 { PAUSE } else { PACE });
        }
        let done_sending = Instant::now();
        s.shutdown(std::net::Shutdown::Write)
            .expect("app half-close");
        let mut verdict = String::new();
        s.read_to_string(&mut verdict)
            .unwrap_or_else(|e| panic!("app connection broke after sending: {e}"));
        (sha.hex(), verdict, done_sending)
    });

    // The flapping path.
    let mut faults = Vec::new();
    let t0 = Instant::now();
    let at = |s: f64| {
        let due = t0 + Duration::from_secs_f64(s);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    };
    for start in [2.0, 5.5, 9.0] {
        at(start);
        topo.blackhole().expect("blackhole");
        std::thread::sleep(Duration::from_millis(1800));
        topo.heal().expect("heal");
        faults.push(("blackhole 1.8 s", Instant::now()));
    }
    at(13.0);
    topo.flush_conntrack().expect("conntrack -F");
    faults.push((
        "nat-idle-rst (flow forgotten, next packet RST)",
        Instant::now(),
    ));

    let (app_hex, verdict, done_sending) = app.join().expect("the app failed");
    let (n, sink_hex, sink_end, second) = sink.join().expect("sink thread");
    let entry_events = entry.join().expect("entry thread");
    let exit_events = exit.join().expect("exit thread");
    let took = started.elapsed();
    eprintln!(
        "lab tunnel: {n} bytes in {took:.1?}; app sha256 {app_hex}; sink sha256 {sink_hex}; \
         faults {:?}",
        faults.iter().map(|(f, _)| *f).collect::<Vec<_>>()
    );
    for ev in &entry_events {
        eprintln!("  entry: {ev:?}");
    }
    for ev in &exit_events {
        eprintln!("  exit:  {ev:?}");
    }

    // Every fault happened while the app was still streaming.
    for (f, t) in &faults {
        assert!(*t < done_sending, "{f} came after the transfer");
    }
    assert_eq!(sink_end, None, "the sink's connection ended with an error");
    assert!(
        !second,
        "the sink saw a second connection: the first one broke"
    );
    assert_eq!(n, TOTAL, "the sink got every byte");
    assert_eq!(app_hex.len(), 64, "sha256sum ran");
    assert_eq!(app_hex, sink_hex, "sha256 differs");
    assert_eq!(
        verdict,
        format!("{TOTAL} {sink_hex}\n"),
        "verdict came back"
    );

    let closed = |evs: &[TunnelEvent]| match evs.last() {
        Some(TunnelEvent::Closed { end, outages, .. }) => (end.clone(), *outages),
        other => panic!("no Closed event: {other:?}"),
    };
    let (end, outages) = closed(&entry_events);
    assert_eq!(end, TunnelEnd::Closed, "entry ended in order");
    assert!(
        outages >= 4,
        "the entry rode out only {outages} outages (3 blackholes and a reset expected)"
    );
    let (end, _) = closed(&exit_events);
    assert_eq!(end, TunnelEnd::Closed, "exit ended in order");
    assert!(
        entry_events
            .iter()
            .filter(|e| matches!(e, TunnelEvent::PathUp { .. }))
            .count()
            >= 4,
        "every outage ended with a resumed session"
    );
}
