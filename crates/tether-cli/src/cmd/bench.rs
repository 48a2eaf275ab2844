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
mod api;
mod cluster;
mod detect;
mod echo;
mod hold;
mod procs;
mod sys;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};

use detect::{detect_one, print_detect, DetectResult};
use hold::{hold_one, print_hold, HoldResult};
use procs::Agent;

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
    ///
    /// The server's threads for idle clients: `TETHER_PARK_THREADS=N` (as for `tether serve`;
    /// the header names the count in force).
    Detect(DetectArgs),
    /// Round trips and throughput, tether Connection vs tokio + LengthDelimitedCodec.
    Echo(EchoArgs),
    /// The gateway: messages per second from a backend through the HTTP API to N clients,
    /// broadcast fan-out, and client messages through the event stream, with latencies.
    Api(ApiArgs),
    /// The cluster (docs/CLUSTER.md): two `serve --cluster` nodes and a private redis-server;
    /// cross-node send latency and throughput, presence writes per node against N, failover
    /// time after a kill -9. Needs redis-server.
    Cluster(ClusterArgs),
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
    /// Also hold the tether clients over TLS (rustls, the lab's test certificate): a
    /// `tether-tls` row beside the plain one.
    #[arg(long)]
    tls: bool,
    /// Load-generator processes (default: one per 6,500 clients, 1–4).
    #[arg(long)]
    agents: Option<usize>,
    /// Clients connected (and kept) before the baseline memory is read, so that RSS/conn is
    /// what N more clients cost a server that already holds some: what is paid once —
    /// code pages first touched, the lot threads, the allocator's arenas — is not spread
    /// over N. The same for every server; the "cold RSS/c" column counts from the empty
    /// server instead. 0: no warm-up.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// The tether server's threads for idle clients (`tether serve --park-threads`, 1 to
    /// 256; default: one per CPU). `TETHER_PARK_THREADS` sets it too, and reaches the
    /// server of every bench (`detect` and `api` have no flag of their own).
    #[arg(long, value_name = "N", env = "TETHER_PARK_THREADS", value_parser = super::serve::parse_park_threads)]
    park_threads: Option<usize>,
    /// Rounds per client count (1 to 20). The servers run in turn, each round: tether
    /// first in odd rounds, mosquitto first in even ones, so that a machine whose speed
    /// drifts over the run favours neither. The ratios are given per round, then their
    /// median: one round's CPU ratio moves by ±0.1 between runs on a shared machine. Each
    /// run also names the host's steal (CPU time the hypervisor gave to others): a round
    /// with a few percent was slowed down by the host, not by the server.
    #[arg(long, default_value_t = 1, value_parser = parse_rounds)]
    rounds: usize,
    /// Hold a round's servers at the same time instead of in turn, each in its own
    /// processes with its own clients: a machine whose speed drifts from minute to minute
    /// then slows all of them alike, and the CPU ratios hold still between runs. The
    /// servers start one after the other, their measured clients connecting a heartbeat
    /// interval divided by the number of servers apart, so that each server's heartbeat
    /// bursts fall between the others'; then all are held over one window. Memory is read
    /// around each server's own connects, as in turn (the kernel's figures are
    /// machine-wide: they include what the servers started earlier did meanwhile, idle
    /// heartbeats only). Twice the sockets at once: N × 2 (× 3 with --tls) must fit the
    /// machine.
    #[arg(long)]
    together: bool,
    /// Where the clients' connections run. `loopback`: from 127.0.0.x; the kernel then
    /// receives every answer a server writes inside that server's `send`, so its CPU
    /// figure holds its clients' receive (about 40 % of it at 19k), the same for every
    /// server. `veth`: from a network namespace of their own behind one veth pair whose
    /// receive runs in kernel threads (threaded NAPI), so a server's CPU is its own work,
    /// as when its clients are other machines; needs root, iproute2 and ethtool, and the
    /// namespace is deleted when the run ends.
    #[arg(long, value_enum, default_value = "loopback")]
    clients_over: ClientsOver,
    /// The clients' namespace made for `--clients-over veth` when the run starts.
    #[arg(skip)]
    net: Option<std::sync::Arc<tether_lab::ClientNet>>,
}

/// `--clients-over`: how the load generators reach the servers.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum ClientsOver {
    /// Loopback, from 127.0.0.x.
    Loopback,
    /// A veth pair to a namespace of their own, received by kernel threads.
    Veth,
}

