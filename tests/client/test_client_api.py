"""unibus.client.api against an in-process fake of the control plane.

The fake verifies every signature with unibus.signing.verify_request over the
raw request target aiohttp received, so these tests prove that what the SDK
signs is what goes on the wire (paths and queries that need percent-encoding
included). What needs a membership log (rekeys, room keys, the bus) is tested
against a real daemon in tests/e2e/test_client_verify.py.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from unibus.client.api import RETRIES_503, _parse_auth_skew
from unibus.client import ApiError, ServerUnreachable, UnibusClient
from unibus.client.keys import generate_identity
from unibus.signing import SignatureError, split_path_query, verify_request
from unibus.testing import free_port

HANDLE = web.RequestKey("handle", str)
BODY = web.RequestKey("json", object)


def problem(status: int, detail: str, **extra: Any) -> web.Response:
    from http import HTTPStatus

    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json")


class FakeServer:
    """Just enough of docs/http-api.md to drive the SDK; signatures really verified."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.rooms: dict[str, dict[str, Any]] = {}
        self.seen: set[tuple[str, str]] = set()
        self.nonces: list[str] = []  # of every request whose signature verified
        self.requests: list[tuple[str, str, bytes]] = []
        self.unavailable = 0  # answer the next N signed requests with 503 (replay protection down)
        self.unavailable_type = "https://unibus.dev/problems/nonce-store-unavailable"
        self.unavailable_status = 503  # 401: the nonce-lost refusal of a request signed before a loss
        self.echoed = 0
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = web.Application(middlewares=[self.auth])
        r = app.router
        r.add_get("/v1/me", self.me)
        r.add_get("/v1/echo", self.echo)
        r.add_post("/v1/echo", self.echo_post)  # no route the membership log records: no log needed
        r.add_post("/v1/admin-only", self.admin_only)
        r.add_get("/v1/members", self.list_members)
        r.add_post("/v1/members", self.add_member)
        r.add_get("/v1/members/{h}", self.get_member)
        r.add_post("/v1/rooms", self.create_room)
        r.add_get("/v1/rooms/{id}", self.get_room)
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
        self.nonces.append(v.nonce)
        if self.unavailable:
            self.unavailable -= 1
            resp = problem(503, "replay protection is unavailable; try again")
            body503 = json.loads(resp.text)
            body503["type"] = self.unavailable_type
            if self.unavailable_status == 401:
                body503.update(status=401, title="Unauthorized", type="https://unibus.dev/problems/nonce-lost")
                return web.Response(status=401, text=json.dumps(body503), content_type="application/problem+json",
                                    headers={"WWW-Authenticate": 'Signature alg="ed25519"', "Retry-After": "0"})
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

    async def echo_post(self, request):
        self.echoed += 1
        return web.json_response({"raw_path": request.raw_path, "body": request[BODY]}, status=201)

    async def admin_only(self, request):
        if self.members[request[HANDLE]]["role"] != "admin":
            return problem(403, "admin only")
        return web.json_response({}, status=201)

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


#: A trust root pinned for the fake server, which has no membership log: changing requests are
#: tagged with the pinned root, and a client with none pinned syncs first (docs/client.md).
FAKE_ROOT = "ab" * 32


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
    async with UnibusClient(fake.base_url, people["alice"], trust_root=FAKE_ROOT) as c:
        assert (await c.me())["handle"] == "alice"
        bob = people["bob"].public_record()
        echoed = await c.request("POST", "/v1/echo", json_body={"handle": "bob", "keys": [bob["sign_pub"]], "n": 1})
        assert echoed["body"] == {"handle": "bob", "keys": [bob["sign_pub"]], "n": 1}
        # A membership change is made only on a log that verifies, and the fake serves none: nothing
        # is sent (tests/e2e/test_attack_e2e_r5.py makes them against a real daemon).
        with pytest.raises(ApiError) as e:
            await c.add_member(bob["handle"], bob["sign_pub"], bob["enc_pub"], bob["enc_suite"],
                               bus_pub=bob["bus_pub"])
        assert e.value.status == 404
    assert [(m, p) for m, p, _ in fake.requests if m == "POST"] == [("POST", "/v1/echo")]
    body = next(b for m, _p, b in fake.requests if m == "POST")
    # compact separators, serialized once: exactly the bytes that were signed
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode()


