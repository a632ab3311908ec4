"""Property: after any sequence of membership operations, the client's verified view equals the server's.

One daemon for the whole module (hypothesis drives many sequences against
it). Each example runs random operations through the SDK (refusals
included), then compares the server's members and rooms with what three
clients derive from the log: alice's persistent replica (synced
incrementally, example after example), a second process reloading that
replica from its files, and a from-scratch verification.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unibus.client import ApiError, UnibusClient
from unibus.client.keys import generate_identity
from unibus.testing import MembershipdProcess, bootstrap_member

HANDLES = ("bob", "carol", "dave")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("prop")
    people = {h: generate_identity(h, "MLKEM768_X25519" if h == "carol" else "X25519") for h in ("alice", *HANDLES)}
    bootstrap_member(base / "daemon", people["alice"], "admin")
    daemon = MembershipdProcess(base / "daemon").start()
    try:
        yield daemon, people, base / "alice.log"
    finally:
        daemon.stop()


op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(HANDLES), st.sampled_from(("member", "admin"))),
    st.tuples(st.just("delete"), st.sampled_from(HANDLES)),
    st.tuples(st.just("role"), st.sampled_from(HANDLES), st.sampled_from(("member", "admin"))),
    st.tuples(st.just("create"), st.sampled_from(("alice", *HANDLES))),
    st.tuples(st.just("join"), st.integers(0, 3), st.sampled_from(("alice", *HANDLES))),
    st.tuples(st.just("leave"), st.integers(0, 3), st.sampled_from(("alice", *HANDLES))),
    st.tuples(st.just("rekey"), st.integers(0, 3), st.sampled_from(("alice", *HANDLES))),
    st.tuples(st.just("drop"), st.integers(0, 3)),
)


async def run(daemon: MembershipdProcess, people: dict[str, Any], replica: Any, ops: list[tuple]) -> None:
    def sdk(handle: str, **kw: Any) -> UnibusClient:
        return UnibusClient(daemon.base_url, people[handle], notice=lambda _t: None, **kw)

    rooms: list[str] = []
    async with sdk("alice", replica_root=replica) as alice:
        for o in ops:
            kind = o[0]
            try:
                if kind == "add":
                    r = people[o[1]].public_record()
                    await alice.add_member(o[1], r["sign_pub"], r["enc_pub"], r["enc_suite"], role=o[2],
                                           bus_pub=r["bus_pub"])
                elif kind == "delete":
                    await alice.remove_member(o[1])
                elif kind == "role":
                    await alice.set_role(o[1], o[2])
                elif kind == "create":
                    async with sdk(o[1]) as c:
                        rooms.append((await c.create_room("p"))["room_id"])
                elif rooms and kind == "join":
                    await alice.add_room_member(rooms[o[1] % len(rooms)], o[2])
                elif rooms and kind == "leave":
                    await alice.remove_room_member(rooms[o[1] % len(rooms)], o[2])
                elif rooms and kind == "rekey":
                    async with sdk(o[2]) as c:  # a verified rekey by whoever is asked
                        await c.rekey(rooms[o[1] % len(rooms)])
                elif rooms and kind == "drop":
                    await alice.delete_room(rooms[o[1] % len(rooms)])
            except ApiError as exc:
                assert exc.status in (401, 403, 404, 409, 422), exc
        await alice.sync()
        members = {m["handle"]: (m["role"], m["sign_pub"], m["enc_pub"], m["enc_suite"], m["bus_pub"])
                   for m in await alice.list_members()}
        served_rooms = {r["room_id"]: (r["name"], r["owner"] or "", r["epoch"], r["rekey_required"],
                                       sorted(m["handle"] for m in r["members"])) for r in await alice.list_rooms()}
        head = await alice.log_head()

        def view(client: UnibusClient) -> tuple[dict, dict, tuple]:
            state = client.verified
            ms = {h: tuple(m.as_json()[k] for k in ("role", "sign_pub", "enc_pub", "enc_suite", "bus_pub"))
                  for h, m in state.members.items()}
            rs = {rid: (r.name, r.owner, r.epoch, r.rekey_required, sorted(r.members)) for rid, r in state.rooms.items()}
            return ms, rs, state.head

        expected = (members, served_rooms, (head["seq"], head["hash"]))
        assert view(alice) == expected
        async with sdk("alice", replica_root=replica) as again:  # another process: the files
            await again.sync()
            assert view(again) == expected
        async with sdk("alice") as fresh:
            await fresh.verify_log()
            assert view(fresh) == expected
        # every key the log says a current member holds verifies for that member
        for rid, (_name, _owner, epoch, rekey_required, roster) in served_rooms.items():
            keyed = alice.verified.rooms[rid].epochs.get(epoch)
            if keyed is not None and not rekey_required and roster:
                async with sdk(roster[0]) as m:
                    assert (await m.room_key(rid, epoch))[0] == epoch


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=10))
def test_the_verified_view_equals_the_servers(env, ops):
    daemon, people, replica = env
    asyncio.run(run(daemon, people, replica, ops))
