"""auth_enforce: data-plane authorization generated from membership (docs/bus-auth.md).

With ``--bus-auth enforce`` (the default) the nats-server configuration gets
three accounts and nothing else that lets a client in:

* ``UNIBUS``: membershipd's service user (the nkey in ``<data-dir>/service.nkey``)
  with JetStream, so every KV bucket and the blob object store live here;
* ``MEMBERS``: one nkey user per member that has a bus key (``bus_pub``; never
  a signing key), allowed to publish and subscribe on ``unibus.room.<id>.>``
  for each room it is in and to subscribe on its inbox prefix
  ``_INBOX_<handle>.>``. No JetStream, no imports or exports, and no
  ``allow_responses``: a subject of ``UNIBUS`` or ``SYS`` does not exist for a
  member, whatever reply subject it gets a message with;
* ``SYS`` (``system_account``): membershipd's system user (``system.nkey``).

No top-level ``authorization``, no ``no_auth_user``: anonymous and unknown
clients are refused. Every committed membership change (member added,
deleted or given a new bus key, room member added or removed, room deleted,
SIGHUP) regenerates the accounts and reloads nats-server; changes made close
together share one reload, and the request that made the change gets its 2xx
only once nats-server confirmed the reload (up to 15 s; after that it answers
anyway and logs an error). nats-server's reload closes the connections of
users that disappeared and drops subscriptions that are no longer allowed.

``--bus-auth off`` is for development: one open global account, a warning at
start-up, and the posture says ``bus_auth: "off"``, ``acl: false``. So does
``--nats-url``, because the external server's authorization is not
membershipd's to write.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unibus import hookimpl
from unibus.servicekey import SERVICE_NKEY_FILE, SYSTEM_NKEY_FILE, ensure_service_nkey, load_nkey_seed
from unibus.settings import Settings
from unibus.store.base import Change, Membership

PLUGIN_NAME = "auth_enforce"
log = logging.getLogger("unibus.plugins.auth_enforce")

ROOM_SUBJECT = "unibus.room.{room_id}.>"
INBOX = "_INBOX_{handle}.>"
#: The accounts of docs/bus-auth.md: membershipd and JetStream, the members, the system.
SERVICE_ACCOUNT = "UNIBUS"
MEMBERS_ACCOUNT = "MEMBERS"
SYSTEM_ACCOUNT = "SYS"


def enforcing(settings: Settings) -> bool:
    return settings.bus_auth == "enforce" and settings.embedded


def member_permissions(handle: str, rooms: list[str]) -> dict[str, Any]:
    """The NATS permissions of one member: its rooms and its inbox, nothing else.

    No ``allow_responses``: it would let a member publish once to the reply
    subject of any message it receives, its own messages included, whose
    reply subject it chose itself (docs/bus-auth.md#why-no-allow_responses).
    """
    room_subjects = [ROOM_SUBJECT.format(room_id=r) for r in rooms]
    # An empty allow list means "no restriction" to nats-server: a member in no
    # room is denied every publish instead.
    publish: dict[str, Any] = {"allow": room_subjects} if room_subjects else {"deny": [">"]}
    return {
        "publish": publish,
        "subscribe": {"allow": [*room_subjects, INBOX.format(handle=handle)]},
    }


def member_users(membership: Membership) -> list[dict[str, Any]]:
    """One nkey user per member with a bus key; a member without one (upgraded from 0.11) has none."""
    return [
        {"nkey": member.bus_pub, "permissions": member_permissions(member.handle, membership.rooms_of(member.handle))}
        for member in membership.members
        if member.bus_pub is not None
    ]


def accounts(service_nkey: str, system_nkey: str, membership: Membership) -> dict[str, Any]:
    """The ``accounts`` block: ``UNIBUS`` (service user, JetStream), ``MEMBERS``, ``SYS``.

    Only ``UNIBUS`` names JetStream: with accounts configured, nats-server
    enables it for those accounts alone, so a member has no JetStream API at
    all (checked by tests/plugins/auth_enforce/test_accounts.py).
    """
    return {
        SERVICE_ACCOUNT: {"jetstream": "enabled", "users": [{"nkey": service_nkey}]},
        MEMBERS_ACCOUNT: {"users": member_users(membership)},
        SYSTEM_ACCOUNT: {"users": [{"nkey": system_nkey}]},
    }


@dataclass
class _Generated:
    users: int = 0  # every user of the generated accounts
    members: int = 0  # of which member users (members with a bus key)


# Per data dir, so several daemons in one process (tests) keep apart.
_generated: dict[Path, _Generated] = {}
_lock = threading.Lock()


def service_public_key(settings: Settings) -> str:
    _seed, public = load_nkey_seed(settings.data_dir / SERVICE_NKEY_FILE)
    return public


def system_public_key(settings: Settings) -> str:
    """membershipd's system user (``system.nkey``, 0600), made on first use: every enforcing node has one."""
    _seed, public = ensure_service_nkey(settings.data_dir, SYSTEM_NKEY_FILE)
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

    block = accounts(service_public_key(settings), system_public_key(settings), membership_snapshot(settings))
    config["accounts"] = block
    config["system_account"] = SYSTEM_ACCOUNT
    for key in ("authorization", "no_auth_user"):
        config.pop(key, None)
    with _lock:
        _generated[settings.data_dir] = _Generated(users=sum(len(a["users"]) for a in block.values()),
                                                   members=len(block[MEMBERS_ACCOUNT]["users"]))


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
        generated = _generated.get(settings.data_dir, _Generated())
    last = getattr(supervisor, "last_reload", None)
    return {PLUGIN_NAME: {
        "enforced": True,
        "users": generated.users,
        "members": generated.members,
        "reloads": getattr(supervisor, "reloads", 0),
        "last_reload": None if last is None else _iso(last),
    }}


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["MEMBERS_ACCOUNT", "SERVICE_ACCOUNT", "SYSTEM_ACCOUNT", "accounts", "member_permissions", "member_users"]
