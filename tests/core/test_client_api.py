"""unibus.client.api against an in-process fake of the control plane.

The fake verifies every signature with unibus.signing.verify_request over the
raw request target aiohttp received, so these tests prove that what the SDK
signs is what goes on the wire (paths and queries that need percent-encoding
included). The bus test uses a real nats-server (no auth) from unibus.testing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from typing import Any

import pytest
from aiohttp import web
from unibus.client import ApiError, KeyUnavailable, ServerUnreachable, UnibusClient
from unibus.client.keys import generate_identity
from unibus.client.sealing import SealError, encrypt_message, open_room_key
from unibus.memberlog import key_package_input, verify_ed25519
from unibus.signing import SignatureError, split_path_query, verify_request
from unibus.testing import free_port

HANDLE = web.RequestKey("handle", str)
BODY = web.RequestKey("json", object)


def problem(status: int, detail: str, **extra: Any) -> web.Response:
    from http import HTTPStatus

    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json")


class FakeServer:
    """Just enough of SPEC §5 to drive the SDK; signatures really verified."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.rooms: dict[str, dict[str, Any]] = {}
        self.keys: dict[tuple[str, int], dict[str, str]] = {}
        self.seen: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, bytes]] = []
        self.conflicts = 0  # answer the next N keys POSTs with 409
        self.unavailable = 0  # answer the next N signed requests with 503 (replay protection down)
        self.unavailable_type = "https://unibus.dev/problems/nonce-store-unavailable"
        self.bus_servers: list[str] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = web.Application(middlewares=[self.auth])
        r = app.router
        r.add_get("/v1/me", self.me)
        r.add_get("/v1/echo", self.echo)
        r.add_get("/v1/members", self.list_members)
        r.add_post("/v1/members", self.add_member)
        r.add_get("/v1/members/{h}", self.get_member)
        r.add_post("/v1/rooms", self.create_room)
        r.add_get("/v1/rooms/{id}", self.get_room)
        r.add_put("/v1/rooms/{id}/members/{h}", self.add_room_member)
        r.add_post("/v1/rooms/{id}/keys", self.post_keys)
        r.add_get("/v1/rooms/{id}/keys/me", self.my_key)
        r.add_get("/v1/bus", self.bus)
        r.add_get("/v1/log/head", self.log_head)
        self.head = {"seq": 4, "hash": "ab" * 32, "auth_skew": 60}
        self.app = app

    def add(self, identity, role="member") -> None:
        self.members[identity.handle] = {**identity.public_record(), "role": role}

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    @web.middleware
    async def auth(self, request: web.Request, handler):
        body = await request.read() if request.can_read_body else None
        self.requests.append((request.method, request.raw_path, body or b""))
        path, query = split_path_query(request.raw_path)

        def resolve(keyid: str):
            m = self.members.get(keyid)
            return base64.b64decode(m["sign_pub"]) if m else None

        try:
            v = verify_request(request.method, path, query, request.headers, body, resolve_key=resolve)
        except SignatureError as e:
            return problem(401, e.reason)
        if self.unavailable:
            self.unavailable -= 1
            resp = problem(503, "replay protection is unavailable; try again")
            body503 = json.loads(resp.text)
            body503["type"] = self.unavailable_type
            return web.Response(status=503, text=json.dumps(body503), content_type="application/problem+json",
                                headers={"Retry-After": "0"})
        if (v.keyid, v.nonce) in self.seen:
            return problem(401, "replayed nonce")
        self.seen.add((v.keyid, v.nonce))
        request[HANDLE] = v.keyid
        request[BODY] = json.loads(body) if body else None
        return await handler(request)

    async def me(self, request):
        return web.json_response(self.members[request[HANDLE]])

    async def echo(self, request):
        return web.json_response({"raw_path": request.raw_path, "query": dict(request.query)})

    async def list_members(self, request):
        return web.json_response({"members": list(self.members.values())})

    async def get_member(self, request):
        m = self.members.get(request.match_info["h"])
        return web.json_response(m) if m else problem(404, f"no member {request.match_info['h']!r}")

    async def add_member(self, request):
        if self.members[request[HANDLE]]["role"] != "admin":
            return problem(403, "admin only")
        doc = request[BODY]
        if doc["handle"] in self.members:
            return problem(409, f"member {doc['handle']} exists")
        self.members[doc["handle"]] = doc
        return web.json_response(doc, status=201)

    async def create_room(self, request):
        rid = secrets.token_hex(8)
        me = self.members[request[HANDLE]]
        self.rooms[rid] = {"room_id": rid, "name": request[BODY]["name"], "subject": f"unibus.room.{rid}",
                           "epoch": 0, "rekey_required": True, "owner": me["handle"],
                           "members": [{k: me[k] for k in ("handle", "enc_pub", "enc_suite")}]}
        return web.json_response(self.rooms[rid], status=201)

    async def get_room(self, request):
        room = self.rooms.get(request.match_info["id"])
        return web.json_response(room) if room else problem(404, "no such room")

    async def add_room_member(self, request):
        room = self.rooms[request.match_info["id"]]
        m = self.members[request.match_info["h"]]
        room["members"].append({k: m[k] for k in ("handle", "enc_pub", "enc_suite")})
        room["rekey_required"] = True
        return web.json_response(room)

    async def post_keys(self, request):
        rid = request.match_info["id"]
        room = self.rooms[rid]
        doc = request[BODY]
        if self.conflicts:
            self.conflicts -= 1
            room["epoch"] += 1  # somebody else's rekey won
            return problem(409, "epoch must be current+1")
        if doc["epoch"] != room["epoch"] + 1:
            return problem(409, "epoch must be current+1")
        want = {m["handle"] for m in room["members"]}
        if set(doc["sealed"]) != want:
            return problem(409, "sealed must name exactly the members")
        # The SDK signs every member's key package at the head it was served (docs/formats.md).
        if doc["log_head"] != {"seq": self.head["seq"], "hash": self.head["hash"]} or set(doc["sigs"]) != want:
            return problem(422, "sigs and log_head must go with sealed")
        sealer = base64.b64decode(self.members[request[HANDLE]]["sign_pub"])
        for h, sealed in doc["sealed"].items():
            message = key_package_input(rid, doc["epoch"], h, base64.b64decode(sealed), self.head["seq"],
                                        self.head["hash"])
            if not verify_ed25519(sealer, message, base64.b64decode(doc["sigs"][h])):
                return problem(422, f"sigs.{h} does not verify")
        self.keys[(rid, doc["epoch"])] = doc["sealed"]
        room["epoch"] = doc["epoch"]
        room["rekey_required"] = False
        return web.json_response({"room_id": rid, "epoch": doc["epoch"]}, status=201)

    async def my_key(self, request):
        rid = request.match_info["id"]
        me = request[HANDLE]
        epochs = sorted((e for (r, e), s in self.keys.items() if r == rid and me in s), reverse=True)
        if "epoch" in request.query:
            epochs = [e for e in epochs if e == int(request.query["epoch"])]
        if not epochs:
            return problem(404, "no key sealed to you")
        return web.json_response({"epoch": epochs[0], "sealed": self.keys[(rid, epochs[0])][me]})

    async def log_head(self, request):
        return web.json_response(self.head)

    async def bus(self, request):
        h = request[HANDLE]
        return web.json_response({"servers": self.bus_servers, "user_nkey": self.members[h].get("bus_pub"),
                                  "inbox_prefix": f"_INBOX_{h}",
                                  "rooms": {}})


