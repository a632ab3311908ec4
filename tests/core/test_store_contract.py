"""One contract suite for every store backend: SQLite (single node) and JetStream KV (cluster).

The ``store`` fixture runs each contract test against both. The KV-only tests
at the end cover what only a shared, networked store has: two instances on two
connections, the watch (also across a NATS restart), failing fast when NATS is
gone, the bucket's creation and upgrade, and ``copy_store`` (migrate-to-kv).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig
from unibus.client.keys import Identity, generate_identity
from unibus.memberlog import LoggedRequest, LogError, LogState
from unibus.signing import make_nonce, sign_request
from unibus.store.base import (
    Change,
    Conflict,
    Forbidden,
    KeyPackage,
    LogRecord,
    LogRejected,
    Member,
    NotFound,
    Room,
    Store,
    StoreUnavailable,
)
from unibus.store.db import migrate
from unibus.store.fromkv import rows_from_kv
from unibus.store.kv import STATE_BUCKET, KvStore, copy_store
from unibus.store import kv_txn
from unibus.store.kv_txn import _Write
from unibus.store.turns import writer
from unibus.store.sqlite import SqliteStore, new_member
from unibus.testing import NatsServer
from unibus.wire import nkey_from_sign_pub, sign_pub_from_nkey

WAIT = 15.0  # upper bound of every wait for something asynchronous (never a timing assertion)


def bus_key() -> str:
    """A fresh bus key as the API passes it: a NATS user nkey (the store does not check the point)."""
    return nkey_from_sign_pub(os.urandom(32))


def member(handle: str, role: str = "member", suite: str = "X25519", bus: bool = True) -> Member:
    return new_member(handle, role, os.urandom(32), os.urandom(32 if suite == "X25519" else 1216), suite,
                      bus_key() if bus else None)


async def connect(url: str) -> nats.NATS:
    # bounded, as in tests/plugins/auth_enforce/test_attack_r2.py's _bob: a reconnect loop that
    # lost its cancellation must still end
    return await nats.connect(servers=[url], connect_timeout=2, allow_reconnect=True, max_reconnect_attempts=600,
                              reconnect_time_wait=0.1)


async def kv_store(url: str, **kwargs: Any) -> tuple[nats.NATS, KvStore]:
    nc = await connect(url)
    store = KvStore(nc.jetstream(timeout=2.0), **kwargs)
    await store.ensure()
    return nc, store


async def sqlite_store(path: Path) -> SqliteStore:
    await asyncio.to_thread(migrate, path)
    return SqliteStore(path)


@pytest.fixture(params=["sqlite", "kv"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = await sqlite_store(tmp_path / "state.db")
        try:
            yield s
        finally:
            await s.close()
    else:
        server = request.getfixturevalue("nats_server")
        nc, s = await kv_store(server.url)
        try:
            yield s
        finally:
            await s.close()
            await nc.close()


@pytest.fixture
async def admin(store: Store) -> Member:
    return await store.add_member(member("alice", "admin"))


async def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, at most ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- members ----------------------------------------------------------------------


async def test_add_get_list_members(store: Store) -> None:
    a = await store.add_member(member("alice", "admin"))
    b = await store.add_member(member("bob", suite="MLKEM768_X25519"))
    assert await store.get_member("alice") == a
    got = await store.get_member("bob")
    assert got == b and got.as_json() == b.as_json() and len(got.enc_pub) == 1216
    assert await store.get_member("nobody") is None
    assert [m.handle for m in await store.list_members()] == ["alice", "bob"]
    assert (await store.get_member("alice")).is_admin


async def test_add_member_conflicts(store: Store) -> None:
    a = await store.add_member(member("alice", "admin"))
    with pytest.raises(Conflict):
        await store.add_member(member("alice"))
    twin = new_member("bob", "member", a.sign_pub, os.urandom(32), "X25519")
    with pytest.raises(Conflict):
        await store.add_member(twin)
    assert [m.handle for m in await store.list_members()] == ["alice"]


async def test_bus_keys_are_unique_and_never_a_signing_key(store: Store) -> None:
    a = await store.add_member(member("alice", "admin"))
    assert a.bus_pub and (await store.get_member("alice")).bus_pub == a.bus_pub
    assert a.as_json()["bus_pub"] == a.bus_pub
    legacy = await store.add_member(member("old", bus=False))  # upgraded from 0.11: no bus key yet
    assert legacy.bus_pub is None and (await store.get_member("old")).as_json()["bus_pub"] is None
    refused = {
        "another member's bus key": new_member("bob", "member", os.urandom(32), os.urandom(32), "X25519", a.bus_pub),
        "another member's signing key as nkey": new_member("bob", "member", os.urandom(32), os.urandom(32), "X25519",
                                                           nkey_from_sign_pub(a.sign_pub)),
        "a legacy member's signing key as nkey": new_member("bob", "member", os.urandom(32), os.urandom(32),
                                                            "X25519", nkey_from_sign_pub(legacy.sign_pub)),
        "a signing key that is a member's bus key": new_member("bob", "member", sign_pub_from_nkey(a.bus_pub),
                                                               os.urandom(32), "X25519", bus_key()),
    }
    own = os.urandom(32)
    refused["its own signing key as nkey"] = new_member("bob", "member", own, os.urandom(32), "X25519",
                                                        nkey_from_sign_pub(own))
    for why, candidate in refused.items():
        with pytest.raises(Conflict):
            await store.add_member(candidate)
        assert await store.get_member("bob") is None, why
    assert {m.handle: m.bus_pub for m in (await store.membership()).members} == {"alice": a.bus_pub, "old": None}


async def test_set_bus_key_sets_rotates_and_frees(store: Store) -> None:
    a = await store.add_member(member("alice", "admin"))
    old = await store.add_member(member("old", bus=False))
    changes: list[Change] = []
    store.add_listener(changes.append)
    with pytest.raises(NotFound):
        await store.set_bus_key("nobody", bus_key())
    first = bus_key()
    assert (await store.set_bus_key("old", first)).bus_pub == first
    assert (await store.get_member("old")).bus_pub == first
    assert changes == [Change("member_bus_key", handle="old")] and changes[0].affects_bus
    assert (await store.set_bus_key("old", first)).bus_pub == first  # the same key: no change reported
    assert len(changes) == 1
    for taken in (a.bus_pub, nkey_from_sign_pub(a.sign_pub), nkey_from_sign_pub(old.sign_pub)):
        with pytest.raises(Conflict):
            await store.set_bus_key("old", taken)
    assert (await store.get_member("old")).bus_pub == first
    second = bus_key()
    await store.set_bus_key("old", second)  # rotation frees the first key...
    await store.set_bus_key("alice", first)  # ...for anyone
    assert [(c.kind, c.handle) for c in changes[1:]] == [("member_bus_key", "old"), ("member_bus_key", "alice")]
    assert {m.handle: m.bus_pub for m in await store.list_members()} == {"alice": first, "old": second}
    await store.delete_member("old")  # deletion frees its bus key and its signing key's nkey
    await store.add_member(new_member("new", "member", sign_pub_from_nkey(second), os.urandom(32), "X25519",
                                      nkey_from_sign_pub(old.sign_pub)))
    assert (await store.get_member("new")).bus_pub == nkey_from_sign_pub(old.sign_pub)


async def test_concurrent_claims_of_one_bus_key_have_one_winner(store: Store, admin: Member) -> None:
    for h in ("b1", "b2", "b3"):
        await store.add_member(member(h, bus=False))
    key = bus_key()
    results = await asyncio.gather(*(store.set_bus_key(h, key) for h in ("b1", "b2", "b3")), return_exceptions=True)
    assert sum(isinstance(r, Member) for r in results) == 1, results
    assert all(isinstance(r, (Member, Conflict)) for r in results), results
    assert [m.handle for m in await store.list_members() if m.bus_pub == key] == [
        next(r.handle for r in results if isinstance(r, Member))]


async def test_set_role_and_last_admin(store: Store, admin: Member) -> None:
    with pytest.raises(NotFound):
        await store.set_role("nobody", "admin")
    await store.add_member(member("bob"))
    with pytest.raises(Conflict):
        await store.set_role("alice", "member")
    assert (await store.set_role("alice", "admin")).role == "admin"  # unchanged is fine
    assert (await store.set_role("bob", "admin")).role == "admin"
    assert (await store.set_role("alice", "member")).role == "member"
    assert (await store.get_member("alice")).role == "member"
    with pytest.raises(Conflict):
        await store.set_role("bob", "member")
    with pytest.raises(Conflict):
        await store.delete_member("bob")
    assert (await store.get_member("bob")).is_admin


async def test_delete_member_not_found_and_last_admin(store: Store, admin: Member) -> None:
    with pytest.raises(NotFound):
        await store.delete_member("nobody")
    with pytest.raises(Conflict):
        await store.delete_member("alice")
    await store.add_member(member("bob", "admin"))
    assert await store.delete_member("alice") == []
    assert await store.get_member("alice") is None
    with pytest.raises(NotFound):
        await store.delete_member("alice")


async def test_concurrent_demotions_keep_one_admin(store: Store) -> None:
    for h in ("a1", "a2", "a3"):
        await store.add_member(member(h, "admin"))
    results = await asyncio.gather(store.set_role("a1", "member"), store.set_role("a2", "member"),
                                   store.delete_member("a3"), return_exceptions=True)
    assert sum(isinstance(r, Conflict) for r in results) == 1, results
    assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, Conflict)], results
    admins = [m.handle for m in await store.list_members() if m.is_admin]
    assert len(admins) == 1


async def test_add_member_after_delete_reuses_handle(store: Store, admin: Member) -> None:
    b = await store.add_member(member("bob"))
    await store.delete_member("bob")
    b2 = await store.add_member(new_member("bob", "member", b.sign_pub, os.urandom(32), "X25519"))
    assert await store.get_member("bob") == b2


# -- rooms ----------------------------------------------------------------------------


async def test_create_get_list_rooms(store: Store, admin: Member) -> None:
    with pytest.raises(NotFound):
        await store.create_room("x", "nobody")
    bob = await store.add_member(member("bob"))
    r1 = await store.create_room("one", "alice")
    assert (r1.name, r1.owner, r1.epoch, r1.rekey_required) == ("one", "alice", 0, True)
    assert r1.members == (admin,) and r1.subject == f"unibus.room.{r1.room_id}"
    r2 = await store.create_room("two", "bob")
    assert await store.get_room(r1.room_id) == r1
    assert await store.get_room("nosuchroom") is None
    assert await store.get_room("not a valid id") is None
    assert [r.room_id for r in await store.list_rooms()] == [r1.room_id, r2.room_id]
    assert [r.room_id for r in await store.list_rooms("bob")] == [r2.room_id]
    assert [r.room_id for r in await store.list_rooms("nobody")] == []
    assert (await store.list_rooms("bob"))[0].members == (bob,)
    assert r1.as_json()["members"] == [admin.room_entry()]


async def test_delete_room(store: Store, admin: Member) -> None:
    with pytest.raises(NotFound):
        await store.delete_room("nosuchroom")
    room = await store.create_room("r", "alice")
    await store.put_keys(room.room_id, 1, {"alice": b"k1"})
    await store.delete_room(room.room_id)
    assert await store.get_room(room.room_id) is None
    assert await store.list_rooms() == []
    assert await store.get_sealed_key(room.room_id, "alice") is None
    assert await store.get_sealed_key(room.room_id, "alice", 1) is None
    with pytest.raises(NotFound):
        await store.delete_room(room.room_id)
    assert (await store.membership()).rooms == {}


async def test_add_and_remove_room_members(store: Store, admin: Member) -> None:
    bob = await store.add_member(member("bob"))
    room = await store.create_room("r", "alice")
    await store.put_keys(room.room_id, 1, {"alice": b"k"})
    with pytest.raises(NotFound):
        await store.add_room_member("nosuchroom", "bob")
    with pytest.raises(NotFound):
        await store.add_room_member(room.room_id, "nobody")
    changes: list[Change] = []
    store.add_listener(changes.append)
    added = await store.add_room_member(room.room_id, "bob")
    assert added.members == (admin, bob) and added.rekey_required and added.epoch == 1
    again = await store.add_room_member(room.room_id, "bob")
    assert again == added
    assert [c.kind for c in changes] == ["room_member_added"]
    with pytest.raises(NotFound):
        await store.remove_room_member(room.room_id, "nobody")
    with pytest.raises(NotFound):
        await store.remove_room_member("nosuchroom", "bob")
    await store.put_keys(room.room_id, 2, {"alice": b"k", "bob": b"k"})
    removed = await store.remove_room_member(room.room_id, "bob")
    assert removed.members == (admin,) and removed.rekey_required
    with pytest.raises(NotFound):
        await store.remove_room_member(room.room_id, "bob")
    assert [r.room_id for r in await store.list_rooms("bob")] == []
    assert [c.kind for c in changes] == ["room_member_added", "keys_posted", "room_member_removed"]


async def test_owner_leaving_keeps_ownership(store: Store, admin: Member) -> None:
    await store.add_member(member("bob"))
    room = await store.create_room("r", "bob")
    await store.add_room_member(room.room_id, "alice")
    left = await store.remove_room_member(room.room_id, "bob")
    assert left.owner == "bob" and [m.handle for m in left.members] == ["alice"]


# -- sealed keys ---------------------------------------------------------------------------


async def test_put_keys_rules(store: Store, admin: Member) -> None:
    await store.add_member(member("bob"))
    room = await store.create_room("r", "alice")
    await store.add_room_member(room.room_id, "bob")
    with pytest.raises(NotFound):
        await store.put_keys("nosuchroom", 1, {"alice": b"x"})
    for bad in (0, 2, -1):
        with pytest.raises(Conflict) as e:
            await store.put_keys(room.room_id, bad, {"alice": b"a", "bob": b"b"})
        assert e.value.extra == {"current_epoch": 0}
    with pytest.raises(Conflict) as e:
        await store.put_keys(room.room_id, 1, {"alice": b"a", "carol": b"c"})
    assert e.value.extra == {"missing": ["bob"], "extra": ["carol"]}
    with pytest.raises(Conflict) as e:
        await store.put_keys(room.room_id, 1, {})
    assert e.value.extra == {"missing": ["alice", "bob"], "extra": []}
    got = await store.put_keys(room.room_id, 1, {"alice": b"a1", "bob": b"b1"})
    assert (got.epoch, got.rekey_required) == (1, False)
    assert await store.get_room(room.room_id) == got
    with pytest.raises(Conflict) as e:
        await store.put_keys(room.room_id, 1, {"alice": b"a", "bob": b"b"})
    assert e.value.extra == {"current_epoch": 1}
    assert await store.get_sealed_key(room.room_id, "alice") == (1, b"a1")


async def test_concurrent_put_keys_exactly_one_wins(store: Store, admin: Member) -> None:
    await store.add_member(member("bob"))
    room = await store.create_room("r", "alice")
    await store.add_room_member(room.room_id, "bob")
    attempts = [{"alice": f"a{i}".encode(), "bob": f"b{i}".encode()} for i in range(6)]
    results = await asyncio.gather(*(store.put_keys(room.room_id, 1, s) for s in attempts), return_exceptions=True)
    winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for i, r in enumerate(results) if i != winners[0]), results
    w = winners[0]
    assert (await store.get_room(room.room_id)).epoch == 1
    assert await store.get_sealed_key(room.room_id, "alice", 1) == (1, attempts[w]["alice"])
    assert await store.get_sealed_key(room.room_id, "bob", 1) == (1, attempts[w]["bob"])


async def test_get_sealed_key_latest_by_epoch_and_removed(store: Store, admin: Member) -> None:
    await store.add_member(member("bob"))
    room = await store.create_room("r", "alice")
    rid = room.room_id
    await store.put_keys(rid, 1, {"alice": b"a1"})
    await store.add_room_member(rid, "bob")
    assert await store.get_sealed_key(rid, "bob") is None  # never sealed to bob yet
    await store.put_keys(rid, 2, {"alice": b"a2", "bob": b"b2"})
    await store.put_keys(rid, 3, {"alice": b"a3", "bob": b"b3"})
    await store.remove_room_member(rid, "bob")
    await store.put_keys(rid, 4, {"alice": b"a4"})
    assert await store.get_sealed_key(rid, "alice") == (4, b"a4")
    assert await store.get_sealed_key(rid, "alice", 1) == (1, b"a1")
    assert await store.get_sealed_key(rid, "alice", 5) is None
    assert await store.get_sealed_key(rid, "bob") == (3, b"b3")  # a former member: latest addressed to it
    assert await store.get_sealed_key(rid, "bob", 2) == (2, b"b2")
    assert await store.get_sealed_key(rid, "bob", 1) is None
    assert await store.get_sealed_key(rid, "bob", 4) is None  # removed: nothing after its removal
    await store.add_room_member(rid, "bob")
    await store.put_keys(rid, 5, {"alice": b"a5", "bob": b"b5"})
    assert await store.get_sealed_key(rid, "bob", 4) is None
    assert await store.get_sealed_key(rid, "bob") == (5, b"b5")
    assert await store.get_sealed_key(rid, "nobody") is None
    assert await store.get_sealed_key("nosuchroom", "alice") is None


# -- delete_member cascades --------------------------------------------------------------------


async def test_delete_member_cascades(store: Store, admin: Member) -> None:
    bob = await store.add_member(member("bob"))
    await store.add_member(member("carol"))
    owned = await store.create_room("bob's", "bob")
    await store.add_room_member(owned.room_id, "alice")
    shared = await store.create_room("shared", "alice")
    await store.add_room_member(shared.room_id, "bob")
    await store.add_room_member(shared.room_id, "carol")
    left_before = await store.create_room("left", "alice")
    await store.add_room_member(left_before.room_id, "bob")
    await store.put_keys(left_before.room_id, 1, {"alice": b"a", "bob": b"b"})
    await store.remove_room_member(left_before.room_id, "bob")
    await store.put_keys(left_before.room_id, 2, {"alice": b"a2"})
    other = await store.create_room("other", "carol")
    for r in (owned, shared):
        handles = [m.handle for m in (await store.get_room(r.room_id)).members]
        await store.put_keys(r.room_id, 1, {h: h.encode() for h in handles})

    changes: list[Change] = []
    store.add_listener(changes.append)
    rooms = await store.delete_member("bob")
    assert rooms == sorted([owned.room_id, shared.room_id])
    assert changes == [Change("member_deleted", handle="bob", rooms=tuple(rooms))]
    assert await store.get_member("bob") is None
    o = await store.get_room(owned.room_id)
    assert o.owner == "" and o.rekey_required and [m.handle for m in o.members] == ["alice"]
    assert o.as_json()["owner"] is None
    s = await store.get_room(shared.room_id)
    assert s.rekey_required and [m.handle for m in s.members] == ["alice", "carol"]
    lb = await store.get_room(left_before.room_id)
    assert not lb.rekey_required  # bob had already left it
    assert await store.get_room(other.room_id) == other  # untouched
    for r in (owned, shared, left_before):
        assert await store.get_sealed_key(r.room_id, "bob") is None
        assert await store.get_sealed_key(r.room_id, "bob", 1) is None
    assert await store.get_sealed_key(shared.room_id, "carol", 1) == (1, b"carol")
    snap = await store.membership()
    assert "bob" not in {m.handle for m in snap.members}
    assert snap.rooms_of("bob") == []

    # A new member with the old handle inherits nothing: rooms, ownership, keys.
    bob2 = await store.add_member(member("bob"))
    assert bob2.sign_pub != bob.sign_pub
    assert await store.list_rooms("bob") == []
    assert (await store.get_room(owned.room_id)).owner == ""
    assert await store.get_sealed_key(shared.room_id, "bob", 1) is None
    await store.add_room_member(shared.room_id, "bob")
    assert await store.get_sealed_key(shared.room_id, "bob", 1) is None
    await store.put_keys(shared.room_id, 2, {"alice": b"a", "bob": b"new", "carol": b"c"})
    assert await store.get_sealed_key(shared.room_id, "bob") == (2, b"new")
    assert await store.get_sealed_key(shared.room_id, "bob", 1) is None


@pytest.mark.slow
async def test_a_member_in_1000_rooms_and_owner_of_more_can_be_deleted(store: Store, admin: Member) -> None:
    """A member may be in 1,000 rooms (bus authorization's bound) and own any number it left. On
    KV one atomic batch holds 1,000 writes, and the deletion rewrote every room naming the member
    in one: an ordinary member that made 1,000 rooms could not be deleted by any admin. Now the
    batch takes what fits and the rest follows (docs/store.md, "Each operation")."""
    await store.add_member(member("mallory"))
    await store.add_member(member("bob"))
    rooms = [(await store.create_room(f"r{i}", "mallory")).room_id for i in range(1000)]
    for rid in rooms[:5]:
        await store.add_room_member(rid, "alice")
    for rid in rooms[-20:]:
        await store.put_keys(rid, 1, {"mallory": b"m"})
    # ... and 20 more rooms that she made and left: they still name her as owner and sealed range
    for i in range(20):
        rid = (await store.create_room(f"left{i}", "mallory")).room_id
        await store.put_keys(rid, 1, {"mallory": b"m"})
        await store.add_room_member(rid, "bob")
        await store.remove_room_member(rid, "mallory")
        rooms.append(rid)

    assert sorted(await store.delete_member("mallory")) == sorted(rooms[:1000])
    assert await store.get_member("mallory") is None
    for room in await store.list_rooms():
        assert room.owner == "" and "mallory" not in room.handles
        assert room.rekey_required or room.room_id in rooms[1000:]
    assert (await store.get_room(rooms[0])).handles == {"alice"}
    assert (await store.membership()).rooms_of("mallory") == []
    for rid in rooms[-25:]:
        assert await store.get_sealed_key(rid, "mallory", 1) is None

    # A new member with her handle inherits none of it
    await store.add_member(member("mallory"))
    assert await store.list_rooms("mallory") == []
    assert all(r.owner == "" for r in await store.list_rooms())
    assert await store.get_sealed_key(rooms[-1], "mallory", 1) is None


async def test_membership_snapshot(store: Store, admin: Member) -> None:
    bob = await store.add_member(member("bob"))
    r1 = await store.create_room("one", "alice")
    r2 = await store.create_room("two", "bob")
    await store.add_room_member(r1.room_id, "bob")
    snap = await store.membership()
    assert snap.members == (admin, bob)
    assert snap.rooms == {r1.room_id: frozenset({"alice", "bob"}), r2.room_id: frozenset({"bob"})}
    assert snap.rooms_of("bob") == sorted([r1.room_id, r2.room_id])
    assert snap.rooms_of("alice") == [r1.room_id]


# -- listeners ----------------------------------------------------------------------------------


async def test_listeners_get_changes_and_writes_wait_for_them(store: Store) -> None:
    seen: list[Change] = []
    applied: list[str] = []

    async def apply(change: Change) -> None:
        await asyncio.sleep(0.01)
        applied.append(change.kind)

    store.add_listener(seen.append)
    store.add_listener(lambda c: apply(c))

    def broken(change: Change) -> None:
        raise RuntimeError("a broken listener must not break the write")

    store.add_listener(broken)

    await store.add_member(member("alice", "admin"))
    assert applied == ["member_added"]  # the write returned only after the awaitable finished
    await store.add_member(member("bob"))
    await store.set_role("bob", "admin")
    room = await store.create_room("r", "alice")
    await store.add_room_member(room.room_id, "bob")
    await store.put_keys(room.room_id, 1, {"alice": b"a", "bob": b"b"})
    await store.remove_room_member(room.room_id, "bob")
    with pytest.raises(Conflict):
        await store.put_keys(room.room_id, 1, {"alice": b"a"})  # a refused write changes nothing
    await store.delete_member("bob")
    await store.delete_room(room.room_id)
    await store.reload()
    kinds = ["member_added", "member_added", "member_updated", "room_created", "room_member_added", "keys_posted",
             "room_member_removed", "member_deleted", "room_deleted", "reloaded"]
    assert [c.kind for c in seen] == kinds
    assert applied == kinds
    assert seen[3] == Change("room_created", handle="alice", room_id=room.room_id)
    assert seen[5] == Change("keys_posted", room_id=room.room_id)
    assert seen[7] == Change("member_deleted", handle="bob", rooms=())


# -- KV only: two nodes, the watch, failures, the bucket, the copy ----------------------------------


# -- replay protection's high-water mark ------------------------------------------


async def test_nonce_high_water_only_rises(store: Store) -> None:
    assert await store.nonce_high_water() == 0  # a new store: no request was ever accepted
    assert await store.raise_nonce_high_water(1_800_000_000) == 1_800_000_000
    assert await store.raise_nonce_high_water(1_700_000_000) == 1_800_000_000  # never lowered
    assert await store.nonce_high_water() == 1_800_000_000
    marks = await asyncio.gather(*(store.raise_nonce_high_water(1_800_000_000 + i) for i in range(10)))
    assert max(marks) == 1_800_000_009 and all(m >= 1_800_000_000 + i for i, m in enumerate(marks))
    assert await store.nonce_high_water() == 1_800_000_009
    # not one of the membership changes: nothing for a listener, nothing in the log
    assert await store.log_head() == (-1, "")


async def test_sqlite_nonce_high_water_is_on_disk(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = await sqlite_store(db)
    try:
        await first.raise_nonce_high_water(1_800_000_123)
    finally:
        await first.close()
    again = SqliteStore(db)
    try:
        assert await again.nonce_high_water() == 1_800_000_123
    finally:
        await again.close()


@pytest.fixture
async def two_kv(nats_server: NatsServer) -> AsyncIterator[tuple[KvStore, KvStore]]:
    nc1, a = await kv_store(nats_server.url)
    nc2, b = await kv_store(nats_server.url)
    try:
        yield a, b
    finally:
        for s, nc in ((a, nc1), (b, nc2)):
            await s.close()
            await nc.close()


async def test_kv_two_instances_see_each_other_and_the_watch_fires(two_kv: tuple[KvStore, KvStore]) -> None:
    a, b = two_kv
    seen: list[Change] = []
    b.add_listener(seen.append)
    b.start_watch()
    await asyncio.wait_for(b.watch_ready.wait(), WAIT)
    await eventually(lambda: seen, "the watch's start-up reload")
    seen.clear()

    await a.add_member(member("alice", "admin"))
    assert (await b.get_member("alice")) == (await a.get_member("alice"))
    await eventually(lambda: [c for c in seen if c.kind == "reloaded"], "b's watch to report a's write")

    seen.clear()
    room = await a.create_room("r", "alice")
    await eventually(lambda: seen, "b's watch to report the room")
    assert (await b.get_room(room.room_id)) == room
    bob = await b.add_member(member("bob"))
    await b.add_room_member(room.room_id, "bob")
    assert (await a.get_room(room.room_id)).members == (await a.get_member("alice"), bob)
    assert (await a.membership()) == (await b.membership())

    # Exactly one winner for one epoch across instances (two connections, as two nodes would).
    results = await asyncio.gather(a.put_keys(room.room_id, 1, {"alice": b"a", "bob": b"b"}),
                                   b.put_keys(room.room_id, 1, {"alice": b"A", "bob": b"B"}),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Room"], results
    won = next(r for r in results if not isinstance(r, Exception))
    assert await b.get_room(room.room_id) == won == await a.get_room(room.room_id)

    # The last-admin guard across instances.
    await a.set_role("bob", "admin")
    results = await asyncio.gather(a.set_role("alice", "member"), b.set_role("bob", "member"),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Member"], results
    assert len([m for m in await a.list_members() if m.is_admin]) == 1

    # A deletion through a reaches b's readers at once.
    non_admin = next(m.handle for m in await a.list_members() if not m.is_admin)
    await a.delete_member(non_admin)
    assert await b.get_member(non_admin) is None
    assert await b.membership() == await a.membership()


async def test_kv_nonce_high_water_raised_through_two_nodes_keeps_the_largest(
        two_kv: tuple[KvStore, KvStore]) -> None:
    a, b = two_kv
    results = await asyncio.gather(*(s.raise_nonce_high_water(1_800_000_000 + i)
                                     for i in range(20) for s in (a, b)))
    assert max(results) == 1_800_000_019
    assert await a.nonce_high_water() == await b.nonce_high_water() == 1_800_000_019


async def test_kv_own_writes_are_not_reported_again(two_kv: tuple[KvStore, KvStore]) -> None:
    a, b = two_kv
    seen: list[Change] = []
    a.add_listener(seen.append)
    a.start_watch()
    await asyncio.wait_for(a.watch_ready.wait(), WAIT)
    await eventually(lambda: a.watch_stats["reported"] == 1, "the watch's start-up reload")
    seen.clear()
    # one batch: member, sign index, bus index (its bus key and its signing key's nkey), admins
    await a.add_member(member("alice", "admin"))
    await eventually(lambda: a.watch_stats["own"] == 5, "the watch to see a's own batch")
    assert [c.kind for c in seen] == ["member_added"]  # reported once, by the write itself
    await b.add_member(member("zed"))
    await eventually(lambda: [c for c in seen if c.kind == "reloaded"], "b's write, reported by a's watch")
    assert a.watch_stats["remote"] == 4  # member, sign index, two bus index entries


async def test_kv_watch_survives_a_nats_restart(nats_server: NatsServer) -> None:
    nc1, a = await kv_store(nats_server.url)
    nc2, b = await kv_store(nats_server.url)
    try:
        seen: list[Change] = []
        b.add_listener(seen.append)
        b.start_watch()
        await asyncio.wait_for(b.watch_ready.wait(), WAIT)
        await a.add_member(member("alice", "admin"))
        await eventually(lambda: b.watch_restarts == 0 and seen, "the first report")

        nats_server.kill()
        await eventually(lambda: b.watch_restarts >= 1 and b.watch_ready.is_set(), "the watch to come back")
        seen.clear()

        async def write() -> bool:
            try:
                await a.add_member(member("bob"))
                return True
            except StoreUnavailable:
                return False

        await eventually(write, "a write after the restart")
        await eventually(lambda: [c for c in seen if c.kind == "reloaded"], "b's watch after the restart")
        assert [m.handle for m in await b.list_members()] == ["alice", "bob"]  # nothing lost
    finally:
        for s, nc in ((a, nc1), (b, nc2)):
            await s.close()
            await nc.close()


async def test_kv_unavailable_fails_fast(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "doomed")
    stopped = False
    try:
        nc, s = await kv_store(server.url, timeout=1.0)
        await s.add_member(member("alice", "admin"))
        room = await s.create_room("r", "alice")
        s.start_watch()
        await asyncio.to_thread(server.stop)
        stopped = True
        calls = [
            s.list_members(), s.get_member("alice"), s.add_member(member("bob")), s.set_role("alice", "admin"),
            s.delete_member("alice"), s.create_room("x", "alice"), s.list_rooms(), s.get_room(room.room_id),
            s.delete_room(room.room_id), s.add_room_member(room.room_id, "alice"),
            s.remove_room_member(room.room_id, "alice"), s.put_keys(room.room_id, 1, {"alice": b"k"}),
            s.get_sealed_key(room.room_id, "alice"), s.membership(), s.ensure(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, 10)  # bounded: a hang fails the test instead of blocking it
        await asyncio.wait_for(s.close(), 10)
        with contextlib.suppress(Exception):  # nats-py may fail to close a connection that is down
            await nc.close()
    finally:
        if not stopped:
            server.stop()


async def test_kv_unavailable_while_connected_times_out_quickly(nats_server: NatsServer) -> None:
    """A bucket that does not answer (here: absent) is a StoreUnavailable, not a hang."""
    nc = await connect(nats_server.url)
    try:
        s = KvStore(nc.jetstream(timeout=1.0), timeout=1.0, bucket="unibus_absent")
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.get_member("alice"), 10)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.add_member(member("alice")), 10)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.list_members(), 10)
    finally:
        await nc.close()


async def test_kv_ensure_creates_and_upgrades_in_place(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream(timeout=2.0)
        # A bucket made earlier without atomic batches (as a plain KV bucket), with data in it.
        kv = await js.create_key_value(config=KeyValueConfig(bucket=STATE_BUCKET, history=1, replicas=1))
        await kv.put("meta.note", b'{"kept": true}')
        before = (await js.stream_info(f"KV_{STATE_BUCKET}")).state.messages
        s = KvStore(js, replicas=1)
        await s.ensure()
        status = await s.status()
        assert status["allow_atomic"] and status["replicas"] == 1
        assert status["messages"] == before + 1  # + meta.schema; nothing lost
        assert (await kv.get("meta.note")).value == b'{"kept": true}'
        await s.add_member(member("alice", "admin"))  # unlogged: state without a membership log
        # + member, sign index, two bus index entries, admins: one batch
        assert (await s.status())["messages"] == before + 6
        await s.ensure()  # a bucket with members and no log gets its entry 0: a snapshot (log.0, meta.loghead)
        assert (await s.status())["messages"] == before + 8
        assert (await s.log_head())[0] == 0
        await s.ensure()  # idempotent
        assert (await s.status())["messages"] == before + 8
        assert (await s.get_member("alice")).is_admin
        # Asking for more replicas than a single server can hold is refused, and changes nothing.
        with pytest.raises(StoreUnavailable):
            await KvStore(js, replicas=3).ensure()
        assert (await s.status())["replicas"] == 1
        assert (await s.get_member("alice")).is_admin
    finally:
        await nc.close()


async def test_kv_deleted_keys_are_removed_not_only_hidden(nats_server: NatsServer) -> None:
    nc, s = await kv_store(nats_server.url)
    try:
        await s.add_member(member("alice", "admin"))
        await s.add_member(member("bob"))
        room = await s.create_room("r", "alice")
        await s.add_room_member(room.room_id, "bob")
        for e in (1, 2):
            await s.put_keys(room.room_id, e, {"alice": b"a", "bob": b"b"})
        await s.delete_member("bob")
        for e in (1, 2):
            entry, _rev = await s._read(f"keys.{room.room_id}.{e}")
            assert set(entry["sealed"]) == {"alice"}
        await s.delete_room(room.room_id)
        assert await s._read(f"keys.{room.room_id}.1") == (None, 0)  # purged, not even a tombstone
    finally:
        await s.close()
        await nc.close()


async def test_copy_store_sqlite_to_kv_is_complete_and_idempotent(tmp_path: Path, nats_server: NatsServer) -> None:
    src = await sqlite_store(tmp_path / "src.db")
    nc, dst = await kv_store(nats_server.url)
    try:
        await src.add_member(member("alice", "admin"))
        await src.add_member(member("bob", suite="MLKEM768_X25519"))
        await src.add_member(member("carol"))
        await src.add_member(member("dave", "admin"))
        r1 = await src.create_room("one", "alice")
        for h in ("bob", "carol"):
            await src.add_room_member(r1.room_id, h)
        await src.put_keys(r1.room_id, 1, {"alice": b"a1", "bob": b"b1", "carol": b"c1"})
        await src.remove_room_member(r1.room_id, "carol")
        await src.put_keys(r1.room_id, 2, {"alice": b"a2", "bob": b"b2"})
        await src.add_room_member(r1.room_id, "dave")  # rekey_required, not rekeyed
        r2 = await src.create_room("two", "carol")
        await src.add_room_member(r2.room_id, "alice")
        await src.remove_room_member(r2.room_id, "carol")  # owner left: still the owner
        await src.create_room("three", "dave")

        counts = await copy_store(src, dst)
        assert counts == {"log_entries": 0, "members": 4, "rooms": 3, "sealed_epochs": 2}  # nothing was logged
        assert [m.as_json() for m in await dst.list_members()] == [m.as_json() for m in await src.list_members()]
        assert [r.as_json() for r in await dst.list_rooms()] == [r.as_json() for r in await src.list_rooms()]
        assert await dst.membership() == await src.membership()
        for room in await src.list_rooms():
            for h in ("alice", "bob", "carol", "dave"):
                assert await dst.get_sealed_key(room.room_id, h) == await src.get_sealed_key(room.room_id, h)
                for e in range(room.epoch + 2):
                    assert await dst.get_sealed_key(room.room_id, h, e) == await src.get_sealed_key(room.room_id, h, e)
        assert await dst.get_sealed_key(r1.room_id, "carol") == (1, b"c1")

        last_seq = (await dst.status())["last_seq"]
        assert await copy_store(src, dst) == {"log_entries": 0, "members": 0, "rooms": 0, "sealed_epochs": 0}
        # The second run wrote nothing (there is no log here, so no head to mark while it ran).
        assert (await dst.status())["last_seq"] == last_seq

        # The copy obeys the rules: the last-admin guard knows both admins; rekeys continue.
        await dst.delete_member("dave")
        with pytest.raises(Conflict):
            await dst.set_role("alice", "member")
        room = await dst.put_keys(r1.room_id, 3, {"alice": b"a3", "bob": b"b3"})
        assert room.epoch == 3 and not room.rekey_required
    finally:
        await src.close()
        await dst.close()
        await nc.close()


class Killed(Exception):
    """The migrate-to-kv process killed at this point."""


async def test_a_copy_cut_short_holds_every_logged_write_until_a_run_finishes_it(tmp_path: Path,
                                                                                nats_server: NatsServer) -> None:
    """Red team: migrate-to-kv killed among the rooms left a partial state that the nodes served and
    wrote on. alice deleted bob and added him again; the run that finished the copy then put bob back
    into a room the log says he had left (clients: "ghost member bob"; restore refused every later
    backup). The copy now marks the log head until it ends: a logged write is a 503 meanwhile, the
    bucket is not backed up, and the run that finishes the copy lifts the mark."""
    from unibus.backup import backup_cluster
    from unibus.errors import RuntimeFailure

    alice, bob = identity("alice"), identity("bob")
    src = await sqlite_store(tmp_path / "src.db")
    nc, dst = await kv_store(nats_server.url)
    try:
        await src.add_member(as_member(alice, "admin"))
        await add_logged(src, alice, bob)
        rooms = []
        for i in range(3):
            rid = (await src.create_room(f"r{i}", "alice", logged=signed(alice, "POST", "/v1/rooms",
                                                                         {"name": f"r{i}"}))).room_id
            await src.add_room_member(rid, "bob", logged=signed(alice, "PUT", f"/v1/rooms/{rid}/members/bob"))
            rooms.append(rid)

        class CutShort(KvStore):
            async def import_room(self, room: Room, epochs: dict[int, dict[str, Any]]) -> bool:
                if await self.list_rooms():
                    raise Killed  # one room copied, the rest not
                return await super().import_room(room, epochs)

        with pytest.raises(Killed):
            await copy_store(src, CutShort(nc.jetstream(timeout=2.0)))
        assert len(await dst.list_rooms()) == 1 and len(await dst.list_members()) == 2

        # Only a run of the same copy may finish it (red team on the fix: a run from an empty data
        # directory lifted the mark on the partial state, and one from another deployment's failed
        # with "nothing copied" but left the mark for good).
        empty = await sqlite_store(tmp_path / "empty.db")
        other = await sqlite_store(tmp_path / "other.db")
        try:
            await other.add_member(as_member(identity("zoe"), "admin"))
            await add_logged(other, identity("zoe"), identity("yann"))
            for wrong in (empty, other):
                with pytest.raises(Conflict, match="a migrate-to-kv of another membership log .* was cut short here"):
                    await copy_store(wrong, dst)
        finally:
            await empty.close()
            await other.close()
        assert "importing" in json.loads((await dst.snapshot()).entries["meta.loghead"][0])

        with pytest.raises(StoreUnavailable, match="migrate-to-kv is copying into KV bucket unibus_state, or was "
                                                   "cut short"):
            await dst.delete_member("bob", logged=signed(alice, "DELETE", "/v1/members/bob"))
        with pytest.raises(RuntimeFailure, match="migrate-to-kv is copying into unibus_state, or was cut short"):
            await backup_cluster(nc.jetstream(timeout=5.0), "n1", tmp_path / "partial.tar", lambda _m: None)
        assert not (tmp_path / "partial.tar").exists()

        assert (await copy_store(src, dst))["rooms"] == 2
        assert "importing" not in json.loads((await dst.snapshot()).entries["meta.loghead"][0])
        await dst.delete_member("bob", logged=signed(alice, "DELETE", "/v1/members/bob"))
        await add_logged(dst, alice, bob)  # bob again, with new keys: in no room, as the log says
        state = await assert_replays_to_store(dst)
        assert all(room.members == {"alice"} for room in state.rooms.values()) and len(state.rooms) == 3
        result = await backup_cluster(nc.jetstream(timeout=5.0), "n1", tmp_path / "whole.tar", lambda _m: None)
        assert result.manifest["counts"]["rooms"] == 3

        # A run from another deployment's data directory fails before it writes anything: no mark.
        other = await sqlite_store(tmp_path / "other2.db")
        try:
            await other.add_member(as_member(identity("zoe"), "admin"))
            await add_logged(other, identity("zoe"), identity("yann"))
            last_seq = (await dst.status())["last_seq"]
            with pytest.raises(Conflict, match="has a membership log of its own .* nothing copied"):
                await copy_store(other, dst)
            assert (await dst.status())["last_seq"] == last_seq
        finally:
            await other.close()
        await dst.delete_member("bob", logged=signed(alice, "DELETE", "/v1/members/bob"))
    finally:
        await src.close()
        await dst.close()
        await nc.close()


async def test_a_recovery_on_a_cluster_appends_its_bootstrap(tmp_path: Path, nats_server: NatsServer) -> None:
    """The recovery the cluster runbook gives when every admin lost its keys: back the cluster up,
    restore that into a scratch directory, `membershipd member add` there (a bootstrap after the
    cluster's head), and migrate-to-kv it back. The copy refused it (the cluster's log is the start
    of the scratch's, not the whole), so the documented recovery could not be done. Now what the
    bucket lacks is appended when it is recovery bootstraps only; anything else, or a cluster that
    logged more since the backup, is a Conflict before anything is written."""
    from unibus.backup import backup_cluster, restore
    from unibus.testing import bootstrap_member

    alice, bob, carol, dave = identity("alice"), identity("bob"), identity("carol"), identity("dave")
    src = await sqlite_store(tmp_path / "src.db")
    nc, dst = await kv_store(nats_server.url)
    scratches: list[SqliteStore] = []

    async def scratch(name: str, admin: Identity, accepted: tuple[str, ...] = ()) -> SqliteStore:
        await backup_cluster(nc.jetstream(timeout=5.0), "n1", tmp_path / f"{name}.tar", lambda _m: None)
        await asyncio.to_thread(restore, tmp_path / f"{name}.tar", tmp_path / name, accepted)
        await asyncio.to_thread(bootstrap_member, tmp_path / name, admin, "admin")
        store = SqliteStore(tmp_path / name / "membershipd.db")
        scratches.append(store)
        return store

    try:
        await src.add_member(as_member(alice, "admin"))
        await add_logged(src, alice, bob)
        await copy_store(src, dst)
        await dst.create_room("after", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "after"}))

        recovered = await scratch("s1", carol)  # alice lost her keys
        head = await dst.log_head()
        assert await copy_store(recovered, dst) == {"log_entries": 1, "members": 1, "rooms": 0, "sealed_epochs": 0}
        assert (await dst.log_head())[0] == head[0] + 1
        assert (await dst.get_member("carol")).role == "admin"
        await dst.create_room("by carol", "carol", logged=signed(carol, "POST", "/v1/rooms", {"name": "by carol"}))
        texts = await dst.log_entries(limit=1000)
        bootstrap = hashlib.sha256(texts[head[0] + 1].encode()).hexdigest()
        state = LogState(skew=SKEW, accepted_bootstraps=[bootstrap])
        for text in texts:
            state.apply(json.loads(text))
        assert state.members["carol"].role == "admin" and {r.name for r in state.rooms.values()} == {"after",
                                                                                                       "by carol"}
        assert {m.handle for m in await dst.list_members()} == set(state.members)

        # The cluster logged more since the backup: the scratch's log is no longer a continuation of it.
        late = await scratch("s2", dave, (bootstrap,))  # restore takes carol's recovery when named
        await dst.create_room("later", "carol", logged=signed(carol, "POST", "/v1/rooms", {"name": "later"}))
        last_seq = (await dst.status())["last_seq"]
        with pytest.raises(Conflict, match="neither contains the one being copied .* take a new backup"):
            await copy_store(late, dst)
        # More than bootstraps after the cluster's head: entries whose changes the copy would not make.
        busy = await scratch("s3", dave, (bootstrap,))
        await busy.create_room("offline", "carol", logged=signed(carol, "POST", "/v1/rooms", {"name": "offline"}))
        with pytest.raises(Conflict, match="not recovery bootstraps"):
            await copy_store(busy, dst)
        assert (await dst.status())["last_seq"] == last_seq  # neither wrote anything, not even a mark
        assert await dst.get_member("dave") is None
        # A handle the cluster had before (deleted since): the copy would skip the member its entry adds.
        await dst.delete_member("bob", logged=signed(carol, "DELETE", "/v1/members/bob"))
        again = await scratch("s4", identity("bob"), (bootstrap,))
        last_seq = (await dst.status())["last_seq"]
        with pytest.raises(Conflict, match="handle 'bob' of the recovery bootstrap was a member of this cluster"):
            await copy_store(again, dst)
        assert (await dst.status())["last_seq"] == last_seq and await dst.get_member("bob") is None
    finally:
        for store in (src, *scratches):
            await store.close()
        await dst.close()
        await nc.close()


# -- the membership log (both backends) ------------------------------------------------------------
#
# Logged writes carry requests signed with real keys, as the server passes them:
# the log they build must replay through unibus.memberlog.LogState (the client's
# verifier) to the very state the store holds.

SKEW = 60


def identity(handle: str, suite: str = "X25519") -> Identity:
    return generate_identity(handle, suite)


def signed(author: Identity, method: str, path: str, body: dict[str, Any] | None = None, *,
           created: int | None = None, nonce: str | None = None) -> LogRecord:
    """A request signed by ``author`` as the auth middleware hands it to the store."""
    created = int(time.time()) if created is None else created
    nonce = nonce or make_nonce()
    raw = json.dumps(body).encode() if body is not None else None
    headers = sign_request(method, path, raw, keyid=author.handle, private_key=author.sign_key, created=created,
                           nonce=nonce)
    request = LoggedRequest(method, path, "", headers.get("Content-Digest"), headers["Signature-Input"],
                            headers["Signature"], raw)
    return LogRecord(request, author.handle, nonce, created, int(time.time()), SKEW)


def as_member(i: Identity, role: str = "member") -> Member:
    return new_member(i.handle, role, i.sign_pub, i.enc_pub, i.enc_suite, i.bus_pub)


def member_body(i: Identity, role: str = "member") -> dict[str, Any]:
    return {"handle": i.handle, "role": role, "sign_pub": i.sign_pub_b64, "enc_pub": i.enc_pub_b64,
            "enc_suite": i.enc_suite, "bus_pub": i.bus_pub}


async def add_logged(store: Store, author: Identity, i: Identity, role: str = "member") -> Member:
    return await store.add_member(as_member(i, role), logged=signed(author, "POST", "/v1/members",
                                                                    member_body(i, role)))


async def replay(store: Store) -> LogState:
    """Fetch the whole log and verify it entry by entry, as a client does."""
    state = LogState(skew=SKEW)
    after = -1
    while True:
        texts = await store.log_entries(after, 7)  # small pages: paging is part of what is checked
        if not texts:
            break
        for text in texts:
            entry = json.loads(text)
            digest = state.apply(entry)
            assert digest == hashlib.sha256(text.encode()).hexdigest()  # stored text = canonical JSON
            after = entry["seq"]
    assert state.head == await store.log_head()
    return state


async def assert_replays_to_store(store: Store) -> LogState:
    state = await replay(store)
    members = {m.handle: (m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub) for m in await store.list_members()}
    assert {h: (m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub) for h, m in state.members.items()} == members
    rooms = {r.room_id: {"room_id": r.room_id, "name": r.name, "owner": r.owner, "epoch": r.epoch,
                         "rekey_required": r.rekey_required, "members": sorted(r.handles)}
             for r in await store.list_rooms()}
    assert {rid: room.as_json() for rid, room in state.rooms.items()} == rooms
    return state


@pytest.fixture
async def logged_world(store: Store) -> tuple[Store, dict[str, Identity]]:
    """alice (admin, added before the store had a log: the first logged write snapshots her), bob, carol."""
    people = {"alice": identity("alice"), "bob": identity("bob", "MLKEM768_X25519"), "carol": identity("carol")}
    await store.add_member(as_member(people["alice"], "admin"))
    await add_logged(store, people["alice"], people["bob"])
    await add_logged(store, people["alice"], people["carol"])
    return store, people


async def test_a_logged_write_whose_author_lost_its_rights_is_refused_in_the_write(logged_world) -> None:
    """The handler checks the author's rights when the request comes in; another write may commit
    before this one's (the author demoted, out of the room, deleted). The store checks them again in
    the write itself, as a client will at that point of the log: Forbidden, nothing logged. Else the
    entry would be one every client refuses, for good (red team log-r1)."""
    store, p = logged_world
    alice, bob, carol = p["alice"], p["bob"], p["carol"]
    rid = (await store.create_room("ops", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "ops"}))).room_id
    await store.add_room_member(rid, "carol", logged=signed(bob, "PUT", f"/v1/rooms/{rid}/members/carol"))
    head = await store.log_head()
    dave = identity("dave")
    refused = [
        ("not an admin", store.add_member(as_member(dave), logged=signed(bob, "POST", "/v1/members", member_body(dave)))),
        ("not an admin", store.set_role("carol", "admin",
                                        logged=signed(carol, "PATCH", "/v1/members/carol", {"role": "admin"}))),
        ("not an admin", store.delete_member("bob", logged=signed(carol, "DELETE", "/v1/members/bob"))),
        ("not the owner", store.add_room_member(rid, "alice",
                                                logged=signed(carol, "PUT", f"/v1/rooms/{rid}/members/alice"))),
        ("may not remove other members", store.remove_room_member(
            rid, "bob", logged=signed(carol, "DELETE", f"/v1/rooms/{rid}/members/bob"))),
        ("not the owner", store.put_keys(rid, 1, {"bob": b"b", "carol": b"c"}, sealer="carol",
                                         log_head={"seq": head[0], "hash": head[1]},
                                         logged=signed(carol, "POST", f"/v1/rooms/{rid}/keys", {"epoch": 1}))),
        ("not the owner", store.delete_room(rid, logged=signed(carol, "DELETE", f"/v1/rooms/{rid}"))),
    ]
    for why, write in refused:
        with pytest.raises(Forbidden, match=why):
            await write
    # the owner who left the room manages it no more; a member who left keeps nothing
    await store.remove_room_member(rid, "bob", logged=signed(bob, "DELETE", f"/v1/rooms/{rid}/members/bob"))
    with pytest.raises(Forbidden, match="not the owner"):
        await store.add_room_member(rid, "bob", logged=signed(bob, "PUT", f"/v1/rooms/{rid}/members/bob"))
    # a deleted author's request, authenticated before its deletion, is refused too
    await store.delete_member("carol", logged=signed(alice, "DELETE", "/v1/members/carol"))
    with pytest.raises(Forbidden, match="no longer a member"):
        await store.create_room("x", "carol", logged=signed(carol, "POST", "/v1/rooms", {"name": "x"}))
    # ... and so is one signed with the keys of a member deleted and added again under its handle (red
    # team log-r2: the old key's request, its body held back, was appended for the new member)
    await add_logged(store, alice, identity("carol"))
    late = dataclasses.replace(signed(carol, "POST", "/v1/rooms", {"name": "x"}), sign_pub=carol.sign_pub)
    with pytest.raises(Forbidden, match="deleted and added again"):
        await store.create_room("x", "carol", logged=late)
    assert (await store.log_head())[0] == head[0] + 3  # only bob's leaving, carol's deletion and re-adding
    await assert_replays_to_store(store)  # and every client still verifies the log


async def test_every_logged_write_appends_one_entry_that_replays_to_the_state(logged_world) -> None:
    store, p = logged_world
    alice, bob, carol = p["alice"], p["bob"], p["carol"]
    assert (await store.log_head())[0] == 2  # snapshot, bob, carol
    first = json.loads((await store.log_entries(-1, 1))[0])
    assert first["kind"] == "snapshot" and [m["handle"] for m in first["state"]["members"]] == ["alice"]

    async def step(coro: Any) -> Any:
        before = (await store.log_head())[0]
        result = await coro
        assert (await store.log_head())[0] == before + 1, "each logged write appends exactly one entry"
        return result

    room = await step(store.create_room("ops", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "ops"})))
    rid = room.room_id
    created = json.loads((await store.log_entries((await store.log_head())[0] - 1, 1))[0])
    assert created["result"] == {"room_id": rid} and created["request"]["body"] is not None
    await step(store.add_room_member(rid, "carol", logged=signed(bob, "PUT", f"/v1/rooms/{rid}/members/carol")))
    await step(store.add_room_member(rid, "carol", logged=signed(bob, "PUT", f"/v1/rooms/{rid}/members/carol")))
    head = await store.log_head()
    await step(store.put_keys(rid, 1, {"bob": b"b1", "carol": b"c1"}, sigs={"bob": b"s" * 64, "carol": b"t" * 64},
                              sealer="bob", log_head={"seq": head[0], "hash": head[1]},
                              logged=signed(bob, "POST", f"/v1/rooms/{rid}/keys", {"epoch": 1})))
    keys = json.loads((await store.log_entries(head[0], 1))[0])
    assert keys["result"] == {"epoch": 1} and keys["request"]["body"] is None  # the signed digest suffices
    package = await store.get_key_package(rid, "carol")
    assert package == KeyPackage(rid, 1, b"c1", b"t" * 64, "bob", {"seq": head[0], "hash": head[1]})
    await step(store.set_role("carol", "admin", logged=signed(alice, "PATCH", "/v1/members/carol", {"role": "admin"})))
    await step(store.set_role("carol", "admin", logged=signed(alice, "PATCH", "/v1/members/carol", {"role": "admin"})))
    new_bus = generate_identity("carol").bus_pub
    await step(store.set_bus_key("carol", new_bus, logged=signed(carol, "PUT", "/v1/me/bus-key", {"bus_pub": new_bus})))
    await step(store.set_bus_key("carol", new_bus, logged=signed(carol, "PUT", "/v1/me/bus-key", {"bus_pub": new_bus})))
    await step(store.remove_room_member(rid, "carol", logged=signed(carol, "DELETE", f"/v1/rooms/{rid}/members/carol")))
    other = await step(store.create_room("tmp", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "tmp"})))
    await step(store.delete_room(other.room_id, logged=signed(carol, "DELETE", f"/v1/rooms/{other.room_id}")))
    await step(store.delete_member("bob", logged=signed(alice, "DELETE", "/v1/members/bob")))  # the owner goes
    state = await assert_replays_to_store(store)
    assert state.rooms[rid].owner == "" and state.rooms[rid].epochs[1].sealer == "bob"


async def test_rejected_writes_append_nothing(logged_world) -> None:
    store, p = logged_world
    alice, bob = p["alice"], p["bob"]
    room = await store.create_room("ops", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "ops"}))
    rid = room.room_id
    head = await store.log_head()
    refused = [
        (Conflict, add_logged(store, alice, p["bob"])),  # the handle exists
        (NotFound, store.set_role("zed", "admin", logged=signed(alice, "PATCH", "/v1/members/zed", {"role": "admin"}))),
        (Conflict, store.set_role("alice", "member", logged=signed(alice, "PATCH", "/v1/members/alice",
                                                                   {"role": "member"}))),  # the last admin
        (NotFound, store.delete_member("zed", logged=signed(alice, "DELETE", "/v1/members/zed"))),
        (NotFound, store.add_room_member(rid, "zed", logged=signed(bob, "PUT", f"/v1/rooms/{rid}/members/zed"))),
        (NotFound, store.remove_room_member(rid, "carol",
                                            logged=signed(bob, "DELETE", f"/v1/rooms/{rid}/members/carol"))),
        (Conflict, store.put_keys(rid, 2, {"bob": b"b"}, sigs={"bob": b"s" * 64}, sealer="bob",
                                  log_head={"seq": 0, "hash": head[1]},
                                  logged=signed(bob, "POST", f"/v1/rooms/{rid}/keys", {"epoch": 2}))),  # wrong epoch
        (Conflict, store.put_keys(rid, 1, {"carol": b"c"}, sigs={"carol": b"s" * 64}, sealer="bob",
                                  log_head={"seq": 0, "hash": head[1]},
                                  logged=signed(bob, "POST", f"/v1/rooms/{rid}/keys", {"epoch": 1}))),  # wrong set
        (NotFound, store.delete_room("nosuchroom", logged=signed(alice, "DELETE", "/v1/rooms/nosuchroom"))),
    ]
    for error, attempt in refused:
        with pytest.raises(error):
            await attempt
        assert await store.log_head() == head
    await assert_replays_to_store(store)


async def test_the_log_refuses_a_reused_nonce_and_a_late_created(logged_world) -> None:
    store, p = logged_world
    alice, bob = p["alice"], p["bob"]
    now = int(time.time())
    first = signed(bob, "POST", "/v1/rooms", {"name": "one"}, created=now + SKEW)  # a clock ahead, within the skew
    await store.create_room("one", "bob", logged=first)
    head = await store.log_head()
    # The same (keyid, nonce) in a new request: every client would refuse the entry, so the store does.
    with pytest.raises(LogRejected):
        await store.create_room("two", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "two"},
                                                           nonce=first.nonce))
    # created more than twice the skew older than the newest created in the log (a request held back).
    with pytest.raises(LogRejected):
        await store.create_room("late", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "late"},
                                                               created=now + SKEW - 2 * SKEW - 1))
    assert await store.log_head() == head
    assert sorted(r.name for r in await store.list_rooms()) == ["one"]  # no effect either
    await store.create_room("fine", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "fine"},
                                                           created=now + SKEW - 2 * SKEW + 1))
    await assert_replays_to_store(store)


async def test_an_effect_and_its_entry_commit_together_or_not_at_all(logged_world, monkeypatch) -> None:
    store, p = logged_world
    alice, bob = p["alice"], p["bob"]
    room = await store.create_room("ops", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "ops"}))
    head, members = await store.log_head(), [m.as_json() for m in await store.list_members()]

    def broken(self: LogRecord, seq: int, prev: str, result: dict[str, Any]) -> tuple[str, str]:
        raise Conflict("injected: the entry cannot be written")  # after the effect's checks (and, SQLite, its rows)

    monkeypatch.setattr(LogRecord, "entry", broken)
    dave = identity("dave")
    with pytest.raises(Conflict, match="injected"):
        await add_logged(store, alice, dave)
    with pytest.raises(Conflict, match="injected"):
        await store.delete_member("carol", logged=signed(alice, "DELETE", "/v1/members/carol"))
    with pytest.raises(Conflict, match="injected"):
        await store.add_room_member(room.room_id, "carol",
                                    logged=signed(bob, "PUT", f"/v1/rooms/{room.room_id}/members/carol"))
    monkeypatch.undo()
    assert await store.log_head() == head
    assert [m.as_json() for m in await store.list_members()] == members
    assert (await store.get_room(room.room_id)).handles == {"bob"}
    await add_logged(store, alice, dave)  # and the store goes on from there
    await assert_replays_to_store(store)


async def test_concurrent_logged_writers_never_fork_the_log(logged_world) -> None:
    store, p = logged_world
    writers = [p["alice"], p["bob"], p["carol"]] * 6
    rooms = await asyncio.gather(*(store.create_room(f"r{i}", w.handle, logged=signed(w, "POST", "/v1/rooms",
                                                                                      {"name": f"r{i}"}))
                                   for i, w in enumerate(writers)))
    assert len({r.room_id for r in rooms}) == len(writers)
    assert (await store.log_head())[0] == 2 + len(writers)
    await assert_replays_to_store(store)


async def test_kv_two_stores_on_one_bucket_never_fork_the_log(two_kv: tuple[KvStore, KvStore]) -> None:
    a, b = two_kv
    people = {h: identity(h) for h in ("alice", "bob", "carol")}
    await a.add_member(as_member(people["alice"], "admin"))
    await asyncio.gather(add_logged(a, people["alice"], people["bob"]), add_logged(b, people["alice"], people["carol"]))
    room = await a.create_room("ops", "alice", logged=signed(people["alice"], "POST", "/v1/rooms", {"name": "ops"}))
    rid = room.room_id
    ops = []
    for i in range(8):  # both nodes at once: room changes, role changes, new rooms
        s = (a, b)[i % 2]
        who = ("bob", "carol")[i % 2]
        ops.append(s.add_room_member(rid, who, logged=signed(people["alice"], "PUT", f"/v1/rooms/{rid}/members/{who}")))
        ops.append(s.create_room(f"n{i}", who, logged=signed(people[who], "POST", "/v1/rooms", {"name": f"n{i}"})))
    await asyncio.gather(*ops)
    assert await a.log_head() == await b.log_head()
    assert (await a.log_head())[0] == 3 + len(ops)
    assert await a.log_entries() == await b.log_entries()
    await assert_replays_to_store(b)


async def test_sqlite_a_crash_mid_write_leaves_no_partial_state(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    await asyncio.to_thread(migrate, db)
    script = f"""
import asyncio, json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_store_contract import add_logged, as_member, identity, signed
from unibus.store.base import LogRecord
from unibus.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(Path({str(db)!r}))
    alice, bob = identity("alice"), identity("bob")
    await store.add_member(as_member(alice, "admin"))
    await store.create_room("ops", "alice", logged=signed(alice, "POST", "/v1/rooms", {{"name": "ops"}}))
    print(json.dumps(list(await store.log_head())), flush=True)
    LogRecord.entry = lambda *a: os._exit(9)  # the process dies after the effect's rows, before the commit
    await add_logged(store, alice, bob)

asyncio.run(main())
"""
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                                   timeout=60)
    assert proc.returncode == 9, proc.stderr
    head = tuple(json.loads(proc.stdout.splitlines()[-1]))
    store = SqliteStore(db)
    try:
        assert await store.log_head() == head
        assert [m.handle for m in await store.list_members()] == ["alice"]
        await assert_replays_to_store(store)
    finally:
        await store.close()


async def test_kv_a_crash_mid_batch_leaves_no_partial_state(nats_server: NatsServer) -> None:
    nc, store = await kv_store(nats_server.url)
    try:
        alice, bob = identity("alice"), identity("bob")
        await store.add_member(as_member(alice, "admin"))
        await store.create_room("ops", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "ops"}))
        head = await store.log_head()
        real = nc.request
        sent: list[str] = []

        async def dies_before_the_commit(subject: str, payload: bytes = b"", timeout: float = 0.5,
                                         headers: dict[str, str] | None = None, **kw: Any) -> Any:
            if headers and "Nats-Batch-Commit" in headers:
                raise ConnectionResetError("the writer died before its commit message left")
            sent.append(subject)
            return await real(subject, payload, timeout=timeout, headers=headers, **kw)

        nc.request = dies_before_the_commit  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await add_logged(store, alice, bob)
        nc.request = real  # type: ignore[method-assign]
        assert sent, "part of the batch reached the server"
        assert await store.log_head() == head
        assert [m.handle for m in await store.list_members()] == ["alice"]
        await add_logged(store, alice, bob)  # the abandoned batch does not stand in the way
        await assert_replays_to_store(store)
    finally:
        await store.close()
        await nc.close()


async def test_kv_a_batch_is_rejected_whole_when_its_log_entry_cannot_be_written(nats_server: NatsServer) -> None:
    nc, store = await kv_store(nats_server.url)
    try:
        alice, bob = identity("alice"), identity("bob")
        await store.add_member(as_member(alice, "admin"))
        await store.create_room("ops", "alice", logged=signed(alice, "POST", "/v1/rooms", {"name": "ops"}))
        seq, _hash = await store.log_head()
        # Something already sits where the next entry goes: the batch's conditional write of it fails at commit.
        await nc.jetstream().publish(f"$KV.{STATE_BUCKET}.log.{seq + 1}", b"{}")
        with pytest.raises(Conflict):
            await add_logged(store, alice, bob)
        assert [m.handle for m in await store.list_members()] == ["alice"]  # the member's own writes were valid
        assert (await store.log_head())[0] == seq
    finally:
        await store.close()
        await nc.close()


async def test_entry_0_of_a_store_filled_before_the_log_records_its_unsigned_keys(store: Store) -> None:
    """Keys sealed before the log (a 0.11 store, or a restored 0.11 archive) have no signature:
    the snapshot that becomes entry 0 records each by its SHA-256, on every backend (docs/formats.md)."""
    alice, bob, carol = identity("alice"), identity("bob"), identity("carol")
    for i, role in ((alice, "admin"), (bob, "member"), (carol, "member")):
        await store.add_member(as_member(i, role))
    room = await store.create_room("ops", "alice")
    rid = room.room_id
    await store.add_room_member(rid, "bob")
    await store.put_keys(rid, 1, {"alice": b"a1" * 40, "bob": b"b1" * 40})
    await store.add_room_member(rid, "carol")
    await store.put_keys(rid, 2, {"alice": b"a2" * 40, "bob": b"b2" * 40, "carol": b"c2" * 40})
    await store.remove_room_member(rid, "bob")  # a former member keeps what was sealed to him
    await add_logged(store, alice, identity("dave"))  # the first logged write: entry 0 first
    [entry] = [json.loads(t) for t in await store.log_entries(-1, 1)]
    assert entry["kind"] == "snapshot"
    [doc] = entry["state"]["rooms"]
    assert doc["legacy_keys"] == {"alice": {"epochs": [[1, 2]], "sha256": digest(b"a1" * 40, b"a2" * 40)},
                                  "bob": {"epochs": [[1, 2]], "sha256": digest(b"b1" * 40, b"b2" * 40)},
                                  "carol": {"epochs": [[2, 2]], "sha256": digest(b"c2" * 40)}}
    state = await assert_replays_to_store(store)
    state.check_legacy_keys(rid, "bob", {1: b"b1" * 40, 2: b"b2" * 40})
    with pytest.raises(LogError, match="not the ones entry 0 records"):
        state.check_legacy_keys(rid, "carol", {2: b"a2" * 40})


def digest(*sealed: bytes) -> str:
    """entry 0's digest of one member's keys of a room, in epoch order (docs/formats.md)."""
    return hashlib.sha256(b"".join(hashlib.sha256(v).digest() for v in sealed)).hexdigest()


async def test_kv_entry_0_past_max_payload_is_named_not_a_conflict_for_ever(tmp_path) -> None:
    """Entry 0 of a 0.11 cluster's bucket is one KV value. Past max_payload it could never be written, and
    every logged write failed on it with "the record is larger than NATS allows" (a red team)."""
    from unibus.errors import RuntimeFailure
    from unibus.testing import NatsServer

    server = NatsServer(tmp_path / "nats", config_hook=lambda config: config.update(max_payload=32768))
    nc, store = await kv_store(server.url)
    try:
        people = [identity(f"m{i}") for i in range(40)]
        for i, p in enumerate(people):
            await store.add_member(as_member(p, "admin" if i == 0 else "member"))
        for r in range(8):
            room = await store.create_room(f"r{r}", "m0")
            for p in people[1:]:
                await store.add_room_member(room.room_id, p.handle)
            await store.put_keys(room.room_id, 1, {p.handle: os.urandom(80) for p in people})  # 0.11's
        with pytest.raises(RuntimeFailure, match=r"entry 0 of the membership log .* is \d+ bytes, more than NATS "
                                                 r"carries in one message \(max_payload 32768\)"):
            await store.ensure()
        assert await store.log_head() == (-1, "")
    finally:
        await store.close()
        await nc.close()
        server.stop()


async def test_kv_ensure_snapshots_a_bucket_with_state_but_no_log(nats_server: NatsServer) -> None:
    """A 0.11 cluster: members and rooms in the bucket, no meta.loghead."""
    nc, store = await kv_store(nats_server.url)
    try:
        alice, bob = identity("alice"), identity("bob")
        await store.add_member(as_member(alice, "admin"))
        await store.add_member(as_member(bob))
        room = await store.create_room("ops", "bob")
        await store.add_room_member(room.room_id, "alice")
        await store.put_keys(room.room_id, 1, {"alice": b"a1" * 40, "bob": b"b1" * 40})  # 0.11's: no signature
        await store.delete_member("bob")  # an ownerless room
        assert await store.log_head() == (-1, "")
        nc2, other = await kv_store(nats_server.url)  # another node starting: ensure() writes entry 0 once
        try:
            await asyncio.gather(store.ensure(), other.ensure())
        finally:
            await other.close()
            await nc2.close()
        assert (await store.log_head())[0] == 0
        state = await assert_replays_to_store(store)
        assert state.rooms[room.room_id].owner == "" and state.rooms[room.room_id].members == {"alice"}
        # entry 0 records the key sealed to alice (bob is gone): the one she may still open to read
        state.check_legacy_keys(room.room_id, "alice", {1: b"a1" * 40})
        with pytest.raises(LogError, match="records no key sealed to bob"):
            state.check_legacy_keys(room.room_id, "bob", {1: b"b1" * 40})
    finally:
        await store.close()
        await nc.close()


async def test_changes_carry_seq_actor_before_and_after(logged_world) -> None:
    """What the store_changed hook is built from (docs/plugins.md, "Change events"), on every backend."""
    store, p = logged_world
    alice, bob = p["alice"], p["bob"]
    seen: list[Change] = []
    store.add_listener(seen.append)
    room = await store.create_room("ops", "bob", logged=signed(bob, "POST", "/v1/rooms", {"name": "ops"}))
    rid = room.room_id
    await store.add_room_member(rid, "carol", logged=signed(alice, "PUT", f"/v1/rooms/{rid}/members/carol"))
    await store.set_role("carol", "admin", logged=signed(alice, "PATCH", "/v1/members/carol", {"role": "admin"}))
    await store.remove_room_member(rid, "carol", logged=signed(bob, "DELETE", f"/v1/rooms/{rid}/members/carol"))
    await store.delete_room(rid, logged=signed(bob, "DELETE", f"/v1/rooms/{rid}"))
    created, joined, promoted, left, deleted = seen
    head = (await store.log_head())[0]
    assert [c.seq for c in seen] == list(range(head - 4, head + 1))
    assert [c.actor for c in seen] == ["bob", "alice", "alice", "bob", "bob"]
    assert created.before is None and created.after == {
        "room_id": rid, "name": "ops", "owner": "bob", "epoch": 0, "rekey_required": True, "members": ["bob"]}
    assert joined.before == created.after and joined.after["members"] == ["bob", "carol"]
    assert promoted.before["role"] == "member" and promoted.after["role"] == "admin"
    assert promoted.after["handle"] == "carol" and "created_at" in promoted.after
    assert left.before["members"] == ["bob", "carol"] and left.after["members"] == ["bob"]
    assert deleted.before == left.after and deleted.after is None
    # an unlogged write (an import, migrate-to-kv) has neither seq nor actor
    seen.clear()
    await store.add_member(member("dave"))
    assert (seen[0].seq, seen[0].actor, seen[0].after["handle"]) == (None, None, "dave")


class _StopsAfterTheBatch(KvStore):
    """A KV store whose deletions stop after their atomic batch, as a crash there leaves them:
    the rooms, rewritten after it, still name the deleted member."""

    sweeping = False

    async def _sweep_gone(self, handle: str, cleared: Any = None, seen: Any = None) -> bool:
        return await super()._sweep_gone(handle, cleared, seen) if self.sweeping else False


async def _names(store: KvStore, handle: str) -> set[str]:
    """The room records that still name ``handle`` (roster, owner or sealed range), as stored."""
    rooms = await store._scan("room")
    return {v["room_id"] for v, _rev in rooms.values()
            if handle in v["members"] or v.get("owner") == handle or handle in v.get("sealed", {})}


async def test_kv_a_deletion_cut_after_its_batch_is_what_the_log_says(nats_server: NatsServer) -> None:
    """mallory, in 30 rooms, is deleted; the deletion stops after its batch, which rewrites no
    room. Every read already shows what the log says (no mallory, no owner, a rekey needed), a
    write to a room not yet cleared cannot remove her again nor need her key, a backup reads the
    same, and a new member with her handle waits until every room is cleared, then inherits
    nothing (docs/store.md, "Each operation")."""
    nc = await connect(nats_server.url)
    store = _StopsAfterTheBatch(nc.jetstream(timeout=2.0))
    await store.ensure()
    try:
        alice, mallory = identity("alice"), identity("mallory")
        await store.add_member(as_member(alice, "admin"))
        await add_logged(store, alice, mallory)
        rooms = [(await store.create_room(f"r{i}", "mallory", logged=signed(mallory, "POST", "/v1/rooms",
                                                                              {"name": f"r{i}"}))).room_id
                 for i in range(30)]
        await store.delete_member("mallory", logged=signed(alice, "DELETE", "/v1/members/mallory"))
        assert (await store._read("gone.mallory"))[0]["handle"] == "mallory"
        uncleared = await _names(store, "mallory")
        assert uncleared == set(rooms)

        await assert_replays_to_store(store)
        rid, other = sorted(uncleared)[:2]
        room = await store.get_room(rid)
        assert (room.owner, room.handles, room.rekey_required) == ("", frozenset(), True)
        head = await store.log_head()
        with pytest.raises(NotFound, match="not a member"):
            await store.remove_room_member(rid, "mallory",
                                           logged=signed(alice, "DELETE", f"/v1/rooms/{rid}/members/mallory"))
        assert await store.log_head() == head
        # an admin adds herself to one such room and rekeys it for its members that exist; the
        # change's report shows the room as readers do (a review saw mallory "leave" in it)
        seen: list[Change] = []
        store.add_listener(seen.append)
        await store.add_room_member(rid, "alice", logged=signed(alice, "PUT", f"/v1/rooms/{rid}/members/alice"))
        assert (seen[0].before["members"], seen[0].before["owner"]) == ([], None)
        assert seen[0].after["members"] == ["alice"]
        head = await store.log_head()
        await store.put_keys(rid, 1, {"alice": b"a1"}, sealer="alice", log_head={"seq": head[0], "hash": head[1]},
                             logged=signed(alice, "POST", f"/v1/rooms/{rid}/keys", {"epoch": 1}))
        assert rid not in await _names(store, "mallory") and other in await _names(store, "mallory")
        assert (await store.get_room(rid)).rekey_required is False
        state = await assert_replays_to_store(store)

        snap = await store.snapshot()
        rows = rows_from_kv({k: raw for k, (raw, _rev) in snap.entries.items()})
        assert {(r["room_id"], r["owner"], r["rekey_required"]) for r in rows.rooms} == {
            (i, r.owner or "", r.rekey_required) for i, r in state.rooms.items()}
        assert {(r["room_id"], r["handle"]) for r in rows.room_members} == {
            (i, h) for i, r in state.rooms.items() for h in r.members}

        # mallory again: not while rooms still name the old one; then with none of her rooms
        again = identity("mallory")
        with pytest.raises(Conflict, match="still being cleared"):
            await add_logged(store, alice, again)
        store.sweeping = True
        await add_logged(store, alice, again)
        assert (await store._read("gone.mallory"))[0] is None and await _names(store, "mallory") == set()
        assert await store.list_rooms("mallory") == []
        await assert_replays_to_store(store)
    finally:
        await store.close()
        await nc.close()


async def _alice_and_mallory(url: str, cls: type[KvStore]) -> tuple[nats.NATS, Any]:
    """A ``cls`` store on a new connection, with alice (admin) and mallory (member) in it."""
    nc = await connect(url)
    store = cls(nc.jetstream(timeout=2.0))
    await store.ensure()
    await store.add_member(member("alice", "admin"))
    await store.add_member(member("mallory"))
    return nc, store


class _SlowToClear(KvStore):
    """A KV store whose clean-up after a deletion waits until ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def _sweep_gone(self, handle: str, cleared: Any = None, seen: Any = None) -> bool:
        await asyncio.wait_for(self.release.wait(), WAIT)
        return await super()._sweep_gone(handle, cleared, seen)


async def test_kv_a_deletion_is_reported_before_its_rooms_are_cleared(nats_server: NatsServer) -> None:
    """The listeners (bus authorization's kicks) hear of a deletion as soon as it is committed,
    not after the rooms that name the member are rewritten: a review made that take 6.9 s by
    rewriting one of them in a loop, and the deleting node let the deleted member log in to the
    bus and read a room meanwhile, while every node refused its signed requests."""
    nc, store = await _alice_and_mallory(nats_server.url, _SlowToClear)
    try:
        rid = (await store.create_room("r", "mallory")).room_id
        seen: list[Change] = []
        store.add_listener(seen.append)
        deleting = asyncio.create_task(store.delete_member("mallory"))
        await eventually(lambda: seen, "the deletion's report")
        assert seen == [Change("member_deleted", handle="mallory", rooms=(rid,))]
        assert not deleting.done() and await _names(store, "mallory") == {rid}  # still clearing
        store.release.set()
        assert await asyncio.wait_for(deleting, WAIT) == [rid]
        assert await _names(store, "mallory") == set()
    finally:
        store.release.set()
        await store.close()
        await nc.close()


async def _delete_mallory_while(a: KvStore, writers: list[asyncio.Task[None]], stop: asyncio.Event,
                                busy: Callable[[], bool]) -> None:
    """Delete mallory once ``busy()`` says the writers are at it; her clean-up is done when it returns."""
    try:
        await eventually(busy, "dave's writes")
        await a.delete_member("mallory")
        assert (await a._read("gone.mallory"))[0] is None
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), WAIT)
    assert await _names(a, "mallory") == set()


