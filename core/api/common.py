"""Helpers shared by the /v1 handlers: JSON input, field validation, rights."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ..app import SETTINGS
from ..auth import AUTH_TIME_KEY, LOGGED_REQUEST_KEY, MEMBER_KEY, SIGNATURE_KEY, logged_request, require_admin  # noqa: F401  (re-exported for the handlers)
from ..inputs import invalid, parse_json
from ..memberlog import BODYLESS, MAX_AUTH_SKEW, TAKES_BODY, check_logged_request, logged_operation
from ..problems import Problem
from ..signing import SignatureError
from ..store.base import LogRecord

#: Largest body of a logged request whose body the log keeps (every logged body
#: but the keys POST's). The largest legitimate one, a member add with an
#: MLKEM768_X25519 key, is under 2 KiB; the log is read by every member, so a
#: member cannot make it grow by megabytes of JSON whitespace.
MAX_LOGGED_BODY = 16 * 1024
#: OpenAPI responses every logged route has, besides its own.
LOGGED_RESPONSES = {400: "malformed JSON, or a path that is not the canonical spelling, a query string, a body "
                         "padded with whitespace or where the route takes none, signature headers longer than "
                         "the log keeps, or a signature covering more than @method, @path, @query and "
                         "content-digest (non-canonical-request: the membership log records requests as signed)",
                    401: "missing or invalid signature, or a nonce or created the membership log refuses",
                    409: "the membership log or the record moved during this change (a concurrent writer); try again",
                    413: "a body larger than the membership log keeps"}


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


def log_record(request: web.Request) -> LogRecord:
    """The request as the membership log will record it, for the store's ``logged=``.

    Called first by the handler of every logged route (docs/formats.md, "The
    membership log"). A request the log could not record so that every client
    parses it is refused before anything happens: its raw path must be the
    route's canonical spelling (no percent-encoded character that needs none)
    and it must have no query string, nor a body on a route that takes none (400
    ``non-canonical-request``); its body, if the log keeps it, is at most
    :data:`MAX_LOGGED_BODY` bytes (413).
    """
    logged = logged_request(request)
    found = logged_operation(logged.method, logged.path)
    if found is None or logged.query != "":
        raise Problem(400, "a membership-changing request is recorded in the membership log as signed, so it must "
                           "use the canonical path (nothing percent-encoded that needs no encoding) and no query "
                           "string", kind="non-canonical-request")
    if logged.body and found[0] not in TAKES_BODY:
        # The log would keep it: a red team's member grew every client's log by 16 KiB an entry,
        # 300 entries in 2 s, with junk bodies on room member changes it may make (a leave).
        raise Problem(400, f"{logged.method} {logged.path} takes no body, and the membership log keeps what a "
                           "membership-changing request carries: send none", kind="non-canonical-request")
    if logged.body is not None and found[0] not in BODYLESS and len(logged.body) > MAX_LOGGED_BODY:
        raise Problem(413, f"the body of this request is kept in the membership log: at most {MAX_LOGGED_BODY} "
                           "bytes", kind="request-entity-too-large", max_bytes=MAX_LOGGED_BODY)
    for name, value, most in (("Content-Digest", logged.content_digest, MAX_LOGGED_DIGEST),
                              ("Signature-Input", logged.signature_input, MAX_LOGGED_SIGNATURE_INPUT),
                              ("Signature", logged.signature, MAX_LOGGED_SIGNATURE)):
        if value is not None and len(value) > most:
            # Kept as sent, like the body: a red team padded Content-Digest with a member of 4 KB
            # that no check reads, and made the label 3,000 characters (twice kept).
            raise Problem(400, f"the {name} header of this request is kept in the membership log as sent: at most "
                               f"{most} characters (it has {len(value)}); send the sha-256 digest alone and a "
                               "short label", kind="non-canonical-request")
    if logged.body and found[0] not in BODYLESS and _padded(logged.body):
        # Kept byte for byte: a review's member padded its room creations with 16,000 spaces, 22 KB
        # an entry where one takes 535 B (the junk bodies of bodyless routes, by another route).
        raise Problem(400, f"the body of this request is kept in the membership log as sent: send its JSON with "
                           f"at most {MAX_LOGGED_PADDING} bytes of whitespace outside its strings",
                      kind="non-canonical-request")
    # What every client will check when it replays the entry, checked on the entry as it will be
    # logged: a signature covering anything the log does not keep (another header) would be
    # accepted here and refused by every client, for good.
    try:
        check_logged_request(logged.method, logged.path, logged.content_digest, logged.signature_input,
                             logged.signature, logged.body, found[0], now=float(request[AUTH_TIME_KEY]),
                             skew=float(MAX_AUTH_SKEW))
    except SignatureError as e:
        raise Problem(400, "a membership-changing request is recorded in the membership log as signed, and every "
                           "client checks its signature from what the log keeps: @method, @path, @query and "
                           f"content-digest; sign only those ({e.reason})", kind="non-canonical-request") from None
    verified = request[SIGNATURE_KEY]
    return LogRecord(logged, verified.keyid, verified.nonce, verified.created, int(request[AUTH_TIME_KEY]),
                     int(request.app[SETTINGS].auth_skew), sign_pub=bytes(request[MEMBER_KEY].sign_pub))


#: The longest signature headers a logged request may carry, as the log keeps them: room for
#: sha-256 and sha-512 digests; the parameters unibus signs with a label of up to 64 characters.
#: (What `sign_request` writes takes 54, about 200 and about 95.)
MAX_LOGGED_DIGEST = 256
MAX_LOGGED_SIGNATURE_INPUT = 512
MAX_LOGGED_SIGNATURE = 256
#: The whitespace a kept body may carry outside its strings: room for an indented object of the
#: few fields a logged body has, not for padding. (Inside strings, the schema's lengths bound
#: what escapes can add: a room name of 200 characters.)
MAX_LOGGED_PADDING = 256
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_SPACE = re.compile(rb"[ \t\n\r]")


def _padded(body: bytes) -> bool:
    """Whether ``body`` carries more than :data:`MAX_LOGGED_PADDING` bytes of whitespace outside
    its JSON strings. (A first version measured the body against its compact form with ASCII
    escapes, which credited every non-ASCII character sent raw: a second review padded 200
    emoji with 1,850 spaces, and a client that escapes `<` was refused.)"""
    try:  # JSON first, which fails fast: the string pattern on `\\"` without end took 0.8 s of the
        json.loads(body)  # event loop for 16 KiB, quadratic (a third review); on JSON it is linear
    except (ValueError, RecursionError):
        return False  # the handler refuses it (400 malformed-json)
    return len(_JSON_SPACE.findall(_JSON_STRING.sub(b"", body))) > MAX_LOGGED_PADDING


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))
