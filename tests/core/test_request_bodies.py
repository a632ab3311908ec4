"""The signature is checked from the headers before any byte of the body is read
(docs/http-api.md, "Order of the checks", "Slow and large bodies").

A raw socket plays the attacker: it sends a request head that announces an
8 MiB body and nothing else, and must get its answer (401, 408, 413, 415...)
and then see the connection closed, without the body ever being sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import serving_cleanly
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from unibus.auth import BAD_SIGNATURE, BODY_TIMEOUT_ENV, DUMMY_VERIFY_KEY, MAX_BODY
from unibus.client.blobs import sign_streamed_request
from unibus.client.keys import generate_identity
from unibus.signing import make_nonce, sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, run_membershipd

#: The body deadline of the module's daemon, in seconds (UNIBUS_BODY_TIMEOUT).
BODY_TIMEOUT = 2
EIGHT_MIB = 8 * 1024 * 1024
ZEROS_SHA256 = hashlib.sha256(b"\0" * EIGHT_MIB).digest()
SOCKET_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One daemon for the module: alice (admin), bob (member), a short body deadline."""
    data_dir = tmp_path_factory.mktemp("bodies") / "daemon"
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob")}
    bootstrap_member(data_dir, people["alice"], "admin")
    bootstrap_member(data_dir, people["bob"], "member")
    with serving_cleanly(MembershipdProcess(data_dir, env={BODY_TIMEOUT_ENV: str(BODY_TIMEOUT)})) as proc:
        proc.people = people
        yield proc
    assert "a" * 64 not in proc.log_text()  # the long lines of test_odd_heads_are_never_a_server_error: never quoted


# --------------------------------------------------------------------------- a raw HTTP/1.1 client


class Exchange:
    """One connection: send bytes, read one response, tell whether the server closed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response (a ``100 Continue`` is returned like any other)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            assert self._fill(), "connection closed inside a response body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_server(self) -> bool:
        """True once the server closed the connection (EOF or reset); False if
        it is still open after SOCKET_TIMEOUT seconds."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def head(method: str, target: str, headers: dict[str, str], port: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def signed_big_post(identity, *, key=None, nonce=None, target="/v1/rooms", sha256=ZEROS_SHA256,
                    length=EIGHT_MIB) -> dict[str, str]:
    """The headers of a signed POST announcing ``length`` bytes (the body is never built)."""
    h = sign_streamed_request("POST", target, sha256, keyid=identity.handle, private_key=key or identity.sign_key,
                              nonce=nonce)
    h.update({"Content-Type": "application/json", "Content-Length": str(length)})
    return h


def problem(body: bytes) -> dict:
    doc = json.loads(body)
    assert {"type", "title", "status", "detail"} <= set(doc)
    return doc


async def get(server, target, identity, nonce=None):
    h = sign_request("GET", target, None, keyid=identity.handle, private_key=identity.sign_key, nonce=nonce)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base_url + target, headers=h) as r:
            return r.status, await r.read()


def refused_before_the_body(server, headers, *, target="/v1/rooms") -> tuple[int, dict[str, str], dict]:
    """Send only the head of a request announcing 8 MiB; return the answer and
    check the connection was closed after it."""
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", target, headers, server.http_port))
        status, rh, body = x.response()
        assert rh.get("connection", "").lower() == "close", rh
        assert x.closed_by_server(), "the server kept the connection open after refusing an unread body"
        return status, rh, problem(body)
    finally:
        x.close()


# --------------------------------------------------------------------------- 401 before the body


def test_unsigned_8mib_post_is_401_before_its_body(server):
    status, headers, doc = refused_before_the_body(server, {"Content-Type": "application/json",
                                                           "Content-Length": str(EIGHT_MIB)})
    assert status == 401 and doc["detail"] == "missing Signature-Input header"
    assert headers["www-authenticate"] == 'Signature alg="ed25519"'


def test_bad_signature_and_unknown_keyid_are_401_before_the_body(server):
    alice = server.people["alice"]
    status, _, doc = refused_before_the_body(server, signed_big_post(alice, key=Ed25519PrivateKey.generate()))
    assert status == 401 and doc["detail"] == BAD_SIGNATURE
    status, _, doc = refused_before_the_body(server, signed_big_post(generate_identity("mallory")))
    assert status == 401 and doc["detail"] == BAD_SIGNATURE


