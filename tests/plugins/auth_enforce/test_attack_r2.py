"""Red team (r2): the set of server ids that must confirm a cluster revocation (mesh.py, enforcer.py).

Real nats-servers, real nats-py; every route that involves node C goes through
TCP proxies the test can cut, so C can be isolated while A-B stay routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

import nats
import pytest
from unibus.bus import Bus
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.enforcer import SECOND_SWEEP_AFTER, Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.policy import Policy
from unibus.supervisor import find_nats_server
from unibus.testing import free_port

from .test_partial_mesh import Proxy, _until

PASSWORD = "attack-r2"


def _conf(name: str, port: int, route_port: int | None = None, advertise: int | None = None,
          routes: tuple[int, ...] = ()) -> str:
    cluster = ""
    if route_port is not None:
        urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        adv = f'advertise: "127.0.0.1:{advertise}"' if advertise else ""
        cluster = f"""cluster {{ name: r2, listen: "127.0.0.1:{route_port}", {adv}
  routes: [{urls}] }}"""
    return f"""
server_name: {name}
listen: "127.0.0.1:{port}"
ping_interval: "1s"
ping_max: 2
accounts {{
  SYS {{ users: [{{user: sys, password: "{PASSWORD}"}}] }}
  MEMBERS {{ users: [{{user: bob, password: bob}}] }}
}}
system_account: SYS
{cluster}
"""


class Relistening(Proxy):
    """The test_partial_mesh proxy, which can listen again on the same port (heal)."""

    async def heal(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)


def _spawn(tmp_path, name: str, conf: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.conf"
    path.write_text(conf)
    return subprocess.Popen([str(find_nats_server()), "-c", str(path)], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / f"{name}.log").open("ab"))


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _enforcer(bus: Bus, node: str, clustered: bool = True) -> Enforcer:
    return Enforcer(bus.nc, bus.nc, Responder(Policy(), Issuer.from_raw(os.urandom(32))), clustered=clustered,
                    node=node, routes=bus.route_ids if clustered else None)


async def _bob(port: int):
    return await nats.connect(f"nats://bob:bob@127.0.0.1:{port}", connect_timeout=3, reconnect_time_wait=0.1,
                              max_reconnect_attempts=-1)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="fail-open: a revocation confirmed by the majority side of a partition "
                   "never reaches an isolated node, and nothing kicks there when the mesh heals")
async def test_an_isolated_node_holding_a_connection_does_not_stop_the_majority_confirming(tmp_path):
    """C is cut off from A and B (its nats-server keeps serving clients); A and B keep their
    route. A revocation of bob through A is confirmed (no KickUnconfirmed, nothing pending)
    although bob holds a connection on C that no one kicked and C's membershipd never
    re-read (it would authorize bob with the old rights). Healing the mesh kicks nothing:
    the connection keeps its old JWT. The expected set shrank from {A,B,C} to {A,B} and was
    kept as "last" because every route set was known.

    A FAIL-OPEN that the set-of-ids change did not close (the count-based code had it too).
    Wanted: the revocation through A is not confirmed, or bob's connection on C is cut
    once the mesh heals; strict xfail until then. (This runs the Enforcer alone: a fix in
    the plugin's KV-watch path, kicking on C what a remote change revoked, needs an e2e
    counterpart instead.)"""
    ports = {n: free_port() for n in "ABC"}
    rports = {n: free_port() for n in "ABC"}
    # every route involving C goes through these: C dials A, B through px[A], px[B];
    # A, B dial C (if they do) through px[C]; A-B is direct (started first, advertised direct)
    px = {n: Relistening(rports[n]) for n in "ABC"}
    for p in px.values():
        await p.start()
    procs: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    bob = None
    try:
        procs.append(_spawn(tmp_path, "A", _conf("A", ports["A"], rports["A"], None, (rports["B"],))))
        procs.append(_spawn(tmp_path, "B", _conf("B", ports["B"], rports["B"], None, (rports["A"],))))
        for n in "AB":
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r2-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        await _until(lambda: _has_routes(buses["A"], 1), "no A-B route")
        # C's explicit routes are the proxies of A and B; it advertises its own proxy
        procs.append(_spawn(tmp_path, "C", _conf("C", ports["C"], rports["C"], px["C"].port,
                                                 (px["A"].port, px["B"].port))))
        buses["C"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports['C']}", name="r2-C")
        await buses["C"].connect(timeout=20, check_jetstream=False)
        ids = {n: buses[n].server_id for n in "ABC"}

        async def routes_are(want):
            got = {n: await buses[n].route_ids() for n in "ABC"}
            return all(got[n] == {ids[m] for m in want[n]} for n in "ABC")

        await _until(lambda: routes_are({"A": "BC", "B": "AC", "C": "AB"}), "no full mesh")
        for n in "ABC":
            enforcers[n] = _enforcer(buses[n], n)
            await enforcers[n].start()
        await enforcers["A"].enforce({"bob"}, set(), ["r1"])
        assert enforcers["A"].mesh.last == set(ids.values())

        for p in px.values():
            await p.cut()
        await _until(lambda: routes_are({"A": "B", "B": "A", "C": ""}), "C not isolated")

        # C never made a change since it started, so it has no "last" set: cut off, it confirms
        # a change ALONE (docs: "only before any ... does it expect itself"); on a real node a
        # change through C would need a JetStream quorum first, so this is narrow
        assert enforcers["C"].mesh.last is None
        with contextlib.suppress(KickUnconfirmed):  # today it does not raise; it should
            await enforcers["C"].enforce({"carol"}, set(), ["r1"])

        # bob connects to C while it is cut off (C's callout, in the real daemon, still has the old index)
        bob = await _bob(ports["C"])
        await asyncio.sleep(0.3)
        assert ("bob" not in enforcers["A"].connections), "A cannot have seen the CONNECT event"

        # the revocation through A: today confirmed, although C never applied it and bob's connection stands
        confirmed = True
        try:
            await enforcers["A"].enforce({"bob"}, set(), ["r1"])
        except KickUnconfirmed:
            confirmed = False
        # (today: confirmed; the expected set shrank to {A, B} and was kept as mesh.last)

        # the partition outlasts A's second sweep (SECOND_SWEEP_AFTER, 2.7 s), the last guard
        await asyncio.sleep(SECOND_SWEEP_AFTER + 1.0)
        # heal: nothing kicks bob's connection on C
        for p in px.values():
            await p.heal()
        await _until(lambda: routes_are({"A": "BC", "B": "AC", "C": "AB"}), "mesh did not heal")
        # wanted: a revocation A confirmed does not leave bob's old connection on C standing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        first_cid = bob._client_id
        while loop.time() < deadline and bob._client_id == first_cid and bob.is_connected:
            await asyncio.sleep(0.1)
        assert not confirmed or bob._client_id != first_cid or not bob.is_connected, \
            "A confirmed the revocation and bob's connection on C survived the heal"
    finally:
        if bob is not None:
            await bob.close()
        for e in enforcers.values():
            await e.stop()
        for b in buses.values():
            await b.close()
        for p in px.values():
            await p.cut()
        _stop(procs)


async def _has_routes(bus: Bus, n: int) -> bool:
    ids = await bus.route_ids()
    return ids is not None and len(ids) >= n


@pytest.mark.xfail(strict=True, raises=KickUnconfirmed, reason="fail-closed: a connection of a nats-server that restarted (new id) "
                   "is never forgotten; its kick has no responder, so every revocation of the member 503s")
async def test_a_nats_server_restart_leaves_a_stale_connection_that_blocks_every_revocation(tmp_path):
    """Single node. bob is connected; the embedded nats-server dies (SIGKILL: no DISCONNECT
    event) and the supervisor restarts it, with a NEW server id; membershipd keeps running.
    bob reconnects. The enforcer still lists (old id, cid): its kick gets no responder, so
    every revocation of bob answers 503 and stays pending for ever (FAIL-CLOSED, availability).
    Wanted: the revocation is confirmed (bob's live connection kicked); strict xfail until then."""
    port = free_port()
    conf = _conf("S", port)
    procs = [_spawn(tmp_path, "S", conf)]
    bus = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{port}", name="r2-single")
    e = None
    bob = None
    try:
        await bus.connect(timeout=20, check_jetstream=False)
        e = _enforcer(bus, "S", clustered=False)
        await e.start()
        old = bus.server_id
        bob = await _bob(port)
        await _until(_async(lambda: bool(e.connections.get("bob"))), "no CONNECT event")

        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(5)
        procs.append(_spawn(tmp_path, "S", conf))
        await _until(_async(lambda: bus.connected and bus.server_id not in (None, old)
                            and bob.is_connected), "no restart")
        await bus.nc.flush(timeout=2)
        first_cid = bob._client_id
        await e.enforce({"bob"}, set(), ["r1"])  # today: KickUnconfirmed, "1 of 2 kicks unconfirmed"
        assert e.pending == {}
        await _until(_async(lambda: bob._client_id != first_cid), "bob was not kicked")
    finally:
        if bob is not None:
            await bob.close()
        if e is not None:
            await e.stop()
        await bus.close()
        _stop(procs)


def _async(fn):
    async def check():
        return fn()
    return check


@pytest.mark.xfail(strict=True, raises=KickUnconfirmed, reason="fail-closed: a peer's nats-server restart leaves its old server id in "
                   "every other node's connections; every revocation of its members 503s until membershipd restarts")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_a_peer_nats_server_restart_leaves_stale_connections_on_the_other_node(tmp_path, sig):
    """Cluster A-B. bob is on B; B's nats-server restarts (new server id) and bob reconnects
    there. A keeps (B's old id, cid) in its connections for ever: every revocation of bob
    through A answers 503 and stays pending (FAIL-CLOSED, availability), until A's
    membershipd restarts. Wanted: confirmed; strict xfail until then."""
    ports = {n: free_port() for n in "AB"}
    rports = {n: free_port() for n in "AB"}
    confs = {"A": _conf("A", ports["A"], rports["A"], None, (rports["B"],)),
             "B": _conf("B", ports["B"], rports["B"], None, (rports["A"],))}
    procs = {n: _spawn(tmp_path, n, confs[n]) for n in "AB"}
    extra: list[subprocess.Popen] = []
    buses: dict[str, Bus] = {}
    enforcers: dict[str, Enforcer] = {}
    bob = None
    try:
        for n in "AB":
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r2p-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        await _until(lambda: _has_routes(buses["A"], 1), "no A-B route")
        for n in "AB":
            enforcers[n] = _enforcer(buses[n], n)
            await enforcers[n].start()
        old_b = buses["B"].server_id
        bob = await _bob(ports["B"])
        await _until(_async(lambda: bool(enforcers["A"].connections.get("bob"))), "A saw no CONNECT")
        await enforcers["A"].enforce(set(), set(), ["r1"])  # nothing
        procs["B"].send_signal(sig)
        procs["B"].wait(10)
        extra.append(_spawn(tmp_path, "B", confs["B"]))
        await _until(_async(lambda: buses["B"].connected and buses["B"].server_id not in (None, old_b)
                            and bob.is_connected), "B did not come back")
        await _until(lambda: _has_routes(buses["A"], 1), "no A-B route again")
        await _until(lambda: _has_routes(buses["B"], 1), "no B-A route again")
        await asyncio.sleep(0.5)
        stale = {c for c in enforcers["A"].connections.get("bob", ()) if c[0] == old_b}
        assert stale, "the old server's entry is still there"  # today
        await enforcers["A"].enforce({"bob"}, set(), ["r1"])  # today: KickUnconfirmed, kicks unconfirmed
        assert enforcers["A"].pending == {}
    finally:
        if bob is not None:
            await bob.close()
        for e in enforcers.values():
            await e.stop()
        for b in buses.values():
            await b.close()
        _stop([*procs.values(), *extra])
