//! `tether plan`: a [`Policy`] translated into settings for other stacks.
//!
//! Pure data and text: given a validated policy (which carries its path preset, if any),
//! [`Plan::new`] computes, for each stack, the settings that come closest to the same goal
//! (detect a dead peer within `detect_within`, keep the path's idle timer from firing), the
//! time after which that stack gives up on a silent peer, whether it keeps the path open, and
//! a one-line warning wherever it cannot meet the goal.
//!
//! ```text
//!   Policy ──► Plan { warnings, defaults, stacks[] } ──► rendered by the CLI (`tether plan`):
//!                                                        text for people, JSON for scripts
//! ```
//!
//! Stacks: Linux per socket and sysctl, Windows registry and per socket, Go
//! `net.KeepAliveConfig` (1.23+), .NET `Socket` options (Core 3.0+), HAProxy, nginx stream.
//! Presentation (text, JSON, the "why" of each policy value) lives in the CLI; the core keeps
//! the computation.

use std::time::Duration;

use crate::duration::Human;
use crate::policy::{Keepalive, Policy};
use crate::presets::{PathSpec, STACK_DEFAULTS};

/// A setting's value, typed for JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An integer (seconds, milliseconds or a count; the setting's name says which).
    Int(u64),
    /// A switch.
    Bool(bool),
    /// Anything else (a duration with its unit, a path).
    Text(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Text(v) => f.write_str(v),
        }
    }
}

/// One named setting of a stack (`TCP_KEEPIDLE = 15`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The name as the stack spells it.
    pub name: String,
    /// The value in the stack's unit.
    pub value: Value,
}

fn set(name: &str, value: Value) -> Setting {
    Setting {
        name: name.to_string(),
        value,
    }
}

/// Advice for one stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackAdvice {
    /// Short id for scripts (`"linux-socket"`, `"windows-registry"`, `"go"`, …).
    pub id: &'static str,
    /// Heading for people.
    pub title: &'static str,
    /// What the settings apply to (`"per socket"`, `"host-wide"`, …).
    pub scope: &'static str,
    /// The settings, in the stack's own names and units.
    pub settings: Vec<Setting>,
    /// Paste-ready configuration or code.
    pub snippet: String,
    /// When this stack gives up on a silent peer with these settings, if it detects at all.
    pub gives_up_after: Option<Duration>,
    /// Whether these settings keep the path's idle timer from firing (`None`: no path known).
    pub keeps_path_open: Option<bool>,
    /// One line per way this stack falls short of the goal (empty: it meets it).
    pub warnings: Vec<String>,
}

impl StackAdvice {
    /// Detects within `detect_within` and does not let the path expire.
    pub fn meets_goal(&self, detect_within: Duration) -> bool {
        self.gives_up_after.is_some_and(|g| g <= detect_within)
            && self.keeps_path_open != Some(false)
    }
}

/// An OS or stack default, compared with the goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultCheck {
    /// The stack (`"Linux"`, `"Go net (1.13+)"`, …).
    pub stack: &'static str,
    /// First keepalive probe after this much idle time.
    pub first_probe: Duration,
    /// Gives up on a silent peer after this long.
    pub gives_up_after: Duration,
    /// Whether the default keeps the path open (`None`: no path known).
    pub keeps_path_open: Option<bool>,
    /// Where the default comes from.
    pub source: &'static str,
}

/// The advice for one policy: see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The policy the advice is for.
    pub policy: Policy,
    /// Plan-wide warnings (path ignores keepalive, coarse keepalive, …).
    pub warnings: Vec<String>,
    /// What the usual defaults would do on this path.
    pub defaults: Vec<DefaultCheck>,
    /// Per-stack advice.
    pub stacks: Vec<StackAdvice>,
}

/// Windows (Vista+) sends exactly this many keepalive probes when configured through the
/// registry or `SIO_KEEPALIVE_VALS`.
pub const WINDOWS_FIXED_PROBES: u32 = 10;

