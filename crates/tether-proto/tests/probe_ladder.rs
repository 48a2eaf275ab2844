//! The probe ladder (`tether_proto::probe_ladder`) in virtual time: rung shapes, brackets
//! against simulated paths from 0.2 s to 50 min, and the plan's bookkeeping.

use std::time::Duration;

use tether_proto::probe_ladder::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sim(timeout: Option<f64>, expiry: Expiry) -> Simulation {
    Simulation {
        timeout: timeout.map(Duration::from_secs_f64),
        expiry,
        rtt: ms(1),
        grace: ms(200),
        pace: ms(2),
    }
}

#[test]
fn rungs_are_geometric_with_a_floor_and_end_at_max() {
    let r = LadderConfig::new(Duration::from_secs(60)).rungs();
    assert_eq!(r[0], ms(500));
    assert_eq!(*r.last().unwrap(), Duration::from_secs(60));
    for w in r.windows(2) {
        let gap = w[1] - w[0];
        let rel = w[1].as_secs_f64() / w[0].as_secs_f64();
        assert!(gap >= ms(150) || w[1] == Duration::from_secs(60), "{w:?}");
        assert!(rel <= 1.3 + 1e-9, "{w:?}");
        if w[0] >= Duration::from_secs(4) && w[1] < Duration::from_secs(60) {
            assert!((rel - 1.04).abs() < 1e-6, "{w:?}");
        }
    }
}

#[test]
fn hint_makes_rungs_dense_near_it() {
    let h = Duration::from_secs(240);
    let plain = LadderConfig::new(Duration::from_secs(600)).rungs();
    let hinted = LadderConfig::new(Duration::from_secs(600))
        .hint(Some(h))
        .rungs();
    let near = |r: &[Duration]| {
        r.iter()
            .filter(|a| a.as_secs_f64() > 200.0 && a.as_secs_f64() < 280.0)
            .count()
    };
    assert!(near(&hinted) >= 3 * near(&plain), "{hinted:?}");
    let around: Vec<_> = hinted
        .windows(2)
        .filter(|w| w[0] >= Duration::from_secs(220) && w[1] <= Duration::from_secs(260))
        .collect();
    assert!(around
        .iter()
        .all(|w| w[1].as_secs_f64() / w[0].as_secs_f64() < 1.011));
}

/// The bound: the bracket contains the truth, is at most 5% (or 0.3 s) wide, and
/// the search ends within 1.3× the timeout plus set-up.
fn check(t: f64, expiry: Expiry, cfg: &LadderConfig) -> SimulationResult {
    let s = sim(Some(t), expiry);
    let out = s.run(DirectionPlan::new(Direction::ClientFirst, cfg));
    let r = &out.result;
    let upper = r.upper.expect("an upper bound").as_secs_f64();
    let lower = r.lower.as_secs_f64();
    assert!(r.conclusive, "{r:?}");
    assert!(lower < t && t <= upper, "T={t}: ({lower}, {upper}]");
    assert!(
        upper - lower <= (0.05 * t).max(0.3) + 1e-9,
        "T={t}: ({lower}, {upper}] too wide"
    );
    assert_eq!(r.expiry, Some(expiry));
    // Set-up: one RTT plus pacing of the first slots.
    let setup = s.rtt.as_secs_f64() + s.pace.as_secs_f64() * cfg.slots as f64;
    let wall = out.wall.as_secs_f64();
    assert!(
        wall <= 1.3 * t + setup + s.grace.as_secs_f64(),
        "T={t}: wall {wall}"
    );
    assert!(out.peak_connections <= cfg.slots);
    out
}

#[test]
fn lab_scale_timeouts_are_bracketed_within_bounds() {
    let cfg = LadderConfig::new(Duration::from_secs(30));
    for t in [0.9, 3.0, 3.05, 6.0, 6.33, 10.0, 12.7] {
        for e in [Expiry::SilentDrop, Expiry::Reset] {
            check(t, e, &cfg);
        }
    }
}

#[test]
fn large_timeouts_finish_within_1_3x() {
    let cfg = LadderConfig::new(Duration::from_secs(3600));
    for t in [60.0, 240.0, 350.0, 1200.0, 3000.0] {
        let out = check(t, Expiry::SilentDrop, &cfg);
        assert!(out.wall.as_secs_f64() <= 1.3 * t, "T={t}: {out:?}");
    }
}

