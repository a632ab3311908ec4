"""Red team r5: what a node knows of its peers when its own ROUTEZ is slow too.

Real nats-servers, real nats-py, the TCP proxies of the r2/r4 red-team tests. Written
as a strict xfail by the red team; passes since a route set no one could say confirms
nothing (no stand-in), and the asking node asks a silent responder's server itself.
"""

from __future__ import annotations

import asyncio
import subprocess

from unibus.aio import close_nats
from unibus.bus import Bus
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.enforcer import Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.policy import Policy
from unibus.testing import free_port

from .test_attack_r2 import PASSWORD, Relistening, _bob, _conf, _enforcer, _spawn, _stop
from .test_attack_r4 import Stallable, _routes_are


def _slow_pinging(conf: str) -> str:
    # a stalled system connection must not be dropped as stale by its server for the test's few seconds
    return conf.replace('ping_interval: "1s"', 'ping_interval: "60s"')


async def test_a_node_whose_own_routez_is_slow_confirms_without_a_peer_that_joined_since(tmp_path):
    """r4's hole, with the asking node's own ROUTEZ slow too. 3b5b02e closes r4 by adding,
    every second, the peers A's own ROUTEZ names to A's last set; but that ROUTEZ goes
    unanswered on the same loaded machine ("When a node's ROUTEZ goes unanswered the last set
    stands"). So: A and C make a change (last set {A, C}); A's system connection is slow
    (its ROUTEZ times out, for _learn_mesh and for its own apply answer) while B starts, the
    mesh becomes full, and the route A-B drops again; bob connects to B. A revokes bob while
    C's ROUTEZ is slow too: A and C answer with ``routes: null``, the last set {A, C} stands
    in, both answered, the CONNZ of {A, C} is complete (A's connection is flowing again by
    then), and the revocation is confirmed (2xx) although B, which holds bob's connection
    and whose callout has the old rights, never got it."""
    ports = {n: free_port() for n in "ABC"}
    rports = {n: free_port() for n in "ABC"}
    px = {n: Relistening(rports[n]) for n in "AB"}  # the route A-B goes through these
    for p in px.values():
        await p.start()
    confs = {
        "A": _slow_pinging(_conf("A", ports["A"], rports["A"], px["A"].port, (rports["C"],))),
        "B": _slow_pinging(_conf("B", ports["B"], rports["B"], px["B"].port, (rports["C"],))),
        "C": _slow_pinging(_conf("C", ports["C"], rports["C"], None, (rports["A"], rports["B"]))),
    }
    slow = {n: Stallable(ports[n]) for n in "AC"}  # A's and C's membershipd system connections
    for s in slow.values():
        await s.start()
    procs: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    bob = None
    try:
        for n in "AC":
            procs.append(_spawn(tmp_path, n, confs[n]))
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r5-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        ids = {n: buses[n].server_id for n in "AC"}
        await _until(lambda: _routes_are(buses, ids, {"A": "C", "C": "A"}), "no A-C route")
        for n in "AC":  # as in the daemon: the system connection apart from the service connection
            buses[n + "sys"] = sysbus = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{slow[n].port}", name=f"r5-{n}-sys")
            await sysbus.connect(timeout=20, check_jetstream=False)
            enforcers[n] = Enforcer(sysbus.nc, buses[n].nc, Responder(Policy(), Issuer.from_raw(b"\1" * 32)),
                                    clustered=True, node=n, routes=sysbus.route_ids)
            await enforcers[n].start()
        await enforcers["A"].enforce({"nobody"}, set(), ["r0"])  # every server's full answer
        assert enforcers["A"].mesh.last == {ids["A"], ids["C"]}

        slow["A"].flowing.clear()  # A's system connection is slow from here
        procs.append(_spawn(tmp_path, "B", confs["B"]))
        buses["B"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports['B']}", name="r5-B")
        await buses["B"].connect(timeout=20, check_jetstream=False)
        ids["B"] = buses["B"].server_id
        await _until(lambda: _routes_are(buses, ids, {"A": "BC", "B": "AC", "C": "AB"}), "no full mesh")
        enforcers["B"] = _enforcer(buses["B"], "B")
        await enforcers["B"].start()
        await asyncio.sleep(1.2)  # a retry-loop tick of A with the full mesh (its ROUTEZ unanswered)
        for p in px.values():  # the route A-B drops; both keep C
            await p.cut()
        await _until(lambda: _routes_are(buses, ids, {"A": "C", "B": "C", "C": "AB"}), "no partial mesh")
        assert ids["B"] not in (enforcers["A"].mesh.last or ()), "A learned B: the premise did not hold"
        bob = await _bob(ports["B"])  # on B, which A cannot reach
        await bob.flush(timeout=2)
        first_cid = bob._client_id

        slow["C"].flowing.clear()  # C's ROUTEZ is slow as well
        try:
            async def release_a() -> None:  # A's own apply answer has gone out without routes by then
                await asyncio.sleep(0.4)
                slow["A"].flowing.set()

            releasing = asyncio.ensure_future(release_a())
            confirmed = True
            try:
                await enforcers["A"].enforce({"bob"}, set(), ["r1"])
            except KickUnconfirmed:
                confirmed = False
            await releasing
        finally:
            slow["A"].flowing.set()
            slow["C"].flowing.set()
        assert bob.is_connected and bob._client_id == first_cid  # bob, on B, was never kicked
        assert not confirmed, (f"A confirmed the revocation of bob with the set {sorted(enforcers['A'].mesh.last)} "
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
        for s in slow.values():
            await s.close()
        _stop(procs)


async def _until(check, what: str, wait: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def test_a_responder_whose_own_routez_is_slow_is_asked_by_the_asking_node(tmp_path):
    """Healthy full mesh, C's membershipd slow to read its own ROUTEZ (its system connection
    stalls): C's answer carries no routes, so A asks C's nats-server itself, learns them, and
    confirms the revocation instead of answering 503. (The strict rule above must not turn
    a loaded node into a 503 when its nats-server can still say.)"""
    ports = {n: free_port() for n in "ABC"}
    rports = {n: free_port() for n in "ABC"}
    confs = {
        "A": _slow_pinging(_conf("A", ports["A"], rports["A"], None, (rports["C"],))),
        "B": _slow_pinging(_conf("B", ports["B"], rports["B"], None, (rports["C"],))),
        "C": _slow_pinging(_conf("C", ports["C"], rports["C"], None, (rports["A"], rports["B"]))),
    }
    slow = Stallable(ports["C"])  # C's membershipd system connection
    await slow.start()
    procs: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    try:
        for n in "ABC":
            procs.append(_spawn(tmp_path, n, confs[n]))
        for n in "ABC":
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r5-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        ids = {n: buses[n].server_id for n in "ABC"}
        await _until(lambda: _routes_are(buses, ids, {"A": "BC", "B": "AC", "C": "AB"}), "no full mesh")
        for n in "AB":
            enforcers[n] = _enforcer(buses[n], n)
            await enforcers[n].start()
        buses["Csys"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{slow.port}", name="r5-C-sys")
        await buses["Csys"].connect(timeout=20, check_jetstream=False)
        enforcers["C"] = Enforcer(buses["Csys"].nc, buses["C"].nc, Responder(Policy(), Issuer.from_raw(b"\1" * 32)),
                                  clustered=True, node="C", routes=buses["Csys"].route_ids)
        await enforcers["C"].start()

        slow.flowing.clear()  # C answers the apply request with "routes": null
        try:
            await enforcers["A"].enforce({"bob"}, set(), ["r1"])  # confirmed: A asked C's server itself
        finally:
            slow.flowing.set()
        assert enforcers["A"].pending == {}
        assert enforcers["A"].mesh.last == set(ids.values())
    finally:
        for e in enforcers.values():
            await e.stop()
        for b in buses.values():
            await b.close()
        await slow.close()
        _stop(procs)
