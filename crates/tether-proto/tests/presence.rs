//! Presence registry on a virtual clock: exact instants, replacement, holds, retention,
//! counts, and random operation sequences that must keep the invariants.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tether_proto::presence::{
    PresenceChange, PresenceCounts, PresenceKind, PresenceState, Registry, RegistryConfig,
};
use tether_proto::DisconnectReason;

/// A virtual clock: a fixed base plus an offset in milliseconds.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        // The only clock read: an arbitrary origin for the virtual timeline (std offers no
        // other way to make an Instant); every instant in the tests is this plus an offset.
        #[allow(clippy::disallowed_methods)]
        Clock(Instant::now())
    }
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn registry(retention_ms: u64, max_offline: usize) -> Registry {
    Registry::new(RegistryConfig {
        offline_retention: Duration::from_millis(retention_ms),
        max_offline,
    })
}

fn drain(r: &mut Registry) -> Vec<PresenceChange> {
    std::iter::from_fn(|| r.poll_change()).collect()
}

fn kinds(changes: &[PresenceChange]) -> Vec<(String, Option<PresenceKind>, PresenceKind)> {
    changes
        .iter()
        .map(|c| (c.id.clone(), c.from.as_ref().map(|s| s.kind()), c.to.kind()))
        .collect()
}

fn counts(online: usize, suspect: usize, resuming: usize, offline: usize) -> PresenceCounts {
    PresenceCounts {
        online,
        suspect,
        resuming,
        offline,
    }
}

#[test]
fn connect_suspect_recover_disconnect() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    assert_eq!(r.connected(c.at(0), "a", 1, addr(1000)), None);
    assert!(r.suspect(c.at(1_500), "a", 1));
    assert!(!r.suspect(c.at(1_600), "a", 1), "already suspect");
    assert!(r.recovered(c.at(1_700), "a", 1));
    assert!(!r.recovered(c.at(1_800), "a", 1), "already online");
    assert_eq!(r.counts(), counts(1, 0, 0, 0));
    assert!(r.disconnected(
        c.at(5_000),
        "a",
        1,
        DisconnectReason::HeartbeatTimeout,
        Duration::from_millis(3_000),
        None
    ));
    let e = r.get("a").unwrap();
    assert_eq!(
        e.state,
        PresenceState::Offline {
            reason: DisconnectReason::HeartbeatTimeout,
            at: c.at(5_000),
            silent_for: Duration::from_millis(3_000)
        }
    );
    assert_eq!(e.changed_at, c.at(5_000));
    assert_eq!(e.connected_since, c.at(0));
    assert_eq!(e.remote, addr(1000));
    assert_eq!((e.connects, e.disconnects), (1, 1));
    assert_eq!(r.counts(), counts(0, 0, 0, 1));

    let ch = drain(&mut r);
    use PresenceKind::*;
    let a = || "a".to_owned();
    assert_eq!(
        kinds(&ch),
        [
            (a(), None, Online),
            (a(), Some(Online), Suspect),
            (a(), Some(Suspect), Online),
            (a(), Some(Online), Offline),
        ]
    );
    assert_eq!(
        ch.iter().map(|x| x.at).collect::<Vec<_>>(),
        [c.at(0), c.at(1_500), c.at(1_700), c.at(5_000)]
    );
    assert!(ch.iter().all(|x| x.conn_id == 1));
    assert_eq!(r.poll_change(), None);
}

#[test]
fn reconnect_replaces_and_late_disconnect_is_ignored() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.suspect(c.at(2_000), "a", 1);
    // The client comes back on a new connection while the old one is still open.
    assert_eq!(r.connected(c.at(3_000), "a", 2, addr(1001)), Some(1));
    let e = r.get("a").unwrap();
    assert_eq!(e.state, PresenceState::Online);
    assert_eq!(
        (e.conn_id, e.remote, e.connected_since),
        (2, addr(1001), c.at(3_000))
    );
    assert_eq!((e.connects, e.disconnects), (2, 1));
    drain(&mut r);

    // The old connection's events arrive late: all ignored, no flapping.
    assert!(!r.suspect(c.at(3_100), "a", 1));
    assert!(!r.disconnected(
        c.at(3_200),
        "a",
        1,
        DisconnectReason::Replaced,
        Duration::ZERO,
        None
    ));
    assert_eq!(r.get("a").unwrap().state, PresenceState::Online);
    assert_eq!(r.get("a").unwrap().disconnects, 1);
    assert_eq!(r.poll_change(), None);
    assert_eq!(r.counts(), counts(1, 0, 0, 0));
    assert_eq!(r.poll_timeout(), None);

    // Registering the current connection again changes nothing.
    assert_eq!(r.connected(c.at(3_300), "a", 2, addr(1001)), None);
    assert_eq!(r.get("a").unwrap().connects, 2);
    assert_eq!(r.poll_change(), None);
}

