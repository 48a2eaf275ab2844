//! Running cells: one fault, one method, one topology, both sides measured.
//!
//! ```text
//!  Topology::create ─▶ configure_router ─▶ server side (thread in tlabNs, or peer process)
//!        │                                   ▲ "listening"
//!        │                                   └─ client side (thread in tlabNc, or peer process)
//!        │                                        both: connect/handshake, greeting ─▶ "ready"
//!        ▼
//!  idle fault: wait 3 × timeout, both send ─┐   path/victim fault: inject at t0
//!                                           ▼   (user-timeout sides send one message)
//!            collect each measured side's first event until t0 + cap
//!            message arrived → survived · error → detected after (t − t0), reason
//!            nothing → not detected within the cap
//!        ▼
//!  Finish every side, join threads, kill peer process, drop Topology (namespaces deleted)
//! ```

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::client_cmd::ClientCommand;
use crate::error::LabError;
use crate::fault::{Fault, FaultKind};
use crate::method::{Method, Scale};
use crate::peer::{self, PeerCommand};
use crate::side::{self, Cmd, Event, SideSpec};
use crate::sys;
use crate::topology::{self, Invalid, Role, RouterConfig, Shape, Topology};

/// What one side of a cell experienced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The connection still delivered data after the fault (idle faults: after idling three
    /// middlebox timeouts).
    Survived,
    /// The side learned that the connection is gone, `after` the fault, with a reason.
    Detected {
        /// Time from the fault (idle faults: from the moment both sides sent) to detection.
        #[serde(serialize_with = "ser_secs")]
        after: Duration,
        /// tether's reason label (`heartbeat-timeout`, `peer-reset`, …).
        reason: String,
    },
    /// The side's idle timer closed the connection before the fault took effect: not a
    /// detection (an idle timer closes healthy idle connections too).
    ClosedIdle {
        /// Time from the last exchange to the close.
        #[serde(serialize_with = "ser_secs")]
        after: Duration,
        /// The reason reported (`idle-timeout`).
        reason: String,
    },
    /// Nothing happened within the cap: the side still believes in a dead connection.
    NotDetected {
        /// The cap.
        #[serde(serialize_with = "ser_secs")]
        cap: Duration,
    },
    /// The run itself failed (setup error); not a measurement.
    Error {
        /// What went wrong.
        message: String,
    },
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl Outcome {
    /// A short label: `survived`, `detected`, `closed-idle`, `not-detected`, `error`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Survived => "survived",
            Outcome::Detected { .. } => "detected",
            Outcome::ClosedIdle { .. } => "closed-idle",
            Outcome::NotDetected { .. } => "not-detected",
            Outcome::Error { .. } => "error",
        }
    }

    /// The detection (or close) time, if any.
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Outcome::Detected { after, .. } | Outcome::ClosedIdle { after, .. } => {
                Some(after.as_secs_f64())
            }
            _ => None,
        }
    }

    /// The reason, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Detected { reason, .. } | Outcome::ClosedIdle { reason, .. } => Some(reason),
            Outcome::Error { message } => Some(message),
            _ => None,
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Cell {
    /// The fault injected.
    pub fault: Fault,
    /// The detection method both sides use.
    pub method: Method,
    /// The topology.
    pub shape: Shape,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {} / {}", self.fault, self.method, self.shape)
    }
}

/// A measured cell: each side's outcome and the bound the method was configured for.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// The configured detection bound (`None` for `os-default`).
    pub bound: Option<Duration>,
    /// What the client experienced.
    pub client: Outcome,
    /// What the server experienced.
    pub server: Outcome,
}

impl CellResult {
    /// The outcome of `role`'s side.
    pub fn side(&self, role: Role) -> &Outcome {
        match role {
            Role::Client => &self.client,
            Role::Server => &self.server,
        }
    }
}

/// Called with each topology once both sides are ready (tests use it to record names and to
/// panic inside a run).
pub type Hook = Arc<dyn Fn(&Topology) + Send + Sync>;

