//! A tether client driven by hand over any stream: the sans-IO `Conn` with the test in
//! control of every HELLO field (resume tokens, credentials) and able to see every event,
//! the session grant's token included.

use std::time::{Duration, Instant};

use tether_proto::codec::Hello;
use tether_proto::session::Session;
use tether_proto::{Conn, ConnConfig, ConnEvent, LivenessConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A hand-driven client connection.
pub struct Manual<S> {
    pub io: S,
    pub conn: Conn,
    pub events: Vec<ConnEvent>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Manual<S> {
    /// Says `hello` over `io` (timers of a minute: the test drives no heartbeats).
    pub fn new(io: S, hello: &Hello) -> Self {
        Self::resume(io, hello, None)
    }

    /// Says `hello` over `io`, resuming `session` (taken from an earlier connection with
    /// `conn.take_session()`) when given.
    pub fn resume(io: S, hello: &Hello, session: Option<Session>) -> Self {
        let live = LivenessConfig::new(Duration::from_secs(60), Duration::from_secs(180));
        Manual {
            io,
            conn: Conn::client(Instant::now(), ConnConfig::default(), hello, live, session),
            events: Vec::new(),
        }
    }

    async fn flush(&mut self) {
        let out = self.conn.transmit_chunks().collect::<Vec<_>>().concat();
        if !out.is_empty() {
            // A peer that already closed: the read side reports it.
            let _ = self.io.write_all(&out).await;
            self.conn.transmitted(out.len());
        }
    }

    /// Runs until an event matches `pred` (returned) or the connection closes (its
    /// `Closed` event is returned), within 5 s.
    pub async fn until(&mut self, pred: impl Fn(&ConnEvent) -> bool) -> ConnEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 16384];
        loop {
            self.flush().await;
            while let Some(ev) = self.conn.poll_event() {
                self.events.push(ev.clone());
                if pred(&ev) || matches!(ev, ConnEvent::Closed(_)) {
                    self.flush().await;
                    return ev;
                }
            }
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut buf))
                .await
                .expect("manual peer: nothing within 5 s");
            match n {
                Ok(0) => self.conn.handle_eof(Instant::now()),
                Ok(n) => self.conn.handle_input(Instant::now(), &buf[..n]),
                Err(e) => self.conn.handle_transport_error(
                    Instant::now(),
                    tether_proto::TransportError::from_io(&e, || false),
                ),
            }
        }
    }

    /// Runs the handshake: `Established` or `Closed`.
    pub async fn handshake(&mut self) -> ConnEvent {
        self.until(|e| matches!(e, ConnEvent::Established(_))).await
    }

    /// Sends a message now.
    pub async fn send(&mut self, msg: &[u8]) {
        self.conn.send(Instant::now(), msg).unwrap();
        self.flush().await;
    }
}
