//! Liveness policy: what the user knows (how fast a dead peer must be detected, and
//! optionally the idle timeout of the path) turned into concrete timer and socket settings.
//!
//! ```text
//!  inputs                          derived (Policy::derive)
//!  ──────                          ────────────────────────
//!  detect_within D  ─────┬───────► dead_after d      = D
//!                        ├───────► heartbeat h       = min(D/3, (D − 100ms)/2, P/3), rounded down
//!  path timeout P ───────┤         suspect_after      = h + margin(h)
//!  (preset or number)    ├───────► keepalive idle    = min(D/2, P/3) in whole seconds (≥ 1 s)
//!                        │         keepalive interval = min((D − idle)/3, P/3) (≥ 1 s)
//!                        │         keepalive count    = (D − idle) / interval   (1..=127)
//!                        └───────► TCP_USER_TIMEOUT  = D
//! ```
//!
//! # The rules and why (DESIGN.md §4)
//!
//! A side declares its peer dead when it has received *nothing at all* for `dead_after`. When
//! the peer vanishes at instant t, the last byte we got from it arrived at or before t, so
//! death is declared at or before t + `dead_after` (plus the driver's timer slack). Hence
//! **`dead_after ≤ detect_within`**, and the derivation uses `dead_after = detect_within`
//! exactly: anything shorter only adds false alarms.
//!
//! A live peer sends a heartbeat whenever it has sent nothing for `heartbeat_interval` h, so
//! the gap between bytes arriving from a live peer is h plus network and scheduling delay.
//! **`dead_after ≥ 2h + margin`** with **margin = max(h/2, 100 ms)**: one heartbeat may be
//! late by a whole interval (a retransmission, a stalled event loop) plus the margin before a
//! live peer is declared dead. The 100 ms floor covers RTT and scheduler jitter when h is tiny.
//! The derived h = D/3 gives margin = h (≥ h/2), and (D − 100 ms)/2 takes over for
//! D < 300 ms so that the 100 ms floor still fits. **h ≥ 10 ms**: below that, heartbeats are
//! busy-looping, not liveness; so detect_within must be at least 2·10 ms + 100 ms = 120 ms.
//!
//! A middlebox forgets a flow after P of silence. Heartbeats flow both ways, so the path sees
//! a packet at least every h. **h ≤ P/2** is the hard limit (one heartbeat may be late and the
//! flow still survives); the derivation uses **h ≤ P/3**, which also absorbs coarse timers in
//! the middlebox (vendors document minutes, not milliseconds) and a lost heartbeat's
//! retransmission. Paths under **1 s** are rejected: no real middlebox is that aggressive,
//! and the kernel cannot express keepalive below 1 s.
//!
//! TCP keepalive is the **second line of defence**: it keeps the path alive and detects a dead
//! peer even if the application's timers stall, and it protects raw TCP peers that do not
//! speak tether. Kernel keepalive counts in whole seconds (`TCP_KEEPIDLE`, `TCP_KEEPINTVL`;
//! Linux limits 1..=32767 s, `TCP_KEEPCNT` 1..=127). **Keepalive idle ≤ P/2** (derived ≤ P/3,
//! like the heartbeat, and interval likewise, so one lost probe does not let the flow expire)
//! and **idle + count × interval ≤ detect_within** whenever whole seconds allow it; below
//! about 2 s it cannot (1 s idle + 1 probe × 1 s), and [`Policy::notes`] says so instead of
//! failing: the heartbeat meets the bound, keepalive backs it up. With the derived idle ≈ D/2
//! > h, no keepalive probe is sent while heartbeats flow.
//!
//! `TCP_USER_TIMEOUT` bounds how long *sent* data may stay unacknowledged before the kernel
//! aborts the connection (otherwise Linux retransmits for ~15 minutes, `tcp_retries2`). It is
//! the only detector for a one-way failure (the peer's bytes still arrive, ours are not
//! acknowledged), so **user_timeout ≤ detect_within**; derived = detect_within. With keepalive
//! enabled, Linux also uses it to decide when unanswered keepalive probes abort.
//!
//! All durations must fit in a 32-bit count of milliseconds (about 49.7 days), the unit the
//! handshake and `TCP_USER_TIMEOUT` use.

