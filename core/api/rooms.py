"""/v1/rooms: rooms, their members and their sealed keys (docs/http-api.md)."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from ..app import STORE, add_route
from ..auth import current_member
from ..inputs import EPOCH_MAX, EPOCH_MIN, int_value, query_int
from ..problems import Problem
from ..store.base import Member, Room
from ..wire import HANDLE_RE
from .common import invalid, json_object, json_response
from .members import parse_handle

#: enc || ct + tag, by suite: X25519 enc 32, X-Wing (MLKEM768_X25519) enc 1120; key 32; tag 16.
SEALED_SIZES = {"X25519": 32 + 32 + 16, "MLKEM768_X25519": 1120 + 32 + 16}
NAME_MAX = 200

ROOM_SCHEMA = {"type": "object", "required": ["name"], "additionalProperties": False,
               "properties": {"name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX}}}
KEYS_SCHEMA = {
    "type": "object",
    "required": ["epoch", "sealed"],
    "additionalProperties": False,
    "properties": {
        "epoch": {"type": "integer", "minimum": EPOCH_MIN, "maximum": EPOCH_MAX},
        "sealed": {"type": "object", "additionalProperties": {"type": "string", "contentEncoding": "base64"},
                   "description": "handle -> base64(enc || ct): the new room key sealed to each current member"},
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
    body = await json_object(request, required={"name"})
    name = body["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
        raise invalid("name", f"must be 1-{NAME_MAX} printable characters")
    room = await request.app[STORE].create_room(name, current_member(request).handle)
    return json_response(room.as_json(), status=201)


async def list_rooms(request: web.Request) -> web.Response:
    me = current_member(request)
    rooms = await request.app[STORE].list_rooms(None if me.is_admin else me.handle)
    return json_response({"rooms": [r.as_json() for r in rooms]})


async def get_room(request: web.Request) -> web.Response:
    room = await load_room(request)
    require_member_or_admin(room, current_member(request))
    return json_response(room.as_json())


async def delete_room(request: web.Request) -> web.Response:
    room = await load_room(request)
    require_owner_or_admin(room, current_member(request))
    await request.app[STORE].delete_room(room.room_id)
    return web.Response(status=204)


async def put_room_member(request: web.Request) -> web.Response:
    room = await load_room(request)
    require_owner_or_admin(room, current_member(request))
    handle = parse_handle(request.match_info["handle"])
    room = await request.app[STORE].add_room_member(room.room_id, handle)
    return json_response(room.as_json())


async def delete_room_member(request: web.Request) -> web.Response:
    room = await load_room(request)
    me = current_member(request)
    handle = request.match_info["handle"]
    if handle != me.handle:
        require_owner_or_admin(room, me)
    await request.app[STORE].remove_room_member(room.room_id, handle)
    return web.Response(status=204)


async def post_keys(request: web.Request) -> web.Response:
    room = await load_room(request)
    require_owner_or_admin(room, current_member(request))
    body = await json_object(request, required={"epoch", "sealed"})
    epoch, sealed_in = int_value(body["epoch"], "epoch", EPOCH_MIN, EPOCH_MAX), body["sealed"]
    if not isinstance(sealed_in, dict) or not sealed_in:
        raise invalid("sealed", "must be a non-empty object of handle -> base64")
    suites = {mb.handle: mb.enc_suite for mb in room.members}
    sealed: dict[str, bytes] = {}
    for handle, value in sealed_in.items():
        if HANDLE_RE.match(handle) is None:
            raise invalid("sealed", "every key must be a handle (^[a-z][a-z0-9_-]{0,31}$)")
        if not isinstance(value, str):
            raise invalid(f"sealed.{handle}", "must be a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"sealed.{handle}", "is not valid base64") from None
        want = SEALED_SIZES.get(suites.get(handle, ""))
        if want is not None and len(raw) != want:
            raise invalid(f"sealed.{handle}", f"must be {want} bytes for {suites[handle]}, got {len(raw)}")
        sealed[handle] = raw
    room = await request.app[STORE].put_keys(room.room_id, epoch, sealed)
    return json_response(room.as_json(), status=201)


async def get_my_key(request: web.Request) -> web.Response:
    room_id = request.match_info["room_id"]
    me = current_member(request)
    epoch = query_int(request.query, "epoch", EPOCH_MIN, EPOCH_MAX)
    if await request.app[STORE].get_room(room_id) is None:
        raise Problem(404, f"no room {room_id!r}", kind="not-found")
    found = await request.app[STORE].get_sealed_key(room_id, me.handle, epoch)
    if found is None:
        which = f"epoch {epoch}" if epoch is not None else "any epoch"
        raise Problem(404, f"no key of {which} was sealed to {me.handle!r} in room {room_id!r}", kind="not-found")
    return json_response({"room_id": room_id, "epoch": found[0], "sealed": base64.b64encode(found[1]).decode()})


def register(app: web.Application) -> None:
    r = {401: "missing or invalid signature", 503: "replay protection unavailable"}
    room = "/v1/rooms/{room_id}"
    add_route(app, "POST", "/v1/rooms", create_room, summary="Create a room; the caller owns it",
              request_schema=ROOM_SCHEMA, responses={201: "the room", 400: "malformed JSON", 422: "invalid field", **r},
              tags=["rooms"])
    add_route(app, "GET", "/v1/rooms", list_rooms, summary="Rooms the caller is in (admins: all)",
              responses={200: "{rooms: [...]}", **r}, tags=["rooms"])
    add_route(app, "GET", room, get_room, summary="A room with its members' enc_pub/enc_suite",
              responses={200: "the room", 403: "not a member", 404: "no such room", **r}, tags=["rooms"])
    add_route(app, "DELETE", room, delete_room, summary="Delete a room (owner, admin)",
              responses={204: "deleted", 403: "not owner or admin", 404: "no such room", **r}, tags=["rooms"])
    add_route(app, "PUT", room + "/members/{handle}", put_room_member,
              summary="Add a member to the room; the room becomes rekey_required (owner, admin)",
              responses={200: "the room", 403: "not owner or admin", 404: "no such room or member",
                         422: "invalid handle", **r}, tags=["rooms"])
    add_route(app, "DELETE", room + "/members/{handle}", delete_room_member,
              summary="Remove a member (owner, admin, the member itself); rekey_required; bus access cut",
              responses={204: "removed", 403: "not allowed", 404: "no such room or not a member", **r},
              tags=["rooms"])
    add_route(app, "POST", room + "/keys", post_keys,
              summary="Upload the next epoch's room key sealed to exactly the current members (owner, admin)",
              request_schema=KEYS_SCHEMA,
              responses={201: "the room at its new epoch", 400: "malformed JSON", 403: "not owner or admin",
                         404: "no such room", 409: "wrong epoch, or missing/extra handles", 422: "invalid field", **r},
              tags=["keys"])
    add_route(app, "GET", room + "/keys/me", get_my_key,
              summary="The room key sealed to the caller (latest epoch, or ?epoch=N)",
              responses={200: "{room_id, epoch, sealed}", 404: "no key sealed to the caller", 422: "bad epoch", **r},
              query={"epoch": {"type": "integer", "minimum": EPOCH_MIN, "maximum": EPOCH_MAX}}, tags=["keys"])
