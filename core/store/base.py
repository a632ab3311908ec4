"""The store contract: records, errors, and the interface every backend implements.

membershipd keeps members, rooms, room members, sealed room keys and the
membership log. The SQLite backend (``unibus.store.sqlite``) serves a single
node; a JetStream KV backend serves a cluster. One contract test suite runs
against every backend.

Every membership-changing method takes ``logged=``, a :class:`LogRecord`: the
signed request that asked for the change. When given, the backend appends its
entry to the membership log in the same transaction (SQLite) or atomic batch
(KV) as the effect, after the checks of :func:`check_appendable`; without it
(imports, tests of the effect alone) nothing is appended. docs/store.md, "The
membership log", says how each backend does it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import base64
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..memberlog import (LEGACY_KEYS, LoggedRequest, entry_hash, legacy_keys_json, logged_operation, member_json,
                         request_entry)

log = logging.getLogger("unibus.store")

ROLES = ("admin", "member")
#: How long a write waits for its listeners (bus authorization's kicks) to apply it;
#: a listener that needs a deadline of its own (the kicks' 2 s) raises ChangeNotEnforced.
CHANGE_APPLY_TIMEOUT = 15.0


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Member:
    handle: str
    role: str
    sign_pub: bytes
    enc_pub: bytes
    enc_suite: str
    created_at: datetime
    #: The member's bus key as a NATS user nkey (``U…``); None for a member
    #: upgraded from 0.11 that has not set one yet (no bus access: docs/bus-auth.md).
    bus_pub: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self._json)  # a copy: callers may add to it

    @functools.cached_property
    def _json(self) -> dict[str, Any]:
        # Computed once per Member object: the authentication cache keeps the
        # same objects, so GET /v1/me and member lists skip the base64 and the
        # date formatting on every request.
        return {
            "handle": self.handle,
            "role": self.role,
            "sign_pub": b64(self.sign_pub),
            "enc_pub": b64(self.enc_pub),
            "enc_suite": self.enc_suite,
            "bus_pub": self.bus_pub,
            "created_at": iso(self.created_at),
        }

    def room_entry(self) -> dict[str, Any]:
        """How a room lists its members (docs/http-api.md, "Room")."""
        return {"handle": self.handle, "enc_pub": b64(self.enc_pub), "enc_suite": self.enc_suite}

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Room:
    room_id: str
    name: str
    owner: str
    epoch: int
    rekey_required: bool
    created_at: datetime
    members: tuple[Member, ...] = ()

    @property
    def subject(self) -> str:
        return f"unibus.room.{self.room_id}"

    @property
    def handles(self) -> frozenset[str]:
        return frozenset(m.handle for m in self.members)

    def as_json(self) -> dict[str, Any]:
        return {
            "room_id": self.room_id,
            "name": self.name,
            "subject": self.subject,
            "owner": self.owner or None,
            "epoch": self.epoch,
            "rekey_required": self.rekey_required,
            "members": [m.room_entry() for m in self.members],
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class Membership:
    """A snapshot of who may be on the bus and where: what bus authorization is made of."""

    members: tuple[Member, ...]
    rooms: dict[str, frozenset[str]] = field(default_factory=dict)  # room_id -> handles

    def rooms_of(self, handle: str) -> list[str]:
        return self._by_member().get(handle, [])

    def _by_member(self) -> dict[str, list[str]]:
        # Built once per snapshot: members x rooms scans cost 0.6 s at 10,000 members.
        index = self.__dict__.get("_index")
        if index is None:
            index = {}
            for room_id in sorted(self.rooms):
                for handle in self.rooms[room_id]:
                    index.setdefault(handle, []).append(room_id)
            object.__setattr__(self, "_index", index)
        return index


@dataclass(frozen=True)
class Change:
    """What a committed write changed; listeners (bus authorization, blob store) react to it.

    The core turns each one into a :class:`unibus.events.ChangeEvent` for the
    ``store_changed`` hook (docs/plugins.md, "Change events"). ``seq``,
    ``actor``, ``before`` and ``after`` are the event's; they take no part in
    equality, so two reports of the same change compare equal.
    """

    kind: str  # member_added, member_updated, member_bus_key, member_deleted, room_created,
    #            room_deleted, room_member_added, room_member_removed, keys_posted, reloaded
    handle: str | None = None
    room_id: str | None = None
    rooms: tuple[str, ...] = ()
    #: "local" (this process wrote it), "remote" (another cluster node: a
    #: ``reloaded`` with the store ``keys`` that changed), "offline" (SIGHUP
    #: after an offline ``membershipd member add``).
    origin: str = "local"
    keys: tuple[str, ...] = ()
    #: The membership log's seq of the entry written with the change (None: not logged).
    seq: int | None = field(default=None, compare=False)
    #: The handle whose signed request made the change (None: not a signed request).
    actor: str | None = field(default=None, compare=False)
    #: The record before and after (:func:`member_state`, :func:`room_state`); None where there is none.
    before: dict[str, Any] | None = field(default=None, compare=False)
    after: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def affects_bus(self) -> bool:
        return self.kind not in ("keys_posted", "member_updated")


def actor_of(logged: LogRecord | None) -> str | None:
    """The author of a logged write: the keyid its signature verified with."""
    return logged.keyid if logged is not None else None


def member_state(member: Member | None) -> dict[str, Any] | None:
    """A member as change events carry it: its public record (``GET /v1/members/{handle}``)."""
    return member.as_json() if member is not None else None


def room_state(room_id: str, name: str, owner: str | None, epoch: int, rekey_required: bool,
               members: Any) -> dict[str, Any]:
    """A room as change events carry it: the room's fields and its members' handles, sorted."""
    return {"room_id": room_id, "name": name, "owner": owner or None, "epoch": int(epoch),
            "rekey_required": bool(rekey_required), "members": sorted(members)}


def room_state_of(room: Room | None) -> dict[str, Any] | None:
    if room is None:
        return None
    return room_state(room.room_id, room.name, room.owner, room.epoch, room.rekey_required, room.handles)


class StoreError(Exception):
    """Base class of the store's domain errors; handlers turn them into problems."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.extra = extra


