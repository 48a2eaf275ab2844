"""Sessions that lose nothing (PROTOCOL.md §12): sequence numbers, cumulative ACKs, a bounded
replay buffer, and resumption after a reconnect.

    send(msg) -> replay buffer [acked+1 ..= last_seq]   (bounded in bytes and messages)
                   | SEQ_DATA(seq, msg) ----------> peer: seq == last_received+1 -> deliver
                   |                                      seq <= last_received  -> duplicate, drop
                   <------------------- ACK(n) <-- peer: after ack_every messages or ack_delay
    on_ack(n): drop entries <= n

The state is handed from one connection to the next; times are integer milliseconds.
"""

from collections import deque


class SessionConfig:
    """Replay bounds and ACK timing. Defaults are the reference's: 4 MiB / 4096 messages,
    an ACK after 32 messages or 20 ms."""

    __slots__ = ("max_replay_bytes", "max_replay_messages", "ack_every", "ack_delay_ms")

    def __init__(self, max_replay_bytes=4 << 20, max_replay_messages=4096, ack_every=32, ack_delay_ms=20):
        self.max_replay_bytes = max_replay_bytes
        self.max_replay_messages = max_replay_messages
        self.ack_every = ack_every
        self.ack_delay_ms = ack_delay_ms


class AckBeyondSent(Exception):
    """The peer acknowledged (or resumed from) a sequence number never sent."""

    def __init__(self, acked, sent):
        super().__init__("%d acknowledged but only %d sent" % (acked, sent))
        self.acked = acked
        self.sent = sent


DELIVER = "deliver"
DUPLICATE = "duplicate"


class Session:
    """One side's session state."""

    __slots__ = ("id", "token", "cfg", "last_seq", "acked", "replay", "replay_bytes", "sent",
                 "last_received", "ack_sent", "ack_deadline", "resumes")

    def __init__(self, session_id, token, cfg=None):
        self.id = session_id
        self.token = bytes(token)
        self.cfg = cfg or SessionConfig()
        self.last_seq = 0          # last message pushed
        self.acked = 0             # highest seq the peer acknowledged
        self.replay = deque()      # unacknowledged messages: seq acked+1 ..= last_seq
        self.replay_bytes = 0
        self.sent = 0              # last seq transmitted on the current connection
        self.last_received = 0     # highest seq received in order
        self.ack_sent = 0          # highest seq we acknowledged
        self.ack_deadline = None
        self.resumes = 0

    def unacked_range(self):
        """``(first, last)`` of the messages that may not have been delivered, or None."""
        if self.last_seq > self.acked:
            return (self.acked + 1, self.last_seq)
        return None

    def has_room(self, n):
        """A message of ``n`` bytes fits; an empty buffer always takes one message."""
        return not self.replay or (
            len(self.replay) < self.cfg.max_replay_messages
            and self.replay_bytes + n <= self.cfg.max_replay_bytes)

    def push(self, msg):
        """Takes a message; its sequence number, or None when the buffer is full."""
        if not self.has_room(len(msg)):
            return None
        self.last_seq += 1
        self.replay_bytes += len(msg)
        self.replay.append(msg)
        return self.last_seq

    def next_to_send(self):
        """``(seq, msg)`` of the next message to transmit on this connection, or None."""
        if self.sent >= self.last_seq:
            return None
        self.sent += 1
        return self.sent, self.replay[self.sent - self.acked - 1]

    def on_ack(self, seq):
        """The peer has everything up to ``seq``. Older ACKs are ignored."""
        if seq > self.last_seq:
            raise AckBeyondSent(seq, self.last_seq)
        while self.acked < seq:
            m = self.replay.popleft()
            self.replay_bytes -= len(m)
            self.acked += 1
        if self.sent < self.acked:
            self.sent = self.acked

    def resume(self, peer_last_received):
        """A new connection took the session over; returns how many messages are replayed."""
        self.on_ack(peer_last_received)
        self.sent = self.acked
        self.ack_deadline = None
        self.ack_sent = 0
        self.resumes += 1
        return self.last_seq - self.acked

    def on_data(self, now, seq):
        """DELIVER, DUPLICATE, or the expected seq (an int) for a gap."""
        if seq <= self.last_received:
            return DUPLICATE
        if seq != self.last_received + 1:
            return self.last_received + 1
        self.last_received = seq
        if self.ack_deadline is None:
            self.ack_deadline = now + self.cfg.ack_delay_ms
        return DELIVER

    def poll_ack(self, now, force):
        """The ACK to send now (marked sent), or None."""
        if self.last_received <= self.ack_sent:
            return None
        due = (force or self.last_received - self.ack_sent >= self.cfg.ack_every
               or (self.ack_deadline is not None and now >= self.ack_deadline))
        if not due:
            return None
        self.ack_sent = self.last_received
        self.ack_deadline = None
        return self.last_received

    def poll_timeout(self):
        if self.last_received > self.ack_sent:
            return self.ack_deadline
        return None
