"""No client input is a 5xx: every route of /openapi.json, fed out-of-range and
ill-typed values in its path, query and JSON fields, as an admin, as a plain
member and unsigned (docs/http-api.md, "Input rules").

The requests are derived from the OpenAPI document, so a new route (a plugin's
included) is covered as soon as it is registered with ``unibus.app.add_route``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import aiohttp
import pytest
import yarl
from helpers import serving_cleanly

from unibus.client.keys import generate_identity
from unibus.inputs import MAX_SAFE_INT
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, http_json

#: Path segments as they go on the wire (already percent-encoded).
BAD_SEGMENTS = [
    "99999999999999999999", str(2**63), "-1", "0", "1.5", "1e400", "true", "null", "NaN", "ABC", "%20",
    "%ff", "%00", "%0a", "%ed%a0%80", "%F0%9F%92%A5", "%2e%2e", "x%2Fy", "..", "a" * 3000, "%25", "~",
]
#: Values of an integer query parameter (raw, percent-encoded where needed).
BAD_QUERY_INTS = [
    "99999999999999999999", str(2**53), str(2**63), str(MAX_SAFE_INT), "1", "-1", "0", "+1", "%201", "1.5", "1e3",
    "0x10", "1_0", "%D9%A3", "true", "NaN", "", "%ff", "%00", "a" * 3000,
]
#: JSON values for an integer field: raw JSON text (so that 1e400 and huge literals stay as written).
BAD_JSON_INTS = [
    str(2**64), str(-(2**64)), str(2**53), str(2**63), str(MAX_SAFE_INT), "1", "0", "-1", "1.5", "1.0", "1e400",
    "9" * 5000, "true", "false", "null", '"1"', "[]", "{}", "NaN", "-Infinity",
]
#: JSON values for a string field.
BAD_JSON_STRINGS = [
    "5", "true", "null", "[]", "{}", '""', '"\\ud800"', '"\\u0000"', '"' + "x" * 100_000 + '"', '"\\ud83d\\udca5"',
    '"%ff"', str(2**64),
]
#: JSON values for an object field.
BAD_JSON_OBJECTS = [
    "[]", '"x"', "5", "null", '{"bob": 5}', '{"%": "AAAA"}', '{"\\ud800": "AAAA"}', '{"' + "a" * 5000 + '": "AAAA"}',
    '{"bob": "\\ud800"}', '{"bob": "' + "A" * 100_000 + '"}', '{"bob": {"bob": {"bob": {}}}}',
]
#: Whole bodies for a route that takes JSON.
BAD_BODIES = [
    b"", b"null", b"[]", b"5", b'"x"', b"{", b"\xff\xfe\x00", b'{"a":NaN}', b"[" * 5000, b'{"x":1,"x":2}',
    b'{"a":1e999}', b"{" + b'"a":{' * 40 + b"}" * 41, json.dumps({"\ud800": 1}).encode(), b"\x00" * 1000,
]


def bad_values(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    if kind == "integer":
        return BAD_JSON_INTS
    if kind == "object":
        return BAD_JSON_OBJECTS
    return BAD_JSON_STRINGS + (BAD_JSON_INTS[:4] if kind == "string" else [])


def placeholder(schema: dict[str, Any]) -> Any:
    """A value of the property's type, not necessarily an acceptable one."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    return {"integer": schema.get("minimum", 1), "object": {}, "boolean": False, "array": []}.get(kind, "x")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "daemon"
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob"),
              "carol": generate_identity("carol", "MLKEM768_X25519")}
    bootstrap_member(data_dir, people["alice"], "admin")
    for h in ("bob", "carol"):
        bootstrap_member(data_dir, people[h], "member")
    with serving_cleanly(MembershipdProcess(data_dir)) as proc:
        proc.people = people
        yield proc


class Prober:
    def __init__(self, server: MembershipdProcess, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.sent = 0
        self.failures: list[str] = []

    async def send(self, method: str, target: str, who: str | None, body: bytes | None = None,
                   content_type: str = "application/json") -> int:
        headers: dict[str, str] = {}
        if who is not None:
            ident = self.server.people[who]
            headers = sign_request(method, target, body, keyid=who, private_key=ident.sign_key)
        if body is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, yarl.URL(self.server.base_url + target, encoded=True), data=body,
                                        headers=headers) as r:
            raw = await r.read()
            self.sent += 1
            if r.status >= 500:
                self.failures.append(f"{r.status} {who} {method} {target[:120]} body={body[:80] if body else body!r}: "
                                     f"{raw[:300]!r}")
            elif r.status >= 400:
                assert r.headers["Content-Type"].startswith("application/problem+json"), (method, target, raw[:200])
            return r.status


def operations(doc: dict[str, Any]):
    for path, ops in sorted(doc["paths"].items()):
        for method, op in sorted(ops.items()):
            yield path, method.upper(), op


def fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: values[m.group(1)], path)


