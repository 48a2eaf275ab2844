//! A session moves between two servers on loopback (what a cluster does when a client's
//! reconnect lands on another node): `take_session` on the old one, a `SessionSource` or
//! `import_session` on the new one, exactly-once both ways across the move.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::fast_policy;
use tether::auth::resume::TokenHash;
use tether::server::SendError;
use tether::{
    Client, ClientConfig, ClientEvent, CloseCode, DisconnectReason, PresenceState, Server,
    ServerConfig, ServerEvent, ServerHandle, SessionFetch, SessionRequest, SessionSource,
};
use tether_proto::backoff::BackoffConfig;
use tether_proto::codec::{self, Frame, Hello, ResumeRequest};
use tokio::net::{TcpListener, TcpStream};

fn numbered(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(32);
    b.put_u64(i);
    b.put_slice(&[0xCD; 24]);
    b.freeze()
}

fn number(m: &[u8]) -> u64 {
    u64::from_be_bytes(m[..8].try_into().unwrap())
}

/// The new server's source: takes the session from the old server in-process.
struct FromServer(ServerHandle);

impl SessionSource for FromServer {
    fn fetch(&self, req: SessionRequest) -> SessionFetch {
        let old = self.0.clone();
        SessionFetch::new(async move { old.take_session(&req, Duration::from_secs(2)).await })
    }
}

/// A load balancer in miniature: forwards to the current upstream; `switch` changes the
/// upstream and resets every connection through it on the client's side. With `half_open`,
/// the server's side of each connection is kept open and silent (a path that died without
/// telling the server: it still holds the connection, attached).
struct Switch {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    cut: Arc<tokio::sync::Notify>,
    half_open: Arc<std::sync::atomic::AtomicBool>,
    zombies: Arc<Mutex<Vec<TcpStream>>>,
}

impl Switch {
    async fn start(upstream: SocketAddr) -> Switch {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let cut = Arc::new(tokio::sync::Notify::new());
        let half_open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let zombies: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, cut2, half2, z2) = (
            upstream.clone(),
            cut.clone(),
            half_open.clone(),
            zombies.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let to = *up2.lock().unwrap();
                let Ok(mut up) = TcpStream::connect(to).await else {
                    continue;
                };
                socket2::SockRef::from(&down)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                let (cut, half, z) = (cut2.clone(), half2.clone(), z2.clone());
                tokio::spawn(async move {
                    let cutting = cut.notified();
                    tokio::pin!(cutting);
                    cutting.as_mut().enable();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cutting => {
                            if half.load(std::sync::atomic::Ordering::SeqCst) {
                                z.lock().unwrap().push(up);
                            } else {
                                socket2::SockRef::from(&up)
                                    .set_linger(Some(Duration::ZERO))
                                    .unwrap();
                            }
                        }
                    }
                });
            }
        });
        Switch {
            addr,
            upstream,
            cut,
            half_open,
            zombies,
        }
    }

    fn switch(&self, to: SocketAddr, half_open: bool) {
        self.half_open
            .store(half_open, std::sync::atomic::Ordering::SeqCst);
        *self.upstream.lock().unwrap() = to;
        self.cut.notify_waiters();
    }
}

fn server_cfg() -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(200, 1000))
        .session_linger(Some(Duration::from_secs(10)))
}

fn client_cfg(addr: SocketAddr, id: &str) -> ClientConfig {
    let mut c = ClientConfig::new(addr, id);
    c.connect.policy = fast_policy(200, 1000);
    c.backoff = BackoffConfig {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(50),
        max_attempts: None,
    };
    c.seed = Some(3);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_another_server_exactly_once_both_ways() {
    let took = move_mid_stream(false).await;
    assert!(took < Duration::from_secs(2), "resume took {took:?}");
}

/// The old server has not noticed the path's death (its connection is still attached, and
/// it would not declare it dead for 5 s): the take closes it and waits for its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_still_attached_on_the_old_server_moves_when_it_is_closed() {
    let took = move_mid_stream(true).await;
    assert!(
        took < Duration::from_secs(2),
        "resume took {took:?}: the old server's own detection (5 s) did it, not the take"
    );
}

