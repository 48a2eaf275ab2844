//! `tether tunnel` over loopback: unmodified programs (plain `TcpStream`s) talk through
//! entry → exit while the path between them is reset or blackholed.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{fast_policy, Blackhole, Flaky};
use tether::tunnel::{EntryConfig, ExitConfig, TunnelEnd, TunnelEntry, TunnelEvent, TunnelExit};
use tether::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A deterministic pseudo-random byte stream (xorshift64*): the receiver regenerates it and
/// compares every byte, so a lost, duplicated or reordered byte is caught at its offset.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of stream `seed` in 8 KiB writes, pausing `pace` after every 256 KiB,
/// then half-closes.
async fn send_stream(mut w: impl AsyncWriteExt + Unpin, seed: u64, total: usize, pace: Duration) {
    let mut g = Stream(seed);
    let mut buf = vec![0u8; 8192];
    let mut sent = 0;
    while sent < total {
        let n = buf.len().min(total - sent);
        g.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.expect("app write failed");
        sent += n;
        if sent % (256 << 10) == 0 {
            tokio::time::sleep(pace).await;
        }
    }
    w.shutdown().await.expect("app shutdown failed");
}

/// Reads to EOF and checks every byte against stream `seed`; returns the count.
async fn check_stream(mut r: impl AsyncReadExt + Unpin, seed: u64) -> usize {
    let mut g = Stream(seed);
    let mut buf = vec![0u8; 8192];
    let mut want = vec![0u8; 8192];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.expect("app read failed");
        if n == 0 {
            return got;
        }
        let mut off = 0;
        while off < n {
            // Keep alignment on 8-byte words of the stream.
            let start = got % 8;
            let take = (8 - start).min(n - off);
            if start == 0 {
                g.fill(&mut want[..8]);
            }
            assert_eq!(
                &buf[off..off + take],
                &want[start..start + take],
                "stream {seed:#x} differs at byte {got}"
            );
            off += take;
            got += take;
        }
    }
}

fn exit_cfg(target: SocketAddr, h_ms: u64, d_ms: u64, linger: Duration) -> ExitConfig {
    let mut cfg = ExitConfig::new("127.0.0.1:0".parse().unwrap(), target);
    cfg.server = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(h_ms, d_ms))
        .session_linger(Some(linger));
    cfg
}

fn entry_cfg(relay: SocketAddr, h_ms: u64, d_ms: u64, linger: Duration) -> EntryConfig {
    let mut cfg = EntryConfig::new("127.0.0.1:0".parse().unwrap(), relay);
    cfg.policy = fast_policy(h_ms, d_ms);
    cfg.linger = linger;
    cfg
}

type Ended = (TunnelEnd, u64, u64, u32);

fn ended(ev: Option<TunnelEvent>) -> Option<Ended> {
    match ev {
        Some(TunnelEvent::Closed {
            end,
            bytes_from_app,
            bytes_to_app,
            outages,
            ..
        }) => Some((end, bytes_from_app, bytes_to_app, outages)),
        None => panic!("events ended before Closed"),
        _ => None,
    }
}

async fn next_closed_entry(e: &mut TunnelEntry) -> Ended {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), e.next_event())
            .await
            .expect("no entry event");
        if let Some(x) = ended(ev) {
            return x;
        }
    }
}

