"""Red team e2e-r2: attacks on the e2e-r1 fix (13c53be): the roster rule, the rekey loop, the CLI escaping.

Uses attackkit's module world (a real membershipd with a real nats-server and
SQLite; alice admin, bob, carol, mallory) and its real aiohttp :class:`Proxy`
(the compromised server / HTTP MITM). The first four tests were holes this
round found, fixed since; the others are attacks that held.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import pytest
import yarl
from aiohttp import web
from attackkit import Proxy, new_room

from unibus import forkrun
from unibus.client import ApiError, VerificationError
from unibus.client import api as client_api
from unibus.client.keys import generate_identity, save_identity

KEEP = ("signature", "signature-input", "content-digest", "content-type")


def _held(request: web.Request, body: bytes) -> dict[str, Any]:
    return {"body": body, "headers": {k: v for k, v in request.headers.items() if k.lower() in KEEP}}


async def _replay(via: Proxy, world: Any, path: str, held: dict[str, Any]) -> int:
    """Send a held signed request to the real daemon, as a server that kept it can apply it later."""
    url = yarl.URL(world.daemon.base_url.rstrip("/") + path, encoded=True)
    async with via.session.post(url, data=held["body"], headers=held["headers"]) as resp:
        await resp.read()
        return resp.status


def _cli_env(tmp_path: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNIBUS_", "XDG_"))}
    env["HOME"] = str(tmp_path)
    return env


async def _cli(world: Any, tmp_path: Any, server: str, handle: str, *argv: str) -> Any:
    ident = tmp_path / f"{handle}.json"
    if not ident.exists():
        save_identity(world.people[handle], ident)

    return await asyncio.to_thread(forkrun.run, "unibus.client.cli",
                                   ["--server", server, "--identity", str(ident), *argv], env=_cli_env(tmp_path),
                                   timeout=30)


def _controls(text: str) -> list[str]:
    return [ch for ch in text if (ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0]


FAKE = "\x1b[1A\x1b[2K\x1b]0;ok\x07unibus: the membership log is valid"


# --------------------------------------------------------------------------- holes


async def test_the_rekeys_own_key_is_the_one_logged(world, proxy):
    """alice's first rekey POST is held (201, nothing logged): her client sees no rekey and seals again.
    When the second POST arrives, the server applies the held first one (a real, valid, signed request)
    and answers 201 to the second without applying it. The log has epoch 1 by alice, roster unchanged:
    alice's client caches the key of the *second* POST, while the log's (and every other member's)
    key of epoch 1 is the first one. Safe: alice's key of epoch 1 is the one carol is given."""
    rid = await new_room(world, "carol", rekey=False)  # epoch 0, needs a rekey
    path = f"/v1/rooms/{rid}/keys"
    posts: list[dict[str, Any]] = []

    async def server(request: web.Request, body: bytes) -> Any:
        if request.method == "POST" and request.path == path:
            posts.append(_held(request, body))
            if len(posts) == 2:
                assert await _replay(proxy, world, path, posts[0]) == 201  # the held one is logged now
            return 201, {"room_id": rid, "epoch": 1, "rekey_required": False}  # "done"
        return None

    proxy.answer = server
    async with world.sdk("alice", proxy.url) as a:
        # the second try finds another rekey to epoch 1 logged (the held first one), tries epoch 2,
        # which the server only pretends to take, and gives up saying so, with no key kept
        with pytest.raises(VerificationError, match="not in its membership log as sealed"):
            await a.rekey(rid)
        assert a.cached_key(rid, 1) is None and a.cached_key(rid, 2) is None
    assert len(posts) == 1 + client_api.REKEY_RETRIES
    async with world.sdk("carol") as c, world.sdk("alice") as a:  # the real server: what the log holds
        assert await c.current_key(rid) == await a.current_key(rid)  # one key of epoch 1 for both


async def test_cli_report_lines_escape_server_text(world, proxy, tmp_path):
    # The server makes the change (so the log confirms it, tests/e2e/test_attack_e2e_r5.py) and
    # lies in its answer.
    # (A room creation's answer other than what the log holds for the new room is refused: then the
    # server's text is in the error line.)
    lie_about_the_id = [True]

    def server(method: str, path: str, _query: str, doc: Any) -> Any:
        if method == "POST" and path == "/v1/rooms":
            if lie_about_the_id.pop() if lie_about_the_id else False:
                return {**doc, "room_id": FAKE}
            return {**doc, "name": FAKE, "owner": FAKE}
        if method == "POST" and path == "/v1/members":
            return {"handle": FAKE, "role": FAKE, "enc_suite": FAKE}
        return None

    proxy.rules.append(server)
    refused = await _cli(world, tmp_path, proxy.url, "alice", "rooms", "create", "x")
    assert refused.returncode == 1 and "membership log says that request made room" in refused.stderr
    assert not _controls(refused.stdout + refused.stderr), repr(refused.stderr)
    created = await _cli(world, tmp_path, proxy.url, "alice", "rooms", "create", "x")
    r = generate_identity("zed").public_record()
    added = await _cli(world, tmp_path, proxy.url, "alice", "members", "add", "--handle", "zed",
                       "--sign-pub", r["sign_pub"], "--enc-pub", r["enc_pub"], "--bus-pub", r["bus_pub"])
    assert created.returncode == 1 and "does not hold" in created.stderr, created.stderr
    assert added.returncode == 0, added.stderr
    assert not _controls(created.stdout + created.stderr), repr(created.stdout)
    assert not _controls(added.stdout + added.stderr), repr(added.stdout)


async def test_listen_show_rejected_escapes_server_text(world, proxy, tmp_path):
    rid = await new_room(world, "carol")  # epoch 1
    proxy.answer = lambda r, b: (500, {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                                       "detail": FAKE}) if r.path == f"/v1/rooms/{rid}/keys/me" else None
    ident = tmp_path / "carol.json"
    save_identity(world.people["carol"], ident)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "unibus.client.cli", "--server", proxy.url, "--identity", str(ident),
        "listen", rid, "--show-rejected", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_cli_env(tmp_path))
    lines: list[str] = []
    try:
        async def until(word: str) -> None:
            while True:
                raw = await asyncio.wait_for(proc.stderr.readline(), 15)
                assert raw, "".join(lines)
                lines.append(raw.decode("utf-8", "replace"))
                if word in lines[-1]:
                    return

        await until("listening on")
        async with world.sdk("alice") as a, a.bus() as bus:
            await bus.send(rid, "chat", b"hello")  # epoch 1: carol's CLI asks the server for its key
        await until("rejected")
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    rejected = lines[-1]
    assert "Internal Server Error" in rejected
    assert not _controls(rejected), repr(rejected)


