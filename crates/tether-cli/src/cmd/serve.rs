//! `tether serve`: the connection server with presence, an event log and a status page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tether::{Server, ServerConfig, ServerEvent};
use tether_proto::duration::Human;
use tether_proto::policy::Policy;
use tether_proto::presence::PresenceState;

use crate::config::{
    parse_addr, parse_addr_or_off, parse_bool, parse_bytes, parse_count, parse_duration,
    parse_duration_or_off, parse_size, Layers, Toggle, TypedPolicyFlags,
};
use crate::gateway::event::{self, StartInfo};
use crate::gateway::journal::Journal;
use crate::gateway::webhook::Webhook;
use crate::gateway::Gateway;
use crate::log;
use crate::security::{read_http_token, ServerSecurity, ServerSecurityArgs, SERVER_KEYS};
use crate::status::metrics::ServerCollector;
use crate::status::model::ServerSource;
use tether_proto::presets::PathSpec;

const KEYS: &[&str] = &[
    "listen",
    "http",
    "detect_within",
    "path",
    "echo",
    "max_connections",
    "park_threads",
    "handshake_timeout",
    "max_frame",
    "heartbeat",
    "idle_timeout",
    "session_linger",
    "replay_buffer",
    "replay_messages",
    "http_token_file",
    "api_max_body",
    "event_ring_bytes",
    "event_ring_events",
    "auth_webhook",
    "auth_webhook_timeout",
    "cluster",
    "node_id",
    "cluster_name",
    "cluster_dead_after",
    "cluster_ca",
    "cluster_password_file",
    "durable_sessions",
    "durable_max_bytes",
];

