"""The errors aiohttp answers by itself, as problem documents.

aiohttp's ``RequestHandler`` writes a few responses of its own, outside every
middleware: a ``400`` for a request its HTTP parser refuses (a line too long,
a bad ``Content-Length``, broken chunked framing), and a ``500`` it could not
otherwise give. They were ``text/plain`` and quoted the refused bytes. Here
they are problem documents like every other error of the API
(docs/http-api.md, "Errors"), whose ``detail`` names the parser's reason from
a list of its fixed texts and never quotes what was sent: a header may hold
what its sender would not want repeated, in an answer or in the log.
unibus.connlimits serves every connection of the HTTP listeners with
:class:`ProblemRequestHandler`.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidHeader,
                                     InvalidURLError, LineTooLong, TransferEncodingError)
from aiohttp.http_parser import SINGLETON_HEADERS
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .problems import INTERNAL_ERROR_DETAIL, Problem, problem_response

#: The reasons of aiohttp's parsers that a ``detail`` may show: llhttp's (its C
#: parser's, the text before the quote of the refused bytes) and its pure-Python
#: parser's fixed texts, without a final period. Anything else is never shown:
#: the Python parser also makes messages of the refused bytes alone (a request
#: target, a chunk-size line), which no pattern could tell from a reason.
PARSER_REASONS = frozenset({
    # llhttp 9 (aiohttp 3.14's C parser)
    "Chunk size overflow", "Content-Length can't be present with Transfer-Encoding", "Content-Length overflow",
    "Data after `Connection: close`", "Duplicate Content-Length", "Empty Content-Length", "Expected CRLF",
    "Expected CRLF after version", "Expected LF after CR", "Expected LF after chunk data",
    "Expected LF after chunk size", "Expected LF after headers", "Expected dot", "Expected space after method",
    "Expected space after version", "Invalid EOF state", "Invalid HTTP version",
    "Invalid `Transfer-Encoding` header value", "Invalid char in url fragment start", "Invalid char in url path",
    "Invalid char in url query", "Invalid character in Content-Length", "Invalid character in chunk extensions",
    "Invalid character in chunk extensions name", "Invalid character in chunk extensions quote value",
    "Invalid character in chunk extensions quoted value", "Invalid character in chunk extensions value",
    "Invalid character in chunk size", "Invalid characters in url", "Invalid header field char",
    "Invalid header token", "Invalid header value char", "Invalid major version", "Invalid method encountered",
    "Invalid method for HTTP/x.x request", "Invalid minor version",
    "Invalid quoted-pair in chunk extensions quoted value", "Invalid word encountered",
    "Missing expected CR after chunk data", "Missing expected CR after chunk extension name",
    "Missing expected CR after chunk extension value", "Missing expected CR after chunk size",
    "Missing expected CR after header value", "Missing expected LF after header value",
    "Transfer-Encoding can't be present with Content-Length", "Unexpected char in url schema",
    "Unexpected char in url server", "Unexpected space after start line", "Unexpected start char in url",
    "Unexpected whitespace after header value",
    # aiohttp's own (both parsers)
    "Bad line ending, expected CRLF", "Missing 'Host' header in request", "Request has invalid `Transfer-Encoding`",
    "Too many headers received", "Too many trailers received", "Bad chunk-size line ending, expected CRLF",
    "Bad trailer line ending, expected CRLF", "Chunk size mismatch: expected CRLF after chunk data",
})
#: aiohttp's ``Duplicate '<name>' header found.``, for a header that may appear once.
_DUPLICATE = re.compile(r"Duplicate '([A-Za-z-]{1,32})' header found")
#: The C parser's message: "<reason>:\n\n  <the refused bytes>\n  <a pointer>".
_C_PARSER_SEPARATOR = ":\n\n  "
#: aiohttp's message for a TLS ClientHello sent to a plain-HTTP listener.
_TLS_ON_PLAIN = "Received HTTPS traffic on an HTTP port"
#: For a refusal whose reason cannot be shown, by the class aiohttp raised (the first that matches).
_BY_CLASS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (InvalidHeader, "a header field is malformed"),
    (BadHttpMethod, "the request method is not a valid token"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidURLError, "the request target is malformed"),
)


def parser_refused(exc: BaseException | None) -> HttpProcessingError | None:
    """The refusal of aiohttp's HTTP parser that ``exc`` is, or wraps: its
    pure-Python parser hands a body's refusal to the body's reader as a
    ``web.RequestPayloadError`` caused by it. None for any other exception."""
    if isinstance(exc, web.RequestPayloadError):
        exc = exc.__cause__
    return exc if isinstance(exc, HttpProcessingError) else None


def parser_reason(exc: BaseException) -> str | None:
    """The reason aiohttp's HTTP parser gave for refusing what was sent, when
    it is one of :data:`PARSER_REASONS`; None otherwise. The pure-Python
    parser's ``TransferEncodingError`` and ``InvalidURLError`` are the refused
    line itself (a chunk size, a request target): only the C parser's form
    of them, which quotes the bytes after its reason, names one."""
    message = str(getattr(exc, "message", "") or "").removeprefix("Bad status line:\n  ")
    if isinstance(exc, (TransferEncodingError, InvalidURLError)) and _C_PARSER_SEPARATOR not in message:
        return None
    reason = message.split(_C_PARSER_SEPARATOR, 1)[0].removesuffix(".")
    if reason in PARSER_REASONS:
        return reason
    duplicate = _DUPLICATE.fullmatch(reason)
    if duplicate and duplicate[1].lower() in SINGLETON_HEADERS:
        return f"Duplicate '{duplicate[1].lower()}' header found"
    return None


def parser_refusal(exc: BaseException) -> str:
    """One line that says why aiohttp's HTTP parser refused a request, for a
    problem's ``detail`` and the log; it never quotes the refused bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        return "a request line or header field is longer than this server reads" + (f" ({limit} bytes)" if limit else "")
    if isinstance(exc, BadHttpMethod) and exc.message == _TLS_ON_PLAIN:
        return "TLS was sent to a plain-HTTP port: use http://, or the port that serves TLS"
    reason = parser_reason(exc)
    if reason is not None:
        return f"the request is malformed: {reason}"
    for cls, detail in _BY_CLASS:
        if isinstance(exc, cls):
            return detail
    return "the request is malformed"


