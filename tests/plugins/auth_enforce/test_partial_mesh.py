"""A real partial mesh: a revocation is not confirmed on a node cut off from another (docs/bus-auth.md).

Three real nats-servers A, B and C; A and B have explicit routes to C only,
and advertise their route port through a TCP proxy this test runs, so the
route A-B (learned from C's gossip) goes through the proxies. Closing them cuts
A-B while both keep C: A's ROUTEZ names C alone, B never hears A's requests,
and C's ROUTEZ names B. Each node runs the real :class:`Enforcer` on its own
server. A revocation through A is confirmed while the mesh is full and not
once it is partial (503, pending, retried until the mesh heals).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess

import pytest
from unibus.bus import Bus
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.enforcer import Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.policy import Policy
from unibus.supervisor import find_nats_server
from unibus.testing import free_port

PASSWORD = "mesh-test"
WAIT = 20.0


class Proxy:
    """A TCP forwarder the test can cut: closes its listener and every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        self.writers.clear()


def _config(name: str, port: int, route_port: int, advertise: int, routes: list[int]) -> str:
    urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return f"""
server_name: {name}
listen: "127.0.0.1:{port}"
accounts {{ SYS {{ users: [{{user: sys, password: "{PASSWORD}"}}] }} }}
system_account: SYS
cluster {{
  name: mesh
  listen: "127.0.0.1:{route_port}"
  advertise: "127.0.0.1:{advertise}"
  routes: [{urls}]
}}
"""


async def _until(check, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def test_a_revocation_is_not_confirmed_across_a_partial_mesh(tmp_path):
    names = ("A", "B", "C")
    ports = {n: free_port() for n in names}
    route_ports = {n: free_port() for n in names}
    proxies = {n: Proxy(route_ports[n]) for n in ("A", "B")}
    for p in proxies.values():
        await p.start()
    configs = {
        "A": _config("A", ports["A"], route_ports["A"], proxies["A"].port, [route_ports["C"]]),
        "B": _config("B", ports["B"], route_ports["B"], proxies["B"].port, [route_ports["C"]]),
        "C": _config("C", ports["C"], route_ports["C"], route_ports["C"], [route_ports["A"], route_ports["B"]]),
    }
    procs: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    try:
        for n in names:
            conf = tmp_path / f"{n}.conf"
            conf.write_text(configs[n])
            procs.append(subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=(tmp_path / f"{n}.log").open("wb")))
        for n in names:
            bus = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"mesh-{n}")
            await bus.connect(timeout=WAIT, check_jetstream=False)
            buses[n] = bus
        ids = {n: buses[n].server_id for n in names}

        async def routes_are(want: dict[str, set[str]]) -> bool:
            got = {n: await buses[n].route_ids() for n in names}
            return all(got[n] == {ids[m] for m in want[n]} for n in names)

        await _until(lambda: routes_are({"A": {"B", "C"}, "B": {"A", "C"}, "C": {"A", "B"}}), "no full mesh")
        for n in names:
            e = Enforcer(buses[n].nc, buses[n].nc, Responder(Policy(), Issuer.from_raw(os.urandom(32))),
                         clustered=True, node=n, routes=buses[n].route_ids)
            await e.start()
            enforcers[n] = e

        await enforcers["A"].enforce({"bob"}, set(), ["r1"])  # full mesh: confirmed
        assert enforcers["A"].pending == {}

        for p in proxies.values():
            await p.cut()
        await _until(lambda: routes_are({"A": {"C"}, "B": {"C"}, "C": {"A", "B"}}), "no partial mesh")
        with pytest.raises(KickUnconfirmed, match="2 of 3 nodes confirmed the change"):
            await enforcers["A"].enforce({"bob"}, set(), ["r1"])
        assert enforcers["A"].pending == {"bob": True}
    finally:
        for e in enforcers.values():
            await e.stop()
        for bus in buses.values():
            await bus.close()
        for p in proxies.values():
            await p.cut()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
