//! Presence registry: who is online, who is suspect, whose session is held, who left and why.
//!
//! A pure state machine in the sans-IO style: every method takes `now`, nothing reads the
//! clock, and the whole registry needs a single timer ([`Registry::poll_timeout`] /
//! [`Registry::handle_timeout`]) however many clients it tracks.
//!
//! ```text
//!   call (driver → registry)                       from                     to
//!   ─────────────────────────────────────────────  ───────────────────────  ────────────────────
//!   connected(id, conn, remote)                    new/Resuming/Offline     Online
//!   connected(id, conn2, remote)  → Some(conn)     Online/Suspect (conn)    Online (conn2); close
//!                                                                           conn with `Replaced`
//!   suspect(id, conn)                              Online                   Suspect
//!   recovered(id, conn)                            Suspect                  Online
//!   disconnected(id, conn, reason, silent_for,
//!                hold_until = Some(t), t > now)    Online/Suspect           Resuming { until: t }
//!   disconnected(…, hold_until = None)             Online/Suspect           Offline { reason, … }
//!   handle_timeout(now ≥ until)                    Resuming                 Offline
//!   handle_timeout(now ≥ offline + retention),
//!   or more than max_offline Offline entries       Offline (oldest)         forgotten
//! ```
//!
//! The driver calls in only on connection events (connect, the liveness engine's suspect and
//! recovered events, disconnect) — never per message, so a server with many thousands of
//! clients takes the registry's lock rarely. Per-message figures (messages, bytes, last seen,
//! RTT) live in the driver's per-connection counters.
//!
//! Every call that names a connection carries its connection id. A client that reconnects
//! gets a new id; calls that still name the replaced connection (its late `disconnected`, a
//! stale `suspect`) are ignored, so a replacement never flaps the client to `Offline`.
//!
//! Memory is bounded: one entry per client id (a 48-byte slot in a slab, and the id with the
//! slot's place in a B-tree: ~80 B a client connected once, ~96 B while slots were 64 B, 139
//! B while the B-tree held the slots; a client that reconnected, left or kept counters has
//! an 80 B box more); `Offline` entries are forgotten after
//! `offline_retention`, and at most `max_offline` of them are kept (the oldest go first).
//! The change queue grows until the driver drains it with [`Registry::poll_change`].

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::addr::PackedAddr;
use crate::conn::ConnStats;
use crate::offset::{instant, offset};
use crate::reason::DisconnectReason;

/// Settings for [`Registry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// How long an `Offline` entry is kept (for status pages and queries) before it is
    /// forgotten. Default: 10 minutes.
    pub offline_retention: Duration,
    /// At most this many `Offline` entries are kept; beyond it the oldest is forgotten first.
    /// Default: 10,000.
    pub max_offline: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            offline_retention: Duration::from_secs(600),
            max_offline: 10_000,
        }
    }
}

/// The presence state of one client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceState {
    /// Connected, and its peer has been heard from recently.
    Online,
    /// Connected, but silent for longer than a heartbeat plus margin; not yet declared dead.
    Suspect,
    /// The connection ended but the session is held for a reconnect until `until`.
    Resuming {
        /// Why the connection ended.
        reason: DisconnectReason,
        /// When the connection ended.
        at: Instant,
        /// How long the peer had been silent when the connection ended.
        silent_for: Duration,
        /// When the hold ends and the client becomes `Offline`.
        until: Instant,
    },
    /// Gone.
    Offline {
        /// Why the connection ended.
        reason: DisconnectReason,
        /// When the connection ended (for a client that was `Resuming` first: when its
        /// connection ended, not when the hold ran out; see [`Entry::changed_at`] for that).
        at: Instant,
        /// How long the peer had been silent when the connection ended.
        silent_for: Duration,
    },
}

impl PresenceState {
    /// The state without its data.
    pub fn kind(&self) -> PresenceKind {
        match self {
            PresenceState::Online => PresenceKind::Online,
            PresenceState::Suspect => PresenceKind::Suspect,
            PresenceState::Resuming { .. } => PresenceKind::Resuming,
            PresenceState::Offline { .. } => PresenceKind::Offline,
        }
    }

    /// True for `Online` and `Suspect`: a connection is open.
    pub fn is_connected(&self) -> bool {
        matches!(self, PresenceState::Online | PresenceState::Suspect)
    }
}

/// The kind of a [`PresenceState`], for counting, metrics labels and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PresenceKind {
    /// See [`PresenceState::Online`].
    Online,
    /// See [`PresenceState::Suspect`].
    Suspect,
    /// See [`PresenceState::Resuming`].
    Resuming,
    /// See [`PresenceState::Offline`].
    Offline,
}

impl PresenceKind {
    /// Every kind, in a fixed order (for metrics that must list every state).
    pub const ALL: [PresenceKind; 4] = [
        PresenceKind::Online,
        PresenceKind::Suspect,
        PresenceKind::Resuming,
        PresenceKind::Offline,
    ];

    /// A stable lowercase label: `"online"`, `"suspect"`, `"resuming"`, `"offline"`.
    pub fn label(self) -> &'static str {
        match self {
            PresenceKind::Online => "online",
            PresenceKind::Suspect => "suspect",
            PresenceKind::Resuming => "resuming",
            PresenceKind::Offline => "offline",
        }
    }
}

