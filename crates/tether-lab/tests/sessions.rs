//! Sessions in the lab: client and server each send 100,000 numbered messages while the path
//! between them flaps through `blackhole`, `nat-idle-rst`, `router-reboot` and a crash of the
//! client's connection (its socket destroyed with `ss -K`, the process and its session state
//! intact), at least 20 times in all. At the end both sides received all 100,000, in order,
//! without duplicates; the test prints the resume count and resume latency.
//!
//! How each flap is made on the real router (outbound NAT, conntrack with
//! `nf_conntrack_tcp_loose=0`, INVALID answered with RST):
//! - `blackhole`: every forwarded packet dropped for 1.5 s, then healed;
//! - `nat-idle-rst`: the router forgets the flow (`conntrack -F`); the next packet of either
//!   side is INVALID and draws an RST — what AWS NLB / NAT gateway do to an expired flow. (The
//!   idle timer itself cannot expire here: tether's heartbeats keep the flow alive, which is
//!   the point of tether; forgetting the entry reproduces what happens once it has expired.)
//! - `router-reboot`: the router forgets every flow and silently drops INVALID packets
//!   (a fault rule ahead of the RST rule) until the peers give up on the old connection;
//! - `client-conn-crash`: `ss -K` destroys the client's established socket (RST to the server).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tether::server::SendError;
use tether::{Client, ClientConfig, ClientEvent, Server, ServerConfig, ServerEvent};
use tether_lab::topology::{Invalid, RouterConfig};
use tether_lab::{Role, Shape, Topology};
use tether_proto::backoff::BackoffConfig;
use tether_proto::policy::Policy;

const N: u64 = 100_000;
const FLAPS: usize = 20;

fn skip(test: &str) -> bool {
    tether_lab::skip_test(test)
}

fn numbered(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(32);
    b.put_u64(i);
    b.put_slice(&[0x5A; 24]);
    b.freeze()
}

fn number(m: &[u8]) -> u64 {
    u64::from_be_bytes(m[..8].try_into().expect("8-byte header"))
}

fn policy() -> Policy {
    // Detect a dead path within 1 s, so each silent flap is noticed quickly.
    Policy::derive(Duration::from_secs(1), None).expect("policy")
}