use std::fmt;
use std::time::Duration;

use crate::duration::Human;
use crate::presets::{PathSpec, Preset};

/// TCP keepalive settings applied per socket (`SO_KEEPALIVE`, `TCP_KEEPIDLE`,
/// `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between unanswered probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the kernel gives up (`TCP_KEEPCNT`).
    pub count: u32,
}

impl Keepalive {
    /// When the kernel gives up on a silent peer: `idle + count × interval`.
    pub fn total(&self) -> Duration {
        self.idle + self.interval * self.count
    }
}

/// The smallest heartbeat interval tether accepts (10 ms).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// The smallest margin between the second missed heartbeat and death (100 ms).
pub const MIN_MARGIN: Duration = Duration::from_millis(100);
/// The smallest `detect_within`: two minimal heartbeats plus the minimal margin (120 ms).
pub const MIN_DETECT_WITHIN: Duration = Duration::from_millis(120);
/// The smallest path idle timeout accepted (1 s).
pub const MIN_PATH_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest duration in a policy: `u32::MAX` milliseconds (≈ 49.7 days).
pub const MAX_DURATION: Duration = Duration::from_millis(u32::MAX as u64);
/// The default `detect_within` (30 s).
pub const DEFAULT_DETECT_WITHIN: Duration = Duration::from_secs(30);
/// Kernel keepalive granularity and minimum (1 s).
pub const KEEPALIVE_MIN: Duration = Duration::from_secs(1);
/// Largest `TCP_KEEPIDLE` / `TCP_KEEPINTVL` Linux accepts (32767 s).
pub const KEEPALIVE_MAX: Duration = Duration::from_secs(32_767);
/// Largest `TCP_KEEPCNT` Linux accepts (127).
pub const KEEPALIVE_MAX_COUNT: u32 = 127;

/// The margin a policy with heartbeat `h` must leave: `max(h/2, 100 ms)`.
pub fn margin_for(heartbeat: Duration) -> Duration {
    (heartbeat / 2).max(MIN_MARGIN)
}

/// The shortest `dead_after` allowed with heartbeat `h`: `2h + margin_for(h)`.
pub fn min_dead_after(heartbeat: Duration) -> Duration {
    heartbeat * 2 + margin_for(heartbeat)
}

/// `detect_within` must be positive, representable on the wire, and at least
/// [`MIN_DETECT_WITHIN`].
fn check_detect_within(d_w: Duration) -> Result<(), PolicyError> {
    if d_w.is_zero() {
        return Err(PolicyError::DetectWithinZero);
    }
    check_max("detect_within", d_w)?;
    if d_w < MIN_DETECT_WITHIN {
        return Err(PolicyError::DetectWithinTooSmall {
            detect_within: d_w,
            min: MIN_DETECT_WITHIN,
        });
    }
    Ok(())
}

