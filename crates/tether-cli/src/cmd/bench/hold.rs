//! `tether bench hold`: idle clients held by the server (tether or mosquitto): memory and CPU
//! per connection and per heartbeat.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use super::procs::{Agent, Mosquitto};
use super::{agents_for, connect_clients, sys, ClientsOver, HoldOpts, Server};

#[derive(Debug, Clone, Serialize)]
pub(super) struct HoldResult {
    server: Server,
    server_version: String,
    n: usize,
    /// The round (`--rounds`), from 1.
    round: usize,
    /// Held over the same window as the round's other servers (`--together`), not in turn.
    together: bool,
    /// How the clients reached the server (`--clients-over`): on loopback the server's CPU
    /// holds its clients' receive of its answers; over the veth it does not.
    clients_over: ClientsOver,
    /// When the measured clients began to connect and when the hold began, in seconds
    /// since the Unix epoch: with `--together` the servers' connects are a heartbeat
    /// interval divided by their number apart, and their holds begin together.
    connect_started_unix_s: f64,
    hold_started_unix_s: f64,
    agents: usize,
    connected: u64,
    failed: u64,
    connect_error: Option<String>,
    connect_secs: f64,
    connects_per_s: f64,
    /// Clients connected before the baseline (`--warmup`), not counted in N.
    warmup: usize,
    /// The server's RSS before any client connected.
    rss_empty: u64,
    /// After the warm-up clients connected: the baseline of the per-connection figures.
    rss_before: u64,
    rss_idle: u64,
    rss_end: u64,
    rss_per_conn: f64,
    rss_end_per_conn: f64,
    /// From the empty server (fixed costs spread over N).
    cold_rss_per_conn: f64,
    /// tether only: malloc'd bytes in use per connection (glibc `mallinfo2`).
    heap_per_conn: Option<f64>,
    kernel_tcp_buffers_per_conn: f64,
    kernel_slab_per_conn_both_ends: Option<f64>,
    hold_secs: f64,
    heartbeat_s: f64,
    cpu_secs: f64,
    /// tether: heartbeat frames received + sent; mosquitto: PINGREQ received + PINGRESP sent.
    liveness_msgs: u64,
    /// `None` when no liveness message was exchanged during the hold (a hold shorter than
    /// a heartbeat interval): there is nothing to divide by.
    cpu_us_per_liveness_msg: Option<f64>,
    /// The server's context switches over the hold (voluntary: a wait; involuntary:
    /// preempted), and the sum per liveness message.
    context_switches: (u64, u64),
    context_switches_per_liveness_msg: Option<f64>,
    /// The share of the machine's CPU time the hypervisor gave to others during the hold
    /// (`/proc/stat` steal over hold × CPUs), in percent; `None` where not counted. A few
    /// percent marks a run the host slowed down.
    steal_pct: Option<f64>,
    /// Server CPU per client per heartbeat interval (the unit that matters to an operator).
    cpu_us_per_client_interval: f64,
    closed_during_hold: u64,
}

/// One server's hold, started: the server runs and its clients are connected and idle.
struct Held {
    server: Server,
    version: String,
    n: usize,
    round: usize,
    pid: u32,
    k: usize,
    tether_agent: Option<Agent>,
    mosq: Option<Mosquitto>,
    /// Removed when the hold ends (the TLS server and clients loaded it).
    _tls_dir: Option<tempfile::TempDir>,
    agents: Vec<Agent>,
    connected: u64,
    failed: u64,
    connect_error: Option<String>,
    connect_secs: f64,
    /// When the measured clients began to connect (their heartbeats follow from then).
    connect_started: Instant,
    connect_started_unix_s: f64,
    rss_empty: u64,
    rss_before: u64,
    rss_idle: u64,
    heap_before: Option<u64>,
    heap_idle: Option<u64>,
    k0: sys::KernelMem,
    k1: sys::KernelMem,
}

/// What the hold window measured of one server.
struct Window {
    started_unix_s: f64,
    hold_secs: f64,
    cpu: f64,
    msgs: u64,
    cs: (u64, u64),
    steal_pct: Option<f64>,
    rss_end: u64,
    together: bool,
}

