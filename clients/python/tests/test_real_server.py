"""The client against the real `tether serve` (built from this repository): exactly-once
delivery through a proxy that resets every connection every 50 ms, a silent server detected
within the bound, TLS, REPLACED, and the server behaviours the specification promises.

Bounds on real sockets are loose and two-sided (the machine may be busy)."""

import asyncio
import os
import struct
import time
import unittest

import tether
from tether import codec
from tether.conn import Closed, Conn, ConnConfig, Established, Message
from tether.session import Session

from .support import (
    SKIP_NO_SERVER, TLS, ResettingProxy, Server, SilentServer, TlsProxy, find_tether,
)

N = 10000


def run(coro, timeout):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(client, kinds, timeout):
    """The next event of one of `kinds`, collecting every event seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(client.next_event(), max(0.01, deadline - time.monotonic()))
        seen.append(ev)
        if ev is None or isinstance(ev, kinds):
            return ev, seen


@unittest.skipIf(find_tether() is None, SKIP_NO_SERVER)
class RealServer(unittest.TestCase):
    def test_chaos_10000_each_way_exactly_once_in_order(self):
        """10,000 numbered messages to the echo server and 10,000 echoes back, through a proxy
        that resets (RST) every connection every 50 ms: each delivered once, in order."""

        async def main(port):
            proxy = await ResettingProxy(port, 0.05).start()
            c = tether.Client("127.0.0.1", proxy.port, "chaos-py", backoff_base=0.02,
                              backoff_cap=0.2, seed=7)
            c.start()
            started = time.monotonic()

            async def produce():
                # Paced (50 messages every 20 ms, ~4 s in all) so that the transfer spans
                # many resets: unpaced, 10,000 messages go through between two of them.
                for i in range(1, N + 1):
                    await c.send(b"%05d" % i)
                    if i % 50 == 0:
                        await asyncio.sleep(0.02)

            producer = asyncio.get_running_loop().create_task(produce())
            expect = 1
            connects = replayed = 0
            try:
                while expect <= N:
                    ev = await c.next_event()
                    if isinstance(ev, tether.Message):
                        got = int(ev.payload)
                        self.assertEqual(got, expect, "echo %d arrived when %d was next" % (got, expect))
                        expect += 1
                    elif isinstance(ev, tether.Connected):
                        connects += 1
                    elif isinstance(ev, tether.Resumed):
                        replayed += ev.replayed
                    elif isinstance(ev, (tether.SessionLost, tether.Stopped)) or ev is None:
                        self.fail("unexpected %r" % (ev,))
                await producer
            finally:
                await c.close()
                await proxy.stop()
            elapsed = time.monotonic() - started
            print("\nchaos (python): %d messages each way, %d connections, %d resets, %d replayed, %.1f s"
                  % (N, connects, proxy.resets, replayed, elapsed))
            self.assertGreater(proxy.resets, 20, "the proxy must actually have reset connections")
            self.assertGreater(connects, 20)
            self.assertGreater(replayed, 0, "some messages must have been replayed after a resume")

        with Server() as srv:
            run(main(srv.port), 240)

    def test_silent_server_detected_within_dead_after(self):
        """A server that answers the handshake (d = 3 s) and then goes silent is declared dead
        d after the WELCOME, not before; the client heartbeats meanwhile."""

        async def main():
            silent = await SilentServer().start()
            c = tether.Client("127.0.0.1", silent.port, "silent-py", session=False,
                              backoff_base=5.0, backoff_cap=5.0)
            c.start()
            try:
                ev, _ = await until(c, tether.Connected, 10)
                self.assertEqual(ev.welcome.dead_after_ms, silent.d)
                ev, _ = await until(c, tether.Disconnected, 10)
                detected = time.monotonic()
            finally:
                await c.close()
                await silent.stop()
            self.assertEqual(ev.disconnect.reason, "heartbeat-timeout")
            after = detected - silent.welcomed[0]
            print("\nsilent server (python): detected %.2f s after the WELCOME (d = 3 s)" % after)
            self.assertGreaterEqual(after, 2.9)
            self.assertLessEqual(after, 4.5)
            heartbeats = sum(data.count(b"\x00\x00\x00\x00") for _, data in silent.received)
            self.assertGreaterEqual(heartbeats, 2, "a heartbeat every h = 1 s while idle")
            # The CLOSE(HEARTBEAT_TIMEOUT) that goes out just before the RST is best effort:
            # the peer's kernel may discard it when the RST arrives (the vectors check it).

        run(main(), 60)

    def test_idle_connection_kept_alive_by_heartbeats(self):
        """Idle for 1.5 x d: the server's dead-after never fires (heartbeats at its h)."""

        async def main(port):
            c = tether.Client("127.0.0.1", port, "idle-py")
            c.start()
            try:
                ev, _ = await until(c, tether.Connected, 10)
                d = ev.welcome.dead_after_ms / 1000.0
                await asyncio.sleep(1.5 * d)
                self.assertTrue(c.connected)
                await c.send(b"still here")
                ev, seen = await until(c, tether.Message, 10)
                self.assertEqual(ev.payload, b"still here")
                self.assertFalse([e for e in seen if isinstance(e, tether.Disconnected)])
            finally:
                await c.close()

        with Server() as srv:
            run(main(srv.port), 60)

    def test_tls_and_mutual_tls_through_a_terminating_proxy(self):
        """TLS with a private CA and the server name checked; then a client certificate."""

        async def main(port):
            for mutual in (False, True):
                proxy = await TlsProxy(port, os.path.join(TLS, "ca.pem") if mutual else None).start()
                kw = {}
                if mutual:
                    kw = dict(cert_file=os.path.join(TLS, "client.pem"), key_file=os.path.join(TLS, "client.key"))
                c = tether.Client("127.0.0.1", proxy.port, "tls-py", ca_file=os.path.join(TLS, "ca.pem"),
                                  server_name="localhost", **kw)
                c.start()
                try:
                    await until(c, tether.Connected, 10)
                    await c.send(b"over tls")
                    ev, _ = await until(c, tether.Message, 10)
                    self.assertEqual(ev.payload, b"over tls")
                finally:
                    await c.close()
                    await proxy.stop()
                if mutual:
                    self.assertEqual(proxy.peer_subjects[-1].get("commonName"), "demo-client")

        with Server() as srv:
            run(main(srv.port), 60)

    def test_tls_untrusted_server_is_an_error(self):
        async def main(port):
            proxy = await TlsProxy(port).start()
            c = tether.Client("127.0.0.1", proxy.port, "tls-bad-py", tls=True, server_name="localhost",
                              max_attempts=1)
            c.start()
            try:
                ev, seen = await until(c, tether.Stopped, 20)
                self.assertFalse([e for e in seen if isinstance(e, tether.Connected)])
                self.assertEqual(ev.disconnect.reason, "io-error")
                self.assertIn("CERTIFICATE", ev.disconnect.text.upper())
            finally:
                await c.close()
                await proxy.stop()

        with Server() as srv:
            run(main(srv.port), 60)

    def test_replaced_is_terminal(self):
        """A second connection with the same id replaces the first; the first stops for good
        (no reconnect loop) and reports what may be missing."""

        async def main(port):
            a = tether.Client("127.0.0.1", port, "twin-py")
            a.start()
            b = None
            try:
                await until(a, tether.Connected, 10)
                b = tether.Client("127.0.0.1", port, "twin-py")
                b.start()
                await until(b, tether.Connected, 10)
                ev, seen = await until(a, tether.Stopped, 10)
                self.assertEqual(ev.disconnect.reason, "replaced")
                self.assertEqual(ev.disconnect.retry, "never")
                self.assertFalse([e for e in seen if isinstance(e, tether.Reconnecting)])
                self.assertIsNone(await a.next_event())
                with self.assertRaises(tether.ClientStopped):
                    await a.send(b"x")
            finally:
                await a.close()
                if b is not None:
                    await b.close()

        with Server() as srv:
            run(main(srv.port), 60)

    def test_connect_refused_is_retried_with_backoff(self):
        async def main():
            import socket
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            c = tether.Client("127.0.0.1", port, "nobody-py", backoff_base=0.05, backoff_cap=0.1, max_attempts=3)
            c.start()
            ev, seen = await until(c, tether.Stopped, 20)
            reasons = [e.disconnect.reason for e in seen if isinstance(e, tether.Disconnected)]
            self.assertEqual(reasons, ["connect-refused"] * 4)
            self.assertEqual([e.attempt for e in seen if isinstance(e, tether.Reconnecting)], [1, 2, 3])
            for e in seen:
                if isinstance(e, tether.Reconnecting):
                    self.assertLessEqual(e.delay, 0.1)
            await c.close()

        run(main(), 30)


