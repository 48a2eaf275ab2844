//! Middlebox idle-timeout presets and OS/stack keepalive defaults, as data.
//!
//! Transcribed from `docs/middlebox-presets.md` (vendor documentation and standards; every row
//! keeps its source). A preset names a *path*: the middlebox between two endpoints that forgets
//! a TCP flow after some idle time. `--path azure-lb` means "this connection crosses an Azure
//! Load Balancer with its default 240 s idle timeout".
//!
//! ```text
//!  client ──── [ NAT / LB / firewall: forgets the flow after `timeout` of silence ] ──── server
//!                             └── at expiry: silent drop, RST, proxy close, …
//! ```
//!
//! [`PathSpec`] is what a user types: a preset name (`azure-lb`), a preset with its configured
//! timeout (`azure-lb=30m`), or just a timeout (`240`, `240s`, `4m`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::duration::{self, Human};

/// What an endpoint experiences when the middlebox forgets an idle flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Expiry {
    /// Packets of the forgotten flow are dropped; nobody is told. A half-open connection.
    SilentDrop,
    /// Silent at expiry; the next segment from either side draws an RST (one way).
    RstToNextSender,
    /// The middlebox sends an RST to both endpoints at expiry.
    RstBoth,
    /// An L7 proxy closes its connections on both sides (FIN or RST from the proxy).
    ProxyClose,
    /// Inbound packets are dropped until the inside host sends; outbound traffic re-creates
    /// the flow (stateful firewall or conntrack with loose pickup).
    OutboundRevives,
    /// The source does not say. Treat as a silent drop and measure with `tether probe`.
    Undocumented,
    /// Not a device but a bound (e.g. the minimum a compliant NAT may use).
    NotApplicable,
}

impl Expiry {
    /// A short lowercase name for tables and JSON (`"silent-drop"`, `"rst-next-sender"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Expiry::SilentDrop => "silent-drop",
            Expiry::RstToNextSender => "rst-next-sender",
            Expiry::RstBoth => "rst-both",
            Expiry::ProxyClose => "proxy-close",
            Expiry::OutboundRevives => "outbound-revives",
            Expiry::Undocumented => "undocumented",
            Expiry::NotApplicable => "n/a",
        }
    }

    /// Whether an endpoint learns nothing at expiry (only a heartbeat or keepalive finds out).
    pub fn is_silent(self) -> bool {
        matches!(
            self,
            Expiry::SilentDrop | Expiry::OutboundRevives | Expiry::Undocumented
        )
    }
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One middlebox idle-timeout preset (a row of the "Paths" table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The name used on the command line (`azure-lb`), lowercase.
    pub name: &'static str,
    /// What it is, in a few words.
    pub title: &'static str,
    /// Default idle timeout.
    pub timeout: Duration,
    /// How the timeout can be configured, as the source states it (`"4–100 min"`, `"fixed"`).
    pub configurable: &'static str,
    /// The same, checked: `NAME=DURATION` must stay within it.
    pub adjustable: Adjustable,
    /// What happens at expiry, classified.
    pub expiry: Expiry,
    /// What happens at expiry, as the source states it.
    pub expiry_text: &'static str,
    /// Whether TCP keepalive probes reset the idle timer. `false` for L7 proxies, where only
    /// application bytes count: there the tether heartbeat is what keeps the flow alive.
    pub tcp_keepalive_counts: bool,
    /// Where the facts come from.
    pub source: &'static str,
}

/// The values a preset's idle timeout can be configured to, as its source documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Adjustable {
    /// Between `min` and `max`, inclusive.
    Range {
        /// The smallest documented value.
        min: Duration,
        /// The largest documented value.
        max: Duration,
    },
    /// Not configurable: only the default exists.
    Fixed,
    /// Configurable, without a documented range (a sysctl, a flag).
    Undocumented,
}