/// Streams both ways through a switch to A, moves the client to B mid-stream, checks
/// exactly-once in order both ways; returns how long the resume took after the cut.
async fn move_mid_stream(half_open: bool) -> Duration {
    const N: u64 = 2000;
    let a_cfg = if half_open {
        // Slow to notice a dead path: the session is still attached when B asks for it.
        server_cfg().policy(fast_policy(1000, 5000))
    } else {
        server_cfg()
    };
    let mut a = Server::bind(a_cfg).await.unwrap();
    let mut b = Server::bind(server_cfg().session_source(Arc::new(FromServer(a.handle()))))
        .await
        .unwrap();
    let lb = Switch::start(a.local_addr()).await;
    let mut client = Client::start(client_cfg(lb.addr, "mover"));
    assert!(matches!(
        client.next_event().await,
        Some(ClientEvent::Connected { .. })
    ));

    // Server → client: through whichever server holds the client (A until it refuses, then
    // B); every message accepted by one of them exactly once.
    let (ha, hb) = (a.handle(), b.handle());
    let server_sender = tokio::spawn(async move {
        let mut on_b = false;
        for i in 0..N {
            if i % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            loop {
                let h = if on_b { &hb } else { &ha };
                match h.send("mover", numbered(i)).await {
                    Ok(()) => break,
                    Err(SendError::NotConnected(_)) if !on_b => on_b = true,
                    // Between the take on A and the import on B.
                    Err(SendError::NotConnected(_) | SendError::Backlogged(_)) => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(e) => panic!("message {i}: {e}"),
                }
            }
        }
    });
    let c2 = client.sender();
    let client_sender = tokio::spawn(async move {
        for i in 0..N {
            if i % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            c2.send(numbered(i)).await.unwrap();
        }
    });

    let (mut a_got, mut b_got, mut client_got) = (Vec::new(), Vec::new(), Vec::new());
    let mut switched: Option<Instant> = None;
    let mut resumed_after = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while a_got.len() + b_got.len() < N as usize || client_got.len() < N as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck: A {} B {} client {}",
            a_got.len(),
            b_got.len(),
            client_got.len()
        );
        if switched.is_none() && client_got.len() as u64 >= N / 3 {
            lb.switch(b.local_addr(), half_open);
            switched = Some(Instant::now());
        }
        tokio::select! {
            ev = a.next_event() => match ev.unwrap() {
                ServerEvent::Message { msg, .. } => a_got.push(number(&msg)),
                ServerEvent::SessionLost { .. } => panic!("session lost on A"),
                _ => {}
            },
            ev = b.next_event() => match ev.unwrap() {
                ServerEvent::Message { msg, .. } => b_got.push(number(&msg)),
                ServerEvent::SessionLost { .. } => panic!("session lost on B"),
                _ => {}
            },
            ev = client.next_event() => match ev.unwrap() {
                ClientEvent::Message(m) => client_got.push(number(&m)),
                ClientEvent::Resumed { .. } => {
                    resumed_after = switched.map(|t| t.elapsed());
                }
                ClientEvent::SessionLost { unacked } => panic!("client: session lost {unacked:?}"),
                ClientEvent::GaveUp { reason, .. } => panic!("gave up: {reason}"),
                _ => {}
            },
        }
    }
    server_sender.await.unwrap();
    client_sender.await.unwrap();
    let server_got: Vec<u64> = a_got.iter().chain(&b_got).copied().collect();
    assert_eq!(server_got, (0..N).collect::<Vec<_>>(), "client → servers");
    assert_eq!(client_got, (0..N).collect::<Vec<_>>(), "servers → client");
    assert!(
        !a_got.is_empty() && !b_got.is_empty(),
        "the move was mid-stream"
    );
    let took = resumed_after.expect("resumed on B");
    println!(
        "half_open={half_open}: moved after {} of {N} client messages; resumed on B {took:?} after the cut; {} zombie connections",
        a_got.len(),
        lb.zombies.lock().unwrap().len()
    );
    // Gone from A: offline there (replaced), online on B.
    let on_a = a.client("mover").unwrap();
    assert!(
        matches!(
            on_a.state,
            PresenceState::Offline {
                reason: DisconnectReason::Replaced,
                ..
            }
        ),
        "{:?}",
        on_a.state
    );
    assert_eq!(on_a.session, None);
    assert!(b.client("mover").unwrap().state.is_connected());
    assert!(matches!(
        a.try_send("mover", numbered(0)),
        Err(SendError::NotConnected(_))
    ));
    took
}

fn hello(id: &str, resume: Option<ResumeRequest>) -> Hello {
    Hello {
        client_id: id.into(),
        requested_heartbeat: Duration::ZERO,
        want_session: true,
        resume,
        credential: None,
    }
}

