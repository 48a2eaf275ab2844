//! Three namespaces, `client` — `router` — `server`, joined by two veth pairs, with nftables
//! NAT and conntrack on the router. Every run gets its own names and addresses, and an RAII
//! guard (plus a SIGINT/SIGTERM handler) removes everything it made.
//!
//! ```text
//!   outbound-nat (router masquerades the client: cloud VM SNAT, home/carrier NAT)
//!
//!   ┌ tlabNc ─────┐  veth  ┌ tlabNr ─────────────────┐  veth  ┌ tlabNs ─────┐
//!   │ eth0 B+1/30 ├────────┤ c0 B+2/30     s0 B+5/30 ├────────┤ eth0 B+6/30 │
//!   │ default→B+2 │        │ masquerade out of s0    │        │ (no route   │
//!   └─────────────┘        │ conntrack, loose=0      │        │  to client) │
//!     connects to B+6      └─────────────────────────┘        └─────────────┘
//!
//!   inbound-lb (router DNATs a virtual address to the server: cloud load balancer)
//!
//!     connects to B+9      ┌ router: B+9/32 on lo ───┐        server sees the
//!     (the VIP)            │ dnat B+9:7000 → B+6:7000 │        client's address
//!                          └─────────────────────────┘        default→B+5
//! ```
//!
//! B is the run's /28 block in 198.18.0.0/15, the range RFC 2544 reserves for benchmarking,
//! so nothing can route outside; the root namespace gets no address or route for it. The
//! veths are created directly inside the namespaces (`ip -n C link add … peer … netns R`), so
//! deleting the namespaces deletes them, and with them every nft rule and conntrack entry.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::error::LabError;
use crate::sys;

/// The port every lab server listens on (each run has its own namespaces).
pub const PORT: u16 = 7000;

/// How many /28 blocks 198.18.0.0/15 holds: the number of runs that can exist at once.
const SLOTS: u32 = 8192;

/// Which way the router stands between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Shape {
    /// The router masquerades the client (source NAT), like a cloud VM's outbound SNAT or a
    /// home/carrier NAT: a bot behind NAT talking to a server.
    OutboundNat,
    /// The router forwards a virtual address to the server (destination NAT), like a cloud
    /// load balancer in front of a server.
    InboundLb,
}

impl Shape {
    /// Every shape, in display order.
    pub const ALL: [Shape; 2] = [Shape::OutboundNat, Shape::InboundLb];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Shape::OutboundNat => "outbound-nat",
            Shape::InboundLb => "inbound-lb",
        }
    }

    /// One line on what the shape models.
    pub fn describe(self) -> &'static str {
        match self {
            Shape::OutboundNat => {
                "router masquerades the client (cloud VM outbound SNAT, home or carrier NAT)"
            }
            Shape::InboundLb => {
                "router DNATs a virtual address to the server (cloud load balancer)"
            }
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Shape {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Shape, LabError> {
        Shape::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| LabError::Invalid {
                what: "topology",
                value: s.to_string(),
                expected: "outbound-nat or inbound-lb".into(),
            })
    }
}

/// One of the two hosts at the ends of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The host that connects.
    Client,
    /// The host that listens.
    Server,
}

impl Role {
    /// `client` or `server`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }

    /// The other end.
    pub fn other(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the router does with packets conntrack no longer knows (state INVALID), in both the
/// forward and the input hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Drop silently (Azure LB, Azure SNAT).
    Drop,
    /// Answer with a TCP RST (AWS NLB, AWS NAT gateway).
    Reset,
}

/// How the router is set up for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterConfig {
    /// Conntrack's idle timeout for established TCP flows (whole seconds; the per-namespace
    /// `nf_conntrack_tcp_timeout_established`). `None` keeps the kernel default (5 days).
    pub idle_timeout: Option<Duration>,
    /// What happens to packets of a forgotten flow.
    pub invalid: Invalid,
}

/// A live lab topology. Dropping it deletes its namespaces (and with them the veths, nft
/// rules and conntrack entries).
#[derive(Debug)]
pub struct Topology {
    shape: Shape,
    slot: u32,
    names: [String; 3],
}

/// Namespaces (and peer processes) alive in this process, for the signal handler.
static LIVE_NETNS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LIVE_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static NEXT: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left plain data behind; keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn register_pid(pid: u32) {
    lock(&LIVE_PIDS).push(pid);
}

fn unregister_pid(pid: u32) {
    lock(&LIVE_PIDS).retain(|p| *p != pid);
}

