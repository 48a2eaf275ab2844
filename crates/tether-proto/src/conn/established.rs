//! After the handshake: frames in, messages out, sessions (sequence numbers, ACKs, replay)
//! and what the liveness engine asks for (heartbeats, pings, dead peers, idle timeouts).

use std::time::Instant;

use bytes::Bytes;

use crate::codec::{self, Frame};
use crate::liveness::LivenessEvent;
use crate::reason::{CloseCode, DisconnectReason};
use crate::session::Received;

use super::{frame_name, transmit, Conn, ConnEvent, Deliver, SendError, State};

impl Conn {
    pub(super) fn handle_established(
        &mut self,
        now: Instant,
        frame: Frame,
        deliver: Option<Deliver<'_, '_>>,
    ) {
        match frame {
            Frame::Heartbeat => {
                self.stats.heartbeats_in += 1;
                // Heartbeats that arrive together (one read) count once towards the flood
                // rule: they were queued behind a stall (ours or the peer's), not sent too often.
                if !self.heartbeat_in_this_read {
                    self.heartbeat_in_this_read = true;
                    self.liveness.on_heartbeat_received(now);
                }
            }
            Frame::Data(payload) if self.session.is_none() => {
                self.stats.messages_in += 1;
                self.app_data_in_read(now);
                self.message(payload, None, deliver);
            }
            Frame::SeqData { seq, payload } if self.session.is_some() => {
                let Some(s) = &mut self.session else { return };
                match s.on_data(now, seq) {
                    Received::Deliver => {
                        self.stats.messages_in += 1;
                        self.app_data_in_read(now);
                        self.message(payload, Some(seq), deliver);
                        self.send_due_ack(now);
                    }
                    Received::Duplicate => {}
                    Received::Gap { expected } => {
                        self.protocol_error(
                            now,
                            format!("SEQ_DATA {seq} but {expected} was expected"),
                        );
                        return;
                    }
                }
            }
            Frame::Ack(seq) if self.session.is_some() => {
                if let Some(Err(e)) = self.session.as_mut().map(|s| s.on_ack(seq)) {
                    self.protocol_error(
                        now,
                        format!("ACK {} beyond the last sent sequence {}", e.acked, e.sent),
                    );
                    return;
                }
            }
            Frame::Data(_) => {
                self.protocol_error(
                    now,
                    "DATA on a session connection (SEQ_DATA expected)".into(),
                );
                return;
            }
            Frame::Ping(n) => {
                codec::encode(&Frame::Pong(n), &mut self.out);
                self.liveness.on_send(now);
            }
            Frame::Pong(n) => self.liveness.on_pong(now, n),
            Frame::Close { code, text } => {
                self.close_received = true;
                let reason = match code {
                    CloseCode::REPLACED => DisconnectReason::Replaced,
                    // CREDENTIAL_EXPIRED (7) stays a peer close with its code and text, as in
                    // the conformance vectors (`client-credential-refresh`).
                    _ => DisconnectReason::PeerClose { code, text },
                };
                self.finish(now, reason);
            }
            Frame::Extension(_) => {}
            Frame::Auth(credential) => {
                self.on_auth(now, credential);
                if self.is_closed() {
                    return;
                }
            }
            Frame::AuthOk(ttl) => {
                self.on_auth_ok(now, ttl);
                if self.is_closed() {
                    return;
                }
            }
            f @ (Frame::SeqData { .. } | Frame::Ack(_)) => self.protocol_error(
                now,
                format!("{} without a negotiated session", frame_name(&f)),
            ),
            f => self.protocol_error(
                now,
                format!("unexpected {} after the handshake", frame_name(&f)),
            ),
        }
        self.drain_liveness(now);
    }

    /// True when a message of `len` bytes can be sent now (the session's replay buffer has
    /// room, or there is no session).
    pub fn can_send(&self, len: usize) -> bool {
        self.session.as_ref().is_none_or(|s| s.has_room(len))
    }

    /// Queues an application message (copied). See [`send_bytes`](Self::send_bytes).
    pub fn send(&mut self, now: Instant, payload: &[u8]) -> Result<(), SendError> {
        self.send_bytes(now, &Bytes::copy_from_slice(payload))
    }

