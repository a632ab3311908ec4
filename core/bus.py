"""membershipd's own connection to NATS (embedded or external)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from .errors import RuntimeFailure
from .settings import Secret

log = logging.getLogger("unibus.bus")


class Bus:
    """A reconnecting nats-py client plus its JetStream context.

    It reconnects forever: while nats-server is down (crash, restart) requests
    that need it fail fast and ``/healthz`` reports ``degraded``.
    """

    def __init__(self, url: str, seed: Secret | None = None, *, name: str = "membershipd") -> None:
        self.url = url
        self._seed = seed
        self.name = name
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None

    async def connect(self, timeout: float = 10.0) -> None:
        async def _err(e: Exception) -> None:
            log.debug("nats client: %s", e)

        async def _disc() -> None:
            log.warning("disconnected from NATS at %s", self.url)

        async def _reconn() -> None:
            log.info("reconnected to NATS at %s", self.url)

        kwargs = {}
        if self._seed is not None:
            kwargs["nkeys_seed_str"] = self._seed.reveal()
        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=_err,
                    disconnected_cb=_disc,
                    reconnected_cb=_reconn,
                    **kwargs,
                ),
                timeout,
            )
        except Exception as e:
            raise RuntimeFailure(f"cannot connect to NATS at {self.url}: {type(e).__name__}: {e}") from None
        self.js = self.nc.jetstream(timeout=2.0)
        if not await self.jetstream_ok(timeout=timeout):
            raise RuntimeFailure(f"NATS at {self.url} answers but JetStream does not (is it enabled?)")

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def jetstream_ok(self, timeout: float = 1.0) -> bool:
        """One JetStream round trip ($JS.API.INFO) within ``timeout``."""
        if not self.connected or self.js is None:
            return False
        try:
            await asyncio.wait_for(self.js.account_info(), timeout)
            return True
        except Exception:
            return False

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 3.0)