#[test]
fn hint_gives_a_narrower_bracket_near_the_hint() {
    let cfg = LadderConfig::new(Duration::from_secs(3600)).hint(Some(Duration::from_secs(240)));
    let out = check(241.0, Expiry::SilentDrop, &cfg);
    let r = out.result;
    let w = r.upper.unwrap().as_secs_f64() - r.lower.as_secs_f64();
    assert!(w <= 0.011 * 241.0, "{r:?}");
    // Away from the hint the bracket is coarser below it, still inside 1.3x everywhere.
    for t in [
        30.0, 150.0, 199.0, 205.0, 230.0, 270.0, 280.0, 290.0, 300.0, 320.0, 900.0,
    ] {
        let o =
            sim(Some(t), Expiry::SilentDrop).run(DirectionPlan::new(Direction::ClientFirst, &cfg));
        let (l, u) = (
            o.result.lower.as_secs_f64(),
            o.result.upper.unwrap().as_secs_f64(),
        );
        assert!(l < t && t <= u, "T={t}: ({l}, {u}]");
        assert!(u / l <= HINT_BELOW_RATIO + 1e-6, "T={t}: ({l}, {u}]");
        assert!(o.wall.as_secs_f64() <= 1.3 * t, "T={t}: {:?}", o.wall);
    }
}

#[test]
fn fewer_slots_still_bracket_but_take_longer() {
    let wide = LadderConfig::new(Duration::from_secs(3600));
    let narrow = LadderConfig::new(Duration::from_secs(3600)).slots(16);
    let s = sim(Some(300.0), Expiry::SilentDrop);
    let a = s.run(DirectionPlan::new(Direction::ClientFirst, &wide));
    let b = s.run(DirectionPlan::new(Direction::ClientFirst, &narrow));
    assert!(b.peak_connections <= 16);
    assert!(b.result.lower < Duration::from_secs(300));
    assert!(b.result.upper.unwrap() >= Duration::from_secs(300));
    assert!(b.wall > a.wall, "{:?} vs {:?}", b.wall, a.wall);
}

#[test]
fn no_timeout_below_max() {
    let cfg = LadderConfig::new(Duration::from_secs(2));
    let out = sim(None, Expiry::SilentDrop).run(DirectionPlan::new(Direction::ClientFirst, &cfg));
    assert_eq!(out.result.upper, None);
    assert_eq!(out.result.lower, Duration::from_secs(2));
    assert!(out.result.conclusive);
    assert!(out.wall < Duration::from_secs(3), "{:?}", out.wall);
}

#[test]
fn timeout_below_the_first_rung_gives_zero_lower_bound() {
    let cfg = LadderConfig::new(Duration::from_secs(10));
    let out = sim(Some(0.2), Expiry::Reset).run(DirectionPlan::new(Direction::ClientFirst, &cfg));
    assert_eq!(out.result.lower, Duration::ZERO);
    assert_eq!(out.result.upper, Some(ms(500)));
}

#[test]
fn contradicting_results_are_inconclusive() {
    let cfg = LadderConfig::new(Duration::from_secs(5)).slots(100);
    let mut p = DirectionPlan::new(Direction::ClientFirst, &cfg);
    let n = p.ages().len();
    let mut opened = Vec::new();
    while let Some(k) = p.next_open() {
        p.opened(k, Duration::ZERO);
        opened.push(k);
    }
    assert_eq!(opened.len(), n);
    // Rung 3 expires, rung 4 survives (resolved first), rungs 0..3 survive.
    p.resolve(4, Outcome::Alive, p.age(4), p.age(4));
    p.resolve(3, Outcome::Expired(Expiry::SilentDrop), p.age(3), p.age(3));
    assert!(p.result().is_none());
    for k in 0..3 {
        p.resolve(k, Outcome::Alive, p.age(k), p.age(k));
    }
    let r = p.result().unwrap();
    assert!(!r.conclusive, "{r:?}");
    assert!(r.note.unwrap().contains("survived"));
}

#[test]
fn a_failed_open_is_inconclusive_and_settles() {
    let cfg = LadderConfig::new(Duration::from_secs(5));
    let mut p = DirectionPlan::new(Direction::ServerFirst, &cfg);
    let k = p.next_open().unwrap();
    p.open_failed(k);
    let r = p.result().unwrap();
    assert!(!r.conclusive);
    assert_eq!(p.next_open(), None);
}

