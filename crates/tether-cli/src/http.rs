//! The status HTTP server of `tether serve`: a presence page, a JSON API and Prometheus metrics.
//!
//! ```text
//!   GET /             HTML page listing clients and their state; refreshes itself every 2 s
//!                     (inline script fetching /api/clients; meta refresh without scripts)
//!   GET /api/clients  {"now_unix_ms":…, "counts":{"online":…,…}, "clients":[{…}, …]}
//!   GET /metrics      Prometheus text exposition format 0.0.4
//! ```
//!
//! A deliberately small HTTP/1.1 server (no hyper): GET and HEAD only, one request per
//! connection (`Connection: close`), the request head capped at 8 KiB and read within 5 s, a
//! bounded number of connections served at once. Anything else is answered with 400, 404, 405,
//! 408 or 431 and the connection closed; nothing a client sends can panic the server.
//!
//! The server does not know the server type: it asks a [`StatusSource`] for plain snapshot
//! rows ([`ClientRow`]) and counters ([`MetricsSnapshot`]) on every request, and renders them
//! with pure functions ([`render_html`], [`render_clients_json`], [`render_metrics`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tether_proto::presence::{Entry, PresenceCounts, PresenceKind, PresenceState};
use tether_proto::DisconnectReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Where the status server gets its data. Called once per request, from a tokio task; keep
/// it quick (take a snapshot under a short lock, do not wait on I/O).
pub(crate) trait StatusSource: Send + Sync + 'static {
    /// One row per client the server knows (any order; the pages sort by id).
    fn clients(&self) -> Vec<ClientRow>;
    /// The counters for `/metrics`.
    fn metrics(&self) -> MetricsSnapshot;
}

/// What the presence registry knows about one client, borrowed (from a registry `Entry` or
/// from a server's `ClientInfo`).
pub(crate) struct PresenceView<'a> {
    pub(crate) id: &'a str,
    pub(crate) state: &'a PresenceState,
    pub(crate) conn_id: u64,
    pub(crate) remote: SocketAddr,
    pub(crate) connected_since: Instant,
    pub(crate) connects: u64,
    pub(crate) disconnects: u64,
}

/// One client, as shown on the status page and in `/api/clients`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClientRow {
    /// The client id.
    pub(crate) id: String,
    /// Its presence state.
    pub(crate) state: PresenceKind,
    /// The id of its current (or last) connection.
    pub(crate) conn_id: u64,
    /// The remote address of that connection.
    pub(crate) remote: Option<SocketAddr>,
    /// When that connection was registered (wall clock).
    pub(crate) connected_since: Option<SystemTime>,
    /// How long ago anything was last received from it.
    pub(crate) last_seen_ago: Option<Duration>,
    /// The last measured round-trip time.
    pub(crate) rtt: Option<Duration>,
    /// For `Resuming`/`Offline`: when the connection ended (wall clock).
    pub(crate) disconnected_at: Option<SystemTime>,
    /// For `Resuming`/`Offline`: how long the peer had been silent when it ended.
    pub(crate) silent_for: Option<Duration>,
    /// For `Resuming`/`Offline`: why it ended.
    pub(crate) reason: Option<DisconnectReason>,
    /// For `Resuming`: how long the session is still held.
    pub(crate) hold_left: Option<Duration>,
    /// Application messages received from the client on the current connection.
    pub(crate) messages_in: u64,
    /// Application messages sent to the client on the current connection.
    pub(crate) messages_out: u64,
    /// Bytes received from the client on the current connection.
    pub(crate) bytes_in: u64,
    /// Bytes sent to the client on the current connection.
    pub(crate) bytes_out: u64,
    /// Connections registered for this id.
    pub(crate) connects: u64,
    /// Connections of this id that ended.
    pub(crate) disconnects: u64,
}

