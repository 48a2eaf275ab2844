//! What the status page and the JSON API show: one [`ClientRow`] per client, taken from a
//! [`StatusSource`] on every request, filtered and paginated by a [`ClientQuery`] (pure).
//!
//! ```text
//!   ServerHandle::clients_page(state, cursor, limit) ──▶ ServerSource::page
//!     (a range of the server's sorted registry: O(log n + limit))   │ ClientQuery
//!                                                                    ▼
//!                                                  Page { rows ≤ limit, next_cursor, counts }
//!                                                    ├──▶ api.rs  (JSON, serde)
//!                                                    └──▶ html.rs (first render; the page's
//!                                                                  script then polls the API)
//! ```
//!
//! The cursor is the id of the last row of the previous page: the next page starts after
//! it in id order. It is stable while clients come and go (no row is skipped or shown twice
//! because another one appeared), and costs nothing to keep on the server.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use tether::{ClientInfo, ServerHandle};
use tether_proto::presence::{PresenceCounts, PresenceKind, PresenceState};
use tether_proto::DisconnectReason;

/// Where the status server gets its data. Called once per request, from a tokio task; keep
/// it quick (a snapshot under a short lock, no waiting on I/O).
pub(crate) trait StatusSource: Send + Sync + 'static {
    /// One row per client the server knows, sorted by id.
    fn clients(&self) -> Vec<ClientRow>;
    /// One page of rows. The default filters and slices [`clients`](Self::clients); a
    /// source that can give a page without listing every client overrides it.
    fn page(&self, q: &ClientQuery) -> Page {
        page(self.clients(), q)
    }
    /// One client's row.
    fn client(&self, id: &str) -> Option<ClientRow>;
    /// How often the RTT is measured (`None`: never), for the page's hint.
    fn rtt_every(&self) -> Option<Duration>;
    /// A line about where the rows come from, shown above the counts (the cluster's state).
    fn note(&self) -> Option<String> {
        None
    }
}

/// Counters of a client's current (or, once the library keeps them, last) connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counters {
    /// Application messages received from the client.
    pub(crate) messages_in: u64,
    /// Application messages sent to the client.
    pub(crate) messages_out: u64,
    /// Bytes received from the client.
    pub(crate) bytes_in: u64,
    /// Bytes sent to the client.
    pub(crate) bytes_out: u64,
}

/// One client, as shown on the status page and in `/api/clients`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClientRow {
    /// The client id.
    pub(crate) id: String,
    /// Its presence state.
    pub(crate) state: PresenceKind,
    /// When it entered that state (wall clock).
    pub(crate) state_since: Option<SystemTime>,
    /// The id of its current (or last) connection.
    pub(crate) conn_id: u64,
    /// The remote address of that connection.
    pub(crate) remote: Option<SocketAddr>,
    /// When that connection was registered (wall clock).
    pub(crate) connected_since: Option<SystemTime>,
    /// How long ago anything was last received from it.
    pub(crate) last_seen_ago: Option<Duration>,
    /// The last measured round-trip time (`None` before the first ping was answered).
    pub(crate) rtt: Option<Duration>,
    /// For `Resuming`/`Offline`: when the connection ended (wall clock).
    pub(crate) disconnected_at: Option<SystemTime>,
    /// For `Resuming`/`Offline`: how long the peer had been silent when it ended.
    pub(crate) silent_for: Option<Duration>,
    /// For `Resuming`/`Offline`: why it ended.
    pub(crate) reason: Option<DisconnectReason>,
    /// For `Resuming`/`Offline`: a reason label from the cluster when `reason` is unknown
    /// here (`node-lost`, or the label another node wrote).
    pub(crate) reason_label: Option<String>,
    /// For `Resuming`: how long the session is still held.
    pub(crate) hold_left: Option<Duration>,
    /// Message and byte counters; `None` when the library has none for this client (shown
    /// as "—", never as a made-up 0).
    pub(crate) counters: Option<Counters>,
    /// Connections registered for this id.
    pub(crate) connects: u64,
    /// Connections of this id that ended.
    pub(crate) disconnects: u64,
    /// Its session id while it has one (connected with a session, or resuming).
    pub(crate) session: Option<u64>,
    /// The node that holds it (`serve --cluster`); `None` without a cluster.
    pub(crate) node: Option<String>,
}

