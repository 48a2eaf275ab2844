//! `tether plan` advice: every preset yields advice, and each stack's snippet carries the
//! values it must (checked against hand-computed figures for known cases).

use std::time::Duration;

use tether_proto::plan::{Plan, StackAdvice, Value};
use tether_proto::policy::Policy;
use tether_proto::presets::{PathSpec, PRESETS};

fn s(v: u64) -> Duration {
    Duration::from_secs(v)
}

fn plan(d: Duration, path: Option<&str>) -> Plan {
    Plan::new(&Policy::derive(d, path.map(|p| PathSpec::parse(p).unwrap())).unwrap())
}

fn stack<'a>(p: &'a Plan, id: &str) -> &'a StackAdvice {
    p.stack(id).unwrap_or_else(|| panic!("no stack {id}"))
}

fn setting(st: &StackAdvice, name: &str) -> Value {
    st.settings
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{} has no setting {name}", st.id))
        .value
        .clone()
}

fn assert_snippet(st: &StackAdvice, parts: &[&str]) {
    for part in parts {
        assert!(
            st.snippet.contains(part),
            "{} snippet lacks {part:?}:\n{}",
            st.id,
            st.snippet
        );
    }
}

fn any_warning(st: &StackAdvice, needle: &str) -> bool {
    st.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn azure_lb_30s() {
    // Policy: heartbeat 10 s, keepalive 15 s + 3 × 5 s, user timeout 30 s.
    let p = plan(s(30), Some("azure-lb"));

    let linux = stack(&p, "linux-socket");
    assert_eq!(setting(linux, "TCP_KEEPIDLE"), Value::Int(15));
    assert_eq!(setting(linux, "TCP_KEEPINTVL"), Value::Int(5));
    assert_eq!(setting(linux, "TCP_KEEPCNT"), Value::Int(3));
    assert_eq!(setting(linux, "TCP_USER_TIMEOUT"), Value::Int(30_000));
    assert_snippet(
        linux,
        &[
            "SO_KEEPALIVE",
            "idle = 15",
            "intvl = 5",
            "cnt = 3",
            "user_timeout_ms = 30000",
            "TCP_USER_TIMEOUT",
        ],
    );
    assert_eq!(linux.gives_up_after, Some(s(30)));
    assert_eq!(linux.keeps_path_open, Some(true));
    assert!(linux.meets_goal(s(30)));
    assert!(linux.warnings.is_empty(), "{:?}", linux.warnings);

    let sysctl = stack(&p, "linux-sysctl");
    assert_snippet(
        sysctl,
        &[
            "net.ipv4.tcp_keepalive_time = 15",
            "net.ipv4.tcp_keepalive_intvl = 5",
            "net.ipv4.tcp_keepalive_probes = 3",
        ],
    );
    assert!(any_warning(sysctl, "host-wide"));

    // Windows: fixed 10 probes, so the interval shrinks to (30 − 15) / 10 = 1.5 s.
    let win = stack(&p, "windows-registry");
    assert_eq!(setting(win, "KeepAliveTime"), Value::Int(15_000));
    assert_eq!(setting(win, "KeepAliveInterval"), Value::Int(1_500));
    assert_eq!(setting(win, "TcpMaxDataRetransmissions"), Value::Int(5));
    assert_snippet(
        win,
        &[
            r"HKLM\SYSTEM\CurrentControlSet\Services\Tcpip\Parameters",
            "KeepAliveTime /t REG_DWORD /d 15000",
            "KeepAliveInterval /t REG_DWORD /d 1500",
            "TcpMaxDataRetransmissions /t REG_DWORD /d 5",
        ],
    );
    assert_eq!(win.gives_up_after, Some(s(30)));
    assert!(any_warning(win, "fixed 10 probes"));

    let wsock = stack(&p, "windows-socket");
    assert_snippet(
        wsock,
        &[
            "TCP_KEEPIDLE",
            "idle = 15",
            "cnt = 3",
            "maxrt = 30",
            "SIO_KEEPALIVE_VALS",
            "keepalivetime 15000",
            "keepaliveinterval 1500",
        ],
    );

    let go = stack(&p, "go");
    assert_snippet(go, &[
        "net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}",
        "unix.TCP_USER_TIMEOUT, 30000",
        "Go 1.23",
    ]);

    let dotnet = stack(&p, "dotnet");
    assert_snippet(
        dotnet,
        &[
            "SocketOptionName.TcpKeepAliveTime, 15)",
            "SocketOptionName.TcpKeepAliveInterval, 5)",
            "SocketOptionName.TcpKeepAliveRetryCount, 3)",
            "SocketOptionName.KeepAlive, true",
            "GetBytes(30000)",
        ],
    );

    let ha = stack(&p, "haproxy");
    assert_snippet(
        ha,
        &[
            "timeout client 30s",
            "timeout server 30s",
            "option tcpka",
            "clitcpka-idle  15s",
            "clitcpka-intvl 5s",
            "clitcpka-cnt   3",
            "srvtcpka-idle  15s",
            "srvtcpka-intvl 5s",
            "srvtcpka-cnt   3",
        ],
    );

    let nginx = stack(&p, "nginx-stream");
    assert_snippet(
        nginx,
        &[
            "so_keepalive=15s:5s:3",
            "proxy_socket_keepalive on;",
            "proxy_timeout 30s;",
        ],
    );
    assert!(any_warning(nginx, "sysctl"));

    // Defaults: the OS keepalive defaults (2 h) lose a 4 min path; Go's 15 s keeps it.
    let linux_default = p.defaults.iter().find(|d| d.stack == "Linux").unwrap();
    assert_eq!(linux_default.keeps_path_open, Some(false));
    let go_default = p
        .defaults
        .iter()
        .find(|d| d.stack.starts_with("Go"))
        .unwrap();
    assert_eq!(go_default.keeps_path_open, Some(true));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("Linux") && w.contains("4m")),
        "{:?}",
        p.warnings
    );
    assert!(
        p.warnings.iter().any(|w| w.contains("silent drop")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn azure_lb_30min_caps_probes_at_a_third_of_the_path() {
    let p = plan(s(1800), Some("azure-lb"));
    assert_eq!(p.policy.heartbeat_interval, s(80));
    let linux = stack(&p, "linux-socket");
    assert_snippet(
        linux,
        &[
            "idle = 80",
            "intvl = 80",
            "cnt = 21",
            "user_timeout_ms = 1800000",
        ],
    );
    let win = stack(&p, "windows-registry");
    assert_eq!(setting(win, "KeepAliveTime"), Value::Int(80_000));
    assert_eq!(setting(win, "KeepAliveInterval"), Value::Int(80_000));
    assert_eq!(win.gives_up_after, Some(s(880)));
    assert_snippet(
        stack(&p, "haproxy"),
        &["timeout client 1800s", "clitcpka-idle  80s"],
    );
}

#[test]
fn l7_proxies_warn_that_tcp_keepalive_does_not_count() {
    for name in ["aws-alb", "aws-clb", "gcp-xlb-backend"] {
        let p = plan(s(30), Some(name));
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains(name) && w.contains("only application bytes")),
            "{name}: {:?}",
            p.warnings
        );
        for id in [
            "linux-socket",
            "linux-sysctl",
            "windows-registry",
            "windows-socket",
            "go",
            "dotnet",
        ] {
            let st = stack(&p, id);
            assert_eq!(st.keeps_path_open, Some(false), "{name} {id}");
            assert!(!st.meets_goal(s(30)));
            assert!(
                any_warning(st, "does not keep"),
                "{name} {id}: {:?}",
                st.warnings
            );
        }
        assert!(p.defaults.iter().all(|d| d.keeps_path_open == Some(false)));
    }
}

