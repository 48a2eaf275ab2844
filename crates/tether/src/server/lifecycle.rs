//! One owner for each client's lifecycle: every transition of a client id happens here,
//! under that client's shard lock, whether or not the client has a session.
//!
//! ```text
//!                 hello                         hello, same id, no resume
//!   (no record) ───────▶ Connected(conn) ───────────────────────────────▶ Connected(conn')
//!                          │     ▲            conn closed with REPLACED; its session (if
//!      conn ended, session     │     │ hello (resume)    any) is reported lost when it ends
//!      held (linger > 0)       ▼     │
//!                          Held(session, pending) ── linger ran out ──▶ (no record)
//!                          │                                            SessionLost; Offline
//!      conn ended without a session (or it ends in order, or as a slow consumer):
//!                          └──────────────────────────────────────────▶ (no record); Offline
//! ```
//!
//! Connection ids are unique per server and increase: the current connection's id is the
//! client's generation (a fencing token for state kept elsewhere, such as a cluster's), kept
//! in presence; the record knows its connection by the connection's shared state.
//!
//! A record exists while its client is connected or its session is held; presence (the
//! core's [`Registry`](tether_proto::presence::Registry)) keeps the longer view: offline
//! clients, their reasons and their last connection's counters.
//!
//! Lock order (see also `server/mod.rs`): a client's shard → the presence registry → one
//! connection's shared state (`driver::Shared`). Never a shard while holding the registry
//! or a connection's state; never two shards at once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_proto::codec::{Hello, SessionGrant, TOKEN_LEN};
use tether_proto::presence::{PresenceChange, Registry};
use tether_proto::session::Session;
use tether_proto::{CloseCode, Disconnect, DisconnectReason};

use super::events::{Broadcast, Delivery, SendError, ServerEvent};
use super::handover::{SessionExport, SessionRequest};
use super::sessions::{self, Held, Plan, SessionSlot};
use super::thin::ThinId;
use super::Inner;
use crate::auth::resume::ResumeCredential;
use crate::auth::PrincipalKey;
use crate::driver::{Command, Decision, Offer, Shared};

const SHARDS: usize = 32;

/// The records of every connected or resuming client, sharded by id.
pub(super) struct Clients {
    shards: Box<[Shard]>,
}

/// Records by client id, keyed by the id the connection's sink holds too (one allocation
/// for both).
type Shard = Mutex<HashMap<ThinId, Record>>;

/// One client id's lifecycle state in one word, 8 B (issue 17: 16 B with the connection
/// and the box side by side; a client table's bucket is the 8 B key and this, ~28 B a
/// client at the tables' load instead of ~42 B). The word is what the record holds:
///
/// ```text
///   null                           nothing (a record being made; an idle one is removed)
///   Arc::into_raw(shared)          a connection, and neither principal nor session: the
///                                  record of nearly every client (low bit clear)
///   Box::into_raw(full) | 1        anything else: a [`Full`] box (low bit set)
/// ```
///
/// Both pointers are at least 8-aligned, so the low bit is free. The record owns what its
/// word points to: one strong count of the connection's `Arc`, or the box. Its `unsafe` is
/// the word's decoding, each with its argument; the word is written only by `box_full`,
/// `settle`, `set_conn` and the two `take_` methods, and the tests go through every form
/// and back, counting the connection's references. Miri is not available here.
struct Record {
    word: *mut (),
}

/// The low bit of a record's word: the word is a [`Full`] box.
const FULL: usize = 1;

// SAFETY: a record owns an `Arc<Shared>` count or a `Box<Full>`, both `Send` (checked
// below); it hands out references only through `&self`/`&mut self`, as either would.
unsafe impl Send for Record {}

const _: () = {
    const fn send<T: Send>() {}
    send::<Arc<Shared>>();
    send::<Box<Full>>();
};

/// What a record holds for a client with a principal or a session (or both), boxed: 72 B,
/// an 80 B chunk, as the 64 B box of the principal and session it replaces (the
/// connection is in it too, not beside it). The principal is kept as an [`Owner`] (its
/// strings boxed), so an authenticated client pays nothing for the session's pointer
/// beside it (its session, if any, stays in a box of its own). Never without a principal
/// and a session: [`Record::settle`] goes back to the bare connection.
#[derive(Debug, Default)]
struct Full {
    /// The connection the id is on.
    conn: Option<Arc<Shared>>,
    /// Who the connection authenticated as (`None` on a server without authorization).
    /// Only the same principal may replace the connection, resume the session, take over a
    /// held session or start a new one while another principal's is held.
    principal: Option<Owner>,
    /// The id's session: attached to `conn`, or held.
    session: Option<Box<SessionSlot>>,
}

/// A [`PrincipalKey`] as a record keeps it: the same fields, its strings as `Box<str>`
/// (16 B each instead of 24; the text is not copied again, a key cloned for the record
/// has no spare capacity).
#[derive(Debug)]
struct Owner {
    scheme: crate::auth::Scheme,
    issuer: Option<Box<str>>,
    name: Box<str>,
}

impl Owner {
    fn new(p: PrincipalKey) -> Self {
        Owner {
            scheme: p.scheme,
            issuer: p.issuer.map(String::into_boxed_str),
            name: p.name.into_boxed_str(),
        }
    }

    /// True when `p` is this principal.
    fn is(&self, p: &PrincipalKey) -> bool {
        self.scheme == p.scheme
            && self.issuer.as_deref() == p.issuer.as_deref()
            && *self.name == p.name
    }
}

impl Default for Record {
    fn default() -> Self {
        Record {
            word: std::ptr::null_mut(),
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        drop(self.take_full());
        drop(self.take_conn());
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("conn", &self.conn().is_some())
            .field(
                "principal",
                &self.full().is_some_and(|f| f.principal.is_some()),
            )
            .field("session", &self.session().map(|s| s.id))
            .finish()
    }
}

impl Record {
    /// The word is a [`Full`] box.
    fn is_full(&self) -> bool {
        self.word.addr() & FULL != 0
    }

