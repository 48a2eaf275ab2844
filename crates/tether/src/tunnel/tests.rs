//! The tunnel's own path in tokio's paused time: the entry's and the exit's halves of one
//! tunnelled connection ([`run_entry`], [`run_exit`]) joined by an in-memory link, the
//! application and the target as in-memory streams. With the clock paused, time only moves
//! when every task waits for a timer, so "it happened at the instant it started" means no
//! timer anywhere on the path.
//!
//! What this cannot cover: the tether session between entry and exit is a reconnecting
//! `Client` and a `Server`, which only speak TCP; the first-message rule of their driver is
//! pinned by the driver's own paused-time tests, and the whole tunnel by the loopback tests
//! in `tests/tunnel.rs`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::wire::tunnel::{Msg, VERSION};
use tokio::io::{duplex, split, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::Instant;

use super::app::AppStream;
use super::entry::run_entry;
use super::exit::{run_exit, ExitSource};
use super::link::{Inbound, Outbound, Source};
use super::pump::{Counters, Ctx};
use super::{tunnel_id, ExitConfig, TunnelEnd, TunnelEvent};

/// An application connection over an in-memory stream; an abortive close is recorded.
pub(super) struct MemApp {
    rd: Mutex<ReadHalf<DuplexStream>>,
    wr: Mutex<WriteHalf<DuplexStream>>,
    aborted: Arc<AtomicBool>,
}

impl MemApp {
    pub(super) fn new(s: DuplexStream) -> (MemApp, Arc<AtomicBool>) {
        let (rd, wr) = split(s);
        let aborted = Arc::new(AtomicBool::new(false));
        let app = MemApp {
            rd: Mutex::new(rd),
            wr: Mutex::new(wr),
            aborted: aborted.clone(),
        };
        (app, aborted)
    }
}

impl AppStream for MemApp {
    async fn read_some(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        self.rd
            .lock()
            .await
            .read_buf(&mut (&mut *buf).limit(max))
            .await
    }
    async fn write_all(&self, b: &[u8]) -> io::Result<()> {
        self.wr.lock().await.write_all(b).await
    }
    async fn shutdown_write(&self) -> io::Result<()> {
        self.wr.lock().await.shutdown().await
    }
    fn set_abortive(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

/// One direction of the in-memory link between entry and exit (a perfect session).
struct MemOut(mpsc::UnboundedSender<Bytes>);

impl Outbound for MemOut {
    async fn send(&self, m: Bytes) -> Result<(), String> {
        self.0.send(m).map_err(|_| "link closed".to_string())
    }
}

struct MemSource(mpsc::UnboundedReceiver<Bytes>);

impl Source for MemSource {
    async fn next(&mut self) -> Inbound {
        match self.0.recv().await {
            Some(m) => Inbound::Msg(m),
            None => Inbound::End(TunnelEnd::PathLost("link closed".into())),
        }
    }
}

fn addr() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

/// What one run of a tunnelled connection produced at the entry.
struct EntryRun {
    end: TunnelEnd,
    aborted: bool,
}

/// Runs one tunnelled connection: the entry half over `app`, the exit half (after checking
/// that the first message is OPEN) connecting with `connect`.
async fn tunnel<F>(
    app: DuplexStream,
    connect: F,
) -> (
    tokio::task::JoinHandle<EntryRun>,
    tokio::task::JoinHandle<TunnelEnd>,
)
where
    F: std::future::Future<Output = io::Result<(MemApp, SocketAddr)>> + Send + 'static,
{
    let (to_exit, from_entry) = mpsc::unbounded_channel();
    let (to_entry, from_exit) = mpsc::unbounded_channel();
    let (_stop_tx, stop) = watch::channel(false);
    let entry = {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _keep = _stop_tx;
            let (app, aborted) = MemApp::new(app);
            let (events, _) = mpsc::unbounded_channel::<TunnelEvent>();
            let n = Counters::default();
            let id = tunnel_id();
            let ctx = Ctx {
                id: &id,
                is_entry: true,
                n: &n,
                events: &events,
            };
            let out = MemOut(to_exit);
            let mut src = MemSource(from_exit);
            let p = run_entry(app, &out, &mut src, ctx, &mut stop).await;
            EntryRun {
                end: p.end,
                aborted: aborted.load(Ordering::SeqCst),
            }
        })
    };
    let exit = {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // The router's part: the first message opens the tunnel, the rest is forwarded.
            let mut from_entry = from_entry;
            let first = from_entry.recv().await.expect("OPEN");
            assert_eq!(Msg::decode(&first), Ok(Msg::Open(VERSION)));
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(m) = from_entry.recv().await {
                    if tx.send(Inbound::Msg(m)).is_err() {
                        return;
                    }
                }
            });
            let cfg = ExitConfig::new(addr(), addr());
            let (events, _) = mpsc::unbounded_channel::<TunnelEvent>();
            let n = Counters::default();
            let ctx = Ctx {
                id: "exit",
                is_entry: false,
                n: &n,
                events: &events,
            };
            let out = MemOut(to_entry);
            let mut src = ExitSource::new(rx);
            run_exit(connect, &cfg, &out, &mut src, ctx, &mut stop)
                .await
                .end
        })
    };
    (entry, exit)
}

