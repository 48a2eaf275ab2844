//! The probe client: opens the control connection and the rung connections, tests each rung
//! when it is due, and feeds the results to the [`ladder`] plans.
//!
//! ```text
//!  control task ── PING every grace/2 ──▶ responder ── PONG / REPORT ──▶ events
//!  rung tasks (≤ slots per direction) ── Opened / Tested ──────────────▶ events
//!  coordinator: events → DirectionPlan → open more rungs, cancel settled ones, progress
//! ```
//!
//! A result is only accepted when the control connection answered a ping sent after the
//! decisive test; a control ping unanswered for `max(3·grace, 1 s)`, a lost control
//! connection, or a rung that cannot be opened makes the result inconclusive instead of wrong.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::conns::{index_of, open, run_control, run_rung, Event, RungJob};
use super::ladder::{
    self, Direction, DirectionPlan, DirectionResult, LadderConfig, Outcome, Resolved, RungKey,
    ServerFirstReports,
};
use super::{Mode, Request};

/// Probe settings. Build with [`ProbeConfig::new`] and the setters.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The responder (`tether serve`).
    pub addr: SocketAddr,
    /// Longest timeout considered; none below it reports "no timeout below max".
    /// Default: 30 min.
    pub max: Duration,
    /// Shortest idle period tested. Default: 500 ms.
    pub min: Duration,
    /// Connections idling at once, over both directions (the control connection is extra).
    /// Default: 96.
    pub connections: usize,
    /// Probe the client-speaks-first direction. Default: true.
    pub client_first: bool,
    /// Probe the server-speaks-first direction. Default: true.
    pub server_first: bool,
    /// Expected timeout: rungs are dense (1%) within ±15% of it (8% apart below). Default: none.
    pub hint: Option<Duration>,
    /// Rung ratio elsewhere. Default: 1.04.
    pub ratio: f64,
    /// How long an unanswered test waits; `None` derives it from the RTT:
    /// `max(200 ms + 3·RTT, 300 ms)`. Default: `None`.
    pub grace: Option<Duration>,
    /// Connection set-up deadline. Default: 5 s.
    pub connect_timeout: Duration,
    /// Gap between connection opens. Default: 2 ms.
    pub pace: Duration,
}

impl ProbeConfig {
    /// Defaults, probing the responder at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        ProbeConfig {
            addr,
            max: Duration::from_secs(30 * 60),
            min: Duration::from_millis(500),
            connections: 96,
            client_first: true,
            server_first: true,
            hint: None,
            ratio: 1.04,
            grace: None,
            connect_timeout: Duration::from_secs(5),
            pace: Duration::from_millis(2),
        }
    }
    /// Sets the longest timeout considered. Default: 30 min.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }
    /// Sets the connection bound. Default: 96.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }
    /// Chooses the directions. Default: both.
    pub fn directions(mut self, client_first: bool, server_first: bool) -> Self {
        self.client_first = client_first;
        self.server_first = server_first;
        self
    }
    /// Sets the hint. Default: none.
    pub fn hint(mut self, hint: Option<Duration>) -> Self {
        self.hint = hint;
        self
    }
    /// Sets the grace period. Default: derived from the RTT.
    pub fn grace(mut self, grace: Option<Duration>) -> Self {
        self.grace = grace;
        self
    }
}

/// Why a probe could not run at all (a path that misbehaves during the probe gives an
/// inconclusive [`ProbeReport`] instead).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The responder could not be reached.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The responder.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The responder refused the probe.
    #[error("{addr} refused the probe: {text}")]
    Refused {
        /// The responder.
        addr: SocketAddr,
        /// Its reason.
        text: String,
    },
    /// The responder answered something that is not a probe answer.
    #[error("{addr} is not a tether probe responder: {why}")]
    Protocol {
        /// The responder.
        addr: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// Nothing to probe (no direction, or zero connections).
    #[error("invalid probe settings: {0}")]
    Config(String),
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// The path keeps idle flows longer than this.
    pub lower: Duration,
    /// The path forgets idle flows after at most this; `None`: no timeout below `max`.
    pub upper: Option<Duration>,
    /// The longest timeout considered.
    pub max: Duration,
    /// Whether the bracket can be trusted.
    pub conclusive: bool,
    /// Why the result is inconclusive.
    pub note: Option<String>,
    /// Per direction.
    pub directions: Vec<DirectionResult>,
    /// Wall time of the whole probe, set-up included.
    pub wall: Duration,
    /// Round-trip time of the control connection's set-up.
    pub rtt: Duration,
    /// Grace period used for silent tests.
    pub grace: Duration,
    /// Rung connections opened.
    pub connections: usize,
}

