//! `tether serve --cluster redis://…`: several nodes share presence and routing through Redis
//! (docs/CLUSTER.md is the reference: keys, writes, failure cases).
//!
//! ```text
//!   Server ──ServerEvent::Presence──▶ serve loop ──observe() (try_send, bounded)──▶ writer task
//!                                                                                   │ claim / update
//!   writer task ── every dead_after/3: heartbeat, reap dead nodes ───────────────────▶ Redis
//!   reader task ◀── XREAD BLOCK: presence stream, broadcast stream, this node's inbox ── Redis
//!        │ records ──▶ mirror (every client of the cluster, by id) ──▶ /api/clients, status page
//!        │ inbox: send / close / replaced ──▶ ServerHandle::try_deliver / kick
//!   POST /api/clients/{id}/messages for a client on node N ──XADD──▶ N's inbox
//! ```
//!
//! The library (`tether`) knows nothing of Redis: this layer consumes the server's presence
//! events and calls its handle. The serve loop never waits on Redis: transitions go through a
//! bounded channel; when it is full the transition is dropped, counted
//! (`tether_cluster_presence_dropped_total`) and repaired by the reconcile pass (every
//! `dead_after`, O(own clients), only when something was dropped or failed).
//!
//! Sessions move: a resume on node B of a session node A holds makes B ask A for it through
//! A's inbox (`k=take`); A hands it over ([`ServerHandle::take_session`], `k=session` with
//! the export's bytes) and B installs it before the normal resume check (B's server has
//! [`ClusterSessions`] as its `SessionSource`). Bounded: no answer within min(2 s,
//! `dead_after`/3) → SESSION_UNKNOWN, the client's explicit session-lost.
//!
//! ```text
//!   B: HELLO(resume S) ─▶ SessionSource::fetch ──XADD k=take──▶ A's inbox
//!   A: take_session ──XADD k=session data=… ──▶ B's inbox ──▶ fetch resolves ─▶ import, resume
//! ```
//!
//! With `--durable-sessions` ([`durable`]) each session has a copy in Redis and a session
//! whose node died is restored from it on the node the client resumes on; without it such a
//! session is lost, explicitly.
//!
//! What it deliberately does not do: merge the event streams of the nodes (each node's
//! `/api/events` carries its own clients' events).

pub(crate) mod durable;
mod scripts;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::Value;
use serde::Deserialize;
use tether::{ServerEvent, ServerHandle, SessionExport, SessionFetch, SessionRequest};
use tether_proto::presence::{PresenceKind, PresenceState};
use tether_proto::CloseCode;
use tokio::sync::{mpsc, oneshot, watch};

use crate::log;
use crate::metrics::{gauge_value, Families};
use crate::status::model::{ClientQuery, ClientRow, Page, ServerSource, StatusSource};
use tether_proto::duration::Human;

/// Transitions waiting for the writer task, at most (each is a client id and a state, well
/// under 200 bytes: this bounds the queue at a few hundred KiB).
const QUEUE: usize = 4096;
/// Entries a presence, broadcast or inbox stream keeps (`XADD MAXLEN ~`).
const STREAM_MAX: u64 = 100_000;
/// Broadcasts kept in the broadcast stream.
const BROADCAST_MAX: u64 = 1000;
/// Entries read from the streams per XREAD.
const READ_BATCH: usize = 256;
/// How long an XREAD blocks on Redis.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// The cluster settings of `serve`.
#[derive(Debug, Clone)]
pub(crate) struct ClusterSettings {
    /// `redis://HOST:PORT[/DB]` or `rediss://…`.
    pub(crate) url: String,
    /// This node's id (letters, digits, `.`, `_`, `-`; at most 64).
    pub(crate) node_id: String,
    /// The cluster's name: the key prefix is `tether:{NAME}`.
    pub(crate) name: String,
    /// A node that has not heartbeaten for this long is dead; heartbeats every third of it.
    pub(crate) dead_after: Duration,
    /// Offline client records are forgotten after this long.
    pub(crate) offline_retention: Duration,
    /// PEM roots a `rediss://` Redis is checked against (`None`: the system's).
    pub(crate) ca: Option<Vec<u8>>,
    /// The Redis user's password (`--cluster-password-file`), when not in the URL.
    pub(crate) password: Option<String>,
    /// `--durable-sessions`: the byte bound of one session's copy (`--durable-max-bytes`).
    pub(crate) durable: Option<usize>,
}

impl ClusterSettings {
    /// Secure by default: a Redis beyond loopback is reached over TLS (`rediss://`) and with a
    /// password, or the operator says `--insecure`. Whoever can write to the cluster's keys
    /// can send to, close and take over any client of any node.
    pub(crate) fn check_exposure(&self, insecure: bool) -> Result<()> {
        let info = self.connection_info()?;
        let (host, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, _) => (h.as_str(), false),
            redis::ConnectionAddr::TcpTls { host, .. } => (host.as_str(), true),
            _ => return Ok(()), // a Unix socket: local by definition
        };
        if self.ca.is_some() && !tls {
            return Err(crate::exit::UsageError(format!(
                "--cluster-ca is for TLS to Redis: write the URL as rediss://{host}:PORT"
            ))
            .into());
        }
        let local = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if local || insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        if !tls {
            missing.push("TLS (a rediss:// URL)");
        }
        if info.redis_settings().password().is_none() {
            missing.push("a password (--cluster-password-file FILE)");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(crate::exit::UsageError(format!(
            "refusing to use the Redis at {host} without {}: anyone on the path could read \
             the cluster's traffic or write to its keys, and so send to, close or take over \
             any client. Add {}, or --insecure to accept that",
            missing
                .iter()
                .map(|m| m.split(" (").next().unwrap_or(m))
                .collect::<Vec<_>>()
                .join(" and "),
            missing.join(" and ")
        ))
        .into())
    }

    /// The URL with the password from `--cluster-password-file`.
    fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo as _;
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .with_context(|| format!("bad --cluster URL {:?}", self.url))?;
        Ok(match &self.password {
            Some(p) => {
                let redis = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(redis)
            }
            None => info,
        })
    }
}

/// Reads `--cluster-ca`: PEM with at least one certificate.
pub(crate) fn read_ca(path: &std::path::Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| {
        crate::exit::UsageError(format!("cannot read --cluster-ca {}", path.display()))
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(crate::exit::UsageError(format!(
            "--cluster-ca {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ))
        .into());
    }
    Ok(pem)
}

/// Reads `--cluster-password-file` (trimmed; not empty).
pub(crate) fn read_password(path: &std::path::Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| {
        crate::exit::UsageError(format!(
            "cannot read --cluster-password-file {}",
            path.display()
        ))
    })?;
    let p = raw.trim();
    if p.is_empty() {
        return Err(crate::exit::UsageError(format!(
            "--cluster-password-file {} is empty",
            path.display()
        ))
        .into());
    }
    Ok(p.to_owned())
}

/// Checks a node id or cluster name: it becomes part of Redis keys.
pub(crate) fn parse_name(s: &str) -> std::result::Result<String, String> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("expected 1 to 64 letters, digits, '.', '_' or '-'".into());
    }
    Ok(s.to_owned())
}

/// Checks a Redis URL (`redis://` or `rediss://`).
pub(crate) fn parse_url(s: &str) -> std::result::Result<String, String> {
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("expected redis://HOST:PORT or rediss://HOST:PORT".into());
    }
    redis::Client::open(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// One client record as stored in Redis (`tether:{C}:clients`, JSON written by the scripts).
#[derive(Debug, Clone, Deserialize)]
struct Record {
    id: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    gen: f64,
    state: String,
    #[serde(default)]
    since: f64,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    remote: String,
    #[serde(default)]
    session: String,
}

/// What this node last wrote for one of its clients.
#[derive(Debug, Clone)]
struct Own {
    gen: u64,
    state: &'static str,
    reason: String,
}

/// A transition of one of this node's clients, for the writer task.
#[derive(Debug)]
enum Transition {
    /// A new connection (or a resume) of the client on this node.
    Claim(String),
    /// Another state of a client this node holds.
    Update {
        id: String,
        state: &'static str,
        reason: String,
    },
}

/// The counters behind `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    redis_up: AtomicBool,
    /// Whether a Redis call has ended yet (the first one is logged whatever its outcome: a
    /// node that never reaches Redis says so).
    redis_known: AtomicBool,
    nodes_alive: AtomicU64,
    presence_writes: AtomicU64,
    heartbeats: AtomicU64,
    dropped: AtomicU64,
    stale_writes: AtomicU64,
    routed_out: AtomicU64,
    routed_in: AtomicU64,
    route_failed: AtomicU64,
    clients_lost: AtomicU64,
    replaced: AtomicU64,
    sessions_in: AtomicU64,
    sessions_out: AtomicU64,
    session_fetch_failed: AtomicU64,
    durable_writes: AtomicU64,
    sessions_restored: AtomicU64,
    /// Bumped when Redis may have lost what this node wrote (it answers again after an
    /// error, or this node's heartbeat was gone): every durable copy is rewritten.
    redis_epoch: AtomicU64,
}