/// How many entries are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceCounts {
    /// Entries in `Online`.
    pub online: usize,
    /// Entries in `Suspect`.
    pub suspect: usize,
    /// Entries in `Resuming`.
    pub resuming: usize,
    /// Entries in `Offline` (not yet forgotten).
    pub offline: usize,
}

impl PresenceCounts {
    /// The count for `kind`.
    pub fn get(&self, kind: PresenceKind) -> usize {
        match kind {
            PresenceKind::Online => self.online,
            PresenceKind::Suspect => self.suspect,
            PresenceKind::Resuming => self.resuming,
            PresenceKind::Offline => self.offline,
        }
    }

    /// A mutable reference to the count for `kind`.
    pub fn get_mut(&mut self, kind: PresenceKind) -> &mut usize {
        match kind {
            PresenceKind::Online => &mut self.online,
            PresenceKind::Suspect => &mut self.suspect,
            PresenceKind::Resuming => &mut self.resuming,
            PresenceKind::Offline => &mut self.offline,
        }
    }

    /// The sum over all states.
    pub fn total(&self) -> usize {
        self.online + self.suspect + self.resuming + self.offline
    }
}

/// What the registry knows about one client id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The current state.
    pub state: PresenceState,
    /// The id of the current connection (or of the last one, when none is open).
    pub conn_id: u64,
    /// The remote address of that connection.
    pub remote: SocketAddr,
    /// When that connection was registered.
    pub connected_since: Instant,
    /// When the state last changed (a replacement counts as a change).
    pub changed_at: Instant,
    /// Connections registered for this id since the entry was created.
    pub connects: u64,
    /// Connections of this id that ended (including replaced ones).
    pub disconnects: u64,
    /// Counters of the last connection that ended (see [`Registry::record_counters`]), so a
    /// client that is not connected still shows what its last connection did.
    pub last_counters: Option<ConnStats>,
}

/// A state change, queued for the driver to publish (see [`Registry::poll_change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The client id.
    pub id: String,
    /// The connection id the new state refers to.
    pub conn_id: u64,
    /// The previous state; `None` when the id was not known before.
    pub from: Option<PresenceState>,
    /// The new state. A replacement is reported as `Online` (or `Suspect`) → `Online` with the
    /// new connection id.
    pub to: PresenceState,
    /// When the change happened.
    pub at: Instant,
}

/// The index of `k` in [`Registry::by_kind`]: `None` for `Online`, which has none.
fn kind_index(k: PresenceKind) -> Option<usize> {
    match k {
        PresenceKind::Online => None,
        PresenceKind::Suspect => Some(0),
        PresenceKind::Resuming => Some(1),
        PresenceKind::Offline => Some(2),
    }
}

/// Capacity the change queue keeps once drained; a burst beyond it is given back.
const CHANGES_KEPT_CAPACITY: usize = 1024;

/// How a [`Registry`] keeps its ids: shared (one allocation per id, cloned into its
/// indexes), ordered and looked up as `str`. `Arc<str>` by default; a caller that keeps the
/// ids in tables of its own can key the registry with its own kind (`tether`'s server keeps
/// a thin one: 8 bytes a reference, one allocation shared with its client table).
pub trait Id: Clone + Ord + Borrow<str> + for<'a> From<&'a str> {}

impl<K: Clone + Ord + Borrow<str> + for<'a> From<&'a str>> Id for K {}

/// The presence registry (see the module docs).
#[derive(Debug)]
pub struct Registry<K = Arc<str>> {
    cfg: RegistryConfig,
    /// In id order: a page of clients is a range, not a sort of all of them.
    ///
    /// The ids are keys ([`Id`]), one allocation per id shared with `by_kind`, the hold and
    /// offline indexes and — through [`connected_shared`](Self::connected_shared) — with the
    /// caller (a server's client table): a million connected clients keep one copy of each id.
    /// Each maps to its slot's place in `slots` (4 bytes in the B-tree's nodes, not 64: see
    /// [`Slots`]).
    entries: BTreeMap<K, u32>,
    slots: Slots,
    /// Ids per state other than `Online` (`Suspect`, `Resuming`, `Offline`), in id order: a
    /// page of the clients in one of them is a range too. Changed only on transitions.
    /// `Online`, the state of nearly every client of a busy server, has no set (issue 17: it
    /// cost 36 bytes per connected client): its page walks `entries` and passes over the
    /// others, of which there are few (`Offline` ones at most `max_offline`).
    by_kind: [BTreeSet<K>; 3],
    /// `Resuming` entries by (hold end, sequence).
    holds: BTreeMap<(Instant, u64), K>,
    /// `Offline` entries by (time they became offline, sequence): oldest first.
    offline: BTreeMap<(Instant, u64), K>,
    counts: PresenceCounts,
    changes: VecDeque<PresenceChange>,
    next_seq: u64,
    /// The origin of the slots' instants: the first `now` the registry was given (an entry
    /// exists only once one was).
    epoch: Option<Instant>,
}

/// Bytes the registry keeps per client id in its slab (issue 17; its id map's B-tree
/// entry — the id and a 4-byte place, ~23 B a client in nodes filled in id order — and the
/// id's one allocation come on top).
pub const SLOT_SIZE: usize = std::mem::size_of::<Option<Slot>>();