    /// Queues an application message. With a session it is sequenced and kept for replay
    /// (the `Bytes` is shared, not copied); [`SendError::Full`] means the replay buffer is
    /// full (see [`can_send`](Self::can_send)).
    pub fn send_bytes(&mut self, now: Instant, payload: &Bytes) -> Result<(), SendError> {
        match self.state {
            State::Established => {}
            State::Closed => return Err(SendError::Closed),
            _ => return Err(SendError::NotEstablished),
        }
        let max = self.cfg.max_frame_len as usize - if self.session.is_some() { 9 } else { 1 };
        if payload.len() > max {
            return Err(SendError::TooLong {
                len: payload.len(),
                max,
            });
        }
        match &mut self.session {
            Some(s) => {
                if s.push(payload.clone()).is_none() {
                    return Err(SendError::Full);
                }
                self.pump_session(now);
            }
            None => {
                codec::encode_data_header(payload.len(), &mut self.out);
                transmit::queue_payload(&mut self.out, &mut self.queued, payload);
                self.stats.messages_out += 1;
                self.liveness.on_app_send(now);
                return Ok(());
            }
        }
        self.liveness.on_app_data(now);
        Ok(())
    }

    /// A message for the application: handed to `deliver` when nothing waits before it in
    /// the event queue (order is kept), queued otherwise.
    fn message(&mut self, payload: Bytes, seq: Option<u64>, deliver: Option<Deliver<'_, '_>>) {
        match deliver {
            Some(d) if self.events.is_empty() => d(payload, seq),
            _ => self.events.push_back(ConnEvent::Message { payload, seq }),
        }
    }

    /// A message arrived: postpones the idle timeout, once per read (every frame of a read
    /// has the same `now`; the clock subtraction per message was a few percent of the echo).
    fn app_data_in_read(&mut self, now: Instant) {
        if !self.app_data_in_this_read {
            self.app_data_in_this_read = true;
            self.liveness.on_app_data(now);
        }
    }

    /// Transmits every session message not yet sent on this connection, with a piggybacked
    /// cumulative ACK when one is owed (same write, so the same TCP segment).
    pub(super) fn pump_session(&mut self, now: Instant) {
        let Some(s) = &mut self.session else { return };
        let mut sent = false;
        while let Some((seq, msg)) = s.next_to_send() {
            codec::encode_seq_data_header(seq, msg.len(), &mut self.out);
            transmit::queue_payload(&mut self.out, &mut self.queued, &msg);
            self.stats.messages_out += 1;
            sent = true;
        }
        if sent {
            if let Some(a) = s.poll_ack(now, true) {
                codec::encode(&Frame::Ack(a), &mut self.out);
            }
            self.liveness.on_send(now);
        }
    }

    pub(super) fn send_due_ack(&mut self, now: Instant) {
        let Some(s) = &mut self.session else { return };
        if let Some(a) = s.poll_ack(now, false) {
            codec::encode(&Frame::Ack(a), &mut self.out);
            self.liveness.on_send(now);
        }
    }

    /// Counts as liveness without data: the driver paused reading because the application
    /// is slow, so bytes may be waiting unread and the peer must not be blamed for it.
    pub fn note_alive(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        self.liveness.on_receive(now);
        self.drain_liveness(now);
    }

    /// Acts on what the liveness engine asks for.
    pub(super) fn drain_liveness(&mut self, now: Instant) {
        while let Some(ev) = self.liveness.poll_event() {
            match ev {
                // Bytes still waiting to be written already prove we are alive when they
                // arrive; a heartbeat queued behind them would only pile up (DESIGN §4).
                LivenessEvent::SendHeartbeat if self.pending_transmit_len() == 0 => {
                    codec::encode(&Frame::Heartbeat, &mut self.out)
                }
                LivenessEvent::SendHeartbeat => {}
                LivenessEvent::SendPing(n) => codec::encode(&Frame::Ping(n), &mut self.out),
                // `finish` reports the same silence: one clock (the engine's `last_rx`).
                LivenessEvent::PeerDead { .. } => self.close_with(
                    now,
                    CloseCode::HEARTBEAT_TIMEOUT,
                    "nothing received within dead_after",
                    DisconnectReason::HeartbeatTimeout,
                ),
                LivenessEvent::Suspect { silent_for } => {
                    self.events.push_back(ConnEvent::Suspect { silent_for })
                }
                LivenessEvent::Recovered { silent_for } => {
                    self.events.push_back(ConnEvent::Recovered { silent_for })
                }
                LivenessEvent::IdleTimeout { idle_for } => {
                    let text = format!("no application data for {} ms", idle_for.as_millis());
                    self.close_with(
                        now,
                        CloseCode::IDLE_TIMEOUT,
                        &text,
                        DisconnectReason::IdleTimeout,
                    );
                }
                LivenessEvent::Rtt { sample, smoothed } => {
                    self.events.push_back(ConnEvent::Rtt { sample, smoothed })
                }
                LivenessEvent::HeartbeatFlood { count, window } => {
                    let text = format!(
                        "{count} heartbeats within {} ms: more often than the agreed interval",
                        window.as_millis()
                    );
                    self.close_with(
                        now,
                        CloseCode::POLICY_VIOLATION,
                        &text,
                        DisconnectReason::PolicyViolation,
                    );
                }
            }
        }
    }
}