async def test_query_and_path_encoding_match_the_signature(fake, people):
    fake.add(people["alice"])
    async with UnibusClient(fake.base_url + "/", people["alice"], trust_root=FAKE_ROOT) as c:
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
    async with UnibusClient(fake.base_url, people["alice"], trust_root=FAKE_ROOT) as c:
        with pytest.raises(ApiError) as e:
            await c.request("POST", "/v1/admin-only", json_body={})
    assert e.value.status == 403
    assert e.value.problem["detail"] == "admin only"
    assert str(e.value) == "403 Forbidden: admin only"


async def test_unknown_identity_is_401(fake, people):
    async with UnibusClient(fake.base_url, people["carol"], trust_root=FAKE_ROOT) as c:
        with pytest.raises(ApiError) as e:
            await c.me()
    assert e.value.status == 401 and str(e.value).startswith("401 Unauthorized: ")


async def test_a_closed_client_says_so_and_opens_no_session_nobody_closes(fake, people):
    """A client used after close() made a new session of its own that nothing closed (aiohttp's
    "Unclosed client session" at exit); a closed one now raises, as a closed ClientSession does."""
    import gc
    import warnings

    fake.add(people["alice"])
    client = UnibusClient(fake.base_url, people["alice"], trust_root=FAKE_ROOT)
    async with client:
        assert (await client.me())["handle"] == "alice"
    session = client._session
    gc.collect()  # what earlier tests left is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="this UnibusClient is closed; make a new one"):
            await client.me()
        with pytest.raises(RuntimeError, match="closed"):
            async with client:
                pass
        await client.close()  # a second close does nothing
        assert client._session is session and session.closed  # no session of its own made again
        del client, session
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed client session" in str(w.message)
            or "Unclosed connector" in str(w.message)] == []

    async with aiohttp.ClientSession() as session:  # a session passed in stays its owner's
        async with UnibusClient(fake.base_url, people["alice"], session=session, trust_root=FAKE_ROOT) as c:
            assert (await c.me())["handle"] == "alice"
        assert not session.closed
        c = UnibusClient(fake.base_url, people["alice"], session=session, trust_root=FAKE_ROOT)
    with pytest.raises(RuntimeError, match="the aiohttp session passed to this UnibusClient is closed"):
        await c.me()


async def test_a_bus_whose_client_was_closed_still_says_why_it_stops(people):
    """Review: a bus refused by nats-server asks the control plane why before it stops; with its
    client closed, the RuntimeError ended that stop before it recorded a reason or closed the bus."""
    from unibus.client.api import Bus

    client = UnibusClient(f"http://127.0.0.1:{free_port()}", people["alice"])
    await client.close()
    reason = await Bus(client)._refusal_reason()
    assert "the bus refused alice" in reason and "this UnibusClient is closed" in reason


async def test_unreachable_server():
    port = free_port()
    async with UnibusClient(f"http://127.0.0.1:{port}", generate_identity("alice"), timeout=3) as c:
        with pytest.raises(ServerUnreachable) as e:
            await c.me()
    assert f"http://127.0.0.1:{port}" in str(e.value) and "refused" in str(e.value)


async def test_https_to_a_plain_server_is_named(fake, people):
    """https:// to a plain HTTP server said only "the TLS handshake failed (WRONG_VERSION_NUMBER)"
    (a developer's walk-through)."""
    async with UnibusClient(f"https://127.0.0.1:{fake.port}", people["alice"], timeout=5) as c:
        with pytest.raises(ServerUnreachable) as e:
            await c.me()
    assert e.value.reason == ("the TLS handshake failed (WRONG_VERSION_NUMBER): is the server plain HTTP? "
                              "give an http:// URL"), e.value


def test_bad_base_url():
    with pytest.raises(ValueError):
        UnibusClient("127.0.0.1:8470", generate_identity("alice"))


