"""Fixtures of the tests that stand a compromised server in front of a real daemon
(test_client_verify.py and the red-team files test_attack_*.py; see attackkit.py).

A module that needs other ones defines its own fixture of the same name, which wins."""

from __future__ import annotations

import pytest
from attackkit import fresh_daemon, running_proxy, worlds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One real membershipd for the module, with alice (admin), bob, carol and mallory."""
    yield from worlds(tmp_path_factory)


@pytest.fixture
async def proxy(world):
    """The compromised server: :class:`attackkit.Proxy` in front of ``world``'s daemon."""
    async with running_proxy(world) as p:
        yield p


@pytest.fixture
def daemon(tmp_path):
    """A daemon of the test's own (a log it may break): alice bootstrapped, bob and carol made."""
    proc = fresh_daemon(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()