/// A child process of the lab (a peer, a client command, a cluster node): known to the
/// SIGINT/SIGTERM handler from its start, SIGKILLed (by its pid) and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Reaped {
    /// The process (its pipes are the owner's to take).
    pub(crate) child: std::process::Child,
    pid: u32,
    reaped: bool,
}

impl Reaped {
    /// Takes over `child`.
    pub(crate) fn new(child: std::process::Child) -> Reaped {
        let pid = child.id();
        register_pid(pid);
        Reaped {
            child,
            pid,
            reaped: false,
        }
    }

    /// Its pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` unless it has been reaped.
    pub(crate) fn signal(&self, signal: i32) {
        if self.reaped {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill only sends a signal; the pid is our child and not reaped yet, so
            // it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Whether it has exited (reaped here if so).
    pub(crate) fn exited(&mut self) -> bool {
        if !self.reaped && matches!(self.child.try_wait(), Ok(Some(_))) {
            unregister_pid(self.pid);
            self.reaped = true;
        }
        self.reaped
    }

    /// SIGKILL (`ip netns exec` execs the program, so the pid is the program's) and reap.
    pub(crate) fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        unregister_pid(self.pid);
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Installs (once per process) a SIGINT/SIGTERM handler that deletes every live lab
/// namespace, kills every peer process, and exits with 128 + the signal number.
pub fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::warn!("no signal cleanup: {e}");
                return;
            }
        };
        use tokio::signal::unix::{signal, SignalKind};
        // Register before returning, so that the handler is in place before the first
        // namespace exists.
        let handlers = {
            let _guard = rt.enter();
            signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
        };
        let (mut int, mut term) = match handlers {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("no signal cleanup: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("lab-signals".into())
            .spawn(move || {
                let signo = rt.block_on(async {
                    tokio::select! {
                        _ = int.recv() => libc::SIGINT,
                        _ = term.recv() => libc::SIGTERM,
                    }
                });
                cleanup_all();
                eprintln!("tether-lab: signal {signo}: lab namespaces removed");
                std::process::exit(128 + signo);
            });
        if let Err(e) = spawned {
            tracing::warn!("no signal cleanup: {e}");
        }
    });
}

/// Deletes every namespace and kills every peer process this process still has.
fn cleanup_all() {
    for pid in lock(&LIVE_PIDS).drain(..) {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill only sends a signal; the pid is a child we spawned and have not
            // reaped (we unregister before reaping), so it cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let names: Vec<String> = lock(&LIVE_NETNS).drain(..).collect();
    for name in names {
        let _ = sys::run("ip", &["netns", "delete", &name], None);
    }
}

/// Claims a free slot for a run: creates its router namespace `tlab{slot}r` (exclusive
/// across processes, so whoever creates it owns the slot), after the root check and with the
/// signal cleanup installed. The caller owns `tlab{slot}r` from here on and deletes it with
/// [`delete_netns`].
pub(crate) fn claim_slot() -> Result<u32, LabError> {
    sys::check_environment()?;
    install_signal_cleanup();
    let start = (std::process::id().wrapping_mul(2_654_435_761) >> 7)
        .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(7));
    for i in 0..SLOTS {
        let slot = (start.wrapping_add(i)) % SLOTS;
        let router = format!("tlab{slot}r");
        lock(&LIVE_NETNS).push(router.clone());
        match sys::run("ip", &["netns", "add", &router], None) {
            Ok(_) => return Ok(slot),
            Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {
                lock(&LIVE_NETNS).retain(|n| *n != router);
            }
            Err(e) => {
                lock(&LIVE_NETNS).retain(|n| *n != router);
                return Err(e);
            }
        }
    }
    Err(LabError::NoSlot {
        live: SLOTS as usize,
    })
}

/// Creates namespace `name`, known to the signal handler from before it exists.
pub(crate) fn add_netns(name: &str) -> Result<(), LabError> {
    lock(&LIVE_NETNS).push(name.to_owned());
    sys::run("ip", &["netns", "add", name], None).map(drop)
}

/// Deletes namespaces `names` (and with them their veths, nft rules and conntrack entries);
/// errors are ignored (a namespace that was never created).
pub(crate) fn delete_netns(names: &[String]) {
    for name in names {
        let _ = sys::run("ip", &["netns", "delete", name], None);
    }
    lock(&LIVE_NETNS).retain(|n| !names.contains(n));
}