#[test]
fn replacement_is_published_with_the_new_conn_id() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.suspect(c.at(1), "a", 1);
    drain(&mut r);
    r.connected(c.at(2), "a", 7, addr(1000));
    let ch = drain(&mut r);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].conn_id, 7);
    assert_eq!(ch[0].from, Some(PresenceState::Suspect));
    assert_eq!(ch[0].to, PresenceState::Online);
}

#[test]
fn resuming_becomes_offline_exactly_at_the_hold_end() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    assert!(r.disconnected(
        c.at(1_000),
        "a",
        1,
        DisconnectReason::PeerReset,
        Duration::from_millis(10),
        Some(c.at(31_000)),
    ));
    assert_eq!(r.get("a").unwrap().state.kind(), PresenceKind::Resuming);
    assert_eq!(r.counts(), counts(0, 0, 1, 0));
    assert_eq!(r.poll_timeout(), Some(c.at(31_000)));
    drain(&mut r);

    // Spurious and early timeouts do nothing.
    r.handle_timeout(c.at(1_000));
    r.handle_timeout(c.at(30_999));
    assert_eq!(r.get("a").unwrap().state.kind(), PresenceKind::Resuming);
    assert_eq!(r.poll_change(), None);

    r.handle_timeout(c.at(31_000));
    let e = r.get("a").unwrap();
    assert_eq!(
        e.state,
        PresenceState::Offline {
            reason: DisconnectReason::PeerReset,
            at: c.at(1_000),
            silent_for: Duration::from_millis(10)
        }
    );
    assert_eq!(e.changed_at, c.at(31_000));
    let ch = drain(&mut r);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].at, c.at(31_000));
    assert_eq!(
        ch[0].from.as_ref().map(|s| s.kind()),
        Some(PresenceKind::Resuming)
    );
    assert_eq!(r.counts(), counts(0, 0, 0, 1));
    // Next deadline: the retention of the new Offline entry, counted from 31 s.
    assert_eq!(r.poll_timeout(), Some(c.at(91_000)));
    r.handle_timeout(c.at(90_999));
    assert!(r.get("a").is_some());
    r.handle_timeout(c.at(91_000));
    assert!(r.get("a").is_none());
    assert_eq!(r.counts(), counts(0, 0, 0, 0));
    assert_eq!(r.poll_timeout(), None);
    assert_eq!(r.poll_change(), None, "forgetting is not a presence change");
}

#[test]
fn reconnect_during_hold_cancels_the_timer() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.disconnected(
        c.at(1_000),
        "a",
        1,
        DisconnectReason::PeerReset,
        Duration::ZERO,
        Some(c.at(5_000)),
    );
    assert_eq!(
        r.connected(c.at(2_000), "a", 2, addr(1002)),
        None,
        "nothing open to replace"
    );
    assert_eq!(r.poll_timeout(), None);
    r.handle_timeout(c.at(10_000));
    assert_eq!(r.get("a").unwrap().state, PresenceState::Online);
    assert_eq!(r.counts(), counts(1, 0, 0, 0));
}

#[test]
fn hold_in_the_past_goes_straight_offline() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.disconnected(
        c.at(1_000),
        "a",
        1,
        DisconnectReason::PeerClosed,
        Duration::ZERO,
        Some(c.at(1_000)),
    );
    assert_eq!(r.get("a").unwrap().state.kind(), PresenceKind::Offline);
}

