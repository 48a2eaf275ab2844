//! tether-proto: the sans-IO core of tether.
#![forbid(unsafe_code)]

pub mod duration;
pub mod plan;
pub mod policy;
pub mod presets;
pub mod reason;

pub use policy::{Keepalive, Policy};
pub use reason::{CloseCode, DisconnectReason};
