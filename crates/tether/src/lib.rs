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
//! - Security ([`tls`], [`auth`], [`credential`]): TLS on every listener and client
//!   (rustls; [`ServerConfig::tls`], [`ConnectOptions::tls`]), credentials in the HELLO
//!   (JWT, or the client certificate) judged by one hook ([`ServerConfig::authorize`]) that
//!   binds client ids, connections and sessions to a principal, credential expiry with
//!   in-band refresh, resume tokens stored hashed and rotated on every resume, and a
//!   per-address throttle for failures. `docs/SECURITY.md` has the threat model.
//!
//! ```text
//!  client: Credentials ─▶ HELLO(id, credential) ══ TLS ══▶ server: tls handshake (deadline, slot)
//!                                                          ─▶ Authorize (may be pending)
//!                                                          ─▶ lifecycle: same principal only
//!          refresh at 90 % ─▶ AUTH(credential) ═══════════▶ AUTH_OK(ttl) | CLOSE(7) at expiry
//! ```
//!
//! What it deliberately does not do: message schemas (messages are opaque `Bytes`),
//! per-message authorization (the application decides what a principal may send), and
//! certificate or token revocation (keep them short-lived).
//!
//! ```text
//!  app ── send(Bytes) ──▶ outbox ─┐                 ┌─▶ socket (write)
//!                                 ├─▶ drive task ───┤
//!  app ◀── recv() ◀── inbox ◀─────┘  (Conn + Sleep) └─◀ socket (read, stack buffer)
//! ```
//!
//! A server and a client on loopback, with a policy that detects a vanished peer within
//! 10 seconds:
//!
//! ```
//! use std::time::Duration;
//! use tether::{Bytes, ClientConfig, Client, ClientEvent, Policy, Server, ServerConfig, ServerEvent};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = Policy::builder(Duration::from_secs(10)).build()?;
//! let cfg = ServerConfig::new("127.0.0.1:0".parse()?).policy(policy.clone());
//! let mut server = Server::bind(cfg).await?;
//!
//! let mut cfg = ClientConfig::new(server.local_addr(), "phone-1");
//! cfg.connect.policy = policy;
//! let mut client = Client::start(cfg);
//! client.send(Bytes::from_static(b"hello")).await?;
//!
//! // The server sees the client connect, then its message (with its session sequence number).
//! loop {
//!     match server.next_event().await {
//!         Some(ServerEvent::Message { client_id, msg, seq, .. }) => {
//!             assert_eq!((client_id.as_str(), &msg[..], seq), ("phone-1", &b"hello"[..], Some(1)));
//!             server.try_send(&client_id, Bytes::from_static(b"hi"))?;
//!             break;
//!         }
//!         Some(_) => continue,
//!         None => unreachable!("the server runs"),
//!     }
//! }
//! loop {
//!     if let Some(ClientEvent::Message(m)) = client.next_event().await {
//!         assert_eq!(&m[..], b"hi");
//!         break;
//!     }
//! }
//! # Ok(())
//! # }
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
pub mod credential;
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
pub use server::handover::{
    ExportError, ImportError, SessionExport, SessionFetch, SessionRequest, SessionSource,
};
pub use server::{
    Broadcast, ClientId, ClientInfo, ClientPage, Delivery, SendError, Server, ServerConfig,
    ServerEvent, ServerHandle, ServerMetrics,
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
pub use tether_proto::{
    CloseCode, ConnConfig, Disconnect, DisconnectReason, Keepalive, LivenessConfig, Policy,
};
