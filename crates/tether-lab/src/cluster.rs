//! The cluster lab: a clients namespace, a router that load-balances one virtual address over
//! N server namespaces, and a Redis namespace — for running real `tether serve --cluster`
//! nodes and breaking them (kill a node, cut a node off from Redis, restart Redis).
//!
//! ```text
//!                         ┌ tlabKr (router) ──────────────────────────┐   ┌ tlabKn1 ─────┐
//!   ┌ tlabKc ─────┐ veth  │ VIP B+15/32 on lo                          ├───┤ eth0 B+2/31  │ node 1
//!   │ eth0 B+0/31 ├───────┤ c0 B+1/31                                  │   └──────────────┘
//!   │ default→B+1 │       │ dnat VIP:7000 → numgen inc mod k map {     │   ┌ tlabKn2 ─────┐
//!   └─────────────┘       │   0: node, 1: node, … }  (live nodes only: ├───┤ eth0 B+4/31  │ node 2
//!    clients, and the     │   health checks rewrite the map)           │   └──────────────┘
//!    test's backend (it   │ chain faults (forward): partitions         │   ┌ tlabKn3 ─────┐
//!    reaches every node's │                                            ├───┤ eth0 B+6/31  │ node 3
//!    own address too)     │ nN B+3+2(N-1)/31, d0 B+2+2n+1/31           │   └──────────────┘
//!                         └──────────────────────────────────┬────────┘   ┌ tlabKd ──────┐
//!                                                            └────────────┤ eth0 B+2+2n  │ Redis
//!                                                                         └──────────────┘
//! ```
//!
//! Every namespace routes everything through the router (default route via its /31 peer), so
//! the router's forward chain sees every packet between any two hosts and a partition is one
//! nft rule. B is the run's /28 block (see [`topology`]); the slot is claimed
//! like every lab run's, so cluster runs and matrix runs never collide. Point-to-point /31
//! links (RFC 3021) fit five nodes, the clients, Redis and the VIP in 16 addresses.
//!
//! Processes (`redis-server`, `tether serve`) run through `ip netns exec` as [`LabProcess`]es:
//! killed by pid when dropped, and by the lab's SIGINT/SIGTERM handler. Dropping the
//! [`ClusterTopology`] deletes every namespace (and with them the veths, rules and conntrack
//! entries).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::LabError;
use crate::sys;
use crate::topology::{self, PORT};

/// The most server namespaces a cluster topology has (the /28 block's addresses).
pub const MAX_NODES: usize = 5;

/// A live cluster topology: clients, router, `nodes` server namespaces and Redis. Dropping it
/// deletes its namespaces; stop its processes first (drop them before it).
#[derive(Debug)]
pub struct ClusterTopology {
    base: u32,
    nodes: usize,
    /// client, router, node 1..=n, redis.
    names: Vec<String>,
    backends: Mutex<Vec<usize>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left plain data behind; keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClusterTopology {
    /// Creates the namespaces, veths, addresses, routes and the router's rules, with every
    /// node behind the virtual address.
    pub fn create(nodes: usize) -> Result<ClusterTopology, LabError> {
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(LabError::Invalid {
                what: "cluster nodes",
                value: nodes.to_string(),
                expected: format!("1 to {MAX_NODES}"),
            });
        }
        let slot = topology::claim_slot()?;
        let mut names = vec![format!("tlab{slot}c"), format!("tlab{slot}r")];
        names.extend((1..=nodes).map(|i| format!("tlab{slot}n{i}")));
        names.push(format!("tlab{slot}d"));
        let topo = ClusterTopology {
            base: topology::slot_base(slot),
            nodes,
            names,
            backends: Mutex::new(Vec::new()),
        };
        // From here on `topo`'s Drop removes whatever was made (the router namespace exists).
        for (i, name) in topo.names.iter().enumerate() {
            if i != 1 {
                topology::add_netns(name)?;
            }
        }
        topo.wire()?;
        topo.set_backends(&(0..nodes).collect::<Vec<_>>())?;
        Ok(topo)
    }

    fn ip(&self, offset: usize) -> Ipv4Addr {
        Ipv4Addr::from(self.base + offset as u32)
    }

    /// How many server namespaces.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The clients' namespace (the test's backend runs there too).
    pub fn client_netns(&self) -> &str {
        &self.names[0]
    }