impl Adjustable {
    const fn range(min: Duration, max: Duration) -> Adjustable {
        Adjustable::Range { min, max }
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Every path preset, in the order of `docs/middlebox-presets.md` (its "Paths" table).
pub static PRESETS: &[Preset] = &[
    Preset {
        name: "azure-lb",
        title: "Azure Load Balancer",
        timeout: secs(240),
        configurable: "4–100 min",
        adjustable: Adjustable::range(secs(240), secs(6000)),
        expiry: Expiry::SilentDrop,
        expiry_text: "silent drop",
        tcp_keepalive_counts: true,
        source: "learn.microsoft.com/azure/load-balancer/load-balancer-tcp-idle-timeout",
    },
    Preset {
        name: "azure-lb-rst",
        title: "Azure Load Balancer with TCP reset on idle",
        timeout: secs(240),
        configurable: "4–100 min",
        adjustable: Adjustable::range(secs(240), secs(6000)),
        expiry: Expiry::RstBoth,
        expiry_text: "RST to both client and server at expiry (ESTABLISHED only)",
        tcp_keepalive_counts: true,
        source: "learn.microsoft.com/azure/load-balancer/load-balancer-tcp-reset",
    },
    Preset {
        name: "azure-nat-gw",
        title: "Azure NAT Gateway",
        timeout: secs(240),
        configurable: "4–120 min",
        adjustable: Adjustable::range(secs(240), secs(7200)),
        expiry: Expiry::RstToNextSender,
        expiry_text: "silent; one-way RST to whichever side sends next",
        tcp_keepalive_counts: true,
        source: "MicrosoftDocs/azure-docs articles/nat-gateway/nat-gateway-resource.md",
    },
    Preset {
        name: "azure-vm-outbound",
        title: "Azure VM default outbound / public IP",
        timeout: secs(240),
        configurable: "fixed for outbound-originated flows; inbound 4–30 min",
        adjustable: Adjustable::range(secs(240), secs(1800)),
        expiry: Expiry::Undocumented,
        expiry_text: "undocumented (treat as silent)",
        tcp_keepalive_counts: true,
        source: "learn.microsoft.com/azure/virtual-network/ip-services/public-ip-addresses",
    },
    Preset {
        name: "aks-lb-outbound",
        title: "AKS load balancer outbound",
        timeout: secs(1800),
        configurable: "4–120 min",
        adjustable: Adjustable::range(secs(240), secs(7200)),
        expiry: Expiry::SilentDrop,
        expiry_text: "as Azure LB",
        tcp_keepalive_counts: true,
        source: "Azure AKS load balancer profile idleTimeoutInMinutes",
    },
    Preset {
        name: "aws-nlb",
        title: "AWS Network Load Balancer",
        timeout: secs(350),
        configurable: "60–6000 s (TLS listeners fixed 350 s)",
        adjustable: Adjustable::range(secs(60), secs(6000)),
        expiry: Expiry::RstToNextSender,
        expiry_text: "silent; RST to whoever sends next",
        tcp_keepalive_counts: true,
        source: "docs.aws.amazon.com/elasticloadbalancing/latest/network/network-load-balancers.html",
    },
    Preset {
        name: "aws-nat-gw",
        title: "AWS NAT Gateway",
        timeout: secs(350),
        configurable: "fixed",
        adjustable: Adjustable::Fixed,
        expiry: Expiry::RstToNextSender,
        expiry_text: "RST (not FIN) to the inside host that continues",
        tcp_keepalive_counts: true,
        source: "docs.aws.amazon.com/vpc/latest/userguide/nat-gateway-troubleshooting.html",
    },
    Preset {
        name: "aws-alb",
        title: "AWS Application Load Balancer (L7)",
        timeout: secs(60),
        configurable: "1–4000 s",
        adjustable: Adjustable::range(secs(1), secs(4000)),
        expiry: Expiry::ProxyClose,
        expiry_text: "proxy closes; only payload bytes reset the timer (TCP keepalive and HTTP/2 PING do not)",
        tcp_keepalive_counts: false,
        source: "docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-load-balancer-attributes.html",
    },
    Preset {
        name: "aws-clb",
        title: "AWS Classic Load Balancer (L7 proxy)",
        timeout: secs(60),
        configurable: "1–3600 s",
        adjustable: Adjustable::range(secs(1), secs(3600)),
        expiry: Expiry::ProxyClose,
        expiry_text: "proxy closes; TCP keepalives do not count",
        tcp_keepalive_counts: false,
        source: "docs.aws.amazon.com/elasticloadbalancing/latest/classic/config-idle-timeout.html",
    },
    Preset {
        name: "aws-gwlb",
        title: "AWS Gateway Load Balancer",
        timeout: secs(350),
        configurable: "60–6000 s",
        adjustable: Adjustable::range(secs(60), secs(6000)),
        expiry: Expiry::SilentDrop,
        expiry_text: "silent (RST if send_tcp_reset.on_idle_timeout is enabled)",
        tcp_keepalive_counts: true,
        source: "docs.aws.amazon.com/elasticloadbalancing/latest/gateway/gateway-listeners.html",
    },
    Preset {
        name: "aws-network-firewall",
        title: "AWS Network Firewall",
        timeout: secs(350),
        configurable: "60–6000 s",
        adjustable: Adjustable::range(secs(60), secs(6000)),
        expiry: Expiry::SilentDrop,
        expiry_text: "data dropped silently",
        tcp_keepalive_counts: true,
        source: "docs.aws.amazon.com/network-firewall/latest/APIReference/API_FlowTimeouts.html",
    },
    Preset {
        name: "gcp-cloud-nat",
        title: "Google Cloud NAT",
        timeout: secs(1200),
        configurable: "configurable",
        adjustable: Adjustable::Undocumented,
        expiry: Expiry::Undocumented,
        expiry_text: "undocumented",
        tcp_keepalive_counts: true,
        source: "cloud.google.com/nat/docs/tune-nat-configuration",
    },
    Preset {
        name: "gcp-vpc-firewall",
        title: "Google Cloud VPC firewall (connection tracking)",
        timeout: secs(600),
        configurable: "fixed",
        adjustable: Adjustable::Fixed,
        expiry: Expiry::OutboundRevives,
        expiry_text: "inbound silently denied until the VM sends; outbound revives",
        tcp_keepalive_counts: true,
        source: "cloud.google.com/compute/docs/troubleshooting/general-tips",
    },
    Preset {
        name: "gcp-xlb-backend",
        title: "Google Cloud external HTTP(S) LB, LB to backend (L7)",
        timeout: secs(600),
        configurable: "fixed",
        adjustable: Adjustable::Fixed,
        expiry: Expiry::ProxyClose,
        expiry_text: "LB closes",
        tcp_keepalive_counts: false,
        source: "cloud.google.com/load-balancing/docs/https",
    },
    Preset {
        name: "linux-conntrack",
        title: "Linux conntrack (nf_conntrack_tcp_timeout_established)",
        timeout: secs(432_000),
        configurable: "per-namespace sysctl",
        adjustable: Adjustable::Undocumented,
        expiry: Expiry::OutboundRevives,
        expiry_text: "with loose pickup, outbound revives",
        tcp_keepalive_counts: true,
        source: "kernel Documentation/networking/nf_conntrack-sysctl.rst",
    },
    Preset {
        name: "k8s-node",
        title: "Kubernetes node (kube-proxy conntrack)",
        timeout: secs(86_400),
        configurable: "kube-proxy flag",
        adjustable: Adjustable::Undocumented,
        expiry: Expiry::SilentDrop,
        expiry_text: "as linux-conntrack; INVALID packets dropped",
        tcp_keepalive_counts: true,
        source: "kubernetes.io kube-proxy reference",
    },
    Preset {
        name: "rfc5382-min",
        title: "RFC 5382 minimum for a compliant NAT",
        timeout: secs(7440),
        configurable: "—",
        adjustable: Adjustable::Undocumented,
        expiry: Expiry::NotApplicable,
        expiry_text: "the minimum a compliant NAT may use",
        tcp_keepalive_counts: true,
        source: "RFC 5382 REQ-5",
    },
];

/// Finds a preset by name, case-insensitively (`"Azure-LB"` finds `azure-lb`).
pub fn find(name: &str) -> Option<&'static Preset> {
    let name = name.trim();
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// Preset names close to `name` (edit distance ≤ 3, or one contains the other), closest first.
pub fn close_matches(name: &str) -> Vec<&'static str> {
    let needle = name.trim().to_ascii_lowercase();
    let mut scored: Vec<(usize, &'static str)> = PRESETS
        .iter()
        .filter_map(|p| {
            let d = edit_distance(&needle, p.name);
            let related =
                !needle.is_empty() && (p.name.contains(&needle) || needle.contains(p.name));
            (d <= 3 || related).then_some((if related { d.min(3) } else { d }, p.name))
        })
        .collect();
    scored.sort();
    scored.into_iter().map(|(_, n)| n).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What the user said about the path: a preset, possibly with its configured timeout, or a
/// bare timeout (measured with `tether probe`, or known from elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSpec {
    /// The preset, when the path was named.
    pub preset: Option<&'static Preset>,
    /// The path's idle timeout: the preset's default, the configured override, or the number.
    pub timeout: Duration,
}

impl PathSpec {
    /// A path known only by its idle timeout.
    pub fn from_timeout(timeout: Duration) -> PathSpec {
        PathSpec {
            preset: None,
            timeout,
        }
    }

    /// A preset with its default timeout.
    pub fn from_preset(preset: &'static Preset) -> PathSpec {
        PathSpec {
            preset: Some(preset),
            timeout: preset.timeout,
        }
    }

    /// Parses `NAME`, `NAME=DURATION` (a preset configured to a non-default timeout) or
    /// `DURATION` (bare number = seconds: `240`, `240s`, `4m`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tether_proto::presets::PathSpec;
    /// assert_eq!(PathSpec::parse("azure-lb").unwrap().timeout, Duration::from_secs(240));
    /// assert_eq!(PathSpec::parse("aws-alb=300").unwrap().timeout, Duration::from_secs(300));
    /// assert_eq!(PathSpec::parse("4m").unwrap().timeout, Duration::from_secs(240));
    /// assert!(PathSpec::parse("azur-lb").unwrap_err().to_string().contains("azure-lb"));
    /// ```
    pub fn parse(s: &str) -> Result<PathSpec, PathSpecError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(PathSpecError::Empty);
        }
        let lookup = |name: &str| {
            find(name).ok_or_else(|| PathSpecError::UnknownPreset {
                name: name.trim().to_string(),
                suggestions: close_matches(name),
            })
        };
        let timeout = |v: &str| {
            duration::parse(v).map_err(|source| PathSpecError::BadTimeout {
                input: s.to_string(),
                source,
            })
        };
        if let Some((name, value)) = t.split_once('=') {
            let preset = lookup(name)?;
            let timeout = timeout(value)?;
            match preset.adjustable {
                Adjustable::Range { min, max } if timeout < min || timeout > max => {
                    return Err(PathSpecError::OutOfRange {
                        input: s.trim().to_string(),
                        preset: preset.name,
                        value: timeout,
                        min,
                        max,
                        documented: preset.configurable,
                    });
                }
                Adjustable::Fixed if timeout != preset.timeout => {
                    return Err(PathSpecError::Fixed {
                        input: s.trim().to_string(),
                        preset: preset.name,
                        fixed: preset.timeout,
                    });
                }
                _ => {}
            }
            return Ok(PathSpec {
                preset: Some(preset),
                timeout,
            });
        }
        if t.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
            return Ok(PathSpec::from_timeout(timeout(t)?));
        }
        Ok(PathSpec::from_preset(lookup(t)?))
    }

    /// Whether TCP keepalive probes keep this path alive (`false` for L7 proxy presets;
    /// `true` when unknown, i.e. a bare timeout).
    pub fn tcp_keepalive_counts(&self) -> bool {
        self.preset.is_none_or(|p| p.tcp_keepalive_counts)
    }
}

