//! Accepting connections: the limits that keep an idle flood from locking clients out, and
//! one connection's task from accept to end.
//!
//! ```text
//!  accept ─▶ fd bound? ─▶ per-source bound? ─▶ handshake slots (full: refuse the oldest)
//!          ─▶ task: driver (Conn::server, ServerSink) ─▶ lifecycle `ended`
//!               │  idle (plain TCP): the task ends, the driver parks in the server's lot;
//!               └─ with work again: the lot spawns the same task function (`tcp_task`)
//! ```
//!
//! Admission has its own small lock (pending handshakes and per-source counts); nothing
//! else is locked while it is held.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::poll_fn;
use std::time::SystemTime;

use bytes::Bytes;
use tether_proto::addr::PackedAddr;
use tether_proto::codec::{self, Credential, Frame, Hello};
use tether_proto::{check_client_id, CloseCode, Conn, ConnEvent, Disconnect, DisconnectReason};
use tokio::net::{TcpListener, TcpStream};

use super::events::ServerEvent;
use super::lifecycle::{lock, Admitted};
use super::thin::ThinId;
use super::Inner;
use crate::auth::{AuthDecision, AuthRequest, Denial, PendingDecision, Principal, PrincipalKey};
use crate::driver::{self, Command, Decision, RefreshAnswer, Resolution, Resolved, Shared, Sink};
use crate::sockopt;
use crate::tls::{ServerTlsStream, TlsServer};
use crate::transport::{Tcp, Transport};

/// Connections still in the handshake (oldest first) and open connections per source.
#[derive(Debug, Default)]
pub(super) struct Admission {
    state: Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    pending: BTreeMap<u64, Arc<Shared>>,
    per_source: HashMap<IpAddr, usize>,
}

impl Admission {
    /// Counts a new connection from `ip`; false when the source is at its limit.
    fn open(&self, ip: IpAddr, limit: usize) -> bool {
        let mut s = lock(&self.state);
        let n = s.per_source.entry(ip).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `ip` ended.
    fn close(&self, ip: IpAddr) {
        let mut s = lock(&self.state);
        if let Some(n) = s.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                s.per_source.remove(&ip);
            }
        }
    }

    /// Registers connection `conn_id` as handshaking; returns the oldest one to refuse when
    /// that makes more than `limit`.
    fn start_handshake(
        &self,
        conn_id: u64,
        shared: Arc<Shared>,
        limit: usize,
    ) -> Option<Arc<Shared>> {
        let mut s = lock(&self.state);
        s.pending.insert(conn_id, shared);
        if s.pending.len() > limit {
            return s.pending.pop_first().map(|(_, sh)| sh);
        }
        None
    }

    /// Connection `conn_id` is out of the handshake (it said HELLO, or it ended).
    fn end_handshake(&self, conn_id: u64) {
        lock(&self.state).pending.remove(&conn_id);
    }

    /// Connections in the handshake.
    pub(super) fn handshaking(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// Every connection still in the handshake.
    pub(super) fn pending(&self) -> Vec<Arc<Shared>> {
        lock(&self.state).pending.values().cloned().collect()
    }
}

pub(super) async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let per_source = inner.cfg.get_max_connections_per_source();
    // Beyond this many open sockets, drop at once: established plus handshaking plus a
    // small allowance for answering refusals.
    let fd_bound = inner
        .max_connections
        .saturating_add(inner.cfg.max_handshakes)
        .saturating_add(64);
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (or socket memory): the pending connection stays in
                // the kernel's queue and the listener stays readable, so retrying at once
                // would spin. Wait until a connection ends (or 100 ms, for descriptors freed
                // elsewhere in the process), then try again.
                let exhausted = sockopt::is_resource_exhaustion(&e);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %e, exhausted, "accept failed");
                    last_warning = Some(Instant::now());
                }
                if exhausted {
                    let ended = inner.signals.conn_ended.notified();
                    let _ = tokio::time::timeout(Duration::from_millis(100), ended).await;
                }
                continue;
            }
        };
        if inner.open.load(Relaxed) >= fd_bound || !inner.admission.open(remote.ip(), per_source) {
            inner.totals.refused.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        }
        inner.open.fetch_add(1, Relaxed);
        let conn_id = inner.next_conn_id.fetch_add(1, Relaxed);
        let shared = Shared::with(&inner.conn_settings);
        let evicted =
            inner
                .admission
                .start_handshake(conn_id, shared.clone(), inner.cfg.max_handshakes);
        if let Some(oldest) = evicted {
            oldest.command(Command::Refuse(
                CloseCode::SERVER_FULL,
                "too many connections in the handshake".into(),
            ));
        }
        // Detached: aborting the accept loop (shutdown) must not abort connections, which
        // still have to send their CLOSE frames.
        tokio::spawn(run_connection(
            stream,
            remote,
            conn_id,
            shared,
            inner.clone(),
        ));
    }
}

/// One accepted connection's task. Not async itself: every idle connection keeps this
/// future, so it is assembled from parts that are only as big as they need to be — the
/// plain-TCP driver future plus a few words (an async fn would also keep its arguments, and
/// room for the TLS handshake, across the await).
fn run_connection(
    stream: TcpStream,
    remote: SocketAddr,
    conn_id: u64,
    shared: Arc<Shared>,
    inner: Arc<Inner>,
) -> impl std::future::Future<Output = ()> + Send {
    use futures::future::Either;
    if let Err(e) = sockopt::apply(&stream, &inner.cfg.policy) {
        tracing::debug!(%remote, error = %e, "cannot set socket options");
    }
    // The handshake deadline counts from the accept: a TLS handshake is part of it.
    let started = driver::now();
    match inner.cfg.tls.clone() {
        None => {
            let start = Connection {
                remote,
                conn_id,
                started,
                shared: &shared,
                inner: &inner,
            }
            .start_tcp(stream);
            drop((shared, inner));
            Either::Left(tcp_task(start))
        }
        // Boxed: the TLS handshake and the TLS stream are several KiB of future, and every
        // idle plain connection would carry that room in its task otherwise.
        Some(tls) => Either::Right(Box::pin(async move {
            Connection {
                remote,
                conn_id,
                started,
                shared: &shared,
                inner: &inner,
            }
            .serve_tls(tls, stream)
            .await;
            connection_gone(&inner, &shared, remote);
        })),
    }
}