async def probe_operation(p: Prober, path: str, method: str, op: dict[str, Any], valid: dict[str, str],
                          who: str | None) -> None:
    params = op.get("parameters", [])
    path_names = [q["name"] for q in params if q["in"] == "path"]
    # 1. each path parameter in turn gets every bad segment, the others stay valid
    for name in path_names:
        for bad in BAD_SEGMENTS:
            await p.send(method, fill(path, {**valid, name: bad}), who)
    target = fill(path, valid)
    # 2. each query parameter gets every bad value; then twice
    for q in (q for q in params if q["in"] == "query"):
        values = BAD_QUERY_INTS if q["schema"].get("type") == "integer" else BAD_SEGMENTS
        for bad in values:
            await p.send(method, f"{target}?{q['name']}={bad}", who)
        await p.send(method, f"{target}?{q['name']}=1&{q['name']}=2", who)
    # 3. the body: whole bad bodies, then each field in turn made bad
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        for raw in BAD_BODIES:
            await p.send(method, target, who, raw)
        props = schema.get("properties", {})
        base = {k: placeholder(v) for k, v in props.items()}
        for field, fschema in props.items():
            for bad in bad_values(fschema):
                text = json.dumps({k: v for k, v in base.items() if k != field})
                raw = (text[:-1] + (", " if len(text) > 2 else "") + json.dumps(field) + ": " + bad + "}").encode()
                await p.send(method, target, who, raw)
    elif content:
        for raw in (b"", b"\x00" * 100, b"x"):
            await p.send(method, target, who, raw, content_type=next(iter(content)))


async def test_no_route_answers_5xx_to_any_input(world):
    status, doc = http_json("GET", world.base_url + "/openapi.json")
    assert status == 200
    ops = list(operations(doc))
    assert len(ops) >= 17  # the core's routes at least (a plugin's are added)
    async with aiohttp.ClientSession() as session:
        p = Prober(world, session)
        # a room bob owns, with carol in it, a key at epoch 1: valid ids reach the deep code
        h = sign_request("POST", "/v1/rooms", b'{"name":"fuzz"}', keyid="bob",
                         private_key=world.people["bob"].sign_key)
        h["Content-Type"] = "application/json"
        async with session.post(world.base_url + "/v1/rooms", data=b'{"name":"fuzz"}', headers=h) as r:
            assert r.status == 201
            room_id = (await r.json())["room_id"]
        valid = {"room_id": room_id, "handle": "carol", "blob_id": "0" * 64}
        # destructive operations last, so that the others see the room
        ops.sort(key=lambda o: o[1] == "DELETE")
        for who in ("alice", "bob", None):
            for path, method, op in ops:
                await probe_operation(p, path, method, op, valid, who)
        assert p.sent > 1000
        assert not p.failures, "\n".join(p.failures[:30])


async def test_epoch_bounds_reach_the_store_without_a_5xx(world):
    """The largest allowed epoch goes all the way to the store (SQLite here) and
    back as a 404/409; one more is a 422 naming the range."""
    bob = world.people["bob"]
    async with aiohttp.ClientSession() as session:
        async def send(method, target, body=None):
            h = sign_request(method, target, body, keyid="bob", private_key=bob.sign_key)
            if body is not None:
                h["Content-Type"] = "application/json"
            async with session.request(method, yarl.URL(world.base_url + target, encoded=True), data=body,
                                       headers=h) as r:
                return r.status, await r.json()

        status, room = await send("POST", "/v1/rooms", b'{"name":"bounds"}')
        rid = room["room_id"]
        sealed = base64.b64encode(hashlib.sha256(b"x").digest() * 2 + b"\0" * 16).decode()  # 80 bytes
        assert (await send("GET", f"/v1/rooms/{rid}/keys/me?epoch={MAX_SAFE_INT}"))[0] == 404
        status, doc = await send("GET", f"/v1/rooms/{rid}/keys/me?epoch={MAX_SAFE_INT + 1}")
        assert status == 422 and doc["detail"] == f"epoch: must be an integer from 1 to {MAX_SAFE_INT}"
        _status, head = await send("GET", "/v1/log/head")
        package = {"sigs": {"bob": base64.b64encode(b"s" * 64).decode()},
                   "log_head": {"seq": head["seq"], "hash": head["hash"]}}
        body = json.dumps({"epoch": MAX_SAFE_INT, "sealed": {"bob": sealed}, **package}).encode()
        status, doc = await send("POST", f"/v1/rooms/{rid}/keys", body)
        assert status == 409 and doc["current_epoch"] == 0
        body = json.dumps({"epoch": 1, "sealed": {"bob": sealed}, **package,
                           "log_head": {"seq": MAX_SAFE_INT, "hash": head["hash"]}}).encode()
        status, doc = await send("POST", f"/v1/rooms/{rid}/keys", body)  # the largest seq: no such entry
        assert status == 409 and doc["type"].endswith("/unknown-log-head")
        status, doc = await send("GET", f"/v1/log?after={MAX_SAFE_INT}&limit=1000")
        assert status == 200 and doc["entries"] == []
        body = json.dumps({"epoch": MAX_SAFE_INT + 1, "sealed": {"bob": sealed}, **package}).encode()
        status, doc = await send("POST", f"/v1/rooms/{rid}/keys", body)
        assert status == 422 and doc["detail"] == f"epoch: must be an integer from 1 to {MAX_SAFE_INT}"
        status, doc = await send("GET", f"/v1/rooms/{rid}/keys/me?epoch=99999999999999999999")
        assert status == 422


async def test_openapi_documents_parameter_rules(world):
    status, doc = http_json("GET", world.base_url + "/openapi.json")
    keys_me = doc["paths"]["/v1/rooms/{room_id}/keys/me"]["get"]
    by_name = {p["name"]: p for p in keys_me["parameters"]}
    assert by_name["room_id"]["in"] == "path" and by_name["room_id"]["schema"]["pattern"] == "^[a-z0-9]{1,40}$"
    assert by_name["epoch"] == {"name": "epoch", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SAFE_INT}}
    epoch = doc["paths"]["/v1/rooms/{room_id}/keys"]["post"]["requestBody"]["content"]["application/json"]
    assert epoch["schema"]["properties"]["epoch"]["maximum"] == MAX_SAFE_INT