/// Run a tether server that knows who is online.
///
/// Clients connect with the tether protocol (`tether connect`, or the `tether` library). The
/// server dictates the heartbeat interval and applies `--detect-within`: a client that sends
/// nothing at all for that long is declared dead (`heartbeat-timeout`), and both sides' TCP
/// keepalive and TCP_USER_TIMEOUT are set to match. Every connect, state change and
/// disconnect is logged on stderr with its reason and how long the client had been silent.
///
/// Security: beyond loopback the server refuses to start without TLS (--tls-cert,
/// --tls-key) and authentication (--auth-secret, --auth-public-key, --auth-jwks, or
/// --client-ca), unless --insecure is given. With authentication a client may only claim the
/// ids its credential allows, and only the same principal may replace its connection or
/// resume its session. The status page and API take a bearer token (--http-token-file).
///
/// SIGHUP reloads the TLS certificate, key and client CA and the JWT keys from their files
/// (new handshakes use them; established connections are untouched; a file that fails to
/// load keeps the old one and says why). Other settings need a restart. Ctrl-C or SIGTERM
/// closes every connection with CLOSE(going-away) and exits.
///
/// Settings come from flags, then `TETHER_<KEY>` environment variables (e.g.
/// TETHER_DETECT_WITHIN=10s), then a TOML file given with --config (keys as the long flags,
/// e.g. `detect_within = "10s"`), then defaults.
///
/// The HTTP listener (--http) is also the gateway for a backend in any language
/// (docs/API.md): send to a client (POST /api/clients/ID/messages), broadcast, close, list
/// clients, and read every presence change and client message from GET /api/events (SSE or
/// NDJSON), resumable with Last-Event-ID from a ring bounded by --event-ring-bytes and
/// --event-ring-events. Without --api-token-file the API answers only on loopback.
///
/// With --cluster redis://HOST:PORT --node-id NAME, several nodes behind one load balancer
/// share presence (every node lists every client with its node), detect a dead node within
/// --cluster-dead-after (its clients go offline, node-lost), close the older connection when a
/// client connects on two nodes, route API sends and closes to the node that holds the
/// client, and move a client's session to the node its reconnect lands on (docs/CLUSTER.md).
/// With --durable-sessions as well, every session has a copy in Redis: when its node dies,
/// the client resumes on another node with nothing lost either way.
///
/// Examples:
///   tether serve                                   # 127.0.0.1:7300, status page and API on :7301
///   tether serve --path azure-lb --detect-within 20s --echo
///   tether serve --listen 0.0.0.0:7300 --tls-cert server.crt --tls-key server.key \
///       --auth-secret secret.key --http-token-file http.token
///   tether serve --listen 0.0.0.0:7300 --http off --config /etc/tether.toml
///   tether serve --cluster redis://10.0.0.5:6379 --node-id node-a
///   tether serve --http 0.0.0.0:7301 --api-token-file /etc/tether/api-token --auth-webhook http://127.0.0.1:8080/auth
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct ServeArgs {
    /// Address to accept tether clients on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7300", value_parser = parse_addr)]
    listen: SocketAddr,
    /// Address of the status page, the server API (/api/) and /metrics, or "off".
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:7301", value_parser = parse_addr_or_off)]
    http: Toggle<SocketAddr>,
    /// Declare a silent client dead within this long (e.g. 30s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    detect_within: Duration,
    /// Idle timeout of the path in front of the server: a preset name (`tether plan --list`),
    /// PRESET=DURATION, or a duration. Heartbeats and keepalive are kept well under it.
    #[arg(long, value_name = "PRESET|DURATION", value_parser = PathSpec::parse)]
    path: Option<PathSpec>,
    /// Also echo every message back to its sender (demos and tests; messages still go to
    /// the event stream).
    #[arg(long)]
    echo: bool,
    /// Refuse connections beyond this many (`server-full`).
    #[arg(long, value_name = "N", default_value = "100000", value_parser = parse_count)]
    max_connections: usize,
    /// Threads that hold idle clients (default: one per CPU). An idle client is parked
    /// with its socket in one epoll and no task of its own until it has work again; one of
    /// these threads waits on that epoll and answers the heartbeats (a burst of them wakes
    /// one thread), the others help write what the application sends to idle clients and
    /// sleep otherwise. With 1, that thread writes every send itself: idle heartbeats cost
    /// the same (measured in alternated rounds), and sends queue sooner under a heavy send
    /// load (on two CPUs at a sustained ~30,000-40,000 sends/s: 26-102 ms at the median
    /// instead of 2-6 ms). From 1 to 256.
    #[arg(long, value_name = "N", value_parser = parse_park_threads)]
    park_threads: Option<usize>,
    /// A client must say hello within this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest frame accepted (16 B to 1 GiB).
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = parse_max_frame)]
    max_frame: u32,
    /// Override the derived heartbeat interval (must stay valid for --detect-within and --path).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    heartbeat: Option<Duration>,
    /// Close a client's connection after this long without application data (heartbeats do
    /// not count). Off by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Hold a disconnected client's session this long so it can resume without losing or
    /// duplicating a message (the client shows as `resuming`), or "off".
    #[arg(long, value_name = "DURATION|off", default_value = "30s", value_parser = parse_duration_or_off)]
    session_linger: Toggle<Duration>,
    /// Unacknowledged bytes kept per session for replay; sending waits beyond this.
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size)]
    replay_buffer: usize,
    /// Unacknowledged messages kept per session for replay.
    #[arg(long, value_name = "N", default_value = "4096", value_parser = parse_count)]
    replay_messages: usize,
    /// Require `Authorization: Bearer TOKEN` (or HTTP Basic with TOKEN as the password, for
    /// browsers) on every route of the HTTP listener (status page, /metrics, /api/), with TOKEN
    /// read from this file. Without it /api/ answers loopback peers only. Also accepted as
    /// --api-token-file.
    #[arg(long, value_name = "FILE", alias = "api-token-file")]
    http_token_file: Option<PathBuf>,
    /// Largest request body the API reads (a message is at most --max-frame less 9 bytes).
    #[arg(long, value_name = "BYTES", default_value = "2MiB", value_parser = parse_size)]
    api_max_body: usize,
    /// Bytes of events kept for backends that reconnect (GET /api/events with
    /// Last-Event-ID); older events are dropped and a late reader gets a `gap` event.
    #[arg(long, value_name = "BYTES", default_value = "64MiB", value_parser = parse_size)]
    event_ring_bytes: usize,
    /// Events kept for backends that reconnect, at most.
    #[arg(long, value_name = "N", default_value = "100000", value_parser = parse_count)]
    event_ring_events: usize,
    /// Ask this URL (POST, JSON) whether each HELLO may connect (docs/API.md); a webhook
    /// that does not answer in time refuses the connection (fail closed).
    #[arg(long, value_name = "URL")]
    auth_webhook: Option<String>,
    /// How long a HELLO waits for the webhook (less than --handshake-timeout).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    auth_webhook_timeout: Duration,
    /// Share presence and routing with the other nodes of a cluster through this Redis
    /// (redis://HOST:PORT or rediss://HOST:PORT for TLS; docs/CLUSTER.md). Needs --node-id.
    #[arg(long, value_name = "URL", value_parser = crate::cluster::parse_url)]
    cluster: Option<String>,
    /// This node's id in the cluster (letters, digits, '.', '_', '-'; unique per node).
    #[arg(long, value_name = "NAME", value_parser = crate::cluster::parse_name)]
    node_id: Option<String>,
    /// The cluster's name: nodes with the same Redis and name form one cluster.
    #[arg(long, value_name = "NAME", default_value = "tether", value_parser = crate::cluster::parse_name)]
    cluster_name: String,
    /// Declare a node that stopped heartbeating in Redis dead (its clients `node-lost`)
    /// within this long; nodes heartbeat every third of it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_dead_after)]
    cluster_dead_after: Duration,
    /// PEM file with the CA certificates a rediss:// Redis is checked against (default: the
    /// system's roots).
    #[arg(long, value_name = "FILE")]
    cluster_ca: Option<PathBuf>,
    /// File with the password of the Redis user (AUTH; the user may be named in the URL as
    /// rediss://USER@HOST:PORT). Keeps the password out of the URL, the environment and `ps`.
    #[arg(long, value_name = "FILE")]
    cluster_password_file: Option<PathBuf>,
    /// Keep a copy of every session in the cluster's Redis (needs --cluster): a client whose
    /// node died resumes on another node with nothing lost. Each message to a client is in
    /// Redis before the client can get it (the API answers 202 after both; a node that
    /// cannot reach Redis refuses sends to its clients with 503), and each client message
    /// is acknowledged only once it is in Redis. Costs one Redis write per message each
    /// way (docs/CLUSTER.md, "Durable sessions").
    #[arg(long)]
    durable_sessions: bool,
    /// Bound of one session's copy (its unacknowledged messages to the client): past it the
    /// copy is marked incomplete and a resume elsewhere is refused (session-lost naming
    /// the numbers) until acknowledgements bring it back within the bound.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size)]
    durable_max_bytes: usize,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    security: ServerSecurityArgs,
}