/// The lab: a scale, how to start the peer process, an optional client command and hook.
#[derive(Clone)]
pub struct Lab {
    scale: Scale,
    peer: Option<PeerCommand>,
    client_cmd: Option<ClientCommand>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("scale", &self.scale)
            .field("peer", &self.peer)
            .field("client_cmd", &self.client_cmd)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

/// Progress of a matrix: called once per finished run.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Runs finished.
    pub done: usize,
    /// Runs in total (victim faults take two runs per cell).
    pub total: usize,
    /// The cell the run belonged to.
    pub cell: Cell,
    /// Time since the matrix started.
    pub elapsed: Duration,
}

impl Lab {
    /// A lab at `scale`, with the peer program found by [`PeerCommand::find`].
    pub fn new(scale: Scale) -> Lab {
        Lab {
            scale,
            peer: PeerCommand::find(),
            client_cmd: None,
            hook: None,
        }
    }

    /// Sets the client command the `client-cmd` method runs (see [`ClientCommand`]).
    /// Default: none (cells with `client-cmd` fail).
    pub fn client_command(mut self, cmd: ClientCommand) -> Lab {
        self.client_cmd = Some(cmd);
        self
    }

    /// Sets how the peer process is started (`process-crash`). Default: [`PeerCommand::find`].
    pub fn peer(mut self, peer: PeerCommand) -> Lab {
        self.peer = Some(peer);
        self
    }

    /// Sets a hook called in every run once both sides are ready. Default: none.
    pub fn on_ready(mut self, hook: Hook) -> Lab {
        self.hook = Some(hook);
        self
    }

    /// The scale.
    pub fn scale(&self) -> &Scale {
        &self.scale
    }

    /// Checks root, tools and the scale.
    pub fn check(&self) -> Result<(), LabError> {
        sys::check_environment()?;
        self.scale.validate()
    }

    /// Runs one cell (victim faults: the two runs in parallel).
    pub fn run_cell(&self, cell: Cell) -> Result<CellResult, LabError> {
        self.check()?;
        let [client, server] = match cell.fault.kind() {
            FaultKind::Victim => std::thread::scope(|s| {
                let c = s.spawn(|| self.run_once(cell, Some(Role::Server)));
                let srv = self.run_once(cell, Some(Role::Client));
                let c = c.join().unwrap_or_else(|_| Err(panicked()));
                [c.map(|r| r[0].clone()), srv.map(|r| r[1].clone())]
            }),
            _ => {
                let r = self.run_once(cell, None)?;
                [Ok(r[0].clone()), Ok(r[1].clone())]
            }
        };
        let (client, server) = match (client, server) {
            (Err(e), _) | (_, Err(e)) => return Err(e),
            (Ok(c), Ok(s)) => (c, s),
        };
        Ok(CellResult {
            cell,
            bound: cell.method.bound(&self.scale),
            client: client.unwrap_or(Outcome::Error {
                message: "client side not measured".into(),
            }),
            server: server.unwrap_or(Outcome::Error {
                message: "server side not measured".into(),
            }),
        })
    }

