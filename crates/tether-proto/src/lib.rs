//! tether-proto: the sans-IO core of tether.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod policy;
pub mod presence;
pub mod reason;

pub use policy::{Keepalive, Policy};
pub use reason::{CloseCode, DisconnectReason};