/// The concrete liveness settings for one connection.
///
/// Build one with [`Policy::derive`] (or [`Policy::builder`] to override single values);
/// both check [`Policy::validate`]. Constructing the struct directly skips the checks: call
/// `validate()` yourself.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// A side that has sent nothing for this long sends a heartbeat (an empty frame).
    pub heartbeat_interval: Duration,
    /// A side that has received nothing at all for this long declares the peer dead.
    pub dead_after: Duration,
    /// No application data (either direction) for this long closes the connection.
    /// `None` disables. Default: `None`.
    pub idle_timeout: Option<Duration>,
    /// Per-socket TCP keepalive. `None` leaves the OS default (off).
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` (Linux): unacknowledged data for this long aborts the connection.
    pub user_timeout: Option<Duration>,
    /// Send a PING for RTT measurement this often. `None` disables.
    pub ping_interval: Option<Duration>,
    /// The bound the user asked for: a dead peer is detected within this long.
    /// Default: 30 s.
    pub detect_within: Duration,
    /// The idle timeout of the path (middlebox) this connection crosses, if known.
    pub path_timeout: Option<Duration>,
    /// The named preset the path timeout came from, if any (for advice: e.g. L7 proxies
    /// ignore TCP keepalive).
    pub path_preset: Option<&'static Preset>,
}

impl Default for Policy {
    /// `detect_within` 30 s, no path: heartbeat 10 s, dead_after 30 s, keepalive 15 s + 3 × 5 s,
    /// `TCP_USER_TIMEOUT` 30 s.
    fn default() -> Policy {
        // The inputs are constants that the unit tests prove valid.
        Policy::derive(DEFAULT_DETECT_WITHIN, None).expect("default policy is valid")
    }
}

impl Policy {
    /// Derives a policy from the detection bound and, optionally, the path's idle timeout
    /// (see the [module docs](self) for every rule and its reason).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tether_proto::{policy::Policy, presets::PathSpec};
    /// let p = Policy::derive(Duration::from_secs(30), Some(PathSpec::parse("azure-lb").unwrap())).unwrap();
    /// assert_eq!(p.heartbeat_interval, Duration::from_secs(10));
    /// assert_eq!(p.dead_after, Duration::from_secs(30));
    /// let p = Policy::derive(Duration::from_secs(1800), Some(PathSpec::parse("azure-lb").unwrap())).unwrap();
    /// assert_eq!(p.heartbeat_interval, Duration::from_secs(80)); // path/3
    /// ```
    pub fn derive(detect_within: Duration, path: Option<PathSpec>) -> Result<Policy, PolicyError> {
        Policy::builder(detect_within).path(path).build()
    }

    /// A builder starting from `detect_within`; every value not set explicitly is derived.
    pub fn builder(detect_within: Duration) -> PolicyBuilder {
        PolicyBuilder {
            detect_within,
            path: None,
            heartbeat: None,
            dead_after: None,
            keepalive: None,
            user_timeout: None,
            idle_timeout: None,
            ping_interval: None,
        }
    }

    /// The margin this policy leaves: `max(heartbeat/2, 100 ms)`.
    pub fn margin(&self) -> Duration {
        margin_for(self.heartbeat_interval)
    }

    /// Silence after which the server marks a client `Suspect` (not yet dead):
    /// one heartbeat interval plus the margin. Always below `dead_after` in a valid policy.
    pub fn suspect_after(&self) -> Duration {
        self.heartbeat_interval + self.margin()
    }

    /// The path this policy was derived for, if any.
    pub fn path(&self) -> Option<PathSpec> {
        self.path_timeout.map(|timeout| PathSpec {
            preset: self.path_preset,
            timeout,
        })
    }

    /// Checks every invariant of the [module docs](self); the error names the values.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let d_w = self.detect_within;
        check_detect_within(d_w)?;
        if let Some(p) = self.path_timeout {
            check_path(p)?;
        }

        let h = self.heartbeat_interval;
        check_max("heartbeat", h)?;
        if h < MIN_HEARTBEAT {
            return Err(PolicyError::HeartbeatTooSmall {
                heartbeat: h,
                min: MIN_HEARTBEAT,
            });
        }
        if let Some(p) = self.path_timeout {
            if h > p / 2 {
                return Err(PolicyError::HeartbeatNotUnderPath {
                    heartbeat: h,
                    path_timeout: p,
                    max: p / 2,
                });
            }
        }
        let min_d = min_dead_after(h);
        if self.dead_after < min_d {
            return Err(PolicyError::DeadAfterTooShort {
                dead_after: self.dead_after,
                heartbeat: h,
                min: min_d,
            });
        }
        if self.dead_after > d_w {
            return Err(PolicyError::DeadAfterExceedsDetectWithin {
                dead_after: self.dead_after,
                detect_within: d_w,
            });
        }

        if let Some(k) = self.keepalive {
            check_keepalive(&k)?;
            if let Some(p) = self.path_timeout {
                let max = (p / 2).max(KEEPALIVE_MIN);
                if k.idle > max {
                    return Err(PolicyError::KeepaliveNotUnderPath {
                        what: "idle",
                        value: k.idle,
                        path_timeout: p,
                        max,
                    });
                }
                if k.interval > max {
                    return Err(PolicyError::KeepaliveNotUnderPath {
                        what: "interval",
                        value: k.interval,
                        path_timeout: p,
                        max,
                    });
                }
            }
            let achievable = d_w.max(KEEPALIVE_MIN * 2);
            if k.total() > achievable {
                return Err(PolicyError::KeepaliveTooSlow {
                    total: k.total(),
                    detect_within: d_w,
                });
            }
        }

        if let Some(u) = self.user_timeout {
            if u.is_zero() {
                return Err(PolicyError::Zero {
                    what: "user_timeout",
                });
            }
            if u > d_w {
                return Err(PolicyError::UserTimeoutExceedsDetectWithin {
                    user_timeout: u,
                    detect_within: d_w,
                });
            }
        }
        if let Some(i) = self.idle_timeout {
            if i.is_zero() {
                return Err(PolicyError::Zero {
                    what: "idle_timeout",
                });
            }
            check_max("idle_timeout", i)?;
        }
        if let Some(p) = self.ping_interval {
            if p < MIN_HEARTBEAT {
                return Err(PolicyError::PingTooFrequent {
                    ping_interval: p,
                    min: MIN_HEARTBEAT,
                });
            }
            check_max("ping_interval", p)?;
        }
        Ok(())
    }

    /// Limits of a valid policy worth telling the user: where a second line of defence cannot
    /// meet the bound, where the path ignores TCP keepalive, and so on. Empty when nothing
    /// needs saying.
    pub fn notes(&self) -> Vec<PolicyNote> {
        let mut notes = Vec::new();
        if let Some(p) = self.path_preset {
            if !p.tcp_keepalive_counts {
                notes.push(PolicyNote::KeepaliveIgnoredByPath { preset: p.name });
            }
        }
        match self.keepalive {
            Some(k) => {
                if k.total() > self.detect_within {
                    notes.push(PolicyNote::KeepaliveCoarse {
                        detect_within: self.detect_within,
                        keepalive_total: k.total(),
                    });
                }
                if let Some(p) = self.path_timeout {
                    if k.idle > p / 2 {
                        notes.push(PolicyNote::KeepaliveAtKernelMinimum { path_timeout: p });
                    }
                }
            }
            None => notes.push(PolicyNote::KeepaliveOff),
        }
        match self.user_timeout {
            Some(u) if u < Duration::from_secs(1) => {
                notes.push(PolicyNote::UserTimeoutAggressive { user_timeout: u })
            }
            None => notes.push(PolicyNote::UserTimeoutOff),
            _ => {}
        }
        notes
    }

    /// The heartbeat interval the derivation would choose for this policy's `dead_after` and
    /// path: `min(dead_after/3, (dead_after − 100ms)/2, path/3)`, rounded down. Differs from
    /// `heartbeat_interval` when that was set explicitly.
    pub fn derived_heartbeat(&self) -> Duration {
        derive_heartbeat(self.dead_after, self.path_timeout)
    }
}

