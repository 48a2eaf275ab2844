//! Policy derivation: every preset and bound yields a policy that satisfies the invariants
//! (checked here independently of `Policy::validate`), impossible inputs are refused with
//! errors that name the values, and overrides are honoured.

use std::time::Duration;

use proptest::prelude::*;
use tether_proto::duration::{self, Human};
use tether_proto::policy::{Keepalive, Policy, PolicyError, PolicyNote};
use tether_proto::presets::{PathSpec, PRESETS};

fn s(v: u64) -> Duration {
    Duration::from_secs(v)
}
fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The invariants of DESIGN.md §4, restated from the policy docs (not calling validate()).
fn assert_invariants(p: &Policy) {
    let h = p.heartbeat_interval;
    let d = p.dead_after;
    let dw = p.detect_within;
    let margin = (h / 2).max(ms(100));
    assert!(h >= ms(10), "heartbeat {h:?} below floor");
    assert!(
        d >= h * 2 + margin,
        "dead_after {d:?} < 2×{h:?} + {margin:?}"
    );
    assert!(d <= dw, "dead_after {d:?} > detect_within {dw:?}");
    assert!(
        p.suspect_after() > h && p.suspect_after() < d,
        "suspect_after {:?}",
        p.suspect_after()
    );
    if let Some(path) = p.path_timeout {
        assert!(path >= s(1));
        assert!(h <= path / 2, "heartbeat {h:?} not ≤ path/2 {path:?}");
    }
    if let Some(k) = p.keepalive {
        assert!(k.idle >= s(1) && k.interval >= s(1));
        assert_eq!(k.idle.subsec_nanos(), 0);
        assert_eq!(k.interval.subsec_nanos(), 0);
        assert!((1..=127).contains(&k.count));
        let total = k.idle + k.interval * k.count;
        assert!(total <= dw.max(s(2)), "keepalive total {total:?} > {dw:?}");
        if let Some(path) = p.path_timeout {
            assert!(
                k.idle <= (path / 2).max(s(1)),
                "keepalive idle {:?} vs path {path:?}",
                k.idle
            );
            assert!(k.interval <= (path / 2).max(s(1)));
        }
    }
    if let Some(u) = p.user_timeout {
        assert!(!u.is_zero() && u <= dw);
    }
}

/// What the derivation promises beyond the invariants: d = D, h ≤ D/3 and ≤ P/3,
/// user timeout = D, keepalive on.
fn assert_derived_shape(p: &Policy) {
    assert_eq!(p.dead_after, p.detect_within);
    assert!(p.heartbeat_interval <= p.detect_within / 3);
    if let Some(path) = p.path_timeout {
        assert!(p.heartbeat_interval <= path / 3);
        let k = p.keepalive.unwrap();
        assert!(k.idle <= (path / 3).max(s(1)));
    }
    assert_eq!(p.user_timeout, Some(p.detect_within));
    assert!(p.keepalive.is_some());
}

const BOUNDS: &[u64] = &[
    120,
    150,
    299,
    300,
    500,
    1_000,
    1_999,
    2_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    1_800_000,
    7_200_000,
    86_400_000,
    30 * 86_400_000,
];

#[test]
fn every_preset_and_bound_yields_a_valid_policy() {
    for preset in PRESETS {
        for &b in BOUNDS {
            let path = PathSpec::from_preset(preset);
            let p = Policy::derive(ms(b), Some(path))
                .unwrap_or_else(|e| panic!("{} with {}: {e}", preset.name, Human(ms(b))));
            assert_invariants(&p);
            assert_derived_shape(&p);
            assert_eq!(p.path_preset.map(|p| p.name), Some(preset.name));
            assert_eq!(p.path(), Some(path));
            p.validate().unwrap();
        }
    }
}

#[test]
fn known_values() {
    let azure = Some(PathSpec::parse("azure-lb").unwrap());
    let p = Policy::derive(s(30), azure).unwrap();
    assert_eq!((p.heartbeat_interval, p.dead_after), (s(10), s(30)));
    assert_eq!(
        p.keepalive,
        Some(Keepalive {
            idle: s(15),
            interval: s(5),
            count: 3
        })
    );

    let p = Policy::derive(s(1800), azure).unwrap();
    assert_eq!(p.heartbeat_interval, s(80));
    assert_eq!(
        p.keepalive,
        Some(Keepalive {
            idle: s(80),
            interval: s(80),
            count: 21
        })
    );

    // aws-nlb 350 s: 350/3 = 116.67 s, rounded down to whole seconds.
    let p = Policy::derive(s(3600), Some(PathSpec::parse("aws-nlb").unwrap())).unwrap();
    assert_eq!(p.heartbeat_interval, s(116));

    // 10 s bound: 3.333 s → tenths.
    let p = Policy::derive(s(10), None).unwrap();
    assert_eq!(p.heartbeat_interval, ms(3_300));
    assert_eq!(p.suspect_after(), ms(3_300 + 1_650));

    // Lab scale: a 4 s path with a 3 s bound.
    let p = Policy::derive(s(3), Some(PathSpec::from(s(4)))).unwrap();
    assert_eq!(p.heartbeat_interval, s(1));
    assert_eq!(
        p.keepalive,
        Some(Keepalive {
            idle: s(1),
            interval: s(1),
            count: 2
        })
    );
}

