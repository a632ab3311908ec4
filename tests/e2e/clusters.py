"""The e2e tests' three-node cluster: :class:`unibus.testing.Cluster` with a known route password.

``Cluster(tmp_path, admin)`` bootstraps ``admin`` on node 1 (the test then runs
``cluster.migrate()``, ``membershipd migrate-to-kv`` into the formed cluster);
``admin=None`` leaves every node empty, for a cluster that receives a whole
state from ``migrate-to-kv`` (a restored backup). Each test starts one cluster
and stops it. The password is fixed so that test_cluster.py can look for it
where it must not be (argv, environments, logs).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
from unibus import testing
from unibus.client import ApiError, UnibusClient
from unibus.testing import CLUSTER_FORM_TIMEOUT as FORM_TIMEOUT  # noqa: F401 - the tests import it from here
from unibus.testing import MembershipdProcess

SECRET = "route-secret-do-not-leak-7c1f"


class Cluster(testing.Cluster):
    def __init__(self, tmp_path: Path, admin=None) -> None:
        super().__init__(tmp_path, admin, secret=SECRET)


async def signed_ok(node: MembershipdProcess, identity) -> bool:
    async with UnibusClient(node.base_url, identity, timeout=5) as client:
        try:
            await client.me()
            return True
        except ApiError as e:
            if e.status in (401, 503):  # 401: this node has not seen the member yet (its KV watch)
                return False
            raise


async def eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


async def connect_member(url: str, identity, timeout: float = 15, **options: Any):
    """A member's bus connection that is expected to be granted. On a loaded machine
    a callout can go unanswered within nats-server's auth timeout, which the client
    sees as "Authorization Violation" like a refusal: try again until ``timeout``.
    (Tests that expect a refusal connect directly.)"""
    options = {"allow_reconnect": False, "connect_timeout": 3, **options}
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await nats.connect(url, nkeys_seed_str=identity.bus_nkey_seed(), **options)
        except (nats.errors.Error, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