#[test]
fn offline_comes_back_online() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.disconnected(
        c.at(1),
        "a",
        1,
        DisconnectReason::PeerClosed,
        Duration::ZERO,
        None,
    );
    assert_eq!(r.poll_timeout(), Some(c.at(60_001)));
    assert_eq!(r.connected(c.at(2), "a", 2, addr(1000)), None);
    assert_eq!(
        r.poll_timeout(),
        None,
        "the retention timer went with the Offline state"
    );
    r.handle_timeout(c.at(100_000));
    let e = r.get("a").unwrap();
    assert_eq!(e.state, PresenceState::Online);
    assert_eq!((e.connects, e.disconnects), (2, 1));
}

#[test]
fn offline_entries_are_bounded_oldest_forgotten_first() {
    let c = Clock::new();
    let mut r = registry(60_000, 3);
    for i in 0..5u64 {
        let id = format!("c{i}");
        r.connected(c.at(0), &id, i, addr(2000));
        r.disconnected(
            c.at(10 + i),
            &id,
            i,
            DisconnectReason::PeerClosed,
            Duration::ZERO,
            None,
        );
        assert!(r.counts().offline <= 3);
    }
    assert_eq!(r.counts(), counts(0, 0, 0, 3));
    assert_eq!(r.len(), 3);
    let mut left: Vec<_> = r.iter().map(|(id, _)| id.to_owned()).collect();
    left.sort();
    assert_eq!(left, ["c2", "c3", "c4"]);
    // Retention runs from the time each became offline.
    assert_eq!(r.poll_timeout(), Some(c.at(60_012)));
    r.handle_timeout(c.at(60_013));
    let mut left: Vec<_> = r.iter().map(|(id, _)| id.to_owned()).collect();
    left.sort();
    assert_eq!(left, ["c4"]);
    assert_eq!(r.poll_timeout(), Some(c.at(60_014)));
}

#[test]
fn zero_max_offline_forgets_at_once_but_publishes_the_change() {
    let c = Clock::new();
    let mut r = registry(60_000, 0);
    r.connected(c.at(0), "a", 1, addr(1000));
    r.disconnected(
        c.at(1),
        "a",
        1,
        DisconnectReason::PeerClosed,
        Duration::ZERO,
        None,
    );
    assert!(r.is_empty());
    assert_eq!(r.counts(), PresenceCounts::default());
    let ch = drain(&mut r);
    assert_eq!(ch.last().unwrap().to.kind(), PresenceKind::Offline);
}

#[test]
fn unknown_ids_and_wrong_states_are_ignored() {
    let c = Clock::new();
    let mut r = registry(60_000, 10);
    assert!(!r.suspect(c.at(0), "x", 1));
    assert!(!r.recovered(c.at(0), "x", 1));
    assert!(!r.disconnected(
        c.at(0),
        "x",
        1,
        DisconnectReason::PeerClosed,
        Duration::ZERO,
        None
    ));
    r.connected(c.at(0), "a", 1, addr(1));
    r.disconnected(
        c.at(1),
        "a",
        1,
        DisconnectReason::PeerClosed,
        Duration::ZERO,
        None,
    );
    assert!(!r.suspect(c.at(2), "a", 1), "offline cannot become suspect");
    assert!(!r.disconnected(
        c.at(2),
        "a",
        1,
        DisconnectReason::PeerReset,
        Duration::ZERO,
        None
    ));
    assert_eq!(r.get("a").unwrap().disconnects, 1);
    assert!(!r.is_empty() && r.len() == 1);
    drain(&mut r);
    assert_eq!(r.poll_change(), None);
}

#[test]
fn counts_per_state() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    for i in 0..10u64 {
        r.connected(c.at(0), &format!("c{i}"), i, addr(3000));
    }
    for i in 0..3u64 {
        r.suspect(c.at(1), &format!("c{i}"), i);
    }
    for i in 3..5u64 {
        r.disconnected(
            c.at(2),
            &format!("c{i}"),
            i,
            DisconnectReason::PeerReset,
            Duration::ZERO,
            Some(c.at(100)),
        );
    }
    for i in 5..6u64 {
        r.disconnected(
            c.at(2),
            &format!("c{i}"),
            i,
            DisconnectReason::PeerClosed,
            Duration::ZERO,
            None,
        );
    }
    assert_eq!(r.counts(), counts(4, 3, 2, 1));
    assert_eq!(r.counts().total(), r.len());
    assert_eq!(r.counts().get(PresenceKind::Resuming), 2);
    r.handle_timeout(c.at(100));
    assert_eq!(r.counts(), counts(4, 3, 0, 3));
}

