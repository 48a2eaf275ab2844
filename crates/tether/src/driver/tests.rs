//! The driver's rules, each pinned in tokio's paused time over an in-memory transport.
//!
//! The far end is either a state machine driven by hand (`Peer`: exact instants, and it can
//! misbehave: stay silent, stop reading) or a second driver.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::codec::{self, Decoder, Frame, Hello, SessionGrant};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent, DisconnectReason, LivenessConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;

use super::*;

const H: Duration = Duration::from_secs(1);
const D: Duration = Duration::from_secs(3);

fn tnow() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

fn liveness() -> LivenessConfig {
    LivenessConfig::new(H, D)
}

/// Events a sink saw, with the instant.
type Log = Arc<Mutex<Vec<(tokio::time::Instant, ConnEvent)>>>;

/// The messages a [`TestSink`] logged, in order.
fn logged_messages(log: &Log) -> Vec<Vec<u8>> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|(_, e)| match e {
            ConnEvent::Message { payload, .. } => Some(payload.to_vec()),
            _ => None,
        })
        .collect()
}

/// Records events; messages also go to the inbox (so a full inbox pauses reading). Server
/// side: accepts every HELLO, optionally putting `requeue` in front of the outbox first (as
/// a server does with what it queued for a resuming client).
#[derive(Default)]
struct TestSink {
    log: Log,
    requeue: Vec<Bytes>,
    session: bool,
    /// Accept as `tether::Server` does: answer the client's heartbeats (the server's own
    /// timer a fallback at h + h/8) and enforce the dictated interval.
    answer: bool,
}

impl Sink for TestSink {
    fn hello(&mut self, _shared: &Arc<Shared>, _now: Instant, _hello: &Hello) -> Decision {
        let session = self.session.then(|| {
            let grant = SessionGrant {
                session_id: 1,
                token: [7; 16],
                resumed: false,
                last_received: 0,
                linger: Duration::from_secs(30),
            };
            Box::new((grant, Session::new(1, [7; 16], SessionConfig::default())))
        });
        let mut cfg = liveness();
        if self.answer {
            cfg.answer_peer_heartbeat = true;
            cfg.enforce_peer_heartbeat = Some(H);
        }
        Decision::Accept(Arc::new(cfg), session, None)
    }

    fn event(&mut self, shared: &Arc<Shared>, ev: ConnEvent) {
        if let ConnEvent::Established(_) = ev {
            shared.requeue_front(std::mem::take(&mut self.requeue));
        }
        if let ConnEvent::Message { payload, .. } = &ev {
            shared.push_inbox(&mut vec![payload.clone()]);
            // A server connection's messages count against the server's backlog (as
            // `ServerSink` does); the test gives them back as its application.
            if let Some(b) = shared.budgets() {
                b.backlog.take(payload.len());
            }
        }
        self.log.lock().unwrap().push((tnow(), ev));
    }
}

/// A duplex stream that can tell whether bytes wait, like a TCP socket's peek (one byte of
/// look-ahead).
struct Peekable {
    io: DuplexStream,
    stash: Option<u8>,
}

impl AsyncRead for Peekable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if let Some(b) = me.stash.take() {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Peekable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Transport for Peekable {
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        if self.stash.is_some() {
            return Some(true);
        }
        let mut b = [0u8; 1];
        let mut rb = ReadBuf::new(&mut b);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().len() == 1 => {
                self.stash = Some(b[0]);
                Some(true)
            }
            // End of stream or an error: there is something to read (the end).
            Poll::Ready(_) => Some(true),
            Poll::Pending => Some(false),
        }
    }
}

use std::pin::Pin;

/// The far end, driven by hand with the core's own state machine.
struct Peer {
    io: DuplexStream,
    conn: Conn,
}

impl Peer {
    fn server(io: DuplexStream) -> Peer {
        Peer {
            io,
            conn: Conn::server(now(), ConnConfig::default()),
        }
    }

    async fn client(io: DuplexStream) -> Peer {
        let mut p = Peer {
            io,
            conn: Conn::client(
                now(),
                ConnConfig::default(),
                &hello(false),
                liveness(),
                None,
            ),
        };
        p.flush().await;
        p
    }

    /// Reads once into the state machine; false at the end of the stream.
    async fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let n = self.io.read(&mut buf).await.unwrap();
        if n == 0 {
            self.conn.handle_eof(now());
            return false;
        }
        self.conn.handle_input(now(), &buf[..n]);
        true
    }

    /// Reads until the state machine has an event; answers a HELLO (with a session when
    /// `session`) and writes what the state machine queued.
    async fn next_event(&mut self, session: bool) -> ConnEvent {
        loop {
            if let Some(ev) = self.conn.poll_event() {
                if let ConnEvent::Hello(_) = ev {
                    let mut sink = TestSink {
                        session,
                        ..Default::default()
                    };
                    let Decision::Accept(cfg, s, _) =
                        sink.hello(&Shared::new(Limits::default()), now(), &hello(session))
                    else {
                        unreachable!("the test sink accepts");
                    };
                    self.conn.accept(now(), cfg, s.map(|b| *b));
                }
                self.flush().await;
                return ev;
            }
            assert!(self.read_some().await, "end of stream before an event");
        }
    }

    async fn flush(&mut self) {
        let out = self.conn.transmit_chunks().collect::<Vec<_>>().concat();
        self.io.write_all(&out).await.unwrap();
        self.conn.transmitted(out.len());
    }
}

