#!/usr/bin/env python3
"""Figures for BENCHMARKS.md, against a `tether serve --echo` (release build):

    python3 clients/python/bench.py throughput 127.0.0.1:7300 100000   # 64 B messages through a session
    python3 clients/python/bench.py idle 127.0.0.1:7300 1000           # RSS per idle connection

throughput: N messages of 64 bytes sent, N echoes received, in order, over one session,
at most WINDOW (1000) in flight; prints messages per second each way. (Unwindowed, a fast
client can deadlock the reference echo server: its echo loop waits for room in the client's
replay buffer while it has stopped reading, and so the client's ACKs.) idle: opens N sessions, waits until all are connected
and the process has settled, prints the RSS growth divided by N."""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tether  # noqa: E402

WINDOW = 1000


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def throughput(host, port, n):
    c = tether.Client(host, port, "bench-python")
    c.start()
    while not isinstance(await c.next_event(), tether.Connected):
        pass
    payload = b"x" * 58
    started = time.monotonic()
    window = asyncio.Semaphore(WINDOW)

    async def produce():
        for i in range(n):
            await window.acquire()
            await c.send(b"%06d" % i + payload)

    prod = asyncio.get_running_loop().create_task(produce())
    got = 0
    while got < n:
        ev = await c.next_event()
        if isinstance(ev, tether.Message):
            assert int(ev.payload[:6]) == got, "out of order"
            got += 1
            window.release()
    await prod
    elapsed = time.monotonic() - started
    await c.close()
    print("python throughput: %d messages of 64 B each way in %.2f s = %.0f msg/s each way"
          % (n, elapsed, n / elapsed))


async def idle(host, port, n):
    await asyncio.sleep(0.5)
    before = rss_kib()
    clients = [tether.Client(host, port, "idle-python-%d" % i) for i in range(n)]
    for c in clients:
        c.start()
    for c in clients:
        while not isinstance(await c.next_event(), tether.Connected):
            pass
    await asyncio.sleep(3)  # a few heartbeats: buffers settle
    after = rss_kib()
    print("python idle: %d connections, RSS %d KiB -> %d KiB, %.1f KiB per connection"
          % (n, before, after, (after - before) / n))
    for c in clients:
        await c.close(timeout=1)


def main():
    mode, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host, port = addr.rsplit(":", 1)
    asyncio.run((throughput if mode == "throughput" else idle)(host, int(port), n))


if __name__ == "__main__":
    main()
