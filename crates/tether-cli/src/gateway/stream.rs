//! `GET /api/events`: the journal as Server-Sent Events or newline-delimited JSON.
//!
//! ```text
//!   reader (one per subscriber, on its HTTP connection's task)
//!     next ──read(next, ≤512 events, ≤256 KiB)──▶ journal ──▶ one chunk ──▶ hyper ──▶ socket
//!       ▲ nothing new: wait on the journal's watch (or send a keep-alive every 15 s)
//!       └ behind the ring: a `gap` event, then on from the oldest event held
//! ```
//!
//! A reader copies a batch under the journal's lock and formats it outside; hyper asks for
//! the next chunk only when the previous one was written, so a slow backend holds one chunk
//! plus its socket buffers, never the writer: the ring moves on without it, and it gets a
//! `gap` when it catches up. A reader that stops reading altogether is cut off by the
//! listener's write deadline and resumes with `Last-Event-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::watch;

use super::event;
use super::journal::{GapReason, Journal, Read, ReaderGuard, Start, Stored};

/// Events per chunk at most.
const BATCH_EVENTS: usize = 512;
/// Bytes of JSON per chunk, about (at least one event).
const BATCH_BYTES: usize = 256 * 1024;

/// How events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/event-stream`: `id:`, `event:`, `data:` lines, a blank line after each.
    Sse,
    /// `application/x-ndjson`: one JSON object per line; a blank line is a keep-alive.
    Ndjson,
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Sse => "text/event-stream",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    fn frame(self, out: &mut Vec<u8>, id: u64, kind: &str, json: &[u8]) {
        match self {
            Format::Sse => {
                out.extend_from_slice(format!("id: {id}\nevent: {kind}\ndata: ").as_bytes());
                out.extend_from_slice(json);
                out.extend_from_slice(b"\n\n");
            }
            Format::Ndjson => {
                out.extend_from_slice(json);
                out.push(b'\n');
            }
        }
    }

    fn keepalive(self) -> &'static [u8] {
        match self {
            Format::Sse => b": keep-alive\n\n",
            Format::Ndjson => b"\n",
        }
    }
}

struct Reader {
    _counted: ReaderGuard,
    journal: Arc<Journal>,
    watch: watch::Receiver<u64>,
    next: u64,
    unknown: bool,
    first: bool,
    format: Format,
    keepalive: Duration,
}

/// The response body of one subscriber starting at `start`.
pub(crate) fn body(
    journal: Arc<Journal>,
    start: Start,
    format: Format,
    keepalive: Duration,
) -> Body {
    let reader = Reader {
        _counted: ReaderGuard::new(journal.clone()),
        watch: journal.watch(),
        journal,
        next: start.next,
        unknown: start.unknown,
        first: true,
        format,
        keepalive,
    };
    Body::from_stream(futures::stream::unfold(reader, |mut r| async move {
        r.chunk().await.map(|b| (Ok::<Bytes, Infallible>(b), r))
    }))
}

impl Reader {
    /// The next chunk to write; `None` when the journal closed and everything was sent.
    async fn chunk(&mut self) -> Option<Bytes> {
        let mut out = Vec::new();
        if self.first {
            self.first = false;
            if self.format == Format::Sse {
                // Reconnect after 1 s (browsers' EventSource honours it).
                out.extend_from_slice(b"retry: 1000\n\n");
            }
        }
        if self.unknown {
            self.unknown = false;
            let oldest = self.journal.oldest();
            let from = self.journal.run_first();
            self.gap(
                &mut out,
                from,
                oldest.saturating_sub(1),
                GapReason::UnknownId,
            );
            self.next = oldest;
        }
        loop {
            // Seen before reading: an event published after the read wakes the wait below.
            self.watch.borrow_and_update();
            match self.journal.read(self.next, BATCH_EVENTS, BATCH_BYTES) {
                Read::Events(events) => {
                    self.push(&mut out, &events);
                    return Some(Bytes::from(out));
                }
                Read::Gap { from, to, reason } => {
                    self.gap(&mut out, from, to, reason);
                    self.next = to + 1;
                }
                Read::Nothing if !out.is_empty() => return Some(Bytes::from(out)),
                Read::Nothing if self.journal.is_closed() => return None,
                Read::Nothing => {
                    match tokio::time::timeout(self.keepalive, self.watch.changed()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None,
                        Err(_) => return Some(Bytes::from_static(self.format.keepalive())),
                    }
                }
            }
        }
    }

