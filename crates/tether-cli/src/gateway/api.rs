//! The write side of the server API: send to one client, broadcast, close; and the event
//! stream's entry point. JSON in and out; every error is `{"error": "...", "field"?: "..."}`.
//!
//! ```text
//!   POST /api/clients/{id}/messages   body: raw bytes, or JSON {"text": …} | {"base64": …}
//!        202 {"status": "queued" | "held", "client_id", "session", "seq"}
//!        404 unknown id · 409 offline / slow consumer · 413 too large · 429 backlog full
//!        503 server-wide budget spent (Retry-After: 1)
//!        with --cluster, for a client another node holds:
//!        202 {"status": "routed", "client_id", "node"} (handed to that node's inbox in Redis)
//!        503 when Redis does not take it
//!   POST /api/broadcast               same body; 202 {"status", "sent", "held", "refused"}
//!                                     (+ "cluster": "published" | "failed" with --cluster)
//!   POST /api/clients/{id}/close      {"code"?, "reason"?}; 200 {"status": "closing"}
//!                                     (or {"status": "routed", "node"} with --cluster)
//!   GET  /api/events                  SSE, or NDJSON (Accept: application/x-ndjson or
//!                                     ?format=ndjson); Last-Event-ID or ?last_event_id=
//! ```
//!
//! Request bodies are read within a deadline and up to a bound in bytes, before anything is
//! parsed.

// Refusals are answers: an axum `Response` in the `Err` of cold-path helpers, not boxed.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether::{CloseCode, SendError};
use tether_proto::presence::PresenceState;

use super::stream::{self, Format};
use super::Gateway;
use crate::cluster::durable::DurableError;

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// A JSON error answer.
pub(crate) fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(ErrorJson {
            error: message,
            field: None,
            state: None,
            reason: None,
        }),
    )
        .into_response()
}

fn field_error(field: &'static str, message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(ErrorJson {
            error: format!("field {field:?}: {message}"),
            field: Some(field),
            state: None,
            reason: None,
        }),
    )
        .into_response()
}

/// The request body, read within the deadline and up to the bound.
async fn read_body(gw: &Gateway, req: Request) -> Result<(HeaderMap, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let limit = gw.max_body;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes (--api-max-body)"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(gw.body_deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {}",
                tether_proto::duration::Human(gw.body_deadline)
            ),
        )),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large())
            } else {
                Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {inner}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok((parts.headers, b)),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json") || m.to_ascii_lowercase().ends_with("+json")
        })
}

/// The message in a send or broadcast body: the raw bytes, or with a JSON content type the
/// object `{"text": "…"}` or `{"base64": "…"}`.
pub(crate) fn message_of(headers: &HeaderMap, body: Bytes) -> Result<Bytes, Response> {
    if !is_json(headers) {
        return Ok(body);
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON ({e}); send {{\"text\": …}} or {{\"base64\": …}}, or raw bytes with another content type"),
        )
    })?;
    let Some(obj) = v.as_object() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object: {\"text\": …} or {\"base64\": …}".into(),
        ));
    };
    if let Some(k) = obj.keys().find(|k| *k != "text" && *k != "base64") {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(ErrorJson {
                error: format!("unknown field {k:?}: expected \"text\" or \"base64\""),
                field: None,
                state: None,
                reason: None,
            }),
        )
            .into_response());
    }
    match (obj.get("text"), obj.get("base64")) {
        (Some(_), Some(_)) => Err(error(
            StatusCode::BAD_REQUEST,
            "give \"text\" or \"base64\", not both".into(),
        )),
        (Some(t), None) => match t.as_str() {
            Some(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
            None => Err(field_error("text", "expected a string".into())),
        },
        (None, Some(b)) => match b.as_str() {
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Bytes::from)
                .map_err(|e| field_error("base64", format!("not standard base64: {e}"))),
            None => Err(field_error("base64", "expected a string".into())),
        },
        (None, None) => Err(error(
            StatusCode::BAD_REQUEST,
            "missing field: give \"text\" or \"base64\"".into(),
        )),
    }
}

/// Why a client cannot take a message now: 404 when the server does not know it, 409 with
/// its state otherwise.
fn not_there(gw: &Gateway, id: &str, what: &str) -> Response {
    let Some(c) = gw.handle.client(id) else {
        return error(StatusCode::NOT_FOUND, format!("unknown client id {id:?}"));
    };
    let (state, reason, detail) = match &c.state {
        PresenceState::Offline {
            reason, silent_for, ..
        } => (
            "offline",
            Some(reason.label().to_owned()),
            format!(
                "client {id:?} is offline ({reason}, silent for {}); {what}",
                tether_proto::duration::Human::ms(*silent_for)
            ),
        ),
        other => (
            other.kind().label(),
            None,
            format!(
                "client {id:?} is {} and cannot take it now; {what}",
                other.kind().label()
            ),
        ),
    };
    (
        StatusCode::CONFLICT,
        Json(ErrorJson {
            error: detail,
            field: None,
            state: Some(state),
            reason,
        }),
    )
        .into_response()
}

