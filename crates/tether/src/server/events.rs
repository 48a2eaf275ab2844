//! What a [`Server`](super::Server) reports: its events, a client as queries see it, its
//! counters, and why a send failed.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tether_proto::presence::{PresenceChange, PresenceCounts, PresenceState};
use tether_proto::{Disconnect, DisconnectReason};
use thiserror::Error;

use super::thin::ThinId;
use crate::driver::StatsSnapshot;

/// A client id as [`ServerEvent`]s carry it: shared with the server's record of the client
/// (one block behind an 8-byte pointer), so an event costs no allocation and cloning an id
/// copies no bytes. Reads as a `&str` (`Deref`, `AsRef`, `Borrow`), compares with `str` and
/// `String`, and converts into a `String` or an `Arc<str>` (copies).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(ThinId);

impl ClientId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ClientId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ClientId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ClientId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ThinId> for ClientId {
    fn from(id: ThinId) -> Self {
        ClientId(id)
    }
}

impl From<Arc<str>> for ClientId {
    fn from(id: Arc<str>) -> Self {
        ClientId(ThinId::from(&*id))
    }
}

impl From<&str> for ClientId {
    fn from(id: &str) -> Self {
        ClientId(id.into())
    }
}

impl From<String> for ClientId {
    fn from(id: String) -> Self {
        ClientId(id.as_str().into())
    }
}

impl From<ClientId> for String {
    fn from(id: ClientId) -> Self {
        id.0.to_string()
    }
}

impl From<ClientId> for Arc<str> {
    fn from(id: ClientId) -> Self {
        Arc::from(id.as_str())
    }
}

impl PartialEq<str> for ClientId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ClientId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for ClientId {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<ClientId> for str {
    fn eq(&self, other: &ClientId) -> bool {
        self == &*other.0
    }
}

impl PartialEq<ClientId> for &str {
    fn eq(&self, other: &ClientId) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<ClientId> for String {
    fn eq(&self, other: &ClientId) -> bool {
        **self == *other.0
    }
}

/// What happens on the server, in order per client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client completed its handshake.
    Connected {
        /// Client id.
        client_id: ClientId,
        /// Its address.
        remote: SocketAddr,
        /// Connection id (unique per server, increasing).
        conn_id: u64,
        /// The connection it replaced, if any.
        replaced: Option<u64>,
    },
    /// A client sent a message.
    Message {
        /// Client id.
        client_id: ClientId,
        /// The message.
        msg: Bytes,
        /// Its sequence number in the client's session (`None` without a session). Numbers
        /// are consecutive from 1 within a session and survive resumption, so a consumer that
        /// remembers the last `(client_id, session, seq)` it processed sees each message once.
        seq: Option<u64>,
        /// The client's session id (`None` without a session). A new session (the old one
        /// could not be resumed) numbers its messages from 1 again; session ids are unique
        /// across server restarts too (see [`ServerConfig`](super::ServerConfig)).
        session: Option<u64>,
    },
    /// A client's connection ended.
    Disconnected {
        /// Client id.
        client_id: ClientId,
        /// Connection id.
        conn_id: u64,
        /// Why and how long it had been silent.
        disconnect: Disconnect,
    },
    /// A client resumed its session on a new connection; `replayed` of the server's
    /// messages are being sent again.
    Resumed {
        /// Client id.
        client_id: ClientId,
        /// The new connection id.
        conn_id: u64,
        /// Messages the server replays.
        replayed: u64,
    },
    /// A client's session ended without being resumed (linger expired, the client started
    /// a new session, it was replaced or closed as a slow consumer): these server messages
    /// may not have been delivered.
    SessionLost {
        /// Client id.
        client_id: ClientId,
        /// The session's id.
        session: u64,
        /// Sequence numbers sent but not acknowledged (may or may not have arrived).
        unacked: Option<RangeInclusive<u64>>,
        /// Messages queued for the client and never sent (certainly not delivered).
        unsent: Vec<Bytes>,
        /// The sequence numbers [`ServerHandle::try_deliver`](super::ServerHandle::try_deliver)
        /// promised the `unsent` messages, in order (`None` when there are none).
        unsent_seqs: Option<RangeInclusive<u64>>,
    },
    /// A client's presence changed, with
    /// [`ServerConfig::presence_events`](super::ServerConfig::presence_events) on (the same changes as
    /// [`ServerHandle::subscribe`](super::ServerHandle::subscribe), but never dropped, and in
    /// order with the other events of the client: `Online` before its first message, its
    /// last message before `Resuming` or `Offline`).
    Presence {
        /// The change (boxed: it is the largest variant by far, and every event, each
        /// message included, was as large as it).
        change: Box<PresenceChange>,
        /// The address of the client's current (or last) connection.
        remote: Option<SocketAddr>,
    },
    /// A connection was refused (hello rejected, server full, handshake timeout, garbage).
    Refused {
        /// Its address.
        remote: SocketAddr,
        /// Why.
        reason: DisconnectReason,
    },
}

/// A client as the status page and the query API see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Client id.
    pub id: String,
    /// Presence state (with reason and silence for `Offline`).
    pub state: PresenceState,
    /// Remote address of the current (or last) connection.
    pub remote: SocketAddr,
    /// When the current (or last) connection was established.
    pub connected_since: Instant,
    /// When the state last changed.
    pub changed_at: Instant,
    /// Counters of the live connection, or of the last one when the client is not
    /// connected (then without RTT; `last_rx` is when it was last heard from). `None` when
    /// nothing is known yet.
    pub stats: Option<StatsSnapshot>,
    /// Connections registered for this id.
    pub connects: u64,
    /// Connections of this id that ended.
    pub disconnects: u64,
    /// The current (or last) connection id.
    pub conn_id: u64,
    /// The client's session id, while it has one (attached to its connection, or held
    /// while it is resuming).
    pub session: Option<u64>,
}

