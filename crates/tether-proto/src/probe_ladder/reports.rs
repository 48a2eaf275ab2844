//! [`ServerFirstReports`]: pairing what the client saw of a server-first test with the
//! responder's REPORT, into the outcome and the idle period the bracket uses.
//!
//! ```text
//!  client:    answer read ··· (its own clock starts here, late on a busy client) ··· 'S' read
//!  responder: answer written ··········· idle period it times ··········· 'S' written
//!                                                                          └─ REPORT(outcome, idle)
//! ```
//!
//! In a server-first test the responder ends the idle period, so the responder times it and
//! its REPORT carries the period it tested: that is the age a test counts for (less a round
//! trip when it survived, see [`ServerFirstReports::with_allowance`]). The client's clock for the same period starts when its task gets round to
//! reading the answer, which on a busy client is well after the answer arrived; measured
//! there, the 3 s top rung of a `--max 3s` probe came out as 2.95–2.998 s, and a probe that
//! found no timeout below 3 s reported that only 2.95 s had survived. The client's own
//! measure is only the fallback when no REPORT comes (a responder behind a load balancer may
//! hold the control connection on another instance).

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Expiry, Outcome};

/// A rung of one direction: (direction index, rung index).
pub type RungKey = (usize, usize);

/// A server-first test whose outcome and tested idle period are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Which rung.
    pub key: RungKey,
    /// Whether the flow survived the idle period.
    pub outcome: Outcome,
    /// When the test happened (since the probe started).
    pub at: Duration,
    /// The idle period tested: the responder's measure, or the client's without a REPORT.
    pub age: Duration,
}

/// A test the client has finished with, waiting for its REPORT.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    at: Duration,
    saw_server_byte: bool,
    client_age: Duration,
    deadline: Duration,
}

/// A REPORT that came before the client's own result.
#[derive(Debug, Clone, Copy)]
struct Early {
    outcome: Outcome,
    idle: Option<Duration>,
}

/// Server-first tests between the client's result and the responder's REPORT.
#[derive(Debug, Default)]
pub struct ServerFirstReports {
    waiting: BTreeMap<RungKey, Waiting>,
    early: BTreeMap<RungKey, Early>,
    allowance: Duration,
}

impl ServerFirstReports {
    /// An empty set, counting reported idle periods as they are.
    pub fn new() -> Self {
        ServerFirstReports::default()
    }

    /// An empty set whose surviving tests count for the reported idle period minus
    /// `allowance` (a round trip). The responder times from its write of the answer, but the
    /// flow idles from the last packet to cross the path, the client's acknowledgement of
    /// the answer, up to a round trip later: a survived test proves only the shorter period.
    /// (An expired test counts for the reported period: the flow cannot have idled longer.)
    /// The client asks for idle periods `allowance` longer to make up for it.
    pub fn with_allowance(allowance: Duration) -> Self {
        ServerFirstReports {
            allowance,
            ..ServerFirstReports::default()
        }
    }

    /// The client is done with server-first test `key`, tested at `at`: it saw the server's
    /// byte (`Some(Alive)`), saw the flow fail itself (`Some(Expired(_))`: reset, close or
    /// garbage), or saw nothing within the grace period (`None`). `client_age` is the idle
    /// period as the client measured it (the nominal age when it saw nothing). A REPORT is
    /// awaited until `deadline`.
    ///
    /// Returns the result when it is known now: the client saw a failure itself, or the
    /// REPORT already came.
    pub fn tested(
        &mut self,
        key: RungKey,
        saw: Option<Outcome>,
        at: Duration,
        client_age: Duration,
        deadline: Duration,
    ) -> Option<Resolved> {
        if let Some(Outcome::Expired(e)) = saw {
            self.early.remove(&key);
            return Some(Resolved {
                key,
                outcome: Outcome::Expired(e),
                at,
                age: client_age,
            });
        }
        let saw_server_byte = saw == Some(Outcome::Alive);
        if let Some(r) = self.early.remove(&key) {
            return Some(pair(
                key,
                saw_server_byte,
                r,
                at,
                client_age,
                self.allowance,
            ));
        }
        self.waiting.insert(
            key,
            Waiting {
                at,
                saw_server_byte,
                client_age,
                deadline,
            },
        );
        None
    }

    /// The responder's REPORT for `key`: what it saw (`Alive` when the client acknowledged
    /// its byte) and the idle period it tested (`None` when it did not say). `due` is when
    /// the rung is due and `nominal` its age, for a REPORT of a failure that comes before the
    /// client's own result (a reset is reported at once, while the client still waits): that
    /// test counts as done at its due time. `due` is `None` for a rung not idling.
    pub fn report(
        &mut self,
        key: RungKey,
        reported: Outcome,
        idle: Option<Duration>,
        due: Option<Duration>,
        nominal: Duration,
    ) -> Option<Resolved> {
        let r = Early {
            outcome: reported,
            idle,
        };
        if let Some(w) = self.waiting.remove(&key) {
            return Some(pair(
                key,
                w.saw_server_byte,
                r,
                w.at,
                w.client_age,
                self.allowance,
            ));
        }
        match (reported, due) {
            (Outcome::Expired(_), Some(due)) => Some(Resolved {
                key,
                outcome: reported,
                at: due,
                age: idle.unwrap_or(nominal),
            }),
            _ => {
                self.early.insert(key, r);
                None
            }
        }
    }

    /// Tests whose REPORT did not come by their deadline (`now` since the probe started):
    /// one that saw the server's byte survived (with the client's measure of its idle
    /// period); one that saw nothing expired in a way nobody observed (`unknown`).
    pub fn overdue(&mut self, now: Duration) -> Vec<Resolved> {
        let due: Vec<RungKey> = self
            .waiting
            .iter()
            .filter(|(_, w)| now >= w.deadline)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|key| {
                let w = self.waiting.remove(&key)?;
                Some(Resolved {
                    key,
                    outcome: if w.saw_server_byte {
                        Outcome::Alive
                    } else {
                        Outcome::Expired(Expiry::Unknown)
                    },
                    at: w.at,
                    age: w.client_age,
                })
            })
            .collect()
    }

    /// Forgets rung `key` (cancelled: its result no longer matters).
    pub fn forget(&mut self, key: RungKey) {
        self.waiting.remove(&key);
        self.early.remove(&key);
    }

    /// Tests waiting for their REPORT.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The client's view and the REPORT together. The idle period is the responder's whenever it
/// said; the outcome is `Alive` when the client saw the server's byte (the flow survived the
/// idle period, whatever happened to the acknowledgement after it), else what the responder
/// saw (an `Alive` REPORT without the client having seen the byte contradicts itself and
/// counts as an unobserved expiry).
fn pair(
    key: RungKey,
    saw_server_byte: bool,
    r: Early,
    at: Duration,
    client_age: Duration,
    allowance: Duration,
) -> Resolved {
    let outcome = match (saw_server_byte, r.outcome) {
        (true, _) => Outcome::Alive,
        (false, Outcome::Alive) => Outcome::Expired(Expiry::Unknown),
        (false, e) => e,
    };
    let age = match (r.idle, outcome) {
        (Some(idle), Outcome::Alive) => idle.saturating_sub(allowance),
        (Some(idle), _) => idle,
        (None, _) => client_age,
    };
    Resolved {
        key,
        outcome,
        at,
        age,
    }
}
