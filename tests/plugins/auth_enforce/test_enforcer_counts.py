"""Which servers must confirm a change (plugins/auth_enforce/enforcer.py, mesh.py): never fewer than there are.

A clustered node expects a set of server ids: its own, every node that answers,
and every server their nats-servers have routes to. A partial mesh (the route
A-B down, both keeping C) must not confirm a revocation on A because C answers:
B, named by C's routes, never heard it. On a loaded machine a ROUTEZ can go
unanswered; expecting only this node then would let a revocation be confirmed
by this node alone while a hung peer still holds the member's connection with
the old rights (found by a flaky cluster test). And a server that does not
answer CONNZ is not a server without connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from unibus.client.keys import generate_identity
from unibus.plugins.auth_enforce.enforcer import APPLY_SUBJECT, Enforcer, KickUnconfirmed
from unibus.plugins.auth_enforce.callout import Issuer, Responder
from unibus.plugins.auth_enforce.mesh import Mesh, MeshUnknown
from unibus.plugins.auth_enforce.policy import Policy
from unibus.testing import MembershipdProcess, bootstrap_member


def enforcer(sys_nc=None, *, routes=None, clustered: bool = True, responder=None) -> Enforcer:
    async def own_routes():
        return routes.pop(0) if isinstance(routes, list) else routes

    return Enforcer(sys_nc, sys_nc, responder, clustered=clustered, node="n1", routes=own_routes)


@contextlib.asynccontextmanager
async def local_daemon(tmp_path, alice) -> AsyncIterator[tuple[Any, str, Any]]:
    """A daemon in this process (bus enforcement on, alice its admin): ``(daemon, its NATS URL,
    alice's client)``, so a test can reach into its store and the plugin's runtime."""
    from unibus.client import UnibusClient
    from unibus.daemon import Daemon
    from unibus.pluginmanager import PluginManager
    from unibus.settings import HostPort, Settings
    from unibus.testing import free_port

    data_dir = tmp_path / "d"
    bootstrap_member(data_dir, alice, "admin")
    settings = Settings(data_dir=data_dir, http_addr=HostPort("127.0.0.1", free_port()),
                        nats_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    daemon = Daemon(settings, PluginManager())
    await daemon.start()
    a = UnibusClient(f"http://{settings.http_addr}", alice)
    try:
        yield daemon, f"nats://{settings.nats_addr}", a
    finally:
        await a.close()
        await daemon.stop()


async def bus_login(url: str, member: Any, **options: Any) -> Any:
    """``member``'s NATS connection with its bus key, no reconnect (a kick or a refusal is final)."""
    return await nats.connect(url, nkeys_seed_str=member.bus_nkey_seed(), allow_reconnect=False, connect_timeout=3,
                              **options)


async def listening_in_a_room(a: Any, url: str, bob: Any) -> tuple[str, Any]:
    """bob added by alice's client ``a``, put in a new room, and subscribed to it on the bus:
    ``(room_id, his connection)``; the subscription is live when this returns."""
    await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
    room = (await a.create_room("ops"))["room_id"]
    await a.add_room_member(room, "bob")
    nc = await bus_login(url, bob)
    await nc.subscribe(f"unibus.room.{room}.>")
    await nc.flush()
    return room, nc


async def until(done: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether ``done()`` holds within ``seconds`` (polled every 20 ms)."""
    for _ in range(int(seconds / 0.02)):
        if done():
            return True
        await asyncio.sleep(0.02)
    return done()


def cut(nc) -> bool:
    return nc.is_closed or not nc.is_connected


# -- the expected set (plugins/auth_enforce/mesh.py), from what the responders said --------

def test_a_partial_mesh_expects_the_server_a_responder_names():
    """A lost its route to B, C kept both: A hears from A and C, and C names B."""
    assert Mesh().expected("A", {"A": frozenset({"C"}), "C": frozenset({"A", "B"})}) == {"A", "B", "C"}
    assert not Mesh().complete("A", {"A": frozenset({"C"}), "C": frozenset({"A", "B"})})


def test_a_full_mesh_expects_every_server_and_is_complete_once_all_answered():
    full = {"A": frozenset({"B", "C"}), "B": frozenset({"A", "C"}), "C": frozenset({"A", "B"})}
    mesh = Mesh()
    assert mesh.complete("A", full) and mesh.expected("A", full) == {"A", "B", "C"}
    assert not mesh.complete("A", {k: full[k] for k in ("A", "C")})


def test_a_silent_routez_confirms_nothing_even_with_a_last_set():
    """No stand-in for routes a server did not say: it may route to a server that joined
    since the last full answer (red teams r4 and r5)."""
    mesh = Mesh()
    full = {"A": frozenset({"B", "C"}), "B": frozenset({"A", "C"}), "C": frozenset({"A", "B"})}
    assert mesh.expected("A", full) == {"A", "B", "C"}
    for said in ({"A": None, "C": frozenset({"A"})},  # A's own ROUTEZ unanswered
                 {"C": frozenset({"A", "B"})},  # A never answered at all (its membershipd hung)
                 {"A": frozenset({"C"}), "C": None}):  # C's unanswered, as in a partial mesh
        with pytest.raises(MeshUnknown):
            mesh.expected("A", said)
        assert not mesh.complete("A", said)
    # a new full answer replaces the set: a server gone from every route set is no longer expected
    assert mesh.expected("A", {"A": frozenset({"C"}), "C": frozenset({"A"})}) == {"A", "C"}
    # cut off from every route: the last set
    assert mesh.expected("A", {"A": frozenset()}) == {"A", "C"}


def test_before_any_set_a_silent_routez_confirms_nothing():
    with pytest.raises(MeshUnknown):
        Mesh().expected("A", {"A": None, "C": frozenset({"A"})})
    assert not Mesh().complete("A", {"A": None, "C": frozenset({"A"})})


def test_a_node_is_never_alone_once_it_knew_its_peers():
    mesh = Mesh()
    assert mesh.expected("A", {"A": frozenset()}) == {"A"}  # routes not formed yet: what ROUTEZ says now
    assert mesh.last is None  # and not kept
    with pytest.raises(MeshUnknown):
        mesh.expected("A", {"A": None})
    assert mesh.expected("A", {"A": frozenset({"B"}), "B": frozenset({"A"})}) == {"A", "B"}
    # cut off from every route: the servers it lost did not get the change
    assert mesh.expected("A", {"A": frozenset()}) == {"A", "B"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    bootstrap_member(root / "data", generate_identity("alice"), "admin")
    d = MembershipdProcess(root / "data").start()
    try:
        yield d
    finally:
        d.stop()


async def _system_connection(daemon):
    return await nats.connect(daemon.nats_url, nkeys_seed=str(daemon.data_dir / "system.nkey"),
                              allow_reconnect=False, connect_timeout=5)


def test_a_node_learns_its_peers_from_its_own_routes_before_any_change():
    mesh = Mesh()
    assert not mesh.learn("A", frozenset()) and not mesh.learn("A", None)  # no routes yet: nothing known
    assert mesh.expected("A", {"A": frozenset()}) == {"A"}
    assert mesh.learn("A", frozenset({"C"})) and mesh.seed == {"A", "C"} and mesh.last is None
    # cut off before its first change: it expects the peer it knew
    assert mesh.expected("A", {"A": frozenset()}) == {"A", "C"}
    assert mesh.learn("A", frozenset({"B"})) and mesh.seed == {"A", "B", "C"}  # it only grows
    assert mesh.expected("A", {"A": frozenset()}) == {"A", "B", "C"}


def test_a_learned_seed_never_stands_in_for_an_unanswered_route_set():
    """The seed may miss a peer whose route formed later (red team r4): before any full
    answer, a responder that cannot say its routes still confirms nothing."""
    mesh = Mesh()
    mesh.learn("A", frozenset({"C"}))  # B's route formed after A learned
    with pytest.raises(MeshUnknown):
        mesh.expected("A", {"A": frozenset({"B", "C"}), "C": None})
    assert not mesh.complete("A", {"A": frozenset({"C"}), "C": None})
    # a full answer is the set from then on, and the seed no longer matters
    full = {"A": frozenset({"B", "C"}), "B": frozenset({"A", "C"}), "C": frozenset({"A", "B"})}
    assert mesh.expected("A", full) == {"A", "B", "C"} and mesh.last == {"A", "B", "C"}


def test_a_peer_that_joined_after_the_last_full_answer_is_expected_once_this_node_routes_to_it():
    """Red team r4: the last full answer was {A, C} (B was down); B joined since. A's own
    ROUTEZ (every second) adds B, so cut off later, A still expects B."""
    mesh = Mesh()
    assert mesh.expected("A", {"A": frozenset({"C"}), "C": frozenset({"A"})}) == {"A", "C"}
    mesh.learn("A", frozenset({"B", "C"}))
    assert mesh.last == {"A", "B", "C"}
    assert mesh.expected("A", {"A": frozenset()}) == {"A", "B", "C"}  # cut off: B is expected too
    # only a full answer drops a server
    mesh.learn("A", frozenset({"C"}))
    assert mesh.last == {"A", "B", "C"}
    assert mesh.expected("A", {"A": frozenset({"C"}), "C": frozenset({"A"})}) == {"A", "C"}


async def test_connz_is_incomplete_when_a_server_is_silent(daemon):
    """One real nats-server answers; the node expects a peer too: the listing is
    incomplete (a revocation then answers 503 and is retried), not empty and done."""
    nc = await _system_connection(daemon)
    try:
        own = await _server_id(nc)
        found, complete = await enforcer(nc)._connz({"acc": "MEMBERS"}, frozenset({own}))
        assert complete and list(found) == [own]
        found, complete = await enforcer(nc)._connz({"acc": "MEMBERS"}, frozenset({own, "NPEER"}), timeout=0.3)
        assert not complete and list(found) == [own]
        found, complete = await enforcer(nc)._connz({"acc": "MEMBERS"}, frozenset(), timeout=0.3)
        assert not complete  # no server could be told: nothing is confirmed
    finally:
        await nc.close()


async def _peer(nc, server_id: str, routes: list[str]) -> list:
    """A stand-in for another node of the cluster, on the real nats-server: its membershipd
    answers apply requests with its server id and its routes, its nats-server answers CONNZ
    (no connections). Injected replies: a real cut of one route needs iptables."""
    async def on_apply(msg):
        await msg.respond(json.dumps({"node": server_id.lower(), "server": server_id, "routes": routes,
                                      "in_flight": []}).encode())

    async def on_connz(msg):
        await msg.respond(json.dumps({"server": {"id": server_id},
                                      "data": {"server_id": server_id, "connections": []}}).encode())

    subs = [await nc.subscribe(APPLY_SUBJECT, cb=on_apply), await nc.subscribe("$SYS.REQ.SERVER.PING.CONNZ",
                                                                            cb=on_connz)]
    await nc.flush()
    return subs


@contextlib.asynccontextmanager
async def meshed(daemon, peers: dict[str, list[str]], *, clustered: bool = True) -> AsyncIterator[tuple]:
    """An enforcer on the daemon's real nats-server (node A) with stand-ins for the other nodes
    (:func:`_peer`): ``peers`` maps each to its routes, ``"A"`` naming the real server. Yields
    ``(the enforcer, the system connection, A's server id)``; stops and closes all of it."""
    nc = await _system_connection(daemon)
    e = None
    subs: list = []
    try:
        a = await _server_id(nc)
        for name, routes in peers.items():
            subs += await _peer(nc, name, [a if r == "A" else r for r in routes])
        own_routes = frozenset(name for name, routes in peers.items() if "A" in routes)
        e = enforcer(nc, routes=own_routes, clustered=clustered,
                     responder=Responder(Policy(), Issuer.from_raw(os.urandom(32))))
        await e.start()
        yield e, nc, a
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if e is not None:
            await e.stop()
        await nc.close()


@pytest.mark.parametrize("mesh", ["full", "partial"])
async def test_a_partial_mesh_does_not_confirm_a_revocation(daemon, mesh):
    """Nodes A (the real server here), B and C. Full mesh: every node answers, the revocation
    is confirmed. Partial mesh, the route A-B down, both keep C: A's routes name C alone,
    B never hears A's requests, C names B. Counting A's routes (1 + 1 = 2 servers, and
    A and C answer) confirmed it although B never kicked bob; now it is not confirmed:
    503, pending and retried until B answers (docs/bus-auth.md)."""
    peers = {"NB": ["A", "NC"], "NC": ["A", "NB"]} if mesh == "full" else {"NC": ["A", "NB"]}
    async with meshed(daemon, peers) as (e, nc, a):
        if mesh == "full":
            await e.enforce({"bob"}, set(), ["r1"])
            assert e.pending == {} and e.mesh.last == {a, "NB", "NC"}
        else:
            with pytest.raises(KickUnconfirmed, match="2 of 3 nodes confirmed the change .no answer from NB"):
                await e.enforce({"bob"}, set(), ["r1"])
            assert e.pending == {"bob": True} and e.pending_rooms == {"r1"}


@pytest.mark.parametrize("clustered", [True, False])
async def test_a_grant_to_a_member_off_the_bus_is_read_by_every_node_before_the_answer(daemon, clustered):
    """A test of two nodes' TLS cluster failed one run in two: bob, added to a room while he
    had no connection, logged in right after the 2xx and was answered by a node that had not
    read the grant yet from the KV watch, so his first subscription to the room was refused
    for good. A grant to a member off the bus skipped the apply round (no kick to make). On a
    cluster every node now re-reads it before the answer; a single node still does no NATS work."""
    applied: list[dict] = []
    async with meshed(daemon, {"NB": ["A", "NC"], "NC": ["A", "NB"]}, clustered=clustered) as (e, nc, a):
        async def recorded(msg):
            applied.append(json.loads(msg.data))

        sub = await nc.subscribe(APPLY_SUBJECT, cb=recorded)
        await nc.flush()
        assert not e.kicked_by_grant("bob")  # off the bus
        await e.enforce(set(), {"bob"}, ["r1"])
        await nc.flush()
        await sub.unsubscribe()
        if clustered:
            assert [r["handles"] for r in applied] == [["bob"]] and applied[0]["rooms"] == ["r1"]
            assert e.pending == {} and e.mesh.last == {a, "NB", "NC"}
        else:
            assert applied == [] and e.stats["changes"] == 0


async def _server_id(nc) -> str:
    return nc._server_info["server_id"]


def test_a_removal_revokes_whatever_a_lagging_index_said():
    """The index follows other nodes' writes through the KV watch; a removal made here must
    kick the member even when the index had not yet seen it join (docs/bus-auth.md)."""
    from unibus.plugins.auth_enforce import implied_revocations
    from unibus.store.base import Change

    assert implied_revocations(Change("room_member_removed", handle="bob", room_id="r1")) == {"bob"}
    assert implied_revocations(Change("member_deleted", handle="bob", rooms=("r1",))) == {"bob"}
    assert implied_revocations(Change("member_bus_key", handle="bob")) == {"bob"}
    assert implied_revocations(Change("room_deleted", room_id="r1",
                                      before={"room_id": "r1", "members": ["alice", "bob"]})) == {"alice", "bob"}
    for granting in (Change("room_member_added", handle="bob", room_id="r1"), Change("member_added", handle="bob"),
                     Change("room_created", handle="bob", room_id="r1"), Change("room_deleted", room_id="r1")):
        assert implied_revocations(granting) == set()


async def test_a_store_read_failing_after_the_commit_still_cuts_the_member_off(tmp_path, alice):
    """Red team: the re-read after a removal's commit fails (a KV read timing out on a loaded
    machine). Before, the removal answered 2xx with no kick, nothing pending and a stale
    index, and bob kept the room. Now the index takes the change from its own record and
    the removal kicks bob all the same; his next connection does not get the room."""
    from unibus.store.base import StoreUnavailable

    bob = generate_identity("bob")
    conns = []
    async with local_daemon(tmp_path, alice) as (daemon, url, a):
        try:
            room, nc = await listening_in_a_room(a, url, bob)
            conns.append(nc)

            real, failed = daemon.store.room_handles, []

            async def fails_once(room_id):
                if not failed:
                    failed.append(room_id)
                    raise StoreUnavailable("the KV read timed out")
                return await real(room_id)

            daemon.store.room_handles = fails_once
            await a.remove_room_member(room, "bob")
            assert failed == [room]
            assert await until(lambda: cut(nc), 2)  # the kick came before the 2xx: the client sees its socket close
            errors = []

            async def on_error(e):
                errors.append(str(e).lower())

            again = await bus_login(url, bob, error_cb=on_error)
            conns.append(again)
            await again.subscribe(f"unibus.room.{room}.>")
            await again.flush()
            await again.flush()
            assert any("permissions violation" in e and "subscription" in e for e in errors), errors
        finally:
            for c in conns:
                if not c.is_closed:
                    await c.close()


def test_a_pending_change_keeps_its_rooms_for_the_retries():
    """Retries and the second sweep ask every node to re-read the rooms too, not only the
    members: a node that missed the first apply must not confirm with a stale room (red team)."""
    e = enforcer()
    e.mark_pending({"bob"}, {"carol"}, ["r1"])
    e.mark_pending(set(), {"bob"}, ["r2"])
    assert e.pending == {"bob": True, "carol": False} and e.pending_rooms == {"r1", "r2"}
    assert e.stats["unconfirmed"] == 2


async def test_another_nodes_revocation_is_kicked_here_when_it_reaches_this_node(tmp_path, alice):
    """Red team: a node cut off from the others when a revocation was made (a partition:
    the others no longer counted it) holds connections nobody kicked, authorized by its
    callout with the old rights. When the change reaches it through the KV watch (a
    ``reloaded`` change with the store keys, origin ``remote``), the plugin kicks on this
    node's own server what the change revoked in this node's index. Here the store is
    changed with the plugin deaf to it (as if another node wrote it), then the remote
    change is handed to the plugin as the watch would."""
    from unibus.app import stash
    from unibus.plugins.auth_enforce import PLUGIN_NAME, RUNTIME, apply_change
    from unibus.store.base import Change

    bob = generate_identity("bob")
    nc = None
    async with local_daemon(tmp_path, alice) as (daemon, url, a):
        try:
            room, nc = await listening_in_a_room(a, url, bob)
            rt = stash(daemon.app, PLUGIN_NAME)[RUNTIME]
            assert rt.unsubscribe is not None
            rt.unsubscribe()  # deaf: the removal below is "another node's" write
            await a.remove_room_member(room, "bob")
            await asyncio.sleep(0.3)
            assert nc.is_connected, "nothing kicked yet: this node has not seen the change"
            assert room in rt.policy.snapshot()["bob"][1], "this node's index still gives bob the room"
            await apply_change(rt, Change(kind="reloaded", origin="remote", keys=(f"room.{room}",)))
            assert await until(lambda: cut(nc), 2), "the remote revocation was not kicked on this node"
            assert not rt.enforcer.pending
        finally:
            if nc is not None and not nc.is_closed:
                await nc.close()


async def test_a_restarted_server_s_old_connections_are_forgotten_and_its_late_events_ignored():
    """A server's name with a new id drops the connections of the old id (a restarted
    nats-server: their kicks would have no responder). An event of the old process that
    arrives after that (routed late) neither brings them back nor drops the new ones."""
    from types import SimpleNamespace

    from unibus.plugins.auth_enforce.enforcer import CONNECT_EVENTS

    def event(server_id: str, cid: int, user: str, name: str = "n2"):
        data = {"type": "io.nats.server.advisory.v1.client_connect",
                "server": {"id": server_id, "name": name}, "client": {"id": cid, "user": user}}
        return SimpleNamespace(subject=CONNECT_EVENTS, data=json.dumps(data).encode())

    e = enforcer(None, responder=Responder(Policy(), Issuer.from_raw(os.urandom(32))))
    await e._on_event(event("OLD", 1, "bob"))
    await e._on_event(event("X", 9, "carol", name="n3"))
    assert e.connections == {"bob": {("OLD", 1)}, "carol": {("X", 9)}}
    await e._on_event(event("NEW", 7, "bob"))  # n2 restarted
    assert e.connections == {"bob": {("NEW", 7)}, "carol": {("X", 9)}}
    await e._on_event(event("OLD", 2, "dave"))  # late, from the ended process
    assert e.connections == {"bob": {("NEW", 7)}, "carol": {("X", 9)}}
    assert e.server_ids == {"n2": "NEW", "n3": "X"}


async def test_a_remote_change_this_node_cannot_read_fails_closed_until_it_reads_again(tmp_path, alice):
    """A cluster fault test on a loaded machine (CI): a member deleted through another node still
    logged in to the bus on one node, while its HTTP said 401. The node learnt the deletion through
    its KV watch while its store reads failed (a fault elsewhere), so its index kept bob's rights for
    good. Now such a change takes what it names out of the index (bob kicked, his login refused),
    and everything is read again until that works. Here the store fails the one re-read, as a real
    store does while JetStream has no leader."""
    from unibus.app import stash
    from unibus.plugins.auth_enforce import PLUGIN_NAME, RUNTIME, apply_change
    from unibus.store.base import Change, StoreUnavailable

    class FailsOnce:
        """The daemon's own store, whose next read through ``method`` fails (no JetStream leader)."""

        def __init__(self, store, method):
            self._store, self._method, self.failed = store, method, 0

        def __getattr__(self, name):
            real = getattr(self._store, name)
            if name != self._method:
                return real

            async def read(*args, **kwargs):
                if not self.failed:
                    self.failed += 1
                    raise StoreUnavailable("no JetStream leader")
                return await real(*args, **kwargs)

            return read

    bob, carol = generate_identity("bob"), generate_identity("carol")
    conns = []
    async with local_daemon(tmp_path, alice) as (daemon, url, a):

        async def bus_login(who) -> bool:
            try:
                nc = await nats.connect(url, nkeys_seed_str=who.bus_nkey_seed(), allow_reconnect=False,
                                        connect_timeout=3)
            except Exception:  # noqa: BLE001 - refused
                return False
            conns.append(nc)
            return True

        try:
            for who in (bob, carol):
                await a.add_member(who.handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub)
            room = (await a.create_room("ops"))["room_id"]
            await a.add_room_member(room, "carol")
            assert await bus_login(bob) and await bus_login(carol)
            rt = stash(daemon.app, PLUGIN_NAME)[RUNTIME]
            rt.unsubscribe()  # deaf: the deletion below is "another node's" write
            await a.remove_member("bob")
            assert rt.policy.grant(bob.bus_pub) is not None, "this node has not seen the deletion"
            real = rt.store
            store = rt.store = FailsOnce(real, "bus_member")
            await apply_change(rt, Change(kind="reloaded", origin="remote", keys=("member.bob",)))
            assert store.failed == 1
            assert rt.policy.grant(bob.bus_pub) is None and not await bus_login(bob)
            assert await until(lambda: not rt.tasks)  # the full re-read (after 0.5 s)
            assert rt.policy.grant(bob.bus_pub) is None and not await bus_login(bob)
            assert room in rt.policy.snapshot()["carol"][1] and await bus_login(carol)  # the others keep theirs

            # The watch missed changes (no keys: everything is re-read) and that read fails too.
            await a.remove_room_member(room, "carol")
            store = rt.store = FailsOnce(real, "list_members")
            await apply_change(rt, Change(kind="reloaded", origin="remote"))
            assert store.failed == 1
            assert await until(lambda: not rt.tasks) and room not in rt.policy.snapshot()["carol"][1]
        finally:
            for nc in conns:
                if not nc.is_closed:
                    await nc.close()


async def test_a_full_read_older_than_a_deletion_gives_no_rights_back(tmp_path, alice):
    """Red team: a full read of the members (SIGHUP, a missed watch, a retried failed re-read)
    whose lists were read before a deletion, and applied after it, gave the deleted member its
    bus rights back, for good. What is updated one by one during a full read is read again after
    it. And a re-read is not started once shutdown has begun (one kept retrying after stop)."""
    from unibus.app import stash
    from unibus.plugins.auth_enforce import PLUGIN_NAME, RUNTIME, load_policy, reload_until_read

    class SlowLists:
        """The daemon's own store, whose member list is read at once and handed over late."""

        def __init__(self, store):
            self._store, self.read, self.release = store, asyncio.Event(), asyncio.Event()

        async def list_members(self):
            members = await self._store.list_members()
            self.read.set()
            await self.release.wait()
            return members

        def __getattr__(self, name):
            return getattr(self._store, name)

    bob = generate_identity("bob")
    async with local_daemon(tmp_path, alice) as (daemon, url, a):
        await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        rt = stash(daemon.app, PLUGIN_NAME)[RUNTIME]
        slow = SlowLists(rt.store)
        load = asyncio.create_task(load_policy(slow, rt.policy))
        await asyncio.wait_for(slow.read.wait(), 10)  # the list, bob in it, is read
        await a.remove_member("bob")  # this node's deletion, applied one by one
        assert rt.policy.grant(bob.bus_pub) is None
        slow.release.set()
        await asyncio.wait_for(load, 10)  # the older list is loaded, then bob is read again
        assert rt.policy.grant(bob.bus_pub) is None
        with pytest.raises(Exception):  # noqa: B017, PT011 - refused: an authorization violation
            nc = await bus_login(url, bob)
            await nc.close()
    reload_until_read(rt)  # a read that failed as the store closed: nothing is started any more
    assert rt.stopping and not rt.tasks


async def test_a_full_read_does_not_count_a_change_applied_while_it_read(tmp_path, alice):
    """Red team (SIGHUP): a full read measured what it changed from the index as it was when the
    read began, so a room change applied one by one meanwhile (and kicked by itself) was kicked
    again by every SIGHUP's read under way. Now only what the load itself changed counts; an
    offline change, which only the load sees, still does."""
    from unibus.app import stash
    from unibus.plugins.auth_enforce import PLUGIN_NAME, RUNTIME, load_policy
    from unibus.store.sqlite import SqliteStore

    class SlowLists:
        def __init__(self, store):
            self._store, self.read, self.release = store, asyncio.Event(), asyncio.Event()

        async def membership(self):
            rooms = await self._store.membership()
            self.read.set()
            await self.release.wait()
            return rooms

        def __getattr__(self, name):
            return getattr(self._store, name)

    bob, carol = generate_identity("bob"), generate_identity("carol")
    async with local_daemon(tmp_path, alice) as (daemon, url, a):
        for who in (bob, carol):
            await a.add_member(who.handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub)
        room = (await a.create_room("r"))["room_id"]
        rt = stash(daemon.app, PLUGIN_NAME)[RUNTIME]
        slow = SlowLists(rt.store)
        load = asyncio.create_task(load_policy(slow, rt.policy))
        await asyncio.wait_for(slow.read.wait(), 10)  # the rooms are read: bob in none
        await a.add_room_member(room, "bob")  # applied one by one (and kicked) while the read waits
        assert room in rt.policy.snapshot()["bob"][1]
        slow.release.set()
        revoked, granted = await asyncio.wait_for(load, 10)
        assert "bob" not in revoked and "bob" not in granted  # his change was his own to kick
        assert room in rt.policy.snapshot()["bob"][1]  # and the older list did not take it away
        # carol added to the room by another process on the same database (as an offline command
        # writes it): this daemon hears nothing of it, and only the load sees it
        other = SqliteStore(tmp_path / "d" / "membershipd.db")
        try:
            await other.add_room_member(room, "carol")
        finally:
            await other.close()
        assert "carol" not in rt.policy.room_members.get(room, ())
        revoked, granted = await load_policy(rt.store, rt.policy)
        assert granted == {"carol"} and not revoked


async def test_changes_being_retried_still_count_as_pending(monkeypatch):
    """/healthz's kicks_pending and the pending gauge read 0 while the retry loop was trying the
    pending changes (it takes them out of ``pending`` for the attempt): a cluster test that read
    /healthz a moment later than before saw no kick pending while one was. They count now."""
    from unibus.plugins.auth_enforce import enforcer as module

    monkeypatch.setattr(module, "RETRY_EVERY", 0.05)
    e = enforcer(clustered=False)
    e.mark_pending({"bob"}, {"carol"}, ["r1"])
    trying = asyncio.Event()
    release = asyncio.Event()

    async def slow_enforce(revoked, granted, rooms):
        trying.set()
        await release.wait()

    e._enforce = slow_enforce
    loop_task = asyncio.create_task(e._retry_loop())
    try:
        await asyncio.wait_for(trying.wait(), 5)
        assert e.pending == {} and e.pending_count == 2  # taken out for the attempt, still counted
        release.set()
        assert await until(lambda: e.pending_count == 0, 5)  # confirmed
    finally:
        e._stopped = True
        release.set()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task


async def test_repeated_revocations_of_a_member_make_one_second_sweep_after_the_last(monkeypatch):
    """Red team: any member may add another to a room of its own and remove it again, in a loop.
    Each revocation scheduled its own second sweep, and each sweep kicked the member's connections,
    current ones too: 86 kicks, hundreds of sweeps, a 503. Now a member revoked again before its
    sweep ran is swept once, no sooner than SECOND_SWEEP_AFTER after the last revocation (the
    grants answered around it are what the sweep is for); another member keeps its own time."""
    import time

    from unibus.plugins.auth_enforce import enforcer as module

    monkeypatch.setattr(module, "SECOND_SWEEP_AFTER", 0.3)
    e = enforcer(clustered=False, responder=Responder(Policy(), Issuer.from_raw(os.urandom(32))))
    swept: list[tuple[float, set[str], list[str]]] = []

    async def sweep(handles, rooms):
        swept.append((time.monotonic(), set(handles), list(rooms)))

    e._sweep = sweep
    try:
        last = 0.0
        for i in range(20):
            e._schedule_sweep({"carol"}, [f"r{i % 2}"])
            last = time.monotonic()
            if i == 5:
                e._schedule_sweep({"dave"}, [])
            await asyncio.sleep(0.05)
        assert await until(lambda: len(swept) == 2, 5), swept
        await asyncio.sleep(0.5)
        assert len(swept) == 2, swept  # one each
        (t_dave, dave, _), (t_carol, carol, rooms) = swept
        assert dave == {"dave"} and carol == {"carol"} and rooms == ["r0", "r1"]
        assert t_carol >= last + 0.3
        assert e._sweeper is not None and e._sweeper.done() and not e._sweep_due
    finally:
        await e.stop()


async def test_a_full_read_never_holds_a_revoked_room_while_it_reads_again(tmp_path, alice):
    """Red team (SIGHUP): between a full read's load of its older lists and its re-read of what
    changed meanwhile, the index held a room just taken from bob, and his logins got it (kicked
    only by the removal's second sweep, 2.7 s later). The changes applied one by one go back
    into the index in the same step as the load."""
    from unibus.app import stash
    from unibus.plugins.auth_enforce import PLUGIN_NAME, RUNTIME, load_policy

    class Slow:
        """The daemon's store: the rooms read at once and handed over late, then the re-read held."""

        def __init__(self, store):
            self._store = store
            self.read, self.release = asyncio.Event(), asyncio.Event()
            self.rereading, self.reread_release = asyncio.Event(), asyncio.Event()

        async def membership(self):
            rooms = await self._store.membership()
            self.read.set()
            await self.release.wait()
            return rooms

        async def room_handles(self, room_id):
            self.rereading.set()
            await self.reread_release.wait()
            return await self._store.room_handles(room_id)

        async def bus_member(self, handle):
            self.rereading.set()
            await self.reread_release.wait()
            return await self._store.bus_member(handle)

        def __getattr__(self, name):
            return getattr(self._store, name)

    bob = generate_identity("bob")
    async with local_daemon(tmp_path, alice) as (daemon, url, a):
        await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await a.create_room("r"))["room_id"]
        await a.add_room_member(room, "bob")
        rt = stash(daemon.app, PLUGIN_NAME)[RUNTIME]
        slow = Slow(rt.store)
        load = asyncio.create_task(load_policy(slow, rt.policy))
        await asyncio.wait_for(slow.read.wait(), 10)  # the rooms are read: bob in the room
        await a.remove_room_member(room, "bob")  # applied one by one while the read waits
        slow.release.set()
        await asyncio.wait_for(slow.rereading.wait(), 10)  # loaded; the re-read is under way
        assert room not in rt.policy.snapshot()["bob"][1]  # never given back, not even for a moment
        assert rt.policy.grant(bob.bus_pub) is not None and not rt.policy.grant(bob.bus_pub).publish
        slow.reread_release.set()
        revoked, granted = await asyncio.wait_for(load, 10)
        assert "bob" not in granted and room not in rt.policy.snapshot()["bob"][1]


async def test_a_member_withdrawn_during_a_full_read_gets_its_rooms_back_from_the_store():
    """Review: a member taken out of the index while a full read read its lists (``withdraw``,
    failing closed after another node's change could not be read) was put back absent after the
    load, which took it out of every room, and its re-read put the member back with none: its
    rooms are read again from the store too."""
    from types import SimpleNamespace

    from unibus.plugins.auth_enforce import load_policy, withdraw

    rooms = {"r1": frozenset({"bob", "alice"}), "r2": frozenset({"bob"})}

    class Store:
        def __init__(self, policy):
            self.policy = policy

        async def list_members(self):
            return [SimpleNamespace(handle="bob", bus_pub="UBOB"), SimpleNamespace(handle="alice", bus_pub="UALICE")]

        async def membership(self):
            withdraw(self.policy, ["bob"], [])  # while the lists are read
            return SimpleNamespace(rooms=dict(rooms))

        async def bus_member(self, handle):
            return True, {"bob": "UBOB", "alice": "UALICE"}[handle], 7

        async def room_handles(self, room_id):
            return rooms[room_id], 3

    policy = Policy()
    policy.load([("bob", "UBOB"), ("alice", "UALICE")], rooms)
    revoked, granted = await load_policy(Store(policy), policy)
    assert policy.snapshot()["bob"] == ("UBOB", frozenset({"r1", "r2"}))  # as the store has it
    assert "bob" not in revoked
