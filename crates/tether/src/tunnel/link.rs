//! The tether side of a tunnelled connection: where its messages go ([`Outbound`]) and where
//! the peer's come from ([`Source`]).
//!
//! ```text
//!  entry:  Outbound = the tunnel's own Client      Source = that Client's events + linger
//!  exit:   Outbound = ServerHandle::send(id)       Source = what the exit's router forwards
//! ```

use bytes::Bytes;
use tokio::sync::watch;

use super::TunnelEnd;
use crate::client::ClientSender;
use crate::server::{SendError, ServerHandle};

/// Sends this tunnel's messages to the peer.
pub(super) trait Outbound: Send + Sync {
    /// Sends one tunnel message, waiting while the session has no room; `Err` (with the
    /// reason) when the session is gone.
    async fn send(&self, m: Bytes) -> Result<(), String>;
}

impl Outbound for ClientSender {
    async fn send(&self, m: Bytes) -> Result<(), String> {
        ClientSender::send(self, m).await.map_err(|e| e.to_string())
    }
}

/// The exit's sending half: the server handle and the tunnel's client id, plus a signal the
/// router bumps whenever this client's path changes (down, resumed, lost). It is dropped when
/// the tunnel ends.
pub(super) struct ServerOut {
    pub(super) handle: ServerHandle,
    pub(super) id: String,
    pub(super) path: watch::Receiver<u64>,
}

impl Outbound for ServerOut {
    async fn send(&self, m: Bytes) -> Result<(), String> {
        let mut path = self.path.clone();
        loop {
            // Anything that changes the path after this point wakes the wait below.
            path.borrow_and_update();
            match self.handle.send(&self.id, m.clone()).await {
                Ok(()) => return Ok(()),
                // Resuming with a full backlog (the credit bounds it; it takes a pathological
                // stream of one-byte reads): the resume, or the session's loss, frees it.
                Err(SendError::Backlogged(_)) => {
                    if path.changed().await.is_err() {
                        return Err("the tunnel ended".into());
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// What the event source of a tunnel (client events at the entry, the router at the exit)
/// delivers.
#[derive(Debug)]
pub(super) enum Inbound {
    /// One tunnel message from the peer.
    Msg(Bytes),
    /// The path broke; the session is held.
    PathDown(String),
    /// The session resumed.
    PathUp,
    /// The tunnel is over (session lost, linger passed, shutdown).
    End(TunnelEnd),
}

/// Where a tunnel's inbound items come from.
pub(super) trait Source: Send {
    /// The next inbound item; must be cancel-safe.
    async fn next(&mut self) -> Inbound;
}
