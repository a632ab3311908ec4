"""How often one member may add another to its rooms (docs/bus-auth.md, "How often one
member may change another's rooms").

Every change of a member's rooms kicks all of that member's NATS connections: a grant so
that the member's clients log in again with the room, a revocation so that no connection
keeps it. Any member may create a room and add or remove any other member, so a red team
added a victim to a room of its own and removed it again, in a loop, and the victim's
clients spent most of their time reconnecting: 54 to 93% of what its other rooms carried
was lost to it.

So a member that is not an admin may add one other member to its rooms only so often:
:data:`CHANGE_BURST` adds at once, then one every :data:`CHANGE_INTERVAL` seconds (the
generic cell rate algorithm: per pair of author and target, the time at which its budget
is whole again). Past that, the add is refused with 429 ``too-many-requests`` and a
``Retry-After``, before the store or the log is changed.

Only an add that costs its member something counts: one that bus authorization would
kick the member's connections for (:attr:`ChangeLimit.costs`, which the plugin that
kicks sets; without it, as with ``--bus-auth off``, nothing is counted). Adding a member
that is not on the bus costs it nothing, and an owner that adds the same member to room
after room (a set-up script, a test suite on one daemon: this suite's first version of
the limit refused those) is not held back for it.

Only adds count. A room's owner can take a member out of its room, or delete the room,
only after someone put the member in, so its removals are bounded by the adds too, and a
revocation is never held back: an owner can always cut a member off. Every add by the
author counts, including one of a member already in the room: whether it is in is known
only as the store writes, and judging it from the room as read before that let concurrent
adds and removals through uncounted (``test_concurrent_adds_and_removals_get_no_change_past_the_budget``
in tests/core/test_changelimit.py). An add that the store refuses before writing anything
(no such member or room, a concurrent writer, the author's rights gone) gives its charge
back, so handles that name nobody leave nothing here. Admins are not limited (the
operator's scripts set up whole fleets).

The times are kept in memory, per node: a cluster of three nodes gives an author three
budgets, and a restart gives a new one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .problems import Problem

#: Adds of one other member one author may make at once.
CHANGE_BURST = 20
#: Seconds after which one more add is allowed, once the burst is spent.
CHANGE_INTERVAL = 3.0


class ChangeLimit:
    """Each (author, target) pair's budget of adds (see the module docstring).

    :meth:`counts` says whether an add of a member is counted (see :attr:`costs`);
    :meth:`take` charges one add or raises the 429 problem; :meth:`give_back` returns the
    charge of an add that the store refused before writing anything.
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
        #: ``costs(handle)``: whether adding ``handle`` to a room would kick connections of its
        #: (bus authorization sets it; None, as with ``--bus-auth off``: no add costs anything)
        self.costs: Callable[[str], bool] | None = None

    def counts(self, target: str) -> bool:
        """Whether an add of ``target`` counts: only one that would kick its connections."""
        return self.costs is not None and bool(self.costs(target))

    def take(self, author: str, target: str) -> float:
        """Charge one add of ``target`` by ``author``, or raise :class:`~unibus.problems.Problem`
        429 (charging nothing) when the pair's budget is spent; the charge's token for
        :meth:`give_back`."""
        now = self.clock()
        self._prune(now)
        pair = (author, target)
        whole_at = max(self._whole_at.get(pair, now), now) + self.interval
        over = whole_at - now - self.burst * self.interval
        if over > 0:
            self.refused += 1
            wait = max(1, math.ceil(over))
            raise Problem(429, f"{author} may add {target} to its rooms {self.burst} times in a row, then once "
                               f"every {self.interval:g} s: each add makes all of {target}'s clients log in to the "
                               f"bus again; try again in {wait} s",
                          kind="too-many-requests", target=target, headers={"Retry-After": str(wait)})
        self._whole_at[pair] = whole_at
        return whole_at

    def give_back(self, author: str, target: str, token: float) -> None:
        """Return the charge ``token`` (what :meth:`take` returned) of an add of ``target`` by
        ``author`` that changed nothing, if it still counts: one whose time has run out counts
        no more, and giving it back would give a free add."""
        pair = (author, target)
        now = self.clock()
        if pair in self._whole_at and token > now:
            whole_at = self._whole_at[pair] - self.interval
            if whole_at > now:
                self._whole_at[pair] = whole_at
            else:
                del self._whole_at[pair]

    def _prune(self, now: float) -> None:
        """Forget the pairs whose budget is whole again, once per burst's worth of time (a pair
        is whole again at most that long after its last add), so that a check costs no more
        than a dict look-up."""
        if now >= self._next_prune:
            self._whole_at = {pair: t for pair, t in self._whole_at.items() if t > now}
            self._next_prune = now + self.burst * self.interval

    def __len__(self) -> int:
        return len(self._whole_at)


__all__ = ["CHANGE_BURST", "CHANGE_INTERVAL", "ChangeLimit"]
