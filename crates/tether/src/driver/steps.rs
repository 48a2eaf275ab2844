//! The steps of one wake-up (see the module docs of `driver`).

use std::future::Future;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tether_proto::{ConnEvent, DisconnectReason, TransportError};
use tokio::io::ReadBuf;

use super::{
    now, Carried, Command, Decision, Driver, Exit, RefreshAnswer, Resolution, Resolved, Sink,
    Stamp, Timer, CLOSE_LINGER, PAUSED_READ, READS_PER_WAKE, READ_BUDGET, READ_CHUNK, REARM_SLACK,
    TRANSMIT_HIGH_WATER,
};
use crate::transport::Transport;

/// Bytes the state machine holds for the peer: not yet written, and (with a session) not yet
/// acknowledged — what a server counts against a client's bound.
pub(super) fn held_for_peer(conn: &tether_proto::Conn) -> usize {
    conn.pending_transmit_len() + conn.session().map_or(0, |s| s.replay_bytes())
}

/// Chunks per vectored write: a transmit queue at its high-water mark of large payloads is a
/// few headers and payloads (256 KiB of 64 KiB messages: 8 chunks, plus the frames after).
const WRITE_SLICES: usize = 16;

/// When at least this much of a frame received in part may be read straight into the
/// frame's buffer (`Conn::frame_room`), it is; less is read on the stack with whatever
/// follows it.
const DIRECT_READ_FROM: usize = 16 * 1024;

/// Yields through tokio's deferred wake-up (see the module docs of `driver`): the task runs
/// again after its worker has polled the I/O driver and the timers, behind what they woke,
/// not ahead of it.
///
/// For every busy connection, paused or not: the starvation it fixed came from unpaused
/// ones (the detection bench's loaders). What it costs the echo was measured (BENCHMARKS.md,
/// "fourth pass"): one `epoll_wait` per yield — about 1,100 per million 64 B messages
/// streamed on two workers, against 60–180 with a self-wake — and no difference in CPU time
/// per message; in the pipelined (current-thread) echo the budget is not reached and the
/// syscall counts are identical. (The lot, `park.rs`, yields the same way after a full pass.)
pub(super) fn yield_deferred(cx: &mut Context<'_>) {
    // The first poll of `yield_now` puts our waker on the scheduler's deferred list (outside
    // a runtime it wakes at once) and returns Pending; the waker stays there when the future
    // is dropped.
    let y = std::pin::pin!(tokio::task::yield_now());
    let _ = y.poll(cx);
}

/// What `take_commands` found out for the rest of the wake-up.
struct Step {
    /// The application holds more than the inbox bound (standalone connections): messages
    /// wait in the state machine until it takes some (`Shared::poll_recv_batch` wakes us).
    inbox_full: bool,
    /// The length of the next outbox message when it stayed in the outbox because the
    /// transmit buffer was at its high-water mark or the session's replay buffer was full.
    waiting_front: Option<usize>,
}

impl<T: Transport, S: Sink> Driver<T, S> {
    /// How long the close may wait for the CLOSE to leave and the peer's FIN.
    fn close_linger(&self) -> std::time::Duration {
        if self.abandoned {
            super::HANDOVER_LINGER
        } else {
            CLOSE_LINGER
        }
    }

