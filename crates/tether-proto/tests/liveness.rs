//! Virtual-clock tests of the liveness engine (DESIGN.md §4): every rule is checked at the
//! exact instant it must fire and one nanosecond before. No test sleeps; time is a base
//! `Instant` plus `Duration`s.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use tether_proto::liveness::Timer;
use tether_proto::{Liveness, LivenessConfig, LivenessEvent};

/// The origin of virtual time. Read from the clock once per test; every later instant is
/// this plus a `Duration`.
#[allow(clippy::disallowed_methods)]
fn base() -> Instant {
    Instant::now()
}

const NS: Duration = Duration::from_nanos(1);
const H: Duration = Duration::from_secs(10);
const D: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn drain(l: &mut Liveness) -> Vec<LivenessEvent> {
    std::iter::from_fn(|| l.poll_event()).collect()
}

/// Like [`drain`] without the heartbeats a peer's heartbeat makes us send early (coalescing):
/// for tests of the flood rule.
fn drain_but_heartbeats(l: &mut Liveness) -> Vec<LivenessEvent> {
    drain(l)
        .into_iter()
        .filter(|e| *e != LivenessEvent::SendHeartbeat)
        .collect()
}

/// Calls `handle_timeout(at)` and returns what it produced.
fn fire(l: &mut Liveness, at: Instant) -> Vec<LivenessEvent> {
    l.handle_timeout(at);
    drain(l)
}

fn engine(cfg: LivenessConfig) -> (Instant, Liveness) {
    let t0 = base();
    (t0, Liveness::new(t0, cfg))
}

#[test]
fn heartbeat_is_due_exactly_h_after_the_last_send() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + H));
    assert_eq!(l.poll_timeout(), Some(t0 + H));
    assert_eq!(fire(&mut l, t0 + H - NS), vec![]);
    assert_eq!(fire(&mut l, t0 + H), vec![LivenessEvent::SendHeartbeat]);
    assert_eq!(l.heartbeats_sent(), 1);
    // The heartbeat itself counts as a send: the next one is h later, not earlier.
    assert_eq!(l.last_tx(), t0 + H);
    assert_eq!(fire(&mut l, t0 + 2 * H - NS), vec![]);
    assert_eq!(fire(&mut l, t0 + 2 * H), vec![LivenessEvent::SendHeartbeat]);
}

#[test]
fn sending_postpones_the_heartbeat() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    l.on_send(t0 + secs(3));
    assert_eq!(l.poll_timeout(), Some(t0 + secs(13)));
    assert_eq!(
        fire(&mut l, t0 + H),
        vec![],
        "no heartbeat at the old deadline"
    );
    assert_eq!(fire(&mut l, t0 + secs(13) - NS), vec![]);
    assert_eq!(
        fire(&mut l, t0 + secs(13)),
        vec![LivenessEvent::SendHeartbeat]
    );
    // Time never goes backwards: an older send does not pull the deadline in.
    l.on_send(t0 + secs(5));
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + secs(23)));
}

#[test]
fn no_heartbeat_while_data_flows() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    // Data every h - 1 ms for 100 h: the heartbeat deadline is never reached.
    let step = H - ms(1);
    let mut t = t0;
    for _ in 0..100 {
        t += step;
        assert!(l.poll_timeout().unwrap() > t - step);
        assert_eq!(fire(&mut l, t - NS), vec![]);
        l.on_send(t);
        l.on_receive(t);
    }
    assert_eq!(l.heartbeats_sent(), 0);
}

#[test]
fn dead_is_declared_exactly_d_after_the_last_received_byte() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    // Heartbeats go out at h and 2h; nothing comes back.
    assert_eq!(fire(&mut l, t0 + H), vec![LivenessEvent::SendHeartbeat]);
    assert_eq!(fire(&mut l, t0 + 2 * H), vec![LivenessEvent::SendHeartbeat]);
    assert_eq!(l.poll_timeout(), Some(t0 + D));
    assert_eq!(l.deadline(Timer::Dead), Some(t0 + D));
    // 3h == d here: at d - 1ns only nothing (the heartbeat is due at d too).
    assert_eq!(fire(&mut l, t0 + D - NS), vec![]);
    assert!(!l.is_dead());
    assert_eq!(
        fire(&mut l, t0 + D),
        vec![LivenessEvent::PeerDead { silent_for: D }]
    );
    assert!(l.is_dead());
    assert_eq!(l.poll_timeout(), None, "a dead engine has no more timers");
    assert_eq!(fire(&mut l, t0 + 10 * D), vec![], "nothing after death");
}

