//! A connection kept frozen between its wake-ups (`Conn::freeze` / `FrozenConn::thaw`, issue
//! 17) decides exactly as one never frozen. Two worlds, each a client and a server wired in
//! memory on a virtual clock, get the same random actions at the same instants: in one the
//! connections are never frozen; in the other each is frozen and thawed whenever it is
//! quiescent, and a quiescent server is woken the way a driver's lot wakes it (whole
//! heartbeats on the frozen form first (`FrozenConn::parked_heartbeats`, its answer written
//! in random pieces), then through `Conn::parked_input`, deadlines through
//! `Conn::parked_timeout`, the full path for anything else). Every byte written, event,
//! deadline and counter must be the same, step by step.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_proto::codec::{self, Credential, Hello, SessionGrant};
use tether_proto::conn::{FrozenStep, ParkedStep};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{Conn, ConnConfig, ConnEvent, LivenessConfig};

/// The origin of virtual time.
#[allow(clippy::disallowed_methods)]
fn base() -> Instant {
    Instant::now()
}

/// A small deterministic generator (xorshift): the scenarios need no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a scenario switches on besides heartbeats.
#[derive(Debug, Clone, Copy)]
struct Options {
    session: bool,
    credential: bool,
    ping: bool,
    suspect: bool,
    idle: bool,
    answer_peer: bool,
}

impl Options {
    fn from_seed(seed: u64) -> Self {
        let bit = |i: u32| seed >> i & 1 == 1;
        Options {
            session: bit(0),
            credential: bit(1),
            ping: bit(2),
            suspect: bit(3),
            idle: bit(4) && bit(1),
            answer_peer: !bit(5),
        }
    }
}

const H: Duration = Duration::from_secs(2);

struct World {
    /// Freeze and thaw each side whenever it is quiescent; wake a quiescent server the
    /// lot's way.
    frozen: bool,
    origin: Instant,
    now: Instant,
    client: Conn,
    server: Conn,
    /// Bytes written and not yet delivered, per direction.
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    opts: Options,
    /// Everything observable, in order.
    log: Vec<String>,
    freezes: usize,
    quick: usize,
    /// Reads taken on the frozen form (`FrozenConn::parked_heartbeats`).
    frozen_steps: usize,
    /// Of which the answer did not all go out.
    unsent: usize,
    /// What the frozen form wrote, written out with the server's next bytes (as the full
    /// path writes them: the log's lines are the same either way).
    server_wrote: Vec<u8>,
    /// How much of each answer the frozen form's writes take (the frozen world only).
    writes: Rng,
}

impl World {
    fn new(t0: Instant, opts: Options, frozen: bool) -> World {
        let cfg = ConnConfig {
            max_frame_len: 64 * 1024,
            ..ConnConfig::default()
        };
        let mut local = LivenessConfig::new(H, H * 3);
        if opts.ping {
            local.ping_interval = Some(Duration::from_millis(2700));
        }
        if opts.suspect {
            local.suspect_after = Some(Duration::from_millis(4100));
        }
        let hello = Hello {
            client_id: "c1".into(),
            requested_heartbeat: H,
            want_session: opts.session,
            resume: None,
            credential: opts.credential.then(|| Credential::from(&b"first"[..])),
        };
        World {
            frozen,
            // Before and after the connections' epochs: negative and positive offsets.
            origin: t0 + Duration::from_secs(3600),
            now: t0,
            client: Conn::client(t0, cfg.clone(), &hello, local, None),
            server: Conn::server(t0, cfg),
            to_server: Vec::new(),
            to_client: Vec::new(),
            opts,
            log: Vec::new(),
            freezes: 0,
            quick: 0,
            frozen_steps: 0,
            unsent: 0,
            server_wrote: Vec::new(),
            writes: Rng(0x2545_f491_4f6c_dd1d),
        }
    }

    fn server_liveness(&self) -> LivenessConfig {
        let mut l = LivenessConfig::new(H, H * 3);
        l.enforce_peer_heartbeat = Some(H);
        l.answer_peer_heartbeat = self.opts.answer_peer;
        if self.opts.suspect {
            l.suspect_after = Some(Duration::from_millis(3900));
        }
        if self.opts.idle {
            l.idle_timeout = Some(Duration::from_secs(9));
        }
        l
    }