async fn next_closed_exit(e: &mut TunnelExit) -> Ended {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), e.next_event())
            .await
            .expect("no exit event");
        if let Some(x) = ended(ev) {
            return x;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_each_way_survive_repeated_resets() {
    const TOTAL: usize = 10 << 20;
    // Paced so the transfer spans many resets (40 pauses: about 3 s).
    const PACE: Duration = Duration::from_millis(75);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let mut exit = TunnelExit::bind(exit_cfg(target_addr, 200, 1000, Duration::from_secs(10)))
        .await
        .unwrap();
    let flaky = Flaky::start(exit.local_addr()).await;
    let mut entry = TunnelEntry::bind(entry_cfg(flaky.addr, 200, 1000, Duration::from_secs(10)))
        .await
        .unwrap();

    // The "server" program: checks what arrives, sends its own stream back, both at once.
    let server = tokio::spawn(async move {
        let (s, _) = target.accept().await.unwrap();
        let (r, w) = s.into_split();
        let rx = tokio::spawn(check_stream(r, 0xC11E47));
        send_stream(w, 0x5E4E4, TOTAL, PACE).await;
        rx.await.unwrap()
    });
    // The "client" program.
    let app = TcpStream::connect(entry.local_addr()).await.unwrap();
    let (r, w) = app.into_split();
    let client_rx = tokio::spawn(check_stream(r, 0x5E4E4));
    let client_tx = tokio::spawn(send_stream(w, 0xC11E47, TOTAL, PACE));

    // The chaos: reset the tether connection every 150 ms until both ends have everything.
    let chaos = tokio::spawn(async move {
        let mut resets = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if flaky.reset_all() > 0 {
                resets += 1;
            }
            if resets >= 60 {
                return resets;
            }
        }
    });
    let deadline = Duration::from_secs(60);
    let got_by_server = tokio::time::timeout(deadline, server)
        .await
        .expect("server side stuck")
        .unwrap();
    let got_by_client = tokio::time::timeout(deadline, client_rx)
        .await
        .expect("client side stuck")
        .unwrap();
    client_tx.await.unwrap();
    let resets_so_far = chaos.is_finished();
    chaos.abort();
    assert_eq!(got_by_server, TOTAL, "server got everything, in order");
    assert_eq!(got_by_client, TOTAL, "client got everything, in order");

    let (end, from_app, to_app, outages) = next_closed_entry(&mut entry).await;
    assert_eq!(end, TunnelEnd::Closed, "entry ended in order");
    assert_eq!((from_app, to_app), (TOTAL as u64, TOTAL as u64));
    let (xend, xfrom, xto, _) = next_closed_exit(&mut exit).await;
    assert_eq!(xend, TunnelEnd::Closed, "exit ended in order");
    assert_eq!((xfrom, xto), (TOTAL as u64, TOTAL as u64));
    assert!(
        outages >= 3,
        "only {outages} outages during the transfer (chaos finished: {resets_so_far})"
    );
    println!("10 MiB each way through {outages} resets of the tether connection");
}

#[tokio::test]
async fn half_close_travels_and_the_other_direction_keeps_flowing() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut exit = TunnelExit::bind(exit_cfg(
        target.local_addr().unwrap(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let mut entry = TunnelEntry::bind(entry_cfg(
        exit.local_addr(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        // The request, up to the client's half-close.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        // The response comes after the EOF, in pieces.
        for part in [&b"one "[..], b"two ", b"three"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(part).await.unwrap();
        }
        s.shutdown().await.unwrap();
        req
    });
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"request").await.unwrap();
    app.shutdown().await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut resp))
        .await
        .expect("response never ended")
        .expect("read failed");
    assert_eq!(resp, b"one two three");
    assert_eq!(server.await.unwrap(), b"request");
    let (end, from_app, to_app, _) = next_closed_entry(&mut entry).await;
    assert_eq!((end, from_app, to_app), (TunnelEnd::Closed, 7, 13));
    let (end, from_app, to_app, _) = next_closed_exit(&mut exit).await;
    assert_eq!((end, from_app, to_app), (TunnelEnd::Closed, 13, 7));
}

/// Reads until the connection ends; the error kind, or `None` for a clean EOF.
async fn read_until_end(s: &mut TcpStream) -> Option<ErrorKind> {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(e.kind()),
        }
    }
}

