"""Rooms, room membership and sealed keys against a real daemon (the server rules of docs/http-api.md)."""

from __future__ import annotations

import asyncio
import base64
import re

import pytest

from unibus.api.rooms import NAME_MAX, ROOM_SCHEMA
from unibus.client import ApiError, UnibusClient
from unibus.client.api import KeyUnavailable
from unibus.client.keys import generate_identity
from unibus.client.sealing import new_room_key, open_room_key, seal_room_key
from unibus.testing import SignedClient


async def expect(status, coro):
    with pytest.raises(ApiError) as e:
        await coro
    assert e.value.status == status, e.value.problem
    return e.value.problem


@pytest.fixture
async def world(daemon_with_admin, alice):
    """alice (admin), bob and carol (members; carol hybrid), each with a client."""
    server = daemon_with_admin()
    people = {"alice": alice, "bob": generate_identity("bob"), "carol": generate_identity("carol", "MLKEM768_X25519"),
              "dave": generate_identity("dave")}
    clients = {h: UnibusClient(server.base_url, i) for h, i in people.items()}
    for h in ("bob", "carol", "dave"):
        i = people[h]
        await clients["alice"].add_member(h, i.sign_pub_b64, i.enc_pub_b64, i.enc_suite, bus_pub=i.bus_pub)
    yield server, people, clients
    for c in clients.values():
        await c.close()


async def post_keys(client, room_id, epoch, sealed):
    """A keys POST as a 0.12 client makes it: each member's key package signed at the served log
    head, which goes back as it was served as the package's ``log_head``."""
    head = await client.log_head()
    return await client.post_keys(room_id, epoch, sealed, client.sign_key_packages(room_id, epoch, sealed, head), head)


def seal_all(room, key, epoch, people):
    return {m["handle"]: base64.b64encode(seal_room_key(key, base64.b64decode(m["enc_pub"]), m["enc_suite"],
                                                        room["room_id"], epoch)).decode()
            for m in room["members"]}


async def test_room_lifecycle(world):
    server, people, c = world
    room = await c["bob"].create_room("ops")
    assert room["epoch"] == 0 and room["rekey_required"] is True and room["owner"] == "bob"
    assert room["subject"] == f"unibus.room.{room['room_id']}"
    assert room["members"] == [{"handle": "bob", "enc_pub": people["bob"].enc_pub_b64, "enc_suite": "X25519"}]
    rid = room["room_id"]

    assert [r["room_id"] for r in await c["bob"].list_rooms()] == [rid]
    assert await c["carol"].list_rooms() == []
    assert [r["room_id"] for r in await c["alice"].list_rooms()] == [rid]  # admins see all
    await expect(403, c["carol"].get_room(rid))
    await expect(404, c["bob"].get_room("nosuchroom"))
    await expect(403, c["carol"].add_room_member(rid, "carol"))  # not the owner

    room = await c["bob"].add_room_member(rid, "carol")
    assert {m["handle"] for m in room["members"]} == {"bob", "carol"}
    carol_entry = next(m for m in room["members"] if m["handle"] == "carol")
    assert carol_entry["enc_suite"] == "MLKEM768_X25519" and len(base64.b64decode(carol_entry["enc_pub"])) == 1216
    await expect(404, c["bob"].add_room_member(rid, "zed"))
    assert (await c["bob"].add_room_member(rid, "carol"))["members"] == room["members"]  # idempotent

    # keys: wrong epoch, missing and extra handles are 409s that say which
    key = new_room_key()
    sealed = seal_all(room, key, 1, people)
    problem = await expect(409, post_keys(c["bob"], rid, 2, sealed))
    assert "epoch must be 1" in problem["detail"]
    problem = await expect(409, post_keys(c["bob"], rid, 1, {"bob": sealed["bob"]}))
    assert problem["missing"] == ["carol"] and problem["extra"] == []
    problem = await expect(409, post_keys(c["bob"], rid, 1, {**sealed, "dave": sealed["bob"]}))
    assert problem["missing"] == [] and problem["extra"] == ["dave"]
    await expect(422, post_keys(c["bob"], rid, 1, {**sealed, "carol": sealed["bob"]}))  # wrong size for the suite
    await expect(403, post_keys(c["carol"], rid, 1, sealed))
    room = await post_keys(c["bob"], rid, 1, sealed)
    assert room["epoch"] == 1 and room["rekey_required"] is False

    for h in ("bob", "carol"):
        got = await c[h].my_key(rid)
        assert set(got) == {"epoch", "sealed", "sig", "sealer", "log_head"}  # exactly, docs/http-api.md
        assert got["epoch"] == 1
        assert open_room_key(base64.b64decode(got["sealed"]), people[h], rid, 1) == key
    with pytest.raises(KeyUnavailable) as e:  # never in the room: no right, as for the room itself (an audit)
        await c["dave"].my_key(rid)
    assert e.value.status == 403 and e.value.problem["type"].endswith("/forbidden"), e.value.problem
    with pytest.raises(KeyUnavailable) as e:
        await c["dave"].my_key(rid, epoch=1)
    assert e.value.status == 403

    # removal: rekey_required; carol may still read epoch 1, never epoch 2
    await c["bob"].remove_room_member(rid, "carol")
    room = await c["bob"].get_room(rid)
    assert room["rekey_required"] is True and [m["handle"] for m in room["members"]] == ["bob"]
    key2 = new_room_key()
    await post_keys(c["bob"], rid, 2, seal_all(room, key2, 2, people))
    assert (await c["carol"].my_key(rid))["epoch"] == 1
    await expect(404, c["carol"].my_key(rid, epoch=2))
    assert (await c["carol"].my_key(rid, epoch=1))["epoch"] == 1

    # a member may remove itself; the owner or an admin may delete the room
    await c["bob"].add_room_member(rid, "dave")
    await c["dave"].remove_room_member(rid, "dave")
    await expect(403, c["dave"].delete_room(rid))
    await c["alice"].delete_room(rid)
    await expect(404, c["bob"].get_room(rid))
    await expect(404, c["bob"].my_key(rid))