    /// Freezes and thaws both sides where they are quiescent (the frozen world only).
    fn settle(&mut self) {
        if !self.frozen {
            return;
        }
        for server in [false, true] {
            let c = if server {
                &mut self.server
            } else {
                &mut self.client
            };
            if !c.is_quiescent() {
                continue;
            }
            let can = c.can_freeze();
            let placeholder = Conn::server(self.now, ConnConfig::default());
            let taken = std::mem::replace(c, placeholder);
            // The frozen form does not keep the counters: its holder hands them back.
            let counters = taken.stats();
            *c = match taken.freeze(self.origin) {
                Ok(f) => {
                    assert!(can, "froze where can_freeze said no");
                    self.freezes += 1;
                    f.thaw(self.origin, &counters)
                }
                Err(c) => {
                    assert!(!can, "can_freeze said yes and freeze refused");
                    c
                }
            };
        }
    }

    fn record(&mut self, what: &str) {
        let (c, s) = (&self.client, &self.server);
        self.log.push(format!(
            "{:?} {what}: client {:?} {:?} {:?} {} | server {:?} {:?} {:?} {}",
            self.now,
            c.poll_timeout(),
            c.stats(),
            c.last_rx(),
            c.is_closed(),
            s.poll_timeout(),
            s.stats(),
            s.last_rx(),
            s.is_closed(),
        ));
    }

    /// Writes, delivers (`deliver`: how many bytes of each direction arrive now) and
    /// handles events until nothing moves.
    fn pump(&mut self, deliver: usize) {
        let mut budget = deliver;
        loop {
            let mut moved = false;
            for server in [false, true] {
                let c = if server {
                    &mut self.server
                } else {
                    &mut self.client
                };
                let mut out = c.transmit_chunks().collect::<Vec<_>>().concat();
                c.transmitted(out.len());
                if server && !self.server_wrote.is_empty() {
                    out.splice(0..0, self.server_wrote.drain(..));
                }
                if !out.is_empty() {
                    moved = true;
                    self.log
                        .push(format!("{:?} server={server} wrote {out:?}", self.now));
                    if server {
                        self.to_client.extend_from_slice(&out);
                    } else {
                        self.to_server.extend_from_slice(&out);
                    }
                }
            }
            let n = budget.min(self.to_server.len());
            if n > 0 {
                moved = true;
                budget -= n;
                let data: Vec<u8> = self.to_server.drain(..n).collect();
                self.server_input(&data);
            }
            let n = budget.min(self.to_client.len());
            if n > 0 {
                moved = true;
                budget -= n;
                let data: Vec<u8> = self.to_client.drain(..n).collect();
                let now = self.now;
                self.client.handle_input(now, &data);
            }
            moved |= self.events();
            self.settle();
            if !moved {
                return;
            }
        }
    }

    /// The server's input: the lot's quick path first when it is quiescent (frozen world),
    /// the full path for what it leaves untouched.
    fn server_input(&mut self, data: &[u8]) {
        let now = self.now;
        if self.frozen && self.server.can_freeze() {
            let placeholder = Conn::server(now, ConnConfig::default());
            let taken = std::mem::replace(&mut self.server, placeholder);
            let mut counters = taken.stats();
            let f = taken.freeze(self.origin).expect("can_freeze said yes");
            // Mostly whole, sometimes in part or not at all (a full send buffer).
            let take = match self.writes.below(3) {
                0 => self.writes.below(4) as usize,
                _ => 4,
            };
            let wrote = &mut self.server_wrote;
            let (f, step) = f.parked_heartbeats(self.origin, now, data, &mut counters, |b| {
                let n = take.min(b.len());
                wrote.extend_from_slice(&b[..n]);
                n
            });
            if step != FrozenStep::NotHandled {
                self.frozen_steps += 1;
                self.unsent += usize::from(step == FrozenStep::Unsent);
            }
            let deadline = f.poll_timeout(self.origin);
            assert_eq!(
                f.poll_timeout_offset(self.origin),
                deadline.map(|d| tether_proto::offset::offset(self.origin, d)),
                "the frozen deadline as an offset from the origin"
            );
            let last_rx = f.last_rx(self.origin);
            assert_eq!(
                f.last_rx_offset(),
                tether_proto::offset::offset(self.origin, last_rx),
                "the frozen last arrival as an offset from the origin"
            );
            self.server = f.thaw(self.origin, &counters);
            assert_eq!(self.server.poll_timeout(), deadline, "the frozen deadline");
            assert_eq!(self.server.last_rx(), last_rx);
            assert_eq!(
                self.server.is_quiescent(),
                step != FrozenStep::Unsent,
                "{step:?}"
            );
            if step != FrozenStep::NotHandled {
                return;
            }
        }
        if self.frozen
            && self.server.is_quiescent()
            && self.server.parked_input(now, data) != ParkedStep::NotLiveness
        {
            self.quick += 1;
            return;
        }
        self.server.handle_input(now, data);
    }