fn hello(session: bool) -> Hello {
    Hello {
        client_id: "c".into(),
        requested_heartbeat: H,
        want_session: session,
        resume: None,
        credential: None,
    }
}

fn client_conn(session: bool) -> Conn {
    Conn::client(
        now(),
        ConnConfig::default(),
        &hello(session),
        liveness(),
        None,
    )
}

/// A client driver over a duplex of `cap` bytes each way, established with a hand-driven
/// server peer.
async fn client_with_peer(
    cap: usize,
    limits: Limits,
    session: bool,
) -> (
    Arc<Shared>,
    JoinHandle<Ended<Peekable, TestSink>>,
    Peer,
    Log,
) {
    let (io, far) = tokio::io::duplex(cap);
    let shared = Shared::new(limits);
    let sink = TestSink::default();
    let log = sink.log.clone();
    let io = Peekable { io, stash: None };
    let task = tokio::spawn(drive(io, client_conn(session), shared.clone(), sink));
    let mut peer = Peer::server(far);
    assert!(matches!(
        peer.next_event(session).await,
        ConnEvent::Hello(_)
    ));
    assert!(matches!(
        peer.next_event(session).await,
        ConnEvent::Established(_)
    ));
    // Let the client read the WELCOME.
    tokio::task::yield_now().await;
    (shared, task, peer, log)
}

/// Raw frames from `io` until the end of the stream, each with the (paused-clock) instant
/// it arrived.
async fn frames_until_eof(
    io: &mut DuplexStream,
    dec: &mut Decoder,
) -> Vec<(tokio::time::Instant, Frame)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = io.read(&mut buf).await.unwrap();
        if n == 0 {
            return out;
        }
        dec.decode(&buf[..n], |f| {
            out.push((tnow(), f));
            true
        })
        .unwrap();
    }
}

/// Raw frames from `io` until reading would wait, after the handshake.
async fn frames_now(io: &mut DuplexStream, dec: &mut Decoder) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            r = io.read(&mut buf) => {
                let n = r.unwrap();
                if n == 0 {
                    return out;
                }
                dec.decode(&buf[..n], |f| {
                    out.push(f);
                    true
                })
                .unwrap();
            }
            _ = tokio::task::yield_now() => return out,
        }
    }
}

/// Every idle connection without a lot (a client, a TLS server connection) keeps one of
/// these futures alive: keep it small. 640 B with the state machine inline (360 B of it):
/// one allocation where a boxed `Conn` was a chunk of its own.
#[test]
fn the_connection_future_stays_small() {
    let (io, _peer) = tokio::io::duplex(64);
    let conn = Conn::server(Instant::now(), ConnConfig::default());
    let fut = drive(
        io,
        conn,
        Shared::new(Limits::default()),
        TestSink::default(),
    );
    let size = std::mem::size_of_val(&fut);
    println!("drive future: {size} bytes");
    assert!(
        size <= 640,
        "the per-connection future grew to {size} bytes"
    );
}

/// A client with heartbeat `h` driven over a duplex, whose HELLO the peer (a server) has read
/// and not answered yet: the handshake is in progress.
async fn client_in_handshake(h: Duration, shared: &Arc<Shared>) -> Peer {
    let (io, far) = tokio::io::duplex(64 * 1024);
    let hello = Hello {
        requested_heartbeat: h,
        ..hello(false)
    };
    let conn = Conn::client(
        now(),
        ConnConfig::default(),
        &hello,
        LivenessConfig::new(h, h * 3),
        None,
    );
    tokio::spawn(drive(io, conn, shared.clone(), TestSink::default()));
    let mut peer = Peer::server(far);
    assert!(peer.read_some().await);
    assert!(matches!(peer.conn.poll_event(), Some(ConnEvent::Hello(_))));
    peer
}

/// The peer (a server) answers the HELLO with a WELCOME; the instant it did.
async fn welcome(peer: &mut Peer, h: Duration) -> tokio::time::Instant {
    peer.conn.accept(now(), LivenessConfig::new(h, h * 3), None);
    let welcomed = tnow();
    peer.flush().await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    welcomed
}

/// A message queued before the connection started and one queued while the HELLO is in
/// flight both go out in the same instant the WELCOME arrives, not a heartbeat later.
#[tokio::test(start_paused = true)]
async fn messages_queued_before_and_during_the_handshake_go_out_right_after_welcome() {
    let h = Duration::from_secs(10);
    let shared = Shared::new(Limits::default());
    assert!(shared.try_send(Bytes::from_static(b"before")));
    let mut peer = client_in_handshake(h, &shared).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(shared.try_send(Bytes::from_static(b"during")));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let welcomed = welcome(&mut peer, h).await;
    for want in [&b"before"[..], b"during"] {
        match peer.next_event(false).await {
            ConnEvent::Message { payload, .. } => assert_eq!(&payload[..], want),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            tnow() - welcomed,
            Duration::ZERO,
            "the queued message waited for a timer"
        );
    }
}

