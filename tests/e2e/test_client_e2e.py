"""The member's client end to end: `unibus` CLI and SDK against a real membershipd + NATS.

alice is bootstrapped offline as admin (`membershipd member add`), then the
daemon is started on that data dir. bob uses MLKEM768_X25519, carol X25519.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from unibus import forkrun
from unibus.client import ApiError, BusError, KeyUnavailable, UnibusClient
from unibus.client.keys import load_identity
from unibus.client.sealing import SealError, open_room_key
from unibus.testing import run_membershipd

#: Extra `membershipd serve` flags for these tests.
DAEMON_ARGS: tuple[str, ...] = ()


# --------------------------------------------------------------------------- helpers


def unibus(*args: str, server: str | None = None, identity: Path | None = None,
           timeout: float = 60, stdin: str | None = None, stdout: Any = subprocess.PIPE,
           ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    pre = []
    if server:
        pre += ["--server", server]
    if identity:
        pre += ["--identity", str(identity)]
    return forkrun.run("unibus.client.cli", [*pre, *args], env=env, timeout=timeout, input=stdin, stdout=stdout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], status: int) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    # a member's first changing command syncs first, and says whose log it trusts on first use
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " on first use: " not in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"unibus: error: {status} "), lines[0]
    return lines[0]


class Member:
    def __init__(self, handle: str, path: Path, operator_line: str) -> None:
        self.handle = handle
        self.path = path
        self.operator_line = operator_line
        self.identity = load_identity(path)
        self.server: str | None = None

    @property
    def key_flags(self) -> list[str]:
        """``--handle H --role member --sign-pub … --enc-pub … --enc-suite S`` from keygen's line."""
        return shlex.split(self.operator_line)[3:]

    def cli(self, *args: str, timeout: float = 60, stdin: str | None = None,
            stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
        return unibus(*args, server=self.server, identity=self.path, timeout=timeout, stdin=stdin, stdout=stdout)

    def client(self) -> UnibusClient:
        assert self.server
        return UnibusClient(self.server, self.identity)


def keygen(tmp_path: Path, handle: str, suite: str = "X25519") -> Member:
    path = tmp_path / "ids" / f"{handle}.json"
    out = ok(unibus("keygen", "--handle", handle, "--enc-suite", suite, "--out", str(path)))
    return Member(handle, path, out.strip())


class Listener:
    """`unibus listen ROOM --json` in the background; ready once it says it is listening."""

    def __init__(self, member: Member, room_id: str, *extra: str, as_json: bool = True,
                 stdout: Any = subprocess.PIPE) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
        self.as_json = as_json
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unibus.client.cli", "--server", member.server, "--identity", str(member.path),
             "listen", room_id, *(["--json"] if as_json else []), *extra],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._ready = threading.Event()
        # One reader per pipe, for the process's whole life: `communicate()` would
        # read stderr beside this thread and split its lines between them.
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True)]
        if stdout is subprocess.PIPE:
            self._readers.append(threading.Thread(target=self._read_stdout, daemon=True))
        for t in self._readers:
            t.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "listening on" in line:
                self._ready.set()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"listener not ready (rc={self.proc.poll()}): {''.join(self.stderr)}")

    def finish(self, timeout: float = 20) -> tuple[int, list[dict[str, Any]]]:
        """Wait for the exit; the exit status and, with ``--json``, the messages it printed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._join()
            raise AssertionError(f"listener did not finish: {self.out!r} {''.join(self.stderr)}") from None
        self._join()
        msgs = [json.loads(line) for line in self.stdout if line.strip()] if self.as_json else []
        return self.proc.returncode, msgs

    def _join(self) -> None:
        for t in self._readers:
            t.join(5)
            assert not t.is_alive(), "a pipe of the listener stayed open"

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def made_keys(tmp_path_factory) -> dict[str, Member]:
    """alice, bob (MLKEM768_X25519) and carol (X25519), made once by ``unibus keygen``."""
    where = tmp_path_factory.mktemp("keys")
    return {"alice": keygen(where, "alice"), "bob": keygen(where, "bob", "MLKEM768_X25519"),
            "carol": keygen(where, "carol")}


def fresh_copy(member: Member, tmp_path: Path) -> Member:
    """The identity file alone, in this test's directory: no replica, seen ids or state of another test's."""
    path = tmp_path / "ids" / member.path.name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copy2(member.path, path)  # keeps its 0600
    return Member(member.handle, path, member.operator_line)


@pytest.fixture
def world(tmp_path, membershipd_factory, made_keys):
    """alice (admin, bootstrapped offline), bob (MLKEM768_X25519) and carol (X25519) identities, a daemon."""
    alice, bob, carol = (fresh_copy(made_keys[h], tmp_path) for h in ("alice", "bob", "carol"))
    data_dir = tmp_path / "data"
    flags = alice.key_flags
    flags[flags.index("--role") + 1] = "admin"
    boot = run_membershipd("member", "add", "--data-dir", str(data_dir), *flags)
    assert boot.returncode == 0, boot.stderr
    daemon = membershipd_factory(*DAEMON_ARGS, data_dir=data_dir)
    assert daemon.healthz()[1]["posture"]["bus_auth"] == "enforce"
    for m in (alice, bob, carol):
        m.server = daemon.base_url
    return {"alice": alice, "bob": bob, "carol": carol, "daemon": daemon}


# --------------------------------------------------------------------------- members


def test_whoami_and_members_via_cli(world):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    me = json.loads(ok(alice.cli("whoami", "--json")))
    assert me["handle"] == "alice" and me["role"] == "admin"
    assert me["sign_pub"] == alice.identity.sign_pub_b64 and me["enc_pub"] == alice.identity.enc_pub_b64
    text = ok(alice.cli("whoami"))
    assert "alice" in text and "admin" in text and alice.identity.bus_pub in text

    # bob is not a member yet: 401
    refused(bob.cli("whoami"), 401)

    # the keygen line's flags are `members add`'s flags
    assert ok(alice.cli("members", "add", *bob.key_flags)).startswith("added bob")
    added = json.loads(ok(alice.cli("members", "add", *carol.key_flags, "--json")))
    assert added["handle"] == "carol" and added["role"] == "member" and added["enc_suite"] == "X25519"
    refused(alice.cli("members", "add", *carol.key_flags), 409)

    listed = json.loads(ok(bob.cli("members", "list", "--json")))["members"]
    by_handle = {m["handle"]: m for m in listed}
    assert set(by_handle) == {"alice", "bob", "carol"}
    assert by_handle["bob"]["enc_suite"] == "MLKEM768_X25519"
    assert by_handle["bob"]["enc_pub"] == bob.identity.enc_pub_b64
    table = ok(bob.cli("members", "list")).splitlines()
    assert len(table) == 3 and any(line.split()[:2] == ["alice", "admin"] for line in table)
    assert json.loads(ok(bob.cli("whoami", "--json")))["enc_suite"] == "MLKEM768_X25519"

    # a member cannot add or remove members
    refused(bob.cli("members", "remove", "carol"), 403)

    ok(alice.cli("members", "remove", "carol"))
    refused(carol.cli("whoami"), 401)
    refused(alice.cli("members", "remove", "carol"), 404)
    assert {m["handle"] for m in json.loads(ok(alice.cli("members", "list", "--json")))["members"]} == {"alice", "bob"}


async def test_members_via_sdk(world):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    async with alice.client() as a:
        assert (await a.me())["handle"] == "alice"
        rec = bob.identity.public_record()
        created = await a.add_member(rec["handle"], rec["sign_pub"], rec["enc_pub"], rec["enc_suite"], bus_pub=rec["bus_pub"])
        assert created["handle"] == "bob" and created["role"] == "member"
        assert (await a.get_member("bob"))["enc_pub"] == rec["enc_pub"]
        assert (await a.set_role("bob", "admin"))["role"] == "admin"
        assert {m["handle"] for m in await a.list_members()} == {"alice", "bob"}
        with pytest.raises(ApiError) as e:
            await a.add_member(rec["handle"], rec["sign_pub"], rec["enc_pub"], rec["enc_suite"], bus_pub=rec["bus_pub"])
        assert e.value.status == 409
        with pytest.raises(ApiError) as e:
            await a.add_member("x", "not base64", rec["enc_pub"])
        assert e.value.status in (400, 422)
        async with bob.client() as b:
            # bob is an admin now
            c = carol.identity.public_record()
            await b.add_member(c["handle"], c["sign_pub"], c["enc_pub"], bus_pub=c["bus_pub"])
            await a.set_role("bob", "member")
            with pytest.raises(ApiError) as e:
                await b.remove_member("carol")
            assert e.value.status == 403 and e.value.problem["status"] == 403
            assert str(e.value).startswith("403 ")
        await a.remove_member("carol")
        with pytest.raises(ApiError) as e:
            await a.get_member("carol")
        assert e.value.status == 404


# --------------------------------------------------------------------------- rooms, keys, bus


def test_rooms_rekey_send_listen_and_removal(world):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    ok(alice.cli("members", "add", *bob.key_flags))
    ok(alice.cli("members", "add", *carol.key_flags))

    room_id = ok(alice.cli("rooms", "create", "ops")).strip()
    room = json.loads(ok(alice.cli("rooms", "show", room_id, "--json")))
    assert room["room_id"] == room_id and room["name"] == "ops" and room["epoch"] == 0
    assert room["rekey_required"] is True and room["subject"] == f"unibus.room.{room_id}"
    assert [m["handle"] for m in room["members"]] == ["alice"]

    # bob cannot see a room he is not in
    line = bob.cli("rooms", "show", room_id)
    assert line.returncode == 1 and any(f"error: {s} " in line.stderr for s in (403, 404)), line.stderr
    ok(alice.cli("rooms", "add", room_id, "bob"))
    shown = json.loads(ok(alice.cli("rooms", "add", room_id, "carol", "--json")))
    assert {m["handle"] for m in shown["members"]} == {"alice", "bob", "carol"}
    assert {m["handle"]: m["enc_suite"] for m in shown["members"]}["bob"] == "MLKEM768_X25519"
    assert shown["rekey_required"] is True

    # sending before any key exists: bob may not rekey, so exit 1 naming who can
    err = bob.cli("send", room_id, "chat", "too early")
    assert err.returncode == 1 and "rooms rekey" in err.stderr and "alice" in err.stderr, err.stderr

    assert json.loads(ok(alice.cli("rooms", "rekey", room_id, "--json"))) == {"room_id": room_id, "epoch": 1}
    room = json.loads(ok(bob.cli("rooms", "show", room_id, "--json")))
    assert room["epoch"] == 1 and room["rekey_required"] is False
    listed = json.loads(ok(carol.cli("rooms", "list", "--json")))["rooms"]
    assert [r["room_id"] for r in listed] == [room_id]
    assert room_id in ok(carol.cli("rooms", "list"))

    async def keys(member: Member, epoch: int | None = None) -> tuple[int, bytes]:
        async with member.client() as c:
            return await c.room_key(room_id, epoch)

    e_b, key_b = asyncio.run(keys(bob))
    e_c, key_c = asyncio.run(keys(carol))
    assert e_b == e_c == 1 and key_b == key_c and len(key_b) == 32

    # carol listens, bob sends (CLI both)
    # (- reads the message from standard input: on the command line another user reads it in
    # /proc/PID/cmdline, a red team)
    listener = Listener(carol, room_id, "--count", "3")
    try:
        listener.wait_ready()
        ok(bob.cli("send", room_id, "chat", "hello carol"))
        ok(bob.cli("send", room_id, "alerts.disk", "line1\nline2 ✓"))
        ok(bob.cli("send", room_id, "chat", "-", stdin="the launch code ✓\n"))
        rc, msgs = listener.finish()
    finally:
        listener.kill()
    assert rc == 0
    assert [(m["topic"], m["text"], m["epoch"], m["sender"]) for m in msgs] == [
        ("chat", "hello carol", 1, "bob"), ("alerts.disk", "line1\nline2 ✓", 1, "bob"),
        ("chat", "the launch code ✓\n", 1, "bob")]
    assert msgs[0]["subject"] == f"unibus.room.{room_id}.chat"

    # text output: one line per message with its verified sender, control characters escaped
    listener = Listener(carol, room_id, "--count", "2", as_json=False)
    try:
        listener.wait_ready()
        ok(alice.cli("send", room_id, "chat", "multi\nline"))
        ok(bob.cli("send", room_id, "chat", "second"))
        rc, _ = listener.finish(timeout=20)
    finally:
        listener.kill()
    assert rc == 0
    assert listener.out.splitlines() == ["[chat] alice: multi\\nline", "[chat] bob: second"]
    # --no-sender is gone: every message is signed by its sender
    assert alice.cli("send", room_id, "chat", "x", "--no-sender").returncode == 2

    # alice removes carol: rekey_required, then a rekey to epoch 2
    ok(alice.cli("rooms", "remove", room_id, "carol"))
    room = json.loads(ok(alice.cli("rooms", "show", room_id, "--json")))
    assert room["rekey_required"] is True and room["epoch"] == 1
    assert {m["handle"] for m in room["members"]} == {"alice", "bob"}
    assert "epoch 2" in ok(alice.cli("rooms", "rekey", room_id))

    # carol: 404 for the new epoch (and "latest" is still epoch 1), the old key still opens
    with pytest.raises(KeyUnavailable) as e:
        asyncio.run(keys(carol, 2))
    assert e.value.status == 404
    assert asyncio.run(keys(carol, 1)) == (1, key_b)
    assert asyncio.run(keys(carol)) == (1, key_b)
    e2, key2 = asyncio.run(keys(bob))
    assert e2 == 2 and key2 != key_b
    assert asyncio.run(keys(bob, 1)) == (1, key_b)


def test_output_that_cannot_be_written_is_kept_but_a_message_is_never_diverted(world):
    """A red team: `rooms create > /dev/full` made the room and lost its id (exit 1, "No space left
    on device" alone). What a command prints after its change now goes to stderr, after a line
    that says so (exit 1), except a message `listen` received: a message in clear never goes to
    stderr, which may be a journal; listen stops, exit 1. (Linux's /dev/full: the tests run on Linux.)"""
    alice, bob = world["alice"], world["bob"]
    with open("/dev/full", "w") as full:
        proc = alice.cli("rooms", "create", "lost-and-found", "--json", stdout=full)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if " on first use: " not in line]
    assert said[0] == ("unibus: error: standard output could not be written (No space left on device); what "
                       "this command prints follows here"), said
    room_id = json.loads(said[1])["room_id"]
    assert [r["room_id"] for r in json.loads(ok(alice.cli("rooms", "list", "--json")))["rooms"]] == [room_id]
    ok(alice.cli("members", "add", *bob.key_flags))
    ok(alice.cli("rooms", "add", room_id, "bob"))
    ok(alice.cli("rooms", "rekey", room_id))

    with open("/dev/full", "w") as full:
        listener = Listener(bob, room_id, "--count", "1", stdout=full)
        try:
            listener.wait_ready()
            ok(alice.cli("send", room_id, "chat", "-", stdin="not for the journal"))
            rc, _ = listener.finish()
        finally:
            listener.kill()
    assert rc == 1
    err = "".join(listener.stderr)
    assert "not for the journal" not in err and "No space left on device" in err and "Traceback" not in err, err

    for args in (["--help"], ["--version"], ["rooms", "--help"]):
        with open("/dev/full", "w") as full:
            proc = unibus(*args, stdout=full)
        assert proc.returncode == 1 and proc.stderr.splitlines() == ["unibus: error: No space left on device"], (
            args, proc.stderr)


async def test_sdk_bus_and_sealed_key_binding(world):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    async with alice.client() as a, bob.client() as b, carol.client() as c:
        for m in (bob, carol):
            rec = m.identity.public_record()
            await a.add_member(rec["handle"], rec["sign_pub"], rec["enc_pub"], rec["enc_suite"], bus_pub=rec["bus_pub"])
        room = await a.create_room("dev")
        rid = room["room_id"]
        other = (await a.create_room("other"))["room_id"]
        for h in ("bob", "carol"):
            await a.add_room_member(rid, h)
            await a.add_room_member(other, h)
        assert await a.rekey(rid) == 1
        assert await a.rekey(other) == 1

        info = await b.bus_info()
        assert info["servers"] and info["inbox_prefix"] == "_INBOX_bob"
        assert info["user_nkey"] == bob.identity.bus_pub
        assert info["rooms"][rid] == f"unibus.room.{rid}.>"

        # info binding: bob's sealed key of rid/1 does not open as another room or epoch
        doc = await b.my_key(rid, 1)
        sealed = base64.b64decode(doc["sealed"])
        assert open_room_key(sealed, bob.identity, rid, 1) == (await b.room_key(rid, 1))[1]
        for r, ep in ((other, 1), (rid, 2)):
            with pytest.raises(SealError):
                open_room_key(sealed, bob.identity, r, ep)

        async with a.bus(key_ttl=0) as abus, b.bus() as bbus, c.bus() as cbus:  # noqa: SIM117
            async with bbus.listen(rid) as bmsgs, cbus.listen(rid) as cmsgs:
                assert await abus.send(rid, "chat", "epoch one") == 1
                mb = await asyncio.wait_for(bmsgs.__anext__(), 10)
                mc = await asyncio.wait_for(cmsgs.__anext__(), 10)
                assert mb.plaintext == mc.plaintext == b"epoch one" and mb.epoch == 1 and mb.sender == "alice"

                await a.remove_room_member(rid, "carol")
                assert await a.rekey(rid) == 2
                assert await abus.send(rid, "chat", "epoch two") == 2
                mb2 = await asyncio.wait_for(bmsgs.__anext__(), 10)
                assert (mb2.epoch, mb2.plaintext) == (2, b"epoch two")
                # carol's subscription is revoked (bus auth enforced). A message that beat
                # the reload to her is one she cannot decrypt: never the plaintext.
                with pytest.raises(BusError, match="revoked"):
                    while True:
                        mc2 = await asyncio.wait_for(cmsgs.__anext__(), 5)
                        assert mc2.plaintext is None and mc2.epoch == 2 and "no key for epoch 2" in mc2.error

                # bob sends at the current epoch too
                await bbus.send(rid, "chat", "from bob")
                mb3 = await asyncio.wait_for(bmsgs.__anext__(), 10)
                assert mb3.epoch == 2 and mb3.sender == "bob"

        with pytest.raises(KeyUnavailable):
            await c.room_key(rid, 2)
        assert (await c.room_key(rid, 1))[1] == (await b.room_key(rid, 1))[1]


async def test_member_deletion_makes_rooms_rekey_required(world):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    async with alice.client() as a:
        for m in (bob, carol):
            rec = m.identity.public_record()
            await a.add_member(rec["handle"], rec["sign_pub"], rec["enc_pub"], rec["enc_suite"], bus_pub=rec["bus_pub"])
        rid = (await a.create_room("r"))["room_id"]
        await a.add_room_member(rid, "bob")
        await a.add_room_member(rid, "carol")
        assert await a.rekey(rid) == 1
        await a.remove_member("carol")
        room = await a.get_room(rid)
        assert room["rekey_required"] is True
        assert {m["handle"] for m in room["members"]} == {"alice", "bob"}
        assert await a.rekey(rid) == 2
        assert (await a.get_room(rid))["rekey_required"] is False


async def test_concurrent_rekeys_both_land(world):
    alice, bob = world["alice"], world["bob"]
    async with alice.client() as a:
        rec = bob.identity.public_record()
        await a.add_member(rec["handle"], rec["sign_pub"], rec["enc_pub"], rec["enc_suite"], role="admin",
                           bus_pub=rec["bus_pub"])
        rid = (await a.create_room("race"))["room_id"]
        await a.add_room_member(rid, "bob")
        async with bob.client() as b:
            epochs = await asyncio.gather(a.rekey(rid), b.rekey(rid), a.rekey(rid))
            assert sorted(epochs) == [1, 2, 3]
            assert (await a.get_room(rid))["epoch"] == 3
            for e in (1, 2, 3):
                assert (await a.room_key(rid, e))[1] == (await b.room_key(rid, e))[1]


def test_cli_room_errors(world):
    alice, bob = world["alice"], world["bob"]
    ok(alice.cli("members", "add", *bob.key_flags))
    refused(alice.cli("rooms", "show", "doesnotexist"), 404)
    rid = ok(alice.cli("rooms", "create", "mine")).strip()
    # bob is not the owner nor an admin
    refused(bob.cli("rooms", "add", rid, "bob"), 403)
    refused(bob.cli("rooms", "rekey", rid), 403)
    ok(alice.cli("rooms", "add", rid, "bob"))
    ok(alice.cli("rooms", "rekey", rid))
    # a member may remove itself
    ok(bob.cli("rooms", "remove", rid, "bob"))
    assert json.loads(ok(alice.cli("rooms", "show", rid, "--json")))["rekey_required"] is True
    ok(alice.cli("rooms", "delete", rid))
    refused(alice.cli("rooms", "show", rid), 404)


def test_bus_access_follows_room_membership(world):
    """With --bus-auth enforce: no subscription without the room, revoked on removal,
    and a deleted member's connection is closed."""
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    ok(alice.cli("members", "add", *bob.key_flags))
    ok(alice.cli("members", "add", *carol.key_flags))
    rid = ok(alice.cli("rooms", "create", "closed")).strip()
    ok(alice.cli("rooms", "add", rid, "bob"))
    ok(alice.cli("rooms", "rekey", rid))

    # carol is not in the room: the bus refuses her subscription
    line = refused_bus(carol.cli("listen", rid, timeout=30))
    assert "subscribe" in line and f"unibus.room.{rid}.>" in line
    # nor may she publish there (she has no key either: that is what stops `send` first)
    assert carol.cli("send", rid, "chat", "hi").returncode == 1

    # bob listens; removing him from the room ends his listener with exit 1
    listener = Listener(bob, rid)
    try:
        listener.wait_ready()
        ok(alice.cli("rooms", "remove", rid, "bob"))
        rc, _ = listener.finish(timeout=15)
    finally:
        listener.kill()
    assert rc == 1
    assert any("revoked" in line for line in listener.stderr), "".join(listener.stderr)  # whole, not elided

    async def publish_refused_then_deleted_member_cut_off() -> None:
        async with alice.client() as a, carol.client() as c:
            room2 = (await a.create_room("two"))["room_id"]
            room3 = (await a.create_room("three"))["room_id"]
            for r in (room2, room3):
                await a.add_room_member(r, "carol")
                await a.rekey(r)
            # a long key_ttl: carol keeps sending with the key she holds, without asking the server
            async with c.bus(key_ttl=3600) as cbus:
                assert await cbus.send(room2, "chat", "in") == 1
                # removed (no rekey yet): carol still holds epoch 1's key, but the bus
                # refuses her publish: the 2xx comes after her connection was kicked, so
                # her next connection has the new rights. A send racing the kick can go
                # out on the old socket and be lost with it (its flush then waits out
                # connect_timeout, 5 s), so the bound leaves room for one such send.
                await a.remove_room_member(room2, "carol")
                deadline = time.monotonic() + 20
                with pytest.raises(BusError, match="refused.*publish"):
                    while time.monotonic() < deadline:
                        await cbus.send(room2, "chat", "still here?")
                        await asyncio.sleep(0.1)
                async with cbus.listen(room3) as msgs:
                    await a.remove_member("carol")
                    with pytest.raises(BusError):
                        await asyncio.wait_for(msgs.__anext__(), 15)

    asyncio.run(publish_refused_then_deleted_member_cut_off())


def refused_bus(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "refused" in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- blobs


def test_blob_put_and_get_via_cli(world, tmp_path):
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    ok(alice.cli("members", "add", *bob.key_flags))
    ok(alice.cli("members", "add", *carol.key_flags))
    room = json.loads(ok(alice.cli("rooms", "create", "files", "--json")))["room_id"]
    ok(alice.cli("rooms", "add", room, "bob"))
    ok(alice.cli("rooms", "rekey", room))

    src = tmp_path / "report.bin"
    src.write_bytes(os.urandom(200_000) + b"the end")
    blob_id = ok(alice.cli("blob", "put", room, str(src))).strip()
    assert len(blob_id) == 64
    stored = list((world["daemon"].data_dir / "blobs").rglob("*"))
    assert stored and not any(src.read_bytes()[:64] in p.read_bytes() for p in stored if p.is_file())  # ciphertext only

    out = tmp_path / "copy.bin"
    ok(bob.cli("blob", "get", room, blob_id, str(out)))
    assert out.read_bytes() == src.read_bytes()

    refused(carol.cli("blob", "get", room, blob_id, str(tmp_path / "nope")), 403)
    assert not (tmp_path / "nope").exists()
    bad = bob.cli("blob", "get", room, "not-an-id", str(out))
    assert bad.returncode == 2 and "64 hex" in bad.stderr
    missing = alice.cli("blob", "put", room, str(tmp_path / "missing.bin"))
    assert missing.returncode == 2 and "missing.bin" in missing.stderr
