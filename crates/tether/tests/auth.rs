//! Authentication and per-id authorization over real loopback (JWT HS256 credentials signed
//! in the test): refusals with the documented codes, principal-bound ids, connections and
//! sessions, credential expiry and in-band refresh, resume tokens as single-use
//! credentials, the failure throttle, and authorizers that decide later.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::manual::Manual;
use common::{fast_policy, Blackhole};
use tether::auth::throttle::ThrottleConfig;
use tether::auth::{
    sign_hs256, AllowedIds, AuthDecision, AuthRequest, Authorize, Builtin, Denial, JwtConfig,
    JwtVerifier, PendingDecision, Principal, Scheme, TokenSpec,
};
use tether::credential::Credentials;
use tether::{
    BackoffConfig, Client, ClientConfig, ClientEvent, CloseCode, ConnectError, ConnectOptions,
    Connection, DisconnectReason, PresenceState, Server, ServerConfig, ServerEvent,
};
use tether_proto::codec::{Credential, Hello, ResumeRequest, SessionGrant};
use tether_proto::ConnEvent;
use tokio::net::TcpStream;

const SECRET: &[u8] = b"an hs256 secret of at least 32 bytes, for tests";

fn token_at(spec: TokenSpec, now: SystemTime) -> String {
    sign_hs256(SECRET, &spec, now).unwrap()
}

/// A token for `sub` (and only the id `sub`) valid for `ttl` from now.
fn token(sub: &str, ttl: Duration) -> String {
    token_at(TokenSpec::new(sub, ttl), SystemTime::now())
}

/// The server's rule: HS256 tokens with no leeway (expiry is exact to the second).
fn builtin() -> Arc<dyn Authorize> {
    let v = JwtVerifier::hs256(SECRET)
        .unwrap()
        .with_config(JwtConfig::default().leeway(Duration::ZERO));
    Arc::new(Builtin::new().credentials(v))
}

fn config(hook: Arc<dyn Authorize>) -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(300, 1000))
        .handshake_timeout(Duration::from_millis(500))
        .session_linger(Some(Duration::from_secs(30)))
        .authorize(hook)
}

async fn server() -> Server {
    Server::bind(config(builtin())).await.unwrap()
}

fn opts(id: &str, token: Option<String>) -> ConnectOptions {
    let o = ConnectOptions::new(id).policy(fast_policy(300, 1000));
    match token {
        Some(t) => o.credential(Credentials::token(t).unwrap()),
        None => o,
    }
}

fn refused(r: Result<Connection, ConnectError>) -> (CloseCode, String) {
    match r {
        Err(ConnectError::Refused { code, text }) => (code, text),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
}

fn client_config(addr: std::net::SocketAddr, id: &str, creds: Option<Credentials>) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr, id);
    cfg.connect = cfg
        .connect
        .policy(fast_policy(300, 1000))
        .handshake_timeout(Duration::from_secs(1));
    cfg.connect.credential = creds;
    cfg.backoff = BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(300),
        max_attempts: None,
    };
    cfg
}

async fn next(c: &mut Client, pred: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = c.next_event().await.expect("client stopped");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("no such client event within 10 s")
}