impl fmt::Display for Policy {
    /// One line for logs: `heartbeat 10s, dead_after 30s, keepalive 15s+3×5s, user_timeout 30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "heartbeat {}, dead_after {}",
            Human(self.heartbeat_interval),
            Human(self.dead_after)
        )?;
        match self.keepalive {
            Some(k) => write!(
                f,
                ", keepalive {}+{}×{}",
                Human(k.idle),
                k.count,
                Human(k.interval)
            )?,
            None => f.write_str(", keepalive off")?,
        }
        match self.user_timeout {
            Some(u) => write!(f, ", user_timeout {}", Human(u))?,
            None => f.write_str(", user_timeout off")?,
        }
        if let Some(i) = self.idle_timeout {
            write!(f, ", idle_timeout {}", Human(i))?;
        }
        if let Some(p) = self.ping_interval {
            write!(f, ", ping {}", Human(p))?;
        }
        Ok(())
    }
}

/// Builds a [`Policy`] from `detect_within`, deriving every value not set explicitly.
///
/// ```
/// use std::time::Duration;
/// use tether_proto::policy::Policy;
/// let p = Policy::builder(Duration::from_secs(20))
///     .heartbeat(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// assert_eq!((p.heartbeat_interval, p.dead_after), (Duration::from_secs(5), Duration::from_secs(20)));
/// assert!(Policy::builder(Duration::from_secs(20)).heartbeat(Duration::from_secs(9)).build().is_err());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PolicyBuilder {
    detect_within: Duration,
    path: Option<PathSpec>,
    heartbeat: Option<Duration>,
    dead_after: Option<Duration>,
    keepalive: Option<Option<Keepalive>>,
    user_timeout: Option<Option<Duration>>,
    idle_timeout: Option<Duration>,
    ping_interval: Option<Duration>,
}

