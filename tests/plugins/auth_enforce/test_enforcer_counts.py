"""How many servers must confirm a change (plugins/auth_enforce/enforcer.py): never fewer than there are.

A clustered node counts its peers from its nats-server's ROUTEZ. On a loaded
machine that request can go unanswered; counting only itself then would let a
revocation be confirmed by this node alone while a hung peer still holds the
member's connection with the old rights (found by a flaky cluster test). And a
server that does not answer CONNZ is not a server without connections.
"""

from __future__ import annotations

import nats
import pytest
from unibus.client.keys import generate_identity
from unibus.plugins.auth_enforce.enforcer import Enforcer, KickUnconfirmed
from unibus.testing import MembershipdProcess, bootstrap_member


def enforcer(sys_nc=None, *, answers: list, clustered: bool = True) -> Enforcer:
    async def peers():
        return answers.pop(0)

    return Enforcer(sys_nc, sys_nc, None, clustered=clustered, node="n1", peers=peers)


async def test_a_node_that_cannot_count_its_peers_confirms_nothing():
    e = enforcer(answers=[None])
    with pytest.raises(KickUnconfirmed, match="did not say which servers it has routes to"):
        await e.expected_servers()


async def test_the_last_count_stands_while_routez_is_unanswered():
    e = enforcer(answers=[2, None, None, 1])
    assert [await e.expected_servers() for _ in range(4)] == [3, 3, 3, 2]


async def test_a_count_of_no_peers_is_not_what_a_silent_routez_falls_back_on():
    e = enforcer(answers=[0, None])
    assert await e.expected_servers() == 1  # routes not formed yet: what ROUTEZ says now
    with pytest.raises(KickUnconfirmed):
        await e.expected_servers()


async def test_a_single_node_counts_itself():
    assert await enforcer(answers=[], clustered=False).expected_servers() == 1


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    bootstrap_member(root / "data", generate_identity("alice"), "admin")
    d = MembershipdProcess(root / "data").start()
    try:
        yield d
    finally:
        d.stop()


async def test_connz_is_incomplete_when_a_server_is_silent(daemon):
    """One real nats-server answers; the node believes it has a peer: the listing is
    incomplete (a revocation then answers 503 and is retried), not empty and done."""
    nc = await nats.connect(daemon.nats_url, nkeys_seed=str(daemon.data_dir / "system.nkey"), allow_reconnect=False,
                            connect_timeout=5)
    try:
        alone = enforcer(nc, answers=[0])
        found, complete = await alone._connz({"acc": "MEMBERS"})
        assert complete and list(found) == [(await _server_id(nc))]
        believes_two = enforcer(nc, answers=[1])
        found, complete = await believes_two._connz({"acc": "MEMBERS"}, timeout=0.3)
        assert not complete and list(found) == [(await _server_id(nc))]
    finally:
        await nc.close()


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
    import asyncio

    from unibus.client import UnibusClient
    from unibus.daemon import Daemon
    from unibus.pluginmanager import PluginManager
    from unibus.settings import HostPort, Settings
    from unibus.store.base import StoreUnavailable
    from unibus.testing import free_port

    data_dir = tmp_path / "d"
    bootstrap_member(data_dir, alice, "admin")
    settings = Settings(data_dir=data_dir, http_addr=HostPort("127.0.0.1", free_port()),
                        nats_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    daemon = Daemon(settings, PluginManager())
    await daemon.start()
    bob = generate_identity("bob")
    a = UnibusClient(f"http://{settings.http_addr}", alice)
    url = f"nats://{settings.nats_addr}"
    conns = []
    try:
        await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await a.create_room("ops"))["room_id"]
        await a.add_room_member(room, "bob")
        nc = await nats.connect(url, nkeys_seed_str=bob.bus_nkey_seed(), allow_reconnect=False, connect_timeout=3)
        conns.append(nc)
        await nc.subscribe(f"unibus.room.{room}.>")
        await nc.flush()

        real, failed = daemon.store.room_handles, []

        async def fails_once(room_id):
            if not failed:
                failed.append(room_id)
                raise StoreUnavailable("the KV read timed out")
            return await real(room_id)

        daemon.store.room_handles = fails_once
        await a.remove_room_member(room, "bob")
        assert failed == [room]
        for _ in range(100):  # the kick came before the 2xx; the client sees its socket close
            if nc.is_closed or not nc.is_connected:
                break
            await asyncio.sleep(0.02)
        assert nc.is_closed or not nc.is_connected
        errors = []

        async def on_error(e):
            errors.append(str(e).lower())

        again = await nats.connect(url, nkeys_seed_str=bob.bus_nkey_seed(), allow_reconnect=False,
                                   connect_timeout=3, error_cb=on_error)
        conns.append(again)
        await again.subscribe(f"unibus.room.{room}.>")
        await again.flush()
        await again.flush()
        assert any("permissions violation" in e and "subscription" in e for e in errors), errors
    finally:
        for c in conns:
            if not c.is_closed:
                await c.close()
        await a.close()
        await daemon.stop()


def test_a_pending_change_keeps_its_rooms_for_the_retries():
    """Retries and the second sweep ask every node to re-read the rooms too, not only the
    members: a node that missed the first apply must not confirm with a stale room (red team)."""
    e = enforcer(answers=[])
    e.mark_pending({"bob"}, {"carol"}, ["r1"])
    e.mark_pending(set(), {"bob"}, ["r2"])
    assert e.pending == {"bob": True, "carol": False} and e.pending_rooms == {"r1", "r2"}
    assert e.stats["unconfirmed"] == 2