/// A plain-TCP connection's task, from the accept or unparked by the server's lot (the same
/// function either way, so the end below runs exactly once, in whichever task ends the
/// connection). A wake-up that leaves the connection idle moves it to the lot and ends the
/// task (`driver::resume` gives `None`).
///
/// Only the driver's future is kept across the await: what the end needs (the server, the
/// shared state, the address, the id) comes back in its sink, so the task does not hold a
/// second copy of it (issue 17). (A combinator, not an async block: an async block would
/// keep the driver's future and what follows it side by side instead of in the same room.)
fn tcp_task(
    start: driver::Resume<Tcp, ServerSink>,
) -> impl std::future::Future<Output = ()> + Send {
    use futures::future::{Either, FutureExt as _};
    driver::resume(start).then(|ended| {
        let Some(ended) = ended else {
            return Either::Left(std::future::ready(()));
        };
        let inner = ended.sink.inner.clone();
        let shared = ended.shared.clone();
        let remote = ended.sink.remote.get();
        let probe = driver_ended(ended);
        Either::Right(async move {
            if let Some((stream, req)) = probe {
                // Boxed: rare, and it would otherwise take room in every task.
                Box::pin(crate::probe::respond(stream, req)).await
            }
            connection_gone(&inner, &shared, remote);
        })
    })
}

/// The server lot's way back: a parked connection that has work again gets its task; one
/// that ended in the lot (a dead peer's deadline fired, the peer closed) is reported where
/// the lot runs. A lot thread's spawn lands in the runtime's global queue, which busy
/// workers look at last: the Offline of a dead peer must not wait there behind the load
/// (issue 17 target 3).
pub(super) fn unpark(r: driver::Resume<Tcp, ServerSink>) {
    match r.into_ended() {
        Ok(ended) => {
            let inner = ended.sink.inner.clone();
            let shared = ended.shared.clone();
            let remote = ended.sink.remote.get();
            match driver_ended(ended) {
                // A probe is never parked (it is not established); its task if it were.
                Some((stream, req)) => {
                    tokio::spawn(async move {
                        Box::pin(crate::probe::respond(stream, req)).await;
                        connection_gone(&inner, &shared, remote);
                    });
                }
                None => connection_gone(&inner, &shared, remote),
            }
        }
        Err(r) => {
            tokio::spawn(tcp_task(r));
        }
    }
}

/// The driver is done: tells the lifecycle, or gives back the transport and the request of a
/// `tether probe` connection (its first frame was PROBE; it is no client). What it needs
/// comes back in the sink (the task keeps no copy of it beside the driver).
fn driver_ended<T>(ended: driver::Ended<T, ServerSink>) -> Option<(T, Bytes)> {
    let sink = ended.sink;
    let shared = ended.shared;
    let inner = &sink.inner;
    inner.admission.end_handshake(sink.conn_id);
    let probe = sink.auth.and_then(|a| match a.aside.map(|b| *b) {
        Some(Aside::Probe(req)) => Some(req),
        _ => None,
    });
    match (ended.handed_off, probe) {
        (Some(stream), Some(req)) => Some((stream, req)),
        _ => {
            inner.ended(
                driver::now(),
                sink.conn_id,
                sink.client_id.as_deref(),
                sink.remote.get(),
                ended.disconnect,
                ended.session,
                &shared,
            );
            None
        }
    }
}

/// The connection's socket is closed: its counters go to the totals, its slots back.
fn connection_gone(inner: &Inner, shared: &Shared, remote: SocketAddr) {
    inner.totals.fold(&shared.stats.snapshot());
    inner.admission.close(remote.ip());
    inner.open.fetch_sub(1, Relaxed);
    inner.signals.conn_ended.notify_waiters();
}

/// One accepted connection, from its transport to its end.
struct Connection<'a> {
    remote: SocketAddr,
    conn_id: u64,
    started: Instant,
    shared: &'a Arc<Shared>,
    inner: &'a Arc<Inner>,
}

impl Connection<'_> {
    /// The TLS handshake, then the tether protocol over the TLS stream.
    async fn serve_tls(&self, tls: Arc<TlsServer>, stream: TcpStream) {
        let deadline = self.started + self.inner.cfg.handshake_timeout;
        match tls_handshake(&tls, stream, self.shared, deadline).await {
            Ok(stream) => {
                let principal = match crate::tls::peer_principal(&stream) {
                    None => None,
                    Some(Ok(p)) => Some(p),
                    Some(Err(e)) => {
                        tracing::debug!(remote = %self.remote, error = %e, "client certificate names no principal");
                        None
                    }
                };
                self.serve(stream, principal).await
            }
            Err(reason) => self.failed(reason),
        }
    }

    /// Runs the tether protocol over `io` (TCP, or TLS with the client certificate's
    /// principal) until the connection ends.
    async fn serve<T: Transport>(&self, io: T, tls_principal: Option<Principal>) {
        let ended = self.drive(io, tls_principal).await;
        if let Some((stream, req)) = self.ended(ended) {
            Box::pin(crate::probe::respond(stream, req)).await
        }
    }

    /// The driver is done: tells the lifecycle, or gives back the transport and the request
    /// of a `tether probe` connection (its first frame was PROBE; it is no client). Not
    /// async, so what the driver handed back is not kept in the task across an await.
    fn ended<T>(&self, ended: driver::Ended<T, ServerSink>) -> Option<(T, Bytes)> {
        driver_ended(ended)
    }

    /// What [`serve`](Self::serve) awaits. Not async: the state machine and the sink are
    /// moved into the driver's future before it exists, so the task holds them once (an
    /// async fn would keep room for its locals across the await).
    fn drive<T: Transport>(
        &self,
        io: T,
        tls_principal: Option<Principal>,
    ) -> impl std::future::Future<Output = driver::Ended<T, ServerSink>> + Send {
        let (conn, sink) = self.parts(tls_principal);
        driver::drive(io, conn, self.shared.clone(), sink)
    }

    /// A plain-TCP connection's driver, parked in the server's lot while idle.
    fn start_tcp(&self, io: TcpStream) -> driver::Resume<Tcp, ServerSink> {
        let (conn, sink) = self.parts(None);
        let lot = self.inner.lot.clone();
        driver::start(Tcp::from(io), conn, self.shared.clone(), sink, lot)
    }

    /// The state machine and the sink of a new connection.
    fn parts(&self, tls_principal: Option<Principal>) -> (Conn, ServerSink) {
        let inner = self.inner;
        let conn = Conn::server(self.started, inner.conn_cfg.clone());
        let auth = (inner.cfg.authorize.is_some() || tls_principal.is_some()).then(|| {
            Box::new(SinkAuth {
                tls_principal,
                principal: None,
                pending: None,
                aside: None,
                fetched: false,
            })
        });
        let sink = ServerSink {
            inner: inner.clone(),
            conn_id: self.conn_id,
            remote: PackedAddr::new(self.remote),
            client_id: None,
            session: None,
            auth,
        };
        (conn, sink)
    }

    /// The TLS handshake failed, timed out or was cut short: a refused connection.
    fn failed(&self, reason: DisconnectReason) {
        let now = driver::now();
        let d = Disconnect {
            reason,
            silent_for: now.saturating_duration_since(self.started),
        };
        self.shared.finish(d.clone());
        self.inner.admission.end_handshake(self.conn_id);
        self.inner
            .ended(now, self.conn_id, None, self.remote, d, None, self.shared);
    }
}