#[test]
fn receiving_postpones_death_and_silent_for_counts_from_the_last_byte() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    l.on_receive(t0 + secs(20));
    assert_eq!(l.deadline(Timer::Dead), Some(t0 + secs(50)));
    // Send nothing ourselves: heartbeats at 10, 20, 30, 40, 50.
    let mut t = t0;
    while t < t0 + secs(50) - NS {
        t = l.poll_timeout().unwrap().min(t0 + secs(50) - NS);
        for ev in fire(&mut l, t) {
            assert_eq!(ev, LivenessEvent::SendHeartbeat, "at {:?}", t - t0);
        }
    }
    assert!(!l.is_dead());
    assert_eq!(
        fire(&mut l, t0 + secs(50)),
        vec![LivenessEvent::PeerDead { silent_for: D }]
    );
    assert_eq!(l.silent_for(t0 + secs(55)), secs(35));
}

#[test]
fn a_late_handle_timeout_reports_the_real_silence() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    let evs = fire(&mut l, t0 + D + ms(7));
    assert_eq!(
        evs,
        vec![LivenessEvent::PeerDead {
            silent_for: D + ms(7)
        }]
    );
}

#[test]
fn spurious_and_early_timeouts_are_harmless() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    for i in 0..1000u32 {
        assert_eq!(fire(&mut l, t0 + (H - NS) * i / 1000), vec![]);
    }
    assert_eq!(l.poll_timeout(), Some(t0 + H));
    assert_eq!(l.heartbeats_sent(), 0);
}

#[test]
fn suspect_then_recovered() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.suspect_after = Some(secs(15));
    let (t0, mut l) = engine(cfg);
    // Heartbeat at 10 s; suspect at exactly 15 s.
    assert_eq!(fire(&mut l, t0 + H), vec![LivenessEvent::SendHeartbeat]);
    assert_eq!(l.poll_timeout(), Some(t0 + secs(15)));
    assert_eq!(fire(&mut l, t0 + secs(15) - NS), vec![]);
    assert_eq!(
        fire(&mut l, t0 + secs(15)),
        vec![LivenessEvent::Suspect {
            silent_for: secs(15)
        }]
    );
    assert!(l.is_suspect());
    assert_eq!(l.deadline(Timer::Suspect), None, "reported once");
    assert_eq!(fire(&mut l, t0 + secs(16)), vec![]);
    l.on_receive(t0 + secs(17));
    assert_eq!(
        drain(&mut l),
        vec![LivenessEvent::Recovered {
            silent_for: secs(17)
        }]
    );
    assert!(!l.is_suspect());
    assert_eq!(l.deadline(Timer::Suspect), Some(t0 + secs(32)));
    assert_eq!(l.deadline(Timer::Dead), Some(t0 + secs(47)));
    // Receiving while not suspect reports nothing.
    l.on_receive(t0 + secs(18));
    assert_eq!(drain(&mut l), vec![]);
}

#[test]
fn idle_timeout_counts_application_data_only() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.idle_timeout = Some(secs(60));
    let (t0, mut l) = engine(cfg);
    // Heartbeats both ways every h: liveness is fine, but no application data moves.
    let mut t = t0;
    let mut seen = Vec::new();
    while t < t0 + secs(60) {
        t = l.poll_timeout().unwrap();
        l.on_receive(t);
        l.on_heartbeat_received(t);
        for ev in fire(&mut l, t) {
            seen.push((t - t0, ev));
        }
    }
    assert!(!l.is_dead());
    let idle: Vec<_> = seen
        .iter()
        .filter(|(_, e)| matches!(e, LivenessEvent::IdleTimeout { .. }))
        .collect();
    assert_eq!(
        idle,
        vec![&(secs(60), LivenessEvent::IdleTimeout { idle_for: secs(60) })]
    );
    assert!(seen
        .iter()
        .all(|(at, e)| *at == secs(60) || *e == LivenessEvent::SendHeartbeat));
    assert_eq!(l.deadline(Timer::Idle), None, "fires once");
}