#[test]
fn default_is_derive_30s() {
    let p = Policy::default();
    assert_eq!(p, Policy::derive(s(30), None).unwrap());
    assert_invariants(&p);
}

fn err(d: Duration, path: Option<&str>) -> PolicyError {
    Policy::derive(d, path.map(|p| PathSpec::parse(p).unwrap())).unwrap_err()
}

fn assert_mentions(e: &PolicyError, parts: &[&str]) {
    let msg = e.to_string();
    for part in parts {
        assert!(msg.contains(part), "{msg:?} does not mention {part:?}");
    }
}

#[test]
fn impossible_inputs_are_refused_with_the_values() {
    let e = err(Duration::ZERO, None);
    assert_eq!(e, PolicyError::DetectWithinZero);
    assert_mentions(&e, &["detect_within", "0s"]);

    let e = err(ms(50), None);
    assert!(matches!(e, PolicyError::DetectWithinTooSmall { .. }));
    assert_mentions(&e, &["50ms", "120ms"]);

    let e = err(s(30), Some("0.5"));
    assert!(matches!(e, PolicyError::PathTimeoutTooSmall { .. }));
    assert_mentions(&e, &["500ms", "1s"]);

    let e = err(s(60 * 86_400), None);
    assert!(matches!(e, PolicyError::TooLarge { .. }));
    assert_mentions(&e, &["detect_within", "1440h"]);

    // Explicit heartbeat at or beyond the path timeout, and merely too close to it.
    let azure = Some(PathSpec::parse("azure-lb").unwrap());
    for hb in [300, 240, 150] {
        let e = Policy::builder(s(3600))
            .path(azure)
            .heartbeat(s(hb))
            .build()
            .unwrap_err();
        assert!(
            matches!(e, PolicyError::HeartbeatNotUnderPath { .. }),
            "{e}"
        );
        assert_mentions(&e, &[&duration::format(s(hb)), "4m", "2m"]);
    }

    let e = Policy::builder(s(20)).heartbeat(s(10)).build().unwrap_err();
    assert!(matches!(e, PolicyError::DeadAfterTooShort { .. }));
    assert_mentions(&e, &["20s", "10s", "25s"]);

    let e = Policy::builder(s(30)).heartbeat(ms(5)).build().unwrap_err();
    assert!(matches!(e, PolicyError::HeartbeatTooSmall { .. }));
    assert_mentions(&e, &["5ms", "10ms"]);

    let e = Policy::builder(s(30))
        .dead_after(s(40))
        .build()
        .unwrap_err();
    assert!(matches!(
        e,
        PolicyError::DeadAfterExceedsDetectWithin { .. }
    ));
    assert_mentions(&e, &["40s", "30s"]);

    let linux_default = Keepalive {
        idle: s(7200),
        interval: s(75),
        count: 9,
    };
    let e = Policy::builder(s(30))
        .keepalive(Some(linux_default))
        .build()
        .unwrap_err();
    assert!(matches!(e, PolicyError::KeepaliveTooSlow { .. }));
    assert_mentions(&e, &["2h11m15s", "30s"]);

    let fractional = Keepalive {
        idle: ms(1_500),
        interval: s(1),
        count: 3,
    };
    let e = Policy::builder(s(30))
        .keepalive(Some(fractional))
        .build()
        .unwrap_err();
    assert!(matches!(e, PolicyError::KeepaliveInvalid { .. }));
    assert_mentions(&e, &["1.5s", "whole seconds"]);

    let zero_count = Keepalive {
        idle: s(5),
        interval: s(1),
        count: 0,
    };
    let e = Policy::builder(s(30))
        .keepalive(Some(zero_count))
        .build()
        .unwrap_err();
    assert_mentions(&e, &["count 0"]);

    let slow_idle = Keepalive {
        idle: s(200),
        interval: s(10),
        count: 3,
    };
    let e = Policy::builder(s(3600))
        .path(azure)
        .keepalive(Some(slow_idle))
        .build()
        .unwrap_err();
    assert!(matches!(
        e,
        PolicyError::KeepaliveNotUnderPath { what: "idle", .. }
    ));
    assert_mentions(&e, &["3m20s", "4m", "2m"]);

    let e = Policy::builder(s(30))
        .user_timeout(Some(s(60)))
        .build()
        .unwrap_err();
    assert!(matches!(
        e,
        PolicyError::UserTimeoutExceedsDetectWithin { .. }
    ));
    assert_mentions(&e, &["1m", "30s"]);

    let e = Policy::builder(s(30))
        .idle_timeout(Some(Duration::ZERO))
        .build()
        .unwrap_err();
    assert_mentions(&e, &["idle_timeout"]);

    let e = Policy::builder(s(30))
        .ping_interval(Some(ms(1)))
        .build()
        .unwrap_err();
    assert_mentions(&e, &["1ms", "10ms"]);
}

