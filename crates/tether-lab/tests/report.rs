//! Reports and checks on synthetic results (no root needed).

use std::time::Duration;

use tether_lab::report::{self, check};
use tether_lab::{Cell, CellResult, Fault, Method, Outcome, Role, Scale, Shape};

fn cell(fault: Fault, method: Method) -> Cell {
    Cell {
        fault,
        method,
        shape: Shape::OutboundNat,
    }
}

fn detected(secs: f64, reason: &str) -> Outcome {
    Outcome::Detected {
        after: Duration::from_secs_f64(secs),
        reason: reason.into(),
    }
}

fn result(fault: Fault, method: Method, client: Outcome, server: Outcome) -> CellResult {
    CellResult {
        cell: cell(fault, method),
        bound: method.bound(&Scale::default()),
        client,
        server,
    }
}

#[test]
fn tether_within_bound_passes_and_late_fails() {
    let ok = result(
        Fault::Blackhole,
        Method::Tether,
        detected(3.0, "heartbeat-timeout"),
        detected(3.7, "heartbeat-timeout"),
    );
    assert!(check(&[ok]).is_empty());
    let late = result(
        Fault::Blackhole,
        Method::Tether,
        detected(3.0, "heartbeat-timeout"),
        detected(3.8, "heartbeat-timeout"),
    );
    let f = check(&[late]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].side, Role::Server);
    let never = result(
        Fault::HostCrash,
        Method::Tether,
        Outcome::NotDetected {
            cap: Duration::from_secs(12),
        },
        detected(1.0, "peer-reset"),
    );
    assert_eq!(check(&[never]).len(), 1);
}

#[test]
fn tether_must_survive_idle_faults() {
    let lost = result(
        Fault::NatIdleDrop,
        Method::Tether,
        Outcome::Survived,
        detected(0.5, "heartbeat-timeout"),
    );
    let f = check(&[lost]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].problem.contains("did not survive"), "{}", f[0].problem);
}

#[test]
fn a_death_on_the_healthy_control_is_a_failure_for_any_method() {
    let false_death = result(
        Fault::None,
        Method::Keepalive,
        detected(2.0, "keepalive-timeout"),
        Outcome::Survived,
    );
    assert_eq!(check(&[false_death]).len(), 1);
    let idle_closed = result(
        Fault::None,
        Method::IdleTimer,
        Outcome::ClosedIdle {
            after: Duration::from_secs(3),
            reason: "idle-timeout".into(),
        },
        Outcome::Survived,
    );
    assert!(check(&[idle_closed]).is_empty());
    // A naive method that never notices a real fault is a finding, not a failure.
    let naive = result(
        Fault::Blackhole,
        Method::OsDefault,
        Outcome::NotDetected {
            cap: Duration::from_secs(12),
        },
        Outcome::NotDetected {
            cap: Duration::from_secs(12),
        },
    );
    assert!(check(&[naive]).is_empty());
    let error = result(
        Fault::Blackhole,
        Method::OsDefault,
        Outcome::Error {
            message: "x".into(),
        },
        Outcome::Survived,
    );
    assert_eq!(check(&[error]).len(), 1);
}

fn sample() -> Vec<CellResult> {
    vec![
        result(
            Fault::Blackhole,
            Method::OsDefault,
            Outcome::NotDetected {
                cap: Duration::from_secs(12),
            },
            Outcome::NotDetected {
                cap: Duration::from_secs(12),
            },
        ),
        result(
            Fault::Blackhole,
            Method::Tether,
            detected(2.95, "heartbeat-timeout"),
            detected(3.01, "keepalive-timeout"),
        ),
        result(
            Fault::NatIdleDrop,
            Method::Tether,
            Outcome::Survived,
            Outcome::Survived,
        ),
    ]
}

#[test]
fn table_has_a_row_per_fault_topology_side_and_the_bounds() {
    let t = report::text_table(&sample(), &Scale::default());
    let lines: Vec<&str> = t.lines().collect();
    // header, rule, bound row, 2 faults x 2 sides
    assert_eq!(lines.len(), 3 + 4, "{t}");
    assert!(
        lines[0].contains("os-default") && lines[0].contains("tether"),
        "{t}"
    );
    assert!(
        lines[2].starts_with("(bound)") && lines[2].contains("3s"),
        "{t}"
    );
    let bh_client = lines
        .iter()
        .find(|l| l.starts_with("blackhole") && l.contains("client"))
        .unwrap();
    assert!(
        bh_client.contains("never (>12s)") && bh_client.contains("3.0s heartbeat"),
        "{t}"
    );
    let bh_server = lines
        .iter()
        .find(|l| l.starts_with("blackhole") && l.contains("server"))
        .unwrap();
    assert!(bh_server.contains("3.0s keepalive"), "{t}");
    assert!(t.contains("survived"));
}

#[test]
fn json_has_one_object_per_cell_and_side() {
    let dir = std::env::temp_dir().join(format!("tether-lab-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.json");
    report::write_json(&sample(), &Scale::default(), &path).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 6);
    let tether_server = rows
        .iter()
        .find(|r| r["method"] == "tether" && r["fault"] == "blackhole" && r["side"] == "server")
        .unwrap();
    assert_eq!(tether_server["outcome"], "detected");
    assert_eq!(tether_server["seconds"], 3.01);
    assert_eq!(tether_server["bound_seconds"], 3.0);
    assert_eq!(tether_server["reason"], "keepalive-timeout");
    assert_eq!(tether_server["topology"], "outbound-nat");
    let naive = rows
        .iter()
        .find(|r| r["method"] == "os-default" && r["side"] == "client")
        .unwrap();
    assert_eq!(naive["outcome"], "not-detected");
    assert!(naive["seconds"].is_null() && naive["bound_seconds"].is_null());

    report::write_dir(
        &sample(),
        &Scale::default(),
        &dir,
        "tether lab matrix",
        Duration::from_secs(40),
    )
    .unwrap();
    let md = std::fs::read_to_string(dir.join("matrix.md")).unwrap();
    assert!(md.contains("| blackhole | outbound-nat | client |"), "{md}");
    assert!(md.contains("scale 1:60"), "{md}");
    let svg = std::fs::read_to_string(dir.join("matrix.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("client detects") && svg.contains("tether"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_round_trip() {
    for f in Fault::ALL {
        assert_eq!(f.name().parse::<Fault>().unwrap(), f);
        assert!(!f.models().is_empty() && !f.source().is_empty());
    }
    for m in Method::ALL {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
    }
    for s in Shape::ALL {
        assert_eq!(s.name().parse::<Shape>().unwrap(), s);
    }
    assert!("netem".parse::<Fault>().is_err());
}

#[test]
fn default_scale_is_valid_and_methods_share_the_policy() {
    let s = Scale::default();
    s.validate().unwrap();
    let p = s.policy();
    assert_eq!(p.dead_after, s.bound);
    assert!(p.heartbeat_interval * 3 <= s.middlebox_timeout, "{p:?}");
    let k = p.keepalive.unwrap();
    assert!(k.idle < s.middlebox_timeout);
    assert_eq!(Method::Keepalive.bound(&s), Some(k.total()));
    assert_eq!(Method::Tether.bound(&s), Some(s.bound));
    assert_eq!(Method::OsDefault.bound(&s), None);
    let bad = Scale {
        middlebox_timeout: Duration::from_millis(1500),
        ..s
    };
    assert!(bad.validate().is_err());
    assert!(s.describe().contains("1:60"));
}
