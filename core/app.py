"""The aiohttp control plane: app factory, problem+json middleware, /healthz, /openapi.json.

Handlers stay thin; state lives on the application under typed ``web.AppKey``
keys that plugins use too (``app[unibus.app.SETTINGS]``, ``app[unibus.app.BUS]``...).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import __version__
from .auth import MAX_BODY, body_unread
from .bus import Bus
from .inputs import check_path_params
from .openapi import OpenAPI
from .pluginmanager import PluginManager, current_plugin
from .pluginstate import Stash, plugin_name, state_dir_of
from .posture import compute_posture
from .problems import Problem, from_problem, problem_response
from .settings import Settings, insecure_plaintext_warnings
from .store.base import ChangeNotEnforced, Conflict, LogRejected, NotFound, Store, StoreUnavailable
from .supervisor import NatsSupervisor

log = logging.getLogger("unibus.http")

SETTINGS = web.AppKey("settings", Settings)
PLUGINS = web.AppKey("plugins", PluginManager)
BUS = web.AppKey("bus", Bus)
SUPERVISOR = web.AppKey("supervisor", object)  # NatsSupervisor | None (external NATS)
OPENAPI_DOC = web.AppKey("openapi", OpenAPI)
STORE = web.AppKey("store", Store)
EXTRA = web.AppKey("extra", dict)
#: The running :class:`unibus.events.ChangeEvents` (set once ``startup`` hooks ran).
EVENTS = web.AppKey("events", object)
#: Each plugin's :class:`unibus.pluginstate.Stash`, by plugin name (use :func:`stash`).
STASHES = web.AppKey("stashes", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Largest JSON body: a keys POST for 1,000 MLKEM768_X25519 members is ~1.6 MB.
MAX_JSON_BODY = MAX_BODY
#: After a response sent before the request body was all read (a 401, 403,
#: 408, 413...), the connection is closed, not kept: the response says
#: ``Connection: close``. Before closing, the server throws away (never keeps)
#: what is still in flight for at most this many seconds, the staged close of
#: RFC 9112 §9.6: closing a socket with unread bytes makes the kernel send a
#: reset that can destroy the response before the client reads it. aiohttp's
#: default would be 10 s ("lingering", in its web_protocol.py).
UNREAD_BODY_DRAIN = 1.0


class _ServerLogger(logging.LoggerAdapter):
    """aiohttp's ``aiohttp.server`` logger, except that a request aiohttp's
    parser refuses (400: a line too long, broken framing, a bad header) is
    one INFO line, not an ERROR with a traceback: any client can send those."""

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            what = " ".join(str(exc.message).split())[:200]
            self.info("refused a malformed request (%d): %s", exc.code, what)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


#: Keyword arguments of the ``web.AppRunner`` that serves the app. Request
#: bodies are taken as sent: no ``Content-Encoding`` is decoded (a signed
#: request with one is 415). See docs/http-api.md, "Slow and large bodies".
SERVER_OPTIONS: dict[str, Any] = {"lingering_time": UNREAD_BODY_DRAIN, "auto_decompress": False,
                                  "logger": _ServerLogger(logging.getLogger("aiohttp.server"), {})}

CORE_HEALTHZ_KEYS = frozenset({"status", "version", "node", "posture", "nats", "warnings"})


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as RFC 9457 problem+json; never a traceback to the client.

    A response that leaves while part of the request body has not arrived
    closes the connection (``Connection: close``; see UNREAD_BODY_DRAIN).
    """
    response = await _problem_or_response(request, handler)
    if not response.prepared and body_unread(request):
        response.force_close()
    return response


