//! The server's edges over real loopback (loose two-sided bounds): one client that never
//! reads, idle floods, the same id twice, partial frames, and what clients are told.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::{fast_policy, raw_connect};
use tether::{
    Client, ClientConfig, ClientEvent, ConnectError, Connection, DisconnectReason, Server,
    ServerConfig, ServerEvent,
};
use tether_proto::backoff::BackoffConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn addr0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn numbered(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u64(i);
    b.freeze()
}

/// Two clients with one id: the newest wins once, the replaced one stops with a terminal
/// event that names what may be missing, nobody fights back, and every message the replaced
/// client sent either arrived or is named as possibly missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_with_one_id_replace_once_and_lose_nothing() {
    let cfg = ServerConfig::new(addr0())
        .policy(fast_policy(200, 1000))
        .session_linger(Some(Duration::from_secs(10)));
    let mut srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let start = |seed| {
        let mut c = ClientConfig::new(addr, "alice");
        c.connect.policy = fast_policy(200, 1000);
        c.seed = Some(seed);
        c.backoff = BackoffConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            max_attempts: None,
        };
        Client::start(c)
    };
    let mut a = start(1);
    assert!(matches!(
        a.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));
    // A sends numbered messages until it is stopped.
    let sender = a.sender();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    let sending = tokio::spawn(async move {
        let mut sent = 0u64;
        while sender.send(numbered(sent)).await.is_ok() {
            sent += 1;
            counted.store(sent, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sent
    });
    // B arrives while A is in the middle of sending.
    while count.load(std::sync::atomic::Ordering::Relaxed) < 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut b = start(2);
    assert!(matches!(
        b.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));
    // A: replaced, then stopped — nothing else.
    let (unacked, unsent) = loop {
        match tokio::time::timeout(Duration::from_secs(5), a.next_event())
            .await
            .expect("the replaced client said nothing")
        {
            Some(ClientEvent::Disconnected { disconnect }) => {
                assert_eq!(disconnect.reason, DisconnectReason::Replaced)
            }
            Some(ClientEvent::GaveUp {
                reason,
                unacked,
                unsent,
            }) => {
                assert_eq!(reason, DisconnectReason::Replaced);
                break (unacked, unsent);
            }
            Some(ClientEvent::Message(_)) => {}
            other => panic!("the replaced client did {other:?}"),
        }
    };
    let sent = sending.await.unwrap();
    assert!(
        sent > 20,
        "only {sent} messages sent before the replacement"
    );
    // Watch the server for a while: exactly one replacement.
    let mut connected = Vec::new();
    let mut got = Vec::new();
    let quiet = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) = tokio::time::timeout_at(quiet, srv.next_event()).await {
        match ev {
            ServerEvent::Connected { replaced, .. } => connected.push(replaced),
            ServerEvent::Message { msg, .. } => {
                got.push(u64::from_be_bytes(msg[..8].try_into().unwrap()))
            }
            _ => {}
        }
    }
    assert_eq!(connected.len(), 2, "{connected:?}");
    assert_eq!(connected[0], None);
    assert!(
        connected[1].is_some(),
        "the second connection replaced the first"
    );
    // B is still on.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), b.next_event())
            .await
            .is_err()
    );
    // No message of A's silently lost: received, or named (seq = index + 1), or unsent.
    let received: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(received.len(), got.len(), "duplicates");
    let unsent: HashSet<u64> = unsent
        .iter()
        .map(|m| u64::from_be_bytes(m[..8].try_into().unwrap()))
        .collect();
    for i in 0..sent {
        let named = unacked.as_ref().is_some_and(|r| r.contains(&(i + 1)));
        assert!(
            received.contains(&i) || named || unsent.contains(&i),
            "message {i} neither arrived nor was named (unacked {unacked:?})"
        );
    }
    println!(
        "{sent} sent, {} received, unacked {unacked:?}, {} unsent",
        got.len(),
        unsent.len()
    );
}