/// The first address of `slot`'s /28 block in 198.18.0.0/15.
pub(crate) fn slot_base(slot: u32) -> u32 {
    u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 16
}

fn ip4(base: u32, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(base + offset)
}

/// Address `offset` of `slot`'s /28 block.
pub(crate) fn slot_addr(slot: u32, offset: u32) -> Ipv4Addr {
    ip4(slot_base(slot), offset)
}

impl Topology {
    /// Creates the three namespaces and the veths, addresses and routes for `shape`. The
    /// router is not configured yet: see [`Topology::configure_router`].
    pub fn create(shape: Shape) -> Result<Topology, LabError> {
        let slot = claim_slot()?;
        let topo = Topology {
            shape,
            slot,
            names: [
                format!("tlab{slot}c"),
                format!("tlab{slot}r"),
                format!("tlab{slot}s"),
            ],
        };
        // From here on `topo`'s Drop cleans up whatever was made.
        for name in [&topo.names[0], &topo.names[2]] {
            add_netns(name)?;
        }
        topo.wire()?;
        Ok(topo)
    }

    fn base(&self) -> u32 {
        slot_base(self.slot)
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The namespace names: client, router, server.
    pub fn names(&self) -> [&str; 3] {
        [&self.names[0], &self.names[1], &self.names[2]]
    }

    /// The namespace of `role`'s host.
    pub fn netns(&self, role: Role) -> &str {
        match role {
            Role::Client => &self.names[0],
            Role::Server => &self.names[2],
        }
    }

    /// The router's namespace.
    pub fn router_netns(&self) -> &str {
        &self.names[1]
    }

    /// The address of `role`'s host.
    pub fn host_addr(&self, role: Role) -> Ipv4Addr {
        match role {
            Role::Client => ip4(self.base(), 1),
            Role::Server => ip4(self.base(), 6),
        }
    }

    /// Where the server listens.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.host_addr(Role::Server), PORT))
    }

    /// Where the client connects: the server itself behind the NAT, or the VIP of the
    /// load balancer.
    pub fn connect_addr(&self) -> SocketAddr {
        let ip = match self.shape {
            Shape::OutboundNat => self.host_addr(Role::Server),
            Shape::InboundLb => ip4(self.base(), 9),
        };
        SocketAddr::V4(SocketAddrV4::new(ip, PORT))
    }

    fn wire(&self) -> Result<(), LabError> {
        let b = self.base();
        let [c, r, s] = self.names();
        sys::run(
            "ip",
            &[
                "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "c0", "netns", r,
            ],
            None,
        )?;
        sys::run(
            "ip",
            &[
                "-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "s0", "netns", r,
            ],
            None,
        )?;
        let client = format!(
            "link set lo up\naddr add {}/30 dev eth0\nlink set eth0 up\nroute add default via {}\n",
            ip4(b, 1),
            ip4(b, 2)
        );
        let mut server = format!(
            "link set lo up\naddr add {}/30 dev eth0\nlink set eth0 up\n",
            ip4(b, 6)
        );
        let mut router = format!(
            "link set lo up\naddr add {}/30 dev c0\naddr add {}/30 dev s0\nlink set c0 up\nlink set s0 up\n",
            ip4(b, 2),
            ip4(b, 5)
        );
        if self.shape == Shape::InboundLb {
            // The server answers the client's own address: it needs a way back.
            server += &format!("route add default via {}\n", ip4(b, 5));
            router += &format!("addr add {}/32 dev lo\n", ip4(b, 9));
        }
        sys::run("ip", &["-n", c, "-batch", "-"], Some(&client))?;
        sys::run("ip", &["-n", s, "-batch", "-"], Some(&server))?;
        sys::run("ip", &["-n", r, "-batch", "-"], Some(&router))?;
        Ok(())
    }