    /// The box, when the word is one.
    fn full(&self) -> Option<&Full> {
        // SAFETY: a tagged word is `Box::into_raw` of a `Full` with its low bit set
        // (`box_full`), owned by this record until `take_full`: it lives while `&self` does.
        self.is_full()
            .then(|| unsafe { &*self.word.map_addr(|a| a & !FULL).cast::<Full>() })
    }

    fn full_mut(&mut self) -> Option<&mut Full> {
        // SAFETY: as in `full`; `&mut self` makes the borrow unique.
        self.is_full()
            .then(|| unsafe { &mut *self.word.map_addr(|a| a & !FULL).cast::<Full>() })
    }

    /// Takes the box out (the word is null after).
    fn take_full(&mut self) -> Option<Box<Full>> {
        if !self.is_full() {
            return None;
        }
        let p = std::mem::replace(&mut self.word, std::ptr::null_mut()).map_addr(|a| a & !FULL);
        // SAFETY: the tagged word was `Box::into_raw` of a `Full`; the word no longer names
        // it, so the box has one owner again.
        Some(unsafe { Box::from_raw(p.cast::<Full>()) })
    }

    /// The box, made (holding the connection, if any) when the word is not one.
    fn box_full(&mut self) -> &mut Full {
        if !self.is_full() {
            let conn = self.take_conn();
            let p = Box::into_raw(Box::new(Full {
                conn,
                principal: None,
                session: None,
            }));
            self.word = p.cast::<()>().map_addr(|a| a | FULL);
        }
        // SAFETY: the word is a box now (made just above if it was not); as in `full_mut`.
        unsafe { &mut *self.word.map_addr(|a| a & !FULL).cast::<Full>() }
    }

    /// Back to the bare connection (or null) once the box holds neither principal nor
    /// session.
    fn settle(&mut self) {
        if self
            .full()
            .is_some_and(|f| f.principal.is_none() && f.session.is_none())
        {
            if let Some(conn) = self.take_full().and_then(|f| f.conn) {
                self.word = Arc::into_raw(conn).cast_mut().cast();
            }
        }
    }

    /// The connection's state, if the id is on one.
    fn conn(&self) -> Option<&Shared> {
        if let Some(f) = self.full() {
            return f.conn.as_deref();
        }
        // SAFETY: an untagged word that is not null is `Arc::into_raw` of the connection's
        // state, whose strong count the record holds: it lives while `&self` does.
        (!self.word.is_null()).then(|| unsafe { &*self.word.cast::<Shared>() })
    }

    /// The connection's state, shared (a clone of the record's `Arc`).
    fn conn_arc(&self) -> Option<Arc<Shared>> {
        if let Some(f) = self.full() {
            return f.conn.clone();
        }
        if self.word.is_null() {
            return None;
        }
        let p = self.word.cast::<Shared>().cast_const();
        // SAFETY: as in `conn`: `p` is `Arc::into_raw`'s and the record holds a count; the
        // clone gets a count of its own.
        unsafe {
            Arc::increment_strong_count(p);
            Some(Arc::from_raw(p))
        }
    }

    /// True when `shared` is the record's connection (each connection has a state of its
    /// own, alive while the record holds it).
    fn is_conn(&self, shared: &Shared) -> bool {
        self.conn().is_some_and(|c| std::ptr::eq(c, shared))
    }

    /// Takes the connection out (its count with it).
    fn take_conn(&mut self) -> Option<Arc<Shared>> {
        if let Some(f) = self.full_mut() {
            return f.conn.take();
        }
        if self.word.is_null() {
            return None;
        }
        let p = std::mem::replace(&mut self.word, std::ptr::null_mut());
        // SAFETY: an untagged word that is not null is `Arc::into_raw`'s, and its count goes
        // to the `Arc` made here: the word is null now.
        Some(unsafe { Arc::from_raw(p.cast::<Shared>().cast_const()) })
    }

    /// Puts the id on connection `conn` (dropping the one it was on, if any).
    fn set_conn(&mut self, conn: Arc<Shared>) {
        if let Some(f) = self.full_mut() {
            f.conn = Some(conn);
            return;
        }
        drop(self.take_conn());
        self.word = Arc::into_raw(conn).cast_mut().cast();
    }

    /// The session and the connection at once (the session borrowed mutably).
    fn session_and_conn(&mut self) -> (Option<&mut SessionSlot>, Option<&Shared>) {
        if !self.is_full() {
            return (None, self.conn());
        }
        match self.full_mut() {
            Some(f) => (f.session.as_deref_mut(), f.conn.as_deref()),
            None => (None, None),
        }
    }

    fn is_idle(&self) -> bool {
        self.conn().is_none() && self.session().is_none()
    }

    /// True when the record's principal is `p` (both `None` on a server without
    /// authorization).
    fn owned_by(&self, p: Option<&PrincipalKey>) -> bool {
        match (self.full().and_then(|f| f.principal.as_ref()), p) {
            (Some(owner), Some(p)) => owner.is(p),
            (None, None) => true,
            _ => false,
        }
    }

    fn session(&self) -> Option<&SessionSlot> {
        self.full()?.session.as_deref()
    }

    fn session_mut(&mut self) -> Option<&mut SessionSlot> {
        self.full_mut()?.session.as_deref_mut()
    }

    fn has_session(&self) -> bool {
        self.session().is_some()
    }

    fn set_principal(&mut self, principal: Option<PrincipalKey>) {
        match (self.full_mut(), principal.map(Owner::new)) {
            (Some(f), p) => {
                f.principal = p;
                self.settle();
            }
            (None, None) => {}
            (None, Some(p)) => self.box_full().principal = Some(p),
        }
    }

    fn set_session(&mut self, slot: Box<SessionSlot>) {
        self.box_full().session = Some(slot);
    }