impl ClientRow {
    /// A row from what the server knows about a client. `now` and `wall_now` are the same
    /// moment on the monotonic and the wall clock (to convert instants).
    pub(crate) fn from_info(c: &ClientInfo, now: Instant, wall_now: SystemTime) -> Self {
        let wall = |t: Instant| wall_now.checked_sub(now.saturating_duration_since(t));
        let (disconnected_at, silent_for, reason, hold_left) = match &c.state {
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
        // Connected: from the connection's last byte. Gone: the silence it ended with, plus
        // the time since.
        let last_seen_ago = match (&c.stats, disconnected_at) {
            (_, Some(at)) => {
                Some(now.saturating_duration_since(at) + silent_for.unwrap_or_default())
            }
            (Some(s), None) => s.last_rx.map(|rx| now.saturating_duration_since(rx)),
            (None, None) => None,
        };
        ClientRow {
            id: c.id.clone(),
            state: c.state.kind(),
            state_since: wall(c.changed_at),
            conn_id: c.conn_id,
            remote: Some(c.remote),
            connected_since: wall(c.connected_since),
            last_seen_ago,
            rtt: c.stats.and_then(|s| s.srtt),
            disconnected_at: disconnected_at.and_then(wall),
            silent_for,
            reason,
            reason_label: None,
            hold_left,
            counters: c.stats.map(|s| Counters {
                messages_in: s.messages_in,
                messages_out: s.messages_out,
                bytes_in: s.bytes_in,
                bytes_out: s.bytes_out,
            }),
            connects: c.connects,
            disconnects: c.disconnects,
            session: c.session,
            node: None,
        }
    }
}

/// A running server as a [`StatusSource`].
pub(crate) struct ServerSource {
    /// The server.
    pub(crate) handle: ServerHandle,
    /// How often the server pings for RTT.
    pub(crate) rtt_every: Option<Duration>,
}

impl StatusSource for ServerSource {
    fn clients(&self) -> Vec<ClientRow> {
        let (now, wall) = (tokio::time::Instant::now().into_std(), SystemTime::now());
        // `ServerHandle::clients` is sorted by id.
        self.handle
            .clients()
            .iter()
            .map(|c| ClientRow::from_info(c, now, wall))
            .collect()
    }

    fn client(&self, id: &str) -> Option<ClientRow> {
        let (now, wall) = (tokio::time::Instant::now().into_std(), SystemTime::now());
        self.handle
            .client(id)
            .map(|c| ClientRow::from_info(&c, now, wall))
    }

    /// From the server's sorted registry: O(log n + limit), not a listing of every client.
    fn page(&self, q: &ClientQuery) -> Page {
        let (now, wall) = (tokio::time::Instant::now().into_std(), SystemTime::now());
        let p = self
            .handle
            .clients_page(q.state, q.cursor.as_deref(), q.limit);
        Page {
            rows: p
                .clients
                .iter()
                .map(|c| ClientRow::from_info(c, now, wall))
                .collect(),
            next_cursor: p.next_cursor,
            matching: p.matching,
            counts: p.counts,
        }
    }

    fn rtt_every(&self) -> Option<Duration> {
        self.rtt_every
    }
}

/// The largest page.
pub(crate) const MAX_LIMIT: usize = 1000;
/// The page size when none is asked for.
pub(crate) const DEFAULT_LIMIT: usize = 100;

/// Which clients, and which page of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientQuery {
    /// Only clients in this state.
    pub(crate) state: Option<PresenceKind>,
    /// Start after this id.
    pub(crate) cursor: Option<String>,
    /// At most this many rows (1..=[`MAX_LIMIT`]).
    pub(crate) limit: usize,
}