#[test]
fn validate_catches_hand_built_policies() {
    let p = Policy {
        heartbeat_interval: s(20),
        ..Policy::default()
    };
    assert!(matches!(
        p.validate(),
        Err(PolicyError::DeadAfterTooShort { .. })
    ));
    let p = Policy {
        path_timeout: Some(s(12)),
        ..Policy::default()
    };
    assert!(matches!(
        p.validate(),
        Err(PolicyError::HeartbeatNotUnderPath { .. })
    ));
}

#[test]
fn overrides_are_honoured() {
    let p = Policy::builder(s(20)).heartbeat(s(5)).build().unwrap();
    assert_eq!((p.heartbeat_interval, p.dead_after), (s(5), s(20)));
    assert_invariants(&p);

    // dead_after shorter than the bound: the heartbeat is derived from it.
    let p = Policy::builder(s(60)).dead_after(s(15)).build().unwrap();
    assert_eq!((p.heartbeat_interval, p.dead_after), (s(5), s(15)));
    assert_invariants(&p);

    let p = Policy::builder(s(30))
        .keepalive(None)
        .user_timeout(None)
        .idle_timeout(Some(s(600)))
        .ping_interval(Some(s(5)))
        .build()
        .unwrap();
    assert_eq!((p.keepalive, p.user_timeout), (None, None));
    assert_eq!(
        (p.idle_timeout, p.ping_interval),
        (Some(s(600)), Some(s(5)))
    );
    assert!(p.notes().contains(&PolicyNote::KeepaliveOff));
    assert!(p.notes().contains(&PolicyNote::UserTimeoutOff));
}

#[test]
fn notes_report_limits() {
    let p = Policy::derive(ms(500), None).unwrap();
    let notes = p.notes();
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, PolicyNote::KeepaliveCoarse { .. })),
        "{notes:?}"
    );
    assert!(notes
        .iter()
        .any(|n| matches!(n, PolicyNote::UserTimeoutAggressive { .. })));
    let text = notes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("500ms") && text.contains("2s"), "{text}");

    let p = Policy::derive(s(30), Some(PathSpec::parse("aws-alb").unwrap())).unwrap();
    assert!(p
        .notes()
        .contains(&PolicyNote::KeepaliveIgnoredByPath { preset: "aws-alb" }));

    let p = Policy::derive(s(30), Some(PathSpec::from(ms(1_500)))).unwrap();
    assert!(p
        .notes()
        .iter()
        .any(|n| matches!(n, PolicyNote::KeepaliveAtKernelMinimum { .. })));
}

#[test]
fn derived_heartbeat_is_what_derive_would_choose() {
    let p = Policy::derive(s(1800), Some(PathSpec::parse("azure-lb").unwrap())).unwrap();
    assert_eq!(p.derived_heartbeat(), s(80));
    let p = Policy::builder(s(30)).heartbeat(s(5)).build().unwrap();
    assert_eq!((p.heartbeat_interval, p.derived_heartbeat()), (s(5), s(10)));
}

proptest! {
    #[test]
    fn any_derived_policy_satisfies_the_invariants(
        d_ms in 120u64..=40 * 86_400_000,
        path_ms in proptest::option::of(1_000u64..=30 * 86_400_000),
    ) {
        let p = Policy::derive(ms(d_ms), path_ms.map(|v| PathSpec::from(ms(v)))).unwrap();
        assert_invariants(&p);
        assert_derived_shape(&p);
    }

    #[test]
    fn explicit_heartbeats_are_either_valid_or_refused(
        d_ms in 0u64..=86_400_000,
        hb_ms in 0u64..=3_600_000,
        path_ms in proptest::option::of(0u64..=3_600_000),
    ) {
        let r = Policy::builder(ms(d_ms))
            .path(path_ms.map(|v| PathSpec::from(ms(v))))
            .heartbeat(ms(hb_ms))
            .build();
        match r {
            Ok(p) => {
                assert_invariants(&p);
                prop_assert_eq!(p.heartbeat_interval, ms(hb_ms));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn durations_round_trip(nanos in 0u64..=u64::MAX / 4) {
        let d = Duration::from_nanos(nanos);
        prop_assert_eq!(duration::parse(&duration::format(d)), Ok(d));
    }
}