/// Paces a sender so the 100,000 messages span the whole chaos (about 10 s of sending).
async fn pace(i: u64) {
    if i % 100 == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn hundred_thousand_each_way_through_twenty_flaps() {
    if skip("hundred_thousand_each_way_through_twenty_flaps") {
        return;
    }
    let topo = Arc::new(Topology::create(Shape::OutboundNat).expect("topology"));
    topo.configure_router(RouterConfig {
        idle_timeout: None,
        invalid: Invalid::Reset,
    })
    .expect("router");
    let listen = topo.listen_addr();
    let connect = topo.connect_addr();
    let server_got = Arc::new(AtomicU64::new(0));
    let client_got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (sg, st) = (server_got.clone(), stop.clone());
    let server = tether_lab::spawn_async_in_netns(topo.netns(Role::Server), async move {
        let cfg = ServerConfig::new(listen)
            .policy(policy())
            .session_linger(Some(Duration::from_secs(60)));
        let mut srv = Server::bind(cfg).await.expect("bind");
        let _ = ready_tx.send(());
        // Wait for the client, then send N messages to it.
        let mut got = Vec::with_capacity(N as usize);
        let mut sender = None;
        while !st.load(SeqCst) {
            let ev = match tokio::time::timeout(Duration::from_millis(200), srv.next_event()).await
            {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => continue,
            };
            match ev {
                ServerEvent::Connected { client_id, .. } if sender.is_none() => {
                    let h = srv.handle();
                    sender = Some(tokio::spawn(async move {
                        for i in 0..N {
                            pace(i).await;
                            loop {
                                match h.send(&client_id, numbered(i)).await {
                                    Ok(()) => break,
                                    Err(SendError::Backlogged(_))
                                    | Err(SendError::NotConnected(_)) => {
                                        tokio::time::sleep(Duration::from_millis(5)).await
                                    }
                                    Err(e) => panic!("server send {i}: {e}"),
                                }
                            }
                        }
                    }));
                }
                ServerEvent::Message { msg, .. } => {
                    got.push(number(&msg));
                    sg.store(got.len() as u64, SeqCst);
                }
                ServerEvent::SessionLost {
                    unacked, unsent, ..
                } => {
                    panic!(
                        "server lost the session: unacked {unacked:?}, {} unsent",
                        unsent.len()
                    )
                }
                _ => {}
            }
        }
        if let Some(s) = sender {
            s.await.expect("server sender");
        }
        got
    });
    ready_rx.recv().expect("server started");

    let (cg, st) = (client_got.clone(), stop.clone());
    let client = tether_lab::spawn_async_in_netns(topo.netns(Role::Client), async move {
        let mut cfg = ClientConfig::new(connect, "chaos-client");
        cfg.connect.policy = policy();
        cfg.backoff = BackoffConfig {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(300),
            max_attempts: None,
        };
        cfg.seed = Some(1);
        let mut client = Client::start(cfg);
        let tx = client.sender();
        let sender = tokio::spawn(async move {
            for i in 0..N {
                pace(i).await;
                tx.send(numbered(i)).await.expect("client send");
            }
        });
        let mut got = Vec::with_capacity(N as usize);
        let mut resumes = 0u64;
        let mut down_since: Option<Instant> = None;
        let mut latencies = Vec::new();
        while !st.load(SeqCst) {
            let ev =
                match tokio::time::timeout(Duration::from_millis(200), client.next_event()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(_) => continue,
                };
            match ev {
                ClientEvent::Message(m) => {
                    got.push(number(&m));
                    cg.store(got.len() as u64, SeqCst);
                }
                ClientEvent::Disconnected { .. } => {
                    down_since.get_or_insert_with(Instant::now);
                }
                ClientEvent::Resumed { .. } => {
                    resumes += 1;
                    if let Some(t) = down_since.take() {
                        latencies.push(t.elapsed());
                    }
                }
                ClientEvent::SessionLost { unacked } => {
                    panic!("client lost the session: {unacked:?}")
                }
                ClientEvent::GaveUp { reason, .. } => panic!("client gave up: {reason}"),
                _ => {}
            }
        }
        sender.await.expect("client sender");
        (got, resumes, latencies)
    });

    // The chaos, from this thread: at least FLAPS flaps while messages flow, cycling through
    // the four kinds, then keep flapping until both sides have everything (bounded).
    let started = Instant::now();
    let kinds = [
        "blackhole",
        "nat-idle-rst",
        "router-reboot",
        "client-conn-crash",
    ];
    let mut flaps = 0usize;
    let done = || server_got.load(SeqCst) == N && client_got.load(SeqCst) == N;
    while flaps < FLAPS || !done() {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "not done after {flaps} flaps: server {} client {}",
            server_got.load(SeqCst),
            client_got.load(SeqCst)
        );
        if flaps >= FLAPS {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        std::thread::sleep(Duration::from_millis(300));
        match kinds[flaps % kinds.len()] {
            "blackhole" => {
                topo.blackhole().expect("blackhole");
                std::thread::sleep(Duration::from_millis(1500));
                topo.heal().expect("heal");
            }
            "nat-idle-rst" => topo.flush_conntrack().expect("flush"),
            "router-reboot" => {
                topo.drop_invalid().expect("drop invalid");
                topo.flush_conntrack().expect("flush");
                std::thread::sleep(Duration::from_millis(1500));
                topo.heal().expect("heal");
            }
            _ => topo.kill_sockets(Role::Client).expect("ss -K"),
        }
        flaps += 1;
    }
    stop.store(true, SeqCst);
    let server_got = server.join().expect("server thread");
    let (client_got, resumes, mut latencies) = client.join().expect("client thread");
    let expect: Vec<u64> = (0..N).collect();
    assert!(
        server_got == expect,
        "server: {} messages, first mismatch at {:?}",
        server_got.len(),
        server_got.iter().zip(&expect).position(|(a, b)| a != b)
    );
    assert!(
        client_got == expect,
        "client: {} messages, first mismatch at {:?}",
        client_got.len(),
        client_got.iter().zip(&expect).position(|(a, b)| a != b)
    );
    assert!(
        resumes >= (FLAPS as u64) / 2,
        "only {resumes} resumes in {flaps} flaps"
    );
    latencies.sort();
    let line = format!(
        "\nlab sessions chaos: {N} messages each way, {flaps} flaps, {resumes} resumes, resume latency (from the client's disconnect) median {:?} max {:?}, {:.1} s\n",
        latencies.get(latencies.len() / 2).copied().unwrap_or_default(),
        latencies.last().copied().unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