fn send_error(gw: &Gateway, id: &str, e: SendError) -> Response {
    match e {
        SendError::NotConnected(_) | SendError::Disconnected { .. } => {
            not_there(gw, id, "nothing is queued for clients that are not connected or resuming")
        }
        SendError::SlowConsumer(_) => (
            StatusCode::CONFLICT,
            Json(ErrorJson {
                error: format!("client {id:?} does not read what is sent to it and is being closed (slow-consumer); the message was not queued"),
                field: None,
                state: None,
                reason: Some("slow-consumer".into()),
            }),
        )
            .into_response(),
        SendError::Backlogged(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(ErrorJson {
                error: format!("client {id:?} is resuming and what waits for it is at its bound; retry after it resumes"),
                field: None,
                state: Some("resuming"),
                reason: Some("backlogged".into()),
            }),
        )
            .into_response(),
        SendError::ServerFull => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server's budget of unsent bytes is spent; retry shortly".into(),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        SendError::TooLarge { len, max } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("message of {len} bytes is longer than the {max} bytes a frame carries (--max-frame)"),
        ),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

#[derive(Serialize)]
struct Queued<'a> {
    status: &'static str,
    client_id: &'a str,
    session: Option<u64>,
    seq: Option<u64>,
    /// `--durable-sessions`: whether the message is in the session's durable copy (false:
    /// the copy is over its bound; a resume on another node after this node's death would
    /// be refused, explicitly).
    #[serde(skip_serializing_if = "Option::is_none")]
    durable: Option<bool>,
    /// The node that holds the client, for a routed send.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

/// `POST /api/clients/{id}/messages`.
pub(crate) async fn send(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (headers, body) = match read_body(&gw, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let msg = match message_of(&headers, body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    // A backend's key for this message: a retry with the same key within a minute is
    // answered as the first and not sent again — on any node with --durable-sessions; without
    // it, when the send is routed to another node (where a lost answer can hide a delivery).
    let idem = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if crate::cluster::valid_idem(k) => Some(k.to_owned()),
        Some(_) => {
            return field_error(
                "Idempotency-Key",
                "expected 1 to 128 visible ASCII characters".into(),
            )
        }
    };
    if let Some(node) = remote_owner(&gw, &id, true) {
        return match gw.cluster.as_ref() {
            Some(c) if c.durable() => routed_durable(
                &id,
                &node,
                c.route_send_durable(&node, &id, &msg, idem.as_deref())
                    .await,
            ),
            Some(c) => routed(
                &id,
                &node,
                c.route_send(&node, &id, &msg, idem.as_deref()).await,
            ),
            None => not_there(&gw, &id, "no cluster"),
        };
    }
    if let Some(c) = gw.cluster.as_ref().filter(|c| c.durable()) {
        // Into the session's durable copy first, then to the client.
        return match c.durable_send(&id, msg, idem.as_deref()).await {
            Err(DurableError::Done { session, seq }) => (
                StatusCode::ACCEPTED,
                Json(Queued {
                    status: "queued",
                    client_id: &id,
                    session: Some(session),
                    seq: Some(seq),
                    durable: Some(true),
                    node: None,
                }),
            )
                .into_response(),
            Ok((d, mirrored)) => delivered(&id, &d, Some(mirrored)),
            Err(DurableError::Send(e)) => send_error(&gw, &id, e),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("client {id:?}: {e}; nothing was queued, retry later"),
            ),
        };
    }
    match gw.handle.try_deliver(&id, msg) {
        Ok(d) => delivered(&id, &d, None),
        Err(e) => send_error(&gw, &id, e),
    }
}

/// 202 for a send this node queued (or held) for `id`.
fn delivered(id: &str, d: &tether::Delivery, durable: Option<bool>) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(Queued {
            status: if d.held { "held" } else { "queued" },
            client_id: id,
            session: d.session,
            seq: d.seq,
            durable,
            node: None,
        }),
    )
        .into_response()
}

/// The answer to a durable send routed to another node: 202 only when that node reported it
/// in the client's copy and queued; its refusal as it gave it; no answer → 503 (it was not
/// delivered: the holder drops a send that reaches it past the deadline).
fn routed_durable(id: &str, node: &str, r: anyhow::Result<crate::cluster::SentAnswer>) -> Response {
    match r {
        Ok(a) => match a.refused {
            None => (
                StatusCode::ACCEPTED,
                Json(Queued {
                    status: "routed",
                    client_id: id,
                    session: a.session,
                    seq: a.seq,
                    durable: Some(a.durable),
                    node: Some(a.node),
                }),
            )
                .into_response(),
            Some((status, why)) => error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                format!("client {id:?} on node {}: {why}; nothing was queued", a.node),
            ),
        },
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("client {id:?} is on node {node} and the send was not confirmed ({e}); nothing was queued, retry later"),
        ),
    }
}