/// What a plain-TCP tether client is told by a TLS listener.
const REQUIRES_TLS: &str = "this server requires TLS: connect with TLS (tether connect --tls)";

/// The server side of a TLS handshake, within the tether handshake's deadline, and cut
/// short when the connection is evicted from the handshake slots or the server shuts down.
async fn tls_handshake(
    tls: &TlsServer,
    stream: TcpStream,
    shared: &Shared,
    deadline: Instant,
) -> Result<ServerTlsStream<TcpStream>, DisconnectReason> {
    let work = async {
        // A client speaking plain tether (its preamble starts with 'T'; a TLS record with
        // 0x16) is told why in its own protocol instead of getting a TLS alert it cannot read.
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) => return Err(DisconnectReason::PeerClosed),
            Ok(_) => {}
            Err(e) => return Err(DisconnectReason::from_io_error(&e)),
        }
        if first[0] == codec::MAGIC[0] {
            refuse_plain(stream).await;
            return Err(DisconnectReason::Refused {
                code: CloseCode::BAD_HELLO,
                text: REQUIRES_TLS.into(),
            });
        }
        tls.acceptor()
            .accept(stream)
            .await
            .map_err(|e| DisconnectReason::ProtocolError(format!("tls handshake failed: {e}")))
    };
    let command = poll_fn(|cx| shared.poll_command(cx));
    tokio::select! {
        r = work => r,
        cmd = command => Err(match cmd {
            Command::Refuse(code, text)
            | Command::Close(code, text)
            | Command::CloseNow(code, text)
            | Command::Abandon(code, text) => {
                DisconnectReason::Refused { code, text }
            }
        }),
        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
            Err(DisconnectReason::ProtocolError("handshake timeout (in the tls handshake)".into()))
        }
    }
}

