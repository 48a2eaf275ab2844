//! The per-connection task: drives a [`Conn`] over a transport.
//!
//! One task and one reusable `Sleep` per connection. Each wake-up: take commands (messages to
//! send, close requests), read what the transport has into a stack buffer (no read buffer is
//! held between wake-ups), fire due timers, hand events to the sink, write what the state
//! machine queued, and re-arm the sleep only when the deadline changed.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_proto::codec::{Hello, SessionGrant};
use tether_proto::session::Session;
use tether_proto::{
    CloseCode, Conn, ConnEvent, Disconnect, DisconnectReason, LivenessConfig, TransportError,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Bytes read per `read` call, on the stack.
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to other tasks.
// 4 × 16 KiB: a busy connection decodes at most ~64 KiB per wake-up before yielding, so
// hundreds of busy connections cannot starve idle ones of their timers (heartbeats,
// dead-after) for long.
const READS_PER_WAKE: usize = 4;
/// Stop moving messages from the outbox into the state machine above this many queued bytes.
const TRANSMIT_HIGH_WATER: usize = 256 * 1024;
/// How long an orderly close may take to flush and see the peer's FIN.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A byte stream tether can run over. Implemented for `TcpStream`; for TLS or other streams
/// implement it with the default methods (one line).
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The connection ends because of a failure: make the close abortive (RST) if possible.
    fn abort_on_close(&self) {}
    /// Whether sent data is still unacknowledged, if the transport can tell (TCP_INFO).
    fn has_unacked(&self) -> Option<bool> {
        None
    }
    /// Whether received bytes are waiting unread, if the transport can tell without reading
    /// (registers for a wake-up when it says no). Used while reading is paused: a peer whose
    /// bytes wait is alive; a peer with nothing waiting is silent however slow we are.
    fn poll_unread(&mut self, _cx: &mut Context<'_>) -> Option<bool> {
        None
    }
}

impl Transport for TcpStream {
    fn abort_on_close(&self) {
        let _ = crate::sockopt::set_abortive_close(self);
    }
    fn has_unacked(&self) -> Option<bool> {
        crate::sockopt::tcp_info(self).map(|i| i.unacked > 0)
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Some(self.poll_peek(cx, &mut buf).is_ready())
    }
}

impl Transport for tokio::io::DuplexStream {}

/// A process-wide origin for storing instants in atomics.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| tokio::time::Instant::now().into_std())
}

/// Per-connection counters, readable without locks (updated once per wake-up).
#[derive(Debug, Default)]
pub struct Stats {
    last_rx_us: AtomicU64,
    srtt_us: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) heartbeats_in: AtomicU64,
    pub(crate) heartbeats_out: AtomicU64,
}

/// A copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// When anything was last received (`None` before the first byte).
    pub last_rx: Option<Instant>,
    /// Smoothed RTT, once measured.
    pub srtt: Option<Duration>,
    /// Application messages received.
    pub messages_in: u64,
    /// Application messages sent.
    pub messages_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Heartbeats received.
    pub heartbeats_in: u64,
    /// Heartbeats sent.
    pub heartbeats_out: u64,
}

impl Stats {
    fn update(&self, conn: &Conn) {
        let s = conn.stats();
        self.last_rx_us.store(
            conn.last_rx().saturating_duration_since(base()).as_micros() as u64 + 1,
            Relaxed,
        );
        if let Some(r) = conn.srtt() {
            self.srtt_us.store(r.as_micros() as u64, Relaxed);
        }
        self.messages_in.store(s.messages_in, Relaxed);
        self.messages_out.store(s.messages_out, Relaxed);
        self.bytes_in.store(s.bytes_in, Relaxed);
        self.bytes_out.store(s.bytes_out, Relaxed);
        self.heartbeats_in.store(s.heartbeats_in, Relaxed);
        self.heartbeats_out.store(s.heartbeats_out, Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let rx = self.last_rx_us.load(Relaxed);
        let rtt = self.srtt_us.load(Relaxed);
        StatsSnapshot {
            last_rx: (rx > 0).then(|| base() + Duration::from_micros(rx - 1)),
            srtt: (rtt > 0).then(|| Duration::from_micros(rtt)),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            heartbeats_in: self.heartbeats_in.load(Relaxed),
            heartbeats_out: self.heartbeats_out.load(Relaxed),
        }
    }
}

/// Commands and results shared between a connection's task and its handles.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) outbox: VecDeque<Bytes>,
    pub(crate) outbox_bytes: usize,
    pub(crate) close: Option<(CloseCode, String)>,
    pub(crate) driver: Option<Waker>,
    pub(crate) inbox: VecDeque<Bytes>,
    pub(crate) inbox_bytes: usize,
    pub(crate) recv: Option<Waker>,
    pub(crate) done: Option<Disconnect>,
}