@pytest.fixture
async def fake():
    server = FakeServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def people():
    return {
        "alice": generate_identity("alice"),
        "bob": generate_identity("bob", "MLKEM768_X25519"),
        "carol": generate_identity("carol"),
    }


async def test_signed_requests_and_json_bodies(fake, people):
    fake.add(people["alice"], "admin")
    async with UnibusClient(fake.base_url, people["alice"]) as c:
        assert (await c.me())["handle"] == "alice"
        bob = people["bob"].public_record()
        added = await c.add_member(bob["handle"], bob["sign_pub"], bob["enc_pub"], bob["enc_suite"],
                                   bus_pub=bob["bus_pub"])
        assert added["enc_suite"] == "MLKEM768_X25519" and added["bus_pub"] == bob["bus_pub"]
        assert [m["handle"] for m in await c.list_members()] == ["alice", "bob"]
    method, raw_path, body = fake.requests[-2]
    assert (method, raw_path) == ("POST", "/v1/members")
    # compact separators, serialized once: exactly the bytes that were signed
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode()


async def test_query_and_path_encoding_match_the_signature(fake, people):
    fake.add(people["alice"])
    async with UnibusClient(fake.base_url + "/", people["alice"]) as c:
        got = await c.request("GET", "/v1/echo", query={"q": "a b&c/é=?", "epoch": 3})
        assert got["query"] == {"q": "a b&c/é=?", "epoch": "3"}
        assert got["raw_path"] == "/v1/echo?q=a%20b%26c%2F%C3%A9%3D%3F&epoch=3"
        # a path segment needing escapes is signed escaped, as sent
        with pytest.raises(ApiError) as e:
            await c.get_member("no body/x")
        assert e.value.status == 404 and "no member 'no body/x'" in e.value.detail
    assert fake.requests[-1][1] == "/v1/members/no%20body%2Fx"


