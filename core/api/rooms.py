"""/v1/rooms: rooms, their members and their sealed keys (docs/http-api.md)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from ..app import CHANGE_LIMIT, STORE, add_route, add_schema
from ..auth import require_member
from ..changelimit import CHANGE_BURST, CHANGE_INTERVAL
from ..inputs import EPOCH_MAX, EPOCH_MIN, MAX_SAFE_INT, ROOM_ID_PATTERN, int_value, query_int
from ..problems import Problem
from ..store.base import Conflict, Forbidden, LogRejected, Member, NotFound, Room, check_new_epoch
from ..wire import HANDLE_PATTERN, HANDLE_RE
from .common import LOGGED_RESPONSES, invalid, json_object, json_response, log_record
from .members import ENC_PUB_PROPERTY, ENC_SUITE_PROPERTY, parse_handle

#: enc || ct + tag, by suite: X25519 enc 32, X-Wing (MLKEM768_X25519) enc 1120; key 32; tag 16.
SEALED_SIZES = {"X25519": 32 + 32 + 16, "MLKEM768_X25519": 1120 + 32 + 16}
NAME_MAX = 200
#: A key package signature: Ed25519, 64 bytes (docs/formats.md).
SIG_SIZE = 64
LOG_HASH_RE = re.compile(r"\A[0-9a-f]{64}\Z")
LOG_HEAD_SCHEMA = {
    "type": "object", "required": ["seq", "hash"], "additionalProperties": False,
    "description": "the membership log head {seq, hash} the sealer verified (GET /v1/log/head)",
    "properties": {"seq": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT},
                   "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
}

#: A room name: 1-200 characters, none of them a control character (U+0000-U+001F),
#: not all of them white space. The request schema and the handler use this one rule.
NAME_PATTERN = r"^[^\x00-\x1f]*[^\x00-\x1f\s][^\x00-\x1f]*$"
NAME_RE = re.compile(NAME_PATTERN.replace("^", "\\A", 1)[:-1] + "\\Z")
ROOM_SCHEMA = {"type": "object", "required": ["name"], "additionalProperties": False,
               "properties": {"name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX,
                                       "pattern": NAME_PATTERN}}}
#: Standard base64 as ``base64.b64decode(..., validate=True)`` takes it (sealed keys and sigs).
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
HANDLE_NAMES = {"type": "string", "pattern": HANDLE_PATTERN}
KEYS_SCHEMA = {
    "type": "object",
    "required": ["epoch", "sealed", "sigs", "log_head"],
    "additionalProperties": False,
    "properties": {
        "epoch": {"type": "integer", "minimum": EPOCH_MIN, "maximum": EPOCH_MAX},
        "sealed": {"type": "object", "minProperties": 1, "propertyNames": HANDLE_NAMES,
                   "additionalProperties": {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN},
                   "description": "handle -> base64(enc || ct): the new room key sealed to each current member "
                                  "(80 bytes for X25519, 1168 for MLKEM768_X25519)"},
        "sigs": {"type": "object", "propertyNames": HANDLE_NAMES,
                 "additionalProperties": {"type": "string", "contentEncoding": "base64",
                                          "pattern": "^[A-Za-z0-9+/]{86}==$"},
                 "description": "handle -> base64 of the sealer's 64-byte Ed25519 signature of that member's key "
                                "package (docs/formats.md); exactly the handles of sealed"},
        "log_head": LOG_HEAD_SCHEMA,
    },
}
#: A room record (docs/http-api.md, "Room").
ROOM_RECORD = {
    "type": "object",
    "required": ["room_id", "name", "subject", "owner", "epoch", "rekey_required", "members", "created_at"],
    "additionalProperties": False,
    "properties": {
        "room_id": {"type": "string", "pattern": ROOM_ID_PATTERN},
        "name": {"type": "string"},
        "subject": {"type": "string", "pattern": "^unibus\\.room\\.[a-z0-9]{1,40}$"},
        "owner": {"type": ["string", "null"], "pattern": HANDLE_PATTERN,
                  "description": "null once the member who created the room was deleted"},
        "epoch": {"type": "integer", "minimum": 0, "maximum": EPOCH_MAX},
        "rekey_required": {"type": "boolean"},
        "members": {"type": "array", "items": {
            "type": "object", "required": ["handle", "enc_pub", "enc_suite"], "additionalProperties": False,
            "properties": {"handle": HANDLE_NAMES, "enc_pub": ENC_PUB_PROPERTY, "enc_suite": ENC_SUITE_PROPERTY}}},
        "created_at": {"type": "string", "format": "date-time"},
    },
}
#: ``GET /v1/rooms/{room_id}/keys/me``: the key package sealed to the caller.
KEY_PACKAGE_RECORD = {
    "type": "object",
    "required": ["epoch", "sealed", "sig", "sealer", "log_head"],
    "additionalProperties": False,
    "properties": {
        "epoch": {"type": "integer", "minimum": EPOCH_MIN, "maximum": EPOCH_MAX},
        "sealed": {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN},
        "sig": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9+/]{86}==$",
                "description": "null for a key sealed before 0.12 (clients refuse it)"},
        "sealer": {"type": ["string", "null"], "pattern": HANDLE_PATTERN},
        "log_head": {"oneOf": [{"type": "null"}, LOG_HEAD_SCHEMA]},
    },
}


async def load_room(request: web.Request) -> Room:
    room = await request.app[STORE].get_room(request.match_info["room_id"])
    if room is None:
        raise Problem(404, f"no room {request.match_info['room_id']!r}", kind="not-found")
    return room


def is_owner(room: Room, me: Member) -> bool:
    """The owner's rights last as long as its membership."""
    return room.owner == me.handle and me.handle in room.handles