impl ClientRow {
    /// A row from a presence registry entry (see [`ClientRow::from_view`]).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn from_entry(id: &str, entry: &Entry, now: Instant, wall_now: SystemTime) -> Self {
        let view = PresenceView {
            id,
            state: &entry.state,
            conn_id: entry.conn_id,
            remote: entry.remote,
            connected_since: entry.connected_since,
            connects: entry.connects,
            disconnects: entry.disconnects,
        };
        ClientRow::from_view(&view, now, wall_now)
    }

    /// A row from what the presence registry knows. `now` and `wall_now` are the same moment
    /// on the monotonic and the wall clock (to convert instants). The per-connection figures
    /// the registry does not keep (`rtt`, messages, bytes, and `last_seen_ago` while
    /// connected) are left empty for the caller to fill from its connection counters; for a
    /// client that is no longer connected, last seen is derived from the disconnect time and
    /// silence.
    pub(crate) fn from_view(v: &PresenceView<'_>, now: Instant, wall_now: SystemTime) -> Self {
        let (id, entry) = (v.id, v);
        let wall = |t: Instant| wall_now.checked_sub(now.saturating_duration_since(t));
        let (disconnected_at, silent_for, reason, hold_left) = match &entry.state {
            PresenceState::Online | PresenceState::Suspect => (None, None, None, None),
            PresenceState::Resuming {
                reason,
                at,
                silent_for,
                until,
            } => (
                Some(*at),
                Some(*silent_for),
                Some(reason.clone()),
                Some(until.saturating_duration_since(now)),
            ),
            PresenceState::Offline {
                reason,
                at,
                silent_for,
            } => (Some(*at), Some(*silent_for), Some(reason.clone()), None),
        };
        let last_seen_ago = disconnected_at
            .map(|at| now.saturating_duration_since(at) + silent_for.unwrap_or_default());
        ClientRow {
            id: id.to_owned(),
            state: entry.state.kind(),
            conn_id: entry.conn_id,
            remote: Some(entry.remote),
            connected_since: wall(entry.connected_since),
            last_seen_ago,
            rtt: None,
            disconnected_at: disconnected_at.and_then(wall),
            silent_for,
            reason,
            hold_left,
            messages_in: 0,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            connects: entry.connects,
            disconnects: entry.disconnects,
        }
    }
}

/// The counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct MetricsSnapshot {
    /// Open client connections (`tether_connections`).
    pub(crate) connections: u64,
    /// Known clients per presence state (`tether_presence{state}`).
    pub(crate) presence: PresenceCounts,
    /// Ended connections per reason, indexed like [`DisconnectReason::LABELS`] (see
    /// [`disconnect_index`]) (`tether_disconnects_total{reason}`).
    pub(crate) disconnects: [u64; DisconnectReason::LABELS.len()],
    /// Heartbeats sent (`tether_heartbeats_sent_total`).
    pub(crate) heartbeats_sent: u64,
    /// Heartbeats received (`tether_heartbeats_received_total`).
    pub(crate) heartbeats_received: u64,
    /// Application messages received (`tether_messages_received_total`).
    pub(crate) messages_received: u64,
    /// Application messages sent (`tether_messages_sent_total`).
    pub(crate) messages_sent: u64,
}

/// The index of `reason`'s label in [`DisconnectReason::LABELS`] (and so in
/// [`MetricsSnapshot::disconnects`]); `None` only for a label added to the enum but not to
/// `LABELS`.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn disconnect_index(reason: &DisconnectReason) -> Option<usize> {
    DisconnectReason::LABELS
        .iter()
        .position(|l| *l == reason.label())
}

// ---- rendering (pure) -----------------------------------------------------------------------

/// The presence counts of `rows`.
pub(crate) fn count_rows(rows: &[ClientRow]) -> PresenceCounts {
    let mut counts = PresenceCounts::default();
    for r in rows {
        *counts.get_mut(r.state) += 1;
    }
    counts
}

const PAGE_TEMPLATE: &str = include_str!("status_page.html");

/// The status page: a summary line with the counts per state and a table of `rows` (in the
/// given order). `wall_now` stamps the "updated" time. The page refreshes itself.
pub(crate) fn render_html(
    rows: &[ClientRow],
    counts: &PresenceCounts,
    wall_now: SystemTime,
) -> String {
    let mut summary = String::new();
    for (i, kind) in PresenceKind::ALL.into_iter().enumerate() {
        if i > 0 {
            summary.push_str(" · ");
        }
        let _ = write!(summary, "<b>{}</b> {}", counts.get(kind), kind.label());
    }
    let total = counts.total();
    let _ = write!(
        summary,
        " — {total} {} — updated {} UTC",
        if total == 1 { "client" } else { "clients" },
        clock(Some(wall_now))
    );

    let mut body = String::new();
    for r in rows {
        let state = r.state.label();
        let _ = writeln!(
            body,
            "<tr data-id=\"{id}\"><td class=\"id\">{id}</td>\
             <td><span class=\"st st-{state}\">{state}</span></td>\
             <td>{remote}</td><td>{since}</td><td>{seen}</td>\
             <td class=\"num\">{rtt}</td><td class=\"num\">{silent}</td>\
             <td class=\"reason\">{reason}</td>\
             <td class=\"num\">{min}</td><td class=\"num\">{mout}</td></tr>",
            id = escape(&r.id),
            remote = r.remote.map(|a| a.to_string()).unwrap_or_default(),
            since = clock(r.connected_since),
            seen = r
                .last_seen_ago
                .map(|d| format!("{} ago", duration_text(d)))
                .unwrap_or_default(),
            rtt = r.rtt.map(rtt_text).unwrap_or_default(),
            silent = r.silent_for.map(duration_text).unwrap_or_default(),
            reason = reason_text(r),
            min = r.messages_in,
            mout = r.messages_out,
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td class=\"empty\" colspan=\"10\">no clients yet</td></tr>\n");
    }
    PAGE_TEMPLATE
        .replacen("{{SUMMARY}}", &summary, 1)
        .replacen("{{ROWS}}", &body, 1)
}

