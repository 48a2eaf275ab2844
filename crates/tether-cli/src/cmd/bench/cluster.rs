//! cluster: two `tether serve --cluster` nodes and a private `redis-server`, all on loopback,
//! N clients on node a (in this process), this process as the backend:
//!
//! ```text
//!   backend (this) ──POST /api/clients/{id}/messages──▶ node b ──XADD a's inbox──▶ Redis
//!                                                                                  │ XREAD
//!   N clients ◀────────────────────────────────────── node a ◀─────────────────────┘
//!   then: kill -9 node a ─▶ node b lists the N clients offline / node-lost (failover time)
//! ```
//!
//! Figures: cross-node send latency (API call on b → receipt by the client on a) p50/p99 and
//! throughput, the same on a (local) for comparison; the presence write rate of a node while
//! its N clients are idle (what the cluster costs Redis per node: it must not grow with N); the
//! time from `kill -9` of a node to the other node listing every one of its clients
//! `node-lost`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tether::{Client, ClientConfig, ClientEvent};
use tokio::sync::mpsc;

use super::sys::mono_ns;

/// Settings of one run.
#[derive(Debug, Clone)]
pub(crate) struct ClusterOpts {
    /// Client counts (cumulative: clients are added up to each).
    pub(crate) n: Vec<usize>,
    /// Messages per latency and throughput measurement.
    pub(crate) messages: usize,
    /// API calls in flight for the throughput measurement.
    pub(crate) concurrency: usize,
    /// `--cluster-dead-after` of the nodes.
    pub(crate) dead_after: Duration,
    /// The idle window over which the presence write rate is measured.
    pub(crate) idle: Duration,
    /// The nodes run with `--durable-sessions`.
    pub(crate) durable: bool,
}

type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The private redis-server (killed when dropped) and its port.
struct Redis {
    _child: tokio::process::Child,
    port: u16,
}

async fn start_redis() -> anyhow::Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server (apt-get install redis-server)")?;
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("redis-server did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Redis {
        _child: child,
        port,
    })
}

type Node = super::procs::ServeChild;

async fn start_node(
    redis: &Redis,
    id: &str,
    dead_after: Duration,
    durable: bool,
) -> anyhow::Result<Node> {
    let mut args: Vec<String> = [
        // All clients come from 127.0.0.1: the per-source limit is an eighth of this.
        "--detect-within",
        "60s",
        "--max-connections",
        "100000",
        "--cluster",
        &format!("redis://127.0.0.1:{}", redis.port),
        "--node-id",
        id,
        "--cluster-dead-after",
        &format!("{}ms", dead_after.as_millis()),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if durable {
        args.push("--durable-sessions".into());
    }
    super::procs::spawn_serve(&args, Some(&format!("node {id}"))).await
}

async fn request(
    http: &Http,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(body))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .context("no answer within 10 s")??;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// One metric's value from `/metrics`.
async fn metric(http: &Http, node: &Node, name: &str) -> anyhow::Result<f64> {
    let (_, body) = request(http, node.http, "GET", "/metrics", Bytes::new()).await?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// `counts.STATE` of a node's `/api/clients`.
async fn count(http: &Http, node: &Node, state: &str) -> anyhow::Result<u64> {
    let (_, body) = request(http, node.http, "GET", "/api/clients?limit=1", Bytes::new()).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(v["counts"][state].as_u64().unwrap_or(0))
}

/// Commands Redis has run so far (`INFO stats`: `total_commands_processed`; the nodes'
/// heartbeats, blocking reads and this call count too: a background of a few per second).
async fn redis_commands(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(con).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no total_commands_processed in INFO stats")
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

/// Sends `messages` through `via`'s API to the clients (round robin), `concurrency` in flight
/// (1: one at a time, for latency); returns the latencies (µs, sorted) and messages/s.
async fn sends(
    http: &Http,
    via: SocketAddr,
    n: usize,
    messages: usize,
    concurrency: usize,
    rx: &mut mpsc::UnboundedReceiver<u64>,
) -> anyhow::Result<(Vec<u64>, f64)> {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, next) = (http.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= messages {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = Bytes::from(mono_ns().to_be_bytes().to_vec());
                let path = format!("/api/clients/c{}/messages", i % n);
                let (st, b) = request(&http, via, "POST", &path, body).await?;
                if st != 202 {
                    bail!("POST {path}: {st} {}", String::from_utf8_lossy(&b));
                }
            }
        }));
    }
    let mut lat = Vec::with_capacity(messages);
    while lat.len() < messages {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(us)) => lat.push(us),
            _ => bail!("{} of {messages} messages arrived", lat.len()),
        }
    }
    for t in tasks {
        t.await??;
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok((lat, rate))
}

