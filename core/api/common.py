"""Helpers shared by the /v1 handlers: JSON input, field validation, rights."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..auth import current_member
from ..inputs import invalid, parse_json
from ..problems import Problem
from ..store.base import Member


async def json_object(request: web.Request, *, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    """The request body as a JSON object with exactly the allowed fields (400/422 otherwise).

    The body was read, under the size limit and the deadline, and checked
    against its signed Content-Digest by the auth middleware; here it is
    parsed by :func:`unibus.inputs.parse_json` (docs/http-api.md, "Input rules").
    """
    raw = await request.read()
    if not raw:
        raise Problem(400, "a JSON object body is required", kind="malformed-json")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise Problem(422, "the body must be a JSON object", kind="invalid-field")
    missing = sorted(required - body.keys())
    if missing:
        raise Problem(422, f"missing field(s): {', '.join(missing)}", kind="invalid-field")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise Problem(422, f"unknown field(s): {_names(unknown)}", kind="invalid-field")
    return body


def _names(names: list[str], most: int = 10, width: int = 64) -> str:
    """Client-chosen names for a detail, bounded (a key may be megabytes long)."""
    shown = [n if len(n) <= width else n[:width] + "..." for n in names[:most]]
    return ", ".join(shown) + (f" (and {len(names) - most} more)" if len(names) > most else "")


def require_str(body: dict[str, Any], field: str) -> str:
    value = body[field]
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    return value


def require_admin(request: web.Request) -> Member:
    me = current_member(request)
    if not me.is_admin:
        raise Problem(403, "this action needs the admin role", kind="forbidden")
    return me


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))