async def test_current_key_after_leaving_mid_rekey_is_a_clean_error(world, proxy):
    """Robustness, not confidentiality: alice (admin) sends to a room that needs a rekey; while her
    client is between its room check and the rekey's, alice is removed from the room (another of her
    sessions, or another admin). The rekey (allowed to an admin) seals to carol only and succeeds."""
    rid = await new_room(world, "carol", rekey=False)
    gets = 0

    async def race(request: web.Request, _body: bytes) -> Any:
        nonlocal gets
        if request.method == "GET" and request.path == f"/v1/rooms/{rid}":
            gets += 1
            if gets == 2:  # rekey()'s verified_room, after current_key()'s
                async with world.sdk("alice") as other:
                    await other.remove_room_member(rid, "alice")
        return None

    proxy.answer = race
    async with world.sdk("alice", proxy.url) as a:
        with pytest.raises(client_api.NotARoomMember):
            await a.current_key(rid)
    async with world.sdk("carol") as c:  # the rekey itself landed, for carol alone
        assert (await c.current_key(rid))[0] == 1


# --------------------------------------------------------------------------- attacks that held


async def test_a_server_cannot_make_rekey_loop_or_seal_without_end(world, proxy):
    """409 to every keys POST, then 201 without logging: each rekey() makes at most REKEY_RETRIES + 1
    POSTs (one seal each), raises, and caches no key."""
    rid = await new_room(world, "carol", rekey=False)
    count = 0

    def answer(status: int) -> Any:
        def server(request: web.Request, _body: bytes) -> Any:
            nonlocal count
            if request.method == "POST" and request.path == f"/v1/rooms/{rid}/keys":
                count += 1
                if status == 409:
                    return 409, {"type": "about:blank", "title": "Conflict", "status": 409, "detail": "again"}
                return 201, {"room_id": rid, "epoch": 1, "rekey_required": False}
            return None
        return server

    async with world.sdk("alice", proxy.url) as a:
        proxy.answer = answer(409)
        with pytest.raises(ApiError) as e:
            await a.rekey(rid)
        assert e.value.status == 409 and count == client_api.REKEY_RETRIES + 1
        count = 0
        proxy.answer = answer(201)
        with pytest.raises(VerificationError, match="not in its membership log"):
            await a.rekey(rid)
        assert count == client_api.REKEY_RETRIES + 1
        assert a.cached_key(rid, 1) is None