impl PolicyBuilder {
    /// The path the connection crosses (preset or timeout). Default: none (no path limit).
    pub fn path(mut self, path: Option<PathSpec>) -> Self {
        self.path = path;
        self
    }

    /// An explicit heartbeat interval. Default: derived (`min(D/3, (D − 100ms)/2, P/3)`).
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// An explicit `dead_after` (≤ detect_within). Default: detect_within. When set and the
    /// heartbeat is not, the heartbeat is derived from it instead of from detect_within.
    pub fn dead_after(mut self, dead_after: Duration) -> Self {
        self.dead_after = Some(dead_after);
        self
    }

    /// Explicit TCP keepalive (`None` turns it off). Default: derived.
    pub fn keepalive(mut self, keepalive: Option<Keepalive>) -> Self {
        self.keepalive = Some(keepalive);
        self
    }

    /// Explicit `TCP_USER_TIMEOUT` (`None` turns it off). Default: detect_within.
    pub fn user_timeout(mut self, user_timeout: Option<Duration>) -> Self {
        self.user_timeout = Some(user_timeout);
        self
    }

    /// Application idle timeout (`None` disables). Default: `None`.
    pub fn idle_timeout(mut self, idle_timeout: Option<Duration>) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// RTT ping interval (`None` disables). Default: `None`.
    pub fn ping_interval(mut self, ping_interval: Option<Duration>) -> Self {
        self.ping_interval = ping_interval;
        self
    }

    /// Derives what was not set and checks every invariant.
    pub fn build(self) -> Result<Policy, PolicyError> {
        let d_w = self.detect_within;
        // Input checks first, so the error is about what the user gave.
        check_detect_within(d_w)?;
        let path_timeout = self.path.map(|p| p.timeout);
        if let Some(p) = path_timeout {
            check_path(p)?;
        }
        let dead_after = self.dead_after.unwrap_or(d_w);
        if dead_after > d_w {
            return Err(PolicyError::DeadAfterExceedsDetectWithin {
                dead_after,
                detect_within: d_w,
            });
        }
        let heartbeat = match self.heartbeat {
            Some(h) => h,
            None if dead_after < MIN_DETECT_WITHIN => {
                return Err(PolicyError::DeadAfterTooShort {
                    dead_after,
                    heartbeat: MIN_HEARTBEAT,
                    min: MIN_DETECT_WITHIN,
                })
            }
            None => derive_heartbeat(dead_after, path_timeout),
        };
        let policy = Policy {
            heartbeat_interval: heartbeat,
            dead_after,
            idle_timeout: self.idle_timeout,
            keepalive: self
                .keepalive
                .unwrap_or_else(|| Some(derive_keepalive(d_w, path_timeout))),
            user_timeout: self.user_timeout.unwrap_or(Some(d_w)),
            ping_interval: self.ping_interval,
            detect_within: d_w,
            path_timeout,
            path_preset: self.path.and_then(|p| p.preset),
        };
        policy.validate()?;
        Ok(policy)
    }
}

fn check_max(what: &'static str, value: Duration) -> Result<(), PolicyError> {
    if value > MAX_DURATION {
        return Err(PolicyError::TooLarge {
            what,
            value,
            max: MAX_DURATION,
        });
    }
    Ok(())
}

