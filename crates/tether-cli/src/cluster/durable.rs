//! `--durable-sessions`: a copy of each session in Redis, so a client whose node died
//! resumes on another node with nothing lost (docs/CLUSTER.md, "Durable sessions").
//!
//! ```text
//!   API / routed / broadcast / echo send for client X ──▶ X's worker (one task per client:
//!        one message at a time, in order)
//!          (session, seq) = next_seq(X)
//!          dur_append: XADD tether:{N}:dur:X:out 0-seq ──▶ Redis      (the copy first…)
//!          try_deliver_at(X, msg, session, seq)                        (…then the client)
//!          ──▶ 202 (a routed send: k=sent to the asking node, which answers 202)
//!   client X's message (session, seq) ──▶ journal (GET /api/events) ──▶ X's worker
//!          dur_in: XADD tether:{N}:dur:X:in 0-seq ──▶ Redis, then commit(X, seq): the
//!          session ACKs only committed messages (ServerConfig::ack_after_commit)
//!   session transition (new, resumed here: token rotated, imported) ──▶ dur_snapshot
//!   every heartbeat period: trim the copy to the client's ACK; rewrite a copy Redis lost
//!
//!   node B, resume of X's session S whose node does not answer (or is dead):
//!     HGETALL dur:X, XRANGE dur:X:out, XRANGE dur:X:in ──▶ check() ──▶ complete?
//!        yes: import (then the normal resume check), republish dur:X:in as "replayed"
//!        no:  SESSION_UNKNOWN (the client's session-lost) + a session-lost event on B
//!             naming the numbers the copy cannot prove
//! ```
//!
//! Keys (hash tag `{N}` like every cluster key; expire after [`COPY_TTL`] without a write):
//! `tether:{N}:dur:{ID}` hash (`node` owner, `sid`, `hdr` the session's identity as a
//! `SessionExport` without messages, `acked` trimmed through, `next` the next number,
//! `last` the highest number ever offered, `bytes` held, `in` last client number kept,
//! `bad` why the copy is incomplete), `…:out` stream of the unacknowledged server messages
//! (id `0-seq`, field `p`), `…:in` stream of the client's last [`IN_KEEP`] messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use tether::{Delivery, SendError, SessionExport, SessionRequest};
use tether_proto::session::SessionState;
use tokio::sync::{mpsc, oneshot};

use super::{lock, ms, Cluster};
use crate::log;

/// Client messages a copy keeps for the republish after a node's death (the backend may not
/// have read them from the dead node's stream yet).
pub(crate) const IN_KEEP: u64 = 1024;
/// A copy without any write for this long expires (refreshed by every write and the
/// periodic trim).
pub(crate) const COPY_TTL: Duration = Duration::from_secs(3600);
/// Idempotency keys a worker remembers (besides Redis's record of them, a minute).
const RECENT_KEYS: usize = 256;
/// Trim the copy in Redis once the client acknowledged this many more messages (and at
/// every heartbeat period).
const TRIM_EVERY: u64 = 64;

/// Why a durable send was not made.
#[derive(Debug)]
pub(crate) enum DurableError {
    /// The server refused it (not connected, slow consumer, …).
    Send(SendError),
    /// Redis did not take the copy: nothing was queued.
    Redis(String),
    /// The copy belongs to another node now (the session moved): nothing was queued.
    Moved,
    /// A routed send that came after its sender's deadline: dropped.
    Expired,
    /// A routed send handled already (it is in the copy as `session`/`seq`).
    Done { session: u64, seq: u64 },
}

impl std::fmt::Display for DurableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurableError::Send(e) => write!(f, "{e}"),
            DurableError::Redis(e) => write!(f, "the durable copy could not be written: {e}"),
            DurableError::Moved => f.write_str("the session moved to another node"),
            DurableError::Expired => f.write_str("came after its sender's deadline"),
            DurableError::Done { session, seq } => {
                write!(f, "handled already (session {session} seq {seq})")
            }
        }
    }
}

/// A send's outcome: the delivery, and whether it is in the durable copy (false: the copy is
/// over its bound; a resume elsewhere would be refused, explicitly).
pub(crate) type Sent = Result<(Delivery, bool), DurableError>;

/// What a client's worker does, in order.
pub(crate) enum Job {
    /// A message for the client (with the caller's answer, and for a routed send the
    /// deadline on Redis's clock).
    Send {
        msg: Bytes,
        reply: Option<oneshot::Sender<Sent>>,
        deadline: Option<u64>,
        /// A routed send: the key its sender reads when the answer does not come.
        sent_key: Option<String>,
        /// A local API send: not started after this (its caller answers 503 then).
        give_up: Option<tokio::time::Instant>,
    },
    /// An event of the client, for the journal in order: a message the client sent goes
    /// into the copy first, then into the journal, then it is committed (acknowledged).
    Event(Box<tether::ServerEvent>),
    /// A session transition here: rewrite the copy.
    Sync,
    /// A session handed over by another node, about to be imported here.
    Imported(Box<SessionExport>),
    /// Restore the session `req` names from its copy.
    Restore {
        req: Box<SessionRequest>,
        reply: oneshot::Sender<Option<SessionExport>>,
    },
    /// Every heartbeat period: trim; rewrite a copy that needs it.
    Tick,
    /// The client left (offline): delete the copy if it is still this node's.
    Drop,
}

