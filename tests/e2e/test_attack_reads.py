"""Red team: what `unibus whoami`, `members` and `rooms` print is what the verified log holds.

Before this, those commands printed the server's answer as it was (the SDK checked only that it
was an object or a list): a compromised server could show a member a key the log does not hold
(``members show carol``, the record one compares with carol in person), hide a member from a room's
roster or a room from a list, or make a room look rekeyed. Each test lies in one field through
attackkit's real :class:`Proxy` in front of a real membershipd, runs the real CLI, and requires
exit 1 naming the difference, with nothing printed on stdout; the honest answers still print.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from attackkit import add, cli, new_room

from unibus.client import VerificationError
from unibus.client.keys import generate_identity


@pytest.fixture
def as_bob(proxy, tmp_path):
    """The CLI as bob (a plain member), through the compromised server, with a home of its own."""
    return lambda world: cli(proxy.url, world.people["bob"], tmp_path / "home")


def _member(world, handle: str, field: str) -> str:
    return world.people[handle].public_record()[field]


#: (command, the path whose answer is rewritten, the rewrite, what the error must name)
LIES = {
    "whoami: a swapped bus key": (
        ("whoami",), "/v1/me", lambda w, rid, doc: {**doc, "bus_pub": _member(w, "mallory", "bus_pub")},
        "bus_pub of bob: the server says"),
    "whoami: a role the log never gave": (
        ("whoami",), "/v1/me", lambda w, rid, doc: {**doc, "role": "admin"}, "role of bob: the server says 'admin'"),
    "members show: carol's encryption key swapped": (
        ("members", "show", "carol"), "/v1/members/carol",
        lambda w, rid, doc: {**doc, "enc_pub": _member(w, "mallory", "enc_pub")},
        "swapped key of carol: the server's enc_pub"),
    "members show: another member's record": (
        ("members", "show", "carol"), "/v1/members/carol",
        lambda w, rid, doc: {**doc, "handle": "mallory"}, "answered for carol with the record of 'mallory'"),
    "members show: a suite that only looks empty": (
        ("members", "show", "carol"), "/v1/members/carol", lambda w, rid, doc: {**doc, "enc_suite": 0},
        "enc_suite of carol: the server says 0"),
    "members list: a handle that is a list": (
        ("members", "list"), "/v1/members",
        lambda w, rid, doc: {"members": [*doc["members"], {**doc["members"][0], "handle": ["x"]}]},
        "ghost member ['x']"),
    "members list: mallory hidden": (
        ("members", "list"), "/v1/members",
        lambda w, rid, doc: {"members": [m for m in doc["members"] if m["handle"] != "mallory"]},
        "missing member mallory"),
    "members list: a ghost": (
        ("members", "list"), "/v1/members",
        lambda w, rid, doc: {"members": [*doc["members"], {**doc["members"][0], "handle": "eve"}]},
        "ghost member eve"),
    "rooms list: the room hidden": (
        ("rooms", "list"), "/v1/rooms",
        lambda w, rid, doc: {"rooms": [r for r in doc["rooms"] if r["room_id"] != rid]}, "missing room"),
    "rooms list: a room id that is an object": (
        ("rooms", "list"), "/v1/rooms",
        lambda w, rid, doc: {"rooms": [*doc["rooms"], {**doc["rooms"][0], "room_id": {"a": 1}}]},
        "the verified membership log has no such room"),
    "rooms list: mallory hidden from its roster": (
        ("rooms", "list"), "/v1/rooms",
        lambda w, rid, doc: {"rooms": [{**r, "members": [m for m in r["members"] if m["handle"] != "mallory"]}
                                       for r in doc["rooms"]]}, "missing member mallory"),
    "rooms show: mallory hidden from the roster": (
        ("rooms", "show", "{rid}"), "/v1/rooms/{rid}",
        lambda w, rid, doc: {**doc, "members": [m for m in doc["members"] if m["handle"] != "mallory"]},
        "missing member mallory"),
    "rooms show: an add not yet rekeyed shown as rekeyed": (
        ("rooms", "show", "{rid}"), "/v1/rooms/{rid}", lambda w, rid, doc: {**doc, "rekey_required": False},
        "rekey_required: the server says False"),
    "rooms show: another name": (
        ("rooms", "show", "{rid}"), "/v1/rooms/{rid}", lambda w, rid, doc: {**doc, "name": "payroll"},
        "name: the server says 'payroll'"),
    "rooms show: another room's record": (
        ("rooms", "show", "{rid}"), "/v1/rooms/{rid}", lambda w, rid, doc: {**doc, "room_id": "zzzz"},
        "answered for room"),
}


@pytest.fixture(scope="module")
def room(world):
    """A room of alice's with bob and mallory, rekeyed, then carol added (so rekey_required)."""
    async def make() -> str:
        rid = await new_room(world, "bob", "mallory")
        async with world.sdk("alice") as a:
            await a.add_room_member(rid, "carol")
        return rid
    return asyncio.run(make())