def unreadable_body(exc: BaseException) -> Problem:
    """The 400 for a request body that could not be read: the client closed
    the connection before its end (``ConnectionError``), or the parser refused
    its framing (docs/http-api.md, "Errors")."""
    if isinstance(exc, ConnectionError):
        return Problem(400, "the connection closed before the request body was complete", kind="incomplete-body")
    refusal = parser_refused(exc)
    reason = parser_reason(refusal) if refusal is not None else None
    return Problem(400, "the request body is malformed" + (f": {reason}" if reason else ""), kind="malformed-body")


class _Queue(deque):  # type: ignore[type-arg]
    """aiohttp's queue of parsed requests, which tells its handler of each one appended: by
    ``data_received``, and by ``finish_response`` for the requests it parses behind an upgrade
    that was declined (or a ``CONNECT``), which never pass through ``data_received``."""

    def __init__(self, appended: Any) -> None:
        super().__init__()
        self.appended = appended

    def append(self, item: Any) -> None:
        super().append(item)
        self.appended(item)


class ProblemRequestHandler(RequestHandler):
    """aiohttp's ``RequestHandler`` (one per connection), except that

    - the responses it writes itself are problem documents, never quoting what
      was sent (:meth:`handle_error`);
    - a refusal of its parser in the middle of a request's body goes to that
      body's reader (a ``400``, ``malformed-body``), where aiohttp queues it as
      the next request's and leaves the body open, so that its handler waited
      for the rest until the body's deadline (``408``): the request being
      served, or one queued behind it.

    Made like aiohttp's ``web.Server`` makes its ``RequestHandler``
    (:func:`for_server`)."""

    __slots__ = ("_open_body",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The body of the newest request the parser handed over: every byte it
        #: parsed since went to that body until the body ended.
        self._open_body: StreamReader | None = None
        self._messages = _Queue(self._queued)

    def _queued(self, item: tuple[Any, Any]) -> None:
        message, payload = item
        refusal = getattr(message, "exc", None)  # an error aiohttp queued in place of a request
        if not isinstance(refusal, HttpProcessingError):
            self._open_body = payload
            return
        body, self._open_body = self._open_body, None
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(refusal)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._open_body = None
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it, and refuses once a response began
        if isinstance(exc, HttpProcessingError) and status == 400:
            response = problem_response(status, parser_refusal(exc), kind="malformed-request")
        else:  # a 500, or a 504 for a handler's TimeoutError (the middlewares answer both first)
            response = problem_response(status, INTERNAL_ERROR_DETAIL)
        response.force_close()
        return response


def for_server(server: web.Server) -> ProblemRequestHandler:
    """A :class:`ProblemRequestHandler` for one connection of ``server``, made
    as ``server()`` makes aiohttp's own (its loop and its handler arguments:
    the runner's ``keepalive_timeout``, ``lingering_time``, ``logger``...)."""
    return ProblemRequestHandler(server, loop=server._loop, **server._kwargs)