async def test_a_member_removed_and_added_again_before_a_held_rekey_gets_only_what_it_may(world, proxy):
    """The server holds alice's rekey (sealed to alice, bob, carol at head H); bob is removed from the
    room and added back (the same member: same keys, same `since`); the server then applies the held
    rekey. The roster rule accepts it (same roster at H and at the rekey): bob gets the key, and he
    is in the room at that epoch, so nobody outside the epoch's roster holds it. A key of that room
    sealed while bob was out (to alice and carol) can no longer be logged: the server refuses a seal
    that does not name bob, and the epoch is taken."""
    rid = await new_room(world, "bob", "carol", rekey=False)
    path = f"/v1/rooms/{rid}/keys"
    posts: list[dict[str, Any]] = []

    def hold(request: web.Request, body: bytes) -> Any:
        if request.method == "POST" and request.path == path:
            posts.append(_held(request, body))
            return 409, {"type": "about:blank", "title": "Conflict", "status": 409, "detail": "held"}
        return None

    proxy.answer = hold
    async with world.sdk("alice", proxy.url) as a:
        with pytest.raises(ApiError):
            await a.rekey(rid)
    assert set(json.loads(posts[0]["body"])["sealed"]) == {"alice", "bob", "carol"}
    async with world.sdk("alice") as a:
        await a.remove_room_member(rid, "bob")
        await a.add_room_member(rid, "bob")
    assert await _replay(proxy, world, path, posts[0]) == 201
    async with world.sdk("carol") as c, world.sdk("bob") as b:
        ec, kc = await c.current_key(rid)
        eb, kb = await b.current_key(rid)
        assert (ec, kc) == (eb, kb) and ec == 1
        assert c.verified.rooms[rid].members == {"alice", "bob", "carol"}
        assert c.verified.rooms[rid].epochs[1].roster == frozenset({"alice", "bob", "carol"})


async def test_a_bus_key_change_during_a_rekey_does_not_stop_it(world, proxy):
    """A room member rotates her bus key while alice's rekey is on its way (the log takes the change
    between alice's head and her rekey): the roster rule ignores it, one POST is enough, and the other
    members accept the key."""
    rid = await new_room(world, "carol", "mallory", rekey=False)
    posts = 0

    async def race(request: web.Request, _body: bytes) -> Any:
        nonlocal posts
        if request.method == "POST" and request.path == f"/v1/rooms/{rid}/keys":
            posts += 1
            async with world.sdk("mallory") as m:
                await m.set_bus_key(generate_identity("mallory").bus_pub)
        return None

    proxy.answer = race
    started = time.monotonic()
    async with world.sdk("alice", proxy.url) as a:
        assert await a.rekey(rid) == 1
        key = a.cached_key(rid, 1)
    assert posts == 1 and time.monotonic() - started < 10
    async with world.sdk("carol") as c:
        assert await c.current_key(rid) == (1, key)
