//! `tether proxy` in the lab, with unmodified programs (python3 scripts that know nothing of
//! keepalive) on real kernels behind a real conntrack NAT. Issue 6's two proxy scenarios:
//!
//! - **Idle bot behind outbound SNAT**: a plain client idles for 3× the router's idle
//!   timeout, then sends. Direct, the message is lost (the router forgot the flow and drops
//!   it). Through `tether::proxy` on the client host, it arrives: the proxy's upstream leg
//!   sends keepalive probes under the router's timeout.
//! - **The one-slot bridge**: a server that takes one connection at a time and never uses
//!   keepalive. Its client vanishes (router blackhole, then the client host forgets its
//!   socket, like a phone that left coverage and was switched off). Behind the proxy, the
//!   slot frees within the bound (the proxy's client leg times out, the upstream leg gets
//!   RST) and a new client gets in; without the proxy the slot stays taken.
//!
//! They need root, nftables, conntrack, iproute2 and python3; without them (or with
//! TETHER_LAB_SKIP set) each test reports `SKIP: <test>: <reason>` and returns (scripts/test lists it as skipped).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether::proxy::{Leg, Proxy, ProxyConfig, ProxyEvent};
use tether::{DisconnectReason, Policy};
use tether_lab::report::BOUND_SLACK;
use tether_lab::topology::{Invalid, RouterConfig};
use tether_lab::{Role, Shape, Topology};
use tether_proto::presets::PathSpec;

fn skip(test: &str) -> bool {
    let why = if std::env::var_os("TETHER_LAB_SKIP").is_some() {
        Some("TETHER_LAB_SKIP is set".to_owned())
    } else if let Err(e) = tether_lab::check_environment() {
        Some(e.to_string())
    } else if Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .map_or(true, |s| !s.success())
    {
        Some("python3 not found".to_owned())
    } else {
        None
    };
    match why {
        Some(why) => {
            tether_lab::report_skip(test, &why);
            true
        }
        None => false,
    }
}

/// Put before every script: `say(text)` prints one line in one write under a lock. Python's
/// `print` writes the text and the newline in two writes, so two threads printing at once can
/// give `got firstgot first` and an empty line (CI once lost a `got first` that way).
const SAY: &str = r#"
import sys, threading
_out = threading.Lock()
def say(text):
    with _out:
        sys.stdout.write(text + "\n"); sys.stdout.flush()
"#;

/// A python3 program in a namespace; its stdout lines arrive with their arrival time. Scripts
/// print with `say` (see [`SAY`]).
struct Program {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    name: &'static str,
}

