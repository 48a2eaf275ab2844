//! api: the gateway under load. A real `tether serve` (its own process), N clients in agent
//! processes (at most 5,000 each: the open-file limit is per process), and this process as
//! the backend:
//!
//! ```text
//!   backend (this) ──POST /api/clients/{id}/messages ×K connections──▶ tether serve ──▶ N clients
//!                  ──POST /api/broadcast ──────────────────────────────▶             ──▶ (agents:
//!                  ◀─GET /api/events (NDJSON) ◀── client messages ◀──────────────────◀── latency)
//! ```
//!
//! Every payload carries the sender's `CLOCK_MONOTONIC` time (the same clock in every process
//! here), so the latency is measured from the API call (or the client's send) to the
//! receipt, across processes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::procs::Agent;
use super::sys::mono_ns;

/// Settings of one run.
#[derive(Debug, Clone)]
pub(crate) struct ApiOpts {
    pub(crate) messages: usize,
    pub(crate) broadcasts: usize,
    pub(crate) concurrency: usize,
    pub(crate) client_msgs: usize,
}

/// The figures of one client count.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ApiResult {
    pub(crate) clients: usize,
    pub(crate) send_msgs: usize,
    pub(crate) send_msgs_per_s: f64,
    pub(crate) send_p50_us: f64,
    pub(crate) send_p99_us: f64,
    pub(crate) broadcast_deliveries: usize,
    pub(crate) broadcast_deliveries_per_s: f64,
    pub(crate) broadcast_p50_us: f64,
    pub(crate) broadcast_p99_us: f64,
    pub(crate) events: usize,
    pub(crate) events_per_s: f64,
    pub(crate) events_p50_us: f64,
    pub(crate) events_p99_us: f64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

/// The server under test: `tether serve` in its own process.
async fn start_serve() -> anyhow::Result<super::procs::ServeChild> {
    let args: Vec<String> = [
        "--detect-within",
        "60s",
        "--max-connections",
        "19000",
        "--event-ring-events",
        "1000000",
        "--event-ring-bytes",
        "512MiB",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    super::procs::spawn_serve(&args, None).await
}

type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn post(client: &Http, url: &str, body: Bytes) -> anyhow::Result<u16> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(body))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// A payload stamped with the send time.
fn stamped() -> Bytes {
    let mut b = format!("t{:020}", mono_ns()).into_bytes();
    b.resize(32, b'.');
    Bytes::from(b)
}

async fn latencies(agents: &mut [Agent]) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut all = Vec::new();
    let mut received = 0;
    for a in agents.iter_mut() {
        let v = a.ask("stats", "stats").await?;
        received += v["received"].as_u64().unwrap_or(0);
        if let Some(s) = v["lat_us"].as_array() {
            all.extend(s.iter().filter_map(|x| x.as_u64()));
        }
    }
    all.sort_unstable();
    Ok((received, all))
}

