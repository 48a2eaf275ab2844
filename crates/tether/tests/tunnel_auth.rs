//! The tunnel exit authenticates its entries: an OPEN from a peer without a valid credential
//! (or client certificate) never reaches the target — it is refused at its HELLO, before
//! the exit knows of any tunnel. With a token (or a client certificate) and TLS the tunnel
//! carries bytes as before.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::manual::Manual;
use common::pki::{temp_dir, Ca};
use tether::auth::{sign_hs256, AllowedIds, Builtin, JwtVerifier, TokenSpec};
use tether::credential::Credentials;
use tether::tls::{ClientTlsOptions, ServerTlsFiles, TlsClient, TlsServer};
use tether::tunnel::{EntryConfig, ExitConfig, TunnelEntry, TunnelEvent, TunnelExit};
use tether::{CloseCode, DisconnectReason};
use tether_proto::codec::{Credential, Hello};
use tether_proto::ConnEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &[u8] = b"an hs256 secret of at least 32 bytes, for tests";

/// A target that counts the connections it accepted and echoes what it reads.
async fn target() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 || s.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, n)
}

/// The exit's rule, as `tether tunnel exit` builds it: a valid token or certificate gets
/// in, for any tunnel id.
fn exit_auth(mtls: bool) -> Arc<Builtin> {
    let v = JwtVerifier::hs256(SECRET).unwrap();
    Arc::new(
        Builtin::new()
            .credentials(v)
            .mtls(mtls)
            .allowed_ids(AllowedIds::parse(["tun-*"]).unwrap()),
    )
}

fn exit_cfg(target: SocketAddr) -> ExitConfig {
    let mut cfg = ExitConfig::new("127.0.0.1:0".parse().unwrap(), target);
    cfg.server = cfg
        .server
        .session_linger(Some(Duration::from_secs(5)))
        .handshake_timeout(Duration::from_millis(800))
        .authorize(exit_auth(false));
    cfg
}

fn token(sub: &str) -> String {
    sign_hs256(
        SECRET,
        &TokenSpec::new(sub, Duration::from_secs(600)),
        SystemTime::now(),
    )
    .unwrap()
}

/// HELLO, then (with `pipelined`) OPEN and DATA as an entry would send them after the
/// WELCOME — here without waiting for it.
fn raw_open(credential: Option<String>, pipelined: bool) -> Vec<u8> {
    let hello = Hello {
        client_id: "tun-0123456789abcdef".into(),
        requested_heartbeat: Duration::from_secs(10),
        want_session: true,
        resume: None,
        credential: credential.map(Credential::from),
    };
    let mut out = bytes::BytesMut::new();
    tether_proto::codec::encode_preamble(&mut out);
    tether_proto::codec::encode(&tether_proto::Frame::Hello(hello), &mut out);
    if pipelined {
        // SEQ_DATA 1: OPEN v1; SEQ_DATA 2: DATA "GET /".
        tether_proto::codec::encode_seq_data(1, &[0x01, 0x01], &mut out);
        tether_proto::codec::encode_seq_data(2, b"\x02GET /", &mut out);
    }
    out.to_vec()
}

