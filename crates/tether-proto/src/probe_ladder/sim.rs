//! [`Simulation`]: a whole probe replayed in virtual time against a path with a known
//! timeout, to check schedules and the bracketing logic exactly.

use std::time::Duration;

use super::{DirectionPlan, DirectionResult, Expiry, Outcome};

/// A simulated path for tests and for checking schedules: replays a whole probe in virtual
/// time against a path that forgets flows idle for `timeout` or longer.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The path's true idle timeout (`None`: it never forgets).
    pub timeout: Option<Duration>,
    /// What the first speaker sees at expiry.
    pub expiry: Expiry,
    /// Round-trip time (connection set-up costs one, a test answer one).
    pub rtt: Duration,
    /// How long a silent test waits for its answer.
    pub grace: Duration,
    /// Gap between connection opens (pacing).
    pub pace: Duration,
}

/// What [`Simulation::run`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulationResult {
    /// The direction's result.
    pub result: DirectionResult,
    /// Virtual time at which the result was settled.
    pub wall: Duration,
    /// Most connections open at once.
    pub peak_connections: usize,
    /// Connections opened in all.
    pub connections: usize,
}

impl Simulation {
    /// Runs `plan` to its result in virtual time.
    pub fn run(&self, mut plan: DirectionPlan) -> SimulationResult {
        // Events: (time, kind, rung). kind 0 = opened, 1 = result.
        let mut events: Vec<(Duration, u8, usize, Option<Outcome>)> = Vec::new();
        let mut now = Duration::ZERO;
        let mut next_open_at = Duration::ZERO;
        let mut peak = 0;
        let mut opened = 0;
        loop {
            while let Some(k) = plan.next_open() {
                let start = now.max(next_open_at);
                next_open_at = start + self.pace;
                opened += 1;
                events.push((start + self.rtt, 0, k, None));
            }
            peak = peak.max(plan.busy());
            if let Some(result) = plan.result() {
                return SimulationResult {
                    result,
                    wall: now,
                    peak_connections: peak,
                    connections: opened,
                };
            }
            // Earliest event.
            let Some(i) = (0..events.len()).min_by_key(|&i| (events[i].0, events[i].1)) else {
                // Nothing pending yet the plan is not settled: cannot happen with a finite
                // ladder; report what there is.
                let (lower, upper) = plan.bounds();
                return SimulationResult {
                    result: DirectionResult {
                        direction: plan.direction(),
                        lower,
                        upper,
                        expiry: None,
                        conclusive: false,
                        note: Some("simulation stalled".into()),
                        decided_at: None,
                        tests: plan.tests(),
                    },
                    wall: now,
                    peak_connections: peak,
                    connections: opened,
                };
            };
            let (t, kind, k, outcome) = events.swap_remove(i);
            now = t;
            match (kind, outcome) {
                (0, _) => {
                    plan.opened(k, t);
                    let due = plan.due(k).unwrap_or(t);
                    let age = plan.age(k);
                    let expired = self.timeout.is_some_and(|to| age >= to);
                    let (at, outcome) = if !expired {
                        (due + self.rtt, Outcome::Alive)
                    } else {
                        match self.expiry {
                            Expiry::SilentDrop | Expiry::Unknown => {
                                (due + self.grace, Outcome::Expired(self.expiry))
                            }
                            e => (due + self.rtt / 2, Outcome::Expired(e)),
                        }
                    };
                    // The test happens at `due`; its result is known at `at`.
                    events.push((at, 1, k, Some(outcome)));
                    let _ = due;
                }
                (_, Some(o)) => {
                    let test_at = plan.due(k).unwrap_or(t);
                    let age = plan.age(k);
                    let cancelled = plan.resolve(k, o, test_at, age);
                    events.retain(|e| !cancelled.contains(&e.2));
                }
                _ => {}
            }
        }
    }
}