#[test]
fn application_data_postpones_the_idle_timeout() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.idle_timeout = Some(secs(60));
    let (t0, mut l) = engine(cfg);
    l.on_app_data(t0 + secs(20));
    assert_eq!(l.deadline(Timer::Idle), Some(t0 + secs(80)));
    l.on_receive(t0 + secs(79));
    assert_eq!(
        fire(&mut l, t0 + secs(80) - NS),
        vec![LivenessEvent::SendHeartbeat]
    );
    assert_eq!(
        fire(&mut l, t0 + secs(80)),
        vec![LivenessEvent::IdleTimeout { idle_for: secs(60) }]
    );
}

#[test]
fn rtt_is_smoothed_with_rfc6298_weights() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.ping_interval = Some(secs(5));
    let (t0, mut l) = engine(cfg);
    assert_eq!(l.poll_timeout(), Some(t0 + secs(5)));
    assert_eq!(fire(&mut l, t0 + secs(5) - NS), vec![]);
    assert_eq!(fire(&mut l, t0 + secs(5)), vec![LivenessEvent::SendPing(1)]);
    // A PING is a send: the heartbeat moves to 15 s.
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + secs(15)));
    l.on_receive(t0 + secs(5) + ms(100));
    l.on_pong(t0 + secs(5) + ms(100), 1);
    assert_eq!(
        drain(&mut l),
        vec![LivenessEvent::Rtt {
            sample: ms(100),
            smoothed: ms(100)
        }]
    );
    // A duplicate or unknown PONG is ignored.
    l.on_pong(t0 + secs(6), 1);
    l.on_pong(t0 + secs(6), 99);
    assert_eq!(drain(&mut l), vec![]);
    assert_eq!(
        fire(&mut l, t0 + secs(10)),
        vec![LivenessEvent::SendPing(2)]
    );
    l.on_pong(t0 + secs(10) + ms(180), 2);
    // (7 * 100 + 180) / 8 = 110 ms.
    assert_eq!(
        drain(&mut l),
        vec![LivenessEvent::Rtt {
            sample: ms(180),
            smoothed: ms(110)
        }]
    );
    assert_eq!(l.srtt(), Some(ms(110)));
    // An unanswered PING is superseded by the next one; its late PONG is ignored.
    assert_eq!(
        fire(&mut l, t0 + secs(15)),
        vec![LivenessEvent::SendPing(3)]
    );
    assert_eq!(
        fire(&mut l, t0 + secs(20)),
        vec![LivenessEvent::SendPing(4)]
    );
    l.on_pong(t0 + secs(20) + ms(1), 3);
    assert_eq!(drain(&mut l), vec![]);
    assert_eq!(l.srtt(), Some(ms(110)));
}

#[test]
fn heartbeat_flood_is_a_policy_violation() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.enforce_peer_heartbeat = Some(H);
    let (t0, mut l) = engine(cfg);
    // Eight heartbeats within 4h are tolerated (twice the agreed rate, jitter, reconnects).
    for i in 1..=8u32 {
        let t = t0 + ms(100) * i;
        l.on_receive(t);
        l.on_heartbeat_received(t);
    }
    assert_eq!(drain_but_heartbeats(&mut l), vec![]);
    let t = t0 + ms(900);
    l.on_receive(t);
    l.on_heartbeat_received(t);
    assert_eq!(
        drain_but_heartbeats(&mut l),
        vec![LivenessEvent::HeartbeatFlood {
            count: 9,
            window: 4 * H
        }]
    );
    assert_eq!(l.heartbeats_received(), 9);
}

#[test]
fn a_peer_heartbeat_brings_ours_forward_when_it_is_due_within_half_an_interval() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    // Ours is due at t0 + H. A peer heartbeat before t0 + H/2 does not bring it forward…
    l.on_receive(t0 + H / 2 - NS);
    l.on_heartbeat_received(t0 + H / 2 - NS);
    assert_eq!(drain(&mut l), vec![]);
    // …one at exactly H/2 before it does: ours goes out in the same wake-up.
    l.on_receive(t0 + H / 2);
    l.on_heartbeat_received(t0 + H / 2);
    assert_eq!(drain(&mut l), vec![LivenessEvent::SendHeartbeat]);
    // And the timer moved: the next one is due H after that send.
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + H / 2 + H));
}