#[tokio::test]
async fn an_unauthenticated_open_never_reaches_the_target() {
    let (target, accepted) = target().await;
    let mut exit = TunnelExit::bind(exit_cfg(target)).await.unwrap();
    let addr = exit.local_addr();

    // A raw HELLO with no credential, a forged one, garbage: REFUSE(UNAUTHORIZED); an OPEN
    // sent after it goes nowhere.
    let forged = sign_hs256(
        b"not the exit's secret, but long enough",
        &TokenSpec::new("mallory", Duration::from_secs(600)),
        SystemTime::now(),
    )
    .unwrap();
    let creds = [None, Some(forged), Some("garbage".to_owned())];
    for cred in creds.clone() {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw_open(cred, false)).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..5], b"TTHR\x01");
        assert_eq!(buf[9], 0x12, "REFUSE");
        assert_eq!(
            u16::from_be_bytes([buf[10], buf[11]]),
            CloseCode::UNAUTHORIZED.0
        );
        let mut open = bytes::BytesMut::new();
        tether_proto::codec::encode_seq_data(1, &[0x01, 0x01], &mut open);
        let _ = s.write_all(&open).await;
    }
    // The same with OPEN and DATA pipelined behind the HELLO (no WELCOME waited for): the
    // connection is closed, whatever it is told.
    for cred in creds {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw_open(cred, true)).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "the exit closes the connection");
    }
    // An entry without a credential: its application connection is reset, the target
    // never sees a connection.
    let mut entry_cfg = EntryConfig::new("127.0.0.1:0".parse().unwrap(), addr);
    entry_cfg.linger = Duration::from_secs(2);
    let mut entry = TunnelEntry::bind(entry_cfg).await.unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    let _ = app.write_all(b"hello?").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), app.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), entry.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            TunnelEvent::Closed { end, .. } => {
                assert!(end.is_failure(), "{end}");
                assert!(end.to_string().contains("unauthorized"), "{end}");
                break;
            }
            _ => continue,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the target saw a connection"
    );
    // The exit never opened a tunnel.
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(50), exit.next_event()).await
    {
        assert!(!matches!(ev, TunnelEvent::Opened { .. }), "{ev:?}");
    }

    // With a token: through, end to end.
    let mut entry_cfg = EntryConfig::new("127.0.0.1:0".parse().unwrap(), addr);
    entry_cfg.credential = Some(Credentials::token(token("entry-1")).unwrap());
    let entry = TunnelEntry::bind(entry_cfg).await.unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_tunnel_over_tls_with_client_certificates_and_another_entry_cannot_take_it_over() {
    let tmp = temp_dir("tunnel-tls");
    let dir = tmp.path();
    let ca = Ca::new("tunnel ca");
    let ca_file = ca.write(dir, "ca.pem");
    let s = ca.server(dir, "exit", "tunnel exit");
    let tls =
        TlsServer::from_files(ServerTlsFiles::new(s.cert, s.key).client_ca(&ca_file)).unwrap();
    let (target, accepted) = target().await;
    let mut cfg = exit_cfg(target);
    cfg.server = cfg.server.tls(Arc::new(tls)).authorize(exit_auth(true));
    let exit = TunnelExit::bind(cfg).await.unwrap();
    let addr = exit.local_addr();
    let client_tls = |name: &str| {
        let c = ca.client(dir, name, name);
        TlsClient::new(&ClientTlsOptions {
            ca: Some(ca_file.clone()),
            cert: Some(c.cert),
            key: Some(c.key),
            ..Default::default()
        })
        .unwrap()
    };
    let mut entry_cfg = EntryConfig::new("127.0.0.1:0".parse().unwrap(), addr);
    entry_cfg.tls = Some(client_tls("entry-a"));
    let entry = TunnelEntry::bind(entry_cfg).await.unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"over tls").await.unwrap();
    let mut got = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"over tls");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Entry B (another certificate) claims entry A's tunnel id: refused, A's tunnel untouched.
    let tunnel_id = exit
        .server()
        .clients()
        .into_iter()
        .find(|c| c.state.is_connected())
        .unwrap()
        .id;
    let b_tls = client_tls("entry-b");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let io = b_tls.connect("127.0.0.1", tcp).await.unwrap();
    let hello = Hello {
        client_id: tunnel_id,
        requested_heartbeat: Duration::from_secs(10),
        want_session: true,
        resume: None,
        credential: None,
    };
    let mut m = Manual::new(io, &hello);
    match m.handshake().await {
        ConnEvent::Closed(d) => assert!(
            matches!(
                d.reason,
                DisconnectReason::Refused {
                    code: CloseCode::ID_NOT_ALLOWED,
                    ..
                }
            ),
            "{:?}",
            d.reason
        ),
        other => panic!("{other:?}"),
    }
    app.write_all(b"still ok").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
