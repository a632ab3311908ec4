"""Red team r4: the servers a node knows of between two full answers (Mesh.learn).

Real nats-servers, real nats-py, TCP proxies the test cuts or stalls. Written as a
strict xfail by the red team; passes since a node adds the peers its own routes name
(every second) to what it knows, and a learned seed stands in only when it is alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess

import pytest
from unibus.aio import close_nats
from unibus.bus import Bus
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.enforcer import Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.policy import Policy
from unibus.testing import free_port

from .test_attack_r2 import PASSWORD, Relistening, _async, _bob, _conf, _enforcer, _spawn, _stop
from .test_partial_mesh import _until


class Stallable:
    """A TCP forwarder whose traffic can be held up (not cut): a slow link or a loaded machine."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        self.writers.clear()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


@pytest.mark.parametrize("learned", ["at-start", "by-the-retry-loop", "by-a-change"])
async def test_a_set_learned_before_every_route_formed_confirms_a_revocation_without_a_later_peer(tmp_path, learned):
    """A starts while B is still down (a rolling restart, or B's route simply forms later):
    A's enforcer learns {A, C} from its routes, at start (_reconcile) or, when A started
    alone, a second after its route to C formed (_retry_loop). B comes up and the mesh is full; A
    makes no change meanwhile; before the fix nothing added B to what A knew, so
    the set stays {A, C}. Then the route A-B drops (partial mesh: both keep C), bob connects
    to B (B's callout, not reached by A, still has the old rights), and A revokes bob while
    C's system connection is slow, so C answers the apply request with ``routes: null``
    (ROUTES_TIMEOUT, "e.g. on a loaded machine"). The last set stands in for C's routes: it
    is {A, C}, both answered, and the revocation was confirmed although B never got it.
    "by-a-change" is the same hole from before the seed existed: the set is every server's
    full answer to a change made while B was down, and nothing refreshed it when B's
    routes formed. Now A adds what its routes name every second, so it expects B."""
    ports = {n: free_port() for n in "ABC"}
    rports = {n: free_port() for n in "ABC"}
    # A and B route to C directly; A-B is learned from C's gossip and goes through px[A], px[B]
    px = {n: Relistening(rports[n]) for n in "AB"}
    for p in px.values():
        await p.start()
    confs = {
        "A": _conf("A", ports["A"], rports["A"], px["A"].port, (rports["C"],)),
        "B": _conf("B", ports["B"], rports["B"], px["B"].port, (rports["C"],)),
        "C": _conf("C", ports["C"], rports["C"], None, (rports["A"], rports["B"])),
    }
    slow = Stallable(ports["C"])  # C's membershipd system connection (its ROUTEZ goes through it)
    await slow.start()
    procs: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    bob = None
    try:
        first = "A" if learned == "by-the-retry-loop" else "AC"
        for n in "AC":
            if n not in first:
                enforcers["A"] = _enforcer(buses["A"], "A")
                await enforcers["A"].start()
                assert enforcers["A"].mesh.last is None and enforcers["A"].mesh.seed is None  # no routes yet
            procs.append(_spawn(tmp_path, n, confs[n]))
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r4-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        ids = {n: buses[n].server_id for n in "AC"}
        await _until(lambda: _routes_are(buses, ids, {"A": "C", "C": "A"}), "no A-C route")
        if "A" not in enforcers:
            enforcers["A"] = _enforcer(buses["A"], "A")
            await enforcers["A"].start()
        # B is not up yet: A's set is {A, C}
        await _until(_async(lambda: _known(enforcers["A"]) == {ids["A"], ids["C"]}), "A learned no set")
        # C's membershipd as in the daemon: its system connection apart from its service connection
        buses["Csys"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{slow.port}", name="r4-C-sys")
        await buses["Csys"].connect(timeout=20, check_jetstream=False)
        enforcers["C"] = Enforcer(buses["Csys"].nc, buses["C"].nc, Responder(Policy(), Issuer.from_raw(b"\1" * 32)),
                                  clustered=True, node="C", routes=buses["Csys"].route_ids)
        await enforcers["C"].start()
        if learned == "by-a-change":  # the same set, every server's full answer to a change (before 8d7e4eb too)
            await enforcers["A"].enforce({"nobody"}, set(), ["r0"])
            assert enforcers["A"].mesh.last == {ids["A"], ids["C"]}

        procs.append(_spawn(tmp_path, "B", confs["B"]))
        buses["B"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports['B']}", name="r4-B")
        await buses["B"].connect(timeout=20, check_jetstream=False)
        ids["B"] = buses["B"].server_id
        await _until(lambda: _routes_are(buses, ids, {"A": "BC", "B": "AC", "C": "AB"}), "no full mesh")
        enforcers["B"] = _enforcer(buses["B"], "B")
        await enforcers["B"].start()
        await asyncio.sleep(1.5)  # a retry-loop tick or more with the full mesh

        # the route A-B drops; both keep C
        for p in px.values():
            await p.cut()
        await _until(lambda: _routes_are(buses, ids, {"A": "C", "B": "C", "C": "AB"}), "no partial mesh")
        bob = await _bob(ports["B"])  # on B, which A cannot reach: A never hears of it
        await bob.flush(timeout=2)
        first_cid = bob._client_id
        await asyncio.sleep(0.3)
        assert "bob" not in enforcers["A"].connections

        slow.flowing.clear()  # C's ROUTEZ is slow for a moment
        try:
            confirmed = True
            try:
                await enforcers["A"].enforce({"bob"}, set(), ["r1"])
            except KickUnconfirmed:
                confirmed = False
        finally:
            slow.flowing.set()
        assert bob.is_connected and bob._client_id == first_cid  # bob, on B, was never kicked
        assert not confirmed, (f"A confirmed the revocation of bob with the set {sorted(_known(enforcers['A']))} "
                               f"while B ({ids['B']}) holds bob's connection")
    finally:
        if bob is not None:
            await close_nats(bob)
        for e in enforcers.values():
            await e.stop()
        for b in buses.values():
            await b.close()
        for p in px.values():
            await p.cut()
        await slow.close()
        _stop(procs)


def _known(e: Enforcer) -> frozenset[str]:
    """The servers A knows of: the last full answer's set, else the peers it learned."""
    return e.mesh.last or e.mesh.seed or frozenset()


async def _routes_are(buses: dict[str, Bus], ids: dict[str, str], want: dict[str, str]) -> bool:
    got = {n: await buses[n].route_ids() for n in want}
    return all(got[n] == {ids[m] for m in want[n]} for n in want)

