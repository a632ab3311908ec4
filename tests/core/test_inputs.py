"""unibus.inputs: the checks every client value passes at the HTTP edge (docs/http-api.md, "Input rules")."""

from __future__ import annotations

import json
import re

import pytest
from multidict import MultiDict

from unibus.inputs import (
    EPOCH_MAX,
    EPOCH_MIN,
    MAX_JSON_DEPTH,
    MAX_PATH_PARAM,
    MAX_SAFE_INT,
    check_path_params,
    int_value,
    parse_json,
    path_param_schema,
    query_int,
)
from unibus.problems import Problem


def refused(fn, *args, status, contains=""):
    with pytest.raises(Problem) as e:
        fn(*args)
    assert e.value.status == status, e.value.detail
    assert contains in e.value.detail, e.value.detail
    return e.value.detail


def test_the_bounds():
    assert MAX_SAFE_INT == 9007199254740991 == 2**53 - 1
    assert (EPOCH_MIN, EPOCH_MAX) == (1, MAX_SAFE_INT)


@pytest.mark.parametrize("value", [0, 1, 2**53 - 1])
def test_int_value_accepts_the_range(value):
    assert int_value(value, "n", 0, MAX_SAFE_INT) == value


@pytest.mark.parametrize("value", [-1, 2**53, 2**64, 10**400, True, False, 1.0, 1.5, float("inf"), "1", None, [], {}])
def test_int_value_refuses_the_rest_naming_field_and_range(value):
    detail = refused(int_value, value, "epoch", 1, MAX_SAFE_INT, status=422)
    assert detail == "epoch: must be an integer from 1 to 9007199254740991"


@pytest.mark.parametrize("text, want", [("1", 1), ("007", 7), (str(MAX_SAFE_INT), MAX_SAFE_INT)])
def test_query_int_accepts_ascii_digits(text, want):
    assert query_int(MultiDict(epoch=text), "epoch", 1, MAX_SAFE_INT) == want


@pytest.mark.parametrize("text", ["99999999999999999999", str(2**53), "0", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10",
                                  "1_0", "\u0663", "\uff11", "", "true", "NaN", "a" * 5000])
def test_query_int_refuses_anything_else(text):
    detail = refused(query_int, MultiDict(epoch=text), "epoch", 1, MAX_SAFE_INT, status=422)
    assert detail.startswith("epoch: must be an integer from 1 to ")


def test_query_int_absent_or_repeated():
    assert query_int(MultiDict(), "epoch", 1, 5) is None
    assert query_int(MultiDict(), "limit", 1, 1000, default=500) == 500
    refused(query_int, MultiDict([("epoch", "1"), ("epoch", "2")]), "epoch", 1, 5, status=422, contains="at most once")
    assert query_int({"epoch": "3"}, "epoch", 1, 5) == 3  # a plain mapping works too


def test_parse_json_accepts_ordinary_json():
    assert parse_json(b'{"a": [1, 2.5, "\\u00e9", null, true], "b": {"c": "\\ud83d\\ude00"}}') == {
        "a": [1, 2.5, "é", None, True], "b": {"c": "\U0001f600"}}
    assert parse_json(json.dumps({"x": "é"}, ensure_ascii=False).encode()) == {"x": "é"}


@pytest.mark.parametrize("raw, contains", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'{"a": -Infinity}', "-Infinity is not JSON"),
    (b'{"a": 1e400}', "too large"),
    (b'{"a": ' + b"9" * 5000 + b"}", "integer string conversion"),
    (b'{"a": "\\ud800"}', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b'["\\ud800\\ud800"]', "lone surrogate"),
    (b"[" * 100_000, "nested deeper"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested deeper"),
    (b'{"a": }', "Expecting value"),
], ids=lambda v: v[:24].decode("latin-1") if isinstance(v, bytes) else v)
def test_parse_json_refuses_with_400(raw, contains):
    refused(parse_json, raw, status=400, contains=contains)


def test_parse_json_depth_limit_is_inclusive():
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(ok) is not None


def test_duplicate_key_detail_is_bounded():
    key = "k" * 100_000
    detail = refused(parse_json, json.dumps({key: 1}).encode()[:-1] + b', "' + key.encode() + b'": 2}', status=400)
    assert len(detail) < 200


@pytest.mark.parametrize("params, contains", [
    ({"room_id": "ABC"}, "no such room: room_id must be 1-40 characters of a-z and 0-9"),
    ({"room_id": "no-such-room"}, "no such room: room_id"),
    ({"room_id": "a" * 41}, "no such room: room_id"),
    ({"room_id": "abc\n"}, "no such room: room_id"),
    ({"room_id": "%ff"}, "no such room: room_id"),
    ({"handle": "Alice"}, "no such member: handle must match ^[a-z][a-z0-9_-]{0,31}$"),
    ({"handle": "a" * 33}, "no such member: handle"),
    ({"handle": "\ud800"}, "no such member: handle"),
    ({"blob_id": "x" * (MAX_PATH_PARAM + 1)}, f"no such blob: blob_id must be 1-{MAX_PATH_PARAM} printable ASCII"),
    ({"blob_id": "a b"}, "no such blob: blob_id"),
    ({"thing": "é"}, "no such resource: thing"),
])
def test_a_path_param_that_breaks_its_syntax_names_nothing_404(params, contains):
    """An id that breaks its syntax cannot name anything that exists: the answer is an unknown
    one's, 404 (docs/http-api.md, "Input rules"), given before any store is asked."""
    detail = refused(check_path_params, params, status=404, contains=contains)
    assert len(detail) < 120  # the rule, never the value sent


def test_path_params_accepted_and_described():
    check_path_params({"room_id": "abc123", "handle": "bob_1-x", "blob_id": "0" * 64})
    assert path_param_schema("room_id") == {"type": "string", "pattern": "^[a-z0-9]{1,40}$"}
    assert path_param_schema("handle") == {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"}
    generic = path_param_schema("blob_id")
    assert generic == {"type": "string", "minLength": 1, "maxLength": MAX_PATH_PARAM, "pattern": "^[!-~]{1,256}$"}
    # the documented pattern is the rule checked (printable ASCII, no space)
    for value in ("x", "~" * MAX_PATH_PARAM, "a b", "é", "x" * (MAX_PATH_PARAM + 1), "a\x7f", "!"):
        documented = re.fullmatch(generic["pattern"].strip("^$"), value) is not None
        try:
            check_path_params({"blob_id": value})
            checked = True
        except Problem:
            checked = False
        assert documented == checked, value


@pytest.mark.parametrize("status", [200, 204, 302, 399, 600, "404", None])
def test_a_problem_is_an_error_status(status):
    """A plugin's Problem(200, ...) answered 200 with a problem document (a plugin author's walkthrough)."""
    with pytest.raises(ValueError, match="400-599"):
        Problem(status, "nope")
    assert Problem(418, "a teapot").kind == "i'm-a-teapot" and Problem(599, "x", kind="odd").kind == "odd"