def require_member_or_admin(room: Room, me: Member) -> None:
    if not (me.is_admin or me.handle in room.handles):
        raise Problem(403, "only the room's members and admins may do this", kind="forbidden")


def require_owner_or_admin(room: Room, me: Member) -> None:
    if not (me.is_admin or is_owner(room, me)):
        raise Problem(403, "only the room's owner and admins may do this", kind="forbidden")


async def create_room(request: web.Request) -> web.Response:
    logged = log_record(request)
    body = await json_object(request, required={"name"})
    name = body["name"]
    if not isinstance(name, str) or len(name) > NAME_MAX or NAME_RE.match(name) is None:
        raise invalid("name", f"must be 1-{NAME_MAX} printable characters")
    me = require_member(request)
    limit = request.app[CHANGE_LIMIT]
    async with limit.adding(me.handle):  # one at a time, each checked on the count the last one made
        limit.check_rooms(me.handle)  # the owner is in its room: 409 past its bound
        room = await request.app[STORE].create_room(name, me.handle, logged=logged)
    return json_response(room.as_json(), status=201)


async def list_rooms(request: web.Request) -> web.Response:
    me = require_member(request)
    rooms = await request.app[STORE].list_rooms(None if me.is_admin else me.handle)
    return json_response({"rooms": [r.as_json() for r in rooms]})


async def get_room(request: web.Request) -> web.Response:
    room = await load_room(request)
    require_member_or_admin(room, require_member(request))
    return json_response(room.as_json())


async def charged(request: web.Request, me: Member, targets: Iterable[str],
                  change: Callable[[], Awaitable[Any]]) -> Any:
    """Make ``change``, a change of ``targets``' rooms by ``me``, once it is charged to each of them
    that is on the bus (429 past ``me``'s budget for one: unibus.changelimit); admins are not
    limited. Every such change is charged, whatever it turns out to change: that is known
    only as it is written. One the store refuses before writing anything gives its charges back."""
    if me.is_admin:
        return await change()
    limit = request.app[CHANGE_LIMIT]
    tokens = limit.take(me.handle, targets)
    try:
        return await change()
    except (NotFound, Conflict, Forbidden, LogRejected):
        limit.give_back(me.handle, tokens)  # refused before anything was written: nothing changed
        raise