impl From<Duration> for PathSpec {
    fn from(timeout: Duration) -> PathSpec {
        PathSpec::from_timeout(timeout)
    }
}

impl From<&'static Preset> for PathSpec {
    fn from(preset: &'static Preset) -> PathSpec {
        PathSpec::from_preset(preset)
    }
}

impl FromStr for PathSpec {
    type Err = PathSpecError;
    fn from_str(s: &str) -> Result<PathSpec, PathSpecError> {
        PathSpec::parse(s)
    }
}

impl fmt::Display for PathSpec {
    /// `azure-lb` (default timeout), `azure-lb=30m` (configured), `4m` (bare timeout).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.preset {
            Some(p) if p.timeout == self.timeout => f.write_str(p.name),
            Some(p) => write!(f, "{}={}", p.name, Human(self.timeout)),
            None => write!(f, "{}", Human(self.timeout)),
        }
    }
}

/// Why a `--path` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathSpecError {
    /// Nothing given.
    #[error(
        "empty path: give a preset name (see `tether plan --list`) or an idle timeout such as 240s"
    )]
    Empty,
    /// Not a known preset name.
    #[error("unknown path preset {name:?}{}; `tether plan --list` shows them all", suggest(.suggestions))]
    UnknownPreset {
        /// The name as given.
        name: String,
        /// Close preset names, closest first (may be empty).
        suggestions: Vec<&'static str>,
    },
    /// `NAME=DURATION` outside the preset's documented range.
    #[error("{input}: {} is outside the range documented for {preset}: {}–{} ({documented}); give a bare timeout (--path {}) for a path that is not a {preset}", Human(*.value), Human(*.min), Human(*.max), Human(*.value))]
    OutOfRange {
        /// The whole value as given.
        input: String,
        /// The preset.
        preset: &'static str,
        /// The timeout given.
        value: Duration,
        /// The smallest documented value.
        min: Duration,
        /// The largest documented value.
        max: Duration,
        /// The range as the source states it.
        documented: &'static str,
    },
    /// `NAME=DURATION` for a preset whose timeout cannot be configured.
    #[error("{input}: the idle timeout of {preset} is fixed at {} and cannot be configured; give a bare timeout for a different path", Human(*.fixed))]
    Fixed {
        /// The whole value as given.
        input: String,
        /// The preset.
        preset: &'static str,
        /// Its only timeout.
        fixed: Duration,
    },
    /// The timeout part is not a duration.
    #[error("bad path timeout in {input:?}")]
    BadTimeout {
        /// The whole value as given.
        input: String,
        /// Why the duration did not parse.
        #[source]
        source: duration::DurationError,
    },
}

