"""The client verifies before it trusts: attacks on the client's view of the server, each refused loudly.

One real membershipd (real nats-server, real SQLite) for the module; members
alice (admin), bob (MLKEM768_X25519), carol and mallory. Where the attacker
sits in the HTTP path, a real aiohttp reverse proxy (:class:`Mitm`) forwards
every request to the daemon and rewrites chosen answers. Each test asserts
what reached the server or the bus: nothing sealed to the attacker, nothing
encrypted under its key, no plaintext of a rejected message shown.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from attackkit import Proxy, World, new_room, publish_raw, subscribe_raw

from unibus import forkrun
from unibus.client import (
    ApiError,
    BusError,
    KeyUnavailable,
    LogVerificationError,
    RekeyRequired,
    VerificationError,
)
from unibus.client.blobs import put_blob
from unibus.client.keys import generate_identity, save_identity
from unibus.client.sealing import encrypt_message, seal_room_key
from unibus.client.signed import message_headers
from unibus.memberlog import entry_hash, key_package_input

Rule = Callable[[str, str, str, Any], Any]


# --------------------------------------------------------------------------- the man in the middle


class Mitm(Proxy):
    """A reverse proxy in front of the daemon (:class:`attackkit.Proxy`): forwards each request as
    is, lets rules rewrite JSON answers.

    A rule is ``rule(method, path, query, doc) -> new doc or None`` (None:
    unchanged). ``intercept(method, path)`` may answer ``(status, doc)``
    itself, without forwarding. ``seen`` lists every request that reached
    the daemon through it: ``(method, raw path, body)``.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.intercept: Callable[[str, str], tuple[int, Any] | None] | None = None
        self.seen: list[tuple[str, str, bytes]] = []
        self.answer = self._intercepted

    def _intercepted(self, request: web.Request, body: bytes) -> tuple[int, Any] | None:
        found = self.intercept(request.method, request.path) if self.intercept else None
        if found is None:
            self.seen.append((request.method, request.raw_path, body))
        return found

    def posted_keys(self) -> list[tuple[str, str, bytes]]:
        return [r for r in self.seen if r[0] == "POST" and r[1].endswith("/keys")]


@pytest.fixture
async def mitm(world):
    proxy = await Mitm(world.daemon.base_url).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


# --------------------------------------------------------------------------- the world


def identity_file(tmp_path: Path, world: World, handle: str) -> Path:
    path = tmp_path / "ids" / f"{handle}.json"
    if not path.exists():
        save_identity(world.people[handle], path)
    return path