/// One server's hold from start to end (`--together` off): start, hold, stop.
pub(super) async fn hold_one(
    server: Server,
    n: usize,
    round: usize,
    o: &HoldOpts,
) -> anyhow::Result<HoldResult> {
    let mut h = start(server, n, round, o, None).await?;
    let w = hold(&mut h, o, false).await?;
    finish(h, w, o).await
}

/// The round's servers held at the same time (`--together`): each started in turn, its
/// clients connecting a heartbeat interval divided by the number of servers after the
/// previous server's (so that the clients' heartbeat bursts interleave rather than land
/// together), then all held over one window and stopped. A mosquitto that cannot start is
/// skipped with a message, as in turn.
pub(super) async fn hold_together(
    servers: &[Server],
    n: usize,
    round: usize,
    o: &HoldOpts,
) -> anyhow::Result<Vec<HoldResult>> {
    let gap = o.heartbeat / servers.len().max(1) as u32;
    let mut held = Vec::new();
    let mut next: Option<Instant> = None;
    for &server in servers {
        match start(server, n, round, o, next).await {
            Ok(h) => {
                next = Some(h.connect_started + gap);
                held.push(h);
            }
            Err(e) if server == Server::Mosquitto => {
                eprintln!("mosquitto at N={n} skipped: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }
    println!(
        "\n== hold: {} at the same time, N={n} each, hold {:?} ==",
        held.iter()
            .map(|h| h.server.name())
            .collect::<Vec<_>>()
            .join(" and "),
        o.hold
    );
    let windows = futures::future::try_join_all(held.iter_mut().map(|h| hold(h, o, true))).await?;
    let mut out = Vec::new();
    for (h, w) in held.into_iter().zip(windows) {
        out.push(finish(h, w, o).await?);
    }
    Ok(out)
}

/// Starts the server, connects the warm-up clients, then the N measured ones, reading
/// memory before and after. With `connect_at`, the measured clients connect at it or a
/// whole number of heartbeat intervals after it (`in_phase`): their heartbeats then come
/// in phase with it.
async fn start(
    server: Server,
    n: usize,
    round: usize,
    o: &HoldOpts,
    connect_at: Option<Instant>,
) -> anyhow::Result<Held> {
    println!(
        "\n== hold: {}, N={n}{}, heartbeat {:?}, hold {:?}{}{} ==",
        server.name(),
        if o.rounds > 1 {
            format!(", round {round}/{}", o.rounds)
        } else {
            String::new()
        },
        o.heartbeat,
        o.hold,
        match (server, o.park_threads) {
            (Server::Tether, Some(p)) => format!(", park threads {p}"),
            _ => String::new(),
        },
        match o.clients_over {
            ClientsOver::Loopback => "",
            ClientsOver::Veth => ", clients over veth",
        }
    );
    let net = o.net.as_deref();
    let listen: std::net::IpAddr = match net {
        Some(net) => net.server_addr().into(),
        None => [127, 0, 0, 1].into(),
    };
    let hb_ms = o.heartbeat.as_millis() as u64;
    // The policy around a 30 s heartbeat: detect within 3 heartbeats.
    let dw_ms = hb_ms * 3;
    let mut tether_agent = None;
    let mut mosq = None;
    // Over TLS: the server and the clients load the test certificate from one directory.
    // The directory is removed when this run ends (`tls_dir` drops).
    let tls_dir = match server {
        Server::TetherTls => Some(super::tls_dir()?),
        _ => None,
    };
    let tls: Vec<String> = match &tls_dir {
        Some(d) => vec!["--tls-dir".into(), d.path().to_string_lossy().into_owned()],
        None => Vec::new(),
    };
    let (pid, addr, version) = match server {
        Server::Tether | Server::TetherTls => {
            let mut args: Vec<String> = vec![
                "server".into(),
                "--listen".into(),
                listen.to_string(),
                "--detect-within-ms".into(),
                dw_ms.to_string(),
                "--heartbeat-ms".into(),
                hb_ms.to_string(),
            ];
            args.extend(tls.iter().cloned());
            if let Some(n) = o.park_threads {
                args.extend(["--park-threads".into(), n.to_string()]);
            }
            let mut a = Agent::spawn(&args)?;
            let v = a.expect("listening", Duration::from_secs(10)).await?;
            let addr = v["addr"].as_str().context("no addr")?.parse()?;
            let pid = a.pid;
            tether_agent = Some(a);
            (pid, addr, format!("tether {}", env!("CARGO_PKG_VERSION")))
        }
        Server::Mosquitto => {
            let m = Mosquitto::start(listen).await?;
            let r = (m.pid, m.addr, m.version.clone());
            mosq = Some(m);
            r
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = sys::rss_bytes(pid)?;
    let kind = match server {
        Server::Tether | Server::TetherTls => "tether",
        Server::Mosquitto => "mqtt",
    };
    // The warm-up clients take the ids after the measured ones and stay to the end; their
    // heartbeats are counted with the others' (the server's CPU answers them too).
    let mut warm = Vec::new();
    if o.warmup > 0 {
        let (a, _, failed, err) =
            connect_clients(kind, addr, n, o.warmup, 1, hb_ms, dw_ms, &tls, net).await?;
        if failed > 0 {
            anyhow::bail!(
                "{failed} of {} warm-up clients failed to connect: {}",
                o.warmup,
                err.unwrap_or_default()
            );
        }
        warm = a;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if let Some(at) = connect_at {
        let at = in_phase(at, o.heartbeat, Instant::now());
        tokio::time::sleep_until(at.into()).await;
    }
    let heap_before = heap(&mut tether_agent).await?;
    let rss_before = sys::rss_bytes(pid)?;
    let k0 = sys::kernel_mem();
    let k = agents_for(n, o.agents);
    let connect_started = Instant::now();
    let connect_started_unix_s = unix_s();
    let (measured, connect_secs, failed, connect_error) =
        connect_clients(kind, addr, 0, n, k, hb_ms, dw_ms, &tls, net).await?;
    let mut agents = measured;
    agents.append(&mut warm);
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
    Ok(Held {
        server,
        version,
        n,
        round,
        pid,
        k,
        tether_agent,
        mosq,
        _tls_dir: tls_dir,
        agents,
        connected,
        failed,
        connect_error,
        connect_secs,
        connect_started,
        connect_started_unix_s,
        rss_empty,
        rss_before,
        rss_idle,
        heap_before,
        heap_idle,
        k0,
        k1,
    })
}

/// Holds the idle clients for `--hold`, measuring the server's CPU and the liveness
/// messages; prints progress every 10 s (named by server when `together`).
async fn hold(h: &mut Held, o: &HoldOpts, together: bool) -> anyhow::Result<Window> {
    let tether = h.tether_agent.is_some();
    let who = if together {
        format!(" {}", h.server.name())
    } else {
        String::new()
    };
    let mut threads = sys::Threads::new(h.pid);
    let c0 = threads.read()?;
    let steal0 = sys::steal_secs();
    let hb0 = liveness_count(&mut h.agents, tether).await?;
    let t0 = Instant::now();
    let started_unix_s = unix_s();
    while t0.elapsed() < o.hold {
        let left = o.hold.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
        let hb = liveness_count(&mut h.agents, tether).await?;
        eprintln!(
            "  holding{who}: {:.0}/{:.0} s, {} liveness messages, server CPU {:.2} s",
            t0.elapsed().as_secs_f64(),
            o.hold.as_secs_f64(),
            hb - hb0,
            threads.read()?.cpu_secs_since(&c0)
        );
    }
    let hb1 = liveness_count(&mut h.agents, tether).await?;
    let c1 = threads.read()?;
    let steal1 = sys::steal_secs();
    let hold_secs = t0.elapsed().as_secs_f64();
    Ok(Window {
        started_unix_s,
        hold_secs,
        cpu: c1.cpu_secs_since(&c0),
        msgs: hb1 - hb0,
        cs: c1.switches_since(&c0),
        steal_pct: match (steal0, steal1) {
            (Some(a), Some(b)) => Some((b - a).max(0.0) * 100.0 / hold_secs),
            _ => None,
        },
        rss_end: sys::rss_bytes(h.pid)?,
        together,
    })
}

/// Stops the clients and the server, and puts the figures together.
async fn finish(h: Held, w: Window, o: &HoldOpts) -> anyhow::Result<HoldResult> {
    let mut closed = 0;
    let mut agents = h.agents;
    for a in agents.iter_mut() {
        closed += a.ask("stats", "stats").await?["closed"]
            .as_u64()
            .unwrap_or(0);
    }
    for a in agents {
        a.quit().await;
    }
    if let Some(t) = h.tether_agent {
        t.quit().await;
    }
    if let Some(m) = h.mosq {
        m.stop().await;
    }
    // Let the sockets go before the next scenario measures the kernel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (k0, k1) = (h.k0, h.k1);
    let nc = h.connected.max(1) as f64;
    let Window {
        started_unix_s,
        hold_secs,
        cpu,
        msgs,
        cs,
        steal_pct,
        rss_end,
        together,
    } = w;
    let intervals = nc * hold_secs / o.heartbeat.as_secs_f64();
    let r = HoldResult {
        server: h.server,
        server_version: h.version,
        n: h.n,
        round: h.round,
        together,
        clients_over: o.clients_over,
        connect_started_unix_s: h.connect_started_unix_s,
        hold_started_unix_s: started_unix_s,
        agents: h.k,
        connected: h.connected,
        failed: h.failed,
        connect_error: h.connect_error,
        connect_secs: h.connect_secs,
        connects_per_s: h.connected as f64 / h.connect_secs.max(1e-9),
        warmup: o.warmup,
        rss_empty: h.rss_empty,
        rss_before: h.rss_before,
        rss_idle: h.rss_idle,
        rss_end,
        rss_per_conn: (h.rss_idle as f64 - h.rss_before as f64) / nc,
        rss_end_per_conn: (rss_end as f64 - h.rss_before as f64) / nc,
        cold_rss_per_conn: (h.rss_idle as f64 - h.rss_empty as f64) / (nc + o.warmup as f64),
        heap_per_conn: match (h.heap_before, h.heap_idle) {
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
        cpu_us_per_liveness_msg: (msgs > 0).then(|| cpu * 1e6 / msgs as f64),
        context_switches: cs,
        context_switches_per_liveness_msg: (msgs > 0).then(|| (cs.0 + cs.1) as f64 / msgs as f64),
        steal_pct,
        cpu_us_per_client_interval: cpu * 1e6 / intervals.max(1.0),
        closed_during_hold: closed,
    };
    println!(
        "  {}{}",
        if together {
            format!("{}: ", r.server.name())
        } else {
            String::new()
        },
        hold_summary(&r)
    );
    Ok(r)
}

/// The first instant from `now` on that is a whole number of heartbeat intervals after
/// `at` (`at` itself if it has not passed): clients connected then heartbeat in phase with
/// `at`.
fn in_phase(at: Instant, heartbeat: Duration, now: Instant) -> Instant {
    let late = now.saturating_duration_since(at);
    if late.is_zero() || heartbeat.is_zero() {
        return at.max(now);
    }
    let periods = late.as_nanos().div_ceil(heartbeat.as_nanos());
    at + heartbeat * u32::try_from(periods).unwrap_or(u32::MAX)
}

/// Now, in seconds since the Unix epoch.
fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The tether server's heap in use (`None` for mosquitto).
async fn heap(tether: &mut Option<Agent>) -> anyhow::Result<Option<u64>> {
    match tether {
        Some(t) => Ok(t.ask("metrics", "metrics").await?["heap"].as_u64()),
        None => Ok(None),
    }
}

/// Liveness messages handled so far, counted by the clients for both servers so that the
/// count costs the measured server nothing: tether heartbeats the clients sent + received
/// (= the server's heartbeats in + out on loopback); for mosquitto, PINGREQ in + PINGRESP out
/// (answered pings × 2). Asking the tether server's metrics instead walked every client in
/// the server process, every 10 s, and charged that walk to tether's CPU per message.
async fn liveness_count(agents: &mut [Agent], tether: bool) -> anyhow::Result<u64> {
    let mut total = 0;
    for a in agents.iter_mut() {
        let s = a.ask("stats", "stats").await?;
        total += if tether {
            s["hb_out"].as_u64().unwrap_or(0) + s["hb_in"].as_u64().unwrap_or(0)
        } else {
            s["pings"].as_u64().unwrap_or(0) * 2
        };
    }
    Ok(total)
}

pub(super) fn print_hold(rows: &[HoldResult]) {
    println!(
        "\n== hold: idle clients, heartbeat/keepalive {} s ==",
        rows.first().map_or(30.0, |r| r.heartbeat_s)
    );
    println!(
        "{:<10} {:>6} {:>5} {:>9} {:>11} {:>11} {:>11} {:>10} {:>11} {:>10} {:>12} {:>13} {:>7}",
        "server",
        "N",
        "round",
        "conn/s",
        "RSS/conn B",
        "end RSS/c",
        "cold RSS/c",
        "heap/c",
        "kern buf/c",
        "slab/c*",
        "CPU µs/msg",
        "CPU µs/cl/hb",
        "closed"
    );
    for r in rows {
        println!(
            "{:<10} {:>6} {:>5} {:>9.0} {:>11.0} {:>11.0} {:>11.0} {:>10} {:>11.0} {:>10} {:>12} {:>13.2} {:>7}",
            r.server.name(),
            r.n,
            r.round,
            r.connects_per_s,
            r.rss_per_conn,
            r.rss_end_per_conn,
            r.cold_rss_per_conn,
            r.heap_per_conn.map_or("-".into(), |v| format!("{v:.0}")),
            r.kernel_tcp_buffers_per_conn,
            r.kernel_slab_per_conn_both_ends
                .map_or("-".into(), |v| format!("{v:.0}")),
            r.cpu_us_per_liveness_msg
                .map_or("-".into(), |v| format!("{v:.2}")),
            r.cpu_us_per_client_interval,
            r.closed_during_hold
        );
    }
    let rounds = rows.iter().map(|r| r.round).max().unwrap_or(1);
    let ns: std::collections::BTreeSet<usize> = rows.iter().map(|r| r.n).collect();
    for &n in &ns {
        let vs = pairs(rows, n, Server::Tether, Server::Mosquitto);
        for (t, m) in &vs {
            println!(
                "tether/mosquitto at N={n}{}{}: RSS/conn {:.2}× (issue 17: < 0.8×), CPU/msg {} (issue 17: ≤ 0.75×), connect rate {:.2}×{}",
                round_label(t.round, rounds),
                if t.together && m.together { ", held together" } else { "" },
                t.rss_per_conn / m.rss_per_conn,
                cpu_ratio(t, m).map_or_else(
                    || "n/a (no liveness messages during the hold)".to_owned(),
                    |r| format!("{r:.2}×")
                ),
                t.connects_per_s / m.connects_per_s,
                match (t.steal_pct, m.steal_pct) {
                    (Some(a), Some(b)) => format!(" (host steal {a:.1} / {b:.1} %)"),
                    _ => String::new(),
                }
            );
        }
        if vs.len() > 1 {
            let rss: Vec<f64> = vs
                .iter()
                .map(|(t, m)| t.rss_per_conn / m.rss_per_conn)
                .collect();
            let cpu: Vec<f64> = vs.iter().filter_map(|(t, m)| cpu_ratio(t, m)).collect();
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "tether/mosquitto at N={n}, median of {} rounds: RSS/conn {} ({}), CPU/msg {} ({})",
                vs.len(),
                median(&rss).map_or("n/a".into(), |x| format!("{x:.2}×")),
                list(&rss),
                median(&cpu).map_or("n/a".into(), |x| format!("{x:.2}×")),
                list(&cpu),
            );
        }
    }
    for &n in &ns {
        for (t, s) in pairs(rows, n, Server::Tether, Server::TetherTls) {
            println!(
                "tether-tls/tether at N={n}{}: RSS/conn {:.0} B vs {:.0} B ({:+.0} B per TLS connection), CPU/msg {}, connect rate {:.2}×",
                round_label(t.round, rounds),
                s.rss_per_conn,
                t.rss_per_conn,
                s.rss_per_conn - t.rss_per_conn,
                cpu_ratio(s, t).map_or_else(
                    || "n/a (no liveness messages during the hold)".to_owned(),
                    |r| format!("{r:.2}×")
                ),
                s.connects_per_s / t.connects_per_s
            );
        }
    }
    println!("* slab/c: kernel TCP + sock_inode_cache slabs per connection, both ends (the clients run on this machine)");
    if let Some(w) = rows.first().map(|r| r.warmup).filter(|&w| w > 0) {
        println!(
            "RSS/conn, end RSS/c, heap/c: what N clients cost after {w} warm-up clients connected \
             (--warmup); cold RSS/c: from the empty server, fixed costs spread over N + {w}"
        );
    }
}

/// The rows of servers `a` and `b` at `n` from the same round, in round order.
fn pairs(rows: &[HoldResult], n: usize, a: Server, b: Server) -> Vec<(&HoldResult, &HoldResult)> {
    let by: HashMap<(usize, usize, Server), &HoldResult> =
        rows.iter().map(|r| ((r.n, r.round, r.server), r)).collect();
    let mut rounds: Vec<usize> = rows.iter().filter(|r| r.n == n).map(|r| r.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    rounds
        .into_iter()
        .filter_map(|k| Some((*by.get(&(n, k, a))?, *by.get(&(n, k, b))?)))
        .collect()
}

/// `a`'s CPU per liveness message over `b`'s; `None` when either had no message to divide by.
fn cpu_ratio(a: &HoldResult, b: &HoldResult) -> Option<f64> {
    Some(a.cpu_us_per_liveness_msg? / b.cpu_us_per_liveness_msg?)
}

/// ", round K" when the run had more than one.
fn round_label(round: usize, rounds: usize) -> String {
    if rounds > 1 {
        format!(", round {round}")
    } else {
        String::new()
    }
}

/// The median (the mean of the middle two for an even count); `None` for none.
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let k = v.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(v[k / 2]),
        _ => Some((v[k / 2 - 1] + v[k / 2]) / 2.0),
    }
}

/// "; host steal X %" (see `HoldResult::steal_pct`), or nothing where not counted.
fn steal_note(pct: Option<f64>) -> String {
    pct.map_or_else(String::new, |p| format!("; host steal {p:.1} %"))
}

/// The one-line result of a hold run. With no liveness message during the hold (a hold
/// shorter than the heartbeat interval) it says so instead of dividing the CPU time by zero.
fn hold_summary(r: &HoldResult) -> String {
    let cpu = match r.cpu_us_per_liveness_msg {
        Some(each) => format!(
            "CPU {:.2} s for {} liveness messages = {each:.1} µs each; {} context switches ({} preempted) = {:.3} each",
            r.cpu_secs,
            r.liveness_msgs,
            r.context_switches.0 + r.context_switches.1,
            r.context_switches.1,
            r.context_switches_per_liveness_msg.unwrap_or(0.0),
        ),
        None => format!(
            "CPU {:.2} s; no liveness messages during the {:.1} s hold (shorter than the {:.0} s heartbeat): \
             no CPU per message to report",
            r.cpu_secs, r.hold_secs, r.heartbeat_s
        ),
    };
    format!(
        "RSS/conn {:.0} B (end of hold {:.0} B; {:.0} B from the empty server), {cpu}{}",
        r.rss_per_conn,
        r.rss_end_per_conn,
        r.cold_rss_per_conn,
        steal_note(r.steal_pct)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(msgs: u64) -> HoldResult {
        HoldResult {
            server: Server::Tether,
            server_version: String::new(),
            n: 1000,
            round: 1,
            together: false,
            clients_over: ClientsOver::Loopback,
            connect_started_unix_s: 0.0,
            hold_started_unix_s: 0.0,
            agents: 1,
            connected: 1000,
            failed: 0,
            connect_error: None,
            connect_secs: 0.1,
            connects_per_s: 10_000.0,
            warmup: 0,
            rss_empty: 0,
            rss_before: 0,
            rss_idle: 0,
            rss_end: 0,
            rss_per_conn: 3700.0,
            rss_end_per_conn: 3700.0,
            cold_rss_per_conn: 3700.0,
            heap_per_conn: None,
            kernel_tcp_buffers_per_conn: 0.0,
            kernel_slab_per_conn_both_ends: None,
            hold_secs: 5.0,
            heartbeat_s: 30.0,
            cpu_secs: 0.0008,
            liveness_msgs: msgs,
            cpu_us_per_liveness_msg: (msgs > 0).then(|| 800.0 / msgs as f64),
            context_switches: (90, 10),
            context_switches_per_liveness_msg: (msgs > 0).then(|| 100.0 / msgs as f64),
            steal_pct: Some(2.5),
            cpu_us_per_client_interval: 0.8,
            closed_during_hold: 0,
        }
    }

    #[test]
    fn a_later_server_connects_in_phase_with_its_slot() {
        let t = Instant::now();
        let hb = Duration::from_secs(30);
        let s = Duration::from_secs;
        // Ready before the slot: at the slot.
        assert_eq!(in_phase(t + s(15), hb, t + s(5)), t + s(15));
        // Ready 2 s after it: the same phase one interval later; exactly on a later one: it.
        assert_eq!(in_phase(t + s(15), hb, t + s(17)), t + s(45));
        assert_eq!(in_phase(t + s(15), hb, t + s(45)), t + s(45));
        assert_eq!(in_phase(t, hb, t + s(61)), t + s(90));
    }

    #[test]
    fn a_hold_without_liveness_messages_says_there_were_none() {
        let s = hold_summary(&result(0));
        assert!(
            s.contains("no liveness messages during the 5.0 s hold"),
            "{s}"
        );
        assert!(!s.contains("µs each"), "{s}");
        let s = hold_summary(&result(2000));
        assert!(s.contains("2000 liveness messages = 0.4 µs each"), "{s}");
        assert!(
            s.contains("100 context switches (10 preempted) = 0.050 each; host steal 2.5 %"),
            "{s}"
        );
    }

    #[test]
    fn rounds_are_compared_within_a_round_and_summed_up_by_their_median() {
        let row = |server, round, cpu: f64| HoldResult {
            server,
            round,
            cpu_us_per_liveness_msg: Some(cpu),
            ..result(1000)
        };
        let rows = [
            row(Server::Tether, 1, 6.0),
            row(Server::Mosquitto, 1, 8.0),
            // Even rounds run mosquitto first.
            row(Server::Mosquitto, 2, 10.0),
            row(Server::Tether, 2, 7.0),
            // A round whose mosquitto failed compares nothing.
            row(Server::Tether, 3, 1.0),
        ];
        let p = pairs(&rows, 1000, Server::Tether, Server::Mosquitto);
        let r: Vec<(usize, f64)> = p
            .iter()
            .map(|(t, m)| (t.round, cpu_ratio(t, m).unwrap()))
            .collect();
        assert_eq!(r, [(1, 0.75), (2, 0.7)]);
        assert!(pairs(&rows, 5000, Server::Tether, Server::Mosquitto).is_empty());
        assert_eq!(median(&[0.75, 0.7]), Some(0.725));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        let none = HoldResult {
            cpu_us_per_liveness_msg: None,
            ..result(0)
        };
        assert_eq!(cpu_ratio(&none, &rows[1]), None);
        assert_eq!(round_label(2, 3), ", round 2");
        assert_eq!(round_label(1, 1), "");
    }
}