def test_expired_or_uncovered_digest_is_401_before_the_body(server):
    alice = server.people["alice"]
    stale = sign_streamed_request("POST", "/v1/rooms", ZEROS_SHA256, keyid="alice", private_key=alice.sign_key,
                                  created=int(time.time()) - 3600)
    stale["Content-Length"] = str(EIGHT_MIB)
    status, _, doc = refused_before_the_body(server, stale)
    assert status == 401 and "expired" in doc["detail"]
    no_digest = sign_request("POST", "/v1/rooms", None, keyid="alice", private_key=alice.sign_key)
    no_digest["Content-Length"] = str(EIGHT_MIB)
    status, _, doc = refused_before_the_body(server, no_digest)
    assert status == 401 and doc["detail"] == "signature does not cover content-digest"
    chunked = sign_request("POST", "/v1/rooms", None, keyid="alice", private_key=alice.sign_key)
    chunked["Transfer-Encoding"] = "chunked"
    status, _, doc = refused_before_the_body(server, chunked)
    assert status == 401 and doc["detail"] == "signature does not cover content-digest"


async def test_replayed_nonce_is_401_before_the_body(server):
    alice = server.people["alice"]
    nonce = make_nonce()
    assert (await get(server, "/v1/me", alice, nonce=nonce))[0] == 200
    status, _, doc = refused_before_the_body(server, signed_big_post(alice, nonce=nonce))
    assert status == 401 and doc["detail"].startswith("replayed nonce")


async def test_unknown_keyid_and_bad_signature_give_byte_identical_answers(server):
    alice, mallory = server.people["alice"], generate_identity("mallory")
    answers = []
    for identity, key in ((mallory, None), (alice, Ed25519PrivateKey.generate()), (generate_identity("x"), None)):
        h = sign_request("GET", "/v1/me", None, keyid=identity.handle, private_key=key or identity.sign_key)
        async with aiohttp.ClientSession() as s:
            async with s.get(server.base_url + "/v1/me", headers=h) as r:
                answers.append((r.status, r.headers["Content-Type"], r.headers["WWW-Authenticate"], await r.read()))
    assert answers[0][0] == 401
    assert answers[0] == answers[1] == answers[2]
    assert json.loads(answers[0][3])["detail"] == BAD_SIGNATURE


async def test_an_unknown_keyid_costs_one_ed25519_verification_like_a_bad_signature(tmp_path, monkeypatch):
    """No timing oracle: both paths do exactly one Ed25519 verification (a real
    SQLite store behind the member directory; the verifications are counted)."""
    import asyncio
    import base64

    import nacl.bindings

    from unibus.auth import Authenticator, MemberDirectory
    from unibus.problems import Problem
    from unibus.store.db import migrate
    from unibus.store.sqlite import SqliteStore, new_member

    alice = generate_identity("alice")
    await asyncio.to_thread(migrate, tmp_path / "state.db")
    store = SqliteStore(tmp_path / "state.db")
    try:
        sign_pub = base64.b64decode(alice.sign_pub_b64)
        await store.add_member(new_member("alice", "admin", sign_pub, base64.b64decode(alice.enc_pub_b64), "X25519"))
        auth = Authenticator(MemberDirectory(store), nonces=None, skew=60)  # the nonce claim comes after: not reached
        keys_used = []
        real_open = nacl.bindings.crypto_sign_open
        monkeypatch.setattr(nacl.bindings, "crypto_sign_open", lambda sm, pk: keys_used.append(pk) or real_open(sm, pk))
        details = []
        for keyid, key in (("mallory", generate_identity("mallory").sign_key), ("alice", Ed25519PrivateKey.generate())):
            headers = sign_request("GET", "/v1/me", None, keyid=keyid, private_key=key)
            with pytest.raises(Problem) as e:
                await auth.verify("GET", "/v1/me", headers, b"")
            assert e.value.status == 401
            details.append(e.value.detail)
        assert keys_used == [bytes(DUMMY_VERIFY_KEY), sign_pub]
        assert details == [BAD_SIGNATURE, BAD_SIGNATURE]
        # and the good signature still passes, with the same single verification
        member, verified = await auth.verify("GET", "/v1/me", sign_request("GET", "/v1/me", None, keyid="alice",
                                                                           private_key=alice.sign_key), b"")
        assert member.handle == "alice" and len(keys_used) == 3
    finally:
        await store.close()


