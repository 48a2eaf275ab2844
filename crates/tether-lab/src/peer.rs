//! The lab's peer process: one side of a connection in its own process, so that
//! `process-crash` can SIGKILL it for real. Reached as the `tether-lab-peer` binary (tests)
//! or as the hidden `tether lab peer` subcommand (the CLI), both calling [`peer_main`].
//!
//! ```text
//!  tether-lab-peer side --role server --method tether --addr 198.18.0.6:7000 --scale 60,4000,3000,12000
//!     stdout: "listening", "ready", "closed REASON" (one per line); exits when stdin closes
//!  tether-lab-peer hold --topology outbound-nat
//!     builds a topology, prints its namespace names, waits (for the SIGTERM cleanup test)
//! ```

use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::method::{Method, Scale};
use crate::side::{self, Event, SideSpec};
use crate::topology::{Role, Shape, Topology};

/// How to start the peer process: a program and the arguments that come before the peer's
/// own (`["lab", "peer"]` for the `tether` binary, none for `tether-lab-peer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCommand {
    /// The executable.
    pub program: PathBuf,
    /// Arguments placed before the peer's own.
    pub prefix: Vec<OsString>,
}

impl PeerCommand {
    /// A peer started as `program prefix… side …`.
    pub fn new(program: impl Into<PathBuf>, prefix: &[&str]) -> PeerCommand {
        PeerCommand {
            program: program.into(),
            prefix: prefix.iter().map(OsString::from).collect(),
        }
    }

    /// `$TETHER_LAB_PEER` if set, else a `tether-lab-peer` next to the current executable
    /// or one directory up (where cargo puts binaries relative to test executables).
    pub fn find() -> Option<PeerCommand> {
        if let Some(p) = std::env::var_os("TETHER_LAB_PEER") {
            return Some(PeerCommand::new(PathBuf::from(p), &[]));
        }
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        [
            dir.join("tether-lab-peer"),
            dir.parent()?.join("tether-lab-peer"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| PeerCommand::new(p, &[]))
    }
}

pub(crate) fn side_args(
    role: Role,
    method: Method,
    addr: SocketAddr,
    scale: &Scale,
) -> Vec<String> {
    vec![
        "side".into(),
        "--role".into(),
        role.name().into(),
        "--method".into(),
        method.name().into(),
        "--addr".into(),
        addr.to_string(),
        "--scale".into(),
        format!(
            "{},{},{},{}",
            scale.factor,
            scale.middlebox_timeout.as_millis(),
            scale.bound.as_millis(),
            scale.cap.as_millis()
        ),
    ]
}

fn parse_scale(s: &str) -> Option<Scale> {
    let v: Vec<u64> = s
        .split(',')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    match v[..] {
        [factor, t, b, c] => Some(Scale {
            factor: u32::try_from(factor).ok()?,
            middlebox_timeout: Duration::from_millis(t),
            bound: Duration::from_millis(b),
            cap: Duration::from_millis(c),
        }),
        _ => None,
    }
}

fn value<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The peer process's `main`: `args` are the arguments after the program (and prefix).
/// Exit codes: 0 done, 2 bad arguments, 1 setup failed.
pub fn peer_main(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("side") => side_main(&args[1..]),
        Some("hold") => hold_main(&args[1..]),
        _ => {
            eprintln!("usage: tether-lab-peer side --role R --method M --addr A --scale F,T,B,C | hold --topology T");
            ExitCode::from(2)
        }
    }
}

fn side_main(args: &[String]) -> ExitCode {
    let role = match value(args, "--role") {
        Some("client") => Role::Client,
        Some("server") => Role::Server,
        _ => return bad("--role client|server"),
    };
    let Some(method) = value(args, "--method").and_then(|m| m.parse::<Method>().ok()) else {
        return bad("--method");
    };
    let Some(addr) = value(args, "--addr").and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return bad("--addr");
    };
    let Some(scale) = value(args, "--scale").and_then(parse_scale) else {
        return bad("--scale");
    };
    exit_when_stdin_closes();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether-lab-peer: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let spec = SideSpec {
        role,
        method,
        policy: scale.policy(),
        addr,
        lifetime: scale.idle_phase() + scale.cap + Duration::from_secs(30),
    };
    // Nobody sends commands to a peer process; the sender lives as long as the side.
    let (_cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut failed = false;
    rt.block_on(side::run_side(spec, cmd_rx, |ev| {
        let line = match ev {
            Event::Listening => "listening".to_string(),
            Event::Ready => "ready".to_string(),
            Event::Received(_) => "received".to_string(),
            Event::Closed(_, reason) => format!("closed {reason}"),
            Event::Failed(e) => {
                failed = true;
                format!("failed {e}")
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }));
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The parent keeps our stdin open; when it goes away (even SIGKILLed), so do we.
fn exit_when_stdin_closes() {
    let _ = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
}

fn hold_main(args: &[String]) -> ExitCode {
    let shape = match value(args, "--topology")
        .unwrap_or("outbound-nat")
        .parse::<Shape>()
    {
        Ok(s) => s,
        Err(_) => return bad("--topology"),
    };
    let topo = match Topology::create(shape) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tether-lab-peer: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", topo.names().join(" "));
    let _ = std::io::stdout().flush();
    // Wait for a signal (the handler removes the namespaces and exits) or for stdin to end.
    let stdin = std::io::stdin();
    let _ = stdin.lock().lines().count();
    drop(topo);
    ExitCode::SUCCESS
}

fn bad(what: &str) -> ExitCode {
    eprintln!("tether-lab-peer: missing or invalid {what}");
    ExitCode::from(2)
}