async def test_api_error_shape(fake, people):
    fake.add(people["alice"])  # not an admin
    async with UnibusClient(fake.base_url, people["alice"]) as c:
        with pytest.raises(ApiError) as e:
            await c.add_member("dave", people["carol"].sign_pub_b64, people["carol"].enc_pub_b64,
                               bus_pub=people["carol"].bus_pub)
    assert e.value.status == 403
    assert e.value.problem["detail"] == "admin only"
    assert str(e.value) == "403 Forbidden: admin only"


async def test_unknown_identity_is_401(fake, people):
    async with UnibusClient(fake.base_url, people["carol"]) as c:
        with pytest.raises(ApiError) as e:
            await c.me()
    assert e.value.status == 401 and str(e.value).startswith("401 Unauthorized: ")


async def test_unreachable_server():
    port = free_port()
    async with UnibusClient(f"http://127.0.0.1:{port}", generate_identity("alice"), timeout=3) as c:
        with pytest.raises(ServerUnreachable) as e:
            await c.me()
    assert f"http://127.0.0.1:{port}" in str(e.value) and "refused" in str(e.value)


def test_bad_base_url():
    with pytest.raises(ValueError):
        UnibusClient("127.0.0.1:8470", generate_identity("alice"))


async def test_rekey_seals_to_each_member_and_room_key_caches(fake, people):
    for h in people:
        fake.add(people[h], "admin" if h == "alice" else "member")
    async with UnibusClient(fake.base_url, people["alice"]) as alice, \
            UnibusClient(fake.base_url, people["bob"]) as bob, \
            UnibusClient(fake.base_url, people["carol"]) as carol:
        room = await alice.create_room("ops")
        rid = room["room_id"]
        with pytest.raises(KeyUnavailable) as e:
            await bob.room_key(rid)
        assert e.value.status == 404 and "rooms rekey" in str(e.value)
        await alice.add_room_member(rid, "bob")
        await alice.add_room_member(rid, "carol")
        assert await alice.rekey(rid) == 1
        e_b, k_b = await bob.room_key(rid)
        e_c, k_c = await carol.room_key(rid, 1)
        assert (e_b, e_c) == (1, 1) and k_b == k_c == alice.cached_key(rid, 1)
        # each sealed value opens only for its addressee, room and epoch
        sealed = base64.b64decode(fake.keys[(rid, 1)]["bob"])
        assert len(sealed) == 1120 + 48  # MLKEM768_X25519 enc + sealed 32-byte key
        with pytest.raises(SealError):
            open_room_key(sealed, people["bob"], rid, 2)
        # cached: no second request for a known epoch
        n = len(fake.requests)
        assert await carol.room_key(rid, 1) == (1, k_c)
        assert len(fake.requests) == n
        # a missing epoch is a KeyUnavailable, remembered
        with pytest.raises(KeyUnavailable):
            await carol.room_key(rid, 7)
        with pytest.raises(KeyUnavailable):
            await carol.room_key(rid, 7)
        assert len(fake.requests) == n + 1


async def test_rekey_retries_after_409(fake, people):
    fake.add(people["alice"], "admin")
    async with UnibusClient(fake.base_url, people["alice"]) as alice:
        rid = (await alice.create_room("r"))["room_id"]
        fake.conflicts = 2
        assert await alice.rekey(rid) == 3  # two lost races (epochs 1, 2 taken), then 3
        fake.conflicts = 4
        with pytest.raises(ApiError) as e:
            await alice.rekey(rid)
        assert e.value.status == 409
        assert fake.conflicts == 0  # 1 try + 3 retries