def test_the_dummy_key_is_a_real_ed25519_key():
    """The unknown-keyid path verifies against it: a real point, so the verification does the full work."""
    from nacl.signing import SigningKey

    assert len(bytes(DUMMY_VERIFY_KEY)) == 32
    signed = SigningKey(hashlib.sha256(b"unibus: the key of no member").digest()).sign(b"x")
    assert DUMMY_VERIFY_KEY.verify(signed) == b"x"


# --------------------------------------------------------------------------- after the signature: 408, 413, 415


async def test_slow_signed_body_is_408_and_its_nonce_is_spent(server):
    alice = server.people["alice"]
    headers = signed_big_post(alice)
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/v1/rooms", headers, server.http_port))
        x.send(b"\0" * 1000)  # ...and never the rest
        status, rh, body = x.response()
        assert status == 408, body
        assert problem(body)["detail"] == f"the request body did not arrive within {BODY_TIMEOUT} s"
        assert rh["connection"].lower() == "close" and x.closed_by_server()
    finally:
        x.close()
    # the same head again is a replay: refused before its body
    status, _, doc = refused_before_the_body(server, headers)
    assert status == 401 and doc["detail"].startswith("replayed nonce")


def test_signed_body_over_the_limit_is_413_before_the_body(server):
    status, _, doc = refused_before_the_body(server, signed_big_post(server.people["bob"], length=MAX_BODY + 1))
    assert status == 413 and doc["max_bytes"] == MAX_BODY
    assert doc["detail"] == f"the request body is {MAX_BODY + 1} bytes; this server reads at most {MAX_BODY} bytes"


def test_signed_chunked_body_over_the_limit_is_413(server):
    bob = server.people["bob"]
    h = sign_streamed_request("POST", "/v1/rooms", ZEROS_SHA256, keyid="bob", private_key=bob.sign_key)
    h["Transfer-Encoding"] = "chunked"
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/v1/rooms", h, server.http_port))
        chunk = b"\0" * (1024 * 1024)
        status = None
        for _ in range(16):  # up to 16 MiB, well over the limit; the 413 comes at 8 MiB
            try:
                x.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        status, rh, body = x.response()
        assert status == 413, body
        assert rh["connection"].lower() == "close"
    finally:
        x.close()


@pytest.mark.parametrize("codings", [
    {"Content-Encoding": "gzip"},
    {"Content-Encoding": "identity, gzip"},
    # two field lines (the names differ only in case): the second one was not looked at
    {"Content-Encoding": "identity", "content-encoding": "gzip"},
], ids=["gzip", "a list", "a second line"])
def test_content_encoding_is_415_before_the_body(server, codings):
    h = signed_big_post(server.people["bob"])
    h.update(codings)
    status, _, doc = refused_before_the_body(server, h)
    assert status == 415 and "Content-Encoding" in doc["detail"]


def test_signed_unknown_route_is_404_without_reading_the_body(server):
    target = "/v1/nope"
    status, _, doc = refused_before_the_body(server, signed_big_post(server.people["bob"], target=target),
                                             target=target)
    assert status == 404 and doc["detail"] == "no route for POST /v1/nope"


# --------------------------------------------------------------------------- bodies that do arrive


def test_expect_continue_waits_for_the_signature(server):
    # unsigned: the 401 comes instead of "100 Continue"
    status, _, doc = refused_before_the_body(server, {"Content-Length": str(EIGHT_MIB), "Expect": "100-continue"})
    assert status == 401
    # signed: 100 Continue, then the body, then 201
    bob = server.people["bob"]
    body = b'{"name":"continued"}'
    h = sign_request("POST", "/v1/rooms", body, keyid="bob", private_key=bob.sign_key)
    h.update({"Content-Type": "application/json", "Content-Length": str(len(body)), "Expect": "100-continue"})
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/v1/rooms", h, server.http_port))
        assert x.response()[0] == 100
        x.send(body)
        status, rh, raw = x.response()
        assert status == 201 and json.loads(raw)["name"] == "continued"
        assert rh.get("connection", "keep-alive").lower() != "close"
    finally:
        x.close()
    # an expectation nobody meets: 417
    h = sign_request("POST", "/v1/rooms", body, keyid="bob", private_key=bob.sign_key)
    h.update({"Content-Length": str(len(body)), "Expect": "tea"})
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/v1/rooms", h, server.http_port))
        status, _, raw = x.response()
        assert status == 417 and problem(raw)["status"] == 417
    finally:
        x.close()


