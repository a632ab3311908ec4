"""Client input at the HTTP edge: JSON bodies, integers, query strings, path segments.

Every value a request carries passes one of these checks before a handler
uses it, so that nothing a client sends reaches a store (SQLite or JetStream
KV) in a shape that store cannot take: no input is a 500. The rules, and the
status each breach gets, are in docs/http-api.md ("Input rules").

Pure: no aiohttp import at module level, no store. Each check raises
:class:`unibus.problems.Problem` (400 for a body that is not acceptable JSON,
422 for a value that is out of its range or of the wrong type, 404 for a path
segment that cannot name anything).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .problems import Problem
from .wire import HANDLE_PATTERN, HANDLE_RE

__all__ = [
    "EPOCH_MAX",
    "EPOCH_MIN",
    "GENERIC_PARAM_PATTERN",
    "MAX_JSON_DEPTH",
    "MAX_PATH_PARAM",
    "MAX_SAFE_INT",
    "PATH_PARAMS",
    "ROOM_ID_PATTERN",
    "check_path_params",
    "int_value",
    "invalid",
    "parse_json",
    "path_param_schema",
    "query_int",
    "unnamed",
]

#: The largest integer every JSON implementation holds exactly (2^53 - 1, the
#: I-JSON limit of RFC 7493): the upper bound of every integer the API takes.
MAX_SAFE_INT = 2**53 - 1
#: A room key epoch (``POST .../keys`` ``epoch``, ``GET .../keys/me?epoch=``).
EPOCH_MIN, EPOCH_MAX = 1, MAX_SAFE_INT
#: Deepest JSON nesting a body may have (unibus bodies nest three levels).
MAX_JSON_DEPTH = 16
#: Longest path segment a route parameter without its own rule may be.
MAX_PATH_PARAM = 256

#: A server-made room id, in the portable (JSON Schema / ECMA) spelling.
ROOM_ID_PATTERN = r"^[a-z0-9]{1,40}$"
ROOM_ID_RE = re.compile(r"\A[a-z0-9]{1,40}\Z")

#: Route parameters with a rule of their own: name -> (compiled rule, portable
#: pattern, what the 404 says). Any other parameter only has the generic bound
#: (1-MAX_PATH_PARAM printable ASCII characters); its handler checks the rest.
PATH_PARAMS: dict[str, tuple[re.Pattern[str], str, str]] = {
    "room_id": (ROOM_ID_RE, ROOM_ID_PATTERN, "must be 1-40 characters of a-z and 0-9"),
    "handle": (HANDLE_RE, HANDLE_PATTERN, "must match " + HANDLE_PATTERN),
}
#: What a parameter that breaks its rule does not name, for the 404's detail.
PATH_PARAM_NOUNS = {"room_id": "room", "handle": "member", "blob_id": "blob"}
_DIGITS = re.compile(r"\A[0-9]{1,20}\Z")  # ASCII digits only: int() would take "٣", "1_0", " 7", "+7"
_GENERIC_PARAM = re.compile(r"\A[\x21-\x7e]{1,%d}\Z" % MAX_PATH_PARAM)
#: The same rule in the portable spelling, for /openapi.json (``!`` is 0x21, ``~`` 0x7e).
GENERIC_PARAM_PATTERN = "^[!-~]{1,%d}$" % MAX_PATH_PARAM


def invalid(field: str, why: str) -> Problem:
    """The 422 of a value that is there but wrong: ``<field>: <why>``."""
    return Problem(422, f"{field}: {why}", kind="invalid-field")


def _malformed(why: str) -> Problem:
    return Problem(400, f"malformed JSON body: {why}", kind="malformed-json")


def _range_text(lo: int, hi: int) -> str:
    return f"must be an integer from {lo} to {hi}"


# --------------------------------------------------------------------------- numbers


def int_value(value: Any, field: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int:
    """A JSON integer in ``[lo, hi]``; ``true``/``false``, floats (``1.0``
    included), strings and out-of-range integers are 422 naming the range."""
    if type(value) is not int or not lo <= value <= hi:
        raise invalid(field, _range_text(lo, hi))
    return value


def query_int(query: Mapping[str, str], name: str, lo: int = 0, hi: int = MAX_SAFE_INT,
              default: int | None = None) -> int | None:
    """The query parameter ``name`` as an integer in ``[lo, hi]``, or ``default``
    when absent. ASCII digits only; given twice, empty, signed, fractional or
    out of range: 422 naming the parameter and the range."""
    getall = getattr(query, "getall", None)
    values = getall(name, []) if getall is not None else ([query[name]] if name in query else [])
    if not values:
        return default
    if len(values) > 1:
        raise invalid(name, "give it at most once")
    text = values[0]
    if not _DIGITS.match(text):
        raise invalid(name, _range_text(lo, hi))
    return int_value(int(text), name, lo, hi)


# --------------------------------------------------------------------------- JSON


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = key if len(key) <= 64 else key[:64] + "..."
                raise _malformed(f"duplicate key {shown!r} in an object")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise _malformed(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _malformed(f"the number {text[:32]} is too large")
    return value


def _check_tree(root: Any) -> None:
    """Depth at most MAX_JSON_DEPTH; every string (keys too) valid Unicode,
    as I-JSON (RFC 7493) asks: a lone surrogate (``"\\ud800"``) is refused,
    because no store, log or reply can encode it."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            strings: Iterable[str] = (node,)
            children: Iterable[Any] = ()
        elif isinstance(node, dict):
            strings, children = node.keys(), node.values()
        elif isinstance(node, list):
            strings, children = (), node
        else:
            continue
        for s in strings:
            if not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise _malformed("a string holds a lone surrogate (\\ud800-\\udfff); "
                                     "strings must be valid Unicode") from None
        if children:
            if depth >= MAX_JSON_DEPTH:
                raise _malformed(f"nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((c, depth + 1) for c in children if isinstance(c, (str, dict, list)))


def parse_json(raw: bytes) -> Any:
    """The JSON value of a body, or a 400 ``malformed-json`` problem.

    Stricter than :func:`json.loads`: UTF-8 only, no duplicate object keys
    (two parsers could read two different values), no ``NaN``/``Infinity``,
    no number that overflows a float, no lone surrogate, at most
    MAX_JSON_DEPTH levels of nesting.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _malformed(f"not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise _malformed(f"{e.msg} at position {e.pos}") from None
    except RecursionError:
        raise _malformed(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # an integer literal of more than 4300 digits
        raise _malformed(str(e).split(";")[0][:200]) from None
    _check_tree(value)
    return value


# --------------------------------------------------------------------------- path segments


def unnamed(name: str, why: str) -> Problem:
    """The 404 of a path parameter that breaks its syntax: it cannot name anything that
    exists, so the answer is the one an unknown value gets (``no such room: room_id ...``)."""
    return Problem(404, f"no such {PATH_PARAM_NOUNS.get(name, 'resource')}: {name} {why}", kind="not-found")


def check_path_params(params: Mapping[str, str]) -> None:
    """Every route parameter of a matched route against its rule (:data:`PATH_PARAMS`),
    or the generic bound; 404 (:func:`unnamed`) for the first that breaks it."""
    for name, value in params.items():
        rule = PATH_PARAMS.get(name)
        if rule is not None:
            if rule[0].match(value) is None:
                raise unnamed(name, rule[2])
        elif _GENERIC_PARAM.match(value) is None:
            raise unnamed(name, f"must be 1-{MAX_PATH_PARAM} printable ASCII characters")


def path_param_schema(name: str) -> dict[str, Any]:
    """The OpenAPI schema of a route parameter, from the same rules."""
    rule = PATH_PARAMS.get(name)
    if rule is not None:
        return {"type": "string", "pattern": rule[1]}
    return {"type": "string", "minLength": 1, "maxLength": MAX_PATH_PARAM, "pattern": GENERIC_PARAM_PATTERN}