impl Program {
    fn start(name: &'static str, ns: &str, script: &str, args: &[&str]) -> Program {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-u", "-c"])
            .arg(format!("{SAY}{script}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 in the namespace");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Program { child, lines, name }
    }

    /// The first line (from now) that starts with `prefix`, within `limit`.
    fn wait_for(&self, prefix: &str, limit: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.starts_with(prefix) => return Some((at, line)),
                Ok((_, line)) => eprintln!("{}: {line}", self.name),
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tether::proxy` running on its own thread inside a namespace.
struct NsProxy {
    addr: SocketAddr,
    events: mpsc::Receiver<(Instant, ProxyEvent)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsProxy {
    fn start(ns: &str, cfg: ProxyConfig) -> NsProxy {
        let ns = ns.to_owned();
        let (addr_tx, addr_rx) = mpsc::channel();
        let (ev_tx, events) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            tether_lab::enter_netns(&ns).expect("enter the namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let proxy = Proxy::bind(cfg).await.expect("bind the proxy");
                let _ = addr_tx.send(proxy.local_addr());
                tokio::select! {
                    () = proxy.run(move |ev| { let _ = ev_tx.send((Instant::now(), ev)); }) => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy started");
        NsProxy {
            addr,
            events,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The next `Closed` event within `limit`.
    fn closed(&self, limit: Duration) -> Option<(Instant, tether::proxy::RelayEnd)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((at, ProxyEvent::Closed { end, .. })) => return Some((at, end)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints `got LINE` for every line received, on any number of connections.
const LINE_SERVER: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16); say("listening")
def serve(c):
    for line in c.makefile("r"):
        say("got " + line.strip())
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends `first`, idles, sends `second`; knows nothing of keepalive.
const IDLE_CLIENT: &str = r#"
import socket, sys, time
host, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
c = socket.create_connection((host, port))
c.sendall(b"first\n"); say("sent first")
time.sleep(idle)
try:
    c.sendall(b"second\n"); say("sent second")
except OSError as e:
    say("send failed " + repr(e))
sys.stdin.read()
"#;

#[test]
fn idle_bot_behind_outbound_snat_keeps_its_flow_through_the_proxy() {
    if skip("idle bot behind outbound SNAT") {
        return;
    }
    let router_idle = Duration::from_secs(4);
    let topo = Topology::create(Shape::OutboundNat).expect("topology");
    topo.configure_router(RouterConfig {
        idle_timeout: Some(router_idle),
        invalid: Invalid::Drop,
    })
    .expect("router");
    let server_ip = topo.host_addr(Role::Server).to_string();
    let server = Program::start(
        "server",
        topo.netns(Role::Server),
        LINE_SERVER,
        &[&server_ip, "7000"],
    );
    server
        .wait_for("listening", Duration::from_secs(10))
        .expect("server up");

    // The proxy on the client host, told the path's idle timeout.
    let policy = Policy::derive(
        Duration::from_secs(6),
        Some(PathSpec::parse("4").expect("path")),
    )
    .expect("policy");
    let keepalive = policy.keepalive.expect("keepalive derived");
    assert!(keepalive.idle < router_idle / 2, "{keepalive:?}");
    let proxy = NsProxy::start(
        topo.netns(Role::Client),
        ProxyConfig::new("127.0.0.1:0".parse().expect("addr"), topo.connect_addr()).policy(policy),
    );

    let idle = (router_idle * 3).as_secs_f64().to_string();
    let target = topo.connect_addr();
    // Both clients at once: the same router, the same idle time; only the proxy differs.
    let direct = Program::start(
        "direct client",
        topo.netns(Role::Client),
        IDLE_CLIENT,
        &[&target.ip().to_string(), &target.port().to_string(), &idle],
    );
    let proxied = Program::start(
        "proxied client",
        topo.netns(Role::Client),
        IDLE_CLIENT,
        &[
            &proxy.addr.ip().to_string(),
            &proxy.addr.port().to_string(),
            &idle,
        ],
    );
    let limit = Duration::from_secs(10);
    direct.wait_for("sent first", limit).expect("direct sent");
    proxied.wait_for("sent first", limit).expect("proxied sent");
    for _ in 0..2 {
        server
            .wait_for("got first", limit)
            .expect("both firsts arrive");
    }
    let long = router_idle * 3 + limit;
    direct
        .wait_for("sent second", long)
        .expect("direct sent second");
    proxied
        .wait_for("sent second", long)
        .expect("proxied sent second");

    // Exactly one "second" arrives: the proxied one. The direct one is dropped by the router,
    // which forgot the flow (its kernel retransmits into nothing).
    assert!(
        server.wait_for("got second", limit).is_some(),
        "the proxied client's message did not arrive"
    );
    eprintln!(
        "idle bot: after {idle} s idle behind a {router_idle:?} NAT, the proxied message arrived"
    );
    assert!(
        server
            .wait_for("got second", Duration::from_secs(6))
            .is_none(),
        "the direct client's message arrived too: the router did not expire the idle flow"
    );
    drop(proxied);
    drop(direct);
}

/// One connection at a time, no keepalive. A second client while the slot is taken gets
/// `busy` and is closed. Prints `taken`, and `freed REASON` when the holder goes.
const ONE_SLOT_BRIDGE: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16); say("listening")
lock = threading.Lock(); busy = [False]
def serve(c):
    try:
        c.sendall(b"welcome\n")
        while True:
            d = c.recv(1024)
            if not d:
                say("freed eof"); break
            c.sendall(d)
    except OSError as e:
        say("freed " + type(e).__name__)
    finally:
        c.close()
        with lock: busy[0] = False
while True:
    c, _ = s.accept()
    with lock:
        taken = busy[0]; busy[0] = True
    if taken:
        c.sendall(b"busy\n"); c.close(); continue
    say("taken")
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects, prints the first line it gets, then waits.
const SLOT_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
say("reply " + c.makefile("r").readline().strip())
sys.stdin.read()
"#;

#[test]
fn one_slot_bridge_frees_its_slot_behind_the_proxy_when_the_client_vanishes() {
    if skip("one-slot bridge") {
        return;
    }
    let topo = Topology::create(Shape::OutboundNat).expect("topology");
    topo.configure_router(RouterConfig {
        idle_timeout: None,
        invalid: Invalid::Drop,
    })
    .expect("router");
    let server_ns = topo.netns(Role::Server);
    let client_ns = topo.netns(Role::Client);
    let server_ip = topo.host_addr(Role::Server).to_string();
    let limit = Duration::from_secs(10);

    // Two identical bridges on the server host: one reached directly (port 7002), one only
    // through the proxy (loopback 7001, proxy on 7000).
    let direct_bridge = Program::start(
        "direct bridge",
        server_ns,
        ONE_SLOT_BRIDGE,
        &[&server_ip, "7002"],
    );
    let proxied_bridge = Program::start(
        "proxied bridge",
        server_ns,
        ONE_SLOT_BRIDGE,
        &["127.0.0.1", "7001"],
    );
    direct_bridge
        .wait_for("listening", limit)
        .expect("bridge up");
    proxied_bridge
        .wait_for("listening", limit)
        .expect("bridge up");
    let detect = Duration::from_secs(4);
    let policy = Policy::derive(detect, None).expect("policy");
    let proxy = NsProxy::start(
        server_ns,
        ProxyConfig::new(topo.listen_addr(), "127.0.0.1:7001".parse().expect("addr"))
            .policy(policy),
    );

    // The first clients take both slots.
    let a_direct = Program::start(
        "client A direct",
        client_ns,
        SLOT_CLIENT,
        &[&server_ip, "7002"],
    );
    let a_proxied = Program::start(
        "client A proxied",
        client_ns,
        SLOT_CLIENT,
        &[&server_ip, "7000"],
    );
    for (c, b) in [(&a_direct, &direct_bridge), (&a_proxied, &proxied_bridge)] {
        assert_eq!(
            c.wait_for("reply", limit).expect("reply").1,
            "reply welcome"
        );
        b.wait_for("taken", limit).expect("slot taken");
    }

    // The clients vanish: the path goes dark, then the client host forgets its sockets (its
    // RSTs die in the blackhole), as a phone that left coverage and was switched off.
    topo.blackhole().expect("blackhole");
    let t0 = Instant::now();
    topo.kill_sockets(Role::Client).expect("ss -K");
    drop(a_direct);
    drop(a_proxied);

    // Behind the proxy the slot frees within the bound, by an RST from the proxy.
    let (freed_at, how) = proxied_bridge
        .wait_for("freed", detect * 3)
        .expect("the proxied bridge's slot was never freed");
    let after = freed_at - t0;
    eprintln!("one-slot bridge: freed {after:?} after the client vanished (detect within {detect:?}): {how}");
    assert!(
        after.as_secs_f64() <= detect.as_secs_f64() * BOUND_SLACK + 1.0,
        "freed {after:?} after the client vanished; bound {detect:?}"
    );
    assert_eq!(
        how, "freed ConnectionResetError",
        "the proxy must reset the upstream leg"
    );
    let (_, end) = proxy.closed(limit).expect("proxy reported the end");
    assert!(
        matches!(
            end.reason,
            DisconnectReason::KeepaliveTimeout | DisconnectReason::UserTimeout
        ),
        "{end:?}"
    );
    assert_eq!(end.leg, Some(Leg::Client));
    assert!(end.abortive);
    eprintln!(
        "one-slot bridge: proxy reported {} on the {} leg",
        end.reason,
        Leg::Client.label()
    );

    // The path comes back; new clients arrive. Behind the proxy: welcome. Direct: busy, the
    // bridge still believes the vanished client holds the slot.
    topo.heal().expect("heal");
    let b_proxied = Program::start(
        "client B proxied",
        client_ns,
        SLOT_CLIENT,
        &[&server_ip, "7000"],
    );
    let b_direct = Program::start(
        "client B direct",
        client_ns,
        SLOT_CLIENT,
        &[&server_ip, "7002"],
    );
    assert_eq!(
        b_proxied.wait_for("reply", limit).expect("reply").1,
        "reply welcome"
    );
    assert_eq!(
        b_direct.wait_for("reply", limit).expect("reply").1,
        "reply busy"
    );
    assert!(
        direct_bridge
            .wait_for("freed", Duration::from_millis(200))
            .is_none(),
        "the direct bridge noticed the vanished client after all"
    );
}

/// Sends a line every 200 ms to whoever connects (the upstream keeps talking).
const TALKER: &str = r#"
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16); say("listening")
def talk(c):
    try:
        while True:
            c.sendall(b"tick\n"); time.sleep(0.2)
    except OSError as e:
        say("ended " + type(e).__name__)
while True:
    c, _ = s.accept()
    threading.Thread(target=talk, args=(c,), daemon=True).start()
"#;

#[test]
fn data_stuck_towards_a_vanished_client_is_a_user_timeout() {
    if skip("user-timeout vs keepalive-timeout") {
        return;
    }
    let topo = Topology::create(Shape::OutboundNat).expect("topology");
    topo.configure_router(RouterConfig {
        idle_timeout: None,
        invalid: Invalid::Drop,
    })
    .expect("router");
    let server_ns = topo.netns(Role::Server);
    let server_ip = topo.host_addr(Role::Server).to_string();
    let limit = Duration::from_secs(10);
    let talker = Program::start("talker", server_ns, TALKER, &["127.0.0.1", "7001"]);
    talker.wait_for("listening", limit).expect("talker up");
    let detect = Duration::from_secs(4);
    let proxy = NsProxy::start(
        server_ns,
        ProxyConfig::new(topo.listen_addr(), "127.0.0.1:7001".parse().expect("addr"))
            .policy(Policy::derive(detect, None).expect("policy")),
    );
    let client = Program::start(
        "client",
        topo.netns(Role::Client),
        SLOT_CLIENT,
        &[&server_ip, "7000"],
    );
    assert_eq!(
        client.wait_for("reply", limit).expect("reply").1,
        "reply tick"
    );

    // The client vanishes while the upstream keeps sending: the proxy's client leg has
    // unacknowledged data, so TCP_USER_TIMEOUT (not keepalive) ends it.
    topo.blackhole().expect("blackhole");
    let t0 = Instant::now();
    topo.kill_sockets(Role::Client).expect("ss -K");
    drop(client);
    let (at, end) = proxy.closed(detect * 3).expect("proxy reported the end");
    let after = at - t0;
    eprintln!(
        "talker: {} on the client leg {after:?} after the client vanished",
        end.reason
    );
    assert_eq!(end.reason, DisconnectReason::UserTimeout, "{end:?}");
    assert_eq!(end.leg, Some(Leg::Client));
    assert!(
        after.as_secs_f64() <= detect.as_secs_f64() * BOUND_SLACK + 1.0,
        "{after:?}"
    );
    // And the upstream program learns at once: its next send fails with a reset.
    let (_, how) = talker.wait_for("ended", limit).expect("talker noticed");
    assert_eq!(how, "ended ConnectionResetError");
}