    fn take_session(&mut self) -> Option<Box<SessionSlot>> {
        let slot = self.full_mut()?.session.take();
        self.settle();
        slot
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Clients {
    pub(super) fn new() -> Self {
        Clients {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, id: &str) -> &Shard {
        // FNV-1a: cheap, and client ids are not attacker-chosen keys for a shared table
        // (each shard is a HashMap with its own random hasher).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// The live connections, one shard at a time: `(client id, state)`.
    pub(super) fn live(&self) -> Vec<(String, Arc<Shared>, bool)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (id, r) in lock(shard).iter() {
                if let Some(shared) = r.conn_arc() {
                    out.push((id.to_string(), shared, r.has_session()));
                }
            }
        }
        out
    }

    /// Visits the live connections' states, one shard at a time, without collecting them:
    /// a metrics scrape through [`live`](Self::live) allocated an id copy and a 40 B row per
    /// client (1.3 MB at 19,000 clients), pages that stayed resident after it (issue 17).
    pub(super) fn for_each_live(&self, mut f: impl FnMut(&Shared)) {
        for shard in self.shards.iter() {
            for r in lock(shard).values() {
                if let Some(shared) = r.conn() {
                    f(shared);
                }
            }
        }
    }

    /// The session id of `id`, while it has one.
    pub(super) fn session_of(&self, id: &str) -> Option<u64> {
        lock(self.shard(id))
            .get(id)
            .and_then(|r| r.session().map(|s| s.id))
    }

    /// The live connection of `id`.
    pub(super) fn live_of(&self, id: &str) -> Option<Arc<Shared>> {
        lock(self.shard(id)).get(id).and_then(Record::conn_arc)
    }
}

/// What admission decided about a HELLO before its lifecycle transition.
pub(super) struct Admitted<'a> {
    /// The principal it authenticated as (`None` on a server without authorization).
    pub(super) principal: Option<&'a PrincipalKey>,
    /// When the principal's credential runs out, from now (`None`: it does not).
    pub(super) credential_ttl: Option<Duration>,
    /// The HELLO's client id, as the connection keeps it (the record shares it).
    pub(super) key: &'a ThinId,
}

impl Inner {
    /// Runs `f` on the presence registry, then publishes its changes. Called with at most
    /// one shard lock held (shard → registry).
    pub(super) fn with_registry<R>(&self, f: impl FnOnce(&mut Registry<ThinId>) -> R) -> R {
        let mut reg = lock(&self.registry);
        let r = f(&mut reg);
        let changes = drain_changes(&mut reg);
        drop(reg);
        for (ch, remote) in changes {
            self.publish(ch, remote);
        }
        self.signals.registry_changed.notify_one();
        r
    }

    /// Counts a failed attempt (a refused credential, a wrong or used resume token) from
    /// `remote` against its throttle.
    pub(super) fn record_failure(&self, remote: SocketAddr) {
        if let Some(t) = &self.throttle {
            lock(t).record_failure(remote.ip(), crate::driver::now());
        }
    }

    /// A presence change to the event stream (lossless, in order) and to subscribers.
    pub(super) fn publish(&self, ch: PresenceChange, remote: Option<SocketAddr>) {
        if self.cfg.presence_events {
            let _ = self.events.send(ServerEvent::Presence {
                change: Box::new(ch.clone()),
                remote,
            });
        }
        let _ = self.presence_tx.send(ch);
    }

    /// Transition: a HELLO on connection `conn_id`, already admitted (a valid id; the
    /// principal it authenticated as, if the server authorizes) — connect, replace, or
    /// resume. Only the same principal may touch a record that is not idle: a live
    /// connection, a held or attached session.
    pub(super) fn hello(
        &self,
        now: Instant,
        conn_id: u64,
        remote: SocketAddr,
        shared: &Arc<Shared>,
        hello: &Hello,
        admitted: Admitted<'_>,
    ) -> Decision {
        let Admitted {
            principal,
            credential_ttl,
            key,
        } = admitted;
        if self.established.load(Relaxed) >= self.max_connections {
            return Decision::Refuse(
                CloseCode::SERVER_FULL,
                format!(
                    "server is at its limit of {} connections",
                    self.max_connections
                ),
            );
        }
        let id = &hello.client_id;
        let linger = self.cfg.session_linger;
        let mut shard = lock(self.clients.shard(id));
        let rec = shard.entry(key.clone()).or_default();
        if !rec.is_idle() && !rec.owned_by(principal) {
            if hello.resume.is_some() {
                self.record_failure(remote);
            }
            return Decision::Refuse(
                CloseCode::ID_NOT_ALLOWED,
                "this client id is in use by another principal".into(),
            );
        }
        let plan = match sessions::plan(
            hello,
            principal,
            rec.session(),
            rec.conn(),
            linger.is_some(),
        ) {
            Ok(p) => p,
            Err(r) => {
                if rec.is_idle() {
                    shard.remove(id.as_str());
                }
                if r.failure {
                    self.record_failure(remote);
                }
                return Decision::Refuse(r.code, r.text);
            }
        };
        let session = match plan {
            Plan::Resume => {
                // Rotate first: a token that cannot be replaced leaves the session held.
                let presented = hello.resume.as_ref().map(|r| r.token).unwrap_or_default();
                let token = match rec.session_mut().map(|s| s.resume.rotate(&presented)) {
                    Some(Ok(t)) => t,
                    Some(Err(e)) => {
                        return Decision::Refuse(
                            CloseCode::REFUSED,
                            format!("cannot draw a session token from the OS random source: {e}"),
                        )
                    }
                    None => unreachable!("plan() resumes only a held session"),
                };
                let Some(held) = rec.session_mut().and_then(|s| s.held.take()) else {
                    unreachable!("plan() resumes only a held session");
                };
                self.budgets.unsent.give(held.charged());
                shared.requeue_front(held.pending.into_iter().collect());
                let grant =
                    sessions::resumed_grant(&held.session, token, linger.unwrap_or_default());
                Some((grant, held.session))
            }
            Plan::New | Plan::None => {
                // Whatever session the id had will not be resumed: a held one is lost now,
                // an attached one when its connection ends.
                if let Some(old) = rec.take_session() {
                    if let Some(held) = old.held {
                        self.session_lost(id, held);
                    }
                }
                if matches!(plan, Plan::New) {
                    match self.new_session(id, principal, linger.unwrap_or_default()) {
                        Ok((slot, grant, session)) => {
                            rec.set_session(Box::new(slot));
                            Some((grant, session))
                        }
                        Err(text) => {
                            if rec.is_idle() {
                                shard.remove(id.as_str());
                            }
                            return Decision::Refuse(CloseCode::REFUSED, text);
                        }
                    }
                } else {
                    None
                }
            }
        };
        if let Some(old) = rec.take_conn() {
            old.close(
                CloseCode::REPLACED,
                "replaced by a newer connection with the same client id",
            );
        }
        // Before any sender can reach the connection: the number its first message gets.
        shared.set_seq_base(session.as_ref().map(|(_, s)| s.last_seq() + 1));
        rec.set_conn(shared.clone());
        rec.set_principal(principal.cloned());
        self.established.fetch_add(1, Relaxed);
        self.totals.accepted.fetch_add(1, Relaxed);
        let replaced = self.with_registry(|r| r.connected_shared(now, key, conn_id, remote));
        let _ = self.events.send(ServerEvent::Connected {
            client_id: key.clone().into(),
            remote,
            conn_id,
            replaced,
        });
        drop(shard);
        // Senders waiting for a resuming client's backlog: it is attached again.
        self.signals.room.notify_waiters();
        Decision::Accept(self.liveness.clone(), session.map(Box::new), credential_ttl)
    }

