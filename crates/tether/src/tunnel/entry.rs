//! `tether tunnel entry`: accepts the program's connections and carries each one over its own
//! tether session (a reconnecting [`Client`]) to the exit.
//!
//! ```text
//!  accept ─▶ entry_conn: Client{tun-<hex>} ─ OPEN ─▶ pump ─▶ finish ─▶ Closed event
//!                        EntrySource: client events, the linger while the path is down
//! ```

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::duration::Human;
use tether_proto::wire::tunnel::{Msg, VERSION};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::app::AppStream;
use super::link::{Inbound, Outbound, Source};
use super::pump::{finish, pump, Counters, Ctx, Pumped, FLUSH_WAIT};
use super::{tunnel_id, EntryConfig, TunnelEnd, TunnelError, TunnelEvent, ACCEPT_RETRY, WINDOW};
use crate::client::{Client, ClientConfig, ClientEvent};

/// A running `tether tunnel entry`. Dropping it shuts it down (every tunnelled connection is
/// reset).
pub struct TunnelEntry {
    local_addr: SocketAddr,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    stop: watch::Sender<bool>,
}

impl TunnelEntry {
    /// Binds `cfg.listen` and starts accepting application connections.
    pub async fn bind(cfg: EntryConfig) -> Result<TunnelEntry, TunnelError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| TunnelError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().unwrap_or(cfg.listen);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(entry_accept(listener, Arc::new(cfg), tx, stop_rx));
        Ok(TunnelEntry {
            local_addr,
            events: rx,
            stop,
        })
    }

    /// Where application connections are accepted.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next event; `None` after shutdown, once every tunnelled connection ended.
    pub async fn next_event(&mut self) -> Option<TunnelEvent> {
        self.events.recv().await
    }

    /// Stops accepting and resets every tunnelled connection (telling the exit).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for TunnelEntry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn entry_accept(
    listener: TcpListener,
    cfg: Arc<EntryConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    // Notified whenever a tunnelled connection ends (its sockets are free again).
    let ended = Arc::new(Notify::new());
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((app, peer)) => {
                    let (cfg, events, stop, ended) =
                        (cfg.clone(), events.clone(), stop.clone(), ended.clone());
                    tokio::spawn(async move {
                        entry_conn(app, peer, cfg, events, stop).await;
                        ended.notify_waiters();
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: try again when one of ours closed
                    // (or after a while, for descriptors freed elsewhere), never in a spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = ended.notified() => {}
                        _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn entry_conn(
    app: TcpStream,
    peer: SocketAddr,
    cfg: Arc<EntryConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let id = tunnel_id();
    let _ = app.set_nodelay(true);
    let mut ccfg = ClientConfig::new(cfg.relay, id.clone());
    ccfg.connect.policy = cfg.policy.clone();
    // A reconnect attempt whose handshake was swallowed by the outage must not outlive the
    // outage by much: give up on it after the detection bound and try again.
    ccfg.connect.handshake_timeout = ccfg
        .connect
        .handshake_timeout
        .min(cfg.policy.dead_after)
        .max(Duration::from_millis(500));
    ccfg.backoff = cfg.backoff;
    ccfg.session_config = cfg.session;
    ccfg.outbox_bytes = 2 * WINDOW as usize;
    ccfg.connect.tls = cfg.tls.clone();
    ccfg.connect.credential = cfg.credential.clone();
    let client = Client::start(ccfg);
    let out = client.sender();
    let _ = events.send(TunnelEvent::Opened {
        id: id.clone(),
        app: peer,
    });
    let mut src = EntrySource {
        client,
        cap: cfg.linger,
        linger: cfg.linger,
        connected: false,
        started,
        down_since: None,
    };
    let n = Counters::default();
    let ctx = Ctx {
        id: &id,
        is_entry: true,
        n: &n,
        events: &events,
    };
    let pumped = run_entry(app, &out, &mut src, ctx, &mut stop).await;
    // Orderly endings flush what is queued (DONE was received, or our ABORT must arrive);
    // the others have nothing left to say.
    match pumped.end {
        TunnelEnd::PeerAborted(_) | TunnelEnd::PathLost(_) => src.client.close(),
        _ => src.client.shutdown(FLUSH_WAIT).await,
    }
    let _ = events.send(TunnelEvent::Closed {
        id,
        end: pumped.end,
        bytes_from_app: n.from_app.load(Relaxed),
        bytes_to_app: n.to_app.load(Relaxed),
        outages: pumped.outages,
        duration: started.elapsed(),
    });
}

/// The entry's part of one tunnelled connection once its session exists: OPEN (queued at
/// once, it goes out with the handshake), the pump, and the ending.
pub(super) async fn run_entry(
    app: impl AppStream,
    out: &impl Outbound,
    src: &mut impl Source,
    ctx: Ctx<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Pumped {
    let pumped = match out.send(Msg::Open(VERSION).encode()).await {
        Ok(()) => pump(&app, out, src, ctx, stop).await,
        Err(e) => Pumped {
            end: TunnelEnd::PathLost(e),
            outages: 0,
        },
    };
    finish(app, out, &pumped.end, true).await;
    pumped
}

/// Entry side: the tunnel's own client, and the linger deadline while the path is down.
struct EntrySource {
    client: Client,
    cap: Duration,
    linger: Duration,
    connected: bool,
    started: Instant,
    down_since: Option<Instant>,
}

impl Source for EntrySource {
    async fn next(&mut self) -> Inbound {
        loop {
            let deadline = match (self.connected, self.down_since) {
                (false, _) => Some(self.started + self.cap),
                (true, Some(t)) => Some(t + self.linger),
                (true, None) => None,
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = self.client.next_event() => match ev {
                    None => return Inbound::End(TunnelEnd::PathLost("tether client stopped".into())),
                    Some(ClientEvent::Connected { welcome }) => {
                        if !self.connected {
                            let Some(grant) = welcome.session else {
                                return Inbound::End(TunnelEnd::Protocol(
                                    "the relay does not grant sessions".into(),
                                ));
                            };
                            self.linger = self.cap.min(grant.linger);
                            self.connected = true;
                        }
                    }
                    Some(ClientEvent::Resumed { .. }) => {
                        if self.down_since.take().is_some() {
                            return Inbound::PathUp;
                        }
                    }
                    Some(ClientEvent::SessionLost { .. }) => {
                        return Inbound::End(TunnelEnd::PathLost(
                            "the relay no longer holds the session".into(),
                        ))
                    }
                    Some(ClientEvent::Message(m)) => return Inbound::Msg(m),
                    Some(ClientEvent::Disconnected { disconnect }) => {
                        if self.connected && self.down_since.is_none() {
                            self.down_since = Some(Instant::now());
                            return Inbound::PathDown(disconnect.reason.to_string());
                        }
                    }
                    Some(ClientEvent::GaveUp { reason, .. }) => {
                        return Inbound::End(TunnelEnd::PathLost(format!("gave up: {reason}")))
                    }
                    Some(_) => {}
                },
                _ = sleep => {
                    let why = if self.connected {
                        format!("path down longer than the linger ({})", Human(self.linger))
                    } else {
                        format!("relay unreachable for {}", Human(self.cap))
                    };
                    return Inbound::End(TunnelEnd::PathLost(why));
                }
            }
        }
    }
}