    /// One wake-up: the steps in order, looping back while there is work that nothing else
    /// would wake the task for.
    ///
    /// In a task (`Timer::Sleep`): `Pending`, `Ready(Done)` at the end, or `Ready(Park)` when
    /// the connection is left idle and has a lot. Parked (`Timer::Parked`, polled by the
    /// lot): `Pending` while still idle, `Ready(Done)` at the end, `Ready(Unpark)` when it
    /// needs its task again. `carried`: what the lot read already (`park.rs`), the first
    /// read of this wake-up.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Timer<'_>,
        mut carried: Carried,
    ) -> Poll<Exit> {
        #[cfg(test)]
        self.shared.stats.polled();
        self.in_lot = matches!(timer, Timer::Parked);
        let moved = |c: &tether_proto::Conn| {
            let s = c.stats();
            s.messages_in + s.messages_out
        };
        let moved_before = moved(&self.conn);
        loop {
            let now = now();
            let was_established = self.conn.is_established();
            let step = self.take_commands(cx, now);
            self.paused = step.inbox_full || self.backlog_full();
            let more_to_read = self.drive_read(cx, now, &mut carried);
            self.drive_timer(now);
            // Events before writing: a HELLO decision queues the WELCOME.
            self.process_events(now);
            self.drive_write(cx, now);
            // Writing may have ended the connection (a reset).
            self.process_events(now);
            self.publish();
            if self.drive_close(cx, now) {
                return Poll::Ready(Exit::Done);
            }
            // The handshake completed in this pass (WELCOME read, or HELLO accepted): the
            // outbox was skipped while it was pending, so go back for what the application
            // queued before or during the handshake. Nothing else would wake us for it
            // before the next timer (a heartbeat interval later).
            if !was_established && self.conn.is_established() {
                continue;
            }
            if self.arm_timer(cx, now, &mut timer) {
                continue;
            }
            // The socket took the whole transmit buffer: go back for the rest of the outbox
            // (nothing else would wake us for it).
            if self.outbox_can_move(step.waiting_front) {
                continue;
            }
            // Stopped at data (a held message or a frame partly read) by the backlog:
            // register for its wake-up (one place in its queue), or go back at once if there
            // is room now. Nothing else would wake us: with bytes waiting, the peek registers
            // no read interest (a stopped connection waited for its next timer, ~h).
            if self.paused_at_data() && !step.inbox_full && !self.wait_for_backlog(cx) {
                continue;
            }
            let parked = matches!(timer, Timer::Parked);
            // A task parks after a wake-up that moved no message (liveness, a timer): a
            // connection that is streaming stays in its task instead of going to the lot
            // and back at every pause between bursts (under 256 loaders that churn spawned
            // tasks by the thousand and kept the lot from idle connections' heartbeats).
            let quiet = parked || moved(&self.conn) == moved_before;
            if quiet && !more_to_read && step.waiting_front.is_none() && self.may_park() {
                return if parked {
                    Poll::Pending
                } else {
                    Poll::Ready(Exit::Park)
                };
            }
            if parked {
                return Poll::Ready(Exit::Unpark);
            }
            if more_to_read {
                // More may be waiting: yield, but come back.
                yield_deferred(cx);
            }
            return Poll::Pending;
        }
    }

    /// Idle, with a lot to wait in (see `park.rs`): established with nothing in flight in the
    /// state machine (`Conn::can_freeze`: quiescent, no message held by a pause either, and
    /// nothing its liveness engine has to report: the lot keeps it frozen), not closing
    /// (a lot is only given to a parkable transport, in `start`). Paused reading (a full backlog) does not keep a connection
    /// that holds nothing out of the lot: the lot reads and answers its liveness frames the
    /// same way, and a message read gets it its task back. (Unparking every idle connection
    /// while the backlog was full spawned thousands of tasks at once under 256 loaders, the
    /// wake-up herd of the third pass: 3,282 false Offlines in one run.)
    /// What the handles queued was taken this wake-up (the outbox is empty: the caller
    /// checks); what they queue from now on wakes whichever waker `Shared` holds, and the lot
    /// polls a connection once when it takes it, so nothing queued in between is missed.
    ///
    /// The test is `Driver::can_freeze` (a lot, no end, no failed read or write, and the
    /// state machine can freeze), so every parked connection has its compact form.
    fn may_park(&self) -> bool {
        self.can_freeze()
    }

    /// Commands from the handles: registers the waker, moves the outbox into the state
    /// machine (established only, up to the transmit high-water mark, and while a session's
    /// replay buffer has room), applies close and refuse commands, and says whether reading
    /// is paused.
    fn take_commands(&mut self, cx: &mut Context<'_>, now: Instant) -> Step {
        let shared = self.shared.clone();
        let conn = &mut self.conn;
        let mut inner = shared.lock();
        match &inner.driver {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.driver = Some(cx.waker().clone()),
        }
        let mut moved = false;
        let mut waiting_front = None;
        if conn.is_established() {
            // Room for what is about to move, reserved at once: grown frame by frame, the
            // transmit buffer was reallocated a dozen times per wake-up. Large payloads are
            // queued by reference (only their headers are copied into the buffer).
            let (mut queued, mut room) = (conn.pending_transmit_len(), 0);
            let front_moves = inner.outbox.front().is_some_and(|m| conn.can_send(m.len()));
            for m in inner.outbox.iter().take_while(|_| front_moves) {
                if queued >= TRANSMIT_HIGH_WATER {
                    break;
                }
                queued += tether_proto::codec::seq_data_frame_len(m.len());
                room += conn.transmit_copy_len(m.len());
            }
            conn.reserve_transmit(room);
            while conn.pending_transmit_len() < TRANSMIT_HIGH_WATER {
                // With a session, a full replay buffer leaves the message in the outbox until
                // the peer's ACK makes room (back-pressure, no loss).
                let Some(len) = inner.outbox.front().map(Bytes::len) else {
                    break;
                };
                if !conn.can_send(len) {
                    break;
                }
                let Some(msg) = inner.outbox.pop_front() else {
                    break;
                };
                inner.outbox_bytes -= msg.len();
                moved = true;
                match conn.send_bytes(now, &msg) {
                    Ok(()) => {
                        if let Some(b) = inner.seq_base.as_mut() {
                            *b += 1;
                        }
                    }
                    // Senders on a server check the length first (`SendError::TooLarge`), so
                    // the numbers promised by `seq_base` stay true.
                    Err(e) => tracing::debug!(error = %e, "message dropped by the state machine"),
                }
            }
            waiting_front = inner.outbox.front().map(Bytes::len);
            if inner.outbox.is_empty() && inner.outbox.capacity() > 0 {
                // Release the queue: an idle connection holds no buffer capacity.
                inner.outbox = std::collections::VecDeque::new();
            }
        }
        let commit = inner.take_commit();
        if commit > 0 {
            conn.commit(now, commit);
        }
        match inner.take_command() {
            // An orderly close goes out after the messages queued before it.
            // A client that sent its HELLO waits for the answer first (the handshake deadline
            // bounds it): closed now it could only drop the connection without a CLOSE, and
            // the server, which may already have welcomed it, would hold its session for a
            // resume that never comes.
            Some(Command::Close(code, text))
                if (conn.is_established() && !inner.outbox.is_empty())
                    || (!conn.is_established()
                        && !conn.is_closed()
                        && conn.role() == tether_proto::Role::Client) =>
            {
                inner.command = Some(Command::Close(code, text));
            }
            Some(Command::Close(code, text)) => conn.close(now, code, &text),
            Some(Command::CloseNow(code, text)) => conn.close(now, code, &text),
            Some(Command::Abandon(code, text)) => {
                conn.close(now, code, &text);
                self.no_linger = true;
                self.abandoned = true;
            }
            Some(Command::Refuse(code, text)) if !conn.is_established() => {
                conn.refuse(now, code, &text);
                self.no_linger = true;
            }
            Some(Command::Refuse(..)) => {}
            None => {}
        }
        let resolved = inner.take_resolved();
        let inbox_full = inner.inbox_bytes > shared.limits().inbox_bytes;
        if moved {
            // Server connections count it against their bounds (others have none: their
            // queues' box is not kept for it).
            if shared.budgets().is_some() {
                let held = held_for_peer(conn);
                inner.set_transmit(held);
                self.transmit_published = held;
            }
            shared.recharge(&mut inner);
            inner.notify_changed();
        }
        drop(inner);
        if let Some(r) = resolved {
            self.apply_resolved(now, *r);
        }
        Step {
            inbox_full,
            waiting_front,
        }
    }

    /// True while the server's backlog is at its limit (the application has not taken
    /// `max_queued_bytes` of received messages).
    fn backlog_full(&self) -> bool {
        self.shared.budgets().is_some_and(|b| b.backlog.at_limit())
    }

    /// True when the next event is a message held back by a pause (it goes to the
    /// application once there is room).
    fn holds_message(&self) -> bool {
        !self.conn.is_closed() && matches!(self.conn.peek_event(), Some(ConnEvent::Message { .. }))
    }

    /// Registers for the backlog's wake-up (keeping this connection's place in its queue).
    /// False when there is room already (nothing to wait for).
    fn wait_for_backlog(&mut self, cx: &mut Context<'_>) -> bool {
        match self.shared.budgets() {
            Some(b) => b.backlog.is_full(cx.waker(), &mut self.backlog_ticket),
            None => false,
        }
    }

    /// Socket → state machine. True when the wake-up's reads or bytes ran out (more may be
    /// waiting).
    ///
    /// Paused (the application, or the server's backlog, holds as much as it may), a
    /// connection still reads, [`PAUSED_READ`] bytes at a time, so that what keeps it
    /// alive — heartbeats, ACKs, PINGs — is read and answered on time: those add nothing to
    /// the backlog. It stops at the first message (held in the state machine's event queue
    /// until there is room: at most one paused read of payload per connection) or at the
    /// start of a frame it cannot finish in one paused read. Stopped, it peeks: bytes
    /// waiting prove the peer alive, and a peer with nothing waiting is still declared dead
    /// on time.
    ///
    /// `carried` (read by the lot already) is the first read, whatever the budgets say: it
    /// is at most [`PAUSED_READ`] bytes, by which the partial-frame budget may pass its bound
    /// per connection, as the backlog's may.
    fn drive_read(&mut self, cx: &mut Context<'_>, now: Instant, carried: &mut Carried) -> bool {
        let (mut reads, mut bytes) = (0, 0);
        let mut stalled = false;
        while !self.read_done
            && reads < READS_PER_WAKE
            && bytes < READ_BUDGET
            && (!self.paused_at_data() || self.conn.is_closed())
        {
            // Server: room in the partial-frame budget for what this read may add.
            // Carried bytes were read on a reservation of their own (`poll_quick`); the end
            // of the stream or an error brings no bytes.
            let carry = std::mem::replace(carried, Carried::None);
            let reserved = match &carry {
                Carried::Bytes(_, _, r) => *r,
                Carried::Eof | Carried::Error(_) => 0,
                Carried::None => match self.reserve_frame_room(cx) {
                    Some(r) => r,
                    None => {
                        stalled = true;
                        break;
                    }
                },
            };
            // In the lot, small reads too: a parked connection's wake-up is a heartbeat or an
            // ACK (a few bytes); a stream of messages fills the reads and gets the
            // connection its task back (`more_to_read`) instead of being decoded in the lot,
            // where every idle connection's heartbeats and deadlines would wait behind it.
            let chunk = if (self.paused || self.in_lot) && !self.conn.is_closed() {
                PAUSED_READ
            } else {
                READ_CHUNK
            };
            let mut max = chunk.min(READ_BUDGET - bytes);
            // The rest of a large frame goes straight into the buffer it is delivered in
            // (not via the stack and a copy); the same bytes per read and per wake-up.
            let room = if self.paused {
                0
            } else {
                self.conn.frame_room()
            };
            // In a stream of large messages reads end where frames do (a frame's header
            // alone, the rest of a small frame), so that every large body is read in place:
            // a read of a frame's start on the stack copied a quarter of each 256 KiB message
            // (issue 17, target 5). A small frame in between costs one more small read.
            if room < DIRECT_READ_FROM && chunk == READ_CHUNK {
                if let Some(limit) = self.conn.next_read_limit() {
                    max = max.min(limit);
                }
            }
            if let Carried::Bytes(_, n, _) = &carry {
                // Read already: all of it is this read.
                max = max.max(*n);
            }
            let mut direct = None;
            // Uninitialised: zeroing the buffer on every read attempt (Pending ones included)
            // was most of the driver's CPU time. `ReadBuf` tracks what was filled.
            let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut buf[..max]);
            let polled = if !matches!(carry, Carried::None) {
                match carry {
                    Carried::Bytes(b, n, _) => {
                        rb.put_slice(&b[..n]);
                        Poll::Ready(Ok(()))
                    }
                    Carried::Error(e) => Poll::Ready(Err(e)),
                    _ => Poll::Ready(Ok(())),
                }
            } else if room >= DIRECT_READ_FROM {
                let mut body = self.conn.frame_body_buf(max);
                let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut body);
                polled.map_ok(|n| direct = Some(n))
            } else {
                Pin::new(&mut self.io).poll_read(cx, &mut rb)
            };
            let pending = polled.is_pending();
            match polled {
                Poll::Ready(Ok(())) => {
                    let n = direct.unwrap_or(rb.filled().len());
                    reads += 1;
                    bytes += n;
                    if n == 0 {
                        self.read_done = true;
                        self.conn.handle_eof(now);
                    } else {
                        if direct.is_some() {
                            // The rest of a large frame, read in place: the message (if it
                            // completed) goes through the event queue, one event per frame.
                            self.conn.handle_frame_body(now, n);
                        } else if self.paused {
                            // Messages wait in the state machine (`process_events` stops
                            // at the first).
                            self.conn.handle_input(now, rb.filled());
                        } else {
                            // Messages go to the sink as they are decoded: the event queue
                            // does not grow with the read (a 64 KiB read of small messages
                            // queued a thousand 120-byte events, allocated and freed on
                            // every read: most of the echo's page faults).
                            let (sink, shared) = (&mut self.sink, &self.shared);
                            self.conn.handle_input_deliver(
                                now,
                                rb.filled(),
                                &mut |payload, seq| {
                                    sink.event(shared, ConnEvent::Message { payload, seq })
                                },
                            );
                        }
                        // Hand the rest of this read's events over before the next read.
                        self.process_events(now);
                        // The backlog may have filled with this read's messages.
                        self.paused = self.paused || self.backlog_full();
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.read_done = true;
                    let wrote = self
                        .last_write
                        .get()
                        .is_some_and(|w| w >= self.conn.last_rx());
                    let io = &self.io;
                    let err =
                        TransportError::from_io(&e, || io.has_unacked().unwrap_or(false) || wrote);
                    self.conn.handle_transport_error(now, err);
                }
                Poll::Pending => {}
            }
            self.settle_frame_room(reserved);
            if pending {
                break;
            }
        }
        if (stalled || self.paused_at_data())
            && !self.conn.is_closed()
            && self.io.poll_unread(cx) != Some(false)
        {
            // Bytes wait in the kernel (or the transport cannot tell): the peer is alive, our
            // application is the bottleneck. A peer with nothing waiting is silent and is
            // still declared dead on time.
            self.conn.note_alive(now);
        }
        reads == READS_PER_WAKE || bytes >= READ_BUDGET
    }

    /// Paused and stopped at data: a message is held, or a frame is partly read (most likely
    /// a message: liveness frames are a few bytes and arrive whole).
    fn paused_at_data(&self) -> bool {
        self.paused && (self.holds_message() || self.conn.partial_frame().len > 0)
    }

    /// Server connections: room in the partial-frame budget for one read (see `frames.rs`).
    /// `None` when the budget has no room; `Some(0)` when there is no budget.
    pub(super) fn reserve_frame_room(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        match self.shared.budgets() {
            Some(b) if !self.conn.is_closed() => {
                self.frames
                    .reserve(self.conn.partial_frame(), &b.frames, cx)
            }
            _ => Some(0),
        }
    }

    pub(super) fn settle_frame_room(&mut self, reserved: usize) {
        if let Some(b) = self.shared.budgets() {
            self.frames
                .settle(self.conn.partial_frame(), &b.frames, reserved);
        }
    }

    /// Fires what is due.
    fn drive_timer(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|d| now >= d) {
            self.conn.handle_timeout(now);
        }
    }

    /// A decision made off the task: a deferred verdict goes to the sink, a fresh credential
    /// into an AUTH frame.
    fn apply_resolved(&mut self, now: Instant, r: Resolved) {
        match r {
            Resolved::Credential(c) => {
                if let Err(e) = self.conn.refresh_credential(now, c) {
                    tracing::debug!(error = %e, "credential refresh not sent");
                }
            }
            r => match self.sink.resolved(&self.shared, now, r) {
                Resolution::Hello(d) => self.decide(now, d),
                Resolution::Refresh(a) => self.answer_refresh(now, a),
            },
        }
    }

    fn decide(&mut self, now: Instant, d: Decision) {
        match d {
            Decision::Accept(cfg, session, ttl) => {
                self.conn
                    .accept_authenticated(now, cfg, session.map(|b| *b), ttl)
            }
            Decision::Refuse(code, text) => self.conn.refuse(now, code, &text),
            Decision::Pending => {}
        }
    }

    fn answer_refresh(&mut self, now: Instant, a: RefreshAnswer) {
        match a {
            RefreshAnswer::Ok(ttl) => self.conn.auth_ok(now, ttl),
            RefreshAnswer::Refuse(text) => self.conn.auth_refused(now, &text),
            RefreshAnswer::Pending => {}
        }
    }

    /// State machine → sink. HELLO decisions are applied at once (they queue the WELCOME or
    /// the REFUSE); messages before the end reach the application before the end does.
    fn process_events(&mut self, now: Instant) {
        loop {
            // Paused: messages (and what follows them, in order) wait in the state machine.
            if self.paused && self.holds_message() {
                break;
            }
            let Some(ev) = self.conn.poll_event() else {
                break;
            };
            match ev {
                ConnEvent::Hello(h) => {
                    let d = self.sink.hello(&self.shared, now, &h);
                    self.decide(now, d);
                }
                ConnEvent::Auth(c) => {
                    let a = self.sink.refresh(&self.shared, now, &c);
                    self.answer_refresh(now, a);
                }
                ConnEvent::Closed(d) => {
                    self.ending().result = Some(d.clone());
                    self.sink.flush(&self.shared);
                    if !self.shared.is_persistent() {
                        self.shared.finish(d.clone());
                    }
                    self.sink.event(&self.shared, ConnEvent::Closed(d));
                }
                ev @ ConnEvent::Established(_) => {
                    self.established = true;
                    self.sink.event(&self.shared, ev);
                }
                ev => self.sink.event(&self.shared, ev),
            }
        }
        self.sink.flush(&self.shared);
    }

    /// State machine → socket: one vectored write of the queued chunks (frames, and large
    /// payloads from where they are), or a plain write when there is one chunk.
    fn drive_write(&mut self, cx: &mut Context<'_>, now: Instant) {
        let mut wrote_any = false;
        while !self.write_failed && self.conn.pending_transmit_len() > 0 {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut k = 0;
            for (slot, chunk) in slices.iter_mut().zip(self.conn.transmit_chunks()) {
                *slot = IoSlice::new(chunk);
                k += 1;
            }
            let io = Pin::new(&mut self.io);
            let polled = if k > 1 {
                io.poll_write_vectored(cx, &slices[..k])
            } else {
                io.poll_write(cx, self.conn.pending_transmit())
            };
            match polled {
                Poll::Ready(Ok(0)) => self.write_failed = true,
                Poll::Ready(Ok(n)) => {
                    self.conn.transmitted(n);
                    wrote_any = true;
                }
                Poll::Ready(Err(e)) => {
                    self.write_failed = true;
                    let err = TransportError::from_io(&e, || true);
                    self.conn.handle_transport_error(now, err);
                }
                Poll::Pending => break,
            }
        }
        if wrote_any {
            self.last_write = Stamp::at(now);
            let _ = Pin::new(&mut self.io).poll_flush(cx);
        }
    }

    /// Counters for the handles; what the state machine holds for the peer, for the server's
    /// unsent bounds (only when it changed: the lock is not taken twice per wake-up for
    /// nothing). A sender waiting for the peer to take bytes is told when it did.
    fn publish(&mut self) {
        self.shared.stats.update(&self.conn);
        let held = held_for_peer(&self.conn);
        if self.shared.budgets().is_some() && held != self.transmit_published {
            let mut inner = self.shared.lock();
            inner.set_transmit(held);
            self.shared.recharge(&mut inner);
            if held < self.transmit_published {
                inner.notify_changed();
            }
            drop(inner);
            self.transmit_published = held;
        }
    }

    /// The end of a connection. Returns true when the task is finished.
    ///
    /// Abortive (RST) when the peer or the path failed: the kernel must not keep
    /// retransmitting into a dead path. Refusals and protocol errors close in order so the
    /// peer can read the REFUSE or CLOSE frame that explains why: FIN after it, then a
    /// bounded wait for the peer's FIN so that no unread data turns our close into an RST.
    /// When the linger runs out with bytes still unsent (a peer that does not read), the
    /// close is abortive too.
    fn drive_close(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        if self.conn.is_handed_off() {
            return true;
        }
        if !self.conn.is_closed() {
            return false;
        }
        let result = self.ending.as_ref().and_then(|e| e.result.as_ref());
        let failure = result.is_none_or(|d| {
            matches!(
                d.reason,
                DisconnectReason::HeartbeatTimeout
                    | DisconnectReason::KeepaliveTimeout
                    | DisconnectReason::UserTimeout
                    | DisconnectReason::PeerReset
                    | DisconnectReason::ConnectRefused
                    | DisconnectReason::Io(_)
            )
        });
        let since = match self.closing_since() {
            Some(s) => s,
            None => {
                if failure {
                    self.io.abort_on_close();
                }
                self.ending().closing_since = Stamp::at(now);
                now
            }
        };
        if failure || self.write_failed {
            return true;
        }
        if self.conn.pending_transmit_len() == 0
            && !self.shut_down
            && Pin::new(&mut self.io).poll_shutdown(cx).is_ready()
        {
            self.shut_down = true;
        }
        if self.shut_down && (self.read_done || self.no_linger) {
            return true;
        }
        if now >= since + self.close_linger() {
            if !self.shut_down {
                // Unsent bytes the peer never read: do not leave them to the kernel.
                self.io.abort_on_close();
            }
            return true;
        }
        // Keep draining reads (discarded by the closed state machine) until EOF.
        if self.shut_down && !self.read_done {
            for _ in 0..READS_PER_WAKE {
                let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut rb = ReadBuf::uninit(&mut buf);
                match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => return true,
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(_)) => return true,
                    Poll::Pending => return false,
                }
            }
            cx.waker().wake_by_ref();
        }
        false
    }

    /// Sleeps until the next deadline. Re-arms when it moved *earlier* (or much later, so the
    /// sleep would soon fire for nothing, see below), not on every change: traffic keeps
    /// pushing the heartbeat deadline later, and re-arming the timer on every wake-up would
    /// cost more than one early wake-up, which is harmless (the state machine re-checks its
    /// deadlines and the sleep is re-armed then). Returns true when the sleep fired.
    ///
    /// Parked, the deadline is only recorded in `armed` (the lot's heap waits for it); true
    /// when it is due already.
    fn arm_timer(&mut self, cx: &mut Context<'_>, now: Instant, timer: &mut Timer<'_>) -> bool {
        let linger = self.closing_since().map(|c| c + self.close_linger());
        let deadline = match (self.conn.poll_timeout(), linger) {
            (Some(d), Some(l)) => Some(d.min(l)),
            (d, l) => d.or(l),
        };
        let mut sleep = match timer {
            Timer::Sleep(sleep) => sleep.as_mut(),
            Timer::Parked => {
                self.armed = deadline.map_or(Stamp::NONE, Stamp::at);
                return deadline.is_some_and(|d| d <= now);
            }
        };
        let Some(d) = deadline else {
            return false;
        };
        // Also re-armed when the deadline moved later and the sleep would fire for nothing
        // in less than half the remaining wait (or within `REARM_SLACK`). An idle server
        // answers the client's heartbeat in the wake-up that reads it: its deadline moves
        // from about now + h/8 (the fallback armed after the previous answer) to now + 9h/8,
        // and without a reset the old sleep would wake the task a second time per interval to
        // do nothing. A reset costs less than a wake-up (which ends in a reset anyway). Traffic,
        // which pushes the deadline a little later on every wake-up, re-arms at most about
        // twice per interval, not once per message.
        let stale = |a: Instant| {
            let early = a.saturating_duration_since(now);
            d > a && (early <= REARM_SLACK || early < d.saturating_duration_since(now) / 2)
        };
        if self.armed.get().is_none_or(|a| d < a || stale(a)) {
            sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            self.armed = Stamp::at(d);
            self.shared.stats.timer_reset();
        }
        if sleep.as_mut().poll(cx).is_ready() {
            self.armed = Stamp::NONE;
            return true;
        }
        false
    }

    /// True when the outbox holds a message that can move now (the transmit buffer drained
    /// below its high-water mark and the session has room).
    fn outbox_can_move(&self, waiting_front: Option<usize>) -> bool {
        waiting_front.is_some_and(|len| {
            !self.write_failed
                && !self.conn.is_closed()
                && self.conn.pending_transmit_len() < TRANSMIT_HIGH_WATER
                && self.conn.can_send(len)
        })
    }
}