#[test]
fn heartbeat_flood_is_caught_across_any_window_not_only_aligned_ones() {
    // "More than 8 in any window of 4h": 8 heartbeats just before t0 + 4h and 8 just after
    // are 16 within 1.6 s, a flood, wherever windows happen to start.
    let mut cfg = LivenessConfig::new(H, D);
    cfg.enforce_peer_heartbeat = Some(H);
    let (t0, mut l) = engine(cfg);
    let mut floods = Vec::new();
    for i in 0..16u32 {
        let t = t0 + 4 * H - ms(800) + ms(100) * i;
        l.on_receive(t);
        l.on_heartbeat_received(t);
        floods.extend(drain_but_heartbeats(&mut l).into_iter().map(|e| (i, e)));
    }
    assert_eq!(
        floods,
        vec![(
            8,
            LivenessEvent::HeartbeatFlood {
                count: 9,
                window: 4 * H
            }
        )]
    );
}

#[test]
fn heartbeats_at_the_agreed_rate_are_not_a_flood() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.enforce_peer_heartbeat = Some(H);
    let (t0, mut l) = engine(cfg);
    // Twice the agreed rate for 100 h is still tolerated.
    for i in 1..=200u32 {
        let t = t0 + H / 2 * i;
        l.on_receive(t);
        l.on_heartbeat_received(t);
        assert_eq!(drain_but_heartbeats(&mut l), vec![], "at heartbeat {i}");
    }
}

#[test]
fn enforcement_off_tolerates_any_rate() {
    let (t0, mut l) = engine(LivenessConfig::new(H, D));
    for i in 1..=1000u32 {
        l.on_heartbeat_received(t0 + NS * i);
    }
    assert_eq!(drain(&mut l), vec![]);
}

/// Two engines wired to each other through a link with a fixed one-way delay: every send
/// arrives `delay` later as received bytes. Returns (a_events, b_events) with their instants.
struct Pair {
    t0: Instant,
    a: Liveness,
    b: Liveness,
    delay: Duration,
    /// (arrival, to_b)
    in_flight: Vec<(Instant, bool)>,
    log: Vec<(Duration, bool, LivenessEvent)>,
}

impl Pair {
    fn new(cfg: LivenessConfig, delay: Duration) -> Pair {
        Pair::with(cfg.clone(), cfg, delay)
    }

    /// A pair whose sides are configured differently (a client `a`, a server `b`).
    fn with(a: LivenessConfig, b: LivenessConfig, delay: Duration) -> Pair {
        let t0 = base();
        Pair {
            t0,
            a: Liveness::new(t0, a),
            b: Liveness::new(t0, b),
            delay,
            in_flight: Vec::new(),
            log: Vec::new(),
        }
    }

    fn next_instant(&self) -> Instant {
        let timers = [self.a.poll_timeout(), self.b.poll_timeout()];
        let arrivals = self.in_flight.iter().map(|(t, _)| *t);
        timers.into_iter().flatten().chain(arrivals).min().unwrap()
    }

    /// Advances to the next instant anything happens at; returns it.
    fn step(&mut self) -> Instant {
        let now = self.next_instant();
        let (due, later): (Vec<_>, Vec<_>) = self.in_flight.iter().partition(|(t, _)| *t <= now);
        self.in_flight = later;
        for (_, to_b) in due {
            let e = if to_b { &mut self.b } else { &mut self.a };
            e.on_receive(now);
            e.on_heartbeat_received(now);
        }
        for is_a in [true, false] {
            let e = if is_a { &mut self.a } else { &mut self.b };
            if e.poll_timeout().is_some_and(|d| now >= d) {
                e.handle_timeout(now);
            }
            while let Some(ev) = e.poll_event() {
                if ev == LivenessEvent::SendHeartbeat {
                    self.in_flight.push((now + self.delay, is_a));
                }
                self.log.push((now - self.t0, is_a, ev));
            }
        }
        now
    }
}

#[test]
fn twenty_dead_afters_of_idle_with_heartbeats_never_declare_death() {
    let mut cfg = LivenessConfig::new(H, D);
    cfg.suspect_after = Some(H + H / 2);
    cfg.enforce_peer_heartbeat = Some(H);
    let mut p = Pair::new(cfg, ms(40));
    while p.step() < p.t0 + 20 * D {}
    assert!(!p.a.is_dead() && !p.b.is_dead());
    for (at, is_a, ev) in &p.log {
        assert_eq!(*ev, LivenessEvent::SendHeartbeat, "at {at:?} (a={is_a})");
    }
    // One heartbeat per h on each side: 20 d / h = 60.
    assert_eq!(p.a.heartbeats_sent(), 60);
    assert_eq!(p.b.heartbeats_sent(), 60);
    // Each side last heard from the other 40 ms after the other's last heartbeat.
    assert_eq!(p.a.silent_for(p.t0 + 20 * D), H - ms(40));
}

