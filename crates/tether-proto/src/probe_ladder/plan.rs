//! [`DirectionPlan`]: the search for one direction, and [`combine`] over directions.

use std::time::Duration;

use super::{Direction, Expiry, LadderConfig, Outcome};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rung {
    Pending,
    Opening,
    Idle {
        since: Duration,
    },
    Done {
        outcome: Outcome,
        at: Duration,
        age: Duration,
    },
    Cancelled,
}

/// The result for one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionResult {
    /// Which direction.
    pub direction: Direction,
    /// The timeout is above this (the longest idle period that survived; zero when none did).
    pub lower: Duration,
    /// The timeout is at most this (the shortest idle period that expired); `None`: no
    /// timeout up to the ladder's `max`.
    pub upper: Option<Duration>,
    /// What the first speaker saw at expiry (`None` when nothing expired).
    pub expiry: Option<Expiry>,
    /// False when the results contradict each other (a longer idle period survived a
    /// shorter one that expired) or a connection could not be opened.
    pub conclusive: bool,
    /// Why the result is not conclusive.
    pub note: Option<String>,
    /// Test time of the rung that set the upper bound (for outage cross-checks).
    pub decided_at: Option<Duration>,
    /// Rungs tested.
    pub tests: usize,
}

/// The search for one direction: which rung to open next, when each is due, and when the
/// bracket is settled.
#[derive(Debug, Clone)]
pub struct DirectionPlan {
    direction: Direction,
    ages: Vec<Duration>,
    rungs: Vec<Rung>,
    slots: usize,
    busy: usize,
    next: usize,
    open_failed: bool,
}

impl DirectionPlan {
    /// A plan for `direction` with the ladder `cfg` describes.
    pub fn new(direction: Direction, cfg: &LadderConfig) -> Self {
        let ages = cfg.rungs();
        DirectionPlan {
            direction,
            rungs: vec![Rung::Pending; ages.len()],
            ages,
            slots: cfg.slots.max(1),
            busy: 0,
            next: 0,
            open_failed: false,
        }
    }

    /// The direction.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The rung ages.
    pub fn ages(&self) -> &[Duration] {
        &self.ages
    }

    /// The idle period of rung `k`.
    pub fn age(&self, k: usize) -> Duration {
        self.ages[k]
    }

    fn lowest_failure(&self) -> Option<usize> {
        self.rungs.iter().position(|r| {
            matches!(
                r,
                Rung::Done {
                    outcome: Outcome::Expired(_),
                    ..
                }
            )
        })
    }

    /// The next rung to open, if a slot is free and the search is not settled. The rung is
    /// marked as opening; report [`opened`](Self::opened) or
    /// [`open_failed`](Self::open_failed).
    pub fn next_open(&mut self) -> Option<usize> {
        if self.busy >= self.slots || self.next >= self.ages.len() || self.result().is_some() {
            return None;
        }
        if let Some(f) = self.lowest_failure() {
            if self.next > f {
                return None;
            }
        }
        let k = self.next;
        self.next += 1;
        self.rungs[k] = Rung::Opening;
        self.busy += 1;
        Some(k)
    }

    /// Rung `k`'s connection is established; its idle period started at `since`.
    pub fn opened(&mut self, k: usize, since: Duration) {
        if let Some(r @ Rung::Opening) = self.rungs.get_mut(k) {
            *r = Rung::Idle { since };
        }
    }

    /// Rung `k`'s connection could not be opened: the result will be inconclusive.
    pub fn open_failed(&mut self, k: usize) {
        if let Some(r @ (Rung::Opening | Rung::Idle { .. })) = self.rungs.get_mut(k) {
            *r = Rung::Cancelled;
            self.busy -= 1;
            self.open_failed = true;
        }
    }

    /// When rung `k` is to be tested (its idle start plus its age), once it is open.
    pub fn due(&self, k: usize) -> Option<Duration> {
        match self.rungs.get(k)? {
            Rung::Idle { since } => Some(*since + self.ages[k]),
            _ => None,
        }
    }

