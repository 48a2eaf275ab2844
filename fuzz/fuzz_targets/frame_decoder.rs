//! Frame decoder fuzz target: arbitrary bytes, split at offsets chosen by the input, fed to
//! the incremental decoder with a maximum frame length chosen by the input.
//!
//! Checks: no panic; never more than `max + 4` bytes buffered; every decoded frame re-encodes
//! to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_proto::codec::{self, Decoder, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max = u32::from(u16::from_be_bytes([data[0], data[1]]));
    let chunk = usize::from(data[2]).max(1);
    let mut d = Decoder::new(max);
    let mut frames = Vec::new();
    for part in data[3..].chunks(chunk) {
        let r = d.decode(part, |f| {
            frames.push(f);
            true
        });
        assert!(d.buffered() <= max as usize + HEADER_LEN);
        if r.is_err() {
            break;
        }
    }
    for f in frames {
        let mut b = BytesMut::new();
        codec::encode(&f, &mut b);
        let mut again = Vec::new();
        Decoder::new(u32::MAX)
            .decode(&b, |g| {
                again.push(g);
                true
            })
            .expect("re-encoded frame decodes");
        assert_eq!(again, vec![f]);
    }
});
