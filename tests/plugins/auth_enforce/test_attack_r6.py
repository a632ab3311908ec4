"""Red team r6: what the direct ROUTEZ ask cost every change while one node was slow.

Real nats-servers, real nats-py, the Stallable proxy of the r4/r5 red-team tests. Written
as a strict xfail by the red team; passes since the asking node asks a silent responder's
server as soon as its reply arrives, and the gather ends once that completes the set.
"""

from __future__ import annotations

import subprocess
import time

from unibus.bus import Bus
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.enforcer import KICK_DEADLINE, Enforcer
from unibus.plugins.auth_enforce.policy import Policy
from unibus.testing import free_port

from .test_attack_r2 import PASSWORD, _conf, _enforcer, _spawn, _stop
from .test_attack_r4 import Stallable, _routes_are
from .test_attack_r5 import _slow_pinging, _until


async def test_a_slow_responder_does_not_cost_every_change_half_the_deadline(tmp_path):
    """Healthy full mesh, C's membershipd slow to read its own ROUTEZ (as in r5's
    test_a_responder_whose_own_routez_is_slow_is_asked_by_the_asking_node). C answers the
    apply request at once, with ``routes: null``; A's nats-server would tell C's routes in
    milliseconds. But ``_gather`` stops early only when ``mesh.complete`` holds, and
    ``Mesh._resolve`` makes it False while a route set is None: A waits for the whole gather
    timeout (KICK_DEADLINE / 2 = 1.5 s), every change, for as long as C is slow, and only then
    asks C's server. What is left of the 3 s deadline (CONNZ of each revoked member, one
    after the other, and the kicks) then decides whether a loaded cluster answers 503."""
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
            buses[n] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{ports[n]}", name=f"r6-{n}")
            await buses[n].connect(timeout=20, check_jetstream=False)
        ids = {n: buses[n].server_id for n in "ABC"}
        await _until(lambda: _routes_are(buses, ids, {"A": "BC", "B": "AC", "C": "AB"}), "no full mesh")
        for n in "AB":
            enforcers[n] = _enforcer(buses[n], n)
            await enforcers[n].start()
        buses["Csys"] = Bus(f"nats://sys:{PASSWORD}@127.0.0.1:{slow.port}", name="r6-C-sys")
        await buses["Csys"].connect(timeout=20, check_jetstream=False)
        enforcers["C"] = Enforcer(buses["Csys"].nc, buses["C"].nc, Responder(Policy(), Issuer.from_raw(b"\1" * 32)),
                                  clustered=True, node="C", routes=buses["Csys"].route_ids)
        await enforcers["C"].start()
        started = time.monotonic()
        await enforcers["A"].enforce({"carol"}, set(), ["r0"])  # C's routes said: the baseline
        fast = time.monotonic() - started

        slow.flowing.clear()  # C answers the apply request at once, with "routes": null
        try:
            took = []
            for i in range(3):
                started = time.monotonic()
                await enforcers["A"].enforce({"bob"}, set(), [f"r{i + 1}"])  # confirmed (direct ask)
                took.append(time.monotonic() - started)
        finally:
            slow.flowing.set()
        assert enforcers["A"].pending == {}
        # Not a performance bound: with the gather waiting for its deadline, no change can end
        # before KICK_DEADLINE / 2; ending early shows the gather stopped once the set was complete
        # (these take milliseconds; a loaded machine would have to delay all three by 1 s).
        assert min(took) < KICK_DEADLINE / 2, (
            f"with C's own ROUTEZ slow every change took {', '.join(f'{t:.2f}' for t in took)} s (the whole "
            f"apply gather, {KICK_DEADLINE / 2:g} s, of a {KICK_DEADLINE:g} s deadline) against {fast:.3f} s, "
            f"although A's ask of C's server answers in milliseconds")
    finally:
        for e in enforcers.values():
            await e.stop()
        for b in buses.values():
            await b.close()
        await slow.close()
        _stop(procs)
