"""Uploads and downloads in progress on one node: budgets, so that what they hold stays
bounded (docs/blobstore.md, "Limits").

An upload holds up to about 9 MiB of membershipd's memory while it streams in
(pieces of up to 1 MiB off the socket, gathered into 4 MiB hand-offs to the
writer thread, one being written while the next fills). Without a bound, a
member could open a hundred slow uploads and pin 900 MiB; the body deadline
ends each stalled one, but only after it. So a node runs at most
``--blob-max-uploads`` uploads at once (default 16: about 144 MiB at worst),
and one member at most a quarter of them (at least 1), so that one member
cannot take every slot from the others.

A download holds a connection, a descriptor on the blob (fs) or its chunk
requests (object store), and a socket send queue of up to a few MiB of kernel
memory that its client has not taken yet. The download deadlines end a stalled
one after about two body deadlines, but a member sending GETs faster than that
kept hundreds alive (found by a red-team test: ~4 MiB each on loopback, toward
the host's ``tcp_mem`` limit, which starves every TCP socket of the host). So
``--blob-max-downloads`` (default 64) bounds them the same way.

A refused transfer is answered before its body is read or sent: 429
``too-many-uploads`` (``too-many-downloads``) when the member already holds its
share (the client does not retry: that member's own transfers must finish
first), else 503 with ``Retry-After`` when the node is full (the client tries
again).

A slot must also be used: the body deadline ends an upload that stops, but
not one that trickles (a byte now and then, each within the deadline), so an
upload that has run for longer than one body deadline must have averaged
:data:`MIN_RATE` since (:func:`check_rate`, 408). A slot is thus held for at
most about two body deadlines unless its upload really moves data. Downloads
follow the same rule (``unibus.plugins.blobstore.pacing``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

DEFAULT_MAX_UPLOADS = 16
DEFAULT_MAX_DOWNLOADS = 64
#: Bytes per second an upload must average after its first body deadline (32 KiB/s,
#: a 100 MiB blob in under an hour).
MIN_RATE = 32 * 1024
#: Seconds a client is asked to wait when the node is full.
RETRY_AFTER = 1


def per_member(limit: int) -> int:
    """The transfers one member may have in progress at once: a quarter of the node's, at least 1."""
    return max(1, limit // 4)


class Slots:
    """Transfers of one kind (``"uploads"`` or ``"downloads"``) in progress on this node, by member."""

    def __init__(self, limit: int, kind: str = "uploads") -> None:
        self.limit = limit
        self.kind = kind
        self.per_member = per_member(limit)
        self.by_member: Counter[str] = Counter()
        #: called with ``"node"`` or ``"member"`` for every refusal (the plugin counts them in a metric)
        self.on_refused: Callable[[str], None] = lambda reason: None

    @property
    def active(self) -> int:
        return sum(self.by_member.values())

    @contextlib.contextmanager
    def hold(self, handle: str) -> Iterator[None]:
        """One slot for ``handle``'s transfer while the block runs; a 503 or 429 problem if there is none."""
        from unibus.problems import Problem

        kind, flag = self.kind, f"--blob-max-{self.kind}"
        extra = {f"max_{kind}": self.per_member}
        if self.by_member[handle] >= self.per_member:  # first: retrying cannot help this one
            self.on_refused("member")
            raise Problem(429, f"{handle} has {self.by_member[handle]} {kind} in progress, the most one member "
                               f"may have at once on this node (a quarter of {flag} {self.limit}); "
                               "let one finish first", kind=f"too-many-{kind}", **extra)
        if self.active >= self.limit:
            self.on_refused("node")
            extra[f"max_{kind}"] = self.limit
            raise Problem(503, f"{self.limit} {kind} are in progress on this node, the most it takes at once "
                               f"({flag}); try again after Retry-After", kind=f"too-many-{kind}",
                          headers={"Retry-After": str(RETRY_AFTER)}, **extra)
        self.by_member[handle] += 1
        try:
            yield
        finally:
            self.by_member[handle] -= 1
            if self.by_member[handle] <= 0:
                del self.by_member[handle]


def check_rate(received: int, elapsed: float, grace: float) -> None:
    """408 if an upload ``elapsed`` seconds old, past its ``grace`` (the body deadline), has
    received fewer than :data:`MIN_RATE` bytes per second of the time since."""
    if elapsed > grace and received < MIN_RATE * (elapsed - grace):
        from unibus.problems import Problem

        raise Problem(408, f"the request body arrived at {received / elapsed:.0f} bytes/s; an upload must average "
                           f"at least {MIN_RATE} bytes/s after its first {grace:g} s", kind="request-timeout")


__all__ = ["DEFAULT_MAX_DOWNLOADS", "DEFAULT_MAX_UPLOADS", "MIN_RATE", "RETRY_AFTER", "Slots", "check_rate",
           "per_member"]
