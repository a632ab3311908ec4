"""Bus keys against a real daemon, real nats-server and real nats-py (docs/bus-auth.md#bus-keys).

A member's NATS login is its bus key, never its signing key: the rules of
POST /v1/members and PUT /v1/me/bus-key, a login with the signing key, key
rotation (old connections closed before the 200), and the 0.11 attack in
which a fake NATS server made the SDK sign an RFC 9421 signature base.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import nkeys
import pytest
import yarl
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.errors import NoServersError

from unibus.client import ApiError, BusError, UnibusClient
from unibus.client.keys import Identity, generate_identity, with_bus_key
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, free_port, http_json
from unibus.wire import nkey_from_public_key, nkey_from_sign_pub, sign_pub_from_nkey

WAIT = 10.0  # upper bound of every "eventually"; never a timing assertion


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the module, alice its admin, the loopback monitor on (for /connz)."""
    alice = generate_identity("alice")
    data_dir = tmp_path_factory.mktemp("buskeys") / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    proc = MembershipdProcess(data_dir, env={"UNIBUS_NATS_MONITOR": "1"}).start()
    proc.alice = alice
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def admin(daemon) -> AsyncIterator[UnibusClient]:
    async with UnibusClient(daemon.base_url, daemon.alice) as client:
        yield client


_handles = iter(f"m{i}" for i in range(10_000))


async def add(admin: UnibusClient, identity: Identity | None = None) -> Identity:
    """A new member with a bus key (a fresh handle per call: the daemon is shared)."""
    identity = identity or generate_identity(next(_handles))
    await admin.add_member(identity.handle, identity.sign_pub_b64, identity.enc_pub_b64, identity.enc_suite,
                           bus_pub=identity.bus_pub)
    return identity


def sign_seed_as_nkey(identity: Identity) -> str:
    return nkeys.encode_seed(identity.sign_seed, nkeys.PREFIX_BYTE_USER).decode()


async def login(url: str, seed: str) -> nats.NATS:
    return await nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False, max_reconnect_attempts=0,
                              connect_timeout=2)


async def refused(url: str, seed: str) -> bool:
    try:
        nc = await login(url, seed)
    except (nats.errors.Error, NoServersError, OSError) as e:
        return "authorization violation" in str(e).lower() or isinstance(e, NoServersError)
    await nc.close()
    return False


def connz_users(daemon: MembershipdProcess) -> list[str]:
    """Who holds the connections nats-server has open right now (its monitor, /connz?auth=true):
    the service user's nkey, and each member connection's handle (the callout names it)."""
    status, body = http_json("GET", f"http://127.0.0.1:{daemon.monitor_port}/connz?auth=true&limit=1024")
    assert status == 200, body
    return [c.get("authorized_user") for c in body.get("connections") or []]