    /// A new session for client `client_id` of `principal`: its grant carries the token,
    /// the slot only the token's hash.
    fn new_session(
        &self,
        client_id: &str,
        principal: Option<&PrincipalKey>,
        linger: Duration,
    ) -> Result<(SessionSlot, SessionGrant, Session), String> {
        let (resume, token) = ResumeCredential::issue(client_id, principal.cloned())
            .map_err(|e| format!("cannot draw a session token from the OS random source: {e}"))?;
        let id = self.next_session_id.fetch_add(1, Relaxed);
        let slot = SessionSlot {
            id,
            resume,
            held: None,
            taker: None,
        };
        let grant = SessionGrant {
            session_id: id,
            token,
            resumed: false,
            last_received: 0,
            linger,
        };
        // The server's copy carries no token (the slot holds its hash).
        let mut session = Session::new(id, [0; TOKEN_LEN], self.cfg.session);
        session.set_commit_mode(self.cfg.commit_acks);
        Ok((slot, grant, session))
    }

    /// Transition: connection `conn_id` ended. For the id's current connection: hold the
    /// session (the client is `Resuming`) or let the client go (`Offline`). For a replaced
    /// connection: only report what its session leaves undelivered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ended(
        &self,
        now: Instant,
        conn_id: u64,
        client_id: Option<&str>,
        remote: SocketAddr,
        d: Disconnect,
        session: Option<Session>,
        shared: &Shared,
    ) {
        if let Some(i) = DisconnectReason::LABELS
            .iter()
            .position(|l| *l == d.reason.label())
        {
            self.totals.disconnects[i].fetch_add(1, Relaxed);
        }
        let Some(id) = client_id else {
            self.totals.refused.fetch_add(1, Relaxed);
            let _ = self.events.send(ServerEvent::Refused {
                remote,
                reason: d.reason,
            });
            return;
        };
        self.established.fetch_sub(1, Relaxed);
        let counters = shared.stats.snapshot().counters();
        // A commit the task did not apply before it ended goes with the session.
        let mut session = session;
        let commit = shared.take_commit();
        if let Some(s) = session.as_mut().filter(|_| commit > 0) {
            s.commit(now, commit);
        }
        let mut shard = lock(self.clients.shard(id));
        let _ = self.events.send(ServerEvent::Disconnected {
            client_id: id.into(),
            conn_id,
            disconnect: d.clone(),
        });
        let current = shard.get(id).is_some_and(|r| r.is_conn(shared));
        if !current {
            // Replaced: the id lives on with a newer connection; this session will not be
            // resumed.
            if let Some(s) = session {
                self.report_lost(id, &s, shared.take_outbox());
            }
            return;
        }
        let Some(rec) = shard.get_mut(id) else {
            return;
        };
        drop(rec.take_conn());
        // The client spoke on this connection, so it read its WELCOME and holds the
        // session's newest resume token: the token it resumed with dies now (until then a
        // WELCOME lost with its connection left it the only token the client had).
        if counters.messages_in + counters.heartbeats_in > 0
            || matches!(d.reason, DisconnectReason::PeerClose { .. })
        {
            if let Some(slot) = rec.session_mut() {
                slot.resume.confirm();
            }
        }
        // The session is being taken over by another server: it goes there, whatever the
        // reason the connection ended (this server closed it for the take).
        let taker = rec.session_mut().and_then(|s| s.taker.take());
        if let (Some(tx), Some(s)) = (taker, &session) {
            if rec.session().is_some_and(|slot| slot.id == s.id()) {
                self.with_registry(|r| {
                    r.record_counters(id, conn_id, counters);
                    r.disconnected(
                        now,
                        id,
                        conn_id,
                        DisconnectReason::Replaced,
                        d.silent_for,
                        None,
                    )
                });
                let pending = shared.take_outbox();
                if let (Some(slot), Some(s)) = (rec.take_session(), session) {
                    let export = SessionExport::new(id, &slot.resume, &s, pending);
                    if let Err(export) = tx.send(export) {
                        // The taker gave up waiting (its client was told the session is
                        // unknown): report what it leaves undelivered.
                        self.report_export_lost(&export);
                    }
                }
                if rec.is_idle() {
                    shard.remove(id);
                }
                drop(shard);
                self.signals.room.notify_waiters();
                return;
            }
        }
        // An orderly end (the client said goodbye, or this server closed it) ends the
        // session: nobody will resume it. A slow consumer is not held either.
        let finished = matches!(
            d.reason,
            DisconnectReason::PeerClose {
                code: CloseCode::NORMAL,
                ..
            } | DisconnectReason::LocalClose
                | DisconnectReason::SlowConsumer
        );
        let linger = self.cfg.session_linger.filter(|l| !l.is_zero());
        let ours = |s: &Session| rec.session().is_some_and(|slot| slot.id == s.id());
        let hold_until = match (&session, linger) {
            (Some(s), Some(l)) if !finished && ours(s) => Some(now + l),
            _ => None,
        };
        self.with_registry(|r| {
            r.record_counters(id, conn_id, counters);
            r.disconnected(now, id, conn_id, d.reason.clone(), d.silent_for, hold_until)
        });
        match (session, hold_until) {
            (Some(session), Some(until)) => {
                let pending: VecDeque<Bytes> = shared.take_outbox().into();
                let pending_bytes = pending.iter().map(Bytes::len).sum();
                // A held session still holds its unacknowledged messages for the replay.
                self.budgets
                    .unsent
                    .take(pending_bytes + session.replay_bytes());
                if let Some(slot) = rec.session_mut() {
                    slot.held = Some(Held {
                        session,
                        pending,
                        pending_bytes,
                        until,
                    });
                }
            }
            (Some(session), None) => {
                drop(rec.take_session());
                let unsent = shared.take_outbox();
                // Nothing to report after a clean goodbye with nothing outstanding.
                if !(finished && session.unacked_range().is_none() && unsent.is_empty())
                    || matches!(d.reason, DisconnectReason::SlowConsumer)
                {
                    self.report_lost(id, &session, unsent);
                }
            }
            (None, _) => drop(rec.take_session()),
        }
        if rec.is_idle() {
            shard.remove(id);
        }
        drop(shard);
        // Senders waiting for this client's backlog may now queue into the held session.
        self.signals.room.notify_waiters();
    }

