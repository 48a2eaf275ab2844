"""Client pieces without a server: backoff, client-id rules, reconnect decisions, socket
options (read back from the kernel), the bounded outbox and what a stop reports."""

import asyncio
import socket
import unittest

import tether
from tether import codec
from tether.conn import Disconnect


class Pieces(unittest.TestCase):
    def test_backoff_is_full_jitter_capped_and_resets(self):
        b = tether.Backoff(0.1, 1.0, max_attempts=20, seed=1)
        delays = [b.next_delay() for _ in range(20)]
        for n, d in enumerate(delays):
            self.assertGreaterEqual(d, 0.0)
            self.assertLessEqual(d, min(1.0, 0.1 * 2 ** n))
        self.assertIsNone(b.next_delay())
        self.assertGreater(max(delays[5:]), 0.3, "later delays use the whole window")
        b.reset()
        self.assertEqual(b.attempt, 0)
        self.assertLessEqual(b.next_delay(), 0.1)

    def test_client_id_rules(self):
        for ok in ("sensor-1", "jörg-📱", "x" * 255, "ü" * 127, "a b"):
            self.assertIsNone(codec.client_id_problem(ok), ok)
        for bad in ("", "x" * 256, "ü" * 128, "a\x00b", "a\x7f", "a\x85", "a\u200bb", "\ufeffa",
                    "a\u2028b", "a\u2029b", "a\u202eb", "a\nb"):
            self.assertIsNotNone(codec.client_id_problem(bad), repr(bad))
        with self.assertRaises(ValueError):
            tether.Client("127.0.0.1", 1, "bad\nid")

    def test_reconnect_decisions(self):
        C = codec.CloseCode
        never = [Disconnect("replaced", 5), Disconnect("local-close")] + [
            Disconnect("refused", c) for c in (C.BAD_HELLO, C.UNSUPPORTED_VERSION, C.UNAUTHORIZED,
                                               C.ID_NOT_ALLOWED)]
        for d in never:
            self.assertEqual(d.retry, "never", d)
        self.assertEqual(Disconnect("refused", C.SESSION_UNKNOWN).retry, "now")
        backoff = [Disconnect("refused", c) for c in (C.SERVER_FULL, C.HANDSHAKE_TIMEOUT, C.REFUSED,
                                                      C.SESSION_BUSY, C.THROTTLED, 1000)]
        backoff += [Disconnect(r) for r in ("peer-closed", "peer-reset", "heartbeat-timeout",
                                            "keepalive-timeout", "user-timeout", "protocol-error",
                                            "io-error", "connect-refused")]
        backoff += [Disconnect("peer-close", c) for c in (0, 1, 2, 3, 6, 7, 8, 4000)]
        for d in backoff:
            self.assertEqual(d.retry, "backoff", d)

    def test_socket_options_derived_from_the_bound(self):
        self.assertEqual(tether.socket_options(30000), ((15, 5, 3), 30000))
        self.assertEqual(tether.socket_options(3000, 4000), ((1, 1, 2), 3000))
        (idle, interval, count), _ = tether.socket_options(600000, 240000)
        self.assertLessEqual(idle + count * interval, 600)
        self.assertLess(idle, 240)

    @unittest.skipUnless(hasattr(socket, "TCP_USER_TIMEOUT"), "Linux socket options")
    def test_socket_options_read_back_from_the_kernel(self):
        srv = socket.create_server(("127.0.0.1", 0))
        s = socket.create_connection(srv.getsockname())
        try:
            ka, ut = tether.socket_options(30000)
            tether.apply_socket_options(s, ka, ut)
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            self.assertEqual(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 15)
            self.assertEqual(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 5)
            self.assertEqual(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)
            self.assertEqual(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 30000)
            self.assertEqual(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        finally:
            s.close()
            srv.close()

    def test_send_waits_while_the_outbox_is_full_and_a_stop_reports_the_unsent(self):
        async def main():
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()  # nothing listens: the client keeps retrying
            c = tether.Client("127.0.0.1", port, "full-py", outbox_bytes=10, backoff_base=5, backoff_cap=5)
            c.start()
            await c.send(b"123456")
            blocked = asyncio.get_running_loop().create_task(c.send(b"abcdef"))
            await asyncio.sleep(0.2)
            self.assertFalse(blocked.done(), "the second message waits for room")
            self.assertEqual(c.queued, 1)
            await c.close()
            with self.assertRaises(tether.ClientStopped):
                await blocked
            events = []
            while True:
                ev = await c.next_event()
                if ev is None:
                    break
                events.append(ev)
            lost = [e for e in events if isinstance(e, tether.SessionLost)]
            self.assertEqual(len(lost), 1)
            self.assertEqual(lost[0].unsent, [b"123456"])
            self.assertIsNone(lost[0].unacked)
            self.assertIsInstance(events[-1], tether.Stopped)
            self.assertEqual(events[-1].disconnect.reason, "local-close")

        asyncio.run(asyncio.wait_for(main(), 20))

    def test_credential_in_hello_and_refreshed_before_the_ttl(self):
        """A scripted server (the reference server cannot verify credentials yet): the HELLO
        carries the provider's credential; WELCOME says ttl 1 s; AUTH with a fresh credential
        arrives at ~0.9 s; AUTH_OK(0) ends the refreshing."""

        async def main():
            loop = asyncio.get_running_loop()
            got = {}

            async def handle(r, w):
                pre = await r.readexactly(5)
                n = int.from_bytes(await r.readexactly(4), "big")
                hello = codec.parse_body(await r.readexactly(n))
                got["pre"], got["hello"] = pre, hello
                w.write(codec.PREAMBLE + codec.encode(codec.Welcome(10000, 30000, credential_ttl_ms=1000)))
                welcomed = loop.time()
                dec = codec.Decoder()
                while "auth" not in got:
                    for f in dec.feed(await r.read(4096)):
                        if isinstance(f, codec.Auth):
                            got["auth"], got["after"] = f.credential, loop.time() - welcomed
                w.write(codec.encode(codec.AuthOk(0)))
                got["done"] = True
                await r.read()

            srv = await asyncio.start_server(handle, "127.0.0.1", 0)
            calls = []

            async def provider():
                calls.append(1)
                return "cred-%d" % len(calls)

            c = tether.Client("127.0.0.1", srv.sockets[0].getsockname()[1], "cred-py", session=False,
                              credential=provider)
            c.start()
            try:
                for _ in range(100):
                    if got.get("done"):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
            finally:
                await c.close()
                srv.close()
            self.assertEqual(got["hello"].credential, b"cred-1")
            self.assertEqual(got["hello"].flags, codec.HELLO_CREDENTIAL)
            self.assertEqual(got["auth"], b"cred-2")
            self.assertGreaterEqual(got["after"], 0.85)
            self.assertLessEqual(got["after"], 1.5)
            self.assertEqual(len(calls), 2, "no refresh after AUTH_OK(0)")

        asyncio.run(asyncio.wait_for(main(), 20))

    def test_too_long_messages_are_refused_up_front(self):
        async def main():
            c = tether.Client("127.0.0.1", 1, "long-py", max_frame_len=16)
            with self.assertRaises(ValueError):
                await c.send(b"x" * 8)  # 16 - 9 (SEQ_DATA header) = 7 bytes at most

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