/// The cluster layer of one node.
pub(crate) struct Cluster {
    node: String,
    prefix: String,
    settings: ClusterSettings,
    /// Writes, scripts and routing (multiplexed; never a blocking command).
    con: ConnectionManager,
    /// The blocking reads (a connection of their own: XREAD BLOCK would stall the others).
    reader: ConnectionManager,
    handle: ServerHandle,
    /// Every client record of the cluster, by id (from the presence stream).
    mirror: Mutex<BTreeMap<String, Record>>,
    /// What this node wrote for its own clients.
    own: Mutex<HashMap<String, Own>>,
    stats: Stats,
    /// A transition was dropped or a write failed: reconcile at the next tick.
    dirty: AtomicBool,
    /// Shutting down: no more heartbeats (they would announce the node again).
    leaving: AtomicBool,
    tx: mpsc::Sender<Transition>,
    /// Redis's clock as of the last answered heartbeat: (when the answer came, Redis's time
    /// in ms, the call's round trip). Routed entries carry a deadline on that clock.
    redis_clock: Mutex<Option<(tokio::time::Instant, u64, Duration)>>,
    /// Session fetches waiting for the holder's answer, by request number.
    fetches: Mutex<HashMap<u64, oneshot::Sender<Option<SessionExport>>>>,
    next_fetch: AtomicU64,
    /// Clients whose session this node handed to another node lately: client id → (node,
    /// when). Sends routed here for them afterwards are forwarded there.
    moved: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// `--durable-sessions`: each client's worker (see [`durable`]).
    durable: Mutex<HashMap<String, mpsc::UnboundedSender<durable::Job>>>,
    /// The session header each client's copy was last written with.
    headers: Mutex<HashMap<String, Bytes>>,
    /// The event journal (a restored session's client messages are republished into it).
    journal: std::sync::OnceLock<Arc<crate::gateway::journal::Journal>>,
    /// Durable routed sends waiting for the holder's answer, by request number.
    sends: Mutex<HashMap<u64, oneshot::Sender<SentAnswer>>>,
}

/// The holder's answer to a durable routed send (`k=sent`).
#[derive(Debug, Clone)]
pub(crate) struct SentAnswer {
    /// The node that answered.
    pub(crate) node: String,
    /// `None`: accepted; else the HTTP status to answer and why.
    pub(crate) refused: Option<(u16, String)>,
    pub(crate) session: Option<u64>,
    pub(crate) seq: Option<u64>,
    /// Whether it is in the client's durable copy (false: the copy is over its bound).
    pub(crate) durable: bool,
}

/// How long a hand-over is remembered for forwarding sends routed to the old node.
const MOVED_KEPT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn state_label(s: &PresenceState) -> &'static str {
    s.kind().label()
}

fn reason_of(s: &PresenceState) -> String {
    match s {
        PresenceState::Offline { reason, .. } | PresenceState::Resuming { reason, .. } => {
            reason.label().to_owned()
        }
        _ => String::new(),
    }
}

impl Cluster {
    /// Starts the cluster layer: its writer and reader tasks run until the process ends.
    /// Does not wait for Redis: a node whose Redis is down serves its own clients and says it
    /// is degraded until Redis answers.
    pub(crate) fn start(settings: ClusterSettings, handle: ServerHandle) -> Result<Arc<Cluster>> {
        if settings.url.starts_with("rediss://") {
            // redis-rs builds its rustls config from the process default: ring, as everywhere
            // else in tether. An error means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let info = settings.connection_info()?;
        let client = match &settings.ca {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
        .with_context(|| format!("bad --cluster URL {:?}", settings.url))?;
        let beat = settings.dead_after / 3;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(beat))
            .set_response_timeout(Some(beat))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let con = ConnectionManager::new_lazy_with_config(client.clone(), cfg.clone())
            .context("cannot set up the Redis connection")?;
        let reader = ConnectionManager::new_lazy_with_config(
            client,
            cfg.set_response_timeout(Some(READ_BLOCK + beat)),
        )
        .context("cannot set up the Redis connection")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let c = Arc::new(Cluster {
            node: settings.node_id.clone(),
            prefix: format!("tether:{{{}}}", settings.name),
            settings,
            con,
            reader,
            handle,
            mirror: Mutex::new(BTreeMap::new()),
            own: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            dirty: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            tx,
            redis_clock: Mutex::new(None),
            fetches: Mutex::new(HashMap::new()),
            next_fetch: AtomicU64::new(1),
            moved: Mutex::new(HashMap::new()),
            durable: Mutex::new(HashMap::new()),
            headers: Mutex::new(HashMap::new()),
            journal: std::sync::OnceLock::new(),
            sends: Mutex::new(HashMap::new()),
        });
        let (started_tx, started_rx) = watch::channel(false);
        tokio::spawn(c.clone().writer(rx, started_tx));
        tokio::spawn(c.clone().read_loop(started_rx));
        log::line(
            "-",
            "cluster",
            &log::kv(&[
                ("node", &c.node),
                ("keys", &format!("{}:*", c.prefix)),
                (
                    "dead_after",
                    &tether_proto::duration::Human(c.settings.dead_after).to_string(),
                ),
                (
                    "heartbeat",
                    &tether_proto::duration::Human(beat).to_string(),
                ),
            ]),
        );
        Ok(c)
    }

    /// This node's id.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn inbox_of(&self, node: &str) -> String {
        format!("{}:node:{node}:inbox", self.prefix)
    }

    /// The event journal, for the client messages a restored session republishes.
    pub(crate) fn set_journal(&self, j: Arc<crate::gateway::journal::Journal>) {
        let _ = self.journal.set(j);
    }

