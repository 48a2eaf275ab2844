//! tether: the tokio driver for the tether protocol.
//!
//! What it does: applies per-socket liveness options (TCP keepalive idle/interval/count,
//! `TCP_USER_TIMEOUT`, `TCP_NODELAY`) and runs the sans-IO state machine from
//! [`tether_proto`] over a socket, one task and one reusable timer per connection, so that
//! both sides detect a dead peer within the bound a [`Policy`] sets, and report every
//! disconnect with a [`DisconnectReason`] and how long the peer had been silent.
//!
//! - [`Server`]: accepts clients, knows who is online ([`PresenceState`]), holds sessions for
//!   a reconnect, and bounds what it buffers in bytes (see [`ServerConfig`]).
//! - [`Client`]: reconnects with backoff and resumes its session: nothing lost, nothing
//!   twice.
//! - [`Connection`]: one connection, either side, over TCP or any [`Transport`].
//! - [`proxy`], [`tunnel`], [`probe`]: a liveness-aware TCP relay, a tunnel that survives
//!   path failures, and a prober that measures a path's idle timeout.
//!
//! What it deliberately does not do: TLS (bring your own stream and implement
//! [`Transport`]), message schemas (messages are opaque `Bytes`).
//!
//! ```text
//!  app ── send(Bytes) ──▶ outbox ─┐                 ┌─▶ socket (write)
//!                                 ├─▶ drive task ───┤
//!  app ◀── recv() ◀── inbox ◀─────┘  (Conn + Sleep) └─◀ socket (read, stack buffer)
//! ```
//!
//! One dependency is enough: every type the API uses is re-exported here (the core's
//! [`Policy`], [`DisconnectReason`], [`CloseCode`], presence and session types, …).
//! Shared helpers: [`random`] (tokens and ids), [`DisconnectReason::from_io_error`] (the one
//! mapping from `io::Error`), [`duration::Human::ms`] (durations for people, to the
//! millisecond).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod auth;
pub mod client;
pub mod connection;
mod driver;
pub mod probe;
pub mod proxy;
pub mod random;
pub mod server;
pub mod sockopt;
pub mod tls;
mod transport;
pub mod tunnel;

pub use client::{Client, ClientConfig, ClientEvent, ClientSendError, ClientSender, Connector};
pub use connection::{
    liveness_config, ConnectError, ConnectOptions, Connection, Disconnected, Sender,
};
pub use driver::StatsSnapshot;
pub use server::{
    Broadcast, ClientInfo, ClientPage, Delivery, SendError, Server, ServerConfig, ServerEvent,
    ServerHandle, ServerMetrics,
};
pub use transport::Transport;

pub use bytes::Bytes;
pub use tether_proto::backoff::BackoffConfig;
pub use tether_proto::codec::{Hello, SessionGrant, Welcome};
pub use tether_proto::conn::ConnStats;
pub use tether_proto::duration;
pub use tether_proto::presence::{
    PresenceChange, PresenceCounts, PresenceKind, PresenceState, RegistryConfig,
};
pub use tether_proto::session::SessionConfig;
pub use tether_proto::{CloseCode, Disconnect, DisconnectReason, Keepalive, Policy};
