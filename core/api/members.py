"""/v1/me and /v1/members: who is on the bus (admin-only writes)."""

from __future__ import annotations

import json

from aiohttp import web

from ..app import STORE, add_route, add_schema
from ..auth import require_member
from ..wire import (
    DEFAULT_ENC_SUITE,
    ENC_PUB_SIZES,
    HANDLE_PATTERN,
    SIGN_PUB_SIZE,
    HandleError,
    KeyFormatError,
    b64_pattern,
    nkey_from_sign_pub,
    validate_bus_pub,
    validate_enc_pub,
    validate_enc_suite,
    validate_handle,
    validate_sign_pub,
)
from ..problems import Problem
from ..store.base import ROLES, Member, NotFound
from ..store.sqlite import new_member
from .common import LOGGED_RESPONSES, invalid, json_object, json_response, log_record, require_admin, require_str

BUS_PUB_PATTERN = "^U[A-Z2-7]{55}$"
BUS_PUB_PROPERTY = {
    "type": "string", "pattern": BUS_PUB_PATTERN,
    "description": "the member's bus key: a NATS user public nkey (U..., 56 characters), never the nkey of a "
                   "sign_pub (docs/bus-auth.md)",
}
SIGN_PUB_PROPERTY = {"type": "string", "contentEncoding": "base64", "pattern": b64_pattern(SIGN_PUB_SIZE),
                     "description": "raw Ed25519 public key (32 bytes), canonical base64"}
ENC_PUB_PROPERTY = {
    "type": "string", "contentEncoding": "base64",
    # Either size: which one enc_suite asks for is checked by the handler (422).
    "pattern": "|".join(f"(?:{b64_pattern(n)})" for n in sorted(set(ENC_PUB_SIZES.values()))),
    "description": "raw HPKE public key of enc_suite, canonical base64: 32 bytes for X25519, 1216 for "
                   "MLKEM768_X25519",
}
ENC_SUITE_PROPERTY = {"type": "string", "enum": ["X25519", "MLKEM768_X25519"]}
ROLE_PROPERTY = {"type": "string", "enum": list(ROLES)}
#: What a new member's body and a member record both start with.
_MEMBER_KEYS = {
    "handle": {"type": "string", "pattern": HANDLE_PATTERN},
    "role": ROLE_PROPERTY,
    "sign_pub": SIGN_PUB_PROPERTY,
    "enc_pub": ENC_PUB_PROPERTY,
}
MEMBER_SCHEMA = {
    "type": "object",
    "required": ["handle", "role", "sign_pub", "enc_pub", "bus_pub"],
    "additionalProperties": False,
    "properties": {
        **_MEMBER_KEYS,
        "enc_suite": {**ENC_SUITE_PROPERTY, "default": "X25519"},
        "bus_pub": BUS_PUB_PROPERTY,
    },
}
#: A member record, as every route that answers one sends it (docs/http-api.md, "Member").
MEMBER_RECORD = {
    "type": "object",
    "required": ["handle", "role", "sign_pub", "enc_pub", "enc_suite", "bus_pub", "created_at"],
    "additionalProperties": False,
    "properties": {
        **_MEMBER_KEYS,
        "enc_suite": ENC_SUITE_PROPERTY,
        "bus_pub": {"type": ["string", "null"], "pattern": BUS_PUB_PATTERN,
                    "description": "null for a member upgraded from 0.11 that has no bus key yet"},
        "created_at": {"type": "string", "format": "date-time"},
    },
}
BUS_KEY_SCHEMA = {"type": "object", "required": ["bus_pub"], "additionalProperties": False,
                  "properties": {"bus_pub": BUS_PUB_PROPERTY}}
PATCH_SCHEMA = {"type": "object", "required": ["role"], "additionalProperties": False,
                "properties": {"role": ROLE_PROPERTY}}


def parse_handle(value: str, field: str = "handle") -> str:
    try:
        return validate_handle(value)
    except HandleError as e:
        raise invalid(field, str(e)) from None


def parse_role(value: object) -> str:
    if value not in ROLES:
        raise invalid("role", f"must be one of {', '.join(ROLES)}")
    return value  # type: ignore[return-value]


#: The encoded body of ``GET /v1/me`` by member record: ``id(member) -> (member, body)``.
#: The authentication cache (unibus.auth.MemberDirectory) keeps the same record object
#: until the member changes, so the body is encoded once, not on every request:
#: that saved about a tenth of a signed ``GET /v1/me`` (docs/benchmarks.md,
#: "Signed requests"). A changed member is a new object: a new entry. Bounded.
_ME_BODIES: dict[int, tuple[Member, bytes]] = {}
_ME_BODIES_MAX = 256


def me_body(member: Member) -> bytes:
    """``json_response(member.as_json())``'s body, encoded once per record object."""
    found = _ME_BODIES.get(id(member))
    if found is not None and found[0] is member:
        return found[1]
    body = json.dumps(member.as_json(), separators=(",", ":")).encode()
    if len(_ME_BODIES) >= _ME_BODIES_MAX:
        _ME_BODIES.clear()
    _ME_BODIES[id(member)] = (member, body)
    return body


async def get_me(request: web.Request) -> web.Response:
    return web.Response(body=me_body(require_member(request)), content_type="application/json", charset="utf-8")


async def list_members(request: web.Request) -> web.Response:
    members = await request.app[STORE].list_members()
    return json_response({"members": [mb.as_json() for mb in members]})


async def get_member(request: web.Request) -> web.Response:
    member = await request.app[STORE].get_member(request.match_info["handle"])
    if member is None:
        raise Problem(404, f"no member {request.match_info['handle']!r}", kind="not-found")
    return json_response(member.as_json())


