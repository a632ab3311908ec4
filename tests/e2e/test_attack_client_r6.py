"""Red team of the client's other commands (a review after the read commands'): a message
published again to a later `listen`, a removed member's blob, control characters in `--json`,
and `keygen --upgrade --server` told a bus key was there already.

Through attackkit's real daemon (alice admin, bob, carol, mallory), its real :class:`Proxy` where
the control plane lies, and the real CLI. Each test failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from attackkit import add, cli, new_room, publish_raw, serving

from unibus.client.blobs import get_blob, put_blob
from unibus.client.keys import generate_identity, save_identity, with_bus_key
from unibus.client.sealing import encrypt_message, room_subject
from unibus.client.signed import message_headers


async def _listen_once(world, rid: str, unibus, publish) -> tuple[object, list]:
    """``unibus listen ROOM --count 1 --json`` as ``unibus`` runs it, with ``publish()`` run once it
    listens (its note on stderr comes after the subscription); the process and what it printed."""
    proc = await asyncio.create_subprocess_exec(*unibus.argv, "listen", rid, "--count", "1", "--json",
                                                "--show-rejected", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                                                env=unibus.env)
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        while b"listening on" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
        await publish()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc, [out.decode(), err.decode()]


async def test_a_message_published_again_to_the_next_run_is_refused(world, tmp_path):
    """A review: `unibus listen --count 1` in a loop accepted, in each new run, a message the run
    before had accepted, published again unchanged by a room member: "deploy production" ran once
    per pass. A listener now keeps the ids it accepted in the replica, and the next run refuses
    them; a message the first run never heard, signed more than 120 s before the second started,
    is refused as published again too; one from a sender whose clock is 45 s behind is not (a
    second review: a margin of 30 s refused it)."""
    rid = await new_room(world, "bob", "mallory")
    unibus = cli(world.daemon.base_url, world.people["bob"], tmp_path / "home")
    async with world.sdk("alice") as a, a.bus() as abus, world.sdk("mallory") as m, m.bus() as mbus:
        async with mbus.listen(rid) as spy:
            async def send() -> None:
                await abus.send(rid, "cmd", b"deploy production")
            first, (out, _err) = await _listen_once(world, rid, unibus, send)
            assert first.returncode == 0 and json.loads(out)["text"] == "deploy production", out
            got = await asyncio.wait_for(spy._queue.get(), 10)  # what mallory heard, as it was

        async def again() -> None:
            await publish_raw(mbus, got.subject, got.data, dict(got.headers))

            # then one signed 200 s ago, which no run heard (a key alice holds: signed as alice)
            epoch, key = await a.current_key(rid)
            subject = room_subject(rid) + ".cmd"
            payload = encrypt_message(key, subject, epoch, b"rotate the keys")
            await publish_raw(mbus, subject, payload, message_headers(world.people["alice"], subject, epoch, payload,
                                                                      int(time.time() * 1000) - 200_000))
            honest = encrypt_message(key, subject, epoch, b"status")  # alice's clock 45 s behind
            await publish_raw(abus, subject, honest, message_headers(world.people["alice"], subject, epoch, honest,
                                                                     int(time.time() * 1000) - 45_000))

        second, (out, err) = await _listen_once(world, rid, unibus, again)
    assert second.returncode == 0, err
    assert json.loads(out)["text"] == "status", out  # neither the replay nor the old one
    rejected = [line for line in err.splitlines() if "rejected" in line and "(replay)" in line]
    assert len(rejected) == 2 and "already received" in rejected[0] and "before this listener started" in \
        rejected[1], err


async def test_two_listeners_of_one_identity_both_hear_a_message(world, tmp_path):
    """Listeners of one identity running at the same time, sharing the replica, both accept each
    message: a listener refuses only the ids accepted before it started."""
    rid = await new_room(world, "bob")
    replica = tmp_path / "bob.log"
    async with world.sdk("bob", replica=replica) as b1, world.sdk("bob", replica=replica) as b2, \
            b1.bus() as bus1, b2.bus() as bus2, world.sdk("alice") as a, a.bus() as abus:
        async with bus1.listen(rid) as one, bus2.listen(rid) as two:
            await abus.send(rid, "t", b"to both")
            got = [await asyncio.wait_for(anext(aiter(x)), 10) for x in (one, two)]
    assert [m.text for m in got] == ["to both", "to both"]


async def test_a_blob_sealed_with_a_key_a_removed_member_holds_says_so(world, tmp_path):
    """A review: a blob carries no signature of its uploader, and one sealed with the key of an
    epoch a member since removed also held (its own, or one a compromised server serves) came
    through with no word. `blob get` now names who else held that key.

    The member removed is one of its own: a removal kicks the member's bus again 2.7 s later
    (docs/bus-auth.md), and mallory's listeners in the next tests lost a message to that kick
    (a review)."""
    mona = world.people["mona"] = generate_identity("mona")
    async with world.sdk("alice") as a:
        await add(a, mona)
    rid = await new_room(world, "bob", "mona")
    src = tmp_path / "src"
    src.write_bytes(b"pay the invoice to mona's account")
    async with world.sdk("mona") as m:
        blob_id = await put_blob(m, rid, src)
    notices: list[str] = []
    async with world.sdk("bob") as b:
        b.replica.notice = notices.append
        await get_blob(b, rid, blob_id, tmp_path / "before")
        assert not [n for n in notices if "blob" in n]  # everyone who held the key is still in the room
        async with world.sdk("alice") as a:
            await a.remove_room_member(rid, "mona")
            await a.rekey(rid)
        await b.sync()
        await get_blob(b, rid, blob_id, tmp_path / "after")
    assert (tmp_path / "after").read_bytes() == src.read_bytes()
    said = [n for n in notices if "blob" in n]
    assert len(said) == 1 and "held it): mona;" in said[0] and "no signature of its uploader" in said[0], notices


async def test_json_output_escapes_what_drives_a_terminal(world, tmp_path):
    """A review: a room name with the 8-bit CSI (U+009B) and a bidi override went raw to the
    terminal through `log show --json` (text mode escaped them). JSON output writes them as
    \\uXXXX, the same JSON."""
    name = "x\u009b2J\u009b31mOWNED\u202eevil\u007f"
    async with world.sdk("mallory") as m:
        rid = (await m.create_room(name))["room_id"]
    shown = await cli(world.daemon.base_url, world.people["mallory"], tmp_path / "home")("log", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert not any(c in shown.stdout for c in "\u009b\u202e\u007f")
    rooms = {r["room_id"]: r for r in json.loads(shown.stdout)["rooms"]}
    assert rooms[rid]["name"] == name  # the same value, escaped


async def test_keygen_upgrade_is_not_told_a_bus_key_is_there_already(world, proxy, tmp_path):
    """A review: `keygen --upgrade --server` read `GET /v1/me` as it came, so a server that said it
    had the new bus key already made it upload nothing and exit 0 "uploaded" (the log still held
    the old key; the member's bus logins failed). That answer is now checked against the log."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    newer = with_bus_key(world.people["carol"])
    save_identity(newer, home / "carol.json")
    proxy.rules.append(lambda m, p, _q, doc: {**doc, "bus_pub": newer.bus_pub} if p == "/v1/me" else None)
    unibus = cli(proxy.url, newer, home)
    proc = await unibus("keygen", "--upgrade")
    assert proc.returncode == 1 and "already has this bus key" not in proc.stderr, (proc.stdout, proc.stderr)
    assert "bus_pub of carol: the server says" in proc.stderr, proc.stderr


async def test_another_spelling_of_the_servers_url_shares_the_ids(world, tmp_path):
    """A second review: the ids were kept per spelling of the server's URL (one replica each), so
    a message accepted by `listen` through 127.0.0.1 was accepted again through localhost. They are
    kept per deployment (its trust root)."""
    rid = await new_room(world, "bob", "mallory")
    home = tmp_path / "home"
    one = cli(world.daemon.base_url, world.people["bob"], home)
    other = cli(world.daemon.base_url.replace("127.0.0.1", "localhost"), world.people["bob"], home)
    async with world.sdk("alice") as a, a.bus() as abus, world.sdk("mallory") as m, m.bus() as mbus:
        async with mbus.listen(rid) as spy:
            async def send() -> None:
                await abus.send(rid, "cmd", b"deploy production")
            first, (out, _err) = await _listen_once(world, rid, one, send)
            assert first.returncode == 0 and "deploy production" in out, out
            got = await asyncio.wait_for(spy._queue.get(), 10)

        async def again() -> None:
            await publish_raw(mbus, got.subject, got.data, dict(got.headers))
            await abus.send(rid, "cmd", b"status")

        second, (out, err) = await _listen_once(world, rid, other, again)
    assert second.returncode == 0 and json.loads(out)["text"] == "status", (out, err)
    assert "already received" in err, err


async def test_a_new_sdk_clients_first_run_keeps_its_ids_where_later_runs_look(world, tmp_path):
    """A review: a new SDK client (no root pinned, no sync yet) kept its first run's ids in a
    directory of its own, and once its first message had pinned the root, later runs looked
    elsewhere: the message, published again after a restart, was accepted a second time. A
    listener with nothing pinned syncs first."""
    rid = await new_room(world, "bob", "mallory")
    replica = tmp_path / "bob.log"
    async with world.sdk("alice") as a, a.bus() as abus, world.sdk("mallory") as m, m.bus() as mbus:
        async with mbus.listen(rid) as spy:
            async with world.sdk("bob", replica=replica) as b, b.bus() as bus, bus.listen(rid) as first:
                await abus.send(rid, "cmd", b"deploy production")
                assert (await asyncio.wait_for(anext(aiter(first)), 10)).text == "deploy production"
            got = await asyncio.wait_for(spy._queue.get(), 10)
        async with world.sdk("bob", replica=replica) as b, b.bus() as bus, bus.listen(rid) as second:
            await publish_raw(mbus, got.subject, got.data, dict(got.headers))
            again = await asyncio.wait_for(anext(aiter(second)), 10)
    assert again.error is not None and again.reason == "replay", again
    assert (replica / "seen").is_dir() and not list(replica.glob("*/seen"))  # one place, by trust root


@pytest.mark.parametrize("answer", ["a long head", "a page of empty objects", "a page of numbers",
                                    "a page nested deep"])
async def test_an_answer_that_would_fill_memory_is_refused_before_it_is_parsed(world, tmp_path, answer):
    """A review: the byte cap (64 MiB) came before `json.loads`, and `[{},{},…]` makes about 64
    bytes of Python objects of 3: a 60 MiB `/v1/log/head` took the CLI to 1.6 GiB, a log page to
    3 GiB (the retry parsed it again while the first try's traceback held the first); an answer
    nested deep ended in a RecursionError. The head is capped at 64 KiB, an answer may hold at
    most 5,000,000 values (its commas and colons, counted before parsing), and one nested too
    deep is "not JSON the client takes"."""
    head = {"seq": 0, "hash": "0" * 64}
    bodies = {"a long head": (b'{"seq":0,"pad":"' + b"x" * (1 << 20) + b'"}', None),
              "a page of empty objects": (json.dumps(head).encode(),
                                          b'{"entries":[' + b"{}," * 5_100_000 + b'{}],"head":{}}'),
              "a page of numbers": (json.dumps(head).encode(), b'{"entries":[' + b"1," * 5_100_000 + b'1]}'),
              "a page nested deep": (json.dumps(head).encode(), b'{"entries":' + b"[" * 100_000 + b"]" * 100_000
                                     + b"}")}
    head_body, page_body = bodies[answer]

    async def handler(request: web.Request) -> web.Response:
        body = head_body if request.path == "/v1/log/head" else page_body
        return web.Response(body=body, content_type="application/json")

    async with serving(handler) as url:
        proc = await cli(url, world.people["bob"], tmp_path / "home")("log", "show")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    said = {"a long head": "over the client's limit of 65536 bytes",
            "a page of empty objects": "more than 5000000 values",
            "a page of numbers": "more than 5000000 values",
            "a page nested deep": "nested too deep"}[answer]
    assert said in proc.stderr and "RecursionError" not in proc.stderr, proc.stderr