async def test_a_rekeys_conflicts_come_before_its_values_are_checked(world):
    """docs/http-api.md: the epoch must be current+1 and ``sealed`` must name exactly the current
    members (409 naming the missing and extra); the values are checked after. An audit: a package
    with placeholder values and a member missing was answered 422 for a value's size."""
    server, people, c = world
    rid = (await c["bob"].create_room("order"))["room_id"]
    await c["bob"].add_room_member(rid, "carol")
    head = await c["bob"].log_head()
    dummy = base64.b64encode(b"x").decode()

    def body(epoch, handles, log_head=head):
        return {"epoch": epoch, "sealed": {h: dummy for h in handles}, "sigs": {h: dummy for h in handles},
                "log_head": log_head}

    problem = await expect(409, c["bob"].request("POST", f"/v1/rooms/{rid}/keys", json_body=body(1, ["bob"])))
    assert problem["missing"] == ["carol"] and problem["extra"] == [], problem
    problem = await expect(409, c["bob"].request("POST", f"/v1/rooms/{rid}/keys",
                                                 json_body=body(1, ["bob", "carol", "dave"], log_head={})))
    assert problem["missing"] == [] and problem["extra"] == ["dave"], problem
    problem = await expect(409, c["bob"].request("POST", f"/v1/rooms/{rid}/keys", json_body=body(3, ["bob"])))
    assert "epoch must be 1" in problem["detail"], problem
    # the right members: now the values are checked
    problem = await expect(422, c["bob"].request("POST", f"/v1/rooms/{rid}/keys", json_body=body(1, ["bob", "carol"])))
    assert problem["type"].endswith("/invalid-field") and "sealed." in problem["detail"], problem
    for bad in ([], {"BOB": dummy}, "x"):  # not a set of handles at all: 422 before anything else
        problem = await expect(422, c["bob"].request("POST", f"/v1/rooms/{rid}/keys",
                                                     json_body={**body(1, ["bob"]), "sealed": bad}))
        assert "sealed" in problem["detail"], problem
    await expect(403, c["carol"].request("POST", f"/v1/rooms/{rid}/keys", json_body=body(1, ["bob"])))  # not the owner
    assert (await c["bob"].get_room(rid))["epoch"] == 0  # nothing was written


async def test_the_served_log_head_is_what_a_keys_post_takes_back(world):
    """``GET /v1/log/head`` is ``{"seq", "hash"}``, the object a keys POST takes as ``log_head``
    and ``GET /v1/log``'s ``head``; the server's --auth-skew is in the ``Unibus-Auth-Skew``
    header (an audit: a third field in the body made the served head a 422 as ``log_head``)."""
    server, people, c = world
    room = await c["bob"].create_room("head")
    signed = c["bob"]
    status, head = await asyncio.to_thread(SignedClient(server.base_url, people["bob"]).get, "/v1/log/head")
    assert status == 200 and set(head) == {"seq", "hash"}, head
    assert head == (await signed.log())["head"] == await signed.log_head() and signed.reported_auth_skew == 60
    sealed = seal_all(room, new_room_key(), 1, people)
    done = await signed.post_keys(room["room_id"], 1, sealed, signed.sign_key_packages(room["room_id"], 1, sealed, head),
                                  head)
    assert done["epoch"] == 1


async def test_deleting_a_member_removes_it_from_every_room(world):
    server, people, c = world
    r1 = (await c["bob"].create_room("one"))["room_id"]
    r2 = (await c["bob"].create_room("two"))["room_id"]
    for rid in (r1, r2):
        room = await c["bob"].add_room_member(rid, "dave")
        await post_keys(c["bob"], rid, 1, seal_all(room, new_room_key(), 1, people))
    await c["alice"].remove_member("dave")
    for rid in (r1, r2):
        room = await c["bob"].get_room(rid)
        assert [m["handle"] for m in room["members"]] == ["bob"] and room["rekey_required"] is True


