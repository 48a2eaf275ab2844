//! `tether probe` in the lab: a real router with conntrack idle expiry (3 s, 6 s, 10 s; silent
//! drop or RST to the sender), a blackhole during the probe, and a router without an idle
//! timeout. The responder (`tether::Server`) runs in the server namespace, the probe client
//! in the client namespace, each on its own thread with a current-thread runtime so every
//! socket it makes belongs to its namespace.
//!
//! All scenarios run once, in parallel (each in its own namespaces); each test then asserts
//! its claim on its scenario. Without root or the lab tools (or with TETHER_LAB_SKIP set)
//! each test reports `SKIP: <test>: <reason>` and returns (scripts/test lists it as skipped).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tether::probe::{self, Direction, Expiry, ProbeConfig, ProbeReport};
use tether::{Server, ServerConfig};
use tether_lab::topology::{Invalid, RouterConfig};
use tether_lab::{Role, Shape, Topology};

fn skip(test: &str) -> bool {
    tether_lab::skip_test(test)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Scenario {
    /// Router idle timeout (None: the kernel default, days).
    timeout: Option<u64>,
    invalid: Invalid,
    /// Blackhole the router this long after the probe starts.
    blackhole_after: Option<Duration>,
    max: Duration,
}

#[derive(Debug)]
struct Run {
    scenario: Scenario,
    report: ProbeReport,
    /// Probe wall time as seen from outside (set-up of the control connection included).
    wall: Duration,
}

const SCENARIOS: [Scenario; 8] = {
    const fn s(t: u64, invalid: Invalid) -> Scenario {
        Scenario {
            timeout: Some(t),
            invalid,
            blackhole_after: None,
            max: Duration::from_secs(20),
        }
    }
    [
        s(3, Invalid::Drop),
        s(6, Invalid::Drop),
        s(10, Invalid::Drop),
        s(3, Invalid::Reset),
        s(6, Invalid::Reset),
        s(10, Invalid::Reset),
        Scenario {
            timeout: Some(6),
            invalid: Invalid::Drop,
            blackhole_after: Some(Duration::from_secs(2)),
            max: Duration::from_secs(20),
        },
        Scenario {
            timeout: None,
            invalid: Invalid::Drop,
            blackhole_after: None,
            max: Duration::from_secs(3),
        },
    ]
};

fn run_scenario(sc: Scenario) -> Run {
    let topo = Arc::new(Topology::create(Shape::OutboundNat).expect("topology"));
    topo.configure_router(RouterConfig {
        idle_timeout: sc.timeout.map(Duration::from_secs),
        invalid: sc.invalid,
    })
    .expect("router");
    let listen = topo.listen_addr();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tether_lab::spawn_async_in_netns(topo.netns(Role::Server), async move {
        let s = Server::bind(ServerConfig::new(listen)).await.expect("bind");
        let _ = ready_tx.send(());
        let _ = stop_rx.await;
        drop(s);
    });
    ready_rx.recv().expect("server started");
    let blackhole = sc.blackhole_after.map(|after| {
        let topo = topo.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            topo.blackhole().expect("blackhole");
        })
    });
    let cfg = ProbeConfig::new(topo.connect_addr()).max(sc.max);
    let started = Instant::now();
    let report = tether_lab::spawn_async_in_netns(topo.netns(Role::Client), async move {
        probe::run(cfg, |_| {}).await
    })
    .join()
    .expect("probe thread")
    .expect("probe ran");
    let wall = started.elapsed();
    if let Some(b) = blackhole {
        b.join().expect("blackhole thread");
    }
    let _ = stop_tx.send(());
    server.join().expect("server thread");
    Run {
        scenario: sc,
        report,
        wall,
    }
}

/// Every scenario, once, in parallel.
fn runs() -> &'static [Run] {
    static RUNS: OnceLock<Vec<Run>> = OnceLock::new();
    RUNS.get_or_init(|| {
        let handles: Vec<_> = SCENARIOS
            .iter()
            .map(|&sc| std::thread::spawn(move || run_scenario(sc)))
            .collect();
        let runs: Vec<Run> = handles
            .into_iter()
            .map(|h| h.join().expect("scenario thread"))
            .collect();
        for r in &runs {
            let p = &r.report;
            eprintln!(
                "lab probe: timeout {:?} {:?}{}: ({:.3}, {}] conclusive={} wall {:.2} s ({:.2}× T) \
                 cf={:?} sf={:?} note={:?}",
                r.scenario.timeout,
                r.scenario.invalid,
                if r.scenario.blackhole_after.is_some() {
                    " + blackhole"
                } else {
                    ""
                },
                p.lower.as_secs_f64(),
                p.upper
                    .map_or("none".to_string(), |u| format!("{:.3}", u.as_secs_f64())),
                p.conclusive,
                r.wall.as_secs_f64(),
                r.scenario
                    .timeout
                    .map_or(0.0, |t| r.wall.as_secs_f64() / t as f64),
                p.direction(Direction::ClientFirst).and_then(|d| d.expiry),
                p.direction(Direction::ServerFirst).and_then(|d| d.expiry),
                p.note,
            );
        }
        runs
    })
}