fn check_path(p: Duration) -> Result<(), PolicyError> {
    if p < MIN_PATH_TIMEOUT {
        return Err(PolicyError::PathTimeoutTooSmall {
            path_timeout: p,
            min: MIN_PATH_TIMEOUT,
        });
    }
    check_max("path timeout", p)
}

fn check_keepalive(k: &Keepalive) -> Result<(), PolicyError> {
    let whole = |d: Duration| d.subsec_nanos() == 0;
    let problem = if !whole(k.idle) || !whole(k.interval) {
        Some("idle and interval must be whole seconds (kernel granularity)")
    } else if k.idle < KEEPALIVE_MIN || k.interval < KEEPALIVE_MIN {
        Some("idle and interval must be at least 1s")
    } else if k.idle > KEEPALIVE_MAX || k.interval > KEEPALIVE_MAX {
        Some("idle and interval must be at most 32767s")
    } else if k.count == 0 || k.count > KEEPALIVE_MAX_COUNT {
        Some("count must be 1 to 127")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(PolicyError::KeepaliveInvalid {
            idle: k.idle,
            interval: k.interval,
            count: k.count,
            problem,
        }),
        None => Ok(()),
    }
}

/// Rounds a derived interval down to a value people can read and type: whole milliseconds
/// below 1 s, tenths of a second below 10 s, whole seconds above. Rounding down only ever
/// makes the invariants easier to meet.
fn round_down(d: Duration) -> Duration {
    let ms = d.as_millis() as u64; // ≤ MAX_DURATION, fits.
    let step = if ms < 1_000 {
        1
    } else if ms < 10_000 {
        100
    } else {
        1_000
    };
    Duration::from_millis(ms - ms % step)
}

/// `min(bound/3, (bound − 100ms)/2, path/3)`, rounded down. `bound ≥ MIN_DETECT_WITHIN` and
/// `path ≥ 1 s` make the result ≥ 10 ms.
fn derive_heartbeat(bound: Duration, path: Option<Duration>) -> Duration {
    let mut h = (bound / 3).min(bound.saturating_sub(MIN_MARGIN) / 2);
    if let Some(p) = path {
        h = h.min(p / 3);
    }
    round_down(h)
}

fn floor_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Keepalive in whole seconds: idle = min(D/2, P/3), interval = min((D − idle)/3, P/3),
/// count = (D − idle)/interval, each clamped to the kernel's limits.
pub(crate) fn derive_keepalive(d_w: Duration, path: Option<Duration>) -> Keepalive {
    let cap = |d: Duration| match path {
        Some(p) => d.min(p / 3),
        None => d,
    };
    let idle = floor_secs(cap(d_w / 2)).clamp(KEEPALIVE_MIN, KEEPALIVE_MAX);
    let rest = d_w.saturating_sub(idle);
    let interval = floor_secs(cap(rest / 3)).clamp(KEEPALIVE_MIN, KEEPALIVE_MAX);
    let count = (rest.as_secs() / interval.as_secs()).clamp(1, u64::from(KEEPALIVE_MAX_COUNT));
    Keepalive {
        idle,
        interval,
        count: count as u32, // ≤ 127
    }
}

/// Limits of a valid policy (see [`Policy::notes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyNote {
    /// Kernel keepalive (whole seconds) cannot detect within the bound; heartbeats do.
    KeepaliveCoarse {
        /// The bound.
        detect_within: Duration,
        /// When keepalive gives up: idle + count × interval.
        keepalive_total: Duration,
    },
    /// The path is shorter than twice the kernel's minimum keepalive idle (1 s).
    KeepaliveAtKernelMinimum {
        /// The path idle timeout.
        path_timeout: Duration,
    },
    /// The path preset is an L7 proxy: TCP keepalive does not keep it open.
    KeepaliveIgnoredByPath {
        /// The preset name.
        preset: &'static str,
    },
    /// TCP keepalive is off.
    KeepaliveOff,
    /// `TCP_USER_TIMEOUT` under 1 s can abort on a single lost segment.
    UserTimeoutAggressive {
        /// The value.
        user_timeout: Duration,
    },
    /// `TCP_USER_TIMEOUT` is off.
    UserTimeoutOff,
}