/// A client that sends 64 KiB messages to an echo server and never reads is closed as a
/// slow consumer; meanwhile other clients' echoes flow and new clients connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_as_slow_consumer_and_others_are_served() {
    let cfg = ServerConfig::new(addr0())
        .policy(fast_policy(300, 3000))
        .outbox_bytes(512 * 1024);
    let mut srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let handle = srv.handle();
    let (hog_tx, hog_rx) = tokio::sync::oneshot::channel();
    // The application: echo, never waiting on a client.
    tokio::spawn(async move {
        let mut hog_tx = Some(hog_tx);
        while let Some(ev) = srv.next_event().await {
            match ev {
                ServerEvent::Message { client_id, msg, .. } => {
                    let _ = handle.try_send(&client_id, msg);
                }
                ServerEvent::Disconnected {
                    client_id,
                    disconnect,
                    ..
                } if client_id == "hog" => {
                    if let Some(tx) = hog_tx.take() {
                        let _ = tx.send((disconnect.reason, Instant::now()));
                    }
                }
                _ => {}
            }
        }
    });
    let mut echo = Connection::connect(addr, "echo", &fast_policy(300, 3000))
        .await
        .unwrap();
    // The hog: 64 KiB DATA frames, forever, never reading.
    let mut hog = raw_connect(addr, "hog").await;
    let started = Instant::now();
    tokio::spawn(async move {
        let mut frame = BytesMut::new();
        tether_proto::codec::encode_data(&vec![7u8; 64 * 1024], &mut frame);
        while hog.write_all(&frame).await.is_ok() {}
        // Keep the socket (and its unread bytes) until the test ends.
        std::future::pending::<()>().await;
    });
    let mut rtts = Vec::new();
    for i in 0..60u64 {
        let t = Instant::now();
        echo.send(numbered(i)).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), echo.recv())
            .await
            .expect("echo stalled")
            .unwrap();
        assert_eq!(m, numbered(i));
        rtts.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let _late = Connection::connect(addr, "late", &fast_policy(300, 3000))
        .await
        .unwrap();
    let connect_time = t.elapsed();
    let (reason, at) = tokio::time::timeout(Duration::from_secs(10), hog_rx)
        .await
        .expect("the hog was never closed")
        .unwrap();
    assert_eq!(reason, DisconnectReason::SlowConsumer);
    rtts.sort();
    let p99 = rtts[rtts.len() * 99 / 100];
    println!(
        "echo rtt median {:?} p99 {p99:?}; new client connected in {connect_time:?}; hog closed after {:?}",
        rtts[rtts.len() / 2],
        at - started
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(connect_time < Duration::from_secs(2), "{connect_time:?}");
}

/// 5,000 sockets that never say HELLO do not lock out a real client: the handshake has its
/// own cap, and the oldest silent socket makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_lock_out_a_real_client() {
    let cfg = ServerConfig::new(addr0()).policy(fast_policy(300, 3000));
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let mut silent = Vec::with_capacity(5000);
    for _ in 0..5000 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let t = Instant::now();
    let real = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(addr, "real", &fast_policy(300, 3000)),
    )
    .await
    .expect("the real client was locked out")
    .unwrap();
    let took = t.elapsed();
    let m = srv.metrics();
    println!(
        "5000 silent sockets held; a real client connected in {took:?}; {} in the handshake, {} open",
        m.handshaking, m.connections
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(m.handshaking <= srv.config().get_max_handshakes());
    assert!(real.disconnected().is_none());
    drop(silent);
}

/// One address is capped; another is not.
#[tokio::test]
async fn connections_per_source_are_capped() {
    let cfg = ServerConfig::new(addr0())
        .policy(fast_policy(300, 3000))
        .max_connections_per_source(4);
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let closed_at_once = |mut s: TcpStream| async move {
        let mut b = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    };
    let fifth = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_at_once(fifth).await,
        "a fifth connection from one address"
    );
    let other = TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = other.connect(addr).await.unwrap();
    assert!(
        !closed_at_once(other).await,
        "another address is not capped"
    );
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = TcpStream::connect(addr).await.unwrap();
    assert!(!closed_at_once(again).await, "room again once one closed");
}

/// 1,000 connections each sending a frame one byte short of the maximum stay within the
/// server's partial-frame budget; once they are gone, the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_partial_frames_stay_within_the_budget() {
    const MAX: u32 = 64 * 1024;
    const BUDGET: usize = 4 << 20;
    let cfg = ServerConfig::new(addr0())
        .policy(fast_policy(300, 3000))
        .max_frame_len(MAX)
        .max_partial_frame_bytes(BUDGET);
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let mut frame = BytesMut::new();
    tether_proto::codec::encode_data(&vec![1u8; MAX as usize - 1], &mut frame);
    let short = frame.split_to(frame.len() - 1).freeze();
    let mut socks = Vec::new();
    for i in 0..1000 {
        socks.push(raw_connect(addr, &format!("big{i}")).await);
    }
    let mut writers = Vec::new();
    for mut s in socks {
        let short = short.clone();
        writers.push(tokio::spawn(async move {
            let _ = s.write_all(&short).await;
            std::future::pending::<()>().await;
        }));
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        peak = peak.max(srv.metrics().partial_frame_bytes);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "1000 frames of {} KiB one byte short: peak {} KiB of partial frames, budget {} KiB",
        MAX / 1024,
        peak / 1024,
        BUDGET / 1024
    );
    assert!(peak <= BUDGET, "peak {peak}");
    assert!(peak >= BUDGET / 2, "the budget was not used: {peak}");
    for w in writers {
        w.abort();
    }
    let t = Instant::now();
    while srv.metrics().partial_frame_bytes > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", srv.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the server serves again.
    let c = Connection::connect(addr, "after", &fast_policy(300, 3000))
        .await
        .unwrap();
    assert!(c.disconnected().is_none());
}

