//! Fuzz target for the wire formats that ride on tether (`tether_proto::wire`): the first
//! byte picks the parser, the rest is its input.
//!
//! Checks: no panic; a probe request that parses re-encodes to its fixed fields; a control
//! message decodes and re-encodes (reserved field aside); a tunnel message that decodes
//! re-encodes to the same bytes (an ABORT reason when it was UTF-8).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::wire::probe::{ControlMsg, Request, CONTROL_MSG_LEN, REQUEST_LEN};
use tether_proto::wire::tunnel::Msg;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(r) = Request::parse(rest) {
                assert_eq!(&r.encode()[..], &rest[..REQUEST_LEN]);
            }
        }
        1 => {
            if let Ok(m) = <&[u8; CONTROL_MSG_LEN]>::try_from(rest) {
                let back = ControlMsg::decode(m).encode();
                assert_eq!(&back[..2], &m[..2]);
                assert_eq!(&back[4..], &m[4..]);
            }
        }
        _ => {
            let b = Bytes::copy_from_slice(rest);
            if let Ok(m) = Msg::decode(&b) {
                if !matches!(m, Msg::Abort(_)) || std::str::from_utf8(&rest[1..]).is_ok() {
                    assert_eq!(&m.encode()[..], rest);
                }
            }
        }
    }
});
