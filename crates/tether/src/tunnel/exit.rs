//! `tether tunnel exit`: one tether [`Server`] with sessions; a router hands each tunnel's
//! messages to its task, which connects to the target on OPEN.
//!
//! ```text
//!  Server events ─▶ exit_route ─┬─ OPEN (new id, under the limit) ─▶ spawn exit_conn
//!                               ├─ OPEN over the limit / bad version ─▶ ABORT, no target
//!                               ├─ Message ─▶ that tunnel's ExitSource
//!                               └─ Disconnected / Resumed / SessionLost ─▶ PathDown / PathUp / End
//!  exit_conn: connect target ─▶ pump ─▶ finish (DONE or ABORT) ─▶ Closed event
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tether_proto::wire::tunnel::{Msg, VERSION};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::app::AppStream;
use super::link::{Inbound, Outbound, ServerOut, Source};
use super::pump::{finish, pump, send_last, Counters, Ctx, Pumped, FLUSH_WAIT};
use super::{ExitConfig, TunnelEnd, TunnelError, TunnelEvent, CHUNK, WINDOW};
use crate::server::{Server, ServerEvent, ServerHandle};

/// A running `tether tunnel exit`. Dropping it shuts it down (every tunnelled connection is
/// reset).
pub struct TunnelExit {
    local_addr: SocketAddr,
    server: ServerHandle,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    stop: watch::Sender<bool>,
}

impl TunnelExit {
    /// Starts the tether server on `cfg.server.listen`.
    pub async fn bind(mut cfg: ExitConfig) -> Result<TunnelExit, TunnelError> {
        if cfg.server.session_linger.is_none() {
            return Err(TunnelError::NoSessions);
        }
        // Room for a full window of DATA plus WINDOW/FIN/DONE messages while resuming.
        cfg.server.outbox_bytes = cfg.server.outbox_bytes.max(2 * WINDOW as usize);
        // A frame must carry a full DATA: a chunk, its kind byte, the session's sequence
        // number and frame type.
        cfg.server.max_frame_len = cfg.server.max_frame_len.max((CHUNK + 1 + 9) as u32);
        cfg.max_connections = cfg.max_connections.max(1);
        let addr = cfg.server.listen;
        let server = Server::bind(cfg.server.clone())
            .await
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let local_addr = server.local_addr();
        let handle = server.handle();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(exit_route(server, Arc::new(cfg), tx, stop_rx));
        Ok(TunnelExit {
            local_addr,
            server: handle,
            events: rx,
            stop,
        })
    }

    /// Where tether connections from entries are accepted.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The tether server (presence, metrics).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The next event; `None` after shutdown.
    pub async fn next_event(&mut self) -> Option<TunnelEvent> {
        self.events.recv().await
    }

    /// Stops accepting and resets every tunnelled connection (telling the entries).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for TunnelExit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the router keeps per open tunnel.
struct Slot {
    /// The tunnel's inbound items.
    tx: mpsc::UnboundedSender<Inbound>,
    /// Bumped on every path change, for a sender waiting on a full backlog.
    path: watch::Sender<u64>,
}

impl Slot {
    fn forward(&self, item: Inbound) {
        let _ = self.tx.send(item);
        self.path.send_modify(|g| *g += 1);
    }
}

async fn exit_route(
    mut server: Server,
    cfg: Arc<ExitConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let handle = server.handle();
    let mut live: HashMap<String, Slot> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            ev = server.next_event() => match ev {
                None => break,
                Some(ServerEvent::Message { client_id, msg, .. }) => {
                    if let Some(slot) = live.get(&*client_id) {
                        let _ = slot.tx.send(Inbound::Msg(msg));
                        continue;
                    }
                    let client_id = client_id.to_string();
                    match Msg::decode(&msg) {
                        Ok(Msg::Open(VERSION)) if live.len() >= cfg.max_connections => {
                            let limit = cfg.max_connections;
                            let why = format!(
                                "the tunnel exit is at its limit of {limit} connections"
                            );
                            refuse(handle.clone(), client_id.clone(), why);
                            let _ = events.send(TunnelEvent::Rejected { id: client_id, limit });
                        }
                        Ok(Msg::Open(VERSION)) => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            let (path, path_rx) = watch::channel(0);
                            live.insert(client_id.clone(), Slot { tx, path });
                            let out = ServerOut {
                                handle: handle.clone(),
                                id: client_id.clone(),
                                path: path_rx,
                            };
                            tokio::spawn(exit_conn(
                                client_id,
                                out,
                                cfg.clone(),
                                ExitSource { rx },
                                events.clone(),
                                stop.clone(),
                                done_tx.clone(),
                            ));
                        }
                        Ok(Msg::Open(v)) => {
                            let why = format!(
                                "unsupported tunnel version {v} (this exit speaks {VERSION})"
                            );
                            refuse(handle.clone(), client_id, why);
                        }
                        // A late message of a tunnel that already ended: nothing to do.
                        _ => tracing::debug!(client = %client_id, "message for no open tunnel"),
                    }
                }
                Some(ServerEvent::Disconnected { client_id, disconnect, .. }) => {
                    if let Some(slot) = live.get(&*client_id) {
                        slot.forward(Inbound::PathDown(disconnect.reason.to_string()));
                    }
                }
                Some(ServerEvent::Resumed { client_id, .. }) => {
                    if let Some(slot) = live.get(&*client_id) {
                        slot.forward(Inbound::PathUp);
                    }
                }
                Some(ServerEvent::SessionLost { client_id, .. }) => {
                    if let Some(slot) = live.remove(&*client_id) {
                        slot.forward(Inbound::End(TunnelEnd::PathLost(
                            "session not resumed within the linger".into(),
                        )));
                    }
                }
                Some(_) => {}
            },
            Some(id) = done_rx.recv() => {
                live.remove(&id);
            }
            _ = stop.changed() => break,
        }
    }
    // Shutting down: the tunnels see the stop signal themselves; give them time to tell
    // their entries (ABORT), then close the tether connections.
    let mut pending = live.len();
    drop(live);
    let _ = tokio::time::timeout(FLUSH_WAIT, async {
        while pending > 0 && done_rx.recv().await.is_some() {
            pending -= 1;
        }
    })
    .await;
    handle.shutdown(FLUSH_WAIT).await;
}