impl ProbeReport {
    /// The result of one direction.
    pub fn direction(&self, d: Direction) -> Option<&DirectionResult> {
        self.directions.iter().find(|r| r.direction == d)
    }
}

/// Where a running probe stands, for progress display.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Since the probe started.
    pub elapsed: Duration,
    /// Estimated time left (the latest test the result still depends on, plus grace).
    pub remaining: Duration,
    /// Current lower bound over the directions.
    pub lower: Duration,
    /// Current upper bound, once some idle period expired.
    pub upper: Option<Duration>,
    /// Tests done.
    pub tests: usize,
    /// Rung connections open now.
    pub open: usize,
}

/// The rung plans of every direction, their running connection tasks, and the server-first
/// tests waiting for the responder's REPORT.
struct Rungs {
    plans: Vec<DirectionPlan>,
    tasks: HashMap<RungKey, JoinHandle<()>>,
    reports: ServerFirstReports,
}

impl Rungs {
    /// Records a test result; closes the rungs it made pointless.
    fn resolve(&mut self, r: Resolved) {
        let (dir, rung) = r.key;
        for c in self.plans[dir].resolve(rung, r.outcome, r.at, r.age) {
            self.reports.forget((dir, c));
            if let Some(t) = self.tasks.remove(&(dir, c)) {
                t.abort();
            }
        }
    }
}

fn session_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Unique enough within one responder: time and process id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_be_bytes(b)
}

