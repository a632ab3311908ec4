"""RFC 9457 problem details: the one error shape of the HTTP API."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidHeader,
                                     InvalidURLError, LineTooLong)
from aiohttp.web_protocol import RequestHandler

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
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.kind = kind or self.title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra


def problem_response(status: int, detail: str, *, kind: str | None = None, title: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    title = title or HTTPStatus(status).phrase
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


#: What a reason of aiohttp's parser may look like to be shown: llhttp's fixed
#: texts ("Invalid character in Content-Length", "Content-Length can't be
#: present with Transfer-Encoding"), never a quote of what was sent.
_PARSER_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 `_-]*(?:'[a-z][A-Za-z0-9 `_-]*)*")
#: For a refusal whose reason cannot be shown, by the class aiohttp raised (the first that matches).
_PARSER_REFUSALS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (InvalidHeader, "a header field is malformed"),
    (BadHttpMethod, "the request method is not a valid token"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidURLError, "the request target is malformed"),
)


def parser_reason(exc: BaseException) -> str | None:
    """The reason aiohttp's HTTP parser gave for refusing what was sent, when
    it is one of the parser's fixed texts; None when it cannot be shown."""
    message = str(getattr(exc, "message", "") or "")
    if ":\n\n  " in message:  # the C parser: "<reason>:\n\n  <the bytes>\n  <a pointer>"
        message = message.split(":\n\n  ", 1)[0].rsplit("\n", 1)[-1].strip()
    message = message.removesuffix(".")
    return message if len(message) <= 80 and _PARSER_REASON.fullmatch(message) else None


def parser_refusal(exc: BaseException) -> str:
    """One line that says why aiohttp's HTTP parser refused a request, for a
    problem's ``detail`` and the log. It never quotes the bytes that were
    refused: aiohttp's own messages do (``Invalid character in Content-Length:
    b'-1'``), and a header may hold what its sender would not want repeated."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        return "a request line or header field is longer than this server reads" + (f" ({limit} bytes)" if limit else "")
    if "HTTPS traffic on an HTTP port" in str(getattr(exc, "message", "")):
        return "TLS was sent to a plain-HTTP port: use http://, or the port that serves TLS"
    reason = parser_reason(exc)
    if reason is not None:
        return f"the request is malformed: {reason}"
    for cls, detail in _PARSER_REFUSALS:
        if isinstance(exc, cls):
            return detail
    return "the request is malformed"


class ProblemRequestHandler(RequestHandler):
    """aiohttp's ``RequestHandler``, except that the responses it writes itself
    (a ``400`` for a request its parser refuses, a ``500`` it could not
    otherwise give) are problem documents too, like every other error of the
    API, and never quote what was sent. unibus.connlimits serves every
    connection of the control plane with it."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) <= queued:
            return
        # aiohttp queues a refusal of its parser as the next request's, even
        # when the bytes it refused were the body of the request being served:
        # its handler would wait for the rest of that body until its deadline
        # (408). While that body is still open, every byte fed went to it, so
        # it is its reader that gets the refusal (a 400, "malformed-body").
        refusal = getattr(self._messages[-1][0], "exc", None)
        request = self._current_request
        if isinstance(refusal, HttpProcessingError) and request is not None and not request.content.is_eof():
            request.content.set_exception(refusal)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it, and refuses once a response began
        if isinstance(exc, HttpProcessingError):
            response = problem_response(status, parser_refusal(exc), kind="malformed-request")
        elif status == HTTPStatus.INTERNAL_SERVER_ERROR:
            response = problem_response(status, INTERNAL_ERROR_DETAIL, kind="internal-server-error")
        else:
            response = problem_response(status, HTTPStatus(status).description or HTTPStatus(status).phrase)
        response.force_close()
        return response
