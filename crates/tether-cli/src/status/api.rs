//! The JSON API of `tether serve` (serde), read by scripts and by the status page itself.
//!
//! ```text
//!   GET /api/clients?state=online&limit=100&cursor=ID
//!     {"now_unix_ms", "counts": {"online","suspect","resuming","offline"}, "matching",
//!      "limit", "next_cursor" (null on the last page), "rtt_every_ms",
//!      "clients": [Client, …]}
//!   GET /api/clients/{id}   Client, or 404 {"error"}
//!
//!   Client = {"id", "state", "state_since_unix_ms", "conn_id", "remote",
//!             "connected_since_unix_ms", "last_seen_ms_ago", "rtt_us",
//!             "disconnected_at_unix_ms", "silent_for_ms", "reason" (a DisconnectReason
//!             label), "reason_text", "hold_left_ms",
//!             "counters": {"messages_in","messages_out","bytes_in","bytes_out"} | null,
//!             "connects", "disconnects", "session" (its session id while it has one),
//!             "node" (the node that holds it with `serve --cluster`, else null)}
//! ```
//!
//! Absent values are `null` (never a made-up 0). `state` is one of `online`, `suspect`,
//! `resuming`, `offline` (or `all`); `limit` is 1–1000 (default 100); `cursor` is the
//! `next_cursor` of the previous page. A bad parameter is a 400 `{"error"}` naming it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tether_proto::DisconnectReason;

use super::model::{self, ClientQuery, ClientRow, Page, StatusSource};

/// The raw query string parameters of the list (validated by [`ClientQuery::parse`]).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

impl RawQuery {
    pub(crate) fn parse(&self) -> Result<ClientQuery, model::QueryError> {
        ClientQuery::parse(
            self.state.as_deref(),
            self.cursor.as_deref(),
            self.limit.as_deref(),
        )
    }
}

/// Presence counts.
#[derive(Debug, Serialize)]
pub(crate) struct Counts {
    online: usize,
    suspect: usize,
    resuming: usize,
    offline: usize,
}

/// One page of `/api/clients`.
#[derive(Debug, Serialize)]
pub(crate) struct ClientsPage {
    now_unix_ms: Option<u64>,
    counts: Counts,
    matching: usize,
    limit: usize,
    next_cursor: Option<String>,
    rtt_every_ms: Option<u64>,
    clients: Vec<Client>,
}