    /// Runs every cell with at most `jobs` runs at once, calling `progress` after each run.
    /// A run that fails shows up as [`Outcome::Error`] in its cell; errors that concern the
    /// whole lab (not root, tool missing, bad scale) are returned before anything runs.
    pub fn run_matrix(
        &self,
        cells: &[Cell],
        jobs: usize,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Vec<CellResult>, LabError> {
        self.check()?;
        // Runs: (cell index, victim). Longest first so the tail is short.
        let mut runs: Vec<(usize, Option<Role>)> = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            match cell.fault.kind() {
                FaultKind::Victim => {
                    runs.push((i, Some(Role::Server)));
                    runs.push((i, Some(Role::Client)));
                }
                _ => runs.push((i, None)),
            }
        }
        runs.sort_by_key(|(i, _)| std::cmp::Reverse(self.expected(cells[*i])));
        let results: Mutex<Vec<[Option<Outcome>; 2]>> = Mutex::new(vec![[None, None]; cells.len()]);
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(i, victim)) = runs.get(k) else {
                        break;
                    };
                    let cell = cells[i];
                    let measured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.run_once(cell, victim)
                    }))
                    .unwrap_or_else(|_| Err(panicked()));
                    {
                        let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                        match measured {
                            Ok(r) => {
                                for (slot, o) in all[i].iter_mut().zip(r) {
                                    if o.is_some() {
                                        *slot = o;
                                    }
                                }
                            }
                            Err(e) => {
                                let err = Outcome::Error {
                                    message: e.to_string(),
                                };
                                for role in measured_roles(victim) {
                                    all[i][role as usize] = Some(err.clone());
                                }
                            }
                        }
                    }
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    progress(&Progress {
                        done: d,
                        total: runs.len(),
                        cell,
                        elapsed: start.elapsed(),
                    });
                });
            }
        });
        let all = results.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(cells
            .iter()
            .zip(all)
            .map(|(cell, [c, s])| CellResult {
                cell: *cell,
                bound: cell.method.bound(&self.scale),
                client: c.unwrap_or(Outcome::Error {
                    message: "not run".into(),
                }),
                server: s.unwrap_or(Outcome::Error {
                    message: "not run".into(),
                }),
            })
            .collect())
    }

    /// Roughly how long a run of `cell` takes (for scheduling).
    fn expected(&self, cell: Cell) -> Duration {
        let s = &self.scale;
        let naive = matches!(cell.method, Method::OsDefault | Method::OsKeepalive);
        match cell.fault.kind() {
            FaultKind::Idle if naive && cell.fault == Fault::NatIdleDrop => s.idle_phase() + s.cap,
            FaultKind::Idle => s.idle_phase() + s.bound,
            _ if naive => s.cap,
            _ => s.bound,
        }
    }

    /// One run: `victim` is the host broken by a victim fault (its peer is measured).
    /// Returns the measured outcomes, indexed by role (client, server).
    fn run_once(&self, cell: Cell, victim: Option<Role>) -> Result<[Option<Outcome>; 2], LabError> {
        let scale = &self.scale;
        let topo = Topology::create(cell.shape)?;
        topo.configure_router(RouterConfig {
            idle_timeout: match cell.fault {
                Fault::NatIdleDrop | Fault::NatIdleRst => Some(scale.middlebox_timeout),
                _ => None,
            },
            invalid: if cell.fault == Fault::NatIdleRst {
                Invalid::Reset
            } else {
                Invalid::Drop
            },
        })?;
        let (ev_tx, ev_rx) = mpsc::channel::<(Role, Event)>();
        let in_child = (cell.fault == Fault::ProcessCrash)
            .then_some(victim)
            .flatten();
        let lifetime = scale.idle_phase() + scale.cap + Duration::from_secs(20);
        let mut sides = Sides::default();

        let start = |role: Role, sides: &mut Sides| -> Result<(), LabError> {
            let addr = match role {
                Role::Server => topo.listen_addr(),
                Role::Client => topo.connect_addr(),
            };
            let method = cell.method.for_side(role);
            if method == Method::ClientCmd {
                let cmd = self.client_cmd.as_ref().ok_or_else(|| LabError::Invalid {
                    what: "method",
                    value: "client-cmd".into(),
                    expected: "a client command (--client-cmd)".into(),
                })?;
                let child = PeerChild::spawn_shell(
                    topo.netns(role),
                    &cmd.render(addr),
                    addr,
                    role,
                    ev_tx.clone(),
                )?;
                sides.children.push((role, child));
            } else if in_child == Some(role) {
                let peer = self.peer.as_ref().ok_or(LabError::NoPeerProgram)?;
                let args = peer::side_args(role, method, addr, scale);
                let child = PeerChild::spawn(peer, topo.netns(role), &args, role, ev_tx.clone())?;
                sides.children.push((role, child));
            } else {
                let spec = SideSpec {
                    role,
                    method,
                    policy: scale.policy(),
                    addr,
                    lifetime,
                };
                let (cmd, thread) = spawn_side_thread(topo.netns(role), spec, ev_tx.clone())?;
                sides.cmds[role as usize] = Some(cmd);
                sides.threads.push(thread);
            }
            Ok(())
        };
        start(Role::Server, &mut sides)?;
        wait_setup(&ev_rx, Role::Server, |e| *e == Event::Listening)?;
        start(Role::Client, &mut sides)?;
        let mut ready = [false, false];
        while !(ready[0] && ready[1]) {
            let role = wait_setup(&ev_rx, None, |e| *e == Event::Ready)?;
            ready[role as usize] = true;
        }
        if let Some(hook) = &self.hook {
            hook(&topo);
        }

        let measured = measured_roles(victim);
        let mut collector = Collector::new(measured.clone(), Instant::now());
        let reference = match cell.fault.kind() {
            FaultKind::Idle => {
                collector.collect(&ev_rx, Instant::now() + scale.idle_phase());
                let t0 = Instant::now();
                sides.send_all(&[Role::Client, Role::Server]);
                t0
            }
            FaultKind::Path | FaultKind::Victim => {
                // t0 is taken just before the step that makes the fault take effect, so a
                // side that reacts while the command is still returning is not "early", and
                // detection times err on the long side.
                let mut t0 = Instant::now();
                match (cell.fault, victim) {
                    (Fault::Blackhole, _) => topo.blackhole()?,
                    (Fault::RouterReboot, _) => {
                        // Let the flow go idle (no application data), then lose the state.
                        collector.collect(&ev_rx, Instant::now() + Duration::from_secs(1));
                        t0 = Instant::now();
                        topo.flush_conntrack()?
                    }
                    (Fault::HostCrash, Some(v)) => topo.isolate(v)?,
                    (Fault::ProcessCrash, Some(v)) => sides.kill(v),
                    (Fault::PeerReboot, Some(v)) => {
                        topo.host_down(v, true)?;
                        topo.kill_sockets(v)?;
                        // The peer is back, without the connection.
                        t0 = Instant::now();
                        topo.host_down(v, false)?;
                    }
                    _ => {}
                }
                if cell.method.sends_after_fault() {
                    sides.send_all(&measured);
                }
                t0
            }
        };
        collector.reference = Some(reference);
        collector.collect(&ev_rx, reference + scale.cap);
        let outcomes = collector.finish(scale.cap);
        sides.finish();
        drop(topo);
        Ok(outcomes)
    }
}