    /// Sets up the router: forwarding, strict conntrack (`nf_conntrack_tcp_loose=0`, so a
    /// forgotten flow is not picked up again mid-stream), the NAT of the shape, INVALID
    /// packets dropped or reset in the forward *and* input hooks, and the idle timeout.
    pub fn configure_router(&self, cfg: RouterConfig) -> Result<(), LabError> {
        let b = self.base();
        let nat = match self.shape {
            Shape::OutboundNat => "    chain postrouting {\n      type nat hook postrouting priority srcnat; policy accept;\n      oifname \"s0\" masquerade\n    }\n".to_string(),
            Shape::InboundLb => format!(
                "    chain prerouting {{\n      type nat hook prerouting priority dstnat; policy accept;\n      ip daddr {} tcp dport {PORT} dnat ip to {}:{PORT}\n    }}\n",
                ip4(b, 9),
                ip4(b, 6)
            ),
        };
        let invalid = match cfg.invalid {
            Invalid::Drop => "ct state invalid drop",
            Invalid::Reset => "ct state invalid meta l4proto tcp reject with tcp reset\n      ct state invalid drop",
        };
        let ruleset = format!(
            "table inet tetherlab {{\n{nat}    chain faults {{\n      type filter hook forward priority -10; policy accept;\n    }}\n    chain forward {{\n      type filter hook forward priority filter; policy accept;\n      {invalid}\n    }}\n    chain input {{\n      type filter hook input priority filter; policy accept;\n      {invalid}\n    }}\n}}\n"
        );
        let r = self.router_netns();
        // The ruleset first: it makes sure conntrack is loaded, so its sysctls exist.
        sys::run_in(r, "nft", &["-f", "-"], Some(&ruleset))?;
        let mut sysctls = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.netfilter.nf_conntrack_tcp_loose=0".to_string(),
        ];
        if let Some(t) = cfg.idle_timeout {
            sysctls.push(format!(
                "net.netfilter.nf_conntrack_tcp_timeout_established={}",
                t.as_secs().max(1)
            ));
        }
        let mut args = vec!["-qw"];
        args.extend(sysctls.iter().map(String::as_str));
        sys::run_in(r, "sysctl", &args, None)?;
        Ok(())
    }

    /// Drops every forwarded packet (`blackhole`): cable pulled, out of range, router dead.
    pub fn blackhole(&self) -> Result<(), LabError> {
        self.fault_rule("drop")
    }

    /// Drops every forwarded packet from or to `role`'s host (`host-crash`): the host is
    /// gone, nothing it had answers, nothing arrives from it.
    pub fn isolate(&self, role: Role) -> Result<(), LabError> {
        let a = self.host_addr(role);
        self.fault_rule(&format!("ip saddr {a} drop"))?;
        self.fault_rule(&format!("ip daddr {a} drop"))
    }

    /// Silently drops forwarded packets of flows the router no longer knows (INVALID), ahead
    /// of the configured answer — a router that rebooted drops them whatever its RST policy
    /// was. Undone by [`heal`](Self::heal).
    pub fn drop_invalid(&self) -> Result<(), LabError> {
        self.fault_rule("ct state invalid drop")
    }

    /// Removes every fault rule on the router.
    pub fn heal(&self) -> Result<(), LabError> {
        sys::run_in(
            self.router_netns(),
            "nft",
            &["flush", "chain", "inet", "tetherlab", "faults"],
            None,
        )
        .map(drop)
    }

    fn fault_rule(&self, rule: &str) -> Result<(), LabError> {
        let mut args = vec!["add", "rule", "inet", "tetherlab", "faults"];
        args.extend(rule.split(' '));
        sys::run_in(self.router_netns(), "nft", &args, None).map(drop)
    }

    /// Forgets every flow the router tracks (`conntrack -F`): the router rebooted.
    pub fn flush_conntrack(&self) -> Result<(), LabError> {
        sys::run_in(self.router_netns(), "conntrack", &["-F"], None).map(drop)
    }

    /// Takes `role`'s host off the network from the inside (its own nftables drop all input
    /// and output) or brings it back (`down = false`).
    pub fn host_down(&self, role: Role, down: bool) -> Result<(), LabError> {
        let ns = self.netns(role);
        if down {
            let ruleset = "table inet tetherlab_host {\n    chain host_in {\n      type filter hook input priority -300; policy drop;\n    }\n    chain host_out {\n      type filter hook output priority -300; policy drop;\n    }\n}\n";
            sys::run_in(ns, "nft", &["-f", "-"], Some(ruleset)).map(drop)
        } else {
            sys::run_in(
                ns,
                "nft",
                &["delete", "table", "inet", "tetherlab_host"],
                None,
            )
            .map(drop)
        }
    }

    /// Destroys every established TCP socket on `role`'s host (`ss -K`): the kernel forgets
    /// the connection as a reboot would. The application holding it gets an error; whatever
    /// the kernel tries to send is up to the host's own rules.
    pub fn kill_sockets(&self, role: Role) -> Result<(), LabError> {
        sys::run_in(
            self.netns(role),
            "ss",
            &["-K", "-t", "-n", "state", "established"],
            None,
        )
        .map(drop)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        delete_netns(&self.names);
    }
}
