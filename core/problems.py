"""RFC 9457 problem details: the one error shape of the HTTP API."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "https://unibus.dev/problems/"
CONTENT_TYPE = "application/problem+json"
#: The ``detail`` of every 500: the traceback is in the log, never in a response.
INTERNAL_ERROR_DETAIL = "internal error; see the membershipd log"


class Problem(Exception):
    """Raise from a handler to answer with ``application/problem+json``.

    ``kind`` becomes the problem ``type`` (``https://unibus.dev/problems/<kind>``);
    ``extra`` members are added to the body (e.g. ``missing``/``extra`` handles).
    """

    def __init__(self, status: int, detail: str, *, kind: str | None = None, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        if not (isinstance(status, int) and 400 <= status <= 599):
            # a plugin's Problem(200, ...) answered 200 with a problem body (a plugin author's walkthrough)
            raise ValueError(f"a Problem's status is an HTTP error status (400-599), not {status!r}")
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or _phrase(status)
        self.kind = kind or self.title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # an error status without a name (e.g. 599)
        return "Client Error" if status < 500 else "Server Error"


def problem_response(status: int, detail: str, *, kind: str | None = None, title: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    title = title or _phrase(status)
    body = {
        "type": PROBLEM_TYPE_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return web.Response(status=status, text=json.dumps(body), content_type=CONTENT_TYPE, headers=headers)


def from_problem(p: Problem) -> web.Response:
    return problem_response(p.status, p.detail, kind=p.kind, title=p.title, headers=p.headers, **p.extra)