async def delete_room(request: web.Request) -> web.Response:
    logged = log_record(request)
    room = await load_room(request)
    me = require_member(request)
    require_owner_or_admin(room, me)
    await charged(request, me, room.handles, lambda: request.app[STORE].delete_room(room.room_id, logged=logged))
    return web.Response(status=204)


async def put_room_member(request: web.Request) -> web.Response:
    logged = log_record(request)
    room = await load_room(request)
    me = require_member(request)
    require_owner_or_admin(room, me)
    handle = parse_handle(request.match_info["handle"])
    limit = request.app[CHANGE_LIMIT]
    # Whether the member is in the room is read again under the pair's lock, which its removals
    # hold too, so an add read as changing nothing cannot turn into one. One that adds goes under
    # the member's lock too, from the bounds' checks to the write: checked on a count the write
    # then changes, concurrent adds passed them together (a red team: 159 rooms of one owner's,
    # where the share is 100).
    async with limit.changing(room.room_id, handle):
        if handle in room.handles and limit.max_rooms is not None:
            room = await load_room(request)
        if handle in room.handles:  # nothing to add: no bound to check
            room = await charged(request, me, [handle],
                                 lambda: request.app[STORE].add_room_member(room.room_id, handle, logged=logged))
            return json_response(room.as_json())
        async with limit.adding(handle):
            limit.check_rooms(handle)  # 409 past the member's bound on rooms, whoever adds it, ...
            if not me.is_admin and limit.share_reached(handle):  # ... or past its share of them for this owner
                rooms = await request.app[STORE].list_rooms(handle)
                limit.check_share(me.handle, handle, sum(1 for r in rooms if r.owner == me.handle))
            room = await charged(request, me, [handle],
                                 lambda: request.app[STORE].add_room_member(room.room_id, handle, logged=logged))
    return json_response(room.as_json())


async def delete_room_member(request: web.Request) -> web.Response:
    logged = log_record(request)
    room = await load_room(request)
    me = require_member(request)
    handle = request.match_info["handle"]
    if handle != me.handle:
        require_owner_or_admin(room, me)
    # a member leaving a room is not charged (take never charges the author itself); under the
    # pair's lock, under which an add reads whether the member is in the room (put_room_member)
    async with request.app[CHANGE_LIMIT].changing(room.room_id, handle):
        await charged(request, me, [handle],
                      lambda: request.app[STORE].remove_room_member(room.room_id, handle, logged=logged))
    return web.Response(status=204)


def base64_value(value: Any, field: str) -> bytes:
    """The bytes of a base64 string (422 naming ``field`` otherwise)."""
    if not isinstance(value, str):
        raise invalid(field, "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64") from None


def sealed_handles(value: Any) -> dict[str, Any]:
    """``sealed`` as far as the handles it names: a non-empty object whose keys are handles (422 otherwise)."""
    if not isinstance(value, dict) or not value:
        raise invalid("sealed", "must be a non-empty object of handle -> base64")
    if any(HANDLE_RE.match(handle) is None for handle in value):
        raise invalid("sealed", "every key must be a handle (^[a-z][a-z0-9_-]{0,31}$)")
    return value


def parse_sealed(value: Any, suites: dict[str, str]) -> dict[str, bytes]:
    """``sealed``: a non-empty object of handle -> base64 of a sealed key, of the size the
    member's ``enc_suite`` (``suites``) seals to (422 otherwise)."""
    sealed: dict[str, bytes] = {}
    for handle, item in sealed_handles(value).items():
        raw = base64_value(item, f"sealed.{handle}")
        want = SEALED_SIZES.get(suites.get(handle, ""))
        if want is not None and len(raw) != want:
            raise invalid(f"sealed.{handle}", f"must be {want} bytes for {suites[handle]}, got {len(raw)}")
        sealed[handle] = raw
    return sealed


