"""/v1/log: the membership log, for every member to verify (docs/formats.md, "The membership log")."""

from __future__ import annotations

import json

from aiohttp import web

from ..app import SETTINGS, STORE, add_route, add_schema
from ..inputs import MAX_SAFE_INT, query_int
from ..openapi import Response, header, schema_ref
from ..wire import AUTH_SKEW_HEADER

#: ``GET /v1/log``: most entries in one answer, and the default.
LOG_LIMIT_MAX = 1000
LOG_LIMIT_DEFAULT = 500

_SEQ = {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT}
_HASH = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
#: One entry of the membership log (docs/formats.md, "Entries"); its other
#: fields depend on its kind.
LOG_ENTRY_SCHEMA = {
    "type": "object", "required": ["seq", "prev", "at", "kind"],
    "properties": {
        "seq": _SEQ,
        "prev": {"type": "string", "pattern": "^(?:[0-9a-f]{64})?$"},
        "at": {"type": "integer", "minimum": -MAX_SAFE_INT, "maximum": MAX_SAFE_INT},
        "kind": {"type": "string", "enum": ["request", "bootstrap", "snapshot"]},
        # entry 0 only: what makes the deployment's trust root unique (docs/formats.md)
        "salt": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    },
}
LOG_SCHEMA = {
    "type": "object", "required": ["entries", "head"], "additionalProperties": False,
    "properties": {
        "entries": {"type": "array", "items": schema_ref("LogEntry")},
        "head": {"type": "object", "required": ["seq", "hash"], "additionalProperties": False,
                 "properties": {"seq": _SEQ, "hash": _HASH}},
    },
}
#: ``GET /v1/log/head``: seq -1 and hash "" for an empty log.
LOG_HEAD_RECORD = {
    "type": "object", "required": ["seq", "hash"], "additionalProperties": False,
    "properties": {"seq": {"type": "integer", "minimum": -1, "maximum": MAX_SAFE_INT},
                   "hash": {"type": "string", "pattern": "^(?:[0-9a-f]{64})?$"}},
}
# GET /v1/log/head's body is the head alone, as a keys POST takes it back in ``log_head`` and as
# GET /v1/log's ``head`` has it; the server's --auth-skew goes in the AUTH_SKEW_HEADER header (an
# audit: with a third field in the body, a keys POST given the served head as its log_head was refused).


async def get_log(request: web.Request) -> web.Response:
    """``{"entries": [...], "head": {"seq", "hash"}}``: entries with ``seq > after`` in
    order (from seq 0 without ``after``), at most ``limit``. Each entry is served
    exactly as stored: its RFC 8785 canonical JSON, whose SHA-256 is its hash."""
    after = query_int(request.query, "after", 0, MAX_SAFE_INT, default=-1)
    limit = query_int(request.query, "limit", 1, LOG_LIMIT_MAX, default=LOG_LIMIT_DEFAULT)
    assert after is not None and limit is not None
    store = request.app[STORE]
    # The head first: the entries read after it reach at least as far (the log only grows).
    seq, digest = await store.log_head()
    texts = await store.log_entries(after, limit)
    head = json.dumps({"seq": seq, "hash": digest}, separators=(",", ":"))
    body = '{"entries":[' + ",".join(texts) + '],"head":' + head + "}"
    return web.Response(text=body, content_type="application/json")


async def get_log_head(request: web.Request) -> web.Response:
    """``{"seq", "hash"}``: seq -1 and hash "" for an empty log. The :data:`AUTH_SKEW_HEADER` header
    gives this server's ``--auth-skew`` (clients keep a change's ``created`` within it)."""
    seq, digest = await request.app[STORE].log_head()
    return web.json_response({"seq": seq, "hash": digest},
                             headers={AUTH_SKEW_HEADER: str(int(request.app[SETTINGS].auth_skew))})


def register(app: web.Application) -> None:
    add_schema(app, "LogEntry", LOG_ENTRY_SCHEMA)
    log = add_schema(app, "Log", LOG_SCHEMA)
    add_route(app, "GET", "/v1/log", get_log,
              summary="Entries of the membership log with seq > after, in order, and the head (any member)",
              responses={200: ('{"entries": [...], "head": {"seq", "hash"}}', log), 422: "bad after or limit"},
              query={"after": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT},
                     "limit": {"type": "integer", "minimum": 1, "maximum": LOG_LIMIT_MAX,
                               "default": LOG_LIMIT_DEFAULT}},
              tags=["log"])
    add_route(app, "GET", "/v1/log/head", get_log_head,
              summary="The membership log's head, and the server's --auth-skew in a header (any member)",
              responses={200: Response('{"seq", "hash"}', LOG_HEAD_RECORD, headers={
                  AUTH_SKEW_HEADER: header("this server's --auth-skew in seconds", {"type": "string",
                                                                                   "pattern": "^[1-9][0-9]*$"})})},
              tags=["log"])
