//! Issue 15's lab test: three real `tether serve --cluster` nodes behind a load-balancing
//! router, Redis in a namespace of its own, clients streaming numbered messages both ways
//! while the test kills one node (it hangs for 0.5 s — SIGSTOP, messages in flight — then
//! `kill -9`), cuts another off from Redis for longer than
//! `--cluster-dead-after`, then restarts Redis empty.
//!
//! ```text
//!  clients ns: 9 tether Clients ──VIP──▶ router (dnat numgen inc over the nodes that pass
//!              │  client→server: "N" every 100 ms      its health checks) ──▶ n1, n2, n3
//!              │                                                               │ --cluster
//!              └ backend: GET /api/events of every node (client→server arrivals,  ▼
//!                session-lost); POST /api/clients/{id}/messages "N" through the   Redis ns
//!                client's API node, the next node when one refuses (server→client)
//! ```
//!
//! The backend posts each number with an `Idempotency-Key` (the client and the number), as a
//! backend that retries must: with `--durable-sessions` a retry of a send whose node died
//! before answering is answered as the first instead of delivered twice; without it, a retry of
//! a routed send whose `503` hid a route Redis ran (its answer lost in the partition) is
//! answered as the first too (docs/API.md).
//!
//! What must hold, per client and direction:
//! - **client → server**: the backend sees each number at most once, in order (per session:
//!   `payload == offset + seq`, the sessions chained in the client's order); every number the
//!   client sent either arrived or lies in the `unacked` range of a `SessionLost` the client
//!   reported for that session. Nothing else may be missing.
//! - **server → client**: the client receives each accepted (HTTP 202) number at most once,
//!   in order; a number that never arrived must be explained by a reported session loss: the
//!   client's `SessionLost` (its session ended: what the server sent in it after the client's
//!   last receipt may be missing), or a node's `session-lost` event naming its `(session,
//!   seq)` — reported after the number was accepted, with the client's session changing
//!   across the gap. A gap inside one session, or a loss nobody reported, is a silent loss.
//! - Every client ends connected, online on exactly one live node in every live node's view.
//!
//! Without `--durable-sessions` the killed node's clients report `SessionLost` (their sessions
//! died with it). With it (`cluster_faults_durable_sessions_exactly_once`, skipped until `tether
//! serve` has the flag) nothing may be lost at all: exactly once, in order, both ways.
//!
//! `TETHER_LAB_CLUSTER_LOGS=1` prints every node's log at the end.
//!
//! Needs root, the lab's tools, `redis-server` and the `tether` binary (`$TETHER_BIN`, else
//! `target/debug/tether` next to this test: `cargo build -p tether-cli` first; scripts/test
//! builds the workspace). Without them each test prints `SKIP: <test>: <reason>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tether::{BackoffConfig, Client, ClientConfig, ClientEvent};
use tether_lab::cluster::{ClusterTopology, LabProcess};

const NODES: usize = 3;
const CLIENTS: usize = 9;
const HTTP_PORT: u16 = 7301;
const REDIS_PORT: u16 = 6379;
/// `--cluster-dead-after`: nodes heartbeat every second.
const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Each client sends one number every `RATE`, and the backend posts one to it as often.
const RATE: Duration = Duration::from_millis(100);
/// The killed node hangs this long before it dies.
const FREEZE: Duration = Duration::from_millis(500);
/// Messages flow this long between the faults.
const STEADY: Duration = Duration::from_secs(2);
/// Waits for a condition (reconnects, presence settling) give up after this long.
const WITHIN: Duration = Duration::from_secs(30);

/// The two tests would share the two cores; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

// --- what the test needs, or why it skips ------------------------------------------------------

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `$TETHER_BIN`, else `tether` in the target directory of this test executable.
fn tether_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("tether"), dir.parent()?.join("tether")]
        .into_iter()
        .find(|p| p.is_file())
}

struct Tools {
    tether: PathBuf,
    redis: PathBuf,
    durable: bool,
}

fn tools() -> Result<Tools, String> {
    if let Some(why) = tether_lab::skip_reason() {
        return Err(why);
    }
    let redis = find_on_path("redis-server").ok_or("redis-server not installed")?;
    let tether = tether_bin()
        .ok_or("the tether binary is not built (cargo build -p tether-cli, or set TETHER_BIN)")?;
    let help = std::process::Command::new(&tether)
        .args(["serve", "--help"])
        .output()
        .map_err(|e| format!("{}: {e}", tether.display()))?;
    let durable = String::from_utf8_lossy(&help.stdout).contains("--durable-sessions");
    Ok(Tools {
        tether,
        redis,
        durable,
    })
}

// --- what everyone records ---------------------------------------------------------------------

/// One number the backend got accepted (HTTP 202) for a client.
#[derive(Debug, Clone)]
struct Posted {
    n: u64,
    at: Instant,
    via: usize,
    status: String,
    session: Option<u64>,
    seq: Option<u64>,
    /// The refusals before it was accepted: (via, what).
    refusals: Vec<(usize, String)>,
}