/// A client's counters.
#[derive(Debug, Serialize)]
pub(crate) struct CountersJson {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// One client.
#[derive(Debug, Serialize)]
pub(crate) struct Client {
    id: String,
    state: &'static str,
    state_since_unix_ms: Option<u64>,
    conn_id: u64,
    remote: Option<String>,
    connected_since_unix_ms: Option<u64>,
    last_seen_ms_ago: Option<u64>,
    rtt_us: Option<u64>,
    disconnected_at_unix_ms: Option<u64>,
    silent_for_ms: Option<u64>,
    reason: Option<String>,
    reason_text: Option<String>,
    hold_left_ms: Option<u64>,
    counters: Option<CountersJson>,
    connects: u64,
    disconnects: u64,
    session: Option<u64>,
    node: Option<String>,
}

pub(crate) fn unix_ms(t: Option<SystemTime>) -> Option<u64> {
    let d = t?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<ClientRow> for Client {
    fn from(r: ClientRow) -> Self {
        Client {
            state: r.state.label(),
            state_since_unix_ms: unix_ms(r.state_since),
            conn_id: r.conn_id,
            remote: r.remote.map(|a| a.to_string()),
            connected_since_unix_ms: unix_ms(r.connected_since),
            last_seen_ms_ago: r.last_seen_ago.map(ms),
            rtt_us: r
                .rtt
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            disconnected_at_unix_ms: unix_ms(r.disconnected_at),
            silent_for_ms: r.silent_for.map(ms),
            reason: r
                .reason
                .as_ref()
                .map(|x| DisconnectReason::label(x).to_owned())
                .or_else(|| r.reason_label.clone()),
            reason_text: r
                .reason
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| r.reason_label.clone()),
            hold_left_ms: r.hold_left.map(ms),
            counters: r.counters.map(|c| CountersJson {
                messages_in: c.messages_in,
                messages_out: c.messages_out,
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
            }),
            connects: r.connects,
            disconnects: r.disconnects,
            session: r.session,
            node: r.node,
            id: r.id,
        }
    }
}

/// The JSON document of one page.
pub(crate) fn clients_page(
    page: Page,
    limit: usize,
    rtt_every: Option<Duration>,
    wall_now: SystemTime,
) -> ClientsPage {
    let c = page.counts;
    ClientsPage {
        now_unix_ms: unix_ms(Some(wall_now)),
        counts: Counts {
            online: c.online,
            suspect: c.suspect,
            resuming: c.resuming,
            offline: c.offline,
        },
        matching: page.matching,
        limit,
        next_cursor: page.next_cursor,
        rtt_every_ms: rtt_every.map(ms),
        clients: page.rows.into_iter().map(Client::from).collect(),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    crate::gateway::api::error(status, message)
}

/// `GET /api/clients`.
pub(crate) async fn list(
    State(source): State<Arc<dyn StatusSource>>,
    Query(raw): Query<RawQuery>,
) -> Response {
    let q = match raw.parse() {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let page = source.page(&q);
    Json(clients_page(
        page,
        q.limit,
        source.rtt_every(),
        SystemTime::now(),
    ))
    .into_response()
}

/// `GET /api/clients/{id}`.
pub(crate) async fn one(
    State(source): State<Arc<dyn StatusSource>>,
    Path(id): Path<String>,
) -> Response {
    match source.client(&id) {
        Some(row) => Json(Client::from(row)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("unknown client id {id:?}")),
    }
}

/// A query string axum could not even split (bad percent-encoding): 400 in JSON too.
pub(crate) fn bad_query(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::model::tests::{row, wall};
    use tether_proto::presence::PresenceKind;

    fn json(v: &impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn client_json_has_every_field_and_nulls_for_the_unknown() {
        let on = json(&Client::from(row("phone-1", PresenceKind::Online)));
        assert_eq!(on["id"], "phone-1");
        assert_eq!(on["state"], "online");
        assert_eq!(on["state_since_unix_ms"], 1_700_003_723_000u64);
        assert_eq!(on["conn_id"], 7);
        assert_eq!(on["remote"], "10.0.0.2:40000");
        assert_eq!(on["connected_since_unix_ms"], 1_700_003_723_000u64);
        assert_eq!(on["last_seen_ms_ago"], 1_250);
        assert_eq!(on["rtt_us"], 1_234);
        assert_eq!(on["reason"], serde_json::Value::Null);
        assert_eq!(
            on["counters"],
            serde_json::json!({"messages_in": 12, "messages_out": 34, "bytes_in": 1200, "bytes_out": 3400})
        );
        assert_eq!(
            (on["connects"].clone(), on["disconnects"].clone()),
            (2.into(), 1.into())
        );
        let off = json(&Client::from(row("gone", PresenceKind::Offline)));
        assert_eq!(off["state"], "offline");
        assert_eq!(off["reason"], "heartbeat-timeout");
        assert_eq!(off["reason_text"], "heartbeat-timeout");
        assert_eq!(off["silent_for_ms"], 9_100);
        assert_eq!(off["disconnected_at_unix_ms"], 1_700_003_800_000u64);
        assert_eq!(off["state_since_unix_ms"], 1_700_003_800_000u64);
        assert_eq!(off["rtt_us"], serde_json::Value::Null);
        assert_eq!(off["counters"], serde_json::Value::Null, "never a fake 0");
    }

    #[test]
    fn page_json_carries_counts_cursor_and_rtt_period() {
        let rows = vec![
            row("a", PresenceKind::Online),
            row("b", PresenceKind::Offline),
            row("c", PresenceKind::Online),
        ];
        let q = ClientQuery {
            limit: 2,
            ..ClientQuery::default()
        };
        let p = model::page(rows, &q);
        let v = json(&clients_page(
            p,
            2,
            Some(Duration::from_secs(30)),
            wall(1_000),
        ));
        assert_eq!(v["now_unix_ms"], 1_000_000);
        assert_eq!(
            v["counts"],
            serde_json::json!({"online": 2, "suspect": 0, "resuming": 0, "offline": 1})
        );
        assert_eq!(v["matching"], 3);
        assert_eq!(v["limit"], 2);
        assert_eq!(v["next_cursor"], "b");
        assert_eq!(v["rtt_every_ms"], 30_000);
        assert_eq!(v["clients"].as_array().unwrap().len(), 2);
    }

    /// 50,000 clients: the old unpaginated document against the first page (the figure in
    /// the report; run with `--nocapture` to see it).
    #[test]
    fn fifty_thousand_clients_make_a_small_page() {
        let rows: Vec<ClientRow> = (0..50_000)
            .map(|i| row(&format!("device-{i:05}"), PresenceKind::Online))
            .collect();
        let everything = model::page(
            rows.clone(),
            &ClientQuery {
                limit: usize::MAX / 2,
                ..ClientQuery::default()
            },
        );
        let all = serde_json::to_string(&clients_page(everything, 50_000, None, wall(0))).unwrap();
        let first = serde_json::to_string(&clients_page(
            model::page(rows.clone(), &ClientQuery::default()),
            100,
            None,
            wall(0),
        ))
        .unwrap();
        let max = serde_json::to_string(&clients_page(
            model::page(
                rows,
                &ClientQuery {
                    limit: 1000,
                    ..ClientQuery::default()
                },
            ),
            1000,
            None,
            wall(0),
        ))
        .unwrap();
        println!(
            "/api/clients with 50,000 clients: all {} bytes, default page (100) {} bytes, largest page (1000) {} bytes",
            all.len(),
            first.len(),
            max.len()
        );
        assert!(first.len() < 100_000, "{}", first.len());
        assert!(max.len() < 1_000_000, "{}", max.len());
    }
}
