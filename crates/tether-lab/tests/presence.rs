//! Seed scenario (c) with the real server: mobile clients vanish (`blackhole`, and the client
//! host crashing — only its traffic vanishes, no FIN, no RST). tether's `Server` marks the
//! client `Offline` with `heartbeat-timeout` within its bound (d, +25%), and the client side
//! notices too. (The naive-server half of the scenario is in `lab.rs`.)

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::{Client, ClientConfig, ClientEvent, DisconnectReason, Server, ServerConfig};
use tether_lab::topology::{Invalid, RouterConfig};
use tether_lab::{Role, Shape, Topology};
use tether_proto::policy::Policy;
use tether_proto::presence::PresenceState;

fn skip(test: &str) -> bool {
    tether_lab::skip_test(test)
}

const D: Duration = Duration::from_secs(3);

/// Connects a client, injects `fault` after a healthy idle period, and returns
/// (server's Offline reason, its silent_for, time from fault to Offline, the client's
/// disconnect reason, time from fault to the client noticing).
fn scenario(
    fault: &'static str,
) -> (
    DisconnectReason,
    Duration,
    Duration,
    DisconnectReason,
    Duration,
) {
    let topo = Arc::new(Topology::create(Shape::OutboundNat).expect("topology"));
    topo.configure_router(RouterConfig {
        idle_timeout: Some(Duration::from_secs(4)),
        invalid: Invalid::Drop,
    })
    .expect("router");
    let policy = Policy::derive(D, Some(Duration::from_secs(4).into())).expect("policy");
    let (listen, connect) = (topo.listen_addr(), topo.connect_addr());
    let (fault_tx, fault_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let p = policy.clone();
    let server = tether_lab::spawn_async_in_netns(topo.netns(Role::Server), async move {
        let cfg = ServerConfig::new(listen).policy(p).session_linger(None);
        let srv = Server::bind(cfg).await.expect("bind");
        let mut changes = srv.subscribe();
        let _ = ready_tx.send(());
        loop {
            let ch = changes.recv().await.expect("presence");
            if let PresenceState::Offline {
                reason, silent_for, ..
            } = ch.to
            {
                return (reason, silent_for, Instant::now());
            }
        }
    });
    // The client's first event must be Connected: it may only dial once the server listens
    // (a refused first attempt made it Reconnecting, 1 run in 20 under load).
    ready_rx.recv().expect("server started");
    let p = policy.clone();
    let client = tether_lab::spawn_async_in_netns(topo.netns(Role::Client), async move {
        let mut cfg = ClientConfig::new(connect, "phone-1");
        cfg.connect.policy = p;
        cfg.session = false;
        let mut c = Client::start(cfg);
        assert!(matches!(
            c.next_event().await,
            Some(ClientEvent::Connected { .. })
        ));
        fault_tx.send(()).expect("main thread");
        loop {
            if let Some(ClientEvent::Disconnected { disconnect }) = c.next_event().await {
                return (disconnect.reason, Instant::now());
            }
        }
    });
    fault_rx.recv().expect("client connected");
    // Idle past the router's idle timeout first: heartbeats keep the flow (and presence) up.
    std::thread::sleep(Duration::from_secs(6));
    let at = Instant::now();
    match fault {
        "blackhole" => topo.blackhole().expect("blackhole"),
        _ => topo.isolate(Role::Client).expect("isolate"),
    }
    let (sreason, silent, s_at) = server.join().expect("server thread");
    let (creason, c_at) = client.join().expect("client thread");
    (sreason, silent, s_at - at, creason, c_at - at)
}

#[test]
fn vanishing_clients_go_offline_within_the_bound_and_notice_it_themselves() {
    if skip("vanishing_clients_go_offline_within_the_bound_and_notice_it_themselves") {
        return;
    }
    let runs: Vec<_> = ["blackhole", "host-crash"]
        .iter()
        .map(|f| (f, std::thread::spawn(move || scenario(f))))
        .collect();
    for (fault, h) in runs {
        let (sreason, silent, s_after, creason, c_after) = h.join().expect("scenario");
        let _ = std::io::stderr().write_all(
            format!("\nlab presence {fault}: server Offline {sreason} silent_for {silent:?} {s_after:?} after the fault; client {creason} after {c_after:?}\n").as_bytes(),
        );
        let hi = D + D / 4;
        assert_eq!(sreason, DisconnectReason::HeartbeatTimeout, "{fault}");
        assert!(
            silent >= D && silent <= hi,
            "{fault}: silent_for {silent:?}"
        );
        assert!(s_after <= hi, "{fault}: server noticed after {s_after:?}");
        assert_eq!(
            creason,
            DisconnectReason::HeartbeatTimeout,
            "{fault}: client"
        );
        assert!(c_after <= hi, "{fault}: client noticed after {c_after:?}");
    }
}