def test_chunked_json_body_is_read_and_checked_after_the_signature(server):
    bob = server.people["bob"]
    body = b'{"name":"chunked"}'
    for sent, want in ((body, 201), (body.replace(b"chunked", b"CHUNKED"), 401)):
        h = sign_request("POST", "/v1/rooms", body, keyid="bob", private_key=bob.sign_key)
        h.update({"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        x = Exchange(server.http_port)
        try:
            x.send(head("POST", "/v1/rooms", h, server.http_port))
            x.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(sent), sent))
            status, _, raw = x.response()
            assert status == want, raw
            if want == 401:
                assert problem(raw)["detail"] == "Content-Digest does not match the body"
        finally:
            x.close()


@pytest.mark.parametrize("framing", [b"zz\r\nhello\r\n", b"5;\x01\r\nhello\r\n0\r\n\r\n"], ids=["size", "extension"])
def test_broken_chunked_framing_is_400(server, framing):
    """With the head, it is the parser's refusal; after ``100 Continue`` (the
    handler reads the body), the body's: a problem either way, which names
    what was wrong without quoting it."""
    bob = server.people["bob"]
    # with the head: one read, so the parser's refusal of the request; were the bytes ever
    # split over two reads, the body's refusal, as after 100 Continue
    for expect, kinds in ((False, ("malformed-request", "malformed-body")), (True, ("malformed-body",))):
        h = sign_streamed_request("POST", "/v1/rooms", ZEROS_SHA256, keyid="bob", private_key=bob.sign_key)
        h["Transfer-Encoding"] = "chunked"
        if expect:
            h["Expect"] = "100-continue"
        x = Exchange(server.http_port)
        try:
            if expect:
                x.send(head("POST", "/v1/rooms", h, server.http_port))
                assert x.response()[0] == 100
                x.send(framing)
            else:
                x.send(head("POST", "/v1/rooms", h, server.http_port) + framing)
            status, _, raw = x.response()
            doc = problem(raw)
            assert status == 400 and doc["type"].rsplit("/", 1)[1] in kinds, doc
            assert doc["detail"].startswith(("the request is malformed: Invalid character in chunk",
                                             "the request body is malformed: Invalid character in chunk")), doc
            assert "hello" not in doc["detail"] and "\\x01" not in doc["detail"]
        finally:
            x.close()


def test_client_gone_in_the_middle_of_a_body_is_no_server_error(server):
    bob = server.people["bob"]
    x = Exchange(server.http_port)
    x.send(head("POST", "/v1/rooms", signed_big_post(bob), server.http_port) + b"\0" * 4096)
    x.close()
    # the daemon carries on; the module teardown checks its log holds no traceback
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, _ = server.healthz()
        if status == 200:
            break
    assert status == 200


@pytest.mark.parametrize("raw_head", [
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nSignature-Input: \xff\xfe\r\nSignature: sig1=:\xff:\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nSignature-Input: sig1=(\"@method\");created=1;keyid=\"\x01\"\r\n"
    b"Signature: sig1=:AAAA:\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nContent-Digest: sha-256=:\xc3\xa9:\r\n\r\n",
    b"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"GET /v1/rooms/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/me?\xff=\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nSignature: a\r\nSignature: b\r\nSignature-Input: c\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
], ids=lambda b: re.sub(rb"[^A-Za-z0-9]+", b"-", b[:60]).decode())
def test_odd_heads_are_never_a_server_error(server, raw_head):
    """Every answer is a problem document, aiohttp's own 400s for a head its
    parser refuses included, and none quotes the bytes that were refused."""
    x = Exchange(server.http_port)
    try:
        x.send(raw_head)
        status, headers, body = x.response()
        assert 400 <= status < 500
        assert headers["content-type"].startswith("application/problem+json"), (status, headers, body)
        problem = json.loads(body)
        assert problem["status"] == status and problem["type"].startswith("https://unibus.dev/problems/")
        if problem["type"].endswith("/malformed-request"):  # logged before it was answered, in its words
            assert f"refused a malformed request (400): {problem['detail']}" in server.log_text()
        request_line, *fields = raw_head.split(b"\r\n\r\n")[0].split(b"\r\n")
        values = [request_line.split(b" ")[1].removeprefix(b"/v1/")] + [f.partition(b":")[2] for f in fields[1:]]
        for value in values:
            for sent in re.findall(rb"[A-Za-z0-9]{6,}", value):
                assert sent.decode() not in problem["detail"], problem
    finally:
        x.close()


# --------------------------------------------------------------------------- memory and configuration


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_rss_stays_flat_under_slow_unsigned_uploads(server):
    """0.11 buffered each unsigned 8 MiB body before looking at the signature
    (6 connections: +51 MB). Now each is refused after its head: the memory
    of membershipd grows by far less than one such body."""
    def attack():
        socks = []
        for _ in range(6):
            x = Exchange(server.http_port)
            x.send(head("POST", "/v1/rooms", {"Content-Type": "application/json",
                                              "Content-Length": str(EIGHT_MIB)}, server.http_port))
            socks.append(x)
        piece = b"\0" * (256 * 1024)
        for _ in range(8):  # 2 MiB each, as fast as the server lets us
            for x in socks:
                try:
                    x.send(piece)
                except OSError:
                    pass
        for x in socks:
            try:
                assert x.response()[0] == 401
            except (OSError, AssertionError):
                pass  # a reset may beat the answer: what matters here is the memory
            x.close()

    attack()  # warm-up: allocator pools, first-use imports
    before = _rss_kib(server.pid)
    for _ in range(3):
        attack()
    grown = _rss_kib(server.pid) - before
    assert grown < 8 * 1024, f"membershipd grew by {grown} KiB"


@pytest.mark.parametrize("value", ["soon", "99999"])
def test_a_bad_body_timeout_is_refused_with_one_line(tmp_path, value):
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), env={BODY_TIMEOUT_ENV: value}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"membershipd: error: {BODY_TIMEOUT_ENV}: ") and "from 0.1 to 3600" in lines[-1]
    assert "Traceback" not in proc.stderr