/// A client asked to close while its HELLO is unanswered closes right after the WELCOME, with
/// a CLOSE: the server, which welcomed it, ends the session instead of holding it for a
/// resume that never comes (`tether connect` got SIGTERM just after connecting).
#[tokio::test(start_paused = true)]
async fn a_close_asked_during_the_handshake_goes_out_as_close_right_after_welcome() {
    let h = Duration::from_secs(10);
    let shared = Shared::new(Limits::default());
    let mut peer = client_in_handshake(h, &shared).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    shared.close(CloseCode::NORMAL, "client closing");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let welcomed = welcome(&mut peer, h).await;
    match peer.next_event(false).await {
        ConnEvent::Closed(d) => assert!(
            matches!(
                d.reason,
                DisconnectReason::PeerClose {
                    code: CloseCode::NORMAL,
                    ..
                }
            ),
            "{d:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tnow() - welcomed,
        Duration::ZERO,
        "the CLOSE waited for a timer"
    );
}

/// Server side of the same rule: what the server queued for a client before its HELLO was
/// accepted (a resuming client's backlog) goes out with the WELCOME.
#[tokio::test(start_paused = true)]
async fn what_a_server_queued_for_a_client_goes_out_right_after_its_welcome() {
    let (io, far) = tokio::io::duplex(64 * 1024);
    let shared = Shared::new(Limits::default());
    let sink = TestSink {
        requeue: vec![Bytes::from_static(b"held for you")],
        ..Default::default()
    };
    let conn = Conn::server(now(), ConnConfig::default());
    tokio::spawn(drive(io, conn, shared, sink));
    tokio::time::sleep(Duration::from_millis(7)).await;
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    let welcomed = tnow();
    match peer.next_event(false).await {
        ConnEvent::Message { payload, .. } => assert_eq!(&payload[..], b"held for you"),
        other => panic!("{other:?}"),
    }
    assert_eq!(tnow() - welcomed, Duration::ZERO);
}

/// Traffic pushes the heartbeat deadline later on every message; the sleep is not re-armed
/// for that (it fires early once and is re-armed then), so re-arms stay near one per
/// heartbeat interval instead of one per message.
#[tokio::test(start_paused = true)]
async fn the_timer_is_not_rearmed_when_the_deadline_moves_later() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let client = Shared::new(Limits::default());
    let server = Shared::new(Limits::default());
    let server_sink = TestSink::default();
    let server_log = server_sink.log.clone();
    tokio::spawn(drive(
        a,
        client_conn(false),
        client.clone(),
        TestSink::default(),
    ));
    tokio::spawn(drive(
        b,
        Conn::server(now(), ConnConfig::default()),
        server,
        server_sink,
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let before = client.stats.timer_resets();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(client.try_send(Bytes::from_static(b"tick")));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let resets = client.stats.timer_resets() - before;
    let got = server_log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::Message { .. }))
        .count();
    assert_eq!(got, 50);
    assert!(
        (1..=12).contains(&resets),
        "{resets} re-arms in 5 s of traffic (50 messages, heartbeat 1 s)"
    );
}

/// A client whose heartbeat arrives just before the server's own is due: the server
/// answers it in the wake-up that reads it (its heartbeat goes out then, never later than h
/// after its last send), and the sleep armed for the old deadline is re-armed rather than
/// left to wake the task a second time for nothing. One wake-up per interval.
#[tokio::test(start_paused = true)]
async fn an_idle_server_connection_wakes_once_per_heartbeat_interval() {
    let (io, far) = tokio::io::duplex(64 * 1024);
    let server = Shared::new(Limits::default());
    tokio::spawn(drive(
        io,
        Conn::server(now(), ConnConfig::default()),
        server.clone(),
        TestSink::default(),
    ));
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    let early = Duration::from_millis(10);
    let mut hb = BytesMut::new();
    codec::encode(&Frame::Heartbeat, &mut hb);
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    // Settle: the first answer puts the server's deadline just after the peer's rhythm.
    for _ in 0..2 {
        tokio::time::sleep(H - early).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        frames_now(&mut peer.io, &mut dec).await;
    }
    let polls0 = server.stats.polls();
    let out0 = server.stats.snapshot().heartbeats_out;
    let intervals = 20u64;
    for _ in 0..intervals {
        tokio::time::sleep(H - early - Duration::from_millis(1)).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let got = frames_now(&mut peer.io, &mut dec).await;
        assert_eq!(got, vec![Frame::Heartbeat], "the server answers at once");
    }
    let polls = server.stats.polls() - polls0;
    let out = server.stats.snapshot().heartbeats_out - out0;
    assert!(server.done().is_none());
    assert_eq!(out, intervals, "one heartbeat of the server's per interval");
    assert!(
        polls <= intervals + 1,
        "{polls} wake-ups of the server's task in {intervals} intervals"
    );
}