/// A session-lost, reported by the client or by a node.
#[derive(Debug, Clone)]
struct Lost {
    at: Instant,
    session: u64,
    unacked: Option<(u64, u64)>,
    unsent: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Record {
    /// The client's sessions, in the order it had them.
    sessions: Vec<u64>,
    /// (when, session, resumed)
    connects: Vec<(Instant, u64, bool)>,
    disconnects: Vec<(Instant, String)>,
    connected: bool,
    gave_up: Option<String>,
    /// Client-side `SessionLost`s.
    lost: Vec<Lost>,
    /// server → client: (number, session it arrived in, when).
    received: Vec<(u64, u64, Instant)>,
    /// client → server: the last number handed to `send`.
    sent: u64,
    /// client → server as the backend saw it: (session, seq, number, node, replayed). A
    /// `replayed` event was republished from a durable copy by the node that restored the
    /// session (`--durable-sessions`): the backend de-duplicates it by `(client, session,
    /// seq)` — only against an event with the same number (docs/CLUSTER.md).
    arrived: Vec<(u64, u64, u64, usize, bool)>,
    /// Nodes' `session-lost` events for this client.
    node_lost: Vec<Lost>,
    /// server → client numbers accepted, in order.
    posted: Vec<Posted>,
    /// Posts refused (non-202 or no answer), by status ("503", "409", "conn", …).
    refused: BTreeMap<String, u64>,
    /// Longest time one number waited to be accepted.
    longest_post_wait: Duration,
}

#[derive(Default)]
struct World {
    clients: Vec<Record>,
    /// Event lines per node that did not parse (diagnosis).
    odd_events: u64,
}

type Shared = Arc<Mutex<World>>;

// --- HTTP ------------------------------------------------------------------------------------

type Http = HttpClient<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
struct Api {
    http: Http,
    token: Arc<str>,
    nodes: Arc<[SocketAddr]>,
}

impl Api {
    async fn call(
        &self,
        node: usize,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Value), String> {
        self.call_keyed(node, method, path, body, None).await
    }

    /// [`call`](Self::call) with an `Idempotency-Key` (a retry of a send whose answer was
    /// lost with its node is answered as the first, not sent twice: docs/API.md).
    async fn call_keyed(
        &self,
        node: usize,
        method: &str,
        path: &str,
        body: Bytes,
        key: Option<String>,
    ) -> Result<(u16, Value), String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.nodes[node]))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "text/plain");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.http.request(req))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|_| "conn".to_string())?;
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|_| "conn".to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Every client in node `node`'s view: id → (state, node id, reason).
    async fn presence(&self, node: usize) -> Result<View, String> {
        let (status, v) = self
            .call(
                node,
                "GET",
                "/api/clients?state=all&limit=1000",
                Bytes::new(),
            )
            .await?;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        let mut out = BTreeMap::new();
        for c in v["clients"].as_array().cloned().unwrap_or_default() {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            out.insert(s("id"), (s("state"), s("node"), s("reason")));
        }
        Ok(out)
    }
}

/// One node's `/api/clients`: id → (state, node id, reason).
type View = BTreeMap<String, (String, String, String)>;

fn client_id(i: usize) -> String {
    format!("lc-{i}")
}

fn index_of(id: &str) -> Option<usize> {
    id.strip_prefix("lc-")?
        .parse()
        .ok()
        .filter(|&i| i < CLIENTS)
}

fn range(v: &Value) -> Option<(u64, u64)> {
    Some((v["first"].as_u64()?, v["last"].as_u64()?))
}

