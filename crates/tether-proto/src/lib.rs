//! tether-proto: the sans-IO core of tether.
//!
//! Everything here is a pure state machine: it takes input (bytes, events, the current time)
//! and produces output (bytes to send, events, the next deadline). It never reads the clock,
//! never sleeps and owns no socket (`clippy.toml` in this crate bans `Instant::now`,
//! `SystemTime::now` and `thread::sleep`). The tokio driver lives in the `tether` crate.
//!
//! ```text
//!            bytes in                          bytes out
//!   socket ───────────▶ Conn::handle_input     Conn::transmit_chunks ────────────▶ socket
//!   (a large frame's     │  codec::Decoder       ▲  codec::encode      (one vectored write;
//!    rest: frame_body_buf)                       │                      large payloads by
//!                        ▼                       │                      reference)
//!   now ──────────────▶ Liveness (timers as data: heartbeat, dead, suspect, idle, ping)
//!                        │
//!                        ▼
//!                      ConnEvent (Hello, Established, Message, Suspect, Closed{reason, silent_for})
//! ```
//!
//! Deliberately not here: sockets, tasks, wall-clock time, randomness (tokens and seeds are
//! passed in).
#![forbid(unsafe_code)]

pub mod addr;
pub mod backoff;
pub mod client_id;
pub mod codec;
pub mod conn;
pub mod duration;
pub mod liveness;
pub mod offset;
pub mod plan;
pub mod policy;
pub mod presence;
pub mod presets;
pub mod probe_ladder;
pub mod reason;
pub mod session;
pub mod wire;

pub use client_id::{check_client_id, ClientIdError};
pub use codec::{Frame, Hello, Welcome};
pub use conn::{Conn, ConnConfig, ConnEvent, Disconnect, PartialFrame, Role, TransportError};
pub use liveness::{Liveness, LivenessConfig, LivenessEvent};
pub use policy::{Keepalive, Policy};
pub use reason::{CloseCode, DisconnectReason};
