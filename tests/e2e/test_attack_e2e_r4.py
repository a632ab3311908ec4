"""Red team e2e-r4: the client against a compromised server, after 0.12's later changes.

Uses attackkit's module world (a real membershipd with a real nats-server and SQLite; alice
admin, bob, carol, mallory) and its real aiohttp :class:`Proxy` (the compromised server). Each
test asserts the safe behaviour; each was a hole this round or its review found, fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

import aiohttp
import pytest
import yarl
from aiohttp import web
from attackkit import new_room

from unibus.client import ApiError, UnibusClient, VerificationError
from unibus.client.api import KeyUnavailable
from unibus.client.keys import generate_identity, save_identity


def _tag(request: web.Request) -> str | None:
    found = re.search(r';tag="([^"]*)"', request.headers.get("Signature-Input", ""))
    return found.group(1) if found else None


async def test_a_changing_request_is_tagged_with_the_pinned_root_whatever_the_server_serves(world, proxy, tmp_path):
    """alice pinned and verified deployment A's trust root; a later process of hers (a fresh
    client on the same replica) adds a member through A. A compromised A answers her look-up of
    entry 0 with nothing (or another deployment's entry 0): the client took the tag from that
    answer, before it had read its replica, and signed untagged (or for the other deployment),
    so A could replay her request on another deployment where she is admin. Safe: the tag is
    the root pinned on disk."""
    replica = tmp_path / "alice.log"
    async with world.sdk("alice", proxy.url, replica=replica) as a:
        await a.sync()  # pins and verifies A's root (the proxy passes everything on, so far)
        root = a.replica.trust_root
    assert root
    tags: list[str | None] = []

    def lie(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "GET" and request.path == "/v1/log":
            return 200, {"entries": [], "head": {"seq": -1, "hash": ""}}  # "no log here"
        if request.method != "GET":
            tags.append(_tag(request))
        return None

    proxy.answer = lie
    newcomer = generate_identity("r4newcomer")
    async with world.sdk("alice", proxy.url, replica=replica) as fresh:  # a new process: nothing read yet
        # (made, then refused as unconfirmed: the log that server serves has no such request,
        # tests/e2e/test_attack_e2e_r5.py)
        with pytest.raises(VerificationError):
            await fresh.add_member(newcomer.handle, newcomer.sign_pub_b64, newcomer.enc_pub_b64,
                                   bus_pub=newcomer.bus_pub)
    assert tags == [root]  # the code before: [None], untagged


async def test_with_no_root_pinned_a_changing_request_is_never_untagged_and_pins_its_root(world, proxy, tmp_path):
    """A review: a client with nothing pinned for this server (its first command, or the same
    server spelled another way, which is another replica directory) sent untagged when the
    server answered its look-up of entry 0 with 404: a request any other deployment accepts,
    and it took entry 0 afresh in every process. Now a server with no entry 0 gets nothing, and
    the entry 0 a request is tagged with is pinned on first use (and said so)."""
    sent: list[str] = []

    def no_log(request: web.Request, _body: bytes) -> tuple[int, object] | None:
        if request.method == "GET" and request.path.startswith("/v1/log"):
            return 404, {"type": "about:blank", "title": "Not Found", "status": 404}
        if request.method != "GET":
            sent.append(request.path)
        return None

    proxy.answer = no_log
    newcomer = generate_identity("r4nolog")
    async with world.sdk("alice", proxy.url, replica=tmp_path / "fresh.log") as fresh:
        with pytest.raises((ApiError, VerificationError)):  # no entry 0: nothing is sent
            await fresh.add_member(newcomer.handle, newcomer.sign_pub_b64, newcomer.enc_pub_b64,
                                   bus_pub=newcomer.bus_pub)
    assert sent == []  # the code before: POST /v1/members, untagged

    tags: list[str | None] = []
    proxy.answer = lambda request, _body: tags.append(_tag(request)) if request.method != "GET" else None
    async with world.sdk("alice", proxy.url, replica=tmp_path / "other.log") as fresh:
        await fresh.add_member(newcomer.handle, newcomer.sign_pub_b64, newcomer.enc_pub_b64,
                               bus_pub=newcomer.bus_pub)
        assert tags == [fresh.replica.trust_root] and tags[0]  # pinned, then tagged
    assert world.sdk("alice", proxy.url, replica=tmp_path / "other.log").replica.pinned_root() == tags[0]  # on disk


async def test_a_blob_upload_is_tagged_with_the_pinned_root(world, proxy, tmp_path):
    """A review: blob uploads were signed without the tag, so a compromised server that gave a new
    room the id of one on another deployment could replay them there."""
    from unibus.client.blobs import put_raw_blob

    rid = await new_room(world, "bob", rekey=False)
    tags: list[str | None] = []
    proxy.answer = lambda request, _body: tags.append(_tag(request)) if request.method == "PUT" else None
    blob = tmp_path / "b"
    blob.write_bytes(b"ciphertext, as far as the server knows")
    async with world.sdk("alice", proxy.url, replica=tmp_path / "alice.log") as a:
        await a.sync()
        await put_raw_blob(a, rid, blob)
        assert tags == [a.replica.trust_root] and tags[0]  # the code before: [None]


async def test_a_removal_logged_right_after_a_rekey_is_rekeyed_for_before_anything_is_sent(world, proxy):
    """alice's send rekeys a room whose membership changed. The compromised server holds back
    carol's removal of bob and logs it right after alice's rekey, before it answers her: her
    rekey's sync reads the removal, yet the client sent with the key it had just sealed to bob,
    and bob read the message. Safe: it rekeys again, to the room without bob."""
    rid = await new_room(world, "bob", "carol")
    async with world.sdk("alice") as a:
        await a.add_room_member(rid, "mallory")  # the membership changed: alice's next send rekeys
    fired: list[int] = []

    async def hold_back(request: web.Request, body: bytes) -> tuple[int, object] | None:
        if request.method == "POST" and request.path.endswith("/keys") and not fired:
            fired.append(1)
            keep = ("signature", "signature-input", "content-digest", "content-type")
            headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
            async with aiohttp.ClientSession() as s, s.request(
                    "POST", yarl.URL(world.daemon.base_url + request.raw_path, encoded=True), data=body,
                    headers=headers) as r:
                status, text = r.status, await r.text()
            async with world.sdk("alice") as admin:  # a removal alice signed elsewhere, logged only now
                await admin.remove_room_member(rid, "bob")
            return status, json.loads(text)
        return None

    proxy.answer = hold_back
    async with world.sdk("alice", proxy.url) as a, a.bus() as bus:
        got = []

        async def keep(msg):
            got.append(msg)

        sub = await bus.nc.subscribe(f"unibus.room.{rid}.>", cb=keep)
        await bus.nc.flush()
        epoch = await bus.send(rid, "chat", b"after bob's removal")
        await bus.nc.flush()
        await sub.unsubscribe()
        room = a.verified.rooms[rid]
    assert fired and got and "bob" not in room.members
    assert "bob" not in room.epochs[epoch].roster  # the code before: the epoch sealed to bob, who read it
    async with UnibusClient(world.daemon.base_url, world.people["bob"], notice=lambda _t: None) as b:
        with pytest.raises(KeyUnavailable):
            await b.room_key(rid, epoch)


async def test_a_raw_blob_without_a_length_is_refused_before_it_is_written(tmp_path):
    """A compromised server answers a raw blob download with a chunked body that goes on: the
    client wrote every byte to disk and could only refuse it by its hash at the end (a red team:
    disk used as far as the server liked). membershipd always sends a Content-Length; a blob
    without one is refused at once, and nothing is left on disk."""
    import asyncio
    import contextlib

    from attackkit import serving

    from unibus.client.blobs import BlobIntegrityError, get_raw_blob

    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(256):  # up to 256 MiB, if nobody stops reading
                await resp.write(b"\0" * (1 << 20))
                sent += 1 << 20
                await asyncio.sleep(0)
        return resp

    out = tmp_path / "blob"
    async with serving(endless) as url, UnibusClient(url, generate_identity("zed"), timeout=15) as c:
        with pytest.raises(BlobIntegrityError, match="without a Content-Length"):
            await get_raw_blob(c, "a" * 24, "0" * 64, out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert sent < 64 << 20

    async def declares_a_tebibyte(request: web.Request) -> web.StreamResponse:  # the review's bypass
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(1 << 40)})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(b"\0" * (1 << 20))
        return resp

    async with serving(declares_a_tebibyte) as url, UnibusClient(url, generate_identity("zed"), timeout=15) as c:
        with pytest.raises(BlobIntegrityError, match="more than max_size"):
            await get_raw_blob(c, "a" * 24, "0" * 64, out, max_size=100 << 20)
    assert not out.exists() and not list(tmp_path.iterdir())


async def test_a_look_up_of_entry_0_that_is_not_a_log_page_sends_nothing(tmp_path):
    """A review: a server answering the first-use look-up of entry 0 with `null` (or a list, a
    string, a number) made the client raise AttributeError, a traceback in the CLI. It is a
    VerificationError now, and nothing is sent."""
    from attackkit import serving

    sent: list[str] = []

    async def odd(request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == "/v1/log":
            return web.json_response(None)
        sent.append(f"{request.method} {request.path}")
        return web.json_response({}, status=201)

    newcomer = generate_identity("r4odd")
    async with serving(odd) as url, UnibusClient(url, generate_identity("alice"), replica_root=tmp_path) as c:
        with pytest.raises(VerificationError, match="serves no membership log"):
            await c.add_member(newcomer.handle, newcomer.sign_pub_b64, newcomer.enc_pub_b64, bus_pub=newcomer.bus_pub)
    assert sent == []


@pytest.mark.parametrize("answer", ["null", "[]", "204", '{"members": 5, "rooms": [1]}'])
async def test_answers_of_another_shape_are_one_error_line_not_a_traceback(tmp_path, answer):
    """A red team's server answered `null`, `[]` or 204 where the API documents an object or a
    list of objects: whoami, members list/show, rooms list/show/create printed tracebacks. The
    SDK checks the shape of what it returns; the CLI turns anything unforeseen into one line."""
    import sys

    from attackkit import serving

    async def odd(request: web.Request) -> web.Response:
        if answer == "204":
            return web.Response(status=204)
        return web.Response(body=answer.encode(), content_type="application/json")

    path = tmp_path / "bob.json"
    save_identity(generate_identity("bob"), path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    async with serving(odd) as url:
        for cmd in (["trust", "ab" * 32], ["whoami"], ["members", "list"], ["members", "show", "alice"], ["rooms", "list"],
                    ["rooms", "show", "abcdefghijklmnopqrstuvwx"], ["rooms", "create", "ops"]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "unibus.client.cli", "--server", url, "--identity", str(path), *cmd,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            text = err.decode()
            if cmd[0] == "trust":  # a root pinned first: the changing request needs no log from it
                assert proc.returncode == 0, text
                continue
            # (an empty list is a fine answer to a listing, and an odd object to whoami)
            assert proc.returncode in (0, 1) and "Traceback" not in text, (cmd, proc.returncode, text)
            if proc.returncode == 1:
                assert len([line for line in text.splitlines() if "error:" in line]) == 1, (cmd, text)
