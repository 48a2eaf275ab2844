//! tether: the tokio driver for the tether protocol.
//!
//! What it does: applies per-socket liveness options (TCP keepalive idle/interval/count,
//! `TCP_USER_TIMEOUT`, `TCP_NODELAY`) and runs the sans-IO state machine from
//! [`tether_proto`] over a socket, one task and one reusable timer per connection, so that
//! both sides detect a dead peer within the bound a [`Policy`] sets, and report every
//! disconnect with a [`DisconnectReason`] and how long the peer had been silent.
//!
//! What it deliberately does not do: TLS (bring your own stream and implement
//! [`Transport`]), message schemas (messages are opaque `Bytes`).
//!
//! ```text
//!  app ── send(Bytes) ──▶ outbox ─┐                 ┌─▶ socket (write)
//!                                 ├─▶ drive task ───┤
//!  app ◀── recv() ◀── inbox ◀─────┘  (Conn + Sleep) └─◀ socket (read, stack buffer)
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod auth;
pub mod client;
pub mod connection;
pub mod driver;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod sockopt;
pub mod tls;
pub mod tunnel;

pub use client::{Client, ClientConfig, ClientEvent, ClientSendError, ClientSender};
pub use connection::{
    liveness_config, ConnectError, ConnectOptions, Connection, Disconnected, Sender,
};
pub use driver::{StatsSnapshot, Transport};
pub use server::{ClientInfo, Server, ServerConfig, ServerEvent, ServerHandle, ServerMetrics};
pub use tether_proto::{CloseCode, DisconnectReason, Policy};
