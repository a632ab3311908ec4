"""Which servers must confirm a change on a cluster: a set of server ids (docs/bus-auth.md).

nats-server routes form a full mesh and forward nothing further: a request
published on one server reaches only the servers it has a route to. When
the route between two nodes drops while both keep their routes to a third
(a partial mesh), each still hears from the third, and counting the servers
that answer against its own routes would confirm a revocation the other
node never saw. So the expected servers are a *set*: this node's server,
every server that answered, and every server that any of them has a route
to. A server named by a responder's routes that does not answer itself is
one the change did not reach: it is not confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping

#: server id -> the ids of the servers it has routes to (None: its ROUTEZ went unanswered)
Routes = Mapping[str, frozenset[str] | None]


class MeshUnknown(Exception):
    """A server did not say which servers it has routes to, and no set is known from before."""


class Mesh:
    """The expected set, and the last one every server fully answered for.

    When a server does not say which servers it has routes to (its ROUTEZ
    unanswered, e.g. on a loaded machine: the asking node asks that server's
    ROUTEZ itself first), the set is unknown and nothing is confirmed. Never
    "alone": a set of this server only is never kept as the last one, and once
    a set is known, a node that finds itself without routes expects that set
    (the servers it was cut off from did not get the change).

    Before any full answer, a node still knows the peers its own routes named
    once they formed (:attr:`seed`, :meth:`learn`), and a node without routes
    expects them: it never confirms alone once it had a peer. Neither the seed
    nor the last set stands in for a route set no one could say.
    """

    def __init__(self) -> None:
        self.last: frozenset[str] | None = None
        #: this server and the peers its own routes named before any full answer
        self.seed: frozenset[str] | None = None

    def _union(self, own: str, routes: Routes) -> tuple[frozenset[str], bool]:
        """``(own, every responder and every id their routes name; whether every route set is known)``."""
        ids = {own, *routes}
        known = own in routes
        for remote in routes.values():
            if remote is None:
                known = False
            else:
                ids |= remote
        return frozenset(ids), known

    def _resolve(self, own: str, routes: Routes) -> tuple[frozenset[str] | None, bool]:
        """``(the expected set or None when unknown, whether it may be kept as the last one)``."""
        ids, known = self._union(own, routes)
        if known and len(ids) > 1:
            return ids, True
        if not known:
            # A server that did not say its routes may route to a server no one else names
            # (one that joined since the last full answer): nothing stands in for what it
            # did not say (found by two red-team tests).
            return None, False
        # this server alone: the servers it knew it was cut off from did not get the change
        return ids | (self.last or frozenset()) | (self.seed or frozenset()), False

    def expected(self, own: str, routes: Routes) -> frozenset[str]:
        """The servers that must answer, from what the responders said (``routes``, keyed by the
        id of every server that answered); :class:`MeshUnknown` when it cannot be told."""
        ids, keep = self._resolve(own, routes)
        if ids is None:
            raise MeshUnknown("a server did not say which servers it has routes to, and none is known from before")
        if keep:
            self.last = ids
        return ids

    def learn(self, own: str, routes: frozenset[str] | None) -> bool:
        """Add this server and the servers it has routes to (its own ROUTEZ, asked every
        second) to what this node knows: to :attr:`seed`, and to the last set if there is
        one; True once it knows a peer. A node cut off from every other before its first
        full answer then expects them, not itself alone, and a node cut off after a full
        answer expects the peers that joined since as well (found by a red-team test).
        Only a full answer drops a server from the set."""
        if routes:
            added = frozenset({own, *routes})
            self.seed = (self.seed or frozenset()) | added
            if self.last is not None:
                self.last |= added
        return self.seed is not None or self.last is not None

    def replace(self, old: str, new: str) -> None:
        """A server restarted and took a new id: the last set names it by that one."""
        if self.last is not None and old in self.last:
            self.last = (self.last - {old}) | {new}
        if self.seed is not None and old in self.seed:
            self.seed = (self.seed - {old}) | {new}

    def complete(self, own: str, routes: Routes) -> bool:
        """Whether every expected server has answered (nothing is kept: for a gather to stop early)."""
        ids, _keep = self._resolve(own, routes)
        return ids is not None and ids <= routes.keys()