impl fmt::Display for PolicyNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyNote::KeepaliveCoarse {
                detect_within,
                keepalive_total,
            } => write!(
                f,
                "kernel keepalive counts in whole seconds: it gives up after {}, not within {}; \
                 tether heartbeats meet the bound, keepalive is the second line of defence",
                Human(*keepalive_total),
                Human(*detect_within)
            ),
            PolicyNote::KeepaliveAtKernelMinimum { path_timeout } => write!(
                f,
                "path idle timeout {} is under 2s: keepalive idle cannot go below 1s, so only \
                 heartbeats keep this path open reliably",
                Human(*path_timeout)
            ),
            PolicyNote::KeepaliveIgnoredByPath { preset } => write!(
                f,
                "{preset} is an L7 proxy: TCP keepalive does not count there, only application \
                 bytes do; tether heartbeats keep it open, TCP keepalive alone will not"
            ),
            PolicyNote::KeepaliveOff => {
                f.write_str("TCP keepalive is off: heartbeats are the only liveness check")
            }
            PolicyNote::UserTimeoutAggressive { user_timeout } => write!(
                f,
                "TCP_USER_TIMEOUT {} is under 1s: a single lost segment (Linux minimum RTO \
                 200ms) can abort the connection",
                Human(*user_timeout)
            ),
            PolicyNote::UserTimeoutOff => f.write_str(
                "TCP_USER_TIMEOUT is off: data stuck in flight is retransmitted for ~15 min",
            ),
        }
    }
}

fn h(d: &Duration) -> Human {
    Human(*d)
}