fn parse_rounds(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=20) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a round count: give a whole number from 1 to 20"
        )),
    }
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
    /// Nice value of the processes holding the measured (idle) clients; the server and the
    /// loaders stay at 0. The idle clients stand in for devices with CPUs of their own: a
    /// negative value keeps a saturating load from starving them (so a false Offline cannot
    /// be their own late timers). Below 0 needs root. Default: 0 (measured on 2026-11-30:
    /// at -10 the false Offlines under 256 loaders remained, the server's silences caused
    /// them, see BENCHMARKS.md).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    client_nice: i32,
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
    /// Also run the tether transport over TLS (rustls, the lab's test certificate): a
    /// `tether+tls` row beside the plain one.
    #[arg(long = "tls")]
    echo_tls: bool,
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
struct ApiArgs {
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    n: Vec<usize>,
    /// Messages sent through POST /api/clients/{id}/messages per client count.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Broadcasts per client count.
    #[arg(long, default_value_t = 10)]
    broadcasts: usize,
    /// API calls in flight (one HTTP connection each).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Messages each client sends for the event-stream measurement.
    #[arg(long, default_value_t = 10)]
    client_msgs: usize,
}

#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// Client counts on node a, comma-separated (added up to each in turn).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,4000")]
    n: Vec<usize>,
    /// Messages for the throughput measurement (latency: at most 2000, one at a time).
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// API calls in flight for the throughput measurement.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// --cluster-dead-after of the nodes.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    dead_after: Duration,
    /// Idle window over which each node's Redis writes are counted.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    idle: Duration,
    /// Run the nodes with --durable-sessions (every send is copied to Redis first).
    #[arg(long)]
    durable_sessions: bool,
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
    if let BenchCmd::Cluster(c) = args.cmd {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        rt.block_on(cluster::run(cluster::ClusterOpts {
            n: c.n,
            messages: c.messages,
            concurrency: c.concurrency,
            dead_after: c.dead_after,
            idle: c.idle,
            durable: c.durable_sessions,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let BenchCmd::Api(a) = args.cmd {
        // The backend's side gets both cores' worth of threads: it is the load generator.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        return rt.block_on(run_api(a));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(coordinate(args.cmd))
}

async fn run_api(a: ApiArgs) -> anyhow::Result<ExitCode> {
    println!(
        "tether bench api — {} — load {:.2} — {}",
        machine()["cpu"].as_str().unwrap_or("?"),
        sys::loadavg(),
        utc_now()
    );
    let opts = api::ApiOpts {
        messages: a.messages,
        broadcasts: a.broadcasts,
        concurrency: a.concurrency,
        client_msgs: a.client_msgs,
    };
    let mut out = Vec::new();
    for n in a.n {
        println!("api: {n} clients …");
        out.push(api::run_one(n, &opts).await?);
    }
    api::print(&out);
    println!("load after: {:.2}", sys::loadavg());
    Ok(ExitCode::SUCCESS)
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
    let (hold_n, detect_n, mut hold, detect, echo, json) = match cmd {
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
        BenchCmd::Agent(_) | BenchCmd::Api(_) | BenchCmd::Cluster(_) => {
            unreachable!("handled in run")
        }
    };
    if let Some(h) = hold
        .as_mut()
        .filter(|h| h.clients_over == ClientsOver::Veth)
    {
        let net = tokio::task::spawn_blocking(tether_lab::ClientNet::create)
            .await
            .context("the clients' namespace")?
            .context("--clients-over veth: cannot make the clients' namespace")?;
        println!(
            "clients over veth: namespace {}, servers on {} ({} in the root namespace), \
             receive in threaded NAPI",
            net.netns(),
            net.server_addr(),
            net.server_if()
        );
        h.net = Some(std::sync::Arc::new(net));
    }
    if let Some(h) = &hold {
        for &n in &hold_n {
            for round in 1..=h.rounds {
                if h.together {
                    rep.hold
                        .extend(hold::hold_together(&hold_order(h, round), n, round, h).await?);
                    save(&rep, json.as_ref())?;
                    continue;
                }
                for server in hold_order(h, round) {
                    match hold_one(server, n, round, h).await {
                        Ok(r) => rep.hold.push(r),
                        Err(e) if server == Server::Mosquitto => {
                            eprintln!("mosquitto at N={n} skipped: {e:#}")
                        }
                        Err(e) => return Err(e),
                    }
                }
                save(&rep, json.as_ref())?;
            }
        }
    }
    if let Some(d) = &detect {
        for &n in &detect_n {
            rep.detect.push(detect_one(n, d).await?);
            save(&rep, json.as_ref())?;
        }
    }
    if let Some(e) = &echo {
        println!("\n== echo: tether Connection vs tokio + LengthDelimitedCodec ==");
        let opts = echo::EchoOpts {
            rtt_samples: e.rtt_samples,
            messages: e.messages,
            rounds: e.rounds,
            tls: e.echo_tls,
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

/// The servers a hold round runs, in turn: tether (and over TLS), then mosquitto in odd
/// rounds; mosquitto first in even ones (see `HoldOpts::rounds`).
fn hold_order(h: &HoldOpts, round: usize) -> Vec<Server> {
    let mut order = vec![Server::Tether];
    if h.tls {
        order.push(Server::TetherTls);
    }
    if !h.no_mosquitto {
        if round % 2 == 0 {
            order.insert(0, Server::Mosquitto);
        } else {
            order.push(Server::Mosquitto);
        }
    }
    order
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
    /// tether over TLS (`--tls`).
    #[serde(rename = "tether-tls")]
    TetherTls,
    Mosquitto,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Tether => "tether",
            Server::TetherTls => "tether-tls",
            Server::Mosquitto => "mosquitto",
        }
    }
}

/// The test TLS material (`tether_lab::test_tls`) in a directory of this run, for the
/// agents' `--tls-dir`; removed when the returned guard drops (keep it until the agents
/// have loaded it).
fn tls_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("tether-bench-tls-")
        .tempdir()
        .context("cannot create a temporary directory for the test certificate")?;
    tether_lab::test_tls::write(dir.path()).with_context(|| {
        format!(
            "cannot write the test certificate to {}",
            dir.path().display()
        )
    })?;
    Ok(dir)
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
    extra: &[String],
    net: Option<&tether_lab::ClientNet>,
) -> anyhow::Result<(Vec<Agent>, f64, u64, Option<String>)> {
    let salt = SRC_SALT.fetch_add(1, Relaxed);
    let mut agents = Vec::with_capacity(k);
    let mut first = first_id;
    for i in 0..k {
        let count = n / k + usize::from(i < n % k);
        let src: IpAddr = match net {
            Some(net) => net.client_addr(salt * 8 + i).into(),
            None => [127, 0, 0, (2 + (salt * 8 + i) % 250) as u8].into(),
        };
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
        let args: Vec<String> = args.into_iter().chain(extra.iter().cloned()).collect();
        first += count;
        let mut a = Agent::spawn_in(net.map(|n| n.netns()), &args)?;
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
        let row = |name: &str| rows.iter().find(|r| r.size == size && r.transport == name);
        let t = row("tether");
        let p = row("tokio+LengthDelimited");
        if let (Some(t), Some(p)) = (t, p) {
            println!(
                "{size} B: tether/plain throughput {:.2}× (target ≥ 0.95), RTT p50 {:.2}×",
                t.msgs_per_s / p.msgs_per_s,
                t.rtt_p50_us / p.rtt_p50_us
            );
        }
        if let (Some(s), Some(t)) = (row("tether+tls"), t) {
            println!(
                "{size} B: tether+tls/tether throughput {:.2}×, RTT p50 {:.2}×",
                s.msgs_per_s / t.msgs_per_s,
                s.rtt_p50_us / t.rtt_p50_us
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_rounds_alternate_which_server_runs_first() {
        let mut h = HoldOpts {
            hold: Duration::from_secs(1),
            heartbeat: Duration::from_secs(1),
            no_mosquitto: false,
            together: false,
            tls: false,
            agents: None,
            warmup: 0,
            park_threads: None,
            rounds: 2,
            clients_over: ClientsOver::Loopback,
            net: None,
        };
        use Server::*;
        assert_eq!(hold_order(&h, 1), [Tether, Mosquitto]);
        assert_eq!(hold_order(&h, 2), [Mosquitto, Tether]);
        h.tls = true;
        assert_eq!(hold_order(&h, 3), [Tether, TetherTls, Mosquitto]);
        assert_eq!(hold_order(&h, 4), [Mosquitto, Tether, TetherTls]);
        h.no_mosquitto = true;
        assert_eq!(hold_order(&h, 2), [Tether, TetherTls]);
        assert_eq!(parse_rounds("3"), Ok(3));
        for bad in ["0", "21", "x", "-1"] {
            let e = parse_rounds(bad).unwrap_err();
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("1 to 20"),
                "{e}"
            );
        }
    }

    #[test]
    fn agents_share_the_clients() {
        assert_eq!(agents_for(1000, None), 1);
        assert_eq!(agents_for(19_000, None), 3);
        assert_eq!(agents_for(19_000, Some(4)), 4);
        assert_eq!(agents_for(2, Some(8)), 2);
    }
}