fn panicked() -> LabError {
    LabError::Setup {
        role: "lab",
        message: "the run panicked".into(),
    }
}

fn measured_roles(victim: Option<Role>) -> Vec<Role> {
    match victim {
        Some(v) => vec![v.other()],
        None => vec![Role::Client, Role::Server],
    }
}

/// Waits for `role`'s (or any measured role's) setup event matching `want`; a failure or
/// close during setup is an error. Returns the role that reported.
fn wait_setup(
    rx: &Receiver<(Role, Event)>,
    role: impl Into<Option<Role>>,
    want: impl Fn(&Event) -> bool,
) -> Result<Role, LabError> {
    let role = role.into();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((r, ev)) if want(&ev) && role.is_none_or(|x| x == r) => return Ok(r),
            Ok((r, Event::Failed(message))) => {
                return Err(LabError::Setup {
                    role: r.name(),
                    message,
                })
            }
            Ok((r, Event::Closed(_, reason))) => {
                return Err(LabError::Setup {
                    role: r.name(),
                    message: format!("connection ended during setup: {reason}"),
                })
            }
            Ok(_) => {}
            Err(_) => {
                return Err(LabError::Setup {
                    role: role.map_or("lab", Role::name),
                    message: "no progress within 15 s".into(),
                })
            }
        }
    }
}

/// First events of the measured sides.
struct Collector {
    measured: Vec<Role>,
    ready_at: Instant,
    reference: Option<Instant>,
    outcome: [Option<Outcome>; 2],
}

impl Collector {
    fn new(measured: Vec<Role>, ready_at: Instant) -> Collector {
        Collector {
            measured,
            ready_at,
            reference: None,
            outcome: [None, None],
        }
    }