class StoreUnavailable(StoreError):
    """The backend cannot answer now (a KV without quorum): the request gets 503."""


class ChangeNotEnforced(StoreError):
    """The change is committed, but a listener could not confirm its effect in time
    (bus authorization's kicks): the request gets 503, and the listener keeps retrying."""


class Forbidden(StoreError):
    """The author of a logged request may not make it any more: its rights changed between the
    check of its request and its write (a concurrent demotion, removal or deletion): 403."""


class LogRejected(StoreError):
    """A signed request that cannot join the membership log (its nonce is in the log
    already, or its ``created`` is too old for the log's order): the request gets 401."""


# -- the membership log ------------------------------------------------------------


@dataclass(frozen=True)
class LogRecord:
    """A signed request to append to the membership log, with what the server established.

    ``keyid``, ``nonce`` and ``created`` come from the verified signature,
    ``at`` is the server time (unix seconds) when it was checked: the entry's
    ``at``. ``skew`` is the server's ``--auth-skew``.
    """

    request: LoggedRequest
    keyid: str
    nonce: str
    created: int
    at: int
    skew: int
    #: The signing key that verified the request: the author's at the write must still be it.
    #: None only where no signature was checked against a member (tests of the store alone).
    sign_pub: bytes | None = None

    def entry(self, seq: int, prev: str, result: dict[str, Any]) -> tuple[str, str]:
        """``(hash, text)`` of this request's entry at ``seq`` after ``prev``."""
        return entry_text(request_entry(seq, prev, self.at, self.request, result))


def entry_text(entry: dict[str, Any]) -> tuple[str, str]:
    """``(hash, stored text)`` of an entry: the text is its RFC 8785 canonical JSON,
    so the bytes served are the bytes hashed (docs/formats.md)."""
    from ..memberlog import canonical

    return entry_hash(entry), canonical(entry).decode("utf-8")


def check_appendable(record: LogRecord, max_created: int, nonce_in_log: bool) -> None:
    """The rules a client checks of every request entry that the request itself
    decides (docs/formats.md, "The membership log"): each (keyid, nonce) once in
    the whole log, and ``created`` never more than twice the skew older than the
    largest ``created`` before it. The server refuses, before appending, what a
    client would refuse when replaying. :class:`LogRejected` otherwise."""
    if nonce_in_log:
        raise LogRejected("replayed nonce: this (keyid, nonce) is already in the membership log; sign the "
                          "request again")
    if record.created < max_created - 2 * record.skew:
        raise LogRejected(f"the signature's created is more than {2 * record.skew} s older than a request "
                          "already in the membership log; sign the request again")