fn suggest(s: &[&str]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", s.join(", "))
    }
}

/// What an application gets by default from one OS or stack (the "What an application gets
/// by default" table), for comparisons in `tether plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackDefault {
    /// The OS or stack.
    pub stack: &'static str,
    /// Idle time before the first keepalive probe (or heartbeat), when it has one.
    pub first_probe: Option<Duration>,
    /// Time between probes, when it has one.
    pub interval: Option<Duration>,
    /// Number of probes, as the source states it (`"9"`, `"10 (fixed)"`, `"OS"`).
    pub probes: &'static str,
    /// When a dead peer is detected, when it is a single figure.
    pub dead_after: Option<Duration>,
    /// The row as written in the source table (`"2 h 11 m 15 s"`, `"pingTimeout 20 s (45 s)"`).
    pub dead_after_text: &'static str,
    /// Where the facts come from.
    pub source: &'static str,
}

/// OS and stack defaults, in the order of `docs/middlebox-presets.md`.
pub static STACK_DEFAULTS: &[StackDefault] = &[
    StackDefault {
        stack: "Linux",
        first_probe: Some(secs(7200)),
        interval: Some(secs(75)),
        probes: "9",
        dead_after: Some(secs(7875)),
        dead_after_text: "2 h 11 m 15 s",
        source: "kernel ip-sysctl.txt",
    },
    StackDefault {
        stack: "Windows (Vista+)",
        first_probe: Some(secs(7200)),
        interval: Some(secs(1)),
        probes: "10 (fixed)",
        dead_after: Some(secs(7210)),
        dead_after_text: "≈ 2 h 10 s",
        source: "SIO_KEEPALIVE_VALS documentation",
    },
    StackDefault {
        stack: "macOS",
        first_probe: Some(secs(7200)),
        interval: Some(secs(75)),
        probes: "8",
        dead_after: Some(secs(7800)),
        dead_after_text: "2 h 10 m",
        source: "xnu bsd/netinet/tcp_timer.h",
    },
    StackDefault {
        stack: "Go net (1.13+)",
        first_probe: Some(secs(15)),
        interval: Some(secs(15)),
        probes: "9 (Go 1.23 KeepAliveConfig)",
        dead_after: Some(secs(150)),
        dead_after_text: "≈ 150 s",
        source: "Go net package docs",
    },
    StackDefault {
        stack: "Linux, unacked data in flight",
        first_probe: None,
        interval: None,
        probes: "tcp_retries2 = 15",
        dead_after: Some(Duration::from_millis(924_600)),
        dead_after_text: "≥ 924.6 s (≈ 15.5 min observed)",
        source: "ip-sysctl.txt; TCP_USER_TIMEOUT overrides it",
    },
    StackDefault {
        stack: "SuperSocket 1.6",
        first_probe: Some(secs(600)),
        interval: Some(secs(60)),
        probes: "OS",
        dead_after: None,
        dead_after_text: "—",
        source: "SuperSocket configuration docs",
    },
    StackDefault {
        stack: "gRPC client",
        first_probe: None,
        interval: None,
        probes: "—",
        dead_after: None,
        dead_after_text: "off; keepalive_timeout 20 s once enabled; server allows pings every 5 min at most by default",
        source: "gRFC A8",
    },
    StackDefault {
        stack: "MQTT",
        first_probe: None,
        interval: None,
        probes: "—",
        dead_after: None,
        dead_after_text: "keep alive K; server disconnects after 1.5 K of silence",
        source: "MQTT 3.1.1 §3.1.2.10",
    },
    StackDefault {
        stack: "Socket.IO",
        first_probe: Some(secs(25)),
        interval: None,
        probes: "—",
        dead_after: Some(secs(45)),
        dead_after_text: "pingInterval 25 s + pingTimeout 20 s (45 s)",
        source: "socket.io docs",
    },
    StackDefault {
        stack: "SignalR",
        first_probe: Some(secs(15)),
        interval: None,
        probes: "—",
        dead_after: Some(secs(30)),
        dead_after_text: "KeepAliveInterval 15 s, ClientTimeoutInterval 30 s",
        source: "ASP.NET Core docs",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_data_file() {
        assert_eq!(PRESETS.len(), 17);
        let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
        let mut dedup = names.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "duplicate preset name");
        assert_eq!(find("azure-lb").unwrap().timeout, secs(240));
        assert_eq!(find("aws-nlb").unwrap().timeout, secs(350));
        assert_eq!(find("gcp-cloud-nat").unwrap().timeout, secs(1200));
        assert_eq!(find("linux-conntrack").unwrap().timeout, secs(432_000));
        let l7: Vec<_> = PRESETS
            .iter()
            .filter(|p| !p.tcp_keepalive_counts)
            .map(|p| p.name)
            .collect();
        assert_eq!(l7, ["aws-alb", "aws-clb", "gcp-xlb-backend"]);
        for p in PRESETS {
            assert!(!p.source.is_empty() && p.name == p.name.to_ascii_lowercase());
        }
    }

    #[test]
    fn configured_timeouts_stay_within_the_documented_range() {
        for p in PRESETS {
            if let Adjustable::Range { min, max } = p.adjustable {
                assert!(min <= p.timeout && p.timeout <= max, "{}", p.name);
                assert!(PathSpec::parse(&format!("{}={}", p.name, Human(min))).is_ok());
                assert!(PathSpec::parse(&format!("{}={}", p.name, Human(max))).is_ok());
                let below = PathSpec::parse(&format!(
                    "{}={}",
                    p.name,
                    Human(min - Duration::from_millis(1))
                ));
                assert!(
                    matches!(below, Err(PathSpecError::OutOfRange { .. })),
                    "{}",
                    p.name
                );
            }
            // Every preset accepts its own default.
            assert!(
                PathSpec::parse(&format!("{}={}", p.name, Human(p.timeout))).is_ok(),
                "{}",
                p.name
            );
        }
        let e = PathSpec::parse("azure-lb=1m").unwrap_err().to_string();
        assert!(
            e.contains("azure-lb=1m")
                && e.contains("1m")
                && e.contains("4m–1h40m")
                && e.contains("4–100 min"),
            "{e}"
        );
        assert!(PathSpec::parse("azure-lb=101m").is_err());
        assert_eq!(PathSpec::parse("azure-lb=30m").unwrap().timeout, secs(1800));
        let e = PathSpec::parse("aws-nat-gw=10m").unwrap_err().to_string();
        assert!(e.contains("fixed at 5m50s"), "{e}");
        assert!(PathSpec::parse("aws-nat-gw=350s").is_ok());
        assert!(
            PathSpec::parse("linux-conntrack=1h").is_ok(),
            "no documented range"
        );
    }

    #[test]
    fn lookup_is_case_insensitive() {
        assert_eq!(find("AZURE-LB").map(|p| p.name), Some("azure-lb"));
        assert_eq!(find(" Aws-Nlb ").map(|p| p.name), Some("aws-nlb"));
        assert!(find("azure").is_none());
    }

    #[test]
    fn path_spec_forms() {
        let p = PathSpec::parse("azure-lb").unwrap();
        assert_eq!(p.preset.map(|p| p.name), Some("azure-lb"));
        assert_eq!(p.timeout, secs(240));
        assert_eq!(p.to_string(), "azure-lb");

        let p = PathSpec::parse("AWS-ALB=5m").unwrap();
        assert_eq!(p.preset.map(|p| p.name), Some("aws-alb"));
        assert_eq!(p.timeout, secs(300));
        assert_eq!(p.to_string(), "aws-alb=5m");
        assert!(!p.tcp_keepalive_counts());

        for (s, t) in [("240", 240), ("240s", 240), ("4m", 240), ("1.5", 1)] {
            let p: PathSpec = s.parse().unwrap();
            assert_eq!(p.preset, None);
            assert_eq!(p.timeout.as_secs(), t, "{s}");
            assert!(p.tcp_keepalive_counts());
        }
    }

    #[test]
    fn unknown_names_list_close_matches() {
        let err = PathSpec::parse("azur-lb").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"azur-lb\""), "{msg}");
        assert!(msg.contains("did you mean azure-lb"), "{msg}");

        let msg = PathSpec::parse("nlb").unwrap_err().to_string();
        assert!(msg.contains("aws-nlb"), "{msg}");

        let msg = PathSpec::parse("zzzzzzzzzz").unwrap_err().to_string();
        assert!(!msg.contains("did you mean"), "{msg}");
        assert!(msg.contains("tether plan --list"), "{msg}");

        let msg = PathSpec::parse("azure-lb=forever").unwrap_err().to_string();
        assert!(msg.contains("azure-lb=forever"), "{msg}");
        let msg = PathSpec::parse("nope=4m").unwrap_err().to_string();
        assert!(msg.contains("\"nope\""), "{msg}");
    }
}