#[derive(Serialize)]
struct JsonPage<'a> {
    now_unix_ms: Option<u64>,
    counts: JsonCounts,
    clients: Vec<JsonRow<'a>>,
}

#[derive(Serialize)]
struct JsonCounts {
    online: usize,
    suspect: usize,
    resuming: usize,
    offline: usize,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    id: &'a str,
    state: &'static str,
    conn_id: u64,
    remote: Option<String>,
    connected_since_unix_ms: Option<u64>,
    last_seen_ms_ago: Option<u64>,
    rtt_us: Option<u64>,
    disconnected_at_unix_ms: Option<u64>,
    silent_for_ms: Option<u64>,
    reason: Option<&'static str>,
    reason_text: Option<String>,
    hold_left_ms: Option<u64>,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    connects: u64,
    disconnects: u64,
}

/// The `/api/clients` document:
///
/// ```text
/// {"now_unix_ms": u64,
///  "counts": {"online": n, "suspect": n, "resuming": n, "offline": n},
///  "clients": [{"id", "state" ("online"|"suspect"|"resuming"|"offline"), "conn_id",
///               "remote", "connected_since_unix_ms", "last_seen_ms_ago", "rtt_us",
///               "disconnected_at_unix_ms", "silent_for_ms",
///               "reason" (a DisconnectReason label), "reason_text" (its Display),
///               "hold_left_ms", "messages_in", "messages_out", "bytes_in", "bytes_out",
///               "connects", "disconnects"}, …]}
/// ```
///
/// Absent values are `null`. Counts are those of `rows`.
pub(crate) fn render_clients_json(rows: &[ClientRow], wall_now: SystemTime) -> String {
    let counts = count_rows(rows);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let page = JsonPage {
        now_unix_ms: unix_ms(Some(wall_now)),
        counts: JsonCounts {
            online: counts.online,
            suspect: counts.suspect,
            resuming: counts.resuming,
            offline: counts.offline,
        },
        clients: rows
            .iter()
            .map(|r| JsonRow {
                id: &r.id,
                state: r.state.label(),
                conn_id: r.conn_id,
                remote: r.remote.map(|a| a.to_string()),
                connected_since_unix_ms: unix_ms(r.connected_since),
                last_seen_ms_ago: r.last_seen_ago.map(ms),
                rtt_us: r
                    .rtt
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                disconnected_at_unix_ms: unix_ms(r.disconnected_at),
                silent_for_ms: r.silent_for.map(ms),
                reason: r.reason.as_ref().map(DisconnectReason::label),
                reason_text: r.reason.as_ref().map(ToString::to_string),
                hold_left_ms: r.hold_left.map(ms),
                messages_in: r.messages_in,
                messages_out: r.messages_out,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                connects: r.connects,
                disconnects: r.disconnects,
            })
            .collect(),
    };
    // Serializing plain structs of strings and integers into a String cannot fail.
    serde_json::to_string(&page).unwrap_or_else(|_| String::from("{}"))
}

