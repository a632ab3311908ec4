"""Helpers shared by the /v1 handlers: JSON input, field validation, rights."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..auth import current_member
from ..problems import Problem
from ..store.base import Member


async def json_object(request: web.Request, *, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    """The request body as a JSON object with exactly the allowed fields (400/422 otherwise)."""
    raw = await request.read()
    if not raw:
        raise Problem(400, "a JSON object body is required", kind="malformed-json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, f"malformed JSON body: {e}", kind="malformed-json") from None
    if not isinstance(body, dict):
        raise Problem(422, "the body must be a JSON object", kind="invalid-field")
    missing = sorted(required - body.keys())
    if missing:
        raise Problem(422, f"missing field(s): {', '.join(missing)}", kind="invalid-field")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise Problem(422, f"unknown field(s): {', '.join(unknown)}", kind="invalid-field")
    return body


def invalid(field: str, why: str) -> Problem:
    return Problem(422, f"{field}: {why}", kind="invalid-field")


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
