//! The `tether` and `tether-tls` methods: both sides use [`tether::Connection`] with the lab's
//! derived policy (heartbeats, dead-after, per-socket keepalive and `TCP_USER_TIMEOUT`), in
//! clear or over TLS (rustls; the liveness rules are the same, the `Transport` methods look
//! through TLS at the socket). Kept apart from the plain-socket methods so the library's API
//! touches the lab in one place only.

use std::net::SocketAddr;

use std::sync::OnceLock;

use bytes::Bytes;
use tether::tls::{ClientTlsOptions, ServerTlsFiles, TlsClient, TlsServer};
use tether::{ConnectOptions, Connection, Sender};
use tether_proto::{ConnConfig, Policy};
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

/// Client side: connect and handshake (over TLS with `tls`).
pub(crate) async fn connect(
    addr: SocketAddr,
    policy: &Policy,
    tls: bool,
) -> Result<TetherSide, String> {
    let mut opts = ConnectOptions::new("lab-client").policy(policy.clone());
    if tls {
        opts = opts.tls(lab_tls()?.1.clone());
    }
    Connection::connect_with(addr, &opts)
        .await
        .map(TetherSide::new)
        .map_err(|e| format!("tether connect: {e:#}"))
}

/// Server side: handshake on an accepted stream (a TLS handshake first with `tls`); the
/// server dictates the policy's heartbeat and dead-after.
pub(crate) async fn accept(
    stream: TcpStream,
    policy: &Policy,
    tls: bool,
) -> Result<TetherSide, String> {
    if !tls {
        return Connection::accept(stream, policy)
            .await
            .map(|(conn, _hello)| TetherSide::new(conn))
            .map_err(|e| format!("tether accept: {e}"));
    }
    tether::sockopt::apply(&stream, policy).map_err(|e| format!("socket options: {e}"))?;
    let stream = lab_tls()?
        .0
        .accept(stream)
        .await
        .map_err(|e| format!("tls accept: {e}"))?;
    Connection::accept_over(stream, policy, &ConnConfig::default())
        .await
        .map(|(conn, _hello)| TetherSide::new(conn))
        .map_err(|e| format!("tether accept: {e}"))
}

/// The server and client TLS configurations ([`crate::test_tls`]), loaded once per process
/// (written to a temporary directory: the TLS module loads from files, as `tether serve`
/// does).
fn lab_tls() -> Result<&'static (TlsServer, TlsClient), String> {
    static TLS: OnceLock<Result<(TlsServer, TlsClient), String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tether-lab-tls-{}", std::process::id()));
        let f = crate::test_tls::write(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let server = TlsServer::from_files(ServerTlsFiles::new(f.cert, f.key))
            .map_err(|e| format!("lab tls server: {e:#}"))?;
        let client = TlsClient::new(&ClientTlsOptions {
            ca: Some(f.ca),
            server_name: Some(crate::test_tls::SERVER_NAME.into()),
            ..Default::default()
        })
        .map_err(|e| format!("lab tls client: {e:#}"))?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok((server, client))
    })
    .as_ref()
    .map_err(Clone::clone)
}
