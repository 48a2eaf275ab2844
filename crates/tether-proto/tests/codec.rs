//! Wire codec v1: exact bytes of every frame (the examples in `docs/PROTOCOL.md` come from
//! here), malformed input, and proptests for round-trips under random chunking and for a
//! decoder that never panics and never buffers more than one frame.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_proto::codec::{
    self, check_credential, check_preamble, Credential, CredentialLenError, DecodeError, Decoder,
    Frame, Hello, ResumeRequest, SessionGrant, Welcome, HEADER_LEN, MAX_CREDENTIAL_LEN,
    MAX_TEXT_LEN,
};
use tether_proto::CloseCode;

fn enc(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::encode(f, &mut b);
    b.to_vec()
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decode_all(max: u32, bytes: &[u8]) -> Result<Vec<Frame>, DecodeError> {
    let mut out = Vec::new();
    Decoder::new(max).decode(bytes, |f| {
        out.push(f);
        true
    })?;
    Ok(out)
}

fn decode_one(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let mut v = decode_all(1 << 20, bytes)?;
    assert_eq!(v.len(), 1, "exactly one frame in {bytes:02x?}");
    Ok(v.remove(0))
}

/// (frame, its exact encoding). These are the byte diagrams of docs/PROTOCOL.md.
fn golden() -> Vec<(Frame, Vec<u8>)> {
    let token: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
    vec![
        (Frame::Heartbeat, hex("00000000")),
        (
            Frame::Data(Bytes::from_static(b"hi")),
            hex("00000003 01 6869"),
        ),
        (Frame::Data(Bytes::new()), hex("00000001 01")),
        (
            Frame::Ping(0x0102030405060708),
            hex("00000009 02 0102030405060708"),
        ),
        (Frame::Pong(7), hex("00000009 03 0000000000000007")),
        (
            Frame::Close {
                code: CloseCode::NORMAL,
                text: "bye".into(),
            },
            hex("00000006 04 0000 627965"),
        ),
        (
            Frame::Close {
                code: CloseCode::APPLICATION_MIN,
                text: String::new(),
            },
            hex("00000003 04 03e8"),
        ),
        (Frame::Ack(258), hex("00000009 05 0000000000000102")),
        (
            Frame::SeqData {
                seq: 1,
                payload: Bytes::from_static(b"x"),
            },
            hex("0000000a 06 0000000000000001 78"),
        ),
        (
            Frame::Hello(Hello {
                client_id: "c1".into(),
                requested_heartbeat: Duration::from_millis(10_000),
                want_session: false,
                resume: None,
                credential: None,
            }),
            hex("00000009 10 00 00002710 02 6331"),
        ),
        (
            Frame::Hello(Hello {
                client_id: "c1".into(),
                requested_heartbeat: Duration::ZERO,
                want_session: true,
                resume: None,
                credential: None,
            }),
            hex("00000009 10 01 00000000 02 6331"),
        ),
        (
            Frame::Hello(Hello {
                client_id: "c".into(),
                requested_heartbeat: Duration::from_millis(1),
                want_session: true,
                resume: Some(ResumeRequest {
                    session_id: 9,
                    token,
                    last_received: 5,
                }),
                credential: None,
            }),
            hex("00000028 10 03 00000001 01 63
                 0000000000000009 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000005"),
        ),
        // CREDENTIAL (0x04): cred_len:u16 + credential after the id.
        (
            Frame::Hello(Hello {
                client_id: "c1".into(),
                requested_heartbeat: Duration::from_millis(10_000),
                want_session: false,
                resume: None,
                credential: Some(Credential::from(&b"tok"[..])),
            }),
            hex("0000000e 10 04 00002710 02 6331 0003 746f6b"),
        ),
        // SESSION | RESUME | CREDENTIAL: the credential follows the 32-byte resume block.
        (
            Frame::Hello(Hello {
                client_id: "c".into(),
                requested_heartbeat: Duration::from_millis(1),
                want_session: true,
                resume: Some(ResumeRequest {
                    session_id: 9,
                    token,
                    last_received: 5,
                }),
                credential: Some(Credential::from(&b"jwt"[..])),
            }),
            hex("0000002d 10 07 00000001 01 63
                 0000000000000009 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000005
                 0003 6a7774"),
        ),
        (
            Frame::Welcome(Welcome {
                heartbeat: Duration::from_millis(10_000),
                dead_after: Duration::from_millis(30_000),
                session: None,
                credential_ttl: None,
            }),
            hex("0000000a 11 00 00002710 00007530"),
        ),
        // CREDENTIAL_TTL (0x04): credential_ttl_ms:u32 after dead_after (no session).
        (
            Frame::Welcome(Welcome {
                heartbeat: Duration::from_millis(10_000),
                dead_after: Duration::from_millis(30_000),
                session: None,
                credential_ttl: Some(Duration::from_secs(3600)),
            }),
            hex("0000000e 11 04 00002710 00007530 0036ee80"),
        ),
        (
            Frame::Welcome(Welcome {
                heartbeat: Duration::from_millis(1000),
                dead_after: Duration::from_millis(3000),
                session: Some(SessionGrant {
                    session_id: 9,
                    token,
                    resumed: true,
                    last_received: 4,
                    linger: Duration::from_millis(60_000),
                }),
                credential_ttl: None,
            }),
            hex("0000002e 11 03 000003e8 00000bb8
                 0000000000000009 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000004 0000ea60"),
        ),
        // SESSION | RESUMED | CREDENTIAL_TTL, ttl 0 = the credential does not expire: the ttl
        // follows the 36-byte session block.
        (
            Frame::Welcome(Welcome {
                heartbeat: Duration::from_millis(1000),
                dead_after: Duration::from_millis(3000),
                session: Some(SessionGrant {
                    session_id: 9,
                    token,
                    resumed: true,
                    last_received: 4,
                    linger: Duration::from_millis(60_000),
                }),
                credential_ttl: Some(Duration::ZERO),
            }),
            hex("00000032 11 07 000003e8 00000bb8
                 0000000000000009 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000004 0000ea60
                 00000000"),
        ),
        (
            Frame::Auth(Credential::from(&b"tok"[..])),
            hex("00000004 07 746f6b"),
        ),
        (
            Frame::AuthOk(Duration::from_secs(3600)),
            hex("00000005 08 0036ee80"),
        ),
        (Frame::AuthOk(Duration::ZERO), hex("00000005 08 00000000")),
        (
            Frame::Refuse {
                code: CloseCode::SERVER_FULL,
                text: "full".into(),
            },
            hex("00000007 12 000a 66756c6c"),
        ),
        (
            Frame::Probe(Bytes::from_static(b"\x01\x02")),
            hex("00000003 20 0102"),
        ),
        (Frame::Extension(0x80), hex("00000001 80")),
    ]
}

#[test]
fn every_frame_has_the_documented_bytes_and_decodes_back() {
    for (frame, bytes) in golden() {
        assert_eq!(enc(&frame), bytes, "{frame:?}");
        assert_eq!(decode_one(&bytes).unwrap(), frame);
    }
}

#[test]
fn preamble_is_magic_and_version() {
    let mut b = BytesMut::new();
    codec::encode_preamble(&mut b);
    assert_eq!(&b[..], b"TTHR\x01");
    assert_eq!(check_preamble(b"TTHR\x01"), Ok(()));
    assert_eq!(
        check_preamble(b"TTHX\x01"),
        Err(DecodeError::BadMagic { found: *b"TTHX" })
    );
    assert_eq!(
        check_preamble(b"TTHR\x02"),
        Err(DecodeError::UnsupportedVersion { found: 2 })
    );
}

#[test]
fn extension_bodies_are_skipped_whole() {
    // An unknown extension with a body, then a DATA: the DATA still arrives.
    let mut bytes = hex("00000004 9f 010203");
    bytes.extend(enc(&Frame::Data(Bytes::from_static(b"ok"))));
    assert_eq!(
        decode_all(1024, &bytes).unwrap(),
        vec![
            Frame::Extension(0x9f),
            Frame::Data(Bytes::from_static(b"ok"))
        ]
    );
}

#[test]
fn unknown_types_below_0x80_are_errors() {
    for t in [0x00u8, 0x09, 0x0f, 0x13, 0x21, 0x7f] {
        assert_eq!(
            decode_all(1024, &[0, 0, 0, 1, t]),
            Err(DecodeError::UnknownType(t))
        );
    }
}

#[test]
fn malformed_bodies_are_errors_not_panics() {
    let cases: &[(&str, &str)] = &[
        ("00000001 02", "PING"),                    // no nonce
        ("00000008 02 01020304050607", "PING"),     // 7-byte nonce
        ("0000000a 03 010203040506070809", "PONG"), // 9-byte nonce
        ("00000001 05", "ACK"),
        ("00000005 06 01020304", "SEQ_DATA"),
        ("00000002 04 00", "CLOSE"),       // half a code
        ("00000004 12 000a ff", "REFUSE"), // text not UTF-8
        ("00000001 10", "HELLO"),
        ("00000007 10 00 00000000 00", "HELLO"), // empty id
        ("00000008 10 08 00000000 01 63", "HELLO"), // unknown flag
        ("00000008 10 00 00000000 05 63", "HELLO"), // id runs past the frame
        ("00000009 10 00 00000000 01 63 00", "HELLO"), // trailing byte
        ("00000009 10 02 00000000 01 63 00", "HELLO"), // resume flag, short resume
        ("00000008 10 00 00000000 01 ff", "HELLO"), // id not UTF-8
        ("00000009 11 00 00000001 000000", "WELCOME"), // short
        ("0000000a 11 00 00000000 00000001", "WELCOME"), // zero heartbeat
        ("0000000a 11 00 00000001 00000000", "WELCOME"), // zero dead_after
        ("0000000a 11 02 00000001 00000001", "WELCOME"), // resumed without session
        ("0000000a 11 01 00000001 00000001", "WELCOME"), // session flag, no fields
        ("0000000a 11 08 00000001 00000001", "WELCOME"), // unknown flag
        ("0000000b 11 00 00000001 00000001 00", "WELCOME"), // trailing
        // CREDENTIAL / CREDENTIAL_TTL / AUTH / AUTH_OK
        ("00000008 10 04 00000000 01 63", "HELLO"), // credential flag, no cred_len
        ("00000009 10 04 00000000 01 63 00", "HELLO"), // half a cred_len
        ("0000000a 10 04 00000000 01 63 0000", "HELLO"), // cred_len 0
        ("0000000b 10 04 00000000 01 63 0002 61", "HELLO"), // credential runs past the frame
        ("0000000c 10 04 00000000 01 63 0001 61 00", "HELLO"), // trailing after the credential
        ("0000000b 10 00 00000000 01 63 0001 61", "HELLO"), // credential without the flag
        // RESUME | CREDENTIAL with the resume block cut short by the credential.
        ("00000010 10 06 00000000 01 63 0003 746f6b 000000", "HELLO"),
        ("0000000a 11 04 00000001 00000001", "WELCOME"), // ttl flag, no ttl
        ("0000000c 11 04 00000001 00000001 0000", "WELCOME"), // half a ttl
        ("0000000f 11 04 00000001 00000001 00000001 00", "WELCOME"), // trailing after ttl
        ("0000000e 11 00 00000001 00000001 00000001", "WELCOME"), // ttl without the flag
        // SESSION | CREDENTIAL_TTL with the session block but no ttl after it.
        (
            "0000002e 11 05 00000001 00000001
             0000000000000009 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000004 0000ea60",
            "WELCOME",
        ),
        ("00000001 07", "AUTH"),               // empty credential
        ("00000004 08 000000", "AUTH_OK"),     // short ttl
        ("00000006 08 0000000000", "AUTH_OK"), // long ttl
        ("00000001 08", "AUTH_OK"),            // no ttl
    ];
    for (h, name) in cases {
        match decode_all(1024, &hex(h)) {
            Err(DecodeError::Malformed { frame, .. }) => assert_eq!(frame, *name, "{h}"),
            other => panic!("{h}: {other:?}"),
        }
    }
}

/// A HELLO with flag CREDENTIAL whose credential is `cred` (any length, for limit tests).
fn raw_hello_with_credential(cred_len: u16, cred: &[u8]) -> Vec<u8> {
    let mut body = hex("10 04 00000000 01 63");
    body.extend(cred_len.to_be_bytes());
    body.extend(cred);
    let mut raw = (body.len() as u32).to_be_bytes().to_vec();
    raw.extend(body);
    raw
}

#[test]
fn credentials_of_8192_bytes_pass_and_8193_are_malformed() {
    let max = vec![b'x'; MAX_CREDENTIAL_LEN];
    let over = vec![b'x'; MAX_CREDENTIAL_LEN + 1];
    // HELLO
    let Frame::Hello(h) = decode_one(&raw_hello_with_credential(8192, &max)).unwrap() else {
        panic!()
    };
    assert_eq!(h.credential.as_deref(), Some(&max[..]));
    // A logged hello never shows the credential.
    assert!(!format!("{h:?}").contains("xxx"), "{h:?}");
    assert!(
        format!("{h:?}").contains("Credential(<8192 bytes>)"),
        "{h:?}"
    );
    for raw in [
        raw_hello_with_credential(8193, &over),
        // The length alone is refused, before the bytes it announces are looked at.
        raw_hello_with_credential(8193, b"x"),
        raw_hello_with_credential(u16::MAX, b""),
    ] {
        assert!(
            matches!(
                decode_all(1 << 20, &raw),
                Err(DecodeError::Malformed { frame: "HELLO", .. })
            ),
            "{:?}",
            decode_all(1 << 20, &raw)
        );
    }
    // AUTH
    let mut raw = ((MAX_CREDENTIAL_LEN + 1) as u32).to_be_bytes().to_vec();
    raw.push(0x07);
    raw.extend(&max);
    assert_eq!(
        decode_one(&raw).unwrap(),
        Frame::Auth(Credential::from(max.clone()))
    );
    let mut raw = ((MAX_CREDENTIAL_LEN + 2) as u32).to_be_bytes().to_vec();
    raw.push(0x07);
    raw.extend(&over);
    assert!(matches!(
        decode_all(1 << 20, &raw),
        Err(DecodeError::Malformed { frame: "AUTH", .. })
    ));
}

#[test]
fn credentials_are_checked_at_the_edge_and_cut_at_the_limit_on_encode() {
    assert_eq!(check_credential(b""), Err(CredentialLenError::Empty));
    assert_eq!(check_credential(&[1; MAX_CREDENTIAL_LEN]), Ok(()));
    assert_eq!(
        check_credential(&[1; MAX_CREDENTIAL_LEN + 1]),
        Err(CredentialLenError::TooLong {
            len: MAX_CREDENTIAL_LEN + 1,
            max: MAX_CREDENTIAL_LEN
        })
    );
    // encode cannot fail: an unchecked oversize credential is cut, so the peer sees a
    // well-formed frame (and refuses the credential itself).
    let long = Credential::from(vec![b'y'; MAX_CREDENTIAL_LEN + 100]);
    let hello = Frame::Hello(Hello {
        client_id: "c".into(),
        requested_heartbeat: Duration::ZERO,
        want_session: false,
        resume: None,
        credential: Some(long.clone()),
    });
    let Frame::Hello(h) = decode_one(&enc(&hello)).unwrap() else {
        panic!()
    };
    assert_eq!(h.credential.unwrap().len(), MAX_CREDENTIAL_LEN);
    let Frame::Auth(c) = decode_one(&enc(&Frame::Auth(long))).unwrap() else {
        panic!()
    };
    assert_eq!(c.len(), MAX_CREDENTIAL_LEN);
}

#[test]
fn secrets_never_show_in_debug_output() {
    // Credentials and resume tokens are secrets: a `{:?}` of a frame (a log line) shows
    // neither, only what is needed to debug (lengths, ids, sequence numbers).
    for (frame, _) in golden() {
        let dbg = format!("{frame:?}");
        assert!(!dbg.contains("160"), "token byte a0 = 160 in {dbg}");
        assert!(!dbg.contains("116, 111, 107"), "credential bytes in {dbg}");
        assert!(!dbg.contains("106, 119, 116"), "credential bytes in {dbg}");
    }
    let d = format!("{:?}", Credential::from(&b"secret"[..]));
    assert_eq!(d, "Credential(<6 bytes>)");
}

#[test]
fn a_credential_ttl_below_one_millisecond_is_never_sent_as_no_expiry() {
    // 0 on the wire means "does not expire": a tiny ttl must round up, not down.
    assert_eq!(
        enc(&Frame::AuthOk(Duration::from_micros(500))),
        hex("00000005 08 00000001")
    );
    let w = Frame::Welcome(Welcome {
        heartbeat: Duration::from_millis(1),
        dead_after: Duration::from_millis(1),
        session: None,
        credential_ttl: Some(Duration::from_nanos(1)),
    });
    assert_eq!(enc(&w), hex("0000000e 11 04 00000001 00000001 00000001"));
    // Beyond u32::MAX ms it saturates (the client refreshes early, never late).
    assert_eq!(
        enc(&Frame::AuthOk(Duration::from_secs(u64::from(u32::MAX)))),
        hex("00000005 08 ffffffff")
    );
}

#[test]
fn text_longer_than_the_limit_is_truncated_on_encode_and_refused_on_decode() {
    let long = "é".repeat(MAX_TEXT_LEN); // 2 bytes each
    let bytes = enc(&Frame::Close {
        code: CloseCode::NORMAL,
        text: long,
    });
    let Frame::Close { text, .. } = decode_one(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(text.len(), MAX_TEXT_LEN);
    // A peer that sends 1025 bytes of text is malformed.
    let mut raw = vec![0, 0, 0x04, 0x04, 0x04, 0, 0];
    raw.extend(std::iter::repeat_n(b'a', MAX_TEXT_LEN + 1));
    assert!(matches!(
        decode_all(1 << 20, &raw),
        Err(DecodeError::Malformed { frame: "CLOSE", .. })
    ));
}

#[test]
fn oversize_is_rejected_on_the_header_alone() {
    let mut d = Decoder::new(100);
    // Body of exactly the maximum is fine.
    let mut ok = vec![0, 0, 0, 100, 0x01];
    ok.extend([0u8; 99]);
    assert_eq!(d.decode(&ok, |_| true).unwrap().frames, 1);
    // 101 announced: refused after 4 bytes, nothing reserved.
    let mut d = Decoder::new(100);
    assert_eq!(
        d.decode(&[0, 0, 0, 101], |_| true),
        Err(DecodeError::Oversize { len: 101, max: 100 })
    );
    assert_eq!(d.buffer_capacity(), 0);
    // Same with the header split over calls.
    let mut d = Decoder::new(100);
    d.decode(&[0xff, 0xff], |_| true).unwrap();
    assert_eq!(
        d.decode(&[0xff, 0xff], |_| true),
        Err(DecodeError::Oversize {
            len: u32::MAX,
            max: 100
        })
    );
    assert!(d.buffer_capacity() < 64);
}

#[test]
fn a_stalled_large_frame_costs_what_was_sent_not_what_was_announced() {
    let mut d = Decoder::new(1 << 20);
    d.decode(&[0, 0x0f, 0, 0, 0x01, 1, 2, 3], |_| true).unwrap();
    assert_eq!(d.buffered(), 8);
    assert!(d.buffer_capacity() < 4096, "{}", d.buffer_capacity());
}

#[test]
fn the_sink_can_stop_decoding() {
    let mut bytes = enc(&Frame::Ping(1));
    bytes.extend(enc(&Frame::Ping(2)));
    let mut seen = Vec::new();
    let stats = Decoder::new(64)
        .decode(&bytes, |f| {
            seen.push(f);
            false
        })
        .unwrap();
    assert_eq!(seen, vec![Frame::Ping(1)]);
    assert_eq!(stats.frames, 1);
}

#[test]
fn decode_stats_count_heartbeats() {
    let mut bytes = enc(&Frame::Heartbeat);
    bytes.extend(enc(&Frame::Ping(1)));
    bytes.extend(enc(&Frame::Heartbeat));
    let stats = Decoder::new(64).decode(&bytes, |_| true).unwrap();
    assert_eq!((stats.frames, stats.heartbeats), (3, 2));
}

#[test]
fn data_frame_len_matches_encode() {
    for n in [0usize, 1, 64, 4096] {
        let mut b = BytesMut::new();
        codec::encode_data(&vec![0; n], &mut b);
        assert_eq!(b.len(), codec::data_frame_len(n));
    }
}

// ---------------------------------------------------------------------------------------
// Property tests

fn arb_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..40).prop_map(|c| c.into_iter().collect())
}

fn arb_id() -> impl Strategy<Value = String> {
    // 1..=255 bytes of UTF-8 (at most 63 four-byte chars).
    prop::collection::vec(any::<char>(), 1..63).prop_map(|c| c.into_iter().collect())
}

fn arb_ms() -> impl Strategy<Value = Duration> {
    any::<u32>().prop_map(|m| Duration::from_millis(u64::from(m)))
}

fn arb_pos_ms() -> impl Strategy<Value = Duration> {
    (1u32..).prop_map(|m| Duration::from_millis(u64::from(m)))
}

fn arb_credential() -> impl Strategy<Value = Credential> {
    prop::collection::vec(any::<u8>(), 1..300).prop_map(Credential::from)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
    prop_oneof![
        Just(Frame::Heartbeat),
        bytes().prop_map(Frame::Data),
        (any::<u64>(), bytes()).prop_map(|(seq, payload)| Frame::SeqData { seq, payload }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        any::<u64>().prop_map(Frame::Ack),
        (any::<u16>(), arb_text()).prop_map(|(c, text)| Frame::Close {
            code: CloseCode(c),
            text
        }),
        (any::<u16>(), arb_text()).prop_map(|(c, text)| Frame::Refuse {
            code: CloseCode(c),
            text
        }),
        (
            arb_id(),
            arb_ms(),
            any::<bool>(),
            prop::option::of((any::<u64>(), any::<[u8; 16]>(), any::<u64>())),
            prop::option::of(arb_credential()),
        )
            .prop_map(
                |(client_id, hb, want, resume, credential)| Frame::Hello(Hello {
                    client_id,
                    requested_heartbeat: hb,
                    want_session: want || resume.is_some(),
                    resume: resume.map(|(session_id, token, last_received)| ResumeRequest {
                        session_id,
                        token,
                        last_received
                    }),
                    credential,
                })
            ),
        (
            arb_pos_ms(),
            arb_pos_ms(),
            prop::option::of((
                any::<u64>(),
                any::<[u8; 16]>(),
                any::<bool>(),
                any::<u64>(),
                arb_ms()
            )),
            prop::option::of(arb_ms()),
        )
            .prop_map(|(heartbeat, dead_after, s, credential_ttl)| Frame::Welcome(
                Welcome {
                    heartbeat,
                    dead_after,
                    session: s.map(|(session_id, token, resumed, last_received, linger)| {
                        SessionGrant {
                            session_id,
                            token,
                            resumed,
                            last_received,
                            linger,
                        }
                    }),
                    credential_ttl,
                }
            )),
        arb_credential().prop_map(Frame::Auth),
        arb_ms().prop_map(Frame::AuthOk),
        bytes().prop_map(Frame::Probe),
        (0x80u8..=0xff).prop_map(Frame::Extension),
    ]
}

/// Split points: sorted offsets in `0..=len`.
/// The complete DATA and SEQ_DATA frames of one read share one copy of their bytes (one
/// allocation per read, not per message); the incomplete tail is not part of it, and a lone
/// frame is copied on its own.
#[test]
fn complete_frames_of_one_read_share_one_block_without_the_tail() {
    let mut wire = enc(&Frame::Data(Bytes::from_static(b"first")));
    wire.extend(enc(&Frame::Heartbeat));
    wire.extend(enc(&Frame::SeqData {
        seq: 9,
        payload: Bytes::from_static(b"second"),
    }));
    wire.extend(enc(&Frame::Data(Bytes::from_static(b"third"))));
    let whole = wire.len();
    // The next frame, incomplete: a 100-byte body of which 3 bytes arrived.
    wire.extend([0, 0, 0, 100, 1, 0xaa, 0xbb]);
    let mut d = Decoder::new(1 << 20);
    let mut frames = Vec::new();
    d.decode(&wire, |f| {
        frames.push(f);
        true
    })
    .unwrap();
    let [Frame::Data(a), Frame::Heartbeat, Frame::SeqData { seq: 9, payload: b }, Frame::Data(c)] =
        &frames[..]
    else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!(
        (&a[..], &b[..], &c[..]),
        (&b"first"[..], &b"second"[..], &b"third"[..])
    );
    // One block: each payload sits where the wire put it relative to the first one.
    let base = a.as_ptr() as usize - (HEADER_LEN + 1);
    assert_eq!(b.as_ptr() as usize - base, 10 + 4 + HEADER_LEN + 9);
    assert_eq!(c.as_ptr() as usize - base, whole - 5);
    // The tail went to the decoder's own buffer.
    assert_eq!(d.buffered(), 7);

    // A single complete frame is copied on its own (exactly its payload).
    let lone = enc(&Frame::Data(Bytes::from_static(b"lone")));
    let mut out = Vec::new();
    Decoder::new(1 << 20)
        .decode(&lone, |f| {
            out.push(f);
            true
        })
        .unwrap();
    assert_eq!(out, vec![Frame::Data(Bytes::from_static(b"lone"))]);
}

fn split(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort();
    let mut out = Vec::new();
    let mut prev = 0;
    for a in at.into_iter().chain([bytes.len()]) {
        out.push(bytes[prev..a].to_vec());
        prev = a;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Many frames, concatenated, split at random offsets (including empty chunks), decoded
    /// incrementally: the same sequence comes out, and nothing stays buffered at the end.
    #[test]
    fn round_trip_under_random_chunking(
        frames in prop::collection::vec(arb_frame(), 0..40),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            codec::encode(f, &mut wire);
        }
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for chunk in split(&wire, &cuts) {
            d.decode(&chunk, |f| { out.push(f); true }).unwrap();
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(d.buffered(), 0);
        prop_assert_eq!(d.buffer_capacity(), 0);
    }

    /// Large and small messages read as the driver reads them (in place while `frame_room`
    /// allows at least 16 KiB, otherwise a read of random size, at most `next_read_limit`,
    /// decoded from a copy): the same messages come out in order, a frame's buffer never
    /// exceeds four times what arrived or what arrived plus the largest frame before it, and
    /// nothing is held at the end.
    #[test]
    fn driver_style_reads_with_headers_alone_round_trip(
        sizes in prop::collection::vec(
            prop_oneof![0usize..200, 60_000usize..140_000],
            1..12,
        ),
        reads in prop::collection::vec(1usize..70_000, 1..40),
    ) {
        let mut wire = BytesMut::new();
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect();
        for (i, p) in payloads.iter().enumerate() {
            codec::encode_seq_data(i as u64, p, &mut wire);
        }
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        let (mut at, mut k) = (0, 0);
        let mut last_large = 0;
        while at < wire.len() {
            let before = out.len();
            let want = reads[k % reads.len()];
            k += 1;
            let room = d.frame_room();
            if room >= 16 * 1024 {
                let mut buf = d.frame_body_buf(want);
                let n = bytes::BufMut::remaining_mut(&buf).min(wire.len() - at);
                bytes::BufMut::put_slice(&mut buf, &wire[at..at + n]);
                at += n;
                d.decode(&[], |f| { out.push(f); true }).unwrap();
            } else {
                let n = d.next_read_limit().unwrap_or(want).min(want);
                let n = n.min(wire.len() - at);
                d.decode(&wire[at..at + n], |f| { out.push(f); true }).unwrap();
                at += n;
            }
            for f in &out[before..] {
                if let Frame::SeqData { payload, .. } = f {
                    let total = HEADER_LEN + 9 + payload.len();
                    if total >= codec::LARGE_FRAME {
                        last_large = last_large.max(total);
                    }
                }
            }
            prop_assert!(
                d.buffer_capacity() <= (4 * d.buffered()).max(d.buffered() + last_large),
                "capacity {} for {} held after a {}-byte frame",
                d.buffer_capacity(), d.buffered(), last_large
            );
        }
        prop_assert_eq!(out.len(), payloads.len());
        for (i, (f, p)) in out.iter().zip(&payloads).enumerate() {
            match f {
                Frame::SeqData { seq, payload } => {
                    prop_assert_eq!(*seq, i as u64);
                    prop_assert_eq!(&payload[..], &p[..]);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
        prop_assert_eq!(d.buffered(), 0);
        prop_assert_eq!(d.buffer_capacity(), 0);
    }

    /// Arbitrary bytes in arbitrary chunks: the decoder returns frames or an error, never
    /// panics, and never holds more than one maximal frame (header + max body).
    #[test]
    fn decoder_survives_arbitrary_bytes(
        max in 0u32..2048,
        data in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let mut d = Decoder::new(max);
        for chunk in split(&data, &cuts) {
            let r = d.decode(&chunk, |_| true);
            prop_assert!(d.buffered() <= max as usize + HEADER_LEN);
            if r.is_err() { break; }
        }
    }

    /// HELLO, WELCOME, AUTH and AUTH_OK bodies with random flags and fields (the credential
    /// additions' parsers): each decodes or fails as malformed, never panics, and what decodes
    /// re-encodes to a frame that decodes the same (the bytes may differ only where the
    /// encoder normalises: RESUME without SESSION gains the SESSION bit).
    #[test]
    fn auth_bearing_bodies_decode_or_fail_cleanly(
        t in prop::sample::select(vec![0x10u8, 0x11, 0x07, 0x08]),
        flags in 0u8..16,
        rest in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut body = vec![t];
        if t >= 0x10 {
            body.push(flags);
        }
        body.extend(&rest);
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend(&body);
        match decode_all(1 << 20, &wire) {
            Ok(frames) => {
                prop_assert_eq!(frames.len(), 1);
                let again = decode_one(&enc(&frames[0])).unwrap();
                prop_assert_eq!(&again, &frames[0]);
            }
            Err(e) => prop_assert!(matches!(e, DecodeError::Malformed { .. }), "{:?}", e),
        }
    }

    /// Headers with small lengths and random bodies: errors are typed, never panics, and
    /// what decodes re-encodes to a frame that decodes the same.
    #[test]
    fn random_bodies_decode_or_fail_cleanly(
        body in prop::collection::vec(any::<u8>(), 1..80),
    ) {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend(&body);
        if let Ok(frames) = decode_all(1024, &wire) {
            prop_assert_eq!(frames.len(), 1);
            let again = decode_one(&enc(&frames[0])).unwrap();
            prop_assert_eq!(&again, &frames[0]);
        }
    }
}

#[test]
fn a_large_frame_read_in_pieces_is_whole_and_its_buffer_stays_within_twice_its_size() {
    // A 256 KiB SEQ_DATA arriving in 16 KiB reads (as the driver reads): the payload is
    // exact, and the decoder never holds more than twice the frame (what a server's frame
    // budget charges for an admitted frame).
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut wire = BytesMut::new();
    codec::encode_seq_data(7, &payload, &mut wire);
    let total = wire.len();
    let mut d = Decoder::new(1 << 20);
    let mut got = Vec::new();
    for piece in wire.chunks(16 * 1024) {
        d.decode(piece, |f| {
            got.push(f);
            true
        })
        .unwrap();
        assert!(
            d.buffer_capacity() <= 2 * total,
            "{} held for a frame of {total}",
            d.buffer_capacity()
        );
    }
    assert_eq!(d.buffer_capacity(), 0);
    match got.as_slice() {
        [Frame::SeqData { seq: 7, payload: p }] => assert_eq!(&p[..], &payload[..]),
        other => panic!("decoded {} frames", other.len()),
    }
}

/// The rest of a large frame read straight into the frame's buffer (what a driver does to
/// avoid a copy): the frame comes out whole and equal, the reads never take a byte of the
/// next frame, the buffer stays within four times what arrived (or the frame's size), and
/// the payload is delivered in the very buffer it was read into.
#[test]
fn the_rest_of_a_large_frame_is_read_into_its_own_buffer() {
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut wire = BytesMut::new();
    codec::encode_seq_data(42, &payload, &mut wire);
    codec::encode(&Frame::Heartbeat, &mut wire);
    let wire = wire.freeze();
    let frame_len = wire.len() - HEADER_LEN;
    let mut d = Decoder::new(1 << 20);
    let mut got = Vec::new();
    // The frame's start arrives the usual way.
    let first = 20_000;
    d.decode(&wire[..first], |f| {
        got.push(f);
        true
    })
    .unwrap();
    assert!(got.is_empty());
    let mut at = first;
    let mut body_ptr = None;
    while d.frame_room() > 0 {
        let room = d.frame_room();
        assert!(
            room <= 3 * d.buffered(),
            "room {room} for {} held",
            d.buffered()
        );
        let mut buf = d.frame_body_buf(64 * 1024);
        let n = bytes::BufMut::remaining_mut(&buf).min(wire.len() - at);
        bytes::BufMut::put_slice(&mut buf, &wire[at..at + n]);
        at += n;
        assert!(at <= frame_len, "read into the next frame");
        assert!(
            d.buffer_capacity() <= (4 * d.buffered()).max(frame_len),
            "capacity {} for {} held",
            d.buffer_capacity(),
            d.buffered()
        );
        body_ptr = Some(d.frame_body_buf(0).get_ref().as_ptr());
        d.decode(&[], |f| {
            got.push(f);
            true
        })
        .unwrap();
    }
    assert_eq!(at, frame_len, "the whole frame was read in place");
    match &got[..] {
        [Frame::SeqData {
            seq: 42,
            payload: p,
        }] => {
            assert_eq!(&p[..], &payload[..]);
            let start = body_ptr.unwrap();
            assert_eq!(p.as_ptr(), start.wrapping_add(HEADER_LEN + 9), "not copied");
        }
        other => panic!("unexpected frames {other:?}"),
    }
    assert_eq!(d.buffer_capacity(), 0, "the buffer went with the frame");
    // What follows is decoded the usual way.
    d.decode(&wire[at..], |f| {
        got.push(f);
        true
    })
    .unwrap();
    assert_eq!(got.last(), Some(&Frame::Heartbeat));
}

#[test]
fn no_room_to_read_in_place_without_a_whole_length_header_or_past_the_limit() {
    let mut d = Decoder::new(1000);
    d.decode(&[0, 0, 1], |_| true).unwrap();
    assert_eq!(d.frame_room(), 0, "length header incomplete");
    let mut d = Decoder::new(1000);
    d.decode(&[0, 0, 0, 10, 1, 2], |_| true).unwrap();
    assert_eq!(d.frame_room(), 8);
    let mut d = Decoder::new(1000);
    assert!(d.decode(&[0, 0, 0x10, 0, 1], |_| true).is_err());
    assert_eq!(d.frame_room(), 0, "oversize frame");
}

/// Reads `d`'s frame held in part in place, `step` bytes at most per read, from `wire[at..]`;
/// returns where it stopped and the frames that came out. With `once`, checks that the
/// buffer is allocated once (never moved while it fills).
fn read_in_place(
    d: &mut Decoder,
    wire: &[u8],
    mut at: usize,
    step: usize,
    once: bool,
) -> (usize, Vec<Frame>) {
    let mut got = Vec::new();
    let mut start = None;
    while d.frame_room() > 0 {
        let mut buf = d.frame_body_buf(step);
        let n = bytes::BufMut::remaining_mut(&buf).min(wire.len() - at);
        bytes::BufMut::put_slice(&mut buf, &wire[at..at + n]);
        at += n;
        let ptr = buf.get_ref().as_ptr();
        if once {
            assert_eq!(*start.get_or_insert(ptr), ptr, "the frame's buffer moved");
        }
        d.decode(&[], |f| {
            got.push(f);
            true
        })
        .unwrap();
    }
    (at, got)
}

/// In a stream of large messages each read ends where a frame does: a frame's header is
/// read alone and a large body in place, into one buffer of the frame's size allocated once
/// (no copy, no move); a small frame in between is read in two small reads and does not end
/// the bulk mode, a few small frames in a row do; a frame whose header alone arrived holds
/// four times it, and no more than the largest frame before it once read in place.
#[test]
fn in_a_bulk_stream_reads_end_where_frames_do_and_large_bodies_are_read_in_place() {
    let sizes = [
        262_154usize,
        200_000,
        100_000,
        10,
        150_000,
        5,
        6,
        7,
        8,
        250_000,
    ];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i % 249) as u8).collect())
        .collect();
    let mut wire = BytesMut::new();
    for (i, p) in payloads.iter().enumerate() {
        codec::encode_seq_data(i as u64 + 1, p, &mut wire);
    }
    let wire = wire.freeze();
    let mut d = Decoder::new(1 << 20);
    assert_eq!(d.next_read_limit(), None, "nothing received yet");
    // The first large frame: its start through a copy, the rest in place (as before).
    let mut got = Vec::new();
    d.decode(&wire[..30_000], |f| {
        got.push(f);
        true
    })
    .unwrap();
    let (mut at, frames) = read_in_place(&mut d, &wire, 30_000, 64 * 1024, false);
    got.extend(frames);
    assert_eq!(got.len(), 1);
    for (i, p) in payloads.iter().enumerate().skip(1) {
        let total = HEADER_LEN + 9 + p.len();
        if i == 9 {
            // Four small frames in a row ended the bulk mode: read as much as there is. The
            // large frame's start comes through a copy, but its buffer is sized for all of
            // it at once (four times what arrived covers it) and never moves.
            assert_eq!(d.next_read_limit(), None, "frame {i}");
            let first = 64 * 1024;
            d.decode(&wire[at..at + first], |f| {
                got.push(f);
                true
            })
            .unwrap();
            assert_eq!(d.buffer_capacity(), total, "sized at once");
            let (next, frames) = read_in_place(&mut d, &wire, at + first, 64 * 1024, true);
            assert_eq!(next, at + total);
            at = next;
            got.extend(frames);
            continue;
        }
        assert_eq!(
            d.next_read_limit(),
            Some(HEADER_LEN),
            "frame {i}: header alone"
        );
        d.decode(&wire[at..at + HEADER_LEN], |_| true).unwrap();
        at += HEADER_LEN;
        let room = d.frame_room();
        let capacity = d.buffer_capacity();
        // Only a read in place (after a server's driver admitted the frame into its
        // budget) makes the buffer large: decoding the header holds four times it.
        assert!(
            capacity <= 4 * HEADER_LEN,
            "frame {i}: {capacity} held for a header"
        );
        assert_eq!(room, total - HEADER_LEN, "frame {i}: all of its body");
        if room < 16 * 1024 {
            // A small frame: the rest of it alone, decoded the usual way.
            assert_eq!(d.next_read_limit(), Some(room), "frame {i}");
            d.decode(&wire[at..at + room], |f| {
                got.push(f);
                true
            })
            .unwrap();
            at += room;
            continue;
        }
        let (next, frames) = read_in_place(&mut d, &wire, at, 64 * 1024, true);
        assert_eq!(
            next - at,
            total - HEADER_LEN,
            "frame {i}: the body read in place"
        );
        at = next;
        match &frames[..] {
            [Frame::SeqData { payload, .. }] => assert_eq!(&payload[..], &p[..]),
            other => panic!("frame {i}: {} frames", other.len()),
        }
        got.extend(frames);
    }
    assert_eq!(at, wire.len());
    let seqs: Vec<u64> = got
        .iter()
        .map(|f| match f {
            Frame::SeqData { seq, .. } => *seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, (1..=sizes.len() as u64).collect::<Vec<_>>());
    for (f, p) in got.iter().zip(&payloads) {
        let Frame::SeqData { payload, .. } = f else {
            unreachable!()
        };
        assert_eq!(&payload[..], &p[..]);
    }
    assert_eq!(d.next_read_limit(), Some(HEADER_LEN), "bulk again");
    // A header that announces more than any frame before it: room only up to the largest
    // frame so far (what the peer already made us hold), and the rest the usual way.
    let mut d = Decoder::new(1 << 20);
    let mut big = BytesMut::new();
    codec::encode_seq_data(1, &vec![1u8; 70_000], &mut big);
    d.decode(&big, |_| true).unwrap();
    assert_eq!(d.next_read_limit(), Some(HEADER_LEN));
    let mut huge = BytesMut::new();
    codec::encode_seq_data(2, &vec![2u8; 500_000], &mut huge);
    d.decode(&huge[..HEADER_LEN], |_| true).unwrap();
    assert!(d.buffer_capacity() <= 4 * HEADER_LEN);
    assert_eq!(d.frame_room(), big.len());
    let _ = d.frame_body_buf(usize::MAX);
    assert_eq!(d.buffer_capacity(), big.len() + HEADER_LEN);
    // A stream of small messages never enters bulk mode.
    let mut d = Decoder::new(1 << 20);
    let mut small = BytesMut::new();
    for _ in 0..100 {
        codec::encode_data(&[7; 64], &mut small);
    }
    d.decode(&small, |_| true).unwrap();
    assert_eq!(d.next_read_limit(), None);
}