async def eventually(check, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


# -- the rules of POST /v1/members ------------------------------------------------------


async def test_add_member_requires_a_separate_unused_bus_key(daemon, admin):
    alice = daemon.alice
    new = generate_identity(next(_handles))

    async def post(**changes: Any) -> ApiError:
        body = {"handle": new.handle, "sign_pub": new.sign_pub_b64, "enc_pub": new.enc_pub_b64,
                "enc_suite": new.enc_suite, "bus_pub": new.bus_pub, **changes}
        with pytest.raises(ApiError) as e:
            await admin.add_member(**body)
        return e.value

    other = generate_identity("other")
    for bad in ("", "UNOTANKEY", new.bus_pub.lower(), new.bus_pub[:-1] + ("A" if new.bus_pub[-1] != "A" else "B"),
                new.sign_pub_b64, "N" + new.bus_pub[1:], 42):
        e = await post(bus_pub=bad)
        assert e.status == 422 and "bus_pub" in e.detail, (bad, e)
    e = await post(bus_pub=None)  # omitted
    assert e.status == 422 and "missing field(s): bus_pub" in e.detail
    e = await post(bus_pub=nkey_from_sign_pub(new.sign_pub))  # its own signing key as nkey
    assert e.status == 422 and "nkey of this member's sign_pub" in e.detail
    e = await post(bus_pub=alice.bus_pub)  # another member's bus key
    assert e.status == 409 and "another member already has this bus_pub" in e.detail
    e = await post(bus_pub=nkey_from_sign_pub(alice.sign_pub))  # another member's signing key as nkey
    assert e.status == 409 and "nkey of a member's sign_pub" in e.detail
    # the reverse: a signing key that is, as an nkey, a member's bus key
    twin = Identity(new.handle, ed25519.Ed25519PrivateKey.from_private_bytes(alice.bus_seed), "X25519",
                    other.enc_key, other.bus_key)
    e = await post(sign_pub=twin.sign_pub_b64, enc_pub=twin.enc_pub_b64, bus_pub=twin.bus_pub)
    assert e.status == 409 and "bus_pub" in e.detail
    assert all(m["handle"] != new.handle for m in await admin.list_members())

    created = await admin.add_member(new.handle, new.sign_pub_b64, new.enc_pub_b64, bus_pub=new.bus_pub)
    assert created["bus_pub"] == new.bus_pub
    assert (await admin.get_member(new.handle))["bus_pub"] == new.bus_pub
    async with UnibusClient(daemon.base_url, new) as me:
        assert (await me.me())["bus_pub"] == new.bus_pub
        info = await me.bus_info()
        assert info["user_nkey"] == new.bus_pub != nkey_from_sign_pub(new.sign_pub)
    assert (await admin.me())["bus_pub"] == alice.bus_pub


# -- the signing key never logs in ----------------------------------------------------------


async def test_the_signing_key_is_not_a_nats_login(daemon, admin):
    bob = await add(admin)
    assert not await refused(daemon.nats_url, bob.bus_nkey_seed())  # the bus key logs in
    for who in (bob, daemon.alice):
        assert await refused(daemon.nats_url, sign_seed_as_nkey(who)), who.handle
    assert nkey_from_sign_pub(bob.sign_pub) not in json.dumps(json.loads((daemon.data_dir / "nats.conf").read_text()))


# -- rotation ---------------------------------------------------------------------------------


async def test_rotation_closes_old_connections_before_the_200(daemon, admin):
    bob = await add(admin)
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    old = await nats.connect(daemon.nats_url, nkeys_seed_str=bob.bus_nkey_seed(), allow_reconnect=False,
                             closed_cb=on_closed, disconnected_cb=on_closed, connect_timeout=2)
    try:
        assert bob.handle in connz_users(daemon)  # a callout user is named by its handle
        rotated = with_bus_key(bob)
        async with UnibusClient(daemon.base_url, rotated) as me:
            record = await me.set_bus_key()
            # The 200 is here: nats-server no longer holds any connection of the old key.
            assert bob.handle not in connz_users(daemon)
            assert record["bus_pub"] == rotated.bus_pub and record["handle"] == bob.handle
            assert await eventually(lambda: _true(closed.is_set() or old.is_closed))
            assert await refused(daemon.nats_url, bob.bus_nkey_seed())
            assert not await refused(daemon.nats_url, rotated.bus_nkey_seed())
            assert (await me.bus_info())["user_nkey"] == rotated.bus_pub
            async with me.bus():  # the SDK logs in with the new key
                pass
            assert (await me.set_bus_key())["bus_pub"] == rotated.bus_pub  # the same key again: fine
            for bad, status in ((nkey_from_sign_pub(bob.sign_pub), 422), (daemon.alice.bus_pub, 409),
                                (nkey_from_sign_pub(daemon.alice.sign_pub), 409), ("U123", 422)):
                with pytest.raises(ApiError) as e:
                    await me.set_bus_key(bad)
                assert e.value.status == status, (bad, e.value)
            assert (await me.me())["bus_pub"] == rotated.bus_pub
        # the old identity file's SDK says what to do instead of failing to log in
        async with UnibusClient(daemon.base_url, bob) as stale:
            with pytest.raises(BusError, match="keygen --upgrade"):
                async with stale.bus():
                    pass
    finally:
        if not old.is_closed:
            await old.close()
    # the old key is free again: another member may take it
    carol = with_bus_key(generate_identity(next(_handles)), bob.bus_key)
    assert (await add(admin, carol)).bus_pub == bob.bus_pub


async def _true(value: bool) -> bool:
    return value


async def test_put_bus_key_is_for_oneself_and_signed(daemon, admin):
    bob = await add(admin)
    # no handle in the path: a member can only ever change its own key
    status, body = http_json("PUT", daemon.base_url + "/v1/me/bus-key", {"bus_pub": bob.bus_pub},
                             headers={"Content-Type": "application/json"})
    assert status == 401, body
    for raw, code in ((b"{}", 422), (b"[]", 422), (b"{nope", 400), (b'{"bus_pub": 1}', 422),
                      (json.dumps({"bus_pub": bob.bus_pub, "handle": "alice"}).encode(), 422)):
        headers = {"Content-Type": "application/json",
                   **sign_request("PUT", "/v1/me/bus-key", raw, keyid=bob.handle, private_key=bob.sign_key)}
        async with aiohttp.ClientSession() as s, s.put(daemon.base_url + "/v1/me/bus-key", data=raw,
                                                       headers=headers) as r:
            assert r.status == code, (raw, r.status, await r.text())
    assert (await admin.me())["bus_pub"] == daemon.alice.bus_pub


# -- the 0.11 attack: a fake NATS server as a signing oracle ------------------------------------


class FakeNats:
    """A NATS server as far as a client's login goes: INFO with a chosen nonce, CONNECT recorded."""

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.connects: list[dict[str, Any]] = []
        self.port = free_port()
        self.server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeNats:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "FAKE", "server_name": "fake", "version": "2.15.1", "proto": 1, "host": "127.0.0.1",
                "port": self.port, "headers": True, "max_payload": 1048576, "auth_required": True,
                "nonce": self.nonce}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        try:
            while line := await asyncio.wait_for(reader.readline(), WAIT):
                if line.startswith(b"CONNECT "):
                    self.connects.append(json.loads(line[len(b"CONNECT "):]))
                elif line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class RewritingProxy:
    """A real aiohttp reverse proxy in front of the daemon that points GET /v1/bus at another NATS."""

    def __init__(self, upstream: str, nats_url: str) -> None:
        self.upstream, self.nats_url = upstream, nats_url
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RewritingProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()
        assert self.runner is not None
        await self.runner.cleanup()

    async def forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.session.request(request.method, yarl.URL(self.upstream + request.raw_path, encoded=True),
                                        data=await request.read(), headers=headers) as r:
            body = await r.read()
            if request.path == "/v1/bus" and r.status == 200:
                doc = json.loads(body)
                doc["servers"] = [self.nats_url]
                body = json.dumps(doc).encode()
            return web.Response(status=r.status, body=body, content_type=r.content_type)


