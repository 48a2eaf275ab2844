//! Sessions over real loopback: a proxy that resets every connection again and again, and the
//! resume-token security checks.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{fast_policy, Flaky};
use tether::{
    Client, ClientConfig, ClientEvent, CloseCode, DisconnectReason, Server, ServerConfig,
    ServerEvent,
};
use tether_proto::backoff::BackoffConfig;
use tether_proto::codec::{self, Frame, Hello, ResumeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn numbered(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u64(i);
    b.put_slice(&[0xAB; 40]);
    b.freeze()
}

fn number(m: &[u8]) -> u64 {
    u64::from_be_bytes(m[..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_in_order_across_repeated_resets() {
    const N: u64 = 20_000;
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(200, 1000))
        .session_linger(Some(Duration::from_secs(10)));
    let mut srv = Server::bind(cfg).await.unwrap();
    let flaky = Flaky::start(srv.local_addr()).await;
    let mut ccfg = ClientConfig::new(flaky.addr, "chaos");
    ccfg.connect.policy = fast_policy(200, 1000);
    ccfg.backoff = BackoffConfig {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(50),
        max_attempts: None,
    };
    ccfg.seed = Some(7);
    let mut client = Client::start(ccfg);
    assert!(matches!(
        client.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));

    // Server → client sender.
    let h = srv.handle();
    let server_sender = tokio::spawn(async move {
        for i in 0..N {
            if i % 16 == 0 {
                // Paced so the transfer spans many resets.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            loop {
                match h.send("chaos", numbered(i)).await {
                    Ok(()) => break,
                    Err(tether::server::SendError::Backlogged(_))
                    | Err(tether::server::SendError::NotConnected(_)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    // Client → server sender.
    let c2 = client.sender();
    let client_sender = tokio::spawn(async move {
        for i in 0..N {
            if i % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            c2.send(numbered(i)).await.unwrap();
        }
    });
    // The chaos: reset every connection every 40 ms until everything arrived.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let chaos = tokio::spawn(async move {
        let mut resets = 0;
        while !done2.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(40)).await;
            if flaky.reset_all() > 0 {
                resets += 1;
            }
        }
        resets
    });

    // Receive both ways.
    let mut server_got = Vec::with_capacity(N as usize);
    let mut client_got = Vec::with_capacity(N as usize);
    let mut resumes = 0;
    let mut down_since: Option<std::time::Instant> = None;
    let mut latencies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server_got.len() < N as usize || client_got.len() < N as usize {
        if tokio::time::Instant::now() >= deadline {
            let q = client.queued();
            panic!(
                "stuck: server {} client {}; client queued {q}; presence {:?}",
                server_got.len(),
                client_got.len(),
                srv.client("chaos")
            );
        }
        tokio::select! {
            ev = srv.next_event() => match ev.unwrap() {
                ServerEvent::Message { msg, .. } => server_got.push(number(&msg)),
                ServerEvent::SessionLost { .. } => panic!("session lost"),
                _ => {}
            },
            ev = client.next_event() => match ev.unwrap() {
                ClientEvent::Message(m) => client_got.push(number(&m)),
                ClientEvent::Resumed { .. } => {
                    resumes += 1;
                    if let Some(t) = down_since.take() {
                        latencies.push(t.elapsed());
                    }
                }
                ClientEvent::Disconnected { .. } => {
                    down_since.get_or_insert_with(std::time::Instant::now);
                }
                ClientEvent::SessionLost { unacked } => panic!("session lost: {unacked:?}"),
                ClientEvent::GaveUp { reason, .. } => panic!("gave up: {reason}"),
                _ => {}
            },
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    server_sender.await.unwrap();
    client_sender.await.unwrap();
    let resets = chaos.await.unwrap();
    assert_eq!(
        server_got,
        (0..N).collect::<Vec<_>>(),
        "server side: lost, duplicated or reordered"
    );
    assert_eq!(
        client_got,
        (0..N).collect::<Vec<_>>(),
        "client side: lost, duplicated or reordered"
    );
    assert!(resets >= 20, "only {resets} resets during the transfer");
    assert!(
        resumes * 10 >= resets * 8,
        "only {resumes} resumes for {resets} resets"
    );
    latencies.sort();
    println!(
        "{N} messages each way, {resets} resets, {resumes} resumes, resume latency median {:?} max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
}

async fn raw_resume(
    addr: SocketAddr,
    id: &str,
    session_id: u64,
    token: [u8; 16],
) -> (CloseCode, String) {
    let hello = Hello {
        client_id: id.into(),
        requested_heartbeat: Duration::ZERO,
        want_session: true,
        resume: Some(ResumeRequest {
            session_id,
            token,
            last_received: 0,
        }),
        credential: None,
    };
    let body = common::raw_first_frame(addr, hello).await;
    assert_eq!(body[0], 0x12, "expected REFUSE, got {body:?}");
    let code = CloseCode(u16::from_be_bytes([body[1], body[2]]));
    (code, String::from_utf8_lossy(&body[3..]).into_owned())
}

#[tokio::test]
async fn wrong_or_foreign_token_is_refused_and_does_not_disturb_the_session() {
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap()).policy(fast_policy(200, 1000));
    let mut srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let start = |id: &str| {
        let mut c = ClientConfig::new(addr, id);
        c.connect.policy = fast_policy(200, 1000);
        Client::start(c)
    };
    let mut alice = start("alice");
    let mut bob = start("bob");
    let grant = |ev: Option<ClientEvent>| match ev {
        Some(ClientEvent::Connected { welcome }) => welcome.session.expect("session granted"),
        other => panic!("{other:?}"),
    };
    let a = grant(alice.next_event().await);
    let b = grant(bob.next_event().await);
    assert_ne!(a.token, b.token);

    // Wrong token for alice's session id.
    let mut wrong = a.token;
    wrong[0] ^= 1;
    let (code, _) = raw_resume(addr, "alice", a.session_id, wrong).await;
    assert_eq!(code, CloseCode::SESSION_UNKNOWN);
    // Bob's (valid) session and token presented as alice.
    let (code, _) = raw_resume(addr, "alice", b.session_id, b.token).await;
    assert_eq!(code, CloseCode::SESSION_UNKNOWN);
    // Alice's id with bob's token.
    let (code, _) = raw_resume(addr, "alice", a.session_id, b.token).await;
    assert_eq!(code, CloseCode::SESSION_UNKNOWN);

    // Alice's real session is undisturbed: still connected, messages flow both ways.
    alice.send(Bytes::from_static(b"still mine")).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), srv.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::Message { client_id, msg, .. } => {
                assert_eq!(client_id, "alice");
                assert_eq!(&msg[..], b"still mine");
                break;
            }
            ServerEvent::Disconnected { client_id, .. } => panic!("{client_id} was disconnected"),
            _ => {}
        }
    }
    srv.send("alice", Bytes::from_static(b"yes")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), alice.next_event())
        .await
        .unwrap()
    {
        Some(ClientEvent::Message(m)) => assert_eq!(&m[..], b"yes"),
        other => panic!("{other:?}"),
    }
    let info = srv.client("alice").unwrap();
    assert_eq!(info.connects, 1, "no replacement happened");
    let _ = DisconnectReason::Replaced;
}

#[tokio::test]
async fn held_session_shows_resuming_then_offline_with_session_lost_at_the_linger_end() {
    let linger = Duration::from_millis(600);
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(200, 1000))
        .session_linger(Some(linger));
    let mut srv = Server::bind(cfg).await.unwrap();
    // A session client (raw, so nothing reconnects) that vanishes with an RST.
    let mut s = TcpStream::connect(srv.local_addr()).await.unwrap();
    let mut out = BytesMut::new();
    codec::encode_preamble(&mut out);
    let hello = Hello {
        client_id: "leaver".into(),
        requested_heartbeat: Duration::ZERO,
        want_session: true,
        resume: None,
        credential: None,
    };
    codec::encode(&Frame::Hello(hello), &mut out);
    s.write_all(&out).await.unwrap();
    let mut welcome = [0u8; 5 + 4 + 46];
    s.read_exact(&mut welcome).await.unwrap();
    assert_eq!(welcome[9], 0x11);
    assert_eq!(welcome[10], 0x01, "session granted");
    let mut presence = srv.subscribe();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let t0 = tokio::time::Instant::now();
    // While held, the server still accepts messages for the client (queued, not lost yet).
    let mut resuming_at = None;
    let mut offline_at = None;
    while offline_at.is_none() {
        let ch = tokio::time::timeout(Duration::from_secs(5), presence.recv())
            .await
            .unwrap()
            .unwrap();
        match ch.to {
            tether_proto::presence::PresenceState::Resuming { until, .. } => {
                let held_for = until.saturating_duration_since(ch.at);
                assert_eq!(held_for, linger, "held for exactly the linger");
                resuming_at = Some(tokio::time::Instant::now());
                srv.send("leaver", Bytes::from_static(b"queued while resuming"))
                    .await
                    .unwrap();
            }
            tether_proto::presence::PresenceState::Offline { .. } => {
                offline_at = Some(tokio::time::Instant::now());
            }
            _ => {}
        }
    }
    let resuming_at = resuming_at.expect("Resuming before Offline");
    let held = offline_at.unwrap() - resuming_at;
    assert!(
        held >= linger - Duration::from_millis(50) && held < linger * 3,
        "held {held:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The application is told what was lost: the message queued while resuming, never sent.
    loop {
        match tokio::time::timeout(Duration::from_secs(2), srv.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::SessionLost {
                client_id,
                unacked,
                unsent,
                ..
            } => {
                assert_eq!(client_id, "leaver");
                assert_eq!(unacked, None);
                assert_eq!(unsent, vec![Bytes::from_static(b"queued while resuming")]);
                break;
            }
            _ => continue,
        }
    }
}