fn find(timeout: Option<u64>, invalid: Invalid, blackhole: bool) -> &'static Run {
    runs()
        .iter()
        .find(|r| {
            r.scenario.timeout == timeout
                && r.scenario.invalid == invalid
                && r.scenario.blackhole_after.is_some() == blackhole
        })
        .expect("scenario exists")
}

/// Set-up allowance on top of 1.3 × T: the control connection, opening the first slots
/// (2 ms apart), the grace period of the last test, and scheduling noise of parallel runs.
const SETUP: f64 = 0.8;

fn check_bracket(t: u64, invalid: Invalid) {
    let r = find(Some(t), invalid, false);
    let p = &r.report;
    let t = t as f64;
    assert!(p.conclusive, "{r:?}");
    let (lower, upper) = (
        p.lower.as_secs_f64(),
        p.upper.expect("a bracket").as_secs_f64(),
    );
    assert!(lower < t && t <= upper, "T={t}: ({lower}, {upper}] {r:?}");
    assert!(
        upper - lower <= (0.05 * t).max(0.3),
        "T={t}: ({lower}, {upper}] too wide"
    );
    let want = match invalid {
        Invalid::Drop => Expiry::SilentDrop,
        Invalid::Reset => Expiry::Reset,
    };
    for d in [Direction::ClientFirst, Direction::ServerFirst] {
        let dr = p.direction(d).expect("both directions");
        assert_eq!(dr.expiry, Some(want), "{d:?}: {dr:?}");
        let (l, u) = (dr.lower.as_secs_f64(), dr.upper.unwrap().as_secs_f64());
        assert!(l < t && t <= u, "{d:?}: ({l}, {u}]");
    }
    assert!(
        r.wall.as_secs_f64() <= 1.3 * t + SETUP,
        "T={t}: wall {:?} > 1.3 × T + {SETUP} s",
        r.wall
    );
}

#[test]
fn nat_idle_drop_3s() {
    if !skip("nat_idle_drop_3s") {
        check_bracket(3, Invalid::Drop);
    }
}

#[test]
fn nat_idle_drop_6s() {
    if !skip("nat_idle_drop_6s") {
        check_bracket(6, Invalid::Drop);
    }
}

#[test]
fn nat_idle_drop_10s() {
    if !skip("nat_idle_drop_10s") {
        check_bracket(10, Invalid::Drop);
    }
}

#[test]
fn nat_idle_rst_3s() {
    if !skip("nat_idle_rst_3s") {
        check_bracket(3, Invalid::Reset);
    }
}

#[test]
fn nat_idle_rst_6s() {
    if !skip("nat_idle_rst_6s") {
        check_bracket(6, Invalid::Reset);
    }
}

#[test]
fn nat_idle_rst_10s() {
    if !skip("nat_idle_rst_10s") {
        check_bracket(10, Invalid::Reset);
    }
}

#[test]
fn blackhole_during_probe_is_inconclusive() {
    if skip("blackhole_during_probe_is_inconclusive") {
        return;
    }
    let r = find(Some(6), Invalid::Drop, true);
    assert!(!r.report.conclusive, "{r:?}");
    // Never a wrong bracket: whatever partial bound there is, it is flagged, and it gives
    // up soon after the outage rather than running the ladder out.
    assert!(r.report.note.is_some(), "{r:?}");
    assert!(r.wall < Duration::from_secs(6), "{r:?}");
}

#[test]
fn no_timeout_below_max() {
    if skip("no_timeout_below_max") {
        return;
    }
    let r = find(None, Invalid::Drop, false);
    assert!(r.report.conclusive, "{r:?}");
    assert_eq!(r.report.upper, None, "{r:?}");
    assert!(r.report.lower >= Duration::from_secs(3), "{r:?}");
}
