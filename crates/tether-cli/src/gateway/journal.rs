//! The event journal: every event the gateway publishes, with its id, in a ring bounded in
//! bytes and in events. Readers never block the writer: each keeps its own position and
//! copies what it needs under a short lock; one that falls behind the ring is told so with
//! an explicit gap.
//!
//! ```text
//!   append(kind, json) ──▶ [first_id ............................ last_id] ──▶ evict oldest
//!                            ▲ read(next): next ≥ first: the events from next on (a batch)
//!                            │             next < first: Gap { from: next, to: first - 1 }
//!   watch: last id ──────────┴──▶ readers wake (the writer never waits for them)
//! ```
//!
//! Ids are dense within a run: event `n + 1` follows event `n`. The first id of a run is the
//! start time in milliseconds times 1000 (plus one), so ids keep increasing across restarts
//! and stay below 2^53 (exact in JavaScript and in every JSON parser) until the year 2255; a
//! run would have to publish more than a million events per second on average before its ids
//! reached the next start's. A `Last-Event-ID` below this run's first id is from an earlier
//! run: what followed it is reported as a gap ("restart").

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::watch;

/// Bytes an entry costs besides its JSON (the id, the kind, the `Bytes` header, the
/// `VecDeque` slot).
const ENTRY_OVERHEAD: usize = 64;

/// One published event: its id, its kind (the SSE `event:` name) and its JSON text.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) json: Bytes,
}

/// Why a reader missed events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GapReason {
    /// The ring moved on past them (it is full, or the reader was too slow).
    Evicted,
    /// They were published by an earlier run of the server (its ring died with it).
    Restart,
    /// The reader's `Last-Event-ID` was never issued by this server.
    UnknownId,
}

impl GapReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            GapReason::Evicted => "evicted",
            GapReason::Restart => "restart",
            GapReason::UnknownId => "unknown-last-event-id",
        }
    }
}

/// What a reader gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// Events from the position on (at least one).
    Events(Vec<Stored>),
    /// The events `from..=to` are gone; continue at `to + 1`. `from > to` only for
    /// `UnknownId` when nothing is gone.
    Gap {
        from: u64,
        to: u64,
        reason: GapReason,
    },
    /// Nothing new yet.
    Nothing,
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for Stored {}

/// The ring's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Bytes of JSON (plus a fixed overhead per event) kept at most.
    pub(crate) max_bytes: usize,
    /// Events kept at most.
    pub(crate) max_events: usize,
}

struct Ring {
    events: VecDeque<Stored>,
    bytes: usize,
    /// The id the next event gets.
    next_id: u64,
    closed: bool,
}

/// See the module docs.
pub(crate) struct Journal {
    ring: Mutex<Ring>,
    bounds: Bounds,
    /// The first id of this run.
    run_first: u64,
    /// The last id published (`run_first - 1` before the first), and closing.
    latest: watch::Sender<u64>,
    /// Readers (event streams) open now; watched so that shutdown waits for the last one by
    /// notification.
    readers: watch::Sender<usize>,
}

/// Counts a reader while it lives.
pub(crate) struct ReaderGuard(std::sync::Arc<Journal>);

