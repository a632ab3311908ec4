"""Who is asking, and where plugin routes live (docs/plugins.md, "Routes" and "Who is asking")."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from unibus import hookimpl
from unibus.app import OPENAPI_DOC, add_route
from unibus.auth import current_member, require_admin, require_member
from unibus.openapi import OpenAPI
from unibus.signing import sign_request
from unibus.store.turns import writer

CTX_PATHS = web.AppKey("ctx_paths", list)


class ContextPlugin:
    PLUGIN_NAME = "ctx"

    @hookimpl
    def startup(self, app):
        async def whoami(request):
            me = require_member(request)
            return web.json_response({"handle": me.handle, "role": me.role})

        async def admin_only(request):
            return web.json_response({"admin": require_admin(request).handle})

        async def open_page(request):
            who = current_member(request)
            return web.json_response({"member": None if who is None else who.handle})

        async def outside(request):
            return web.json_response({"handle": require_member(request).handle})

        async def writing_for(request):
            return web.json_response({"writer": writer.get(), "port": request.transport.get_extra_info("peername")[1]})

        app[CTX_PATHS] = [
            add_route(app, "GET", "/whoami", whoami, summary="who", responses={200: "me"}),
            add_route(app, "GET", "/admin", admin_only, summary="admin", responses={200: "admin"}),
            add_route(app, "GET", "/ctx-open", open_page, summary="open", responses={200: "x"}, signed=False,
                      namespaced=False),
            add_route(app, "GET", "/ctx-signed", outside, summary="signed outside /v1/", responses={200: "x"},
                      namespaced=False),
            add_route(app, "GET", "/writer", writing_for, summary="whose writes", responses={200: "x"}),
            add_route(app, "GET", "/writer-open", writing_for, summary="whose writes", responses={200: "x"},
                      signed=False, namespaced=False),
        ]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path_factory.mktemp("ctx") / "d", [ContextPlugin()]).start()
    try:
        yield app
    finally:
        app.stop()


def test_plugin_routes_live_under_v1_plugins_name(served):
    assert served.app[CTX_PATHS] == ["/v1/plugins/ctx/whoami", "/v1/plugins/ctx/admin", "/ctx-open",
                                       "/ctx-signed", "/v1/plugins/ctx/writer", "/writer-open"]
    paths = served.app[OPENAPI_DOC].document()["paths"]
    assert "/v1/plugins/ctx/whoami" in paths and "/whoami" not in paths
    assert served.anonymous.get("/whoami")[0] == 404


def test_require_member_and_require_admin(served):
    status, body = served.admin.get("/v1/plugins/ctx/whoami")
    assert (status, body) == (200, {"handle": "admin", "role": "admin"})
    bob = served.member("bob")
    assert bob.get("/v1/plugins/ctx/whoami") == (200, {"handle": "bob", "role": "member"})
    status, problem = bob.get("/v1/plugins/ctx/admin")
    assert status == 403 and problem["detail"] == "this action needs the admin role"
    assert served.admin.get("/v1/plugins/ctx/admin") == (200, {"admin": "admin"})


def test_unsigned_callers_never_reach_a_signed_plugin_route(served):
    for path in ("/v1/plugins/ctx/whoami", "/v1/plugins/ctx/admin", "/ctx-signed"):
        status, problem = served.anonymous.get(path)
        assert status == 401, path
        assert problem["status"] == 401
    # a signed route outside /v1/ serves signed requests
    assert served.admin.get("/ctx-signed") == (200, {"handle": "admin"})


def test_a_removed_member_is_refused_on_plugin_routes(served):
    carol = served.member("carol")
    assert carol.get("/v1/plugins/ctx/whoami")[0] == 200
    assert served.admin.delete("/v1/members/carol")[0] == 204
    assert carol.get("/v1/plugins/ctx/whoami")[0] == 401


def test_an_open_route_has_no_member(served):
    assert served.anonymous.get("/ctx-open") == (200, {"member": None})


def test_signed_false_under_v1_is_refused():
    app = web.Application()
    app[OPENAPI_DOC] = OpenAPI()

    async def h(request):
        return web.json_response({})

    with pytest.raises(ValueError, match="every route under /v1/ is signed"):
        add_route(app, "GET", "/v1/open", h, summary="x", responses={200: "x"}, signed=False)
    # outside a plugin's hook, paths are taken as given
    assert add_route(app, "GET", "/v1/core", h, summary="x", responses={200: "x"}) == "/v1/core"


class _Routes:
    """A plugin that adds ``routes`` [(method, path, signed)] outside its namespace in its startup."""

    def __init__(self, name, routes):
        self.PLUGIN_NAME = name
        self.routes = routes

    @hookimpl
    def startup(self, app):
        async def handler(request):
            return web.json_response({"plugin": self.PLUGIN_NAME, "member": None if current_member(request) is None
                                      else current_member(request).handle})

        for method, path, signed in self.routes:
            add_route(app, method, path, handler, summary=path, responses={200: "x"}, signed=signed,
                      namespaced=False)


@pytest.mark.parametrize("first, second, refused", [
    # another plugin's open registration of the same route opened the first one's signed route
    # (aiohttp served the first handler; the OpenAPI document, which decides, kept the last): red team
    (("GET", "/shared", True), ("GET", "/shared", False), "already registered GET /shared"),
    (("GET", "/shared/{item}", True), ("GET", "/shared/{thing}", False), "already registered GET /shared/{"),
    # a plain path that another owner's template would match: aiohttp hands it to the plain route
    (("GET", "/docs/{page}", True), ("POST", "/docs/index", True), "could reach plugin "),
], ids=["same route", "same template", "a path inside another's template"])
def test_a_plugin_cannot_register_a_route_another_plugin_serves(tmp_path, first, second, refused):
    """Whichever of the two starts first (pluggy calls the later registered first), the second
    registration is refused and the daemon does not start."""
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path / "d", [_Routes("alpha", [first]), _Routes("beta", [second])])
    with pytest.raises(Exception, match="startup failed: ValueError") as e:
        app.start()
    app.stop()
    assert refused in str(e.value) and "plugin alpha" in str(e.value) and "plugin beta" in str(e.value)


def test_a_plugin_cannot_take_over_a_core_route(tmp_path):
    """The red team's plugin added GET /v1/members/admin beside the core's /v1/members/{handle}: aiohttp
    served the plugin's for that path, and the OpenAPI document lost the core's description."""
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path / "d", [_Routes("beta", [("GET", "/v1/members/admin", True)])])
    with pytest.raises(Exception, match="could reach the core's GET /v1/members/{handle}"):
        app.start()
    app.stop()


def test_routes_of_different_owners_that_no_request_can_confuse_are_fine(tmp_path):
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path / "d", [_Routes("alpha", [("GET", "/a/{x}", True)]),
                                     _Routes("beta", [("GET", "/a/{x}/more", True), ("GET", "/b", False)])]).start()
    try:
        assert app.anonymous.get("/b") == (200, {"plugin": "beta", "member": None})
        assert app.admin.get("/a/1") == (200, {"plugin": "alpha", "member": "admin"})
        assert app.anonymous.get("/a/1")[0] == 401
    finally:
        app.stop()


def test_a_plugin_whose_name_is_not_a_path_segment_gets_no_route(tmp_path):
    """A plugin named ``{victim}`` registered /v1/plugins/{victim}/secret, a template that caught other
    plugins' unknown paths (red team); ``alpha/x`` would have landed in alpha's namespace."""
    from unibus.app import plugin_path

    for name in ("{victim}", "alpha/x", "..", "a b"):
        with pytest.raises(ValueError, match="cannot name a directory"):
            plugin_path(name, "/secret")
    assert plugin_path("alpha.v2", "/secret") == "/v1/plugins/alpha.v2/secret"


def test_an_open_route_that_takes_a_body_reads_it_under_the_body_deadline(tmp_path, monkeypatch):
    """Adversary: an anonymous client on a plugin's open route that reads a body. Trickling the body
    kept the connection busy for good: no body deadline, and the idle deadline does not apply while a
    request is served (red team). Now 408 at the body deadline, as on a signed route."""
    import socket

    from unibus.testing import UnibusApp

    class Echo:
        PLUGIN_NAME = "echo"

        @hookimpl
        def startup(self, app):
            async def echo(request):
                return web.json_response({"bytes": len(await request.read())})

            add_route(app, "POST", "/echo", echo, summary="echo", responses={200: "x"}, signed=False,
                      namespaced=False)

    monkeypatch.setenv("UNIBUS_BODY_TIMEOUT", "1.5")
    served = UnibusApp(tmp_path / "d", [Echo()]).start()
    try:
        assert served.anonymous.post("/echo", {"a": 1})[0] == 200
        port = served.settings.http_addr.port
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"a\"")
            answer = b""  # the socket's 20 s timeout bounds the wait: no 408 by then fails the test
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        served.stop()


def test_the_stores_writes_in_a_signed_request_are_its_members(served):
    """The store shares a node's turns for atomic batches between members (docs/store.md, "Batches
    in flight"): a handler's writes count as the signer's, and an open route's as the node's own,
    also on a keep-alive connection that served a signed request just before."""
    bob = served.member("writer-bob")

    async def both() -> list[dict]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         timeout=aiohttp.ClientTimeout(total=10)) as session:
            seen = []
            for path, signed in (("/v1/plugins/ctx/writer", True), ("/writer-open", False),
                                 ("/v1/plugins/ctx/writer", True), ("/writer-open", True)):
                headers = (sign_request("GET", path, None, keyid="writer-bob", private_key=bob.identity.sign_key)
                           if signed else {})
                async with session.get(served.base_url + path, headers=headers) as resp:
                    assert resp.status == 200
                    seen.append(await resp.json())
            return seen

    seen = asyncio.run(both())
    assert [s["writer"] for s in seen] == ["writer-bob", None, "writer-bob", None]
    # one connection: what a request set does not outlive it (aiohttp 3.14 serves each request in a
    # context of its own, and the middleware resets it as well)
    assert len({s["port"] for s in seen}) == 1
    assert served.admin.get("/v1/plugins/ctx/writer")[1]["writer"] == "admin"
