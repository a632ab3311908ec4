"""Red team e2e-r3: the bus path, blobs on the client, and the client's HTTP behaviour.

Uses attackkit's module world (a real membershipd with a real nats-server and
SQLite; alice admin, bob, carol, mallory) and its real aiohttp :class:`Proxy`
(the compromised server / HTTP MITM). Each test asserts the safe behaviour. Five
were holes this round found: four are fixed, and the bus-login relay is a known
limit, documented, that stays a strict xfail; the others are attacks that held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import stat
import time
from typing import Any

import pytest
from aiohttp import web
from attackkit import new_room, publish_raw, serving

from unibus.client import ApiError, BusError, UnibusClient
from unibus.client.api import ServerUnreachable
from unibus.client.blobs import put_blob, get_blob
from unibus.client.keys import generate_identity
from unibus.client.signed import new_msg_id
from unibus.testing import MembershipdProcess, bootstrap_member, free_port


class Relay:
    """A fake NATS server: a TCP relay to a real nats-server that injects its own commands after the
    client's CONNECT and records everything the real server sends back."""

    def __init__(self, target_port: int, inject: list[bytes]) -> None:
        self.target, self.inject = target_port, list(inject)
        self.port = free_port()
        self.seen = bytearray()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)
        return self

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [cw, uw]

        async def client_to_server() -> None:
            buf = b""
            while data := await cr.read(65536):
                uw.write(data)
                buf += data
                if self.inject and b"CONNECT " in buf:
                    uw.writelines(self.inject)  # rides on the client's login
                    self.inject = []
                await uw.drain()

        async def server_to_client() -> None:
            while data := await ur.read(65536):
                self.seen += data
                cw.write(data)
                await cw.drain()

        for coro in (client_to_server(), server_to_client()):
            task = asyncio.get_running_loop().create_task(coro)
            self.tasks.add(task)

    async def stop(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _fake_headers(sender: str, epoch: int) -> dict[str, str]:
    return {"Unibus-Epoch": str(epoch), "Unibus-Sender": sender, "Unibus-Time": str(int(time.time() * 1000)),
            "Unibus-Msg-Id": new_msg_id(), "Unibus-Sig": base64.b64encode(os.urandom(64)).decode()}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- holes


@pytest.mark.xfail(strict=True, reason="known limit, documented in docs/bus-auth.md (One bus key, one deployment): "
                                       "a compromised deployment's GET /v1/bus can relay your bus login to another "
                                       "deployment where the same bus key is registered")
async def test_a_servers_bus_cannot_log_in_as_you_on_another_deployment(world, proxy, tmp_path):
    """alice uses one identity with two deployments (the case the HTTP `tag` exists for). Deployment A is
    compromised: its `GET /v1/bus` names a fake NATS server that relays to deployment B's nats-server.
    B's nonce goes to alice's client, which signs it with her bus key while "connecting to A": A now
    holds a connection to B's bus logged in as alice, subscribes to her B room and reads its traffic
    (sender, topic, time, ciphertext). Safe: no B room traffic reaches A."""
    bdir = tmp_path / "b" / "daemon"
    bdir.mkdir(parents=True)
    bootstrap_member(bdir, world.people["alice"], "admin")
    b = MembershipdProcess(bdir).start()
    relay = None
    try:
        async with UnibusClient(b.base_url, world.people["alice"], notice=lambda _t: None) as ab:
            brid = (await ab.create_room("payroll"))["room_id"]
            await ab.rekey(brid)
        relay = await Relay(int(b.nats_url.rsplit(":", 1)[1]),
                            [f"SUB unibus.room.{brid}.> 4242\r\n".encode()]).start()
        proxy.rules.append(lambda _m, p, _q, doc: {**doc, "servers": [f"nats://127.0.0.1:{relay.port}"]}
                           if p == "/v1/bus" else None)
        async with world.sdk("alice", proxy.url) as a:
            with contextlib.suppress(BusError):
                async with a.bus():  # alice joins "A's bus"
                    async with UnibusClient(b.base_url, world.people["alice"], notice=lambda _t: None) as ab, \
                            ab.bus() as bb:
                        await bb.send(brid, "salaries", b"secret")  # B's traffic, on B's real bus
                    await asyncio.sleep(0.3)
        assert f"unibus.room.{brid}".encode() not in relay.seen, bytes(relay.seen[-600:])
    finally:
        if relay is not None:
            await relay.stop()
        b.stop()


async def test_a_huge_http_answer_is_cut_short():
    """A compromised server (or a MITM of http://) answers GET /v1/log/head with 96 MiB (it could go
    on for the whole 10 s timeout: gigabytes). Safe: the client stops reading and raises."""
    body_mib, sent = 96, 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        chunk = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(body_mib):
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write(b'{"seq": 0, "hash": "x"}')
        return resp

    async with serving(huge) as url, UnibusClient(url, generate_identity("zed"), timeout=15) as c:
        with pytest.raises((ApiError, ServerUnreachable)):
            await c.log_head()
    assert sent < body_mib << 20


async def test_messages_of_epochs_the_log_never_had_do_not_each_cost_a_sync(world, proxy):
    """mallory (an ordinary member of the room) publishes 200 messages, each claiming to be alice's and
    naming an epoch the log never had (random signature: no key needed to make them). carol's listener
    checks the key before the sender and signature, finds no such epoch, and syncs with the server for
    each one: one GET /v1/log/head per message per listener, for free. Safe: a bounded number of syncs."""
    rid = await new_room(world, "carol", "mallory")
    heads = 0

    def count(request: web.Request, _body: bytes) -> None:
        nonlocal heads
        heads += request.path == "/v1/log/head"

    proxy.answer = count
    async with world.sdk("carol", proxy.url) as c, c.bus() as cbus, world.sdk("mallory") as m, m.bus() as mbus:
        async with cbus.listen(rid) as messages:
            before = heads
            for i in range(200):
                await mbus.nc.publish(f"unibus.room.{rid}.chat", b"\0" * 64, headers=_fake_headers("alice", 10**6 + i))
            await mbus.nc.flush()
            for _ in range(200):
                msg = await asyncio.wait_for(messages.__anext__(), 10)
                assert msg.reason == "no-key"
            assert heads - before <= 5, f"{heads - before} syncs for 200 forged messages"


async def test_a_flood_is_not_buffered_without_bound(world):
    """mallory publishes 256 MiB of junk to the room while carol's listener is busy (not iterating).
    The listener's callback moves every message from nats-py's bounded pending queue into its own
    unbounded asyncio.Queue, so neither nats-py's slow-consumer limit nor nats-server's applies: carol
    holds all of it. Safe: the buffer stays bounded (nats-py's own default limit is 128 MiB; carol's memory
    may grow by 160 MiB here)."""
    rid = await new_room(world, "carol", "mallory")
    async with world.sdk("carol") as c, c.bus() as cbus, world.sdk("mallory") as m, m.bus() as mbus:
        async with cbus.listen(rid) as listener:
            base = _rss()
            junk = os.urandom(64 * 1024)
            for _ in range(4096):  # 256 MiB
                await mbus.nc.publish(f"unibus.room.{rid}.x", junk, headers=_fake_headers("mallory", 1))
            await mbus.nc.flush()
            await asyncio.sleep(1.0)
            grown = _rss() - base
            queued = listener._queue.qsize()
        del junk
        assert grown < 160 << 20, f"RSS grew by {grown >> 20} MiB; {queued} messages queued"


def test_an_identity_file_of_another_user_is_refused(tmp_path):
    """A process with DAC override (root: a service, `sudo -E unibus` with another user's HOME) is given
    an identity file that another local user planted, mode 0600: load_identity checked only the mode,
    not the owner (the replica refuses another user's files), so it signed as the planter's member,
    whose keys the planter holds. As root the file really is another uid's; otherwise (only root can
    make one) the same check is given the file's own stat with another owner."""
    from unibus.client.keys import IdentityError, _check_identity_stat, load_identity, save_identity

    path = tmp_path / "identity.json"
    save_identity(generate_identity("eve"), path)
    assert load_identity(path).handle == "eve"  # one's own file is fine
    if os.geteuid() == 0:
        os.chown(path, 54321, 54321)
        with pytest.raises(IdentityError, match="belongs to another user"):
            load_identity(path)
    else:
        fields = list(os.stat(path))
        fields[stat.ST_UID] = os.geteuid() + 1
        with pytest.raises(IdentityError, match="belongs to another user"):
            _check_identity_stat(str(path), os.stat_result(fields))


# --------------------------------------------------------------------------- attacks that held


async def test_a_signed_request_is_not_resent_to_a_redirect(world, proxy):
    """The server answers a signed POST with 307 to another host: the client does not follow it (the
    other host never sees the signature) and reports the 307."""
    hits: list[str] = []

    async def other(request: web.Request) -> web.Response:
        hits.append(request.headers.get("Signature", ""))
        return web.json_response({})

    async with serving(other) as other_url:
        async def redirect(request: web.Request, _body: bytes) -> Any:
            if request.method == "POST" and request.path == "/v1/rooms":
                raise web.HTTPTemporaryRedirect(f"{other_url}/v1/rooms")
            return None

        proxy.answer = redirect
        async with world.sdk("alice", proxy.url) as a:
            with pytest.raises(ApiError) as e:
                await a.create_room("x")
    assert e.value.status == 307 and hits == []


async def test_a_message_moved_to_another_room_or_topic_is_refused(world):
    """mallory, in rooms A and B, re-publishes alice's valid message of room A (same headers, same
    payload) on room B's subject and on another topic of room A: both refused (the subject is signed
    and is the AEAD's associated data); the original is accepted once, a replay refused."""
    ra = await new_room(world, "carol", "mallory")
    rb = await new_room(world, "carol", "mallory")
    async with world.sdk("alice") as a, a.bus() as abus, world.sdk("carol") as c, c.bus() as cbus, \
            world.sdk("mallory") as m, m.bus() as mbus:
        async with cbus.listen(ra) as la, cbus.listen(rb) as lb, mbus.listen(ra) as spy:
            await abus.send(ra, "chat", b"for room A only")
            got = await asyncio.wait_for(spy._queue.get(), 10)  # the raw message, as mallory received it
            first = await asyncio.wait_for(la.__anext__(), 10)
            assert first.ok and first.plaintext == b"for room A only"
            headers = dict(got.headers)
            async with cbus.listen(ra) as fresh:  # a guard that has not seen the msg id
                await publish_raw(mbus, f"unibus.room.{rb}.chat", got.data, headers)
                await publish_raw(mbus, f"unibus.room.{ra}.other", got.data, headers)
                await publish_raw(mbus, got.subject, got.data, headers)
                moved = await asyncio.wait_for(lb.__anext__(), 10)
                other = await asyncio.wait_for(fresh.__anext__(), 10)
                again = [await asyncio.wait_for(la.__anext__(), 10) for _ in range(2)]
    assert moved.plaintext is None and moved.reason == "signature"
    assert other.plaintext is None and other.reason == "signature"
    assert [m.reason for m in again] == ["replay", "replay"] and not any(m.plaintext for m in again)


async def test_get_blob_does_not_write_through_a_symlink_at_out(world, tmp_path):
    """OUT is a symlink (planted, or left over) to a file of the user's: the download never writes into
    the link's target. (It replaced the link with a new 0600 file; since a review found that this
    replaced `/dev/stdout`, as root, a link is refused and left as it is.)"""
    rid = await new_room(world, "carol")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3000))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.symlink_to(victim)
    async with world.sdk("carol") as c:
        blob_id = await put_blob(c, rid, src)
        with pytest.raises(FileExistsError, match="is a symbolic link"):
            await get_blob(c, rid, blob_id, out)
    assert victim.read_bytes() == b"keep me"
    assert out.is_symlink() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