/// The copy's state as this node keeps it (the source of every rewrite).
#[derive(Debug, Default)]
struct Local {
    sid: u64,
    /// Unacknowledged server messages `acked+1 ..`, in order.
    out: VecDeque<(u64, Bytes)>,
    out_bytes: usize,
    acked: u64,
    /// What the copy in Redis is trimmed to.
    redis_acked: u64,
    /// The last client number in the copy (committed).
    in_last: u64,
    /// The client's events not in the journal yet: a message waits for its copy (Redis
    /// did not answer), the events after it wait behind it.
    in_waiting: VecDeque<tether::ServerEvent>,
    state: CopyState,
    /// Heartbeat periods seen.
    ticks: u64,
    /// `Stats::redis_epoch` when the copy was last written: a newer one means Redis may
    /// have lost it (restarted empty).
    epoch: u64,
    /// Idempotency keys of the last sends (key, session, seq), newest last, at most
    /// [`RECENT_KEYS`]: a retry is answered as the first even when Redis lost the key
    /// (restarted empty between the send and its retry).
    recent: VecDeque<(String, u64, u64)>,
    /// Records (`sent:`/`idem:` keys) of sends whose append timed out: the next rewrite of
    /// the copy deletes them (the send was answered 503 and not delivered).
    failed_keys: Vec<String>,
    /// The writer generation of the last rewrite (see `snapshot_script`).
    wg: String,
    /// Since when Redis has not answered this worker: client messages then wait for the
    /// next heartbeat period's retry, sends are refused at once (a worker never queues work
    /// behind one Redis timeout per message).
    down_since: Option<tokio::time::Instant>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    /// Redis holds exactly what `Local` holds.
    Synced,
    /// Rewrite before the next append (never written, a write failed, Redis lost it).
    #[default]
    Stale,
    /// Over the byte bound: incomplete until the next send finds it within the bound.
    OverBound,
    /// Another node owns the copy (the session moved): this node writes nothing more.
    Moved,
}

/// The copy as read from Redis.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stored {
    pub(crate) meta: HashMap<String, Vec<u8>>,
    /// (seq, payload) of `…:out`.
    pub(crate) out: Vec<(u64, Bytes)>,
    /// (seq, payload) of `…:in`.
    pub(crate) inbound: Vec<(u64, Bytes)>,
}

impl Stored {
    fn num(&self, k: &str) -> Option<u64> {
        std::str::from_utf8(self.meta.get(k)?).ok()?.parse().ok()
    }
}

/// Why a copy is refused at a resume, and the server numbers it cannot prove delivered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) why: String,
    /// `first..=last` of the server messages that may be missing (`None`: unknown).
    pub(crate) missing: Option<(u64, u64)>,
}

/// The proof at resume: the copy becomes a session only if it is complete — written by a
/// node for this session, never over its bound, its messages exactly `acked+1 ..= next-1`
/// with no gap, trimmed no further than the client's position, and the presented token is
/// the session's (current or previous). Then `last_seq = next-1`, `last_received` = the
/// last client message it holds (committed: acknowledged only after it was copied).
pub(crate) fn check(s: &Stored, req: &SessionRequest) -> Result<SessionExport, Refused> {
    let refuse = |why: String, missing| Err(Refused { why, missing });
    if s.meta.is_empty() {
        return refuse("no durable copy".into(), None);
    }
    let acked = s.num("acked").unwrap_or(0);
    let last = s
        .num("last")
        .unwrap_or(0)
        .max(s.num("next").unwrap_or(1) - 1);
    let missing = (last > acked).then_some((acked + 1, last));
    if s.num("sid") != Some(req.session_id) {
        return refuse("the copy is of another session".into(), None);
    }
    let Some(hdr) = s
        .meta
        .get("hdr")
        .and_then(|h| SessionExport::from_bytes(Bytes::copy_from_slice(h)).ok())
    else {
        return refuse("the copy's header is unreadable".into(), missing);
    };
    if !hdr.accepts(req) {
        return refuse(
            "the presented token (or id, or principal) is not the copy's".into(),
            None,
        );
    }
    if let Some(bad) = s.meta.get("bad") {
        return refuse(
            format!("the copy is incomplete ({})", String::from_utf8_lossy(bad)),
            missing,
        );
    }
    let (Some(next), Some(in_last)) = (s.num("next"), s.num("in")) else {
        return refuse("the copy's numbers are missing".into(), missing);
    };
    let mut want = acked + 1;
    for (q, _) in &s.out {
        if *q != want {
            return refuse(
                format!("the copy has a gap: {want} expected, {q} found"),
                missing,
            );
        }
        want += 1;
    }
    if want != next {
        return refuse(
            format!(
                "the copy ends at {} but numbered up to {}",
                want - 1,
                next - 1
            ),
            missing,
        );
    }
    if acked > req.last_received {
        return refuse(
            format!(
                "the copy starts after {acked}, the client received only up to {}",
                req.last_received
            ),
            missing,
        );
    }
    if req.last_received > next - 1 {
        return refuse(
            format!(
                "the client received {} but the copy holds up to {}",
                req.last_received,
                next - 1
            ),
            None,
        );
    }
    let state = SessionState {
        id: req.session_id,
        last_seq: next - 1,
        acked,
        last_received: in_last,
        resumes: 0,
        replay: s.out.iter().map(|(_, p)| p.clone()).collect(),
    };
    hdr.with_state(state, Vec::new()).map_err(|e| Refused {
        why: e.to_string(),
        missing,
    })
}