    /// The router's namespace.
    pub fn router_netns(&self) -> &str {
        &self.names[1]
    }

    /// Node `i`'s namespace (0-based).
    pub fn node_netns(&self, i: usize) -> &str {
        &self.names[2 + i]
    }

    /// Redis's namespace.
    pub fn redis_netns(&self) -> &str {
        &self.names[2 + self.nodes]
    }

    /// Every namespace: clients, router, nodes, Redis.
    pub fn names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// Node `i`'s address (0-based).
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        self.ip(2 + 2 * i)
    }

    /// Redis's host address.
    pub fn redis_addr(&self) -> Ipv4Addr {
        self.ip(2 + 2 * self.nodes)
    }

    /// The clients' host address.
    pub fn client_addr(&self) -> Ipv4Addr {
        self.ip(0)
    }

    /// The virtual address clients connect to ([`PORT`]): the router balances it over the
    /// live nodes.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip(15), PORT))
    }

    fn wire(&self) -> Result<(), LabError> {
        let r = self.router_netns();
        let mut router = "link set lo up\n".to_string();
        router += &format!("addr add {}/32 dev lo\n", self.ip(15));
        // (namespace, its own offset, the router's interface name)
        let mut hosts = vec![(self.client_netns(), 0, "c0".to_string())];
        for i in 0..self.nodes {
            hosts.push((self.node_netns(i), 2 + 2 * i, format!("n{}", i + 1)));
        }
        hosts.push((self.redis_netns(), 2 + 2 * self.nodes, "d0".to_string()));
        for (ns, off, rif) in &hosts {
            sys::run(
                "ip",
                &[
                    "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", rif, "netns",
                    r,
                ],
                None,
            )?;
            let host = format!(
                "link set lo up\naddr add {}/31 dev eth0\nlink set eth0 up\nroute add default via {}\n",
                self.ip(*off),
                self.ip(off + 1)
            );
            sys::run("ip", &["-n", ns, "-batch", "-"], Some(&host))?;
            router += &format!(
                "addr add {}/31 dev {rif}\nlink set {rif} up\n",
                self.ip(off + 1)
            );
        }
        sys::run("ip", &["-n", r, "-batch", "-"], Some(&router))?;
        let ruleset = "table ip tetherlab {\n    chain prerouting {\n      type nat hook prerouting priority dstnat; policy accept;\n    }\n    chain faults {\n      type filter hook forward priority -10; policy accept;\n    }\n}\n";
        sys::run_in(r, "nft", &["-f", "-"], Some(ruleset))?;
        sys::run_in(r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
        Ok(())
    }

    /// Puts exactly `nodes` (0-based) behind the virtual address, round robin
    /// (`numgen inc`); none: connects to the VIP are refused by the router. Established
    /// flows keep their node (conntrack).
    pub fn set_backends(&self, nodes: &[usize]) -> Result<(), LabError> {
        let mut script = "flush chain ip tetherlab prerouting\n".to_string();
        let to = match nodes {
            [] => None,
            [one] => Some(self.node_addr(*one).to_string()),
            many => Some(format!(
                "numgen inc mod {} map {{ {} }}",
                many.len(),
                many.iter()
                    .enumerate()
                    .map(|(k, &n)| format!("{k} : {}", self.node_addr(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        if let Some(to) = to {
            script += &format!(
                "add rule ip tetherlab prerouting ip daddr {} tcp dport {PORT} dnat to {to}\n",
                self.ip(15)
            );
        }
        sys::run_in(self.router_netns(), "nft", &["-f", "-"], Some(&script))?;
        *lock(&self.backends) = nodes.to_vec();
        Ok(())
    }

    /// The nodes behind the virtual address now.
    pub fn backends(&self) -> Vec<usize> {
        lock(&self.backends).clone()
    }

    /// Cuts node `i` off from Redis in both directions (the router drops what passes between
    /// them); clients still reach the node. Undone by [`heal`](Self::heal).
    pub fn partition_from_redis(&self, i: usize) -> Result<(), LabError> {
        let (n, d) = (self.node_addr(i), self.redis_addr());
        let script = format!(
            "add rule ip tetherlab faults ip saddr {n} ip daddr {d} drop\nadd rule ip tetherlab faults ip saddr {d} ip daddr {n} drop\n"
        );
        sys::run_in(self.router_netns(), "nft", &["-f", "-"], Some(&script)).map(drop)
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<(), LabError> {
        sys::run_in(
            self.router_netns(),
            "nft",
            &["flush", "chain", "ip", "tetherlab", "faults"],
            None,
        )
        .map(drop)
    }

    /// Starts `program args…` in namespace `ns` (`ip netns exec`, which execs it: the pid is
    /// the program's). Its stdout and stderr lines are kept (see [`LabProcess::log`]).
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<LabProcess, LabError> {
        LabProcess::spawn(ns, name, program, args)
    }

    /// Health checks like a cloud load balancer's: every `every`, a TCP connect from the
    /// router to each node's `port` (300 ms timeout); the nodes that answer are put behind
    /// the virtual address whenever that set changes. Stops when the returned guard drops.
    pub fn health_checks(self: &Arc<Self>, port: u16, every: Duration) -> HealthChecks {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (topo, st, ch) = (self.clone(), stop.clone(), changes.clone());
        let thread = crate::spawn_in_netns(self.router_netns(), move || {
            while !st.load(Ordering::SeqCst) {
                let alive: Vec<usize> = (0..topo.nodes)
                    .filter(|&i| {
                        let a = SocketAddr::V4(SocketAddrV4::new(topo.node_addr(i), port));
                        TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
                    })
                    .collect();
                if alive != topo.backends() {
                    match topo.set_backends(&alive) {
                        Ok(()) => lock(&ch).push((Instant::now(), alive)),
                        Err(e) => tracing::warn!("health checks: {e}"),
                    }
                }
                std::thread::sleep(every);
            }
        });
        HealthChecks {
            stop,
            changes,
            thread: Some(thread),
        }
    }
}

impl Drop for ClusterTopology {
    fn drop(&mut self) {
        topology::delete_netns(&self.names);
    }
}

/// When the set of nodes behind the virtual address changed, and to what.
pub type BackendChanges = Vec<(Instant, Vec<usize>)>;

/// The running health checks of [`ClusterTopology::health_checks`]; dropping stops them.
#[derive(Debug)]
pub struct HealthChecks {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<BackendChanges>>,
    thread: Option<JoinHandle<()>>,
}

impl HealthChecks {
    /// When the set of nodes behind the virtual address changed, and to what.
    pub fn changes(&self) -> BackendChanges {
        lock(&self.changes).clone()
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process in a lab namespace, SIGKILLed (by its pid) and reaped when dropped or
/// [`kill`](Self::kill)ed. Its output lines are kept in memory.
#[derive(Debug)]
pub struct LabProcess {
    name: String,
    proc: topology::Reaped,
    log: Arc<Mutex<Vec<String>>>,
}

impl LabProcess {
    fn spawn<S: AsRef<OsStr>>(
        ns: &str,
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<LabProcess, LabError> {
        let program = program.as_ref();
        let what = format!("ip netns exec {ns} {}", program.to_string_lossy());
        let ip = sys::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: what,
            source,
        })?;
        let mut proc = topology::Reaped::new(child);
        let log = Arc::new(Mutex::new(Vec::new()));
        let out = proc
            .child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>);
        let err = proc
            .child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let keep = log.clone();
            let _ = std::thread::Builder::new()
                .name(format!("lab-{name}-log"))
                .spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        lock(&keep).push(line);
                    }
                });
        }
        Ok(LabProcess {
            name: name.to_owned(),
            proc,
            log,
        })
    }

    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Every output line so far (stdout and stderr, each in order).
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    /// How many output lines contain `what`.
    pub fn count(&self, what: &str) -> usize {
        lock(&self.log).iter().filter(|l| l.contains(what)).count()
    }

    /// Waits until an output line contains `what`, at most `within`; false when it did not
    /// come (or the process exited first).
    pub fn wait_for(&mut self, what: &str, within: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.count(what) > 0 {
                return true;
            }
            if t.elapsed() > within || self.exited() {
                // One last look: the line may have been read just now.
                return self.count(what) > 0;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it has exited (reaped here).
    pub fn exited(&mut self) -> bool {
        self.proc.exited()
    }

    /// SIGSTOP: the process hangs (its kernel still accepts connections and data for it,
    /// nothing is read or answered) until killed.
    pub fn freeze(&self) {
        self.proc.signal(libc::SIGSTOP);
    }

    /// SIGKILL and reap (also when dropped).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}