#[tokio::test]
async fn path_down_longer_than_the_linger_resets_both_application_connections() {
    let linger = Duration::from_secs(1);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut exit = TunnelExit::bind(exit_cfg(target.local_addr().unwrap(), 100, 500, linger))
        .await
        .unwrap();
    let hole = Blackhole::start(exit.local_addr()).await;
    let mut entry = TunnelEntry::bind(entry_cfg(hole.addr, 100, 500, linger))
        .await
        .unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"ping").await.unwrap();
    let (mut srv, _) = tokio::time::timeout(Duration::from_secs(5), target.accept())
        .await
        .unwrap()
        .unwrap();
    let mut b = [0u8; 4];
    srv.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");

    hole.set(true);
    let cut = Instant::now();
    let (client_end, server_end) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(read_until_end(&mut app), read_until_end(&mut srv))
    })
    .await
    .expect("an application connection stayed open");
    let took = cut.elapsed();
    assert_eq!(
        client_end,
        Some(ErrorKind::ConnectionReset),
        "client side got RST"
    );
    assert_eq!(
        server_end,
        Some(ErrorKind::ConnectionReset),
        "server side got RST"
    );
    // Not before the path was dead for the linger; within detection + linger + slack.
    assert!(took >= linger, "reset after {took:?}, before the linger");
    assert!(took < Duration::from_secs(6), "reset only after {took:?}");
    let (end, ..) = next_closed_entry(&mut entry).await;
    assert!(matches!(end, TunnelEnd::PathLost(_)), "{end:?}");
    let (end, ..) = next_closed_exit(&mut exit).await;
    assert!(matches!(end, TunnelEnd::PathLost(_)), "{end:?}");
}

#[tokio::test]
async fn a_silent_outage_within_the_linger_loses_nothing() {
    let linger = Duration::from_secs(5);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut exit = TunnelExit::bind(exit_cfg(target.local_addr().unwrap(), 100, 500, linger))
        .await
        .unwrap();
    let hole = Blackhole::start(exit.local_addr()).await;
    let mut entry = TunnelEntry::bind(entry_cfg(hole.addr, 100, 500, linger))
        .await
        .unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"before ").await.unwrap();
    let (mut srv, _) = target.accept().await.unwrap();
    let mut b = [0u8; 7];
    srv.read_exact(&mut b).await.unwrap();

    // 1.5 s of silence (three times dead_after), written into on both sides meanwhile.
    hole.set(true);
    app.write_all(b"during ").await.unwrap();
    srv.write_all(b"reply during ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hole.set(false);
    app.write_all(b"after").await.unwrap();
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), srv.read_to_end(&mut rest))
        .await
        .expect("server side stuck")
        .unwrap();
    assert_eq!(rest, b"during after");
    srv.write_all(b"and after").await.unwrap();
    srv.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut got))
        .await
        .expect("client side stuck")
        .unwrap();
    assert_eq!(got, b"reply during and after");
    let (end, _, _, outages) = next_closed_entry(&mut entry).await;
    assert_eq!(end, TunnelEnd::Closed);
    let (end, ..) = next_closed_exit(&mut exit).await;
    assert_eq!(end, TunnelEnd::Closed);
    assert!(outages >= 1, "the outage was noticed and ridden out");
}

#[tokio::test]
async fn an_application_reset_is_forwarded_as_a_reset() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exit = TunnelExit::bind(exit_cfg(
        target.local_addr().unwrap(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let mut entry = TunnelEntry::bind(entry_cfg(
        exit.local_addr(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();

    // Client resets: the server program sees a reset.
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"x").await.unwrap();
    let (mut srv, _) = target.accept().await.unwrap();
    let mut b = [0u8; 1];
    srv.read_exact(&mut b).await.unwrap();
    tether::sockopt::set_abortive_close(&app).unwrap();
    drop(app);
    let end = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut srv))
        .await
        .expect("server side never ended");
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    let (end, ..) = next_closed_entry(&mut entry).await;
    assert!(matches!(end, TunnelEnd::LocalReset(_)), "{end:?}");

    // Server resets: the client program sees a reset.
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"y").await.unwrap();
    let (mut srv, _) = target.accept().await.unwrap();
    srv.read_exact(&mut b).await.unwrap();
    tether::sockopt::set_abortive_close(&srv).unwrap();
    drop(srv);
    let end = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut app))
        .await
        .expect("client side never ended");
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    let (end, ..) = next_closed_entry(&mut entry).await;
    assert!(matches!(end, TunnelEnd::PeerAborted(_)), "{end:?}");
}

