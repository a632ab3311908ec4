"""Red team e2e-r5: the threat model's claims, each tried as a statement to falsify.

Uses attackkit's module world (a real membershipd with a real nats-server and SQLite; alice
admin, bob, carol, mallory) and its real aiohttp :class:`Proxy` (the compromised server). Each
test asserts the safe behaviour; each was a claim of docs/operations.md's threat model that the
code before did not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from attackkit import cli, new_room

from unibus.client import VerificationError
from unibus.client.keys import generate_identity, save_identity


#: What a server answers a request it refused before serving it (replay protection unavailable).
UNAVAILABLE = (503, {"type": "https://unibus.dev/problems/nonce-store-unavailable", "title": "Service Unavailable",
                     "status": 503, "detail": "replay protection is unavailable; try again"})


def _drop(method: str, marker: str, status: int = 200):
    """A compromised server's answer: ``status`` to every ``method`` whose path holds ``marker``,
    never forwarded (so never made, never logged)."""
    dropped: list[str] = []

    def answer(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == method and marker in request.path:
            dropped.append(request.path)
            return status, {}
        return None

    return answer, dropped


async def test_a_removal_the_server_answers_but_drops_is_refused_and_never_sealed_to(world, proxy, tmp_path):
    """The threat model: a compromised server "cannot drop log entries without clients noticing",
    and "cannot make a client seal a room key to an attacker". A red team's server answered the
    owner's removal of bob 200 and dropped it: the SDK returned, the CLI said "removed bob", exit
    0, and the owner's next rekey sealed the new key to bob (still in the log), who opened it.
    Now a membership change answered 2xx must be in the verified log as this very request (its
    signer and nonce), or the client raises VerificationError (the CLI exits 1)."""
    rid = await new_room(world, "bob", "carol")
    proxy.answer, dropped = _drop("DELETE", "/members/")
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(VerificationError, match="does not hold that request"):
            await a.remove_room_member(rid, "bob")
        assert "bob" in a.verified.rooms[rid].members  # the log still has him: the client says so
        with pytest.raises(VerificationError, match="does not hold that request"):
            await a.remove_member("bob")
    assert dropped == [f"/v1/rooms/{rid}/members/bob", "/v1/members/bob"]

    # The CLI: exit 1 with one line, never "removed bob".
    proc = await cli(proxy.url, world.people["alice"], tmp_path / "home")("rooms", "remove", rid, "bob")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "removed" not in proc.stdout and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unibus: error: ")]
    assert len(errors) == 1 and "does not hold that request" in errors[0], proc.stderr


@pytest.mark.parametrize("change", ["room.create", "room.member_add", "member.role", "member.bus_key"])
async def test_every_membership_change_is_confirmed_in_the_log(world, proxy, tmp_path, change):
    """The same for every route the log records (a keys upload is checked by rekey itself): an
    answer the server made up, without the change, is a VerificationError, never a success."""
    rid = await new_room(world, rekey=False)
    method, marker, call = {
        "room.create": ("POST", "/v1/rooms", lambda a: a.create_room("made-up")),
        "room.member_add": ("PUT", "/members/carol", lambda a: a.add_room_member(rid, "carol")),
        "member.role": ("PATCH", "/v1/members/mallory", lambda a: a.set_role("mallory", "member")),
        "member.bus_key": ("PUT", "/v1/me/bus-key", lambda a: a.set_bus_key(world.people["alice"].bus_pub)),
    }[change]
    answers = {"room.create": {"room_id": "abcdefghijklmnopqrstuvwx", "name": "made-up"}}
    dropped: list[str] = []

    def answer(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == method and request.path.endswith(marker):
            dropped.append(request.path)
            return 201 if method == "POST" else 200, answers.get(change, {})
        return None

    proxy.answer = answer
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(VerificationError, match="does not hold that request"):
            await call(a)
    assert len(dropped) == 1, dropped

    # and through an honest server, the same calls return (the log holds them, no-ops included)
    proxy.answer = None
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        await call(a)
        await call(a)


async def test_a_send_right_after_the_same_clients_removal_never_uses_the_removed_members_key(world):
    """The threat model: "clients never send on a room that is rekey_required (they rekey first),
    so nothing new is encrypted under a key it holds". A red team's owner sent on its bus, removed
    bob through the same client, and sent again within key_ttl (1 s by default): the bus's cached
    epoch was bob's, and bob opened the message with the key he had. Now any entry the client
    verified since (its own removal's, confirmed in the log) ends the cached epoch."""
    rid = await new_room(world, "bob", "carol")
    async with world.sdk("alice") as a, a.bus(key_ttl=60.0) as bus:
        first = await bus.send(rid, "chat", "before the removal")
        await a.remove_room_member(rid, "bob")
        second = await bus.send(rid, "chat", "after the removal: not for bob")
        assert second > first  # the code before: the same epoch, bob's
        assert "bob" not in a.verified.rooms[rid].members
        third = await bus.send(rid, "chat", "and again, cached")
        assert third == second


async def test_a_change_refused_before_served_is_resent_as_it_was_never_signed_again(world, proxy, tmp_path):
    """A review: the proxy answered the first try of alice's add of bob 503 (replay protection
    unavailable: refused before served) and kept it; the client signed a second request, which
    was logged and confirmed. Once alice had removed bob (confirmed too), the proxy sent the kept
    first try on: a valid request, a fresh nonce, 200, and bob was back in the log, signed by
    alice, for her next rekey to seal to. Now a change's retry is the same signed request: the
    kept one is the one that was served, and it is refused as a replay."""
    rid = await new_room(world, "carol")
    tries: list[dict[str, str]] = []

    def hold_first(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path == f"/v1/rooms/{rid}/members/bob":
            tries.append({k: v for k, v in request.headers.items()
                          if k.lower() in ("signature", "signature-input", "content-digest")})
            if len(tries) == 1:
                return UNAVAILABLE
        return None

    proxy.answer = hold_first
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        await a.add_room_member(rid, "bob")
        await a.remove_room_member(rid, "bob")
    assert len(tries) == 2 and tries[0] == tries[1]  # the code before: a second nonce
    async with aiohttp.ClientSession() as s:  # the kept first try, sent on after the removal
        async with s.put(world.daemon.base_url + f"/v1/rooms/{rid}/members/bob", headers=tries[0]) as r:
            assert r.status == 401, await r.text()
    async with world.sdk("alice") as a:
        assert "bob" not in (await a.sync()).rooms[rid].members


async def test_a_room_creation_is_the_room_the_log_says_it_made(world, proxy, tmp_path):
    """A review: the proxy made alice's room, then answered with the id of mallory's room (keyed,
    alice in it): the SDK returned it and `unibus rooms create` printed it, so alice's next adds
    and rekeys went to a room mallory reads. Now the answer must name the room the log says
    this very request made."""
    trap = await new_room(world, "mallory")

    def swap(method: str, path: str, _query: str, doc: object) -> object | None:
        if method == "POST" and path == "/v1/rooms" and isinstance(doc, dict):
            return {**doc, "room_id": trap}
        return None

    proxy.rules.append(swap)
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(VerificationError, match=f"answered a room creation with room '{trap}'"):
            await a.create_room("secret plans")
    proxy.rules.clear()
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        made = await a.create_room("secret plans")
        assert a.verified.rooms[made["room_id"]].owner == "alice"


async def test_an_admin_that_deletes_itself_is_not_refused_for_the_log_it_can_no_longer_read(world):
    """A review: the confirmation's sync after `DELETE /v1/members/<self>` got 401 (no longer a
    member): VerificationError for a deletion that was made. A member's deletion of itself is
    made on a verified log, and not confirmed after."""
    leaver = generate_identity("leaver")
    async with world.sdk("alice") as a:
        r = leaver.public_record()
        await a.add_member("leaver", r["sign_pub"], r["enc_pub"], r["enc_suite"], role="admin", bus_pub=r["bus_pub"])
    async with world.sdk("leaver", identity=leaver) as me:
        await me.remove_member("leaver")
    async with world.sdk("alice") as a:
        assert "leaver" not in (await a.sync()).members


async def test_a_change_that_cannot_be_confirmed_for_now_is_an_unknown_outcome_not_a_forgery(world, proxy, tmp_path):
    """CI, a cluster under faults: the confirming sync of a change that was made got 503 (the node's
    nonce store unavailable), and the client raised VerificationError, as for a server that drops
    changes. A 503 or no answer there leaves the outcome unknown, as a timeout does: the client
    says so with the 503 (ServerUnreachable), never reports a success, and never calls it forged."""
    from unibus.client import ApiError

    rid = await new_room(world, rekey=False)
    made: list[str] = []

    def unavailable_after(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT":
            made.append(request.path)
        elif made and request.path.startswith("/v1/log"):
            return UNAVAILABLE
        return None

    proxy.answer = unavailable_after
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(ApiError) as e:
            await a.add_room_member(rid, "carol")
    assert e.value.status == 503 and "could not be confirmed in the membership log" in e.value.detail
    assert made == [f"/v1/rooms/{rid}/members/carol"]


async def test_a_resent_change_that_is_refused_says_so(world, proxy, tmp_path):
    """A review: a change refused before it was served (503) and resent as it was signed could be
    refused in turn (401: its created too old for a small --auth-skew, or its nonce claimed before
    the 503), and the user saw a bare 401 "signature expired". The 401 says what happened."""
    from unibus.client import ApiError

    rid = await new_room(world, rekey=False)
    tries: list[str] = []

    def refuse_twice(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT":
            tries.append(request.headers["Signature-Input"])
            if len(tries) == 1:
                return UNAVAILABLE
            return 401, {"type": "https://unibus.dev/problems/invalid-signature", "title": "Unauthorized",
                         "status": 401, "detail": "signature expired (created is too old)"}
        return None

    proxy.answer = refuse_twice
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(ApiError) as e:
            await a.add_room_member(rid, "carol")
    assert e.value.status == 401 and len(tries) == 2 and tries[0] == tries[1]
    assert "refused before it was served (503) and resent as it was signed" in e.value.detail
    assert "signature expired" in e.value.detail and "then run it again" in e.value.detail


async def test_a_failed_add_the_server_kept_and_appended_after_the_removal_is_never_sealed_to(
        world, proxy, tmp_path, monkeypatch):
    """A review: the proxy kept alice's add of bob and answered it 500; she ran it again (made,
    confirmed), later removed bob (confirmed), and the proxy sent the kept add on: 200, a valid
    request of hers, and bob was back in the log, so her next rekey sealed to him. The log cannot
    refuse it (its order rule allows 2 x 600 s), but her add was signed before her removal and is
    logged after it: a rekey refuses to seal to such a member, naming both entries. (The margin
    between one author's requests, 30 s, is made 0 here, so that the test need not wait.) The
    failed add is made by another client of hers, with no replica of its own, so that this one
    does not know it gave up on it (the next tests)."""
    from unibus import memberlog
    from unibus.client import ApiError

    monkeypatch.setattr(memberlog, "HELD_BACK_MARGIN", 0)
    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []

    def keep_first(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path.endswith("/members/bob") and not kept:
            kept.append({k: v for k, v in request.headers.items()
                         if k.lower() in ("signature", "signature-input", "content-digest")})
            return 500, {"type": "about:blank", "title": "Internal Server Error", "status": 500}
        return None

    proxy.answer = keep_first
    async with world.sdk("alice", proxy.url) as elsewhere:
        with pytest.raises(ApiError):
            await elsewhere.add_room_member(rid, "bob")
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        await a.add_room_member(rid, "bob")  # run again: made and confirmed
        await asyncio.sleep(1.2)  # the removal is signed a second later than the kept add
        await a.remove_room_member(rid, "bob")
        async with aiohttp.ClientSession() as s:  # the kept add, sent on after the removal
            async with s.put(world.daemon.base_url + f"/v1/rooms/{rid}/members/bob", headers=kept[0]) as r:
                assert r.status == 200, await r.text()
        with pytest.raises(VerificationError, match=r"bob is in it by an add \(seq \d+\) signed \d+ s or more before"):
            await a.rekey(rid)  # the code before: sealed to bob
        await a.remove_room_member(rid, "bob")  # removed again: the rekey goes on without him
        await a.rekey(rid)
        assert "bob" not in a.verified.rooms[rid].members


def _keep_first_add(kept: list[dict[str, str]], handle: str):
    """A compromised server's answer: the first PUT of ``handle`` into a room is kept (its signed
    headers) and answered 500, never forwarded; the rest go through."""

    def answer(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path.endswith(f"/members/{handle}") and not kept:
            kept.append({k: v for k, v in request.headers.items()
                         if k.lower() in ("signature", "signature-input", "content-digest")})
            return 500, {"type": "about:blank", "title": "Internal Server Error", "status": 500}
        return None

    return answer


async def _send_kept(world, rid: str, handle: str, headers: dict[str, str]) -> None:
    """The compromised server sends a kept add on to membershipd, which serves it (fresh, unseen)."""
    async with aiohttp.ClientSession() as s:
        async with s.put(world.daemon.base_url + f"/v1/rooms/{rid}/members/{handle}", headers=headers) as r:
            assert r.status == 200, await r.text()


async def test_an_add_the_client_gave_up_on_appended_within_seconds_of_its_removal_is_never_sealed_to(
        world, proxy, tmp_path):
    """The rule of the test above needs 30 s between the kept add and its author's removal, so a
    server that appended a failed add within those 30 s put the member back for the next rekey (a
    documented gap of stop 38). A client now remembers each change it gave up on (in its replica):
    logged after a request it signed later, the change was held back, whatever the seconds between.
    No margin is patched here, and the removal follows the failed add at once."""
    from unibus.client import ApiError

    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "bob")
    notices: list[str] = []
    async with _client(world, proxy, tmp_path, "alice", notice=notices.append) as a:
        with pytest.raises(ApiError):
            await a.add_room_member(rid, "bob")
        await a.add_room_member(rid, "bob")  # run again: made and confirmed
        await a.remove_room_member(rid, "bob")
        await _send_kept(world, rid, "bob", kept[0])
        with pytest.raises(VerificationError, match="bob is in it by an add .* that alice's client had not seen confirmed"):
            await a.rekey(rid)  # the code before: sealed to bob
        assert [n for n in notices if "held it back" in n and "room.member_add" in n], notices
        await a.remove_room_member(rid, "bob")  # removed again: the rekey goes on without him
        await a.rekey(rid)
        assert "bob" not in a.verified.rooms[rid].members


async def test_the_cli_remembers_a_change_it_gave_up_on_across_commands(world, proxy, tmp_path):
    """The same through the CLI, one process per command: the failed add is remembered in the
    replica's state.json, and a later command's rekey refuses, exit 1, naming it."""
    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "mallory")
    home = tmp_path / "home"
    unibus = cli(proxy.url, world.people["alice"], home)
    failed = await unibus("rooms", "add", rid, "mallory")
    assert failed.returncode == 1 and len(kept) == 1, (failed.stdout, failed.stderr)
    states = list((home / "alice.json.log").glob("*/state.json"))
    assert len(states) == 1 and '"process": null' in states[0].read_text()  # given up on, remembered
    proc = await _put_back_then_rekey(world, unibus, rid, kept[0])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "held it back" in proc.stderr  # the sync's notice
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unibus: error: ")]
    assert len(errors) == 1 and "mallory is in it by an add" in errors[0] and "had not seen confirmed" in errors[0], proc.stderr
    shown = await unibus("log", "show")  # says so for as long as it holds
    assert shown.returncode == 0, shown.stderr
    held = [line for line in shown.stdout.splitlines() if line.startswith("held back: ")]
    assert len(held) == 2 and "alice's room.member_add" in held[0] and "mallory is in room" in held[1], shown.stdout


async def test_a_change_given_up_on_that_an_honest_server_made_is_no_alarm(world, proxy, tmp_path):
    """An honest server whose answer was lost (the change made and logged, the client told 502):
    the client reads the log right after giving up, finds the change there, says it was made after
    all, and forgets it; nothing is flagged, and the next change and rekey go on."""
    from unibus.client import ApiError

    rid = await new_room(world, "carol", rekey=False)
    lost: list[int] = []

    async def lose_the_answer(request: web.Request, body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path.endswith("/members/bob") and not lost:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("signature", "signature-input", "content-digest")}
            async with aiohttp.ClientSession() as s:
                async with s.put(world.daemon.base_url + request.path, headers=headers) as r:
                    lost.append(r.status)
            return 502, {"type": "about:blank", "title": "Bad Gateway", "status": 502}
        return None

    proxy.answer = lose_the_answer
    notices: list[str] = []
    async with _client(world, proxy, tmp_path, "alice", notice=notices.append) as a:
        with pytest.raises(ApiError):
            await a.add_room_member(rid, "bob")
        assert lost == [200] and a.replica.in_doubt == {}
        assert [n for n in notices if "failed, but the membership log" in n and "the change was made" in n], notices
        await a.remove_room_member(rid, "bob")
        assert a.verified.kept_back == {}
        await a.rekey(rid)
    assert not [n for n in notices if "held it back" in n], notices
    assert '"changes"' not in next((tmp_path / "alice.log").glob("*/state.json")).read_text()


@pytest.mark.parametrize("lie", ["name", "owner", "members", "epoch", "subject"])
async def test_a_room_creation_answer_is_what_the_log_holds_for_a_new_room(world, proxy, tmp_path, lie):
    """A review (stop 38): with the right room id, a made-up name, owner or roster in a creation's
    answer was returned by the SDK and printed by `unibus rooms create`. The answer must now be
    what the log holds for a new room, else VerificationError naming the difference (exit 1); an
    honest server's answer passes (the tests before)."""
    made_up = {"name": "payroll", "owner": "mallory", "epoch": 7, "subject": "unibus.room.zzzz",
               "members": [{"handle": "mallory", "enc_pub": world.people["mallory"].enc_pub_b64,
                            "enc_suite": "X25519"}]}

    def rewrite(method: str, path: str, _query: str, doc: object) -> object | None:
        if method == "POST" and path == "/v1/rooms" and isinstance(doc, dict):
            return {**doc, lie: made_up[lie]}
        return None

    proxy.rules.append(rewrite)
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        with pytest.raises(VerificationError, match=f"{lie}: the server says"):
            await a.create_room("ops")


async def test_another_authors_add_kept_and_appended_after_the_owners_removal_is_never_sealed_to(
        world, proxy, tmp_path, monkeypatch):
    """Stop 38's open list: the rule of the tests above took only the add's own author's removals,
    so an admin's add that the server kept (answered 500) and appended after the owner's removal
    brought the member back for the owner's next rekey. Any removal the log holds earlier now
    counts, by whoever made it (the margin, 30 s, made 0 here so that the test need not wait)."""
    from unibus import memberlog
    from unibus.client import ApiError

    monkeypatch.setattr(memberlog, "HELD_BACK_MARGIN", 0)
    rid = await _carols_room(world, "bob")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "bob")
    async with world.sdk("alice", proxy.url) as admin:  # an admin's add of bob, kept by the server
        with pytest.raises(ApiError):
            await admin.add_room_member(rid, "bob")
    await asyncio.sleep(1.2)  # the owner's removal is signed a second later
    async with world.sdk("carol", proxy.url, replica=tmp_path / "carol.log") as c:
        await c.remove_room_member(rid, "bob")
        await _send_kept(world, rid, "bob", kept[0])
        with pytest.raises(VerificationError, match=r"bob is in it by an add \(seq \d+\) signed \d+ s or more before a "
                                                    r"removal of bob"):
            await c.rekey(rid)  # the code before: sealed to bob
        await c.remove_room_member(rid, "bob")
        await c.rekey(rid)
        assert "bob" not in c.verified.rooms[rid].members


def _hold_first_add(kept: list[dict[str, str]], handle: str, release: asyncio.Event):
    """A compromised server's answer: the first PUT of ``handle`` into a room is kept and held
    (never forwarded) until ``release`` (30 s at most), then answered 500."""

    async def answer(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path.endswith(f"/members/{handle}") and not kept:
            kept.append({k: v for k, v in request.headers.items()
                         if k.lower() in ("signature", "signature-input", "content-digest")})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 30)
            return 500, {"type": "about:blank", "title": "Internal Server Error", "status": 500}
        return None

    return answer


def _client(world, proxy, tmp_path, handle: str, *, notice=None, timeout: float = 15):
    """``handle``'s SDK client through the compromised server, with a replica of its own in ``tmp_path``."""
    from unibus.client import UnibusClient

    return UnibusClient(proxy.url, world.people[handle], replica_root=tmp_path / f"{handle}.log",
                        notice=notice or (lambda _t: None), timeout=timeout)


async def _carols_room(world, *handles: str) -> str:
    """A room of carol's (its owner), with ``handles`` in it, keyed."""
    async with world.sdk("carol") as c:
        rid = (await c.create_room("carols"))["room_id"]
        for h in handles:
            await c.add_room_member(rid, h)
        await c.rekey(rid)
    return rid


async def _put_back_then_rekey(world, unibus, rid: str, kept: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Through the CLI (``unibus(*args)``): mallory added again and removed (both confirmed), the
    kept add of mallory appended by the compromised server, then ``rooms rekey``; its result."""
    for args in (("rooms", "add", rid, "mallory"), ("rooms", "remove", rid, "mallory")):
        done = await unibus(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    await _send_kept(world, rid, "mallory", kept)
    return await unibus("rooms", "rekey", rid)


async def _reached(kept: list[dict[str, str]]) -> None:
    """Wait (20 s at most) until the held request has reached the compromised server."""
    for _ in range(400):
        if kept:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the request never reached the server")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_a_cli_killed_while_its_change_is_held_has_given_it_up(world, proxy, tmp_path, sig):
    """A review: the record of a change given up on was written when the command failed, so a CLI
    killed while the server held its add (SIGTERM from `timeout` or systemd, SIGHUP from a closed
    terminal, SIGKILL) recorded nothing, and the attack of the tests above worked again: mallory
    opened the next key. The change is now recorded before it is sent; SIGTERM and SIGHUP cancel
    the command as Ctrl-C does (exit 143, 129), and a process that ended with a change in flight
    gave it up (the next command finds its process gone)."""
    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    release = asyncio.Event()
    proxy.answer = _hold_first_add(kept, "mallory", release)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    identity = save_identity(world.people["alice"], home / "alice.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    argv = [sys.executable, "-m", "unibus.client.cli", "--server", proxy.url, "--identity", str(identity)]
    proc = await asyncio.create_subprocess_exec(*argv, "rooms", "add", rid, "mallory", env=env,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        await _reached(kept)
        proc.send_signal(sig)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        release.set()
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143), err
    assert b"Traceback" not in err

    async def unibus(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [*argv, *args], capture_output=True, text=True, env=env,
                                       timeout=60, stdin=subprocess.DEVNULL, check=False)

    rekey = await _put_back_then_rekey(world, unibus, rid, kept[0])
    assert rekey.returncode == 1, (rekey.stdout, rekey.stderr)
    assert "mallory is in it by an add" in rekey.stderr and "had not seen confirmed" in rekey.stderr, rekey.stderr


async def test_a_change_held_while_the_same_client_made_a_later_one_is_caught(world, proxy, tmp_path):
    """A review: an add in flight (held by the server) while another task of the same client removed
    the member; the server appended the add after the removal, then answered it 500. The add was
    given up on after the removal was signed, so it was not "before" it, and its record was
    forgotten as settled. A change given up on is now compared with its own `created`, and a record
    in flight is kept until its outcome is known."""
    from unibus.client import ApiError

    rid = await new_room(world, "bob", "carol")
    kept: list[dict[str, str]] = []
    release = asyncio.Event()
    proxy.answer = _hold_first_add(kept, "bob", release)
    async with _client(world, proxy, tmp_path, "alice") as a:
        add = asyncio.create_task(a.add_room_member(rid, "bob"))
        try:
            await _reached(kept)
            await a.remove_room_member(rid, "bob")
            await _send_kept(world, rid, "bob", kept[0])
        finally:
            release.set()
        with pytest.raises(ApiError):
            await add
        with pytest.raises(VerificationError, match="bob is in it by an add .* that alice's client had not seen confirmed"):
            await a.rekey(rid)  # the code before: sealed to bob


async def test_a_key_another_member_sealed_to_a_member_put_back_is_never_sent_with(world, proxy, tmp_path):
    """A review: alice's client refused to rekey to bob, put back by her add that the server kept;
    carol, the owner, whose client cannot know it, rekeyed (sealing to bob), and alice's next send
    used carol's key, which bob holds. A send (and a blob upload) refuses the room's key while a
    member put back that way is in the room."""
    from unibus.client import ApiError

    rid = await _carols_room(world, "alice")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "bob")
    async with _client(world, proxy, tmp_path, "alice") as a:
        with pytest.raises(ApiError):
            await a.add_room_member(rid, "bob")
        await a.add_room_member(rid, "bob")
        await a.remove_room_member(rid, "bob")
        await _send_kept(world, rid, "bob", kept[0])
        async with world.sdk("carol") as c:
            epoch = await c.rekey(rid)  # carol's client knows nothing of alice's: it seals to bob
            assert "bob" in c.verified.rooms[rid].members
        with pytest.raises(VerificationError, match="bob is in it by an add"):
            await a.current_key(rid)  # the code before: carol's key of `epoch`
        async with a.bus() as bus:
            with pytest.raises(VerificationError, match="bob is in it by an add"):
                await bus.send(rid, "t", b"for the room only")
    assert epoch >= 2


async def test_a_change_still_in_flight_that_the_log_holds_after_a_later_one_is_refused(world, proxy, tmp_path):
    """A second review: while the server still held alice's add (no answer yet), she added and
    removed the member again, the server appended the held add, and her next rekey sealed to the
    member: only a change given up on was taken for held back. A change in flight counts too."""

    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    release = asyncio.Event()
    proxy.answer = _hold_first_add(kept, "bob", release)
    notices: list[str] = []
    async with _client(world, proxy, tmp_path, "alice", notice=notices.append, timeout=40) as a:
        add = asyncio.create_task(a.add_room_member(rid, "bob"))
        try:
            await _reached(kept)
            await a.add_room_member(rid, "bob")
            await a.remove_room_member(rid, "bob")
            await _send_kept(world, rid, "bob", kept[0])  # appended; its answer still held
            with pytest.raises(VerificationError, match="bob is in it by an add .* still in flight"):
                await a.rekey(rid)  # the code before: sealed to bob
            # no notice while it is in flight (an honest server may log two in flight out of order)
            assert not [n for n in notices if "held it back" in n], notices
        finally:
            release.set()
            with contextlib.suppress(Exception):
                await add
        assert [n for n in notices if "held it back" in n], notices  # told once given up on
        with pytest.raises(VerificationError, match="bob is in it by an add"):
            await a.rekey(rid)


async def test_a_clock_stepped_back_does_not_hide_a_kept_change(world, proxy, tmp_path, monkeypatch):
    """A second review: after a failed add, the clock stepped back 5 s (NTP, a VM resumed); the
    re-add and the removal were signed "before" the kept add, which was then not taken for held
    back. A change is now signed after every change of the identity still in doubt."""
    import time as time_module

    from unibus.client import ApiError

    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "bob")
    async with _client(world, proxy, tmp_path, "alice") as a:
        with pytest.raises(ApiError):
            await a.add_room_member(rid, "bob")
        real = time_module.time
        monkeypatch.setattr(time_module, "time", lambda: real() - 5)
        await a.add_room_member(rid, "bob")
        await a.remove_room_member(rid, "bob")
        monkeypatch.setattr(time_module, "time", real)
        await _send_kept(world, rid, "bob", kept[0])
        with pytest.raises(VerificationError, match="bob is in it by an add"):
            await a.rekey(rid)


async def test_a_failed_change_appended_later_with_no_later_one_is_refused(world, proxy, tmp_path):
    """A second review: alice was told her add failed and changed nothing after; the server
    appended the kept add later, and her next send rekeyed to the member without a word. The
    client reads the log right after giving up; a change the log holds after that was appended
    after the failure was reported."""
    from unibus.client import ApiError

    rid = await _carols_room(world)  # carol's requests are the ones compared
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "mallory")
    async with _client(world, proxy, tmp_path, "carol") as c:
        with pytest.raises(ApiError):
            await c.add_room_member(rid, "mallory")
        await _send_kept(world, rid, "mallory", kept[0])
        with pytest.raises(VerificationError, match="mallory is in it by an add .* the log as carol.s client read it once it gave up on it"):
            await c.current_key(rid)  # what a send does first; the code before: rekeyed to mallory


async def test_a_member_who_cannot_remove_is_told_who_can(world, proxy, tmp_path, monkeypatch):
    """A second review: a plain member's send was refused with "remove bob again", which it may
    not do (403). It is told who may."""
    from unibus import memberlog
    from unibus.client import ApiError

    monkeypatch.setattr(memberlog, "HELD_BACK_MARGIN", 0)
    rid = await new_room(world, "carol")
    kept: list[dict[str, str]] = []
    proxy.answer = _keep_first_add(kept, "bob")
    async with world.sdk("alice", proxy.url) as elsewhere:
        with pytest.raises(ApiError):
            await elsewhere.add_room_member(rid, "bob")
    await asyncio.sleep(1.2)
    async with world.sdk("alice") as a:
        await a.add_room_member(rid, "bob")
        await a.remove_room_member(rid, "bob")
    await _send_kept(world, rid, "bob", kept[0])
    async with world.sdk("carol") as c:
        with pytest.raises(VerificationError, match="ask alice to remove bob from room"):
            await c.current_key(rid)


async def test_a_failed_change_whose_give_up_read_fails_is_still_caught(world, proxy, tmp_path):
    """A third review: the server answered the add 500, then failed the client's read of the log
    right after (500), so no head was recorded; it appended the add later, and carol's next send
    rekeyed to mallory without a word. Without that read, the head verified before sending stands
    in: any entry of the change is taken for held back."""
    from unibus.client import ApiError

    rid = await _carols_room(world)
    kept: list[dict[str, str]] = []
    keep = _keep_first_add(kept, "mallory")
    reads_failed: list[str] = []
    appended: list[bool] = []

    def answer(request: web.Request, body: bytes) -> tuple[int, object] | None:
        if kept and not appended and request.path == "/v1/log/head":  # every read until it is appended
            reads_failed.append(request.path)
            return 500, {"type": "about:blank", "title": "Internal Server Error", "status": 500}
        return keep(request, body)

    proxy.answer = answer
    async with _client(world, proxy, tmp_path, "carol") as c:
        with pytest.raises(ApiError):
            await c.add_room_member(rid, "mallory")
        assert reads_failed  # read twice now, a second apart (once before)
        appended.append(True)
        await _send_kept(world, rid, "mallory", kept[0])
        with pytest.raises(VerificationError, match="mallory is in it by an add"):
            await c.current_key(rid)  # the code before: rekeyed to mallory


async def test_created_follows_changes_in_flight_only_a_little_and_within_the_servers_skew(world, tmp_path):
    """A third review: every change in flight or given up on pushed the next one's `created` a
    second further, up to 30 s ahead, and a stream of changes to a server with a small
    --auth-skew was refused (401, in the future). Now only changes in flight count, at most 2 s
    ahead, and never past the skew the server reported."""
    async with world.sdk("alice", replica=tmp_path / "alice.log") as a:
        now = int(time.time())
        for i in range(10):
            await a.replica.begin_change("alice", f"in-flight-{i:08d}", now + i)
        assert a._change_created() <= int(time.time()) + 2
        a.replica.server_skew = 2
        assert a._change_created() <= int(time.time()) + 1
        for i in range(10):
            await a.replica.give_up("alice", f"in-flight-{i:08d}", None)
        assert a._change_created() <= int(time.time()) + 0  # given up on: the head read decides


async def test_a_change_cancelled_while_its_failure_is_read_is_given_up(world, proxy, tmp_path):
    """A fourth review: the server answered the add 500 and failed the first read of the log after
    it, and the caller cancelled the task during the second second's wait (an SDK timeout): the
    change stayed "in flight" in a live process, and current_key rekeyed to mallory silently. A
    cancellation there still gives the change up, with the head before sending."""
    from unibus.client import ApiError

    rid = await _carols_room(world)
    kept: list[dict[str, str]] = []
    keep = _keep_first_add(kept, "mallory")
    failed_reads: list[str] = []

    def answer(request: web.Request, body: bytes) -> tuple[int, object] | None:
        if kept and not failed_reads and request.path == "/v1/log/head":
            failed_reads.append(request.path)
            return 500, {"type": "about:blank", "title": "Internal Server Error", "status": 500}
        return keep(request, body)

    proxy.answer = answer
    async with _client(world, proxy, tmp_path, "carol") as c:
        add = asyncio.create_task(c.add_room_member(rid, "mallory"))
        for _ in range(200):  # the add failed and the first read too: the client waits a second
            if failed_reads:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        add.cancel()
        with pytest.raises((asyncio.CancelledError, ApiError)):
            await add
        assert all(change.process is None for change in c.replica._changes.values()), c.replica._changes
        await _send_kept(world, rid, "mallory", kept[0])
        with pytest.raises(VerificationError, match="mallory is in it by an add"):
            await c.current_key(rid)  # the code before: rekeyed to mallory


async def test_an_honest_add_whose_log_cannot_be_read_after_it_is_refused_until_removed_and_added_again(
        world, proxy, tmp_path):
    """The honest case the rules meet, as documented: the server made the add, but the log could
    not be read to confirm it, nor twice after (a node under faults answers 503): the outcome is
    unknown, so the change is given up with the head before sending, and the log holding it is
    taken for held back. The way out works: remove the member again, add it again, rekey."""
    from unibus.client import ApiError

    rid = await _carols_room(world)
    unreadable: list[str] = []

    def node_under_faults(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "PUT" and request.path.endswith("/members/mallory") and not unreadable:
            unreadable.append("from now")
        elif unreadable and len(unreadable) < 4 and request.path == "/v1/log/head":
            unreadable.append(request.path)  # the confirming read and both reads after the failure
            return 503, {"type": "about:blank", "title": "Service Unavailable", "status": 503}
        return None

    proxy.answer = node_under_faults
    async with _client(world, proxy, tmp_path, "carol") as c:
        with pytest.raises(ApiError) as e:
            await c.add_room_member(rid, "mallory")  # made, but not confirmed
        assert e.value.status == 503 and "could not be confirmed" in e.value.detail
        assert len(unreadable) == 4
        with pytest.raises(VerificationError, match="mallory is in it by an add"):
            await c.rekey(rid)
        await c.remove_room_member(rid, "mallory")
        await c.add_room_member(rid, "mallory")
        assert await c.rekey(rid) >= 2
        assert "mallory" in c.verified.rooms[rid].members