/// Runs the whole measurement and prints the table.
pub(crate) async fn run(o: ClusterOpts) -> anyhow::Result<()> {
    let redis = start_redis().await?;
    let mut a = start_node(&redis, "a", o.dead_after, o.durable).await?;
    let b = start_node(&redis, "b", o.dead_after, o.durable).await?;
    let mut rcon = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))?
        .get_multiplexed_async_connection()
        .await
        .context("cannot reach the bench's redis-server")?;
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    // Every client forwards each message's latency (µs, from the 8-byte send time) here.
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let mut clients: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    println!(
        "# tether bench cluster: 2 nodes + redis-server on loopback, dead_after={}ms{}",
        o.dead_after.as_millis(),
        if o.durable {
            ", --durable-sessions"
        } else {
            ""
        }
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>11} {:>15} {:>12} {:>16} {:>16}",
        "N",
        "local_p50",
        "local_p99",
        "cross_p50",
        "cross_p99",
        "cross_msg/s",
        "record_writes/s",
        "heartbeats/s",
        "redis_cmds/local",
        "redis_cmds/cross"
    );
    for &n in &o.n {
        while clients.len() < n {
            let id = format!("c{}", clients.len());
            let mut c = Client::start(ClientConfig::new(a.listen, id.clone()));
            loop {
                match tokio::time::timeout(Duration::from_secs(10), c.next_event()).await {
                    Ok(Some(ClientEvent::Connected { .. })) => break,
                    Ok(Some(ClientEvent::GaveUp { reason, .. })) => {
                        bail!("client {id} gave up: {reason}")
                    }
                    Ok(Some(_)) => {}
                    _ => bail!("client {id} did not connect"),
                }
            }
            // The client lives in a task that reports each message's latency.
            let tx = tx.clone();
            clients.push(tokio::spawn(async move {
                while let Some(ev) = c.next_event().await {
                    if let ClientEvent::Message(m) = ev {
                        if let Ok(b) = <[u8; 8]>::try_from(&m[..]) {
                            let sent = u64::from_be_bytes(b);
                            let _ = tx.send(mono_ns().saturating_sub(sent) / 1000);
                        }
                    }
                }
            }));
        }
        // b sees them all.
        let t = Instant::now();
        while count(&http, &b, "online").await? < n as u64 {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("node b never listed {n} clients online");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The idle window: what a node writes to Redis with N idle clients.
        let (w0, h0) = (
            metric(&http, &a, "tether_cluster_presence_writes_total").await?,
            metric(&http, &a, "tether_cluster_heartbeats_total").await?,
        );
        tokio::time::sleep(o.idle).await;
        let (w1, h1) = (
            metric(&http, &a, "tether_cluster_presence_writes_total").await?,
            metric(&http, &a, "tether_cluster_heartbeats_total").await?,
        );
        let secs = o.idle.as_secs_f64();
        let m = o.messages.min(2000);
        let c0 = redis_commands(&mut rcon).await?;
        let (local, _) = sends(&http, a.http, n, m, 1, &mut rx).await?;
        let c1 = redis_commands(&mut rcon).await?;
        let (cross, _) = sends(&http, b.http, n, m, 1, &mut rx).await?;
        let c2 = redis_commands(&mut rcon).await?;
        let (_, rate) = sends(&http, b.http, n, o.messages, o.concurrency, &mut rx).await?;
        println!(
            "{:>6} {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>11.0} {:>15.2} {:>12.2} {:>16.2} {:>16.2}",
            n,
            pct(&local, 0.5),
            pct(&local, 0.99),
            pct(&cross, 0.5),
            pct(&cross, 0.99),
            rate,
            (w1 - w0) / secs,
            (h1 - h0) / secs,
            (c1 - c0) as f64 / m as f64,
            (c2 - c1) as f64 / m as f64,
        );
    }
    // Failover: kill -9 node a; how long until b lists every client offline (node-lost).
    let n = clients.len() as u64;
    let before = count(&http, &b, "offline").await?;
    a.child.start_kill().context("cannot kill node a")?;
    let killed = Instant::now();
    let _ = a.child.wait().await;
    while count(&http, &b, "offline").await? < before + n {
        if killed.elapsed() > o.dead_after * 3 + Duration::from_secs(10) {
            bail!("node b did not list the {n} clients of the killed node offline");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = killed.elapsed();
    println!(
        "failover: kill -9 of node a with {n} clients -> all node-lost on node b after {} ms (dead_after {} ms, heartbeat every {} ms: expected {}..{} ms)",
        took.as_millis(),
        o.dead_after.as_millis(),
        (o.dead_after / 3).as_millis(),
        (o.dead_after - o.dead_after / 3).as_millis(),
        (o.dead_after + o.dead_after / 3).as_millis(),
    );
    for c in clients {
        c.abort();
    }
    drop(b);
    drop(redis);
    Ok(())
}