#[test]
fn sub_second_bounds_warn_about_kernel_granularity() {
    let p = plan(Duration::from_millis(500), None);
    let linux = stack(&p, "linux-socket");
    assert_eq!(linux.gives_up_after, Some(s(2)));
    assert!(!linux.meets_goal(Duration::from_millis(500)));
    assert!(any_warning(linux, "whole seconds"), "{:?}", linux.warnings);
    assert!(p.warnings.iter().any(|w| w.contains("whole seconds")));
    assert!(p
        .warnings
        .iter()
        .any(|w| w.contains("TCP_USER_TIMEOUT 500ms")));
    assert_snippet(linux, &["user_timeout_ms = 500"]);
    assert_snippet(stack(&p, "haproxy"), &["timeout client 500ms"]);
}

#[test]
fn no_path_means_no_path_verdicts() {
    let p = plan(s(30), None);
    assert!(p.stacks.iter().all(|s| s.keeps_path_open.is_none()));
    assert!(p.defaults.iter().all(|d| d.keeps_path_open.is_none()));
}

#[test]
fn every_preset_yields_complete_advice() {
    for preset in PRESETS {
        for d in [Duration::from_millis(500), s(5), s(30), s(600), s(7200)] {
            let p = plan(d, Some(preset.name));
            assert_eq!(p.stacks.len(), 8);
            for st in &p.stacks {
                // Every integer setting appears verbatim in the snippet.
                for set in &st.settings {
                    if let Value::Int(v) = set.value {
                        assert!(
                            st.snippet.contains(&v.to_string()),
                            "{} {}: {} = {v} missing",
                            preset.name,
                            st.id,
                            set.name
                        );
                    }
                }
                assert!(st.gives_up_after.is_some());
                // A stack that falls short always says why.
                if !st.meets_goal(d) {
                    assert!(
                        !st.warnings.is_empty(),
                        "{} {} falls short silently",
                        preset.name,
                        st.id
                    );
                }
            }
        }
    }
}
