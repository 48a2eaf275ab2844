"""The reconnecting asyncio client: one ``Conn`` per connection, driven by an
``asyncio.Protocol`` (bytes in, timer, bytes out), a supervisor that reconnects with capped
exponential backoff and full jitter, and a session carried from one connection to the next.

    start --> connect --ok--> Connected --> Resumed? --> Message* --error--> Disconnected(d)
                 ^                                                              |
                 +--- sleep(delay) <-- Reconnecting(attempt, delay) <-- d.retry == "backoff"
                      d.retry == "now": reconnect at once (new session after SESSION_UNKNOWN)
                      d.retry == "never": SessionLost(unacked, unsent)? then Stopped(d)

Messages given to ``send`` wait in an outbox that outlives single connections (bounded: ``send``
waits when it is full), move into the session's replay buffer (bounded too) when a
connection can take them, and leave it when the server acknowledges them.
"""

import asyncio
import math
from collections import deque
import random
import socket
import ssl as _ssl

from . import codec
from .codec import CloseCode
from .conn import (
    CONNECT_REFUSED, HEARTBEAT_TIMEOUT, IO_ERROR, KEEPALIVE_TIMEOUT, LOCAL_CLOSE, PEER_RESET,
    RETRY_NEVER, RETRY_NOW, USER_TIMEOUT, AuthDue, Closed, Conn, ConnConfig, Disconnect,
    Established, Message, Resumed, SessionLost,
)
from .session import SessionConfig

CLOSE_LINGER = 2.0
_FAILURES = (HEARTBEAT_TIMEOUT, KEEPALIVE_TIMEOUT, USER_TIMEOUT, PEER_RESET, IO_ERROR)


# --- events ---------------------------------------------------------------------------------


class ClientEvent:
    __slots__ = ()

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__))


class Connected(ClientEvent):
    """Connected (again): ``welcome`` has h, d, the session grant and the credential ttl."""
    __slots__ = ("welcome",)

    def __init__(self, welcome):
        self.welcome = welcome


class Disconnected(ClientEvent):
    """A connection ended or an attempt failed: ``disconnect.reason``, ``.code``, ``.text``,
    ``.silent_for_ms``, and ``.retry`` (what the client does next)."""
    __slots__ = ("disconnect",)

    def __init__(self, disconnect):
        self.disconnect = disconnect


class Reconnecting(ClientEvent):
    """Waiting ``delay`` seconds before attempt ``attempt`` (1-based)."""
    __slots__ = ("attempt", "delay")

    def __init__(self, attempt, delay):
        self.attempt = attempt
        self.delay = delay


class Stopped(ClientEvent):
    """The client stopped for good (closed, REPLACED, a refusal retrying cannot fix, or
    attempts exhausted); always the last event."""
    __slots__ = ("disconnect",)

    def __init__(self, disconnect):
        self.disconnect = disconnect


class ClientStopped(Exception):
    """``send`` on a client that stopped; ``disconnect`` says why."""

    def __init__(self, disconnect):
        super().__init__("client stopped: %s" % (disconnect,))
        self.disconnect = disconnect


# --- pieces ---------------------------------------------------------------------------------


