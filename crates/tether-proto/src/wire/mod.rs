//! Wire formats of the protocols that ride on tether, beside the frame codec
//! ([`crate::codec`]): each module turns its messages into bytes and back, checks lengths
//! before it reads, and never panics on what a peer sends.
//!
//! ```text
//!  codec    preamble, frames (HELLO, WELCOME, DATA, …, PROBE)    every tether connection
//!  probe    PROBE request/answer bodies, control messages         tether probe
//!  tunnel   OPEN DATA FIN ABORT WINDOW DONE inside DATA messages  tether tunnel
//! ```

pub mod probe;
pub mod tunnel;
