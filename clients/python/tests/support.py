"""Test helpers: the real `tether serve`, a proxy that resets every connection on a timer,
a silent server, and a TLS-terminating proxy."""

import asyncio
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
TLS = os.path.join(REPO, "clients", "testdata", "tls")


def find_tether():
    """$TETHER_BIN, else the newest of target/release/tether and target/debug/tether."""
    env = os.environ.get("TETHER_BIN")
    if env:
        return env if os.path.isfile(env) else None
    found = [p for p in (os.path.join(REPO, "target", k, "tether") for k in ("release", "debug"))
             if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


SKIP_NO_SERVER = ("no tether binary: build it (cargo build --release -p tether-cli) "
                  "or set TETHER_BIN")


class Server:
    """`tether serve` on a free port (--listen 127.0.0.1:0; the address is read from its log)."""

    def __init__(self, *args, detect_within="2s"):
        self.bin = find_tether()
        self.args = ["serve", "--listen", "127.0.0.1:0", "--http", "off", "--echo",
                     "--detect-within", detect_within] + list(args)
        self.proc = None
        self.port = None
        self.lines = []

    def __enter__(self):
        self.proc = subprocess.Popen([self.bin] + self.args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        got = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r'listening\s.*addr="?([^\s"]+):(\d+)', line)
                if m and self.port is None:
                    self.port = int(m.group(2))
                    got.set()
            got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(20) or self.port is None:
            self.__exit__()
            raise RuntimeError("tether serve did not start: %s" % "\n".join(self.lines))
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rst(sock):
    """Closes abortively: SO_LINGER 0 makes the kernel send RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class ResettingProxy:
    """Forwards 127.0.0.1:port to the upstream and resets every live connection (both sides,
    RST via SO_LINGER 0) every `period` seconds. Runs on the caller's event loop."""

    def __init__(self, upstream_port, period=0.05):
        self.upstream_port = upstream_port
        self.period = period
        self.pairs = set()
        self.resets = 0
        self.accepted = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def stop(self):
        self.ticker.cancel()
        self.server.close()
        for pair in list(self.pairs):
            for w in pair:
                w.transport.abort()

    async def _tick(self):
        while True:
            await asyncio.sleep(self.period)
            for pair in list(self.pairs):
                self.resets += 1
                for w in pair:
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
            self.pairs.clear()

    async def _handle(self, cr, cw):
        self.accepted += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.transport.abort()
            return
        pair = (cw, uw)
        self.pairs.add(pair)

        async def pipe(r, w):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
        self.pairs.discard(pair)


def vector_handshake():
    """The server's answer in the `client-handshake` conformance vector (WELCOME h=1000 ms,
    d=3000 ms), and those h and d."""
    with open(os.path.join(REPO, "conformance", "exchanges.json"), encoding="utf-8") as f:
        doc = json.load(f)
    x = next(e for e in doc["exchanges"] if e["name"] == "client-handshake")
    recv = next(s["recv"] for s in x["steps"] if "recv" in s)
    return bytes.fromhex(recv), 1000, 3000


class SilentServer:
    """Accepts, answers the handshake with the vector's WELCOME, then never sends a byte (and
    keeps the socket open). Records when each WELCOME went out."""

    def __init__(self):
        self.answer, self.h, self.d = vector_handshake()
        self.welcomed = []
        self.received = []
        self.conns = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        for w in self.conns:
            w.transport.abort()

    async def _handle(self, r, w):
        self.conns.append(w)
        try:
            await r.readexactly(5)
            n = struct.unpack(">I", await r.readexactly(4))[0]
            await r.readexactly(n)
            w.write(self.answer)
            await w.drain()
            self.welcomed.append(time.monotonic())
            while True:
                data = await r.read(65536)
                if not data:
                    return
                self.received.append((time.monotonic(), data))
        except (OSError, asyncio.IncompleteReadError):
            return


class TlsProxy:
    """Terminates TLS (the test certificate for localhost) and forwards to a plain upstream.
    With `client_ca`, a client certificate signed by it is required."""

    def __init__(self, upstream_port, client_ca=None):
        self.upstream_port = upstream_port
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(os.path.join(TLS, "server.pem"), os.path.join(TLS, "server.key"))
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        self.ctx = ctx
        self.peer_subjects = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()

    async def _handle(self, cr, cw):
        cert = cw.get_extra_info("peercert")
        if cert:
            self.peer_subjects.append(dict(x[0] for x in cert["subject"]))
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r, w):
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