#[test]
fn many_holds_need_one_timer_in_deadline_order() {
    let c = Clock::new();
    let mut r = registry(1_000_000, 10_000);
    // Holds ending in reverse order of registration.
    for i in 0..1_000u64 {
        let id = format!("c{i}");
        r.connected(c.at(0), &id, i, addr(4000));
        r.disconnected(
            c.at(1),
            &id,
            i,
            DisconnectReason::PeerReset,
            Duration::ZERO,
            Some(c.at(10_000 - i)),
        );
    }
    drain(&mut r);
    assert_eq!(r.poll_timeout(), Some(c.at(9_001)));
    let mut fired = Vec::new();
    while let Some(t) = r.poll_timeout() {
        if t > c.at(10_000) {
            break;
        }
        r.handle_timeout(t);
        for ch in drain(&mut r) {
            assert_eq!(ch.at, t);
            fired.push(ch.id);
        }
    }
    let expected: Vec<String> = (0..1_000u64).rev().map(|i| format!("c{i}")).collect();
    assert_eq!(fired, expected);
    assert_eq!(r.counts(), counts(0, 0, 0, 1_000));
}

// ---- random operation sequences -------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Connect {
        id: u8,
    },
    Suspect {
        id: u8,
        stale: bool,
    },
    Recover {
        id: u8,
        stale: bool,
    },
    Disconnect {
        id: u8,
        stale: bool,
        hold_ms: Option<u16>,
    },
    Advance {
        ms: u16,
    },
    Timeout,
}

