//! The faults the lab injects, each with the real-world cause it models and where that
//! behaviour is documented (`docs/middlebox-presets.md` carries the sources).

use std::str::FromStr;

use crate::error::LabError;

/// A failure injected into a running connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Fault {
    /// Control: nothing fails. The connection idles three middlebox timeouts on a router
    /// with default conntrack timeouts, then both sides send. Every method must report
    /// *survived* here; a death reported here is a false alarm. (The idle timer closes idle
    /// connections by design and reports *closed idle*.)
    None,
    /// The router forgets an idle flow after the idle timeout and silently drops every later
    /// packet of it, in both directions. Models **Azure Load Balancer** (default idle timeout
    /// 240 s, silent drop) and **Azure outbound SNAT / NAT gateway** (240 s); also AWS
    /// Network Firewall (350 s, silent). Sources: learn.microsoft.com/azure/load-balancer/
    /// load-balancer-tcp-idle-timeout; MicrosoftDocs nat-gateway-resource.md;
    /// docs.aws.amazon.com/network-firewall (FlowTimeouts).
    /// Recipe: `nf_conntrack_tcp_timeout_established` = the timeout in the router's
    /// namespace, `nf_conntrack_tcp_loose=0`, `ct state invalid drop` in forward and input.
    NatIdleDrop,
    /// As [`Fault::NatIdleDrop`], but the next packet of the forgotten flow draws a TCP RST,
    /// whichever side sends it. Models **AWS Network Load Balancer** (350 s, "RST to whoever
    /// sends next") and **AWS NAT gateway** (350 s, RST to the inside host that continues).
    /// Sources: docs.aws.amazon.com/elasticloadbalancing/latest/network/
    /// network-load-balancers.html; docs.aws.amazon.com/vpc/latest/userguide/
    /// nat-gateway-troubleshooting.html. Recipe: `ct state invalid reject with tcp reset`.
    NatIdleRst,
    /// Every packet between the hosts vanishes, both ways, with no FIN, RST or ICMP: the
    /// cable is pulled, a phone leaves coverage, the router on the path dies. Recipe: `drop`
    /// in the router's forward hook. Both hosts are alive and both are measured.
    Blackhole,
    /// The peer's host vanishes (power loss, kernel panic, VM deleted): nothing it had
    /// answers, nothing arrives from it, no FIN or RST. The other side is measured. Recipe:
    /// the router drops everything from and to the crashed host.
    HostCrash,
    /// The peer's process is killed with SIGKILL (OOM killer, `kill -9`, a crash). Its kernel
    /// survives and closes the socket: FIN (or RST if data was unread). The peer runs as a
    /// separate process so that the kill is real. The other side is measured.
    ProcessCrash,
    /// The router loses its state while the connection is idle (reboot, failover to a
    /// standby without state sync, conntrack table overflow); later packets of the flow are
    /// INVALID and dropped. Recipe: `conntrack -F` on the router after 1 s of idle, with
    /// `nf_conntrack_tcp_loose=0`. Both sides are measured.
    RouterReboot,
    /// The peer's host reboots: it goes off the network, loses every socket, and comes back
    /// without the connection, so the next segment that reaches it draws an RST. Recipe: the
    /// peer host drops all traffic, its sockets are destroyed (`ss -K`; the RST that causes
    /// is dropped), then it comes back. The other side is measured.
    PeerReboot,
}

/// How a fault plays out over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The connection idles three middlebox timeouts, then both sides send: does the idle
    /// connection survive and deliver? Times are measured from the moment both sides send.
    Idle,
    /// Something breaks at one instant; times are measured from it. Both sides are measured
    /// in one run.
    Path,
    /// The peer of the measured side breaks: each side is measured in its own run, in which
    /// the *other* host is the victim.
    Victim,
}

impl Fault {
    /// Every fault, in display order.
    pub const ALL: [Fault; 8] = [
        Fault::None,
        Fault::NatIdleDrop,
        Fault::NatIdleRst,
        Fault::Blackhole,
        Fault::HostCrash,
        Fault::ProcessCrash,
        Fault::RouterReboot,
        Fault::PeerReboot,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::NatIdleDrop => "nat-idle-drop",
            Fault::NatIdleRst => "nat-idle-rst",
            Fault::Blackhole => "blackhole",
            Fault::HostCrash => "host-crash",
            Fault::ProcessCrash => "process-crash",
            Fault::RouterReboot => "router-reboot",
            Fault::PeerReboot => "peer-reboot",
        }
    }

    /// How the fault plays out.
    pub fn kind(self) -> FaultKind {
        match self {
            Fault::None | Fault::NatIdleDrop | Fault::NatIdleRst => FaultKind::Idle,
            Fault::Blackhole | Fault::RouterReboot => FaultKind::Path,
            Fault::HostCrash | Fault::ProcessCrash | Fault::PeerReboot => FaultKind::Victim,
        }
    }

    /// The real-world cause the fault models, in one line.
    pub fn models(self) -> &'static str {
        match self {
            Fault::None => "control: healthy path, idle 3x the timeout, then traffic",
            Fault::NatIdleDrop => {
                "Azure LB / Azure SNAT: idle flow forgotten, later packets silently dropped"
            }
            Fault::NatIdleRst => {
                "AWS NLB / AWS NAT gateway: idle flow forgotten, next sender gets RST"
            }
            Fault::Blackhole => "cable pulled, out of coverage, router on the path dead",
            Fault::HostCrash => "peer host lost power or panicked: no FIN, no RST",
            Fault::ProcessCrash => "peer process SIGKILLed: its kernel sends FIN",
            Fault::RouterReboot => "router lost its conntrack state while the flow was idle",
            Fault::PeerReboot => {
                "peer host rebooted: back without the connection, next segment draws RST"
            }
        }
    }

    /// Where the modelled behaviour is documented.
    pub fn source(self) -> &'static str {
        match self {
            Fault::None => "-",
            Fault::NatIdleDrop => "learn.microsoft.com/azure/load-balancer/load-balancer-tcp-idle-timeout (240 s, silent); MicrosoftDocs/azure-docs nat-gateway-resource.md (240 s)",
            Fault::NatIdleRst => "docs.aws.amazon.com/elasticloadbalancing/latest/network/network-load-balancers.html (350 s, RST to whoever sends next); docs.aws.amazon.com/vpc/latest/userguide/nat-gateway-troubleshooting.html (350 s, RST)",
            Fault::Blackhole | Fault::HostCrash => "RFC 1122 4.2.3.6 (keepalive exists for exactly this); tcp_retries2 in kernel ip-sysctl.txt (~15 min with data in flight)",
            Fault::ProcessCrash => "the kernel closes a killed process's sockets (FIN, or RST with unread data): tcp(7)",
            Fault::RouterReboot => "kernel nf_conntrack-sysctl.rst (nf_conntrack_tcp_loose=0: no mid-stream pickup); k8s-node row of docs/middlebox-presets.md (INVALID dropped)",
            Fault::PeerReboot => "RFC 793 3.4 (a segment for a connection that does not exist draws a reset)",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Fault, LabError> {
        Fault::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| LabError::Invalid {
                what: "fault",
                value: s.to_string(),
                expected: Fault::ALL.map(Fault::name).join(", "),
            })
    }
}