async def cli(tmp_path: Path, world: World, handle: str, *args: str, server: str | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`unibus ARGS` as ``handle`` (its replica under tmp_path), run without blocking the proxy's loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    argv = ["--server", server or world.daemon.base_url, "--identity", str(identity_file(tmp_path, world, handle)),
            *args]
    proc = await asyncio.to_thread(forkrun.run, "unibus.client.cli", argv, env=env, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def failed(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1 with one error line naming every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unibus: error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


async def server_room(world: World, rid: str) -> dict[str, Any]:
    async with world.sdk("alice") as a:
        return await a.get_room(rid)


async def first_published_after(world: World, rid: str, act: Callable[[], Any]) -> str:
    """Run ``act`` while bob watches the room's raw subjects, then publish a raw sentinel: the first subject seen.

    nats-server delivers in the order it processed the publishes, so anything
    ``act`` published would arrive before the sentinel.
    """
    async with world.sdk("bob") as b, b.bus() as bus:
        seen: asyncio.Queue[Any] = asyncio.Queue()
        await subscribe_raw(bus, f"unibus.room.{rid}.>", seen.put)
        await act()
        await bus.nc.publish(f"unibus.room.{rid}.sentinel", b"sentinel")
        return (await asyncio.wait_for(seen.get(), 15)).subject


# --------------------------------------------------------------------------- whom a rekey seals to


async def test_a_ghost_member_added_behind_the_servers_back_gets_nothing(world, tmp_path):
    rid = await new_room(world, "bob")
    ghost = generate_identity("ghost")
    with world.db() as db:  # the attacker writes the store directly: no log entry
        db.execute("insert into members (handle, role, sign_pub, enc_pub, enc_suite, created_at, bus_pub) "
                   "select 'ghost', 'member', ?, ?, 'X25519', created_at, NULL from members where handle='alice'",
                   (ghost.sign_pub, ghost.enc_pub))
        db.execute("insert into room_members (room_id, handle, added_at) "
                   "select room_id, 'ghost', added_at from room_members where room_id=? and handle='alice'", (rid,))
    world.daemon.send_signal(1)  # SIGHUP: the daemon re-reads its store
    deadline = time.monotonic() + 15
    while "ghost" not in {m["handle"] for m in (await server_room(world, rid))["members"]}:
        assert time.monotonic() < deadline, "the daemon did not pick up the ghost"
        await asyncio.sleep(0.1)

    failed(await cli(tmp_path, world, "alice", "rooms", "rekey", rid), "ghost member ghost", rid)
    failed(await cli(tmp_path, world, "alice", "send", rid, "chat", "secret"), "ghost member ghost")
    async with world.sdk("alice") as a:
        with pytest.raises(VerificationError, match="ghost member ghost"):
            await a.rekey(rid)
        assert a.cached_key(rid, 2) is None
    assert (await server_room(world, rid))["epoch"] == 1  # no keys POST went through
    with world.db() as db:
        assert db.execute("select count(*) from sealed_keys where handle='ghost'").fetchone() == (0,)
        db.execute("delete from room_members where handle='ghost'")
        db.execute("delete from members where handle='ghost'")
    world.daemon.send_signal(1)


async def test_a_swapped_enc_pub_in_the_room_record_is_refused(world, tmp_path, mitm):
    rid = await new_room(world, "bob", "carol")
    evil = generate_identity("evil")

    def swap(method: str, path: str, query: str, doc: Any) -> Any:
        if method == "GET" and path == f"/v1/rooms/{rid}":
            for m in doc["members"]:
                if m["handle"] == "bob":
                    m["enc_pub"], m["enc_suite"] = evil.enc_pub_b64, "X25519"
            return doc
        return None

    mitm.rules.append(swap)
    line = failed(await cli(tmp_path, world, "alice", "rooms", "rekey", rid, server=mitm.url), "swapped key of bob")
    assert "carol" not in line  # only the difference is named
    assert mitm.posted_keys() == []  # nothing sealed, to anyone
    async with world.sdk("alice", mitm.url) as a:
        with pytest.raises(VerificationError, match="swapped key of bob"):
            await a.rekey(rid)
    assert mitm.posted_keys() == [] and (await server_room(world, rid))["epoch"] == 1
    # without the proxy the same rekey seals to the log's keys, bob's real one
    async with world.sdk("alice") as a, world.sdk("bob") as b:
        assert await a.rekey(rid) == 2
        assert (await b.room_key(rid))[1] == a.cached_key(rid, 2)


async def test_a_missing_member_is_named(world, tmp_path, mitm):
    rid = await new_room(world, "bob", "carol")
    mitm.rules.append(lambda m, p, q, doc: {**doc, "members": [x for x in doc["members"] if x["handle"] != "carol"]}
                      if m == "GET" and p == f"/v1/rooms/{rid}" else None)
    failed(await cli(tmp_path, world, "alice", "rooms", "rekey", rid, server=mitm.url), "missing member carol")
    assert mitm.posted_keys() == []


# --------------------------------------------------------------------------- which keys a client uses


async def test_a_server_chosen_key_at_a_future_epoch_is_never_used(world, tmp_path, mitm):
    rid = await new_room(world, "bob", "mallory")
    alice = world.people["alice"]
    attacker_key = os.urandom(32)
    forged_epoch = 2
    sealed = seal_room_key(attacker_key, alice.enc_pub, "X25519", rid, forged_epoch)
    mallory = world.people["mallory"]

    def forge(method: str, path: str, query: str, doc: Any) -> Any:
        if method == "GET" and path == f"/v1/rooms/{rid}/keys/me":
            head = doc["log_head"]
            sig = mallory.sign_key.sign(key_package_input(rid, forged_epoch, "alice", sealed, head["seq"],
                                                          head["hash"]))
            return {**doc, "epoch": forged_epoch, "sealed": base64.b64encode(sealed).decode(),
                    "sig": base64.b64encode(sig).decode(), "sealer": "mallory"}
        return None

    mitm.rules.append(forge)
    async with world.sdk("alice", mitm.url) as a:
        with pytest.raises(VerificationError, match="no rekey to epoch 2"):
            await a.room_key(rid)
        assert a.cached_key(rid, forged_epoch) is None

    async def send() -> None:
        failed(await cli(tmp_path, world, "alice", "send", rid, "chat", "for the attacker?", server=mitm.url),
               "epoch 1", "epoch 2")

    assert await first_published_after(world, rid, send) == f"unibus.room.{rid}.sentinel"

    # the same forgery at the current epoch: signed by a member who may not rekey, or naming the real sealer
    mitm.rules[:] = [lambda m, p, q, doc: (forge(m, p, q, doc) or {}) | {"epoch": 1} if p.endswith("/keys/me")
                     else None]
    async with world.sdk("alice", mitm.url) as a:
        with pytest.raises(VerificationError, match="sealed by alice"):
            await a.room_key(rid, 1)


async def test_a_rolled_back_key_is_refused_and_remembered(world, tmp_path, mitm):
    rid = await new_room(world, "bob")
    async with world.sdk("alice") as a:
        assert await a.rekey(rid) == 2
    replica = tmp_path / "bob.log"
    async with world.sdk("bob", mitm.url, replica=replica) as b:
        assert (await b.room_key(rid))[0] == 2
        old = await b.my_key(rid, 1)  # bob's genuine, signed package of epoch 1
    mitm.rules.append(lambda m, p, q, doc: old if p == f"/v1/rooms/{rid}/keys/me" else None)
    # another process, the same replica: the accepted epoch 2 was persisted
    async with world.sdk("bob", mitm.url, replica=replica) as b:
        with pytest.raises(VerificationError, match="rollback.*epoch 1.*already accepted epoch 2"):
            await b.room_key(rid)
        assert b.cached_key(rid, 1) is None
        assert (await b.room_key(rid, 1))[0] == 1  # an old epoch, asked for as such, stays readable
    # sending asks for the log's current epoch: epoch 1 in its place is refused

    async def send() -> None:
        failed(await cli(tmp_path, world, "bob", "send", rid, "chat", "x", server=mitm.url), "epoch 2", "epoch 1")

    assert await first_published_after(world, rid, send) == f"unibus.room.{rid}.sentinel"


async def test_an_unsigned_key_from_before_012_is_refused(world, tmp_path, mitm):
    rid = await new_room(world, "bob")
    mitm.rules.append(lambda m, p, q, doc: {**doc, "sig": None, "sealer": None, "log_head": None}
                      if p == f"/v1/rooms/{rid}/keys/me" else None)
    line = failed(await cli(tmp_path, world, "bob", "send", rid, "chat", "x", server=mitm.url), "no signature",
                  f"unibus rooms rekey {rid}")
    assert "before unibus 0.12" in line


# --------------------------------------------------------------------------- the log itself


async def test_a_dropped_removal_is_a_rollback(world, tmp_path, mitm):
    rid = await new_room(world, "bob", "carol")
    async with world.sdk("alice") as a:
        await a.remove_room_member(rid, "carol")
        head = await a.log_head()
    # alice's CLI (through the proxy) has seen the removal
    assert (await cli(tmp_path, world, "alice", "log", "show", "--json", server=mitm.url)).returncode == 0
    removal = head["seq"]
    async with world.sdk("alice") as a:
        before = (await a.log(after=removal - 2, limit=1))["entries"][0]

    def drop(method: str, path: str, query: str, doc: Any) -> Any:
        if path == "/v1/log/head":
            return {**doc, "seq": removal - 1, "hash": entry_hash(before)}
        if path == "/v1/log":
            return {"entries": [e for e in doc["entries"] if e["seq"] < removal],
                    "head": {"seq": removal - 1, "hash": entry_hash(before)}}
        if path == f"/v1/rooms/{rid}":  # the room as it was before the removal
            return {**doc, "members": doc["members"] + [{"handle": "carol",
                                                         "enc_pub": world.people["carol"].enc_pub_b64,
                                                         "enc_suite": "X25519"}]}
        return None

    mitm.rules.append(drop)
    failed(await cli(tmp_path, world, "alice", "log", "show", server=mitm.url), "rollback", f"seq {removal}")

    async def send() -> None:
        failed(await cli(tmp_path, world, "alice", "send", rid, "chat", "carol must not read this",
                         server=mitm.url), "rollback", f"seq {removal}")

    assert await first_published_after(world, rid, send) == f"unibus.room.{rid}.sentinel"
    assert mitm.posted_keys() == []


async def test_a_forked_log_is_refused(world, tmp_path, mitm):
    await new_room(world, "bob", rekey=False)
    assert (await cli(tmp_path, world, "alice", "log", "show", server=mitm.url)).returncode == 0
    async with world.sdk("alice") as a:
        head = await a.log_head()
        last = (await a.log(after=head["seq"] - 1))["entries"][-1]
    forked = copy.deepcopy(last)
    forked["at"] += 1  # the same signed request, another entry: a different hash at the same seq
    other = entry_hash(forked)

    def fork(method: str, path: str, query: str, doc: Any) -> Any:
        if path == "/v1/log/head":
            return {**doc, "seq": head["seq"], "hash": other}
        return None

    mitm.rules.append(fork)
    failed(await cli(tmp_path, world, "alice", "log", "show", server=mitm.url), "fork", f"seq {head['seq']}")
    # a fork further on: an entry whose prev is not the verified head
    mitm.rules[:] = []
    await new_room(world, rekey=False)
    async with world.sdk("alice") as a:
        real_head = await a.log_head()
        nxt = (await a.log(after=head["seq"]))["entries"][0]
    bad = {**nxt, "prev": "0" * 64}
    mitm.rules.append(lambda m, p, q, doc: {"entries": [bad if e["seq"] == bad["seq"] else e for e in doc["entries"]],
                                            "head": doc["head"]} if p == "/v1/log" else None)
    failed(await cli(tmp_path, world, "alice", "log", "show", server=mitm.url), f"entry {head['seq'] + 1}",
           "prev is not the hash")
    assert real_head["seq"] == head["seq"] + 1
    # and `log verify` names the first bad entry too
    failed(await cli(tmp_path, world, "alice", "log", "verify", server=mitm.url), f"entry {head['seq'] + 1}")


# --------------------------------------------------------------------------- messages


async def test_a_forged_sender_is_rejected_and_never_shown(world):
    rid = await new_room(world, "bob", "mallory")
    subject = f"unibus.room.{rid}.chat"
    people = world.people
    async with world.sdk("bob") as b, world.sdk("mallory") as m, world.sdk("alice") as a, \
            b.bus() as bbus, m.bus() as mbus, a.bus() as abus:
        key = (await m.room_key(rid))[1]
        captured: asyncio.Queue[Any] = asyncio.Queue()
        await subscribe_raw(mbus, subject, captured.put)
        await abus.send(rid, "chat", "from alice")  # before bob listens: its msg id is new to him
        genuine = await asyncio.wait_for(captured.get(), 10)
        async with bbus.listen(rid) as msgs:
            now = int(time.time() * 1000)
            payload = encrypt_message(key, subject, 1, b"mallory as bob")
            # 1. mallory signs with her own key but names bob as the sender
            forged = message_headers(people["mallory"], subject, 1, payload, now)
            forged["Unibus-Sender"] = "bob"
            await publish_raw(mbus, subject, payload, forged)
            # 2. alice's genuine message with its sender header swapped
            await publish_raw(mbus, subject, genuine.data, {**genuine.headers, "Unibus-Sender": "mallory"})
            # 3. unsigned, as 0.11 sent it
            await publish_raw(mbus, subject, payload, {"Unibus-Epoch": "1", "Unibus-Sender": "mallory"})
            # 4. signed with carol's real key: carol is not in the room
            carol_payload = encrypt_message(key, subject, 1, b"carol")
            await publish_raw(mbus, subject, carol_payload,
                              message_headers(people["carol"], subject, 1, carol_payload, now))
            await abus.send(rid, "chat", "alice again")
            got = [await asyncio.wait_for(msgs.__anext__(), 10) for _ in range(5)]
            counts = dict(msgs.rejected)
    assert [(g.sender, g.plaintext) for g in got if g.ok] == [("alice", b"alice again")]
    rejected = [g for g in got if not g.ok]
    assert [g.reason for g in rejected] == ["signature", "signature", "malformed", "sender"]
    assert all(g.plaintext is None for g in rejected)
    assert counts == {"signature": 2, "malformed": 1, "sender": 1}


async def test_replayed_and_old_messages_are_rejected(world, tmp_path):
    rid = await new_room(world, "bob", "mallory")
    subject = f"unibus.room.{rid}.chat"
    path = identity_file(tmp_path, world, "bob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    listener = subprocess.Popen(
        [sys.executable, "-m", "unibus.client.cli", "--server", world.daemon.base_url, "--identity", str(path),
         "listen", rid, "--json", "--show-rejected", "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        for _ in range(20):
            ready = await asyncio.to_thread(listener.stderr.readline)
            if "listening on" in ready or not ready:
                break
        assert "listening on" in ready, ready
        async with world.sdk("mallory") as m, world.sdk("alice") as a, m.bus() as mbus, a.bus() as abus:
            key = (await m.room_key(rid))[1]
            captured: asyncio.Queue[Any] = asyncio.Queue()
            await subscribe_raw(mbus, subject, captured.put)
            await abus.send(rid, "chat", "once only")
            genuine = await asyncio.wait_for(captured.get(), 10)
            await publish_raw(mbus, subject, genuine.data, dict(genuine.headers))  # the same message again
            old = int(time.time() * 1000) - 400_000  # signed by alice, 400 s ago
            payload = encrypt_message(key, subject, 1, b"old news")
            await publish_raw(mbus, subject, payload,
                              message_headers(world.people["alice"], subject, 1, payload, old))
            await abus.send(rid, "chat", "last")
        out, err = await asyncio.to_thread(listener.communicate, timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["sender"], d["text"]) for d in lines] == [("alice", "once only"), ("alice", "last")]
    assert len({d["msg_id"] for d in lines}) == 2
    rejected = [line for line in err.splitlines() if line.startswith("unibus: rejected")]
    assert len(rejected) == 2, err
    assert "(replay)" in rejected[0] and "(stale)" in rejected[1]
    assert "once only" not in err and "old news" not in err and "old news" not in out
    assert err.splitlines()[-1] == "unibus: not shown: 2 messages rejected (1 replay, 1 stale)"  # counted


# --------------------------------------------------------------------------- removed members


async def test_nothing_is_sent_to_a_removed_member(world, tmp_path):
    rid = await new_room(world, "bob", "carol")
    async with world.sdk("alice") as a:
        await a.remove_room_member(rid, "carol")

    # bob may not rekey: refused, naming who can; nothing published under epoch 1
    async def bob_sends() -> None:
        failed(await cli(tmp_path, world, "bob", "send", rid, "chat", "carol must not read"), "needs a rekey",
               "alice", f"unibus rooms rekey {rid}")

    assert await first_published_after(world, rid, bob_sends) == f"unibus.room.{rid}.sentinel"
    with pytest.raises(RekeyRequired) as e:
        async with world.sdk("bob") as b, b.bus() as bus:
            await bus.send(rid, "chat", "x")
    assert e.value.rekeyers == ["alice"]
    assert (await server_room(world, rid))["epoch"] == 1
    # alice may: her send rekeys first (said on stderr), and carol gets no key of the new epoch
    proc = await cli(tmp_path, world, "alice", "send", rid, "chat", "after the rekey")
    assert proc.returncode == 0, proc.stderr
    assert "rekeyed it to epoch 2" in proc.stderr
    room = await server_room(world, rid)
    assert room["epoch"] == 2 and not room["rekey_required"]
    async with world.sdk("carol") as c:
        with pytest.raises(KeyUnavailable):
            await c.room_key(rid, 2)
    # blob put follows the same rule
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    async with world.sdk("alice") as a:
        await a.add_room_member(rid, "mallory")
    async with world.sdk("mallory") as m:
        with pytest.raises(RekeyRequired):
            await put_blob(m, rid, f)
    proc = await cli(tmp_path, world, "alice", "blob", "put", rid, str(f))
    assert proc.returncode == 0 and "rekeyed it to epoch 3" in proc.stderr, proc.stderr


async def test_a_subscription_refused_is_still_a_bus_error(world):
    rid = await new_room(world, "bob")
    async with world.sdk("carol") as c, c.bus() as bus:
        with pytest.raises(BusError):
            async with bus.listen(rid) as msgs:
                await asyncio.wait_for(msgs.__anext__(), 5)


# --------------------------------------------------------------------------- the SDK's verified keys


async def test_rekey_seals_to_the_log_and_keys_are_verified_once(world, mitm):
    rid = await new_room(world, "bob", "carol", rekey=False)
    async with world.sdk("alice", mitm.url) as a, world.sdk("bob", mitm.url) as b:
        with pytest.raises(KeyUnavailable) as e:
            await b.room_key(rid)
        assert e.value.status == 404 and "rooms rekey" in str(e.value)
        assert await a.rekey(rid) == 1
        [(_, _, body)] = mitm.posted_keys()
        posted = json.loads(body)
        assert set(posted["sealed"]) == set(posted["sigs"]) == {"alice", "bob", "carol"}
        assert len(base64.b64decode(posted["sealed"]["bob"])) == 1120 + 48  # X-Wing enc + the sealed key
        # sealed at the verified head; the rekey then synced to its own keys entry, the next one
        assert posted["log_head"] == {"seq": a.verified.head[0] - 1, "hash": a.verified.hash_at(a.verified.head[0] - 1)}
        assert a.verified.rooms[rid].epochs[1].seq == a.verified.head[0]
        for h, sealed in posted["sealed"].items():  # each package signed by alice at the verified head
            data = key_package_input(rid, 1, h, base64.b64decode(sealed), posted["log_head"]["seq"],
                                     posted["log_head"]["hash"])
            assert world.people["alice"].sign_key.public_key().verify(base64.b64decode(posted["sigs"][h]), data) \
                is None
        epoch, key = await b.room_key(rid)
        assert (epoch, key) == (1, a.cached_key(rid, 1))
        n = len(mitm.seen)
        assert await b.room_key(rid, 1) == (1, key)  # cached: nothing asked
        with pytest.raises(KeyUnavailable):
            await b.room_key(rid, 7)
        with pytest.raises(KeyUnavailable):
            await b.room_key(rid, 7)  # remembered
        assert len(mitm.seen) == n + 1


async def test_rekey_starts_again_after_a_409(world, mitm):
    rid = await new_room(world, "bob", rekey=False)
    conflicts = {"left": 2}

    def race(method: str, path: str) -> tuple[int, Any] | None:
        if method == "POST" and path.endswith("/keys") and conflicts["left"]:
            conflicts["left"] -= 1
            return 409, {"type": "about:blank", "title": "Conflict", "status": 409, "detail": "epoch must be current+1"}
        return None

    mitm.intercept = race
    async with world.sdk("alice", mitm.url) as a:
        assert await a.rekey(rid) == 1
        assert conflicts["left"] == 0 and len(mitm.posted_keys()) == 1
        heads = [r for r in mitm.seen if r[1] == "/v1/log/head"]
        assert len(heads) >= 3  # every attempt verified the log again
        conflicts["left"] = 4
        with pytest.raises(ApiError) as e:
            await a.rekey(rid)
        assert e.value.status == 409 and conflicts["left"] == 0  # 1 try + 3 retries


async def test_undecryptable_and_malformed_messages_are_rejected(world):
    rid = await new_room(world, "bob")
    subject = f"unibus.room.{rid}.t"
    alice = world.people["alice"]
    async with world.sdk("alice") as a, world.sdk("bob") as b, a.bus() as abus, b.bus() as bbus:
        key = (await a.room_key(rid))[1]
        async with bbus.listen(rid) as msgs, bbus.listen(rid, include_errors=False) as quiet:
            now = int(time.time() * 1000)
            wrong = encrypt_message(bytes(32), subject, 1, b"wrong key")  # signed, but not the room key
            await publish_raw(abus, subject, wrong, message_headers(alice, subject, 1, wrong, now))
            good = encrypt_message(key, subject, 1, b"ok")
            await publish_raw(abus, subject, good, {**message_headers(alice, subject, 1, good, now),
                                                    "Unibus-Epoch": "x"})
            await abus.send(rid, "t", b"\x00\xffbinary")
            got = [await asyncio.wait_for(msgs.__anext__(), 10) for _ in range(3)]
            only = await asyncio.wait_for(quiet.__anext__(), 10)
            assert quiet.rejected == {"decrypt": 1, "malformed": 1}
    assert [(g.reason, g.plaintext) for g in got] == [("decrypt", None), ("malformed", None),
                                                      (None, b"\x00\xffbinary")]
    assert "does not authenticate" in got[0].error and "Unibus-Epoch" in got[1].error
    assert (only.plaintext, only.sender) == (b"\x00\xffbinary", "alice")


def chain_again(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` with each ``prev`` the hash of the entry before it, as a server rewriting its history would."""
    out = list(entries)
    for i in range(1, len(out)):
        if out[i]["seq"] == out[i - 1]["seq"] + 1:
            out[i] = {**out[i], "prev": entry_hash(out[i - 1])}
    return out


async def test_an_entry_whose_signature_was_changed_is_named(world, tmp_path, mitm):
    async with world.sdk("alice") as a:
        head = await a.log_head()
        target = max(1, head["seq"] - 3)

    def tamper(method: str, path: str, query: str, doc: Any) -> Any:
        if path != "/v1/log":
            return None
        out = []
        for e in doc["entries"]:
            if e["seq"] == target and e["kind"] == "request":
                label, _, rest = e["request"]["signature"].partition("=:")
                raw = bytearray(base64.b64decode(rest[:-1]))
                raw[5] ^= 1
                e = {**e, "request": {**e["request"], "signature": f"{label}=:{base64.b64encode(raw).decode()}:"}}
            out.append(e)
        return {"entries": chain_again(out), "head": doc["head"]}

    mitm.rules.append(tamper)
    line = failed(await cli(tmp_path, world, "alice", "log", "verify", server=mitm.url), f"entry {target}")
    assert "the signature does not verify with" in line
    async with world.sdk("alice", mitm.url) as a:
        with pytest.raises(VerificationError) as e:
            await a.sync()
        assert e.value.seq == target


@pytest.mark.parametrize("rewrite", ["as-stored", "rechained", "rechained-with-head"])
async def test_an_entry_altered_where_no_signature_covers_it_is_named(world, tmp_path, mitm, rewrite):
    """An entry's ``at`` (the server's clock) is covered by no signature, so an entry whose ``at``
    was changed fails no check of its own: the chain alone named the entry after it, or, with the
    rest of the log chained again, only the verified head ("fork"), and so did a head served to
    match (a review). ``log verify`` now names the entry itself when this client verified it
    before; a client that never did names both entries of the broken link."""
    async with world.sdk("alice") as a:
        real = (await a.log())["entries"]
    assert len(real) < 500  # one page
    target = max(1, real[-1]["seq"] - 3)
    altered = [{**e, "at": e["at"] + 1} if e["seq"] == target else e for e in real]
    if rewrite != "as-stored":
        altered = chain_again(altered)
    by_seq = {e["seq"]: e for e in altered}
    assert (await cli(tmp_path, world, "alice", "log", "verify", server=mitm.url)).returncode == 0  # the replica

    def tamper(method: str, path: str, query: str, doc: Any) -> Any:
        if path == "/v1/log/head" and rewrite == "rechained-with-head" and doc["seq"] == altered[-1]["seq"]:
            return {"seq": altered[-1]["seq"], "hash": entry_hash(altered[-1])}
        if path != "/v1/log":
            return None
        return {"entries": [by_seq.get(e["seq"], e) for e in doc["entries"]], "head": doc["head"]}

    mitm.rules.append(tamper)
    line = failed(await cli(tmp_path, world, "alice", "log", "verify", server=mitm.url), f"entry {target}:")
    assert "the server altered it" in line
    # Another identity's client, with no replica of this server, can only see the chain break.
    if rewrite == "as-stored":
        failed(await cli(tmp_path, world, "bob", "log", "verify", server=mitm.url), f"entry {target + 1}:",
               f"hash of entry {target}:")


async def test_a_listener_stops_on_a_rolled_back_log(world, mitm):
    rid = await new_room(world, "bob")
    async with world.sdk("bob", mitm.url) as b, b.bus() as bus, bus.listen(rid) as msgs, world.sdk("alice") as a, \
            a.bus() as abus:
        await abus.send(rid, "chat", "epoch one")
        assert (await asyncio.wait_for(msgs.__anext__(), 10)).plaintext == b"epoch one"
        seen = b.verified.head
        mitm.rules.append(lambda m, p, q, doc: {**doc, "seq": seen[0] - 1, "hash": b.verified.hash_at(seen[0] - 1)}
                          if p == "/v1/log/head" else None)
        await a.rekey(rid)
        await abus.send(rid, "chat", "epoch two")  # bob needs epoch 2's key: a sync, refused
        with pytest.raises(LogVerificationError, match="rollback") as e:
            await asyncio.wait_for(msgs.__anext__(), 10)
        assert e.value.seq == seen[0]
