//! The chunks queued for the transport ahead of the transmit buffer: large message payloads,
//! shared with the application (and the session's replay buffer), not copied.
//!
//! ```text
//!  Conn::send_bytes(256 KiB)   header ─▶ out ─┐ split off, frozen
//!                              payload (Bytes) ┴▶ Queued: [frames ‖ header] [payload] ...
//!  driver: writev(Queued chunks..., out)  →  Conn::transmitted(n) pops / advances chunks
//! ```

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

/// Message payloads at least this large are queued as the caller's `Bytes` (written with a
/// vectored write behind their frame header), not copied into the transmit buffer. Smaller
/// ones are copied: a copy costs less than a chunk of their own below this size, and small
/// frames stay in one buffer (one plain write).
pub const SHARE_PAYLOAD_FROM: usize = 16 * 1024;

/// Chunks to write, in order, none empty; `len` is their total.
#[derive(Debug, Default)]
pub(super) struct Queued {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Queued {
    /// Appends a chunk (an empty one is skipped).
    pub(super) fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    /// The first chunk (empty when there is none).
    pub(super) fn front(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |b| &b[..])
    }

    pub(super) fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().map(|b| &b[..])
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Drops the first `n` bytes; returns how many of `n` were beyond the last chunk.
    pub(super) fn consume(&mut self, mut n: usize) -> usize {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.len -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                self.len -= n;
                n = 0;
            }
        }
        n
    }
}

/// Queues a message payload behind the frame header just encoded into `out`: by reference
/// when it is large (what `out` holds moves into the queue first, and `out` keeps the rest of
/// its allocation for what follows), else copied into `out`.
pub(super) fn queue_payload(out: &mut BytesMut, queued: &mut Option<Box<Queued>>, payload: &Bytes) {
    if payload.len() < SHARE_PAYLOAD_FROM {
        out.extend_from_slice(payload);
        return;
    }
    let q = queued.get_or_insert_with(Default::default);
    q.push(out.split().freeze());
    q.push(payload.clone());
}
