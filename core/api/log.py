"""/v1/log: the membership log, for every member to verify (docs/formats.md, "The membership log")."""

from __future__ import annotations

import json

from aiohttp import web

from ..app import SETTINGS, STORE, add_route
from ..inputs import MAX_SAFE_INT, query_int

#: ``GET /v1/log``: most entries in one answer, and the default.
LOG_LIMIT_MAX = 1000
LOG_LIMIT_DEFAULT = 500


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
    """``{"seq", "hash", "auth_skew"}``: seq -1 and hash "" for an empty log; ``auth_skew``
    is this server's ``--auth-skew``, which clients use to check each entry's ``created``."""
    seq, digest = await request.app[STORE].log_head()
    return web.json_response({"seq": seq, "hash": digest, "auth_skew": int(request.app[SETTINGS].auth_skew)})


def register(app: web.Application) -> None:
    r = {401: "missing or invalid signature", 503: "replay protection or the store unavailable"}
    add_route(app, "GET", "/v1/log", get_log,
              summary="Entries of the membership log with seq > after, in order, and the head (any member)",
              responses={200: '{"entries": [...], "head": {"seq", "hash"}}', 422: "bad after or limit", **r},
              query={"after": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT},
                     "limit": {"type": "integer", "minimum": 1, "maximum": LOG_LIMIT_MAX,
                               "default": LOG_LIMIT_DEFAULT}},
              tags=["log"])
    add_route(app, "GET", "/v1/log/head", get_log_head,
              summary="The membership log's head and the server's --auth-skew (any member)",
              responses={200: '{"seq", "hash", "auth_skew"}', **r}, tags=["log"])