fn op() -> impl Strategy<Value = Op> {
    let id = 0u8..12;
    prop_oneof![
        id.clone().prop_map(|id| Op::Connect { id }),
        (id.clone(), any::<bool>()).prop_map(|(id, stale)| Op::Suspect { id, stale }),
        (id.clone(), any::<bool>()).prop_map(|(id, stale)| Op::Recover { id, stale }),
        (id, any::<bool>(), proptest::option::of(0u16..3_000))
            .prop_map(|(id, stale, hold_ms)| Op::Disconnect { id, stale, hold_ms }),
        (0u16..2_000).prop_map(|ms| Op::Advance { ms }),
        Just(Op::Timeout),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_sequences_keep_the_invariants(
        ops in proptest::collection::vec(op(), 1..300),
        retention_ms in 0u64..5_000,
        max_offline in 0usize..6,
    ) {
        let c = Clock::new();
        let mut r = registry(retention_ms, max_offline);
        let mut now_ms = 0u64;
        let mut next_conn = 1u64;
        // Model: the current connection id of every id we ever connected.
        let mut current: std::collections::HashMap<String, u64> = Default::default();
        for op in ops {
            let now = c.at(now_ms);
            match op {
                Op::Connect { id } => {
                    let id = format!("c{id}");
                    let before = r.get(&id).map(|e| (e.state.is_connected(), e.conn_id));
                    let replaced = r.connected(now, &id, next_conn, addr(5000));
                    match before {
                        Some((true, old)) => prop_assert_eq!(replaced, Some(old)),
                        _ => prop_assert_eq!(replaced, None),
                    }
                    current.insert(id.clone(), next_conn);
                    next_conn += 1;
                    prop_assert_eq!(&r.get(&id).unwrap().state, &PresenceState::Online);
                }
                Op::Suspect { id, stale } | Op::Recover { id, stale } => {
                    let id = format!("c{id}");
                    let conn = current.get(&id).copied().unwrap_or(0) + u64::from(stale) * 1_000_000;
                    let before = r.get(&id).map(|e| e.state.clone());
                    let changed = if matches!(op, Op::Suspect { .. }) {
                        r.suspect(now, &id, conn)
                    } else {
                        r.recovered(now, &id, conn)
                    };
                    if stale {
                        prop_assert!(!changed);
                        prop_assert_eq!(r.get(&id).map(|e| e.state.clone()), before);
                    }
                }
                Op::Disconnect { id, stale, hold_ms } => {
                    let id = format!("c{id}");
                    let conn = current.get(&id).copied().unwrap_or(0) + u64::from(stale) * 1_000_000;
                    let was_connected = r.get(&id).is_some_and(|e| e.state.is_connected());
                    let changed = r.disconnected(
                        now,
                        &id,
                        conn,
                        DisconnectReason::HeartbeatTimeout,
                        Duration::ZERO,
                        hold_ms.map(|h| now + Duration::from_millis(u64::from(h))),
                    );
                    prop_assert_eq!(changed, was_connected && !stale);
                }
                Op::Advance { ms } => now_ms += u64::from(ms),
                Op::Timeout => r.handle_timeout(now),
            }
            // Invariants after every step.
            let mut seen = HashSet::new();
            let mut recount = PresenceCounts::default();
            for (id, e) in r.iter() {
                prop_assert!(seen.insert(id.to_owned()), "duplicate id {}", id);
                *recount.get_mut(e.state.kind()) += 1;
                prop_assert_eq!(Some(&e.conn_id), current.get(id));
                if let PresenceState::Resuming { until, .. } = &e.state {
                    // A hold that is due is never left pending after a timeout call.
                    if matches!(op, Op::Timeout) {
                        prop_assert!(*until > now);
                    }
                }
            }
            prop_assert_eq!(r.counts(), recount);
            prop_assert_eq!(r.counts().total(), r.len());
            // Pages (per state and of all) walk the same entries as a filtered, sorted scan.
            for kind in [None, Some(PresenceKind::Online), Some(PresenceKind::Suspect),
                         Some(PresenceKind::Resuming), Some(PresenceKind::Offline)] {
                let mut want: Vec<String> = r
                    .iter()
                    .filter(|(_, e)| kind.is_none_or(|k| e.state.kind() == k))
                    .map(|(id, _)| id.to_owned())
                    .collect();
                want.sort();
                let mut got = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let (page, more) = r.page(kind, after.as_deref(), 3);
                    prop_assert!(page.len() <= 3);
                    for (id, e) in &page {
                        prop_assert!(kind.is_none_or(|k| e.state.kind() == k));
                        got.push((*id).to_owned());
                    }
                    match (more, page.last()) {
                        (true, Some((id, _))) => after = Some((*id).to_owned()),
                        _ => break,
                    }
                }
                prop_assert_eq!(got, want);
            }
            prop_assert!(r.counts().offline <= max_offline);
            prop_assert!(r.len() <= 12);
            if let Some(t) = r.poll_timeout() {
                prop_assert!(recount.resuming + recount.offline > 0);
                if matches!(op, Op::Timeout) {
                    prop_assert!(t > now, "a due deadline survived handle_timeout");
                }
            } else {
                prop_assert_eq!(recount.resuming, 0);
                prop_assert!(recount.offline == 0 || retention_ms == u64::MAX);
            }
            // Drain changes: every change names a known conn id and a real transition.
            while let Some(ch) = r.poll_change() {
                prop_assert!(ch.conn_id >= 1 && ch.conn_id < next_conn);
                prop_assert!(ch.at <= now);
            }
        }
        // Run time forward past every deadline: nothing is Resuming, Offline is forgotten.
        // Holds end first; the Offline entries they leave live for one more retention.
        let end = c.at(now_ms + 10_000);
        r.handle_timeout(end);
        prop_assert_eq!(r.counts().resuming, 0);
        r.handle_timeout(end + Duration::from_millis(retention_ms));
        prop_assert_eq!(r.counts().offline, 0);
        prop_assert_eq!(r.poll_timeout(), None);
    }
}

