"""How much of the auth callout one member's bus logins may use (docs/bus-auth.md, "Limits per member").

Every login of a member makes membershipd build and sign a user JWT that lists each room the
member is in, twice (:mod:`.callout`), on its one event loop; nats-server then checks and
parses it. That work grows with the rooms: in process, 0.13 ms for a member in one room and
5.65 ms for a member in 1,000 (the bound, :data:`~.callout.MEMBER_MAX_ROOMS`), whose answer is
197 KB. Any member may create rooms, and nothing else stopped a member from logging in and
out in a loop, so one member in 1,000 rooms could hold membershipd's event loop busy with its
own logins: other members' logins missed nats-server's 1.5 s window and were refused, and
signed HTTP requests waited (docs/benchmarks.md, "Login floods").

So each login a member is granted costs it ``1 + rooms / ROOMS_PER_UNIT`` units of a budget
of :data:`LOGIN_BURST` units, which refills at :data:`LOGIN_RATE` units a second (the generic
cell rate algorithm, one time per member: when its budget is whole again). A login the budget
pays for within :data:`LOGIN_MAX_DELAY` is charged and answered when it is paid for, so that
a burst of reconnects (all of a member's connections kicked at once) is spread out rather
than refused; one it cannot is not answered at all (``callout.Responder._throttled``:
nats-server refuses it when its 1.5 s wait ends;
``unibus_bus_auth_callouts_total{result="throttled"}``) and costs the member nothing, and the
client tries again (the SDK's bus keeps trying while the control plane still has its key,
docs/client.md). The units follow the measured cost of an answer
(about 0.36 ms in all for one room, 5.9 ms for 1,000: 16 times, and 1,000 rooms cost 16.6
units), so every member may use about the same share of the event loop: some 23 ms a second
at the steady rate, whatever its rooms, and 0.2 s at once. With these numbers a member in
one room may log in about 500 times at once and then about 63 times a second; a member in
1,000 rooms 30 times at once and about 4 times a second.

Only logins that are granted are charged, after the member proved it holds its bus key
(the nonce signature) and after the bound on its connections: nobody can spend another
member's budget. A login past the budget is turned away before that proof is checked, at
the cost of checking nats-server's request alone. The times are kept in memory by each
membershipd, which answers callouts for every node: a cluster of three gives a member up to
three budgets, and a restart a new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Units a member's budget holds: what it may spend at once.
LOGIN_BURST = 512.0
#: Units a second the budget gets back.
LOGIN_RATE = 64.0
#: A login costs one unit, and one more for each this many rooms in its grant.
ROOMS_PER_UNIT = 64.0
#: Members past which a charge sweeps the members whose budgets are whole again.
SWEEP_AT = 4096
#: Seconds a login's answer may wait for its budget: nats-server waits 1.5 s for an answer
#: (``callout.AUTH_TIMEOUT``), and an answer must still reach it in what is left, from a loop
#: that may be busy (a red team saw held answers built after nats-server's wait, with 1.0 s).
LOGIN_MAX_DELAY = 0.75


class Throttled(Exception):
    """A login the member's budget cannot pay for within the wait allowed: ``wait`` seconds until it can."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"try again in {wait:.1f} s")
        self.wait = wait


def login_cost(rooms: int) -> float:
    """Units one login of a member in ``rooms`` rooms costs (see the module docstring)."""
    return 1.0 + rooms / ROOMS_PER_UNIT


class LoginLimit:
    """Each member's budget of logins (see the module docstring).

    :meth:`take` charges one login of a member in ``rooms`` rooms and says how long its answer
    waits, or charges nothing and raises :class:`Throttled`. ``burst`` and ``rate`` are the
    units and the units a second; ``clock`` a monotonic clock in seconds (tests move one by hand).
    """

    def __init__(self, *, burst: float = LOGIN_BURST, rate: float = LOGIN_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < login_cost(0) or rate <= 0:
            raise ValueError("a login limit needs room for one login and a positive rate")
        self.burst = burst
        self.rate = rate
        self.clock = clock
        #: handle -> the time at which its budget is whole again (only members that spent some)
        self._whole_at: dict[str, float] = {}

    def _after(self, handle: str, rooms: int, within: float) -> tuple[float, float, float]:
        """``(now, when its budget would be whole after this login, seconds until it is paid for)``,
        or :class:`Throttled`."""
        now = self.clock()
        cost = min(login_cost(rooms), self.burst) / self.rate  # seconds of refill
        after = max(self._whole_at.get(handle, now), now) + cost
        past = after - now - self.burst / self.rate
        if past > within + 1e-9:
            raise Throttled(past)
        return now, after, max(0.0, past)

    def check(self, handle: str, rooms: int, *, within: float = 0.0) -> float:
        """What :meth:`take` would answer, charging nothing."""
        return self._after(handle, rooms, within)[2]

    def take(self, handle: str, rooms: int, *, within: float = 0.0) -> float:
        """Charge one login of ``handle``, in ``rooms`` rooms: the seconds until the budget has
        paid for it (0: at once), at most ``within``; past that :class:`Throttled`, nothing
        charged. A login that costs more than the whole budget (not possible within the bound
        on rooms) is charged the whole budget."""
        now, after, delay = self._after(handle, rooms, within)
        if len(self._whole_at) >= SWEEP_AT and handle not in self._whole_at:
            self._sweep(now)
        self._whole_at[handle] = after
        return delay

    def _sweep(self, now: float) -> None:
        self._whole_at = {h: t for h, t in self._whole_at.items() if t > now}

    def spent(self, handle: str) -> float:
        """Units of ``handle``'s budget in use now (0 when it is whole)."""
        return max(0.0, self._whole_at.get(handle, 0.0) - self.clock()) * self.rate
