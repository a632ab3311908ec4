"""Who is asking, and where plugin routes live (docs/plugins.md, "Routes" and "Who is asking")."""

from __future__ import annotations

import pytest
from aiohttp import web

from unibus import hookimpl
from unibus.app import OPENAPI_DOC, add_route
from unibus.auth import current_member, require_admin, require_member
from unibus.openapi import OpenAPI

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

        app[CTX_PATHS] = [
            add_route(app, "GET", "/whoami", whoami, summary="who", responses={200: "me"}),
            add_route(app, "GET", "/admin", admin_only, summary="admin", responses={200: "admin"}),
            add_route(app, "GET", "/ctx-open", open_page, summary="open", responses={200: "x"}, signed=False,
                      namespaced=False),
            add_route(app, "GET", "/ctx-signed", outside, summary="signed outside /v1/", responses={200: "x"},
                      namespaced=False),
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
                                       "/ctx-signed"]
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