/// A script of the durable copy, built (and hashed) once: `fn name = source;` with its docs.
macro_rules! copy_script {
    ($(#[$doc:meta])* fn $name:ident = $src:expr;) => {
        $(#[$doc])*
        fn $name() -> &'static Script {
            static S: LazyLock<Script> = LazyLock::new(|| Script::new($src));
            &S
        }
    };
}

copy_script! {
    /// Rewrites a copy: `(prefix, id, node, sid, hdr, acked, in, max_bytes, ttl_ms,
    /// stale_keys (newline-separated), wg, [seq, payload]…)`. `wg` is the writer's generation:
    /// every later write carries it and is refused (`stale`) with another one — a write this
    /// node gave up on (timed out) may still run later, even after a rewrite on a new
    /// connection, and must change nothing then. The client messages are kept when the session is the same. Returns `ok`
    /// or why the copy is incomplete (`over-bound`).
    fn snapshot_script = r"
local p, id, node, sid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local k = p .. ':dur:' .. id
-- The sent/idempotency records of sends whose append this node gave up on (they may have
-- run late): not delivered, so not 'done'.
for key in string.gmatch(ARGV[10], '[^\n]+') do redis.call('DEL', key) end
local old = redis.call('HGET', k, 'sid')
redis.call('DEL', k, k .. ':out')
if old ~= sid then redis.call('DEL', k .. ':in') end
local max, bytes, nxt, last = tonumber(ARGV[8]), 0, tonumber(ARGV[6]) + 1, tonumber(ARGV[6])
local bad = false
for i = 12, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  last = seq
  if not bad then
    bytes = bytes + #ARGV[i + 1]
    if bytes > max then
      bad = 'over-bound'
    else
      redis.call('XADD', k .. ':out', '0-' .. seq, 'p', ARGV[i + 1])
      nxt = seq + 1
    end
  end
end
if bad then redis.call('DEL', k .. ':out') end
-- The client messages kept: a write this node thought failed may have run after all (it
-- waited in the connection while Redis was unreachable): what the stream holds counts.
local inl = tonumber(ARGV[7])
if old == sid then
  local top = redis.call('XREVRANGE', k .. ':in', '+', '-', 'COUNT', 1)
  if top[1] then
    local q = tonumber(string.match(top[1][1], '-(%d+)$'))
    if q > inl then inl = q end
  end
end
redis.call('HSET', k, 'node', node, 'sid', sid, 'hdr', ARGV[5], 'acked', ARGV[6],
  'next', nxt, 'last', last, 'bytes', bytes, 'in', inl, 'wg', ARGV[11])
if bad then redis.call('HSET', k, 'bad', bad) end
for _, key in ipairs({k, k .. ':out', k .. ':in'}) do redis.call('PEXPIRE', key, ARGV[9]) end
return bad or 'ok'
";
}

copy_script! {
    /// Appends a server message: `(prefix, id, node, sid, seq, payload, max_bytes, ttl_ms,
    /// sent_key, deadline)`; a routed send past its `deadline` (ms on Redis's own clock) is
    /// `expired` (its sender stops waiting then: exact, whatever the nodes' clocks); its
    /// `sent_key` records `sid:seq` for a minute (its sender asks
    /// it when the answer does not come), and makes the send idempotent: one found there is
    /// `done:sid:seq` (handled already: an inbox entry a claim moved here before its first
    /// handler trimmed it).
    /// `missing`, `moved` (another node's or session's copy), `bad` (incomplete already),
    /// `gap`, `over-bound`, or `ok`.
    fn append_script = r"
local k = ARGV[1] .. ':dur:' .. ARGV[2]
local m = redis.call('HMGET', k, 'node', 'sid', 'next', 'bytes', 'bad', 'last', 'wg')
if not m[1] then return 'missing' end
if m[1] == ARGV[3] and m[2] == ARGV[4] and m[7] ~= ARGV[11] then return 'stale' end
if ARGV[9] ~= '' then
  -- Handled already, unless the record is of a number this session's copy does not hold
  -- (a write its node gave up on ran late, and the copy was rewritten without it).
  local done = redis.call('GET', ARGV[9])
  if done then
    local s, q = string.match(done, '^(%d+):(%d+)$')
    if s ~= ARGV[4] or tonumber(q) < tonumber(m[3]) then return 'done:' .. done end
  end
end
if ARGV[10] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > tonumber(ARGV[10]) then return 'expired' end
end
if m[1] ~= ARGV[3] or m[2] ~= ARGV[4] then return 'moved' end
local seq = tonumber(ARGV[5])
if seq > tonumber(m[6] or '0') then redis.call('HSET', k, 'last', seq) end
if m[5] then return 'bad' end
if seq ~= tonumber(m[3]) then
  redis.call('HSET', k, 'bad', 'gap')
  redis.call('DEL', k .. ':out')
  return 'gap'
end
local bytes = tonumber(m[4]) + #ARGV[6]
if bytes > tonumber(ARGV[7]) then
  redis.call('HSET', k, 'bad', 'over-bound')
  redis.call('DEL', k .. ':out')
  return 'over-bound'
end
redis.call('XADD', k .. ':out', '0-' .. seq, 'p', ARGV[6])
redis.call('HSET', k, 'next', seq + 1, 'bytes', bytes)
redis.call('PEXPIRE', k, ARGV[8])
redis.call('PEXPIRE', k .. ':out', ARGV[8])
if ARGV[9] ~= '' then redis.call('SET', ARGV[9], ARGV[4] .. ':' .. seq, 'PX', 60000) end
return 'ok'
";
}

copy_script! {
    /// Takes back a message appended whose delivery then failed: `(prefix, id, node, sid, seq,
    /// len, sent_key)`. Only while it is the last one.
    fn retract_script = r"
local k = ARGV[1] .. ':dur:' .. ARGV[2]
local m = redis.call('HMGET', k, 'node', 'sid', 'next', 'wg')
if m[1] ~= ARGV[3] or m[2] ~= ARGV[4] then return 'moved' end
if m[4] ~= ARGV[8] then return 'stale' end
local seq = tonumber(ARGV[5])
if tonumber(m[3]) ~= seq + 1 then return 'gone' end
redis.call('XDEL', k .. ':out', '0-' .. seq)
redis.call('XSETID', k .. ':out', '0-' .. (seq - 1))
if ARGV[7] ~= '' then redis.call('DEL', ARGV[7]) end
redis.call('HSET', k, 'next', seq, 'last', seq - 1)
redis.call('HINCRBY', k, 'bytes', -tonumber(ARGV[6]))
return 'ok'
";
}

copy_script! {
    /// Trims to the client's ACK: `(prefix, id, node, sid, acked, ttl_ms)`. `missing`, `moved`,
    /// `bad`, `ok`.
    fn trim_script = r"
local k = ARGV[1] .. ':dur:' .. ARGV[2]
local m = redis.call('HMGET', k, 'node', 'sid', 'acked', 'bad', 'wg')
if not m[1] then return 'missing' end
if m[1] ~= ARGV[3] or m[2] ~= ARGV[4] then return 'moved' end
if m[5] ~= ARGV[7] then return 'stale' end
for _, key in ipairs({k, k .. ':out', k .. ':in'}) do redis.call('PEXPIRE', key, ARGV[6]) end
if m[4] then return 'bad' end
local a = tonumber(ARGV[5])
if a <= tonumber(m[3]) then return 'ok' end
local gone = redis.call('XRANGE', k .. ':out', '-', '0-' .. a)
local n = 0
for _, e in ipairs(gone) do n = n + #e[2][2] end
redis.call('XTRIM', k .. ':out', 'MINID', '0-' .. (a + 1))
redis.call('HINCRBY', k, 'bytes', -n)
redis.call('HSET', k, 'acked', a)
return 'ok'
";
}

copy_script! {
    /// Keeps a client message: `(prefix, id, node, sid, seq, payload, keep, ttl_ms)`.
    /// `missing`, `moved`, `gap`, `ok`.
    fn inbound_script = r"
local k = ARGV[1] .. ':dur:' .. ARGV[2]
local m = redis.call('HMGET', k, 'node', 'sid', 'in', 'wg')
if not m[1] then return 'missing' end
if m[1] ~= ARGV[3] or m[2] ~= ARGV[4] then return 'moved' end
if m[4] ~= ARGV[9] then return 'stale' end
local seq, last = tonumber(ARGV[5]), tonumber(m[3])
if seq <= last then return 'ok' end
if seq ~= last + 1 then return 'gap' end
redis.call('XADD', k .. ':in', 'MAXLEN', ARGV[7], '0-' .. seq, 'p', ARGV[6])
redis.call('HSET', k, 'in', seq)
redis.call('PEXPIRE', k .. ':in', ARGV[8])
return 'ok'
";
}

copy_script! {
    /// Deletes the copy if it is this node's, of session `sid`: `(prefix, id, node, sid)`.
    fn drop_script = r"
local k = ARGV[1] .. ':dur:' .. ARGV[2]
local m = redis.call('HMGET', k, 'node', 'sid')
if m[1] ~= ARGV[3] or m[2] ~= ARGV[4] then return 0 end
redis.call('DEL', k, k .. ':out', k .. ':in')
return 1
";
}

/// An export's identity alone (what a copy's `hdr` holds).
fn header_of(e: &SessionExport) -> Bytes {
    let empty = SessionState {
        id: e.session_id(),
        last_seq: 0,
        acked: 0,
        last_received: 0,
        resumes: 0,
        replay: Vec::new(),
    };
    e.clone()
        .with_state(empty, Vec::new())
        .map_or_else(|_| e.to_bytes(), |h| h.to_bytes())
}

/// The client an event is about (`None`: a refused connection).
pub(crate) fn client_of(ev: &tether::ServerEvent) -> Option<&str> {
    use tether::ServerEvent as E;
    match ev {
        E::Connected { client_id, .. }
        | E::Message { client_id, .. }
        | E::Disconnected { client_id, .. }
        | E::Resumed { client_id, .. }
        | E::SessionLost { client_id, .. } => Some(client_id),
        E::Presence { change, .. } => Some(&change.id),
        _ => None,
    }
}

fn stream_entries(v: redis::streams::StreamRangeReply) -> Vec<(u64, Bytes)> {
    v.ids
        .into_iter()
        .filter_map(|e| {
            let seq = e.id.split_once('-')?.1.parse().ok()?;
            let p: Vec<u8> = e
                .map
                .get("p")
                .and_then(|v| redis::from_redis_value(v.clone()).ok())?;
            Some((seq, Bytes::from(p)))
        })
        .collect()
}

impl Cluster {
    /// A call of one of the copy's scripts with the arguments they all begin with:
    /// `(prefix, id, node, sid, …)`.
    fn copy_call(
        &self,
        script: &'static Script,
        id: &str,
        sid: u64,
    ) -> redis::ScriptInvocation<'static> {
        let mut call = script.prepare_invoke();
        call.arg(&self.prefix).arg(id).arg(&self.node).arg(sid);
        call
    }

    fn durable_key(&self, id: &str) -> String {
        self.key(&format!("dur:{id}"))
    }

    /// Where a send with the backend's `Idempotency-Key` `key` is recorded (`sid:seq`, for a
    /// minute, by the append script): a second send with the key, on any node, is not sent
    /// again but answered as the first.
    pub(crate) fn idem_key(&self, id: &str, key: &str) -> String {
        self.key(&format!("idem:{id}:{key}"))
    }

    /// Where the holder records that a durable routed send of `node` (request `req`) is in
    /// the client's copy: `sid:seq`, for a minute.
    pub(crate) fn sent_key(&self, node: &str, req: &str) -> String {
        self.key(&format!("sent:{node}:{req}"))
    }

    /// The worker of `id` (started on first use).
    fn worker(self: &Arc<Self>, id: &str) -> Option<mpsc::UnboundedSender<Job>> {
        let d = self.settings.durable?;
        let mut m = lock(&self.durable);
        if let Some(tx) = m.get(id).filter(|t| !t.is_closed()) {
            return Some(tx.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        m.insert(id.to_owned(), tx.clone());
        tokio::spawn(self.clone().work(id.to_owned(), d, rx));
        Some(tx)
    }

    /// Hands `job` to `id`'s worker (nothing without `--durable-sessions`).
    pub(crate) fn durable_job(self: &Arc<Self>, id: &str, job: Job) {
        if let Some(tx) = self.worker(id) {
            let _ = tx.send(job);
        }
    }

    /// Whether `--durable-sessions` is on.
    pub(crate) fn durable(&self) -> bool {
        self.settings.durable.is_some()
    }

    /// A send to a client of this node: into the copy, then to the client.
    pub(crate) async fn durable_send(
        self: &Arc<Self>,
        id: &str,
        msg: Bytes,
        idem: Option<&str>,
    ) -> Sent {
        let (tx, rx) = oneshot::channel();
        let sent_key = idem.map(|k| self.idem_key(id, k));
        self.durable_job(
            id,
            Job::Send {
                msg,
                reply: Some(tx),
                deadline: None,
                sent_key,
                give_up: Some(tokio::time::Instant::now() + self.settings.dead_after / 3),
            },
        );
        rx.await
            .unwrap_or_else(|_| Err(DurableError::Redis("the worker ended".into())))
    }

    /// Every heartbeat period: each worker trims its copy and rewrites one Redis lost.
    pub(crate) fn durable_tick(self: &Arc<Self>) {
        if !self.durable() {
            return;
        }
        let workers: Vec<mpsc::UnboundedSender<Job>> = {
            let mut m = lock(&self.durable);
            m.retain(|_, t| !t.is_closed());
            m.values().cloned().collect()
        };
        for w in workers {
            let _ = w.send(Job::Tick);
        }
    }

    /// Restores `req`'s session from its durable copy (its node died or does not answer).
    pub(crate) async fn durable_restore(
        self: &Arc<Self>,
        req: SessionRequest,
    ) -> Option<SessionExport> {
        let (tx, rx) = oneshot::channel();
        let id = req.client_id.clone();
        self.durable_job(
            &id,
            Job::Restore {
                req: Box::new(req),
                reply: tx,
            },
        );
        rx.await.ok().flatten()
    }

    async fn work(self: Arc<Self>, id: String, max: usize, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut l = Local::default();
        while let Some(job) = rx.recv().await {
            self.trim_local(&id, &mut l);
            if !matches!(
                job,
                Job::Tick | Job::Drop | Job::Restore { .. } | Job::Imported(_)
            ) {
                self.trim(&id, &mut l, max, false).await;
            }
            match job {
                Job::Send {
                    msg,
                    reply,
                    deadline,
                    sent_key,
                    give_up,
                } => {
                    let r = if give_up.is_some_and(|t| tokio::time::Instant::now() > t) {
                        Err(DurableError::Expired)
                    } else {
                        self.send_one(&id, &mut l, max, msg, deadline, sent_key.as_deref())
                            .await
                    };
                    match reply {
                        Some(tx) => {
                            let _ = tx.send(r);
                        }
                        None => {
                            if let Err(e) = r {
                                log::line(
                                    &id,
                                    "durable-send-failed",
                                    &log::kv(&[("error", &e.to_string())]),
                                );
                            }
                        }
                    }
                }
                Job::Event(ev) => {
                    if let tether::ServerEvent::Message {
                        session: Some(s), ..
                    } = &*ev
                    {
                        if *s != l.sid {
                            self.sync(&id, &mut l, max).await;
                        }
                    }
                    l.in_waiting.push_back(*ev);
                    self.flush_inbound(&id, &mut l, max, false).await;
                }
                Job::Sync => self.sync(&id, &mut l, max).await,
                Job::Imported(e) => {
                    let st = e.state();
                    l = Local {
                        sid: st.id,
                        out: (st.acked + 1..)
                            .zip(st.replay.iter().chain(e.pending()).cloned())
                            .collect(),
                        acked: st.acked,
                        in_last: st.last_received,
                        ..Local::default()
                    };
                    l.out_bytes = l.out.iter().map(|(_, p)| p.len()).sum();
                    // Owned here from now on (the previous node's late writes are fenced
                    // off); the header is rewritten when the resume rotates the token.
                    self.write_snapshot(&id, &mut l, max, header_of(&e)).await;
                }
                Job::Restore { req, reply } => {
                    let got = self.restore(&id, &mut l, max, &req).await;
                    let _ = reply.send(got);
                }
                Job::Tick => self.tick(&id, &mut l, max).await,
                Job::Drop => {
                    // The session is over: what still waits for its copy goes out as is.
                    while let Some(ev) = l.in_waiting.pop_front() {
                        self.publish(Some(ev));
                    }
                    if l.sid != 0 && l.state != CopyState::Moved {
                        let mut con = self.con.clone();
                        let _: redis::RedisResult<i64> = self
                            .copy_call(drop_script(), &id, l.sid)
                            .invoke_async(&mut con)
                            .await;
                    }
                    lock(&self.durable).remove(&id);
                    return;
                }
            }
        }
    }

    /// Drops what the client acknowledged from the local copy.
    fn trim_local(&self, id: &str, l: &mut Local) {
        let Some((sid, acked)) = self.handle.session_acked(id) else {
            return;
        };
        if sid != l.sid || acked <= l.acked {
            return;
        }
        while l.out.front().is_some_and(|(q, _)| *q <= acked) {
            if let Some((_, p)) = l.out.pop_front() {
                l.out_bytes -= p.len();
            }
        }
        l.acked = acked;
    }

    /// A session transition here: the copy follows the server's session (a new one starts
    /// empty; the same one gets the new token hashes).
    async fn sync(&self, id: &str, l: &mut Local, max: usize) {
        let Some(hdr) = self.handle.session_header(id) else {
            return;
        };
        if hdr.session_id() != l.sid {
            // A session this node did not see start (a new one, or one installed without
            // its copy): the copy starts at the next number; a resume elsewhere that needs
            // older ones is refused, explicitly.
            let next = self
                .handle
                .next_seq(id)
                .filter(|(s, _)| *s == hdr.session_id())
                .map_or(1, |(_, q)| q);
            *l = Local {
                sid: hdr.session_id(),
                acked: next - 1,
                ..Local::default()
            };
        }
        self.write_snapshot(id, l, max, hdr.to_bytes()).await;
    }

    async fn write_snapshot(&self, id: &str, l: &mut Local, max: usize, hdr: Bytes) {
        if l.state == CopyState::Moved {
            return;
        }
        let wg = format!(
            "{}:{}",
            self.node,
            self.next_fetch.fetch_add(1, Ordering::Relaxed)
        );
        let mut call = self.copy_call(snapshot_script(), id, l.sid);
        call.arg(hdr.as_ref())
            .arg(l.acked)
            .arg(l.in_last)
            .arg(max)
            .arg(ms(COPY_TTL))
            .arg(l.failed_keys.join("\n"))
            .arg(&wg);
        for (q, p) in &l.out {
            call.arg(*q).arg(p.as_ref());
        }
        let mut con = self.con.clone();
        let epoch = self.stats.redis_epoch.load(Ordering::Relaxed);
        match call.invoke_async::<String>(&mut con).await {
            Ok(r) => {
                l.epoch = epoch;
                l.down_since = None;
                l.failed_keys.clear();
                l.wg = wg;
                self.stats.durable_writes.fetch_add(1, Ordering::Relaxed);
                l.redis_acked = l.acked;
                l.state = if r == "ok" {
                    CopyState::Synced
                } else {
                    CopyState::OverBound
                };
                *lock(&self.headers).entry(id.to_owned()).or_default() = hdr;
            }
            Err(e) => {
                l.state = CopyState::Stale;
                l.down_since.get_or_insert_with(tokio::time::Instant::now);
                self.set_up(false, Some(&e));
            }
        }
    }

    /// Rewrites the copy from the local state with the last header written.
    async fn resync(&self, id: &str, l: &mut Local, max: usize) {
        let hdr = match self.handle.session_header(id) {
            Some(h) if h.session_id() == l.sid => h.to_bytes(),
            _ => match lock(&self.headers).get(id) {
                Some(h) => h.clone(),
                None => return,
            },
        };
        self.write_snapshot(id, l, max, hdr).await;
    }

    async fn send_one(
        &self,
        id: &str,
        l: &mut Local,
        max: usize,
        msg: Bytes,
        deadline: Option<u64>,
        sent_key: Option<&str>,
    ) -> Sent {
        if let Some((_, s, q)) = sent_key
            .filter(|k| k.contains(":idem:"))
            .and_then(|k| l.recent.iter().find(|(r, _, _)| r == k))
        {
            return Err(DurableError::Done {
                session: *s,
                seq: *q,
            });
        }
        let Some((sid, seq)) = self.handle.next_seq(id) else {
            // No session (a client that did not ask for one): nothing to make durable.
            return self
                .handle
                .try_deliver(id, msg)
                .map(|d| (d, false))
                .map_err(DurableError::Send);
        };
        if sid != l.sid {
            self.sync(id, l, max).await;
        }
        if l.state == CopyState::Moved {
            return Err(DurableError::Moved);
        }
        if l.down_since
            .is_some_and(|t| t.elapsed() < self.settings.dead_after / 3)
        {
            return Err(DurableError::Redis("Redis does not answer".into()));
        }
        if l.state == CopyState::Stale
            || (l.state == CopyState::OverBound && l.out_bytes + msg.len() <= max)
        {
            self.resync(id, l, max).await;
            if l.state == CopyState::Stale {
                return Err(DurableError::Redis("Redis does not answer".into()));
            }
        }
        let mut tries = 0;
        let mirrored = loop {
            tries += 1;
            let mut con = self.con.clone();
            let r: redis::RedisResult<String> = self
                .copy_call(append_script(), id, sid)
                .arg(seq)
                .arg(msg.as_ref())
                .arg(max)
                .arg(ms(COPY_TTL))
                .arg(sent_key.unwrap_or(""))
                .arg(deadline.map(|d| d.to_string()).unwrap_or_default())
                .arg(&l.wg)
                .invoke_async(&mut con)
                .await;
            self.stats.durable_writes.fetch_add(1, Ordering::Relaxed);
            match r.as_deref() {
                Ok("ok") => {
                    l.down_since = None;
                    break true;
                }
                Ok("stale") => {
                    l.state = CopyState::Stale;
                    return Err(DurableError::Redis(
                        "the copy was rewritten meanwhile".into(),
                    ));
                }
                Ok("expired") => return Err(DurableError::Expired),
                Ok(done) if done.starts_with("done:") => {
                    let mut it = done[5..].split(':').map(|n| n.parse().unwrap_or(0));
                    let (session, done_seq) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
                    if session == sid && done_seq >= seq {
                        // A record of a number this session has not given to any message
                        // yet: written by an append whose send was never delivered (the
                        // append ran after this node gave up on it, and the copy was not
                        // rewritten since). Answering it would be a 202 for a message the
                        // client never gets: the copy is rewritten without it (the record
                        // deleted), then the send is made.
                        log::line(
                            id,
                            "durable-send-stale-record",
                            &log::kv(&[
                                ("key", sent_key.unwrap_or("")),
                                ("record", &format!("{session}:{done_seq}")),
                                ("next", &format!("{sid}:{seq}")),
                                (
                                    "note",
                                    "not delivered: the copy is rewritten and the send made",
                                ),
                            ]),
                        );
                        if let Some(k) = sent_key {
                            l.failed_keys.push(k.to_owned());
                        }
                        l.state = CopyState::Stale;
                        if tries > 1 {
                            return Err(DurableError::Redis(
                                "the copy holds a send that was not delivered".into(),
                            ));
                        }
                        self.resync(id, l, max).await;
                        if l.state == CopyState::Stale {
                            return Err(DurableError::Redis("Redis does not answer".into()));
                        }
                        continue;
                    }
                    log::line(
                        id,
                        "durable-send-done",
                        &log::kv(&[
                            ("key", sent_key.unwrap_or("")),
                            ("session", &session.to_string()),
                            ("seq", &done_seq.to_string()),
                            ("next", &format!("{sid}:{seq}")),
                            (
                                "note",
                                "handled already: answered as the first, not sent again",
                            ),
                        ]),
                    );
                    return Err(DurableError::Done {
                        session,
                        seq: done_seq,
                    });
                }
                Ok("missing") if tries == 1 => {
                    // Redis lost it (restarted empty): rewrite, then append.
                    self.resync(id, l, max).await;
                    if l.state == CopyState::Stale {
                        return Err(DurableError::Redis("Redis does not answer".into()));
                    }
                }
                Ok("moved") => {
                    l.state = CopyState::Moved;
                    return Err(DurableError::Moved);
                }
                Ok("over-bound" | "bad") => {
                    l.state = CopyState::OverBound;
                    break false;
                }
                Ok(other) => {
                    l.state = CopyState::Stale;
                    return Err(DurableError::Redis(format!("the copy refused it: {other}")));
                }
                Err(e) => {
                    l.state = CopyState::Stale;
                    l.down_since.get_or_insert_with(tokio::time::Instant::now);
                    if let Some(k) = sent_key {
                        l.failed_keys.push(k.to_owned());
                    }
                    self.set_up(false, Some(e));
                    return Err(DurableError::Redis(e.to_string()));
                }
            }
        };
        match self.handle.try_deliver_at(id, msg.clone(), sid, seq) {
            Ok(d) => {
                if let Some(k) = sent_key.filter(|k| k.contains(":idem:")) {
                    if l.recent.len() >= RECENT_KEYS {
                        l.recent.pop_front();
                    }
                    l.recent.push_back((k.to_owned(), sid, seq));
                }
                l.out_bytes += msg.len();
                l.out.push_back((seq, msg));
                Ok((d, mirrored))
            }
            Err(e) => {
                if mirrored {
                    let mut con = self.con.clone();
                    let r: redis::RedisResult<String> = self
                        .copy_call(retract_script(), id, sid)
                        .arg(seq)
                        .arg(msg.len())
                        .arg(sent_key.unwrap_or(""))
                        .arg(&l.wg)
                        .invoke_async(&mut con)
                        .await;
                    if r.as_deref() != Ok("ok") {
                        l.state = CopyState::Stale;
                    }
                }
                Err(DurableError::Send(e))
            }
        }
    }

    /// The client's events into the journal, in order; a message of its session goes into
    /// the copy first and is committed after (so whatever the backend reads, or its
    /// acknowledgement the client gets, is in the copy).
    async fn flush_inbound(&self, id: &str, l: &mut Local, max: usize, tick: bool) {
        if l.down_since.is_some() && !tick {
            return; // retried at the next heartbeat period
        }
        let mut resynced = false;
        while let Some(ev) = l.in_waiting.front() {
            let (seq, msg) = match ev {
                tether::ServerEvent::Message {
                    session: Some(s),
                    seq: Some(q),
                    msg,
                    ..
                } if *s == l.sid && l.state != CopyState::Moved => (*q, msg.clone()),
                // Not this copy's (another session, or the session moved on): as is.
                _ => {
                    self.publish(l.in_waiting.pop_front());
                    continue;
                }
            };
            let mut con = self.con.clone();
            let r: redis::RedisResult<String> = self
                .copy_call(inbound_script(), id, l.sid)
                .arg(seq)
                .arg(msg.as_ref())
                .arg(IN_KEEP)
                .arg(ms(COPY_TTL))
                .arg(&l.wg)
                .invoke_async(&mut con)
                .await;
            self.stats.durable_writes.fetch_add(1, Ordering::Relaxed);
            match r.as_deref() {
                Ok("ok") => {
                    l.down_since = None;
                    self.publish(l.in_waiting.pop_front());
                    l.in_last = l.in_last.max(seq);
                    self.handle.commit(id, l.sid, seq);
                }
                Ok("missing" | "gap" | "stale") if !resynced => {
                    resynced = true;
                    self.resync(id, l, max).await;
                }
                Ok("moved") => l.state = CopyState::Moved,
                Ok(_) => return,
                Err(e) => {
                    l.down_since.get_or_insert_with(tokio::time::Instant::now);
                    self.set_up(false, Some(e));
                    return; // kept for the next heartbeat period
                }
            }
        }
    }

    async fn tick(&self, id: &str, l: &mut Local, max: usize) {
        self.trim(id, l, max, true).await;
    }

    /// Trims the copy in Redis to the client's ACK (at every `TRIM_EVERY` acknowledged
    /// messages; with `tick`, whenever it moved and every 64 periods), rewrites a stale one.
    async fn trim(&self, id: &str, l: &mut Local, max: usize, tick: bool) {
        if !tick && l.acked < l.redis_acked + TRIM_EVERY {
            return;
        }
        if l.sid == 0 || l.state == CopyState::Moved {
            return;
        }
        if l.state == CopyState::Stale {
            self.resync(id, l, max).await;
            if l.state == CopyState::Stale {
                return; // Redis does not answer: the next period tries again
            }
        }
        if tick {
            l.ticks += 1;
        }
        // Trimmed when the client acknowledged more; an idle copy's expiry is refreshed
        // every 64 periods (well within COPY_TTL).
        if l.acked > l.redis_acked || (tick && l.ticks % 64 == 0) {
            let mut con = self.con.clone();
            let r: redis::RedisResult<String> = self
                .copy_call(trim_script(), id, l.sid)
                .arg(l.acked)
                .arg(ms(COPY_TTL))
                .arg(&l.wg)
                .invoke_async(&mut con)
                .await;
            self.stats.durable_writes.fetch_add(1, Ordering::Relaxed);
            match r.as_deref() {
                Ok("ok") => l.redis_acked = l.acked,
                Ok("missing" | "stale") => self.resync(id, l, max).await,
                Ok("moved") => l.state = CopyState::Moved,
                Ok(_) => {}
                Err(e) => {
                    l.state = CopyState::Stale;
                    l.down_since.get_or_insert_with(tokio::time::Instant::now);
                    self.set_up(false, Some(e));
                }
            }
        }
        if tick
            && l.state == CopyState::Synced
            && l.epoch != self.stats.redis_epoch.load(Ordering::Relaxed)
        {
            // Redis answers again after an error: it may have restarted empty.
            self.resync(id, l, max).await;
        }
        if tick && !l.in_waiting.is_empty() {
            self.flush_inbound(id, l, max, true).await;
        }
    }

    /// Reads the copy of `req`'s session, checks it and, when complete, takes it over (the
    /// copy becomes this node's) and republishes the client messages it kept.
    async fn restore(
        &self,
        id: &str,
        l: &mut Local,
        max: usize,
        req: &SessionRequest,
    ) -> Option<SessionExport> {
        let t = std::time::Instant::now();
        let k = self.durable_key(id);
        let mut con = self.con.clone();
        let read = async {
            let meta: HashMap<String, Vec<u8>> =
                redis::cmd("HGETALL").arg(&k).query_async(&mut con).await?;
            let out: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(format!("{k}:out"))
                .arg("-")
                .arg("+")
                .query_async(&mut con)
                .await?;
            let inbound: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(format!("{k}:in"))
                .arg("-")
                .arg("+")
                .query_async(&mut con)
                .await?;
            redis::RedisResult::Ok(Stored {
                meta,
                out: stream_entries(out),
                inbound: stream_entries(inbound),
            })
        };
        let stored = match read.await {
            Ok(s) => s,
            Err(e) => {
                self.set_up(false, Some(&e));
                log::line(
                    id,
                    "session-restore-failed",
                    &log::kv(&[
                        ("session", &req.session_id.to_string()),
                        ("error", &e.to_string()),
                    ]),
                );
                return None;
            }
        };
        let from =
            String::from_utf8_lossy(stored.meta.get("node").map_or(&b"-"[..], |v| v)).into_owned();
        match check(&stored, req) {
            Ok(export) => {
                let st = export.state();
                *l = Local {
                    sid: st.id,
                    out: stored.out.iter().cloned().collect(),
                    out_bytes: stored.out.iter().map(|(_, p)| p.len()).sum(),
                    acked: st.acked,
                    in_last: st.last_received,
                    ..Local::default()
                };
                self.write_snapshot(id, l, max, header_of(&export)).await;
                if l.state == CopyState::Stale {
                    // Not owned here: another node could still write to it. Refuse.
                    return None;
                }
                if let Some(j) = self.journal.get() {
                    for (q, p) in &stored.inbound {
                        crate::gateway::event::record_replayed(j, id, st.id, *q, p);
                    }
                }
                self.stats.sessions_restored.fetch_add(1, Ordering::Relaxed);
                log::line(
                    id,
                    "session-restored-durable",
                    &log::kv(&[
                        ("from_node", &from),
                        ("session", &st.id.to_string()),
                        ("replay", &st.replay.len().to_string()),
                        ("republished", &stored.inbound.len().to_string()),
                        (
                            "took",
                            &tether_proto::duration::Human(t.elapsed()).to_string(),
                        ),
                    ]),
                );
                Some(export)
            }
            Err(r) => {
                self.stats
                    .session_fetch_failed
                    .fetch_add(1, Ordering::Relaxed);
                let missing = r
                    .missing
                    .map(|(a, b)| format!("{a}..={b}"))
                    .unwrap_or_else(|| "-".into());
                log::line(
                    id,
                    "session-restore-refused",
                    &log::kv(&[
                        ("from_node", &from),
                        ("session", &req.session_id.to_string()),
                        ("why", &r.why),
                        ("missing", &missing),
                        (
                            "note",
                            "the client is told SESSION_UNKNOWN and reports session-lost",
                        ),
                    ]),
                );
                // The backend learns which server messages may be missing, as for a
                // session lost on this node (only for a copy of this very session).
                if let (Some(j), Some((a, b))) = (self.journal.get(), r.missing) {
                    let ev = tether::ServerEvent::SessionLost {
                        client_id: id.into(),
                        session: req.session_id,
                        unacked: Some(a..=b),
                        unsent: Vec::new(),
                        unsent_seqs: None,
                    };
                    crate::gateway::event::record(j, &ev);
                }
                None
            }
        }
    }

    /// Records a client's event in the journal.
    fn publish(&self, ev: Option<tether::ServerEvent>) {
        if let (Some(j), Some(ev)) = (self.journal.get(), ev) {
            crate::gateway::event::record(j, &ev);
        }
    }

    /// A lower bound of Redis's clock now (ms): its time when it ran the last answered
    /// heartbeat, plus the time since the answer came (the answer's delay is not added).
    pub(crate) fn redis_now_at_least(&self) -> Option<u64> {
        let (at, redis_ms, _) = (*lock(&self.redis_clock))?;
        Some(redis_ms + ms(at.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::auth::resume::TokenHash;

    fn header(sid: u64, token: &[u8; 16]) -> Vec<u8> {
        // An export's identity as `session_header` writes it: built through the public
        // decoder from a hand-made v1 layout.
        let mut b = Vec::new();
        b.extend_from_slice(b"TSX\x01");
        b.extend_from_slice(&5u16.to_be_bytes());
        b.extend_from_slice(b"dev-1");
        b.extend_from_slice(&sid.to_be_bytes());
        b.push(0); // no principal
        b.extend_from_slice(&TokenHash::of(token).to_bytes());
        b.push(0); // no previous
        for _ in 0..4 {
            b.extend_from_slice(&0u64.to_be_bytes());
        }
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    }

    fn stored(acked: u64, seqs: &[u64], next: u64) -> Stored {
        let mut meta = HashMap::new();
        for (k, v) in [
            ("node", "a".to_string()),
            ("sid", "9".into()),
            ("acked", acked.to_string()),
            ("next", next.to_string()),
            ("last", (next - 1).to_string()),
            ("in", "4".into()),
        ] {
            meta.insert(k.to_string(), v.into_bytes());
        }
        meta.insert("hdr".into(), header(9, &[1; 16]));
        Stored {
            meta,
            out: seqs
                .iter()
                .map(|q| (*q, Bytes::from(q.to_string())))
                .collect(),
            inbound: Vec::new(),
        }
    }

    fn req(last_received: u64, token: &[u8; 16]) -> SessionRequest {
        SessionRequest {
            client_id: "dev-1".into(),
            session_id: 9,
            token_hash: TokenHash::of(token),
            principal: None,
            last_received,
        }
    }

    #[test]
    fn a_complete_copy_becomes_the_session() {
        let e = check(&stored(3, &[4, 5, 6], 7), &req(3, &[1; 16])).unwrap();
        let st = e.state();
        assert_eq!(
            (st.id, st.acked, st.last_seq, st.last_received),
            (9, 3, 6, 4)
        );
        assert_eq!(
            st.replay,
            vec![Bytes::from("4"), Bytes::from("5"), Bytes::from("6")]
        );
        // The client got further than the copy's ACK: fine, the resume trims.
        assert!(check(&stored(3, &[4, 5, 6], 7), &req(6, &[1; 16])).is_ok());
        // Nothing unacknowledged.
        assert!(check(&stored(6, &[], 7), &req(6, &[1; 16])).is_ok());
    }

    #[test]
    fn an_incomplete_copy_is_refused_naming_what_may_be_missing() {
        // A gap.
        let r = check(&stored(3, &[4, 6], 7), &req(3, &[1; 16])).unwrap_err();
        assert!(r.why.contains("gap"), "{}", r.why);
        assert_eq!(r.missing, Some((4, 6)));
        // Ends short of its numbering.
        let r = check(&stored(3, &[4, 5], 7), &req(3, &[1; 16])).unwrap_err();
        assert_eq!(r.missing, Some((4, 6)), "{}", r.why);
        // Trimmed past what the client received.
        let r = check(&stored(5, &[6], 7), &req(3, &[1; 16])).unwrap_err();
        assert!(r.why.contains("starts after 5"), "{}", r.why);
        // Over its bound (marked by the scripts), whatever it still holds.
        let mut s = stored(3, &[4, 5, 6], 7);
        s.meta.insert("bad".into(), b"over-bound".to_vec());
        s.meta.insert("last".into(), b"9".to_vec());
        let r = check(&s, &req(3, &[1; 16])).unwrap_err();
        assert!(r.why.contains("over-bound"), "{}", r.why);
        assert_eq!(r.missing, Some((4, 9)));
        // A wrong token moves nothing and names nothing.
        let r = check(&stored(3, &[4, 5, 6], 7), &req(3, &[2; 16])).unwrap_err();
        assert!(r.why.contains("token"), "{}", r.why);
        assert_eq!(r.missing, None);
        // Another session, no copy at all.
        let mut other = req(3, &[1; 16]);
        other.session_id = 10;
        assert!(check(&stored(3, &[4, 5, 6], 7), &other).is_err());
        assert!(check(&Stored::default(), &req(3, &[1; 16])).is_err());
        // The client claims more than the copy numbered.
        let r = check(&stored(3, &[4, 5, 6], 7), &req(8, &[1; 16])).unwrap_err();
        assert!(r.why.contains("received 8"), "{}", r.why);
    }
}
