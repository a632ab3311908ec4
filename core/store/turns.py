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
  those to the one waiting longest, so a writer that holds none is served before
  every writer that holds some, however many writes they have queued.

Who writes is :data:`writer`, a context variable: the auth middleware sets it to
the member whose signed request is being served (tasks a handler starts inherit
it), and it is ``None`` for work started outside any request (a start's clean-up,
a plugin's task started at its start-up): the node's own, with no bound of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import itertools

from ..aio import within

__all__ = ["Turns", "writer"]

#: The member whose request the store's writes in this context serve; ``None``: the node's own.
writer: contextvars.ContextVar[str | None] = contextvars.ContextVar("unibus_store_writer", default=None)


class Turns:
    """``capacity`` turns, given fairly between writers (this module's docstring).

    :meth:`take` waits for one, for at most ``timeout`` seconds (``TimeoutError``
    after that, with nothing held); :meth:`give_back` returns it, at once or later
    (``asyncio.get_running_loop().call_later``).

    The writers waiting are ranked on a heap by (turns held, arrival of their oldest
    take), each entry checked when it comes up and dropped if either has changed
    since: a hand-out costs O(log n) in the writers waiting. A first version scanned
    every writer: a give-back and its hand-out to a bare future took 73 µs with 384
    writers waiting and 195 µs with 1,000, against 3.3 µs with the heap (a throwaway
    script; ``bench/probe_batch_turns.py`` measures it with the tasks woken).
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
        # (turns held, arrival of the oldest take, entry number, writer): the next to serve on top;
        # stale entries (held or oldest take changed since) are dropped as they come up. The entry
        # number is unique, so two entries never compare their writers (None and str do not).
        self._ranks: list[tuple[int, int, int, str | None]] = []
        self._arrivals = itertools.count()
        self._entries = itertools.count()

    def held(self, who: str | None) -> int:
        """The turns ``who`` holds now."""
        return self._held[who]

    def waiting(self, who: str | None) -> int:
        """The takes of ``who`` that wait for a turn now (a take leaves the line as its wait ends)."""
        return len(self._waiting.get(who, ()))

    def _may_hold_more(self, who: str | None) -> bool:
        return who is None or self._held[who] < self.per_writer

    async def take(self, who: str | None, timeout: float | None) -> None:
        """A turn for ``who``, within ``timeout`` seconds or ``TimeoutError``."""
        if self.free and self._may_hold_more(who) and not self._waiting.get(who):
            self.free -= 1
            self._held[who] += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(who, collections.deque())
        queue.append((next(self._arrivals), fut))
        if len(queue) == 1:
            self._rank(who)
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
        self._rank(who)
        self._hand_out()

    def _forget(self, who: str | None, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(who)
        if queue is None:
            return
        first = queue[0][1] is fut
        for item in queue:
            if item[1] is fut:
                queue.remove(item)
                break
        if not queue:
            del self._waiting[who]
        elif first:
            self._rank(who)
        self._hand_out()  # this writer at its bound may have kept a free turn from others

    def _rank(self, who: str | None) -> None:
        """Put ``who``'s rank now on the heap, if it waits (the entries before it go stale)."""
        queue = self._waiting.get(who)
        if not queue:
            return
        heapq.heappush(self._ranks, (self._held[who], queue[0][0], next(self._entries), who))
        if len(self._ranks) > 64 + 4 * len(self._waiting):  # mostly stale: rebuild it, O(writers waiting)
            self._ranks = [(self._held[w], q[0][0], next(self._entries), w) for w, q in self._waiting.items()]
            heapq.heapify(self._ranks)

    def _hand_out(self) -> None:
        """Free turns to the writers waiting, fewest held first, then longest waiting; a writer at
        its bound is passed over (at most ``capacity // per_writer`` of them can be)."""
        passed: list[tuple[int, int, int, str | None]] = []
        try:
            while self.free and self._ranks:
                rank = heapq.heappop(self._ranks)
                held, first, _entry, who = rank
                queue = self._waiting.get(who)
                if not queue or queue[0][0] != first or self._held[who] != held:
                    continue  # stale
                if not self._may_hold_more(who):
                    passed.append(rank)
                    continue
                _n, fut = queue.popleft()
                if not queue:
                    del self._waiting[who]
                self.free -= 1
                self._held[who] += 1
                fut.set_result(None)
                self._rank(who)
        finally:
            for rank in passed:
                heapq.heappush(self._ranks, rank)