@pytest.mark.slow
async def test_kv_a_member_rewriting_a_room_in_a_loop_cannot_hold_the_clean_up_back(
        two_kv: tuple[KvStore, KvStore]) -> None:
    """dave keeps rewriting a room of his that still names mallory (keys were sealed to her), on
    another node, while her deletion clears 20,000 rooms. The clean-up read every room again
    after each lost batch, and gave up after 12 (a review: the mark left, her handle refused to a
    new member, and each start paying for it); it now reads again only the rooms of the batch
    that lost, a few at a time."""
    a, b = two_kv
    for h, role in (("alice", "admin"), ("mallory", "member"), ("dave", "member"), ("carol", "member")):
        await a.add_member(member(h, role))
    d = (await a.create_room("d", "dave")).room_id
    await a.add_room_member(d, "mallory")
    await a.put_keys(d, 1, {"dave": b"d", "mallory": b"m"})
    await a.remove_room_member(d, "mallory")
    now = datetime.now(UTC).isoformat()
    for first in range(0, 20_000, 1000):  # set-up only, as records: rooms she made and left
        await a._commit([_Write(f"room.m{i}", {"room_id": f"m{i}", "name": "x", "owner": "mallory", "epoch": 0,
                                               "rekey_required": True, "created_at": now, "members": [],
                                               "sealed": {}}, 0) for i in range(first, first + 1000)])
    stop = asyncio.Event()
    writes = 0

    async def toggle() -> None:  # dave adds carol to his room and removes her, as fast as he can
        nonlocal writes
        while not stop.is_set():
            await b.add_room_member(d, "carol")
            await b.remove_room_member(d, "carol")
            writes += 2

    await _delete_mallory_while(a, [asyncio.create_task(toggle())], stop, lambda: writes >= 10)
    await a.add_member(member("mallory"))  # at once: nothing left to clear


