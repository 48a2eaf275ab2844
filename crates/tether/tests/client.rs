//! `Client` and `Connection` over in-memory transports in tokio's paused time: exact
//! instants. The server end is the core's state machine driven by hand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether::{
    Client, ClientConfig, ClientEvent, ClientSendError, CloseCode, ConnectOptions, Connection,
    DisconnectReason, SessionConfig,
};
use tether_proto::codec::SessionGrant;
use tether_proto::session::Session;
use tether_proto::{Conn, ConnConfig, ConnEvent, LivenessConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

const H: Duration = Duration::from_secs(10);

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The server end of an in-memory transport.
struct Peer {
    io: DuplexStream,
    conn: Conn,
}

impl Peer {
    fn new(io: DuplexStream) -> Peer {
        Peer {
            io,
            conn: Conn::server(now(), ConnConfig::default()),
        }
    }

    /// Reads until the state machine has an event.
    async fn next_event(&mut self) -> ConnEvent {
        loop {
            if let Some(ev) = self.conn.poll_event() {
                return ev;
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.io.read(&mut buf).await.unwrap();
            assert!(n > 0, "end of stream");
            self.conn.handle_input(now(), &buf[..n]);
        }
    }

    /// Reads the HELLO and accepts it (with a session when the client asked for one).
    async fn accept(&mut self) {
        let ConnEvent::Hello(hello) = self.next_event().await else {
            panic!("expected HELLO");
        };
        let session = hello.want_session.then(|| {
            let grant = SessionGrant {
                session_id: 9,
                token: [3; 16],
                resumed: false,
                last_received: 0,
                linger: Duration::from_secs(30),
            };
            (grant, Session::new(9, [3; 16], SessionConfig::default()))
        });
        self.conn
            .accept(now(), LivenessConfig::new(H, 3 * H), session);
        self.flush().await;
        assert!(matches!(self.next_event().await, ConnEvent::Established(_)));
    }

    async fn flush(&mut self) {
        let out = self.conn.transmit_chunks().collect::<Vec<_>>().concat();
        self.io.write_all(&out).await.unwrap();
        self.conn.transmitted(out.len());
    }

    async fn message(&mut self) -> Bytes {
        match self.next_event().await {
            ConnEvent::Message { payload, .. } => payload,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// A client whose connections are in-memory streams; the far ends arrive on the receiver.
fn client(
    cfg: ClientConfig,
) -> (
    Client,
    mpsc::UnboundedReceiver<DuplexStream>,
    Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let c = Client::start_with(cfg, move || {
        counted.fetch_add(1, Ordering::SeqCst);
        let (near, far) = tokio::io::duplex(256 * 1024);
        let _ = tx.send(far);
        std::future::ready(Ok(near))
    });
    (c, rx, attempts)
}

fn config() -> ClientConfig {
    let mut cfg = ClientConfig::new("127.0.0.1:1".parse().unwrap(), "phone");
    cfg.connect.policy.heartbeat_interval = H;
    cfg.seed = Some(1);
    cfg
}

/// A message given to the client before it connected, and one given while its HELLO is in
/// flight, both go out the instant the WELCOME arrives (issue 11 §1: they used to wait one
/// heartbeat interval).
#[tokio::test(start_paused = true)]
async fn a_message_queued_before_or_during_the_handshake_goes_out_right_after_welcome() {
    let (mut c, mut ends, _) = client(config());
    c.send(Bytes::from_static(b"before")).await.unwrap();
    let mut peer = Peer::new(ends.recv().await.unwrap());
    let ConnEvent::Hello(_) = peer.next_event().await else {
        panic!("expected HELLO");
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.send(Bytes::from_static(b"during")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    peer.conn.accept(now(), LivenessConfig::new(H, 3 * H), None);
    let welcomed = tokio::time::Instant::now();
    peer.flush().await;
    assert!(matches!(peer.next_event().await, ConnEvent::Established(_)));
    assert_eq!(&peer.message().await[..], b"before");
    assert_eq!(&peer.message().await[..], b"during");
    assert_eq!(tokio::time::Instant::now() - welcomed, Duration::ZERO);
    assert!(matches!(
        c.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));
}

/// `Connection`: a message sent the moment `connect` returns goes out at once.
#[tokio::test(start_paused = true)]
async fn a_connection_sends_at_once_after_connect() {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let mut peer = Peer::new(far);
        peer.accept().await;
        let m = peer.message().await;
        (m, tokio::time::Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(3)).await;
    let opts = ConnectOptions::new("desk");
    let c = Connection::client_over(near, &opts).await.unwrap();
    let connected = tokio::time::Instant::now();
    c.send(Bytes::from_static(b"now")).await.unwrap();
    let (m, at) = server.await.unwrap();
    assert_eq!(&m[..], b"now");
    assert_eq!(at - connected, Duration::ZERO);
}

/// Being replaced is terminal: the client does not reconnect, and it names what may be
/// missing — the unacknowledged sequence numbers and the messages never sent.
#[tokio::test(start_paused = true)]
async fn replaced_is_terminal_and_names_what_may_be_missing() {
    let mut cfg = config();
    // Two messages in flight at most: the third stays in the outbox.
    cfg.session_config.max_replay_messages = 2;
    let (mut c, mut ends, attempts) = client(cfg);
    let mut peer = Peer::new(ends.recv().await.unwrap());
    peer.accept().await;
    assert!(matches!(
        c.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));
    for m in [&b"one"[..], b"two", b"three"] {
        c.send(Bytes::from_static(m)).await.unwrap();
    }
    assert_eq!(&peer.message().await[..], b"one");
    assert_eq!(&peer.message().await[..], b"two");
    // Not acknowledged yet (the ACK delay has not passed): a newer connection with the same
    // id takes over.
    peer.conn
        .close(now(), CloseCode::REPLACED, "replaced by a newer connection");
    peer.flush().await;
    match c.next_event().await {
        Some(ClientEvent::Disconnected { disconnect }) => {
            assert_eq!(disconnect.reason, DisconnectReason::Replaced)
        }
        other => panic!("{other:?}"),
    }
    match c.next_event().await {
        Some(ClientEvent::GaveUp {
            reason,
            unacked,
            unsent,
        }) => {
            assert_eq!(reason, DisconnectReason::Replaced);
            // The server acknowledged what it had received before its CLOSE (an orderly
            // close sends the ACK it owes first), so nothing sent is in doubt; the message
            // that never left the outbox is named.
            assert_eq!(unacked, None);
            assert_eq!(unsent, vec![Bytes::from_static(b"three")]);
        }
        other => panic!("{other:?}"),
    }
    // It stays down: no further attempt, and sending fails with the reason.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(c.next_event().await.is_none());
    assert_eq!(
        c.send(Bytes::from_static(b"late")).await,
        Err(ClientSendError::Stopped(DisconnectReason::Replaced))
    );
}

/// Refusals that retrying cannot fix stop the client; a throttled one is retried.
#[tokio::test(start_paused = true)]
async fn unauthorized_refusals_are_terminal_and_throttled_is_retried() {
    for (code, terminal) in [
        (CloseCode::UNAUTHORIZED, true),
        (CloseCode::ID_NOT_ALLOWED, true),
        (CloseCode::THROTTLED, false),
    ] {
        let (mut c, mut ends, attempts) = client(config());
        let mut peer = Peer::new(ends.recv().await.unwrap());
        let ConnEvent::Hello(_) = peer.next_event().await else {
            panic!("expected HELLO");
        };
        peer.conn.refuse(now(), code, "no");
        peer.flush().await;
        assert!(matches!(
            c.next_event().await,
            Some(ClientEvent::Disconnected { .. })
        ));
        match (c.next_event().await, terminal) {
            (Some(ClientEvent::GaveUp { reason, .. }), true) => {
                assert!(matches!(reason, DisconnectReason::Refused { code: c, .. } if c == code))
            }
            (Some(ClientEvent::Reconnecting { attempt: 1, .. }), false) => {
                // The retry opens a second connection.
                let _second = ends.recv().await.unwrap();
                assert_eq!(attempts.load(Ordering::SeqCst), 2);
            }
            (other, _) => panic!("{code}: {other:?}"),
        }
    }
}

/// The client presents its credential, is asked for a new one at exactly 90 % of the ttl,
/// sends it (a fresh fetch from its source) in AUTH, and is asked again 90 % of the new ttl
/// after the AUTH_OK. When the server leaves an AUTH unanswered, the connection ends at the
/// expiry (`credential-expired`) and the client reconnects with a freshly fetched credential.
#[tokio::test(start_paused = true)]
async fn the_client_refreshes_its_credential_at_90_percent_of_the_ttl() {
    use tether::credential::Credentials;
    use tether_proto::codec::Credential;
    let fetched = Arc::new(AtomicUsize::new(0));
    let f = fetched.clone();
    let mut cfg = config();
    cfg.connect.credential = Some(Credentials::from_fn(move || {
        let n = f.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Credential::from(format!("token-{n}"))) }
    }));
    let (mut c, mut ends, attempts) = client(cfg);
    let mut peer = Peer::new(ends.recv().await.unwrap());
    let ConnEvent::Hello(hello) = peer.next_event().await else {
        panic!("expected HELLO");
    };
    assert_eq!(hello.credential.as_deref(), Some(&b"token-0"[..]));
    let ttl = Duration::from_secs(20);
    peer.conn
        .accept_authenticated(now(), LivenessConfig::new(H, 3 * H), None, Some(ttl));
    let welcomed = tokio::time::Instant::now();
    peer.flush().await;
    assert!(matches!(peer.next_event().await, ConnEvent::Established(_)));
    // 90 % of 20 s: 18 s, to the instant.
    let ConnEvent::Auth(cred) = peer.next_event().await else {
        panic!("expected AUTH");
    };
    assert_eq!(
        tokio::time::Instant::now() - welcomed,
        Duration::from_secs(18)
    );
    assert_eq!(cred.as_bytes(), b"token-1");
    peer.conn.auth_ok(now(), Some(ttl));
    let answered = tokio::time::Instant::now();
    peer.flush().await;
    loop {
        match c.next_event().await.unwrap() {
            ClientEvent::CredentialRefreshed { ttl: t } => {
                assert_eq!(t, ttl);
                break;
            }
            ClientEvent::Connected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // The next refresh: 18 s after the AUTH_OK. This one is left unanswered.
    let ConnEvent::Auth(cred) = peer.next_event().await else {
        panic!("expected AUTH");
    };
    assert_eq!(
        tokio::time::Instant::now() - answered,
        Duration::from_secs(18)
    );
    assert_eq!(cred.as_bytes(), b"token-2");
    let expiry = peer.conn.credential_expires_at().unwrap();
    assert_eq!(expiry, answered.into_std() + ttl);
    tokio::time::sleep_until(expiry.into()).await;
    peer.conn.handle_timeout(now());
    peer.flush().await;
    match c.next_event().await.unwrap() {
        ClientEvent::Disconnected { disconnect } => {
            // The server's CLOSE(7) reaches the client as a peer close with that code.
            assert!(
                matches!(
                    disconnect.reason,
                    DisconnectReason::PeerClose {
                        code: CloseCode::CREDENTIAL_EXPIRED,
                        ..
                    }
                ),
                "{:?}",
                disconnect.reason
            );
            assert_eq!(tokio::time::Instant::now(), expiry.into());
        }
        other => panic!("{other:?}"),
    }
    // It reconnects with a new credential.
    let mut peer = Peer::new(ends.recv().await.unwrap());
    let ConnEvent::Hello(hello) = peer.next_event().await else {
        panic!("expected HELLO");
    };
    assert_eq!(hello.credential.as_deref(), Some(&b"token-3"[..]));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(fetched.load(Ordering::SeqCst), 4);
}