impl Default for ClientQuery {
    fn default() -> Self {
        ClientQuery {
            state: None,
            cursor: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// A query parameter that was not understood; the message names it and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid query parameter {param}={value:?}: {problem}")]
pub(crate) struct QueryError {
    /// The parameter.
    pub(crate) param: &'static str,
    /// The value as given.
    pub(crate) value: String,
    /// What is wrong.
    pub(crate) problem: &'static str,
}

impl ClientQuery {
    /// From the raw query parameters (`state`, `cursor`, `limit`); empty values count as
    /// absent (an HTML form sends them).
    pub(crate) fn parse(
        state: Option<&str>,
        cursor: Option<&str>,
        limit: Option<&str>,
    ) -> Result<Self, QueryError> {
        fn present(v: Option<&str>) -> Option<&str> {
            v.filter(|s| !s.is_empty())
        }
        let state = match present(state) {
            None | Some("all") => None,
            Some(s) => Some(
                PresenceKind::ALL
                    .into_iter()
                    .find(|k| k.label() == s)
                    .ok_or_else(|| QueryError {
                        param: "state",
                        value: s.to_owned(),
                        problem: "expected online, suspect, resuming, offline or all",
                    })?,
            ),
        };
        let limit = match present(limit) {
            None => DEFAULT_LIMIT,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(QueryError {
                        param: "limit",
                        value: s.to_owned(),
                        problem: "expected a number from 1 to 1000",
                    })
                }
            },
        };
        Ok(ClientQuery {
            state,
            cursor: present(cursor).map(str::to_owned),
            limit,
        })
    }
}

/// One page of clients.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Page {
    /// The rows, in id order.
    pub(crate) rows: Vec<ClientRow>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub(crate) next_cursor: Option<String>,
    /// Clients matching the state filter (all pages).
    pub(crate) matching: usize,
    /// Clients per state (all of them, unfiltered).
    pub(crate) counts: PresenceCounts,
}