@pytest.mark.parametrize("stores", [1, 4])
async def test_kv_batches_beyond_the_servers_in_flight_limit_wait_or_are_sent_again(
        nats_server: NatsServer, stores: int) -> None:
    """nats-server takes 50 atomic batches in flight per stream and refuses the next ("atomic
    publish too many inflight"): 200 two-key writes at once failed 150 times, through one store
    or four (a review: a member's parallel room writes made every other write fail). One store
    sends 16 at a time; four (64 > 50) are refused some and send them again. All of 64 land
    (not 200: a write waits for its turn up to the store's timeout, and on a busy machine 200
    through one store's 16 turns took longer than that: a CI run)."""
    opened = [await kv_store(nats_server.url) for _ in range(stores)]
    try:
        async def write(i: int) -> int:
            _nc, store = opened[i % stores]
            return await store._commit([_Write(f"room.b{i}", {"i": i}, 0), _Write(f"room.c{i}", {"i": i}, 0)])

        revisions = await asyncio.gather(*(write(i) for i in range(64)))
        assert len(set(revisions)) == 64
        _nc, first = opened[0]
        got = await first._scan("room")
        assert {k: v for k, (v, _rev) in got.items()} == {
            **{f"room.b{i}": {"i": i} for i in range(64)}, **{f"room.c{i}": {"i": i} for i in range(64)}}
    finally:
        for nc, store in opened:
            await store.close()
            await nc.close()


