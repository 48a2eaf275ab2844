//! Security of the real binary: `serve` refuses a public address without TLS and
//! authentication (unless --insecure); TLS + token end to end with `tether token` and
//! `tether connect`; SIGHUP reloads the certificate while established connections stay up
//! and new ones see the new certificate; the status page's bearer token. Certificates are
//! made here with rcgen.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

const BIN: &str = env!("CARGO_BIN_EXE_tether");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory for one test's keys and tokens, removed when it drops.
fn dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tether-cli-sec-{tag}-"))
        .tempdir()
        .unwrap()
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "cli test ca");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// Writes a server certificate for 127.0.0.1/localhost with subject CN `cn` to
    /// `dir/server.{crt,key}`; returns its DER.
    fn server(&self, dir: &Path, cn: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        let c = p.signed_by(&key, &self.cert, &self.key).unwrap();
        // Written to temporary names and renamed, as a certificate manager does: a reload
        // never sees half a file.
        std::fs::write(dir.join("server.crt.new"), c.pem()).unwrap();
        std::fs::write(dir.join("server.key.new"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("server.key.new"), dir.join("server.key")).unwrap();
        std::fs::rename(dir.join("server.crt.new"), dir.join("server.crt")).unwrap();
        c.der().to_vec()
    }
}

/// Starts `serve` with `args`; returns it, its tether address and its log lines.
fn serve(args: &[&str]) -> (Kill, String, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = wait_line(&rx, &["listening"], Duration::from_secs(10));
    let addr = first
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .to_owned();
    (Kill(child), addr, rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, words: &[&str], within: Duration) -> String {
    let t = Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < within {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if words.iter().all(|w| l.contains(w)) {
                return l;
            }
            seen.push(l);
        }
    }
    panic!(
        "no line with {words:?} within {within:?}; saw:\n{}",
        seen.join("\n")
    );
}

fn token(secret: &Path, sub: &str, ttl: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "--secret"])
        .arg(secret)
        .args(["--sub", sub, "--ttl", ttl])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn sighup(child: &Child) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(r, 0);
}

#[test]
fn serve_refuses_a_public_address_without_tls_and_authentication() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--http", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without TLS and authentication"),
        "{err}"
    );
    for flag in [
        "--tls-cert FILE --tls-key FILE",
        "--auth-secret FILE",
        "--insecure",
    ] {
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // TLS alone is not enough.
    let tmp = dir("public");
    let d = tmp.path();
    Ca::new().server(d, "server");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--http",
            "off",
            "--tls-cert",
        ])
        .arg(d.join("server.crt"))
        .arg("--tls-key")
        .arg(d.join("server.key"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("without authentication"), "{err}");
    assert!(!err.contains("--tls-cert FILE"), "{err}");
    // --insecure says the operator knows; loopback needs nothing.
    let (_s, _, _) = serve(&["--listen", "0.0.0.0:0", "--http", "off", "--insecure"]);
    let (_s, _, _) = serve(&["--listen", "127.0.0.1:0", "--http", "off"]);
    // Both: starts, and says so.
    std::fs::write(d.join("secret"), "x".repeat(40)).unwrap();
    let crt = d.join("server.crt");
    let key = d.join("server.key");
    let sec = d.join("secret");
    let (_s, _, rx) = serve(&[
        "--listen",
        "0.0.0.0:0",
        "--http",
        "off",
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--auth-secret",
        sec.to_str().unwrap(),
    ]);
    drop(rx);
}

/// A `tether connect` over TLS with a token file; its stdin, stdout lines and stderr lines.
struct Connect {
    child: Kill,
    stdin: std::process::ChildStdin,
    out: mpsc::Receiver<String>,
}

fn connect(addr: &str, id: &str, ca: &Path, token_file: &Path) -> Connect {
    let mut child = Command::new(BIN)
        .args(["connect", addr, "--id", id, "--tls", "--ca"])
        .arg(ca)
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Connect {
        child: Kill(child),
        stdin,
        out: rx,
    }
}

