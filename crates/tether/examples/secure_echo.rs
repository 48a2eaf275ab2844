//! The echo server and a reconnecting client, over TLS with a JWT: what a deployment beyond
//! loopback looks like in the library (the `tether serve --tls-cert … --auth-secret …` of the
//! CLI). Self-contained: it makes a throw-away certificate and signing secret, so it runs as is.
//!
//! ```text
//! cargo run -p tether --example secure_echo
//! ```
//!
//! It prints the echo that alice gets over TLS, then what happens to a client whose token names
//! bob but who asks for alice's id: refused with ID_NOT_ALLOWED (18), and it does not retry.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tether::auth::{sign_hs256, Builtin, JwtVerifier, TokenSpec};
use tether::credential::Credentials;
use tether::tls::{ClientTlsOptions, ServerTlsFiles, TlsClient, TlsServer};
use tether::{Bytes, Client, ClientConfig, ClientEvent, Server, ServerConfig, ServerEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A certificate for "localhost" (in production: your CA's, reloaded on SIGHUP with
    // `TlsServer::reload`) and an HS256 secret (in production: a file only the server reads).
    let dir = std::env::temp_dir().join(format!("tether-secure-echo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_file, cert.cert.pem())?;
    std::fs::write(&key_file, cert.key_pair.serialize_pem())?;
    let secret = b"an example secret, 32 bytes or more, never in source".to_vec();

    let tls = Arc::new(TlsServer::from_files(ServerTlsFiles::new(
        &cert_file, &key_file,
    ))?);
    let auth = Builtin::new().credentials(JwtVerifier::hs256(&secret)?);
    let cfg = ServerConfig::new("127.0.0.1:0".parse()?)
        .tls(tls)
        .authorize(Arc::new(auth));
    let mut server = Server::bind(cfg).await?;
    let addr = server.local_addr();
    let handle = server.handle();
    tokio::spawn(async move {
        while let Some(ev) = server.next_event().await {
            if let ServerEvent::Message { client_id, msg, .. } = ev {
                let _ = handle.try_send(&client_id, msg);
            }
        }
    });

    // Clients trust that certificate (in production: your CA with `ca`, or the OS's roots)
    // and present a token whose `sub` names the id they may use.
    let client_tls = TlsClient::new(&ClientTlsOptions {
        ca: Some(cert_file.clone()),
        server_name: Some("localhost".into()),
        ..Default::default()
    })?;
    let token = |sub: &str| {
        sign_hs256(
            &secret,
            &TokenSpec::new(sub, Duration::from_secs(3600)),
            SystemTime::now(),
        )
    };
    let client = |id: &str, token: String| -> Result<Client, Box<dyn std::error::Error>> {
        let mut cfg = ClientConfig::new(addr, id);
        cfg.connect.tls = Some(client_tls.clone());
        cfg.connect.credential = Some(Credentials::token(token)?);
        Ok(Client::start(cfg))
    };

    let mut alice = client("alice", token("alice")?)?;
    alice.send(Bytes::from_static(b"hello over tls")).await?;
    while let Some(ev) = alice.next_event().await {
        match ev {
            ClientEvent::Connected { .. } => println!("alice: connected over TLS"),
            ClientEvent::Message(m) => {
                println!("alice: echo {:?}", String::from_utf8_lossy(&m));
                break;
            }
            other => println!("alice: {other:?}"),
        }
    }

    let mut mallory = client("alice", token("bob")?)?;
    while let Some(ev) = mallory.next_event().await {
        if let ClientEvent::GaveUp { reason, .. } = ev {
            println!("bob's token asking for alice: gave up, {reason}");
            break;
        }
    }
    alice.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