    fn events(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        while let Some(ev) = self.server.poll_event() {
            moved = true;
            self.log.push(format!("{now:?} server event {ev:?}"));
            match ev {
                ConnEvent::Hello(_) => {
                    let l = self.server_liveness();
                    let session = self.opts.session.then(|| {
                        let token = [7u8; codec::TOKEN_LEN];
                        let grant = SessionGrant {
                            session_id: 42,
                            token,
                            resumed: false,
                            last_received: 0,
                            linger: Duration::from_secs(30),
                        };
                        (grant, Session::new(42, token, SessionConfig::default()))
                    });
                    let ttl = self.opts.credential.then_some(Duration::from_secs(7));
                    self.server.accept_authenticated(now, l, session, ttl);
                }
                ConnEvent::Auth(_) => self.server.auth_ok(now, Some(Duration::from_secs(7))),
                _ => {}
            }
        }
        while let Some(ev) = self.client.poll_event() {
            moved = true;
            self.log.push(format!("{now:?} client event {ev:?}"));
            if let ConnEvent::RefreshCredential { .. } = ev {
                let r = self
                    .client
                    .refresh_credential(now, Credential::from(&b"again"[..]));
                self.log.push(format!("{now:?} refresh {r:?}"));
            }
        }
        moved
    }

    /// Fires what is due at `self.now` on both sides (the server through the lot's quick
    /// path when it is quiescent, in the frozen world).
    fn fire(&mut self) {
        let now = self.now;
        if self.client.poll_timeout().is_some_and(|d| d <= now) {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout().is_some_and(|d| d <= now) {
            if self.frozen && self.server.is_quiescent() {
                self.server.parked_timeout(now);
                self.quick += 1;
            } else {
                self.server.handle_timeout(now);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.client.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }
}

/// One random action, the same in both worlds.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Advance by this much (firing every deadline on the way, delivering in full).
    Wait(Duration),
    /// Advance, delivering only this many bytes a step (partial frames).
    Trickle(Duration, usize),
    ClientSends(usize),
    ServerSends(usize),
    /// Lose what is in flight in both directions and stop delivering for a while.
    Blackhole(Duration),
    /// Heartbeats from the client's side of the wire, this many, this far apart (a flood
    /// when close together; the client's state machine does not know of them).
    Heartbeats(usize, Duration),
}

fn action(rng: &mut Rng) -> Action {
    let ms = |n: u64| Duration::from_millis(n);
    match rng.below(20) {
        0..=9 => Action::Wait(ms(rng.below(2600))),
        10..=11 => Action::Trickle(ms(rng.below(1200)), 1 + rng.below(6) as usize),
        12..=14 => Action::ClientSends(rng.below(300) as usize),
        15..=16 => Action::ServerSends(rng.below(300) as usize),
        17 => Action::ClientSends(17 * 1024 + rng.below(3000) as usize),
        18 => Action::Blackhole(ms(rng.below(7000))),
        _ if rng.below(2) == 0 => {
            Action::Heartbeats(1 + rng.below(12) as usize, ms(rng.below(400)))
        }
        _ => Action::Wait(ms(rng.below(50))),
    }
}

fn apply(w: &mut World, a: Action) {
    let (span, per_step, lose) = match a {
        Action::Wait(d) => (d, usize::MAX, false),
        Action::Trickle(d, n) => (d, n, false),
        Action::Blackhole(d) => (d, 0, true),
        Action::ClientSends(n) => {
            let payload = Bytes::from(vec![b'c'; n]);
            let r = w.client.send_bytes(w.now, &payload);
            w.log.push(format!("{:?} client send {n}: {r:?}", w.now));
            w.pump(usize::MAX);
            w.record("after client send");
            return;
        }
        Action::Heartbeats(k, gap) => {
            for _ in 0..k {
                w.to_server.extend_from_slice(&[0; 4]);
                w.pump(usize::MAX);
                w.record("peer heartbeat");
                apply(w, Action::Wait(gap));
            }
            return;
        }
        Action::ServerSends(n) => {
            let payload = Bytes::from(vec![b's'; n]);
            let r = w.server.send_bytes(w.now, &payload);
            w.log.push(format!("{:?} server send {n}: {r:?}", w.now));
            w.pump(usize::MAX);
            w.record("after server send");
            return;
        }
    };
    let limit = w.now + span;
    // A deadline that firing does not move would loop here at one instant: fail, do not
    // fill the memory with log lines.
    let mut fired = 0;
    loop {
        fired += 1;
        assert!(
            fired < 10_000,
            "a deadline fires again and again at {:?}",
            w.now
        );
        if lose {
            w.to_server.clear();
            w.to_client.clear();
        }
        match w.next_deadline().filter(|d| *d <= limit) {
            Some(d) => {
                w.now = w.now.max(d);
                w.fire();
                w.pump(per_step);
                w.record("deadline");
            }
            None => {
                w.now = limit;
                if lose {
                    w.to_server.clear();
                    w.to_client.clear();
                }
                w.pump(per_step);
                w.record("end of wait");
                return;
            }
        }
        if w.client.is_closed() && w.server.is_closed() {
            return;
        }
    }
}

/// Random scenarios over every option, each with 150 actions: the frozen world's log is the
/// never-frozen world's, line by line.
#[test]
fn a_frozen_connection_decides_as_one_never_frozen() {
    let (mut freezes, mut quick, mut frozen_steps, mut unsent) = (0, 0, 0, 0);
    for seed in 0..64u64 {
        let opts = Options::from_seed(seed);
        let t0 = base();
        let mut plain = World::new(t0, opts, false);
        let mut frozen = World::new(t0, opts, true);
        let mut rng = Rng(seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        plain.pump(usize::MAX);
        frozen.pump(usize::MAX);
        for step in 0..150 {
            let a = action(&mut rng);
            apply(&mut plain, a);
            apply(&mut frozen, a);
            let same = plain.log.len() == frozen.log.len()
                && plain.log.iter().zip(&frozen.log).all(|(p, f)| p == f);
            if !same {
                let first = plain
                    .log
                    .iter()
                    .zip(&frozen.log)
                    .position(|(p, f)| p != f)
                    .unwrap_or(plain.log.len().min(frozen.log.len()));
                panic!(
                    "seed {seed} ({opts:?}) step {step} ({a:?}): the worlds differ at line \
                     {first}:\n never frozen: {:?}\n frozen:       {:?}",
                    plain.log.get(first),
                    frozen.log.get(first)
                );
            }
            if plain.client.is_closed() && plain.server.is_closed() {
                break;
            }
        }
        freezes += frozen.freezes;
        quick += frozen.quick;
        frozen_steps += frozen.frozen_steps;
        unsent += frozen.unsent;
    }
    // The scenarios do freeze, and do take the quick path and the frozen one (this test
    // cannot pass vacuously).
    assert!(freezes > 1000, "only {freezes} freezes");
    assert!(quick > 200, "only {quick} quick wake-ups");
    assert!(frozen_steps > 300, "only {frozen_steps} reads taken frozen");
    assert!(unsent > 20, "only {unsent} answers written in part");
    eprintln!(
        "{freezes} freezes, {quick} quick wake-ups, {frozen_steps} reads taken frozen \
         ({unsent} answers written in part)"
    );
}

/// A connection that is not quiescent is given back unchanged.
#[test]
fn only_a_quiescent_connection_freezes() {
    let t0 = base();
    let opts = Options::from_seed(0);
    let mut w = World::new(t0, opts, false);
    // Before the handshake: not established.
    let c = std::mem::replace(&mut w.client, Conn::server(t0, ConnConfig::default()));
    let c = c.freeze(w.origin).expect_err("handshaking");
    w.client = c;
    w.pump(usize::MAX);
    assert!(w.server.is_quiescent());
    // Something to write: not quiescent.
    w.server.send(t0, b"x").expect("established");
    let s = std::mem::replace(&mut w.server, Conn::server(t0, ConnConfig::default()));
    let mut s = s.freeze(w.origin).expect_err("a message waits");
    assert!(s.pending_transmit_len() > 0);
    // Part of a frame received: not quiescent.
    let n = s.pending_transmit_len();
    s.transmitted(n);
    s.handle_input(t0, &[0, 0]);
    let mut s = s.freeze(w.origin).expect_err("a partial frame");
    s.handle_input(t0, &[0, 0]);
    // Quiescent again: freezes, and thaws to the same deadlines and counters.
    assert!(s.can_freeze());
    let before = (s.poll_timeout(), s.stats(), s.last_rx());
    let s = s
        .freeze(w.origin)
        .expect("quiescent")
        .thaw(w.origin, &before.1);
    assert_eq!((s.poll_timeout(), s.stats(), s.last_rx()), before);
}

/// What a parked connection's engine costs frozen (issue 17): 120 B, against the 360 B of a
/// `Conn` (168 B while it kept its counters, 128 B while its liveness engine kept the
/// heartbeats sent).
#[test]
fn the_frozen_form_is_compact() {
    let frozen = std::mem::size_of::<tether_proto::conn::FrozenConn>();
    let conn = std::mem::size_of::<Conn>();
    eprintln!("FrozenConn {frozen} B, Conn {conn} B");
    assert!(frozen <= 120, "FrozenConn grew to {frozen} B");
}
