//! The detection methods compared on every fault, and the scale the lab runs at.
//!
//! Every configurable method gets its settings from one [`Policy`] derived from the same
//! bound and path timeout, so the comparison is fair: `keepalive` uses the policy's
//! keepalive, `user-timeout` its `TCP_USER_TIMEOUT`, `idle-timer` its `dead_after` as a read
//! deadline, and `tether` all of it plus heartbeats.

use std::str::FromStr;
use std::time::Duration;

use tether_proto::presets::PathSpec;
use tether_proto::Policy;

use crate::error::LabError;

/// Linux's default keepalive: 7200 s idle + 9 probes × 75 s (ip-sysctl.txt).
pub const OS_KEEPALIVE_TOTAL: Duration = Duration::from_secs(7200 + 9 * 75);

/// How an application finds out that its connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Method {
    /// Plain sockets as a naive application has them: a blocking read, no keepalive (the
    /// OS default is off), no timers. Learns only of FIN and RST.
    OsDefault,
    /// `SO_KEEPALIVE` switched on but left at the OS's timings (Linux: first probe after
    /// 7200 s, 9 probes 75 s apart; a fresh namespace starts with these defaults): what an
    /// application gets from "enable keepalive" without tuning. Shows that the default is
    /// far too slow for every middlebox timeout in `docs/middlebox-presets.md`.
    OsKeepalive,
    /// Tuned TCP keepalive only (`SO_KEEPALIVE`, `TCP_KEEPIDLE`/`INTVL`/`CNT` via socket2),
    /// the application just reads. Probes keep idle flows alive and detect a dead peer, but
    /// only while no data is in flight.
    Keepalive,
    /// `TCP_USER_TIMEOUT` only, with data in flight: after a fault the side sends one
    /// message, and the kernel aborts when it stays unacknowledged for the timeout.
    UserTimeout,
    /// An explicit read deadline: no bytes for the bound closes the connection. Detects any
    /// silence, and so also closes healthy idle connections.
    IdleTimer,
    /// The full tether policy through the library: heartbeat frames, dead-after, keepalive
    /// and `TCP_USER_TIMEOUT` as second lines of defence.
    Tether,
    /// Your own client ([`ClientCommand`](crate::ClientCommand), `tether lab --client-cmd`)
    /// against a tether server with the lab's policy. Not in [`Method::ALL`]: it runs only
    /// when a command is given.
    ClientCmd,
}

impl Method {
    /// Every method, in display order.
    pub const ALL: [Method; 6] = [
        Method::OsDefault,
        Method::OsKeepalive,
        Method::Keepalive,
        Method::UserTimeout,
        Method::IdleTimer,
        Method::Tether,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::OsDefault => "os-default",
            Method::OsKeepalive => "os-keepalive",
            Method::Keepalive => "keepalive",
            Method::UserTimeout => "user-timeout",
            Method::IdleTimer => "idle-timer",
            Method::Tether => "tether",
            Method::ClientCmd => "client-cmd",
        }
    }

    /// One line on what the method does.
    pub fn describe(self) -> &'static str {
        match self {
            Method::OsDefault => "plain socket, blocking read, OS keepalive off",
            Method::OsKeepalive => "SO_KEEPALIVE on with the OS timings (7200 s + 9 x 75 s)",
            Method::Keepalive => "SO_KEEPALIVE + TCP_KEEPIDLE/INTVL/CNT from the policy",
            Method::UserTimeout => "TCP_USER_TIMEOUT from the policy; sends after the fault",
            Method::IdleTimer => "read deadline = dead_after; no heartbeats",
            Method::Tether => "tether::Connection with the derived policy",
            Method::ClientCmd => {
                "your client (--client-cmd) against a tether server with the policy"
            }
        }
    }

    /// Whether the checks hold this method to the bound (tether and a client command, which
    /// is measured against the bound the tether server dictates).
    pub fn is_checked(self) -> bool {
        matches!(self, Method::Tether | Method::ClientCmd)
    }

    /// The method a side of this cell runs: a client command's server side is tether.
    pub fn for_side(self, role: crate::Role) -> Method {
        match (self, role) {
            (Method::ClientCmd, crate::Role::Server) => Method::Tether,
            (m, _) => m,
        }
    }

    /// Whether a side using this method sends a message right after a path or victim fault
    /// (only `user-timeout`, whose mechanism needs data in flight; idle faults make every
    /// method send).
    pub fn sends_after_fault(self) -> bool {
        self == Method::UserTimeout
    }

    /// The detection bound this method is configured for under `scale`, if any.
    pub fn bound(self, scale: &Scale) -> Option<Duration> {
        let p = scale.policy();
        match self {
            Method::OsDefault => None,
            Method::OsKeepalive => Some(OS_KEEPALIVE_TOTAL),
            Method::Keepalive => p.keepalive.map(|k| k.total()),
            Method::UserTimeout => p.user_timeout,
            Method::IdleTimer => Some(p.dead_after),
            Method::Tether | Method::ClientCmd => Some(p.detect_within),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Method, LabError> {
        Method::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| LabError::Invalid {
                what: "method",
                value: s.to_string(),
                expected: Method::ALL.map(Method::name).join(", "),
            })
    }
}