/// A deadline that moves earlier (an ACK owed within 20 ms, heartbeat due in a second) is
/// re-armed at once: the ACK goes out at exactly the ACK delay.
#[tokio::test(start_paused = true)]
async fn the_timer_is_rearmed_when_the_deadline_moves_earlier() {
    let (_shared, _task, mut peer, _log) =
        client_with_peer(64 * 1024, Limits::default(), true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.conn.send(now(), b"one").unwrap();
    peer.flush().await;
    let sent = tnow();
    while peer.conn.session().unwrap().acked() < 1 {
        assert!(peer.read_some().await);
    }
    assert_eq!(tnow() - sent, SessionConfig::default().ack_delay);
}

/// Reading paused (the application does not take its messages) still declares a peer dead
/// on time when nothing waits from it: the silence is the peer's.
#[tokio::test(start_paused = true)]
async fn paused_reading_still_declares_a_silent_peer_dead_on_time() {
    let limits = Limits {
        outbox_bytes: 1 << 20,
        inbox_bytes: 10,
    };
    let (shared, task, mut peer, _log) = client_with_peer(64 * 1024, limits, false).await;
    for _ in 0..3 {
        peer.conn.send(now(), &[9; 100]).unwrap();
    }
    peer.flush().await;
    let last_sent = tnow();
    // The peer is silent from now on (no heartbeats); the client's inbox stays full.
    let ended = task.await.unwrap();
    assert_eq!(ended.disconnect.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(ended.disconnect.silent_for, D);
    assert_eq!(tnow() - last_sent, D);
    assert_eq!(
        shared.lock().inbox.len(),
        3,
        "the messages wait for the app"
    );
}

/// Reading paused does not blame a peer whose bytes wait unread: it is alive, the
/// application is the bottleneck. A paused connection reads on until the first message (held
/// in the state machine) and then stops: what the peer sends after it — heartbeats here —
/// waits in the transport. Once the application catches up, reading resumes.
#[tokio::test(start_paused = true)]
async fn paused_reading_does_not_blame_a_peer_whose_bytes_wait() {
    let limits = Limits {
        outbox_bytes: 1 << 20,
        inbox_bytes: 10,
    };
    let (shared, _task, mut peer, log) = client_with_peer(64 * 1024, limits, false).await;
    for _ in 0..3 {
        peer.conn.send(now(), &[9; 100]).unwrap();
    }
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The inbox is full: this message is read and held, and reading stops behind it.
    peer.conn.send(now(), &[8; 100]).unwrap();
    peer.flush().await;
    // The peer keeps talking (heartbeats) for 4 × dead-after; nobody reads them.
    for _ in 0..(4 * D.as_millis() / 500) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peer.io.write_all(&[0, 0, 0, 0]).await.unwrap();
    }
    assert_eq!(
        shared.done(),
        None,
        "a peer whose bytes wait was declared dead"
    );
    assert_eq!(shared.lock().inbox.len(), 3, "the fourth message is held");
    let heartbeats_before = shared.stats.snapshot().heartbeats_in;
    // The application takes its messages (as `Connection::recv` does: the inbox in one go,
    // then one by one) and asks for more: the held message follows and reading resumes and
    // drains the heartbeats.
    let (mut batch, mut held) = (std::collections::VecDeque::new(), 0);
    let first = std::future::poll_fn(|cx| shared.poll_recv_batch(cx, &mut batch, &mut held))
        .await
        .unwrap();
    assert_eq!((first.len(), batch.len(), held), (100, 2, 300));
    assert!(batch.iter().all(|m| m.len() == 100));
    batch.clear();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let fourth = std::future::poll_fn(|cx| shared.poll_recv_batch(cx, &mut batch, &mut held))
        .await
        .unwrap();
    assert_eq!(&fourth[..], &[8; 100][..]);
    assert!(shared.stats.snapshot().heartbeats_in >= heartbeats_before + 20);
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .any(|(_, e)| matches!(e, ConnEvent::Closed(_))));
}

/// A server connection drawing on `budgets` (accepting as `tether::Server` does: it answers
/// heartbeats), established with a hand-driven client.
async fn budgeted_server(
    budgets: &Arc<Budgets>,
) -> (
    Arc<Shared>,
    JoinHandle<Ended<DuplexStream, TestSink>>,
    Peer,
    Log,
) {
    budgeted_server_over(budgets, 64 * 1024).await
}

/// [`budgeted_server`] over a duplex pipe holding `pipe` bytes each way.
async fn budgeted_server_over(
    budgets: &Arc<Budgets>,
    pipe: usize,
) -> (
    Arc<Shared>,
    JoinHandle<Ended<DuplexStream, TestSink>>,
    Peer,
    Log,
) {
    let (io, far) = tokio::io::duplex(pipe);
    let shared = Shared::server(Limits::default(), budgets.clone());
    let sink = TestSink {
        answer: true,
        ..Default::default()
    };
    let log = sink.log.clone();
    let task = tokio::spawn(drive(
        io,
        Conn::server(now(), ConnConfig::default()),
        shared.clone(),
        sink,
    ));
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    (shared, task, peer, log)
}

/// Issue 17: a server connection's unsent bytes (its outbox, then what its state machine
/// holds) count against the server's budget and keep its queues' box only until the client
/// has read them: an idle connection holds neither. A client's connection (no budget) lets
/// its box go as soon as its outbox moved into the state machine.
#[tokio::test(start_paused = true)]
async fn unsent_bytes_hold_the_budget_and_the_queues_only_until_read() {
    const LEN: usize = 64 * 1024;
    let budgets = Arc::new(Budgets::new(1 << 20, 1 << 20, 1 << 20));
    let (shared, _task, mut peer, _log) = budgeted_server_over(&budgets, 1024).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!shared.holds_queues());
    assert_eq!(budgets.unsent.used(), 0);
    assert_eq!(
        shared.offer(Bytes::from(vec![7u8; LEN]), false, true),
        Offer::Queued(None)
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Moved into the state machine, not all written (the pipe holds 1 KiB): still counted.
    let held = {
        let inner = shared.lock();
        assert_eq!(inner.outbox_bytes, 0);
        inner.transmit_bytes
    };
    assert!(held > LEN - 4096, "{held} B held for the peer");
    assert_eq!(budgets.unsent.used(), held);
    assert!(shared.holds_queues());
    match peer.next_event(false).await {
        ConnEvent::Message { payload, .. } => assert_eq!(payload.len(), LEN),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(budgets.unsent.used(), 0);
    assert!(!shared.holds_queues());

    let (client, _task, mut peer, _log) = client_with_peer(1024, Limits::default(), false).await;
    assert!(client.try_send(Bytes::from(vec![7u8; LEN])));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!client.holds_queues());
    match peer.next_event(false).await {
        ConnEvent::Message { payload, .. } => assert_eq!(payload.len(), LEN),
        other => panic!("{other:?}"),
    }
    assert!(!client.holds_queues());
}

