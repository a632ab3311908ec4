"""Fuzz the HTTP API with schemathesis, from a real daemon's own /openapi.json.

Each run signs every generated request (RFC 9421 with ``unibus.signing.sign_request``:
a fresh nonce, the body's Content-Digest) as one identity, and requires, for
every operation of the document (plugins' included): no 5xx; every status and
content type documented for the operation; every body and documented header
conforming to its schema; schema-valid input accepted and schema-invalid input
refused. Schemathesis's examples, coverage and fuzzing phases run; the seed is
fixed and generation deterministic, so a run sends the same cases each time.

Runs: a plain member, an admin, and a member deleted before the run (every
answer 401). The admin's run gets a daemon of its own, so that what it
deletes cannot change the others. More examples locally (docs/http-api.md, "Testing
the API")::

    UNIBUS_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest tests/core/test_api_fuzz.py -q

``tests/core/test_no_server_errors.py`` keeps sending the hand-picked
hostile values schemathesis does not generate (lone surrogates, 1e400...).

Schemathesis is driven through its engine (``schemathesis.engine.from_schema``,
what ``schemathesis run`` uses), not its pytest plugin: the plugin's lazy
schemas (``schemathesis.pytest.from_fixture``, needed for a schema served by a
daemon a fixture starts) fail on pytest 9.2 (they set ``Node._nodeid``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.engine import events, from_schema

from unibus.client.keys import Identity, generate_identity
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, http_json

#: Fuzzing-phase examples per operation (the coverage phase adds its own, a
#: fixed set derived from the schema). Raise it locally to search harder.
EXAMPLES = int(os.environ.get("UNIBUS_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("UNIBUS_FUZZ_SEED", "1414"))

#: Operations whose handler checks what no JSON Schema can say, so that a
#: schema-valid body may still be 422 (docs/http-api.md, "Testing the API").
SCHEMA_VALID_MAY_BE_422 = {
    ("POST", "/v1/members"): "each key must be a valid key of its kind (an Ed25519 point of the prime-order "
                             "subgroup, an ML-KEM key, an nkey with a valid checksum) and enc_pub of enc_suite's size",
    ("PUT", "/v1/me/bus-key"): "bus_pub must be an nkey with a valid checksum",
    ("POST", "/v1/rooms/{room_id}/keys"): "sigs must name exactly the handles of sealed, and a sealed key must "
                                          "have the size of its member's suite",
}
#: The detail of a path parameter refused for its syntax: ``no such room: room_id must ...``
#: (docs/http-api.md, "Input rules").
SYNTAX_REFUSAL = re.compile(r"\Ano such \w+: (\w+) must ")


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    """Does ``value`` fit the documented string schema of a path parameter?"""
    if not isinstance(value, str) or schema.get("type", "string") != "string":
        return False
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    return "pattern" not in schema or re.search(schema["pattern"], value) is not None


@schemathesis.check
def path_rules_as_documented(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """A path parameter refused for its syntax must break the schema /openapi.json documents for it.
    Such a refusal is a 404, which positive_data_acceptance takes for an unknown id, so without this
    check a server rule stricter than the document (a room_id the pattern allows, refused) would pass."""
    if response.status_code != 404 or "json" not in response.headers.get("content-type", [""])[0]:
        return
    match = SYNTAX_REFUSAL.match(str(response.json().get("detail", "")))
    if match is None:
        return
    name = match.group(1)
    value = (case.path_parameters or {}).get(name)
    documented = [p.get("schema", {}) for p in case.operation.definition.raw.get("parameters", [])
                  if p.get("in") == "path" and p.get("name") == name]
    assert documented, f"{name} refused for its syntax, but the operation documents no such path parameter"
    assert not _fits(value, documented[0]), (f"{name}={value!r} fits its documented schema {documented[0]} "
                                             f"and was refused for its syntax: {response.json()['detail']}")


#: Admin-only operations: a plain member never gets a 2xx from them.
ADMIN_ONLY = {("POST", "/v1/members"), ("PATCH", "/v1/members/{handle}"), ("DELETE", "/v1/members/{handle}")}


class SignedRequest(requests.auth.AuthBase):
    """Signs each request as it goes on the wire: the exact method, raw path and
    query, and body bytes that requests sends, a fresh nonce and ``created`` each time."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body.encode() if isinstance(r.body, str) else r.body
        assert body is None or isinstance(body, bytes), type(body)  # schemathesis never streams a body
        r.headers.update(sign_request(r.method or "GET", r.path_url, body, keyid=self.identity.handle,
                                      private_key=self.identity.sign_key))
        return r


