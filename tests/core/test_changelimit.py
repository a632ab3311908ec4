"""How often one member may add another to its rooms (unibus.changelimit; docs/bus-auth.md).

Red team: each change of a member's rooms kicks all its NATS connections, and any member may
add another to a room of its own and remove it again in a loop; the victim lost 54 to 93% of
what its other rooms carried. The arithmetic runs against a clock the test moves; the rules of
the routes against a real daemon with bus authorization, its members on the bus with real
nats-py connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request

import aiohttp
import nats
import pytest

import unibus.plugins.auth_enforce as auth_enforce
from unibus.app import CHANGE_LIMIT, STORE
from unibus.changelimit import CHANGE_BURST, CHANGE_INTERVAL, ChangeLimit
from unibus.problems import Problem
from unibus.signing import sign_request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit_of(burst: int, interval: float, clock: Clock) -> ChangeLimit:
    limit = ChangeLimit(burst=burst, interval=interval, clock=clock)
    limit.costs = lambda handle: not handle.startswith("off")  # "off...": a member not on the bus
    return limit


def refusal(limit: ChangeLimit, author: str, targets: list[str]) -> Problem:
    with pytest.raises(Problem) as e:
        limit.take(author, targets)
    return e.value


def test_a_burst_then_one_change_per_interval():
    clock = Clock()
    limit = limit_of(5, 2.0, clock)
    for _ in range(5):
        limit.take("alice", ["bob"])
    p = refusal(limit, "alice", ["bob"])
    assert p.status == 429 and p.kind == "too-many-requests" and p.extra["target"] == "bob"
    assert p.headers == {"Retry-After": "2"}
    assert p.detail == ("alice may change bob's rooms 5 times in a row, then once every 2 s: each change makes all "
                        "of bob's clients log in to the bus again; try again in 2 s")
    clock.now += 1.9
    refusal(limit, "alice", ["bob"])
    clock.now += 0.1
    limit.take("alice", ["bob"])  # one more per interval
    refusal(limit, "alice", ["bob"])
    assert limit.refused == 3
    clock.now += 5 * 2.0 + 2.0  # the whole budget back after burst x interval, never more
    for _ in range(5):
        limit.take("alice", ["bob"])
    refusal(limit, "alice", ["bob"])


def test_only_changes_that_kick_count():
    """A member not on the bus, the author itself, and anything without bus authorization."""
    limit = limit_of(2, 60.0, Clock())
    for _ in range(10):
        assert limit.take("alice", ["offline", "alice"]) == {}
    assert len(limit) == 0
    plain = ChangeLimit(burst=1, interval=60.0, clock=Clock())  # nobody said what kicks: nothing does
    for _ in range(3):
        plain.take("alice", ["bob"])
    assert not plain.counts("bob") and len(plain) == 0


def test_each_pair_has_its_own_budget():
    limit = limit_of(2, 60.0, Clock())
    for _ in range(2):
        limit.take("alice", ["bob"])
    refusal(limit, "alice", ["bob"])
    limit.take("alice", ["carol"])  # another target
    limit.take("dave", ["bob"])  # another author
    assert len(limit) == 3


def test_a_change_of_several_members_charges_all_or_none():
    """A room's deletion changes every member's rooms: all of them are charged, or none."""
    limit = limit_of(2, 60.0, Clock())
    limit.take("alice", ["bob"])
    limit.take("alice", ["bob"])
    p = refusal(limit, "alice", ["carol", "bob", "alice", "dave"])
    assert p.extra["target"] == "bob"
    for _ in range(2):  # carol's and dave's budgets are whole
        limit.take("alice", ["carol", "dave", "carol"])  # a target named twice is charged once
    refusal(limit, "alice", ["carol"])


def test_a_charge_given_back_is_as_if_never_taken():
    clock = Clock()
    limit = limit_of(2, 10.0, clock)
    limit.give_back("alice", limit.take("alice", ["ghost"]))
    assert len(limit) == 0  # a handle that names nobody leaves nothing
    limit.take("alice", ["bob"])
    limit.give_back("alice", limit.take("alice", ["bob"]))
    limit.take("alice", ["bob"])
    refusal(limit, "alice", ["bob"])
    limit.give_back("alice", {"nobody": clock.now + 5})  # never charged: nothing to give back
    assert len(limit) == 1


def test_a_charge_whose_time_ran_out_is_not_given_back():
    """Review: a change charged, then refused by the store only after its charge had run out,
    gave back a charge of the changes made since, so the next went through over the budget."""
    clock = Clock()
    limit = limit_of(2, 10.0, clock)
    slow = limit.take("alice", ["bob"])  # still in the store's hands...
    clock.now += 15.0  # ... after its charge ran out
    limit.take("alice", ["bob"])
    limit.take("alice", ["bob"])  # the budget spent by two real changes
    limit.give_back("alice", slow)  # the slow one fails: it counts no more, nothing to give
    refusal(limit, "alice", ["bob"])


def test_pairs_whose_budget_is_whole_again_are_forgotten():
    clock = Clock()
    limit = limit_of(3, 1.0, clock)
    for i in range(1000):
        limit.take("alice", [f"m{i}"])
    assert len(limit) == 1000
    clock.now += 3.0  # a burst's worth of time: every pair is whole again
    limit.take("alice", ["last"])
    assert len(limit) == 1


def test_the_bound_on_rooms():
    limit = ChangeLimit()
    limit.check_rooms("bob")  # no bound known: nothing refused
    limit.check_share("alice", "bob", 10**6)
    limit.rooms_in, limit.max_rooms = {"bob": 2, "carol": 3}.get, 3
    limit.check_rooms("bob")
    with pytest.raises(Problem) as e:
        limit.check_rooms("carol")
    assert e.value.status == 409 and e.value.kind == "too-many-rooms"
    assert e.value.extra == {"target": "carol", "max_rooms": 3}
    assert e.value.detail.startswith("carol is in 3 rooms, the most a member may be in")
    limit.max_rooms = 30
    assert not limit.share_reached("bob") and limit.share_reached("carol")  # in 2 and 3 rooms; a share is 3
    limit.check_share("alice", "bob", 2)
    limit.check_share("bob", "bob", 99)  # its own rooms: the bound alone
    with pytest.raises(Problem) as e:
        limit.check_share("alice", "bob", 3)
    assert e.value.status == 409 and e.value.extra == {"target": "bob", "max_rooms": 3}


def test_a_limit_needs_a_budget():
    with pytest.raises(ValueError, match="burst of at least 1"):
        ChangeLimit(burst=0)
    with pytest.raises(ValueError, match="interval over 0"):
        ChangeLimit(interval=0)


class World:
    """A real daemon with bus authorization: bob and dave own a room each; carol and erin are
    ordinary members, carol logged in to the bus (so that a change of her rooms kicks her connection)."""

    def __init__(self, app, people, rids) -> None:
        self.app, self.people, self.rids = app, people, rids
        self.nats_url = f"nats://127.0.0.1:{app.settings.nats_addr.port}"
        self.connections = []

    def on_the_bus(self, handle: str) -> None:
        """``handle`` logs in to the bus and stays (reconnecting after each kick) until teardown."""

        async def connect():
            return await nats.connect(self.nats_url, nkeys_seed_str=self.people[handle].identity.bus_nkey_seed(),
                                      allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.05,
                                      connect_timeout=3)

        self.connections.append(self.app.run(connect()))
        limit = self.app.app[CHANGE_LIMIT]
        deadline = time.monotonic() + 10
        while not limit.counts(handle):  # the CONNECT event has reached the enforcer
            assert time.monotonic() < deadline, f"{handle}'s connection never reached the enforcer"
            time.sleep(0.02)

    def close(self) -> None:
        for nc in self.connections:
            # a connection kicked a moment ago may be reset as nats-py flushes it on the way out
            # (ConnectionResetError from its drain, one teardown in about ten)
            with contextlib.suppress(ConnectionError):
                self.app.run(nc.close())


@pytest.fixture
def world(unibus_app):
    app = unibus_app(plugins=[auth_enforce], args=["--bus-auth", "enforce"])
    people = {h: app.member(h) for h in ("bob", "carol", "dave", "erin")}
    rids = {}
    for owner in ("bob", "dave"):
        status, room = people[owner].post("/v1/rooms", {"name": f"{owner}'s"})
        assert status == 201, room
        rids[owner] = room["room_id"]
    w = World(app, people, rids)
    w.on_the_bus("carol")
    yield w
    w.close()


def log_seq(app) -> int:
    status, head = app.admin.get("/v1/log/head")
    assert status == 200, head
    return head["seq"]


def bait_rooms(owner, n: int) -> list[str]:
    """``n`` new rooms of ``owner``'s; their ids."""
    rooms = []
    for i in range(n):
        status, room = owner.post("/v1/rooms", {"name": f"bait {i}"})
        assert status == 201, room
        rooms.append(room["room_id"])
    return rooms