@pytest.mark.parametrize("lie", list(LIES))
async def test_a_read_command_refuses_an_answer_the_log_does_not_hold(world, proxy, as_bob, room, lie):
    args, path, rewrite, named = LIES[lie]
    args, path = tuple(a.format(rid=room) for a in args), path.format(rid=room)
    unibus = as_bob(world)
    honest = await unibus(*args, "--json")
    assert honest.returncode == 0 and honest.stdout, (honest.stdout, honest.stderr)
    seen: list[str] = []

    def rule(method: str, served: str, _query: str, doc: object) -> object | None:
        if method == "GET" and served == path:
            seen.append(served)
            return rewrite(world, room, doc)
        return None

    proxy.rules.append(rule)
    proc = await unibus(*args)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    # read again: a difference is a lie once the log stood still across two reads (a fresh process
    # knows the head before its first read only from that read's sync)
    assert 2 <= len(seen) <= 3, seen
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unibus: error: ")]
    assert len(errors) == 1 and named in errors[0] and "membership log does not hold" in errors[0], proc.stderr
    assert proc.stdout == ""  # nothing of the made-up answer printed


async def test_a_difference_that_is_gone_when_read_again_is_a_change_between_the_reads(world, proxy, as_bob, room):
    """A change made between the answer and the log read (honest concurrency) differs once: read again,
    the command prints what both agree on."""
    unibus = as_bob(world)
    lied: list[str] = []

    def once(method: str, served: str, _query: str, doc: object) -> object | None:
        if method == "GET" and served == f"/v1/rooms/{room}" and not lied:
            lied.append(served)
            return {**doc, "members": [m for m in doc["members"] if m["handle"] != "mallory"]}
        return None

    proxy.rules.append(once)
    proc = await unibus("rooms", "show", room)
    assert proc.returncode == 0 and lied, (proc.stdout, proc.stderr)
    assert "mallory" in proc.stdout


async def test_the_sdk_reads_are_the_servers_unless_verified(world, proxy, tmp_path, room):
    """The SDK's reads return the answer as it is by default (a caller may want the server's view);
    ``verify=True`` is what the CLI uses."""
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "name": "payroll"} if p == f"/v1/rooms/{room}" else None)
    async with world.sdk("bob", proxy.url, replica=tmp_path / "bob.log") as b:
        assert (await b.get_room(room))["name"] == "payroll"
        with pytest.raises(VerificationError, match="name: the server says 'payroll'"):
            await b.get_room(room, verify=True)
        assert {m["handle"] for m in await b.list_members(verify=True)} >= {"alice", "bob", "carol", "mallory"}
        assert (await b.me(verify=True))["handle"] == "bob"


async def test_a_change_prints_the_record_the_log_holds_not_a_made_up_answer(world, proxy, tmp_path, room):
    """`members add` and `rooms add` print the server's answer to the change: confirmed in the log is
    the signed request, not that answer. One the log does not hold is replaced by the record as
    the verified log has it (read and checked), and `rooms remove` prints only what it did."""
    unibus = cli(proxy.url, world.people["alice"], tmp_path / "home")
    dave = generate_identity("dave").public_record()
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "role": "admin", "enc_pub": _member(world, "mallory", "enc_pub")}
                       if m == "POST" and p == "/v1/members" else None)
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "members": [], "name": "payroll"}
                       if m in ("PUT", "DELETE") and p == f"/v1/rooms/{room}/members/dave" else None)
    added = await unibus("members", "add", "--handle", "dave", "--sign-pub", dave["sign_pub"], "--enc-pub",
                         dave["enc_pub"], "--bus-pub", dave["bus_pub"])
    assert added.returncode == 0 and added.stdout == "added dave (member, X25519)\n", (added.stdout, added.stderr)
    joined = await unibus("rooms", "add", room, "dave", "--json")
    assert joined.returncode == 0, joined.stderr
    record = json.loads(joined.stdout)
    assert record["name"] == "r" and {m["handle"] for m in record["members"]} >= {"alice", "bob", "dave", "mallory"}
    left = await unibus("rooms", "remove", room, "dave", "--json")
    assert left.returncode == 0 and json.loads(left.stdout) == {"room_id": room, "handle": "dave", "removed": True}


async def test_two_honest_changes_during_a_read_are_read_through(world, proxy, as_bob):
    """A review: another admin's add and rekey landing one after the other while `rooms show` was
    checked (each between an answer and the sync after it) met a check that read again only once,
    and the command blamed an honest server. A difference while the log moved is read again."""
    room = await new_room(world, "bob")  # of its own: this test rekeys it
    unibus = as_bob(world)
    steps = [lambda a: a.add_room_member(room, "dave2"), lambda a: a.rekey(room)]
    armed: list[bool] = []

    async def answer(request, _body):
        if request.method == "GET" and request.path == f"/v1/rooms/{room}":
            armed.append(True)
        elif request.method == "GET" and request.path == "/v1/log/head" and armed and steps:
            armed.clear()
            async with world.sdk("alice") as a:  # straight to the daemon: an honest change
                await steps.pop(0)(a)
        return None  # every request forwarded: the server is honest

    async with world.sdk("alice") as a:
        await add(a, generate_identity("dave2"))
    proxy.answer = answer
    proc = await unibus("rooms", "show", room, "--json")
    assert proc.returncode == 0 and not steps, (proc.stdout, proc.stderr)
    shown = json.loads(proc.stdout)
    assert "dave2" in {m["handle"] for m in shown["members"]} and shown["rekey_required"] is False