/// Answers a plain tether client on a TLS listener: preamble + REFUSE(BAD_HELLO), then an
/// orderly close once its HELLO was read (bounded by the caller's deadline), so the REFUSE
/// is not lost to a reset.
async fn refuse_plain(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = bytes::BytesMut::new();
    codec::encode_preamble(&mut out);
    codec::encode(
        &Frame::Refuse {
            code: CloseCode::BAD_HELLO,
            text: REQUIRES_TLS.into(),
        },
        &mut out,
    );
    if stream.write_all(&out).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Authentication state of a server connection (boxed: most idle connections of a server
/// without authorization carry none).
struct SinkAuth {
    /// The client certificate's principal (mutual TLS).
    tls_principal: Option<Principal>,
    /// The principal the connection was accepted as.
    principal: Option<Principal>,
    /// The HELLO while the authorizer decides.
    pending: Option<Hello>,
    /// Set aside, boxed (rare): the HELLO while the session source fetches the session it
    /// resumes, or a probe request.
    aside: Option<Box<Aside>>,
    /// The session source was asked once already (it is asked at most once per connection).
    fetched: bool,
}

/// What a connection sets aside in its [`SinkAuth`] (one box for either: a connection whose
/// first frame is PROBE sends no HELLO).
enum Aside {
    /// A HELLO admitted and waiting for the session source.
    Fetching(Fetching),
    /// A probe request (the connection's first frame was PROBE).
    Probe(Bytes),
}

/// A HELLO admitted and waiting for the session source.
struct Fetching {
    hello: Hello,
    principal: Option<PrincipalKey>,
    ttl: Option<Duration>,
}

/// Connects one connection's events to the server: the HELLO to authorization and then the
/// lifecycle, messages to the event stream, liveness changes to presence. The end is handled
/// after the task (`Inner::ended`), when the session is back from the state machine.
pub(super) struct ServerSink {
    inner: Arc<Inner>,
    conn_id: u64,
    /// 16 bytes (a `SocketAddr` takes 32: issue 17, the sink lives in every parked entry).
    remote: PackedAddr,
    /// Set once the HELLO was accepted (shared with the client's record).
    client_id: Option<ThinId>,
    /// The session the connection runs, once accepted (session ids start at 1).
    session: Option<NonZeroU64>,
    /// Authentication, when the server authorizes or the client presented a certificate,
    /// and a probe request (boxed: rare; one box for both, 8 B less in every parked entry).
    auth: Option<Box<SinkAuth>>,
}

impl ServerSink {
    fn auth(&mut self) -> &mut SinkAuth {
        self.auth.get_or_insert_with(|| {
            Box::new(SinkAuth {
                tls_principal: None,
                principal: None,
                pending: None,
                aside: None,
                fetched: false,
            })
        })
    }

    /// The HELLO set aside for the session source, if it is what waits.
    fn take_fetching(&mut self) -> Option<Fetching> {
        let a = self.auth.as_mut()?;
        if !matches!(a.aside.as_deref(), Some(Aside::Fetching(_))) {
            return None;
        }
        match a.aside.take().map(|b| *b) {
            Some(Aside::Fetching(f)) => Some(f),
            _ => None,
        }
    }

    fn refuse(&self, code: CloseCode, text: String) -> Decision {
        self.inner.admission.end_handshake(self.conn_id);
        Decision::Refuse(code, text)
    }

    /// THROTTLED when the source address failed too often.
    fn throttled(&self) -> Option<Decision> {
        let t = self.inner.throttle.as_ref()?;
        let Err(t) = lock(t).check(self.remote.get().ip(), driver::now()) else {
            return None;
        };
        Some(self.refuse(
            CloseCode::THROTTLED,
            format!(
                "too many failed attempts from this address; retry in {}",
                tether_proto::duration::Human::ms(t.retry_after)
            ),
        ))
    }

    /// The request the authorizer judges.
    fn request<'a>(&'a self, client_id: &'a str, credential: Option<&'a [u8]>) -> AuthRequest<'a> {
        AuthRequest::new(client_id, SystemTime::now())
            .credential(credential)
            .remote(Some(self.remote.get()))
            .tls_principal(self.auth.as_ref().and_then(|a| a.tls_principal.as_ref()))
    }

    /// Awaits a pending verdict on a task of its own (at most the handshake timeout) and
    /// hands it to the connection's task.
    fn defer(
        &self,
        shared: &Arc<Shared>,
        decision: PendingDecision,
        wrap: fn(AuthDecision) -> Resolved,
    ) {
        let shared = Arc::downgrade(shared);
        let limit = self.inner.cfg.handshake_timeout;
        tokio::spawn(async move {
            let d = tokio::time::timeout(limit, decision)
                .await
                .unwrap_or_else(|_| {
                    AuthDecision::Deny(Denial::unauthorized("authorization timed out"))
                });
            if let Some(shared) = shared.upgrade() {
                shared.resolve(wrap(d));
            }
        });
    }

    /// Acts on the authorizer's verdict on `hello`.
    fn judged(
        &mut self,
        shared: &Arc<Shared>,
        now: Instant,
        hello: &Hello,
        d: AuthDecision,
    ) -> Decision {
        let p = match d {
            AuthDecision::Allow(p) => p,
            AuthDecision::Deny(d) => {
                self.inner.record_failure(self.remote.get());
                return self.refuse(d.code, d.text);
            }
            AuthDecision::Pending(_) => {
                return self.refuse(
                    CloseCode::UNAUTHORIZED,
                    "authorization did not decide".into(),
                )
            }
        };
        // Checked here too, whatever the hook: a principal for another id, or expired, is
        // never accepted.
        let wall = SystemTime::now();
        if p.is_expired(wall) {
            self.inner.record_failure(self.remote.get());
            return self.refuse(CloseCode::UNAUTHORIZED, "credential expired".into());
        }
        if !p.allows(&hello.client_id) {
            self.inner.record_failure(self.remote.get());
            return self.refuse(
                CloseCode::ID_NOT_ALLOWED,
                format!("{} may not use client id {:?}", p.key(), hello.client_id),
            );
        }
        let ttl = Some(p.wire_ttl(wall)).filter(|t| !t.is_zero());
        let key = p.key();
        let d = self.connect(shared, now, hello, Some(&key), ttl);
        if let Decision::Accept(..) | Decision::Pending = d {
            self.auth().principal = Some(p);
        }
        d
    }

    /// Asks the session source for the session `hello` resumes when this server does not
    /// hold it (once per connection): `Some(Pending)` while it fetches. What it finds is
    /// installed as a held session on the fetch's own task — whether or not this connection
    /// is still there to resume it — and then the connection's task runs the normal
    /// transition ([`resolved`](Sink::resolved) → [`connect`](Self::connect)).
    fn fetch_session(
        &mut self,
        shared: &Arc<Shared>,
        hello: &Hello,
        principal: Option<&PrincipalKey>,
        ttl: Option<Duration>,
    ) -> Option<Decision> {
        let source = self.inner.cfg.session_source.clone()?;
        let r = hello.resume.as_ref()?;
        self.inner.cfg.session_linger.filter(|l| !l.is_zero())?;
        if self.auth.as_ref().is_some_and(|a| a.fetched)
            || self.inner.clients.session_of(&hello.client_id) == Some(r.session_id)
        {
            return None;
        }
        let req = crate::server::handover::SessionRequest {
            client_id: hello.client_id.clone(),
            session_id: r.session_id,
            token_hash: crate::auth::resume::TokenHash::of(&r.token),
            principal: principal.cloned(),
            last_received: r.last_received,
        };
        let a = self.auth();
        a.fetched = true;
        a.aside = Some(Box::new(Aside::Fetching(Fetching {
            hello: hello.clone(),
            principal: principal.cloned(),
            ttl,
        })));
        let fetch = source.0.fetch(req);
        let shared = Arc::downgrade(shared);
        let inner = self.inner.clone();
        let limit = inner.cfg.handshake_timeout;
        let remote = self.remote.get();
        let client_id = hello.client_id.clone();
        tokio::spawn(async move {
            if let Ok(Some(export)) = tokio::time::timeout(limit, fetch).await {
                if export.client_id() == client_id {
                    // Installed even if the connection is gone: held, then reported lost.
                    if let Err(e) = inner.import(driver::now(), export, None, remote) {
                        tracing::debug!(client = %client_id, error = %e, "fetched session not installed (reported lost)");
                    }
                } else {
                    // A source that answers with another client's session: not this
                    // client's to resume; it is held for its own client.
                    let _ = inner.import(driver::now(), export, None, remote);
                }
            }
            if let Some(shared) = shared.upgrade() {
                shared.resolve(Resolved::SessionFetched);
            }
        });
        Some(Decision::Pending)
    }

    /// The lifecycle transition for an admitted HELLO.
    fn connect(
        &mut self,
        shared: &Arc<Shared>,
        now: Instant,
        hello: &Hello,
        principal: Option<&PrincipalKey>,
        ttl: Option<Duration>,
    ) -> Decision {
        if let Some(d) = self.fetch_session(shared, hello, principal, ttl) {
            return d;
        }
        self.inner.admission.end_handshake(self.conn_id);
        let key = ThinId::from(hello.client_id.as_str());
        let d = self.inner.hello(
            now,
            self.conn_id,
            self.remote.get(),
            shared,
            hello,
            Admitted {
                principal,
                credential_ttl: ttl,
                key: &key,
            },
        );
        if let Decision::Accept(_, session, _) = &d {
            self.client_id = Some(key);
            self.session = session
                .as_ref()
                .and_then(|s| NonZeroU64::new(s.0.session_id));
        }
        d
    }

    /// Acts on the authorizer's verdict on an AUTH.
    fn refreshed(&mut self, d: AuthDecision) -> RefreshAnswer {
        let id = self.client_id.clone().unwrap_or_else(|| ThinId::from(""));
        let p = match d {
            AuthDecision::Allow(p) => p,
            AuthDecision::Deny(d) => {
                self.inner.record_failure(self.remote.get());
                return RefreshAnswer::Refuse(d.text);
            }
            AuthDecision::Pending(_) => {
                return RefreshAnswer::Refuse("authorization did not decide".into())
            }
        };
        let wall = SystemTime::now();
        let current = self.auth().principal.as_ref().map(Principal::key);
        if current.as_ref() != Some(&p.key()) {
            self.inner.record_failure(self.remote.get());
            return RefreshAnswer::Refuse(format!(
                "refreshed credential names {}, not the connection's principal",
                p.key()
            ));
        }
        if p.is_expired(wall) {
            return RefreshAnswer::Refuse("refreshed credential already expired".into());
        }
        if !p.allows(&id) {
            return RefreshAnswer::Refuse(format!(
                "{} may no longer use client id {id:?}",
                p.key()
            ));
        }
        let ttl = Some(p.wire_ttl(wall)).filter(|t| !t.is_zero());
        self.auth().principal = Some(p);
        RefreshAnswer::Ok(ttl)
    }
}