def members_of(client, rid) -> set[str]:
    status, room = client.get(f"/v1/rooms/{rid}")
    assert status == 200, room
    return {m["handle"] for m in room["members"]}


def test_a_member_may_change_another_members_rooms_only_so_often(world):
    """bob adds carol, who is on the bus, to his room and removes her, in a loop: the first
    CHANGE_BURST changes are made, the next is 429, before anything is written; every other pair
    of author and target, and an admin, are not held back."""
    app, p, rids = world.app, world.people, world.rids
    bob, dave = p["bob"], p["dave"]
    path = f"/v1/rooms/{rids['bob']}/members/carol"
    refused = app.metric("unibus_http_member_changes_refused_total")
    for i in range(CHANGE_BURST // 2):
        status, body = bob.put(path)
        assert status == 200, (i, status, body)
        status, body = bob.delete(path)
        assert status == 204, (i, status, body)
    seq = log_seq(app)
    status, problem = bob.put(path)
    assert status == 429, problem
    assert problem["type"].endswith("/too-many-requests") and problem["target"] == "carol"
    assert problem["detail"].startswith(f"bob may change carol's rooms {CHANGE_BURST} times in a row, then "
                                        f"once every {CHANGE_INTERVAL:g} s")
    assert log_seq(app) == seq  # nothing written
    assert "carol" not in members_of(bob, rids["bob"])
    assert app.metric("unibus_http_member_changes_refused_total") == refused + 1

    world.on_the_bus("erin")
    assert bob.put(f"/v1/rooms/{rids['bob']}/members/erin")[0] == 200  # another target
    assert dave.put(f"/v1/rooms/{rids['dave']}/members/carol")[0] == 200  # another author
    for _ in range(CHANGE_BURST + 2):  # an admin is not limited
        assert app.admin.put(path)[0] == 200
        assert app.admin.delete(path)[0] == 204


def test_changes_of_a_member_that_is_not_on_the_bus_are_not_counted(world, unibus_app):
    """Such a change kicks nothing: an owner may add the same member to room after room (a
    set-up script; this suite's own fixtures did, and the first version refused them)."""
    app, p, rids = world.app, world.people, world.rids
    path = f"/v1/rooms/{rids['bob']}/members/erin"
    for _ in range(CHANGE_BURST + 10):
        assert p["bob"].put(path)[0] == 200
        assert p["bob"].delete(path)[0] == 204
    assert ("bob", "erin") not in app.app[CHANGE_LIMIT]._whole_at
    # without bus authorization no change kicks anything, so none counts
    plain = unibus_app()
    owner, member = plain.member("bob"), plain.member("carol")
    status, room = owner.post("/v1/rooms", {"name": "plain"})
    assert status == 201, room
    for _ in range(CHANGE_BURST + 10):
        assert owner.put(f"/v1/rooms/{room['room_id']}/members/carol")[0] == 200
        assert owner.delete(f"/v1/rooms/{room['room_id']}/members/carol")[0] == 204
    assert member.get("/v1/me")[0] == 200


def test_removals_made_while_the_member_is_on_the_bus_count(world):
    """Red team of the second version, which counted adds only: bob added erin to rooms while
    she was off the bus (free: no kick), and once she was on it removed her from them one by
    one, each removal a kick, none counted (101 kicks). Removals and deletions count now."""
    app, p = world.app, world.people
    bob = p["bob"]
    rooms = []
    for i in range(CHANGE_BURST + 3):
        status, room = bob.post("/v1/rooms", {"name": f"bait {i}"})
        assert status == 201, room
        assert bob.put(f"/v1/rooms/{room['room_id']}/members/erin")[0] == 200  # off the bus: free
        rooms.append(room["room_id"])
    world.on_the_bus("erin")
    statuses = [bob.delete(f"/v1/rooms/{rid}/members/erin")[0] for rid in rooms[:CHANGE_BURST + 1]]
    assert statuses == [204] * CHANGE_BURST + [429]
    status, problem = bob.delete(f"/v1/rooms/{rooms[-1]}")  # a deletion of a room she is in, too
    assert status == 429 and problem["target"] == "erin", problem
    assert app.admin.get(f"/v1/rooms/{rooms[-1]}")[0] == 200  # nothing written


def test_a_member_may_always_leave_and_an_admin_always_remove_it(world):
    app, p, rids = world.app, world.people, world.rids
    bob, carol = p["bob"], p["carol"]
    path = f"/v1/rooms/{rids['bob']}/members/carol"
    for _ in range(CHANGE_BURST):
        assert bob.put(path)[0] == 200  # an add of a member already in the room counts too
    assert bob.put(path)[0] == 429
    assert bob.delete(path)[0] == 429  # so does the owner's removal, now
    assert carol.delete(path)[0] == 204  # she leaves
    assert app.admin.put(path)[0] == 200
    assert app.admin.delete(path)[0] == 204  # an admin removes her
    assert app.admin.put(path)[0] == 200
    assert bob.delete(f"/v1/rooms/{rids['bob']}")[0] == 429  # bob's deletion counts for carol, ...
    assert app.admin.delete(f"/v1/rooms/{rids['bob']}")[0] == 204  # an admin's does not


def test_with_bus_authorization_a_member_is_in_at_most_max_rooms(world):
    """Red team: a member's bus login lists every room it is in, and a member added to 8,000
    rooms could not log in any more. Past the bound an add, or a new room for its owner, is
    409 too-many-rooms, whoever makes it."""
    app, p = world.app, world.people
    limit = app.app[CHANGE_LIMIT]
    assert limit.max_rooms == 1000 and limit.rooms_in("erin") == 0
    limit.max_rooms = 3  # the bound the plugin set, made small for the test
    rooms = []
    for i in range(3):
        status, room = app.admin.post("/v1/rooms", {"name": f"r{i}"})
        assert status == 201, room
        rooms.append(room["room_id"])
        if i < 2:
            assert app.admin.put(f"/v1/rooms/{room['room_id']}/members/erin")[0] == 200
    assert p["erin"].post("/v1/rooms", {"name": "one more"})[0] == 201  # her third
    status, problem = app.admin.put(f"/v1/rooms/{rooms[2]}/members/erin")
    assert status == 409 and problem["type"].endswith("/too-many-rooms"), problem
    assert problem["target"] == "erin" and problem["max_rooms"] == 3
    status, problem = p["erin"].post("/v1/rooms", {"name": "a fourth"})
    assert status == 409 and problem["type"].endswith("/too-many-rooms"), problem
    assert app.admin.put(f"/v1/rooms/{rooms[0]}/members/erin")[0] == 200  # already in: nothing added
    assert p["erin"].delete(f"/v1/rooms/{rooms[0]}/members/erin")[0] == 204  # she leaves one
    assert app.admin.put(f"/v1/rooms/{rooms[2]}/members/erin")[0] == 200


def test_one_member_may_fill_only_a_tenth_of_another_members_rooms(world):
    """Red team: bob created rooms, added erin, and left them, free while she was off the bus,
    until she was in 990 rooms and nobody could add her to another. Now a member that is not an
    admin may put another in a tenth of the bound of its own rooms, left or not."""
    app, p = world.app, world.people
    bob, dave = p["bob"], p["dave"]
    limit = app.app[CHANGE_LIMIT]
    limit.max_rooms = 30  # the bound the plugin set, made small for the test: bob's share is 3
    rooms = bait_rooms(bob, 4)
    for rid in rooms[:3]:
        assert bob.put(f"/v1/rooms/{rid}/members/erin")[0] == 200
    assert bob.delete(f"/v1/rooms/{rooms[0]}/members/bob")[0] == 204  # bob leaves: still his room
    status, problem = bob.put(f"/v1/rooms/{rooms[3]}/members/erin")
    assert status == 409 and problem["type"].endswith("/too-many-rooms"), problem
    assert problem["detail"].startswith("erin is in 3 rooms of bob's, the most one member may put another in (3")
    assert dave.put(f"/v1/rooms/{world.rids['dave']}/members/erin")[0] == 200  # another owner
    assert app.admin.put(f"/v1/rooms/{rooms[3]}/members/erin")[0] == 200  # an admin, into bob's room
    assert p["erin"].delete(f"/v1/rooms/{rooms[1]}/members/erin")[0] == 204  # she leaves one of bob's
    assert bob.put(f"/v1/rooms/{rooms[1]}/members/erin")[0] == 409  # 3 of bob's still: rooms 0, 2 and 3


def test_concurrent_adds_cannot_pass_the_bounds_together(world):
    """A red team of the threat model: the bounds were checked on a count read before the write,
    so adds in flight at once all passed: one member put another in 159 rooms of its own, where
    the share is 100. Now a node's adds of one member go one at a time from their checks to
    their write; so do a member's new rooms (its own bound)."""
    app, p = world.app, world.people
    bob = p["bob"]
    limit = app.app[CHANGE_LIMIT]
    limit.max_rooms = 60  # the bound the plugin set, made small for the test: bob's share is 6
    rooms = bait_rooms(bob, 24)

    async def at_once(method: str, paths: list[str], body: dict | None = None) -> list[int]:
        async with aiohttp.ClientSession() as s:
            async def one(path: str) -> int:
                raw = json.dumps(body).encode() if body is not None else None
                h = sign_request(method, path, raw, keyid="bob", private_key=bob.identity.sign_key)
                if raw is not None:
                    h["Content-Type"] = "application/json"
                async with s.request(method, app.base_url + path, data=raw, headers=h) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(one(path) for path in paths))

    statuses = asyncio.run(asyncio.wait_for(at_once("PUT", [f"/v1/rooms/{r}/members/erin" for r in rooms]), 60))
    assert sorted(statuses) == [200] * 6 + [409] * 18, statuses  # the code before: 200 for most
    assert limit.rooms_in("erin") == 6

    # bob's own bound (60 rooms, of which he has 25): 40 new ones at once, 35 made
    statuses = asyncio.run(asyncio.wait_for(at_once("POST", ["/v1/rooms"] * 40, {"name": "many"}), 60))
    assert sorted(statuses) == [201] * 35 + [409] * 5, statuses
    assert limit.rooms_in("bob") == 60 and not limit._adds


