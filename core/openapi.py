"""The OpenAPI 3.1 document, built from the routes as they are registered.

Every route goes through :func:`unibus.app.add_route`, which records its
operation here, so ``/openapi.json`` cannot drift from the router. Each
operation lists every status it can answer: its own (``responses=``) and the
ones the core answers for it before or around its handler (the signature,
the body, the path parameters: :func:`core_responses`), each with its content
type and, where the body is documented, its schema (docs/http-api.md,
"Testing the API"; docs/plugins.md, "Documenting responses").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .inputs import path_param_schema

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"

PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "description": "RFC 9457 problem details; some problems add members (missing, extra, current_epoch, "
                   "max_bytes: docs/http-api.md, \"Errors\")",
    "properties": {
        "type": {"type": "string", "pattern": "^https://unibus\\.dev/problems/[a-z0-9-]+$"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
    },
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def schema_ref(name: str) -> dict[str, str]:
    """``{"$ref": "#/components/schemas/<name>"}``: a schema registered with :meth:`OpenAPI.add_schema`."""
    return {"$ref": f"#/components/schemas/{name}"}


def header(description: str, schema: Mapping[str, Any] | None = None, *, required: bool = True) -> dict[str, Any]:
    """An OpenAPI response header object (a string unless ``schema`` says otherwise)."""
    return {"description": description, "required": required, "schema": dict(schema or {"type": "string"})}


@dataclass(frozen=True)
class Response:
    """One documented response of an operation.

    ``schema`` is the JSON Schema of the body (a :func:`schema_ref` or inline),
    sent as ``content_type``: ``application/json`` by default for a success,
    ``application/problem+json`` with the ``Problem`` schema for an error
    (status 400 and up) when neither is given. A success without a schema has
    no documented body (204, or a route of a plugin written before 0.12).
    ``headers`` maps a response header name to :func:`header`.
    """

    description: str
    schema: Mapping[str, Any] | None = None
    content_type: str | None = None
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


#: What ``add_route(responses=...)`` takes for each status: a description, a
#: ``(description, schema)`` pair, or a :class:`Response`.
ResponseSpec = str | tuple[str, Mapping[str, Any]] | Response


def as_response(spec: ResponseSpec) -> Response:
    if isinstance(spec, Response):
        return spec
    if isinstance(spec, str):
        return Response(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return Response(spec[0], spec[1])
    raise TypeError(f"a response is a description, a (description, schema) pair or a unibus.openapi.Response; "
                    f"got {spec!r:.80}")


WWW_AUTHENTICATE = header('Signature alg="ed25519"')
RETRY_AFTER = header("seconds to wait before trying again (with a new nonce)", {"type": "string", "pattern": "^[0-9]+$"})


def core_responses(*, signed: bool, path_params: bool) -> dict[int, Response]:
    """What the core itself may answer on a route, whatever its handler does
    (docs/http-api.md, "Order of the checks" and "Slow and large bodies")."""
    out = {400: Response("the request line or a header cannot be parsed (malformed-request)"),
           417: Response("an Expect header other than 100-continue")}
    if path_params:  # on every route, open ones too (unibus.app.path_params_middleware)
        out[404] = Response("a path parameter breaks its syntax, so it names nothing")
    if not signed:
        return out
    out.update({
        400: Response("the request line or a header cannot be parsed (malformed-request); the request body's HTTP "
                      "framing is broken, or the connection closed before it was complete (malformed-body, "
                      "incomplete-body)"),
        401: Response("missing, invalid, expired or replayed signature, or unknown keyid; or a body that does not "
                      "match its signed Content-Digest", headers={"WWW-Authenticate": WWW_AUTHENTICATE}),
        408: Response("the request body did not arrive within the body deadline (UNIBUS_BODY_TIMEOUT)"),
        413: Response("a request body over 8 MiB"),
        415: Response("a request body with a Content-Encoding"),
        429: Response("the member already has its share of the control plane's connections serving requests "
                      "(too-many-requests); let one finish", headers={"Retry-After": RETRY_AFTER}),
        503: Response("replay protection, the store or the bus is unavailable; try again after Retry-After",
                      headers={"Retry-After": RETRY_AFTER}),
    })
    return out


def _merge(own: Response, core: Response | None) -> Response:
    """The route's own description and body; the core's headers kept (a 401 always says WWW-Authenticate)."""
    if core is None:
        return own
    return Response(own.description, own.schema if own.schema is not None else core.schema,
                    own.content_type or core.content_type, {**core.headers, **own.headers})


class OpenAPI:
    def __init__(self) -> None:
        self.paths: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}

    def add_schema(self, name: str, schema: Mapping[str, Any]) -> dict[str, str]:
        """Register a named schema under ``components/schemas``; return its ``$ref``.

        Registering the same schema again is fine; another schema under a name
        already taken is a ``ValueError`` (two plugins must not describe one
        name two ways)."""
        known = self.schemas.get(name)
        if known is not None and known != dict(schema):
            raise ValueError(f"OpenAPI schema {name!r} is already registered with another definition")
        self.schemas[name] = dict(schema)
        return schema_ref(name)

    def add_operation(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        responses: Mapping[int, ResponseSpec],
        signed: bool,
        request_schema: dict[str, Any] | None = None,
        request_content_type: str = JSON,
        tags: list[str] | None = None,
        operation_id: str | None = None,
        query: dict[str, dict[str, Any]] | None = None,
        path_params: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record one operation. ``query`` maps each query parameter the route
        reads to its JSON Schema (``{"type": "integer", "minimum": 1, ...}``);
        path parameters get theirs from :func:`unibus.inputs.path_param_schema`
        unless ``path_params`` gives a stricter one. ``responses`` are the
        route's own; :func:`core_responses` are added to them."""
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        if operation_id:
            op["operationId"] = operation_id
        if tags:
            op["tags"] = tags
        names = _path_params(path)
        unknown = sorted(set(path_params or {}) - set(names))
        if unknown:
            raise ValueError(f"{method} {path}: path_params names no parameter of the path: {', '.join(unknown)}")
        params = [
            {"name": name, "in": "path", "required": True,
             "schema": dict((path_params or {}).get(name) or path_param_schema(name))}
            for name in names
        ]
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in (query or {}).items()]
        if params:
            op["parameters"] = params
        if signed:
            op["security"] = [{"httpSignature": []}]
        if request_schema is not None:
            op["requestBody"] = {"required": True, "content": {request_content_type: {"schema": request_schema}}}
        core = core_responses(signed=signed, path_params=bool(names))
        merged = {status: _merge(as_response(spec), core.get(status)) for status, spec in responses.items()}
        for status, resp in core.items():
            merged.setdefault(status, resp)
        for status, resp in sorted(merged.items()):
            op["responses"][str(status)] = _response_object(status, resp)
        self.paths.setdefault(path, {})[method.lower()] = op

    def signed(self, method: str, path: str) -> bool | None:
        """Whether the operation ``method path`` (``path`` as registered, e.g.
        ``/v1/rooms/{room_id}``) was registered signed; None if it never was."""
        op = self.paths.get(path, {}).get(method.lower())
        return None if op is None else "security" in op

    def document(self) -> dict[str, Any]:
        return {
            "openapi": "3.1.0",
            "info": {"title": "unibus membershipd", "version": __version__},
            "paths": self.paths,
            "components": {
                "schemas": self.schemas,
                "securitySchemes": {
                    "httpSignature": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "Signature",
                        "description": "RFC 9421 HTTP Message Signature (Ed25519) with Signature-Input; see docs/http-api.md",
                    }
                },
            },
        }


def _response_object(status: int, resp: Response) -> dict[str, Any]:
    out: dict[str, Any] = {"description": resp.description}
    schema: Mapping[str, Any] | None = resp.schema
    content_type = resp.content_type
    if status >= 400 and schema is None and content_type in (None, PROBLEM_JSON):
        schema, content_type = PROBLEM_REF, PROBLEM_JSON
    if schema is not None:
        out["content"] = {content_type or JSON: {"schema": dict(schema)}}
    elif content_type is not None:
        out["content"] = {content_type: {}}
    if resp.headers:
        out["headers"] = {name: dict(h) for name, h in resp.headers.items()}
    return out


def _path_params(path: str) -> list[str]:
    out = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            out.append(part[1:-1].split(":", 1)[0])
    return out