async def raw(port, conn, until_kinds, timeout=10):
    """Drives a bare Conn over a socket until one of `until_kinds` is reported; returns the
    events and the stream."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    events = []
    deadline = loop.time() + timeout
    while True:
        now = int(loop.time() * 1000)
        out = conn.take_transmit()
        if out:
            w.write(out)
        while True:
            ev = conn.poll_event()
            if ev is None:
                break
            events.append(ev)
            if isinstance(ev, until_kinds):
                return events, (r, w)
        if conn.closed:
            return events, (r, w)
        try:
            data = await asyncio.wait_for(r.read(65536), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise AssertionError("nothing happened; events so far %r" % events)
        now = int(loop.time() * 1000)
        if data:
            conn.handle_input(now, data)
        else:
            conn.handle_eof(now)


@unittest.skipIf(find_tether() is None, SKIP_NO_SERVER)
class ServerPromises(unittest.TestCase):
    """What docs/PROTOCOL.md says the reference server does, checked on the wire."""

    def test_unacceptable_client_id_is_refused_with_bad_hello(self):
        async def main(port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(codec.PREAMBLE + codec.encode(codec.Hello("bad\x01id", 0)))
            head = await asyncio.wait_for(r.readexactly(5 + 4), 5)
            self.assertEqual(head[:5], codec.PREAMBLE)
            body = await r.readexactly(struct.unpack(">I", head[5:])[0])
            f = codec.parse_body(body)
            self.assertIsInstance(f, codec.Refuse)
            self.assertEqual(f.code, codec.CloseCode.BAD_HELLO)
            w.close()

        with Server() as srv:
            run(main(srv.port), 30)

    def test_malformed_hello_is_closed_without_a_word(self):
        async def main(port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(codec.PREAMBLE + b"\x00\x00\x00\x07\x10\x00\x00\x00\x00\x00\x00")  # id_len 0
            self.assertEqual(await asyncio.wait_for(r.read(), 5), b"")
            w.close()

        with Server() as srv:
            run(main(srv.port), 30)

    def test_held_session_survives_a_resume_claiming_too_much(self):
        """RESUME with last_received beyond what the server sent: REFUSE(BAD_HELLO) before
        the token rotates, and the held session is untouched: a correct resume with the same
        token still succeeds and replays."""

        async def main(port):
            cfg = ConnConfig()
            hello = codec.Hello("held-py", 0, True)
            first = Conn(0, cfg, hello)
            events, (r, w) = await raw(port, first, (Established,))
            first.send(0, b"one")  # echoed: the server sends seq 1 back
            w.write(first.take_transmit())
            events, _ = await raw_continue(first, r, w, (Message,))
            session = first.take_session()
            sock = w.get_extra_info("socket")
            sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            await asyncio.sleep(0.2)

            liar = Session(session.id, session.token)
            liar.last_received = 99
            bad = Conn(0, cfg, hello, liar)
            events, (r2, w2) = await raw(port, bad, (Closed,))
            # Refused before the token rotates (docs/PROTOCOL.md §12): no WELCOME.
            self.assertFalse(any(isinstance(e, Established) for e in events), events)
            self.assertEqual(events[-1].disconnect.reason, "refused", events)
            self.assertEqual(events[-1].disconnect.code, codec.CloseCode.BAD_HELLO, events)
            w2.close()
            await asyncio.sleep(0.2)

            good = Conn(0, cfg, hello, session)
            events, (r3, w3) = await raw(port, good, (Established,))
            self.assertTrue(events[0].welcome.session.resumed, events)
            self.assertEqual(events[0].welcome.session.session_id, session.id)
            good.close(0)
            w3.write(good.take_transmit())
            w3.close()

        with Server() as srv:
            run(main(srv.port), 30)


async def raw_continue(conn, r, w, until_kinds, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    events = []
    while True:
        while True:
            ev = conn.poll_event()
            if ev is None:
                break
            events.append(ev)
            if isinstance(ev, until_kinds):
                out = conn.take_transmit()
                if out:
                    w.write(out)
                return events, (r, w)
        data = await asyncio.wait_for(r.read(65536), max(0.01, deadline - loop.time()))
        conn.handle_input(int(loop.time() * 1000), data)
        out = conn.take_transmit()
        if out:
            w.write(out)


if __name__ == "__main__":
    unittest.main()
