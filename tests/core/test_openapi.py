"""The OpenAPI document: what add_route records, and the whole document as the
daemon builds it (docs/plugins.md, "Documenting responses"; docs/http-api.md,
"GET /openapi.json"). Schemathesis holds the running server to it in
tests/core/test_api_fuzz.py."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer

from unibus.api import bus as bus_api
from unibus.api import log as log_api
from unibus.api import members as members_api
from unibus.api import rooms as rooms_api
from unibus.app import OPENAPI_DOC, add_route, add_schema, make_app
from unibus.bus import Bus
from unibus.openapi import OpenAPI, Response, header
from unibus.pluginmanager import PluginManager, running_plugin
from unibus.plugins.blobstore import register_routes as register_blob_routes
from unibus.settings import Settings
from unibus.wire import SIGN_PUB_SIZE, KeyFormatError, b64_pattern, b64decode_strict, b64encode

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": True})


def bare_app(tmp_path) -> web.Application:
    return make_app(Settings(data_dir=tmp_path), PluginManager(load_entry_points=False), Bus("nats://127.0.0.1:1"),
                    None)


def full_document(tmp_path) -> dict[str, Any]:
    """The document of a daemon with the built-in routes: the core's and the blobstore's."""
    app = bare_app(tmp_path)
    for register in (members_api.register, rooms_api.register, bus_api.register, log_api.register,
                     register_blob_routes):
        register(app)
    return json.loads(json.dumps(app[OPENAPI_DOC].document()))


def test_a_plugin_route_with_descriptions_only_still_works_and_gets_the_core_statuses():
    """The 0.11 form, {status: description}, is still taken (third-party plugins)."""
    doc = OpenAPI()
    doc.add_operation("GET", "/v1/hello/{thing}", summary="hi", responses={200: "hi", 404: "no such thing"},
                      signed=True)
    op = doc.document()["paths"]["/v1/hello/{thing}"]["get"]
    assert set(op["responses"]) == {"200", "400", "401", "404", "408", "413", "415", "417", "429", "503"}
    assert op["responses"]["200"] == {"description": "hi"}  # no body documented: none promised
    assert op["responses"]["404"] == {"description": "no such thing", "content": PROBLEM}
    assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    # without a 404 of the plugin's own, the core's: a path parameter that breaks its syntax
    bare = OpenAPI()
    bare.add_operation("GET", "/v1/hello/{thing}", summary="hi", responses={200: "hi"}, signed=True)
    op404 = bare.document()["paths"]["/v1/hello/{thing}"]["get"]["responses"]["404"]
    assert op404 == {"description": "a path parameter breaks its syntax, so it names nothing", "content": PROBLEM}
    assert op["parameters"] == [{"name": "thing", "in": "path", "required": True,
                                 "schema": {"type": "string", "minLength": 1, "maxLength": 256,
                                            "pattern": "^[!-~]{1,256}$"}}]


def test_open_route_gets_only_400_and_417_and_the_404_of_its_path_parameters():
    doc = OpenAPI()
    doc.add_operation("GET", "/ping", summary="ping", responses={200: ("pong", {"type": "object"})}, signed=False)
    op = doc.document()["paths"]["/ping"]["get"]
    assert set(op["responses"]) == {"200", "400", "417"}
    assert "malformed-request" in op["responses"]["400"]["description"]
    assert op["responses"]["200"]["content"] == {"application/json": {"schema": {"type": "object"}}}
    assert "security" not in op
    # an open route with a path parameter: the core answers 404 there too (a review)
    doc.add_operation("GET", "/ping/{thing}", summary="ping", responses={200: "pong"}, signed=False)
    op = doc.document()["paths"]["/ping/{thing}"]["get"]
    assert set(op["responses"]) == {"200", "400", "404", "417"}


def test_response_forms_and_merging_with_the_core():
    doc = OpenAPI()
    ref = doc.add_schema("Thing", {"type": "object", "required": ["id"]})
    doc.add_operation("PUT", "/v1/things", summary="put", signed=True, responses={
        201: Response("stored", ref, headers={"Location": header("where it is")}),
        200: Response("the bytes", {"type": "string", "format": "binary"}, "application/octet-stream"),
        401: "bad signature, or a body whose digest is not signed",
        409: ("a conflict with extras", {"type": "object", "required": ["why"]}),
    })
    responses = doc.document()["paths"]["/v1/things"]["put"]["responses"]
    assert responses["201"]["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}
    assert responses["201"]["headers"]["Location"]["schema"] == {"type": "string"}
    assert responses["200"]["content"] == {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}
    # the route's description, the core's header
    assert responses["401"]["description"].startswith("bad signature")
    assert "WWW-Authenticate" in responses["401"]["headers"] and responses["401"]["content"] == PROBLEM
    assert responses["409"]["content"] == {"application/json": {"schema": {"type": "object", "required": ["why"]}}}
    assert doc.document()["components"]["schemas"]["Thing"] == {"type": "object", "required": ["id"]}


def test_bad_registrations_are_refused():
    doc = OpenAPI()
    doc.add_schema("Thing", {"type": "object"})
    doc.add_schema("Thing", {"type": "object"})  # the same again: fine
    with pytest.raises(ValueError, match="'Thing' is already registered"):
        doc.add_schema("Thing", {"type": "string"})
    with pytest.raises(ValueError, match="path_params names no parameter of the path: blob"):
        doc.add_operation("GET", "/v1/x/{id}", summary="x", responses={200: "x"}, signed=True,
                          path_params={"blob": {"type": "string"}})
    with pytest.raises(TypeError, match="a response is a description"):
        doc.add_operation("GET", "/v1/x", summary="x", responses={200: 5}, signed=True)  # type: ignore[dict-item]


def test_path_params_document_a_stricter_rule(tmp_path):
    app = bare_app(tmp_path)
    add_route(app, "GET", "/v1/x/{blob_id}", hello, summary="x", responses={200: "x"},
              path_params={"blob_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"}})
    [param] = app[OPENAPI_DOC].document()["paths"]["/v1/x/{blob_id}"]["get"]["parameters"]
    assert param["schema"] == {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    assert add_schema(app, "X", {"type": "object"}) == {"$ref": "#/components/schemas/X"}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_daemon_document_is_valid_and_describes_every_answer(tmp_path):
    doc = full_document(tmp_path)
    schemathesis.openapi.from_dict(doc).validate()  # OpenAPI 3.1, by schemathesis's own validator
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            codes = {int(c) for c in op["responses"]}
            assert 417 in codes, where
            if "security" in op:
                assert {400, 401, 408, 413, 415, 429, 503} <= codes, where
                assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], where
                assert op["responses"]["503"]["headers"]["Retry-After"]["required"], where
            if "{" in path:
                assert 404 in codes, where
            for code, resp in op["responses"].items():
                if code == "204":
                    assert "content" not in resp, where
                elif int(code) < 300 or where == "GET /healthz":
                    # every success body (and the degraded /healthz) has a schema
                    [(ctype, media)] = resp["content"].items()
                    assert "schema" in media, (where, code)
                else:
                    assert resp["content"] == PROBLEM, (where, code)
    assert doc["paths"]["/healthz"]["get"]["responses"]["503"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Healthz"}}}
    blob_get = doc["paths"]["/v1/rooms/{room_id}/blobs/{blob_id}"]["get"]
    assert set(blob_get["responses"]["200"]["content"]) == {"application/octet-stream"}
    assert blob_get["responses"]["200"]["headers"]["Content-Digest"]["required"]
    logged = doc["paths"]["/v1/rooms/{room_id}/members/{handle}"]["put"]["responses"]
    assert {"400", "409", "413"} <= set(logged)  # non-canonical, a concurrent writer, the log's body limit


async def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


async def test_an_unknown_expectation_on_an_open_route_is_a_problem(tmp_path):
    """/healthz and the other open routes answer an Expect they cannot meet
    like the signed ones: 417 in problem+json (aiohttp's own is text/plain)."""
    app = bare_app(tmp_path)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nExpect: tea\r\nConnection: close\r\n\r\n"
        status, headers, body = await _raw(server.port, request)
        assert status == 417 and headers["content-type"].startswith("application/problem+json")
        assert json.loads(body)["type"] == "https://unibus.dev/problems/expectation-failed"
        request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(request)
            await writer.drain()
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert first.startswith(b"HTTP/1.1 100 Continue")
            final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert final.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
    finally:
        await server.close()


# ----------------------------------------------------------------- the documented rules are the ones checked


def _documented(pattern: str, value: str) -> bool:
    """A JSON Schema ``pattern`` as OpenAPI 3.1 reads it (ECMA-262: ``$`` is
    the end of the input, not "before a final newline")."""
    return re.search(pattern.replace("$", r"\Z"), value) is not None


@pytest.mark.parametrize("size", [1, 2, 3, 32, SIGN_PUB_SIZE, 1216])
def test_b64_pattern_is_what_b64decode_strict_accepts(size):
    """sign_pub and enc_pub are documented by ``b64_pattern``: every one-character
    change of a canonical encoding (trailing bits, padding, alphabet) is accepted
    by the pattern exactly when the server's decoder accepts it."""
    pattern = b64_pattern(size)
    for raw in (bytes(size), bytes((i * 37 + 11) % 256 for i in range(size)), b"\xff" * size):
        canonical = b64encode(raw)
        variants = {canonical, canonical + "=", canonical[:-1], canonical + "\n", " " + canonical,
                    canonical.replace("=", "")}
        for i in {len(canonical.rstrip("=")) - 1, 0}:
            for c in "ABQgw/+-_=é9":
                variants.add(canonical[:i] + c + canonical[i + 1:])
        for value in variants:
            try:
                b64decode_strict(value, "key", size)
                accepted = True
            except KeyFormatError:
                accepted = False
            assert _documented(pattern, value) == accepted, (size, value)


async def test_the_example_of_docs_plugins_documents_its_route(tmp_path):
    """The example of docs/plugins.md, "Documenting responses", run as written."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    section = guide.split("### Documenting responses", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {"hello": hello}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)  # noqa: S102 - the repository's own docs
    app = bare_app(tmp_path)
    with running_plugin(namespace["PLUGIN_NAME"]):  # as the plugin manager runs its startup
        await namespace["startup"](app)
    doc = app[OPENAPI_DOC].document()
    op = doc["paths"]["/v1/plugins/hello/greetings/{handle}"]["get"]  # the path under the plugin's prefix
    assert op["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/HelloGreeting"}}}
    assert op["responses"]["404"]["content"] == PROBLEM and "401" in op["responses"]
    assert doc["components"]["schemas"]["HelloGreeting"] == namespace["GREETING"]
    schemathesis.openapi.from_dict(json.loads(json.dumps(doc))).validate()
