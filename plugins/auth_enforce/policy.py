"""Who may be on the bus and where: the in-memory index the auth callout answers from.

``bus_pub`` → handle, handle → rooms, room → handles. It is loaded from the
store at start-up and kept current by the store's changes: on a single node
the change listener updates it before the request that made the change is
answered; on a cluster node other nodes' writes arrive through the KV watch
and through the enforcer's apply requests (docs/bus-auth.md, "How a change
takes effect"). Each entry remembers the store revision it was read at, so a
slow re-read can never overwrite a newer one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ROOM_SUBJECT = "unibus.room.{room_id}.>"
INBOX = "_INBOX_{handle}.>"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one connection of a member may do: NATS publish and subscribe allow lists."""

    handle: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def member_permissions(handle: str, rooms: Iterable[str]) -> dict[str, list[str]]:
    """The allow lists of docs/bus-auth.md: the member's rooms, plus subscribe on its inbox.

    Never empty and never a wildcard beyond a room: an empty allow list means
    "everything" to nats-server, so a member in no room gets the inbox only for
    subscriptions and a deny-all publish (``pub.deny = [">"]``, see :func:`user_claims`).
    """
    subjects = [ROOM_SUBJECT.format(room_id=r) for r in sorted(rooms)]
    return {"publish": subjects, "subscribe": [*subjects, INBOX.format(handle=handle)]}


class Policy:
    """The index. Not thread-safe: used from the event loop only."""

    def __init__(self) -> None:
        self.handle_of: dict[str, str] = {}  # bus_pub -> handle
        self.bus_of: dict[str, str] = {}  # handle -> bus_pub
        self.members: set[str] = set()  # every member handle (with or without a bus key)
        self.rooms_of: dict[str, set[str]] = {}  # handle -> room ids
        self.room_members: dict[str, frozenset[str]] = {}  # room id -> handles
        self._member_rev: dict[str, int] = {}
        self._room_rev: dict[str, int] = {}
        #: sets of the handles and room ids updated one by one since each was opened (:meth:`track`)
        self._trackers: list[tuple[set[str], set[str]]] = []

    # -- whole loads ------------------------------------------------------------

    def track(self) -> tuple[set[str], set[str]]:
        """Start noting every member and room updated one by one: ``(handles, room ids)``, filled
        until :meth:`untrack`. A whole load read before such an update is older than it for those
        keys, so the loader reads them again after the load (``load_policy``)."""
        tracker: tuple[set[str], set[str]] = (set(), set())
        self._trackers.append(tracker)
        return tracker

    def untrack(self, tracker: tuple[set[str], set[str]]) -> None:
        self._trackers = [t for t in self._trackers if t is not tracker]

    def load(self, members: Iterable[tuple[str, str | None]], rooms: dict[str, frozenset[str]]) -> None:
        """Replace everything: ``members`` as ``(handle, bus_pub)``, ``rooms`` as ``{room_id: handles}``.

        The revisions applied one by one are kept: an update read before this load and applied
        after it must still lose to a newer one."""
        self.handle_of, self.bus_of, self.members, self.rooms_of, self.room_members = {}, {}, set(), {}, {}
        for handle, bus_pub in members:
            self._put_member(handle, bus_pub)
        for room_id, handles in rooms.items():
            self._put_room(room_id, frozenset(h for h in handles if h in self.members))

    def snapshot(self) -> dict[str, tuple[str, frozenset[str]]]:
        """``{handle: (bus_pub, rooms)}`` of members with a bus key: what :func:`diff` compares."""
        return {h: (key, frozenset(self.rooms_of.get(h, ()))) for h, key in self.bus_of.items()}

    # -- incremental updates -------------------------------------------------------

    def set_member(self, handle: str, present: bool, bus_pub: str | None,
                   revision: int = 0) -> tuple[set[str], set[str]]:
        """Apply a member as read from the store (``present=False``: gone).

        Returns ``(revoked, granted)`` handles; nothing when ``revision`` is
        older than the one already applied (a slow re-read lost a race).
        """
        for handles, _rooms in self._trackers:
            handles.add(handle)
        if revision and revision < self._member_rev.get(handle, 0):
            return set(), set()
        if revision:
            self._member_rev[handle] = revision
        had = self.bus_of.get(handle)
        if present:
            self._put_member(handle, bus_pub)
        else:
            self._drop_member(handle)
        revoked = {handle} if had is not None and (not present or bus_pub != had) else set()
        return revoked, set()

    def set_room(self, room_id: str, handles: frozenset[str] | None,
                 revision: int = 0) -> tuple[set[str], set[str]]:
        """Apply a room as read from the store (``None``: gone). Returns ``(revoked, granted)``."""
        for _handles, rooms in self._trackers:
            rooms.add(room_id)
        if revision and revision < self._room_rev.get(room_id, 0):
            return set(), set()
        if revision:
            self._room_rev[room_id] = revision
        before = self.room_members.get(room_id, frozenset())
        after = frozenset(h for h in handles if h in self.members) if handles is not None else frozenset()
        self._drop_room(room_id)
        if handles is not None:
            self._put_room(room_id, after)
        return set(before - after), set(after - before)

    def _put_member(self, handle: str, bus_pub: str | None) -> None:
        old = self.bus_of.pop(handle, None)
        if old is not None and self.handle_of.get(old) == handle:
            del self.handle_of[old]
        self.members.add(handle)
        if bus_pub is not None:
            self.bus_of[handle] = bus_pub
            self.handle_of[bus_pub] = handle

    def _drop_member(self, handle: str) -> None:
        old = self.bus_of.pop(handle, None)
        if old is not None and self.handle_of.get(old) == handle:
            del self.handle_of[old]
        self.members.discard(handle)
        for room_id in self.rooms_of.pop(handle, set()):
            members = self.room_members.get(room_id)
            if members is not None:
                self.room_members[room_id] = members - {handle}

    def _put_room(self, room_id: str, handles: frozenset[str]) -> None:
        self.room_members[room_id] = handles
        for h in handles:
            self.rooms_of.setdefault(h, set()).add(room_id)

    def _drop_room(self, room_id: str) -> None:
        for h in self.room_members.pop(room_id, frozenset()):
            rooms = self.rooms_of.get(h)
            if rooms is not None:
                rooms.discard(room_id)

    # -- answers --------------------------------------------------------------------

    def grant(self, bus_pub: str) -> Grant | None:
        """The rights of the member whose bus key this is, or None (unknown key, no member)."""
        handle = self.handle_of.get(bus_pub)
        if handle is None:
            return None
        perms = member_permissions(handle, self.rooms_of.get(handle, ()))
        return Grant(handle, tuple(perms["publish"]), tuple(perms["subscribe"]))


Snapshot = dict[str, tuple[str, frozenset[str]]]


def diff(before: Snapshot, after: Snapshot) -> tuple[set[str], set[str]]:
    """``(revoked, granted)`` handles between two :meth:`Policy.snapshot` s.

    Revoked: a member gone, whose bus key changed, or that lost a room.
    Granted: one that only gained rooms.
    """
    revoked, granted = set(), set()
    for handle, (key, rooms) in before.items():
        now = after.get(handle)
        if now is None or now[0] != key or not rooms <= now[1]:
            revoked.add(handle)
        elif now[1] != rooms:
            granted.add(handle)
    granted |= {h for h, (_key, rooms) in after.items() if h not in before and rooms}
    return revoked, granted