/// Reads node `node`'s event stream (NDJSON) until `stop`, from its first event, reconnecting
/// with `Last-Event-ID` after a break: client → server arrivals and `session-lost` events.
async fn read_events(
    api: Api,
    node: usize,
    world: Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<u64> = None;
    while !*stop.borrow() {
        let path = match last {
            Some(id) => format!("/api/events?format=ndjson&last_event_id={id}"),
            None => "/api/events?format=ndjson".to_string(),
        };
        let req = hyper::Request::builder()
            .uri(format!("http://{}{path}", api.nodes[node]))
            .header("authorization", format!("Bearer {}", api.token))
            .body(Full::new(Bytes::new()));
        let Ok(req) = req else { return };
        let resp = tokio::time::timeout(Duration::from_secs(3), api.http.request(req)).await;
        let mut body = match resp {
            Ok(Ok(r)) if r.status().is_success() => r.into_body(),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut buf = Vec::new();
        loop {
            let mut stop2 = stop.clone();
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = stop2.changed() => return,
            };
            let Some(Ok(frame)) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue; // keep-alive blank lines
                };
                if let Some(id) = ev["id"].as_u64() {
                    last = Some(id);
                }
                record_event(&world, node, &ev);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn record_event(world: &Shared, node: usize, ev: &Value) {
    let now = Instant::now();
    let Some(i) = ev["client_id"].as_str().and_then(index_of) else {
        return;
    };
    let mut w = lock(world);
    match ev["type"].as_str() {
        Some("message") => {
            let parsed = (|| {
                let n = ev["text"].as_str()?.parse::<u64>().ok()?;
                Some((ev["session"].as_u64()?, ev["seq"].as_u64()?, n))
            })();
            match parsed {
                Some((s, q, n)) => {
                    let replayed = ev["replayed"] == true;
                    w.clients[i].arrived.push((s, q, n, node, replayed))
                }
                None => w.odd_events += 1,
            }
        }
        Some("session-lost") => {
            let lost = Lost {
                at: now,
                session: ev["session"].as_u64().unwrap_or(0),
                unacked: range(&ev["unacked"]),
                unsent: range(&ev["unsent"]),
            };
            w.clients[i].node_lost.push(lost);
        }
        _ => {}
    }
}

/// Posts numbers 1, 2, … to client `i`, one every `RATE`, the next only once the previous was
/// accepted: through its API node, retried there after a refusal; the next node only when
/// that one does not answer (a backend that wants order keeps its sending node).
async fn post_numbers(api: Api, i: usize, world: Shared, stop: tokio::sync::watch::Receiver<bool>) {
    let id = client_id(i);
    let mut via = i % api.nodes.len();
    let mut n = 1u64;
    let mut since = Instant::now();
    let mut refusals = Vec::new();
    while !*stop.borrow() {
        // The number is the message's key: a send retried after its node died without
        // answering is not delivered twice (on any node with --durable-sessions; without it when
        // routed: a 503 after Redis's timeout can hide a route Redis ran, docs/CLUSTER.md).
        let r = api
            .call_keyed(
                via,
                "POST",
                &format!("/api/clients/{id}/messages"),
                Bytes::from(n.to_string()),
                Some(format!("{id}-{n}")),
            )
            .await;
        match r {
            Ok((202, v)) => {
                let p = Posted {
                    n,
                    at: Instant::now(),
                    via,
                    status: v["status"].as_str().unwrap_or("").to_string(),
                    session: v["session"].as_u64(),
                    seq: v["seq"].as_u64(),
                    refusals: std::mem::take(&mut refusals),
                };
                {
                    let mut w = lock(&world);
                    let c = &mut w.clients[i];
                    c.longest_post_wait = c.longest_post_wait.max(p.at - since);
                    c.posted.push(p);
                }
                n += 1;
                tokio::time::sleep(RATE).await;
                since = Instant::now();
            }
            other => {
                // Order holds per sending node (docs/CLUSTER.md): a node that answers keeps
                // the client's numbers, whatever it answers; only one that does not answer
                // at all (dead) is left for the next.
                let why = match other {
                    Ok((s, _)) => s.to_string(),
                    Err(e) => {
                        via = (via + 1) % api.nodes.len();
                        e
                    }
                };
                refusals.push((via, why.clone()));
                *lock(&world).clients[i].refused.entry(why).or_default() += 1;
                tokio::time::sleep(RATE).await;
            }
        }
    }
}

/// Client `i`: sends 1, 2, … every `RATE` until `stop_send`, records every event until
/// `stop`.
async fn run_client(
    vip: SocketAddr,
    i: usize,
    world: Shared,
    stop_send: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut cfg = ClientConfig::new(vip, client_id(i));
    cfg.backoff = BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(500),
        max_attempts: None,
    };
    cfg.seed = Some(i as u64 + 1);
    let mut client = Client::start(cfg);
    let tx = client.sender();
    let w = world.clone();
    let sender = tokio::spawn(async move {
        let mut n = 1u64;
        while !*stop_send.borrow() {
            if tx.send(Bytes::from(n.to_string())).await.is_err() {
                return;
            }
            lock(&w).clients[i].sent = n;
            n += 1;
            tokio::time::sleep(RATE).await;
        }
    });
    // The last event was a Connected with a fresh session while an older one existed: a
    // SessionLost right behind it is the older one's (a resume answered with a new grant).
    let mut fresh_after: Option<u64> = None;
    loop {
        let ev = tokio::select! {
            ev = client.next_event() => ev,
            _ = stop.changed() => break,
        };
        let Some(ev) = ev else { break };
        let now = Instant::now();
        let mut w = lock(&world);
        let c = &mut w.clients[i];
        let mut fresh = None;
        match ev {
            ClientEvent::Connected { welcome } => {
                c.connected = true;
                if let Some(g) = welcome.session {
                    c.connects.push((now, g.session_id, g.resumed));
                    if c.sessions.last() != Some(&g.session_id) {
                        fresh = c.sessions.last().copied();
                        c.sessions.push(g.session_id);
                    }
                }
            }
            ClientEvent::Disconnected { disconnect } => {
                c.connected = false;
                c.disconnects.push((now, disconnect.reason.to_string()));
            }
            ClientEvent::SessionLost { unacked } => {
                let session = match fresh_after {
                    Some(old) => old,
                    None => c.sessions.last().copied().unwrap_or(0),
                };
                c.lost.push(Lost {
                    at: now,
                    session,
                    unacked: unacked.map(|r| (*r.start(), *r.end())),
                    unsent: None,
                });
            }
            ClientEvent::Message(m) => {
                let session = c.sessions.last().copied().unwrap_or(0);
                let n = std::str::from_utf8(&m)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                c.received.push((n, session, now));
            }
            ClientEvent::GaveUp { reason, .. } => {
                c.connected = false;
                c.gave_up = Some(reason.to_string());
            }
            _ => {}
        }
        fresh_after = fresh;
    }
    sender.abort();
}

// --- the backend: a tokio runtime in the clients namespace ------------------------------------

struct Backend {
    handle: tokio::runtime::Handle,
    api: Api,
    world: Shared,
    stop_send: tokio::sync::watch::Sender<bool>,
    stop_post: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Sender<bool>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(topo: &ClusterTopology, token: &str) -> Backend {
        let (htx, hrx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = tether_lab::spawn_in_netns(topo.client_netns(), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            let _ = htx.send(rt.handle().clone());
            let _ = rt.block_on(done_rx);
        });
        let handle = hrx.recv().expect("backend runtime");
        let nodes: Vec<SocketAddr> = (0..topo.nodes())
            .map(|i| SocketAddr::new(topo.node_addr(i).into(), HTTP_PORT))
            .collect();
        let http = {
            let _g = handle.enter();
            HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build_http::<Full<Bytes>>()
        };
        let api = Api {
            http,
            token: token.into(),
            nodes: nodes.into(),
        };
        let world = Arc::new(Mutex::new(World {
            clients: (0..CLIENTS).map(|_| Record::default()).collect(),
            odd_events: 0,
        }));
        Backend {
            handle,
            api,
            world,
            stop_send: tokio::sync::watch::channel(false).0,
            stop_post: tokio::sync::watch::channel(false).0,
            stop: tokio::sync::watch::channel(false).0,
            done: Some(done_tx),
            thread: Some(thread),
        }
    }

    /// Runs `fut` on the backend's runtime (its sockets are in the clients namespace) and
    /// waits for its result.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the backend answered")
    }

    fn presence(&self, node: usize) -> Result<View, String> {
        let api = self.api.clone();
        self.run(async move { api.presence(node).await })
    }

    fn start_traffic(&self, vip: SocketAddr) {
        for node in 0..self.api.nodes.len() {
            let (api, w, st) = (self.api.clone(), self.world.clone(), self.stop.subscribe());
            self.handle.spawn(read_events(api, node, w, st));
        }
        for i in 0..CLIENTS {
            let (w, ss, st) = (
                self.world.clone(),
                self.stop_send.subscribe(),
                self.stop.subscribe(),
            );
            self.handle.spawn(run_client(vip, i, w, ss, st));
            let (api, w, st) = (
                self.api.clone(),
                self.world.clone(),
                self.stop_post.subscribe(),
            );
            self.handle.spawn(post_numbers(api, i, w, st));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.stop.send_replace(true);
        if let Some(d) = self.done.take() {
            let _ = d.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// --- the run ---------------------------------------------------------------------------------

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Cluster {
    // Field order is drop order: processes before the namespaces they run in.
    nodes: Vec<LabProcess>,
    redis: Option<LabProcess>,
    topo: Arc<ClusterTopology>,
    tools: Tools,
    durable: bool,
    _token: TempFile,
}

impl Cluster {
    fn start(tools: Tools, durable: bool) -> (Cluster, String) {
        let topo = Arc::new(ClusterTopology::create(NODES).expect("cluster topology"));
        let token = format!(
            "labcluster-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let path = std::env::temp_dir().join(format!("{token}.token"));
        std::fs::write(&path, &token).expect("token file");
        let mut c = Cluster {
            nodes: Vec::new(),
            redis: None,
            topo,
            tools,
            durable,
            _token: TempFile(path),
        };
        c.start_redis();
        for i in 0..NODES {
            let n = c.start_node(i);
            c.nodes.push(n);
        }
        (c, token)
    }

    fn start_redis(&mut self) {
        let port = REDIS_PORT.to_string();
        let args = [
            "--port",
            &port,
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        let mut r = self
            .topo
            .spawn(self.topo.redis_netns(), "redis", &self.tools.redis, &args)
            .expect("redis-server");
        assert!(
            r.wait_for("Ready to accept connections", Duration::from_secs(10)),
            "redis-server did not start: {:?}",
            r.log()
        );
        self.redis = Some(r);
    }

    fn node_id(i: usize) -> String {
        format!("n{}", i + 1)
    }

    fn start_node(&self, i: usize) -> LabProcess {
        let redis = format!("redis://{}:{REDIS_PORT}", self.topo.redis_addr());
        let token_file = self._token.0.to_string_lossy().into_owned();
        let dead_after = format!("{}ms", DEAD_AFTER.as_millis());
        let listen = format!("0.0.0.0:{}", tether_lab::topology::PORT);
        let http = format!("0.0.0.0:{HTTP_PORT}");
        let id = Self::node_id(i);
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--http",
            &http,
            "--insecure",
            "--http-token-file",
            &token_file,
            "--detect-within",
            "3s",
            "--cluster",
            &redis,
            "--node-id",
            &id,
            "--cluster-dead-after",
            &dead_after,
        ];
        if self.durable {
            args.push("--durable-sessions");
        }
        let mut p = self
            .topo
            .spawn(self.topo.node_netns(i), &id, &self.tools.tether, &args)
            .expect("tether serve");
        assert!(
            p.wait_for("status-page", Duration::from_secs(20)),
            "node {id} did not start: {:?}",
            p.log()
        );
        p
    }

    fn dump_logs(&self) {
        for n in &self.nodes {
            for l in n.log() {
                say(&format!("[{}] {l}", n.name()));
            }
        }
    }
}

/// Waits for `cond` at most `within`, checking every 100 ms; the time it took, or `None`.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if cond() {
            return Some(t.elapsed());
        }
        if t.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every live node's view, or why not.
fn views(b: &Backend, live: &[usize]) -> Result<Vec<(usize, View)>, String> {
    live.iter()
        .map(|&n| {
            b.presence(n)
                .map(|v| (n, v))
                .map_err(|e| format!("n{}: {e}", n + 1))
        })
        .collect()
}

/// Every client online on one live node, the same in every live node's view, and that node
/// holding it itself; `Ok(client → node)`, else what is not so.
fn settled(b: &Backend, live: &[usize]) -> Result<BTreeMap<String, usize>, String> {
    let views = views(b, live)?;
    let mut holder: BTreeMap<String, usize> = BTreeMap::new();
    // Local truth: each node's own online clients (rows naming the node itself).
    for (n, v) in &views {
        let me = Cluster::node_id(*n);
        for (id, (state, node, _)) in v {
            if state == "online" && *node == me {
                if let Some(other) = holder.insert(id.clone(), *n) {
                    return Err(format!("{id} online on n{} and n{}", other + 1, n + 1));
                }
            }
        }
    }
    for i in 0..CLIENTS {
        let id = client_id(i);
        let Some(&h) = holder.get(&id) else {
            return Err(format!("{id} is online on no live node"));
        };
        for (n, v) in &views {
            match v.get(&id) {
                Some((state, node, _)) if state == "online" && *node == Cluster::node_id(h) => {}
                other => {
                    return Err(format!(
                        "n{} sees {id} as {other:?}, it is online on n{}",
                        n + 1,
                        h + 1
                    ))
                }
            }
        }
    }
    Ok(holder)
}

/// Waits (at most `WITHIN`) until [`settled`]; how long it took. Panics with the nodes' logs
/// when it does not.
fn settle(cluster: &Cluster, b: &Backend, live: &[usize], when: &str) -> Duration {
    match wait_until(WITHIN, || settled(b, live).is_ok()) {
        Some(d) => d,
        None => {
            cluster.dump_logs();
            panic!("presence did not settle {when}: {:?}", settled(b, live));
        }
    }
}

/// The node among `among` that holds the most clients (the lowest on a tie), and its clients.
fn busiest(holders: &BTreeMap<String, usize>, among: &[usize]) -> (usize, Vec<usize>) {
    let on = |n: usize| -> Vec<usize> {
        holders
            .iter()
            .filter(|&(_, &h)| h == n)
            .filter_map(|(id, _)| index_of(id))
            .collect()
    };
    let n = among
        .iter()
        .copied()
        .max_by_key(|&n| (on(n).len(), std::cmp::Reverse(n)))
        .expect("a node");
    (n, on(n))
}

fn all_connected(w: &Shared) -> bool {
    lock(w).clients.iter().all(|c| c.connected)
}

/// One fault's figures.
#[derive(Debug, Default)]
struct Phase {
    name: &'static str,
    at: Option<Instant>,
    notes: Vec<String>,
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

struct Outcome {
    phases: Vec<Phase>,
    world: Shared,
    holders_end: BTreeMap<String, usize>,
    killed: usize,
    partitioned: usize,
    on_killed: Vec<usize>,
    on_partitioned: Vec<usize>,
    /// From cutting the node off to the other node's view showing its clients not online.
    reaped: Duration,
    /// When the clients started.
    start: Instant,
    /// Every node's log lines (printed when a check fails).
    logs: Vec<String>,
    end: Instant,
}

fn run_scenario(tools: Tools, durable: bool) -> Outcome {
    let (mut cluster, token) = Cluster::start(tools, durable);
    let topo = cluster.topo.clone();
    let lb = topo.health_checks(HTTP_PORT, Duration::from_millis(250));
    let backend = Backend::start(&topo, &token);
    let all: Vec<usize> = (0..NODES).collect();
    // The API answers on every node before the clients start.
    for n in 0..NODES {
        assert!(
            wait_until(WITHIN, || backend.presence(n).is_ok()).is_some(),
            "n{} API did not answer",
            n + 1
        );
    }
    backend.start_traffic(topo.vip());
    let world = backend.world.clone();
    let t0 = Instant::now();
    assert!(
        wait_until(WITHIN, || all_connected(&world)).is_some(),
        "not every client connected"
    );
    let mut holders = BTreeMap::new();
    if wait_until(WITHIN, || match settled(&backend, &all) {
        Ok(h) => {
            holders = h;
            true
        }
        Err(_) => false,
    })
    .is_none()
    {
        cluster.dump_logs();
        panic!("presence never settled: {:?}", settled(&backend, &all));
    }
    say(&format!(
        "lab cluster: {CLIENTS} clients connected and online in {} ({})",
        ms(t0.elapsed()),
        (0..NODES)
            .map(|n| format!(
                "n{}: {}",
                n + 1,
                holders.values().filter(|&&h| h == n).count()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    std::thread::sleep(STEADY);
    let mut phases = Vec::new();

    // 1. kill -9 the node with the most clients.
    let (killed, on_killed) = busiest(&holders, &all);
    // It hangs first (SIGSTOP) for `FREEZE`, so that messages are in flight when it dies —
    // the clients' sent but unacknowledged ones must come back as reported losses — then
    // `kill -9`.
    let t_freeze = Instant::now();
    cluster.nodes[killed].freeze();
    std::thread::sleep(FREEZE);
    let t_kill = Instant::now();
    cluster.nodes[killed].kill();
    let live: Vec<usize> = all.iter().copied().filter(|&n| n != killed).collect();
    let mut p = Phase {
        name: "kill -9",
        at: Some(t_kill),
        ..Default::default()
    };
    let reconnected = wait_until(WITHIN, || {
        let w = lock(&world);
        on_killed.iter().all(|&i| {
            let c = &w.clients[i];
            c.connected && c.connects.last().is_some_and(|(t, _, _)| *t > t_kill)
        })
    });
    let Some(_) = reconnected else {
        cluster.dump_logs();
        panic!("the killed node's clients did not all reconnect within {WITHIN:?}");
    };
    settle(&cluster, &backend, &live, "after the kill");
    {
        let w = lock(&world);
        let times: Vec<Duration> = on_killed
            .iter()
            .filter_map(|&i| {
                w.clients[i]
                    .connects
                    .iter()
                    .find(|(t, _, _)| *t > t_kill)
                    .map(|(t, _, _)| *t - t_kill)
            })
            .collect();
        // What a user feels: back on a live node within the take wait (dead-after / 3) plus
        // the reconnect backoff (at most 500 ms) and the balancer's health check (250 ms),
        // with room for a busy machine; measured 1.03-1.25 s.
        let slowest = times.iter().max().copied().unwrap_or_default();
        assert!(
            times.len() == on_killed.len() && slowest <= Duration::from_secs(5),
            "reconnect after the kill: {times:?} for {} clients",
            on_killed.len()
        );
        // A hung node may fail its health check before it is killed.
        let lb_out = lb
            .changes()
            .iter()
            .find(|(t, b)| *t > t_freeze && !b.contains(&killed))
            .map(|&(t, _)| match t.checked_duration_since(t_kill) {
                Some(d) => format!("{} ms", d.as_millis()),
                None => format!("-{} ms (while it hung)", (t_kill - t).as_millis()),
            });
        p.notes.push(format!(
            "n{} killed with {} clients; they reconnected to a live node after median {}, max {}; the balancer dropped n{} after {}; presence settled (every client online on one live node in every view) {} after the kill",
            killed + 1,
            on_killed.len(),
            ms(median(times.clone())),
            ms(times.iter().max().copied().unwrap_or_default()),
            killed + 1,
            lb_out.unwrap_or_else(|| "never".into()),
            ms(t_kill.elapsed()),
        ));
    }
    phases.push(p);
    std::thread::sleep(STEADY);

    // 2. cut the live node with the most clients off from Redis past the dead bound.
    holders = settled(&backend, &live).unwrap_or_default();
    let (partitioned, on_partitioned) = busiest(&holders, &live);
    let other = live
        .iter()
        .copied()
        .find(|&n| n != partitioned)
        .expect("another live node");
    let t_part = Instant::now();
    topo.partition_from_redis(partitioned).expect("partition");
    let mut p = Phase {
        name: "partition from Redis",
        at: Some(t_part),
        ..Default::default()
    };
    // The other node reaps it: its clients are no longer online on it in that view.
    let reaped = wait_until(WITHIN, || {
        backend.presence(other).is_ok_and(|v| {
            on_partitioned.iter().all(|&i| {
                v.get(&client_id(i)).is_some_and(|(state, node, _)| {
                    !(state == "online" && *node == Cluster::node_id(partitioned))
                })
            })
        })
    });
    let reasons: BTreeSet<String> = backend
        .presence(other)
        .map(|v| {
            on_partitioned
                .iter()
                .filter_map(|&i| v.get(&client_id(i)).map(|(s, _, r)| format!("{s}/{r}")))
                .collect()
        })
        .unwrap_or_default();
    let Some(reaped) = reaped else {
        cluster.dump_logs();
        panic!("n{} was never reaped", partitioned + 1);
    };
    std::thread::sleep(Duration::from_secs(1) + heal_jitter());
    let t_heal = Instant::now();
    topo.heal().expect("heal");
    let reclaimed = settle(&cluster, &backend, &live, "after the partition");
    let drops: usize = {
        let w = lock(&world);
        on_partitioned
            .iter()
            .map(|&i| {
                w.clients[i]
                    .disconnects
                    .iter()
                    .filter(|(t, _)| *t > t_part)
                    .count()
            })
            .sum()
    };
    p.notes.push(format!(
        "n{} cut off from Redis with {} clients: n{} showed them {} after {} (bound {}); healed after {}; re-claimed and settled {} after the heal; those clients' disconnects meanwhile: {drops}",
        partitioned + 1,
        on_partitioned.len(),
        other + 1,
        reasons.into_iter().collect::<Vec<_>>().join(", "),
        ms(reaped),
        ms(DEAD_AFTER + DEAD_AFTER / 3),
        ms(t_heal - t_part),
        ms(reclaimed),
    ));
    phases.push(p);
    std::thread::sleep(STEADY);

    // 3. Redis restarts, empty.
    let t_redis = Instant::now();
    if let Some(mut r) = cluster.redis.take() {
        r.kill();
    }
    std::thread::sleep(Duration::from_secs(1));
    cluster.start_redis();
    let t_up = Instant::now();
    let mut p = Phase {
        name: "Redis restart",
        at: Some(t_redis),
        ..Default::default()
    };
    let resettled = settle(&cluster, &backend, &live, "after the Redis restart");
    let drops: usize = {
        let w = lock(&world);
        w.clients
            .iter()
            .map(|c| c.disconnects.iter().filter(|(t, _)| *t > t_redis).count())
            .sum()
    };
    p.notes.push(format!(
        "Redis down {} then back empty; every client online on one live node again {} after it came back; client disconnects meanwhile: {drops}",
        ms(t_up - t_redis),
        ms(resettled),
    ));
    phases.push(p);
    std::thread::sleep(STEADY);

    // Stop sending, let everything arrive, then stop.
    let _ = backend.stop_send.send_replace(true);
    let _ = backend.stop_post.send_replace(true);
    let drained = wait_until(WITHIN, || {
        let w = lock(&world);
        w.clients.iter().all(|c| {
            let up = c.arrived.iter().any(|a| a.2 == c.sent);
            let down = c
                .posted
                .last()
                .is_none_or(|p| c.received.iter().any(|r| r.0 == p.n));
            up && down
        })
    });
    let end = Instant::now();
    if drained.is_none() {
        say("lab cluster: not everything arrived after the senders stopped (see the checks)");
    }
    let holders_end = settled(&backend, &live).unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("presence at the end: {e}")
    });
    let _ = backend.stop.send_replace(true);
    std::thread::sleep(Duration::from_millis(200));
    if std::env::var_os("TETHER_LAB_CLUSTER_LOGS").is_some() {
        cluster.dump_logs();
    }
    let logs: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.log().into_iter().map(|l| format!("[{}] {l}", n.name())))
        .collect();
    drop(backend);
    drop(lb);
    Outcome {
        phases,
        world,
        holders_end,
        killed,
        partitioned,
        on_killed,
        on_partitioned,
        reaped,
        start: t0,
        logs,
        end,
    }
}

// --- the checks --------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Tally {
    delivered: u64,
    lost_reported: u64,
    duplicates: u64,
    /// Routed sends accepted in the second before Redis was killed that never arrived: Redis
    /// restarting empty loses what its streams held and nothing can report it (a known
    /// limitation, docs/CLUSTER.md); counted, not failed.
    lost_with_redis: u64,
    /// Silent losses and order violations, described.
    errors: Vec<String>,
    /// Reported losses: when each was reported.
    lost_at: Vec<Instant>,
}

/// Client → server for one client (see the file's doc).
fn check_up(i: usize, c: &Record, t: &mut Tally) {
    let mut by_session: HashMap<u64, BTreeMap<u64, u64>> = HashMap::new();
    // (session, seq) → (number, a live event seen): a replayed event with the same number
    // as another event of its key is the backend's to drop; two live events of one key, or
    // two numbers for one key, are duplicates.
    let mut live: HashMap<(u64, u64), bool> = HashMap::new();
    for &(s, q, n, node, replayed) in &c.arrived {
        let had_live = live.get(&(s, q)).copied();
        let prev = by_session.entry(s).or_default().insert(q, n);
        live.insert((s, q), had_live.unwrap_or(false) || !replayed);
        let same = prev == Some(n);
        if prev.is_some() && same && (replayed || had_live == Some(false)) {
            continue;
        }
        if let Some(prev) = prev {
            t.duplicates += 1;
            t.errors.push(format!(
                "lc-{i} up: session {s} seq {q} arrived twice ({prev}, then {n} on n{})",
                node + 1
            ));
        }
    }
    let known: BTreeSet<u64> = c.sessions.iter().copied().collect();
    for s in by_session.keys() {
        if !known.contains(s) {
            t.errors.push(format!(
                "lc-{i} up: arrivals in session {s} the client never had"
            ));
        }
    }
    let mut seen_numbers = BTreeSet::new();
    let mut offset = 0u64;
    for &s in &c.sessions {
        let got = by_session.remove(&s).unwrap_or_default();
        for (&q, &n) in &got {
            if n != offset + q {
                t.errors.push(format!(
                    "lc-{i} up: session {s} seq {q} carried {n}, expected {} (reordered or duplicated)",
                    offset + q
                ));
            }
            if !seen_numbers.insert(n) {
                t.duplicates += 1;
                t.errors.push(format!("lc-{i} up: {n} arrived twice"));
            }
        }
        let top = got.keys().next_back().copied().unwrap_or(0);
        let lost = c.lost.iter().find(|l| l.session == s);
        let (acked_to, last) = match lost {
            Some(
                l @ Lost {
                    unacked: Some((a, b)),
                    ..
                },
            ) => {
                let missing: Vec<u64> = (*a..=*b).filter(|q| !got.contains_key(q)).collect();
                t.lost_reported += missing.len() as u64;
                t.lost_at.extend(missing.iter().map(|_| l.at));
                if top > *b {
                    t.errors.push(format!(
                        "lc-{i} up: session {s} lost with unacked {a}..={b} but seq {top} arrived"
                    ));
                }
                (a - 1, *b)
            }
            _ => (top, top),
        };
        for q in 1..=acked_to {
            if !got.contains_key(&q) {
                t.errors.push(format!(
                    "lc-{i} up: session {s} seq {q} (number {}) never arrived and no session-lost names it",
                    offset + q
                ));
            }
        }
        t.delivered += got.len() as u64;
        offset += last;
    }
    if offset != c.sent {
        t.errors.push(format!(
            "lc-{i} up: the client sent 1..={} but its sessions account for 1..={offset}",
            c.sent
        ));
    }
}

/// Server → client for one client (see the file's doc).
fn check_down(i: usize, c: &Record, redis_killed: Instant, t: &mut Tally) {
    let mut last = 0u64;
    let mut got: BTreeMap<u64, u64> = BTreeMap::new(); // number → session it arrived in
    for &(n, s, _) in &c.received {
        if n <= last {
            if got.contains_key(&n) {
                t.duplicates += 1;
                t.errors.push(format!("lc-{i} down: {n} arrived twice"));
            } else {
                t.errors
                    .push(format!("lc-{i} down: {n} arrived after {last}"));
            }
        }
        last = last.max(n);
        got.insert(n, s);
    }
    let reports: Vec<&Lost> = c.lost.iter().chain(&c.node_lost).collect();
    for p in &c.posted {
        if got.contains_key(&p.n) {
            t.delivered += 1;
            continue;
        }
        // Named exactly by a node's session-lost?
        let named = p.session.zip(p.seq).is_some_and(|(s, q)| {
            c.node_lost.iter().any(|l| {
                l.session == s
                    && [l.unacked, l.unsent]
                        .iter()
                        .flatten()
                        .any(|&(a, b)| (a..=b).contains(&q))
            })
        });
        let before = got.range(..p.n).next_back().map(|(_, &s)| s);
        let after = got.range(p.n..).next().map(|(_, &s)| s);
        let crosses = before != after || after.is_none() && before.is_none();
        let report = reports.iter().filter(|l| l.at >= p.at).map(|l| l.at).min();
        if p.status == "routed"
            && p.at <= redis_killed
            && redis_killed - p.at <= Duration::from_secs(1)
        {
            t.lost_with_redis += 1;
            continue;
        }
        match (named, crosses, report) {
            (true, _, _) => {
                t.lost_reported += 1;
                t.lost_at.push(p.at);
            }
            (false, true, Some(_)) => {
                t.lost_reported += 1;
                t.lost_at.push(p.at);
            }
            _ => t.errors.push(format!(
                "lc-{i} down: {} (accepted {} via n{}, session {:?} seq {:?}; the numbers before and after were accepted as (session, seq) {:?} and {:?}) never arrived; {}",
                p.n,
                p.status,
                p.via + 1,
                p.session,
                p.seq,
                c.posted
                    .iter()
                    .find(|q| q.n + 1 == p.n)
                    .map(|q| (q.session, q.seq)),
                c.posted
                    .iter()
                    .find(|q| q.n == p.n + 1)
                    .map(|q| (q.session, q.seq)),
                if crosses {
                    "no session loss was reported after it was accepted"
                } else {
                    "the numbers around it arrived in one session (a gap inside a session)"
                }
            )),
        }
    }
}

fn report(o: &Outcome, durable: bool) -> (Tally, Tally) {
    let w = lock(&o.world);
    let (mut up, mut down) = (Tally::default(), Tally::default());
    for (i, c) in w.clients.iter().enumerate() {
        check_up(i, c, &mut up);
        check_down(i, c, o.phases[2].at.unwrap_or(o.end), &mut down);
    }
    let variant = if durable { "durable" } else { "plain" };
    say(&format!(
        "\nlab cluster ({variant}): {CLIENTS} clients × {NODES} nodes, --cluster-dead-after {}, one number per {} each way per client",
        ms(DEAD_AFTER),
        ms(RATE)
    ));
    let bounds: Vec<Instant> = o
        .phases
        .iter()
        .filter_map(|p| p.at)
        .chain([o.end])
        .collect();
    for (k, p) in o.phases.iter().enumerate() {
        let (from, to) = (bounds[k], bounds[k + 1]);
        let count = |t: &Tally| t.lost_at.iter().filter(|&&x| x >= from && x < to).count();
        let lost_sessions = w
            .clients
            .iter()
            .map(|c| c.lost.iter().filter(|l| l.at >= from && l.at < to).count())
            .sum::<usize>();
        say(&format!(
            "  {}: {}; client session-lost {lost_sessions}; lost and reported: client→server {}, server→client {}",
            p.name,
            p.notes.join("; "),
            count(&up),
            count(&down)
        ));
    }
    let refused: BTreeMap<String, u64> = w.clients.iter().fold(BTreeMap::new(), |mut m, c| {
        for (k, v) in &c.refused {
            *m.entry(k.clone()).or_default() += v;
        }
        m
    });
    let longest = w
        .clients
        .iter()
        .map(|c| c.longest_post_wait)
        .max()
        .unwrap_or_default();
    say(&format!(
        "  totals: client→server {} delivered, {} lost and reported, {} duplicates; server→client {} delivered, {} lost and reported, {} duplicates, {} routed just before Redis died and lost with it (known, unreported); posts refused {refused:?} (a number waits until accepted, longest {}); silent losses or order faults: {}",
        up.delivered,
        up.lost_reported,
        up.duplicates,
        down.delivered,
        down.lost_reported,
        down.duplicates,
        down.lost_with_redis,
        ms(longest),
        up.errors.len() + down.errors.len()
    ));
    say(&format!(
        "  end: {}",
        o.holders_end
            .iter()
            .map(|(id, n)| format!("{id}@n{}", n + 1))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    (up, down)
}

fn assert_outcome(o: &Outcome, durable: bool) {
    let (up, down) = report(o, durable);
    let w = lock(&o.world);
    for (i, c) in w.clients.iter().enumerate() {
        assert!(c.gave_up.is_none(), "lc-{i} gave up: {:?}", c.gave_up);
        assert!(c.connected, "lc-{i} is not connected at the end");
        let h = o.holders_end.get(&client_id(i)).copied();
        assert!(
            h.is_some_and(|h| h != o.killed),
            "lc-{i} is not online on a live node: {h:?}"
        );
        assert!(
            c.sent > 0 && !c.posted.is_empty(),
            "lc-{i} exchanged nothing"
        );
    }
    // Declared dead within the bound: not before `dead_after` less one heartbeat period (its
    // last heartbeat may be that old when cut off; half of `dead_after`, for a heartbeat late
    // on a busy machine), not after `dead_after` plus one period (the reaper's) plus 1 s for
    // the mirror and this test's polling.
    let period = DEAD_AFTER / 3;
    assert!(
        o.reaped >= DEAD_AFTER / 2 && o.reaped <= DEAD_AFTER + period + Duration::from_secs(1),
        "the cut-off node was reaped after {:?} (dead_after {DEAD_AFTER:?})",
        o.reaped
    );
    // A partitioned node's clients keep their connections (docs/CLUSTER.md).
    let t_part = o.phases[1].at.expect("partition time");
    let t_redis = o.phases[2].at.expect("redis time");
    for &i in &o.on_partitioned {
        let c = &w.clients[i];
        let n = c
            .disconnects
            .iter()
            .filter(|(t, _)| *t > t_part && *t < t_redis)
            .count();
        assert_eq!(
            n,
            0,
            "lc-{i} on n{} lost its connection during the partition: {:?}",
            o.partitioned + 1,
            c.disconnects
        );
    }
    let errors: Vec<&String> = up.errors.iter().chain(&down.errors).collect();
    if !errors.is_empty() {
        let at = |t: Instant| format!("{:.3} s", t.duration_since(o.start).as_secs_f64());
        say(&format!(
            "phases: {}",
            o.phases
                .iter()
                .filter_map(|p| p.at.map(|t| format!("{} at {}", p.name, at(t))))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for (i, c) in w.clients.iter().enumerate() {
            for p in c.posted.iter().filter(|p| !p.refusals.is_empty()) {
                say(&format!(
                    "lc-{i} down: {} accepted {} via n{} at {} after refusals {:?}",
                    p.n,
                    p.status,
                    p.via + 1,
                    at(p.at),
                    p.refusals
                ));
            }
            for &(n, s, t) in &c.received {
                if c.received.iter().filter(|r| r.0 == n).count() > 1 {
                    say(&format!(
                        "lc-{i} down: {n} received in session {s} at {}",
                        at(t)
                    ));
                }
            }
        }
        for l in &o.logs {
            say(l);
        }
    }
    assert!(
        errors.is_empty(),
        "{} silent losses or order faults:\n{}",
        errors.len(),
        errors
            .iter()
            .take(40)
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(up.duplicates + down.duplicates, 0);
    if durable {
        assert_eq!(
            (up.lost_reported, down.lost_reported, down.lost_with_redis),
            (0, 0, 0),
            "with --durable-sessions nothing may be lost (a routed send is accepted only once its holder has it in the copy)"
        );
        let lost: usize = w
            .clients
            .iter()
            .map(|c| c.lost.len() + c.node_lost.len())
            .sum();
        assert_eq!(lost, 0, "with --durable-sessions no session may be lost");
    } else {
        // The killed node's sessions died with it: each of its clients says so.
        for &i in &o.on_killed {
            let t_kill = o.phases[0].at.expect("kill time");
            assert!(
                w.clients[i].lost.iter().any(|l| l.at > t_kill),
                "lc-{i} was on the killed node and reported no session-lost"
            );
        }
    }
}

/// The scenario, without or with `--durable-sessions`; skipped (reported) when something it
/// needs is missing, or the flag when `durable`.
fn scenario_test(name: &str, durable: bool) {
    let tools = match tools() {
        Ok(t) => t,
        Err(why) => return tether_lab::report_skip(name, &why),
    };
    if durable && !tools.durable {
        return tether_lab::report_skip(name, "tether serve has no --durable-sessions yet");
    }
    let _one = lock(&SERIAL);
    let o = run_scenario(tools, durable);
    assert_outcome(&o, durable);
}

#[test]
fn cluster_faults_every_loss_is_reported() {
    scenario_test("cluster_faults_every_loss_is_reported", false);
}

#[test]
fn cluster_faults_durable_sessions_exactly_once() {
    scenario_test("cluster_faults_durable_sessions_exactly_once", true);
}

/// `TETHER_LAB_HEAL_JITTER_MS=N`: the partition lasts up to N ms longer (random), so that the
/// heal falls anywhere within TCP's backed-off retransmission gap (a heal early in a gap
/// leaves the node cut off until the next retransmission: a slow, flapping recovery).
fn heal_jitter() -> Duration {
    let max: u64 = std::env::var("TETHER_LAB_HEAL_JITTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_millis(if max == 0 { 0 } else { nanos % max })
}
