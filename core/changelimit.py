"""How often one member may change another member's rooms, and how many rooms a member may
be in with bus authorization (docs/bus-auth.md, "How often one member may change another's
rooms" and "Limits per member").

With bus authorization, every change of a member's rooms kicks all of that member's NATS
connections: a grant so that the member's clients log in again with the room, a
revocation so that no connection keeps it. Any member may create a room and add or
remove any other member, so a red team added a victim to a room of its own and removed it
again, in a loop, and the victim's clients spent most of their time reconnecting: 54 to
93% of what its other rooms carried was lost to it.

So a member that is not an admin may change the rooms of one other member that is on
the bus (add it to a room, remove it, delete a room it is in) :data:`CHANGE_BURST` times
at once, then once every :data:`CHANGE_INTERVAL` seconds (the generic cell rate
algorithm: per pair of author and target, the time at which its budget is whole again).
Past that the change is refused with 429 ``too-many-requests`` and a ``Retry-After``,
before the store or the log is changed.

* **Only a change that kicks counts**: one of a member that is on the bus
  (:attr:`ChangeLimit.costs`, which the plugin that kicks sets; without it, as with
  ``--bus-auth off``, nothing is counted). A change of a member that is not on the bus
  costs it nothing, and an owner that adds the same member to room after room (a set-up
  script, a test suite on one daemon: the first version of this limit refused those) is
  not held back for it.
* **Removals count too.** The second version counted adds only, since a removal needs an
  add first; but an add made while the victim was off the bus was free, and its removal,
  once the victim was back, still kicked: a red team added a member to 100 rooms before
  it logged in, then removed it from them one by one (101 kicks, none counted). A member
  can always leave a room itself, and an admin can always remove it.
* **Every counted change is charged before its write**, even one that changes nothing:
  whether it does is known only as the store writes, and judging it from the room as read
  before that let concurrent adds and removals through uncounted
  (``test_concurrent_adds_and_removals_get_no_change_past_the_budget`` in
  tests/core/test_changelimit.py). A change the store refuses before writing anything
  (no such member or room, a concurrent writer, the author's rights gone) gives its
  charge back, so handles that name nobody leave nothing here.
* **Admins are not limited** (the operator's scripts set up whole fleets).

The plugin that kicks also says how many rooms a member is in and how many it may be in
(:attr:`ChangeLimit.rooms_in`, :attr:`ChangeLimit.max_rooms`): a member's bus login lists
every room it is in, and a red team that added a member to 8,000 rooms locked it off the
bus for good. An add (or a new room, for its owner) past that is 409 ``too-many-rooms``,
whoever makes it. And a member that is not an admin may put another in at most a tenth of
that many of its own rooms (:data:`ROOM_SHARE`; the rooms whose ``owner`` it is, whether
it is still in them or not): the next red team created rooms, added a victim and left
them, free while the victim was off the bus, until the victim was in 990 rooms and nobody
could add it to another.

These bounds are checked before the write, on a count the write then changes, so each add
of a member to a room (and each new room, for its owner) holds :meth:`ChangeLimit.adding`
for that member from its checks to its write: on one node, adds of one member go one at a
time, and the next one's checks see the last one's room. (A red team's concurrent adds put a
member in 159 rooms of one owner's, where the share is 100.) Other nodes' adds are not
serialized with this node's.

The times are kept in memory, per node: a cluster of three nodes gives an author three
budgets, and a restart gives a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable

from .problems import Problem

#: Changes of one other member's rooms one author may make at once.
CHANGE_BURST = 20
#: Seconds after which one more change is allowed, once the burst is spent.
CHANGE_INTERVAL = 3.0
#: One author that is not an admin may put another member in at most ``max_rooms // ROOM_SHARE``
#: rooms of its own.
ROOM_SHARE = 10


class ChangeLimit:
    """Each (author, target) pair's budget of changes, and the bound on a member's rooms (see
    the module docstring).

    :meth:`counts` says whether a change of a member's rooms is counted (see :attr:`costs`);
    :meth:`take` charges one change of each of its targets, or none and raises the 429
    problem; :meth:`give_back` returns the charges of a change that the store refused
    before writing anything; :meth:`check_rooms` refuses an add past :attr:`max_rooms`.
    ``refused`` counts the 429s (``unibus_http_member_changes_refused_total``).
    """

    def __init__(self, burst: int = CHANGE_BURST, interval: float = CHANGE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("a change limit needs a burst of at least 1 and an interval over 0")
        self.burst = burst
        self.interval = interval
        self.clock = clock
        #: (author, target) -> the time at which that pair's budget is whole again
        self._whole_at: dict[tuple[str, str], float] = {}
        #: when pairs whose budget is whole again are next forgotten
        self._next_prune = clock() + burst * interval
        self.refused = 0
        #: ``costs(handle)``: whether a change of ``handle``'s rooms would kick connections of
        #: its (bus authorization sets it; None, as with ``--bus-auth off``: none costs anything)
        self.costs: Callable[[str], bool] | None = None
        #: ``rooms_in(handle)``: how many rooms ``handle`` is in, and the most it may be in
        #: (bus authorization sets both: its login lists every room; None: no bound)
        self.rooms_in: Callable[[str], int] | None = None
        self.max_rooms: int | None = None
        #: member, or (room, member) -> (the lock held, how many hold it or wait for it)
        self._adds: dict[str | tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    def counts(self, target: str) -> bool:
        """Whether a change of ``target``'s rooms counts: only one that would kick its connections."""
        return self.costs is not None and bool(self.costs(target))

    def take(self, author: str, targets: Iterable[str]) -> dict[str, float]:
        """Charge one change by ``author`` to each of ``targets`` that :meth:`counts` (never the
        author itself), or raise :class:`~unibus.problems.Problem` 429 naming the first whose
        budget is spent, charging none; the charges' tokens, for :meth:`give_back`."""
        now = self.clock()
        self._prune(now)
        counted = sorted({t for t in targets if t != author and self.counts(t)})
        window = self.burst * self.interval
        tokens = {t: max(self._whole_at.get((author, t), now), now) + self.interval for t in counted}
        for target, whole_at in tokens.items():
            if (over := whole_at - now - window) > 0:
                self.refused += 1
                wait = max(1, math.ceil(over))
                raise Problem(429, f"{author} may change {target}'s rooms {self.burst} times in a row, then once "
                                   f"every {self.interval:g} s: each change makes all of {target}'s clients log in "
                                   f"to the bus again; try again in {wait} s",
                              kind="too-many-requests", target=target, headers={"Retry-After": str(wait)})
        for target, whole_at in tokens.items():
            self._whole_at[(author, target)] = whole_at
        return tokens

    def give_back(self, author: str, tokens: dict[str, float]) -> None:
        """Return the charges ``tokens`` (what :meth:`take` returned) of a change by ``author``
        that changed nothing, each if it still counts: one whose time has run out counts no
        more, and giving it back would give a free change."""
        now = self.clock()
        for target, token in tokens.items():
            pair = (author, target)
            if pair in self._whole_at and token > now:
                whole_at = self._whole_at[pair] - self.interval
                if whole_at > now:
                    self._whole_at[pair] = whole_at
                else:
                    del self._whole_at[pair]

    def adding(self, handle: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this while putting ``handle`` in one more room, from :meth:`check_rooms` and
        :meth:`check_share` to the write (whose change events update :attr:`rooms_in` before
        it returns): this node's adds of one member then go one at a time, so requests in
        flight together cannot pass its bounds together. Without bounds, nothing is held."""
        return self._held(handle)

    def changing(self, room_id: str, handle: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this while adding ``handle`` to ``room_id`` or removing it, outside
        :meth:`adding`: an add reads under it whether the member is in the room, and that
        stays true until its write, so an add read as changing nothing (and so not checked)
        cannot become one that changes something. One pair, not the member: a review's
        flood of such adds to its own room held back others' removals of the member from
        theirs (0.4 s to 3.75 s)."""
        return self._held((room_id, handle))

    @contextlib.asynccontextmanager
    async def _held(self, key: str | tuple[str, str]) -> AsyncIterator[None]:
        if self.rooms_in is None or self.max_rooms is None:
            yield
            return
        entry = self._adds.get(key)
        if entry is None:
            entry = self._adds[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0 and self._adds.get(key) is entry:
                del self._adds[key]

    def check_rooms(self, handle: str) -> None:
        """Refuse (409 ``too-many-rooms``) to put ``handle`` in one more room when it is in
        :attr:`max_rooms` already."""
        if self.rooms_in is None or self.max_rooms is None:
            return
        if (n := self.rooms_in(handle)) >= self.max_rooms:
            raise Problem(409, f"{handle} is in {n} rooms, the most a member may be in: its login to the bus "
                               "lists every room it is in; it must leave one first", kind="too-many-rooms",
                          target=handle, max_rooms=self.max_rooms)

    def share_reached(self, target: str) -> bool:
        """Whether ``target`` is in enough rooms (a share's worth) that one author's share of
        them may be full: only then must :meth:`check_share` count the author's rooms, a
        read of every room of the target's (the KV store's is a scan of all rooms)."""
        if self.rooms_in is None or self.max_rooms is None:
            return False
        return self.rooms_in(target) >= self.max_rooms // ROOM_SHARE

    def check_share(self, author: str, target: str, owned: int) -> None:
        """Refuse (409 ``too-many-rooms``) to put ``target`` in one more room of ``author``'s when
        it is in ``owned`` of them already, a tenth of :attr:`max_rooms` or more."""
        if self.max_rooms is None or author == target:
            return
        if owned >= (share := self.max_rooms // ROOM_SHARE):
            raise Problem(409, f"{target} is in {owned} rooms of {author}'s, the most one member may put another "
                               f"in ({share}, a tenth of the {self.max_rooms} rooms a member may be in)",
                          kind="too-many-rooms", target=target, max_rooms=share)

    def _prune(self, now: float) -> None:
        """Forget the pairs whose budget is whole again, once per burst's worth of time (a pair
        is whole again at most that long after its last change), so that a check costs no more
        than a dict look-up."""
        if now >= self._next_prune:
            self._whole_at = {pair: t for pair, t in self._whole_at.items() if t > now}
            self._next_prune = now + self.burst * self.interval

    def __len__(self) -> int:
        return len(self._whole_at)


__all__ = ["CHANGE_BURST", "CHANGE_INTERVAL", "ROOM_SHARE", "ChangeLimit"]
