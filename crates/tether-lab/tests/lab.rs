//! Lab tests: real namespaces, real conntrack. They need root and nftables/conntrack/iproute2;
//! without them (or with TETHER_LAB_SKIP set) each test reports `SKIP: <test>: <reason>` and returns (scripts/test lists it as skipped).
//!
//! The scenario tests share one parallel run of every cell they need (about a minute of
//! wall time); each test then asserts its own claim on those results.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tether_lab::report::{self, BOUND_SLACK};
use tether_lab::{
    cells, Cell, CellResult, Fault, Lab, Method, Outcome, PeerCommand, Role, Scale, Shape,
};

/// The lab, or `None` after reporting the test as skipped (`SKIP: test: why`).
fn lab(test: &str) -> Option<Lab> {
    if tether_lab::skip_test(test) {
        return None;
    }
    Some(
        Lab::new(Scale::default())
            .peer(PeerCommand::new(env!("CARGO_BIN_EXE_tether-lab-peer"), &[])),
    )
}

/// Every cell the scenario tests need, run once in parallel.
fn shared_results() -> &'static [CellResult] {
    static RESULTS: OnceLock<Vec<CellResult>> = OnceLock::new();
    RESULTS.get_or_init(|| {
        let lab = lab("shared matrix").expect("checked by the caller");
        let mut wanted: BTreeSet<Cell> = BTreeSet::new();
        // Every tether cell, every fault, both topologies.
        wanted.extend(cells(&Fault::ALL, &[Method::Tether], &Shape::ALL));
        // The healthy control with every method.
        wanted.extend(cells(&[Fault::None], &Method::ALL, &Shape::ALL));
        // Seed scenarios (a), (b): idle expiry without tether.
        wanted.extend(cells(
            &[Fault::NatIdleDrop],
            &[Method::OsDefault, Method::OsKeepalive, Method::Keepalive],
            &Shape::ALL,
        ));
        // Seed scenario (c): vanishing peers, naive server.
        wanted.extend(cells(
            &[Fault::Blackhole, Fault::HostCrash],
            &[Method::OsDefault],
            &Shape::ALL,
        ));
        let wanted: Vec<Cell> = wanted.into_iter().collect();
        let started = std::time::Instant::now();
        let results = lab
            .run_matrix(&wanted, 24, &|_| {})
            .expect("the lab environment was checked");
        eprintln!(
            "lab: {} cells in {:.0} s\n{}",
            results.len(),
            started.elapsed().as_secs_f64(),
            report::text_table(&results, lab.scale())
        );
        results
    })
}

fn result(fault: Fault, method: Method, shape: Shape) -> &'static CellResult {
    shared_results()
        .iter()
        .find(|r| r.cell.fault == fault && r.cell.method == method && r.cell.shape == shape)
        .expect("cell is in the shared set")
}

fn assert_no_error(r: &CellResult) {
    for role in [Role::Client, Role::Server] {
        assert!(
            !matches!(r.side(role), Outcome::Error { .. }),
            "{}: {role} run failed: {:?}",
            r.cell,
            r.side(role)
        );
    }
}

/// (a) Server behind a load balancer that silently forgets idle flows: a naive client's
/// next message after the idle period never arrives; with tether the idle connection
/// survives three timeouts and delivers.
#[test]
fn seed_a_inbound_lb_idle_drop() {
    if lab("seed_a_inbound_lb_idle_drop").is_none() {
        return;
    }
    let naive = result(Fault::NatIdleDrop, Method::OsDefault, Shape::InboundLb);
    assert_no_error(naive);
    for role in [Role::Client, Role::Server] {
        assert!(
            matches!(naive.side(role), Outcome::NotDetected { .. }),
            "naive {role} should neither get the message nor notice: {:?}",
            naive.side(role)
        );
    }
    let tether = result(Fault::NatIdleDrop, Method::Tether, Shape::InboundLb);
    assert_eq!(tether.client, Outcome::Survived, "{tether:?}");
    assert_eq!(tether.server, Outcome::Survived, "{tether:?}");
}