#[test]
fn failure_cancels_rungs_above_and_stops_opening() {
    let cfg = LadderConfig::new(Duration::from_secs(20)).slots(8);
    let mut p = DirectionPlan::new(Direction::ClientFirst, &cfg);
    for _ in 0..8 {
        let k = p.next_open().unwrap();
        p.opened(k, Duration::ZERO);
    }
    assert_eq!(p.next_open(), None, "slots are full");
    let cancelled = p.resolve(2, Outcome::Expired(Expiry::Reset), p.age(2), p.age(2));
    assert_eq!(cancelled, (3..8).collect::<Vec<_>>());
    assert_eq!(p.next_open(), None, "nothing above a failure is opened");
    p.resolve(0, Outcome::Alive, p.age(0), p.age(0));
    p.resolve(1, Outcome::Alive, p.age(1), p.age(1));
    let r = p.result().unwrap();
    assert_eq!((r.lower, r.upper), (p.age(1), Some(p.age(2))));
    assert_eq!(r.expiry, Some(Expiry::Reset));
}

#[test]
fn combine_takes_the_direction_that_expires_first() {
    let mk = |d, l: f64, u: Option<f64>| DirectionResult {
        direction: d,
        lower: Duration::from_secs_f64(l),
        upper: u.map(Duration::from_secs_f64),
        expiry: None,
        conclusive: true,
        note: None,
        decided_at: None,
        tests: 1,
    };
    let (l, u) = combine(&[
        mk(Direction::ClientFirst, 9.9, Some(10.3)),
        mk(Direction::ServerFirst, 9.6, Some(10.1)),
    ]);
    assert_eq!(
        (l.as_secs_f64(), u.map(|u| u.as_secs_f64())),
        (9.6, Some(10.1))
    );
    let (l, u) = combine(&[
        mk(Direction::ClientFirst, 30.0, None),
        mk(Direction::ServerFirst, 5.0, Some(5.2)),
    ]);
    assert_eq!(
        (l.as_secs_f64(), u.map(|u| u.as_secs_f64())),
        (5.0, Some(5.2))
    );
}

// ---------------------------------------------------------------------------------------------
// Server-first tests: the responder's REPORT gives the idle period tested.

const KEY: RungKey = (1, 4);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The regression behind "no timeout below 3 s … idle periods up to 2.998 s survived": the
/// client read the server's byte 2.952 s after it got round to reading the answer, but the
/// responder had timed 3.000 4 s of idle. The bracket must use the responder's 3.000 4 s.
#[test]
fn a_late_client_does_not_shorten_a_surviving_idle_period() {
    let mut r = ServerFirstReports::new();
    let saw = Some(Outcome::Alive);
    assert_eq!(r.tested(KEY, saw, secs(3.1), secs(2.952), secs(3.7)), None);
    assert_eq!(r.waiting(), 1);
    let got = r.report(
        KEY,
        Outcome::from_report(0),
        Some(secs(3.0004)),
        None,
        secs(3.0),
    );
    assert_eq!(
        got,
        Some(Resolved {
            key: KEY,
            outcome: Outcome::Alive,
            at: secs(3.1),
            age: secs(3.0004)
        })
    );
    assert_eq!(r.waiting(), 0);
}

#[test]
fn a_report_before_the_client_result_is_kept_until_it_comes() {
    let mut r = ServerFirstReports::new();
    assert_eq!(
        r.report(KEY, Outcome::Alive, Some(secs(2.0)), None, secs(2.0)),
        None
    );
    let got = r.tested(KEY, Some(Outcome::Alive), secs(2.5), secs(1.99), secs(3.0));
    assert_eq!(
        got.map(|g| (g.outcome, g.age)),
        Some((Outcome::Alive, secs(2.0)))
    );
}