impl Connect {
    fn echo(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        let got = self.out.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, line);
    }
}

/// The leaf certificate a new TLS session to `addr` is shown.
fn presented(addr: &str, ca: &Path) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = tether::tls::TlsClient::new(&tether::tls::ClientTlsOptions {
            ca: Some(ca.to_owned()),
            ..Default::default()
        })
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let s = tls.connect("127.0.0.1", tcp).await.unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    })
}

#[test]
fn sighup_reloads_the_certificate_and_established_connections_stay_up() {
    let tmp = dir("reload");
    let d = tmp.path();
    let ca = Ca::new();
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let first = ca.server(d, "first");
    std::fs::write(d.join("secret"), "a shared secret of forty bytes, or more!").unwrap();
    let (crt, key, sec) = (d.join("server.crt"), d.join("server.key"), d.join("secret"));
    let (serve, addr, rx) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--echo",
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--auth-secret",
        sec.to_str().unwrap(),
    ]);
    let tok = d.join("alice.jwt");
    std::fs::write(&tok, token(&sec, "alice", "1h")).unwrap();
    let mut alice = connect(&addr, "alice", &ca_file, &tok);
    wait_line(&rx, &["alice", "connected"], Duration::from_secs(10));
    alice.echo("before the reload");
    assert_eq!(presented(&addr, &ca_file), first);

    // A new certificate in place, then SIGHUP.
    let second = ca.server(d, "second");
    assert_ne!(first, second);
    sighup(&serve.0);
    let l = wait_line(
        &rx,
        &["reloaded", "tls certificate"],
        Duration::from_secs(5),
    );
    assert!(l.contains("connections=untouched"), "{l}");
    wait_line(&rx, &["reloaded", "auth keys"], Duration::from_secs(5));
    // New handshakes see the new certificate; alice's connection carries on.
    assert_eq!(presented(&addr, &ca_file), second);
    alice.echo("after the reload");
    let mut bob = connect(&addr, "bob", &ca_file, &{
        let t = d.join("bob.jwt");
        std::fs::write(&t, token(&sec, "bob", "1h")).unwrap();
        t
    });
    bob.echo("a new connection");
    alice.echo("still here");

    // A broken file keeps the old certificate and says so.
    std::fs::write(&crt, "not a certificate").unwrap();
    sighup(&serve.0);
    let l = wait_line(&rx, &["reload-failed"], Duration::from_secs(5));
    assert!(l.contains("keeping the old certificate"), "{l}");
    assert_eq!(presented(&addr, &ca_file), second);
    alice.echo("and after a failed reload");

    // Nobody was disconnected on the way.
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        assert!(!l.contains("disconnected"), "{l}");
    }
    drop(alice.child);
    drop(bob.child);
}