class Backoff:
    """Capped exponential backoff with full jitter: delay n is uniform in
    [0, min(cap, base * 2^n)] seconds; ``None`` once ``max_attempts`` delays were handed out."""

    def __init__(self, base=0.1, cap=30.0, max_attempts=None, seed=None):
        self.base = base
        self.cap = cap
        self.max_attempts = max_attempts
        self.attempt = 0
        self._rng = random.Random(seed)

    def ceiling(self, n):
        return min(self.cap, self.base * (2.0 ** min(n, 1000)))

    def next_delay(self):
        if self.max_attempts is not None and self.attempt >= self.max_attempts:
            return None
        d = self._rng.uniform(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return d

    def reset(self):
        self.attempt = 0


def socket_options(detect_within_ms, path_timeout_ms=None):
    """Keepalive (idle, interval, count in seconds) and TCP_USER_TIMEOUT (ms) for a detection
    bound, as docs/PLAN.md derives them: idle + count x interval <= the bound."""
    d = detect_within_ms / 1000.0
    p = path_timeout_ms / 1000.0 if path_timeout_ms else math.inf
    idle = max(1, min(32767, int(min(d / 2, p / 3))))
    interval = max(1, min(32767, int(min((d - idle) / 3, p / 3))))
    count = max(1, min(127, int((d - idle) / interval)))
    return (idle, interval, count), detect_within_ms


def apply_socket_options(sock, keepalive, user_timeout_ms):
    """TCP_NODELAY, SO_KEEPALIVE with idle/interval/count, TCP_USER_TIMEOUT: whatever this
    platform offers (Linux: all of it)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle, interval, count = keepalive
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            elif hasattr(socket, "TCP_KEEPALIVE"):  # macOS
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, idle)
            if hasattr(socket, "TCP_KEEPINTVL"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            if hasattr(socket, "TCP_KEEPCNT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if user_timeout_ms and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_ms))
    except OSError:
        pass


def tls_context(ca_file=None, cert_file=None, key_file=None):
    """A verifying client context: the system's roots, or only ``ca_file``; a client
    certificate when ``cert_file`` is given."""
    ctx = _ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# --- one connection -------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """Drives one ``Conn`` over one transport."""

    def __init__(self, client, conn):
        self.client = client
        self.conn = conn
        self.loop = client._loop
        self.transport = None
        self.paused = False
        self.established = False
        self.eof = False
        self.timer = None
        self.armed = None
        self.last_write = None
        self.finished = False
        self.pump_soon = False
        self.disconnect = None
        self.ended = self.loop.create_future()   # the Disconnect, as soon as it is known
        self.gone = self.loop.create_future()    # the transport is closed

    def now(self):
        return int(self.loop.time() * 1000)

    # asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            ka, ut = self.client._sockopts(None)
            apply_socket_options(sock, ka, ut)
        self.pump()

    def data_received(self, data):
        self.conn.handle_input(self.now(), data)
        self.pump()

    def eof_received(self):
        self.eof = True
        self.conn.handle_eof(self.now())
        self.pump()
        return True

    def connection_lost(self, exc):
        if not self.conn.closed:
            now = self.now()
            if exc is None:
                self.conn.handle_eof(now)
            elif isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
                self.conn.handle_transport_error(now, PEER_RESET)
            elif isinstance(exc, TimeoutError):
                wrote = self.last_write is not None and self.last_write >= self.conn.last_rx
                self.conn.handle_transport_error(now, USER_TIMEOUT if wrote else KEEPALIVE_TIMEOUT)
            else:
                self.conn.handle_transport_error(now, IO_ERROR, str(exc))
            self.pump()
        self._cancel_timer()
        if not self.gone.done():
            self.gone.set_result(None)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.pump()

    # driving

    def schedule_pump(self):
        """One pump per loop iteration for sends: messages queued together leave in one write
        (one syscall), as the reference driver writes once per wake-up."""
        if not self.pump_soon:
            self.pump_soon = True
            self.loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self):
        self.pump_soon = False
        self.pump()

    def pump(self):
        if self.finished:
            return
        c = self.conn
        now = self.now()
        if c.established and not self.paused:
            self.client._feed(c, now)
            if self.client._closing and not self.client._outbox and not c.closed:
                c.close(now, CloseCode.NORMAL, "client closing")
        elif self.client._closing and not c.established and not c.closed:
            c.close(now, CloseCode.NORMAL, "client closing")  # not established: nothing to flush
        while True:
            ev = c.poll_event()
            if ev is None:
                break
            self.client._on_event(self, ev)
        t = self.transport
        if t is not None and c.pending_transmit() and not self.paused and not t.is_closing():
            t.write(c.take_transmit())
            self.last_write = now
        if c.closed:
            self._finish()
            return
        self._arm(c.poll_timeout())

    def _arm(self, deadline):
        if deadline is None:
            return
        if self.armed is not None and self.armed <= deadline:
            return  # an earlier wake-up is harmless: deadlines are re-checked
        self._cancel_timer()
        self.armed = deadline
        self.timer = self.loop.call_at(deadline / 1000.0, self._on_timer, deadline)

    def _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.armed = None

    def _on_timer(self, deadline):
        self.timer = None
        self.armed = None
        # The timer fired for `deadline`: time is at least that (the loop may wake a hair early).
        self.conn.handle_timeout(max(self.now(), deadline))
        self.pump()

    def _finish(self):
        self.finished = True
        self._cancel_timer()
        d = self.disconnect
        if not self.ended.done():
            self.ended.set_result(d)
        t = self.transport
        if t is None or t.is_closing():
            return
        if d is not None and d.reason in _FAILURES:
            # Abortive (RST): no retransmissions into a dead path.
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
            t.abort()
            return
        if self.conn.pending_transmit():
            t.write(self.conn.take_transmit())
        if not self.eof and t.can_write_eof():
            # Orderly: FIN after the CLOSE frame; wait (bounded) for the peer's FIN.
            t.write_eof()
            self.loop.call_later(CLOSE_LINGER, t.close)
        else:
            t.close()


# --- the client -----------------------------------------------------------------------------


class Client:
    """A tether client that reconnects on its own and resumes its session.

    ``credential``: bytes or str sent in every HELLO, or a callable (plain or async)
    returning one, called for each connection and for each refresh before the server's
    credential ttl runs out. TLS: ``tls=True`` (system roots), ``ca_file``,
    ``server_name`` (default: ``host``), ``cert_file``/``key_file`` for a client
    certificate, or ``tls=`` an ``ssl.SSLContext``. ``detect_within`` (seconds) sets the
    socket's keepalive and TCP_USER_TIMEOUT; by default they follow the server's
    dead-after. Use ``async with Client(...) as c`` or ``start()`` / ``await close()``.
    """

    def __init__(self, host, port, client_id, *, session=True, credential=None, tls=None,
                 ca_file=None, server_name=None, cert_file=None, key_file=None, heartbeat=0.0,
                 detect_within=None, path_timeout=None, backoff_base=0.1, backoff_cap=30.0,
                 max_attempts=None, seed=None, handshake_timeout=10.0,
                 max_frame_len=codec.DEFAULT_MAX_FRAME_LEN, session_config=None, outbox_bytes=1 << 20):
        problem = codec.client_id_problem(client_id)
        if problem:
            raise ValueError("invalid client id %r: %s" % (client_id, problem))
        self.host = host
        self.port = port
        self.client_id = client_id
        self.want_session = session
        self._credential = credential
        if isinstance(tls, _ssl.SSLContext):
            self._ssl = tls
        elif tls or ca_file or cert_file:
            self._ssl = tls_context(ca_file, cert_file, key_file)
        else:
            self._ssl = None
        self._server_name = server_name or host
        self._heartbeat_ms = int(heartbeat * 1000)
        self._detect_ms = int(detect_within * 1000) if detect_within else None
        self._path_ms = int(path_timeout * 1000) if path_timeout else None
        self._backoff = Backoff(backoff_base, backoff_cap, max_attempts, seed)
        self._handshake_timeout = handshake_timeout
        self._conn_cfg = ConnConfig(max_frame_len, int(handshake_timeout * 1000),
                                    session_config or SessionConfig())
        self._outbox_limit = outbox_bytes
        self._outbox = deque()
        self._outbox_bytes = 0
        self._space = None
        self._wake = None
        self._events = None
        self._loop = None
        self._task = None
        self._link = None
        self._closing = False
        self._stopped = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self):
        """Starts connecting in the background (call from a running event loop)."""
        if self._task is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        self._wake = asyncio.Event()
        self._events = asyncio.Queue()
        self._task = self._loop.create_task(self._run())
        return self

    async def __aenter__(self):
        return self.start()

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self, timeout=5.0):
        """Closes in order once the queued messages went out (at most ``timeout`` seconds,
        then abruptly), and stops."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        link = self._link
        if link is not None:
            link.pump()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            link = self._link
            if link is not None and not link.conn.closed:
                link.conn.close(link.now(), CloseCode.NORMAL, "client closing")
                link.pump()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 1.0)
            except asyncio.TimeoutError:
                self._task.cancel()
        link = self._link
        if link is not None:
            try:
                await asyncio.wait_for(asyncio.shield(link.gone), CLOSE_LINGER + 0.5)
            except asyncio.TimeoutError:
                pass

    @property
    def connected(self):
        """True while a connection is established."""
        return self._link is not None and self._link.established and not self._link.conn.closed

    @property
    def queued(self):
        """Messages waiting for a connection (not yet in a session)."""
        return len(self._outbox)

    @property
    def stopped(self):
        """The Disconnect the client stopped with, or None while it runs."""
        return self._stopped

    # --- sending and receiving -------------------------------------------------------------

    async def send(self, payload):
        """Queues one message (bytes). With a session it is delivered exactly once, in order,
        unless a SessionLost event names its sequence number. Waits while the outbox is full.
        Raises ClientStopped once the client stopped."""
        payload = bytes(payload)
        limit = self._conn_cfg.max_frame_len - (9 if self.want_session else 1)
        if len(payload) > limit:
            raise ValueError("message of %d bytes exceeds the maximum of %d" % (len(payload), limit))
        while True:
            if self._stopped is not None:
                raise ClientStopped(self._stopped)
            if not self._outbox or self._outbox_bytes + len(payload) <= self._outbox_limit:
                break
            self._space.clear()
            await self._space.wait()
        self._outbox.append(payload)
        self._outbox_bytes += len(payload)
        link = self._link
        if link is not None and link.established:
            link.schedule_pump()

    async def next_event(self):
        """The next event; None after Stopped."""
        if self._events is None:
            raise RuntimeError("start() the client first")
        if self._stopped is not None and self._events.empty():
            return None
        return await self._events.get()

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self.next_event()
        if ev is None:
            raise StopAsyncIteration
        return ev

    # --- internals -------------------------------------------------------------------------

    def _emit(self, ev):
        self._events.put_nowait(ev)

    def _sockopts(self, dead_after_ms):
        d = self._detect_ms or dead_after_ms or 30000
        return socket_options(d, self._path_ms)

    def _feed(self, conn, now):
        moved = False
        out = self._outbox
        while out and conn.can_send(len(out[0])):
            msg = out.popleft()
            self._outbox_bytes -= len(msg)
            conn.send(now, msg)
            moved = True
        if moved:
            self._space.set()

    def _on_event(self, link, ev):
        t = type(ev)
        if t is Message:
            self._emit(ev)
        elif t is Established:
            link.established = True
            w = ev.welcome
            if self._detect_ms is None and link.transport is not None:
                sock = link.transport.get_extra_info("socket")
                if sock is not None:
                    ka, ut = self._sockopts(w.dead_after_ms)
                    apply_socket_options(sock, ka, ut)
            self._emit(Connected(w))
        elif t is Resumed or t is SessionLost:
            self._emit(ev)
        elif t is AuthDue:
            self._loop.create_task(self._refresh(link))
        elif t is Closed:
            link.disconnect = ev.disconnect
            self._emit(Disconnected(ev.disconnect))

    async def _credential_bytes(self):
        c = self._credential
        if callable(c):
            c = c()
            if asyncio.iscoroutine(c) or isinstance(c, asyncio.Future):
                c = await c
        if isinstance(c, str):
            c = c.encode("utf-8")
        return c

    async def _refresh(self, link):
        try:
            cred = await self._credential_bytes()
        except Exception:  # the provider failed: the server closes at the ttl (credential-expired)
            return
        if cred and link.conn.established and not link.finished:
            try:
                link.conn.auth(link.now(), cred)
            except Exception:  # the connection ended meanwhile (SendError) or refused it
                return
            link.pump()

    def _stop(self, d, session, orderly=False):
        """Stops for good. What cannot be delivered any more is reported: the session's
        unacknowledged range (unless the connection was closed in order: the server read
        everything before our CLOSE) and the messages never sent."""
        unacked = session.unacked_range() if session is not None and not orderly else None
        unsent = list(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0
        if unacked is not None or unsent:
            self._emit(SessionLost(unacked, unsent))
        self._stopped = d
        self._emit(Stopped(d))
        self._space.set()

    async def _run(self):
        loop = self._loop
        session = None
        while True:
            if self._closing:
                self._stop(Disconnect(LOCAL_CLOSE), session)
                return
            cred = None
            if self._credential is not None:
                try:
                    cred = await self._credential_bytes()
                except Exception as e:
                    d = Disconnect(IO_ERROR, text="credential provider failed: %s" % e)
                    self._emit(Disconnected(d))
                    cred = None
                    if not await self._pause(d, session):
                        return
                    continue
            hello = codec.Hello(self.client_id, self._heartbeat_ms, self.want_session, None, cred)
            conn = Conn(int(loop.time() * 1000), self._conn_cfg, hello, session)
            session = None
            link = _Link(self, conn)
            self._link = link
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: link, self.host, self.port, ssl=self._ssl,
                                           server_hostname=self._server_name if self._ssl else None),
                    self._handshake_timeout)
            except ConnectionRefusedError:
                d = Disconnect(CONNECT_REFUSED)
                self._emit(Disconnected(d))
            except asyncio.TimeoutError:
                d = Disconnect(IO_ERROR, text="connect timed out after %.1fs" % self._handshake_timeout)
                self._emit(Disconnected(d))
            except (OSError, _ssl.SSLError) as e:
                d = Disconnect(IO_ERROR, text=str(e))
                self._emit(Disconnected(d))
            else:
                d = await link.ended
                if d is None:
                    d = Disconnect(IO_ERROR, text="connection ended")
                if link.established:
                    self._backoff.reset()
            session = conn.take_session()
            if self._closing:
                orderly = d.reason == LOCAL_CLOSE and link.established
                self._stop(d if d.reason == LOCAL_CLOSE else Disconnect(LOCAL_CLOSE), session, orderly)
                return
            if d.retry == RETRY_NEVER:
                self._stop(d, session)
                return
            if d.retry == RETRY_NOW:
                continue
            if not await self._pause(d, session):
                return

    async def _pause(self, d, session):
        """Waits the next backoff delay; False when the client stopped instead."""
        delay = self._backoff.next_delay()
        if delay is None:
            self._stop(d, session)
            return False
        self._emit(Reconnecting(self._backoff.attempt, delay))
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass
        if self._closing:
            self._stop(Disconnect(LOCAL_CLOSE), session)
            return False
        return True
