"""Signed requests against a real daemon: every way a signature can be wrong."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import time

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from unibus.auth import BAD_SIGNATURE
from unibus.client.keys import generate_identity
from unibus.signing import content_digest, sign_request

from unibus.testing import bootstrap_member, freeze


async def send(base_url, method, path, identity, body=None, *, headers=None, mutate=None, sign_path=None,
               created=None, nonce=None, key=None):
    """Sign (method, path, body) as ``identity`` and send it, optionally tampered with."""
    raw = json.dumps(body, separators=(",", ":")).encode() if body is not None and not isinstance(body, bytes) else body
    h = sign_request(method, sign_path or path, raw, keyid=identity.handle, private_key=key or identity.sign_key,
                     created=created, nonce=nonce)
    if raw is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    if mutate:
        method, path, raw, h = mutate(method, path, raw, h)
    async with aiohttp.ClientSession() as s:
        async with s.request(method, base_url + path, data=raw, headers=h) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text) if text else None, r.headers
            except ValueError:
                return r.status, text, r.headers


@pytest.fixture
def server(daemon_with_admin):
    return daemon_with_admin()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One daemon for the read-only checks (each test signs with fresh nonces)."""
    from unibus.testing import MembershipdProcess

    identity = generate_identity("alice")
    data_dir = tmp_path_factory.mktemp("shared") / "daemon"
    bootstrap_member(data_dir, identity, "admin")
    proc = MembershipdProcess(data_dir).start()
    proc.identity = identity
    try:
        yield proc
    finally:
        proc.stop()


async def test_valid_signature(shared_server):
    alice = shared_server.identity
    status, body, _ = await send(shared_server.base_url, "GET", "/v1/me", alice)
    assert status == 200
    assert body["handle"] == "alice" and body["role"] == "admin"
    assert body["sign_pub"] == alice.sign_pub_b64 and body["enc_pub"] == alice.enc_pub_b64


def _drop(name):
    def m(method, path, raw, h):
        h.pop(name)
        return method, path, raw, h
    return m


def _set(name, value):
    def m(method, path, raw, h):
        h[name] = value(h[name]) if callable(value) else value
        return method, path, raw, h
    return m