    /// Transition: the hold of `id`'s session ran out (presence already shows `Offline`).
    pub(super) fn expire(&self, now: Instant, id: &str) {
        let mut shard = lock(self.clients.shard(id));
        let Some(rec) = shard.get_mut(id) else {
            return;
        };
        if rec.conn().is_some() {
            return; // resumed in the meantime
        }
        let due = rec
            .session()
            .and_then(|s| s.held.as_ref())
            .is_some_and(|h| h.until <= now);
        if !due {
            return;
        }
        if let Some(held) = rec.take_session().and_then(|s| s.held) {
            self.session_lost(id, held);
        }
        if rec.is_idle() {
            shard.remove(id);
        }
        drop(shard);
        self.signals.room.notify_waiters();
    }

    /// Hands session `req` over to another server: a held session at once (the client goes
    /// offline here, reason `replaced`); an attached one once its connection, closed here
    /// with REPLACED, has ended (the receiver gets it). Nothing unless the session id, the
    /// client id, the principal and the token hash all match: a wrong token moves nothing.
    pub(super) fn take(&self, now: Instant, req: &SessionRequest) -> Take {
        let id = req.client_id.as_str();
        let mut shard = lock(self.clients.shard(id));
        let Some(rec) = shard.get_mut(id) else {
            return Take::No;
        };
        let Some(slot) = rec.session() else {
            return Take::No;
        };
        if slot.id != req.session_id
            || slot
                .resume
                .check_hash(id, req.principal.as_ref(), &req.token_hash)
                .is_err()
        {
            return Take::No;
        }
        if slot.held.is_some() {
            let Some(slot) = rec.take_session() else {
                return Take::No;
            };
            let SessionSlot { resume, held, .. } = *slot;
            let Some(held) = held else {
                return Take::No;
            };
            self.budgets.unsent.give(held.charged());
            let export = SessionExport::new(
                id,
                &resume,
                &held.session,
                held.pending.into_iter().collect(),
            );
            self.with_registry(|r| r.end_hold(now, id, DisconnectReason::Replaced));
            if rec.is_idle() {
                shard.remove(id);
            }
            drop(shard);
            // Senders waiting for the held session's room: it is gone.
            self.signals.room.notify_waiters();
            return Take::Taken(Box::new(export));
        }
        // The session and the connection at once: the session borrowed mutably.
        let (Some(slot), Some(shared)) = rec.session_and_conn() else {
            return Take::No;
        };
        if slot.taker.is_some() {
            return Take::No; // another take is under way
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        slot.taker = Some(tx);
        // Its peer is most likely gone (it resumes elsewhere): the CLOSE gets a moment to
        // leave, the peer's FIN is not waited for.
        shared.command(Command::Abandon(
            CloseCode::REPLACED,
            "session resumed on another node".into(),
        ));
        Take::Wait(rx)
    }

    /// Installs a session handed over by another server as held here (for the linger: the
    /// client is `Resuming`), so the next HELLO that resumes it goes through the normal
    /// check. `key` is the connection's copy of the client id, when one waits. A session
    /// of the same principal held here for the id is older and reported lost. When the
    /// export cannot be held (sessions are off here, the client id has a connection here,
    /// or another principal's session), it is reported lost at once
    /// ([`ServerEvent::SessionLost`]).
    pub(super) fn import(
        &self,
        now: Instant,
        export: SessionExport,
        key: Option<&ThinId>,
        remote: SocketAddr,
    ) -> Result<(), super::handover::ImportError> {
        use super::handover::ImportError;
        let Some(linger) = self.cfg.session_linger.filter(|l| !l.is_zero()) else {
            self.report_export_lost(&export);
            return Err(ImportError::SessionsOff);
        };
        let id = export.client_id.clone();
        let mut shard = lock(self.clients.shard(&id));
        let key = key
            .filter(|k| &***k == id.as_str())
            .cloned()
            .unwrap_or_else(|| ThinId::from(id.as_str()));
        let rec = shard.entry(key).or_default();
        // A session of the same owner held here is older (the client moved on from it:
        // it resumes another one): it will not be resumed, it is lost now — as when the
        // client starts a new session.
        let same_owner = rec.owned_by(export.principal.as_ref());
        if rec.conn().is_none() && same_owner && rec.session().is_some_and(|s| s.held.is_some()) {
            if let Some(held) = rec.take_session().and_then(|s| s.held) {
                self.session_lost(&id, held);
                self.with_registry(|r| r.end_hold(now, &id, DisconnectReason::Replaced));
            }
        }
        if !rec.is_idle() {
            drop(shard);
            self.report_export_lost(&export);
            return Err(ImportError::Busy);
        }
        let session =
            match Session::from_state([0; TOKEN_LEN], self.cfg.session, export.state.clone()) {
                Ok(mut s) => {
                    // What the previous server received counts as committed (it was, there).
                    s.set_commit_mode(self.cfg.commit_acks);
                    s
                }
                Err(e) => {
                    shard.remove(id.as_str());
                    drop(shard);
                    self.report_export_lost(&export);
                    return Err(ImportError::Invalid(e));
                }
            };
        let SessionExport {
            client_id,
            principal,
            hash,
            previous,
            state,
            pending,
        } = export;
        let pending_bytes = pending.iter().map(Bytes::len).sum();
        let until = now + linger;
        let held = Held {
            session,
            pending: pending.into(),
            pending_bytes,
            until,
        };
        self.budgets.unsent.take(held.charged());
        rec.set_session(Box::new(SessionSlot {
            id: state.id,
            resume: ResumeCredential::from_hashes(hash, previous, &client_id, principal.clone()),
            held: Some(held),
            taker: None,
        }));
        rec.set_principal(principal);
        self.with_registry(|r| r.held(now, &id, remote, DisconnectReason::Replaced, until));
        drop(shard);
        Ok(())
    }

    /// An export that will not be resumed anywhere: what it leaves undelivered.
    fn report_export_lost(&self, e: &SessionExport) {
        let st = &e.state;
        let first = st.last_seq + 1;
        let unsent_seqs =
            (!e.pending.is_empty()).then(|| first..=first + e.pending.len() as u64 - 1);
        let _ = self.events.send(ServerEvent::SessionLost {
            client_id: e.client_id.as_str().into(),
            session: st.id,
            unacked: (st.last_seq > st.acked).then(|| st.acked + 1..=st.last_seq),
            unsent: e.pending.clone(),
            unsent_seqs,
        });
    }

    /// A held session is dropped: tell the application what it leaves undelivered.
    fn session_lost(&self, id: &str, held: Held) {
        self.budgets.unsent.give(held.charged());
        self.report_lost(id, &held.session, held.pending.into_iter().collect());
    }

    /// `session` ends without a resume, with `unsent` messages never handed to it: they
    /// were promised the numbers after its last one, in order.
    fn report_lost(&self, id: &str, session: &Session, unsent: Vec<Bytes>) {
        let first = session.last_seq() + 1;
        let unsent_seqs = (!unsent.is_empty()).then(|| first..=first + unsent.len() as u64 - 1);
        let _ = self.events.send(ServerEvent::SessionLost {
            client_id: id.into(),
            session: session.id(),
            unacked: session.unacked_range(),
            unsent,
            unsent_seqs,
        });
    }

    /// Presence only: connection `conn_id` of `id` went silent (`suspect`) or was heard from
    /// again. No lifecycle state changes.
    pub(super) fn liveness_changed(&self, now: Instant, id: &str, conn_id: u64, suspect: bool) {
        self.with_registry(|r| {
            if suspect {
                r.suspect(now, id, conn_id)
            } else {
                r.recovered(now, id, conn_id)
            }
        });
    }

    /// Commit-before-ACK: the application committed `id`'s messages up to `seq` of
    /// `session` (ignored for another session).
    pub(super) fn commit(&self, now: Instant, id: &str, session: u64, seq: u64) {
        let mut shard = lock(self.clients.shard(id));
        let Some(rec) = shard.get_mut(id) else {
            return;
        };
        let (Some(slot), conn) = rec.session_and_conn() else {
            return;
        };
        if slot.id != session {
            return;
        }
        match (&mut slot.held, conn) {
            (Some(held), _) => held.session.commit(now, seq),
            (None, Some(shared)) => shared.commit(seq),
            (None, None) => {}
        }
    }

    /// `id`'s session and its acknowledged number (see `ServerHandle::session_acked`).
    pub(super) fn session_acked(&self, id: &str) -> Option<(u64, u64)> {
        let shard = lock(self.clients.shard(id));
        let rec = shard.get(id)?;
        let slot = rec.session()?;
        let acked = match (&slot.held, rec.conn()) {
            (Some(h), _) => h.session.acked(),
            (None, Some(shared)) => shared.stats.acked(),
            (None, None) => return None,
        };
        Some((slot.id, acked))
    }

    /// The session and number the next message queued for `rec` would get.
    fn next_number(rec: &Record) -> Option<(u64, u64)> {
        let slot = rec.session()?;
        let seq = match (&slot.held, rec.conn()) {
            (Some(h), _) => h.session.last_seq() + 1 + h.pending.len() as u64,
            (None, Some(shared)) => shared.next_seq()?,
            (None, None) => return None,
        };
        Some((slot.id, seq))
    }

    /// The session and number the next message queued for `id` would get.
    pub(super) fn next_seq(&self, id: &str) -> Option<(u64, u64)> {
        let shard = lock(self.clients.shard(id));
        shard.get(id).and_then(Self::next_number)
    }

    /// [`try_send`](Self::try_send) only if the message gets number `seq` of `session`.
    pub(super) fn try_send_at(
        &self,
        id: &str,
        msg: Bytes,
        session: u64,
        seq: u64,
    ) -> Result<Delivery, SendError> {
        self.fits(&msg)?;
        let mut shard = lock(self.clients.shard(id));
        let Some(rec) = shard.get_mut(id) else {
            return Err(SendError::NotConnected(id.to_owned()));
        };
        if Self::next_number(rec) != Some((session, seq)) {
            return Err(SendError::Renumbered {
                client_id: id.to_owned(),
                session,
                seq,
            });
        }
        self.offer(id, rec, msg, true)
    }

    /// `id`'s session as an export without messages or numbers (see
    /// `ServerHandle::session_header`).
    pub(super) fn session_header(&self, id: &str) -> Option<SessionExport> {
        let shard = lock(self.clients.shard(id));
        let slot = shard.get(id)?.session()?;
        Some(SessionExport::header(id, slot.id, &slot.resume))
    }

    /// The longest message one frame carries (with the session header).
    fn max_message(&self) -> usize {
        (self.cfg.max_frame_len as usize).saturating_sub(9)
    }

    /// `TooLarge` for a message longer than one frame carries.
    fn fits(&self, msg: &[u8]) -> Result<(), SendError> {
        let max = self.max_message();
        if msg.len() > max {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max,
            });
        }
        Ok(())
    }

