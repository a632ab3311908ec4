"""auth_enforce: data-plane authorization by NATS auth callout (docs/bus-auth.md).

With ``--bus-auth enforce`` (the default) nats.conf holds three accounts and
lists no member:

* ``UNIBUS``: membershipd's service user (``<data-dir>/service.nkey``) with
  JetStream: every KV bucket and the blob object store live here;
* ``MEMBERS``: no users in the configuration, no JetStream. Every member
  connection is authorized by the ``auth_callout`` block: nats-server asks,
  membershipd answers (:mod:`.callout`) with a user JWT that allows publish and
  subscribe on ``unibus.room.<id>.>`` for each of the member's rooms and
  subscribe on ``_INBOX_<handle>.>``. No ``allow_responses``;
* ``SYS``: membershipd's system user (``system.nkey``), which watches
  connections and kicks them (:mod:`.enforcer`).

A membership change needs no reload: the callout's index (:mod:`.policy`) is
updated before the change is answered, and every connection whose rights
changed is kicked on every node, then re-authorized through the callout. The
configuration is the same for the whole life of the daemon.

``--bus-auth off`` is for development: one open global account, a warning at
start-up (the core's, as the flag is), and the posture says ``bus_auth: "off"``, ``acl: false``. So does
``--nats-url``, because the external server's authorization is not
membershipd's to write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unibus import StashKey, hookimpl
from unibus.pluginstate import state_dir_of
from unibus.privatefiles import read_private_file, write_private_file
from unibus.servicekey import SERVICE_NKEY_FILE, SYSTEM_NKEY_FILE, ensure_service_nkey, load_nkey_seed
from unibus.settings import Settings
from unibus.store.base import Change, ChangeNotEnforced, Store

from .callout import AUTH_TIMEOUT, MEMBER_MAX_ROOMS, MEMBER_MAX_SUBSCRIPTIONS, Issuer, Responder
from .enforcer import Enforcer, KickUnconfirmed
from .metrics import BusAuthMetrics
from .policy import Policy, diff, member_permissions

PLUGIN_NAME = "auth_enforce"
log = logging.getLogger("unibus.plugins.auth_enforce")

#: The accounts of docs/bus-auth.md: membershipd and JetStream, the members, the system.
SERVICE_ACCOUNT = "UNIBUS"
MEMBERS_ACCOUNT = "MEMBERS"
SYSTEM_ACCOUNT = "SYS"
ISSUER_FILE = Path("plugins") / PLUGIN_NAME / "issuer.nkey"
ISSUER_LABEL = "auth_enforce/callout-issuer"


def enforcing(settings: Settings) -> bool:
    return settings.bus_auth == "enforce" and settings.embedded


def issuer_for(settings: Settings) -> Issuer:
    """The callout issuer: derived from the cluster's shared key on a cluster node
    (every node must sign alike), else a random account seed kept in
    ``<data-dir>/plugins/auth_enforce/issuer.nkey`` (0600, in a 0700 directory)."""
    shared = settings.cluster_key(ISSUER_LABEL)
    if shared is not None:
        return Issuer.from_raw(shared)
    path = state_dir_of(settings.data_dir, PLUGIN_NAME) / ISSUER_FILE.name
    if not os.path.lexists(path):
        import nkeys

        write_private_file(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT) + b"\n")
    return Issuer.from_seed(read_private_file(path).decode().strip())


def accounts(service_nkey: str, system_nkey: str) -> dict[str, Any]:
    """The ``accounts`` block: ``UNIBUS`` (service user, JetStream), ``MEMBERS`` (no user, and a bound
    on each connection's subscriptions), ``SYS``.

    Only ``UNIBUS`` names JetStream: with accounts configured, nats-server
    enables it for those accounts alone, so a member has no JetStream API at
    all (checked by tests/plugins/auth_enforce/test_accounts.py). The bound on
    subscriptions is the account's: nats-server does not apply the limits of a
    user JWT that an auth callout answered with, only its permissions
    (docs/bus-auth.md, "Limits per member").
    """
    return {
        SERVICE_ACCOUNT: {"jetstream": "enabled", "users": [{"nkey": service_nkey}]},
        MEMBERS_ACCOUNT: {"limits": {"max_subscriptions": MEMBER_MAX_SUBSCRIPTIONS}},
        SYSTEM_ACCOUNT: {"users": [{"nkey": system_nkey}]},
    }


def authorization(service_nkey: str, issuer: str) -> dict[str, Any]:
    """The ``authorization`` block: the callout for every connection that is not membershipd's own.

    ``allowed_accounts`` keeps the system user out of the callout; the service
    user is an ``auth_user``. ``timeout`` is how long nats-server waits for an
    answer (docs/bus-auth.md, "When no membershipd answers").
    """
    return {"timeout": AUTH_TIMEOUT,
            "auth_callout": {"issuer": issuer, "account": SERVICE_ACCOUNT, "auth_users": [service_nkey],
                             "allowed_accounts": [MEMBERS_ACCOUNT]}}


def service_public_key(settings: Settings) -> str:
    _seed, public = load_nkey_seed(settings.data_dir / SERVICE_NKEY_FILE)
    return public


def system_public_key(settings: Settings) -> str:
    """membershipd's system user (``system.nkey``, 0600), made on first use: every enforcing node has one."""
    _seed, public = ensure_service_nkey(settings.data_dir, SYSTEM_NKEY_FILE)
    return public


@dataclass
class Runtime:
    """What the plugin runs for one daemon (on ``app``; several daemons may share a process in tests)."""

    store: Store
    policy: Policy
    responder: Responder
    enforcer: Enforcer | None = None
    metrics: BusAuthMetrics | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    unsubscribe: Callable[[], None] | None = None
    #: a full re-read is (still) wanted (:func:`reload_until_read`)
    reread_again: bool = False
    #: shutdown has begun: no new re-read is started
    stopping: bool = False


#: The plugin's :class:`Runtime` in its stash (docs/plugins.md, "State").
RUNTIME = StashKey[Runtime]("runtime")


@hookimpl
def posture(settings: Settings) -> dict[str, Any]:
    if enforcing(settings):
        return {"bus_auth": "enforce", "acl": True}
    return {"bus_auth": "off", "acl": False}


@hookimpl
def configure_nats(settings: Settings, config: dict[str, Any]) -> None:
    if not enforcing(settings):
        return
    service = service_public_key(settings)
    config["accounts"] = accounts(service, system_public_key(settings))
    config["system_account"] = SYSTEM_ACCOUNT
    config["authorization"] = authorization(service, issuer_for(settings).public)
    config.pop("no_auth_user", None)


async def load_policy(store: Store, policy: Policy) -> tuple[set[str], set[str]]:
    """Read every member and room into the index; ``(revoked, granted)`` by the load.

    A member or room updated one by one while the lists were read (a deletion on this node, or
    another node's through the KV watch) is read again after the load: the lists may predate
    the update, and the load would otherwise give a deleted member its rights back, for good
    (red team: more likely since failed re-reads are retried by a full one).

    What the load changed is measured from the index as it was just before the load, after
    the reads: an update applied one by one while they ran kicked what it changed itself, and
    a red team saw it kicked again by the re-read of a SIGHUP started before it. And those
    updates are put back as the index has them in the same step as the load, before any
    login is answered from it: until the re-read after it, the older lists held a member
    just removed from a room in it, and the next red team's logins got the room (the second
    sweep of the removal kicked them, 2.7 s later).
    """
    tracker = policy.track()
    try:
        members = await store.list_members()
        membership = await store.membership()
    finally:
        policy.untrack(tracker)
    handles, rooms = tracker
    kept_members = {h: (h in policy.members, policy.bus_of.get(h)) for h in handles}
    kept_rooms = {r: policy.room_members.get(r) for r in rooms}  # None: the room is gone
    # A tracked member put back as absent leaves every room, and the re-read of the member alone
    # puts none back: its rooms, as the lists and the index have them, are read again too (a
    # review: a member withdrawn while the lists were read lost the rooms it was in, untracked).
    rooms = set(rooms) | {r for r, hs in membership.rooms.items() if hs & handles} \
        | {r for h in handles for r in policy.rooms_of.get(h, ())}
    before = policy.snapshot()
    policy.load(((m.handle, m.bus_pub) for m in members), dict(membership.rooms))
    for handle, (present, bus_pub) in kept_members.items():  # no await since the load: nothing reads it
        policy.set_member(handle, present, bus_pub)
    for room_id, room_handles in kept_rooms.items():
        policy.set_room(room_id, room_handles)
    if handles or rooms:  # and from the store, which may be newer still
        await reread(store, policy, sorted(handles), sorted(rooms))
    return diff(before, policy.snapshot())


async def reread(store: Store, policy: Policy, handles: list[str], rooms: list[str]) -> tuple[set[str], set[str]]:
    """Re-read members and rooms from the store into the policy; ``(revoked, granted)``."""
    revoked: set[str] = set()
    granted: set[str] = set()
    for handle in handles:
        exists, bus_pub, revision = await store.bus_member(handle)
        r, g = policy.set_member(handle, exists, bus_pub, revision)
        revoked |= r
        granted |= g
    for room_id in rooms:
        members, revision = await store.room_handles(room_id)
        r, g = policy.set_room(room_id, members, revision)
        revoked |= r
        granted |= g
    return revoked, granted - revoked


def affected(change: Change, policy: Policy) -> tuple[list[str], list[str]]:
    """The members and rooms a local change touched: ``(handles, room ids)`` to re-read."""
    if change.kind in ("member_added", "member_bus_key"):
        return [change.handle] if change.handle else [], []
    if change.kind == "member_deleted":
        return [change.handle] if change.handle else [], list(change.rooms)
    if change.kind in ("room_created", "room_deleted", "room_member_added", "room_member_removed"):
        return [], [change.room_id] if change.room_id else []
    return [], []


def implied_revocations(change: Change) -> set[str]:
    """Who lost rights by the change's own account, whatever the index said before it.

    The index follows other nodes' writes through the KV watch, which can lag:
    bob re-added to a room through node 1 and removed through node 2 a moment
    later would show node 2 no difference (not in the room before, not after),
    and bob's connection would keep the room (found by a cluster test on a
    loaded machine). So a removal, a deletion or a new bus key always kicks.
    """
    if change.kind in ("room_member_removed", "member_deleted", "member_bus_key") and change.handle:
        return {change.handle}
    if change.kind == "room_deleted":
        return set((change.before or {}).get("members") or ())
    return set()


def apply_committed(policy: Policy, change: Change) -> None:
    """Put a local change into the index from its own record, when the store cannot be re-read."""
    after = change.after or {}
    if change.kind in ("room_created", "room_member_added", "room_member_removed") and change.room_id and after:
        policy.set_room(change.room_id, frozenset(after.get("members") or ()))
    elif change.kind == "room_deleted" and change.room_id:
        policy.set_room(change.room_id, None)
    elif change.kind == "member_deleted" and change.handle:
        policy.set_member(change.handle, False, None)
    elif change.kind in ("member_added", "member_bus_key") and change.handle and after:
        policy.set_member(change.handle, True, after.get("bus_pub"))


def remote_keys(keys: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Members and rooms among the store keys another node wrote (docs/store.md)."""
    handles = [k.split(".", 1)[1] for k in keys if k.startswith("member.")]
    rooms = [k.split(".", 1)[1] for k in keys if k.startswith("room.")]
    return handles, rooms


async def apply_change(rt: Runtime, change: Change) -> None:
    """Bring the policy in line with a change, then kick what it revoked or granted.

    A change this node applies (its own, or a SIGHUP reload) is counted, with
    how long it took to be in force (``unibus_bus_auth_change_*``); another
    node's changes are that node's to count.
    """
    if change.kind == "reloaded" and change.keys:
        # Another node's writes: that node kicks on every server it reaches; here the index
        # follows, and what it revoked here is kicked on this node's server (a node cut off
        # when the change was made was not reached: Enforcer.kick_here).
        handles, rooms = remote_keys(change.keys)
        try:
            revoked, _granted = await reread(rt.store, rt.policy, handles, rooms)
        except Exception as e:  # noqa: BLE001 - fail closed, then re-read everything until it works
            # The change is another node's: this node cannot know what it was. Its index kept the
            # old rights, for good: a member deleted on another node while this node's store
            # reads failed (a fault elsewhere in the cluster) still logged in to the bus here.
            revoked = withdraw(rt.policy, handles, rooms)
            log.error("bus authorization: could not re-read what another node changed (%s: %s); taken out of "
                      "this node's index until every member and room is read again: %s", type(e).__name__, e,
                      ", ".join([*handles, *(f"room {r}" for r in rooms)]))
            reload_until_read(rt)
        await kick_here(rt, revoked)
        return
    if change.kind == "reloaded" and change.origin == "remote":
        try:
            revoked, _granted = await load_policy(rt.store, rt.policy)
        except Exception as e:  # noqa: BLE001 - the watch may have missed changes: read until it works
            log.error("bus authorization: could not re-read the members and rooms after the KV watch missed "
                      "changes (%s: %s); retrying", type(e).__name__, e)
            reload_until_read(rt)
            return
        await kick_here(rt, revoked)
        return
    started = time.monotonic()
    try:
        await _apply_local(rt, change)
    finally:
        if rt.metrics is not None:
            rt.metrics.changes.inc()
            rt.metrics.change_duration.observe(time.monotonic() - started)


def withdraw(policy: Policy, handles: list[str], rooms: list[str]) -> set[str]:
    """Take ``handles`` and ``rooms`` out of the index (fail closed); the handles it revoked."""
    revoked: set[str] = set()
    for handle in handles:
        revoked |= policy.set_member(handle, False, None)[0]
    for room_id in rooms:
        revoked |= policy.set_room(room_id, None)[0]
    return revoked


#: Pauses between full re-reads after a failed one: the first, and the longest.
RELOAD_PAUSES = (0.5, 5.0)


def reload_until_read(rt: Runtime) -> None:
    """Re-read every member and room until it works (one task at a time), then kick what that revoked.

    Asked again while a re-read runs, it reads once more after that one: the running read may
    have begun before the change that asked, and would give back what it took away.
    """
    if rt.stopping:
        return  # a read failing because the store closes at shutdown: nothing to retry for
    rt.reread_again = True
    if any(not t.done() for t in rt.tasks):
        return

    async def run() -> None:
        pause = RELOAD_PAUSES[0]
        while rt.reread_again and not rt.stopping:
            await asyncio.sleep(pause)
            rt.reread_again = False
            try:
                revoked, _granted = await load_policy(rt.store, rt.policy)
            except Exception as e:  # noqa: BLE001 - the store is still away: try again
                log.warning("bus authorization: re-reading the members and rooms failed (%s: %s); retrying",
                            type(e).__name__, e)
                rt.reread_again = True
                pause = min(pause * 2, RELOAD_PAUSES[1])
                continue
            log.info("bus authorization: members and rooms read again after a failed re-read")
            await kick_here(rt, revoked)
            pause = RELOAD_PAUSES[0]

    task = asyncio.get_running_loop().create_task(run())
    rt.tasks.add(task)
    task.add_done_callback(rt.tasks.discard)


async def kick_here(rt: Runtime, revoked: set[str]) -> None:
    """Kick on this node's nats-server what another node's change revoked in this node's index."""
    if revoked and rt.enforcer is not None:
        await rt.enforcer.kick_here_or_retry(revoked)


async def _apply_local(rt: Runtime, change: Change) -> None:
    if change.kind == "reloaded":
        revoked, granted = await load_policy(rt.store, rt.policy)
        rooms: list[str] = []
    else:
        handles, rooms = affected(change, rt.policy)
        if change.kind == "room_deleted" and change.room_id:
            rooms = [change.room_id]
        try:
            revoked, granted = await reread(rt.store, rt.policy, handles, rooms)
        except Exception as e:  # noqa: BLE001 - committed all the same: never answer 2xx unenforced
            log.error("bus authorization: could not re-read what %s changed (%s: %s); the index takes the "
                      "change as committed", change.kind, type(e).__name__, e)
            apply_committed(rt.policy, change)
            revoked, granted = set(), set()
        revoked |= implied_revocations(change)
        granted -= revoked
    if rt.enforcer is None:
        return
    try:
        await rt.enforcer.enforce(revoked, granted, rooms)
    except KickUnconfirmed as e:
        raise ChangeNotEnforced(str(e)) from None
    except Exception as e:  # noqa: BLE001 - fail closed: 503, and retried until confirmed
        rt.enforcer.mark_pending(revoked, granted, rooms)
        log.error("bus enforcement of %s failed (%s: %s); retrying until it is confirmed", change.kind,
                  type(e).__name__, e)
        raise ChangeNotEnforced(f"{type(e).__name__}: {e}") from None


@hookimpl
async def startup(app) -> None:
    from unibus.app import BUS, CHANGE_LIMIT, EXTRA, METRICS, SETTINGS, STORE, stash

    settings = app[SETTINGS]
    if not enforcing(settings):
        # The metrics exist all the same (at 0), so dashboards and alerts see one shape on every node.
        # The core warned at start-up (unibus.posture.bus_auth_warnings): --bus-auth is its flag.
        BusAuthMetrics.register(app[METRICS].plugin(PLUGIN_NAME), pending=lambda: 0, connections=lambda: 0)
        return
    store = app[STORE]
    policy = Policy()
    await load_policy(store, policy)
    rt = Runtime(store, policy, Responder(policy, issuer_for(settings)))
    await rt.responder.start(app[BUS].nc)
    system_bus = app[EXTRA].get("system_bus")
    if system_bus is None:  # pragma: no cover - the core connects it whenever the config has SYS
        raise RuntimeError("no system-account connection: kicks are impossible")

    async def apply_local(handles: list[str], rooms: list[str]) -> set[str]:
        revoked, _granted = await reread(store, policy, handles, rooms)
        return revoked  # kicked on this node's server as well (Enforcer._on_apply)

    rt.enforcer = Enforcer(system_bus.nc, app[BUS].nc, rt.responder, clustered=settings.clustered,
                           node=settings.server_name, apply_local=apply_local, routes=system_bus.route_ids)
    await rt.enforcer.start()
    enforcer = rt.enforcer
    rt.metrics = BusAuthMetrics.register(
        app[METRICS].plugin(PLUGIN_NAME), pending=lambda: enforcer.pending_count,
        connections=lambda: sum(len(c) for c in enforcer.connections.values()))
    rt.responder.metrics = rt.enforcer.metrics = rt.metrics
    stash(app)[RUNTIME] = rt
    # How often one member may change another's rooms counts only changes that kick, and a member's
    # login lists every room it is in: at most MEMBER_MAX_ROOMS (unibus.changelimit).
    limit = app[CHANGE_LIMIT]
    limit.costs = enforcer.on_the_bus
    limit.rooms_in = lambda handle: len(policy.rooms_of.get(handle, ()))
    limit.max_rooms = MEMBER_MAX_ROOMS

    def on_change(change: Change) -> Any:
        if change.kind in ("keys_posted", "member_updated"):
            return None
        return apply_change(rt, change)

    rt.unsubscribe = store.add_listener(on_change)


@hookimpl
async def shutdown(app) -> None:
    from unibus.app import CHANGE_LIMIT, stash

    rt = stash(app, PLUGIN_NAME).pop(RUNTIME)
    if rt is None:
        return
    rt.stopping = True
    limit = app[CHANGE_LIMIT]
    limit.costs = limit.rooms_in = limit.max_rooms = None
    if rt.unsubscribe is not None:
        rt.unsubscribe()
    for task in list(rt.tasks):
        task.cancel()
    await asyncio.gather(*rt.tasks, return_exceptions=True)
    if rt.enforcer is not None:
        await rt.enforcer.stop()
    await rt.responder.stop()


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    from unibus.app import SETTINGS, stash

    settings = app[SETTINGS]
    rt = stash(app, PLUGIN_NAME).get(RUNTIME)
    if not enforcing(settings) or rt is None:
        return {"enforced": False}
    enforcer = rt.enforcer
    return {
        "enforced": True,
        "mode": "callout",
        "members": len(rt.policy.bus_of),
        "connections": sum(len(c) for c in enforcer.connections.values()) if enforcer else 0,
        "callouts": dict(rt.responder.stats),
        "kicks": enforcer.stats["kicks"] if enforcer else 0,
        # a count: /healthz answers anyone, and the members' handles are for the log
        # ("bus enforcement of ... still not confirmed")
        "kicks_pending": enforcer.pending_count if enforcer else 0,
        "last_change_ms": (round(enforcer.last_duration * 1000, 1)
                           if enforcer and enforcer.last_duration is not None else None),
    }


__all__ = ["MEMBERS_ACCOUNT", "SERVICE_ACCOUNT", "SYSTEM_ACCOUNT", "accounts", "authorization", "member_permissions"]