async def test_a_log_that_keeps_moving_is_an_error_that_says_so(world, proxy, as_bob):
    """Changes landing during every read: after ``CHECKED_READS`` reads the command gives up
    without blaming the server (nothing printed), and says to run it again."""
    from unibus.client.api import CHECKED_READS

    room = await new_room(world, "bob")  # of its own: this test changes its roster
    unibus = as_bob(world)
    flips = [0]

    async def answer(request, _body):
        if request.method == "GET" and request.path == "/v1/log/head" and flips[0] < 40:
            flips[0] += 1
            async with world.sdk("alice") as a:
                if flips[0] % 2:
                    await a.add_room_member(room, "carol")
                else:
                    await a.remove_room_member(room, "carol")
        return None

    proxy.answer = answer
    proc = await unibus("rooms", "show", room)
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert f"moved during each of {CHECKED_READS} reads" in proc.stderr and "does not hold" not in proc.stderr
    assert "the last one differed: " in proc.stderr  # what a server serving held entries one by one hid


async def test_a_checked_answer_carries_only_the_documented_fields(world, proxy, as_bob, room):
    """A review: fields the log does not hold rode along on a checked answer (`--json` printed a
    made-up ``"verified_in_person": true``, and a signing key in each roster entry). A checked read
    returns the documented fields only."""
    unibus = as_bob(world)
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "verified_in_person": True} if p == "/v1/members/carol"
                       else None)
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "members": [{**e, "sign_pub": "AAAA"} for e in doc["members"]]}
                       if p == f"/v1/rooms/{room}" else None)
    member = await unibus("members", "show", "carol", "--json")
    assert member.returncode == 0 and "verified_in_person" not in json.loads(member.stdout), member.stderr
    shown = await unibus("rooms", "show", room, "--json")
    assert shown.returncode == 0, shown.stderr
    assert all(set(m) == {"handle", "enc_pub", "enc_suite"} for m in json.loads(shown.stdout)["members"])


async def test_a_room_whose_roster_is_empty_is_not_shown_a_made_up_one(world, proxy, tmp_path):
    """A review: a ``members`` that is not a list passed as an empty roster, for a room whose log
    roster is empty (its owner left), and `--json` printed it."""
    async with world.sdk("carol") as c:
        rid = (await c.create_room("left"))["room_id"]
        await c.remove_room_member(rid, "carol")
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "members": {"mallory": "in the room"}}
                       if p == f"/v1/rooms/{rid}" else None)
    proc = await cli(proxy.url, world.people["alice"], tmp_path / "home")("rooms", "show", rid, "--json")
    assert proc.returncode == 1 and "members: not a list" in proc.stderr and proc.stdout == "", proc.stderr


async def test_members_add_prints_the_role_and_suite_the_log_holds(world, proxy, tmp_path):
    """A review: an answer without ``enc_suite`` printed "added dave (member, None)"."""
    dave = generate_identity("dave3").public_record()
    proxy.rules.append(lambda m, p, _q, doc: {k: v for k, v in doc.items() if k != "enc_suite"}
                       if m == "POST" and p == "/v1/members" else None)
    proc = await cli(proxy.url, world.people["alice"], tmp_path / "home")(
        "members", "add", "--handle", "dave3", "--sign-pub", dave["sign_pub"], "--enc-pub", dave["enc_pub"],
        "--bus-pub", dave["bus_pub"])
    assert proc.returncode == 0 and proc.stdout == "added dave3 (member, X25519)\n", (proc.stdout, proc.stderr)


async def test_a_changes_answer_carries_only_the_documented_fields(world, proxy, tmp_path):
    """A second review: `members add --json` printed made-up fields of an answer that otherwise
    agreed with the log (as the reads did before); `rooms create` and `rooms add` alike."""
    dave = generate_identity("dave4").public_record()
    extra = {"verified_in_person": True}
    proxy.rules.append(lambda m, p, _q, doc: {**doc, **extra} if m in ("POST", "PUT") else None)
    unibus = cli(proxy.url, world.people["alice"], tmp_path / "home")
    added = await unibus("members", "add", "--handle", "dave4", "--sign-pub", dave["sign_pub"], "--enc-pub",
                         dave["enc_pub"], "--bus-pub", dave["bus_pub"], "--json")
    assert added.returncode == 0 and json.loads(added.stdout)["handle"] == "dave4", added.stderr
    made = await unibus("rooms", "create", "extra", "--json")
    assert made.returncode == 0, made.stderr
    rid = json.loads(made.stdout)["room_id"]
    joined = await unibus("rooms", "add", rid, "dave4", "--json")
    assert joined.returncode == 0, joined.stderr
    for proc in (added, made, joined):
        assert "verified_in_person" not in proc.stdout, proc.stdout
