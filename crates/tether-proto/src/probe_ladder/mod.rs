//! The schedule and bracketing logic of `tether probe`, sans-IO: time is a [`Duration`] since
//! the probe started, supplied by the caller, so the whole search can be simulated exactly.
//! The driver that opens the connections is `tether::probe`; the bytes it exchanges are in
//! [`crate::wire::probe`].
//!
//! ```text
//!  rung k: a connection idled for age a_k (geometric: a_{k+1} = a_k·ratio, at least +min_step)
//!
//!  slots ──▶ open rung 0..N-1 at once; when a rung resolves, its slot opens the next rung
//!
//!  time ─────────────────────────────────────────────────────────────────────▶
//!  rung 0  [open]··idle a_0··[test ✓]
//!  rung 1  [open]····idle a_1····[test ✓]
//!  rung k  [open]·········idle a_k (≥ T)·········[test ✗]  → T ∈ (a_{k-1}, a_k]: stop
//!  rung N        [open at rung 0's test]·······idle a_N··· (cancelled once settled)
//! ```
//!
//! A test of a connection idled for `a` tells only whether the path's timeout `T` is above
//! `a` (the test is answered) or at most `a` (it is not), and only at `open + a`. Opening rung
//! `k + N` when rung `k` resolves keeps `N` connections idling with densely spaced ages; in
//! the steady state rung `k` is tested at about `c·a_k` with `c = r^N / (r^N − 1)`
//! (`r = 1.04`, `N = 48`: `c ≈ 1.18`), and at lab scale (every rung up to `T` fits in the
//! first `N`) at `a_k` plus the set-up time. The search for one direction settles as soon as
//! the lowest failed rung has every rung below it resolved: the bracket is
//! `(a_{k-1}, a_k]`, one ratio wide.

mod plan;
mod reports;
mod sim;

use std::time::Duration;

pub use plan::{combine, DirectionPlan, DirectionResult};
pub use reports::{Resolved, RungKey, ServerFirstReports};
pub use sim::{Simulation, SimulationResult};

/// Which side sends the first packet after the idle period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The client sends a byte and expects an echo.
    ClientFirst,
    /// The responder sends a byte and expects an acknowledgement.
    ServerFirst,
}

impl Direction {
    /// `"client-first"` or `"server-first"`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::ClientFirst => "client-first",
            Direction::ServerFirst => "server-first",
        }
    }
}

/// What the side that spoke first after the idle period experienced when the flow had
/// expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Expiry {
    /// The packet vanished: no answer, no error (a half-open connection).
    SilentDrop,
    /// The sender got a TCP reset.
    Reset,
    /// The connection was closed in order (FIN), e.g. by an L7 proxy.
    Close,
    /// The test failed but the kind of failure was not observed.
    Unknown,
}

impl Expiry {
    /// `"silent-drop"`, `"rst"`, `"close"` or `"unknown"`.
    pub fn name(self) -> &'static str {
        match self {
            Expiry::SilentDrop => "silent-drop",
            Expiry::Reset => "rst",
            Expiry::Close => "close",
            Expiry::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of testing one rung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The test was answered: the flow survived this idle period.
    Alive,
    /// The test failed: the flow had expired.
    Expired(Expiry),
}

impl Outcome {
    /// The outcome a responder's REPORT byte ([`crate::wire::probe::report`]) stands for;
    /// an unknown byte is an expiry of unknown kind.
    pub fn from_report(b: u8) -> Outcome {
        use crate::wire::probe::report;
        match b {
            report::ALIVE => Outcome::Alive,
            report::SILENT => Outcome::Expired(Expiry::SilentDrop),
            report::RESET => Outcome::Expired(Expiry::Reset),
            report::CLOSE => Outcome::Expired(Expiry::Close),
            _ => Outcome::Expired(Expiry::Unknown),
        }
    }
}

/// Rungs within this factor of the hint use [`LadderConfig::hint_ratio`].
pub const HINT_WINDOW: f64 = 1.15;
/// Ratio below the hinted window.
pub const HINT_BELOW_RATIO: f64 = 1.08;

/// Ladder shape. Build with [`LadderConfig::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct LadderConfig {
    /// Shortest idle period tested. Default: 500 ms.
    pub min: Duration,
    /// Longest idle period considered (the last rung). Default: 30 min.
    pub max: Duration,
    /// Ratio between neighbouring rungs. Default: 1.04 (a 4% wide bracket).
    pub ratio: f64,
    /// Smallest gap between rungs (the bracket may be this wide at small scale: at most 0.3 s
    /// is the goal). Default: 150 ms.
    pub min_step: Duration,
    /// A timeout the path is expected to have: rungs within ±15% of it use `hint_ratio`.
    /// Default: none.
    pub hint: Option<Duration>,
    /// Ratio near the hint. Default: 1.01.
    pub hint_ratio: f64,
    /// Connections idling at once for this direction. Default: 48.
    pub slots: usize,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30 * 60),
            ratio: 1.04,
            min_step: Duration::from_millis(150),
            hint: None,
            hint_ratio: 1.01,
            slots: 48,
        }
    }
}

impl LadderConfig {
    /// Defaults with the longest timeout considered set to `max`.
    pub fn new(max: Duration) -> Self {
        LadderConfig {
            max,
            ..Default::default()
        }
    }
    /// Sets the hint. Default: none.
    pub fn hint(mut self, hint: Option<Duration>) -> Self {
        self.hint = hint;
        self
    }
    /// Sets the number of concurrent connections. Default: 48.
    pub fn slots(mut self, slots: usize) -> Self {
        self.slots = slots;
        self
    }
    /// Sets the rung ratio. Default: 1.04.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// The rung ages, ascending, from `min` to exactly `max`.
    pub fn rungs(&self) -> Vec<Duration> {
        let min = self.min.max(Duration::from_millis(10));
        let max = self.max.max(min);
        let ratio = self.ratio.clamp(1.001, 4.0);
        let hint_ratio = self.hint_ratio.clamp(1.001, ratio);
        let mut out = vec![min];
        let mut a = min;
        while a < max {
            let r = match self.hint.map(|h| h.as_secs_f64()) {
                Some(h) if a.as_secs_f64() >= h / HINT_WINDOW - 1e-9 => {
                    if a.as_secs_f64() < h * HINT_WINDOW {
                        hint_ratio
                    } else {
                        ratio
                    }
                }
                // Below the hinted window: fewer rungs, so that the slots are free for the
                // dense ones.
                Some(_) => ratio.max(HINT_BELOW_RATIO),
                None => ratio,
            };
            let next = Duration::from_secs_f64(a.as_secs_f64() * r).max(a + self.min_step);
            a = next.min(max);
            out.push(a);
        }
        out
    }
}