fn messages(log: &Log) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::Message { .. }))
        .count()
}

/// A connection paused by a full server backlog still reads its client's heartbeats and
/// answers each in the instant it arrives (they add nothing to the backlog), so neither end
/// declares the other dead however long the application takes; its messages wait. When the
/// peer then goes silent, it is declared dead exactly d after its last heartbeat — the pause
/// does not count as hearing from it.
#[tokio::test(start_paused = true)]
async fn a_connection_paused_by_a_full_backlog_answers_heartbeats_and_detects_silence_at_d() {
    let budgets = Arc::new(Budgets::new(150, 1 << 20, 1 << 20));
    let (shared, task, mut peer, log) = budgeted_server(&budgets).await;
    for _ in 0..2 {
        peer.conn.send(now(), &[9; 100]).unwrap();
    }
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2));
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let start = tnow();
    let beats = 4 * D.as_secs() as u32;
    for k in 1..=beats {
        tokio::time::sleep_until(start + H * k).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            frames_now(&mut peer.io, &mut dec).await,
            vec![Frame::Heartbeat],
            "heartbeat {k} answered at once"
        );
    }
    assert!(shared.done().is_none());
    assert_eq!(shared.stats.snapshot().heartbeats_in, u64::from(beats));
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2));
    // Silent from now on (the backlog stays full).
    let last = tnow();
    let ended = task.await.unwrap();
    assert_eq!(ended.disconnect.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(ended.disconnect.silent_for, D);
    assert_eq!(tnow() - last, D);
}

/// A message that arrives while the backlog is full is read but held — the backlog passes
/// its bound by nothing — and goes to the application once it has taken its share.
#[tokio::test(start_paused = true)]
async fn a_message_read_during_a_pause_waits_for_room_and_then_goes_out() {
    let budgets = Arc::new(Budgets::new(150, 1 << 20, 1 << 20));
    let (shared, _task, mut peer, log) = budgeted_server(&budgets).await;
    for fill in [9u8, 8] {
        peer.conn.send(now(), &[fill; 100]).unwrap();
        peer.flush().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first message filled nothing (100 < 150), the second did (200 ≥ 150).
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2));
    peer.conn.send(now(), &[7; 100]).unwrap();
    peer.flush().await;
    tokio::time::sleep(H * 5).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2), "held");
    assert!(shared.done().is_none());
    // The application takes one message: 100 ≤ the resume mark (75)? Not yet.
    budgets.backlog.give(100);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (100, 2));
    // And the other: the held message goes out.
    budgets.backlog.give(100);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (100, 3));
    assert_eq!(shared.lock().inbox.back().map(|m| m[0]), Some(7));
}

/// A connection that stopped reading in the middle of a message frame (the backlog filled
/// meanwhile) resumes as soon as the application makes room, not at its next timer: the rest
/// of the frame waits in the transport, so only the backlog can wake it.
#[tokio::test(start_paused = true)]
async fn a_connection_stopped_inside_a_frame_resumes_when_the_backlog_has_room() {
    let budgets = Arc::new(Budgets::new(150, 1 << 20, 1 << 20));
    let (shared, _task, mut peer, log) = budgeted_server(&budgets).await;
    for _ in 0..2 {
        peer.conn.send(now(), &[9; 100]).unwrap();
    }
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2));
    // The next message arrives in two halves; the first is read while paused.
    peer.conn.send(now(), &[7; 100]).unwrap();
    let frame = peer.conn.transmit_chunks().collect::<Vec<_>>().concat();
    peer.conn.transmitted(frame.len());
    let (head, tail) = frame.split_at(frame.len() / 2);
    peer.io.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    peer.io.write_all(tail).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(messages(&log), 2, "paused");
    // The application takes everything: the message follows at once.
    budgets.backlog.give(200);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (100, 3));
    assert!(shared.done().is_none());
}

