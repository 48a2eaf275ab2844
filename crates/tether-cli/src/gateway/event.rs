//! The events of `GET /api/events`, as JSON (serde). One object per event; `docs/API.md`
//! is the reference.
//!
//! ```text
//!   {"id": 1712345678901000042, "type": "message", "at_unix_ms": …, "client_id": "phone-1",
//!    "session": 1712345678901001, "seq": 7, "text": "hello"}          (or "base64": "…")
//!   {"id": …, "type": "presence", "client_id", "state", "from", "conn_id", "remote",
//!    "reason", "reason_text", "silent_for_ms", "hold_ms"}
//!   {"id": …, "type": "session-lost", "client_id", "session", "unacked": {"first","last"},
//!    "unsent": {"first","last"}, "unsent_count"}
//!   {"id": …, "type": "server-start" | "server-stop", …}
//!   {"id": to, "type": "gap", "from", "to", "missed", "reason"}
//! ```

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use tether::ServerEvent;
use tether_proto::presence::{PresenceChange, PresenceState};

use super::journal::{GapReason, Journal};

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Serialize)]
struct Envelope<T: Serialize> {
    id: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    at_unix_ms: u64,
    #[serde(flatten)]
    body: T,
}

fn encode<T: Serialize>(id: u64, kind: &'static str, body: T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(&Envelope {
        id,
        kind,
        at_unix_ms: now_unix_ms(),
        body,
    })
    .unwrap_or_default()
}

/// A sequence-number range, inclusive.
#[derive(Serialize, Debug, Clone, Copy)]
pub(crate) struct Range {
    first: u64,
    last: u64,
}

impl From<&RangeInclusive<u64>> for Range {
    fn from(r: &RangeInclusive<u64>) -> Self {
        Range {
            first: *r.start(),
            last: *r.end(),
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    client_id: &'a str,
    session: Option<u64>,
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
    /// `--durable-sessions`: republished by the node that restored the client's session
    /// from its durable copy (its node died): the backend may have read it already from
    /// that node's stream; `(client_id, session, seq)` is the key to de-duplicate on.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

#[derive(Serialize)]
struct Presence<'a> {
    client_id: &'a str,
    state: &'static str,
    from: Option<&'static str>,
    conn_id: u64,
    remote: Option<String>,
    reason: Option<&'static str>,
    reason_text: Option<String>,
    silent_for_ms: Option<u64>,
    hold_ms: Option<u64>,
}

#[derive(Serialize)]
struct SessionLost<'a> {
    client_id: &'a str,
    session: u64,
    unacked: Option<Range>,
    unsent: Option<Range>,
    unsent_count: usize,
}

#[derive(Serialize)]
struct Gap {
    from: u64,
    to: u64,
    missed: Option<u64>,
    reason: &'static str,
}

/// Settings a backend may want to know from `server-start`.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct StartInfo {
    pub(crate) listen: String,
    pub(crate) version: &'static str,
    pub(crate) first_id: u64,
    pub(crate) ring_events: usize,
    pub(crate) ring_bytes: usize,
    pub(crate) session_linger_ms: Option<u64>,
}

#[derive(Serialize)]
struct Stop {
    reason: &'static str,
}

/// A client message republished from a durable copy (`"replayed": true`, see
/// docs/CLUSTER.md): the node that held it died; the backend may have read it already.
pub(crate) fn record_replayed(
    j: &Journal,
    client_id: &str,
    session: u64,
    seq: u64,
    msg: &[u8],
) -> Option<u64> {
    record_message(j, client_id, Some(session), Some(seq), msg, true)
}

/// A client's message as a `message` event: text when it is UTF-8, else base64.
fn record_message(
    j: &Journal,
    client_id: &str,
    session: Option<u64>,
    seq: Option<u64>,
    msg: &[u8],
    replayed: bool,
) -> Option<u64> {
    j.append("message", |id| {
        let (text, base64) = match std::str::from_utf8(msg) {
            Ok(t) => (Some(t), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(msg)),
            ),
        };
        encode(
            id,
            "message",
            Message {
                client_id,
                session,
                seq,
                text,
                base64,
                replayed,
            },
        )
    })
}

/// Publishes what a backend needs of `ev`; returns the id (`None` when the event is not
/// published: connection-level detail the presence events already carry).
pub(crate) fn record(j: &Journal, ev: &ServerEvent) -> Option<u64> {
    match ev {
        ServerEvent::Message {
            client_id,
            msg,
            seq,
            session,
            ..
        } => record_message(j, client_id, *session, *seq, msg, false),
        ServerEvent::Presence { change, remote } => presence(j, change, *remote),
        ServerEvent::SessionLost {
            client_id,
            session,
            unacked,
            unsent,
            unsent_seqs,
            ..
        } => j.append("session-lost", |id| {
            encode(
                id,
                "session-lost",
                SessionLost {
                    client_id,
                    session: *session,
                    unacked: unacked.as_ref().map(Range::from),
                    unsent: unsent_seqs.as_ref().map(Range::from),
                    unsent_count: unsent.len(),
                },
            )
        }),
        _ => None,
    }
}