/// With `--cluster`: the node that holds `id` by the mirror when it is another one and the
/// client is not connected here (a client online here is served here whatever the mirror
/// says) — except a `send` to a client that has just connected here, whose claim the mirror
/// does not show yet, while Redis answers: sends routed to its previous node may be on their
/// way here (the claim moves them into this node's inbox), so this one goes the same way,
/// behind them, to keep the sending node's order.
fn remote_owner(gw: &Gateway, id: &str, send: bool) -> Option<String> {
    let cluster = gw.cluster.as_ref()?;
    let node = cluster.remote_owner(id)?;
    let here = gw
        .handle
        .client(id)
        .is_some_and(|c| matches!(c.state, PresenceState::Online | PresenceState::Suspect));
    (!here || (send && cluster.is_up())).then_some(node)
}

/// The answer to a send or close handed to another node.
fn routed(id: &str, node: &str, r: anyhow::Result<String>) -> Response {
    match r {
        Ok(node) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "routed", "client_id": id, "node": node})),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("client {id:?} is on node {node} and the cluster cannot reach it now ({e}); retry later"),
        ),
    }
}

#[derive(Serialize)]
struct Broadcasted {
    status: &'static str,
    sent: usize,
    held: usize,
    refused: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'static str>,
}

/// `POST /api/broadcast`.
pub(crate) async fn broadcast(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let (headers, body) = match read_body(&gw, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let msg = match message_of(&headers, body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let cluster = match &gw.cluster {
        Some(c) => Some(match c.publish_broadcast(&msg).await {
            Ok(()) => "published",
            Err(_) => "failed",
        }),
        None => None,
    };
    if let Some(c) = gw.cluster.as_ref().filter(|c| c.durable()) {
        // Each local client through its copy.
        let mut set = tokio::task::JoinSet::new();
        for client in gw.handle.clients() {
            if matches!(
                client.state,
                PresenceState::Online | PresenceState::Suspect | PresenceState::Resuming { .. }
            ) {
                let (c, msg) = (c.clone(), msg.clone());
                set.spawn(async move { c.durable_send(&client.id, msg, None).await });
            }
        }
        let (mut sent, mut held, mut refused) = (0, 0, 0);
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((d, _))) if d.held => held += 1,
                Ok(Ok(_)) => sent += 1,
                Ok(Err(DurableError::Send(
                    SendError::NotConnected(_) | SendError::Disconnected { .. },
                ))) => {}
                _ => refused += 1,
            }
        }
        return (
            StatusCode::ACCEPTED,
            Json(Broadcasted {
                status: "queued",
                sent,
                held,
                refused,
                cluster,
            }),
        )
            .into_response();
    }
    match gw.handle.broadcast(msg) {
        Ok(b) => (
            StatusCode::ACCEPTED,
            Json(Broadcasted {
                status: "queued",
                sent: b.sent,
                held: b.held,
                refused: b.refused,
                cluster,
            }),
        )
            .into_response(),
        Err(e) => send_error(&gw, "*", e),
    }
}

/// The close codes a backend may send: normal, going-away, policy-violation, and the
/// application's own (1000 and up).
fn close_code(v: &serde_json::Value) -> Result<CloseCode, Response> {
    let n = v
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| field_error("code", "expected a number from 0 to 65535".into()))?;
    let code = CloseCode(n);
    if [
        CloseCode::NORMAL,
        CloseCode::GOING_AWAY,
        CloseCode::POLICY_VIOLATION,
    ]
    .contains(&code)
        || n >= CloseCode::APPLICATION_MIN.0
    {
        Ok(code)
    } else {
        Err(field_error(
            "code",
            format!("{n} is reserved for the protocol; use 0 (normal), 1 (going-away), 6 (policy-violation) or 1000 and up"),
        ))
    }
}