    /// Takes one server event (from the serve loop; never waits).
    pub(crate) fn observe(self: &Arc<Self>, ev: &ServerEvent) {
        if self.durable() {
            // The client's events reach the journal through its worker, in order (a
            // message once it is in the copy).
            if let Some(id) = durable::client_of(ev) {
                self.durable_job(id, durable::Job::Event(Box::new(ev.clone())));
            }
            match ev {
                ServerEvent::Connected { client_id, .. }
                | ServerEvent::Resumed { client_id, .. } => {
                    self.durable_job(client_id, durable::Job::Sync)
                }
                ServerEvent::Presence { change, .. }
                    if matches!(change.to, PresenceState::Offline { .. }) =>
                {
                    lock(&self.headers).remove(&change.id);
                    self.durable_job(&change.id, durable::Job::Drop)
                }
                _ => {}
            }
        }
        let ServerEvent::Presence { change, .. } = ev else {
            return;
        };
        let t = match (&change.from, &change.to) {
            (
                Some(PresenceState::Online | PresenceState::Suspect),
                PresenceState::Online | PresenceState::Suspect,
            ) => Transition::Update {
                id: change.id.clone(),
                state: state_label(&change.to),
                reason: String::new(),
            },
            (_, PresenceState::Online | PresenceState::Suspect) => {
                Transition::Claim(change.id.clone())
            }
            (_, to) => Transition::Update {
                id: change.id.clone(),
                state: state_label(to),
                reason: reason_of(to),
            },
        };
        if self.tx.try_send(t).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    // --- the writer task ---------------------------------------------------------------

    async fn writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Transition>,
        started: watch::Sender<bool>,
    ) {
        let beat = self.settings.dead_after / 3;
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut is_started = false;
        let mut ticks: u64 = 0;
        // When the last heartbeat that Redis answered was sent.
        let mut last_answered: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                t = rx.recv() => match t {
                    None => return,
                    Some(t) if is_started => self.apply(t).await,
                    // Before the start-up clean-up: the reconcile after it writes everything.
                    Some(_) => self.dirty.store(true, Ordering::Relaxed),
                },
                _ = tick.tick(), if !self.leaving.load(Ordering::Relaxed) => {
                    ticks += 1;
                    self.durable_tick();
                    let began = tokio::time::Instant::now();
                    let mut fresh = self.beat(&mut is_started).await;
                    if fresh.is_some() {
                        // Redis's answer alone is not enough: a heartbeat sent while Redis was
                        // unreachable, whose answer this node never saw (timed out), still sits
                        // in the connection's TCP send queue and runs when the path heals —
                        // after the others reaped this node, re-adding its heartbeat. The next
                        // heartbeat then looks fresh and the reaped claims were never re-made.
                        // So: no answered heartbeat within the bound → re-claim regardless.
                        if last_answered.is_some_and(|t: tokio::time::Instant| {
                            t.elapsed() > self.settings.dead_after
                        }) {
                            fresh = Some(false);
                        }
                        last_answered = Some(began);
                    }
                    if is_started && !*started.borrow() {
                        let _ = started.send(true);
                    }
                    if fresh == Some(false) {
                        self.stats.redis_epoch.fetch_add(1, Ordering::Relaxed);
                        // Declared dead (or it could have been): every claim is re-made.
                        lock(&self.own).clear();
                        self.dirty.store(true, Ordering::Relaxed);
                        log::line("-", "cluster-reclaim", "note=\"no heartbeat within the bound: re-claiming the clients this node still holds\"");
                    }
                    // Reconcile when something was dropped, and every 30 ticks regardless.
                    if is_started && (self.dirty.swap(false, Ordering::Relaxed) || ticks % 30 == 0) {
                        self.reconcile().await;
                    }
                }
            }
        }
    }

    /// Heartbeat, start-up clean-up and reaping. `Some(fresh)` when Redis answered.
    async fn beat(&self, is_started: &mut bool) -> Option<bool> {
        let mut con = self.con.clone();
        let sent = tokio::time::Instant::now();
        let r: redis::RedisResult<(i64, i64)> = scripts::heartbeat()
            .arg(&self.prefix)
            .arg(&self.node)
            .arg(ms(self.settings.dead_after))
            .invoke_async(&mut con)
            .await;
        let fresh = match r {
            Ok((fresh, now)) => {
                let at = tokio::time::Instant::now();
                *lock(&self.redis_clock) = Some((at, now.max(0) as u64, at - sent));
                fresh == 1
            }
            Err(e) => {
                self.set_up(false, Some(&e));
                return None;
            }
        };
        self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        let also = if *is_started {
            String::new()
        } else {
            // What a previous run of this node claimed is lost: clear it before claiming.
            let r: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(self.inbox_of(&self.node))
                .query_async(&mut con)
                .await;
            if let Err(e) = r {
                self.set_up(false, Some(&e));
                return None;
            }
            self.node.clone()
        };
        let r: redis::RedisResult<Vec<String>> = scripts::reap()
            .arg(&self.prefix)
            .arg(ms(self.settings.dead_after))
            .arg(STREAM_MAX)
            .arg(ms(self.settings.offline_retention))
            .arg(&also)
            .arg("node-lost")
            .arg("0")
            .invoke_async(&mut con)
            .await;
        match r {
            Ok(mut out) => {
                let alive = out.pop().and_then(|s| s.parse().ok()).unwrap_or(0);
                self.stats.nodes_alive.store(alive, Ordering::Relaxed);
                for pair in out.chunks(2) {
                    if let [node, lost] = pair {
                        let n: u64 = lost.parse().unwrap_or(0);
                        self.stats.clients_lost.fetch_add(n, Ordering::Relaxed);
                        let what = if *node == self.node {
                            "previous-run-cleared"
                        } else {
                            "node-lost"
                        };
                        log::line(
                            "-",
                            what,
                            &log::kv(&[
                                ("node", node),
                                ("clients_offline", lost),
                                ("reason", "node-lost"),
                            ]),
                        );
                    }
                }
                *is_started = true;
                self.set_up(true, None);
                Some(fresh || also == self.node)
            }
            Err(e) => {
                self.set_up(false, Some(&e));
                None
            }
        }
    }

    /// Leaves the cluster in order (on shutdown): waits up to `within` for the queued
    /// transitions (the clients going offline) to be written, then marks what this node still
    /// claims `offline` with reason `node-left` and removes its heartbeat, so the others do
    /// not wait for the dead bound.
    pub(crate) async fn leave(&self, within: Duration) {
        self.leaving.store(true, Ordering::Relaxed);
        let t = tokio::time::Instant::now();
        while self.tx.capacity() < self.tx.max_capacity() && t.elapsed() < within {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut con = self.con.clone();
        let r: redis::RedisResult<Vec<String>> = scripts::reap()
            .arg(&self.prefix)
            .arg(ms(self.settings.dead_after))
            .arg(STREAM_MAX)
            .arg(ms(self.settings.offline_retention))
            .arg(&self.node)
            .arg("node-left")
            .arg("1")
            .invoke_async(&mut con)
            .await;
        match r {
            Ok(out) => {
                let n = out
                    .chunks(2)
                    .find(|p| p.first() == Some(&self.node))
                    .and_then(|p| p.get(1).cloned())
                    .unwrap_or_default();
                log::line(
                    "-",
                    "cluster-left",
                    &log::kv(&[("node", &self.node), ("clients_offline", &n)]),
                );
            }
            Err(e) => log::line(
                "-",
                "cluster-left",
                &log::kv(&[
                    ("node", &self.node),
                    ("error", &e.to_string()),
                    ("note", "the others declare this node dead after the bound"),
                ]),
            ),
        }
    }

    fn set_up(&self, up: bool, err: Option<&redis::RedisError>) {
        let was = self.stats.redis_up.swap(up, Ordering::Relaxed);
        let first = !self.stats.redis_known.swap(true, Ordering::Relaxed);
        if up && !was {
            self.stats.redis_epoch.fetch_add(1, Ordering::Relaxed);
        }
        if was != up || first {
            if up {
                log::line("-", "cluster-up", &log::kv(&[("node", &self.node)]));
            } else {
                let e = err.map(ToString::to_string).unwrap_or_default();
                log::line(
                    "-",
                    "cluster-degraded",
                    &log::kv(&[
                        ("node", &self.node),
                        ("error", &e),
                        ("note", "serving local clients only; cluster presence and routing resume when Redis answers"),
                    ]),
                );
            }
        }
    }

    async fn apply(&self, t: Transition) {
        match t {
            Transition::Claim(id) => {
                // Only a connection that is still here: a late claim for one already gone
                // would take the client from a newer owner.
                let Some(c) = self.handle.client(&id) else {
                    return;
                };
                if !matches!(c.state, PresenceState::Online | PresenceState::Suspect) {
                    return;
                }
                self.claim(&c, "new").await;
            }
            Transition::Update { id, state, reason } => {
                let own = lock(&self.own).get(&id).cloned();
                match own {
                    Some(o) => self.update(&id, o.gen, state, &reason).await,
                    // Never claimed (Redis was down, or the claim was dropped): the
                    // reconcile writes it if it is still here.
                    None if state != "offline" => self.dirty.store(true, Ordering::Relaxed),
                    None => {}
                }
            }
        }
    }

    async fn claim(&self, c: &tether::ClientInfo, mode: &str) {
        let state = state_label(&c.state);
        let mut con = self.con.clone();
        let r: redis::RedisResult<(i64, String)> = scripts::claim()
            .arg(&self.prefix)
            .arg(&c.id)
            .arg(&self.node)
            .arg(mode)
            .arg(c.remote.to_string())
            .arg(c.session.map(|s| s.to_string()).unwrap_or_default())
            .arg(state)
            .arg(STREAM_MAX)
            .invoke_async(&mut con)
            .await;
        match r {
            Ok((gen, owner)) if gen < 0 => {
                // Another node holds it now (it connected there while this node was cut
                // off): the newer connection wins.
                lock(&self.own).remove(&c.id);
                if self.handle.kick(
                    &c.id,
                    CloseCode::REPLACED,
                    &format!("replaced by a newer connection on node {owner}"),
                ) {
                    self.stats.replaced.fetch_add(1, Ordering::Relaxed);
                    log::line(&c.id, "cluster-replaced", &log::kv(&[("by_node", &owner)]));
                }
            }
            Ok((gen, _)) => {
                self.stats.presence_writes.fetch_add(1, Ordering::Relaxed);
                let gen = u64::try_from(gen).unwrap_or(0);
                lock(&self.own).insert(
                    c.id.clone(),
                    Own {
                        gen,
                        state,
                        reason: reason_of(&c.state),
                    },
                );
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Relaxed);
                self.set_up(false, Some(&e));
            }
        }
    }

    async fn update(&self, id: &str, gen: u64, state: &'static str, reason: &str) {
        let mut con = self.con.clone();
        let r: redis::RedisResult<i64> = scripts::update()
            .arg(&self.prefix)
            .arg(id)
            .arg(&self.node)
            .arg(gen)
            .arg(state)
            .arg(reason)
            .arg(STREAM_MAX)
            .invoke_async(&mut con)
            .await;
        match r {
            Ok(1) => {
                self.stats.presence_writes.fetch_add(1, Ordering::Relaxed);
                let mut own = lock(&self.own);
                if state == "offline" {
                    own.remove(id);
                } else if let Some(o) = own.get_mut(id) {
                    o.state = state;
                    o.reason = reason.to_owned();
                }
            }
            Ok(_) => {
                // Fenced: a newer claim (another node, or this node's own re-claim) owns it.
                self.stats.stale_writes.fetch_add(1, Ordering::Relaxed);
                let mut own = lock(&self.own);
                if own.get(id).is_some_and(|o| o.gen == gen) {
                    own.remove(id);
                }
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Relaxed);
                self.set_up(false, Some(&e));
            }
        }
    }

    /// Writes what differs between this node's clients and what it last wrote: O(own
    /// clients), run only after a dropped transition or a failed write, and every 30
    /// heartbeats.
    async fn reconcile(&self) {
        let clients = self.handle.clients();
        for c in &clients {
            let state = state_label(&c.state);
            let reason = reason_of(&c.state);
            let own = lock(&self.own).get(&c.id).cloned();
            match own {
                Some(o) if o.state == state && o.reason == reason => {}
                Some(o) => self.update(&c.id, o.gen, state, &reason).await,
                None if state == "offline" => {}
                None => self.claim(c, "re").await,
            }
            if !self.stats.redis_up.load(Ordering::Relaxed) {
                self.dirty.store(true, Ordering::Relaxed);
                return;
            }
        }
        // Clients the server has forgotten.
        let known: std::collections::HashSet<&str> =
            clients.iter().map(|c| c.id.as_str()).collect();
        lock(&self.own).retain(|id, _| known.contains(id.as_str()));
    }

    // --- the reader task ---------------------------------------------------------------

    async fn read_loop(self: Arc<Self>, mut started: watch::Receiver<bool>) {
        // The inbox is cleared at start-up by the writer: read it only after that.
        if started.wait_for(|s| *s).await.is_err() {
            return;
        }
        let mut ids: Option<[String; 3]> = None;
        loop {
            match self.read_once(&mut ids).await {
                Ok(()) => {}
                Err(e) => {
                    self.set_up(false, Some(&e));
                    // Reload the mirror when Redis is back (the presence entries missed
                    // meanwhile may be trimmed), but keep the inbox and broadcast positions:
                    // what was routed during the blip is still in the streams.
                    if let Some(ids) = ids.as_mut() {
                        ids[0].clear();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The last id of a stream (`0-0` when empty).
    async fn last_id(&self, con: &mut ConnectionManager, key: &str) -> redis::RedisResult<String> {
        let r: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(con)
            .await?;
        Ok(r.ids
            .first()
            .map(|e| e.id.clone())
            .unwrap_or_else(|| "0-0".into()))
    }

    /// Loads every record into the mirror; returns the presence stream's position to read on
    /// from (taken before the load, so nothing between is missed; re-applying is harmless).
    async fn load_mirror(&self, con: &mut ConnectionManager) -> redis::RedisResult<String> {
        let from = self.last_id(con, &self.key("presence")).await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key("clients"))
            .query_async(con)
            .await?;
        let mut m = BTreeMap::new();
        for (id, json) in all {
            if let Ok(r) = serde_json::from_str::<Record>(&json) {
                m.insert(id, r);
            }
        }
        *lock(&self.mirror) = m;
        Ok(from)
    }

    async fn read_once(self: &Arc<Self>, ids: &mut Option<[String; 3]>) -> redis::RedisResult<()> {
        let mut con = self.reader.clone();
        let keys = [
            self.key("presence"),
            self.key("broadcast"),
            self.inbox_of(&self.node),
        ];
        let pos = match ids {
            Some(p) => p,
            None => {
                let b = self.last_id(&mut con, &keys[1]).await?;
                ids.insert([String::new(), b, "0-0".into()])
            }
        };
        if pos[0].is_empty() {
            pos[0] = self.load_mirror(&mut con).await?;
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(ms(READ_BLOCK))
            .arg("STREAMS")
            .arg(&keys)
            .arg(&pos[..])
            .query_async(&mut con)
            .await?;
        self.set_up(true, None);
        let Some(mut reply) = reply else {
            return Ok(());
        };
        // The inbox before the presence stream: a claim moves a client's pending sends into
        // this inbox and writes its record in one script; once the mirror shows the client
        // here, the API delivers to it locally, so what was moved must be delivered first.
        reply.keys.sort_by_key(|sk| sk.key != keys[2]);
        for sk in reply.keys {
            let which = keys.iter().position(|k| *k == sk.key);
            let full = sk.ids.len() >= READ_BATCH;
            for e in sk.ids {
                match which {
                    Some(0) => self.on_presence(&e.map),
                    Some(1 | 2) if self.expired(&e.id, &e.map) => {}
                    Some(1) => self.on_broadcast(&e.map),
                    Some(2) => self.on_inbox(&e.map),
                    _ => {}
                }
                if let Some(i) = which {
                    pos[i] = e.id;
                }
            }
            if which == Some(2) {
                // What was handled leaves the inbox (MINID keeps what came after it).
                let _: redis::RedisResult<i64> = redis::cmd("XTRIM")
                    .arg(&keys[2])
                    .arg("MINID")
                    .arg(next_id(&pos[2]))
                    .query_async(&mut con)
                    .await;
            }
            if which == Some(0) && full {
                // Behind: if the stream was trimmed past our position, reload.
                let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&keys[0])
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut con)
                    .await?;
                if first.ids.first().is_some_and(|f| id_lt(&pos[0], &f.id)) {
                    pos[0].clear();
                }
            }
        }
        Ok(())
    }

    fn on_presence(&self, map: &HashMap<String, Value>) {
        let Some(json) = field::<String>(map, "r") else {
            return;
        };
        let Ok(r) = serde_json::from_str::<Record>(&json) else {
            return;
        };
        let mut m = lock(&self.mirror);
        if r.state == "gone" {
            m.remove(&r.id);
            return;
        }
        // Records of one client arrive in generation order except around a reload: keep the
        // newer one.
        if m.get(&r.id).is_some_and(|old| old.gen > r.gen) {
            return;
        }
        m.insert(r.id.clone(), r);
    }

    fn on_broadcast(self: &Arc<Self>, map: &HashMap<String, Value>) {
        if field::<String>(map, "origin").as_deref() == Some(self.node.as_str()) {
            return;
        }
        if let Some(p) = field::<Vec<u8>>(map, "p") {
            self.stats.routed_in.fetch_add(1, Ordering::Relaxed);
            if self.durable() {
                self.durable_broadcast_local(&Bytes::from(p));
                return;
            }
            if let Err(e) = self.handle.broadcast(Bytes::from(p)) {
                self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                log::line(
                    "-",
                    "cluster-broadcast-failed",
                    &log::kv(&[("error", &e.to_string())]),
                );
            }
        }
    }

    fn on_inbox(self: &Arc<Self>, map: &HashMap<String, Value>) {
        let (Some(kind), Some(id)) = (field::<String>(map, "k"), field::<String>(map, "id")) else {
            return;
        };
        match kind.as_str() {
            "send" if self.durable() => {
                let Some(p) = field::<Vec<u8>>(map, "p") else {
                    return;
                };
                self.stats.routed_in.fetch_add(1, Ordering::Relaxed);
                self.on_durable_send(&id, Bytes::from(p), map);
            }
            "sent" => self.on_sent(&id, map),
            "send" => {
                let Some(p) = field::<Vec<u8>>(map, "p") else {
                    return;
                };
                self.stats.routed_in.fetch_add(1, Ordering::Relaxed);
                let p = Bytes::from(p);
                match self.handle.try_deliver(&id, p.clone()) {
                    Err(tether::SendError::NotConnected(_)) if self.moved_to(&id).is_some() => {
                        // Its session moved to another node after this was routed here.
                        self.forward_if_moved(&id, p);
                    }
                    Err(e) => {
                        self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                        log::line(
                            &id,
                            "routed-send-failed",
                            &log::kv(&[("error", &e.to_string())]),
                        );
                    }
                    Ok(_) => {}
                }
            }
            "take" => self.on_take(&id, map),
            "session" | "no-session" => self.on_session(&kind, &id, map),
            "close" => {
                let code = field::<u16>(map, "code")
                    .map(CloseCode)
                    .unwrap_or(CloseCode::NORMAL);
                let text = field::<String>(map, "text").unwrap_or_default();
                self.stats.routed_in.fetch_add(1, Ordering::Relaxed);
                if !self.handle.kick(&id, code, &text) {
                    self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            "replaced" => {
                let gen = field::<u64>(map, "gen").unwrap_or(0);
                let by = field::<String>(map, "by").unwrap_or_default();
                let mine = lock(&self.own).get(&id).map(|o| o.gen);
                if mine.is_some_and(|g| g < gen) {
                    lock(&self.own).remove(&id);
                    if self.handle.kick(
                        &id,
                        CloseCode::REPLACED,
                        &format!("replaced by a newer connection on node {by}"),
                    ) {
                        self.stats.replaced.fetch_add(1, Ordering::Relaxed);
                        log::line(&id, "cluster-replaced", &log::kv(&[("by_node", &by)]));
                    }
                }
            }
            _ => {}
        }
    }

    // --- session hand-over -------------------------------------------------------------

    /// How long a node waits for another to hand a session over: at most 2 s, at most a
    /// heartbeat period (a third of `dead_after`) — the resuming client's handshake waits
    /// this long at worst before it is told SESSION_UNKNOWN.
    fn fetch_wait(&self) -> Duration {
        (self.settings.dead_after / 3).min(Duration::from_secs(2))
    }

    /// The node a session was handed to lately, for `id`.
    fn moved_to(&self, id: &str) -> Option<String> {
        lock(&self.moved)
            .get(id)
            .filter(|(_, at)| at.elapsed() < MOVED_KEPT)
            .map(|(n, _)| n.clone())
    }

    /// Forwards a send for `id` (routed here, or this node's echo) to the node the
    /// client's session moved to lately, if it moved.
    pub(crate) fn forward_if_moved(self: &Arc<Self>, id: &str, p: Bytes) {
        let Some(node) = self.moved_to(id) else {
            return;
        };
        let c = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let r = c.route_send(&node, &id, &p, None).await;
            log::line(
                &id,
                "routed-send-forwarded",
                &log::kv(&[("to_node", &node), ("ok", &r.is_ok().to_string())]),
            );
        });
    }

    /// Asks the node that holds `req`'s session (by the mirror) to hand it over: `None` at
    /// once when no other live node holds that session of the client.
    fn fetch(self: &Arc<Self>, req: SessionRequest) -> SessionFetch {
        let holder = {
            let m = lock(&self.mirror);
            m.get(&req.client_id)
                .filter(|r| {
                    r.node != self.node
                        && r.state != "offline"
                        && r.session == req.session_id.to_string()
                })
                .map(|r| r.node.clone())
        };
        let Some(holder) = holder else {
            // No live node holds it: with --durable-sessions, its copy may.
            if self.durable() {
                let c = self.clone();
                return SessionFetch::new(async move { c.durable_restore(req).await });
            }
            return SessionFetch::none();
        };
        let n = self.next_fetch.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.fetches).insert(n, tx);
        let c = self.clone();
        let wait = self.fetch_wait();
        SessionFetch::new(async move {
            let t = std::time::Instant::now();
            let q = req.to_bytes();
            let n_s = n.to_string();
            let wait_ms = ms(wait).to_string();
            let sent = c
                .route_to(
                    &holder,
                    &[
                        ("k", b"take"),
                        ("id", req.client_id.as_bytes()),
                        ("req", n_s.as_bytes()),
                        ("reply", c.node.as_bytes()),
                        ("wait", wait_ms.as_bytes()),
                        ("q", &q),
                    ],
                )
                .await;
            let got = match sent {
                Ok(()) => tokio::time::timeout(wait, rx)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten(),
                Err(_) => None,
            };
            // An answer after this is installed by `on_session` (held, then reported lost).
            lock(&c.fetches).remove(&n);
            if let Some(e) = &got {
                // The copy becomes this node's before the client can resume.
                c.durable_job(&req.client_id, durable::Job::Imported(Box::new(e.clone())));
            }
            let took = Human(t.elapsed()).to_string();
            match &got {
                Some(e) => {
                    c.stats.sessions_in.fetch_add(1, Ordering::Relaxed);
                    log::line(
                        &req.client_id,
                        "session-taken-over",
                        &log::kv(&[
                            ("from_node", &holder),
                            ("session", &e.session_id().to_string()),
                            ("replay", &e.state().replay.len().to_string()),
                            ("pending", &e.pending().len().to_string()),
                            ("took", &took),
                        ]),
                    );
                }
                None => {
                    let durable = c.durable();
                    if !durable {
                        c.stats.session_fetch_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    log::line(
                        &req.client_id,
                        "session-takeover-failed",
                        &log::kv(&[
                            ("from_node", &holder),
                            ("session", &req.session_id.to_string()),
                            ("took", &took),
                            (
                                "note",
                                if durable {
                                    "restoring it from its durable copy"
                                } else {
                                    "the client is told SESSION_UNKNOWN and reports session-lost"
                                },
                            ),
                        ]),
                    );
                    if durable {
                        return c.durable_restore(req).await;
                    }
                }
            }
            got
        })
    }

    /// `--durable-sessions`: a routed send (`k=send` with `reply`, `req`, `wdl`): into the
    /// client's copy, then to the client, then the answer to the asking node (`k=sent`).
    /// Forwarded when the client's session moved to another node lately.
    fn on_durable_send(self: &Arc<Self>, id: &str, p: Bytes, map: &HashMap<String, Value>) {
        let reply = field::<String>(map, "reply").filter(|r| parse_name(r).is_ok());
        let req = field::<String>(map, "req").unwrap_or_default();
        let wdl = field::<u64>(map, "wdl");
        if self.handle.next_seq(id).is_none() {
            if let Some(node) = self.moved_to(id) {
                let c = self.clone();
                let id = id.to_owned();
                let (reply_s, wdl_s) = (
                    reply.clone().unwrap_or_default(),
                    wdl.map(|w| w.to_string()).unwrap_or_default(),
                );
                let idem = field::<String>(map, "idem").unwrap_or_default();
                tokio::spawn(async move {
                    let r = c
                        .route_to(
                            &node,
                            &[
                                ("k", b"send"),
                                ("id", id.as_bytes()),
                                ("p", &p),
                                ("reply", reply_s.as_bytes()),
                                ("req", req.as_bytes()),
                                ("wdl", wdl_s.as_bytes()),
                                ("idem", idem.as_bytes()),
                            ],
                        )
                        .await;
                    log::line(
                        &id,
                        "routed-send-forwarded",
                        &log::kv(&[("to_node", &node), ("ok", &r.is_ok().to_string())]),
                    );
                });
                return;
            }
        }
        let (tx, rx) = oneshot::channel();
        let idem = field::<String>(map, "idem").filter(|k| valid_idem(k));
        let sent_key = match &idem {
            Some(k) => Some(self.idem_key(id, k)),
            None => reply
                .as_ref()
                .filter(|_| req.parse::<u64>().is_ok())
                .map(|r| self.sent_key(r, &req)),
        };
        self.durable_job(
            id,
            durable::Job::Send {
                msg: p,
                reply: Some(tx),
                deadline: wdl,
                sent_key,
                give_up: None,
            },
        );
        let c = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let r = rx
                .await
                .unwrap_or_else(|_| Err(durable::DurableError::Redis("the worker ended".into())));
            let (status, why, session, seq, held, mirrored) = match &r {
                Ok((d, m)) => (202u16, String::new(), d.session, d.seq, d.held, *m),
                Err(durable::DurableError::Done { session, seq }) => (
                    202u16,
                    String::new(),
                    Some(*session),
                    Some(*seq),
                    false,
                    true,
                ),
                Err(e) => {
                    c.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                    log::line(
                        &id,
                        "routed-send-failed",
                        &log::kv(&[("error", &e.to_string())]),
                    );
                    let status = match e {
                        durable::DurableError::Send(
                            tether::SendError::NotConnected(_)
                            | tether::SendError::Disconnected { .. }
                            | tether::SendError::SlowConsumer(_),
                        ) => 409,
                        durable::DurableError::Send(tether::SendError::Backlogged(_)) => 429,
                        durable::DurableError::Send(tether::SendError::TooLarge { .. }) => 413,
                        _ => 503,
                    };
                    (status, e.to_string(), None, None, false, false)
                }
            };
            let Some(reply) = reply else {
                return;
            };
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            let (status, session, seq) = (status.to_string(), opt(session), opt(seq));
            let flags = format!("{}{}", u8::from(held), u8::from(mirrored));
            let _ = c
                .route_to(
                    &reply,
                    &[
                        ("k", b"sent"),
                        ("id", id.as_bytes()),
                        ("req", req.as_bytes()),
                        ("from", c.node.as_bytes()),
                        ("status", status.as_bytes()),
                        ("why", why.as_bytes()),
                        ("session", session.as_bytes()),
                        ("seq", seq.as_bytes()),
                        ("flags", flags.as_bytes()),
                    ],
                )
                .await;
        });
    }

    /// `k=sent`: the answer to a durable routed send of this node.
    fn on_sent(&self, _id: &str, map: &HashMap<String, Value>) {
        let n = field::<u64>(map, "req").unwrap_or(0);
        let Some(tx) = lock(&self.sends).remove(&n) else {
            return;
        };
        let status = field::<u16>(map, "status").unwrap_or(503);
        let flags = field::<String>(map, "flags").unwrap_or_default();
        let _ = tx.send(SentAnswer {
            node: field::<String>(map, "from").unwrap_or_default(),
            refused: (status != 202)
                .then(|| (status, field::<String>(map, "why").unwrap_or_default())),
            session: field::<u64>(map, "session"),
            seq: field::<u64>(map, "seq"),
            durable: flags.ends_with('1'),
        });
    }

    /// `--durable-sessions`: a send routed through the node that holds `id`, answered only
    /// once that node reports it in the client's copy and queued (`k=sent`); no answer
    /// within the route's deadline and a margin → an error (503: it was not delivered; the
    /// holder drops a send that reaches it past the deadline).
    pub(crate) async fn route_send_durable(
        &self,
        node: &str,
        id: &str,
        msg: &[u8],
        idem: Option<&str>,
    ) -> Result<SentAnswer> {
        let n = self.next_fetch.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.sends).insert(n, tx);
        let beat = self.settings.dead_after / 3;
        // The holder's copy refuses it past `wdl` by Redis's own clock; `wdl` is at most a
        // heartbeat period from now on that clock (a lower bound of it, plus the period):
        // once this node has waited that long, the copy's answer (`sent:…`) is final.
        let wdl = self
            .redis_now_at_least()
            .map(|t| (t + ms(beat)).to_string())
            .unwrap_or_default();
        let n_s = n.to_string();
        let r = self
            .route(
                node,
                id,
                None,
                &[
                    ("k", b"send"),
                    ("id", id.as_bytes()),
                    ("p", msg),
                    ("reply", self.node.as_bytes()),
                    ("req", n_s.as_bytes()),
                    ("wdl", wdl.as_bytes()),
                    ("idem", idem.unwrap_or("").as_bytes()),
                ],
            )
            .await;
        if let Err(e) = r {
            lock(&self.sends).remove(&n);
            return Err(e);
        }
        // Its answer comes a round trip after its copy took it; after the deadline no copy
        // takes it any more.
        let got = tokio::time::timeout(beat + Duration::from_millis(20), rx).await;
        lock(&self.sends).remove(&n);
        if let Ok(Ok(a)) = got {
            return Ok(a);
        }
        // No answer by the deadline: the holder may have put it in the client's copy (so the
        // client gets it, from there if the holder died) and lost its answer, or not. The
        // copy's record says which, for good (asked again while Redis does not answer, for
        // a heartbeat period: a 503 must mean "not delivered").
        let key = match idem {
            Some(k) => self.idem_key(id, k),
            None => self.sent_key(&self.node, &n_s),
        };
        let until = tokio::time::Instant::now() + beat;
        loop {
            let mut con = self.con.clone();
            let r: redis::RedisResult<Option<String>> =
                redis::cmd("GET").arg(&key).query_async(&mut con).await;
            match r {
                Ok(Some(v)) => {
                    let (s, q) = v.split_once(':').unwrap_or_default();
                    return Ok(SentAnswer {
                        node: node.to_owned(),
                        refused: None,
                        session: s.parse().ok(),
                        seq: q.parse().ok(),
                        durable: true,
                    });
                }
                Ok(None) => {
                    return Err(anyhow::anyhow!(
                        "node {node} did not take it within {}",
                        Human(beat)
                    ))
                }
                Err(_) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "node {node} did not answer and Redis cannot say whether it took it ({e})"
                    ))
                }
            }
        }
    }

    /// `--durable-sessions`: a broadcast to this node's clients, each through its copy.
    pub(crate) fn durable_broadcast_local(self: &Arc<Self>, msg: &Bytes) {
        for c in self.handle.clients() {
            if matches!(
                c.state,
                PresenceState::Online | PresenceState::Suspect | PresenceState::Resuming { .. }
            ) {
                self.durable_job(
                    &c.id,
                    durable::Job::Send {
                        msg: msg.clone(),
                        reply: None,
                        deadline: None,
                        sent_key: None,
                        give_up: None,
                    },
                );
            }
        }
    }

    /// `k=take`: another node asks for a session this node holds.
    fn on_take(self: &Arc<Self>, id: &str, map: &HashMap<String, Value>) {
        let (Some(n), Some(reply), Some(q)) = (
            field::<String>(map, "req"),
            field::<String>(map, "reply"),
            field::<Vec<u8>>(map, "q"),
        ) else {
            return;
        };
        let Ok(req) = SessionRequest::from_bytes(Bytes::from(q)) else {
            return;
        };
        if req.client_id != id || parse_name(&reply).is_err() {
            return;
        }
        // Half of the asker's wait for a connection still attached here to end, so the
        // answer reaches it in time.
        let wait = field::<u64>(map, "wait")
            .map(Duration::from_millis)
            .unwrap_or_else(|| self.fetch_wait())
            / 2;
        let c = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let export = c.handle.take_session(&req, wait).await;
            let r = match &export {
                Some(e) => {
                    lock(&c.own).remove(&id);
                    {
                        let mut m = lock(&c.moved);
                        m.retain(|_, (_, at)| at.elapsed() < MOVED_KEPT);
                        m.insert(id.clone(), (reply.clone(), std::time::Instant::now()));
                    }
                    let data = e.to_bytes();
                    c.route_to(
                        &reply,
                        &[
                            ("k", b"session"),
                            ("id", id.as_bytes()),
                            ("req", n.as_bytes()),
                            ("data", &data),
                        ],
                    )
                    .await
                }
                None => {
                    c.route_to(
                        &reply,
                        &[
                            ("k", b"no-session"),
                            ("id", id.as_bytes()),
                            ("req", n.as_bytes()),
                        ],
                    )
                    .await
                }
            };
            match (export, r) {
                (Some(e), Err(err)) => {
                    // Redis did not take the answer: keep the session here (held; the
                    // client may come back, or it is reported lost when the hold ends).
                    lock(&c.moved).remove(&id);
                    let kept = c.handle.import_session(e);
                    log::line(
                        &id,
                        "session-handover-failed",
                        &log::kv(&[
                            ("to_node", &reply),
                            ("error", &err.to_string()),
                            ("kept_here", &kept.is_ok().to_string()),
                        ]),
                    );
                }
                (Some(e), Ok(())) => {
                    c.stats.sessions_out.fetch_add(1, Ordering::Relaxed);
                    log::line(
                        &id,
                        "session-handed-over",
                        &log::kv(&[
                            ("to_node", &reply),
                            ("session", &e.session_id().to_string()),
                            ("bytes", &e.message_bytes().to_string()),
                        ]),
                    );
                }
                (None, _) => {}
            }
        });
    }

    /// `k=session` / `k=no-session`: the answer to a fetch of this node.
    fn on_session(&self, kind: &str, id: &str, map: &HashMap<String, Value>) {
        let n = field::<u64>(map, "req").unwrap_or(0);
        let export = match kind {
            "session" => {
                let Some(data) = field::<Vec<u8>>(map, "data") else {
                    return;
                };
                match SessionExport::from_bytes(Bytes::from(data)) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        self.stats
                            .session_fetch_failed
                            .fetch_add(1, Ordering::Relaxed);
                        log::line(
                            id,
                            "session-handover-unreadable",
                            &log::kv(&[("error", &e.to_string()), ("note", "the session is lost")]),
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let waiter = lock(&self.fetches).remove(&n);
        let late = match waiter {
            Some(tx) => tx.send(export).err().flatten(),
            None => export,
        };
        if let Some(e) = late {
            // The handshake stopped waiting: hold it here (its client may resume again);
            // when the hold ends it is reported lost, never dropped silently.
            let r = self.handle.import_session(e);
            log::line(
                id,
                "session-handover-late",
                &log::kv(&[("held_here", &r.is_ok().to_string())]),
            );
        }
    }

    // --- routing (from the API) --------------------------------------------------------

    /// Whether this node's last Redis call worked.
    pub(crate) fn is_up(&self) -> bool {
        self.stats.redis_up.load(Ordering::Relaxed)
    }

    /// The node that holds `id` when it is another one and the client is not offline there.
    pub(crate) fn remote_owner(&self, id: &str) -> Option<String> {
        let m = lock(&self.mirror);
        let r = m.get(id)?;
        (r.node != self.node && r.state != "offline").then(|| r.node.clone())
    }

    /// Sends `msg` to `id` through the inbox of the node that holds it (`node` in this
    /// node's mirror; Redis's record decides). Returns the node it went to.
    ///
    /// `idem`, the backend's `Idempotency-Key`: a retry with it within a minute is answered
    /// with the first one's node and not routed again (the first may have been delivered
    /// while its answer was lost: a 503 after the response timeout).
    pub(crate) async fn route_send(
        &self,
        node: &str,
        id: &str,
        msg: &[u8],
        idem: Option<&str>,
    ) -> Result<String> {
        let record = idem.map(|k| self.key(&format!("rsend:{id}:{k}")));
        self.route(
            node,
            id,
            record.as_deref(),
            &[("k", b"send"), ("id", id.as_bytes()), ("p", msg)],
        )
        .await
    }

    /// Closes `id`'s connection on `node`.
    pub(crate) async fn route_close(
        &self,
        node: &str,
        id: &str,
        code: CloseCode,
        text: &str,
    ) -> Result<String> {
        let code = code.0.to_string();
        self.route(
            node,
            id,
            None,
            &[
                ("k", b"close"),
                ("id", id.as_bytes()),
                ("code", code.as_bytes()),
                ("text", text.as_bytes()),
            ],
        )
        .await
    }

    /// Adds `fields` to node `node`'s inbox (a session hand-over's request or answer: it
    /// goes to that node whoever holds the client, and is never dropped for being late).
    async fn route_to(&self, node: &str, fields: &[(&str, &[u8])]) -> Result<()> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.inbox_of(node))
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAX)
            .arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        self.send_stream(&cmd).await
    }

    /// Adds `fields` to the inbox of the node that holds `id` by Redis's record (the mirror's
    /// `node` may lag a claim by a moment: a send routed to a node the client just left
    /// would stay there undelivered), within this call's deadline. Returns that node. With
    /// `record` (a key), a call made again with it is answered as the first (see the script).
    async fn route(
        &self,
        node: &str,
        id: &str,
        record: Option<&str>,
        fields: &[(&str, &[u8])],
    ) -> Result<String> {
        let script = scripts::route();
        let mut call = script.prepare_invoke();
        call.arg(&self.prefix)
            .arg(id)
            .arg(STREAM_MAX)
            .arg(self.deadline().map(|d| d.to_string()).unwrap_or_default())
            .arg(record.unwrap_or(""));
        for (k, v) in fields {
            call.arg(*k).arg(*v);
        }
        let mut con = self.con.clone();
        match call.invoke_async::<String>(&mut con).await {
            Ok(to) if to.is_empty() => Err(anyhow::anyhow!(
                "not queued: the client is offline now, or Redis ran this too late"
            )),
            Ok(to) => {
                self.stats.routed_out.fetch_add(1, Ordering::Relaxed);
                Ok(to)
            }
            Err(e) => {
                self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                log::line(
                    id,
                    "cluster-route-failed",
                    &log::kv(&[("node", node), ("error", &e.to_string())]),
                );
                self.set_up(false, Some(&e));
                Err(anyhow::anyhow!("redis: {e}"))
            }
        }
    }

    /// The latest time on Redis's clock (ms) at which a write sent now may still take
    /// effect: after that, this node has given up waiting for the answer (its response
    /// timeout) and told its caller that the write failed. A write sent while Redis was
    /// unreachable sits in the connection's TCP send queue and runs when the path heals,
    /// seconds later — after the caller retried through another node, which delivered the
    /// message already (the lab's cluster test saw it arrive twice). The estimate of Redis's
    /// clock now, plus the response timeout, plus the estimate's own error (the calibrating
    /// heartbeat's round trip). `None` before the first answered heartbeat.
    fn deadline(&self) -> Option<u64> {
        let (at, redis_ms, rtt) = (*lock(&self.redis_clock))?;
        let timeout = self.settings.dead_after / 3;
        Some(redis_ms + ms(at.elapsed() + timeout + rtt))
    }

    /// Adds field `dl`, the [`deadline`](Self::deadline), to a stream entry: its readers drop
    /// it when it was added later than that.
    fn with_deadline(&self, cmd: &mut redis::Cmd) {
        if let Some(dl) = self.deadline() {
            cmd.arg("dl").arg(dl);
        }
    }

    /// Whether stream entry `id` (its first part is Redis's clock when it was added) came
    /// after its sender's deadline (`dl`, see [`with_deadline`](Self::with_deadline)): its
    /// sender reported it failed, so it must not take effect. Logged and counted.
    fn expired(&self, id: &str, map: &HashMap<String, Value>) -> bool {
        let Some(dl) = field::<u64>(map, "dl") else {
            return false;
        };
        let added = id.split('-').next().and_then(|t| t.parse::<u64>().ok());
        match added {
            Some(added) if added > dl => {
                self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                let late = (added - dl).to_string();
                let who = field::<String>(map, "id").unwrap_or_else(|| "-".into());
                log::line(
                    &who,
                    "routed-expired",
                    &log::kv(&[
                        ("late_ms", &late),
                        ("note", "added after its sender gave up on it: dropped"),
                    ]),
                );
                true
            }
            _ => false,
        }
    }

    /// Hands a broadcast to every other node (the caller broadcast locally already).
    pub(crate) async fn publish_broadcast(&self, msg: &[u8]) -> Result<()> {
        let mut r = redis::cmd("XADD");
        r.arg(self.key("broadcast"))
            .arg("MAXLEN")
            .arg("~")
            .arg(BROADCAST_MAX)
            .arg("*")
            .arg("origin")
            .arg(&self.node)
            .arg("p")
            .arg(msg);
        self.with_deadline(&mut r);
        self.send_stream(&r).await
    }

    /// Adds to a stream (one retry when the command never left), counting and reporting the
    /// outcome: a failure marks Redis down.
    async fn send_stream(&self, cmd: &redis::Cmd) -> Result<()> {
        let mut con = self.con.clone();
        match xadd(&mut con, cmd).await {
            Ok(_) => {
                self.stats.routed_out.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.route_failed.fetch_add(1, Ordering::Relaxed);
                log::line(
                    "-",
                    "cluster-route-failed",
                    &log::kv(&[
                        ("error", &e.to_string()),
                        ("retried", &not_sent(&e).to_string()),
                    ]),
                );
                self.set_up(false, Some(&e));
                Err(anyhow::anyhow!("redis: {e}"))
            }
        }
    }

    /// The row of a client held by another node.
    fn remote_row(&self, r: &Record) -> ClientRow {
        let kind = PresenceKind::ALL
            .into_iter()
            .find(|k| k.label() == r.state)
            .unwrap_or(PresenceKind::Offline);
        let since = (r.since > 0.0).then(|| UNIX_EPOCH + Duration::from_millis(r.since as u64));
        let gone = matches!(kind, PresenceKind::Offline | PresenceKind::Resuming);
        ClientRow {
            id: r.id.clone(),
            state: kind,
            state_since: since,
            conn_id: 0,
            remote: r.remote.parse::<SocketAddr>().ok(),
            connected_since: None,
            last_seen_ago: None,
            rtt: None,
            disconnected_at: if gone { since } else { None },
            silent_for: None,
            reason: None,
            reason_label: r.reason.clone(),
            hold_left: None,
            counters: None,
            connects: 0,
            disconnects: 0,
            session: r.session.parse().ok(),
            node: Some(r.node.clone()),
        }
    }
}