/// What the registry keeps per client id: an [`Entry`] in compact form (issue 17: one per
/// connected client). A connected client's state is a flag; what a client on its first
/// connection does not have — the data of `Resuming` and `Offline` (reason, instants, the
/// timer's key), the last connection's counters, and connection counts other than one
/// connect and no disconnect — is in one box ([`Past`]), absent while it has none. Its two
/// instants are signed nanoseconds from the registry's epoch (exact, ±292 years: 8 bytes
/// each instead of 16), its remote address and suspect flag 16 bytes (IPv6 boxed): 48 bytes
/// instead of 112, in the registry's slab ([`Slots`]: 48 B a place, at most an eighth of
/// the places empty). (64 B while the counts were in the slot and the ended state and the
/// counters in a box each.)
#[derive(Debug)]
struct Slot {
    conn_id: u64,
    /// The remote address; its flag is "connected and `Suspect`" (not `Online`).
    remote: PackedAddr,
    connected_since: i64,
    changed_at: i64,
    /// `None`: one connect, no disconnect, connected, no counters kept ([`Past::FRESH`]).
    past: Option<Box<Past>>,
}

/// What a slot keeps once its client did more than connect once: 72 B, an 80 B chunk (a
/// client that reconnected and kept its last counters used a 64 B chunk for them and 16 B
/// more in its slot).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Past {
    /// `Resuming` or `Offline` (`None`: connected).
    ended: Option<Box<Ended>>,
    last_counters: Option<ConnStats>,
    /// Connections registered (32-bit, saturating).
    connects: u32,
    /// Connections that ended, replaced ones included (32-bit, saturating).
    disconnects: u32,
}

impl Past {
    /// What a slot without a box holds.
    const FRESH: Past = Past {
        ended: None,
        last_counters: None,
        connects: 1,
        disconnects: 0,
    };
}

/// Places a slab keeps however few slots it holds, and the least it grows by.
const SLOTS_KEPT: usize = 64;

/// The registry's slots, by place (issue 17). The id map's B-tree nodes hold a 4-byte place
/// instead of the slot (64 B then, 48 B now): its leaves (eleven places, about six used when
/// ids come in order, as a fleet's sequential ids do) shrink from 808 B to 144 B, and the slots
/// themselves sit in one array with no node slack. The array grows by an eighth, not by
/// doubling (at most an eighth of it empty); a forgotten slot's place goes to the next new
/// one, and once more than half the places are free the registry moves the slots together
/// ([`Registry::compact`]), so a registry that shrank gives its memory back as the B-tree
/// did.
#[derive(Debug, Default)]
struct Slots {
    /// `None`: a free place (its number is in `free`).
    all: Vec<Option<Slot>>,
    free: Vec<u32>,
}

impl Slots {
    /// An empty slab with room for `n` slots and an eighth more.
    fn with_room(n: usize) -> Self {
        Slots {
            all: Vec::with_capacity((n + n / 8).max(SLOTS_KEPT)),
            free: Vec::new(),
        }
    }

    /// Keeps `s` and answers its place.
    fn insert(&mut self, s: Slot) -> u32 {
        if let Some(i) = self.free.pop() {
            self.all[i as usize] = Some(s);
            return i;
        }
        let len = self.all.len();
        if len == self.all.capacity() {
            self.all.reserve_exact((len / 8).max(SLOTS_KEPT));
        }
        // A place per client id known (48 B each): 2^32 of them would be 192 GiB.
        let i = u32::try_from(len).expect("fewer than 2^32 client ids");
        self.all.push(Some(s));
        i
    }

    /// The slot at place `i`, taken out (the place is not reused: the slab is rebuilt).
    fn take(&mut self, i: u32) -> Slot {
        self.all
            .get_mut(i as usize)
            .and_then(Option::take)
            // Every place the id map names holds a slot: it is freed with its id.
            .expect("an id's place holds its slot")
    }

    /// Frees place `i`.
    fn remove(&mut self, i: u32) {
        if self
            .all
            .get_mut(i as usize)
            .and_then(Option::take)
            .is_some()
        {
            self.free.push(i);
        }
    }

    fn get(&self, i: u32) -> &Slot {
        self.all
            .get(i as usize)
            .and_then(Option::as_ref)
            // Every place the id map names holds a slot: it is freed with its id.
            .expect("an id's place holds its slot")
    }

    fn get_mut(&mut self, i: u32) -> &mut Slot {
        self.all
            .get_mut(i as usize)
            .and_then(Option::as_mut)
            // Every place the id map names holds a slot: it is freed with its id.
            .expect("an id's place holds its slot")
    }