/// Applies `q` to `rows` (sorted by id).
pub(crate) fn page(rows: Vec<ClientRow>, q: &ClientQuery) -> Page {
    let mut counts = PresenceCounts::default();
    for r in &rows {
        *counts.get_mut(r.state) += 1;
    }
    let matching: Vec<ClientRow> = match q.state {
        Some(s) => rows.into_iter().filter(|r| r.state == s).collect(),
        None => rows,
    };
    let total = matching.len();
    let start = match &q.cursor {
        Some(c) => matching.partition_point(|r| r.id.as_str() <= c.as_str()),
        None => 0,
    };
    let end = (start + q.limit).min(total);
    let mut matching = matching;
    let rows: Vec<ClientRow> = matching.drain(start..end).collect();
    let next_cursor = (end < total)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    Page {
        rows,
        next_cursor,
        matching: total,
        counts,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::UNIX_EPOCH;

    pub(crate) fn wall(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A row as the fixtures of every status test use it.
    pub(crate) fn row(id: &str, state: PresenceKind) -> ClientRow {
        let gone = matches!(state, PresenceKind::Offline | PresenceKind::Resuming);
        ClientRow {
            id: id.to_owned(),
            state,
            state_since: Some(if gone {
                wall(1_700_003_800)
            } else {
                wall(1_700_003_723)
            }),
            conn_id: 7,
            remote: Some(SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 40_000))),
            connected_since: Some(wall(1_700_003_723)), // 23:15:23 UTC
            last_seen_ago: Some(Duration::from_millis(1_250)),
            rtt: (!gone).then_some(Duration::from_micros(1_234)),
            disconnected_at: gone.then(|| wall(1_700_003_800)), // 23:16:40 UTC
            silent_for: gone.then_some(Duration::from_millis(9_100)),
            reason: gone.then_some(DisconnectReason::HeartbeatTimeout),
            reason_label: None,
            hold_left: None,
            counters: (!gone).then_some(Counters {
                messages_in: 12,
                messages_out: 34,
                bytes_in: 1_200,
                bytes_out: 3_400,
            }),
            connects: 2,
            disconnects: 1,
            session: (!gone).then_some(1_700_003_723_000_001),
            node: None,
        }
    }

    fn ids(p: &Page) -> Vec<&str> {
        p.rows.iter().map(|r| r.id.as_str()).collect()
    }

    fn many(n: usize) -> Vec<ClientRow> {
        (0..n)
            .map(|i| {
                let state = if i % 3 == 0 {
                    PresenceKind::Offline
                } else {
                    PresenceKind::Online
                };
                row(&format!("dev-{i:05}"), state)
            })
            .collect()
    }

    #[test]
    fn pages_follow_the_cursor_without_gaps_or_repeats() {
        let rows = many(250);
        let mut q = ClientQuery {
            limit: 100,
            ..ClientQuery::default()
        };
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let p = page(rows.clone(), &q);
            assert_eq!(p.matching, 250);
            assert_eq!(p.counts.total(), 250);
            assert!(p.rows.len() <= 100);
            seen.extend(p.rows.iter().map(|r| r.id.clone()));
            pages += 1;
            match p.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let want: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn state_filter_and_a_cursor_that_vanished() {
        let rows = many(30);
        let q = ClientQuery::parse(Some("offline"), None, Some("4")).unwrap();
        let p = page(rows.clone(), &q);
        assert_eq!(
            ids(&p),
            ["dev-00000", "dev-00003", "dev-00006", "dev-00009"]
        );
        assert_eq!(
            (p.matching, p.counts.offline, p.counts.online),
            (10, 10, 20)
        );
        assert_eq!(p.next_cursor.as_deref(), Some("dev-00009"));
        // The cursor's client went away meanwhile: the next page still starts after it.
        let q = ClientQuery::parse(Some("offline"), Some("dev-00010"), Some("2")).unwrap();
        assert_eq!(ids(&page(rows, &q)), ["dev-00012", "dev-00015"]);
        // The last page has no cursor; an empty result neither.
        let q = ClientQuery::parse(None, Some("dev-00028"), None).unwrap();
        let p = page(many(30), &q);
        assert_eq!((ids(&p), p.next_cursor.clone()), (vec!["dev-00029"], None));
        let p = page(Vec::new(), &ClientQuery::default());
        assert_eq!((p.rows.len(), p.next_cursor, p.matching), (0, None, 0));
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let e = ClientQuery::parse(Some("asleep"), None, None).unwrap_err();
        assert_eq!(e.param, "state");
        assert!(e.to_string().contains("state=\"asleep\""), "{e}");
        for bad in ["0", "1001", "-1", "ten"] {
            let e = ClientQuery::parse(None, None, Some(bad)).unwrap_err();
            assert_eq!(e.param, "limit", "{bad}");
        }
        let q = ClientQuery::parse(Some(""), Some(""), Some("")).unwrap();
        assert_eq!(q, ClientQuery::default());
        assert_eq!(
            ClientQuery::parse(Some("all"), None, Some("1000"))
                .unwrap()
                .limit,
            1000
        );
    }

    #[test]
    fn row_from_a_disconnected_client_has_no_made_up_counters() {
        use tether_proto::presence::{Registry, RegistryConfig};
        // A virtual timeline: `base` is an arbitrary origin, wall time 1,000,000 s at base+100 s.
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let (now, wall_now) = (at(100_000), wall(1_000_000));
        let mut reg = Registry::new(RegistryConfig::default());
        let remote = SocketAddr::from(([127, 0, 0, 1], 5555));
        reg.connected(at(50_000), "b", 4, remote);
        reg.disconnected(
            at(90_000),
            "b",
            4,
            DisconnectReason::HeartbeatTimeout,
            Duration::from_secs(6),
            Some(at(120_000)),
        );
        let e = reg.get("b").unwrap();
        let info = ClientInfo {
            id: "b".into(),
            state: e.state.clone(),
            remote: e.remote,
            connected_since: e.connected_since,
            changed_at: e.changed_at,
            stats: None,
            connects: e.connects,
            disconnects: e.disconnects,
            conn_id: e.conn_id,
            session: None,
        };
        let b = ClientRow::from_info(&info, now, wall_now);
        assert_eq!(b.state, PresenceKind::Resuming);
        assert_eq!(b.disconnected_at, Some(wall(999_990)));
        assert_eq!(b.state_since, Some(wall(999_990)));
        assert_eq!(b.connected_since, Some(wall(999_950)));
        assert_eq!(b.silent_for, Some(Duration::from_secs(6)));
        assert_eq!(b.last_seen_ago, Some(Duration::from_secs(16)));
        assert_eq!(b.hold_left, Some(Duration::from_secs(20)));
        assert_eq!(b.reason, Some(DisconnectReason::HeartbeatTimeout));
        assert_eq!((b.counters, b.rtt), (None, None));
        assert_eq!((b.connects, b.disconnects), (1, 1));
    }
}