async def test_kv_a_member_with_hundreds_of_writes_in_flight_leaves_the_others_their_turns(
        nats_server: NatsServer) -> None:
    """A review: a node's turns for atomic batches were one queue, so a member with about 400
    multi-key writes in flight on one node made every other member's wait behind them, up to the
    store's 2 s, and some fail with 503. Now a member holds at most half of the turns, and a turn
    given back goes to the writer holding the fewest: erin's writes go while most of dave's 200
    still wait (before: each of hers waited for every one of his queued before it)."""
    nc, a = await kv_store(nats_server.url)
    done = {"dave": 0, "erin": 0}

    async def write(who: str, i: int) -> None:
        writer.set(who)  # as the auth middleware does, for this task only
        await a._commit([_Write(f"room.{who}{i}", {"i": i}, 0), _Write(f"room.{who}{i}x", {"i": i}, 0)])
        done[who] += 1

    try:
        flood = [asyncio.create_task(write("dave", i)) for i in range(200)]
        await asyncio.sleep(0)  # every one of his has asked for its turn
        await asyncio.gather(*(write("erin", i) for i in range(16)))
        assert done["erin"] == 16
        assert done["dave"] <= 100, done  # with one queue, erin's came after all of his
        results = await asyncio.gather(*flood, return_exceptions=True)
        assert all(r is None or isinstance(r, StoreUnavailable) for r in results)  # his own flood may wait 2 s
        assert a._turns.free == 16
    finally:
        await a.close()
        await nc.close()


