//! The server and clients over TLS on real loopback, with certificates made in the test by
//! rcgen: tokens over TLS, plain clients told to use TLS, mutual TLS as the principal, the
//! TLS handshake inside the tether handshake's deadline and slots, certificate reload with
//! established connections untouched, and a capture of a TLS session (payload and resume)
//! in which neither the payload nor any resume token appears.
//!
//! The capture is taken in userspace: the client connects through a relay in the test that
//! forwards both directions and records every byte that crosses it (the bytes on `lo`
//! between the two sockets). The same run over plain TCP is the control: there the payload
//! and the token do show up, so the check is able to find them.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::fast_policy;
use common::manual::Manual;
use common::pki::{temp_dir, Ca};
use tether::auth::{sign_hs256, Builtin, JwtConfig, JwtVerifier, TokenSpec};
use tether::credential::Credentials;
use tether::tls::{ClientTlsOptions, ServerTlsFiles, TlsClient, TlsServer};
use tether::{
    CloseCode, ConnectError, ConnectOptions, Connection, PresenceState, Server, ServerConfig,
    ServerEvent,
};
use tether_proto::codec::{Credential, Hello, SessionGrant};
use tether_proto::ConnEvent;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &[u8] = b"an hs256 secret of at least 32 bytes, for tests";

fn token(sub: &str) -> String {
    sign_hs256(
        SECRET,
        &TokenSpec::new(sub, Duration::from_secs(600)),
        SystemTime::now(),
    )
    .unwrap()
}

struct Pki {
    ca: Ca,
    ca_file: std::path::PathBuf,
    /// Removed with its keys when the test's `Pki` drops.
    dir: tempfile::TempDir,
}

fn pki(tag: &str) -> Pki {
    let dir = temp_dir(tag);
    let ca = Ca::new("tether test ca");
    let ca_file = ca.write(dir.path(), "ca.pem");
    Pki { ca, ca_file, dir }
}

fn tls_server(p: &Pki, client_ca: bool) -> Arc<TlsServer> {
    let s = p.ca.server(p.dir.path(), "server", "tether test server");
    let mut files = ServerTlsFiles::new(s.cert, s.key);
    if client_ca {
        files = files.client_ca(&p.ca_file);
    }
    Arc::new(TlsServer::from_files(files).unwrap())
}

fn tls_client(p: &Pki, cert: Option<&common::pki::Issued>) -> TlsClient {
    TlsClient::new(&ClientTlsOptions {
        ca: Some(p.ca_file.clone()),
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        ..Default::default()
    })
    .unwrap()
}

fn jwt_and_mtls(mtls: bool) -> Arc<Builtin> {
    let v = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().leeway(Duration::ZERO));
    Arc::new(Builtin::new().credentials(v).mtls(mtls))
}

fn config(tls: Arc<TlsServer>) -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(300, 1000))
        .handshake_timeout(Duration::from_millis(800))
        .session_linger(Some(Duration::from_secs(30)))
        .tls(tls)
}

fn opts(id: &str) -> ConnectOptions {
    ConnectOptions::new(id).policy(fast_policy(300, 1000))
}