async fn state_of(srv: &Server, id: &str, want: fn(&PresenceState) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if srv.client(id).is_some_and(|c| want(&c.state)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: {:?}", srv.client(id).map(|c| c.state)));
}

#[tokio::test]
async fn without_a_valid_credential_a_client_is_refused_with_unauthorized_and_gives_up() {
    let mut srv = server().await;
    let addr = srv.local_addr();
    // No credential.
    let (code, text) = refused(Connection::connect_with(addr, &opts("alice", None)).await);
    assert_eq!(
        (code, text.as_str()),
        (CloseCode::UNAUTHORIZED, "credential required")
    );
    // A token signed with another secret; a token that is not a JWT at all.
    let forged = sign_hs256(
        b"another secret that is also long enough!",
        &TokenSpec::new("alice", Duration::from_secs(60)),
        SystemTime::now(),
    )
    .unwrap();
    let (code, _) = refused(Connection::connect_with(addr, &opts("alice", Some(forged))).await);
    assert_eq!(code, CloseCode::UNAUTHORIZED);
    let (code, _) =
        refused(Connection::connect_with(addr, &opts("alice", Some("x.y.z".into()))).await);
    assert_eq!(code, CloseCode::UNAUTHORIZED);
    // Refused before any state was touched: the id is unknown to presence.
    assert!(srv.client("alice").is_none());
    assert!(srv.clients().is_empty());
    for _ in 0..3 {
        match srv.next_event().await {
            Some(ServerEvent::Refused { reason, .. }) => assert!(
                matches!(
                    reason,
                    DisconnectReason::Refused {
                        code: CloseCode::UNAUTHORIZED,
                        ..
                    }
                ),
                "{reason:?}"
            ),
            other => panic!("{other:?}"),
        }
    }
    // The reconnecting client: refused once, then it stops (terminal), no retry.
    let mut c = Client::start(client_config(addr, "alice", None));
    match next(&mut c, |e| {
        matches!(
            e,
            ClientEvent::GaveUp { .. } | ClientEvent::Reconnecting { .. }
        )
    })
    .await
    {
        ClientEvent::GaveUp { reason, .. } => assert!(
            matches!(
                reason,
                DisconnectReason::Refused {
                    code: CloseCode::UNAUTHORIZED,
                    ..
                }
            ),
            "{reason:?}"
        ),
        other => panic!("an unauthorized client must not retry: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_cannot_claim_replace_or_take_over_alice() {
    let mut srv = server().await;
    let addr = srv.local_addr();
    let hole = Blackhole::start(addr).await;
    let alice_creds = Credentials::token(token("alice", Duration::from_secs(600))).unwrap();
    let mut alice = Client::start(client_config(hole.addr, "alice", Some(alice_creds)));
    let ClientEvent::Connected { welcome } =
        next(&mut alice, |e| matches!(e, ClientEvent::Connected { .. })).await
    else {
        unreachable!()
    };
    assert!(welcome.session.is_some());
    let conn_id = srv.client("alice").unwrap().conn_id;

    // bob's own token: may not even claim the id.
    let bob = token("bob", Duration::from_secs(600));
    let (code, _) = refused(Connection::connect_with(addr, &opts("alice", Some(bob))).await);
    assert_eq!(code, CloseCode::ID_NOT_ALLOWED);
    // A token for principal bob that lists "alice" among its ids: valid for the id, but the
    // id is in use by another principal. Not replaced.
    let bob_wide = token_at(
        TokenSpec::new("bob", Duration::from_secs(600)).ids(["alice", "bob"]),
        SystemTime::now(),
    );
    let (code, text) =
        refused(Connection::connect_with(addr, &opts("alice", Some(bob_wide.clone()))).await);
    assert_eq!(code, CloseCode::ID_NOT_ALLOWED, "{text}");
    let info = srv.client("alice").unwrap();
    assert_eq!(info.conn_id, conn_id, "alice's connection was not replaced");
    assert!(info.state.is_connected());

    // alice's path goes dark: the server declares her dead and holds her session.
    hole.set(true);
    state_of(&srv, "alice", |s| {
        matches!(s, PresenceState::Resuming { .. })
    })
    .await;
    srv.try_send("alice", Bytes::from_static(b"kept for alice"))
        .unwrap();
    // bob, with the wide token: a new session as alice, a resume with a guessed token, a
    // plain connection: all refused, the held session untouched.
    let bob_hello = |want_session, resume: Option<ResumeRequest>| Hello {
        client_id: "alice".into(),
        requested_heartbeat: Duration::from_millis(300),
        want_session,
        resume,
        credential: Some(Credential::from(bob_wide.clone())),
    };
    let guess = ResumeRequest {
        session_id: welcome.session.as_ref().unwrap().session_id,
        token: [0x5a; 16],
        last_received: 0,
    };
    for h in [
        bob_hello(true, None),
        bob_hello(true, Some(guess)),
        bob_hello(false, None),
    ] {
        let mut m = Manual::new(TcpStream::connect(addr).await.unwrap(), &h);
        match m.handshake().await {
            ConnEvent::Closed(d) => assert!(
                matches!(
                    d.reason,
                    DisconnectReason::Refused {
                        code: CloseCode::ID_NOT_ALLOWED,
                        ..
                    }
                ),
                "{:?}: {:?}",
                h.resume.is_some(),
                d.reason
            ),
            other => panic!("bob got in: {other:?}"),
        }
        assert!(matches!(
            srv.client("alice").unwrap().state,
            PresenceState::Resuming { .. }
        ));
    }
    // alice comes back, resumes and gets what was kept for her.
    hole.set(false);
    next(&mut alice, |e| matches!(e, ClientEvent::Resumed { .. })).await;
    match next(&mut alice, |e| matches!(e, ClientEvent::Message(_))).await {
        ClientEvent::Message(m) => assert_eq!(&m[..], b"kept for alice"),
        _ => unreachable!(),
    }
    // No session was lost on the way.
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(100), srv.next_event()).await
    {
        assert!(!matches!(ev, ServerEvent::SessionLost { .. }), "{ev:?}");
    }
}

#[tokio::test]
async fn an_expired_token_is_refused_and_a_connection_ends_at_expiry_unless_refreshed() {
    let srv = server().await;
    let addr = srv.local_addr();
    // Expired ten seconds ago.
    let old = token_at(
        TokenSpec::new("alice", Duration::from_secs(1)),
        SystemTime::now() - Duration::from_secs(11),
    );
    let (code, text) = refused(Connection::connect_with(addr, &opts("alice", Some(old))).await);
    assert_eq!(
        (code, text.as_str()),
        (CloseCode::UNAUTHORIZED, "token expired")
    );

    // Valid for about two seconds (exp rounds up to a whole second): closed at expiry.
    let t0 = Instant::now();
    let c = Connection::connect_with(
        addr,
        &opts("alice", Some(token("alice", Duration::from_secs(2)))),
    )
    .await
    .unwrap();
    let ttl = c
        .welcome()
        .credential_ttl
        .expect("the welcome carries the ttl");
    assert!(
        ttl > Duration::from_secs(1) && ttl <= Duration::from_secs(3),
        "{ttl:?}"
    );
    let d = tokio::time::timeout(Duration::from_secs(6), c.closed())
        .await
        .unwrap();
    let lived = t0.elapsed();
    // The server's CLOSE(7) reaches the client as a peer close with that code.
    assert!(
        matches!(
            d.reason,
            DisconnectReason::PeerClose {
                code: CloseCode::CREDENTIAL_EXPIRED,
                ..
            }
        ),
        "{:?}",
        d.reason
    );
    assert!(
        lived + Duration::from_millis(50) >= ttl && lived < ttl + Duration::from_secs(1),
        "lived {lived:?}, ttl {ttl:?}"
    );

    // A client that refreshes (a new two-second token each time it is asked) stays up
    // across several lifetimes of its token.
    let fetched = Arc::new(AtomicU32::new(0));
    let f = fetched.clone();
    let creds = Credentials::from_fn(move || {
        f.fetch_add(1, Ordering::Relaxed);
        async move { Ok(Credential::from(token("alice", Duration::from_secs(2)))) }
    });
    let mut c = Client::start(client_config(addr, "alice", Some(creds)));
    next(&mut c, |e| matches!(e, ClientEvent::Connected { .. })).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut refreshed = 0;
    while let Ok(ev) = tokio::time::timeout_at(until, c.next_event()).await {
        match ev.unwrap() {
            ClientEvent::CredentialRefreshed { ttl } => {
                assert!(ttl > Duration::from_secs(1) && ttl <= Duration::from_secs(3));
                refreshed += 1;
            }
            ev @ (ClientEvent::Disconnected { .. } | ClientEvent::GaveUp { .. }) => {
                panic!("a refreshing client was cut off: {ev:?}")
            }
            _ => {}
        }
    }
    assert!(refreshed >= 3, "{refreshed} refreshes in 7 s of 2 s tokens");
    assert_eq!(fetched.load(Ordering::Relaxed), refreshed + 1);
}

/// Opens a session as alice by hand: the grant (with its token) and the connection.
async fn alice_session(
    addr: std::net::SocketAddr,
    resume: Option<ResumeRequest>,
) -> (ConnEvent, Manual<TcpStream>) {
    let h = Hello {
        client_id: "alice".into(),
        requested_heartbeat: Duration::from_millis(300),
        want_session: true,
        resume,
        credential: Some(Credential::from(token("alice", Duration::from_secs(600)))),
    };
    let mut m = Manual::new(TcpStream::connect(addr).await.unwrap(), &h);
    let ev = m.handshake().await;
    (ev, m)
}

fn grant(ev: &ConnEvent) -> SessionGrant {
    match ev {
        ConnEvent::Established(w) => w.session.clone().expect("a session"),
        other => panic!("not established: {other:?}"),
    }
}

fn refusal(ev: &ConnEvent) -> CloseCode {
    match ev {
        ConnEvent::Closed(tether_proto::Disconnect {
            reason: DisconnectReason::Refused { code, .. },
            ..
        }) => *code,
        other => panic!("not refused: {other:?}"),
    }
}

/// Ends a connection abortively (RST), as a path failure would: the session is held.
fn is_resuming(s: &PresenceState) -> bool {
    matches!(s, PresenceState::Resuming { .. })
}

/// Alice opens a session and her connection is reset: the session is held. Its grant.
async fn alice_held(srv: &Server) -> SessionGrant {
    let (ev, m) = alice_session(srv.local_addr(), None).await;
    let g = grant(&ev);
    abort(m);
    state_of(srv, "alice", is_resuming).await;
    g
}

fn abort(m: Manual<TcpStream>) {
    socket2::SockRef::from(&m.io)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

fn resume_with(g: &SessionGrant, token: [u8; 16]) -> ResumeRequest {
    ResumeRequest {
        session_id: g.session_id,
        token,
        last_received: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_reused_resume_token_is_refused_and_the_session_is_untouched() {
    let mut srv = server().await;
    let addr = srv.local_addr();
    let g1 = alice_held(&srv).await;
    srv.try_send("alice", Bytes::from_static(b"queued"))
        .unwrap();

    // A wrong token (one bit off): SESSION_UNKNOWN, the session still held.
    let mut wrong = g1.token;
    wrong[0] ^= 1;
    let (ev, _) = alice_session(addr, Some(resume_with(&g1, wrong))).await;
    assert_eq!(refusal(&ev), CloseCode::SESSION_UNKNOWN);
    assert!(is_resuming(&srv.client("alice").unwrap().state));

    // The right token resumes; the WELCOME carries a new token; the queued message arrives.
    let (ev, mut m) = alice_session(addr, Some(resume_with(&g1, g1.token))).await;
    let g2 = grant(&ev);
    assert!(g2.resumed);
    assert_eq!(g2.session_id, g1.session_id);
    assert_ne!(g2.token, g1.token, "rotated on resume");
    match m.until(|e| matches!(e, ConnEvent::Message { .. })).await {
        ConnEvent::Message { payload, .. } => assert_eq!(&payload[..], b"queued"),
        other => panic!("{other:?}"),
    }
    // Alice speaks on the resumed connection: she read the WELCOME, so she has g2.
    m.send(b"got it").await;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), srv.next_event()).await {
            Ok(Some(ServerEvent::Message { msg, .. })) => break assert_eq!(&msg[..], b"got it"),
            Ok(Some(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    abort(m);
    state_of(&srv, "alice", is_resuming).await;

    // The used (pre-rotation) token is dead; the new one works.
    let (ev, _) = alice_session(addr, Some(resume_with(&g1, g1.token))).await;
    assert_eq!(refusal(&ev), CloseCode::SESSION_UNKNOWN);
    assert!(is_resuming(&srv.client("alice").unwrap().state));
    // Bound to the principal: bob holding alice's current token (sniffed, say) with a
    // credential that allows the id gets nowhere.
    let bob_wide = token_at(
        TokenSpec::new("bob", Duration::from_secs(600)).ids(["alice"]),
        SystemTime::now(),
    );
    let h = Hello {
        client_id: "alice".into(),
        requested_heartbeat: Duration::from_millis(300),
        want_session: true,
        resume: Some(resume_with(&g1, g2.token)),
        credential: Some(Credential::from(bob_wide)),
    };
    let mut b = Manual::new(TcpStream::connect(addr).await.unwrap(), &h);
    assert_eq!(refusal(&b.handshake().await), CloseCode::ID_NOT_ALLOWED);
    assert!(is_resuming(&srv.client("alice").unwrap().state));

    let (ev, _m) = alice_session(addr, Some(resume_with(&g1, g2.token))).await;
    let g3 = grant(&ev);
    assert!(g3.resumed);
    assert!(g3.token != g2.token && g3.token != g1.token);
    while let Ok(Some(ev)) =
        tokio::time::timeout(Duration::from_millis(100), srv.next_event()).await
    {
        assert!(!matches!(ev, ServerEvent::SessionLost { .. }), "{ev:?}");
    }
}

/// The connection that carried a resume's WELCOME (and its new token) dies before the client
/// read it: the token the client resumed with still resumes, once more. It dies as soon as
/// the client speaks on a connection with the token it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_lost_with_its_connection_does_not_lose_the_session() {
    let srv = server().await;
    let addr = srv.local_addr();
    let g1 = alice_held(&srv).await;

    // Resumed with g1; the WELCOME (carrying g2) is "lost": the client never reads it and
    // the connection is reset.
    let h = Hello {
        client_id: "alice".into(),
        requested_heartbeat: Duration::from_millis(300),
        want_session: true,
        resume: Some(resume_with(&g1, g1.token)),
        credential: Some(Credential::from(token("alice", Duration::from_secs(600)))),
    };
    let mut io = TcpStream::connect(addr).await.unwrap();
    let mut hello = bytes::BytesMut::new();
    tether_proto::codec::encode_preamble(&mut hello);
    tether_proto::codec::encode(&tether_proto::codec::Frame::Hello(h), &mut hello);
    tokio::io::AsyncWriteExt::write_all(&mut io, &hello)
        .await
        .unwrap();
    state_of(&srv, "alice", |s| matches!(s, PresenceState::Online)).await;
    socket2::SockRef::from(&io)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(io);
    state_of(&srv, "alice", is_resuming).await;

    // g1 is all the client has: it still resumes, and the session is the same one.
    let (ev, mut m) = alice_session(addr, Some(resume_with(&g1, g1.token))).await;
    let g3 = grant(&ev);
    assert!(g3.resumed);
    assert_eq!(g3.session_id, g1.session_id);
    // Now the client speaks with g3 in hand: g1 is dead from then on.
    m.send(b"here").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    abort(m);
    state_of(&srv, "alice", is_resuming).await;
    let (ev, _) = alice_session(addr, Some(resume_with(&g1, g1.token))).await;
    assert_eq!(refusal(&ev), CloseCode::SESSION_UNKNOWN);
    let (ev, _m) = alice_session(addr, Some(resume_with(&g1, g3.token))).await;
    assert!(grant(&ev).resumed);
}

#[tokio::test]
async fn failed_credentials_and_resumes_are_throttled_per_address() {
    let cfg = config(builtin()).auth_throttle(Some(
        ThrottleConfig::default()
            .burst(3)
            .interval(Duration::from_secs(60)),
    ));
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let forged = || Some("not-a-token".to_owned());
    for _ in 0..3 {
        let (code, _) = refused(Connection::connect_with(addr, &opts("alice", forged())).await);
        assert_eq!(code, CloseCode::UNAUTHORIZED);
    }
    // The fourth attempt, and any after it from this address, even with a good token.
    let (code, text) = refused(Connection::connect_with(addr, &opts("alice", forged())).await);
    assert_eq!(code, CloseCode::THROTTLED, "{text}");
    assert!(text.contains("retry in"), "{text}");
    let good = Some(token("alice", Duration::from_secs(60)));
    let (code, _) = refused(Connection::connect_with(addr, &opts("alice", good)).await);
    assert_eq!(code, CloseCode::THROTTLED);
    // A client treats THROTTLED as temporary: it retries with backoff.
    let creds = Credentials::token(token("alice", Duration::from_secs(60))).unwrap();
    let mut c = Client::start(client_config(addr, "alice", Some(creds)));
    match next(&mut c, |e| {
        matches!(
            e,
            ClientEvent::Reconnecting { .. } | ClientEvent::GaveUp { .. }
        )
    })
    .await
    {
        ClientEvent::Reconnecting { attempt: 1, .. } => {}
        other => panic!("THROTTLED must be retried: {other:?}"),
    }
}

/// An authorizer that answers later: `delay` then allow the id as principal `alice`, or
/// never (`None`).
struct Slow {
    delay: Option<Duration>,
}

impl Authorize for Slow {
    fn authorize(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let delay = self.delay;
        let id = req.client_id.to_owned();
        let has_credential = req.credential.is_some();
        AuthDecision::Pending(PendingDecision::new(async move {
            match delay {
                None => std::future::pending().await,
                Some(d) => tokio::time::sleep(d).await,
            }
            if !has_credential {
                return AuthDecision::Deny(Denial::unauthorized("the backend says no"));
            }
            let p = Principal::new(
                Scheme::Custom("backend".into()),
                id.clone(),
                AllowedIds::only(id),
            )
            .with_expiry(SystemTime::now() + Duration::from_secs(2));
            AuthDecision::Allow(p)
        }))
    }
}

#[tokio::test]
async fn an_authorizer_may_decide_later_within_the_handshake_deadline() {
    let srv = Server::bind(config(Arc::new(Slow {
        delay: Some(Duration::from_millis(200)),
    })))
    .await
    .unwrap();
    let addr = srv.local_addr();
    let t0 = Instant::now();
    let c = Connection::connect_with(addr, &opts("dev-1", Some("anything".into())))
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // The principal's expiry reaches the wire, and a pending refresh answers in time: the
    // connection outlives the first credential.
    let ttl = c.welcome().credential_ttl.unwrap();
    assert!(
        ttl > Duration::from_millis(1500) && ttl <= Duration::from_secs(2),
        "{ttl:?}"
    );
    // A pending denial is a denial.
    let (code, text) = refused(Connection::connect_with(addr, &opts("dev-2", None)).await);
    assert_eq!(
        (code, text.as_str()),
        (CloseCode::UNAUTHORIZED, "the backend says no")
    );
    drop(c);

    // An authorizer that never answers: the handshake deadline refuses the client.
    let srv = Server::bind(config(Arc::new(Slow { delay: None })))
        .await
        .unwrap();
    let t0 = Instant::now();
    let (code, _) =
        refused(Connection::connect_with(srv.local_addr(), &opts("dev-3", Some("t".into()))).await);
    assert_eq!(code, CloseCode::HANDSHAKE_TIMEOUT);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_pending_refresh_keeps_a_connection_past_its_first_credential() {
    let srv = Server::bind(config(Arc::new(Slow {
        delay: Some(Duration::from_millis(100)),
    })))
    .await
    .unwrap();
    let creds = Credentials::token("t").unwrap();
    let mut c = Client::start(client_config(srv.local_addr(), "dev-1", Some(creds)));
    next(&mut c, |e| matches!(e, ClientEvent::Connected { .. })).await;
    // Two-second principals, refreshed at 1.8 s with a 100 ms decision: up for 5 s.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut refreshed = 0;
    while let Ok(ev) = tokio::time::timeout_at(until, c.next_event()).await {
        match ev.unwrap() {
            ClientEvent::CredentialRefreshed { .. } => refreshed += 1,
            ev @ (ClientEvent::Disconnected { .. } | ClientEvent::GaveUp { .. }) => {
                panic!("cut off: {ev:?}")
            }
            _ => {}
        }
    }
    assert!(refreshed >= 2, "{refreshed}");
}