async def test_kv_a_batch_with_a_record_past_max_payload_sends_nothing_and_keeps_no_turn(
        nats_server: NatsServer) -> None:
    """A review: a batch whose third record was past NATS's max_payload failed after its first
    message had gone out, and kept its turn for the server's 10 s (two members' 8 such writes each
    held every turn of the node, and others' writes failed with 503). It is refused before its
    first message now: a Conflict, nothing stored, the turn back at once."""
    nc, a = await kv_store(nats_server.url)
    try:
        big = {"blob": "x" * (nc.max_payload + 1)}
        for _ in range(20):  # more than a node's 16 turns
            with pytest.raises(Conflict, match="larger than NATS allows"):
                await a._commit([_Write("room.p1", {"k": 1}, 0), _Write("room.p2", {"k": 2}, 0),
                                 _Write("room.p3", big, 0)])
            assert a._turns.free == 16
        assert (await a._read("room.p1"))[1] == 0  # nothing of it stored
    finally:
        await a.close()
        await nc.close()


@pytest.mark.parametrize("where", ["alone", "first", "last"])
async def test_kv_a_record_that_fits_only_without_its_headers_is_refused_and_the_connection_stays(
        tmp_path: Path, where: str) -> None:
    """A review: nats-py checks a message's payload against max_payload, and nats-server its headers
    and payload together, so a record a few headers short of the limit was sent, the server
    answered -ERR, and nats-py closed the node's connection for good (a 503 after 2 s, then every
    write of the node until a restart). Records are measured with their headers now: one that fits
    exactly is stored, one byte more is a Conflict before anything is sent, and the connection
    stays."""
    def small(config: dict[str, Any]) -> None:
        config["max_payload"] = 8192

    server = await asyncio.to_thread(NatsServer, tmp_path / "nats", config_hook=small)
    try:
        nc, a = await kv_store(server.url)
        try:
            def writes(extra: int, tag: str) -> list[_Write]:
                def big(key: str) -> _Write:
                    return _Write(key, None, 0, raw=b"x" * (nc.max_payload - 150 + extra))
                if where == "alone":
                    return [big(f"room.{tag}big")]
                small_ones = [_Write(f"room.{tag}{k}", {"k": k}, 0) for k in range(2)]
                return [big(f"room.{tag}big"), *small_ones] if where == "first" else [*small_ones, big(f"room.{tag}big")]

            # the most that fits, with the headers nats-py writes for it at its place
            fits = next(extra for extra in range(150, -1, -1) if not any(
                kv_txn._wire_size(data, hdrs) > nc.max_payload
                for _s, data, hdrs in a._messages(writes(extra, "probe."))))
            await a._commit(writes(fits, "fits."))
            with pytest.raises(Conflict, match="larger than NATS allows"):
                await a._commit(writes(fits + 1, "over."))
            assert nc.is_connected and a._turns.free == 16
            await a._commit([_Write("room.after1", {"k": 1}, 0), _Write("room.after2", {"k": 2}, 0)])
        finally:
            await a.close()
            await nc.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_kv_a_batch_cut_short_keeps_its_turn_while_the_server_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a batch cut short after its first message (here its next message stalls, and the
    write times out) gave its turn back at once, while nats-server keeps such a batch for 10 s: 48
    cut short, and the next 16 were refused. Its turn now comes back after the server's batch
    timeout (1 s here, set on both sides), so this node never holds more than 16 of the server's
    50, and another node's batch goes through."""
    def short_batches(config: dict[str, Any]) -> None:
        config["jetstream"].setdefault("limits", {})["batch"] = {"timeout": "1s"}

    monkeypatch.setattr(kv_txn, "SERVER_BATCH_TIMEOUT", 1.0)
    server = await asyncio.to_thread(NatsServer, tmp_path / "nats", config_hook=short_batches)
    try:
        await _cut_short_batches(server)
    finally:
        await asyncio.to_thread(server.stop)