#[test]
fn one_side_going_silent_is_detected_at_exactly_d_after_its_last_heartbeat_arrived() {
    let mut p = Pair::new(LivenessConfig::new(H, D), ms(40));
    // Run 5 d normally, then B stops sending (host crash: nothing leaves B any more).
    while p.step() < p.t0 + 5 * D {}
    let b_last_arrival = p.a.last_rx();
    loop {
        p.in_flight.retain(|(_, to_b)| *to_b);
        p.step();
        if p.a.is_dead() {
            break;
        }
    }
    let dead: Vec<_> = p
        .log
        .iter()
        .filter(|(_, _, e)| matches!(e, LivenessEvent::PeerDead { .. }))
        .collect();
    assert_eq!(
        dead,
        vec![&(
            b_last_arrival + D - p.t0,
            true,
            LivenessEvent::PeerDead { silent_for: D }
        )]
    );
}

/// The server's side of the pair: answers the client's heartbeats, enforces the interval it
/// dictated, reports suspects (as `tether::liveness_config` builds it).
fn answering(h: Duration, d: Duration) -> LivenessConfig {
    let mut cfg = LivenessConfig::new(h, d);
    cfg.suspect_after = Some(h + h / 2);
    cfg.enforce_peer_heartbeat = Some(h);
    cfg.answer_peer_heartbeat = true;
    cfg
}

#[test]
fn an_answering_side_falls_back_to_its_own_heartbeat_h_plus_an_eighth_after_its_last_send() {
    let (t0, mut l) = engine(answering(H, D));
    let fallback = H + H / 8;
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + fallback));
    assert_eq!(fire(&mut l, t0 + fallback - NS), vec![]);
    assert_eq!(
        fire(&mut l, t0 + fallback),
        vec![LivenessEvent::SendHeartbeat]
    );
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t0 + 2 * fallback));
    // A peer heartbeat less than h/2 after our last send is not answered (never two sends
    // closer than h/2)…
    let t = t0 + fallback + H / 2 - NS;
    l.on_receive(t);
    l.on_heartbeat_received(t);
    assert_eq!(drain(&mut l), vec![]);
    // …one at h/2 is, and the fallback moves to h + h/8 after the answer.
    let t = t0 + fallback + H / 2;
    l.on_receive(t);
    l.on_heartbeat_received(t);
    assert_eq!(drain(&mut l), vec![LivenessEvent::SendHeartbeat]);
    assert_eq!(l.deadline(Timer::Heartbeat), Some(t + fallback));
}

#[test]
fn an_answering_side_answers_every_peer_heartbeat_and_its_own_timer_never_fires() {
    // a: a client (heartbeat at h, and it enforces the rate on its peer too, to show that the
    // answers never look like a flood); b: the server, answering.
    let mut client = LivenessConfig::new(H, D);
    client.enforce_peer_heartbeat = Some(H);
    let mut p = Pair::with(client, answering(H, D), ms(40));
    // Up to the arrival of the client's 60th heartbeat.
    while p.step() < p.t0 + 20 * D + ms(40) {}
    assert!(!p.a.is_dead() && !p.b.is_dead());
    for (at, is_a, ev) in &p.log {
        assert_eq!(*ev, LivenessEvent::SendHeartbeat, "at {at:?} (a={is_a})");
    }
    let sent = |a: bool| -> Vec<Duration> {
        p.log
            .iter()
            .filter(|(_, is_a, _)| *is_a == a)
            .map(|(at, _, _)| *at)
            .collect()
    };
    let (client_sent, server_sent) = (sent(true), sent(false));
    // The client heartbeats every h from the start; the answers do not bring its own forward.
    assert_eq!(
        client_sent,
        (1..=60u32).map(|i| H * i).collect::<Vec<_>>(),
        "the client's heartbeats"
    );
    // Every server heartbeat is an answer, sent the instant the client's arrived: its own
    // timer (at h + h/8) never fired.
    assert_eq!(
        server_sent,
        client_sent.iter().map(|t| *t + ms(40)).collect::<Vec<_>>(),
        "the server's heartbeats"
    );
    assert_eq!(p.b.heartbeats_sent(), 60);
}