/// `/metrics` in the Prometheus text exposition format (0.0.4), every state and every
/// disconnect reason listed even when zero.
pub(crate) fn render_metrics(m: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(2048);
    push_family(
        &mut out,
        "tether_connections",
        "gauge",
        "Open client connections.",
    );
    let _ = writeln!(out, "tether_connections {}", m.connections);
    push_family(
        &mut out,
        "tether_presence",
        "gauge",
        "Known clients by presence state.",
    );
    for kind in PresenceKind::ALL {
        let _ = writeln!(
            out,
            "tether_presence{{state=\"{}\"}} {}",
            kind.label(),
            m.presence.get(kind)
        );
    }
    push_family(
        &mut out,
        "tether_disconnects_total",
        "counter",
        "Client connections ended, by reason.",
    );
    for (label, n) in DisconnectReason::LABELS.iter().zip(m.disconnects) {
        let _ = writeln!(out, "tether_disconnects_total{{reason=\"{label}\"}} {n}");
    }
    for (name, help, value) in [
        (
            "tether_heartbeats_sent_total",
            "Heartbeat frames sent.",
            m.heartbeats_sent,
        ),
        (
            "tether_heartbeats_received_total",
            "Heartbeat frames received.",
            m.heartbeats_received,
        ),
        (
            "tether_messages_received_total",
            "Application messages received.",
            m.messages_received,
        ),
        (
            "tether_messages_sent_total",
            "Application messages sent.",
            m.messages_sent,
        ),
    ] {
        push_family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

fn push_family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The reason cell: the reason, and for a held session how long it is still held.
fn reason_text(r: &ClientRow) -> String {
    let mut text = r
        .reason
        .as_ref()
        .map(|x| escape(&x.to_string()))
        .unwrap_or_default();
    if let Some(left) = r.hold_left {
        let _ = write!(text, " · held {} more", duration_text(left));
    }
    text
}

/// `850 ms`, `3.2 s`, `4m 05s`, `2h 03m` (truncating; the page's script uses the same rules).
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        let tenths = ms / 100;
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else {
        let s = ms / 1_000;
        if s < 3_600 {
            format!("{}m {:02}s", s / 60, s % 60)
        } else {
            format!("{}h {:02}m", s / 3_600, (s / 60) % 60)
        }
    }
}

/// `0.3 ms`, `12.5 ms` (truncated to 0.1 ms).
fn rtt_text(d: Duration) -> String {
    let tenths = d.as_micros() / 100;
    format!("{}.{} ms", tenths / 10, tenths % 10)
}

fn unix_ms(t: Option<SystemTime>) -> Option<u64> {
    let d = t?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

/// `HH:MM:SS` of the UTC day, or empty.
fn clock(t: Option<SystemTime>) -> String {
    match unix_ms(t) {
        Some(ms) => {
            let s = (ms / 1_000) % 86_400;
            format!("{:02}:{:02}:{:02}", s / 3_600, (s / 60) % 60, s % 60)
        }
        None => String::new(),
    }
}

// ---- HTTP -----------------------------------------------------------------------------------

/// Limits of the status server.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Longest request head accepted (request line and headers, with the blank line).
    max_head: usize,
    /// The whole request head must arrive within this.
    read_deadline: Duration,
    /// Writing the response must finish within this.
    write_deadline: Duration,
    /// Connections served at once; more wait in the accept queue.
    max_concurrent: usize,
}

const LIMITS: Limits = Limits {
    max_head: 8 * 1024,
    read_deadline: Duration::from_secs(5),
    write_deadline: Duration::from_secs(5),
    max_concurrent: 64,
};

/// Serves the status pages on `listener` until the task is dropped or aborted.
///
/// Accept errors (for example running out of file descriptors) are logged and retried after
/// a short pause; they never end the server.
pub(crate) async fn serve_status(listener: TcpListener, source: Arc<dyn StatusSource>) {
    serve_with(listener, source, LIMITS).await;
}

async fn serve_with(listener: TcpListener, source: Arc<dyn StatusSource>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_concurrent));
    loop {
        // Wait for a free slot first, so excess clients queue in the kernel's backlog.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "status server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = Arc::clone(&source);
        tokio::spawn(async move {
            let _permit = permit;
            handle(stream, peer, source.as_ref(), limits).await;
        });
    }
}

/// A response about to be written.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    head_only: bool,
}

impl Response {
    fn ok(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            content_type,
            body: body.into_bytes(),
            head_only: false,
        }
    }

    fn error(status: u16) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{} {}\n", status, reason_phrase(status)).into_bytes(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Why no request could be read.
enum HeadError {
    /// The head did not end within the size limit.
    TooLarge,
    /// The peer closed or the socket failed before a full head arrived.
    Closed,
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    source: &dyn StatusSource,
    limits: Limits,
) {
    let response = match tokio::time::timeout(
        limits.read_deadline,
        read_head(&mut stream, limits.max_head),
    )
    .await
    {
        Err(_) => Response::error(408),
        Ok(Err(HeadError::TooLarge)) => Response::error(431),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Ok(head)) => respond(&head, source),
    };
    tracing::debug!(%peer, status = response.status, "status request");
    let bytes = response.to_bytes();
    let written = tokio::time::timeout(limits.write_deadline, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        // Lingering close: read (and drop) what the client still sends for a moment, so that
        // closing with unread data does not turn into an RST that destroys the response
        // before the client has read it.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut sink = [0u8; 4096];
            let mut budget = 256 * 1024usize;
            while budget > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => budget = budget.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

/// Reads until the blank line that ends the request head; returns the head without it.
async fn read_head(stream: &mut TcpStream, max_head: usize) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() >= max_head {
            return Err(HeadError::TooLarge);
        }
        let want = chunk.len().min(max_head - buf.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The length of the head before its terminating blank line (`\r\n\r\n`, or `\n\n` from
/// lenient clients), if the terminator has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    head_only: bool,
    path: &'a str,
}

/// Parses a request head (without the blank line). Errors are the status to answer with.
fn parse_head(head: &[u8]) -> Result<Request<'_>, u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(400u16)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(400);
    }
    if !version.starts_with("HTTP/") {
        return Err(400);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(505);
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(400);
    }
    for line in lines {
        // Every header line is `name: value`; no obsolete line folding.
        match line.split_once(':') {
            Some((name, _))
                if !name.is_empty() && !name.bytes().any(|b| b.is_ascii_whitespace()) => {}
            _ => return Err(400),
        }
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(405),
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(Request { head_only, path })
}

fn respond(head: &[u8], source: &dyn StatusSource) -> Response {
    let request = match parse_head(head) {
        Ok(r) => r,
        Err(status) => return Response::error(status),
    };
    let wall_now = SystemTime::now();
    let mut response = match request.path {
        "/" | "/index.html" => {
            let rows = sorted_rows(source);
            let counts = count_rows(&rows);
            Response::ok(
                "text/html; charset=utf-8",
                render_html(&rows, &counts, wall_now),
            )
        }
        "/api/clients" => Response::ok(
            "application/json",
            render_clients_json(&sorted_rows(source), wall_now),
        ),
        "/metrics" => Response::ok(
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&source.metrics()),
        ),
        _ => Response::error(404),
    };
    response.head_only = request.head_only;
    response
}

