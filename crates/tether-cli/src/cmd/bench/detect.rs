//! `tether bench detect`: 10 % of the clients blackholed at once under message load: how
//! long until each is `Offline`, and whether any healthy one is declared dead.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use super::procs::Agent;
use super::{agents_for, connect_clients, sys, DetectOpts};

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
pub(super) struct DetectResult {
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

pub(super) async fn detect_one(n: usize, o: &DetectOpts) -> anyhow::Result<DetectResult> {
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
    let park = v["park_threads"].as_u64().unwrap_or(0);
    println!(
        "\n== detect: N={n}, detect_within {dw_ms} ms (heartbeat {hb_ms} ms, dead_after {dead_ms} ms), \
         10% blackholed, {} loaders × {} B, idle clients at nice {}, park threads {park} ==",
        o.loaders, o.msg_size, o.client_nice
    );
    // The loaders live in their own process: a load generator that starves its own idle
    // clients would make them miss heartbeats and blame the server for it.
    let n_load = o.loaders.min(n / 10).max(1);
    let n_idle = n - n_load;
    let k = agents_for(n_idle, o.detect_agents);
    let (mut agents, connect_secs, failed, err) =
        connect_clients("tether", addr, 0, n_idle, k, hb_ms, dw_ms, &[], None).await?;
    if o.client_nice != 0 {
        for a in &agents {
            match sys::set_nice(a.pid, o.client_nice) {
                Ok(_) => {}
                Err(e) => println!("  note: idle clients keep nice 0 ({e:#})"),
            }
        }
    }
    let (mut load_agents, _, load_failed, _) =
        connect_clients("tether", addr, n_idle, n_load, 1, hb_ms, dw_ms, &[], None).await?;
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
    let mut threads = sys::Threads::new(server.pid);
    let c0 = threads.read()?;
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
    let c1 = threads.read()?;
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
        server_cpu_pct_under_load: c1.cpu_secs_since(&c0) / load_secs * 100.0,
        server_rss_end: rss_end,
    };
    Ok(r)
}

pub(super) fn print_detect(rows: &[DetectResult]) {
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
}