async fn wait_received(agents: &mut [Agent], want: u64, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let mut got = 0;
        for a in agents.iter_mut() {
            got += a.ask("count", "count").await?["received"]
                .as_u64()
                .unwrap_or(0);
        }
        if got >= want {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!("clients received {got} of {want} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client count.
pub(crate) async fn run_one(n: usize, o: &ApiOpts) -> anyhow::Result<ApiResult> {
    let serve = start_serve().await?;
    let per = 5000;
    let mut agents = Vec::new();
    for (k, first) in (0..n).step_by(per).enumerate() {
        let count = per.min(n - first);
        let args: Vec<String> = [
            "api-clients",
            "--addr",
            &serve.listen.to_string(),
            "--src",
            &format!("127.{}.0.0", 2 + k),
            "--first",
            &first.to_string(),
            "--count",
            &count.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        agents.push(Agent::spawn(&args)?);
    }
    for a in agents.iter_mut() {
        a.expect("ready", Duration::from_secs(120)).await?;
    }
    let http: Http = HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(o.concurrency)
        .build_http();
    let base = format!("http://{}", serve.http);

    // 1. One message per call, to clients in turn, `concurrency` calls in flight.
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        let (http, next, base) = (http.clone(), next.clone(), base.clone());
        let total = o.messages as u64;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let url = format!("{base}/api/clients/c{}/messages", i % n as u64);
                let s = post(&http, &url, stamped()).await?;
                if s != 202 {
                    bail!("send answered {s}");
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    wait_received(&mut agents, o.messages as u64, Duration::from_secs(120)).await?;
    let send_took = t.elapsed();
    let (_, send_lat) = latencies(&mut agents).await?;

    // 2. Broadcasts, one after the other (each is queued for every client at once).
    let t = Instant::now();
    for _ in 0..o.broadcasts {
        let s = post(&http, &format!("{base}/api/broadcast"), stamped()).await?;
        if s != 202 {
            bail!("broadcast answered {s}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deliveries = o.broadcasts * n;
    wait_received(&mut agents, deliveries as u64, Duration::from_secs(180)).await?;
    let bc_took = t.elapsed();
    let (_, bc_lat) = latencies(&mut agents).await?;

    // 3. Client messages through the event stream: every client sends `client_msgs`.
    let req = hyper::Request::get(format!("{base}/api/events?format=ndjson"))
        .body(Full::new(Bytes::new()))?;
    let resp = http.request(req).await?;
    let mut body = resp.into_body();
    let want = (n * o.client_msgs) as u64;
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut lat = Vec::with_capacity(want as usize);
            let mut first: Option<Instant> = None;
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                let mut start = 0;
                while let Some(i) = buf[start..].iter().position(|b| *b == b'\n') {
                    let line = &buf[start..start + i];
                    start += i + 1;
                    // Only client messages carry the stamp: "text":"t<20 digits>..."
                    if let Some(p) = find(line, b"\"text\":\"t") {
                        let digits = &line[p + 9..p + 29];
                        if let Some(ts) = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| d.parse::<u64>().ok())
                        {
                            first.get_or_insert_with(Instant::now);
                            lat.push(mono_ns().saturating_sub(ts) / 1000);
                            if seen.fetch_add(1, Relaxed) + 1 >= want {
                                return (lat, first.map(|f| f.elapsed()));
                            }
                        }
                    }
                }
                buf.drain(..start);
            }
            (lat, first.map(|f| f.elapsed()))
        })
    };
    let t = Instant::now();
    for a in agents.iter_mut() {
        a.send(&format!("send {}", o.client_msgs)).await?;
    }
    let (mut ev_lat, _) = tokio::time::timeout(Duration::from_secs(180), reader)
        .await
        .with_context(|| format!("events seen: {} of {want}", seen.load(Relaxed)))??;
    let ev_took = t.elapsed();
    ev_lat.sort_unstable();

    for a in agents {
        a.quit().await;
    }
    drop(serve.child);
    let r = ApiResult {
        clients: n,
        send_msgs: o.messages,
        send_msgs_per_s: o.messages as f64 / send_took.as_secs_f64(),
        send_p50_us: pct(&send_lat, 0.5),
        send_p99_us: pct(&send_lat, 0.99),
        broadcast_deliveries: deliveries,
        broadcast_deliveries_per_s: deliveries as f64 / bc_took.as_secs_f64(),
        broadcast_p50_us: pct(&bc_lat, 0.5),
        broadcast_p99_us: pct(&bc_lat, 0.99),
        events: ev_lat.len(),
        events_per_s: ev_lat.len() as f64 / ev_took.as_secs_f64(),
        events_p50_us: pct(&ev_lat, 0.5),
        events_p99_us: pct(&ev_lat, 0.99),
    };
    Ok(r)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The table.
pub(crate) fn print(rs: &[ApiResult]) {
    println!("\napi — backend → tether serve → clients, and clients → event stream → backend");
    println!(
        "{:>7} | {:>12} {:>9} {:>9} | {:>14} {:>9} {:>9} | {:>11} {:>9} {:>9}",
        "clients",
        "send msg/s",
        "p50",
        "p99",
        "broadcast d/s",
        "p50",
        "p99",
        "events/s",
        "p50",
        "p99"
    );
    let ms = |us: f64| format!("{:.1}ms", us / 1000.0);
    for r in rs {
        println!(
            "{:>7} | {:>12.0} {:>9} {:>9} | {:>14.0} {:>9} {:>9} | {:>11.0} {:>9} {:>9}",
            r.clients,
            r.send_msgs_per_s,
            ms(r.send_p50_us),
            ms(r.send_p99_us),
            r.broadcast_deliveries_per_s,
            ms(r.broadcast_p50_us),
            ms(r.broadcast_p99_us),
            r.events_per_s,
            ms(r.events_p50_us),
            ms(r.events_p99_us),
        );
    }
    println!("  send: POST /api/clients/{{id}}/messages (32 B), latency from the call to the client's receipt");
    println!("  broadcast d/s: deliveries per second (clients × broadcasts); events: every client sends, the backend reads NDJSON");
}