    /// Queues `msg` for `id` without waiting: on its connection, or in its held session. A
    /// connection at its bound is closed as a slow consumer when `close_slow`; otherwise the
    /// caller gets `SlowConsumer` without the close (and may wait and retry).
    pub(super) fn try_send(
        &self,
        id: &str,
        msg: Bytes,
        close_slow: bool,
    ) -> Result<Delivery, SendError> {
        self.fits(&msg)?;
        let mut shard = lock(self.clients.shard(id));
        match shard.get_mut(id) {
            Some(rec) => self.offer(id, rec, msg, close_slow),
            None => Err(SendError::NotConnected(id.to_owned())),
        }
    }

    /// Queues `msg` for every connected or resuming client, one shard at a time.
    pub(super) fn broadcast(&self, msg: Bytes) -> Result<Broadcast, SendError> {
        self.fits(&msg)?;
        let mut b = Broadcast::default();
        for shard in self.clients.shards.iter() {
            for (id, rec) in lock(shard).iter_mut() {
                match self.offer(id, rec, msg.clone(), true) {
                    Ok(d) if d.held => b.held += 1,
                    Ok(_) => b.sent += 1,
                    Err(SendError::NotConnected(_) | SendError::Disconnected { .. }) => {}
                    Err(_) => b.refused += 1,
                }
            }
        }
        Ok(b)
    }