impl Sink for ServerSink {
    fn hello(&mut self, shared: &Arc<Shared>, now: Instant, hello: &Hello) -> Decision {
        if let Err(e) = check_client_id(&hello.client_id) {
            return self.refuse(CloseCode::BAD_HELLO, e.to_string());
        }
        let Some(hook) = self.inner.cfg.authorize.clone() else {
            if hello.resume.is_some() {
                if let Some(d) = self.throttled() {
                    return d;
                }
            }
            return self.connect(shared, now, hello, None, None);
        };
        if let Some(d) = self.throttled() {
            return d;
        }
        let req = self
            .request(&hello.client_id, hello.credential.as_deref())
            .resume(hello.resume.is_some());
        match hook.0.authorize(&req) {
            AuthDecision::Pending(f) => {
                self.auth().pending = Some(hello.clone());
                self.defer(shared, f, Resolved::Hello);
                Decision::Pending
            }
            d => self.judged(shared, now, hello, d),
        }
    }

    fn refresh(
        &mut self,
        shared: &Arc<Shared>,
        _now: Instant,
        credential: &Credential,
    ) -> RefreshAnswer {
        let Some(hook) = self.inner.cfg.authorize.clone() else {
            // Nothing was checked at the HELLO either: the credential does not expire.
            return RefreshAnswer::Ok(None);
        };
        let Some(current) = self.auth.as_ref().and_then(|a| a.principal.clone()) else {
            return RefreshAnswer::Refuse("no principal to refresh".into());
        };
        let id = self.client_id.clone().unwrap_or_else(|| ThinId::from(""));
        let req = self.request(&id, Some(credential));
        match hook.0.refresh(&current, &req) {
            AuthDecision::Pending(f) => {
                self.defer(shared, f, Resolved::Refresh);
                RefreshAnswer::Pending
            }
            d => self.refreshed(d),
        }
    }

    fn resolved(&mut self, shared: &Arc<Shared>, now: Instant, r: Resolved) -> Resolution {
        match r {
            Resolved::Hello(d) => match self.auth().pending.take() {
                Some(hello) => Resolution::Hello(self.judged(shared, now, &hello, d)),
                None => Resolution::Hello(Decision::Pending),
            },
            Resolved::Refresh(d) => Resolution::Refresh(self.refreshed(d)),
            Resolved::Credential(_) => Resolution::Refresh(RefreshAnswer::Pending),
            Resolved::SessionFetched => match self.take_fetching() {
                Some(f) => Resolution::Hello(self.connect(
                    shared,
                    now,
                    &f.hello,
                    f.principal.as_ref(),
                    f.ttl,
                )),
                None => Resolution::Hello(Decision::Pending),
            },
        }
    }

    fn event(&mut self, _shared: &Arc<Shared>, ev: ConnEvent) {
        let inner = &self.inner;
        match ev {
            ConnEvent::Message { payload, seq } => {
                if let Some(id) = &self.client_id {
                    inner.budgets.backlog.take(payload.len());
                    let _ = inner.events.send(ServerEvent::Message {
                        client_id: id.clone().into(),
                        msg: payload,
                        seq,
                        session: self.session.map(NonZeroU64::get),
                    });
                }
            }
            ConnEvent::Suspect { .. } | ConnEvent::Recovered { .. } => {
                if let Some(id) = &self.client_id {
                    let suspect = matches!(ev, ConnEvent::Suspect { .. });
                    inner.liveness_changed(driver::now(), id, self.conn_id, suspect);
                }
            }
            ConnEvent::Resumed { replayed } => {
                if let Some(id) = &self.client_id {
                    let _ = inner.events.send(ServerEvent::Resumed {
                        client_id: id.clone().into(),
                        conn_id: self.conn_id,
                        replayed,
                    });
                }
            }
            ConnEvent::Probe(body) => self.auth().aside = Some(Box::new(Aside::Probe(body))),
            ConnEvent::Hello(_)
            | ConnEvent::Established(_)
            | ConnEvent::Rtt { .. }
            | ConnEvent::SessionLost { .. }
            | ConnEvent::Auth(_)
            | ConnEvent::RefreshCredential { .. }
            | ConnEvent::CredentialRefreshed { .. }
            | ConnEvent::Closed(_) => {}
        }
    }
}

#[cfg(test)]
mod sizes {
    //! What an idle plain-TCP connection keeps in its task (issue 17). Printed with
    //! `cargo test -p tether --lib idle_connection_sizes -- --nocapture`; the bounds fail
    //! when a change makes every idle connection bigger again. Debug builds (what the tests
    //! run) lay futures out less tightly than release; the bounds allow for it.

    use super::*;

    fn size_of_val<T>(_: &T) -> usize {
        std::mem::size_of::<T>()
    }