def test_a_members_changes_in_one_room_do_not_hold_back_its_removal_from_another(world):
    """A review: every add of a member, even one that changed nothing, and every removal took the
    member's one lock, so another member's flood of no-op adds of it to its own room held back
    an admin's removal of it from another room (0.4 s to 3.75 s). Now a removal, and the read of
    whether an add changes anything, hold the (room, member) pair's lock; only an add that adds
    takes the member's."""
    import threading

    app, p, rids = world.app, world.people, world.rids
    limit = app.app[CHANGE_LIMIT]
    assert p["bob"].put(f"/v1/rooms/{rids['bob']}/members/erin")[0] == 200
    assert p["dave"].put(f"/v1/rooms/{rids['dave']}/members/erin")[0] == 200

    async def hold():
        release = asyncio.Event()
        taken = asyncio.Event()

        async def holder():
            async with limit.changing(rids["bob"], "erin"):  # what bob's room's adds of erin hold
                taken.set()
                await release.wait()

        task = asyncio.get_running_loop().create_task(holder())
        await taken.wait()
        return release, task

    release, task = app.run(hold())
    try:
        started = time.monotonic()
        assert p["dave"].delete(f"/v1/rooms/{rids['dave']}/members/erin")[0] == 204  # another room: at once
        assert time.monotonic() - started < 5
        answers: list[int] = []
        waiting = threading.Thread(target=lambda: answers.append(
            p["bob"].delete(f"/v1/rooms/{rids['bob']}/members/erin")[0]))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and answers == []  # the same pair: it waits for the lock
    finally:
        app.run(_release(release, task))
    waiting.join(10)
    assert answers == [204] and not limit._adds