#: Logged operations only an admin may make, and those of a room's owner (a room member) or an admin.
_ADMIN_OPS = frozenset({"member.add", "member.role", "member.delete"})
_MANAGER_OPS = frozenset({"room.delete", "room.member_add", "room.keys"})


def authority_room(record: LogRecord) -> str | None:
    """The room whose owner and roster :func:`check_authority` needs for ``record``, if any."""
    found = logged_operation(record.request.method, record.request.path)
    if found is None:
        return None
    op, args = found
    return args[0] if op in _MANAGER_OPS or op == "room.member_remove" else None


def check_authority(record: LogRecord, author_role: str | None, room_owner: str | None,
                    author_in_room: bool, author_sign_pub: bytes | None = None) -> None:
    """The author's rights, as a client checks them at this point of the log (``LogState``'s
    ``_op_*`` rules), from the store's rows read in the write's own transaction.

    The handler checked them when the request came in, but another write may
    have committed since (the author demoted, removed from the room, or
    deleted): appending the request then would put an entry in the log that
    every client refuses, for good. The author must also still be the member
    whose key verified the request (``record.sign_pub``): a handle deleted and
    added again with new keys is another member, and a client checks the
    entry's signature with the new key. ``room_owner`` is None when the room
    does not exist (the write itself answers 404). :class:`Forbidden` otherwise.
    """
    found = logged_operation(record.request.method, record.request.path)
    if found is None:
        return
    op, args = found
    if author_role is None:
        raise Forbidden(f"{record.keyid!r} is no longer a member")
    if record.sign_pub is not None and author_sign_pub != record.sign_pub:
        raise Forbidden(f"{record.keyid!r} was deleted and added again with other keys since this request was "
                        "signed; sign it again")
    admin = author_role == "admin"
    if op in _ADMIN_OPS and not admin:
        raise Forbidden(f"{record.keyid!r} is not an admin (any more)")
    if room_owner is None or admin:
        return
    manager = room_owner == record.keyid and author_in_room
    if op in _MANAGER_OPS and not manager:
        raise Forbidden(f"{record.keyid!r} is not the owner of room {args[0]!r} and in it (any more)")
    if op == "room.member_remove" and args[1] != record.keyid and not manager:
        raise Forbidden(f"{record.keyid!r} may not remove other members of room {args[0]!r} (any more)")


def check_new_epoch(current: int, epoch: int, members: set[str], sealed: dict[str, Any]) -> None:
    """The rules of a rekey (docs/store.md, "The contract"): ``epoch`` is the room's
    ``current`` epoch + 1, and ``sealed`` names exactly its ``members``. :class:`Conflict` otherwise."""
    if epoch != current + 1:
        raise Conflict(f"epoch must be {current + 1} (the room is at epoch {current})", current_epoch=current)
    missing, extra = sorted(members - sealed.keys()), sorted(sealed.keys() - members)
    if missing or extra:
        raise Conflict("sealed must name exactly the current members", missing=missing, extra=extra)


def snapshot_member(m: Member) -> dict[str, Any]:
    return member_json(m.handle, m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub)


def snapshot_room(room_id: str, name: str, owner: str, epoch: int, rekey_required: bool,
                  members: set[str] | frozenset[str], known: set[str] | frozenset[str],
                  unsigned: Iterable[tuple[int, str, bytes]] = ()) -> dict[str, Any]:
    """A room as a snapshot entry has it: only known members; an owner that is no member is ``""``;
    ``legacy_keys``, when the room has keys sealed before the log (``unsigned``: ``(epoch, handle,
    sealed)``), those of known members at epochs 1 to the room's (docs/formats.md)."""
    room = {"room_id": room_id, "name": name, "owner": owner if owner in known else "", "epoch": int(epoch),
            "rekey_required": bool(rekey_required), "members": sorted(h for h in members if h in known)}
    legacy = legacy_keys_json((e, h, v) for e, h, v in unsigned if h in known and 1 <= e <= epoch)
    if legacy:
        room[LEGACY_KEYS] = legacy
    return room