/// One page of [`ServerHandle::clients_page`](super::ServerHandle::clients_page).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientPage {
    /// The clients, in id order.
    pub clients: Vec<ClientInfo>,
    /// The id to pass as `after` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// Clients in the state asked for (all pages).
    pub matching: usize,
    /// Clients per state (all of them).
    pub counts: PresenceCounts,
}

/// Server-wide counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMetrics {
    /// Open connections (handshaking included).
    pub connections: usize,
    /// Connections still in the handshake.
    pub handshaking: usize,
    /// Open connections parked while idle: kept without a task of their own
    /// ([`ServerConfig::park_idle`](super::ServerConfig::park_idle)); counted in
    /// `connections` too.
    pub parked: usize,
    /// Presence states.
    pub presence: PresenceCounts,
    /// Disconnects by [`DisconnectReason::label`], in `LABELS` order.
    pub disconnects: Vec<(&'static str, u64)>,
    /// Heartbeats sent, all connections ever.
    pub heartbeats_sent: u64,
    /// Heartbeats received, all connections ever.
    pub heartbeats_received: u64,
    /// Messages received, all connections ever.
    pub messages_received: u64,
    /// Messages sent, all connections ever.
    pub messages_sent: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections refused since start (refusals, limits, handshake timeouts).
    pub refused: u64,
    /// Bytes of received messages waiting in `Server::next_event`.
    pub queued_bytes: usize,
    /// Bytes of partially received frames.
    pub partial_frame_bytes: usize,
    /// Bytes queued for clients and not yet taken by them.
    pub unsent_bytes: usize,
}

/// Why a server-side send failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// No open connection and no held session for this client id.
    #[error("client {0:?} is not connected")]
    NotConnected(String),
    /// The client is resuming and what waits for it is at its bound.
    #[error("client {0:?} is resuming and its backlog is full")]
    Backlogged(String),
    /// The client did not take what was sent to it: the bytes queued for it passed its
    /// bound, and it is being closed with reason `slow-consumer`.
    #[error("client {0:?} is a slow consumer and is being closed")]
    SlowConsumer(String),
    /// The server-wide budget of unsent bytes is spent; try again later.
    #[error("the server's budget of unsent bytes is spent")]
    ServerFull,
    /// The connection ended (and the client has no session to queue for).
    #[error("connection to {client_id:?} ended: {reason}")]
    Disconnected {
        /// Client id.
        client_id: String,
        /// Why.
        reason: DisconnectReason,
    },
    /// [`try_deliver_at`](super::ServerHandle::try_deliver_at): the client's next number
    /// is not the one expected (another send took it, or its session changed); nothing was
    /// queued.
    #[error("client {client_id:?}: the next number is not session {session} seq {seq}")]
    Renumbered {
        /// Client id.
        client_id: String,
        /// The session expected.
        session: u64,
        /// The number expected.
        seq: u64,
    },
    /// The message is longer than one frame can carry.
    #[error("message of {len} bytes is longer than the {max} bytes a frame can carry")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The longest message (the frame limit less the session header).
        max: usize,
    },
}

/// What [`ServerHandle::try_deliver`](super::ServerHandle::try_deliver) did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The client's session (`None`: the client has no session).
    pub session: Option<u64>,
    /// The sequence number the message carries in that session: the client acknowledges
    /// it, and a [`ServerEvent::SessionLost`] names it if it may not have arrived.
    pub seq: Option<u64>,
    /// Queued in the client's held session: it goes out when the client resumes.
    pub held: bool,
}

/// What [`ServerHandle::broadcast`](super::ServerHandle::broadcast) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Broadcast {
    /// Queued on a live connection.
    pub sent: usize,
    /// Queued in a held session (goes out when the client resumes).
    pub held: usize,
    /// Not queued: the client's bound was reached (it is being closed as a slow consumer,
    /// or its held backlog is full) or the server-wide budget was spent.
    pub refused: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event, each message's included, is as large as the largest variant: the rare
    /// big ones are boxed (`Presence` was 240 B and made every message 240 B). Printed with
    /// `cargo test -p tether --lib events_stay_small -- --nocapture`.
    #[test]
    fn events_stay_small() {
        let size = std::mem::size_of::<ServerEvent>();
        eprintln!("ServerEvent {size} B, ClientId {} B", size_of::<ClientId>());
        assert!(size <= 128, "ServerEvent is {size} B");
        // A thin pointer (16 B while it was an `Arc<str>`).
        assert_eq!(size_of::<ClientId>(), 8);
        assert_eq!(size_of::<Option<ClientId>>(), 8);
    }

    #[test]
    fn a_client_id_reads_and_compares_as_a_string() {
        let id = ClientId::from("dev-1");
        let again = id.clone();
        assert_eq!(
            id.as_str().as_ptr(),
            again.as_str().as_ptr(),
            "a clone shares the bytes"
        );
        let a: Arc<str> = again.into();
        assert_eq!(&*a, "dev-1", "an Arc<str> is a copy of the id");
        assert_eq!(ClientId::from(a), id);
        assert_eq!(ClientId::from(String::from("dev-1")), id);
        assert_eq!(id, "dev-1");
        assert_eq!("dev-1", id);
        assert_eq!(id, String::from("dev-1"));
        assert_eq!(id.len(), 5);
        assert_eq!(format!("{id} {id:?}"), "dev-1 \"dev-1\"");
        assert_eq!(String::from(id), "dev-1");
    }
}