/// The cluster's [`tether::SessionSource`]: set before the server starts, bound to the
/// cluster layer once that exists (it needs the server's handle).
#[derive(Default)]
pub(crate) struct ClusterSessions(std::sync::OnceLock<std::sync::Weak<Cluster>>);

impl ClusterSessions {
    /// Binds the source to the cluster layer.
    pub(crate) fn bind(&self, c: &Arc<Cluster>) {
        let _ = self.0.set(Arc::downgrade(c));
    }
}

impl tether::SessionSource for ClusterSessions {
    fn fetch(&self, req: SessionRequest) -> SessionFetch {
        match self.0.get().and_then(std::sync::Weak::upgrade) {
            Some(c) => c.fetch(req),
            None => SessionFetch::none(),
        }
    }
}

/// An XADD, tried a second time when the first could not even be written (the connection
/// manager's connection broke while Redis restarted: it reconnects on that error). Never
/// retried after the command may have reached Redis (a reset or EOF while waiting for the
/// reply), so a routed message is never added twice.
async fn xadd(con: &mut ConnectionManager, cmd: &redis::Cmd) -> redis::RedisResult<String> {
    match cmd.query_async::<String>(con).await {
        Err(e) if not_sent(&e) => cmd.query_async::<String>(con).await,
        r => r,
    }
}