#[tokio::test]
async fn tls_clients_with_tokens_are_served_and_plain_clients_are_told_to_use_tls() {
    let p = pki("tokens");
    let cfg = config(tls_server(&p, false)).authorize(jwt_and_mtls(false));
    let mut srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let tls = tls_client(&p, None);
    let c = Connection::connect_with(
        addr,
        &opts("alice")
            .tls(tls.clone())
            .credential(Credentials::token(token("alice")).unwrap()),
    )
    .await
    .unwrap();
    c.send(Bytes::from_static(b"over tls")).await.unwrap();
    loop {
        match srv.next_event().await.unwrap() {
            ServerEvent::Message { client_id, msg, .. } => {
                assert_eq!((client_id.as_str(), &msg[..]), ("alice", &b"over tls"[..]));
                break;
            }
            ServerEvent::Connected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // Over TLS without a token: refused, with the code, through the TLS session.
    match Connection::connect_with(addr, &opts("bob").tls(tls.clone())).await {
        Err(ConnectError::Refused { code, .. }) => assert_eq!(code, CloseCode::UNAUTHORIZED),
        other => panic!("{other:?}"),
    }
    // Plain tether to a TLS port: a REFUSE it can read, saying what to do.
    match Connection::connect_with(addr, &opts("carol")).await {
        Err(ConnectError::Refused { code, text }) => {
            assert_eq!(code, CloseCode::BAD_HELLO);
            assert!(text.contains("requires TLS"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // A client that does not trust the server's CA never gets to say hello.
    let other = pki("other-ca");
    match Connection::connect_with(addr, &opts("dave").tls(tls_client(&other, None))).await {
        Err(ConnectError::Tls { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(c.disconnected().is_none(), "alice was not disturbed");
}

#[tokio::test]
async fn mutual_tls_names_the_principal_and_allows_only_its_id() {
    let p = pki("mtls");
    let cfg = config(tls_server(&p, true)).authorize(jwt_and_mtls(true));
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let alice_cert = p.ca.client(p.dir.path(), "alice", "alice");
    let tls = tls_client(&p, Some(&alice_cert));
    let c = Connection::connect_with(addr, &opts("alice").tls(tls.clone()))
        .await
        .unwrap();
    // No credential in the HELLO: the WELCOME carries no ttl (the certificate's expiry is
    // still enforced by the server).
    assert_eq!(c.welcome().credential_ttl, None);
    // The certificate names alice: it may not be bob.
    match Connection::connect_with(addr, &opts("bob").tls(tls.clone())).await {
        Err(ConnectError::Refused { code, text }) => {
            assert_eq!(code, CloseCode::ID_NOT_ALLOWED, "{text}")
        }
        other => panic!("{other:?}"),
    }
    // A certificate for bob cannot replace alice's connection either, even with a token
    // that names alice: principals from two trust roots never vouch for each other.
    let bob_cert = p.ca.client(p.dir.path(), "bob", "bob");
    let bob_tls = tls_client(&p, Some(&bob_cert));
    match Connection::connect_with(addr, &opts("alice").tls(bob_tls.clone())).await {
        Err(ConnectError::Refused { code, .. }) => assert_eq!(code, CloseCode::ID_NOT_ALLOWED),
        other => panic!("{other:?}"),
    }
    let alice_jwt = Credentials::token(token("alice")).unwrap();
    match Connection::connect_with(addr, &opts("alice").tls(bob_tls).credential(alice_jwt)).await {
        Err(ConnectError::Refused { code, .. }) => assert_eq!(code, CloseCode::ID_NOT_ALLOWED),
        other => panic!("{other:?}"),
    }
    // Without a client certificate the TLS handshake itself fails.
    match Connection::connect_with(addr, &opts("alice").tls(tls_client(&p, None))).await {
        Err(_) => {}
        Ok(_) => panic!("a client without a certificate got in"),
    }
    assert!(c.disconnected().is_none());
    assert!(srv.client("alice").unwrap().state.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_holds_a_handshake_slot_until_the_deadline_and_nobody_else() {
    let p = pki("stall");
    let cfg = config(tls_server(&p, false)).max_handshakes(2);
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    // A peer that opens TCP and sends half a ClientHello, then nothing.
    let t0 = Instant::now();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    // Meanwhile a real client gets through at once: the accept loop does not wait.
    let tls = tls_client(&p, None);
    let t1 = Instant::now();
    let c = Connection::connect_with(addr, &opts("quick").tls(tls.clone()))
        .await
        .unwrap();
    assert!(
        t1.elapsed() < Duration::from_millis(500),
        "{:?}",
        t1.elapsed()
    );
    // The stalled one is closed at the handshake deadline (it counts the TLS handshake).
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stalled.read_to_end(&mut buf)).await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // Three silent TCP peers with two handshake slots: the oldest is evicted at once.
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t2 = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), silent[0].read_to_end(&mut buf)).await;
    assert!(
        t2.elapsed() < Duration::from_millis(400),
        "{:?}",
        t2.elapsed()
    );
    assert!(c.disconnected().is_none());
}

#[tokio::test]
async fn a_reloaded_certificate_is_seen_by_new_connections_only() {
    let p = pki("reload");
    let tls = tls_server(&p, false);
    let srv = Server::bind(config(tls.clone())).await.unwrap();
    let addr = srv.local_addr();
    // The certificate a new TLS session is shown.
    let seen = || async {
        let s = tls_client(&p, None)
            .connect("127.0.0.1", TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let old = tls.current_certificate().unwrap();
    assert_eq!(seen().await, old.to_vec());
    let c1 = Connection::connect_with(addr, &opts("one").tls(tls_client(&p, None)))
        .await
        .unwrap();
    // New files under the same names, then reload.
    let s2 = p.ca.server(p.dir.path(), "server", "tether test server 2");
    tls.reload().unwrap();
    assert_eq!(tls.current_certificate().unwrap().as_ref(), &s2.der[..]);
    assert_ne!(old.as_ref(), &s2.der[..]);
    assert_eq!(seen().await, s2.der);
    let c2 = Connection::connect_with(addr, &opts("two").tls(tls_client(&p, None)))
        .await
        .unwrap();
    // The established connection still carries traffic both ways.
    c1.send(Bytes::from_static(b"still here")).await.unwrap();
    srv.try_send("one", Bytes::from_static(b"and you")).unwrap();
    let mut c1 = c1;
    let got = tokio::time::timeout(Duration::from_secs(2), c1.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"and you");
    assert!(c2.disconnected().is_none());
}

// --- The capture --------------------------------------------------------------------------

/// A TCP relay that records every byte in both directions and can reset its connections.
struct Relay {
    addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Duplicates of the relayed sockets' descriptors, to reset them.
    conns: Arc<Mutex<Vec<(std::net::TcpStream, std::net::TcpStream)>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (b, cs) = (bytes.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                // Keep duplicates of the sockets so that `reset` can abort them.
                let keep = |s: &TcpStream| -> std::net::TcpStream {
                    socket2::SockRef::from(s).try_clone().unwrap().into()
                };
                cs.lock().unwrap().push((keep(&down), keep(&up)));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(copy(dr, uw, b.clone()));
                tokio::spawn(copy(ur, dw, b.clone()));
            }
        });
        Relay { addr, bytes, conns }
    }

    /// Resets every relayed connection (RST both ways), as a path failure would.
    fn reset(&self) {
        for (d, u) in self.conns.lock().unwrap().drain(..) {
            for s in [d, u] {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                let _ = socket2::SockRef::from(&s).shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn captured(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

async fn copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    rec: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16384];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        rec.lock().unwrap().extend_from_slice(&buf[..n]);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One session through `relay`: hello with a credential, a payload each way, a reset, a
/// resume with the token, and the resumed session's first message. Returns the tokens and
/// the JWT used.
async fn session_through<S, F, Fut>(
    srv: &mut Server,
    relay: &Relay,
    connect: F,
) -> (SessionGrant, SessionGrant, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let jwt = token("alice");
    let hello = |resume| Hello {
        client_id: "alice".into(),
        requested_heartbeat: Duration::from_millis(300),
        want_session: true,
        resume,
        credential: Some(Credential::from(jwt.clone())),
    };
    let mut m = Manual::new(
        connect(TcpStream::connect(relay.addr).await.unwrap()).await,
        &hello(None),
    );
    let g1 = match m.handshake().await {
        ConnEvent::Established(w) => w.session.unwrap(),
        other => panic!("{other:?}"),
    };
    m.send(b"SECRET-PAYLOAD-up-7f3a9c").await;
    loop {
        if let Some(ServerEvent::Message { msg, .. }) = srv.next_event().await {
            assert_eq!(&msg[..], b"SECRET-PAYLOAD-up-7f3a9c");
            break;
        }
    }
    srv.try_send("alice", Bytes::from_static(b"SECRET-PAYLOAD-down-51be07"))
        .unwrap();
    m.until(|e| matches!(e, ConnEvent::Message { .. })).await;
    relay.reset();
    let session = m.conn.take_session();
    drop(m);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !srv
        .client("alice")
        .is_some_and(|c| matches!(c.state, PresenceState::Resuming { .. }))
    {
        assert!(Instant::now() < deadline, "alice never became resuming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.try_send("alice", Bytes::from_static(b"SECRET-PAYLOAD-held-c0ffee"))
        .unwrap();
    // The resume presents g1's token (the session was made from the WELCOME's grant).
    assert_eq!(session.as_ref().map(|s| *s.token()), Some(g1.token));
    let mut m = Manual::resume(
        connect(TcpStream::connect(relay.addr).await.unwrap()).await,
        &hello(None),
        session,
    );
    let g2 = match m.handshake().await {
        ConnEvent::Established(w) => w.session.unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(g2.resumed);
    match m.until(|e| matches!(e, ConnEvent::Message { .. })).await {
        ConnEvent::Message { payload, .. } => {
            assert_eq!(&payload[..], b"SECRET-PAYLOAD-held-c0ffee")
        }
        other => panic!("{other:?}"),
    }
    (g1, g2, jwt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_of_a_tls_session_shows_neither_payload_nor_resume_token() {
    let secrets = |g1: &SessionGrant, g2: &SessionGrant, jwt: &str| {
        vec![
            b"SECRET-PAYLOAD-up-7f3a9c".to_vec(),
            b"SECRET-PAYLOAD-down-51be07".to_vec(),
            b"SECRET-PAYLOAD-held-c0ffee".to_vec(),
            g1.token.to_vec(),
            g2.token.to_vec(),
            jwt.as_bytes().to_vec(),
            b"alice".to_vec(),
        ]
    };
    let auth = || jwt_and_mtls(false);

    // Control: plain TCP. The capture holds the payloads, the token and the credential.
    let mut srv = Server::bind(
        ServerConfig::new("127.0.0.1:0".parse().unwrap())
            .policy(fast_policy(300, 1000))
            .authorize(auth()),
    )
    .await
    .unwrap();
    let relay = Relay::start(srv.local_addr()).await;
    let (g1, g2, jwt) = session_through(&mut srv, &relay, |s| async { s }).await;
    let plain = relay.captured();
    for s in secrets(&g1, &g2, &jwt) {
        assert!(contains(&plain, &s), "the control capture misses {s:02x?}");
    }

    // TLS: none of it.
    let p = pki("capture");
    let mut srv = Server::bind(config(tls_server(&p, false)).authorize(auth()))
        .await
        .unwrap();
    let relay = Relay::start(srv.local_addr()).await;
    let tls = tls_client(&p, None);
    let (g1, g2, jwt) = session_through(&mut srv, &relay, |s| {
        let tls = tls.clone();
        async move { tls.connect("127.0.0.1", s).await.unwrap() }
    })
    .await;
    let captured = relay.captured();
    assert!(captured.len() > 2000, "{} bytes captured", captured.len());
    // TLS records (handshake 0x16, application data 0x17, version 0x0303) and no tether
    // preamble in clear.
    assert!(contains(&captured, &[0x17, 0x03, 0x03]));
    assert!(!contains(&captured, b"TTHR"));
    for s in secrets(&g1, &g2, &jwt) {
        assert!(!contains(&captured, &s), "the TLS capture shows {s:02x?}");
    }
    assert_ne!(g1.token, g2.token);
}