    #[tokio::test]
    async fn idle_connection_sizes() {
        let server = crate::Server::bind(crate::ServerConfig::new(
            "127.0.0.1:0".parse().expect("an address"),
        ))
        .await
        .expect("bind");
        let inner = server.handle().inner.clone();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _peer = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, remote) = l.accept().await.expect("accept");
        let shared = Shared::with(&inner.conn_settings);
        let task = run_connection(s, remote, 1, shared.clone(), inner.clone());
        let (entry, waker, deadline, slab) = driver::parked_sizes::<Tcp, ServerSink>();
        let rows = [
            // tokio's task cell is the future + 104 B, rounded up to 128 B (x86-64): at most
            // 792 B of future keeps it at 896 B. The state machine is in the future (720 B),
            // not boxed beside it: 896 B in one block against 512 B and a 368 B `Conn`
            // chunk before (408 B of future). Only a connection with work has one: an idle
            // one is parked (the rows below).
            ("task future (run_connection)", size_of_val(&task), 792),
            // A parked connection: its driver in a boxed lot entry with its state machine
            // frozen inline, its slot's wake state (its waker is a number: no allocation),
            // one deadline in the lot's heap (and 8 B of slab slot) instead of the task
            // cell. 216 B, a 224 B chunk: the driver's compact form (`driver::Parked`,
            // without the fields parking implies), its socket parked in one word, 8 B
            // (`transport::ParkedTcp`), the `Conn` frozen without its counters, its liveness
            // engine's heartbeats sent among them (`Shared::stats` has them), the sink's probe
            // request in its authentication box; 224 B (a 240 B chunk) with the socket parked
            // in 16 B (an enum), 232 B while the engine kept its heartbeats sent; 256 B (248
            // B in release) with the whole `Tcp` (40 B, 32 in release); 264 B
            // (256 B in release) with the probe's own box; 304 B (296 B in release) while
            // the frozen `Conn` kept its counters; 352 B (344 B in release, a 352 B chunk)
            // while it kept the whole driver (384 B while the sink kept a 32-byte
            // `SocketAddr` and an `Option<u64>`), against a 224 B entry chunk and a 368 B
            // `Conn` chunk while the `Conn` was boxed (240 B of entry while the sink kept the
            // client id as a 16-byte `Arc<str>`, 256 B while it kept its waker's `Arc`, a 48
            // B chunk; 288 B before the fifth pass).
            ("parked entry (boxed)", entry, 216),
            ("  its slot's wake state", waker, 4),
            // 12 B: the slot's generation is not kept (16 B with it).
            ("  its deadline (lot's heap)", deadline, 12),
            // 8 B: the entry's generation is in its wake state (16 B with a copy of it).
            ("  its slab slot (lot's slab)", slab, 8),
            (
                "  its frozen Conn (inline)",
                std::mem::size_of::<tether_proto::conn::FrozenConn>(),
                120,
            ),
            // 360 B, in the task (and on the stack for a parked connection's wake-up).
            ("Conn (in the task)", std::mem::size_of::<Conn>(), 360),
            (
                "  of which Liveness",
                std::mem::size_of::<tether_proto::Liveness>(),
                144,
            ),
            // 104 B outside tests (two test-only counters add 16; the build checks 104): with
            // the `Arc`'s counts a 128 B chunk (160 B while it kept its queues' byte counts,
            // now in its boxed queues, 192 B while it kept a `Notify` for senders waiting for
            // room, now there too while one waits; 208 B when it kept its limits, budgets and
            // flag itself, 256 B before the fifth pass).
            ("Shared (in an Arc)", std::mem::size_of::<Shared>(), 120),
            // Boxed only while something is queued or waited on, or the connection has a
            // session (its next number) or ended: a 240 B chunk (208 B before it took the
            // byte counts and the waiters' `Notify` from `Shared`; an idle connection with a
            // session still saves 32 B).
            ("  its queues (boxed when used)", Shared::QUEUES_SIZE, 232),
            // 56 B: its remote address packed in 16 B, its session an `Option<NonZeroU64>`,
            // a probe request in the authentication's box (64 B with a box of its own, 88 B
            // with a `SocketAddr` and an `Option<u64>`, 96 B with an `Arc<str>` id).
            (
                "ServerSink (in the task)",
                std::mem::size_of::<ServerSink>(),
                56,
            ),
            // One word: the connection's `Arc` alone, or a box (16 B with the connection
            // and the box side by side, 24 B with the connection id too).
            (
                "Record (per client id)",
                super::super::lifecycle::RECORD_SIZE,
                8,
            ),
            // Its box for a client with a principal or a session: 72 B with the connection,
            // an 80 B chunk as the 64 B box of the principal and session alone was, and the
            // 72 B `PrincipalKey` box before it (80 B, a 96 B chunk, with the key itself
            // beside the session's pointer).
            (
                "  its box (principal, session)",
                super::super::lifecycle::FULL_SIZE,
                72,
            ),
            // 48 B in the registry's slab: a client on its first connection has no box
            // for its counts, end and last counters (64 B with the counts inline and a box
            // each for the end and the counters).
            (
                "presence slot (per client id)",
                tether_proto::presence::SLOT_SIZE,
                48,
            ),
        ];
        for (what, size, bound) in rows {
            eprintln!("{what:<32} {size:>6} B (bound {bound})");
        }
        drop(task);
        for (what, size, bound) in rows {
            assert!(size <= bound, "{what}: {size} B > {bound} B");
        }
    }
}

#[cfg(test)]
mod parked {
    //! Parked plain-TCP connections over real loopback (loose two-sided bounds; the exact
    //! instants are pinned in paused time in `driver/park_tests.rs`).

    use std::time::Duration;

    use bytes::Bytes;
    use tether_proto::{CloseCode, DisconnectReason, Policy};

    use crate::{Connection, Server, ServerConfig, ServerHandle};

    async fn parked_count(h: &ServerHandle) -> usize {
        h.metrics().parked
    }

    /// Waits (up to 5 s) until `n` connections are parked.
    async fn until_parked(h: &ServerHandle, n: usize) {
        for _ in 0..500 {
            if parked_count(h).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} parked, expected {n}", parked_count(h).await);
    }