fn not_sent(e: &redis::RedisError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionRefused, NotConnected};
    e.is_connection_refusal()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), BrokenPipe | NotConnected | ConnectionRefused))
        // The connection manager hands out a clone of its stored error, which keeps only the
        // kind and the text: "broken pipe" is redis-rs's own error for a connection it already
        // knows is closed (nothing was written).
        || (e.is_io_error() && e.to_string() == "broken pipe")
}

/// A backend's `Idempotency-Key`: 1 to 128 visible ASCII characters (it becomes part of a
/// Redis key).
pub(crate) fn valid_idem(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

/// The next stream id after `id` (for XTRIM MINID).
fn next_id(id: &str) -> String {
    match id.split_once('-') {
        Some((ms, seq)) => match seq.parse::<u64>() {
            Ok(s) => format!("{ms}-{}", s.saturating_add(1)),
            Err(_) => id.to_owned(),
        },
        None => id.to_owned(),
    }
}

/// Stream id order.
fn id_lt(a: &str, b: &str) -> bool {
    let p = |s: &str| {
        let (m, q) = s.split_once('-').unwrap_or((s, "0"));
        (m.parse::<u64>().unwrap_or(0), q.parse::<u64>().unwrap_or(0))
    };
    p(a) < p(b)
}

fn field<T: redis::FromRedisValue>(map: &HashMap<String, Value>, k: &str) -> Option<T> {
    map.get(k)
        .and_then(|v| redis::from_redis_value(v.clone()).ok())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The status page's and `/api/clients`' view of the whole cluster: this node's clients
/// from its server (with every detail), the others' from the mirror (state, node, since,
/// reason, remote, session). Listing is O(clients of the cluster) per request.
pub(crate) struct ClusterSource {
    /// This node's server.
    pub(crate) local: ServerSource,
    /// The cluster layer.
    pub(crate) cluster: Arc<Cluster>,
}

impl ClusterSource {
    /// The row to show for `id`: the local one unless another node holds the client (the
    /// mirror's record for it is another node's and not offline, or the client is not known
    /// here at all).
    fn pick(&self, local: Option<ClientRow>, remote: Option<&Record>) -> Option<ClientRow> {
        let node = self.cluster.node();
        match (local, remote) {
            (Some(l), Some(r))
                if r.node != node
                    && !matches!(l.state, PresenceKind::Online | PresenceKind::Suspect)
                    && (r.state != "offline" || l.state == PresenceKind::Offline) =>
            {
                Some(self.cluster.remote_row(r))
            }
            (Some(mut l), _) => {
                l.node = Some(node.to_owned());
                Some(l)
            }
            (None, Some(r)) => Some(self.cluster.remote_row(r)),
            (None, None) => None,
        }
    }
}

impl StatusSource for ClusterSource {
    fn clients(&self) -> Vec<ClientRow> {
        let mut local: BTreeMap<String, ClientRow> = self
            .local
            .clients()
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mirror = lock(&self.cluster.mirror);
        let mut out = Vec::with_capacity(local.len().max(mirror.len()));
        for (id, r) in mirror.iter() {
            if let Some(row) = self.pick(local.remove(id), Some(r)) {
                out.push(row);
            }
        }
        drop(mirror);
        out.extend(local.into_values().filter_map(|l| self.pick(Some(l), None)));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn page(&self, q: &ClientQuery) -> Page {
        crate::status::model::page(self.clients(), q)
    }

    fn client(&self, id: &str) -> Option<ClientRow> {
        let remote = lock(&self.cluster.mirror).get(id).cloned();
        self.pick(self.local.client(id), remote.as_ref())
    }

    fn rtt_every(&self) -> Option<Duration> {
        self.local.rtt_every()
    }

    fn note(&self) -> Option<String> {
        let s = &self.cluster.stats;
        Some(if s.redis_up.load(Ordering::Relaxed) {
            format!(
                "cluster: this is node {} · Redis up · {} nodes alive",
                self.cluster.node,
                s.nodes_alive.load(Ordering::Relaxed)
            )
        } else {
            format!(
                "cluster: this is node {} · DEGRADED: Redis does not answer; this node's clients are current, the other nodes' as last known",
                self.cluster.node
            )
        })
    }
}

/// The cluster's metric families.
///
/// ```text
///   tether_cluster_redis_up                    gauge    1 when the last Redis call worked
///   tether_cluster_nodes_alive                 gauge    nodes with a fresh heartbeat
///   tether_cluster_heartbeats_total            counter  heartbeats written by this node
///   tether_cluster_presence_writes_total       counter  client records written by this node
///   tether_cluster_presence_dropped_total      counter  transitions dropped (queue full)
///   tether_cluster_stale_writes_total          counter  writes fenced off by a newer owner
///   tether_cluster_routed_out_total            counter  sends, closes, broadcasts to other nodes
///   tether_cluster_routed_in_total             counter  the same, received from other nodes
///   tether_cluster_route_failed_total          counter  routing that failed (either side)
///   tether_cluster_clients_lost_total          counter  clients this node marked node-lost
///   tether_cluster_replaced_total              counter  local connections closed for a newer one elsewhere
///   tether_cluster_sessions_in_total           counter  sessions taken over from other nodes
///   tether_cluster_sessions_out_total          counter  sessions handed over to other nodes
///   tether_cluster_session_fetch_failed_total  counter  resumes of another node's session that found none
///   tether_cluster_sessions_restored_total     counter  sessions restored from their durable copy
///   tether_cluster_durable_writes_total        counter  script runs writing durable copies
/// ```
#[derive(Debug)]
pub(crate) struct ClusterCollector(pub(crate) Arc<Cluster>);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

impl prometheus_client::collector::Collector for ClusterCollector {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::result::Result<(), std::fmt::Error> {
        let s = &self.0.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut f = Families::new(encoder);
        f.gauge(
            "tether_cluster_redis_up",
            "1 when this node's last Redis call worked.",
            gauge_value(u64::from(s.redis_up.load(Ordering::Relaxed))),
        )?;
        f.gauge(
            "tether_cluster_nodes_alive",
            "Nodes with a heartbeat within the bound, at the last heartbeat.",
            gauge_value(g(&s.nodes_alive)),
        )?;
        for (name, help, a) in [
            (
                "tether_cluster_heartbeats",
                "Heartbeats this node wrote.",
                &s.heartbeats,
            ),
            (
                "tether_cluster_presence_writes",
                "Client records this node wrote.",
                &s.presence_writes,
            ),
            (
                "tether_cluster_presence_dropped",
                "Presence transitions dropped (queue full); repaired by the reconcile.",
                &s.dropped,
            ),
            (
                "tether_cluster_stale_writes",
                "Writes fenced off by a newer owner.",
                &s.stale_writes,
            ),
            (
                "tether_cluster_routed_out",
                "Sends, closes and broadcasts handed to other nodes.",
                &s.routed_out,
            ),
            (
                "tether_cluster_routed_in",
                "Sends, closes and broadcasts received from other nodes.",
                &s.routed_in,
            ),
            (
                "tether_cluster_route_failed",
                "Routing that failed, on either side.",
                &s.route_failed,
            ),
            (
                "tether_cluster_clients_lost",
                "Clients this node marked offline (node-lost).",
                &s.clients_lost,
            ),
            (
                "tether_cluster_replaced",
                "Local connections closed for a newer one on another node.",
                &s.replaced,
            ),
            (
                "tether_cluster_sessions_in",
                "Sessions taken over from another node (a client resumed here).",
                &s.sessions_in,
            ),
            (
                "tether_cluster_sessions_out",
                "Sessions handed over to another node.",
                &s.sessions_out,
            ),
            (
                "tether_cluster_session_fetch_failed",
                "Resumes of another node's session that got no session (SESSION_UNKNOWN).",
                &s.session_fetch_failed,
            ),
            (
                "tether_cluster_sessions_restored",
                "Sessions restored from their durable copy (--durable-sessions).",
                &s.sessions_restored,
            ),
            (
                "tether_cluster_durable_writes",
                "Script runs that wrote durable session copies (appends, trims, snapshots).",
                &s.durable_writes,
            ),
        ] {
            f.counter(name, help, g(a))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_and_cluster_names_are_safe_in_keys() {
        assert_eq!(parse_name("node-a.1_x").unwrap(), "node-a.1_x");
        for bad in ["", "a b", "a:b", "a{b}", "ä", &"x".repeat(65)] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_redis_urls_are_taken() {
        assert!(parse_url("redis://127.0.0.1:6379").is_ok());
        assert!(parse_url("rediss://redis.example:6380/2").is_ok());
        assert!(parse_url("http://127.0.0.1:6379").is_err());
        assert!(parse_url("127.0.0.1:6379").is_err());
    }

    #[test]
    fn stream_ids_order_and_succeed_numerically() {
        assert!(id_lt("9-5", "10-0"));
        assert!(id_lt("10-2", "10-10"));
        assert!(!id_lt("10-10", "10-10"));
        assert_eq!(next_id("1700000000000-9"), "1700000000000-10");
        assert_eq!(next_id("0-0"), "0-1");
    }

    #[test]
    fn records_as_the_scripts_write_them_parse() {
        // cjson writes numbers as doubles (%.14g) and leaves out nil fields.
        let r: Record = serde_json::from_str(
            r#"{"state":"offline","gen":12,"reason":"node-lost","remote":"127.0.0.1:5","id":"p","node":"a","session":"","since":1796013608048}"#,
        )
        .unwrap();
        assert_eq!((r.gen as u64, r.since as u64), (12, 1_796_013_608_048));
        assert_eq!(r.reason.as_deref(), Some("node-lost"));
        let gone: Record = serde_json::from_str(r#"{"id":"p","state":"gone"}"#).unwrap();
        assert_eq!(gone.state, "gone");
    }
}