    /// More than half the places are free (and more than a few): time to compact.
    fn sparse(&self) -> bool {
        self.free.len() > SLOTS_KEPT && self.free.len() > self.all.len() / 2
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ended {
    /// `Resuming { .. }` or `Offline { .. }`.
    state: PresenceState,
    /// The key of this entry in `holds` (when Resuming) or `offline` (when Offline).
    timer: Option<(Instant, u64)>,
}

impl Slot {
    fn new(
        state: PresenceState,
        conn_id: u64,
        remote: SocketAddr,
        now: i64,
        connects: u32,
    ) -> Self {
        let mut s = Slot {
            conn_id,
            remote: PackedAddr::new(remote),
            connected_since: now,
            changed_at: now,
            past: None,
        };
        if connects != Past::FRESH.connects {
            s.past_mut().connects = connects;
        }
        s.set_state(state);
        s
    }

    /// What the slot's box holds (the fresh values without one).
    fn past(&self) -> &Past {
        self.past.as_deref().unwrap_or(&Past::FRESH)
    }

    /// The slot's box, made when absent; [`tidy`](Self::tidy) drops it again once it holds
    /// only the fresh values.
    fn past_mut(&mut self) -> &mut Past {
        self.past.get_or_insert_with(|| Box::new(Past::FRESH))
    }

    /// Drops a box that holds only what its absence means.
    fn tidy(&mut self) {
        if self.past.as_deref() == Some(&Past::FRESH) {
            self.past = None;
        }
    }

    fn ended(&self) -> Option<&Ended> {
        self.past.as_ref()?.ended.as_deref()
    }

    fn ended_mut(&mut self) -> Option<&mut Ended> {
        self.past.as_mut()?.ended.as_deref_mut()
    }

    fn count_connect(&mut self) {
        let p = self.past_mut();
        p.connects = p.connects.saturating_add(1);
        self.tidy();
    }

    fn count_disconnect(&mut self) {
        let p = self.past_mut();
        p.disconnects = p.disconnects.saturating_add(1);
    }

    fn state(&self) -> PresenceState {
        match (self.ended(), self.remote.flag()) {
            (Some(e), _) => e.state.clone(),
            (None, true) => PresenceState::Suspect,
            (None, false) => PresenceState::Online,
        }
    }

    fn kind(&self) -> PresenceKind {
        match (self.ended(), self.remote.flag()) {
            (Some(e), _) => e.state.kind(),
            (None, true) => PresenceKind::Suspect,
            (None, false) => PresenceKind::Online,
        }
    }

    fn is_connected(&self) -> bool {
        self.ended().is_none()
    }

    /// Replaces the state (the timer's key goes with an ended state) and returns the old one.
    fn set_state(&mut self, to: PresenceState) -> PresenceState {
        let from = self.state();
        match to {
            PresenceState::Online | PresenceState::Suspect => {
                self.remote.set_flag(to == PresenceState::Suspect);
                if let Some(p) = self.past.as_mut() {
                    p.ended = None;
                }
                self.tidy();
            }
            state => {
                self.remote.set_flag(false);
                self.past_mut().ended = Some(Box::new(Ended { state, timer: None }));
            }
        }
        from
    }

    fn timer(&self) -> Option<(Instant, u64)> {
        self.ended().and_then(|e| e.timer)
    }

    fn take_timer(&mut self) -> Option<(Instant, u64)> {
        self.ended_mut().and_then(|e| e.timer.take())
    }

    /// Sets the timer's key of an ended state (a connected state has none).
    fn set_timer(&mut self, key: (Instant, u64)) {
        if let Some(e) = self.ended_mut() {
            e.timer = Some(key);
        }
    }

    fn entry(&self, epoch: Instant) -> Entry {
        Entry {
            state: self.state(),
            conn_id: self.conn_id,
            remote: self.remote.get(),
            connected_since: instant(epoch, self.connected_since),
            changed_at: instant(epoch, self.changed_at),
            connects: self.past().connects.into(),
            disconnects: self.past().disconnects.into(),
            last_counters: self.past().last_counters,
        }
    }
}

impl Registry {
    /// An empty registry, keyed by `Arc<str>`.
    pub fn new(cfg: RegistryConfig) -> Self {
        Self::keyed(cfg)
    }
}

impl<K: Id> Registry<K> {
    /// An empty registry whose ids are kept as `K`.
    pub fn keyed(cfg: RegistryConfig) -> Self {
        Registry {
            cfg,
            entries: BTreeMap::new(),
            slots: Slots::default(),
            by_kind: Default::default(),
            holds: BTreeMap::new(),
            offline: BTreeMap::new(),
            counts: PresenceCounts::default(),
            changes: VecDeque::new(),
            next_seq: 0,
            epoch: None,
        }
    }

    /// `t` for a slot: nanoseconds after the registry's epoch (the first `t` it stamps).
    fn stamp(&mut self, t: Instant) -> i64 {
        offset(*self.epoch.get_or_insert(t), t)
    }

    /// The epoch the slots' instants count from.
    fn epoch(&self) -> Instant {
        // Every slot was made with `stamp`, which sets the epoch: with an entry to read, it
        // is set. (Without one nothing calls this.)
        self.epoch.expect("an entry exists only after a stamp")
    }

    /// A connection `conn_id` for client `id` from `remote` completed its handshake.
    ///
    /// The client becomes `Online`. Returns the id of the connection this one replaces, if
    /// the client had one open: the driver closes that one with
    /// [`DisconnectReason::Replaced`]; its late [`disconnected`](Self::disconnected) is ignored.
    pub fn connected(
        &mut self,
        now: Instant,
        id: &str,
        conn_id: u64,
        remote: SocketAddr,
    ) -> Option<u64> {
        self.connect(now, id, || K::from(id), conn_id, remote)
    }

    /// [`connected`](Self::connected) with the id as the caller keeps it: a new entry
    /// shares that allocation instead of copying the id.
    pub fn connected_shared(
        &mut self,
        now: Instant,
        id: &K,
        conn_id: u64,
        remote: SocketAddr,
    ) -> Option<u64> {
        self.connect(now, id.borrow(), || id.clone(), conn_id, remote)
    }

    fn connect(
        &mut self,
        now: Instant,
        id: &str,
        key: impl FnOnce() -> K,
        conn_id: u64,
        remote: SocketAddr,
    ) -> Option<u64> {
        let at = self.stamp(now);
        let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) else {
            let key = key();
            let slot = Slot::new(PresenceState::Online, conn_id, remote, at, 1);
            let i = self.slots.insert(slot);
            self.entries.insert(key, i);
            self.counts.online += 1;
            self.changes.push_back(PresenceChange {
                id: id.to_owned(),
                conn_id,
                from: None,
                to: PresenceState::Online,
                at: now,
            });
            return None;
        };

        if slot.is_connected() && slot.conn_id == conn_id {
            return None; // the same connection registered twice: nothing changes
        }
        let replaced = slot.is_connected().then_some(slot.conn_id);
        if replaced.is_some() {
            slot.count_disconnect();
        }
        let resuming = slot.kind() == PresenceKind::Resuming;
        match slot.take_timer() {
            Some(key) if resuming => {
                self.holds.remove(&key);
            }
            Some(key) => {
                self.offline.remove(&key);
            }
            None => {}
        }
        slot.conn_id = conn_id;
        slot.remote.set(remote);
        slot.connected_since = at;
        slot.changed_at = at;
        let from = slot.set_state(PresenceState::Online);
        slot.count_connect();
        *self.counts.get_mut(from.kind()) -= 1;
        self.counts.online += 1;
        self.reindex(id, from.kind(), PresenceKind::Online);
        self.changes.push_back(PresenceChange {
            id: id.to_owned(),
            conn_id,
            from: Some(from),
            to: PresenceState::Online,
            at: now,
        });
        replaced
    }

    /// The liveness engine of connection `conn_id` reports its peer silent past a heartbeat
    /// plus margin: `Online` → `Suspect`. Returns whether anything changed (false for an
    /// unknown id, a connection that is not the current one, or a client not `Online`).
    pub fn suspect(&mut self, now: Instant, id: &str, conn_id: u64) -> bool {
        self.flip(
            now,
            id,
            conn_id,
            PresenceKind::Online,
            PresenceState::Suspect,
        )
    }

    /// The peer of connection `conn_id` was heard from again: `Suspect` → `Online`. Returns
    /// whether anything changed.
    pub fn recovered(&mut self, now: Instant, id: &str, conn_id: u64) -> bool {
        self.flip(
            now,
            id,
            conn_id,
            PresenceKind::Suspect,
            PresenceState::Online,
        )
    }

    fn flip(
        &mut self,
        now: Instant,
        id: &str,
        conn_id: u64,
        from: PresenceKind,
        to: PresenceState,
    ) -> bool {
        let at = self.stamp(now);
        let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) else {
            return false;
        };
        if slot.conn_id != conn_id || slot.kind() != from {
            return false;
        }
        *self.counts.get_mut(from) -= 1;
        *self.counts.get_mut(to.kind()) += 1;
        slot.changed_at = at;
        let old = slot.set_state(to.clone());
        self.reindex(id, from, to.kind());
        self.changes.push_back(PresenceChange {
            id: id.to_owned(),
            conn_id,
            from: Some(old),
            to,
            at: now,
        });
        true
    }