#[test]
fn an_answering_side_whose_peer_goes_silent_heartbeats_at_its_fallback_and_detects_at_exactly_d() {
    let mut p = Pair::with(LivenessConfig::new(H, D), answering(H, D), ms(40));
    while p.step() < p.t0 + 5 * D {}
    // The client stops sending (host crash: nothing leaves it any more).
    let last_arrival = p.b.last_rx();
    let last_answer = p.b.last_tx();
    assert_eq!(
        last_answer, last_arrival,
        "the last client heartbeat was answered"
    );
    let before = p.log.len();
    loop {
        p.in_flight.retain(|(_, to_b)| !*to_b);
        p.step();
        if p.b.is_dead() {
            break;
        }
    }
    let server_after: Vec<_> = p.log[before..]
        .iter()
        .filter(|(_, is_a, _)| !*is_a)
        .map(|(at, _, ev)| (p.t0 + *at, ev.clone()))
        .collect();
    let fallback = H + H / 8;
    assert_eq!(
        server_after,
        vec![
            (last_answer + fallback, LivenessEvent::SendHeartbeat),
            (
                last_arrival + H + H / 2,
                LivenessEvent::Suspect {
                    silent_for: H + H / 2
                }
            ),
            (last_answer + 2 * fallback, LivenessEvent::SendHeartbeat),
            (last_arrival + D, LivenessEvent::PeerDead { silent_for: D }),
        ]
    );
}

