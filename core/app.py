"""The aiohttp control plane: app factory, problem+json middleware, /healthz, /openapi.json.

Handlers stay thin; state lives on the application under typed ``web.AppKey``
keys that plugins use too (``app[unibus.app.SETTINGS]``, ``app[unibus.app.BUS]``...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__
from .auth import BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT, MAX_BODY, floor_wait, send_continue
from .bus import Bus
from .changelimit import ChangeLimit
from .connlimits import DEFAULT_IDLE_TIMEOUT, send_within
from .health import HealthProber, HealthState
from .inputs import check_path_params
from .logthrottle import LogThrottle
from .metrics import CLIENT_GONE, Metrics, route_label
from .openapi import JSON, OpenAPI, Response, ResponseSpec
from .pluginmanager import PluginManager, current_plugin
from .pluginstate import Stash, plugin_name, state_dir_of
from .posture import LISTENER_STATES, LISTENERS, merge_posture, owned_reports
from .httperrors import parser_refusal, parser_refused, unreadable_body
from .problems import INTERNAL_ERROR_DETAIL, Problem, from_problem, problem_response
from .settings import Settings, insecure_plaintext_warnings
from .store.base import ChangeNotEnforced, Conflict, Forbidden, LogRejected, NotFound, Store, StoreUnavailable
from .supervisor import NatsSupervisor

log = logging.getLogger("unibus.http")

SETTINGS = web.AppKey("settings", Settings)
PLUGINS = web.AppKey("plugins", PluginManager)
BUS = web.AppKey("bus", Bus)
SUPERVISOR = web.AppKey("supervisor", object)  # NatsSupervisor | None (external NATS)
OPENAPI_DOC = web.AppKey("openapi", OpenAPI)
#: Who registered each route: (METHOD, path template) -> "the core" or "plugin <name>" (add_route).
ROUTE_OWNERS = web.AppKey("route_owners", dict)
#: The warnings of /healthz about a plugin's fields: once an hour each, not on every call (monitoring asks
#: every few seconds; a plugin author's walkthrough).
HEALTHZ_WARNINGS = web.AppKey("healthz_warnings", LogThrottle)
#: how often one member may change another's rooms (unibus.changelimit)
CHANGE_LIMIT = web.AppKey("change_limit", ChangeLimit)
STORE = web.AppKey("store", Store)
EXTRA = web.AppKey("extra", dict)
#: The running :class:`unibus.events.ChangeEvents` (set once ``startup`` hooks ran).
EVENTS = web.AppKey("events", object)
#: Each plugin's :class:`unibus.pluginstate.Stash`, by plugin name (use :func:`stash`).
STASHES = web.AppKey("stashes", dict)
#: The daemon's :class:`unibus.metrics.Metrics`; a plugin makes its own metrics with
#: ``app[METRICS].plugin("<plugin name>")`` (docs/plugins.md, "Metrics").
METRICS = web.AppKey("metrics", Metrics)
#: The :class:`unibus.health.HealthProber` whose results /healthz reads (absent until the daemon started it).
HEALTH = web.AppKey("health", HealthProber)

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
    parser refuses (400: a line too long, broken framing, a bad header), and a
    connection that ends while aiohttp handles a request (a client gone, or
    dropped for not reading), are one INFO line each, not an ERROR with a
    traceback: any client can cause those. A refusal is told in the words of
    its answer (unibus.httperrors), never with the refused bytes, also at
    DEBUG, where aiohttp logs a bad method on a connection's first request."""

    def debug(self, msg: Any, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        # aiohttp logs a bad method on a connection's first request (a port scan, TLS sent to a
        # plain port) at DEBUG, with a traceback that quotes the request line
        refusal = parser_refused(exc_info) if isinstance(exc_info, BaseException) else None
        if refusal is not None:
            super().debug("refused a malformed request (%d): %s", refusal.code, parser_refusal(refusal))
            return
        super().debug(msg, *args, exc_info=exc_info, **kwargs)

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        refusal = parser_refused(exc)
        if refusal is not None:  # also when aiohttp drains what is left of a body its parser refused
            self.info("refused a malformed request (%d): %s", refusal.code, parser_refusal(refusal))
            return
        if isinstance(exc, ConnectionError):  # a client gone, or dropped for not reading (unibus.connlimits)
            self.info("a client's connection ended while its request was handled (%s)", type(exc).__name__)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


#: Keyword arguments of the ``web.AppRunner`` that serves the app. Request
#: bodies are taken as sent: no ``Content-Encoding`` is decoded (a signed
#: request with one is 415). See docs/http-api.md, "Slow and large bodies".
#: The daemon adds ``keepalive_timeout`` (UNIBUS_HTTP_IDLE_TIMEOUT; aiohttp's
#: own default is 3630 s) and serves through unibus.connlimits.LimitedSite,
#: which bounds the connections: :func:`server_options`.
SERVER_OPTIONS: dict[str, Any] = {"lingering_time": UNREAD_BODY_DRAIN, "auto_decompress": False,
                                  "logger": _ServerLogger(logging.getLogger("aiohttp.server"), {})}


def server_options(idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> dict[str, Any]:
    """SERVER_OPTIONS with ``keepalive_timeout``: a connection waits at most ``idle_timeout``
    for its next request head, after it is made and after each response (unibus.connlimits)."""
    return {**SERVER_OPTIONS, "keepalive_timeout": idle_timeout}


CORE_HEALTHZ_KEYS = frozenset({"status", "version", "node", "posture", "nats", "warnings"})


def _record(properties: dict[str, Any]) -> dict[str, Any]:
    """The schema of a JSON object with exactly ``properties``, every one required."""
    return {"type": "object", "required": list(properties), "additionalProperties": False, "properties": properties}


_LISTENER_STATE = {"type": "string", "enum": [*LISTENER_STATES, "none"]}
#: The body of ``GET /healthz`` (docs/http-api.md, "GET /healthz"); each plugin
#: adds its own key (any JSON value) beside the core's.
HEALTHZ_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "version", "node", "posture", "nats"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "version": {"type": "string"},
        "node": {"type": "string"},
        "posture": _record({
            "bus_auth": {"type": "string", "enum": ["enforce", "off"]},
            "acl": {"type": "boolean"},
            "tls": {"type": "boolean"},
            "summary": {"type": "string"},
            "listeners": _record({name: _LISTENER_STATE for name in LISTENERS}),
        }),
        "nats": _record({
            "mode": {"type": "string", "enum": ["embedded", "external"]},
            "url": {"type": "string"},
            "connected": {"type": "boolean"},
            "jetstream": {"type": "boolean"},
            "restarts": {"type": "integer", "minimum": 0},
            "kv_replicas": {"type": "integer", "minimum": 1},
            "cluster": {"oneOf": [
                {"type": "null"},
                _record({"name": {"type": "string"}, "routes": {"type": "integer", "minimum": 0}}),
            ]},
        }),
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": {"description": "a plugin's healthz_fields, under the plugin's name"},
}
#: The body of ``GET /openapi.json``: this document.
OPENAPI_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["openapi", "info", "paths", "components"],
    "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\."}, "info": {"type": "object"},
                   "paths": {"type": "object"}, "components": {"type": "object"}},
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as RFC 9457 problem+json; never a traceback to the client.

    A response that leaves while part of the request body has not arrived
    closes the connection (``Connection: close``; see UNREAD_BODY_DRAIN). The response
    is sent here, with a deadline if it cannot go at once (:func:`unibus.connlimits.send_within`).
    """
    try:
        response = _checked(request, await handler(request))
    except Exception as e:  # noqa: BLE001 - each kind is answered by _problem_for (the rest: 500)
        _raise_if_answer_begun(request, e)
        response = _problem_for(request, e)
    await send_within(request, response, request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT))  # as served_middleware
    return response


def _route_owner(request: web.Request) -> str:
    """Who registered the route that matched ``request`` ("the core", "plugin <name>"), for a log line."""
    info = request.match_info.route.resource
    template = info.canonical if info is not None else request.path
    owner = request.app.get(ROUTE_OWNERS, {}).get((request.method, template))
    return f"{request.method} {template} ({owner or 'the core'})"


def _checked(request: web.Request, response: Any) -> web.StreamResponse:
    """``response`` if a handler returned one; else a ``TypeError`` naming the route and its owner
    (a 500): aiohttp failed later with an ``AttributeError`` deep in its own code, which named
    neither (a plugin author's walkthrough)."""
    if not isinstance(response, web.StreamResponse):
        raise TypeError(f"the handler of {_route_owner(request)} returned {type(response).__name__}, "
                        "not an aiohttp web.StreamResponse")
    return response


def _raise_if_answer_begun(request: web.Request, exc: Exception) -> None:
    """Once the handler's own response has begun to go out (a streamed one), no answer can
    follow it: its bytes would be read as that response's body. Then ``exc`` is raised on to
    aiohttp, which logs it (unibus.app._ServerLogger) and closes the connection, as its
    ``handle_error`` does when "the response is sent already"; an HTTP exception (a redirect,
    a 404), which aiohttp would write as a response, as the ``RuntimeError`` it then is."""
    writer = request.writer
    if writer is None or writer.output_size == 0:
        return
    log.error("%s raised %s after its response began to go out; the connection is closed",
              _route_owner(request), type(exc).__name__)
    if isinstance(exc, web.HTTPException):
        raise RuntimeError(f"{type(exc).__name__} raised after the response began to go out") from exc
    raise exc


def served_middleware(metrics: Metrics) -> Any:
    """Counts every request by route template, method and status, with its duration
    (:meth:`unibus.metrics.Metrics.observe_request`), around what :func:`problem_middleware`
    does: one middleware, not two, so one coroutine fewer on every request
    (docs/benchmarks.md, "Signed requests"). Outermost: the count holds the
    status the client gets, problems included."""
    observe = metrics.observe_request

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            try:
                response = _checked(request, await handler(request))
            except Exception as e:  # noqa: BLE001 - as problem_middleware
                _raise_if_answer_begun(request, e)
                response = _problem_for(request, e)  # re-raises a redirect
            status = response.status
            # Sent here, with a deadline if it cannot go at once (unibus.connlimits.send_within):
            # problems, open routes and 404s too, not only what the auth middleware sent already.
            if not response.prepared and await send_within(
                    request, response, request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT)):
                metrics.responses_dropped += 1
            return response
        except web.HTTPException as e:  # a redirect
            status = e.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            observe(route_label(request), request.method, status, time.perf_counter() - started)

    return middleware