/// (b) Bot behind outbound SNAT: the OS default keepalive (first probe after 7200 s) is far
/// too slow for the NAT, so the idle connection is lost; tuned keepalive or tether keep it.
#[test]
fn seed_b_outbound_nat_idle_drop() {
    if lab("seed_b_outbound_nat_idle_drop").is_none() {
        return;
    }
    let scale = Scale::default();
    // The default the OS keepalive runs with, read from a fresh namespace's kernel.
    let topo = tether_lab::Topology::create(Shape::OutboundNat).expect("topology");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.netns(Role::Client),
            "sysctl",
            "-n",
            "net.ipv4.tcp_keepalive_time",
        ])
        .output()
        .expect("sysctl");
    drop(topo);
    let first_probe: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number");
    assert!(
        Duration::from_secs(first_probe) > scale.middlebox_timeout * 3,
        "OS keepalive first probe {first_probe}s should be far beyond the idle phase"
    );
    for method in [Method::OsDefault, Method::OsKeepalive] {
        let r = result(Fault::NatIdleDrop, method, Shape::OutboundNat);
        assert_no_error(r);
        for role in [Role::Client, Role::Server] {
            assert!(
                matches!(r.side(role), Outcome::NotDetected { .. }),
                "{method} {role}: the idle flow should be lost and go unnoticed: {:?}",
                r.side(role)
            );
        }
    }
    for method in [Method::Keepalive, Method::Tether] {
        let r = result(Fault::NatIdleDrop, method, Shape::OutboundNat);
        assert_eq!(r.client, Outcome::Survived, "{r:?}");
        assert_eq!(r.server, Outcome::Survived, "{r:?}");
    }
}

/// (c) Vanishing peers (blackhole, host crash): the naive server never notices; tether's
/// side detects within its bound + 25%, on both sides.
#[test]
fn seed_c_vanishing_peers() {
    if lab("seed_c_vanishing_peers").is_none() {
        return;
    }
    for fault in [Fault::Blackhole, Fault::HostCrash] {
        for shape in Shape::ALL {
            let naive = result(fault, Method::OsDefault, shape);
            assert_no_error(naive);
            assert!(
                matches!(naive.server, Outcome::NotDetected { .. }),
                "{}: naive server noticed: {:?}",
                naive.cell,
                naive.server
            );
            let t = result(fault, Method::Tether, shape);
            let bound = t.bound.expect("tether has a bound");
            for role in [Role::Client, Role::Server] {
                match t.side(role) {
                    Outcome::Detected { after, .. } => assert!(
                        after.as_secs_f64() <= bound.as_secs_f64() * BOUND_SLACK,
                        "{}: {role} detected after {after:?}, bound {bound:?}",
                        t.cell
                    ),
                    other => panic!("{}: {role} did not detect: {other:?}", t.cell),
                }
            }
        }
    }
}