async def _problem_or_response(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as p:
        return from_problem(p)
    except NotFound as e:
        return problem_response(404, str(e), kind="not-found")
    except Conflict as e:
        return problem_response(409, str(e), kind="conflict", **e.extra)
    except LogRejected as e:  # the request's signature cannot join the membership log
        return problem_response(401, str(e), kind="invalid-signature",
                                headers={"WWW-Authenticate": 'Signature alg="ed25519"'})
    except StoreUnavailable as e:
        return problem_response(503, f"the store is unavailable: {e}", kind="store-unavailable",
                                headers={"Retry-After": "1"})
    except ChangeNotEnforced as e:
        return problem_response(503, "the change is saved, but the bus has not confirmed it on every node yet; "
                                f"it is retried until it has ({e}); /healthz shows what waits",
                                kind="change-not-enforced", headers={"Retry-After": "2"})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        if e.status == 404:
            detail = f"no route for {request.method} {request.path}"
        elif e.status == 405:
            allowed = headers.get("Allow", "")
            detail = f"{request.method} is not allowed on {request.path}" + (f"; allowed: {allowed}" if allowed else "")
        else:
            detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return problem_response(e.status, detail, headers=headers)
    except json.JSONDecodeError as e:
        return problem_response(400, f"malformed JSON body: {e.msg} at position {e.pos}", kind="malformed-json")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(500, "internal error; see the membershipd log")


@web.middleware
async def path_params_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route parameters against the rules of :mod:`unibus.inputs` (422), for
    every route, plugins' included; innermost, so after the signature."""
    if request.match_info.http_exception is None:
        check_path_params(request.match_info)
    return await handler(request)


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """Expect handler of signed routes: ``100 Continue`` waits until the
    signature was accepted (the auth middleware sends it with
    :func:`unibus.auth.send_continue` before reading the body); any other
    expectation is 417."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return problem_response(417, "the only expectation this server meets is Expect: 100-continue",
                                kind="expectation-failed")
    return None


#: Where a plugin's routes live unless it declares otherwise (docs/plugins.md, "Routes").
PLUGIN_ROUTE_PREFIX = "/v1/plugins/"


def plugin_path(plugin: str, path: str) -> str:
    """``path`` of plugin ``plugin`` under ``/v1/plugins/<plugin>/``; a path already there is kept."""
    base = f"{PLUGIN_ROUTE_PREFIX}{plugin}"
    if path == base or path.startswith(base + "/"):
        return path
    return base + (path if path.startswith("/") else "/" + path)


def add_route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    *,
    summary: str,
    responses: dict[int, str],
    signed: bool = True,
    request_schema: dict[str, Any] | None = None,
    request_content_type: str = "application/json",
    tags: list[str] | None = None,
    query: dict[str, dict[str, Any]] | None = None,
    namespaced: bool = True,
) -> str:
    """Register a route and its OpenAPI operation together (plugins use this too); returns its path.

    Called from a plugin's hook (``startup``), the route lives under
    ``/v1/plugins/<plugin name>/`` (``path`` ``"/events"`` of plugin
    ``audit`` is ``/v1/plugins/audit/events``) unless ``namespaced=False``
    declares the path as given. ``signed=True`` is enforced whatever the
    path: only ``signed=False`` opens a route, and never one under ``/v1/``
    (a ``ValueError``). ``query`` documents the query parameters the handler
    reads (name -> JSON Schema); path parameters are documented, and checked
    before the handler runs, by the rules of :mod:`unibus.inputs`.
    ``Expect: 100-continue`` is answered only once the signature was accepted
    (docs/http-api.md).
    """
    plugin = current_plugin()
    if plugin is not None and namespaced:
        path = plugin_path(plugin, path)
    if not signed and (path == "/v1" or path.startswith("/v1/")):
        raise ValueError(f"{method} {path}: every route under /v1/ is signed; drop signed=False "
                         "or serve it outside /v1/ with namespaced=False")
    app.router.add_route(method, path, handler, expect_handler=defer_continue if signed else None)
    app[OPENAPI_DOC].add_operation(
        method, path, summary=summary, responses=responses, signed=signed,
        request_schema=request_schema, request_content_type=request_content_type, tags=tags,
        operation_id=getattr(handler, "__name__", None), query=query,
    )
    return path


def stash(app: web.Application, plugin: str | None = None) -> Stash:
    """The plugin's own :class:`~unibus.pluginstate.Stash` on this app (docs/plugins.md, "State").

    ``plugin`` defaults to the plugin whose hook is running; a request
    handler, which runs outside any hook, names it (``stash(request.app, PLUGIN_NAME)``).
    """
    return app[STASHES].setdefault(plugin_name(plugin), Stash())


def state_dir(app: web.Application, plugin: str | None = None) -> Path:
    """The plugin's own directory ``<data-dir>/plugins/<plugin>/`` (mode 0700), made on first use."""
    return state_dir_of(app[SETTINGS].data_dir, plugin)


def current_posture(app: web.Application) -> dict[str, Any]:
    return compute_posture(app[SETTINGS], app[PLUGINS])


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    body = await healthz_body(app)
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def healthz_body(app: web.Application) -> dict[str, Any]:
    settings, bus = app[SETTINGS], app[BUS]
    supervisor: NatsSupervisor | None = app[SUPERVISOR]  # type: ignore[assignment]
    nonces = app[EXTRA].get("nonces")
    # JetStream answers *and* the nonce bucket is there: without it no signed
    # request can be served, so the node is degraded.
    jetstream = await (nonces.available() if nonces is not None else bus.jetstream_ok(timeout=1.0))
    store = app.get(STORE)
    if jetstream and store is not None:
        jetstream = await store.available()  # a cluster's state bucket has a leader
    connected = bus.connected
    ok = connected and jetstream and (supervisor is None or supervisor.running)
    cluster = None
    if settings.cluster_name:
        system_bus = app[EXTRA].get("system_bus")
        peers = await system_bus.route_peers() if system_bus is not None else None
        cluster = {"name": settings.cluster_name, "routes": peers or 0}
    body: dict[str, Any] = {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "node": settings.server_name,
        "posture": current_posture(app),
        "nats": {
            "mode": "embedded" if settings.embedded else "external",
            "url": settings.nats_public_url,
            "connected": connected,
            "jetstream": jetstream,
            "restarts": supervisor.restarts if supervisor is not None else 0,
            "kv_replicas": settings.kv_replicas,
            "cluster": cluster,
        },
    }
    # --insecure-plaintext: said on every /healthz, not only once in the log (docs/http-api.md)
    warnings = insecure_plaintext_warnings(settings)
    if warnings:
        body["warnings"] = warnings
    for name, fields in app[PLUGINS].call_each_safe("healthz_fields", app=app):
        placed = plugin_healthz(name, fields)
        if placed is None:
            continue
        if name in body or name in CORE_HEALTHZ_KEYS:  # never overwrites the core's keys
            log.warning("plugin %s: its name is a /healthz key of the core; its fields are left out", name)
            continue
        body[name] = placed
    return body


def plugin_healthz(name: str, fields: Any) -> dict[str, Any] | None:
    """Where a plugin's ``healthz_fields`` go: under its own name, always (docs/plugins.md).

    A plugin returns its own fields; the form of plugin API 1, ``{name: {...}}``
    (one key, the plugin's name, holding a dict), is unwrapped. None: nothing to add.
    """
    if not isinstance(fields, dict) or not fields:
        return None
    if len(fields) == 1 and isinstance(fields.get(name), dict):
        return dict(fields[name])
    return dict(fields)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_DOC].document())


def make_app(
    settings: Settings,
    plugins: PluginManager,
    bus: Bus,
    supervisor: NatsSupervisor | None,
    store: Store | None = None,
    *,
    middlewares: list[Any] | None = None,
) -> web.Application:
    """The control-plane application; plugins add their routes in ``startup``."""
    app = web.Application(middlewares=[problem_middleware, *(middlewares or []), path_params_middleware],
                          client_max_size=MAX_JSON_BODY)
    app[SETTINGS] = settings.for_plugins()  # no secret reaches a hook
    app[PLUGINS] = plugins
    app[BUS] = bus
    app[SUPERVISOR] = supervisor
    if store is not None:
        app[STORE] = store
    app[OPENAPI_DOC] = OpenAPI()
    app[EXTRA] = {"started": time.time()}
    app[STASHES] = {}
    add_route(app, "GET", "/healthz", healthz, summary="Liveness and posture of this node", signed=False,
              responses={200: "serving", 503: "degraded: NATS or JetStream unavailable"}, tags=["health"])
    add_route(app, "GET", "/openapi.json", openapi_json, summary="This OpenAPI document", signed=False,
              responses={200: "the document"}, tags=["meta"])
    return app