    /// Rung `k` was tested at `at`, after an idle period of `age` as measured (a test can be
    /// late; the bracket uses measured ages), with `outcome`. Returns the rungs to cancel
    /// (still idling above a failure, so they can no longer matter).
    pub fn resolve(
        &mut self,
        k: usize,
        outcome: Outcome,
        at: Duration,
        age: Duration,
    ) -> Vec<usize> {
        match self.rungs.get_mut(k) {
            Some(r @ (Rung::Opening | Rung::Idle { .. })) => {
                *r = Rung::Done { outcome, at, age };
                self.busy -= 1;
            }
            _ => return Vec::new(),
        }
        let mut cancel = Vec::new();
        if let Some(f) = self.lowest_failure() {
            for j in f + 1..self.rungs.len() {
                if matches!(self.rungs[j], Rung::Opening | Rung::Idle { .. }) {
                    self.rungs[j] = Rung::Cancelled;
                    self.busy -= 1;
                    cancel.push(j);
                }
            }
        }
        if self.result().is_some() {
            // Settled: nothing still idling matters.
            for j in 0..self.rungs.len() {
                if matches!(self.rungs[j], Rung::Opening | Rung::Idle { .. }) {
                    self.rungs[j] = Rung::Cancelled;
                    self.busy -= 1;
                    cancel.push(j);
                }
            }
        }
        cancel
    }

    fn measured(&self) -> impl Iterator<Item = (Outcome, Duration)> + '_ {
        self.rungs.iter().filter_map(|r| match r {
            Rung::Done { outcome, age, .. } => Some((*outcome, *age)),
            _ => None,
        })
    }

    /// The current bracket from measured ages: (longest survived idle below the shortest
    /// expired one, shortest expired idle).
    pub fn bounds(&self) -> (Duration, Option<Duration>) {
        let upper = self
            .measured()
            .filter(|(o, _)| *o != Outcome::Alive)
            .map(|(_, a)| a)
            .min();
        let lower = self
            .measured()
            .filter(|(o, a)| *o == Outcome::Alive && upper.is_none_or(|u| *a < u))
            .map(|(_, a)| a)
            .max()
            .unwrap_or(Duration::ZERO);
        (lower, upper)
    }

    /// Connections currently opening or idling.
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// Rungs tested so far.
    pub fn tests(&self) -> usize {
        self.rungs
            .iter()
            .filter(|r| matches!(r, Rung::Done { .. }))
            .count()
    }

    /// The latest planned test time of a rung the result still depends on (for an ETA):
    /// with a failure, the rungs below it; without, the top rung. `None` while such a rung
    /// is not open yet.
    pub fn planned_end(&self) -> Option<Duration> {
        let last = self.lowest_failure().unwrap_or(self.ages.len());
        (0..last)
            .filter(|&k| !matches!(self.rungs[k], Rung::Done { .. } | Rung::Cancelled))
            .map(|k| self.due(k))
            .try_fold(Duration::ZERO, |acc, d| d.map(|d| acc.max(d)))
    }

    /// The result once the search for this direction is settled: the lowest failed rung has
    /// every rung below it resolved, or every rung survived.
    pub fn result(&self) -> Option<DirectionResult> {
        let failure = self.lowest_failure();
        let last = failure.unwrap_or(self.ages.len() - 1);
        let settled = if self.open_failed {
            true
        } else {
            self.rungs[..=last]
                .iter()
                .all(|r| matches!(r, Rung::Done { .. }))
        };
        if !settled {
            return None;
        }
        let (lower, upper) = self.bounds();
        let mut note = None;
        if self.open_failed {
            note = Some("a probe connection could not be opened".to_string());
        } else if let Some(u) = upper {
            let survived = self
                .measured()
                .filter(|(o, a)| *o == Outcome::Alive && *a >= u)
                .map(|(_, a)| a)
                .max();
            if let Some(a) = survived {
                note = Some(format!(
                    "an idle period of {} survived after one of {} expired",
                    secs(a),
                    secs(u)
                ));
            }
        }
        let (expiry, decided_at) = match failure.map(|f| self.rungs[f]) {
            Some(Rung::Done {
                outcome: Outcome::Expired(e),
                at,
                ..
            }) => (Some(e), Some(at)),
            _ => (None, None),
        };
        Some(DirectionResult {
            direction: self.direction,
            lower,
            upper,
            expiry,
            conclusive: note.is_none(),
            note,
            decided_at,
            tests: self.tests(),
        })
    }
}

/// Seconds with two decimals, for notes.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// How long the path keeps idle flows, combined over the directions probed: the flow dies
/// when its first direction does, so the bracket is `(min lower, min upper]` (it contains
/// `min(T_client_first, T_server_first)` whenever each direction's bracket contains its own).
pub fn combine(results: &[DirectionResult]) -> (Duration, Option<Duration>) {
    let lower = results
        .iter()
        .map(|r| r.lower)
        .min()
        .unwrap_or(Duration::ZERO);
    let upper = results.iter().filter_map(|r| r.upper).min();
    (lower, upper)
}