/// A frame limit: 16 B to 1 GiB.
fn parse_max_frame(s: &str) -> std::result::Result<u32, String> {
    let n = parse_bytes(s)?;
    if !(16..=1 << 30).contains(&n) {
        return Err("must be between 16 B and 1 GiB".to_owned());
    }
    Ok(n as u32) // ≤ 1 GiB fits
}

/// Threads for idle clients: 1 to 256 (each has an epoll and an eventfd from the start).
pub(crate) fn parse_park_threads(s: &str) -> std::result::Result<usize, String> {
    let n = parse_count(s)?;
    if n > 256 {
        return Err(format!("{n} threads: must be between 1 and 256"));
    }
    Ok(n)
}

/// A node dead bound: 300 ms to 10 min (heartbeats every third of it).
fn parse_dead_after(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(300)..=Duration::from_secs(600)).contains(&d) {
        return Err("must be between 300ms and 10m".to_owned());
    }
    Ok(d)
}

/// Everything `serve` needs, resolved from the layers.
pub(crate) struct ServeSettings {
    pub(crate) listen: SocketAddr,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) policy: Policy,
    pub(crate) echo: bool,
    pub(crate) max_connections: usize,
    /// `None`: the library's default (one per worker thread).
    pub(crate) park_threads: Option<usize>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame: u32,
    pub(crate) session_linger: Option<Duration>,
    pub(crate) session: tether_proto::session::SessionConfig,
    pub(crate) security: ServerSecurity,
    pub(crate) http_token: Option<String>,
    pub(crate) api_max_body: usize,
    pub(crate) event_ring: crate::gateway::journal::Bounds,
    pub(crate) auth_webhook: Option<String>,
    pub(crate) auth_webhook_timeout: Duration,
    pub(crate) cluster: Option<crate::cluster::ClusterSettings>,
}

