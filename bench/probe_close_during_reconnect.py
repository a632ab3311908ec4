"""Probe: a nats-py client closed in the middle of a reconnect, and whether it stays closed (unibus.aio.close_nats).

Not part of ``make bench`` (it writes no section; it prints). One nats-server
on loopback, reached through a TCP proxy in this process that can cut every
connection at once while the server stays up. Each trial connects a client
(``reconnect_time_wait`` 0.1 s, 300 reconnects, one subscription), cuts its
connection, waits a random moment (0 to 4 ms in half of the trials, 0 to
150 ms in the other half: the client is then reconnecting, or already back),
and closes it, alternating two ways:

* ``close()``: nats-py's own, as unibus called it before close_nats (each
  call through :func:`unibus.aio.own_cancel_only`);
* ``close_nats``: :func:`unibus.aio.close_nats`.

A quarter of a second later it counts a trial as **back** if the client says it is
connected or its reconnect task still runs, and reads the server's ``/connz``
(a connection still open there is the leak). A client that came back is
closed for good before the next trial.

    .venv/bin/python bench/probe_close_during_reconnect.py --trials 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import random
import subprocess
import time
import urllib.request
from collections import Counter

import nats

from unibus.aio import ForeignCancel, close_nats, own_cancel_only
from unibus.supervisor import find_nats_server
from unibus.testing import free_port


class Proxy:
    """A loopback TCP relay whose connections :meth:`cut` aborts, both sides at once."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.pairs.append((writer, up_writer))

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            with contextlib.suppress(Exception):
                b.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer, up_writer in self.pairs:
            writer.transport.abort()
            up_writer.transport.abort()
        self.pairs = []

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


def server_connections(monitor: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz", timeout=2) as r:
        return int(json.load(r)["num_connections"])


async def plain_close(nc: nats.NATS) -> None:
    with contextlib.suppress(ForeignCancel):
        await own_cancel_only(nc.close())


async def trial(proxy: Proxy, monitor: int, how: str, rng: random.Random, short: bool) -> tuple[str, bool, int]:
    nc = await nats.connect(f"nats://127.0.0.1:{proxy.port}", reconnect_time_wait=0.1, max_reconnect_attempts=300,
                            connect_timeout=2)
    await nc.subscribe("probe")
    proxy.cut()
    await asyncio.sleep(rng.uniform(0, 0.004) if short else rng.uniform(0, 0.15))
    state = "reconnecting" if nc.is_reconnecting else "connected" if nc.is_connected else "other"
    await (plain_close(nc) if how == "close()" else close_nats(nc))
    await asyncio.sleep(0.25)
    task = nc._reconnection_task
    back = nc.is_connected or (task is not None and not task.done())
    open_there = server_connections(monitor)
    if back or open_there:
        await close_nats(nc)
    return state, back, open_there


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=600, help="trials in all, half each way (default 600)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    port, monitor = free_port(), free_port()
    server = subprocess.Popen([str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = Proxy(port)
    counts: dict[str, Counter[str]] = {"close()": Counter(), "close_nats": Counter()}
    started = time.monotonic()
    try:
        for _ in range(100):
            try:
                server_connections(monitor)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await proxy.start()
        for i in range(args.trials):
            how = ("close()", "close_nats")[i % 2]
            state, back, open_there = await trial(proxy, monitor, how, rng, short=(i // 2) % 2 == 0)
            c = counts[how]
            c["trials"] += 1
            c[f"closed while {state}"] += 1
            c["back after the close"] += back
            c["connection left open on the server"] += open_there > 0
    finally:
        with contextlib.suppress(Exception):
            await proxy.close()
        server.terminate()
        server.wait(10)
    print(f"seed {seed}; {args.trials} trials in {time.monotonic() - started:.0f} s; nats-py {importlib.metadata.version('nats-py')}")
    for how, c in counts.items():
        print(f"{how:>11}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))


if __name__ == "__main__":
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # every cut logs a reconnect
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
