//! TLS over real loopback sockets with certificates made here by rcgen: handshake, data,
//! a tether `Connection` over TLS, the `Transport` methods through TLS, mutual TLS accepted
//! and refused, wrong CA, wrong server name, reload, and load errors that name the file.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A CA that can issue server and client certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// (certificate PEM, key PEM, certificate DER).
    fn issue(
        &self,
        cn: Option<&str>,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.extended_key_usages = vec![usage];
        let c = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (c.pem(), key.serialize_pem(), c.der().to_vec())
    }

    fn server(&self, cn: &str) -> (String, String, Vec<u8>) {
        self.issue(
            Some(cn),
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str) -> (String, String, Vec<u8>) {
        self.issue(Some(cn), &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Server files for a certificate from `ca`.
fn server_files(dir: &Path, ca: &Ca, cn: &str) -> (ServerTlsFiles, Vec<u8>) {
    let (cert, key, der) = ca.server(cn);
    (
        ServerTlsFiles::new(
            write(dir, "server.pem", &cert),
            write(dir, "server.key", &key),
        ),
        der,
    )
}

fn client_with_ca(ca_path: &Path) -> TlsClient {
    TlsClient::new(&ClientTlsOptions {
        ca: Some(ca_path.into()),
        ..Default::default()
    })
    .unwrap()
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Accepts one connection and runs the server handshake.
async fn accept_one(l: &TcpListener, tls: &TlsServer) -> io::Result<ServerTlsStream<TcpStream>> {
    let (tcp, _) = l.accept().await?;
    tls.accept(tcp).await
}

async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    s.write_all(&buf[..n]).await.unwrap();
    s.flush().await.unwrap();
}

async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn handshake_and_data_over_loopback() {
    let tmp = test_dir("tls-basic");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (files, server_der) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files).unwrap();
    assert!(!tls.is_mutual());
    assert_eq!(tls.current_certificate().unwrap().as_ref(), &server_der[..]);
    let client = client_with_ca(&ca.write(dir, "ca.pem"));
    let (l, addr) = listener().await;
    let server = async {
        let mut s = accept_one(&l, &tls).await.unwrap();
        assert!(peer_principal(&s).is_none(), "no client certificate");
        echo_once(&mut s).await;
        s
    };
    let cl = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // By IP address (the certificate has an IP SAN) and by DNS name below.
        let mut c = client.connect("127.0.0.1", tcp).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"hello tls").await, b"hello tls");
        c
    };
    let (_s, c) = tokio::time::timeout(T, async { tokio::join!(server, cl) })
        .await
        .unwrap();
    let (_, conn) = c.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.peer_certificates().unwrap()[0].as_ref(),
        &server_der[..]
    );

    let server = async { accept_one(&l, &tls).await.unwrap() };
    let cl = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        client.connect("localhost", tcp).await.unwrap()
    };
    tokio::time::timeout(T, async { tokio::join!(server, cl) })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_tether_connection_runs_over_tls() {
    use crate::connection::{ConnectOptions, Connection};
    let tmp = test_dir("tls-tether");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files).unwrap();
    let client = client_with_ca(&ca.write(dir, "ca.pem"));
    let (l, addr) = listener().await;
    let policy = crate::Policy::default();
    let server = async {
        let s = accept_one(&l, &tls).await.unwrap();
        let (mut conn, hello) =
            Connection::accept_over(s, &policy, &tether_proto::ConnConfig::default())
                .await
                .unwrap();
        assert_eq!(hello.client_id, "over-tls");
        let m = conn.recv().await.unwrap();
        conn.send(m).await.unwrap();
        conn
    };
    let cl = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let s = client.connect("localhost", tcp).await.unwrap();
        let mut c = Connection::client_over(s, &ConnectOptions::new("over-tls"))
            .await
            .unwrap();
        c.send(bytes::Bytes::from_static(b"ping over tls"))
            .await
            .unwrap();
        assert_eq!(&c.recv().await.unwrap()[..], b"ping over tls");
        c
    };
    tokio::time::timeout(T, async { tokio::join!(server, cl) })
        .await
        .unwrap();
}

/// Polls `poll_unread` once.
async fn unread<S: Transport>(s: &mut S) -> Option<bool> {
    poll_fn(|cx| Poll::Ready(s.poll_unread(cx))).await
}

