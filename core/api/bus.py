"""/v1/bus: how a member reaches the data plane."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from aiohttp import web

from ..app import SETTINGS, STORE, add_route
from ..auth import require_member
from ..problems import Problem
from .common import json_response
from .members import BUS_PUB_PATTERN

#: ``GET /v1/bus`` (docs/http-api.md, "GET /v1/bus").
BUS_SCHEMA = {
    "type": "object", "required": ["servers", "user_nkey", "inbox_prefix", "rooms"], "additionalProperties": False,
    "properties": {
        "servers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "user_nkey": {"type": "string", "pattern": BUS_PUB_PATTERN},
        "inbox_prefix": {"type": "string", "pattern": "^_INBOX_[a-z][a-z0-9_-]{0,31}$"},
        "rooms": {"type": "object", "propertyNames": {"pattern": "^[a-z0-9]{1,40}$"},
                  "additionalProperties": {"type": "string", "pattern": "^unibus\\.room\\.[a-z0-9]{1,40}\\.>$"}},
    },
}


def nats_servers(request: web.Request) -> list[str]:
    """The NATS URL(s) a member dials: a wildcard listener is advertised under
    the host name the member used to reach this HTTP endpoint."""
    settings = request.app[SETTINGS]
    if settings.nats_url:
        return [settings.nats_public_url]
    host = settings.nats_addr.host
    if host in ("0.0.0.0", "::", ""):
        host = _checked_url(request).raw_host or "127.0.0.1"  # an IDN as the DNS has it: xn--…
    host = f"[{host}]" if ":" in host else host
    scheme = "tls" if settings.tls_cert else "nats"
    return [f"{scheme}://{host}:{settings.nats_addr.port}"]


def _checked_url(request: web.Request) -> Any:
    """``request.url``, which yarl builds from the client's ``Host`` header: 400 ``bad-host``
    when that is not ``HOST[:PORT]`` (yarl raises on ``x:abc``, ``xn--``, ``h:1:2``...)."""
    try:
        url = request.url
        url.host, url.origin()  # each decodes the header in its own way
        if not _host_name_or_address(url.raw_host or ""):  # raw: yarl decodes xn-- names (a review)
            raise ValueError  # "a b", "*", "..", "999.1.1.1" were put into /v1/bus's servers (a red team)
        return url
    except (ValueError, UnicodeError):
        raise Problem(400, "the Host header is not HOST[:PORT]; send the name or address you reached this "
                           "server at", kind="bad-host") from None


#: A name a member may reach this node by: DNS labels, with underscores too (Docker Compose's
#: service names have them, and resolve; a review).
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*")


def _host_name_or_address(host: str) -> bool:
    """An IP address, or a name of DNS labels (letters, digits, hyphens, underscores), not all
    digits and dots."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host.removesuffix("."))) and not re.fullmatch(r"[0-9.]+", host)


def inbox_prefix(handle: str) -> str:
    return f"_INBOX_{handle}"


def upgrade_command(request: web.Request) -> str:
    """The command that gives the caller a bus key, with this server's URL in it."""
    return f"unibus keygen --upgrade --server {_checked_url(request).origin()}"


async def get_bus(request: web.Request) -> web.Response:
    me = require_member(request)
    if me.bus_pub is None:
        # Upgraded from 0.11: the signing key is never a NATS login, so there is
        # no bus access until the member uploads a bus key (docs/bus-auth.md#bus-keys).
        raise Problem(409, f"{me.handle} has no bus key yet, so no bus access; run `{upgrade_command(request)}` "
                           "to add one to your identity file and upload it", kind="no-bus-key")
    rooms = await request.app[STORE].list_rooms(me.handle)
    return json_response({
        "servers": nats_servers(request),
        "user_nkey": me.bus_pub,
        "inbox_prefix": inbox_prefix(me.handle),
        "rooms": {r.room_id: f"{r.subject}.>" for r in rooms},
    })


def register(app: web.Application) -> None:
    add_route(app, "GET", "/v1/bus", get_bus,
              summary="NATS servers, the caller's bus key (user_nkey), inbox prefix and room subjects",
              responses={200: ("bus parameters", BUS_SCHEMA),
                         400: "the Host header is not HOST[:PORT] (bad-host)",
                         409: "the caller has no bus key yet (no-bus-key): run unibus keygen --upgrade --server URL"},
              tags=["bus"])