fn sorted_rows(source: &dyn StatusSource) -> Vec<ClientRow> {
    let mut rows = source.clients();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use tether_proto::presence::{Registry, RegistryConfig};
    use tether_proto::CloseCode;

    /// Fixed rows and counters.
    struct Fake {
        rows: Mutex<Vec<ClientRow>>,
        metrics: MetricsSnapshot,
    }

    impl StatusSource for Fake {
        fn clients(&self) -> Vec<ClientRow> {
            self.rows.lock().unwrap().clone()
        }
        fn metrics(&self) -> MetricsSnapshot {
            self.metrics.clone()
        }
    }

    fn wall(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn row(id: &str, state: PresenceKind) -> ClientRow {
        let offline = matches!(state, PresenceKind::Offline | PresenceKind::Resuming);
        ClientRow {
            id: id.to_owned(),
            state,
            conn_id: 7,
            remote: Some(SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 40_000))),
            connected_since: Some(wall(1_700_003_723)), // 23:15:23 UTC
            last_seen_ago: Some(Duration::from_millis(1_250)),
            rtt: (!offline).then_some(Duration::from_micros(1_234)),
            disconnected_at: offline.then(|| wall(1_700_003_800)),
            silent_for: offline.then_some(Duration::from_millis(9_100)),
            reason: offline.then_some(DisconnectReason::HeartbeatTimeout),
            hold_left: None,
            messages_in: 12,
            messages_out: 34,
            bytes_in: 1_200,
            bytes_out: 3_400,
            connects: 2,
            disconnects: 1,
        }
    }

    fn fake_rows() -> Vec<ClientRow> {
        vec![
            row("phone-2", PresenceKind::Suspect),
            row("phone-1", PresenceKind::Online),
            row("<script>alert(1)</script>", PresenceKind::Offline),
            ClientRow {
                hold_left: Some(Duration::from_millis(20_500)),
                reason: Some(DisconnectReason::PeerReset),
                ..row("tablet-3", PresenceKind::Resuming)
            },
        ]
    }

    fn fake() -> Arc<Fake> {
        let mut metrics = MetricsSnapshot {
            connections: 2,
            presence: count_rows(&fake_rows()),
            heartbeats_sent: 10,
            heartbeats_received: 11,
            messages_received: 12,
            messages_sent: 13,
            ..MetricsSnapshot::default()
        };
        metrics.disconnects[disconnect_index(&DisconnectReason::HeartbeatTimeout).unwrap()] = 5;
        Arc::new(Fake {
            rows: Mutex::new(fake_rows()),
            metrics,
        })
    }

    // ---- pure rendering ---------------------------------------------------------------------

    #[test]
    fn durations_and_clock_format() {
        let ms = Duration::from_millis;
        assert_eq!(duration_text(ms(0)), "0 ms");
        assert_eq!(duration_text(ms(999)), "999 ms");
        assert_eq!(duration_text(ms(1_000)), "1.0 s");
        assert_eq!(duration_text(ms(9_199)), "9.1 s");
        assert_eq!(duration_text(ms(59_999)), "59.9 s");
        assert_eq!(duration_text(ms(60_000)), "1m 00s");
        assert_eq!(duration_text(ms(245_000)), "4m 05s");
        assert_eq!(duration_text(ms(7_380_000)), "2h 03m");
        assert_eq!(rtt_text(Duration::from_micros(1_234)), "1.2 ms");
        assert_eq!(rtt_text(Duration::from_micros(80)), "0.0 ms");
        assert_eq!(clock(Some(wall(86_400 * 3 + 3_723))), "01:02:03");
        assert_eq!(clock(None), "");
    }

    #[test]
    fn html_lists_every_row_escaped_with_summary() {
        let rows = fake_rows();
        let html = render_html(&rows, &count_rows(&rows), wall(86_400 + 7_384));
        assert!(html.contains("<table id=\"clients\">"));
        assert!(html.contains(
            "<b>1</b> online · <b>1</b> suspect · <b>1</b> resuming · <b>1</b> offline \
             — 4 clients — updated 02:03:04 UTC"
        ));
        assert!(html.contains("<td class=\"id\">phone-1</td>"));
        assert!(html.contains("<span class=\"st st-suspect\">suspect</span>"));
        assert!(html.contains("<td>10.0.0.2:40000</td><td>23:15:23</td><td>1.2 s ago</td>"));
        assert!(html.contains("<td class=\"num\">1.2 ms</td>"));
        assert!(html
            .contains("<td class=\"num\">9.1 s</td><td class=\"reason\">heartbeat-timeout</td>"));
        assert!(html.contains("<td class=\"num\">12</td><td class=\"num\">34</td>"));
        // The hostile id is escaped, in the cell and in the attribute.
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("{{"), "every placeholder replaced");
        // Refreshes itself: the script polls the API, and a meta refresh without scripts.
        assert!(html.contains("setInterval(refresh, 2000)"));
        assert!(html.contains("fetch(\"/api/clients\""));
        assert!(html.contains("http-equiv=\"refresh\" content=\"2\""));
    }

    #[test]
    fn html_shows_how_long_a_session_is_held() {
        let mut r = row("tablet", PresenceKind::Resuming);
        r.hold_left = Some(Duration::from_millis(20_500));
        let html = render_html(&[r.clone()], &count_rows(&[r]), wall(0));
        assert!(html.contains("<td class=\"reason\">heartbeat-timeout · held 20.5 s more</td>"));
        assert!(html.contains("<b>1</b> resuming"));
    }

    #[test]
    fn html_without_clients_says_so() {
        let html = render_html(&[], &PresenceCounts::default(), wall(0));
        assert!(html.contains("no clients yet"));
        assert!(html.contains("— 0 clients —"));
    }

    #[test]
    fn clients_json_has_every_field() {
        let v: serde_json::Value =
            serde_json::from_str(&render_clients_json(&fake_rows(), wall(1_000))).unwrap();
        assert_eq!(v["now_unix_ms"], 1_000_000);
        assert_eq!(
            v["counts"],
            serde_json::json!({"online": 1, "suspect": 1, "resuming": 1, "offline": 1})
        );
        let clients = v["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 4);
        assert_eq!(clients[3]["hold_left_ms"], 20_500);
        assert_eq!(clients[3]["reason"], "peer-reset");
        let on = &clients[1];
        assert_eq!(on["id"], "phone-1");
        assert_eq!(on["state"], "online");
        assert_eq!(on["conn_id"], 7);
        assert_eq!(on["remote"], "10.0.0.2:40000");
        assert_eq!(on["connected_since_unix_ms"], 1_700_003_723_000u64);
        assert_eq!(on["last_seen_ms_ago"], 1_250);
        assert_eq!(on["rtt_us"], 1_234);
        assert_eq!(on["reason"], serde_json::Value::Null);
        assert_eq!(on["messages_in"], 12);
        assert_eq!(on["messages_out"], 34);
        assert_eq!(on["bytes_in"], 1_200);
        assert_eq!(on["bytes_out"], 3_400);
        assert_eq!(on["connects"], 2);
        assert_eq!(on["disconnects"], 1);
        let off = &clients[2];
        assert_eq!(off["state"], "offline");
        assert_eq!(off["reason"], "heartbeat-timeout");
        assert_eq!(off["reason_text"], "heartbeat-timeout");
        assert_eq!(off["silent_for_ms"], 9_100);
        assert_eq!(off["disconnected_at_unix_ms"], 1_700_003_800_000u64);
        assert_eq!(off["rtt_us"], serde_json::Value::Null);
    }

    #[test]
    fn metrics_list_every_state_and_reason() {
        let text = render_metrics(&fake().metrics());
        let expect_lines = [
            "# TYPE tether_connections gauge",
            "tether_connections 2",
            "# TYPE tether_presence gauge",
            "tether_presence{state=\"online\"} 1",
            "tether_presence{state=\"suspect\"} 1",
            "tether_presence{state=\"resuming\"} 1",
            "tether_presence{state=\"offline\"} 1",
            "# TYPE tether_disconnects_total counter",
            "tether_disconnects_total{reason=\"heartbeat-timeout\"} 5",
            "tether_disconnects_total{reason=\"peer-closed\"} 0",
            "# TYPE tether_heartbeats_sent_total counter",
            "tether_heartbeats_sent_total 10",
            "tether_heartbeats_received_total 11",
            "tether_messages_received_total 12",
            "tether_messages_sent_total 13",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for want in expect_lines {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
        for label in DisconnectReason::LABELS {
            let prefix = format!("tether_disconnects_total{{reason=\"{label}\"}} ");
            assert_eq!(lines.iter().filter(|l| l.starts_with(&prefix)).count(), 1);
        }
        // Exposition format: every sample's family has HELP and TYPE before it.
        let mut typed = std::collections::HashSet::new();
        for l in &lines {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "sample before TYPE: {l}");
            }
        }
        assert_eq!(lines.iter().filter(|l| l.starts_with("# HELP")).count(), 7);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn every_reason_has_a_metrics_slot() {
        let reasons = [
            DisconnectReason::PeerClosed,
            DisconnectReason::PeerReset,
            DisconnectReason::HeartbeatTimeout,
            DisconnectReason::KeepaliveTimeout,
            DisconnectReason::UserTimeout,
            DisconnectReason::IdleTimeout,
            DisconnectReason::ProtocolError("x".into()),
            DisconnectReason::Refused {
                code: CloseCode::SERVER_FULL,
                text: String::new(),
            },
            DisconnectReason::Replaced,
            DisconnectReason::LocalClose,
            DisconnectReason::PeerClose {
                code: CloseCode::NORMAL,
                text: String::new(),
            },
            DisconnectReason::Io("x".into()),
        ];
        let idx: Vec<usize> = reasons
            .iter()
            .map(|r| disconnect_index(r).unwrap())
            .collect();
        assert_eq!(idx, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn row_from_registry_entry() {
        // A virtual timeline: `base` is an arbitrary origin, wall time 1,000,000 s at base+100 s.
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let wall_now = wall(1_000_000);
        let now = at(100_000);
        let mut reg = Registry::new(RegistryConfig::default());
        let remote = SocketAddr::from(([127, 0, 0, 1], 5555));
        reg.connected(at(40_000), "a", 3, remote);
        reg.connected(at(50_000), "b", 4, remote);
        reg.disconnected(
            at(90_000),
            "b",
            4,
            DisconnectReason::HeartbeatTimeout,
            Duration::from_secs(6),
            Some(at(120_000)),
        );
        let a = ClientRow::from_entry("a", reg.get("a").unwrap(), now, wall_now);
        assert_eq!(a.state, PresenceKind::Online);
        assert_eq!(a.conn_id, 3);
        assert_eq!(a.remote, Some(remote));
        assert_eq!(a.connected_since, Some(wall(999_940)));
        assert_eq!(
            (a.last_seen_ago, a.reason.clone(), a.silent_for),
            (None, None, None)
        );
        let b = ClientRow::from_entry("b", reg.get("b").unwrap(), now, wall_now);
        assert_eq!(b.state, PresenceKind::Resuming);
        assert_eq!(b.disconnected_at, Some(wall(999_990)));
        assert_eq!(b.silent_for, Some(Duration::from_secs(6)));
        assert_eq!(b.last_seen_ago, Some(Duration::from_secs(16)));
        assert_eq!(b.hold_left, Some(Duration::from_secs(20)));
        assert_eq!(b.reason, Some(DisconnectReason::HeartbeatTimeout));
        assert_eq!((b.connects, b.disconnects), (1, 1));
    }

    // ---- request parsing ------------------------------------------------------------------

    #[test]
    fn parse_requests() {
        fn ok(s: &str) -> Result<Request<'_>, u16> {
            parse_head(s.as_bytes())
        }
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: t"),
            Ok(Request {
                head_only: false,
                path: "/metrics"
            })
        );
        assert_eq!(
            ok("HEAD /api/clients?x=1 HTTP/1.0"),
            Ok(Request {
                head_only: true,
                path: "/api/clients"
            })
        );
        assert_eq!(ok("POST / HTTP/1.1"), Err(405));
        assert_eq!(ok("DELETE / HTTP/1.1\r\nHost: x"), Err(405));
        assert_eq!(ok("GET / HTTP/2.0"), Err(505));
        assert_eq!(ok("GET / FTP/1.0"), Err(400));
        assert_eq!(ok("GET /"), Err(400));
        assert_eq!(ok("GET  / HTTP/1.1"), Err(400));
        assert_eq!(ok("GET http://x/ HTTP/1.1"), Err(400));
        assert_eq!(ok("get / HTTP/1.1"), Err(400));
        assert_eq!(ok("GET / HTTP/1.1\r\nno colon here"), Err(400));
        assert_eq!(ok("GET / HTTP/1.1\r\n folded: x"), Err(400));
        assert_eq!(ok(""), Err(400));
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1"), Err(400));
    }

    #[test]
    fn parse_never_panics_on_garbage() {
        // A small deterministic fuzz loop (xorshift), biased towards HTTP-ish bytes.
        let alphabet = b"GETPOSHAD /:\r\n?#HTTP/1.0\x00\xff\x7fabc";
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    let y = x.rotate_left(i as u32 * 5);
                    if y & 1 == 0 {
                        alphabet[(y >> 8) as usize % alphabet.len()]
                    } else {
                        (y >> 16) as u8
                    }
                })
                .collect();
            let _ = parse_head(&bytes);
            let _ = head_end(&bytes);
        }
    }

    #[test]
    fn head_end_finds_either_terminator() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    // ---- over loopback --------------------------------------------------------------------

    async fn start(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve_with(listener, fake(), limits));
        (addr, task)
    }

    /// Sends `request` raw, reads the whole answer; returns (status, headers, body).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("server answered and closed within 10 s")
            .unwrap();
        split_response(&raw)
    }

    fn split_response(raw: &[u8]) -> (u16, String, String) {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
        let status = head[9..12].parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn serves_each_route_over_loopback() {
        let (addr, task) = start(LIMITS).await;

        let (status, head, body) = exchange(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&head, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(header(&head, "connection"), Some("close"));
        assert_eq!(
            header(&head, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert!(body.contains("phone-1") && body.contains("id=\"clients\""));
        // Sorted by id.
        let (p1, p2) = (
            body.find(">phone-1<").unwrap(),
            body.find(">phone-2<").unwrap(),
        );
        assert!(p1 < p2);

        let (status, head, body) =
            exchange(addr, b"GET /api/clients HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(status, 200);
        assert_eq!(header(&head, "content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ids: Vec<&str> = v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "<script>alert(1)</script>",
                "phone-1",
                "phone-2",
                "tablet-3"
            ]
        );

        let (status, head, body) = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(header(&head, "content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        assert!(body.contains("tether_presence{state=\"online\"} 1\n"));

        let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(
            header(&head, "content-length")
                .unwrap()
                .parse::<usize>()
                .unwrap()
                > 0
        );
        assert_eq!(body, "");

        let (status, _, _) = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 404);
        let (status, head, _) = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert_eq!(status, 405);
        assert_eq!(header(&head, "allow"), Some("GET, HEAD"));
        task.abort();
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_get_errors_and_the_server_keeps_serving() {
        let (addr, task) = start(LIMITS).await;
        let (status, _, _) = exchange(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        )
        .await;
        assert_eq!(status, 400);
        let (status, _, _) = exchange(addr, b"hello there\n\n").await;
        assert_eq!(status, 400);

        // 9 KiB of header without an end: 431 after 8 KiB, though the client keeps sending.
        let mut big = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        big.resize(9 * 1024, b'a');
        let (status, _, _) = exchange(addr, &big).await;
        assert_eq!(status, 431);
        // Just under the limit is fine.
        let mut fits = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        fits.resize(8 * 1024 - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        let (status, _, _) = exchange(addr, &fits).await;
        assert_eq!(status, 200);

        // A client that connects and leaves without a word does not disturb anything.
        drop(TcpStream::connect(addr).await.unwrap());
        let (status, _, _) = exchange(addr, b"GET /api/clients HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        task.abort();
    }

    #[tokio::test]
    async fn a_silent_client_gets_408_at_the_read_deadline() {
        let limits = Limits {
            read_deadline: Duration::from_millis(300),
            ..LIMITS
        };
        let (addr, task) = start(limits).await;
        let started = Instant::now();
        let (status, _, _) = exchange(addr, b"GET / HTTP/1.1\r\n").await; // never finishes
        let took = started.elapsed();
        assert_eq!(status, 408);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "answered after {took:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn concurrent_clients_beyond_the_slot_limit_queue_and_are_served() {
        let limits = Limits {
            max_concurrent: 2,
            read_deadline: Duration::from_millis(500),
            ..LIMITS
        };
        let (addr, task) = start(limits).await;
        // Two silent clients hold both slots until their read deadline.
        let silent: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        drop(silent);
        task.abort();
    }

    /// Renders the page in headless chromium through `scripts/browser-check` and keeps the
    /// screenshot. Needs chromium (installed by the script when root) — hence ignored:
    /// `cargo test -p tether-cli -- --ignored browser_renders_the_status_page`.
    /// The screenshot goes to `$BROWSER_CHECK_OUT` (default `target/browser-check/status.png`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs chromium; run with --ignored"]
    async fn browser_renders_the_status_page() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = fake();
        let task = tokio::spawn(serve_status(
            listener,
            Arc::clone(&source) as Arc<dyn StatusSource>,
        ));
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::env::var_os("BROWSER_CHECK_OUT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join("target/browser-check/status.png"));
        let dom = out.with_extension("dom.html");
        let output = tokio::process::Command::new(root.join("scripts/browser-check"))
            .arg(format!("http://{addr}/"))
            .arg(&out)
            .arg("phone-1")
            .env("BROWSER_CHECK_DOM", &dom)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "browser-check failed: {stderr}");
        let dom = std::fs::read_to_string(&dom).unwrap();
        // The page's script re-rendered the table from /api/clients (it stamps the table).
        assert!(
            dom.contains("data-updated=\""),
            "the refresh script did not run"
        );
        assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(dom.contains("peer-reset · held 20.5 s more"));
        assert!(
            std::fs::metadata(&out).unwrap().len() > 10_000,
            "a real screenshot"
        );
        task.abort();
    }
}