    /// Queues `msg` on `rec` (its shard locked): its connection, or its held session.
    fn offer(
        &self,
        id: &str,
        rec: &mut Record,
        msg: Bytes,
        close_slow: bool,
    ) -> Result<Delivery, SendError> {
        let session = rec.session().map(|s| s.id);
        if let Some(shared) = rec.conn() {
            // With a session, a connection that just ended still takes it: the outbox moves
            // into the held session (same lock, so nothing slips between).
            return match shared.offer(msg, rec.has_session(), close_slow) {
                Offer::Queued(seq) => Ok(Delivery {
                    session,
                    seq,
                    held: false,
                }),
                Offer::SlowConsumer | Offer::Full => Err(SendError::SlowConsumer(id.to_owned())),
                Offer::Backlogged => Err(SendError::Backlogged(id.to_owned())),
                Offer::ServerFull => Err(SendError::ServerFull),
                Offer::Ended(d) => Err(SendError::Disconnected {
                    client_id: id.to_owned(),
                    reason: d.reason,
                }),
            };
        }
        let Some(held) = rec.session_mut().and_then(|s| s.held.as_mut()) else {
            return Err(SendError::NotConnected(id.to_owned()));
        };
        if held.pending_bytes > 0 && held.pending_bytes + msg.len() > self.cfg.outbox_bytes {
            return Err(SendError::Backlogged(id.to_owned()));
        }
        if !self.budgets.unsent.try_take(msg.len()) {
            return Err(SendError::ServerFull);
        }
        // Held messages go out first on resume, after the session's last number.
        let seq = held.session.last_seq() + 1 + held.pending.len() as u64;
        held.pending_bytes += msg.len();
        held.pending.push_back(msg);
        Ok(Delivery {
            session,
            seq: Some(seq),
            held: true,
        })
    }
}

/// What [`Inner::take`] found.
pub(super) enum Take {
    /// Nothing to hand over (unknown session, or it does not match).
    No,
    /// The held session, taken.
    Taken(Box<SessionExport>),
    /// Attached: its connection is closing; the session comes here when it has ended.
    Wait(tokio::sync::oneshot::Receiver<SessionExport>),
}

/// The registry's queued changes, each with the client's current address.
pub(super) fn drain_changes(
    reg: &mut Registry<ThinId>,
) -> Vec<(PresenceChange, Option<SocketAddr>)> {
    let mut out = Vec::new();
    while let Some(ch) = reg.poll_change() {
        let remote = reg.get(&ch.id).map(|e| e.remote);
        out.push((ch, remote));
    }
    out
}

/// The size of one client's record (the size test in `accept.rs` bounds it).
#[cfg(test)]
pub(super) const RECORD_SIZE: usize = std::mem::size_of::<Record>();