/// The peer's detector keeps its margin: while it sends no heartbeats (only data, or it is
/// stalled), the answering side still sends something at least every h + h/8, and a policy's
/// `d >= 2h + max(h/2, 100 ms)` covers two such gaps with room for the round trip.
#[test]
fn an_answering_sides_longest_gap_fits_twice_in_every_policys_dead_after() {
    let mut checked = 0;
    for d_ms in [120u64, 200, 301, 1_000, 5_000, 30_000, 300_000] {
        // The derived heartbeat, and every override up to the largest the policy accepts.
        let overrides = (1..=50u64).map(|i| Some(ms(d_ms * i / 100)));
        for h in std::iter::once(None).chain(overrides) {
            let mut b = tether_proto::Policy::builder(ms(d_ms));
            if let Some(h) = h {
                b = b.heartbeat(h);
            }
            let Ok(p) = b.build() else { continue };
            let h = p.heartbeat_interval;
            let gap = answering(h, p.dead_after).own_heartbeat_after();
            assert!(
                p.dead_after >= 2 * gap + (h / 4).max(ms(50)),
                "D = {d_ms} ms: h {h:?}, fallback gap {gap:?}, d {:?}",
                p.dead_after
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} policies were accepted");
}

proptest! {
    /// Bytes that keep arriving with gaps shorter than d never lead to death, whatever else
    /// the engine is doing (random sends, random spurious timeouts).
    #[test]
    fn never_dead_while_bytes_arrive_within_d(
        h_ms in 1u64..5_000,
        d_extra_ms in 1u64..20_000,
        gaps in prop::collection::vec((0.0f64..1.0, any::<bool>(), any::<bool>()), 1..200),
    ) {
        let h = ms(h_ms);
        let d = h + ms(d_extra_ms);
        let t0 = base();
        let mut l = Liveness::new(t0, LivenessConfig::new(h, d));
        let mut t = t0;
        for (frac, send, spurious) in gaps {
            // Gap strictly below d (at most d - 1 ns).
            let gap = (d - NS).mul_f64(frac);
            let arrival = t + gap;
            // Run every timer the engine asks for up to (not including) the arrival.
            while let Some(dl) = l.poll_timeout() {
                if dl >= arrival { break; }
                l.handle_timeout(dl);
            }
            if spurious {
                l.handle_timeout(arrival);
            }
            l.on_receive(arrival);
            if send { l.on_send(arrival); }
            t = arrival;
            while let Some(ev) = l.poll_event() {
                prop_assert!(!matches!(ev, LivenessEvent::PeerDead { .. }), "dead at {:?}", t - t0);
            }
            prop_assert!(!l.is_dead());
            prop_assert_eq!(l.deadline(Timer::Dead), Some(arrival + d));
        }
    }

    /// The engine flags the first heartbeat that is the 9th within less than 4h (sliding
    /// window), and nothing before it: checked against a brute-force count.
    #[test]
    fn flood_is_flagged_exactly_when_nine_fall_within_four_intervals(
        h_ms in 1u64..1_000,
        gaps_ms in prop::collection::vec(0u64..2_000, 1..120),
    ) {
        let h = ms(h_ms);
        let mut cfg = LivenessConfig::new(h, 3 * h);
        cfg.enforce_peer_heartbeat = Some(h);
        let t0 = base();
        let mut l = Liveness::new(t0, cfg);
        let mut arrivals = Vec::new();
        let mut t = t0;
        for g in &gaps_ms {
            t += ms(*g);
            arrivals.push(t);
        }
        let expected = (8..arrivals.len()).find(|&i| arrivals[i] - arrivals[i - 8] < 4 * h);
        let mut flagged = None;
        for (i, at) in arrivals.iter().enumerate() {
            l.on_heartbeat_received(*at);
            if let Some(ev) = drain_but_heartbeats(&mut l).pop() {
                prop_assert_eq!(ev, LivenessEvent::HeartbeatFlood { count: 9, window: 4 * h });
                flagged = Some(i);
                break;
            }
        }
        prop_assert_eq!(flagged, expected);
    }

    /// After the last byte, a driver that calls `handle_timeout` exactly at `poll_timeout`
    /// sees death at exactly last_rx + d (zero ticks late), with every heartbeat exactly h
    /// after the previous send.
    #[test]
    fn always_dead_exactly_d_after_silence(
        h_ms in 1u64..5_000,
        d_extra_ms in 1u64..20_000,
        history in prop::collection::vec((0.0f64..1.0, any::<bool>()), 0..50),
    ) {
        let h = ms(h_ms);
        let d = h + ms(d_extra_ms);
        let t0 = base();
        let mut l = Liveness::new(t0, LivenessConfig::new(h, d));
        // A random history of arrivals (gaps below d), some with a send at the same instant,
        // with timers run as the driver would in between.
        let mut t = t0;
        for (frac, send) in history {
            let at = t + (d - NS).mul_f64(frac);
            while let Some(dl) = l.poll_timeout() {
                if dl > at { break; }
                l.handle_timeout(dl);
            }
            l.on_receive(at);
            if send { l.on_send(at); }
            t = at;
        }
        while let Some(ev) = l.poll_event() {
            prop_assert!(!matches!(ev, LivenessEvent::PeerDead { .. }), "dead during the history");
        }
        // Now silence.
        let last_rx = l.last_rx();
        let mut last_tx = l.last_tx();
        let mut others = Vec::new();
        while let Some(dl) = l.poll_timeout() {
            prop_assert!(dl <= last_rx + d, "timer past the dead deadline");
            l.handle_timeout(dl);
            while let Some(ev) = l.poll_event() {
                match ev {
                    LivenessEvent::SendHeartbeat => {
                        prop_assert_eq!(dl, last_tx + h, "heartbeat not exactly h after the last send");
                        last_tx = dl;
                    }
                    other => others.push((dl, other)),
                }
            }
        }
        prop_assert_eq!(others, vec![(last_rx + d, LivenessEvent::PeerDead { silent_for: d })]);
    }
}

/// Issue 17: the engine keeps its times as offsets from one epoch (nanoseconds in `u64`, the
/// flood ring in `u32` milliseconds). A server connection that lives far longer than 49.7
/// days (`u32::MAX` ms) heartbeating at the agreed rate is never flagged, never declared
/// dead, and every deadline stays exact to the nanosecond; a flood after that is still
/// caught, and so is one that straddles the ring's 49.7-day mark.
#[test]
fn a_connection_living_past_49_days_of_u32_milliseconds_keeps_exact_timers() {
    let h = secs(30);
    let d = secs(90);
    let mut cfg = LivenessConfig::new(h, d);
    cfg.enforce_peer_heartbeat = Some(h);
    cfg.answer_peer_heartbeat = true;
    cfg.suspect_after = Some(secs(45));
    let (t0, mut l) = engine(cfg);
    let u32_ms = ms(u64::from(u32::MAX));
    // The peer heartbeats every 30 s and 7 ns (not on the millisecond grid) for 120 days
    // (345,600 heartbeats, two and a half times the u32 range).
    let step = h + NS * 7;
    let mut t = t0;
    let mut crossed = 0;
    while t < t0 + secs(120 * 86_400) {
        t += step;
        if t - t0 > u32_ms && crossed == 0 {
            crossed = 1;
        }
        while let Some(dl) = l.poll_timeout() {
            if dl > t {
                break;
            }
            l.handle_timeout(dl);
        }
        l.on_receive(t);
        l.on_heartbeat_received(t);
        for ev in drain(&mut l) {
            assert_eq!(ev, LivenessEvent::SendHeartbeat, "at {:?}", t - t0);
        }
        assert_eq!(l.deadline(Timer::Dead), Some(t + d));
        assert_eq!(l.deadline(Timer::Suspect), Some(t + secs(45)));
        assert_eq!(l.deadline(Timer::Heartbeat), Some(t + h + h / 8));
        assert_eq!(l.last_rx(), t);
    }
    assert_eq!(crossed, 1);
    // A flood now (nine heartbeats within a second) is still a flood.
    let mut flagged = false;
    for i in 1..=9u32 {
        l.on_receive(t + ms(100) * i);
        l.on_heartbeat_received(t + ms(100) * i);
        flagged |= drain_but_heartbeats(&mut l).contains(&LivenessEvent::HeartbeatFlood {
            count: 9,
            window: 4 * h,
        });
    }
    assert!(flagged, "a flood after 120 days went unnoticed");
    // Silence: dead exactly d after the last byte, reported as such.
    let last = l.last_rx();
    let before = fire(&mut l, last + d - NS);
    assert!(
        !before
            .iter()
            .any(|e| matches!(e, LivenessEvent::PeerDead { .. })),
        "{before:?}"
    );
    assert_eq!(
        fire(&mut l, last + d),
        vec![LivenessEvent::PeerDead { silent_for: d }]
    );
}

/// A flood whose heartbeats straddle the instant the ring's millisecond offsets run out
/// (49.7 days after the epoch) is caught like any other; heartbeats at the agreed rate
/// across it are not a flood.
#[test]
fn the_flood_ring_moves_its_base_without_losing_or_inventing_a_flood() {
    let h = secs(10);
    let mut cfg = LivenessConfig::new(h, secs(1_000_000_000));
    cfg.enforce_peer_heartbeat = Some(h);
    let (t0, mut l) = engine(cfg);
    let edge = t0 + ms(u64::from(u32::MAX));
    // Twice the agreed rate (8 in 4h is tolerated) across the edge: no flood.
    for i in 0..40u32 {
        let t = edge - secs(100) + h / 2 * i;
        l.on_heartbeat_received(t);
        assert_eq!(drain_but_heartbeats(&mut l), vec![], "heartbeat {i}");
    }
    // Nine within 8 s straddling a later edge (the base moved to 2^31 ms before the first
    // move): flagged at the ninth.
    let (_, mut l2) = engine({
        let mut c = LivenessConfig::new(h, secs(1_000_000_000));
        c.enforce_peer_heartbeat = Some(h);
        c
    });
    let mut at = None;
    for i in 0..9u32 {
        l2.on_heartbeat_received(edge - secs(4) + secs(1) * i);
        if !drain_but_heartbeats(&mut l2).is_empty() {
            at = Some(i);
        }
    }
    assert_eq!(at, Some(8));
}

/// A timer armed for longer than the `u32` millisecond range (an idle timeout of 60 days)
/// fires at exactly its instant: the recorded times are not clamped by any rebase.
#[test]
fn an_idle_timeout_longer_than_49_days_fires_exactly() {
    let mut cfg = LivenessConfig::new(secs(30), secs(90));
    cfg.idle_timeout = Some(secs(60 * 86_400));
    let (t0, mut l) = engine(cfg);
    l.on_app_data(t0 + NS * 3);
    let due = t0 + NS * 3 + secs(60 * 86_400);
    assert_eq!(l.deadline(Timer::Idle), Some(due));
    // Keep the peer alive until then.
    let mut t = t0;
    while t + secs(30) < due {
        t += secs(30);
        l.on_receive(t);
        l.handle_timeout(t);
        drain(&mut l);
    }
    assert_eq!(fire(&mut l, due - NS), vec![]);
    assert_eq!(
        fire(&mut l, due),
        vec![LivenessEvent::IdleTimeout {
            idle_for: secs(60 * 86_400)
        }]
    );
}