/// The lab's time scale. Real middlebox timeouts are minutes; the lab shrinks every duration
/// by `factor` so that a run takes seconds, and prints the scale with every result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Scale {
    /// One lab second stands for this many real seconds. Default: 60.
    pub factor: u32,
    /// The router's idle timeout (whole seconds, at least 2). Default: 4 s, which stands for
    /// Azure's 240 s at 1:60 (AWS's 350 s would be 5.8 s; the behaviour does not depend on
    /// the exact value).
    pub middlebox_timeout: Duration,
    /// The detection bound every configurable method is set up for (at least 2 s: kernel
    /// keepalive counts whole seconds). Default: 3 s (stands for 180 s).
    pub bound: Duration,
    /// How long a side may take before it is reported *not detected*. Default: 12 s (stands
    /// for 12 min; Linux needs ~15 min to give up on unacknowledged data).
    pub cap: Duration,
}

impl Default for Scale {
    fn default() -> Scale {
        Scale {
            factor: 60,
            middlebox_timeout: Duration::from_secs(4),
            bound: Duration::from_secs(3),
            cap: Duration::from_secs(12),
        }
    }
}

impl Scale {
    /// Checks the values against what the kernel and the policy can express.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |what, value: Duration, expected: &str| LabError::Invalid {
            what,
            value: format!("{value:?}"),
            expected: expected.into(),
        };
        if self.middlebox_timeout < Duration::from_secs(2)
            || self.middlebox_timeout.subsec_nanos() != 0
        {
            return Err(bad(
                "middlebox timeout",
                self.middlebox_timeout,
                "whole seconds, at least 2 s (conntrack counts seconds)",
            ));
        }
        if self.bound < Duration::from_secs(2) {
            return Err(bad("bound", self.bound, "at least 2 s"));
        }
        if self.cap < self.bound * 2 {
            return Err(bad("cap", self.cap, "at least twice the bound"));
        }
        if self.factor == 0 {
            return Err(LabError::Invalid {
                what: "scale factor",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        Policy::derive(
            self.bound,
            Some(PathSpec::from_timeout(self.middlebox_timeout)),
        )
        .map(drop)
        .map_err(|e| LabError::Invalid {
            what: "bound for the path timeout",
            value: format!("{:?}", self.bound),
            expected: e.to_string(),
        })
    }

    /// The policy every configurable method takes its settings from:
    /// `Policy::derive(bound, path = middlebox_timeout)`.
    pub fn policy(&self) -> Policy {
        Policy::derive(
            self.bound,
            Some(PathSpec::from_timeout(self.middlebox_timeout)),
        )
        // Falls back to the bound alone; `validate` reports the problem to the user.
        .or_else(|_| Policy::derive(self.bound, None))
        .unwrap_or_default()
    }

    /// How long idle faults idle before both sides send: three middlebox timeouts.
    pub fn idle_phase(&self) -> Duration {
        self.middlebox_timeout * 3
    }

    /// Turns a lab duration into the real one it stands for.
    pub fn real(&self, d: Duration) -> Duration {
        d * self.factor
    }

    /// One line stating the scale, printed with every result.
    pub fn describe(&self) -> String {
        let p = self.policy();
        let k = p
            .keepalive
            .map(|k| {
                format!(
                    "keepalive {}s+{}x{}s",
                    k.idle.as_secs(),
                    k.count,
                    k.interval.as_secs()
                )
            })
            .unwrap_or_else(|| "keepalive off".into());
        format!(
            "scale 1:{f}: middlebox idle timeout {t}s (stands for {tr}s; Azure LB/SNAT 240s, AWS NLB/NAT GW 350s), \
             bound {b}s (stands for {br}s; heartbeat {h:?}, dead_after {d:?}, {k}, user_timeout {u:?}), \
             cap {c}s (stands for {cr}s), idle phase {i}s",
            f = self.factor,
            t = secs(self.middlebox_timeout),
            tr = secs(self.real(self.middlebox_timeout)),
            b = secs(self.bound),
            br = secs(self.real(self.bound)),
            h = p.heartbeat_interval,
            d = p.dead_after,
            u = p.user_timeout.unwrap_or_default(),
            c = secs(self.cap),
            cr = secs(self.real(self.cap)),
            i = secs(self.idle_phase()),
        )
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}