/// Every tether cell: idle faults survive, every other fault is detected within the bound
/// + 25% on both sides; and on the healthy control no method reports a death.
#[test]
fn tether_within_bound_and_no_false_deaths() {
    if lab("tether_within_bound_and_no_false_deaths").is_none() {
        return;
    }
    let results = shared_results();
    let failures = report::check(results);
    assert!(
        failures.is_empty(),
        "checks failed:\n{}",
        failures
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The check covers what it claims to cover.
    let tether = results
        .iter()
        .filter(|r| r.cell.method == Method::Tether)
        .count();
    assert_eq!(tether, Fault::ALL.len() * Shape::ALL.len());
    let control = results
        .iter()
        .filter(|r| r.cell.fault == Fault::None)
        .count();
    assert_eq!(control, Method::ALL.len() * Shape::ALL.len());
    // The idle timer is the one method that closes the healthy idle connection.
    for r in results.iter().filter(|r| r.cell.fault == Fault::None) {
        let closed = matches!(r.client, Outcome::ClosedIdle { .. });
        assert_eq!(closed, r.cell.method == Method::IdleTimer, "{r:?}");
    }
}

fn netns_list() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    // Drop counters and state that change on their own; keep names.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// A topology seen by the hook: its namespace names and the server's address.
type Seen = (Vec<String>, String);

/// Nothing outlives a run: not after a normal run, not after a panic inside a run (with a
/// peer process alive at the time), not after SIGTERM.
#[test]
fn cleanup_after_run_panic_and_signal() {
    let Some(lab) = lab("cleanup_after_run_panic_and_signal") else {
        return;
    };
    let links_before = root_links();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();

    // A normal run.
    let record = seen.clone();
    let recording = lab.clone().on_ready(Arc::new(move |t| {
        let names = t.names().iter().map(|s| s.to_string()).collect();
        record
            .lock()
            .unwrap()
            .push((names, t.listen_addr().to_string()));
    }));
    let r = recording
        .run_cell(Cell {
            fault: Fault::ProcessCrash,
            method: Method::OsDefault,
            shape: Shape::InboundLb,
        })
        .expect("run");
    assert!(matches!(r.client, Outcome::Detected { .. }), "{r:?}");

    // A run that panics while both sides (one of them a peer process) are up.
    let record = seen.clone();
    let panicking = lab.clone().on_ready(Arc::new(move |t| {
        let names = t.names().iter().map(|s| s.to_string()).collect();
        record
            .lock()
            .unwrap()
            .push((names, t.listen_addr().to_string()));
        panic!("injected panic inside a run");
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        panicking.run_cell(Cell {
            fault: Fault::ProcessCrash,
            method: Method::Tether,
            shape: Shape::OutboundNat,
        })
    }));
    assert!(outcome.is_err(), "the hook should have panicked");

    let seen = seen.lock().unwrap().clone();
    // Normal run: two topologies (one per measured side); panicking run: at least one.
    assert!(seen.len() >= 3, "hook saw {} topologies", seen.len());
    let live = netns_list();
    for (names, addr) in &seen {
        for n in names {
            assert!(!live.contains(n), "namespace {n} outlived its run");
        }
        // The peer process (its command line carries the server address) is gone.
        let procs: Vec<String> = processes_mentioning(&format!("--addr {addr}"))
            .into_iter()
            .filter(|p| p.contains("tether-lab-peer"))
            .collect();
        assert!(procs.is_empty(), "peer process outlived its run: {procs:?}");
    }

    // SIGTERM to a process holding a topology.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-lab-peer"))
        .args(["hold", "--topology", "inbound-lb"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tether-lab-peer hold");
    // Keep the child's stdin open until it has exited: `Child::wait` closes it first, and
    // end-of-stdin is the holder's other way out (it would race the signal handler).
    let stdin = child.stdin.take();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("names");
    let names: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    assert_eq!(names.len(), 3, "{line:?}");
    let live = netns_list();
    assert!(
        names.iter().all(|n| live.contains(n)),
        "{names:?} not created"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    drop(stdin);
    assert_eq!(exit.code(), Some(128 + 15), "{exit:?}");
    let live = netns_list();
    for n in &names {
        assert!(!live.contains(n), "namespace {n} survived SIGTERM");
    }

    assert_eq!(root_links(), links_before, "root namespace links changed");
}

/// `tether lab run`-style single cell: the outcomes carry reasons that match the fault.
#[test]
fn reasons_match_faults() {
    if lab("reasons_match_faults").is_none() {
        return;
    }
    let reason = |fault, shape, role| match result(fault, Method::Tether, shape).side(role) {
        Outcome::Detected { reason, .. } => reason.clone(),
        other => panic!("{fault} {shape} {role}: {other:?}"),
    };
    for shape in Shape::ALL {
        // The killed process's kernel sends FIN.
        assert_eq!(
            reason(Fault::ProcessCrash, shape, Role::Client),
            "peer-closed"
        );
        assert_eq!(
            reason(Fault::ProcessCrash, shape, Role::Server),
            "peer-closed"
        );
        // The rebooted peer answers the next segment with RST.
        assert_eq!(reason(Fault::PeerReboot, shape, Role::Client), "peer-reset");
        assert_eq!(reason(Fault::PeerReboot, shape, Role::Server), "peer-reset");
        // Silence: one of the timers.
        for role in [Role::Client, Role::Server] {
            let r = reason(Fault::Blackhole, shape, role);
            assert!(
                ["heartbeat-timeout", "keepalive-timeout", "user-timeout"].contains(&r.as_str()),
                "{r}"
            );
        }
    }
}