async def test_only_routes_declared_open_go_unsigned(tmp_path):
    """Outside /v1/ too, a route is signed unless it was registered with
    signed=False: one added under another prefix, or straight on the router,
    is refused without a signature (a real aiohttp server, a real SQLite store)."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from unibus.app import add_route, make_app
    from unibus.auth import Authenticator, MemberDirectory, auth_middleware
    from unibus.bus import Bus
    from unibus.pluginmanager import PluginManager
    from unibus.settings import Settings
    from unibus.store.db import migrate
    from unibus.store.sqlite import SqliteStore

    async def hello(request):
        return web.json_response({"hello": True})

    await asyncio.to_thread(migrate, tmp_path / "state.db")
    store = SqliteStore(tmp_path / "state.db")
    auth = Authenticator(MemberDirectory(store), nonces=None, skew=60)  # unsigned requests never reach a claim
    app = make_app(Settings(data_dir=tmp_path), PluginManager(load_entry_points=False), Bus("nats://127.0.0.1:1"),
                   None, store, middlewares=[auth_middleware(auth)])
    add_route(app, "GET", "/plugin/signed", hello, summary="signed, outside /v1", responses={200: "hi"})
    add_route(app, "GET", "/plugin/open", hello, summary="declared open", responses={200: "hi"}, signed=False)
    app.router.add_get("/plugin/raw", hello, allow_head=False)  # not through add_route: nobody declared it open
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            for path, want in (("/plugin/signed", 401), ("/plugin/raw", 401), ("/plugin/open", 200),
                               ("/openapi.json", 200), ("/nope", 404), ("/v1/me", 401), ("/v1/nope", 401)):
                async with s.get(f"http://127.0.0.1:{server.port}{path}") as r:
                    assert r.status == want, (path, await r.text())
    finally:
        await server.close()
        await store.close()


def test_body_timeout_from_the_environment():
    from unibus.auth import DEFAULT_BODY_TIMEOUT, body_timeout_from_env
    from unibus.errors import ConfigError

    assert body_timeout_from_env({}) == DEFAULT_BODY_TIMEOUT == 30.0
    assert body_timeout_from_env({BODY_TIMEOUT_ENV: " "}) == DEFAULT_BODY_TIMEOUT
    assert body_timeout_from_env({BODY_TIMEOUT_ENV: "0.1"}) == 0.1
    assert body_timeout_from_env({BODY_TIMEOUT_ENV: "3600"}) == 3600.0
    for bad in ("0", "0.09", "3601", "-5", "nan", "inf", "1e9", "30s", "x" * 100):
        with pytest.raises(ConfigError) as e:
            body_timeout_from_env({BODY_TIMEOUT_ENV: bad})
        assert str(e.value).startswith(f"{BODY_TIMEOUT_ENV}: ") and len(str(e.value)) < 160