impl ServeArgs {
    /// The settings from the flags (given on the command line in `matches`), the
    /// `TETHER_*` environment and the config file.
    pub(crate) fn resolve(&self, matches: &clap::ArgMatches) -> Result<ServeSettings> {
        let keys: Vec<&str> = KEYS.iter().chain(SERVER_KEYS).copied().collect();
        let l = Layers::load(self.config.as_deref(), &keys)?.given(matches);
        let mut policy = l.typed_policy(TypedPolicyFlags {
            detect_within: self.detect_within,
            path: self.path,
            heartbeat: self.heartbeat,
            idle_timeout: self.idle_timeout,
        })?;
        // RTT for the status page: one PING every three heartbeat intervals (it replaces a
        // heartbeat, so it costs 9 bytes more, not an extra packet).
        policy
            .ping_interval
            .get_or_insert(policy.heartbeat_interval * 3);
        let session = tether_proto::session::SessionConfig {
            max_replay_bytes: l.pick("replay_buffer", self.replay_buffer, parse_size)?,
            max_replay_messages: l.pick("replay_messages", self.replay_messages, parse_count)?,
            ..Default::default()
        };
        if l.pick("durable_sessions", self.durable_sessions, parse_bool)?
            && l.pick_opt("cluster", self.cluster.clone(), crate::cluster::parse_url)?
                .is_none()
        {
            return Err(crate::exit::UsageError(
                "--durable-sessions keeps the copies in the cluster's Redis: give --cluster redis://HOST:PORT --node-id NAME too".into(),
            )
            .into());
        }
        let cluster = match (
            l.pick_opt("cluster", self.cluster.clone(), crate::cluster::parse_url)?,
            l.pick_opt("node_id", self.node_id.clone(), crate::cluster::parse_name)?,
        ) {
            (None, None) => None,
            (Some(url), Some(node_id)) => Some(crate::cluster::ClusterSettings {
                url,
                node_id,
                name: l.pick(
                    "cluster_name",
                    self.cluster_name.clone(),
                    crate::cluster::parse_name,
                )?,
                dead_after: l.pick(
                    "cluster_dead_after",
                    self.cluster_dead_after,
                    parse_dead_after,
                )?,
                offline_retention: Duration::from_secs(3600),
                ca: l
                    .pick_opt("cluster_ca", self.cluster_ca.clone(), crate::security::path)?
                    .map(|p| crate::cluster::read_ca(&p))
                    .transpose()?,
                password: l
                    .pick_opt(
                        "cluster_password_file",
                        self.cluster_password_file.clone(),
                        crate::security::path,
                    )?
                    .map(|p| crate::cluster::read_password(&p))
                    .transpose()?,
                durable: l
                    .pick("durable_sessions", self.durable_sessions, parse_bool)?
                    .then(|| l.pick("durable_max_bytes", self.durable_max_bytes, parse_size))
                    .transpose()?,
            }),
            (Some(_), None) => {
                return Err(crate::exit::UsageError(
                    "--cluster needs --node-id NAME (unique per node)".into(),
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(crate::exit::UsageError(
                    "--node-id is for a cluster: give --cluster redis://HOST:PORT too".into(),
                )
                .into())
            }
        };
        Ok(ServeSettings {
            cluster,
            listen: l.pick("listen", self.listen, parse_addr)?,
            http: l.pick("http", self.http, parse_addr_or_off)?.0,
            policy,
            echo: l.pick("echo", self.echo, parse_bool)?,
            max_connections: l.pick("max_connections", self.max_connections, parse_count)?,
            park_threads: l.pick_opt("park_threads", self.park_threads, parse_park_threads)?,
            handshake_timeout: l.pick(
                "handshake_timeout",
                self.handshake_timeout,
                parse_duration,
            )?,
            max_frame: l.pick("max_frame", self.max_frame, parse_max_frame)?,
            session_linger: l
                .pick("session_linger", self.session_linger, parse_duration_or_off)?
                .0,
            session,
            security: ServerSecurity::resolve(&self.security, &l)?,
            http_token: l
                .pick_opt("http_token_file", self.http_token_file.clone(), |s| {
                    Ok::<_, String>(PathBuf::from(s))
                })?
                .map(|p| read_http_token(&p))
                .transpose()?,
            api_max_body: l.pick("api_max_body", self.api_max_body, parse_size)?,
            event_ring: crate::gateway::journal::Bounds {
                max_bytes: l.pick("event_ring_bytes", self.event_ring_bytes, parse_size)?,
                max_events: l.pick("event_ring_events", self.event_ring_events, parse_count)?,
            },
            auth_webhook: l.pick_opt("auth_webhook", self.auth_webhook.clone(), |s| {
                Ok::<_, String>(s.to_owned())
            })?,
            auth_webhook_timeout: l.pick(
                "auth_webhook_timeout",
                self.auth_webhook_timeout,
                parse_duration,
            )?,
        })
    }
}

pub(crate) fn run(args: ServeArgs, matches: &clap::ArgMatches) -> Result<ExitCode> {
    let s = args.resolve(matches)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(serve(s))
}

async fn serve(s: ServeSettings) -> Result<ExitCode> {
    // Signal handlers before anything listens: SIGTERM or SIGHUP right after start-up must
    // not kill the server without a CLOSE to anyone.
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    let mut hangups = log::Hangups::install();
    s.security
        .check_exposure_with(s.listen, "listen", s.auth_webhook.is_some())?;
    if let Some(c) = &s.cluster {
        c.check_exposure(s.security.insecure)?;
    }
    let mut cfg = ServerConfig::new(s.listen)
        .policy(s.policy.clone())
        .max_connections(s.max_connections)
        .handshake_timeout(s.handshake_timeout)
        .max_frame_len(s.max_frame)
        .session_linger(s.session_linger)
        .session_config(s.session)
        .presence_events(true);
    if let Some(n) = s.park_threads {
        cfg = cfg.park_threads(n);
    }
    if let Some(tls) = &s.security.tls {
        cfg = cfg.tls(tls.clone());
    }
    match (&s.auth_webhook, s.security.authorizer()) {
        (Some(_), Some(_)) => {
            return Err(crate::exit::UsageError(
                "--auth-webhook decides who connects on its own: give it without --auth-secret, --auth-public-key, --auth-jwks or --client-ca".into(),
            )
            .into())
        }
        (Some(url), None) => {
            if s.auth_webhook_timeout >= s.handshake_timeout {
                return Err(crate::exit::UsageError(format!(
                    "--auth-webhook-timeout ({}) must be shorter than --handshake-timeout ({})",
                    Human(s.auth_webhook_timeout),
                    Human(s.handshake_timeout)
                ))
                .into());
            }
            cfg = cfg.authorize(Arc::new(Webhook::new(url, s.auth_webhook_timeout)?));
        }
        (None, Some(hook)) => cfg = cfg.authorize(hook),
        (None, None) => {}
    }
    // With a cluster, a resume of a session another node holds takes it over from there.
    let sessions = s
        .cluster
        .as_ref()
        .map(|_| Arc::new(crate::cluster::ClusterSessions::default()));
    if let Some(src) = &sessions {
        cfg = cfg.session_source(src.clone());
    }
    // A client's message is acknowledged only once its durable copy has it.
    let durable = s.cluster.as_ref().is_some_and(|c| c.durable.is_some());
    cfg = cfg.ack_after_commit(durable);
    let mut server = Server::bind(cfg)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let p = &s.policy;
    log::line(
        "-",
        "listening",
        &format!(
            "addr={} {} heartbeat={} dead_after={} suspect_after={} keepalive={} user_timeout={} park_threads={}{}",
            server.local_addr(),
            s.security.describe(),
            Human(p.heartbeat_interval),
            Human(p.dead_after),
            Human(p.suspect_after()),
            p.keepalive
                .map(|k| format!("{}+{}x{}", Human(k.idle), k.count, Human(k.interval)))
                .unwrap_or_else(|| "off".into()),
            p.user_timeout
                .map(|u| Human(u).to_string())
                .unwrap_or_else(|| "off".into()),
            server.handle().park_threads(),
            if s.echo { " echo=on" } else { "" }
        ),
    );
    let cluster = match &s.cluster {
        Some(c) => Some(crate::cluster::Cluster::start(c.clone(), server.handle())?),
        None => None,
    };
    if let (Some(src), Some(c)) = (&sessions, &cluster) {
        src.bind(c);
    }
    // The event journal exists with the HTTP listener (nobody could read it otherwise).
    let mut journal: Option<Arc<Journal>> = None;
    if let Some(addr) = s.http {
        let listener = crate::http::bind(addr, "the status page and API").await?;
        let bound = listener.local_addr().unwrap_or(addr);
        log::line("-", "status-page", &format!("http://{bound}/"));
        log::line(
            "-",
            "api",
            &format!(
                "url=http://{bound}/api/ events=http://{bound}/api/events access={}",
                if s.http_token.is_some() {
                    "bearer-token"
                } else {
                    "loopback-only"
                }
            ),
        );
        let j = Arc::new(Journal::new(
            Journal::first_id_at(event::now_unix_ms()),
            s.event_ring,
        ));
        event::start(
            &j,
            StartInfo {
                listen: server.local_addr().to_string(),
                version: env!("CARGO_PKG_VERSION"),
                first_id: j.run_first(),
                ring_events: s.event_ring.max_events,
                ring_bytes: s.event_ring.max_bytes,
                session_linger_ms: s
                    .session_linger
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
        );
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ServerCollector {
            handle: server.handle(),
        }));
        let local = ServerSource {
            handle: server.handle(),
            rtt_every: s.policy.ping_interval,
        };
        let source: Arc<dyn crate::status::model::StatusSource> = match &cluster {
            Some(c) => {
                registry.register_collector(Box::new(crate::cluster::ClusterCollector(c.clone())));
                Arc::new(crate::cluster::ClusterSource {
                    local,
                    cluster: c.clone(),
                })
            }
            None => Arc::new(local),
        };
        if !addr.ip().is_loopback() && s.http_token.is_none() {
            log::line(
                "-",
                "warning",
                &log::kv(&[(
                    "note",
                    &format!(
                        "the status page and API on {addr} are open to anyone who can reach them (every client's id and address): add --http-token-file FILE"
                    ),
                )]),
            );
        }
        let gw = Arc::new(Gateway {
            handle: server.handle(),
            journal: j.clone(),
            max_body: s.api_max_body,
            body_deadline: crate::gateway::api::BODY_DEADLINE,
            keepalive: Duration::from_secs(15),
            cluster: cluster.clone(),
        });
        let api = crate::status::api_routes(source.clone()).merge(crate::gateway::routes(gw));
        // Without a token the API (which can send to and close any client) answers loopback
        // peers only; with one, every route needs it.
        let api = match &s.http_token {
            Some(_) => api,
            None => crate::gateway::loopback_only(api),
        };
        let app = crate::http_auth::protect(
            crate::status::page_routes(source, Arc::new(registry)).merge(api),
            s.http_token.clone(),
        );
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::GATEWAY_LIMITS,
        ));
        if let Some(c) = &cluster {
            c.set_journal(j.clone());
        }
        journal = Some(j);
    }
    let handle = server.handle();

    loop {
        tokio::select! {
            ev = server.next_event() => match ev {
                None => break,
                Some(ev) => dispatch(&handle, ev, s.echo, journal.as_ref(), cluster.as_ref()),
            },
            () = hangups.recv() => {
                let done = s.security.reload();
                if done.is_empty() {
                    log::line("-", "reload", "signal=SIGHUP note=\"nothing to reload: no TLS or auth files; settings need a restart\"");
                }
                for (ok, what) in done {
                    let event = if ok { "reloaded" } else { "reload-failed" };
                    log::line("-", event, &log::kv(&[("signal", "SIGHUP"), ("what", &what), ("connections", "untouched")]));
                }
            }
            _ = &mut stop => {
                log::line("-", "shutdown", "close=going-away");
                handle.shutdown(Duration::from_secs(3)).await;
                // What the shutdown itself produced (clients going offline) still goes out.
                while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(100), server.next_event()).await {
                    dispatch(&handle, ev, false, journal.as_ref(), cluster.as_ref());
                }
                if let Some(c) = &cluster {
                    c.leave(Duration::from_secs(1)).await;
                }
                break;
            }
        }
    }
    if let Some(j) = &journal {
        event::stop(j, "shutdown");
        j.close();
        // Give open event streams a moment to send the last events.
        let _ = tokio::time::timeout(Duration::from_secs(2), j.readers_gone()).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// One server event: into the journal the API's event stream reads (with
/// `--durable-sessions` the cluster layer records a client's events instead, a message once
/// it is in the session's copy), to the cluster, and to the log.
fn dispatch(
    handle: &tether::ServerHandle,
    ev: ServerEvent,
    echo: bool,
    journal: Option<&Arc<Journal>>,
    cluster: Option<&Arc<crate::cluster::Cluster>>,
) {
    if let Some(j) = journal {
        if !cluster.is_some_and(|c| c.durable())
            || crate::cluster::durable::client_of(&ev).is_none()
        {
            event::record(j, &ev);
        }
    }
    if let Some(c) = cluster {
        c.observe(&ev);
    }
    log_event(handle, ev, echo, cluster);
}

/// Logs one server event on stderr (and echoes messages with `--echo`).
fn log_event(
    handle: &tether::ServerHandle,
    ev: ServerEvent,
    echo: bool,
    cluster: Option<&Arc<crate::cluster::Cluster>>,
) {
    match ev {
        ServerEvent::Connected {
            client_id,
            remote,
            conn_id,
            replaced,
        } => {
            let extra = replaced
                .map(|r| format!(" replaced_conn={r}"))
                .unwrap_or_default();
            log::line(
                &client_id,
                "connected",
                &format!("remote={remote} conn={conn_id}{extra}"),
            );
        }
        ServerEvent::Message { client_id, msg, .. } => {
            tracing::debug!(client = %client_id, bytes = msg.len(), "message");
            if echo && cluster.is_some_and(|c| c.durable()) {
                // Through the client's copy, in order (its worker).
                if let Some(c) = cluster {
                    c.durable_job(
                        &client_id,
                        crate::cluster::durable::Job::Send {
                            msg,
                            reply: None,
                            deadline: None,
                            sent_key: None,
                            give_up: None,
                        },
                    );
                }
            } else if echo {
                // Never await one client here: a client that does not read is closed as a
                // slow consumer instead of stalling everyone's echo.
                if let Err(tether::SendError::NotConnected(_)) =
                    handle.try_send(&client_id, msg.clone())
                {
                    // Received here just before its session moved to another node: the
                    // echo follows it there.
                    if let Some(c) = cluster {
                        c.forward_if_moved(&client_id, msg);
                    }
                }
            }
        }
        ServerEvent::Disconnected {
            client_id,
            conn_id,
            disconnect,
        } => {
            log::line(
                &client_id,
                "disconnected",
                &format!(
                    "reason={} silent_for={} conn={conn_id}",
                    log::quote(&disconnect.reason.to_string()),
                    Human::ms(disconnect.silent_for)
                ),
            );
        }
        ServerEvent::Resumed {
            client_id,
            conn_id,
            replayed,
        } => {
            log::line(
                &client_id,
                "resumed",
                &format!("conn={conn_id} replayed={replayed}"),
            );
        }
        ServerEvent::SessionLost {
            client_id,
            unacked,
            unsent,
            ..
        } => {
            let what = match unacked {
                Some(r) => format!(
                    "messages {}..={} may not have been delivered",
                    r.start(),
                    r.end()
                ),
                None => "nothing unacknowledged".to_owned(),
            };
            log::line(
                &client_id,
                "session-lost",
                &log::kv(&[("lost", &what), ("never_sent", &unsent.len().to_string())]),
            );
        }
        ServerEvent::Refused { remote, reason } => {
            log::line(
                "-",
                "refused",
                &format!("remote={remote} reason={}", log::quote(&reason.to_string())),
            );
        }
        ServerEvent::Presence { change: ch, .. } => match &ch.to {
            PresenceState::Suspect => {
                log::line(&ch.id, "suspect", "note=\"silent past heartbeat + margin\"")
            }
            PresenceState::Online if matches!(ch.from, Some(PresenceState::Suspect)) => {
                log::line(&ch.id, "recovered", "note=\"heard from again\"")
            }
            PresenceState::Offline {
                reason, silent_for, ..
            } => log::line(
                &ch.id,
                "offline",
                &format!(
                    "reason={} silent_for={}",
                    log::quote(&reason.to_string()),
                    Human::ms(*silent_for)
                ),
            ),
            PresenceState::Resuming { until, .. } => {
                let left = until.saturating_duration_since(ch.at);
                log::line(&ch.id, "resuming", &format!("held_for={}", Human::ms(left)))
            }
            _ => {}
        },
        _ => {}
    }
}