async def test_concurrent_rekeys_exactly_one_wins(world):
    server, people, c = world
    room = await c["bob"].create_room("race")
    rid = room["room_id"]
    room = await c["bob"].add_room_member(rid, "carol")
    keys = [new_room_key() for _ in range(6)]
    results = await asyncio.gather(
        *(post_keys(c["bob" if i % 2 else "alice"], rid, 1, seal_all(room, k, 1, people)) for i, k in enumerate(keys)),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, Exception)]
    losses = [r for r in results if isinstance(r, ApiError)]
    assert len(wins) == 1 and len(losses) == 5
    assert all(e.status == 409 for e in losses)
    # no mixed epoch: both members hold the same key
    opened = {open_room_key(base64.b64decode((await c[h].my_key(rid))["sealed"]), people[h], rid, 1)
              for h in ("bob", "carol")}
    assert len(opened) == 1 and opened <= set(keys)


async def test_bus_info(world):
    server, people, c = world
    rid = (await c["bob"].create_room("bus"))["room_id"]
    info = await c["bob"].bus_info()
    assert info["servers"] == [server.nats_url]
    assert info["user_nkey"] == people["bob"].bus_pub and info["user_nkey"].startswith("U")
    assert info["inbox_prefix"] == "_INBOX_bob"
    assert info["rooms"] == {rid: f"unibus.room.{rid}.>"}


async def test_room_names_follow_the_documented_pattern(world):
    """POST /v1/rooms applies the name rule /openapi.json documents: a name the
    schema takes is created, one it refuses is 422 (docs/http-api.md, "POST /v1/rooms")."""
    server, people, c = world
    prop = ROOM_SCHEMA["properties"]["name"]
    for name in ("ops", " a ", "x" * NAME_MAX, "é ü", "a\u3000b", "\x7f", "a\x1fb", "a\nb", "\t", "   ", "\u3000",
                 "\u00a0", "", "x" * (NAME_MAX + 1), "ok\n"):
        # ECMA-262 (OpenAPI 3.1): $ is the end of the input, not "before a final newline"
        documented = (prop["minLength"] <= len(name) <= prop["maxLength"]
                      and re.search(prop["pattern"].replace("$", r"\Z"), name) is not None)
        try:
            room = await c["bob"].request("POST", "/v1/rooms", json_body={"name": name})
            assert documented and room["name"] == name, name
        except ApiError as e:
            assert not documented and e.status == 422, (name, e.status)


async def test_bad_room_input(world):
    server, people, c = world
    for body in ({"name": ""}, {"name": 5}, {"name": "x" * 201}, {"name": "a\nb"}, {"nom": "x"}, {}):
        with pytest.raises(ApiError) as e:
            await c["bob"].request("POST", "/v1/rooms", json_body=body)
        assert e.value.status in (400, 422), body
    rid = (await c["bob"].create_room("x"))["room_id"]
    for body in ({"epoch": "1", "sealed": {}}, {"epoch": 1, "sealed": {}}, {"epoch": 1, "sealed": {"bob": "!!"}},
                 {"epoch": 1, "sealed": []}, {"epoch": True, "sealed": {"bob": "AAAA"}}):
        with pytest.raises(ApiError) as e:
            await c["bob"].request("POST", f"/v1/rooms/{rid}/keys", json_body=body)
        assert e.value.status == 422, body
    with pytest.raises(ApiError) as e:
        await c["bob"].request("GET", f"/v1/rooms/{rid}/keys/me", query={"epoch": "one"})
    assert e.value.status == 422


async def test_an_id_that_breaks_its_syntax_is_not_found_and_changes_nothing(world):
    """``GET /v1/rooms/no-such-room``: an id no room or member can have is 404, as an unknown
    one is (docs/http-api.md, "Input rules"), on reads and on logged changes alike, and nothing
    is logged."""
    server, people, c = world
    rid = (await c["bob"].create_room("ops"))["room_id"]
    head = await c["alice"].log_head()
    for who, method, path in (("bob", "GET", "/v1/rooms/no-such-room"),
                              ("bob", "GET", "/v1/rooms/NOSUCHROOM"),
                              ("bob", "GET", "/v1/rooms/no-such-room/keys/me"),
                              ("bob", "GET", "/v1/members/NoSuch"),
                              ("alice", "DELETE", "/v1/members/No_Such"),
                              ("alice", "DELETE", "/v1/rooms/no-such-room"),
                              ("bob", "PUT", f"/v1/rooms/{rid}/members/Carol"),
                              ("bob", "DELETE", f"/v1/rooms/{rid}/members/carol!")):
        problem = await expect(404, c[who].request(method, path))
        assert problem["type"].endswith("/not-found") and problem["detail"].startswith("no such "), (path, problem)
    # the same routes with ids of the right shape that name nothing: 404 as well
    await expect(404, c["bob"].request("GET", "/v1/rooms/nosuchroom"))
    await expect(404, c["bob"].request("GET", "/v1/members/nosuch"))
    assert await c["alice"].log_head() == head