/// An in-memory target that echoes until EOF, then closes.
fn echo_target() -> (MemApp, SocketAddr) {
    let (near, mut far) = duplex(64 * 1024);
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match far.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = far.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if far.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (MemApp::new(near).0, addr())
}

#[tokio::test(start_paused = true)]
async fn first_bytes_cross_the_tunnel_at_the_instant_they_are_written() {
    let t0 = Instant::now();
    let (mut program, app) = duplex(64 * 1024);
    let (entry, exit) = tunnel(app, async { Ok(echo_target()) }).await;
    program.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    program.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(Instant::now(), t0, "the echo waited for a timer");
    // An orderly end: FIN both ways, DONE, no reset; still no timer on the path.
    program.shutdown().await.unwrap();
    let mut rest = Vec::new();
    program.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let e = entry.await.unwrap();
    assert_eq!(e.end, TunnelEnd::Closed);
    assert!(!e.aborted);
    assert_eq!(exit.await.unwrap(), TunnelEnd::Closed);
    assert_eq!(Instant::now(), t0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_target_resets_the_application_at_the_same_instant() {
    let t0 = Instant::now();
    let (mut program, app) = duplex(64 * 1024);
    let refused =
        async { Err::<(MemApp, SocketAddr), _>(io::Error::from(io::ErrorKind::ConnectionRefused)) };
    let (entry, exit) = tunnel(app, refused).await;
    // Written before the refusal is known: it must not keep the connection open.
    program.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    program.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let e = entry.await.unwrap();
    assert!(
        e.aborted,
        "the application connection must be reset, not closed"
    );
    match e.end {
        TunnelEnd::PeerAborted(why) => assert!(why.contains("cannot connect"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(exit.await.unwrap(), TunnelEnd::LocalReset(_)));
    assert_eq!(Instant::now(), t0, "the refusal waited for a timer");
}

#[tokio::test(start_paused = true)]
async fn a_target_that_never_answers_is_given_up_after_the_connect_timeout() {
    let t0 = Instant::now();
    let (mut program, app) = duplex(64 * 1024);
    let hangs = std::future::pending::<io::Result<(MemApp, SocketAddr)>>();
    let (entry, _exit) = tunnel(app, hangs).await;
    let mut rest = Vec::new();
    program.read_to_end(&mut rest).await.unwrap();
    let e = entry.await.unwrap();
    assert!(e.aborted);
    assert!(matches!(e.end, TunnelEnd::PeerAborted(ref w) if w.contains("timed out")));
    // ExitConfig's default connect timeout, exactly.
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
}

#[test]
fn ids_are_distinct() {
    let a = tunnel_id();
    let b = tunnel_id();
    assert!(a.starts_with("tun-") && a.len() == 20, "{a}");
    assert_ne!(a, b);
}
