//! `tether bench`: what it costs to hold many idle clients, how precisely the dead ones are
//! noticed, and what the framing costs, side by side with mosquitto and plain tokio.
//!
//! ```text
//!                     ┌──────────── coordinator (this process) ─────────────┐
//!                     │ reads /proc/PID/{status,stat}, /proc/net/sockstat,   │
//!                     │ /proc/slabinfo; prints tables; writes --json         │
//!                     └──┬────────────────────┬──────────────────────────────┘
//!           JSON lines   │                    │  JSON lines
//!   ┌────────────────────▼───┐   loopback  ┌──▼──────────────────────────────┐
//!   │ server: agent server   │◀────────────│ agent clients ×k (127.0.0.x src)│
//!   │ (tether) or mosquitto  │   N conns   │ tether Connection or MQTT 3.1.1 │
//!   └────────────────────────┘             └─────────────────────────────────┘
//! ```
//!
//! The server runs alone in its process, so its RSS and CPU time belong to it. Scenarios:
//! `hold` (idle clients, 30 s heartbeats: memory, CPU per heartbeat, connect rate; the same
//! against mosquitto with keepalive 30 s), `detect` (10 % blackholed at once under message
//! load: time to `Offline`, false `Offline`s), `echo` (tether `Connection` against tokio +
//! `LengthDelimitedCodec`), `all`. Targets are shown next to the figures, not asserted.

mod agent;
mod echo;
mod procs;
mod sys;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};

use procs::{Agent, Mosquitto};

/// Benchmarks: hold, detect, echo.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCmd {
    /// N idle clients with 30 s heartbeats: server memory and CPU per connection, tether and
    /// mosquitto side by side.
    Hold(HoldArgs),
    /// 10 % of N clients blackholed at once under message load: time to Offline, false Offlines.
    Detect(DetectArgs),
    /// Round trips and throughput, tether Connection vs tokio + LengthDelimitedCodec.
    Echo(EchoArgs),
    /// hold, detect and echo in one run.
    All(AllArgs),
    /// Internal: the bench's child processes.
    #[command(hide = true, subcommand)]
    Agent(agent::AgentCmd),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tether_proto::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug, Clone)]
struct HoldOpts {
    /// How long to hold the idle clients after they connected (CPU is measured over this).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    hold: Duration,
    /// Heartbeat interval (tether) and MQTT keepalive.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Skip the mosquitto comparison.
    #[arg(long)]
    no_mosquitto: bool,
    /// Load-generator processes (default: one per 6,500 clients, 1–4).
    #[arg(long)]
    agents: Option<usize>,
}

#[derive(clap::Args, Debug, Clone)]
struct DetectOpts {
    /// The detection bound the server's policy is derived from.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    detect_within: Duration,
    /// Clients that send messages as fast as they can during the test (among the 90 %, at
    /// most N/10; they run in a process of their own).
    #[arg(long, default_value_t = 256)]
    loaders: usize,
    /// Size of the load messages in bytes.
    #[arg(long, default_value_t = 64)]
    msg_size: usize,
    /// Load-generator processes (default: one per 6,500 clients, 1–4).
    #[arg(long)]
    detect_agents: Option<usize>,
}