/// Runs a probe against the responder at `cfg.addr`, calling `progress` a few times per
/// second. Returns once the bracket is settled in every direction probed, or as soon as the
/// result cannot be trusted (inconclusive).
pub async fn run(
    cfg: ProbeConfig,
    mut progress: impl FnMut(&Progress),
) -> Result<ProbeReport, ProbeError> {
    let dirs: Vec<Direction> = [
        (cfg.client_first, Direction::ClientFirst),
        (cfg.server_first, Direction::ServerFirst),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, d)| *d)
    .collect();
    if dirs.is_empty() {
        return Err(ProbeError::Config("no direction to probe".into()));
    }
    if cfg.connections < dirs.len() {
        return Err(ProbeError::Config(format!(
            "--connections {} is below one per direction",
            cfg.connections
        )));
    }
    if cfg.max > super::MAX_DELAY {
        return Err(ProbeError::Config(format!(
            "max {} is above the longest idle period a responder accepts ({})",
            super::secs(cfg.max),
            super::secs(super::MAX_DELAY)
        )));
    }
    if cfg
        .grace
        .is_some_and(|g| g.is_zero() || g > super::MAX_GRACE)
    {
        return Err(ProbeError::Config(format!(
            "grace must be between 1 ms and {}",
            super::secs(super::MAX_GRACE)
        )));
    }
    if cfg.max < cfg.min {
        return Err(ProbeError::Config(format!(
            "max {} is below the shortest idle period tested ({})",
            super::secs(cfg.max),
            super::secs(cfg.min)
        )));
    }
    let start = Instant::now();
    let session = session_id();
    let since_start = |t: Instant| t.saturating_duration_since(start);

    // Control connection first: it measures the RTT and must exist before server-first
    // connections report.
    let control_req = Request {
        mode: Mode::Control,
        session,
        index: u32::MAX,
        delay: Duration::ZERO,
        grace: Duration::from_secs(1),
    };
    let t0 = Instant::now();
    let ctl = match tokio::time::timeout(cfg.connect_timeout, open(cfg.addr, &control_req)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ProbeError::Connect {
                addr: cfg.addr,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })
        }
    };
    // Connect + request/answer: two round trips.
    let rtt = t0.elapsed() / 2;
    let grace = cfg
        .grace
        .unwrap_or_else(|| (Duration::from_millis(200) + rtt * 3).max(Duration::from_millis(300)));
    // The round trip in whole milliseconds, rounded up (requests carry milliseconds).
    let rtt_ms = Duration::from_millis(u64::try_from(rtt.as_micros().div_ceil(1000)).unwrap_or(0));
    let ping_interval = (grace / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let outage_after = (grace * 3).max(Duration::from_secs(1));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let control_task = tokio::spawn(run_control(ctl, ping_interval, outage_after, tx.clone()));

    let per_dir = cfg.connections / dirs.len();
    let plans: Vec<DirectionPlan> = dirs
        .iter()
        .map(|&d| {
            let mut l = LadderConfig::new(cfg.max)
                .hint(cfg.hint)
                .slots(per_dir)
                .ratio(cfg.ratio);
            l.min = cfg.min;
            DirectionPlan::new(d, &l)
        })
        .collect();
    let mut rungs = Rungs {
        plans,
        tasks: HashMap::new(),
        reports: ServerFirstReports::with_allowance(rtt_ms),
    };
    let mut next_open_at = Instant::now();
    let mut opened = 0usize;
    let mut last_pong_sent: Option<Instant> = None;
    let mut failure: Option<String> = None;
    let hard_cap = cfg.max * 3 + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let results = loop {
        // Open rungs while slots are free, alternating directions.
        let mut any = true;
        while any {
            any = false;
            for (di, plan) in rungs.plans.iter_mut().enumerate() {
                if let Some(k) = plan.next_open() {
                    any = true;
                    let now = Instant::now();
                    let start_at = next_open_at.max(now);
                    next_open_at = start_at + cfg.pace;
                    opened += 1;
                    let req = Request {
                        mode: match plan.direction() {
                            Direction::ClientFirst => Mode::ClientFirst,
                            Direction::ServerFirst => Mode::ServerFirst,
                        },
                        session,
                        index: index_of(di, k),
                        // Server-first: the responder times from its write of the answer,
                        // the flow idles from the client's acknowledgement of it, up to a
                        // round trip later; ask for that much more (see `with_allowance`).
                        delay: match plan.direction() {
                            Direction::ClientFirst => plan.age(k),
                            Direction::ServerFirst => plan.age(k) + rtt_ms,
                        },
                        grace,
                    };
                    let job = RungJob {
                        addr: cfg.addr,
                        req,
                        dir: di,
                        rung: k,
                        start_at,
                        connect_timeout: cfg.connect_timeout,
                        tx: tx.clone(),
                    };
                    rungs.tasks.insert((di, k), tokio::spawn(run_rung(job)));
                }
            }
        }

        // Settled? Every direction has a result, and the control connection answered a ping
        // sent after each decisive test (the path was up when the test failed).
        let settled: Option<Vec<DirectionResult>> =
            rungs.plans.iter().map(|p| p.result()).collect();
        if let Some(results) = settled {
            let verified = results.iter().all(|r| match r.decided_at {
                Some(d) => last_pong_sent.is_some_and(|p| since_start(p) >= d),
                None => true,
            });
            if verified || failure.is_some() {
                break results;
            }
        }
        if failure.is_some() {
            // Not settled and not trustworthy: stop now with what there is.
            break rungs.plans.iter().map(unsettled).collect();
        }

        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = tick.tick() => None,
        };
        let now = Instant::now();
        if since_start(now) > hard_cap {
            failure = Some(format!(
                "the probe ran for {} without settling",
                super::secs(since_start(now))
            ));
        }
        match ev {
            Some(Event::Opened { dir, rung, since }) => {
                rungs.plans[dir].opened(rung, since_start(since))
            }
            Some(Event::OpenFailed { dir, rung }) => {
                rungs.tasks.remove(&(dir, rung));
                rungs.plans[dir].open_failed(rung);
                failure.get_or_insert_with(|| "a probe connection could not be opened".into());
            }
            Some(Event::Tested {
                dir,
                rung,
                at,
                age,
                age_max,
                outcome,
            }) => {
                // The task finishes on its own (a surviving connection closes in order).
                rungs.tasks.remove(&(dir, rung));
                let key = (dir, rung);
                let at = since_start(at);
                let resolved = match (rungs.plans[dir].direction(), outcome) {
                    // A survived test counts for the least its idle period can have
                    // lasted, an expired one for the most: both bounds stay true.
                    (Direction::ClientFirst, Some(outcome)) => Some(Resolved {
                        key,
                        outcome,
                        at,
                        age: if outcome == Outcome::Alive {
                            age
                        } else {
                            age_max
                        },
                    }),
                    // Server-first: the responder timed the idle period; its REPORT says
                    // how long it was (and, when the client saw nothing, what happened).
                    (_, outcome) => {
                        let deadline = since_start(now) + grace * 2;
                        rungs.reports.tested(key, outcome, at, age, deadline)
                    }
                };
                if let Some(r) = resolved {
                    rungs.resolve(r);
                }
            }
            Some(Event::Pong { sent }) => {
                last_pong_sent = Some(last_pong_sent.map_or(sent, |p| p.max(sent)));
            }
            Some(Event::Report {
                index,
                outcome,
                idle_us,
            }) => {
                let key = ((index >> 24) as usize, (index & 0x00ff_ffff) as usize);
                let (dir, rung) = key;
                let server_first = rungs
                    .plans
                    .get(dir)
                    .is_some_and(|p| p.direction() == Direction::ServerFirst);
                if server_first && rung < rungs.plans[dir].ages().len() {
                    let plan = &rungs.plans[dir];
                    let idle = (idle_us > 0).then(|| Duration::from_micros(idle_us));
                    let reported = Outcome::from_report(outcome);
                    let (due, nominal) = (plan.due(rung), plan.age(rung));
                    if let Some(r) = rungs.reports.report(key, reported, idle, due, nominal) {
                        // Reported before the client's own result (an RST is immediate):
                        // the connection has nothing left to tell.
                        if let Some(t) = rungs.tasks.remove(&key) {
                            t.abort();
                        }
                        rungs.resolve(r);
                    }
                }
            }
            Some(Event::ControlLost(why)) => {
                failure.get_or_insert(why);
            }
            None => {}
        }
        // Server-first tests whose REPORT never came.
        for r in rungs.reports.overdue(since_start(now)) {
            rungs.resolve(r);
        }

        let elapsed = since_start(now);
        let plans = &rungs.plans;
        let (lower, upper) = {
            let b: Vec<_> = plans.iter().map(|p| p.bounds()).collect();
            (
                b.iter().map(|b| b.0).min().unwrap_or_default(),
                b.iter().filter_map(|b| b.1).min(),
            )
        };
        let planned = plans
            .iter()
            .map(|p| p.planned_end())
            .try_fold(Duration::ZERO, |acc, d| d.map(|d| acc.max(d)));
        let remaining = match planned {
            Some(end) => (end + grace).saturating_sub(elapsed),
            // Rungs not yet open: at worst the top rung, opened now.
            None => cfg.max + grace,
        };
        progress(&Progress {
            elapsed,
            remaining,
            lower,
            upper,
            tests: plans.iter().map(|p| p.tests()).sum(),
            open: plans.iter().map(|p| p.busy()).sum(),
        });
    };

    let wall = start.elapsed();
    for (_, t) in rungs.tasks.drain() {
        t.abort();
    }
    control_task.abort();

    let (lower, upper) = ladder::combine(&results);
    let mut note = failure;
    if note.is_none() {
        note = results.iter().find_map(|r| {
            r.note
                .as_ref()
                .map(|n| format!("{}: {n}", r.direction.name()))
        });
    }
    Ok(ProbeReport {
        lower,
        upper,
        max: cfg.max,
        conclusive: note.is_none(),
        note,
        directions: results,
        wall,
        rtt,
        grace,
        connections: opened,
    })
}

/// A direction that had not settled when the probe stopped: its partial bounds, flagged.
fn unsettled(p: &DirectionPlan) -> DirectionResult {
    p.result().unwrap_or_else(|| {
        let (lower, upper) = p.bounds();
        DirectionResult {
            direction: p.direction(),
            lower,
            upper,
            expiry: None,
            conclusive: false,
            note: Some("not settled".into()),
            decided_at: None,
            tests: p.tests(),
        }
    })
}
