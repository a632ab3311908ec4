"""A node that applied a revocation and was cut off before the asking node kicked there (a red-team test).

Real nats-servers, real nats-py, the proxies of test_attack_r2 (every route that
involves node C can be cut while A-B stay routed).
"""

from __future__ import annotations

import asyncio
import contextlib

from unibus.aio import close_nats
from unibus.plugins.auth_enforce.enforcer import Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.policy import Policy

from .test_attack_r2 import Isolatable, _async, _bob
from .test_partial_mesh import _until


async def test_a_node_cut_off_right_after_it_applied_a_revocation_kicks_it_itself(tmp_path):
    """bob holds a connection on C that A never heard of (made while C was briefly cut off,
    with rights that were valid then). A revokes bob's room r1. A's apply request reaches C,
    C re-reads (its index drops r1), and right then C is cut off, before A's CONNZ/KICK reach
    C's server; A's change is then confirmed by {A, B} (C in nobody's routes). The hole the
    red team found: C kicked nothing, and when the change reached it through the watch its
    index revoked nothing more, so bob kept r1. Now C kicks, on its own server, what the
    apply request's re-read revoked (Enforcer._on_apply), cut off or not."""
    bob = None
    # C's index: bob (bus key K) in room r1
    c_policy = Policy()
    c_policy.load([("bob", "K")], {"r1": frozenset({"bob"})})
    c_revoked_on_apply: list[set[str]] = []
    async with Isolatable(tmp_path) as c:
        enforcers = c.enforcers
        armed = asyncio.Event()

        async def c_apply_local(handles: list[str], rooms: list[str]) -> set[str]:
            # what the plugin's apply_local does: re-read, here from C's own store view, and
            # return what that revoked (C kicks it on its own server)
            revoked = set()
            for r in rooms:
                revoked |= c_policy.set_room(r, frozenset())[0]
            c_revoked_on_apply.append(revoked)
            if armed.is_set():
                await c.cut()  # the partition starts right after C applied the change
            return revoked

        enforcers["C"].apply_local = c_apply_local  # read at each apply request
        try:
            await enforcers["A"].enforce(set(), set(), [])  # nothing to do; mesh not learned yet
            # learn the full set once (a revocation of nobody connected)
            await enforcers["A"].enforce({"nobody"}, set(), [])
            assert enforcers["A"].mesh.last == set(c.ids.values())
            c_revoked_on_apply.clear()
            c_policy.load([("bob", "K")], {"r1": frozenset({"bob"})})

            # 1. a brief cut: bob connects to C meanwhile (valid rights then); A misses his CONNECT event
            await c.isolate()
            bob = await _bob(c.ports["C"])
            await bob.flush(timeout=2)
            first_cid = bob._client_id
            await c.heal("mesh did not heal (1)")
            assert "bob" not in enforcers["A"].connections
            # the routes are back: wait for C's interest in the apply subject to reach A again
            await _until(lambda: _reaches_c(enforcers["A"], c_revoked_on_apply), "apply does not reach C")
            c_revoked_on_apply.clear()
            c_policy.load([("bob", "K")], {"r1": frozenset({"bob"})})

            # 2. A revokes bob's r1; C applies it, and is cut off at that moment
            armed.set()
            with contextlib.suppress(KickUnconfirmed):
                await enforcers["A"].enforce({"bob"}, set(), ["r1"])
            assert c_revoked_on_apply == [{"bob"}], "C applied the revocation"
            await _until(lambda: c.routes_are(c.C_ALONE), "C not isolated (2)")
            # C kicks bob's connection on its own server, although cut off from A
            await _until(_async(lambda: bob._client_id != first_cid or not bob.is_connected),
                         "bob's connection on C (old rights) survived a revocation C had applied")
            await _until(_async(lambda: enforcers["A"].pending == {}), "A never confirmed")
        finally:
            if bob is not None:
                await close_nats(bob)


async def _reaches_c_impl(a: Enforcer, seen: list) -> bool:
    before = len(seen)
    with contextlib.suppress(KickUnconfirmed):
        await a.enforce({"nobody"}, set(), [])
    return len(seen) > before


def _reaches_c(a, seen):
    return _reaches_c_impl(a, seen)
