"""What ``/healthz`` reports, kept by a background prober: the request itself makes no round trip.

docs/http-api.md ("GET /healthz") and docs/operations.md ("Health checks")
describe the answer. ``/healthz`` must answer at once whatever NATS is doing
(a nats-server that is stopped, hung or unreachable must make it say
``degraded``, not make it wait), so it reads only in-memory state:

* the NATS connection's state, which nats-py keeps from the socket (and the
  bus's disconnect/reconnect callbacks wake the prober);
* the supervisor's view of its child (running, restarts);
* whether the nonce store's last claim failed (``NonceStore.failing``: a
  request's claim counts at once, not from the next probe);
* whether the nonce bucket's floor is still ahead of this clock, so that
  every request signed now is refused (``NonceStore.floor``; after a loss
  whose mark a client's clock, or a move of a 0.11 bucket, put ahead);
* the results of :class:`HealthProber`, which every :data:`PROBE_INTERVAL`
  seconds asks, each within :data:`PROBE_TIMEOUT`: is a claim of the nonce
  store's own acknowledged, does the store answer (a cluster's state bucket has a
  leader), and how many route peers the node has.

A result older than :data:`STALE_AFTER` counts as a failure: a prober that
stopped answering never keeps an old "ok" alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .aio import cancel_and_wait, within

log = logging.getLogger("unibus.health")

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
STALE_AFTER = 3 * (PROBE_INTERVAL + PROBE_TIMEOUT)


@dataclass(frozen=True)
class HealthState:
    """One reading of the node's health, as /healthz and the metrics report it."""

    ok: bool
    connected: bool
    jetstream: bool
    nats_running: bool
    routes: int | None  # None off a cluster
    #: The nonce bucket's floor while a request signed now would still be refused by it, else None.
    floor_ahead: int | None = None


class HealthProber:
    """Probes NATS in the background so that reading health never waits (see the module docstring).

    ``nonces`` is the nonce store (``available(timeout)``), ``store`` the
    control-plane store (``available()``), ``route_peers`` an awaitable
    count of route peers (cluster nodes), ``supervisor`` the
    :class:`~unibus.supervisor.NatsSupervisor` or None (external NATS).
    """

    def __init__(self, bus: Any, *, nonces: Any = None, store: Any = None, supervisor: Any = None,
                 route_peers: Callable[[], Awaitable[int | None]] | None = None, clustered: bool = False,
                 interval: float = PROBE_INTERVAL, timeout: float = PROBE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.nonces = nonces
        self.store = store
        self.supervisor = supervisor
        self.route_peers = route_peers
        self.clustered = clustered
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.wall = wall
        self.jetstream = False
        self.store_ok = False
        self.routes: int | None = 0 if clustered else None
        self.probed_at: float | None = None
        self.probes = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # -- reading (no I/O) ---------------------------------------------------------------

    def fresh(self) -> bool:
        return self.probed_at is not None and self.clock() - self.probed_at <= STALE_AFTER

    def state(self) -> HealthState:
        connected = bool(self.bus is not None and self.bus.connected)
        fresh = self.fresh()
        # a claim that failed since the last probe counts at once (NonceStore.failing)
        jetstream = (connected and fresh and self.jetstream and self.store_ok
                     and not getattr(self.nonces, "failing", False))
        running = self.supervisor is None or bool(self.supervisor.running)
        routes = (self.routes or 0) if self.clustered else None
        # a request created at or before the floor is refused: one signed now, until a second past it
        floor = getattr(self.nonces, "floor", None)
        ahead = floor if isinstance(floor, int) and floor + 1 > self.wall() else None
        return HealthState(ok=connected and jetstream and running and ahead is None, connected=connected,
                           jetstream=jetstream, nats_running=running, routes=routes, floor_ahead=ahead)

    # -- probing ----------------------------------------------------------------------------

    async def _bounded(self, aw: Awaitable[Any]) -> Any:
        try:
            return await within(aw, self.timeout)
        except Exception:  # noqa: BLE001 - any failure of a probe is "not available"
            return None

    async def probe_once(self) -> HealthState:
        """Run every probe once (concurrently, each within ``timeout``) and keep the results."""
        connected = self.bus is not None and self.bus.connected

        async def jetstream() -> bool:
            if not connected:
                return False
            if self.nonces is not None:
                return bool(await self._bounded(self.nonces.available(timeout=self.timeout)))
            return bool(await self._bounded(self.bus.jetstream_ok(timeout=self.timeout)))

        async def store() -> bool:
            if self.store is None or not connected:
                return self.store is None or connected
            return bool(await self._bounded(self.store.available()))

        async def routes() -> int | None:
            if not self.clustered or self.route_peers is None or not connected:
                return None
            return await self._bounded(self.route_peers())

        js, st, peers = await asyncio.gather(jetstream(), store(), routes())
        self.jetstream, self.store_ok = js, st
        if self.clustered:
            self.routes = peers or 0
        self.probed_at = self.clock()
        self.probes += 1
        return self.state()

    def wake(self) -> None:
        """Probe now (a NATS disconnect or reconnect): health follows the connection at once."""
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="unibus-health-prober")

    async def _run(self) -> None:
        while not self._stopping:  # a flag as well: a cancellation can be lost in nats-py (unibus.aio)
            # cleared before probing: a wake that arrives during a probe (a reconnect right
            # after the disconnect that woke it) makes another probe, it is never lost
            self._wake.clear()
            try:
                await self.probe_once()
            except Exception as e:  # noqa: BLE001 - keep probing; stale results count as failures
                log.warning("health probe failed: %s: %s", type(e).__name__, e)
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), self.interval)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