def parse_sigs(value: Any, handles: set[str]) -> dict[str, bytes]:
    """``sigs``: exactly the handles of ``sealed``, each the base64 of a 64-byte signature (422 otherwise)."""
    if not isinstance(value, dict):
        raise invalid("sigs", "must be an object of handle -> base64 of a 64-byte signature")
    if value.keys() != handles:
        missing, extra = sorted(handles - value.keys()), sorted(value.keys() - handles)
        raise Problem(422, "sigs: must name exactly the handles of sealed", kind="invalid-field",
                      missing=missing[:100], extra=[h[:64] for h in extra[:100]])
    sigs: dict[str, bytes] = {}
    for handle, sig in value.items():
        raw = base64_value(sig, f"sigs.{handle}")
        if len(raw) != SIG_SIZE:
            raise invalid(f"sigs.{handle}", f"must be {SIG_SIZE} bytes (an Ed25519 signature), got {len(raw)}")
        sigs[handle] = raw
    return sigs


def parse_log_head(value: Any) -> dict[str, Any]:
    """``log_head``: ``{seq, hash}`` with seq an integer from 0 and hash 64 lowercase hex digits (422 otherwise)."""
    if not isinstance(value, dict) or value.keys() != {"seq", "hash"}:
        raise invalid("log_head", "must be an object with exactly seq and hash (GET /v1/log/head)")
    seq = int_value(value["seq"], "log_head.seq", 0, MAX_SAFE_INT)
    digest = value["hash"]
    if not isinstance(digest, str) or LOG_HASH_RE.match(digest) is None:
        raise invalid("log_head.hash", "must be 64 lowercase hex digits")
    return {"seq": seq, "hash": digest}


async def post_keys(request: web.Request) -> web.Response:
    logged = log_record(request)
    room = await load_room(request)
    me = require_member(request)
    require_owner_or_admin(room, me)
    body = await json_object(request, required={"epoch", "sealed", "sigs", "log_head"})
    epoch = int_value(body["epoch"], "epoch", EPOCH_MIN, EPOCH_MAX)
    # The rekey's own rules first, as docs/http-api.md orders them: the epoch, then exactly the room's
    # members (409 naming the missing and extra), and only then the values (422). An audit: a package
    # naming too few members with placeholder values was answered 422 for a value's size. The store
    # checks both again with the write, on the room as it is then.
    check_new_epoch(room.epoch, epoch, set(room.handles), sealed_handles(body["sealed"]))
    sealed = parse_sealed(body["sealed"], {mb.handle: mb.enc_suite for mb in room.members})
    sigs = parse_sigs(body["sigs"], set(sealed))
    log_head = parse_log_head(body["log_head"])
    # The head the sealer verified must be in this server's log: the log only
    # grows, so an entry there now is there for good.
    if await request.app[STORE].log_hash_at(log_head["seq"]) != log_head["hash"]:
        raise Problem(409, f"log_head: the membership log has no entry {log_head['seq']} with this hash; fetch "
                           "GET /v1/log/head (and verify the log) again", kind="unknown-log-head")
    room = await request.app[STORE].put_keys(room.room_id, epoch, sealed, sigs=sigs, sealer=me.handle,
                                             log_head=log_head, logged=logged)
    return json_response(room.as_json(), status=201)


async def get_my_key(request: web.Request) -> web.Response:
    room_id = request.match_info["room_id"]
    me = require_member(request)
    epoch = query_int(request.query, "epoch", EPOCH_MIN, EPOCH_MAX)
    room = await request.app[STORE].get_room(room_id)
    if room is None:
        raise Problem(404, f"no room {room_id!r}", kind="not-found")
    found = await request.app[STORE].get_key_package(room_id, me.handle, epoch)
    if found is None:
        if me.handle not in room.handles and (
                epoch is None or await request.app[STORE].get_key_package(room_id, me.handle, None) is None):
            # Neither a member nor a former one (no key of any epoch): a caller without the right,
            # as GET /v1/rooms/{room_id} answers it (an audit against docs/http-api.md).
            raise Problem(403, "only the room's current and former members have keys in it", kind="forbidden")
        which = f"epoch {epoch}" if epoch is not None else "any epoch"
        raise Problem(404, f"no key of {which} was sealed to {me.handle!r} in room {room_id!r}", kind="not-found")
    # sig, sealer and log_head are null for keys sealed before 0.12 (docs/http-api.md).
    return json_response(found.as_json())


