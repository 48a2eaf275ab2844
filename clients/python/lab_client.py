#!/usr/bin/env python3
"""This client in `tether lab --client-cmd` (contract: docs/LAB.md, "Bring your own client"):

    tether lab run blackhole --client-cmd 'python3 clients/python/lab_client.py {server}'

Prints READY once the server's greeting arrived, RECEIVED for each later message,
DETECTED <reason> when the connection is gone; sends a message for each SEND line on stdin;
exits when stdin closes."""

import asyncio
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tether  # noqa: E402


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(server):
    host, port = server.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    sends = asyncio.Queue()

    def read_stdin():
        for line in sys.stdin:
            if line.strip() == "SEND":
                loop.call_soon_threadsafe(sends.put_nowait, b"after the fault")
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    client = tether.Client(host, int(port), "lab-python")
    client.start()

    async def forward():
        while True:
            await client.send(await sends.get())

    async def events():
        greeted = detected = False
        async for ev in client:
            if isinstance(ev, tether.Connected) and not greeted:
                await client.send(b"hello")
            elif isinstance(ev, tether.Message):
                say("RECEIVED" if greeted else "READY")
                greeted = True
            elif isinstance(ev, tether.Disconnected) and greeted and not detected \
                    and ev.disconnect.reason != "local-close":
                detected = True
                say("DETECTED " + ev.disconnect.reason)

    tasks = [loop.create_task(forward()), loop.create_task(events())]
    await done.wait()
    for t in tasks:
        t.cancel()
    await client.close(timeout=1.0)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: lab_client.py HOST:PORT")
    asyncio.run(main(sys.argv[1]))