def rfc9421_base(method: str, path: str, body: bytes, *, keyid: str, nonce: str, created: int) -> tuple[str, str]:
    """(signature base, Signature-Input value) of a signed request, written out by hand (RFC 9421 §2.5)."""
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    params = (f'("@method" "@path" "@query" "content-digest");created={created};nonce="{nonce}";'
              f'keyid="{keyid}";alg="ed25519"')
    base = (f'"@method": {method}\n"@path": {path}\n"@query": ?\n"content-digest": {digest}\n'
            f'"@signature-params": {params}')
    return base, params


async def post_with_signature(base_url: str, body: bytes, params: str, signature: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json",
               "Content-Digest": "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":",
               "Signature-Input": f"sig1={params}", "Signature": f"sig1=:{base64.b64encode(signature).decode()}:"}
    async with aiohttp.ClientSession() as s, s.post(base_url + "/v1/members", data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def decode_sig(value: str) -> bytes:
    padded = value + "=" * (-len(value) % 4)
    return base64.urlsafe_b64decode(padded) if ("-" in value or "_" in value) else base64.b64decode(padded)


async def test_a_fake_nats_server_cannot_turn_the_sdk_into_a_request_signer(daemon, admin):
    alice = daemon.alice
    eve = generate_identity("eve")
    body = json.dumps({"handle": "eve", "role": "admin", "sign_pub": eve.sign_pub_b64, "enc_pub": eve.enc_pub_b64,
                       "enc_suite": "X25519", "bus_pub": eve.bus_pub}, separators=(",", ":")).encode()
    base, params = rfc9421_base("POST", "/v1/members", body, keyid="alice", nonce="lifted-from-nats-0001",
                                created=int(time.time()))

    async with FakeNats(nonce=base) as fake, RewritingProxy(daemon.base_url, fake.url) as proxy:
        # alice's SDK, talking to the real daemon through the proxy, joins "the bus"
        async with UnibusClient(proxy.url, alice) as victim, victim.bus():
            pass
    assert len(fake.connects) == 1
    connect = fake.connects[0]
    assert connect["nkey"] == alice.bus_pub  # the bus key answered the nonce ...
    lifted = decode_sig(connect["sig"])
    ed25519.Ed25519PublicKey.from_public_bytes(sign_pub_from_nkey(alice.bus_pub)).verify(lifted, base.encode())
    with pytest.raises(InvalidSignature):  # ... and that signature is no signature of alice's
        ed25519.Ed25519PublicKey.from_public_bytes(alice.sign_pub).verify(lifted, base.encode())

    status, problem = await post_with_signature(daemon.base_url, body, params, lifted)
    assert status == 401, problem
    with pytest.raises(ApiError) as e:
        await admin.get_member("eve")
    assert e.value.status == 404

    # Control: the same hand-written base, signed by alice's signing key, is a valid request (so the
    # 401 above is the signature's doing, not a flaw of this test's request).
    ctl = generate_identity(next(_handles))
    ctl_body = json.dumps({"handle": ctl.handle, "role": "member", "sign_pub": ctl.sign_pub_b64,
                           "enc_pub": ctl.enc_pub_b64, "enc_suite": "X25519", "bus_pub": ctl.bus_pub},
                          separators=(",", ":")).encode()
    ctl_base, ctl_params = rfc9421_base("POST", "/v1/members", ctl_body, keyid="alice",
                                        nonce="control-request-0001", created=int(time.time()))
    status, created = await post_with_signature(daemon.base_url, ctl_body, ctl_params,
                                                alice.sign_key.sign(ctl_base.encode()))
    assert status == 201 and created["handle"] == ctl.handle


async def test_an_identity_without_a_bus_key_never_reaches_nats(daemon, admin):
    legacy = generate_identity(next(_handles))
    await add(admin, legacy)
    v1 = Identity(legacy.handle, legacy.sign_key, legacy.enc_suite, legacy.enc_key)  # as loaded from a 0.11 file
    async with FakeNats(nonce="anything") as fake, RewritingProxy(daemon.base_url, fake.url) as proxy, \
            UnibusClient(proxy.url, v1) as client:
        with pytest.raises(BusError, match=r"unibus keygen --upgrade"):
            async with client.bus():
                pass
    assert fake.connects == []
    assert nkey_from_public_key(legacy.sign_pub) != legacy.bus_pub