/// Minimum retransmission timeout assumed for Windows when estimating
/// `TcpMaxDataRetransmissions` (300 ms, the Windows default `MinRto`).
const WINDOWS_MIN_RTO: Duration = Duration::from_millis(300);

impl Plan {
    /// Computes the advice for `policy` (expected to be valid: built by [`Policy::derive`] or
    /// checked with [`Policy::validate`]).
    pub fn new(policy: &Policy) -> Plan {
        let d_w = policy.detect_within;
        let path = policy.path();
        // Other stacks get keepalive even if tether's own is off: it is all they have.
        let ka = policy
            .keepalive
            .unwrap_or_else(|| crate::policy::derive_keepalive(d_w, policy.path_timeout));
        let user_timeout = policy.user_timeout.unwrap_or(d_w);
        let ctx = Ctx {
            d_w,
            path,
            ka,
            user_timeout,
            dead_after: policy.dead_after,
        };

        let mut warnings: Vec<String> = policy.notes().iter().map(|n| n.to_string()).collect();
        if let Some(p) = path.and_then(|p| p.preset) {
            if p.expiry.is_silent() {
                warnings.push(format!(
                    "{}: at expiry, {}: without heartbeats or keepalive both ends keep a dead connection",
                    p.name, p.expiry_text
                ));
            }
        }

        let defaults: Vec<DefaultCheck> = STACK_DEFAULTS
            .iter()
            // TCP keepalive defaults only: those have a first probe, an interval and a bound.
            .filter(|s| s.interval.is_some())
            .filter_map(|s| {
                let first_probe = s.first_probe?;
                Some(DefaultCheck {
                    stack: s.stack,
                    first_probe,
                    gives_up_after: s.dead_after?,
                    keeps_path_open: path
                        .map(|p| p.tcp_keepalive_counts() && first_probe < p.timeout),
                    source: s.source,
                })
            })
            .collect();
        if let Some(p) = path {
            let losers: Vec<&str> = defaults
                .iter()
                .filter(|d| d.keeps_path_open == Some(false))
                .map(|d| d.stack)
                .collect();
            if !losers.is_empty() {
                warnings.push(format!(
                    "defaults of {} do not keep a {} path open: without the settings below, idle connections are lost",
                    losers.join(", "),
                    Human(p.timeout)
                ));
            }
        }

        let stacks = vec![
            ctx.linux_socket(),
            ctx.linux_sysctl(),
            ctx.windows_registry(),
            ctx.windows_socket(),
            ctx.go(),
            ctx.dotnet(),
            ctx.haproxy(),
            ctx.nginx(),
        ];
        Plan {
            policy: policy.clone(),
            warnings,
            defaults,
            stacks,
        }
    }

    /// Finds a stack's advice by id.
    pub fn stack(&self, id: &str) -> Option<&StackAdvice> {
        self.stacks.iter().find(|s| s.id == id)
    }
}

/// Everything the per-stack builders need.
struct Ctx {
    d_w: Duration,
    path: Option<PathSpec>,
    ka: Keepalive,
    user_timeout: Duration,
    dead_after: Duration,
}

impl Ctx {
    /// Whether TCP keepalive with this idle/interval keeps the path open.
    fn ka_keeps_path(&self, idle: Duration, interval: Duration) -> Option<bool> {
        self.path
            .map(|p| p.tcp_keepalive_counts() && idle < p.timeout && interval < p.timeout)
    }