impl ReaderGuard {
    pub(crate) fn new(j: std::sync::Arc<Journal>) -> Self {
        j.readers.send_modify(|n| *n += 1);
        ReaderGuard(j)
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    /// The next id the reader wants.
    pub(crate) next: u64,
    /// Reported first: the reader's id is unknown to this run.
    pub(crate) unknown: bool,
}

impl Journal {
    /// An empty journal whose first event gets `run_first`.
    pub(crate) fn new(run_first: u64, bounds: Bounds) -> Self {
        Journal {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                bytes: 0,
                next_id: run_first,
                closed: false,
            }),
            bounds: Bounds {
                max_bytes: bounds.max_bytes.max(1),
                max_events: bounds.max_events.max(1),
            },
            run_first,
            latest: watch::channel(run_first - 1).0,
            readers: watch::channel(0).0,
        }
    }

    /// The first id of a run started at `unix_ms`.
    pub(crate) fn first_id_at(unix_ms: u64) -> u64 {
        unix_ms.saturating_mul(1000).saturating_add(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first id of this run.
    pub(crate) fn run_first(&self) -> u64 {
        self.run_first
    }

    /// Publishes an event: `json` gets its id and returns its text. Never waits for readers;
    /// evicts the oldest events beyond the bounds. Returns the id (`None` once closed).
    pub(crate) fn append(
        &self,
        kind: &'static str,
        json: impl FnOnce(u64) -> Vec<u8>,
    ) -> Option<u64> {
        let mut ring = self.lock();
        if ring.closed {
            return None;
        }
        let id = ring.next_id;
        ring.next_id += 1;
        let json = Bytes::from(json(id));
        ring.bytes += json.len() + ENTRY_OVERHEAD;
        ring.events.push_back(Stored { id, kind, json });
        while ring.events.len() > self.bounds.max_events
            || (ring.bytes > self.bounds.max_bytes && ring.events.len() > 1)
        {
            if let Some(old) = ring.events.pop_front() {
                ring.bytes -= old.json.len() + ENTRY_OVERHEAD;
            }
        }
        drop(ring);
        self.latest.send_replace(id);
        Some(id)
    }

    /// Publishes nothing more: readers finish with what the ring holds.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.latest.send_modify(|_| {});
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A receiver that changes whenever an event is published or the journal closes.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Where a reader that last saw `last_event_id` starts (`None`: it saw nothing of this
    /// run, so it starts at the run's first event, or at a gap if those are gone).
    pub(crate) fn start(&self, last_event_id: Option<u64>) -> Start {
        let newest = self.lock().next_id - 1;
        match last_event_id {
            None => Start {
                next: self.run_first,
                unknown: false,
            },
            Some(l) if l > newest => Start {
                next: self.run_first,
                unknown: true,
            },
            Some(l) => Start {
                next: l + 1,
                unknown: false,
            },
        }
    }

    /// Up to `max_events` events (and about `max_bytes`, at least one) from id `next` on, or
    /// the gap before them.
    pub(crate) fn read(&self, next: u64, max_events: usize, max_bytes: usize) -> Read {
        let ring = self.lock();
        let first = ring.events.front().map_or(ring.next_id, |e| e.id);
        if next < first {
            let reason = if next < self.run_first {
                GapReason::Restart
            } else {
                GapReason::Evicted
            };
            return Read::Gap {
                from: next,
                to: first - 1,
                reason,
            };
        }
        let start = (next - first) as usize;
        if start >= ring.events.len() {
            return Read::Nothing;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in ring.events.range(start..) {
            if out.len() >= max_events || (bytes > 0 && bytes + e.json.len() > max_bytes) {
                break;
            }
            bytes += e.json.len();
            out.push(e.clone());
        }
        Read::Events(out)
    }

    /// The oldest id still held (the next id to be published when the ring is empty).
    pub(crate) fn oldest(&self) -> u64 {
        let ring = self.lock();
        ring.events.front().map_or(ring.next_id, |e| e.id)
    }

    /// Returns once no event stream is open (at once if none is).
    pub(crate) async fn readers_gone(&self) {
        let mut rx = self.readers.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Events and bytes held.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (usize, usize) {
        let ring = self.lock();
        (ring.events.len(), ring.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(max_events: usize, max_bytes: usize) -> Journal {
        Journal::new(
            1001,
            Bounds {
                max_bytes,
                max_events,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_the_last_reader_by_notification() {
        let j = std::sync::Arc::new(journal(10, 1 << 20));
        // No reader: at once.
        let t = tokio::time::Instant::now();
        j.readers_gone().await;
        assert_eq!(t.elapsed(), std::time::Duration::ZERO);
        let a = ReaderGuard::new(j.clone());
        let b = ReaderGuard::new(j.clone());
        let waiter = tokio::spawn({
            let j = j.clone();
            async move {
                j.readers_gone().await;
                tokio::time::Instant::now()
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert!(!waiter.is_finished(), "one reader is still open");
        drop(b);
        let done = waiter.await.unwrap();
        assert_eq!(done - t, std::time::Duration::from_millis(700));
    }

    fn put(j: &Journal, n: usize) {
        for _ in 0..n {
            j.append("message", |id| format!("{{\"id\":{id}}}").into_bytes());
        }
    }

    fn ids(r: &Read) -> Vec<u64> {
        match r {
            Read::Events(v) => v.iter().map(|e| e.id).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn ids_are_dense_and_readers_resume_after_their_last_id() {
        let j = journal(100, 1 << 20);
        put(&j, 5);
        assert_eq!(
            ids(&j.read(1001, 100, 1 << 20)),
            [1001, 1002, 1003, 1004, 1005]
        );
        let s = j.start(Some(1003));
        assert_eq!(
            s,
            Start {
                next: 1004,
                unknown: false
            }
        );
        assert_eq!(ids(&j.read(s.next, 100, 1 << 20)), [1004, 1005]);
        assert_eq!(j.read(1006, 100, 1 << 20), Read::Nothing);
        // A batch stops at its event count and its byte budget (but holds at least one).
        assert_eq!(ids(&j.read(1001, 2, 1 << 20)), [1001, 1002]);
        assert_eq!(ids(&j.read(1001, 100, 1)), [1001]);
        // No Last-Event-ID: from the run's first event.
        assert_eq!(j.start(None).next, 1001);
    }

    #[test]
    fn a_full_ring_evicts_the_oldest_and_a_late_reader_gets_a_gap() {
        let j = journal(3, 1 << 20);
        put(&j, 10);
        assert_eq!(j.usage().0, 3);
        assert_eq!(j.oldest(), 1008);
        assert_eq!(
            j.read(1004, 100, 1 << 20),
            Read::Gap {
                from: 1004,
                to: 1007,
                reason: GapReason::Evicted
            }
        );
        assert_eq!(ids(&j.read(1008, 100, 1 << 20)), [1008, 1009, 1010]);
        // The byte bound too (each entry costs its JSON plus the overhead).
        let j = journal(1000, 3 * (ENTRY_OVERHEAD + 14));
        put(&j, 10);
        assert_eq!(j.usage().0, 3, "{:?}", j.usage());
        assert!(j.usage().1 <= 3 * (ENTRY_OVERHEAD + 14));
    }

    #[test]
    fn ids_from_an_earlier_run_or_from_nowhere_are_gaps() {
        let j = journal(100, 1 << 20);
        put(&j, 3);
        // An id of the previous run: everything after it up to this run's start is lost.
        let s = j.start(Some(500));
        assert_eq!(s.next, 501);
        assert_eq!(
            j.read(s.next, 100, 1 << 20),
            Read::Gap {
                from: 501,
                to: 1000,
                reason: GapReason::Restart
            }
        );
        // An id this server never issued: start over, and say so.
        assert_eq!(
            j.start(Some(5000)),
            Start {
                next: 1001,
                unknown: true
            }
        );
    }

    #[test]
    fn closing_stops_appends_and_wakes_watchers() {
        let j = journal(100, 1 << 20);
        let mut w = j.watch();
        put(&j, 1);
        assert!(w.has_changed().unwrap());
        w.borrow_and_update();
        j.close();
        assert!(w.has_changed().unwrap());
        assert!(j.is_closed());
        assert_eq!(j.append("message", |_| Vec::new()), None);
        assert_eq!(ids(&j.read(1001, 10, 1 << 20)), [1001]);
    }

    #[test]
    fn first_ids_grow_with_the_start_time_and_stay_exact_in_json() {
        let a = Journal::first_id_at(1_700_000_000_000);
        let b = Journal::first_id_at(1_700_000_000_001);
        assert!(b > a + 999);
        // Below 2^53 until the year 2255 (9e12 ms).
        assert!(Journal::first_id_at(9_000_000_000_000) < 1 << 53);
    }
}
