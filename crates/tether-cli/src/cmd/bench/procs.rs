//! Child processes of the coordinator: agents (this executable), `tether serve` and mosquitto.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;

/// An agent child: commands in, JSON events out.
pub(crate) struct Agent {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    stdin: ChildStdin,
    rx: mpsc::UnboundedReceiver<Value>,
    /// Presence events (`offline`, `suspect`, `lagged`) in arrival order.
    pub(crate) presence: Arc<Mutex<Vec<Value>>>,
    /// Clients connected so far (from `progress`).
    pub(crate) progress: Arc<AtomicU64>,
}

impl Agent {
    /// Starts `tether bench agent <args>`.
    pub(crate) fn spawn(args: &[String]) -> anyhow::Result<Agent> {
        Agent::spawn_in(None, args)
    }

    /// Starts `tether bench agent <args>`, inside network namespace `netns` when given
    /// (`ip netns exec`, which execs the agent: the pid is the agent's).
    pub(crate) fn spawn_in(netns: Option<&str>, args: &[String]) -> anyhow::Result<Agent> {
        let exe = std::env::current_exe().context("cannot find the tether executable")?;
        let mut command = match netns {
            Some(ns) => {
                let ip = tether_lab::sys::find_tool("ip").context("`ip` not found")?;
                let mut c = Command::new(ip);
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg("bench")
            .arg("agent")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a bench agent")?;
        let pid = child.id().context("agent exited at once")?;
        let stdin = child.stdin.take().context("no agent stdin")?;
        let stdout = child.stdout.take().context("no agent stdout")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let presence: Arc<Mutex<Vec<Value>>> = Arc::default();
        let progress = Arc::new(AtomicU64::new(0));
        let (p, pr) = (presence.clone(), progress.clone());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    continue;
                };
                match v["ev"].as_str() {
                    Some("offline" | "suspect" | "lagged") => {
                        p.lock().unwrap_or_else(|e| e.into_inner()).push(v)
                    }
                    Some("progress") => pr.store(v["connected"].as_u64().unwrap_or(0), Relaxed),
                    _ => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Agent {
            child,
            pid,
            stdin,
            rx,
            presence,
            progress,
        })
    }

    /// Sends one command line.
    pub(crate) async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .context("agent went away")?;
        self.stdin.flush().await.context("agent went away")
    }

    /// The next event named `ev` (others are dropped), within `within`.
    pub(crate) async fn expect(&mut self, ev: &str, within: Duration) -> anyhow::Result<Value> {
        let work = async {
            while let Some(v) = self.rx.recv().await {
                if v["ev"] == ev {
                    return Ok(v);
                }
            }
            bail!("agent exited while waiting for {ev:?}")
        };
        tokio::time::timeout(within, work)
            .await
            .with_context(|| format!("no {ev:?} from agent {} within {within:?}", self.pid))?
    }

    /// Sends `cmd` and waits for `ev`.
    pub(crate) async fn ask(&mut self, cmd: &str, ev: &str) -> anyhow::Result<Value> {
        self.send(cmd).await?;
        self.expect(ev, Duration::from_secs(60)).await
    }

    /// Asks the agent to quit, then kills it if it lingers.
    pub(crate) async fn quit(mut self) {
        let _ = self.send("quit").await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A running mosquitto broker on a loopback port.
pub(crate) struct Mosquitto {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) version: String,
    conf: std::path::PathBuf,
}

fn mosquitto_path() -> Option<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/usr/local/sbin".into()]);
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Finds mosquitto, installing it from Debian (`apt-get install -y mosquitto`) when missing.
pub(crate) fn ensure_mosquitto() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = mosquitto_path() {
        return Ok(p);
    }
    eprintln!("mosquitto not found: apt-get install -y mosquitto");
    let st = std::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "mosquitto"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !st.success() {
        bail!("apt-get install mosquitto failed ({st})");
    }
    mosquitto_path().context("mosquitto still not found after installing it")
}

impl Mosquitto {
    /// Starts mosquitto with no connection limit on a free port of `ip` (a loopback
    /// address, or the root end of the clients' veth).
    pub(crate) async fn start(ip: std::net::IpAddr) -> anyhow::Result<Mosquitto> {
        let exe = ensure_mosquitto()?;
        let version = std::process::Command::new(&exe)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_owned())
            })
            .unwrap_or_default();
        let port = std::net::TcpListener::bind((ip, 0))?.local_addr()?.port();
        let addr = SocketAddr::new(ip, port);
        let conf = std::env::temp_dir().join(format!(
            "tether-bench-mosquitto-{}-{port}.conf",
            std::process::id()
        ));
        std::fs::write(
            &conf,
            format!(
                "listener {port} {ip}\nallow_anonymous true\nmax_connections -1\n\
                 max_keepalive 65535\npersistence false\nlog_dest none\n"
            ),
        )
        .context("cannot write the mosquitto config")?;
        let mut child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let pid = child.id().context("mosquitto exited at once")?;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(Mosquitto {
                    child,
                    pid,
                    addr,
                    version,
                    conf,
                });
            }
            if let Ok(Some(st)) = child.try_wait() {
                bail!("mosquitto exited: {st}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mosquitto did not listen on {addr} within 10 s")
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// A `tether serve` child (this executable) and the addresses it logged.
pub(crate) struct ServeChild {
    pub(crate) child: tokio::process::Child,
    pub(crate) listen: SocketAddr,
    pub(crate) http: SocketAddr,
}

/// Starts `tether serve --listen 127.0.0.1:0 --http 127.0.0.1:0 <args>` and waits for the
/// addresses in its log. The log is drained for as long as it runs (a full pipe would stall
/// it); with `label`, lines that report trouble are echoed on stderr under that label.
pub(crate) async fn spawn_serve(
    args: &[String],
    label: Option<&str>,
) -> anyhow::Result<ServeChild> {
    let exe = std::env::current_exe().context("cannot find the tether executable")?;
    let mut child = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start tether serve")?;
    let err = child.stderr.take().context("no stderr")?;
    let mut lines = tokio::io::BufReader::new(err).lines();
    let (mut listen, mut http) = (None, None);
    while listen.is_none() || http.is_none() {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("serve did not start")??
            .context("serve exited")?;
        if let Some(a) = l.split("addr=").nth(1) {
            listen = a.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if l.contains("status-page") {
            http = l
                .split("http://")
                .nth(1)
                .and_then(|a| a.trim_end_matches('/').parse().ok());
        }
    }
    let label = label.map(str::to_owned);
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(who) = &label {
                if ["refused", "degraded", "failed", "error"]
                    .iter()
                    .any(|w| l.contains(w))
                {
                    eprintln!("{who}: {l}");
                }
            }
        }
    });
    Ok(ServeChild {
        child,
        listen: listen.context("no listen address")?,
        http: http.context("no http address")?,
    })
}