#[tokio::test]
async fn transport_methods_look_through_tls_at_the_socket() {
    let tmp = test_dir("tls-transport");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files).unwrap();
    let client = client_with_ca(&ca.write(dir, "ca.pem"));
    let (l, addr) = listener().await;
    let (s, c) = tokio::time::timeout(T, async {
        tokio::join!(accept_one(&l, &tls), async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            client.connect("localhost", tcp).await
        })
    })
    .await
    .unwrap();
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    // TLS 1.3 servers send session tickets after the handshake: let the client take them so
    // that only application data is measured below.
    c.write_all(b"x").await.unwrap();
    c.flush().await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();

    assert_eq!(unread(&mut s).await, Some(false), "nothing sent yet");
    assert!(s.has_unacked().is_some(), "TCP_INFO through TLS");
    assert!(c.has_unacked().is_some());

    let payload = vec![7u8; 3000];
    c.write_all(&payload).await.unwrap();
    c.flush().await.unwrap();
    // The bytes reach the server's kernel buffer: unread says so without reading them.
    let deadline = tokio::time::Instant::now() + T;
    while unread(&mut s).await != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "bytes never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Read part: the rest is decrypted and held by rustls, not the kernel; still unread.
    let mut part = vec![0u8; 100];
    s.read_exact(&mut part).await.unwrap();
    assert_eq!(unread(&mut s).await, Some(true), "plaintext held by rustls");
    let mut rest = vec![0u8; payload.len() - 100];
    s.read_exact(&mut rest).await.unwrap();
    assert_eq!(unread(&mut s).await, Some(false), "all read");

    // The same through the either-side wrapper, on the client.
    s.write_all(b"back").await.unwrap();
    s.flush().await.unwrap();
    let mut either = TlsStream::Client(c);
    let deadline = tokio::time::Instant::now() + T;
    while unread(&mut either).await != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "bytes never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut back = [0u8; 4];
    either.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"back");
    // abort_on_close reaches the socket: the peer sees a reset, not a FIN.
    either.abort_on_close();
    drop(either);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
}