    /// A send to a parked client arrives as fast as to one with a task of its own (both well
    /// under 200 ms on loopback; typically well under a millisecond); the counts `/status`
    /// shows include parked connections; shutdown closes them with CLOSE(going-away) and
    /// waits for their end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_client_gets_sends_promptly_and_is_closed_by_shutdown() {
        let policy = Policy::builder(Duration::from_secs(6))
            .heartbeat(Duration::from_secs(2))
            .build()
            .expect("a policy");
        for park in [true, false] {
            let cfg = ServerConfig::new("127.0.0.1:0".parse().expect("an address"))
                .policy(policy.clone())
                .park_idle(park);
            let server = Server::bind(cfg).await.expect("bind");
            let h = server.handle();
            let mut clients = Vec::new();
            for i in 0..3 {
                let c = Connection::connect(server.local_addr(), &format!("p{i}"), &policy)
                    .await
                    .expect("connect");
                clients.push(c);
            }
            until_parked(&h, if park { 3 } else { 0 }).await;
            let m = h.metrics();
            assert_eq!((m.connections, m.presence.online), (3, 3), "park {park}");
            for (i, c) in clients.iter_mut().enumerate() {
                let t = std::time::Instant::now();
                h.try_send(&format!("p{i}"), Bytes::from_static(b"ping"))
                    .expect("queued");
                let got = tokio::time::timeout(Duration::from_secs(2), c.recv())
                    .await
                    .expect("delivered")
                    .expect("a message");
                let took = t.elapsed();
                assert_eq!(&got[..], b"ping");
                assert!(
                    took < Duration::from_millis(200),
                    "park {park}: delivered after {took:?}"
                );
            }
            // Idle again: back in the lot.
            until_parked(&h, if park { 3 } else { 0 }).await;
            h.shutdown(Duration::from_secs(3)).await;
            for c in &clients {
                let d = tokio::time::timeout(Duration::from_secs(3), c.closed())
                    .await
                    .expect("closed by the shutdown");
                assert_eq!(
                    d.reason,
                    DisconnectReason::PeerClose {
                        code: CloseCode::GOING_AWAY,
                        text: "server shutting down".into()
                    },
                    "park {park}"
                );
            }
            assert_eq!(h.metrics().connections, 0, "park {park}");
            assert_eq!(parked_count(&h).await, 0);
        }
    }

    /// The server's lot.
    fn lot(h: &ServerHandle) -> &crate::driver::Lot<super::Tcp, super::ServerSink> {
        h.inner.lot.as_ref().expect("the server parks")
    }

    fn short_policy() -> Policy {
        Policy::builder(Duration::from_millis(1200))
            .heartbeat(Duration::from_millis(200))
            .build()
            .expect("a policy")
    }

    /// A parked socket sits in the lot thread's epoll, out of tokio's reactor, and the
    /// client's heartbeats are read and answered there: ten intervals, the connection parked
    /// at every look, no task spawned for it, the client hears the server all along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_socket_answers_heartbeats_from_the_lot_thread_without_a_task() {
        let policy = short_policy();
        let cfg =
            ServerConfig::new("127.0.0.1:0".parse().expect("an address")).policy(policy.clone());
        let server = Server::bind(cfg).await.expect("bind");
        let h = server.handle();
        let c = Connection::connect(server.local_addr(), "hb", &policy)
            .await
            .expect("connect");
        until_parked(&h, 1).await;
        let lot = lot(&h);
        assert_eq!(lot.parked(), 1, "the lot holds it");
        assert!(lot.is_threaded(), "the server's lot runs on a thread");
        let (unparks, hb_in) = (lot.unparks(), c.stats().heartbeats_in);
        let frozen = lot.frozen_reads();
        let t = std::time::Instant::now();
        while t.elapsed() < policy.heartbeat_interval * 10 {
            assert_eq!(parked_count(&h).await, 1, "parked at every look");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(c.disconnected().is_none(), "the client heard the server");
        let answered = c.stats().heartbeats_in - hb_in;
        assert!(
            answered >= 6,
            "{answered} heartbeats answered in ten intervals"
        );
        // Read and answered on the frozen form (no thaw), and counted there: the server's
        // counters agree with the client's (read around them: the server's answers are at
        // least what the client had heard before, its heartbeats in at most what the client
        // had sent after), and its last arrival is recent.
        let taken = lot.frozen_reads() - frozen;
        assert!(taken >= 6, "{taken} reads taken on the frozen form");
        let heard = c.stats();
        let info = h.client("hb").expect("known");
        let server = info.stats.expect("live counters");
        let sent = c.stats();
        assert!(
            server.heartbeats_out >= heard.heartbeats_in,
            "the server counts {} answers, the client heard {}",
            server.heartbeats_out,
            heard.heartbeats_in
        );
        assert!(
            server.heartbeats_in <= sent.heartbeats_out && server.heartbeats_in >= 6,
            "the server counts {} heartbeats in, the client sent {}",
            server.heartbeats_in,
            sent.heartbeats_out
        );
        assert!(server.bytes_in >= 4 * server.heartbeats_in);
        assert!(server.bytes_out >= 4 * server.heartbeats_out);
        let last_rx = server.last_rx.expect("an arrival");
        assert!(
            last_rx.elapsed() < policy.heartbeat_interval * 3,
            "last arrival {:?} ago",
            last_rx.elapsed()
        );
        assert_eq!(
            lot.unparks(),
            unparks,
            "no task was spawned for the connection"
        );
        h.shutdown(Duration::from_secs(3)).await;
    }

    /// A lot whose last connection left waits for the next one on the thread it has: a
    /// server whose one client comes and goes (or parks and unparks by turns) does not start
    /// a thread each time. One worker, so one lot; the second client parks 2 s after the
    /// first left, past every deadline the first left in the lot's heap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_emptied_lot_keeps_its_thread_for_the_next_connection() {
        let policy = short_policy();
        let cfg =
            ServerConfig::new("127.0.0.1:0".parse().expect("an address")).policy(policy.clone());
        let server = Server::bind(cfg).await.expect("bind");
        let h = server.handle();
        assert!(h.inner.lot.is_some(), "one lot");
        let c = Connection::connect(server.local_addr(), "first", &policy)
            .await
            .expect("connect");
        until_parked(&h, 1).await;
        assert_eq!(lot(&h).threads_started(), 1);
        c.close(CloseCode::NORMAL, "bye");
        let _ = tokio::time::timeout(Duration::from_secs(2), c.closed()).await;
        until_parked(&h, 0).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _c = Connection::connect(server.local_addr(), "second", &policy)
            .await
            .expect("connect");
        until_parked(&h, 1).await;
        assert_eq!(
            lot(&h).threads_started(),
            1,
            "the lot's thread waited for the second connection"
        );
    }

    /// A server parks on one lot, run by one thread per worker by default (the lot's
    /// thread, which alone waits on the sockets and deadlines, and its helpers);
    /// `park_threads` sets the count. Clients are answered from the lot either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lot_threads_are_one_per_worker_unless_set() {
        for (w, n) in [(0, 1), (1, 1), (2, 2), (8, 8)] {
            assert_eq!(crate::server::default_park_threads(w), n, "{w} workers");
        }
        let policy = short_policy();
        let base =
            ServerConfig::new("127.0.0.1:0".parse().expect("an address")).policy(policy.clone());
        let server = Server::bind(base.clone()).await.expect("bind");
        let h = server.handle();
        assert!(h.inner.lot.is_some(), "one lot");
        assert_eq!(h.park_threads(), 2, "two workers, two threads");
        let one = Server::bind(base.clone().park_threads(1))
            .await
            .expect("bind");
        assert_eq!(one.handle().park_threads(), 1, "set: one thread");
        let mut clients = Vec::new();
        for i in 0..4 {
            let c = Connection::connect(server.local_addr(), &format!("c{i}"), &policy)
                .await
                .expect("connect");
            clients.push(c);
        }
        until_parked(&h, 4).await;
        let hb: Vec<u64> = clients.iter().map(|c| c.stats().heartbeats_in).collect();
        tokio::time::sleep(policy.heartbeat_interval * 4).await;
        for (c, before) in clients.iter().zip(hb) {
            assert!(c.disconnected().is_none());
            assert!(
                c.stats().heartbeats_in >= before + 2,
                "answered from the lot"
            );
        }
    }

    /// Sends to many parked clients at once are shared by the lot's thread and its helpers:
    /// forty clients with 200 ms heartbeats get twenty broadcasts, sent one after another,
    /// every message once and in order, within 2 s of each broadcast, while their
    /// heartbeats go on; the helpers ran some of the wake-ups, and every client is still
    /// parked at the end, none of them having been given a task for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_to_many_parked_clients_are_shared_with_the_helpers() {
        let policy = short_policy();
        let cfg = ServerConfig::new("127.0.0.1:0".parse().expect("an address"))
            .policy(policy.clone())
            .park_threads(3);
        let server = Server::bind(cfg).await.expect("bind");
        let h = server.handle();
        assert_eq!(h.park_threads(), 3);
        let n = 40;
        let mut clients = Vec::new();
        for i in 0..n {
            let c = Connection::connect(server.local_addr(), &format!("m{i}"), &policy)
                .await
                .expect("connect");
            clients.push(c);
        }
        until_parked(&h, n).await;
        let lot = lot(&h);
        let unparks = lot.unparks();
        for round in 0..20u8 {
            let sent = std::time::Instant::now();
            for i in 0..n {
                h.try_send(&format!("m{i}"), Bytes::from(vec![round; 100]))
                    .expect("queued");
            }
            for (i, c) in clients.iter_mut().enumerate() {
                let m = tokio::time::timeout(Duration::from_secs(2), c.recv())
                    .await
                    .unwrap_or_else(|_| panic!("client {i}, round {round}: nothing in 2 s"))
                    .expect("a message");
                assert_eq!(&m[..], &vec![round; 100][..], "client {i}, round {round}");
            }
            assert!(sent.elapsed() < Duration::from_secs(2), "round {round}");
        }
        assert!(lot.helped() > 0, "the helpers took part");
        eprintln!(
            "helped {} woken while lent {}",
            lot.helped(),
            lot.woken_lent()
        );
        until_parked(&h, n).await;
        assert_eq!(lot.unparks(), unparks, "written from the lot");
        for c in &clients {
            assert!(c.disconnected().is_none());
        }
    }

    /// A connection that has work again leaves the lot thread's epoll, goes back into tokio's
    /// reactor in a task of its own, and its bytes flow both ways; idle, it parks again and
    /// a send still reaches it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unparked_socket_goes_back_to_the_reactor_and_data_flows() {
        let policy = short_policy();
        let cfg =
            ServerConfig::new("127.0.0.1:0".parse().expect("an address")).policy(policy.clone());
        let mut server = Server::bind(cfg).await.expect("bind");
        let h = server.handle();
        let mut c = Connection::connect(server.local_addr(), "flow", &policy)
            .await
            .expect("connect");
        until_parked(&h, 1).await;
        let unparks = lot(&h).unparks();
        // A stream of messages: more than the lot reads in a wake-up.
        let n = 200;
        let sender = c.sender();
        let sending = tokio::spawn(async move {
            for i in 0..n {
                sender
                    .send(Bytes::from(vec![i as u8; 1024]))
                    .await
                    .expect("sent");
            }
        });
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(5), server.next_event()).await {
                Ok(Some(crate::ServerEvent::Message { msg, .. })) => {
                    assert_eq!(
                        msg[..],
                        vec![got as u8; 1024][..],
                        "message {got} whole, in order"
                    );
                    got += 1;
                }
                Ok(Some(_)) => {}
                other => panic!("after {got} messages: {other:?}"),
            }
        }
        sending.await.expect("the sender ran");
        let after = lot(&h).unparks();
        assert!(
            after > unparks,
            "the stream got the connection its task back"
        );
        // Idle again: parked again, and a send from the server still arrives.
        until_parked(&h, 1).await;
        h.try_send("flow", Bytes::from_static(b"back"))
            .expect("queued");
        let m = tokio::time::timeout(Duration::from_secs(2), c.recv())
            .await
            .expect("delivered")
            .expect("a message");
        assert_eq!(&m[..], b"back");
        assert!(c.disconnected().is_none());
        h.shutdown(Duration::from_secs(3)).await;
    }

    /// A silent peer is declared dead on time although the runtime's only worker is busy
    /// (one task that does not yield for longer than the whole dead-after): the lot thread
    /// fires the deadline and writes the CLOSE itself, outside tokio's run queue (a lot run
    /// as a task would wait for the worker, a second late). The client is hand-driven from a
    /// plain thread: HELLO, then nothing; it times the server's CLOSE from its HELLO.
    #[test]
    fn a_silent_parked_peer_is_closed_on_time_while_the_only_worker_is_busy() {
        use std::io::{Read, Write};
        use std::time::Instant;
        use tether_proto::{Conn, ConnConfig, ConnEvent, Disconnect};

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let policy = short_policy();
        let d = policy.dead_after;
        let cfg =
            ServerConfig::new("127.0.0.1:0".parse().expect("an address")).policy(policy.clone());
        let server = rt.block_on(Server::bind(cfg)).expect("bind");
        let h = server.handle();
        assert!(lot(&h).is_threaded());

        let mut s = std::net::TcpStream::connect(server.local_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        let hello = tether_proto::codec::Hello {
            client_id: "silent".into(),
            requested_heartbeat: policy.heartbeat_interval,
            want_session: false,
            resume: None,
            credential: None,
        };
        let mut conn = Conn::client(
            Instant::now(),
            ConnConfig::default(),
            &hello,
            crate::connection::liveness_config(&policy, false),
            None,
        );
        let out = conn.transmit_chunks().collect::<Vec<_>>().concat();
        s.write_all(&out).expect("HELLO written");
        conn.transmitted(out.len());
        let said = Instant::now();
        // Reads until the state machine reports `want`; the server's heartbeats are read
        // and never answered.
        let mut read_until = |want: fn(&ConnEvent) -> bool| -> ConnEvent {
            let mut buf = [0u8; 4096];
            loop {
                while let Some(ev) = conn.poll_event() {
                    if want(&ev) {
                        return ev;
                    }
                }
                let n = s.read(&mut buf).expect("the server writes");
                assert!(n > 0, "no end of stream before the CLOSE");
                conn.handle_input(Instant::now(), &buf[..n]);
            }
        };
        read_until(|e| matches!(e, ConnEvent::Established(_)));
        rt.block_on(until_parked(&h, 1));

        // The only worker spins past the deadline.
        let spin = d + Duration::from_secs(1);
        let busy = rt.spawn(async move {
            let t = Instant::now();
            while t.elapsed() < spin {
                std::hint::spin_loop();
            }
        });
        let ev = read_until(|e| matches!(e, ConnEvent::Closed(_)));
        let took = said.elapsed();
        let ConnEvent::Closed(Disconnect { reason, .. }) = ev else {
            unreachable!("read until Closed")
        };
        assert!(
            matches!(reason, DisconnectReason::PeerClose { .. }),
            "closed by the server's CLOSE: {reason:?}"
        );
        assert!(
            took >= d - Duration::from_millis(20) && took <= d + Duration::from_millis(400),
            "CLOSE {took:?} after the HELLO, dead-after {d:?}"
        );
        rt.block_on(async {
            busy.await.expect("the spinner ends");
            h.shutdown(Duration::from_secs(3)).await;
        });
        drop(server);
        rt.shutdown_background();
    }
}