fn presence(j: &Journal, ch: &PresenceChange, remote: Option<SocketAddr>) -> Option<u64> {
    let (reason, silent_for, hold) = match &ch.to {
        PresenceState::Resuming {
            reason,
            silent_for,
            until,
            ..
        } => (
            Some(reason),
            Some(*silent_for),
            Some(until.saturating_duration_since(ch.at)),
        ),
        PresenceState::Offline {
            reason, silent_for, ..
        } => (Some(reason), Some(*silent_for), None),
        _ => (None, None, None),
    };
    j.append("presence", |id| {
        encode(
            id,
            "presence",
            Presence {
                client_id: &ch.id,
                state: ch.to.kind().label(),
                from: ch.from.as_ref().map(|s| s.kind().label()),
                conn_id: ch.conn_id,
                remote: remote.map(|r| r.to_string()),
                reason: reason.map(|r| r.label()),
                reason_text: reason.map(ToString::to_string),
                silent_for_ms: silent_for.map(ms),
                hold_ms: hold.map(ms),
            },
        )
    })
}

/// `server-start`, the first event of a run.
pub(crate) fn start(j: &Journal, info: StartInfo) -> Option<u64> {
    j.append("server-start", |id| encode(id, "server-start", info))
}

/// `server-stop`, the last event of a run.
pub(crate) fn stop(j: &Journal, reason: &'static str) -> Option<u64> {
    j.append("server-stop", |id| {
        encode(id, "server-stop", Stop { reason })
    })
}

/// A `gap` (never stored: each reader gets its own). Its id is the last id it covers, so a
/// reader that stops right after it resumes after the gap.
pub(crate) fn gap(from: u64, to: u64, reason: GapReason) -> (u64, Vec<u8>) {
    let missed = match reason {
        GapReason::Evicted if to >= from => Some(to - from + 1),
        GapReason::Evicted | GapReason::UnknownId => {
            Some(to.saturating_add(1).saturating_sub(from))
        }
        // Ids of an earlier run are not dense up to this run's first: the count is unknown.
        GapReason::Restart => None,
    };
    let json = encode(
        to,
        "gap",
        Gap {
            from,
            to,
            missed,
            reason: reason.label(),
        },
    );
    (to, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::journal::{Bounds, Read};
    use bytes::Bytes;

    fn journal() -> Journal {
        Journal::new(
            11,
            Bounds {
                max_bytes: 1 << 20,
                max_events: 100,
            },
        )
    }

    fn last(j: &Journal) -> serde_json::Value {
        let Read::Events(v) = j.read(j.oldest(), 1000, usize::MAX) else {
            panic!("no events");
        };
        serde_json::from_slice(&v.last().unwrap().json).unwrap()
    }

    #[test]
    fn messages_are_text_when_utf8_and_base64_otherwise() {
        let j = journal();
        let ev = |msg: &'static [u8]| ServerEvent::Message {
            client_id: "phone-1".into(),
            msg: Bytes::from_static(msg),
            seq: Some(7),
            session: Some(42),
        };
        assert_eq!(record(&j, &ev(b"hi \xe2\x9c\x93")), Some(11));
        let v = last(&j);
        assert_eq!(
            (
                v["id"].as_u64(),
                v["type"].as_str(),
                v["client_id"].as_str()
            ),
            (Some(11), Some("message"), Some("phone-1"))
        );
        assert_eq!(
            (v["session"].as_u64(), v["seq"].as_u64()),
            (Some(42), Some(7))
        );
        assert_eq!(v["text"], "hi ✓");
        assert!(v.get("base64").is_none());
        record(&j, &ev(b"\xff\x00"));
        let v = last(&j);
        assert_eq!(v["base64"], "/wA=");
        assert!(v.get("text").is_none());
    }

    #[test]
    fn gaps_name_their_range_and_count() {
        let v: serde_json::Value =
            serde_json::from_slice(&gap(5, 9, GapReason::Evicted).1).unwrap();
        assert_eq!(
            (v["id"].as_u64(), v["type"].as_str()),
            (Some(9), Some("gap"))
        );
        assert_eq!(
            (v["from"].as_u64(), v["to"].as_u64(), v["missed"].as_u64()),
            (Some(5), Some(9), Some(5))
        );
        assert_eq!(v["reason"], "evicted");
        let v: serde_json::Value =
            serde_json::from_slice(&gap(5, 900, GapReason::Restart).1).unwrap();
        assert_eq!(v["missed"], serde_json::Value::Null);
        assert_eq!(v["reason"], "restart");
    }
}