/// Why a policy is impossible. Every message names the values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `detect_within` is zero.
    #[error("detect_within must be more than 0s")]
    DetectWithinZero,
    /// `detect_within` cannot hold two minimal heartbeats plus the minimal margin.
    #[error("detect_within {} is too small: the smallest is {} (2 heartbeats of at least 10ms plus a 100ms margin)", h(.detect_within), h(.min))]
    DetectWithinTooSmall {
        /// The value given.
        detect_within: Duration,
        /// The smallest accepted.
        min: Duration,
    },
    /// A duration does not fit in 32-bit milliseconds.
    #[error("{what} {} is too large (at most {})", h(.value), h(.max))]
    TooLarge {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// The largest accepted.
        max: Duration,
    },
    /// A setting that must be positive is zero.
    #[error("{what} must be more than 0s (use none to disable it)")]
    Zero {
        /// Which setting.
        what: &'static str,
    },
    /// The path idle timeout is unrealistically small.
    #[error("path idle timeout {} is too small: the smallest is {}", h(.path_timeout), h(.min))]
    PathTimeoutTooSmall {
        /// The value given.
        path_timeout: Duration,
        /// The smallest accepted.
        min: Duration,
    },
    /// The heartbeat interval is below the floor.
    #[error("heartbeat {} is too small: the smallest is {}", h(.heartbeat), h(.min))]
    HeartbeatTooSmall {
        /// The value given.
        heartbeat: Duration,
        /// The smallest accepted.
        min: Duration,
    },
    /// The heartbeat is not well under the path idle timeout.
    #[error("heartbeat {} is not well under the path idle timeout {}: it must be at most half of it ({}), or the path forgets the flow after one late heartbeat", h(.heartbeat), h(.path_timeout), h(.max))]
    HeartbeatNotUnderPath {
        /// The heartbeat interval.
        heartbeat: Duration,
        /// The path idle timeout.
        path_timeout: Duration,
        /// The largest heartbeat accepted.
        max: Duration,
    },
    /// `dead_after` does not hold two heartbeats plus margin.
    #[error("dead_after {} is too short for heartbeat {}: it must be at least 2 × heartbeat + max(heartbeat/2, 100ms) = {}", h(.dead_after), h(.heartbeat), h(.min))]
    DeadAfterTooShort {
        /// The `dead_after`.
        dead_after: Duration,
        /// The heartbeat interval.
        heartbeat: Duration,
        /// The smallest `dead_after` accepted.
        min: Duration,
    },
    /// `dead_after` is beyond the detection bound.
    #[error("dead_after {} exceeds detect_within {}", h(.dead_after), h(.detect_within))]
    DeadAfterExceedsDetectWithin {
        /// The `dead_after`.
        dead_after: Duration,
        /// The bound.
        detect_within: Duration,
    },
    /// Keepalive values the kernel cannot take.
    #[error("tcp keepalive idle {} interval {} count {count} is invalid: {problem}", h(.idle), h(.interval))]
    KeepaliveInvalid {
        /// `TCP_KEEPIDLE`.
        idle: Duration,
        /// `TCP_KEEPINTVL`.
        interval: Duration,
        /// `TCP_KEEPCNT`.
        count: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// Keepalive idle or interval is not well under the path idle timeout.
    #[error("tcp keepalive {what} {} is not well under the path idle timeout {}: at most {}", h(.value), h(.path_timeout), h(.max))]
    KeepaliveNotUnderPath {
        /// `"idle"` or `"interval"`.
        what: &'static str,
        /// The value.
        value: Duration,
        /// The path idle timeout.
        path_timeout: Duration,
        /// The largest accepted.
        max: Duration,
    },
    /// Keepalive would give up far later than the bound although whole seconds allow it.
    #[error("tcp keepalive gives up after {} (idle + count × interval), beyond detect_within {}", h(.total), h(.detect_within))]
    KeepaliveTooSlow {
        /// idle + count × interval.
        total: Duration,
        /// The bound.
        detect_within: Duration,
    },
    /// `TCP_USER_TIMEOUT` is beyond the bound.
    #[error("tcp user timeout {} exceeds detect_within {}", h(.user_timeout), h(.detect_within))]
    UserTimeoutExceedsDetectWithin {
        /// The value.
        user_timeout: Duration,
        /// The bound.
        detect_within: Duration,
    },
    /// Pings more often than the heartbeat floor.
    #[error("ping interval {} is too small: the smallest is {}", h(.ping_interval), h(.min))]
    PingTooFrequent {
        /// The value.
        ping_interval: Duration,
        /// The smallest accepted.
        min: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }
    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn default_is_30s_without_path() {
        let p = Policy::default();
        assert_eq!(p.detect_within, s(30));
        assert_eq!(p.heartbeat_interval, s(10));
        assert_eq!(p.dead_after, s(30));
        assert_eq!(p.suspect_after(), s(15));
        assert_eq!(
            p.keepalive,
            Some(Keepalive {
                idle: s(15),
                interval: s(5),
                count: 3
            })
        );
        assert_eq!(p.user_timeout, Some(s(30)));
        assert_eq!(p.path_timeout, None);
        assert!(p.notes().is_empty(), "{:?}", p.notes());
        assert_eq!(
            p.to_string(),
            "heartbeat 10s, dead_after 30s, keepalive 15s+3×5s, user_timeout 30s"
        );
    }

    #[test]
    fn rounding_is_readable() {
        assert_eq!(round_down(ms(3_333)), ms(3_300));
        assert_eq!(round_down(ms(116_666)), s(116));
        assert_eq!(round_down(ms(333)), ms(333));
    }

    #[test]
    fn small_bounds_use_the_margin_floor() {
        let p = Policy::derive(ms(150), None).unwrap();
        assert_eq!(p.heartbeat_interval, ms(25));
        assert_eq!(p.dead_after, ms(150));
        let p = Policy::derive(MIN_DETECT_WITHIN, None).unwrap();
        assert_eq!(p.heartbeat_interval, MIN_HEARTBEAT);
    }

    #[test]
    fn keepalive_derivation() {
        // 4 min path, 30 min bound: idle and interval capped at path/3, count fills the bound.
        let k = derive_keepalive(s(1800), Some(s(240)));
        assert_eq!((k.idle, k.interval, k.count), (s(80), s(80), 21));
        assert!(k.total() <= s(1800));
        // Sub-second bound: the kernel minimum, 2 s.
        let k = derive_keepalive(ms(500), None);
        assert_eq!((k.idle, k.interval, k.count), (s(1), s(1), 1));
    }
}