/// A raw HELLO that resumes `session_id` with `token`; the first frame's type and body.
async fn raw_resume(addr: SocketAddr, id: &str, session_id: u64, token: [u8; 16]) -> (u8, Vec<u8>) {
    let resume = ResumeRequest {
        session_id,
        token,
        last_received: 0,
    };
    let body = common::raw_first_frame(addr, hello(id, Some(resume))).await;
    (body[0], body[1..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_waits_for_the_attached_connection_and_a_wrong_token_moves_nothing() {
    let mut a = Server::bind(server_cfg()).await.unwrap();
    let mut client = Client::start(client_cfg(a.local_addr(), "held"));
    let welcome = match client.next_event().await {
        Some(ClientEvent::Connected { welcome }) => welcome,
        e => panic!("{e:?}"),
    };
    let grant = welcome.session.expect("a session");
    for i in 0..5 {
        a.send("held", numbered(i)).await.unwrap();
    }
    for i in 0..5 {
        match client.next_event().await {
            Some(ClientEvent::Message(m)) => assert_eq!(number(&m), i),
            e => panic!("{e:?}"),
        }
    }
    // A wrong token: nothing moves, the connection is untouched.
    let mut wrong = SessionRequest {
        client_id: "held".into(),
        session_id: grant.session_id,
        token_hash: TokenHash::of(&[0x55; 16]),
        principal: None,
        last_received: 0,
    };
    assert!(a
        .take_session(&wrong, Duration::from_millis(200))
        .await
        .is_none());
    wrong.token_hash = TokenHash::of(&grant.token);
    wrong.session_id += 1;
    assert!(a
        .take_session(&wrong, Duration::from_millis(200))
        .await
        .is_none());
    assert!(a.client("held").unwrap().state.is_connected());

    // The right one while attached: the connection is closed (REPLACED) and the take
    // returns once it has ended, with the session.
    let req = SessionRequest {
        client_id: "held".into(),
        session_id: grant.session_id,
        token_hash: TokenHash::of(&grant.token),
        principal: None,
        last_received: 0,
    };
    let t = Instant::now();
    let export = a
        .take_session(&req, Duration::from_secs(3))
        .await
        .expect("taken after the connection ended");
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(export.session_id(), grant.session_id);
    assert_eq!(export.state().last_seq, 5);
    loop {
        match client.next_event().await {
            Some(ClientEvent::Disconnected { disconnect, .. }) => {
                let reason = disconnect.reason;
                assert_eq!(reason, DisconnectReason::Replaced);
                break;
            }
            Some(ClientEvent::Message(_)) => {}
            e => panic!("{e:?}"),
        }
    }
    // No session-lost on A: it moved.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), a.next_event()).await
    {
        assert!(!matches!(ev, ServerEvent::SessionLost { .. }), "{ev:?}");
    }
    assert!(!a.client("held").unwrap().state.is_connected());

    // Imported into B: a wrong token is still refused there, the right one resumes.
    let mut b = Server::bind(server_cfg()).await.unwrap();
    let bytes = export.to_bytes();
    let export = tether::SessionExport::from_bytes(bytes).unwrap();
    b.import_session(export.clone()).unwrap();
    assert!(matches!(
        b.client("held").unwrap().state,
        PresenceState::Resuming { .. }
    ));
    let (ty, body) = raw_resume(b.local_addr(), "held", grant.session_id, [0x55; 16]).await;
    assert_eq!(ty, codec::ty::REFUSE, "wrong token");
    assert_eq!(
        u16::from_be_bytes([body[0], body[1]]),
        CloseCode::SESSION_UNKNOWN.0
    );
    let resume = ResumeRequest {
        session_id: grant.session_id,
        token: grant.token,
        last_received: 0,
    };
    // Kept open: the client is connected on B for what follows.
    let (_conn, body) = common::raw_hello_answer(b.local_addr(), hello("held", Some(resume))).await;
    assert_eq!(body[0], codec::ty::WELCOME, "{body:?}");
    // A second import of the same client id while it is connected there is refused and
    // reported lost, not dropped.
    assert_eq!(b.import_session(export), Err(tether::ImportError::Busy));
    let lost = loop {
        match tokio::time::timeout(Duration::from_secs(2), b.next_event()).await {
            Ok(Some(ServerEvent::SessionLost { unacked, .. })) => break unacked,
            Ok(Some(_)) => {}
            e => panic!("no session-lost: {e:?}"),
        }
    };
    assert_eq!(lost, Some(1..=5), "the unacknowledged messages are named");
}

/// Opens a session on `addr` by hand and drops the connection without a goodbye (the
/// server holds the session); returns its id and token.
async fn session_left_held(addr: SocketAddr, id: &str) -> (u64, [u8; 16]) {
    let body = common::raw_first_frame(addr, hello(id, None)).await;
    match codec::parse_body(&body) {
        Ok(Frame::Welcome(w)) => {
            let g = w.session.expect("a session");
            (g.session_id, g.token)
        }
        other => panic!("{other:?}"),
    }
}

async fn until_resuming(s: &Server, id: &str) {
    let t = Instant::now();
    while !matches!(
        s.client(id).map(|c| c.state),
        Some(PresenceState::Resuming { .. })
    ) {
        assert!(t.elapsed() < Duration::from_secs(3), "{id} not held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_replaces_an_older_held_session_of_the_client_and_reports_it_lost() {
    let mut b = Server::bind(server_cfg()).await.unwrap();
    let c = Server::bind(server_cfg()).await.unwrap();
    // The client's old session, held on b; then a newer one, held on c.
    let (old, _) = session_left_held(b.local_addr(), "back").await;
    until_resuming(&b, "back").await;
    let (newer, token) = session_left_held(c.local_addr(), "back").await;
    until_resuming(&c, "back").await;
    assert_ne!(old, newer);
    let req = SessionRequest {
        client_id: "back".into(),
        session_id: newer,
        token_hash: TokenHash::of(&token),
        principal: None,
        last_received: 0,
    };
    let export = c
        .take_session(&req, Duration::from_millis(100))
        .await
        .expect("held on c: taken at once");
    // The client resumes its newer session on b: b's old one will never be resumed.
    b.import_session(export).unwrap();
    assert_eq!(b.client("back").unwrap().session, Some(newer));
    let lost = loop {
        match tokio::time::timeout(Duration::from_secs(2), b.next_event()).await {
            Ok(Some(ServerEvent::SessionLost { session, .. })) => break session,
            Ok(Some(_)) => {}
            e => panic!("no session-lost: {e:?}"),
        }
    };
    assert_eq!(lost, old, "the older session is reported lost");
    let (ty, _) = raw_resume(b.local_addr(), "back", newer, token).await;
    assert_eq!(ty, codec::ty::WELCOME);
}

/// Reads frames from a raw connection for `within`; returns the ACKs among them.
async fn acks_within(s: &mut TcpStream, within: Duration) -> Vec<u64> {
    use tokio::io::AsyncReadExt as _;
    let mut acks = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let len = match tokio::time::timeout_at(deadline, s.read_u32()).await {
            Ok(Ok(n)) => n as usize,
            _ => return acks,
        };
        let mut body = vec![0u8; len];
        if len > 0 {
            s.read_exact(&mut body).await.unwrap();
            if let Ok(Frame::Ack(n)) = codec::parse_body(&body) {
                acks.push(n);
            }
        }
    }
}

/// `ServerConfig::ack_after_commit`: the server acknowledges a client's messages only up to
/// what the application committed, however long it waits; a commit lets the ACK out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_after_commit_the_ack_never_passes_the_committed_number() {
    use tokio::io::AsyncWriteExt as _;
    let mut server = Server::bind(server_cfg().ack_after_commit(true))
        .await
        .unwrap();
    let (mut s, body) = common::raw_hello_answer(server.local_addr(), hello("dev", None)).await;
    let session = match codec::parse_body(&body) {
        Ok(Frame::Welcome(w)) => w.session.expect("a session").session_id,
        other => panic!("{other:?}"),
    };
    let mut out = BytesMut::new();
    for q in 1..=5u64 {
        codec::encode_seq_data(q, &numbered(q), &mut out);
    }
    s.write_all(&out).await.unwrap();
    let mut got = 0;
    while got < 5 {
        if let Some(ServerEvent::Message { seq, .. }) = server.next_event().await {
            got = seq.unwrap();
        }
    }
    // Received, not committed: no ACK at all (the ACK delay is 20 ms; 300 ms of quiet).
    assert_eq!(
        acks_within(&mut s, Duration::from_millis(300)).await,
        Vec::<u64>::new()
    );
    server.commit("dev", session, 3);
    let acks = acks_within(&mut s, Duration::from_millis(300)).await;
    assert_eq!(acks, vec![3], "up to the committed number, no further");
    // Another session's commit, or one beyond what was received, changes nothing past 5.
    server.commit("dev", session + 1, 5);
    assert_eq!(
        acks_within(&mut s, Duration::from_millis(200)).await,
        Vec::<u64>::new()
    );
    server.commit("dev", session, 9);
    assert_eq!(
        acks_within(&mut s, Duration::from_millis(300)).await,
        vec![5]
    );
}