def register(app: web.Application) -> None:
    room_ref = add_schema(app, "Room", ROOM_RECORD)
    rooms = {"type": "object", "required": ["rooms"], "additionalProperties": False,
             "properties": {"rooms": {"type": "array", "items": room_ref}}}
    key_package = add_schema(app, "KeyPackage", KEY_PACKAGE_RECORD)
    room = "/v1/rooms/{room_id}"
    too_often = ("too-many-requests: the member already has its share of the control plane's connections serving "
                 "requests (let one finish), or, not being an admin, it changed the rooms of a member on the bus "
                 f"{CHANGE_BURST} times in a row and may change them once every {CHANGE_INTERVAL:g} s after that "
                 "(a target member; try again after Retry-After)")
    too_many_rooms = ("too-many-rooms: with bus authorization, the member is in as many rooms as a member may be "
                      "in (a target and a max_rooms member); or the membership log or the record moved during "
                      "this change (a concurrent writer); try again")
    add_route(app, "POST", "/v1/rooms", create_room, summary="Create a room; the caller owns it",
              request_schema=ROOM_SCHEMA,
              responses={201: ("the room", room_ref), **LOGGED_RESPONSES, 409: too_many_rooms,
                         403: "the caller was deleted while the request was on its way", 422: "invalid field"},
              tags=["rooms"])
    add_route(app, "GET", "/v1/rooms", list_rooms, summary="Rooms the caller is in (admins: all)",
              responses={200: ("{rooms: [...]}", rooms)}, tags=["rooms"])
    add_route(app, "GET", room, get_room, summary="A room with its members' enc_pub/enc_suite",
              responses={200: ("the room", room_ref), 403: "not a member", 404: "no such room"}, tags=["rooms"])
    add_route(app, "DELETE", room, delete_room, summary="Delete a room (owner, admin)",
              responses={204: "deleted", 403: "not owner or admin", 404: "no such room", **LOGGED_RESPONSES,
                         429: too_often},
              tags=["rooms"])
    add_route(app, "PUT", room + "/members/{handle}", put_room_member,
              summary="Add a member to the room; the room becomes rekey_required (owner, admin)",
              responses={200: ("the room", room_ref), 403: "not owner or admin", 404: "no such room or member",
                         **LOGGED_RESPONSES, 409: too_many_rooms, 429: too_often},
              tags=["rooms"])
    add_route(app, "DELETE", room + "/members/{handle}", delete_room_member,
              summary="Remove a member (owner, admin, the member itself); rekey_required; bus access cut",
              responses={204: "removed", 403: "not allowed", 404: "no such room or not a member",
                         **LOGGED_RESPONSES, 429: too_often}, tags=["rooms"])
    add_route(app, "POST", room + "/keys", post_keys,
              summary="Upload the next epoch's room key sealed to exactly the current members (owner, admin)",
              request_schema=KEYS_SCHEMA,
              responses={201: ("the room at its new epoch", room_ref), 403: "not owner or admin",
                         404: "no such room", **LOGGED_RESPONSES,
                         409: "wrong epoch, missing/extra handles, a log_head the log does not have, or a "
                              "concurrent change",
                         422: "invalid field (sigs must name exactly the handles of sealed, 64 bytes each; a "
                              "sealed key of the wrong size for its member's suite)"},
              tags=["keys"])
    add_route(app, "GET", room + "/keys/me", get_my_key,
              summary="The room key sealed to the caller (latest epoch, or ?epoch=N)",
              responses={200: ("{epoch, sealed, sig, sealer, log_head}", key_package),
                         403: "the caller was never in the room (no key of any epoch)",
                         404: "no such room, or no key sealed to the caller",
                         422: "bad epoch"},
              query={"epoch": {"type": "integer", "minimum": EPOCH_MIN, "maximum": EPOCH_MAX}}, tags=["keys"])
