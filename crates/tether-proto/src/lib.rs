//! tether-proto: the sans-IO core of tether.
#![forbid(unsafe_code)]

pub mod policy;
pub mod reason;

pub use policy::{Keepalive, Policy};
pub use reason::{CloseCode, DisconnectReason};