#[test]
fn connect_is_refused_with_exit_3_for_a_missing_or_foreign_token() {
    let tmp = dir("refused");
    let d = tmp.path();
    let ca = Ca::new();
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    ca.server(d, "server");
    std::fs::write(d.join("secret"), "a shared secret of forty bytes, or more!").unwrap();
    let (crt, key, sec) = (d.join("server.crt"), d.join("server.key"), d.join("secret"));
    let (_serve, addr, _rx) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--auth-secret",
        sec.to_str().unwrap(),
    ]);
    // A token for bob used as alice: refused (id-not-allowed), exit 3, no retry loop.
    let bob = d.join("bob.jwt");
    std::fs::write(&bob, token(&sec, "bob", "1h")).unwrap();
    let run = |extra: &[&str]| {
        let t = Instant::now();
        let out = Command::new(BIN)
            .args(["connect", &addr, "--id", "alice", "--ca"])
            .arg(&ca_file)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--token-file", bob.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("id-not-allowed"), "{err}");
    let (code, err) = run(&[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("credential required") && err.contains("unauthorized"),
        "{err}"
    );
    // Plain TCP to the TLS port: told what to add.
    let out = Command::new(BIN)
        .args(["connect", &addr, "--id", "alice"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("requires TLS"), "{err}");
}

fn http(addr: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out[9..12].parse().unwrap(), out)
}

#[test]
fn the_status_page_and_api_take_a_bearer_token_and_warn_when_exposed_without_one() {
    let tmp = dir("http");
    let d = tmp.path();
    let tf = d.join("http.token");
    std::fs::write(&tf, "status-page-token-0123456789\n").unwrap();
    let (_s, _, rx) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--http-token-file",
        tf.to_str().unwrap(),
    ]);
    let l = wait_line(&rx, &["status-page"], Duration::from_secs(5));
    let http_addr = l
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    for path in ["/", "/api/clients", "/metrics", "/status.js"] {
        let (code, out) = http(&http_addr, path, None);
        assert_eq!(code, 401, "{path}: {out}");
        let (code, out) = http(&http_addr, path, Some("Bearer wrong-token-0123456789"));
        assert_eq!(code, 401, "{path}: {out}");
        let (code, out) = http(
            &http_addr,
            path,
            Some("Bearer status-page-token-0123456789"),
        );
        assert_eq!(code, 200, "{path}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("content-security-policy:"),
            "{path}: {out}"
        );
    }
    // Beyond loopback without a token: it starts, and warns.
    let (_s, _, rx) = serve(&["--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"]);
    let l = wait_line(&rx, &["warning"], Duration::from_secs(5));
    assert!(l.contains("--http-token-file"), "{l}");
}

/// Starts `tether tunnel SIDE args`; returns it and the address from its `listening` line.
fn tunnel(side: &str, args: &[&str]) -> (Kill, String, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["tunnel", side])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let l = wait_line(&rx, &["listening"], Duration::from_secs(10));
    let addr = l
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .to_owned();
    (Kill(child), addr, rx)
}

#[test]
fn a_tunnel_exit_needs_tls_and_auth_beyond_loopback_and_carries_authenticated_entries() {
    let out = Command::new(BIN)
        .args([
            "tunnel",
            "exit",
            "--listen",
            "0.0.0.0:0",
            "--target",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to accept tunnels on 0.0.0.0:0 without TLS and authentication"),
        "{err}"
    );

    // A target that echoes.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in target.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let tmp = dir("tunnel");
    let d = tmp.path();
    let ca = Ca::new();
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    ca.server(d, "exit");
    std::fs::write(d.join("secret"), "a shared secret of forty bytes, or more!").unwrap();
    let (crt, key, sec) = (d.join("server.crt"), d.join("server.key"), d.join("secret"));
    let (exit, exit_addr, exit_rx) = tunnel(
        "exit",
        &[
            "--listen",
            "127.0.0.1:0",
            "--target",
            &target_addr,
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--auth-secret",
            sec.to_str().unwrap(),
        ],
    );
    let round_trip = |entry_addr: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(entry_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"through the tunnel").unwrap();
        let mut buf = [0u8; 18];
        s.read_exact(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    // Without a token: the application connection is reset, nothing reaches the target.
    let (_entry, entry_addr, _) = tunnel(
        "entry",
        &[
            "--listen",
            "127.0.0.1:0",
            "--relay",
            &exit_addr,
            "--ca",
            ca_file.to_str().unwrap(),
        ],
    );
    assert_eq!(round_trip(&entry_addr), None);
    // With one: through.
    let tok = d.join("entry.jwt");
    std::fs::write(&tok, token(&sec, "entry-1", "1h")).unwrap();
    let (_entry, entry_addr, _) = tunnel(
        "entry",
        &[
            "--listen",
            "127.0.0.1:0",
            "--relay",
            &exit_addr,
            "--ca",
            ca_file.to_str().unwrap(),
            "--token-file",
            tok.to_str().unwrap(),
        ],
    );
    assert_eq!(
        round_trip(&entry_addr).as_deref(),
        Some("through the tunnel")
    );
    // SIGHUP reloads the exit's files.
    sighup(&exit.0);
    wait_line(
        &exit_rx,
        &["reloaded", "tls certificate"],
        Duration::from_secs(5),
    );
}