    fn push(&mut self, out: &mut Vec<u8>, events: &[Stored]) {
        for e in events {
            self.format.frame(out, e.id, e.kind, &e.json);
            self.next = e.id + 1;
        }
    }

    fn gap(&self, out: &mut Vec<u8>, from: u64, to: u64, reason: GapReason) {
        let (id, json) = event::gap(from, to, reason);
        self.format.frame(out, id, "gap", &json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::journal::Bounds;
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;

    fn journal(max_events: usize) -> Arc<Journal> {
        Arc::new(Journal::new(
            101,
            Bounds {
                max_bytes: 1 << 20,
                max_events,
            },
        ))
    }

    fn put(j: &Journal, n: usize) {
        for _ in 0..n {
            j.append("message", |id| format!("{{\"id\":{id}}}").into_bytes());
        }
    }

    async fn collect(b: Body) -> String {
        let bytes = b.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sse_frames_ids_and_ends_when_the_journal_closes() {
        let j = journal(100);
        put(&j, 2);
        j.close();
        let s = collect(body(
            j.clone(),
            j.start(None),
            Format::Sse,
            Duration::from_secs(15),
        ))
        .await;
        assert_eq!(
            s,
            "retry: 1000\n\nid: 101\nevent: message\ndata: {\"id\":101}\n\nid: 102\nevent: message\ndata: {\"id\":102}\n\n"
        );
        let s = collect(body(
            j.clone(),
            j.start(Some(101)),
            Format::Ndjson,
            Duration::from_secs(15),
        ))
        .await;
        assert_eq!(s, "{\"id\":102}\n");
    }

    #[tokio::test]
    async fn a_reader_behind_the_ring_gets_a_gap_first() {
        let j = journal(3);
        put(&j, 6);
        j.close();
        let s = collect(body(
            j.clone(),
            j.start(Some(101)),
            Format::Ndjson,
            Duration::from_secs(15),
        ))
        .await;
        let lines: Vec<serde_json::Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "gap");
        assert_eq!(
            (lines[0]["from"].as_u64(), lines[0]["to"].as_u64()),
            (Some(102), Some(103))
        );
        let ids: Vec<u64> = lines[1..]
            .iter()
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [104, 105, 106]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reader_wakes_on_append_and_sends_keepalives_when_idle() {
        let j = journal(100);
        let mut stream = body(
            j.clone(),
            j.start(None),
            Format::Ndjson,
            Duration::from_secs(15),
        )
        .into_data_stream();
        let waiter = tokio::spawn(async move {
            let first = stream.next().await.unwrap().unwrap();
            let second = stream.next().await.unwrap().unwrap();
            (first, second)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        put(&j, 1);
        let (first, second) = waiter.await.unwrap();
        assert_eq!(&first[..], b"{\"id\":101}\n");
        // Nothing for 15 s: a blank line keeps the connection (and its proxies) alive.
        assert_eq!(&second[..], b"\n");
    }

    #[tokio::test]
    async fn an_unknown_last_event_id_is_reported_and_the_ring_replayed() {
        let j = journal(2);
        put(&j, 4);
        j.close();
        let s = collect(body(
            j.clone(),
            j.start(Some(99_999)),
            Format::Ndjson,
            Duration::from_secs(15),
        ))
        .await;
        let lines: Vec<serde_json::Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["reason"], "unknown-last-event-id");
        assert_eq!(
            (lines[0]["from"].as_u64(), lines[0]["to"].as_u64()),
            (Some(101), Some(102))
        );
        assert_eq!(lines[1]["id"], 103);
        assert_eq!(lines.len(), 3);
    }
}