async def test_503_fail_closed_is_retried_with_a_fresh_signature(fake, people):
    fake.add(people["alice"], "admin")
    async with UnibusClient(fake.base_url, people["alice"], trust_root=FAKE_ROOT) as c:
        fake.unavailable = 2
        # POST: refused before served, so signed afresh and resent, and served once (a membership
        # change is resent as it was signed: tests/e2e/test_attack_e2e_r5.py)
        assert (await c.request("POST", "/v1/echo", json_body={"n": 1}))["body"] == {"n": 1}
        assert fake.echoed == 1 and fake.unavailable == 0
        assert [p for m, p, _ in fake.requests if m == "POST"] == ["/v1/echo"] * 3  # two 503s, then served
        fake.unavailable = RETRIES_503 + 1  # one try and every retry refused
        with pytest.raises(ApiError) as e:
            await c.me()
        assert e.value.status == 503 and fake.unavailable == 0
        # any other 503 to a POST is not retried: it may have been served
        fake.unavailable_type = "about:blank"
        fake.unavailable = 1
        with pytest.raises(ApiError):
            await c.request("POST", "/v1/echo", json_body={"n": 2})
        assert fake.unavailable == 0 and fake.echoed == 1
        fake.unavailable = 1
        assert (await c.me())["handle"] == "alice"  # a GET with Retry-After is


async def test_a_request_signed_before_the_nonces_were_lost_is_signed_again(fake, people):
    """``401 nonce-lost``: created before the server's replay protection restarted (a clock behind
    the server's), so one signed again is not; retried as the fail-closed 503 is, and as often."""
    fake.add(people["alice"], "admin")
    fake.unavailable_status = 401
    async with UnibusClient(fake.base_url, people["alice"], trust_root=FAKE_ROOT) as c:
        fake.unavailable = 2
        assert (await c.request("POST", "/v1/echo", json_body={"n": 1}))["body"] == {"n": 1}
        assert fake.echoed == 1 and fake.unavailable == 0
        assert [p for m, p, _ in fake.requests if m == "POST"] == ["/v1/echo"] * 3  # two 401s, then served
        assert len(set(fake.nonces)) == len(fake.nonces) == 3  # each try signed afresh
        fake.unavailable = RETRIES_503 + 1  # one try and every retry refused
        with pytest.raises(ApiError) as e:
            await c.me()
        assert e.value.status == 401 and e.value.problem["type"].endswith("/nonce-lost") and fake.unavailable == 0
    # any other 401 is final: bob is unknown here
    before = len(fake.requests)
    async with UnibusClient(fake.base_url, people["bob"], trust_root=FAKE_ROOT) as b:
        with pytest.raises(ApiError) as e:
            await b.me()
    assert e.value.status == 401 and len(fake.requests) == before + 1


@pytest.mark.parametrize(("heard", "raised", "refused"), [
    # a refusal, then the server closing the connection: the bound ended the tries
    (["refused", ConnectionResetError(104, "reset")], TimeoutError(), True),
    (["refused", "eof"], TimeoutError(), True),
    # a refusal heard once, then the server went down or hung: not a refusal (the advice would be wrong)
    (["refused", ConnectionRefusedError(111, "refused")], TimeoutError(), False),
    (["refused", TimeoutError()], TimeoutError(), False),
    # a TLS failure after a refusal: the TLS failure is what to report
    (["refused", "tls"], TimeoutError(), False),
    # nats-py raised the refusal itself
    ([], "refused", True),
    ([], TimeoutError(), False),
])
def test_a_connect_counts_as_refused_only_if_the_last_thing_it_heard_was_a_refusal(heard, raised, refused):
    """Bus.connect asks the control plane why a login was refused only when the refusal is
    what ended its tries (unibus.client.api._still_refused)."""
    import ssl

    import nats.errors
    from unibus.client.api import _still_refused

    real = {"refused": nats.errors.Error("nats: 'Authorization Violation'"), "eof": nats.errors.UnexpectedEOF(),
            "tls": ssl.SSLCertVerificationError(1, "certificate verify failed")}

    def make(e):
        return real[e] if isinstance(e, str) else e

    assert _still_refused([make(e) for e in heard], make(raised)) is refused


@pytest.mark.parametrize("value, skew", [("60", 60), (" 1 ", 1), ("600", 600), ("0", None), ("601", None),
                                         ("-5", None), ("6e1", None), ("\u0666\u0660", None), ("", None),
                                         ("9" * 400, None)])
def test_the_reported_auth_skew_is_taken_only_within_its_bounds(value, skew):
    """``Unibus-Auth-Skew`` (GET /v1/log/head): seconds from 1 to 600, else nothing (a server's value
    only keeps a change's ``created`` within it; the log's checks never use it)."""
    assert _parse_auth_skew(value) == skew