/// A session handed over by another server: held here (`Resuming`, with the usual expiry),
/// and the hold of a session that moved away ends at once.
#[test]
fn a_session_handed_over_is_held_and_one_moved_away_ends_its_hold() {
    let c = Clock::new();
    let mut r = registry(60_000, 100);
    // Held from nothing: Resuming, expiring at `until`.
    assert!(r.held(
        c.at(0),
        "in",
        addr(1),
        DisconnectReason::Replaced,
        c.at(1000)
    ));
    assert_eq!(
        kinds(&drain(&mut r)),
        vec![("in".into(), None, PresenceKind::Resuming)]
    );
    assert_eq!(r.counts(), counts(0, 0, 1, 0));
    assert_eq!(r.poll_timeout(), Some(c.at(1000)));
    // Not twice, and never over a connected client.
    assert!(!r.held(
        c.at(1),
        "in",
        addr(1),
        DisconnectReason::Replaced,
        c.at(2000)
    ));
    r.connected(c.at(0), "on", 7, addr(2));
    drain(&mut r);
    assert!(!r.held(
        c.at(1),
        "on",
        addr(2),
        DisconnectReason::Replaced,
        c.at(2000)
    ));
    // Resumed here: Online, the hold's timer is gone.
    r.connected(c.at(10), "in", 8, addr(1));
    assert_eq!(
        kinds(&drain(&mut r)),
        vec![(
            "in".into(),
            Some(PresenceKind::Resuming),
            PresenceKind::Online
        )]
    );
    assert_eq!(r.poll_timeout(), None);

    // Moved away: the hold ends at once, Offline with the given reason.
    r.disconnected(
        c.at(20),
        "on",
        7,
        DisconnectReason::PeerReset,
        Duration::ZERO,
        Some(c.at(5000)),
    );
    drain(&mut r);
    assert!(r.end_hold(c.at(30), "on", DisconnectReason::Replaced));
    let ch = drain(&mut r);
    assert_eq!(
        kinds(&ch),
        vec![(
            "on".into(),
            Some(PresenceKind::Resuming),
            PresenceKind::Offline
        )]
    );
    assert!(matches!(
        &ch[0].to,
        tether_proto::presence::PresenceState::Offline {
            reason: DisconnectReason::Replaced,
            ..
        }
    ));
    assert!(!r.end_hold(c.at(31), "on", DisconnectReason::Replaced));
    // The retention of the offline entry is the only timer left.
    assert_eq!(r.poll_timeout(), Some(c.at(30 + 60_000)));
    // From Offline a handed-over session is held again.
    assert!(r.held(
        c.at(40),
        "on",
        addr(3),
        DisconnectReason::Replaced,
        c.at(1040)
    ));
    assert_eq!(r.counts(), counts(1, 0, 1, 0));
    r.handle_timeout(c.at(1040));
    assert_eq!(r.counts(), counts(1, 0, 0, 1));
}

/// Issue 17: the registry keeps a client id once, shared with the caller's copy
/// (`connected_shared`): the map, the per-state index and the caller hold one allocation,
/// and an `Online` client is in no per-state index (the common state has none).
#[test]
fn a_shared_id_is_stored_once() {
    let mut r = Registry::new(RegistryConfig::default());
    let t0 = Clock::new().at(0);
    let id: std::sync::Arc<str> = std::sync::Arc::from("device-0001");
    let remote = addr(4000);
    assert_eq!(r.connected_shared(t0, &id, 1, remote), None);
    // The caller's and the map's key.
    assert_eq!(std::sync::Arc::strong_count(&id), 2);
    // And the Suspect index's.
    assert!(r.suspect(t0, "device-0001", 1));
    assert_eq!(std::sync::Arc::strong_count(&id), 3);
    assert!(r.recovered(t0, "device-0001", 1));
    assert_eq!(std::sync::Arc::strong_count(&id), 2);
    assert!(r.suspect(t0, "device-0001", 1));
    assert!(r.disconnected(
        t0,
        "device-0001",
        1,
        tether_proto::DisconnectReason::PeerClosed,
        std::time::Duration::ZERO,
        None
    ));
    // Offline: the key, the Offline index and the retention queue.
    assert_eq!(std::sync::Arc::strong_count(&id), 4);
    assert_eq!(
        r.get("device-0001").map(|e| e.state.kind()),
        Some(PresenceKind::Offline)
    );
    const { assert!(tether_proto::presence::SLOT_SIZE <= 48) };
}