async def _cut_short_batches(server: NatsServer) -> None:
    nc, a = await kv_store(server.url, timeout=0.5)
    nc2, b = await kv_store(server.url)
    real = nc.publish

    async def stalls(*args: Any, **kwargs: Any) -> None:
        if (kwargs.get("headers") or {}).get("Nats-Batch-Sequence") == "2":
            await asyncio.sleep(3)  # the connection stalls after the batch began
        await real(*args, **kwargs)

    def three(tag: str) -> list[_Write]:
        return [_Write(f"room.{tag}{k}", {"k": k}, 0) for k in range(3)]

    try:
        nc.publish = stalls
        failed = []
        for wave in range(4):  # 64 batches: without the held turns, more than the server's 50
            failed += await asyncio.gather(*(a._commit(three(f"w{wave}.{i}.")) for i in range(16)),
                                           return_exceptions=True)
        nc.publish = real
        assert all(isinstance(e, StoreUnavailable) for e in failed)
        assert a._turns.free == 0  # every turn held: the server may still hold those batches
        await b._commit(three("elsewhere."))  # another node: the server has room (was refused for 2 s)
        await eventually(lambda: a._turns.free == 16, "the turns, once the server dropped its batches")
        await a._commit(three("again."))
    finally:
        nc.publish = real
        for store, conn in ((a, nc), (b, nc2)):
            await store.close()
            await conn.close()