    /// Connection `conn_id` of client `id` ended with `reason` after its peer had been silent
    /// for `silent_for`.
    ///
    /// With `hold_until = Some(t)` and `t > now`, the session is held for a reconnect: the
    /// client is `Resuming` until `t`, then `Offline` (unless it connects again first).
    /// Otherwise it is `Offline` at once. Ignored (returns false) when `conn_id` is not the
    /// client's current connection — for example a connection that was replaced — or the
    /// client is not connected.
    pub fn disconnected(
        &mut self,
        now: Instant,
        id: &str,
        conn_id: u64,
        reason: DisconnectReason,
        silent_for: Duration,
        hold_until: Option<Instant>,
    ) -> bool {
        let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) else {
            return false;
        };
        if slot.conn_id != conn_id || !slot.is_connected() {
            return false;
        }
        slot.count_disconnect();
        match hold_until {
            Some(until) if until > now => {
                self.set_state(
                    now,
                    id,
                    PresenceState::Resuming {
                        reason,
                        at: now,
                        silent_for,
                        until,
                    },
                );
                self.add_hold(id, until);
            }
            _ => {
                self.set_state(
                    now,
                    id,
                    PresenceState::Offline {
                        reason,
                        at: now,
                        silent_for,
                    },
                );
                self.add_offline(now, id);
            }
        }
        true
    }

    /// A session of client `id` that is not connected here is held for a reconnect until
    /// `until` (a session handed over by another server): the client is `Resuming`, from
    /// nothing or from `Offline`. Ignored (returns false) when the client is connected or
    /// already resuming here, or `until` is not after `now`.
    pub fn held(
        &mut self,
        now: Instant,
        id: &str,
        remote: SocketAddr,
        reason: DisconnectReason,
        until: Instant,
    ) -> bool {
        if until <= now {
            return false;
        }
        let state = PresenceState::Resuming {
            reason,
            at: now,
            silent_for: Duration::ZERO,
            until,
        };
        match self.entries.get(id).map(|&i| self.slots.get_mut(i)) {
            Some(slot) => {
                if slot.kind() != PresenceKind::Offline {
                    return false;
                }
                if let Some(key) = slot.take_timer() {
                    self.offline.remove(&key);
                }
                slot.remote.set(remote);
                self.set_state(now, id, state);
            }
            None => {
                let key = K::from(id);
                let at = self.stamp(now);
                let i = self
                    .slots
                    .insert(Slot::new(state.clone(), 0, remote, at, 0));
                self.entries.insert(key.clone(), i);
                self.counts.resuming += 1;
                self.index(PresenceKind::Resuming, key);
                self.changes.push_back(PresenceChange {
                    id: id.to_owned(),
                    conn_id: 0,
                    from: None,
                    to: state,
                    at: now,
                });
            }
        }
        self.add_hold(id, until);
        true
    }

    /// The hold of `id`'s session ends early (the session moved to another server): the
    /// client is `Offline` with `reason` at once. Ignored (returns false) unless it is
    /// `Resuming`.
    pub fn end_hold(&mut self, now: Instant, id: &str, reason: DisconnectReason) -> bool {
        let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) else {
            return false;
        };
        let Some(PresenceState::Resuming { at, silent_for, .. }) = slot.ended().map(|e| &e.state)
        else {
            return false;
        };
        let (at, silent_for) = (*at, *silent_for);
        if let Some(key) = slot.take_timer() {
            self.holds.remove(&key);
        }
        self.set_state(
            now,
            id,
            PresenceState::Offline {
                reason,
                at,
                silent_for,
            },
        );
        self.add_offline(now, id);
        true
    }

    /// Keeps the counters of connection `conn_id` of client `id`, which ended, for display
    /// while the client is not connected. Ignored (returns false) for an unknown id or a
    /// connection that is not the client's current or last one (a replaced connection).
    pub fn record_counters(&mut self, id: &str, conn_id: u64, counters: ConnStats) -> bool {
        match self.entries.get(id).map(|&i| self.slots.get_mut(i)) {
            Some(slot) if slot.conn_id == conn_id => {
                slot.past_mut().last_counters = Some(counters);
                true
            }
            _ => false,
        }
    }

    /// Sets the state of an existing entry, keeps the counts, queues the change.
    fn set_state(&mut self, now: Instant, id: &str, to: PresenceState) {
        let at = self.stamp(now);
        let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) else {
            return;
        };
        let kind = slot.kind();
        *self.counts.get_mut(kind) -= 1;
        *self.counts.get_mut(to.kind()) += 1;
        slot.changed_at = at;
        let from = slot.set_state(to.clone());
        let conn_id = slot.conn_id;
        self.reindex(id, from.kind(), to.kind());
        self.changes.push_back(PresenceChange {
            id: id.to_owned(),
            conn_id,
            from: Some(from),
            to,
            at: now,
        });
    }

    /// The key under which an id is indexed (the entry's own allocation).
    fn key_of(&self, id: &str) -> K {
        self.entries
            .get_key_value(id)
            .map_or_else(|| K::from(id), |(k, _)| k.clone())
    }

    /// Arms the hold of `id` (already `Resuming`) until `until`.
    fn add_hold(&mut self, id: &str, until: Instant) {
        self.next_seq += 1;
        let key = (until, self.next_seq);
        let name = self.key_of(id);
        if let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) {
            slot.set_timer(key);
            self.holds.insert(key, name);
        }
    }

    /// Records that `id` (already in state `Offline`) became offline at `now`, and enforces
    /// `max_offline`.
    fn add_offline(&mut self, now: Instant, id: &str) {
        self.next_seq += 1;
        let key = (now, self.next_seq);
        let name = self.key_of(id);
        if let Some(slot) = self.entries.get(id).map(|&i| self.slots.get_mut(i)) {
            slot.set_timer(key);
            self.offline.insert(key, name);
        }
        while self.offline.len() > self.cfg.max_offline {
            let Some((key, oldest)) = self.offline.pop_first() else {
                break;
            };
            self.forget(key, oldest.borrow());
        }
    }

    /// Removes the `Offline` entry `id` whose key `key` has just been taken out of `offline`.
    fn forget(&mut self, key: (Instant, u64), id: &str) {
        let slot = self.entries.get(id).map(|&i| (i, self.slots.get(i)));
        if let Some((i, _)) = slot.filter(|(_, s)| s.timer() == Some(key)) {
            self.entries.remove(id);
            self.slots.remove(i);
            if self.slots.sparse() {
                self.compact();
            }
            self.counts.offline -= 1;
            self.unindex(PresenceKind::Offline, id);
        }
    }

    /// Moves the live slots together, in id order, and points the ids at their new places
    /// (see [`Slots::sparse`]): O(n), once the slab is more than half free places.
    fn compact(&mut self) {
        let mut slots = Slots::with_room(self.entries.len());
        for i in self.entries.values_mut() {
            *i = slots.insert(self.slots.take(*i));
        }
        self.slots = slots;
    }

    /// The next instant at which [`handle_timeout`](Self::handle_timeout) has work: the
    /// earliest end of a hold or of an offline retention. `None` when there is none.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hold = self.holds.first_key_value().map(|(k, _)| k.0);
        let retention = self
            .offline
            .first_key_value()
            .and_then(|(k, _)| k.0.checked_add(self.cfg.offline_retention));
        match (hold, retention) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Applies every deadline that is due at `now`: holds that ended make their clients
    /// `Offline` (`until <= now`), and `Offline` entries older than `offline_retention` are
    /// forgotten. Calling it early or twice is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.holds.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (key, id) = entry.remove_entry();
            let Some(slot) = self
                .entries
                .get(id.borrow())
                .map(|&i| self.slots.get_mut(i))
            else {
                continue;
            };
            if slot.timer() != Some(key) {
                continue;
            }
            slot.take_timer();
            let Some(PresenceState::Resuming {
                reason,
                at,
                silent_for,
                ..
            }) = slot.ended().map(|e| e.state.clone())
            else {
                continue;
            };
            self.set_state(
                now,
                id.borrow(),
                PresenceState::Offline {
                    reason,
                    at,
                    silent_for,
                },
            );
            self.add_offline(now, id.borrow());
        }
        while let Some(entry) = self.offline.first_entry() {
            match entry.key().0.checked_add(self.cfg.offline_retention) {
                Some(expiry) if expiry <= now => {
                    let (key, id) = entry.remove_entry();
                    self.forget(key, id.borrow());
                }
                _ => break,
            }
        }
    }

    /// The next queued state change, oldest first. The driver drains this after each call
    /// that may change state and publishes the changes to its subscribers.
    pub fn poll_change(&mut self) -> Option<PresenceChange> {
        let change = self.changes.pop_front();
        if change.is_none() && self.changes.capacity() > CHANGES_KEPT_CAPACITY {
            // A burst (thousands connecting at once) grew the queue; give the memory back.
            self.changes.shrink_to(CHANGES_KEPT_CAPACITY);
        }
        change
    }

    /// What the registry knows about client `id` (built from its compact record).
    pub fn get(&self, id: &str) -> Option<Entry> {
        self.entries
            .get(id)
            .map(|&i| self.slots.get(i).entry(self.epoch()))
    }

    /// The state of client `id`, if known (cheaper than [`get`](Self::get)).
    pub fn state(&self, id: &str) -> Option<PresenceState> {
        self.entries.get(id).map(|&i| self.slots.get(i).state())
    }

    /// Moves `id` from the `from` index to the `to` index.
    fn reindex(&mut self, id: &str, from: PresenceKind, to: PresenceKind) {
        if from != to {
            self.unindex(from, id);
            if kind_index(to).is_some() {
                let key = self.key_of(id);
                self.index(to, key);
            }
        }
    }

    /// Adds `id` to the set of state `k` (none for `Online`).
    fn index(&mut self, k: PresenceKind, id: K) {
        if let Some(i) = kind_index(k) {
            self.by_kind[i].insert(id);
        }
    }

    /// Takes `id` out of the set of state `k`.
    fn unindex(&mut self, k: PresenceKind, id: &str) {
        if let Some(i) = kind_index(k) {
            self.by_kind[i].remove(id);
        }
    }

    /// One page of entries in id order: at most `limit` entries whose id comes after
    /// `after` (all of them without it), only those in state `kind` when given. The bool
    /// says whether more follow. Costs O(log n + limit), however many clients there are;
    /// a page of `Online` ones also passes over the clients in other states in its range
    /// (few: `Online` has no index of its own, see `by_kind`).
    pub fn page(
        &self,
        kind: Option<PresenceKind>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(&str, Entry)>, bool) {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let range = (from, Bound::Unbounded);
        let mut ids: Box<dyn Iterator<Item = (&str, &Slot)> + '_> =
            match kind.map(|k| (k, kind_index(k))) {
                Some((_, Some(i))) => {
                    Box::new(self.by_kind[i].range::<str, _>(range).filter_map(|id| {
                        let s = self.entries.get(id.borrow())?;
                        Some((id.borrow(), self.slots.get(*s)))
                    }))
                }
                Some((k, None)) => Box::new(
                    self.entries
                        .range::<str, _>(range)
                        .map(|(id, &i)| (id.borrow(), self.slots.get(i)))
                        .filter(move |(_, s)| s.kind() == k),
                ),
                None => Box::new(
                    self.entries
                        .range::<str, _>(range)
                        .map(|(id, &i)| (id.borrow(), self.slots.get(i))),
                ),
            };
        let mut out = Vec::with_capacity(limit.min(1024));
        for (id, slot) in ids.by_ref().take(limit) {
            out.push((id, slot.entry(self.epoch())));
        }
        let more = ids.next().is_some();
        (out, more)
    }

    /// Every entry, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Entry)> + '_ {
        self.entries
            .iter()
            .map(|(id, &i)| (id.borrow(), self.slots.get(i).entry(self.epoch())))
    }

    /// How many entries are in each state.
    pub fn counts(&self) -> PresenceCounts {
        self.counts
    }

    /// How many client ids the registry knows (in any state).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the registry knows no client.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The settings this registry was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client on its first connection keeps no box (issue 17: 48 B a slot); reconnects,
    /// ends, counters and held sessions keep theirs in it, and a held session taken up by
    /// its client's first connection drops it again.
    #[test]
    fn a_slot_boxes_only_what_a_first_connection_lacks() {
        let mut r = Registry::new(RegistryConfig::default());
        #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
        let t0 = Instant::now();
        let t = |ms: u64| t0 + Duration::from_millis(ms);
        let remote: SocketAddr = "192.0.2.1:5000".parse().expect("an address");
        let boxed = |r: &Registry, id: &str| r.slots.get(r.entries[id]).past.is_some();
        let counters = ConnStats {
            messages_in: 3,
            messages_out: 4,
            bytes_in: 5,
            bytes_out: 6,
            heartbeats_in: 7,
            heartbeats_out: u64::from(u32::MAX) + 9,
        };

        assert_eq!(r.connected(t(0), "a", 1, remote), None);
        assert!(r.suspect(t(1), "a", 1));
        assert!(r.recovered(t(2), "a", 1));
        assert!(!boxed(&r, "a"));
        let e = r.get("a").expect("known");
        assert_eq!((e.connects, e.disconnects, e.last_counters), (1, 0, None));
        assert_eq!((e.connected_since, e.changed_at), (t(0), t(2)));

        // Counters and an end go in the box; they survive a reconnect with the counts.
        assert!(r.record_counters("a", 1, counters));
        assert!(boxed(&r, "a"));
        assert!(r.disconnected(
            t(3),
            "a",
            1,
            DisconnectReason::HeartbeatTimeout,
            Duration::from_millis(2),
            Some(t(10))
        ));
        assert_eq!(
            r.state("a"),
            Some(PresenceState::Resuming {
                reason: DisconnectReason::HeartbeatTimeout,
                at: t(3),
                silent_for: Duration::from_millis(2),
                until: t(10),
            })
        );
        assert_eq!(r.connected(t(4), "a", 2, remote), None);
        let e = r.get("a").expect("known");
        assert_eq!(e.state, PresenceState::Online);
        assert_eq!((e.connects, e.disconnects), (2, 1));
        assert_eq!(e.last_counters, Some(counters));
        assert_eq!((e.connected_since, e.changed_at), (t(4), t(4)));
        assert!(boxed(&r, "a"));
        assert_eq!(r.poll_timeout(), None, "the hold's timer went with it");

        // A replacement counts in the box too (no counters kept for the replaced one).
        assert_eq!(r.connected(t(0), "b", 3, remote), None);
        assert_eq!(r.connected(t(5), "b", 4, remote), Some(3));
        let e = r.get("b").expect("known");
        assert_eq!((e.connects, e.disconnects, e.last_counters), (2, 1, None));
        assert!(boxed(&r, "b"));

        // A session held here from nothing (0 connects), then taken up: fresh again.
        assert!(r.held(t(6), "c", remote, DisconnectReason::Replaced, t(20)));
        assert!(boxed(&r, "c"));
        assert_eq!(
            r.get("c").map(|e| (e.connects, e.disconnects)),
            Some((0, 0))
        );
        assert_eq!(r.connected(t(7), "c", 5, remote), None);
        assert!(!boxed(&r, "c"));
        let e = r.get("c").expect("known");
        assert_eq!(
            (e.state, e.connects, e.disconnects),
            (PresenceState::Online, 1, 0)
        );
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(
            r.counts(),
            PresenceCounts {
                online: 3,
                ..PresenceCounts::default()
            }
        );
    }

    #[test]
    fn forgotten_slots_are_reused_and_a_mostly_free_slab_is_compacted() {
        let cfg = RegistryConfig {
            offline_retention: Duration::from_secs(60),
            max_offline: 100,
        };
        let mut r = Registry::new(cfg);
        #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
        let t0 = Instant::now();
        let remote: SocketAddr = "192.0.2.1:5000".parse().expect("an address");
        let id = |i: u32| format!("c{i:05}");
        for i in 0..1000 {
            r.connected(t0, &id(i), u64::from(i), remote);
        }
        assert_eq!(r.slots.all.len(), 1000);
        assert!(r.slots.all.capacity() <= 1000 + 1000 / 8 + SLOTS_KEPT);
        // 900 go offline; beyond `max_offline` the oldest are forgotten as they go.
        for i in 0..900 {
            let t = t0 + Duration::from_millis(u64::from(i));
            r.disconnected(
                t,
                &id(i),
                u64::from(i),
                DisconnectReason::PeerClosed,
                Duration::ZERO,
                None,
            );
        }
        assert_eq!(r.len(), 200);
        // More than half the places were free: the slots moved together, in id order.
        assert!(r.slots.all.len() < 1000, "{} places", r.slots.all.len());
        assert!(r.slots.free.len() <= SLOTS_KEPT + 1);
        // Every id still finds its own slot.
        for i in 800..1000 {
            let e = r.get(&id(i)).expect("kept");
            assert_eq!(e.conn_id, u64::from(i));
            assert_eq!(e.state.is_connected(), i >= 900, "{i}");
        }
        assert!(r.get(&id(799)).is_none());
        let (page, more) = r.page(Some(PresenceKind::Online), None, 10);
        assert!(more);
        assert_eq!(page[0].0, id(900));
        assert_eq!(page[0].1.conn_id, 900);
        // New ids take the free places first.
        let free = r.slots.free.len();
        let places = r.slots.all.len();
        for i in 1000..1000 + free as u32 {
            r.connected(t0, &id(i), u64::from(i), remote);
        }
        assert_eq!(r.slots.all.len(), places);
        assert_eq!(r.get(&id(1000)).map(|e| e.conn_id), Some(1000));
        let counts = r.counts();
        assert_eq!(counts.online, 100 + free);
        assert_eq!(counts.offline, 100);
        assert_eq!(r.iter().count(), r.len());
    }
}