/// Answers an OPEN that opens nothing with ABORT (the entry resets its application).
fn refuse(handle: ServerHandle, id: String, why: String) {
    tokio::spawn(async move {
        // No router slot: nothing will signal a path change, so a full backlog ends the wait.
        let (_, path) = watch::channel(0);
        let out = ServerOut { handle, id, path };
        send_last(&out, Msg::Abort(why)).await;
    });
}

async fn exit_conn(
    id: String,
    out: ServerOut,
    cfg: Arc<ExitConfig>,
    mut src: ExitSource,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<String>,
) {
    let started = Instant::now();
    let n = Counters::default();
    let ctx = Ctx {
        id: &id,
        is_entry: false,
        n: &n,
        events: &events,
    };
    let target = cfg.target;
    let connect = async move {
        let app = TcpStream::connect(target).await?;
        let _ = app.set_nodelay(true);
        let local = app.local_addr().unwrap_or(target);
        Ok((app, local))
    };
    let pumped = run_exit(connect, &cfg, &out, &mut src, ctx, &mut stop).await;
    let _ = done.send(id.clone());
    let _ = events.send(TunnelEvent::Closed {
        id,
        end: pumped.end,
        bytes_from_app: n.from_app.load(Relaxed),
        bytes_to_app: n.to_app.load(Relaxed),
        outages: pumped.outages,
        duration: started.elapsed(),
    });
}

/// The exit's part of one tunnelled connection after OPEN: connect to the target (at once:
/// the application's first bytes are already on their way), then the pump and the ending; a
/// target that cannot be reached is answered with ABORT right away.
pub(super) async fn run_exit<A: AppStream>(
    connect: impl Future<Output = io::Result<(A, SocketAddr)>>,
    cfg: &ExitConfig,
    out: &impl Outbound,
    src: &mut impl Source,
    ctx: Ctx<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Pumped {
    let why = match tokio::time::timeout(cfg.connect_timeout, connect).await {
        Ok(Ok((app, local))) => {
            let _ = ctx.events.send(TunnelEvent::Opened {
                id: ctx.id.to_owned(),
                app: local,
            });
            let p = pump(&app, out, src, ctx, stop).await;
            finish(app, out, &p.end, false).await;
            return p;
        }
        Ok(Err(e)) => format!("cannot connect to the target {}: {e}", cfg.target),
        Err(_) => format!("connecting to the target {} timed out", cfg.target),
    };
    send_last(out, Msg::Abort(why.clone())).await;
    Pumped {
        end: TunnelEnd::LocalReset(why),
        outages: 0,
    }
}

/// Exit side: what the router forwards for this id.
pub(super) struct ExitSource {
    rx: mpsc::UnboundedReceiver<Inbound>,
}

impl Source for ExitSource {
    async fn next(&mut self) -> Inbound {
        self.rx
            .recv()
            .await
            .unwrap_or(Inbound::End(TunnelEnd::Shutdown))
    }
}

#[cfg(test)]
impl ExitSource {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<Inbound>) -> Self {
        ExitSource { rx }
    }
}