/// A client that left still shows what its last connection did (the status page showed 0).
#[tokio::test]
async fn a_disconnected_clients_counters_are_kept() {
    let mut srv = Server::bind(ServerConfig::new(addr0()).policy(fast_policy(300, 3000)))
        .await
        .unwrap();
    let c = Connection::connect(srv.local_addr(), "counted", &fast_policy(300, 3000))
        .await
        .unwrap();
    for i in 0..3 {
        c.send(numbered(i)).await.unwrap();
    }
    c.close(tether::CloseCode::NORMAL, "bye");
    loop {
        if let Some(ServerEvent::Disconnected { .. }) = srv.next_event().await {
            break;
        }
    }
    let info = srv.client("counted").unwrap();
    assert!(!info.state.is_connected());
    let stats = info.stats.expect("the last connection's counters");
    assert_eq!(stats.messages_in, 3);
    assert!(stats.bytes_in > 0);
    assert!(stats.last_rx.is_some());
}

/// Talking to something that is not a tether server says so in words.
#[tokio::test]
async fn a_server_that_is_not_tether_is_named_in_words() {
    let l = tokio::net::TcpListener::bind(addr0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 256];
        let _ = s.read(&mut b).await;
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    match Connection::connect(addr, "lost", &fast_policy(300, 3000)).await {
        Err(ConnectError::Handshake(DisconnectReason::ProtocolError(t))) => {
            assert_eq!(t, "not a tether server (it answered like HTTP)")
        }
        other => panic!("{other:?}"),
    }
}

/// Nothing listening: the client reports `connect-refused`, not `peer-reset`.
#[tokio::test]
async fn a_refused_connect_is_connect_refused() {
    let l = std::net::TcpListener::bind(addr0()).unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut c = Client::start(ClientConfig::new(addr, "nobody-home"));
    match c.next_event().await {
        Some(ClientEvent::Disconnected { disconnect }) => {
            assert_eq!(disconnect.reason, DisconnectReason::ConnectRefused);
            assert_eq!(disconnect.reason.label(), "connect-refused");
        }
        other => panic!("{other:?}"),
    }
}

/// Shutdown returns as soon as the last connection ended (it waits by notification).
#[tokio::test]
async fn shutdown_returns_when_the_last_connection_ended() {
    let srv = Server::bind(ServerConfig::new(addr0()).policy(fast_policy(300, 3000)))
        .await
        .unwrap();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(
            Connection::connect(srv.local_addr(), &format!("c{i}"), &fast_policy(300, 3000))
                .await
                .unwrap(),
        );
    }
    let t = Instant::now();
    srv.shutdown(Duration::from_secs(10)).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(srv.metrics().connections, 0);
    for c in &clients {
        assert!(matches!(
            c.closed().await.reason,
            DisconnectReason::PeerClose {
                code: tether::CloseCode::GOING_AWAY,
                ..
            }
        ));
    }
}

/// `send` gives back-pressure: it waits (at most `send_wait`) for a client that is briefly
/// slow, so nothing is lost; a client that stays slow past `send_wait` is closed as a slow
/// consumer. `try_send` never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_for_a_briefly_slow_client_and_closes_one_that_stays_slow() {
    let cfg = ServerConfig::new(addr0())
        .policy(fast_policy(300, 3000))
        .outbox_bytes(64 * 1024)
        .send_wait(Duration::from_millis(500));
    let mut srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let handle = srv.handle();
    // Briefly slow: reads nothing for 200 ms, then everything.
    let mut slow = Connection::connect(addr, "brief", &fast_policy(300, 3000))
        .await
        .unwrap();
    let msg = Bytes::from(vec![3u8; 16 * 1024]);
    const N: usize = 512; // 8 MiB: more than the kernel's socket buffers hold
    let reader = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..N {
            slow.recv().await.unwrap();
        }
        slow
    });
    let t = Instant::now();
    for _ in 0..N {
        handle.send("brief", msg.clone()).await.unwrap();
    }
    let slow = reader.await.unwrap();
    assert!(slow.disconnected().is_none());
    println!(
        "8 MiB to a client that paused 200 ms: sent in {:?}",
        t.elapsed()
    );
    // Stays slow: never reads.
    let mut stuck = raw_connect(addr, "stuck").await;
    let t = Instant::now();
    let err = loop {
        if let Err(e) = handle.send("stuck", msg.clone()).await {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never gave up");
    };
    assert!(matches!(err, tether::SendError::SlowConsumer(_)), "{err}");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), srv.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::Disconnected {
                client_id,
                disconnect,
                ..
            } if client_id == "stuck" => {
                assert_eq!(disconnect.reason, DisconnectReason::SlowConsumer);
                break;
            }
            _ => {}
        }
    }
    let mut b = [0u8; 1];
    let _ = stuck.read(&mut b).await;
}