/// A drained backlog wakes the connections it paused a batch at a time, oldest first, not
/// all at once: 100 connections each holding a message; a give at or below the resume mark
/// lets `WAKE_BATCH` of them deliver, and taking everything lets the rest.
#[tokio::test(start_paused = true)]
async fn a_drained_backlog_wakes_at_most_a_batch_of_paused_connections_per_step() {
    const N: usize = 100;
    let budgets = Arc::new(Budgets::new(10_000, 1 << 20, 1 << 20));
    let mut conns = Vec::new();
    for _ in 0..N {
        conns.push(budgeted_server(&budgets).await);
    }
    // Other clients' messages fill the backlog.
    budgets.backlog.take(10_000);
    for (_, _, peer, _) in conns.iter_mut() {
        peer.conn.send(now(), &[9; 100]).unwrap();
        peer.flush().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let delivered = |conns: &Vec<(Arc<Shared>, _, Peer, Log)>| -> usize {
        conns.iter().map(|(_, _, _, log)| messages(log)).sum()
    };
    assert_eq!(delivered(&conns), 0);
    assert_eq!(
        budgets.backlog.waiters_len(),
        N,
        "each holds its message, once"
    );
    // The application takes 6,000 bytes: 4,000 in use, at or below the resume mark (5,000).
    budgets.backlog.give(6_000);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let k = super::budget::WAKE_BATCH;
    assert_eq!(delivered(&conns), k, "one give, one batch");
    assert_eq!(budgets.backlog.used(), 4_000 + 100 * k);
    assert_eq!(budgets.backlog.waiters_len(), N - k);
    // Taking everything wakes the rest (no give would come for them otherwise).
    budgets.backlog.give(budgets.backlog.used());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(delivered(&conns), N);
    assert_eq!(budgets.backlog.waiters_len(), 0);
    assert!(conns.iter().all(|(s, ..)| s.done().is_none()));
}

/// An orderly close sends CLOSE and FIN, then waits for the peer's FIN — at most the
/// linger, and no longer than the peer takes.
#[tokio::test(start_paused = true)]
async fn close_lingers_for_the_peers_fin_but_not_forever() {
    for peer_closes_after in [None, Some(Duration::from_millis(100))] {
        let (shared, task, mut peer, _log) =
            client_with_peer(64 * 1024, Limits::default(), false).await;
        shared.close(CloseCode::NORMAL, "bye");
        // The peer reads CLOSE, then the FIN.
        let closed_at = tnow();
        match peer.next_event(false).await {
            ConnEvent::Closed(d) => assert!(matches!(
                d.reason,
                DisconnectReason::PeerClose {
                    code: CloseCode::NORMAL,
                    ..
                }
            )),
            other => panic!("{other:?}"),
        }
        let mut rest = Vec::new();
        peer.io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(tnow(), closed_at, "CLOSE and FIN went out at once");
        if let Some(after) = peer_closes_after {
            tokio::time::sleep(after).await;
            peer.io.shutdown().await.unwrap();
        }
        let ended = task.await.unwrap();
        assert_eq!(ended.disconnect.reason, DisconnectReason::LocalClose);
        assert_eq!(
            tnow() - closed_at,
            peer_closes_after.unwrap_or(CLOSE_LINGER)
        );
    }
}

/// The outbox moves into the state machine only up to the transmit high-water mark (a peer
/// that reads slowly costs at most that much copied), and moves on as soon as the socket
/// takes bytes — never waiting for a timer.
#[tokio::test(start_paused = true)]
async fn transmit_high_water_bounds_the_copy_and_never_stalls() {
    let limits = Limits {
        outbox_bytes: 4 << 20,
        inbox_bytes: 4 << 20,
    };
    let (shared, _task, mut peer, _log) = client_with_peer(8 * 1024, limits, false).await;
    const N: usize = 64;
    const LEN: usize = 16 * 1024;
    for i in 0..N {
        let mut m = BytesMut::with_capacity(LEN);
        m.put_u32(i as u32);
        m.resize(LEN, 0xAB);
        assert!(shared.try_send(m.freeze()));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let still_queued = shared.lock().outbox_bytes;
    assert!(
        still_queued >= N * LEN - (TRANSMIT_HIGH_WATER + LEN + 8 * 1024),
        "only {still_queued} bytes left in the outbox: the copy passed the high-water mark"
    );
    let start = tnow();
    for i in 0..N {
        match peer.next_event(false).await {
            ConnEvent::Message { payload, .. } => {
                assert_eq!(
                    u32::from_be_bytes(payload[..4].try_into().unwrap()),
                    i as u32
                )
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        tnow() - start,
        Duration::ZERO,
        "the transfer waited for a timer"
    );
}

/// A heartbeat is never queued behind bytes the socket has not taken: those bytes prove
/// the sender alive when they arrive, and a heartbeat behind them would only pile up.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_never_queues_behind_unsent_bytes() {
    let (shared, _task, mut peer, _log) = client_with_peer(1024, Limits::default(), false).await;
    assert!(shared.try_send(Bytes::from(vec![5u8; 64 * 1024])));
    // The peer does not read for 5 heartbeat intervals but keeps the client from declaring
    // it dead.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peer.io.write_all(&[0, 0, 0, 0]).await.unwrap();
    }
    let mut dec = Decoder::new(u32::MAX);
    let mut got = Vec::new();
    while !got.iter().any(|f| matches!(f, Frame::Data(_))) {
        got.extend(frames_now(&mut peer.io, &mut dec).await);
        tokio::task::yield_now().await;
    }
    assert!(
        matches!(got.as_slice(), [Frame::Data(d)] if d.len() == 64 * 1024),
        "heartbeats queued behind the data: {:?}",
        got.iter().map(codec_name).collect::<Vec<_>>()
    );
    // Liveness goes on: the next heartbeat within an interval.
    let drained = tnow();
    let mut next = Vec::new();
    while next.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        next = frames_now(&mut peer.io, &mut dec).await;
    }
    assert_eq!(next, vec![Frame::Heartbeat]);
    assert!(tnow() - drained <= H);
}

fn codec_name(f: &Frame) -> &'static str {
    tether_proto::conn::frame_name(f)
}