@pytest.mark.parametrize(
    "case, kwargs, detail",
    [
        ("no signature", {"mutate": _drop("Signature")}, "missing Signature header"),
        ("no signature-input", {"mutate": _drop("Signature-Input")}, "missing Signature-Input"),
        ("wrong key", {"key": Ed25519PrivateKey.generate()}, "signature verification failed"),
        ("stale created", {"created": int(time.time()) - 3600}, "expired"),
        ("future created", {"created": int(time.time()) + 3600}, "future"),
        ("bad nonce", {"mutate": _set("Signature-Input", lambda v: re.sub(r'nonce="[^"]*"', 'nonce="short"', v))},
         "nonce"),
        ("bad nonce chars", {"mutate": _set("Signature-Input",
                                            lambda v: re.sub(r'nonce="[^"]*"', 'nonce="' + "a" * 20 + '!!"', v))},
         "nonce"),
        ("tampered path", {"mutate": lambda m, p, r, h: (m, "/v1/members", r, h)}, "verification failed"),
        ("tampered query", {"mutate": lambda m, p, r, h: (m, p + "?x=1", r, h)}, "verification failed"),
        ("tampered method", {"mutate": lambda m, p, r, h: ("DELETE", p, r, h)}, "verification failed"),
        ("two signatures", {"mutate": _set("Signature", lambda v: v + ", sig2=:" + base64.b64encode(b"x" * 64).decode() + ":")},
         "exactly one signature"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_bad_signatures_are_401_saying_which(shared_server, case, kwargs, detail):
    status, body, headers = await send(shared_server.base_url, "GET", "/v1/me", shared_server.identity, **kwargs)
    assert status == 401, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert detail in body["detail"], body
    assert {"type", "title", "status", "detail"} <= set(body)


async def test_signature_headers_too_long_to_parse_cheaply_are_401_unparsed(shared_server):
    """Adversary: a network attacker with no key. http_sfv's Dictionary parser takes time that grows with
    the square of the value, and aiohttp joins up to 128 field lines of 8 KiB each, about 1 MB: before
    the cap, one such request held the event loop for seconds. Each header is refused unparsed."""
    from multidict import CIMultiDict

    from unibus.signing import MAX_SF_FIELD

    line = ", ".join(f"s{i}=(\"@method\")" for i in range(500))[:8000]
    alice = shared_server.identity
    for name, detail in (("Signature-Input", "malformed Signature-Input header: longer than"),
                         ("Signature", "malformed Signature header: longer than"),
                         ("Content-Digest", "malformed Content-Digest header")):
        raw = b'{"handle": "x"}'
        headers = CIMultiDict(sign_request("POST", "/v1/rooms", raw, keyid=alice.handle,
                                           private_key=alice.sign_key))
        headers.popall(name)
        for _ in range(100):
            headers.add(name, line)
        async with aiohttp.ClientSession() as s:
            async with s.post(shared_server.base_url + "/v1/rooms", data=raw, headers=headers) as r:
                body = await r.json(content_type=None)
        assert r.status == 401, body
        assert body["detail"].startswith(detail), body
        if name != "Content-Digest":
            assert body["detail"].endswith(f"longer than {MAX_SF_FIELD} characters"), body
    status, _, _ = await send(shared_server.base_url, "GET", "/v1/me", alice)
    assert status == 200


async def test_a_host_header_that_is_no_host_is_400_not_500(daemon_with_admin, alice):
    """Adversary: a member. On a node whose NATS listener is a wildcard, GET /v1/bus names the NATS
    server by the Host header; yarl raised on these (a 500 with a traceback in the log)."""
    from unibus.testing import free_port

    server = daemon_with_admin("--nats-addr", f"0.0.0.0:{free_port()}", "--insecure-plaintext")
    # (and a red team's, which were put into "servers" as they came: "nats://a b:4250")
    for host in ("x:abc", "x:99999999", "xn--", "h:1:2", "a b", "a/b", "*", "..", "%00", "999.1.1.1", "-x"):
        status, body, _ = await send(server.base_url, "GET", "/v1/bus", alice, headers={"Host": host})
        assert status == 400 and body["type"].endswith("/bad-host"), (host, body)
    for host, named in (("bus.example:8470", "bus.example"), ("bus.example.", "bus.example."),
                        ("10.1.2.3", "10.1.2.3"), ("[::1]:8470", "[::1]"), ("BUS-1.example", "bus-1.example"),
                        ("unibus_node1", "unibus_node1"),  # a Docker Compose service name
                        ("xn--bcher-kva.example", "xn--bcher-kva.example")):  # an IDN, as DNS has it
        status, body, _ = await send(server.base_url, "GET", "/v1/bus", alice, headers={"Host": host})
        assert status == 200 and body["servers"][0].startswith(f"nats://{named}:"), (host, body)


async def test_tampered_body_is_401(server, alice):
    bob = generate_identity("bob")
    body = {"handle": "bob", "role": "member", "sign_pub": bob.sign_pub_b64, "enc_pub": bob.enc_pub_b64,
            "bus_pub": bob.bus_pub}

    def swap_body(method, path, raw, h):
        return method, path, raw.replace(b'"member"', b'"admin"'), h

    status, problem, _ = await send(server.base_url, "POST", "/v1/members", alice, body, mutate=swap_body)
    assert status == 401 and "Content-Digest does not match" in problem["detail"]

    def digest_too(method, path, raw, h):
        raw = raw.replace(b'"member"', b'"admin"')
        h["Content-Digest"] = content_digest(raw)  # consistent digest, but not the signed one
        return method, path, raw, h

    status, problem, _ = await send(server.base_url, "POST", "/v1/members", alice, body, mutate=digest_too)
    assert status == 401 and "verification failed" in problem["detail"]


async def test_body_without_signed_digest_is_401(shared_server):
    server, alice = shared_server, shared_server.identity
    def unsigned_body(method, path, raw, h):
        return method, path, b'{"name":"x"}', {k: v for k, v in h.items() if k != "Content-Digest"}

    status, problem, _ = await send(server.base_url, "POST", "/v1/rooms", alice, None, mutate=unsigned_body)
    assert status == 401 and "content-digest" in problem["detail"].lower()


async def test_replayed_nonce_is_401(shared_server):
    server, alice = shared_server, shared_server.identity
    nonce = base64.urlsafe_b64encode(os.urandom(18)).decode()
    headers = sign_request("GET", "/v1/me", None, keyid="alice", private_key=alice.sign_key, nonce=nonce)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base_url + "/v1/me", headers=headers) as r:
            assert r.status == 200
        async with s.get(server.base_url + "/v1/me", headers=headers) as r:
            assert r.status == 401
            assert "replayed nonce" in (await r.json())["detail"]


async def test_unknown_handle_is_401(shared_server):
    server = shared_server
    stranger = generate_identity("mallory")
    status, body, _ = await send(server.base_url, "GET", "/v1/me", stranger)
    assert status == 401 and body["detail"] == BAD_SIGNATURE


async def test_unknown_route_under_v1_authenticates_first(shared_server):
    server, alice = shared_server, shared_server.identity
    status, _, _ = await send(server.base_url, "GET", "/v1/nope", alice)
    assert status == 404
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base_url + "/v1/nope") as r:
            assert r.status == 401


async def test_non_admin_write_is_403_and_bad_json_never_500(server, alice, tmp_path):
    bob = generate_identity("bob")
    new = {"handle": "bob", "role": "member", "sign_pub": bob.sign_pub_b64, "enc_pub": bob.enc_pub_b64,
            "bus_pub": bob.bus_pub}
    status, body, _ = await send(server.base_url, "POST", "/v1/members", alice, new)
    assert status == 201 and body["handle"] == "bob" and body["enc_suite"] == "X25519"
    carol = generate_identity("carol", "MLKEM768_X25519")
    as_bob = {"handle": "carol", "role": "member", "sign_pub": carol.sign_pub_b64, "enc_pub": carol.enc_pub_b64,
              "enc_suite": "MLKEM768_X25519", "bus_pub": carol.bus_pub}
    status, body, _ = await send(server.base_url, "POST", "/v1/members", bob, as_bob)
    assert status == 403
    status, body, _ = await send(server.base_url, "DELETE", "/v1/members/alice", bob)
    assert status == 403
    for raw, code in ((b"{not json", 400), (b"[]", 422), (b'{"handle": "x"}', 422), (b"\xff\xfe", 400),
                      (json.dumps({**as_bob, "extra": 1}).encode(), 422),
                      (json.dumps({**as_bob, "handle": "Carol!"}).encode(), 422),
                      (json.dumps({**as_bob, "sign_pub": "AAAA"}).encode(), 422),
                      (json.dumps({**as_bob, "enc_suite": "RSA"}).encode(), 422),
                      (json.dumps({**as_bob, "role": "root"}).encode(), 422)):
        status, body, _ = await send(server.base_url, "POST", "/v1/members", alice, raw)
        assert status == code, (raw, body)
        assert body["status"] == code
    status, body, _ = await send(server.base_url, "POST", "/v1/members", alice, as_bob)
    assert status == 201 and body["enc_suite"] == "MLKEM768_X25519"
    status, body, _ = await send(server.base_url, "POST", "/v1/members", alice, as_bob)
    assert status == 409


async def test_members_routes(server, alice):
    bob = generate_identity("bob")
    new = {"handle": "bob", "role": "member", "sign_pub": bob.sign_pub_b64, "enc_pub": bob.enc_pub_b64,
            "bus_pub": bob.bus_pub}
    assert (await send(server.base_url, "POST", "/v1/members", alice, new))[0] == 201
    status, body, _ = await send(server.base_url, "GET", "/v1/members", bob)
    assert status == 200 and [m["handle"] for m in body["members"]] == ["alice", "bob"]
    status, body, _ = await send(server.base_url, "GET", "/v1/members/bob", bob)
    assert status == 200 and body["sign_pub"] == bob.sign_pub_b64
    assert (await send(server.base_url, "GET", "/v1/members/zed", bob))[0] == 404
    # GET /v1/me's body is encoded once per member record: a changed member gets the new one at once
    for _ in range(2):
        status, me, headers = await send(server.base_url, "GET", "/v1/me", bob)
        assert status == 200 and me == body and me["role"] == "member"
        assert headers["Content-Type"] == "application/json; charset=utf-8"
    status, body, _ = await send(server.base_url, "PATCH", "/v1/members/bob", alice, {"role": "admin"})
    assert status == 200 and body["role"] == "admin"
    assert (await send(server.base_url, "GET", "/v1/me", bob))[1] == body
    status, body, _ = await send(server.base_url, "PATCH", "/v1/members/alice", bob, {"role": "member"})
    assert status == 200 and body["role"] == "member"
    assert (await send(server.base_url, "GET", "/v1/me", alice))[1] == body
    status, body, _ = await send(server.base_url, "PATCH", "/v1/members/bob", bob, {"role": "member"})
    assert status == 409 and "last admin" in body["detail"]
    assert (await send(server.base_url, "DELETE", "/v1/members/alice", bob))[0] == 204
    status, body, _ = await send(server.base_url, "GET", "/v1/me", alice)
    assert status == 401 and body["detail"] == BAD_SIGNATURE


async def test_offline_member_add_then_sighup(server, alice):
    dave = generate_identity("dave")
    bootstrap_member(server.data_dir, dave)
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        status, body, _ = await send(server.base_url, "GET", "/v1/me", dave)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and body["handle"] == "dave"


async def test_fails_closed_when_nats_is_down(server, alice):
    assert (await send(server.base_url, "GET", "/v1/me", alice))[0] == 200
    conf = server.data_dir / "nats.conf"
    good = conf.read_text()
    freeze(server.pid)
    try:
        pid = server.nats_pid()
        os.kill(pid, signal.SIGKILL)
        conf.write_text("broken {")  # keep it down until we mend it
    finally:
        server.send_signal(signal.SIGCONT)
    try:
        server.wait_healthy(want=503, timeout=20)
        status, body, headers = await send(server.base_url, "GET", "/v1/me", alice)
        assert status == 503, body
        assert "nonce" in body["detail"] and headers.get("Retry-After")
    finally:
        conf.write_text(good)
    server.wait_healthy(timeout=30)
    # The nonce bucket (memory) went with its nats-server: the new one refuses
    # requests created at or before its floor, a few seconds at most
    # (docs/operations.md, "Durability"); then a fresh request is served.
    deadline = time.monotonic() + 15
    while True:
        status, body, headers = await send(server.base_url, "GET", "/v1/me", alice)
        if status != 503 or time.monotonic() > deadline:
            break
        assert body["type"].endswith("/nonce-store-unavailable") and headers.get("Retry-After"), body
        time.sleep(0.25)
    assert status == 200, body


async def test_openapi_describes_every_route(shared_server):
    server = shared_server
    from unibus.testing import http_json

    status, doc = http_json("GET", server.base_url + "/openapi.json")
    assert status == 200
    expected = {
        ("get", "/v1/me"), ("get", "/v1/members"), ("post", "/v1/members"), ("get", "/v1/members/{handle}"),
        ("patch", "/v1/members/{handle}"), ("delete", "/v1/members/{handle}"), ("post", "/v1/rooms"),
        ("get", "/v1/rooms"), ("get", "/v1/rooms/{room_id}"), ("delete", "/v1/rooms/{room_id}"),
        ("put", "/v1/rooms/{room_id}/members/{handle}"), ("delete", "/v1/rooms/{room_id}/members/{handle}"),
        ("post", "/v1/rooms/{room_id}/keys"), ("get", "/v1/rooms/{room_id}/keys/me"), ("get", "/v1/bus"),
        ("get", "/healthz"), ("get", "/openapi.json"),
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert expected <= documented
    for (m, p) in documented:
        if p.startswith("/v1/"):
            assert doc["paths"][p][m]["security"] == [{"httpSignature": []}]
            assert "401" in doc["paths"][p][m]["responses"]


async def test_server_accepts_an_independent_rfc9421_signature(shared_server):
    """The signature base built by hand from RFC 9421 §2.3/§2.5, not by unibus.signing
    nor the library: the server must accept it."""
    alice = shared_server.identity
    body = b'{"name":"interop"}'
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    created, nonce = int(time.time()), base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    params = (f'("@method" "@path" "@query" "content-digest");created={created};nonce="{nonce}";'
              f'keyid="alice";alg="ed25519"')
    base = "\n".join([
        '"@method": POST',
        '"@path": /v1/rooms',
        '"@query": ?',
        f'"content-digest": {digest}',
        f'"@signature-params": {params}',
    ]).encode()
    signature = base64.b64encode(alice.sign_key.sign(base)).decode()
    headers = {"Content-Type": "application/json", "Content-Digest": digest,
               "Signature-Input": f"sig1={params}", "Signature": f"sig1=:{signature}:"}
    async with aiohttp.ClientSession() as s:
        async with s.post(shared_server.base_url + "/v1/rooms", data=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            assert (await r.json())["name"] == "interop"


async def test_a_logged_request_cannot_be_replayed_on_another_deployment(tmp_path, membershipd_factory):
    """Adversary: an ordinary member of deployment A (eve), reading A's membership log.

    alice is admin of A and of B with one identity file (the SDK's identity is
    not bound to a server: ``--server`` picks one). alice adds eve to A; eve
    lifts alice's signed ``POST /v1/members`` from ``GET /v1/log`` and sends it
    to B within the skew window: B must refuse it.
    """
    from unibus.client import UnibusClient

    alice, eve = generate_identity("alice"), generate_identity("eve")
    # Both bootstrapped first, so usually within one second: the same first admin, at the same
    # ``at``. Without entry 0's salt that gave both the same trust root, and B took the request
    # (a CI run found it, in a run where the first daemon started within that second).
    for name in ("a", "b"):
        bootstrap_member(tmp_path / name, alice, "admin")
    a, b = (membershipd_factory(data_dir=tmp_path / name) for name in ("a", "b"))
    admin_a = UnibusClient(a.base_url, alice)
    eve_a = UnibusClient(a.base_url, eve)
    try:
        await admin_a.add_member("eve", eve.sign_pub_b64, eve.enc_pub_b64, bus_pub=eve.bus_pub)
        entries = (await eve_a.log())["entries"]  # eve is an ordinary member of A: she may read the log
    finally:
        await admin_a.close()
        await eve_a.close()
    lifted = next(e["request"] for e in entries if e.get("kind") == "request"
                  and e["request"]["method"] == "POST" and e["request"]["path"] == "/v1/members")
    body = base64.b64decode(lifted["body"])
    headers = {"Signature-Input": lifted["signature_input"], "Signature": lifted["signature"],
               "Content-Digest": lifted["content_digest"], "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(b.base_url + lifted["path"], data=body, headers=headers) as r:
            status = r.status
    assert status == 401, f"B accepted alice's request lifted from A's log ({status}): eve is now a member of B"


async def test_a_node_restarts_with_a_lower_auth_skew(tmp_path, membershipd_factory, nats_server):
    """The nonce bucket made under the default skew (TTL 120 s, duplicate window 120 s) is brought down to
    a shorter TTL when membershipd restarts with a lower ``--auth-skew`` while the bucket lives on (an
    external nats-server here; on a cluster, the other nodes'): nats-server refuses a duplicate window
    longer than the max age, and membershipd must not fail to start over it (docs/http-api.md, "Nonces
    and replay protection"). A request accepted before the restart stays refused after it."""
    alice = generate_identity("alice")
    bootstrap_member(tmp_path / "d", alice, "admin")
    first = membershipd_factory("--nats-url", nats_server.url, data_dir=tmp_path / "d")
    created, kept = int(time.time()), "k" * 32
    assert (await send(first.base_url, "GET", "/v1/me", alice, created=created, nonce=kept))[0] == 200
    first.stop()
    second = membershipd_factory("--nats-url", nats_server.url, "--auth-skew", "20", data_dir=tmp_path / "d")
    status, problem, _ = await send(second.base_url, "GET", "/v1/me", alice, created=created, nonce=kept)
    assert status in (401, 503), problem  # replayed, or below the bucket's floor: refused either way
    deadline, status = time.monotonic() + 15, 0
    while status != 200 and time.monotonic() < deadline:
        nonce = secrets.token_urlsafe(24)
        status = (await send(second.base_url, "GET", "/v1/me", alice, nonce=nonce))[0]
        if status != 200:
            await asyncio.sleep(0.5)
    assert status == 200
    assert (await send(second.base_url, "GET", "/v1/me", alice, nonce=nonce))[0] == 401  # still a replay
