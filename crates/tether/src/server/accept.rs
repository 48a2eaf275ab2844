//! Accepting connections: the limits that keep an idle flood from locking clients out, and
//! one connection's task from accept to end.
//!
//! ```text
//!  accept ─▶ fd bound? ─▶ per-source bound? ─▶ handshake slots (full: refuse the oldest)
//!          ─▶ task: driver::drive(Conn::server, ServerSink) ─▶ lifecycle `ended`
//! ```
//!
//! Admission has its own small lock (pending handshakes and per-source counts); nothing
//! else is locked while it is held.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tether_proto::codec::Hello;
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent};
use tokio::net::{TcpListener, TcpStream};

use super::events::ServerEvent;
use super::lifecycle::lock;
use super::Inner;
use crate::auth::{AuthDecision, AuthQuery, PendingDecision};
use crate::driver::{self, Command, Decision, Limits, Shared, Sink};
use crate::sockopt;

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
        let shared = Shared::server(
            Limits {
                outbox_bytes: inner.cfg.outbox_bytes,
                inbox_bytes: usize::MAX,
            },
            inner.budgets.clone(),
        );
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

async fn run_connection(
    stream: TcpStream,
    remote: SocketAddr,
    conn_id: u64,
    shared: Arc<Shared>,
    inner: Arc<Inner>,
) {
    if let Err(e) = sockopt::apply(&stream, &inner.cfg.policy) {
        tracing::debug!(%remote, error = %e, "cannot set socket options");
    }
    let cfg = ConnConfig {
        max_frame_len: inner.cfg.max_frame_len,
        handshake_timeout: inner.cfg.handshake_timeout,
        session: inner.cfg.session,
    };
    let conn = Conn::server(driver::now(), cfg);
    let sink = ServerSink {
        inner: inner.clone(),
        conn_id,
        remote,
        shared: shared.clone(),
        client_id: None,
        session: None,
        probe: None,
        pending: None,
    };
    let ended = driver::drive(stream, Box::new(conn), shared.clone(), sink).await;
    let sink = ended.sink;
    inner.admission.end_handshake(conn_id);
    match (ended.handed_off, sink.probe) {
        // A `tether probe` connection: the PROBE frame was its first frame. It is no client.
        (Some(stream), Some(req)) => crate::probe::respond(stream, req).await,
        _ => inner.ended(
            driver::now(),
            conn_id,
            sink.client_id.as_deref(),
            remote,
            ended.disconnect,
            ended.session,
            &shared,
        ),
    }
    inner.totals.fold(&shared.stats.snapshot());
    inner.admission.close(remote.ip());
    inner.open.fetch_sub(1, Relaxed);
    inner.signals.conn_ended.notify_waiters();
}

/// Connects one connection's events to the server: the HELLO to the lifecycle, messages to
/// the event stream, liveness changes to presence. The end is handled after the task
/// (`Inner::ended`), when the session is back from the state machine.
struct ServerSink {
    inner: Arc<Inner>,
    conn_id: u64,
    remote: SocketAddr,
    shared: Arc<Shared>,
    /// Set once the HELLO was accepted.
    client_id: Option<String>,
    /// The session the connection runs, once accepted.
    session: Option<u64>,
    /// A probe request (the connection's first frame was PROBE).
    probe: Option<Bytes>,
    /// A HELLO waiting for the asynchronous authorizer's answer (polled on this task).
    pending: Option<(Hello, PendingDecision)>,
}

impl ServerSink {
    fn decided(&mut self, d: &Decision, hello: &Hello) {
        if let Decision::Accept(_, session) = d {
            self.client_id = Some(hello.client_id.clone());
            self.session = session.as_ref().map(|s| s.0.session_id);
        }
    }
}

impl Sink for ServerSink {
    fn hello(&mut self, now: Instant, hello: &Hello) -> Decision {
        if let Some(authorizer) = &self.inner.cfg.authorize_async {
            // Checked here first (the client id, and any synchronous rule); the connection
            // stays in the handshake (its deadline and the handshake cap bound the wait).
            if let Err((code, text)) = self.inner.admit(hello) {
                self.inner.admission.end_handshake(self.conn_id);
                return Decision::Refuse(code, text);
            }
            let mut query = AuthQuery::new(hello.client_id.clone(), SystemTime::now());
            query.credential = hello.credential.clone();
            query.remote = Some(self.remote);
            query.resume = hello.resume.is_some();
            let answer = authorizer.0.authorize(query);
            self.pending = Some((hello.clone(), answer));
            return Decision::Pending;
        }
        self.inner.admission.end_handshake(self.conn_id);
        let d = self
            .inner
            .hello(now, self.conn_id, self.remote, &self.shared, hello);
        self.decided(&d, hello);
        d
    }

    fn poll_decision(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Decision> {
        let Some((_, answer)) = self.pending.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(answer) = answer.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        let Some((hello, _)) = self.pending.take() else {
            return Poll::Pending; // unreachable: matched just above
        };
        self.inner.admission.end_handshake(self.conn_id);
        let d = match answer {
            AuthDecision::Allow(p) if p.is_expired(SystemTime::now()) => Decision::Refuse(
                CloseCode::UNAUTHORIZED,
                "the authorization has already expired".into(),
            ),
            AuthDecision::Allow(p) if !p.allows(&hello.client_id) => Decision::Refuse(
                CloseCode::ID_NOT_ALLOWED,
                format!("{} may not use client id {:?}", p.key(), hello.client_id),
            ),
            AuthDecision::Allow(p) => {
                let principal: Arc<str> = Arc::from(p.key().to_string());
                self.inner.hello_as(
                    now,
                    self.conn_id,
                    self.remote,
                    &self.shared,
                    &hello,
                    Some(principal),
                )
            }
            AuthDecision::Deny(denial) => Decision::Refuse(denial.code, denial.text),
        };
        self.decided(&d, &hello);
        Poll::Ready(d)
    }

    fn event(&mut self, _shared: &Shared, ev: ConnEvent) {
        let inner = &self.inner;
        match ev {
            ConnEvent::Message { payload, seq } => {
                if let Some(id) = &self.client_id {
                    inner.budgets.backlog.take(payload.len());
                    let _ = inner.events.send(ServerEvent::Message {
                        client_id: id.clone(),
                        msg: payload,
                        seq,
                        session: self.session,
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
                        client_id: id.clone(),
                        conn_id: self.conn_id,
                        replayed,
                    });
                }
            }
            ConnEvent::Probe(body) => self.probe = Some(body),
            ConnEvent::Hello(_)
            | ConnEvent::Established(_)
            | ConnEvent::Rtt { .. }
            | ConnEvent::SessionLost { .. }
            | ConnEvent::Closed(_) => {}
        }
    }
}