#[tokio::test]
async fn an_unreachable_target_resets_the_application_connection() {
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let exit = TunnelExit::bind(exit_cfg(dead_addr, 200, 1000, Duration::from_secs(5)))
        .await
        .unwrap();
    let mut entry = TunnelEntry::bind(entry_cfg(
        exit.local_addr(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut app))
        .await
        .expect("client side never ended");
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    let (end, ..) = next_closed_entry(&mut entry).await;
    match end {
        TunnelEnd::PeerAborted(why) => assert!(why.contains("cannot connect"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_stalls_the_writer_at_the_other_end() {
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Small receive buffers at the target, small send buffers at the program: what stays in
    // flight is the tunnel's own buffering plus the tunnel's two sockets.
    socket2::SockRef::from(&target)
        .set_recv_buffer_size(64 << 10)
        .unwrap();
    target.set_nonblocking(true).unwrap();
    let target = TcpListener::from_std(target).unwrap();
    let exit = TunnelExit::bind(exit_cfg(
        target.local_addr().unwrap(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let entry = TunnelEntry::bind(entry_cfg(
        exit.local_addr(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let app = TcpStream::connect(entry.local_addr()).await.unwrap();
    socket2::SockRef::from(&app)
        .set_send_buffer_size(64 << 10)
        .unwrap();
    let (srv, _) = target.accept().await.unwrap();

    // The server program does not read. The client program writes until a write has been
    // stuck for half a second.
    const ATTEMPT: usize = 64 << 20;
    let (r, mut w) = app.into_split();
    let mut g = Stream(0xB0B);
    let mut buf = vec![0u8; 64 << 10];
    let mut written = 0usize;
    // Offset into `buf` of the first byte not yet written.
    let mut off = buf.len();
    'fill: while written < ATTEMPT {
        if off == buf.len() {
            g.fill(&mut buf);
            off = 0;
        }
        // One `write` at a time: a timed-out `write` has written nothing.
        match tokio::time::timeout(Duration::from_millis(500), w.write(&buf[off..])).await {
            Ok(r) => {
                let n = r.unwrap();
                off += n;
                written += n;
            }
            Err(_) => break 'fill,
        }
    }
    // Besides the tunnel's window, only kernel buffers hold the rest: the entry's receive
    // side and the exit's send side autotune up to the `tcp_rmem` / `tcp_wmem` maxima.
    let max_of = |f: &str| -> usize {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(8 << 20)
    };
    let bound = max_of("/proc/sys/net/ipv4/tcp_rmem")
        + max_of("/proc/sys/net/ipv4/tcp_wmem")
        + tether::tunnel::WINDOW as usize
        + (2 << 20);
    assert!(
        written < bound.min(ATTEMPT / 2),
        "the program wrote {written} bytes (bound {bound}) into a reader that never reads"
    );
    // Now the server reads: everything arrives, in order, and the rest of the stream too.
    let reader = tokio::spawn(check_stream(srv, 0xB0B));
    w.write_all(&buf[off..]).await.unwrap();
    let stalled_at = written;
    let mut total = written + (buf.len() - off);
    while total < 24 << 20 {
        g.fill(&mut buf);
        w.write_all(&buf).await.unwrap();
        total += buf.len();
    }
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("stuck after the reader resumed")
        .unwrap();
    assert_eq!(got, total);
    drop(r);
    println!(
        "stalled after {stalled_at} bytes (window {} bytes)",
        tether::tunnel::WINDOW
    );
}

#[tokio::test]
async fn stopping_the_entry_resets_both_application_connections() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exit = TunnelExit::bind(exit_cfg(
        target.local_addr().unwrap(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let mut entry = TunnelEntry::bind(entry_cfg(
        exit.local_addr(),
        200,
        1000,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let mut app = TcpStream::connect(entry.local_addr()).await.unwrap();
    app.write_all(b"z").await.unwrap();
    let (mut srv, _) = target.accept().await.unwrap();
    let mut b = [0u8; 1];
    srv.read_exact(&mut b).await.unwrap();
    entry.shutdown();
    let (a, s) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(read_until_end(&mut app), read_until_end(&mut srv))
    })
    .await
    .expect("an application connection stayed open");
    assert_eq!(a, Some(ErrorKind::ConnectionReset));
    assert_eq!(s, Some(ErrorKind::ConnectionReset));
    let (end, ..) = next_closed_entry(&mut entry).await;
    assert_eq!(end, TunnelEnd::Shutdown);
}
