//! The tunnel's messages (`tether_proto::wire::tunnel`, `docs/TUNNEL.md`): exact bytes of
//! each kind, malformed messages, and proptests for round trips and for a decoder that never
//! panics on arbitrary bytes.

use bytes::Bytes;
use proptest::prelude::*;
use tether_proto::wire::tunnel::{kind, Msg, TunnelMsgError, VERSION};

fn dec(b: &[u8]) -> Result<Msg, TunnelMsgError> {
    Msg::decode(&Bytes::copy_from_slice(b))
}

#[test]
fn golden_bytes() {
    let cases: [(Msg, &[u8]); 6] = [
        (Msg::Open(VERSION), &[0x01, 0x01]),
        (Msg::Data(Bytes::from_static(b"hi")), &[0x02, b'h', b'i']),
        (Msg::Fin, &[0x03]),
        (Msg::Abort("reset".into()), b"\x04reset"),
        (Msg::Window(0x0004_0000), &[0x05, 0x00, 0x04, 0x00, 0x00]),
        (Msg::Done, &[0x06]),
    ];
    for (m, want) in cases {
        assert_eq!(&m.encode()[..], want, "{m:?}");
        assert_eq!(dec(want), Ok(m.clone()), "{want:02x?}");
        assert_eq!(m.kind(), want[0]);
    }
    // A reader that builds DATA in place (kind byte in front of what it read) makes the
    // same bytes.
    assert_eq!(kind::DATA, 0x02);
}

#[test]
fn malformed_messages_are_errors_with_a_reason() {
    assert_eq!(dec(&[]), Err(TunnelMsgError::Empty));
    assert_eq!(dec(&[kind::DATA]), Err(TunnelMsgError::EmptyData));
    assert_eq!(
        dec(&[kind::FIN, b'x']),
        Err(TunnelMsgError::Length {
            kind: kind::FIN,
            len: 1,
            expected: 0
        })
    );
    assert_eq!(
        dec(&[kind::WINDOW, 1, 2]),
        Err(TunnelMsgError::Length {
            kind: kind::WINDOW,
            len: 2,
            expected: 4
        })
    );
    assert!(matches!(
        dec(&[kind::OPEN]),
        Err(TunnelMsgError::Length { expected: 1, .. })
    ));
    assert!(matches!(
        dec(&[kind::DONE, 0]),
        Err(TunnelMsgError::Length { .. })
    ));
    assert_eq!(dec(&[0x7f]), Err(TunnelMsgError::UnknownKind(0x7f)));
    assert_eq!(
        TunnelMsgError::Length {
            kind: 5,
            len: 2,
            expected: 4
        }
        .to_string(),
        "tunnel message 0x05 has 2 body bytes, expected 4"
    );
    // A reason that is not UTF-8 is displayed, not rejected.
    assert_eq!(
        dec(&[kind::ABORT, 0xff, b'!']),
        Ok(Msg::Abort("\u{fffd}!".into()))
    );
}

#[test]
fn data_is_a_slice_of_the_message() {
    let m = Bytes::from_static(b"\x02payload");
    let Ok(Msg::Data(d)) = Msg::decode(&m) else {
        panic!("not DATA")
    };
    assert_eq!(d.as_ptr(), m[1..].as_ptr(), "no copy");
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        any::<u8>().prop_map(Msg::Open),
        prop::collection::vec(any::<u8>(), 1..300).prop_map(|v| Msg::Data(Bytes::from(v))),
        Just(Msg::Fin),
        ".{0,40}".prop_map(Msg::Abort),
        any::<u32>().prop_map(Msg::Window),
        Just(Msg::Done),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn round_trip(m in arb_msg()) {
        prop_assert_eq!(Msg::decode(&m.encode()), Ok(m));
    }

    /// Arbitrary bytes never panic the decoder; whatever it accepts encodes back to the same
    /// bytes (for ABORT, when the reason was UTF-8).
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        let b = Bytes::from(bytes.clone());
        if let Ok(m) = Msg::decode(&b) {
            let utf8 = std::str::from_utf8(&bytes[1..]).is_ok();
            if !matches!(m, Msg::Abort(_)) || utf8 {
                prop_assert_eq!(&m.encode()[..], &bytes[..]);
            }
        }
    }
}