/// State shared by a connection task and the handles that talk to it.
#[derive(Debug, Default)]
pub struct Shared {
    inner: Mutex<Inner>,
    /// Outlives single connections (a reconnecting client's outbox): a connection's end does
    /// not mark it done; its owner does with [`Shared::finish`].
    pub(crate) persistent: bool,
    pub(crate) space: Notify,
    pub(crate) stats: Stats,
    pub(crate) limits: Limits,
    /// Server connections: the server-wide backlog of undelivered messages.
    pub(crate) backlog: Option<Arc<Backlog>>,
}

/// Bounds on what a connection buffers for the application.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Messages waiting to be sent, in bytes, before `send` waits.
    pub(crate) outbox_bytes: usize,
    /// Messages received but not yet taken by `recv`, in bytes, before reading pauses.
    pub(crate) inbox_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            outbox_bytes: 1 << 20,
            inbox_bytes: 4 << 20,
        }
    }
}

impl Shared {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Shared {
            limits,
            ..Default::default()
        })
    }

    /// A `Shared` for a server connection, paused with the rest while `backlog` is over.
    pub(crate) fn with_backlog(limits: Limits, backlog: Arc<Backlog>) -> Arc<Self> {
        Arc::new(Shared {
            limits,
            backlog: Some(backlog),
            ..Default::default()
        })
    }

    /// A `Shared` that outlives single connections (see `persistent`).
    pub(crate) fn persistent(limits: Limits) -> Arc<Self> {
        Arc::new(Shared {
            limits,
            persistent: true,
            ..Default::default()
        })
    }

    /// Marks the owner finished: senders fail with `d` from now on.
    pub(crate) fn finish(&self, d: Disconnect) {
        let mut inner = self.lock();
        inner.done.get_or_insert(d);
        if let Some(w) = inner.recv.take() {
            w.wake();
        }
        drop(inner);
        self.space.notify_waiters();
    }

    /// Messages still queued (never handed to a connection), oldest first.
    pub(crate) fn take_outbox(&self) -> Vec<Bytes> {
        let mut inner = self.lock();
        inner.outbox_bytes = 0;
        let v: Vec<Bytes> = inner.outbox.drain(..).collect();
        drop(inner);
        self.space.notify_waiters();
        v
    }

    /// Puts messages at the front of the outbox (they were queued before the others).
    pub(crate) fn requeue_front(&self, msgs: Vec<Bytes>) {
        let mut inner = self.lock();
        for m in msgs.into_iter().rev() {
            inner.outbox_bytes += m.len();
            inner.outbox.push_front(m);
        }
        if let Some(w) = inner.driver.take() {
            w.wake();
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere while holding it; the data is still usable
        // (queues and flags only), so keep going rather than cascade the panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message, waiting while the outbox is full. Fails once the connection ended.
    pub(crate) async fn send(&self, msg: Bytes) -> Result<(), Disconnect> {
        loop {
            let notified = self.space.notified();
            {
                let mut inner = self.lock();
                if let Some(d) = &inner.done {
                    return Err(d.clone());
                }
                if inner.outbox_bytes == 0
                    || inner.outbox_bytes + msg.len() <= self.limits.outbox_bytes
                {
                    inner.outbox_bytes += msg.len();
                    inner.outbox.push_back(msg);
                    if let Some(w) = inner.driver.take() {
                        w.wake();
                    }
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Queues a message without waiting; `false` when the outbox is full or the connection ended.
    pub(crate) fn try_send(&self, msg: Bytes) -> bool {
        let mut inner = self.lock();
        if inner.done.is_some()
            || inner.outbox_bytes + msg.len() > self.limits.outbox_bytes.max(msg.len())
        {
            return false;
        }
        inner.outbox_bytes += msg.len();
        inner.outbox.push_back(msg);
        if let Some(w) = inner.driver.take() {
            w.wake();
        }
        true
    }

    /// Asks the task to close the connection in order.
    pub(crate) fn close(&self, code: CloseCode, text: &str) {
        let mut inner = self.lock();
        if inner.done.is_none() && inner.close.is_none() {
            inner.close = Some((code, text.to_owned()));
            if let Some(w) = inner.driver.take() {
                w.wake();
            }
        }
    }

    /// The disconnect, once the connection ended.
    pub(crate) fn done(&self) -> Option<Disconnect> {
        self.lock().done.clone()
    }
}

/// Messages received by all of a server's connections and not yet taken by the application.
/// Above `high` every connection stops reading (the kernel then applies TCP back-pressure to
/// the senders) until the application has taken the backlog down to `low`. While paused a
/// connection does not blame its peer for silence: the application is the bottleneck.
#[derive(Debug)]
pub(crate) struct Backlog {
    queued: AtomicUsize,
    high: usize,
    low: usize,
    is_over: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
}

impl Backlog {
    pub(crate) fn new(high: usize) -> Self {
        Backlog {
            queued: AtomicUsize::new(0),
            high: high.max(1),
            low: high / 2,
            is_over: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// One more message waits for the application.
    pub(crate) fn push(&self) {
        if self.queued.fetch_add(1, Relaxed) + 1 >= self.high {
            self.is_over.store(true, Relaxed);
        }
    }

    /// The application took one message.
    pub(crate) fn pop(&self) {
        let left = self.queued.fetch_sub(1, Relaxed).saturating_sub(1);
        if left <= self.low && self.is_over.swap(false, Relaxed) {
            let waiters =
                std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
            for w in waiters {
                w.wake();
            }
        }
    }

    /// Messages waiting.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// True while over the high-water mark; registers `waker` to be woken when it drains.
    fn over(&self, waker: &Waker) -> bool {
        if !self.is_over.load(Relaxed) {
            return false;
        }
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push(waker.clone());
        }
        drop(w);
        // Re-check: the application may have drained it between the load and the push.
        self.is_over.load(Relaxed)
    }
}

/// The server's answer to a HELLO.
#[derive(Debug)]
pub(crate) enum Decision {
    Accept(LivenessConfig, Option<Box<(SessionGrant, Session)>>),
    Refuse(CloseCode, String),
}

/// Where a connection task delivers what happens.
pub(crate) trait Sink: Send + 'static {
    /// A HELLO arrived (server side).
    fn hello(&mut self, _now: Instant, hello: &Hello) -> Decision {
        let _ = hello;
        Decision::Refuse(
            CloseCode::REFUSED,
            "this endpoint does not accept connections".into(),
        )
    }
    /// Any other event. `Message`s for a standalone connection go to the inbox.
    fn event(&mut self, shared: &Shared, ev: ConnEvent);
    /// The events of one wake-up have all been delivered (a sink that batches flushes here).
    fn flush(&mut self, _shared: &Shared) {}
}

/// Maps an I/O error to what the state machine understands.
pub(crate) fn transport_error<T: Transport>(
    io: &T,
    e: &io::Error,
    wrote_since_rx: bool,
) -> TransportError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => TransportError::Reset,
        io::ErrorKind::TimedOut => TransportError::TimedOut {
            unacked: io.has_unacked().unwrap_or(false) || wrote_since_rx,
        },
        _ => TransportError::Other(format!("{:?}: {e}", e.kind())),
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How a driven connection ended.
pub(crate) struct Ended<T> {
    /// Why, and how long the peer had been silent.
    pub(crate) disconnect: Disconnect,
    /// The transport, when the state machine handed it off (a probe request).
    pub(crate) handed_off: Option<T>,
    /// The session that ran on the connection, for the next connection.
    pub(crate) session: Option<Session>,
    /// Whether the handshake completed.
    pub(crate) established: bool,
}

/// Runs one connection to its end.
///
/// The state machine is boxed: an async fn keeps its arguments in the future twice (once
/// before the first poll, once in the body), and `Conn` is the largest of them.
pub(crate) async fn drive<T: Transport, S: Sink>(
    mut io: T,
    mut conn: Box<Conn>,
    shared: Arc<Shared>,
    mut sink: S,
) -> Ended<T> {
    let mut established = false;
    let sleep =
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    let mut read_done = false;
    let mut write_failed = false;
    let mut closing_since: Option<Instant> = None;
    let mut shut_down = false;
    let mut last_write: Option<Instant> = None;
    let mut result: Option<Disconnect> = None;

    poll_fn(|cx: &mut Context<'_>| -> Poll<()> {
        loop {
            let now = now();
            let was_established = conn.is_established();
            // 1. Commands from the handles.
            let paused;
            // The length of the next outbox message when the outbox could not be drained
            // because the transmit buffer was at its high-water mark.
            let mut waiting_front: Option<usize> = None;
            {
                let mut inner = shared.lock();
                match &inner.driver {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => inner.driver = Some(cx.waker().clone()),
                }
                if conn.is_established() {
                    let mut moved = false;
                    while conn.pending_transmit().len() < TRANSMIT_HIGH_WATER {
                        // With a session, a full replay buffer leaves the message in the
                        // outbox until the peer's ACK makes room (back-pressure, no loss).
                        let Some(len) = inner.outbox.front().map(Bytes::len) else {
                            break;
                        };
                        if !conn.can_send(len) {
                            break;
                        }
                        let Some(msg) = inner.outbox.pop_front() else {
                            break;
                        };
                        inner.outbox_bytes -= msg.len();
                        moved = true;
                        if let Err(e) = conn.send_bytes(now, &msg) {
                            tracing::debug!(error = %e, "message dropped by the state machine");
                        }
                    }
                    if moved {
                        shared.space.notify_waiters();
                    }
                    waiting_front = inner.outbox.front().map(Bytes::len);
                }
                // An orderly close goes out after the messages queued before it.
                if inner.outbox.is_empty() || !conn.is_established() {
                    if let Some((code, text)) = inner.close.take() {
                        conn.close(now, code, &text);
                    }
                }
                paused = inner.inbox_bytes > shared.limits.inbox_bytes
                    || shared.backlog.as_ref().is_some_and(|b| b.over(cx.waker()));
            }

            // 2. Read. A full inbox pauses reading (the application is the bottleneck, not the
            // peer), so the kernel applies back-pressure to the sender.
            let mut reads = 0;
            while !read_done && reads < READS_PER_WAKE && (!paused || conn.is_closed()) {
                // Uninitialised: zeroing 16 KiB on every read attempt (Pending ones included)
                // was most of the driver's CPU time. `ReadBuf` tracks what was filled.
                let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut rb = ReadBuf::uninit(&mut buf);
                match Pin::new(&mut io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        reads += 1;
                        if rb.filled().is_empty() {
                            read_done = true;
                            conn.handle_eof(now);
                        } else {
                            conn.handle_input(now, rb.filled());
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        read_done = true;
                        let wrote = last_write.is_some_and(|w| w >= conn.last_rx());
                        let err = transport_error(&io, &e, wrote);
                        conn.handle_transport_error(now, err);
                    }
                    Poll::Pending => break,
                }
            }
            if paused && !conn.is_closed() && io.poll_unread(cx) != Some(false) {
                // Bytes wait in the kernel (or the transport cannot tell): the peer is alive,
                // our application is the bottleneck. A peer with nothing waiting is silent
                // and is still declared dead on time.
                conn.note_alive(now);
            }

            // 3. Timers.
            if conn.poll_timeout().is_some_and(|d| now >= d) {
                conn.handle_timeout(now);
            }

            // 4. Events (HELLO decisions queue bytes, so before writing).
            deliver(
                &mut conn,
                &mut sink,
                &shared,
                now,
                &mut result,
                &mut established,
            );

            // 5. Write.
            let mut wrote_any = false;
            while !write_failed && !conn.pending_transmit().is_empty() {
                match Pin::new(&mut io).poll_write(cx, conn.pending_transmit()) {
                    Poll::Ready(Ok(0)) => write_failed = true,
                    Poll::Ready(Ok(n)) => {
                        conn.transmitted(n);
                        wrote_any = true;
                    }
                    Poll::Ready(Err(e)) => {
                        write_failed = true;
                        let err = transport_error(&io, &e, true);
                        conn.handle_transport_error(now, err);
                    }
                    Poll::Pending => break,
                }
            }
            if wrote_any {
                last_write = Some(now);
                let _ = Pin::new(&mut io).poll_flush(cx);
            }
            deliver(
                &mut conn,
                &mut sink,
                &shared,
                now,
                &mut result,
                &mut established,
            );
            shared.stats.update(&conn);

            // 6. Finish.
            if conn.is_handed_off() {
                return Poll::Ready(());
            }
            if conn.is_closed() {
                // Abort (RST) when the peer or the path failed: the kernel must not keep
                // retransmitting into a dead path. Refusals and protocol errors close in order
                // so the peer can read the REFUSE or CLOSE frame that explains why.
                let failure = result.as_ref().is_none_or(|d| {
                    matches!(
                        d.reason,
                        DisconnectReason::HeartbeatTimeout
                            | DisconnectReason::KeepaliveTimeout
                            | DisconnectReason::UserTimeout
                            | DisconnectReason::PeerReset
                            | DisconnectReason::Io(_)
                    )
                });
                let since = *closing_since.get_or_insert_with(|| {
                    if failure {
                        io.abort_on_close();
                    }
                    now
                });
                if failure || write_failed {
                    return Poll::Ready(());
                }
                if conn.pending_transmit().is_empty() && !shut_down {
                    // Orderly: FIN after the CLOSE frame, then wait (bounded) for the peer's FIN
                    // so that no unread data turns our close into an RST.
                    match Pin::new(&mut io).poll_shutdown(cx) {
                        Poll::Ready(_) => shut_down = true,
                        Poll::Pending => {}
                    }
                }
                if (shut_down && read_done) || now >= since + CLOSE_LINGER {
                    return Poll::Ready(());
                }
                // Keep draining reads (discarded by the closed state machine) until EOF.
                if shut_down && !read_done {
                    let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                    let mut rb = ReadBuf::uninit(&mut buf);
                    match Pin::new(&mut io).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(()),
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Pending => {}
                    }
                }
            }

            // 7. Sleep until the next deadline. Re-arm only when it moved *earlier*: traffic
            // keeps pushing the heartbeat deadline later, and re-arming the timer on every
            // wake-up would cost more than one early wake-up, which is harmless (the state
            // machine re-checks its deadlines and we re-arm then).
            let deadline = match (conn.poll_timeout(), closing_since) {
                (Some(d), Some(c)) => Some(d.min(c + CLOSE_LINGER)),
                (d, c) => d.or(c.map(|c| c + CLOSE_LINGER)),
            };
            if let Some(d) = deadline {
                if armed.is_none_or(|a| d < a) {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(d));
                    armed = Some(d);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    armed = None;
                    continue;
                }
            }
            // The handshake completed in this pass (WELCOME read, or HELLO accepted): step 1
            // skipped the outbox while it was pending, so go back for what the application
            // queued before or during the handshake. Nothing else would wake us for it
            // before the next timer (a heartbeat interval later).
            if !was_established && conn.is_established() {
                continue;
            }
            // The socket took everything: go back for the rest of the outbox (nothing else
            // would wake us for it).
            if let Some(len) = waiting_front {
                if !write_failed
                    && !conn.is_closed()
                    && conn.pending_transmit().len() < TRANSMIT_HIGH_WATER
                    && conn.can_send(len)
                {
                    continue;
                }
            }
            if reads == READS_PER_WAKE {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
    })
    .await;

    let d = result.unwrap_or(Disconnect {
        reason: DisconnectReason::LocalClose,
        silent_for: Duration::ZERO,
    });
    if !shared.persistent {
        shared.finish(d.clone());
    }
    Ended {
        disconnect: d,
        handed_off: conn.is_handed_off().then_some(io),
        session: conn.take_session(),
        established,
    }
}

fn deliver<S: Sink>(
    conn: &mut Conn,
    sink: &mut S,
    shared: &Shared,
    now: Instant,
    result: &mut Option<Disconnect>,
    established: &mut bool,
) {
    while let Some(ev) = conn.poll_event() {
        match ev {
            ConnEvent::Hello(h) => match sink.hello(now, &h) {
                Decision::Accept(cfg, session) => conn.accept(now, cfg, session.map(|b| *b)),
                Decision::Refuse(code, text) => conn.refuse(now, code, &text),
            },
            ConnEvent::Closed(d) => {
                *result = Some(d.clone());
                // Messages before the end reach the application before the end does.
                sink.flush(shared);
                if !shared.persistent {
                    shared.finish(d.clone());
                }
                sink.event(shared, ConnEvent::Closed(d));
            }
            ev @ ConnEvent::Established(_) => {
                *established = true;
                sink.event(shared, ev);
            }
            ev => sink.event(shared, ev),
        }
    }
    sink.flush(shared);
}

/// Pushes a received message into a standalone connection's inbox.
pub(crate) fn push_inbox(shared: &Shared, msgs: Vec<Bytes>) {
    let mut inner = shared.lock();
    for msg in msgs {
        inner.inbox_bytes += msg.len();
        inner.inbox.push_back(msg);
    }
    if let Some(w) = inner.recv.take() {
        w.wake();
    }
}

/// Takes the next message from the inbox, or the disconnect once it is empty and closed.
pub(crate) fn poll_recv(shared: &Shared, cx: &mut Context<'_>) -> Poll<Result<Bytes, Disconnect>> {
    let mut inner = shared.lock();
    if let Some(m) = inner.inbox.pop_front() {
        let was_paused = inner.inbox_bytes > shared.limits.inbox_bytes;
        inner.inbox_bytes -= m.len();
        if was_paused && inner.inbox_bytes <= shared.limits.inbox_bytes {
            if let Some(w) = inner.driver.take() {
                w.wake();
            }
        }
        return Poll::Ready(Ok(m));
    }
    if let Some(d) = &inner.done {
        return Poll::Ready(Err(d.clone()));
    }
    match &inner.recv {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => inner.recv = Some(cx.waker().clone()),
    }
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::ConnConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The far end of an in-memory transport, run by the core's own server state machine.
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

        /// Reads until the state machine has an event; answers a HELLO with `accept`.
        async fn next_event(&mut self, accept: &LivenessConfig) -> ConnEvent {
            loop {
                if let Some(ev) = self.conn.poll_event() {
                    if let ConnEvent::Hello(_) = ev {
                        self.conn.accept(now(), accept.clone(), None);
                        self.flush().await;
                    }
                    return ev;
                }
                let mut buf = [0u8; 4096];
                let n = self.io.read(&mut buf).await.unwrap();
                self.conn.handle_input(now(), &buf[..n]);
                if n == 0 {
                    self.conn.handle_eof(now());
                }
            }
        }

        async fn flush(&mut self) {
            let out = self.conn.pending_transmit().to_vec();
            self.io.write_all(&out).await.unwrap();
            self.conn.transmitted(out.len());
        }
    }

    fn client_conn(h: Duration) -> Box<Conn> {
        let hello = Hello {
            client_id: "c".into(),
            requested_heartbeat: h,
            want_session: false,
            resume: None,
            credential: None,
        };
        Box::new(Conn::client(
            now(),
            ConnConfig::default(),
            &hello,
            LivenessConfig::new(h, h * 3),
            None,
        ))
    }

    /// A message queued before the connection started and one queued while the HELLO is in
    /// flight both go out in the same instant the WELCOME arrives, not a heartbeat later.
    #[tokio::test(start_paused = true)]
    async fn messages_queued_before_and_during_the_handshake_go_out_right_after_welcome() {
        let h = Duration::from_secs(10);
        let (io, far) = tokio::io::duplex(64 * 1024);
        let shared = Shared::new(Limits::default());
        assert!(shared.try_send(Bytes::from_static(b"before")));
        tokio::spawn(drive(io, client_conn(h), shared.clone(), NoSink));
        let mut peer = Peer::server(far);
        // Read the HELLO but answer only later: the handshake is in progress.
        let mut buf = [0u8; 4096];
        let n = peer.io.read(&mut buf).await.unwrap();
        peer.conn.handle_input(now(), &buf[..n]);
        assert!(matches!(peer.conn.poll_event(), Some(ConnEvent::Hello(_))));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(shared.try_send(Bytes::from_static(b"during")));
        tokio::time::sleep(Duration::from_millis(5)).await;
        peer.conn.accept(now(), LivenessConfig::new(h, h * 3), None);
        let welcomed = tokio::time::Instant::now();
        peer.flush().await;
        let accept = LivenessConfig::new(h, h * 3);
        assert!(matches!(
            peer.next_event(&accept).await,
            ConnEvent::Established(_)
        ));
        for want in [&b"before"[..], b"during"] {
            match peer.next_event(&accept).await {
                ConnEvent::Message(m) => assert_eq!(&m[..], want),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                tokio::time::Instant::now() - welcomed,
                Duration::ZERO,
                "the queued message waited for a timer"
            );
        }
    }

    struct NoSink;
    impl Sink for NoSink {
        fn event(&mut self, _shared: &Shared, _ev: ConnEvent) {}
    }

    /// Every idle connection keeps one of these futures alive: keep it small (the state
    /// machine lives behind a `Box`).
    #[test]
    fn the_connection_future_stays_small() {
        let (io, _peer) = tokio::io::duplex(64);
        let now = Instant::now();
        let conn = Box::new(Conn::server(now, tether_proto::ConnConfig::default()));
        let fut = drive(io, conn, Shared::new(Limits::default()), NoSink);
        let size = std::mem::size_of_val(&fut);
        println!("drive future: {size} bytes");
        assert!(
            size <= 1024,
            "the per-connection future grew to {size} bytes"
        );
    }
}