def parse_bus_pub(body: dict, sign_pub: bytes) -> str:
    """A valid bus key that is not the nkey of the member's own ``sign_pub`` (422 otherwise)."""
    try:
        bus_pub = validate_bus_pub(require_str(body, "bus_pub"))
    except KeyFormatError as e:
        raise Problem(422, str(e), kind="invalid-field") from None
    if bus_pub == nkey_from_sign_pub(sign_pub):
        # Whatever key logs in to NATS signs nonces the server chooses: a signing
        # key must never be one (docs/bus-auth.md#bus-keys).
        raise invalid("bus_pub", "is the nkey of this member's sign_pub; the bus key must be a separate key "
                                 "(unibus keygen makes one)")
    return bus_pub


async def add_member(request: web.Request) -> web.Response:
    logged = log_record(request)
    require_admin(request)
    body = await json_object(request, required={"handle", "role", "sign_pub", "enc_pub", "bus_pub"},
                             optional={"enc_suite"})
    handle = parse_handle(require_str(body, "handle"))
    role = parse_role(body["role"])
    try:
        suite = validate_enc_suite(body.get("enc_suite", DEFAULT_ENC_SUITE))
        sign_pub = validate_sign_pub(require_str(body, "sign_pub"))
        enc_pub = validate_enc_pub(require_str(body, "enc_pub"), suite)
    except KeyFormatError as e:
        raise Problem(422, str(e), kind="invalid-field") from None
    bus_pub = parse_bus_pub(body, sign_pub)
    member = await request.app[STORE].add_member(new_member(handle, role, sign_pub, enc_pub, suite, bus_pub),
                                                 logged=logged)
    return json_response(member.as_json(), status=201)


async def put_my_bus_key(request: web.Request) -> web.Response:
    """Set or rotate the caller's bus key. The store's change regenerates bus
    authorization and waits for nats-server's reload, which closes every
    connection under the old key: they are gone when the 200 leaves."""
    logged = log_record(request)
    me = require_member(request)
    body = await json_object(request, required={"bus_pub"})
    bus_pub = parse_bus_pub(body, me.sign_pub)
    member = await request.app[STORE].set_bus_key(me.handle, bus_pub, logged=logged)
    return json_response(member.as_json())


async def patch_member(request: web.Request) -> web.Response:
    logged = log_record(request)
    require_admin(request)
    body = await json_object(request, required={"role"})
    member = await request.app[STORE].set_role(request.match_info["handle"], parse_role(body["role"]), logged=logged)
    return json_response(member.as_json())


async def delete_member(request: web.Request) -> web.Response:
    logged = log_record(request)
    require_admin(request)
    await request.app[STORE].delete_member(request.match_info["handle"], logged=logged)
    return web.Response(status=204)


def register(app: web.Application) -> None:
    member = add_schema(app, "Member", MEMBER_RECORD)
    members = {"type": "object", "required": ["members"], "additionalProperties": False,
               "properties": {"members": {"type": "array", "items": member}}}
    add_route(app, "GET", "/v1/me", get_me, summary="The caller's own member record",
              responses={200: ("the record", member)}, tags=["members"])
    add_route(app, "GET", "/v1/members", list_members, summary="All members (public keys included)",
              responses={200: ("{members: [...]}", members)}, tags=["members"])
    add_route(app, "POST", "/v1/members", add_member, summary="Add a member (admin)", request_schema=MEMBER_SCHEMA,
              responses={201: ("the new member", member), 403: "not an admin",
                         **LOGGED_RESPONSES,
                         400: "malformed JSON, or a non-canonical path or a query string (non-canonical-request)",
                         409: "handle or key exists, or bus_pub is the nkey of a member's sign_pub (or the "
                              "reverse); or a concurrent change (try again)",
                         422: "invalid field (a key that is not a valid key of its kind included), or bus_pub is "
                              "the nkey of the new member's own sign_pub"},
              tags=["members"])
    add_route(app, "PUT", "/v1/me/bus-key", put_my_bus_key,
              summary="Set or rotate the caller's bus key; its bus connections under the old key are closed "
                      "before the answer", request_schema=BUS_KEY_SCHEMA,
              responses={200: ("the caller's member record", member), **LOGGED_RESPONSES,
                         403: "the caller was deleted while the request was on its way",
                         409: "another member has this key, or it is the nkey of a member's sign_pub; or a "
                              "concurrent change (try again)",
                         422: "invalid bus_pub (not a valid user nkey), or the nkey of the caller's own sign_pub"},
              tags=["members"])
    add_route(app, "GET", "/v1/members/{handle}", get_member, summary="One member",
              responses={200: ("the record", member), 404: "no such member"}, tags=["members"])
    add_route(app, "PATCH", "/v1/members/{handle}", patch_member, summary="Change a member's role (admin)",
              request_schema=PATCH_SCHEMA,
              responses={200: ("the record", member), 403: "not an admin", 404: "no such member",
                         **LOGGED_RESPONSES,
                         409: "would remove the last admin; or a concurrent change (try again)",
                         422: "invalid field"}, tags=["members"])
    add_route(app, "DELETE", "/v1/members/{handle}", delete_member,
              summary="Delete a member: removed from every room, bus access revoked (admin)",
              responses={204: "deleted", 403: "not an admin", 404: "no such member", **LOGGED_RESPONSES,
                         409: "the last admin; or a concurrent change (try again)"}, tags=["members"])


__all__ = ["register", "NotFound"]