def fuzz_config(*, examples: int, coverage: bool = True) -> schemathesis.Config:
    operations = [{"include-method": method, "include-path": path,
                   "checks": {"positive_data_acceptance": {
                       "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]}}}
                  for method, path in SCHEMA_VALID_MAY_BE_422]
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "workers": 1,
        "request-timeout": 15,
        # Health checks time data generation: on a loaded CI machine that is
        # noise, never a finding.
        "suppress-health-check": ["all"],
        "generation": {"max-examples": examples, "deterministic": True, "database": "none"},
        "phases": {"coverage": {"enabled": coverage}, "stateful": {"enabled": False}},
        "operations": operations,
    })


@dataclass
class Interaction:
    operation: str
    status: int
    request: str


@dataclass
class FuzzReport:
    failures: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    interactions: list[Interaction] = field(default_factory=list)
    checks: Counter = field(default_factory=Counter)

    def failed(self) -> str:
        return "\n".join(f"{key}\n    {example}" for key, example in sorted(self.failures.items()))


def describe(response: Any) -> str:
    request = response.request
    body = request.body if isinstance(request.body, (bytes, type(None))) else str(request.body).encode()
    return (f"{request.method} {request.url} body={body[:200] if body else body!r} -> {response.status_code} "
            f"{response.content[:300]!r}")


def run_fuzz(server: MembershipdProcess, identity: Identity, config: schemathesis.Config) -> FuzzReport:
    """One schemathesis run against ``server``, every request signed as ``identity``."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=config, timeout=10)
    schema.auth.set_from_requests(SignedRequest(identity))

    @schema.hook
    def filter_case(ctx: schemathesis.HookContext, case: schemathesis.Case) -> bool:
        # The run's own identity is not deleted or demoted: the rest of the run
        # would only be 401s or 403s. (An admin deleting itself is allowed once
        # another admin exists: the fuzz makes one, then does.)
        return not (case.operation.path == "/v1/members/{handle}"
                    and (case.path_parameters or {}).get("handle") == identity.handle)

    report = FuzzReport()
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            report.failures[f"{event.label}: error: {event.value!r}"[:400]] = ""
        elif isinstance(event, events.FatalError):
            report.failures[f"fatal error: {event.exception!r}"[:400]] = ""
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                report.statuses[recorder.label][interaction.response.status_code] += 1
                report.interactions.append(Interaction(recorder.label, interaction.response.status_code,
                                                       f"{interaction.request.method} {interaction.request.uri}"))
        for case_id, checks in recorder.checks.items():
            for check in checks:
                report.checks[check.name] += 1
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                key = f"{recorder.label}: {check.name}: {failure.title}: {' / '.join(str(failure.message).split(chr(10)))[:300]}"
                response = recorder.find_response(case_id=case_id)
                report.failures.setdefault(key, describe(response) if response is not None else "(no response)")
    return report


def documented_operations(server: MembershipdProcess) -> set[str]:
    """Every operation of the document but the one that serves it (schemathesis
    leaves that one out; tests/core/test_daemon.py fetches it)."""
    status, doc = http_json("GET", server.base_url + "/openapi.json")
    assert status == 200
    return {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops} - {"GET /openapi.json"}


# --------------------------------------------------------------------------- the daemons


@dataclass
class World:
    server: MembershipdProcess
    people: dict[str, Identity]


def signed(server: MembershipdProcess, who: Identity, method: str, target: str, body: bytes | None = None,
           content_type: str = "application/json") -> tuple[int, Any]:
    headers = sign_request(method, target, body, keyid=who.handle, private_key=who.sign_key)
    if body is not None:
        headers["Content-Type"] = content_type
    r = requests.request(method, server.base_url + target, data=body, headers=headers, timeout=10)
    return r.status_code, (r.json() if r.content and "json" in r.headers.get("Content-Type", "") else r.content)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, Identity]]:
    """A data dir with the admin bootstrapped (``membershipd member add``, once
    for the module), copied for each daemon; the identities of the others."""
    data_dir = tmp_path_factory.mktemp("fuzz-template") / "daemon"
    people = {handle: generate_identity(handle) for handle in ("fuzzadmin", "fuzzmember", "fuzzpeer", "fuzzgone")}
    bootstrap_member(data_dir, people["fuzzadmin"], "admin")
    return data_dir, people


@contextlib.contextmanager
def started_world(data_dir: Path, template: tuple[Path, dict[str, Identity]]) -> Iterator[World]:
    """A daemon of its own with an admin, two members and a third deleted, all
    through the API, a room of fuzzmember's with fuzzpeer in it, and a blob in
    that room: real ids for schemathesis to find in responses and reuse."""
    shutil.copytree(template[0], data_dir)
    people = template[1]
    server = MembershipdProcess(data_dir).start()
    try:
        admin, member = people["fuzzadmin"], people["fuzzmember"]
        for handle in ("fuzzmember", "fuzzpeer", "fuzzgone"):
            ident = people[handle]
            body = json.dumps({"handle": handle, "role": "member", "sign_pub": ident.sign_pub_b64,
                               "enc_pub": ident.enc_pub_b64, "bus_pub": ident.bus_pub}).encode()
            assert signed(server, admin, "POST", "/v1/members", body)[0] == 201
        assert signed(server, admin, "DELETE", "/v1/members/fuzzgone")[0] == 204
        status, room = signed(server, member, "POST", "/v1/rooms", b'{"name":"fuzz"}')
        assert status == 201, room
        room_id = room["room_id"]
        assert signed(server, member, "PUT", f"/v1/rooms/{room_id}/members/fuzzpeer")[0] == 200
        status, blob = signed(server, member, "PUT", f"/v1/rooms/{room_id}/blobs", b"unibus fuzz blob",
                              "application/octet-stream")
        assert status == 201, blob
        yield World(server, people)
    finally:
        server.stop()
    log = server.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def member_world(tmp_path_factory, template):
    """The daemon of the plain member's run and the deleted member's: neither
    can change what the other is allowed to do."""
    with started_world(tmp_path_factory.mktemp("fuzz-member") / "daemon", template) as world:
        yield world


@pytest.fixture
def admin_world(tmp_path, template):
    """The admin's run gets a daemon of its own: it deletes and demotes members."""
    with started_world(tmp_path / "daemon", template) as world:
        yield world


#: The checks each full run must have made (a schemathesis upgrade or a config
#: change that drops one fails here instead of passing quietly).
REQUIRED_CHECKS = {"not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_headers_conformance", "response_schema_conformance", "positive_data_acceptance",
                   "negative_data_rejection", "ignored_auth", "unsupported_method", "path_rules_as_documented"}


def assert_signature_accepted_everywhere(report: FuzzReport, operations: set[str]) -> None:
    """Not one run that proves nothing: every operation was sent, and each
    signed one got at least one answer past the signature check."""
    missing = REQUIRED_CHECKS - set(report.checks)
    assert not missing, f"checks that never ran: {sorted(missing)}"
    assert set(report.statuses) == operations, sorted(operations ^ set(report.statuses))
    refused = sorted(op for op, counts in report.statuses.items() if set(counts) <= {401})
    assert not refused, f"every request of these operations was 401: {refused}"


def test_fuzz_as_a_plain_member(member_world):
    world = member_world
    operations = documented_operations(world.server)
    report = run_fuzz(world.server, world.people["fuzzmember"], fuzz_config(examples=EXAMPLES))
    assert not report.failures, report.failed()
    assert_signature_accepted_everywhere(report, operations)
    # The member's own reads work, and the admin-only writes never do.
    for op in ("GET /v1/me", "GET /v1/members", "GET /v1/rooms", "GET /v1/bus", "GET /v1/log", "GET /v1/log/head"):
        assert report.statuses[op][200] > 0, (op, report.statuses[op])
    granted = [i for i in report.interactions
               if tuple(i.operation.split(" ", 1)) in ADMIN_ONLY and 200 <= i.status < 300]
    assert not granted, granted[:5]
    assert sum(sum(c.values()) for c in report.statuses.values()) > 300


def test_fuzz_as_an_admin(admin_world):
    world = admin_world
    operations = documented_operations(world.server)
    report = run_fuzz(world.server, world.people["fuzzadmin"], fuzz_config(examples=EXAMPLES))
    assert not report.failures, report.failed()
    assert_signature_accepted_everywhere(report, operations)
    assert sum(sum(c.values()) for c in report.statuses.values()) > 300


def test_fuzz_as_a_deleted_member_gets_only_401(member_world):
    """A member deleted through the API signs correctly with a key the server
    knew: every /v1/ answer is 401, whatever the input."""
    world = member_world
    report = run_fuzz(world.server, world.people["fuzzgone"], fuzz_config(examples=3, coverage=False))
    assert not report.failures, report.failed()
    v1 = [i for i in report.interactions if " /v1/" in i.operation]
    assert len(v1) > 20
    assert {i.status for i in v1} == {401}, [i for i in v1 if i.status != 401][:5]