def _rejected(request: web.Request, reason: str) -> None:
    """Count a 401 of a signed request (``unibus_signature_rejections_total{reason}``)."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.signature_rejected(reason)


def _problem_for(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The problem+json answer to ``exc``, raised by a handler (or re-raised: a redirect)."""
    try:
        raise exc
    except Problem as p:
        if p.status == 401:
            _rejected(request, getattr(p, "reason", "other"))
        return from_problem(p)
    except NotFound as e:
        return problem_response(404, str(e), kind="not-found")
    except Conflict as e:
        return problem_response(409, str(e), kind="conflict", **e.extra)
    except Forbidden as e:  # rights changed between the request's check and its write
        return problem_response(403, str(e), kind="forbidden")
    except LogRejected as e:  # the request's signature cannot join the membership log
        _rejected(request, "replay" if "nonce" in str(e) else "log_order")
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
        return _http_exception_problem(request, e)
    except json.JSONDecodeError as e:
        return problem_response(400, f"malformed JSON body: {e.msg} at position {e.pos}", kind="malformed-json")
    except Exception as e:
        refusal = parser_refused(e)
        if refusal is not None and refusal is parser_refused(request.content.exception()):
            # a handler (a plugin's) read this request's body itself, whose framing broke: logged
            # once, when aiohttp throws away the rest of the body (unibus.app._ServerLogger)
            return from_problem(unreadable_body(e))
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(500, INTERNAL_ERROR_DETAIL)
    finally:
        del exc  # no reference cycle through this frame


