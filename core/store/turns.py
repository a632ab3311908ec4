"""A node's turns for atomic batches, shared fairly between the members writing.

nats-server takes a bounded number of atomic batches in flight per stream
(docs/store.md, "Batches in flight"), so a node sends at most a few at once and
the others wait for a turn. One queue for all of them let one member with a few
hundred writes in flight make every other member's multi-key write wait behind
them, up to the store's timeout, and then fail with 503 (a review). So turns are
given per writer:

- a member holds at most :attr:`Turns.per_writer` turns at once (half of them by
  default): the rest are always there for the others;
- a turn given back goes to the waiting writer that holds the fewest, and among
  those to the one waiting longest, so a writer with one write waits for at most
  one turn to come back, however many others are queued.

Who writes is :data:`writer`, a context variable: the auth middleware sets it to
the member whose signed request is being served (tasks it starts inherit it), and
it is ``None`` for the node's own work (a start's clean-up, the watch), which has
no bound of its own (it is the node's, and one clean-up at a time).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools

from ..aio import within

__all__ = ["Turns", "writer"]

#: The member whose request the store's writes in this context serve; ``None``: the node's own.
writer: contextvars.ContextVar[str | None] = contextvars.ContextVar("unibus_store_writer", default=None)


class Turns:
    """``capacity`` turns, given fairly between writers (this module's docstring).

    :meth:`take` waits for one, for at most ``timeout`` seconds (``TimeoutError``
    after that, with nothing held); :meth:`give_back` returns it, at once or later
    (``asyncio.get_running_loop().call_later``). Bounded work: each turn given back
    looks at the writers waiting, one entry each.
    """

    def __init__(self, capacity: int, per_writer: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.per_writer = max(1, min(capacity, per_writer if per_writer is not None else capacity // 2))
        self.free = capacity
        self._held: collections.Counter[str | None] = collections.Counter()
        # writer -> its waiters, oldest first: (arrival number, future)
        self._waiting: dict[str | None, collections.deque[tuple[int, asyncio.Future[None]]]] = {}
        self._arrivals = itertools.count()

    def held(self, who: str | None) -> int:
        """The turns ``who`` holds now."""
        return self._held[who]

    def waiting(self, who: str | None) -> int:
        """The takes of ``who`` that wait for a turn now."""
        return sum(1 for _n, fut in self._waiting.get(who, ()) if not fut.done())

    def _may_hold_more(self, who: str | None) -> bool:
        return who is None or self._held[who] < self.per_writer

    async def take(self, who: str | None, timeout: float | None) -> None:
        """A turn for ``who``, within ``timeout`` seconds or ``TimeoutError``."""
        if self.free and self._may_hold_more(who) and not self._waiting.get(who):
            self.free -= 1
            self._held[who] += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(who, collections.deque()).append((next(self._arrivals), fut))
        try:
            await within(asyncio.shield(fut), timeout)
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give_back(who)  # given as the wait ended: not wanted any more
            else:
                fut.cancel()
                self._forget(who, fut)
            raise

    def give_back(self, who: str | None) -> None:
        """Return a turn of ``who``'s; it goes to the next writer in line, if any."""
        if self._held[who] <= 0:
            raise RuntimeError(f"a turn given back that {who!r} does not hold")
        self._held[who] -= 1
        if not self._held[who]:
            del self._held[who]
        self.free += 1
        self._hand_out()

    def _forget(self, who: str | None, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(who)
        if queue is None:
            return
        for item in queue:
            if item[1] is fut:
                queue.remove(item)
                break
        if not queue:
            del self._waiting[who]
        self._hand_out()  # this writer at its bound may have kept a free turn from others

    def _hand_out(self) -> None:
        while self.free and self._waiting:
            best: tuple[int, int, str | None] | None = None
            for who, queue in self._waiting.items():
                if self._may_hold_more(who):
                    rank = (self._held[who], queue[0][0], who)
                    if best is None or rank[:2] < best[:2]:
                        best = rank
            if best is None:
                return  # every writer waiting holds its share: the turn stays free for another
            who = best[2]
            queue = self._waiting[who]
            _n, fut = queue.popleft()
            if not queue:
                del self._waiting[who]
            self.free -= 1
            self._held[who] += 1
            fut.set_result(None)