/// `POST /api/clients/{id}/close`: `{"code": 0, "reason": "…"}`, both optional.
pub(crate) async fn close(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let (_, body) = match read_body(&gw, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (mut code, mut text) = (CloseCode::NORMAL, String::from("closed by the backend"));
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                    "body is not JSON ({e}); send {{\"code\": 1000, \"reason\": \"…\"}} or nothing"
                ),
                )
            }
        };
        let Some(obj) = v.as_object() else {
            return error(StatusCode::BAD_REQUEST, "body must be a JSON object".into());
        };
        for (k, v) in obj {
            match k.as_str() {
                "code" => match close_code(v) {
                    Ok(c) => code = c,
                    Err(r) => return r,
                },
                "reason" => match v.as_str() {
                    Some(s) if s.len() <= tether_proto::codec::MAX_TEXT_LEN => text = s.to_owned(),
                    Some(_) => {
                        return field_error(
                            "reason",
                            format!("longer than {} bytes", tether_proto::codec::MAX_TEXT_LEN),
                        )
                    }
                    None => return field_error("reason", "expected a string".into()),
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown field {other:?}: expected \"code\" or \"reason\""),
                    )
                }
            }
        }
    }
    if let (Some(node), Some(c)) = (remote_owner(&gw, &id, false), gw.cluster.as_ref()) {
        let r = c.route_close(&node, &id, code, &text).await;
        return match r {
            Ok(node) => (
                StatusCode::OK,
                Json(serde_json::json!({"status": "routed", "client_id": id, "node": node, "code": code.0})),
            )
                .into_response(),
            Err(_) => routed(&id, &node, r),
        };
    }
    if gw.handle.kick(&id, code, &text) {
        (
            StatusCode::OK,
            Json(serde_json::json!({"status": "closing", "client_id": id, "code": code.0})),
        )
            .into_response()
    } else {
        not_there(&gw, &id, "only a connected client can be closed")
    }
}

/// Query parameters of `GET /api/events`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct EventsQuery {
    format: Option<String>,
    last_event_id: Option<String>,
}

/// `GET /api/events`.
pub(crate) async fn events(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let format = match q.format.as_deref() {
        Some("sse") => Format::Sse,
        Some("ndjson") => Format::Ndjson,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid query parameter format={other:?}: expected sse or ndjson"),
            )
        }
        None => {
            let ndjson = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/x-ndjson"));
            if ndjson {
                Format::Ndjson
            } else {
                Format::Sse
            }
        }
    };
    let from_header = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(|s| s.trim().to_owned()).unwrap_or_default());
    let last = match q.last_event_id.or(from_header).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid Last-Event-ID {s:?}: expected the id of an event (a number)"),
                )
            }
        },
    };
    let start = gw.journal.start(last);
    let body: Body = stream::body(gw.journal.clone(), start, format, gw.keepalive);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            ),
            // No proxy buffering (nginx), no transformation.
            (
                axum::http::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The deadline for a request body (a client that sends its head and then trickles).
pub(crate) const BODY_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn json() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h
    }

    async fn text_of(r: Response) -> (u16, serde_json::Value) {
        let status = r.status().as_u16();
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&b).unwrap())
    }

    #[tokio::test]
    async fn bodies_are_raw_bytes_or_json_text_or_base64_and_errors_name_the_field() {
        let raw = message_of(&HeaderMap::new(), Bytes::from_static(b"{\"text\":1}")).unwrap();
        assert_eq!(
            &raw[..],
            b"{\"text\":1}",
            "without a JSON content type the body is the message"
        );
        let m = message_of(&json(), Bytes::from_static(br#"{"text":"hi"}"#)).unwrap();
        assert_eq!(&m[..], b"hi");
        let m = message_of(&json(), Bytes::from_static(br#"{"base64":"/wA="}"#)).unwrap();
        assert_eq!(&m[..], b"\xff\x00");
        for (body, want) in [
            (&br#"{"text":1}"#[..], "text"),
            (br#"{"base64":"@@"}"#, "base64"),
            (br#"{"base64":null}"#, "base64"),
        ] {
            let (status, v) =
                text_of(message_of(&json(), Bytes::from_static(body)).unwrap_err()).await;
            assert_eq!((status, v["field"].as_str()), (400, Some(want)), "{v}");
        }
        for body in [
            &br#"{"txt":"a"}"#[..],
            b"{}",
            br#"{"text":"a","base64":"YQ=="}"#,
            b"[1]",
            b"nope",
        ] {
            let (status, v) =
                text_of(message_of(&json(), Bytes::from_static(body)).unwrap_err()).await;
            assert_eq!(status, 400);
            assert!(v["error"].as_str().unwrap().contains("text"), "{v}");
        }
        let (_, v) =
            text_of(message_of(&json(), Bytes::from_static(br#"{"txt":"a"}"#)).unwrap_err()).await;
        assert!(v["error"].as_str().unwrap().contains("\"txt\""), "{v}");
    }

    #[tokio::test]
    async fn close_codes_are_the_backends_or_the_generic_ones() {
        for ok in [0u64, 1, 6, 1000, 4000, 65535] {
            assert!(close_code(&serde_json::json!(ok)).is_ok(), "{ok}");
        }
        for bad in [
            serde_json::json!(5),
            serde_json::json!(17),
            serde_json::json!(65536),
            serde_json::json!("1"),
        ] {
            let (status, v) = text_of(close_code(&bad).unwrap_err()).await;
            assert_eq!((status, v["field"].as_str()), (400, Some("code")), "{bad}");
        }
    }
}