def _http_exception_problem(request: web.Request, e: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
    if e.status == 404:
        detail = f"no route for {request.method} {request.path}"
    elif e.status == 405:
        allowed = headers.get("Allow", "")
        detail = f"{request.method} is not allowed on {request.path}" + (f"; allowed: {allowed}" if allowed else "")
    else:
        detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
    return problem_response(e.status, detail, headers=headers)


@web.middleware
async def path_params_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route parameters against the rules of :mod:`unibus.inputs` (404), for
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
        return _expectation_failed()
    return None


#: Where a plugin's routes live unless it declares otherwise (docs/plugins.md, "Routes").
PLUGIN_ROUTE_PREFIX = "/v1/plugins/"


#: A path segment that may match more than itself: a placeholder, whole (``{handle}``) or in part.
_WILD = "{}"
#: A placeholder with its own regex (``{tail:.*}``) may match across segments.
_REST = "{...}"


def _shape(path: str) -> tuple[str, ...]:
    return tuple(_REST if "{" in seg and ":" in seg else _WILD if "{" in seg else seg for seg in path.split("/"))


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Could one request path match both shapes? (A placeholder matches any one segment.)"""
    for x, y in zip(a, b):
        if _REST in (x, y):
            return True
        if x != y and _WILD not in (x, y):
            return False
    return len(a) == len(b)


def _claim_route(app: web.Application, method: str, path: str, owner: str) -> None:
    """Refuse a route that another registration already serves (docs/plugins.md, "Routes").

    The same method and template twice is refused whoever asks: aiohttp serves the first
    handler, while the OpenAPI document, which decides whether a route outside ``/v1/`` is
    signed, kept the last (red team: a plugin's open route opened another plugin's signed
    one). A route that could match a request for another owner's route (a plugin's plain
    ``/v1/members/admin`` beside the core's ``/v1/members/{handle}``, which aiohttp would
    hand to the plugin) is refused too, whatever the methods."""
    owners = app.get(ROUTE_OWNERS)
    if owners is None:  # an app not made by make_app (a test's, a plugin's own)
        owners = app[ROUTE_OWNERS] = {}
    shape = _shape(path)
    for (other_method, other_path), other_owner in owners.items():
        other = _shape(other_path)
        if other_method == method and other == shape:
            raise ValueError(f"{method} {path}: {other_owner} already registered {other_method} {other_path}")
        if other_owner != owner and _overlap(shape, other):
            raise ValueError(f"{method} {path}: a request for it could reach {other_owner}'s {other_method} "
                             f"{other_path}, or the other way round; use another path (a plugin's own routes "
                             "live under /v1/plugins/<name>/)")
    owners[(method, path)] = owner


def plugin_path(plugin: str, path: str) -> str:
    """``path`` of plugin ``plugin`` under ``/v1/plugins/<plugin>/``; a path already there is kept.
    A plugin name that is not one path segment of letters, digits, ``_ . -`` is a ValueError
    (red team: ``{victim}`` made a template that caught every other plugin's unknown paths)."""
    base = f"{PLUGIN_ROUTE_PREFIX}{plugin_name(plugin)}"
    if path == base or path.startswith(base + "/"):
        return path
    return base + (path if path.startswith("/") else "/" + path)


async def open_continue(request: web.Request) -> web.StreamResponse | None:
    """Expect handler of open routes (``signed=False``): aiohttp's own, except
    that an unknown expectation is a problem+json 417 like everywhere else."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _expectation_failed()
    # as aiohttp's, but marked sent: reading the body (unibus.auth.read_body) sent a second one
    await send_continue(request, without_body=True)
    return None


def _expectation_failed() -> web.Response:
    return problem_response(417, "the only expectation this server meets is Expect: 100-continue",
                            kind="expectation-failed")


def add_route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    *,
    summary: str,
    responses: dict[int, ResponseSpec],
    signed: bool = True,
    request_schema: dict[str, Any] | None = None,
    request_content_type: str = "application/json",
    tags: list[str] | None = None,
    query: dict[str, dict[str, Any]] | None = None,
    path_params: dict[str, dict[str, Any]] | None = None,
    namespaced: bool = True,
) -> str:
    """Register a route and its OpenAPI operation together (plugins use this too); returns its path.

    Called from a plugin's hook (``startup``), the route lives under
    ``/v1/plugins/<plugin name>/`` (``path`` ``"/events"`` of plugin
    ``audit`` is ``/v1/plugins/audit/events``) unless ``namespaced=False``
    declares the path as given. ``signed=True`` is enforced whatever the
    path: only ``signed=False`` opens a route, and never one under ``/v1/``
    (a ``ValueError``).

    ``responses`` maps each status the handler answers to a description, a
    ``(description, schema)`` pair (a JSON body; an error's body is the
    ``Problem`` schema unless a schema is given) or a :class:`unibus.openapi.Response`
    (another content type, headers). The statuses the core answers for the
    route (401, 503, 408, 413, 415, 417, 404 for a path parameter...) are
    added to them (docs/plugins.md, "Documenting responses").
    ``query`` documents the query parameters the handler reads (name -> JSON
    Schema); path parameters are documented, and checked before the handler
    runs, by the rules of :mod:`unibus.inputs`; ``path_params`` documents a
    stricter rule the handler checks itself (name -> JSON Schema).
    ``Expect: 100-continue`` is answered only once the signature was accepted
    (docs/http-api.md).
    """
    plugin = current_plugin()
    if plugin is not None and namespaced:
        path = plugin_path(plugin, path)
    if not signed and (path == "/v1" or path.startswith("/v1/")):
        raise ValueError(f"{method} {path}: every route under /v1/ is signed; drop signed=False "
                         "or serve it outside /v1/ with namespaced=False")
    _claim_route(app, method.upper(), path, "the core" if plugin is None else f"plugin {plugin}")
    app.router.add_route(method, path, handler, expect_handler=defer_continue if signed else open_continue)
    app[OPENAPI_DOC].add_operation(
        method, path, summary=summary, responses=responses, signed=signed,
        request_schema=request_schema, request_content_type=request_content_type, tags=tags,
        operation_id=getattr(handler, "__name__", None), query=query, path_params=path_params,
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


def add_schema(app: web.Application, name: str, schema: dict[str, Any]) -> dict[str, str]:
    """Name a JSON Schema in ``/openapi.json`` (``components/schemas/<name>``)
    and return its ``$ref``, for ``responses`` and other schemas to use."""
    return app[OPENAPI_DOC].add_schema(name, schema)


def current_posture(app: web.Application) -> dict[str, Any]:
    """The posture of the running node. A ``posture`` hook that fails now is logged, counted
    and left out, so its facts count as not holding (fail closed), and /healthz still answers."""
    reports = owned_reports(app[PLUGINS].call_each_safe("posture", settings=app[SETTINGS]), app[PLUGINS])
    return merge_posture((r for _, r in reports), app[SETTINGS])


def health_state(app: web.Application) -> HealthState:
    """The node's health as the prober last saw it (no I/O); degraded before it ran."""
    prober = app.get(HEALTH)
    if prober is not None:
        return prober.state()
    supervisor: NatsSupervisor | None = app[SUPERVISOR]  # type: ignore[assignment]
    connected = app[BUS].connected
    running = supervisor is None or supervisor.running
    return HealthState(ok=False, connected=connected, jetstream=False, nats_running=running,
                       routes=0 if app[SETTINGS].cluster_name else None)


def floor_warning(floor: int) -> str:
    """The /healthz line for a node whose nonce floor is ahead of its clock (docs/http-api.md)."""
    return (f"replay protection restarted (the nonce store was lost and made again): signed requests created at "
            f"or before {floor} are refused for about {floor_wait(floor, time.time())} s more (docs/operations.md, "
            "the nonce epoch rule)")


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    body = await healthz_body(app)
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def healthz_body(app: web.Application) -> dict[str, Any]:
    """The /healthz body, from in-memory state only (docs/http-api.md, "GET /healthz"):
    it answers at once whatever NATS is doing."""
    settings = app[SETTINGS]
    supervisor: NatsSupervisor | None = app[SUPERVISOR]  # type: ignore[assignment]
    state = health_state(app)
    cluster = None
    if settings.cluster_name:
        cluster = {"name": settings.cluster_name, "routes": state.routes or 0}
    body: dict[str, Any] = {
        "status": "ok" if state.ok else "degraded",
        "version": __version__,
        "node": settings.server_name,
        "posture": current_posture(app),
        "nats": {
            "mode": "embedded" if settings.embedded else "external",
            "url": settings.nats_public_url,
            "connected": state.connected,
            "jetstream": state.jetstream,
            "restarts": supervisor.restarts if supervisor is not None else 0,
            "kv_replicas": settings.kv_replicas,
            "cluster": cluster,
        },
    }
    # --insecure-plaintext: said on every /healthz, not only once in the log (docs/http-api.md)
    warnings = insecure_plaintext_warnings(settings)
    if state.floor_ahead is not None:
        warnings.append(floor_warning(state.floor_ahead))
    if warnings:
        body["warnings"] = warnings
    for name, fields in app[PLUGINS].call_each_safe("healthz_fields", app=app):
        placed = plugin_healthz(name, fields)
        if placed is None:
            continue
        warned = app.get(HEALTHZ_WARNINGS) or LogThrottle(burst=1, window=3600.0)
        if name in body or name in CORE_HEALTHZ_KEYS:  # never overwrites the core's keys
            if warned.admit(f"{name} core key") is not None:
                log.warning("plugin %s: its name is a /healthz key of the core; its fields are left out "
                            "(said once an hour)", name)
            continue
        try:  # what json_response would fail on, later, for every caller (a set, bytes, NaN): red team
            json.dumps(placed, allow_nan=False)
        except (TypeError, ValueError) as e:
            app[PLUGINS].hook_failed(name, "healthz_fields")  # counted at every call
            if warned.admit(f"{name} not json") is not None:
                log.error("plugin %s: healthz_fields returned what JSON cannot hold (%s); its fields are left out "
                          "(said once an hour)", name, e)
            continue
        body[name] = placed
    return body


def plugin_healthz(name: str, fields: Any) -> dict[str, Any] | None:
    """Where a plugin's ``healthz_fields`` go: under its own name, always (docs/plugins.md).

    A plugin returns its own fields; the form of plugin API 1, ``{name: {...}}``
    (one key, the plugin's name, holding a dict), is unwrapped. None: nothing to add.
    """
    if not isinstance(fields, Mapping) or not fields:  # anything else was refused: PluginManager.call_each_safe
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
    metrics: Metrics | None = None,
) -> web.Application:
    """The control-plane application; plugins add their routes in ``startup``."""
    metrics = metrics if metrics is not None else Metrics(node=settings.server_name, process=False)
    app = web.Application(middlewares=[served_middleware(metrics), *(middlewares or []), path_params_middleware],
                          client_max_size=MAX_JSON_BODY)
    app[SETTINGS] = settings.for_plugins()  # no secret reaches a hook
    app[METRICS] = metrics
    app[PLUGINS] = plugins
    app[BUS] = bus
    app[SUPERVISOR] = supervisor
    if store is not None:
        app[STORE] = store
    app[OPENAPI_DOC] = OpenAPI()
    app[ROUTE_OWNERS] = {}
    app[HEALTHZ_WARNINGS] = LogThrottle(burst=1, window=3600.0)
    app[CHANGE_LIMIT] = metrics.change_limit = ChangeLimit()
    app[EXTRA] = {"started": time.time()}
    app[STASHES] = {}
    health = add_schema(app, "Healthz", HEALTHZ_SCHEMA)
    add_route(app, "GET", "/healthz", healthz, summary="Liveness and posture of this node", signed=False,
              responses={200: ("serving", health),
                         503: Response("degraded (NATS, JetStream or the nonce bucket unavailable, or the nonce "
                                       'floor ahead of the clock): the same body with "status": "degraded"',
                                       health, JSON)},
              tags=["health"])
    add_route(app, "GET", "/openapi.json", openapi_json, summary="This OpenAPI document", signed=False,
              responses={200: ("the document", OPENAPI_SCHEMA)}, tags=["meta"])
    return app