/// A mutual-TLS server and what its accept returned, for a client with `opts`.
async fn mtls_attempt(
    tls: &TlsServer,
    opts: ClientTlsOptions,
) -> (io::Result<ServerTlsStream<TcpStream>>, io::Result<Vec<u8>>) {
    let client = TlsClient::new(&opts).unwrap();
    let (l, addr) = listener().await;
    tokio::time::timeout(T, async {
        tokio::join!(
            async {
                match accept_one(&l, tls).await {
                    Ok(mut s) => {
                        echo_once(&mut s).await;
                        Ok(s)
                    }
                    Err(e) => Err(e),
                }
            },
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut c = client.connect("localhost", tcp).await?;
                // In TLS 1.3 the client finishes first; a refused certificate shows on the
                // first read.
                c.write_all(b"hi").await?;
                c.flush().await?;
                let mut buf = vec![0u8; 2];
                c.read_exact(&mut buf).await?;
                Ok(buf)
            }
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn mutual_tls_accepts_the_ca_s_clients_and_names_their_principal() {
    let tmp = test_dir("tls-mtls-ok");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let clients = Ca::new("client ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files.client_ca(clients.write(dir, "clients.pem"))).unwrap();
    assert!(tls.is_mutual());
    let (cert, key, _) = clients.client("alice");
    let opts = ClientTlsOptions {
        ca: Some(ca.write(dir, "ca.pem")),
        cert: Some(write(dir, "alice.pem", &cert)),
        key: Some(write(dir, "alice.key", &key)),
        server_name: None,
    };
    let (s, c) = mtls_attempt(&tls, opts).await;
    assert_eq!(c.unwrap(), b"hi");
    let p = peer_principal(&s.unwrap()).unwrap().unwrap();
    assert_eq!(p.name, "alice");
    assert_eq!(p.scheme, Scheme::Mtls);
    assert!(p.issuer.as_deref().unwrap().contains("client ca"), "{p:?}");
    assert!(p.allows("alice") && !p.allows("bob"));
    assert!(p.expires_at.is_some());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_or_from_another_ca() {
    let tmp = test_dir("tls-mtls-refused");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let clients = Ca::new("client ca");
    let strangers = Ca::new("stranger ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files.client_ca(clients.write(dir, "clients.pem"))).unwrap();
    let ca_path = ca.write(dir, "ca.pem");

    let (s, c) = mtls_attempt(
        &tls,
        ClientTlsOptions {
            ca: Some(ca_path.clone()),
            ..Default::default()
        },
    )
    .await;
    assert!(s.is_err(), "no client certificate: refused");
    assert!(c.is_err());

    let (cert, key, _) = strangers.client("mallory");
    let (s, c) = mtls_attempt(
        &tls,
        ClientTlsOptions {
            ca: Some(ca_path),
            cert: Some(write(dir, "m.pem", &cert)),
            key: Some(write(dir, "m.key", &key)),
            server_name: None,
        },
    )
    .await;
    assert!(s.is_err(), "certificate from another CA: refused");
    assert!(c.is_err());
}

async fn client_attempt(
    tls: &TlsServer,
    client: &TlsClient,
    host: &str,
) -> (io::Result<()>, io::Result<()>) {
    let (l, addr) = listener().await;
    tokio::time::timeout(T, async {
        tokio::join!(async { accept_one(&l, tls).await.map(drop) }, async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            client.connect(host, tcp).await.map(drop)
        })
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let tmp = test_dir("tls-wrong-ca");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let other = Ca::new("other ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files).unwrap();
    let client = client_with_ca(&other.write(dir, "other.pem"));
    let (s, c) = client_attempt(&tls, &client, "localhost").await;
    let e = c.unwrap_err();
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    assert!(s.is_err());
}

#[tokio::test]
async fn a_server_name_that_the_certificate_does_not_hold_is_refused() {
    let tmp = test_dir("tls-name");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (files, _) = server_files(dir, &ca, "server");
    let tls = TlsServer::from_files(files).unwrap();
    let ca_path = ca.write(dir, "ca.pem");
    // --server-name overrides the host connected to.
    let wrong = TlsClient::new(&ClientTlsOptions {
        ca: Some(ca_path.clone()),
        server_name: Some("other.example".into()),
        ..Default::default()
    })
    .unwrap();
    let (_, c) = client_attempt(&tls, &wrong, "localhost").await;
    let e = c.unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // Without the override the host is the name: 127.0.0.2 is not in the certificate.
    let plain = client_with_ca(&ca_path);
    let (_, c) = client_attempt(&tls, &plain, "127.0.0.2").await;
    assert!(c.is_err());
    // The right override works whatever the host.
    let right = TlsClient::new(&ClientTlsOptions {
        ca: Some(ca_path),
        server_name: Some("localhost".into()),
        ..Default::default()
    })
    .unwrap();
    let (s, c) = client_attempt(&tls, &right, "ignored").await;
    assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
}

#[tokio::test]
async fn reload_serves_the_new_certificate_while_established_streams_keep_working() {
    let tmp = test_dir("tls-reload");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (files, der_a) = server_files(dir, &ca, "server-a");
    let tls = TlsServer::from_files(files.clone()).unwrap();
    let client = client_with_ca(&ca.write(dir, "ca.pem"));
    let (l, addr) = listener().await;
    // An acceptor taken before the reload (a listener that caches one).
    let cached = tls.acceptor();

    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        client.connect("localhost", tcp).await.unwrap()
    };
    let (s1, c1) = tokio::time::timeout(T, async {
        tokio::join!(async { accept_one(&l, &tls).await.unwrap() }, connect())
    })
    .await
    .unwrap();
    let (mut s1, mut c1) = (s1, c1);
    assert_eq!(
        c1.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        &der_a[..]
    );

    // New certificate and key in the same files; reload.
    let (cert_b, key_b, der_b) = ca.server("server-b");
    std::fs::write(&files.cert, cert_b).unwrap();
    std::fs::write(&files.key, key_b).unwrap();
    tls.reload().unwrap();
    assert_eq!(tls.current_certificate().unwrap().as_ref(), &der_b[..]);

    // New handshakes see B, through a fresh acceptor and through the cached one.
    let (_s2, c2) = tokio::time::timeout(T, async {
        tokio::join!(async { accept_one(&l, &tls).await.unwrap() }, connect())
    })
    .await
    .unwrap();
    assert_eq!(
        c2.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        &der_b[..]
    );
    let (_s3, c3) = tokio::time::timeout(T, async {
        tokio::join!(
            async {
                let (tcp, _) = l.accept().await.unwrap();
                cached.accept(tcp).await.unwrap()
            },
            connect()
        )
    })
    .await
    .unwrap();
    assert_eq!(
        c3.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        &der_b[..]
    );

    // The stream established with A still carries data both ways.
    let echo = async { echo_once(&mut s1).await };
    let (_, got) = tokio::time::timeout(T, async {
        tokio::join!(echo, roundtrip(&mut c1, b"still here"))
    })
    .await
    .unwrap();
    assert_eq!(got, b"still here");

    // A reload from broken files fails, says which file, and keeps B in service.
    let (_, key_c, _) = ca.server("server-c");
    std::fs::write(&files.key, key_c).unwrap();
    let e = tls.reload().unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("server.key"), "{e}");
    assert_eq!(tls.current_certificate().unwrap().as_ref(), &der_b[..]);
    let (_s4, c4) = tokio::time::timeout(T, async {
        tokio::join!(async { accept_one(&l, &tls).await.unwrap() }, connect())
    })
    .await
    .unwrap();
    assert_eq!(
        c4.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        &der_b[..]
    );
}

#[test]
fn load_errors_name_the_file_and_what_is_wrong() {
    let tmp = test_dir("tls-errors");
    let dir = tmp.path();
    let ca = Ca::new("test ca");
    let (cert, key, _) = ca.server("server");
    let (_, other_key, _) = ca.server("other");
    let cert_p = write(dir, "cert.pem", &cert);
    let key_p = write(dir, "key.pem", &key);
    let other_p = write(dir, "other.key", &other_key);
    let empty = write(dir, "empty.pem", "");
    let missing = dir.join("missing.pem");

    let err = |f: ServerTlsFiles| TlsServer::from_files(f).unwrap_err();

    let e = err(ServerTlsFiles::new(&missing, &key_p));
    assert!(matches!(e, TlsError::Read { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");

    let e = err(ServerTlsFiles::new(&empty, &key_p));
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("{}: no certificate in file", empty.display())
    );
    // A key file given as the certificate: no certificate in it.
    let e = err(ServerTlsFiles::new(&key_p, &key_p));
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");

    // A certificate file given as the key: no key in it.
    let e = err(ServerTlsFiles::new(&cert_p, &cert_p));
    assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    assert!(e.to_string().contains("cert.pem: no private key"), "{e}");

    let e = err(ServerTlsFiles::new(&cert_p, &other_p));
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("other.key") && e.to_string().contains("cert.pem"),
        "{e}"
    );

    let e = err(ServerTlsFiles::new(&cert_p, &key_p).client_ca(&empty));
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");

    // Broken PEM.
    let broken = write(dir, "broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let e = err(ServerTlsFiles::new(&broken, &key_p));
    assert!(matches!(e, TlsError::Pem { .. }), "{e}");

    // Client side.
    let e = TlsClient::new(&ClientTlsOptions {
        ca: Some(cert_p.clone()),
        cert: Some(cert_p.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, TlsError::IncompleteClientCert), "{e}");
    let e = TlsClient::new(&ClientTlsOptions {
        ca: Some(cert_p.clone()),
        server_name: Some("not a name!".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, TlsError::ServerName { .. }), "{e}");
    let e = TlsClient::new(&ClientTlsOptions {
        ca: Some(missing),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e}");
    let ok = TlsClient::new(&ClientTlsOptions {
        ca: Some(cert_p),
        server_name: Some("[::1]".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(ok.server_name("x").is_ok());
}

#[test]
fn the_principal_is_the_cn_else_the_first_dns_or_uri_san() {
    let ca = Ca::new("test ca");
    let usage = ExtendedKeyUsagePurpose::ClientAuth;
    let (_, _, der) = ca.issue(Some("alice"), &["other.example"], usage.clone());
    assert_eq!(principal_from_certificate(&der).unwrap().name, "alice");
    let (_, _, der) = ca.issue(None, &["device-7.example", "x.example"], usage.clone());
    let p = principal_from_certificate(&der).unwrap();
    assert_eq!(p.name, "device-7.example");
    assert!(p.allows("device-7.example"));
    // IP SANs are not names; a URI after one is.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![
        rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()),
        rcgen::SanType::URI("spiffe://example/bot".try_into().unwrap()),
    ];
    let der = params
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap()
        .der()
        .to_vec();
    assert_eq!(
        principal_from_certificate(&der).unwrap().name,
        "spiffe://example/bot"
    );
    // Nothing to name it by.
    let (_, _, der) = ca.issue(None, &["10.0.0.1"], usage);
    assert_eq!(
        principal_from_certificate(&der).unwrap_err(),
        IdentityError::NoName
    );
    assert_eq!(
        principal_from_certificate(b"not a certificate").unwrap_err(),
        IdentityError::Parse
    );
}
