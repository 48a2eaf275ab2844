//! The probe exchange's bytes (`tether_proto::wire::probe`, `docs/PROBE.md`): exact bytes of
//! a request, an answer and each control message, the responder's checks, and proptests for
//! round trips and for parsers that never panic on arbitrary bytes.

use std::time::Duration;

use proptest::prelude::*;
use tether_proto::wire::probe::{
    control, report, ControlMsg, Mode, Request, RequestError, ANSWER_LEN, CONTROL_MSG_LEN,
    MAX_DELAY, MAX_GRACE, PROBE_VERSION, REQUEST_LEN,
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn sample() -> Request {
    Request {
        mode: Mode::ServerFirst,
        session: 0x0102_0304_0506_0708,
        index: 7,
        delay: Duration::from_millis(6_250),
        grace: Duration::from_millis(200),
    }
}

#[test]
fn request_golden_bytes() {
    // version mode session(8) index(4) delay_ms(4) grace_ms(4)
    let want = hex("01 03 0102030405060708 00000007 0000186a 000000c8");
    assert_eq!(sample().encode().to_vec(), want);
    assert_eq!(want.len(), REQUEST_LEN);
    assert_eq!(Request::parse(&want), Ok(sample()));
}

#[test]
fn answer_golden_bytes() {
    let want = hex("01 03 0102030405060708 00000007");
    assert_eq!(sample().answer().to_vec(), want);
    assert_eq!(want.len(), ANSWER_LEN);
}

#[test]
fn control_golden_bytes() {
    let ping = ControlMsg::ping(control::PING, 42);
    assert_eq!(
        ping.encode().to_vec(),
        hex("01 00 0000 00000000 000000000000002a")
    );
    let rep = ControlMsg {
        kind: control::REPORT,
        outcome: report::RESET,
        index: 0x0100_0003,
        value: 6_250_123,
    };
    assert_eq!(
        rep.encode().to_vec(),
        hex("03 02 0000 01000003 00000000005f5e8b")
    );
    assert_eq!(ControlMsg::decode(&rep.encode()), rep);
    // The reserved field is ignored on receipt.
    let mut m = rep.encode();
    m[2] = 0xff;
    m[3] = 0xee;
    assert_eq!(ControlMsg::decode(&m), rep);
}

#[test]
fn the_responder_checks_every_field() {
    let b = sample().encode();
    let mut longer = b.to_vec();
    longer.extend_from_slice(b"future fields");
    assert_eq!(
        Request::parse(&longer),
        Ok(sample()),
        "trailing bytes ignored"
    );
    assert_eq!(Request::parse(&b[..5]), Err(RequestError::Short { len: 5 }));
    assert_eq!(Request::parse(&[]), Err(RequestError::Short { len: 0 }));
    // A newer client learns the version even from a short body.
    assert_eq!(Request::parse(&[2]), Err(RequestError::Version(2)));
    let mut bad = b.to_vec();
    bad[0] = 9;
    assert_eq!(Request::parse(&bad), Err(RequestError::Version(9)));
    let mut bad = b.to_vec();
    bad[1] = 9;
    assert_eq!(Request::parse(&bad), Err(RequestError::Mode(9)));
    let mut huge = b.to_vec();
    huge[14..18].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Request::parse(&huge),
        Err(RequestError::Range { .. })
    ));
    let mut no_grace = b.to_vec();
    no_grace[18..22].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        Request::parse(&no_grace),
        Err(RequestError::Range { .. })
    ));
    assert_eq!(
        RequestError::Version(2).to_string(),
        format!("unsupported probe version 2, this responder speaks {PROBE_VERSION}")
    );
}

#[test]
fn durations_saturate_instead_of_wrapping() {
    let r = Request {
        delay: Duration::from_secs(u64::MAX / 4),
        ..sample()
    };
    let b = r.encode();
    assert_eq!(&b[14..18], &u32::MAX.to_be_bytes());
}

fn arb_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Control),
        Just(Mode::ClientFirst),
        Just(Mode::ServerFirst)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Every request the responder accepts survives the trip (whole milliseconds in range).
    #[test]
    fn request_round_trip(
        mode in arb_mode(),
        session in any::<u64>(),
        index in any::<u32>(),
        delay_ms in 0..=MAX_DELAY.as_millis() as u64,
        grace_ms in 1..=MAX_GRACE.as_millis() as u64,
    ) {
        let r = Request {
            mode,
            session,
            index,
            delay: Duration::from_millis(delay_ms),
            grace: Duration::from_millis(grace_ms),
        };
        let b = r.encode();
        prop_assert_eq!(b.len(), REQUEST_LEN);
        prop_assert_eq!(Request::parse(&b), Ok(r));
        let a = r.answer();
        prop_assert_eq!(a.len(), ANSWER_LEN);
        prop_assert_eq!(&a[..], &b[..ANSWER_LEN]);
    }

    /// Arbitrary bytes never panic the parser; whatever it accepts re-encodes to the same
    /// fixed fields.
    #[test]
    fn arbitrary_request_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(r) = Request::parse(&bytes) {
            prop_assert_eq!(&r.encode()[..], &bytes[..REQUEST_LEN]);
        }
    }

    #[test]
    fn control_round_trip(kind in any::<u8>(), outcome in any::<u8>(), index in any::<u32>(), value in any::<u64>()) {
        let m = ControlMsg { kind, outcome, index, value };
        prop_assert_eq!(ControlMsg::decode(&m.encode()), m);
    }

    #[test]
    fn arbitrary_control_bytes_decode(bytes in prop::array::uniform16(any::<u8>())) {
        let m = ControlMsg::decode(&bytes);
        let back = m.encode();
        prop_assert_eq!(&back[..2], &bytes[..2]);
        prop_assert_eq!(&back[4..], &bytes[4..]);
        prop_assert_eq!(back.len(), CONTROL_MSG_LEN);
    }
}