    fn settled(&self) -> bool {
        self.measured
            .iter()
            .all(|r| self.outcome[*r as usize].is_some())
    }

    fn collect(&mut self, rx: &Receiver<(Role, Event)>, until: Instant) {
        while !(self.reference.is_some() && self.settled()) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let (role, ev) = match rx.recv_timeout(left) {
                Ok(x) => x,
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left);
                    return;
                }
            };
            if !self.measured.contains(&role) || self.outcome[role as usize].is_some() {
                continue;
            }
            let slot = &mut self.outcome[role as usize];
            match (ev, self.reference) {
                (Event::Closed(at, reason), Some(t0)) if at >= t0 => {
                    *slot = Some(Outcome::Detected {
                        after: at - t0,
                        reason,
                    })
                }
                (Event::Closed(at, reason), _) => {
                    *slot = Some(Outcome::ClosedIdle {
                        after: at.saturating_duration_since(self.ready_at),
                        reason,
                    })
                }
                (Event::Received(at), Some(t0)) if at >= t0 => *slot = Some(Outcome::Survived),
                (Event::Failed(message), _) => *slot = Some(Outcome::Error { message }),
                _ => {}
            }
        }
    }

    fn finish(self, cap: Duration) -> [Option<Outcome>; 2] {
        let mut out = [None, None];
        for r in &self.measured {
            out[*r as usize] = Some(
                self.outcome[*r as usize]
                    .clone()
                    .unwrap_or(Outcome::NotDetected { cap }),
            );
        }
        out
    }
}

#[derive(Default)]
struct Sides {
    cmds: [Option<UnboundedSender<Cmd>>; 2],
    threads: Vec<JoinHandle<()>>,
    children: Vec<(Role, PeerChild)>,
}

impl Sides {
    fn send_all(&mut self, roles: &[Role]) {
        for r in roles {
            if let Some(tx) = &self.cmds[*r as usize] {
                let _ = tx.send(Cmd::Send);
            }
            for (role, child) in &mut self.children {
                if role == r {
                    child.send();
                }
            }
        }
    }

    /// SIGKILLs `role`'s process (`process-crash`).
    fn kill(&mut self, role: Role) {
        for (r, child) in &mut self.children {
            if *r == role {
                child.kill();
            }
        }
    }

