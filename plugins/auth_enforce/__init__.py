"""auth_enforce: data-plane authorization generated from membership (SPEC §7).

With ``--bus-auth enforce`` (the default) the nats-server configuration gets an
``authorization`` block with:

* membershipd's own service user (the nkey in ``<data-dir>/service.nkey``) with
  full rights: it owns the KV buckets;
* one nkey user per member, its public key derived from the member's Ed25519
  ``sign_pub``, allowed to publish and subscribe on ``unibus.room.<id>.>`` for
  each room it is in, to subscribe on its inbox prefix ``_INBOX_<handle>.>``,
  and to publish the replies it is asked for (``allow_responses``). Nothing else.

No anonymous user, no ``no_auth_user``. Every committed membership change
(member added or deleted, room member added or removed, room deleted, SIGHUP)
regenerates the block and reloads nats-server; changes made close together
share one reload, and the request that made the change gets its 2xx only once
nats-server confirmed the reload (up to 15 s; after that it answers anyway and
logs an error). nats-server's reload closes the connections of users that
disappeared and drops subscriptions that are no longer allowed (measured and
explained in docs/bus-auth.md).

``--bus-auth off`` is for development: a warning at start-up, and the posture
says ``bus_auth: "off"``, ``acl: false``. So does ``--nats-url``, because the
external server's authorization is not membershipd's to write.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unibus import hookimpl
from unibus.servicekey import SERVICE_NKEY_FILE, load_nkey_seed
from unibus.settings import Settings
from unibus.store.base import Change, Membership

PLUGIN_NAME = "auth_enforce"
log = logging.getLogger("unibus.plugins.auth_enforce")

ROOM_SUBJECT = "unibus.room.{room_id}.>"
INBOX = "_INBOX_{handle}.>"


def enforcing(settings: Settings) -> bool:
    return settings.bus_auth == "enforce" and settings.embedded


def member_permissions(handle: str, rooms: list[str]) -> dict[str, Any]:
    """The NATS permissions of one member: its rooms, its inbox, replies it is asked for."""
    room_subjects = [ROOM_SUBJECT.format(room_id=r) for r in rooms]
    # An empty allow list means "no restriction" to nats-server: a member in no
    # room is denied every publish instead (replies stay allowed).
    publish: dict[str, Any] = {"allow": room_subjects} if room_subjects else {"deny": [">"]}
    return {
        "publish": publish,
        "subscribe": {"allow": [*room_subjects, INBOX.format(handle=handle)]},
        "allow_responses": True,
    }


def authorization(service_nkey: str, membership: Membership) -> dict[str, Any]:
    """The ``authorization`` block: the service user plus one user per member."""
    users: list[dict[str, Any]] = [{"nkey": service_nkey}]
    for member in membership.members:
        if member.bus_pub is None:
            continue  # upgraded from 0.11, no bus key yet: no bus access
        users.append({
            "nkey": member.bus_pub,
            "permissions": member_permissions(member.handle, membership.rooms_of(member.handle)),
        })
    return {"users": users}


@dataclass
class _Generated:
    users: int = 0


# Per data dir, so several daemons in one process (tests) keep apart.
_generated: dict[Path, _Generated] = {}
_lock = threading.Lock()


def service_public_key(settings: Settings) -> str:
    _seed, public = load_nkey_seed(settings.data_dir / SERVICE_NKEY_FILE)
    return public


@hookimpl
def posture(settings: Settings) -> dict[str, Any]:
    if enforcing(settings):
        return {"bus_auth": "enforce", "acl": True}
    return {"bus_auth": "off", "acl": False}


@hookimpl
def configure_nats(settings: Settings, config: dict[str, Any]) -> None:
    if not enforcing(settings):
        return
    from unibus.store import membership_snapshot

    block = authorization(service_public_key(settings), membership_snapshot(settings))
    config["authorization"] = block
    config.pop("no_auth_user", None)
    with _lock:
        _generated.setdefault(settings.data_dir, _Generated()).users = len(block["users"])


@hookimpl
def startup(app) -> None:
    from unibus.app import RECONFIGURE_NATS, SETTINGS, STORE

    settings = app[SETTINGS]
    if settings.bus_auth == "off":
        log.warning("--bus-auth off: the bus is open to any client that reaches the NATS port (development only)")
        return
    if not settings.embedded:
        log.warning("--nats-url: bus authorization is the external NATS server's job; posture says bus_auth off")
        return
    reconfigure = app[RECONFIGURE_NATS]

    def on_change(change: Change):
        if change.affects_bus:
            # Coalesced with other changes; the write that caused it waits for
            # this future, so its 2xx leaves once nats-server enforces it.
            return reconfigure()
        return None

    app[STORE].add_listener(on_change)


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    from unibus.app import SETTINGS, SUPERVISOR

    settings = app[SETTINGS]
    if not enforcing(settings):
        return {PLUGIN_NAME: {"enforced": False}}
    supervisor = app[SUPERVISOR]
    with _lock:
        users = _generated.get(settings.data_dir, _Generated()).users
    last = getattr(supervisor, "last_reload", None)
    return {PLUGIN_NAME: {
        "enforced": True,
        "users": users,
        "reloads": getattr(supervisor, "reloads", 0),
        "last_reload": None if last is None else _iso(last),
    }}


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["authorization", "member_permissions"]