/// The size of a record's box for its principal, session and connection (bounded there too).
#[cfg(test)]
pub(super) const FULL_SIZE: usize = std::mem::size_of::<Full>();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scheme;

    fn slot(id: u64) -> Box<SessionSlot> {
        let (resume, _token) = ResumeCredential::issue("c", None).expect("OS random source");
        Box::new(SessionSlot {
            id,
            resume,
            held: None,
            taker: None,
        })
    }

    fn key() -> PrincipalKey {
        PrincipalKey {
            scheme: Scheme::Jwt,
            issuer: None,
            name: "alice".into(),
        }
    }

    /// The record's box holds the principal and the session, and goes when both have
    /// gone: a client with neither costs no box.
    #[test]
    fn record_box_goes_when_empty() {
        let mut rec = Record::default();
        rec.set_principal(None);
        assert!(!rec.is_full(), "no principal, no session: no box");

        rec.set_principal(Some(key()));
        rec.set_session(slot(7));
        assert!(rec.owned_by(Some(&key())));
        assert_eq!(rec.session().map(|s| s.id), Some(7));
        assert!(!rec.is_idle());

        // The session goes, the principal stays (a connection still runs).
        assert_eq!(rec.take_session().map(|s| s.id), Some(7));
        assert!(rec.session().is_none() && rec.is_idle());
        assert!(rec.owned_by(Some(&key())));
        assert!(rec.is_full());

        rec.set_principal(None);
        assert!(!rec.is_full(), "the box goes with the last of its fields");

        // A session without a principal (a server without authorization), then none.
        rec.set_session(slot(8));
        assert!(rec.owned_by(None) && !rec.owned_by(Some(&key())));
        assert_eq!(rec.session_mut().map(|s| s.id), Some(8));
        rec.set_principal(None);
        assert!(rec.is_full(), "the session keeps the box");
        assert!(rec.take_session().is_some());
        assert!(!rec.is_full());
        assert!(rec.take_session().is_none());
    }

    /// The record's word through every form and back — null, the bare connection, the box
    /// with and without it — counting the connection's references at each step: the record
    /// holds exactly one while it is on the connection, and none once it is off it or gone.
    #[test]
    fn record_word_holds_one_count_of_its_connection() {
        let shared = Shared::new(Default::default());
        let count = |s: &Arc<Shared>| Arc::strong_count(s);
        let mut rec = Record::default();
        assert!(rec.conn().is_none() && rec.is_idle() && !rec.is_full());
        assert!(rec.take_conn().is_none() && rec.conn_arc().is_none());

        rec.set_conn(shared.clone());
        assert_eq!(count(&shared), 2);
        assert!(!rec.is_full(), "a connection alone is the word itself");
        assert!(rec.is_conn(&shared) && !rec.is_idle() && rec.owned_by(None));
        let c = rec.conn_arc().expect("on a connection");
        assert!(Arc::ptr_eq(&c, &shared));
        assert_eq!(count(&shared), 3);
        drop(c);
        assert_eq!(count(&shared), 2);

        // A principal boxes it, the connection goes into the box.
        rec.set_principal(Some(key()));
        assert!(rec.is_full() && rec.is_conn(&shared) && rec.owned_by(Some(&key())));
        assert_eq!(count(&shared), 2);
        rec.set_session(slot(1));
        {
            let (s, c) = rec.session_and_conn();
            assert_eq!(s.map(|s| s.id), Some(1));
            assert!(c.is_some_and(|c| std::ptr::eq(c, &*shared)));
        }
        rec.set_principal(None);
        assert!(rec.is_full(), "the session keeps the box");
        assert_eq!(rec.take_session().map(|s| s.id), Some(1));
        assert!(!rec.is_full(), "back to the bare connection");
        assert!(rec.is_conn(&shared) && rec.session().is_none());
        assert_eq!(count(&shared), 2);
        {
            let (s, c) = rec.session_and_conn();
            assert!(s.is_none() && c.is_some());
        }

        // Another connection replaces it; taking it leaves nothing.
        let other = Shared::new(Default::default());
        rec.set_conn(other.clone());
        assert_eq!((count(&shared), count(&other)), (1, 2));
        assert!(rec.is_conn(&other) && !rec.is_conn(&shared));
        let taken = rec.take_conn().expect("on a connection");
        assert!(Arc::ptr_eq(&taken, &other) && rec.is_idle() && !rec.is_full());
        drop(taken);
        assert_eq!(count(&other), 1);

        // A held session without a connection, then a connection beside it, taken out of
        // the box; dropped boxed and bare, and on another thread.
        rec.set_session(slot(2));
        assert!(rec.is_full() && rec.conn().is_none() && !rec.is_idle());
        rec.set_conn(shared.clone());
        assert_eq!(count(&shared), 2);
        let taken = rec.take_conn().expect("on a connection");
        assert!(rec.is_full() && rec.conn().is_none());
        rec.set_conn(taken);
        drop(rec);
        assert_eq!(count(&shared), 1, "the box's count went with it");
        let mut rec = Record::default();
        rec.set_conn(shared.clone());
        drop(rec);
        assert_eq!(count(&shared), 1, "the word's count went with it");
        let mut rec = Record::default();
        rec.set_conn(shared.clone());
        rec.set_principal(Some(key()));
        std::thread::spawn(move || {
            assert!(rec.owned_by(Some(&key())));
            drop(rec);
        })
        .join()
        .expect("the thread");
        assert_eq!(count(&shared), 1);
    }

    /// The record's compact principal matches exactly the key it was made from.
    #[test]
    fn record_owner_is_its_principal() {
        let full = PrincipalKey {
            scheme: Scheme::Custom("api-key".into()),
            issuer: Some("acme".into()),
            name: "alice".into(),
        };
        let mut rec = Record::default();
        rec.set_principal(Some(full.clone()));
        assert!(rec.owned_by(Some(&full)));
        assert!(!rec.owned_by(None));
        let others = [
            PrincipalKey {
                scheme: Scheme::Custom("other".into()),
                ..full.clone()
            },
            PrincipalKey {
                scheme: Scheme::Jwt,
                ..full.clone()
            },
            PrincipalKey {
                issuer: None,
                ..full.clone()
            },
            PrincipalKey {
                issuer: Some("acme2".into()),
                ..full.clone()
            },
            PrincipalKey {
                name: "bob".into(),
                ..full.clone()
            },
        ];
        for other in &others {
            assert!(!rec.owned_by(Some(other)), "{other} is not {full}");
        }
        rec.set_principal(Some(key()));
        assert!(rec.owned_by(Some(&key())) && !rec.owned_by(Some(&full)));
    }
}