@pytest.mark.slow
async def test_kv_a_member_writing_many_rooms_in_parallel_cannot_hold_the_clean_up_back(
        two_kv: tuple[KvStore, KvStore]) -> None:
    """A review: dave rewrites 30 rooms of his that still name mallory, three writers a room, on
    another node, while she is deleted. The clean-up's batches were refused (the server's 50
    batches in flight were his) and it gave up at once, the mark left (4 runs of 8)."""
    a, b = two_kv
    for h, role in (("alice", "admin"), ("mallory", "member"), ("dave", "member"), ("carol", "member")):
        await a.add_member(member(h, role))
    few = asyncio.Semaphore(5)  # set-up, a few rooms at a time (their writes share dave's records)

    async def room(i: int) -> str:
        async with few:
            d = (await a.create_room(f"d{i}", "dave")).room_id
            await a.add_room_member(d, "mallory")
            await a.put_keys(d, 1, {"dave": b"d", "mallory": b"m"})
            await a.remove_room_member(d, "mallory")
            return d

    rooms = await asyncio.gather(*(room(i) for i in range(30)))
    stop = asyncio.Event()
    writes = 0

    async def toggle(room: str) -> None:
        nonlocal writes
        while not stop.is_set():
            for change in (b.add_room_member, b.remove_room_member):
                # three writers of one room race, and 90 wait for the node's turns (503 past 2 s)
                with contextlib.suppress(Conflict, NotFound, StoreUnavailable):
                    await change(room, "carol")
                    writes += 1

    await _delete_mallory_while(a, [asyncio.create_task(toggle(room)) for room in rooms for _ in range(3)], stop,
                                lambda: writes >= 30)