/// The server's partial-frame budget: connections sending large frames slowly pause when
/// the budget is spent instead of allocating past it, and resume when it frees.
#[tokio::test(start_paused = true)]
async fn partial_frames_never_take_the_server_past_its_budget() {
    const BODY: usize = 60 * 1024;
    // Room for two such frames at their worst case (see `frames.rs`), not three.
    const LIMIT: usize = 2 * (2 * (BODY + 5) + READ_CHUNK) + READ_CHUNK;
    let budgets = Arc::new(Budgets::new(1 << 20, LIMIT, 1 << 20));
    let mut peers = Vec::new();
    let mut logs = Vec::new();
    for _ in 0..3 {
        let (_, _, peer, log) = budgeted_server_over(&budgets, 256 * 1024).await;
        logs.push(log);
        peers.push(peer);
    }
    // Every peer announces a 60 KiB message and sends all of it but the last byte.
    let mut frame = BytesMut::new();
    codec::encode_data(&vec![1u8; BODY], &mut frame);
    for p in &mut peers {
        p.io.write_all(&frame[..frame.len() - 1]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let used = budgets.frames.used();
    assert!(
        used <= LIMIT,
        "{used} bytes of partial frames, budget {LIMIT}"
    );
    // Not everyone fits: the third frame waits, holding no more than its first read.
    let admitted = 2 * (2 * (BODY + 5) + READ_CHUNK);
    assert!(used >= admitted && used <= admitted + READ_CHUNK, "{used}");
    // The last bytes arrive: every frame completes in turn, none is lost.
    for p in &mut peers {
        p.io.write_all(&frame[frame.len() - 1..]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    for log in &logs {
        let got = log
            .lock()
            .unwrap()
            .iter()
            .filter(
                |(_, e)| matches!(e, ConnEvent::Message { payload, .. } if payload.len() == BODY),
            )
            .count();
        assert_eq!(got, 1);
    }
    assert_eq!(budgets.frames.used(), 0);
}

/// A large message arriving in pieces is read into its own buffer (after its first piece,
/// `Conn::frame_body_buf`) and delivered whole, with the frames before and after it, and
/// the partial-frame budget is all given back.
#[tokio::test(start_paused = true)]
async fn a_large_message_arriving_in_pieces_is_read_in_place_and_delivered_whole() {
    let budgets = Arc::new(Budgets::new(1 << 20, 4 << 20, 1 << 20));
    let (_, _, mut peer, log) = budgeted_server(&budgets).await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut wire = BytesMut::new();
    codec::encode_data(b"before", &mut wire);
    codec::encode_data(&big, &mut wire);
    codec::encode_data(b"after", &mut wire);
    for piece in wire.chunks(10_000) {
        peer.io.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let got = logged_messages(&log);
    assert_eq!(got, vec![b"before".to_vec(), big, b"after".to_vec()]);
    assert_eq!(budgets.frames.used(), 0);
}

/// A stream of large messages (each read as its header alone, then its body in place) with
/// small messages and heartbeats between them, arriving at once and in uneven pieces: every
/// message is delivered whole and in order, and the partial-frame budget is all given back.
#[tokio::test(start_paused = true)]
async fn a_stream_of_large_messages_read_header_first_arrives_whole_and_in_order() {
    for piece in [usize::MAX, 7_777, 70_001] {
        let budgets = Arc::new(Budgets::new(1 << 20, 4 << 20, 1 << 20));
        let (_, _, mut peer, log) = budgeted_server_over(&budgets, 1 << 20).await;
        let sizes = [
            262_145usize,
            262_145,
            5,
            100_000,
            262_145,
            13,
            70_000,
            262_145,
        ];
        let messages: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j % 241) as u8).collect())
            .collect();
        let mut wire = BytesMut::new();
        for (i, m) in messages.iter().enumerate() {
            codec::encode_data(m, &mut wire);
            if i % 3 == 1 {
                wire.extend_from_slice(&heartbeat_bytes());
            }
        }
        for chunk in wire.chunks(piece.min(wire.len())) {
            peer.io.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let got = logged_messages(&log);
        assert_eq!(got.len(), messages.len(), "pieces of {piece}");
        assert!(
            got == messages,
            "pieces of {piece}: contents or order differ"
        );
        assert_eq!(budgets.frames.used(), 0);
    }
}

/// A server driver accepting as `tether::Server` does (answering heartbeats), and a
/// hand-driven client established with it. Returns the server's shared state, its task, the
/// client and the instant of the WELCOME.
async fn answering_server() -> (
    Arc<Shared>,
    JoinHandle<Ended<DuplexStream, TestSink>>,
    Peer,
    tokio::time::Instant,
) {
    let (io, far) = tokio::io::duplex(64 * 1024);
    let server = Shared::new(Limits::default());
    let sink = TestSink {
        answer: true,
        ..Default::default()
    };
    let task = tokio::spawn(drive(
        io,
        Conn::server(now(), ConnConfig::default()),
        server.clone(),
        sink,
    ));
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    (server, task, peer, tnow())
}

/// A heartbeat frame's bytes.
fn heartbeat_bytes() -> BytesMut {
    let mut hb = BytesMut::new();
    codec::encode(&Frame::Heartbeat, &mut hb);
    hb
}

/// The server answers each client heartbeat in the wake-up that reads it, and its own
/// heartbeat timer — now a fallback at h + h/8 — never fires while the client heartbeats:
/// one wake-up of the server's task per interval, even when the client's heartbeat arrives a
/// little after the instant the server's own used to be due (the client's timer and the path
/// add 0–20 ms, varying from one interval to the next), and the sleep armed for the old
/// fallback is re-armed rather than left to fire for nothing.
#[tokio::test(start_paused = true)]
async fn a_server_whose_client_heartbeats_never_fires_its_own_heartbeat_timer() {
    let (server, _task, mut peer, welcomed) = answering_server().await;
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let lateness = [0u64, 5, 20, 1, 0, 12, 3, 20];
    let polls0 = server.stats.polls();
    let out0 = server.stats.snapshot().heartbeats_out;
    let intervals = 24u32;
    for k in 1..=intervals {
        // The client's timer: h after its previous heartbeat, from the WELCOME, plus the path.
        let late = Duration::from_millis(lateness[k as usize % lateness.len()]);
        tokio::time::sleep_until(welcomed + H * k + late).await;
        heartbeat_answered_at_once(&mut peer, &mut dec, &hb, k).await;
    }
    let polls = server.stats.polls() - polls0;
    let out = server.stats.snapshot().heartbeats_out - out0;
    assert!(server.done().is_none());
    assert_eq!(
        out,
        u64::from(intervals),
        "one heartbeat of the server's per interval"
    );
    assert!(
        polls <= u64::from(intervals),
        "{polls} wake-ups of the server's task in {intervals} intervals (one read each)"
    );
}

/// The fallback keeps both detection bounds when the client goes silent: the server sends
/// its own heartbeat h + h/8 after its last answer (and again after that), so a client that
/// is alive but stalled still hears from it well within d, and the server declares the
/// silent client dead exactly d after its last byte (CLOSE(HEARTBEAT_TIMEOUT)).
#[tokio::test(start_paused = true)]
async fn a_server_whose_client_goes_silent_heartbeats_at_its_fallback_and_detects_it_at_d() {
    let (_server, task, mut peer, welcomed) = answering_server().await;
    heartbeat_thrice_then_fall_silent(&mut peer, welcomed).await;
    let ended = task.await.unwrap();
    assert_eq!(ended.disconnect.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(ended.disconnect.silent_for, D);
}

/// Two drivers, as in `tether bench hold`: an idle client and a server that answers. The
/// client heartbeats every h; each heartbeat costs the server one wake-up; nobody is declared
/// dead or flooding; the client's own heartbeats stay h apart (the answers do not bring them
/// forward).
#[tokio::test(start_paused = true)]
async fn an_idle_pair_costs_the_server_one_wake_up_per_interval() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let client = Shared::new(Limits::default());
    let server = Shared::new(Limits::default());
    tokio::spawn(drive(
        a,
        client_conn(false),
        client.clone(),
        TestSink::default(),
    ));
    let sink = TestSink {
        answer: true,
        ..Default::default()
    };
    tokio::spawn(drive(
        b,
        Conn::server(now(), ConnConfig::default()),
        server.clone(),
        sink,
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let polls0 = server.stats.polls();
    let (c0, s0) = (
        client.stats.snapshot().heartbeats_out,
        server.stats.snapshot().heartbeats_out,
    );
    let intervals = 30u32;
    tokio::time::sleep(H * intervals).await;
    let polls = server.stats.polls() - polls0;
    let c = client.stats.snapshot().heartbeats_out - c0;
    let s = server.stats.snapshot().heartbeats_out - s0;
    assert!(client.done().is_none() && server.done().is_none());
    assert_eq!(c, u64::from(intervals), "the client heartbeats once per h");
    assert_eq!(s, c, "the server answers each one");
    assert!(
        polls <= u64::from(intervals) + 1,
        "{polls} wake-ups of the server's task in {intervals} intervals"
    );
}

#[path = "park_tests.rs"]
mod parked;

/// The peer answers the server's heartbeats for three intervals after `welcomed`, then falls
/// silent and reads: the server sends its fallback heartbeats at h + h/8 and 2(h + h/8), and
/// CLOSE(heartbeat-timeout) at d after the peer's last byte.
async fn heartbeat_thrice_then_fall_silent(peer: &mut Peer, welcomed: tokio::time::Instant) {
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    for k in 1..=3u32 {
        tokio::time::sleep_until(welcomed + H * k).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            frames_now(&mut peer.io, &mut dec).await,
            vec![Frame::Heartbeat]
        );
    }
    let last = tnow();
    // Silent from now on; the client's end only reads.
    let seen: Vec<_> = frames_until_eof(&mut peer.io, &mut dec)
        .await
        .iter()
        .map(|(t, f)| (*t - last, codec_name(f)))
        .collect();
    let fallback = H + H / 8;
    assert_eq!(
        seen,
        vec![
            (fallback, "HEARTBEAT"),
            (fallback * 2, "HEARTBEAT"),
            (D, "CLOSE"),
        ]
    );
}

/// The peer sends a heartbeat (interval `k`) and gets the server's answer in the same
/// instant.
async fn heartbeat_answered_at_once(peer: &mut Peer, dec: &mut Decoder, hb: &[u8], k: u32) {
    let sent = tnow();
    peer.io.write_all(hb).await.unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        tokio::task::yield_now().await;
        got = frames_now(&mut peer.io, dec).await;
    }
    assert_eq!(got, vec![Frame::Heartbeat], "interval {k}");
    assert_eq!(tnow(), sent, "interval {k}: answered in the same instant");
}
