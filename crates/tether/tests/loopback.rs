//! Real loopback tests: disconnect reasons and detection bounds (loose two-sided bounds).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{fast_policy, raw_accept, raw_connect, Blackhole};
use tether::{Connection, DisconnectReason};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

fn within(d: Duration, lo: Duration, hi: Duration) -> bool {
    d >= lo && d <= hi
}

#[tokio::test]
async fn message_round_trip_and_orderly_close() {
    let policy = fast_policy(200, 1000);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = policy.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut conn, hello) = Connection::accept(s, &p).await.unwrap();
        assert_eq!(hello.client_id, "alice");
        let m = conn.recv().await.unwrap();
        conn.send(m).await.unwrap();
        conn.recv().await.unwrap_err()
    });
    let mut c = Connection::connect(addr, "alice", &policy).await.unwrap();
    assert_eq!(c.welcome().heartbeat, Duration::from_millis(200));
    assert_eq!(c.welcome().dead_after, Duration::from_millis(1000));
    c.send(Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(&c.recv().await.unwrap()[..], b"hello");
    c.close(tether::CloseCode::NORMAL, "bye");
    let d = server.await.unwrap();
    assert_eq!(
        d.reason,
        DisconnectReason::PeerClose {
            code: tether::CloseCode::NORMAL,
            text: "bye".into()
        }
    );
    let mine = c.closed().await;
    assert_eq!(mine.reason, DisconnectReason::LocalClose);
}

#[tokio::test]
async fn blackhole_both_sides_report_heartbeat_timeout_within_bound() {
    let (h, d) = (200u64, 1000u64);
    let policy = fast_policy(h, d);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = Blackhole::start(listener.local_addr().unwrap()).await;
    let p = policy.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Connection::accept(s, &p).await.unwrap();
        let err = conn.recv().await.unwrap_err();
        (err, Instant::now())
    });
    let mut c = Connection::connect(hole.addr, "bob", &policy)
        .await
        .unwrap();
    // Healthy for a while: heartbeats keep both sides up for several dead_after periods.
    tokio::time::sleep(Duration::from_millis(3 * d)).await;
    assert!(
        c.disconnected().is_none(),
        "idle but healthy connection must stay up"
    );
    hole.set(true);
    let t0 = Instant::now();
    let err = c.recv().await.unwrap_err();
    let client_elapsed = t0.elapsed();
    let (serr, st) = server.await.unwrap();
    let server_elapsed = st - t0;
    let dd = Duration::from_millis(d);
    let hi = dd + dd / 4;
    assert_eq!(err.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(serr.reason, DisconnectReason::HeartbeatTimeout);
    // Silence started at most one heartbeat interval before the blackhole went up.
    let lo = dd - Duration::from_millis(h);
    assert!(
        within(client_elapsed, lo, hi),
        "client detected after {client_elapsed:?}"
    );
    assert!(
        within(server_elapsed, lo, hi),
        "server detected after {server_elapsed:?}"
    );
    assert!(
        err.silent_for >= dd && err.silent_for <= hi,
        "silent_for {:?}",
        err.silent_for
    );
    assert!(
        serr.silent_for >= dd && serr.silent_for <= hi,
        "silent_for {:?}",
        serr.silent_for
    );
}

#[tokio::test]
async fn peer_fin_is_peer_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut s = raw_accept(&listener, 200, 1000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let mut c = Connection::connect(addr, "carol", &fast_policy(200, 1000))
        .await
        .unwrap();
    let err = c.recv().await.unwrap_err();
    assert_eq!(err.reason, DisconnectReason::PeerClosed);
    server.await.unwrap();
}

#[tokio::test]
async fn peer_abort_is_peer_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let s = raw_accept(&listener, 200, 1000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        tether::sockopt::set_abortive_close(&s).unwrap();
        drop(s);
    });
    let mut c = Connection::connect(addr, "dave", &fast_policy(200, 1000))
        .await
        .unwrap();
    let err = c.recv().await.unwrap_err();
    assert_eq!(err.reason, DisconnectReason::PeerReset);
    server.await.unwrap();
}

#[tokio::test]
async fn steady_traffic_sends_no_heartbeat() {
    let (h, d) = (200u64, 1000u64);
    let policy = fast_policy(h, d);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = policy.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Connection::accept(s, &p).await.unwrap();
        // Echo everything.
        while let Ok(m) = conn.recv().await {
            if conn.send(m).await.is_err() {
                break;
            }
        }
        conn.stats()
    });
    let mut c = Connection::connect(addr, "erin", &policy).await.unwrap();
    for _ in 0..40 {
        c.send(Bytes::from_static(b"tick")).await.unwrap();
        c.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(h / 4)).await;
    }
    let stats = c.stats();
    assert_eq!(
        stats.heartbeats_out, 0,
        "client sent heartbeats while data flowed: {stats:?}"
    );
    assert_eq!(stats.messages_out, 40);
    drop(c);
    let s = server.await.unwrap();
    assert_eq!(
        s.heartbeats_out, 0,
        "server sent heartbeats while data flowed: {s:?}"
    );
}

#[tokio::test]
async fn oversize_frame_is_protocol_error_before_allocation() {
    let policy = fast_policy(200, 1000);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = policy.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Connection::accept(s, &p).await.unwrap();
        conn.recv().await.unwrap_err()
    });
    let mut raw = raw_connect(addr, "mallory").await;
    // Announce a 2 GiB frame and send only a few bytes of it: the server must refuse on the
    // header alone, without waiting for (or reserving) the body.
    raw.write_all(&(2u32 << 30).to_be_bytes()).await.unwrap();
    raw.write_all(&[1, 2, 3]).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server did not close")
        .unwrap();
    match err.reason {
        DisconnectReason::ProtocolError(t) => assert!(t.contains("exceeds the maximum"), "{t}"),
        other => panic!("expected protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_burst_larger_than_the_transmit_high_water_mark_flows_without_waiting_for_a_timer() {
    // Regression: the driver stopped moving queued messages once 256 KiB were pending and only
    // resumed at the next timer (a heartbeat, 10 s here). 20,000 × 64 B is ~1.4 MB.
    let policy = tether::Policy::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = policy.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut conn, _) = Connection::accept(s, &p).await.unwrap();
        let mut n = 0;
        while n < 20_000 {
            conn.recv().await.unwrap();
            n += 1;
        }
        n
    });
    let c = Connection::connect(addr, "burst", &policy).await.unwrap();
    let t0 = Instant::now();
    for _ in 0..20_000 {
        c.send(Bytes::from_static(&[7u8; 64])).await.unwrap();
    }
    let n = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("stalled until a timer")
        .unwrap();
    assert_eq!(n, 20_000);
    assert!(t0.elapsed() < Duration::from_secs(5));
}
