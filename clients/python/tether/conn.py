"""One tether client connection as a sans-IO state machine: preamble, handshake, frames,
liveness, session and credential refresh. No sockets, no clock: every input carries ``now``
(integer milliseconds from any origin) and ``poll_timeout()`` says when ``handle_timeout``
is next needed. The asyncio driver (client.py) and the conformance runner both drive it.

    preamble + HELLO  ------------------->  (queued at construction)
    Established      <-------------------  preamble + WELCOME | REFUSE
    DATA / SEQ_DATA / ACK / heartbeats / PING / PONG / AUTH / AUTH_OK  <------>
    Closed(Disconnect)                      always the last event

Liveness (PROTOCOL.md §7), from the WELCOME's h and d:
    last_tx --h--> send HEARTBEAT     (only if nothing was sent for h)
    last_rx --d--> peer dead          (never earlier than d; any byte counts)
"""

from collections import deque

from . import codec
from .codec import CloseCode, ProtocolError
from .session import DELIVER, DUPLICATE, AckBeyondSent, Session, SessionConfig

# Disconnect reasons (labels shared with the reference implementation).
PEER_CLOSED = "peer-closed"
PEER_RESET = "peer-reset"
HEARTBEAT_TIMEOUT = "heartbeat-timeout"
KEEPALIVE_TIMEOUT = "keepalive-timeout"
USER_TIMEOUT = "user-timeout"
PROTOCOL_ERROR = "protocol-error"
REFUSED = "refused"
REPLACED = "replaced"
LOCAL_CLOSE = "local-close"
PEER_CLOSE = "peer-close"
IO_ERROR = "io-error"
CONNECT_REFUSED = "connect-refused"

# What a reconnecting client does after a disconnect.
RETRY_BACKOFF = "backoff"
RETRY_NOW = "now"
RETRY_NEVER = "never"

_TERMINAL_REFUSALS = (CloseCode.BAD_HELLO, CloseCode.UNSUPPORTED_VERSION,
                      CloseCode.UNAUTHORIZED, CloseCode.ID_NOT_ALLOWED)


class Disconnect:
    """Why a connection ended: ``reason`` (a label above), ``code`` and ``text`` (for
    ``refused`` and ``peer-close``; ``code`` 5 for ``replaced``), and how long nothing had
    been received (``silent_for_ms``)."""

    __slots__ = ("reason", "code", "text", "silent_for_ms")

    def __init__(self, reason, code=None, text="", silent_for_ms=0):
        self.reason = reason
        self.code = code
        self.text = text
        self.silent_for_ms = silent_for_ms

    @property
    def retry(self):
        """``never`` (REPLACED, a refusal retrying cannot fix, the application closed),
        ``now`` (SESSION_UNKNOWN: start a new session at once) or ``backoff``."""
        if self.reason in (REPLACED, LOCAL_CLOSE):
            return RETRY_NEVER
        if self.reason == REFUSED:
            if self.code in _TERMINAL_REFUSALS:
                return RETRY_NEVER
            if self.code == CloseCode.SESSION_UNKNOWN:
                return RETRY_NOW
        return RETRY_BACKOFF

    def __repr__(self):
        extra = ""
        if self.code is not None:
            extra = " %d (%s)" % (self.code, CloseCode.name(self.code))
        if self.text:
            extra += ": " + self.text
        return "Disconnect(%s%s, silent %d ms)" % (self.reason, extra, self.silent_for_ms)

    __str__ = __repr__


class Event:
    __slots__ = ()

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__))


class Established(Event):
    """The handshake completed: the WELCOME (h, d, session grant, credential ttl)."""
    __slots__ = ("welcome",)

    def __init__(self, welcome):
        self.welcome = welcome


class Message(Event):
    __slots__ = ("payload",)

    def __init__(self, payload):
        self.payload = payload


class Resumed(Event):
    """The session was resumed; ``replayed`` of our messages are sent again."""
    __slots__ = ("replayed",)

    def __init__(self, replayed):
        self.replayed = replayed


class SessionLost(Event):
    """The session cannot continue. ``unacked`` = ``(first, last)``: our messages sent but
    never acknowledged, which may not have arrived (None: nothing outstanding). ``unsent``:
    messages never sent (only when the client stops for good)."""
    __slots__ = ("unacked", "unsent")

    def __init__(self, unacked, unsent=()):
        self.unacked = unacked
        self.unsent = list(unsent)


