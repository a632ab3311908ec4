"""What aiohttp answers by itself (unibus.httperrors), with both of its HTTP
parsers: llhttp (its C extension, what a wheel ships) and its pure-Python one
(``AIOHTTP_NO_EXTENSIONS=1``, PyPy, a platform without a wheel).

Every refusal is a problem document whose ``detail`` never quotes what was
sent, in the answer or the log, and a body whose framing breaks gets its 400
at once, whether its request is being served or still queued behind another.
A red team found the pure-Python parser's messages made of the refused bytes
alone (a request target, a chunk-size line), and a queued request's broken
body answered 408 at its deadline."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket

import pytest

from unibus.client import UnibusClient
from unibus.client.blobs import sign_streamed_request
from unibus.client.keys import generate_identity
from unibus.httperrors import PARSER_REASONS, parser_reason, parser_refusal
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member

from helpers import plugin_modules, serving_cleanly
from test_request_bodies import Exchange, head

#: What no answer and no log line may ever hold: they are in the refused bytes.
SECRETS = ("secretToken42", "hunter2", "SECRETVALUE42")
BODY = b'{"name": "x"}'


#: A plugin whose handler reads its (unsigned) route's body itself.
READS_BODY_PLUGIN = """
    from aiohttp import web
    from unibus import hookimpl
    from unibus.app import add_route

    PLUGIN_NAME = "reads_body"

    async def size(request):
        return web.json_response({"bytes": len(await request.read())})

    async def size_read_by_the_core(request):
        return web.json_response({"bytes": len(await request.read())})

    async def streams_then_reads(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial-")
        await request.read()  # a broken body: its refusal comes after the response began
        return response

    size.unibus_streaming = True  # it reads its body itself
    streams_then_reads.unibus_streaming = True

    @hookimpl
    async def startup(app):
        add_route(app, "POST", "/reads-body", size, summary="the body's size", responses={200: "its size"},
                  signed=False, namespaced=False)
        add_route(app, "POST", "/core-reads-body", size_read_by_the_core, summary="the body's size",
                  responses={200: "its size"}, signed=False, namespaced=False)
        add_route(app, "POST", "/streams-then-reads", streams_then_reads, summary="a streamed answer",
                  responses={200: "some bytes"}, signed=False, namespaced=False)
"""


@pytest.fixture(scope="module", params=["c", "python"])
def server(request, tmp_path_factory):
    """One daemon per parser; the pure-Python one logs at DEBUG, where aiohttp
    logs a connection's first bad method with a traceback of its own."""
    data_dir = tmp_path_factory.mktemp(f"parser-{request.param}") / "daemon"
    bob = generate_identity("bob")
    bootstrap_member(data_dir, bob, "member")
    env = {"UNIBUS_BODY_TIMEOUT": "10",  # a regression answers 408 after it, not after 30 s
           **plugin_modules(tmp_path_factory.mktemp("plugins"), {"reads_body_plugin": READS_BODY_PLUGIN})}
    if request.param == "python":
        env.update({"AIOHTTP_NO_EXTENSIONS": "1", "UNIBUS_LOG_LEVEL": "DEBUG"})
    with serving_cleanly(MembershipdProcess(data_dir, ["--plugin", "reads_body_plugin"], env=env)) as proc:
        proc.bob, proc.parser = bob, request.param
        yield proc
    log = proc.log_text()
    for secret in SECRETS:
        assert secret not in log, secret


def answer(server, *sends: bytes) -> list[tuple[int, dict[str, str], dict]]:
    """The answers to what is sent (each send waits for one answer first, but the first)."""
    x = Exchange(server.http_port)
    out = []
    try:
        for i, data in enumerate(sends):
            if i:
                out.append(x.response())
            x.send(data)
        out.append(x.response())
    finally:
        x.close()
    return [(status, headers, json.loads(body) if body else {}) for status, headers, body in out]


def signed_chunked_head(server, **extra: str) -> bytes:
    h = sign_streamed_request("POST", "/v1/rooms", hashlib.sha256(BODY).digest(), keyid="bob",
                              private_key=server.bob.sign_key)
    h.update({"Content-Type": "application/json", "Transfer-Encoding": "chunked", **extra})
    return head("POST", "/v1/rooms", h, server.http_port)


REFUSED = [
    b"GET secretToken42 HTTP/1.1\r\nHost: x\r\n\r\n",  # neither origin- nor absolute-form
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nX: SECRETVALUE42\x01\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nX: HTTPS traffic on an HTTP port\x01\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /v1/me HTTP/1.1\r\nHost: x\r\nSECRETVALUE42 : y\r\n\r\n",
    b"SECRETVALUE42( /v1/me HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad method, on the connection's first request
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03SECRETVALUE42\r\n\r\n",  # TLS to the plain port
]


@pytest.mark.parametrize("raw", REFUSED, ids=lambda b: re.sub(rb"[^A-Za-z0-9]+", b"-", b[:40]).decode())
def test_a_refused_head_is_a_problem_that_quotes_nothing(server, raw):
    [(status, headers, doc)] = answer(server, raw)
    assert status == 400 and headers["content-type"].startswith("application/problem+json"), (status, doc)
    assert doc["type"] == "https://unibus.dev/problems/malformed-request" and doc["status"] == 400
    assert not any(secret in doc["detail"] for secret in SECRETS), doc
    assert "TLS" not in doc["detail"] or raw.startswith(b"\x16\x03"), doc  # the message was compared, not searched
    first_bad_method = raw.startswith((b"SECRET", b"\x16"))  # aiohttp logs it at DEBUG, where only one daemon logs
    if server.parser == "python" or not first_bad_method:
        assert f"refused a malformed request (400): {doc['detail']}" in server.log_text()


@pytest.mark.parametrize("chunks", [
    b"my password is hunter2\r\n" + BODY + b"\r\n0\r\n\r\n",  # a chunk-size line that is text
    b"%x\r\n%s\r\n0\r\n" % (len(BODY), BODY) + b"X-hunter2: y\r\n" * 200 + b"\r\n",  # trailers
    b"1" + b"0" * 9000 + b"\r\n",  # a chunk-size line over 8190 bytes
], ids=["size-line", "trailers", "long-size-line"])
@pytest.mark.parametrize("when", ["with-the-head", "after-100-continue"])
def test_a_broken_body_is_400_at_once_and_quotes_nothing(server, chunks, when):
    """Never a 408 at the body's deadline, never a 500 (the pure-Python parser's
    ``RequestPayloadError`` was one)."""
    if when == "with-the-head":
        answers = answer(server, signed_chunked_head(server) + chunks)
    else:
        answers = answer(server, signed_chunked_head(server, Expect="100-continue"), chunks)
        assert answers.pop(0)[0] == 100
    status, headers, doc = answers[-1]
    assert status in (400, 201), (status, doc)  # 201: a parser that accepts these trailers
    if status == 400:
        assert doc["type"].rsplit("/", 1)[1] in ("malformed-request", "malformed-body"), doc
        assert not any(secret in doc["detail"] for secret in SECRETS), doc


async def test_a_broken_body_of_a_queued_request_is_400_at_once(server):
    """A request whose head was parsed while another was served (pipelined),
    then its body's framing broke: aiohttp queued the refusal behind it and
    left its body open (it was not the request being served), so it answered
    408 at the body's deadline. Request 1 is a download of 16 MiB that this
    client reads only once the bad chunk was sent."""
    async with UnibusClient(server.base_url, server.bob) as bob:
        room = (await bob.create_room("queued"))["room_id"]
    blob = os.urandom(16 << 20)
    target = f"/v1/rooms/{room}/blobs"
    h = sign_streamed_request("PUT", target, hashlib.sha256(blob).digest(), keyid="bob", private_key=server.bob.sign_key)
    h.update({"Content-Type": "application/octet-stream", "Content-Length": str(len(blob))})
    [(status, _, doc)] = answer(server, head("PUT", target, h, server.http_port) + blob)
    assert status == 201, doc
    download = f"{target}/{doc['blob_id']}"
    h = sign_request("GET", download, None, keyid="bob", private_key=server.bob.sign_key)
    x = Exchange(server.http_port)
    try:
        x.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        x.send(head("GET", download, h, server.http_port) + signed_chunked_head(server))
        while b"\r\n\r\n" not in x.buf:  # request 1 is being served: request 2 waits in the queue
            assert x._fill()
        x.send(b"zz\r\n" + BODY + b"\r\n")
        status, _, got = x.response()
        assert status == 200 and got == blob
        status, _, raw = x.response()
    finally:
        x.close()
    doc = json.loads(raw)
    assert status == 400 and doc["type"].endswith(("/malformed-body", "/malformed-request")), doc


@pytest.mark.parametrize("first", [
    "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
], ids=["declined-upgrade", "connect"])
def test_a_broken_body_behind_an_upgrade_is_400_at_once(server, first):
    """aiohttp parses what follows a request that asks for an upgrade once it
    has answered it, outside ``data_received``: a review found the broken body
    of a request queued there answered 408 at the body's deadline."""
    x = Exchange(server.http_port)
    try:
        x.send(first.encode() + signed_chunked_head(server))
        if server.parser == "python" and first.startswith("CONNECT"):
            assert x.closed_by_server()  # that parser's CONNECT: one answer (404), then the connection ends
            return
        x.response()  # the upgrade declined (200), the CONNECT refused
        x.send(b"zz\r\n" + BODY + b"\r\n")
        status, _, raw = x.response()
    finally:
        x.close()
    doc = json.loads(raw)
    assert status == 400 and doc["type"].endswith(("/malformed-body", "/malformed-request")), doc


def test_a_handler_that_reads_a_broken_body_itself_answers_400(server):
    """A plugin's handler that reads its body itself gets the parser's refusal:
    a 400 problem and one log line, never a 500 whose traceback quotes the bytes."""
    h = {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked", "Expect": "100-continue"}
    answers = answer(server, head("POST", "/reads-body", h, server.http_port),
                     b"my password is hunter2\r\nabc\r\n0\r\n\r\n")
    [(status, _, _), (status2, _, doc)] = answers
    assert status == 100, answers
    assert status2 == 400 and doc["type"].endswith("/malformed-body"), answers
    assert not any(secret in doc["detail"] for secret in SECRETS), doc


def test_an_error_after_a_streamed_answer_began_closes_the_connection(server):
    """No problem document can follow a response that began: it went out as
    that response's body (a review). The connection is closed instead."""
    h = {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked", "Expect": "100-continue"}
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/streams-then-reads", h, server.http_port))
        assert x.response()[0] == 100
        while b"partial-" not in x.buf:
            assert x._fill()
        x.send(b"zz\r\nabc\r\n")
        assert x.closed_by_server()
        assert x.buf.startswith(b"HTTP/1.1 200") and x.buf.count(b"HTTP/1.1") == 1, x.buf
    finally:
        x.close()


@contextlib.asynccontextmanager
async def core_app_serving(tmp_path, path, handler):
    """The core's app (its middlewares, a real SQLite store) with one open route, on a real
    aiohttp server; yields its port."""
    import asyncio

    from aiohttp.test_utils import TestServer

    from unibus.app import add_route, make_app
    from unibus.bus import Bus
    from unibus.pluginmanager import PluginManager
    from unibus.settings import Settings
    from unibus.store.db import migrate
    from unibus.store.sqlite import SqliteStore

    await asyncio.to_thread(migrate, tmp_path / "state.db")
    store = SqliteStore(tmp_path / "state.db")
    app = make_app(Settings(data_dir=tmp_path), PluginManager(load_entry_points=False), Bus("nats://127.0.0.1:1"),
                   None, store)
    add_route(app, "GET", path, handler, summary="x", responses={200: "x"}, signed=False, namespaced=False)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
    try:
        yield test_server.port
    finally:
        await test_server.close()
        await store.close()


async def test_a_parser_error_that_is_not_the_request_body_is_no_400(tmp_path):
    """A handler whose own HTTP client met a broken upstream raises the same
    exception class as a refused body: only a refusal of this request's body
    is the client's fault (400); anything else is a 500."""
    import aiohttp
    from aiohttp.http_exceptions import TransferEncodingError

    async def upstream_broke(request):
        raise TransferEncodingError("Not enough data to satisfy transfer length header.")

    async with core_app_serving(tmp_path, "/upstream", upstream_broke) as port:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/upstream") as r:
                assert r.status == 500 and (await r.json())["type"].endswith("/internal-server-error")


async def test_an_http_exception_after_a_streamed_answer_began_closes_the_connection(tmp_path):
    """aiohttp writes an HTTP exception (a 404, a redirect) as a response of its
    own: raised after a streamed answer began, it went out inside that
    answer's body. The connection is closed instead."""
    import asyncio

    from aiohttp import web

    async def streams_then_404(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial-")
        raise web.HTTPNotFound()

    async with core_app_serving(tmp_path, "/streams", streams_then_404) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /streams HTTP/1.1\r\nHost: x\r\n\r\n")
            received = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        finally:
            writer.close()
    assert received.startswith(b"HTTP/1.1 200") and b"partial-" in received
    assert received.count(b"HTTP/1.1") == 1 and b"problem" not in received, received


def test_an_open_route_with_a_body_sends_one_100_continue(server):
    """The core reads an open route's body under its deadline; its ``100
    Continue`` came once from the route's expect handler and once more from
    that read."""
    h = {"Content-Type": "application/octet-stream", "Content-Length": "3", "Expect": "100-continue"}
    x = Exchange(server.http_port)
    try:
        x.send(head("POST", "/core-reads-body", h, server.http_port))
        assert x.response()[0] == 100
        x.send(b"abc")
        status, _, raw = x.response()
        assert status == 200 and json.loads(raw) == {"bytes": 3}, raw
        assert x.buf == b""
    finally:
        x.close()


@pytest.mark.parametrize("message, reason", [
    ("Invalid character in Content-Length:\n\n  b'-1'\n  ^", "Invalid character in Content-Length"),
    ("Bad status line:\n  Invalid HTTP version:\n\n  b'GET / HTTP/9'\n      ^", "Invalid HTTP version"),
    ("Missing 'Host' header in request.", "Missing 'Host' header in request"),
    ("Duplicate 'HoSt' header found.", "Duplicate 'host' header found"),
    ("Duplicate 'X-Secret' header found.", None),  # not a header that may appear once: not aiohttp's
    ("secretToken42", None),
    ("Invalid header token:\n\n  b'secretToken42'", "Invalid header token"),
    ("my password is hunter2:\n\n  b'x'", None),
], ids=[str(i) for i in range(8)])
def test_the_reasons_shown_are_fixed_texts(message, reason):
    from aiohttp.http_exceptions import BadHttpMessage

    assert parser_reason(BadHttpMessage(message)) == reason
    refusal = parser_refusal(BadHttpMessage(message))
    assert refusal == (f"the request is malformed: {reason}" if reason else "the request is malformed")
    assert all("\n" not in r and not r.endswith(".") for r in PARSER_REASONS)


async def test_for_server_makes_the_handler_that_server_would():
    """``for_server`` uses ``web.Server``'s private ``_loop`` and ``_kwargs``:
    every attribute of its handler is what ``server()`` gives aiohttp's own,
    with the daemon's options, but the class and what it adds."""
    from collections import deque

    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    from unibus.app import server_options
    from unibus.httperrors import ProblemRequestHandler, for_server

    runner = web.AppRunner(web.Application(), access_log=None, handle_signals=False, **server_options(7.0))
    await runner.setup()
    try:
        theirs, ours = runner.server(), for_server(runner.server)
        assert type(theirs) is RequestHandler and type(ours) is ProblemRequestHandler
        names = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
        assert len(names) > 30
        for name in sorted(names - {"_cache", "_messages"}):
            a, b = getattr(theirs, name, None), getattr(ours, name, None)
            if a is None or isinstance(a, (bool, int, float, str)) or name in (
                    "logger", "_manager", "_request_handler", "_request_factory", "_loop", "access_log_class"):
                assert a is b or a == b, name
            else:
                assert type(a) is type(b), name
        assert isinstance(ours._messages, deque) and not ours._messages and ours._open_body is None
        assert ours._keepalive_timeout == 7.0 and ours.logger is server_options()["logger"]
    finally:
        await runner.cleanup()