async def test_kv_a_deletion_cut_after_its_batch_is_finished_by_the_next_start(nats_server: NatsServer) -> None:
    """The next start of a node (``ensure()``) clears the rooms a deletion cut short left."""
    nc, cut = await _alice_and_mallory(nats_server.url, _StopsAfterTheBatch)
    try:
        rooms = {(await cut.create_room(f"r{i}", "mallory")).room_id for i in range(5)}
        await cut.put_keys(min(rooms), 1, {"mallory": b"m"})
        await cut.delete_member("mallory")
        assert await _names(cut, "mallory") == rooms
        started = KvStore(nc.jetstream(timeout=2.0))
        await started.ensure()
        await started.close()
        assert await _names(cut, "mallory") == set() and (await cut._read("gone.mallory"))[0] is None
        keys, _rev = await cut._read(f"keys.{min(rooms)}.1")
        assert "mallory" not in keys["sealed"]  # its sealed key removed too
    finally:
        await cut.close()
        await nc.close()


async def test_kv_a_start_does_not_clear_a_later_deletion_with_an_older_read(nats_server: NatsServer) -> None:
    """A start reads the marks, then the rooms. Meanwhile mallory, whose deletion was cut short,
    is added again (which clears her rooms), joins room X, and is deleted again, cut short too.
    The start's read of the rooms predates X naming her: a review had it delete the newer mark
    with it, X kept naming her, and a third mallory inherited X. Each deletion's mark now names
    that deletion, and a read of the rooms clears only the deletion whose mark it came after."""
    nc, cut = await _alice_and_mallory(nats_server.url, _StopsAfterTheBatch)
    proceed = asyncio.Event()

    class HeldStart(KvStore):  # its start holds between reading the rooms and clearing them
        async def _sweep_gone(self, handle: str, cleared: Any = None, seen: Any = None) -> bool:
            if seen is not None:
                await asyncio.wait_for(proceed.wait(), WAIT)
            return await super()._sweep_gone(handle, cleared, seen)

    starting = HeldStart(nc.jetstream(timeout=2.0))
    try:
        await cut.add_member(member("bob"))
        await cut.create_room("p", "mallory")
        x = (await cut.create_room("x", "bob")).room_id
        await cut.delete_member("mallory")  # cut short: p names her
        start = asyncio.create_task(starting.ensure())
        await asyncio.sleep(0.5)  # it has read the marks and the rooms
        cut.sweeping = True
        await cut.add_member(member("mallory"))  # clears p first
        cut.sweeping = False
        await cut.add_room_member(x, "mallory")
        await cut.delete_member("mallory")  # cut short: x names her
        proceed.set()
        await asyncio.wait_for(start, WAIT)
        cut.sweeping = True
        await cut.add_member(member("mallory"))
        assert await cut.list_rooms("mallory") == [] and await _names(cut, "mallory") == set()
    finally:
        proceed.set()
        await starting.close()
        await cut.close()
        await nc.close()


async def test_kv_an_add_whose_reads_straddle_a_deletion_of_the_handle_waits_for_its_clean_up(
        nats_server: NatsServer) -> None:
    """An add of mallory reads her record and her mark at once, and nothing orders the answers:
    here the mark is read before another admin's deletion of the old mallory (cut short), and the
    record after it. The add committed beside the new mark, and the new mallory was in the old
    one's rooms (a review); it now reads the mark after the record, so it clears them first."""
    nc, cut = await _alice_and_mallory(nats_server.url, _StopsAfterTheBatch)
    deleted = asyncio.Event()

    class LateRecord(KvStore):  # its read of mallory's record is answered after the deletion
        armed = True

        async def _read(self, key: str) -> tuple[dict[str, Any] | None, int]:
            if self.armed and key == "member.mallory":
                self.armed = False
                await asyncio.wait_for(deleted.wait(), WAIT)
            return await super()._read(key)

    other = LateRecord(nc.jetstream(timeout=2.0))
    try:
        await cut.add_member(member("bob"))
        x = (await cut.create_room("x", "bob")).room_id
        await cut.add_room_member(x, "mallory")
        await cut.create_room("o", "mallory")
        adding = asyncio.create_task(other.add_member(member("mallory")))
        await asyncio.sleep(0.2)  # its read of the record waits (the mark is read after it)
        await cut.delete_member("mallory")
        deleted.set()
        await asyncio.wait_for(adding, WAIT)
        assert (await cut._read("gone.mallory"))[0] is None
        assert await cut.list_rooms("mallory") == [] and await _names(cut, "mallory") == set()
    finally:
        deleted.set()
        await other.close()
        await cut.close()
        await nc.close()


@pytest.mark.slow
async def test_kv_a_scan_longer_than_the_timeout_that_makes_progress_succeeds(nats_server: NatsServer) -> None:
    """Scans are bounded by their progress, not their length: one member can make enough rooms
    that reading them all takes longer than the store's timeout, and a fixed bound then failed
    every listing, every deletion and bus authorization's load (docs/store.md, "Failure")."""
    nc, store = await kv_store(nats_server.url)
    try:
        await store.add_member(member("alice", "admin"))
        await store.add_member(member("mallory"))
        now = datetime.now(UTC).isoformat()
        n = 80_000
        for first in range(0, n, 1000):
            await store._commit([_Write(f"room.m{i}", {"room_id": f"m{i}", "name": "x", "owner": "mallory",
                                                         "epoch": 0, "rekey_required": True, "created_at": now,
                                                         "members": ["mallory"], "sealed": {}}, 0)
                                 for i in range(first, first + 1000)])
        slow = KvStore(nc.jetstream(timeout=1.0), timeout=1.0)  # at least a second to read them here
        started = time.monotonic()
        assert len(await slow.list_rooms()) == n
        print(f"{n} rooms listed in {time.monotonic() - started:.2f} s")
        assert len((await slow.membership()).rooms_of("mallory")) == n
    finally:
        await store.close()
        await nc.close()


@pytest.mark.slow
async def test_kv_a_member_that_keeps_writing_can_still_be_deleted(two_kv: tuple[KvStore, KvStore]) -> None:
    """Every logged write moves the log's head, and a deletion whose head moved before its
    commit tries again, up to 12 times. When the deletion read every room before its commit,
    a member in many rooms that kept rekeying its own rooms through another node made every
    try lose: 4 deletions of 4 ended in Conflict (a review). The deletion's batch now reads no
    room, and its window is a few reads."""
    a, b = two_kv
    alice, mallory = identity("alice"), identity("mallory")
    await a.add_member(as_member(alice, "admin"))
    await add_logged(a, alice, mallory)
    # three rooms she rekeys (logged: the log must know them), and 1,500 she made and left
    rooms = [(await a.create_room(f"r{i}", "mallory", logged=signed(mallory, "POST", "/v1/rooms",
                                                                    {"name": f"r{i}"}))).room_id for i in range(3)]
    now = datetime.now(UTC).isoformat()
    for first in (0, 750):  # set-up only, as records: what create_room and a leave leave
        await a._commit([_Write(f"room.left{i}", {"room_id": f"left{i}", "name": "x", "owner": "mallory", "epoch": 0,
                                                  "rekey_required": True, "created_at": now, "members": [],
                                                  "sealed": {}}, 0) for i in range(first, first + 750)])
    stop = asyncio.Event()
    writes = 0

    async def rekeys(rid: str) -> None:
        nonlocal writes
        epoch = 0
        while not stop.is_set():
            head = await b.log_head()
            try:
                await b.put_keys(rid, epoch + 1, {"mallory": b"k"}, sealer="mallory",
                                 log_head={"seq": head[0], "hash": head[1]},
                                 logged=signed(mallory, "POST", f"/v1/rooms/{rid}/keys", {"epoch": epoch + 1}))
                epoch += 1
                writes += 1
            except (Forbidden, LogRejected, NotFound):
                return  # she is gone
            except Conflict:
                epoch = (await b.get_room(rid)).epoch

    spam = [asyncio.create_task(rekeys(rid)) for rid in rooms]
    try:
        await eventually(lambda: writes >= 20, "mallory's rekeys")
        await a.delete_member("mallory", logged=signed(alice, "DELETE", "/v1/members/mallory"))
        assert await a.get_member("mallory") is None
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*spam, return_exceptions=True), WAIT)
    assert await _names(a, "mallory") == set()