async def test_bus_send_and_listen(fake, people, nats_server):
    for h in people:
        fake.add(people[h], "admin" if h == "alice" else "member")
    fake.bus_servers = [nats_server.url]
    async with UnibusClient(fake.base_url, people["alice"]) as alice, \
            UnibusClient(fake.base_url, people["bob"]) as bob, \
            UnibusClient(fake.base_url, people["carol"]) as carol:
        rid = (await alice.create_room("ops"))["room_id"]
        await alice.add_room_member(rid, "bob")
        await alice.rekey(rid)
        async with carol.bus() as cbus, bob.bus() as bbus, alice.bus(key_ttl=0) as abus:  # noqa: SIM117
            async with cbus.listen(rid) as carol_msgs, bbus.listen(rid) as bob_msgs:
                assert await abus.send(rid, "chat.general", "hello, bob") == 1
                m = await asyncio.wait_for(bob_msgs.__anext__(), 5)
                assert (m.room_id, m.topic, m.epoch, m.plaintext, m.sender, m.error) == \
                    (rid, "chat.general", 1, b"hello, bob", "alice", None)
                assert m.subject == f"unibus.room.{rid}.chat.general"
                # carol (not in the room; no bus auth on this nats-server) sees it but has no key
                bad = await asyncio.wait_for(carol_msgs.__anext__(), 5)
                assert bad.plaintext is None and bad.epoch == 1 and "no key for epoch 1" in bad.error

                # rekey with carol in: alice's next send uses epoch 2 at once
                await alice.add_room_member(rid, "carol")
                assert await alice.rekey(rid) == 2
                assert await abus.send(rid, "chat", b"\x00\xffbinary", sender=False) == 2
                m2 = await asyncio.wait_for(bob_msgs.__anext__(), 5)
                assert (m2.epoch, m2.plaintext, m2.sender) == (2, b"\x00\xffbinary", None)
                m3 = await asyncio.wait_for(carol_msgs.__anext__(), 5)
                assert m3.ok and m3.plaintext == b"\x00\xffbinary"

                # a forged message (wrong key) is an error entry, not a crash
                key2 = alice.cached_key(rid, 2)
                subject = f"unibus.room.{rid}.chat"
                forged = encrypt_message(bytes(32), subject, 2, b"forged")
                await abus.nc.publish(subject, forged, headers={"Unibus-Epoch": "2"})
                await abus.nc.publish(subject, encrypt_message(key2, subject, 2, b"ok"),
                                      headers={"Unibus-Epoch": "x"})
                await abus.nc.publish(subject, encrypt_message(key2, subject, 2, b"fine"),
                                      headers={"Unibus-Epoch": "2"})
                got = [await asyncio.wait_for(bob_msgs.__anext__(), 5) for _ in range(3)]
                assert "does not authenticate" in got[0].error
                assert "Unibus-Epoch" in got[1].error
                assert got[2].plaintext == b"fine"


async def test_listener_skips_errors_when_asked(fake, people, nats_server):
    fake.add(people["alice"], "admin")
    fake.bus_servers = [nats_server.url]
    async with UnibusClient(fake.base_url, people["alice"]) as alice:
        rid = (await alice.create_room("ops"))["room_id"]
        await alice.rekey(rid)
        async with alice.bus() as bus, bus.listen(rid, include_errors=False) as msgs:
            await bus.nc.publish(f"unibus.room.{rid}.t", b"garbage", headers={"Unibus-Epoch": "1"})
            await bus.send(rid, "t", b"real")
            m = await asyncio.wait_for(msgs.__anext__(), 5)
            assert m.plaintext == b"real"


async def test_503_fail_closed_is_retried_with_a_fresh_signature(fake, people):
    fake.add(people["alice"], "admin")
    async with UnibusClient(fake.base_url, people["alice"]) as c:
        fake.unavailable = 2
        assert (await c.create_room("r"))["name"] == "r"  # POST: refused before served, so resent
        assert len(fake.rooms) == 1
        fake.unavailable = 3
        with pytest.raises(ApiError) as e:
            await c.me()
        assert e.value.status == 503 and fake.unavailable == 0
        # any other 503 to a POST is not retried: it may have been served
        fake.unavailable_type = "about:blank"
        fake.unavailable = 1
        with pytest.raises(ApiError):
            await c.create_room("r2")
        assert fake.unavailable == 0 and len(fake.rooms) == 1
        fake.unavailable = 1
        assert (await c.me())["handle"] == "alice"  # a GET with Retry-After is