#[derive(clap::Args, Debug, Clone)]
struct EchoOpts {
    /// Messages per throughput run at 64 B (4 KiB runs use an eighth).
    #[arg(long, default_value_t = 400_000)]
    messages: usize,
    /// Round trips timed for latency.
    #[arg(long, default_value_t = 20_000)]
    rtt_samples: usize,
    /// Runs per case; the best is kept.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args, Debug)]
struct HoldArgs {
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    n: Vec<usize>,
    #[command(flatten)]
    opts: HoldOpts,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DetectArgs {
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    n: Vec<usize>,
    #[command(flatten)]
    opts: DetectOpts,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct EchoArgs {
    #[command(flatten)]
    opts: EchoOpts,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct AllArgs {
    /// Client counts for hold.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,19000")]
    hold_n: Vec<usize>,
    /// Client counts for detect.
    #[arg(long, value_delimiter = ',', default_value = "1000,19000")]
    detect_n: Vec<usize>,
    #[command(flatten)]
    hold: HoldOpts,
    #[command(flatten)]
    detect: DetectOpts,
    #[command(flatten)]
    echo: EchoOpts,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs `tether bench ...`.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let BenchCmd::Agent(a) = args.cmd {
        return agent::run(a);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(coordinate(args.cmd))
}

#[derive(Debug, Default, Serialize)]
struct Report {
    machine: Value,
    command: String,
    started: String,
    load_before: f64,
    hold: Vec<HoldResult>,
    detect: Vec<DetectResult>,
    echo: Vec<echo::EchoResult>,
    load_after: f64,
}

async fn coordinate(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let mut rep = Report {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started: utc_now(),
        load_before: sys::loadavg(),
        ..Default::default()
    };
    println!(
        "tether bench — {} — load {:.2} — {}",
        rep.machine["cpu"].as_str().unwrap_or("?"),
        rep.load_before,
        rep.started
    );
    let (hold_n, detect_n, hold, detect, echo, json) = match cmd {
        BenchCmd::Hold(a) => (a.n, vec![], Some(a.opts), None, None, a.json),
        BenchCmd::Detect(a) => (vec![], a.n, None, Some(a.opts), None, a.json),
        BenchCmd::Echo(a) => (vec![], vec![], None, None, Some(a.opts), a.json),
        BenchCmd::All(a) => (
            a.hold_n,
            a.detect_n,
            Some(a.hold),
            Some(a.detect),
            Some(a.echo),
            a.json,
        ),
        BenchCmd::Agent(_) => unreachable!("handled in run"),
    };
    if let Some(h) = &hold {
        for &n in &hold_n {
            rep.hold.push(hold_one(Server::Tether, n, h).await?);
            if !h.no_mosquitto {
                match hold_one(Server::Mosquitto, n, h).await {
                    Ok(r) => rep.hold.push(r),
                    Err(e) => eprintln!("mosquitto at N={n} skipped: {e:#}"),
                }
            }
            print_hold(&rep.hold);
            save(&rep, json.as_ref())?;
        }
    }
    if let Some(d) = &detect {
        for &n in &detect_n {
            rep.detect.push(detect_one(n, d).await?);
            print_detect(&rep.detect);
            save(&rep, json.as_ref())?;
        }
    }
    if let Some(e) = &echo {
        println!("\n== echo: tether Connection vs tokio + LengthDelimitedCodec ==");
        let opts = echo::EchoOpts {
            rtt_samples: e.rtt_samples,
            messages: e.messages,
            rounds: e.rounds,
        };
        // Its own runtime with a worker per core, as an application would have (the
        // coordinator's runtime has one worker).
        rep.echo = tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?
                .block_on(echo::run(&opts))
        })
        .await
        .context("echo panicked")??;
        print_echo(&rep.echo);
    }
    rep.load_after = sys::loadavg();
    if !rep.hold.is_empty() {
        print_hold(&rep.hold);
    }
    if !rep.detect.is_empty() {
        print_detect(&rep.detect);
    }
    println!(
        "\nload average {:.2} → {:.2}",
        rep.load_before, rep.load_after
    );
    save(&rep, json.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

fn save(rep: &Report, path: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(p) = path {
        let s = serde_json::to_string_pretty(rep)?;
        std::fs::write(p, s).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    json!({"cpu": cpu, "cores": cores, "mem_gib": mem_kb as f64 / 1048576.0,
           "kernel": kernel, "nofile": nofile.rlim_cur})
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
enum Server {
    Tether,
    Mosquitto,
}

/// Source addresses rotate between scenarios so TIME_WAIT left by one run never collides
/// with the next.
static SRC_SALT: AtomicUsize = AtomicUsize::new(0);

fn agents_for(n: usize, explicit: Option<usize>) -> usize {
    explicit
        .unwrap_or(n.div_ceil(6500))
        .clamp(1, 8)
        .min(n.max(1))
}

/// Starts `k` client agents for `n` clients and connects them all; prints progress.
#[allow(clippy::too_many_arguments)]
async fn connect_clients(
    kind: &str,
    addr: std::net::SocketAddr,
    first_id: usize,
    n: usize,
    k: usize,
    heartbeat_ms: u64,
    detect_within_ms: u64,
) -> anyhow::Result<(Vec<Agent>, f64, u64, Option<String>)> {
    let salt = SRC_SALT.fetch_add(1, Relaxed);
    let mut agents = Vec::with_capacity(k);
    let mut first = first_id;
    for i in 0..k {
        let count = n / k + usize::from(i < n % k);
        let src: IpAddr = [127, 0, 0, (2 + (salt * 8 + i) % 250) as u8].into();
        let args: Vec<String> = vec![
            "clients".into(),
            "--kind".into(),
            kind.into(),
            "--addr".into(),
            addr.to_string(),
            "--src".into(),
            src.to_string(),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--heartbeat-ms".into(),
            heartbeat_ms.to_string(),
            "--detect-within-ms".into(),
            detect_within_ms.to_string(),
        ];
        first += count;
        let mut a = Agent::spawn(&args)?;
        a.expect("ready", Duration::from_secs(10)).await?;
        agents.push(a);
    }
    let t0 = Instant::now();
    for a in &mut agents {
        a.send("go").await?;
    }
    let mut secs: f64 = 0.0;
    let mut failed = 0;
    let mut error = None;
    let mut last_print = Instant::now();
    for i in 0..agents.len() {
        loop {
            match agents[i].expect("connected", Duration::from_secs(1)).await {
                Ok(v) => {
                    secs = secs.max(v["secs"].as_f64().unwrap_or(0.0));
                    failed += v["failed"].as_u64().unwrap_or(0);
                    if error.is_none() {
                        error = v["error"].as_str().map(str::to_owned);
                    }
                    break;
                }
                Err(e) if format!("{e:#}").contains("exited") => return Err(e),
                Err(_) if t0.elapsed() < Duration::from_secs(300) => {
                    if last_print.elapsed() >= Duration::from_secs(2) {
                        let c: u64 = agents.iter().map(|a| a.progress.load(Relaxed)).sum();
                        eprintln!(
                            "  connecting: ~{c}/{n} after {:.0} s",
                            t0.elapsed().as_secs_f64()
                        );
                        last_print = Instant::now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok((agents, secs, failed, error))
}

#[derive(Debug, Clone, Serialize)]
struct HoldResult {
    server: Server,
    server_version: String,
    n: usize,
    agents: usize,
    connected: u64,
    failed: u64,
    connect_error: Option<String>,
    connect_secs: f64,
    connects_per_s: f64,
    rss_before: u64,
    rss_idle: u64,
    rss_end: u64,
    rss_per_conn: f64,
    rss_end_per_conn: f64,
    /// tether only: malloc'd bytes in use per connection (glibc `mallinfo2`).
    heap_per_conn: Option<f64>,
    kernel_tcp_buffers_per_conn: f64,
    kernel_slab_per_conn_both_ends: Option<f64>,
    hold_secs: f64,
    heartbeat_s: f64,
    cpu_secs: f64,
    /// tether: heartbeat frames received + sent; mosquitto: PINGREQ received + PINGRESP sent.
    liveness_msgs: u64,
    cpu_us_per_liveness_msg: f64,
    /// Server CPU per client per heartbeat interval (the unit that matters to an operator).
    cpu_us_per_client_interval: f64,
    closed_during_hold: u64,
}

async fn hold_one(server: Server, n: usize, o: &HoldOpts) -> anyhow::Result<HoldResult> {
    println!(
        "\n== hold: {server:?}, N={n}, heartbeat {:?}, hold {:?} ==",
        o.heartbeat, o.hold
    );
    let hb_ms = o.heartbeat.as_millis() as u64;
    // The policy around a 30 s heartbeat: detect within 3 heartbeats.
    let dw_ms = hb_ms * 3;
    let mut tether_agent = None;
    let mut mosq = None;
    let (pid, addr, version) = match server {
        Server::Tether => {
            let mut a = Agent::spawn(&[
                "server".into(),
                "--detect-within-ms".into(),
                dw_ms.to_string(),
                "--heartbeat-ms".into(),
                hb_ms.to_string(),
            ])?;
            let v = a.expect("listening", Duration::from_secs(10)).await?;
            let addr = v["addr"].as_str().context("no addr")?.parse()?;
            let pid = a.pid;
            tether_agent = Some(a);
            (pid, addr, format!("tether {}", env!("CARGO_PKG_VERSION")))
        }
        Server::Mosquitto => {
            let m = Mosquitto::start().await?;
            let r = (m.pid, m.addr, m.version.clone());
            mosq = Some(m);
            r
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let heap_before = heap(&mut tether_agent).await?;
    let rss_before = sys::rss_bytes(pid)?;
    let k0 = sys::kernel_mem();
    let kind = match server {
        Server::Tether => "tether",
        Server::Mosquitto => "mqtt",
    };
    let k = agents_for(n, o.agents);
    let (mut agents, connect_secs, failed, connect_error) =
        connect_clients(kind, addr, 0, n, k, hb_ms, dw_ms).await?;
    let connected = n as u64 - failed;
    println!(
        "  connected {connected}/{n} in {connect_secs:.2} s ({:.0}/s){}",
        connected as f64 / connect_secs.max(1e-9),
        connect_error
            .as_deref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = sys::rss_bytes(pid)?;
    let heap_idle = heap(&mut tether_agent).await?;
    let k1 = sys::kernel_mem();
    let cpu0 = sys::cpu_secs(pid)?;
    let hb0 = liveness_count(&mut agents, &mut tether_agent).await?;
    let t0 = Instant::now();
    while t0.elapsed() < o.hold {
        let left = o.hold.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
        let hb = liveness_count(&mut agents, &mut tether_agent).await?;
        eprintln!(
            "  holding: {:.0}/{:.0} s, {} liveness messages, server CPU {:.2} s",
            t0.elapsed().as_secs_f64(),
            o.hold.as_secs_f64(),
            hb - hb0,
            sys::cpu_secs(pid)? - cpu0
        );
    }
    let hb1 = liveness_count(&mut agents, &mut tether_agent).await?;
    let cpu1 = sys::cpu_secs(pid)?;
    let hold_secs = t0.elapsed().as_secs_f64();
    let rss_end = sys::rss_bytes(pid)?;
    let mut closed = 0;
    for a in agents.iter_mut() {
        closed += a.ask("stats", "stats").await?["closed"]
            .as_u64()
            .unwrap_or(0);
    }
    for a in agents {
        a.quit().await;
    }
    if let Some(t) = tether_agent {
        t.quit().await;
    }
    if let Some(m) = mosq {
        m.stop().await;
    }
    // Let the sockets go before the next scenario measures the kernel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nc = connected.max(1) as f64;
    let cpu = cpu1 - cpu0;
    let msgs = hb1 - hb0;
    let intervals = nc * hold_secs / o.heartbeat.as_secs_f64();
    let r = HoldResult {
        server,
        server_version: version,
        n,
        agents: k,
        connected,
        failed,
        connect_error,
        connect_secs,
        connects_per_s: connected as f64 / connect_secs.max(1e-9),
        rss_before,
        rss_idle,
        rss_end,
        rss_per_conn: (rss_idle as f64 - rss_before as f64) / nc,
        rss_end_per_conn: (rss_end as f64 - rss_before as f64) / nc,
        heap_per_conn: match (heap_before, heap_idle) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / nc),
            _ => None,
        },
        kernel_tcp_buffers_per_conn: (k1.tcp_buffers as f64 - k0.tcp_buffers as f64) / nc,
        kernel_slab_per_conn_both_ends: match (k0.slabs, k1.slabs) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / nc),
            _ => None,
        },
        hold_secs,
        heartbeat_s: o.heartbeat.as_secs_f64(),
        cpu_secs: cpu,
        liveness_msgs: msgs,
        cpu_us_per_liveness_msg: cpu * 1e6 / (msgs.max(1) as f64),
        cpu_us_per_client_interval: cpu * 1e6 / intervals.max(1.0),
        closed_during_hold: closed,
    };
    println!(
        "  RSS/conn {:.0} B (end of hold {:.0} B), CPU {:.2} s for {} liveness messages = {:.1} µs each",
        r.rss_per_conn, r.rss_end_per_conn, r.cpu_secs, r.liveness_msgs, r.cpu_us_per_liveness_msg
    );
    Ok(r)
}

/// The tether server's heap in use (`None` for mosquitto).
async fn heap(tether: &mut Option<Agent>) -> anyhow::Result<Option<u64>> {
    match tether {
        Some(t) => Ok(t.ask("metrics", "metrics").await?["heap"].as_u64()),
        None => Ok(None),
    }
}

/// Liveness messages handled so far: tether heartbeats in + out (server metrics); for
/// mosquitto, PINGREQ in + PINGRESP out (counted by the clients as answered pings × 2).
async fn liveness_count(agents: &mut [Agent], tether: &mut Option<Agent>) -> anyhow::Result<u64> {
    match tether {
        Some(t) => {
            let m = t.ask("metrics", "metrics").await?;
            Ok(m["hb_sent"].as_u64().unwrap_or(0) + m["hb_received"].as_u64().unwrap_or(0))
        }
        None => {
            let mut pings = 0;
            for a in agents.iter_mut() {
                pings += a.ask("stats", "stats").await?["pings"]
                    .as_u64()
                    .unwrap_or(0);
            }
            Ok(pings * 2)
        }
    }
}

fn print_hold(rows: &[HoldResult]) {
    println!(
        "\n== hold: idle clients, heartbeat/keepalive {} s ==",
        rows.first().map_or(30.0, |r| r.heartbeat_s)
    );
    println!(
        "{:<10} {:>6} {:>9} {:>11} {:>11} {:>10} {:>11} {:>10} {:>12} {:>13} {:>7}",
        "server",
        "N",
        "conn/s",
        "RSS/conn B",
        "end RSS/c",
        "heap/c",
        "kern buf/c",
        "slab/c*",
        "CPU µs/msg",
        "CPU µs/cl/hb",
        "closed"
    );
    for r in rows {
        println!(
            "{:<10} {:>6} {:>9.0} {:>11.0} {:>11.0} {:>10} {:>11.0} {:>10} {:>12.2} {:>13.2} {:>7}",
            format!("{:?}", r.server).to_lowercase(),
            r.n,
            r.connects_per_s,
            r.rss_per_conn,
            r.rss_end_per_conn,
            r.heap_per_conn.map_or("-".into(), |v| format!("{v:.0}")),
            r.kernel_tcp_buffers_per_conn,
            r.kernel_slab_per_conn_both_ends
                .map_or("-".into(), |v| format!("{v:.0}")),
            r.cpu_us_per_liveness_msg,
            r.cpu_us_per_client_interval,
            r.closed_during_hold
        );
    }
    let by_n: HashMap<(usize, Server), &HoldResult> =
        rows.iter().map(|r| ((r.n, r.server), r)).collect();
    let mut ns: Vec<usize> = rows.iter().map(|r| r.n).collect();
    ns.dedup();
    for n in ns {
        if let (Some(t), Some(m)) = (
            by_n.get(&(n, Server::Tether)),
            by_n.get(&(n, Server::Mosquitto)),
        ) {
            println!(
                "tether/mosquitto at N={n}: RSS/conn {:.2}× (target < 1), CPU/msg {:.2}× (target ≤ 1), connect rate {:.2}×",
                t.rss_per_conn / m.rss_per_conn,
                t.cpu_us_per_liveness_msg / m.cpu_us_per_liveness_msg,
                t.connects_per_s / m.connects_per_s
            );
        }
    }
    println!("* slab/c: kernel TCP + sock_inode_cache slabs per connection, both ends (loopback)");
}

#[derive(Debug, Clone, Serialize)]
struct Dist {
    min: f64,
    median: f64,
    p99: f64,
    max: f64,
}

fn dist(mut v: Vec<f64>) -> Option<Dist> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
    Some(Dist {
        min: v[0],
        median: p(0.5),
        p99: p(0.99),
        max: v[v.len() - 1],
    })
}

#[derive(Debug, Clone, Serialize)]
struct DetectResult {
    n: usize,
    agents: usize,
    connected: u64,
    heartbeat_ms: u64,
    dead_after_ms: u64,
    detect_within_ms: u64,
    silenced: usize,
    detected: usize,
    missed: usize,
    offline_reasons: HashMap<String, usize>,
    /// Offline time minus the last byte the client wrote (ms).
    since_last_byte_ms: Option<Dist>,
    /// Offline time minus the moment the blackhole went up (ms).
    since_blackhole_ms: Option<Dist>,
    /// `silent_for` as the server reported it (ms).
    server_silent_for_ms: Option<Dist>,
    within_bound_plus_100ms: usize,
    false_offlines: usize,
    false_offline_reasons: HashMap<String, usize>,
    false_suspects: usize,
    presence_events_lagged: u64,
    loaders: usize,
    msg_size: usize,
    load_msgs_per_s: f64,
    server_cpu_pct_under_load: f64,
    server_rss_end: u64,
}

async fn detect_one(n: usize, o: &DetectOpts) -> anyhow::Result<DetectResult> {
    let dw_ms = o.detect_within.as_millis() as u64;
    let mut server = Agent::spawn(&[
        "server".into(),
        "--detect-within-ms".into(),
        dw_ms.to_string(),
    ])?;
    let v = server.expect("listening", Duration::from_secs(10)).await?;
    let addr = v["addr"].as_str().context("no addr")?.parse()?;
    let hb_ms = v["heartbeat_ms"].as_u64().unwrap_or(0);
    let dead_ms = v["dead_after_ms"].as_u64().unwrap_or(0);
    println!(
        "\n== detect: N={n}, detect_within {dw_ms} ms (heartbeat {hb_ms} ms, dead_after {dead_ms} ms), \
         10% blackholed, {} loaders × {} B ==",
        o.loaders, o.msg_size
    );
    // The loaders live in their own process: a load generator that starves its own idle
    // clients would make them miss heartbeats and blame the server for it.
    let n_load = o.loaders.min(n / 10).max(1);
    let n_idle = n - n_load;
    let k = agents_for(n_idle, o.detect_agents);
    let (mut agents, connect_secs, failed, err) =
        connect_clients("tether", addr, 0, n_idle, k, hb_ms, dw_ms).await?;
    let (mut load_agents, _, load_failed, _) =
        connect_clients("tether", addr, n_idle, n_load, 1, hb_ms, dw_ms).await?;
    let failed = failed + load_failed;
    println!(
        "  connected {}/{n} in {connect_secs:.2} s{}",
        n as u64 - failed,
        err.map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base_presence = server.presence.lock().map(|p| p.len()).unwrap_or(0);
    let mut loaders = 0;
    for a in load_agents.iter_mut() {
        let v = a
            .ask(&format!("load {n_load} {}", o.msg_size), "loading")
            .await?;
        loaders += v["loaders"].as_u64().unwrap_or(0) as usize;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m0 = server.ask("metrics", "metrics").await?;
    let cpu0 = sys::cpu_secs(server.pid)?;
    let tl0 = Instant::now();
    // Blackhole at least 10 % of all clients at once, every m-th idle client.
    let modulus = (n_idle / n.div_ceil(10)).max(1);
    let mut silenced: HashMap<String, (u64, u64)> = HashMap::new();
    for a in agents.iter_mut() {
        a.send(&format!("silence {modulus}")).await?;
    }
    for a in agents.iter_mut() {
        let v = a.expect("silenced", Duration::from_secs(30)).await?;
        let t = v["t_ns"].as_u64().unwrap_or(0);
        for c in v["clients"].as_array().into_iter().flatten() {
            if let (Some(id), Some(last)) = (c[0].as_str(), c[1].as_u64()) {
                silenced.insert(id.to_owned(), (t, last));
            }
        }
    }
    let deadline = Instant::now() + o.detect_within * 2 + Duration::from_secs(5);
    let offline_ids = |server: &Agent| -> HashSet<String> {
        server
            .presence
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|v| v["ev"] == "offline")
                    .filter_map(|v| v["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    loop {
        let off = offline_ids(&server);
        let done = silenced.keys().filter(|id| off.contains(*id)).count();
        eprintln!(
            "  detecting: {done}/{} silenced clients offline, {} other offline",
            silenced.len(),
            off.len() - done
        );
        if done == silenced.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Keep the load on a little longer: false Offlines would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m1 = server.ask("metrics", "metrics").await?;
    let cpu1 = sys::cpu_secs(server.pid)?;
    let load_secs = tl0.elapsed().as_secs_f64();
    for a in load_agents.iter_mut() {
        a.ask("unload", "unloaded").await?;
    }
    let rss_end = sys::rss_bytes(server.pid)?;
    let events: Vec<Value> = server
        .presence
        .lock()
        .map(|p| p[base_presence.min(p.len())..].to_vec())
        .unwrap_or_default();
    for a in agents.into_iter().chain(load_agents) {
        a.quit().await;
    }
    server.quit().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut since_last = Vec::new();
    let mut since_hole = Vec::new();
    let mut silent = Vec::new();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let mut false_reasons: HashMap<String, usize> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut false_off = 0;
    let mut false_suspect = 0;
    let mut lagged = 0;
    let mut within = 0;
    for e in &events {
        let id = e["id"].as_str().unwrap_or("");
        match e["ev"].as_str() {
            Some("offline") => match silenced.get(id) {
                Some(&(t_hole, last)) if seen.insert(id) => {
                    let at = e["at_ns"].as_u64().unwrap_or(0);
                    let sl = (at as f64 - last as f64) / 1e6;
                    since_last.push(sl);
                    since_hole.push((at as f64 - t_hole as f64) / 1e6);
                    silent.push(e["silent_ms"].as_f64().unwrap_or(f64::NAN));
                    *reasons
                        .entry(e["reason"].as_str().unwrap_or("?").to_owned())
                        .or_default() += 1;
                    if sl <= (dw_ms + 100) as f64 {
                        within += 1;
                    }
                }
                Some(_) => {}
                None => {
                    false_off += 1;
                    *false_reasons
                        .entry(e["detail"].as_str().unwrap_or("?").to_owned())
                        .or_default() += 1;
                }
            },
            Some("suspect") if !silenced.contains_key(id) => false_suspect += 1,
            Some("lagged") => lagged += e["n"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    let msgs =
        m1["msgs_in"].as_u64().unwrap_or(0) as f64 - m0["msgs_in"].as_u64().unwrap_or(0) as f64;
    let r = DetectResult {
        n,
        agents: k,
        connected: n as u64 - failed,
        heartbeat_ms: hb_ms,
        dead_after_ms: dead_ms,
        detect_within_ms: dw_ms,
        silenced: silenced.len(),
        detected: seen.len(),
        missed: silenced.len() - seen.len(),
        offline_reasons: reasons,
        since_last_byte_ms: dist(since_last),
        since_blackhole_ms: dist(since_hole),
        server_silent_for_ms: dist(silent),
        within_bound_plus_100ms: within,
        false_offlines: false_off,
        false_offline_reasons: false_reasons,
        false_suspects: false_suspect,
        presence_events_lagged: lagged,
        loaders,
        msg_size: o.msg_size,
        load_msgs_per_s: msgs / load_secs,
        server_cpu_pct_under_load: (cpu1 - cpu0) / load_secs * 100.0,
        server_rss_end: rss_end,
    };
    Ok(r)
}

fn print_detect(rows: &[DetectResult]) {
    println!("\n== detect: 10% blackholed at once, the rest under message load ==");
    println!(
        "{:>6} {:>8} {:>9} {:>26} {:>26} {:>26} {:>9} {:>6} {:>6} {:>10} {:>8}",
        "N",
        "bound ms",
        "detected",
        "since last byte min/med/p99/max",
        "since blackhole min/med/p99/max",
        "server silent_for min/med/p99/max",
        "≤bound+100",
        "false",
        "susp.",
        "load msg/s",
        "srv CPU"
    );
    let f = |d: &Option<Dist>| {
        d.as_ref().map_or("-".into(), |d| {
            format!("{:.0}/{:.0}/{:.0}/{:.0}", d.min, d.median, d.p99, d.max)
        })
    };
    for r in rows {
        println!(
            "{:>6} {:>8} {:>9} {:>26} {:>26} {:>26} {:>9} {:>6} {:>6} {:>10.0} {:>7.0}%",
            r.n,
            r.detect_within_ms,
            format!("{}/{}", r.detected, r.silenced),
            f(&r.since_last_byte_ms),
            f(&r.since_blackhole_ms),
            f(&r.server_silent_for_ms),
            format!("{}/{}", r.within_bound_plus_100ms, r.silenced),
            r.false_offlines,
            r.false_suspects,
            r.load_msgs_per_s,
            r.server_cpu_pct_under_load
        );
    }
    println!("targets: every silenced client Offline within bound + 100 ms, zero false Offlines");
}

fn print_echo(rows: &[echo::EchoResult]) {
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>12} {:>10}",
        "transport", "size", "RTT p50 µs", "RTT p99 µs", "msgs/s", "MiB/s"
    );
    for r in rows {
        println!(
            "{:<22} {:>6} {:>10.1} {:>10.1} {:>12.0} {:>10.1}",
            r.transport, r.size, r.rtt_p50_us, r.rtt_p99_us, r.msgs_per_s, r.mib_per_s
        );
    }
    for size in [64, 4096] {
        let t = rows
            .iter()
            .find(|r| r.size == size && r.transport == "tether");
        let p = rows
            .iter()
            .find(|r| r.size == size && r.transport != "tether");
        if let (Some(t), Some(p)) = (t, p) {
            println!(
                "{size} B: tether/plain throughput {:.2}× (target ≥ 0.95), RTT p50 {:.2}×",
                t.msgs_per_s / p.msgs_per_s,
                t.rtt_p50_us / p.rtt_p50_us
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution() {
        assert!(dist(vec![]).is_none());
        let d = dist((1..=200).rev().map(f64::from).collect()).unwrap();
        assert_eq!((d.min, d.median, d.max), (1.0, 101.0, 200.0));
        assert_eq!(d.p99, 198.0);
    }

    #[test]
    fn agents_share_the_clients() {
        assert_eq!(agents_for(1000, None), 1);
        assert_eq!(agents_for(19_000, None), 3);
        assert_eq!(agents_for(19_000, Some(4)), 4);
        assert_eq!(agents_for(2, Some(8)), 2);
    }
}
