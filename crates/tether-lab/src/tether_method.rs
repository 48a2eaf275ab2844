//! The `tether` method: both sides use [`tether::Connection`] with the lab's derived policy
//! (heartbeats, dead-after, per-socket keepalive and `TCP_USER_TIMEOUT`). Kept apart from the
//! plain-socket methods so the library's API touches the lab in one place only.

use std::net::SocketAddr;

use bytes::Bytes;
use tether::{Connection, Sender};
use tether_proto::Policy;
use tokio::net::TcpStream;

/// One side's tether connection.
pub(crate) struct TetherSide {
    conn: Connection,
    sender: Sender,
}

impl TetherSide {
    fn new(conn: Connection) -> TetherSide {
        let sender = conn.sender();
        TetherSide { conn, sender }
    }

    /// The next application message, or why the connection ended (tether's reason label,
    /// with detail for I/O errors). Cancel-safe (the library keeps an inbox).
    pub(crate) async fn recv(&mut self) -> Result<Bytes, String> {
        self.conn.recv().await.map_err(|d| d.reason.to_string())
    }

    /// Sends one application message.
    pub(crate) async fn send(&mut self, msg: Bytes) -> Result<(), String> {
        self.sender
            .send(msg)
            .await
            .map_err(|d| d.reason.to_string())
    }
}

/// Client side: connect and handshake.
pub(crate) async fn connect(addr: SocketAddr, policy: &Policy) -> Result<TetherSide, String> {
    Connection::connect(addr, "lab-client", policy)
        .await
        .map(TetherSide::new)
        .map_err(|e| format!("tether connect: {e}"))
}

/// Server side: handshake on an accepted stream; the server dictates the policy's heartbeat
/// and dead-after.
pub(crate) async fn accept(stream: TcpStream, policy: &Policy) -> Result<TetherSide, String> {
    Connection::accept(stream, policy)
        .await
        .map(|(conn, _hello)| TetherSide::new(conn))
        .map_err(|e| format!("tether accept: {e}"))
}