class AuthDue(Event):
    """90 % of the credential's ttl has passed: send AUTH with a fresh credential."""
    __slots__ = ()


class AuthOk(Event):
    __slots__ = ("credential_ttl_ms",)

    def __init__(self, ttl):
        self.credential_ttl_ms = ttl


class Closed(Event):
    """The connection ended; always the last event."""
    __slots__ = ("disconnect",)

    def __init__(self, disconnect):
        self.disconnect = disconnect


class SendError(Exception):
    """Why ``Conn.send`` refused a message: ``kind`` is ``full`` (replay buffer full: wait
    for an ACK), ``not-established``, ``closed`` or ``too-long``."""

    def __init__(self, kind, msg=""):
        super().__init__(msg or kind)
        self.kind = kind


class ConnConfig:
    __slots__ = ("max_frame_len", "handshake_timeout_ms", "session")

    def __init__(self, max_frame_len=codec.DEFAULT_MAX_FRAME_LEN, handshake_timeout_ms=10000, session=None):
        self.max_frame_len = max_frame_len
        self.handshake_timeout_ms = handshake_timeout_ms
        self.session = session or SessionConfig()


_PREAMBLE, _AWAIT_WELCOME, _ESTABLISHED, _CLOSED = range(4)


class Conn:
    """A client connection. Construction queues the preamble and HELLO; with ``session`` the
    HELLO resumes it."""

    def __init__(self, now, cfg, hello, session=None):
        self.cfg = cfg
        self._state = _PREAMBLE
        self._pre = b""
        self._decoder = codec.Decoder(cfg.max_frame_len)
        self._out = bytearray()
        self._events = deque()
        self._handshake_deadline = now + cfg.handshake_timeout_ms
        self._last_rx = now
        self._last_tx = now
        self._h = None
        self._d = None
        self._dead = False
        self._hb_this_read = False
        self.session = session
        self.want_session = hello.want_session or session is not None
        self.has_credential = hello.credential is not None
        self._auth_due = None
        self._auth_outstanding = False
        self.welcome = None
        if session is not None:
            hello = codec.Hello(hello.client_id, hello.heartbeat_ms, True,
                                codec.Resume(session.id, session.token, session.last_received),
                                hello.credential)
        self._out += codec.PREAMBLE + codec.encode(hello)

    # --- state -----------------------------------------------------------------------------

    @property
    def established(self):
        return self._state == _ESTABLISHED

    @property
    def closed(self):
        return self._state == _CLOSED

    @property
    def last_rx(self):
        return self._last_rx

    def can_send(self, n):
        """A message of ``n`` bytes can be sent now (the replay buffer has room)."""
        return self.session is None or self.session.has_room(n)

    def max_payload(self):
        return self.cfg.max_frame_len - (9 if self.session is not None else 1)

    def take_session(self):
        """The session, to hand to the next connection (after this one ended)."""
        s, self.session = self.session, None
        return s

    # --- output ----------------------------------------------------------------------------

    def pending_transmit(self):
        return self._out

    def transmitted(self, n):
        del self._out[:n]

    def take_transmit(self):
        out = bytes(self._out)
        self._out.clear()
        return out

    def poll_event(self):
        return self._events.popleft() if self._events else None

    # --- application -----------------------------------------------------------------------

    def send(self, now, payload):
        """Queues one message. Raises SendError."""
        if self._state == _CLOSED:
            raise SendError("closed")
        if self._state != _ESTABLISHED:
            raise SendError("not-established")
        if len(payload) > self.max_payload():
            raise SendError("too-long", "message of %d bytes exceeds %d" % (len(payload), self.max_payload()))
        if self.session is not None:
            if self.session.push(bytes(payload)) is None:
                raise SendError("full")
            self._pump_session(now)
        else:
            self._out += codec.encode_data(payload)
            self._on_send(now)

    def auth(self, now, credential):
        """Sends AUTH with a fresh credential (PROTOCOL.md §13)."""
        if self._state != _ESTABLISHED:
            raise SendError("closed" if self._state == _CLOSED else "not-established")
        if not self.has_credential:
            raise ValueError("AUTH needs a HELLO with a credential")
        if not 1 <= len(credential) <= codec.MAX_CREDENTIAL_LEN:
            raise ValueError("a credential is 1-8192 bytes")
        if self._auth_outstanding:
            raise ValueError("an AUTH is already waiting for its AUTH_OK")
        self._auth_outstanding = True
        self._auth_due = None
        self._out += codec.encode(codec.Auth(bytes(credential)))
        self._on_send(now)

    def close(self, now, code=CloseCode.NORMAL, text=""):
        """Closes in order: an ACK we owe (so the peer does not report its last messages as
        possibly lost), then CLOSE(code, text), if established."""
        if self._state == _ESTABLISHED and self.session is not None:
            a = self.session.poll_ack(now, True)
            if a is not None:
                self._out += codec.encode_ack(a)
        reason = REPLACED if code == CloseCode.REPLACED else LOCAL_CLOSE
        self._close_with(now, code, text, Disconnect(reason))

    # --- transport -------------------------------------------------------------------------

    def handle_eof(self, now):
        self._finish(now, Disconnect(PEER_CLOSED))

    def handle_transport_error(self, now, reason, text=""):
        """``reason``: PEER_RESET, KEEPALIVE_TIMEOUT, USER_TIMEOUT or IO_ERROR."""
        self._finish(now, Disconnect(reason, text=text))

    def handle_input(self, now, data):
        if self._state == _CLOSED or not data:
            return
        if now > self._last_rx:
            self._last_rx = now
        if self._state == _PREAMBLE:
            need = 5 - len(self._pre)
            self._pre += bytes(data[:need])
            data = data[need:]
            if len(self._pre) < 5:
                return
            if self._pre[:4] != codec.MAGIC:
                self._finish(now, Disconnect(PROTOCOL_ERROR, text="not a tether server: it answered %r"
                                             % bytes(self._pre + bytes(data[:11]))))
                return
            if self._pre[4] != codec.VERSION:
                self._finish(now, Disconnect(PROTOCOL_ERROR, text="unsupported protocol version %d" % self._pre[4]))
                return
            self._state = _AWAIT_WELCOME
            if not data:
                return
        self._hb_this_read = False
        try:
            for f in self._decoder.feed(data):
                self._handle_frame(now, f)
                if self._state == _CLOSED:
                    return
        except ProtocolError as e:
            if self._state != _CLOSED:
                self._protocol_error(now, e.why)

    # --- timers ----------------------------------------------------------------------------

    def poll_timeout(self):
        if self._state == _CLOSED:
            return None
        if self._handshake_deadline is not None:
            return self._handshake_deadline
        t = min(self._last_tx + self._h, self._last_rx + self._d)
        if self.session is not None:
            a = self.session.poll_timeout()
            if a is not None and a < t:
                t = a
        if self._auth_due is not None and self._auth_due < t:
            t = self._auth_due
        return t

    def handle_timeout(self, now):
        if self._state == _CLOSED:
            return
        if self._handshake_deadline is not None:
            if now >= self._handshake_deadline:
                self._finish(now, Disconnect(PROTOCOL_ERROR, text="handshake timeout: no welcome"))
            return
        self._send_due_ack(now)
        if now >= self._last_rx + self._d:
            self._dead = True
            self._close_with(now, CloseCode.HEARTBEAT_TIMEOUT, "nothing received within dead_after",
                             Disconnect(HEARTBEAT_TIMEOUT))
            return
        if self._auth_due is not None and now >= self._auth_due:
            self._auth_due = None
            self._events.append(AuthDue())
        if now >= self._last_tx + self._h:
            self._last_tx = now
            # Bytes still waiting to be written prove us alive when they arrive.
            if not self._out:
                self._out += b"\x00\x00\x00\x00"

    # --- internals -------------------------------------------------------------------------

    def _on_send(self, now):
        if now > self._last_tx:
            self._last_tx = now

    def _handle_frame(self, now, f):
        if self._state == _AWAIT_WELCOME:
            t = type(f)
            if t is codec.Welcome:
                self._on_welcome(now, f)
            elif t is codec.Refuse:
                if f.code == CloseCode.SESSION_UNKNOWN and self.session is not None:
                    old = self.take_session()
                    self._events.append(SessionLost(old.unacked_range()))
                self._finish(now, Disconnect(REFUSED, f.code, f.text))
            else:
                self._protocol_error(now, "expected WELCOME or REFUSE, got %s" % codec.frame_name(f))
            return
        self._handle_established(now, f)

    def _on_welcome(self, now, w):
        if w.credential_ttl_ms is not None and not self.has_credential:
            self._protocol_error(now, "CREDENTIAL_TTL without a credential in the HELLO")
            return
        self._state = _ESTABLISHED
        self._handshake_deadline = None
        self._h = w.heartbeat_ms
        self._d = w.dead_after_ms
        self._last_tx = now
        self._last_rx = now
        self.welcome = w
        if w.credential_ttl_ms:
            self._auth_due = now + w.credential_ttl_ms * 9 // 10
        self._events.append(Established(w))
        g = w.session
        s = self.session
        if g is not None and s is not None and g.resumed and g.session_id == s.id:
            try:
                n = s.resume(g.last_received)
            except AckBeyondSent as e:
                self._protocol_error(now, "server resumed from %d but only %d were sent" % (e.acked, e.sent))
                return
            s.token = bytes(g.token)  # rotation: always keep the newest token
            a = s.poll_ack(now, True)
            if a is not None:
                self._out += codec.encode_ack(a)
            self._events.append(Resumed(n))
            self._pump_session(now)
            return
        if s is not None:
            self.session = None
            self._events.append(SessionLost(s.unacked_range()))
        if g is not None and self.want_session:
            self.session = Session(g.session_id, g.token, self.cfg.session)

    def _handle_established(self, now, f):
        t = type(f)
        s = self.session
        if t is codec.Heartbeat:
            # Heartbeats in one read count once (they were queued behind a stall).
            if not self._hb_this_read:
                self._hb_this_read = True
                # Coalesce: if ours is due within h/2, send it now, in this wake-up.
                if self._last_tx + self._h <= now + self._h // 2:
                    self._last_tx = now
                    if not self._out:
                        self._out += b"\x00\x00\x00\x00"
        elif t is codec.SeqData and s is not None:
            r = s.on_data(now, f.seq)
            if r is DELIVER:
                self._events.append(Message(f.payload))
                self._send_due_ack(now)
            elif r is not DUPLICATE:
                self._protocol_error(now, "SEQ_DATA %d but %d was expected" % (f.seq, r))
        elif t is codec.Data and s is None:
            self._events.append(Message(f.payload))
        elif t is codec.Ack and s is not None:
            try:
                s.on_ack(f.seq)
            except AckBeyondSent as e:
                self._protocol_error(now, "ACK %d beyond the last sent sequence %d" % (e.acked, e.sent))
        elif t is codec.Data:
            self._protocol_error(now, "DATA on a session connection (SEQ_DATA expected)")
        elif t is codec.Ping:
            self._out += codec.encode(codec.Pong(f.nonce))
            self._on_send(now)
        elif t is codec.Pong or t is codec.Extension:
            pass
        elif t is codec.Close:
            if f.code == CloseCode.REPLACED:
                d = Disconnect(REPLACED, f.code, f.text)
            else:
                d = Disconnect(PEER_CLOSE, f.code, f.text)
            self._finish(now, d)
        elif t is codec.AuthOk and self._auth_outstanding:
            self._auth_outstanding = False
            ttl = f.credential_ttl_ms
            self._auth_due = now + ttl * 9 // 10 if ttl else None
            self._events.append(AuthOk(ttl))
        elif t in (codec.SeqData, codec.Ack):
            self._protocol_error(now, "%s without a negotiated session" % codec.frame_name(f))
        else:
            self._protocol_error(now, "unexpected %s after the handshake" % codec.frame_name(f))

    def _pump_session(self, now):
        s = self.session
        sent = False
        while True:
            nxt = s.next_to_send()
            if nxt is None:
                break
            self._out += codec.encode_seq_data(nxt[0], nxt[1])
            sent = True
        if sent:
            a = s.poll_ack(now, True)
            if a is not None:
                self._out += codec.encode_ack(a)
            self._on_send(now)

    def _send_due_ack(self, now):
        s = self.session
        if s is None:
            return
        a = s.poll_ack(now, False)
        if a is not None:
            self._out += codec.encode_ack(a)
            self._on_send(now)

    def _protocol_error(self, now, why):
        self._close_with(now, CloseCode.PROTOCOL_ERROR, why, Disconnect(PROTOCOL_ERROR, text=why))

    def _close_with(self, now, code, text, d):
        if self._state == _CLOSED:
            return
        if self._state == _ESTABLISHED:
            self._out += codec.encode(codec.Close(code, text))
        self._finish(now, d)

    def _finish(self, now, d):
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._handshake_deadline = None
        d.silent_for_ms = max(0, now - self._last_rx)
        self._events.append(Closed(d))