    fn finish(&mut self) {
        for tx in self.cmds.iter_mut().filter_map(Option::take) {
            let _ = tx.send(Cmd::Finish);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for (_, mut c) in self.children.drain(..) {
            c.kill();
        }
    }
}

impl Drop for Sides {
    fn drop(&mut self) {
        // On an error or panic path: tell the sides to stop (dropping the senders does too)
        // and kill the peer process; threads are not joined here.
        for tx in self.cmds.iter_mut().filter_map(Option::take) {
            let _ = tx.send(Cmd::Finish);
        }
        for (_, mut c) in self.children.drain(..) {
            c.kill();
        }
    }
}

fn spawn_side_thread(
    ns: &str,
    spec: SideSpec,
    events: mpsc::Sender<(Role, Event)>,
) -> Result<(UnboundedSender<Cmd>, JoinHandle<()>), LabError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ns = ns.to_string();
    let role = spec.role;
    let thread = std::thread::Builder::new()
        .name(format!("lab-{role}"))
        .spawn(move || {
            if let Err(e) = sys::enter_netns(&ns) {
                let _ = events.send((role, Event::Failed(format!("enter namespace {ns}: {e}"))));
                return;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = events.send((role, Event::Failed(format!("runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(side::run_side(spec, rx, |ev| {
                let _ = events.send((role, ev));
            }));
        })
        .map_err(|source| LabError::Spawn {
            command: "side thread".into(),
            source,
        })?;
    Ok((tx, thread))
}

/// A side in its own process (`ip netns exec NS peer side …`, or a client command), killed on
/// drop.
struct PeerChild {
    proc: topology::Reaped,
}

/// A line of a side process's output: the peer's (`ready`, `closed REASON`, …) or a client
/// command's ([`ClientCommand`]: `READY`, `RECEIVED`, `DETECTED REASON`, `FAILED WHY`).
fn parse_side_line(line: &str, now: Instant) -> Option<Event> {
    let line = line.trim_end();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    Some(match word {
        "listening" => Event::Listening,
        "ready" | "READY" => Event::Ready,
        "received" | "RECEIVED" => Event::Received(now),
        "closed" | "DETECTED" => Event::Closed(now, rest.trim().to_string()),
        "failed" | "FAILED" => Event::Failed(rest.trim().to_string()),
        _ => return None,
    })
}

impl PeerChild {
    fn spawn(
        peer: &PeerCommand,
        ns: &str,
        args: &[String],
        role: Role,
        events: mpsc::Sender<(Role, Event)>,
    ) -> Result<PeerChild, LabError> {
        let ip = sys::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", ns])
            .arg(&peer.program)
            .args(&peer.prefix)
            .args(args)
            .stderr(Stdio::null());
        let what = format!("{} (lab peer)", peer.program.display());
        PeerChild::start(cmd, what, role, events)
    }

    /// A client command ([`ClientCommand`]): `sh -c "exec CMD"` in the namespace (so the pid
    /// is the command's and SIGKILL reaches it), its standard error passed through.
    fn spawn_shell(
        ns: &str,
        command: &str,
        server: std::net::SocketAddr,
        role: Role,
        events: mpsc::Sender<(Role, Event)>,
    ) -> Result<PeerChild, LabError> {
        let ip = sys::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", ns, "sh", "-c"])
            .arg(format!("exec {command}"))
            .env("TETHER_LAB_SERVER", server.to_string())
            .stderr(Stdio::piped());
        let mut child = PeerChild::start(cmd, format!("{command} (client command)"), role, events)?;
        if let Some(err) = child.proc.child.stderr.take() {
            let _ = std::thread::Builder::new()
                .name("lab-client-err".into())
                .spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                        eprintln!("[client-cmd] {line}");
                    }
                });
        }
        Ok(child)
    }

    fn start(
        mut cmd: Command,
        what: String,
        role: Role,
        events: mpsc::Sender<(Role, Event)>,
    ) -> Result<PeerChild, LabError> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: what,
            source,
        })?;
        if let Some(out) = child.stdout.take() {
            let _ = std::thread::Builder::new()
                .name("lab-peer-out".into())
                .spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        let Some(ev) = parse_side_line(&line, Instant::now()) else {
                            continue;
                        };
                        if events.send((role, ev)).is_err() {
                            break;
                        }
                    }
                });
        }
        Ok(PeerChild {
            proc: topology::Reaped::new(child),
        })
    }

    /// Tells a client command to send one message (`SEND` on its standard input).
    fn send(&mut self) {
        use std::io::Write;
        if let Some(stdin) = self.proc.child.stdin.as_mut() {
            let _ = stdin.write_all(b"SEND\n").and_then(|()| stdin.flush());
        }
    }

    /// SIGKILL and reap (also when dropped).
    fn kill(&mut self) {
        self.proc.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_output_contracts_are_understood() {
        let now = Instant::now();
        assert_eq!(parse_side_line("ready", now), Some(Event::Ready));
        assert_eq!(parse_side_line("READY", now), Some(Event::Ready));
        assert_eq!(parse_side_line("RECEIVED", now), Some(Event::Received(now)));
        assert_eq!(
            parse_side_line("DETECTED heartbeat-timeout", now),
            Some(Event::Closed(now, "heartbeat-timeout".into()))
        );
        assert_eq!(
            parse_side_line("closed peer-reset", now),
            Some(Event::Closed(now, "peer-reset".into()))
        );
        assert_eq!(
            parse_side_line("FAILED cannot connect", now),
            Some(Event::Failed("cannot connect".into()))
        );
        assert_eq!(parse_side_line("listening", now), Some(Event::Listening));
        assert_eq!(parse_side_line("some log line", now), None);
        assert_eq!(parse_side_line("", now), None);
    }
}
