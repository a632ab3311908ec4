"""auth_enforce against a real embedded nats-server and real nats-py clients.

Members are authorized by the auth callout; a change of rights kicks the
member's connections, which reconnect and get their new rights (docs/bus-auth.md).
"""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from nats.errors import NoServersError

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.plugins.auth_enforce import accounts, authorization, member_permissions
from unibus.testing import member_connections

WAIT = 10.0  # upper bound for "eventually"; the latency itself is measured in bench/


class Conn:
    """A member's NATS connection that records the server's -ERR lines."""

    def __init__(self, identity, url, *, reconnect: bool = False):
        self.identity, self.url, self.reconnect = identity, url, reconnect
        self.errors: list[str] = []
        self.closed = asyncio.Event()
        self.disconnects = 0
        self.reconnected = asyncio.Event()
        self.nc = None

    async def __aenter__(self):
        async def error_cb(e):
            self.errors.append(str(e))

        async def closed_cb():
            self.closed.set()

        async def disconnected_cb():
            self.disconnects += 1
            if not self.reconnect:
                self.closed.set()

        async def reconnected_cb():
            self.reconnected.set()

        self.nc = await nats.connect(self.url, nkeys_seed_str=self.identity.bus_nkey_seed(),
                                     inbox_prefix=f"_INBOX_{self.identity.handle}", error_cb=error_cb,
                                     closed_cb=closed_cb, disconnected_cb=disconnected_cb,
                                     reconnected_cb=reconnected_cb, allow_reconnect=self.reconnect,
                                     reconnect_time_wait=0.05, max_reconnect_attempts=3, connect_timeout=2)
        return self

    async def __aexit__(self, *exc):
        if not self.nc.is_closed:
            await self.nc.close()

    async def violation(self, what: str, within: float = 10) -> bool:
        """Wait (bounded) for a permissions violation mentioning ``what``."""
        await self.nc.flush(timeout=2)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if any("permissions violation" in e.lower() and what.lower() in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


async def eventually(check, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


@pytest.fixture
async def bus_world(daemon_with_admin, alice):
    server = daemon_with_admin()
    people = {"alice": alice, "bob": generate_identity("bob"), "carol": generate_identity("carol")}
    clients = {h: UnibusClient(server.base_url, i) for h, i in people.items()}
    for h in ("bob", "carol"):
        await clients["alice"].add_member(h, people[h].sign_pub_b64, people[h].enc_pub_b64, bus_pub=people[h].bus_pub)
    room = (await clients["alice"].create_room("ops"))["room_id"]
    other = (await clients["alice"].create_room("other"))["room_id"]
    await clients["alice"].add_room_member(room, "bob")
    await clients["alice"].add_room_member(room, "carol")
    yield server, people, clients, room, other
    for c in clients.values():
        await c.close()


async def receives(sub_conn: Conn, pub_conn: Conn, subject: str) -> bool:
    """Does a message published on ``subject`` by pub_conn reach a fresh subscription of sub_conn?"""
    sub = await sub_conn.nc.subscribe(subject)
    # Twice: nats-py 2.16 may send flush's PING before a still-buffered SUB.
    await sub_conn.nc.flush()
    await sub_conn.nc.flush()
    await pub_conn.nc.publish(subject, b"ping")
    await pub_conn.nc.flush()
    try:
        await sub.next_msg(timeout=0.5)
        return True
    except nats.errors.TimeoutError:
        return False
    finally:
        if not sub_conn.nc.is_closed:
            await sub.unsubscribe()


def test_permissions_and_config_shape():
    assert member_permissions("bob", []) == {"publish": [], "subscribe": ["_INBOX_bob.>"]}
    assert member_permissions("bob", ["r2", "r1"]) == {
        "publish": ["unibus.room.r1.>", "unibus.room.r2.>"],
        "subscribe": ["unibus.room.r1.>", "unibus.room.r2.>", "_INBOX_bob.>"]}
    # the configuration lists no member at all: the callout answers for MEMBERS
    block = accounts("USERVICE", "USYSTEM")
    assert block == {"UNIBUS": {"jetstream": "enabled", "users": [{"nkey": "USERVICE"}]}, "MEMBERS": {"limits": {"max_subscriptions": 1024}},
                     "SYS": {"users": [{"nkey": "USYSTEM"}]}}
    auth = authorization("USERVICE", "AISSUER")
    assert auth["auth_callout"] == {"issuer": "AISSUER", "account": "UNIBUS", "auth_users": ["USERVICE"],
                                    "allowed_accounts": ["MEMBERS"]}
    assert 1 <= auth["timeout"] < 2  # below nats-py's first PING (docs/bus-auth.md)
    text = json.dumps([block, auth])
    for absent in ("no_auth_user", "allow_responses", "exports", "imports"):
        assert absent not in text


async def test_anonymous_and_unknown_nkeys_are_refused(bus_world):
    server, people, *_ = bus_world
    for kwargs in ({}, {"nkeys_seed_str": generate_identity("mallory").bus_nkey_seed()}):
        with pytest.raises((nats.errors.Error, NoServersError)) as e:
            await nats.connect(server.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
                               **kwargs)
        assert "Authorization Violation" in str(e.value) or isinstance(e.value, NoServersError)


async def test_room_access_is_exactly_the_acl(bus_world):
    server, people, clients, room, other = bus_world
    async with Conn(people["bob"], server.nats_url) as bob, Conn(people["carol"], server.nats_url) as carol:
        assert await receives(carol, bob, f"unibus.room.{room}.chat")
        # request/reply between members: the reply subject is inside the room
        async def responder(msg):
            await carol.nc.publish(msg.reply, b"pong:" + msg.data)

        await carol.nc.subscribe(f"unibus.room.{room}.rpc", cb=responder)
        replies = await bob.nc.subscribe(f"unibus.room.{room}.reply.bob.>")
        await carol.nc.flush()
        await bob.nc.flush()
        await bob.nc.publish(f"unibus.room.{room}.rpc", b"x", reply=f"unibus.room.{room}.reply.bob.1")
        assert (await replies.next_msg(timeout=2)).data == b"pong:x"
        # ... and not through an inbox: no allow_responses, so carol cannot answer to bob's inbox
        inbox = await bob.nc.subscribe("_INBOX_bob.rpc.>")
        await bob.nc.flush()
        await bob.nc.publish(f"unibus.room.{room}.rpc", b"y", reply="_INBOX_bob.rpc.1")
        assert await carol.violation("_INBOX_bob.rpc.1")
        with pytest.raises(nats.errors.TimeoutError):
            await inbox.next_msg(timeout=0.3)

        for subject in (f"unibus.room.{other}.chat", ">", "unibus.>", "anything", "_INBOX_carol.>", "$JS.API.>",
                        "$KV.unibus_nonces.>"):
            sub = await bob.nc.subscribe(subject)
            assert await bob.violation(subject), subject
            await sub.unsubscribe()
        for subject in (f"unibus.room.{other}.chat", "anything", "_INBOX_carol.x", "$JS.API.INFO"):
            await bob.nc.publish(subject, b"x")
            assert await bob.violation(subject), subject
        assert not bob.nc.is_closed


async def test_membership_changes_reach_the_bus(bus_world):
    server, people, clients, room, other = bus_world
    a = clients["alice"]
    async with Conn(people["bob"], server.nats_url, reconnect=True) as bob, \
            Conn(people["alice"], server.nats_url, reconnect=True) as alice:
        # added to a room: the connection is kicked before the 2xx and comes back with the room
        assert not await receives(bob, alice, f"unibus.room.{other}.x")
        before = await member_connections(server, "bob")
        assert len(before) == 1
        await a.add_room_member(other, "bob")
        # the 200 is here: nats-server no longer holds bob's old connection
        assert not before & await member_connections(server, "bob")
        assert await eventually(lambda: receives(bob, alice, f"unibus.room.{other}.x"))

        # removed: cut off before the 204; the reconnect does not get the room back
        sub = await bob.nc.subscribe(f"unibus.room.{room}.>")
        await bob.nc.flush()
        await bob.nc.flush()
        await alice.nc.publish(f"unibus.room.{room}.before", b"1")
        assert (await sub.next_msg(timeout=2)).data == b"1"
        bob.reconnected.clear()
        before = await member_connections(server, "bob")
        await a.remove_room_member(room, "bob")
        assert not before & await member_connections(server, "bob")
        await alice.nc.publish(f"unibus.room.{room}.after", b"2")
        await alice.nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
        await asyncio.wait_for(bob.reconnected.wait(), WAIT)
        assert await bob.violation(f"unibus.room.{room}.>")  # the resubscription is refused
        await alice.nc.publish(f"unibus.room.{room}.later", b"3")
        await alice.nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)

        # and so is a publish. The removal kicks bob once more 2.7 s after it (docs/bus-auth.md),
        # and a publish written in that instant is lost with its socket: publish until refused
        async def publish_refused() -> bool:
            await bob.nc.publish(f"unibus.room.{room}.x", b"no")
            try:
                return await bob.violation(f"unibus.room.{room}.x", within=1)
            except nats.errors.TimeoutError:  # the flush, while bob reconnects
                return False

        assert await eventually(publish_refused)

    # deleted member: its connection is closed before the 204 and cannot come back
    async with Conn(people["carol"], server.nats_url) as carol:
        assert carol.nc.is_connected
        await a.remove_member("carol")
        assert await member_connections(server, "carol") == set()
        assert await eventually(lambda: _closed(carol))
    with pytest.raises((nats.errors.Error, NoServersError)):
        await nats.connect(server.nats_url, nkeys_seed_str=people["carol"].bus_nkey_seed(), allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)

    # the daemon's own KV traffic (nonces of signed requests) kept working throughout
    assert (await a.me())["handle"] == "alice"


async def _closed(conn: Conn) -> bool:
    return conn.closed.is_set() or not conn.nc.is_connected


async def test_changes_need_no_reload_and_grants_without_connections_cost_nothing(bus_world):
    server, people, clients, room, other = bus_world
    a = clients["alice"]
    conf = (server.data_dir / "nats.conf").read_text()
    newcomers = [generate_identity(f"m{i}") for i in range(12)]
    for n in newcomers:
        await a.add_member(n.handle, n.sign_pub_b64, n.enc_pub_b64, bus_pub=n.bus_pub)
    before = server.healthz()[1]["auth_enforce"]
    await asyncio.gather(*(a.add_room_member(other, n.handle) for n in newcomers))
    fields = server.healthz()[1]["auth_enforce"]
    assert fields["kicks"] == before["kicks"]  # nobody was connected: no NATS work
    async with Conn(newcomers[-1], server.nats_url) as last, Conn(people["alice"], server.nats_url) as alice:
        assert await receives(last, alice, f"unibus.room.{other}.x")
    fields = server.healthz()[1]["auth_enforce"]
    assert (server.data_dir / "nats.conf").read_text() == conf  # the configuration never changes
    assert "Reloaded server configuration" not in server.log_text()
    assert fields["enforced"] is True and fields["mode"] == "callout"
    assert fields["members"] == 3 + len(newcomers) and fields["kicks_pending"] == 0
    assert fields["callouts"]["authorized"] >= 2


async def test_posture_with_enforce_and_off(daemon_with_admin, membershipd_factory):
    server = daemon_with_admin()
    body = server.healthz()[1]
    assert body["posture"]["summary"] == "enforce+acl+tls"  # a loopback-only node has tls too
    assert {k: body["posture"][k] for k in ("bus_auth", "acl")} == {"bus_auth": "enforce", "acl": True}
    off = membershipd_factory("--bus-auth", "off")
    body = off.healthz()[1]
    assert body["posture"]["summary"] == "tls" and body["auth_enforce"] == {"enforced": False}
    off.stop()
    assert "--bus-auth off" in off.log_text() and "WARNING" in off.log_text()
    conf = json.loads((off.data_dir / "nats.conf").read_text())
    for key in ("authorization", "accounts", "system_account"):
        assert key not in conf