/// The compact slot keeps an IPv6 remote whole (flow info and scope included) and an IPv4
/// one as given.
#[test]
fn remote_addresses_survive_the_compact_slot() {
    let mut r = Registry::new(RegistryConfig::default());
    let t0 = Clock::new().at(0);
    let v6 = SocketAddr::V6(std::net::SocketAddrV6::new(
        "fe80::1".parse().expect("an address"),
        4242,
        7,
        3,
    ));
    assert_eq!(r.connected(t0, "six", 1, v6), None);
    assert_eq!(r.get("six").map(|e| e.remote), Some(v6));
    assert_eq!(r.connected(t0, "four", 2, addr(9)), None);
    assert_eq!(r.get("four").map(|e| e.remote), Some(addr(9)));
    // A reconnect from the other family replaces the address.
    assert_eq!(r.connected(t0, "four", 3, v6), Some(2));
    assert_eq!(r.get("four").map(|e| e.remote), Some(v6));
    // The suspect flag shares the address's 16 bytes: each keeps the other.
    assert!(r.suspect(t0, "six", 1));
    assert_eq!(
        r.get("six").map(|e| (e.state, e.remote)),
        Some((PresenceState::Suspect, v6))
    );
    assert!(r.recovered(t0, "six", 1));
    assert_eq!(
        r.get("six").map(|e| (e.state, e.remote)),
        Some((PresenceState::Online, v6))
    );
    assert!(r.suspect(t0, "four", 3));
    assert_eq!(r.connected(t0, "four", 4, addr(10)), Some(3));
    assert_eq!(
        r.get("four").map(|e| (e.state, e.remote)),
        Some((PresenceState::Online, addr(10)))
    );
}

/// A registry keyed by another kind of id than `Arc<str>` (a server keeps a thin one): the
/// same entries, states, order, pages and retention, looked up by `&str`.
#[test]
fn a_registry_keyed_by_another_kind_of_id_behaves_the_same() {
    let cfg = RegistryConfig {
        offline_retention: Duration::from_millis(100),
        max_offline: 10,
    };
    let mut arc = Registry::new(cfg);
    let mut boxed: Registry<Box<str>> = Registry::keyed(cfg);
    let c = Clock::new();
    let ids = ["dev-3", "dev-1", "dev-2"];
    for (i, id) in ids.iter().enumerate() {
        let shared: Box<str> = (*id).into();
        assert_eq!(arc.connected(c.at(0), id, i as u64, addr(4000)), None);
        assert_eq!(
            boxed.connected_shared(c.at(0), &shared, i as u64, addr(4000)),
            None
        );
    }
    for r in [&mut arc as &mut dyn Ops, &mut boxed] {
        assert!(r.suspect(c.at(1), "dev-2", 2));
        assert!(r.disconnected(c.at(2), "dev-1", 1));
    }
    let page = |r: &dyn Ops, k| r.page(k);
    for k in [
        None,
        Some(PresenceKind::Online),
        Some(PresenceKind::Suspect),
        Some(PresenceKind::Offline),
    ] {
        assert_eq!(page(&arc, k), page(&boxed, k), "{k:?}");
    }
    assert_eq!(page(&boxed, None), ["dev-1", "dev-2", "dev-3"]);
    assert_eq!(page(&boxed, Some(PresenceKind::Suspect)), ["dev-2"]);
    // Retention: the offline one is forgotten in both at the same instant.
    assert_eq!(arc.poll_timeout(), boxed.poll_timeout());
    arc.handle_timeout(c.at(102));
    boxed.handle_timeout(c.at(102));
    assert_eq!(boxed.get("dev-1"), None);
    assert_eq!(arc.counts(), boxed.counts());
    assert_eq!(boxed.len(), 2);
}

/// What the test above does to either registry.
trait Ops {
    fn suspect(&mut self, now: Instant, id: &str, conn_id: u64) -> bool;
    fn disconnected(&mut self, now: Instant, id: &str, conn_id: u64) -> bool;
    fn page(&self, kind: Option<PresenceKind>) -> Vec<String>;
}

impl<K: tether_proto::presence::Id> Ops for Registry<K> {
    fn suspect(&mut self, now: Instant, id: &str, conn_id: u64) -> bool {
        Registry::suspect(self, now, id, conn_id)
    }
    fn disconnected(&mut self, now: Instant, id: &str, conn_id: u64) -> bool {
        Registry::disconnected(
            self,
            now,
            id,
            conn_id,
            DisconnectReason::PeerClosed,
            Duration::ZERO,
            None,
        )
    }
    fn page(&self, kind: Option<PresenceKind>) -> Vec<String> {
        Registry::page(self, kind, None, 100)
            .0
            .into_iter()
            .map(|(id, _)| id.to_owned())
            .collect()
    }
}