@dataclass(frozen=True)
class KeyPackage:
    """A room key sealed to one member at one epoch, with what signs it (docs/formats.md).

    ``sig``, ``sealer`` and ``log_head`` are None for keys sealed before 0.12.
    """

    room_id: str
    epoch: int
    sealed: bytes
    sig: bytes | None = None
    sealer: str | None = None
    log_head: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        # exactly the documented fields (docs/http-api.md): the caller named the room
        return {"epoch": self.epoch, "sealed": b64(self.sealed),
                "sig": b64(self.sig) if self.sig is not None else None, "sealer": self.sealer,
                "log_head": dict(self.log_head) if self.log_head is not None else None}


Listener = Callable[[Change], Any]


class Store(abc.ABC):
    """The interface of a membershipd store. Every method is a coroutine."""

    #: True when this store is the whole cluster's truth (KV), so a room it
    #: does not know is really gone (the blob store sweeps by it).
    cluster_wide = False

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(change)`` after every committed change (and after ``reload``).

        Returns a function that removes the listener again (calling it twice is
        harmless). A listener may return an awaitable (bus authorization returns its
        kicks): the write that caused the change waits for it, up to
        ``CHANGE_APPLY_TIMEOUT``, before it returns. So when a client gets the
        2xx of a membership change, the bus already enforces it. An awaitable
        that raises :class:`ChangeNotEnforced` makes the write raise it too
        (after every listener ran): the change stays committed.

        This is the core's own interface (docs/store.md, "Listeners"); a
        plugin implements the ``store_changed`` hook instead.
        """
        self._listeners.append(listener)

        def remove() -> None:
            self.remove_listener(listener)

        return remove

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; a listener not (or no longer) added is ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def _changed(self, change: Change) -> None:
        waits = []
        for listener in list(self._listeners):
            try:
                result = listener(change)
            except Exception:
                log.exception("store listener %r failed on %s", listener, change.kind)
                continue
            if inspect.isawaitable(result):
                waits.append(asyncio.ensure_future(result))
        if not waits:
            return
        done, pending = await asyncio.wait(waits, timeout=CHANGE_APPLY_TIMEOUT)
        not_enforced: ChangeNotEnforced | None = None
        for fut in done:
            error = fut.exception()
            if isinstance(error, ChangeNotEnforced):
                not_enforced = error
            elif error is not None:
                log.error("applying %s failed: %s", change.kind, error)
        if pending:
            log.error("applying %s is taking longer than %.0f s; answering anyway", change.kind, CHANGE_APPLY_TIMEOUT)
        if not_enforced is not None:
            raise not_enforced

    async def reload(self) -> None:
        """Drop caches and re-read the backend (SIGHUP, offline ``member add``)."""
        await self._changed(Change("reloaded", origin="offline"))

    async def bus_member(self, handle: str) -> tuple[bool, str | None, int]:
        """``(exists, bus_pub, revision)`` of a member, for bus authorization.

        ``revision`` orders reads of the same record (0: this backend reads
        in commit order and has none).
        """
        member = await self.get_member(handle)
        return member is not None, (member.bus_pub if member is not None else None), 0

    async def room_handles(self, room_id: str) -> tuple[frozenset[str] | None, int]:
        """``(handles of the room's members or None when it is gone, revision)``."""
        room = await self.get_room(room_id)
        return (room.handles if room is not None else None), 0

    async def available(self) -> bool:
        """Can the backend answer now? (``/healthz`` is degraded when not.)"""
        return True

    async def close(self) -> None:  # pragma: no cover - default no-op
        return None

    # -- members -------------------------------------------------------------
    # Each change is committed by the backend (``_add_member``...: the effect and
    # its log entry in one transaction or atomic batch), which returns what it
    # changed; the method here reports it, so every backend reports the same
    # Change for the same write (docs/store.md, "The contract").

    async def _report(self, kind: str, logged: LogRecord | None, seq: int | None, **fields: Any) -> None:
        """Tell the listeners of a committed change, written at ``seq`` of the log for ``logged``."""
        await self._changed(Change(kind, seq=seq, actor=actor_of(logged), **fields))

    @abc.abstractmethod
    async def list_members(self) -> list[Member]: ...

    @abc.abstractmethod
    async def get_member(self, handle: str) -> Member | None: ...

    async def add_member(self, member: Member, *, logged: LogRecord | None = None) -> Member:
        """Add a member; :class:`Conflict` if the handle or a key is taken.

        A key is taken when another member has the same ``sign_pub`` or
        ``bus_pub``, when the new ``bus_pub`` is the nkey of any member's
        ``sign_pub`` (its own included), or when the nkey of the new
        ``sign_pub`` is some member's ``bus_pub``: a signing key never becomes
        a bus identity (docs/bus-auth.md).
        """
        added, seq = await self._add_member(member, logged)
        await self._report("member_added", logged, seq, handle=member.handle, after=member_state(added))
        return added

    @abc.abstractmethod
    async def _add_member(self, member: Member, logged: LogRecord | None) -> tuple[Member, int | None]:
        """Commit :meth:`add_member`: ``(member, log seq)``; the seq is None when nothing was logged."""

    async def set_bus_key(self, handle: str, bus_pub: str, *, logged: LogRecord | None = None) -> Member:
        """Set or rotate a member's bus key (a ``U…`` nkey); report ``member_bus_key``.

        :class:`NotFound` for an unknown handle; :class:`Conflict` when the key is
        taken as for :meth:`add_member`. Setting the key the member already has
        changes nothing and reports nothing (a ``logged`` record is still appended).
        """
        after, before, seq = await self._set_bus_key(handle, bus_pub, logged)
        if before is not None:
            await self._report("member_bus_key", logged, seq, handle=handle, before=member_state(before),
                               after=member_state(after))
        return after

    @abc.abstractmethod
    async def _set_bus_key(self, handle: str, bus_pub: str,
                           logged: LogRecord | None) -> tuple[Member, Member | None, int | None]:
        """Commit :meth:`set_bus_key`: ``(member after, member before or None when unchanged, log seq)``."""

    async def set_role(self, handle: str, role: str, *, logged: LogRecord | None = None) -> Member:
        """Change a role; :class:`NotFound`, or :class:`Conflict` when it would demote the last admin."""
        after, before, seq = await self._set_role(handle, role, logged)
        await self._report("member_updated", logged, seq, handle=handle, before=member_state(before),
                           after=member_state(after))
        return after

    @abc.abstractmethod
    async def _set_role(self, handle: str, role: str, logged: LogRecord | None) -> tuple[Member, Member, int | None]:
        """Commit :meth:`set_role`: ``(member after, member before, log seq)``."""

    async def delete_member(self, handle: str, *, logged: LogRecord | None = None) -> list[str]:
        """Delete a member and its room memberships; returns the rooms it left (now rekey_required)."""
        left, before, seq = await self._delete_member(handle, logged)
        try:
            # Reported as soon as it is committed: the listeners (bus authorization's kicks) must
            # not wait for the clean-up below, while the member is refused already.
            await self._report("member_deleted", logged, seq, handle=handle, rooms=tuple(left),
                               before=member_state(before))
        finally:
            await self._after_delete_member(handle)
        return left

    @abc.abstractmethod
    async def _delete_member(self, handle: str, logged: LogRecord | None) -> tuple[list[str], Member, int | None]:
        """Commit :meth:`delete_member`: ``(rooms left, sorted; the member before; log seq)``."""

    async def _after_delete_member(self, handle: str) -> None:
        """Clean up after a committed deletion, once it is reported (the KV store rewrites the
        room records that still name the member); never raises. Nothing to do by default."""
        return None

    # -- rooms ---------------------------------------------------------------
    async def create_room(self, name: str, owner: str, *, logged: LogRecord | None = None) -> Room:
        """Create a room owned by ``owner``; a ``logged`` entry's result is ``{"room_id": ...}``."""
        room, seq = await self._create_room(name, owner, logged)
        await self._report("room_created", logged, seq, handle=owner, room_id=room.room_id,
                           after=room_state_of(room))
        return room

    @abc.abstractmethod
    async def _create_room(self, name: str, owner: str, logged: LogRecord | None) -> tuple[Room, int | None]:
        """Commit :meth:`create_room`: ``(room, log seq)``."""

    @abc.abstractmethod
    async def list_rooms(self, handle: str | None = None) -> list[Room]:
        """All rooms, or those ``handle`` is a member of."""

    @abc.abstractmethod
    async def get_room(self, room_id: str) -> Room | None: ...

    async def delete_room(self, room_id: str, *, logged: LogRecord | None = None) -> None:
        before, seq = await self._delete_room(room_id, logged)
        await self._report("room_deleted", logged, seq, room_id=room_id, before=before)

    @abc.abstractmethod
    async def _delete_room(self, room_id: str, logged: LogRecord | None) -> tuple[dict[str, Any], int | None]:
        """Commit :meth:`delete_room`: ``(room_state before, log seq)``."""

    async def add_room_member(self, room_id: str, handle: str, *, logged: LogRecord | None = None) -> Room:
        """Add (idempotent); a new member makes the room ``rekey_required``."""
        room, before, seq = await self._add_room_member(room_id, handle, logged)
        if before is not None:
            await self._report("room_member_added", logged, seq, handle=handle, room_id=room_id, before=before,
                               after=room_state_of(room))
        return room

    @abc.abstractmethod
    async def _add_room_member(self, room_id: str, handle: str,
                               logged: LogRecord | None) -> tuple[Room, dict[str, Any] | None, int | None]:
        """Commit :meth:`add_room_member`: ``(room after, room_state before or None when unchanged, log seq)``."""

    async def remove_room_member(self, room_id: str, handle: str, *, logged: LogRecord | None = None) -> Room:
        """Remove; the room becomes ``rekey_required``. :class:`NotFound` if not a member."""
        room, before, seq = await self._remove_room_member(room_id, handle, logged)
        await self._report("room_member_removed", logged, seq, handle=handle, room_id=room_id, before=before,
                           after=room_state_of(room))
        return room

    @abc.abstractmethod
    async def _remove_room_member(self, room_id: str, handle: str,
                                  logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        """Commit :meth:`remove_room_member`: ``(room after, room_state before, log seq)``."""

    async def put_keys(self, room_id: str, epoch: int, sealed: dict[str, bytes], *,
                       sigs: dict[str, bytes] | None = None, sealer: str | None = None,
                       log_head: dict[str, Any] | None = None, logged: LogRecord | None = None) -> Room:
        """Store a new epoch atomically, with each member's signature and the epoch's sealer and log head.

        :class:`Conflict` unless ``epoch`` is current+1 and ``sealed`` names exactly
        the current members (``extra`` holds ``missing``/``extra`` handles). Of two
        concurrent calls for the same epoch exactly one wins. A ``logged`` entry's
        result is ``{"epoch": epoch}``.
        """
        room, before, seq = await self._put_keys(room_id, epoch, sealed, sigs, sealer, log_head, logged)
        await self._report("keys_posted", logged, seq, room_id=room_id, before=before, after=room_state_of(room))
        return room

    @abc.abstractmethod
    async def _put_keys(self, room_id: str, epoch: int, sealed: dict[str, bytes], sigs: dict[str, bytes] | None,
                        sealer: str | None, log_head: dict[str, Any] | None,
                        logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        """Commit :meth:`put_keys` (after :func:`check_new_epoch`): ``(room after, room_state before, log seq)``."""

    async def get_sealed_key(self, room_id: str, handle: str, epoch: int | None = None) -> tuple[int, bytes] | None:
        """The key sealed to ``handle`` at ``epoch`` (latest such epoch when None)."""
        found = await self.get_key_package(room_id, handle, epoch)
        return None if found is None else (found.epoch, found.sealed)

    @abc.abstractmethod
    async def get_key_package(self, room_id: str, handle: str, epoch: int | None = None) -> KeyPackage | None:
        """The key package sealed to ``handle`` at ``epoch`` (latest such epoch when None)."""

    # -- the membership log --------------------------------------------------------
    @abc.abstractmethod
    async def log_head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; ``(-1, "")`` for an empty log."""

    @abc.abstractmethod
    async def log_entries(self, after: int = -1, limit: int = 500) -> list[str]:
        """The stored texts of the entries with ``seq > after``, in order, at most ``limit``."""

    @abc.abstractmethod
    async def log_hash_at(self, seq: int) -> str | None:
        """The hash of entry ``seq``; None when the log has no such entry."""

    @abc.abstractmethod
    async def membership(self) -> Membership: ...

    # -- replay protection's high-water mark -----------------------------------------
    @abc.abstractmethod
    async def nonce_high_water(self) -> int:
        """The durable high-water mark of signed requests: no request was ever
        accepted whose ``created`` is above it (0 when none was recorded).

        The nonce bucket lives in memory (docs/operations.md, "Durability"): when
        it is lost, the bucket that replaces it refuses every request created at
        or before this mark, so none accepted before the loss can be replayed.
        """

    @abc.abstractmethod
    async def raise_nonce_high_water(self, value: int) -> int:
        """Make the mark at least ``value``, durably, before returning; never lower it.
        Returns the stored mark (``>= value``)."""