#[test]
fn without_a_report_the_client_measure_is_the_fallback() {
    let mut r = ServerFirstReports::new();
    r.tested(KEY, Some(Outcome::Alive), secs(1.0), secs(0.95), secs(1.6));
    r.tested((1, 5), None, secs(1.2), secs(1.15), secs(1.8));
    assert!(r.overdue(secs(1.59)).is_empty());
    let due = r.overdue(secs(1.6));
    assert_eq!(
        due,
        vec![Resolved {
            key: KEY,
            outcome: Outcome::Alive,
            at: secs(1.0),
            age: secs(0.95)
        }]
    );
    let due = r.overdue(secs(2.0));
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].outcome, Outcome::Expired(Expiry::Unknown));
    assert_eq!(r.waiting(), 0);
}

#[test]
fn a_failure_the_client_saw_itself_needs_no_report() {
    let mut r = ServerFirstReports::new();
    let got = r.tested(
        KEY,
        Some(Outcome::Expired(Expiry::Reset)),
        secs(1.0),
        secs(0.9),
        secs(2.0),
    );
    assert_eq!(
        got.map(|g| g.outcome),
        Some(Outcome::Expired(Expiry::Reset))
    );
    assert_eq!(r.waiting(), 0);
}

#[test]
fn silence_is_decided_by_the_report() {
    let mut r = ServerFirstReports::new();
    assert_eq!(r.tested(KEY, None, secs(3.3), secs(3.0), secs(4.0)), None);
    let silent = Outcome::from_report(1);
    let got = r
        .report(KEY, silent, Some(secs(3.001)), None, secs(3.0))
        .unwrap();
    assert_eq!(got.outcome, Outcome::Expired(Expiry::SilentDrop));
    assert_eq!(got.age, secs(3.001));
    // A report that says alive although the client never saw the byte contradicts itself.
    r.tested((1, 6), None, secs(3.3), secs(3.0), secs(4.0));
    let got = r
        .report((1, 6), Outcome::Alive, None, None, secs(3.0))
        .unwrap();
    assert_eq!(got.outcome, Outcome::Expired(Expiry::Unknown));
    assert_eq!(got.age, secs(3.0), "no idle in the report: the client's");
}

#[test]
fn an_immediate_reset_report_resolves_at_the_due_time() {
    let mut r = ServerFirstReports::new();
    let reset = Outcome::from_report(2);
    let got = r.report(KEY, reset, Some(secs(6.002)), Some(secs(6.01)), secs(6.0));
    assert_eq!(
        got,
        Some(Resolved {
            key: KEY,
            outcome: Outcome::Expired(Expiry::Reset),
            at: secs(6.01),
            age: secs(6.002)
        })
    );
    // Forgotten rungs leave nothing behind.
    r.report((0, 1), Outcome::Alive, None, None, secs(1.0));
    r.tested((0, 2), None, secs(1.0), secs(1.0), secs(2.0));
    r.forget((0, 1));
    r.forget((0, 2));
    assert_eq!(r.waiting(), 0);
    assert!(r
        .tested((0, 1), None, secs(1.0), secs(1.0), secs(2.0))
        .is_none());
}

#[test]
fn report_bytes_map_to_outcomes() {
    assert_eq!(Outcome::from_report(0), Outcome::Alive);
    assert_eq!(
        Outcome::from_report(1),
        Outcome::Expired(Expiry::SilentDrop)
    );
    assert_eq!(Outcome::from_report(2), Outcome::Expired(Expiry::Reset));
    assert_eq!(Outcome::from_report(3), Outcome::Expired(Expiry::Close));
    assert_eq!(Outcome::from_report(200), Outcome::Expired(Expiry::Unknown));
}

#[test]
fn a_survived_test_counts_for_the_reported_period_less_the_allowance() {
    let rtt = Duration::from_millis(2);
    let mut r = ServerFirstReports::with_allowance(rtt);
    r.tested(KEY, Some(Outcome::Alive), secs(3.1), secs(2.99), secs(3.7));
    let got = r
        .report(KEY, Outcome::Alive, Some(secs(3.0025)), None, secs(3.0))
        .unwrap();
    assert_eq!(
        got.age,
        secs(3.0025) - rtt,
        "survived: the least it can have idled"
    );
    // Expired: the flow cannot have idled longer than the responder timed.
    r.tested((1, 5), None, secs(3.3), secs(3.0), secs(4.0));
    let got = r.report(
        (1, 5),
        Outcome::from_report(1),
        Some(secs(3.0025)),
        None,
        secs(3.0),
    );
    assert_eq!(got.unwrap().age, secs(3.0025));
}