async def _release(event, task):
    event.set()
    await task


def test_an_add_the_store_refuses_gives_its_charge_back(world):
    """An add charged, then refused by the store before it wrote anything (the room deleted
    meanwhile: 404), counts for nothing."""
    app, p, rids = world.app, world.people, world.rids
    bob = p["bob"]
    limit = app.app[CHANGE_LIMIT]
    store = app.app[STORE]
    real = store.add_room_member

    async def gone(room_id, handle, **kw):  # the room deleted between the route's read and the write
        await store.delete_room(room_id)
        return await real(room_id, handle, **kw)

    store.add_room_member = gone
    try:
        assert bob.put(f"/v1/rooms/{rids['bob']}/members/carol")[0] == 404
    finally:
        del store.add_room_member
    assert ("bob", "carol") not in limit._whole_at
    status, room = bob.post("/v1/rooms", {"name": "again"})
    assert status == 201, room
    for _ in range(CHANGE_BURST):
        assert bob.put(f"/v1/rooms/{room['room_id']}/members/carol")[0] == 200
    assert bob.put(f"/v1/rooms/{room['room_id']}/members/carol")[0] == 429


def test_concurrent_adds_and_removals_get_no_change_past_the_budget(world):
    """Red team: the first version decided from the room as read before the write whether a
    request changed anything. With PUTs and DELETEs of one member in flight at once, an add
    read as "already there" re-added a member a concurrent removal had just taken out, for
    free: 25 changes in 15 s against the 5 allowed. Now every change is charged before its
    write, whatever it turns out to change: none is made without a charge."""
    app, p, rids = world.app, world.people, world.rids
    bob = p["bob"]
    path = f"/v1/rooms/{rids['bob']}/members/carol"
    store = app.app[STORE]
    changes: list[str] = []

    def listener(change):
        if change.handle == "carol" and change.kind in ("room_member_added", "room_member_removed"):
            changes.append(change.kind)

    remove = app.run(_add_listener(store, listener))
    limit = app.app[CHANGE_LIMIT]
    charged = []
    take = limit.take

    def counted(author, targets):  # the real check, its successes counted
        tokens = take(author, targets)
        charged.extend((author, t) for t in tokens)
        return tokens

    limit.take = counted
    seconds = 4.0

    async def hammer():
        statuses: list[int] = []
        async with aiohttp.ClientSession() as s:
            async def one(method: str) -> None:
                h = sign_request(method, path, None, keyid="bob", private_key=bob.identity.sign_key)
                async with s.request(method, app.base_url + path, headers=h) as r:
                    await r.read()
                    statuses.append(r.status)

            async def worker(method: str) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await one(method)

            for _ in range(CHANGE_BURST // 2):  # the burst, spent one add and one removal at a time
                await one("PUT")
                await one("DELETE")
            await asyncio.gather(*(worker(m) for m in ("PUT", "DELETE") * 12))
        return statuses

    started = time.monotonic()
    try:
        statuses = asyncio.run(asyncio.wait_for(hammer(), 60))
    finally:
        app.run(_call(remove))
        del limit.take
    made = len(changes)
    budget = CHANGE_BURST + (time.monotonic() - started) / CHANGE_INTERVAL
    # every change was charged, and no more were made than the budget allows (charges given back,
    # for removals of a member who was not in the room, may have let more requests be charged)
    assert 429 in statuses and 0 < made <= min(len(charged), budget), (made, len(charged), budget)
    assert set(charged) == {("bob", "carol")}


async def _add_listener(store, listener):
    return store.add_listener(listener)


async def _call(fn):
    fn()


def test_a_refused_add_may_be_made_after_retry_after(world):
    """The 429 says when to try again, in Retry-After and in its detail; then the change goes through."""
    app, p, rids = world.app, world.people, world.rids
    bob = p["bob"]
    path = f"/v1/rooms/{rids['bob']}/members/carol"
    for _ in range(CHANGE_BURST):
        assert bob.put(path)[0] == 200
    request = urllib.request.Request(app.base_url + path, method="PUT", headers=sign_request(
        "PUT", path, None, keyid="bob", private_key=bob.identity.sign_key))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - the test's own daemon on loopback
    assert e.value.code == 429
    wait = int(e.value.headers["Retry-After"])
    problem = json.loads(e.value.read())
    assert 1 <= wait <= CHANGE_INTERVAL and problem["detail"].endswith(f"try again in {wait} s")
    time.sleep(wait)
    assert bob.put(path)[0] == 200