    /// Warnings shared by every stack that relies on TCP keepalive alone.
    fn ka_warnings(&self, gives_up: Duration) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(pr) = self.path.and_then(|p| p.preset) {
            if !pr.tcp_keepalive_counts {
                w.push(format!(
                    "TCP keepalive does not keep {} open (only application bytes count): send application heartbeats at most every {}",
                    pr.name,
                    Human(self.path.map_or(Duration::ZERO, |p| p.timeout) / 3)
                ));
            }
        }
        if gives_up > self.d_w {
            w.push(format!(
                "kernel keepalive counts in whole seconds: gives up after {}, not within {}",
                Human(gives_up),
                Human(self.d_w)
            ));
        }
        w
    }

    fn linux_socket(&self) -> StackAdvice {
        let k = self.ka;
        let ut_ms = millis(self.user_timeout);
        let snippet = format!(
            "int on = 1, idle = {idle}, intvl = {intvl}, cnt = {cnt};\n\
             unsigned int user_timeout_ms = {ut_ms};\n\
             setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);\n\
             setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);   /* seconds */\n\
             setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl); /* seconds */\n\
             setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);\n\
             setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);",
            idle = k.idle.as_secs(),
            intvl = k.interval.as_secs(),
            cnt = k.count,
        );
        StackAdvice {
            id: "linux-socket",
            title: "Linux, per socket (setsockopt)",
            scope: "per socket",
            settings: vec![
                set("SO_KEEPALIVE", Value::Int(1)),
                set("TCP_KEEPIDLE", Value::Int(k.idle.as_secs())),
                set("TCP_KEEPINTVL", Value::Int(k.interval.as_secs())),
                set("TCP_KEEPCNT", Value::Int(u64::from(k.count))),
                set("TCP_USER_TIMEOUT", Value::Int(ut_ms)),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings: self.ka_warnings(k.total()),
        }
    }

    fn linux_sysctl(&self) -> StackAdvice {
        let k = self.ka;
        let snippet = format!(
            "# /etc/sysctl.d/90-keepalive.conf, then: sysctl --system\n\
             net.ipv4.tcp_keepalive_time = {}\n\
             net.ipv4.tcp_keepalive_intvl = {}\n\
             net.ipv4.tcp_keepalive_probes = {}",
            k.idle.as_secs(),
            k.interval.as_secs(),
            k.count
        );
        let mut warnings = vec![
            "sysctl is host-wide (per network namespace): it changes every socket that enables SO_KEEPALIVE without its own values, and applications must still enable SO_KEEPALIVE".to_string(),
            "no sysctl sets TCP_USER_TIMEOUT: data stuck in flight waits for net.ipv4.tcp_retries2 (≈ 15 min by default); set it per socket".to_string(),
        ];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "linux-sysctl",
            title: "Linux, host-wide (sysctl)",
            scope: "host-wide",
            settings: vec![
                set("net.ipv4.tcp_keepalive_time", Value::Int(k.idle.as_secs())),
                set(
                    "net.ipv4.tcp_keepalive_intvl",
                    Value::Int(k.interval.as_secs()),
                ),
                set(
                    "net.ipv4.tcp_keepalive_probes",
                    Value::Int(u64::from(k.count)),
                ),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }

    /// Windows keepalive interval for a fixed 10 probes: the policy's interval, or less so
    /// that idle + 10 × interval fits the bound (registry values are milliseconds), ≥ 100 ms.
    fn windows_interval(&self) -> Duration {
        let room = self.d_w.saturating_sub(self.ka.idle) / WINDOWS_FIXED_PROBES;
        let ms = Duration::from_millis(millis(room.min(self.ka.interval)));
        ms.max(Duration::from_millis(100))
    }

    fn windows_registry(&self) -> StackAdvice {
        let k = self.ka;
        let intvl = self.windows_interval();
        let gives_up = k.idle + intvl * WINDOWS_FIXED_PROBES;
        let retrans = windows_max_data_retransmissions(self.user_timeout);
        let key = r"HKLM\SYSTEM\CurrentControlSet\Services\Tcpip\Parameters";
        let snippet = format!(
            "rem values in milliseconds; reboot to apply\n\
             reg add {key} /v KeepAliveTime /t REG_DWORD /d {} /f\n\
             reg add {key} /v KeepAliveInterval /t REG_DWORD /d {} /f\n\
             reg add {key} /v TcpMaxDataRetransmissions /t REG_DWORD /d {retrans} /f",
            millis(k.idle),
            millis(intvl),
        );
        let mut warnings = vec![
            format!(
                "Windows (Vista+) sends a fixed {WINDOWS_FIXED_PROBES} probes: gives up after KeepAliveTime + 10 × KeepAliveInterval = {}",
                Human(gives_up)
            ),
            format!(
                "registry values are host-wide, need a reboot, and only apply to sockets that enable SO_KEEPALIVE; TcpMaxDataRetransmissions {retrans} ≈ {} assumes a {} minimum RTO",
                Human(windows_retrans_time(retrans)),
                Human(WINDOWS_MIN_RTO)
            ),
        ];
        warnings.extend(self.ka_warnings(gives_up));
        StackAdvice {
            id: "windows-registry",
            title: "Windows, host-wide (registry)",
            scope: "host-wide",
            settings: vec![
                set("KeepAliveTime", Value::Int(millis(k.idle))),
                set("KeepAliveInterval", Value::Int(millis(intvl))),
                set("TcpMaxDataRetransmissions", Value::Int(u64::from(retrans))),
                set("key", Value::Text(key.to_string())),
            ],
            snippet,
            gives_up_after: Some(gives_up),
            keeps_path_open: self.ka_keeps_path(k.idle, intvl),
            warnings,
        }
    }

    fn windows_socket(&self) -> StackAdvice {
        let k = self.ka;
        let maxrt = self.user_timeout.as_secs().max(1);
        let snippet = format!(
            "// Windows 10 1709+: same values as Linux, in seconds\n\
             DWORD on = 1, idle = {idle}, intvl = {intvl}, cnt = {cnt}, maxrt = {maxrt};\n\
             setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, (char*)&on, sizeof on);\n\
             setsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, (char*)&idle, sizeof idle);\n\
             setsockopt(s, IPPROTO_TCP, TCP_KEEPINTVL, (char*)&intvl, sizeof intvl);\n\
             setsockopt(s, IPPROTO_TCP, TCP_KEEPCNT, (char*)&cnt, sizeof cnt);   // 1703+\n\
             setsockopt(s, IPPROTO_TCP, TCP_MAXRT, (char*)&maxrt, sizeof maxrt); // ≈ TCP_USER_TIMEOUT\n\
             // older Windows: WSAIoctl SIO_KEEPALIVE_VALS {{ onoff 1, keepalivetime {}, keepaliveinterval {} }} (ms, fixed 10 probes)",
            millis(k.idle),
            millis(self.windows_interval()),
            idle = k.idle.as_secs(),
            intvl = k.interval.as_secs(),
            cnt = k.count,
        );
        let mut warnings = vec![
            "TCP_KEEPIDLE/TCP_KEEPINTVL need Windows 10 1709+ and TCP_KEEPCNT 1703+; before that only SIO_KEEPALIVE_VALS exists, with a fixed 10 probes".to_string(),
        ];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "windows-socket",
            title: "Windows, per socket (setsockopt)",
            scope: "per socket",
            settings: vec![
                set("SO_KEEPALIVE", Value::Int(1)),
                set("TCP_KEEPIDLE", Value::Int(k.idle.as_secs())),
                set("TCP_KEEPINTVL", Value::Int(k.interval.as_secs())),
                set("TCP_KEEPCNT", Value::Int(u64::from(k.count))),
                set("TCP_MAXRT", Value::Int(maxrt)),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }

    fn go(&self) -> StackAdvice {
        let k = self.ka;
        let snippet = format!(
            "// Go 1.23+\n\
             cfg := net.KeepAliveConfig{{Enable: true, Idle: {}, Interval: {}, Count: {}}}\n\
             d := net.Dialer{{KeepAliveConfig: cfg}}       // outgoing connections\n\
             lc := net.ListenConfig{{KeepAliveConfig: cfg}} // accepted connections\n\
             // existing connection: conn.(*net.TCPConn).SetKeepAliveConfig(cfg)\n\
             // TCP_USER_TIMEOUT (Linux, golang.org/x/sys/unix) in Dialer.Control / ListenConfig.Control:\n\
             //   c.Control(func(fd uintptr) {{ unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, {}) }})",
            go_duration(k.idle),
            go_duration(k.interval),
            k.count,
            millis(self.user_timeout)
        );
        let mut warnings = vec![
            "on Windows before 10 1709, Go falls back to SIO_KEEPALIVE_VALS: Count is ignored and 10 probes are sent".to_string(),
        ];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "go",
            title: "Go (net.KeepAliveConfig, Go 1.23+)",
            scope: "per connection",
            settings: vec![
                set("Enable", Value::Bool(true)),
                set("Idle", Value::Text(Human(k.idle).to_string())),
                set("Interval", Value::Text(Human(k.interval).to_string())),
                set("Count", Value::Int(u64::from(k.count))),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }

    fn dotnet(&self) -> StackAdvice {
        let k = self.ka;
        let snippet = format!(
            "// .NET Core 3.0+; time values in seconds\n\
             socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);\n\
             socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, {});\n\
             socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, {});\n\
             socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, {});\n\
             // TCP_USER_TIMEOUT on Linux (.NET 5+): IPPROTO_TCP = 6, TCP_USER_TIMEOUT = 18, milliseconds\n\
             if (OperatingSystem.IsLinux()) socket.SetRawSocketOption(6, 18, BitConverter.GetBytes({}));",
            k.idle.as_secs(),
            k.interval.as_secs(),
            k.count,
            millis(self.user_timeout)
        );
        let mut warnings = vec![
            "TcpKeepAliveRetryCount throws on Windows before 10 1703, where the probe count is fixed at 10".to_string(),
        ];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "dotnet",
            title: ".NET (Socket.SetSocketOption, .NET Core 3.0+)",
            scope: "per socket",
            settings: vec![
                set("KeepAlive", Value::Bool(true)),
                set("TcpKeepAliveTime", Value::Int(k.idle.as_secs())),
                set("TcpKeepAliveInterval", Value::Int(k.interval.as_secs())),
                set("TcpKeepAliveRetryCount", Value::Int(u64::from(k.count))),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }

    fn haproxy(&self) -> StackAdvice {
        let k = self.ka;
        let t = proxy_time(self.dead_after);
        let (idle, intvl) = (proxy_time(k.idle), proxy_time(k.interval));
        let snippet = format!(
            "defaults\n\
             \x20   mode tcp\n\
             \x20   timeout client {t}    # idle timeout towards clients: ≥ dead_after (heartbeats reset it, TCP keepalive does not)\n\
             \x20   timeout server {t}    # idle timeout towards servers\n\
             \x20   timeout tunnel {t}    # upgraded HTTP connections (WebSocket) in mode http\n\
             \x20   option tcpka          # SO_KEEPALIVE on both sides\n\
             \x20   clitcpka-idle  {idle} # HAProxy 2.2+\n\
             \x20   clitcpka-intvl {intvl}\n\
             \x20   clitcpka-cnt   {cnt}\n\
             \x20   srvtcpka-idle  {idle}\n\
             \x20   srvtcpka-intvl {intvl}\n\
             \x20   srvtcpka-cnt   {cnt}",
            cnt = k.count
        );
        let mut warnings = vec![format!(
            "HAProxy's timeout client/server is itself a path idle timeout: keep it ≥ dead_after {} and ≥ 3 × heartbeat; only data (heartbeats) resets it",
            Human(self.dead_after)
        )];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "haproxy",
            title: "HAProxy (2.2+)",
            scope: "per proxy section",
            settings: vec![
                set("timeout client", Value::Text(t.clone())),
                set("timeout server", Value::Text(t.clone())),
                set("timeout tunnel", Value::Text(t)),
                set("option tcpka", Value::Bool(true)),
                set("clitcpka-idle", Value::Text(idle.clone())),
                set("clitcpka-intvl", Value::Text(intvl.clone())),
                set("clitcpka-cnt", Value::Int(u64::from(k.count))),
                set("srvtcpka-idle", Value::Text(idle)),
                set("srvtcpka-intvl", Value::Text(intvl)),
                set("srvtcpka-cnt", Value::Int(u64::from(k.count))),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }

    fn nginx(&self) -> StackAdvice {
        let k = self.ka;
        let t = proxy_time(self.dead_after);
        let so = format!(
            "{}:{}:{}",
            proxy_time(k.idle),
            proxy_time(k.interval),
            k.count
        );
        let snippet = format!(
            "stream {{\n\
             \x20   server {{\n\
             \x20       listen 9000 so_keepalive={so};  # client side: idle:interval:count\n\
             \x20       proxy_socket_keepalive on;    # upstream side (nginx 1.15.6+): uses the host's sysctl values\n\
             \x20       proxy_timeout {t};           # idle timeout on both sides: ≥ dead_after; only data resets it\n\
             \x20       proxy_pass backend:9000;\n\
             \x20   }}\n\
             }}"
        );
        let mut warnings = vec![
            "proxy_socket_keepalive cannot set idle/interval/count for the upstream side: it uses the host's net.ipv4.tcp_keepalive_* (see the sysctl section)".to_string(),
            format!(
                "proxy_timeout is itself a path idle timeout: keep it ≥ dead_after {}; only data (heartbeats) resets it",
                Human(self.dead_after)
            ),
        ];
        warnings.extend(self.ka_warnings(k.total()));
        StackAdvice {
            id: "nginx-stream",
            title: "nginx stream",
            scope: "per server block",
            settings: vec![
                set("listen so_keepalive", Value::Text(so)),
                set("proxy_socket_keepalive", Value::Bool(true)),
                set("proxy_timeout", Value::Text(t)),
            ],
            snippet,
            gives_up_after: Some(k.total()),
            keeps_path_open: self.ka_keeps_path(k.idle, k.interval),
            warnings,
        }
    }
}

/// Largest retransmission count whose doubling backoff from a 300 ms RTO,
/// `RTO × (2^(n+1) − 1)`, stays within `bound`; at least 1, at most 255.
fn windows_max_data_retransmissions(bound: Duration) -> u32 {
    let mut n = 1;
    while n < 255 && windows_retrans_time(n + 1) <= bound {
        n += 1;
    }
    n
}

fn windows_retrans_time(n: u32) -> Duration {
    let factor = (1u64 << (n + 1).min(40)) - 1;
    WINDOWS_MIN_RTO.saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
}

/// Milliseconds, saturating (policy durations fit in u32 ms anyway).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A Go duration literal: `15 * time.Second`, `1500 * time.Millisecond`.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} * time.Second", d.as_secs())
    } else {
        format!("{} * time.Millisecond", millis(d))
    }
}

/// A single-unit time for HAProxy and nginx (neither takes `1h30m`): `15s` or `1500ms`.
fn proxy_time(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", millis(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_retransmissions_fit_the_bound() {
        // 0.3 s × (2^6 − 1) = 18.9 s ≤ 30 s < 0.3 s × (2^7 − 1) = 38.1 s
        assert_eq!(windows_max_data_retransmissions(Duration::from_secs(30)), 5);
        assert_eq!(
            windows_max_data_retransmissions(Duration::from_millis(200)),
            1
        );
        assert!(windows_max_data_retransmissions(Duration::from_secs(4_000_000)) < 255);
    }
}
